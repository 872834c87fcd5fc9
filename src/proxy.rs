//! The pingora proxy: routing, the reserved-header rule for every request, stream mode for
//! multipart requests on stream routes, plain proxying for everything else, and the access log.

use std::sync::Arc;
use std::time::Instant;

use async_trait::async_trait;
use pingora::connectors::http::Connector;
use pingora::proxy::{ProxyHttp, Session};
use pingora::upstreams::peer::HttpPeer;
use pingora::{Error, ErrorType, Result};

use crate::admin::tasks;
use crate::answer;
use crate::config::{Mode, Settings};
use crate::drain::InFlight;
use crate::forward::{Failure, Stats};
use crate::head;
use crate::metrics;
use crate::multipart;
use crate::rewrite;
use crate::spool::SpoolDir;
use crate::upload::Upload;

pub struct Unpart {
    settings: Arc<Settings>,
    /// Stream and spool mode forward by themselves (pingora's proxy writes the upstream head
    /// before the body can be read), so they keep their own connection pool.
    connector: Connector,
    /// Present when a route can spool.
    spool: Option<Arc<SpoolDir>>,
}

impl Unpart {
    pub fn new(settings: Arc<Settings>, spool: Option<Arc<SpoolDir>>) -> Unpart {
        Unpart {
            settings,
            connector: Connector::new(None),
            spool,
        }
    }
}

/// Per-request state: what the access log and the metrics say.
pub struct Ctx {
    start: Instant,
    /// Counts this request until its context is dropped, for the shutdown drain.
    _in_flight: InFlight,
    /// Set when unpart answered the request itself (an upload or a rejection).
    handled: Option<Stats>,
    /// Proxied by pingora: when the head went upstream, and how long the backend took to answer.
    upstream_sent: Option<Instant>,
    upstream_time: Option<std::time::Duration>,
    /// Listed in `/debug/pprof/goroutine` until the request ends.
    _listed: Option<tasks::Request>,
    /// Proxied by pingora: connections to the backend that failed, one per address at most.
    connect_failures: usize,
}

#[async_trait]
impl ProxyHttp for Unpart {
    type CTX = Ctx;

    fn new_ctx(&self) -> Ctx {
        Ctx {
            start: Instant::now(),
            _in_flight: InFlight::start(),
            handled: None,
            upstream_sent: None,
            upstream_time: None,
            _listed: None,
            connect_failures: 0,
        }
    }

    async fn early_request_filter(&self, session: &mut Session, ctx: &mut Ctx) -> Result<()> {
        head::head_done(session);
        // On every request, multipart or not: a client must never forge the contract headers.
        let removed = rewrite::strip_reserved(session.req_header_mut(), &self.settings.headers);
        if removed > 0 {
            log::debug!("removed {removed} client-sent reserved header name(s)");
        }
        session.set_read_timeout(Some(self.settings.timeouts.client_body_idle.0));
        // After a request, pingora waits for the next one on a keep-alive connection with no
        // timeout at all; bound it (`Connection: close` and HTTP/1.0 clients stay closed).
        if session.as_downstream().get_keepalive().is_some() {
            let secs = self.settings.timeouts.client_keepalive.0.as_secs().max(1);
            session.as_downstream_mut().set_keepalive(Some(secs));
        }
        tasks::note_runtime("proxy");
        let req = session.req_header();
        ctx._listed = Some(tasks::Request::start(
            req.method.as_str(),
            &req.uri.to_string(),
        ));
        Ok(())
    }

