//! The web console at `/ui/`: server-rendered pages over the same registry operations and admin
//! requests as the API and the CLI, shipped inside the binary (no JavaScript build, works
//! offline).
//!
//! Who may see and do what is the API's rule, decided by the API's own checks: the caller signs
//! in with the same users (HTTP Basic, so every replica accepts the same credentials without
//! session state); every page and action the admin API also serves is authorized by
//! [`AdminRequest::authorize`] for the same request, content by the OCI API's pull rule, and a
//! button appears only for what those checks allow — the console has no permission logic of its
//! own, so it can never allow what the API refuses. Actions are `POST` forms, accepted only
//! from the console's own pages (the `Origin`, or else the `Referer`, must be this host, and a
//! browser's `Sec-Fetch-Site` must not say otherwise): a page elsewhere cannot make a signed-in
//! browser delete anything.

mod pages;

use axum::Router;
use axum::extract::{Form, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::get;
use serde::Deserialize;

use crate::admin::{AdminRequest, Refused};
use crate::app::App;
use crate::auth::{Denial, Identity, Operation};
use crate::oci::{Digest, RepoName, Tag};
use crate::registry::{DeleteTarget, Error, ExplainTarget, Selection};
use crate::time::Moment;

/// Rows on a page of repositories or tags.
const PAGE: i64 = 50;

/// How far back the storage chart goes.
const HISTORY_MS: i64 = 30 * 24 * 3600 * 1000;

/// The console's routes (mounted at `/ui` when `ui.enabled`).
pub fn router() -> Router<App> {
    Router::new()
        .route("/ui", get(|| async { Redirect::permanent("/ui/") }))
        .route("/ui/", get(repositories))
        .route("/ui/login", get(login))
        .route("/ui/repo", get(repository))
        .route("/ui/manifest", get(manifest))
        .route("/ui/history", get(history))
        .route("/ui/delete", get(delete_confirm).post(delete))
        .route("/ui/trash", get(trash))
        .route("/ui/restore", axum::routing::post(restore))
        .route("/ui/bulk-restore", get(bulk_restore_preview).post(bulk_restore))
        .route("/ui/revert", axum::routing::post(revert))
        .route("/ui/space", get(space))
        .route("/ui/retention", get(retention))
        .route("/ui/style.css", get(|| async { ([(header::CONTENT_TYPE, "text/css")], pages::STYLE) }))
}

/// Why a console request is refused: shown as a page with its status, or as the sign-in
/// challenge.
pub(crate) struct Refusal {
    status: StatusCode,
    message: String,
    /// For a 401: the `WWW-Authenticate` value.
    challenge: Option<String>,
}

impl Refusal {
    fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Refusal { status, message: message.into(), challenge: None }
    }

    /// The 401 that makes the browser ask for a user name and password: a Basic challenge in the
    /// configured realm, as the admin API's.
    fn sign_in(app: &App) -> Self {
        let realm = app.auth.as_ref().map_or_else(|| "Basic realm=\"Berth\"".into(), |a| a.basic_challenge());
        Refusal {
            status: StatusCode::UNAUTHORIZED,
            message: "sign in with your registry user name and password".into(),
            challenge: Some(format!("{realm}, charset=\"UTF-8\"")),
        }
    }
}

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        let page = pages::problem(self.status, &self.message);
        match self.challenge {
            Some(challenge) => ([(header::WWW_AUTHENTICATE, challenge)], page).into_response(),
            None => page,
        }
    }
}

/// The caller. What they may see and do is decided by the admin API's own check
/// ([`AdminRequest::authorize`]) for everything the admin API does, and by the OCI API's rule for
/// reading content — both over the one table in [`crate::auth::Operation`]. The console has no
/// rule of its own.
pub(crate) struct Viewer<'a> {
    app: &'a App,
    who: Identity,
}

