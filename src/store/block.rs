//! The `block` backend: the same records in fixed 4 KiB blocks on a shared
//! block device (a raw iSCSI/FC LUN, or a loop device in the lab) or a plain
//! file, like SBD and sanlock. Slot number = host id.
//!
//! ```text
//! block (4096 bytes each)          record
//! 0                                DeviceHeader { max_hosts = M }
//! 1 + h              (h < M)       heartbeat Slot of host h
//! 1 + M + h                        PoisonRequest aimed at host h
//! 1 + 2M + h                       FencedRecord of host h
//! 1 + 3M + h                       AssignmentsRecord of host h
//! device size >= (1 + 4M) * 4096 bytes
//! ```
//!
//! Every block is a `store::record` record of this cluster (the header too,
//! so a LUN of another cluster is refused at open), written in place with
//! O_DIRECT + fdatasync and read with O_DIRECT. All zeros: never written.
//!
//! There are no leases here on purpose: file locks are local to one kernel,
//! so nothing serializes two hosts' writes to a raw LUN. Leases on a LUN need
//! a disk-based algorithm (sanlock's delta and Paxos leases) or SCSI-3
//! persistent reservations; until then leases live in a `dir` datastore.
//!
//! Every function is synchronous and may block for as long as the device does;
//! the daemon runs them on worker threads bounded by `io_timeout`.

use super::direct::{self, Access, AlignedBlock, DirectIoError};
use super::record::{AssignmentsRecord, BLOCK_BYTES, ClusterId, PoisonRequest, RecordError, RecordKind};
use super::record::{RejectCounters, decode, decode_for, encode};
use crate::engine::config::HostId;
use crate::engine::io::{Assignments, FencedRecord, Slot, StorageError, StorageSnapshot};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use std::fs::File;
use std::io::{self, Seek, SeekFrom};
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};

/// The most host slots a device can be formatted with (16 MiB of records).
pub const MAX_BLOCK_HOSTS: u16 = 1024;

/// Block 0.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceHeader {
    pub max_hosts: u16,
}

/// The per-host regions, in device order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Region {
    Slot = 0,
    Poison = 1,
    Fenced = 2,
    Assignments = 3,
}

const REGIONS: u64 = 4;

/// Where each record is, for a device formatted for `max_hosts` hosts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockLayout {
    pub max_hosts: u16,
}

impl BlockLayout {
    /// Block number of `region`'s record for `host`.
    pub fn block(&self, region: Region, host: HostId) -> Result<u64, BlockError> {
        if host.0 >= self.max_hosts {
            return Err(BlockError::HostOutOfRange { host, max_hosts: self.max_hosts });
        }
        Ok(1 + region as u64 * u64::from(self.max_hosts) + u64::from(host.0))
    }

