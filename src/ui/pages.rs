//! The console's pages: HTML built with `maud`, which escapes everything interpolated. Forms post
//! to the console's own routes; a button appears only when the caller may use it.

use axum::http::StatusCode;
use axum::response::{Html, IntoResponse, Response};
use maud::{DOCTYPE, Markup, html};

use super::{Viewer, urlencode};
use crate::admin::{AdminRequest, Revert};
use crate::meta::{
    DeleteRecord, DeletedTag, Explanation, GcStatus, Preview, RepositorySummary, Space, SpaceSample, TagMove,
    TagRow, UntaggedRow,
};
use crate::oci::{Digest, RepoName, Tag};
use crate::registry::{
    BulkRestoreReport, DeleteTarget, ManifestView, RetentionReport, RetentionStatus, Selection, Tombstone,
};

/// The console's only stylesheet.
pub(super) const STYLE: &str = "\
body{font:14px/1.45 system-ui,sans-serif;margin:0;color:#1d232a;background:#f6f7f9}\
header{background:#1d3557;color:#fff;padding:.6em 1.2em;display:flex;gap:1.5em;align-items:center}\
header a{color:#fff;text-decoration:none}header .who{margin-left:auto;opacity:.8}\
main{padding:1em 1.5em;max-width:1200px}h1{font-size:1.4em}h2{font-size:1.1em;margin-top:1.6em}\
table{border-collapse:collapse;width:100%;background:#fff}th,td{text-align:left;padding:.35em .6em;border-bottom:1px solid #e3e6ea;vertical-align:top}\
th{background:#eef1f5;font-weight:600}code,pre{font:12px ui-monospace,monospace}pre{background:#fff;padding:.8em;overflow:auto;border:1px solid #e3e6ea}\
.num{text-align:right;white-space:nowrap}.muted{color:#6b7380}.copy{background:#fff;border:1px solid #cfd5dc;padding:.4em .6em;display:inline-block}\
button,.button{background:#1d3557;color:#fff;border:0;padding:.35em .8em;border-radius:3px;cursor:pointer;text-decoration:none;font-size:13px}\
button.danger,.button.danger{background:#b3261e}form.inline{display:inline}.problem{background:#fdecea;border:1px solid #f5c2bd;padding:.8em}\
.ok{background:#e8f5e9;border:1px solid #b7dfb9;padding:.8em}.bar{background:#457b9d;height:.8em;display:inline-block}\
input[type=search]{padding:.35em;width:20em}nav.pages{margin-top:.8em}\
.badge{background:#e0ecf6;color:#1d3557;border-radius:3px;padding:0 .4em;font-size:12px}.cache{background:#e0ecf6;border:1px solid #b8cfe3;padding:.8em}";

fn bytes(n: impl TryInto<u64>) -> String {
    crate::quota::human_bytes(i64::try_from(n.try_into().unwrap_or(0)).unwrap_or(i64::MAX))
}

/// A quota's row: its rule and scope, bytes used of the limit with a bar, repositories.
fn quota_row(q: &crate::registry::QuotaStatus) -> Markup {
    let width = (q.used_fraction.clamp(0.0, 1.0) * 200.0).ceil();
    html! { tr {
        td { code { (q.rule) } } td { code { (q.repositories) } }
        td.num { (bytes(q.used_bytes)) } td.num { (bytes(q.max_bytes)) }
        td { span.bar style=(format!("width:{width}px")) {} " " (format!("{:.1} %", q.used_fraction * 100.0))
            @if q.used_fraction >= q.warn_at { " " span.badge { "past warn_at" } } }
        td.num { (q.used_repositories) @if let Some(m) = q.max_repositories { " of " (m) } }
    } }
}

fn when(ms: Option<i64>) -> String {
    ms.map_or_else(|| "—".into(), crate::time::utc)
}

fn short(digest: &str) -> String {
    let hex = digest.split_once(':').map_or(digest, |(_, h)| h);
    format!("{}…", &hex[..hex.len().min(12)])
}

fn repo_link(repo: &str) -> String {
    format!("/ui/repo?name={}", urlencode(repo))
}

fn manifest_link(repo: &str, digest: &str) -> String {
    format!("/ui/manifest?repo={}&digest={}", urlencode(repo), urlencode(digest))
}

fn page(v: &Viewer<'_>, title: &str, body: Markup) -> Response {
    Html(
        html! {
            (DOCTYPE)
            html lang="en" {
                head {
                    meta charset="utf-8";
                    meta name="viewport" content="width=device-width, initial-scale=1";
                    title { (title) " — Berth" }
                    link rel="stylesheet" href="/ui/style.css";
                }
                body {
                    header {
                        a href="/ui/" { strong { "Berth" } }
                        a href="/ui/" { "Repositories" }
                        @if v.may_see_registry() {
                            a href="/ui/space" { "Space" }
                            a href="/ui/retention" { "Retention" }
                        }
                        span.who {
                            @match v.name() {
                                Some(name) => { "signed in as " (name) }
                                None => { a href="/ui/login" { "sign in" } }
                            }
                        }
                    }
                    main { (body) }
                }
            }
        }
        .into_string(),
    )
    .into_response()
}

