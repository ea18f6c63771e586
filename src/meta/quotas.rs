//! Quota usage (docs/quotas.md): kept by the transactions that change what a scope holds, in
//! those transactions, and checked there.
//!
//! Code that adds or removes a blob link, a blob, a manifest row or a repository notes it with
//! [`note`] as it does; the [`transaction!`](super::transaction) macro gives each attempt a fresh
//! journal and, after the body and before the events, applies it ([`flush`]): per rule whose
//! scope the change touched, the blobs' link counts in the scope (`quota_blobs`, a blob's bytes
//! counted on its first link in the scope and freed with its last), then the usage row
//! (`quota_usage`, updated and read back in one statement). A change that adds to a scope past
//! one of its limits fails the transaction with [`super::Error::Quota`]: nothing of it stays.
//! The rows are locked last but for the event counters (lock order step 7), rules in name order
//! and a rule's blobs in id order, and their holders wait for nothing else but later quota rows
//! and counters: so the collector, which must not wait for rows a push holds, may wait for these.

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};

use sqlx::AnyConnection;

use super::{Error, MetaStore, Result, transaction};
use crate::quota::{Limit, QuotaRefusal, Quotas};

tokio::task_local! {
    static JOURNAL: RefCell<Journal>;
    static OVER_LIMIT: bool;
}

/// What one transaction attempt changed in what scopes hold.
#[derive(Debug, Default)]
struct Journal {
    changes: Vec<Change>,
}

/// One change to what a repository holds.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Change {
    /// A blob link added (`+1`) to or removed (`-1`) from a repository.
    Link { repo: i64, blob: i64, delta: i64 },
    /// A blob row removed with all its links (a purge, a collection).
    BlobRemoved { blob: i64 },
    /// A manifest row of `bytes` inserted (positive) or removed (negative).
    Manifest { repo: i64, bytes: i64 },
    /// A repository made (or made live again: `+1`) or deleted (`-1`).
    Repository { repo: i64, delta: i64 },
}

/// Notes `change` in the journal of the transaction running on this task (outside a write
/// transaction nothing is noted).
pub(crate) fn note(change: Change) {
    let _ = JOURNAL.try_with(|j| j.borrow_mut().changes.push(change));
}

/// Runs `f` letting its transactions take scopes past their limits when `allowed` (a restore an
/// administrator forces); the usage is still kept.
pub(crate) async fn over_limit<F: std::future::Future>(allowed: bool, f: F) -> F::Output {
    OVER_LIMIT.scope(allowed, f).await
}

/// How many changes are noted: a mark to [`truncate`] back to at a savepoint.
pub(crate) fn mark() -> usize {
    JOURNAL.try_with(|j| j.borrow().changes.len()).unwrap_or(0)
}

/// Forgets the changes noted since `mark`: they were rolled back to a savepoint.
pub(crate) fn truncate(mark: usize) {
    let _ = JOURNAL.try_with(|j| j.borrow_mut().changes.truncate(mark));
}

/// Runs one attempt of a write transaction's body with a fresh journal.
pub(crate) async fn journaled<F: std::future::Future>(body: F) -> F::Output {
    JOURNAL.scope(RefCell::new(Journal::default()), body).await
}

/// The quota rules a store enforces, the names of repositories by id (they never change, so a
/// flush need not read them again), and the refusals, for the metrics.
#[derive(Debug, Default)]
pub struct QuotaState {
    quotas: Quotas,
    /// How a flush locks a usage row before it changes the rule's blob rows (PostgreSQL: a key
    /// share, which writers hold together — they queue only at the usage row's update — and
    /// which a count from scratch, taking the row `FOR UPDATE`, waits for; SQLite's one writer
    /// needs none).
    lock: &'static str,
    names: Mutex<HashMap<i64, Arc<str>>>,
    /// Refusals, by rule.
    pub refusals:
        prometheus_client::metrics::family::Family<RuleLabel, prometheus_client::metrics::counter::Counter>,
}

/// The label of a rule's metrics.
#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
pub struct RuleLabel {
    /// The rule's name.
    pub rule: String,
}

