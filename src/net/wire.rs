//! Authenticated network heartbeat packets (DESIGN.md §1 "Incarnation", §8).
//!
//! # Packet layout (version 1)
//!
//! All integers are big-endian. One packet is one UDP datagram.
//!
//! | offset | bytes | field |
//! |-------:|------:|-------|
//! | 0      | 4     | magic `b"HAVH"` |
//! | 4      | 1     | wire version (`1`) |
//! | 5      | 16    | cluster id |
//! | 21     | 2     | sender host id (`HostId`, u16) |
//! | 23     | 8     | sender boot id (u64) |
//! | 31     | 8     | nonce: random u64 chosen at every daemon start |
//! | 39     | 8     | sequence number: strictly increasing per nonce |
//! | 47     | 2     | payload length `n` (u16) |
//! | 49     | n     | payload: serde_json of [`NetMessage`] |
//! | 49 + n | 32    | HMAC-SHA256, keyed with the cluster key, over bytes `0 .. 49 + n` |
//!
//! A whole packet is at most [`MAX_PACKET_BYTES`] (1400), so that one
//! heartbeat fits one Ethernet frame with IPv4 or IPv6 and UDP headers and
//! is never IP-fragmented (a lost fragment loses the whole heartbeat).
//!
//! # What the receiver checks, in order
//!
//! size ([`WireError::TooLarge`], [`WireError::Truncated`]), magic, version,
//! cluster id, declared length ([`WireError::Truncated`], or
//! [`WireError::Malformed`] for trailing bytes), HMAC (constant-time, by the
//! `hmac` crate), sender is a configured peer, replay, payload decoding, and
//! that the payload's own host (and, for a heartbeat, boot) equals the
//! header's. Only then is the replay state updated. Every rejection is
//! counted in [`DropCounters`]; a rejected packet is never acted upon.
//!
//! # Replay protection and its trade-off
//!
//! Per configured peer the receiver keeps only `(nonce, last accepted seq)`.
//! A packet with the current nonce must have a higher sequence number than
//! the last one accepted: a replay, a duplicate (the same packet over a
//! second redundant ring) and a reordered older packet are all dropped as
//! [`WireError::Replayed`]. A packet with any *other* nonce is accepted and
//! becomes the current nonce, because a daemon restart picks a new random
//! nonce and starts counting again.
//!
//! The price: a receiver cannot tell a restart from a replay of packets
//! recorded during an *earlier* start of the same peer. Someone on the
//! heartbeat network who recorded those can replay them (each replayed
//! packet switches the nonce back; the peer's next real packet switches it
//! forward again, so replays cannot silence the real stream). What this
//! buys the attacker is stale but authentic messages: a heartbeat's
//! `released` entries are permanent facts (true even when stale), an
//! `Assign` is only a hint checked against the lease, and takeovers rest on
//! storage and fencing (S3), never on the network alone. The harm is to
//! liveness: a dead peer may look alive on the network, which delays the
//! fence path until S3(b) applies.
//!
//! Remembering retired nonces was rejected: after a receiver restart one
//! replayed old packet would retire the peer's *live* nonce, and every real
//! heartbeat of that peer would be dropped until it restarted — a silent,
//! lasting partition. Random 64-bit nonces collide with probability 2^-64.

use crate::engine::config::HostId;
use crate::engine::io::{BootId, NetMessage};
use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

