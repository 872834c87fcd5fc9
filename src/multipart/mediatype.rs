//! `Content-Type` and `Content-Disposition` values parsed the way Go's `mime.ParseMediaType`
//! does, because the contract is "what a Go `ParseMultipartForm` handler would have seen":
//! quoted strings keep any byte but `"`, CR and LF; a backslash escapes only a tspecial (MSIE
//! sends unescaped Windows paths); RFC 2231 `name*=` and `name*0=` forms are decoded; a repeated
//! parameter makes the whole value invalid.

/// Parameters by lower-cased name, in the order they came.
type Params = Vec<(String, Vec<u8>)>;

/// A parsed media type: lower-cased type and the parameters in the order they came.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MediaType {
    pub essence: String,
    params: Params,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MediaTypeError {
    Invalid(&'static str),
    DuplicateParam(String),
}

impl std::fmt::Display for MediaTypeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            MediaTypeError::Invalid(why) => f.write_str(why),
            MediaTypeError::DuplicateParam(p) => write!(f, "duplicate parameter `{p}`"),
        }
    }
}

impl MediaType {
    pub fn param(&self, name: &str) -> Option<&[u8]> {
        self.params
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_slice())
    }
}

fn is_tspecial(c: u8) -> bool {
    b"()<>@,;:\\\"/[]?=".contains(&c)
}

fn is_token_char(c: u8) -> bool {
    c > 0x20 && c < 0x7f && !is_tspecial(c)
}

/// Go trims with `unicode.IsSpace`, which includes a few non-ASCII spaces.
fn trim_left_space(mut v: &[u8]) -> &[u8] {
    loop {
        let Some(&c) = v.first() else { return v };
        if c < 0x80 {
            if matches!(c, b' ' | b'\t' | b'\n' | 0x0b | 0x0c | b'\r') {
                v = &v[1..];
                continue;
            }
            return v;
        }
        let width = match c {
            0xc0..=0xdf => 2,
            0xe0..=0xef => 3,
            0xf0..=0xf7 => 4,
            _ => return v,
        };
        let Some(ch) = v
            .get(..width)
            .and_then(|s| std::str::from_utf8(s).ok())
            .and_then(|s| s.chars().next())
        else {
            return v;
        };
        if !ch.is_whitespace() {
            return v;
        }
        v = &v[width..];
    }
}

fn consume_token(v: &[u8]) -> (&[u8], &[u8]) {
    let n = v.iter().take_while(|&&c| is_token_char(c)).count();
    v.split_at(n)
}

/// A token or a quoted string; `None` when neither is there.
fn consume_value(v: &[u8]) -> Option<(Vec<u8>, &[u8])> {
    if v.first() != Some(&b'"') {
        let (tok, rest) = consume_token(v);
        return (!tok.is_empty()).then(|| (tok.to_vec(), rest));
    }
    let mut out = Vec::new();
    let mut i = 1;
    while i < v.len() {
        match v[i] {
            b'"' => return Some((out, &v[i + 1..])),
            b'\\' if i + 1 < v.len() && is_tspecial(v[i + 1]) => {
                out.push(v[i + 1]);
                i += 1;
            }
            b'\r' | b'\n' => return None,
            c => out.push(c),
        }
        i += 1;
    }
    None
}

fn check_essence(s: &[u8]) -> Result<(), MediaTypeError> {
    let (typ, rest) = consume_token(s);
    if typ.is_empty() {
        return Err(MediaTypeError::Invalid("no media type"));
    }
    if rest.is_empty() {
        return Ok(());
    }
    let Some(rest) = rest.strip_prefix(b"/") else {
        return Err(MediaTypeError::Invalid("expected slash after first token"));
    };
    let (sub, rest) = consume_token(rest);
    if sub.is_empty() {
        return Err(MediaTypeError::Invalid("expected token after slash"));
    }
    if !rest.is_empty() {
        return Err(MediaTypeError::Invalid(
            "unexpected content after media subtype",
        ));
    }
    Ok(())
}

