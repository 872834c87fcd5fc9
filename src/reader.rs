//! Reading an upload's body from the client, HTTP/1 or HTTP/2: the idle timeout, the minimum
//! rate, small HTTP/2 frames joined, and read errors mapped to what the client is told.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use pingora::proxy::Session;

use crate::body::{from_pingora, BodyError, ClientBody};
use crate::config::TimeoutsConf;
use crate::forward::Failure;
use crate::pace::Pace;
use crate::page;
use crate::reject::Reject;

/// HTTP/2 frames already buffered are joined up to this many bytes.
const COALESCE: usize = 256 * 1024;
/// The largest DATA frame a client sends (HTTP/2's default `SETTINGS_MAX_FRAME_SIZE`, which
/// pingora keeps); a larger one only costs a reallocation.
const FRAME: usize = 16 * 1024;

pub struct ClientReader {
    body: ClientBody,
    pace: Pace,
    idle: Duration,
    /// An HTTP/2 read that was coalescing saw the end of the body: the next read says so.
    ended: bool,
}

impl ClientReader {
    pub fn new(t: &TimeoutsConf) -> ClientReader {
        ClientReader {
            body: ClientBody::pingora(t.client_body_idle.0),
            pace: Pace::new(t.client_body_min_rate.0, t.client_body_idle.0),
            idle: t.client_body_idle.0,
            ended: false,
        }
    }

    /// Before anything touches pingora's body reader, `100 Continue` included.
    pub fn prepare(&mut self, session: &mut Session) {
        self.body = ClientBody::prepare(session, self.idle);
    }

    /// The HTTP/1 body reader, for draining after a rejection.
    pub fn body(&mut self) -> &mut ClientBody {
        &mut self.body
    }

    /// The next piece of the client's body, `None` at its end, held to the minimum rate.
    pub async fn read(&mut self, session: &mut Session) -> Result<Option<Bytes>, Failure> {
        let start = Instant::now();
        let r = self.read_raw(session).await?;
        let n = r.as_ref().map_or(0, Bytes::len);
        if let Err(rate) = self.pace.record(n, start.elapsed()) {
            return Err(Reject::client_too_slow(rate, self.pace.min_rate()).into());
        }
        Ok(r)
    }

    /// For HTTP/1 the idle timeout is pingora's own read timeout (set in
    /// `early_request_filter`); pingora's HTTP/2 reads have none, so it is applied here (an
    /// HTTP/2 read is cancel-safe).
    async fn read_raw(&mut self, session: &mut Session) -> Result<Option<Bytes>, Failure> {
        let h2 = session.as_downstream().is_http2();
        let r = if !h2 {
            self.body.read(session).await
        } else if self.ended {
            Ok(None)
        } else {
            match tokio::time::timeout(self.idle, session.read_request_body()).await {
                Ok(r) => r.map_err(from_pingora),
                Err(_) => Err(BodyError::Idle),
            }
        };
        match r {
            Ok(Some(b)) if h2 => self.coalesce(session, b),
            Ok(chunk) => Ok(chunk),
            Err(BodyError::Idle) => Err(Reject::client_timeout(self.idle.as_secs_f64()).into()),
            Err(BodyError::Closed(why)) => {
                log::debug!("{why}");
                Err(Reject::incomplete_body().into())
            }
            Err(BodyError::Client(why)) => Err(Failure::Client(why)),
        }
    }

    /// HTTP/2 clients send 16 KiB frames; one upstream chunk (and syscall) per frame ran at a
    /// third of HTTP/1.1's speed. Frames that are already buffered are joined, up to
    /// `COALESCE` bytes, without ever waiting for more: when unpart keeps up nothing is
    /// delayed, and when it falls behind it writes bigger pieces.
    fn coalesce(&mut self, session: &mut Session, first: Bytes) -> Result<Option<Bytes>, Failure> {
        if first.len() >= COALESCE {
            return Ok(Some(first));
        }
        let mut joined: Option<BytesMut> = None;
        loop {
            // Stop while another frame still fits: the buffer (which starts mid-page, so holds
            // a little under `COALESCE`) is then never reallocated.
            let (len, room) = joined
                .as_ref()
                .map_or((first.len(), COALESCE), |j| (j.len(), j.capacity()));
            if len + FRAME > room {
                break;
            }
            let next = match poll_now(std::pin::pin!(session.read_request_body())) {
                None => break,
                Some(Ok(Some(b))) => b,
                Some(Ok(None)) => {
                    self.ended = true;
                    break;
                }
                Some(Err(e)) => return Err(Failure::Client(e.to_string())),
            };
            joined
                .get_or_insert_with(|| {
                    let mut j = page::buffer(COALESCE);
                    j.extend_from_slice(&first);
                    j
                })
                .extend_from_slice(&next);
        }
        Ok(Some(joined.map_or(first, BytesMut::freeze)))
    }
}

/// Polls a future once: its output if it is ready now, `None` otherwise. The caller may go
/// on to await the same future, or drop it if it is cancel-safe.
pub fn poll_now<F: Future>(f: Pin<&mut F>) -> Option<F::Output> {
    match f.poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(v) => Some(v),
        Poll::Pending => None,
    }
}
