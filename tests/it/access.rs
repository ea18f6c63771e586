//! Who may do what, face by face: the admin API and the web console decide every operation by
//! the same rule, and a refusal never tells whether the thing asked about exists (issue 31).
//!
//! The matrix walks every admin route and every console page and action for six callers —
//! anonymous, pull, push, delete, an admin of `team/**` and an admin of `**` — on targets that
//! exist and on targets that do not, and checks each answer against the documented rule
//! (docs/auth.md, "What each operation needs").

use berth::oci::Digest;
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use crate::auth::PASSWORD;
use crate::backend_test;
use crate::harness::*;

/// The configured realm, which every face's Basic challenge must name.
const REALM: &str = "Berth test";

/// The callers of the matrix, with their rules (anyone may pull `public/**`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Caller {
    Anonymous,
    /// `pull` on `team/**`.
    Reader,
    /// `pull`, `push` on `team/**`.
    Pusher,
    /// `pull`, `delete` on `team/**`.
    Deleter,
    /// `admin` on `team/**`.
    TeamAdmin,
    /// `admin` on `**`.
    Root,
}

const CALLERS: [Caller; 6] =
    [Caller::Anonymous, Caller::Reader, Caller::Pusher, Caller::Deleter, Caller::TeamAdmin, Caller::Root];

impl Caller {
    fn user(self) -> Option<&'static str> {
        match self {
            Caller::Anonymous => None,
            Caller::Reader => Some("reader"),
            Caller::Pusher => Some("pusher"),
            Caller::Deleter => Some("deleter"),
            Caller::TeamAdmin => Some("teamadmin"),
            Caller::Root => Some("root"),
        }
    }

    /// The caller's rules: the actions it has on `repo`.
    fn has(self, repo: &str, action: &str) -> bool {
        if action == "pull" && repo.starts_with("public/") {
            return true;
        }
        let team = repo.starts_with("team/");
        match self {
            Caller::Anonymous => false,
            Caller::Reader => team && action == "pull",
            Caller::Pusher => team && matches!(action, "pull" | "push"),
            Caller::Deleter => team && matches!(action, "pull" | "delete"),
            Caller::TeamAdmin => team,
            Caller::Root => true,
        }
    }

    /// What the documented rule says about `need`.
    fn may(self, need: &Need) -> bool {
        match need {
            Need::Pull(repo) => self.has(repo, "pull"),
            Need::Delete(repo) => self.has(repo, "delete"),
            Need::Admin(repo) => self.has(repo, "admin"),
            Need::Everywhere => self == Caller::Root,
            Need::Blob(holders) => {
                let administers_something = matches!(self, Caller::TeamAdmin | Caller::Root);
                administers_something
                    && if holders.is_empty() {
                        self == Caller::Root
                    } else {
                        holders.iter().all(|r| self.has(r, "admin"))
                    }
            }
        }
    }
}

/// What an operation needs, in the test's own words (the model the server must agree with).
#[derive(Debug, Clone)]
enum Need {
    Pull(String),
    Delete(String),
    Admin(String),
    Everywhere,
    /// Admin on every holder; with none, admin everywhere; and always admin somewhere.
    Blob(Vec<String>),
}

