//! One multipart upload, as one pull loop: the client's body through the multipart parser into
//! a sink for the file part, then the backend's answer back.
//!
//! The sink is chosen when the file part starts:
//! - `Chunked` (stream mode): the upstream head goes out at once, the file streams chunked.
//! - `Length` (stream mode, `framing: length`): the same, with a Content-Length computed from
//!   the client's, and the file's last byte held back until the parser has seen the body end
//!   exactly there; pingora's fixed-length writer would otherwise complete a wrong request.
//! - `Spool` (spool mode, or the length fallback): the file goes to a spool file (a file
//!   smaller than one disk block stays in memory); the backend is contacted only after the
//!   body ended cleanly, with every field and an exact length.
//!
//! Memory per request is bounded whatever the file's size: the parser's small buffers, the
//! form headers (bounded by limits) and, when spooling, two disk blocks.
//!
//! The backend never sees a truncated or rejected upload end cleanly: every failure after the
//! head went out drops the upstream connection before the body's end.

use std::sync::Arc;

use bytes::Bytes;
use pingora::proxy::Session;

use crate::answer;
use crate::config::{FramingMode, LengthFallback, Limits, Mode, Route, Settings};
use crate::forward::{Backend, Failure, Stats, Upstream};
use crate::multipart::{classify, Event, Parser, ParserLimits, PartKind};
use crate::reader::{self, ClientReader};
use crate::reject::Reject;
use crate::rewrite::{self, FormHeaders, Framing};
use crate::spool::{SpoolDir, SpoolError, SpoolWriter};

/// Where the parser is, from the form's point of view.
enum Current {
    Between,
    Field { name: Vec<u8>, value: Vec<u8> },
    Skip,
    File,
}

/// Where the file part's bytes go.
enum Sink {
    /// No file part yet.
    None,
    Chunked(Upstream),
    Length(Held),
    Spool(SpoolWriter),
}

/// A file forwarded with a computed Content-Length.
struct Held {
    /// `None` for an empty file: with nothing to hold back, the head waits for the body's end.
    up: Option<Upstream>,
    expected: u64,
    /// The file's last byte, sent only once the body is verified.
    last: Option<Bytes>,
}

pub struct Upload<'a> {
    backend: Backend<'a>,
    route: &'a Route,
    limits: Limits,
    spool: Option<&'a Arc<SpoolDir>>,
    boundary_len: u64,
    parser: Parser,
    form: FormHeaders,
    fields: u64,
    /// The file part's Content-Type, once it has started.
    file_type: Option<Vec<u8>>,
    current: Current,
    sink: Sink,
    reader: ClientReader,
    /// The client's body has been read to its end.
    pub client_done: bool,
    pub stats: Stats,
}

