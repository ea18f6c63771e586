//! The CLI's admin commands: each builds an [`AdminRequest`] and runs it against a running Berth
//! over HTTP (`--url`) or directly on a deployment (`--config` / `--data-dir`), then prints the
//! answer — the same JSON either way — for people or, with `--json`, for scripts.

use std::path::PathBuf;

use serde_json::Value;

use crate::admin::{AdminRequest, Revert};
use crate::config::{Config, Overrides};
use crate::oci::Digest;
use crate::registry::DeleteTarget;
use crate::time::utc;

/// How an admin command reaches Berth.
#[derive(Debug, Clone, clap::Args)]
pub struct Connection {
    /// A running Berth to talk to [default: http://127.0.0.1:5000, unless --config or
    /// --data-dir is given (and --url is not)].
    #[arg(long, env = "BERTH_URL")]
    pub url: Option<String>,
    /// User name for the admin API (basic auth).
    #[arg(long, env = "BERTH_USER")]
    pub user: Option<String>,
    /// Password for the admin API.
    #[arg(long, env = "BERTH_PASSWORD", hide_env_values = true)]
    pub password: Option<String>,
    /// Read the password from this file (its first line), instead of a flag or the environment.
    #[arg(long, env = "BERTH_PASSWORD_FILE", conflicts_with = "password")]
    pub password_file: Option<PathBuf>,
    /// Open the deployment this configuration file describes directly, instead of over HTTP.
    #[arg(long, short = 'c', env = "BERTH_CONFIG")]
    pub config: Option<PathBuf>,
    /// Open the embedded deployment in this directory directly, instead of over HTTP.
    #[arg(long, env = "BERTH_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Print the answer as JSON.
    #[arg(long)]
    pub json: bool,
}

/// Runs `request` as the connection says and prints the answer.
///
/// # Errors
/// The registry's refusal or failure, or a connection problem, for `main` to print.
pub async fn run(conn: &Connection, request: AdminRequest) -> anyhow::Result<()> {
    // A preview of a large repository takes a while: say so while it runs.
    let preview = match &request {
        AdminRequest::Preview(target) => {
            let shown = super::progress::Progress::start();
            shown.waiting(format!("working out what deleting {target} would take"));
            Some((shown, target.to_string()))
        }
        _ => None,
    };
    let value = if conn.url.is_none() && (conn.config.is_some() || conn.data_dir.is_some()) {
        direct(conn, &request).await?
    } else {
        over_http(conn, &request).await?
    };
    if let Some((shown, target)) = preview {
        shown.finish(&format!("previewed {target}"));
    }
    if conn.json {
        println!("{}", serde_json::to_string_pretty(&value)?);
    } else {
        print!("{}", render(&request, &value));
    }
    Ok(())
}

async fn direct(conn: &Connection, request: &AdminRequest) -> anyhow::Result<Value> {
    let overrides = Overrides { data_dir: conn.data_dir.clone(), ..Overrides::default() };
    let config = Config::load(conn.config.as_deref(), &overrides)?;
    let app = crate::app::App::open(&config).await?;
    // Recorded as the actor of what the command changes.
    let actor = format!("local:{}", std::env::var("USER").unwrap_or_else(|_| "unknown".into()));
    let result = request.run(&app.registry, Some(&actor)).await;
    app.registry.meta().close().await;
    result.map_err(|e| anyhow::anyhow!("{e}"))
}