/// The upstream (and its repository) a cached repository is read from.
fn cached_from(v: &Viewer<'_>, name: &str) -> Option<String> {
    let repo = RepoName::parse(name).ok()?;
    v.app.registry.cache_of(&repo).map(|(c, up)| format!("{}/{up}", c.config.upstream))
}

/// A page saying what went wrong, with `status`.
pub(super) fn problem(status: StatusCode, message: &str) -> Response {
    let body = html! {
        (DOCTYPE)
        html lang="en" {
            head { meta charset="utf-8"; title { "Berth" } link rel="stylesheet" href="/ui/style.css"; }
            body { main { h1 { (status.as_u16()) " " (status.canonical_reason().unwrap_or("")) }
                p.problem id="problem" { (message) } p { a href="/ui/" { "Repositories" } } } }
        }
    };
    (status, Html(body.into_string())).into_response()
}

pub(super) fn repositories(
    v: &Viewer<'_>,
    q: &str,
    list: &[RepositorySummary],
    spaces: &[Option<Space>],
    next: Option<&str>,
    deleted: &[RepositorySummary],
) -> Response {
    page(
        v,
        "Repositories",
        html! {
            h1 { "Repositories" }
            form method="get" action="/ui/" {
                input type="search" name="q" value=(q) placeholder="search by name";
                " " button type="submit" { "Search" }
            }
            table id="repositories" {
                thead { tr { th { "Repository" } th.num { "Tags" } th.num { "Manifests" } th.num { "Bytes referenced" }
                    th.num { "Only here" } th.num { "In tombstones" } th.num { "Pending reclaim" } th { "Last push" } } }
                tbody {
                    @for (r, space) in list.iter().zip(spaces) {
                        tr {
                            td { a href=(repo_link(&r.name)) { (r.name) }
                                @if let Some(up) = cached_from(v, &r.name) { " " span.badge title=(format!("pull-through cache of {up}")) { "cache" } } }
                            td.num { (r.tags) } td.num { (r.manifests) } td.num { (bytes(r.bytes_live)) }
                            td.num { (space.as_ref().map_or("—".into(), |s| bytes(s.bytes_exclusive))) }
                            td.num { a href=(format!("/ui/trash?repo={}", urlencode(&r.name))) { (bytes(r.bytes_in_tombstones)) } }
                            td.num { (space.as_ref().map_or("—".into(), |s| bytes(s.bytes_pending_reclaim))) }
                            td { (when(r.last_push_at)) }
                        }
                    }
                    @if list.is_empty() { tr { td colspan="8" .muted { "No repositories" @if !q.is_empty() { " matching “" (q) "”" } "." } } }
                }
            }
            @if let Some(last) = next {
                nav.pages { a.button href=(format!("/ui/?q={}&last={}", urlencode(q), urlencode(last))) { "Next page" } }
            }
            @if !deleted.is_empty() {
                h2 { "Deleted repositories" }
                table id="deleted-repositories" {
                    thead { tr { th { "Repository" } th { "Deleted" } th.num { "Manifests in the trash" } th.num { "Bytes" } } }
                    tbody { @for r in deleted { tr {
                        td { a href=(format!("/ui/trash?repo={}", urlencode(&r.name))) { (r.name) } }
                        td { (when(r.deleted_at)) } td.num { (r.tombstones) } td.num { (bytes(r.bytes_in_tombstones)) }
                    } } }
                }
            }
        },
    )
}

