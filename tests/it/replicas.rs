//! Several replicas on one PostgreSQL database and one S3 bucket: push through one and pull
//! through another, chunks of one upload on alternating replicas, the same content pushed
//! concurrently through different replicas, and a replica killed mid-upload.

use std::process::Command;
use std::time::{Duration, Instant};

use berth::oci::Digest;
use reqwest::{Method, StatusCode};

use crate::harness::*;

/// Starts `n` replicas of one scale-out deployment, or `None` when PostgreSQL and S3 are not
/// available here.
async fn replicas(n: usize) -> Option<Vec<TestRegistry>> {
    let dir = tempfile::tempdir().unwrap();
    let config = scale_out_config(dir.path()).await?;
    let mut out = Vec::new();
    for _ in 0..n {
        out.push(TestRegistry::start_with(config.clone(), tempfile::tempdir().unwrap()).await);
    }
    Some(out)
}

macro_rules! replicas_or_skip {
    ($n:expr) => {
        match replicas($n).await {
            Some(r) => r,
            None => {
                eprintln!("skipping: the scale-out deployment is not configured");
                return;
            }
        }
    };
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn push_through_one_pull_through_the_others() {
    let r = replicas_or_skip!(3);
    let img = r[0].push_image("multi/app", "v1", 70).await;
    for replica in &r[1..] {
        let res = replica.get("/v2/multi/app/manifests/v1").await;
        assert_eq!(header(&res, "docker-content-digest"), Some(img.digest.as_str()));
        assert_eq!(res.bytes().await.unwrap(), img.manifest);
        for layer in &img.layers {
            let d = Digest::sha256_of(layer);
            assert_eq!(replica.get(&format!("/v2/multi/app/blobs/{d}")).await.bytes().await.unwrap(), *layer);
        }
        let tags: serde_json::Value = replica.get("/v2/multi/app/tags/list").await.json().await.unwrap();
        assert_eq!(tags["tags"], serde_json::json!(["v1"]));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunks_of_one_upload_on_alternating_replicas() {
    let r = replicas_or_skip!(3);
    // Sizes exercise both a multipart write (over the 5 MiB part size) and small single PUTs.
    let sizes = [6 * 1024 * 1024 + 123, 100_000, 3 * 1024 * 1024];
    let data = random_bytes(71, sizes.iter().sum());
    let digest = Digest::sha256_of(&data);
    let res = r[0].req(Method::POST, "/v2/alt/blobs/uploads/").send().await.unwrap();
    let mut loc = header(&res, "location").unwrap().to_string();
    let mut start = 0;
    for (i, size) in sizes.iter().enumerate() {
        let replica = &r[(i + 1) % 3];
        let res = replica
            .req(Method::PATCH, &loc)
            .header("content-range", format!("{start}-{}", start + size - 1))
            .body(data[start..start + size].to_vec())
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), StatusCode::ACCEPTED, "chunk {i}");
        start += size;
        assert_eq!(header(&res, "range"), Some(format!("0-{}", start - 1).as_str()));
        loc = header(&res, "location").unwrap().to_string();
        // Every replica sees the same progress.
        let status = r[i % 3].get(&loc).await;
        assert_eq!(header(&status, "range"), Some(format!("0-{}", start - 1).as_str()));
    }
    let res = r[2].req(Method::PUT, &format!("{loc}?digest={digest}")).send().await.unwrap();
    assert_eq!(res.status(), StatusCode::CREATED);
    for replica in &r {
        assert_eq!(replica.get(&format!("/v2/alt/blobs/{digest}")).await.bytes().await.unwrap(), data);
    }
    // The session's multipart upload was completed with the small chunks as its last part, and
    // the objects folded into it were removed: one object remains.
    let objects = r[0].app.registry.blobs().list("blobs/").await.unwrap();
    assert_eq!(objects.len(), 1, "{objects:?}");
}

/// The session's recorded pieces (its `chunks` JSON), read from the metadata.
async fn session_chunks(replica: &TestRegistry, location: &str) -> Vec<berth::blob::Chunk> {
    let id = location.split('?').next().unwrap().rsplit('/').next().unwrap();
    let row = replica.app.registry.meta().upload(id).await.unwrap().expect("the session exists");
    serde_json::from_str(&row.chunks).unwrap()
}

// Chunks of a part or more go into the session's one multipart upload as they arrive (a short
// one, or the short end of a streamed one, waits as an object of its own and is folded into the
// next part), on whichever replica receives them; completing the session completes that upload,
// so the blob is the very object the parts were written to — nothing is read back and written
// again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chunked_session_becomes_its_multipart_upload_without_a_copy() {
    let r = replicas_or_skip!(3);
    const MIB: usize = 1024 * 1024;
    // With 5 MiB parts: 12 (announced) → two parts of 6; 7 streamed (length unknown) → a part of
    // 5, 2 left as an object; 100 KB → an object (too short to hold the session for); 16
    // (announced) → folds both in, three parts; 4 streamed → an object; the final PUT's 3 →
    // folds the 4 in, one part of 7.
    let sizes = [(12 * MIB, true), (7 * MIB, false), (100_000, true), (16 * MIB, true), (4 * MIB, false)];
    let last = 3 * MIB + 17;
    let data = random_bytes(80, sizes.iter().map(|(n, _)| n).sum::<usize>() + last);
    let digest = Digest::sha256_of(&data);
    let mut loc = r[0].start_upload("nocopy/app").await;
    let mut start = 0;
    for (i, &(size, announced)) in sizes.iter().enumerate() {
        let replica = &r[i % 3];
        let res = if announced {
            replica.patch_chunk(&loc, &data, start, start + size).await
        } else {
            let piece = data[start..start + size].to_vec();
            let stream = futures_util::stream::iter(
                piece.chunks(256 * 1024).map(|c| Ok::<_, std::io::Error>(c.to_vec())).collect::<Vec<_>>(),
            );
            replica.req(Method::PATCH, &loc).body(reqwest::Body::wrap_stream(stream)).send().await.unwrap()
        };
        assert_eq!(res.status(), StatusCode::ACCEPTED, "chunk {i}");
        start += size;
        assert_eq!(header(&res, "range"), Some(format!("0-{}", start - 1).as_str()));
        loc = header(&res, "location").unwrap().to_string();
    }
    let chunks = session_chunks(&r[0], &loc).await;
    let open: Vec<_> = chunks.iter().filter(|c| c.multipart.is_some()).collect();
    assert_eq!(open.len(), 1, "{chunks:?}");
    let target = open[0].key.clone();
    assert_eq!(open[0].multipart.as_ref().unwrap().parts.len(), 6, "{chunks:?}");
    assert_eq!(chunks.len(), 2, "{chunks:?}");
    assert_eq!(
        (chunks[1].multipart.as_ref(), chunks[1].len),
        (None, 4 * MIB as u64),
        "the rest waits as an object"
    );
    assert_eq!(chunks.iter().map(|c| c.len).sum::<u64>(), start as u64);

    let sep = if loc.contains('?') { '&' } else { '?' };
    let res = r[1]
        .req(Method::PUT, &format!("{loc}{sep}digest={digest}"))
        .header("content-range", format!("{start}-{}", data.len() - 1))
        .body(data[start..].to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::CREATED, "{:?}", res.text().await);
    assert_eq!(r[2].storage_key(&digest).await, target, "the blob is the session's multipart object");
    for replica in &r {
        assert_eq!(replica.get(&format!("/v2/nocopy/app/blobs/{digest}")).await.bytes().await.unwrap(), data);
    }
    let objects = r[0].app.registry.blobs().list("blobs/").await.unwrap();
    assert_eq!(objects, vec![target]);
}