/// First bytes of every packet: "HAVirt Heartbeat".
pub const MAGIC: [u8; 4] = *b"HAVH";
/// The only wire version this build speaks.
pub const VERSION: u8 = 1;
/// Largest packet sent or accepted: one Ethernet frame (1500 bytes MTU)
/// minus IPv6 (40) and UDP (8) headers, rounded down, so never fragmented.
pub const MAX_PACKET_BYTES: usize = 1400;
/// Bytes before the payload: magic, version, cluster id, sender host id,
/// boot id, nonce, sequence number, payload length.
pub const HEADER_BYTES: usize = 4 + 1 + 16 + 2 + 8 + 8 + 8 + 2;
/// HMAC-SHA256 tag length.
pub const MAC_BYTES: usize = 32;
/// Largest payload that fits in [`MAX_PACKET_BYTES`].
pub const MAX_PAYLOAD_BYTES: usize = MAX_PACKET_BYTES - HEADER_BYTES - MAC_BYTES;
/// Released leases of the largest possible ids that always fit in one
/// heartbeat (checked by `worst_case_heartbeat_fits`). The engine must not
/// list more per heartbeat, or `encode` refuses it with `TooLarge`.
pub const MAX_RELEASED_PER_PACKET: usize = 10;
// The engine lists at most this many per heartbeat (it cannot import the
// wire: the engine is pure): tied here, at compile time.
const _: () = assert!(crate::engine::node::MAX_RELEASED_PER_HEARTBEAT <= MAX_RELEASED_PER_PACKET);

/// Errors of encoding or accepting a packet; each names why it was dropped.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// Shorter than its fixed header and MAC, or than its declared payload.
    #[error("packet of {len} bytes is shorter than the {need} bytes it requires")]
    Truncated { len: usize, need: usize },
    #[error("not a havirt heartbeat packet (magic is not \"HAVH\")")]
    BadMagic,
    #[error(
        "wire version {0} is not supported (this build speaks version {VERSION}); run one havirt release on all hosts"
    )]
    UnsupportedVersion(u8),
    #[error("packet from another cluster id; hosts of one cluster must share cluster_id")]
    ForeignCluster,
    #[error("HMAC check failed: the sender uses another cluster key, or the packet was altered")]
    BadMac,
    #[error("replayed, duplicate or reordered packet from {host}: seq {seq} <= last accepted {last}")]
    Replayed { host: HostId, seq: u64, last: u64 },
    #[error("sender {0} is not a configured peer; add it to the cluster configuration of every host")]
    UnknownSender(HostId),
    #[error("payload {field} {payload} differs from the header's {header}; the sender built a wrong packet")]
    Mismatch { field: &'static str, header: u64, payload: u64 },
    #[error("malformed packet: {reason}")]
    Malformed { reason: String },
    #[error("packet of {len} bytes exceeds the {MAX_PACKET_BYTES}-byte limit; send fewer entries per message")]
    TooLarge { len: usize },
}

/// Packets dropped by [`Receiver::accept`], one counter per [`WireError`]
/// variant.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DropCounters {
    pub truncated: u64,
    pub bad_magic: u64,
    pub unsupported_version: u64,
    pub foreign_cluster: u64,
    pub bad_mac: u64,
    pub replayed: u64,
    pub unknown_sender: u64,
    pub mismatch: u64,
    pub malformed: u64,
    pub too_large: u64,
}

impl DropCounters {
    /// Counts one packet dropped for `error`.
    pub fn bump(&mut self, error: &WireError) {
        let counter = match error {
            WireError::Truncated { .. } => &mut self.truncated,
            WireError::BadMagic => &mut self.bad_magic,
            WireError::UnsupportedVersion(_) => &mut self.unsupported_version,
            WireError::ForeignCluster => &mut self.foreign_cluster,
            WireError::BadMac => &mut self.bad_mac,
            WireError::Replayed { .. } => &mut self.replayed,
            WireError::UnknownSender(_) => &mut self.unknown_sender,
            WireError::Mismatch { .. } => &mut self.mismatch,
            WireError::Malformed { .. } => &mut self.malformed,
            WireError::TooLarge { .. } => &mut self.too_large,
        };
        *counter = counter.saturating_add(1);
    }

    /// All drops, whatever the reason.
    pub fn total(&self) -> u64 {
        [
            self.truncated,
            self.bad_magic,
            self.unsupported_version,
            self.foreign_cluster,
            self.bad_mac,
            self.replayed,
            self.unknown_sender,
            self.mismatch,
            self.malformed,
            self.too_large,
        ]
        .iter()
        .fold(0u64, |sum, n| sum.saturating_add(*n))
    }
}

/// The cluster's identity, shared by all its hosts (and its storage records).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct ClusterId(pub [u8; 16]);