impl<'a> Upload<'a> {
    pub fn new(
        settings: &'a Settings,
        connector: &'a pingora::connectors::http::Connector,
        spool: Option<&'a Arc<SpoolDir>>,
        route: &'a Route,
        boundary: &[u8],
    ) -> Upload<'a> {
        let limits = route.limits;
        let parser = Parser::new(
            boundary,
            ParserLimits {
                part_header_bytes: limits.part_header_bytes as usize,
                parts: limits.parts as usize,
                ..ParserLimits::default()
            },
        );
        Upload {
            backend: Backend {
                settings,
                connector,
            },
            route,
            limits,
            spool,
            boundary_len: boundary.len() as u64,
            parser,
            form: FormHeaders::default(),
            fields: 0,
            file_type: None,
            current: Current::Between,
            sink: Sink::None,
            reader: ClientReader::new(&settings.timeouts),
            client_done: false,
            stats: Stats::default(),
        }
    }

    /// Runs the request to its end: the backend's response relayed, or a failure. On failure
    /// the upstream connection and any spool file are already gone.
    pub async fn run(&mut self, session: &mut Session) -> Result<(), Failure> {
        let r = self.run_inner(session).await;
        if r.is_err() {
            self.sink = Sink::None;
        }
        r
    }

    async fn run_inner(&mut self, session: &mut Session) -> Result<(), Failure> {
        // Before anything touches pingora's body reader, `100 Continue` included.
        self.reader.prepare(session);
        if self.route.mode == Mode::Stream
            && self.route.framing == FramingMode::Length
            && self.route.length_fallback == LengthFallback::Reject
            && client_length(session).is_none()
        {
            return Err(Reject::length_required().into());
        }
        if session
            .req_header()
            .headers
            .get(http::header::EXPECT)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"))
        {
            session
                .write_continue_response()
                .await
                .map_err(|e| Failure::Client(e.to_string()))?;
        }
        while !self.client_done {
            let next = {
                let mut read = std::pin::pin!(self.reader.read(session));
                match reader::poll_now(read.as_mut()) {
                    Some(r) => r,
                    None => {
                        // Nothing in hand: what is corked upstream leaves before unpart
                        // waits. A small form, all in hand, goes out as one segment.
                        uncork(&mut self.sink);
                        read.await
                    }
                }
            };
            match next? {
                Some(b) => {
                    self.stats.bytes_in += b.len() as u64;
                    self.parser.push(b);
                }
                None => {
                    self.client_done = true;
                    self.parser.finish();
                }
            }
            while let Some(ev) = self.parser.next_event().map_err(Reject::from)? {
                self.on_event(session, ev).await?;
            }
            self.check_outside_file()?;
        }
        // The closing boundary was seen (the parser fails otherwise) and the client's body
        // ended cleanly: only now may the backend see a complete request.
        match std::mem::replace(&mut self.sink, Sink::None) {
            Sink::None => {
                let up = self.connect(session, Framing::Length(0)).await?;
                self.backend.finish(session, up, &mut self.stats).await?;
            }
            Sink::Chunked(up) => self.backend.finish(session, up, &mut self.stats).await?,
            Sink::Length(held) => self.finish_held(session, held).await?,
            Sink::Spool(w) => self.send_spooled(session, w).await?,
        }
        self.stats.outcome = "ok";
        Ok(())
    }

    /// Answers with a rejection, draining through this upload's body reader.
    pub async fn respond(&mut self, session: &mut Session, r: &Reject) {
        answer::respond_with(session, r, self.client_done, Some(self.reader.body())).await;
    }

    async fn on_event(&mut self, session: &mut Session, ev: Event) -> Result<(), Failure> {
        match ev {
            Event::Part(head) => match classify(&head) {
                PartKind::Ignored => self.current = Current::Skip,
                PartKind::Field { name } => {
                    if self.file_type.is_some() && !matches!(self.sink, Sink::Spool(_)) {
                        return Err(Reject::late_field(&name).into());
                    }
                    self.fields += 1;
                    if self.fields > self.limits.fields {
                        return Err(Reject::limit(
                            "fields",
                            self.limits.fields,
                            "the number of fields",
                        )
                        .into());
                    }
                    self.current = Current::Field {
                        name,
                        value: Vec::new(),
                    };
                }
                PartKind::File {
                    field,
                    filename,
                    content_type,
                } => {
                    if self.file_type.is_some() {
                        return Err(Reject::extra_file(&field).into());
                    }
                    let ct = content_type.unwrap_or_else(|| b"application/octet-stream".to_vec());
                    if !rewrite::valid_content_type(&ct) {
                        return Err(Reject::bad_file_content_type().into());
                    }
                    let conf = &self.backend.settings.headers;
                    self.form
                        .file(conf, &field, &filename, self.limits.header_bytes as usize)
                        .map_err(|_| self.headers_too_large())?;
                    self.file_type = Some(ct);
                    self.sink = self.open_sink(session).await?;
                    self.current = Current::File;
                }
            },
            Event::Data(d) => match &mut self.current {
                Current::Field { value, .. } => {
                    if (value.len() + d.len()) as u64 > self.limits.field_value_bytes {
                        return Err(Reject::limit(
                            "field_value_bytes",
                            self.limits.field_value_bytes,
                            "a field value",
                        )
                        .into());
                    }
                    value.extend_from_slice(&d);
                }
                Current::File => self.file_data(session, d).await?,
                Current::Skip | Current::Between => {}
            },
            Event::PartEnd => {
                if let Current::Field { name, value } =
                    std::mem::replace(&mut self.current, Current::Between)
                {
                    let conf = &self.backend.settings.headers;
                    self.form
                        .field(conf, &name, &value, self.limits.header_bytes as usize)
                        .map_err(|_| self.headers_too_large())?;
                }
            }
            Event::End => {}
        }
        // After the event, so the file data it carried is already counted.
        Ok(self.check_outside_file()?)
    }

    /// Everything that is not file data (preamble, fields, part headers, skipped parts,
    /// epilogue) is bounded, so a client cannot keep unpart parsing forever without ever
    /// sending a file. In stream mode all of it comes before the file.
    fn check_outside_file(&self) -> Result<(), Reject> {
        let max = self.limits.bytes_before_file;
        if self.parser.position().saturating_sub(self.stats.file_bytes) > max {
            return Err(Reject::limit(
                "bytes_before_file",
                max,
                "the body outside the file",
            ));
        }
        Ok(())
    }

    fn headers_too_large(&self) -> Reject {
        Reject::limit(
            "header_bytes",
            self.limits.header_bytes,
            "the generated headers",
        )
    }

    async fn connect(&mut self, session: &Session, framing: Framing) -> Result<Upstream, Failure> {
        let ct = self.file_type.as_deref();
        let stats = &mut self.stats;
        self.backend
            .connect(session, &self.form, ct, framing, stats)
            .await
    }

    /// The file part has started: decide where its bytes go.
    async fn open_sink(&mut self, session: &Session) -> Result<Sink, Failure> {
        let length = match (self.route.mode, self.route.framing) {
            (Mode::Spool, _) => return self.spool_sink(),
            (_, FramingMode::Chunked) => None,
            (_, FramingMode::Length) => match self.expected_file_len(session) {
                Some(n) => Some(n),
                None => match self.route.length_fallback {
                    LengthFallback::Chunked => None,
                    LengthFallback::Spool => return self.spool_sink(),
                    LengthFallback::Reject => return Err(Reject::length_required().into()),
                },
            },
        };
        Ok(match length {
            None => Sink::Chunked(self.connect(session, Framing::Chunked).await?),
            Some(0) => Sink::Length(Held {
                up: None,
                expected: 0,
                last: None,
            }),
            Some(n) => Sink::Length(Held {
                up: Some(self.connect(session, Framing::Length(n)).await?),
                expected: n,
                last: None,
            }),
        })
    }

    fn spool_sink(&self) -> Result<Sink, Failure> {
        let Some(dir) = self.spool else {
            return Err(Reject::spool_failed("no spool directory is configured").into());
        };
        Ok(Sink::Spool(dir.writer()))
    }

    /// The file's length if the body ends the way every common client ends it: the file, then
    /// `\r\n--boundary--\r\n` (`\n--boundary--\n` in a body whose boundary lines end with a
    /// bare LF). Called when the file's data is about to start.
    fn expected_file_len(&self, session: &Session) -> Option<u64> {
        let total = client_length(session)?;
        let nl = self.parser.newline().len() as u64;
        let trailer = nl + 2 + self.boundary_len + 2 + nl;
        total
            .checked_sub(self.parser.position())?
            .checked_sub(trailer)
    }

    async fn file_data(&mut self, session: &mut Session, d: Bytes) -> Result<(), Failure> {
        if d.is_empty() {
            return Ok(());
        }
        self.stats.file_bytes += d.len() as u64;
        let max = self.limits.file_bytes;
        if max > 0 && self.stats.file_bytes > max {
            return Err(Reject::limit("file_bytes", max, "the file").into());
        }
        match &mut self.sink {
            Sink::None => Ok(()),
            Sink::Spool(w) => w.append(&d).await.map_err(|e| spool_reject(e).into()),
            Sink::Chunked(_) => {
                let Sink::Chunked(up) = std::mem::replace(&mut self.sink, Sink::None) else {
                    unreachable!("matched above")
                };
                let up = self.backend.write(session, up, d, &mut self.stats).await?;
                self.sink = Sink::Chunked(up);
                Ok(())
            }
            Sink::Length(held) => {
                let total = self.stats.file_bytes;
                if total > held.expected {
                    return Err(Reject::length_mismatch().into());
                }
                let mut now = d;
                if total == held.expected {
                    held.last = Some(now.split_off(now.len() - 1));
                }
                if now.is_empty() {
                    return Ok(());
                }
                let Some(up) = held.up.take() else {
                    return Ok(());
                };
                let up = self
                    .backend
                    .write(session, up, now, &mut self.stats)
                    .await?;
                if let Sink::Length(held) = &mut self.sink {
                    held.up = Some(up);
                }
                Ok(())
            }
        }
    }

    /// The body ended cleanly; the file must have been exactly the announced length.
    async fn finish_held(&mut self, session: &mut Session, held: Held) -> Result<(), Failure> {
        if self.stats.file_bytes != held.expected {
            return Err(Reject::length_mismatch().into());
        }
        let mut up = match held.up {
            Some(up) => up,
            None => self.connect(session, Framing::Length(0)).await?,
        };
        if let Some(last) = held.last {
            up = self
                .backend
                .write(session, up, last, &mut self.stats)
                .await?;
        }
        self.backend.finish(session, up, &mut self.stats).await
    }

    /// The body ended cleanly: send every field, the file's size and digests, and the file.
    async fn send_spooled(&mut self, session: &mut Session, w: SpoolWriter) -> Result<(), Failure> {
        let file = w.finish().await.map_err(spool_reject)?;
        let settings = self.backend.settings;
        let max = self.limits.header_bytes as usize;
        self.form
            .file_facts(&settings.headers, file.len, &file.digests, max)
            .map_err(|_| self.headers_too_large())?;
        let mut up = self.connect(session, Framing::Length(file.len)).await?;
        let mut blocks = file.into_blocks();
        loop {
            let block = blocks
                .next()
                .await
                .map_err(|e| spool_reject(SpoolError::Io(e)))?;
            let Some(block) = block else { break };
            up = self
                .backend
                .write(session, up, block, &mut self.stats)
                .await?;
        }
        // The file's space is freed now, while the backend works on its answer.
        drop(blocks);
        self.backend.finish(session, up, &mut self.stats).await
    }
}

/// The client's Content-Length, when its body is framed by one.
fn client_length(session: &Session) -> Option<u64> {
    crate::body::content_length(session.req_header())
}

fn spool_reject(e: SpoolError) -> Reject {
    match e {
        SpoolError::Cap(max) => Reject::spool_cap(max),
        SpoolError::Io(e) => {
            let full = matches!(
                e.raw_os_error(),
                Some(libc::ENOSPC) | Some(libc::EDQUOT) | Some(libc::EFBIG)
            );
            log::error!("spool: {e}");
            if full {
                Reject::spool_full(&e)
            } else {
                Reject::spool_failed(&e)
            }
        }
    }
}

/// Lets corked upstream writes leave: called before unpart waits for the client.
fn uncork(sink: &mut Sink) {
    match sink {
        Sink::Chunked(up) => up.uncork(),
        Sink::Length(Held { up: Some(up), .. }) => up.uncork(),
        _ => {}
    }
}
