//! What a new connection goes through before pingora's HTTP layer: telling HTTP/2 with prior
//! knowledge (h2c) from HTTP/1, and a read-ahead buffer under HTTP/2.
//!
//! pingora 0.9 detects h2c itself by reading exactly 24 bytes (the HTTP/2 preface) with no
//! timeout, on every request of a keep-alive connection. So with `h2c: true`, an HTTP/1 request
//! shorter than 24 bytes (`GET / HTTP/1.0` and a blank line) never gets an answer, and an idle
//! keep-alive connection is never closed (the preface read runs before pingora's keep-alive
//! timeout). Here the preface is matched byte by byte, only at the start of a connection, under
//! `timeouts.client_keepalive`: the first byte that differs makes it HTTP/1. pingora's own h2c
//! switch stays off; an HTTP/2 connection is marked for it as ALPN `h2` instead.
//!
//! Under HTTP/2, the h2 crate reads the socket into whatever room its frame buffer has left,
//! 8 KiB at a time: a 1 GiB upload took 130 000 `recvfrom` calls. [`ReadAhead`] reads up to
//! [`READ_AHEAD`] at a time and hands the h2 crate its pieces from memory. HTTP/1 connections
//! get a deadline for each request head (`head.rs`), which reads nothing ahead: the direct
//! body reader (`body.rs`) reads the socket under it.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use async_trait::async_trait;
use bytes::{Buf, BytesMut};
use pingora::apps::ServerApp;
use pingora::protocols::l4::stream::Stream as L4Stream;
use pingora::protocols::{Peek, Shutdown, Ssl, Stream, ALPN};
use pingora::server::ShutdownWatch;
use tokio::io::{AsyncRead, AsyncReadExt, ReadBuf};

use crate::head::HeadDeadline;

/// The client connection preface of HTTP/2 (RFC 9113, section 3.4).
const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// The most [`ReadAhead`] reads from the socket at once. Measured with curl (16 KiB frames)
/// uploading 1 GiB over h2c: see README "Benchmarks".
pub const READ_AHEAD: usize = 64 * 1024;

/// The proxy service's application: sorts each new connection, then lets pingora (`A`, the
/// `HttpProxy`) serve it.
pub struct Accept<A> {
    proxy: Arc<A>,
    h2c: bool,
    /// How long a new connection may take to send its first bytes.
    first_bytes: Duration,
    /// How long an HTTP/1 request head may take (`head.rs`).
    head: Duration,
}

impl<A> Accept<A> {
    /// `proxy` must have pingora's own h2c detection off (`HttpServerOptions::h2c`).
    pub fn new(proxy: A, h2c: bool, first_bytes: Duration, head: Duration) -> Self {
        Accept {
            proxy: Arc::new(proxy),
            h2c,
            first_bytes,
            head,
        }
    }
}

/// What the first bytes of a connection say.
#[derive(Debug, PartialEq, Eq)]
pub enum Protocol {
    Http1,
    Http2,
}

/// Matches `got` (the first bytes of a connection) against the HTTP/2 preface: `None` while
/// every byte so far matches and the preface is not complete.
pub fn classify(got: &[u8]) -> Option<Protocol> {
    let n = got.len().min(PREFACE.len());
    if got[..n] != PREFACE[..n] {
        Some(Protocol::Http1)
    } else if n == PREFACE.len() {
        Some(Protocol::Http2)
    } else {
        None
    }
}

/// Reads the first bytes of `l4` until [`classify`] decides, then puts them back. `None` when
/// the connection closed before sending anything.
async fn sniff(l4: &mut L4Stream) -> io::Result<Option<Protocol>> {
    let mut got = [0u8; PREFACE.len()];
    let mut n = 0;
    let protocol = loop {
        // Never more than the rest of the preface: nothing past it is read here.
        let r = l4.read(&mut got[n..]).await?;
        if r == 0 {
            if n == 0 {
                return Ok(None);
            }
            // Closed inside a preface prefix: pingora's HTTP/1 reader reports it.
            break Protocol::Http1;
        }
        n += r;
        if let Some(p) = classify(&got[..n]) {
            break p;
        }
    };
    l4.rewind(&got[..n]);
    Ok(Some(protocol))
}

impl<A: ServerApp + Send + Sync + 'static> Accept<A> {
    /// The connection as pingora should see it, or `None` to close it.
    async fn sort(&self, stream: Stream, shutdown: &ShutdownWatch) -> Option<Stream> {
        if !self.h2c || stream.get_ssl_digest().is_some() || !stream.as_any().is::<L4Stream>() {
            return Some(stream);
        }
        let mut l4 = stream.into_any().downcast::<L4Stream>().ok()?;
        let mut shutdown = shutdown.clone();
        let found = tokio::select! {
            r = tokio::time::timeout(self.first_bytes, sniff(&mut l4)) => r,
            _ = shutdown.changed() => return None,
        };
        match found {
            Ok(Ok(Some(Protocol::Http1))) => Some(l4),
            Ok(Ok(Some(Protocol::Http2))) => Some(Box::new(ReadAhead::new(l4))),
            Ok(Ok(None)) => None,
            Ok(Err(e)) => {
                log::debug!("reading a new connection's first bytes: {e}");
                None
            }
            Err(_) => {
                log::debug!(
                    "a new connection sent nothing for {:?} (timeouts.client_keepalive): closed",
                    self.first_bytes
                );
                None
            }
        }
    }
}

