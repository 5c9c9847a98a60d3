//! The `dir` backend: records as files in a datastore directory shared by all
//! hosts (an NFS export, DESIGN.md §4).
//!
//! ```text
//! <datastore>/                the cluster's own directory (config `datastore.path`)
//!   hosts/<id>.hb            heartbeat slot (Slot), written by host <id>
//!   master.lease             LeaseRecord for LeaseKey::Master
//!   leases/<uuid>.lease      LeaseRecord for LeaseKey::Domain
//!   fenced/<id>              FencedRecord: which boot of <id> was confirmed off
//!   assign/<id>              AssignmentsRecord, written by the master
//!   poison/<id>              PoisonRequest aimed at <id> (all zeros: none)
//!   domains/<uuid>.xml       domain definition (plain XML, not a record), in the
//!                            cluster's bridge and network names (hypervisor::netmap)
//!   inventory/<id>.json      host <id>'s bridges and networks (store::inventory;
//!                            made on first write, not by init)
//! ```
//!
//! `<id>` is the decimal host id, `<uuid>` the lowercase hyphenated domain
//! UUID. Every record file is one 4096-byte block (`store::record`), written
//! in place with O_DIRECT + fdatasync and read with O_DIRECT. Files are opened
//! for each operation, so a file replaced on the server is never read through
//! a stale handle. Directories are 0700 and files 0600: records steer fencing.
//!
//! Every function is synchronous and may block for as long as the storage
//! does (a hung NFS server blocks in the kernel, where even SIGKILL waits).
//! The daemon runs them on worker threads and bounds each with its
//! `io_timeout`; only the lease lock wait is bounded here (`lock_wait`).
//!
//! A missing or empty record file is a record never written; a missing
//! directory is an error (the datastore is not mounted or not initialized),
//! so that an unmounted export never reads as "every lease is free".

use super::direct::{self, Access, AlignedBlock, DirectIoError};
use super::record::{AssignmentsRecord, ClusterId, LeaseRecord, PoisonRequest, RecordError, RecordKind};
use super::record::{RejectCounters, decode_for, encode};
use crate::engine::config::{DomainId, HostId};
use crate::engine::io::{Assignments, CasOutcome, FencedRecord, Lease, LeaseKey, LeaseReason, Slot};
use crate::engine::io::{StorageError, StorageSnapshot};
use serde::Serialize;
use serde::de::DeserializeOwned;
use std::collections::BTreeMap;
use std::fmt::Debug;
use std::fs::{self, DirBuilder, File, OpenOptions, TryLockError};
use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, TryLockError as GateBusy};
use std::time::Duration;

/// The subdirectories of a datastore directory.
pub const SUBDIRS: [&str; 6] = ["hosts", "leases", "fenced", "assign", "poison", "domains"];
pub const MAX_CLUSTER_NAME_BYTES: usize = 64;
/// Domain definitions larger than this are refused (libvirt's are a few KiB).
pub const MAX_DOMAIN_XML_BYTES: usize = 1024 * 1024;
/// How long a lease CAS waits for the file lock unless told otherwise; a
/// fraction of the default io_timeout (2 s), so that a CAS that waited for
/// the lock still has time for its writes.
pub const DEFAULT_LOCK_WAIT: Duration = Duration::from_millis(1000);
/// Between two attempts to take a busy lease lock.
pub const LOCK_POLL_INTERVAL: Duration = Duration::from_millis(1);
const DIR_MODE: u32 = 0o700;

/// The lease of a key whose file was never written.
pub const FREE_LEASE: Lease = Lease { owner: None, generation: 0, reason: LeaseReason::Acquired };

