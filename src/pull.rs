//! One-off pulls: read one query window of one tenant and write every
//! element as JSON Lines, without the state store.
//!
//! A pull never opens the store, so it neither takes its lock nor moves a
//! checkpoint or the dedupe set, and it works while the daemon runs.
//!
//! With a `limit`, the API returns only the most recent `limit` detections
//! of a window, so a full page is followed by a request for the part before
//! its oldest detection, as the poller does. `untilTimeUtc` is that time
//! rounded up to the API's 100 ns tick, so a detection stamped between two
//! ticks is not skipped. The detections of a page up to that bound come back
//! in the next page too, and are written once. The dedupe key recognises
//! them: it differs for a number `FullId` and the same digits as a string,
//! and is the whole text for a detection without a `FullId`. Pages come
//! newest first, so the output is ascending within a page only.
//!
//! Every line is one JSON value, and no element is changed on the way. A
//! detection is a valid JSON object, so a line break in it can only be
//! whitespace between tokens, and turning it into a space keeps the value.
//! Any other element may hold line breaks that are data (in a string with
//! raw control characters, say). So it is written as a JSON array that
//! contains its exact bytes: `["utf-8", TEXT]` with its text as a JSON
//! string, or `["base64", BYTES]` when it is not valid UTF-8. A detection line
//! starts with `{` and such a line with `[`, so the two cannot be confused.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use chrono::{DateTime, Utc};
use tokio::io::{AsyncWrite, AsyncWriteExt};

use crate::config::ResolvedTenant;
use crate::source::{AlertsClient, Element, Query, SourceError};

/// Elements read from the response before they are written.
const WRITE_BATCH: usize = 1000;

#[derive(Debug, thiserror::Error)]
pub enum PullError {
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error("cannot write the output: {0}")]
    Write(#[from] std::io::Error),
    #[error("tenant {tenant}: {count} or more detections share LastProcessedTimeUtc {time}, more than limit = {count} can page through; raise limit or set it to 0")]
    PagingStuck { tenant: String, count: u32, time: String },
    #[error("tenant {tenant}: a full page of {count} detections had no readable LastProcessedTimeUtc, so older pages cannot be requested; set limit = 0")]
    PagingUnreadable { tenant: String, count: u32 },
}

/// The window and paging of one pull.
#[derive(Debug, Clone)]
pub struct PullWindow {
    pub since: DateTime<Utc>,
    pub until: Option<DateTime<Utc>>,
    /// 0 sends no `limit` and reads the window in one request.
    pub limit: u32,
}

/// Counts of what a pull wrote.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct PullReport {
    pub written: usize,
    /// Detections returned by two pages at their boundary and written once.
    pub repeated: usize,
    /// Elements that are not detections; they are written too, wrapped
    /// (see the module documentation).
    pub invalid: usize,
    pub pages: usize,
}

/// Reads the window and writes one line per element to `out`.
pub async fn pull(
    http: reqwest::Client,
    tenant: ResolvedTenant,
    max_response_bytes: u64,
    window: &PullWindow,
    out: &mut (impl AsyncWrite + Unpin),
) -> Result<PullReport, PullError> {
    let client = AlertsClient::new(http, Arc::new(tenant), max_response_bytes);
    let tenant = client.tenant();
    let mut query = Query {
        since: Some(window.since),
        until: window.until,
        ago: None,
        limit: window.limit,
        machine_groups: tenant.machine_groups.clone(),
        device_created_machine_tags: tenant.device_created_machine_tags.clone(),
        cloud_created_machine_tags: tenant.cloud_created_machine_tags.clone(),
    };
    let mut report = PullReport::default();
    // Dedupe keys of the previous page's detections up to the next page's
    // `untilTimeUtc`: the next page repeats them.
    let mut boundary: HashSet<Vec<u8>> = HashSet::new();
    let mut previous_oldest: Option<DateTime<Utc>> = None;
    loop {
        let page = read_page(&client, &query, &boundary, out, &mut report).await?;
        report.pages += 1;
        if window.limit == 0 || (page.count as u64) < u64::from(window.limit) {
            break;
        }
        let Some(oldest) = page.oldest else {
            return Err(PullError::PagingUnreadable { tenant: tenant.name.clone(), count: window.limit });
        };
        // No progress: the whole page shares the previous page's oldest time.
        if previous_oldest.is_some_and(|previous| oldest >= previous) {
            return Err(PullError::PagingStuck {
                tenant: tenant.name.clone(),
                count: window.limit,
                time: crate::timefmt::format_query(oldest),
            });
        }
        previous_oldest = Some(oldest);
        query.until = Some(crate::timefmt::ceil_tick(oldest));
        boundary = page.near_oldest.into_iter().map(|(_, key)| key).collect();
    }
    out.flush().await?;
    Ok(report)
}

