//! The `block` backend: every record of a datastore on a shared block
//! device (a raw iSCSI/FC LUN, or a loop device in the lab) or a plain file,
//! with no file locks and no cluster filesystem, like SBD and sanlock.
//!
//! ```text
//! 4 KiB block                      what                         written by
//! 0                                DeviceHeader                 havirt init
//! 1 + h              (h < M)       heartbeat Slot of host h     host h
//! 1 + M + h                        PoisonRequest aimed at h     any host
//! 1 + 2M + h                       FencedRecord of host h       any host
//! 1 + 3M + h                       AssignmentsRecord of host h  the master
//! L = 1 + 4M                       lease areas, A blocks each:  Disk Paxos
//!   L + 0·A                          master.lease                 (block::lease)
//!   L + 1·A                          the registry's version
//!   L + (2 + i)·A    (i < D)         domain lease of table index i
//! R = L + (2 + D)·A                registry copies: host h's    host h
//!   R + (2h + c)·G   (c = 0, 1)      copy c, G blocks each      (block::registry)
//! I = R + 2M·G                     inventory copies, host h's   host h
//!   I + (2h + c)·V                   copy c, V blocks each
//! end = I + 2M·V
//! ```
//!
//! M = `max_hosts`, D = `max_domains`, G = `registry_blocks`, V =
//! `inventory_blocks`, all fixed by `havirt init` in the header; S =
//! `sector_bytes`, the unit of an atomic write (the device's physical sector
//! size, at least its logical one: 512 or 4096); A = ⌈M·S / 4096⌉.
//!
//! The 4 KiB blocks are `store::record` records of this cluster (the header
//! too, so a LUN of another cluster is refused at open), written in place
//! with O_DIRECT + fdatasync and read with O_DIRECT; all zeros: never
//! written. Each has one writer at a time except poison and fenced records
//! (idempotent: any writer writes the same fact) and assignments (the
//! master). A 4 KiB write may tear between 512-byte sectors on power loss;
//! the checksum catches it (a rejected record: "no record").
//!
//! Leases and the registry need agreement among hosts, which file locks
//! cannot give on a raw LUN: each lease is a Disk Paxos area (`store::paxos`:
//! host h writes only sector h, one record per physical sector, so a write
//! never tears into a neighbour's), driven here with sector I/O
//! (`block::lease`). The registry of protected domains is versioned by its
//! own Paxos area; each version lives in its author's own copy area, so no
//! two hosts ever write the same block of it (`block::registry`).
//!
//! Every function is synchronous and may block for as long as the device does;
//! the daemon runs them on worker threads bounded by `io_timeout`.

mod lease;
mod registry;

pub use lease::{CAS_BACKOFF_MAX, CAS_BUDGET, MAX_CAS_ATTEMPTS};
pub use registry::{MAX_REGISTRY_ATTEMPTS, Registry, RegistryEntry};

use super::direct::{self, Access, AlignedBlock, DirectIoError};
use super::paxos::{self, PaxosError};
use super::record::{AssignmentsRecord, BLOCK_BYTES, ClusterId, PoisonRequest, RecordError, RecordKind};
use super::record::{RejectCounters, decode, decode_for, encode};
use crate::engine::config::{DomainId, HostId};
use crate::engine::io::{Assignments, FencedRecord, LeaseKey, Slot, StorageError, StorageSnapshot};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use std::fs::File;
use std::io::{self, Seek, SeekFrom};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};