/// One request: method, path, and a JSON body (API) or a form (console).
#[derive(Debug, Clone)]
struct Req {
    method: Method,
    path: String,
    json: Option<Value>,
    form: Option<Vec<(&'static str, String)>>,
}

fn get(path: String) -> Req {
    Req { method: Method::GET, path, json: None, form: None }
}

fn api(method: Method, path: String, json: Option<Value>) -> Req {
    Req { method, path: format!("/admin/v1/{path}"), json, form: None }
}

fn post_form(path: &str, form: Vec<(&'static str, String)>) -> Req {
    Req { method: Method::POST, path: path.into(), json: None, form: Some(form) }
}

fn enc(text: &str) -> String {
    berth::ui::urlencode(text)
}

/// An answer, reduced to what a caller sees.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Answer {
    status: u16,
    challenge: Option<String>,
    body: String,
}

impl Answer {
    fn refused(&self) -> bool {
        matches!(self.status, 401 | 403)
    }
}

/// The registry of the matrix and the things it holds.
struct Fixture {
    reg: TestRegistry,
    http: reqwest::Client,
    /// A manifest of `team/app` tagged `v1`, and one of `other/secret` and `public/base`.
    manifests: std::collections::HashMap<&'static str, Digest>,
    /// A layer only `team/app` holds, and one only `other/secret` holds.
    team_layer: Digest,
    secret_layer: Digest,
}

/// Pushes the fixtures, then restarts `reg` with access control: the matrix's callers, anyone
/// may pull `public/**`, and the realm [`REALM`].
async fn fixture(reg: TestRegistry) -> Fixture {
    let mut manifests = std::collections::HashMap::new();
    let team = reg.push_image("team/app", "v1", 3101).await;
    reg.push_image("team/app", "v2", 3102).await;
    let secret = reg.push_image("other/secret", "v1", 3103).await;
    let public = reg.push_image("public/base", "v1", 3104).await;
    manifests.insert("team/app", team.digest.clone());
    manifests.insert("other/secret", secret.digest.clone());
    manifests.insert("public/base", public.digest.clone());
    let team_layer = Digest::sha256_of(&team.layers[0]);
    let secret_layer = Digest::sha256_of(&secret.layers[0]);

    let mut config = reg.app.config.clone();
    let dir = reg.stop().await;
    let hash = bcrypt::hash(PASSWORD, 4).unwrap();
    let htpasswd = dir.path().join("htpasswd");
    let users: String = CALLERS.iter().filter_map(|c| c.user()).map(|u| format!("{u}:{hash}\n")).collect();
    std::fs::write(&htpasswd, users).unwrap();
    let toml = format!(
        "htpasswd = {:?}\nrealm = {REALM:?}\nanonymous_pull = [\"public/**\"]\n\
         [[rule]]\nwho = [\"reader\"]\nrepositories = [\"team/**\"]\nactions = [\"pull\"]\n\
         [[rule]]\nwho = [\"pusher\"]\nrepositories = [\"team/**\"]\nactions = [\"pull\", \"push\"]\n\
         [[rule]]\nwho = [\"deleter\"]\nrepositories = [\"team/**\"]\nactions = [\"pull\", \"delete\"]\n\
         [[rule]]\nwho = [\"teamadmin\"]\nrepositories = [\"team/**\"]\nactions = [\"admin\"]\n\
         [[rule]]\nwho = [\"root\"]\nrepositories = [\"**\"]\nactions = [\"admin\"]\n",
        htpasswd.display().to_string()
    );
    config.auth = Some(toml::from_str(&toml).unwrap());
    let reg = TestRegistry::start_with(config, dir).await;
    let http = reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).build().unwrap();
    Fixture { reg, http, manifests, team_layer, secret_layer }
}

impl Fixture {
    /// Sends `req` as `caller` (console forms from the console's own origin).
    async fn send(&self, caller: Caller, req: &Req) -> Answer {
        let mut b = self.http.request(req.method.clone(), self.reg.url(&req.path));
        if let Some(user) = caller.user() {
            b = b.basic_auth(user, Some(PASSWORD));
        }
        if let Some(body) = &req.json {
            b = b.json(body);
        }
        if let Some(form) = &req.form {
            let text: Vec<String> = form.iter().map(|(k, v)| format!("{k}={}", enc(v))).collect();
            b = b
                .header("content-type", "application/x-www-form-urlencoded")
                .header("origin", format!("http://{}", self.reg.addr))
                .body(text.join("&"));
        }
        let res = b.send().await.unwrap();
        let status = res.status().as_u16();
        let challenge = header(&res, "www-authenticate").map(str::to_string);
        Answer { status, challenge, body: res.text().await.unwrap() }
    }
}

/// The names and digests one row of the matrix is about: an existing set, and one naming
/// nothing that exists.
#[derive(Debug, Clone)]
struct Target {
    repo: String,
    tag: String,
    digest: String,
}

impl Target {
    /// `text` with this target's names replaced by placeholders, to compare refusals of two
    /// targets.
    fn normalize(&self, text: &str) -> String {
        let mut out = text.to_string();
        for (value, placeholder) in [(&self.digest, "DIGEST"), (&self.repo, "REPO")] {
            out = out.replace(&enc(value), placeholder).replace(value.as_str(), placeholder);
        }
        out.replace(&format!(":{}", self.tag), ":TAG").replace(&format!("tag={}", self.tag), "tag=TAG")
    }
}

