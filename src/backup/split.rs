//! The tar stream, cut into parts while it is read, and put back together. Blocking I/O:
//! run on the blocking pool; the async side is on the other end of a bounded channel, so
//! memory stays at a few parts however large the backup is.

use std::io::{self, Read};
use std::path::Path;

use tokio::sync::mpsc;

/// The largest `backup_manifest` read (PostgreSQL's is about 150 bytes per file).
const MAX_MANIFEST: u64 = 1 << 30;

/// Passes everything it reads on, in `part_size` pieces, to `parts`.
struct Splitter<R> {
    inner: R,
    part_size: usize,
    buf: Vec<u8>,
    parts: mpsc::Sender<Vec<u8>>,
    total: u64,
}

impl<R: Read> Splitter<R> {
    fn send(&mut self, part: Vec<u8>) -> io::Result<()> {
        self.parts
            .blocking_send(part)
            .map_err(|_| io::Error::other("the uploads stopped"))
    }
}

impl<R: Read> Read for Splitter<R> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(out)?;
        self.total += n as u64;
        self.buf.extend_from_slice(&out[..n]);
        while self.buf.len() >= self.part_size {
            let rest = self.buf.split_off(self.part_size);
            let part = std::mem::replace(&mut self.buf, rest);
            self.send(part)?;
        }
        Ok(n)
    }
}

/// What reading the stream found.
#[derive(Debug)]
pub struct Split {
    pub bytes: u64,
    /// The `backup_manifest` entry pg_basebackup puts at the end of the stream.
    pub manifest: Option<Vec<u8>>,
}

/// Reads the tar stream from `input` to its end, sending it on in parts, and keeps the
/// `backup_manifest` entry. The tar is only walked, never rewritten: the parts are the
/// stream byte for byte.
pub fn split_tar(
    input: impl Read,
    part_size: usize,
    parts: mpsc::Sender<Vec<u8>>,
) -> io::Result<Split> {
    let mut s = Splitter {
        inner: input,
        part_size,
        buf: Vec::with_capacity(part_size),
        parts,
        total: 0,
    };
    let mut manifest = None;
    {
        let mut archive = tar::Archive::new(&mut s);
        for entry in archive.entries()? {
            let mut entry = entry?;
            if entry.path()?.as_ref() == Path::new("backup_manifest") {
                let mut m = Vec::new();
                (&mut entry).take(MAX_MANIFEST).read_to_end(&mut m)?;
                manifest = Some(m);
            }
        }
    }
    // What follows the end-of-archive marker is part of the stream too.
    io::copy(&mut s, &mut io::sink())?;
    let last = std::mem::take(&mut s.buf);
    if !last.is_empty() {
        s.send(last)?;
    }
    Ok(Split {
        bytes: s.total,
        manifest,
    })
}

/// Reads the parts received from a channel as one stream (the async side sends them in
/// order; a closed channel is the end).
pub struct Joined {
    parts: mpsc::Receiver<Vec<u8>>,
    current: Vec<u8>,
    pos: usize,
}

impl Joined {
    pub fn new(parts: mpsc::Receiver<Vec<u8>>) -> Joined {
        Joined {
            parts,
            current: Vec::new(),
            pos: 0,
        }
    }
}

impl Read for Joined {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        while self.pos == self.current.len() {
            match self.parts.blocking_recv() {
                Some(p) => {
                    self.current = p;
                    self.pos = 0;
                }
                None => return Ok(0),
            }
        }
        let n = out.len().min(self.current.len() - self.pos);
        out[..n].copy_from_slice(&self.current[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

/// Unpacks the tar stream read from `input` into `dir` (tar refuses entries that would land
/// outside it), keeping modes; then reads the stream to its end.
pub fn unpack_tar(mut input: impl Read, dir: &Path) -> io::Result<()> {
    {
        let mut archive = tar::Archive::new(&mut input);
        archive.set_preserve_permissions(true);
        archive.set_overwrite(false);
        archive.unpack(dir)?;
    }
    io::copy(&mut input, &mut io::sink())?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample_tar() -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (path, content) in [
            ("PG_VERSION", b"15\n".to_vec()),
            ("base/1/1259", vec![7u8; 30_000]),
            ("backup_manifest", br#"{"Files": []}"#.to_vec()),
        ] {
            let mut h = tar::Header::new_ustar();
            h.set_size(content.len() as u64);
            h.set_mode(0o600);
            h.set_cksum();
            b.append_data(&mut h, path, content.as_slice()).unwrap();
        }
        b.into_inner().unwrap()
    }

    #[test]
    fn split_parts_join_back_and_unpack() {
        let tar = sample_tar();
        let (tx, mut rx) = mpsc::channel(64);
        let split = split_tar(tar.as_slice(), 4096, tx).unwrap();
        assert_eq!(split.bytes, tar.len() as u64);
        assert_eq!(split.manifest.as_deref(), Some(&br#"{"Files": []}"#[..]));
        let mut parts = Vec::new();
        while let Ok(p) = rx.try_recv() {
            parts.push(p);
        }
        assert!(parts[..parts.len() - 1].iter().all(|p| p.len() == 4096));
        assert_eq!(
            parts.concat(),
            tar,
            "the parts are the stream byte for byte"
        );

        let (tx, rx) = mpsc::channel(64);
        for p in parts {
            tx.try_send(p).unwrap();
        }
        drop(tx);
        let dir = tempfile::tempdir().unwrap();
        unpack_tar(Joined::new(rx), dir.path()).unwrap();
        assert_eq!(
            std::fs::read(dir.path().join("base/1/1259")).unwrap(),
            vec![7u8; 30_000]
        );
        assert_eq!(
            std::fs::read(dir.path().join("PG_VERSION")).unwrap(),
            b"15\n"
        );
    }

    #[test]
    fn a_stream_that_is_not_tar_fails() {
        let (tx, _rx) = mpsc::channel(64);
        assert!(split_tar(&[1u8; 1000][..], 4096, tx).is_err());
    }
}
