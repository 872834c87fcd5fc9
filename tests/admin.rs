//! The admin listener on the real binary: health, Prometheus metrics, Go-style profiles that
//! decode as pprof protobuf with unpart's own function names, their safety limits, and the
//! memory they leave behind (none worth counting).

mod support;

use std::io::Read as _;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use pprof::protos::Message as _;
use support::{raw_request, Response, Unpart, Upstream};

fn get(addr: &str, path: &str) -> Response {
    get_with(addr, path, "")
}

fn get_with(addr: &str, path: &str, headers: &str) -> Response {
    raw_request(
        addr,
        format!("GET {path} HTTP/1.1\r\nHost: admin\r\n{headers}\r\n").as_bytes(),
    )
    .unwrap_or_else(|e| panic!("GET {path}: {e}"))
}

fn body(r: &Response) -> String {
    String::from_utf8_lossy(&r.body).into_owned()
}

fn decode(gz: &[u8]) -> pprof::protos::Profile {
    let mut raw = Vec::new();
    flate2::read::GzDecoder::new(gz)
        .read_to_end(&mut raw)
        .expect("the profile is gzipped");
    pprof::protos::Profile::decode(&raw[..]).expect("the profile is a pprof protobuf")
}

fn string(p: &pprof::protos::Profile, i: i64) -> &str {
    p.string_table.get(i as usize).map_or("", |s| s.as_str())
}

fn sample_types(p: &pprof::protos::Profile) -> Vec<(String, String)> {
    p.sample_type
        .iter()
        .map(|t| (string(p, t.ty).to_string(), string(p, t.unit).to_string()))
        .collect()
}

fn function_names(p: &pprof::protos::Profile) -> Vec<String> {
    p.function
        .iter()
        .map(|f| string(p, f.name).to_string())
        .collect()
}

/// The names of a sample's frames, leaf first.
fn stack(p: &pprof::protos::Profile, s: &pprof::protos::Sample) -> Vec<String> {
    s.location_id
        .iter()
        .filter_map(|id| p.location.iter().find(|l| l.id == *id))
        .flat_map(|l| l.line.iter())
        .filter_map(|line| p.function.iter().find(|f| f.id == line.function_id))
        .map(|f| string(p, f.name).to_string())
        .collect()
}

/// Uploads through unpart in a loop until stopped, so a CPU profile has unpart code to see.
struct Load {
    stop: Arc<AtomicBool>,
    thread: Option<thread::JoinHandle<usize>>,
}

