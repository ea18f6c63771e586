//! Admin requests — the operations the admin API, the CLI and the console share. Each request
//! knows its HTTP form (for the CLI talking to a running Berth, and for the API's router), what
//! it needs ([`AdminRequest::authorize`], over the one table in [`crate::auth::Operation`]), and
//! runs over [`Registry`] directly (for the API, and for the CLI opening a deployment with
//! `--config`), so every face reports the same facts as the same JSON and refuses the same
//! callers.

use serde_json::{Value, json};

use crate::auth::{Auth, Denial, Identity, Operation};
use crate::meta::{ReplaySelection, RevertTarget};
use crate::oci::{Digest, RepoName, Tag};
use crate::registry::{DeleteTarget, Error, ExplainTarget, Registry, Selection};

/// Where the time machine puts a tag (owned form of [`RevertTarget`]).
#[derive(Debug, Clone)]
pub enum Revert {
    /// This manifest.
    To(Digest),
    /// Where the tag pointed at this moment (Unix ms).
    At(i64),
    /// One step back.
    Previous,
}

/// Which events a replay delivers again.
#[derive(Debug, Clone, Copy)]
pub enum Replay {
    /// Every event since this moment.
    Since(crate::time::Moment),
    /// One event.
    Id(i64),
    /// Every dead letter.
    Dead,
}

/// One admin operation.
#[derive(Debug, Clone)]
pub enum AdminRequest {
    /// Repositories with counts and sizes.
    Repositories {
        /// List after this name.
        last: Option<String>,
        /// At most this many.
        n: i64,
    },
    /// One repository.
    Repository(RepoName),
    /// Delete a manifest (`REPO@DIGEST`), a tag (`REPO:TAG`) or a repository (`REPO`).
    Delete(DeleteTarget),
    /// Delete a manifest or a repository even while an in-use report pins it (needs `admin` on
    /// the repository).
    ForceDelete(DeleteTarget),
    /// What deleting the target would take and free.
    Preview(DeleteTarget),
    /// Tombstones of a repository.
    Tombstones(RepoName),
    /// Tag history of a repository, or of one tag.
    History(RepoName, Option<Tag>),
    /// Restore a tombstone, a tag or a repository.
    Restore {
        /// What.
        target: DeleteTarget,
        /// Move tags that were pushed again since the delete back.
        take_tags: bool,
        /// Restore even past a quota's limit.
        force: bool,
    },
    /// Undo every delete a selection names — a time window, an actor, a retention run — each as
    /// its single restore would.
    BulkRestore {
        /// Which deletes.
        selection: Selection,
        /// Move tags that were pushed again since the delete back.
        take_tags: bool,
        /// Change nothing: say what would come back and what would conflict.
        dry_run: bool,
    },
    /// The recorded bulk restores.
    BulkRestores,
    /// One recorded bulk restore with the deletes it undid.
    BulkRestoreRecord(i64),
    /// The time machine.
    Revert {
        /// The repository.
        repo: RepoName,
        /// The tag.
        tag: Tag,
        /// Where to.
        to: Revert,
    },
    /// Why a manifest or blob is kept, and when the collector will take it.
    Explain(ExplainTarget),
    /// The collector's state (the whole registry's: needs admin on every repository).
    GcStatus,
    /// The backups taken of this deployment, newest first (what `berth backup` recorded).
    Backups,
    /// Where each pull-through cache stands.
    ProxyStatus,
    /// Run the pull-through caches' eviction now.
    ProxyEvict,
    /// Where the space goes: a repository's, or (needing admin on every repository) all.
    Space(Option<RepoName>),
    /// Apply the retention rules now (to the repositories matching `only`, if given).
    RetentionRun {
        /// Change nothing; say what would go and what it would free.
        dry_run: bool,
        /// A repository pattern limiting the run.
        only: Option<crate::auth::Pattern>,
    },
    /// The retention rules, the schedule and the last runs.
    RetentionStatus,
    /// Lift a tag's immutability for one change.
    Unlock {
        /// The repository.
        repo: RepoName,
        /// The tag.
        tag: Tag,
        /// How long the lift lasts (milliseconds) if unused.
        for_ms: i64,
        /// Why (recorded in the tag history).
        reason: String,
    },
    /// Replace a source's in-use report.
    ReportInUse {
        /// The source (a cluster, a deploy system).
        source: String,
        /// `REPO@DIGEST` or `REPO:TAG`, as the source sees them.
        images: Vec<String>,
        /// How long the report pins (milliseconds) before it lapses.
        ttl_ms: i64,
    },
    /// Withdraw a source's in-use report.
    WithdrawInUse(String),
    /// Every in-use report with what it pins.
    InUse,
    /// Where each events endpoint's delivery stands.
    EventsStatus,
    /// Each quota rule's limits and its scope's usage (or one rule's).
    QuotaStatus(Option<String>),
    /// The events written after an id, in id order.
    EventsLog {
        /// List after this event id.
        after: i64,
        /// At most this many.
        n: i64,
    },
    /// An events endpoint's dead letters, newest first.
    DeadLetters {
        /// The endpoint.
        endpoint: String,
        /// At most this many.
        n: i64,
    },
    /// Deliver events to an endpoint again.
    ReplayEvents {
        /// The endpoint.
        endpoint: String,
        /// Which events.
        selection: Replay,
    },
    /// Emergency purge of a blob everywhere.
    Purge {
        /// The blob.
        digest: Digest,
        /// Why (recorded, and shown by restore refusals).
        reason: String,
    },
}