#[async_trait]
impl<A: ServerApp + Send + Sync + 'static> ServerApp for Accept<A> {
    async fn process_new(
        self: &Arc<Self>,
        stream: Stream,
        shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        // The first head is timed from here, the h2c check included.
        let start = tokio::time::Instant::now();
        let stream = self.sort(stream, shutdown).await?;
        // HTTP/2 (h2c here, or ALPN h2 under TLS) is the h2 crate's to time.
        let mut next = Some(if matches!(stream.selected_alpn_proto(), Some(ALPN::H2)) {
            stream
        } else {
            Box::new(HeadDeadline::new(stream, self.head, start)) as Stream
        });
        // pingora serves a keep-alive connection's requests itself; should it ever hand one
        // back for the next request, serving it here keeps the sorting to the connection's
        // start.
        while let Some(s) = next {
            next = self.proxy.process_new(s, shutdown).await;
        }
        None
    }

    async fn cleanup(&self) {
        self.proxy.cleanup().await
    }
}

/// A stream carrying HTTP/2 with prior knowledge, read ahead in pieces of up to
/// [`READ_AHEAD`]. The buffer exists only while bytes are flowing: it is freed whenever it is
/// empty and the socket has nothing more, so an idle connection holds no memory for it.
pub struct ReadAhead {
    inner: Stream,
    buf: BytesMut,
}

impl ReadAhead {
    pub fn new(inner: Stream) -> Self {
        ReadAhead {
            inner,
            buf: BytesMut::new(),
        }
    }
}

impl AsyncRead for ReadAhead {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.buf.is_empty() {
            if out.remaining() >= READ_AHEAD {
                this.buf = BytesMut::new();
                return Pin::new(&mut this.inner).poll_read(cx, out);
            }
            // Reclaims the space already handed out: the buffer is never shared.
            this.buf.reserve(READ_AHEAD);
            match tokio_util::io::poll_read_buf(Pin::new(&mut this.inner), cx, &mut this.buf) {
                Poll::Pending => {
                    this.buf = BytesMut::new();
                    return Poll::Pending;
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Ready(Ok(0)) => return Poll::Ready(Ok(())),
                Poll::Ready(Ok(_)) => {}
            }
        }
        let n = out.remaining().min(this.buf.len());
        out.put_slice(&this.buf[..n]);
        this.buf.advance(n);
        Poll::Ready(Ok(()))
    }
}

crate::stream::delegate_to_inner!(ReadAhead);

#[async_trait]
impl Shutdown for ReadAhead {
    async fn shutdown(&mut self) {
        self.inner.shutdown().await
    }
}

impl Ssl for ReadAhead {
    /// Cleartext: this is how pingora's HTTP/2 switch learns the protocol (its own h2c
    /// detection is off).
    fn selected_alpn_proto(&self) -> Option<ALPN> {
        Some(ALPN::H2)
    }
}

/// Nothing peeks a stream that is already known to be HTTP/2.
impl Peek for ReadAhead {}

impl std::fmt::Debug for ReadAhead {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReadAhead")
            .field("inner", &self.inner)
            .field("buffered", &self.buf.len())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every byte arrives in order through pieces smaller than the buffer, and the buffer is
    /// gone once the socket has nothing more.
    #[tokio::test]
    async fn read_ahead_hands_on_every_byte_and_frees_its_buffer_when_idle() {
        use tokio::io::AsyncWriteExt;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut client = tokio::net::TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (server, _) = listener.accept().await.unwrap();
        let mut ra = ReadAhead::new(Box::new(L4Stream::from(server)));
        let data: Vec<u8> = (0..3 * READ_AHEAD + 123).map(|i| (i % 251) as u8).collect();
        client.write_all(&data).await.unwrap();
        let mut got = Vec::new();
        let mut piece = [0u8; 8192];
        while got.len() < data.len() {
            let n = ra.read(&mut piece).await.unwrap();
            assert!(n > 0, "early end after {} bytes", got.len());
            got.extend_from_slice(&piece[..n]);
        }
        assert_eq!(got, data);
        // Nothing more to read: the read waits, and the buffer is released meanwhile.
        let idle = tokio::time::timeout(Duration::from_millis(50), ra.read(&mut piece)).await;
        assert!(idle.is_err(), "read returned with nothing sent");
        assert_eq!(ra.buf.capacity(), 0);
        // The end of the stream still reads as the end.
        drop(client);
        assert_eq!(ra.read(&mut piece).await.unwrap(), 0);
    }

    #[test]
    fn the_first_differing_byte_decides_http1() {
        assert_eq!(classify(b"G"), Some(Protocol::Http1));
        assert_eq!(classify(b"P"), None);
        assert_eq!(classify(b"POST /"), Some(Protocol::Http1));
        assert_eq!(classify(b"PRI * HTTP/1.1"), Some(Protocol::Http1));
        // The preface less its last byte is still undecided.
        assert_eq!(classify(&PREFACE[..23]), None);
    }

    #[test]
    fn the_whole_preface_is_http2() {
        assert_eq!(classify(PREFACE), Some(Protocol::Http2));
        let mut more = PREFACE.to_vec();
        more.extend_from_slice(b"\0\0\x12\x04");
        assert_eq!(classify(&more), Some(Protocol::Http2));
    }

    #[test]
    fn every_prefix_of_the_preface_waits_for_more() {
        for n in 1..PREFACE.len() {
            assert_eq!(classify(&PREFACE[..n]), None, "prefix of {n} bytes");
        }
    }
}
