//! Blob reads, every upload flow, and mounts.

use berth::oci::Digest;
use reqwest::{Method, StatusCode};

use crate::backend_test;
use crate::harness::{assert_oci_error, header, random_bytes};

backend_test!(monolithic_post_then_get_head_and_ranges, |reg| {
    let data = random_bytes(1, 10_000);
    let d = reg.upload_blob("lib/a", &data).await;

    let res = reg.get(&format!("/v2/lib/a/blobs/{d}")).await;
    assert_eq!(res.status(), 200);
    assert_eq!(header(&res, "docker-content-digest"), Some(d.as_str()));
    assert_eq!(header(&res, "content-length"), Some("10000"));
    assert_eq!(header(&res, "etag"), Some(format!("\"{d}\"").as_str()));
    assert_eq!(res.bytes().await.unwrap(), data);

    let res = reg.req(Method::HEAD, &format!("/v2/lib/a/blobs/{d}")).send().await.unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(header(&res, "content-length"), Some("10000"));
    assert_eq!(header(&res, "docker-content-digest"), Some(d.as_str()));

    let ranged =
        |r: &'static str| reg.req(Method::GET, &format!("/v2/lib/a/blobs/{d}")).header("range", r).send();
    let res = ranged("bytes=100-199").await.unwrap();
    assert_eq!(res.status(), StatusCode::PARTIAL_CONTENT);
    assert_eq!(header(&res, "content-range"), Some("bytes 100-199/10000"));
    assert_eq!(res.bytes().await.unwrap(), data[100..200]);
    let res = ranged("bytes=9990-").await.unwrap();
    assert_eq!(res.bytes().await.unwrap(), data[9990..]);
    let res = ranged("bytes=-5").await.unwrap();
    assert_eq!(res.bytes().await.unwrap(), data[9995..]);
    let res = ranged("bytes=10000-20000").await.unwrap();
    assert_eq!(res.status(), StatusCode::RANGE_NOT_SATISFIABLE);
    assert_eq!(header(&res, "content-range"), Some("bytes */10000"));
    // A malformed Range is ignored (RFC 9110): the whole blob.
    let res = ranged("bytes=oops").await.unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(res.bytes().await.unwrap().len(), 10_000);
});

