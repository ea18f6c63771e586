//! Quotas (`[[quotas]]`): limits on the bytes and repositories a scope of repositories holds.
//!
//! What a scope holds is defined once (docs/quotas.md): the distinct blobs linked in its
//! repositories — a blob linked in two of them counts once, a blob two scopes hold counts in
//! each —, hidden links of deleted repositories among them, plus every manifest row there,
//! tombstones included, until the collector or a purge takes them; and its repositories that are
//! not deleted. A pull-through cache's repositories belong to no scope: the cache's own
//! `max_bytes` governs them. The figures are kept by the transactions that change them
//! (`meta::quotas`); this module holds the rules and the words of a refusal.

use crate::auth::Pattern;

/// One quota rule.
#[derive(Debug, Clone, PartialEq)]
pub struct QuotaRule {
    /// Its name: the usage row's key, the metrics' label, named in refusals.
    pub name: String,
    /// The repositories it covers (its scope).
    pub repositories: Pattern,
    /// The most bytes the scope may hold.
    pub max_bytes: u64,
    /// The most repositories the scope may hold, if limited.
    pub max_repositories: Option<u64>,
    /// The fraction of `max_bytes` past which a `quota.warned` event is written.
    pub warn_at: f64,
}

impl QuotaRule {
    /// The usage past which the rule warns.
    pub fn warn_bytes(&self) -> i64 {
        (self.max_bytes as f64 * self.warn_at).ceil() as i64
    }
}

/// Every quota rule of the configuration, in name order (the order their usage rows are locked
/// in), and the prefixes of the pull-through caches, whose repositories no rule covers.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Quotas {
    rules: Vec<QuotaRule>,
    cache_prefixes: Vec<String>,
}

impl Quotas {
    /// The rules (any order; they are sorted by name), excluding the caches under
    /// `cache_prefixes`.
    pub fn new(mut rules: Vec<QuotaRule>, cache_prefixes: Vec<String>) -> Self {
        rules.sort_by(|a, b| a.name.cmp(&b.name));
        Quotas { rules, cache_prefixes }
    }

    /// Whether no rule is configured (then nothing is counted or checked).
    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// The rules, in name order.
    pub fn rules(&self) -> &[QuotaRule] {
        &self.rules
    }

    /// The rule named `name`.
    pub fn rule(&self, name: &str) -> Option<&QuotaRule> {
        self.rules.iter().find(|r| r.name == name)
    }

    /// The positions (in [`Quotas::rules`]) of the rules whose scope holds `repo`.
    pub fn covering(&self, repo: &str) -> Vec<usize> {
        if self.is_cached(repo) {
            return Vec::new();
        }
        self.rules.iter().enumerate().filter(|(_, r)| r.repositories.matches(repo)).map(|(i, _)| i).collect()
    }

    /// What `rule`'s figures are counted for: its pattern, less the caches' repositories. Kept
    /// with the figures, so a change of either is seen and counted again.
    pub fn scope_of(&self, rule: &QuotaRule) -> String {
        let mut prefixes = self.cache_prefixes.clone();
        prefixes.sort();
        match prefixes.as_slice() {
            [] => rule.repositories.as_str().to_string(),
            some => format!(
                "{} except {}",
                rule.repositories.as_str(),
                some.iter().map(|p| format!("{p}/**")).collect::<Vec<_>>().join(", ")
            ),
        }
    }

    fn is_cached(&self, repo: &str) -> bool {
        self.cache_prefixes
            .iter()
            .any(|p| repo.strip_prefix(p.as_str()).is_some_and(|rest| rest.starts_with('/')))
    }
}

/// Why a change was refused: it would take a scope past a limit. Nothing of it was recorded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QuotaRefusal {
    /// The rule.
    pub rule: String,
    /// Its scope.
    pub pattern: String,
    /// A repository of the scope the change was in.
    pub repository: String,
    /// What the limit is on.
    pub limit: Limit,
    /// The scope's usage before the change.
    pub used: i64,
    /// What the change would have added.
    pub adding: i64,
    /// The limit.
    pub max: i64,
    /// When (Unix ms).
    pub at: i64,
}

/// What a quota limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    /// `max_bytes`.
    Bytes,
    /// `max_repositories`.
    Repositories,
}

impl std::fmt::Display for QuotaRefusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.limit {
            Limit::Bytes => write!(
                f,
                "quota `{}` ({}) exceeded: {} used of {}; this change adds {}",
                self.rule,
                self.pattern,
                human_bytes(self.used),
                human_bytes(self.max),
                human_bytes(self.adding)
            ),
            Limit::Repositories => write!(
                f,
                "quota `{}` ({}) exceeded: {} of {} repositories; `{}` would add one",
                self.rule, self.pattern, self.used, self.max, self.repository
            ),
        }
    }
}

/// Bytes as people read them (binary units, one decimal).
pub fn human_bytes(b: i64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut x = b as f64;
    let mut unit = 0;
    while x.abs() >= 1024.0 && unit < UNITS.len() - 1 {
        x /= 1024.0;
        unit += 1;
    }
    if unit == 0 { format!("{b} B") } else { format!("{x:.1} {}", UNITS[unit]) }
}

/// Parses a size: a number of bytes, or a number with a unit (`kB`, `MB`, `GB`, `TB` in powers
/// of 1000; `KiB`, `MiB`, `GiB`, `TiB` in powers of 1024), e.g. `"500GB"`, `"1.5 TiB"`.
///
/// # Errors
/// A message naming what is wrong.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let split = text.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let factor: u64 = match unit.trim() {
        "" | "B" => 1,
        "kB" | "KB" => 1000,
        "MB" => 1000u64.pow(2),
        "GB" => 1000u64.pow(3),
        "TB" => 1000u64.pow(4),
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        "TiB" => 1 << 40,
        other => return Err(format!("unknown size unit `{other}` (B, kB, MB, GB, TB, KiB, MiB, GiB, TiB)")),
    };
    let value: f64 = number.parse().map_err(|_| format!("`{text}` is not a size"))?;
    let bytes = value * factor as f64;
    if !bytes.is_finite() || bytes < 1.0 || bytes > i64::MAX as f64 {
        return Err(format!("`{text}` is not a size Berth can count (1 byte to 8 EiB)"));
    }
    Ok(bytes.round() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(name: &str, pattern: &str) -> QuotaRule {
        QuotaRule {
            name: name.into(),
            repositories: Pattern::parse(pattern).unwrap(),
            max_bytes: 100,
            max_repositories: None,
            warn_at: 0.9,
        }
    }

    #[test]
    fn scopes_are_matched_in_name_order_and_never_hold_a_cache() {
        let q = Quotas::new(vec![rule("z", "team-a/**"), rule("a", "**")], vec!["hub".into()]);
        assert_eq!(q.rules()[0].name, "a");
        assert_eq!(q.covering("team-a/app"), vec![0, 1]);
        assert_eq!(q.covering("team-b/app"), vec![0]);
        assert!(q.covering("hub/library/alpine").is_empty());
        assert_eq!(q.covering("hubble/app"), vec![0]);
    }

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size("1000"), Ok(1000));
        assert_eq!(parse_size("5GB"), Ok(5_000_000_000));
        assert_eq!(parse_size("1.5 KiB"), Ok(1536));
        assert!(parse_size("0").is_err());
        assert!(parse_size("12 parsecs").unwrap_err().contains("unit"));
        assert!(parse_size("GB").is_err());
        assert_eq!(human_bytes(1536), "1.5 KiB");
    }
}
