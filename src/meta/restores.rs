//! Restores: everything that makes a tombstone live again — a restore by digest, of a tag, of a
//! whole repository, and the time machine's revert.
//!
//! The revive rule has one home, [`MetaStore::revive`], and every restore goes through it. Lock,
//! then check, like a push: the manifest rows it may bring back are locked `FOR UPDATE` (an
//! index's children before the index, the order pushes and the collector take them in), their
//! state is read in later statements (which see whatever a purge, delete or collection committed
//! while this transaction waited), and the blob links each revived manifest relies on are
//! locked before they are counted, so no unlink or purge can remove them before commit.
//! A manifest comes back only with everything it references: its deleted children come back with
//! it (each checked the same way), and anything that cannot come back refuses the whole restore,
//! naming it.

use sqlx::AnyConnection;

use super::deletes::{AffectedManifest, DeleteError, DeleteResult, Refusal, Target, refuse};
use super::events::NewEvent;
use super::tags::{TagCondition, TagCtx, TagOutcome, TagWrite};
use super::{Error, MetaStore, transaction};
use crate::oci::{Digest, RepoName, Tag};

/// How deep an index may nest indexes before a restore gives up (content addressing makes a
/// cycle impossible; this bounds a corrupt database).
pub(super) const MAX_DEPTH: usize = 16;

/// The statements and tag context of one restore transaction (they differ by dialect).
pub(super) struct Revive {
    /// Finds a repository by name (live or deleted) and locks its row against deletes,
    /// restores and pushes.
    pub lock_repository: String,
    /// Locks one manifest row by id for update.
    pub lock_manifest: String,
    /// The clause that locks a manifest row for update (empty on SQLite).
    pub lock_manifest_suffix: String,
    /// The clause that share-locks the link rows (`rb`) a revive relies on.
    pub link_lock: &'static str,
    /// The clause that locks them exclusively, when some are hidden (the revive un-hides them).
    pub hidden_link_lock: &'static str,
    pub tag: TagCtx,
    /// A bulk restore's selected deletes: only tombstones they made come back (a tombstone of
    /// another delete — made after the selection, say — is a conflict), and a tag changed since
    /// its delete comes back only with `take_tags`. `None` for a single restore.
    pub selected: Option<std::sync::Arc<std::collections::HashSet<i64>>>,
}

/// Which tags a revived manifest gets back.
#[derive(Debug, Clone, Copy)]
pub(super) enum TagsBack {
    /// The tags its delete removed (a restore by digest or of a repository).
    Deleted {
        /// Move a tag pushed again since back (else that is a conflict).
        take_tags: bool,
    },
    /// None of its own: the caller points one tag at it (a tag restore or revert). Children
    /// brought back with it still get theirs.
    Named,
}

/// What became of a tag since a delete removed it (bulk restores).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum SinceDelete {
    /// Nothing: the delete is the last thing that happened to it.
    Untouched,
    /// Pushed again since; `take_tags` moves it back.
    TakenBack,
    /// A newer delete of it is selected too, and decides.
    LeftAlone,
}

/// The state of a locked manifest row: deleted_at, delete_id, deleted_why, unrestorable.
type RowState = (Option<i64>, Option<i64>, Option<String>, Option<String>);

impl MetaStore {
    pub(super) fn revive_ctx(&self, now: i64) -> Revive {
        Revive {
            lock_repository: format!("SELECT id FROM repositories WHERE name = $1{}", self.repository_lock()),
            lock_manifest: format!(
                "SELECT id FROM manifests WHERE id = $1{}",
                self.update_lock_of("manifests")
            ),
            lock_manifest_suffix: self.update_lock_of("manifests"),
            link_lock: match self.dialect {
                super::Dialect::Sqlite => "",
                super::Dialect::Postgres => " FOR SHARE",
            },
            hidden_link_lock: match self.dialect {
                super::Dialect::Sqlite => "",
                super::Dialect::Postgres => " FOR UPDATE",
            },
            tag: self.tag_ctx(now),
            selected: None,
        }
    }