/// How a case builds its request for a target.
type ToRequest = fn(&Target) -> Req;

/// An operation on a repository, through the admin API and (where the console does it) the
/// console.
struct RepoCase {
    name: &'static str,
    need: fn(&str) -> Need,
    /// Changes something when allowed: allowed callers are sent only the missing target.
    mutates: bool,
    api: ToRequest,
    console: Option<ToRequest>,
}

fn repo_cases() -> Vec<RepoCase> {
    let pull = |r: &str| Need::Pull(r.into());
    let delete = |r: &str| Need::Delete(r.into());
    let admin = |r: &str| Need::Admin(r.into());
    vec![
        RepoCase {
            name: "repository summary",
            need: pull,
            mutates: false,
            api: |t| api(Method::GET, format!("repositories/{}", t.repo), None),
            console: Some(|t| get(format!("/ui/repo?name={}", enc(&t.repo)))),
        },
        RepoCase {
            name: "tag history",
            need: pull,
            mutates: false,
            api: |t| api(Method::GET, format!("history/{}:{}", t.repo, t.tag), None),
            console: Some(|t| get(format!("/ui/history?repo={}&tag={}", enc(&t.repo), t.tag))),
        },
        RepoCase {
            name: "repository history",
            need: pull,
            mutates: false,
            api: |t| api(Method::GET, format!("history/{}", t.repo), None),
            console: None,
        },
        RepoCase {
            name: "trash",
            need: pull,
            mutates: false,
            api: |t| api(Method::GET, format!("tombstones/{}", t.repo), None),
            console: Some(|t| get(format!("/ui/trash?repo={}", enc(&t.repo)))),
        },
        RepoCase {
            name: "explain a manifest",
            need: pull,
            mutates: false,
            api: |t| api(Method::GET, format!("explain/{}@{}", t.repo, t.digest), None),
            console: Some(|t| get(format!("/ui/manifest?repo={}&digest={}", enc(&t.repo), enc(&t.digest)))),
        },
        RepoCase {
            name: "preview a manifest delete",
            need: delete,
            mutates: false,
            api: |t| api(Method::GET, format!("preview/{}@{}", t.repo, t.digest), None),
            console: Some(|t| get(format!("/ui/delete?target={}", enc(&format!("{}@{}", t.repo, t.digest))))),
        },
        RepoCase {
            name: "preview a tag delete",
            need: delete,
            mutates: false,
            api: |t| api(Method::GET, format!("preview/{}:{}", t.repo, t.tag), None),
            console: Some(|t| get(format!("/ui/delete?target={}", enc(&format!("{}:{}", t.repo, t.tag))))),
        },
        RepoCase {
            name: "preview a repository delete",
            need: admin,
            mutates: false,
            api: |t| api(Method::GET, format!("preview/{}", t.repo), None),
            console: Some(|t| get(format!("/ui/delete?target={}", enc(&t.repo)))),
        },
        RepoCase {
            name: "space of a repository",
            need: admin,
            mutates: false,
            api: |t| api(Method::GET, format!("space/{}", t.repo), None),
            console: None,
        },
        RepoCase {
            name: "delete a manifest",
            need: delete,
            mutates: true,
            api: |t| api(Method::DELETE, format!("manifests/{}@{}", t.repo, t.digest), None),
            console: Some(|t| post_form("/ui/delete", vec![("target", format!("{}@{}", t.repo, t.digest))])),
        },
        RepoCase {
            name: "delete a tag",
            need: delete,
            mutates: true,
            api: |t| api(Method::DELETE, format!("manifests/{}:{}", t.repo, t.tag), None),
            console: Some(|t| post_form("/ui/delete", vec![("target", format!("{}:{}", t.repo, t.tag))])),
        },
        RepoCase {
            name: "delete a repository",
            need: admin,
            mutates: true,
            api: |t| api(Method::DELETE, format!("repositories/{}", t.repo), None),
            console: Some(|t| post_form("/ui/delete", vec![("target", t.repo.clone())])),
        },
        RepoCase {
            name: "restore a manifest",
            need: admin,
            mutates: true,
            api: |t| api(Method::POST, format!("restore/{}@{}", t.repo, t.digest), None),
            console: Some(|t| post_form("/ui/restore", vec![("target", format!("{}@{}", t.repo, t.digest))])),
        },
        RepoCase {
            name: "restore a tag",
            need: admin,
            mutates: true,
            api: |t| api(Method::POST, format!("restore/{}:{}", t.repo, t.tag), None),
            console: Some(|t| post_form("/ui/restore", vec![("target", format!("{}:{}", t.repo, t.tag))])),
        },
        RepoCase {
            name: "restore a repository",
            need: admin,
            mutates: true,
            api: |t| api(Method::POST, format!("restore/{}", t.repo), None),
            console: Some(|t| post_form("/ui/restore", vec![("target", t.repo.clone())])),
        },
        RepoCase {
            name: "revert a tag",
            need: admin,
            mutates: true,
            api: |t| api(Method::POST, format!("revert/{}:{}", t.repo, t.tag), Some(json!({"to": t.digest}))),
            console: Some(|t| {
                post_form(
                    "/ui/revert",
                    vec![("repo", t.repo.clone()), ("tag", t.tag.clone()), ("digest", t.digest.clone())],
                )
            }),
        },
        RepoCase {
            name: "lift a tag's immutability",
            need: admin,
            mutates: true,
            api: |t| api(Method::POST, format!("unlock/{}:{}", t.repo, t.tag), Some(json!({"reason": "x"}))),
            console: None,
        },
    ]
}

