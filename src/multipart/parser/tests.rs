use super::*;

/// What a body parses to, with each part's data joined, so results from different chunkings
/// can be compared.
#[derive(Debug, PartialEq, Eq)]
enum Outcome {
    Parts(Vec<(PartHead, Vec<u8>)>),
    Err(ParseError),
}

fn run(body: &[u8], boundary: &str, chunks: &[usize], limits: ParserLimits) -> Outcome {
    let mut p = Parser::new(boundary.as_bytes(), limits);
    let mut parts: Vec<(PartHead, Vec<u8>)> = Vec::new();
    let mut ended = false;
    let mut pos = 0;
    let mut sizes = chunks.iter().copied().cycle();
    loop {
        let eof = pos >= body.len();
        if eof {
            p.finish();
        } else {
            let n = sizes
                .next()
                .unwrap_or(body.len())
                .max(1)
                .min(body.len() - pos);
            p.push(Bytes::copy_from_slice(&body[pos..pos + n]));
            pos += n;
        }
        loop {
            match p.next_event() {
                Ok(None) => break,
                Ok(Some(Event::Part(h))) => parts.push((h, Vec::new())),
                Ok(Some(Event::Data(d))) => {
                    assert!(!d.is_empty(), "empty data event");
                    parts
                        .last_mut()
                        .expect("data before part")
                        .1
                        .extend_from_slice(&d)
                }
                Ok(Some(Event::PartEnd)) => {}
                Ok(Some(Event::End)) => ended = true,
                Err(e) => return Outcome::Err(e),
            }
            assert!(p.buffered() < 64 * 1024, "parser buffered {}", p.buffered());
        }
        if eof {
            assert!(ended, "input ended without End or error");
            return Outcome::Parts(parts);
        }
    }
}

/// Parses with every two-way split and with one-byte chunks; all must agree.
fn parse(body: &[u8], boundary: &str) -> Outcome {
    let limits = ParserLimits::default();
    let whole = run(body, boundary, &[body.len().max(1)], limits);
    assert_eq!(
        run(body, boundary, &[1], limits),
        whole,
        "one-byte chunks differ"
    );
    for split in 1..body.len() {
        let r = run(body, boundary, &[split, body.len()], limits);
        assert_eq!(r, whole, "split at {split} differs");
    }
    whole
}

fn head(lines: &[(&str, &str)]) -> PartHead {
    PartHead {
        headers: lines
            .iter()
            .map(|(n, v)| (n.as_bytes().to_vec(), v.as_bytes().to_vec()))
            .collect(),
    }
}

fn cd(v: &str) -> PartHead {
    head(&[("Content-Disposition", v)])
}

fn parts(o: Outcome) -> Vec<(PartHead, Vec<u8>)> {
    match o {
        Outcome::Parts(p) => p,
        Outcome::Err(e) => panic!("unexpected error {e}"),
    }
}

#[test]
fn two_parts_crlf() {
    let body = b"--XyZ\r\nContent-Disposition: form-data; name=\"a\"\r\n\r\nhello\r\n--XyZ\r\n\
Content-Disposition: form-data; name=\"f\"; filename=\"x\"\r\nContent-Type: text/plain\r\n\r\n\
line1\r\nline2\r\n--XyZ--\r\n";
    let p = parts(parse(body, "XyZ"));
    assert_eq!(p.len(), 2);
    assert_eq!(p[0], (cd("form-data; name=\"a\""), b"hello".to_vec()));
    assert_eq!(p[1].1, b"line1\r\nline2");
    assert_eq!(p[1].0.get("content-type"), Some(&b"text/plain"[..]));
}

#[test]
fn preamble_and_epilogue_are_ignored() {
    let body = b"preamble line\r\n--bX\r\n--b junk\r\n\r\n--b\r\nContent-Disposition: form-data; name=\"a\"\r\n\r\n1\r\n--b--\r\nepilogue --b\r\n";
    // `--bX` and `--b junk` in the preamble are not boundary lines: skipped like Go.
    let p = parts(parse(body, "b"));
    assert_eq!(p.len(), 1);
    assert_eq!(p[0].1, b"1");
}

#[test]
fn header_line_without_colon_is_an_error() {
    let body = b"--b\r\nnot a header\r\n\r\ndata\r\n--b--\r\n";
    assert!(matches!(
        parse(body, "b"),
        Outcome::Err(ParseError::BadPartHeader(_))
    ));
}

#[test]
fn folded_headers_and_first_line_folding() {
    let body = b"--b\r\nContent-Disposition: form-data;\r\n\tname=\"a\"  \r\n\r\nv\r\n--b--";
    let p = parts(parse(body, "b"));
    assert_eq!(p[0].0, cd("form-data; name=\"a\""));
    let bad = b"--b\r\n folded: first\r\n\r\nv\r\n--b--";
    assert!(matches!(
        parse(bad, "b"),
        Outcome::Err(ParseError::BadPartHeader(_))
    ));
}

