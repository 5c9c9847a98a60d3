//! The engine's whole boundary: every input it accepts, every action it asks
//! for, and the records those carry. Kept in one file (as Proxmox's `$haenv`)
//! so that a driver author reads exactly what must be implemented.

use super::config::{DomainId, DomainSpec, HostId};
use super::time::{Duration, Instant};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Boot id of a host (changes on every reboot; its qemu processes die with it).
pub type BootId = u64;

/// Identifies one storage, hypervisor or fence request; results echo it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct OpId(pub u64);

/// Who holds a lease: a host in one boot.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Owner {
    pub host: HostId,
    pub boot: BootId,
}

/// Why a lease changed hands; stored with it so that every takeover can be
/// audited against S3.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LeaseReason {
    /// Initial protect / acquire of a free lease.
    Acquired,
    /// S3(a): a fence agent or the operator confirmed the owner powered off,
    /// or the owner's slot shows a newer boot.
    FenceConfirmed,
    /// S3(b): the owner's slot did not advance for host_dead_timeout.
    HostDeadTimeout,
    /// S3(c): the owner said it stopped the domain and released the lease.
    Released,
    /// The owner re-took its own lease for a local restart.
    Renewed,
    /// The owner live-migrated the domain and handed the lease to the host
    /// that now holds it paused (maintenance mode; `Node` has the protocol).
    Migrated,
    /// The owner freed it after the domain stopped on purpose (a shutdown
    /// from inside the guest, or by the operator): its desired state is
    /// stopped. No master places a lease free for this reason; only an
    /// operator's `havirt start` takes it (by CAS, like any start).
    Stopped,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    /// `None`: free (never taken, or released by the master's bookkeeping).
    pub owner: Option<Owner>,
    /// Bumps on every change.
    pub generation: u64,
    pub reason: LeaseReason,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum LeaseKey {
    Master,
    Domain(DomainId),
}

/// What a host says about one domain in its slot, with the lease generation
/// it holds (so the master's lease cache follows the owners' renewals).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DomainReport {
    pub state: DomainState,
    pub generation: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DomainState {
    Starting,
    Running,
    /// Running and its readiness condition holds.
    Ready,
    /// S3(c) by storage: the host stopped the domain and gives up the lease
    /// of this generation (start failure, isolation response, give-up).
    Released {
        failed_start: bool,
    },
    /// Live-migrated away: the host handed this generation of the lease to
    /// `to` in `boot` (reported for a while, so that the master's lease
    /// cache follows a move it did not make).
    HandedOver {
        to: HostId,
        boot: BootId,
    },
    /// Runs nowhere on purpose: the lease is free at this generation with
    /// reason `Stopped` (reported by the host that stopped it and by the
    /// master, so that every `havirt status` shows it).
    Stopped,
}

/// A host's heartbeat slot (DESIGN.md §4), as the engine sees it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Slot {
    pub host: HostId,
    pub boot: BootId,
    /// Changes every daemon start.
    pub incarnation: u64,
    /// Increments every write.
    pub seq: u64,
    pub isolated: bool,
    /// The host self-fenced and takes no new assignments until this clears.
    pub self_fenced: bool,
    /// Maintenance mode: the host drains its domains by live migration and
    /// takes no restarts until the operator ends it. Kept here so that it
    /// survives daemon restarts and reboots (the daemon reads it back).
    pub maintenance: bool,
    /// S3(c) for the master lease: it gave up this generation.
    pub released_master: Option<u64>,
    /// What the protected domains running here use.
    pub used_memory_mib: u64,
    pub used_vcpus: u32,
    pub domains: BTreeMap<DomainId, DomainReport>,
    /// This host's size (capacity summary, DESIGN.md §4): the daemon knows
    /// its own from the host itself, and the master plans with it; 0 means
    /// not known (the master then uses the size in its own spec).
    pub memory_mib: u64,
    pub vcpus: u32,
    /// The daemon that wrote this slot has stopped (the last write of an
    /// incarnation; `stop.rs`). Last in the record on purpose: a slot
    /// written before this field existed decodes with `None` (record.rs
    /// reads past the payload into its zero padding), and an older reader
    /// ignores it.
    #[serde(default)]
    pub stopped: Option<StopNotice>,
}

