//! In-use reports: what sources (clusters, deploy systems) run. What a live report pins is held
//! against the collector, kept by retention, and protected from explicit deletes (an
//! administrator may force one). The rules live with the rows (`meta/in_use.rs`) and in the
//! deletes and reviews that check them under their locks.

use super::{Error, Registry, Result};
use crate::meta::{InUseReport, Reported, Unresolved};
use crate::oci::{Reference, RepoName};

/// The longest a report may pin before it lapses (a year): a dead reporter must not pin forever.
pub const MAX_TTL_MS: i64 = 366 * 24 * 3600 * 1000;

/// The most references one report may carry.
pub const MAX_REFERENCES: usize = 50_000;

/// Parses `REPO@DIGEST` or `REPO:TAG` as reported (a registry host in front is the reporter's to
/// strip: `berth in-use kubernetes --registry HOST` does).
///
/// # Errors
/// A message naming what does not parse.
pub fn parse_reference(text: &str) -> std::result::Result<(RepoName, Reference), String> {
    let text = text.trim();
    let (repo, reference) = if let Some((repo, digest)) = text.split_once('@') {
        (repo, Reference::Digest(crate::oci::Digest::parse(digest).map_err(|e| format!("{text}: {e}"))?))
    } else if let Some((repo, tag)) = text.rsplit_once(':').filter(|(_, tag)| !tag.contains('/')) {
        (repo, Reference::Tag(crate::oci::Tag::parse(tag).map_err(|e| format!("{text}: {e}"))?))
    } else {
        return Err(format!("{text}: give REPO@DIGEST or REPO:TAG"));
    };
    // `REPO:TAG@DIGEST` (what Kubernetes shows): the digest decides.
    let repo = repo.rsplit_once(':').filter(|(_, t)| !t.contains('/')).map_or(repo, |(r, _)| r);
    Ok((RepoName::parse(repo).map_err(|e| format!("{text}: {e}"))?, reference))
}

impl Registry {
    /// Replaces `source`'s report with `references`, lapsing `ttl_ms` from now.
    ///
    /// # Errors
    /// [`Error::Invalid`] for a bad source name, reference or ttl (nothing is changed);
    /// [`Error::Internal`] when the store fails.
    pub async fn report_in_use(
        &self,
        source: &str,
        references: &[String],
        ttl_ms: i64,
        actor: Option<&str>,
    ) -> Result<Reported> {
        check_source(source)?;
        if ttl_ms <= 0 || ttl_ms > MAX_TTL_MS {
            return Err(Error::Invalid(format!(
                "ttl must be more than 0 and at most {} days",
                MAX_TTL_MS / 86_400_000
            )));
        }
        if references.len() > MAX_REFERENCES {
            return Err(Error::Invalid(format!("a report carries at most {MAX_REFERENCES} references")));
        }
        // A reference that does not parse (a pod stuck in InvalidImageName) pins nothing, but must
        // not cost the rest of the report: a refused report would let every pin lapse.
        let mut parsed = Vec::with_capacity(references.len());
        let mut malformed = Vec::new();
        for text in references {
            match parse_reference(text) {
                Ok((repo, reference)) => parsed.push((repo, reference, text.trim().to_string())),
                Err(why) => malformed.push(Unresolved { reference: text.trim().to_string(), why }),
            }
        }
        let now = self.clock.now_ms();
        let mut reported =
            self.meta.report_in_use(source, &parsed, now.saturating_add(ttl_ms), actor, now).await?;
        reported.unresolved.extend(malformed);
        tracing::info!(
            target: crate::telemetry::AUDIT,
            action = "report-in-use",
            actor = actor.unwrap_or("anonymous"),
            subject = source,
            pinned = reported.report.pinned.len(),
            unresolved = reported.unresolved.len(),
            "audit"
        );
        Ok(reported)
    }

    /// Withdraws `source`'s report.
    ///
    /// # Errors
    /// [`Error::NotFound`] when it has none; [`Error::Internal`].
    pub async fn withdraw_in_use(&self, source: &str, actor: Option<&str>) -> Result<()> {
        check_source(source)?;
        if !self.meta.withdraw_in_use(source, self.clock.now_ms()).await? {
            return Err(Error::NotFound(format!("no in-use report from {source}")));
        }
        tracing::info!(
            target: crate::telemetry::AUDIT,
            action = "withdraw-in-use",
            actor = actor.unwrap_or("anonymous"),
            subject = source,
            "audit"
        );
        Ok(())
    }

    /// Every report, with what it pins.
    ///
    /// # Errors
    /// [`Error::Internal`].
    pub async fn in_use_reports(&self) -> Result<Vec<InUseReport>> {
        Ok(self.meta.in_use_reports(self.clock.now_ms()).await?)
    }
}

/// A source names a reporter: letters, digits and `._-`, 1 to 128 characters.
fn check_source(source: &str) -> Result<()> {
    let ok = !source.is_empty()
        && source.len() <= 128
        && source.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(Error::Invalid(format!("source {source:?}: 1 to 128 letters, digits, '.', '_' or '-'")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_as_reporters_give_them() {
        let d = "sha256:".to_string() + &"a".repeat(64);
        let (repo, r) = parse_reference(&format!("team/app@{d}")).unwrap();
        assert_eq!((repo.as_str(), r.to_string()), ("team/app", d.clone()));
        let (repo, r) = parse_reference("team/app:v1").unwrap();
        assert_eq!((repo.as_str(), r.to_string()), ("team/app", "v1".to_string()));
        let (repo, r) = parse_reference(&format!("team/app:v1@{d}")).unwrap();
        assert_eq!((repo.as_str(), r.to_string()), ("team/app", d));
        assert!(parse_reference("team/app").is_err());
        assert!(parse_reference("Team/App:v1").is_err());
        assert!(parse_reference("team/app@sha256:short").is_err());
    }
}
