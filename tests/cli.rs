//! The command line: `-t` checks a config and names the bad key, overrides win over the file,
//! `--help` and `--version` work, and no arguments means the embedded defaults.

mod support;

use std::process::Command;

fn unpart(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_unpart"))
        .args(args)
        .output()
        .expect("run unpart");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A config file in a directory of its own, removed on drop.
struct Conf(std::path::PathBuf);

impl Conf {
    fn to_str(&self) -> Option<&str> {
        self.0.to_str()
    }
}

impl Drop for Conf {
    fn drop(&mut self) {
        if let Some(dir) = self.0.parent() {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

fn conf(name: &str, text: &str) -> Conf {
    static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("unpart-cli-{}-{n}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    Conf(p)
}

#[test]
fn check_mode_accepts_the_shipped_config_and_defaults() {
    let shipped = concat!(env!("CARGO_MANIFEST_DIR"), "/conf/unpart.yaml");
    let (code, out, err) = unpart(&["-t", "-c", shipped]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("configuration OK"));
    let (code, _, err) = unpart(&["-t"]);
    assert_eq!(code, 0, "{err}");
}

#[test]
fn check_mode_names_the_bad_key() {
    for (name, text, want) in [
        (
            "typo.yaml",
            "upstrem: 127.0.0.1:1\n",
            "unknown field `upstrem`",
        ),
        (
            "nested.yaml",
            "limits:\n  file_byte: 1\n",
            "unknown field `file_byte`",
        ),
        (
            "spool.yaml",
            "mode: spool\nspool: {dir: var/tmp}\n",
            "spool.dir: `var/tmp` must be an absolute path",
        ),
        (
            "route.yaml",
            "routes:\n  - prefix: /x\n    mode: spol\n",
            "unknown variant `spol`",
        ),
        (
            "hdr.yaml",
            "headers: {file_name: Filename}\n",
            "headers.file_name",
        ),
        ("addr.yaml", "listen: 8080\n", "listen:"),
        (
            "admin.yaml",
            "admin: {tokn: x}\n",
            "admin: unknown field `tokn`",
        ),
        (
            "token.yaml",
            "admin: {listen: 0.0.0.0:6060, token: short}\n",
            "admin.token",
        ),
    ] {
        let p = conf(name, text);
        let (code, _, err) = unpart(&["-t", "-c", p.to_str().unwrap()]);
        assert_eq!(code, 1, "{name}");
        assert!(err.contains(want), "{name}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "{name}: one line: {err}");
    }
    let (code, _, err) = unpart(&["-t", "-c", "/nonexistent/unpart.yaml"]);
    assert_eq!(code, 1);
    assert!(err.contains("cannot read"), "{err}");
}

#[test]
fn command_line_overrides_win() {
    let p = conf("ok.yaml", "listen: 127.0.0.1:1234\n");
    let (code, _, err) = unpart(&["-t", "-c", p.to_str().unwrap(), "--listen", "nonsense"]);
    assert_eq!(code, 1);
    assert!(err.contains("listen: `nonsense`"), "{err}");
    let (code, _, err) = unpart(&[
        "-t",
        "--upstream",
        "unix:/run/app.sock",
        "--admin",
        "127.0.0.1:7070",
    ]);
    assert_eq!(code, 0, "{err}");
    let (code, _, err) = unpart(&["-t", "--upstream", "no-port"]);
    assert_eq!(code, 1);
    assert!(err.contains("upstream:"), "{err}");
}

#[test]
fn help_and_version() {
    let (code, out, _) = unpart(&["--help"]);
    assert_eq!(code, 0);
    for flag in [
        "--conf",
        "--test",
        "--listen",
        "--upstream",
        "--admin",
        "--daemon",
        "--upgrade",
    ] {
        assert!(out.contains(flag), "--help lacks {flag}");
    }
    let (code, out, _) = unpart(&["--version"]);
    assert_eq!(code, 0);
    let mut lines = out.lines();
    assert_eq!(
        lines.next(),
        Some(format!("unpart {}", env!("CARGO_PKG_VERSION")).as_str())
    );
    let features = lines.next().unwrap_or("");
    assert!(features.starts_with("features: "), "{out}");
    assert!(features.contains("tls"), "default build has tls: {out}");
}

#[test]
fn access_log_has_one_line_per_request() {
    let up = support::Upstream::start();
    let u = support::Unpart::start(&up.addr, "");
    let body = support::form("b", &[("f", Some("x"), None, b"12345")]);
    support::raw_request(&u.addr, &support::post("/up", &support::mp("b"), &body, "")).unwrap();
    support::raw_request(&u.addr, b"GET /plain?x=1 HTTP/1.1\r\nHost: t\r\n\r\n").unwrap();
    let deadline = std::time::Instant::now() + support::TIMEOUT;
    loop {
        let log = u.log_text();
        let access: Vec<&str> = log.lines().filter(|l| l.contains(" access]")).collect();
        // Each line is written after its response, maybe on the other worker thread: found
        // by content, not by order.
        let post = access.iter().find(|l| l.contains("POST /up "));
        let get = access.iter().find(|l| l.contains("GET /plain?x=1 "));
        if let (Some(post), Some(get)) = (post, get) {
            assert_eq!(access.len(), 2, "{access:?}");
            assert!(
                post.contains("POST /up 200") && post.contains(" ok"),
                "{post}"
            );
            assert!(post.contains(&format!("in={}", body.len())), "{post}");
            assert!(
                get.contains("GET /plain?x=1 200") && get.contains("proxied"),
                "{get}"
            );
            assert!(access.iter().all(|l| l.contains("ms ")));
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no access lines in:\n{log}"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// unpart started with `-d` on ephemeral ports, in a temp dir of its own (`{d}` in `extra`);
/// killed, and the dir removed, on drop.
struct Daemon {
    dir: std::path::PathBuf,
    listen: String,
    pid: i32,
}

impl Daemon {
    /// `open_dir`: make the dir writable by anyone, for a daemon that drops privileges.
    fn start(upstream: &str, tag: &str, extra: &str, open_dir: bool) -> Daemon {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("unpart-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        if open_dir {
            std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).unwrap();
        }
        let port = || {
            std::net::TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .to_string()
        };
        let (listen, admin) = (port(), port());
        let pid_file = dir.join("unpart.pid");
        let conf = dir.join("d.yaml");
        std::fs::write(
            &conf,
            format!(
                "listen: {listen}\nadmin: {admin}\nupstream: {upstream}\npid_file: {}\nupgrade_sock: {d}/u.sock\n{}",
                pid_file.display(),
                extra.replace("{d}", &dir.display().to_string()),
                d = dir.display()
            ),
        )
        .unwrap();
        // -d: the command returns while the daemon keeps serving. The daemon keeps its
        // standard streams, so they must not be pipes this test waits on.
        let status = Command::new(env!("CARGO_BIN_EXE_unpart"))
            .args(["-d", "-c", conf.to_str().unwrap()])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .expect("run unpart -d");
        assert!(status.success());
        let deadline = std::time::Instant::now() + support::TIMEOUT;
        let mut pid = None;
        let mut ready = false;
        while std::time::Instant::now() < deadline {
            // /readyz: the proxy listener accepts too, not only the admin one.
            ready = support::raw_request(&admin, b"GET /readyz HTTP/1.1\r\nHost: a\r\n\r\n")
                .is_ok_and(|r| r.status == 200);
            pid = std::fs::read_to_string(&pid_file)
                .ok()
                .and_then(|p| p.trim().parse::<i32>().ok());
            if ready && pid.is_some() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        let Some(pid) = pid else {
            let _ = std::fs::remove_dir_all(&dir);
            panic!("the daemon wrote no pid file");
        };
        // Dropped (killed, its dir removed) if it never became ready.
        let d = Daemon { dir, listen, pid };
        assert!(ready, "the daemon never became ready");
        d
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-KILL", &self.pid.to_string()])
            .status();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[test]
fn daemon_mode_detaches_and_serves() {
    let up = support::Upstream::start();
    let d = Daemon::start(&up.addr, "daemon", "", false);
    let resp = support::raw_request(&d.listen, b"GET /d HTTP/1.1\r\nHost: a\r\n\r\n").unwrap();
    assert_eq!(resp.status, 200);
}

/// As root with `user:` and `-d`, pingora drops to that user after startup; the spool
/// directory unpart created as root must be handed over, or every spooled upload fails.
#[test]
fn a_daemon_that_drops_to_a_user_can_still_spool() {
    use std::os::unix::fs::MetadataExt;
    // SAFETY: a plain getter.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: needs root to drop privileges");
        return;
    }
    let up = support::Upstream::start();
    let d = Daemon::start(
        &up.addr,
        "daemon-user",
        "user: nobody\ngroup: nogroup\nmode: spool\nspool: {dir: \"{d}/spool\"}\n",
        true,
    );
    // Larger than a disk block (256 KiB), so it is written to a spool file as `nobody`.
    let file = support::payload(300_000);
    let form = support::form(
        "du",
        &[("a", None, None, b"1"), ("f", Some("f"), None, &file)],
    );
    let resp = support::raw_request(
        &d.listen,
        &support::post("/u", &support::mp("du"), &form, ""),
    );
    let owner = std::fs::metadata(d.dir.join("spool")).map(|m| (m.uid(), m.mode() & 0o777));
    let proc_uid = std::fs::read_to_string(format!("/proc/{}/status", d.pid))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("Uid:"))
        .map(str::to_string);
    assert!(
        proc_uid.as_deref().is_some_and(|l| l.contains("65534")),
        "the daemon did not drop to nobody: {proc_uid:?}"
    );
    let resp = resp.unwrap();
    assert_eq!(resp.status, 200, "{}", String::from_utf8_lossy(&resp.body));
    assert_eq!(owner.unwrap(), (65534, 0o700));
}