#[test]
fn delimiter_lookalikes_in_data_are_data() {
    // `\r\n--b` followed by anything but `--`, LWSP or a newline is data, as in Go.
    let body = b"--b\r\nA: 1\r\n\r\nx\r\n--bb\r\n--b-x\r\n--b\r\n\r\n\r\n--b--\r\n";
    let p = parts(parse(body, "b"));
    assert_eq!(p.len(), 2);
    assert_eq!(p[0].1, b"x\r\n--bb\r\n--b-x");
    assert_eq!(p[1].0, PartHead::default());
    assert_eq!(p[1].1, b"");
}

#[test]
fn boundary_line_with_padding_and_garbage() {
    let ok = b"--b \t\r\nA: 1\r\n\r\nx\r\n--b\t \r\nA: 2\r\n\r\ny\r\n--b-- \r\n";
    let p = parts(parse(ok, "b"));
    assert_eq!(p.len(), 2);
    assert_eq!(p[1].1, b"y");
    let bad = b"--b\r\nA: 1\r\n\r\nx\r\n--b junk\r\nA: 2\r\n\r\ny\r\n--b--\r\n";
    assert_eq!(parse(bad, "b"), Outcome::Err(ParseError::BadBoundaryLine));
    // In CRLF mode a closing line ending in a bare LF is not a closing line (Go agrees).
    let bad_final = b"--b\r\nA: 1\r\n\r\nx\r\n--b--\n";
    assert_eq!(
        parse(bad_final, "b"),
        Outcome::Err(ParseError::BadBoundaryLine)
    );
}

#[test]
fn closing_boundary_at_eof_without_newline() {
    let body = b"--b\r\nA: 1\r\n\r\nx\r\n--b--";
    assert_eq!(parts(parse(body, "b"))[0].1, b"x");
}

#[test]
fn lf_mode() {
    let body =
        b"--b\nContent-Disposition: form-data; name=\"a\"\n\nv\r\nw\n--b\nA: 2\n\nz\n--b--\n";
    let p = parts(parse(body, "b"));
    assert_eq!(p.len(), 2);
    assert_eq!(p[0].1, b"v\r\nw");
    assert_eq!(p[1].1, b"z");
}

#[test]
fn empty_part_data_and_delimiter_without_newline_at_start() {
    let body = b"--b\r\nA: 1\r\n\r\n\r\n--b\r\nA: 2\r\n\r\n--b--\r\n";
    let p = parts(parse(body, "b"));
    assert_eq!(p.len(), 2);
    assert!(p[0].1.is_empty());
    assert!(p[1].1.is_empty());
}

/// Found by the differential fuzz target: when a part's data starts with the delimiter and the
/// chunk ended within a few bytes of it, the newline of the boundary line was already in the
/// carry, and the next line was read from the following input: BadBoundaryLine for a body
/// that parses whole. `parse` tries every two-way split.
#[test]
fn delimiter_at_data_start_then_another_part_survives_any_split() {
    for body in [
        &b"--b\r\nA: 1\r\n\r\n--b\r\nA: 2\r\n\r\nv\r\n--b--"[..],
        b"--b\r\nA: 1\r\n\r\n--b \t\r\nA: 2\r\n\r\nv\r\n--b--\r\n",
        b"--b\nA: 1\n\n--b\nA: 2\n\nv\n--b--\n",
        b"--b\n\n--b\n\nv\n--b--\n",
    ] {
        let p = parts(parse(body, "b"));
        assert_eq!(p.len(), 2, "{:?}", String::from_utf8_lossy(body));
        assert!(p[0].1.is_empty());
        assert_eq!(p[1].1, b"v");
    }
    // The fuzz input's own chunking.
    let body = b"--b\r\nContent-Disposition: form-data; name=\"e\"\r\n\r\n--b\r\nContent-Disposition: form-data; name=\"a\"\r\n\r\nv\r\n--b--";
    let whole = run(body, "b", &[body.len()], ParserLimits::default());
    assert_eq!(
        run(body, "b", &[6, 12, 32, 1088], ParserLimits::default()),
        whole
    );
    assert_eq!(parts(whole).len(), 2);
}

#[test]
fn incomplete_bodies() {
    for body in [
        &b""[..],
        b"--b",
        b"--b\r\n",
        b"--b\r\nA: 1\r\n",
        b"--b\r\nA: 1\r\n\r\nsome data",
        b"--b\r\nA: 1\r\n\r\nsome data\r\n--b",
        b"--b\r\nA: 1\r\n\r\nsome data\r\n--b\r\n",
        b"--b\r\nA: 1\r\n\r\nsome data\r\n--b-",
        b"preamble only\r\n",
    ] {
        assert_eq!(
            parse(body, "b"),
            Outcome::Err(ParseError::Incomplete),
            "{:?}",
            String::from_utf8_lossy(body)
        );
    }
}