/// The most host slots a device can be formatted with.
pub const MAX_BLOCK_HOSTS: u16 = 1024;
/// The most domain leases a device can be formatted with.
pub const MAX_BLOCK_DOMAINS: u32 = 65_536;
/// The layout this build writes and reads (the header's `layout`).
pub const LAYOUT_VERSION: u16 = 2;
/// `havirt init` defaults: room for 16 hosts, 256 protected domains, a
/// registry copy of 2 MiB (256 definitions of 8 KiB) and an inventory copy
/// of 64 KiB: 68 MiB with 512-byte sectors (the registry copies are most of it).
pub const DEFAULT_MAX_HOSTS: u16 = 16;
pub const DEFAULT_MAX_DOMAINS: u32 = 256;
pub const DEFAULT_REGISTRY_BLOCKS: u32 = 512;
pub const DEFAULT_INVENTORY_BLOCKS: u32 = 16;
/// Formatting zeroes (and the emptiness check reads) this much per I/O.
const FORMAT_CHUNK_BYTES: usize = 1024 * 1024;

/// Block 0: how the device is laid out.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceHeader {
    pub layout: u16,
    pub max_hosts: u16,
    pub max_domains: u32,
    pub sector_bytes: u16,
    pub registry_blocks: u32,
    pub inventory_blocks: u32,
}

/// The per-host record regions, in device order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Region {
    Slot = 0,
    Poison = 1,
    Fenced = 2,
    Assignments = 3,
}

const REGIONS: u64 = 4;

/// Which of a host's copy areas.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CopyArea {
    Registry,
    Inventory,
}

/// Which Paxos area.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum AreaIndex {
    Master,
    /// The registry's version.
    Registry,
    /// The domain lease at this table index.
    Domain(u32),
}

/// What `havirt init` formats a device for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockFormat {
    pub max_hosts: u16,
    pub max_domains: u32,
    pub registry_blocks: u32,
    pub inventory_blocks: u32,
}

impl Default for BlockFormat {
    fn default() -> BlockFormat {
        BlockFormat {
            max_hosts: DEFAULT_MAX_HOSTS,
            max_domains: DEFAULT_MAX_DOMAINS,
            registry_blocks: DEFAULT_REGISTRY_BLOCKS,
            inventory_blocks: DEFAULT_INVENTORY_BLOCKS,
        }
    }
}

/// Where each record is, for a device formatted by one header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockLayout {
    pub max_hosts: u16,
    pub max_domains: u32,
    pub sector: paxos::SectorSize,
    pub registry_blocks: u32,
    pub inventory_blocks: u32,
}

impl BlockLayout {
    /// Checks every bound; the error names the field and its range.
    pub fn new(f: BlockFormat, sector: paxos::SectorSize) -> Result<BlockLayout, BlockError> {
        if f.max_hosts == 0 || f.max_hosts > MAX_BLOCK_HOSTS {
            return Err(BlockError::MaxHostsOutOfRange { max_hosts: f.max_hosts });
        }
        if f.max_domains == 0 || f.max_domains > MAX_BLOCK_DOMAINS {
            return Err(BlockError::MaxDomainsOutOfRange { max_domains: f.max_domains });
        }
        if !(2..=65_536).contains(&f.registry_blocks) || !(2..=4096).contains(&f.inventory_blocks) {
            return Err(BlockError::CopyAreaOutOfRange { registry: f.registry_blocks, inventory: f.inventory_blocks });
        }
        Ok(BlockLayout {
            max_hosts: f.max_hosts,
            max_domains: f.max_domains,
            sector,
            registry_blocks: f.registry_blocks,
            inventory_blocks: f.inventory_blocks,
        })
    }

    pub fn format(&self) -> BlockFormat {
        BlockFormat {
            max_hosts: self.max_hosts,
            max_domains: self.max_domains,
            registry_blocks: self.registry_blocks,
            inventory_blocks: self.inventory_blocks,
        }
    }

    fn header(&self) -> DeviceHeader {
        DeviceHeader {
            layout: LAYOUT_VERSION,
            max_hosts: self.max_hosts,
            max_domains: self.max_domains,
            sector_bytes: u16::try_from(self.sector.bytes()).unwrap_or(u16::MAX),
            registry_blocks: self.registry_blocks,
            inventory_blocks: self.inventory_blocks,
        }
    }