    /// Restores tombstone `digest` of `repo` with the tags its delete removed, the referrers
    /// deleted with it, and every deleted child it lists. A tag pushed again since is a conflict
    /// unless `take_tags`, which moves it back.
    ///
    /// # Errors
    /// [`Refusal::NotFound`] (no such manifest), [`Refusal::Conflict`] (it is not deleted, it or
    /// a child cannot be restored, or a tag moved since); [`DeleteError::Meta`].
    pub async fn restore_manifest(
        &self,
        repo: &RepoName,
        digest: &Digest,
        take_tags: bool,
        actor: Option<&str>,
        now: i64,
    ) -> DeleteResult<Vec<AffectedManifest>> {
        let c = self.revive_ctx(now);
        transaction!(self, DeleteError, |tx| {
            let Some((repo_id,)) = Self::lock_repository(tx, &c, repo).await? else {
                return refuse(Refusal::NotFound(format!("manifest {digest} not in repository {repo}")));
            };
            let Some(m) = Self::lock_for_revive(tx, &c, repo_id, digest.as_str()).await? else {
                return refuse(Refusal::NotFound(format!("manifest {digest} not in repository {repo}")));
            };
            let mut restored = Vec::new();
            let tags = TagsBack::Deleted { take_tags };
            if !Self::revive(tx, &c, repo, repo_id, &m, tags, actor, now, 0, &mut restored).await? {
                return refuse(Refusal::Conflict(format!(
                    "manifest {digest} in {repo} is not deleted: there is nothing to restore"
                )));
            }
            Self::undelete_repository(tx, repo_id, repo, actor, now).await?;
            Ok(restored)
        })
    }

    /// Restores repository `repo` as its delete left it: every tombstone that delete made, with
    /// its tags. Tags pushed again since are conflicts unless `take_tags`.
    ///
    /// # Errors
    /// [`Refusal::NotFound`] (no such repository), [`Refusal::Conflict`] (it was never deleted,
    /// or a member cannot be restored); [`DeleteError::Meta`].
    pub async fn restore_repository(
        &self,
        repo: &RepoName,
        take_tags: bool,
        actor: Option<&str>,
        now: i64,
    ) -> DeleteResult<Vec<AffectedManifest>> {
        let c = self.revive_ctx(now);
        transaction!(self, DeleteError, |tx| {
            let Some((repo_id,)) = Self::lock_repository(tx, &c, repo).await? else {
                return refuse(Refusal::NotFound(format!("repository {repo} not known to registry")));
            };
            // The latest delete of the whole repository; a push into the name since may have made
            // it live again, and the restore then brings back the rest.
            let (delete_id,): (Option<i64>,) = sqlx::query_as(
                "SELECT MAX(id) FROM deletes WHERE repository_id = $1 AND kind = 'repository'",
            )
            .bind(repo_id)
            .fetch_one(&mut *tx)
            .await?;
            let Some(delete_id) = delete_id else {
                return refuse(Refusal::Conflict(format!(
                    "repository {repo} is not deleted: there is nothing to restore"
                )));
            };
            Self::restore_repository_delete(tx, &c, repo, repo_id, delete_id, take_tags, actor, now).await
        })
    }

    /// Brings back what repository delete `delete_id` of the locked repository `repo_id` took:
    /// every link it hid, every tombstone it made (with its tags), and the repository itself.
    #[expect(clippy::too_many_arguments, reason = "the parts of one restore")]
    pub(super) async fn restore_repository_delete(
        tx: &mut AnyConnection,
        c: &Revive,
        repo: &RepoName,
        repo_id: i64,
        delete_id: i64,
        take_tags: bool,
        actor: Option<&str>,
        now: i64,
    ) -> DeleteResult<Vec<AffectedManifest>> {
        // Every link the delete hid shows again, uploads not yet referenced included: the
        // repository as the delete left it. Links before manifests (docs/design.md, lock order).
        Self::unhide_links(tx, c, repo_id, delete_id).await?;
        let members: Vec<(String,)> = sqlx::query_as(
            "SELECT digest FROM manifests WHERE delete_id = $1 AND deleted_at IS NOT NULL ORDER BY digest",
        )
        .bind(delete_id)
        .fetch_all(&mut *tx)
        .await?;
        let mut restored = Vec::new();
        for (digest,) in members {
            // A member an earlier step brought back (as a child) is live now: revive skips it.
            let Some(m) = Self::lock_for_revive(tx, c, repo_id, &digest).await? else {
                return refuse(Refusal::Conflict(format!(
                    "manifest {digest} of {repo} was collected; the repository cannot be restored whole"
                )));
            };
            let tags = TagsBack::Deleted { take_tags };
            Self::revive(tx, c, repo, repo_id, &m, tags, actor, now, 0, &mut restored).await?;
        }
        Self::undelete_repository(tx, repo_id, repo, actor, now).await?;
        Ok(restored)
    }

