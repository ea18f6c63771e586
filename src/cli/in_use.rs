//! `berth in-use`: report what a source runs, list the reports, withdraw one — and the
//! Kubernetes reporter, which turns `kubectl get pods -A -o json` into a report.

use std::collections::BTreeSet;
use std::path::PathBuf;

use clap::Subcommand;
use serde_json::Value;

use super::admin;
use crate::admin::AdminRequest;

/// `berth in-use …`.
#[derive(Debug, clap::Args)]
pub struct InUseArgs {
    /// What to do.
    #[command(subcommand)]
    pub action: InUseAction,
}

/// `berth in-use …`.
#[derive(Debug, Subcommand)]
pub enum InUseAction {
    /// Replace SOURCE's report with the references in FILE (one per line, `REPO@DIGEST` or
    /// `REPO:TAG`; `-` reads standard input; blank lines and `#` comments are skipped).
    Report(ReportArgs),
    /// Report what a Kubernetes cluster runs: reads `kubectl get pods -A -o json` on standard
    /// input and reports, for every container whose image comes from --registry, the digest the
    /// node resolved (from the pod's status), or the tag while it has none yet.
    ///
    /// Example: `kubectl get pods -A -o json | berth in-use kubernetes prod --registry registry.example.com --ttl 2h`
    Kubernetes(KubernetesArgs),
    /// Every report with what it pins.
    List(ListArgs),
    /// Withdraw SOURCE's report: nothing it pinned is held by it any more.
    Withdraw(WithdrawArgs),
}

/// `berth in-use report`.
#[derive(Debug, clap::Args)]
pub struct ReportArgs {
    /// The source (a cluster, a deploy system): letters, digits, `.`, `_`, `-`.
    pub source: String,
    /// The references, one per line (`-`: standard input).
    pub file: PathBuf,
    /// How long the report pins before it lapses unless reported again.
    #[arg(long, default_value = "1h")]
    pub ttl: String,
    /// How to reach Berth.
    #[command(flatten)]
    pub conn: admin::Connection,
}

/// `berth in-use kubernetes`.
#[derive(Debug, clap::Args)]
pub struct KubernetesArgs {
    /// The source (the cluster's name).
    pub source: String,
    /// This registry's host as the cluster's image references name it (`host` or `host:port`).
    #[arg(long)]
    pub registry: String,
    /// How long the report pins before it lapses unless reported again (report more often).
    #[arg(long, default_value = "1h")]
    pub ttl: String,
    /// Print the references instead of reporting them.
    #[arg(long)]
    pub print: bool,
    /// How to reach Berth.
    #[command(flatten)]
    pub conn: admin::Connection,
}

/// `berth in-use list`.
#[derive(Debug, clap::Args)]
pub struct ListArgs {
    /// How to reach Berth.
    #[command(flatten)]
    pub conn: admin::Connection,
}

/// `berth in-use withdraw`.
#[derive(Debug, clap::Args)]
pub struct WithdrawArgs {
    /// The source.
    pub source: String,
    /// How to reach Berth.
    #[command(flatten)]
    pub conn: admin::Connection,
}

/// Runs `berth in-use …`.
///
/// # Errors
/// Bad input, or the registry's refusal.
pub(super) async fn run(args: InUseArgs) -> anyhow::Result<()> {
    let (conn, request) = match args.action {
        InUseAction::List(a) => (a.conn, AdminRequest::InUse),
        InUseAction::Withdraw(a) => (a.conn, AdminRequest::WithdrawInUse(a.source)),
        InUseAction::Report(a) => {
            let text = if a.file.as_os_str() == "-" {
                std::io::read_to_string(std::io::stdin())?
            } else {
                std::fs::read_to_string(&a.file).map_err(|e| anyhow::anyhow!("{}: {e}", a.file.display()))?
            };
            let images = text
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty() && !l.starts_with('#'))
                .map(str::to_string)
                .collect();
            (a.conn, AdminRequest::ReportInUse { source: a.source, images, ttl_ms: ttl_ms(&a.ttl)? })
        }
        InUseAction::Kubernetes(a) => {
            let pods: Value = serde_json::from_reader(std::io::stdin().lock()).map_err(|e| {
                anyhow::anyhow!("standard input is not `kubectl get pods -o json` output: {e}")
            })?;
            let images = kubernetes_images(&pods, &a.registry)?;
            if a.print {
                for image in &images {
                    println!("{image}");
                }
                return Ok(());
            }
            (a.conn, AdminRequest::ReportInUse { source: a.source, images, ttl_ms: ttl_ms(&a.ttl)? })
        }
    };
    admin::run(&conn, request).await
}