// Parts of an announced write stream from the request to the store as they arrive (unsigned
// payloads, as here). A request cut off in the middle of such a part changes nothing: the session
// stays at its last recorded offset, the part's bytes are never listed, and the same bytes sent
// again (through another replica) complete into the session's one multipart object.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_cut_off_mid_part_leaves_the_session_as_it_was() {
    let r = replicas_or_skip!(2);
    const MIB: usize = 1024 * 1024;
    let data = random_bytes(83, 18 * MIB + 5);
    let digest = Digest::sha256_of(&data);
    let loc = r[0].start_upload("cutoff/app").await;
    let res = r[0].patch_chunk(&loc, &data, 0, 6 * MIB).await;
    assert_eq!(res.status(), StatusCode::ACCEPTED);
    let loc = header(&res, "location").unwrap().to_string();
    let before = session_chunks(&r[0], &loc).await;
    assert_eq!(before.len(), 1, "{before:?}");
    assert!(before[0].multipart.is_some(), "6 MiB announced is a part: {before:?}");

    // 12 MiB announced; the body breaks off after 7 MiB, inside the second streamed part.
    let pieces: Vec<_> = data[6 * MIB..13 * MIB]
        .chunks(256 * 1024)
        .map(|c| Ok::<_, std::io::Error>(c.to_vec()))
        .chain(std::iter::once(Err(std::io::Error::other("client gone"))))
        .collect();
    let pieces = futures_util::stream::iter(pieces);
    let cut = r[0]
        .req(Method::PATCH, &loc)
        .header("content-range", format!("{}-{}", 6 * MIB, 18 * MIB - 1))
        .header("content-length", 12 * MIB)
        .body(reqwest::Body::wrap_stream(pieces))
        .send()
        .await;
    assert!(cut.is_err(), "the request broke off: {cut:?}");
    // The server notices once the connection drops; the session is as it was, its lock free.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let status = r[1].get(&loc).await;
        assert_eq!(header(&status, "range"), Some(format!("0-{}", 6 * MIB - 1).as_str()));
        if session_chunks(&r[1], &loc).await == before {
            break;
        }
        assert!(Instant::now() < deadline, "the session changed: {:?}", session_chunks(&r[1], &loc).await);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let res = loop {
        let res = r[1].patch_chunk(&loc, &data, 6 * MIB, 18 * MIB).await;
        // The cut-off request may still be letting go of the session's lock.
        if res.status() != StatusCode::ACCEPTED && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        }
        break res;
    };
    assert_eq!(res.status(), StatusCode::ACCEPTED, "{:?}", res.text().await);
    let loc = header(&res, "location").unwrap().to_string();
    let sep = if loc.contains('?') { '&' } else { '?' };
    let res = r[0]
        .req(Method::PUT, &format!("{loc}{sep}digest={digest}"))
        .header("content-range", format!("{}-{}", 18 * MIB, data.len() - 1))
        .body(data[18 * MIB..].to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::CREATED, "{:?}", res.text().await);
    assert_eq!(r[1].storage_key(&digest).await, before[0].key, "the blob is the session's multipart object");
    for replica in &r {
        assert_eq!(replica.get(&format!("/v2/cutoff/app/blobs/{digest}")).await.bytes().await.unwrap(), data);
    }
}

