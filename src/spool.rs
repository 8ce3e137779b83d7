//! Append-only segment files that hold the outbox's detection batches.
//!
//! sled serializes whole tree nodes on every write and reads large values back
//! from blob files, so batches of megabytes stored in sled dominated both run
//! time and memory. Here each batch is one record appended to the current
//! segment file and `fsync`ed; sled keeps only a small index entry per batch
//! (segment, offset, length), written after the record is on disk.
//!
//! # Record format
//! `u32` big-endian payload length, `u32` CRC-32 of the payload, payload.
//!
//! # Crash safety
//! A record is durable before any index entry points at it. A crash after the
//! append and before the index commit leaves bytes that nothing references;
//! they are deleted with their segment. After a restart writing starts in a
//! new segment, so a torn tail is never appended to. Reads check the length
//! and the CRC, so damage is reported instead of forwarded: a segment file
//! that is missing or ends early, a length that differs from the index, or
//! a CRC mismatch is [`SpoolError::Damaged`], and
//! [`Spool::read_damaged`] returns whatever bytes of such a record remain.

use std::fs::{self, File, OpenOptions};
use std::io::{self, IoSlice, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{DirBuilderExt, FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// A segment is closed and a new one started past this size.
pub const SEGMENT_BYTES: u64 = 64 * 1024 * 1024;
const HEADER_BYTES: u64 = 8;
pub(crate) const SUFFIX: &str = ".spool";
/// Slices per vectored write. Linux accepts at most 1024 (`IOV_MAX`).
const MAX_SLICES: usize = 1024;

/// Location of a record: segment, offset and payload length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordRef {
    pub segment: u64,
    pub offset: u64,
    pub len: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    #[error("spool {path}: {source}; check free space and permissions; the operation is retried")]
    Io { path: PathBuf, source: io::Error },
    /// The record cannot be read back as written; reading again cannot help.
    /// The store also reports a record that passes its CRC check but is
    /// not a valid outbox batch this way.
    #[error("spool segment file {path}: the record at offset {offset} is damaged: {detail}")]
    Damaged { path: PathBuf, offset: u64, detail: String },
}

struct Writer {
    segment: u64,
    file: File,
    len: u64,
}

pub struct Spool {
    dir: PathBuf,
    segment_bytes: u64,
    writer: Mutex<Option<Writer>>,
    /// The segment new records go to; older ones are only read and deleted.
    next_segment: Mutex<u64>,
    /// No segment below this one exists, so [`Spool::remove_below`] lists
    /// the directory only when it has something to delete.
    lowest_segment: Mutex<u64>,
}

impl Spool {
    /// Opens the spool directory; writing will start in a new segment.
    pub fn open(dir: &Path) -> Result<Self, SpoolError> {
        Self::open_with(dir, SEGMENT_BYTES)
    }

    /// Like [`Spool::open`] with another segment size (tests use small ones).
    pub fn open_with(dir: &Path, segment_bytes: u64) -> Result<Self, SpoolError> {
        let io = |source| SpoolError::Io { path: dir.to_path_buf(), source };
        fs::DirBuilder::new().recursive(true).mode(0o700).create(dir).map_err(io)?;
        let present = segments(dir).map_err(io)?;
        let highest = present.iter().copied().max().unwrap_or(0);
        let lowest = present.iter().copied().min().unwrap_or(highest + 1);
        Ok(Self {
            dir: dir.to_path_buf(),
            segment_bytes,
            writer: Mutex::new(None),
            next_segment: Mutex::new(highest + 1),
            lowest_segment: Mutex::new(lowest),
        })
    }

    pub(crate) fn segment_path(&self, segment: u64) -> PathBuf {
        self.dir.join(format!("{segment:016x}{SUFFIX}"))
    }

    /// Appends one record and makes it durable.
    pub fn append(&self, payload: &[u8]) -> Result<RecordRef, SpoolError> {
        self.append_parts(&[payload])
    }

    /// Appends one record whose payload is `parts` one after another, and
    /// makes it durable. The parts go to the file with vectored writes, so a
    /// batch of detections is not copied into one buffer first.
    pub fn append_parts(&self, parts: &[&[u8]]) -> Result<RecordRef, SpoolError> {
        let len: usize = parts.iter().map(|part| part.len()).sum();
        let Ok(len) = u32::try_from(len) else {
            return Err(SpoolError::Io {
                path: self.dir.clone(),
                source: io::Error::new(io::ErrorKind::InvalidInput, format!("a record of {len} bytes is over the 4 GiB limit")),
            });
        };
        let mut guard = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        if guard.as_ref().map_or(true, |w| w.len >= self.segment_bytes) {
            *guard = Some(self.new_segment()?);
        }
        let Some(writer) = guard.as_mut() else {
            return Err(SpoolError::Io { path: self.dir.clone(), source: io::Error::other("no open segment") });
        };
        let path = self.segment_path(writer.segment);
        let offset = writer.len;
        let mut crc = crc32fast::Hasher::new();
        for part in parts {
            crc.update(part);
        }
        let mut header = [0u8; HEADER_BYTES as usize];
        header[..4].copy_from_slice(&len.to_be_bytes());
        header[4..].copy_from_slice(&crc.finalize().to_be_bytes());
        let written = write_all_parts(&mut writer.file, &header, parts).and_then(|_| writer.file.sync_data());
        if let Err(source) = written {
            // The tail may be torn: never append after it.
            *guard = None;
            return Err(SpoolError::Io { path, source });
        }
        writer.len += HEADER_BYTES + len as u64;
        Ok(RecordRef { segment: writer.segment, offset, len })
    }

    fn new_segment(&self) -> Result<Writer, SpoolError> {
        let mut next = self.next_segment.lock().unwrap_or_else(|e| e.into_inner());
        let segment = *next;
        let path = self.segment_path(segment);
        let file = OpenOptions::new()
            .create_new(true)
            .append(true)
            .mode(0o600)
            .open(&path)
            .map_err(|source| SpoolError::Io { path: path.clone(), source })?;
        // The new directory entry must survive a crash too.
        File::open(&self.dir).and_then(|d| d.sync_all()).map_err(|source| SpoolError::Io { path, source })?;
        *next = segment + 1;
        Ok(Writer { segment, file, len: 0 })
    }

    /// Reads a record back and checks its length and CRC.
    pub fn read(&self, record: RecordRef) -> Result<Vec<u8>, SpoolError> {
        let path = self.segment_path(record.segment);
        let io = |source| SpoolError::Io { path: path.clone(), source };
        let damaged = |detail: String| SpoolError::Damaged { path: path.clone(), offset: record.offset, detail };
        let mut file = match File::open(&path) {
            Ok(file) => file,
            // Segments are deleted only once no index entry points into
            // them, so an indexed record in a missing file is lost for good.
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(damaged("the segment file is missing".into())),
            Err(e) => return Err(io(e)),
        };
        let mut header = [0u8; HEADER_BYTES as usize];
        match file.read_exact_at(&mut header, record.offset) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                let size = file.metadata().map_err(io)?.len();
                return Err(damaged(format!("the file ends at byte {size}, before the record's {HEADER_BYTES}-byte header")));
            }
            Err(e) => return Err(io(e)),
        }
        let len = u32::from_be_bytes([header[0], header[1], header[2], header[3]]);
        let crc = u32::from_be_bytes([header[4], header[5], header[6], header[7]]);
        if len != record.len {
            return Err(damaged(format!("the header gives a length of {len} bytes, the outbox index {}", record.len)));
        }
        // read_to_end fills spare capacity without zeroing it first.
        let mut payload = Vec::with_capacity(len as usize);
        file.seek(SeekFrom::Start(record.offset + HEADER_BYTES)).map_err(io)?;
        (&mut file).take(len as u64).read_to_end(&mut payload).map_err(io)?;
        if payload.len() != len as usize {
            return Err(damaged(format!("the record is cut short: only {} of its {len} bytes are in the file", payload.len())));
        }
        let actual = crc32fast::hash(&payload);
        if actual != crc {
            return Err(damaged(format!("CRC mismatch: the header has {crc:08x}, the {len} bytes give {actual:08x}")));
        }
        Ok(payload)
    }

    /// Returns the bytes of a damaged record that are still in the file,
    /// without any check: the payload from after the header up to the
    /// index's length or the end of the file. Empty when the segment file
    /// is missing or ends before the payload.
    pub fn read_damaged(&self, record: RecordRef) -> Result<Vec<u8>, SpoolError> {
        let path = self.segment_path(record.segment);
        let mut file = match File::open(&path) {
            Ok(file) => file,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(source) => return Err(SpoolError::Io { path, source }),
        };
        let mut payload = Vec::new();
        let read = file
            .seek(SeekFrom::Start(record.offset + HEADER_BYTES))
            .and_then(|_| (&mut file).take(u64::from(record.len)).read_to_end(&mut payload));
        read.map_err(|source| SpoolError::Io { path, source })?;
        Ok(payload)
    }

    /// Returns whether [`Spool::remove_below`] with `keep_from` may delete
    /// a segment file.
    pub fn has_segments_below(&self, keep_from: u64) -> bool {
        keep_from > *self.lowest_segment.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Deletes every segment below `keep_from`, except the one being written.
    pub fn remove_below(&self, keep_from: u64) -> Result<usize, SpoolError> {
        let mut lowest = self.lowest_segment.lock().unwrap_or_else(|e| e.into_inner());
        if keep_from <= *lowest {
            return Ok(0);
        }
        let writing = self.writer.lock().unwrap_or_else(|e| e.into_inner()).as_ref().map(|w| w.segment);
        let io = |source| SpoolError::Io { path: self.dir.clone(), source };
        let mut removed = 0;
        for segment in segments(&self.dir).map_err(io)? {
            if segment < keep_from && Some(segment) != writing {
                let path = self.segment_path(segment);
                fs::remove_file(&path).map_err(|source| SpoolError::Io { path, source })?;
                removed += 1;
            }
        }
        *lowest = writing.map_or(keep_from, |writing| writing.min(keep_from));
        Ok(removed)
    }

    /// Bytes of all segment files, for `state show`.
    pub fn disk_bytes(&self) -> u64 {
        let Ok(list) = segments(&self.dir) else { return 0 };
        list.into_iter().filter_map(|s| fs::metadata(self.segment_path(s)).ok()).map(|m| m.len()).sum()
    }
}

