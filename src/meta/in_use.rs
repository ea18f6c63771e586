//! In-use pins: what sources (clusters, deploy systems) report they run. A pinned manifest is
//! held against the collector, kept by retention (with an index's children), and an explicit
//! delete of it is refused unless forced. A report replaces its source's previous one and lapses
//! at its `expires_at`.
//!
//! Lock, then check: a report share-locks the manifests it pins (and their children, and then
//! their tags) before it writes the pins, so a delete, an untag or a collection that locked one
//! first is seen (the reference is reported unresolved), and one that comes after sees the pin.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use sqlx::AnyConnection;

use super::gc::Review;
use super::{Error, MetaStore, Result, transaction};
use crate::oci::{Reference, RepoName};

/// How deep pins follow an index's children (content addressing makes a cycle impossible; this
/// bounds a corrupt database).
const MAX_DEPTH: usize = 16;

/// What holds a manifest: the source that reported it running, and when.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Pin {
    /// The source.
    pub source: String,
    /// When its report came (Unix ms).
    pub reported_at: i64,
    /// When the report lapses (Unix ms).
    pub expires_at: i64,
}

impl std::fmt::Display for Pin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "in use by {}, reported at {}", self.source, crate::time::utc(self.reported_at))
    }
}

/// One pinned manifest of a report.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, sqlx::FromRow)]
pub struct PinnedImage {
    /// The repository.
    pub repository: String,
    /// The manifest.
    pub digest: String,
    /// The reference as reported (`REPO@DIGEST` or `REPO:TAG`).
    pub reference: String,
}

/// A reference of a report that pins nothing, and why.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Unresolved {
    /// The reference as reported.
    pub reference: String,
    /// Why it pins nothing.
    pub why: String,
}

/// A source's report as stored.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct InUseReport {
    /// The source.
    pub source: String,
    /// When it came (Unix ms).
    pub reported_at: i64,
    /// When it lapses (Unix ms).
    pub expires_at: i64,
    /// Who sent it.
    pub reported_by: Option<String>,
    /// Whether it has lapsed (then it pins nothing).
    pub lapsed: bool,
    /// What it pins.
    pub pinned: Vec<PinnedImage>,
}

/// What a report did.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Reported {
    /// The stored report.
    #[serde(flatten)]
    pub report: InUseReport,
    /// References that pin nothing (no such repository, tag or live manifest).
    pub unresolved: Vec<Unresolved>,
}