/// An admin request as HTTP: method, path under `/admin/v1/`, and JSON body.
#[derive(Debug)]
pub struct HttpForm {
    /// `GET`, `POST` or `DELETE`.
    pub method: &'static str,
    /// Path and query after `/admin/v1/`.
    pub path: String,
    /// JSON body, if any.
    pub body: Option<Value>,
}

impl AdminRequest {
    /// The request's HTTP form.
    pub fn http(&self) -> HttpForm {
        let (method, path, body) = match self {
            AdminRequest::Repositories { last, n } => {
                let last = last.as_deref().map(|l| format!("&last={l}")).unwrap_or_default();
                ("GET", format!("repositories?n={n}{last}"), None)
            }
            AdminRequest::Repository(r) => ("GET", format!("repositories/{r}"), None),
            AdminRequest::Delete(DeleteTarget::Repository(r)) => {
                ("DELETE", format!("repositories/{r}"), None)
            }
            AdminRequest::Delete(t) => ("DELETE", format!("manifests/{t}"), None),
            AdminRequest::ForceDelete(DeleteTarget::Repository(r)) => {
                ("DELETE", format!("repositories/{r}?force=true"), None)
            }
            AdminRequest::ForceDelete(t) => ("DELETE", format!("manifests/{t}?force=true"), None),
            AdminRequest::ReportInUse { source, images, ttl_ms } => (
                "PUT",
                format!("in-use/{source}"),
                Some(json!({ "images": images, "ttl": format!("{ttl_ms}ms") })),
            ),
            AdminRequest::WithdrawInUse(source) => ("DELETE", format!("in-use/{source}"), None),
            AdminRequest::InUse => ("GET", "in-use".to_string(), None),
            AdminRequest::Preview(t) => ("GET", format!("preview/{t}"), None),
            AdminRequest::Tombstones(r) => ("GET", format!("tombstones/{r}"), None),
            AdminRequest::History(r, None) => ("GET", format!("history/{r}"), None),
            AdminRequest::History(r, Some(t)) => ("GET", format!("history/{r}:{t}"), None),
            AdminRequest::Restore { target, take_tags, force } => {
                let q = match (take_tags, force) {
                    (false, false) => "",
                    (true, false) => "?take_tags=true",
                    (false, true) => "?force=true",
                    (true, true) => "?take_tags=true&force=true",
                };
                ("POST", format!("restore/{target}{q}"), None)
            }
            AdminRequest::BulkRestore { selection, take_tags, dry_run } => {
                let mut query = form_urlencoded::Serializer::new(String::new());
                if let Some(p) = &selection.repositories {
                    query.append_pair("repositories", p.as_str());
                }
                for (name, value) in [("since", selection.since), ("until", selection.until)] {
                    if let Some(v) = value {
                        query.append_pair(name, &v.text());
                    }
                }
                if let Some(run) = selection.run {
                    query.append_pair("run", &run.to_string());
                }
                if let Some(actor) = &selection.actor {
                    query.append_pair("actor", actor);
                }
                query.append_pair("take_tags", &take_tags.to_string());
                query.append_pair("dry_run", &dry_run.to_string());
                ("POST", format!("restore?{}", query.finish()), None)
            }
            AdminRequest::BulkRestores => ("GET", "restores".to_string(), None),
            AdminRequest::BulkRestoreRecord(id) => ("GET", format!("restores/{id}"), None),
            AdminRequest::Revert { repo, tag, to } => {
                let body = match to {
                    Revert::To(d) => json!({ "to": d.as_str() }),
                    Revert::At(at) => json!({ "at": at }),
                    Revert::Previous => json!({ "previous": true }),
                };
                ("POST", format!("revert/{repo}:{tag}"), Some(body))
            }
            AdminRequest::Explain(t) => ("GET", format!("explain/{t}"), None),
            AdminRequest::GcStatus => ("GET", "gc/status".to_string(), None),
            AdminRequest::Backups => ("GET", "backups".to_string(), None),
            AdminRequest::ProxyStatus => ("GET", "proxies".to_string(), None),
            AdminRequest::ProxyEvict => ("POST", "proxies/evict".to_string(), None),
            AdminRequest::Space(None) => ("GET", "space".to_string(), None),
            AdminRequest::Space(Some(r)) => ("GET", format!("space/{r}"), None),
            AdminRequest::EventsStatus => ("GET", "events/status".to_string(), None),
            AdminRequest::QuotaStatus(None) => ("GET", "quotas".to_string(), None),
            AdminRequest::QuotaStatus(Some(rule)) => ("GET", format!("quotas/{rule}"), None),
            AdminRequest::EventsLog { after, n } => ("GET", format!("events?after={after}&n={n}"), None),
            AdminRequest::DeadLetters { endpoint, n } => {
                ("GET", format!("events/dead/{endpoint}?n={n}"), None)
            }
            AdminRequest::ReplayEvents { endpoint, selection } => {
                let body = match selection {
                    Replay::Since(at) => json!({ "since": at.text() }),
                    Replay::Id(id) => json!({ "id": id }),
                    Replay::Dead => json!({ "dead": true }),
                };
                ("POST", format!("events/replay/{endpoint}"), Some(body))
            }
            AdminRequest::Purge { digest, reason } => {
                ("POST", "purge".to_string(), Some(json!({ "digest": digest.as_str(), "reason": reason })))
            }
            AdminRequest::RetentionRun { dry_run, only } => {
                let only = only.as_ref().map(|p| format!("&repo={}", p.as_str())).unwrap_or_default();
                ("POST", format!("retention/run?dry_run={dry_run}{only}"), None)
            }
            AdminRequest::RetentionStatus => ("GET", "retention/status".to_string(), None),
            AdminRequest::Unlock { repo, tag, for_ms, reason } => (
                "POST",
                format!("unlock/{repo}:{tag}"),
                Some(json!({ "reason": reason, "for": format!("{for_ms}ms") })),
            ),
        };
        HttpForm { method, path, body }
    }

