//! The one YAML file: unpart's own keys and pingora's server keys side by side.
//!
//! Every struct denies unknown keys, so a typo is an error that names the key instead of a
//! setting that silently keeps its default. `conf/unpart.yaml` documents each key; its values
//! are the defaults below, and a test keeps the two in step.

use std::path::{Path, PathBuf};
use std::time::Duration;

use pingora::server::configuration::ServerConf;
use serde::{Deserialize, Deserializer};

/// How a route treats `multipart/form-data` requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Fields before the file become headers, the file streams as the body.
    Stream,
    /// The file is written to a private temp file while the body arrives; the backend gets
    /// every field and the file with an exact length once the body has ended cleanly.
    Spool,
    /// Proxied unchanged.
    Passthrough,
}

/// How stream mode frames the file's bytes upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FramingMode {
    /// `Transfer-Encoding: chunked`: works for any client.
    Chunked,
    /// An exact `Content-Length`, computed from the client's own, for backends that cannot
    /// read a chunked body.
    Length,
}

/// What `framing: length` does when the file's length cannot be computed up front (the
/// client sent no Content-Length).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LengthFallback {
    /// Stream it chunked anyway.
    Chunked,
    /// Spool the file, then send it with its exact length.
    Spool,
    /// Answer 411 Length Required.
    Reject,
}

/// A byte count: a plain integer, or a string with a unit (`64KiB`, `10MB`, `1GiB`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByteSize(pub u64);

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            N(u64),
            S(String),
        }
        match Raw::deserialize(d)? {
            Raw::N(n) => Ok(ByteSize(n)),
            Raw::S(s) => parse_size(&s)
                .map(ByteSize)
                .map_err(serde::de::Error::custom),
        }
    }
}

fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("`{s}` is not a size (use e.g. 65536, 64KiB, 10MB, 1GiB)"))?;
    let mult: u64 = match unit.trim() {
        "" | "B" => 1,
        "K" | "KB" => 1000,
        "KiB" => 1 << 10,
        "M" | "MB" => 1000 * 1000,
        "MiB" => 1 << 20,
        "G" | "GB" => 1000 * 1000 * 1000,
        "GiB" => 1 << 30,
        u => return Err(format!("unknown size unit `{u}` in `{s}`")),
    };
    n.checked_mul(mult)
        .ok_or_else(|| format!("`{s}` is too large"))
}

/// Seconds, as a number (fractions allowed).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Seconds(pub Duration);

impl<'de> Deserialize<'de> for Seconds {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = f64::deserialize(d)?;
        if !(s > 0.0 && s <= 86_400.0) {
            return Err(serde::de::Error::custom(format!(
                "{s} is not a timeout in seconds between 0 and 86400"
            )));
        }
        Ok(Seconds(Duration::from_secs_f64(s)))
    }
}

