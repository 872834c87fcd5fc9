//! Prometheus metrics: the process (`process_resident_memory_bytes` and the rest), the
//! allocator, and unpart's own request accounting. Labels are bounded sets: a route is a
//! configured prefix, an outcome or reason is one of unpart's error codes, never a path.

use std::sync::OnceLock;
use std::time::Duration;

use prometheus::{
    Encoder as _, Gauge, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

pub struct Metrics {
    registry: Registry,
    requests: IntCounterVec,
    uploads: IntCounterVec,
    bytes_in: IntCounterVec,
    bytes_out: IntCounterVec,
    file_bytes: IntCounterVec,
    in_flight: IntGauge,
    rejections: IntCounterVec,
    upload_seconds: HistogramVec,
    upstream_seconds: HistogramVec,
    jemalloc: IntGaugeVec,
    tasks: IntGaugeVec,
    profiles: IntCounterVec,
    up_since: Gauge,
}

/// Upload durations run from milliseconds to many minutes.
const UPLOAD_BUCKETS: &[f64] = &[
    0.005, 0.025, 0.1, 0.25, 1.0, 2.5, 10.0, 30.0, 60.0, 300.0, 1800.0,
];
/// The backend's time to answer once the request (or the streamed body) reached it.
const UPSTREAM_BUCKETS: &[f64] = &[0.001, 0.005, 0.025, 0.1, 0.25, 1.0, 2.5, 10.0, 60.0];

fn build() -> prometheus::Result<Metrics> {
    let registry = Registry::new();
    let counter = |name: &str, help: &str, labels: &[&str]| -> prometheus::Result<IntCounterVec> {
        let c = IntCounterVec::new(Opts::new(name, help), labels)?;
        registry.register(Box::new(c.clone()))?;
        Ok(c)
    };
    let histogram = |name: &str, help: &str, buckets: &[f64]| -> prometheus::Result<HistogramVec> {
        let h = HistogramVec::new(
            HistogramOpts::new(name, help).buckets(buckets.to_vec()),
            &["route"],
        )?;
        registry.register(Box::new(h.clone()))?;
        Ok(h)
    };
    let m = Metrics {
        requests: counter(
            "unpart_requests_total",
            "Requests by route prefix and outcome (ok, proxied, an error code, error:<kind>).",
            &["route", "outcome"],
        )?,
        uploads: counter(
            "unpart_uploads_total",
            "multipart/form-data requests unpart parsed itself (stream mode), by route and outcome.",
            &["route", "outcome"],
        )?,
        bytes_in: counter(
            "unpart_received_bytes_total",
            "Request body bytes read from clients.",
            &["route"],
        )?,
        bytes_out: counter(
            "unpart_sent_bytes_total",
            "Response body bytes written to clients.",
            &["route"],
        )?,
        file_bytes: counter(
            "unpart_upload_file_bytes_total",
            "File bytes streamed to the backend by stream mode.",
            &["route"],
        )?,
        in_flight: {
            let g = IntGauge::new("unpart_uploads_in_flight", "Uploads being streamed now.")?;
            registry.register(Box::new(g.clone()))?;
            g
        },
        rejections: counter(
            "unpart_rejections_total",
            "Requests unpart refused, by error code and, for limits, the limit's name.",
            &["reason", "limit"],
        )?,
        upload_seconds: histogram(
            "unpart_upload_duration_seconds",
            "Duration of stream-mode uploads, from the request head to the end of the response.",
            UPLOAD_BUCKETS,
        )?,
        upstream_seconds: histogram(
            "unpart_upstream_duration_seconds",
            "From the request head sent upstream to the backend's response head.",
            UPSTREAM_BUCKETS,
        )?,
        jemalloc: {
            let g = IntGaugeVec::new(
                Opts::new(
                    "unpart_jemalloc_bytes",
                    "jemalloc statistics: allocated, active, resident, mapped, retained, metadata.",
                ),
                &["stat"],
            )?;
            registry.register(Box::new(g.clone()))?;
            g
        },
        tasks: {
            let g = IntGaugeVec::new(
                Opts::new(
                    "unpart_runtime_alive_tasks",
                    "Live tokio tasks per runtime (a leak shows as steady growth).",
                ),
                &["runtime"],
            )?;
            registry.register(Box::new(g.clone()))?;
            g
        },
        profiles: counter(
            "unpart_profiles_total",
            "Profiles served by the admin listener, by kind and result.",
            &["kind", "result"],
        )?,
        up_since: {
            let g = Gauge::new(
                "unpart_start_time_seconds",
                "Start time of the process since the Unix epoch, in seconds.",
            )?;
            registry.register(Box::new(g.clone()))?;
            g
        },
        registry,
    };
    #[cfg(target_os = "linux")]
    m.registry.register(Box::new(
        prometheus::process_collector::ProcessCollector::for_self(),
    ))?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    m.up_since.set(now.as_secs_f64());
    Ok(m)
}

/// The process-wide metrics. Registration cannot fail with these fixed names; if it ever
/// did, unpart would rather run without metrics than not run.
pub fn get() -> Option<&'static Metrics> {
    static M: OnceLock<Option<Metrics>> = OnceLock::new();
    M.get_or_init(|| match build() {
        Ok(m) => Some(m),
        Err(e) => {
            log::error!("metrics disabled: {e}");
            None
        }
    })
    .as_ref()
}

