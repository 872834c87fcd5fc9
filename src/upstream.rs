//! The backend as a pingora peer, with the configured timeouts.

use pingora::upstreams::peer::HttpPeer;

use crate::config::{Settings, UpstreamAddr};

/// Resolves the upstream address (per request, so DNS changes are picked up) into a peer.
pub async fn peer(settings: &Settings) -> std::io::Result<HttpPeer> {
    let mut peer = match &settings.upstream {
        UpstreamAddr::Tcp(addr) => {
            let sock = tokio::net::lookup_host(addr.as_str())
                .await?
                .next()
                .ok_or_else(|| std::io::Error::other(format!("{addr} resolves to no address")))?;
            HttpPeer::new(sock, false, String::new())
        }
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
