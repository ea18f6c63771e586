//! Who is calling and what they may do.
//!
//! * Authentication: HTTP basic credentials checked against an htpasswd file (bcrypt), or a
//!   bearer token (a JWT from Berth's own token endpoint or from an external issuer whose public
//!   keys are configured), following the Docker token-authentication scheme.
//! * Authorization: rules of users and groups × repository patterns × actions (`pull`, `push`,
//!   `delete`, `admin`), plus repository patterns anyone may pull. A bearer token carries the
//!   access its issuer granted, which is what it allows.
//!
//! * What each operation needs: [`Operation`], decided by [`Auth::decide`] — the one place every
//!   face (the OCI API, the admin API and the CLI through it, the console) asks.
//!
//! No HTTP types here: the API layer turns [`Denial`]s into 401/403 answers.

mod operation;
mod pattern;
mod token;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::Deserialize;
use sha2::Digest as _;

pub use operation::Operation;
pub use pattern::Pattern;
pub use token::{TokenConfig, TokenGrant};

/// What a request wants to do to a repository.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    /// Read manifests, blobs, tags, referrers.
    Pull,
    /// Upload blobs and push manifests.
    Push,
    /// Delete manifests, tags and blobs.
    Delete,
    /// Administrative operations.
    Admin,
    /// Report what runs (in-use reports): granted on `**`, it lets a cluster's reporter pin
    /// images without the power to purge or force deletes.
    #[serde(rename = "in-use")]
    InUse,
}

impl Action {
    /// The action's name in scopes and rules.
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Pull => "pull",
            Action::Push => "push",
            Action::Delete => "delete",
            Action::Admin => "admin",
            Action::InUse => "in-use",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        match s {
            "pull" => Some(Action::Pull),
            "push" => Some(Action::Push),
            "delete" => Some(Action::Delete),
            "admin" | "*" => Some(Action::Admin),
            "in-use" => Some(Action::InUse),
            _ => None,
        }
    }
}

/// The `[auth]` configuration section.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    /// htpasswd file with bcrypt entries (`user:$2y$…`).
    pub htpasswd: Option<PathBuf>,
    /// Realm of the basic challenge.
    #[serde(default = "default_realm")]
    pub realm: String,
    /// Repository patterns anyone may pull, without credentials.
    #[serde(default)]
    pub anonymous_pull: Vec<String>,
    /// Bearer tokens (enables the token flow).
    #[serde(default)]
    pub token: Option<TokenConfig>,
    /// Named groups of users.
    #[serde(default, rename = "group")]
    pub groups: Vec<GroupConfig>,
    /// Who may do what where.
    #[serde(default, rename = "rule")]
    pub rules: Vec<RuleConfig>,
}

fn default_realm() -> String {
    "Berth".into()
}

/// A named group of users.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GroupConfig {
    /// The group's name, used as `group:<name>` in rules.
    pub name: String,
    /// User names.
    pub members: Vec<String>,
}

/// One authorization rule.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleConfig {
    /// Users, `group:<name>`, or `*` for any authenticated user.
    pub who: Vec<String>,
    /// Repository patterns (`*` within a path segment, `**` across segments).
    pub repositories: Vec<String>,
    /// Actions granted.
    pub actions: Vec<Action>,
}

/// The caller of a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Identity {
    /// No credentials.
    Anonymous,
    /// A user authenticated by password.
    User(String),
    /// A bearer token and the access it grants.
    Token(TokenGrant),
}

impl Identity {
    /// The user name, for logs and tag history.
    pub fn name(&self) -> Option<&str> {
        match self {
            Identity::Anonymous => None,
            Identity::User(u) => Some(u),
            Identity::Token(t) => Some(&t.subject),
        }
    }
}

/// Why a request is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Denial {
    /// No or bad credentials: answer 401 with a challenge.
    Unauthenticated(String),
    /// Authenticated, but not allowed: answer 403.
    Forbidden,
}

/// A configuration that cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("auth configuration: {0}")]
pub struct ConfigError(pub String);