/// What a daemon that stops on purpose tells its peers in its last slot
/// write (DESIGN.md §3, "A daemon that stops").
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StopNotice {
    /// Peers hold off fencing this host for so long after they read this
    /// slot: the daemon means to be back (`systemctl restart`, an upgrade).
    /// At most watchdog_timeout; 0 for none.
    pub grace_ms: u64,
    /// Something still resets the host when no daemon pets it (a watchdog
    /// device, the lab's watchdog: they outlive the process). False for
    /// systemd's service watchdog, which ends with a clean stop: then
    /// S3(b) must never apply to this slot, since nothing enforces S4.
    pub host_reset: bool,
}

/// `fenced/<host>`: which boot of a host was confirmed off, so that any host
/// can check S3(a) from storage alone.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FencedRecord {
    pub host: HostId,
    pub boot: BootId,
    pub by: HostId,
}

/// The master's per-host assignment record: leases it moved to this host
/// that the host should start.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Assignments {
    pub seq: u64,
    pub domains: BTreeMap<DomainId, u64>,
}

/// One read of everything a host polls every interval.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StorageSnapshot {
    pub slots: BTreeMap<HostId, Slot>,
    pub fenced: BTreeMap<HostId, FencedRecord>,
    /// The reading host's own assignment record.
    pub assignments: Assignments,
    /// A fence request (poison, SBD-style) aimed at the reading host: the
    /// boot it targets. The target obeys by self-fencing; for the requester it
    /// counts as confirmed only by S3(b).
    pub poison: Option<BootId>,
    /// Records that failed their checksum or belong to another cluster.
    pub rejected_records: u32,
}

/// One lease generation a host stopped and gave up.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Release {
    pub key: LeaseKey,
    pub generation: u64,
    /// It was given up because the domain would not start there.
    pub failed_start: bool,
}

