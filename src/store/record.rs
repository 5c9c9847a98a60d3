//! The on-disk record format shared by every backend (DESIGN.md §4, §8).
//!
//! Every record is one fixed block of [`BLOCK_BYTES`] = 4096 bytes, written
//! and read whole (O_DIRECT), so that a record is never half old, half new on
//! a 4 KiB-sector device and a torn write on a 512-byte-sector device is caught
//! by the checksum. All integers are little-endian.
//!
//! A record that must be written atomically on any device (a Disk Paxos
//! ballot block) is one *sector* instead: [`encode_sized`]/[`decode_sized`]
//! frame the same header in S = 512 or 4096 bytes, with the crc32c in the
//! last 4 bytes of the S (offsets below for S = 4096).
//!
//! ```text
//! offset  size  field
//!      0     8  magic            b"HAVIRT\0\x01"
//!      8     2  format version   u16, FORMAT_VERSION (= 1)
//!     10     2  record kind      u16, RecordKind (1 slot, 2 lease, 3 fenced,
//!                                4 assignments, 5 poison, 6 device header,
//!                                7 blob header, 16 ballot block)
//!     12    16  cluster id       first 16 bytes of SHA-256("havirt-cluster-id\0" ++ name)
//!     28     4  payload length   u32, at most MAX_PAYLOAD_BYTES (= 4060; S - 36)
//!     32     n  payload          postcard (compact serde binary) of the record
//!   32+n     …  zero padding
//!   4092     4  crc32c           over bytes 0..4092 (header, payload and padding)
//! ```
//!
//! The payload is postcard (compact binary serde) rather than JSON so that a
//! heartbeat slot holds the reports of 134 domains in one block even in the
//! worst case (JSON: about 40); the slot capacity test in tests/store.rs
//! measures the figure.
//!
//! A field may be appended to a record type without a new format version:
//! decoding reads the payload and its zero padding, so an older record
//! decodes the new field as zero (`None`, `false`, 0), and an older reader
//! stops before it (`Slot::stopped` came so).
//!
//! The magic, the version field and the checksum position are fixed for all
//! format versions; a later version may change everything else. Decoding
//! therefore checks, in order: length, all-zero (a block never written decodes
//! to `Ok(None)`, not an error), magic, checksum, version, cluster, kind,
//! payload length, payload. Any random corruption is thus reported as
//! `BadChecksum`, and `FutureVersion` only comes from a real newer writer.
//!
//! The cluster id is a hash of the configured cluster name rather than a
//! generated UUID: every host derives it from its configuration alone, with
//! no extra file to distribute, and two clusters sharing one export or LUN
//! under different names never accept each other's records. Renaming a
//! cluster makes it a new cluster (its old records read as foreign).
//!
//! A rejected record is "no record" to its reader (DESIGN.md §8): never a
//! command, and counted in [`RejectCounters`].

use crate::engine::config::HostId;
use crate::engine::io::{Assignments, BootId, Lease, LeaseKey};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::fmt;

/// Size of every record on disk, and the O_DIRECT alignment unit.
pub const BLOCK_BYTES: usize = 4096;
/// Magic, version, kind, cluster id and payload length.
pub const HEADER_BYTES: usize = 32;
/// The crc32c at the end of the block.
pub const CRC_BYTES: usize = 4;
/// The largest payload a record can carry.
pub const MAX_PAYLOAD_BYTES: usize = BLOCK_BYTES - HEADER_BYTES - CRC_BYTES;
/// The smallest record: one 512-byte sector (a Disk Paxos ballot block).
pub const MIN_RECORD_BYTES: usize = 512;
/// The format this build writes and the newest it reads.
pub const FORMAT_VERSION: u16 = 1;
pub const MAGIC: [u8; 8] = *b"HAVIRT\0\x01";

const VERSION_AT: usize = 8;
const KIND_AT: usize = 10;
const CLUSTER_AT: usize = 12;
const LEN_AT: usize = 28;
/// Domain separation for the cluster-id hash.
const CLUSTER_ID_PREFIX: &[u8] = b"havirt-cluster-id\0";

