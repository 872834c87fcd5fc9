//! Every captured real-client body, replayed over a real socket through unpart to a real
//! upstream, must arrive as Go's `mime/multipart` saw it (tests/corpus/go_view.json): fields
//! before the file as headers, the file as the body; forms with a field after the file or a
//! second file must fail with 422 and never reach the backend as a complete request.
//! The same corpus runs with `framing: length` (exact Content-Length computed from the
//! client's) and in spool mode, where every form with one file succeeds, `file_first` too.

mod support;

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;
use support::*;

fn corpus() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/corpus")
}

fn load(name: &str) -> Value {
    let text = std::fs::read_to_string(corpus().join(name)).expect("corpus json");
    serde_json::from_str(&text).expect("json")
}

fn unhex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex"))
        .collect()
}

/// What the backend must receive for one case.
enum Want {
    Forwarded {
        fields: Vec<(Vec<u8>, Vec<u8>)>,
        file_field: Vec<u8>,
        filename: Vec<u8>,
        content_type: String,
        sha256: String,
        size: u64,
    },
    Refused(&'static str),
}

/// How the unpart under test is configured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Setup {
    Stream,
    /// Stream mode with `framing: length` and the chunked fallback.
    Length,
    Spool,
}

impl Setup {
    fn yaml(self) -> &'static str {
        match self {
            Setup::Stream => "",
            Setup::Length => "framing: length\nlength_fallback: chunked\n",
            Setup::Spool => "mode: spool\nspool: {dir: \"{dir}/spool\"}\n",
        }
    }
}

fn want(go: &Value, setup: Setup) -> Want {
    let parts = go["parts"].as_array().expect("parts");
    let first_file = parts.iter().position(|p| p["kind"] == "file");
    let fields = |ps: &[Value]| -> Vec<(Vec<u8>, Vec<u8>)> {
        ps.iter()
            .filter(|p| p["kind"] == "field")
            .map(|p| {
                (
                    unhex(p["name_hex"].as_str().unwrap()),
                    unhex(p["value_hex"].as_str().unwrap()),
                )
            })
            .collect()
    };
    let i = first_file.expect("every corpus form has a file");
    if setup == Setup::Spool {
        if parts.iter().filter(|p| p["kind"] == "file").count() > 1 {
            return Want::Refused("extra_file");
        }
    } else if let Some(after) = parts.get(i + 1) {
        return Want::Refused(if after["kind"] == "file" {
            "extra_file"
        } else {
            "late_field"
        });
    }
    let f = &parts[i];
    let ct = f["content_type"].as_str().unwrap_or("");
    Want::Forwarded {
        fields: fields(if setup == Setup::Spool {
            parts
        } else {
            &parts[..i]
        }),
        file_field: unhex(f["name_hex"].as_str().unwrap()),
        filename: unhex(f["filename_hex"].as_str().unwrap()),
        content_type: if ct.is_empty() {
            "application/octet-stream".into()
        } else {
            ct.to_string()
        },
        sha256: f["sha256"].as_str().unwrap().to_string(),
        size: f["size"].as_u64().unwrap(),
    }
}

/// The request with `?case=TAG` (or `&case=TAG`) added to its target, so the backend's record
/// of it can be told from a late one of an earlier case; and the new target.
fn tag_target(req: Vec<u8>, tag: &str) -> (Vec<u8>, String) {
    let line_end = req
        .windows(2)
        .position(|w| w == b"\r\n")
        .expect("request line");
    let line = String::from_utf8(req[..line_end].to_vec()).expect("ASCII request line");
    let mut parts = line.splitn(3, ' ');
    let (method, target, version) = (
        parts.next().expect("method"),
        parts.next().expect("target"),
        parts.next().expect("version"),
    );
    let sep = if target.contains('?') { '&' } else { '?' };
    let tagged = format!("{target}{sep}case={tag}");
    let mut out = format!("{method} {tagged} {version}").into_bytes();
    out.extend_from_slice(&req[line_end..]);
    (out, tagged)
}

/// The captured head, with its framing replaced when `chunk` is given.
fn request(dir: &Path, chunk: Option<usize>) -> Vec<u8> {
    let head = std::fs::read_to_string(dir.join("head.txt")).expect("head");
    let body = std::fs::read(dir.join("body.bin")).expect("body");
    let wire = std::fs::read(dir.join("wire_body.bin")).ok();
    let lines: Vec<&str> = head.trim_end().split("\r\n").collect();
    let mut out = String::new();
    let was_chunked = lines
        .iter()
        .any(|l| l.to_ascii_lowercase().starts_with("transfer-encoding:"));
    for l in &lines {
        let lower = l.to_ascii_lowercase();
        if chunk.is_some()
            && (lower.starts_with("content-length:") || lower.starts_with("transfer-encoding:"))
        {
            continue;
        }
        out.push_str(l);
        out.push_str("\r\n");
    }
    let mut req = out.into_bytes();
    match chunk {
        Some(n) => {
            req.extend_from_slice(b"Transfer-Encoding: chunked\r\n\r\n");
            req.extend_from_slice(&chunked(&body, n));
        }
        None => {
            req.extend_from_slice(b"\r\n");
            if was_chunked {
                req.extend_from_slice(&wire.expect("chunked case has wire_body.bin"));
            } else {
                req.extend_from_slice(&body);
            }
        }
    }
    req
}

