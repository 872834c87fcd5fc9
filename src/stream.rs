//! Stream mode: one pull loop from the client's body through the multipart parser to the
//! backend. Fields before the file become headers; when the file part starts, the upstream
//! request head goes out and the file's bytes follow as a chunked body, one client chunk at a
//! time, so memory does not depend on the file's size.
//!
//! The backend never sees a truncated or rejected upload end cleanly: every failure after the
//! head went out drops the upstream connection before the terminating chunk.

use std::time::{Duration, Instant};

use bytes::Bytes;
use pingora::connectors::http::Connector;
use pingora::http::ResponseHeader;
use pingora::protocols::http::client::HttpSession;
use pingora::proxy::Session;
use pingora::upstreams::peer::HttpPeer;
use pingora::{Error, ErrorType};

use crate::config::{Limits, Settings};
use crate::multipart::{classify, Event, Parser, ParserLimits, PartKind};
use crate::reject::Reject;
use crate::rewrite::{self, FormHeaders, Framing};
use crate::upstream;

/// What happened to one request, for the access log.
#[derive(Debug, Default)]
pub struct Stats {
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub file_bytes: u64,
    pub outcome: &'static str,
    /// When the request head went upstream, and how long the backend then took to answer.
    pub upstream_sent: Option<Instant>,
    pub upstream_time: Option<Duration>,
}

/// Why the loop stopped early.
#[derive(Debug)]
pub enum Failure {
    /// Answer the client with this.
    Reject(Reject),
    /// The client went away or broke its own framing; nobody to answer.
    Client(String),
    /// The response had started when things broke; nothing more can be said.
    AfterResponse(String),
    /// The backend answered before the body ended and stopped reading; its answer was relayed.
    AnsweredEarly(u16),
}

impl From<Reject> for Failure {
    fn from(r: Reject) -> Failure {
        Failure::Reject(r)
    }
}

/// Where the parser is, from the form's point of view.
enum Current {
    Between,
    Field { name: Vec<u8>, value: Vec<u8> },
    Skip,
    File,
}

struct Upstream {
    http: HttpSession,
    peer: HttpPeer,
}

pub struct Upload<'a> {
    settings: &'a Settings,
    connector: &'a Connector,
    limits: Limits,
    parser: Parser,
    form: FormHeaders,
    fields: u64,
    file_seen: bool,
    current: Current,
    up: Option<Upstream>,
    /// The client's body has been read to its end.
    pub client_done: bool,
    pub stats: Stats,
}

