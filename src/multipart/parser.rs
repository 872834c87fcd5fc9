//! Push-based `multipart/form-data` parser.
//!
//! Feed it chunks as they arrive from the client with [`Parser::push`], then drain events with
//! [`Parser::next_event`] until it returns `Ok(None)` ("need more input"). File data comes out as
//! zero-copy slices of the pushed chunks; only line fragments (preamble, part headers, boundary
//! lines) and a possible partial delimiter at a chunk's end are ever copied, and each of those
//! copies is bounded by a limit. Memory per parser is therefore a small constant, whatever the
//! size of the parts.
//!
//! The grammar follows Go's `mime/multipart` reader (the parser behind `ParseMultipartForm`), so
//! that a backend behind unpart sees what a Go handler would have seen:
//! - lines before the first boundary line are a preamble and are skipped;
//! - the first boundary line decides the line ending: a bare `\n` switches the body to LF mode;
//! - a part's data ends at `<nl>--boundary` followed by `--`, space, tab, CR or LF; any other
//!   byte after it means the bytes were data; at the very start of a part's data the delimiter
//!   may come without the leading newline;
//! - the rest of a boundary line may hold spaces and tabs, then must be exactly the newline; the
//!   closing line is `--boundary--`, optional spaces and tabs, then a newline or the end of input;
//! - a body that ends before the closing boundary line is an error;
//! - bytes after the closing boundary line (the epilogue) are ignored.

use bytes::{Buf, Bytes, BytesMut};
use memchr::memmem;

/// Bounds that keep a hostile body from growing the parser's buffers or its work.
#[derive(Debug, Clone, Copy)]
pub struct ParserLimits {
    /// Bytes of one part's header block, blank line included.
    pub part_header_bytes: usize,
    /// Parts in one body.
    pub parts: usize,
    /// Bytes of one preamble or boundary line (Go's reader fails past its 4 KiB line buffer).
    pub line_bytes: usize,
}

impl Default for ParserLimits {
    fn default() -> Self {
        ParserLimits {
            part_header_bytes: 8 * 1024,
            parts: 128,
            line_bytes: 4096,
        }
    }
}

/// RFC 2046 caps a boundary at 70 characters; every client we know stays under it.
pub const MAX_BOUNDARY_LEN: usize = 70;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ParseError {
    /// The body ended before the closing boundary line.
    Incomplete,
    /// A boundary line with bytes other than spaces and tabs before its newline.
    BadBoundaryLine,
    /// A part header line that is not `name: value`, or a header block that starts with folding.
    BadPartHeader(String),
    /// A preamble or boundary line longer than `line_bytes`.
    LineTooLong(usize),
    /// A part's header block longer than `part_header_bytes`.
    PartHeaderTooLarge(usize),
    /// More than `parts` parts.
    TooManyParts(usize),
}

impl std::fmt::Display for ParseError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ParseError::Incomplete => write!(f, "body ended before the closing boundary"),
            ParseError::BadBoundaryLine => write!(f, "malformed boundary line"),
            ParseError::BadPartHeader(why) => write!(f, "malformed part header: {why}"),
            ParseError::LineTooLong(n) => {
                write!(f, "preamble or boundary line longer than {n} bytes")
            }
            ParseError::PartHeaderTooLarge(n) => write!(f, "part headers longer than {n} bytes"),
            ParseError::TooManyParts(n) => write!(f, "more than {n} parts"),
        }
    }
}

impl std::error::Error for ParseError {}

/// The header block of one part, as sent.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PartHead {
    /// Header names and values in order; values are trimmed and folded lines joined with a space.
    pub headers: Vec<(Vec<u8>, Vec<u8>)>,
}

impl PartHead {
    /// The first value of `name` (ASCII case-insensitive), as Go's `Header.Get` returns it.
    pub fn get(&self, name: &str) -> Option<&[u8]> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name.as_bytes()))
            .map(|(_, v)| v.as_slice())
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A new part starts; its data follows as `Data` events, then `PartEnd`.
    Part(PartHead),
    Data(Bytes),
    PartEnd,
    /// The closing boundary line was seen; nothing else follows.
    End,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Preamble,
    Headers,
    Body,
    BoundaryLine,
    Epilogue,
    Failed,
}

/// How the bytes at some position compare with a delimiter.
enum Match {
    Yes,
    NeedMore,
    No,
}

pub struct Parser {
    /// `--boundary`
    dash: Vec<u8>,
    /// newline + `--boundary`
    delim: Vec<u8>,
    lf_mode: bool,
    state: State,
    /// Copied bytes awaiting more input: a line fragment, or a possible delimiter prefix.
    carry: BytesMut,
    /// The not yet processed rest of the last pushed chunk.
    input: Bytes,
    eof: bool,
    limits: ParserLimits,
    parts: usize,
    /// No data of the current part has been produced yet.
    body_start: bool,
    pending_end: bool,
    head: PartHead,
    head_bytes: usize,
    /// Bytes pushed so far.
    pushed: u64,
}