#[expect(clippy::too_many_arguments, reason = "the parts of one page")]
pub(super) fn repository(
    v: &Viewer<'_>,
    repo: &RepoName,
    summary: &RepositorySummary,
    tags: &[TagRow],
    platforms: &std::collections::HashMap<String, Vec<String>>,
    untagged: &[UntaggedRow],
    quotas: &[crate::registry::QuotaStatus],
    host: &str,
) -> Response {
    let may_delete_tag =
        |tag: &str| Tag::parse(tag).is_ok_and(|t| v.may_delete(DeleteTarget::Tag(repo.clone(), t)));
    let may_delete_manifest =
        |d: &str| Digest::parse(d).is_ok_and(|d| v.may_delete(DeleteTarget::Manifest(repo.clone(), d)));
    let may_delete_repository = v.may_delete(DeleteTarget::Repository(repo.clone()));
    page(
        v,
        repo.as_str(),
        html! {
            h1 { (repo.as_str()) }
            @if let Some(up) = cached_from(v, repo.as_str()) {
                p.cache id="cache" { "A pull-through cache of " code { (up) } ": read-only; content is fetched on the first pull, and a delete evicts (nothing to restore — the upstream has it)." }
            }
            p.muted { (summary.tags) " tags, " (summary.manifests) " manifests, " (bytes(summary.bytes_live)) " referenced; "
                a href=(format!("/ui/trash?repo={}", urlencode(repo.as_str()))) { (summary.tombstones) " in the trash" }
                " (" (bytes(summary.bytes_in_tombstones)) ")" }
            @if !quotas.is_empty() { table id="quotas" { tbody { @for q in quotas { (quota_row(q)) } } } }
            h2 { "Tags" }
            table id="tags" {
                thead { tr { th { "Tag" } th { "Digest" } th { "Pushed" } th { "By" } th { "Last pulled" } th.num { "Size" } th.num { "Referrers" } th {} } }
                tbody {
                    @for t in tags {
                        tr {
                            td { a href=(format!("/ui/history?repo={}&tag={}", urlencode(repo.as_str()), urlencode(&t.tag))) { (t.tag) } }
                            td { a href=(manifest_link(repo.as_str(), &t.digest)) { code { (short(&t.digest)) } } }
                            td { (when(Some(t.pushed_at))) } td { (t.pushed_by.as_deref().unwrap_or("—")) }
                            td { (when(t.pulled_at)) }
                                td.num { (bytes(t.size)) @if t.children > 0 { br; span.muted {
                                    "index of " (t.children)
                                    @if let Some(p) = platforms.get(&t.digest).filter(|p| !p.is_empty()) { ": " (p.join(", ")) }
                                } } }
                            td.num { @if t.referrers > 0 { a href=(manifest_link(repo.as_str(), &t.digest)) { (t.referrers) } } @else { "0" } }
                            td { @if may_delete_tag(&t.tag) {
                                a.button.danger href=(format!("/ui/delete?target={}", urlencode(&format!("{repo}:{}", t.tag)))) { "Delete" }
                            } }
                        }
                    }
                    @if tags.is_empty() { tr { td colspan="8" .muted { "No tags." } } }
                }
            }
            @if let Some(last) = tags.last().filter(|_| tags.len() as i64 == super::PAGE) {
                nav.pages { a.button href=(format!("{}&after={}", repo_link(repo.as_str()), urlencode(&last.tag))) { "More tags" } }
            }
            @if let Some(first) = tags.first() {
                p { "Pull: " span.copy { code { "podman pull " (host) "/" (repo.as_str()) "@" (first.digest) } } }
            }
            h2 { "Untagged manifests" }
            table id="untagged" {
                thead { tr { th { "Digest" } th { "Type" } th { "Refers to" } th { "Pushed" } th { "Last pulled" } th {} } }
                tbody {
                    @for m in untagged {
                        tr {
                            td { a href=(manifest_link(repo.as_str(), &m.digest)) { code { (short(&m.digest)) } } }
                            td { (m.media_type) }
                            td { @if let Some(s) = &m.subject_digest { a href=(manifest_link(repo.as_str(), s)) { code { (short(s)) } } } }
                            td { (when(Some(m.pushed_at))) } td { (when(m.pulled_at)) }
                            td { @if may_delete_manifest(&m.digest) {
                                a.button.danger href=(format!("/ui/delete?target={}", urlencode(&format!("{repo}@{}", m.digest)))) { "Delete" }
                            } }
                        }
                    }
                    @if untagged.is_empty() { tr { td colspan="6" .muted { "None." } } }
                }
            }
            @if may_delete_repository {
                p { a.button.danger href=(format!("/ui/delete?target={}", urlencode(repo.as_str()))) { "Delete the repository…" } }
            }
        },
    )
}

fn parts_table(id: &str, repo: &RepoName, parts: &[crate::registry::Part], children: bool) -> Markup {
    html! {
        table id=(id) {
            thead { tr { th { "Digest" } th { "Type" } @if children { th { "Platform" } } th.num { "Size" } } }
            tbody { @for p in parts { tr {
                td { @if children { a href=(manifest_link(repo.as_str(), &p.digest)) { code { (p.digest) } } } @else { code { (p.digest) } } }
                td { (p.media_type) }
                @if children { td { (p.platform.as_deref().unwrap_or("—")) } }
                td.num { (bytes(p.size)) }
            } } }
        }
    }
}