/// The `--output` file of a pull.
///
/// A regular file, or a path that does not exist yet, is written under a
/// temporary name beside it and renamed over it only after the pull has
/// succeeded, so a failed pull leaves an earlier export as it was. The new
/// file gets the mode, and where allowed the owner, of the one it replaces.
/// An existing file must be writable, as when it is written in place. A
/// file with more than one hard link, and any other path, such as a
/// symbolic link, a FIFO or `/dev/stdout`, is written in place.
pub struct OutputFile {
    path: PathBuf,
    /// The temporary file, `None` when `path` is written in place.
    partial: Option<PathBuf>,
    /// `path` existed before the pull.
    existed: bool,
    writer: tokio::io::BufWriter<tokio::fs::File>,
}

impl OutputFile {
    /// Creates the file that the pull writes to.
    pub async fn create(path: &Path) -> std::io::Result<Self> {
        use std::os::unix::fs::MetadataExt;

        let existing = tokio::fs::symlink_metadata(path).await.ok();
        if existing.as_ref().is_some_and(|m| !m.is_file() || m.nlink() > 1) {
            let file = tokio::fs::File::create(path).await?;
            return Ok(Self { path: path.to_path_buf(), partial: None, existed: true, writer: tokio::io::BufWriter::new(file) });
        }
        if existing.is_some() {
            // Fails on a file the user may not write, as writing in place would.
            tokio::fs::OpenOptions::new().write(true).open(path).await?;
        }
        let partial = partial_path(path);
        let file = tokio::fs::File::create(&partial).await?;
        let existed = existing.is_some();
        if let Some(existing) = existing {
            file.set_permissions(existing.permissions()).await?;
            // Only root may give a file away; others keep their own.
            let std_file = file.try_clone().await?.into_std().await;
            let _ = std::os::unix::fs::fchown(&std_file, Some(existing.uid()), Some(existing.gid()));
        }
        Ok(Self { path: path.to_path_buf(), partial: Some(partial), existed, writer: tokio::io::BufWriter::new(file) })
    }

    pub fn writer(&mut self) -> &mut tokio::io::BufWriter<tokio::fs::File> {
        &mut self.writer
    }

    /// Describes what a failed pull leaves at the requested path, for its
    /// error message.
    pub fn state_on_failure(&self) -> String {
        let path = self.path.display();
        match (&self.partial, self.existed) {
            (Some(_), true) => format!("{path} is unchanged"),
            (Some(_), false) => format!("{path} was not created"),
            (None, _) => format!("{path} is written in place and may hold part of the output"),
        }
    }

    /// Flushes and syncs the file, then renames it to the requested path.
    /// On failure the temporary file is deleted.
    pub async fn commit(mut self) -> std::io::Result<()> {
        let result = self.finish_writing().await;
        if result.is_err() {
            self.discard().await;
        }
        result
    }

    async fn finish_writing(&mut self) -> std::io::Result<()> {
        self.writer.flush().await?;
        if let Some(partial) = &self.partial {
            self.writer.get_ref().sync_all().await?;
            tokio::fs::rename(partial, &self.path).await?;
            // The rename is durable once the directory is synced.
            let directory = self.path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
            tokio::fs::File::open(directory).await?.sync_all().await?;
        }
        Ok(())
    }

    /// Deletes the temporary file after a failed pull.
    pub async fn discard(self) {
        let Some(partial) = &self.partial else {
            return;
        };
        drop(self.writer);
        if let Err(e) = tokio::fs::remove_file(partial).await {
            tracing::warn!(file = %partial.display(), error = %e, "cannot delete the partial output of a failed pull");
        }
    }
}

/// Returns `.NAME.PID.partial` in the directory of `path`.
fn partial_path(path: &Path) -> PathBuf {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    path.with_file_name(format!(".{name}.{}.partial", std::process::id()))
}

#[derive(Default)]
struct PageSummary {
    count: usize,
    oldest: Option<DateTime<Utc>>,
    /// Times and dedupe keys of the detections no later than `oldest`
    /// rounded up to a tick, which the next page returns again.
    near_oldest: Vec<(DateTime<Utc>, Vec<u8>)>,
}

async fn read_page(
    client: &AlertsClient,
    query: &Query,
    skip: &HashSet<Vec<u8>>,
    out: &mut (impl AsyncWrite + Unpin),
    report: &mut PullReport,
) -> Result<PageSummary, PullError> {
    let mut page = client.open(query).await?;
    let mut summary = PageSummary::default();
    let mut buffer = Vec::new();
    while let Some(elements) = page.next_batch(WRITE_BATCH).await? {
        buffer.clear();
        for element in elements {
            summary.count += 1;
            match &element {
                Element::Detection(detection) => {
                    let key = detection.dedupe_id();
                    if let Some(time) = detection.last_processed() {
                        track_oldest(&mut summary, time, &key);
                    }
                    if skip.contains(key.as_ref()) {
                        report.repeated += 1;
                        continue;
                    }
                    write_detection_line(&mut buffer, detection.raw());
                }
                Element::Invalid { raw, .. } => {
                    report.invalid += 1;
                    write_invalid_line(&mut buffer, raw);
                }
            }
            report.written += 1;
        }
        out.write_all(&buffer).await?;
    }
    Ok(summary)
}

