//! A thin tokio UDP transport for heartbeat packets (see `wire` for the
//! format and the checks).
//!
//! Rings: local address `i` is ring `i`, and a peer's address `i` is its
//! address on ring `i` (corosync/knet style redundant links). A message is
//! sealed once and the same bytes go out on every ring, so the receiver's
//! replay check drops the redundant copies: with `r` rings up, expect
//! `r - 1` `replayed` drops per message received. One receive task per
//! socket feeds a shared [`Receiver`] and forwards what it accepts to a
//! bounded inbox; a full inbox drops the message and counts it.

use super::wire::{ClusterId, ClusterKey, DropCounters, MAX_PACKET_BYTES, Receiver, Sealer, WireError};
use crate::engine::config::HostId;
use crate::engine::io::{BootId, NetMessage};
use std::collections::BTreeMap;
use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;
use tokio::net::UdpSocket;
use tokio::sync::mpsc::{self, error::TrySendError};
use tokio::task::JoinHandle;

/// Accepted messages waiting for the daemon. At a 0.2 s heartbeat interval
/// this holds several seconds of traffic from a few dozen peers; beyond
/// that the daemon is stuck and newer heartbeats are worth no more.
pub const INBOX_CAPACITY_MSGS: usize = 256;
/// Pause after a failed `recv_from`, so a persistent socket error cannot
/// spin a core.
pub const RECV_ERROR_BACKOFF_MS: u64 = 10;
/// One byte more than the largest valid packet, so an oversize datagram is
/// seen as oversize instead of silently cut to a valid length.
const RECV_BUFFER_BYTES: usize = MAX_PACKET_BYTES + 1;

/// One message delivered: the authenticated sender and what it said.
pub type Delivery = (HostId, NetMessage);

#[derive(Debug, thiserror::Error)]
pub enum UdpError {
    #[error("no local address to bind: configure at least one heartbeat ring")]
    NoRings,
    #[error("cannot bind a UDP socket on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("peer {host} has {addrs} addresses but this host has {rings} rings; give every host the same rings")]
    TooManyAddrs { host: HostId, addrs: usize, rings: usize },
    #[error("this host ({0}) is listed among its own peers; list only the other hosts")]
    SelfInPeers(HostId),
    #[error("{0} is not a configured peer")]
    UnknownPeer(HostId),
    #[error(transparent)]
    Wire(#[from] WireError),
}

/// Who this daemon is on the wire.
#[derive(Debug)]
pub struct Identity {
    pub key: ClusterKey,
    pub cluster: ClusterId,
    pub host: HostId,
    pub boot: BootId,
    /// Random, drawn at every daemon start (replay protection, see `wire`).
    pub nonce: u64,
}

/// What the transport has seen, for `havirt status` and the logs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NetCounters {
    /// Packets the receiver rejected, by reason.
    pub drops: DropCounters,
    /// Packets the receiver accepted (including those then lost to a full inbox).
    pub accepted: u64,
    /// Accepted messages dropped because the inbox was full.
    pub inbox_full: u64,
    pub recv_errors: u64,
    /// Datagrams handed to the kernel.
    pub sent: u64,
    pub send_errors: u64,
}

/// Sockets bound, not yet receiving: lets a caller learn ephemeral ports
/// before it tells the peers.
#[derive(Debug)]
pub struct Bound {
    sockets: Vec<Arc<UdpSocket>>,
    addrs: Vec<SocketAddr>,
}

impl Bound {
    /// Binds one socket per ring, in order.
    pub async fn bind(local: &[SocketAddr]) -> Result<Self, UdpError> {
        if local.is_empty() {
            return Err(UdpError::NoRings);
        }
        let mut sockets = Vec::with_capacity(local.len());
        let mut addrs = Vec::with_capacity(local.len());
        for &addr in local {
            let socket = UdpSocket::bind(addr).await.map_err(|source| UdpError::Bind { addr, source })?;
            addrs.push(socket.local_addr().map_err(|source| UdpError::Bind { addr, source })?);
            sockets.push(Arc::new(socket));
        }
        Ok(Bound { sockets, addrs })
    }

    /// The bound addresses, by ring (ports resolved).
    pub fn local_addrs(&self) -> &[SocketAddr] {
        &self.addrs
    }