fn trim_space(v: &[u8]) -> &[u8] {
    let v = trim_left_space(v);
    let n = v
        .iter()
        .rev()
        .take_while(|c| matches!(c, b' ' | b'\t' | b'\n' | 0x0b | 0x0c | b'\r'))
        .count();
    &v[..v.len() - n]
}

pub fn parse(v: &[u8]) -> Result<MediaType, MediaTypeError> {
    let base_end = memchr::memchr(b';', v).unwrap_or(v.len());
    let essence = trim_space(&v[..base_end]).to_ascii_lowercase();
    check_essence(&essence)?;
    let essence =
        String::from_utf8(essence).map_err(|_| MediaTypeError::Invalid("no media type"))?;

    let mut plain: Params = Vec::new();
    // RFC 2231 pieces (`name*`, `name*0`, `name*1*`, ...) by base name, in arrival order.
    let mut starred: Vec<(String, Params)> = Vec::new();
    let mut rest = &v[base_end..];
    loop {
        rest = trim_left_space(rest);
        if rest.is_empty() {
            break;
        }
        let Some((key, value, after)) = consume_param(rest) else {
            if trim_space(rest) == b";" {
                break;
            }
            return Err(MediaTypeError::Invalid("invalid media parameter"));
        };
        let list = match key.split_once('*') {
            Some((base, _)) => {
                let i = match starred.iter().position(|(b, _)| b == base) {
                    Some(i) => i,
                    None => {
                        starred.push((base.to_string(), Vec::new()));
                        starred.len() - 1
                    }
                };
                &mut starred[i].1
            }
            None => &mut plain,
        };
        if list.iter().any(|(k, _)| *k == key) {
            return Err(MediaTypeError::DuplicateParam(key));
        }
        list.push((key, value));
        rest = after;
    }
    for (base, pieces) in starred {
        if let Some(value) = stitch_2231(&base, &pieces) {
            match plain.iter_mut().find(|(k, _)| *k == base) {
                Some(slot) => slot.1 = value,
                None => plain.push((base, value)),
            }
        }
    }
    Ok(MediaType {
        essence,
        params: plain,
    })
}

fn consume_param(v: &[u8]) -> Option<(String, Vec<u8>, &[u8])> {
    let rest = trim_left_space(v).strip_prefix(b";")?;
    let rest = trim_left_space(rest);
    let (key, rest) = consume_token(rest);
    if key.is_empty() {
        return None;
    }
    let key = String::from_utf8(key.to_ascii_lowercase()).ok()?;
    let rest = trim_left_space(rest).strip_prefix(b"=")?;
    let rest = trim_left_space(rest);
    let (value, rest) = consume_value(rest)?;
    Some((key, value, rest))
}

fn stitch_2231(base: &str, pieces: &Params) -> Option<Vec<u8>> {
    let get = |k: &str| {
        pieces
            .iter()
            .find(|(n, _)| n == k)
            .map(|(_, v)| v.as_slice())
    };
    if let Some(v) = get(&format!("{base}*")) {
        return decode_2231(v);
    }
    let mut out = Vec::new();
    let mut valid = false;
    for n in 0.. {
        let simple = format!("{base}*{n}");
        if let Some(v) = get(&simple) {
            valid = true;
            out.extend_from_slice(v);
            continue;
        }
        let Some(v) = get(&format!("{simple}*")) else {
            break;
        };
        valid = true;
        if n == 0 {
            if let Some(d) = decode_2231(v) {
                out.extend_from_slice(&d);
            }
        } else if let Some(d) = percent_unescape(v) {
            out.extend_from_slice(&d);
        }
    }
    valid.then_some(out)
}

/// `charset'lang'percent-encoded`, for UTF-8 and US-ASCII only, as Go.
fn decode_2231(v: &[u8]) -> Option<Vec<u8>> {
    let mut it = v.splitn(3, |&c| c == b'\'');
    let charset = it.next()?.to_ascii_lowercase();
    let _lang = it.next()?;
    let enc = it.next()?;
    if charset != b"utf-8" && charset != b"us-ascii" {
        return None;
    }
    percent_unescape(enc)
}