// Large pushes at once through two replicas — monolithic and as one announced chunk, so their
// parts stream to the store side by side — all complete and pull byte-exact from either replica.
// (A stress like this, against Garage, found a write that waited forever on a part the store had
// answered early.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_large_pushes_through_two_replicas_all_land() {
    let r = replicas_or_skip!(2);
    let r: Vec<std::sync::Arc<TestRegistry>> = r.into_iter().map(std::sync::Arc::new).collect();
    const MIB: usize = 1024 * 1024;
    let mut writers = Vec::new();
    for w in 0..4u64 {
        let r = r.clone();
        writers.push(tokio::spawn(async move {
            let mut pushed = Vec::new();
            for k in 0..3u64 {
                let data = random_bytes(900 + w * 10 + k, (6 + 3 * ((w + k) as usize % 4)) * MIB + 11);
                let digest = Digest::sha256_of(&data);
                let replica = &r[((w + k) % 2) as usize];
                let repo = format!("many/w{w}");
                if k % 2 == 0 {
                    assert_eq!(replica.upload_blob(&repo, &data).await, digest);
                } else {
                    let loc = replica.start_upload(&repo).await;
                    let res = replica.patch_chunk(&loc, &data, 0, data.len()).await;
                    assert_eq!(res.status(), StatusCode::ACCEPTED, "{:?}", res.text().await);
                    let loc = header(&res, "location").unwrap().to_string();
                    let sep = if loc.contains('?') { '&' } else { '?' };
                    let res =
                        replica.req(Method::PUT, &format!("{loc}{sep}digest={digest}")).send().await.unwrap();
                    assert_eq!(res.status(), StatusCode::CREATED, "{:?}", res.text().await);
                }
                pushed.push((repo, digest, data));
            }
            pushed
        }));
    }
    let deadline = Duration::from_secs(120);
    for writer in writers {
        let pushed = tokio::time::timeout(deadline, writer).await.expect("no push hangs").unwrap();
        for (repo, digest, data) in pushed {
            for replica in &r {
                let res = replica.get(&format!("/v2/{repo}/blobs/{digest}")).await;
                assert_eq!(res.bytes().await.unwrap(), data, "{repo} {digest}");
            }
        }
    }
}

