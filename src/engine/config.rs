//! What the engine is told about the cluster: timings, hosts, protected
//! domains and their policies. Plain data; parsing lives outside the engine.

use super::time::Duration;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt;

/// Host id: small, stable, configured (it is also the block-backend slot).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct HostId(pub u16);

/// A protected domain, by libvirt UUID (as 128 bits).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct DomainId(pub u128);

impl fmt::Display for HostId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "h{}", self.0)
    }
}

/// The timing set. Units are milliseconds throughout.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Timings {
    pub net_heartbeat_interval: Duration,
    /// A peer silent on the network this long is suspect.
    pub suspect_after: Duration,
    pub storage_write_interval: Duration,
    /// How often a host reads the other slots (and its assignments).
    pub storage_read_interval: Duration,
    /// A slot unchanged this long is storage-silent.
    pub storage_silent_after: Duration,
    /// One storage I/O that has not answered in this time has failed.
    pub io_timeout: Duration,
    /// S4: no completed slot write for this long (from the start of the last
    /// good one) and the host destroys its protected domains.
    pub renew_timeout: Duration,
    pub watchdog_timeout: Duration,
    /// S3(b): a slot unchanged this long (taker's clock) belongs to a dead host.
    pub host_dead_timeout: Duration,
    /// Hearing no peer and no isolation address this long means isolated.
    pub isolation_timeout: Duration,
    /// One fence agent call that has not answered in this time has failed.
    pub fence_timeout: Duration,
    /// Pause between rounds over a host's whole fence chain.
    pub fence_retry_backoff: Duration,
    /// Graceful shutdown (isolation response) before a destroy.
    pub shutdown_timeout: Duration,
    /// First retry delay of a failed start; doubles per attempt.
    pub restart_backoff: Duration,
    pub restart_backoff_max: Duration,
}

/// The margin S3(b) needs beyond the self-fence bound (clock-rate drift and
/// scheduling), DESIGN.md §1.
pub const S3B_MARGIN: Duration = Duration::from_secs(1);

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Profile {
    Fast,
    Default,
    Conservative,
}

impl Profile {
    pub fn parse(s: &str) -> Option<Profile> {
        match s {
            "fast" => Some(Profile::Fast),
            "default" => Some(Profile::Default),
            "conservative" => Some(Profile::Conservative),
            _ => None,
        }
    }

    pub fn timings(self) -> Timings {
        let ms = Duration::from_millis;
        match self {
            Profile::Default => Timings {
                net_heartbeat_interval: ms(500),
                suspect_after: ms(2000),
                storage_write_interval: ms(500),
                storage_read_interval: ms(250),
                storage_silent_after: ms(2000),
                io_timeout: ms(2000),
                renew_timeout: ms(8000),
                watchdog_timeout: ms(10_000),
                host_dead_timeout: ms(22_000),
                isolation_timeout: ms(5000),
                fence_timeout: ms(20_000),
                fence_retry_backoff: ms(2000),
                shutdown_timeout: ms(30_000),
                restart_backoff: ms(1000),
                restart_backoff_max: ms(30_000),
            },
            Profile::Fast => Timings {
                net_heartbeat_interval: ms(200),
                suspect_after: ms(800),
                storage_write_interval: ms(250),
                storage_read_interval: ms(125),
                storage_silent_after: ms(1000),
                io_timeout: ms(1000),
                renew_timeout: ms(3000),
                watchdog_timeout: ms(4000),
                host_dead_timeout: ms(10_000),
                isolation_timeout: ms(2000),
                fence_timeout: ms(10_000),
                fence_retry_backoff: ms(1000),
                shutdown_timeout: ms(15_000),
                restart_backoff: ms(500),
                restart_backoff_max: ms(15_000),
            },
            Profile::Conservative => Timings {
                net_heartbeat_interval: ms(1000),
                suspect_after: ms(5000),
                storage_write_interval: ms(1000),
                storage_read_interval: ms(500),
                storage_silent_after: ms(5000),
                io_timeout: ms(5000),
                renew_timeout: ms(20_000),
                watchdog_timeout: ms(20_000),
                host_dead_timeout: ms(50_000),
                isolation_timeout: ms(15_000),
                fence_timeout: ms(30_000),
                fence_retry_backoff: ms(5000),
                shutdown_timeout: ms(60_000),
                restart_backoff: ms(2000),
                restart_backoff_max: ms(60_000),
            },
        }
    }
}

