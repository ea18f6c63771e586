//! Failures injected between Berth and its database: a connection to PostgreSQL that breaks
//! right after a `COMMIT` was sent, so the database commits but Berth never hears it (bytes
//! that a row may name must never be deleted on the strength of such an error), or that breaks
//! in the middle of a transaction (which must then leave nothing half-done). And between Berth
//! and its object store: a streamed part whose connection breaks is sent again.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use berth::oci::Digest;
use reqwest::{Method, StatusCode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::harness::*;

/// A TCP proxy in front of PostgreSQL (or the S3 server). While armed, the first connection that sends a message
/// containing the armed bytes has it delivered, and is then cut before the server's answer comes
/// back: armed with [`COMMIT`] (the simple-query message sqlx ends a transaction with), the
/// database commits unheard; armed with a statement's text, the transaction dies midway.
struct CommitCutter {
    addr: std::net::SocketAddr,
    armed: Arc<AtomicBool>,
    pattern: Arc<std::sync::Mutex<Vec<u8>>>,
    answer: Answer,
}

/// What the hit connection's client gets instead of the server's answer, if anything: then the
/// connection stays open, and nothing more is read from it.
type Answer = Arc<std::sync::Mutex<Option<Vec<u8>>>>;

/// The simple-query message `COMMIT`: 'Q', its length (4 + 7), the text with its NUL.
const COMMIT: &[u8] = b"Q\0\0\0\x0bCOMMIT\0";

impl CommitCutter {
    async fn start(upstream: std::net::SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let armed = Arc::new(AtomicBool::new(false));
        let pattern = Arc::new(std::sync::Mutex::new(COMMIT.to_vec()));
        let answer = Answer::default();
        let (arm, pat, ans) = (armed.clone(), pattern.clone(), answer.clone());
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let server = TcpStream::connect(upstream).await.unwrap();
                tokio::spawn(relay(client, server, arm.clone(), pat.clone(), ans.clone()));
            }
        });
        CommitCutter { addr, armed, pattern, answer }
    }

    /// Answers `answer` to the connection that next sends `bytes` — before the request is
    /// read whole — and then holds that connection open without reading from it.
    fn answer_early_on(&self, bytes: &[u8], answer: &[u8]) {
        *self.answer.lock().unwrap() = Some(answer.to_vec());
        self.arm_on(bytes);
    }

    /// Cuts the connection that next sends `COMMIT`.
    fn arm(&self) {
        self.arm_on(COMMIT);
    }

    /// Cuts the connection that next sends a message containing `bytes`.
    fn arm_on(&self, bytes: &[u8]) {
        *self.pattern.lock().unwrap() = bytes.to_vec();
        self.armed.store(true, Ordering::SeqCst);
    }

    fn fired(&self) -> bool {
        !self.armed.load(Ordering::SeqCst)
    }
}

async fn relay(
    client: TcpStream,
    server: TcpStream,
    armed: Arc<AtomicBool>,
    pattern: Arc<std::sync::Mutex<Vec<u8>>>,
    answer: Answer,
) {
    let (mut client_rx, client_tx) = client.into_split();
    let client_tx = Arc::new(tokio::sync::Mutex::new(client_tx));
    let answer_tx = client_tx.clone();
    let (mut server_rx, mut server_tx) = server.into_split();
    let cut = Arc::new(AtomicBool::new(false));
    let cut_up = cut.clone();
    let up = async move {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = match client_rx.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            let hit = {
                let pattern = pattern.lock().unwrap();
                armed.load(Ordering::SeqCst) && buf[..n].windows(pattern.len()).any(|w| w == &pattern[..])
            };
            if hit && armed.compare_exchange(true, false, Ordering::SeqCst, Ordering::SeqCst).is_ok() {
                // Cut the way back first, so the answer can never get through.
                cut_up.store(true, Ordering::SeqCst);
                let early = answer.lock().unwrap().take();
                if let Some(early) = early {
                    let _ = answer_tx.lock().await.write_all(&early).await;
                    // Hold the connection, reading nothing more.
                    std::future::pending::<()>().await;
                }
                let _ = server_tx.write_all(&buf[..n]).await;
                // Give the server time to commit before the connection goes away.
                tokio::time::sleep(std::time::Duration::from_millis(300)).await;
                return;
            }
            if server_tx.write_all(&buf[..n]).await.is_err() {
                return;
            }
        }
    };
    let down = async move {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = match server_rx.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            if cut.load(Ordering::SeqCst) || client_tx.lock().await.write_all(&buf[..n]).await.is_err() {
                return;
            }
        }
    };
    // When either direction ends, both halves of both sockets are dropped: the connection is gone.
    tokio::select! { () = up => {}, () = down => {} }
}

