//! The safety net: the storage sweep removes objects no row accounts for once they are older
//! than `blob_grace` (and nothing else), rows the review queue missed are queued again, and the
//! scrub finds bytes that rotted or vanished behind Berth's back.

use berth::oci::Digest;

use crate::backend_test;
use crate::harness::*;

const DAY_MS: i64 = 24 * 3600 * 1000;
/// The collector's margin over `blob_grace` with the default flush interval and clock skew.
const MARGIN_MS: i64 = 3000;

/// Runs sweep steps until the walk over storage has finished once.
async fn sweep_pass(reg: &TestRegistry) -> berth::registry::SweepReport {
    let mut total = berth::registry::SweepReport::default();
    loop {
        let step = reg.app.registry.sweep_step().await.unwrap();
        total.objects_listed += step.objects_listed;
        total.orphans += step.orphans;
        total.orphan_bytes += step.orphan_bytes;
        total.rows_requeued += step.rows_requeued;
        if step.storage_pass_finished {
            return total;
        }
    }
}

backend_test!(the_sweep_removes_old_unaccounted_objects_and_nothing_else, |reg| {
    let img = reg.push_image("sweep/app", "v1", 1200).await;
    // An upload left open, and bytes nobody recorded.
    let open = reg.start_upload("sweep/app").await;
    assert_eq!(reg.patch_chunk(&open, &random_bytes(1201, 700), 0, 700).await.status(), 202);
    let orphans = [reg.leave_unrecorded_bytes("crashed-session", 600).await];
    // A published blob whose row was lost (a commit whose reply never came, then rolled back).
    let lost = reg.upload_blob("sweep/app", &random_bytes(1202, 800)).await;
    let lost_key = reg.storage_key(&lost).await;
    let sql = reg.sql().await;
    let (lost_id,): (i64,) = sqlx::query_as("SELECT id FROM blobs WHERE digest = $1")
        .bind(lost.as_str())
        .fetch_one(&sql)
        .await
        .unwrap();
    for table in ["DELETE FROM repository_blobs WHERE blob_id = $1", "DELETE FROM blobs WHERE id = $1"] {
        sqlx::query(table).bind(lost_id).execute(&sql).await.unwrap();
    }
    let before = reg.app.registry.blobs().list("").await.unwrap();
    for key in orphans.iter().chain([&lost_key]) {
        assert!(before.contains(key), "{key} in {before:?}");
    }

    // Young objects are left alone: their rows may still be on their way.
    let pass = sweep_pass(&reg).await;
    assert_eq!(pass.orphans, 0, "{pass:?}");
    assert!(pass.objects_listed as usize >= before.len());

    reg.app.registry.clock().advance_ms(DAY_MS + MARGIN_MS + 1000);
    let pass = sweep_pass(&reg).await;
    assert_eq!(pass.orphans, orphans.len() as u64 + 1, "{pass:?}");
    assert_eq!(pass.orphan_bytes, 600 + 800);
    let (deleted, failed) = reg.app.registry.drain_outbox().await.unwrap();
    assert_eq!((deleted, failed), (orphans.len() as u64 + 1, 0));
    let after = reg.app.registry.blobs().list("").await.unwrap();
    for key in orphans.iter().chain([&lost_key]) {
        assert!(!after.contains(key), "{key} still stored: {after:?}");
    }
    // Everything else is still there: the image pulls, the open session takes its last chunk.
    assert_eq!(after.len(), before.len() - orphans.len() - 1, "{before:?} → {after:?}");
    let res = reg.get(&format!("/v2/sweep/app/manifests/{}", img.digest)).await;
    assert_eq!(res.status(), 200);
    for layer in &img.layers {
        let res = reg.get(&format!("/v2/sweep/app/blobs/{}", Digest::sha256_of(layer))).await;
        assert_eq!(res.bytes().await.unwrap().as_ref(), layer.as_slice());
    }
    assert_eq!(reg.patch_chunk(&open, &random_bytes(1201, 700), 0, 700).await.status(), 416);
    // A second pass finds nothing more.
    assert_eq!(sweep_pass(&reg).await.orphans, 0);
    let report = reg.app.registry.fsck(false, &|_, _| {}).await.unwrap();
    assert!(report.clean() && report.orphans.is_empty(), "{report:?}");
});

