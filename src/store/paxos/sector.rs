//! The on-disk form of one ballot block: one record per logical sector.
//!
//! A record never spans sectors, because a write of one aligned sector is the
//! only write a disk makes atomically (a 512-byte-sector disk may tear a 4 KiB
//! write between its sectors). The layout is `store::record`'s, with the
//! checksum at the end of the *sector* instead of the end of a 4 KiB block.
//! All integers are little-endian.
//!
//! ```text
//! offset  size  field
//!      0     8  magic            b"HAVIRT\0\x01" (record::MAGIC)
//!      8     2  format version   u16, PAXOS_FORMAT_VERSION (= 1)
//!     10     2  record kind      u16, DBLOCK_KIND (= 16; record::RecordKind uses 1..=6)
//!     12    16  cluster id       record::ClusterId
//!     28     4  payload length   u32, at most sector_bytes - 36
//!     32     n  payload          postcard of `Dblock` (at most 123 bytes)
//!   32+n     …  zero padding
//!    S-4     4  crc32c           over bytes 0..S-4 (S = sector_bytes)
//! ```
//!
//! Decoding checks, in order: length, all-zero (never written: `Ok(None)`),
//! magic, checksum, version, cluster, kind, payload length, payload, then that
//! the record is the one for this resource and this host slot, and that its
//! fields are consistent (see `Dblock::check`).

use super::{Area, Dblock};
use crate::engine::config::HostId;
use crate::engine::io::LeaseKey;
use crate::store::record::{ClusterId, MAGIC};

/// The dblock format this build writes and the newest it reads.
pub const PAXOS_FORMAT_VERSION: u16 = 1;
/// Record kind of a ballot block, outside `record::RecordKind`'s range so
/// that a dblock copied onto a 4 KiB record (or the reverse) is rejected.
pub const DBLOCK_KIND: u16 = 16;

const VERSION_AT: usize = 8;
const KIND_AT: usize = 10;
const CLUSTER_AT: usize = 12;
const LEN_AT: usize = 28;
const HEADER_BYTES: usize = 32;
const CRC_BYTES: usize = 4;

/// Why a sector was not accepted as this resource's ballot block. The CAS
/// stops on any of them (a block it cannot read may hold a promise it must
/// honour); the caller counts them.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DblockError {
    #[error("sector of {len} bytes, this area's sectors are {expected} bytes")]
    WrongLength { len: usize, expected: usize },
    #[error("not a havirt record (bad magic): the area holds something else")]
    BadMagic,
    #[error("dblock checksum mismatch (stored {stored:#010x}, computed {computed:#010x}): corrupt sector")]
    BadChecksum { stored: u32, computed: u32 },
    #[error("dblock format version {found} is newer than this build reads ({supported}); upgrade havirt")]
    FutureVersion { found: u16, supported: u16 },
    #[error("dblock format version {found} was never written by havirt")]
    UnknownVersion { found: u16 },
    #[error("record belongs to cluster {found}, not this cluster {expected}; check the cluster name and device")]
    ForeignCluster { expected: ClusterId, found: ClusterId },
    #[error("record of kind {found} where a ballot block (kind {DBLOCK_KIND}) belongs")]
    WrongKind { found: u16 },
    #[error("dblock payload of {len} bytes exceeds the {max} bytes a sector holds")]
    PayloadTooLarge { len: usize, max: usize },
    #[error("dblock of {found:?} stored in the area of {expected:?}")]
    WrongResource { expected: LeaseKey, found: LeaseKey },
    #[error("dblock of host {found} stored in the slot of host {expected}")]
    WrongHost { expected: HostId, found: HostId },
    #[error("malformed dblock: {0}")]
    Malformed(String),
}

