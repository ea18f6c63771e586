//! Quotas as the faces show them: each rule's limits beside its scope's usage, kept by the
//! transactions that change it (docs/quotas.md).

use super::{Registry, Result};
use crate::meta::QuotaCount;

/// One quota rule with its scope's usage.
#[derive(Debug, Clone, serde::Serialize)]
pub struct QuotaStatus {
    /// The rule.
    pub rule: String,
    /// Its scope.
    pub repositories: String,
    /// Bytes the scope holds.
    pub used_bytes: i64,
    /// The limit.
    pub max_bytes: u64,
    /// `used_bytes` as a fraction of `max_bytes`.
    pub used_fraction: f64,
    /// Where it warns.
    pub warn_at: f64,
    /// Repositories the scope holds (not deleted).
    pub used_repositories: i64,
    /// Their limit, if any.
    pub max_repositories: Option<u64>,
    /// When the usage was last counted from scratch (Unix ms); `None` while it never was (no
    /// limit is enforced until then).
    pub counted_at: Option<i64>,
}

impl Registry {
    /// Every configured quota with its usage (or only `rule`), in name order. Reads the kept
    /// figures: one row per rule, whatever the scope's size.
    ///
    /// # Errors
    /// [`super::Error::NotFound`] for an unknown rule; [`super::Error::Internal`].
    pub async fn quota_status(&self, rule: Option<&str>) -> Result<Vec<QuotaStatus>> {
        if let Some(name) = rule
            && self.meta.quotas().rule(name).is_none()
        {
            return Err(super::Error::NotFound(format!("no quota rule `{name}` is configured")));
        }
        let usage = self.meta.quota_usage().await?;
        Ok(self
            .meta
            .quotas()
            .rules()
            .iter()
            .filter(|r| rule.is_none_or(|name| r.name == name))
            .map(|r| {
                let scope = self.meta.quotas().scope_of(r);
                let u = usage.iter().find(|u| u.rule == r.name && u.pattern == scope);
                let used_bytes = u.map_or(0, |u| u.bytes);
                QuotaStatus {
                    rule: r.name.clone(),
                    repositories: r.repositories.as_str().to_string(),
                    used_bytes,
                    max_bytes: r.max_bytes,
                    used_fraction: used_bytes as f64 / r.max_bytes as f64,
                    warn_at: r.warn_at,
                    used_repositories: u.map_or(0, |u| u.repositories),
                    max_repositories: r.max_repositories,
                    counted_at: u.and_then(|u| u.counted_at),
                }
            })
            .collect())
    }

    /// Refuses a new upload session in `repo` when a quota's scope holding it is full already:
    /// its completion could only be refused (or add nothing), and bytes in open sessions are not
    /// counted — so a full scope cannot be filled further with sessions never completed.
    pub(super) async fn refuse_full_scope(&self, repo: &crate::oci::RepoName) -> Result<()> {
        let quotas = self.meta.quotas();
        let covering = quotas.covering(repo.as_str());
        if covering.is_empty() {
            return Ok(());
        }
        let usage = self.meta.quota_usage().await?;
        for rule in covering.into_iter().map(|i| &quotas.rules()[i]) {
            let scope = quotas.scope_of(rule);
            let full =
                usage.iter().find(|u| u.rule == rule.name && u.pattern == scope && u.counted_at.is_some());
            if let Some(u) = full.filter(|u| u.bytes >= i64::try_from(rule.max_bytes).unwrap_or(i64::MAX)) {
                return Err(super::Error::QuotaExceeded(format!(
                    "quota `{}` ({}) is full: {} used of {}; nothing more can be uploaded into {repo}",
                    rule.name,
                    rule.repositories.as_str(),
                    crate::quota::human_bytes(u.bytes),
                    crate::quota::human_bytes(i64::try_from(rule.max_bytes).unwrap_or(i64::MAX))
                )));
            }
        }
        Ok(())
    }

    /// Counts every configured quota's scope from scratch and compares with the kept figures
    /// (`berth fsck`); with `reset`, the counts replace them (`berth fsck --repair`).
    ///
    /// # Errors
    /// [`super::Error::Internal`].
    pub async fn count_quotas(&self, reset: bool) -> Result<Vec<QuotaCount>> {
        let mut counts = Vec::new();
        for rule in self.meta.quotas().rules() {
            if let Some(count) = self.meta.count_quota(&rule.name, reset, self.clock.now_ms()).await? {
                counts.push(count);
            }
        }
        Ok(counts)
    }
}