/// The cluster key, ready to sign. Its `Debug` never shows the key.
#[derive(Clone)]
pub struct ClusterKey {
    mac: Hmac<Sha256>,
}

impl ClusterKey {
    /// Keys HMAC-SHA256 with `key`. Refusing short or world-readable key
    /// files is the key loader's job (DESIGN.md §8).
    pub fn new(key: &[u8]) -> Self {
        let mac = <Hmac<Sha256> as KeyInit>::new_from_slice(key).expect("HMAC accepts keys of any length");
        ClusterKey { mac }
    }

    fn tag(&self, signed: &[u8]) -> [u8; MAC_BYTES] {
        let mut mac = self.mac.clone();
        mac.update(signed);
        mac.finalize().into_bytes().into()
    }

    fn verify(&self, signed: &[u8], tag: &[u8]) -> Result<(), WireError> {
        let mut mac = self.mac.clone();
        mac.update(signed);
        mac.verify_slice(tag).map_err(|_| WireError::BadMac)
    }
}

impl fmt::Debug for ClusterKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ClusterKey(<redacted>)")
    }
}

/// The header fields of one packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    pub cluster: ClusterId,
    pub sender: HostId,
    pub boot: BootId,
    /// Random, chosen at daemon start.
    pub nonce: u64,
    /// Strictly increasing for one nonce.
    pub seq: u64,
}

/// Signs `msg` into one packet. Refuses a message whose own host (or boot)
/// is not the header's, and one that would exceed [`MAX_PACKET_BYTES`].
pub fn encode(key: &ClusterKey, header: &Header, msg: &NetMessage) -> Result<Vec<u8>, WireError> {
    check_matches(header, msg)?;
    let payload = serde_json::to_vec(msg).map_err(|e| WireError::Malformed { reason: e.to_string() })?;
    seal(key, header, &payload)
}

/// Frames and signs an already-encoded payload.
fn seal(key: &ClusterKey, header: &Header, payload: &[u8]) -> Result<Vec<u8>, WireError> {
    let len = HEADER_BYTES + payload.len() + MAC_BYTES;
    if len > MAX_PACKET_BYTES {
        return Err(WireError::TooLarge { len });
    }
    let payload_len = u16::try_from(payload.len()).map_err(|_| WireError::TooLarge { len })?;
    let mut out = Vec::with_capacity(len);
    out.extend_from_slice(&MAGIC);
    out.push(VERSION);
    out.extend_from_slice(&header.cluster.0);
    out.extend_from_slice(&header.sender.0.to_be_bytes());
    out.extend_from_slice(&header.boot.to_be_bytes());
    out.extend_from_slice(&header.nonce.to_be_bytes());
    out.extend_from_slice(&header.seq.to_be_bytes());
    out.extend_from_slice(&payload_len.to_be_bytes());
    out.extend_from_slice(payload);
    let tag = key.tag(&out);
    out.extend_from_slice(&tag);
    debug_assert_eq!(out.len(), len);
    Ok(out)
}

/// The payload must speak for the host (and boot) the header names.
fn check_matches(header: &Header, msg: &NetMessage) -> Result<(), WireError> {
    let host = match msg {
        NetMessage::Heartbeat(hb) => {
            if hb.boot != header.boot {
                return Err(WireError::Mismatch { field: "boot", header: header.boot, payload: hb.boot });
            }
            hb.host
        }
        NetMessage::Assign { from, .. } => *from,
    };
    if host != header.sender {
        let (header, payload) = (u64::from(header.sender.0), u64::from(host.0));
        return Err(WireError::Mismatch { field: "host", header, payload });
    }
    Ok(())
}

/// Signs a daemon's outgoing messages: one nonce per daemon start, and the
/// next sequence number.
#[derive(Debug)]
pub struct Sealer {
    key: ClusterKey,
    header: Header,
}

impl Sealer {
    /// `nonce` must be drawn at random at every daemon start.
    pub fn new(key: ClusterKey, cluster: ClusterId, sender: HostId, boot: BootId, nonce: u64) -> Self {
        Sealer { key, header: Header { cluster, sender, boot, nonce, seq: 1 } }
    }

