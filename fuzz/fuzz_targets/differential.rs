//! Differential fuzz target: unpart's push parser (Go's `mime/multipart` rules) against multer,
//! on arbitrary bodies cut at arbitrary chunk boundaries.
//!
//! Input layout (see fuzz/README.md; `fuzz/seed.sh` writes seeds in it):
//!
//! | bytes    | meaning                                                                  |
//! |----------|--------------------------------------------------------------------------|
//! | 0        | limits: bit 0 `part_header_bytes` 256 (else 8 KiB), bit 1 `line_bytes` 128 (else 4096), bit 2 `parts` 4 (else 128) |
//! | 1..5     | four chunk sizes, cycled: `b < 128` → `b + 1`, else `(b - 127) * 64`       |
//! | 5..LF    | the boundary (CR dropped, cut to 70 bytes; empty → input ignored)         |
//! | after LF | the body                                                                 |
//!
//! It fails on: a panic anywhere; unpart giving a different outcome for the chunked body than
//! for the whole body; a broken event sequence; `buffered()` above the bound derived from the
//! limits; a generated upstream header that is not a token name / visible-ASCII value or that
//! does not decode back to the field; and any disagreement with multer that is not one of the
//! documented difference classes (fuzz/README.md).

#![no_main]

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll, Waker};

use bytes::Bytes;
use futures_util::Stream;
use libfuzzer_sys::fuzz_target;
use pingora::http::RequestHeader;
use unpart::config::HeadersConf;
use unpart::multipart::{
    classify, form_boundary, Event, ParseError, Parser, ParserLimits, PartHead, PartKind,
    MAX_BOUNDARY_LEN,
};
use unpart::rewrite::{self, FormHeaders, Framing};

struct Input<'a> {
    limits: ParserLimits,
    chunks: [usize; 4],
    boundary: Vec<u8>,
    body: &'a [u8],
}

fn chunk_size(b: u8) -> usize {
    if b < 128 {
        b as usize + 1
    } else {
        (b as usize - 127) * 64
    }
}

fn decode(data: &[u8]) -> Option<Input<'_>> {
    let ctl = *data.first()?;
    let sizes = data.get(1..5)?;
    let rest = &data[5..];
    let nl = memchr::memchr(b'\n', rest)?;
    // A boundary never holds CR or LF: form_boundary cannot return one.
    let mut boundary: Vec<u8> = rest[..nl].iter().copied().filter(|&c| c != b'\r').collect();
    boundary.truncate(MAX_BOUNDARY_LEN);
    if boundary.is_empty() {
        return None;
    }
    let d = ParserLimits::default();
    Some(Input {
        limits: ParserLimits {
            part_header_bytes: if ctl & 1 != 0 { 256 } else { d.part_header_bytes },
            line_bytes: if ctl & 2 != 0 { 128 } else { d.line_bytes },
            parts: if ctl & 4 != 0 { 4 } else { d.parts },
        },
        chunks: [0, 1, 2, 3].map(|i| chunk_size(sizes[i])),
        boundary,
        body: &rest[nl + 1..],
    })
}

/// Bytes the parser may hold copied: one preamble/boundary line or one header block (the
/// carry, whose capacity may be up to twice its length after a reallocation), the header bytes
/// kept for the current part, and a partial delimiter with its two look-ahead bytes.
fn buffered_bound(l: &ParserLimits) -> usize {
    let delim = 2 + 2 + MAX_BOUNDARY_LEN + 2;
    2 * (l.line_bytes.max(l.part_header_bytes) + 2 * delim) + l.part_header_bytes
}

/// One part as unpart saw it, with where its header block ended and its data ended.
#[derive(Debug, Clone, PartialEq, Eq)]
struct OurPart {
    head: PartHead,
    head_end: u64,
    data: Vec<u8>,
    /// Position right after the delimiter that ended the data.
    end: Option<u64>,
}

/// The outcome, and the parts seen (up to the error, if any).
type Ours = (Result<(), ParseError>, Vec<OurPart>);

