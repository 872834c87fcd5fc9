//! Talking to the backend for requests unpart forwards itself (stream and spool mode):
//! connecting with the rewritten head, writing the body, and relaying the answer.
//!
//! pingora's proxy writes the upstream head before a request filter could read the body, so
//! these requests go through pingora's `Connector` with a pool of their own.

use std::time::{Duration, Instant};

use bytes::Bytes;
use pingora::connectors::http::Connector;
use pingora::protocols::http::client::HttpSession;
use pingora::proxy::Session;
use pingora::upstreams::peer::HttpPeer;
use pingora::{Error, ErrorType};

use crate::config::Settings;
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

/// Why a request stopped early.
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

/// One upstream request in progress. Dropping it drops the connection, so a backend never
/// sees a body that was cut short end cleanly.
pub struct Upstream {
    http: HttpSession,
    peer: HttpPeer,
    /// TCP_CORK is set on the socket (see `cork`).
    corked: bool,
    /// The socket takes TCP_CORK (a Unix socket does not).
    can_cork: bool,
}

impl Upstream {
    /// Holds what is written next until `uncork`.
    fn cork(&mut self) {
        if self.can_cork && !self.corked {
            self.corked = cork(&self.http, true);
        }
    }

    /// Lets what was written so far leave now. Called before waiting for anything (the
    /// client's next bytes, the backend's answer), so nothing is ever held back while unpart
    /// waits; a no-op once done.
    pub fn uncork(&mut self) {
        if self.corked {
            self.corked = false;
            cork(&self.http, false);
        }
    }
}

/// Body writes this large are many full segments already: corking them would only add two
/// `setsockopt` calls per write (1.4 % of unpart's CPU with 64 uploads streaming at once).
const CORK_BELOW: usize = 64 * 1024;

/// pingora flushes after the request head, after every body chunk and after the last chunk:
/// three sends, and on loopback each one runs the whole TCP transmit path and wakes the
/// backend. For a small form, which is all in hand at once, that was most of unpart's CPU
/// per request. With TCP_CORK the three writes go out as one segment when uncorked (and the
/// kernel sends anyway after 200 ms). Best effort: any failure only costs the coalescing.
fn cork(http: &HttpSession, on: bool) -> bool {
    let Some(stream) = http.stream() else {
        return false;
    };
    let fd = stream.id();
    let v: libc::c_int = on.into();
    // SAFETY: setsockopt on the upstream socket's descriptor with a correctly sized int;
    // a Unix socket or an old kernel just returns an error.
    let r = unsafe {
        libc::setsockopt(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_CORK,
            (&v as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    r == 0
}

#[derive(Clone, Copy)]
pub struct Backend<'a> {
    pub settings: &'a Settings,
    pub connector: &'a Connector,
}

impl Backend<'_> {
    /// Connects and writes the upstream head. A pooled connection that fails at once was
    /// probably closed by the backend while idle: try a fresh one, once.
    pub async fn connect(
        &self,
        session: &Session,
        form: &FormHeaders,
        content_type: Option<&[u8]>,
        framing: Framing,
        stats: &mut Stats,
    ) -> Result<Upstream, Failure> {
        let head = rewrite::upstream_head(session.req_header(), form, content_type, framing)
            .map_err(|e| Reject::upstream_failed(format!("building the request head: {e}")))?;
        for attempt in 0..2 {
            let (mut http, reused, peer) = self.session().await?;
            // pingora's h1 connector does not apply the peer's read/write timeouts itself.
            let t = &self.settings.timeouts;
            http.set_read_timeout(Some(t.upstream_read.0));
            http.set_write_timeout(Some(t.upstream_write.0));
            let corked = cork(&http, true);
            match http.write_request_header(Box::new(head.clone())).await {
                Ok(()) => {
                    stats.upstream_sent = Some(Instant::now());
                    return Ok(Upstream {
                        http,
                        peer,
                        corked,
                        can_cork: corked,
                    });
                }
                Err(e) if reused && attempt == 0 => {
                    log::debug!("pooled upstream connection failed, reconnecting: {e}");
                }
                Err(e) => return Err(Reject::upstream_failed(e.etype().as_str()).into()),
            }
        }
        Err(Reject::upstream_failed("no connection").into())
    }

    /// A connection to the backend, pooled or new; a host name's address that refuses it gives
    /// way to the name's next address (`upstream::try_next`).
    async fn session(&self) -> Result<(HttpSession, bool, HttpPeer), Failure> {
        let mut tries = 0;
        loop {
            let peer = upstream::peer(self.settings)
                .await
                .map_err(Reject::upstream_unreachable)?;
            match self.connector.get_http_session(&peer).await {
                Ok((http, reused)) => return Ok((http, reused, peer)),
                Err(e) => {
                    tries += 1;
                    if upstream::try_next(self.settings, &peer, tries) {
                        continue;
                    }
                    return Err(Reject::upstream_unreachable(e.etype().as_str()).into());
                }
            }
        }
    }

    /// Writes body bytes. On failure the connection is gone and the client gets the
    /// backend's early answer if there is one.
    pub async fn write(
        &self,
        session: &mut Session,
        mut up: Upstream,
        data: Bytes,
        stats: &mut Stats,
    ) -> Result<Upstream, Failure> {
        if data.len() < CORK_BELOW {
            up.cork();
        }
        match up.http.write_request_body(data, false).await {
            Ok(_) => Ok(up),
            Err(e) => Err(self.write_failed(session, up, e, stats).await),
        }
    }

    /// Ends the body (the last chunk, or a check that every announced byte went out), then
    /// relays the response.
    pub async fn finish(
        &self,
        session: &mut Session,
        mut up: Upstream,
        stats: &mut Stats,
    ) -> Result<(), Failure> {
        let finished = up.http.finish_request_body().await;
        up.uncork();
        if let Err(e) = finished {
            return Err(self.write_failed(session, up, e, stats).await);
        }
        self.relay(session, up, true, stats).await
    }

    /// The backend stopped taking the body. If it answered first (413 from a backend limit,
    /// say), the client gets that answer; otherwise 502.
    async fn write_failed(
        &self,
        session: &mut Session,
        mut up: Upstream,
        e: Box<Error>,
        stats: &mut Stats,
    ) -> Failure {
        log::debug!("upstream write failed: {e}");
        up.uncork();
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
            return match self.relay(session, up, false, stats).await {
                Ok(()) => Failure::AnsweredEarly(status),
                Err(f) => f,
            };
        }
        Reject::upstream_failed(e.etype().as_str()).into()
    }

    /// Relays the backend's response. With `reuse`, the upstream connection goes back to the
    /// pool as soon as its response is complete, before the client has the last bytes, so
    /// the client's next request finds it there.
    async fn relay(
        &self,
        session: &mut Session,
        mut up: Upstream,
        reuse: bool,
        stats: &mut Stats,
    ) -> Result<(), Failure> {
        up.uncork();
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
        stats.upstream_time = stats.upstream_sent.map(|t| t.elapsed());
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
                    stats.bytes_out += b.len() as u64;
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
