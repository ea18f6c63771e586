//! `berth import`: runs an import with a progress display and prints its report; and the check
//! that stops `berth serve` while an import has not cut over.

use super::ImportArgs;
use crate::registry::{ImportOptions, ImportProgress, ImportReport, Registry};

/// Runs the import (or lists the imports).
///
/// # Errors
/// When the deployment or the source cannot be opened, or the run fails as a whole.
pub(super) async fn run(args: ImportArgs) -> anyhow::Result<()> {
    let config = args.common.load(None)?;
    let app = crate::app::App::open(&config).await?;
    let outcome = if args.list {
        list(&app.registry, args.json).await
    } else {
        import(&app.registry, &config, &args).await
    };
    app.registry.meta().close().await;
    outcome
}

async fn import(
    registry: &Registry,
    config: &crate::config::Config,
    args: &ImportArgs,
) -> anyhow::Result<()> {
    let from = args.from.as_deref().unwrap_or_default();
    let source = crate::distribution::Source::open(from, config.storage_s3.as_ref()).await?;
    let options = ImportOptions { dry_run: args.dry_run, untagged: args.untagged, cut_over: args.cut_over };
    let shown = super::progress::Progress::start();
    shown.waiting(format!("listing {}", source.name()));
    let started = std::time::Instant::now();
    let progress = |p: ImportProgress| {
        shown.update_counted(p.repositories_done, p.repositories, || {
            let secs = started.elapsed().as_secs_f64().max(0.001);
            let rate = p.repositories_done as f64 / secs;
            let eta = (p.repositories - p.repositories_done) as f64 / rate.max(f64::MIN_POSITIVE);
            format!(
                "{}/{} repositories, {} tags, {} manifests ({:.0}/s), {} MiB adopted, about {:.0} s left",
                p.repositories_done,
                p.repositories,
                p.tags,
                p.manifests,
                p.manifests as f64 / secs,
                p.bytes / (1024 * 1024),
                eta
            )
        });
    };
    let report = registry.import(&source, options, &progress).await.map_err(|e| anyhow::anyhow!("{e}"))?;
    shown.finish(&format!(
        "{} {} repositories, {} tags",
        if report.dry_run { "looked at" } else { "imported" },
        report.repositories,
        report.tags_listed
    ));
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", render(&report));
    }
    Ok(())
}

fn render(r: &ImportReport) -> String {
    let mut out = String::new();
    let would = if r.dry_run { "would " } else { "" };
    out.push_str(&format!(
        "{}: {} repositories, {} tags listed ({} unchanged since the previous run, {} links read)\n",
        r.source, r.repositories, r.tags_listed, r.tags_unchanged, r.links_read
    ));
    for (what, list) in [("new", &r.tags_new), ("moved", &r.tags_moved), ("removed", &r.tags_removed)] {
        out.push_str(&format!("{} tags {what}: {}\n", list.len(), shorten(list)));
    }
    out.push_str(&format!(
        "{would}store {} manifests, {would}adopt {} blobs ({} bytes) in place, {would}link {} blobs already stored\n",
        r.manifests_imported, r.blobs_adopted, r.bytes_adopted, r.blobs_linked
    ));
    if r.skipped.is_empty() {
        out.push_str("nothing skipped\n");
    } else {
        out.push_str(&format!("{} skipped:\n", r.skipped.len()));
        for s in &r.skipped {
            out.push_str(&format!("  {}: {}\n", s.item, s.reason));
        }
    }
    if r.cut_over {
        out.push_str(
            "cut over: the source is marked as Berth's (the old registry's garbage-collect now refuses to run \
             on it); point clients at Berth and retire the old registry\n",
        );
    } else if !r.dry_run {
        out.push_str(
            "not cut over yet: run again to catch up, and with --final once the old registry is read-only\n",
        );
    }
    out
}

/// The first few items of a list, for a one-line summary.
fn shorten(items: &[String]) -> String {
    const SHOWN: usize = 10;
    let mut text = items.iter().take(SHOWN).cloned().collect::<Vec<_>>().join(", ");
    if items.len() > SHOWN {
        text.push_str(&format!(", … ({} more; --json lists all)", items.len() - SHOWN));
    }
    text
}

async fn list(registry: &Registry, json: bool) -> anyhow::Result<()> {
    let imports = registry.imports().await.map_err(|e| anyhow::anyhow!("{e}"))?;
    if json {
        println!("{}", serde_json::to_string_pretty(&imports)?);
        return Ok(());
    }
    if imports.is_empty() {
        println!("no imports");
    }
    for i in imports {
        let when = |ms: Option<i64>| ms.map_or("-".to_string(), crate::time::utc);
        println!(
            "{}  first run {}  last run {}  cut over {}",
            i.source,
            crate::time::utc(i.started_at),
            when(i.last_run_finished),
            when(i.cut_over_at)
        );
    }
    Ok(())
}

/// Refuses to serve while the reference registry may still write to, or collect from, storage
/// Berth adopted blobs from: an import that has not cut over, or a cut-over source whose marker
/// is gone (a source that is gone altogether — an old root deleted after the move — is retired).
///
/// # Errors
/// Naming the sources and the ways on.
pub(super) async fn refuse_live_sources(
    registry: &Registry,
    config: &crate::config::Config,
) -> anyhow::Result<()> {
    let imports = registry.imports().await.map_err(|e| anyhow::anyhow!("{e}"))?;
    let unfinished: Vec<&str> =
        imports.iter().filter(|i| i.cut_over_at.is_none()).map(|i| i.source.as_str()).collect();
    if !unfinished.is_empty() {
        anyhow::bail!(
            "an import has not cut over from {}: the reference registry may still write there. Finish it with \
             `berth import --from <source> --final` once the old registry is read-only, or serve anyway with \
             --allow-unfinished-import (BERTH_ALLOW_UNFINISHED_IMPORT=true)",
            unfinished.join(", ")
        );
    }
    for import in imports {
        let Ok(source) = crate::distribution::Source::open(&import.source, config.storage_s3.as_ref()).await
        else {
            continue;
        };
        match source.is_marked().await {
            Ok(true) => {}
            Ok(false) => anyhow::bail!(
                "the marker that stops the reference registry's garbage-collect is gone from {0} ({1}): put it \
                 back with `berth import --from {0} --final`, or serve anyway with --allow-unfinished-import",
                import.source,
                crate::distribution::OWNED_MARKER
            ),
            Err(e) => {
                tracing::warn!(source = %import.source, error = %e, "could not check an import source's marker")
            }
        }
    }
    Ok(())
}