pub(super) fn manifest(
    v: &Viewer<'_>,
    repo: &RepoName,
    m: &ManifestView,
    why: &Explanation,
    host: &str,
) -> Response {
    page(
        v,
        &format!("{repo}@{}", short(&m.digest)),
        html! {
            h1 { a href=(repo_link(repo.as_str())) { (repo.as_str()) } " @ " code { (short(&m.digest)) } }
            p { code { (m.digest) } br; span.muted { (m.media_type) } }
            p { "Pull: " span.copy { code { "podman pull " (host) "/" (repo.as_str()) "@" (m.digest) } } }
            p { "Tags: " @if m.tags.is_empty() { span.muted { "none" } }
                @for t in &m.tags { a href=(format!("/ui/history?repo={}&tag={}", urlencode(repo.as_str()), urlencode(t))) { (t) } " " } }
            @if let Some(s) = &m.subject { p { "Refers to " a href=(manifest_link(repo.as_str(), s)) { code { (s) } } } }
            @if let Some(c) = &m.config { h2 { "Config" } (parts_table("config", repo, std::slice::from_ref(c), false)) }
            @if !m.layers.is_empty() { h2 { "Layers" } (parts_table("layers", repo, &m.layers, false))
                p.muted { "Total " (bytes(m.layers.iter().map(|l| l.size).sum::<u64>())) } }
            @if !m.children.is_empty() { h2 { "Index children" } (parts_table("children", repo, &m.children, true)) }
            h2 { "Referrers" }
            @if m.referrers.is_empty() { p.muted { "None." } } @else {
                table id="referrers" { thead { tr { th { "Digest" } th { "Artifact type" } th.num { "Size" } } }
                    tbody { @for r in &m.referrers { tr {
                        td { a href=(manifest_link(repo.as_str(), &r.digest)) { code { (short(&r.digest)) } } }
                        td { (r.artifact_type.as_deref().unwrap_or("—")) } td.num { (bytes(r.size)) } } } } }
            }
            @if !m.annotations.is_empty() {
                h2 { "Annotations" }
                table { tbody { @for (k, val) in &m.annotations { tr { td { code { (k) } } td { (val) } } } } }
            }
            h2 { "Why it is kept" }
            div id="explain" {
                p { "State: " strong { (why.state) } ". "
                    @match why.collect_at {
                        Some(at) => { "The collector takes it at " (when(Some(at))) " if nothing changes" @if why.due { " (due now)" } "." }
                        None => { "Kept while something holds it." }
                    } }
                ul { @for h in &why.holds { li { strong { (h.reason) } ": " (h.detail) @if let Some(u) = h.until { " — until " (when(Some(u))) } } } }
            }
            @if Digest::parse(&m.digest).is_ok_and(|d| v.may_delete(DeleteTarget::Manifest(repo.clone(), d))) {
                p { a.button.danger href=(format!("/ui/delete?target={}", urlencode(&format!("{repo}@{}", m.digest)))) { "Delete this manifest…" } }
            }
            h2 { "Manifest" }
            pre { (m.payload) }
        },
    )
}

pub(super) fn history(v: &Viewer<'_>, repo: &RepoName, tag: &Tag, moves: &[TagMove]) -> Response {
    let may_revert =
        v.may(&AdminRequest::Revert { repo: repo.clone(), tag: tag.clone(), to: Revert::Previous });
    page(
        v,
        &format!("{repo}:{tag} history"),
        html! {
            h1 { a href=(repo_link(repo.as_str())) { (repo.as_str()) } ":" (tag.as_str()) " — history" }
            table id="history" {
                thead { tr { th { "When" } th { "What" } th { "From" } th { "To" } th { "Who" } th {} } }
                tbody { @for m in moves.iter().rev() { tr {
                    td { (when(Some(m.at))) } td { (m.kind) @if let Some(n) = &m.note { br; span.muted { (n) } }
                        @if let Some(b) = m.bulk_restore { br; span.muted { "bulk restore " (b) } } }
                    td { @if let Some(d) = &m.old_digest { code { (short(d)) } } }
                    td { @if let Some(d) = &m.new_digest { a href=(manifest_link(repo.as_str(), d)) { code { (short(d)) } } } }
                    td { (m.actor.as_deref().unwrap_or("—")) }
                    td { @if let (true, Some(d)) = (may_revert, &m.new_digest) {
                        form.inline method="post" action="/ui/revert" {
                            input type="hidden" name="repo" value=(repo.as_str());
                            input type="hidden" name="tag" value=(tag.as_str());
                            input type="hidden" name="digest" value=(d);
                            button type="submit" { "Revert to here" }
                        }
                    } }
                } } }
            }
        },
    )
}

pub(super) fn delete_confirm(v: &Viewer<'_>, target: &DeleteTarget, p: &Preview) -> Response {
    let what = match target {
        DeleteTarget::Manifest(..) => "manifest",
        DeleteTarget::Tag(..) => "tag",
        DeleteTarget::Repository(_) => "repository",
    };
    page(
        v,
        "Delete",
        html! {
            h1 { "Delete " (what) " " code { (target.to_string()) } "?" }
            @if let Some(why) = &p.refused {
                p.problem id="refused" { "This delete would be refused: " (why) }
            } @else {
                div.ok id="preview" {
                    p { "It would take " (p.manifests.len()) " manifest(s) and " (p.tags.len()) " tag(s) into the trash, "
                        "and free " strong { (bytes(p.bytes_freed)) } " (" (p.blobs_freed) " blobs) once the restore window has passed." }
                    @if !p.tags.is_empty() { p { "Tags: " (p.tags.join(", ")) } }
                    p.muted { "Everything deleted stays restorable from the trash until then." }
                }
                form method="post" action="/ui/delete" {
                    input type="hidden" name="target" value=(target.to_string());
                    button.danger type="submit" id="confirm" { "Delete" }
                    " " a href=(repo_link(target.repository().as_str())) { "Cancel" }
                }
            }
        },
    )
}

