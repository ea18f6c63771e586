//! Parsing of the request headers that carry protocol data: `Range`, `Content-Range`, `Accept`.

use axum::http::{HeaderMap, header};

use crate::blob::ByteRange;
use crate::registry::ChunkRange;

/// A `Range` request on a blob of `size` bytes.
#[derive(Debug, PartialEq, Eq)]
pub enum RangeRequest {
    /// No usable range: serve the whole blob (RFC 9110 lets a server ignore a malformed or
    /// multi-part `Range`).
    Whole,
    /// One satisfiable range.
    Part(ByteRange),
    /// A well-formed range that lies outside the blob (416).
    Unsatisfiable,
}

/// Interprets a `Range: bytes=…` header for a blob of `size` bytes.
pub fn blob_range(headers: &HeaderMap, size: u64) -> RangeRequest {
    let Some(value) = headers.get(header::RANGE).and_then(|v| v.to_str().ok()) else {
        return RangeRequest::Whole;
    };
    let Some(spec) = value.trim().strip_prefix("bytes=") else {
        return RangeRequest::Whole;
    };
    if spec.contains(',') {
        return RangeRequest::Whole;
    }
    let Some((first, last)) = spec.split_once('-') else {
        return RangeRequest::Whole;
    };
    let (first, last) = (first.trim(), last.trim());
    let parse = |s: &str| -> Option<u64> {
        (!s.is_empty() && s.bytes().all(|b| b.is_ascii_digit())).then(|| s.parse().ok()).flatten()
    };
    match (parse(first), parse(last)) {
        // bytes=-N: the last N bytes.
        (None, Some(n)) if first.is_empty() => {
            if n == 0 || size == 0 {
                RangeRequest::Unsatisfiable
            } else {
                let n = n.min(size);
                RangeRequest::Part(ByteRange { start: size - n, end: size - 1 })
            }
        }
        (Some(start), None) if last.is_empty() => {
            if start >= size {
                RangeRequest::Unsatisfiable
            } else {
                RangeRequest::Part(ByteRange { start, end: size - 1 })
            }
        }
        (Some(start), Some(end)) if start <= end => {
            if start >= size {
                RangeRequest::Unsatisfiable
            } else {
                RangeRequest::Part(ByteRange { start, end: end.min(size - 1) })
            }
        }
        _ => RangeRequest::Whole,
    }
}

/// Parses a chunk's `Content-Range`: the spec's `<start>-<end>`, also accepting the HTTP form
/// `bytes <start>-<end>/<total>` some clients send. `Ok(None)` when absent.
///
/// # Errors
/// A message when the header is present but malformed.
pub fn content_range(headers: &HeaderMap) -> Result<Option<ChunkRange>, String> {
    let Some(value) = headers.get(header::CONTENT_RANGE) else {
        return Ok(None);
    };
    let bad = || format!("Content-Range must be <start>-<end>, got {value:?}");
    let text = value.to_str().map_err(|_| bad())?.trim();
    let text = text.strip_prefix("bytes").map_or(text, |t| t.trim_start_matches([' ', '=']));
    let text = text.split('/').next().unwrap_or(text);
    let (start, end) = text.split_once('-').ok_or_else(bad)?;
    let num = |s: &str| -> Result<u64, String> {
        if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
            return Err(bad());
        }
        s.parse().map_err(|_| bad())
    };
    let (start, end) = (num(start.trim())?, num(end.trim())?);
    if end < start {
        return Err(bad());
    }
    Ok(Some(ChunkRange { start, end }))
}

/// Whether a manifest of `media_type` may be served to a request with these `Accept` headers.
/// No `Accept` at all, a wildcard, or the exact type accepts.
pub fn accepts(headers: &HeaderMap, media_type: &str) -> bool {
    let mut any = false;
    for value in headers.get_all(header::ACCEPT) {
        let Ok(value) = value.to_str() else { continue };
        for item in value.split(',') {
            let item = item.split(';').next().unwrap_or("").trim();
            if item.is_empty() {
                continue;
            }
            any = true;
            if item == media_type || item == "*/*" || item == "application/*" {
                return true;
            }
        }
    }
    !any
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn h(name: header::HeaderName, v: &str) -> HeaderMap {
        let mut m = HeaderMap::new();
        m.insert(name, HeaderValue::from_str(v).unwrap());
        m
    }

    #[test]
    fn ranges() {
        let r = |v: &str| blob_range(&h(header::RANGE, v), 10);
        assert_eq!(r("bytes=0-4"), RangeRequest::Part(ByteRange { start: 0, end: 4 }));
        assert_eq!(r("bytes=5-"), RangeRequest::Part(ByteRange { start: 5, end: 9 }));
        assert_eq!(r("bytes=-3"), RangeRequest::Part(ByteRange { start: 7, end: 9 }));
        assert_eq!(r("bytes=8-100"), RangeRequest::Part(ByteRange { start: 8, end: 9 }));
        assert_eq!(r("bytes=10-"), RangeRequest::Unsatisfiable);
        assert_eq!(r("bytes=-0"), RangeRequest::Unsatisfiable);
        for ignored in [
            "bytes=5-2",
            "bytes=a-b",
            "items=0-1",
            "bytes=0-1,3-4",
            "bytes=-",
            "bytes=99999999999999999999999-",
        ] {
            assert_eq!(r(ignored), RangeRequest::Whole, "{ignored}");
        }
    }

    #[test]
    fn content_ranges() {
        let c = |v: &str| content_range(&h(header::CONTENT_RANGE, v));
        assert_eq!(c("0-99").unwrap().map(|r| (r.start, r.end)), Some((0, 99)));
        assert_eq!(c("bytes 100-199/*").unwrap().map(|r| (r.start, r.end)), Some((100, 199)));
        for bad in ["", "5", "9-3", "-1-2", "a-b", "1-+2"] {
            assert!(c(bad).is_err(), "{bad}");
        }
        assert_eq!(content_range(&HeaderMap::new()).unwrap().map(|r| r.start), None);
    }

    #[test]
    fn accept_negotiation() {
        let t = "application/vnd.oci.image.manifest.v1+json";
        assert!(accepts(&HeaderMap::new(), t));
        assert!(accepts(&h(header::ACCEPT, &format!("a/b, {t};q=0.5")), t));
        assert!(accepts(&h(header::ACCEPT, "*/*"), t));
        assert!(!accepts(&h(header::ACCEPT, "application/vnd.docker.distribution.manifest.v2+json"), t));
    }
}