    /// One packet with the next sequence number (consumed only on success).
    pub fn seal(&mut self, msg: &NetMessage) -> Result<Vec<u8>, WireError> {
        let packet = encode(&self.key, &self.header, msg)?;
        self.header.seq = self.header.seq.checked_add(1).expect("a u64 sequence number never wraps");
        Ok(packet)
    }

    /// The sequence number the next packet will carry.
    pub fn next_seq(&self) -> u64 {
        self.header.seq
    }
}

/// A packet split into its parts; nothing checked past the framing.
struct Framed<'a> {
    header: Header,
    payload: &'a [u8],
    signed: &'a [u8],
    tag: &'a [u8],
}

fn read<const N: usize>(bytes: &[u8], at: usize) -> Result<[u8; N], WireError> {
    let need = at + N;
    let slice = bytes.get(at..need).ok_or(WireError::Truncated { len: bytes.len(), need })?;
    slice.try_into().map_err(|_| WireError::Truncated { len: bytes.len(), need })
}

fn frame(bytes: &[u8]) -> Result<Framed<'_>, WireError> {
    let len = bytes.len();
    if len > MAX_PACKET_BYTES {
        return Err(WireError::TooLarge { len });
    }
    if read::<4>(bytes, 0)? != MAGIC {
        return Err(WireError::BadMagic);
    }
    let [version] = read::<1>(bytes, 4)?;
    if version != VERSION {
        return Err(WireError::UnsupportedVersion(version));
    }
    if len < HEADER_BYTES + MAC_BYTES {
        return Err(WireError::Truncated { len, need: HEADER_BYTES + MAC_BYTES });
    }
    let header = Header {
        cluster: ClusterId(read::<16>(bytes, 5)?),
        sender: HostId(u16::from_be_bytes(read(bytes, 21)?)),
        boot: u64::from_be_bytes(read(bytes, 23)?),
        nonce: u64::from_be_bytes(read(bytes, 31)?),
        seq: u64::from_be_bytes(read(bytes, 39)?),
    };
    let payload_len = usize::from(u16::from_be_bytes(read(bytes, 47)?));
    let mac_at = HEADER_BYTES + payload_len;
    let need = mac_at + MAC_BYTES;
    if len < need {
        return Err(WireError::Truncated { len, need });
    }
    if len > need {
        return Err(WireError::Malformed { reason: format!("{} bytes after the MAC", len - need) });
    }
    Ok(Framed { header, payload: &bytes[HEADER_BYTES..mac_at], signed: &bytes[..mac_at], tag: &bytes[mac_at..] })
}

/// Checks incoming packets against the cluster key, cluster id, configured
/// peers and per-peer replay state; counts what it drops.
#[derive(Debug)]
pub struct Receiver {
    key: ClusterKey,
    cluster: ClusterId,
    peers: BTreeSet<HostId>,
    /// Per peer: the current nonce and the last sequence number accepted
    /// with it. Only configured peers get an entry, so it stays bounded.
    replay: BTreeMap<HostId, (u64, u64)>,
    drops: DropCounters,
    accepted: u64,
}

impl Receiver {
    /// `peers`: the other hosts of the cluster (not this one).
    pub fn new(key: ClusterKey, cluster: ClusterId, peers: impl IntoIterator<Item = HostId>) -> Self {
        let peers = peers.into_iter().collect();
        Receiver { key, cluster, peers, replay: BTreeMap::new(), drops: DropCounters::default(), accepted: 0 }
    }

    /// Checks one datagram; the message on success, else why it was dropped
    /// (and counted).
    pub fn accept(&mut self, bytes: &[u8]) -> Result<(HostId, NetMessage), WireError> {
        let result = self.check(bytes);
        match &result {
            Ok(_) => self.accepted = self.accepted.saturating_add(1),
            Err(e) => self.drops.bump(e),
        }
        result
    }