/// One encoded record.
pub type Block = [u8; BLOCK_BYTES];

/// What a block holds; stored so that a record copied to the wrong place is
/// rejected instead of misread.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[repr(u16)]
pub enum RecordKind {
    Slot = 1,
    Lease = 2,
    Fenced = 3,
    Assignments = 4,
    Poison = 5,
    /// Block 0 of a shared block device (see `store::block`).
    DeviceHeader = 6,
    /// The header of a variable-size copy on a block device (the registry
    /// of protected domains, a host's inventory): its version, length and
    /// checksum (`store::block::registry`).
    Blob = 7,
    /// A Disk Paxos ballot block, one device sector (`store::paxos`). Kept
    /// apart from the 4 KiB kinds so a sector copied onto one is refused.
    Dblock = 16,
}

/// 16 bytes that tie a record to one cluster.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ClusterId(pub [u8; 16]);

impl ClusterId {
    /// The id of the cluster with this configured name (see the module doc).
    pub fn from_name(name: &str) -> ClusterId {
        let digest = Sha256::new().chain_update(CLUSTER_ID_PREFIX).chain_update(name.as_bytes()).finalize();
        let mut id = [0u8; 16];
        id.copy_from_slice(&digest[..16]);
        ClusterId(id)
    }
}

impl fmt::Display for ClusterId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.iter().try_for_each(|b| write!(f, "{b:02x}"))
    }
}

/// A lease as stored: with its key, so that a lease file copied or renamed
/// onto another domain's path is rejected.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseRecord {
    pub key: LeaseKey,
    pub lease: Lease,
}

/// A host's assignment record as stored: with the host it is for.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AssignmentsRecord {
    pub host: HostId,
    pub assignments: Assignments,
}

/// A fence request by storage (SBD-style "poison pill"): the target obeys by
/// self-fencing if `boot` is its current boot. A request aimed at an earlier
/// boot is stale (the target already rebooted, which is what it asked for)
/// and is ignored. Obeying is not confirmation: the requester still waits for
/// S3(b) (DESIGN.md §4).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoisonRequest {
    pub target: HostId,
    pub boot: BootId,
    pub by: HostId,
}

/// Why a block was not accepted as a record.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RecordError {
    #[error("record truncated: {len} bytes, a record is exactly {expected} bytes")]
    Truncated { len: usize, expected: usize },
    #[error("not a havirt record (bad magic): the file or device holds something else")]
    BadMagic,
    #[error("record format version {found} is newer than this build reads ({supported}); upgrade havirt")]
    FutureVersion { found: u16, supported: u16 },
    #[error("record of kind {found} where a {expected:?} record belongs")]
    WrongKind { expected: RecordKind, found: u16 },
    #[error("record belongs to cluster {found}, not this cluster {expected}; check the cluster name and datastore")]
    ForeignCluster { expected: ClusterId, found: ClusterId },
    #[error("record checksum mismatch (stored {stored:#010x}, computed {computed:#010x}): corrupt or torn write")]
    BadChecksum { stored: u32, computed: u32 },
    #[error("record payload of {len} bytes exceeds the maximum of {max} bytes")]
    PayloadTooLarge { len: usize, max: usize },
    #[error("record for {found} stored where the record for {expected} belongs")]
    WrongSubject { expected: String, found: String },
    #[error("malformed record payload: {0}")]
    Malformed(String),
}

/// Rejected records since start, by reason (for metrics and `havirt status`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RejectCounters {
    pub truncated: u64,
    pub bad_magic: u64,
    pub future_version: u64,
    pub wrong_kind: u64,
    pub foreign_cluster: u64,
    pub bad_checksum: u64,
    pub payload_too_large: u64,
    pub wrong_subject: u64,
    pub malformed: u64,
}