impl Parser {
    /// `boundary` must be non-empty and at most [`MAX_BOUNDARY_LEN`] bytes; the caller checks.
    pub fn new(boundary: &[u8], limits: ParserLimits) -> Parser {
        let mut dash = Vec::with_capacity(boundary.len() + 2);
        dash.extend_from_slice(b"--");
        dash.extend_from_slice(boundary);
        let mut delim = b"\r\n".to_vec();
        delim.extend_from_slice(&dash);
        Parser {
            dash,
            delim,
            lf_mode: false,
            state: State::Preamble,
            carry: BytesMut::new(),
            input: Bytes::new(),
            eof: false,
            limits,
            parts: 0,
            body_start: false,
            pending_end: false,
            head: PartHead::default(),
            head_bytes: 0,
            pushed: 0,
        }
    }

    /// Hand the parser the next chunk. Call only after `next_event` returned `Ok(None)`.
    pub fn push(&mut self, chunk: Bytes) {
        debug_assert!(
            self.input.is_empty(),
            "push before the last chunk was consumed"
        );
        self.pushed += chunk.len() as u64;
        if self.state == State::Epilogue {
            return;
        }
        self.input = chunk;
    }

    /// The input has ended; the next `next_event` calls finish or fail the body.
    pub fn finish(&mut self) {
        self.eof = true;
    }

    /// Bytes the parser holds copied, for the memory bound tests.
    pub fn buffered(&self) -> usize {
        self.carry.capacity() + self.head_bytes
    }

    /// Bytes of input turned into events so far (pushed minus what still waits).
    pub fn position(&self) -> u64 {
        self.pushed - (self.input.len() + self.carry.len()) as u64
    }