fn ttl_ms(text: &str) -> anyhow::Result<i64> {
    let ttl = crate::config::parse_duration(text).map_err(|e| anyhow::anyhow!("--ttl: {e}"))?;
    Ok(i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX))
}

/// The references of every container (init and ephemeral ones too) of `pods` whose image comes
/// from `registry`, without the host: `REPO@DIGEST` where the pod's status names the digest the
/// node pulled, else `REPO:TAG` (or `REPO@DIGEST`) as the pod spec names it. Sorted, each once.
///
/// # Errors
/// When `pods` is not a pod list.
pub(super) fn kubernetes_images(pods: &Value, registry: &str) -> anyhow::Result<Vec<String>> {
    let items = match (pods["kind"].as_str(), pods["items"].as_array()) {
        (_, Some(items)) => items.clone(),
        (Some("Pod"), None) => vec![pods.clone()],
        _ => anyhow::bail!("expected a pod list (`kubectl get pods -A -o json`)"),
    };
    let prefix = format!("{}/", registry.trim_end_matches('/'));
    let ours = |image: &str| -> Option<String> {
        // Runtimes prefix image ids with their scheme (`docker-pullable://`).
        let image = image.split_once("://").map_or(image, |(_, rest)| rest);
        image.strip_prefix(&prefix).map(str::to_string)
    };
    let mut found = BTreeSet::new();
    for pod in &items {
        let spec = &pod["spec"];
        let status = &pod["status"];
        for (specs, statuses) in [
            ("containers", "containerStatuses"),
            ("initContainers", "initContainerStatuses"),
            ("ephemeralContainers", "ephemeralContainerStatuses"),
        ] {
            let resolved: Vec<&Value> =
                status[statuses].as_array().map(|a| a.iter().collect()).unwrap_or_default();
            for container in spec[specs].as_array().into_iter().flatten() {
                let Some(image) = container["image"].as_str() else { continue };
                let Some(reference) = ours(image) else { continue };
                let name = container["name"].as_str().unwrap_or_default();
                let runtime_id = resolved
                    .iter()
                    .find(|s| s["name"].as_str() == Some(name))
                    .and_then(|s| s["imageID"].as_str())
                    .filter(|id| !id.is_empty());
                // Only an id naming this registry is a manifest digest here (a bare `sha256:…`
                // from some runtimes is the local image id, a config digest). Its repository is
                // the one the digest was pulled from (it may differ from the spec's).
                let pulled = runtime_id.and_then(ours).and_then(|id| {
                    id.rsplit_once('@').map(|(r, d)| (repository_of(r).to_string(), d.to_string()))
                });
                if let Some((repo, digest)) = pulled {
                    found.insert(format!("{repo}@{digest}"));
                    continue;
                }
                if let Some(id) = runtime_id
                    && !reference.contains('@')
                {
                    eprintln!(
                        "warning: {}/{} container {name}: the runtime's image id {id} names no manifest of \
                         {registry}; reporting {reference}, which pins what the tag points at now",
                        pod["metadata"]["namespace"].as_str().unwrap_or("?"),
                        pod["metadata"]["name"].as_str().unwrap_or("?"),
                    );
                }
                let tagged = reference.rsplit_once(':').is_some_and(|(_, t)| !t.contains('/'));
                found.insert(if reference.contains('@') || tagged {
                    reference
                } else {
                    // No tag: Kubernetes means `latest`.
                    format!("{reference}:latest")
                });
            }
        }
    }
    Ok(found.into_iter().collect())
}

/// `REPO` of `REPO:TAG`, `REPO@DIGEST` or `REPO:TAG@DIGEST`.
fn repository_of(reference: &str) -> &str {
    let repo = reference.split_once('@').map_or(reference, |(r, _)| r);
    repo.rsplit_once(':').filter(|(_, t)| !t.contains('/')).map_or(repo, |(r, _)| r)
}