    /// Runs the request as `actor`, returning the JSON both faces answer with — unchecked: the
    /// admin API and the console run what [`AdminRequest::authorize`] returns; only the CLI on the
    /// deployment's own store (no access control there) runs a request directly.
    ///
    /// # Errors
    /// The operation's [`Error`].
    pub async fn run(&self, registry: &Registry, actor: Option<&str>) -> Result<Value, Error> {
        Ok(match self {
            AdminRequest::Repositories { last, n } => {
                json!({ "repositories": to_value(&registry.repositories(last.as_deref(), *n).await?) })
            }
            AdminRequest::Repository(r) => to_value(&registry.repository(r).await?),
            AdminRequest::Delete(target) | AdminRequest::ForceDelete(target) => {
                let force = matches!(self, AdminRequest::ForceDelete(_));
                let deleted = match target {
                    DeleteTarget::Manifest(r, d) => registry.delete_manifest(r, d, force, actor).await?,
                    DeleteTarget::Tag(r, t) => {
                        let digest =
                            registry.delete_tag(r, t, crate::meta::TagCondition::Always, actor).await?;
                        vec![crate::meta::AffectedManifest {
                            repository: r.to_string(),
                            digest,
                            tags: vec![t.to_string()],
                        }]
                    }
                    DeleteTarget::Repository(r) => registry.delete_repository(r, force, actor).await?,
                };
                json!({ "target": target.to_string(), "deleted": to_value(&deleted) })
            }
            AdminRequest::Preview(target) => {
                let mut value = to_value(&registry.delete_preview(target).await?);
                value["target"] = json!(target.to_string());
                value
            }
            AdminRequest::Tombstones(r) => {
                json!({ "repository": r.as_str(), "tombstones": to_value(&registry.tombstones(r).await?) })
            }
            AdminRequest::History(r, tag) => {
                json!({ "repository": r.as_str(), "history": to_value(&registry.history(r, tag.as_ref()).await?) })
            }
            AdminRequest::Restore { target, take_tags, force } => {
                let restored = registry.restore(target, *take_tags, *force, actor).await?;
                json!({ "target": target.to_string(), "restored": to_value(&restored) })
            }
            AdminRequest::BulkRestore { selection, take_tags, dry_run } => {
                to_value(&registry.bulk_restore(selection, *take_tags, *dry_run, actor).await?)
            }
            AdminRequest::BulkRestores => {
                json!({ "restores": to_value(&registry.bulk_restores(100).await?) })
            }
            AdminRequest::BulkRestoreRecord(id) => to_value(&registry.bulk_restore_record(*id).await?),
            AdminRequest::Revert { repo, tag, to } => {
                let target = match to {
                    Revert::To(d) => RevertTarget::Digest(d),
                    Revert::At(at) => RevertTarget::At(*at),
                    Revert::Previous => RevertTarget::Previous,
                };
                let digest = registry.revert_tag(repo, tag, target, actor).await?;
                json!({ "repository": repo.as_str(), "tag": tag.as_str(), "digest": digest })
            }
            AdminRequest::Explain(target) => to_value(&registry.explain(target).await?),
            AdminRequest::GcStatus => to_value(&registry.gc_status().await?),
            AdminRequest::Backups => json!({ "backups": to_value(&registry.backup_runs(20).await?) }),
            AdminRequest::ProxyStatus => json!({ "proxies": to_value(&registry.cache_status().await?) }),
            AdminRequest::ProxyEvict => json!({ "evictions": to_value(&registry.evict_caches().await?) }),
            AdminRequest::Space(repo) => {
                let mut value = to_value(&registry.space(repo.as_ref()).await?);
                value["repository"] = json!(repo.as_ref().map(RepoName::as_str));
                value
            }
            AdminRequest::Purge { digest, reason } => {
                to_value(&registry.purge_blob(digest, reason, actor).await?)
            }
            AdminRequest::ReportInUse { source, images, ttl_ms } => {
                to_value(&registry.report_in_use(source, images, *ttl_ms, actor).await?)
            }
            AdminRequest::WithdrawInUse(source) => {
                registry.withdraw_in_use(source, actor).await?;
                json!({ "source": source, "withdrawn": true })
            }
            AdminRequest::InUse => json!({ "reports": to_value(&registry.in_use_reports().await?) }),
            AdminRequest::EventsStatus => json!({ "endpoints": to_value(&registry.events_status().await?) }),
            AdminRequest::QuotaStatus(rule) => {
                json!({ "quotas": to_value(&registry.quota_status(rule.as_deref()).await?) })
            }
            AdminRequest::EventsLog { after, n } => {
                json!({ "events": to_value(&registry.events_after(*after, *n).await?) })
            }
            AdminRequest::DeadLetters { endpoint, n } => {
                json!({ "endpoint": endpoint, "dead_letters": to_value(&registry.dead_letters(endpoint, *n).await?) })
            }
            AdminRequest::ReplayEvents { endpoint, selection } => {
                let selection = match selection {
                    Replay::Since(at) => ReplaySelection::Since(at.resolve(registry.clock().now_ms())),
                    Replay::Id(id) => ReplaySelection::Id(*id),
                    Replay::Dead => ReplaySelection::Dead,
                };
                json!({ "endpoint": endpoint, "queued": registry.replay_events(endpoint, selection).await? })
            }
            AdminRequest::RetentionRun { dry_run, only } => {
                let started_by = actor.unwrap_or("anonymous");
                to_value(&registry.retention_run(only.as_ref(), *dry_run, started_by).await?)
            }
            AdminRequest::RetentionStatus => to_value(&registry.retention_status().await?),
            AdminRequest::Unlock { repo, tag, for_ms, reason } => {
                let digest = registry.lift_immutability(repo, tag, *for_ms, reason, actor).await?;
                json!({ "repository": repo.as_str(), "tag": tag.as_str(), "digest": digest, "for_ms": for_ms })
            }
        })
    }

