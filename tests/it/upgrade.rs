//! Rolling upgrades: replicas are upgraded one at a time, so a Berth must keep starting and
//! serving after a newer Berth applied migrations it does not know.

use crate::backend_test;
use crate::harness::*;

backend_test!(an_older_berth_restarts_and_serves_after_a_newer_one_migrated, |reg| {
    let img = reg.push_image("upgrade/app", "v1", 40).await;
    // What a newer Berth's migration leaves: an additive schema change, and a version in the
    // migrations table that this build has never heard of.
    let sql = reg.sql().await;
    sqlx::query("ALTER TABLE manifests ADD COLUMN added_by_a_newer_berth TEXT").execute(&sql).await.unwrap();
    sqlx::query(
        "INSERT INTO _sqlx_migrations (version, description, success, checksum, execution_time) \
         VALUES ($1, $2, $3, $4, $5)",
    )
    .bind(99_990_101_i64)
    .bind("a migration of a newer berth")
    .bind(true)
    .bind(vec![7u8; 48])
    .bind(1_i64)
    .execute(&sql)
    .await
    .unwrap();
    sql.close().await;

    let config = reg.app.config.clone();
    let dir = reg.stop().await;
    let reg = TestRegistry::start_with(config, dir).await;
    let res = reg.get("/v2/upgrade/app/manifests/v1").await;
    assert_eq!(res.status(), 200);
    assert_eq!(res.bytes().await.unwrap(), img.manifest);
    reg.push_image("upgrade/app", "v2", 41).await;
});
