//! Why an item is kept, and when the collector will take it if nothing changes — read from the
//! same rows and with the same deadlines (`gc::blob_grace_end`, `gc::untagged_grace_end`,
//! `gc::restore_window_end`) as the reviews that decide.

use super::gc::{blob_grace_end, restore_window_end, untagged_grace_end};
use super::{MetaStore, Result};
use crate::oci::{Digest, RepoName};
use crate::time::utc;

/// Holds listed per kind at most; the totals are always given.
const LISTED: i64 = 100;

/// One thing that keeps an item.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Hold {
    /// `tag`, `index`, `subject`, `referenced-by`, `restore-window`, `untagged-grace`,
    /// `blob-grace`.
    pub reason: &'static str,
    /// What: the tag, the index or manifest (`REPO@DIGEST`), the window's start.
    pub detail: String,
    /// When this hold ends by itself (Unix ms); absent for holds that last until something
    /// changes (a tag, a live index).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub until: Option<i64>,
}

/// A blob's link into a repository.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct LinkState {
    /// The repository.
    pub repository: String,
    /// Whether a manifest of that repository references the blob (then the link stays).
    pub referenced: bool,
    /// Otherwise, when the link's grace ends.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub until: Option<i64>,
    /// Hidden by a delete of that repository: kept for a restore, not visible there (shown only
    /// when true).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub hidden: bool,
}

/// Why an item is kept and when it goes.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Explanation {
    /// `manifest` or `blob`.
    pub kind: &'static str,
    /// `REPO@DIGEST` or the blob's digest.
    pub subject: String,
    /// `live`, `tombstone`, or `gone` (no row: never stored, or collected).
    pub state: &'static str,
    /// Bytes (a blob's size, a manifest's own size).
    pub size: u64,
    /// Everything that keeps it now.
    pub holds: Vec<Hold>,
    /// Holds beyond those listed (a manifest with thousands of tags, a layer thousands of
    /// images use).
    pub holds_not_listed: u64,
    /// When the collector will take it if nothing changes (Unix ms): `None` while something
    /// holds it that does not end by itself.
    pub collect_at: Option<i64>,
    /// Whether that time has come (it goes with the next collection pass).
    pub due: bool,
    /// When its review is queued for, if one is.
    pub review_at: Option<i64>,
    /// A blob's links into repositories.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub links: Vec<LinkState>,
}

impl Explanation {
    fn gone(kind: &'static str, subject: String) -> Self {
        Explanation {
            kind,
            subject,
            state: "gone",
            size: 0,
            holds: Vec::new(),
            holds_not_listed: 0,
            collect_at: None,
            due: false,
            review_at: None,
            links: Vec::new(),
        }
    }

    /// Sets when it goes: at the latest end of the holds that end by themselves, never while one
    /// that does not holds.
    fn settle(&mut self, now: i64) {
        let forever = self.holds_not_listed > 0 || self.holds.iter().any(|h| h.until.is_none());
        self.collect_at =
            if forever { None } else { Some(self.holds.iter().filter_map(|h| h.until).max().unwrap_or(now)) };
        self.due = self.collect_at.is_some_and(|at| at <= now);
    }
}

