//! The on-disk form of one ballot block: one `store::record` record per
//! sector, of kind [`RecordKind::Dblock`].
//!
//! A record never spans sectors, because a write of one aligned sector is the
//! only write a disk makes atomically (a 512-byte-sector disk may tear a 4 KiB
//! write between its sectors). The framing is `store::record`'s
//! (`encode_sized`/`decode_sized`: magic, version, kind, cluster id, payload
//! length, postcard payload, crc32c in the last 4 bytes of the sector); the
//! payload is the postcard of a `Dblock` (at most 123 bytes, so it fits a
//! 512-byte sector).
//!
//! Decoding checks what `record::decode_sized` checks, then that the record
//! is the one for this resource and this host slot (`WrongSubject`), and that
//! its fields are consistent (`Malformed`, see `Dblock::check`). A rejected
//! sector is a `RecordError`, counted by the caller in its `RejectCounters`.

use super::{Area, Dblock};
use crate::engine::config::HostId;
use crate::store::record::{RecordError, RecordKind, check_subject, decode_sized, encode_sized};

/// One sector holding `d`.
pub fn encode(area: &Area, d: &Dblock) -> Result<Vec<u8>, RecordError> {
    encode_sized(RecordKind::Dblock, area.cluster, d, area.layout.sector.bytes())
}

/// The dblock of `host` in `area`; `Ok(None)`: an all-zero sector, never written.
pub fn decode(area: &Area, host: HostId, s: &[u8]) -> Result<Option<Dblock>, RecordError> {
    let d: Option<Dblock> = decode_sized(RecordKind::Dblock, area.cluster, s, area.layout.sector.bytes())?;
    let d = check_subject(d, |d| d.key, area.key)?;
    let d = check_subject(d, |d| d.host, host)?;
    if let Some(d) = &d {
        d.check().map_err(RecordError::Malformed)?;
    }
    Ok(d)
}