/// An operation on the whole registry: admin API route(s) and the console page showing them.
struct RegistryCase {
    name: &'static str,
    api: Vec<Req>,
    console: Option<Req>,
}

fn registry_cases() -> Vec<RegistryCase> {
    vec![
        RegistryCase {
            name: "collector status and total space",
            api: vec![api(Method::GET, "gc/status".into(), None), api(Method::GET, "space".into(), None)],
            console: Some(get("/ui/space".into())),
        },
        RegistryCase {
            name: "retention status",
            api: vec![api(Method::GET, "retention/status".into(), None)],
            console: Some(get("/ui/retention".into())),
        },
        RegistryCase {
            name: "retention dry run",
            api: vec![api(Method::POST, "retention/run?dry_run=true".into(), None)],
            console: Some(get("/ui/retention?dry_run=true".into())),
        },
        RegistryCase {
            name: "retention run (no rules: removes nothing)",
            api: vec![api(Method::POST, "retention/run".into(), None)],
            console: None,
        },
        RegistryCase { name: "metrics", api: vec![get("/metrics".into())], console: None },
    ]
}

/// Checks a refusal's shape: anonymous callers are challenged with the configured realm,
/// signed-in ones are refused without one.
fn assert_refusal_shape(caller: Caller, what: &str, a: &Answer) {
    if caller == Caller::Anonymous {
        assert_eq!(a.status, 401, "{what}: {a:?}");
        let challenge = a.challenge.as_deref().unwrap_or_default();
        assert!(
            challenge.starts_with(&format!("Basic realm=\"{REALM}\"")),
            "{what}: challenge {challenge:?}"
        );
    } else {
        assert_eq!(a.status, 403, "{what}: {a:?}");
    }
}

