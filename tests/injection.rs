//! Header injection and spoofing: whatever a client puts in field names, values and file names
//! (CR, LF, NUL, non-ASCII and invalid UTF-8, RFC 2231 escapes, names of real headers or of the
//! reserved prefixes, overlong values), the upstream sees no header but the client's kept ones
//! and the documented encoded ones, every value visible ASCII, the framing unpart chose, and
//! exactly the file as the body. Bodies are built by hand, byte by byte.

mod support;

use std::collections::BTreeSet;

use support::*;

/// One raw part: the Content-Disposition value as bytes, extra header lines, the data.
fn part(cd: &[u8], extra: &[u8], data: &[u8]) -> Vec<u8> {
    let mut out = b"Content-Disposition: ".to_vec();
    out.extend_from_slice(cd);
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(extra);
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(data);
    out
}

fn body(boundary: &str, parts: &[Vec<u8>]) -> Vec<u8> {
    let mut out = Vec::new();
    for p in parts {
        out.extend_from_slice(format!("--{boundary}\r\n").as_bytes());
        out.extend_from_slice(p);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(format!("--{boundary}--\r\n").as_bytes());
    out
}

fn field(name: &[u8], value: &[u8]) -> Vec<u8> {
    let mut cd = b"form-data; name=\"".to_vec();
    cd.extend_from_slice(name);
    cd.push(b'"');
    part(&cd, b"", value)
}

fn file(name: &[u8], filename: &[u8], data: &[u8]) -> Vec<u8> {
    let mut cd = b"form-data; name=\"".to_vec();
    cd.extend_from_slice(name);
    cd.extend_from_slice(b"\"; filename=\"");
    cd.extend_from_slice(filename);
    cd.push(b'"');
    part(&cd, b"Content-Type: application/octet-stream\r\n", data)
}

/// The documented name encoding (README: lower-case letters, digits and `-._~` kept, every
/// other byte `%XX`), written independently of `rewrite::encode_name`.
fn enc_name(v: &[u8]) -> String {
    v.iter()
        .map(|&c| {
            if c.is_ascii_lowercase() || c.is_ascii_digit() || b"-._~".contains(&c) {
                (c as char).to_string()
            } else {
                format!("%{c:02X}")
            }
        })
        .collect()
}

fn is_token(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|c| c.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&c))
}

/// The file part as the backend must decode it: (field, filename, content type, data).
type FileView<'a> = (&'a [u8], &'a [u8], &'a str, &'a [u8]);

/// What the upstream must have received for a form upload.
struct Expect<'a> {
    /// Client header names that pass through (lower case), besides the generated ones.
    kept: &'a [&'a str],
    fields: &'a [(&'a [u8], &'a [u8])],
    file: Option<FileView<'a>>,
    /// Spool mode: Content-Length framing and the file facts.
    spool: bool,
}

