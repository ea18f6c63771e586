//! Repository names and tags, validated by the distribution spec's grammars.

use std::fmt;

/// A repository name such as `library/ubuntu`, validated against
/// `[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*(\/[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*)*`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RepoName(String);

/// The longest repository name accepted (the spec's advice for interoperability).
pub const MAX_NAME_LEN: usize = 255;

impl RepoName {
    /// Validates a repository name.
    ///
    /// # Errors
    /// A message saying what is wrong, for the `NAME_INVALID` error.
    pub fn parse(s: &str) -> Result<Self, String> {
        if s.is_empty() {
            return Err("repository name is empty".into());
        }
        if s.len() > MAX_NAME_LEN {
            return Err(format!("repository name is longer than {MAX_NAME_LEN} characters"));
        }
        for component in s.split('/') {
            if !valid_component(component) {
                return Err(format!(
                    "repository name component `{component}` must match [a-z0-9]+((\\.|_|__|-+)[a-z0-9]+)*"
                ));
            }
        }
        Ok(RepoName(s.to_string()))
    }

    /// The name as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

fn valid_component(c: &str) -> bool {
    let b = c.as_bytes();
    let alnum = |x: u8| x.is_ascii_lowercase() || x.is_ascii_digit();
    if b.is_empty() || !alnum(b[0]) || !alnum(b[b.len() - 1]) {
        return false;
    }
    let mut i = 0;
    while i < b.len() {
        if alnum(b[i]) {
            i += 1;
            continue;
        }
        // A separator run: ".", "_", "__" or one or more "-".
        let start = i;
        while i < b.len() && !alnum(b[i]) {
            i += 1;
        }
        let sep = &c[start..i];
        let ok = sep == "." || sep == "_" || sep == "__" || sep.bytes().all(|x| x == b'-');
        if !ok {
            return false;
        }
    }
    true
}

impl fmt::Display for RepoName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A tag, validated against `[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Tag(String);

impl Tag {
    /// Validates a tag.
    ///
    /// # Errors
    /// A message for the error response.
    pub fn parse(s: &str) -> Result<Self, String> {
        let b = s.as_bytes();
        let first_ok = b.first().is_some_and(|&x| x.is_ascii_alphanumeric() || x == b'_');
        let rest_ok = b.iter().skip(1).all(|&x| x.is_ascii_alphanumeric() || matches!(x, b'_' | b'.' | b'-'));
        if first_ok && rest_ok && b.len() <= 128 {
            Ok(Tag(s.to_string()))
        } else {
            Err(format!("tag `{s}` must match [a-zA-Z0-9_][a-zA-Z0-9._-]{{0,127}}"))
        }
    }

    /// The tag as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Tag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repository_names() {
        for ok in ["a", "library/ubuntu", "a-b/c.d/e__f", "a---b", "x0/y_1", "foo.bar"] {
            assert!(RepoName::parse(ok).is_ok(), "{ok}");
        }
        for bad in [
            "", "A", "a//b", "/a", "a/", "a..b", "a___b", "-a", "a-", "a/../b", "..", "a/.b", "ä", "a b",
            "a%2fb",
        ] {
            assert!(RepoName::parse(bad).is_err(), "{bad}");
        }
        assert!(RepoName::parse(&"a".repeat(256)).is_err());
    }

    #[test]
    fn tags() {
        for ok in ["latest", "v1.0", "_x", "A-b_c.d", &"t".repeat(128)] {
            assert!(Tag::parse(ok).is_ok(), "{ok}");
        }
        for bad in ["", ".x", "-x", "a/b", "a:b", &"t".repeat(129), "é"] {
            assert!(Tag::parse(bad).is_err(), "{bad}");
        }
    }
}