/// Why a timing set is refused. Each message names the rule and the fix.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TimingsError {
    #[error(
        "unsafe timings: host_dead_timeout ({host_dead}) must exceed renew_timeout ({renew}) + watchdog_timeout ({watchdog}) + io_timeout ({io}) + 1s margin = {needed}; raise host_dead_timeout above {needed} or lower the others (DESIGN.md S3(b))"
    )]
    HostDeadTooShort { host_dead: Duration, renew: Duration, watchdog: Duration, io: Duration, needed: Duration },
    #[error(
        "unsafe timings: {name} ({value}) must be at least 2 x {base_name} ({base}) so that one lost message or write does not count as silence"
    )]
    TooTight { name: &'static str, value: Duration, base_name: &'static str, base: Duration },
    #[error(
        "unsafe timings: renew_timeout ({renew}) must exceed io_timeout ({io}) + storage_write_interval ({write}), or one slow write self-fences the host"
    )]
    RenewTooShort { renew: Duration, io: Duration, write: Duration },
    #[error(
        "unsafe timings: suspect_after ({suspect}) must be shorter than renew_timeout ({renew}): a host that holds its domains without storage (every member lost storage, DESIGN.md §3) lets go of them up to suspect_after after the last claim a taker's S3(b) clock counts from, and host_dead_timeout is checked against renew_timeout"
    )]
    SuspectTooLong { suspect: Duration, renew: Duration },
    #[error("invalid timings: {name} must be greater than zero")]
    Zero { name: &'static str },
}

impl Timings {
    /// Refuse timings that break DESIGN.md §1 or make false failovers likely.
    pub fn validate(&self) -> Result<(), TimingsError> {
        let t = self;
        for (name, v) in [
            ("net_heartbeat_interval", t.net_heartbeat_interval),
            ("storage_write_interval", t.storage_write_interval),
            ("storage_read_interval", t.storage_read_interval),
            ("io_timeout", t.io_timeout),
            ("fence_timeout", t.fence_timeout),
            ("restart_backoff", t.restart_backoff),
        ] {
            if v == Duration::ZERO {
                return Err(TimingsError::Zero { name });
            }
        }
        let needed = t.renew_timeout + t.watchdog_timeout + t.io_timeout + S3B_MARGIN;
        if t.host_dead_timeout <= needed {
            return Err(TimingsError::HostDeadTooShort {
                host_dead: t.host_dead_timeout,
                renew: t.renew_timeout,
                watchdog: t.watchdog_timeout,
                io: t.io_timeout,
                needed,
            });
        }
        if t.renew_timeout <= t.io_timeout + t.storage_write_interval {
            return Err(TimingsError::RenewTooShort {
                renew: t.renew_timeout,
                io: t.io_timeout,
                write: t.storage_write_interval,
            });
        }
        if t.suspect_after >= t.renew_timeout {
            return Err(TimingsError::SuspectTooLong { suspect: t.suspect_after, renew: t.renew_timeout });
        }
        let pairs = [
            ("suspect_after", t.suspect_after, "net_heartbeat_interval", t.net_heartbeat_interval),
            ("storage_silent_after", t.storage_silent_after, "storage_write_interval", t.storage_write_interval),
            ("storage_silent_after", t.storage_silent_after, "storage_read_interval", t.storage_read_interval),
            ("isolation_timeout", t.isolation_timeout, "net_heartbeat_interval", t.net_heartbeat_interval),
        ];
        for (name, value, base_name, base) in pairs {
            if value < base.saturating_mul(2) {
                return Err(TimingsError::TooTight { name, value, base_name, base });
            }
        }
        Ok(())
    }
}

/// Restart priority, lowest first so that `Ord` sorts by importance.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Priority {
    Disabled,
    Lowest,
    Low,
    Medium,
    High,
    Highest,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum IsolationResponse {
    Keep,
    Shutdown,
    Poweroff,
}

/// When a restarted domain counts as up, for readiness ordering.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Readiness {
    Started,
    GuestAgent,
    TcpPort(u16),
}

/// What havirt does when a domain stops on purpose: shut down from inside
/// the guest (libvirt STOPPED/SHUTDOWN, also `virsh shutdown`) or destroyed
/// by the operator (`virsh destroy`). A crash (qemu died, killed, guest
/// panic with `on_crash` destroy) is restarted either way.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnShutdown {
    /// Its desired state becomes stopped: its lease is freed with reason
    /// `Stopped`, and no host starts it until the operator does
    /// (`havirt start`).
    Stop,
    /// Restarted on the same host, as after a crash.
    Restart,
}

/// Guest-agent monitoring (vSphere HA's VM monitoring): the host running
/// the domain pings its QEMU guest agent; when no answer came for
/// `failure_interval`, it resets the guest (a hard reset: qemu, its disks
/// and the lease stay), at most `max_resets` times per `reset_window`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestMonitor {
    pub enabled: bool,
    /// No answer for this long after the last one means the guest hangs.
    pub failure_interval: Duration,
    /// After a start or a reset, the guest's first answer is waited for
    /// this long before silence counts (its boot). Once the agent has
    /// answered, silence counts from its last answer at once, so a long
    /// value only delays catching a guest that hangs before its agent ever
    /// starts.
    pub min_uptime: Duration,
    pub max_resets: u32,
    pub reset_window: Duration,
}