pub(super) fn trash(
    v: &Viewer<'_>,
    repo: &RepoName,
    summary: &RepositorySummary,
    tags: &[DeletedTag],
    list: &[Tombstone],
    restore_window_ms: i64,
) -> Response {
    let may_restore_repository = v.may_restore(DeleteTarget::Repository(repo.clone()));
    let may_restore_tag =
        |tag: &str| Tag::parse(tag).is_ok_and(|t| v.may_restore(DeleteTarget::Tag(repo.clone(), t)));
    let may_restore_manifest =
        |d: &str| Digest::parse(d).is_ok_and(|d| v.may_restore(DeleteTarget::Manifest(repo.clone(), d)));
    page(
        v,
        &format!("{repo} trash"),
        html! {
            h1 { a href=(repo_link(repo.as_str())) { (repo.as_str()) } " — trash" }
            (trash_filter(repo, &super::DeleteFilter::default()))
            @if let Some(at) = summary.deleted_at {
                p.problem { "The repository was deleted at " (when(Some(at))) "." }
                @if may_restore_repository {
                    form method="post" action="/ui/restore" {
                        input type="hidden" name="target" value=(repo.as_str());
                        button type="submit" id="restore-repository" { "Restore the repository" }
                    }
                }
            }
            h2 { "Deleted tags" }
            table id="deleted-tags" {
                thead { tr { th { "Tag" } th { "Pointed at" } th { "Deleted" } th { "By" } th { "Restorable until" } th {} } }
                tbody { @for t in tags { tr {
                    td { (t.tag) } td { a href=(manifest_link(repo.as_str(), &t.digest)) { code { (short(&t.digest)) } } }
                    td { (when(Some(t.at))) } td { (t.actor.as_deref().unwrap_or("—")) }
                    td { (when(Some(t.at.saturating_add(restore_window_ms)))) }
                    td { @if may_restore_tag(&t.tag) {
                        form.inline method="post" action="/ui/restore" {
                            input type="hidden" name="target" value=(format!("{repo}:{}", t.tag));
                            button type="submit" { "Restore" }
                        }
                    } }
                } }
                @if tags.is_empty() { tr { td colspan="6" .muted { "None." } } } }
            }
            h2 { "Deleted manifests" }
            table id="trash" {
                thead { tr { th { "Digest" } th { "Tags it had" } th { "Deleted" } th { "By" } th { "Why" } th { "Purged after" } th.num { "Size" } th {} } }
                tbody { @for t in list { tr {
                    td { code { (short(&t.digest)) } } td { (t.tags.join(", ")) }
                    td { (when(Some(t.deleted_at))) } td { (t.deleted_by.as_deref().unwrap_or("—")) } td { (t.deleted_why) }
                    td { (when(Some(t.purge_after))) } td.num { (bytes(t.size)) }
                    td { @if t.restorable && may_restore_manifest(&t.digest) {
                        form.inline method="post" action="/ui/restore" {
                            input type="hidden" name="target" value=(format!("{repo}@{}", t.digest));
                            button type="submit" { "Restore" }
                        }
                    } @else if !t.restorable { span.muted { (t.unrestorable_reason.as_deref().unwrap_or("not restorable")) } } }
                } }
                @if list.is_empty() { tr { td colspan="8" .muted { "The trash is empty." } } } }
            }
        },
    )
}

/// Rows of a list of deletes a page shows (the counts above it are exact).
const ROWS_SHOWN: usize = 1000;

/// The trash's filter: a time window, an actor, a retention run.
fn trash_filter(repo: &RepoName, f: &super::DeleteFilter) -> Markup {
    html! {
        form method="get" action="/ui/trash" id="trash-filter" {
            input type="hidden" name="repo" value=(repo.as_str());
            "Deleted from " input type="text" name="since" value=(f.since) placeholder="2026-12-07T09:00:00Z or 2h";
            " until " input type="text" name="until" value=(f.until) placeholder="now";
            " by " input type="text" name="actor" value=(f.actor) placeholder="user or retention:rule";
            " run " input type="text" name="run" value=(f.run) size="6";
            " " button type="submit" { "Filter" }
        }
    }
}

/// The link that previews a bulk restore of `s` (moments as Unix ms: the same deletes).
fn bulk_restore_link(s: &Selection) -> String {
    let mut query = form_urlencoded::Serializer::new(String::new());
    if let Some(p) = &s.repositories {
        query.append_pair("repositories", p.as_str());
    }
    for (name, m) in [("since", s.since), ("until", s.until)] {
        if let Some(m) = m {
            query.append_pair(name, &m.text());
        }
    }
    if let Some(actor) = &s.actor {
        query.append_pair("actor", actor);
    }
    if let Some(run) = s.run {
        query.append_pair("run", &run.to_string());
    }
    format!("/ui/bulk-restore?{}", query.finish())
}

fn delete_subject(kind: &str, repository: &str, target: &str) -> Markup {
    html! {
        @match kind {
            "tag" => { "tag " code { (repository) ":" (target) } }
            "manifest" => { "manifest " a href=(manifest_link(repository, target)) { code { (short(target)) } } }
            _ => { "repository " code { (repository) } }
        }
    }
}

