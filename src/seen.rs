//! The dedupe set: a 128-bit digest of every tenant and FullId queued within
//! the retention, held in memory and in append-only files.
//!
//! The set is split into generations of half the retention period each. A
//! digest is looked up in the current and the previous generation and added
//! to the current one, so it is remembered for at least half and at most the
//! whole retention. Pruning deletes whole generation files.
//!
//! A lookup is a hash probe instead of two sled tree searches, and an insert
//! is 24 bytes appended to a file, which is why the set left sled: sled's
//! per-key work was the largest cost of queuing a detection.
//!
//! # File format
//! `seen/<period>-<generation>.seen` contains fixed records of 24 bytes. The
//! first 8 bytes are the start of a SHA-256 over the tenant name, so one
//! tenant's records can be removed. The other 16 are the start of a SHA-256
//! over the dedupe key (tenant, 0x00, FullId or another marker). A crash can leave a torn record
//! at the end of a file; opening the set cuts it off. 128-bit digests make
//! a false match between two different keys negligible (about 2^-64 after
//! 2^32 keys), and a false match would skip a detection, which is why the
//! digest is not shorter.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use chrono::{DateTime, Utc};
use hashbrown::HashTable;

const RECORD_BYTES: usize = 24;
pub(crate) const SUFFIX: &str = ".seen";
const TEMPORARY_SUFFIX: &str = ".seen.tmp";

#[derive(Debug, thiserror::Error)]
pub enum SeenError {
    #[error("dedupe file {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
}

/// The first 8 bytes of a SHA-256 over a tenant name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TenantTag([u8; 8]);

impl TenantTag {
    /// Computes the tag of the tenant that `key` starts with: the bytes
    /// before the first 0x00, so a tenant name and its dedupe keys give the
    /// same tag.
    pub fn of(key: &[u8]) -> Self {
        let tenant = key.split(|&b| b == 0).next().unwrap_or(key);
        let mut tag = [0u8; 8];
        tag.copy_from_slice(&sha256(tenant).as_ref()[..8]);
        Self(tag)
    }
}

/// The digests of one dedupe key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Seen {
    tenant_tag: [u8; 8],
    digest: [u8; 16],
}

impl Seen {
    /// Digests a dedupe key: the tenant name, a 0x00 byte, then the rest.
    pub fn of_key(key: &[u8]) -> Self {
        Self::of_tenant_key(TenantTag::of(key), key)
    }

    /// Digests a dedupe key as [`Seen::of_key`] does, with its tenant's tag
    /// computed once by the caller for a whole batch of that tenant's keys.
    pub fn of_tenant_key(tag: TenantTag, key: &[u8]) -> Self {
        debug_assert_eq!(tag, TenantTag::of(key), "the tag of another tenant");
        let mut digest = [0u8; 16];
        digest.copy_from_slice(&sha256(key).as_ref()[..16]);
        Self { tenant_tag: tag.0, digest }
    }

    fn to_record(self) -> [u8; RECORD_BYTES] {
        let mut record = [0u8; RECORD_BYTES];
        record[..8].copy_from_slice(&self.tenant_tag);
        record[8..].copy_from_slice(&self.digest);
        record
    }

    fn from_record(record: &[u8]) -> Self {
        let mut seen = Self { tenant_tag: [0; 8], digest: [0; 16] };
        seen.tenant_tag.copy_from_slice(&record[..8]);
        seen.digest.copy_from_slice(&record[8..RECORD_BYTES]);
        seen
    }
}

fn sha256(bytes: &[u8]) -> ring::digest::Digest {
    ring::digest::digest(&ring::digest::SHA256, bytes)
}

/// Returns the digest's first 8 bytes as the table hash: a SHA-256 prefix is
/// already uniformly distributed.
fn table_hash(digest: &[u8; 16]) -> u64 {
    u64::from_le_bytes([digest[0], digest[1], digest[2], digest[3], digest[4], digest[5], digest[6], digest[7]])
}

/// One generation: its file and its digests.
struct Generation {
    path: PathBuf,
    digests: HashTable<[u8; 16]>,
}

impl Generation {
    fn contains(&self, digest: &[u8; 16]) -> bool {
        self.digests.find(table_hash(digest), |d| d == digest).is_some()
    }

    fn add(&mut self, digest: [u8; 16]) {
        if !self.contains(&digest) {
            self.digests.insert_unique(table_hash(&digest), digest, table_hash);
        }
    }
}