    fn from_header(h: &DeviceHeader) -> Result<BlockLayout, String> {
        if h.layout != LAYOUT_VERSION {
            return Err(format!("layout version {} (this havirt reads {LAYOUT_VERSION})", h.layout));
        }
        let sector = match h.sector_bytes {
            512 => paxos::SectorSize::B512,
            4096 => paxos::SectorSize::B4096,
            n => return Err(format!("sector size {n} in the header")),
        };
        let f = BlockFormat {
            max_hosts: h.max_hosts,
            max_domains: h.max_domains,
            registry_blocks: h.registry_blocks,
            inventory_blocks: h.inventory_blocks,
        };
        BlockLayout::new(f, sector).map_err(|e| e.to_string())
    }

    fn m(&self) -> u64 {
        u64::from(self.max_hosts)
    }

    /// Block number of `region`'s record for `host`.
    pub fn block(&self, region: Region, host: HostId) -> Result<u64, BlockError> {
        self.check_host(host)?;
        Ok(1 + region as u64 * self.m() + u64::from(host.0))
    }

    fn check_host(&self, host: HostId) -> Result<(), BlockError> {
        if host.0 >= self.max_hosts {
            return Err(BlockError::HostOutOfRange { host, max_hosts: self.max_hosts });
        }
        Ok(())
    }

    /// Blocks of one Paxos area (A).
    pub fn area_blocks(&self) -> u64 {
        self.paxos().area_bytes().div_ceil(BLOCK_BYTES) as u64
    }

    pub fn paxos(&self) -> paxos::Layout {
        paxos::Layout { sector: self.sector, max_hosts: self.max_hosts }
    }

    fn leases_start(&self) -> u64 {
        1 + REGIONS * self.m()
    }

    /// Byte offset of a Paxos area.
    pub fn area_offset(&self, area: AreaIndex) -> Result<u64, BlockError> {
        let k = match area {
            AreaIndex::Master => 0,
            AreaIndex::Registry => 1,
            AreaIndex::Domain(i) if i < self.max_domains => 2 + u64::from(i),
            AreaIndex::Domain(i) => {
                return Err(BlockError::DomainTableFull { max_domains: self.max_domains, index: i });
            }
        };
        Ok((self.leases_start() + k * self.area_blocks()) * BLOCK_BYTES as u64)
    }

    fn copies_start(&self, which: CopyArea) -> u64 {
        let registry = self.leases_start() + (2 + u64::from(self.max_domains)) * self.area_blocks();
        match which {
            CopyArea::Registry => registry,
            CopyArea::Inventory => registry + 2 * self.m() * u64::from(self.registry_blocks),
        }
    }

    /// Blocks of one copy (G or V).
    pub fn copy_blocks(&self, which: CopyArea) -> u64 {
        u64::from(match which {
            CopyArea::Registry => self.registry_blocks,
            CopyArea::Inventory => self.inventory_blocks,
        })
    }

    /// First block of host `host`'s copy `copy` (0 or 1).
    pub fn copy_block(&self, which: CopyArea, host: HostId, copy: u8) -> Result<u64, BlockError> {
        self.check_host(host)?;
        let n = 2 * u64::from(host.0) + u64::from(copy.min(1));
        Ok(self.copies_start(which) + n * self.copy_blocks(which))
    }