/// How long a successful password check is remembered (bcrypt is slow on purpose).
const VERIFIED_TTL: Duration = Duration::from_secs(300);

/// Authentication and authorization, built once from configuration.
#[derive(Debug)]
pub struct Auth {
    realm: String,
    users: HashMap<String, String>,
    groups_of: HashMap<String, Vec<String>>,
    rules: Vec<Rule>,
    anonymous_pull: Vec<Pattern>,
    token: Option<token::Tokens>,
    verified: Mutex<HashMap<(String, [u8; 32]), Instant>>,
}

#[derive(Debug)]
struct Rule {
    who: Vec<String>,
    repositories: Vec<Pattern>,
    actions: Vec<Action>,
}

impl Auth {
    /// Loads the htpasswd file and keys named by `config`.
    ///
    /// # Errors
    /// [`ConfigError`] naming the file or setting that is wrong.
    pub fn load(config: &AuthConfig) -> Result<Self, ConfigError> {
        let mut users = HashMap::new();
        if let Some(path) = &config.htpasswd {
            let text = std::fs::read_to_string(path)
                .map_err(|e| ConfigError(format!("cannot read htpasswd {}: {e}", path.display())))?;
            for (n, line) in text.lines().enumerate() {
                let line = line.trim();
                if line.is_empty() || line.starts_with('#') {
                    continue;
                }
                let (user, hash) = line.split_once(':').ok_or_else(|| {
                    ConfigError(format!("{} line {}: expected user:hash", path.display(), n + 1))
                })?;
                if !hash.starts_with("$2") {
                    return Err(ConfigError(format!(
                        "{} line {}: only bcrypt hashes are accepted (htpasswd -B)",
                        path.display(),
                        n + 1
                    )));
                }
                users.insert(user.to_string(), hash.to_string());
            }
        }
        let mut groups_of: HashMap<String, Vec<String>> = HashMap::new();
        for g in &config.groups {
            for m in &g.members {
                groups_of.entry(m.clone()).or_default().push(g.name.clone());
            }
        }
        let pattern = |p: &String| Pattern::parse(p).map_err(|e| ConfigError(format!("pattern `{p}`: {e}")));
        let rules = config
            .rules
            .iter()
            .map(|r| {
                Ok(Rule {
                    who: r.who.clone(),
                    repositories: r.repositories.iter().map(pattern).collect::<Result<_, _>>()?,
                    actions: r.actions.clone(),
                })
            })
            .collect::<Result<_, ConfigError>>()?;
        let anonymous_pull = config.anonymous_pull.iter().map(pattern).collect::<Result<_, _>>()?;
        let token = config.token.as_ref().map(token::Tokens::load).transpose()?;
        Ok(Auth {
            realm: config.realm.clone(),
            users,
            groups_of,
            rules,
            anonymous_pull,
            token,
            verified: Mutex::default(),
        })
    }

    /// Identifies the caller from an `Authorization` header value.
    ///
    /// # Errors
    /// [`Denial::Unauthenticated`] for wrong credentials, an invalid token, or a scheme this
    /// registry does not accept.
    pub fn authenticate(&self, authorization: Option<&str>, now_secs: u64) -> Result<Identity, Denial> {
        let Some(value) = authorization else { return Ok(Identity::Anonymous) };
        let (scheme, rest) = value.split_once(' ').unwrap_or((value, ""));
        match scheme.to_ascii_lowercase().as_str() {
            "basic" => self.check_password(rest.trim()).map(Identity::User),
            "bearer" => match &self.token {
                Some(t) => {
                    t.verify(rest.trim(), now_secs).map(Identity::Token).map_err(Denial::Unauthenticated)
                }
                None => Err(Denial::Unauthenticated("bearer tokens are not enabled".into())),
            },
            _ => Err(Denial::Unauthenticated(format!("unsupported authorization scheme `{scheme}`"))),
        }
    }

