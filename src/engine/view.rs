//! What a node knows, as plain data: `havirt status` and the daemon's
//! control socket show it. Built by `Node::view(now)`; reading it changes
//! nothing.

use super::config::{DomainId, HostId, Priority};
use super::io::{BootId, DomainState};
use super::time::Duration;
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct NodeView {
    pub host: HostId,
    pub boot: BootId,
    /// This node holds the master lease and acts as master.
    pub is_master: bool,
    /// Owner of the master lease as last read (None: free or not read yet).
    pub master: Option<HostId>,
    /// "healthy", "fencing" or "fenced" (S4).
    pub self_fence: String,
    pub isolated: bool,
    /// S4 holds: a slot write completed within renew_timeout.
    pub storage_healthy: bool,
    /// Since the start of our last completed slot write.
    pub last_good_write_age: Option<Duration>,
    /// Every configured host, this one included, by id.
    pub hosts: Vec<HostView>,
    /// Every protected domain, by id.
    pub domains: Vec<DomainView>,
    /// Admission control (master only): host and fault-domain failures the
    /// cluster can absorb now.
    pub tolerance: Option<(u32, u32)>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct HostView {
    pub id: HostId,
    pub name: String,
    /// "self" for this host; else the verdict name (alive, partitioned,
    /// isolated, storage-lost, suspect, unknown).
    pub verdict: String,
    /// Since its last network heartbeat reached us (None: never; this host: None).
    pub net_age: Option<Duration>,
    /// Since we first saw its current slot content (storage heartbeat age).
    pub slot_age: Option<Duration>,
    pub boot: Option<BootId>,
    pub isolated: bool,
    pub self_fenced: bool,
    /// Size (0 when not known yet) and what its protected domains use.
    pub memory_mib: u64,
    pub vcpus: u32,
    pub used_memory_mib: u64,
    pub used_vcpus: u32,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DomainView {
    pub id: DomainId,
    pub name: String,
    pub priority: Priority,
    /// The host whose slot (or our own state) reports the domain.
    pub host: Option<HostId>,
    /// As reported in that slot.
    pub state: Option<DomainState>,
    /// Lease generation that host reports (or the master's cache).
    pub generation: Option<u64>,
    /// What this node is doing with it, when it is local ("running",
    /// "starting", "backoff", ...).
    pub local: Option<String>,
}