/// What the access log knows about one finished request.
pub struct Finished<'a> {
    pub route: &'a str,
    pub outcome: &'a str,
    /// Parsed by unpart itself (stream mode) rather than proxied by pingora.
    pub upload: bool,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub file_bytes: u64,
    pub duration: Duration,
    pub upstream: Option<Duration>,
}

pub fn finished(f: &Finished) {
    let Some(m) = get() else { return };
    m.requests.with_label_values(&[f.route, f.outcome]).inc();
    m.bytes_in.with_label_values(&[f.route]).inc_by(f.bytes_in);
    m.bytes_out
        .with_label_values(&[f.route])
        .inc_by(f.bytes_out);
    if f.upload {
        m.uploads.with_label_values(&[f.route, f.outcome]).inc();
        m.file_bytes
            .with_label_values(&[f.route])
            .inc_by(f.file_bytes);
        m.upload_seconds
            .with_label_values(&[f.route])
            .observe(f.duration.as_secs_f64());
    }
    if let Some(u) = f.upstream {
        m.upstream_seconds
            .with_label_values(&[f.route])
            .observe(u.as_secs_f64());
    }
}

pub fn rejected(reason: &str, limit: Option<&str>) {
    if let Some(m) = get() {
        m.rejections
            .with_label_values(&[reason, limit.unwrap_or("")])
            .inc();
    }
}

pub fn profile(kind: &str, result: &str) {
    if let Some(m) = get() {
        m.profiles.with_label_values(&[kind, result]).inc();
    }
}

/// Counts an upload in flight for as long as it lives.
pub struct InFlight(());

impl InFlight {
    pub fn start() -> InFlight {
        if let Some(m) = get() {
            m.in_flight.inc();
        }
        InFlight(())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if let Some(m) = get() {
            m.in_flight.dec();
        }
    }
}

/// The Prometheus text exposition of everything, allocator statistics read now.
pub fn render() -> Vec<u8> {
    let Some(m) = get() else {
        return b"# metrics are disabled (see the log)\n".to_vec();
    };
    if let Some(s) = crate::admin::heap::stats() {
        for (k, v) in [
            ("allocated", s.allocated),
            ("active", s.active),
            ("resident", s.resident),
            ("mapped", s.mapped),
            ("retained", s.retained),
            ("metadata", s.metadata),
        ] {
            m.jemalloc.with_label_values(&[k]).set(v as i64);
        }
    }
    // pingora without work stealing runs one runtime per thread: sum them by service.
    let mut by_name = std::collections::BTreeMap::new();
    for (what, _, n) in crate::admin::tasks::alive_tasks() {
        *by_name.entry(what).or_insert(0) += n as i64;
    }
    for (what, n) in by_name {
        m.tasks.with_label_values(&[what]).set(n);
    }
    let mut out = Vec::new();
    if let Err(e) = TextEncoder::new().encode(&m.registry.gather(), &mut out) {
        log::warn!("metrics encoding failed: {e}");
    }
    out
}