    pub(super) async fn lock_repository(
        tx: &mut AnyConnection,
        c: &Revive,
        repo: &RepoName,
    ) -> DeleteResult<Option<(i64,)>> {
        Ok(sqlx::query_as(&c.lock_repository).bind(repo.as_str()).fetch_optional(&mut *tx).await?)
    }

    async fn unhide_links(
        tx: &mut AnyConnection,
        c: &Revive,
        repo_id: i64,
        delete_id: i64,
    ) -> DeleteResult<()> {
        let lock = format!(
            "SELECT blob_id FROM repository_blobs WHERE repository_id = $1 AND hidden_by_delete = $2 \
             ORDER BY blob_id{}",
            c.hidden_link_lock
        );
        let _: Vec<(i64,)> = sqlx::query_as(&lock).bind(repo_id).bind(delete_id).fetch_all(&mut *tx).await?;
        sqlx::query("UPDATE repository_blobs SET hidden_by_delete = NULL WHERE repository_id = $1 AND hidden_by_delete = $2")
            .bind(repo_id)
            .bind(delete_id)
            .execute(&mut *tx)
            .await?;
        Ok(())
    }

    /// Makes repository `repo_id` (`repo`) live again if it was deleted (noting the event).
    pub(super) async fn undelete_repository(
        tx: &mut AnyConnection,
        repo_id: i64,
        repo: &RepoName,
        actor: Option<&str>,
        now: i64,
    ) -> Result<(), sqlx::Error> {
        // The row is locked by the caller ([`MetaStore::lock_repository`]).
        let back: Option<(Option<i64>,)> =
            sqlx::query_as("SELECT delete_id FROM repositories WHERE id = $1 AND deleted_at IS NOT NULL")
                .bind(repo_id)
                .fetch_optional(&mut *tx)
                .await?;
        let undeleted =
            sqlx::query("UPDATE repositories SET deleted_at = NULL, delete_id = NULL WHERE id = $1 AND deleted_at IS NOT NULL")
                .bind(repo_id)
                .execute(&mut *tx)
                .await?;
        if undeleted.rows_affected() == 1 {
            super::quotas::note(super::quotas::Change::Repository { repo: repo_id, delta: 1 });
        }
        if let Some((delete_id,)) = back {
            let mut event = NewEvent::new(crate::events::REPOSITORY_RESTORED, repo.as_str(), actor, now);
            if let Some(id) = delete_id {
                event = event.detail("deleteId", id);
            }
            super::events::record(event);
        }
        Ok(())
    }

    /// Finds manifest `digest` of repository `repo_id` and locks it with everything a revive of
    /// it could bring back: its children (recursively) before it, as a push and the collector
    /// lock them. `None` when there is no such row.
    pub(super) async fn lock_for_revive(
        tx: &mut AnyConnection,
        c: &Revive,
        repo_id: i64,
        digest: &str,
    ) -> DeleteResult<Option<Target>> {
        let found: Option<(i64,)> =
            sqlx::query_as("SELECT id FROM manifests WHERE repository_id = $1 AND digest = $2")
                .bind(repo_id)
                .bind(digest)
                .fetch_optional(&mut *tx)
                .await?;
        let Some((id,)) = found else { return Ok(None) };
        let mut tree = Vec::new();
        Self::tree_of(tx, id, 0, &mut tree).await?;
        // Links before manifests (docs/design.md, lock order): the links every manifest of the
        // tree relies on, in blob order, so an unlink or purge waits for this transaction (or
        // committed first and is seen by `check_links`).
        let ids = tree.iter().map(i64::to_string).collect::<Vec<_>>().join(",");
        // Exclusively when a repository delete hid some (the revive un-hides them): no link can
        // be hidden meanwhile, as hiding takes the repository row every revive has locked.
        let hidden: Option<(i64,)> = sqlx::query_as(&format!(
            "SELECT blob_id FROM repository_blobs WHERE repository_id = $1 AND hidden_by_delete IS NOT NULL \
             AND blob_id IN (SELECT blob_id FROM manifest_blobs WHERE manifest_id IN ({ids})) LIMIT 1"
        ))
        .bind(repo_id)
        .fetch_optional(&mut *tx)
        .await?;
        let links = format!(
            "SELECT rb.blob_id FROM repository_blobs rb WHERE rb.repository_id = $1 AND rb.blob_id IN \
             (SELECT blob_id FROM manifest_blobs WHERE manifest_id IN ({ids})) ORDER BY rb.blob_id{}",
            if hidden.is_some() { c.hidden_link_lock } else { c.link_lock }
        );
        let _: Vec<(i64,)> = sqlx::query_as(&links).bind(repo_id).fetch_all(&mut *tx).await?;
        for m in &tree {
            let locked: Option<(i64,)> =
                sqlx::query_as(&c.lock_manifest).bind(m).fetch_optional(&mut *tx).await?;
            if locked.is_none() && *m == id {
                return Ok(None);
            }
        }
        Ok(Some(Target { id, digest: digest.to_string() }))
    }

