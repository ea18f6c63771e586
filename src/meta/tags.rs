//! Tags — mutable names for manifests, kept apart from them — and the history of every move.

use sqlx::AnyConnection;

use super::events::NewEvent;
use crate::events;

use super::{Dialect, MetaStore, Result};
use crate::meta::TagMove;
use crate::oci::{Digest, RepoName, Tag};
use crate::retention::ImmutableTags;

/// A condition on a tag write, from `If-Match` / `If-None-Match`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TagCondition<'a> {
    /// Write whatever the tag points at now.
    Always,
    /// Create the tag only if it does not exist (`If-None-Match: *`).
    IfAbsent,
    /// Move or delete the tag only if it points at this digest now (`If-Match`).
    IfPointsAt(&'a Digest),
    /// A pull-through cache's tag: written only while the cache's resolution of it (`proxy_tags`)
    /// still names the manifest — read under a share lock before the tag row, so a tag deleted
    /// or moved upstream meanwhile is not written back by a fill that read it earlier. The check
    /// is `put_manifest`'s; to the tag row itself it is [`TagCondition::Always`].
    IfCacheResolves,
}

impl TagCondition<'_> {
    /// Whether a tag currently at `current` satisfies the condition.
    pub(super) fn holds(&self, current: Option<&str>) -> bool {
        match self {
            TagCondition::Always => true,
            TagCondition::IfAbsent => current.is_none(),
            TagCondition::IfPointsAt(d) => current == Some(d.as_str()),
            TagCondition::IfCacheResolves => true,
        }
    }
}

/// What a tag write did.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum TagOutcome {
    /// The tag now points at the manifest (the move is in the history). `moved_from`: the
    /// manifest it pointed at, whose review is left to the caller when it defers reviews.
    Set { moved_from: Option<i64> },
    /// It pointed there already.
    Unchanged,
    /// The condition did not hold; nothing changed. `current` is where the tag points.
    Precondition {
        /// The digest the tag points at, if it exists.
        current: Option<String>,
    },
    /// The tag is immutable; nothing changed. The refusal names the rule.
    Immutable(String),
}

/// The per-transaction context of tag writes: the row lock clause for the tag row `t`, and when
/// a manifest a tag moves away from is to be reviewed by the collector.
#[derive(Debug, Clone)]
pub(super) struct TagCtx {
    pub lock: String,
    pub untagged_review_at: i64,
    pub immutable: std::sync::Arc<ImmutableTags>,
    /// The bulk restore the transaction's tag writes belong to (recorded in the history).
    pub bulk_restore: Option<i64>,
    /// Whether the caller queues the reviews of manifests its tag writes move away from itself
    /// (returned in [`TagOutcome::Set`]), after all its tag writes, in id order.
    pub defer_reviews: bool,
}

/// One tag write: point `tag` of repository `repo_id` at a manifest.
pub(super) struct TagWrite<'a> {
    pub repo_id: i64,
    pub repo: &'a str,
    pub tag: &'a Tag,
    pub manifest_id: i64,
    pub digest: &'a Digest,
    pub actor: Option<&'a str>,
    pub now: i64,
    /// What the history calls it: push, restore or revert.
    pub kind: &'a str,
    pub condition: TagCondition<'a>,
}

impl MetaStore {
    /// The tag-write context of a transaction starting at `now`.
    pub(super) fn tag_ctx(&self, now: i64) -> TagCtx {
        TagCtx {
            lock: self.update_lock_of("t"),
            untagged_review_at: now.saturating_add(self.windows().untagged_grace_ms),
            immutable: self.immutable.clone(),
            bulk_restore: None,
            defer_reviews: false,
        }
    }

    /// Why tag `tag` of repository `repo` may not be moved or deleted now: `None` when no
    /// immutability rule covers it, or when an administrator lifted it — the lift is used up by
    /// this change (undone with the transaction if the change does not happen).
    pub(super) async fn immutable_refusal(
        tx: &mut AnyConnection,
        immutable: &ImmutableTags,
        repo_id: i64,
        repo: &str,
        tag: &str,
        now: i64,
    ) -> Result<Option<String>, sqlx::Error> {
        let Some(rule) = immutable.rule_for(repo, tag) else { return Ok(None) };
        let lifted =
            sqlx::query("DELETE FROM tag_unlocks WHERE repository_id = $1 AND tag = $2 AND until >= $3")
                .bind(repo_id)
                .bind(tag)
                .bind(now)
                .execute(&mut *tx)
                .await?;
        if lifted.rows_affected() == 1 {
            return Ok(None);
        }
        Ok(Some(format!(
            "tag {tag} in repository {repo} is immutable (rule `{rule}`); an administrator can lift that \
             for one change through the admin API"
        )))
    }