    /// The body's line ending, `\r\n` or `\n` (decided by the first boundary line).
    pub fn newline(&self) -> &'static [u8] {
        self.nl()
    }

    /// The next event, `Ok(None)` when more input is needed (or, after `End`, never again).
    pub fn next_event(&mut self) -> Result<Option<Event>, ParseError> {
        let r = self.step();
        if r.is_err() {
            self.state = State::Failed;
            self.carry = BytesMut::new();
            self.input = Bytes::new();
        }
        r
    }

    fn step(&mut self) -> Result<Option<Event>, ParseError> {
        loop {
            if self.pending_end {
                self.pending_end = false;
                return Ok(Some(Event::PartEnd));
            }
            match self.state {
                State::Preamble => {
                    let Some(line) = self.take_line(self.limits.line_bytes)? else {
                        return self.need_more();
                    };
                    self.preamble_line(&line)?;
                    if self.state == State::Epilogue {
                        return Ok(Some(Event::End));
                    }
                }
                State::Headers => {
                    let room = self
                        .limits
                        .part_header_bytes
                        .saturating_sub(self.head_bytes);
                    let Some(line) = self.take_line(room)? else {
                        return self.need_more();
                    };
                    self.head_bytes += line.len();
                    if let Some(head) = self.header_line(&line)? {
                        self.state = State::Body;
                        self.body_start = true;
                        return Ok(Some(Event::Part(head)));
                    }
                }
                State::Body => {
                    if let Some(ev) = self.body()? {
                        return Ok(Some(ev));
                    }
                    if self.state == State::Body {
                        return self.need_more();
                    }
                }
                State::BoundaryLine => {
                    let Some(line) = self.take_line(self.limits.line_bytes)? else {
                        return self.need_more();
                    };
                    if self.boundary_rest(&line)? {
                        self.state = State::Epilogue;
                        self.carry = BytesMut::new();
                        self.input = Bytes::new();
                        return Ok(Some(Event::End));
                    }
                    self.start_part()?;
                }
                State::Epilogue | State::Failed => {
                    self.input = Bytes::new();
                    return Ok(None);
                }
            }
        }
    }

    fn need_more(&self) -> Result<Option<Event>, ParseError> {
        if self.eof {
            Err(ParseError::Incomplete)
        } else {
            Ok(None)
        }
    }

    /// One line including its `\n`; at end of input, the unterminated rest. Copies only the line.
    fn take_line(&mut self, max: usize) -> Result<Option<Bytes>, ParseError> {
        // A delimiter matched inside the carry (at the start of a part's data) leaves the two
        // bytes after it there, and they may already hold the boundary line's newline.
        if let Some(i) = memchr::memchr(b'\n', &self.carry) {
            if i + 1 > max {
                return Err(self.too_long(max));
            }
            return Ok(Some(self.carry.split_to(i + 1).freeze()));
        }
        if let Some(i) = memchr::memchr(b'\n', &self.input) {
            if self.carry.len() + i + 1 > max {
                return Err(self.too_long(max));
            }
            let head = self.input.split_to(i + 1);
            if self.carry.is_empty() {
                return Ok(Some(head));
            }
            self.carry.extend_from_slice(&head);
            return Ok(Some(self.carry.split().freeze()));
        }
        if self.carry.len() + self.input.len() > max {
            return Err(self.too_long(max));
        }
        let rest = std::mem::take(&mut self.input);
        self.carry.extend_from_slice(&rest);
        if self.eof && !self.carry.is_empty() {
            return Ok(Some(self.carry.split().freeze()));
        }
        Ok(None)
    }

    fn too_long(&self, max: usize) -> ParseError {
        match self.state {
            State::Headers => ParseError::PartHeaderTooLarge(self.limits.part_header_bytes),
            _ => ParseError::LineTooLong(max),
        }
    }

    fn preamble_line(&mut self, line: &[u8]) -> Result<(), ParseError> {
        let Some(rest) = line.strip_prefix(self.dash.as_slice()) else {
            return Ok(());
        };
        let after = skip_lwsp(rest);
        if after == b"\n" {
            // Not what RFC 2046 says, but clients do it and Go accepts it.
            self.lf_mode = true;
            self.delim.remove(0);
        }
        if after == self.nl() {
            return self.start_part();
        }
        if is_final(rest, self.nl()) {
            self.state = State::Epilogue;
        }
        Ok(())
    }

    fn nl(&self) -> &'static [u8] {
        if self.lf_mode {
            b"\n"
        } else {
            b"\r\n"
        }
    }

    fn start_part(&mut self) -> Result<(), ParseError> {
        self.parts += 1;
        if self.parts > self.limits.parts {
            return Err(ParseError::TooManyParts(self.limits.parts));
        }
        self.state = State::Headers;
        self.head = PartHead::default();
        self.head_bytes = 0;
        Ok(())
    }

    /// Returns `true` for the closing line, `false` for a delimiter line.
    fn boundary_rest(&self, rest: &[u8]) -> Result<bool, ParseError> {
        if skip_lwsp(rest) == self.nl() {
            return Ok(false);
        }
        if is_final(rest, self.nl()) {
            return Ok(true);
        }
        Err(ParseError::BadBoundaryLine)
    }

    /// Go's textproto rules: `name: value`, values trimmed, folded lines joined with a space.
    fn header_line(&mut self, line: &[u8]) -> Result<Option<PartHead>, ParseError> {
        let line = strip_eol(line);
        if line.is_empty() {
            self.head_bytes = 0;
            return Ok(Some(std::mem::take(&mut self.head)));
        }
        if line[0] == b' ' || line[0] == b'\t' {
            let Some((_, value)) = self.head.headers.last_mut() else {
                return Err(ParseError::BadPartHeader(
                    "first header line starts with white space".into(),
                ));
            };
            value.push(b' ');
            value.extend_from_slice(trim_lwsp(line));
            return Ok(None);
        }
        let Some(colon) = memchr::memchr(b':', line) else {
            return Err(ParseError::BadPartHeader(
                "header line without a colon".into(),
            ));
        };
        if colon > 0 {
            let value = trim_lwsp(&line[colon + 1..]).to_vec();
            self.head.headers.push((line[..colon].to_vec(), value));
        }
        Ok(None)
    }

    /// Produces the current part's data; moves to `BoundaryLine` when its delimiter is found.
    fn body(&mut self) -> Result<Option<Event>, ParseError> {
        if self.body_start {
            // Go allows `--boundary` with no newline before it at the start of the data.
            let want = self.dash.len() + 2;
            let in_carry = !self.carry.is_empty() || self.input.len() < want;
            if in_carry && self.carry.len() < want {
                let k = (want - self.carry.len()).min(self.input.len());
                self.carry.extend_from_slice(&self.input.split_to(k));
            }
            let buf: &[u8] = if in_carry { &self.carry } else { &self.input };
            match match_at(buf, &self.dash, self.eof) {
                Match::Yes => {
                    if in_carry {
                        self.carry.advance(self.dash.len());
                    } else {
                        self.input.advance(self.dash.len());
                    }
                    self.body_start = false;
                    self.state = State::BoundaryLine;
                    self.pending_end = true;
                    return Ok(None);
                }
                Match::NeedMore => return Ok(None),
                Match::No => self.body_start = false,
            }
        }
        if !self.carry.is_empty() {
            return Ok(self.body_carry());
        }
        Ok(self.body_input())
    }

    /// The carry holds a few copied bytes (a possible delimiter start). Look for a delimiter that
    /// starts inside it, using a small copied window of the input; otherwise the carry is data.
    fn body_carry(&mut self) -> Option<Event> {
        let held = self.carry.len();
        let k = self.input.len().min(self.delim.len() + 2);
        let mut win = Vec::with_capacity(held + k);
        win.extend_from_slice(&self.carry);
        win.extend_from_slice(&self.input[..k]);
        for i in 0..held {
            match match_at(&win[i..], &self.delim, self.eof) {
                Match::No => continue,
                Match::NeedMore => {
                    // Only possible when the input ran out inside the window.
                    let rest = std::mem::take(&mut self.input);
                    self.carry.extend_from_slice(&rest);
                    let data = self.carry.split_to(i).freeze();
                    return self.data(data);
                }
                Match::Yes => {
                    let data = self.carry.split_to(i).freeze();
                    let dlen = self.delim.len();
                    if dlen <= self.carry.len() {
                        self.carry.advance(dlen);
                    } else {
                        self.input.advance(dlen - self.carry.len());
                        self.carry.clear();
                    }
                    self.state = State::BoundaryLine;
                    self.pending_end = true;
                    return self.data(data);
                }
            }
        }
        let data = self.carry.split().freeze();
        self.data(data)
    }

    /// Zero-copy scan of the input for the delimiter.
    fn body_input(&mut self) -> Option<Event> {
        if self.input.is_empty() {
            return None;
        }
        let dlen = self.delim.len();
        let mut from = 0;
        while let Some(off) = memmem::find(&self.input[from..], &self.delim) {
            let p = from + off;
            match match_at(&self.input[p..], &self.delim, self.eof) {
                Match::Yes => {
                    let data = self.input.split_to(p);
                    self.input.advance(dlen);
                    self.state = State::BoundaryLine;
                    self.pending_end = true;
                    return self.data(data);
                }
                Match::NeedMore => {
                    let data = self.input.split_to(p);
                    let rest = std::mem::take(&mut self.input);
                    self.carry.extend_from_slice(&rest);
                    return self.data(data);
                }
                Match::No => from = p + 1,
            }
        }
        // Hold back a tail that could be the start of a delimiter split across chunks.
        let keep = partial_suffix(&self.input, &self.delim);
        let data = self.input.split_to(self.input.len() - keep);
        let rest = std::mem::take(&mut self.input);
        self.carry.extend_from_slice(&rest);
        self.data(data)
    }

    fn data(&mut self, data: Bytes) -> Option<Event> {
        if data.is_empty() {
            return None;
        }
        self.body_start = false;
        Some(Event::Data(data))
    }
}

