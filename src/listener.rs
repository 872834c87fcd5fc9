//! The proxy's listener: plain TCP (optionally h2c) or TLS with HTTP/2 by ALPN.

use pingora::listeners::{L4BufferSettings, ListenerConfig};
use pingora::protocols::http::v2::server::{default_h2_options, H2Options};
use pingora::services::listening::Service;

use crate::config::Settings;

/// HTTP/2 flow-control windows. A client may send this much before unpart has read it, so it
/// is also the most an HTTP/2 upload can make unpart buffer (reached only when the backend
/// is slower than the client). Measured with curl (nghttp2) uploading 512 MiB on loopback:
/// h2's default 64 KiB ran at 0.2x HTTP/1.1, 512 KiB-2 MiB at 0.4-0.5x, 4 MiB at 0.8-0.95x:
/// curl waits for window updates, and each round trip crosses three tasks.
const STREAM_WINDOW: u32 = 4 * 1024 * 1024;
const CONNECTION_WINDOW: u32 = 8 * 1024 * 1024;

pub fn h2_options() -> H2Options {
    let mut o = default_h2_options();
    o.initial_window_size(STREAM_WINDOW);
    o.initial_connection_window_size(CONNECTION_WINDOW);
    o
}

/// Adds `listen` to the proxy service, with TLS when configured.
pub fn add<A>(service: &mut Service<A>, settings: &Settings) -> Result<(), String> {
    match &settings.tls {
        None => {
            // No l4 read buffer on the client side: the client body reader (body.rs) reads
            // the socket directly and must not skip bytes held in such a buffer. pingora's
            // body reads bypass that buffer anyway.
            service.add_listener(
                ListenerConfig::tcp(&settings.listen)
                    .l4_buffer(L4BufferSettings::default().read(0)),
            );
            Ok(())
        }
        #[cfg(feature = "tls")]
        Some(t) => {
            use pingora::listeners::tls::TlsSettings;
            let path = |p: &std::path::Path| p.to_string_lossy().into_owned();
            let mut tls = TlsSettings::intermediate(&path(&t.cert), &path(&t.key))
                .map_err(|e| format!("tls: {e}"))?;
            if t.h2 {
                tls.enable_h2();
            }
            service.add_tls_with_settings(&settings.listen, None, tls);
            Ok(())
        }
        #[cfg(not(feature = "tls"))]
        Some(_) => Err("tls: this unpart was built without the `tls` feature".into()),
    }
}