// A request that holds a session to add parts and then dies (its replica killed) blocks nobody
// for long: other writes still land (as objects of their own), and completing the session,
// which must hold it to complete the multipart upload, is refused until the hold runs out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_holder_of_a_session_lets_go_when_its_hold_runs_out() {
    let r = replicas_or_skip!(2);
    let data = random_bytes(82, 14 * 1024 * 1024);
    let digest = Digest::sha256_of(&data);
    let loc = r[0].start_upload("hold/app").await;
    let first = 6 * 1024 * 1024;
    assert_eq!(r[0].patch_chunk(&loc, &data, 0, first).await.status(), 202);
    // The hold of a writer that died (what a killed replica leaves in the row).
    let id = loc.split('?').next().unwrap().rsplit('/').next().unwrap();
    let meta = r[0].app.registry.meta();
    let row = meta.upload(id).await.unwrap().unwrap();
    let now = r[0].app.registry.clock().now_ms();
    assert!(meta.hold_upload(id, row.size, &row.chunks, "dead-writer", now, now + 120_000).await.unwrap());

    let res = r[1].patch_chunk(&loc, &data, first, data.len()).await;
    assert_eq!(res.status(), 202, "a write does not wait for the hold");
    let chunks = session_chunks(&r[1], &loc).await;
    assert!(chunks.last().unwrap().multipart.is_none() && chunks.last().unwrap().len == 8 * 1024 * 1024);
    let loc = header(&res, "location").unwrap().to_string();
    let sep = if loc.contains('?') { '&' } else { '?' };
    let complete = format!("{loc}{sep}digest={digest}");
    assert_oci_error(r[1].req(Method::PUT, &complete).send().await.unwrap(), 400, "BLOB_UPLOAD_INVALID")
        .await;
    r[1].app.registry.clock().advance_ms(121_000);
    let res = r[1].req(Method::PUT, &complete).send().await.unwrap();
    assert_eq!(res.status(), StatusCode::CREATED, "{:?}", res.text().await);
    assert_eq!(r[0].get(&format!("/v2/hold/app/blobs/{digest}")).await.bytes().await.unwrap(), data);
}

