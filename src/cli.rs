//! Command line: unpart's own flags plus pingora's `-d` and `-u`.

use clap::Parser;

/// `--version`: the version and the cargo features it was built with.
const LONG_VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    "\nfeatures: ",
    env!("UNPART_FEATURES"),
    "\npingora 0.9.1"
);

#[derive(Debug, Parser)]
#[command(
    name = "unpart",
    version,
    long_version = LONG_VERSION,
    about = "Reverse proxy that turns multipart/form-data uploads into raw streamed bodies",
    long_about = "Reverse proxy that turns multipart/form-data uploads into raw streamed bodies.\n\n\
Fields sent before the file become X-Form-<name> headers, the file's bytes stream to the \
backend as the request body, and everything else is proxied unchanged. With no arguments it \
runs on its embedded defaults (listen 0.0.0.0:8080, upstream 127.0.0.1:8081, admin \
127.0.0.1:6060). RUST_LOG sets the log level (default info; the access log's target is `access`)."
)]
pub struct Cli {
    /// YAML configuration file (see conf/unpart.yaml)
    #[arg(short, long, value_name = "FILE")]
    pub conf: Option<std::path::PathBuf>,
    /// Check the configuration and exit: 0 when valid, 1 with the bad key and why
    #[arg(short, long)]
    pub test: bool,
    /// Listen address for the proxy, overriding `listen`
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<String>,
    /// Backend address (host:port or unix:/path), overriding `upstream`
    #[arg(long, value_name = "ADDR")]
    pub upstream: Option<String>,
    /// Admin listener address, overriding `admin`
    #[arg(long, value_name = "ADDR")]
    pub admin: Option<String>,
    /// Run in the background (pingora's daemon mode)
    #[arg(short, long)]
    pub daemon: bool,
    /// Take over the listening sockets from a running instance (graceful upgrade)
    #[arg(short, long)]
    pub upgrade: bool,
}