    pub fn device_bytes(&self) -> u64 {
        let end = self.copies_start(CopyArea::Inventory) + 2 * self.m() * u64::from(self.inventory_blocks);
        end * BLOCK_BYTES as u64
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    #[error(transparent)]
    Direct(#[from] DirectIoError),
    #[error("{path}: {op} failed: {source}")]
    Io { op: &'static str, path: PathBuf, source: io::Error },
    #[error("{path} holds no havirt header: format it first (havirt init --datastore {path})")]
    NotInitialized { path: PathBuf },
    #[error(
        "{path} is not empty ({detail}); refusing to format it. If it is really unused, wipe it deliberately or run havirt init --force"
    )]
    NotEmpty { path: PathBuf, detail: String },
    #[error("{path}: {detail}; reformat it with this havirt (havirt init --force) or use the havirt that formatted it")]
    BadHeader { path: PathBuf, detail: String },
    #[error("max_hosts {max_hosts} out of range: 1 to {MAX_BLOCK_HOSTS}")]
    MaxHostsOutOfRange { max_hosts: u16 },
    #[error("max_domains {max_domains} out of range: 1 to {MAX_BLOCK_DOMAINS}")]
    MaxDomainsOutOfRange { max_domains: u32 },
    #[error("copy areas out of range: registry {registry} blocks (2 to 65536), inventory {inventory} (2 to 4096)")]
    CopyAreaOutOfRange { registry: u32, inventory: u32 },
    #[error("host {host} has no slot: the device was formatted for host ids 0 to {max_hosts} (exclusive)")]
    HostOutOfRange { host: HostId, max_hosts: u16 },
    #[error(
        "{path} has {size_bytes} bytes, its layout needs {needed_bytes}; use a larger LUN, or fewer hosts or domains (havirt init --max-hosts/--max-domains)"
    )]
    TooSmall { path: PathBuf, size_bytes: u64, needed_bytes: u64 },
    #[error(
        "{path}: logical sector size {logical} bytes does not fit the layout's {sector} bytes per ballot sector (havirt supports 512 and 4096); the LUN is not the one that was formatted, or reformat it (havirt init --force)"
    )]
    WrongSectorSize { path: PathBuf, logical: u64, sector: usize },
    #[error("{path} is a {what}, not a block device or a regular file; name the shared LUN (/dev/disk/by-id/...)")]
    NotADevice { path: PathBuf, what: &'static str },
    #[error("{path}: block {block}: record rejected: {source}")]
    Rejected { path: PathBuf, block: u64, source: RecordError },
    #[error("{path}: lease area of {area:?}: {source}")]
    Lease { path: PathBuf, area: AreaIndex, source: PaxosError },
    #[error(
        "{path}: the CAS on {key:?} lost {attempts} rounds to other hosts' ballots within {budget_ms} ms; the engine retries"
    )]
    Contended { path: PathBuf, key: LeaseKey, attempts: u32, budget_ms: u128 },
    #[error(
        "{path}: a CAS on {key:?} by this process is still waiting for its I/O; the next one waits for it (Disk Paxos forbids two)"
    )]
    CasInFlight { path: PathBuf, key: LeaseKey },
    #[error("{path}: this store was opened without a host id; leases need one (BlockStore::for_host)")]
    NoHost { path: PathBuf },
    #[error(
        "the domain table is full ({max_domains} domains, index {index}); reformat the LUN for more (havirt init --max-domains)"
    )]
    DomainTableFull { max_domains: u32, index: u32 },
    #[error(
        "{path}: {what} of {len} bytes does not fit its copy area of {max} bytes; reformat the LUN with larger copy areas (havirt init --registry-blocks)"
    )]
    CopyTooLarge { path: PathBuf, what: &'static str, len: usize, max: usize },
    #[error(
        "{path}: the registry's committed copy was not read in {attempts} attempts (it changed each time, or its copy is rejected: see the rejected records); try again"
    )]
    RegistryBusy { path: PathBuf, attempts: u32 },
    #[error("domain {0:?} cannot be protected on a block datastore (the nil UUID keys the registry's own area)")]
    ReservedDomain(DomainId),
    #[error("cannot encode record: {0}")]
    Encode(RecordError),
}

impl BlockError {
    /// What the engine is told (`Input::*::result`).
    pub fn storage_error(&self) -> StorageError {
        match self {
            BlockError::Contended { .. } | BlockError::CasInFlight { .. } | BlockError::RegistryBusy { .. } => {
                StorageError::Timeout
            }
            _ => StorageError::Io,
        }
    }