backend_test!(the_sweep_walks_a_store_larger_than_one_page_in_steps, |reg| {
    // More objects than one step lists (1,000): orphans on both sides of the page boundary go.
    let mut orphans = Vec::new();
    for i in 0..1100 {
        orphans.push(reg.leave_unrecorded_bytes(&format!("many-{i:04}"), 10).await);
    }
    reg.app.registry.clock().advance_ms(DAY_MS + MARGIN_MS + 1000);
    let first = reg.app.registry.sweep_step().await.unwrap();
    assert_eq!(first.objects_listed, 1000);
    assert!(!first.storage_pass_finished);
    let second = reg.app.registry.sweep_step().await.unwrap();
    assert!(second.storage_pass_finished, "{second:?}");
    assert_eq!(first.orphans + second.orphans, 1100);
    reg.app.registry.drain_outbox().await.unwrap();
    assert!(reg.app.registry.blobs().list("").await.unwrap().is_empty());
});

backend_test!(rows_the_queue_missed_are_queued_again_by_the_sweep, |reg| {
    // A layer uploaded and never used, whose review got lost.
    let unused = reg.upload_blob("sweep/rows", &random_bytes(1210, 900)).await;
    let key = reg.storage_key(&unused).await;
    let sql = reg.sql().await;
    sqlx::query("DELETE FROM gc_reviews").execute(&sql).await.unwrap();
    reg.app.registry.clock().advance_ms(DAY_MS + MARGIN_MS + 1000);
    assert_eq!(reg.app.registry.collect(100).await.unwrap().blobs, 0, "nothing is queued");
    let step = reg.app.registry.sweep_step().await.unwrap();
    assert_eq!(step.rows_requeued, 1, "{step:?}");
    let pass = reg.app.registry.collect(100).await.unwrap();
    assert_eq!((pass.blobs, pass.bytes, pass.objects_deleted), (1, 900, 1));
    assert!(!reg.app.registry.blobs().list("").await.unwrap().contains(&key));
    // Rows something holds are not queued.
    reg.push_image("sweep/rows", "v1", 1211).await;
    sqlx::query("DELETE FROM gc_reviews").execute(&sql).await.unwrap();
    assert_eq!(reg.app.registry.sweep_step().await.unwrap().rows_requeued, 0);
});

backend_test!(the_scrub_finds_vanished_bytes_and_forgets_them_once_mended, |reg| {
    let img = reg.push_image("scrub/app", "v1", 1220).await;
    let layer = Digest::sha256_of(&img.layers[0]);
    let key = reg.storage_key(&layer).await;
    let registry = &reg.app.registry;
    // A period of a millisecond: every step re-hashes everything.
    let step = registry.scrub_step(1, 1000).await.unwrap();
    assert!(step.pass_finished && step.problems.is_empty(), "{step:?}");
    assert_eq!(step.blobs_checked, 3);

    registry.blobs().delete(&key).await.unwrap();
    reg.app.registry.clock().advance_ms(10);
    let step = registry.scrub_step(1, 1000).await.unwrap();
    assert_eq!(step.problems.len(), 1, "{step:?}");
    assert_eq!((step.problems[0].kind, step.problems[0].subject.as_str()), ("blob-missing", layer.as_str()));
    let findings = registry.meta().findings().await.unwrap();
    assert_eq!(findings.len(), 1, "{findings:?}");
    assert_eq!(findings[0].0.subject, layer.as_str());

    // Deleting the image and collecting it removes the damaged row: the finding goes with the
    // next pass.
    let res =
        reg.req(reqwest::Method::DELETE, &format!("/v2/scrub/app/manifests/{}", img.digest)).send().await;
    assert_eq!(res.unwrap().status(), 202);
    let sql = reg.sql().await;
    sqlx::query("UPDATE manifests SET unrestorable = 'test' WHERE digest = $1")
        .bind(img.digest.as_str())
        .execute(&sql)
        .await
        .unwrap();
    reg.app.registry.clock().advance_ms(8 * DAY_MS);
    let pass = registry.collect(100).await.unwrap();
    assert_eq!(pass.blobs, 3, "{pass:?}");
    let step = registry.scrub_step(1, 1000).await.unwrap();
    assert!(step.pass_finished && step.problems.is_empty(), "{step:?}");
    assert!(registry.meta().findings().await.unwrap().is_empty());
});

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_scrub_finds_rotten_bytes_at_its_pace() {
    let reg = TestRegistry::try_start(Backend::Sqlite).await.unwrap();
    let img = reg.push_image("scrub/rot", "v1", 1230).await;
    let layer = Digest::sha256_of(&img.layers[1]);
    let path = reg.app.config.storage_path.join(reg.storage_key(&layer).await);
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[10] ^= 0x01;
    std::fs::write(&path, &bytes).unwrap();
    let registry = &reg.app.registry;
    let stored: u64 = std::iter::once(&img.config).chain(&img.layers).map(|b| b.len() as u64).sum();
    // A week's period, a step a day: each step earns a seventh of the stored bytes and reads a
    // blob only once its credit covers it, so the pass takes the week, not a step.
    let week = 7 * DAY_MS;
    let mut found = Vec::new();
    let (mut steps, mut checked) = (0, 0);
    loop {
        registry.clock().advance_ms(DAY_MS);
        let step = registry.scrub_step(week, DAY_MS).await.unwrap();
        steps += 1;
        checked += step.bytes_checked;
        assert!(checked <= stored * steps / 7 + 1, "read {checked} of {stored} bytes in {steps} days");
        found.extend(step.problems);
        if step.pass_finished {
            break;
        }
        assert!(steps < 9, "the pass did not finish in a week");
    }
    assert_eq!(checked, stored);
    assert!(steps >= 7, "finished in {steps} days");
    assert_eq!(found.len(), 1, "{found:?}");
    assert_eq!((found[0].kind, found[0].subject.as_str()), ("blob-content", layer.as_str()));
}