impl Viewer<'_> {
    /// Whether the caller may make `request` — for the links and buttons a page offers (a request
    /// about a blob wherever it is would need its holders read: the console offers none).
    pub(crate) fn may(&self, request: &AdminRequest) -> bool {
        self.decide(request.operation()).is_ok()
    }

    /// Whether the caller may delete `target`.
    pub(crate) fn may_delete(&self, target: DeleteTarget) -> bool {
        self.may(&AdminRequest::Delete(target))
    }

    /// Whether the caller may restore `target`.
    pub(crate) fn may_restore(&self, target: DeleteTarget) -> bool {
        self.may(&AdminRequest::Restore { target, take_tags: false, force: false })
    }

    /// Whether the caller may see the registry-wide pages (space, retention).
    pub(crate) fn may_see_registry(&self) -> bool {
        [AdminRequest::GcStatus, AdminRequest::Space(None), AdminRequest::RetentionStatus]
            .iter()
            .all(|r| self.may(r))
    }

    /// The user's name, if signed in.
    pub(crate) fn name(&self) -> Option<&str> {
        self.who.name()
    }

    fn decide(&self, op: Operation<'_>) -> Result<(), Refusal> {
        match &self.app.auth {
            Some(auth) => auth.decide(&self.who, op).map_err(|d| self.refusal(d, op.needs())),
            None => Ok(()),
        }
    }

    fn refusal(&self, denial: Denial, needs: String) -> Refusal {
        match denial {
            Denial::Unauthenticated(_) => Refusal::sign_in(self.app),
            Denial::Forbidden => Refusal::new(StatusCode::FORBIDDEN, needs),
        }
    }

    /// Refuses unless the caller may make `request`, by the admin API's own check.
    async fn authorize<'r>(
        &self,
        request: &'r AdminRequest,
    ) -> Result<crate::admin::Authorized<'r>, Refusal> {
        let auth = self.app.auth.as_deref();
        request.authorize(auth, &self.who, &self.app.registry).await.map_err(|r| match r {
            Refused::Denied(d, needs) => self.refusal(d, needs),
            Refused::Failed(e) => e.into(),
        })
    }

    /// Refuses unless the caller may pull `repo` (the pages of its content).
    fn require_pull(&self, repo: &RepoName) -> Result<(), Refusal> {
        self.decide(Operation::Pull(repo.as_str()))
    }

    /// Input that does not parse: an anonymous caller is asked to sign in first, as the admin API
    /// asks; a signed-in one is told what is wrong.
    fn bad(&self, message: String) -> Refusal {
        if self.app.auth.is_some() && self.who == Identity::Anonymous {
            Refusal::sign_in(self.app)
        } else {
            Refusal::new(StatusCode::BAD_REQUEST, message)
        }
    }

    fn repo_name(&self, text: &str) -> Result<RepoName, Refusal> {
        RepoName::parse(text).map_err(|m| self.bad(format!("`{text}`: {m}")))
    }

    fn target(&self, text: &str) -> Result<DeleteTarget, Refusal> {
        DeleteTarget::parse(text).map_err(|m| self.bad(format!("`{text}`: {m}")))
    }

    fn tag(&self, text: &str) -> Result<Tag, Refusal> {
        Tag::parse(text).map_err(|m| self.bad(format!("`{text}`: {m}")))
    }

    fn digest(&self, text: &str) -> Result<Digest, Refusal> {
        Digest::parse(text).map_err(|e| self.bad(format!("`{text}`: {e}")))
    }
}

/// The cookie a browser gets once it has signed in. It proves nothing (credentials do): it only
/// says "challenge me" so the browser sends the credentials it keeps for the console on every
/// page, where it would otherwise be shown the anonymous view.
const SIGNED_IN: &str = "berth_console=signed-in";

/// Who is calling. With auth on, anonymous callers get in only where anonymous pull is on (and
/// a browser that has signed in is asked for its credentials again).
fn viewer<'a>(app: &'a App, headers: &HeaderMap) -> Result<Viewer<'a>, Refusal> {
    let Some(auth) = &app.auth else { return Ok(Viewer { app, who: Identity::Anonymous }) };
    let authorization = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok());
    let now = u64::try_from(app.registry.clock().now_ms() / 1000).unwrap_or(0);
    let signed_in = headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|c| c.split(';').any(|kv| kv.trim() == SIGNED_IN));
    match auth.authenticate(authorization, now) {
        Ok(Identity::Anonymous) if signed_in => Err(Refusal::sign_in(app)),
        Ok(Identity::Anonymous) if !auth.anonymous_may_pull() => Err(Refusal::sign_in(app)),
        Ok(who) => Ok(Viewer { app, who }),
        Err(_) => Err(Refusal::sign_in(app)),
    }
}