// A session's multipart upload goes with the session: at once when it is cancelled, and through
// the collector's outbox when it expires — the upload is aborted, so its parts are not kept (and
// billed) by the store.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelled_and_expired_sessions_abort_their_multipart_uploads() {
    use object_store::multipart::MultipartStore as _;
    let dir = tempfile::tempdir().unwrap();
    let Some(config) = scale_out_config(dir.path()).await else {
        eprintln!("skipping: the scale-out deployment is not configured");
        return;
    };
    let s3 = config.storage_s3.clone().unwrap();
    let reg = TestRegistry::start_with(config, dir).await;
    let data = random_bytes(81, 6 * 1024 * 1024);
    let store = s3.client(&s3.bucket).unwrap();
    let root = s3.prefix.clone().unwrap_or_default().trim_matches('/').to_string();
    let mut open = Vec::new();
    let mut locations = Vec::new();
    for _ in 0..2 {
        let loc = reg.start_upload("abort/app").await;
        let res = reg.patch_chunk(&loc, &data, 0, data.len()).await;
        assert_eq!(res.status(), 202);
        let chunks = session_chunks(&reg, &loc).await;
        let chunk = chunks.iter().find(|c| c.multipart.is_some()).expect("an open multipart upload").clone();
        open.push(chunk);
        locations.push(loc);
    }
    let still_open = |chunk: berth::blob::Chunk| {
        let store = &store;
        let path = match root.as_str() {
            "" => object_store::path::Path::from(chunk.key.as_str()),
            root => object_store::path::Path::from(format!("{root}/{}", chunk.key)),
        };
        async move {
            let id = chunk.multipart.unwrap().id;
            store.put_part(&path, &id, 9, object_store::PutPayload::from_static(b"x")).await.is_ok()
        }
    };
    assert!(still_open(open[0].clone()).await, "a live session's upload takes parts");
    assert_eq!(reg.req(Method::DELETE, &locations[0]).send().await.unwrap().status(), 204);
    assert!(!still_open(open[0].clone()).await, "the cancelled session's upload was aborted");

    reg.app.registry.clock().advance_ms(25 * 3600 * 1000);
    assert_eq!(reg.app.registry.collect(100).await.unwrap().uploads_expired, 1);
    reg.app.registry.drain_outbox().await.unwrap();
    assert!(!still_open(open[1].clone()).await, "the expired session's upload was aborted");
    let objects = reg.app.registry.blobs().list("blobs/").await.unwrap();
    assert!(objects.is_empty(), "{objects:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn same_content_pushed_concurrently_through_different_replicas() {
    let r = replicas_or_skip!(3);
    let mut tasks = Vec::new();
    for (i, replica) in r.iter().enumerate() {
        let client = replica.client.clone();
        let base = replica.url("");
        tasks.push(tokio::spawn(async move {
            let _ = i;
            // Same layers, same config, same manifest, same tag, all at once.
            let layer = random_bytes(72, 2 * 1024 * 1024);
            let config = br#"{"architecture":"amd64","os":"linux"}"#.to_vec();
            for blob in [&layer, &config] {
                let d = Digest::sha256_of(blob);
                let res = client
                    .post(format!("{base}/v2/race/app/blobs/uploads/?digest={d}"))
                    .body(blob.clone())
                    .send()
                    .await
                    .unwrap();
                assert_eq!(res.status(), StatusCode::CREATED);
            }
            let manifest = serde_json::to_vec(&serde_json::json!({
                "schemaVersion": 2, "mediaType": OCI_MANIFEST,
                "config": {"mediaType": OCI_CONFIG, "digest": Digest::sha256_of(&config).as_str(), "size": config.len()},
                "layers": [{"mediaType": OCI_LAYER, "digest": Digest::sha256_of(&layer).as_str(), "size": layer.len()}],
            }))
            .unwrap();
            let res = client
                .put(format!("{base}/v2/race/app/manifests/latest"))
                .header("content-type", OCI_MANIFEST)
                .body(manifest.clone())
                .send()
                .await
                .unwrap();
            assert_eq!(res.status(), StatusCode::CREATED);
            (manifest, layer)
        }));
    }
    let mut results = Vec::new();
    for t in tasks {
        results.push(t.await.unwrap());
    }
    let (manifest, layer) = &results[0];
    for replica in &r {
        let res = replica.get("/v2/race/app/manifests/latest").await;
        assert_eq!(res.bytes().await.unwrap(), *manifest);
        let d = Digest::sha256_of(layer);
        assert_eq!(replica.get(&format!("/v2/race/app/blobs/{d}")).await.bytes().await.unwrap(), *layer);
    }
    // One stored copy per digest: the redundant ones were deleted.
    let objects = r[0].app.registry.blobs().list("blobs/").await.unwrap();
    assert_eq!(objects.len(), 2, "{objects:?}");
}

// Small chunks (each an object of its own) and chunks of more than a part (the one that holds
// the session writes parts, the other an object of its own): either way one wins.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_racing_on_one_session_cannot_corrupt_it() {
    let r = replicas_or_skip!(2);
    for (round, size) in [100_000, 6 * 1024 * 1024 + 7].into_iter().enumerate() {
        race_on_one_session(&r, round as u64, size).await;
    }
}

async fn race_on_one_session(r: &[TestRegistry], round: u64, size: usize) {
    let data = random_bytes(73 + 10 * round, size);
    let res = r[0].req(Method::POST, "/v2/race/session/blobs/uploads/").send().await.unwrap();
    let loc = header(&res, "location").unwrap().to_string();
    // Both send a different first chunk for the same range at the same time.
    let other = random_bytes(74 + 10 * round, size);
    let range = format!("0-{}", size - 1);
    let a = r[0].req(Method::PATCH, &loc).header("content-range", &range).body(data.clone()).send();
    let b = r[1].req(Method::PATCH, &loc).header("content-range", &range).body(other.clone()).send();
    let (a, b) = tokio::join!(a, b);
    let (a, b) = (a.unwrap().status(), b.unwrap().status());
    let statuses = [a.as_u16(), b.as_u16()];
    assert!(statuses.contains(&202), "{statuses:?}");
    // Whichever won, the session holds exactly its bytes: completing with the winner's content
    // works, with the loser's it does not.
    let (winner, loser): (&[u8], &[u8]) = if a == 202 && b != 202 {
        (&data, &other)
    } else if b == 202 && a != 202 {
        (&other, &data)
    } else {
        // Serialised: the second saw the first's bytes and was refused as out of order... or both
        // were accepted one after the other, which the CAS forbids for the same range.
        panic!("both chunks for one range were accepted: {statuses:?}");
    };
    let wrong = Digest::sha256_of(loser);
    let res = r[1].req(Method::PUT, &format!("{loc}?digest={wrong}")).send().await.unwrap();
    assert_eq!(res.status(), 400);
    let right = Digest::sha256_of(winner);
    let res = r[0].req(Method::PUT, &format!("{loc}?digest={right}")).send().await.unwrap();
    assert_eq!(res.status(), 201);
    assert_eq!(r[1].get(&format!("/v2/race/session/blobs/{right}")).await.bytes().await.unwrap(), winner);
}