impl RejectCounters {
    pub fn count(&mut self, e: &RecordError) {
        let c = match e {
            RecordError::Truncated { .. } => &mut self.truncated,
            RecordError::BadMagic => &mut self.bad_magic,
            RecordError::FutureVersion { .. } => &mut self.future_version,
            RecordError::WrongKind { .. } => &mut self.wrong_kind,
            RecordError::ForeignCluster { .. } => &mut self.foreign_cluster,
            RecordError::BadChecksum { .. } => &mut self.bad_checksum,
            RecordError::PayloadTooLarge { .. } => &mut self.payload_too_large,
            RecordError::WrongSubject { .. } => &mut self.wrong_subject,
            RecordError::Malformed(_) => &mut self.malformed,
        };
        *c = c.saturating_add(1);
    }

    pub fn total(&self) -> u64 {
        [
            self.truncated,
            self.bad_magic,
            self.future_version,
            self.wrong_kind,
            self.foreign_cluster,
            self.bad_checksum,
            self.payload_too_large,
            self.wrong_subject,
            self.malformed,
        ]
        .iter()
        .fold(0u64, |a, b| a.saturating_add(*b))
    }
}

/// Encodes `value` as one record block.
pub fn encode<T: Serialize>(kind: RecordKind, cluster: ClusterId, value: &T) -> Result<Block, RecordError> {
    let mut block = [0u8; BLOCK_BYTES];
    encode_into(kind, cluster, value, &mut block)?;
    Ok(block)
}

/// Encodes `value` as one record of `record_bytes` bytes (a sector: see
/// [`check_record_bytes`]), for records that must fit one device sector.
pub fn encode_sized<T: Serialize>(
    kind: RecordKind,
    cluster: ClusterId,
    value: &T,
    record_bytes: usize,
) -> Result<Vec<u8>, RecordError> {
    check_record_bytes(record_bytes)?;
    let mut out = vec![0u8; record_bytes];
    encode_into(kind, cluster, value, &mut out)?;
    Ok(out)
}

/// A record size this format frames: a power of two from
/// [`MIN_RECORD_BYTES`] (a 512-byte sector) to [`BLOCK_BYTES`].
pub fn check_record_bytes(record_bytes: usize) -> Result<(), RecordError> {
    if record_bytes.is_power_of_two() && (MIN_RECORD_BYTES..=BLOCK_BYTES).contains(&record_bytes) {
        return Ok(());
    }
    Err(RecordError::Malformed(format!(
        "record size {record_bytes}: a record is a power of two from {MIN_RECORD_BYTES} to {BLOCK_BYTES} bytes"
    )))
}

/// The largest payload a record of `record_bytes` bytes carries.
pub fn max_payload_bytes(record_bytes: usize) -> usize {
    record_bytes.saturating_sub(HEADER_BYTES + CRC_BYTES)
}

fn encode_into<T: Serialize>(
    kind: RecordKind,
    cluster: ClusterId,
    value: &T,
    out: &mut [u8],
) -> Result<(), RecordError> {
    let max = max_payload_bytes(out.len());
    let payload = postcard::to_allocvec(value).map_err(|e| RecordError::Malformed(e.to_string()))?;
    let len = u32::try_from(payload.len())
        .ok()
        .filter(|l| *l as usize <= max)
        .ok_or(RecordError::PayloadTooLarge { len: payload.len(), max })?;
    out[..VERSION_AT].copy_from_slice(&MAGIC);
    out[VERSION_AT..KIND_AT].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
    out[KIND_AT..CLUSTER_AT].copy_from_slice(&(kind as u16).to_le_bytes());
    out[CLUSTER_AT..LEN_AT].copy_from_slice(&cluster.0);
    out[LEN_AT..HEADER_BYTES].copy_from_slice(&len.to_le_bytes());
    out[HEADER_BYTES..HEADER_BYTES + payload.len()].copy_from_slice(&payload);
    let crc_at = out.len() - CRC_BYTES;
    let crc = crc32c::crc32c(&out[..crc_at]);
    out[crc_at..].copy_from_slice(&crc.to_le_bytes());
    Ok(())
}