    /// Points a tag at a manifest and records the move in the tag history (nothing when it
    /// points there already). `ctx.lock` is [`MetaStore::update_lock_of`] for the tag row `t`: only
    /// the tag row is locked, never the manifest it pointed at (which other transactions
    /// share-lock as a reference — locking it too let two tagged index pushes deadlock). A tag
    /// that does not exist yet is created by an insert that waits for any concurrent creator, so
    /// of two creators the second sees the first's row and records the move away from it.
    pub(super) async fn set_tag(
        tx: &mut AnyConnection,
        w: &TagWrite<'_>,
        ctx: &TagCtx,
    ) -> Result<TagOutcome, sqlx::Error> {
        let lock = ctx.lock.as_str();
        let current_sql = format!(
            "SELECT t.manifest_id, m.digest FROM tags t JOIN manifests m ON m.id = t.manifest_id \
             WHERE t.repository_id = $1 AND t.name = $2{lock}"
        );
        // `updated_at` is the tag's push time, which retention goes by: a restore puts back the
        // time of the push it restores, so restoring a tag does not make it the newest.
        let pushed_at = if w.kind == "restore" {
            let (last,): (Option<i64>,) = sqlx::query_as(
                "SELECT MAX(at) FROM tag_history WHERE repository_id = $1 AND tag = $2 AND new_digest = $3 \
                 AND COALESCE(kind, 'push') = 'push'",
            )
            .bind(w.repo_id)
            .bind(w.tag.as_str())
            .bind(w.digest.as_str())
            .fetch_one(&mut *tx)
            .await?;
            last.unwrap_or(w.now)
        } else {
            w.now
        };
        let mut moved_from = None;
        let mut left_behind = None;
        let mut attempts = 0;
        loop {
            attempts += 1;
            if attempts > 3 {
                return Err(sqlx::Error::RowNotFound);
            }
            if matches!(
                w.condition,
                TagCondition::Always | TagCondition::IfAbsent | TagCondition::IfCacheResolves
            ) {
                let created: Option<(i64,)> = sqlx::query_as(
                    "INSERT INTO tags (repository_id, name, manifest_id, updated_at) VALUES ($1, $2, $3, $4) \
                     ON CONFLICT (repository_id, name) DO NOTHING RETURNING manifest_id",
                )
                .bind(w.repo_id)
                .bind(w.tag.as_str())
                .bind(w.manifest_id)
                .bind(pushed_at)
                .fetch_optional(&mut *tx)
                .await?;
                if created.is_some() {
                    break;
                }
            }
            let current: Option<(i64, String)> = sqlx::query_as(&current_sql)
                .bind(w.repo_id)
                .bind(w.tag.as_str())
                .fetch_optional(&mut *tx)
                .await?;
            if !w.condition.holds(current.as_ref().map(|(_, d)| d.as_str())) {
                return Ok(TagOutcome::Precondition { current: current.map(|(_, d)| d) });
            }
            // Gone between the two statements (a concurrent tag delete): create it again.
            let Some((current_id, current_digest)) = current else { continue };
            if current_id == w.manifest_id {
                if w.kind == "push" {
                    // Pushed again: retention counts the tag as pushed now.
                    sqlx::query("UPDATE tags SET updated_at = $1 WHERE repository_id = $2 AND name = $3")
                        .bind(w.now)
                        .bind(w.repo_id)
                        .bind(w.tag.as_str())
                        .execute(&mut *tx)
                        .await?;
                }
                return Ok(TagOutcome::Unchanged);
            }
            if let Some(refusal) =
                Self::immutable_refusal(tx, &ctx.immutable, w.repo_id, w.repo, w.tag.as_str(), w.now).await?
            {
                return Ok(TagOutcome::Immutable(refusal));
            }
            sqlx::query(
                "UPDATE tags SET manifest_id = $1, updated_at = $2 WHERE repository_id = $3 AND name = $4",
            )
            .bind(w.manifest_id)
            .bind(pushed_at)
            .bind(w.repo_id)
            .bind(w.tag.as_str())
            .execute(&mut *tx)
            .await?;
            moved_from = Some(current_digest);
            left_behind = Some(current_id);
            // The manifest left behind may now be garbage, once its grace has passed.
            if !ctx.defer_reviews {
                Self::enqueue(tx, super::gc::Review::Manifest(current_id), ctx.untagged_review_at).await?;
            }
            break;
        }
        let new = Some(w.digest.as_str());
        Self::record_tag_move(
            tx,
            w.repo_id,
            w.repo,
            w.tag.as_str(),
            moved_from.as_deref(),
            new,
            w.actor,
            w.now,
            w.kind,
            None,
            ctx.bulk_restore,
        )
        .await?;
        Ok(TagOutcome::Set { moved_from: left_behind })
    }

