//! Prometheus metrics: counters and histograms updated where things happen (the request log, the
//! collector), gauges read from the metadata store when scraped. Label values are static strings
//! and numbers, so the request path allocates nothing for them.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry as Metrics;

/// A request's labels.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// What kind of endpoint (`manifest`, `blob`, `upload`, `tags`, …; see [`route_of`]).
    pub route: &'static str,
    /// The HTTP method.
    pub method: &'static str,
    /// The status answered.
    pub status: u16,
}

/// A duration's labels.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabels {
    /// What kind of endpoint.
    pub route: &'static str,
    /// The HTTP method.
    pub method: &'static str,
}

/// A kind of item (`manifest`, `blob`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    /// The kind.
    pub kind: &'static str,
}

/// Berth's metrics.
#[derive(Debug)]
pub struct BerthMetrics {
    registry: Metrics,
    requests: Family<RequestLabels, Counter>,
    durations: Family<RouteLabels, Histogram>,
    bytes_in: Counter,
    bytes_out: Counter,
    request_errors: Counter,
    reviews: Counter,
    collected: Family<KindLabels, Counter>,
    bytes_freed: Counter,
    uploads_expired: Counter,
    objects_deleted: Counter,
    collector_errors: Counter,
    queue: Family<KindLabels, Gauge>,
    overdue: Family<KindLabels, Gauge>,
    oldest_due: Gauge,
    outbox: Gauge,
    outbox_failing: Gauge,
    upload_sessions: Gauge,
    findings: Gauge,
    retention_runs: Counter,
    retention_removed: Family<RuleLabels, Counter>,
    retention_skipped: Counter,
    retention_last_run: Gauge,
    proxy_requests: Family<ProxyResultLabels, Counter>,
    proxy_upstream_bytes: Family<ProxyLabels, Counter>,
    proxy_bytes: Family<ProxyLabels, Gauge>,
    events_delivered: Family<EndpointLabels, Counter>,
    events_failed: Family<EndpointLabels, Counter>,
    events_pending: Family<EndpointLabels, Gauge>,
    events_lag: Family<EndpointLabels, Gauge>,
    events_dead: Family<EndpointLabels, Gauge>,
    quota_used: Family<crate::meta::RuleLabel, Gauge>,
    quota_limit: Family<crate::meta::RuleLabel, Gauge>,
    backup_last_success: Gauge,
    backup_last_duration: Gauge,
    backup_last_bytes: Gauge,
    backup_last_keys_copied: Gauge,
    backup_last_bytes_copied: Gauge,
    backup_last_failed: Gauge,
}

/// An events endpoint's labels.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EndpointLabels {
    /// The endpoint's name.
    pub endpoint: String,
}

/// A pull-through cache's labels.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ProxyLabels {
    /// The cache (its prefix).
    pub proxy: String,
}

/// How a pull-through cache answered.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ProxyResultLabels {
    /// The cache (its prefix).
    pub proxy: String,
    /// `hit`, `miss`, `revalidated`, `stale` or `error`.
    pub result: &'static str,
}

/// Labels of what retention removed.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RuleLabels {
    /// The rule credited.
    pub rule: String,
    /// `tag` or `manifest`.
    pub kind: &'static str,
}

impl Default for BerthMetrics {
    fn default() -> Self {
        BerthMetrics::new(
            Counter::default(),
            &crate::meta::Conflicts::default(),
            &crate::meta::QuotaState::default(),
        )
    }
}

