//! `/metrics`: Prometheus text that a scraper parses, with request counters and latency
//! histograms by route, and the collector's counters and gauges moving as things happen.

use berth::oci::Digest;
use reqwest::Method;

use crate::backend_test;
use crate::harness::*;

/// The value of the sample `name{labels…}` whose labels include every one of `labels`.
pub(crate) fn sample(text: &str, name: &str, labels: &[&str]) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|line| {
        let (series, value) = line.rsplit_once(' ')?;
        let (metric, rest) = series.split_once('{').unwrap_or((series, ""));
        (metric == name && labels.iter().all(|l| rest.contains(l))).then(|| value.parse().ok())?
    })
}

async fn scrape(reg: &TestRegistry) -> String {
    let res = reg.get("/metrics").await;
    assert_eq!(res.status(), 200);
    assert!(res.headers()["content-type"].to_str().unwrap().starts_with("application/openmetrics-text"));
    let text = res.text().await.unwrap();
    assert!(text.trim_end().ends_with("# EOF"), "{text}");
    text
}

backend_test!(metrics_count_requests_and_what_the_collector_does, |reg| {
    let img = reg.push_image("met/app", "v1", 1600).await;
    for _ in 0..3 {
        assert_eq!(reg.get("/v2/met/app/manifests/v1").await.status(), 200);
    }
    assert_eq!(reg.get("/v2/met/app/manifests/nope").await.status(), 404);
    let text = scrape(&reg).await;
    let get_200 = ["route=\"manifest\"", "method=\"GET\"", "status=\"200\""];
    assert!(sample(&text, "berth_http_requests_total", &get_200).unwrap() >= 3.0, "{text}");
    let get_404 = ["route=\"manifest\"", "method=\"GET\"", "status=\"404\""];
    assert_eq!(sample(&text, "berth_http_requests_total", &get_404), Some(1.0));
    let timed = ["route=\"manifest\"", "method=\"GET\""];
    assert!(sample(&text, "berth_http_request_duration_seconds_count", &timed).unwrap() >= 4.0);
    assert!(sample(&text, "berth_http_request_duration_seconds_bucket", &["le=\"+Inf\""]).is_some());
    let pushed: usize =
        std::iter::once(&img.config).chain(&img.layers).map(Vec::len).sum::<usize>() + img.manifest.len();
    assert!(sample(&text, "berth_http_received_bytes_total", &[]).unwrap() >= pushed as f64);
    assert!(sample(&text, "berth_http_sent_bytes_total", &[]).unwrap() >= 3.0 * img.manifest.len() as f64);
    assert_eq!(sample(&text, "berth_upload_sessions", &[]), Some(0.0));

    // The collector: queue gauges, then counters once it collects.
    let res = reg.req(Method::DELETE, &format!("/v2/met/app/manifests/{}", img.digest)).send().await.unwrap();
    assert_eq!(res.status(), 202);
    let open = reg.start_upload("met/app").await;
    let text = scrape(&reg).await;
    assert!(sample(&text, "berth_gc_queue_reviews", &["kind=\"manifest\""]).unwrap() >= 1.0, "{text}");
    assert_eq!(sample(&text, "berth_gc_overdue_reviews", &["kind=\"manifest\""]), Some(0.0));
    assert_eq!(sample(&text, "berth_upload_sessions", &[]), Some(1.0));
    reg.app.registry.clock().advance_ms(8 * 24 * 3600 * 1000);
    let text = scrape(&reg).await;
    assert_eq!(sample(&text, "berth_gc_overdue_reviews", &["kind=\"manifest\""]), Some(1.0), "{text}");
    assert!(sample(&text, "berth_gc_lag_seconds", &[]).unwrap() > 3600.0);
    let pass = reg.app.registry.collect(1000).await.unwrap();
    let text = scrape(&reg).await;
    assert_eq!(sample(&text, "berth_gc_collected_total", &["kind=\"manifest\""]), Some(1.0), "{text}");
    assert_eq!(sample(&text, "berth_gc_collected_total", &["kind=\"blob\""]), Some(3.0));
    assert_eq!(sample(&text, "berth_gc_freed_bytes_total", &[]), Some(pass.bytes as f64));
    // The image's three blobs, and on the filesystem the expired session's (empty) file.
    let objects = if reg.on_postgres() { 3.0 } else { 4.0 };
    assert_eq!(sample(&text, "berth_gc_objects_deleted_total", &[]), Some(objects));
    assert_eq!(sample(&text, "berth_gc_uploads_expired_total", &[]), Some(1.0));
    assert_eq!(sample(&text, "berth_gc_outbox_keys", &[]), Some(0.0));
    assert_eq!(sample(&text, "berth_upload_sessions", &[]), Some(0.0));
    assert_eq!(reg.patch_chunk(&open, b"late", 0, 4).await.status(), 404);
    // A scrub finding shows.
    let kept = reg.push_image("met/app", "v2", 1601).await;
    let layer = Digest::sha256_of(&kept.layers[0]);
    reg.app.registry.blobs().delete(&reg.storage_key(&layer).await).await.unwrap();
    reg.app.registry.scrub_step(1, 1000).await.unwrap();
    assert_eq!(sample(&scrape(&reg).await, "berth_scrub_findings", &[]), Some(1.0));
});