async fn over_http(conn: &Connection, request: &AdminRequest) -> anyhow::Result<Value> {
    let base = conn.url.as_deref().unwrap_or("http://127.0.0.1:5000").trim_end_matches('/');
    let form = request.http();
    let url = format!("{base}/admin/v1/{}", form.path);
    let client = reqwest::Client::new();
    let method = reqwest::Method::from_bytes(form.method.as_bytes())?;
    let mut req = client.request(method, &url);
    if let Some(user) = &conn.user {
        let password = match &conn.password_file {
            Some(path) => Some(
                std::fs::read_to_string(path)
                    .map_err(|e| anyhow::anyhow!("--password-file {}: {e}", path.display()))?
                    .lines()
                    .next()
                    .unwrap_or_default()
                    .to_string(),
            ),
            None => conn.password.clone(),
        };
        req = req.basic_auth(user, password);
    }
    if let Some(body) = &form.body {
        req = req.json(body);
    }
    let res = req.send().await.map_err(|e| anyhow::anyhow!("cannot reach Berth at {base}: {e}"))?;
    let status = res.status();
    let text = res.text().await?;
    let value: Value = serde_json::from_str(&text).unwrap_or(Value::String(text));
    if !status.is_success() {
        let message =
            value["errors"][0]["message"].as_str().map_or_else(|| value.to_string(), str::to_string);
        anyhow::bail!("{status}: {message}");
    }
    Ok(value)
}

/// Parses `REPO`, `REPO:TAG` or `REPO@DIGEST`.
///
/// # Errors
/// What does not parse.
pub fn target(text: &str) -> anyhow::Result<DeleteTarget> {
    DeleteTarget::parse(text).map_err(|m| anyhow::anyhow!("`{text}`: {m}"))
}

/// The time machine's target from the command's flags.
///
/// # Errors
/// When not exactly one is given, or one does not parse.
pub fn revert_to(to: Option<&str>, at: Option<&str>, previous: bool) -> anyhow::Result<Revert> {
    match (to, at, previous) {
        (Some(d), None, false) => Ok(Revert::To(Digest::parse(d).map_err(|e| anyhow::anyhow!("--to: {e}"))?)),
        (None, Some(t), false) => {
            let ms = t
                .parse::<i64>()
                .or_else(|_| crate::time::parse_utc(t))
                .map_err(|e| anyhow::anyhow!("--at: {e}"))?;
            Ok(Revert::At(ms))
        }
        (None, None, true) => Ok(Revert::Previous),
        _ => anyhow::bail!("give exactly one of --to DIGEST, --at TIME or --previous"),
    }
}

fn s<'a>(v: &'a Value, key: &str) -> &'a str {
    v[key].as_str().unwrap_or("")
}

fn n(v: &Value, key: &str) -> i64 {
    v[key].as_i64().unwrap_or(0)
}

fn items<'a>(v: &'a Value, key: &str) -> &'a [Value] {
    v[key].as_array().map_or(&[], Vec::as_slice)
}

/// Bytes as people read them.
fn bytes(b: i64) -> String {
    crate::quota::human_bytes(b)
}

fn list(values: &[Value]) -> String {
    let names: Vec<&str> = values.iter().filter_map(Value::as_str).collect();
    if names.is_empty() { "-".into() } else { names.join(", ") }
}

fn affected(out: &mut String, verb: &str, v: &Value, key: &str) {
    let manifests = items(v, key);
    out.push_str(&format!("{verb} {} manifest(s)\n", manifests.len()));
    for m in manifests {
        out.push_str(&format!(
            "  {}@{}  tags: {}\n",
            s(m, "repository"),
            s(m, "digest"),
            list(items(m, "tags"))
        ));
    }
}

fn eviction_line(e: &Value) -> String {
    format!(
        "  last eviction {}: {} manifest(s) evicted, {} -> {} (the collector frees the bytes)\n",
        utc(n(e, "at")),
        items(e, "evicted").len(),
        bytes(n(e, "bytes_before")),
        bytes(n(e, "bytes_after"))
    )
}

/// One event as a line: id, time, kind, what, who.
fn event_line(e: &Value) -> String {
    let what = match (e["repository"].as_str(), e["tag"].as_str(), e["digest"].as_str()) {
        (Some(r), Some(t), _) => format!("{r}:{t}"),
        (Some(r), None, Some(d)) => format!("{r}@{d}"),
        (Some(r), None, None) => r.to_string(),
        (None, _, Some(d)) => d.to_string(),
        (None, _, None) => String::new(),
    };
    let moved = e["old_digest"].as_str().map(|d| format!(" (was {d})")).unwrap_or_default();
    format!(
        "{:>8}  {}  {:<20} {what}{moved}  by {}",
        n(e, "id"),
        utc(n(e, "at")),
        s(e, "kind"),
        e["actor"].as_str().unwrap_or("anonymous")
    )
}