    /// Appends one row to the tag history, and notes the move as an event.
    #[expect(clippy::too_many_arguments, reason = "the row's columns")]
    pub(super) async fn record_tag_move(
        tx: &mut AnyConnection,
        repo_id: i64,
        repo: &str,
        tag: &str,
        old_digest: Option<&str>,
        new_digest: Option<&str>,
        actor: Option<&str>,
        now: i64,
        kind: &str,
        delete_id: Option<i64>,
        bulk_restore: Option<i64>,
    ) -> Result<(), sqlx::Error> {
        sqlx::query(
            "INSERT INTO tag_history (repository_id, tag, old_digest, new_digest, actor, at, kind, delete_id, \
             bulk_restore_id) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
        )
        .bind(repo_id)
        .bind(tag)
        .bind(old_digest)
        .bind(new_digest)
        .bind(actor)
        .bind(now)
        .bind(kind)
        .bind(delete_id)
        .bind(bulk_restore)
        .execute(&mut *tx)
        .await?;
        let event_kind = match (kind, new_digest) {
            ("restore", _) => events::TAG_RESTORED,
            ("revert", _) => events::TAG_REVERTED,
            (_, None) => events::TAG_DELETED,
            (_, Some(_)) => events::TAG_SET,
        };
        let mut event = NewEvent::new(event_kind, repo, actor, now).tag(tag);
        event.digest = new_digest.map(str::to_string);
        event.old_digest = old_digest.map(str::to_string);
        if let Some(id) = delete_id {
            event = event.detail("deleteId", id);
        }
        if let Some(id) = bulk_restore {
            event = event.detail("bulkRestoreId", id);
        }
        super::events::record(event);
        Ok(())
    }

    /// Lifts the immutability of tag `tag` of `repo` for one change (a move or a delete) until
    /// `until`, recording the lift in the tag history (kind `unlock`, the reason after the
    /// actor). Returns the digest the tag points at.
    ///
    /// # Errors
    /// [`Refusal::NotFound`] for a tag that does not exist, [`Refusal::Conflict`] for one no
    /// rule makes immutable; [`super::DeleteError::Meta`].
    pub async fn lift_immutability(
        &self,
        repo: &RepoName,
        tag: &Tag,
        until: i64,
        actor: Option<&str>,
        reason: &str,
        now: i64,
    ) -> std::result::Result<String, super::DeleteError> {
        use super::Refusal;
        let Some(rule) = self.immutable.rule_for(repo.as_str(), tag.as_str()).map(str::to_string) else {
            return Err(Refusal::Conflict(format!("tag {tag} in repository {repo} is not immutable")).into());
        };
        let current_sql = format!(
            "SELECT t.repository_id, m.digest FROM tags t JOIN manifests m ON m.id = t.manifest_id \
             JOIN repositories r ON r.id = t.repository_id \
             WHERE r.name = $1 AND r.deleted_at IS NULL AND t.name = $2{}",
            self.update_lock_of("t")
        );
        super::transaction!(self, super::DeleteError, |tx| {
            let current: Option<(i64, String)> = sqlx::query_as(&current_sql)
                .bind(repo.as_str())
                .bind(tag.as_str())
                .fetch_optional(&mut *tx)
                .await?;
            let Some((repo_id, digest)) = current else {
                return Err(Refusal::NotFound(format!("tag {tag} not in repository {repo}")).into());
            };
            sqlx::query(
                "INSERT INTO tag_unlocks (repository_id, tag, until, actor, reason) VALUES ($1, $2, $3, $4, $5) \
                 ON CONFLICT (repository_id, tag) DO UPDATE SET until = excluded.until, actor = excluded.actor, \
                 reason = excluded.reason",
            )
            .bind(repo_id)
            .bind(tag.as_str())
            .bind(until)
            .bind(actor)
            .bind(reason)
            .execute(&mut *tx)
            .await?;
            let note =
                format!("rule `{rule}` lifted for one change until {}: {reason}", crate::time::utc(until));
            sqlx::query(
                "INSERT INTO tag_history (repository_id, tag, old_digest, new_digest, actor, at, kind, note) \
                 VALUES ($1, $2, $3, $3, $4, $5, 'unlock', $6)",
            )
            .bind(repo_id)
            .bind(tag.as_str())
            .bind(&digest)
            .bind(actor)
            .bind(now)
            .bind(&note)
            .execute(&mut *tx)
            .await?;
            super::events::record(
                NewEvent::new(events::TAG_UNLOCKED, repo.as_str(), actor, now)
                    .tag(tag.as_str())
                    .digest(&digest)
                    .detail("rule", rule.as_str())
                    .detail("until", until)
                    .detail("reason", reason),
            );
            Ok(digest)
        })
    }