// On the filesystem a completed upload is published outside its session's directory, so from
// the publication until the recording commits no row and no session accounts for the copy. Should
// that take longer than blob_grace, the sweep may take the copy for an orphan; the recording then
// fails loudly instead of naming reclaimed bytes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publication_slower_than_blob_grace_loses_to_the_sweep_and_fails_loudly() {
    publication_slower_than_blob_grace(false).await;
}

// The same after the outbox has deleted the swept bytes and settled its row: the fence is the
// durable record of swept keys, not the outbox row.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publication_slower_than_blob_grace_fails_after_the_outbox_drained() {
    publication_slower_than_blob_grace(true).await;
}

async fn publication_slower_than_blob_grace(drain_first: bool) {
    let reg = TestRegistry::try_start(Backend::Sqlite).await.unwrap();
    let repo = berth::oci::RepoName::parse("sweep/slow").unwrap();
    let data = vec![7u8; 600];
    let digest = Digest::sha256_of(&data);
    let session = reg.app.registry.start_upload(&repo).await.unwrap();
    let key = reg.app.registry.meta().upload(&session.id).await.unwrap().unwrap().storage_key;
    let blobs = reg.app.registry.blobs();
    let body = futures_util::stream::iter([Ok::<_, std::io::Error>(bytes::Bytes::from(data.clone()))]);
    let mut chunks = Vec::new();
    let size =
        blobs.write_upload(&key, &mut chunks, 0, body, None, std::sync::Arc::new(()), false).await.unwrap();
    let published = blobs.commit_upload(&key, &chunks, &digest, size).await.unwrap();
    assert!(!published.starts_with(&key), "published outside the session: {published}");

    reg.app.registry.clock().advance_ms(DAY_MS + MARGIN_MS + 1000);
    assert_eq!(sweep_pass(&reg).await.orphans, 1);
    if drain_first {
        reg.app.registry.drain_outbox().await.unwrap();
        let (queued,): (i64,) =
            sqlx::query_as("SELECT COUNT(*) FROM gc_outbox").fetch_one(&reg.sql().await).await.unwrap();
        assert_eq!(queued, 0, "the outbox settled the swept key");
    }
    let now = reg.app.registry.clock().now_ms();
    let late = reg
        .app
        .registry
        .meta()
        .complete_upload(&session.id, 0, &repo, &digest, size as i64, &published, now)
        .await;
    assert!(matches!(late, Err(berth::meta::Error::Busy(_))), "{late:?}");
    // Nothing names the reclaimed bytes: the blob is simply not there, and the store is sound.
    assert_eq!(reg.get(&format!("/v2/sweep/slow/blobs/{digest}")).await.status(), 404);
    reg.app.registry.drain_outbox().await.unwrap();
    let report = reg.app.registry.fsck(false, &|_, _| {}).await.unwrap();
    assert!(report.clean() && report.orphans.is_empty(), "{report:?}");
}