/// The trash filtered to the deletes a bulk restore would take on, with "restore all shown".
pub(super) fn filtered_trash(
    v: &Viewer<'_>,
    repo: &RepoName,
    summary: &RepositorySummary,
    filter: &super::DeleteFilter,
    selection: &Selection,
    deletes: &[DeleteRecord],
    may_restore: bool,
) -> Response {
    page(
        v,
        &format!("{repo} trash"),
        html! {
            h1 { a href=(repo_link(repo.as_str())) { (repo.as_str()) } " — trash" }
            (trash_filter(repo, filter))
            @if summary.deleted_at.is_some() { p.problem { "The repository is deleted." } }
            p { (deletes.len()) " delete(s) match, not undone yet. "
                a href=(format!("/ui/trash?repo={}", urlencode(repo.as_str()))) { "Show the whole trash" } }
            @if may_restore && !deletes.is_empty() {
                p { a.button href=(bulk_restore_link(selection)) id="restore-all" { "Restore all shown…" }
                    span.muted { " (first shows what would come back and what would conflict)" } }
            }
            table id="deletes" {
                thead { tr { th { "Deleted" } th { "What" } th { "By" } th { "Run" } } }
                tbody { @for d in deletes.iter().take(ROWS_SHOWN) { tr {
                    td { (when(Some(d.at))) } td { (delete_subject(&d.kind, &d.repository, &d.target)) }
                    td { (d.actor.as_deref().unwrap_or("—")) } td { @if let Some(r) = d.run_id { (r) } }
                } }
                @if deletes.is_empty() { tr { td colspan="4" .muted { "Nothing matches." } } } }
            }
            @if deletes.len() > ROWS_SHOWN { p.muted { "… and " (deletes.len() - ROWS_SHOWN) " more (the restore takes them all)." } }
        },
    )
}

/// A bulk restore: dry, what would come back and what would conflict, with the button that
/// runs it; real, what it did.
pub(super) fn bulk_restore(v: &Viewer<'_>, r: &BulkRestoreReport) -> Response {
    let s = &r.selection;
    page(
        v,
        "Bulk restore",
        html! {
            h1 { @if r.dry_run { "Restore these deletes?" } @else { "Bulk restore " (r.id.unwrap_or_default()) } }
            p.muted { "Deletes in " code { (s.repositories) }
                @if let Some(since) = s.since { " from " (when(Some(since))) }
                " until " (when(Some(s.until)))
                @if let Some(a) = &s.actor { " by " (a) }
                @if let Some(run) = s.run { " of retention run " (run) } "." }
            div.(if r.conflicts > 0 { "problem" } else { "ok" }) id="summary" {
                @if r.dry_run { "Would restore " } @else { "Restored " }
                strong { (r.restored) } " delete(s); " (r.unchanged) " back already; " strong { (r.conflicts) } " conflict(s)."
            }
            @if r.dry_run && r.restored > 0 {
                form method="post" action="/ui/bulk-restore" {
                    input type="hidden" name="repositories" value=(s.repositories);
                    @if let Some(since) = s.since { input type="hidden" name="since" value=(since); }
                    input type="hidden" name="until" value=(s.until);
                    @if let Some(a) = &s.actor { input type="hidden" name="actor" value=(a); }
                    @if let Some(run) = s.run { input type="hidden" name="run" value=(run); }
                    @if r.take_tags { input type="hidden" name="take_tags" value="true"; }
                    button.danger type="submit" id="confirm" { "Restore " (r.restored) " delete(s)" }
                }
            }
            table id="items" {
                thead { tr { th { "Outcome" } th { "What" } th { "Deleted" } th { "By" } th { "Why" } } }
                tbody { @for i in r.items.iter().take(ROWS_SHOWN) { tr {
                    td { @if r.dry_run && i.outcome == "restored" { "would restore" } @else { (i.outcome) } }
                    td { (delete_subject(&i.kind, &i.repository, &i.target)) }
                    td { (when(Some(i.deleted_at))) } td { (i.deleted_by.as_deref().unwrap_or("—")) }
                    td { (i.reason.as_deref().unwrap_or("")) }
                } } }
            }
            @if r.items.len() > ROWS_SHOWN {
                p.muted { "… and " (r.items.len() - ROWS_SHOWN) " more: the whole list is in "
                    @if let Some(id) = r.id { code { "berth restores " (id) } } @else { code { "berth restore … --dry-run --json" } } "." }
            }
        },
    )
}

/// A line of the storage chart: its name, its colour, and the figure it draws.
type Series = (&'static str, &'static str, fn(&SpaceSample) -> i64);

