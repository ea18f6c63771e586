//! Repository patterns: `*` matches within one path segment, `**` across segments.

/// A validated repository pattern.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pattern(String);

impl Pattern {
    /// Validates a pattern: repository-name characters, `/`, and `*`.
    ///
    /// # Errors
    /// A message naming the first character that cannot appear.
    pub fn parse(s: &str) -> Result<Self, String> {
        if s.is_empty() {
            return Err("empty pattern".into());
        }
        if let Some(c) =
            s.chars().find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || "._-/*".contains(*c)))
        {
            return Err(format!("`{c}` cannot appear in a repository pattern"));
        }
        Ok(Pattern(s.to_string()))
    }

    /// Whether it matches every repository name: only `*`s, with a `**` among them (`**/*`
    /// needs a `/`, so it does not match `app`).
    pub fn matches_everything(&self) -> bool {
        self.0.chars().all(|c| c == '*') && self.0.contains("**")
    }

    /// The pattern as written.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether `name` matches.
    pub fn matches(&self, name: &str) -> bool {
        glob(self.0.as_bytes(), name.as_bytes())
    }

    /// Whether every name `other` matches is sure to match this pattern too. Decided on the
    /// patterns alone and cautiously (false when unsure): this matches everything, `other` is a
    /// plain name this matches, the two are the same, or this is `PREFIX/**` with a plain
    /// prefix that `other` starts with.
    pub fn covers(&self, other: &Pattern) -> bool {
        if self.matches_everything() || self.0 == other.0 {
            return true;
        }
        if !other.0.contains('*') {
            return self.matches(&other.0);
        }
        self.0
            .strip_suffix("/**")
            .filter(|prefix| !prefix.contains('*'))
            .is_some_and(|prefix| other.0.strip_prefix(prefix).is_some_and(|rest| rest.starts_with('/')))
    }
}

fn glob(p: &[u8], s: &[u8]) -> bool {
    match p {
        [] => s.is_empty(),
        [b'*', b'*', rest @ ..] => (0..=s.len()).any(|i| glob(rest, &s[i..])),
        [b'*', rest @ ..] => {
            let segment = s.iter().position(|&c| c == b'/').unwrap_or(s.len());
            (0..=segment).any(|i| glob(rest, &s[i..]))
        }
        [c, rest @ ..] => s.first() == Some(c) && glob(rest, &s[1..]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matching() {
        let m = |p: &str, n: &str| Pattern::parse(p).unwrap().matches(n);
        assert!(m("team/*", "team/app"));
        assert!(!m("team/*", "team/app/x"));
        assert!(!m("team/*", "teamx/app"));
        assert!(m("team/**", "team/app/x"));
        assert!(m("**", "a/b/c"));
        assert!(m("*", "a"));
        assert!(!m("*", "a/b"));
        assert!(m("lib/*-dev", "lib/app-dev"));
        assert!(m("exact", "exact"));
        assert!(!m("exact", "exactly"));
        assert!(Pattern::parse("Team/*").is_err());
        assert!(Pattern::parse("").is_err());
    }

    #[test]
    fn covering() {
        let c = |p: &str, o: &str| Pattern::parse(p).unwrap().covers(&Pattern::parse(o).unwrap());
        assert!(c("**", "team/**"));
        assert!(c("team/**", "team/**"));
        assert!(c("team/**", "team/app/*"));
        assert!(c("team/**", "team/app"));
        assert!(c("team/*", "team/app"));
        assert!(!c("team/*", "team/**"));
        assert!(!c("team/**", "**"));
        assert!(!c("team/**", "teamx/**"));
        assert!(!c("team/**", "team*/**"));
        assert!(!c("*/app/**", "x/app/*"));
        assert!(!c("team/app", "team/*"));
        assert!(!c("**/*", "app"), "**/* needs a slash");
        assert!(!c("**/**", "**"));
        assert!(c("***", "app"));
    }
}