/// A generation's place: the period it was cut with and its number.
type GenerationId = (u64, u64);

pub struct SeenSet {
    dir: PathBuf,
    /// Length of one generation in seconds (half the retention).
    period: u64,
    generations: Mutex<BTreeMap<GenerationId, Generation>>,
}

impl SeenSet {
    /// Opens (or creates, mode 0700) `dir` and loads every generation file in it.
    pub fn open(dir: &Path, period: u64) -> Result<Self, SeenError> {
        let io_error = |source| SeenError::Io { path: dir.to_path_buf(), source };
        fs::DirBuilder::new().recursive(true).mode(0o700).create(dir).map_err(io_error)?;
        let mut generations = BTreeMap::new();
        for entry in fs::read_dir(dir).map_err(io_error)? {
            let path = entry.map_err(io_error)?.path();
            // Left by a crash during `forget_tenant`; the file it was to
            // replace is still whole.
            if path.to_str().is_some_and(|p| p.ends_with(TEMPORARY_SUFFIX)) {
                remove_file(&path)?;
                continue;
            }
            let Some(id) = parse_file_name(&path) else {
                continue;
            };
            generations.insert(id, load(&path)?);
        }
        Ok(Self { dir: dir.to_path_buf(), period: period.max(1), generations: Mutex::new(generations) })
    }

    fn live(&self, now: DateTime<Utc>) -> [GenerationId; 2] {
        let generation = now.timestamp().max(0) as u64 / self.period;
        [(self.period, generation), (self.period, generation.saturating_sub(1))]
    }

    /// Returns whether `seen` is in the current or the previous generation.
    pub fn contains(&self, seen: &Seen, now: DateTime<Utc>) -> bool {
        let generations = self.lock();
        self.live(now).iter().any(|id| generations.get(id).is_some_and(|g| g.contains(&seen.digest)))
    }

    /// Appends `seens` to the current generation's file, fsyncs it, and adds
    /// them to the set. Nothing is added in memory when the write fails.
    pub fn insert(&self, seens: &[Seen], now: DateTime<Utc>) -> Result<(), SeenError> {
        if seens.is_empty() {
            return Ok(());
        }
        let [current, _] = self.live(now);
        self.insert_into(current, seens)
    }

    /// Appends `seens` to the generation `id`, as [`SeenSet::insert`] does
    /// for the current one.
    pub fn insert_into(&self, id: GenerationId, seens: &[Seen]) -> Result<(), SeenError> {
        let mut generations = self.lock();
        let path = self.dir.join(format!("{}-{}{SUFFIX}", id.0, id.1));
        let created = !path.exists();
        let records: Vec<u8> = seens.iter().flat_map(|s| s.to_record()).collect();
        append_synced(&path, &records)?;
        if created {
            sync_dir(&self.dir)?;
        }
        let generation = generations.entry(id).or_insert_with(|| Generation { path, digests: HashTable::new() });
        generation.digests.reserve(seens.len(), table_hash);
        for seen in seens {
            generation.add(seen.digest);
        }
        Ok(())
    }

    /// Deletes the generations older than the previous one, and those cut
    /// with another period; returns how many digests were forgotten. A
    /// generation newer than the current one (the clock stepped back) stays
    /// until time catches up with it.
    pub fn prune(&self, now: DateTime<Utc>) -> Result<usize, SeenError> {
        let [_, previous] = self.live(now);
        let is_old = |id: &GenerationId| id.0 != self.period || id.1 < previous.1;
        let mut generations = self.lock();
        let old: Vec<GenerationId> = generations.keys().filter(|id| is_old(id)).copied().collect();
        let mut forgotten = 0;
        for id in old {
            let Some(generation) = generations.get(&id) else {
                continue;
            };
            // The file goes first, so a failure keeps memory and disk alike.
            remove_file(&generation.path)?;
            forgotten += generation.digests.len();
            generations.remove(&id);
        }
        Ok(forgotten)
    }

