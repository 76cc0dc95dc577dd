//! On-disk records and small durable files.
//!
//! A record is `[len: u32 LE][crc32(payload): u32 LE][payload]`. The log segments are sequences of
//! records; the vote, purge mark and snapshot files hold one or two records each and are replaced
//! atomically (write `NAME.tmp`, fsync, rename, fsync the directory). Decoding is pure and never
//! trusts `len`: a record longer than [`MAX_RECORD`] or past the end of the buffer is a torn or
//! corrupt tail, not an allocation.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::Path;

/// Largest record accepted (a log entry, a snapshot body).
pub(crate) const MAX_RECORD: usize = 256 << 20;

const HEADER: usize = 8;

/// Append one record holding `payload` to `out`.
pub(crate) fn encode_record(payload: &[u8], out: &mut Vec<u8>) {
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(payload).to_le_bytes());
    out.extend_from_slice(payload);
}

/// What the next record of a buffer is.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Decoded<'a> {
    /// A whole record with a good checksum, and the bytes it took.
    Record(&'a [u8], usize),
    /// Nothing left.
    End,
    /// A partial header or body, a bad checksum or an absurd length: the tail from here is cut.
    Torn(&'static str),
}

/// Decode the record at the start of `buf`.
pub(crate) fn decode_record(buf: &[u8]) -> Decoded<'_> {
    if buf.is_empty() {
        return Decoded::End;
    }
    if buf.len() < HEADER {
        return Decoded::Torn("partial record header");
    }
    let mut len = [0u8; 4];
    len.copy_from_slice(&buf[..4]);
    let len = u32::from_le_bytes(len) as usize;
    let mut crc = [0u8; 4];
    crc.copy_from_slice(&buf[4..8]);
    let crc = u32::from_le_bytes(crc);
    if len > MAX_RECORD {
        return Decoded::Torn("record length out of range");
    }
    let Some(payload) = buf.get(HEADER..HEADER + len) else {
        return Decoded::Torn("partial record body");
    };
    if crc32fast::hash(payload) != crc {
        return Decoded::Torn("record checksum mismatch");
    }
    Decoded::Record(payload, HEADER + len)
}

/// fsync a directory so that renames and deletions in it are durable.
pub(crate) fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Replace `dir/name` with the records of `payloads`, atomically and durably.
pub(crate) fn write_atomic(dir: &Path, name: &str, payloads: &[&[u8]]) -> io::Result<()> {
    let mut buf = Vec::with_capacity(payloads.iter().map(|p| p.len() + HEADER).sum());
    for p in payloads {
        encode_record(p, &mut buf);
    }
    let tmp = dir.join(format!("{name}.tmp"));
    {
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)?;
        f.write_all(&buf)?;
        f.sync_all()?;
    }
    fs::rename(&tmp, dir.join(name))?;
    sync_dir(dir)
}

/// Read the records of `dir/name` written by [`write_atomic`]; `None` if the file is absent.
/// A file that does not decode whole is an error: these files are never torn by design.
pub(crate) fn read_records(dir: &Path, name: &str) -> io::Result<Option<Vec<Vec<u8>>>> {
    let buf = match fs::read(dir.join(name)) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let mut at = 0;
    let mut out = Vec::new();
    loop {
        match decode_record(&buf[at..]) {
            Decoded::Record(p, used) => {
                out.push(p.to_vec());
                at += used;
            }
            Decoded::End => return Ok(Some(out)),
            Decoded::Torn(why) => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("{}: {why}", dir.join(name).display()),
                ))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_round_trip_and_layout() {
        let mut buf = Vec::new();
        encode_record(b"abc", &mut buf);
        assert_eq!(&buf[..4], &3u32.to_le_bytes());
        assert_eq!(&buf[4..8], &crc32fast::hash(b"abc").to_le_bytes());
        assert_eq!(&buf[8..], b"abc");
        assert_eq!(decode_record(&buf), Decoded::Record(b"abc", 11));
        assert_eq!(decode_record(&[]), Decoded::End);
    }

    #[test]
    fn every_truncation_is_torn() {
        let mut buf = Vec::new();
        encode_record(b"hello world", &mut buf);
        for cut in 1..buf.len() {
            assert!(
                matches!(decode_record(&buf[..cut]), Decoded::Torn(_)),
                "cut at {cut}"
            );
        }
    }

    #[test]
    fn flipped_bit_and_huge_length_are_torn() {
        let mut buf = Vec::new();
        encode_record(b"payload", &mut buf);
        buf[10] ^= 1;
        assert_eq!(
            decode_record(&buf),
            Decoded::Torn("record checksum mismatch")
        );
        let huge = [0xff, 0xff, 0xff, 0xff, 0, 0, 0, 0, 1];
        assert_eq!(
            decode_record(&huge),
            Decoded::Torn("record length out of range")
        );
    }

    #[test]
    fn atomic_files_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        assert!(read_records(dir.path(), "f").unwrap().is_none());
        write_atomic(dir.path(), "f", &[b"one", b"two"]).unwrap();
        let got = read_records(dir.path(), "f").unwrap().unwrap();
        assert_eq!(got, vec![b"one".to_vec(), b"two".to_vec()]);
        write_atomic(dir.path(), "f", &[b"three"]).unwrap();
        assert_eq!(read_records(dir.path(), "f").unwrap().unwrap().len(), 1);
    }
}
