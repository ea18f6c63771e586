//! Backups of a whole deployment (docs/backup.md): where they are kept ([`location`]) and how
//! their files are written and read ([`format`]). Taking, verifying and restoring a backup
//! composes the metadata store and blob storage, and lives in `registry::backup`.

pub mod catalog;
pub mod format;
pub mod location;

pub use format::{Amount, BackupRecord, FileRecord, KeyLine, KeysRecord, SourceRecord};
pub use location::Location;