// Chunks of a few MiB that end inside disk blocks (written past the page cache on the
// filesystem), and a chunk whose client disconnects halfway: the blob holds exactly the bytes
// sent in the chunks that were accepted.
backend_test!(large_uneven_chunks_and_a_cut_off_chunk_keep_every_byte, |reg| {
    use tokio::io::AsyncWriteExt;
    let data = random_bytes(9, (9 << 20) + 12_345);
    let d = Digest::sha256_of(&data);
    let loc = reg.start_upload("big/chunks").await;
    let res = reg.patch_chunk(&loc, &data, 0, 1_500_003).await;
    assert_eq!(res.status(), StatusCode::ACCEPTED);

    // The next chunk's client sends half of it (junk) and disconnects.
    let mut stream = tokio::net::TcpStream::connect(reg.addr).await.unwrap();
    let head = format!(
        "PATCH {loc} HTTP/1.1\r\nHost: x\r\nContent-Type: application/octet-stream\r\n\
         Content-Range: 1500003-5694306\r\nContent-Length: 4194304\r\n\r\n"
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    stream.write_all(&vec![0xAB; 2 << 20]).await.unwrap();
    drop(stream);
    // Usually the server has taken the cut-off chunk's lock by now; either way, a chunk that
    // failed records nothing and the next one starts where the upload ends.
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;

    // The same range again, properly, then the rest with the PUT.
    let res = reg.patch_chunk(&loc, &data, 1_500_003, 5_694_307).await;
    assert_eq!(res.status(), StatusCode::ACCEPTED);
    assert_eq!(header(&res, "range"), Some("0-5694306"));
    let res = reg
        .req(Method::PUT, &format!("{loc}?digest={d}"))
        .header("content-range", format!("5694307-{}", data.len() - 1))
        .body(data[5_694_307..].to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::CREATED);
    let res = reg.get(&format!("/v2/big/chunks/blobs/{d}")).await;
    assert_eq!(res.status(), 200);
    assert!(res.bytes().await.unwrap() == data, "stored bytes differ from the bytes sent");
});

backend_test!(blob_is_visible_only_where_linked, |reg| {
    let d = reg.upload_blob("team/one", b"secret layer").await;
    let res = reg.get(&format!("/v2/team/two/blobs/{d}")).await;
    assert_oci_error(res, 404, "BLOB_UNKNOWN").await;
    let res = reg.req(Method::HEAD, &format!("/v2/team/two/blobs/{d}")).send().await.unwrap();
    assert_eq!(res.status(), 404);
    let unknown = Digest::sha256_of(b"never uploaded");
    assert_oci_error(reg.get(&format!("/v2/team/one/blobs/{unknown}")).await, 404, "BLOB_UNKNOWN").await;
});

backend_test!(post_then_put_with_body, |reg| {
    let data = random_bytes(2, 4096);
    let d = Digest::sha256_of(&data);
    let res = reg.req(Method::POST, "/v2/x/blobs/uploads/").send().await.unwrap();
    assert_eq!(res.status(), StatusCode::ACCEPTED);
    let loc = header(&res, "location").unwrap().to_string();
    assert!(loc.starts_with("/v2/x/blobs/uploads/"), "{loc}");
    assert_eq!(header(&res, "range"), Some("0-0"));
    assert!(header(&res, "docker-upload-uuid").is_some());
    let res = reg.req(Method::PUT, &format!("{loc}?digest={d}")).body(data.clone()).send().await.unwrap();
    assert_eq!(res.status(), StatusCode::CREATED);
    assert_eq!(header(&res, "location"), Some(format!("/v2/x/blobs/{d}").as_str()));
    assert_eq!(header(&res, "docker-content-digest"), Some(d.as_str()));
    assert_eq!(reg.get(&format!("/v2/x/blobs/{d}")).await.bytes().await.unwrap(), data);
    // The session is gone once completed.
    assert_oci_error(reg.get(&loc).await, 404, "BLOB_UPLOAD_UNKNOWN").await;
});

backend_test!(streamed_patch_then_put_without_body, |reg| {
    let data = random_bytes(3, 300_000);
    let d = Digest::sha256_of(&data);
    let res = reg.req(Method::POST, "/v2/x/blobs/uploads/").send().await.unwrap();
    let loc = header(&res, "location").unwrap().to_string();
    let res = reg.req(Method::PATCH, &loc).body(data.clone()).send().await.unwrap();
    assert_eq!(res.status(), StatusCode::ACCEPTED);
    assert_eq!(header(&res, "range"), Some("0-299999"));
    let loc = header(&res, "location").unwrap().to_string();
    let res = reg.get(&loc).await;
    assert_eq!(res.status(), StatusCode::NO_CONTENT);
    assert_eq!(header(&res, "range"), Some("0-299999"));
    assert_eq!(header(&res, "location"), Some(loc.as_str()));
    let res = reg.req(Method::PUT, &format!("{loc}?digest={d}")).send().await.unwrap();
    assert_eq!(res.status(), StatusCode::CREATED);
    assert_eq!(reg.get(&format!("/v2/x/blobs/{d}")).await.bytes().await.unwrap(), data);
});

backend_test!(chunked_patch_in_order_out_of_order_and_wrong_length, |reg| {
    let data = random_bytes(4, 30_000);
    let d = Digest::sha256_of(&data);
    let loc = reg.start_upload("x").await;
    let chunk = |start: usize, end: usize| reg.patch_chunk(&loc, &data, start, end);
    let res = chunk(0, 10_000).await;
    assert_eq!(res.status(), StatusCode::ACCEPTED);
    assert_eq!(header(&res, "range"), Some("0-9999"));
    // A repeated (stale) chunk and a gap are both out of order: 416 with the current range.
    for (s, e) in [(0, 10_000), (15_000, 20_000)] {
        let res = chunk(s, e).await;
        assert_eq!(res.status(), StatusCode::RANGE_NOT_SATISFIABLE);
        assert_eq!(header(&res, "range"), Some("0-9999"));
        assert_oci_error(res, 416, "BLOB_UPLOAD_INVALID").await;
    }
    // A chunk whose body is shorter than its Content-Range records nothing.
    let res = reg
        .req(Method::PATCH, &loc)
        .header("content-range", "10000-19999")
        .body(data[10_000..15_000].to_vec())
        .send()
        .await
        .unwrap();
    assert_oci_error(res, 400, "SIZE_INVALID").await;
    assert_eq!(header(&reg.get(&loc).await, "range"), Some("0-9999"));
    // Malformed Content-Range.
    let res = reg.req(Method::PATCH, &loc).header("content-range", "x-y").body("z").send().await.unwrap();
    assert_oci_error(res, 400, "BLOB_UPLOAD_INVALID").await;

    assert_eq!(chunk(10_000, 20_000).await.status(), StatusCode::ACCEPTED);
    // A final chunk on the PUT is held to the same rule.
    let res = reg
        .req(Method::PUT, &format!("{loc}?digest={d}"))
        .header("content-range", "25000-29999")
        .body(data[25_000..].to_vec())
        .send()
        .await
        .unwrap();
    assert_oci_error(res, 416, "BLOB_UPLOAD_INVALID").await;
    // The last chunk comes with the PUT.
    let res = reg
        .req(Method::PUT, &format!("{loc}?digest={d}"))
        .header("content-range", "20000-29999")
        .body(data[20_000..].to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::CREATED);
    assert_eq!(reg.get(&format!("/v2/x/blobs/{d}")).await.bytes().await.unwrap(), data);
});

backend_test!(wrong_digest_changes_nothing_and_session_can_still_complete, |reg| {
    let data = b"some bytes".to_vec();
    let res = reg.req(Method::POST, "/v2/x/blobs/uploads/").send().await.unwrap();
    let loc = header(&res, "location").unwrap().to_string();
    reg.req(Method::PATCH, &loc).body(data.clone()).send().await.unwrap();
    let wrong = Digest::sha256_of(b"other");
    let res = reg.req(Method::PUT, &format!("{loc}?digest={wrong}")).body("tail").send().await.unwrap();
    assert_oci_error(res, 400, "DIGEST_INVALID").await;
    assert_oci_error(reg.get(&format!("/v2/x/blobs/{wrong}")).await, 404, "BLOB_UNKNOWN").await;
    assert_eq!(header(&reg.get(&loc).await, "range"), Some("0-9"));
    let res = reg.req(Method::PUT, &format!("{loc}?digest=sha256:nothex")).send().await.unwrap();
    assert_oci_error(res, 400, "DIGEST_INVALID").await;
    let res = reg.req(Method::PUT, &loc).send().await.unwrap();
    assert_oci_error(res, 400, "DIGEST_INVALID").await;
    let good = Digest::sha256_of(&data);
    let res = reg.req(Method::PUT, &format!("{loc}?digest={good}")).send().await.unwrap();
    assert_eq!(res.status(), 201);

    // Monolithic with a wrong digest stores nothing.
    let res = reg
        .req(Method::POST, &format!("/v2/x/blobs/uploads/?digest={wrong}"))
        .body("abc")
        .send()
        .await
        .unwrap();
    assert_oci_error(res, 400, "DIGEST_INVALID").await;
    assert_eq!(reg.get(&format!("/v2/x/blobs/{wrong}")).await.status(), 404);
});

backend_test!(sha512_digests_are_accepted, |reg| {
    use sha2::Digest as _;
    let data = random_bytes(9, 5000);
    let d = format!("sha512:{}", hex::encode(sha2::Sha512::digest(&data)));
    let res = reg
        .req(Method::POST, &format!("/v2/x/blobs/uploads/?digest={d}"))
        .body(data.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 201, "{:?}", res.text().await);
    let res = reg.get(&format!("/v2/x/blobs/{d}")).await;
    assert_eq!(header(&res, "docker-content-digest"), Some(d.as_str()));
    assert_eq!(res.bytes().await.unwrap(), data);
});

backend_test!(cancel_and_unknown_sessions, |reg| {
    let res = reg.req(Method::POST, "/v2/x/blobs/uploads/").send().await.unwrap();
    let loc = header(&res, "location").unwrap().to_string();
    let cancelled = header(&res, "docker-upload-uuid").unwrap().to_string();
    reg.req(Method::PATCH, &loc).body("partial").send().await.unwrap();
    let res = reg.req(Method::DELETE, &loc).send().await.unwrap();
    assert_eq!(res.status(), StatusCode::NO_CONTENT);
    assert_oci_error(reg.get(&loc).await, 404, "BLOB_UPLOAD_UNKNOWN").await;
    let res = reg.req(Method::PATCH, &loc).body("more").send().await.unwrap();
    assert_oci_error(res, 404, "BLOB_UPLOAD_UNKNOWN").await;
    let res = reg.req(Method::DELETE, &loc).send().await.unwrap();
    assert_oci_error(res, 404, "BLOB_UPLOAD_UNKNOWN").await;
    // A session belongs to the repository it was started in.
    let res = reg.req(Method::POST, "/v2/x/blobs/uploads/").send().await.unwrap();
    let id = header(&res, "docker-upload-uuid").unwrap().to_string();
    assert_oci_error(reg.get(&format!("/v2/y/blobs/uploads/{id}")).await, 404, "BLOB_UPLOAD_UNKNOWN").await;
    // No upload objects are left behind by cancelled sessions.
    // Nothing of the cancelled session is left in storage.
    let objects = reg.app.registry.blobs().list("").await.unwrap();
    assert!(objects.iter().all(|k| !k.contains(&cancelled)), "{objects:?}");
});

backend_test!(mount_from_another_repository, |reg| {
    let d = reg.upload_blob("src/repo", b"shared layer").await;
    for from in ["src/repo", "src%2Frepo"] {
        let res = reg
            .req(Method::POST, &format!("/v2/dst{}/blobs/uploads/?mount={d}&from={from}", from.len()))
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), StatusCode::CREATED, "from={from}");
        assert_eq!(header(&res, "location"), Some(format!("/v2/dst{}/blobs/{d}", from.len()).as_str()));
        assert_eq!(header(&res, "docker-content-digest"), Some(d.as_str()));
        let got = reg.get(&format!("/v2/dst{}/blobs/{d}", from.len())).await;
        assert_eq!(got.bytes().await.unwrap().as_ref(), b"shared layer");
    }
    // Not in the source: a normal session instead.
    let missing = Digest::sha256_of(b"nope");
    let res = reg
        .req(Method::POST, &format!("/v2/dst/blobs/uploads/?mount={missing}&from=src/repo"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::ACCEPTED);
    assert!(header(&res, "location").unwrap().starts_with("/v2/dst/blobs/uploads/"));
    // Without `from`: also a session.
    let res = reg.req(Method::POST, &format!("/v2/dst/blobs/uploads/?mount={d}")).send().await.unwrap();
    assert_eq!(res.status(), StatusCode::ACCEPTED);
});