impl MetaStore {
    /// Replaces `source`'s report with `references` (repository and tag or digest, as reported),
    /// lapsing at `expires_at`. A tag is resolved to the manifest it points at now; a reference
    /// to no live manifest pins nothing and is returned as unresolved. Manifests the previous
    /// report pinned and this one does not are reviewed again by the collector.
    ///
    /// # Errors
    /// [`Error::Database`].
    pub async fn report_in_use(
        &self,
        source: &str,
        references: &[(RepoName, Reference, String)],
        expires_at: i64,
        actor: Option<&str>,
        now: i64,
    ) -> Result<Reported> {
        let share = self.share_lock();
        transaction!(self, Error, |tx| {
            // The source's row first: two reports of one source (an overlapping cron run) take
            // turns, and the second replaces the first's pins whole.
            sqlx::query(
                "INSERT INTO in_use_reports (source, reported_at, expires_at, reported_by) VALUES ($1, $2, $3, $4) \
                 ON CONFLICT (source) DO UPDATE SET reported_at = excluded.reported_at, \
                 expires_at = excluded.expires_at, reported_by = excluded.reported_by",
            )
            .bind(source)
            .bind(now)
            .bind(expires_at)
            .bind(actor)
            .execute(&mut *tx)
            .await?;
            let before = Self::pinned_by(tx, source).await?;
            // Resolve every reference to a live manifest row (no lock yet: the ids are locked
            // below, in id order, and re-read after).
            let mut wanted: BTreeMap<i64, (String, String, String)> = BTreeMap::new();
            let mut unresolved = Vec::new();
            for (repo, reference, text) in references {
                let row: Option<(i64, String)> = match reference {
                    Reference::Digest(d) => sqlx::query_as(
                        "SELECT m.id, m.digest FROM manifests m JOIN repositories r ON r.id = m.repository_id \
                         WHERE r.name = $1 AND r.deleted_at IS NULL AND m.digest = $2 AND m.deleted_at IS NULL",
                    )
                    .bind(repo.as_str())
                    .bind(d.as_str())
                    .fetch_optional(&mut *tx)
                    .await?,
                    Reference::Tag(t) => sqlx::query_as(
                        "SELECT m.id, m.digest FROM tags t JOIN manifests m ON m.id = t.manifest_id \
                         JOIN repositories r ON r.id = t.repository_id \
                         WHERE r.name = $1 AND r.deleted_at IS NULL AND t.name = $2 AND m.deleted_at IS NULL",
                    )
                    .bind(repo.as_str())
                    .bind(t.as_str())
                    .fetch_optional(&mut *tx)
                    .await?,
                };
                match row {
                    Some((id, digest)) => {
                        wanted.entry(id).or_insert((repo.to_string(), digest, text.clone()));
                    }
                    None => unresolved.push(Unresolved {
                        reference: text.clone(),
                        why: "no such manifest in the registry (or it is deleted)".into(),
                    }),
                }
            }
            // Lock what the pins will hold — the manifests and their children, in id order —
            // then their tags (docs/design.md, lock order), and keep what is still live.
            let ids: Vec<i64> = wanted.keys().copied().collect();
            let tree = Self::with_children(tx, &ids).await?;
            let live = Self::share_lock_live(tx, &tree, share).await?;
            if !live.is_empty() && !share.is_empty() {
                let sql = format!(
                    "SELECT name FROM tags WHERE manifest_id IN ({}) ORDER BY repository_id, name{share}",
                    join_ids(&live.iter().copied().collect::<Vec<_>>())
                );
                sqlx::query(&sql).execute(&mut *tx).await?;
            }
            let mut pinned = Vec::new();
            for (id, (repository, digest, reference)) in wanted {
                if live.contains(&id) {
                    pinned.push(PinnedImage { repository, digest, reference });
                } else {
                    unresolved
                        .push(Unresolved { reference, why: "deleted while it was being reported".into() });
                }
            }
            sqlx::query("DELETE FROM in_use_pins WHERE source = $1").bind(source).execute(&mut *tx).await?;
            let mut seen = BTreeSet::new();
            for p in &pinned {
                if !seen.insert((p.repository.clone(), p.digest.clone())) {
                    continue;
                }
                sqlx::query(
                    "INSERT INTO in_use_pins (source, repository, digest, reference, expires_at) \
                     VALUES ($1, $2, $3, $4, $5)",
                )
                .bind(source)
                .bind(&p.repository)
                .bind(&p.digest)
                .bind(&p.reference)
                .bind(expires_at)
                .execute(&mut *tx)
                .await?;
            }
            // Reviewed again: what is no longer pinned, and what is pinned for less long (the
            // collector may have scheduled it for the old end).
            let released: Vec<(String, String)> = before
                .into_iter()
                .filter(|(k, old_end)| !seen.contains(k) || *old_end > expires_at)
                .map(|(k, _)| k)
                .collect();
            Self::review_released(tx, &released, now).await?;
            let report = InUseReport {
                source: source.to_string(),
                reported_at: now,
                expires_at,
                reported_by: actor.map(str::to_string),
                lapsed: false,
                pinned,
            };
            Ok(Reported { report, unresolved })
        })
    }

    /// Withdraws `source`'s report; what it pinned is reviewed again. Returns whether there was one.
    ///
    /// # Errors
    /// [`Error::Database`].
    pub async fn withdraw_in_use(&self, source: &str, now: i64) -> Result<bool> {
        let lock = self.update_lock_of("in_use_reports");
        transaction!(self, Error, |tx| {
            // The source's row first, as a report takes it.
            sqlx::query(&format!("SELECT source FROM in_use_reports WHERE source = $1{lock}"))
                .bind(source)
                .execute(&mut *tx)
                .await?;
            let before = Self::pinned_by(tx, source).await?;
            let gone = sqlx::query("DELETE FROM in_use_reports WHERE source = $1")
                .bind(source)
                .execute(&mut *tx)
                .await?;
            sqlx::query("DELETE FROM in_use_pins WHERE source = $1").bind(source).execute(&mut *tx).await?;
            let released: Vec<(String, String)> = before.into_keys().collect();
            Self::review_released(tx, &released, now).await?;
            Ok(gone.rows_affected() > 0)
        })
    }