    /// What the request does, in the terms of the one table of permissions ([`Operation`]). A
    /// request about a blob wherever it is names no holders here: [`AdminRequest::authorize`]
    /// reads them.
    pub fn operation(&self) -> Operation<'_> {
        match self {
            // Listed entries are filtered instead ([`lists`]).
            AdminRequest::Repositories { .. } => Operation::List,
            AdminRequest::Repository(r) | AdminRequest::Tombstones(r) | AdminRequest::History(r, _) => {
                Operation::ReadRecords(r.as_str())
            }
            AdminRequest::Explain(ExplainTarget::Manifest(r, _) | ExplainTarget::Tag(r, _)) => {
                Operation::ReadRecords(r.as_str())
            }
            AdminRequest::Delete(DeleteTarget::Repository(r))
            | AdminRequest::Preview(DeleteTarget::Repository(r)) => Operation::Administer(r.as_str()),
            AdminRequest::Delete(t) | AdminRequest::Preview(t) => Operation::Delete(t.repository().as_str()),
            AdminRequest::ForceDelete(t) => Operation::Administer(t.repository().as_str()),
            // Past a quota: the quota covers more than the repository.
            AdminRequest::Restore { force: true, .. } => Operation::AdministerRegistry,
            AdminRequest::Restore { target, .. } => Operation::Administer(target.repository().as_str()),
            // Decided on the pattern, never on which repositories the deletes are in.
            AdminRequest::BulkRestore { selection: Selection { repositories: Some(p), .. }, .. } => {
                Operation::AdministerMatching(p)
            }
            AdminRequest::Revert { repo, .. } | AdminRequest::Unlock { repo, .. } => {
                Operation::Administer(repo.as_str())
            }
            AdminRequest::Space(Some(r)) => Operation::Administer(r.as_str()),
            AdminRequest::Explain(ExplainTarget::Blob(_)) | AdminRequest::Purge { .. } => {
                Operation::AdministerBlob(None)
            }
            AdminRequest::GcStatus
            | AdminRequest::Backups
            | AdminRequest::ProxyStatus
            | AdminRequest::ProxyEvict
            | AdminRequest::BulkRestore { .. }
            | AdminRequest::BulkRestores
            | AdminRequest::BulkRestoreRecord(_)
            | AdminRequest::Space(None)
            | AdminRequest::RetentionRun { .. }
            | AdminRequest::RetentionStatus
            | AdminRequest::EventsStatus
            | AdminRequest::QuotaStatus(_)
            | AdminRequest::EventsLog { .. }
            | AdminRequest::DeadLetters { .. }
            | AdminRequest::ReplayEvents { .. } => Operation::AdministerRegistry,
            AdminRequest::ReportInUse { .. } | AdminRequest::WithdrawInUse(_) | AdminRequest::InUse => {
                Operation::ReportInUse
            }
        }
    }

    /// Decides whether `who` may make this request: the check the admin API and the console
    /// both run (the rule itself is [`Auth::decide`]'s). With `auth` off, everyone may. For a
    /// blob, the caller is refused before its holders are read unless it administers some
    /// repository, and then by the same refusal whether the blob is stored or not.
    ///
    /// The request comes back [`Authorized`], to be run as decided: a purge allowed over a
    /// blob's holders runs only while the blob is held by those alone.
    ///
    /// # Errors
    /// [`Refused::Denied`], or [`Refused::Failed`] when the holders of a blob cannot be read.
    pub async fn authorize(
        &self,
        auth: Option<&Auth>,
        who: &Identity,
        registry: &Registry,
    ) -> Result<Authorized<'_>, Refused> {
        let mut authorized = Authorized { request: self, blob_holders: None };
        let Some(auth) = auth else { return Ok(authorized) };
        let operation = self.operation();
        auth.decide(who, operation).map_err(|d| Refused::Denied(d, operation.needs()))?;
        if let AdminRequest::Explain(ExplainTarget::Blob(digest)) | AdminRequest::Purge { digest, .. } = self
        {
            let holders = registry.repositories_holding(digest).await.map_err(Refused::Failed)?;
            let operation = Operation::AdministerBlob(Some(&holders));
            auth.decide(who, operation).map_err(|d| Refused::Denied(d, operation.needs()))?;
            // An administrator of every repository may purge wherever the blob is by then.
            if auth.decide(who, Operation::AdministerRegistry).is_err() {
                authorized.blob_holders = Some(holders);
            }
        }
        Ok(authorized)
    }
}