// Both deployments, the windows a completion can stall past. Whatever storage does with the
// published bytes, no row may ever name bytes that were reclaimed:
// - past blob_grace with its session alive: on S3 the published object stays under the session's
//   prefix, which the open session owns, so the sweep never takes it and the completion records
//   it (on the filesystem the copy is published outside the session: the fence above applies);
// - past the session's expiry: the collector removes the session and its bytes; the completion,
//   even after the outbox drained, finds no session and records nothing.
backend_test!(
    a_completion_stalled_past_the_grace_or_the_sessions_expiry_never_names_reclaimed_bytes,
    |reg| {
        let repo = berth::oci::RepoName::parse("sweep/stalled").unwrap();
        let on_s3 = reg.app.config.storage_s3.is_some();
        let blobs = reg.app.registry.blobs();
        let publish = |seed: u64| {
            let (reg, repo, blobs) = (&reg, &repo, blobs.clone());
            async move {
                let data = random_bytes(seed, 700);
                let digest = Digest::sha256_of(&data);
                let session = reg.app.registry.start_upload(repo).await.unwrap();
                let key = reg.app.registry.meta().upload(&session.id).await.unwrap().unwrap().storage_key;
                let body = futures_util::stream::iter([Ok::<_, std::io::Error>(bytes::Bytes::from(data))]);
                let mut chunks = Vec::new();
                let size = blobs
                    .write_upload(&key, &mut chunks, 0, body, None, std::sync::Arc::new(()), false)
                    .await
                    .unwrap();
                let published = blobs.commit_upload(&key, &chunks, &digest, size).await.unwrap();
                (session.id, key, digest, size as i64, published)
            }
        };
        let complete = |(id, digest, size, published): (String, Digest, i64, String)| {
            let (reg, repo) = (&reg, &repo);
            async move {
                let now = reg.app.registry.clock().now_ms();
                // The session row records no bytes: these were written past the HTTP layer.
                reg.app.registry.meta().complete_upload(&id, 0, repo, &digest, size, &published, now).await
            }
        };

        let (id, prefix, digest, size, published) = publish(1370).await;
        reg.app.registry.clock().advance_ms(DAY_MS + MARGIN_MS + 1000);
        let swept = sweep_pass(&reg).await.orphans;
        if on_s3 {
            assert!(published.starts_with(&prefix), "{published} is outside the session {prefix}");
            assert_eq!(swept, 0, "the sweep took bytes an open session owns");
            assert!(
                blobs.list("").await.unwrap().contains(&published),
                "the published bytes are still stored"
            );
            let done = complete((id, digest.clone(), size, published)).await.unwrap();
            assert!(done.is_some(), "the session was open: the completion records the blob");
            let got = reg.get(&format!("/v2/sweep/stalled/blobs/{digest}")).await;
            assert_eq!(got.status(), 200);
            assert_eq!(got.bytes().await.unwrap().as_ref(), random_bytes(1370, 700).as_slice());
        } else {
            assert_eq!(swept, 1, "published outside the session: an orphan once blob_grace passed");
            let late = complete((id, digest.clone(), size, published)).await;
            assert!(matches!(late, Err(berth::meta::Error::Busy(_))), "{late:?}");
            assert_eq!(reg.get(&format!("/v2/sweep/stalled/blobs/{digest}")).await.status(), 404);
        }

        // Past the session's expiry: collected with its bytes, the outbox drained, then the completion.
        let (id, _, digest, size, published) = publish(1371).await;
        reg.app.registry.clock().advance_ms(25 * 3600 * 1000);
        // (On the filesystem the first session is still open: its refused completion changed nothing.)
        let sessions = if on_s3 { 1 } else { 2 };
        assert_eq!(reg.app.registry.collect(100).await.unwrap().uploads_expired, sessions);
        sweep_pass(&reg).await;
        reg.app.registry.drain_outbox().await.unwrap();
        let (queued,): (i64,) =
            sqlx::query_as("SELECT COUNT(*) FROM gc_outbox").fetch_one(&reg.sql().await).await.unwrap();
        assert_eq!(queued, 0);
        assert!(!blobs.list("").await.unwrap().contains(&published), "the expired session's bytes are gone");
        let late = complete((id, digest.clone(), size, published)).await;
        assert!(matches!(late, Ok(None)), "{late:?}");
        assert_eq!(reg.get(&format!("/v2/sweep/stalled/blobs/{digest}")).await.status(), 404);
        let report = reg.app.registry.fsck(false, &|_, _| {}).await.unwrap();
        assert!(report.clean() && report.orphans.is_empty(), "{report:?}");
    }
);

