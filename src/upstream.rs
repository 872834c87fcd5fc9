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

/// The last lookup: the address as configured, its addresses (the one to use first), and when.
struct Lookup {
    addr: String,
    socks: Vec<SocketAddr>,
    at: Instant,
}

static LAST: Mutex<Option<Lookup>> = Mutex::new(None);

/// `addr`'s socket address: parsed when it is an IP literal, else looked up (at most once per
/// [`RESOLVED_FOR`]; a failed lookup is not remembered). Of a name's addresses, the first,
/// until one [`refused`]; a new lookup keeps the one in use first while it is still listed.
pub async fn resolve(addr: &str) -> std::io::Result<SocketAddr> {
    if let Ok(sock) = addr.parse::<SocketAddr>() {
        return Ok(sock);
    }
    if let Some(sock) = remembered(addr, Instant::now()) {
        return Ok(sock);
    }
    let mut socks: Vec<SocketAddr> = tokio::net::lookup_host(addr).await?.collect();
    let Some(&first) = socks.first() else {
        return Err(std::io::Error::other(format!(
            "{addr} resolves to no address"
        )));
    };
    let Ok(mut last) = LAST.lock() else {
        return Ok(first);
    };
    if let Some(prev) = last.as_ref().filter(|l| l.addr == addr) {
        if let Some(i) = socks.iter().position(|s| Some(s) == prev.socks.first()) {
            socks[..=i].rotate_right(1);
        }
    }
    let sock = socks[0];
    *last = Some(Lookup {
        addr: addr.to_string(),
        socks,
        at: Instant::now(),
    });
    Ok(sock)
}

fn remembered(addr: &str, now: Instant) -> Option<SocketAddr> {
    let last = LAST.lock().ok()?;
    let l = last.as_ref()?;
    (l.addr == addr && now.saturating_duration_since(l.at) < RESOLVED_FOR)
        .then(|| l.socks.first().copied())
        .flatten()
}

/// A connection to `peer` failed. When the configured upstream is a host name with more
/// addresses, the next one is used from now on (`localhost` often resolves to `::1` first,
/// and a backend may listen on 127.0.0.1 only). True when the request should try again: the
/// address in use is now another one.
fn refused(settings: &Settings, peer: &HttpPeer) -> bool {
    use pingora::upstreams::peer::Peer;
    let (UpstreamAddr::Tcp(addr), Some(sock)) = (&settings.upstream, peer.address().as_inet())
    else {
        return false;
    };
    move_on(addr, *sock)
}

/// After a request's `failures`-th failed connection (to `peer`): whether it should try again,
/// on the name's next address. Each address once per request, so an unreachable backend costs
/// at most one connect timeout per address.
pub fn try_next(settings: &Settings, peer: &HttpPeer, failures: usize) -> bool {
    failures < addresses(settings) && refused(settings, peer)
}

/// How many addresses the upstream has now (1 for an IP literal or a Unix socket).
fn addresses(settings: &Settings) -> usize {
    let UpstreamAddr::Tcp(addr) = &settings.upstream else {
        return 1;
    };
    match LAST.lock() {
        Ok(last) => last
            .as_ref()
            .filter(|l| &l.addr == addr)
            .map_or(1, |l| l.socks.len().max(1)),
        Err(_) => 1,
    }
}

fn move_on(addr: &str, sock: SocketAddr) -> bool {
    let Ok(mut last) = LAST.lock() else {
        return false;
    };
    match last.as_mut() {
        Some(l) if l.addr == addr && l.socks.len() > 1 => {
            // Another request may have moved on from `sock` already: then just retry.
            if l.socks[0] == sock {
                l.socks.rotate_left(1);
                log::warn!(
                    "upstream {addr}: connecting to {sock} failed; trying {}",
                    l.socks[0]
                );
            }
            true
        }
        _ => false,
    }
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
        let at = LAST.lock().unwrap().as_ref().unwrap().at;
        assert_eq!(resolve("localhost:8081").await.unwrap(), first);
        assert_eq!(
            LAST.lock().unwrap().as_ref().unwrap().at,
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

        // A name with two addresses (set here: no test machine's hosts file has one) moves on
        // from a refusing address, and back round; one with a single address cannot.
        let (a, b): (SocketAddr, SocketAddr) = (
            "[::1]:8081".parse().unwrap(),
            "127.0.0.1:8081".parse().unwrap(),
        );
        *LAST.lock().unwrap() = Some(Lookup {
            addr: "two:8081".into(),
            socks: vec![a, b],
            at: Instant::now(),
        });
        let settings = |up: &str| {
            let mut s = crate::config::Config::default().settings().unwrap();
            s.upstream = UpstreamAddr::Tcp(up.into());
            s
        };
        assert_eq!(addresses(&settings("two:8081")), 2);
        assert_eq!(addresses(&settings("other:8081")), 1);
        assert_eq!(addresses(&settings("127.0.0.1:8081")), 1);
        assert!(!move_on("other:8081", a));
        // b failed, but a is the one in use (another request moved on): retry, a stays.
        assert!(move_on("two:8081", b));
        assert_eq!(resolve("two:8081").await.unwrap(), a);
        assert!(move_on("two:8081", a));
        assert_eq!(resolve("two:8081").await.unwrap(), b);
        assert!(move_on("two:8081", b));
        assert_eq!(resolve("two:8081").await.unwrap(), a);
        *LAST.lock().unwrap() = None;
        resolve("localhost:8081").await.unwrap();
        let only = LAST.lock().unwrap().as_ref().unwrap().socks[0];
        let single = LAST.lock().unwrap().as_ref().unwrap().socks.len() == 1;
        assert_eq!(move_on("localhost:8081", only), !single);
    }
}