impl BerthMetrics {
    /// The metrics of a registry whose blob storage counts its resent parts in `parts_resent`
    /// and whose metadata store counts its transient conflicts in `conflicts` and its quota
    /// refusals in `quota`.
    pub fn new(
        parts_resent: Counter,
        conflicts: &crate::meta::Conflicts,
        quota: &crate::meta::QuotaState,
    ) -> Self {
        let mut registry = Metrics::with_prefix("berth");
        let r = &mut registry;
        let requests = registered(
            r,
            "http_requests",
            "HTTP requests answered, by route, method and status",
            Family::default(),
        );
        // 0.25 ms to ~16 s.
        let durations = registered(
            r,
            "http_request_duration_seconds",
            "Time to answer (streamed bodies: until the last byte was sent)",
            Family::<RouteLabels, Histogram>::new_with_constructor(|| {
                Histogram::new(exponential_buckets(0.000_25, 2.0, 17))
            }),
        );
        // Counted by the blob storage itself; registered here so it is rendered with the rest.
        registered(
            r,
            "storage_parts_resent",
            "Object-store parts streamed from a request that failed and were sent again",
            parts_resent,
        );
        // Counted by the metadata store's transactions.
        registered(
            r,
            "db_retries",
            "Write transactions run again after a transient conflict, by reason (deadlock, serialization, busy)",
            conflicts.retries.clone(),
        );
        registered(
            r,
            "db_deadlocks",
            "Deadlocks the database detected in Berth's write transactions (retried or not)",
            conflicts.deadlocks.clone(),
        );
        registered(
            r,
            "quota_refusals",
            "Changes refused because they would take a quota's scope past a limit, by rule",
            quota.refusals.clone(),
        );
        BerthMetrics {
            requests,
            durations,
            bytes_in: registered(r, "http_received_bytes", "Request body bytes received", Counter::default()),
            bytes_out: registered(r, "http_sent_bytes", "Response body bytes sent", Counter::default()),
            request_errors: registered(
                r,
                "internal_errors",
                "Requests that failed inside Berth (metadata store or storage errors)",
                Counter::default(),
            ),
            reviews: registered(r, "gc_reviews", "Reviews the collector carried out", Counter::default()),
            collected: registered(
                r,
                "gc_collected",
                "Items the collector removed, by kind",
                Family::default(),
            ),
            bytes_freed: registered(
                r,
                "gc_freed_bytes",
                "Bytes of the blobs the collector removed",
                Counter::default(),
            ),
            uploads_expired: registered(
                r,
                "gc_uploads_expired",
                "Abandoned upload sessions removed",
                Counter::default(),
            ),
            objects_deleted: registered(
                r,
                "gc_objects_deleted",
                "Storage objects deleted from the outbox",
                Counter::default(),
            ),
            collector_errors: registered(
                r,
                "gc_errors",
                "Reviews and storage deletes that failed (each is retried later)",
                Counter::default(),
            ),
            queue: registered(r, "gc_queue_reviews", "Reviews queued, by kind", Family::default()),
            overdue: registered(
                r,
                "gc_overdue_reviews",
                "Reviews due for more than an hour, by kind",
                Family::default(),
            ),
            oldest_due: registered(
                r,
                "gc_lag_seconds",
                "How long the oldest due review has waited",
                Gauge::default(),
            ),
            outbox: registered(
                r,
                "gc_outbox_keys",
                "Storage objects waiting to be deleted",
                Gauge::default(),
            ),
            outbox_failing: registered(
                r,
                "gc_outbox_failing_keys",
                "Outbox keys whose delete failed at least once",
                Gauge::default(),
            ),
            upload_sessions: registered(r, "upload_sessions", "Open upload sessions", Gauge::default()),
            findings: registered(
                r,
                "scrub_findings",
                "Problems the scrub found and has not seen mended (missing or damaged bytes, broken references)",
                Gauge::default(),
            ),
            retention_runs: registered(
                r,
                "retention_runs",
                "Real retention runs finished",
                Counter::default(),
            ),
            retention_removed: registered(
                r,
                "retention_removed",
                "Tags and untagged manifests retention removed, by rule and kind",
                Family::default(),
            ),
            retention_skipped: registered(
                r,
                "retention_skipped",
                "Removals retention left alone because the tag moved (a push won) or became immutable",
                Counter::default(),
            ),
            retention_last_run: registered(
                r,
                "retention_last_run_timestamp_seconds",
                "When this replica last finished a real retention run (Unix seconds)",
                Gauge::default(),
            ),
            proxy_requests: registered(
                r,
                "proxy_requests",
                "Pull-through cache reads, by cache and result (hit, miss, revalidated, stale, error)",
                Family::default(),
            ),
            proxy_upstream_bytes: registered(
                r,
                "proxy_upstream_bytes",
                "Bytes pull-through caches read from their upstreams (blob bodies)",
                Family::default(),
            ),
            proxy_bytes: registered(
                r,
                "proxy_bytes",
                "Bytes each pull-through cache holds (blobs its live manifests reference)",
                Family::default(),
            ),
            events_delivered: registered(
                r,
                "events_delivered",
                "Events this replica delivered, by endpoint (replays included)",
                Family::default(),
            ),
            events_failed: registered(
                r,
                "events_failed",
                "Events in sends an endpoint did not accept, by endpoint (each attempt counts)",
                Family::default(),
            ),
            events_pending: registered(
                r,
                "events_pending",
                "Events written and not yet delivered, by endpoint",
                Family::default(),
            ),
            events_lag: registered(
                r,
                "events_lag_seconds",
                "How long ago the oldest undelivered event happened, by endpoint",
                Family::default(),
            ),
            events_dead: registered(
                r,
                "events_dead_letters",
                "Events an endpoint gave up on (dead letters), by endpoint",
                Family::default(),
            ),
            quota_used: registered(
                r,
                "quota_used_bytes",
                "Bytes each quota's scope holds (kept by the transactions that change it), by rule",
                Family::default(),
            ),
            quota_limit: registered(
                r,
                "quota_limit_bytes",
                "Each quota's max_bytes, by rule",
                Family::default(),
            ),
            backup_last_success: registered(
                r,
                "backup_last_success_timestamp_seconds",
                "When the newest complete backup finished (Unix seconds; 0: none recorded)",
                Gauge::default(),
            ),
            backup_last_duration: registered(
                r,
                "backup_last_duration_seconds",
                "How long the newest complete backup took",
                Gauge::default(),
            ),
            backup_last_bytes: registered(
                r,
                "backup_last_bytes",
                "Bytes of the keys the newest complete backup's snapshot names",
                Gauge::default(),
            ),
            backup_last_keys_copied: registered(
                r,
                "backup_last_keys_copied",
                "Keys the newest complete backup copied (the rest were in its location already)",
                Gauge::default(),
            ),
            backup_last_bytes_copied: registered(
                r,
                "backup_last_bytes_copied",
                "Bytes the newest complete backup copied",
                Gauge::default(),
            ),
            backup_last_failed: registered(
                r,
                "backup_last_failed",
                "1 when the newest backup started failed, else 0",
                Gauge::default(),
            ),
            registry,
        }
    }
}