fn check(r: &Received, e: &Expect) {
    // Every header is a token name with a visible-ASCII value (spaces inside allowed).
    for (n, v) in &r.headers {
        assert!(is_token(n), "header name {n:?}");
        assert!(
            v.bytes()
                .all(|c| c == b' ' || c == b'\t' || c.is_ascii_graphic()),
            "{n}: {v:?}"
        );
    }
    // Exactly the expected set of names, each framing header once.
    let got: Vec<String> = r
        .headers
        .iter()
        .map(|(n, _)| n.to_ascii_lowercase())
        .collect();
    let mut want: BTreeSet<String> = e.kept.iter().map(|s| s.to_string()).collect();
    for (name, _) in e.fields {
        want.insert(format!("x-form-{}", enc_name(name).to_ascii_lowercase()));
    }
    if e.file.is_some() {
        want.extend(["content-type", "x-file-name", "x-file-field"].map(String::from));
    }
    if e.spool {
        want.extend(["content-length", "x-file-size", "x-file-sha256"].map(String::from));
    } else if e.file.is_some() {
        want.insert("transfer-encoding".into());
    } else {
        want.insert("content-length".into());
    }
    let got_set: BTreeSet<String> = got.iter().cloned().collect();
    assert_eq!(got_set, want, "upstream header names");
    for single in [
        "host",
        "content-length",
        "transfer-encoding",
        "content-type",
        "x-file-name",
        "x-file-field",
        "connection",
    ] {
        assert!(
            got.iter().filter(|n| *n == single).count() <= 1,
            "{single} repeated: {:?}",
            r.headers
        );
    }
    // Framing: the one unpart chose, and the body is exactly the file.
    let data = e.file.map_or(&b""[..], |f| f.3);
    match (e.spool, e.file.is_some()) {
        (false, true) => {
            assert_eq!(r.framing, Framing::Chunked);
            assert_eq!(r.header("transfer-encoding"), Some("chunked"));
        }
        _ => assert_eq!(r.framing, Framing::Length(data.len() as u64)),
    }
    assert!(r.complete);
    assert_eq!(r.body, data);
    // Decoded, everything round-trips: names (lower-cased, then unescaped) and values.
    let fields: Vec<(Vec<u8>, Vec<u8>)> = e
        .fields
        .iter()
        .map(|(n, v)| (n.to_vec(), v.to_vec()))
        .collect();
    assert_eq!(r.form_fields(), fields);
    if let Some((name, filename, ct, _)) = e.file {
        assert_eq!(unescape(r.header("x-file-field").unwrap()), name);
        assert_eq!(unescape(r.header("x-file-name").unwrap()), filename);
        assert_eq!(r.header("content-type"), Some(ct));
    }
    if e.spool {
        assert_eq!(r.header("x-file-size"), Some(&*data.len().to_string()));
        assert_eq!(r.header("x-file-sha256"), Some(&*sha256_hex(data)));
    }
}

fn send(unpart: &Unpart, body: &[u8], extra: &str) -> u16 {
    let req = post("/upload", &mp("inj"), body, extra);
    raw_request(&unpart.addr, &req).unwrap().status
}

/// Sends the parts as one upload (accepted) and returns what the upstream received.
fn upload(up: &Upstream, unpart: &Unpart, parts: &[Vec<u8>], extra: &str) -> Received {
    assert_eq!(send(unpart, &body("inj", parts), extra), 200);
    up.wait_for(1).remove(0)
}

/// A stream-mode upload whose only kept client header is Host.
fn streamed<'a>(fields: &'a [(&'a [u8], &'a [u8])], file: FileView<'a>) -> Expect<'a> {
    Expect {
        kept: &["host"],
        fields,
        file: Some(file),
        spool: false,
    }
}

/// Names of real headers and of the reserved prefixes stay under `X-Form-`; the client's own
/// Host and the framing unpart chose are untouched.
#[test]
fn field_names_that_are_real_or_reserved_headers_stay_prefixed() {
    let up = Upstream::start();
    let unpart = Unpart::start(&up.addr, "");
    let names: [&[u8]; 11] = [
        b"Host",
        b"Content-Length",
        b"Transfer-Encoding",
        b"Connection",
        b"Content-Type",
        b"Expect",
        b"X-Form-x",
        b"x-form-x",
        b"X-File-Name",
        b"X-File-Size",
        b"X-File-Sha256",
    ];
    let values: [&[u8]; 11] = [
        b"evil.example",
        b"0",
        b"chunked",
        b"close",
        b"text/html",
        b"100-continue",
        b"forged",
        b"forged2",
        b"evil.sh",
        b"1",
        b"00",
    ];
    let mut parts: Vec<Vec<u8>> = names.iter().zip(values).map(|(n, v)| field(n, v)).collect();
    parts.push(file(b"Host", b"X-File-Name", b"the file"));
    let r = upload(&up, &unpart, &parts, "");
    let fields: Vec<(&[u8], &[u8])> = names.iter().copied().zip(values).collect();
    check(
        &r,
        &streamed(
            &fields,
            (
                b"Host",
                b"X-File-Name",
                "application/octet-stream",
                b"the file",
            ),
        ),
    );
    assert_eq!(r.header("host"), Some("test"));
    assert_eq!(r.header("x-form-%48ost"), Some("evil.example"));
}