fn ours(inp: &Input, chunks: &[usize]) -> Ours {
    let body = inp.body;
    let mut p = Parser::new(&inp.boundary, inp.limits);
    let bound = buffered_bound(&inp.limits);
    let mut parts: Vec<OurPart> = Vec::new();
    let mut ended = false;
    let mut in_part = false;
    let mut pos = 0;
    let mut last_position = 0;
    let mut sizes = chunks.iter().copied().cycle();
    loop {
        let eof = pos >= body.len();
        if eof {
            p.finish();
        } else {
            let n = sizes.next().unwrap().clamp(1, body.len() - pos);
            p.push(Bytes::copy_from_slice(&body[pos..pos + n]));
            pos += n;
        }
        loop {
            let ev = p.next_event();
            assert!(
                p.buffered() <= bound,
                "parser holds {} bytes copied, bound {bound}",
                p.buffered()
            );
            let ev = match ev {
                Ok(Some(ev)) => ev,
                Ok(None) => break,
                Err(e) => return (Err(e), parts),
            };
            let position = p.position();
            assert!(position >= last_position && position <= pos as u64);
            last_position = position;
            assert!(!ended, "event after End: {ev:?}");
            match ev {
                Event::Part(head) => {
                    assert!(!in_part, "Part inside a part");
                    in_part = true;
                    parts.push(OurPart {
                        head,
                        head_end: position,
                        data: Vec::new(),
                        end: None,
                    });
                }
                Event::Data(d) => {
                    assert!(in_part && !d.is_empty(), "empty or stray Data");
                    parts.last_mut().unwrap().data.extend_from_slice(&d);
                }
                Event::PartEnd => {
                    assert!(in_part, "PartEnd outside a part");
                    in_part = false;
                    parts.last_mut().unwrap().end = Some(position);
                }
                Event::End => {
                    assert!(!in_part, "End inside a part");
                    ended = true;
                }
            }
        }
        if eof {
            assert!(ended, "input ended without End or error");
            return (Ok(()), parts);
        }
    }
}

// ---- multer ----

#[derive(Debug)]
struct TheirPart {
    name: Option<String>,
    filename: Option<String>,
    data: Vec<u8>,
}

/// Yields the chunks with a `Pending` (and an immediate wake) before each, so multer really sees
/// them one at a time instead of draining a ready stream in one poll.
struct Chunked {
    pieces: std::vec::IntoIter<Bytes>,
    ready: bool,
}

impl Stream for Chunked {
    type Item = Result<Bytes, std::io::Error>;
    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if !self.ready {
            self.ready = true;
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        self.ready = false;
        Poll::Ready(self.pieces.next().map(Ok))
    }
}

fn block_on<F: Future>(f: F, max_polls: usize) -> F::Output {
    let mut f = std::pin::pin!(f);
    let mut cx = Context::from_waker(Waker::noop());
    for _ in 0..max_polls {
        if let Poll::Ready(v) = f.as_mut().poll(&mut cx) {
            return v;
        }
    }
    panic!("multer did not finish in {max_polls} polls");
}

fn theirs(boundary: &str, body: &[u8], chunks: &[usize]) -> Result<Vec<TheirPart>, multer::Error> {
    let mut pieces = Vec::new();
    let mut pos = 0;
    let mut sizes = chunks.iter().copied().cycle();
    while pos < body.len() {
        let n = sizes.next().unwrap().clamp(1, body.len() - pos);
        pieces.push(Bytes::copy_from_slice(&body[pos..pos + n]));
        pos += n;
    }
    let polls = 64 * (pieces.len() + 16);
    let stream = Chunked {
        pieces: pieces.into_iter(),
        ready: false,
    };
    block_on(
        async {
            let mut m = multer::Multipart::new(stream, boundary);
            let mut out = Vec::new();
            while let Some(mut f) = m.next_field().await? {
                let mut part = TheirPart {
                    name: f.name().map(str::to_string),
                    filename: f.file_name().map(str::to_string),
                    data: Vec::new(),
                };
                while let Some(c) = f.chunk().await? {
                    part.data.extend_from_slice(&c);
                }
                out.push(part);
            }
            Ok(out)
        },
        polls,
    )
}