    /// Every report, with what it pins (lapsed ones too, marked).
    ///
    /// # Errors
    /// [`Error::Database`].
    pub async fn in_use_reports(&self, now: i64) -> Result<Vec<InUseReport>> {
        let reports: Vec<(String, i64, i64, Option<String>)> = sqlx::query_as(
            "SELECT source, reported_at, expires_at, reported_by FROM in_use_reports ORDER BY source",
        )
        .fetch_all(&self.read)
        .await?;
        let mut out = Vec::with_capacity(reports.len());
        for (source, reported_at, expires_at, reported_by) in reports {
            let pinned: Vec<PinnedImage> = sqlx::query_as(
                "SELECT repository, digest, reference FROM in_use_pins WHERE source = $1 ORDER BY repository, digest",
            )
            .bind(&source)
            .fetch_all(&self.read)
            .await?;
            out.push(InUseReport {
                source,
                reported_at,
                expires_at,
                reported_by,
                lapsed: expires_at <= now,
                pinned,
            });
        }
        Ok(out)
    }

    /// [`MetaStore::pinned_in`], read outside any transaction (what retention evaluates; its
    /// untags check again under their locks).
    ///
    /// # Errors
    /// [`Error::Database`].
    pub async fn pinned_manifests(&self, repo: &str, repo_id: i64, now: i64) -> Result<HashMap<String, Pin>> {
        let mut conn = self.read.acquire().await?;
        Ok(Self::pinned_in(&mut conn, repo, repo_id, now).await?)
    }

    /// The live pins on manifest `digest` of repository `repo` at `now` (directly, not through an
    /// index), earliest report first.
    pub(super) async fn pins_on(
        tx: &mut AnyConnection,
        repo: &str,
        digest: &str,
        now: i64,
    ) -> Result<Vec<Pin>, sqlx::Error> {
        let rows: Vec<(String, i64, i64)> = sqlx::query_as(
            "SELECT p.source, r.reported_at, p.expires_at FROM in_use_pins p \
             JOIN in_use_reports r ON r.source = p.source \
             WHERE p.repository = $1 AND p.digest = $2 AND p.expires_at > $3 ORDER BY r.reported_at, p.source",
        )
        .bind(repo)
        .bind(digest)
        .bind(now)
        .fetch_all(&mut *tx)
        .await?;
        Ok(rows
            .into_iter()
            .map(|(source, reported_at, expires_at)| Pin { source, reported_at, expires_at })
            .collect())
    }

    /// Every manifest of repository `repo` (id `repo_id`) that a live pin holds at `now` — pinned
    /// itself or listed (at any depth) by a pinned index — by digest, with the pin.
    pub(super) async fn pinned_in(
        tx: &mut AnyConnection,
        repo: &str,
        repo_id: i64,
        now: i64,
    ) -> Result<HashMap<String, Pin>, sqlx::Error> {
        let rows: Vec<(String, String, i64, i64)> = sqlx::query_as(
            "SELECT p.digest, p.source, r.reported_at, p.expires_at FROM in_use_pins p \
             JOIN in_use_reports r ON r.source = p.source \
             WHERE p.repository = $1 AND p.expires_at > $2 ORDER BY r.reported_at DESC, p.source DESC",
        )
        .bind(repo)
        .bind(now)
        .fetch_all(&mut *tx)
        .await?;
        let mut pinned: HashMap<String, Pin> = HashMap::new();
        for (digest, source, reported_at, expires_at) in rows {
            // The earliest report wins (rows come latest first).
            pinned.insert(digest, Pin { source, reported_at, expires_at });
        }
        let mut level: Vec<(String, Pin)> = pinned.iter().map(|(d, p)| (d.clone(), p.clone())).collect();
        for _ in 0..MAX_DEPTH {
            if level.is_empty() {
                break;
            }
            let mut next = Vec::new();
            for batch in level.chunks(500) {
                let by_digest: HashMap<&str, &Pin> = batch.iter().map(|(d, p)| (d.as_str(), p)).collect();
                let sql = format!(
                    "SELECT p.digest, c.digest FROM manifests p JOIN manifest_children mc ON mc.parent_id = p.id \
                     JOIN manifests c ON c.id = mc.child_id WHERE p.repository_id = $1 AND p.deleted_at IS NULL \
                     AND p.digest IN ({})",
                    (0..batch.len()).map(|i| format!("${}", i + 2)).collect::<Vec<_>>().join(", ")
                );
                let mut query = sqlx::query_as::<_, (String, String)>(&sql).bind(repo_id);
                for (d, _) in batch {
                    query = query.bind(d);
                }
                for (parent, child) in query.fetch_all(&mut *tx).await? {
                    if pinned.contains_key(&child) {
                        continue;
                    }
                    if let Some(pin) = by_digest.get(parent.as_str()) {
                        let pin = (*pin).clone();
                        pinned.insert(child.clone(), pin.clone());
                        next.push((child, pin));
                    }
                }
            }
            level = next;
        }
        Ok(pinned)
    }