/// A scale-out registry whose database connections pass through a [`CommitCutter`].
async fn registry_behind_a_cutter() -> Option<(TestRegistry, CommitCutter)> {
    let dir = tempfile::tempdir().unwrap();
    let mut config = scale_out_config(dir.path()).await?;
    // postgres://user@host:port/database
    let url = config.metadata_url.clone();
    let (scheme_user, rest) = url.split_once('@').unwrap();
    let (host_port, database) = rest.split_once('/').unwrap();
    let cutter = CommitCutter::start(host_port.parse().unwrap()).await;
    config.metadata_url = format!("{scheme_user}@{}/{database}", cutter.addr);
    Some((TestRegistry::start_with(config, dir).await, cutter))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_commit_reply_never_leaves_a_blob_row_without_bytes() {
    let Some((reg, cutter)) = registry_behind_a_cutter().await else {
        eprintln!("skipping: the scale-out deployment is not configured");
        return;
    };
    // A session of two chunks: completing it composes a new object, which a revert would delete.
    let data = random_bytes(600, 300_000);
    let digest = Digest::sha256_of(&data);
    let loc = reg.start_upload("cut/chunked").await;
    let res = reg.patch_chunk(&loc, &data, 0, 100_000).await;
    let loc = header(&res, "location").unwrap().to_string();
    let res = reg.patch_chunk(&loc, &data, 100_000, 300_000).await;
    let loc = header(&res, "location").unwrap().to_string();
    cutter.arm();
    let res = reg.req(Method::PUT, &format!("{loc}?digest={digest}")).send().await.unwrap();
    assert!(cutter.fired(), "the completion's COMMIT went through the cutter");
    let status = res.status();
    // The commit happened, so the blob must read back whole whatever the answer was; and since
    // the registry checks, the answer says it was created.
    let res = reg.get(&format!("/v2/cut/chunked/blobs/{digest}")).await;
    assert_eq!(res.status(), 200, "a row names the blob, so its bytes must be there");
    assert_eq!(res.bytes().await.unwrap(), data);
    assert_eq!(status, StatusCode::CREATED, "the blob was recorded; the answer should say so");

    // The same for a blob pushed in one request.
    let data = random_bytes(601, 70_000);
    let digest = Digest::sha256_of(&data);
    cutter.arm();
    let res = reg
        .req(Method::POST, &format!("/v2/cut/whole/blobs/uploads/?digest={digest}"))
        .body(data.clone())
        .send()
        .await
        .unwrap();
    assert!(cutter.fired());
    let status = res.status();
    let res = reg.get(&format!("/v2/cut/whole/blobs/{digest}")).await;
    assert_eq!(res.status(), 200, "a row names the blob, so its bytes must be there");
    assert_eq!(res.bytes().await.unwrap(), data);
    assert_eq!(status, StatusCode::CREATED);
}

// A delete whose database connection dies between its statements — after the tags were
// removed, before the manifest became a tombstone — leaves everything as it was.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delete_cut_off_midway_changes_nothing() {
    let Some((reg, cutter)) = registry_behind_a_cutter().await else {
        eprintln!("skipping: the scale-out deployment is not configured");
        return;
    };
    let img = reg.push_image("cut/delete", "v1", 610).await;
    reg.put_manifest("cut/delete", "v2", OCI_MANIFEST, &img.manifest).await;
    let repo = berth::oci::RepoName::parse("cut/delete").unwrap();
    let history_before = reg.app.registry.meta().history(&repo, None).await.unwrap();
    cutter.arm_on(b"UPDATE manifests SET deleted_at");
    let res =
        reg.req(Method::DELETE, &format!("/v2/cut/delete/manifests/{}", img.digest)).send().await.unwrap();
    assert!(cutter.fired(), "the delete's tombstone statement went through the cutter");
    assert_eq!(res.status(), 500);
    for tag in ["v1", "v2"] {
        let res = reg.get(&format!("/v2/cut/delete/manifests/{tag}")).await;
        assert_eq!(res.status(), 200, "{tag} still there");
    }
    assert_eq!(reg.get(&format!("/v2/cut/delete/manifests/{}", img.digest)).await.status(), 200);
    let tags: serde_json::Value = reg.get("/v2/cut/delete/tags/list").await.json().await.unwrap();
    assert_eq!(tags["tags"], serde_json::json!(["v1", "v2"]));
    let history_after = reg.app.registry.meta().history(&repo, None).await.unwrap();
    assert_eq!(history_after, history_before, "no delete was recorded");
    // And the same delete, not cut off, goes through.
    let res =
        reg.req(Method::DELETE, &format!("/v2/cut/delete/manifests/{}", img.digest)).send().await.unwrap();
    assert_eq!(res.status(), 202);
}

