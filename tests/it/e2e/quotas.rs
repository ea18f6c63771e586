//! Quotas against a real client: skopeo pushing into a full scope fails, and shows Berth's
//! message naming the rule, the usage and the limit.

use super::layout;
use super::{have, run_raw};
use crate::events::with_config;
use crate::harness::{Backend, OCI_MANIFEST, TestRegistry};

async fn skopeo_shows_the_quota_refusal(reg: TestRegistry) {
    if !have("skopeo") {
        return;
    }
    let work = tempfile::tempdir().unwrap();
    let lay = work.path().join("lay");
    let image = layout::image(&lay, 31, "amd64");
    layout::finish(&lay, &[("one", &image, OCI_MANIFEST)]);
    let args = [
        "copy".to_string(),
        "--quiet".into(),
        "--dest-tls-verify=false".into(),
        format!("oci:{}:one", lay.display()),
        format!("docker://{}/tiny/app:v1", reg.addr),
    ];
    let out = run_raw("skopeo", &args.iter().map(String::as_str).collect::<Vec<_>>(), &[]).await;
    assert!(!out.status.success(), "a push past the quota must fail");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("denied") && err.contains("quota `tiny`") && err.contains("exceeded"),
        "skopeo shows the refusal: {err}"
    );
    assert_eq!(reg.get("/v2/tiny/app/manifests/v1").await.status(), 404);
    let (sessions,): (i64,) =
        sqlx::query_as("SELECT COUNT(*) FROM uploads").fetch_one(&reg.sql().await).await.unwrap();
    assert_eq!(sessions, 0, "nothing of the refused push stays open");
}

const TINY: &str = "[[quotas]]\nname = \"tiny\"\nrepositories = \"tiny/**\"\nmax_bytes = 100\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn skopeo_shows_the_quota_refusal_sqlite() {
    skopeo_shows_the_quota_refusal(with_config(Backend::Sqlite, TINY).await.unwrap()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn skopeo_shows_the_quota_refusal_postgres() {
    let Some(reg) = with_config(Backend::Postgres, TINY).await else {
        eprintln!("skipping: the scale-out deployment is not configured");
        return;
    };
    skopeo_shows_the_quota_refusal(reg).await;
}