impl Load {
    fn start(addr: &str, mib: usize) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let (s, addr) = (stop.clone(), addr.to_string());
        let thread = thread::spawn(move || {
            let data = vec![b'x'; mib << 20];
            let form = support::form(
                "ldb",
                &[("t", None, None, b"v"), ("f", Some("a.bin"), None, &data)],
            );
            let req = support::post("/load", &support::mp("ldb"), &form, "");
            let deadline = Instant::now() + Duration::from_secs(60);
            let mut n = 0;
            while !s.load(Ordering::Relaxed) && Instant::now() < deadline {
                if raw_request(&addr, &req).is_ok_and(|r| r.status == 200) {
                    n += 1;
                }
            }
            n
        });
        Load {
            stop,
            thread: Some(thread),
        }
    }

    fn finish(mut self) -> usize {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.take().map_or(0, |t| t.join().unwrap_or(0))
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// `n` uploads held in flight by a backend that stopped reading: unpart holds their buffers,
/// live allocations for a heap profile to see.
fn stalled_uploads(u: &Unpart, up: &Upstream, n: usize) -> Vec<thread::JoinHandle<()>> {
    // Long enough for 32 uploads to start on a loaded 2-core machine and a profile to run.
    up.set_behaviour(support::Behaviour::StopReading(
        64 * 1024,
        Duration::from_secs(10),
    ));
    let handles = (0..n)
        .map(|i| {
            let addr = u.addr.clone();
            thread::spawn(move || {
                let data = vec![b's'; 2 << 20];
                let form = support::form("sb", &[("f", Some("s.bin"), None, &data)]);
                let _ = raw_request(
                    &addr,
                    &support::post(&format!("/stalled/{i}"), &support::mp("sb"), &form, ""),
                );
            })
        })
        .collect();
    let deadline = Instant::now() + support::TIMEOUT;
    while !body(&get(&u.admin, "/metrics")).contains(&format!("unpart_uploads_in_flight {n}")) {
        assert!(
            Instant::now() < deadline,
            "the uploads never were all in flight"
        );
        thread::sleep(Duration::from_millis(50));
    }
    handles
}

const FAST: &str = "profile_min_interval: 0, profile_max_seconds: 10";

#[test]
fn health_readiness_and_the_index() {
    let up = Upstream::start();
    let u = Unpart::start(&up.addr, "");
    assert_eq!(body(&get(&u.admin, "/healthz")), "ok\n");
    let r = get(&u.admin, "/readyz");
    assert_eq!((r.status, body(&r).as_str()), (200, "ready\n"));

    let r = get(&u.admin, "/debug/pprof/");
    assert_eq!(r.status, 200);
    assert!(r
        .header("content-type")
        .unwrap_or("")
        .starts_with("text/html"));
    let html = body(&r);
    for p in [
        "profile",
        "heap",
        "goroutine",
        "cmdline",
        "symbol",
        "flamegraph",
    ] {
        assert!(
            html.contains(&format!("<a href=\"{p}")),
            "index lacks {p}: {html}"
        );
    }
    for p in ["allocs", "block", "mutex", "trace"] {
        let r = get(&u.admin, &format!("/debug/pprof/{p}"));
        assert_eq!(r.status, 501, "{p}");
        assert_eq!(body(&r).trim().lines().count(), 1, "{p}: one line");
        assert!(body(&r).contains(p), "{p}: {}", body(&r));
    }
    assert_eq!(get(&u.admin, "/debug/pprof/nothing").status, 404);
    let r = raw_request(&u.admin, b"DELETE /metrics HTTP/1.1\r\nHost: a\r\n\r\n").unwrap();
    assert_eq!(r.status, 405);

    // cmdline as Go serves it: the arguments separated by NUL bytes.
    let r = get(&u.admin, "/debug/pprof/cmdline");
    let args: Vec<&str> = std::str::from_utf8(&r.body).unwrap().split('\0').collect();
    assert!(args[0].ends_with("unpart"), "{args:?}");
    assert_eq!(args[1], "-c");

    // symbol: the bare GET says symbols exist; lookups answer per address, bad input is a 400.
    assert_eq!(
        body(&get(&u.admin, "/debug/pprof/symbol")),
        "num_symbols: 1\n"
    );
    let r = raw_request(
        &u.admin,
        b"POST /debug/pprof/symbol HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\n0x1",
    )
    .unwrap();
    assert_eq!(r.status, 200);
    let r = raw_request(
        &u.admin,
        b"POST /debug/pprof/symbol HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nxyz!!",
    )
    .unwrap();
    assert_eq!(r.status, 400);
    assert_eq!(body(&r).trim().lines().count(), 1);

    // Not ready when the backend is gone; alive all the same.
    drop(up);
    // Port 1: nobody listens there (a freed ephemeral port could be another test's).
    let u2 = Unpart::start("127.0.0.1:1", "");
    let r = get(&u2.admin, "/readyz");
    assert_eq!(r.status, 503);
    assert!(body(&r).contains("upstream"), "{}", body(&r));
    assert_eq!(get(&u2.admin, "/healthz").status, 200);
}

#[test]
fn metrics_count_requests_uploads_and_rejections() {
    let up = Upstream::start();
    let u = Unpart::start(&up.addr, "routes:\n  - prefix: /up\n");
    let form = support::form(
        "mb",
        &[("a", None, None, b"1"), ("f", Some("x"), None, b"12345")],
    );
    let r = raw_request(
        &u.addr,
        &support::post("/up/1", &support::mp("mb"), &form, ""),
    )
    .unwrap();
    assert_eq!(r.status, 200);
    let late = support::form(
        "mb",
        &[("f", Some("x"), None, b"12345"), ("late", None, None, b"1")],
    );
    let r = raw_request(
        &u.addr,
        &support::post("/up/2", &support::mp("mb"), &late, ""),
    )
    .unwrap();
    assert_eq!(r.status, 422);
    raw_request(&u.addr, b"GET /plain HTTP/1.1\r\nHost: t\r\n\r\n").unwrap();

    // The access log (and the metrics beside it) are written after each response, maybe on
    // the other worker thread: wait for every line.
    let wants = [
        "process_resident_memory_bytes ".to_string(),
        "process_cpu_seconds_total ".into(),
        "process_open_fds ".into(),
        "unpart_jemalloc_bytes{stat=\"resident\"} ".into(),
        "unpart_jemalloc_bytes{stat=\"allocated\"} ".into(),
        "unpart_requests_total{outcome=\"proxied\",route=\"/\"} 1".into(),
        "unpart_requests_total{outcome=\"ok\",route=\"/up\"} 1".into(),
        "unpart_requests_total{outcome=\"late_field\",route=\"/up\"} 1".into(),
        "unpart_uploads_total{outcome=\"ok\",route=\"/up\"} 1".into(),
        "unpart_rejections_total{limit=\"\",reason=\"late_field\"} 1".into(),
        "unpart_upload_file_bytes_total{route=\"/up\"} 10".into(),
        "unpart_uploads_in_flight 0".into(),
        "unpart_upload_duration_seconds_bucket{route=\"/up\",le=\"+Inf\"} 2".into(),
        "unpart_upstream_duration_seconds_count{route=\"/up\"} 1".into(),
        "unpart_upstream_duration_seconds_count{route=\"/\"} 1".into(),
        format!(
            "unpart_received_bytes_total{{route=\"/up\"}} {}",
            form.len() + late.len()
        ),
    ];
    let deadline = Instant::now() + support::TIMEOUT;
    let text = loop {
        let r = get(&u.admin, "/metrics");
        assert_eq!(r.status, 200);
        assert!(r
            .header("content-type")
            .unwrap_or("")
            .starts_with("text/plain"));
        let t = body(&r);
        let missing: Vec<&String> = wants.iter().filter(|w| !t.contains(w.as_str())).collect();
        if missing.is_empty() {
            break t;
        }
        assert!(
            Instant::now() < deadline,
            "/metrics lacks {missing:?}:\n{t}"
        );
        thread::sleep(Duration::from_millis(50));
    };
    let rss: f64 = text
        .lines()
        .find_map(|l| l.strip_prefix("process_resident_memory_bytes "))
        .and_then(|v| v.trim().parse().ok())
        .expect("a resident memory figure");
    assert!(rss > 1e6, "{rss}");
}

#[test]
fn uploads_in_flight_and_the_task_dump() {
    let up = Upstream::start();
    // The backend stops reading after 64 KiB: the upload stays in flight while we look.
    up.set_behaviour(support::Behaviour::StopReading(
        64 * 1024,
        Duration::from_secs(10),
    ));
    let u = Unpart::start_with_admin(&up.addr, "task_dump: true, profile_min_interval: 0", "");
    let data = vec![b'z'; 8 << 20];
    let form = support::form("tb", &[("f", Some("big"), None, &data)]);
    let req = support::post("/stuck/upload", &support::mp("tb"), &form, "");
    let addr = u.addr.clone();
    let client = thread::spawn(move || raw_request(&addr, &req));
    let deadline = Instant::now() + support::TIMEOUT;
    loop {
        let m = body(&get(&u.admin, "/metrics"));
        if m.contains("unpart_uploads_in_flight 1") {
            break;
        }
        assert!(Instant::now() < deadline, "no upload in flight:\n{m}");
        thread::sleep(Duration::from_millis(20));
    }
    // tokio traces only the tasks it can take at that instant: one being woken just then can
    // be missing from a dump (seen once in CI). The upload stays in flight for seconds; the
    // next dump has it.
    let mut dump = String::new();
    for _ in 0..5 {
        let r = get(&u.admin, "/debug/pprof/goroutine?debug=1");
        assert_eq!(r.status, 200);
        dump = body(&r);
        let traced = dump.contains("unpart::upload::Upload") || !cfg!(target_arch = "x86_64");
        if traced && dump.contains("requests in flight: 1") {
            break;
        }
        thread::sleep(Duration::from_millis(200));
    }
    assert!(dump.contains("requests in flight: 1"), "{dump}");
    assert!(dump.contains("POST /stuck/upload"), "{dump}");
    assert!(dump.contains(" live task(s)"), "{dump}");
    // Built with tokio_unstable (.cargo/config.toml) and turned on: the proxy's tasks with
    // their stacks.
    if cfg!(target_arch = "x86_64") {
        assert!(dump.contains("task(s) traced"), "{dump}");
        assert!(dump.contains("unpart::upload::Upload"), "{dump}");
    }
    let _ = client.join();
}

#[test]
fn task_traces_are_off_by_default_and_live_tasks_are_counted() {
    let up = Upstream::start();
    let u = Unpart::start(&up.addr, "");
    // A request first, so the proxy's runtime is known.
    let form = support::form("tc", &[("f", Some("f"), None, b"x")]);
    let r = raw_request(&u.addr, &support::post("/u", &support::mp("tc"), &form, "")).unwrap();
    assert_eq!(r.status, 200);
    // The request leaves the in-flight list in pingora's last hook, which runs after the
    // response's last byte is written: the client can ask before that (seen once in CI).
    let mut dump = String::new();
    for _ in 0..50 {
        dump = body(&get(&u.admin, "/debug/pprof/goroutine?debug=1"));
        if dump.contains("requests in flight: 0") {
            break;
        }
        thread::sleep(Duration::from_millis(20));
    }
    assert!(dump.contains("requests in flight: 0"), "{dump}");
    assert!(dump.contains("proxy runtime "), "{dump}");
    assert!(dump.contains(" live task(s)"), "{dump}");
    assert!(dump.contains("task traces are off"), "{dump}");
    assert!(!dump.contains("traced"), "{dump}");
    let m = body(&get(&u.admin, "/metrics"));
    assert!(
        m.lines()
            .any(|l| l.starts_with("unpart_runtime_alive_tasks{runtime=\"proxy\"} ")),
        "{m}"
    );
}

#[test]
fn cpu_profile_decodes_with_unpart_names_and_is_one_at_a_time() {
    let up = Upstream::start();
    let u = Unpart::start_with_admin(&up.addr, FAST, "");
    let load = Load::start(&u.addr, 8);
    let admin = u.admin.clone();
    let first = thread::spawn(move || get(&admin, "/debug/pprof/profile?seconds=3"));
    // A second profile while the first runs is refused at once, as Go does. Either can be
    // the one that runs on a loaded machine; exactly one is refused.
    thread::sleep(Duration::from_millis(500));
    let second = get(&u.admin, "/debug/pprof/profile?seconds=3");
    let first = first.join().unwrap();
    let (r, refused) = if second.status == 409 {
        (first, second)
    } else {
        (second, first)
    };
    assert_eq!(refused.status, 409, "{}", body(&refused));
    assert_eq!(body(&refused).trim().lines().count(), 1);
    assert_eq!(r.status, 200, "{}", body(&r));
    let p = decode(&r.body);
    assert_eq!(
        sample_types(&p),
        [
            ("samples".into(), "count".into()),
            ("cpu".into(), "nanoseconds".into())
        ]
    );
    assert!(!p.sample.is_empty(), "no samples");
    assert!(p.duration_nanos >= 2_000_000_000, "{}", p.duration_nanos);
    let names = function_names(&p);
    assert!(
        names.iter().any(|n| n.contains("unpart::")),
        "no unpart function in the profile: {names:?}"
    );

    let r = get(&u.admin, "/debug/pprof/flamegraph?seconds=1");
    let uploads = load.finish();
    assert!(uploads > 0);
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-type"), Some("image/svg+xml"));
    assert!(body(&r).contains("<svg"), "{}", body(&r));
    assert!(
        body(&r).contains("unpart::"),
        "no unpart frame in the flame graph"
    );
}

#[test]
fn profile_limits_refuse_with_a_reason() {
    let up = Upstream::start();
    let u = Unpart::start_with_admin(
        &up.addr,
        "profile_min_interval: 60, profile_max_seconds: 5",
        "",
    );
    for (q, status, why) in [
        ("seconds=6", 400, "profile_max_seconds"),
        ("seconds=abc", 400, "not a whole number"),
        ("seconds=0", 400, "not a whole number"),
    ] {
        let r = get(&u.admin, &format!("/debug/pprof/profile?{q}"));
        assert_eq!(r.status, status, "{q}");
        assert!(body(&r).contains(why), "{q}: {}", body(&r));
        assert_eq!(body(&r).trim().lines().count(), 1);
    }
    assert_eq!(get(&u.admin, "/debug/pprof/profile?seconds=1").status, 200);
    let r = get(&u.admin, "/debug/pprof/profile?seconds=1");
    assert_eq!(r.status, 429, "{}", body(&r));
    assert!(r.header("retry-after").is_some());
    // The heap profile has its own turn.
    assert_eq!(get(&u.admin, "/debug/pprof/heap").status, 200);
    assert_eq!(get(&u.admin, "/debug/pprof/heap").status, 429);
}

#[test]
fn heap_profile_has_unpart_frames_and_no_allocator_on_top() {
    let up = Upstream::start();
    let u = Unpart::start_with_admin(&up.addr, FAST, "");
    let stalled = stalled_uploads(&u, &up, 32);
    let r = get(&u.admin, "/debug/pprof/heap");
    for h in stalled {
        let _ = h.join();
    }
    assert_eq!(r.status, 200, "{}", body(&r));
    let p = decode(&r.body);
    assert_eq!(sample_types(&p), [("inuse_space".into(), "bytes".into())]);
    assert!(!p.sample.is_empty(), "no samples");
    let names = function_names(&p);
    assert!(
        names.iter().any(|n| n.contains("unpart::")),
        "no unpart function: {names:?}"
    );
    for s in &p.sample {
        let st = stack(&p, s);
        let top = st.first().map_or("", |n| n.as_str());
        for a in [
            "_rjem_",
            "je_",
            "__rust_alloc",
            "__rust_realloc",
            "tikv_jemallocator",
        ] {
            assert!(!top.starts_with(a), "allocator frame on top: {st:?}");
        }
    }
}

#[test]
fn a_token_guards_everything_but_health() {
    let up = Upstream::start();
    let token = "s3cret-token-0123456789";
    let u = Unpart::start_with_admin(&up.addr, &format!("token: {token}"), "");
    assert_eq!(get(&u.admin, "/healthz").status, 200);
    assert_eq!(get(&u.admin, "/readyz").status, 200);
    for path in [
        "/metrics",
        "/debug/pprof/",
        "/debug/pprof/heap",
        "/debug/pprof/profile?seconds=1",
    ] {
        let r = get(&u.admin, path);
        assert_eq!(r.status, 401, "{path}");
        assert_eq!(r.header("www-authenticate"), Some("Bearer"));
        let r = get_with(
            &u.admin,
            path,
            "Authorization: Bearer wrong-token-0123456789\r\n",
        );
        assert_eq!(r.status, 401, "{path}");
    }
    let r = get_with(
        &u.admin,
        "/metrics",
        &format!("Authorization: Bearer {token}\r\n"),
    );
    assert_eq!(r.status, 200);
}

/// Reads VmRSS until it is at most `limit` KiB or `within` passes; returns the last figure.
fn rss_settles(u: &Unpart, limit: u64, within: Duration) -> u64 {
    let deadline = Instant::now() + within;
    loop {
        let rss = u.status_kib("VmRSS:");
        if rss <= limit || Instant::now() >= deadline {
            return rss;
        }
        thread::sleep(Duration::from_millis(250));
    }
}

#[test]
fn profiles_and_bursts_leave_no_memory_behind() {
    let up = Upstream::start();
    let u = Unpart::start_with_admin(&up.addr, FAST, "");
    // Warm up with the same traffic as below (8 concurrent uploaders), so the connection pool
    // and per-connection buffers exist before "before": they are steady state, not a leak.
    let burst = |secs| {
        let loads: Vec<Load> = (0..8).map(|_| Load::start(&u.addr, 16)).collect();
        thread::sleep(Duration::from_secs(secs));
        for l in loads {
            l.finish();
        }
    };
    burst(2);
    thread::sleep(Duration::from_secs(2));
    let before = u.status_kib("VmRSS:");

    let load = Load::start(&u.addr, 8);
    let r = get(&u.admin, "/debug/pprof/profile?seconds=3");
    load.finish();
    assert_eq!(r.status, 200);
    assert_eq!(get(&u.admin, "/debug/pprof/heap").status, 200);
    assert_eq!(
        get(&u.admin, "/debug/pprof/flamegraph?seconds=1").status,
        200
    );
    let peak = u.status_kib("VmHWM:");
    let after = rss_settles(&u, before + 8 * 1024, Duration::from_secs(40));
    eprintln!("RSS before {before} KiB, after profiles {after} KiB, peak {peak} KiB");
    assert!(
        after <= before + 8 * 1024,
        "RSS {after} KiB stayed above {before} KiB + 8 MiB after the profiles"
    );

    // A burst of concurrent uploads: memory goes back within seconds, not at some later GC.
    burst(3);
    let settled = rss_settles(&u, before + 8 * 1024, Duration::from_secs(20));
    eprintln!("RSS after the burst {settled} KiB");
    assert!(
        settled <= before + 8 * 1024,
        "RSS {settled} KiB after the burst"
    );
}

/// `go tool pprof`, unmodified, reads both profiles and prints unpart's function names.
/// CI installs Debian's golang-go (.ci/run); elsewhere the test says so and skips.
#[test]
fn go_tool_pprof_reads_the_profiles() {
    let go_ok = Command::new("go")
        .arg("version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !go_ok {
        eprintln!("SKIPPED go_tool_pprof_reads_the_profiles: `go` is not installed (apt-get install golang-go)");
        return;
    }
    let up = Upstream::start();
    let u = Unpart::start_with_admin(&up.addr, FAST, "");
    let home = u.dir.join("gohome");
    std::fs::create_dir_all(&home).unwrap();
    let mut load = Some(Load::start(&u.addr, 8));
    let mut stalled = Vec::new();
    for (path, want) in [
        ("/debug/pprof/profile?seconds=3", "unpart::"),
        ("/debug/pprof/heap", "unpart::"),
    ] {
        if path.ends_with("heap") {
            load.take().map(Load::finish);
            stalled = stalled_uploads(&u, &up, 32);
        }
        let url = format!("http://{}{path}", u.admin);
        let out = Command::new("go")
            .args(["tool", "pprof", "-top", &url])
            .env("HOME", &home)
            .env("PPROF_TMPDIR", &home)
            .env("GOCACHE", home.join("cache"))
            .output()
            .expect("run go tool pprof");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{url}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(text.contains(want), "{url}: no `{want}` in:\n{text}");
    }
    // `go tool pprof -http` opens its web UI on the heap profile (the top table: the graph
    // view also needs graphviz). Its port is picked by binding and freeing one, so another
    // test may take it first: then pprof exits, and it is tried again on another.
    let url = format!("http://{}/debug/pprof/heap", u.admin);
    let mut page = None;
    for _ in 0..3 {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .unwrap()
            .port();
        let mut web = Command::new("go")
            .args(["tool", "pprof", "-no_browser"])
            .arg(format!("-http=127.0.0.1:{port}"))
            .arg(&url)
            .env("HOME", &home)
            .env("PPROF_TMPDIR", &home)
            .env("GOCACHE", home.join("cache"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("run go tool pprof -http");
        let ui = format!("127.0.0.1:{port}");
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        let mut last = String::new();
        page = loop {
            let req = format!("GET /ui/top HTTP/1.1\r\nHost: {ui}\r\nConnection: close\r\n\r\n");
            // Only pprof's own answer counts, not that of whoever else holds the port.
            if let Ok(r) = raw_request(&ui, req.as_bytes()) {
                let body = String::from_utf8_lossy(&r.body).into_owned();
                if r.status == 200 && body.contains("unpart") {
                    break Some(r);
                }
                last = format!("{}: {body}", r.status);
            }
            if web.try_wait().is_ok_and(|st| st.is_some()) {
                break None;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "pprof -http did not show unpart's heap; last answer: {last}"
            );
            std::thread::sleep(Duration::from_millis(100));
        };
        let _ = web.kill();
        let _ = web.wait();
        if page.is_some() {
            break;
        }
    }
    assert!(
        page.is_some(),
        "pprof -http exited three times without serving"
    );
    for h in stalled {
        let _ = h.join();
    }
}