/// Refuses a `POST` that did not come from the console's own pages (CSRF).
fn same_origin(headers: &HeaderMap) -> Result<(), Refusal> {
    let forbidden =
        || Refusal::new(StatusCode::FORBIDDEN, "this action must come from the console's own page");
    let text = |name| headers.get(name).and_then(|v: &axum::http::HeaderValue| v.to_str().ok());
    if text("sec-fetch-site").is_some_and(|s| s != "same-origin" && s != "none") {
        return Err(forbidden());
    }
    let host = text(header::HOST.as_str()).ok_or_else(forbidden)?;
    let from =
        text(header::ORIGIN.as_str()).or_else(|| text(header::REFERER.as_str())).ok_or_else(forbidden)?;
    let authority = from.split_once("://").map_or("", |(_, rest)| rest.split('/').next().unwrap_or(""));
    if authority == host { Ok(()) } else { Err(forbidden()) }
}

/// What a failed operation shows.
impl From<Error> for Refusal {
    fn from(e: Error) -> Self {
        let status = match &e {
            Error::NameUnknown | Error::ManifestUnknown | Error::TagUnknown(_) | Error::BlobUnknown => {
                StatusCode::NOT_FOUND
            }
            Error::DeleteRefused(_)
            | Error::Immutable(_)
            | Error::Conflict(_)
            | Error::PreconditionFailed(_) => StatusCode::CONFLICT,
            Error::Internal(_) => {
                tracing::error!(error = %e, "console request failed");
                StatusCode::INTERNAL_SERVER_ERROR
            }
            _ => StatusCode::BAD_REQUEST,
        };
        let message = if status == StatusCode::INTERNAL_SERVER_ERROR {
            "internal error (logged)".into()
        } else {
            e.to_string()
        };
        Refusal::new(status, message)
    }
}

/// The host clients reach this registry at, for the copy line.
fn registry_host(headers: &HeaderMap) -> String {
    headers.get(header::HOST).and_then(|v| v.to_str().ok()).unwrap_or("localhost:5000").to_string()
}

/// What a console handler answers: a page, or the refusal shown instead.
type Page = Result<Response, Refusal>;

#[derive(Debug, Deserialize)]
struct ListQuery {
    #[serde(default)]
    q: String,
    last: Option<String>,
}

async fn repositories(State(app): State<App>, headers: HeaderMap, Query(q): Query<ListQuery>) -> Page {
    let v = viewer(&app, &headers)?;
    let auth = app.auth.as_deref();
    // The admin API's list, and its filter: read ahead until a page is full or the list ends.
    let mut shown = Vec::new();
    let mut last = q.last.clone();
    loop {
        let batch = app.registry.repositories_matching(q.q.trim(), last.as_deref(), PAGE).await?;
        let full = batch.len() as i64 == PAGE;
        last = batch.last().map(|r| r.name.clone());
        shown.extend(batch.into_iter().filter(|r| crate::admin::lists(auth, &v.who, &r.name)));
        if shown.len() as i64 >= PAGE || !full {
            break;
        }
    }
    shown.truncate(PAGE as usize);
    let next = (shown.len() as i64 == PAGE).then(|| shown.last().map(|r| r.name.clone())).flatten();
    // What each alone holds and what is due: the space report, for the repositories the caller
    // may have it of.
    let mut spaces = Vec::with_capacity(shown.len());
    for r in &shown {
        let space = match RepoName::parse(&r.name) {
            Ok(repo) if v.may(&AdminRequest::Space(Some(repo.clone()))) => {
                app.registry.space(Some(&repo)).await.ok()
            }
            _ => None,
        };
        spaces.push(space);
    }
    // Deleted repositories, listed by the same rule (they are restored from their trash).
    let mut deleted = app.registry.deleted_repositories(PAGE).await?;
    deleted.retain(|r| crate::admin::lists(auth, &v.who, &r.name));
    Ok(pages::repositories(&v, &q.q, &shown, &spaces, next.as_deref(), &deleted))
}

