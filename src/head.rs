//! A deadline for each HTTP/1 request head (`timeouts.client_head`).
//!
//! pingora reads a request head with a timeout per read (60 s, the keep-alive timeout on a
//! reused connection) and no total: a client that sends a byte now and then keeps its
//! connection, task and head buffer for as long as it likes (slowloris). [`HeadDeadline`]
//! wraps each HTTP/1 client connection under pingora and gives every head a total: from the
//! connection's start for its first request (as nginx's `client_header_timeout`), and from the
//! first byte of the next request on a reused connection (the wait for that byte is
//! `client_keepalive`'s). The proxy's first hook marks the head done ([`head_done`]); only
//! pingora's reads before that are timed, so the body's own timeouts stay in charge of it. Its
//! last hook ([`request_done`]) readies the deadline for the next head: pingora serves a
//! keep-alive connection's requests in a loop of its own, with no hook between them.
//! Past the deadline a client that sent part of a head gets 408 `head_timeout`, one that sent
//! nothing gets no answer ([`Expired`]), and the connection closes.
//!
//! Reads pass straight through: no buffer, so the direct body reader (`body.rs`) can still
//! read the socket underneath ([`l4`]).

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU8, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use pingora::protocols::l4::stream::Stream as L4Stream;
use pingora::protocols::{Peek, Shutdown, Ssl, Stream, ALPN};
use pingora::proxy::Session;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

use crate::reject::Reject;

/// No byte of this request's head yet: not timed.
const WAITING: u8 = 0;
/// Reading the head, against the deadline.
const TIMED: u8 = 1;
/// The head is in: reads are the body's (or the next request's, after `next_request`).
const DONE: u8 = 2;

/// An HTTP/1 client connection whose request heads must arrive within a deadline.
pub struct HeadDeadline {
    inner: Stream,
    limit: Duration,
    /// Set through a shared reference by [`head_done`].
    state: AtomicU8,
    deadline: Option<Pin<Box<Sleep>>>,
    /// Some byte of the head being timed has arrived.
    heard: bool,
    expired: Option<Expired>,
}

/// Past the deadline. A client that sent part of a head gets 408, then the connection is
/// half-closed and what the client still sends is read and dropped until it closes or
/// [`LINGER`] ends: closing at once with its bytes unread would make the kernel reset the
/// connection, and the client would likely lose the answer. A client that sent nothing is
/// closed without a word, as nginx and HAProxy do: it may be an idle preconnect about to send
/// a request, which must not read a 408 as its answer.
struct Expired {
    answer: Vec<u8>,
    written: usize,
    shut: bool,
    until: Pin<Box<Sleep>>,
    drained: usize,
}

/// How long, and how many bytes at most, the client's bytes are drained after a 408; also
/// the longest pingora's closing shutdown may wait for the client to take the 408.
const LINGER: Duration = Duration::from_secs(1);
const LINGER_BYTES: usize = 64 << 10;

impl HeadDeadline {
    /// A new connection that arrived at `start`: its first head is timed from then.
    pub fn new(inner: Stream, limit: Duration, start: Instant) -> Self {
        HeadDeadline {
            inner,
            limit,
            state: AtomicU8::new(TIMED),
            deadline: Some(Box::pin(tokio::time::sleep_until(start + limit))),
            heard: false,
            expired: None,
        }
    }

    /// Before the next request on a reused connection: timed from its first byte.
    pub fn next_request(&self) {
        self.state.store(WAITING, Ordering::Relaxed);
    }

    fn done(&self) {
        self.state.store(DONE, Ordering::Relaxed);
    }