/// The human form of an answer.
pub fn render(request: &AdminRequest, v: &Value) -> String {
    let mut out = String::new();
    match request {
        AdminRequest::Repositories { .. } => {
            out.push_str(&format!(
                "{:<40} {:>6} {:>9} {:>10} {:>12} {:>14} {:>12}  QUOTAS\n",
                "REPOSITORY", "TAGS", "MANIFESTS", "TOMBSTONES", "LIVE", "IN TOMBSTONES", "HELD"
            ));
            for r in items(v, "repositories") {
                let deleted = if r["deleted_at"].is_i64() { " (deleted)" } else { "" };
                out.push_str(&format!(
                    "{:<40} {:>6} {:>9} {:>10} {:>12} {:>14} {:>12}  {}\n",
                    format!("{}{deleted}", s(r, "name")),
                    n(r, "tags"),
                    n(r, "manifests"),
                    n(r, "tombstones"),
                    bytes(n(r, "bytes_live")),
                    bytes(n(r, "bytes_in_tombstones")),
                    bytes(n(r, "bytes_held")),
                    list(items(r, "quotas"))
                ));
            }
        }
        AdminRequest::Repository(_) => {
            out.push_str(&format!(
                "{}: {} tags, {} manifests, {} tombstones; {} live, {} in tombstones; holds {} (quotas: {})\n",
                s(v, "name"),
                n(v, "tags"),
                n(v, "manifests"),
                n(v, "tombstones"),
                bytes(n(v, "bytes_live")),
                bytes(n(v, "bytes_in_tombstones")),
                bytes(n(v, "bytes_held")),
                list(items(v, "quotas"))
            ));
        }
        AdminRequest::Delete(_) | AdminRequest::ForceDelete(_) => {
            affected(&mut out, &format!("deleted {}:", s(v, "target")), v, "deleted")
        }
        AdminRequest::ReportInUse { .. } => {
            out.push_str(&format!(
                "{} pins {} manifests until {}\n",
                s(v, "source"),
                items(v, "pinned").len(),
                utc(n(v, "expires_at"))
            ));
            for u in items(v, "unresolved") {
                out.push_str(&format!("  not pinned: {} ({})\n", s(u, "reference"), s(u, "why")));
            }
        }
        AdminRequest::WithdrawInUse(source) => out.push_str(&format!("withdrew the report of {source}\n")),
        AdminRequest::InUse => {
            for r in items(v, "reports") {
                let state = if r["lapsed"].as_bool() == Some(true) { "lapsed" } else { "pins until" };
                out.push_str(&format!(
                    "{}: reported at {} by {}, {state} {}\n",
                    s(r, "source"),
                    utc(n(r, "reported_at")),
                    r["reported_by"].as_str().unwrap_or("anonymous"),
                    utc(n(r, "expires_at"))
                ));
                for p in items(r, "pinned") {
                    out.push_str(&format!(
                        "  {}@{}  ({})\n",
                        s(p, "repository"),
                        s(p, "digest"),
                        s(p, "reference")
                    ));
                }
            }
        }
        AdminRequest::ProxyStatus => {
            let proxies = items(v, "proxies");
            if proxies.is_empty() {
                out.push_str("no pull-through caches are configured ([[proxy]])\n");
            }
            for p in proxies {
                let cap = p["max_bytes"].as_i64().map(|m| format!(" of {}", bytes(m))).unwrap_or_default();
                let default = if p["default"].as_bool() == Some(true) { " (default mirror)" } else { "" };
                out.push_str(&format!(
                    "{}/…  ←  {}{default}\n  holds {}{cap}; tags trusted for {} s\n",
                    s(p, "prefix"),
                    s(p, "upstream"),
                    bytes(n(p, "bytes")),
                    n(p, "tag_ttl_secs")
                ));
                let r = &p["requests"];
                let ratio =
                    p["hit_ratio"].as_f64().map_or("-".to_string(), |h| format!("{:.1} %", h * 100.0));
                out.push_str(&format!(
                    "  since start: {} hits, {} misses, {} revalidated, {} stale, {} errors; hit ratio {ratio}; {} read upstream\n",
                    n(r, "hit"),
                    n(r, "miss"),
                    n(r, "revalidated"),
                    n(r, "stale"),
                    n(r, "error"),
                    bytes(n(p, "upstream_bytes"))
                ));
                match p["last_eviction"].as_object() {
                    Some(_) => out.push_str(&eviction_line(&p["last_eviction"])),
                    None => out.push_str("  no eviction in this process yet\n"),
                }
            }
        }
        AdminRequest::QuotaStatus(_) => {
            let quotas = items(v, "quotas");
            if quotas.is_empty() {
                out.push_str("no quotas are configured ([[quotas]])\n");
            }
            for q in quotas {
                let used = n(q, "used_bytes");
                let max = n(q, "max_bytes");
                let fraction = q["used_fraction"].as_f64().unwrap_or(0.0);
                out.push_str(&format!(
                    "{} ({})\n  {} of {} ({:.1} %, warns at {:.0} %)\n",
                    s(q, "rule"),
                    s(q, "repositories"),
                    bytes(used),
                    bytes(max),
                    fraction * 100.0,
                    q["warn_at"].as_f64().unwrap_or(0.0) * 100.0
                ));
                let repos = match q["max_repositories"].as_i64() {
                    Some(m) => format!("{} of {m} repositories", n(q, "used_repositories")),
                    None => format!("{} repositories", n(q, "used_repositories")),
                };
                let counted =
                    q["counted_at"].as_i64().map_or("never counted: not enforced yet".to_string(), |t| {
                        format!("counted from scratch {}", utc(t))
                    });
                out.push_str(&format!("  {repos}; {counted}\n"));
            }
        }
        AdminRequest::EventsStatus => {
            let endpoints = items(v, "endpoints");
            if endpoints.is_empty() {
                out.push_str("no events endpoints are configured ([[events.endpoints]])\n");
            }
            for e in endpoints {
                let oldest = e["oldest_pending_at"].as_i64().map_or("-".to_string(), utc);
                out.push_str(&format!(
                    "{} ({}) -> {}\n  pending {}, oldest undelivered {oldest} (lag {} s); delivered {}, given up {}\n",
                    s(e, "name"),
                    s(e, "format"),
                    s(e, "url"),
                    n(e, "pending"),
                    n(e, "lag_seconds"),
                    n(e, "delivered"),
                    n(e, "failed")
                ));
                out.push_str(&format!(
                    "  dead letters {}, queued replays {}, failures in a row {}\n",
                    n(e, "dead_letters"),
                    n(e, "replays"),
                    n(e, "failures")
                ));
                if let Some(error) = e["last_error"].as_str() {
                    out.push_str(&format!("  last error: {error}\n"));
                }
                if let Some(at) = e["last_success_at"].as_i64() {
                    out.push_str(&format!("  last delivered {}\n", utc(at)));
                }
            }
        }
        AdminRequest::EventsLog { .. } => {
            for e in items(v, "events") {
                out.push_str(&format!("{}\n", event_line(e)));
            }
        }
        AdminRequest::DeadLetters { .. } => {
            let letters = items(v, "dead_letters");
            if letters.is_empty() {
                out.push_str(&format!("{} has no dead letters\n", s(v, "endpoint")));
            }
            for d in letters {
                out.push_str(&format!(
                    "{}\n  given up {} after {} attempts: {}\n",
                    event_line(&d["event"]),
                    utc(n(d, "at")),
                    n(d, "attempts"),
                    d["last_error"].as_str().unwrap_or("-")
                ));
            }
        }
        AdminRequest::ReplayEvents { .. } => {
            out.push_str(&format!(
                "{} event(s) queued for delivery again to {}\n",
                n(v, "queued"),
                s(v, "endpoint")
            ));
        }
        AdminRequest::ProxyEvict => {
            for e in items(v, "evictions") {
                out.push_str(&format!("{}:\n", s(e, "proxy")));
                out.push_str(&eviction_line(e));
                for m in items(e, "evicted") {
                    out.push_str(&format!("    evicted {}\n", m.as_str().unwrap_or("")));
                }
                for m in items(e, "kept") {
                    out.push_str(&format!("    kept {}\n", m.as_str().unwrap_or("")));
                }
            }
        }
        AdminRequest::Restore { .. } => {
            affected(&mut out, &format!("restored {}:", s(v, "target")), v, "restored")
        }
        AdminRequest::BulkRestore { .. } => bulk_restore_report(&mut out, v),
        AdminRequest::BulkRestores => {
            for r in items(v, "restores") {
                out.push_str(&bulk_restore_line(r));
            }
        }
        AdminRequest::BulkRestoreRecord(_) => {
            out.push_str(&bulk_restore_line(v));
            for d in items(v, "undone") {
                out.push_str(&format!("  undid {}\n", delete_line(d, "at", "actor")));
            }
            let conflicts: Vec<Value> =
                v["conflict_list"].as_str().and_then(|l| serde_json::from_str(l).ok()).unwrap_or_default();
            for c in &conflicts {
                out.push_str(&format!(
                    "  conflict {}: {}\n",
                    delete_line(c, "deleted_at", "deleted_by"),
                    s(c, "reason")
                ));
            }
        }
        AdminRequest::Preview(_) => {
            match v["refused"].as_str() {
                Some(why) => out.push_str(&format!("deleting {} would be refused: {why}\n", s(v, "target"))),
                None => out.push_str(&format!(
                    "deleting {} would free {} ({} blobs nothing else holds) once the windows pass\n",
                    s(v, "target"),
                    bytes(n(v, "bytes_freed")),
                    n(v, "blobs_freed")
                )),
            }
            out.push_str(&format!(
                "  manifests: {}\n  tags: {}\n",
                list(items(v, "manifests")),
                list(items(v, "tags"))
            ));
        }
        AdminRequest::Tombstones(_) => {
            let tombstones = items(v, "tombstones");
            if tombstones.is_empty() {
                out.push_str(&format!("{} has no tombstones\n", s(v, "repository")));
            }
            for t in tombstones {
                out.push_str(&format!(
                    "{}  deleted {} by {} ({})\n  tags: {}  referrers: {}\n",
                    s(t, "digest"),
                    utc(n(t, "deleted_at")),
                    t["deleted_by"].as_str().unwrap_or("anonymous"),
                    s(t, "deleted_why"),
                    list(items(t, "tags")),
                    list(items(t, "referrers"))
                ));
                match t["unrestorable_reason"].as_str() {
                    None => out.push_str(&format!("  restorable until {}\n", utc(n(t, "purge_after")))),
                    Some(why) => out.push_str(&format!("  not restorable: {why}\n")),
                }
            }
        }
        AdminRequest::History(..) => {
            for h in items(v, "history") {
                let from = h["old_digest"].as_str().unwrap_or("-");
                let to = h["new_digest"].as_str().unwrap_or("-");
                let bulk =
                    h["bulk_restore"].as_i64().map(|b| format!("  (bulk restore {b})")).unwrap_or_default();
                out.push_str(&format!(
                    "{}  {:<8} {:<20} {} -> {}  by {}{bulk}\n",
                    utc(n(h, "at")),
                    s(h, "kind"),
                    s(h, "tag"),
                    from,
                    to,
                    h["actor"].as_str().unwrap_or("anonymous")
                ));
            }
        }
        AdminRequest::Revert { .. } => {
            out.push_str(&format!(
                "{}:{} now points at {}\n",
                s(v, "repository"),
                s(v, "tag"),
                s(v, "digest")
            ));
        }
        AdminRequest::Space(_) => {
            let whom = v["repository"].as_str().map_or("the registry".to_string(), str::to_string);
            out.push_str(&format!(
                "{whom}: {} blobs, {} stored\n",
                n(v, "blobs"),
                bytes(n(v, "bytes_stored"))
            ));
            for (key, label) in [
                ("bytes_live", "live (referenced by a live manifest here)"),
                ("bytes_live_elsewhere", "live elsewhere (held here by a link or a tombstone)"),
                ("bytes_in_tombstones", "held only by restorable tombstones"),
                ("bytes_in_grace", "unreferenced, within blob grace"),
                ("bytes_pending_reclaim", "due: the next collection pass frees it"),
            ] {
                out.push_str(&format!("  {:>12}  {label}\n", bytes(n(v, key))));
            }
            if v["repository"].is_string() {
                out.push_str(&format!(
                    "  {:>12}  held by this repository alone\n",
                    bytes(n(v, "bytes_exclusive"))
                ));
            }
            for step in items(v, "reclaim_schedule") {
                out.push_str(&format!(
                    "  {} becomes reclaimable at {}\n",
                    bytes(step[1].as_i64().unwrap_or(0)),
                    utc(step[0].as_i64().unwrap_or(0))
                ));
            }
        }
        AdminRequest::Backups => {
            if items(v, "backups").is_empty() {
                out.push_str("no backup recorded\n");
            }
            for b in items(v, "backups") {
                let took = b["finished_at"].as_i64().map_or(String::new(), |f| {
                    format!(", took {:.1} s", (f - b["started_at"].as_i64().unwrap_or(f)) as f64 / 1000.0)
                });
                out.push_str(&format!(
                    "{} {:<8} to {}: {} keys ({}), {} copied ({}){took}{}\n",
                    s(b, "id"),
                    s(b, "state"),
                    s(b, "location"),
                    n(b, "keys"),
                    bytes(n(b, "bytes")),
                    n(b, "keys_copied"),
                    bytes(n(b, "bytes_copied")),
                    b["error"].as_str().map(|e| format!("\n    {e}")).unwrap_or_default()
                ));
            }
        }
        AdminRequest::GcStatus => {
            for q in items(v, "queue") {
                let oldest = q["oldest_due_ms"]
                    .as_i64()
                    .map(|ms| format!(", oldest due {} s ago", ms / 1000))
                    .unwrap_or_default();
                out.push_str(&format!(
                    "queue {:<8} {} queued, {} due, {} overdue{oldest}\n",
                    s(q, "kind"),
                    n(q, "queued"),
                    n(q, "due"),
                    n(q, "overdue")
                ));
            }
            let o = &v["outbox"];
            out.push_str(&format!(
                "outbox: {} keys to delete, {} failing\nupload sessions due to expire: {}\n",
                n(o, "keys"),
                n(o, "failing"),
                n(v, "uploads_expiring")
            ));
            for p in items(v, "passes").iter().take(5) {
                out.push_str(&format!(
                    "pass {} on {}: {} ms, {} reviews, {} manifests, {} blobs ({}), {} uploads, {} errors\n",
                    utc(n(p, "started_at")),
                    s(p, "replica"),
                    n(p, "finished_at") - n(p, "started_at"),
                    n(p, "reviews"),
                    n(p, "manifests"),
                    n(p, "blobs"),
                    bytes(n(p, "bytes")),
                    n(p, "uploads_expired"),
                    n(p, "errors")
                ));
            }
            for p in items(v, "progress") {
                let at = if s(p, "resume_after").is_empty() {
                    "at the start".to_string()
                } else {
                    format!("after {}", s(p, "resume_after"))
                };
                out.push_str(&format!(
                    "{}: {} passes done, this one {at}, last step {}\n",
                    s(p, "name"),
                    n(p, "passes"),
                    utc(n(p, "step_at"))
                ));
            }
            let findings = items(v, "findings");
            if findings.is_empty() {
                out.push_str("the scrub has found nothing wrong\n");
            }
            for f in findings {
                out.push_str(&format!(
                    "FOUND {} {}: {} ({})\n",
                    s(f, "kind"),
                    s(f, "subject"),
                    s(f, "detail"),
                    utc(n(f, "found_at"))
                ));
            }
        }
        AdminRequest::Explain(_) => {
            let state = s(v, "state");
            out.push_str(&format!(
                "{} {} is {state} ({})\n",
                s(v, "kind"),
                s(v, "subject"),
                bytes(n(v, "size"))
            ));
            for h in items(v, "holds") {
                let until = h["until"].as_i64().map(|t| format!(" until {}", utc(t))).unwrap_or_default();
                out.push_str(&format!("  held: {} {}{until}\n", s(h, "reason"), s(h, "detail")));
            }
            if n(v, "holds_not_listed") > 0 {
                out.push_str(&format!("  held: and {} more\n", n(v, "holds_not_listed")));
            }
            for l in items(v, "links") {
                let how = match l["until"].as_i64() {
                    Some(t) => format!("unreferenced there; unlinked after {}", utc(t)),
                    None => "referenced there".into(),
                };
                let hidden = if l["hidden"].as_bool() == Some(true) {
                    " (hidden by the repository's delete; a restore shows it again)"
                } else {
                    ""
                };
                out.push_str(&format!("  linked in {}{hidden}: {how}\n", s(l, "repository")));
            }
            match (state, v["collect_at"].as_i64(), v["due"].as_bool() == Some(true)) {
                ("gone", ..) => {
                    out.push_str("  nothing stored under this name (never pushed, or collected)\n")
                }
                (_, None, _) => out.push_str("  not collected while the holds without an end last\n"),
                (_, Some(_), true) => out.push_str("  due: the next collection pass takes it\n"),
                (_, Some(t), false) => {
                    out.push_str(&format!("  collected at {} if nothing changes\n", utc(t)))
                }
            }
        }
        AdminRequest::Purge { .. } => {
            affected(
                &mut out,
                &format!("purged blob {} ({}):", s(v, "digest"), bytes(n(v, "size"))),
                v,
                "manifests",
            );
            out.push_str(&format!("  unlinked from: {}\n", list(items(v, "unlinked_from"))));
            if v["bytes_deleted"].as_bool() == Some(true) {
                out.push_str("  bytes deleted from storage\n");
            } else if v["held_by_backup"].as_bool() == Some(true) {
                out.push_str("  bytes held by a running backup: deleted when it ends\n");
            } else {
                out.push_str(&format!(
                    "  BYTES NOT DELETED from storage yet ({}): the collector's outbox retries {}\n",
                    s(v, "storage_error"),
                    s(v, "storage_key")
                ));
            }
        }
        AdminRequest::RetentionRun { .. } => retention_report(&mut out, v),
        AdminRequest::RetentionStatus => {
            out.push_str(&format!("rules: {}\n", list(items(v, "rules"))));
            out.push_str(&format!("immutable: {}\n", list(items(v, "immutable"))));
            match n(v, "interval_ms") {
                0 => out.push_str("schedule: off (runs only on demand)\n"),
                ms => out.push_str(&format!("schedule: every {} s\n", ms / 1000)),
            }
            for r in items(v, "last_runs") {
                out.push_str(&format!(
                    "run {:<5} {}  by {:<16} {} tags, {} manifests removed, {} skipped, {} errors  {}\n",
                    n(r, "id"),
                    utc(n(r, "started_at")),
                    s(r, "started_by"),
                    n(r, "tags_removed"),
                    n(r, "manifests_removed"),
                    n(r, "skipped"),
                    n(r, "errors"),
                    s(r, "by_rule")
                ));
            }
        }
        AdminRequest::Unlock { .. } => out.push_str(&format!(
            "{}:{} (at {}) may be moved or deleted once in the next {} s\n",
            s(v, "repository"),
            s(v, "tag"),
            s(v, "digest"),
            n(v, "for_ms") / 1000
        )),
    }
    out
}