/// CR, LF and NUL reach the parser through values (any byte), RFC 2231 `name*=` and
/// `filename*=` escapes, and NUL inside quoted strings; all of them arrive percent-encoded.
#[test]
fn cr_lf_nul_in_names_values_and_filenames_are_encoded() {
    let up = Upstream::start();
    let unpart = Unpart::start(&up.addr, "");
    let smuggle = b"v\r\nHost: evil\r\nContent-Length: 0\r\n\r\nGET /admin HTTP/1.1\r\n\x00end";
    let parts = vec![
        field(b"plain", smuggle),
        part(
            b"form-data; name*=UTF-8''a%0D%0AX-Injected%3A%201%00",
            b"",
            b"\r\n\r\n",
        ),
        field(b"nul\x00name", b"\x00"),
        // A raw CR or LF inside a quoted string makes the disposition invalid (as in Go):
        // the part is skipped, not forwarded.
        field(b"bad\rname", b"dropped"),
        // An unescaped tspecial in an RFC 2231 value makes it invalid too: skipped.
        part(b"form-data; name*=UTF-8''Host:%20evil", b"", b"dropped too"),
        // Folding joins lines with a space; the value still arrives as one header.
        part(b"form-data;\r\n\tname=\"folded\"", b"", b"x"),
        part(
            b"form-data; name=\"f\"; filename*=UTF-8''x%0D%0AX-Evil%3A%20y%00.txt",
            b"Content-Type: text/plain;\r\n charset=utf-8\r\n",
            b"file\r\nbody\x00",
        ),
    ];
    let r = upload(&up, &unpart, &parts, "");
    check(
        &r,
        &streamed(
            &[
                (b"plain", smuggle),
                (b"a\r\nX-Injected: 1\x00", b"\r\n\r\n"),
                (b"nul\x00name", b"\x00"),
                (b"folded", b"x"),
            ],
            (
                b"f",
                b"x\r\nX-Evil: y\x00.txt",
                "text/plain; charset=utf-8",
                b"file\r\nbody\x00",
            ),
        ),
    );
    assert_eq!(
        r.header("x-form-plain"),
        Some("v%0D%0AHost:%20evil%0D%0AContent-Length:%200%0D%0A%0D%0AGET%20/admin%20HTTP/1.1%0D%0A%00end")
    );
}

/// Non-ASCII names, values and file names, valid UTF-8 or not, arrive as `%XX` bytes.
#[test]
fn non_ascii_and_invalid_utf8_are_percent_encoded() {
    let up = Upstream::start();
    let unpart = Unpart::start(&up.addr, "");
    let parts = vec![
        field("naïve".as_bytes(), "日本語 ✓".as_bytes()),
        field(b"\xff\xfe", b"\xc3\x28\x80\xff"),
        part(b"form-data; name*=UTF-8''%FF%C3%A9", b"", b"\xe2\x80\xa8"),
        file("fïle".as_bytes(), b"\xffr\xc3\xa9sum\xc3.pdf", b"\x80\x81"),
    ];
    let r = upload(&up, &unpart, &parts, "");
    check(
        &r,
        &streamed(
            &[
                ("naïve".as_bytes(), "日本語 ✓".as_bytes()),
                (b"\xff\xfe", b"\xc3\x28\x80\xff"),
                (b"\xff\xc3\xa9", b"\xe2\x80\xa8"),
            ],
            (
                "fïle".as_bytes(),
                b"\xffr\xc3\xa9sum\xc3.pdf",
                "application/octet-stream",
                b"\x80\x81",
            ),
        ),
    );
    assert_eq!(
        r.header("x-form-na%C3%AFve"),
        Some("%E6%97%A5%E6%9C%AC%E8%AA%9E%20%E2%9C%93")
    );
}

