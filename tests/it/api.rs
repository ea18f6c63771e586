//! The base endpoint, health, routing, methods and name validation.

use reqwest::Method;

use crate::backend_test;
use crate::harness::*;

backend_test!(base_and_health, |reg| {
    let res = reg.get("/v2/").await;
    assert_eq!(res.status(), 200);
    assert_eq!(header(&res, "docker-distribution-api-version"), Some("registry/2.0"));
    assert_eq!(reg.get("/v2").await.status(), 200);
    let res = reg.get("/healthz").await;
    assert_eq!(res.status(), 200);
    assert_eq!(res.json::<serde_json::Value>().await.unwrap()["status"], "ok");
});

backend_test!(invalid_names_and_path_tricks_are_400_and_touch_nothing, |reg| {
    // Sent raw: an HTTP client library would normalise some of these before sending.
    for path in [
        "/v2/UPPER/tags/list",
        "/v2/a%2Fb/tags/list",
        "/v2/a/%2e%2e/b/tags/list",
        "/v2/a/../b/tags/list",
        "/v2/a//b/tags/list",
        "/v2/a/./b/tags/list",
        "/v2/a/.../b/tags/list",
        "/v2/caf%C3%A9/tags/list",
        "/v2/a%00b/tags/list",
        "/v2/-a/blobs/uploads/",
    ] {
        let (status, body) =
            raw_request(reg.addr, &format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"))
                .await;
        assert_eq!(status, 400, "{path}: {body}");
        assert!(body.contains("\"NAME_INVALID\""), "{path}: {body}");
    }
    let long = "a".repeat(256);
    assert_oci_error(reg.get(&format!("/v2/{long}/tags/list")).await, 400, "NAME_INVALID").await;
    let res = reg.req(Method::POST, "/v2/Bad/blobs/uploads/").send().await.unwrap();
    assert_oci_error(res, 400, "NAME_INVALID").await;
    // Nothing was created.
    let res = reg.get("/v2/_catalog").await;
    assert_eq!(res.json::<serde_json::Value>().await.unwrap()["repositories"], serde_json::json!([]));
});

backend_test!(unknown_endpoints_and_methods, |reg| {
    assert_eq!(reg.get("/v2/a/unknown/thing").await.status(), 404);
    assert_eq!(reg.get("/nothing").await.status(), 404);
    // A 405 names what the endpoint allows, as HTTP requires.
    let res = reg.req(Method::POST, "/v2/a/tags/list").send().await.unwrap();
    assert_eq!(header(&res, "allow"), Some("GET"));
    assert_oci_error(res, 405, "UNSUPPORTED").await;
    let res = reg.req(Method::PATCH, "/v2/a/manifests/v1").send().await.unwrap();
    assert_eq!(header(&res, "allow"), Some("GET, HEAD, PUT, DELETE"));
    assert_oci_error(res, 405, "UNSUPPORTED").await;
    let res = reg.req(Method::POST, "/v2/a/blobs/sha256:00").send().await.unwrap();
    assert_eq!(header(&res, "allow"), Some("GET, HEAD, DELETE"));
});

backend_test!(graceful_shutdown_finishes_in_flight_uploads, |reg| {
    // A slow streamed upload is in flight when shutdown starts; it still completes.
    let data = random_bytes(41, 2 * 1024 * 1024);
    let digest = berth::oci::Digest::sha256_of(&data);
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Vec<u8>, std::io::Error>>(4);
    let url = reg.url(&format!("/v2/slow/blobs/uploads/?digest={digest}"));
    let client = reg.client.clone();
    let upload = tokio::spawn(async move {
        let body = reqwest::Body::wrap_stream(tokio_stream_from(rx));
        client.post(url).body(body).send().await.map(|r| r.status())
    });
    tx.send(Ok(data[..1024 * 1024].to_vec())).await.unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    let config = reg.app.config.clone();
    let stop = tokio::spawn(reg.stop());
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    tx.send(Ok(data[1024 * 1024..].to_vec())).await.unwrap();
    drop(tx);
    assert_eq!(upload.await.unwrap().unwrap(), 201);
    let _dir = stop.await.unwrap();
    let app = berth::app::App::open(&config).await.unwrap();
    let blob = app.registry.blob(&berth::oci::RepoName::parse("slow").unwrap(), &digest, false).await;
    assert_eq!(blob.map(|b| b.size).ok(), Some(data.len() as u64));
});

fn tokio_stream_from(
    mut rx: tokio::sync::mpsc::Receiver<Result<Vec<u8>, std::io::Error>>,
) -> impl futures_util::Stream<Item = Result<Vec<u8>, std::io::Error>> {
    futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

/// Sends `request` as raw bytes and returns the status and body text.
pub async fn raw_request(addr: std::net::SocketAddr, request: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    stream.read_to_end(&mut out).await.unwrap();
    let text = String::from_utf8_lossy(&out).to_string();
    let status = text.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    let body = text.split("\r\n\r\n").nth(1).unwrap_or("").to_string();
    (status, body)
}