#[derive(Debug, thiserror::Error)]
pub enum DirError {
    #[error(
        "invalid cluster name {name:?}: use 1 to {MAX_CLUSTER_NAME_BYTES} characters from A-Z a-z 0-9 . _ -, not starting with '.'"
    )]
    InvalidClusterName { name: String },
    #[error("{path} is missing: the datastore is not mounted, or not initialized (havirt init)")]
    NotInitialized { path: PathBuf },
    #[error(transparent)]
    Direct(#[from] DirectIoError),
    #[error("{path}: {op} failed: {source}")]
    Io { op: &'static str, path: PathBuf, source: io::Error },
    #[error("{path}: record rejected: {source}")]
    Rejected { path: PathBuf, source: RecordError },
    #[error("{path}: cannot encode record: {source}")]
    Encode { path: PathBuf, source: RecordError },
    #[error(
        "{path}: lease lock not acquired within {waited_ms} ms (another host, or another CAS of this one, holds it)"
    )]
    LockTimeout { path: PathBuf, waited_ms: u128 },
    #[error("lease compare-and-swap must raise the generation: expected {expect}, new {new}")]
    GenerationNotIncreasing { expect: u64, new: u64 },
    #[error("{path}: re-read after write shows {found:?}, not the lease just written; the storage loses writes")]
    VerifyFailed { path: PathBuf, found: Lease },
    #[error("{path}: domain XML of {len} bytes exceeds the limit of {max} bytes")]
    XmlTooLarge { path: PathBuf, len: u64, max: usize },
}

impl DirError {
    /// What the engine is told (`Input::*::result`).
    pub fn storage_error(&self) -> StorageError {
        match self {
            DirError::LockTimeout { .. } => StorageError::Timeout,
            _ => StorageError::Io,
        }
    }

    fn io(op: &'static str, path: &Path) -> impl FnOnce(io::Error) -> DirError {
        move |source| DirError::Io { op, path: path.to_path_buf(), source }
    }
}

type ReadResult<T> = Result<Option<T>, DirError>;

/// One cluster's datastore directory. `Send + Sync`: share it between the
/// daemon's storage worker threads.
#[derive(Debug)]
pub struct DirStore {
    base: PathBuf,
    cluster: ClusterId,
    lock_wait: Duration,
    rejects: Mutex<RejectCounters>,
    /// One gate per lease: serializes this process's own CAS on a lease
    /// before the file lock, which on NFS (flock emulated by POSIX locks)
    /// may not exclude two threads of one process.
    gates: Mutex<BTreeMap<LeaseKey, Arc<Mutex<()>>>>,
    /// Our own slot file, kept open between heartbeat writes: a write is
    /// then one pwrite + fdatasync, not also the lookups, open and close
    /// that cost a round trip each on NFS (as sanlock keeps its lease files
    /// open). Dropped on any error, so the next write opens it afresh, and
    /// after SLOT_FILE_REOPEN: writes to a file someone unlinked or replaced
    /// would succeed unseen, and S4 relies on a failing heartbeat failing.
    slot_file: Mutex<Option<(PathBuf, File, std::time::Instant)>>,
}

/// Our slot file is opened afresh at least this often. A heartbeat written
/// to a file that was unlinked meanwhile is lost unseen for at most this
/// long: far below every profile's host_dead_timeout (10 s at the least),
/// so no peer takes our leases by S3(b) on such a silence.
pub const SLOT_FILE_REOPEN: Duration = Duration::from_secs(5);

/// `<uuid>` as in file names: lowercase, hyphenated (8-4-4-4-12).
pub fn domain_uuid(d: DomainId) -> String {
    let h = format!("{:032x}", d.0);
    format!("{}-{}-{}-{}-{}", &h[..8], &h[8..12], &h[12..16], &h[16..20], &h[20..])
}

fn check_cluster_name(name: &str) -> Result<(), DirError> {
    let ok_char = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-');
    let ok =
        !name.is_empty() && name.len() <= MAX_CLUSTER_NAME_BYTES && !name.starts_with('.') && name.chars().all(ok_char);
    if ok { Ok(()) } else { Err(DirError::InvalidClusterName { name: name.to_string() }) }
}

impl DirStore {
    /// Creates the cluster's datastore directory `dir` and its
    /// subdirectories where missing (idempotent), then opens it. For `havirt
    /// init`; the daemon uses `open`, so that an unmounted export is an
    /// error, not a new datastore. `cluster` goes into every record.
    pub fn init(dir: &Path, cluster: &str) -> Result<DirStore, DirError> {
        check_cluster_name(cluster)?;
        let mut b = DirBuilder::new();
        b.recursive(true).mode(DIR_MODE);
        for sub in SUBDIRS {
            let p = dir.join(sub);
            b.create(&p).map_err(DirError::io("create directory", &p))?;
        }
        direct::sync_dir(dir)?;
        DirStore::open(dir, cluster)
    }