    /// Checks `base64(user:password)` against the htpasswd entries; returns the user.
    fn check_password(&self, encoded: &str) -> Result<String, Denial> {
        use base64::Engine as _;
        let bad = || Denial::Unauthenticated("invalid username or password".into());
        let decoded = base64::engine::general_purpose::STANDARD.decode(encoded).map_err(|_| bad())?;
        let decoded = String::from_utf8(decoded).map_err(|_| bad())?;
        let (user, password) = decoded.split_once(':').ok_or_else(bad)?;
        let hash = self.users.get(user).ok_or_else(bad)?;
        let key = (user.to_string(), sha2::Sha256::digest(password.as_bytes()).into());
        {
            let cache = self.verified.lock().unwrap_or_else(|p| p.into_inner());
            if cache.get(&key).is_some_and(|at| at.elapsed() < VERIFIED_TTL) {
                return Ok(user.to_string());
            }
        }
        if !bcrypt::verify(password, hash).unwrap_or(false) {
            return Err(bad());
        }
        let mut cache = self.verified.lock().unwrap_or_else(|p| p.into_inner());
        cache.retain(|_, at| at.elapsed() < VERIFIED_TTL);
        cache.insert(key, Instant::now());
        Ok(user.to_string())
    }

    /// Whether `who` may do `action` on repository `repo`.
    pub fn allowed(&self, who: &Identity, repo: &str, action: Action) -> bool {
        if action == Action::Pull && self.anonymous_pull.iter().any(|p| p.matches(repo)) {
            return true;
        }
        match who {
            Identity::Anonymous => false,
            Identity::Token(grant) => grant.allows(repo, action),
            Identity::User(user) => self.user_allowed(user, repo, action),
        }
    }

    /// Whether `who` may do `action` on every repository — a user with a rule for `**`. For the
    /// registry-wide admin requests (the collector's status). Tokens are scoped to repositories,
    /// so never.
    fn allowed_everywhere(&self, who: &Identity, action: Action) -> bool {
        let Identity::User(user) = who else { return false };
        self.rules_of(user).any(|r| {
            r.repositories.iter().any(Pattern::matches_everything)
                && r.actions.iter().any(|a| *a == action || *a == Action::Admin)
        })
    }

    /// Whether `who` administers any repository at all (a rule, or a token, granting `admin`).
    fn administers_something(&self, who: &Identity) -> bool {
        match who {
            Identity::Anonymous => false,
            Identity::Token(grant) => grant.grants_anywhere(Action::Admin),
            Identity::User(user) => self.rules_of(user).any(|r| r.actions.contains(&Action::Admin)),
        }
    }

    /// Decides whether `who` may do `op` — the only place that says what each operation needs
    /// (see [`Operation`]). The answer depends on the caller's rules and on the names in `op`,
    /// never on whether the things named exist.
    ///
    /// # Errors
    /// [`Denial::Unauthenticated`] for an anonymous caller who would need credentials, or a
    /// token without the scope; [`Denial::Forbidden`] for a user without the permission.
    pub fn decide(&self, who: &Identity, op: Operation<'_>) -> Result<(), Denial> {
        let ok = match op {
            Operation::SignIn => *who != Identity::Anonymous,
            Operation::List => true,
            Operation::Pull(repo) | Operation::ReadRecords(repo) => self.allowed(who, repo, Action::Pull),
            Operation::Push(repo) => self.allowed(who, repo, Action::Push),
            Operation::Delete(repo) => self.allowed(who, repo, Action::Delete),
            Operation::Administer(repo) => self.allowed(who, repo, Action::Admin),
            Operation::AdministerBlob(holders) => {
                self.administers_something(who)
                    && match holders {
                        None => true,
                        Some([]) => self.allowed_everywhere(who, Action::Admin),
                        Some(holders) => holders.iter().all(|r| self.allowed(who, r, Action::Admin)),
                    }
            }
            Operation::AdministerMatching(pattern) => match who {
                Identity::User(user) => self.rules_of(user).any(|r| {
                    r.actions.contains(&Action::Admin) && r.repositories.iter().any(|p| p.covers(pattern))
                }),
                // Tokens name repositories: one repository, named exactly.
                Identity::Token(_) => {
                    !pattern.as_str().contains('*') && self.allowed(who, pattern.as_str(), Action::Admin)
                }
                Identity::Anonymous => false,
            },
            Operation::AdministerRegistry => self.allowed_everywhere(who, Action::Admin),
            Operation::ReportInUse => self.allowed_everywhere(who, Action::InUse),
        };
        match (ok, who) {
            (true, _) => Ok(()),
            (false, Identity::Anonymous) => Err(Denial::Unauthenticated("authentication required".into())),
            // Token clients answer a 401 by fetching a token for the scope in the challenge.
            (false, Identity::Token(_)) => Err(Denial::Unauthenticated("insufficient scope".into())),
            (false, Identity::User(_)) => Err(Denial::Forbidden),
        }
    }

