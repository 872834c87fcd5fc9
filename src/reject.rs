//! Why unpart refused or failed a request: the status, a stable error code for machines, and a
//! one-line JSON body for people (`{"error":"…","limit":"…","detail":"…"}`).

use bytes::Bytes;

use crate::multipart::{BoundaryError, ParseError};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reject {
    pub status: u16,
    pub error: &'static str,
    pub limit: Option<&'static str>,
    pub detail: String,
}

impl Reject {
    fn new(status: u16, error: &'static str, detail: impl Into<String>) -> Reject {
        Reject {
            status,
            error,
            limit: None,
            detail: detail.into(),
        }
    }

    pub fn malformed(detail: impl Into<String>) -> Reject {
        Reject::new(400, "malformed_multipart", detail)
    }

    pub fn limit(limit: &'static str, max: u64, what: &str) -> Reject {
        Reject {
            limit: Some(limit),
            ..Reject::new(
                413,
                "limit_exceeded",
                format!("{what} exceeds the limit {limit} = {max}"),
            )
        }
    }

    pub fn late_field(name: &[u8]) -> Reject {
        Reject::new(
            422,
            "late_field",
            format!(
                "field `{}` comes after the file part; this endpoint streams the file, so send \
                 every field before the file (or ask the operator for spool mode on this route)",
                String::from_utf8_lossy(name)
            ),
        )
    }

    pub fn extra_file(field: &[u8]) -> Reject {
        Reject::new(
            422,
            "extra_file",
            format!(
                "a second file part (field `{}`) follows the first; this endpoint accepts one \
                 file per request: send each file in its own request",
                String::from_utf8_lossy(field)
            ),
        )
    }

    pub fn length_required() -> Reject {
        Reject::new(
            411,
            "length_required",
            "this endpoint forwards the file with an exact length: send the body with a \
             Content-Length header, not chunked",
        )
    }

    pub fn length_mismatch() -> Reject {
        Reject::new(
            422,
            "length_mismatch",
            "this endpoint forwards the file with a length computed from Content-Length, so \
             the body must end right after the file with `\\r\\n--boundary--\\r\\n`; this one \
             does not (ask the operator for framing: chunked or spool mode on this route)",
        )
    }

    pub fn spool_cap(max: u64) -> Reject {
        Reject {
            limit: Some("spool.max_total_bytes"),
            ..Reject::new(
                507,
                "spool_full",
                format!(
                    "the files being spooled would exceed spool.max_total_bytes = {max}; try \
                     again later"
                ),
            )
        }
    }

    pub fn spool_full(e: &std::io::Error) -> Reject {
        Reject::new(
            507,
            "spool_full",
            format!("no space left to spool the file: {e}"),
        )
    }

    pub fn spool_failed(e: impl std::fmt::Display) -> Reject {
        Reject::new(
            500,
            "spool_failed",
            format!("spooling the file failed: {e}"),
        )
    }

    pub fn bad_file_content_type() -> Reject {
        Reject::malformed("the file part's Content-Type has bytes outside visible ASCII")
    }

    /// The answer usually goes nowhere; a client that only half-closed reads it.
    pub fn incomplete_body() -> Reject {
        Reject::new(
            400,
            "incomplete_body",
            "the connection closed before the end of the request body",
        )
    }

    pub fn client_timeout(secs: f64) -> Reject {
        Reject::new(
            408,
            "client_timeout",
            format!("no request body bytes for {secs} s"),
        )
    }

    pub fn head_timeout(secs: f64) -> Reject {
        Reject {
            limit: Some("timeouts.client_head"),
            ..Reject::new(
                408,
                "head_timeout",
                format!("the request head was not complete within {secs} s"),
            )
        }
    }

    pub fn client_too_slow(rate: u64, min: u64) -> Reject {
        Reject {
            limit: Some("timeouts.client_body_min_rate"),
            ..Reject::new(
                408,
                "client_too_slow",
                format!(
                    "the request body arrived at {rate} bytes/s, below \
                     timeouts.client_body_min_rate = {min}"
                ),
            )
        }
    }

    pub fn upstream_unreachable(detail: impl std::fmt::Display) -> Reject {
        Reject::new(
            502,
            "upstream_unreachable",
            format!("cannot connect to the backend: {detail}"),
        )
    }

    pub fn upstream_failed(detail: impl std::fmt::Display) -> Reject {
        Reject::new(
            502,
            "upstream_failed",
            format!("the backend failed: {detail}"),
        )
    }

    pub fn upstream_timeout(detail: impl std::fmt::Display) -> Reject {
        Reject::new(
            504,
            "upstream_timeout",
            format!("the backend did not answer in time: {detail}"),
        )
    }

    pub fn body(&self) -> Bytes {
        let mut v = serde_json::json!({ "error": self.error, "detail": self.detail });
        if let Some(l) = self.limit {
            v["limit"] = l.into();
        }
        let mut s = v.to_string();
        s.push('\n');
        Bytes::from(s)
    }
}

impl From<BoundaryError> for Reject {
    fn from(e: BoundaryError) -> Reject {
        Reject::malformed(e.to_string())
    }
}

impl From<ParseError> for Reject {
    fn from(e: ParseError) -> Reject {
        match e {
            ParseError::PartHeaderTooLarge(n) => {
                Reject::limit("part_header_bytes", n as u64, "a part's header block")
            }
            ParseError::TooManyParts(n) => Reject::limit("parts", n as u64, "the number of parts"),
            other => Reject::malformed(other.to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bodies_are_one_line_json() {
        let r = Reject::limit("fields", 64, "the number of fields");
        let v: serde_json::Value = serde_json::from_slice(&r.body()).unwrap();
        assert_eq!(v["error"], "limit_exceeded");
        assert_eq!(v["limit"], "fields");
        assert_eq!(r.status, 413);
        let late = Reject::late_field(b"a\"b\n");
        let body = late.body();
        assert_eq!(body.iter().filter(|&&c| c == b'\n').count(), 1);
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert!(v["detail"].as_str().unwrap().contains("before the file"));
        assert_eq!(Reject::from(ParseError::Incomplete).status, 400);
        assert_eq!(Reject::from(ParseError::TooManyParts(3)).status, 413);
    }
}