backend_test!(permission_matrix_every_admin_route_and_console_action, |reg| {
    let f = fixture(reg).await;
    let missing_digest = Digest::sha256_of(b"stored nowhere").to_string();
    let mut checked = 0;

    // Every operation on a repository, on a target that exists and on one that does not.
    for repo in ["team/app", "other/secret", "public/base"] {
        let (ns, _) = repo.split_once('/').unwrap();
        let exists = Target { repo: repo.into(), tag: "v1".into(), digest: f.manifests[repo].to_string() };
        let missing =
            Target { repo: format!("{ns}/missing"), tag: "v9".into(), digest: missing_digest.clone() };
        for case in repo_cases() {
            let need = (case.need)(repo);
            for caller in CALLERS {
                let allowed = caller.may(&need);
                let what =
                    |face: &str, t: &Target| format!("{caller:?}: {} of {} ({face})", case.name, t.repo);
                let faces: Vec<(&str, ToRequest)> = std::iter::once(("admin API", case.api))
                    .chain(case.console.map(|c| ("console", c)))
                    .collect();
                for (face, request) in faces {
                    let on_missing = f.send(caller, &request(&missing)).await;
                    checked += 1;
                    if allowed {
                        assert!(
                            !on_missing.refused(),
                            "{} must be allowed: {on_missing:?}",
                            what(face, &missing)
                        );
                        if !case.mutates {
                            let on_existing = f.send(caller, &request(&exists)).await;
                            checked += 1;
                            assert!(
                                (200..400).contains(&on_existing.status),
                                "{} must succeed: {on_existing:?}",
                                what(face, &exists)
                            );
                        }
                    } else {
                        let on_existing = f.send(caller, &request(&exists)).await;
                        checked += 1;
                        assert_refusal_shape(caller, &what(face, &exists), &on_existing);
                        assert_refusal_shape(caller, &what(face, &missing), &on_missing);
                        assert_eq!(
                            (on_existing.status, &on_existing.challenge, exists.normalize(&on_existing.body)),
                            (on_missing.status, &on_missing.challenge, missing.normalize(&on_missing.body)),
                            "{}: a refusal must not tell whether the target exists",
                            what(face, &exists)
                        );
                    }
                }
            }
        }
    }
    // Nothing a refused caller asked for happened: every fixture is still there.
    for (repo, digest) in &f.manifests {
        let res =
            f.reg.req(Method::GET, &format!("/v2/{repo}/manifests/v1")).basic_auth("root", Some(PASSWORD));
        let res = res.send().await.unwrap();
        assert_eq!(res.status(), 200, "{repo}:v1");
        assert_eq!(header(&res, "docker-content-digest"), Some(digest.as_str()));
    }

    // The whole registry's operations.
    for case in registry_cases() {
        for caller in CALLERS {
            let allowed = caller.may(&Need::Everywhere);
            let faces =
                case.api.iter().map(|r| ("admin API", r)).chain(case.console.iter().map(|r| ("console", r)));
            for (face, req) in faces {
                let a = f.send(caller, req).await;
                checked += 1;
                let what = format!("{caller:?}: {} ({face} {})", case.name, req.path);
                if allowed {
                    assert_eq!(a.status, 200, "{what}: {a:?}");
                } else {
                    assert_refusal_shape(caller, &what, &a);
                }
            }
        }
    }

    // A blob wherever it is: a layer only team/app holds, one only other/secret holds, and one
    // stored nowhere. Refusals are the same whether the blob exists or not.
    let blobs = [
        (f.team_layer.to_string(), vec!["team/app".to_string()]),
        (f.secret_layer.to_string(), vec!["other/secret".to_string()]),
        (missing_digest.clone(), Vec::new()),
    ];
    type BlobRequest = fn(&str) -> Req;
    let blob_cases: [(&str, bool, BlobRequest); 2] = [
        ("explain a blob", false, |d| api(Method::GET, format!("explain/{d}"), None)),
        ("purge a blob", true, |d| {
            api(Method::POST, "purge".into(), Some(json!({"digest": d, "reason": "x"})))
        }),
    ];
    for (name, mutates, request) in blob_cases {
        for caller in CALLERS {
            let refusal_of_missing = f.send(caller, &request(&missing_digest)).await;
            for (digest, holders) in &blobs {
                let allowed = caller.may(&Need::Blob(holders.clone()));
                let what = format!("{caller:?}: {name} held by {holders:?}");
                if allowed && mutates && !holders.is_empty() {
                    continue;
                }
                let a = f.send(caller, &request(digest)).await;
                checked += 1;
                if allowed {
                    assert!(!a.refused(), "{what} must be allowed: {a:?}");
                } else {
                    assert_refusal_shape(caller, &what, &a);
                    assert_eq!(
                        (a.status, &a.challenge, a.body.replace(digest.as_str(), "DIGEST")),
                        (
                            refusal_of_missing.status,
                            &refusal_of_missing.challenge,
                            refusal_of_missing.body.replace(missing_digest.as_str(), "DIGEST")
                        ),
                        "{what}: the refusal must be the one for a blob stored nowhere"
                    );
                }
            }
        }
    }

    // The repository lists show what each caller may see, the same in both faces; the sign-in
    // page challenges anonymous callers only.
    for caller in CALLERS {
        let listed: Value =
            serde_json::from_str(&f.send(caller, &api(Method::GET, "repositories".into(), None)).await.body)
                .unwrap();
        let listed: Vec<&str> =
            listed["repositories"].as_array().unwrap().iter().map(|r| r["name"].as_str().unwrap()).collect();
        let visible: Vec<&str> = ["other/secret", "public/base", "team/app"]
            .into_iter()
            .filter(|r| caller.has(r, "pull"))
            .collect();
        assert_eq!(listed, visible, "{caller:?}: the admin API's list");
        let page = f.send(caller, &get("/ui/".into())).await;
        assert_eq!(page.status, 200, "{caller:?}: {page:?}");
        for repo in ["other/secret", "public/base", "team/app"] {
            let link = format!("/ui/repo?name={}", enc(repo));
            assert_eq!(
                page.body.contains(&link),
                caller.has(repo, "pull"),
                "{caller:?}: {repo} on the console's list"
            );
        }
        let login = f.send(caller, &get("/ui/login".into())).await;
        if caller == Caller::Anonymous {
            assert_refusal_shape(caller, "sign in", &login);
        } else {
            assert_eq!(login.status, 303, "{caller:?}: sign in");
        }
    }
    eprintln!("{checked} answers checked");
    assert!(checked > 700, "{checked} answers checked");
});

