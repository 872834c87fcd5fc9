//! Digests of a spooled file, computed in the one pass that writes it, so the backend gets
//! them as headers (`X-File-Sha256: …`) without reading the file twice. The set is the
//! operator's choice; nginx-upload-module users will recognise the menu.

use serde::Deserialize;
use sha1::Digest as _;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Algorithm {
    Md5,
    Sha1,
    Sha256,
    Sha512,
    Crc32c,
}

impl Algorithm {
    /// The header name's suffix after `headers.file_digest_prefix`.
    pub fn header_suffix(self) -> &'static str {
        match self {
            Algorithm::Md5 => "Md5",
            Algorithm::Sha1 => "Sha1",
            Algorithm::Sha256 => "Sha256",
            Algorithm::Sha512 => "Sha512",
            Algorithm::Crc32c => "Crc32c",
        }
    }
}

enum State {
    Md5(md5::Md5),
    Sha1(sha1::Sha1),
    Sha256(sha2::Sha256),
    Sha512(sha2::Sha512),
    Crc32c(u32),
}

/// The running digests of one file.
pub struct Digests(Vec<(Algorithm, State)>);

impl Digests {
    pub fn new(algorithms: &[Algorithm]) -> Digests {
        Digests(
            algorithms
                .iter()
                .map(|&a| {
                    let s = match a {
                        Algorithm::Md5 => State::Md5(md5::Md5::new()),
                        Algorithm::Sha1 => State::Sha1(sha1::Sha1::new()),
                        Algorithm::Sha256 => State::Sha256(sha2::Sha256::new()),
                        Algorithm::Sha512 => State::Sha512(sha2::Sha512::new()),
                        Algorithm::Crc32c => State::Crc32c(0),
                    };
                    (a, s)
                })
                .collect(),
        )
    }

    pub fn update(&mut self, data: &[u8]) {
        for (_, s) in &mut self.0 {
            match s {
                State::Md5(h) => h.update(data),
                State::Sha1(h) => h.update(data),
                State::Sha256(h) => h.update(data),
                State::Sha512(h) => h.update(data),
                State::Crc32c(c) => *c = crc32c::crc32c_append(*c, data),
            }
        }
    }

    /// Each algorithm with its digest in lower-case hex (CRC32C as 8 digits, big-endian).
    pub fn finish(self) -> Vec<(Algorithm, String)> {
        self.0
            .into_iter()
            .map(|(a, s)| {
                let hex = match s {
                    State::Md5(h) => hex(&h.finalize()),
                    State::Sha1(h) => hex(&h.finalize()),
                    State::Sha256(h) => hex(&h.finalize()),
                    State::Sha512(h) => hex(&h.finalize()),
                    State::Crc32c(c) => hex(&c.to_be_bytes()),
                };
                (a, hex)
            })
            .collect()
    }
}

fn hex(b: &[u8]) -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(b.len() * 2);
    for &c in b {
        s.push(HEX[(c >> 4) as usize] as char);
        s.push(HEX[(c & 15) as usize] as char);
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use Algorithm::*;

    #[test]
    fn known_answers_split_anywhere() {
        // Published test vectors for "The quick brown fox jumps over the lazy dog"; CRC32C's
        // check value is the one for "123456789".
        let fox = b"The quick brown fox jumps over the lazy dog";
        for split in [0, 1, 17, fox.len()] {
            let mut d = Digests::new(&[Md5, Sha1, Sha256, Sha512]);
            d.update(&fox[..split]);
            d.update(&fox[split..]);
            let got = d.finish();
            assert_eq!(got[0].1, "9e107d9d372bb6826bd81d3542a419d6");
            assert_eq!(got[1].1, "2fd4e1c67a2d28fced849ee1bb76e7391b93eb12");
            assert_eq!(
                got[2].1,
                "d7a8fbb307d7809469ca9abcb0082e4f8d5651e46d3cdb762d02d0bf37c9e592"
            );
            assert!(got[3]
                .1
                .starts_with("07e547d9586f6a73f73fbac0435ed76951218fb7d0c8d788"));
        }
        let mut c = Digests::new(&[Crc32c]);
        c.update(b"1234");
        c.update(b"56789");
        assert_eq!(c.finish(), vec![(Crc32c, "e3069283".to_string())]);
    }

    #[test]
    fn empty_set_is_empty() {
        let mut d = Digests::new(&[]);
        d.update(b"x");
        assert!(d.finish().is_empty());
    }
}