/// Declares `Limits` (every field set, with its default) and `LimitsPatch` (what one YAML
/// `limits:` block sets) from one list, so a route's limits are the top-level ones with its
/// own keys laid over them.
macro_rules! limits {
    ($( $(#[$doc:meta])* $name:ident = $default:expr ),* $(,)?) => {
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        pub struct Limits { $( $(#[$doc])* pub $name: u64, )* }

        impl Default for Limits {
            fn default() -> Self { Limits { $( $name: $default, )* } }
        }

        #[derive(Debug, Clone, Default, Deserialize)]
        #[serde(deny_unknown_fields)]
        pub struct LimitsPatch { $( #[serde(default)] pub $name: Option<ByteSize>, )* }

        impl Limits {
            pub fn patched(&self, p: &LimitsPatch) -> Limits {
                Limits { $( $name: p.$name.map_or(self.$name, |b| b.0), )* }
            }
        }
    };
}

limits! {
    /// Bytes of one part's header block.
    part_header_bytes = 8 * 1024,
    /// Parts in one body (fields, files and skipped parts).
    parts = 128,
    /// Plain fields in one body.
    fields = 64,
    /// Bytes of one field value, before encoding.
    field_value_bytes = 8 * 1024,
    /// Bytes of all headers unpart generates for one request, after encoding.
    header_bytes = 32 * 1024,
    /// Body bytes read before the file part's data starts (preamble, fields, part headers).
    bytes_before_file = 256 * 1024,
    /// Bytes of the file; 0 means unlimited.
    file_bytes = 0,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConf {
    pub prefix: String,
    #[serde(default)]
    pub methods: Vec<String>,
    pub mode: Option<Mode>,
    pub framing: Option<FramingMode>,
    pub length_fallback: Option<LengthFallback>,
    #[serde(default)]
    pub limits: LimitsPatch,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HeadersConf {
    pub reserved_prefixes: Vec<String>,
    pub field_prefix: String,
    pub file_name: String,
    pub file_field: String,
    /// Spool mode: the file's exact size.
    pub file_size: String,
    /// Spool mode: each digest's header is this prefix and the algorithm (`X-File-Sha256`).
    pub file_digest_prefix: String,
}

impl Default for HeadersConf {
    fn default() -> Self {
        HeadersConf {
            reserved_prefixes: vec!["X-Form-".into(), "X-File-".into()],
            field_prefix: "X-Form-".into(),
            file_name: "X-File-Name".into(),
            file_field: "X-File-Field".into(),
            file_size: "X-File-Size".into(),
            file_digest_prefix: "X-File-".into(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TimeoutsConf {
    /// A client that sends no body bytes for this long is cut off.
    pub client_body_idle: Seconds,
    /// A client whose body arrives slower than this (bytes per second of waiting for it,
    /// measured over windows of `client_body_idle`) is cut off; 0 turns the check off.
    pub client_body_min_rate: ByteSize,
    /// An idle HTTP keep-alive (or HTTP/2) client connection is closed after this.
    pub client_keepalive: Seconds,
    /// A whole HTTP/1 request head must arrive within this: from a new connection's start,
    /// from the first byte of a later request on a reused one (`head.rs`).
    pub client_head: Seconds,
    pub upstream_connect: Seconds,
    /// Per read of the upstream response.
    pub upstream_read: Seconds,
    /// Per write of the request upstream.
    pub upstream_write: Seconds,
    /// How long an idle pooled upstream connection is kept.
    pub upstream_idle: Seconds,
}

impl Default for TimeoutsConf {
    fn default() -> Self {
        let s = |n| Seconds(Duration::from_secs(n));
        TimeoutsConf {
            client_body_idle: s(60),
            client_body_min_rate: ByteSize(500),
            client_keepalive: s(60),
            client_head: s(30),
            upstream_connect: s(5),
            upstream_read: s(60),
            upstream_write: s(60),
            upstream_idle: s(60),
        }
    }
}

/// TLS on the proxy listener.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConf {
    /// PEM certificate chain.
    pub cert: PathBuf,
    /// PEM private key.
    pub key: PathBuf,
    /// Offer HTTP/2 by ALPN (HTTP/1.1 is always offered).
    #[serde(default = "yes")]
    pub h2: bool,
}

fn yes() -> bool {
    true
}

/// Where and how much spool mode writes.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SpoolConf {
    /// Created (0700) at startup when a route can spool. Put it on a disk, not a tmpfs.
    pub dir: PathBuf,
    /// All spool files together; 0 means unlimited. Over it a request gets 507.
    pub max_total_bytes: ByteSize,
    /// Computed while the file is written, sent as headers.
    pub digests: Vec<crate::digest::Algorithm>,
}

impl Default for SpoolConf {
    fn default() -> Self {
        SpoolConf {
            dir: PathBuf::from("/var/tmp/unpart"),
            max_total_bytes: ByteSize(8 << 30),
            digests: vec![crate::digest::Algorithm::Sha256],
        }
    }
}

/// `admin:` is either the listen address alone (`admin: 127.0.0.1:6060`) or a map with the
/// listener's safety settings.
#[derive(Debug, Clone, PartialEq)]
pub struct AdminConf {
    pub listen: String,
    /// When set, every admin endpoint but /healthz and /readyz needs `Authorization: Bearer`.
    pub token: Option<String>,
    /// Longest CPU profile (`?seconds=`) the listener takes.
    pub profile_max_seconds: u64,
    /// Seconds between the end of one profile (CPU or heap) and the start of the next.
    pub profile_min_interval: u64,
    /// How long a task dump may take before the in-flight list is served alone.
    pub dump_timeout: Seconds,
    /// Full tokio task traces in /debug/pprof/goroutine (see `admin::tasks` for the risk).
    pub task_dump: bool,
}

impl Default for AdminConf {
    fn default() -> Self {
        AdminConf {
            listen: "127.0.0.1:6060".into(),
            token: None,
            profile_max_seconds: 60,
            profile_min_interval: 2,
            dump_timeout: Seconds(Duration::from_secs(2)),
            task_dump: false,
        }
    }
}

impl<'de> Deserialize<'de> for AdminConf {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(default, deny_unknown_fields)]
        struct Full {
            listen: String,
            token: Option<String>,
            profile_max_seconds: u64,
            profile_min_interval: u64,
            dump_timeout: Seconds,
            task_dump: bool,
        }
        impl Default for Full {
            fn default() -> Self {
                let d = AdminConf::default();
                Full {
                    listen: d.listen,
                    token: d.token,
                    profile_max_seconds: d.profile_max_seconds,
                    profile_min_interval: d.profile_min_interval,
                    dump_timeout: d.dump_timeout,
                    task_dump: d.task_dump,
                }
            }
        }
        // Not an untagged enum: its error would hide which key inside the map is wrong.
        match serde_yaml::Value::deserialize(d)? {
            serde_yaml::Value::String(listen) => Ok(AdminConf {
                listen,
                ..AdminConf::default()
            }),
            v => {
                let f: Full = serde_yaml::from_value(v)
                    .map_err(|e| serde::de::Error::custom(format!("admin: {e}")))?;
                Ok(AdminConf {
                    listen: f.listen,
                    token: f.token,
                    profile_max_seconds: f.profile_max_seconds,
                    profile_min_interval: f.profile_min_interval,
                    dump_timeout: f.dump_timeout,
                    task_dump: f.task_dump,
                })
            }
        }
    }
}

/// The file as written. pingora's keys keep their pingora names.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub listen: String,
    pub admin: AdminConf,
    pub upstream: String,
    /// TLS on `listen`; absent means plain TCP.
    pub tls: Option<TlsConf>,
    /// HTTP/2 without TLS (prior knowledge) on a plain `listen`.
    pub h2c: bool,
    pub mode: Mode,
    pub framing: FramingMode,
    pub length_fallback: LengthFallback,
    pub routes: Vec<RouteConf>,
    pub limits: LimitsPatch,
    pub headers: HeadersConf,
    pub timeouts: TimeoutsConf,
    pub spool: SpoolConf,

    pub threads: usize,
    pub work_stealing: bool,
    pub pid_file: String,
    pub upgrade_sock: String,
    pub daemon: bool,
    pub error_log: Option<String>,
    pub user: Option<String>,
    pub group: Option<String>,
    pub grace_period_seconds: Option<u64>,
    pub graceful_shutdown_timeout_seconds: Option<u64>,
    pub upstream_keepalive_pool_size: usize,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: "0.0.0.0:8080".into(),
            admin: AdminConf::default(),
            upstream: "127.0.0.1:8081".into(),
            tls: None,
            h2c: false,
            mode: Mode::Stream,
            framing: FramingMode::Chunked,
            length_fallback: LengthFallback::Spool,
            routes: Vec::new(),
            limits: LimitsPatch::default(),
            headers: HeadersConf::default(),
            timeouts: TimeoutsConf::default(),
            spool: SpoolConf::default(),
            threads: std::thread::available_parallelism().map_or(1, |n| n.get()),
            work_stealing: true,
            pid_file: "/tmp/unpart.pid".into(),
            upgrade_sock: "/tmp/unpart_upgrade.sock".into(),
            daemon: false,
            error_log: None,
            user: None,
            group: None,
            grace_period_seconds: None,
            graceful_shutdown_timeout_seconds: None,
            upstream_keepalive_pool_size: 128,
        }
    }
}

/// Where the backend is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UpstreamAddr {
    Tcp(String),
    Unix(PathBuf),
}

impl std::fmt::Display for UpstreamAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            UpstreamAddr::Tcp(a) => f.write_str(a),
            UpstreamAddr::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

/// A route with its mode and limits resolved.
#[derive(Debug, Clone)]
pub struct Route {
    pub prefix: String,
    pub methods: Vec<http::Method>,
    pub mode: Mode,
    pub framing: FramingMode,
    pub length_fallback: LengthFallback,
    pub limits: Limits,
}

impl Route {
    pub fn matches(&self, method: &http::Method, path: &str) -> bool {
        path.starts_with(&self.prefix) && (self.methods.is_empty() || self.methods.contains(method))
    }

    /// Whether a request on this route may write a spool file.
    pub fn may_spool(&self) -> bool {
        match self.mode {
            Mode::Spool => true,
            Mode::Stream => {
                self.framing == FramingMode::Length && self.length_fallback == LengthFallback::Spool
            }
            Mode::Passthrough => false,
        }
    }
}

/// The checked configuration the proxy runs with.
#[derive(Debug, Clone)]
pub struct Settings {
    pub listen: String,
    pub admin: AdminConf,
    pub upstream: UpstreamAddr,
    pub tls: Option<TlsConf>,
    pub h2c: bool,
    /// In order; the first match wins. The last one is the default route (prefix `/`).
    pub routes: Vec<Route>,
    pub headers: HeadersConf,
    pub timeouts: TimeoutsConf,
    pub spool: SpoolConf,
}

impl Settings {
    pub fn route(&self, method: &http::Method, path: &str) -> &Route {
        self.routes
            .iter()
            .find(|r| r.matches(method, path))
            .unwrap_or_else(|| &self.routes[self.routes.len() - 1])
    }

    /// Whether any route may write a spool file, so the spool directory must be ready.
    pub fn spools(&self) -> bool {
        self.routes.iter().any(Route::may_spool)
    }
}

/// A configuration error, naming the key.
#[derive(Debug)]
pub struct ConfigError(pub String);

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ConfigError {}

fn err<T>(msg: impl Into<String>) -> Result<T, ConfigError> {
    Err(ConfigError(msg.into()))
}

impl Config {
    pub fn from_yaml(text: &str) -> Result<Config, ConfigError> {
        if text.trim().is_empty() {
            return Ok(Config::default());
        }
        serde_yaml::from_str(text).map_err(|e| ConfigError(e.to_string()))
    }

    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError(format!("cannot read {}: {e}", path.display())))?;
        Config::from_yaml(&text).map_err(|e| ConfigError(format!("{}: {e}", path.display())))
    }

    /// Checks every value and resolves routes; the error names the key and why.
    pub fn settings(&self) -> Result<Settings, ConfigError> {
        check_socket_addr("listen", &self.listen)?;
        check_admin(&self.admin)?;
        if self.listen == self.admin.listen {
            return err("admin: must not be the proxy's listen address");
        }
        let upstream = parse_upstream(&self.upstream)?;
        check_tls(self.tls.as_ref())?;
        let headers = check_headers(&self.headers)?;
        if self.threads == 0 {
            return err("threads: must be at least 1");
        }
        let base = Limits::default().patched(&self.limits);
        check_limits("limits", &base)?;
        let spool = check_spool(&self.spool)?;

        let mut routes = Vec::with_capacity(self.routes.len() + 1);
        for (i, r) in self.routes.iter().enumerate() {
            let key = format!("routes[{i}]");
            if !r.prefix.starts_with('/') {
                return err(format!("{key}.prefix: `{}` must start with `/`", r.prefix));
            }
            let mut methods = Vec::new();
            for m in &r.methods {
                let m = http::Method::from_bytes(m.to_ascii_uppercase().as_bytes())
                    .map_err(|_| ConfigError(format!("{key}.methods: `{m}` is not a method")))?;
                methods.push(m);
            }
            let limits = base.patched(&r.limits);
            check_limits(&format!("{key}.limits"), &limits)?;
            routes.push(Route {
                prefix: r.prefix.clone(),
                methods,
                mode: r.mode.unwrap_or(self.mode),
                framing: r.framing.unwrap_or(self.framing),
                length_fallback: r.length_fallback.unwrap_or(self.length_fallback),
                limits,
            });
        }
        routes.push(Route {
            prefix: "/".into(),
            methods: Vec::new(),
            mode: self.mode,
            framing: self.framing,
            length_fallback: self.length_fallback,
            limits: base,
        });
        Ok(Settings {
            listen: self.listen.clone(),
            admin: self.admin.clone(),
            upstream,
            tls: self.tls.clone(),
            h2c: self.h2c,
            routes,
            headers,
            timeouts: self.timeouts.clone(),
            spool,
        })
    }

    /// pingora's server configuration from the same file.
    pub fn server_conf(&self) -> ServerConf {
        ServerConf {
            version: 1,
            threads: self.threads,
            work_stealing: self.work_stealing,
            pid_file: self.pid_file.clone(),
            upgrade_sock: self.upgrade_sock.clone(),
            daemon: self.daemon,
            error_log: self.error_log.clone(),
            user: self.user.clone(),
            group: self.group.clone(),
            grace_period_seconds: self.grace_period_seconds,
            graceful_shutdown_timeout_seconds: self.graceful_shutdown_timeout_seconds,
            upstream_keepalive_pool_size: self.upstream_keepalive_pool_size,
            ..ServerConf::default()
        }
    }
}

fn check_tls(tls: Option<&TlsConf>) -> Result<(), ConfigError> {
    let Some(t) = tls else { return Ok(()) };
    if !cfg!(feature = "tls") {
        return err("tls: this unpart was built without the `tls` feature");
    }
    for (key, path) in [("cert", &t.cert), ("key", &t.key)] {
        if let Err(e) = std::fs::File::open(path) {
            return err(format!("tls.{key}: cannot read {}: {e}", path.display()));
        }
    }
    Ok(())
}

fn check_spool(s: &SpoolConf) -> Result<SpoolConf, ConfigError> {
    if !s.dir.is_absolute() {
        return err(format!(
            "spool.dir: `{}` must be an absolute path",
            s.dir.display()
        ));
    }
    let mut s = s.clone();
    let mut seen = Vec::new();
    s.digests.retain(|d| {
        let new = !seen.contains(d);
        seen.push(*d);
        new
    });
    Ok(s)
}

fn check_admin(a: &AdminConf) -> Result<(), ConfigError> {
    check_socket_addr("admin.listen", &a.listen)?;
    if a.token
        .as_deref()
        .is_some_and(|t| t.len() < 16 || !t.bytes().all(|c| c.is_ascii_graphic()))
    {
        return err("admin.token: must be at least 16 visible ASCII characters");
    }
    if !(1..=3600).contains(&a.profile_max_seconds) {
        return err("admin.profile_max_seconds: must be between 1 and 3600");
    }
    if a.profile_min_interval > 3600 {
        return err("admin.profile_min_interval: must be at most 3600");
    }
    Ok(())
}

fn check_socket_addr(key: &str, v: &str) -> Result<(), ConfigError> {
    v.parse::<std::net::SocketAddr>()
        .map(|_| ())
        .map_err(|_| ConfigError(format!("{key}: `{v}` is not an IP:port address")))
}

pub fn parse_upstream(v: &str) -> Result<UpstreamAddr, ConfigError> {
    if let Some(path) = v.strip_prefix("unix:") {
        if !path.starts_with('/') {
            return err(format!("upstream: `{v}` needs an absolute socket path"));
        }
        return Ok(UpstreamAddr::Unix(PathBuf::from(path)));
    }
    match v.rsplit_once(':') {
        Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0) => {
            Ok(UpstreamAddr::Tcp(v.to_string()))
        }
        _ => err(format!(
            "upstream: `{v}` is neither host:port nor unix:/path"
        )),
    }
}

fn is_token(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|c| c.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&c))
}