/// Overlong values, names and header totals are refused with 413 before anything reaches the
/// backend; nothing is truncated into a header.
#[test]
fn overlong_names_and_values_are_refused_not_truncated() {
    let up = Upstream::start();
    let unpart = Unpart::start(&up.addr, "");
    let big = vec![b'\n'; 100 * 1024];
    let f = file(b"f", b"a.txt", b"data");
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("value", body("inj", &[field(b"v", &big), f.clone()])),
        (
            "name",
            body("inj", &[field(&vec![b'N'; 100 * 1024], b"1"), f.clone()]),
        ),
        (
            "filename",
            body("inj", &[file(b"f", &vec![b'\r'; 100 * 1024], b"data")]),
        ),
        // Under field_value_bytes each (8 KiB), tripled by encoding: over header_bytes together.
        (
            "total",
            body(
                "inj",
                &[
                    field(b"a", &[0xffu8; 8000]),
                    field(b"b", &[0xffu8; 8000]),
                    f.clone(),
                ],
            ),
        ),
    ];
    for (what, b) in cases {
        let resp = raw_request(&unpart.addr, &post("/upload", &mp("inj"), &b, "")).unwrap();
        assert_eq!(
            resp.status,
            413,
            "{what}: {:?}",
            String::from_utf8_lossy(&resp.body)
        );
    }
    assert!(up
        .received_after(std::time::Duration::from_millis(200))
        .is_empty());
}

/// Client-sent reserved headers never arrive (any case), on multipart requests and on the
/// passthrough path; Connection-listed headers and the client's framing are not forwarded on
/// the rewritten request.
#[test]
fn client_sent_reserved_headers_are_stripped_everywhere() {
    let up = Upstream::start();
    let unpart = Unpart::start(
        &up.addr,
        "routes:\n  - prefix: /legacy/\n    mode: passthrough\n",
    );
    let forged = "X-Form-title: forged\r\nx-form-%48ost: forged\r\nX-FILE-NAME: ../../etc/passwd\r\nX-File-Size: 1\r\nX-File-Sha256: 00\r\nX-Trace: t1\r\nConnection: X-Hop\r\nX-Hop: 1\r\n";

    let b = body(
        "inj",
        &[field(b"title", b"real"), file(b"f", b"a.txt", b"bytes")],
    );
    assert_eq!(send(&unpart, &b, forged), 200);
    let got = up.wait_for(1);
    check(
        &got[0],
        &Expect {
            kept: &["host", "x-trace"],
            fields: &[(b"title", b"real")],
            file: Some((b"f", b"a.txt", "application/octet-stream", b"bytes")),
            spool: false,
        },
    );
    up.take();

    // Not multipart: proxied as it is, less the reserved headers and hop-by-hop ones.
    for path in ["/api", "/legacy/up"] {
        let req = post(path, "application/json", b"{\"a\":1}", forged);
        assert_eq!(raw_request(&unpart.addr, &req).unwrap().status, 200);
        let r = up.wait_for(1).remove(0);
        up.take();
        let names: BTreeSet<String> = r
            .headers
            .iter()
            .map(|(n, _)| n.to_ascii_lowercase())
            .collect();
        assert!(
            names
                .iter()
                .all(|n| !n.starts_with("x-form-") && !n.starts_with("x-file-")),
            "{path}: {names:?}"
        );
        assert!(
            names.contains("x-trace") && !names.contains("x-hop"),
            "{path}: {names:?}"
        );
        assert_eq!(r.header("content-type"), Some("application/json"));
        assert_eq!(r.framing, Framing::Length(7));
        assert_eq!(r.body, b"{\"a\":1}");
    }
    // Multipart on a passthrough route: the body is not parsed, the forged headers still go.
    let req = post("/legacy/up", &mp("inj"), &b, forged);
    assert_eq!(raw_request(&unpart.addr, &req).unwrap().status, 200);
    let r = up.wait_for(1).remove(0);
    assert!(r.headers.iter().all(|(n, _)| {
        let n = n.to_ascii_lowercase();
        !n.starts_with("x-form-") && !n.starts_with("x-file-")
    }));
    assert_eq!(r.body, b);
}

