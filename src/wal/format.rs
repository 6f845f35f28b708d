//! The archived object format: a fixed header, then the (compressed) payload.
//!
//! ```text
//! offset size  field
//!      0    8  magic "PGWWAL\r\n" (the CR LF catches text-mode mangling)
//!      8    1  format version (1)
//!      9    1  compression: 0 none, 1 gzip, 2 zstd
//!     10    6  reserved, zero
//!     16    8  uncompressed length, little endian
//!     24   32  SHA-256 of the uncompressed content
//!     56       payload
//! ```
//!
//! The checksum travels inside the object, so any store keeps it, an upload stays one atomic
//! PUT or rename, and reading the first [`HEADER_LEN`] bytes is enough to tell whether an
//! object already archived holds the same content. Pure functions only: no I/O here.

use std::io::{Read, Write};

use sha2::{Digest, Sha256};

pub const MAGIC: &[u8; 8] = b"PGWWAL\r\n";
pub const VERSION: u8 = 1;
pub const HEADER_LEN: usize = 56;
/// Refuse to inflate anything claiming to be larger than this (the largest WAL segment
/// Postgres allows is 1 GiB).
pub const MAX_CONTENT: u64 = 1 << 30;

#[derive(
    Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, serde::Serialize, schemars::JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    None,
    Gzip,
    Zstd,
}

impl Compression {
    fn code(self) -> u8 {
        match self {
            Compression::None => 0,
            Compression::Gzip => 1,
            Compression::Zstd => 2,
        }
    }
    fn from_code(c: u8) -> Option<Compression> {
        match c {
            0 => Some(Compression::None),
            1 => Some(Compression::Gzip),
            2 => Some(Compression::Zstd),
            _ => None,
        }
    }
    pub fn as_str(self) -> &'static str {
        match self {
            Compression::None => "none",
            Compression::Gzip => "gzip",
            Compression::Zstd => "zstd",
        }
    }
}

/// What the header says about an object.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub compression: Compression,
    pub length: u64,
    pub sha256: [u8; 32],
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FormatError {
    #[error("not a pgwarden WAL object (bad magic)")]
    BadMagic,
    #[error("object is shorter than its header")]
    Truncated,
    #[error("unsupported format version {0}")]
    Version(u8),
    #[error("unknown compression code {0}")]
    Compression(u8),
    #[error("declared length {0} is too large")]
    TooLarge(u64),
    #[error("payload cannot be decompressed: {0}")]
    Decompress(String),
    #[error("content cannot be compressed: {0}")]
    Compress(String),
    #[error("length mismatch: header says {expected} bytes, payload has {actual}")]
    Length { expected: u64, actual: u64 },
    #[error("checksum mismatch: header says sha256 {expected}, content has {actual}")]
    Checksum { expected: String, actual: String },
}

