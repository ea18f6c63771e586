//! Immutable tags against a real client: skopeo can create a `release-*` tag but neither move
//! it to another image nor delete it (403 `DENIED`, naming the rule).

use super::layout;
use super::{have, run, run_raw};
use crate::harness::{Backend, OCI_MANIFEST, TestRegistry, header};
use crate::retention::{RULES, with_rules};

async fn skopeo_cannot_move_or_delete_an_immutable_tag(reg: TestRegistry) {
    if !have("skopeo") {
        return;
    }
    let work = tempfile::tempdir().unwrap();
    let lay = work.path().join("lay");
    let one = layout::image(&lay, 21, "amd64");
    let two = layout::image(&lay, 22, "amd64");
    layout::finish(&lay, &[("one", &one, OCI_MANIFEST), ("two", &two, OCI_MANIFEST)]);
    let dest = format!("docker://{}/ret/skopeo:release-1", reg.addr);
    let copy = |tag: &str| {
        vec![
            "copy".to_string(),
            "--quiet".into(),
            "--dest-tls-verify=false".into(),
            format!("oci:{}:{tag}", lay.display()),
            dest.clone(),
        ]
    };
    let args = copy("one");
    run("skopeo", &args.iter().map(String::as_str).collect::<Vec<_>>(), &[]).await;
    // The same image again is no move.
    run("skopeo", &args.iter().map(String::as_str).collect::<Vec<_>>(), &[]).await;

    let args = copy("two");
    let out = run_raw("skopeo", &args.iter().map(String::as_str).collect::<Vec<_>>(), &[]).await;
    assert!(!out.status.success(), "moving an immutable tag must fail");
    let err = String::from_utf8_lossy(&out.stderr).to_lowercase();
    assert!(err.contains("denied") && err.contains("frozen"), "skopeo shows the refusal: {err}");

    let out = run_raw("skopeo", &["delete", "--tls-verify=false", &dest], &[]).await;
    assert!(!out.status.success(), "deleting an immutable tag's image must fail");
    let err = String::from_utf8_lossy(&out.stderr).to_lowercase();
    assert!(err.contains("denied") && err.contains("frozen"), "{err}");

    let res = reg.get("/v2/ret/skopeo/manifests/release-1").await;
    assert_eq!(header(&res, "docker-content-digest"), Some(one.digest.as_str()), "nothing changed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn skopeo_meets_immutable_tags_sqlite() {
    skopeo_cannot_move_or_delete_an_immutable_tag(with_rules(Backend::Sqlite, RULES).await.unwrap()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn skopeo_meets_immutable_tags_postgres() {
    let Some(reg) = with_rules(Backend::Postgres, RULES).await else {
        eprintln!("skipping: the scale-out deployment is not configured");
        return;
    };
    skopeo_cannot_move_or_delete_an_immutable_tag(reg).await;
}