    fn io(op: &'static str, path: &Path) -> impl FnOnce(io::Error) -> BlockError {
        move |source| BlockError::Io { op, path: path.to_path_buf(), source }
    }
}

type ReadResult<T> = Result<Option<T>, BlockError>;

/// What the device under a path is, as `havirt check` reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Geometry {
    pub block_device: bool,
    /// Logical and physical sector sizes (a regular file: 512 and its
    /// filesystem's block size, at most 4096).
    pub logical_bytes: u64,
    pub physical_bytes: u64,
    pub size_bytes: u64,
}

impl Geometry {
    /// The ballot sector a new layout uses: a physical sector, so that a
    /// ballot never shares one with a neighbour's (a torn write of a 512e
    /// disk's read-modify-write would hit both).
    pub fn sector(&self) -> Option<paxos::SectorSize> {
        match self.physical_bytes.max(self.logical_bytes) {
            0..=512 => Some(paxos::SectorSize::B512),
            4096 => Some(paxos::SectorSize::B4096),
            _ => None,
        }
    }
}

/// Sector sizes from sysfs (`/sys/dev/block/MAJ:MIN/queue/*_block_size`),
/// which needs no ioctl; a file that is neither a device nor a regular file
/// is refused.
pub fn geometry(path: &Path, file: &File) -> Result<Geometry, BlockError> {
    let meta = file.metadata().map_err(BlockError::io("stat", path))?;
    let ft = meta.file_type();
    let size_bytes = device_size(file, path)?;
    if ft.is_block_device() {
        let (maj, min) = (libc::major(meta.rdev()), libc::minor(meta.rdev()));
        let q = PathBuf::from(format!("/sys/dev/block/{maj}:{min}/queue"));
        let read = |name: &str| -> Result<u64, BlockError> {
            let p = q.join(name);
            let text = std::fs::read_to_string(&p).map_err(BlockError::io("read", &p))?;
            text.trim().parse().map_err(|_| BlockError::Io {
                op: "parse",
                path: p.clone(),
                source: io::Error::new(io::ErrorKind::InvalidData, text.trim().to_owned()),
            })
        };
        let logical_bytes = read("logical_block_size")?;
        let physical_bytes = read("physical_block_size")?;
        return Ok(Geometry { block_device: true, logical_bytes, physical_bytes, size_bytes });
    }
    if ft.is_file() {
        let physical_bytes = meta.blksize().clamp(512, BLOCK_BYTES as u64);
        return Ok(Geometry { block_device: false, logical_bytes: 512, physical_bytes, size_bytes });
    }
    let what = if ft.is_dir() {
        "directory"
    } else if ft.is_char_device() {
        "character device"
    } else {
        "special file"
    };
    Err(BlockError::NotADevice { path: path.to_path_buf(), what })
}

/// An open, formatted device. `Send + Sync`: positional I/O on one file.
#[derive(Debug)]
pub struct BlockStore {
    path: PathBuf,
    file: File,
    cluster: ClusterId,
    layout: BlockLayout,
    /// This host (the proposer of its Paxos ballots); `None`: read-only use
    /// (havirt check) or records only.
    host: Option<HostId>,
    rejects: Mutex<RejectCounters>,
    proposers: lease::Proposers,
    registry: registry::RegistryState,
    /// Every read and write this store issued after open (for the cost
    /// figures in tests and `havirt check`).
    ios: IoCounts,
}

/// Reads and writes issued, each one I/O call (a write includes its fdatasync).
#[derive(Debug, Default)]
pub struct IoCounts {
    pub reads: std::sync::atomic::AtomicU64,
    pub writes: std::sync::atomic::AtomicU64,
}