    /// Appends manifest `id` to `tree` after its children, recursively (the order they are
    /// locked in).
    pub(super) async fn tree_of(
        tx: &mut AnyConnection,
        id: i64,
        depth: usize,
        tree: &mut Vec<i64>,
    ) -> DeleteResult<()> {
        if depth > MAX_DEPTH {
            return refuse(Refusal::Conflict(format!(
                "manifest row {id}: indexes nested too deep to restore"
            )));
        }
        let children: Vec<(i64,)> =
            sqlx::query_as("SELECT child_id FROM manifest_children WHERE parent_id = $1 ORDER BY child_id")
                .bind(id)
                .fetch_all(&mut *tx)
                .await?;
        for (child,) in children {
            Box::pin(Self::tree_of(tx, child, depth + 1, tree)).await?;
        }
        if !tree.contains(&id) {
            tree.push(id);
        }
        Ok(())
    }

    /// Brings locked manifest `m` back to life with everything it needs, or refuses naming what
    /// cannot come back. Returns false (and changes nothing) when it is live already. The
    /// manifests brought back, with the tags they got back, are appended to `restored`.
    #[expect(clippy::too_many_arguments, reason = "the parts of one restore")]
    pub(super) async fn revive(
        tx: &mut AnyConnection,
        c: &Revive,
        repo: &RepoName,
        repo_id: i64,
        m: &Target,
        tags: TagsBack,
        actor: Option<&str>,
        now: i64,
        depth: usize,
        restored: &mut Vec<AffectedManifest>,
    ) -> DeleteResult<bool> {
        let digest = &m.digest;
        // Read after the lock: a purge, delete or collection that committed while this
        // transaction waited is seen here.
        let state: Option<RowState> = sqlx::query_as(
            "SELECT deleted_at, delete_id, deleted_why, unrestorable FROM manifests WHERE id = $1",
        )
        .bind(m.id)
        .fetch_optional(&mut *tx)
        .await?;
        let Some((deleted_at, delete_id, why, unrestorable)) = state else {
            return refuse(Refusal::Conflict(format!("manifest {digest} of {repo} was collected")));
        };
        if deleted_at.is_none() {
            return Ok(false);
        }
        if let Some(reason) = unrestorable {
            return refuse(Refusal::Conflict(format!(
                "manifest {digest} in {repo} cannot be restored: {reason}"
            )));
        }
        if let Some(selected) = &c.selected
            && !delete_id.is_some_and(|d| selected.contains(&d))
        {
            return refuse(Refusal::Conflict(format!(
                "manifest {digest} in {repo} was deleted by delete {}, which this restore does not select",
                delete_id.unwrap_or_default()
            )));
        }
        Self::check_links(tx, repo, repo_id, m).await?;
        // An index needs its children: each deleted one comes back too (checked the same way),
        // or the whole restore is refused. They were locked with it. (A collected child took its
        // `manifest_children` row with it and marked this tombstone unrestorable, refused above.)
        let children: Vec<(i64, String)> = sqlx::query_as(
            "SELECT c.id, c.digest FROM manifest_children mc JOIN manifests c ON c.id = mc.child_id \
             WHERE mc.parent_id = $1 ORDER BY c.digest",
        )
        .bind(m.id)
        .fetch_all(&mut *tx)
        .await?;
        if depth > MAX_DEPTH {
            return refuse(Refusal::Conflict(format!(
                "manifest {digest} in {repo}: indexes nested too deep"
            )));
        }
        for (id, child) in children {
            let child = Target { id, digest: child };
            let back = TagsBack::Deleted { take_tags: matches!(tags, TagsBack::Deleted { take_tags: true }) };
            Box::pin(Self::revive(tx, c, repo, repo_id, &child, back, actor, now, depth + 1, restored))
                .await?;
        }
        let revived = sqlx::query(
            "UPDATE manifests SET deleted_at = NULL, delete_id = NULL, deleted_why = NULL \
             WHERE id = $1 AND deleted_at IS NOT NULL AND unrestorable IS NULL",
        )
        .bind(m.id)
        .execute(&mut *tx)
        .await?;
        if revived.rows_affected() != 1 {
            // Cannot happen under the lock; refuse rather than report a restore that did not happen.
            return refuse(Refusal::Conflict(format!(
                "manifest {digest} of {repo} changed during the restore"
            )));
        }
        // Its blobs show in the repository again if a repository delete hid their links (then
        // they were locked exclusively with the tree; otherwise this touches no row).
        sqlx::query(
            "UPDATE repository_blobs SET hidden_by_delete = NULL WHERE repository_id = $1 \
             AND hidden_by_delete IS NOT NULL AND blob_id IN (SELECT blob_id FROM manifest_blobs WHERE manifest_id = $2)",
        )
        .bind(repo_id)
        .bind(m.id)
        .execute(&mut *tx)
        .await?;
        let mut event =
            NewEvent::new(crate::events::MANIFEST_RESTORED, repo.as_str(), actor, now).digest(digest);
        if let Some(d) = delete_id {
            event = event.detail("deleteId", d);
        }
        if let Some(b) = c.tag.bulk_restore {
            event = event.detail("bulkRestoreId", b);
        }
        super::events::record(event);
        let mut back = Vec::new();
        if let (TagsBack::Deleted { take_tags }, Some(d)) = (tags, delete_id) {
            back = Self::restore_tags(tx, c, repo, repo_id, m, d, take_tags, actor, now).await?;
        }
        restored.push(AffectedManifest { repository: repo.to_string(), digest: digest.clone(), tags: back });
        // Referrers deleted together with it come back with it (a signature with its image).
        if why.as_deref() == Some("deleted")
            && let Some(d) = delete_id
        {
            let referrers: Vec<(String,)> = sqlx::query_as(
                "SELECT digest FROM manifests WHERE delete_id = $1 AND deleted_why = 'subject' \
                 AND deleted_at IS NOT NULL AND repository_id = $2 ORDER BY digest",
            )
            .bind(d)
            .bind(repo_id)
            .fetch_all(&mut *tx)
            .await?;
            for (referrer,) in referrers {
                if let Some(r) = Self::lock_for_revive(tx, c, repo_id, &referrer).await? {
                    let back = TagsBack::Deleted {
                        take_tags: matches!(tags, TagsBack::Deleted { take_tags: true }),
                    };
                    Box::pin(Self::revive(tx, c, repo, repo_id, &r, back, actor, now, depth + 1, restored))
                        .await?;
                }
            }
        }
        Ok(true)
    }

