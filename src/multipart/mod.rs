//! Multipart parsing: a push parser for the wire format ([`parser`]), Go-compatible header
//! value parsing ([`mediatype`]), and the form-level view of a part ([`classify`]).

pub mod mediatype;
pub mod parser;

pub use parser::{Event, ParseError, Parser, ParserLimits, PartHead, MAX_BOUNDARY_LEN};

/// Why a request that says `multipart/form-data` cannot be parsed at all.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BoundaryError {
    BadContentType(String),
    Missing,
    Empty,
    TooLong(usize),
}

impl std::fmt::Display for BoundaryError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BoundaryError::BadContentType(why) => write!(f, "invalid Content-Type: {why}"),
            BoundaryError::Missing => f.write_str("Content-Type has no boundary parameter"),
            BoundaryError::Empty => f.write_str("Content-Type has an empty boundary"),
            BoundaryError::TooLong(n) => write!(f, "boundary is longer than {n} bytes"),
        }
    }
}

/// `Ok(None)` when the request is not `multipart/form-data` (it is then proxied as it is);
/// the boundary when it is; an error when it says so but cannot be parsed.
pub fn form_boundary(content_type: &[u8]) -> Result<Option<Vec<u8>>, BoundaryError> {
    // Decide "is it multipart/form-data" on the media type alone, so a broken parameter list
    // is reported as such instead of passing the body through unparsed.
    let essence_end = memchr::memchr(b';', content_type).unwrap_or(content_type.len());
    let essence = content_type[..essence_end].trim_ascii();
    if !essence.eq_ignore_ascii_case(b"multipart/form-data") {
        return Ok(None);
    }
    let mt =
        mediatype::parse(content_type).map_err(|e| BoundaryError::BadContentType(e.to_string()))?;
    let boundary = mt.param("boundary").ok_or(BoundaryError::Missing)?;
    if boundary.is_empty() {
        return Err(BoundaryError::Empty);
    }
    if boundary.len() > MAX_BOUNDARY_LEN {
        return Err(BoundaryError::TooLong(MAX_BOUNDARY_LEN));
    }
    Ok(Some(boundary.to_vec()))
}

/// What a part is to a form reader, with Go's `ReadForm` rules: a part needs a `form-data`
/// disposition with a non-empty `name`, or it is skipped; a non-empty `filename` makes it a
/// file, reduced to its base name; a part whose disposition does not parse is skipped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PartKind {
    Field {
        name: Vec<u8>,
    },
    File {
        field: Vec<u8>,
        filename: Vec<u8>,
        content_type: Option<Vec<u8>>,
    },
    Ignored,
}

pub fn classify(head: &PartHead) -> PartKind {
    let Some(cd) = head.get("content-disposition") else {
        return PartKind::Ignored;
    };
    let Ok(mt) = mediatype::parse(cd) else {
        return PartKind::Ignored;
    };
    if mt.essence != "form-data" {
        return PartKind::Ignored;
    }
    let name = match mt.param("name") {
        Some(n) if !n.is_empty() => n.to_vec(),
        _ => return PartKind::Ignored,
    };
    match mt.param("filename") {
        Some(f) if !f.is_empty() => PartKind::File {
            field: name,
            filename: mediatype::base_name(f).to_vec(),
            content_type: head.get("content-type").map(<[u8]>::to_vec),
        },
        _ => PartKind::Field { name },
    }
}
