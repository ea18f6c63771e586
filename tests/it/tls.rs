//! HTTPS with a throwaway CA: curl and skopeo trust the CA and talk to Berth over TLS; plain HTTP
//! to the TLS port fails; a bad certificate stops Berth at start.

use std::path::Path;

use crate::backend_test;
use crate::e2e::{have, run, run_raw};
use crate::harness::TestRegistry;

/// Makes a CA and a leaf for 127.0.0.1 (CA:FALSE — rustls refuses a CA as end entity) in `dir`.
async fn throwaway_pki(dir: &Path) {
    let d = |f: &str| dir.join(f).display().to_string();
    let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"];
    let mut ca = vec!["req", "-x509", "-days", "1", "-subj", "/CN=berth-test-ca"];
    ca.extend(ec);
    let (ca_key, ca_crt) = (d("ca.key"), d("ca.crt"));
    ca.extend(["-keyout", &ca_key, "-out", &ca_crt]);
    run("openssl", &ca, &[]).await;
    let mut leaf = vec!["req", "-subj", "/CN=127.0.0.1"];
    leaf.extend(ec);
    let (leaf_key, leaf_csr) = (d("leaf.key"), d("leaf.csr"));
    leaf.extend(["-keyout", &leaf_key, "-out", &leaf_csr]);
    run("openssl", &leaf, &[]).await;
    std::fs::write(dir.join("ext"), "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\n")
        .unwrap();
    let (ext, leaf_crt) = (d("ext"), d("leaf.crt"));
    run(
        "openssl",
        &[
            "x509",
            "-req",
            "-in",
            &leaf_csr,
            "-CA",
            &ca_crt,
            "-CAkey",
            &ca_key,
            "-CAcreateserial",
            "-days",
            "1",
            "-extfile",
            &ext,
            "-out",
            &leaf_crt,
        ],
        &[],
    )
    .await;
}

backend_test!(https_with_a_private_ca, |reg| {
    if !have("openssl") || !have("curl") {
        return;
    }
    let mut config = reg.app.config.clone();
    let dir = reg.stop().await;
    throwaway_pki(dir.path()).await;
    config.tls = Some(berth::config::TlsConfig {
        cert: dir.path().join("leaf.crt"),
        key: dir.path().join("leaf.key"),
    });
    let ca = dir.path().join("ca.crt").display().to_string();
    let reg = TestRegistry::start_with(config, dir).await;
    let base = format!("https://127.0.0.1:{}", reg.addr.port());

    let out = run(
        "curl",
        &["-sS", "--cacert", &ca, "-w", "%{http_code}", "-o", "/dev/null", &format!("{base}/v2/")],
        &[],
    )
    .await;
    assert_eq!(out, "200");
    // Untrusted without the CA; plain HTTP to the TLS port does not get an answer.
    assert!(
        !run_raw("curl", &["-sS", "-o", "/dev/null", &format!("{base}/v2/")], &[]).await.status.success()
    );
    let plain = run_raw(
        "curl",
        &["-sS", "-o", "/dev/null", "-w", "%{http_code}", &format!("http://{}/v2/", reg.addr)],
        &[],
    )
    .await;
    assert_ne!(String::from_utf8_lossy(&plain.stdout), "200");

    if have("skopeo") {
        let certs = reg.dir.path().join("certs.d");
        std::fs::create_dir_all(&certs).unwrap();
        std::fs::copy(&ca, certs.join("ca.crt")).unwrap();
        let work = tempfile::tempdir().unwrap();
        let lay = work.path().join("lay");
        let img = crate::e2e::layout::image(&lay, 11, "amd64");
        crate::e2e::layout::finish(&lay, &[("v1", &img, crate::harness::OCI_MANIFEST)]);
        let certs = certs.display().to_string();
        run(
            "skopeo",
            &[
                "copy",
                "--quiet",
                "--dest-cert-dir",
                &certs,
                &format!("oci:{}:v1", lay.display()),
                &format!("docker://127.0.0.1:{}/tls/app:v1", reg.addr.port()),
            ],
            &[],
        )
        .await;
        let raw = run(
            "skopeo",
            &[
                "inspect",
                "--raw",
                "--cert-dir",
                &certs,
                &format!("docker://127.0.0.1:{}/tls/app:v1", reg.addr.port()),
            ],
            &[],
        )
        .await;
        assert_eq!(raw.as_bytes(), img.bytes.as_slice());
    }
});

#[tokio::test]
async fn a_bad_certificate_stops_berth_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = berth::config::Config::embedded(dir.path());
    std::fs::write(dir.path().join("bad.pem"), "not a certificate").unwrap();
    config.tls =
        Some(berth::config::TlsConfig { cert: dir.path().join("bad.pem"), key: dir.path().join("bad.pem") });
    let app = berth::app::App::open(&config).await.unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let err = berth::server::serve(listener, app, std::future::pending()).await.unwrap_err();
    assert!(err.to_string().contains("bad.pem"), "{err}");
}
