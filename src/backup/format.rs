//! The files of a backup: tables and the key list as gzip-compressed JSON lines, and
//! `backup.json`, the record that makes a backup complete.
//!
//! A table file's first line names the table and its columns; every other line is one row, a
//! JSON array of cells: `null`, an integer, a float, a string, or `{"b": "<base64>"}` for bytes.
//! The format names columns, not positions, so a backup loads into a later schema (docs/backup.md).
//! Files are written and read as streams: memory stays bounded whatever the table's size.

use std::io::Write as _;

use base64::Engine as _;
use bytes::Bytes;
use flate2::Compression;
use flate2::write::{GzDecoder, GzEncoder};
use futures_util::StreamExt as _;
use object_store::WriteMultipart;
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use crate::blob::ByteStream;
use crate::meta::Cell;

/// The version of the backup format this Berth writes and reads.
pub const FORMAT: u32 = 1;

/// Errors of reading or writing backup files.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file is not what the format says.
    #[error("backup file `{file}`: {why}")]
    Malformed {
        /// The file.
        file: String,
        /// What is wrong.
        why: String,
    },
    /// The location failed.
    #[error(transparent)]
    Location(#[from] super::location::Error),
    /// Reading the file failed.
    #[error("backup file `{file}`: {source}")]
    Io {
        /// The file.
        file: String,
        /// The error.
        #[source]
        source: std::io::Error,
    },
}

type Result<T, E = Error> = std::result::Result<T, E>;

/// `backup.json`: what a complete backup holds. Written last.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BackupRecord {
    /// The format version ([`FORMAT`]).
    pub format: u32,
    /// The backup's id: its start time and a random suffix, so ids sort by time.
    pub id: String,
    /// The Berth version that wrote it.
    pub berth_version: String,
    /// When the backup started, ms since the epoch.
    pub started_at: i64,
    /// When its snapshot of the metadata was taken: everything acknowledged before is in it.
    pub snapshot_at: i64,
    /// When it was complete.
    pub finished_at: i64,
    /// The deployment it was taken of.
    pub source: SourceRecord,
    /// The schema's migration level at the snapshot.
    pub schema_level: i64,
    /// Every table, in the order it loads.
    pub tables: Vec<FileRecord>,
    /// The key list: every storage key the snapshot names.
    pub keys: KeysRecord,
    /// Objects written by this backup.
    pub copied: Amount,
    /// Objects already in the location with the size named (written by an earlier backup, or
    /// by an earlier attempt of this one), not written again.
    pub present: Amount,
}

/// The deployment a backup was taken of.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SourceRecord {
    /// `sqlite` or `postgres`.
    pub metadata: String,
    /// Blob storage, as described in the logs.
    pub storage: String,
}

/// One file of a backup.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FileRecord {
    /// The table (for table files).
    pub name: String,
    /// Its path under the backup's directory.
    pub file: String,
    /// Rows (lines after the header).
    pub rows: u64,
    /// Its size as stored.
    pub bytes: u64,
    /// SHA-256 of the file as stored, hex.
    pub sha256: String,
}

/// The key list of a backup.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct KeysRecord {
    /// The file, as for a table.
    #[serde(flatten)]
    pub file: FileRecord,
    /// The bytes of all the keys.
    pub total_bytes: u64,
}

/// A count of objects and their bytes.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Amount {
    /// Objects.
    pub keys: u64,
    /// Their bytes.
    pub bytes: u64,
}

/// One line of the key list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyLine {
    /// The storage key.
    pub key: String,
    /// The blob's size.
    pub size: u64,
    /// The blob's digest.
    pub digest: String,
}

/// A gzip-compressed JSON-lines file being written to a location: compressed as it goes and
/// sent in parts, hashed as stored.
pub struct LinesWriter {
    file: String,
    gz: GzEncoder<Vec<u8>>,
    out: WriteMultipart,
    sha: Sha256,
    stored: u64,
    rows: u64,
}

/// Compressed bytes gathered before they are handed to the location.
const FLUSH_AT: usize = 1024 * 1024;

impl LinesWriter {
    /// A writer of `file` (its name in errors) sending to `out`.
    pub fn new(file: String, out: WriteMultipart) -> Self {
        LinesWriter {
            file,
            gz: GzEncoder::new(Vec::new(), Compression::fast()),
            out,
            sha: Sha256::new(),
            stored: 0,
            rows: 0,
        }
    }