async fn login(State(app): State<App>, headers: HeaderMap) -> Response {
    match viewer(&app, &headers) {
        Ok(v) if v.name().is_some() => (
            [(
                header::SET_COOKIE,
                format!(
                    "{SIGNED_IN}; Path=/ui; HttpOnly; SameSite=Strict{}",
                    if app.config.tls.is_some() { "; Secure" } else { "" }
                ),
            )],
            Redirect::to("/ui/"),
        )
            .into_response(),
        Ok(_) if app.auth.is_none() => Redirect::to("/ui/").into_response(),
        _ => Refusal::sign_in(&app).into_response(),
    }
}

#[derive(Debug, Deserialize)]
struct RepoQuery {
    name: String,
    #[serde(default)]
    after: String,
}

async fn repository(State(app): State<App>, headers: HeaderMap, Query(q): Query<RepoQuery>) -> Page {
    let v = viewer(&app, &headers)?;
    let repo = v.repo_name(&q.name)?;
    v.authorize(&AdminRequest::Repository(repo.clone())).await?;
    v.require_pull(&repo)?;
    let summary = app.registry.repository(&repo).await?;
    let tags = app.registry.tag_rows(&repo, &q.after, PAGE).await?;
    let untagged = app.registry.untagged_rows(&repo, PAGE).await?;
    // An index's platforms, read from the index itself.
    let mut platforms = std::collections::HashMap::new();
    for t in tags.iter().filter(|t| t.children > 0) {
        if platforms.contains_key(&t.digest) {
            continue;
        }
        let Ok(digest) = Digest::parse(&t.digest) else { continue };
        platforms.insert(t.digest.clone(), app.registry.index_platforms(&repo, &digest).await?);
    }
    let host = registry_host(&headers);
    // The quotas whose scope holds it: how close the team is to its limit.
    let quotas: Vec<_> = if summary.quotas.is_empty() || !v.may(&AdminRequest::QuotaStatus(None)) {
        Vec::new()
    } else {
        app.registry
            .quota_status(None)
            .await?
            .into_iter()
            .filter(|q| summary.quotas.contains(&q.rule))
            .collect()
    };
    Ok(pages::repository(&v, &repo, &summary, &tags, &platforms, &untagged, &quotas, &host))
}

#[derive(Debug, Deserialize)]
struct ManifestQuery {
    repo: String,
    digest: String,
}

async fn manifest(State(app): State<App>, headers: HeaderMap, Query(q): Query<ManifestQuery>) -> Page {
    let v = viewer(&app, &headers)?;
    let repo = v.repo_name(&q.repo)?;
    let digest = v.digest(&q.digest)?;
    let explain = AdminRequest::Explain(ExplainTarget::Manifest(repo.clone(), digest.clone()));
    v.authorize(&explain).await?;
    v.require_pull(&repo)?;
    let view = app.registry.manifest_view(&repo, &digest).await?;
    let explanation = app.registry.explain(&ExplainTarget::Manifest(repo.clone(), digest)).await?;
    Ok(pages::manifest(&v, &repo, &view, &explanation, &registry_host(&headers)))
}

#[derive(Debug, Deserialize)]
struct HistoryQuery {
    repo: String,
    tag: String,
}

async fn history(State(app): State<App>, headers: HeaderMap, Query(q): Query<HistoryQuery>) -> Page {
    let v = viewer(&app, &headers)?;
    let repo = v.repo_name(&q.repo)?;
    let tag = v.tag(&q.tag)?;
    v.authorize(&AdminRequest::History(repo.clone(), Some(tag.clone()))).await?;
    let moves = app.registry.history(&repo, Some(&tag)).await?;
    Ok(pages::history(&v, &repo, &tag, &moves))
}

#[derive(Debug, Deserialize)]
struct TargetForm {
    target: String,
}

async fn delete_confirm(State(app): State<App>, headers: HeaderMap, Query(q): Query<TargetForm>) -> Page {
    let v = viewer(&app, &headers)?;
    let t = v.target(&q.target)?;
    v.authorize(&AdminRequest::Preview(t.clone())).await?;
    let preview = app.registry.delete_preview(&t).await?;
    Ok(pages::delete_confirm(&v, &t, &preview))
}

async fn delete(State(app): State<App>, headers: HeaderMap, Form(f): Form<TargetForm>) -> Page {
    same_origin(&headers)?;
    let v = viewer(&app, &headers)?;
    let t = v.target(&f.target)?;
    let repo = t.repository().clone();
    let request = AdminRequest::Delete(t);
    v.authorize(&request).await?.run(&app.registry, v.name()).await?;
    Ok(Redirect::to(&format!("/ui/trash?repo={}", urlencode(repo.as_str()))).into_response())
}