/// Registers `metric` under `name` and hands it back (metrics share their state when cloned).
fn registered<M: prometheus_client::registry::Metric + Clone>(
    r: &mut Metrics,
    name: &str,
    help: &str,
    metric: M,
) -> M {
    r.register(name, help, metric.clone());
    metric
}

impl BerthMetrics {
    /// Counts an answered request.
    pub fn request(&self, labels: RequestLabels, seconds: f64, bytes_in: u64, bytes_out: u64) {
        self.durations
            .get_or_create(&RouteLabels { route: labels.route, method: labels.method })
            .observe(seconds);
        if labels.status >= 500 {
            self.request_errors.inc();
        }
        self.requests.get_or_create(&labels).inc();
        self.bytes_in.inc_by(bytes_in);
        self.bytes_out.inc_by(bytes_out);
    }

    /// Counts what a collection pass did.
    pub fn collection(&self, report: &crate::registry::GcReport) {
        self.reviews.inc_by(report.reviews);
        self.collected.get_or_create(&KindLabels { kind: "manifest" }).inc_by(report.manifests);
        self.collected.get_or_create(&KindLabels { kind: "blob" }).inc_by(report.blobs);
        self.bytes_freed.inc_by(report.bytes);
        self.uploads_expired.inc_by(report.uploads_expired);
        self.objects_deleted.inc_by(report.objects_deleted);
        self.collector_errors.inc_by(report.review_errors + report.objects_failed);
    }

