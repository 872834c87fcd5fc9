//! The backend contract's headers: encoding form data into header names and values, removing
//! what a client must not be able to forge, and building the upstream request head.

use pingora::http::RequestHeader;

use crate::config::HeadersConf;

/// Bytes kept as they are in values: RFC 3986 unreserved plus a few visible characters that no
/// URL-unescape function changes (`+` is not among them: query decoders turn it into a space).
fn value_safe(c: u8) -> bool {
    c.is_ascii_alphanumeric() || b"-._~!$&'()*,/:;=@".contains(&c)
}

/// Bytes kept in header names: lower-case letters, digits and `-._~`. Upper-case letters are
/// percent-encoded too, because header names are case-insensitive (and Go canonicalises them):
/// a backend lower-cases the name and then unescapes it, and gets the field name back exactly.
fn name_safe(c: u8) -> bool {
    c.is_ascii_lowercase() || c.is_ascii_digit() || b"-._~".contains(&c)
}

fn encode(v: &[u8], safe: fn(u8) -> bool) -> String {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    let mut out = String::with_capacity(v.len());
    for &c in v {
        if safe(c) {
            out.push(c as char);
        } else {
            out.push('%');
            out.push(HEX[(c >> 4) as usize] as char);
            out.push(HEX[(c & 15) as usize] as char);
        }
    }
    out
}

/// A header value any URL-unescape function decodes back to `v`, byte for byte.
pub fn encode_value(v: &[u8]) -> String {
    encode(v, value_safe)
}

/// A header-name suffix: lower-case it, unescape it, and you have `v`.
pub fn encode_name(v: &[u8]) -> String {
    encode(v, name_safe)
}

fn has_prefix_ci(name: &str, prefix: &str) -> bool {
    name.len() >= prefix.len()
        && name.as_bytes()[..prefix.len()].eq_ignore_ascii_case(prefix.as_bytes())
}

/// Removes every header that starts with a reserved prefix; returns how many names it removed.
pub fn strip_reserved(req: &mut RequestHeader, conf: &HeadersConf) -> usize {
    let doomed: Vec<http::HeaderName> = req
        .headers
        .keys()
        .filter(|k| {
            conf.reserved_prefixes
                .iter()
                .any(|p| has_prefix_ci(k.as_str(), p))
        })
        .cloned()
        .collect();
    for name in &doomed {
        req.remove_header(name);
    }
    doomed.len()
}

/// Headers that describe the client's message or connection, not the request: the upstream
/// message is framed and connected anew.
fn strip_framing(req: &mut RequestHeader) {
    let listed: Vec<String> = req
        .headers
        .get_all(http::header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|t| t.trim().to_ascii_lowercase())
        .filter(|t| !t.is_empty())
        .collect();
    for name in listed {
        req.remove_header(name.as_str());
    }
    for name in [
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "content-length",
        "expect",
    ] {
        req.remove_header(name);
    }
}

/// The generated headers of one request, with the running size that `header_bytes` bounds.
#[derive(Debug, Default)]
pub struct FormHeaders {
    entries: Vec<(String, String)>,
    bytes: usize,
}

/// The generated headers would exceed `header_bytes`.
#[derive(Debug)]
pub struct HeadersTooLarge;

impl FormHeaders {
    fn push(&mut self, name: String, value: String, max: usize) -> Result<(), HeadersTooLarge> {
        // As they appear on the wire: `name: value\r\n`.
        let size = name.len() + value.len() + 4;
        if self.bytes + size > max {
            return Err(HeadersTooLarge);
        }
        self.bytes += size;
        self.entries.push((name, value));
        Ok(())
    }

    pub fn field(
        &mut self,
        conf: &HeadersConf,
        name: &[u8],
        value: &[u8],
        max: usize,
    ) -> Result<(), HeadersTooLarge> {
        let name = format!("{}{}", conf.field_prefix, encode_name(name));
        self.push(name, encode_value(value), max)
    }

    /// The file part's headers; `content_type` is the part's own, already checked.
    pub fn file(
        &mut self,
        conf: &HeadersConf,
        field: &[u8],
        filename: &[u8],
        max: usize,
    ) -> Result<(), HeadersTooLarge> {
        self.push(conf.file_name.clone(), encode_value(filename), max)?;
        self.push(conf.file_field.clone(), encode_value(field), max)
    }

    /// What spool mode knows once the file is complete: its size and digests.
    pub fn file_facts(
        &mut self,
        conf: &HeadersConf,
        size: u64,
        digests: &[(crate::digest::Algorithm, String)],
        max: usize,
    ) -> Result<(), HeadersTooLarge> {
        self.push(conf.file_size.clone(), size.to_string(), max)?;
        for (alg, hex) in digests {
            let name = format!("{}{}", conf.file_digest_prefix, alg.header_suffix());
            self.push(name, hex.clone(), max)?;
        }
        Ok(())
    }
}

/// How the upstream body is framed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    Chunked,
    Length(u64),
}