// A multipart upload cut off by a crash (on S3 a large write streams as one, leaving a marker
// object that names it until it completes): once the marker is older than blob_grace the sweep
// aborts the upload, so its parts stop costing storage, and removes the marker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sweep_aborts_multipart_uploads_a_crash_cut_off() {
    use object_store::ObjectStoreExt as _;
    use object_store::multipart::MultipartStore as _;
    let Some(reg) = TestRegistry::try_start(Backend::Postgres).await else {
        eprintln!("skipping: the scale-out deployment is not configured");
        return;
    };
    let s3 = reg.app.config.storage_s3.clone().unwrap();
    let store = object_store::aws::AmazonS3Builder::new()
        .with_endpoint(s3.endpoint.clone().unwrap())
        .with_allow_http(true)
        .with_region(s3.region.clone().unwrap())
        .with_bucket_name(&s3.bucket)
        .with_access_key_id(s3.access_key_id.clone().unwrap())
        .with_secret_access_key(s3.secret_access_key.clone().unwrap())
        .build()
        .unwrap();
    let prefix = s3.prefix.clone().unwrap();
    // What a replica killed mid-write leaves: the upload with a part in it, and its marker.
    let target = object_store::path::Path::from(format!("{prefix}/blobs/crashed-session/chunk"));
    let id = store.create_multipart(&target).await.unwrap();
    store.put_part(&target, &id, 0, vec![1u8; 5 << 20].into()).await.unwrap();
    let marker = object_store::path::Path::from(format!("{prefix}/blobs/crashed-session/chunk.multipart"));
    store.put(&marker, id.clone().into_bytes().into()).await.unwrap();

    reg.app.registry.clock().advance_ms(DAY_MS + MARGIN_MS + 1000);
    assert_eq!(sweep_pass(&reg).await.orphans, 1);
    assert_eq!(reg.app.registry.drain_outbox().await.unwrap(), (1, 0));
    assert!(reg.app.registry.blobs().list("").await.unwrap().is_empty());
    // The upload is gone: another part cannot be added to it.
    let late = store.put_part(&target, &id, 1, vec![2u8; 16].into()).await;
    assert!(late.is_err(), "the multipart upload is still open");
}

// Keys Berth never writes (the rest of a shared bucket, the tree of a registry imported in
// place) are never taken by the sweep, and cost it one page, not a walk through them.
backend_test!(the_sweep_skips_what_berth_never_writes, |reg| {
    use futures_util::StreamExt as _;
    let orphan = reg.leave_unrecorded_bytes("left-behind", 10).await;
    let foreign: Vec<String> =
        (0..2100).map(|i| format!("dist/docker/registry/v2/blobs/{i:05}/data")).collect();
    let s3 =
        reg.app.config.storage_s3.clone().map(|c| (std::sync::Arc::new(c.client(&c.bucket).unwrap()), c));
    let root = reg.app.config.storage_path.clone();
    let put = |key: String| {
        let (s3, root) = (s3.clone(), root.clone());
        async move {
            match s3 {
                Some((client, config)) => {
                    use object_store::ObjectStoreExt as _;
                    let path = format!("{}/{key}", config.prefix.as_deref().unwrap_or_default());
                    client.put(&path.into(), bytes::Bytes::from_static(b"not berth's").into()).await.unwrap();
                }
                None => {
                    let path = root.join(&key);
                    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
                    std::fs::write(path, b"not berth's").unwrap();
                }
            }
        }
    };
    futures_util::stream::iter(foreign.iter().cloned().chain(["zzz/notes.txt".to_string()]))
        .map(put)
        .buffer_unordered(16)
        .collect::<Vec<()>>()
        .await;
    reg.app.registry.clock().advance_ms(DAY_MS + MARGIN_MS + 1000);
    let pass = sweep_pass(&reg).await;
    assert_eq!(pass.orphans, 1, "{pass:?}");
    assert!(pass.objects_listed < 2000, "walked through the foreign tree: {pass:?}");
    reg.app.registry.drain_outbox().await.unwrap();
    let stored = reg.app.registry.blobs().list("").await.unwrap();
    assert!(!stored.contains(&orphan));
    for key in foreign.iter().chain([&"zzz/notes.txt".to_string()]) {
        assert!(stored.contains(key), "{key} was taken");
    }
});