fn check_case(
    name: &str,
    go: &Value,
    up: &Upstream,
    unpart: &Unpart,
    chunk: Option<usize>,
    setup: Setup,
) {
    let dir = corpus().join("cases").join(name);
    // A refused case's cut-off request can be recorded after its 422 reached the client.
    let late = up.take();
    assert!(
        late.iter().all(|r| !r.complete),
        "{name}: a refused request went upstream complete"
    );
    let (req, target) = tag_target(request(&dir, chunk), &format!("{name}-{chunk:?}-{setup:?}"));
    let resp = raw_request(&unpart.addr, &req).expect("response");
    let how = format!("{name} (chunk {chunk:?}, {setup:?})");
    let client_chunked = String::from_utf8_lossy(&req[..req.len().min(4096)])
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked");
    match want(go, setup) {
        Want::Forwarded {
            fields,
            file_field,
            filename,
            content_type,
            sha256,
            size,
        } => {
            assert_eq!(
                resp.status,
                200,
                "{how}: {:?}",
                String::from_utf8_lossy(&resp.body)
            );
            let r = &up.wait_for_target(&target);
            assert!(r.complete, "{how}: body not complete");
            let framing = match setup {
                Setup::Stream => Framing::Chunked,
                Setup::Length if client_chunked => Framing::Chunked,
                Setup::Length | Setup::Spool => Framing::Length(size),
            };
            assert_eq!(r.framing, framing, "{how}");
            if setup == Setup::Spool {
                assert_eq!(r.header("x-file-size"), Some(size.to_string().as_str()));
                assert_eq!(r.header("x-file-sha256"), Some(sha256.as_str()), "{how}");
            }
            assert_eq!(r.body_sha256, sha256, "{how}: file bytes differ");
            assert_eq!(r.body_len, size, "{how}");
            assert_eq!(r.form_fields(), fields, "{how}: fields");
            assert_eq!(
                r.header("content-type"),
                Some(content_type.as_str()),
                "{how}"
            );
            assert_eq!(
                unescape(r.header("x-file-name").unwrap()),
                filename,
                "{how}: filename"
            );
            assert_eq!(
                unescape(r.header("x-file-field").unwrap()),
                file_field,
                "{how}"
            );
            assert!(r.header("expect").is_none(), "{how}");
            assert!(r.target.starts_with("/capture/"), "{how}: {}", r.target);
            // Any other request recorded by now is a refused one, cut off.
            let rest = up.take();
            assert!(
                rest.iter().all(|o| o.target == target || !o.complete),
                "{how}: a refused request went upstream complete"
            );
            // No header carries a byte a backend could misread.
            for (n, v) in &r.headers {
                assert!(
                    v.bytes().all(|c| c.is_ascii_graphic() || c == b' '),
                    "{how}: header {n}: {v:?}"
                );
            }
            assert_eq!(
                resp.header("x-upstream"),
                Some("yes"),
                "{how}: response relayed"
            );
        }
        Want::Refused(code) => {
            assert_eq!(resp.status, 422, "{how}");
            assert_eq!(resp.json()["error"], code, "{how}");
            let got = up.received_after(Duration::from_millis(100));
            assert!(
                got.iter().all(|r| !r.complete),
                "{how}: backend saw a complete request"
            );
        }
    }
    up.take();
}

#[test]
fn corpus_replays_match_go() {
    replay_all(Setup::Stream);
}

#[test]
fn corpus_replays_with_exact_lengths() {
    replay_all(Setup::Length);
}

#[test]
fn corpus_replays_in_spool_mode() {
    replay_all(Setup::Spool);
}

fn replay_all(setup: Setup) {
    let expected = load("expected.json");
    let go_view = load("go_view.json");
    let up = Upstream::start();
    let unpart = Unpart::start(&up.addr, setup.yaml());
    let mut checked = 0;
    for (name, case) in expected["cases"].as_object().unwrap() {
        if case["body_file"].is_null() && case["wire_body_file"].is_null() {
            continue; // the *__big cases ship headers only
        }
        let go = &go_view["cases"][name];
        assert_eq!(go["readform_ok"], true, "{name}");
        for chunk in [None, Some(1), Some(7), Some(4096)] {
            check_case(name, go, &up, &unpart, chunk, setup);
        }
        checked += 1;
    }
    assert!(checked >= 40, "only {checked} cases found");
    let late = up.received_after(Duration::from_millis(200));
    assert!(
        late.iter().all(|r| !r.complete),
        "a refused request went upstream complete"
    );
}
