//! The backend as a pingora peer, with the configured timeouts.

use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use pingora::upstreams::peer::HttpPeer;

use crate::config::{Settings, UpstreamAddr};

/// How long a host name's address is reused before it is looked up again. Looking up on
/// every request cost a blocking-pool hop and a read of /etc/hosts even for `localhost`
/// (a sidecar's usual upstream); a few seconds still follow a DNS change soon.
pub const RESOLVED_FOR: Duration = Duration::from_secs(5);

/// The last lookup: the address as configured, what it resolved to, and when.
static LAST: Mutex<Option<(String, SocketAddr, Instant)>> = Mutex::new(None);

/// `addr`'s socket address: parsed when it is an IP literal, else looked up (at most once per
/// [`RESOLVED_FOR`]; a failed lookup is not remembered).
pub async fn resolve(addr: &str) -> std::io::Result<SocketAddr> {
    if let Ok(sock) = addr.parse::<SocketAddr>() {
        return Ok(sock);
    }
    if let Some(sock) = remembered(addr, Instant::now()) {
        return Ok(sock);
    }
    let sock = tokio::net::lookup_host(addr)
        .await?
        .next()
        .ok_or_else(|| std::io::Error::other(format!("{addr} resolves to no address")))?;
    if let Ok(mut last) = LAST.lock() {
        *last = Some((addr.to_string(), sock, Instant::now()));
    }
    Ok(sock)
}

fn remembered(addr: &str, now: Instant) -> Option<SocketAddr> {
    let last = LAST.lock().ok()?;
    let (a, sock, at) = last.as_ref()?;
    (a == addr && now.saturating_duration_since(*at) < RESOLVED_FOR).then_some(*sock)
}

/// The upstream as a peer, with the configured timeouts.
pub async fn peer(settings: &Settings) -> std::io::Result<HttpPeer> {
    let mut peer = match &settings.upstream {
        UpstreamAddr::Tcp(addr) => HttpPeer::new(resolve(addr).await?, false, String::new()),
        UpstreamAddr::Unix(path) => {
            HttpPeer::new_uds(&path.to_string_lossy(), false, String::new())
                .map_err(|e| std::io::Error::other(e.to_string()))?
        }
    };
    let t = &settings.timeouts;
    peer.options.connection_timeout = Some(t.upstream_connect.0);
    peer.options.read_timeout = Some(t.upstream_read.0);
    peer.options.write_timeout = Some(t.upstream_write.0);
    peer.options.idle_timeout = Some(t.upstream_idle.0);
    Ok(peer)
}

#[cfg(test)]
mod tests {
    use super::*;

    // One test: the remembered lookup is process-wide.
    #[tokio::test]
    async fn a_host_name_is_looked_up_once_per_period_and_literals_never() {
        assert_eq!(
            resolve("127.0.0.1:8081").await.unwrap(),
            "127.0.0.1:8081".parse().unwrap()
        );
        assert!(LAST.lock().unwrap().is_none(), "a literal was remembered");
        let first = resolve("localhost:8081").await.unwrap();
        assert!(first.ip().is_loopback());
        assert_eq!(first.port(), 8081);
        let at = LAST.lock().unwrap().as_ref().unwrap().2;
        assert_eq!(resolve("localhost:8081").await.unwrap(), first);
        assert_eq!(
            LAST.lock().unwrap().as_ref().unwrap().2,
            at,
            "looked up again"
        );
        // Another name, or the same one after the period, is looked up.
        assert_eq!(remembered("localhost:9", at), None);
        assert_eq!(remembered("localhost:8081", at + RESOLVED_FOR), None);
        assert_eq!(
            remembered("localhost:8081", at + RESOLVED_FOR / 2),
            Some(first)
        );
    }
}
