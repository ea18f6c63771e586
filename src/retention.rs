//! Retention rules and immutable tags as configured, and the pure decision of which tags the
//! rules remove from one repository. Running the decision against the store is
//! `registry::retention`; refusing changes to immutable tags happens in the metadata
//! transactions that change tags (`meta`).
//!
//! How rules combine (documented with examples in `docs/retention.md`):
//! - A rule governs the tags of the repositories its pattern matches whose names match its tag
//!   pattern (all tags when it has none).
//! - A rule *keeps* the governed tags among the `keep_last` most recently pushed (per repository)
//!   and those matching `keep_tags`.
//! - A rule *marks* the governed tags it does not keep for which every removal condition it
//!   states holds (not pushed within, not pulled within); a rule that states no condition but a
//!   `keep_last` marks every governed tag beyond the last N.
//! - A tag goes when some rule marks it and no rule keeps it (keeps win), and it is not
//!   immutable. It is credited to the first rule in the configuration that marked it.

use crate::auth::Pattern;

/// A tag name pattern: a regular expression that must match the whole tag.
#[derive(Debug, Clone)]
pub struct TagPattern {
    source: String,
    regex: regex::Regex,
}

impl TagPattern {
    /// Compiles `source` (anchored at both ends).
    ///
    /// # Errors
    /// A message naming what is wrong with the expression.
    pub fn parse(source: &str) -> Result<Self, String> {
        let regex = regex::Regex::new(&format!("^(?:{source})$")).map_err(|e| format!("`{source}`: {e}"))?;
        Ok(TagPattern { source: source.to_string(), regex })
    }

    /// Whether `tag` matches as a whole.
    pub fn matches(&self, tag: &str) -> bool {
        self.regex.is_match(tag)
    }

    /// The expression as written.
    pub fn as_str(&self) -> &str {
        &self.source
    }
}

impl PartialEq for TagPattern {
    fn eq(&self, other: &Self) -> bool {
        self.source == other.source
    }
}

/// Tags that can be neither moved nor deleted once they exist.
#[derive(Debug, Clone, PartialEq)]
pub struct ImmutableRule {
    /// Named in refusals and in the history.
    pub name: String,
    /// The repositories it covers.
    pub repositories: Pattern,
    /// The tags it covers.
    pub tags: TagPattern,
}

/// Every immutability rule of the configuration.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ImmutableTags(pub Vec<ImmutableRule>);

impl ImmutableTags {
    /// The first rule that makes `tag` of `repo` immutable.
    pub fn rule_for(&self, repo: &str, tag: &str) -> Option<&str> {
        self.0.iter().find(|r| r.repositories.matches(repo) && r.tags.matches(tag)).map(|r| r.name.as_str())
    }

    /// Whether no rule is configured.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// One retention rule (see the module documentation for how rules combine).
#[derive(Debug, Clone, PartialEq)]
pub struct RetentionRule {
    /// Named in the history (`retention:<name>`), the dry run and the metrics.
    pub name: String,
    /// The repositories it governs.
    pub repositories: Pattern,
    /// The tags it governs (all when `None`).
    pub tags: Option<TagPattern>,
    /// Keep the N most recently pushed governed tags of each repository.
    pub keep_last: Option<u32>,
    /// Keep governed tags matching this forever.
    pub keep_tags: Option<TagPattern>,
    /// Mark tags last pushed longer ago than this (milliseconds).
    pub remove_not_pushed_within_ms: Option<i64>,
    /// Mark tags whose manifest was last pulled (or, never pulled, the tag pushed) longer ago
    /// than this (milliseconds).
    pub remove_not_pulled_within_ms: Option<i64>,
    /// Delete manifests without tags pushed longer ago than this (milliseconds) — never one a
    /// live index lists or a referrer of a live manifest.
    pub remove_untagged_older_than_ms: Option<i64>,
}

impl RetentionRule {
    /// Whether it governs `tag` of a repository it applies to.
    fn governs(&self, tag: &str) -> bool {
        self.tags.as_ref().is_none_or(|p| p.matches(tag))
    }

    /// Whether it can mark tags at all.
    fn removes_tags(&self) -> bool {
        self.remove_not_pushed_within_ms.is_some()
            || self.remove_not_pulled_within_ms.is_some()
            || self.keep_last.is_some()
    }
}

/// A tag as retention sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TagState {
    /// The tag.
    pub name: String,
    /// The manifest it points at.
    pub digest: String,
    /// When it was last pushed (moved here, or pushed here again).
    pub pushed_at: i64,
    /// When its manifest was last pulled, if ever.
    pub pulled_at: Option<i64>,
}

