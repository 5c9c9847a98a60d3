//! Shared-storage records and backends (DESIGN.md §4).
//!
//! - `record`: the 4096-byte on-disk record format (header, cluster id,
//!   postcard payload, crc32c) and why a record is rejected.
//! - `dir`: records as files in a datastore directory (NFS export), with
//!   lease compare-and-swap under a file lock.
//! - `block`: the same records in fixed 4 KiB slots on a shared block device
//!   (or a plain file): heartbeat slots, poison requests, fenced and
//!   assignment records. No leases (see its module doc).
//! - `direct`: aligned O_DIRECT block I/O both backends share.
//! - `paxos`: lease compare-and-swap on a raw LUN without locks (Disk
//!   Paxos), as a pure state machine with its per-sector ballot records.
//! - `inventory`: each host's bridges and libvirt networks, for `havirt
//!   check` on the others (dir datastores only; informational).
//!
//! Everything here is synchronous and blocking: the daemon calls it from
//! worker threads and bounds each call with `io_timeout`.

pub mod block;
pub mod dir;
pub mod direct;
pub mod inventory;
pub mod paxos;
pub mod record;

use crate::engine::config::HostId;
use crate::engine::io::{Assignments, FencedRecord, Slot, StorageSnapshot};
use record::PoisonRequest;
use std::collections::{BTreeMap, BTreeSet};

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
