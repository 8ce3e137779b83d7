//! File sink: newline-framed messages (JSON Lines by default) appended to one file.
//!
//! A batch counts as delivered once it is written and fsync'ed. A write or
//! fsync that fails can leave part of the batch in the file (a full disk
//! fails mid-write), so the file is truncated back to its length before the
//! batch and fsync'ed before the batch is sent again. When the truncation
//! fails too, the file is reopened. It then ends with a fragment, so the next
//! batch starts with a newline and the fragment stays on a line of its own,
//! never merged with a whole message. A file that a crash left without a
//! final newline is handled the same way.
//!
//! The file is written with blocking calls on tokio's blocking pool, so a
//! send that the worker abandons still finishes or truncates its batch.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use super::{Batch, SinkError};

pub struct FileTransport {
    path: PathBuf,
    /// The open file; `None` before the first batch, after an error that
    /// closed it, and after a send that was abandoned.
    file: Option<OpenFile>,
}

struct OpenFile {
    file: File,
    /// True when the file does not end with a newline, so the next batch
    /// must start with one.
    needs_newline: bool,
}

impl FileTransport {
    pub fn new(path: PathBuf) -> Self {
        Self { path, file: None }
    }

    pub(super) async fn send(&mut self, batch: &Batch) -> Result<(), SinkError> {
        let path = self.path.clone();
        let open = self.file.take();
        let bytes = batch.shared_bytes();
        let task = tokio::task::spawn_blocking(move || write_batch(&path, open, bytes.as_ref()));
        let (file, result) = task
            .await
            .map_err(|e| SinkError::File { path: self.path.clone(), source: io::Error::other(e) })?;
        self.file = file;
        result.map_err(|source| SinkError::File { path: self.path.clone(), source })
    }

    /// Closes the file after an abandoned send; the next send reopens it and
    /// starts on a new line if the file ends mid-line.
    pub(super) fn close(&mut self) {
        self.file = None;
    }
}

/// Appends `bytes` and fsyncs, or leaves the file as it was before the batch.
/// Returns the file to keep open (`None` to reopen for the next batch) and
/// the outcome of the batch.
fn write_batch(path: &Path, open: Option<OpenFile>, bytes: &[u8]) -> (Option<OpenFile>, io::Result<()>) {
    let mut open = match open {
        Some(open) => open,
        None => match open_file(path) {
            Ok(open) => open,
            Err(error) => return (None, Err(error)),
        },
    };
    let length_before = match open.file.metadata() {
        Ok(metadata) => metadata.len(),
        Err(error) => return (None, Err(error)),
    };

    let written = append(&mut open, bytes);
    let Err(error) = written else {
        open.needs_newline = false;
        return (Some(open), Ok(()));
    };

    match truncate(&open.file, length_before) {
        Ok(()) => {
            tracing::debug!(path = %path.display(), length = length_before, "removed the part of the failed batch from the file");
            (Some(open), Err(error))
        }
        Err(truncate_error) => {
            tracing::warn!(
                path = %path.display(),
                error = %truncate_error,
                "cannot truncate the file back to its length before the failed batch; the next batch starts on a new line"
            );
            (None, Err(error))
        }
    }
}

fn append(open: &mut OpenFile, bytes: &[u8]) -> io::Result<()> {
    if open.needs_newline {
        open.file.write_all(b"\n")?;
    }
    open.file.write_all(bytes)?;
    open.file.sync_data()
}

fn truncate(file: &File, length: u64) -> io::Result<()> {
    file.set_len(length)?;
    file.sync_data()
}

/// Opens `path` for appending, creating it and its directory if missing,
/// and checks whether it ends mid-line.
fn open_file(path: &Path) -> io::Result<OpenFile> {
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)?;
    }
    let mut options = OpenOptions::new();
    options.create(true).append(true).mode(0o640);
    // Reading the last byte needs read access. Without it, a non-empty file
    // is assumed to end mid-line: at worst that adds one empty line.
    let (file, readable) = match options.clone().read(true).open(path) {
        Ok(file) => (file, true),
        Err(error) if error.kind() == io::ErrorKind::PermissionDenied => (options.open(path)?, false),
        Err(error) => return Err(error),
    };
    let length = file.metadata()?.len();
    let needs_newline = length > 0 && !(readable && ends_with_newline(&file, length));
    if needs_newline {
        tracing::warn!(path = %path.display(), "the file does not end with a newline (an earlier write was cut short); the next batch starts on a new line");
    }
    Ok(OpenFile { file, needs_newline })
}

fn ends_with_newline(file: &File, length: u64) -> bool {
    let mut last = [0u8; 1];
    matches!(file.read_at(&mut last, length - 1), Ok(1)) && last[0] == b'\n'
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch(lines: &[&str]) -> Batch {
        let mut batch = Batch::default();
        for line in lines {
            batch.push_message(format!("{line}\n").as_bytes());
        }
        batch
    }

    #[tokio::test]
    async fn file_cut_mid_line_gets_newline() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out.jsonl");
        std::fs::write(&path, "{\"a\":1}\n{\"b\":").unwrap();
        let mut transport = FileTransport::new(path.clone());

        transport.send(&batch(&[r#"{"c":3}"#])).await.unwrap();
        transport.send(&batch(&[r#"{"d":4}"#])).await.unwrap();

        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text, "{\"a\":1}\n{\"b\":\n{\"c\":3}\n{\"d\":4}\n");
    }

    #[tokio::test]
    async fn complete_file_gets_no_empty_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out.jsonl");
        std::fs::write(&path, "{\"a\":1}\n").unwrap();
        let mut transport = FileTransport::new(path.clone());

        transport.send(&batch(&[r#"{"b":2}"#])).await.unwrap();

        assert_eq!(std::fs::read_to_string(&path).unwrap(), "{\"a\":1}\n{\"b\":2}\n");
    }

    #[tokio::test]
    async fn new_file_and_directory_created() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub").join("out.jsonl");
        let mut transport = FileTransport::new(path.clone());

        transport.send(&batch(&[r#"{"a":1}"#, r#"{"b":2}"#])).await.unwrap();

        assert_eq!(std::fs::read_to_string(&path).unwrap(), "{\"a\":1}\n{\"b\":2}\n");
    }

    #[tokio::test]
    async fn closed_file_reopened_mid_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out.jsonl");
        let mut transport = FileTransport::new(path.clone());
        transport.send(&batch(&[r#"{"a":1}"#])).await.unwrap();
        // An abandoned send may leave a fragment behind it.
        std::fs::OpenOptions::new().append(true).open(&path).unwrap().write_all(b"{\"frag").unwrap();

        transport.close();
        transport.send(&batch(&[r#"{"b":2}"#])).await.unwrap();

        assert_eq!(std::fs::read_to_string(&path).unwrap(), "{\"a\":1}\n{\"frag\n{\"b\":2}\n");
    }
}