/// One sector holding `d`.
pub fn encode(area: &Area, d: &Dblock) -> Result<Vec<u8>, DblockError> {
    let sector_bytes = area.layout.sector.bytes();
    let max = sector_bytes - HEADER_BYTES - CRC_BYTES;
    let payload = postcard::to_allocvec(d).map_err(|e| DblockError::Malformed(e.to_string()))?;
    let len = u32::try_from(payload.len())
        .ok()
        .filter(|l| *l as usize <= max)
        .ok_or(DblockError::PayloadTooLarge { len: payload.len(), max })?;
    let mut s = vec![0u8; sector_bytes];
    s[..VERSION_AT].copy_from_slice(&MAGIC);
    s[VERSION_AT..KIND_AT].copy_from_slice(&PAXOS_FORMAT_VERSION.to_le_bytes());
    s[KIND_AT..CLUSTER_AT].copy_from_slice(&DBLOCK_KIND.to_le_bytes());
    s[CLUSTER_AT..LEN_AT].copy_from_slice(&area.cluster.0);
    s[LEN_AT..HEADER_BYTES].copy_from_slice(&len.to_le_bytes());
    s[HEADER_BYTES..HEADER_BYTES + payload.len()].copy_from_slice(&payload);
    let crc_at = sector_bytes - CRC_BYTES;
    let crc = crc32c::crc32c(&s[..crc_at]);
    s[crc_at..].copy_from_slice(&crc.to_le_bytes());
    Ok(s)
}

/// The dblock of `host` in `area`; `Ok(None)`: an all-zero sector, never written.
pub fn decode(area: &Area, host: HostId, s: &[u8]) -> Result<Option<Dblock>, DblockError> {
    let expected = area.layout.sector.bytes();
    if s.len() != expected {
        return Err(DblockError::WrongLength { len: s.len(), expected });
    }
    if s.iter().all(|b| *b == 0) {
        return Ok(None);
    }
    let payload = check_header(area.cluster, s)?;
    let d: Dblock = postcard::from_bytes(payload).map_err(|e| DblockError::Malformed(e.to_string()))?;
    if d.key != area.key {
        return Err(DblockError::WrongResource { expected: area.key, found: d.key });
    }
    if d.host != host {
        return Err(DblockError::WrongHost { expected: host, found: d.host });
    }
    d.check().map_err(DblockError::Malformed)?;
    Ok(Some(d))
}

fn check_header(cluster: ClusterId, s: &[u8]) -> Result<&[u8], DblockError> {
    if s[..VERSION_AT] != MAGIC {
        return Err(DblockError::BadMagic);
    }
    let crc_at = s.len() - CRC_BYTES;
    let stored = u32::from_le_bytes(field(s, crc_at));
    let computed = crc32c::crc32c(&s[..crc_at]);
    if stored != computed {
        return Err(DblockError::BadChecksum { stored, computed });
    }
    let version = u16::from_le_bytes(field(s, VERSION_AT));
    if version > PAXOS_FORMAT_VERSION {
        return Err(DblockError::FutureVersion { found: version, supported: PAXOS_FORMAT_VERSION });
    }
    if version < PAXOS_FORMAT_VERSION {
        return Err(DblockError::UnknownVersion { found: version });
    }
    let found = ClusterId(field(s, CLUSTER_AT));
    if found != cluster {
        return Err(DblockError::ForeignCluster { expected: cluster, found });
    }
    let kind = u16::from_le_bytes(field(s, KIND_AT));
    if kind != DBLOCK_KIND {
        return Err(DblockError::WrongKind { found: kind });
    }
    let len = u32::from_le_bytes(field(s, LEN_AT)) as usize;
    let max = crc_at - HEADER_BYTES;
    if len > max {
        return Err(DblockError::PayloadTooLarge { len, max });
    }
    Ok(&s[HEADER_BYTES..HEADER_BYTES + len])
}

/// The `N` bytes at `at` (every call site is inside the checked length).
fn field<const N: usize>(s: &[u8], at: usize) -> [u8; N] {
    let mut out = [0u8; N];
    out.copy_from_slice(&s[at..at + N]);
    out
}