/// A request [`AdminRequest::authorize`] allowed, with what the decision rested on.
#[derive(Debug)]
pub struct Authorized<'a> {
    request: &'a AdminRequest,
    /// For a purge by a caller who administers only some repositories: the blob's holders the
    /// permission was decided over.
    blob_holders: Option<Vec<String>>,
}

impl Authorized<'_> {
    /// Runs the request as `actor` (see [`AdminRequest::run`]), within what was decided.
    ///
    /// # Errors
    /// The operation's [`Error`].
    pub async fn run(&self, registry: &Registry, actor: Option<&str>) -> Result<Value, Error> {
        match self.request {
            AdminRequest::Purge { digest, reason } => {
                let within = self.blob_holders.as_deref();
                Ok(to_value(&registry.purge_blob_within(digest, reason, actor, within).await?))
            }
            request => request.run(registry, actor).await,
        }
    }
}

/// Whether the repository list shows repository `name` (live or deleted) to `who`: only what
/// the caller may read the records of — in the admin API's list and the console's alike.
pub fn lists(auth: Option<&Auth>, who: &Identity, name: &str) -> bool {
    auth.is_none_or(|a| a.decide(who, Operation::ReadRecords(name)).is_ok())
}

/// Why a request may not run.
#[derive(Debug)]
pub enum Refused {
    /// The caller may not: the denial, and the rule in words (the same whatever exists).
    Denied(Denial, String),
    /// Deciding failed (the metadata store).
    Failed(Error),
}