// ---- the documented difference classes (fuzz/README.md) ----

/// Outcomes and classes, printed every N runs when UNPART_FUZZ_STATS=N (N defaults to 2^20).
static COUNTS: [AtomicU64; 12] = [const { AtomicU64::new(0) }; 12];
const CLASS_NAMES: [&str; 12] = [
    "runs",
    "compared (both accept)",
    "both reject",
    "lf-mode",
    "preamble-dash",
    "delimiter-lookalike",
    "dash-at-data-start",
    "header-block-not-crlf",
    "httparse-stricter",
    "unpart-limit",
    "closing-line-rest",
    "boundary-not-utf8",
];

fn stats_every() -> Option<u64> {
    static EVERY: std::sync::OnceLock<Option<u64>> = std::sync::OnceLock::new();
    *EVERY.get_or_init(|| {
        let v = std::env::var("UNPART_FUZZ_STATS").ok()?;
        Some(v.parse().unwrap_or(1 << 20).max(1))
    })
}

fn count(i: usize) {
    let n = COUNTS[i].fetch_add(1, Ordering::Relaxed) + 1;
    if i == 0 && stats_every().is_some_and(|every| n % every == 0) {
        let s: Vec<String> = CLASS_NAMES
            .iter()
            .zip(&COUNTS)
            .map(|(name, c)| format!("{name}={}", c.load(Ordering::Relaxed)))
            .collect();
        eprintln!("unpart-fuzz stats: {}", s.join(" "));
    }
}

fn skip_lwsp(b: &[u8]) -> &[u8] {
    let n = b.iter().take_while(|c| matches!(c, b' ' | b'\t')).count();
    &b[n..]
}

/// Go's first boundary line, found line by line with no length limit: (start, end, lf mode).
fn go_first_boundary(body: &[u8], dash: &[u8]) -> Option<(usize, usize, bool)> {
    let mut start = 0;
    while start < body.len() {
        let end = memchr::memchr(b'\n', &body[start..]).map_or(body.len(), |i| start + i + 1);
        if let Some(rest) = body[start..end].strip_prefix(dash) {
            let after = skip_lwsp(rest);
            if after == b"\n" {
                return Some((start, end, true));
            }
            if after == b"\r\n" {
                return Some((start, end, false));
            }
            if let Some(f) = rest.strip_prefix(b"--") {
                let f = skip_lwsp(f);
                if f.is_empty() || f == b"\r\n" {
                    return Some((start, end, false));
                }
            }
        }
        start = end;
    }
    None
}

struct Facts {
    lf_mode: bool,
    /// multer takes the first `--boundary` anywhere; Go only a whole boundary line.
    preamble_dash: bool,
    /// `\r\n--boundary` followed by something other than `--`, space, tab, CR, LF: data to Go,
    /// a (then failing) delimiter to multer.
    lookalike: bool,
    /// `--boundary--` followed by anything but spaces, tabs and CRLF or the end: Go fails the
    /// line, multer stops at `--boundary--` and ignores the rest.
    closing_rest: bool,
}

fn facts(body: &[u8], boundary: &[u8]) -> Facts {
    let mut dash = b"--".to_vec();
    dash.extend_from_slice(boundary);
    let first = go_first_boundary(body, &dash);
    let multer_first = memchr::memmem::find(body, &dash);
    let mut delim = b"\r\n".to_vec();
    delim.extend_from_slice(&dash);
    let mut lookalike = false;
    let mut closing_rest = false;
    let mut check = |after: &[u8]| match after {
        [b' ' | b'\t' | b'\r' | b'\n', ..] | [] => {}
        [b'-', b'-', rest @ ..] => {
            let rest = skip_lwsp(rest);
            if !(rest.is_empty() || rest.starts_with(b"\r\n")) {
                closing_rest = true;
            }
        }
        _ => lookalike = true,
    };
    for i in memchr::memmem::find_iter(body, &delim) {
        check(&body[i + delim.len()..]);
    }
    if let Some(i) = multer_first {
        check(&body[i + dash.len()..]);
    }
    Facts {
        lf_mode: first.is_some_and(|f| f.2),
        preamble_dash: first.map(|f| f.0) != multer_first,
        lookalike,
        closing_rest,
    }
}