backend_test!(same_blob_uploaded_twice_and_concurrently_is_stored_once, |reg| {
    let data = random_bytes(5, 100_000);
    let mut tasks = Vec::new();
    for i in 0..6 {
        let url = reg.url(&format!("/v2/c{i}/blobs/uploads/?digest={}", Digest::sha256_of(&data)));
        let client = reg.client.clone();
        let body = data.clone();
        tasks.push(tokio::spawn(async move { client.post(url).body(body).send().await.unwrap().status() }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap(), 201);
    }
    let d = Digest::sha256_of(&data);
    for i in 0..6 {
        assert_eq!(reg.get(&format!("/v2/c{i}/blobs/{d}")).await.bytes().await.unwrap(), data);
    }
    let copies = reg.app.registry.blobs().list("blobs/").await.unwrap();
    assert_eq!(copies.len(), 1, "redundant copies are removed: {copies:?}");
});

backend_test!(empty_blob, |reg| {
    let d = reg.upload_blob("x", b"").await;
    let res = reg.get(&format!("/v2/x/blobs/{d}")).await;
    assert_eq!(res.status(), 200);
    assert_eq!(header(&res, "content-length"), Some("0"));
});

backend_test!(abandoned_sessions_expire_with_their_bytes, |reg| {
    let reg = &reg;
    let start = |body: &'static str| async move {
        let res = reg.req(Method::POST, "/v2/x/blobs/uploads/").send().await.unwrap();
        let loc = header(&res, "location").unwrap().to_string();
        let id = header(&res, "docker-upload-uuid").unwrap().to_string();
        reg.req(Method::PATCH, &loc).body(body).send().await.unwrap();
        (loc, id)
    };
    let (old_loc, old_id) = start("abandoned bytes").await;
    // Idle for longer than `uploads.expire_after_secs` (a day by default).
    reg.app.registry.clock().advance_ms(25 * 3600 * 1000);
    let (new_loc, new_id) = start("fresh bytes").await;
    let pass = reg.app.registry.collect(100).await.unwrap();
    assert_eq!(pass.uploads_expired, 1);
    assert_eq!(pass.objects_failed, 0);
    assert_oci_error(reg.get(&old_loc).await, 404, "BLOB_UPLOAD_UNKNOWN").await;
    assert_eq!(reg.get(&new_loc).await.status(), 204);
    let objects = reg.app.registry.blobs().list("").await.unwrap();
    assert!(objects.iter().all(|k| !k.contains(&old_id)), "{objects:?}");
    assert!(objects.iter().any(|k| k.contains(&new_id)), "{objects:?}");
    assert_eq!(reg.app.registry.collect(100).await.unwrap().uploads_expired, 0);
});