    /// Opens an initialized datastore directory (the config's
    /// `datastore.path`, used as is).
    pub fn open(dir: &Path, cluster: &str) -> Result<DirStore, DirError> {
        check_cluster_name(cluster)?;
        if let Some(p) = SUBDIRS.iter().map(|s| dir.join(s)).find(|p| !p.is_dir()) {
            return Err(DirError::NotInitialized { path: p });
        }
        DirStore::open_unchecked(dir, cluster)
    }

    /// Opens without looking at the directory: for a daemon whose datastore
    /// does not answer at start (every later call fails or times out, which
    /// is what makes the host self-fence).
    pub fn open_unchecked(dir: &Path, cluster: &str) -> Result<DirStore, DirError> {
        check_cluster_name(cluster)?;
        let cluster = ClusterId::from_name(cluster);
        Ok(DirStore {
            base: dir.to_path_buf(),
            cluster,
            lock_wait: DEFAULT_LOCK_WAIT,
            rejects: Mutex::default(),
            gates: Mutex::default(),
            slot_file: Mutex::default(),
        })
    }

    /// How long a lease CAS waits for a lock held by another host.
    pub fn with_lock_wait(mut self, lock_wait: Duration) -> DirStore {
        self.lock_wait = lock_wait;
        self
    }

    pub fn base(&self) -> &Path {
        &self.base
    }

    pub fn cluster_id(&self) -> ClusterId {
        self.cluster
    }

    /// Records rejected by this store since it was opened.
    pub fn rejects(&self) -> RejectCounters {
        *self.rejects.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub fn slot_path(&self, host: HostId) -> PathBuf {
        self.base.join("hosts").join(format!("{}.hb", host.0))
    }

    pub fn lease_path(&self, key: LeaseKey) -> PathBuf {
        match key {
            LeaseKey::Master => self.base.join("master.lease"),
            LeaseKey::Domain(d) => self.base.join("leases").join(format!("{}.lease", domain_uuid(d))),
        }
    }

    pub fn fenced_path(&self, host: HostId) -> PathBuf {
        self.base.join("fenced").join(host.0.to_string())
    }

    pub fn assignments_path(&self, host: HostId) -> PathBuf {
        self.base.join("assign").join(host.0.to_string())
    }

    pub fn poison_path(&self, host: HostId) -> PathBuf {
        self.base.join("poison").join(host.0.to_string())
    }

    pub fn domain_xml_path(&self, d: DomainId) -> PathBuf {
        self.base.join("domains").join(format!("{}.xml", domain_uuid(d)))
    }
}

/// Records.
impl DirStore {
    pub fn write_slot(&self, slot: &Slot) -> Result<(), DirError> {
        let path = self.slot_path(slot.host);
        let block = self.encode_block(&path, RecordKind::Slot, slot)?;
        // A write still hung on the cached file holds the lock: this one
        // then goes the long way, on a file of its own.
        let Ok(mut cached) = self.slot_file.try_lock() else {
            return self.write_block(&path, &block);
        };
        #[allow(clippy::disallowed_methods, reason = "an adapter's own bookkeeping, not engine time")]
        let now = std::time::Instant::now();
        if let Some((p, f, opened)) = cached.as_ref()
            && *p == path
            && now.duration_since(*opened) < SLOT_FILE_REOPEN
        {
            let written = direct::write_block(f, &path, 0, &block);
            if written.is_err() {
                *cached = None;
            }
            return Ok(written?);
        }
        let file = self.open_for_write(&path)?;
        let created = file_len(&file, &path)? == 0;
        direct::write_block(&file, &path, 0, &block)?;
        if created {
            sync_parent(&path)?;
        }
        *cached = Some((path, file, now));
        Ok(())
    }

    /// `Ok(None)`: the host never wrote its slot.
    pub fn read_slot(&self, host: HostId) -> Result<Option<Slot>, DirError> {
        self.read_record(&self.slot_path(host), RecordKind::Slot, |s: &Slot| s.host, host)
    }

    pub fn write_fenced(&self, rec: &FencedRecord) -> Result<(), DirError> {
        self.write_record(&self.fenced_path(rec.host), RecordKind::Fenced, rec)
    }

    pub fn read_fenced(&self, host: HostId) -> Result<Option<FencedRecord>, DirError> {
        self.read_record(&self.fenced_path(host), RecordKind::Fenced, |r: &FencedRecord| r.host, host)
    }

    pub fn write_assignments(&self, host: HostId, assignments: &Assignments) -> Result<(), DirError> {
        let rec = AssignmentsRecord { host, assignments: assignments.clone() };
        self.write_record(&self.assignments_path(host), RecordKind::Assignments, &rec)
    }