/// Per part of unpart's view: a header block multer reads differently (it reads up to the
/// first CRLFCRLF: an empty block or one with bare-LF lines swallows data), or data that
/// starts with `--boundary` (Go ends the part there, multer needs CRLF before it).
fn part_facts(parts: &[OurPart], body: &[u8], boundary: &[u8]) -> (bool, bool) {
    let mut dash = b"--".to_vec();
    dash.extend_from_slice(boundary);
    let mut not_crlf = false;
    let mut dash_start = false;
    let Some((_, first_end, _)) = go_first_boundary(body, &dash) else {
        return (false, false);
    };
    let mut hs = first_end;
    for p in parts {
        let he = p.head_end as usize;
        let block = &body[hs.min(he)..he];
        let bare_lf = block
            .iter()
            .enumerate()
            .any(|(i, &c)| c == b'\n' && (i == 0 || block[i - 1] != b'\r'));
        if block.len() < 4 || bare_lf {
            not_crlf = true;
        }
        if body[he..].starts_with(&dash) {
            dash_start = true;
        }
        let Some(end) = p.end else { break };
        let end = end as usize;
        hs = memchr::memchr(b'\n', &body[end..]).map_or(body.len(), |i| end + i + 1);
    }
    (not_crlf, dash_start)
}

/// A Content-Disposition both parsers must read the same way: exactly one, `form-data;
/// name="N"` and optionally `; filename="F"`, with N and F plain printable ASCII (no quote,
/// backslash or `name`, which multer finds by substring search) and F without `/` or `\`.
fn simple_cd(head: &PartHead) -> bool {
    let cds: Vec<&[u8]> = head
        .headers
        .iter()
        .filter(|(n, _)| n.eq_ignore_ascii_case(b"content-disposition"))
        .map(|(_, v)| v.as_slice())
        .collect();
    let [cd] = cds[..] else { return false };
    let plain = |v: &[u8], file: bool| {
        v.iter()
            .all(|&c| (0x20..0x7f).contains(&c) && c != b'"' && c != b'\\')
            && !v.windows(4).any(|w| w == b"name")
            && !(file && (v.contains(&b'/') || v.contains(&b'\\')))
    };
    let Some(rest) = cd.strip_prefix(b"form-data; name=\"") else {
        return false;
    };
    let Some(q) = memchr::memchr(b'"', rest) else {
        return false;
    };
    if !plain(&rest[..q], false) {
        return false;
    }
    let rest = &rest[q + 1..];
    if rest.is_empty() {
        return true;
    }
    let Some(f) = rest.strip_prefix(b"; filename=\"") else {
        return false;
    };
    match f.strip_suffix(b"\"") {
        Some(f) => plain(f, true),
        None => false,
    }
}

/// What a part is to a form: (name, filename) with Go's rules, from unpart and from multer.
fn our_form(p: &OurPart) -> Option<(Vec<u8>, Option<Vec<u8>>)> {
    match classify(&p.head) {
        PartKind::Field { name } => Some((name, None)),
        PartKind::File {
            field, filename, ..
        } => Some((field, Some(filename))),
        PartKind::Ignored => None,
    }
}

fn their_form(p: &TheirPart) -> Option<(Vec<u8>, Option<Vec<u8>>)> {
    let name = p.name.as_deref().filter(|n| !n.is_empty())?;
    let file = p.filename.as_deref().filter(|f| !f.is_empty());
    Some((name.as_bytes().to_vec(), file.map(|f| f.as_bytes().to_vec())))
}