// Two replicas complete one single-chunk session at the same moment. On object storage the
// blob a one-chunk session publishes is that chunk's own object, so the replica that loses the
// race must not delete it: it is the winner's blob (or, had the session moved on, still part of
// the session).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_racing_to_complete_one_session_keep_the_blob() {
    let r = replicas_or_skip!(2);
    for round in 0..12u64 {
        let data = random_bytes(500 + round, 50_000);
        let digest = Digest::sha256_of(&data);
        let loc = r[0].start_upload("race/complete").await;
        let res = r[0].patch_chunk(&loc, &data, 0, data.len()).await;
        assert_eq!(res.status(), StatusCode::ACCEPTED);
        let loc = header(&res, "location").unwrap().to_string();
        let put = |i: usize| r[i].req(Method::PUT, &format!("{loc}?digest={digest}")).send();
        let (a, b) = tokio::join!(put(0), put(1));
        let statuses = [a.unwrap().status().as_u16(), b.unwrap().status().as_u16()];
        assert!(statuses.contains(&201), "round {round}: {statuses:?}");
        for replica in &r {
            let res = replica.get(&format!("/v2/race/complete/blobs/{digest}")).await;
            assert_eq!(res.status(), 200, "round {round} ({statuses:?})");
            assert_eq!(res.bytes().await.unwrap(), data, "round {round}");
        }
    }
}

// The delete contract's "on every replica": a delete through one replica is visible through the
// others in the same moment, and a tag deleted through one can be pushed through another.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delete_through_one_replica_is_visible_through_the_others_at_once() {
    let r = replicas_or_skip!(2);
    let img = r[0].push_image("multi/del", "v1", 520).await;
    r[0].put_manifest("multi/del", "v2", OCI_MANIFEST, &img.manifest).await;
    let res =
        r[0].req(Method::DELETE, &format!("/v2/multi/del/manifests/{}", img.digest)).send().await.unwrap();
    assert_eq!(res.status(), StatusCode::ACCEPTED);
    for path in ["/v2/multi/del/manifests/v1".to_string(), format!("/v2/multi/del/manifests/{}", img.digest)]
    {
        assert_eq!(r[1].get(&path).await.status(), 404, "{path}");
    }
    let tags: serde_json::Value = r[1].get("/v2/multi/del/tags/list").await.json().await.unwrap();
    assert_eq!(tags["tags"], serde_json::json!([]));
    assert_eq!(r[1].put_manifest("multi/del", "v1", OCI_MANIFEST, &img.manifest).await.status(), 201);
    assert_eq!(r[0].get("/v2/multi/del/manifests/v1").await.status(), 200);
}

/// A `berth serve` process of the scale-out deployment.
struct Process {
    child: std::process::Child,
    addr: String,
}