fn to_value<T: serde::Serialize>(value: &T) -> Value {
    serde_json::to_value(value).unwrap_or_default()
}

/// Why an HTTP request is no admin request.
#[derive(Debug)]
pub enum ParseError {
    /// No such route.
    NoRoute,
    /// A malformed repository name or tag.
    Name(String),
    /// A malformed digest.
    Digest(String),
    /// A malformed body or a wrong combination of parameters; the message says what.
    Invalid(String),
}

fn parse_target(text: &str) -> Result<DeleteTarget, ParseError> {
    DeleteTarget::parse(text).map_err(|m| match text.split_once('@') {
        Some((repo, _)) if RepoName::parse(repo).is_ok() => ParseError::Digest(m),
        _ => ParseError::Name(m),
    })
}

fn parse_repo(text: &str) -> Result<RepoName, ParseError> {
    RepoName::parse(text).map_err(ParseError::Name)
}

fn parse_digest(text: &str) -> Result<Digest, ParseError> {
    Digest::parse(text).map_err(|e| ParseError::Digest(e.to_string()))
}

fn query_value<'a>(query: Option<&'a str>, name: &str) -> Option<&'a str> {
    query?.split('&').find_map(|p| p.strip_prefix(name)?.strip_prefix('='))
}

/// Whether a `true`/`false` query parameter is set.
fn query_flag(query: Option<&str>, name: &str) -> Result<bool, ParseError> {
    match query_value(query, name) {
        None | Some("false" | "0") => Ok(false),
        Some("true" | "1") => Ok(true),
        Some(other) => Err(ParseError::Invalid(format!("{name}: expected true or false, got {other}"))),
    }
}