    /// Every move of `tag` in `repo`, oldest first.
    ///
    /// # Errors
    /// [`super::Error::Database`].
    pub async fn tag_history(&self, repo: &RepoName, tag: &Tag) -> Result<Vec<TagMove>> {
        self.history(repo, Some(tag)).await
    }

    /// Every tag move in `repo` (of `tag` only, if given), oldest first.
    ///
    /// # Errors
    /// [`super::Error::Database`].
    pub async fn history(&self, repo: &RepoName, tag: Option<&Tag>) -> Result<Vec<TagMove>> {
        Ok(sqlx::query_as(
            "SELECT h.tag, h.old_digest, h.new_digest, COALESCE(h.actor, 'anonymous') AS actor, h.at, COALESCE(h.kind, 'push') AS kind, h.note, \
             h.bulk_restore_id AS bulk_restore \
             FROM tag_history h JOIN repositories r ON r.id = h.repository_id \
             WHERE r.name = $1 AND ($2 IS NULL OR h.tag = $2) ORDER BY h.id",
        )
        .bind(repo.as_str())
        .bind(tag.map(Tag::as_str))
        .fetch_all(&self.read)
        .await?)
    }

    /// Tags of `repo` after `last` in byte order, at most `limit`; `None` if the repository does
    /// not exist.
    ///
    /// # Errors
    /// [`super::Error::Database`].
    pub async fn list_tags(
        &self,
        repo: &RepoName,
        last: Option<&str>,
        limit: i64,
    ) -> Result<Option<Vec<String>>> {
        // One row holding the whole page, newline-separated (tags cannot contain newlines):
        // decoding thousands of rows one by one costs far more than the query.
        // Tags on tombstones are never listed (deletes remove them in the same transaction; the
        // anti-join keeps that true whatever wrote the rows). The repository is a scalar
        // subquery so that both databases walk the (repository, name) index in order and stop
        // after the page; a join let PostgreSQL hash and sort every tag of the repository.
        let page = "SELECT t.name FROM tags t \
                    WHERE t.repository_id = (SELECT id FROM repositories WHERE name = $1) AND t.name > $2 \
                    AND NOT EXISTS (SELECT 1 FROM manifests m WHERE m.id = t.manifest_id AND m.deleted_at IS NOT NULL) \
                    ORDER BY t.name LIMIT $3";
        let sql = match self.dialect {
            // The page comes out of the (repository, name) index in order; an ORDER BY inside
            // the aggregate would sort it again through a temporary b-tree (most of the cost of
            // a 10,000-tag list). The order is checked below instead.
            Dialect::Sqlite => format!("SELECT group_concat(name, char(10)) FROM ({page})"),
            Dialect::Postgres => {
                format!("SELECT string_agg(name, E'\\n' ORDER BY name COLLATE \"C\") FROM ({page}) AS page")
            }
        };
        let (joined,): (Option<String>,) = sqlx::query_as(&sql)
            .bind(repo.as_str())
            .bind(last.unwrap_or(""))
            .bind(limit)
            .fetch_one(&self.read)
            .await?;
        let mut tags: Vec<String> =
            joined.map(|j| j.split('\n').map(str::to_string).collect()).unwrap_or_default();
        // Byte order whatever the aggregate did; linear for input already in order.
        tags.sort_unstable();
        if tags.is_empty() && !self.repository_exists(repo).await? {
            return Ok(None);
        }
        Ok(Some(tags))
    }
}