/// Decodes one record block. `Ok(None)`: the block is all zeros, a record
/// never written (a fresh slot), which is not corruption.
pub fn decode<T: DeserializeOwned>(
    kind: RecordKind,
    cluster: ClusterId,
    bytes: &[u8],
) -> Result<Option<T>, RecordError> {
    decode_sized(kind, cluster, bytes, BLOCK_BYTES)
}

/// Decodes one record of `record_bytes` bytes (as `encode_sized` wrote it).
pub fn decode_sized<T: DeserializeOwned>(
    kind: RecordKind,
    cluster: ClusterId,
    bytes: &[u8],
    record_bytes: usize,
) -> Result<Option<T>, RecordError> {
    check_record_bytes(record_bytes)?;
    if bytes.len() < record_bytes {
        return Err(RecordError::Truncated { len: bytes.len(), expected: record_bytes });
    }
    if bytes.len() > record_bytes {
        return Err(RecordError::Malformed(format!("{} bytes, a record is {record_bytes}", bytes.len())));
    }
    if bytes.iter().all(|b| *b == 0) {
        return Ok(None);
    }
    check_header(kind, cluster, bytes)?;
    // The payload and its zero padding (both under the checksum): a field
    // appended to a record type after records were written reads as zero
    // (0, false, None) from an older record instead of failing it.
    let padded = &bytes[HEADER_BYTES..record_bytes - CRC_BYTES];
    postcard::from_bytes(padded).map(Some).map_err(|e| RecordError::Malformed(e.to_string()))
}

/// `decode`, then `check_subject`: the record must be the one for `want`.
pub fn decode_for<T, S>(
    kind: RecordKind,
    cluster: ClusterId,
    bytes: &[u8],
    subject: impl Fn(&T) -> S,
    want: S,
) -> Result<Option<T>, RecordError>
where
    T: DeserializeOwned,
    S: PartialEq + fmt::Debug,
{
    check_subject(decode(kind, cluster, bytes)?, subject, want)
}

/// Rejects a record found where another subject's belongs (a slot of host 3
/// in host 2's file, a lease under another domain's name): a copied or
/// misplaced file must not be read as the right one.
pub fn check_subject<T, S>(rec: Option<T>, subject: impl Fn(&T) -> S, want: S) -> Result<Option<T>, RecordError>
where
    S: PartialEq + fmt::Debug,
{
    match rec {
        Some(r) if subject(&r) != want => {
            Err(RecordError::WrongSubject { expected: format!("{want:?}"), found: format!("{:?}", subject(&r)) })
        }
        other => Ok(other),
    }
}

/// Checks everything but the payload's content; returns the payload.
fn check_header(kind: RecordKind, cluster: ClusterId, block: &[u8]) -> Result<&[u8], RecordError> {
    if block[..VERSION_AT] != MAGIC {
        return Err(RecordError::BadMagic);
    }
    let crc_at = block.len() - CRC_BYTES;
    let stored = u32::from_le_bytes(field(block, crc_at));
    let computed = crc32c::crc32c(&block[..crc_at]);
    if stored != computed {
        return Err(RecordError::BadChecksum { stored, computed });
    }
    let version = u16::from_le_bytes(field(block, VERSION_AT));
    if version > FORMAT_VERSION {
        return Err(RecordError::FutureVersion { found: version, supported: FORMAT_VERSION });
    }
    if version < FORMAT_VERSION {
        return Err(RecordError::Malformed(format!("format version {version} was never written by havirt")));
    }
    let found = ClusterId(field(block, CLUSTER_AT));
    if found != cluster {
        return Err(RecordError::ForeignCluster { expected: cluster, found });
    }
    let found_kind = u16::from_le_bytes(field(block, KIND_AT));
    if found_kind != kind as u16 {
        return Err(RecordError::WrongKind { expected: kind, found: found_kind });
    }
    let len = u32::from_le_bytes(field(block, LEN_AT)) as usize;
    let max = max_payload_bytes(block.len());
    if len > max {
        return Err(RecordError::PayloadTooLarge { len, max });
    }
    Ok(&block[HEADER_BYTES..HEADER_BYTES + len])
}