    /// Counts what a real retention run did.
    pub fn retention(&self, report: &crate::registry::RetentionReport) {
        self.retention_runs.inc();
        for t in report.tags.iter().filter(|t| t.outcome.as_deref() == Some("removed")) {
            self.retention_removed.get_or_create(&RuleLabels { rule: t.rule.clone(), kind: "tag" }).inc();
        }
        for m in report.manifests.iter().filter(|m| m.outcome.as_deref() == Some("removed")) {
            self.retention_removed
                .get_or_create(&RuleLabels { rule: m.rule.clone(), kind: "manifest" })
                .inc();
        }
        self.retention_skipped.inc_by(report.skipped);
        self.retention_last_run.set(report.finished_at / 1000);
    }

    /// Counts events delivered to `endpoint`.
    pub fn events_delivered(&self, endpoint: &str, n: usize) {
        self.events_delivered
            .get_or_create(&EndpointLabels { endpoint: endpoint.to_string() })
            .inc_by(n as u64);
    }

    /// Counts events in a send `endpoint` did not accept.
    pub fn events_failed(&self, endpoint: &str, n: usize) {
        self.events_failed.get_or_create(&EndpointLabels { endpoint: endpoint.to_string() }).inc_by(n as u64);
    }

    /// Sets `endpoint`'s delivery gauges from its state read now.
    pub fn set_events_state(&self, endpoint: &str, state: &crate::meta::EndpointState, now_ms: i64) {
        let labels = EndpointLabels { endpoint: endpoint.to_string() };
        self.events_pending.get_or_create(&labels).set(state.pending);
        self.events_lag
            .get_or_create(&labels)
            .set(state.oldest_pending_at.map_or(0, |at| (now_ms - at).max(0) / 1000));
        self.events_dead.get_or_create(&labels).set(state.dead_letters);
    }

    /// Sets the backup gauges from the newest complete backup and the newest backup of all.
    pub fn set_backups(
        &self,
        complete: Option<&crate::meta::BackupRun>,
        newest: Option<&crate::meta::BackupRun>,
    ) {
        if let Some(b) = complete {
            let finished = b.finished_at.unwrap_or(b.started_at);
            self.backup_last_success.set(finished / 1000);
            self.backup_last_duration.set((finished - b.started_at).max(0) / 1000);
            self.backup_last_bytes.set(b.bytes);
            self.backup_last_keys_copied.set(b.keys_copied);
            self.backup_last_bytes_copied.set(b.bytes_copied);
        }
        self.backup_last_failed.set(i64::from(newest.is_some_and(|b| b.state == "failed")));
    }

    /// Sets a quota's usage and limit.
    pub fn set_quota(&self, rule: &str, used: i64, limit: u64) {
        let labels = crate::meta::RuleLabel { rule: rule.to_string() };
        self.quota_used.get_or_create(&labels).set(used);
        self.quota_limit.get_or_create(&labels).set(i64::try_from(limit).unwrap_or(i64::MAX));
    }

    /// Counts a pull-through cache's answer.
    pub fn proxy_request(&self, proxy: &str, result: &'static str) {
        self.proxy_requests.get_or_create(&ProxyResultLabels { proxy: proxy.to_string(), result }).inc();
    }

    /// How many of cache `proxy`'s answers were `result`, in this process.
    pub fn proxy_requests(&self, proxy: &str, result: &'static str) -> u64 {
        self.proxy_requests.get_or_create(&ProxyResultLabels { proxy: proxy.to_string(), result }).get()
    }