// Issue 31, defect 1: a user with only `delete` on team/** deleted a whole repository through the
// console, which the admin API refuses.
backend_test!(the_console_refuses_a_repository_delete_the_admin_api_refuses, |reg| {
    let f = fixture(reg).await;
    let delete_repository = post_form("/ui/delete", vec![("target", "team/app".into())]);
    let via_console = f.send(Caller::Deleter, &delete_repository).await;
    let via_api = f.send(Caller::Deleter, &api(Method::DELETE, "repositories/team/app".into(), None)).await;
    assert_eq!((via_api.status, via_console.status), (403, 403), "{via_api:?} {via_console:?}");
    let res = f.reg.req(Method::GET, "/v2/team/app/tags/list").basic_auth("deleter", Some(PASSWORD));
    assert_eq!(res.send().await.unwrap().status(), 200, "the repository is still there");
    // The console offers the user the deletes it may make, and not the repository's.
    let page = f.send(Caller::Deleter, &get("/ui/repo?name=team%2Fapp".into())).await;
    let repository_delete = "/ui/delete?target=team%2Fapp\"";
    assert!(page.body.contains("/ui/delete?target=team%2Fapp%3Av2"), "{}", page.body);
    assert!(!page.body.contains(repository_delete), "no repository delete for a delete user: {}", page.body);
    let page = f.send(Caller::TeamAdmin, &get("/ui/repo?name=team%2Fapp".into())).await;
    assert!(page.body.contains(repository_delete), "{}", page.body);
    // What the user may do, the console does: delete a tag.
    let delete_tag = post_form("/ui/delete", vec![("target", "team/app:v2".into())]);
    assert_eq!(f.send(Caller::Deleter, &delete_tag).await.status, 303);
    let res = f.reg.req(Method::GET, "/v2/team/app/tags/list").basic_auth("deleter", Some(PASSWORD));
    let tags: Value = res.send().await.unwrap().json().await.unwrap();
    assert_eq!(tags["tags"], json!(["v1"]));
});

// Issue 31, defect 2: explain and purge told any signed-in user whether a digest is stored
// anywhere (a 403 naming "no repository you administer" only for a blob stored nowhere).
backend_test!(blob_refusals_do_not_tell_whether_the_blob_exists, |reg| {
    let f = fixture(reg).await;
    let nowhere = Digest::sha256_of(b"stored nowhere");
    for caller in [Caller::Reader, Caller::Pusher, Caller::Deleter, Caller::TeamAdmin] {
        let explain = |d: &Digest| api(Method::GET, format!("explain/{d}"), None);
        let purge = |d: &Digest| {
            api(Method::POST, "purge".into(), Some(json!({"digest": d.as_str(), "reason": "x"})))
        };
        for request in [explain, purge] {
            let elsewhere = f.send(caller, &request(&f.secret_layer)).await;
            let missing = f.send(caller, &request(&nowhere)).await;
            assert_eq!(elsewhere.status, 403, "{caller:?}: {elsewhere:?}");
            assert_eq!(
                (elsewhere.status, elsewhere.body.replace(f.secret_layer.as_str(), "D")),
                (missing.status, missing.body.replace(nowhere.as_str(), "D")),
                "{caller:?}: the same refusal for a blob in a repository it does not administer and for none"
            );
        }
    }
    // The blob is still there, and an administrator of every repository may ask about any blob.
    let res =
        f.reg.req(Method::GET, &format!("/admin/v1/explain/{nowhere}")).basic_auth("root", Some(PASSWORD));
    let body: Value = res.send().await.unwrap().json().await.unwrap();
    assert_eq!(body["state"], "gone", "{body}");
    let res = f
        .reg
        .req(Method::GET, &format!("/admin/v1/explain/{}", f.secret_layer))
        .basic_auth("root", Some(PASSWORD));
    let body: Value = res.send().await.unwrap().json().await.unwrap();
    assert_eq!(body["state"], "live", "{body}");
});

