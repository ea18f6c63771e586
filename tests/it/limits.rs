//! Hostile clients: slow request heads, oversized heads, bodies that stall or lie about their
//! length, and clients over their request rate.

use std::time::{Duration, Instant};

use berth::oci::Digest;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::backend_test;
use crate::harness::*;

/// Restarts `reg` (same metadata and storage) with short limits.
async fn with_limits(reg: TestRegistry, edit: impl FnOnce(&mut berth::config::Limits)) -> TestRegistry {
    let mut config = reg.app.config.clone();
    let dir = reg.stop().await;
    config.limits.header_read_timeout_secs = 1;
    config.limits.body_idle_timeout_secs = 1;
    edit(&mut config.limits);
    let mut reg = TestRegistry::start_with(config, dir).await;
    // The 1 s header timeout also closes idle keep-alive connections; a pooled one could be
    // reused just as the server closes it.
    reg.client = reqwest::Client::builder().pool_max_idle_per_host(0).build().unwrap();
    reg
}

/// Sends `request` on a new connection and returns everything the server answers until it
/// closes (at most 5 s). The server may hang up before all of `request` is sent.
async fn exchange(reg: &TestRegistry, request: &str) -> String {
    let mut stream = TcpStream::connect(reg.addr).await.unwrap();
    let _ = stream.write_all(request.as_bytes()).await;
    read_all(&mut stream, Duration::from_secs(5)).await
}

/// Everything the server sends until it closes the connection (bounded by `limit`).
async fn read_all(stream: &mut TcpStream, limit: Duration) -> String {
    let mut out = Vec::new();
    let _ = tokio::time::timeout(limit, stream.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).to_string()
}

backend_test!(slow_request_heads_are_cut_off, |reg| {
    let reg = with_limits(reg, |_| {}).await;
    let mut stream = TcpStream::connect(reg.addr).await.unwrap();
    let started = Instant::now();
    stream.write_all(b"GET /v2/ HTTP/1.1\r\nHost: x\r\n").await.unwrap();
    // The head never completes: the server hangs up after its header timeout.
    let answer = read_all(&mut stream, Duration::from_secs(10)).await;
    assert!(started.elapsed() < Duration::from_secs(5), "held for {:?}", started.elapsed());
    assert!(!answer.contains("200 OK"), "{answer}");
    // Normal clients are unaffected.
    assert_eq!(reg.get("/v2/").await.status(), 200);

    // An idle keep-alive connection is closed after the same time.
    let mut stream = TcpStream::connect(reg.addr).await.unwrap();
    stream.write_all(b"GET /v2/ HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
    let started = Instant::now();
    let answer = read_all(&mut stream, Duration::from_secs(10)).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(started.elapsed() < Duration::from_secs(5), "idle connection held for {:?}", started.elapsed());
});

backend_test!(oversized_request_heads_get_431, |reg| {
    let reg = with_limits(reg, |l| l.max_header_bytes = 16 * 1024).await;
    let head_with = |header: &str, len: usize| {
        format!("GET /v2/ HTTP/1.1\r\nHost: x\r\n{header}: {}\r\nConnection: close\r\n\r\n", "a".repeat(len))
    };
    let answer = exchange(&reg, &head_with("X-Big", 64 * 1024)).await;
    assert!(answer.starts_with("HTTP/1.1 431"), "{}", &answer[..answer.len().min(200)]);
    assert!(answer.contains(r#""errors":[{"code":"UNSUPPORTED""#), "{answer}");
    assert!(answer.contains("exceed 16384 bytes"), "{answer}");

    // A head larger than the server's whole read buffer is refused by the HTTP parser itself.
    let answer = exchange(&reg, &head_with("X-Big", 2 << 20)).await;
    assert!(answer.starts_with("HTTP/1.1 431"), "{}", &answer[..answer.len().min(200)]);

    // Heads within the limit pass.
    let answer = exchange(&reg, &head_with("X-Fine", 8 * 1024)).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{}", &answer[..answer.len().min(200)]);
});

backend_test!(bodies_that_stall_or_lie_record_nothing, |reg| {
    let reg = with_limits(reg, |_| {}).await;
    let data = b"only ten b";
    let digest = Digest::sha256_of(data);
    // Content-Length promises 1000 bytes; ten arrive, then nothing.
    let mut stream = TcpStream::connect(reg.addr).await.unwrap();
    let head = format!(
        "POST /v2/liar/blobs/uploads/?digest={digest} HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n"
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    stream.write_all(data).await.unwrap();
    let started = Instant::now();
    let answer = read_all(&mut stream, Duration::from_secs(10)).await;
    assert!(started.elapsed() < Duration::from_secs(5), "held for {:?}", started.elapsed());
    assert!(!answer.contains("201"), "{answer}");
    assert_eq!(reg.get(&format!("/v2/liar/blobs/{digest}")).await.status(), 404);
    // Nothing of the aborted upload is left in storage.
    let objects = reg.app.registry.blobs().list("").await.unwrap();
    assert!(objects.is_empty(), "{objects:?}");

    // A Content-Length smaller than the body: exactly the declared bytes are the blob, and the
    // rest is a malformed next request that the server refuses.
    let declared = b"12345";
    let digest = Digest::sha256_of(declared);
    let request = format!(
        "POST /v2/short/blobs/uploads/?digest={digest} HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\n12345EXTRA BYTES\r\n\r\n"
    );
    let answer = exchange(&reg, &request).await;
    assert!(answer.starts_with("HTTP/1.1 201"), "{answer}");
    assert!(answer.contains("HTTP/1.1 400"), "the excess is refused: {answer}");
    let stored = reg.get(&format!("/v2/short/blobs/{digest}")).await.bytes().await.unwrap();
    assert_eq!(stored.as_ref(), declared);

    // A chunk that stalls midway is not recorded either: the session stays where it was.
    let res = reg.req(reqwest::Method::POST, "/v2/liar/blobs/uploads/").send().await.unwrap();
    let loc = header(&res, "location").unwrap().to_string();
    let mut stream = TcpStream::connect(reg.addr).await.unwrap();
    let head =
        format!("PATCH {loc} HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\nContent-Range: 0-99\r\n\r\n");
    stream.write_all(head.as_bytes()).await.unwrap();
    stream.write_all(&[7u8; 40]).await.unwrap();
    let _ = read_all(&mut stream, Duration::from_secs(10)).await;
    let status = reg.get(&loc).await;
    assert_eq!(header(&status, "range"), Some("0-0"));
});

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_over_their_rate_get_429() {
    let reg = TestRegistry::try_start(Backend::Sqlite).await.unwrap();
    let reg = with_limits(reg, |l| {
        l.requests_per_second = 2;
        l.burst = 3;
    })
    .await;
    let mut statuses = Vec::new();
    for _ in 0..10 {
        statuses.push(reg.get("/v2/").await);
    }
    let limited: Vec<_> = statuses.into_iter().filter(|r| r.status() == 429).collect();
    assert!(limited.len() >= 5, "{} of 10 limited", limited.len());
    let first = limited.into_iter().next().unwrap();
    assert!(header(&first, "retry-after").is_some_and(|v| v.parse::<u64>().is_ok()));
    assert_oci_error(first, 429, "TOOMANYREQUESTS").await;
    // Health checks are never limited.
    for _ in 0..5 {
        assert_eq!(reg.get("/healthz").await.status(), 200);
    }
}