    /// Removes every digest of `tenant` by rewriting each file without its
    /// records; returns how many were removed.
    pub fn forget_tenant(&self, tenant: &str) -> Result<usize, SeenError> {
        let tag = TenantTag::of(tenant.as_bytes()).0;
        let mut generations = self.lock();
        let mut removed = 0;
        for generation in generations.values_mut() {
            let bytes = read_records(&generation.path)?;
            let remaining: Vec<u8> = bytes.chunks_exact(RECORD_BYTES).filter(|r| r[..8] != tag).flatten().copied().collect();
            removed += (bytes.len() - remaining.len()) / RECORD_BYTES;
            let temporary = generation.path.with_extension("seen.tmp");
            remove_file(&temporary)?;
            append_synced(&temporary, &remaining)?;
            fs::rename(&temporary, &generation.path).map_err(|source| SeenError::Io { path: generation.path.clone(), source })?;
            sync_dir(&self.dir)?;
            *generation = load(&generation.path)?;
        }
        Ok(removed)
    }

    /// Digests in the live generations.
    pub fn len(&self, now: DateTime<Utc>) -> usize {
        let generations = self.lock();
        self.live(now).iter().filter_map(|id| generations.get(id)).map(|g| g.digests.len()).sum()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<GenerationId, Generation>> {
        self.generations.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Parses `<period>-<generation>.seen`, both decimal digits only.
fn parse_file_name(path: &Path) -> Option<GenerationId> {
    let name = path.file_name()?.to_str()?.strip_suffix(SUFFIX)?;
    let (period, generation) = name.split_once('-')?;
    let number = |text: &str| text.bytes().all(|b| b.is_ascii_digit()).then(|| text.parse().ok()).flatten();
    Some((number(period)?, number(generation)?))
}

/// Loads a generation file, cutting off a torn record at its end.
fn load(path: &Path) -> Result<Generation, SeenError> {
    let bytes = read_records(path)?;
    let whole = bytes.len() - bytes.len() % RECORD_BYTES;
    if whole != bytes.len() {
        let file = OpenOptions::new().write(true).open(path).map_err(|source| SeenError::Io { path: path.to_path_buf(), source })?;
        file.set_len(whole as u64).and_then(|()| file.sync_data()).map_err(|source| SeenError::Io { path: path.to_path_buf(), source })?;
    }
    let mut generation = Generation { path: path.to_path_buf(), digests: HashTable::with_capacity(whole / RECORD_BYTES) };
    for record in bytes[..whole].chunks_exact(RECORD_BYTES) {
        generation.add(Seen::from_record(record).digest);
    }
    Ok(generation)
}

fn read_records(path: &Path) -> Result<Vec<u8>, SeenError> {
    let mut bytes = Vec::new();
    match File::open(path) {
        Ok(mut file) => {
            file.read_to_end(&mut bytes).map_err(|source| SeenError::Io { path: path.to_path_buf(), source })?;
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(source) => return Err(SeenError::Io { path: path.to_path_buf(), source }),
    }
    Ok(bytes)
}

/// Appends `bytes` to `path` (created with mode 0600) and fsyncs it. A
/// failed write is cut off again, so later records stay aligned: a torn
/// record in the middle would shift every record after it.
fn append_synced(path: &Path, bytes: &[u8]) -> Result<(), SeenError> {
    let io_error = |source| SeenError::Io { path: path.to_path_buf(), source };
    let mut file = OpenOptions::new().create(true).append(true).mode(0o600).open(path).map_err(io_error)?;
    let length = file.metadata().map_err(io_error)?.len();
    let written = file.write_all(bytes).and_then(|()| file.sync_data());
    if let Err(source) = written {
        // Best effort: if this fails too, opening the set cuts a torn tail.
        let _ = file.set_len(length).and_then(|()| file.sync_data());
        return Err(io_error(source));
    }
    Ok(())
}

fn remove_file(path: &Path) -> Result<(), SeenError> {
    match fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(SeenError::Io { path: path.to_path_buf(), source }),
    }
}

fn sync_dir(dir: &Path) -> Result<(), SeenError> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(|source| SeenError::Io { path: dir.to_path_buf(), source })
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: u64 = 24 * 3600;

    fn at(secs: u64) -> DateTime<Utc> {
        DateTime::from_timestamp(secs as i64, 0).unwrap()
    }

    #[test]
    fn inserted_keys_are_found_after_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let now = at(100 * DAY);
        let a = Seen::of_key(b"tenant\0a:1");
        let b = Seen::of_key(b"tenant\0b:2");
        {
            let set = SeenSet::open(dir.path(), DAY).unwrap();
            set.insert(&[a], now).unwrap();
            assert!(set.contains(&a, now));
            assert!(!set.contains(&b, now));
        }
        let set = SeenSet::open(dir.path(), DAY).unwrap();
        assert!(set.contains(&a, now));
        assert!(!set.contains(&b, now));
        assert_eq!(set.len(now), 1);
    }

    #[test]
    fn record_format_is_fixed() {
        // The first 8 bytes of SHA-256("t"), then the first 16 of SHA-256("t\0x"):
        // files written by earlier releases must keep matching.
        let record = Seen::of_key(b"t\0x").to_record();
        let hex: String = record.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(hex, "e3b98a4da31a127d6fca3fcfeb33651f070e9903370a0703");
    }

    #[test]
    fn keys_differ_by_tenant_and_id() {
        assert_ne!(Seen::of_key(b"t1\0x"), Seen::of_key(b"t2\0x"));
        assert_ne!(Seen::of_key(b"t1\0x"), Seen::of_key(b"t1\0y"));
        assert_eq!(Seen::of_key(b"t1\0x"), Seen::of_key(b"t1\0x"));
        // A tag made once per tenant gives the digests of a key's own tag.
        assert_eq!(Seen::of_tenant_key(TenantTag::of(b"t1"), b"t1\0x"), Seen::of_key(b"t1\0x"));
        assert_eq!(TenantTag::of(b"t1\0x"), TenantTag::of(b"t1"));
    }

    #[test]
    fn torn_record_is_cut_off() {
        let dir = tempfile::tempdir().unwrap();
        let now = at(100 * DAY);
        let a = Seen::of_key(b"tenant\0a");
        SeenSet::open(dir.path(), DAY).unwrap().insert(&[a], now).unwrap();
        let path = dir.path().join(format!("{DAY}-100.seen"));
        let mut file = OpenOptions::new().append(true).open(&path).unwrap();
        file.write_all(&[7u8; 10]).unwrap();
        drop(file);

        let set = SeenSet::open(dir.path(), DAY).unwrap();
        assert!(set.contains(&a, now));
        assert_eq!(fs::metadata(&path).unwrap().len(), RECORD_BYTES as u64);
        let b = Seen::of_key(b"tenant\0b");
        set.insert(&[b], now).unwrap();
        let set = SeenSet::open(dir.path(), DAY).unwrap();
        assert!(set.contains(&a, now));
        assert!(set.contains(&b, now));
    }

    #[test]
    fn keys_live_for_one_to_two_periods() {
        let dir = tempfile::tempdir().unwrap();
        let set = SeenSet::open(dir.path(), DAY).unwrap();
        let a = Seen::of_key(b"tenant\0a");
        let start = at(100 * DAY + 10);
        set.insert(&[a], start).unwrap();
        assert!(set.contains(&a, at(101 * DAY + 10)), "remembered in the next period");
        assert_eq!(set.prune(at(101 * DAY + 10)).unwrap(), 0);
        assert!(!set.contains(&a, at(102 * DAY)), "forgotten two periods on");
        assert_eq!(set.prune(at(99 * DAY)).unwrap(), 0, "a clock stepped back keeps newer generations");
        assert_eq!(set.prune(at(102 * DAY)).unwrap(), 1);
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    #[test]
    fn changed_period_forgets_old_generations_on_prune() {
        let dir = tempfile::tempdir().unwrap();
        let now = at(100 * DAY);
        SeenSet::open(dir.path(), DAY).unwrap().insert(&[Seen::of_key(b"t\0a")], now).unwrap();
        let set = SeenSet::open(dir.path(), 2 * DAY).unwrap();
        assert!(!set.contains(&Seen::of_key(b"t\0a"), now));
        assert_eq!(set.prune(now).unwrap(), 1);
    }

    #[test]
    fn forget_tenant_keeps_other_tenants() {
        let dir = tempfile::tempdir().unwrap();
        let now = at(100 * DAY);
        let set = SeenSet::open(dir.path(), DAY).unwrap();
        let mine = [Seen::of_key(b"mine\0a"), Seen::of_key(b"mine\0\0invalid:x")];
        let theirs = Seen::of_key(b"theirs\0a");
        set.insert(&mine, now).unwrap();
        set.insert(&[theirs], at(101 * DAY)).unwrap();
        assert_eq!(set.forget_tenant("mine").unwrap(), 2);
        let set = SeenSet::open(dir.path(), DAY).unwrap();
        assert!(!set.contains(&mine[0], now));
        assert!(!set.contains(&mine[1], now));
        assert!(set.contains(&theirs, at(101 * DAY)));
    }
}