impl BlockStore {
    /// Formats `path` (an existing device or file; a file is extended as
    /// needed) with `format`: zeroes the whole layout, then writes the header
    /// last. On a device already formatted the same way for this cluster it
    /// only opens it (idempotent, records kept). Any other header, or any
    /// non-zero byte where the layout goes, is refused unless `force`.
    pub fn init(path: &Path, cluster: &str, format: BlockFormat, force: bool) -> Result<BlockStore, BlockError> {
        let id = ClusterId::from_name(cluster);
        let file = direct::open(path, Access::ReadWrite)?;
        let geo = geometry(path, &file)?;
        let sector = geo.sector().ok_or(BlockError::WrongSectorSize {
            path: path.to_path_buf(),
            logical: geo.logical_bytes,
            sector: geo.physical_bytes.try_into().unwrap_or(usize::MAX),
        })?;
        let layout = BlockLayout::new(format, sector)?;
        let not_empty = |detail: String| BlockError::NotEmpty { path: path.to_path_buf(), detail };
        let (block, len) = direct::read_block(&file, path, 0)?;
        let found =
            if len == 0 { Ok(None) } else { decode::<DeviceHeader>(RecordKind::DeviceHeader, id, &block.0[..len]) };
        match found {
            Ok(Some(h)) if h == layout.header() && !force => return BlockStore::open(path, cluster),
            Ok(Some(h)) if !force => {
                return Err(not_empty(format!("formatted for this cluster with another layout: {h:?}")));
            }
            Err(e) if !force => return Err(not_empty(e.to_string())),
            Ok(None) if !force => check_zero(&file, path, layout.device_bytes().min(geo.size_bytes))?,
            _ => {}
        }
        ensure_size(&file, path, layout.device_bytes())?;
        format_device(&file, path, id, layout)?;
        BlockStore::open(path, cluster)
    }

    /// Opens a formatted device of this cluster (records and lease reads;
    /// add `for_host` to change leases).
    pub fn open(path: &Path, cluster: &str) -> Result<BlockStore, BlockError> {
        let id = ClusterId::from_name(cluster);
        let file = direct::open(path, Access::ReadWrite)?;
        let geo = geometry(path, &file)?;
        let (block, len) = direct::read_block(&file, path, 0)?;
        let not_init = || BlockError::NotInitialized { path: path.to_path_buf() };
        if len == 0 {
            return Err(not_init());
        }
        let rejected = |source| BlockError::Rejected { path: path.to_path_buf(), block: 0, source };
        let header: DeviceHeader =
            decode(RecordKind::DeviceHeader, id, &block.0[..len]).map_err(rejected)?.ok_or_else(not_init)?;
        let layout = BlockLayout::from_header(&header)
            .map_err(|detail| BlockError::BadHeader { path: path.to_path_buf(), detail })?;
        let sector = layout.sector.bytes();
        if geo.logical_bytes > sector as u64 || !(sector as u64).is_multiple_of(geo.logical_bytes.max(1)) {
            let logical = geo.logical_bytes;
            return Err(BlockError::WrongSectorSize { path: path.to_path_buf(), logical, sector });
        }
        if geo.size_bytes < layout.device_bytes() {
            let (size_bytes, needed_bytes) = (geo.size_bytes, layout.device_bytes());
            return Err(BlockError::TooSmall { path: path.to_path_buf(), size_bytes, needed_bytes });
        }
        Ok(BlockStore {
            path: path.to_path_buf(),
            file,
            cluster: id,
            layout,
            host: None,
            rejects: Mutex::default(),
            proposers: lease::Proposers::default(),
            registry: registry::RegistryState::default(),
            ios: IoCounts::default(),
        })
    }

    /// This store acts for host `host`: its ballots, its copy areas.
    pub fn for_host(mut self, host: HostId) -> Result<BlockStore, BlockError> {
        self.layout.check_host(host)?;
        self.host = Some(host);
        Ok(self)
    }