    /// The rules that apply to `user` (by name, by group, or to everyone).
    fn rules_of<'a>(&'a self, user: &'a str) -> impl Iterator<Item = &'a Rule> + 'a {
        let groups = self.groups_of.get(user).map(Vec::as_slice).unwrap_or_default();
        self.rules.iter().filter(move |r| {
            r.who.iter().any(|w| {
                w == "*"
                    || w == user
                    || w.strip_prefix("group:").is_some_and(|g| groups.iter().any(|x| x == g))
            })
        })
    }

    fn user_allowed(&self, user: &str, repo: &str, action: Action) -> bool {
        self.rules_of(user).any(|r| {
            r.repositories.iter().any(|p| p.matches(repo))
                && r.actions.iter().any(|a| *a == action || *a == Action::Admin)
        })
    }

    /// Whether anonymous callers may pull anything at all.
    pub fn anonymous_may_pull(&self) -> bool {
        !self.anonymous_pull.is_empty()
    }

    /// The `WWW-Authenticate` value for a 401 about `scope` (`repository:<name>:<actions>`).
    pub fn challenge(&self, default_realm: &str, scope: Option<&str>) -> String {
        match &self.token {
            Some(t) => {
                let mut c = format!(
                    "Bearer realm=\"{}\",service=\"{}\"",
                    t.realm.as_deref().unwrap_or(default_realm),
                    t.service
                );
                if let Some(scope) = scope {
                    c.push_str(&format!(",scope=\"{scope}\""));
                }
                c
            }
            None => self.basic_challenge(),
        }
    }

    /// The `WWW-Authenticate` value asking for a user name and password, in the configured
    /// realm: what the admin API, the console, `/metrics` and the token endpoint answer a 401
    /// with (their clients sign in with passwords, or bring a token they already have).
    pub fn basic_challenge(&self) -> String {
        format!("Basic realm=\"{}\"", self.realm.replace(['"', '\\'], ""))
    }

    /// Whether this registry issues tokens itself (`/auth/token`).
    pub fn issues_tokens(&self) -> bool {
        self.token.as_ref().is_some_and(token::Tokens::can_sign)
    }

    /// Issues a token for `who` covering the requested `scopes` (`repository:<name>:<a,b>`),
    /// granting only what the rules allow (unknown or refused actions are left out, as the
    /// token-auth scheme prescribes).
    ///
    /// # Errors
    /// [`Denial::Unauthenticated`] when tokens are not issued here or `service` is not ours.
    pub fn issue_token(
        &self,
        who: &Identity,
        service: Option<&str>,
        scopes: &[String],
        now_secs: u64,
    ) -> Result<token::IssuedToken, Denial> {
        let tokens = self
            .token
            .as_ref()
            .filter(|t| t.can_sign())
            .ok_or_else(|| Denial::Unauthenticated("this registry does not issue tokens".into()))?;
        if service.is_some_and(|s| s != tokens.service) {
            return Err(Denial::Unauthenticated(format!("unknown service; this is `{}`", tokens.service)));
        }
        let mut access: Vec<(String, Vec<Action>)> = Vec::new();
        for scope in scopes.iter().flat_map(|s| s.split(' ')) {
            let mut parts = scope.splitn(3, ':');
            let (Some("repository"), Some(name), Some(actions)) = (parts.next(), parts.next(), parts.next())
            else {
                continue;
            };
            let granted: Vec<Action> = actions
                .split(',')
                .filter_map(Action::parse)
                .filter(|a| self.allowed(who, name, *a))
                .collect();
            access.push((name.to_string(), granted));
        }
        tokens.sign(who.name().unwrap_or(""), access, now_secs).map_err(Denial::Unauthenticated)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn auth(extra: &str) -> Auth {
        let dir = tempfile::tempdir().unwrap();
        let htpasswd = dir.path().join("htpasswd");
        let hash = bcrypt::hash("secret", 4).unwrap();
        std::fs::write(&htpasswd, format!("alice:{hash}\nrobot:{hash}\n# comment\n")).unwrap();
        let toml = format!(
            "htpasswd = {:?}\nanonymous_pull = [\"public/**\"]\n{extra}\n\
             [[group]]\nname = \"ci\"\nmembers = [\"robot\"]\n\
             [[rule]]\nwho = [\"alice\"]\nrepositories = [\"**\"]\nactions = [\"pull\", \"push\", \"delete\"]\n\
             [[rule]]\nwho = [\"group:ci\"]\nrepositories = [\"team/*\"]\nactions = [\"pull\", \"push\"]\n",
            htpasswd.display().to_string()
        );
        Auth::load(&toml::from_str(&toml).unwrap()).unwrap()
    }

    fn basic(user: &str, password: &str) -> String {
        use base64::Engine as _;
        format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}")))
    }

    #[test]
    fn passwords_rules_groups_and_anonymous_pull() {
        let a = auth("");
        let alice = a.authenticate(Some(&basic("alice", "secret")), 0).unwrap();
        assert_eq!(alice, Identity::User("alice".into()));
        // Cached the second time, still correct.
        assert_eq!(a.authenticate(Some(&basic("alice", "secret")), 0).unwrap(), alice);
        assert!(a.authenticate(Some(&basic("alice", "wrong")), 0).is_err());
        assert!(a.authenticate(Some(&basic("mallory", "secret")), 0).is_err());
        assert!(a.authenticate(Some("Basic !!!"), 0).is_err());
        assert!(a.authenticate(Some("Digest x"), 0).is_err());

        let robot = Identity::User("robot".into());
        assert!(a.allowed(&robot, "team/app", Action::Push));
        assert!(!a.allowed(&robot, "team/app", Action::Delete));
        assert!(!a.allowed(&robot, "team/app/deep", Action::Pull));
        assert!(a.allowed(&alice, "any/where/deep", Action::Delete));
        assert!(!a.allowed(&alice, "x", Action::Admin));
        assert!(a.allowed(&Identity::Anonymous, "public/a/b", Action::Pull));
        assert!(!a.allowed(&Identity::Anonymous, "public/a", Action::Push));
        assert_eq!(
            a.decide(&Identity::Anonymous, Operation::Pull("x")),
            Err(Denial::Unauthenticated("authentication required".into()))
        );
        assert_eq!(a.decide(&robot, Operation::Pull("x")), Err(Denial::Forbidden));
        assert_eq!(a.challenge("http://h/auth/token", None), "Basic realm=\"Berth\"");
    }

    #[test]
    fn what_each_operation_needs() {
        let a = auth(
            "[[rule]]\nwho = [\"root\"]\nrepositories = [\"**\"]\nactions = [\"admin\"]\n\
             [[rule]]\nwho = [\"lead\"]\nrepositories = [\"team/**\"]\nactions = [\"admin\"]\n",
        );
        let user = |u: &str| Identity::User(u.into());
        let (alice, robot, lead, root) = (user("alice"), user("robot"), user("lead"), user("root"));
        let ok = |who: &Identity, op| a.decide(who, op).is_ok();
        // Deletes need `delete`; a repository delete, restores and the space report need `admin`.
        assert!(ok(&alice, Operation::Delete("team/app")) && !ok(&robot, Operation::Delete("team/app")));
        assert!(
            !ok(&alice, Operation::Administer("team/app")) && ok(&lead, Operation::Administer("team/app"))
        );
        // A repository's records go with pull, anonymous pull included.
        assert!(ok(&robot, Operation::ReadRecords("team/app")));
        assert!(ok(&Identity::Anonymous, Operation::ReadRecords("public/x")));
        assert!(!ok(&robot, Operation::ReadRecords("other")));
        // A blob: admin on every holder; with none, on every repository; never for a caller who
        // administers nothing, whatever the holders.
        let team = ["team/app".to_string()];
        let both = ["team/app".to_string(), "other".to_string()];
        assert!(!ok(&alice, Operation::AdministerBlob(None)));
        assert!(ok(&lead, Operation::AdministerBlob(None)));
        assert!(ok(&lead, Operation::AdministerBlob(Some(&team))));
        assert!(!ok(&lead, Operation::AdministerBlob(Some(&both))));
        assert!(!ok(&lead, Operation::AdministerBlob(Some(&[]))));
        assert!(ok(&root, Operation::AdministerBlob(Some(&[]))));
        assert_eq!(a.decide(&lead, Operation::AdministerBlob(Some(&both))), Err(Denial::Forbidden));
        assert_eq!(a.decide(&lead, Operation::AdministerBlob(Some(&[]))), Err(Denial::Forbidden));
        // The whole registry: a rule for `**` with admin.
        assert!(ok(&root, Operation::AdministerRegistry) && !ok(&lead, Operation::AdministerRegistry));
        assert!(!ok(&alice, Operation::AdministerRegistry));
        assert!(matches!(
            a.decide(&Identity::Anonymous, Operation::AdministerRegistry),
            Err(Denial::Unauthenticated(_))
        ));
        assert_eq!(a.basic_challenge(), "Basic realm=\"Berth\"");
    }

    #[test]
    fn reporters_pin_without_administering() {
        let a = auth(
            "[[rule]]\nwho = [\"cluster\"]\nrepositories = [\"**\"]\nactions = [\"in-use\"]\n\
             [[rule]]\nwho = [\"root\"]\nrepositories = [\"**\"]\nactions = [\"admin\"]\n\
             [[rule]]\nwho = [\"lead\"]\nrepositories = [\"team/**\"]\nactions = [\"in-use\"]\n",
        );
        let ok = |who: &str, op| a.decide(&Identity::User(who.into()), op).is_ok();
        assert!(ok("cluster", Operation::ReportInUse) && ok("root", Operation::ReportInUse));
        assert!(!ok("lead", Operation::ReportInUse), "pins reach every repository: a rule for ** only");
        assert!(!ok("cluster", Operation::AdministerRegistry));
        assert!(
            !ok("cluster", Operation::Administer("team/app"))
                && !ok("cluster", Operation::Delete("team/app"))
        );
        assert!(!ok("cluster", Operation::Pull("team/app")));
    }

    #[test]
    fn tokens_grant_only_what_rules_allow() {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("key.pem");
        std::fs::write(&key, token::tests::TEST_KEY_PEM).unwrap();
        let a = auth(&format!(
            "[token]\nissuer = \"berth\"\nservice = \"reg\"\nsigning_key = {:?}\n",
            key.display().to_string()
        ));
        let robot = Identity::User("robot".into());
        let issued = a
            .issue_token(
                &robot,
                Some("reg"),
                &["repository:team/app:pull,push,delete".into(), "repository:other:pull".into()],
                1000,
            )
            .unwrap();
        let id = a.authenticate(Some(&format!("Bearer {}", issued.token)), 1001).unwrap();
        assert!(a.allowed(&id, "team/app", Action::Push));
        assert!(!a.allowed(&id, "team/app", Action::Delete));
        assert!(!a.allowed(&id, "other", Action::Pull));
        assert_eq!(id.name(), Some("robot"));
        // Expired, or for another service.
        assert!(a.authenticate(Some(&format!("Bearer {}", issued.token)), 1000 + 10_000).is_err());
        assert!(a.issue_token(&robot, Some("elsewhere"), &[], 1000).is_err());
        assert!(
            a.challenge("http://h/auth/token", Some("repository:x:pull"))
                .starts_with("Bearer realm=\"http://h/auth/token\",service=\"reg\",scope=")
        );
    }
}