fn header_error(e: &multer::Error) -> bool {
    matches!(
        e,
        multer::Error::ReadHeaderFailed(_)
            | multer::Error::DecodeHeaderName { .. }
            | multer::Error::DecodeHeaderValue { .. }
            | multer::Error::IncompleteHeaders
    )
}

fn differential(inp: &Input, a: &Ours) {
    let Ok(boundary) = std::str::from_utf8(&inp.boundary) else {
        count(11);
        return;
    };
    let b = theirs(boundary, inp.body, &inp.chunks);
    let f = facts(inp.body, &inp.boundary);
    let (not_crlf, dash_start) = part_facts(&a.1, inp.body, &inp.boundary);
    // Each class, in order; the first that applies explains a disagreement.
    let classes = [
        (3, f.lf_mode),
        (4, f.preamble_dash),
        (5, f.lookalike),
        (6, dash_start),
        (7, not_crlf),
    ];
    let explained = |extra: &[(usize, bool)]| {
        classes
            .iter()
            .chain(extra)
            .find(|(_, yes)| *yes)
            .map(|(i, _)| *i)
    };
    match (&a.0, &b) {
        (Err(_), Err(_)) => count(2),
        (Ok(()), Ok(theirs)) => {
            let ours = &a.1;
            let same_data = ours.len() == theirs.len()
                && ours.iter().zip(theirs).all(|(x, y)| x.data == y.data);
            let same_names = same_data
                && ours
                    .iter()
                    .zip(theirs)
                    .filter(|(x, _)| simple_cd(&x.head))
                    .all(|(x, y)| our_form(x) == their_form(y));
            if same_data && same_names {
                count(1);
                return;
            }
            match explained(&[]) {
                Some(i) => count(i),
                None => panic!(
                    "both accept but differ:\nours   {:?}\ntheirs {:?}",
                    ours.iter()
                        .map(|p| (our_form(p), p.data.len()))
                        .collect::<Vec<_>>(),
                    theirs
                        .iter()
                        .map(|p| (their_form(p), p.data.len()))
                        .collect::<Vec<_>>()
                ),
            }
        }
        (Ok(()), Err(e)) => match explained(&[(8, header_error(e))]) {
            Some(i) => count(i),
            None => panic!("unpart accepts, multer rejects: {e}"),
        },
        (Err(e), Ok(_)) => {
            let limit = matches!(
                e,
                ParseError::LineTooLong(_)
                    | ParseError::PartHeaderTooLarge(_)
                    | ParseError::TooManyParts(_)
            );
            let closing = f.closing_rest && *e == ParseError::BadBoundaryLine;
            match explained(&[(9, limit), (10, closing)]) {
                Some(i) => count(i),
                None => panic!("unpart rejects ({e}), multer accepts"),
            }
        }
    }
}

// ---- the headers unpart would send upstream ----

fn is_tchar(c: u8) -> bool {
    c.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&c)
}

fn unescape(s: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(s.len());
    let mut i = 0;
    while i < s.len() {
        if s[i] == b'%' {
            let hex = std::str::from_utf8(&s[i + 1..i + 3]).expect("escape is ASCII");
            out.push(u8::from_str_radix(hex, 16).expect("escape is hex"));
            i += 3;
        } else {
            out.push(s[i]);
            i += 1;
        }
    }
    out
}