impl<'a> Upload<'a> {
    pub fn new(
        settings: &'a Settings,
        connector: &'a Connector,
        limits: Limits,
        boundary: &[u8],
    ) -> Upload<'a> {
        let parser = Parser::new(
            boundary,
            ParserLimits {
                part_header_bytes: limits.part_header_bytes as usize,
                parts: limits.parts as usize,
                ..ParserLimits::default()
            },
        );
        Upload {
            settings,
            connector,
            limits,
            parser,
            form: FormHeaders::default(),
            fields: 0,
            file_seen: false,
            current: Current::Between,
            up: None,
            client_done: false,
            stats: Stats::default(),
        }
    }

    /// Runs the request to its end: the backend's response relayed, or a failure. On failure
    /// the upstream connection is already gone, so the backend has seen the body break off.
    pub async fn run(&mut self, session: &mut Session) -> Result<(), Failure> {
        let r = self.run_inner(session).await;
        if r.is_err() {
            self.up = None;
        }
        r
    }

    async fn run_inner(&mut self, session: &mut Session) -> Result<(), Failure> {
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
            let chunk = self.read_client(session).await?;
            match chunk {
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
            if !self.file_seen {
                self.check_before_file()?;
            }
        }
        // The closing boundary was seen (the parser fails otherwise) and the client's body
        // ended cleanly: only now may the backend see a complete request.
        let up = match self.up.take() {
            Some(mut up) => {
                if let Err(e) = up.http.finish_request_body().await {
                    return Err(self.upstream_write_failed(session, up, e).await);
                }
                up
            }
            None => self.connect(session, None, Framing::Length(0)).await?,
        };
        self.relay_response(session, up, true).await?;
        self.stats.outcome = "ok";
        Ok(())
    }

    /// The idle timeout is pingora's own read timeout, set for every request in
    /// `early_request_filter`.
    async fn read_client(&mut self, session: &mut Session) -> Result<Option<Bytes>, Failure> {
        match session.read_request_body().await {
            Ok(chunk) => Ok(chunk),
            Err(e) if e.etype() == &ErrorType::ReadTimedout => {
                let idle = self.settings.timeouts.client_body_idle.0;
                Err(Reject::client_timeout(idle.as_secs_f64()).into())
            }
            Err(e) => Err(Failure::Client(e.to_string())),
        }
    }

    async fn on_event(&mut self, session: &mut Session, ev: Event) -> Result<(), Failure> {
        if !self.file_seen {
            self.check_before_file()?;
        }
        match ev {
            Event::Part(head) => match classify(&head) {
                PartKind::Ignored => self.current = Current::Skip,
                PartKind::Field { name } => {
                    if self.file_seen {
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
                    if self.file_seen {
                        return Err(Reject::extra_file(&field).into());
                    }
                    self.file_seen = true;
                    let ct = content_type.unwrap_or_else(|| b"application/octet-stream".to_vec());
                    if !rewrite::valid_content_type(&ct) {
                        return Err(Reject::bad_file_content_type().into());
                    }
                    let conf = &self.settings.headers;
                    self.form
                        .file(conf, &field, &filename, self.limits.header_bytes as usize)
                        .map_err(|_| self.headers_too_large())?;
                    let up = self.connect(session, Some(&ct), Framing::Chunked).await?;
                    self.up = Some(up);
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
                Current::File => self.send_file_data(session, d).await?,
                Current::Skip | Current::Between => {}
            },
            Event::PartEnd => {
                if let Current::Field { name, value } =
                    std::mem::replace(&mut self.current, Current::Between)
                {
                    let conf = &self.settings.headers;
                    self.form
                        .field(conf, &name, &value, self.limits.header_bytes as usize)
                        .map_err(|_| self.headers_too_large())?;
                }
            }
            Event::End => {}
        }
        Ok(())
    }

    /// Everything before the file's data (preamble, fields, part headers) is bounded, so a
    /// client cannot keep unpart parsing forever without ever starting the upload.
    fn check_before_file(&self) -> Result<(), Reject> {
        let max = self.limits.bytes_before_file;
        if self.parser.position() > max {
            return Err(Reject::limit(
                "bytes_before_file",
                max,
                "the body before the file",
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

    async fn send_file_data(&mut self, session: &mut Session, d: Bytes) -> Result<(), Failure> {
        self.stats.file_bytes += d.len() as u64;
        let max = self.limits.file_bytes;
        if max > 0 && self.stats.file_bytes > max {
            return Err(Reject::limit("file_bytes", max, "the file").into());
        }
        let Some(up) = self.up.as_mut() else {
            return Ok(());
        };
        if let Err(e) = up.http.write_request_body(d, false).await {
            let up = self.up.take().expect("checked above");
            return Err(self.upstream_write_failed(session, up, e).await);
        }
        Ok(())
    }

    /// Connects and writes the upstream head. A pooled connection that fails at once was
    /// probably closed by the backend while idle: try a fresh one, once.
    async fn connect(
        &mut self,
        session: &mut Session,
        content_type: Option<&[u8]>,
        framing: Framing,
    ) -> Result<Upstream, Failure> {
        let peer = upstream::peer(self.settings)
            .await
            .map_err(Reject::upstream_unreachable)?;
        let head = rewrite::upstream_head(session.req_header(), &self.form, content_type, framing)
            .map_err(|e| Reject::upstream_failed(format!("building the request head: {e}")))?;
        for attempt in 0..2 {
            let (mut http, reused) = self
                .connector
                .get_http_session(&peer)
                .await
                .map_err(|e| Reject::upstream_unreachable(e.etype().as_str()))?;
            // pingora's h1 connector does not apply the peer's read/write timeouts itself.
            let t = &self.settings.timeouts;
            http.set_read_timeout(Some(t.upstream_read.0));
            http.set_write_timeout(Some(t.upstream_write.0));
            match http.write_request_header(Box::new(head.clone())).await {
                Ok(()) => {
                    self.stats.upstream_sent = Some(Instant::now());
                    return Ok(Upstream { http, peer });
                }
                Err(e) if reused && attempt == 0 => {
                    log::debug!("pooled upstream connection failed, reconnecting: {e}");
                }
                Err(e) => return Err(Reject::upstream_failed(e.etype().as_str()).into()),
            }
        }
        Err(Reject::upstream_failed("no connection").into())
    }

    /// The backend stopped taking the body. If it answered first (413 from a backend limit,
    /// say), the client gets that answer; otherwise 502.
    async fn upstream_write_failed(
        &mut self,
        session: &mut Session,
        mut up: Upstream,
        e: Box<Error>,
    ) -> Failure {
        log::debug!("upstream write failed: {e}");
        let early =
            tokio::time::timeout(Duration::from_secs(1), up.http.read_response_header()).await;
        if matches!(early, Ok(Ok(())))
            && up
                .http
                .response_header()
                .is_some_and(|h| h.status.as_u16() >= 200)
        {
            session.set_keepalive(None);
            let status = up.http.response_header().map_or(0, |h| h.status.as_u16());
            return match self.relay_response(session, up, false).await {
                Ok(()) => Failure::AnsweredEarly(status),
                Err(f) => f,
            };
        }
        Reject::upstream_failed(e.etype().as_str()).into()
    }

    /// Relays the backend's response. With `reuse`, the upstream connection goes back to the
    /// pool as soon as its response is complete, before the client has the last bytes, so
    /// the client's next request finds it there.
    async fn relay_response(
        &mut self,
        session: &mut Session,
        up: Upstream,
        reuse: bool,
    ) -> Result<(), Failure> {
        let mut up = Some(up);
        let head = loop {
            let http = &mut up.as_mut().expect("held until released").http;
            if let Err(e) = http.read_response_header().await {
                return Err(match e.etype() {
                    ErrorType::ReadTimedout => Reject::upstream_timeout(e.etype().as_str()).into(),
                    _ => Reject::upstream_failed(e.etype().as_str()).into(),
                });
            }
            match http.response_header() {
                Some(h) if h.status.is_informational() && h.status.as_u16() != 101 => continue,
                Some(h) => break h.clone(),
                None => return Err(Reject::upstream_failed("no response header").into()),
            }
        };
        let status = head.status.as_u16();
        self.stats.upstream_time = self.stats.upstream_sent.map(|t| t.elapsed());
        if reuse {
            self.release_if_done(&mut up).await;
        }
        session
            .write_response_header(Box::new(head), false)
            .await
            .map_err(|e| Failure::Client(e.to_string()))?;
        while let Some(u) = up.as_mut() {
            match u.http.read_response_body().await {
                Ok(Some(b)) => {
                    self.stats.bytes_out += b.len() as u64;
                    if reuse {
                        self.release_if_done(&mut up).await;
                    }
                    session
                        .write_response_body(Some(b), false)
                        .await
                        .map_err(|e| Failure::Client(e.to_string()))?;
                }
                Ok(None) => {
                    if reuse {
                        self.release_if_done(&mut up).await;
                    }
                    break;
                }
                Err(e) => {
                    return Err(Failure::AfterResponse(format!(
                        "backend response body failed after status {status}: {e}"
                    )))
                }
            }
        }
        session
            .write_response_body(None, true)
            .await
            .map_err(|e| Failure::Client(e.to_string()))?;
        Ok(())
    }

    async fn release_if_done(&self, up: &mut Option<Upstream>) {
        if !up.as_mut().is_some_and(|u| u.http.response_done()) {
            return;
        }
        if let Some(u) = up.take() {
            let idle = self.settings.timeouts.upstream_idle.0;
            self.connector
                .release_http_session(u.http, &u.peer, Some(idle))
                .await;
        }
    }
}

/// Answers with a rejection. When the client's body was not read to its end the connection
/// cannot be reused; it is drained for a moment first, so the client reads the answer instead
/// of a reset (the kernel resets a socket closed with unread data).
pub async fn respond(session: &mut Session, r: &Reject, client_done: bool) {
    let body = r.body();
    let mut head = match ResponseHeader::build(r.status, Some(3)) {
        Ok(h) => h,
        Err(_) => return,
    };
    let _ = head.insert_header(http::header::CONTENT_TYPE, "application/json");
    let _ = head.insert_header(http::header::CONTENT_LENGTH, body.len().to_string());
    if !client_done {
        session.set_keepalive(None);
        let _ = head.insert_header(http::header::CONNECTION, "close");
    }
    if session
        .write_response_header(Box::new(head), false)
        .await
        .is_err()
    {
        return;
    }
    if session.write_response_body(Some(body), true).await.is_err() {
        return;
    }
    if !client_done {
        linger(session).await;
    }
}

async fn linger(session: &mut Session) {
    const MAX_BYTES: usize = 64 << 20;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
    let mut drained = 0;
    while drained < MAX_BYTES {
        match tokio::time::timeout_at(deadline, session.read_request_body()).await {
            Ok(Ok(Some(b))) => drained += b.len(),
            _ => break,
        }
    }
}