/// Storage over time as an SVG line chart (no script): stored, live, in tombstones, in grace.
fn storage_chart(samples: &[SpaceSample]) -> Markup {
    const W: f64 = 720.0;
    const H: f64 = 200.0;
    let (Some(first), Some(last)) = (samples.first(), samples.last()) else {
        return html! { p.muted id="storage-chart" { "No samples yet: the replica running the sweep takes one an hour." } };
    };
    let span = (last.at - first.at).max(1) as f64;
    let top = samples.iter().map(|x| x.stored).max().unwrap_or(1).max(1) as f64;
    let line = |value: fn(&SpaceSample) -> i64| -> String {
        samples
            .iter()
            .map(|x| {
                let px = (x.at - first.at) as f64 / span * W;
                let py = H - value(x) as f64 / top * H;
                format!("{px:.1},{py:.1}")
            })
            .collect::<Vec<_>>()
            .join(" ")
    };
    let series: [Series; 5] = [
        ("stored", "#1d3557", |x| x.stored),
        ("live", "#2a9d8f", |x| x.live),
        ("in tombstones", "#e76f51", |x| x.tombstones),
        ("in grace", "#e9c46a", |x| x.grace),
        ("pending reclaim", "#9b2226", |x| x.pending),
    ];
    html! {
        figure id="storage-chart" {
            svg width=(W) height=(H + 4.0) viewBox=(format!("0 -2 {W} {}", H + 4.0)) role="img" {
                title { "Storage over time" }
                rect x="0" y="0" width=(W) height=(H) fill="#fff" stroke="#e3e6ea" {}
                @for (_, color, value) in &series {
                    polyline points=(line(*value)) fill="none" stroke=(color) stroke-width="2" {}
                }
            }
            figcaption {
                (when(Some(first.at))) " to " (when(Some(last.at))) ", up to " (bytes(top as u64)) ": "
                @for (name, color, _) in &series { span style=(format!("color:{color}")) { "■ " } (name) " " }
            }
        }
    }
}

#[expect(clippy::too_many_arguments, reason = "the parts of one page")]
pub(super) fn space(
    v: &Viewer<'_>,
    s: &Space,
    status: &GcStatus,
    history: &[SpaceSample],
    caches: &[crate::registry::CacheStatus],
    endpoints: &[crate::registry::EndpointStatus],
    quotas: &[crate::registry::QuotaStatus],
    backups: &[crate::meta::BackupRun],
) -> Response {
    let widest = s.reclaim_schedule.iter().map(|(_, b)| *b).max().unwrap_or(1).max(1);
    page(
        v,
        "Space",
        html! {
            h1 { "Where the space goes" }
            table id="space" { tbody {
                tr { th { "Stored" } td.num { (bytes(s.bytes_stored)) } td.muted { (s.blobs) " blobs" } }
                tr { th { "Live" } td.num { (bytes(s.bytes_live)) } td.muted { "referenced by live manifests" } }
                tr { th { "In tombstones" } td.num { (bytes(s.bytes_in_tombstones)) } td.muted { "restorable; freed when the restore window passes" } }
                tr { th { "In grace" } td.num { (bytes(s.bytes_in_grace)) } td.muted { "unreferenced, within a grace window" } }
                tr { th { "Pending reclaim" } td.num { (bytes(s.bytes_pending_reclaim)) } td.muted { "due: the next collection takes it" } }
            } }
                h2 { "Storage over time" }
            (storage_chart(history))
        h2 { "When the held bytes become reclaimable" }
            @if s.reclaim_schedule.is_empty() { p.muted { "Nothing is held by a window." } }
            table id="schedule" { tbody { @for (at, b) in &s.reclaim_schedule { tr {
                td { (when(Some(*at))) } td.num { (bytes(*b)) }
                td { span.bar style=(format!("width:{}px", (*b as f64 / widest as f64 * 300.0).ceil())) {} }
            } } } }
            @if !quotas.is_empty() {
                h2 { "Quotas" }
                table id="quotas" {
                    thead { tr { th { "Rule" } th { "Scope" } th.num { "Used" } th.num { "Limit" } th {} th.num { "Repositories" } } }
                    tbody { @for q in quotas { (quota_row(q)) } }
                }
            }
            @if !caches.is_empty() {
                h2 { "Pull-through caches" }
                table id="caches" {
                    thead { tr { th { "Cache" } th { "Upstream" } th.num { "Holds" } th.num { "Cap" } th.num { "Hit ratio" }
                        th.num { "Errors" } th { "Last eviction" } } }
                    tbody { @for c in caches { tr {
                        td { (c.prefix) "/…" @if c.default { " (default mirror)" } }
                        td { code { (c.upstream) } }
                        td.num { (bytes(c.bytes)) }
                        td.num { (c.max_bytes.map_or("—".to_string(), |m| bytes(i64::try_from(m).unwrap_or(i64::MAX)))) }
                        td.num { (c.hit_ratio.map_or("—".to_string(), |h| format!("{:.1} %", h * 100.0))) }
                        td.num { (c.requests.get("error").copied().unwrap_or(0)) }
                        td { (c.last_eviction.as_ref().map_or("—".to_string(), |e| format!("{} evicted", e.evicted.len()))) }
                    } } }
                }
                p.muted { "Answers and errors count since this replica started." }
            }
            @if !endpoints.is_empty() {
                h2 { "Event endpoints" }
                table id="endpoints" {
                    thead { tr { th { "Endpoint" } th { "URL" } th.num { "Pending" } th.num { "Lag" } th.num { "Delivered" }
                        th.num { "Dead letters" } th { "Last error" } } }
                    tbody { @for e in endpoints { tr {
                        td { (e.name) " (" (e.format) ")" }
                        td { code { (e.url) } }
                        td.num { (e.state.pending) }
                        td.num { (format!("{} s", e.lag_seconds)) }
                        td.num { (e.state.delivered) }
                        td.num { (e.state.dead_letters) }
                        td { @if e.state.failures > 0 { (e.state.last_error.as_deref().unwrap_or("")) } @else { "—" } }
                    } } }
                }
                p.muted { "Dead letters are replayed with " code { "berth events replay --endpoint NAME --dead" } "." }
            }
            h2 { "Backups" }
            @if backups.is_empty() { p.muted { "No backup recorded. Take one with " code { "berth backup --to DIR|s3://BUCKET/PREFIX" } " (docs/backup.md)." } }
            @else {
                table id="backups" {
                    thead { tr { th { "Backup" } th { "State" } th { "Snapshot" } th { "Location" } th.num { "Keys" } th.num { "Size" }
                        th.num { "Copied" } th.num { "Took" } } }
                    tbody { @for b in backups { tr {
                        td { code { (b.id) } }
                        td { (b.state) @if let Some(e) = &b.error { br; span.muted { (e) } } }
                        td { (when(b.snapshot_at)) }
                        td { code { (b.location) } }
                        td.num { (b.keys) } td.num { (bytes(b.bytes)) }
                        td.num { (b.keys_copied) " (" (bytes(b.bytes_copied)) ")" }
                        td.num { (b.finished_at.map_or("—".to_string(), |f| format!("{:.1} s", (f - b.started_at) as f64 / 1000.0))) }
                    } } }
                }
            }
            h2 { "Collector" }
            table id="queues" {
                thead { tr { th { "Queue" } th.num { "Queued" } th.num { "Due" } th.num { "Overdue" } th { "Oldest due" } } }
                tbody { @for q in &status.queue { tr { td { (q.kind) } td.num { (q.queued) } td.num { (q.due) } td.num { (q.overdue) }
                    td { (q.oldest_due_ms.map_or("—".to_string(), |ms| format!("{:.0} s ago", ms as f64 / 1000.0))) } } } }
            }
            p { "Outbox: " (status.outbox.keys) " keys (" (status.outbox.failing) " failing). Abandoned uploads expiring: " (status.uploads_expiring) "." }
            h2 { "Last passes" }
            table id="passes" {
                thead { tr { th { "Finished" } th { "Replica" } th.num { "Reviews" } th.num { "Manifests" } th.num { "Blobs" } th.num { "Freed" } } }
                tbody { @for p in &status.passes { tr { td { (when(Some(p.finished_at))) } td { (p.replica) } td.num { (p.reviews) }
                    td.num { (p.manifests) } td.num { (p.blobs) } td.num { (bytes(p.bytes)) } } } }
            }
        },
    )
}

