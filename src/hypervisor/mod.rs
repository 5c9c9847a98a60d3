//! The hypervisor adapter (DESIGN.md §7): what the daemon asks of libvirt on
//! its own host, behind the [`Hypervisor`] trait, and libvirt's domain
//! lifecycle events as the engine's [`DomainEvent`]s.
//!
//! - `libvirt`: [`LibvirtHypervisor`], the trait over the `virt` crate.
//! - `events`: the lifecycle and connection-close event stream.
//! - `metadata`: havirt's per-domain policy element and its strict parser.
//! - `netmap`: bridge and network names mapped per host in domain XML.
//! - `process`: finding and killing a domain's qemu without libvirt (S4).
//! - `ffi`: the only unsafe code of the adapter (event callbacks, pidfd).
//!
//! Every call blocks. The daemon runs them on worker threads and bounds each
//! with its own timeout (`io_timeout` for destroy, `shutdown_timeout` for a
//! graceful shutdown): a hung libvirtd must never stall the main loop, and
//! [`Hypervisor::kill_qemu`] works without libvirt answering at all.

#![deny(unsafe_code)]

pub mod events;
#[allow(unsafe_code)]
mod ffi;
pub mod libvirt;
pub mod metadata;
pub mod netmap;
pub mod process;

pub use events::{CloseReason, EventStream, HypervisorEvent};
pub use libvirt::{LibvirtHypervisor, LibvirtOptions};
pub use metadata::{POLICY_KEY, POLICY_NS, PolicyError};
pub use process::KillError;

use crate::engine::config::{DomainId, DomainPolicy};
use std::fmt;

/// What the daemon needs from the local hypervisor. Blocking; see the module
/// doc for how the daemon bounds each call.
pub trait Hypervisor: Send + Sync {
    /// Every domain libvirt knows on this host, defined or transient, running
    /// or not, ordered by uuid.
    fn list(&self) -> Result<Vec<DomainInfo>, HypervisorError>;
    /// Defines (or redefines) a persistent domain; returns its uuid.
    fn define(&self, xml: &str) -> Result<DomainId, HypervisorError>;
    /// Starts a defined domain. A domain that already runs is
    /// [`HypervisorError::AlreadyRunning`]: the caller decides what that means.
    fn start(&self, id: DomainId) -> Result<(), HypervisorError>;
    /// Hard stop through libvirt (SIGTERM, then SIGKILL after libvirt's own
    /// grace). `Ok` also when the domain was not running: the goal holds.
    fn destroy(&self, id: DomainId) -> Result<(), HypervisorError>;
    /// Asks the guest to shut down (ACPI or agent) and returns at once; the
    /// caller waits for the `Stopped` event and destroys after its timeout.
    /// `Ok` also when the domain was not running.
    fn shutdown(&self, id: DomainId) -> Result<(), HypervisorError>;
    /// Hard reset of the guest (`virDomainReset`, as the reset button):
    /// the same qemu process keeps running, with its disks and lease.
    fn reset(&self, id: DomainId) -> Result<(), HypervisorError>;
    /// S4 fallback when libvirtd hangs: SIGKILL the domain's qemu found from
    /// libvirt's pidfile or `/proc`, and wait (bounded) until it has exited.
    /// Never talks to libvirt. Returns the pids killed (empty: none ran).
    fn kill_qemu(&self, id: DomainId) -> Result<Vec<u32>, HypervisorError>;
    /// Whether libvirtd starts the domain when it starts. havirt turns this
    /// off on protected domains: a host back from a reboot must not start a
    /// domain whose lease it lost (S5).
    fn set_autostart(&self, id: DomainId, on: bool) -> Result<(), HypervisorError>;
    /// The domain's havirt policy; `None` when it has no havirt element.
    fn policy(&self, id: DomainId) -> Result<Option<DomainPolicy>, HypervisorError>;
    /// Writes the policy element into the domain's persistent definition (and
    /// into the live one while it runs).
    fn set_policy(&self, id: DomainId, policy: &DomainPolicy) -> Result<(), HypervisorError>;
    /// `guest-ping` through the qemu guest agent, bounded by the adapter's
    /// agent timeout. `Ok(false)`: the agent did not answer (yet).
    fn ping_guest_agent(&self, id: DomainId) -> Result<bool, HypervisorError>;
    /// Live migration (peer to peer, shared storage) to the libvirt at
    /// `dest_uri`, data over `data_uri`, leaving the domain **paused** there
    /// and defined only there. Blocks until the job ends. On failure libvirt
    /// keeps (resumes) the domain here.
    /// `unsafe_storage`: migrate even when libvirt cannot tell that the
    /// disks are shared (VIR_MIGRATE_UNSAFE; the config says they are).
    /// `remap`: (this host's, the target's) bridge and network maps; the
    /// domain arrives with the target's names.
    fn migrate(
        &self,
        id: DomainId,
        dest_uri: &str,
        data_uri: &str,
        unsafe_storage: bool,
        remap: Option<(&netmap::NetMap, &netmap::NetMap)>,
    ) -> Result<(), HypervisorError>;
    /// Resume a paused domain; `Ok(false)` when it was not paused (or is not
    /// here at all).
    fn resume_if_paused(&self, id: DomainId) -> Result<bool, HypervisorError>;
    /// The persistent definition (what another host needs to define it).
    fn xml(&self, id: DomainId) -> Result<String, HypervisorError>;
    /// The guest's IP addresses libvirt knows: from the DHCP leases of its
    /// libvirt networks, else from the guest agent (`tcp:PORT` readiness).
    fn addresses(&self, id: DomainId) -> Result<Vec<std::net::IpAddr>, HypervisorError>;
}

