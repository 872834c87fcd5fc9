//! The `/debug/pprof/` index page, laid out like Go's.

const PROFILES: &[(&str, &str, &str)] = &[
    (
        "profile?seconds=30",
        "profile",
        "CPU profile (gzipped pprof protobuf). Add ?seconds=N; at most admin.profile_max_seconds.",
    ),
    (
        "flamegraph?seconds=30",
        "flamegraph",
        "The same CPU profile drawn as an SVG flame graph.",
    ),
    (
        "heap",
        "heap",
        "In-use heap (jemalloc's sampled live allocations), allocator frames dropped.",
    ),
    (
        "goroutine?debug=1",
        "goroutine",
        "Requests in flight and a dump of every tokio task, as text.",
    ),
    (
        "cmdline",
        "cmdline",
        "The command line, arguments separated by NUL bytes.",
    ),
    (
        "symbol",
        "symbol",
        "Address to function name lookups (POST addresses joined by +).",
    ),
    (
        "allocs",
        "allocs",
        "Not available (501): jemalloc samples live allocations only.",
    ),
    ("block", "block", "Not available (501)."),
    ("mutex", "mutex", "Not available (501)."),
    ("trace", "trace", "Not available (501)."),
];

pub fn html() -> Vec<u8> {
    let mut s = String::from(
        "<html>\n<head>\n<title>/debug/pprof/</title>\n</head>\n<body>\n/debug/pprof/<br>\n<br>\n\
         Types of profiles available:\n<table>\n<thead><td>Profile</td></thead>\n",
    );
    for (href, name, _) in PROFILES {
        s.push_str(&format!(
            "<tr><td><a href=\"{href}\">{name}</a></td></tr>\n"
        ));
    }
    s.push_str("</table>\n<br>\n<p>Profile Descriptions:</p>\n<ul>\n");
    for (_, name, what) in PROFILES {
        s.push_str(&format!(
            "<li><div class=profile-name>{name}: </div> {what}</li>\n"
        ));
    }
    s.push_str(
        "</ul>\n<p>Also: <a href=\"/metrics\">/metrics</a> (Prometheus), /healthz, /readyz.</p>\n\
         </body>\n</html>\n",
    );
    s.into_bytes()
}