pub(super) fn retention(v: &Viewer<'_>, status: &RetentionStatus, dry: Option<&RetentionReport>) -> Response {
    let may_undo = v.may(&AdminRequest::BulkRestore {
        selection: Selection::default(),
        take_tags: false,
        dry_run: true,
    });
    page(
        v,
        "Retention",
        html! {
            h1 { "Retention" }
            h2 { "Rules" }
            @if status.rules.is_empty() { p.muted { "No retention rules are configured." } }
            ul { @for r in &status.rules { li { code { (r) } } } }
            @if !status.immutable.is_empty() { h2 { "Immutable tags" } ul { @for r in &status.immutable { li { code { (r) } } } } }
            h2 { "Last runs" }
            table id="runs" {
                thead { tr { th { "Run" } th { "Started" } th { "By" } th.num { "Tags considered" } th.num { "Tags removed" } th.num { "Manifests removed" } th.num { "Errors" } th {} } }
                tbody { @for r in &status.last_runs { tr { td { (r.id) } td { (when(Some(r.started_at))) } td { (r.started_by) } td.num { (r.tags_considered) }
                    td.num { (r.tags_removed) } td.num { (r.manifests_removed) } td.num { (r.errors) }
                    // A run that stopped before its end recorded no counts: it may have removed some.
                    td { @if may_undo && (r.tags_removed + r.manifests_removed > 0 || r.finished_at == 0) {
                        a href=(format!("/ui/bulk-restore?run={}", r.id)) { "Undo…" } } } } } }
            }
            h2 { "Dry run" }
            @match dry {
                None => { p { a.button href="/ui/retention?dry_run=true" id="dry-run" { "What would a run remove now?" } } }
                Some(d) => {
                    p { "A run now would remove " (d.tags.len()) " tags and " (d.manifests.len()) " untagged manifests"
                        @if let Some(b) = d.bytes_freed { ", freeing " (bytes(b)) " once the windows have passed" } "." }
                    table id="dry-run-tags" {
                        thead { tr { th { "Tag" } th { "Digest" } th { "Rule" } th { "Pushed" } th { "Last pulled" } } }
                        tbody { @for t in &d.tags { tr {
                            td { a href=(repo_link(&t.repository)) { (t.repository) } ":" (t.tag) }
                            td { code { (short(&t.digest)) } } td { (t.rule) } td { (when(Some(t.pushed_at))) } td { (when(t.pulled_at)) } } } }
                    }
                }
            }
        },
    )
}