fn rewrite_check(inp: &Input, parts: &[OurPart]) {
    let conf = HeadersConf::default();
    let max = 32 * 1024;
    let mut form = FormHeaders::default();
    let mut fields: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
    let mut file: Option<(Vec<u8>, Vec<u8>, Vec<u8>)> = None;
    for p in parts {
        match classify(&p.head) {
            PartKind::Field { name } => {
                assert!(!name.is_empty());
                if form.field(&conf, &name, &p.data, max).is_ok() {
                    fields.push((name, p.data.clone()));
                }
            }
            PartKind::File {
                field,
                filename,
                content_type,
            } => {
                assert!(!field.is_empty() && !filename.is_empty());
                assert!(filename == b"/" || !filename.contains(&b'/'), "{filename:?}");
                let ct = content_type.unwrap_or_else(|| b"application/octet-stream".to_vec());
                if file.is_none()
                    && rewrite::valid_content_type(&ct)
                    && form.file(&conf, &field, &filename, max).is_ok()
                {
                    file = Some((field, filename, ct));
                }
            }
            PartKind::Ignored => {}
        }
    }
    let mut client = RequestHeader::build("POST", b"/upload", None).unwrap();
    let mut ct = b"multipart/form-data; boundary=\"".to_vec();
    for &c in &inp.boundary {
        if c == b'"' || c == b'\\' {
            ct.push(b'\\');
        }
        ct.push(c);
    }
    ct.push(b'"');
    for (n, v) in [
        ("Host", &b"example"[..]),
        ("Content-Length", b"123"),
        ("Transfer-Encoding", b"chunked"),
        ("Connection", b"keep-alive"),
    ] {
        client.append_header(n, v).unwrap();
    }
    // The client's Content-Type, if it is a valid header value, must give back the boundary.
    if let Ok(v) = http::HeaderValue::from_bytes(&ct) {
        client.insert_header("Content-Type", v).unwrap();
        assert_eq!(
            form_boundary(&ct).unwrap(),
            Some(inp.boundary.clone()),
            "boundary does not survive quoting"
        );
    }
    let up = rewrite::upstream_head(
        &client,
        &form,
        file.as_ref().map(|f| f.2.as_slice()),
        Framing::Chunked,
    )
    .expect("upstream head");
    let mut got_fields = Vec::new();
    let mut names = Vec::new();
    for (n, v) in up.headers.iter() {
        let n = n.as_str().as_bytes();
        assert!(!n.is_empty() && n.iter().all(|&c| is_tchar(c)), "name {n:?}");
        let v = v.as_bytes();
        assert!(
            v.iter().all(|&c| c == b' ' || c == b'\t' || c.is_ascii_graphic()),
            "value {v:?}"
        );
        if let Some(suffix) = n.strip_prefix(b"x-form-") {
            got_fields.push((unescape(&suffix.to_ascii_lowercase()), unescape(v)));
        } else if n.starts_with(b"x-file-") {
            let (field, filename, _) = file.as_ref().expect("x-file-* without a file");
            match n {
                b"x-file-name" => assert_eq!(&unescape(v), filename),
                b"x-file-field" => assert_eq!(&unescape(v), field),
                _ => panic!("unexpected {n:?}"),
            }
        }
        names.push(n.to_vec());
    }
    // The header map groups values by name; within a name the order is kept.
    fields.sort_by(|a, b| a.0.cmp(&b.0));
    got_fields.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(got_fields, fields);
    let has = |n: &[u8]| names.iter().any(|x| x == n);
    assert!(has(b"host") && has(b"transfer-encoding") && !has(b"content-length"));
    assert!(!has(b"connection"));
    assert_eq!(has(b"content-type"), file.is_some());
    assert_eq!(has(b"x-file-name"), file.is_some());
}

fuzz_target!(|data: &[u8]| {
    let Some(inp) = decode(data) else { return };
    count(0);
    let split = ours(&inp, &inp.chunks);
    let whole = ours(&inp, &[inp.body.len().max(1)]);
    // Chunking must never change the outcome (data events may be cut differently; compare
    // the joined data, which `ours` already does).
    // After an error the parts seen so far may end at a different byte: compare the error.
    match (&split.0, &whole.0) {
        (Ok(()), Ok(())) => assert_eq!(split.1, whole.1, "the chunked body parses differently"),
        (a, b) => assert_eq!(a, b, "the chunked body parses differently"),
    }
    if whole.0.is_ok() {
        rewrite_check(&inp, &whole.1);
    }
    differential(&inp, &whole);
});