    pub fn device_bytes(&self) -> u64 {
        (1 + REGIONS * u64::from(self.max_hosts)) * BLOCK_BYTES as u64
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    #[error(transparent)]
    Direct(#[from] DirectIoError),
    #[error("{path}: {op} failed: {source}")]
    Io { op: &'static str, path: PathBuf, source: io::Error },
    #[error("{path} holds no havirt header: format it first (havirt init)")]
    NotInitialized { path: PathBuf },
    #[error("{path} is not empty ({detail}); refusing to format it, wipe it deliberately first if it is unused")]
    NotEmpty { path: PathBuf, detail: String },
    #[error("max_hosts {max_hosts} out of range: 1 to {MAX_BLOCK_HOSTS}")]
    MaxHostsOutOfRange { max_hosts: u16 },
    #[error("host {host} has no slot: the device was formatted for host ids 0 to {max_hosts} (exclusive)")]
    HostOutOfRange { host: HostId, max_hosts: u16 },
    #[error("{path} has {size_bytes} bytes, its layout needs {needed_bytes}")]
    TooSmall { path: PathBuf, size_bytes: u64, needed_bytes: u64 },
    #[error("{path}: block {block}: record rejected: {source}")]
    Rejected { path: PathBuf, block: u64, source: RecordError },
    #[error("cannot encode record: {0}")]
    Encode(RecordError),
}

impl BlockError {
    /// What the engine is told (`Input::*::result`).
    pub fn storage_error(&self) -> StorageError {
        StorageError::Io
    }

    fn io(op: &'static str, path: &Path) -> impl FnOnce(io::Error) -> BlockError {
        move |source| BlockError::Io { op, path: path.to_path_buf(), source }
    }
}

type ReadResult<T> = Result<Option<T>, BlockError>;

/// An open, formatted device. `Send + Sync`: positional I/O on one file.
#[derive(Debug)]
pub struct BlockStore {
    path: PathBuf,
    file: File,
    cluster: ClusterId,
    layout: BlockLayout,
    rejects: Mutex<RejectCounters>,
}

impl BlockStore {
    /// Formats `path` (an existing device or file; a file is extended as
    /// needed) for `max_hosts` hosts: zeroes every record, then writes the
    /// header last. Idempotent on a device already formatted the same way;
    /// refuses any other non-empty device.
    pub fn init(path: &Path, cluster: &str, max_hosts: u16) -> Result<BlockStore, BlockError> {
        if max_hosts == 0 || max_hosts > MAX_BLOCK_HOSTS {
            return Err(BlockError::MaxHostsOutOfRange { max_hosts });
        }
        let id = ClusterId::from_name(cluster);
        let file = direct::open(path, Access::ReadWrite)?;
        let (block, len) = direct::read_block(&file, path, 0)?;
        let layout = BlockLayout { max_hosts };
        let not_empty = |detail: String| BlockError::NotEmpty { path: path.to_path_buf(), detail };
        let found =
            if len == 0 { Ok(None) } else { decode::<DeviceHeader>(RecordKind::DeviceHeader, id, &block.0[..len]) };
        match found {
            Ok(None) => {}
            Ok(Some(h)) if h.max_hosts == max_hosts => return BlockStore::open(path, cluster),
            Ok(Some(h)) => return Err(not_empty(format!("formatted for {} hosts, not {max_hosts}", h.max_hosts))),
            Err(e) => return Err(not_empty(e.to_string())),
        }
        ensure_size(&file, path, layout.device_bytes())?;
        format(&file, path, id, layout)?;
        BlockStore::open(path, cluster)
    }

    /// Opens a formatted device of this cluster.
    pub fn open(path: &Path, cluster: &str) -> Result<BlockStore, BlockError> {
        let id = ClusterId::from_name(cluster);
        let file = direct::open(path, Access::ReadWrite)?;
        let (block, len) = direct::read_block(&file, path, 0)?;
        let not_init = || BlockError::NotInitialized { path: path.to_path_buf() };
        if len == 0 {
            return Err(not_init());
        }
        let rejected = |source| BlockError::Rejected { path: path.to_path_buf(), block: 0, source };
        let header: DeviceHeader =
            decode(RecordKind::DeviceHeader, id, &block.0[..len]).map_err(rejected)?.ok_or_else(not_init)?;
        let layout = BlockLayout { max_hosts: header.max_hosts };
        if header.max_hosts == 0 || header.max_hosts > MAX_BLOCK_HOSTS {
            return Err(rejected(RecordError::Malformed(format!("max_hosts {} in header", header.max_hosts))));
        }
        let size_bytes = device_size(&file, path)?;
        if size_bytes < layout.device_bytes() {
            let needed_bytes = layout.device_bytes();
            return Err(BlockError::TooSmall { path: path.to_path_buf(), size_bytes, needed_bytes });
        }
        Ok(BlockStore { path: path.to_path_buf(), file, cluster: id, layout, rejects: Mutex::default() })
    }

    pub fn layout(&self) -> BlockLayout {
        self.layout
    }

    pub fn cluster_id(&self) -> ClusterId {
        self.cluster
    }

    /// Records rejected by this store since it was opened.
    pub fn rejects(&self) -> RejectCounters {
        *self.rejects.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Zeroes every record block, then writes the header: a device whose
/// formatting was interrupted has no header and is still "not initialized".
fn format(file: &File, path: &Path, id: ClusterId, layout: BlockLayout) -> Result<(), BlockError> {
    let zero = AlignedBlock::zeroed();
    let blocks = layout.device_bytes() / BLOCK_BYTES as u64;
    for b in 1..blocks {
        direct::write_block_nosync(file, path, b * BLOCK_BYTES as u64, &zero)?;
    }
    direct::sync(file, path)?;
    let header = encode(RecordKind::DeviceHeader, id, &DeviceHeader { max_hosts: layout.max_hosts });
    let header = header.map_err(BlockError::Encode)?;
    direct::write_block(file, path, 0, &AlignedBlock::from_bytes(&header))?;
    Ok(())
}

fn device_size(file: &File, path: &Path) -> Result<u64, BlockError> {
    let mut f = file;
    f.seek(SeekFrom::End(0)).map_err(BlockError::io("seek", path))
}

/// A plain file is extended to `needed` bytes; a device must be big enough.
fn ensure_size(file: &File, path: &Path, needed_bytes: u64) -> Result<(), BlockError> {
    let size_bytes = device_size(file, path)?;
    if size_bytes >= needed_bytes {
        return Ok(());
    }
    let meta = file.metadata().map_err(BlockError::io("stat", path))?;
    if meta.file_type().is_block_device() {
        return Err(BlockError::TooSmall { path: path.to_path_buf(), size_bytes, needed_bytes });
    }
    file.set_len(needed_bytes).map_err(BlockError::io("extend", path))?;
    file.sync_all().map_err(BlockError::io("fsync", path))
}

/// Records.
impl BlockStore {
    pub fn write_slot(&self, slot: &Slot) -> Result<(), BlockError> {
        self.write_record(Region::Slot, slot.host, RecordKind::Slot, slot)
    }

    /// `Ok(None)`: the host never wrote its slot.
    pub fn read_slot(&self, host: HostId) -> ReadResult<Slot> {
        self.read_record(Region::Slot, host, RecordKind::Slot, |s: &Slot| s.host)
    }

    pub fn write_poison(&self, req: &PoisonRequest) -> Result<(), BlockError> {
        self.write_record(Region::Poison, req.target, RecordKind::Poison, req)
    }

    pub fn read_poison(&self, host: HostId) -> ReadResult<PoisonRequest> {
        self.read_record(Region::Poison, host, RecordKind::Poison, |r: &PoisonRequest| r.target)
    }

    /// Withdraws any poison request aimed at `host` (writes an all-zero block).
    pub fn clear_poison(&self, host: HostId) -> Result<(), BlockError> {
        let offset = self.layout.block(Region::Poison, host)? * BLOCK_BYTES as u64;
        Ok(direct::write_block(&self.file, &self.path, offset, &AlignedBlock::zeroed())?)
    }

    pub fn write_fenced(&self, rec: &FencedRecord) -> Result<(), BlockError> {
        self.write_record(Region::Fenced, rec.host, RecordKind::Fenced, rec)
    }

    pub fn read_fenced(&self, host: HostId) -> ReadResult<FencedRecord> {
        self.read_record(Region::Fenced, host, RecordKind::Fenced, |r: &FencedRecord| r.host)
    }

    pub fn write_assignments(&self, host: HostId, assignments: &Assignments) -> Result<(), BlockError> {
        let rec = AssignmentsRecord { host, assignments: assignments.clone() };
        self.write_record(Region::Assignments, host, RecordKind::Assignments, &rec)
    }

    pub fn read_assignments(&self, host: HostId) -> ReadResult<Assignments> {
        let rec = self.read_record(Region::Assignments, host, RecordKind::Assignments, |r: &AssignmentsRecord| r.host);
        Ok(rec?.map(|r| r.assignments))
    }

    /// As `DirStore::read_snapshot`: a rejected record reads as absent and
    /// is counted; an I/O error (or a host without a slot) fails the read.
    pub fn read_snapshot(&self, me: HostId, hosts: &[HostId]) -> Result<StorageSnapshot, BlockError> {
        super::read_snapshot(self, me, hosts)
    }

    fn write_record<T: Serialize>(
        &self,
        region: Region,
        host: HostId,
        kind: RecordKind,
        v: &T,
    ) -> Result<(), BlockError> {
        let offset = self.layout.block(region, host)? * BLOCK_BYTES as u64;
        let bytes = encode(kind, self.cluster, v).map_err(BlockError::Encode)?;
        Ok(direct::write_block(&self.file, &self.path, offset, &AlignedBlock::from_bytes(&bytes))?)
    }

    fn read_record<T>(
        &self,
        region: Region,
        host: HostId,
        kind: RecordKind,
        subject: impl Fn(&T) -> HostId,
    ) -> ReadResult<T>
    where
        T: DeserializeOwned,
    {
        let block = self.layout.block(region, host)?;
        let (data, len) = direct::read_block(&self.file, &self.path, block * BLOCK_BYTES as u64)?;
        decode_for(kind, self.cluster, &data.0[..len], subject, host).map_err(|source| {
            self.rejects.lock().unwrap_or_else(PoisonError::into_inner).count(&source);
            BlockError::Rejected { path: self.path.clone(), block, source }
        })
    }
}

impl super::SnapshotSource for BlockStore {
    type Error = BlockError;
    fn slot(&self, host: HostId) -> Result<Option<Slot>, BlockError> {
        self.read_slot(host)
    }
    fn fenced(&self, host: HostId) -> Result<Option<FencedRecord>, BlockError> {
        self.read_fenced(host)
    }
    fn assignments(&self, host: HostId) -> Result<Option<Assignments>, BlockError> {
        self.read_assignments(host)
    }
    fn poison(&self, host: HostId) -> Result<Option<PoisonRequest>, BlockError> {
        self.read_poison(host)
    }
    fn is_rejected(e: &BlockError) -> bool {
        matches!(e, BlockError::Rejected { .. })
    }
}