/// Names kept at most; past it the map starts again (a registry with more repositories than
/// this pays one statement per flush for the names it misses).
const NAMES_KEPT: usize = 100_000;

impl QuotaState {
    pub(super) fn new(quotas: Quotas, dialect: super::Dialect) -> Self {
        let lock = match dialect {
            super::Dialect::Sqlite => "",
            super::Dialect::Postgres => " FOR KEY SHARE",
        };
        QuotaState { quotas, lock, ..Default::default() }
    }

    /// The rules.
    pub fn quotas(&self) -> &Quotas {
        &self.quotas
    }

    /// The names of `ids`, read for those not known yet.
    async fn names(
        &self,
        tx: &mut AnyConnection,
        ids: &BTreeSet<i64>,
    ) -> Result<HashMap<i64, Arc<str>>, sqlx::Error> {
        let mut found = HashMap::new();
        let mut missing = Vec::new();
        {
            let known = self.names.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            for id in ids {
                match known.get(id) {
                    Some(name) => {
                        found.insert(*id, name.clone());
                    }
                    None => missing.push(*id),
                }
            }
        }
        for chunk in missing.chunks(ID_CHUNK) {
            let sql =
                format!("SELECT id, name FROM repositories WHERE id IN ({})", placeholders(1, chunk.len()));
            let mut q = sqlx::query_as::<_, (i64, String)>(&sql);
            for id in chunk {
                q = q.bind(*id);
            }
            let rows = q.fetch_all(&mut *tx).await?;
            let mut known = self.names.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            if known.len() + rows.len() > NAMES_KEPT {
                known.clear();
            }
            for (id, name) in rows {
                let name: Arc<str> = name.into();
                known.insert(id, name.clone());
                found.insert(id, name);
            }
        }
        Ok(found)
    }
}

/// How many ids one statement binds.
const ID_CHUNK: usize = 500;

fn placeholders(first: usize, n: usize) -> String {
    (first..first + n).map(|i| format!("${i}")).collect::<Vec<_>>().join(", ")
}

/// What one transaction changes in one rule's scope.
#[derive(Debug, Default)]
struct ScopeDelta {
    /// Net link changes per blob, in id order.
    links: BTreeMap<i64, i64>,
    manifest_bytes: i64,
    repositories: i64,
    /// A repository of the scope the change was in (named in a refusal).
    repository: Option<Arc<str>>,
}