// A blob whose bytes vanish between the lookup and the read: a 404 when metadata moved on
// meanwhile (here a purge, which removes the row and then the bytes), but a 500 — a consistency
// failure, never silently masked — when a row still names the missing bytes.
backend_test!(bytes_gone_between_lookup_and_read, |reg| {
    let data = random_bytes(90, 4000);
    let digest = reg.upload_blob("gone/app", &data).await;
    let repo = berth::oci::RepoName::parse("gone/app").unwrap();
    let handle = reg.app.registry.blob(&repo, &digest, false).await.unwrap();
    reg.app.registry.purge_blob(&digest, "test", None).await.unwrap();
    let err = reg.app.registry.read_blob(&handle, None).await.err().expect("the bytes are gone");
    assert!(matches!(err, berth::registry::Error::BlobUnknown), "{err}");

    let data = random_bytes(91, 4000);
    let digest = reg.upload_blob("gone/app", &data).await;
    let key = reg.storage_key(&digest).await;
    reg.app.registry.blobs().delete(&key).await.unwrap();
    assert_eq!(reg.get(&format!("/v2/gone/app/blobs/{digest}")).await.status(), 500);
});

// Idleness counts from the last byte: a single write that streams for longer than the expiry
// keeps its session alive while bytes arrive, and the collector leaves it alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_write_keeps_its_session_alive() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = berth::config::Config::embedded(dir.path());
    config.storage_fsync = false;
    config.gc.enabled = false;
    config.upload_expire_after_secs = 2;
    let reg = crate::harness::TestRegistry::start_with(config, dir).await;
    let loc = reg.start_upload("slow/writer").await;
    let collector = {
        let registry = reg.app.registry.clone();
        tokio::spawn(async move {
            let mut expired = 0;
            for _ in 0..40 {
                expired += registry.collect(100).await.unwrap().uploads_expired;
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
            expired
        })
    };
    // Five pieces 0.8 s apart: 3.2 s in all, longer than the 2 s expiry.
    let piece = random_bytes(1400, 1000);
    let pieces = futures_util::stream::unfold(0, move |i| {
        let piece = piece.clone();
        async move {
            if i == 5 {
                return None;
            }
            if i > 0 {
                tokio::time::sleep(std::time::Duration::from_millis(800)).await;
            }
            Some((Ok::<_, std::io::Error>(piece), i + 1))
        }
    });
    let res = reg.req(Method::PATCH, &loc).body(reqwest::Body::wrap_stream(pieces)).send().await.unwrap();
    assert_eq!(res.status(), 202, "{:?}", res.text().await);
    assert_eq!(header(&res, "range"), Some("0-4999"));
    assert_eq!(collector.await.unwrap(), 0, "the session was not expired");
    // Once nothing arrives any more, it goes.
    tokio::time::sleep(std::time::Duration::from_millis(2100)).await;
    assert_eq!(reg.app.registry.collect(100).await.unwrap().uploads_expired, 1);
    assert_oci_error(reg.get(&loc).await, 404, "BLOB_UPLOAD_UNKNOWN").await;
}