    pub fn layout(&self) -> BlockLayout {
        self.layout
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn cluster_id(&self) -> ClusterId {
        self.cluster
    }

    /// Records rejected by this store since it was opened.
    pub fn rejects(&self) -> RejectCounters {
        *self.rejects.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// (reads, writes) issued since open.
    pub fn io_counts(&self) -> (u64, u64) {
        use std::sync::atomic::Ordering::Relaxed;
        (self.ios.reads.load(Relaxed), self.ios.writes.load(Relaxed))
    }

    fn read_at(&self, offset: u64, len: usize) -> Result<direct::AlignedBuf, BlockError> {
        self.ios.reads.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(direct::read_exact_at(&self.file, &self.path, offset, len)?)
    }

    fn write_at(&self, offset: u64, buf: &direct::AlignedBuf) -> Result<(), BlockError> {
        self.ios.writes.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(direct::write_all_at(&self.file, &self.path, offset, buf)?)
    }

    fn read_block_at(&self, block: u64) -> Result<direct::AlignedBuf, BlockError> {
        self.read_at(block * BLOCK_BYTES as u64, BLOCK_BYTES)
    }

    fn write_block_at(&self, block: u64, bytes: &[u8]) -> Result<(), BlockError> {
        self.write_at(block * BLOCK_BYTES as u64, &direct::AlignedBuf::from_slice(bytes))
    }

    fn count_reject(&self, e: &RecordError) {
        self.rejects.lock().unwrap_or_else(PoisonError::into_inner).count(e);
    }

    fn me(&self) -> Result<HostId, BlockError> {
        self.host.ok_or_else(|| BlockError::NoHost { path: self.path.clone() })
    }
}

/// Refuses a device with any non-zero byte where the layout goes: it may
/// hold someone's data (a filesystem, an LVM PV, another cluster).
fn check_zero(file: &File, path: &Path, bytes: u64) -> Result<(), BlockError> {
    let mut at = 0u64;
    while at < bytes {
        let n = usize::try_from((bytes - at).min(FORMAT_CHUNK_BYTES as u64)).unwrap_or(FORMAT_CHUNK_BYTES);
        let n = n - n % 512;
        if n == 0 {
            break;
        }
        let buf = direct::read_exact_at(file, path, at, n)?;
        if let Some(i) = buf.as_slice().iter().position(|b| *b != 0) {
            let detail = format!("non-zero data at byte {}", at + i as u64);
            return Err(BlockError::NotEmpty { path: path.to_path_buf(), detail });
        }
        at += n as u64;
    }
    Ok(())
}

/// Zeroes the whole layout, then writes the header: a device whose
/// formatting was interrupted has no header and is still "not initialized".
fn format_device(file: &File, path: &Path, id: ClusterId, layout: BlockLayout) -> Result<(), BlockError> {
    let zero = direct::AlignedBuf::zeroed(FORMAT_CHUNK_BYTES);
    // The header goes first as zeros too: a re-format (--force) must not
    // leave the old header over the new layout if it stops half-way.
    let total = layout.device_bytes();
    let mut at = 0u64;
    while at < total {
        let n = usize::try_from((total - at).min(FORMAT_CHUNK_BYTES as u64)).unwrap_or(FORMAT_CHUNK_BYTES);
        let buf = if n == FORMAT_CHUNK_BYTES { &zero } else { &direct::AlignedBuf::zeroed(n) };
        direct::write_all_at(file, path, at, buf)?;
        at += n as u64;
    }
    let header = encode(RecordKind::DeviceHeader, id, &layout.header()).map_err(BlockError::Encode)?;
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
        self.write_block_at(self.layout.block(Region::Poison, host)?, &[0u8; BLOCK_BYTES])
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
        let bytes = encode(kind, self.cluster, v).map_err(BlockError::Encode)?;
        self.write_block_at(self.layout.block(region, host)?, &bytes)
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
        let data = self.read_block_at(block)?;
        decode_for(kind, self.cluster, data.as_slice(), subject, host).map_err(|source| {
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