    pub fn read_assignments(&self, host: HostId) -> Result<Option<Assignments>, DirError> {
        let path = self.assignments_path(host);
        let rec = self.read_record(&path, RecordKind::Assignments, |r: &AssignmentsRecord| r.host, host)?;
        Ok(rec.map(|r| r.assignments))
    }

    pub fn write_poison(&self, req: &PoisonRequest) -> Result<(), DirError> {
        self.write_record(&self.poison_path(req.target), RecordKind::Poison, req)
    }

    pub fn read_poison(&self, host: HostId) -> Result<Option<PoisonRequest>, DirError> {
        self.read_record(&self.poison_path(host), RecordKind::Poison, |r: &PoisonRequest| r.target, host)
    }

    /// Withdraws any poison request aimed at `host` (writes an all-zero block).
    pub fn clear_poison(&self, host: HostId) -> Result<(), DirError> {
        self.write_block(&self.poison_path(host), &AlignedBlock::zeroed())
    }

    /// Everything a host polls each `storage_read_interval`: every slot and
    /// fenced record of `hosts`, and `me`'s assignments. A rejected record
    /// reads as absent ("no heartbeat", DESIGN.md §8) and is counted in
    /// `rejected_records`; an I/O error fails the whole read.
    pub fn read_snapshot(&self, me: HostId, hosts: &[HostId]) -> Result<StorageSnapshot, DirError> {
        super::read_snapshot(self, me, hosts)
    }
}

/// Leases.
impl DirStore {
    /// The lease of `key`; `FREE_LEASE` if its file was never written.
    pub fn read_lease(&self, key: LeaseKey) -> Result<Lease, DirError> {
        let rec = self.read_record(&self.lease_path(key), RecordKind::Lease, |r: &LeaseRecord| r.key, key)?;
        Ok(rec.map_or(FREE_LEASE, |r| r.lease))
    }

    /// Writes `new` only if the lease is at `expect_generation`, under an
    /// exclusive lock on the lease file (on NFS the server arbitrates), then
    /// re-reads it to verify. `Conflict` carries the lease as it is. A lease
    /// file that fails to decode is an error, never overwritten as if free.
    /// Waits about `lock_wait` for this process's gate and as long again for
    /// the file lock.
    pub fn cas_lease(&self, key: LeaseKey, expect_generation: u64, new: Lease) -> Result<CasOutcome, DirError> {
        if new.generation <= expect_generation {
            return Err(DirError::GenerationNotIncreasing { expect: expect_generation, new: new.generation });
        }
        let path = self.lease_path(key);
        let gate = self.gate(key);
        let _in_process = self.enter(&gate, &path)?;
        let file = self.open_for_write(&path)?;
        self.lock(&file, &path)?;
        let outcome = self.cas_locked(&file, &path, key, expect_generation, new);
        // Closing the file releases the lock too; unlock first so that the
        // next holder need not wait for the close.
        let _ = file.unlock();
        outcome
    }

    fn cas_locked(
        &self,
        file: &File,
        path: &Path,
        key: LeaseKey,
        expect: u64,
        new: Lease,
    ) -> Result<CasOutcome, DirError> {
        let current = self.read_lease_from(file, path, key)?;
        if current.generation != expect {
            return Ok(CasOutcome::Conflict(current));
        }
        let block = self.encode_block(path, RecordKind::Lease, &LeaseRecord { key, lease: new })?;
        let created = file_len(file, path)? == 0;
        direct::write_block(file, path, 0, &block)?;
        if created {
            sync_parent(path)?;
        }
        let found = self.read_lease_from(file, path, key)?;
        if found != new {
            return Err(DirError::VerifyFailed { path: path.to_path_buf(), found });
        }
        Ok(CasOutcome::Done(new))
    }

    fn read_lease_from(&self, file: &File, path: &Path, key: LeaseKey) -> Result<Lease, DirError> {
        let rec = self.read_record_from(file, path, RecordKind::Lease, |r: &LeaseRecord| r.key, key)?;
        Ok(rec.map_or(FREE_LEASE, |r| r.lease))
    }

    fn gate(&self, key: LeaseKey) -> Arc<Mutex<()>> {
        let mut gates = self.gates.lock().unwrap_or_else(PoisonError::into_inner);
        Arc::clone(gates.entry(key).or_default())
    }