    /// Refuses unless every blob manifest `m` references is still linked in the repository (the
    /// links were locked by [`MetaStore::lock_for_revive`], so an unlink or purge waits for
    /// this transaction, and one that committed first is seen here).
    async fn check_links(
        tx: &mut AnyConnection,
        repo: &RepoName,
        repo_id: i64,
        m: &Target,
    ) -> DeleteResult<()> {
        let missing: Option<(String,)> = sqlx::query_as(
            "SELECT b.digest FROM manifest_blobs mb JOIN blobs b ON b.id = mb.blob_id WHERE mb.manifest_id = $1 \
             AND NOT EXISTS (SELECT 1 FROM repository_blobs rb WHERE rb.repository_id = $2 AND rb.blob_id = mb.blob_id) \
             LIMIT 1",
        )
        .bind(m.id)
        .bind(repo_id)
        .fetch_optional(&mut *tx)
        .await?;
        if let Some((blob,)) = missing {
            return refuse(Refusal::Conflict(format!(
                "manifest {} in {repo} cannot be restored: blob {blob} is no longer in the repository",
                m.digest
            )));
        }
        Ok(())
    }

    /// Puts back the tags delete `delete_id` took from manifest `m`. In a bulk restore, a tag
    /// written since the delete comes back only if it was pushed again and `take_tags` (a tag
    /// deleted again since makes the restore a conflict), and one a newer selected delete also
    /// took is left to that delete.
    #[expect(clippy::too_many_arguments, reason = "the parts of one restore")]
    pub(super) async fn restore_tags(
        tx: &mut AnyConnection,
        c: &Revive,
        repo: &RepoName,
        repo_id: i64,
        m: &Target,
        delete_id: i64,
        take_tags: bool,
        actor: Option<&str>,
        now: i64,
    ) -> DeleteResult<Vec<String>> {
        let names: Vec<(String,)> = sqlx::query_as(
            "SELECT DISTINCT tag FROM tag_history WHERE delete_id = $1 AND old_digest = $2 AND kind = 'delete' \
             AND repository_id = $3 ORDER BY tag",
        )
        .bind(delete_id)
        .bind(&m.digest)
        .bind(repo_id)
        .fetch_all(&mut *tx)
        .await?;
        let digest = stored_digest(&m.digest)?;
        let mut restored = Vec::new();
        for (name,) in names {
            let Ok(tag) = Tag::parse(&name) else { continue };
            let mut condition = if take_tags { TagCondition::Always } else { TagCondition::IfAbsent };
            if c.selected.is_some() {
                let current = Self::current_tag(tx, c, repo_id, &tag).await?;
                if current.as_deref() == Some(m.digest.as_str()) {
                    continue;
                }
                let since = Self::tag_since_delete(tx, c, repo, repo_id, &tag, current, delete_id, take_tags);
                match since.await? {
                    SinceDelete::Untouched => {}
                    SinceDelete::TakenBack => condition = TagCondition::Always,
                    SinceDelete::LeftAlone => continue,
                }
            }
            let write = TagWrite {
                repo_id,
                repo: repo.as_str(),
                tag: &tag,
                manifest_id: m.id,
                digest: &digest,
                actor,
                now,
                kind: "restore",
                condition,
            };
            match Self::set_tag(tx, &write, &c.tag).await? {
                TagOutcome::Set { .. } | TagOutcome::Unchanged => restored.push(name),
                TagOutcome::Immutable(refusal) => return refuse(Refusal::Immutable(refusal)),
                TagOutcome::Precondition { current } => {
                    return refuse(Refusal::Conflict(format!(
                        "tag {name} was pushed again since the delete and now points at {}; restore with take_tags to move it back",
                        current.unwrap_or_default()
                    )));
                }
            }
        }
        Ok(restored)
    }

