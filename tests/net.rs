//! Network heartbeats over real UDP on 127.0.0.1 (ephemeral ports): what is
//! authentic is delivered, everything else is dropped, counted under its
//! reason and never delivered.

use havirt::engine::config::{DomainId, HostId};
use havirt::engine::io::{Heartbeat, NetMessage};
use havirt::net::udp::{Bound, Delivery, INBOX_CAPACITY_MSGS, Identity, NetCounters, Transport, UdpError};
use havirt::net::wire::{ClusterId, ClusterKey, DropCounters, Header, MAX_PACKET_BYTES, WireError, encode};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;
use tokio::net::UdpSocket;
use tokio::sync::mpsc;

const CLUSTER: ClusterId = ClusterId(*b"havirt-test-clus");
const KEY: &[u8] = b"a cluster key of thirty-two byte";
const A: HostId = HostId(1);
const B: HostId = HostId(2);
const BOOT_A: u64 = 0xA;
const BOOT_B: u64 = 0xB;
/// Longest wait for a packet on loopback before a test fails.
const WAIT_MS: u64 = 5_000;

fn heartbeat(host: HostId, boot: u64, seq: u64) -> NetMessage {
    NetMessage::Heartbeat(Heartbeat {
        host,
        boot,
        incarnation: 1,
        seq,
        storage_lost: false,
        hears_all_lost: false,
        self_fenced: false,
        released: vec![],
    })
}

fn identity(host: HostId, boot: u64, nonce: u64) -> Identity {
    Identity { key: ClusterKey::new(KEY), cluster: CLUSTER, host, boot, nonce }
}

struct Pair {
    a: Transport,
    a_inbox: mpsc::Receiver<Delivery>,
    b: Transport,
    b_inbox: mpsc::Receiver<Delivery>,
    b_addr: SocketAddr,
}

/// Hosts A and B, one ring each, each the other's only peer.
async fn pair() -> Pair {
    let loopback: SocketAddr = "127.0.0.1:0".parse().expect("valid address");
    let a = Bound::bind(&[loopback]).await.expect("bind A");
    let b = Bound::bind(&[loopback]).await.expect("bind B");
    let (a_addr, b_addr) = (a.local_addrs()[0], b.local_addrs()[0]);
    let (a, a_inbox) = a.start(identity(A, BOOT_A, 100), BTreeMap::from([(B, vec![b_addr])])).expect("start A");
    let (b, b_inbox) = b.start(identity(B, BOOT_B, 200), BTreeMap::from([(A, vec![a_addr])])).expect("start B");
    Pair { a, a_inbox, b, b_inbox, b_addr }
}

async fn next(inbox: &mut mpsc::Receiver<Delivery>) -> Delivery {
    tokio::time::timeout(Duration::from_millis(WAIT_MS), inbox.recv())
        .await
        .expect("a message within WAIT_MS")
        .expect("inbox open")
}

