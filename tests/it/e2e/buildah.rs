//! buildah: build `FROM scratch` images, push them, push a manifest list, pull back by digest.

use super::{have, run};
use crate::backend_test;
use crate::harness::{OCI_INDEX, header};

backend_test!(buildah_build_push_and_manifest_list, |reg| {
    if !have("buildah") {
        return;
    }
    let work = tempfile::tempdir().unwrap();
    let root = work.path().join("root");
    let runroot = work.path().join("runroot");
    let (root, runroot) = (root.to_str().unwrap().to_string(), runroot.to_str().unwrap().to_string());
    let b = |args: &[&str]| -> Vec<String> {
        let mut v: Vec<String> = ["--storage-driver", "vfs", "--root", &root, "--runroot", &runroot]
            .iter()
            .map(|s| s.to_string())
            .collect();
        v.extend(args.iter().map(|s| s.to_string()));
        v
    };
    let env = [("BUILDAH_ISOLATION", "chroot"), ("STORAGE_DRIVER", "vfs")];
    let buildah = |args: Vec<String>| async move {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        run("buildah", &args, &env).await
    };
    let ctx = work.path().join("hello.txt");
    std::fs::write(&ctx, "hello from berth e2e\n").unwrap();
    let r = reg.addr.to_string();

    let mut digests = Vec::new();
    for arch in ["amd64", "arm64"] {
        let c = buildah(b(&["from", "scratch"])).await.trim().to_string();
        buildah(b(&["copy", &c, ctx.to_str().unwrap(), "/hello.txt"])).await;
        buildah(b(&["config", "--arch", arch, "--os", "linux", "--label", "org.example=berth", &c])).await;
        let image = format!("localhost/e2e/buildah:{arch}");
        buildah(b(&["commit", "--quiet", "--format", "oci", &c, &image])).await;
        buildah(b(&["rm", &c])).await;
        let digest_file = work.path().join(format!("digest-{arch}"));
        buildah(b(&[
            "push",
            "--quiet",
            "--tls-verify=false",
            "--digestfile",
            digest_file.to_str().unwrap(),
            &image,
            &format!("docker://{r}/e2e/buildah:{arch}"),
        ]))
        .await;
        let digest = std::fs::read_to_string(&digest_file).unwrap().trim().to_string();
        let res = reg.get(&format!("/v2/e2e/buildah/manifests/{arch}")).await;
        assert_eq!(header(&res, "docker-content-digest"), Some(digest.as_str()));
        digests.push(digest);
    }

    buildah(b(&["manifest", "create", "localhost/e2e/buildah:multi"])).await;
    for arch in ["amd64", "arm64"] {
        buildah(b(&[
            "manifest",
            "add",
            "localhost/e2e/buildah:multi",
            &format!("localhost/e2e/buildah:{arch}"),
        ]))
        .await;
    }
    buildah(b(&[
        "manifest",
        "push",
        "--all",
        "--tls-verify=false",
        "localhost/e2e/buildah:multi",
        &format!("docker://{r}/e2e/buildah:multi"),
    ]))
    .await;
    let res = reg.get("/v2/e2e/buildah/manifests/multi").await;
    assert_eq!(res.status(), 200);
    assert_eq!(header(&res, "content-type"), Some(OCI_INDEX));
    let index: serde_json::Value = res.json().await.unwrap();
    let listed: Vec<&str> =
        index["manifests"].as_array().unwrap().iter().map(|m| m["digest"].as_str().unwrap()).collect();
    for d in &digests {
        assert!(listed.contains(&d.as_str()), "{d} in {listed:?}");
    }

    // The same list as a Docker manifest list with schema2 children.
    buildah(b(&[
        "manifest",
        "push",
        "--all",
        "--format",
        "v2s2",
        "--tls-verify=false",
        "localhost/e2e/buildah:multi",
        &format!("docker://{r}/e2e/buildah:multi-v2s2"),
    ]))
    .await;
    let res = reg.get("/v2/e2e/buildah/manifests/multi-v2s2").await;
    assert_eq!(header(&res, "content-type"), Some(crate::harness::DOCKER_LIST));
    let list: serde_json::Value = res.json().await.unwrap();
    for child in list["manifests"].as_array().unwrap() {
        assert_eq!(child["mediaType"], crate::harness::DOCKER_MANIFEST);
        let res = reg.get(&format!("/v2/e2e/buildah/manifests/{}", child["digest"].as_str().unwrap())).await;
        assert_eq!(res.status(), 200);
    }

    // Pull back by digest into fresh storage.
    let root2 = work.path().join("root2").to_str().unwrap().to_string();
    let args = vec![
        "--storage-driver".to_string(),
        "vfs".into(),
        "--root".into(),
        root2,
        "--runroot".into(),
        runroot.clone(),
        "pull".into(),
        "--quiet".into(),
        "--tls-verify=false".into(),
        format!("{r}/e2e/buildah@{}", digests[0]),
    ];
    buildah(args).await;
});