pub fn sha256(data: &[u8]) -> [u8; 32] {
    Sha256::digest(data).into()
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

impl Header {
    pub fn of(content: &[u8], compression: Compression) -> Header {
        Header {
            compression,
            length: content.len() as u64,
            sha256: sha256(content),
        }
    }

    pub fn to_bytes(&self) -> [u8; HEADER_LEN] {
        let mut h = [0u8; HEADER_LEN];
        h[..8].copy_from_slice(MAGIC);
        h[8] = VERSION;
        h[9] = self.compression.code();
        h[16..24].copy_from_slice(&self.length.to_le_bytes());
        h[24..56].copy_from_slice(&self.sha256);
        h
    }

    /// Parses the header at the start of `bytes` (which may be the whole object or a prefix).
    pub fn parse(bytes: &[u8]) -> Result<Header, FormatError> {
        if bytes.len() < 8 || &bytes[..8] != MAGIC {
            return Err(if bytes.len() < 8 && MAGIC.starts_with(bytes) {
                FormatError::Truncated
            } else {
                FormatError::BadMagic
            });
        }
        if bytes.len() < HEADER_LEN {
            return Err(FormatError::Truncated);
        }
        if bytes[8] != VERSION {
            return Err(FormatError::Version(bytes[8]));
        }
        let compression =
            Compression::from_code(bytes[9]).ok_or(FormatError::Compression(bytes[9]))?;
        let mut len = [0u8; 8];
        len.copy_from_slice(&bytes[16..24]);
        let length = u64::from_le_bytes(len);
        if length > MAX_CONTENT {
            return Err(FormatError::TooLarge(length));
        }
        let mut sha = [0u8; 32];
        sha.copy_from_slice(&bytes[24..56]);
        Ok(Header {
            compression,
            length,
            sha256: sha,
        })
    }
}

/// The content checksum an encoded object carries (zero when it has no valid header).
pub fn sha256_of_object(object: &[u8]) -> [u8; 32] {
    Header::parse(object).map_or([0u8; 32], |h| h.sha256)
}

/// Header + compressed payload for `content`. CPU-bound: call from a blocking thread.
pub fn encode(content: &[u8], compression: Compression) -> Result<Vec<u8>, FormatError> {
    let header = Header::of(content, compression);
    let mut out = Vec::with_capacity(HEADER_LEN + content.len() / 2);
    out.extend_from_slice(&header.to_bytes());
    match compression {
        Compression::None => out.extend_from_slice(content),
        Compression::Gzip => {
            // Level 1: WAL compresses well even so, and a 16 MiB segment stays well under a
            // second on one core.
            let mut enc = flate2::write::GzEncoder::new(out, flate2::Compression::fast());
            enc.write_all(content)
                .map_err(|e| FormatError::Compress(e.to_string()))?;
            out = enc
                .finish()
                .map_err(|e| FormatError::Compress(e.to_string()))?;
        }
        Compression::Zstd => {
            let compressed = zstd::bulk::compress(content, 3)
                .map_err(|e| FormatError::Compress(e.to_string()))?;
            out.extend_from_slice(&compressed);
        }
    }
    Ok(out)
}

/// Decompresses and verifies an object: the content is returned only when its length and
/// SHA-256 match the header. CPU-bound: call from a blocking thread.
pub fn decode(object: &[u8]) -> Result<(Header, Vec<u8>), FormatError> {
    let header = Header::parse(object)?;
    let payload = &object[HEADER_LEN..];
    // Never inflate past the declared length (+1 to notice a longer payload).
    let limit = header.length + 1;
    let content = match header.compression {
        Compression::None => payload.to_vec(),
        Compression::Gzip => {
            let mut out = Vec::with_capacity(header.length as usize);
            flate2::read::GzDecoder::new(payload)
                .take(limit)
                .read_to_end(&mut out)
                .map_err(|e| FormatError::Decompress(e.to_string()))?;
            out
        }
        Compression::Zstd => {
            let mut out = Vec::with_capacity(header.length as usize);
            zstd::stream::read::Decoder::new(payload)
                .map_err(|e| FormatError::Decompress(e.to_string()))?
                .take(limit)
                .read_to_end(&mut out)
                .map_err(|e| FormatError::Decompress(e.to_string()))?;
            out
        }
    };
    if content.len() as u64 != header.length {
        return Err(FormatError::Length {
            expected: header.length,
            actual: content.len() as u64,
        });
    }
    let actual = sha256(&content);
    if actual != header.sha256 {
        return Err(FormatError::Checksum {
            expected: hex(&header.sha256),
            actual: hex(&actual),
        });
    }
    Ok((header, content))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Vec<u8> {
        // WAL-like: mostly repetitive with some noise.
        (0..200_000u32)
            .map(|i| if i % 97 == 0 { (i / 97) as u8 } else { 0 })
            .collect()
    }

    #[test]
    fn round_trips_with_every_compression() {
        let content = sample();
        for c in [Compression::None, Compression::Gzip, Compression::Zstd] {
            let obj = encode(&content, c).unwrap();
            let (h, back) = decode(&obj).unwrap();
            assert_eq!(back, content, "{c:?}");
            assert_eq!(h.compression, c);
            assert_eq!(h.length, content.len() as u64);
            assert_eq!(Header::parse(&obj[..HEADER_LEN]).unwrap(), h);
            if c != Compression::None {
                assert!(obj.len() < content.len() / 4, "{c:?} compresses");
            }
        }
        let (_, empty) = decode(&encode(&[], Compression::Zstd).unwrap()).unwrap();
        assert!(empty.is_empty());
    }

    #[test]
    fn corruption_is_detected() {
        let content = sample();
        for c in [Compression::None, Compression::Gzip, Compression::Zstd] {
            let obj = encode(&content, c).unwrap();
            // A flipped payload byte: decompression fails or the checksum does not match.
            let mut bad = obj.clone();
            let at = HEADER_LEN + (bad.len() - HEADER_LEN) / 2;
            bad[at] ^= 0x55;
            assert!(decode(&bad).is_err(), "{c:?} flipped byte");
            // A flipped checksum byte.
            let mut bad = obj.clone();
            bad[30] ^= 1;
            assert!(
                matches!(decode(&bad), Err(FormatError::Checksum { .. })),
                "{c:?}"
            );
            // Truncated payload.
            assert!(decode(&obj[..obj.len() - 10]).is_err(), "{c:?} truncated");
        }
        assert_eq!(decode(b"PGWX"), Err(FormatError::BadMagic));
        assert_eq!(decode(b"PGWWAL"), Err(FormatError::Truncated));
        assert_eq!(decode(&[0u8; 100]), Err(FormatError::BadMagic));
        let mut v = encode(b"x", Compression::None).unwrap();
        v[8] = 9;
        assert_eq!(decode(&v), Err(FormatError::Version(9)));
        let mut v = encode(b"x", Compression::None).unwrap();
        v[9] = 7;
        assert_eq!(decode(&v), Err(FormatError::Compression(7)));
    }

    #[test]
    fn a_payload_longer_than_declared_is_refused() {
        let mut obj = encode(b"hello", Compression::None).unwrap();
        obj.extend_from_slice(b"!!");
        assert!(matches!(decode(&obj), Err(FormatError::Length { .. })));
    }
}