/// Applies this attempt's journal to the quota rows and checks the limits: the last statements
/// of the transaction but for the events. A refusal is [`Error::Quota`].
pub(crate) async fn flush(tx: &mut AnyConnection, state: &QuotaState) -> Result<()> {
    let journal = JOURNAL.try_with(|j| std::mem::take(&mut *j.borrow_mut())).unwrap_or_default();
    if journal.changes.is_empty() {
        return Ok(());
    }
    // Blobs removed whole: their rows in every rule, including rules this replica does not know
    // (another replica's configuration, a rule being rolled out) — exact wherever they are kept.
    // The remover holds the blob's row, so no link to it can be added meanwhile.
    let removed: BTreeSet<i64> = journal
        .changes
        .iter()
        .filter_map(|c| match c {
            Change::BlobRemoved { blob } => Some(*blob),
            _ => None,
        })
        .collect();
    let mut freed: BTreeMap<String, i64> = BTreeMap::new();
    for chunk in removed.iter().copied().collect::<Vec<_>>().chunks(ID_CHUNK) {
        let sql =
            format!("SELECT rule, size FROM quota_blobs WHERE blob_id IN ({})", placeholders(1, chunk.len()));
        let mut q = sqlx::query_as::<_, (String, i64)>(&sql);
        for id in chunk {
            q = q.bind(*id);
        }
        for (rule, size) in q.fetch_all(&mut *tx).await? {
            *freed.entry(rule).or_default() += size;
        }
    }
    let quotas = state.quotas();
    if quotas.is_empty() && freed.is_empty() {
        return Ok(());
    }

    let repos: BTreeSet<i64> = journal
        .changes
        .iter()
        .filter_map(|c| match c {
            Change::Link { repo, .. } | Change::Manifest { repo, .. } | Change::Repository { repo, .. } => {
                Some(*repo)
            }
            Change::BlobRemoved { .. } => None,
        })
        .collect();
    let names =
        if quotas.is_empty() || repos.is_empty() { HashMap::new() } else { state.names(tx, &repos).await? };
    let mut deltas: BTreeMap<String, ScopeDelta> = BTreeMap::new();
    for change in &journal.changes {
        let repo = match change {
            Change::Link { blob, .. } if removed.contains(blob) => continue,
            Change::BlobRemoved { .. } => continue,
            Change::Link { repo, .. } | Change::Manifest { repo, .. } | Change::Repository { repo, .. } => {
                *repo
            }
        };
        let Some(name) = names.get(&repo) else { continue };
        for i in quotas.covering(name) {
            let delta = deltas.entry(quotas.rules()[i].name.clone()).or_default();
            delta.repository.get_or_insert_with(|| name.clone());
            match *change {
                Change::Link { blob, delta: n, .. } => *delta.links.entry(blob).or_default() += n,
                Change::Manifest { bytes, .. } => delta.manifest_bytes += bytes,
                Change::Repository { delta: n, .. } => delta.repositories += n,
                Change::BlobRemoved { .. } => {}
            }
        }
    }
    for rule in freed.keys() {
        deltas.entry(rule.clone()).or_default();
    }

    // The usage rows first, in rule order and in one statement (PostgreSQL: locked to commit);
    // then the blob rows; then the usage rows' update (docs/design.md, lock order). The count
    // from scratch takes a usage row exclusively, so it never interleaves with a change to the
    // rule's blob rows. A fixed number of statements, whatever the number of rules.
    let touched: Vec<&String> = deltas.keys().collect();
    let mut kept = lock_usage(tx, &touched, state.lock).await?;
    let missing: Vec<(&str, String)> = touched
        .iter()
        .filter(|r| !kept.contains_key(r.as_str()))
        .filter_map(|r| quotas.rule(r).map(|rule| (r.as_str(), quotas.scope_of(rule))))
        .collect();
    if !missing.is_empty() {
        // A rule new to the database (a replica that has it is starting): its row, uncounted;
        // the count that follows, under this row's lock, takes whatever this transaction commits.
        let values =
            (0..missing.len()).map(|i| format!("(${}, ${}, 0, 0)", 2 * i + 1, 2 * i + 2)).collect::<Vec<_>>();
        let sql = format!(
            "INSERT INTO quota_usage (rule, pattern, bytes, repositories) VALUES {} ON CONFLICT (rule) DO NOTHING",
            values.join(", ")
        );
        let mut q = sqlx::query(&sql);
        for (rule, scope) in &missing {
            q = q.bind(*rule).bind(scope.as_str());
        }
        q.execute(&mut *tx).await?;
        let again: Vec<&String> =
            touched.iter().copied().filter(|r| !kept.contains_key(r.as_str())).collect();
        kept.extend(lock_usage(tx, &again, state.lock).await?);
    }
    // What each rule's scope gains or loses; a rule whose scope here differs from the one its
    // figures were counted for (a configuration being rolled out) takes only what holds in
    // every scope — removed blobs —, and `berth fsck --repair` counts it again once every replica
    // has the new one.
    let mut added: BTreeMap<&str, (i64, i64)> = BTreeMap::new();
    let mut first_links: Vec<(&str, i64, i64)> = Vec::new();
    let mut unlinks: Vec<(&str, i64, i64)> = Vec::new();
    for (rule_name, delta) in &deltas {
        let Some((kept_scope, _)) = kept.get(rule_name.as_str()) else { continue };
        let entry = added.entry(rule_name.as_str()).or_default();
        entry.0 -= freed.get(rule_name).copied().unwrap_or(0);
        let Some(rule) = quotas.rule(rule_name) else { continue };
        if quotas.scope_of(rule) != *kept_scope {
            tracing::warn!(quota = %rule_name, "this replica's scope of the quota differs from the database's; not keeping it");
            continue;
        }
        entry.0 += delta.manifest_bytes;
        entry.1 += delta.repositories;
        for (&blob, &n) in &delta.links {
            match n.cmp(&0) {
                std::cmp::Ordering::Greater => first_links.push((rule_name.as_str(), blob, n)),
                std::cmp::Ordering::Less => unlinks.push((rule_name.as_str(), blob, n)),
                std::cmp::Ordering::Equal => {}
            }
        }
    }
    for (rule, bytes) in add_links(tx, &first_links).await? {
        added.entry(rule).or_default().0 += bytes;
    }
    for (rule, blob, n) in unlinks {
        added.entry(rule).or_default().0 += remove_links(tx, rule, blob, n).await?;
    }
    if !freed.is_empty() {
        delete_removed(tx, &removed).await?;
    }
    added.retain(|_, (bytes, repositories)| *bytes != 0 || *repositories != 0);
    let usage = add_usage(tx, &added).await?;

    let allowed_over = OVER_LIMIT.try_with(|allowed| *allowed).unwrap_or(false);
    for (rule_name, (bytes, repositories)) in added {
        let Some(&(used, held_repositories, counted)) = usage.get(rule_name) else { continue };
        let Some(rule) = quotas.rule(rule_name).filter(|_| counted) else { continue };
        let Some(scope_here) = kept.get(rule_name).map(|(s, _)| s == &quotas.scope_of(rule)) else {
            continue;
        };
        if !scope_here {
            continue;
        }
        let repository =
            deltas.get(rule_name).and_then(|d| d.repository.as_deref()).unwrap_or_default().to_string();
        let refusal = |limit, used: i64, adding: i64, max: u64| QuotaRefusal {
            rule: rule.name.clone(),
            pattern: rule.repositories.as_str().to_string(),
            repository: repository.clone(),
            limit,
            used,
            adding,
            max: i64::try_from(max).unwrap_or(i64::MAX),
            at: super::events::journal_time(),
        };
        if !allowed_over {
            if bytes > 0 && used > i64::try_from(rule.max_bytes).unwrap_or(i64::MAX) {
                return Err(Error::Quota(refusal(Limit::Bytes, used - bytes, bytes, rule.max_bytes)));
            }
            if let Some(max) = rule.max_repositories
                && repositories > 0
                && held_repositories > i64::try_from(max).unwrap_or(i64::MAX)
            {
                return Err(Error::Quota(refusal(
                    Limit::Repositories,
                    held_repositories - repositories,
                    1,
                    max,
                )));
            }
        }
        let warn = rule.warn_bytes();
        if bytes > 0 && used - bytes < warn && used >= warn {
            let mut warned = super::events::NewEvent::new(
                crate::events::QUOTA_WARNED,
                &repository,
                None,
                super::events::journal_time(),
            )
            .detail("rule", rule.name.as_str())
            .detail("repositories", rule.repositories.as_str())
            .detail("max_bytes", rule.max_bytes)
            .detail("warn_at", rule.warn_at);
            warned.size = Some(used);
            super::events::record(warned);
        }
    }
    Ok(())
}