// Issue 31, defect 3: the console's registry-wide pages answered an anonymous visitor 403
// without a challenge, so a browser never asked for credentials there.
backend_test!(the_console_challenges_anonymous_visitors_on_every_page, |reg| {
    let f = fixture(reg).await;
    for path in ["/ui/space", "/ui/retention", "/ui/retention?dry_run=true", "/ui/trash?repo=team%2Fapp"] {
        let a = f.send(Caller::Anonymous, &get(path.into())).await;
        assert_refusal_shape(Caller::Anonymous, path, &a);
        let wrong =
            f.http.get(f.reg.url(path)).basic_auth("root", Some("wrong password")).send().await.unwrap();
        assert_eq!(wrong.status(), StatusCode::UNAUTHORIZED, "{path}: a wrong password");
        assert!(header(&wrong, "www-authenticate").is_some_and(|c| c.contains(REALM)), "{path}");
        let a = f.send(Caller::Reader, &get(path.into())).await;
        if path.starts_with("/ui/trash") {
            assert_eq!(a.status, 200, "{path}: {a:?}");
        } else {
            assert_refusal_shape(Caller::Reader, path, &a);
        }
    }
});

// The admin API authenticates before it reads the request: an anonymous caller is challenged
// whatever it sends, a signed-in one is told what is malformed.
backend_test!(the_admin_api_authenticates_before_reading_the_request, |reg| {
    let f = fixture(reg).await;
    let malformed = [
        api(Method::GET, "preview/Not%20A%20Target".into(), None),
        api(Method::POST, "restore/team/app@sha256:0000".into(), None),
        api(Method::POST, "purge".into(), Some(json!({"digest": "sha256:nope", "reason": "x"}))),
        api(Method::POST, "revert/team/app:v1".into(), Some(json!({"previous": true, "at": 1}))),
        api(Method::GET, "no/such/route".into(), None),
    ];
    for req in &malformed {
        let a = f.send(Caller::Anonymous, req).await;
        assert_refusal_shape(Caller::Anonymous, &req.path, &a);
        let wrong = f
            .http
            .request(req.method.clone(), f.reg.url(&req.path))
            .basic_auth("root", Some("wrong password"))
            .send()
            .await
            .unwrap();
        assert_eq!(wrong.status(), StatusCode::UNAUTHORIZED, "{}", req.path);
        let a = f.send(Caller::Reader, req).await;
        assert!(matches!(a.status, 400 | 404), "{}: {a:?}", req.path);
    }
});