/// The upstream request head: the client's (already stripped of reserved headers), without its
/// framing, with the generated headers, the body's Content-Type and the new framing.
pub fn upstream_head(
    client: &RequestHeader,
    form: &FormHeaders,
    content_type: Option<&[u8]>,
    framing: Framing,
) -> pingora::Result<RequestHeader> {
    let mut req = client.clone();
    strip_framing(&mut req);
    req.set_version(http::Version::HTTP_11);
    match content_type {
        Some(ct) => req.insert_header(http::header::CONTENT_TYPE, ct)?,
        None => {
            req.remove_header(&http::header::CONTENT_TYPE);
        }
    }
    for (name, value) in &form.entries {
        req.append_header(name.clone(), value.as_str())?;
    }
    match framing {
        Framing::Chunked => req.insert_header(http::header::TRANSFER_ENCODING, "chunked")?,
        Framing::Length(n) => req.insert_header(http::header::CONTENT_LENGTH, n.to_string())?,
    }
    Ok(req)
}

/// A part's Content-Type can be sent on only if it is a plain visible-ASCII value.
pub fn valid_content_type(ct: &[u8]) -> bool {
    !ct.is_empty() && ct.iter().all(|&c| c == b'\t' || (0x20..0x7f).contains(&c))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What Go's url.PathUnescape does (the documented backend decode).
    fn unescape(s: &str) -> Vec<u8> {
        let b = s.as_bytes();
        let mut out = Vec::new();
        let mut i = 0;
        while i < b.len() {
            if b[i] == b'%' {
                out.push(u8::from_str_radix(&s[i + 1..i + 3], 16).unwrap());
                i += 3;
            } else {
                out.push(b[i]);
                i += 1;
            }
        }
        out
    }

    #[test]
    fn every_byte_round_trips_and_stays_visible_ascii() {
        let all: Vec<u8> = (0..=255).collect();
        let value = encode_value(&all);
        let name = encode_name(&all);
        for enc in [&value, &name] {
            assert!(enc.bytes().all(|c| c.is_ascii_graphic()), "{enc}");
        }
        assert_eq!(unescape(&value), all);
        // Names survive any re-casing by the backend's header map.
        assert_eq!(
            unescape(&name.to_ascii_uppercase().to_ascii_lowercase()),
            all
        );
        let v = encode_value("a b+c%\r\n\0é".as_bytes());
        assert_eq!(v, "a%20b%2Bc%25%0D%0A%00%C3%A9");
    }

    #[test]
    fn names_are_tokens_and_case_survives_canonicalisation() {
        let n = encode_name("userId \"x\"".as_bytes());
        assert_eq!(n, "user%49d%20%22x%22");
        assert!(n
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&c)));
        // Whatever case a backend's header map gives the name, lower-casing recovers it.
        assert_eq!(
            unescape(&n.to_ascii_uppercase().to_ascii_lowercase()),
            b"userId \"x\""
        );
    }

    #[test]
    fn reserved_headers_are_removed_case_insensitively() {
        let conf = HeadersConf::default();
        let mut req = RequestHeader::build("POST", b"/u", None).unwrap();
        req.append_header("x-form-title", "forged").unwrap();
        req.append_header("X-FILE-NAME", "forged").unwrap();
        req.append_header("X-Formal", "kept").unwrap();
        req.append_header("Host", "h").unwrap();
        assert_eq!(strip_reserved(&mut req, &conf), 2);
        assert!(req.headers.get("x-form-title").is_none());
        assert!(req.headers.get("x-file-name").is_none());
        assert_eq!(req.headers.get("x-formal").unwrap(), "kept");
    }

    #[test]
    fn upstream_head_replaces_framing() {
        let conf = HeadersConf::default();
        let mut client = RequestHeader::build("POST", b"/u?q=1", None).unwrap();
        for (n, v) in [
            ("Host", "h"),
            ("Content-Length", "99"),
            ("Expect", "100-continue"),
            ("Connection", "keep-alive, X-Hop"),
            ("X-Hop", "1"),
            ("Content-Type", "multipart/form-data; boundary=b"),
        ] {
            client.append_header(n, v).unwrap();
        }
        let mut form = FormHeaders::default();
        form.field(&conf, b"a", b"1", 1000).unwrap();
        form.field(&conf, b"a", b"2", 1000).unwrap();
        form.file(&conf, b"file", "r é.txt".as_bytes(), 1000)
            .unwrap();
        let up = upstream_head(&client, &form, Some(b"text/plain"), Framing::Chunked).unwrap();
        let h = &up.headers;
        assert!(h.get("content-length").is_none() && h.get("expect").is_none());
        assert!(h.get("x-hop").is_none() && h.get("connection").is_none());
        assert_eq!(h.get("transfer-encoding").unwrap(), "chunked");
        assert_eq!(h.get("content-type").unwrap(), "text/plain");
        let a: Vec<_> = h.get_all("x-form-a").iter().collect();
        assert_eq!(a, ["1", "2"]);
        assert_eq!(h.get("x-file-name").unwrap(), "r%20%C3%A9.txt");
        assert_eq!(up.uri, "/u?q=1");
        assert!(form.field(&conf, b"big", &[b'x'; 2000], 1000).is_err());
    }
}