    /// Counts bytes read from cache `proxy`'s upstream.
    pub fn proxy_upstream_read(&self, proxy: &str, bytes: u64) {
        self.proxy_upstream_bytes.get_or_create(&ProxyLabels { proxy: proxy.to_string() }).inc_by(bytes);
    }

    /// The bytes read from cache `proxy`'s upstream, in this process.
    pub fn proxy_upstream_total(&self, proxy: &str) -> u64 {
        self.proxy_upstream_bytes.get_or_create(&ProxyLabels { proxy: proxy.to_string() }).get()
    }

    /// Sets the space cache `proxy` holds (read for a scrape).
    pub fn set_proxy_bytes(&self, proxy: &str, bytes: i64) {
        self.proxy_bytes.get_or_create(&ProxyLabels { proxy: proxy.to_string() }).set(bytes);
    }

    /// The text exposition, with the gauges set from `status` (read from the metadata store for
    /// this scrape) and `upload_sessions`.
    pub fn render(&self, status: &crate::meta::GcStatus, upload_sessions: i64) -> String {
        let mut oldest = 0;
        for q in &status.queue {
            let kind = if q.kind == "blob" { "blob" } else { "manifest" };
            self.queue.get_or_create(&KindLabels { kind }).set(q.queued);
            self.overdue.get_or_create(&KindLabels { kind }).set(q.overdue);
            oldest = oldest.max(q.oldest_due_ms.unwrap_or(0));
        }
        self.oldest_due.set(oldest / 1000);
        self.outbox.set(status.outbox.keys);
        self.outbox_failing.set(status.outbox.failing);
        self.upload_sessions.set(upload_sessions);
        self.findings.set(status.findings.len() as i64);
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// The route label of a request path: the kind of endpoint, never the repository or digest (so
/// the label set stays small).
pub fn route_of(path: &str) -> &'static str {
    if path == "/v2" || path == "/v2/" {
        "base"
    } else if let Some(rest) = path.strip_prefix("/v2/") {
        if rest == "_catalog" {
            "catalog"
        } else if rest.contains("/manifests/") {
            "manifest"
        } else if rest.contains("/blobs/uploads") {
            "upload"
        } else if rest.contains("/blobs/") {
            "blob"
        } else if rest.ends_with("/tags/list") {
            "tags"
        } else if rest.contains("/referrers/") {
            "referrers"
        } else {
            "other"
        }
    } else if path.starts_with("/admin/") {
        "admin"
    } else if path == "/ui" || path.starts_with("/ui/") {
        "ui"
    } else {
        match path {
            "/auth/token" => "token",
            "/metrics" => "metrics",
            "/healthz" => "health",
            _ => "other",
        }
    }
}

/// A method's label.
pub fn method_label(method: &http::Method) -> &'static str {
    match *method {
        http::Method::GET => "GET",
        http::Method::HEAD => "HEAD",
        http::Method::PUT => "PUT",
        http::Method::POST => "POST",
        http::Method::PATCH => "PATCH",
        http::Method::DELETE => "DELETE",
        http::Method::OPTIONS => "OPTIONS",
        _ => "other",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_name_the_endpoint_not_the_repository() {
        assert_eq!(route_of("/v2/"), "base");
        assert_eq!(route_of("/v2/team/app/manifests/v1"), "manifest");
        assert_eq!(route_of("/v2/a/b/c/blobs/uploads/1234"), "upload");
        assert_eq!(route_of("/v2/a/blobs/sha256:00"), "blob");
        assert_eq!(route_of("/v2/a/tags/list"), "tags");
        assert_eq!(route_of("/v2/a/referrers/sha256:00"), "referrers");
        assert_eq!(route_of("/v2/_catalog"), "catalog");
        assert_eq!(route_of("/admin/v1/gc/status"), "admin");
        assert_eq!(route_of("/elsewhere"), "other");
        assert_eq!(route_of("/ui/repo"), "ui");
    }
}