/// Go's `matchAfterPrefix`: `pat` followed by `--`, space, tab, CR or LF is a delimiter.
fn match_at(buf: &[u8], pat: &[u8], eof: bool) -> Match {
    let n = pat.len();
    if buf.len() < n {
        return if pat.starts_with(buf) && !eof {
            Match::NeedMore
        } else {
            Match::No
        };
    }
    if &buf[..n] != pat {
        return Match::No;
    }
    match buf.get(n) {
        // At the end of input the line check that follows reports the error.
        None => {
            if eof {
                Match::Yes
            } else {
                Match::NeedMore
            }
        }
        Some(b' ' | b'\t' | b'\r' | b'\n') => Match::Yes,
        Some(b'-') => match buf.get(n + 1) {
            Some(b'-') => Match::Yes,
            Some(_) => Match::No,
            None if eof => Match::No,
            None => Match::NeedMore,
        },
        Some(_) => Match::No,
    }
}

/// Length of the longest proper suffix of `buf` that is a prefix of `pat`.
fn partial_suffix(buf: &[u8], pat: &[u8]) -> usize {
    let start = buf.len().saturating_sub(pat.len() - 1);
    let mut i = start;
    while let Some(off) = memchr::memchr(pat[0], &buf[i..]) {
        let q = i + off;
        if pat.starts_with(&buf[q..]) {
            return buf.len() - q;
        }
        i = q + 1;
    }
    0
}

/// `--` then optional spaces and tabs then the newline or nothing (end of input).
fn is_final(rest: &[u8], nl: &[u8]) -> bool {
    match rest.strip_prefix(b"--") {
        Some(after) => {
            let after = skip_lwsp(after);
            after.is_empty() || after == nl
        }
        None => false,
    }
}

fn skip_lwsp(b: &[u8]) -> &[u8] {
    let n = b.iter().take_while(|c| matches!(c, b' ' | b'\t')).count();
    &b[n..]
}

fn trim_lwsp(b: &[u8]) -> &[u8] {
    let b = skip_lwsp(b);
    let n = b
        .iter()
        .rev()
        .take_while(|c| matches!(c, b' ' | b'\t'))
        .count();
    &b[..b.len() - n]
}

fn strip_eol(line: &[u8]) -> &[u8] {
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    line.strip_suffix(b"\r").unwrap_or(line)
}

#[cfg(test)]
mod tests;
