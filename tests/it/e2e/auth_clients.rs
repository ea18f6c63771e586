//! Real clients against an access-controlled Berth: skopeo with basic auth and with the token
//! flow (it fetches tokens from Berth's /auth/token), and the oci-client crate with basic auth.

use oci_client::client::{ClientConfig, ClientProtocol, Config, ImageLayer};
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};

use super::{have, layout, run, run_raw};
use crate::auth::{PASSWORD, with_auth};
use crate::backend_test;
use crate::harness::{OCI_MANIFEST, random_bytes};

/// An OCI layout with one image tagged `v1`: (its directory, the image, the skopeo source).
fn one_image_layout(seed: u64) -> (tempfile::TempDir, layout::Written, String) {
    let work = tempfile::tempdir().unwrap();
    let lay = work.path().join("lay");
    let img = layout::image(&lay, seed, "amd64");
    layout::finish(&lay, &[("v1", &img, OCI_MANIFEST)]);
    let src = format!("oci:{}:v1", lay.display());
    (work, img, src)
}

/// Pushes the layout image `src` to `target` (`repo:tag`) as the CI robot, with skopeo.
async fn push_as_robot(reg: &crate::harness::TestRegistry, src: &str, target: &str) {
    let robot = format!("robot:{PASSWORD}");
    let dest = format!("docker://{}/{target}", reg.addr);
    run("skopeo", &["copy", "--quiet", "--dest-tls-verify=false", "--dest-creds", &robot, src, &dest], &[])
        .await;
}

async fn skopeo_with_credentials(reg: &crate::harness::TestRegistry) {
    let (_work, img, src) = one_image_layout(9);
    let r = reg.addr.to_string();
    let reader = format!("reader:{PASSWORD}");

    push_as_robot(reg, &src, "team/e2e:v1").await;
    let tags = run(
        "skopeo",
        &["list-tags", "--tls-verify=false", "--creds", &reader, &format!("docker://{r}/team/e2e")],
        &[],
    )
    .await;
    assert!(tags.contains("v1"), "{tags}");
    let raw = run(
        "skopeo",
        &[
            "inspect",
            "--raw",
            "--tls-verify=false",
            "--creds",
            &reader,
            &format!("docker://{r}/team/e2e@{}", img.digest),
        ],
        &[],
    )
    .await;
    assert_eq!(raw.as_bytes(), img.bytes.as_slice());
    // A pull-only user cannot push; nobody gets in without credentials.
    let denied = run_raw(
        "skopeo",
        &[
            "copy",
            "--quiet",
            "--dest-tls-verify=false",
            "--dest-creds",
            &reader,
            &src,
            &format!("docker://{r}/team/e2e:v2"),
        ],
        &[],
    )
    .await;
    assert!(!denied.status.success());
    let anonymous =
        run_raw("skopeo", &["list-tags", "--tls-verify=false", &format!("docker://{r}/team/e2e")], &[]).await;
    assert!(!anonymous.status.success());
    let wrong = run_raw(
        "skopeo",
        &["list-tags", "--tls-verify=false", "--creds", "reader:wrong", &format!("docker://{r}/team/e2e")],
        &[],
    )
    .await;
    assert!(!wrong.status.success());
}

backend_test!(skopeo_basic_auth, |reg| {
    if !have("skopeo") {
        return;
    }
    let reg = with_auth(reg, false).await;
    skopeo_with_credentials(&reg).await;
});

backend_test!(skopeo_token_auth, |reg| {
    if !have("skopeo") {
        return;
    }
    let reg = with_auth(reg, true).await;
    skopeo_with_credentials(&reg).await;
});

backend_test!(oci_client_basic_auth, |reg| {
    let reg = with_auth(reg, false).await;
    let client = Client::new(ClientConfig { protocol: ClientProtocol::Http, ..Default::default() });
    let image: Reference = format!("{}/team/rust:v1", reg.addr).parse().unwrap();
    let layers = vec![ImageLayer::oci_v1(random_bytes(60, 5000), None)];
    let config = Config::oci_v1(br#"{"os":"linux"}"#.to_vec(), None);
    let robot = RegistryAuth::Basic("robot".into(), PASSWORD.into());
    client.push(&image, &layers, config.clone(), &robot, None).await.unwrap();
    let reader_client = Client::new(ClientConfig { protocol: ClientProtocol::Http, ..Default::default() });
    let reader = RegistryAuth::Basic("reader".into(), PASSWORD.into());
    let pulled = reader_client
        .pull(&image, &reader, vec![oci_client::manifest::IMAGE_LAYER_MEDIA_TYPE])
        .await
        .unwrap();
    assert_eq!(pulled.layers[0].data, layers[0].data);
    let other = Client::new(ClientConfig { protocol: ClientProtocol::Http, ..Default::default() });
    let target: Reference = format!("{}/team/rust:v2", reg.addr).parse().unwrap();
    assert!(
        other.push(&target, &layers, config, &reader, None).await.is_err(),
        "a pull-only user cannot push"
    );
});

backend_test!(podman_login_and_pull, |reg| {
    if !have("podman") || !have("skopeo") {
        return;
    }
    let reg = with_auth(reg, false).await;
    let (work, _img, src) = one_image_layout(12);
    let r = reg.addr.to_string();
    push_as_robot(&reg, &src, "team/podman:v1").await;

    let (root, runroot, authfile) =
        (work.path().join("root"), work.path().join("runroot"), work.path().join("auth.json"));
    let (root, runroot, authfile) =
        (root.to_str().unwrap(), runroot.to_str().unwrap(), authfile.to_str().unwrap());
    let podman = |args: &[&str]| {
        let mut all = vec!["--root", root, "--runroot", runroot, "--storage-driver", "vfs"];
        all.extend_from_slice(args);
        all.into_iter().map(String::from).collect::<Vec<_>>()
    };
    let login = |password: &str| {
        podman(&["login", "--tls-verify=false", "--authfile", authfile, "-u", "reader", "-p", password, &r])
    };
    let wrong: Vec<String> = login("wrong");
    let wrong: Vec<&str> = wrong.iter().map(String::as_str).collect();
    assert!(!run_raw("podman", &wrong, &[]).await.status.success(), "a wrong password must not log in");
    let ok: Vec<String> = login(PASSWORD);
    let ok: Vec<&str> = ok.iter().map(String::as_str).collect();
    let out = run("podman", &ok, &[]).await;
    assert!(out.contains("Login Succeeded"), "{out}");
    let pull = podman(&[
        "pull",
        "--quiet",
        "--tls-verify=false",
        "--authfile",
        authfile,
        &format!("{r}/team/podman:v1"),
    ]);
    let pull: Vec<&str> = pull.iter().map(String::as_str).collect();
    let id = run("podman", &pull, &[]).await;
    assert!(!id.trim().is_empty());
});