fn check_headers(h: &HeadersConf) -> Result<HeadersConf, ConfigError> {
    if h.reserved_prefixes.is_empty() {
        return err("headers.reserved_prefixes: must list at least the prefixes unpart generates");
    }
    for p in &h.reserved_prefixes {
        if !is_token(p) {
            return err(format!(
                "headers.reserved_prefixes: `{p}` is not a header name prefix"
            ));
        }
    }
    let covered = |name: &str| {
        h.reserved_prefixes
            .iter()
            .any(|p| name.len() >= p.len() && name[..p.len()].eq_ignore_ascii_case(p))
    };
    let digest = format!("{}Sha256", h.file_digest_prefix);
    for (key, name) in [
        ("field_prefix", &h.field_prefix),
        ("file_name", &h.file_name),
        ("file_field", &h.file_field),
        ("file_size", &h.file_size),
        ("file_digest_prefix", &digest),
    ] {
        if !is_token(name) {
            return err(format!(
                "headers.{key}: `{name}` is not a valid header name"
            ));
        }
        if !covered(name) {
            return err(format!(
                "headers.{key}: `{name}` does not start with one of headers.reserved_prefixes, \
                 so a client could forge it"
            ));
        }
    }
    let names = [&h.file_name, &h.file_field, &h.file_size];
    for (i, a) in names.iter().enumerate() {
        if names[..i].iter().any(|b| a.eq_ignore_ascii_case(b)) {
            return err(format!(
                "headers: `{a}` is used twice among file_name, file_field and file_size"
            ));
        }
    }
    Ok(h.clone())
}