/// The `N` bytes at `at` (every call site is an offset inside the checked length).
fn field<const N: usize>(block: &[u8], at: usize) -> [u8; N] {
    let mut out = [0u8; N];
    out.copy_from_slice(&block[at..at + N]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::io::{FencedRecord, LeaseReason, Owner};

    fn cluster() -> ClusterId {
        ClusterId::from_name("lab")
    }

    fn fenced() -> FencedRecord {
        FencedRecord { host: HostId(2), boot: 77, by: HostId(1) }
    }

    /// `Slot` as written before `stopped` was appended.
    #[derive(Serialize, Deserialize, Debug, PartialEq)]
    struct SlotBeforeStopNotice {
        host: HostId,
        boot: BootId,
        incarnation: u64,
        seq: u64,
        isolated: bool,
        self_fenced: bool,
        maintenance: bool,
        released_master: Option<u64>,
        used_memory_mib: u64,
        used_vcpus: u32,
        domains: std::collections::BTreeMap<crate::engine::config::DomainId, crate::engine::io::DomainReport>,
        memory_mib: u64,
        vcpus: u32,
    }

    #[test]
    fn a_field_appended_to_a_record_reads_as_zero_from_an_older_record() {
        use crate::engine::io::{Slot, StopNotice};
        let old = SlotBeforeStopNotice {
            host: HostId(3),
            boot: 9,
            incarnation: 4,
            seq: 77,
            isolated: false,
            self_fenced: false,
            maintenance: true,
            released_master: Some(5),
            used_memory_mib: 1024,
            used_vcpus: 2,
            domains: Default::default(),
            memory_mib: 4096,
            vcpus: 8,
        };
        let b = encode(RecordKind::Slot, cluster(), &old).expect("fits");
        let new: Slot = decode(RecordKind::Slot, cluster(), &b).expect("decodes").expect("a record");
        assert_eq!((new.seq, new.maintenance, new.released_master, new.vcpus), (77, true, Some(5), 8));
        assert_eq!(new.stopped, None);
        // And an older reader reads a newer record, ignoring the field.
        let notice = StopNotice { grace_ms: 10_000, host_reset: false };
        let newer = Slot { stopped: Some(notice), ..new };
        let b = encode(RecordKind::Slot, cluster(), &newer).expect("fits");
        let back: Slot = decode(RecordKind::Slot, cluster(), &b).expect("decodes").expect("a record");
        assert_eq!(back.stopped, Some(notice));
        let as_old: SlotBeforeStopNotice = decode(RecordKind::Slot, cluster(), &b).expect("decodes").expect("a record");
        assert_eq!(as_old, old);
    }

    #[test]
    fn cluster_id_is_stable_and_name_dependent() {
        assert_eq!(ClusterId::from_name("lab"), ClusterId::from_name("lab"));
        assert_ne!(ClusterId::from_name("lab"), ClusterId::from_name("lab2"));
        assert_eq!(ClusterId::from_name("lab").to_string().len(), 32);
    }

    #[test]
    fn layout_is_as_documented() {
        let b = encode(RecordKind::Fenced, cluster(), &fenced()).expect("fits");
        assert_eq!(&b[..8], b"HAVIRT\0\x01");
        assert_eq!(u16::from_le_bytes([b[8], b[9]]), FORMAT_VERSION);
        assert_eq!(u16::from_le_bytes([b[10], b[11]]), 3);
        assert_eq!(b[12..28], cluster().0);
        let len = u32::from_le_bytes([b[28], b[29], b[30], b[31]]) as usize;
        let payload = postcard::to_allocvec(&fenced()).expect("serializes");
        assert_eq!(&b[32..32 + len], payload.as_slice());
        assert!(b[32 + len..4092].iter().all(|x| *x == 0));
        assert_eq!(u32::from_le_bytes([b[4092], b[4093], b[4094], b[4095]]), crc32c::crc32c(&b[..4092]));
        assert_eq!(MAX_PAYLOAD_BYTES, 4060);
    }

    #[test]
    fn round_trip_and_empty() {
        let lease = LeaseRecord {
            key: LeaseKey::Master,
            lease: Lease {
                owner: Some(Owner { host: HostId(1), boot: 5 }),
                generation: 9,
                reason: LeaseReason::Renewed,
            },
        };
        let b = encode(RecordKind::Lease, cluster(), &lease).expect("fits");
        assert_eq!(decode::<LeaseRecord>(RecordKind::Lease, cluster(), &b), Ok(Some(lease)));
        assert_eq!(decode::<LeaseRecord>(RecordKind::Lease, cluster(), &[0u8; BLOCK_BYTES]), Ok(None));
    }

    #[test]
    fn every_single_byte_flip_is_rejected() {
        let b = encode(RecordKind::Fenced, cluster(), &fenced()).expect("fits");
        for i in 0..BLOCK_BYTES {
            let mut c = b;
            c[i] ^= 0x5a;
            assert!(decode::<FencedRecord>(RecordKind::Fenced, cluster(), &c).is_err(), "flip at {i} accepted");
        }
    }

    #[test]
    fn payload_limit_is_exact() {
        // A postcard string of n bytes (n < 16384) is a 2-byte varint length + n.
        let fits = "x".repeat(MAX_PAYLOAD_BYTES - 2);
        let b = encode(RecordKind::Poison, cluster(), &fits).expect("fits exactly");
        assert_eq!(decode::<String>(RecordKind::Poison, cluster(), &b), Ok(Some(fits)));
        let over = "x".repeat(MAX_PAYLOAD_BYTES - 1);
        assert_eq!(
            encode(RecordKind::Poison, cluster(), &over),
            Err(RecordError::PayloadTooLarge { len: MAX_PAYLOAD_BYTES + 1, max: MAX_PAYLOAD_BYTES })
        );
    }

    #[test]
    fn counters_count_each_reason() {
        let mut c = RejectCounters::default();
        c.count(&RecordError::BadMagic);
        c.count(&RecordError::BadChecksum { stored: 1, computed: 2 });
        c.count(&RecordError::BadChecksum { stored: 1, computed: 2 });
        c.count(&RecordError::Malformed("x".into()));
        assert_eq!((c.bad_magic, c.bad_checksum, c.malformed, c.total()), (1, 2, 1, 4));
    }

    #[test]
    fn sector_sized_records_frame_like_blocks() {
        for n in [MIN_RECORD_BYTES, 1024, BLOCK_BYTES] {
            let r = encode_sized(RecordKind::Fenced, cluster(), &fenced(), n).expect("fits");
            assert_eq!(r.len(), n);
            assert_eq!(u32::from_le_bytes(r[n - 4..].try_into().expect("4")), crc32c::crc32c(&r[..n - 4]));
            assert_eq!(decode_sized::<FencedRecord>(RecordKind::Fenced, cluster(), &r, n), Ok(Some(fenced())));
            let wrong = decode_sized::<FencedRecord>(RecordKind::Dblock, cluster(), &r, n);
            assert!(matches!(wrong, Err(RecordError::WrongKind { expected: RecordKind::Dblock, found: 3 })));
            let short = decode_sized::<FencedRecord>(RecordKind::Fenced, cluster(), &r[..n - 1], n);
            assert_eq!(short, Err(RecordError::Truncated { len: n - 1, expected: n }));
        }
        let full = encode(RecordKind::Fenced, cluster(), &fenced()).expect("fits");
        let sized = encode_sized(RecordKind::Fenced, cluster(), &fenced(), BLOCK_BYTES).expect("fits");
        assert_eq!(full.to_vec(), sized, "a 4 KiB sized record is a block");
        for bad in [0, 100, 511, 513, 8192] {
            assert!(encode_sized(RecordKind::Fenced, cluster(), &fenced(), bad).is_err(), "{bad}");
        }
        let big = "x".repeat(max_payload_bytes(512));
        let e = encode_sized(RecordKind::Poison, cluster(), &big, 512);
        assert!(matches!(e, Err(RecordError::PayloadTooLarge { max: 476, .. })), "{e:?}");
    }
}