/// Locks the usage rows of `rules` (`lock`), in rule order; their kept scope and whether they
/// were counted, by rule (a rule without a row is absent).
async fn lock_usage(
    tx: &mut AnyConnection,
    rules: &[&String],
    lock: &str,
) -> Result<HashMap<String, (String, bool)>, sqlx::Error> {
    let mut out = HashMap::new();
    if rules.is_empty() {
        return Ok(out);
    }
    let sql = format!(
        "SELECT rule, pattern, counted_at FROM quota_usage WHERE rule IN ({}) ORDER BY rule{lock}",
        placeholders(1, rules.len())
    );
    let mut q = sqlx::query_as::<_, (String, String, Option<i64>)>(&sql);
    for rule in rules {
        q = q.bind(rule.as_str());
    }
    for (rule, pattern, counted_at) in q.fetch_all(&mut *tx).await? {
        out.insert(rule, (pattern, counted_at.is_some()));
    }
    Ok(out)
}

/// Adds links (rule, blob, n) to the scopes' blob rows, in one statement; returns the bytes each
/// rule's scope gains: the size of each blob whose first link there this is.
async fn add_links<'a>(
    tx: &mut AnyConnection,
    links: &[(&'a str, i64, i64)],
) -> Result<Vec<(&'a str, i64)>, sqlx::Error> {
    let mut gained = Vec::new();
    for chunk in links.chunks(ID_CHUNK / 3) {
        let rows = (0..chunk.len())
            .map(|i| {
                format!(
                    "SELECT CAST(${} AS TEXT) AS vrule, CAST(${} AS BIGINT) AS vblob, CAST(${} AS BIGINT) AS vn",
                    3 * i + 1,
                    3 * i + 2,
                    3 * i + 3
                )
            })
            .collect::<Vec<_>>()
            .join(" UNION ALL ");
        let sql = format!(
            "INSERT INTO quota_blobs (rule, blob_id, size, links) \
             SELECT v.vrule, b.id, b.size, v.vn FROM ({rows}) v JOIN blobs b ON b.id = v.vblob WHERE true \
             ON CONFLICT (rule, blob_id) DO UPDATE SET links = quota_blobs.links + excluded.links \
             RETURNING rule, blob_id, links, size"
        );
        let mut q = sqlx::query_as::<_, (String, i64, i64, i64)>(&sql);
        for (rule, blob, n) in chunk {
            q = q.bind(*rule).bind(*blob).bind(*n);
        }
        for (rule, blob, links, size) in q.fetch_all(&mut *tx).await? {
            let Some(&(name, _, n)) = chunk.iter().find(|(r, b, _)| *r == rule && *b == blob) else {
                continue;
            };
            if links == n {
                gained.push((name, size));
            }
        }
    }
    Ok(gained)
}

/// Removes `-n` links of `blob` from `rule`'s scope; returns minus the blob's size when its last
/// link there went.
async fn remove_links(tx: &mut AnyConnection, rule: &str, blob: i64, n: i64) -> Result<i64, sqlx::Error> {
    let row: Option<(i64, i64)> = sqlx::query_as(
        "UPDATE quota_blobs SET links = links + $1 WHERE rule = $2 AND blob_id = $3 RETURNING links, size",
    )
    .bind(n)
    .bind(rule)
    .bind(blob)
    .fetch_optional(&mut *tx)
    .await?;
    match row {
        Some((links, size)) if links <= 0 => {
            sqlx::query("DELETE FROM quota_blobs WHERE rule = $1 AND blob_id = $2")
                .bind(rule)
                .bind(blob)
                .execute(&mut *tx)
                .await?;
            Ok(-size)
        }
        _ => Ok(0),
    }
}

/// Deletes every rule's rows of the blobs `removed` (their remover holds the blobs' rows).
async fn delete_removed(tx: &mut AnyConnection, removed: &BTreeSet<i64>) -> Result<(), sqlx::Error> {
    for chunk in removed.iter().copied().collect::<Vec<_>>().chunks(ID_CHUNK) {
        let sql = format!("DELETE FROM quota_blobs WHERE blob_id IN ({})", placeholders(1, chunk.len()));
        let mut q = sqlx::query(&sql);
        for id in chunk {
            q = q.bind(*id);
        }
        q.execute(&mut *tx).await?;
    }
    Ok(())
}

/// Adds to the usage rows (locked by [`lock_usage`]) in one statement; the new figures and
/// whether they were counted (only then is a limit enforced), by rule.
async fn add_usage(
    tx: &mut AnyConnection,
    added: &BTreeMap<&str, (i64, i64)>,
) -> Result<HashMap<String, (i64, i64, bool)>, sqlx::Error> {
    let mut out = HashMap::new();
    if added.is_empty() {
        return Ok(out);
    }
    let rows = (0..added.len())
        .map(|i| {
            format!(
                "SELECT CAST(${} AS TEXT) AS vrule, CAST(${} AS BIGINT) AS vbytes, CAST(${} AS BIGINT) AS vrepos",
                3 * i + 1,
                3 * i + 2,
                3 * i + 3
            )
        })
        .collect::<Vec<_>>()
        .join(" UNION ALL ");
    let sql = format!(
        "UPDATE quota_usage SET bytes = quota_usage.bytes + v.vbytes, repositories = quota_usage.repositories + v.vrepos \
         FROM ({rows}) v WHERE quota_usage.rule = v.vrule RETURNING quota_usage.rule, quota_usage.bytes, \
         quota_usage.repositories, quota_usage.counted_at"
    );
    let mut q = sqlx::query_as::<_, (String, i64, i64, Option<i64>)>(&sql);
    for (rule, (bytes, repositories)) in added {
        q = q.bind(*rule).bind(*bytes).bind(*repositories);
    }
    for (rule, bytes, repositories, counted_at) in q.fetch_all(&mut *tx).await? {
        out.insert(rule, (bytes, repositories, counted_at.is_some()));
    }
    Ok(out)
}

/// A rule's figures as recorded.
#[derive(Debug, Clone, serde::Serialize, sqlx::FromRow)]
pub struct QuotaUsage {
    /// The rule.
    pub rule: String,
    /// The scope they were counted for.
    pub pattern: String,
    /// Bytes held.
    pub bytes: i64,
    /// Repositories held (not deleted).
    pub repositories: i64,
    /// When the figures were last counted from scratch (Unix ms); `None` before the first count.
    pub counted_at: Option<i64>,
}

/// A rule's figures counted from scratch, against the recorded ones.
#[derive(Debug, Clone, serde::Serialize)]
pub struct QuotaCount {
    /// The rule.
    pub rule: String,
    /// Bytes recorded / counted.
    pub recorded_bytes: i64,
    /// Bytes counted.
    pub counted_bytes: i64,
    /// Repositories recorded.
    pub recorded_repositories: i64,
    /// Repositories counted.
    pub counted_repositories: i64,
    /// Blobs whose recorded link count (or size) in the scope differs from the count.
    pub blobs_differing: u64,
}

impl QuotaCount {
    /// Whether the recorded figures are exact.
    pub fn exact(&self) -> bool {
        self.recorded_bytes == self.counted_bytes
            && self.recorded_repositories == self.counted_repositories
            && self.blobs_differing == 0
    }
}

/// A scope counted from scratch beside its kept figures.
struct Tally {
    count: QuotaCount,
    /// Per blob linked in the scope: its size and links there.
    links: BTreeMap<i64, (i64, i64)>,
}

/// Counts `rule`'s scope from the rows `tx` sees: its repositories, their links grouped by blob,
/// their manifests' sizes — and compares with the kept rows.
async fn tally(tx: &mut AnyConnection, quotas: &Quotas, rule: &str) -> Result<Tally, sqlx::Error> {
    let recorded: Option<(i64, i64)> =
        sqlx::query_as("SELECT bytes, repositories FROM quota_usage WHERE rule = $1")
            .bind(rule)
            .fetch_optional(&mut *tx)
            .await?;
    let (recorded_bytes, recorded_repositories) = recorded.unwrap_or((0, 0));
    let index = quotas.rules().iter().position(|r| r.name == rule).unwrap_or(usize::MAX);
    let repos: Vec<(i64, String, Option<i64>)> =
        sqlx::query_as("SELECT id, name, deleted_at FROM repositories ORDER BY id")
            .fetch_all(&mut *tx)
            .await?;
    let scope: Vec<(i64, bool)> = repos
        .into_iter()
        .filter(|(_, name, _)| quotas.covering(name).contains(&index))
        .map(|(id, _, deleted)| (id, deleted.is_none()))
        .collect();
    let counted_repositories = scope.iter().filter(|(_, live)| *live).count() as i64;
    let mut links: BTreeMap<i64, (i64, i64)> = BTreeMap::new();
    let mut manifest_bytes = 0i64;
    let ids: Vec<i64> = scope.iter().map(|(id, _)| *id).collect();
    for chunk in ids.chunks(ID_CHUNK) {
        let list = placeholders(1, chunk.len());
        let sql = format!(
            "SELECT rb.blob_id, b.size, COUNT(*) FROM repository_blobs rb JOIN blobs b ON b.id = rb.blob_id \
             WHERE rb.repository_id IN ({list}) GROUP BY rb.blob_id, b.size"
        );
        let mut q = sqlx::query_as::<_, (i64, i64, i64)>(&sql);
        for id in chunk {
            q = q.bind(*id);
        }
        for (blob, size, n) in q.fetch_all(&mut *tx).await? {
            links.entry(blob).or_insert((size, 0)).1 += n;
        }
        let sql = format!(
            "SELECT CAST(COALESCE(SUM(size), 0) AS BIGINT) FROM manifests WHERE repository_id IN ({list})"
        );
        let mut q = sqlx::query_as::<_, (i64,)>(&sql);
        for id in chunk {
            q = q.bind(*id);
        }
        manifest_bytes += q.fetch_one(&mut *tx).await?.0;
    }
    let counted_bytes = manifest_bytes + links.values().map(|(size, _)| size).sum::<i64>();
    let kept: Vec<(i64, i64, i64)> =
        sqlx::query_as("SELECT blob_id, size, links FROM quota_blobs WHERE rule = $1 ORDER BY blob_id")
            .bind(rule)
            .fetch_all(&mut *tx)
            .await?;
    let mut blobs_differing = 0u64;
    let mut seen = BTreeSet::new();
    for (blob, size, n) in &kept {
        seen.insert(*blob);
        if links.get(blob) != Some(&(*size, *n)) {
            blobs_differing += 1;
        }
    }
    blobs_differing += links.keys().filter(|b| !seen.contains(b)).count() as u64;
    Ok(Tally {
        count: QuotaCount {
            rule: rule.to_string(),
            recorded_bytes,
            counted_bytes,
            recorded_repositories,
            counted_repositories,
            blobs_differing,
        },
        links,
    })
}

impl MetaStore {
    /// The quota rules this store enforces.
    pub fn quotas(&self) -> &Quotas {
        self.quota.quotas()
    }

    /// The quota state (refusal counters for the metrics).
    pub fn quota_state(&self) -> &QuotaState {
        &self.quota
    }

    /// Every usage row, in rule order (rules no longer configured included).
    ///
    /// # Errors
    /// [`Error::Database`].
    pub async fn quota_usage(&self) -> Result<Vec<QuotaUsage>> {
        Ok(sqlx::query_as(
            "SELECT rule, pattern, bytes, repositories, counted_at FROM quota_usage ORDER BY rule",
        )
        .fetch_all(&self.read)
        .await?)
    }

    /// Makes every configured rule's figures exact before anything is served: a rule new to the
    /// database, or whose scope changed, is counted from scratch. Rows of rules not configured
    /// here are left alone (another replica, or a later start, may have them). Returns the rules
    /// counted.
    ///
    /// # Errors
    /// [`Error::Database`].
    pub async fn prepare_quotas(&self, now: i64) -> Result<Vec<String>> {
        let recorded = self.quota_usage().await?;
        let mut counted = Vec::new();
        for rule in self.quotas().rules() {
            let scope = self.quotas().scope_of(rule);
            if recorded.iter().any(|u| u.rule == rule.name && u.counted_at.is_some() && u.pattern == scope) {
                continue;
            }
            self.count_quota(&rule.name, true, now).await?;
            counted.push(rule.name.clone());
        }
        Ok(counted)
    }

    /// Counts `rule`'s scope from scratch and compares the count with the kept figures. Without
    /// `reset` it reads one snapshot (a read-only transaction), so writers go on and a change
    /// committing meanwhile cannot make a difference appear. With `reset` it holds the usage row
    /// exclusively (writers into the scope wait for it, and it for them) and replaces the kept
    /// figures with the count. `None` when the rule is not configured.
    ///
    /// # Errors
    /// [`Error::Database`].
    pub async fn count_quota(&self, rule: &str, reset: bool, now: i64) -> Result<Option<QuotaCount>> {
        let Some(rule) = self.quotas().rule(rule).cloned() else { return Ok(None) };
        let quotas = self.quotas().clone();
        let scope = quotas.scope_of(&rule);
        if !reset {
            let begin = match self.dialect {
                super::Dialect::Sqlite => "BEGIN",
                super::Dialect::Postgres => "BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY",
            };
            let mut tx = self.read.begin_with(begin).await?;
            let tally = tally(&mut tx, &quotas, &rule.name).await?;
            tx.rollback().await?;
            return Ok(Some(tally.count));
        }
        let lock = self.update_lock_of("quota_usage");
        let count = transaction!(self, Error, |tx| {
            sqlx::query(
                "INSERT INTO quota_usage (rule, pattern, bytes, repositories) VALUES ($1, $2, 0, 0) \
                 ON CONFLICT (rule) DO NOTHING",
            )
            .bind(&rule.name)
            .bind(&scope)
            .execute(&mut *tx)
            .await?;
            sqlx::query(&format!("SELECT bytes FROM quota_usage WHERE rule = $1{lock}"))
                .bind(&rule.name)
                .execute(&mut *tx)
                .await?;
            let tally = tally(tx, &quotas, &rule.name).await?;
            sqlx::query("DELETE FROM quota_blobs WHERE rule = $1").bind(&rule.name).execute(&mut *tx).await?;
            let entries: Vec<(i64, (i64, i64))> = tally.links.into_iter().collect();
            for chunk in entries.chunks(ID_CHUNK / 4) {
                let values = (0..chunk.len())
                    .map(|i| format!("($1, ${}, ${}, ${})", 3 * i + 2, 3 * i + 3, 3 * i + 4))
                    .collect::<Vec<_>>()
                    .join(", ");
                let sql = format!("INSERT INTO quota_blobs (rule, blob_id, size, links) VALUES {values}");
                let mut q = sqlx::query(&sql).bind(&rule.name);
                for (blob, (size, n)) in chunk {
                    q = q.bind(*blob).bind(*size).bind(*n);
                }
                q.execute(&mut *tx).await?;
            }
            sqlx::query(
                "UPDATE quota_usage SET pattern = $1, bytes = $2, repositories = $3, counted_at = $4 WHERE rule = $5",
            )
            .bind(&scope)
            .bind(tally.count.counted_bytes)
            .bind(tally.count.counted_repositories)
            .bind(now)
            .bind(&rule.name)
            .execute(&mut *tx)
            .await?;
            Ok(tally.count)
        })?;
        Ok(Some(count))
    }

    /// Notes a refusal after its transaction rolled back: counted for the metrics and written as
    /// a `quota.refused` event in a transaction of its own.
    pub(crate) async fn quota_refused(&self, refusal: &QuotaRefusal) {
        self.quota.refusals.get_or_create(&RuleLabel { rule: refusal.rule.clone() }).inc();
        let mut event =
            super::events::NewEvent::new(crate::events::QUOTA_REFUSED, &refusal.repository, None, refusal.at)
                .detail("rule", refusal.rule.as_str())
                .detail("repositories", refusal.pattern.as_str())
                .detail(
                    "limit",
                    match refusal.limit {
                        Limit::Bytes => "bytes",
                        Limit::Repositories => "repositories",
                    },
                )
                .detail("used", refusal.used)
                .detail("max", refusal.max);
        event.size = Some(refusal.adding);
        // Not through `transaction!`, whose refusals come here: one attempt is enough for an event
        // about something that did not happen.
        let written = async {
            let mut tx = self.begin().await?;
            super::events::journaled(async {
                super::events::record(event);
                super::events::flush(&mut tx).await
            })
            .await?;
            tx.commit().await
        }
        .await;
        if written.is_ok() {
            super::events::committed();
        }
        if let Err(e) = written {
            tracing::warn!(rule = %refusal.rule, error = %e, "could not record a quota refusal's event");
        }
    }
}