    fn expire(&mut self) {
        self.deadline = None;
        let peer = self
            .inner
            .get_socket_digest()
            .and_then(|d| d.peer_addr().map(|a| a.to_string()))
            .unwrap_or_else(|| "a client".into());
        let mut answer = Vec::new();
        if self.heard {
            let r = Reject::head_timeout(self.limit.as_secs_f64());
            crate::metrics::rejected(r.error, r.limit);
            log::info!("{peer}: 408 {}: {}; closing", r.error, r.detail);
            let body = r.body();
            answer = format!(
                "HTTP/1.1 408 Request Timeout\r\nContent-Type: application/json\r\n\
                 Content-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            )
            .into_bytes();
            answer.extend_from_slice(&body);
        } else {
            log::debug!("{peer}: sent no request within timeouts.client_head; closing");
        }
        self.expired = Some(Expired {
            answer,
            written: 0,
            shut: false,
            until: Box::pin(tokio::time::sleep(LINGER)),
            drained: 0,
        });
    }

    /// Writes what is left of the 408, then half-closes; never waits. What the socket does not
    /// take now is retried on the next poll, and given up with the linger.
    fn push(&mut self, cx: &mut Context<'_>) {
        let Some(x) = self.expired.as_mut() else {
            return;
        };
        while x.written < x.answer.len() {
            match Pin::new(&mut self.inner).poll_write(cx, &x.answer[x.written..]) {
                Poll::Ready(Ok(n)) if n > 0 => x.written += n,
                Poll::Ready(_) => {
                    x.written = x.answer.len();
                    x.shut = true;
                }
                Poll::Pending => return,
            }
        }
        if !x.shut && Pin::new(&mut self.inner).poll_shutdown(cx).is_ready() {
            x.shut = true;
        }
    }

    /// After the deadline: the error for pingora once the client has closed, sent
    /// [`LINGER_BYTES`] more, or the linger is over (at once for a client that sent nothing).
    fn poll_expired(&mut self, cx: &mut Context<'_>) -> Poll<io::Error> {
        let err = || io::Error::new(io::ErrorKind::TimedOut, crate::logging::HEAD_TIMEOUT);
        self.push(cx);
        let Some(x) = self.expired.as_mut() else {
            return Poll::Ready(err());
        };
        if x.answer.is_empty() {
            return Poll::Ready(err());
        }
        let mut scratch = [0u8; 4096];
        while x.drained < LINGER_BYTES {
            let mut buf = ReadBuf::new(&mut scratch);
            match Pin::new(&mut self.inner).poll_read(cx, &mut buf) {
                Poll::Ready(Ok(())) if !buf.filled().is_empty() => x.drained += buf.filled().len(),
                Poll::Ready(_) => return Poll::Ready(err()),
                Poll::Pending => {
                    return match x.until.as_mut().poll(cx) {
                        Poll::Ready(()) => Poll::Ready(err()),
                        Poll::Pending => Poll::Pending,
                    }
                }
            }
        }
        Poll::Ready(err())
    }
}

/// The client connection's deadline, when it has one (HTTP/1).
fn deadline_of(session: &Session) -> Option<&HeadDeadline> {
    session
        .as_downstream()
        .as_http1()?
        .stream()
        .as_any()
        .downcast_ref::<HeadDeadline>()
}

/// Marks the current request's head as read, when the client connection has a deadline.
pub fn head_done(session: &Session) {
    if let Some(h) = deadline_of(session) {
        h.done();
    }
}

/// After a request, readies the connection's deadline for the next head. Only when the body
/// was read to its end: otherwise pingora may still drain it before reading the next head,
/// and that must not count as a head (the next head is then timed by pingora's reads alone).
pub fn request_done(session: &mut Session) {
    if !session.is_body_done() {
        return;
    }
    if let Some(h) = deadline_of(session) {
        h.next_request();
    }
}

/// The pingora TCP stream under a client connection, seen through a [`HeadDeadline`].
pub fn l4(stream: &Stream) -> Option<&L4Stream> {
    let any = stream.as_any();
    any.downcast_ref::<L4Stream>().or_else(|| {
        any.downcast_ref::<HeadDeadline>()?
            .inner
            .as_any()
            .downcast_ref::<L4Stream>()
    })
}

impl AsyncRead for HeadDeadline {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.expired.is_some() {
            return this.poll_expired(cx).map(Err);
        }
        let state = this.state.load(Ordering::Relaxed);
        if state != TIMED {
            // A finished head's deadline, or none yet for the next one.
            this.deadline = None;
            this.heard = false;
        }
        if state == DONE {
            return Pin::new(&mut this.inner).poll_read(cx, out);
        }
        if this.deadline.as_ref().is_some_and(|d| d.is_elapsed()) {
            this.expire();
            return this.poll_expired(cx).map(Err);
        }
        let before = out.filled().len();
        match Pin::new(&mut this.inner).poll_read(cx, out) {
            Poll::Ready(Ok(())) => {
                if out.filled().len() > before {
                    this.heard = true;
                    if state == WAITING
                        && this
                            .state
                            .compare_exchange(WAITING, TIMED, Ordering::Relaxed, Ordering::Relaxed)
                            .is_ok()
                    {
                        this.deadline = Some(Box::pin(tokio::time::sleep(this.limit)));
                    }
                }
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => {
                let due = this
                    .deadline
                    .as_mut()
                    .is_some_and(|d| d.as_mut().poll(cx).is_ready());
                if due {
                    this.expire();
                    this.poll_expired(cx).map(Err)
                } else {
                    Poll::Pending
                }
            }
        }
    }
}

crate::stream::delegate_to_inner!(HeadDeadline);

#[async_trait::async_trait]
impl Shutdown for HeadDeadline {
    async fn shutdown(&mut self) {
        if self.expired.is_some() {
            // pingora's closing shutdown flushes the 408 first: a client that reads nothing
            // must not hold the connection that way either.
            let _ = tokio::time::timeout(LINGER, self.inner.shutdown()).await;
        } else {
            self.inner.shutdown().await
        }
    }
}

impl Ssl for HeadDeadline {
    fn get_ssl(&self) -> Option<&pingora::protocols::tls::TlsRef> {
        self.inner.get_ssl()
    }

    fn get_ssl_digest(&self) -> Option<std::sync::Arc<pingora::protocols::tls::SslDigest>> {
        self.inner.get_ssl_digest()
    }