fn check_limits(key: &str, l: &Limits) -> Result<(), ConfigError> {
    for (name, v, min) in [
        ("part_header_bytes", l.part_header_bytes, 64),
        ("parts", l.parts, 1),
        ("header_bytes", l.header_bytes, 256),
        ("bytes_before_file", l.bytes_before_file, 64),
    ] {
        if v < min {
            return err(format!("{key}.{name}: {v} is below the minimum of {min}"));
        }
    }
    // Every generated header must also fit pingora's own cap of 256 request headers.
    if l.fields > 200 {
        return err(format!(
            "{key}.fields: {} is above the maximum of 200",
            l.fields
        ));
    }
    if l.part_header_bytes > 1 << 20 || l.header_bytes > 1 << 20 {
        return err(format!(
            "{key}: part_header_bytes and header_bytes are capped at 1MiB"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_file_is_the_defaults() {
        let s = Config::from_yaml("").unwrap().settings().unwrap();
        assert_eq!(s.listen, "0.0.0.0:8080");
        assert_eq!(s.admin, AdminConf::default());
        assert_eq!(s.admin.listen, "127.0.0.1:6060");
        assert_eq!(s.upstream, UpstreamAddr::Tcp("127.0.0.1:8081".into()));
        assert_eq!(s.routes.len(), 1);
        assert_eq!(s.routes[0].mode, Mode::Stream);
        assert_eq!(s.routes[0].limits, Limits::default());
    }

    #[test]
    fn shipped_conf_matches_the_defaults() {
        let text = include_str!("../conf/unpart.yaml");
        let c = Config::from_yaml(text).unwrap();
        let d = Config::default();
        let s = c.settings().unwrap();
        assert_eq!(s.routes.last().unwrap().limits, Limits::default());
        assert_eq!(c.listen, d.listen);
        assert_eq!(c.admin, d.admin);
        assert_eq!(c.upstream, d.upstream);
        assert_eq!(c.mode, d.mode);
        assert_eq!(c.headers.reserved_prefixes, d.headers.reserved_prefixes);
        assert_eq!(c.timeouts.client_body_idle, d.timeouts.client_body_idle);
        assert_eq!(c.timeouts.client_head, d.timeouts.client_head);
        assert_eq!(c.timeouts.upstream_read, d.timeouts.upstream_read);
        assert_eq!(c.pid_file, d.pid_file);
        assert_eq!(c.h2c, d.h2c);
        assert_eq!(c.tls, d.tls);
        assert_eq!(c.framing, d.framing);
        assert_eq!(c.length_fallback, d.length_fallback);
        assert_eq!(c.spool.dir, d.spool.dir);
        assert_eq!(c.spool.max_total_bytes, d.spool.max_total_bytes);
        assert_eq!(c.spool.digests, d.spool.digests);
        assert_eq!(c.headers.file_size, d.headers.file_size);
        assert_eq!(c.headers.file_digest_prefix, d.headers.file_digest_prefix);
        assert!(!s.spools(), "the defaults never touch the disk");
    }

    #[test]
    fn misspelled_keys_are_errors() {
        let e = Config::from_yaml("limts: {}\n").unwrap_err().0;
        assert!(e.contains("unknown field `limts`"), "{e}");
        let e = Config::from_yaml("limits:\n  partz: 3\n").unwrap_err().0;
        assert!(e.contains("unknown field `partz`"), "{e}");
        let e = Config::from_yaml("routes:\n  - prefix: /u\n    mdoe: stream\n")
            .unwrap_err()
            .0;
        assert!(e.contains("unknown field `mdoe`"), "{e}");
    }

    #[test]
    fn routes_inherit_and_override_limits() {
        let c = Config::from_yaml(
            "limits: {fields: 10, file_bytes: 1GiB}\nroutes:\n  - prefix: /raw\n    mode: passthrough\n  - prefix: /up\n    methods: [post]\n    limits: {fields: 3}\n",
        )
        .unwrap();
        let s = c.settings().unwrap();
        let post = http::Method::POST;
        assert_eq!(s.route(&post, "/raw/x").mode, Mode::Passthrough);
        let up = s.route(&post, "/up/load");
        assert_eq!(up.limits.fields, 3);
        assert_eq!(up.limits.file_bytes, 1 << 30);
        assert_eq!(s.route(&http::Method::PUT, "/up/load").prefix, "/");
        assert_eq!(s.route(&post, "/other").limits.fields, 10);
    }

    #[test]
    fn bad_values_name_their_key() {
        let cases = [
            ("spool: {dir: relative/dir}\n", "spool.dir"),
            ("spool: {digests: [sha3]}\n", "unknown variant `sha3`"),
            ("framing: exact\n", "unknown variant `exact`"),
            ("headers: {file_size: X-File-Name}\n", "used twice"),
            ("mode: stram\n", "unknown variant `stram`"),
            ("upstream: nowhere\n", "upstream:"),
            ("upstream: unix:relative\n", "upstream:"),
            ("listen: localhost\n", "listen:"),
            ("routes:\n  - prefix: up\n", "routes[0].prefix"),
            (
                "routes:\n  - prefix: /u\n    length_fallback: maybe\n",
                "unknown variant `maybe`",
            ),
            ("limits: {parts: 0}\n", "limits.parts"),
            ("limits: {file_bytes: 3XB}\n", "unknown size unit"),
            ("headers: {file_name: Name}\n", "headers.file_name"),
            (
                "headers: {field_prefix: \"X Form\"}\n",
                "headers.field_prefix",
            ),
            ("timeouts: {upstream_read: -1}\n", "timeout"),
            ("threads: 0\n", "threads"),
            (
                "tls: {cert: /nonexistent/c.pem, key: /nonexistent/k.pem}\n",
                "tls.cert: cannot read /nonexistent/c.pem",
            ),
            ("tls: {cert: /a}\n", "missing field `key`"),
            ("admin: nowhere\n", "admin.listen"),
            ("admin: {tokn: x}\n", "admin: unknown field `tokn`"),
            ("admin: {token: short}\n", "admin.token"),
            (
                "admin: {profile_max_seconds: 0}\n",
                "admin.profile_max_seconds",
            ),
        ];
        for (yaml, want) in cases {
            let e = Config::from_yaml(yaml)
                .and_then(|c| c.settings().map(|_| ()))
                .unwrap_err()
                .0;
            assert!(e.contains(want), "{yaml:?}: {e}");
        }
    }

    #[test]
    fn which_routes_spool() {
        let c = Config::from_yaml(
            "framing: length\nlength_fallback: reject\nspool: {digests: [md5, sha256, md5]}\nroutes:\n  - prefix: /s\n    mode: spool\n  - prefix: /l\n    length_fallback: spool\n  - prefix: /c\n    framing: chunked\n",
        )
        .unwrap();
        let s = c.settings().unwrap();
        let post = http::Method::POST;
        assert!(s.route(&post, "/s").may_spool());
        let l = s.route(&post, "/l");
        assert_eq!(l.framing, FramingMode::Length);
        assert!(l.may_spool());
        assert!(!s.route(&post, "/c").may_spool());
        assert!(!s.route(&post, "/other").may_spool());
        assert!(s.spools());
        use crate::digest::Algorithm::*;
        assert_eq!(s.spool.digests, vec![Md5, Sha256]);
    }

    #[test]
    fn admin_is_an_address_or_a_map() {
        let c = Config::from_yaml("admin: 127.0.0.1:7070\n").unwrap();
        assert_eq!(c.admin.listen, "127.0.0.1:7070");
        assert_eq!(c.admin.profile_max_seconds, 60);
        let c = Config::from_yaml(
            "admin:\n  listen: 0.0.0.0:7070\n  token: 0123456789abcdef\n  profile_max_seconds: 5\n",
        )
        .unwrap();
        let s = c.settings().unwrap();
        assert_eq!(s.admin.listen, "0.0.0.0:7070");
        assert_eq!(s.admin.token.as_deref(), Some("0123456789abcdef"));
        assert_eq!(s.admin.profile_max_seconds, 5);
        assert_eq!(s.admin.profile_min_interval, 2);
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("65536"), Ok(65536));
        assert_eq!(parse_size("64KiB"), Ok(65536));
        assert_eq!(parse_size("10MB"), Ok(10_000_000));
        assert_eq!(parse_size("1 GiB"), Ok(1 << 30));
        assert!(parse_size("99999999999GiB").is_err());
    }

    #[test]
    fn pingora_keys_pass_through() {
        let c =
            Config::from_yaml("threads: 3\ngrace_period_seconds: 7\nupgrade_sock: /tmp/x.sock\n")
                .unwrap();
        let sc = c.server_conf();
        assert_eq!(sc.threads, 3);
        assert_eq!(sc.grace_period_seconds, Some(7));
        assert_eq!(sc.upgrade_sock, "/tmp/x.sock");
    }
}