fn spawn_replica(config: &berth::config::Config, dir: &std::path::Path, name: &str) -> Process {
    let config_file = dir.join(format!("{name}.toml"));
    std::fs::write(&config_file, scale_out_toml(config)).unwrap();
    let data_dir = dir.join(name);
    let args = [
        std::ffi::OsStr::new("--config"),
        config_file.as_os_str(),
        "--data-dir".as_ref(),
        data_dir.as_os_str(),
    ];
    let (child, addr) = serve_process(&args, &dir.join(format!("{name}.ready")));
    Process { child, addr }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_killed_mid_upload_loses_nothing_and_the_others_keep_serving() {
    let dir = tempfile::tempdir().unwrap();
    let Some(config) = scale_out_config(dir.path()).await else {
        eprintln!("skipping: the scale-out deployment is not configured");
        return;
    };
    let mut a = spawn_replica(&config, dir.path(), "a");
    let b = spawn_replica(&config, dir.path(), "b");
    let client = reqwest::Client::new();
    let url = |p: &Process, path: &str| format!("http://{}{path}", p.addr);

    // Something already pushed, to pull while a replica dies.
    let before = random_bytes(75, 500_000);
    let before_digest = Digest::sha256_of(&before);
    let res = client
        .post(url(&a, &format!("/v2/kill/me/blobs/uploads/?digest={before_digest}")))
        .body(before.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 201);

    // A session with one recorded chunk, then a second chunk streaming into replica A…
    let data = random_bytes(76, 12 * 1024 * 1024);
    let digest = Digest::sha256_of(&data);
    let res = client.post(url(&a, "/v2/kill/me/blobs/uploads/")).send().await.unwrap();
    let loc = header(&res, "location").unwrap().to_string();
    let first = 1024 * 1024;
    let res = client
        .patch(url(&a, &loc))
        .header("content-range", format!("0-{}", first - 1))
        .body(data[..first].to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 202);
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Vec<u8>, std::io::Error>>(2);
    let stream =
        futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|item| (item, rx)) });
    let streaming = tokio::spawn(client.patch(url(&a, &loc)).body(reqwest::Body::wrap_stream(stream)).send());
    // More than one 5 MiB part, so A has started a multipart upload when it dies.
    tx.send(Ok(data[first..first + 6 * 1024 * 1024].to_vec())).await.unwrap();
    let store = berth::blob::BlobStore::s3(config.storage_s3.as_ref().unwrap()).unwrap();
    let session = loc.rsplit('/').next().unwrap().to_string();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !store.list(&format!("blobs/{session}/")).await.unwrap().iter().any(|k| k.ends_with(".multipart")) {
        assert!(Instant::now() < deadline, "the write never started a multipart upload");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // …when A is killed.
    Command::new("kill").args(["-9", &a.child.id().to_string()]).status().unwrap();
    let _ = a.child.wait();
    drop(tx);
    // The client's request to A died with A; what it saw does not matter, what was recorded does.
    let _ = streaming.await;

    // B kept serving: earlier content pulls, and the session continues from its recorded size.
    let fetch = |path: String| {
        let client = client.clone();
        async move { client.get(path).send().await.unwrap().bytes().await.unwrap() }
    };
    assert_eq!(fetch(url(&b, &format!("/v2/kill/me/blobs/{before_digest}"))).await, before);
    let status = client.get(url(&b, &loc)).send().await.unwrap();
    assert_eq!(status.status(), 204);
    assert_eq!(header(&status, "range"), Some(format!("0-{}", first - 1).as_str()));
    let res = client
        .put(url(&b, &format!("{loc}?digest={digest}")))
        .header("content-range", format!("{first}-{}", data.len() - 1))
        .body(data[first..].to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 201, "{:?}", res.text().await);
    assert_eq!(fetch(url(&b, &format!("/v2/kill/me/blobs/{digest}"))).await, data);
    Command::new("kill").args(["-TERM", &b.child.id().to_string()]).status().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blob_downloads_redirect_to_presigned_urls_when_configured() {
    let dir = tempfile::tempdir().unwrap();
    let Some(mut config) = scale_out_config(dir.path()).await else {
        eprintln!("skipping: the scale-out deployment is not configured");
        return;
    };
    if let Some(s3) = config.storage_s3.as_mut() {
        s3.redirect = true;
    }
    let reg = TestRegistry::start_with(config, dir).await;
    let data = random_bytes(77, 300_000);
    let d = reg.upload_blob("redirect/me", &data).await;
    let no_follow = reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).build().unwrap();
    let res = no_follow.get(reg.url(&format!("/v2/redirect/me/blobs/{d}"))).send().await.unwrap();
    assert_eq!(res.status(), StatusCode::TEMPORARY_REDIRECT);
    let location = header(&res, "location").unwrap().to_string();
    assert!(location.contains("X-Amz-Signature") && location.contains("X-Amz-Expires=60"), "{location}");
    // Following the redirect downloads the exact bytes from the bucket.
    assert_eq!(reqwest::get(&location).await.unwrap().bytes().await.unwrap(), data);
    // HEAD is still answered by Berth.
    let res = reg.req(Method::HEAD, &format!("/v2/redirect/me/blobs/{d}")).send().await.unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(header(&res, "content-length"), Some("300000"));
}