/// Writes `header` and then `parts`, at most [`MAX_SLICES`] slices per
/// system call, resuming after a short write.
fn write_all_parts(file: &mut impl Write, header: &[u8], parts: &[&[u8]]) -> io::Result<()> {
    let mut pending: std::collections::VecDeque<&[u8]> = std::iter::once(header).chain(parts.iter().copied()).filter(|p| !p.is_empty()).collect();
    while !pending.is_empty() {
        let slices: Vec<IoSlice<'_>> = pending.iter().take(MAX_SLICES).map(|part| IoSlice::new(part)).collect();
        let mut written = match file.write_vectored(&slices) {
            Ok(0) => return Err(io::Error::new(io::ErrorKind::WriteZero, "the file accepted no more bytes")),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        // Drops the parts written whole and shortens the one written in part.
        while let Some(first) = pending.front_mut() {
            if written < first.len() {
                *first = &first[written..];
                break;
            }
            written -= first.len();
            pending.pop_front();
        }
    }
    Ok(())
}

/// Segment numbers present in `dir`.
fn segments(dir: &Path) -> io::Result<Vec<u64>> {
    let mut found = Vec::new();
    for entry in fs::read_dir(dir)? {
        let name = entry?.file_name();
        let Some(name) = name.to_str() else { continue };
        if let Some(hex) = name.strip_suffix(SUFFIX) {
            if let Ok(segment) = u64::from_str_radix(hex, 16) {
                found.push(segment);
            }
        }
    }
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_read_back_exactly() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path()).unwrap();
        let a = spool.append(b"first").unwrap();
        let b = spool.append("二 second".as_bytes()).unwrap();
        assert_eq!(spool.read(a).unwrap(), b"first");
        assert_eq!(spool.read(b).unwrap(), "二 second".as_bytes());
        assert_eq!(b.offset, HEADER_BYTES + 5);
    }

    #[test]
    fn parts_read_back_as_one_payload() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path()).unwrap();
        // More parts than one vectored write takes, some of them empty.
        let owned: Vec<Vec<u8>> = (0..3 * MAX_SLICES).map(|i| vec![(i % 251) as u8; i % 7]).collect();
        let parts: Vec<&[u8]> = owned.iter().map(Vec::as_slice).collect();
        let record = spool.append_parts(&parts).unwrap();
        assert_eq!(spool.read(record).unwrap(), owned.concat());
        assert_eq!(spool.read(spool.append_parts(&[]).unwrap()).unwrap(), b"");
        assert_eq!(spool.read(spool.append(b"after").unwrap()).unwrap(), b"after");
    }

    /// Takes at most a few bytes per call and fails every third call with
    /// `Interrupted`, like a slow or signalled file.
    struct Trickle {
        written: Vec<u8>,
        calls: usize,
    }

    impl Write for Trickle {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.calls += 1;
            if self.calls % 3 == 0 {
                return Err(io::ErrorKind::Interrupted.into());
            }
            let n = buf.len().min(self.calls % 7 + 1);
            self.written.extend_from_slice(&buf[..n]);
            Ok(n)
        }

        fn write_vectored(&mut self, slices: &[IoSlice<'_>]) -> io::Result<usize> {
            assert!(slices.len() <= MAX_SLICES);
            let first = slices.iter().find(|s| !s.is_empty()).map_or(&[][..], |s| &**s);
            self.write(first)
        }

        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn short_writes_resume_in_order() {
        let owned: Vec<Vec<u8>> = (0..2500).map(|i| (0..i % 5).map(|j| (i * 5 + j) as u8).collect()).collect();
        let parts: Vec<&[u8]> = owned.iter().map(Vec::as_slice).collect();
        let mut file = Trickle { written: Vec::new(), calls: 0 };
        write_all_parts(&mut file, b"head", &parts).unwrap();
        assert_eq!(file.written, [b"head".to_vec(), owned.concat()].concat());
    }

    #[test]
    fn reopening_starts_a_new_segment() {
        let dir = tempfile::tempdir().unwrap();
        let first = Spool::open(dir.path()).unwrap().append(b"x").unwrap();
        let spool = Spool::open(dir.path()).unwrap();
        let second = spool.append(b"y").unwrap();
        assert!(second.segment > first.segment);
        assert_eq!(spool.read(first).unwrap(), b"x");
    }

    #[test]
    fn damaged_record_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path()).unwrap();
        let record = spool.append(b"payload").unwrap();
        let path = spool.segment_path(record.segment);
        let mut bytes = fs::read(&path).unwrap();
        bytes[10] ^= 0xff;
        fs::write(&path, bytes).unwrap();
        let err = spool.read(record).unwrap_err();
        assert!(err.to_string().contains("CRC mismatch"), "{err}");
    }

    /// Appends `first` and `second` and returns the spool, both records and
    /// the segment file's path.
    fn two_records(dir: &Path) -> (Spool, RecordRef, RecordRef, PathBuf) {
        let spool = Spool::open(dir).unwrap();
        let first = spool.append(b"first payload").unwrap();
        let second = spool.append(b"second payload").unwrap();
        let path = spool.segment_path(first.segment);
        (spool, first, second, path)
    }

    #[test]
    fn damage_names_file_offset_and_cause() {
        let dir = tempfile::tempdir().unwrap();
        let (spool, first, second, path) = two_records(dir.path());
        let mut bytes = fs::read(&path).unwrap();
        bytes[second.offset as usize + HEADER_BYTES as usize] ^= 0x01;
        fs::write(&path, bytes).unwrap();
        assert_eq!(spool.read(first).unwrap(), b"first payload");
        let err = spool.read(second).unwrap_err();
        assert!(matches!(err, SpoolError::Damaged { offset, .. } if offset == second.offset), "{err:?}");
        let message = err.to_string();
        assert!(message.contains(&path.display().to_string()), "{message}");
        assert!(message.contains(&format!("offset {}", second.offset)), "{message}");
        assert!(message.contains("CRC mismatch"), "{message}");
        assert!(!message.contains("free space"), "{message}");
        let mut flipped = b"second payload".to_vec();
        flipped[0] ^= 0x01;
        assert_eq!(spool.read_damaged(second).unwrap(), flipped, "the bytes as they are on disk");
    }

    #[test]
    fn truncated_record_is_damaged() {
        let dir = tempfile::tempdir().unwrap();
        let (spool, first, second, path) = two_records(dir.path());
        let file = OpenOptions::new().write(true).open(&path).unwrap();
        file.set_len(second.offset + HEADER_BYTES + 6).unwrap();
        let err = spool.read(second).unwrap_err().to_string();
        assert!(err.contains("cut short: only 6 of its 14 bytes"), "{err}");
        assert_eq!(spool.read_damaged(second).unwrap(), b"second");

        file.set_len(second.offset + 3).unwrap();
        let err = spool.read(second).unwrap_err();
        assert!(matches!(err, SpoolError::Damaged { .. }), "{err:?}");
        assert!(err.to_string().contains(&format!("ends at byte {}", second.offset + 3)), "{err}");
        assert_eq!(spool.read_damaged(second).unwrap(), b"");
        assert_eq!(spool.read(first).unwrap(), b"first payload");
    }

    #[test]
    fn length_mismatch_and_missing_file_are_damaged() {
        let dir = tempfile::tempdir().unwrap();
        let (spool, first, _, path) = two_records(dir.path());
        let wrong = RecordRef { len: first.len + 1, ..first };
        let err = spool.read(wrong).unwrap_err().to_string();
        assert!(err.contains("length of 13 bytes, the outbox index 14"), "{err}");
        fs::remove_file(&path).unwrap();
        let err = spool.read(first).unwrap_err();
        assert!(matches!(err, SpoolError::Damaged { .. }), "{err:?}");
        assert!(err.to_string().contains("segment file is missing"), "{err}");
        assert_eq!(spool.read_damaged(first).unwrap(), b"");
    }

    #[test]
    fn remove_below_keeps_current_segment() {
        let dir = tempfile::tempdir().unwrap();
        let old = Spool::open(dir.path()).unwrap().append(b"x").unwrap();
        let spool = Spool::open(dir.path()).unwrap();
        let current = spool.append(b"y").unwrap();
        assert_eq!(spool.remove_below(u64::MAX).unwrap(), 1);
        assert!(spool.read(old).is_err());
        assert_eq!(spool.read(current).unwrap(), b"y");
    }

    /// Segments written while the current one was kept are still deleted
    /// later, although no listing runs while nothing is below the limit.
    #[test]
    fn remove_below_deletes_segments_of_every_rollover() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open_with(dir.path(), 1).unwrap();
        let records: Vec<RecordRef> = (0..5u8).map(|i| spool.append(&[i]).unwrap()).collect();
        assert_eq!(segments(dir.path()).unwrap().len(), 5);
        assert_eq!(spool.remove_below(records[2].segment).unwrap(), 2);
        assert_eq!(spool.remove_below(records[2].segment).unwrap(), 0);
        assert_eq!(spool.remove_below(records[1].segment).unwrap(), 0);
        assert_eq!(spool.remove_below(u64::MAX).unwrap(), 2, "all but the segment being written");
        let later = spool.append(b"z").unwrap();
        assert_eq!(spool.remove_below(later.segment).unwrap(), 1);
        let mut left = segments(dir.path()).unwrap();
        left.sort();
        assert_eq!(left, [later.segment]);
        assert_eq!(spool.read(later).unwrap(), b"z");
    }
}