    fn selected_alpn_proto(&self) -> Option<ALPN> {
        self.inner.selected_alpn_proto()
    }
}

#[async_trait::async_trait]
impl Peek for HeadDeadline {
    async fn try_peek(&mut self, buf: &mut [u8]) -> io::Result<bool> {
        self.inner.try_peek(buf).await
    }
}

impl std::fmt::Debug for HeadDeadline {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HeadDeadline")
            .field("inner", &self.inner)
            .field("state", &self.state.load(Ordering::Relaxed))
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};

    async fn pair(limit: Duration) -> (TcpStream, HeadDeadline) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (server, _) = listener.accept().await.unwrap();
        (
            client,
            HeadDeadline::new(Box::new(L4Stream::from(server)), limit, Instant::now()),
        )
    }

    async fn answer(client: &mut TcpStream) -> String {
        let mut got = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), client.read_to_end(&mut got)).await;
        String::from_utf8_lossy(&got).into_owned()
    }

    #[tokio::test]
    async fn a_trickled_head_gets_408_at_the_deadline_even_while_bytes_arrive() {
        let (mut client, mut h) = pair(Duration::from_millis(300)).await;
        let start = tokio::time::Instant::now();
        let reader = async {
            let mut buf = [0u8; 64];
            loop {
                match h.read(&mut buf).await {
                    Ok(0) => return Err("ended".to_string()),
                    Ok(_) => {}
                    Err(e) => return Ok(e),
                }
            }
        };
        let writer = async {
            for b in b"POST /upload HTTP/1.1\r\nHost: x\r\n" {
                if client.write_all(&[*b]).await.is_err() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        };
        let (e, _) = tokio::join!(reader, writer);
        let e = e.unwrap();
        assert_eq!(e.kind(), io::ErrorKind::TimedOut);
        let took = start.elapsed();
        assert!(took >= Duration::from_millis(300), "{took:?}");
        assert!(took < Duration::from_secs(3), "{took:?}");
        drop(h);
        let a = answer(&mut client).await;
        assert!(a.starts_with("HTTP/1.1 408 "), "{a}");
        assert!(a.contains("\"error\":\"head_timeout\""), "{a}");
        assert!(a.contains("Connection: close"), "{a}");
    }

    #[tokio::test]
    async fn a_silent_new_connection_is_closed_unanswered_and_a_done_head_is_not_timed() {
        let (mut client, mut h) = pair(Duration::from_millis(100)).await;
        let mut buf = [0u8; 8];
        let e = h.read(&mut buf).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::TimedOut);
        Shutdown::shutdown(&mut h).await;
        drop(h);
        // No 408 for a connection that never sent a byte: it may be a preconnect.
        assert_eq!(answer(&mut client).await, "");

        let (mut client, mut h) = pair(Duration::from_millis(100)).await;
        h.done();
        // Reading the body: no deadline, however slow.
        let idle = tokio::time::timeout(Duration::from_millis(300), h.read(&mut buf)).await;
        assert!(idle.is_err(), "the read ended: {idle:?}");
        client.write_all(b"abc").await.unwrap();
        assert_eq!(h.read(&mut buf).await.unwrap(), 3);
    }

    /// A client that reads nothing (its previous answer filled the socket) cannot take the
    /// 408: the read must not wait for it past the linger. (The bounded closing shutdown is
    /// not checked here: it only waits behind pingora's own write buffer, which a stream
    /// made outside pingora does not have.)
    #[tokio::test]
    async fn the_deadline_holds_when_the_client_reads_nothing() {
        let (mut client, mut h) = pair(Duration::from_millis(200)).await;
        let chunk = vec![b'x'; 1 << 16];
        while tokio::time::timeout(Duration::from_millis(100), h.write_all(&chunk))
            .await
            .is_ok()
        {}
        client.write_all(b"GET / HT").await.unwrap();
        let start = tokio::time::Instant::now();
        let mut buf = [0u8; 64];
        loop {
            match tokio::time::timeout(Duration::from_secs(5), h.read(&mut buf)).await {
                Ok(Ok(n)) => assert!(n > 0, "ended"),
                Ok(Err(e)) => {
                    assert_eq!(e.kind(), io::ErrorKind::TimedOut);
                    break;
                }
                Err(_) => panic!("the read waited for a client that reads nothing"),
            }
        }
        assert!(
            start.elapsed() < Duration::from_secs(3),
            "{:?}",
            start.elapsed()
        );
    }

    #[tokio::test]
    async fn a_reused_connection_is_timed_from_the_first_byte_of_its_next_head() {
        let (mut client, mut h) = pair(Duration::from_millis(200)).await;
        h.done();
        h.next_request();
        let mut buf = [0u8; 8];
        // The wait for the next request is not the head's.
        let idle = tokio::time::timeout(Duration::from_millis(400), h.read(&mut buf)).await;
        assert!(idle.is_err(), "the read ended: {idle:?}");
        client.write_all(b"G").await.unwrap();
        assert_eq!(h.read(&mut buf).await.unwrap(), 1);
        let start = tokio::time::Instant::now();
        let e = h.read(&mut buf).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::TimedOut);
        assert!(start.elapsed() < Duration::from_secs(2));
        assert!(l4(&(Box::new(h) as Stream)).is_some());
    }
}