/// Network heartbeat (authenticated by the `net` adapter).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Heartbeat {
    pub host: HostId,
    pub boot: BootId,
    pub incarnation: u64,
    pub seq: u64,
    /// The sender's own slot writes are failing (past storage_silent_after).
    pub storage_lost: bool,
    /// The sender is storage-lost and hears every peer report lost storage
    /// (DESIGN.md §3). A host holds on to its domains without storage only
    /// while it hears this claim from every peer, and the sender restarts
    /// its own S3(b) clocks whenever it makes it (`Node::exempt`). Its wire
    /// name is the older `exempt` (same claim; packets stay the same size,
    /// and an older peer reads it as before).
    #[serde(rename = "exempt")]
    pub hears_all_lost: bool,
    /// The sender self-fenced (informational; takes no assignments).
    pub self_fenced: bool,
    /// S3(c) over the network: lease generations the sender stopped and gave
    /// up (at most `MAX_RELEASED_PER_HEARTBEAT`). Each entry is a permanent
    /// fact, so a stale heartbeat is still true; this is what lets a host
    /// that lost its storage hand its domains over without host_dead_timeout.
    pub released: Vec<Release>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum NetMessage {
    Heartbeat(Heartbeat),
    /// The master moved these leases (domain, generation) to the receiver;
    /// a hint only: the receiver verifies the lease before starting.
    Assign {
        from: HostId,
        domains: Vec<(DomainId, u64)>,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum StorageError {
    Io,
    Timeout,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum CasOutcome {
    /// Written and verified by re-reading.
    Done(Lease),
    /// The lease was not at the expected generation; here is what it is.
    Conflict(Lease),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum DomainEvent {
    Started,
    Ready,
    /// Stopped after a destroy or shutdown havirt asked for (or stopped for
    /// a reason that is neither a crash nor a shutdown: saved, migrated).
    Stopped,
    /// qemu died on its own.
    Crashed,
    /// The guest shut down: from inside, or asked by someone else than
    /// havirt (`virsh shutdown`). libvirt STOPPED/SHUTDOWN.
    ShutDown,
    /// The operator destroyed it (`virsh destroy`). libvirt STOPPED/DESTROYED.
    Destroyed,
    /// The start failed, for `cause`.
    StartFailed {
        cause: StartFailure,
    },
}

/// Why a start failed: it decides what the node may do next.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum StartFailure {
    /// libvirt refused it (bad definition, missing disk or bridge): the
    /// domain cannot run here, and the lease goes back to the master.
    Refused,
    /// qemu's image locking: another qemu still holds the disks.
    DisksLocked,
    /// libvirtd did not answer (hung, restarting, connection lost). The
    /// start may still happen once libvirtd gets to it, so the lease is
    /// kept: released, another host could start the domain while this
    /// late start runs it here too (S1).
    HypervisorDown,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum FenceOutcome {
    /// The agent saw the host powered off.
    Confirmed,
    Failed,
    /// A poison request was written (storage agent): the target fences
    /// itself if it can still read it. Never a confirmation: the lease moves
    /// only by S3(b), so this agent is not asked again for this outage.
    Requested,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum OperatorCommand {
    /// The operator swears the host is powered off (stonith_admin --confirm).
    FenceConfirm(HostId),
    /// Enter (true) or leave (false) maintenance mode on this host. Entering
    /// again retries the domains whose migration failed.
    Maintenance(bool),
    /// `havirt start`: start this domain, stopped on purpose, on this host
    /// (its free lease is taken by CAS first).
    Start(DomainId),
}

/// What one guest-agent ping found.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum AgentPing {
    /// The agent answered `guest-ping`.
    Answered,
    /// libvirt answered that the agent did not (not connected, timed out).
    NoAnswer,
    /// libvirt itself failed: nothing is known about the guest.
    Unknown,
}

/// Everything that happens to a node, except the passing of time.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Input {
    /// Protected domains the hypervisor runs here: every one at daemon start,
    /// and later the domains newly protected (after the `ProtectedDomains`
    /// that adds them) that run on this host, or protected domains found
    /// running behind havirt's back. Each is adopted if its lease is
    /// ours, destroyed as a zombie (S5) if it is not. Domains not in the
    /// protected set, and domains this node already handles, are ignored.
    ///
    /// Give it right after that `ProtectedDomains`, with no other input in
    /// between: an assignment handled in the gap would start a domain that
    /// already runs here (see `Action::StartDomain`).
    DomainsAtStart(Vec<DomainId>),
    /// The whole set of protected domains now (the datastore registry
    /// `domains/*.xml`, read periodically and on change); it replaces the
    /// set this node works with.
    ///
    /// - Added: the master reads its lease before acting on it. Protect a
    ///   domain by first moving its lease to the host that runs it (CAS to
    ///   that host and boot, reason `Acquired`, generation + 1), then writing
    ///   the registry entry. (A protected domain whose lease is free is
    ///   started by the master wherever it fits.)
    /// - Removed: forgotten everywhere, neither destroyed nor released: its
    ///   lease stays where it is (a freed lease of a domain that a node with
    ///   a stale registry still protects could be placed elsewhere).
    /// - Changed policy or size: taken as is.
    ///
    /// Give it after every successful read, changed or not, with the time
    /// the read was issued: a master takes a domain's lease by S3(b) only
    /// with a registry read issued within host_dead_timeout. The owner no
    /// longer self-fences (S4) an unprotected domain, so a master protecting
    /// it from an older registry could take its lease from an owner whose
    /// storage failed and start it while it still runs there. A read issued
    /// at most host_dead_timeout before the takeover was issued after the
    /// owner's last slot write, so after any unprotect that preceded it.
    ProtectedDomains {
        domains: BTreeMap<DomainId, DomainSpec>,
        read_issued: Instant,
    },
    Net(NetMessage),
    SlotWritten {
        op: OpId,
        result: Result<(), StorageError>,
    },
    StorageRead {
        op: OpId,
        result: Result<StorageSnapshot, StorageError>,
    },
    LeaseRead {
        op: OpId,
        key: LeaseKey,
        result: Result<Lease, StorageError>,
    },
    LeaseCas {
        op: OpId,
        key: LeaseKey,
        result: Result<CasOutcome, StorageError>,
    },
    RecordWritten {
        op: OpId,
        result: Result<(), StorageError>,
    },
    Domain {
        domain: DomainId,
        event: DomainEvent,
    },
    Fence {
        op: OpId,
        target: HostId,
        outcome: FenceOutcome,
    },
    /// A protected domain arrived here paused by a live migration (libvirt
    /// STARTED/MIGRATED, or a paused protected domain found at a re-list).
    /// It runs only once its lease is handed to this host; else it is
    /// destroyed after `MIGRATION_HANDOFF_TIMEOUT` (it never ran here).
    Incoming {
        domain: DomainId,
    },
    /// The answer to `Action::MigrateDomain`. `Ok`: the domain is paused on
    /// the target and gone from here. `Err`: the message; `running_here`
    /// says whether qemu still runs here (libvirt resumes it on failure).
    Migrated {
        domain: DomainId,
        result: Result<(), String>,
        running_here: bool,
    },
    /// Whether any isolation address answered.
    IsolationProbe {
        reachable: bool,
    },
    Operator(OperatorCommand),
    /// The daemon stops on purpose (SIGTERM): write one last slot carrying
    /// this notice, then answer `Action::Stopped`. Nothing else is done
    /// after it; give no other input but the write's `SlotWritten`.
    Stop(StopNotice),
    /// The answer to `Action::PingGuestAgent`.
    GuestAgent {
        domain: DomainId,
        result: AgentPing,
    },
}

/// Everything a node asks of the world. Plain data: the driver executes it
/// and reports back with the matching `Input`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Action {
    /// To every peer when `to` is None.
    Send {
        to: Option<HostId>,
        msg: NetMessage,
    },
    WriteSlot {
        op: OpId,
        slot: Slot,
    },
    ReadStorage {
        op: OpId,
    },
    ReadLease {
        op: OpId,
        key: LeaseKey,
    },
    /// Compare-and-swap under the file lock: write `new` only if the lease is
    /// at `expect_generation`.
    CasLease {
        op: OpId,
        key: LeaseKey,
        expect_generation: u64,
        new: Lease,
    },
    WriteFenced {
        op: OpId,
        record: FencedRecord,
    },
    WriteAssignments {
        op: OpId,
        host: HostId,
        assignments: Assignments,
    },
    /// Start a domain whose lease this node has just taken. If libvirt has
    /// it paused (an incoming migration), resume it. If libvirt says
    /// it runs already (a domain newly protected here, assigned before its
    /// `DomainsAtStart`), answer `DomainEvent::Started`: the lease is ours,
    /// so that qemu is legitimately ours. Never `StartFailed`: that releases
    /// the lease (S3(c)) while qemu still runs, and the master would start
    /// the domain a second time.
    StartDomain {
        domain: DomainId,
    },
    /// Live-migrate a running domain to `to`, leaving it paused there
    /// (libvirt's VIR_MIGRATE_PAUSED); answered with `Input::Migrated`. The
    /// target resumes it only after the lease handoff.
    MigrateDomain {
        domain: DomainId,
        to: HostId,
    },
    /// Hard stop; `kill` means libvirt did not answer: kill qemu directly.
    DestroyDomain {
        domain: DomainId,
        kill: bool,
    },
    ShutdownDomain {
        domain: DomainId,
        timeout: Duration,
    },
    Fence {
        op: OpId,
        target: HostId,
        agent: String,
    },
    ProbeIsolation,
    /// Check the domain's readiness condition (guest-agent ping, TCP
    /// connect); answered with `DomainEvent::Ready` when it holds.
    ProbeReadiness {
        domain: DomainId,
        readiness: super::config::Readiness,
    },
    PetWatchdog,
    /// Guest-agent monitoring: `guest-ping` the domain's agent, answered
    /// with `Input::GuestAgent`.
    PingGuestAgent {
        domain: DomainId,
    },
    /// Hard-reset the guest of a domain running here (libvirt
    /// `virDomainReset`): qemu, its disks and the lease stay. No answer.
    ResetDomain {
        domain: DomainId,
    },
    Emit(Event),
    /// The answer to `Input::Stop`: the daemon may exit now. `written`:
    /// the notice is on storage. When it is not and the notice says no
    /// watchdog outlives the daemon, exiting cleanly would leave domains
    /// that nothing guards while peers may take their leases by S3(b): the
    /// daemon must then exit as a failure (systemd's FailureAction resets
    /// the host; DESIGN.md §3).
    Stopped {
        written: bool,
    },
}

/// Events for the log: what happened and why. Golden scenarios compare them.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    pub at: Instant,
    pub host: HostId,
    pub role: String,
    pub text: String,
}