// Signed payloads (the default over plain http; the other scale-out tests send unsigned ones, as
// over https) against a real S3 server: parts are buffered and sent whole, and a multipart
// write and a chunked session land byte-exact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signed_payloads_store_blobs_byte_exact_on_s3() {
    let dir = tempfile::tempdir().unwrap();
    let Some(mut config) = crate::harness::scale_out_config(dir.path()).await else {
        eprintln!("skipping: the scale-out deployment is not configured");
        return;
    };
    config.storage_s3.as_mut().unwrap().sign_payload = Some(true);
    let reg = crate::harness::TestRegistry::start_with(config, dir).await;
    let big = random_bytes(77, 12 * 1024 * 1024 + 3);
    let d = reg.upload_blob("s3/signed", &big).await;
    assert_eq!(reg.get(&format!("/v2/s3/signed/blobs/{d}")).await.bytes().await.unwrap(), big);
    let location = reg.start_upload("s3/signed").await;
    let half = big.len() / 2;
    assert_eq!(reg.patch_chunk(&location, &big, 0, half).await.status(), 202);
    let location2 = {
        let res = reg.patch_chunk(&location, &big, half, big.len()).await;
        assert_eq!(res.status(), 202);
        header(&res, "location").unwrap().to_string()
    };
    let sep = if location2.contains('?') { '&' } else { '?' };
    let res = reg.req(Method::PUT, &format!("{location2}{sep}digest={d}")).send().await.unwrap();
    assert_eq!(res.status(), StatusCode::CREATED);
    assert_eq!(reg.get(&format!("/v2/s3/signed/blobs/{d}")).await.bytes().await.unwrap(), big);
}