    fn check(&mut self, bytes: &[u8]) -> Result<(HostId, NetMessage), WireError> {
        let framed = frame(bytes)?;
        let header = framed.header;
        if header.cluster != self.cluster {
            return Err(WireError::ForeignCluster);
        }
        self.key.verify(framed.signed, framed.tag)?;
        if !self.peers.contains(&header.sender) {
            return Err(WireError::UnknownSender(header.sender));
        }
        if let Some(&(nonce, last)) = self.replay.get(&header.sender)
            && nonce == header.nonce
            && header.seq <= last
        {
            return Err(WireError::Replayed { host: header.sender, seq: header.seq, last });
        }
        let msg: NetMessage =
            serde_json::from_slice(framed.payload).map_err(|e| WireError::Malformed { reason: e.to_string() })?;
        check_matches(&header, &msg)?;
        self.replay.insert(header.sender, (header.nonce, header.seq));
        Ok((header.sender, msg))
    }

    pub fn drops(&self) -> &DropCounters {
        &self.drops
    }

    /// Packets accepted so far.
    pub fn accepted(&self) -> u64 {
        self.accepted
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::config::DomainId;
    use crate::engine::io::{Heartbeat, LeaseKey, Release};
    use crate::engine::time::Rng;

    const CLUSTER: ClusterId = ClusterId([7; 16]);
    const A: HostId = HostId(1);
    const B: HostId = HostId(2);

    fn key() -> ClusterKey {
        ClusterKey::new(b"0123456789abcdef0123456789abcdef")
    }

    fn heartbeat(host: HostId, boot: BootId, seq: u64) -> NetMessage {
        NetMessage::Heartbeat(Heartbeat {
            host,
            boot,
            incarnation: 5,
            seq,
            storage_lost: false,
            hears_all_lost: false,
            self_fenced: false,
            released: vec![],
        })
    }

    fn header(sender: HostId, nonce: u64, seq: u64) -> Header {
        Header { cluster: CLUSTER, sender, boot: 42, nonce, seq }
    }

    fn packet(sender: HostId, nonce: u64, seq: u64) -> Vec<u8> {
        encode(&key(), &header(sender, nonce, seq), &heartbeat(sender, 42, seq)).expect("encodes")
    }

    fn receiver() -> Receiver {
        Receiver::new(key(), CLUSTER, [A])
    }

    #[test]
    fn round_trip() {
        let mut rx = receiver();
        let msg = heartbeat(A, 42, 3);
        let bytes = encode(&key(), &header(A, 9, 3), &msg).expect("encodes");
        assert_eq!(&bytes[..4], b"HAVH");
        assert_eq!(bytes[4], VERSION);
        assert_eq!(rx.accept(&bytes), Ok((A, msg)));
        assert_eq!(rx.accepted(), 1);
        assert_eq!(rx.drops().total(), 0);
    }

    #[test]
    fn layout_offsets_match_the_documented_table() {
        let bytes = packet(A, 0x1122_3344_5566_7788, 0x99);
        assert_eq!(&bytes[5..21], &CLUSTER.0);
        assert_eq!(&bytes[21..23], &1u16.to_be_bytes());
        assert_eq!(&bytes[23..31], &42u64.to_be_bytes());
        assert_eq!(&bytes[31..39], &0x1122_3344_5566_7788u64.to_be_bytes());
        assert_eq!(&bytes[39..47], &0x99u64.to_be_bytes());
        let n = usize::from(u16::from_be_bytes([bytes[47], bytes[48]]));
        assert_eq!(bytes.len(), HEADER_BYTES + n + MAC_BYTES);
        assert_eq!(&bytes[HEADER_BYTES..HEADER_BYTES + n], serde_json::to_vec(&heartbeat(A, 42, 0x99)).unwrap());
    }

    #[test]
    fn replay_and_reorder_are_dropped() {
        let mut rx = receiver();
        let (p1, p2) = (packet(A, 9, 1), packet(A, 9, 2));
        assert!(rx.accept(&p2).is_ok());
        assert_eq!(rx.accept(&p2), Err(WireError::Replayed { host: A, seq: 2, last: 2 }));
        assert_eq!(rx.accept(&p1), Err(WireError::Replayed { host: A, seq: 1, last: 2 }));
        assert_eq!(rx.drops().replayed, 2);
    }

    #[test]
    fn new_nonce_restarts_the_sequence() {
        let mut rx = receiver();
        assert!(rx.accept(&packet(A, 9, 100)).is_ok());
        assert!(rx.accept(&packet(A, 10, 1)).is_ok());
        assert!(matches!(rx.accept(&packet(A, 10, 1)), Err(WireError::Replayed { .. })));
    }

    #[test]
    fn rejected_packet_does_not_advance_replay_state() {
        let mut rx = receiver();
        let mut bad = packet(A, 9, 5);
        let last = bad.len() - 1;
        bad[last] ^= 1;
        assert_eq!(rx.accept(&bad), Err(WireError::BadMac));
        assert!(rx.accept(&packet(A, 9, 1)).is_ok());
    }

    #[test]
    fn each_check_has_its_variant() {
        let mut rx = receiver();
        let good = packet(A, 9, 1);
        assert!(matches!(rx.accept(&good[..10]), Err(WireError::Truncated { .. })));
        assert!(matches!(rx.accept(&good[..good.len() - 1]), Err(WireError::Truncated { .. })));
        assert_eq!(rx.accept(b"GET / HTTP/1.1"), Err(WireError::BadMagic));
        let mut v2 = good.clone();
        v2[4] = 2;
        assert_eq!(rx.accept(&v2), Err(WireError::UnsupportedVersion(2)));
        let foreign = Header { cluster: ClusterId([8; 16]), ..header(A, 9, 1) };
        let foreign = encode(&key(), &foreign, &heartbeat(A, 42, 1)).expect("encodes");
        assert_eq!(rx.accept(&foreign), Err(WireError::ForeignCluster));
        let wrong_key = encode(&ClusterKey::new(b"another key"), &header(A, 9, 1), &heartbeat(A, 42, 1));
        assert_eq!(rx.accept(&wrong_key.expect("encodes")), Err(WireError::BadMac));
        assert_eq!(rx.accept(&packet(B, 9, 1)), Err(WireError::UnknownSender(B)));
        let mut long = good.clone();
        long.push(0);
        assert!(matches!(rx.accept(&long), Err(WireError::Malformed { .. })));
        assert!(matches!(rx.accept(&vec![0u8; MAX_PACKET_BYTES + 1]), Err(WireError::TooLarge { .. })));
        let expected = DropCounters {
            truncated: 2,
            bad_magic: 1,
            unsupported_version: 1,
            foreign_cluster: 1,
            bad_mac: 1,
            unknown_sender: 1,
            malformed: 1,
            too_large: 1,
            ..DropCounters::default()
        };
        assert_eq!(*rx.drops(), expected);
        assert_eq!(rx.accepted(), 0);
        assert!(rx.accept(&good).is_ok(), "no drop above consumed the sequence number");
    }

    #[test]
    fn signed_garbage_payload_is_malformed() {
        let mut rx = receiver();
        let bytes = seal(&key(), &header(A, 9, 1), b"{\"Heartbeat\":").expect("seals");
        assert!(matches!(rx.accept(&bytes), Err(WireError::Malformed { .. })));
        assert_eq!(rx.drops().malformed, 1);
    }

    #[test]
    fn payload_must_name_the_header_sender() {
        let mut rx = Receiver::new(key(), CLUSTER, [A, B]);
        // A packet from A whose heartbeat speaks for B: only a sender bug
        // or a key holder can build one; `encode` refuses it.
        let payload = serde_json::to_vec(&heartbeat(B, 42, 1)).unwrap();
        let bytes = seal(&key(), &header(A, 9, 1), &payload).expect("seals");
        assert_eq!(rx.accept(&bytes), Err(WireError::Mismatch { field: "host", header: 1, payload: 2 }));
        let payload = serde_json::to_vec(&heartbeat(A, 41, 1)).unwrap();
        let bytes = seal(&key(), &header(A, 9, 1), &payload).expect("seals");
        assert_eq!(rx.accept(&bytes), Err(WireError::Mismatch { field: "boot", header: 42, payload: 41 }));
        let assign = NetMessage::Assign { from: B, domains: vec![] };
        let bytes = seal(&key(), &header(A, 9, 1), &serde_json::to_vec(&assign).unwrap()).expect("seals");
        assert!(matches!(rx.accept(&bytes), Err(WireError::Mismatch { field: "host", .. })));
        assert_eq!(rx.drops().mismatch, 3);
        assert!(matches!(encode(&key(), &header(A, 9, 1), &assign), Err(WireError::Mismatch { .. })));
        let assign = NetMessage::Assign { from: A, domains: vec![(DomainId(u128::MAX), 3)] };
        let bytes = encode(&key(), &header(A, 9, 2), &assign).expect("encodes");
        assert_eq!(rx.accept(&bytes), Ok((A, assign)));
    }

    #[test]
    fn every_single_bit_flip_is_dropped() {
        let good = packet(A, 9, 1);
        for i in 0..good.len() {
            for bit in 0..8 {
                let mut rx = receiver();
                let mut bad = good.clone();
                bad[i] ^= 1 << bit;
                assert!(rx.accept(&bad).is_err(), "flip of bit {bit} in byte {i} was accepted");
            }
        }
    }

    #[test]
    fn sealer_counts_up_from_one() {
        let mut sealer = Sealer::new(key(), CLUSTER, A, 42, 9);
        let mut rx = receiver();
        for seq in 1..=3 {
            assert_eq!(sealer.next_seq(), seq);
            let bytes = sealer.seal(&heartbeat(A, 42, seq)).expect("seals");
            assert!(rx.accept(&bytes).is_ok());
        }
        assert!(matches!(sealer.seal(&heartbeat(B, 42, 4)), Err(WireError::Mismatch { .. })));
        assert_eq!(sealer.next_seq(), 4, "a failed seal consumes no sequence number");
        assert!(format!("{sealer:?}").contains("redacted"));
    }

    fn worst_case_heartbeat(released: usize) -> NetMessage {
        let release = Release { key: LeaseKey::Domain(DomainId(u128::MAX)), generation: u64::MAX, failed_start: true };
        NetMessage::Heartbeat(Heartbeat {
            host: HostId(u16::MAX),
            boot: u64::MAX,
            incarnation: u64::MAX,
            seq: u64::MAX,
            storage_lost: false,
            hears_all_lost: false,
            self_fenced: false,
            released: vec![release; released],
        })
    }

    #[test]
    fn worst_case_heartbeat_fits() {
        let h = Header { cluster: CLUSTER, sender: HostId(u16::MAX), boot: u64::MAX, nonce: u64::MAX, seq: u64::MAX };
        let fits = encode(&key(), &h, &worst_case_heartbeat(MAX_RELEASED_PER_PACKET)).expect("fits");
        assert!(fits.len() <= MAX_PACKET_BYTES);
        let over = encode(&key(), &h, &worst_case_heartbeat(MAX_RELEASED_PER_PACKET + 1));
        assert!(matches!(over, Err(WireError::TooLarge { len }) if len > MAX_PACKET_BYTES));
    }

    #[test]
    fn random_bytes_never_panic_and_are_never_accepted() {
        const ROUNDS: u64 = 10_000;
        let mut rng = Rng::new(0x6E65_7477);
        let mut rx = receiver();
        let good = packet(A, 9, 1);
        for round in 0..ROUNDS {
            let len = rng.index(MAX_PACKET_BYTES + 64);
            let mut bytes: Vec<u8> = (0..len).map(|_| rng.next_u64().to_le_bytes()[0]).collect();
            // Every other round keeps a valid prefix, to get past the
            // early checks and reach the MAC and the length fields.
            if round % 2 == 1 {
                let keep = rng.index(good.len()).min(bytes.len());
                bytes[..keep].copy_from_slice(&good[..keep]);
            }
            assert!(rx.accept(&bytes).is_err(), "round {round}: random bytes accepted");
        }
        assert_eq!(rx.drops().total(), ROUNDS);
    }
}