fn track_oldest(summary: &mut PageSummary, time: DateTime<Utc>, key: &[u8]) {
    if summary.oldest.map_or(true, |oldest| time < oldest) {
        let bound = crate::timefmt::ceil_tick(time);
        // Only a lower bound drops keys, and a key is visited by at most two
        // such drops, so a page costs time linear in its size.
        if summary.oldest.map(crate::timefmt::ceil_tick) != Some(bound) {
            summary.near_oldest.retain(|(kept, _)| *kept <= bound);
        }
        summary.oldest = Some(time);
    }
    let bound = summary.oldest.map(crate::timefmt::ceil_tick);
    if bound.is_some_and(|bound| time <= bound) {
        summary.near_oldest.push((time, key.to_vec()));
    }
}

/// Appends a detection as one line. The detection passed a full JSON
/// syntax check, so a line break in it is whitespace between tokens (inside
/// strings it is escaped), and a space in its place keeps the value.
fn write_detection_line(buffer: &mut Vec<u8>, raw: &str) {
    buffer.extend(raw.bytes().map(|b| if b == b'\n' || b == b'\r' { b' ' } else { b }));
    buffer.push(b'\n');
}

/// Appends an element that is not a detection as one line that contains
/// its exact bytes: `["utf-8", TEXT]`, or `["base64", BYTES]` when the element
/// is not valid UTF-8 and so cannot be a JSON string.
fn write_invalid_line(buffer: &mut Vec<u8>, raw: &[u8]) {
    let wrapped = match std::str::from_utf8(raw) {
        Ok(text) => serde_json::json!(["utf-8", text]),
        Err(_) => serde_json::json!(["base64", BASE64.encode(raw)]),
    };
    buffer.extend(wrapped.to_string().into_bytes());
    buffer.push(b'\n');
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_breaks_between_tokens_become_spaces() {
        let mut buffer = Vec::new();
        write_detection_line(&mut buffer, "{\r\n  \"a\": \"x\\ny\"\n}");
        assert_eq!(String::from_utf8(buffer).unwrap(), "{    \"a\": \"x\\ny\" }\n");
    }

    /// Returns the element bytes that an invalid-element line contains.
    fn unwrap_invalid_line(line: &[u8]) -> Vec<u8> {
        let value: serde_json::Value = serde_json::from_slice(line).unwrap();
        let text = value[1].as_str().unwrap();
        match value[0].as_str().unwrap() {
            "utf-8" => text.as_bytes().to_vec(),
            "base64" => BASE64.decode(text).unwrap(),
            other => panic!("unknown encoding {other}"),
        }
    }

    #[test]
    fn invalid_elements_keep_every_byte_on_one_line() {
        let cases: [&[u8]; 6] = [
            b"{\"a\":\"x\r\ny\"}",
            b"\"raw\nbreak\"",
            b"[1,\r\n2]",
            b"tru\te \\ \"",
            b"{\"a\":\"\xff\n\xfe\"}",
            b"\xc3",
        ];
        for raw in cases {
            let mut buffer = Vec::new();
            write_invalid_line(&mut buffer, raw);
            let (line, end) = buffer.split_at(buffer.len() - 1);
            assert_eq!(end, b"\n", "{raw:?}");
            assert!(!line.contains(&b'\n'), "{raw:?}");
            assert!(!line.contains(&b'\r'), "{raw:?}");
            assert_eq!(line[0], b'[', "{raw:?}");
            assert_eq!(unwrap_invalid_line(line), raw, "{raw:?}");
        }
    }

    fn near_oldest_keys(summary: PageSummary) -> Vec<String> {
        let mut keys: Vec<String> = summary.near_oldest.into_iter().map(|(_, key)| String::from_utf8(key).unwrap()).collect();
        keys.sort();
        keys
    }

    #[test]
    fn oldest_keeps_every_key_at_that_time() {
        let mut summary = PageSummary::default();
        let t = |s: &str| crate::timefmt::parse(s).unwrap();
        track_oldest(&mut summary, t("2026-01-01T00:00:02Z"), b"b");
        track_oldest(&mut summary, t("2026-01-01T00:00:01Z"), b"a1");
        track_oldest(&mut summary, t("2026-01-01T00:00:01Z"), b"a2");
        track_oldest(&mut summary, t("2026-01-01T00:00:03Z"), b"c");
        assert_eq!(summary.oldest, Some(t("2026-01-01T00:00:01Z")));
        assert_eq!(near_oldest_keys(summary), ["a1", "a2"]);
    }

    #[test]
    fn oldest_keeps_keys_in_its_tick() {
        let mut summary = PageSummary::default();
        let t = |s: &str| crate::timefmt::parse(s).unwrap();
        track_oldest(&mut summary, t("2026-01-01T00:00:00.000000250Z"), b"next tick");
        track_oldest(&mut summary, t("2026-01-01T00:00:00.000000199Z"), b"same tick, later");
        track_oldest(&mut summary, t("2026-01-01T00:00:00.000000150Z"), b"oldest");
        track_oldest(&mut summary, t("2026-01-01T00:00:00.000000200Z"), b"tick bound");
        assert_eq!(summary.oldest, Some(t("2026-01-01T00:00:00.000000150Z")));
        assert_eq!(near_oldest_keys(summary), ["oldest", "same tick, later", "tick bound"]);
    }
}