impl TagState {
    /// Its last pull, counting the push as one (a tag pushed a minute ago was not "never pulled
    /// for a week").
    fn last_used(&self) -> i64 {
        self.pulled_at.map_or(self.pushed_at, |p| p.max(self.pushed_at))
    }
}

/// A tag the rules remove, and the rule credited with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Removal {
    /// Index into the tags given to [`removals`].
    pub tag: usize,
    /// Index into the rules given to [`removals`].
    pub rule: usize,
}

/// Which of `tags` (all the tags of repository `repo`) the rules remove at `now`.
pub fn removals(
    rules: &[RetentionRule],
    repo: &str,
    tags: &[TagState],
    immutable: &ImmutableTags,
    now: i64,
) -> Vec<Removal> {
    let mut kept = vec![false; tags.len()];
    let mut marked: Vec<Option<usize>> = vec![None; tags.len()];
    for (r, rule) in rules.iter().enumerate() {
        if !rule.repositories.matches(repo) {
            continue;
        }
        let mut governed: Vec<usize> = (0..tags.len()).filter(|&i| rule.governs(&tags[i].name)).collect();
        // Most recently pushed first; a tie goes by name, so the order never depends on the store.
        governed.sort_by(|&a, &b| {
            tags[b].pushed_at.cmp(&tags[a].pushed_at).then_with(|| tags[a].name.cmp(&tags[b].name))
        });
        let newest = rule.keep_last.map_or(0, |n| n as usize);
        for (rank, &i) in governed.iter().enumerate() {
            let tag = &tags[i];
            let keeps = rank < newest || rule.keep_tags.as_ref().is_some_and(|p| p.matches(&tag.name));
            if keeps {
                kept[i] = true;
                continue;
            }
            if !rule.removes_tags() {
                continue;
            }
            let stale_push =
                rule.remove_not_pushed_within_ms.is_none_or(|d| tag.pushed_at < now.saturating_sub(d));
            let stale_pull =
                rule.remove_not_pulled_within_ms.is_none_or(|d| tag.last_used() < now.saturating_sub(d));
            if stale_push && stale_pull && marked[i].is_none() {
                marked[i] = Some(r);
            }
        }
    }
    (0..tags.len())
        .filter(|&i| !kept[i] && immutable.rule_for(repo, &tags[i].name).is_none())
        .filter_map(|i| marked[i].map(|rule| Removal { tag: i, rule }))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: i64 = 86_400_000;
    const NOW: i64 = 100 * DAY;

    fn rule(name: &str) -> RetentionRule {
        RetentionRule {
            name: name.into(),
            repositories: Pattern::parse("**").unwrap(),
            tags: None,
            keep_last: None,
            keep_tags: None,
            remove_not_pushed_within_ms: None,
            remove_not_pulled_within_ms: None,
            remove_untagged_older_than_ms: None,
        }
    }

    fn tag(name: &str, pushed_days_ago: i64, pulled_days_ago: Option<i64>) -> TagState {
        TagState {
            name: name.into(),
            digest: format!("sha256:{name}"),
            pushed_at: NOW - pushed_days_ago * DAY,
            pulled_at: pulled_days_ago.map(|d| NOW - d * DAY),
        }
    }

    fn removed(rules: &[RetentionRule], tags: &[TagState]) -> Vec<(String, String)> {
        let mut out: Vec<(String, String)> =
            removals(rules, "team/app", tags, &ImmutableTags::default(), NOW)
                .into_iter()
                .map(|r| (tags[r.tag].name.clone(), rules[r.rule].name.clone()))
                .collect();
        out.sort();
        out
    }

    fn names(v: &[(String, String)]) -> Vec<&str> {
        v.iter().map(|(t, _)| t.as_str()).collect()
    }

    #[test]
    fn keep_last_removes_all_but_the_newest_by_push_time() {
        let mut r = rule("last2");
        r.keep_last = Some(2);
        // Pushed 1, 5, 3 and 9 days ago; names deliberately out of push order.
        let tags = [tag("a", 1, None), tag("b", 5, None), tag("c", 3, None), tag("d", 9, None)];
        assert_eq!(names(&removed(&[r], &tags)), ["b", "d"]);
    }

    #[test]
    fn time_conditions_all_have_to_hold() {
        let mut r = rule("ci");
        r.tags = Some(TagPattern::parse("ci-.*").unwrap());
        r.remove_not_pushed_within_ms = Some(14 * DAY);
        r.remove_not_pulled_within_ms = Some(7 * DAY);
        let tags = [
            tag("ci-old-unused", 20, Some(10)),
            tag("ci-old-pulled", 20, Some(2)),
            tag("ci-new", 3, None),
            tag("ci-old-never-pulled", 15, None),
            tag("release", 40, None),
        ];
        assert_eq!(names(&removed(&[r], &tags)), ["ci-old-never-pulled", "ci-old-unused"]);
    }

    #[test]
    fn a_fresh_tag_never_pulled_is_not_stale_for_pulls() {
        let mut r = rule("unpulled");
        r.remove_not_pulled_within_ms = Some(7 * DAY);
        let tags = [tag("fresh", 1, None), tag("old", 8, None), tag("old-but-pulled", 30, Some(6))];
        assert_eq!(names(&removed(&[r], &tags)), ["old"]);
    }

    #[test]
    fn keeps_win_over_removals_of_other_rules() {
        let mut keep_v = rule("releases");
        keep_v.keep_tags = Some(TagPattern::parse(r"v\d+\.\d+\.\d+").unwrap());
        let mut old = rule("old");
        old.remove_not_pushed_within_ms = Some(30 * DAY);
        let tags = [tag("v1.2.3", 90, None), tag("v1.2.3-rc1", 90, None), tag("nightly", 60, None)];
        assert_eq!(
            removed(&[keep_v, old], &tags),
            [("nightly".into(), "old".into()), ("v1.2.3-rc1".into(), "old".into())]
        );
    }

    #[test]
    fn a_rule_keeping_the_newest_protects_them_from_other_rules() {
        let mut last = rule("last1");
        last.keep_last = Some(1);
        last.remove_not_pushed_within_ms = Some(1000 * DAY); // marks nothing itself
        let mut old = rule("old");
        old.remove_not_pushed_within_ms = Some(DAY);
        let tags = [tag("x", 5, None), tag("y", 6, None)];
        assert_eq!(removed(&[last, old], &tags), [("y".into(), "old".into())]);
    }

    #[test]
    fn the_first_rule_that_marks_a_tag_is_credited() {
        let mut a = rule("a");
        a.remove_not_pushed_within_ms = Some(10 * DAY);
        let mut b = rule("b");
        b.remove_not_pushed_within_ms = Some(DAY);
        let tags = [tag("old", 20, None), tag("mid", 5, None)];
        assert_eq!(removed(&[a, b], &tags), [("mid".into(), "b".into()), ("old".into(), "a".into())]);
    }

    #[test]
    fn rules_apply_only_to_their_repositories_and_never_to_immutable_tags() {
        let mut r = rule("old");
        r.repositories = Pattern::parse("other/**").unwrap();
        r.remove_not_pushed_within_ms = Some(DAY);
        let tags = [tag("x", 5, None)];
        assert!(removed(std::slice::from_ref(&r), &tags).is_empty());
        r.repositories = Pattern::parse("team/*").unwrap();
        assert_eq!(names(&removed(std::slice::from_ref(&r), &tags)), ["x"]);
        let immutable = ImmutableTags(vec![ImmutableRule {
            name: "frozen".into(),
            repositories: Pattern::parse("**").unwrap(),
            tags: TagPattern::parse("x").unwrap(),
        }]);
        assert!(removals(&[r], "team/app", &tags, &immutable, NOW).is_empty());
    }

    #[test]
    fn a_rule_with_only_keeps_or_only_untagged_removes_no_tag() {
        let mut keep = rule("keep");
        keep.keep_tags = Some(TagPattern::parse("v.*").unwrap());
        let mut untagged = rule("untagged");
        untagged.remove_untagged_older_than_ms = Some(DAY);
        assert!(removed(&[keep, untagged], &[tag("x", 50, None)]).is_empty());
    }

    #[test]
    fn tag_patterns_match_whole_tags() {
        let p = TagPattern::parse("v.*").unwrap();
        assert!(p.matches("v1") && !p.matches("dev1"));
        let p = TagPattern::parse("a|b").unwrap();
        assert!(p.matches("a") && p.matches("b") && !p.matches("ab"));
        assert!(TagPattern::parse("(").is_err());
    }
}