    /// Where `tag` of repository `repo_id` points now, its row locked for the write to come.
    pub(super) async fn current_tag(
        tx: &mut AnyConnection,
        c: &Revive,
        repo_id: i64,
        tag: &Tag,
    ) -> DeleteResult<Option<String>> {
        let current_sql = format!(
            "SELECT m.digest FROM tags t JOIN manifests m ON m.id = t.manifest_id \
             WHERE t.repository_id = $1 AND t.name = $2{}",
            c.tag.lock
        );
        let current: Option<(String,)> =
            sqlx::query_as(&current_sql).bind(repo_id).bind(tag.as_str()).fetch_optional(&mut *tx).await?;
        Ok(current.map(|(d,)| d))
    }

    /// In a bulk restore: what became of `tag` (now at `current`, its row locked) since delete
    /// `delete_id` removed it, judged on its history — the rule for every tag a bulk restore puts
    /// back.
    #[expect(clippy::too_many_arguments, reason = "the parts of one restore")]
    pub(super) async fn tag_since_delete(
        tx: &mut AnyConnection,
        c: &Revive,
        repo: &RepoName,
        repo_id: i64,
        tag: &Tag,
        current: Option<String>,
        delete_id: i64,
        take_tags: bool,
    ) -> DeleteResult<SinceDelete> {
        let latest: Option<(Option<i64>, Option<String>)> = sqlx::query_as(
            "SELECT delete_id, kind FROM tag_history WHERE repository_id = $1 AND tag = $2 ORDER BY id DESC LIMIT 1",
        )
        .bind(repo_id)
        .bind(tag.as_str())
        .fetch_optional(&mut *tx)
        .await?;
        let (latest_delete, latest_kind) = latest.unwrap_or_default();
        if latest_delete == Some(delete_id) && latest_kind.as_deref() == Some("delete") {
            return Ok(SinceDelete::Untouched);
        }
        // A newer selected delete of this tag decides where it points (it was judged first, in
        // the same batch: they share the tag's footprint), whatever became of its own restore.
        if let Some(selected) = &c.selected {
            let newer: Vec<(Option<i64>,)> = sqlx::query_as(
                "SELECT delete_id FROM tag_history WHERE repository_id = $1 AND tag = $2 AND kind = 'delete' \
                 AND id > (SELECT MIN(id) FROM tag_history WHERE delete_id = $3 AND tag = $2)",
            )
            .bind(repo_id)
            .bind(tag.as_str())
            .bind(delete_id)
            .fetch_all(&mut *tx)
            .await?;
            if newer.iter().any(|(d,)| d.is_some_and(|d| selected.contains(&d))) {
                return Ok(SinceDelete::LeftAlone);
            }
        }
        match current {
            Some(_) if take_tags => Ok(SinceDelete::TakenBack),
            Some(now_at) => refuse(Refusal::Conflict(format!(
                "tag {tag} was pushed again since the delete and now points at {now_at}; restore with take_tags \
                 to move it back"
            ))),
            None => refuse(Refusal::Conflict(format!(
                "tag {tag} of {repo} was written and deleted again since this delete; that later delete is not \
                 selected"
            ))),
        }
    }