    async fn request_filter(&self, session: &mut Session, ctx: &mut Ctx) -> Result<bool> {
        let req = session.req_header();
        let route = self.settings.route(&req.method, req.uri.path());
        if route.mode == Mode::Passthrough {
            return Ok(false);
        }
        let Some(ct) = req.headers.get(http::header::CONTENT_TYPE) else {
            return Ok(false);
        };
        let boundary = match multipart::form_boundary(ct.as_bytes()) {
            Ok(None) => return Ok(false),
            Ok(Some(b)) => b,
            Err(e) => {
                let r = e.into();
                log::warn!("{}: rejected: {}", session.request_summary(), describe(&r));
                metrics::rejected(r.error, r.limit);
                answer::respond(session, &r, false).await;
                ctx.handled = Some(Stats {
                    outcome: r.error,
                    ..Default::default()
                });
                return Ok(true);
            }
        };
        let mut upload = Upload::new(
            &self.settings,
            &self.connector,
            self.spool.as_ref(),
            route,
            &boundary,
        );
        let in_flight = metrics::InFlight::start();
        let result = upload.run(session).await;
        drop(in_flight);
        match result {
            Ok(()) => {}
            Err(Failure::Reject(r)) => {
                log::warn!("{}: rejected: {}", session.request_summary(), describe(&r));
                metrics::rejected(r.error, r.limit);
                upload.stats.outcome = r.error;
                upload.respond(session, &r).await;
            }
            Err(Failure::Client(why)) => {
                log::warn!("{}: client failed: {why}", session.request_summary());
                upload.stats.outcome = "client_aborted";
                session.set_keepalive(None);
            }
            Err(Failure::AnsweredEarly(status)) => {
                log::warn!(
                    "{}: the backend answered {status} before the body ended",
                    session.request_summary()
                );
                upload.stats.outcome = "upstream_answered_early";
                session.set_keepalive(None);
            }
            Err(Failure::AfterResponse(why)) => {
                log::warn!("{}: {why}", session.request_summary());
                upload.stats.outcome = "response_aborted";
                session.set_keepalive(None);
            }
        }
        ctx.handled = Some(upload.stats);
        Ok(true)
    }

    async fn upstream_peer(&self, _session: &mut Session, _ctx: &mut Ctx) -> Result<Box<HttpPeer>> {
        match crate::upstream::peer(&self.settings).await {
            Ok(p) => Ok(Box::new(p)),
            Err(e) => Error::e_explain(ErrorType::ConnectError, format!("upstream: {e}")),
        }
    }

    /// A host name's address that refuses the connection gives way to its next address, and
    /// pingora retries: each address once.
    fn fail_to_connect(
        &self,
        _session: &mut Session,
        peer: &HttpPeer,
        ctx: &mut Ctx,
        mut e: Box<Error>,
    ) -> Box<Error> {
        ctx.connect_failures += 1;
        if crate::upstream::try_next(&self.settings, peer, ctx.connect_failures) {
            e.set_retry(true);
        }
        e
    }

    async fn upstream_request_filter(
        &self,
        _session: &mut Session,
        _upstream_request: &mut pingora::http::RequestHeader,
        ctx: &mut Ctx,
    ) -> Result<()> {
        ctx.upstream_sent = Some(Instant::now());
        Ok(())
    }

    async fn upstream_response_filter(
        &self,
        _session: &mut Session,
        _upstream_response: &mut pingora::http::ResponseHeader,
        ctx: &mut Ctx,
    ) -> Result<()> {
        ctx.upstream_time = ctx.upstream_sent.map(|t| t.elapsed());
        Ok(())
    }

    async fn logging(&self, session: &mut Session, e: Option<&Error>, ctx: &mut Ctx) {
        head::request_done(session);
        let status = session.response_written().map_or(0, |r| r.status.as_u16());
        let (bytes_in, bytes_out, outcome) = match &ctx.handled {
            Some(s) => (s.bytes_in, s.bytes_out, s.outcome.to_string()),
            None => (
                session.body_bytes_read() as u64,
                session.body_bytes_sent() as u64,
                match e {
                    Some(e) => format!("error:{}", e.etype().as_str()),
                    None => "proxied".to_string(),
                },
            ),
        };
        let req = session.req_header();
        metrics::finished(&metrics::Finished {
            route: &self.settings.route(&req.method, req.uri.path()).prefix,
            outcome: &outcome,
            upload: ctx.handled.is_some(),
            bytes_in,
            bytes_out,
            file_bytes: ctx.handled.as_ref().map_or(0, |s| s.file_bytes),
            duration: ctx.start.elapsed(),
            upstream: match &ctx.handled {
                Some(s) => s.upstream_time,
                None => ctx.upstream_time,
            },
        });
        log::info!(
            target: "access",
            "{} {} {} {} in={} out={} {}ms {}",
            session.client_addr().map_or("-".to_string(), |a| a.to_string()),
            req.method,
            req.uri,
            status,
            bytes_in,
            bytes_out,
            ctx.start.elapsed().as_millis(),
            outcome
        );
    }
}

fn describe(r: &crate::reject::Reject) -> String {
    format!("{} {} ({})", r.status, r.error, r.detail)
}
