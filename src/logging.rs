//! The process logger: env_logger (`RUST_LOG`, default `info`), with one of pingora's lines
//! put in its place.
//!
//! pingora logs every request head it could not read at ERROR ("Fail to proxy: ... while
//! reading request headers"). When the cause is `timeouts.client_head` (`head.rs`), that is
//! the client's doing: `head` has already logged it at INFO with the answer the client got,
//! and counted it in `unpart_rejections_total`. At ERROR it would alert an operator once per
//! slowloris connection, so such lines go out at DEBUG instead.

use log::{Level, Log, Metadata, Record};

/// The cause `head` gives pingora for a head that missed its deadline; found in pingora's line.
pub const HEAD_TIMEOUT: &str = "request head not complete within timeouts.client_head";

struct Logger {
    inner: env_logger::Logger,
}

/// Whether a record is pingora's ERROR line for a head that missed `timeouts.client_head`.
fn is_head_timeout(r: &Record) -> bool {
    r.level() == Level::Error
        && r.target().starts_with("pingora_proxy")
        && r.args().to_string().contains(HEAD_TIMEOUT)
}

impl Log for Logger {
    fn enabled(&self, m: &Metadata) -> bool {
        self.inner.enabled(m)
    }

    /// env_logger's own `log` applies the filter, to the demoted record too.
    fn log(&self, r: &Record) {
        if is_head_timeout(r) {
            self.inner.log(
                &Record::builder()
                    .args(*r.args())
                    .level(Level::Debug)
                    .target(r.target())
                    .module_path(r.module_path())
                    .file(r.file())
                    .line(r.line())
                    .build(),
            );
            return;
        }
        self.inner.log(r);
    }

    fn flush(&self) {
        self.inner.flush();
    }
}

/// Installs the logger; a second call is a no-op.
pub fn init() {
    let inner =
        env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).build();
    let max = inner.filter();
    if log::set_boxed_logger(Box::new(Logger { inner })).is_ok() {
        log::set_max_level(max);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(level: Level, target: &str, msg: &str) -> bool {
        is_head_timeout(
            &Record::builder()
                .args(format_args!("{msg}"))
                .level(level)
                .target(target)
                .build(),
        )
    }

    #[test]
    fn only_pingoras_error_for_a_head_timeout_is_demoted() {
        let line = format!(
            "Fail to proxy: Downstream ReadError context: while reading request headers cause: \
             {HEAD_TIMEOUT}, downstream session type: h1"
        );
        assert!(check(Level::Error, "pingora_proxy", &line));
        // Any other cause, target or level stays as it is.
        assert!(!check(
            Level::Error,
            "pingora_proxy",
            "Fail to proxy: Downstream ReadError context: while reading request headers cause: \
             Connection reset by peer"
        ));
        assert!(!check(Level::Error, "unpart::proxy", &line));
        assert!(!check(Level::Warn, "pingora_proxy", &line));
    }
}