/// Reads a bulk restore's query: `repositories`, `since`, `until`, `actor`, `run`, `take_tags`,
/// `dry_run` (anything else is refused, so a misspelt filter never widens a restore).
fn bulk_restore(query: Option<&str>) -> Result<AdminRequest, ParseError> {
    let mut selection = Selection::default();
    let (mut take_tags, mut dry_run) = (false, false);
    let flag = |name: &str, v: &str| match v {
        "true" | "1" => Ok(true),
        "false" | "0" => Ok(false),
        other => Err(ParseError::Invalid(format!("{name}: expected true or false, got {other}"))),
    };
    let moment = |name: &str, v: &str| {
        crate::time::parse_moment(v).map_err(|e| ParseError::Invalid(format!("{name}: {e}")))
    };
    for (name, value) in form_urlencoded::parse(query.unwrap_or("").as_bytes()) {
        match name.as_ref() {
            "repositories" => {
                selection.repositories = Some(
                    crate::auth::Pattern::parse(&value)
                        .map_err(|e| ParseError::Invalid(format!("repositories: {e}")))?,
                );
            }
            "since" => selection.since = Some(moment("since", &value)?),
            "until" => selection.until = Some(moment("until", &value)?),
            "actor" => selection.actor = Some(value.into_owned()).filter(|a| !a.is_empty()),
            "run" => {
                selection.run =
                    Some(value.parse().map_err(|_| {
                        ParseError::Invalid(format!("run: `{value}` is not a retention run id"))
                    })?);
            }
            "take_tags" => take_tags = flag("take_tags", &value)?,
            "dry_run" => dry_run = flag("dry_run", &value)?,
            other => {
                return Err(ParseError::Invalid(format!(
                    "unknown parameter `{other}`: a bulk restore takes repositories, since, until, actor, run, \
                     take_tags, dry_run"
                )));
            }
        }
    }
    Ok(AdminRequest::BulkRestore { selection, take_tags, dry_run })
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct PurgeBody {
    digest: String,
    reason: String,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct InUseBody {
    images: Vec<String>,
    ttl: Option<String>,
}

/// Whether `?force=` asks for a forced delete.
fn forced(query: Option<&str>) -> Result<bool, ParseError> {
    query_flag(query, "force")
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct UnlockBody {
    reason: String,
    #[serde(rename = "for")]
    for_: Option<String>,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct RevertBody {
    to: Option<String>,
    at: Option<i64>,
    #[serde(default)]
    previous: bool,
}

/// The body of `POST events/replay/NAME`.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct ReplayBody {
    since: Option<String>,
    id: Option<i64>,
    #[serde(default)]
    dead: bool,
}

fn body_of<T: for<'de> serde::Deserialize<'de>>(body: Option<&[u8]>) -> Result<T, ParseError> {
    serde_json::from_slice(body.unwrap_or(b"")).map_err(|e| ParseError::Invalid(format!("request body: {e}")))
}

impl AdminRequest {
    /// Reads the request an HTTP call under `/admin/v1/` makes — the inverse of
    /// [`AdminRequest::http`].
    ///
    /// # Errors
    /// [`ParseError::NoRoute`], or [`ParseError::Invalid`] saying what is malformed.
    pub fn from_http(
        method: &str,
        path: &str,
        query: Option<&str>,
        body: Option<&[u8]>,
    ) -> Result<Self, ParseError> {
        let (route, rest) = path.split_once('/').unwrap_or((path, ""));
        Ok(match (method, route, rest) {
            ("GET", "repositories", "") => AdminRequest::Repositories {
                last: query_value(query, "last").map(str::to_string),
                n: query_value(query, "n").and_then(|n| n.parse().ok()).unwrap_or(1000).clamp(0, 100_000),
            },
            ("GET", "repositories", name) => AdminRequest::Repository(parse_repo(name)?),
            ("DELETE", "repositories", name) => {
                let target = DeleteTarget::Repository(parse_repo(name)?);
                if forced(query)? { AdminRequest::ForceDelete(target) } else { AdminRequest::Delete(target) }
            }
            ("DELETE", "manifests", text) => match parse_target(text)? {
                DeleteTarget::Repository(_) => {
                    return Err(ParseError::Invalid("manifests/ takes REPO@DIGEST or REPO:TAG".into()));
                }
                // A tag delete leaves the manifest: nothing a pin protects.
                target @ DeleteTarget::Manifest(..) if forced(query)? => AdminRequest::ForceDelete(target),
                target => AdminRequest::Delete(target),
            },
            ("GET", "in-use", "") => AdminRequest::InUse,
            ("PUT", "in-use", source) if !source.is_empty() => {
                let body: InUseBody = body_of(body)?;
                let ttl = crate::config::parse_duration(body.ttl.as_deref().unwrap_or("1h"))
                    .map_err(|e| ParseError::Invalid(format!("ttl: {e}")))?;
                let ttl_ms = i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX);
                AdminRequest::ReportInUse { source: source.to_string(), images: body.images, ttl_ms }
            }
            ("DELETE", "in-use", source) if !source.is_empty() => {
                AdminRequest::WithdrawInUse(source.to_string())
            }
            ("GET", "preview", text) => AdminRequest::Preview(parse_target(text)?),
            ("GET", "tombstones", name) => AdminRequest::Tombstones(parse_repo(name)?),
            ("GET", "history", text) => match parse_target(text)? {
                DeleteTarget::Repository(r) => AdminRequest::History(r, None),
                DeleteTarget::Tag(r, t) => AdminRequest::History(r, Some(t)),
                DeleteTarget::Manifest(..) => {
                    return Err(ParseError::Invalid("history is kept per tag: REPO or REPO:TAG".into()));
                }
            },
            ("POST", "restore", "") => bulk_restore(query)?,
            ("GET", "restores", "") => AdminRequest::BulkRestores,
            ("GET", "restores", id) => AdminRequest::BulkRestoreRecord(
                id.parse().map_err(|_| ParseError::Invalid(format!("`{id}` is not a bulk restore id")))?,
            ),
            ("POST", "restore", text) => AdminRequest::Restore {
                target: parse_target(text)?,
                take_tags: matches!(query_value(query, "take_tags"), Some("true" | "1")),
                force: forced(query)?,
            },
            ("POST", "revert", text) => {
                let DeleteTarget::Tag(repo, tag) = parse_target(text)? else {
                    return Err(ParseError::Invalid("revert takes REPO:TAG".into()));
                };
                let body: RevertBody = body_of(body)?;
                let to = match (body.to, body.at, body.previous) {
                    (Some(d), None, false) => Revert::To(parse_digest(&d)?),
                    (None, Some(at), false) => Revert::At(at),
                    (None, None, true) => Revert::Previous,
                    _ => {
                        return Err(ParseError::Invalid(
                            "give exactly one of \"to\" (a digest), \"at\" (Unix ms) or \"previous\": true"
                                .into(),
                        ));
                    }
                };
                AdminRequest::Revert { repo, tag, to }
            }
            ("GET", "gc", "status") => AdminRequest::GcStatus,
            ("GET", "backups", "") => AdminRequest::Backups,
            ("GET", "proxies", "") => AdminRequest::ProxyStatus,
            ("POST", "proxies", "evict") => AdminRequest::ProxyEvict,
            ("GET", "space", "") => AdminRequest::Space(None),
            ("GET", "space", name) => AdminRequest::Space(Some(parse_repo(name)?)),
            ("GET", "explain", text) => AdminRequest::Explain(ExplainTarget::parse(text).map_err(|m| {
                if text.contains('@') && RepoName::parse(text.split('@').next().unwrap_or("")).is_err() {
                    ParseError::Name(m)
                } else {
                    ParseError::Digest(m)
                }
            })?),
            ("POST", "purge", "") => {
                let body: PurgeBody = body_of(body)?;
                let reason = body.reason.trim().to_string();
                if reason.is_empty() {
                    return Err(ParseError::Invalid("a purge needs a reason".into()));
                }
                AdminRequest::Purge { digest: parse_digest(&body.digest)?, reason }
            }
            ("POST", "retention", "run") => AdminRequest::RetentionRun {
                dry_run: matches!(query_value(query, "dry_run"), Some("true" | "1")),
                only: query_value(query, "repo")
                    .map(|p| {
                        crate::auth::Pattern::parse(p).map_err(|e| ParseError::Invalid(format!("repo: {e}")))
                    })
                    .transpose()?,
            },
            ("GET", "retention", "status") => AdminRequest::RetentionStatus,
            ("GET", "events", "status") => AdminRequest::EventsStatus,
            ("GET", "quotas", rule) => {
                AdminRequest::QuotaStatus(Some(rule.to_string()).filter(|r| !r.is_empty()))
            }
            ("GET", "events", "") => AdminRequest::EventsLog {
                after: match query_value(query, "after") {
                    None => 0,
                    Some(a) => a
                        .parse()
                        .map_err(|_| ParseError::Invalid(format!("after: `{a}` is not an event id")))?,
                },
                n: query_value(query, "n").and_then(|n| n.parse().ok()).unwrap_or(1000).clamp(1, 10_000),
            },
            ("GET", "events", rest) if rest.starts_with("dead/") => AdminRequest::DeadLetters {
                endpoint: rest["dead/".len()..].to_string(),
                n: query_value(query, "n").and_then(|n| n.parse().ok()).unwrap_or(1000).clamp(1, 10_000),
            },
            ("POST", "events", rest) if rest.starts_with("replay/") => {
                let body: ReplayBody = body_of(body)?;
                let selection = match (body.since, body.id, body.dead) {
                    (Some(since), None, false) => Replay::Since(
                        crate::time::parse_moment(&since)
                            .map_err(|e| ParseError::Invalid(format!("since: {e}")))?,
                    ),
                    (None, Some(id), false) => Replay::Id(id),
                    (None, None, true) => Replay::Dead,
                    _ => {
                        return Err(ParseError::Invalid(
                            "give exactly one of \"since\" (a time, or an age like \"2h\"), \"id\" (an event id) \
                             or \"dead\": true"
                                .into(),
                        ));
                    }
                };
                AdminRequest::ReplayEvents { endpoint: rest["replay/".len()..].to_string(), selection }
            }
            ("POST", "unlock", text) => {
                let DeleteTarget::Tag(repo, tag) = parse_target(text)? else {
                    return Err(ParseError::Invalid("unlock takes REPO:TAG".into()));
                };
                let body: UnlockBody = body_of(body)?;
                let reason = body.reason.trim().to_string();
                if reason.is_empty() {
                    return Err(ParseError::Invalid("lifting immutability needs a reason".into()));
                }
                let period = body.for_.as_deref().unwrap_or("1h");
                let period = crate::config::parse_duration(period)
                    .map_err(|e| ParseError::Invalid(format!("for: {e}")))?;
                let for_ms = i64::try_from(period.as_millis()).unwrap_or(i64::MAX);
                if for_ms == 0 {
                    return Err(ParseError::Invalid("for: must be more than zero".into()));
                }
                AdminRequest::Unlock { repo, tag, for_ms, reason }
            }
            _ => return Err(ParseError::NoRoute),
        })
    }
}