/// One delete of a bulk restore: what, where, when and by whom (`at` and `by` name the fields).
fn delete_line(d: &Value, at: &str, by: &str) -> String {
    let what = match s(d, "kind") {
        "tag" => format!("tag {}:{}", s(d, "repository"), s(d, "target")),
        "manifest" => format!("manifest {}@{}", s(d, "repository"), s(d, "target")),
        _ => format!("repository {}", s(d, "repository")),
    };
    let id = if d["delete_id"].is_i64() { n(d, "delete_id") } else { n(d, "id") };
    format!("{what} (delete {id}, by {} at {})", d[by].as_str().unwrap_or("anonymous"), utc(n(d, at)))
}

fn bulk_restore_line(r: &Value) -> String {
    let finished = if r["finished_at"].is_i64() { "" } else { " (stopped before its end)" };
    format!(
        "bulk restore {}  {} by {}: {} restored, {} unchanged, {} conflicts{finished}  selection {}\n",
        n(r, "id"),
        utc(n(r, "started_at")),
        r["actor"].as_str().unwrap_or("anonymous"),
        n(r, "restored"),
        n(r, "unchanged"),
        n(r, "conflicts"),
        s(r, "selection")
    )
}

fn bulk_restore_report(out: &mut String, v: &Value) {
    let dry = v["dry_run"].as_bool() == Some(true);
    for item in items(v, "items") {
        let line = delete_line(item, "deleted_at", "deleted_by");
        match (s(item, "outcome"), dry) {
            ("restored", true) => out.push_str(&format!("  would restore {line}\n")),
            ("restored", false) => out.push_str(&format!("  restored {line}\n")),
            (outcome, _) => out.push_str(&format!("  {outcome} {line}: {}\n", s(item, "reason"))),
        }
    }
    let verb = if dry { "would restore" } else { "restored" };
    let id = if dry { "dry run".to_string() } else { format!("bulk restore {}", n(v, "id")) };
    out.push_str(&format!(
        "{id}: {verb} {} deletes; {} back already; {} conflicts\n",
        n(v, "restored"),
        n(v, "unchanged"),
        n(v, "conflicts")
    ));
}

