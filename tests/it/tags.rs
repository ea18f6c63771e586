//! Tag writes under concurrency: every move recorded once with what it moved from, and no
//! deadlock between tagged pushes.

use futures_util::future::join_all;

use crate::backend_test;
use crate::harness::*;
use berth::oci::{RepoName, Tag};

/// Deadlocks PostgreSQL has detected in the registry's database so far (statistics are
/// flushed by each backend within about a second).
async fn deadlocks(reg: &TestRegistry) -> i64 {
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    let sql = reg.sql().await;
    let (n,): (i64,) =
        sqlx::query_as("SELECT deadlocks FROM pg_stat_database WHERE datname = current_database()")
            .fetch_one(&sql)
            .await
            .unwrap();
    n
}

// Two index pushes, each tagging a tag that points at the other's child: a tag write that also
// locked the manifest its tag pointed at would wait on the other push's share lock of that
// child while holding the lock the other waits for.
backend_test!(tagged_index_pushes_crossing_each_other_do_not_deadlock, |reg| {
    let before = if reg.on_postgres() { deadlocks(&reg).await } else { 0 };
    for round in 0..12u64 {
        let one = reg.push_image("cross", &format!("a{round}"), 1000 + 2 * round).await;
        let two = reg.push_image("cross", &format!("b{round}"), 1001 + 2 * round).await;
        // a → two, b → one; then index(one) takes a, index(two) takes b, at the same time.
        let (sa, sb) = (format!("a{round}"), format!("b{round}"));
        reg.put_manifest("cross", &sa, OCI_MANIFEST, &two.manifest).await;
        reg.put_manifest("cross", &sb, OCI_MANIFEST, &one.manifest).await;
        let index = |child: &PushedImage| {
            serde_json::to_vec(&serde_json::json!({
                "schemaVersion": 2, "mediaType": OCI_INDEX,
                "manifests": [{"mediaType": OCI_MANIFEST, "digest": child.digest.as_str(), "size": child.manifest.len()}],
            }))
            .unwrap()
        };
        let (i1, i2) = (index(&one), index(&two));
        let (r1, r2) = tokio::join!(
            reg.put_manifest("cross", &sa, OCI_INDEX, &i1),
            reg.put_manifest("cross", &sb, OCI_INDEX, &i2)
        );
        assert_eq!(r1.status(), 201, "round {round}: {:?}", r1.text().await);
        assert_eq!(r2.status(), 201, "round {round}: {:?}", r2.text().await);
    }
    if reg.on_postgres() {
        assert_eq!(deadlocks(&reg).await, before, "PostgreSQL detected deadlocks");
    }
});

// Several clients create the same new tag at once: the history must show one creation and
// then one move per later writer, each from the digest the tag really pointed at.
backend_test!(concurrent_creations_of_a_tag_record_every_move, |reg| {
    let mut images = Vec::new();
    for i in 0..4u64 {
        images.push(reg.push_image("race", &format!("base{i}"), 1100 + i).await);
    }
    let repo = RepoName::parse("race").unwrap();
    for round in 0..8 {
        let tag = format!("new{round}");
        let results =
            join_all(images.iter().map(|img| reg.put_manifest("race", &tag, OCI_MANIFEST, &img.manifest)))
                .await;
        for r in results {
            assert_eq!(r.status(), 201);
        }
        let history = reg.app.registry.meta().tag_history(&repo, &Tag::parse(&tag).unwrap()).await.unwrap();
        assert_eq!(history.len(), images.len(), "one entry per writer: {history:?}");
        assert_eq!(history[0].old_digest, None, "{history:?}");
        for pair in history.windows(2) {
            assert_eq!(
                pair[1].old_digest, pair[0].new_digest,
                "each move starts where the last ended: {history:?}"
            );
        }
        let last = history.last().unwrap().new_digest.clone().unwrap();
        let res = reg.get(&format!("/v2/race/manifests/{tag}")).await;
        assert_eq!(header(&res, "docker-content-digest"), Some(last.as_str()));
    }
});