fn percent_unescape(v: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(v.len());
    let mut i = 0;
    while i < v.len() {
        if v[i] == b'%' {
            let hi = hex(*v.get(i + 1)?)?;
            let lo = hex(*v.get(i + 2)?)?;
            out.push(hi << 4 | lo);
            i += 3;
        } else {
            out.push(v[i]);
            i += 1;
        }
    }
    Some(out)
}

fn hex(c: u8) -> Option<u8> {
    (c as char).to_digit(16).map(|d| d as u8)
}

/// Go's `filepath.Base` on Unix, which `Part.FileName` applies.
pub fn base_name(name: &[u8]) -> &[u8] {
    if name.is_empty() {
        return b".";
    }
    let trimmed = {
        let n = name.iter().rev().take_while(|&&c| c == b'/').count();
        &name[..name.len() - n]
    };
    if trimmed.is_empty() {
        return b"/";
    }
    match memchr::memrchr(b'/', trimmed) {
        Some(i) => &trimmed[i + 1..],
        None => trimmed,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(v: &str) -> MediaType {
        parse(v.as_bytes()).unwrap()
    }

    #[test]
    fn content_type_boundary() {
        let m = p("multipart/form-data; boundary=----abc123");
        assert_eq!(m.essence, "multipart/form-data");
        assert_eq!(m.param("boundary"), Some(&b"----abc123"[..]));
        let m = p("Multipart/Form-Data;BOUNDARY=\"a b\";");
        assert_eq!(m.essence, "multipart/form-data");
        assert_eq!(m.param("boundary"), Some(&b"a b"[..]));
    }

    #[test]
    fn duplicate_boundary_is_an_error() {
        assert_eq!(
            parse(b"multipart/form-data; boundary=a; boundary=b"),
            Err(MediaTypeError::DuplicateParam("boundary".into()))
        );
    }

    #[test]
    fn invalid_values() {
        assert!(parse(b"").is_err());
        assert!(parse(b"multipart/").is_err());
        assert!(parse(b"multipart/form-data; boundary").is_err());
        assert!(parse(b"multipart/form-data; boundary=\"open").is_err());
        assert!(parse(b"form-data; name=\"a\rb\"").is_err());
        // An unquoted non-ASCII value is not a token.
        assert!(parse("form-data; name=备注".as_bytes()).is_err());
    }

    #[test]
    fn quoted_strings_as_go() {
        let m = p(r#"form-data; name="q\"name"; filename="C:\dev\a.txt""#);
        assert_eq!(m.param("name"), Some(&b"q\"name"[..]));
        // `\d` is not a tspecial escape: the backslash stays (MSIE paths).
        assert_eq!(m.param("filename"), Some(&br"C:\dev\a.txt"[..]));
        let m = p("form-data; name=\"备注\"");
        assert_eq!(m.param("name"), Some("备注".as_bytes()));
        let m = p("form-data; name=\"\"");
        assert_eq!(m.param("name"), Some(&b""[..]));
    }

    #[test]
    fn rfc2231() {
        let m = p("form-data; name=f; filename=\"x.pdf\"; filename*=UTF-8''%E6%8A%A5.pdf");
        assert_eq!(m.param("filename"), Some("报.pdf".as_bytes()));
        let m = p("form-data; filename*0=\"a\"; filename*1=\"b\"");
        assert_eq!(m.param("filename"), Some(&b"ab"[..]));
        let m = p("form-data; filename*0*=utf-8''%41; filename*1*=%42");
        assert_eq!(m.param("filename"), Some(&b"AB"[..]));
        // Unknown charsets are dropped, like Go.
        let m = p("form-data; filename*=latin1''%41");
        assert_eq!(m.param("filename"), None);
    }

    #[test]
    fn base_names() {
        assert_eq!(base_name(b"a/b/c.txt"), b"c.txt");
        assert_eq!(base_name(b"c.txt"), b"c.txt");
        assert_eq!(base_name(b"dir/"), b"dir");
        assert_eq!(base_name(b"///"), b"/");
        assert_eq!(base_name(br"C:\x\y.txt"), br"C:\x\y.txt");
    }
}