// The token endpoint grants `admin` as far as the rules allow, and the admin API accepts such
// tokens for the repositories they name — never for the whole registry.
backend_test!(admin_tokens_work_on_the_admin_api_within_their_scope, |reg| {
    let mut f = fixture(reg).await;
    let mut config = f.reg.app.config.clone();
    let dir = f.reg.stop().await;
    let key = dir.path().join("token.pem");
    std::fs::write(&key, crate::auth::TOKEN_KEY).unwrap();
    let mut auth = config.auth.take().unwrap();
    auth.token = Some(
        toml::from_str(&format!("service = \"berth-test\"\nsigning_key = {:?}\n", key.display().to_string()))
            .unwrap(),
    );
    config.auth = Some(auth);
    f.reg = TestRegistry::start_with(config, dir).await;
    let token = |user: &str, scope: &str| {
        let req = f
            .http
            .get(f.reg.url("/auth/token"))
            .query(&[("service", "berth-test"), ("scope", scope)])
            .basic_auth(user, Some(PASSWORD));
        async move {
            req.send().await.unwrap().json::<Value>().await.unwrap()["token"].as_str().unwrap().to_string()
        }
    };
    let bearer = |t: &str, method: Method, path: &str| f.http.request(method, f.reg.url(path)).bearer_auth(t);
    let team = token("teamadmin", "repository:team/app:admin repository:other/secret:admin").await;
    let res = bearer(&team, Method::GET, "/admin/v1/preview/team/app").send().await.unwrap();
    assert_eq!(res.status(), 200);
    // Not granted (the rules do not allow it), so the token does not carry it.
    let res = bearer(&team, Method::GET, "/admin/v1/preview/other/secret").send().await.unwrap();
    assert_eq!(res.status(), 401);
    // `*` asks for admin too; a token never covers the whole registry.
    let root = token("root", "repository:other/secret:*").await;
    let res = bearer(&root, Method::GET, "/admin/v1/preview/other/secret").send().await.unwrap();
    assert_eq!(res.status(), 200);
    let res = bearer(&root, Method::GET, "/admin/v1/gc/status").send().await.unwrap();
    assert_eq!(res.status(), 401);
    // A reader's token asking for admin gets pull only.
    let reader = token("reader", "repository:team/app:pull,admin").await;
    let res = bearer(&reader, Method::GET, "/admin/v1/tombstones/team/app").send().await.unwrap();
    assert_eq!(res.status(), 200);
    let res = bearer(&reader, Method::GET, "/admin/v1/preview/team/app").send().await.unwrap();
    assert_eq!(res.status(), 401);
});

// A purge is authorized over the repositories holding the blob at that moment; a mount of the
// blob into a repository the caller does not administer, landing before the purge has the blob
// locked, must not be purged with it. Made exact on PostgreSQL: a third connection holds the
// blob's row shared, so the purge (which locks it for update) waits while the mount (shared,
// compatible) goes through; then the lock is released.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_purge_never_reaches_a_holder_added_after_it_was_authorized() {
    let Some(reg) = TestRegistry::try_start(Backend::Postgres).await else { return };
    let f = fixture(reg).await;
    let layer = f.team_layer.clone();
    let mut holder =
        crate::revive::LockHolder::lock(&f.reg, "SELECT id FROM blobs WHERE digest = $1 FOR SHARE", &layer)
            .await;
    let purge = {
        let (http, url) = (f.http.clone(), f.reg.url("/admin/v1/purge"));
        let body = json!({"digest": layer.as_str(), "reason": "a secret"});
        tokio::spawn(async move {
            http.post(url).basic_auth("teamadmin", Some(PASSWORD)).json(&body).send().await.unwrap().status()
        })
    };
    holder.wait_for_waiters(1).await;
    let mount = f
        .http
        .post(f.reg.url(&format!("/v2/other/copy/blobs/uploads/?mount={layer}&from=team/app")))
        .basic_auth("root", Some(PASSWORD))
        .send();
    let mount = tokio::time::timeout(std::time::Duration::from_secs(2), mount).await;
    holder.release().await;
    let purged = purge.await.unwrap();
    let head = |repo: &str| {
        f.http.head(f.reg.url(&format!("/v2/{repo}/blobs/{layer}"))).basic_auth("root", Some(PASSWORD)).send()
    };
    match mount {
        Ok(Ok(res)) if res.status() == StatusCode::CREATED => {
            // The mount landed first: the purge, allowed over team/app alone, is refused whole.
            assert_eq!(
                purged,
                StatusCode::CONFLICT,
                "a purge reached a repository it was not authorized for"
            );
            assert_eq!(head("other/copy").await.unwrap().status(), 200);
            assert_eq!(head("team/app").await.unwrap().status(), 200);
        }
        // The mount queued behind the purge (or became an upload): the purge went as authorized.
        _ => assert_eq!(purged, StatusCode::OK),
    }
    let fsck = f.reg.app.registry.fsck(false, &|_, _| {}).await.unwrap();
    assert!(fsck.clean(), "{:?}", fsck.problems);
}
