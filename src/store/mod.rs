//! Shared-storage records and backends (DESIGN.md §4).
//!
//! - `record`: the 4096-byte on-disk record format (header, cluster id,
//!   postcard payload, crc32c) and why a record is rejected.
//! - `dir`: records as files in a datastore directory (NFS export), with
//!   lease compare-and-swap under a file lock.
//! - `block`: everything on a shared block device (or a plain file) with no
//!   locks: the same records in fixed 4 KiB slots, leases by Disk Paxos, the
//!   registry and inventories in per-host copy areas (see its module doc).
//! - `direct`: aligned O_DIRECT block I/O both backends share.
//! - `paxos`: lease compare-and-swap on a raw LUN without locks (Disk
//!   Paxos), as a pure state machine with its per-sector ballot records.
//! - `inventory`: each host's bridges and libvirt networks, for `havirt
//!   check` on the others (informational).
//! - [`Store`]: either backend behind one set of calls, so that the daemon
//!   (and through it the engine) does not learn which one it talks to.
//!
//! Everything here is synchronous and blocking: the daemon calls it from
//! worker threads and bounds each call with `io_timeout`.

pub mod block;
pub mod dir;
pub mod direct;
pub mod inventory;
pub mod paxos;
pub mod record;

use crate::engine::config::{DomainId, HostId};
use crate::engine::io::{Assignments, CasOutcome, FencedRecord, Lease, LeaseKey, Slot, StorageError, StorageSnapshot};
use block::{BlockError, BlockStore};
use dir::{DirError, DirStore};
use record::{PoisonRequest, RejectCounters};
use std::collections::{BTreeMap, BTreeSet};

/// A datastore of either kind (config `[cluster.datastore]`).
#[derive(Debug)]
pub enum Store {
    Dir(DirStore),
    Block(BlockHandle),
}

/// A block datastore, opened now or at its first call that finds the
/// device answering (a daemon must start when its LUN hangs, so that the
/// engine self-fences what runs here: S4).
#[derive(Debug)]
pub struct BlockHandle {
    path: std::path::PathBuf,
    cluster: String,
    host: HostId,
    opened: std::sync::OnceLock<BlockStore>,
    opening: std::sync::Mutex<()>,
}

impl BlockHandle {
    pub fn opened(store: BlockStore, cluster: &str, host: HostId) -> BlockHandle {
        let h = BlockHandle::unopened(store.path(), cluster, host);
        let _ = h.opened.set(store);
        h
    }

    pub fn unopened(path: &std::path::Path, cluster: &str, host: HostId) -> BlockHandle {
        BlockHandle {
            path: path.to_path_buf(),
            cluster: cluster.to_owned(),
            host,
            opened: std::sync::OnceLock::new(),
            opening: std::sync::Mutex::new(()),
        }
    }

    /// The open store, opening it first if need be.
    pub fn get(&self) -> Result<&BlockStore, BlockError> {
        if let Some(s) = self.opened.get() {
            return Ok(s);
        }
        let _one = self.opening.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(s) = self.opened.get() {
            return Ok(s);
        }
        let s = BlockStore::open(&self.path, &self.cluster)?.for_host(self.host)?;
        Ok(self.opened.get_or_init(|| s))
    }
}

impl Store {
    /// The configured datastore, for host `me`, checked (dir: its
    /// directories exist; block: its header is this cluster's).
    pub fn open(ds: &crate::config::Datastore, cluster: &str, me: HostId) -> Result<Store, StoreError> {
        match ds {
            crate::config::Datastore::Dir { path } => Ok(Store::Dir(DirStore::open(path, cluster)?)),
            crate::config::Datastore::Block { device } => {
                let s = BlockStore::open(device, cluster)?.for_host(me)?;
                Ok(Store::Block(BlockHandle::opened(s, cluster, me)))
            }
        }
    }