/// A chunked client upload that also carries a Content-Length (a smuggling classic) is never
/// forwarded with two framings.
#[test]
fn conflicting_client_framing_never_reaches_the_backend_twice() {
    let up = Upstream::start();
    let unpart = Unpart::start(&up.addr, "");
    let b = body("inj", &[field(b"a", b"1"), file(b"f", b"a.txt", b"bytes")]);
    let mut req = format!(
        "POST /upload HTTP/1.1\r\nHost: test\r\nContent-Type: {}\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n",
        mp("inj")
    )
    .into_bytes();
    req.extend_from_slice(&chunked(&b, 7));
    let status = raw_request(&unpart.addr, &req).map(|r| r.status);
    let got = up.received_after(std::time::Duration::from_millis(300));
    match status {
        // Accepted (the chunked framing wins, as RFC 9112 says): exactly the contract.
        Ok(200) => check(
            &got[0],
            &streamed(
                &[(b"a", b"1")],
                (b"f", b"a.txt", "application/octet-stream", b"bytes"),
            ),
        ),
        // Refused: then nothing reached the backend.
        _ => assert!(got.is_empty(), "{status:?} {got:?}"),
    }
}

/// Spool mode: the same hostile names and values, every field (also after the file), the
/// exact length and the file facts, nothing else.
#[test]
fn spool_mode_encodes_the_same_way() {
    let up = Upstream::start();
    let unpart = Unpart::start(&up.addr, "mode: spool\nspool: {dir: \"{dir}/spool\"}\n");
    let parts = vec![
        field(b"Content-Length", b"999"),
        file(
            b"Transfer-Encoding",
            b"a\\b/c\xff.bin",
            b"spooled\r\n--inj\x00",
        ),
        part(b"form-data; name*=UTF-8''X-File-Size%0D%0A", b"", b"1\r\n"),
        field(b"Host", b"evil"),
    ];
    let forged = "X-File-Size: 1\r\nX-File-Sha256: 00\r\nx-form-host: forged\r\n";
    let r = upload(&up, &unpart, &parts, forged);
    check(
        &r,
        &Expect {
            kept: &["host"],
            fields: &[
                (b"Content-Length", b"999"),
                (b"X-File-Size\r\n", b"1\r\n"),
                (b"Host", b"evil"),
            ],
            // Go's base name keeps what follows the last `/` (a backslash is no separator).
            file: Some((
                b"Transfer-Encoding",
                b"c\xff.bin",
                "application/octet-stream",
                b"spooled\r\n--inj\x00",
            )),
            spool: true,
        },
    );
    assert_eq!(r.header("host"), Some("test"));
}

/// A file part's own Content-Type becomes the upstream Content-Type, so one with control or
/// non-ASCII bytes is refused (400) and nothing reaches the backend.
#[test]
fn file_content_type_with_control_bytes_is_refused() {
    let up = Upstream::start();
    let unpart = Unpart::start(&up.addr, "");
    for ct in [
        &b"text/plain\x00"[..],
        b"text/plain\x0bX: y",
        b"text/\xc3\xa9",
    ] {
        let mut extra = b"Content-Type: ".to_vec();
        extra.extend_from_slice(ct);
        extra.extend_from_slice(b"\r\n");
        let b = body(
            "inj",
            &[part(b"form-data; name=\"f\"; filename=\"a\"", &extra, b"x")],
        );
        assert_eq!(send(&unpart, &b, ""), 400, "{ct:?}");
    }
    assert!(up
        .received_after(std::time::Duration::from_millis(200))
        .is_empty());
}