impl MetaStore {
    /// Explains manifest `digest` of `repo` at `now`.
    ///
    /// # Errors
    /// [`super::Error::Database`].
    pub async fn explain_manifest(&self, repo: &RepoName, digest: &Digest, now: i64) -> Result<Explanation> {
        let w = self.windows();
        let subject = format!("{repo}@{digest}");
        type Row = (i64, i64, i64, Option<String>, i64, Option<i64>, Option<i64>, Option<String>);
        let row: Option<Row> = sqlx::query_as(
            "SELECT m.id, m.repository_id, m.size, m.subject_digest, m.pushed_at, m.pulled_at, m.deleted_at, \
             m.unrestorable FROM manifests m JOIN repositories r ON r.id = m.repository_id \
             WHERE r.name = $1 AND m.digest = $2",
        )
        .bind(repo.as_str())
        .bind(digest.as_str())
        .fetch_optional(&self.read)
        .await?;
        let Some((id, repo_id, size, subject_digest, pushed_at, pulled_at, deleted_at, unrestorable)) = row
        else {
            return Ok(Explanation::gone("manifest", subject));
        };
        let mut e = Explanation::gone("manifest", subject);
        e.size = size as u64;
        e.review_at = self.review_at("manifest", id).await?;
        if let Some(deleted_at) = deleted_at {
            e.state = "tombstone";
            let end = restore_window_end(deleted_at, unrestorable.is_some(), w.restore_window_ms);
            if let Some(end) = end.filter(|end| *end > now) {
                e.holds.push(Hold {
                    reason: "restore-window",
                    detail: format!("deleted at {}", utc(deleted_at)),
                    until: Some(end),
                });
            }
            e.settle(now);
            return Ok(e);
        }
        e.state = "live";
        let (tag_count,): (i64,) = sqlx::query_as("SELECT COUNT(*) FROM tags WHERE manifest_id = $1")
            .bind(id)
            .fetch_one(&self.read)
            .await?;
        let tags: Vec<(String,)> =
            sqlx::query_as("SELECT name FROM tags WHERE manifest_id = $1 ORDER BY name LIMIT $2")
                .bind(id)
                .bind(LISTED)
                .fetch_all(&self.read)
                .await?;
        e.holds_not_listed = (tag_count - tags.len() as i64).max(0) as u64;
        e.holds.extend(tags.into_iter().map(|(t,)| Hold { reason: "tag", detail: t, until: None }));
        let parents: Vec<(String, Option<i64>, Option<String>)> = sqlx::query_as(
            "SELECT p.digest, p.deleted_at, p.unrestorable FROM manifest_children c \
             JOIN manifests p ON p.id = c.parent_id WHERE c.child_id = $1 ORDER BY p.digest LIMIT $2",
        )
        .bind(id)
        .bind(LISTED)
        .fetch_all(&self.read)
        .await?;
        for (parent, deleted_at, unrestorable) in parents {
            let detail = format!("{repo}@{parent}");
            match deleted_at {
                None => e.holds.push(Hold { reason: "index", detail, until: None }),
                Some(at) => {
                    if let Some(end) = restore_window_end(at, unrestorable.is_some(), w.restore_window_ms)
                        .filter(|end| *end > now)
                    {
                        e.holds.push(Hold {
                            reason: "index",
                            detail: format!("{detail} (deleted)"),
                            until: Some(end),
                        });
                    }
                }
            }
        }
        if let Some(s) = subject_digest {
            let live: Option<(i64,)> = sqlx::query_as(
                "SELECT id FROM manifests WHERE repository_id = $1 AND digest = $2 AND deleted_at IS NULL",
            )
            .bind(repo_id)
            .bind(&s)
            .fetch_optional(&self.read)
            .await?;
            if live.is_some() {
                e.holds.push(Hold { reason: "subject", detail: format!("{repo}@{s}"), until: None });
            }
        }
        let mut conn = self.read.acquire().await?;
        for pin in Self::pins_on(&mut conn, repo.as_str(), digest.as_str(), now).await? {
            e.holds.push(Hold {
                reason: "in-use",
                detail: format!("by {}, reported at {}", pin.source, utc(pin.reported_at)),
                until: Some(pin.expires_at),
            });
        }
        drop(conn);
        let (untagged_at,): (Option<i64>,) =
            sqlx::query_as("SELECT MAX(at) FROM tag_history WHERE repository_id = $1 AND old_digest = $2")
                .bind(repo_id)
                .bind(digest.as_str())
                .fetch_one(&self.read)
                .await?;
        let grace_end = untagged_grace_end(pushed_at, pulled_at, untagged_at, w.untagged_grace_ms);
        // While tagged, the grace that matters starts when the tag goes: not known yet.
        if tag_count == 0 && grace_end > now {
            let since = pushed_at.max(pulled_at.unwrap_or(0)).max(untagged_at.unwrap_or(0));
            e.holds.push(Hold {
                reason: "untagged-grace",
                detail: format!("pushed, pulled or untagged at {}", utc(since)),
                until: Some(grace_end),
            });
        }
        e.settle(now);
        Ok(e)
    }