    /// The (repository, digest) pairs `source` pins now, with the pins' end.
    async fn pinned_by(
        tx: &mut AnyConnection,
        source: &str,
    ) -> Result<BTreeMap<(String, String), i64>, sqlx::Error> {
        let rows: Vec<(String, String, i64)> =
            sqlx::query_as("SELECT repository, digest, expires_at FROM in_use_pins WHERE source = $1")
                .bind(source)
                .fetch_all(&mut *tx)
                .await?;
        Ok(rows.into_iter().map(|(r, d, end)| ((r, d), end)).collect())
    }

    /// Puts the live manifests no longer pinned by a report back on the review queue (queue rows
    /// last): the pin may have been all that held them.
    async fn review_released(
        tx: &mut AnyConnection,
        released: &[(String, String)],
        now: i64,
    ) -> Result<(), sqlx::Error> {
        let mut ids = BTreeSet::new();
        for (repository, digest) in released {
            let row: Option<(i64,)> = sqlx::query_as(
                "SELECT m.id FROM manifests m JOIN repositories r ON r.id = m.repository_id \
                 WHERE r.name = $1 AND m.digest = $2",
            )
            .bind(repository)
            .bind(digest)
            .fetch_optional(&mut *tx)
            .await?;
            ids.extend(row.map(|(id,)| id));
        }
        for id in ids {
            Self::enqueue(tx, Review::Manifest(id), now).await?;
        }
        Ok(())
    }

    /// `ids` and every manifest they list, at any depth.
    async fn with_children(tx: &mut AnyConnection, ids: &[i64]) -> Result<BTreeSet<i64>, sqlx::Error> {
        let mut all: BTreeSet<i64> = ids.iter().copied().collect();
        let mut level: Vec<i64> = ids.to_vec();
        for _ in 0..MAX_DEPTH {
            if level.is_empty() {
                break;
            }
            let mut next = Vec::new();
            for batch in level.chunks(500) {
                let sql = format!(
                    "SELECT child_id FROM manifest_children WHERE parent_id IN ({})",
                    join_ids(batch)
                );
                let children: Vec<(i64,)> = sqlx::query_as(&sql).fetch_all(&mut *tx).await?;
                next.extend(children.into_iter().map(|(c,)| c).filter(|c| all.insert(*c)));
            }
            level = next;
        }
        Ok(all)
    }

    /// Share-locks manifest rows `ids` in id order; returns those that are live.
    async fn share_lock_live(
        tx: &mut AnyConnection,
        ids: &BTreeSet<i64>,
        share: &str,
    ) -> Result<BTreeSet<i64>, sqlx::Error> {
        let mut live = BTreeSet::new();
        let ids: Vec<i64> = ids.iter().copied().collect();
        for batch in ids.chunks(500) {
            let sql =
                format!("SELECT id FROM manifests WHERE id IN ({}) ORDER BY id{share}", join_ids(batch));
            sqlx::query(&sql).execute(&mut *tx).await?;
            // Read after the lock: a delete that committed while this waited is seen.
            let sql =
                format!("SELECT id FROM manifests WHERE id IN ({}) AND deleted_at IS NULL", join_ids(batch));
            let rows: Vec<(i64,)> = sqlx::query_as(&sql).fetch_all(&mut *tx).await?;
            live.extend(rows.into_iter().map(|(id,)| id));
        }
        Ok(live)
    }
}

/// Row ids as an SQL list (integers from the database: nothing to escape).
fn join_ids(ids: &[i64]) -> String {
    ids.iter().map(i64::to_string).collect::<Vec<_>>().join(",")
}