    /// Takes this process's gate for one lease, polling as `lock` does.
    fn enter<'g>(&self, gate: &'g Mutex<()>, path: &Path) -> Result<MutexGuard<'g, ()>, DirError> {
        for _ in 0..self.lock_polls() {
            match gate.try_lock() {
                Ok(held) => return Ok(held),
                Err(GateBusy::Poisoned(p)) => return Ok(p.into_inner()),
                Err(GateBusy::WouldBlock) => std::thread::sleep(LOCK_POLL_INTERVAL),
            }
        }
        Err(DirError::LockTimeout { path: path.to_path_buf(), waited_ms: self.lock_wait.as_millis() })
    }

    fn lock_polls(&self) -> u128 {
        (self.lock_wait.as_micros() / LOCK_POLL_INTERVAL.as_micros().max(1)).max(1)
    }

    /// Polls `try_lock` every `LOCK_POLL_INTERVAL` for about `lock_wait`
    /// (counted in polls: no clock is read).
    fn lock(&self, file: &File, path: &Path) -> Result<(), DirError> {
        for _ in 0..self.lock_polls() {
            match file.try_lock() {
                Ok(()) => return Ok(()),
                Err(TryLockError::WouldBlock) => std::thread::sleep(LOCK_POLL_INTERVAL),
                Err(TryLockError::Error(e)) => return Err(DirError::io("lock", path)(e)),
            }
        }
        Err(DirError::LockTimeout { path: path.to_path_buf(), waited_ms: self.lock_wait.as_millis() })
    }
}

/// Domain definitions.
impl DirStore {
    /// Replaces the definition atomically (temporary file, fsync, rename,
    /// directory fsync). Only the lease owner writes it.
    pub fn write_domain_xml(&self, d: DomainId, xml: &str) -> Result<(), DirError> {
        let path = self.domain_xml_path(d);
        if xml.len() > MAX_DOMAIN_XML_BYTES {
            return Err(DirError::XmlTooLarge { path, len: xml.len() as u64, max: MAX_DOMAIN_XML_BYTES });
        }
        let tmp = path.with_extension("xml.tmp");
        let mut o = OpenOptions::new();
        o.write(true).create(true).truncate(true).mode(direct::FILE_MODE);
        let mut f = o.open(&tmp).map_err(DirError::io("create", &tmp))?;
        f.write_all(xml.as_bytes()).map_err(DirError::io("write", &tmp))?;
        f.sync_all().map_err(DirError::io("fsync", &tmp))?;
        fs::rename(&tmp, &path).map_err(DirError::io("rename", &tmp))?;
        sync_parent(&path)
    }

    /// Every domain with a stored definition: the protected domains.
    /// Files that are not `<uuid>.xml` (temporaries) are skipped.
    pub fn list_domain_xml(&self) -> Result<Vec<DomainId>, DirError> {
        let dir = self.base.join("domains");
        let mut ids = Vec::new();
        for entry in fs::read_dir(&dir).map_err(DirError::io("list", &dir))? {
            let entry = entry.map_err(DirError::io("list", &dir))?;
            let name = entry.file_name();
            let Some(uuid) = name.to_str().and_then(|n| n.strip_suffix(".xml")) else {
                continue;
            };
            if let Some(id) = crate::hypervisor::parse_uuid(uuid).filter(|id| domain_uuid(*id) == uuid) {
                ids.push(id);
            }
        }
        ids.sort();
        Ok(ids)
    }

    /// Removes a stored definition (unprotect); absent is fine.
    pub fn remove_domain_xml(&self, d: DomainId) -> Result<(), DirError> {
        let path = self.domain_xml_path(d);
        match fs::remove_file(&path) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            r => r.map_err(DirError::io("remove", &path)),
        }?;
        sync_parent(&path)
    }

    /// `Ok(None)`: no definition stored for `d`.
    pub fn read_domain_xml(&self, d: DomainId) -> Result<Option<String>, DirError> {
        let path = self.domain_xml_path(d);
        let f = match File::open(&path) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => return self.missing(&path),
            r => r.map_err(DirError::io("open", &path))?,
        };
        let mut xml = String::new();
        let limit = MAX_DOMAIN_XML_BYTES as u64 + 1;
        f.take(limit).read_to_string(&mut xml).map_err(DirError::io("read", &path))?;
        if xml.len() > MAX_DOMAIN_XML_BYTES {
            return Err(DirError::XmlTooLarge { path, len: xml.len() as u64, max: MAX_DOMAIN_XML_BYTES });
        }
        Ok(Some(xml))
    }
}