fn retention_report(out: &mut String, v: &Value) {
    let dry = v["dry_run"].as_bool() == Some(true);
    let (tags, manifests) = (items(v, "tags"), items(v, "manifests"));
    if dry {
        out.push_str(&format!(
            "would remove {} tag(s) and {} untagged manifest(s) in {} repositories ({} tags considered), \
             freeing {} once the collector has run\n",
            tags.len(),
            manifests.len(),
            n(v, "repositories"),
            n(v, "tags_considered"),
            bytes(n(v, "bytes_freed"))
        ));
    } else {
        out.push_str(&format!(
            "run {}: {} repositories, {} tags considered; {} removals skipped (changed since evaluated); \
             undo with `berth retention undo {}`\n",
            n(v, "run_id"),
            n(v, "repositories"),
            n(v, "tags_considered"),
            n(v, "skipped"),
            n(v, "run_id")
        ));
    }
    for t in tags {
        out.push_str(&format!(
            "  {}:{}  ({})  rule {}  pushed {}{}\n",
            s(t, "repository"),
            s(t, "tag"),
            s(t, "digest"),
            s(t, "rule"),
            utc(n(t, "pushed_at")),
            t["outcome"].as_str().map(|o| format!("  {o}")).unwrap_or_default()
        ));
    }
    for m in manifests {
        out.push_str(&format!(
            "  {}@{}  rule {}  untagged, last used {}{}\n",
            s(m, "repository"),
            s(m, "digest"),
            s(m, "rule"),
            utc(n(m, "last_used")),
            m["outcome"].as_str().map(|o| format!("  {o}")).unwrap_or_default()
        ));
    }
    for k in items(v, "kept_in_use") {
        let what = match k["tag"].as_str() {
            Some(tag) => format!("{}:{tag}  ({})", s(k, "repository"), s(k, "digest")),
            None => format!("{}@{}", s(k, "repository"), s(k, "digest")),
        };
        out.push_str(&format!("  {what}  rule {}  kept: {}\n", s(k, "rule"), s(k, "kept")));
    }
    for e in items(v, "errors") {
        out.push_str(&format!("  error: {}\n", e.as_str().unwrap_or_default()));
    }
}