// `metrics.listen`: a second address that serves /metrics alone; `metrics.enabled = false`
// takes it off the main listener.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_on_a_separate_listener() {
    let port = {
        let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        probe.local_addr().unwrap().port()
    };
    let dir = tempfile::tempdir().unwrap();
    let mut config = berth::config::Config::embedded(dir.path());
    config.storage_fsync = false;
    config.gc.enabled = false;
    config.metrics_enabled = false;
    config.metrics_listen = Some(format!("127.0.0.1:{port}").parse().unwrap());
    let reg = TestRegistry::start_with(config, dir).await;
    assert_eq!(reg.get("/v2/").await.status(), 200);
    assert_eq!(reg.get("/metrics").await.status(), 404);
    let url = format!("http://127.0.0.1:{port}/metrics");
    let mut text = String::new();
    for _ in 0..50 {
        if let Ok(res) = reqwest::get(&url).await {
            text = res.text().await.unwrap();
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert!(
        sample(&text, "berth_http_requests_total", &["route=\"base\"", "status=\"200\""]).is_some(),
        "{text}"
    );
    assert_eq!(reqwest::get(format!("http://127.0.0.1:{port}/v2/")).await.unwrap().status(), 404);
}

// A deadlock is counted even though the retry hides it from the client. Made exact on
// PostgreSQL: a third connection holds the tag's row; a tag delete share-locks the repository
// and waits for that row; the third connection then asks for the repository's row. PostgreSQL
// finds the cycle when the delete's wait passes `deadlock_timeout` (1 s) and aborts the delete,
// which Berth runs again — and it succeeds once the third connection is done.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deadlock_is_counted_though_the_retry_hides_it() {
    use sqlx::Connection as _;
    let Some(reg) = TestRegistry::try_start(Backend::Postgres).await else { return };
    reg.push_image("lock/app", "v1", 9100).await;
    let url = reg.app.config.metadata_url.clone();
    let mut third = sqlx::PgConnection::connect(&url).await.unwrap();
    let mut watch = sqlx::PgConnection::connect(&url).await.unwrap();
    sqlx::query("BEGIN").execute(&mut third).await.unwrap();
    sqlx::query("SELECT name FROM tags WHERE name = 'v1' FOR UPDATE").execute(&mut third).await.unwrap();
    let delete = {
        let (client, url) = (reg.client.clone(), reg.url("/v2/lock/app/manifests/v1"));
        tokio::spawn(async move { client.delete(url).send().await.unwrap().status() })
    };
    for attempt in 0.. {
        assert!(attempt < 500, "the delete never waited for the held tag row");
        let (waiting,): (i64,) = sqlx::query_as(
            "SELECT COUNT(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'",
        )
        .fetch_one(&mut watch)
        .await
        .unwrap();
        if waiting == 1 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    sqlx::query("SELECT name FROM repositories WHERE name = 'lock/app' FOR UPDATE")
        .execute(&mut third)
        .await
        .unwrap();
    sqlx::query("COMMIT").execute(&mut third).await.unwrap();
    assert_eq!(delete.await.unwrap(), 202, "the retried delete went through");
    let text = reg.get("/metrics").await.text().await.unwrap();
    assert!(text.contains("berth_db_deadlocks_total 1\n"), "{text}");
    assert!(text.contains("berth_db_retries_total{reason=\"deadlock\"} 1\n"), "{text}");
}