/// Block I/O shared by every record file.
impl DirStore {
    fn write_record<T: Serialize>(&self, path: &Path, kind: RecordKind, value: &T) -> Result<(), DirError> {
        let block = self.encode_block(path, kind, value)?;
        self.write_block(path, &block)
    }

    fn encode_block<T: Serialize>(&self, path: &Path, kind: RecordKind, v: &T) -> Result<Box<AlignedBlock>, DirError> {
        let bytes =
            encode(kind, self.cluster, v).map_err(|source| DirError::Encode { path: path.to_path_buf(), source })?;
        Ok(AlignedBlock::from_bytes(&bytes))
    }

    /// In place, O_DIRECT + fdatasync; a newly created file's directory entry
    /// is made durable too.
    fn write_block(&self, path: &Path, block: &AlignedBlock) -> Result<(), DirError> {
        let file = self.open_for_write(path)?;
        let created = file_len(&file, path)? == 0;
        direct::write_block(&file, path, 0, block)?;
        if created {
            sync_parent(path)?;
        }
        Ok(())
    }

    fn open_for_write(&self, path: &Path) -> Result<File, DirError> {
        match direct::open(path, Access::CreateReadWrite) {
            Err(e) if e.is_not_found() => Err(self.not_initialized(path)),
            r => Ok(r?),
        }
    }

    /// Reads the record at `path`, which must be the one for `want`.
    fn read_record<T, S>(&self, path: &Path, kind: RecordKind, subject: impl Fn(&T) -> S, want: S) -> ReadResult<T>
    where
        T: DeserializeOwned,
        S: PartialEq + Debug,
    {
        let file = match direct::open(path, Access::Read) {
            Err(e) if e.is_not_found() => return self.missing(path),
            r => r?,
        };
        self.read_record_from(&file, path, kind, subject, want)
    }

    fn read_record_from<T, S>(
        &self,
        f: &File,
        path: &Path,
        kind: RecordKind,
        subject: impl Fn(&T) -> S,
        want: S,
    ) -> ReadResult<T>
    where
        T: DeserializeOwned,
        S: PartialEq + Debug,
    {
        let (block, len) = direct::read_block(f, path, 0)?;
        if len == 0 {
            // Created but never written (a crash between create and write).
            return Ok(None);
        }
        decode_for(kind, self.cluster, &block.0[..len], subject, want).map_err(|e| self.reject(path, e))
    }

    /// A record that was never written, if its directory exists.
    fn missing<T>(&self, path: &Path) -> ReadResult<T> {
        if path.parent().is_some_and(Path::is_dir) { Ok(None) } else { Err(self.not_initialized(path)) }
    }

    fn not_initialized(&self, path: &Path) -> DirError {
        DirError::NotInitialized { path: path.parent().unwrap_or(path).to_path_buf() }
    }

    fn reject(&self, path: &Path, source: RecordError) -> DirError {
        self.rejects.lock().unwrap_or_else(PoisonError::into_inner).count(&source);
        DirError::Rejected { path: path.to_path_buf(), source }
    }
}

fn file_len(file: &File, path: &Path) -> Result<u64, DirError> {
    Ok(file.metadata().map_err(DirError::io("stat", path))?.len())
}

fn sync_parent(path: &Path) -> Result<(), DirError> {
    Ok(direct::sync_dir(path.parent().unwrap_or(Path::new(".")))?)
}

impl super::SnapshotSource for DirStore {
    type Error = DirError;
    fn slot(&self, host: HostId) -> Result<Option<Slot>, DirError> {
        self.read_slot(host)
    }
    fn fenced(&self, host: HostId) -> Result<Option<FencedRecord>, DirError> {
        self.read_fenced(host)
    }
    fn assignments(&self, host: HostId) -> Result<Option<Assignments>, DirError> {
        self.read_assignments(host)
    }
    fn poison(&self, host: HostId) -> Result<Option<PoisonRequest>, DirError> {
        self.read_poison(host)
    }
    fn is_rejected(e: &DirError) -> bool {
        matches!(e, DirError::Rejected { .. })
    }
}