/// Which deletes a filtered trash, or a bulk restore, is about (empty fields: no condition).
#[derive(Debug, Default, Deserialize)]
struct DeleteFilter {
    #[serde(default)]
    repositories: String,
    #[serde(default)]
    since: String,
    #[serde(default)]
    until: String,
    #[serde(default)]
    actor: String,
    #[serde(default)]
    run: String,
    #[serde(default)]
    take_tags: bool,
}

impl DeleteFilter {
    fn is_empty(&self) -> bool {
        [&self.since, &self.until, &self.actor, &self.run].iter().all(|f| f.trim().is_empty())
    }
}

impl Viewer<'_> {
    /// The selection a filter names, its moments resolved now — so the preview, and the restore
    /// its button posts, name the same deletes.
    fn selection(&self, f: &DeleteFilter) -> Result<Selection, Refusal> {
        let now = self.app.registry.clock().now_ms();
        let moment = |name: &str, text: &str| -> Result<Option<Moment>, Refusal> {
            if text.trim().is_empty() {
                return Ok(None);
            }
            let m = crate::time::parse_moment(text).map_err(|e| self.bad(format!("{name}: {e}")))?;
            Ok(Some(Moment::At(m.resolve(now))))
        };
        let repositories = match f.repositories.trim() {
            "" => None,
            p => Some(crate::auth::Pattern::parse(p).map_err(|e| self.bad(format!("repositories: {e}")))?),
        };
        let run = match f.run.trim() {
            "" => None,
            r => Some(r.parse().map_err(|_| self.bad(format!("run: `{r}` is not a retention run id")))?),
        };
        let actor = Some(f.actor.trim().to_string()).filter(|a| !a.is_empty());
        // Until now, unless given: what the page shows is what a restore takes on.
        let until = moment("until", &f.until)?.or(Some(Moment::At(now.saturating_add(1))));
        Ok(Selection { repositories, since: moment("since", &f.since)?, until, actor, run })
    }
}

#[derive(Debug, Deserialize)]
struct TrashQuery {
    repo: String,
    #[serde(flatten)]
    filter: DeleteFilter,
}

async fn trash(State(app): State<App>, headers: HeaderMap, Query(q): Query<TrashQuery>) -> Page {
    let v = viewer(&app, &headers)?;
    let repo = v.repo_name(&q.repo)?;
    v.authorize(&AdminRequest::Tombstones(repo.clone())).await?;
    v.authorize(&AdminRequest::Repository(repo.clone())).await?;
    let summary = app.registry.repository(&repo).await?;
    let window = app.registry.policy().restore_window_ms;
    if !q.filter.is_empty() {
        let mut selection = v.selection(&q.filter)?;
        let literal = crate::auth::Pattern::parse(repo.as_str()).map_err(|e| v.bad(e))?;
        selection.repositories = Some(literal);
        let deletes = app.registry.selected_deletes(&selection).await?;
        let may_restore = v.may(&AdminRequest::BulkRestore {
            selection: selection.clone(),
            take_tags: false,
            dry_run: true,
        });
        return Ok(pages::filtered_trash(&v, &repo, &summary, &q.filter, &selection, &deletes, may_restore));
    }
    let tombstones = app.registry.tombstones(&repo).await?;
    let tags = app.registry.deleted_tags(&repo, PAGE).await?;
    Ok(pages::trash(&v, &repo, &summary, &tags, &tombstones, window))
}

/// What a bulk restore would bring back and what would conflict (a dry run: the same
/// transactions, rolled back), with the button that runs it for real.
async fn bulk_restore_preview(
    State(app): State<App>,
    headers: HeaderMap,
    Query(f): Query<DeleteFilter>,
) -> Page {
    // The preview runs the restore's transactions (rolled back): never for another site's page.
    if headers
        .get("sec-fetch-site")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|s| s != "same-origin" && s != "none")
    {
        return Err(Refusal::new(StatusCode::FORBIDDEN, "this page must be opened from the console"));
    }
    let v = viewer(&app, &headers)?;
    if f.is_empty() {
        return Err(v.bad("choose a time window, an actor or a retention run".into()));
    }
    let selection = v.selection(&f)?;
    bulk_restore_page(&app, &v, selection, f.take_tags, true).await
}

