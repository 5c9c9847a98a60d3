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
//!
//! Everything here is synchronous and blocking: the daemon calls it from
//! worker threads and bounds each call with `io_timeout`.

pub mod block;
pub mod dir;
pub mod direct;
pub mod record;
