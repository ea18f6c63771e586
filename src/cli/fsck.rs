//! `berth fsck`: opens the deployment, checks it, prints the report, and exits 1 when it found a
//! problem.

use super::FsckArgs;
use crate::registry::FsckReport;

/// Runs the check.
///
/// # Errors
/// When the deployment cannot be opened or read; an unclean report exits the process with 1.
pub(super) async fn run(args: FsckArgs) -> anyhow::Result<()> {
    let config = args.common.load(None)?;
    let app = crate::app::App::open(&config).await?;
    let shown = super::progress::Progress::start();
    let progress = |blobs: u64, bytes: u64| {
        if blobs.is_multiple_of(64) {
            shown.update(|| format!("{blobs} blobs, {} MiB checked", bytes / (1024 * 1024)));
        }
    };
    let repaired = if args.repair {
        shown.update(|| "repairing".into());
        Some(app.registry.repair().await.map_err(|e| anyhow::anyhow!("{e}"))?)
    } else {
        None
    };
    let report = app.registry.fsck(args.rehash, &progress).await.map(|r| FsckReport { repaired, ..r });
    if let Ok(r) = &report {
        shown.finish(&format!("checked {} blobs ({} MiB)", r.blobs_checked, r.bytes_checked / (1024 * 1024)));
    }
    app.registry.meta().close().await;
    let report = report.map_err(|e| anyhow::anyhow!("{e}"))?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", render(&report));
    }
    if !report.clean() {
        std::process::exit(1);
    }
    Ok(())
}

fn render(r: &FsckReport) -> String {
    let mut out = String::new();
    if let Some(fixed) = &r.repaired {
        out.push_str(&format!(
            "repaired: {} outbox entries naming live blobs dropped, {} stale reviews dropped, \
             {} rows queued for review, {} orphaned objects ({} bytes) deleted{}\n",
            fixed.outbox_entries_dropped,
            fixed.stale_reviews_dropped,
            fixed.rows_requeued,
            fixed.orphans_removed,
            fixed.orphan_bytes,
            if fixed.objects_failed > 0 {
                format!(", {} deletes failed (the collector retries them)", fixed.objects_failed)
            } else {
                String::new()
            }
        ));
        if !fixed.quotas_reset.is_empty() {
            out.push_str(&format!(
                "repaired: quota usage reset to a fresh count: {}\n",
                fixed.quotas_reset.join(", ")
            ));
        }
    }
    out.push_str(&format!(
        "checked {} blobs ({} bytes){}\n",
        r.blobs_checked,
        r.bytes_checked,
        if r.rehashed { ", re-hashed" } else { "" }
    ));
    for (label, findings) in [("PROBLEM", &r.problems), ("warning", &r.warnings)] {
        for f in findings {
            let repo = f.repository.as_deref().map(|r| format!("{r} ")).unwrap_or_default();
            out.push_str(&format!("{label} {}: {repo}{} {}\n", f.kind, f.subject, f.detail));
        }
    }
    if !r.orphans.is_empty() {
        out.push_str(&format!(
            "{} storage objects ({} bytes) are not accounted for by any row (left by interrupted writes; \
             the sweep or `fsck --repair` removes them once older than gc.blob_grace):\n",
            r.orphans.len(),
            r.orphan_bytes
        ));
        for key in r.orphans.iter().take(20) {
            out.push_str(&format!("  {key}\n"));
        }
        if r.orphans.len() > 20 {
            out.push_str("  …\n");
        }
    }
    out.push_str(if r.clean() { "consistent\n" } else { "INCONSISTENT\n" });
    out
}