/// Waits until the receive task has counted `expected` (it runs concurrently).
async fn wait_counters(t: &Transport, expected: impl Fn(&NetCounters) -> bool) -> NetCounters {
    let deadline = tokio::time::Instant::now() + Duration::from_millis(WAIT_MS);
    loop {
        let counters = t.counters();
        if expected(&counters) || tokio::time::Instant::now() >= deadline {
            return counters;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// A packet claiming to be from A, signed with `key` for `cluster`.
fn forged(key: &[u8], cluster: ClusterId, sender: HostId, nonce: u64, seq: u64) -> Vec<u8> {
    let header = Header { cluster, sender, boot: BOOT_A, nonce, seq };
    encode(&ClusterKey::new(key), &header, &heartbeat(sender, BOOT_A, seq)).expect("encodes")
}

async fn attacker() -> UdpSocket {
    UdpSocket::bind("127.0.0.1:0").await.expect("bind attacker")
}

#[tokio::test]
async fn heartbeats_flow_both_ways() {
    let mut p = pair().await;
    for seq in 1..=3 {
        assert_eq!(p.a.send(&heartbeat(A, BOOT_A, seq)).await.expect("A sends"), 1);
        assert_eq!(next(&mut p.b_inbox).await, (A, heartbeat(A, BOOT_A, seq)));
        assert_eq!(p.b.send_to(A, &heartbeat(B, BOOT_B, seq)).await.expect("B sends"), 1);
        assert_eq!(next(&mut p.a_inbox).await, (B, heartbeat(B, BOOT_B, seq)));
    }
    assert_eq!(p.a.counters().sent, 3);
    assert_eq!(p.b.counters().accepted, 3);
    assert_eq!(p.a.counters().drops, DropCounters::default());
    assert_eq!(p.b.counters().drops, DropCounters::default());
}

#[tokio::test]
async fn hostile_packets_are_dropped_counted_and_never_delivered() {
    let mut p = pair().await;
    let evil = attacker().await;
    let good = forged(KEY, CLUSTER, A, 7, 1);
    let mut flipped = forged(KEY, CLUSTER, A, 7, 2);
    flipped[60] ^= 0x20; // inside the payload: only the MAC notices
    let hostile: Vec<Vec<u8>> = vec![
        forged(b"not the cluster key", CLUSTER, A, 7, 3),
        good[..good.len() - 5].to_vec(),
        flipped,
        good.clone(), // accepted once (seq 1) ...
        good.clone(), // ... and the same bytes again are a replay
        forged(KEY, ClusterId(*b"another-cluster!"), A, 7, 4),
        b"\x00garbage, not a heartbeat at all, not even close; 0123456789".to_vec(),
        forged(KEY, CLUSTER, HostId(9), 7, 5),
    ];
    for packet in &hostile {
        evil.send_to(packet, p.b_addr).await.expect("attacker sends");
    }
    assert_eq!(next(&mut p.b_inbox).await, (A, heartbeat(A, BOOT_A, 1)), "the one authentic packet");
    let expected = DropCounters {
        bad_mac: 2,
        truncated: 1,
        replayed: 1,
        foreign_cluster: 1,
        bad_magic: 1,
        unknown_sender: 1,
        ..DropCounters::default()
    };
    let counters = wait_counters(&p.b, |c| c.drops.total() == expected.total()).await;
    assert_eq!(counters.drops, expected);
    assert_eq!(counters.accepted, 1);
    // A real heartbeat still gets through, and nothing hostile came before it.
    p.a.send(&heartbeat(A, BOOT_A, 10)).await.expect("A sends");
    assert_eq!(next(&mut p.b_inbox).await, (A, heartbeat(A, BOOT_A, 10)));
    assert!(p.b_inbox.try_recv().is_err(), "nothing else delivered");
}

#[tokio::test]
async fn a_new_nonce_restarts_the_sequence() {
    let mut p = pair().await;
    let evil = attacker().await;
    // A's daemon restarts: new nonce, sequence back to 1.
    for packet in [forged(KEY, CLUSTER, A, 7, 100), forged(KEY, CLUSTER, A, 8, 1), forged(KEY, CLUSTER, A, 8, 1)] {
        evil.send_to(&packet, p.b_addr).await.expect("sends");
    }
    assert_eq!(next(&mut p.b_inbox).await, (A, heartbeat(A, BOOT_A, 100)));
    assert_eq!(next(&mut p.b_inbox).await, (A, heartbeat(A, BOOT_A, 1)));
    let counters = wait_counters(&p.b, |c| c.drops.replayed == 1).await;
    assert_eq!(counters.drops, DropCounters { replayed: 1, ..DropCounters::default() });
    assert!(p.b_inbox.try_recv().is_err());
}

#[tokio::test]
async fn a_host_not_configured_is_rejected() {
    let mut p = pair().await;
    let evil = attacker().await;
    // Right key, right cluster, but host 3 is not one of B's peers.
    evil.send_to(&forged(KEY, CLUSTER, HostId(3), 1, 1), p.b_addr).await.expect("sends");
    let counters = wait_counters(&p.b, |c| c.drops.total() == 1).await;
    assert_eq!(counters.drops, DropCounters { unknown_sender: 1, ..DropCounters::default() });
    assert!(p.b_inbox.try_recv().is_err());
    assert!(p.a.send_to(HostId(3), &heartbeat(A, BOOT_A, 1)).await.is_err(), "no address for host 3");
}

#[tokio::test]
async fn a_full_inbox_drops_and_counts() {
    const SENT: u64 = 300;
    /// Packets sent before the receive task gets a turn (keeps the kernel's
    /// socket buffer far from full, so only the inbox drops).
    const BURST: u64 = 16;
    let mut p = pair().await;
    for seq in 1..=SENT {
        p.a.send(&heartbeat(A, BOOT_A, seq)).await.expect("A sends");
        if seq % BURST == 0 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
    let counters = wait_counters(&p.b, |c| c.accepted == SENT).await;
    assert_eq!(counters.accepted, SENT);
    let capacity = u64::try_from(INBOX_CAPACITY_MSGS).expect("small");
    assert_eq!(counters.inbox_full, SENT - capacity);
    for seq in 1..=capacity {
        assert_eq!(next(&mut p.b_inbox).await, (A, heartbeat(A, BOOT_A, seq)), "oldest kept, newest dropped");
    }
    assert!(p.b_inbox.try_recv().is_err());
}

#[tokio::test]
async fn redundant_rings_deliver_once() {
    let loopback: SocketAddr = "127.0.0.1:0".parse().expect("valid address");
    let a = Bound::bind(&[loopback, loopback]).await.expect("bind A");
    let b = Bound::bind(&[loopback, loopback]).await.expect("bind B");
    let (a_addrs, b_addrs) = (a.local_addrs().to_vec(), b.local_addrs().to_vec());
    let (a, _a_inbox) = a.start(identity(A, BOOT_A, 1), BTreeMap::from([(B, b_addrs)])).expect("start A");
    let (b, mut b_inbox) = b.start(identity(B, BOOT_B, 2), BTreeMap::from([(A, a_addrs)])).expect("start B");
    assert_eq!(a.send(&heartbeat(A, BOOT_A, 1)).await.expect("A sends"), 2, "one datagram per ring");
    assert_eq!(next(&mut b_inbox).await, (A, heartbeat(A, BOOT_A, 1)));
    let counters = wait_counters(&b, |c| c.drops.replayed == 1).await;
    assert_eq!(counters.drops, DropCounters { replayed: 1, ..DropCounters::default() }, "the second ring's copy");
    assert!(b_inbox.try_recv().is_err());
}

#[tokio::test]
async fn oversize_messages_are_refused_on_send() {
    let p = pair().await;
    let assign = NetMessage::Assign { from: A, domains: (0..200).map(|i| (DomainId(i), 1)).collect() };
    let refused = p.a.send(&assign).await;
    assert!(
        matches!(refused, Err(UdpError::Wire(WireError::TooLarge { len })) if len > MAX_PACKET_BYTES),
        "{refused:?}"
    );
    assert_eq!(p.a.counters().sent, 0);
}