/// A scale-out registry whose requests to the S3 server pass through a [`CommitCutter`]; its
/// request bodies are unsigned (the harness's default), so parts of announced writes stream.
async fn registry_with_s3_behind_a_cutter() -> Option<(TestRegistry, CommitCutter)> {
    let dir = tempfile::tempdir().unwrap();
    let mut config = scale_out_config(dir.path()).await?;
    let s3 = config.storage_s3.as_mut().unwrap();
    assert_eq!(s3.sign_payload, Some(false), "parts of announced writes are streamed");
    let endpoint = s3.endpoint.clone().unwrap();
    let cutter = CommitCutter::start(endpoint.trim_start_matches("http://").parse().unwrap()).await;
    s3.endpoint = Some(format!("http://{}", cutter.addr));
    Some((TestRegistry::start_with(config, dir).await, cutter))
}

// A part streamed from the client's request to the store whose connection breaks before the
// store answers — as when an object store answers 503 under load or drops the connection — is
// sent again from the pieces kept for it: the push succeeds and the blob is byte-exact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_streamed_part_the_store_drops_is_sent_again() {
    let Some((reg, cutter)) = registry_with_s3_behind_a_cutter().await else {
        eprintln!("skipping: the scale-out deployment is not configured");
        return;
    };
    // Streamed parts go to presigned URLs, signed in the query string; object_store's own
    // requests carry their signature in a header.
    cutter.arm_on(b"X-Amz-Signature=");
    let data = random_bytes(620, 12 * 1024 * 1024 + 9);
    let digest = reg.upload_blob("cut/part", &data).await;
    assert!(cutter.fired(), "a streamed part went through the cutter");
    assert_eq!(reg.get(&format!("/v2/cut/part/blobs/{digest}")).await.bytes().await.unwrap(), data);
    assert_eq!(parts_resent(&reg).await, Some(1.0));
    let objects = reg.app.registry.blobs().list("blobs/").await.unwrap();
    assert_eq!(objects, vec![reg.storage_key(&digest).await], "one object: the multipart upload's");
}

// A store that answers a streamed part before reading it whole (Garage answers 503 so when its
// metadata database is busy) and then holds the connection without reading on: the part is
// sent again instead of the write waiting forever for the store to take the rest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_streamed_part_the_store_answers_early_is_sent_again() {
    let Some((reg, cutter)) = registry_with_s3_behind_a_cutter().await else {
        eprintln!("skipping: the scale-out deployment is not configured");
        return;
    };
    cutter.answer_early_on(
        b"X-Amz-Signature=",
        b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/xml\r\ncontent-length: 0\r\n\r\n",
    );
    let data = random_bytes(621, 12 * 1024 * 1024 + 9);
    let pushed =
        tokio::time::timeout(std::time::Duration::from_secs(30), reg.upload_blob("cut/early", &data));
    let digest = pushed.await.expect("the push finished instead of waiting on the held connection");
    assert!(cutter.fired(), "a streamed part was answered early");
    assert_eq!(reg.get(&format!("/v2/cut/early/blobs/{digest}")).await.bytes().await.unwrap(), data);
    assert_eq!(parts_resent(&reg).await, Some(1.0));
}

/// `berth_storage_parts_resent_total` as `/metrics` reports it.
async fn parts_resent(reg: &TestRegistry) -> Option<f64> {
    let text = reg.get("/metrics").await.text().await.unwrap();
    crate::metrics::sample(&text, "berth_storage_parts_resent_total", &[])
}