    /// Without looking at the storage: every later call fails or times out
    /// until it answers (see `DirStore::open_unchecked`, `BlockHandle`).
    pub fn open_unchecked(ds: &crate::config::Datastore, cluster: &str, me: HostId) -> Result<Store, StoreError> {
        match ds {
            crate::config::Datastore::Dir { path } => Ok(Store::Dir(DirStore::open_unchecked(path, cluster)?)),
            crate::config::Datastore::Block { device } => Ok(Store::Block(BlockHandle::unopened(device, cluster, me))),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(transparent)]
    Dir(#[from] DirError),
    #[error(transparent)]
    Block(#[from] BlockError),
    #[error(transparent)]
    Inventory(#[from] inventory::InventoryError),
}

impl StoreError {
    /// What the engine is told (`Input::*::result`).
    pub fn storage_error(&self) -> StorageError {
        match self {
            StoreError::Dir(e) => e.storage_error(),
            StoreError::Block(e) => e.storage_error(),
            StoreError::Inventory(_) => StorageError::Io,
        }
    }

    /// A rejected record (corrupt, foreign, misplaced), not an I/O error.
    pub fn is_rejected(&self) -> bool {
        match self {
            StoreError::Dir(e) => <DirStore as SnapshotSource>::is_rejected(e),
            StoreError::Block(e) => <BlockStore as SnapshotSource>::is_rejected(e),
            StoreError::Inventory(_) => false,
        }
    }
}

/// What a stored definition looked like when read (mtime and length of a
/// dir datastore's file; checksum and length on a block device): unchanged
/// stamp, unchanged definition.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct XmlStamp {
    pub version: u128,
    pub len: u64,
}

/// Calls both backends have, under one name.
macro_rules! both {
    ($self:ident, $s:ident => $call:expr) => {
        match $self {
            Store::Dir($s) => Ok($call?),
            Store::Block(b) => {
                let $s = b.get()?;
                Ok($call?)
            }
        }
    };
}

impl Store {
    pub fn rejects(&self) -> RejectCounters {
        match self {
            Store::Dir(s) => s.rejects(),
            Store::Block(b) => b.opened.get().map(BlockStore::rejects).unwrap_or_default(),
        }
    }

    pub fn write_slot(&self, slot: &Slot) -> Result<(), StoreError> {
        both!(self, s => s.write_slot(slot))
    }

    pub fn read_slot(&self, host: HostId) -> Result<Option<Slot>, StoreError> {
        both!(self, s => s.read_slot(host))
    }

    pub fn read_snapshot(&self, me: HostId, hosts: &[HostId]) -> Result<StorageSnapshot, StoreError> {
        both!(self, s => s.read_snapshot(me, hosts))
    }

    pub fn read_lease(&self, key: LeaseKey) -> Result<Lease, StoreError> {
        both!(self, s => s.read_lease(key))
    }

    /// Compare-and-swap with one meaning on both backends: under a file
    /// lock (dir) or by Disk Paxos (block).
    pub fn cas_lease(&self, key: LeaseKey, expect_generation: u64, new: Lease) -> Result<CasOutcome, StoreError> {
        both!(self, s => s.cas_lease(key, expect_generation, new))
    }

    pub fn write_fenced(&self, rec: &FencedRecord) -> Result<(), StoreError> {
        both!(self, s => s.write_fenced(rec))
    }

    pub fn read_fenced(&self, host: HostId) -> Result<Option<FencedRecord>, StoreError> {
        both!(self, s => s.read_fenced(host))
    }

    pub fn write_assignments(&self, host: HostId, a: &Assignments) -> Result<(), StoreError> {
        both!(self, s => s.write_assignments(host, a))
    }

    pub fn write_poison(&self, req: &PoisonRequest) -> Result<(), StoreError> {
        both!(self, s => s.write_poison(req))
    }

    pub fn clear_poison(&self, host: HostId) -> Result<(), StoreError> {
        both!(self, s => s.clear_poison(host))
    }

    pub fn write_domain_xml(&self, d: DomainId, xml: &str) -> Result<(), StoreError> {
        both!(self, s => s.write_domain_xml(d, xml))
    }

    pub fn read_domain_xml(&self, d: DomainId) -> Result<Option<String>, StoreError> {
        both!(self, s => s.read_domain_xml(d))
    }

    pub fn remove_domain_xml(&self, d: DomainId) -> Result<(), StoreError> {
        both!(self, s => s.remove_domain_xml(d))
    }

    pub fn list_domain_xml(&self) -> Result<Vec<DomainId>, StoreError> {
        both!(self, s => s.list_domain_xml())
    }

    /// The stamp of `d`'s stored definition; `None`: none stored (or its
    /// file vanished meanwhile).
    pub fn xml_stamp(&self, d: DomainId) -> Result<Option<XmlStamp>, StoreError> {
        match self {
            Store::Dir(s) => {
                let Ok(meta) = std::fs::metadata(s.domain_xml_path(d)) else { return Ok(None) };
                let mtime = meta.modified().unwrap_or(std::time::UNIX_EPOCH);
                let version = mtime.duration_since(std::time::UNIX_EPOCH).map_or(0, |t| t.as_nanos());
                Ok(Some(XmlStamp { version, len: meta.len() }))
            }
            Store::Block(b) => Ok(b
                .get()?
                .read_domain_xml(d)?
                .map(|x| XmlStamp { version: u128::from(crc32c::crc32c(x.as_bytes())), len: x.len() as u64 })),
        }
    }

    /// This host's inventory (informational, for `havirt check` elsewhere).
    pub fn write_inventory(&self, host: HostId, inv: &inventory::Inventory) -> Result<(), StoreError> {
        match self {
            Store::Dir(s) => Ok(inventory::write(s.base(), host, inv)?),
            Store::Block(b) => Ok(b.get()?.write_inventory(inventory::encode(inv).as_bytes())?),
        }
    }

    /// Host `host`'s inventory, checked as `inventory::read` checks it.
    pub fn read_inventory(
        &self,
        cluster: &str,
        host: HostId,
        name: &str,
    ) -> Result<Option<inventory::Inventory>, String> {
        match self {
            Store::Dir(s) => inventory::read(s.base(), cluster, host, name).map_err(|e| e.to_string()),
            Store::Block(b) => {
                let s = b.get().map_err(|e| e.to_string())?;
                let Some(bytes) = s.read_inventory(host).map_err(|e| e.to_string())? else { return Ok(None) };
                let text = String::from_utf8(bytes).map_err(|_| "inventory is not UTF-8".to_string())?;
                inventory::decode(&text, cluster, host, name).map(Some)
            }
        }
    }
}

/// The per-host records one storage snapshot is made of; both backends
/// provide them, `read_snapshot` assembles them the same way.
pub trait SnapshotSource {
    type Error;
    fn slot(&self, host: HostId) -> Result<Option<Slot>, Self::Error>;
    fn fenced(&self, host: HostId) -> Result<Option<FencedRecord>, Self::Error>;
    fn assignments(&self, host: HostId) -> Result<Option<Assignments>, Self::Error>;
    fn poison(&self, host: HostId) -> Result<Option<PoisonRequest>, Self::Error>;
    /// The error is a rejected record (corrupt, foreign, misplaced).
    fn is_rejected(e: &Self::Error) -> bool;
}

/// Every slot and fenced record, and my assignments and poison request. A
/// rejected record reads as absent and is counted; any other error (an EIO)
/// fails the whole read, since hiding it would look like "slots stopped".
pub fn read_snapshot<S: SnapshotSource>(src: &S, me: HostId, hosts: &[HostId]) -> Result<StorageSnapshot, S::Error> {
    let mut rejected = 0u32;
    let (mut slots, mut fenced) = (BTreeMap::new(), BTreeMap::new());
    for h in hosts.iter().copied().collect::<BTreeSet<_>>() {
        if let Some(s) = absent_if_rejected::<_, S>(src.slot(h), &mut rejected)? {
            slots.insert(h, s);
        }
        if let Some(f) = absent_if_rejected::<_, S>(src.fenced(h), &mut rejected)? {
            fenced.insert(h, f);
        }
    }
    let assignments = absent_if_rejected::<_, S>(src.assignments(me), &mut rejected)?.unwrap_or_default();
    let poison = absent_if_rejected::<_, S>(src.poison(me), &mut rejected)?.map(|p| p.boot);
    Ok(StorageSnapshot { slots, fenced, assignments, poison, rejected_records: rejected })
}

fn absent_if_rejected<T, S: SnapshotSource>(
    r: Result<Option<T>, S::Error>,
    rejected: &mut u32,
) -> Result<Option<T>, S::Error> {
    match r {
        Err(e) if S::is_rejected(&e) => {
            *rejected = rejected.saturating_add(1);
            Ok(None)
        }
        other => other,
    }
}
