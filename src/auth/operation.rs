//! What each operation needs: the one table every face consults. The OCI API, the admin API (and
//! the CLI, which speaks it), and the web console name what a request does as an [`Operation`],
//! and [`super::Auth::decide`] alone says whether the caller may — so no face can allow what
//! another refuses. docs/auth.md ("What each operation needs") is this table in prose.

use super::Action;

/// An operation a caller asks for, named by what it does and what it is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operation<'a> {
    /// Only a known caller is needed: `GET /v2/`, where clients discover the challenge.
    SignIn,
    /// List repositories (`/v2/_catalog`, the admin API's and the console's lists): anyone may;
    /// each list shows only the repositories the caller may read ([`Operation::Pull`],
    /// [`Operation::ReadRecords`]).
    List,
    /// Read a repository's content: manifests, blobs, tags, referrers — through the OCI API or
    /// the console's pages of them — and be the source of a cross-repository mount.
    Pull(&'a str),
    /// Upload blobs and push manifests.
    Push(&'a str),
    /// Delete a manifest, a tag or a blob's link in a repository, or preview such a delete
    /// (whoever may delete may first see what the delete would take).
    Delete(&'a str),
    /// Read a repository's records: its counts and sizes, its tag history and its trash (who
    /// deleted what), and why one of its manifests is kept. They concern this repository alone,
    /// so whoever may pull it may read them.
    ReadRecords(&'a str),
    /// Administer a repository: delete, preview deleting or restore it whole, restore a tombstone
    /// or a tag, revert a tag, lift a tag's immutability, and read its space report (which tells
    /// which of its blobs other repositories hold too).
    Administer(&'a str),
    /// Explain or purge a blob wherever it is: `admin` on every repository holding it, and on
    /// every repository for a blob none holds. `None`: the holders are not read yet — a caller
    /// who administers no repository at all is refused before anything is read, so nobody else
    /// can learn whether a digest is stored.
    AdministerBlob(Option<&'a [String]>),
    /// Administer every repository a pattern matches — a bulk restore over `repositories=GLOB`:
    /// a rule granting `admin` whose pattern covers the glob (decided on the patterns, never on
    /// which repositories exist), or, for a token, the glob being one repository it
    /// administers.
    AdministerMatching(&'a super::Pattern),
    /// Concern the whole registry — the collector, the total space, retention, the metrics:
    /// `admin` on every repository (a rule for `**`; tokens name repositories, so never a token).
    AdministerRegistry,
    /// Report, withdraw or list what sources run (in-use reports, which pin manifests in any
    /// repository): `in-use` (or `admin`) on every repository — a rule for `**`, never a token.
    ReportInUse,
}

impl Operation<'_> {
    /// The rule, in words, for refusals: the same whatever exists (a blob's holders are never
    /// named).
    pub fn needs(&self) -> String {
        let on = |action: Action, repo: &str| format!("this needs `{}` on {repo}", action.as_str());
        match self {
            Operation::SignIn => "this needs a signed-in caller".into(),
            Operation::List => "anyone may list what they may read".into(),
            Operation::Pull(r) | Operation::ReadRecords(r) => on(Action::Pull, r),
            Operation::Push(r) => on(Action::Push, r),
            Operation::Delete(r) => on(Action::Delete, r),
            Operation::Administer(r) => on(Action::Admin, r),
            Operation::AdministerBlob(_) => "this needs `admin` on every repository holding the blob".into(),
            Operation::AdministerMatching(p) => {
                format!("this needs `admin` on every repository matching {} (a rule covering it)", p.as_str())
            }
            Operation::AdministerRegistry => "this needs `admin` on every repository (a rule for **)".into(),
            Operation::ReportInUse => {
                "this needs `in-use` or `admin` on every repository (a rule for **)".into()
            }
        }
    }
}