    /// Puts tag `tag` of `repo` back where a tag delete left it (the latest delete of that
    /// tag). The manifest must still be held: live, or a restorable tombstone, which comes back
    /// as a restore by digest would bring it (children, referrers deleted with it) but with
    /// only this tag. Returns the digest the tag points at.
    ///
    /// # Errors
    /// [`Refusal::NotFound`], [`Refusal::Conflict`]; [`DeleteError::Meta`].
    pub async fn restore_tag(
        &self,
        repo: &RepoName,
        tag: &Tag,
        take_tags: bool,
        actor: Option<&str>,
        now: i64,
    ) -> DeleteResult<String> {
        let share = self.share_lock();
        let c = self.revive_ctx(now);
        transaction!(self, DeleteError, |tx| {
            let repo_id = Self::live_repository(tx, repo, share).await?;
            let last: Option<(Option<String>,)> = sqlx::query_as(
                "SELECT old_digest FROM tag_history WHERE repository_id = $1 AND tag = $2 AND kind = 'delete' \
                 ORDER BY id DESC LIMIT 1",
            )
            .bind(repo_id)
            .bind(tag.as_str())
            .fetch_optional(&mut *tx)
            .await?;
            let Some((Some(digest),)) = last else {
                return refuse(Refusal::NotFound(format!("tag {tag} of {repo} was never deleted")));
            };
            let condition = if take_tags { TagCondition::Always } else { TagCondition::IfAbsent };
            Self::point_tag(tx, &c, repo, repo_id, tag, &digest, condition, "restore", actor, now).await?;
            Ok(digest)
        })
    }

    /// The time machine: points `tag` of `repo` at `target` — a digest, the digest the tag
    /// pointed at a moment `at` (Unix ms), or one step back in its history — provided that
    /// manifest is still held (live, or a restorable tombstone, brought back as
    /// [`MetaStore::restore_tag`] brings it). Only a tag with a history can be reverted.
    /// Returns the digest the tag now points at.
    ///
    /// # Errors
    /// [`Refusal::NotFound`] (no such tag, or no such point in its history),
    /// [`Refusal::Conflict`]; [`DeleteError::Meta`].
    pub async fn revert_tag(
        &self,
        repo: &RepoName,
        tag: &Tag,
        target: RevertTarget<'_>,
        actor: Option<&str>,
        now: i64,
    ) -> DeleteResult<String> {
        let share = self.share_lock();
        let c = self.revive_ctx(now);
        transaction!(self, DeleteError, |tx| {
            let repo_id = Self::live_repository(tx, repo, share).await?;
            let (moves,): (i64,) =
                sqlx::query_as("SELECT COUNT(*) FROM tag_history WHERE repository_id = $1 AND tag = $2")
                    .bind(repo_id)
                    .bind(tag.as_str())
                    .fetch_one(&mut *tx)
                    .await?;
            if moves == 0 {
                return refuse(Refusal::NotFound(format!(
                    "tag {tag} of {repo} has no history to revert (push it to create it)"
                )));
            }
            let digest = match target {
                RevertTarget::Digest(d) => Some(d.to_string()),
                RevertTarget::At(at) => {
                    let row: Option<(Option<String>,)> = sqlx::query_as(
                        "SELECT new_digest FROM tag_history WHERE repository_id = $1 AND tag = $2 AND at <= $3 \
                         ORDER BY id DESC LIMIT 1",
                    )
                    .bind(repo_id)
                    .bind(tag.as_str())
                    .bind(at)
                    .fetch_optional(&mut *tx)
                    .await?;
                    row.and_then(|(d,)| d)
                }
                RevertTarget::Previous => {
                    let row: Option<(Option<String>,)> = sqlx::query_as(
                        "SELECT old_digest FROM tag_history WHERE repository_id = $1 AND tag = $2 \
                         ORDER BY id DESC LIMIT 1",
                    )
                    .bind(repo_id)
                    .bind(tag.as_str())
                    .fetch_optional(&mut *tx)
                    .await?;
                    row.and_then(|(d,)| d)
                }
            };
            let Some(digest) = digest else {
                return refuse(Refusal::NotFound(format!("tag {tag} of {repo} pointed at nothing then")));
            };
            Self::point_tag(tx, &c, repo, repo_id, tag, &digest, TagCondition::Always, "revert", actor, now)
                .await?;
            Ok(digest)
        })
    }