#[test]
fn no_parts_is_fine() {
    assert_eq!(parse(b"--b--\r\n", "b"), Outcome::Parts(vec![]));
}

#[test]
fn limits() {
    let limits = ParserLimits {
        part_header_bytes: 64,
        parts: 2,
        line_bytes: 32,
    };
    let big_head = format!("--b\r\nA: {}\r\n\r\nx\r\n--b--\r\n", "v".repeat(100));
    assert_eq!(
        run(big_head.as_bytes(), "b", &[7], limits),
        Outcome::Err(ParseError::PartHeaderTooLarge(64))
    );
    let three = b"--b\r\nA: 1\r\n\r\n\r\n--b\r\nA: 1\r\n\r\n\r\n--b\r\nA: 1\r\n\r\n\r\n--b--\r\n";
    assert_eq!(
        run(three, "b", &[5], limits),
        Outcome::Err(ParseError::TooManyParts(2))
    );
    // A flood of CRs with no LF in the preamble is one endless line.
    let flood = vec![b'\r'; 1000];
    assert_eq!(
        run(&flood, "b", &[10], limits),
        Outcome::Err(ParseError::LineTooLong(32))
    );
    let padded = format!("--b\r\nA: 1\r\n\r\nx\r\n--b{}\r\n", " ".repeat(100));
    assert_eq!(
        run(padded.as_bytes(), "b", &[9], limits),
        Outcome::Err(ParseError::LineTooLong(32))
    );
}

#[test]
fn crlf_flood_in_data_stays_bounded() {
    // A file made of CR LF pairs is a worst case for delimiter prefixes: memory must not grow.
    let mut body = b"--bnd\r\nA: 1\r\n\r\n".to_vec();
    body.extend(std::iter::repeat_n(b"\r\n-", 200_000).flatten());
    body.extend_from_slice(b"\r\n--bnd--\r\n");
    for chunk in [1usize, 3, 4096, 65536] {
        let p = parts(run(&body, "bnd", &[chunk], ParserLimits::default()));
        assert_eq!(p[0].1.len(), 600_000, "chunk {chunk}");
    }
}

#[test]
fn large_data_is_zero_copy_slices() {
    let mut p = Parser::new(b"b", ParserLimits::default());
    p.push(Bytes::from_static(b"--b\r\nA: 1\r\n\r\n"));
    assert!(matches!(p.next_event(), Ok(Some(Event::Part(_)))));
    assert_eq!(p.next_event(), Ok(None));
    let chunk = Bytes::from(vec![b'x'; 1 << 20]);
    let ptr = chunk.as_ptr();
    p.push(chunk);
    match p.next_event() {
        Ok(Some(Event::Data(d))) => {
            assert_eq!(d.len(), 1 << 20);
            assert_eq!(d.as_ptr(), ptr, "data was copied");
        }
        other => panic!("{other:?}"),
    }
    assert!(p.buffered() < 1024);
}

#[test]
fn errors_are_sticky() {
    let mut p = Parser::new(b"b", ParserLimits::default());
    p.push(Bytes::from_static(b"--b\r\nbad\r\n"));
    assert!(p.next_event().is_err());
    p.push(Bytes::from_static(b"\r\nmore"));
    assert_eq!(p.next_event(), Ok(None));
}

/// `framing: length` computes the file's length from `position()` at the file's `Part` event:
/// it must be the offset of the part's first data byte, however the body was split.
#[test]
fn position_at_a_part_event_is_where_its_data_starts() {
    let body = b"pre\r\n--b\r\nContent-Disposition: form-data; name=\"a\"\r\n\r\nv\r\n--b\r\n\
Content-Disposition: form-data; name=\"f\"; filename=\"x\"\r\nX-Long: 0123456789\r\n\r\nDATA\r\n--b--\r\n";
    let starts: Vec<u64> = body
        .windows(4)
        .enumerate()
        .filter(|(_, w)| w == b"\r\n\r\n")
        .map(|(i, _)| i as u64 + 4)
        .collect();
    for split in 1..body.len() {
        let mut p = Parser::new(b"b", ParserLimits::default());
        let mut seen = Vec::new();
        for piece in body.chunks(split) {
            p.push(Bytes::copy_from_slice(piece));
            while let Some(ev) = p.next_event().unwrap() {
                if let Event::Part(_) = ev {
                    seen.push(p.position());
                }
            }
        }
        assert_eq!(seen, starts, "split {split}");
    }
}