impl Default for GuestMonitor {
    /// vSphere's "high" sensitivity (30 s, 120 s minimum uptime, 3 resets
    /// per hour); off until asked for.
    fn default() -> Self {
        GuestMonitor {
            enabled: false,
            failure_interval: Duration::from_secs(30),
            min_uptime: Duration::from_secs(120),
            max_resets: 3,
            reset_window: Duration::from_secs(3600),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DomainPolicy {
    pub priority: Priority,
    pub isolation_response: IsolationResponse,
    /// If not empty, the domain may run only on these hosts.
    pub affinity: Vec<HostId>,
    /// Domains of one group never share a host, and spread over fault domains
    /// when they can.
    pub anti_affinity: Option<String>,
    pub readiness: Readiness,
    pub readiness_timeout: Duration,
    /// Failed starts (on any host) before havirt gives up on the domain.
    pub max_restarts: u32,
    pub on_shutdown: OnShutdown,
    pub monitor: GuestMonitor,
}

impl Default for DomainPolicy {
    fn default() -> Self {
        DomainPolicy {
            priority: Priority::Medium,
            isolation_response: IsolationResponse::Keep,
            affinity: Vec::new(),
            anti_affinity: None,
            readiness: Readiness::Started,
            readiness_timeout: Duration::from_secs(120),
            max_restarts: 3,
            on_shutdown: OnShutdown::Stop,
            monitor: GuestMonitor::default(),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DomainSpec {
    pub id: DomainId,
    pub name: String,
    pub memory_mib: u64,
    pub vcpus: u32,
    pub policy: DomainPolicy,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostSpec {
    pub id: HostId,
    pub name: String,
    /// Fence agents in the order they are tried; names are the driver's.
    pub fence_agents: Vec<String>,
    /// A watchdog that really resets the host (needed for S3(b)).
    pub watchdog: bool,
    /// Rack or other failure group.
    pub fault_domain: Option<String>,
    pub memory_mib: u64,
    pub vcpus: u32,
    pub max_concurrent_starts: u32,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ClusterSpec {
    pub name: String,
    pub timings: Timings,
    pub hosts: Vec<HostSpec>,
    pub domains: BTreeMap<DomainId, DomainSpec>,
    /// Placement may commit this much memory relative to a host's size.
    pub memory_overcommit: f64,
    pub vcpu_overcommit: f64,
    #[serde(default)]
    pub admission: AdmissionPolicy,
}

/// Admission control (DESIGN.md §6): what the cluster must stay able to
/// absorb with every protected domain restarted.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AdmissionMode {
    /// The figure is computed and shown; nothing is said about it.
    Off,
    /// A figure below the requirement is logged and alerted.
    #[default]
    Warn,
    /// As warn, and `havirt protect`, `havirt start` and failback refuse a
    /// change that leaves the figure below the requirement.
    Strict,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AdmissionPolicy {
    pub mode: AdmissionMode,
    /// `tolerate_host_failures`.
    pub host_failures: u32,
    /// `tolerate_fault_domain_failures`.
    pub fault_domain_failures: u32,
}

impl Default for AdmissionPolicy {
    fn default() -> Self {
        AdmissionPolicy { mode: AdmissionMode::Warn, host_failures: 1, fault_domain_failures: 0 }
    }
}

impl ClusterSpec {
    pub fn host(&self, id: HostId) -> Option<&HostSpec> {
        self.hosts.iter().find(|h| h.id == id)
    }

    pub fn domain_name(&self, id: DomainId) -> String {
        match self.domains.get(&id) {
            Some(d) => d.name.clone(),
            None => format!("{:032x}", id.0),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_profile_is_safe() {
        for p in [Profile::Fast, Profile::Default, Profile::Conservative] {
            assert_eq!(p.timings().validate(), Ok(()), "{p:?}");
        }
    }

    #[test]
    fn short_host_dead_timeout_is_refused_with_the_rule() {
        let mut t = Profile::Default.timings();
        t.host_dead_timeout = Duration::from_secs(20);
        let err = t.validate().unwrap_err();
        assert!(matches!(err, TimingsError::HostDeadTooShort { .. }));
        let msg = err.to_string();
        assert!(msg.contains("host_dead_timeout (20.000s)"), "{msg}");
        assert!(msg.contains("21.000s"), "{msg}");
    }

    #[test]
    fn renew_shorter_than_one_write_is_refused() {
        let mut t = Profile::Default.timings();
        t.renew_timeout = Duration::from_millis(2400);
        assert!(matches!(t.validate(), Err(TimingsError::RenewTooShort { .. })));
    }

    #[test]
    fn suspect_after_not_shorter_than_renew_is_refused() {
        let mut t = Profile::Default.timings();
        t.suspect_after = t.renew_timeout;
        let err = t.validate().unwrap_err();
        assert!(matches!(err, TimingsError::SuspectTooLong { .. }), "{err}");
        assert!(err.to_string().contains("suspect_after (8.000s)"), "{err}");
    }

    #[test]
    fn priority_orders_by_importance() {
        assert!(Priority::Highest > Priority::High);
        assert!(Priority::Lowest > Priority::Disabled);
    }
}