    /// Points `tag` at manifest `digest` of the repository if it is still held: live (locked, so
    /// no delete or purge can tombstone it before the tag is written), or a restorable tombstone,
    /// brought back through [`MetaStore::revive`] first.
    #[expect(clippy::too_many_arguments, reason = "the parts of one tag write")]
    pub(super) async fn point_tag(
        tx: &mut AnyConnection,
        c: &Revive,
        repo: &RepoName,
        repo_id: i64,
        tag: &Tag,
        digest: &str,
        condition: TagCondition<'_>,
        kind: &str,
        actor: Option<&str>,
        now: i64,
    ) -> DeleteResult<()> {
        // A live manifest needs only its own row locked (its children are live and its links
        // held while it is); a tombstone is locked with everything a revive may bring back.
        let seen: Option<(i64, Option<i64>)> =
            sqlx::query_as("SELECT id, deleted_at FROM manifests WHERE repository_id = $1 AND digest = $2")
                .bind(repo_id)
                .bind(digest)
                .fetch_optional(&mut *tx)
                .await?;
        // If it turns out deleted meanwhile, the row lock must go before the revive path locks
        // links (lock order): a savepoint gives it back. A bulk restore locked the links first.
        let give_back = c.selected.is_none() && !c.lock_manifest_suffix.is_empty();
        let live = match seen {
            Some((id, None)) => {
                let noted = super::journal_mark();
                if give_back {
                    sqlx::query("SAVEPOINT point_tag").execute(&mut *tx).await?;
                }
                let locked: Option<(Option<i64>,)> = sqlx::query_as(&format!(
                    "SELECT deleted_at FROM manifests WHERE id = $1{}",
                    c.lock_manifest_suffix
                ))
                .bind(id)
                .fetch_optional(&mut *tx)
                .await?;
                // Still live under the lock (else deleted meanwhile: the revive path decides).
                let live = matches!(locked, Some((None,)));
                if give_back && !live {
                    sqlx::query("ROLLBACK TO SAVEPOINT point_tag").execute(&mut *tx).await?;
                    super::journal_truncate(noted);
                }
                if give_back {
                    sqlx::query("RELEASE SAVEPOINT point_tag").execute(&mut *tx).await?;
                }
                live.then_some(Target { id, digest: digest.to_string() })
            }
            _ => None,
        };
        let m = match live {
            Some(m) => m,
            None => {
                let Some(m) = Self::lock_for_revive(tx, c, repo_id, digest).await? else {
                    return refuse(Refusal::Conflict(format!(
                        "manifest {digest} is no longer held in {repo}"
                    )));
                };
                let mut restored = Vec::new();
                Self::revive(tx, c, repo, repo_id, &m, TagsBack::Named, actor, now, 0, &mut restored).await?;
                m
            }
        };
        let parsed = stored_digest(digest)?;
        let write = TagWrite {
            repo_id,
            repo: repo.as_str(),
            tag,
            manifest_id: m.id,
            digest: &parsed,
            actor,
            now,
            kind,
            condition,
        };
        match Self::set_tag(tx, &write, &c.tag).await? {
            TagOutcome::Precondition { current } => refuse(Refusal::Conflict(format!(
                "tag {tag} exists and points at {}; use take_tags to move it",
                current.unwrap_or_default()
            ))),
            TagOutcome::Immutable(refusal) => refuse(Refusal::Immutable(refusal)),
            TagOutcome::Set { .. } | TagOutcome::Unchanged => Ok(()),
        }
    }
}

/// A digest read back from the store (it was validated on the way in).
fn stored_digest(text: &str) -> Result<Digest, Error> {
    Digest::parse(text).map_err(|e| Error::Database(sqlx::Error::Decode(e.to_string().into())))
}

/// Where the time machine puts a tag.
#[derive(Debug, Clone, Copy)]
pub enum RevertTarget<'a> {
    /// This manifest.
    Digest(&'a Digest),
    /// Where the tag pointed at this moment (Unix ms).
    At(i64),
    /// Where the tag pointed before its latest move.
    Previous,
}