    /// Explains blob `digest` at `now`.
    ///
    /// # Errors
    /// [`super::Error::Database`].
    pub async fn explain_blob(&self, digest: &Digest, now: i64) -> Result<Explanation> {
        let w = self.windows();
        let row: Option<(i64, i64, i64, Option<i64>)> =
            sqlx::query_as("SELECT id, size, created_at, seen_at FROM blobs WHERE digest = $1")
                .bind(digest.as_str())
                .fetch_optional(&self.read)
                .await?;
        let Some((id, size, created_at, seen_at)) = row else {
            return Ok(Explanation::gone("blob", digest.to_string()));
        };
        let seen_at = seen_at.unwrap_or(0);
        let mut e = Explanation::gone("blob", digest.to_string());
        e.state = "live";
        e.size = size as u64;
        e.review_at = self.review_at("blob", id).await?;
        let (reference_count,): (i64,) =
            sqlx::query_as("SELECT COUNT(*) FROM manifest_blobs WHERE blob_id = $1")
                .bind(id)
                .fetch_one(&self.read)
                .await?;
        // Through the blob's index first (see the blob review).
        let references: Vec<(String, String, Option<i64>, Option<String>)> = sqlx::query_as(
            "SELECT r.name, m.digest, m.deleted_at, m.unrestorable FROM manifest_blobs mb CROSS JOIN manifests m \
             JOIN repositories r ON r.id = m.repository_id \
             WHERE mb.blob_id = $1 AND m.id = mb.manifest_id ORDER BY r.name, m.digest LIMIT $2",
        )
        .bind(id)
        .bind(LISTED)
        .fetch_all(&self.read)
        .await?;
        e.holds_not_listed = (reference_count - references.len() as i64).max(0) as u64;
        let mut referencing_repos = Vec::new();
        for (repo, manifest, deleted_at, unrestorable) in references {
            let detail = format!("{repo}@{manifest}");
            referencing_repos.push(repo);
            match deleted_at {
                None => e.holds.push(Hold { reason: "referenced-by", detail, until: None }),
                // A tombstone holds what it references until it is collected: the end of its
                // restore window (or at once, when it cannot be restored).
                Some(at) => {
                    let until =
                        restore_window_end(at, unrestorable.is_some(), w.restore_window_ms).unwrap_or(now);
                    e.holds.push(Hold {
                        reason: "referenced-by",
                        detail: format!("{detail} (deleted)"),
                        until: Some(until),
                    });
                }
            }
        }
        let links: Vec<(String, i64, Option<i64>)> = sqlx::query_as(
            "SELECT r.name, rb.linked_at, rb.hidden_by_delete FROM repository_blobs rb \
             JOIN repositories r ON r.id = rb.repository_id WHERE rb.blob_id = $1 ORDER BY r.name",
        )
        .bind(id)
        .fetch_all(&self.read)
        .await?;
        let last_link = links.iter().map(|(_, at, _)| *at).max();
        for (repository, linked_at, hidden_by) in links {
            let hidden = hidden_by.is_some();
            let referenced = e.holds_not_listed > 0 || referencing_repos.contains(&repository);
            let until = (!referenced).then(|| linked_at.max(seen_at).saturating_add(w.blob_hold_ms()));
            e.links.push(LinkState { repository, referenced, until, hidden });
        }
        let grace_end = blob_grace_end(created_at, last_link, seen_at, w.blob_hold_ms());
        if grace_end > now {
            let since = created_at.max(last_link.unwrap_or(0)).max(seen_at);
            e.holds.push(Hold {
                reason: "blob-grace",
                detail: format!("uploaded, linked or HEAD at {}", utc(since)),
                until: Some(grace_end),
            });
        }
        e.settle(now);
        Ok(e)
    }

    async fn review_at(&self, kind: &str, id: i64) -> Result<Option<i64>> {
        let row: Option<(i64,)> =
            sqlx::query_as("SELECT review_after FROM gc_reviews WHERE kind = $1 AND item_id = $2")
                .bind(kind)
                .bind(id)
                .fetch_optional(&self.read)
                .await?;
        Ok(row.map(|(at,)| at))
    }
}