    fn line(&mut self, value: &serde_json::Value) -> Result<()> {
        let io = |source| Error::Io { file: self.file.clone(), source };
        serde_json::to_writer(&mut self.gz, value).map_err(|e| io(e.into()))?;
        self.gz.write_all(b"\n").map_err(io)?;
        Ok(())
    }

    /// Writes the header line.
    ///
    /// # Errors
    /// When compressing fails.
    pub fn header(&mut self, value: &serde_json::Value) -> Result<()> {
        self.line(value)
    }

    /// Writes one row.
    ///
    /// # Errors
    /// When compressing or the location fails.
    pub async fn row(&mut self, value: &serde_json::Value) -> Result<()> {
        self.line(value)?;
        self.rows += 1;
        if self.gz.get_ref().len() >= FLUSH_AT {
            self.flush_out().await?;
        }
        Ok(())
    }

    async fn flush_out(&mut self) -> Result<()> {
        let buf = std::mem::take(self.gz.get_mut());
        self.sha.update(&buf);
        self.stored += buf.len() as u64;
        self.out.wait_for_capacity(2).await.map_err(super::location::Error::from)?;
        self.out.put(Bytes::from(buf));
        Ok(())
    }

    /// Ends the file: what was written, as stored.
    ///
    /// # Errors
    /// When compressing or the location fails.
    pub async fn finish(mut self, name: &str) -> Result<FileRecord> {
        self.gz.try_finish().map_err(|source| Error::Io { file: self.file.clone(), source })?;
        self.flush_out().await?;
        self.out.finish().await.map_err(super::location::Error::from)?;
        Ok(FileRecord {
            name: name.to_string(),
            file: self.file.clone(),
            rows: self.rows,
            bytes: self.stored,
            sha256: hex::encode(self.sha.finalize()),
        })
    }
}

/// Reads a gzip-compressed JSON-lines file as a stream, line by line, hashing it as stored.
pub struct LinesReader {
    file: String,
    body: ByteStream,
    gz: GzDecoder<Vec<u8>>,
    /// Decompressed bytes not yet returned as lines (from `start`).
    start: usize,
    sha: Sha256,
    stored: u64,
    done: bool,
}

impl LinesReader {
    /// A reader of `body`, the file `file`.
    pub fn new(file: String, body: ByteStream) -> Self {
        LinesReader {
            file,
            body,
            gz: GzDecoder::new(Vec::new()),
            start: 0,
            sha: Sha256::new(),
            stored: 0,
            done: false,
        }
    }

    fn malformed(&self, why: impl Into<String>) -> Error {
        Error::Malformed { file: self.file.clone(), why: why.into() }
    }

    /// The next line, parsed; `None` at the end.
    ///
    /// # Errors
    /// When the file cannot be read, decompressed or parsed.
    pub async fn next(&mut self) -> Result<Option<serde_json::Value>> {
        loop {
            let buf = self.gz.get_ref();
            if let Some(end) = buf[self.start..].iter().position(|&b| b == b'\n') {
                let line = &buf[self.start..self.start + end];
                let value = serde_json::from_slice(line).map_err(|e| self.malformed(e.to_string()))?;
                self.start += end + 1;
                return Ok(Some(value));
            }
            if self.done {
                return if self.start == self.gz.get_ref().len() {
                    Ok(None)
                } else {
                    Err(self.malformed("ends inside a line"))
                };
            }
            // Keep only the unread tail before decompressing more.
            let start = self.start;
            self.gz.get_mut().drain(..start);
            self.start = 0;
            match self.body.next().await {
                Some(piece) => {
                    let piece = piece.map_err(|source| Error::Io { file: self.file.clone(), source })?;
                    self.sha.update(&piece);
                    self.stored += piece.len() as u64;
                    self.gz.write_all(&piece).map_err(|e| self.malformed(e.to_string()))?;
                }
                None => {
                    self.gz.try_finish().map_err(|e| self.malformed(e.to_string()))?;
                    self.done = true;
                }
            }
        }
    }

    /// The size and SHA-256 (hex) of what was read, as stored: call after the last line.
    pub fn stored(self) -> (u64, String) {
        (self.stored, hex::encode(self.sha.finalize()))
    }
}

/// A row's cells as a JSON array.
pub fn encode_row(cells: &[Cell]) -> serde_json::Value {
    serde_json::Value::Array(
        cells
            .iter()
            .map(|cell| match cell {
                Cell::Null => serde_json::Value::Null,
                Cell::Int(i) => (*i).into(),
                Cell::Real(f) => (*f).into(),
                Cell::Text(s) => s.clone().into(),
                Cell::Bytes(b) => {
                    serde_json::json!({ "b": base64::engine::general_purpose::STANDARD.encode(b) })
                }
            })
            .collect(),
    )
}