    /// Starts one receive task per ring (call within a tokio runtime).
    /// `peers`: every other host, with its addresses by ring.
    pub fn start(
        self,
        id: Identity,
        peers: BTreeMap<HostId, Vec<SocketAddr>>,
    ) -> Result<(Transport, mpsc::Receiver<Delivery>), UdpError> {
        let rings = self.sockets.len();
        if peers.contains_key(&id.host) {
            return Err(UdpError::SelfInPeers(id.host));
        }
        if let Some((&host, addrs)) = peers.iter().find(|(_, addrs)| addrs.len() > rings) {
            return Err(UdpError::TooManyAddrs { host, addrs: addrs.len(), rings });
        }
        let receiver = Receiver::new(id.key.clone(), id.cluster, peers.keys().copied());
        let shared = Arc::new(Mutex::new(Shared { receiver, counters: NetCounters::default() }));
        let (inbox_tx, inbox_rx) = mpsc::channel(INBOX_CAPACITY_MSGS);
        let tasks = self
            .sockets
            .iter()
            .map(|socket| tokio::spawn(receive_loop(Arc::clone(socket), Arc::clone(&shared), inbox_tx.clone())))
            .collect();
        let sealer = Mutex::new(Sealer::new(id.key, id.cluster, id.host, id.boot, id.nonce));
        Ok((Transport { sockets: self.sockets, peers, sealer, shared, tasks }, inbox_rx))
    }
}

#[derive(Debug)]
struct Shared {
    receiver: Receiver,
    counters: NetCounters,
}

/// The running transport. Dropping it stops its receive tasks.
#[derive(Debug)]
pub struct Transport {
    sockets: Vec<Arc<UdpSocket>>,
    peers: BTreeMap<HostId, Vec<SocketAddr>>,
    sealer: Mutex<Sealer>,
    shared: Arc<Mutex<Shared>>,
    tasks: Vec<JoinHandle<()>>,
}

impl Transport {
    /// Sends `msg` to every peer on every ring; returns the datagrams handed
    /// to the kernel. A failing address is counted, not returned: a ring
    /// that is down is what the other rings are for.
    pub async fn send(&self, msg: &NetMessage) -> Result<usize, UdpError> {
        let bytes = lock(&self.sealer).seal(msg)?;
        Ok(self.transmit(&bytes, self.peers.values()).await)
    }

    /// Sends `msg` to one peer on every ring.
    pub async fn send_to(&self, host: HostId, msg: &NetMessage) -> Result<usize, UdpError> {
        let addrs = self.peers.get(&host).ok_or(UdpError::UnknownPeer(host))?;
        let bytes = lock(&self.sealer).seal(msg)?;
        Ok(self.transmit(&bytes, [addrs]).await)
    }

    async fn transmit<'a>(&self, bytes: &[u8], targets: impl IntoIterator<Item = &'a Vec<SocketAddr>>) -> usize {
        let (mut sent, mut failed) = (0u64, 0u64);
        for addrs in targets {
            for (socket, addr) in self.sockets.iter().zip(addrs) {
                match socket.send_to(bytes, addr).await {
                    Ok(_) => sent += 1,
                    Err(_) => failed += 1,
                }
            }
        }
        let mut shared = lock(&self.shared);
        shared.counters.sent = shared.counters.sent.saturating_add(sent);
        shared.counters.send_errors = shared.counters.send_errors.saturating_add(failed);
        usize::try_from(sent).unwrap_or(usize::MAX)
    }

    pub fn counters(&self) -> NetCounters {
        let shared = lock(&self.shared);
        NetCounters { drops: *shared.receiver.drops(), accepted: shared.receiver.accepted(), ..shared.counters }
    }

    /// The bound addresses, by ring.
    pub fn local_addrs(&self) -> Vec<SocketAddr> {
        self.sockets.iter().filter_map(|s| s.local_addr().ok()).collect()
    }
}

impl Drop for Transport {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// A poisoned lock only means another task panicked mid-update of plain
/// counters and replay state; both stay usable.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Adds one to a counter (the lock is released before any await).
fn bump(shared: &Mutex<Shared>, counter: impl FnOnce(&mut NetCounters) -> &mut u64) {
    let mut shared = lock(shared);
    let n = counter(&mut shared.counters);
    *n = n.saturating_add(1);
}

async fn receive_loop(socket: Arc<UdpSocket>, shared: Arc<Mutex<Shared>>, inbox: mpsc::Sender<Delivery>) {
    let mut buf = vec![0u8; RECV_BUFFER_BYTES];
    loop {
        let len = match socket.recv_from(&mut buf).await {
            Ok((len, _from)) => len,
            Err(_) => {
                bump(&shared, |c| &mut c.recv_errors);
                tokio::time::sleep(Duration::from_millis(RECV_ERROR_BACKOFF_MS)).await;
                continue;
            }
        };
        let accepted = lock(&shared).receiver.accept(&buf[..len]);
        let Ok(delivery) = accepted else { continue };
        match inbox.try_send(delivery) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => bump(&shared, |c| &mut c.inbox_full),
            // The daemon dropped the inbox: it is shutting down.
            Err(TrySendError::Closed(_)) => return,
        }
    }
}