/// One domain as `list` reports it.
#[derive(Clone, Debug, PartialEq)]
pub struct DomainInfo {
    pub id: DomainId,
    pub name: String,
    pub state: PowerState,
    /// `Ok(None)`: no havirt element. An element that does not parse is
    /// reported here, not as a failure of the whole list.
    pub policy: Result<Option<DomainPolicy>, PolicyError>,
    /// The qemu process, from libvirt's pidfile, checked against `/proc`.
    pub qemu_pid: Option<u32>,
    pub persistent: bool,
    pub autostart: bool,
}

/// A domain's state, reduced to what HA decides on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum PowerState {
    /// qemu runs (libvirt's running, blocked, and shutting-down states).
    Running,
    /// qemu runs but the vCPUs are stopped (paused, pm-suspended).
    Paused,
    ShutOff,
    /// The guest crashed and qemu was kept (`on_crash` preserve).
    Crashed,
}

impl PowerState {
    /// Whether a qemu process exists for the domain (what S1 and S5 count).
    pub fn has_qemu(self) -> bool {
        self != PowerState::ShutOff
    }
}

/// Why a hypervisor call failed. Each names the domain and the operation.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum HypervisorError {
    #[error("libvirt {op}: {source}")]
    Libvirt {
        op: &'static str,
        #[source]
        source: virt::error::Error,
    },
    #[error("libvirt {op} on domain {domain}: {source}")]
    Domain {
        op: &'static str,
        domain: Uuid,
        #[source]
        source: virt::error::Error,
    },
    #[error("no domain with uuid {0} is defined on this host")]
    NoSuchDomain(Uuid),
    #[error("domain {0} is already running")]
    AlreadyRunning(Uuid),
    #[error("domain {domain}: {source}")]
    Policy {
        domain: Uuid,
        #[source]
        source: PolicyError,
    },
    #[error("domain {domain}: mapping its bridges and networks for the target: {reason}")]
    Mapping { domain: Uuid, reason: String },
    #[error("libvirt returned a malformed uuid {0:?}")]
    BadUuid(String),
    #[error("killing the qemu of domain {domain}: {source}")]
    Kill {
        domain: Uuid,
        #[source]
        source: KillError,
    },
    #[error("events: {0}")]
    Events(#[from] events::EventsError),
}

impl HypervisorError {
    /// The connection to libvirtd failed (closed, keepalive timeout, RPC
    /// error): libvirtd may not have seen the call, or may still carry it
    /// out. Not an answer about the domain.
    pub fn is_connection_failure(&self) -> bool {
        use virt::error::{ErrorDomain, ErrorNumber};
        match self {
            HypervisorError::Libvirt { source, .. } | HypervisorError::Domain { source, .. } => {
                source.domain() == ErrorDomain::Rpc
                    || matches!(source.code(), ErrorNumber::NoConnect | ErrorNumber::InvalidConn | ErrorNumber::Rpc)
            }
            _ => false,
        }
    }
}

/// A domain id printed the way libvirt prints it (8-4-4-4-12 lowercase hex).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Uuid(pub DomainId);

impl fmt::Display for Uuid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let h = format!("{:032x}", self.0.0);
        write!(f, "{}-{}-{}-{}-{}", &h[0..8], &h[8..12], &h[12..16], &h[16..20], &h[20..32])
    }
}

impl fmt::Debug for Uuid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// Parses a uuid as libvirt prints it (dashes optional, any case).
pub fn parse_uuid(s: &str) -> Option<DomainId> {
    let hex: String = s.chars().filter(|c| *c != '-').collect();
    if hex.len() != 32 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    u128::from_str_radix(&hex, 16).ok().map(DomainId)
}

/// The uuid string libvirt expects for `id`.
pub fn uuid_string(id: DomainId) -> String {
    Uuid(id).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uuid_round_trip() {
        let s = "6695eb01-f6a4-8304-79aa-97f2502e193f";
        let id = parse_uuid(s).expect("valid uuid");
        assert_eq!(id, DomainId(0x6695eb01_f6a4_8304_79aa_97f2502e193f));
        assert_eq!(uuid_string(id), s);
        assert_eq!(parse_uuid(&s.to_uppercase()), Some(id));
        assert_eq!(parse_uuid("6695eb01"), None);
        assert_eq!(parse_uuid("6695eb01-f6a4-8304-79aa-97f2502e193g"), None);
    }
}