async fn bulk_restore(State(app): State<App>, headers: HeaderMap, Form(f): Form<DeleteFilter>) -> Page {
    same_origin(&headers)?;
    let v = viewer(&app, &headers)?;
    if f.is_empty() {
        return Err(v.bad("choose a time window, an actor or a retention run".into()));
    }
    let selection = v.selection(&f)?;
    bulk_restore_page(&app, &v, selection, f.take_tags, false).await
}

/// Runs a bulk restore the admin API's own check allows, and shows what it did (or would do).
async fn bulk_restore_page(
    app: &App,
    v: &Viewer<'_>,
    selection: Selection,
    take_tags: bool,
    dry_run: bool,
) -> Page {
    v.authorize(&AdminRequest::BulkRestore { selection: selection.clone(), take_tags, dry_run }).await?;
    let report = app.registry.bulk_restore(&selection, take_tags, dry_run, v.name()).await?;
    Ok(pages::bulk_restore(v, &report))
}

async fn restore(State(app): State<App>, headers: HeaderMap, Form(f): Form<TargetForm>) -> Page {
    same_origin(&headers)?;
    let v = viewer(&app, &headers)?;
    let t = v.target(&f.target)?;
    let repo = t.repository().clone();
    let request = AdminRequest::Restore { target: t, take_tags: false, force: false };
    v.authorize(&request).await?.run(&app.registry, v.name()).await?;
    Ok(Redirect::to(&format!("/ui/repo?name={}", urlencode(repo.as_str()))).into_response())
}

#[derive(Debug, Deserialize)]
struct RevertForm {
    repo: String,
    tag: String,
    digest: String,
}

async fn revert(State(app): State<App>, headers: HeaderMap, Form(f): Form<RevertForm>) -> Page {
    same_origin(&headers)?;
    let v = viewer(&app, &headers)?;
    let repo = v.repo_name(&f.repo)?;
    let tag = v.tag(&f.tag)?;
    let digest = v.digest(&f.digest)?;
    let request =
        AdminRequest::Revert { repo: repo.clone(), tag: tag.clone(), to: crate::admin::Revert::To(digest) };
    v.authorize(&request).await?.run(&app.registry, v.name()).await?;
    Ok(Redirect::to(&format!("/ui/history?repo={}&tag={tag}", urlencode(repo.as_str()))).into_response())
}

async fn space(State(app): State<App>, headers: HeaderMap) -> Page {
    let v = viewer(&app, &headers)?;
    v.authorize(&AdminRequest::Space(None)).await?;
    v.authorize(&AdminRequest::GcStatus).await?;
    let space = app.registry.space(None).await?;
    let status = app.registry.gc_status().await?;
    let history = app.registry.space_history(HISTORY_MS).await?;
    v.authorize(&AdminRequest::ProxyStatus).await?;
    let caches = app.registry.cache_status().await?;
    v.authorize(&AdminRequest::EventsStatus).await?;
    let endpoints = app.registry.events_status().await?;
    v.authorize(&AdminRequest::QuotaStatus(None)).await?;
    let quotas = app.registry.quota_status(None).await?;
    v.authorize(&AdminRequest::Backups).await?;
    let backups = app.registry.backup_runs(5).await?;
    Ok(pages::space(&v, &space, &status, &history, &caches, &endpoints, &quotas, &backups))
}

#[derive(Debug, Deserialize)]
struct RetentionQuery {
    #[serde(default)]
    dry_run: bool,
}

async fn retention(State(app): State<App>, headers: HeaderMap, Query(q): Query<RetentionQuery>) -> Page {
    let v = viewer(&app, &headers)?;
    v.authorize(&AdminRequest::RetentionStatus).await?;
    if q.dry_run {
        v.authorize(&AdminRequest::RetentionRun { dry_run: true, only: None }).await?;
    }
    let status = app.registry.retention_status().await?;
    let dry = if q.dry_run { Some(app.registry.retention_run(None, true, "console").await?) } else { None };
    Ok(pages::retention(&v, &status, dry.as_ref()))
}

/// Percent-encodes a query or form value.
pub fn urlencode(text: &str) -> String {
    form_urlencoded::byte_serialize(text.as_bytes()).collect()
}