/// The cells of a row written by [`encode_row`].
///
/// # Errors
/// A description of what is not a cell.
pub fn decode_row(value: serde_json::Value) -> Result<Vec<Cell>, String> {
    let serde_json::Value::Array(items) = value else { return Err("a row is not an array".into()) };
    items
        .into_iter()
        .map(|item| match item {
            serde_json::Value::Null => Ok(Cell::Null),
            serde_json::Value::Number(n) => match n.as_i64() {
                Some(i) => Ok(Cell::Int(i)),
                None => n.as_f64().map(Cell::Real).ok_or_else(|| format!("number {n} out of range")),
            },
            serde_json::Value::String(s) => Ok(Cell::Text(s)),
            serde_json::Value::Object(o) => match o.get("b").and_then(|b| b.as_str()) {
                Some(b) => base64::engine::general_purpose::STANDARD
                    .decode(b)
                    .map(Cell::Bytes)
                    .map_err(|e| format!("bytes: {e}")),
                None => Err("an object cell without `b`".into()),
            },
            other => Err(format!("unexpected cell {other}")),
        })
        .collect()
}

/// A key-list line.
pub fn encode_key(key: &KeyLine) -> serde_json::Value {
    serde_json::json!([key.key, key.size, key.digest])
}

/// The key-list line in `value`.
///
/// # Errors
/// A description of what is wrong.
pub fn decode_key(value: &serde_json::Value) -> Result<KeyLine, String> {
    match value.as_array().map(Vec::as_slice) {
        Some([key, size, digest]) => match (key.as_str(), size.as_u64(), digest.as_str()) {
            (Some(key), Some(size), Some(digest)) => {
                Ok(KeyLine { key: key.to_string(), size, digest: digest.to_string() })
            }
            _ => Err(format!("malformed key line {value}")),
        },
        _ => Err(format!("malformed key line {value}")),
    }
}

/// Reads `file` of a location whole and checks it against its record: the rows are for the
/// caller to read; this only returns the reader.
///
/// # Errors
/// When the location fails.
pub async fn open_lines(location: &super::Location, path: &str) -> Result<LinesReader> {
    Ok(LinesReader::new(path.to_string(), location.get(path).await?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_survive_encoding() {
        let row = vec![
            Cell::Null,
            Cell::Int(-5),
            Cell::Int(i64::MAX),
            Cell::Real(1.5),
            Cell::Text("{\"b\":\"x\"}".into()),
            Cell::Bytes(vec![0, 255, 10]),
        ];
        let back = decode_row(encode_row(&row)).expect("decodes");
        assert_eq!(back, row);
        assert!(decode_row(serde_json::json!({"x": 1})).is_err());
        assert!(decode_row(serde_json::json!([{"c": 1}])).is_err());
    }

    #[test]
    fn key_lines_survive_encoding() {
        let key = KeyLine { key: "blobs/sha256/ab/abcd/1".into(), size: 7, digest: "sha256:abcd".into() };
        assert_eq!(decode_key(&encode_key(&key)).expect("decodes"), key);
        assert!(decode_key(&serde_json::json!(["k", -1, "d"])).is_err());
    }

    #[tokio::test]
    async fn lines_stream_through_compression() {
        let dir = tempfile::tempdir().expect("tempdir");
        let location =
            super::super::Location::open(dir.path().to_str().expect("utf-8"), None).expect("opens");
        let mut writer =
            LinesWriter::new("t.jsonl.gz".into(), location.writer("t.jsonl.gz").await.expect("writer"));
        writer.header(&serde_json::json!({"table": "t"})).expect("header");
        for i in 0..50_000 {
            writer.row(&encode_row(&[Cell::Int(i), Cell::Text(format!("row {i}"))])).await.expect("row");
        }
        let record = writer.finish("t").await.expect("finish");
        assert_eq!(record.rows, 50_000);
        let mut reader = open_lines(&location, "t.jsonl.gz").await.expect("opens");
        assert_eq!(reader.next().await.expect("header"), Some(serde_json::json!({"table": "t"})));
        let mut n = 0;
        while let Some(line) = reader.next().await.expect("line") {
            assert_eq!(decode_row(line).expect("row"), vec![Cell::Int(n), Cell::Text(format!("row {n}"))]);
            n += 1;
        }
        assert_eq!(n, 50_000);
        assert_eq!(reader.stored(), (record.bytes, record.sha256));
    }
}
