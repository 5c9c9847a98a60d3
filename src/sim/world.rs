//! The simulated world: virtual time, hosts (power, pause, daemon, qemu,
//! watchdog), network, shared storage and fence agents. Each host runs the
//! real engine. Everything random is drawn from one seed, so a seed replays
//! the exact same run.

use super::SimSetup;
use super::checker::Checker;
use super::faults::{AgentMode, Command, StorageFault};
use crate::engine::config::{ClusterSpec, DomainId, DomainSpec, HostId};
use crate::engine::io::*;
use crate::engine::node::{Node, NodeConfig};
use crate::engine::time::{Instant, Rng};
use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap};
use std::sync::Arc;

/// Knobs of the simulated hardware, drawn from the seed in random runs.
#[derive(Clone, Debug)]
pub struct WorldParams {
    pub net_latency_ms: (u64, u64),
    pub storage_latency_ms: (u64, u64),
    /// Each host's storage path is slower by up to this much (its own
    /// distance to the NFS server), drawn per host.
    pub storage_host_skew_ms: u64,
    pub start_ms: (u64, u64),
    pub destroy_ms: (u64, u64),
    pub guest_shutdown_ms: (u64, u64),
    pub fence_ms: (u64, u64),
    pub readiness_ms: (u64, u64),
    /// Host boot until its daemon runs.
    pub boot_ms: u64,
    /// qemu image locks (as qemu's own locking or virtlockd) refuse a second
    /// writer. On by default, as on a real host; off to test the engine alone.
    pub disk_locks: bool,
    /// Fenced hosts are powered on again after this long (random runs: the
    /// operator repairs them); None leaves them off.
    pub repair_after_ms: Option<(u64, u64)>,
    /// Each daemon reads a changed registry up to this long after the
    /// change (its poll period); the one that protects a domain at once.
    pub registry_lag_ms: u64,
    /// Test-only: a deliberately broken Disk Paxos on a block datastore.
    #[cfg(test)]
    pub(crate) broken_paxos: Option<crate::store::paxos::Flaw>,
    /// Test-only engine defect used to prove that the checker bites.
    #[cfg(test)]
    pub broken_engine_skip_s3: bool,
    #[cfg(test)]
    pub broken_engine_ignore_unprotect: bool,
    #[cfg(test)]
    pub broken_engine_restart_stopped: bool,
    #[cfg(test)]
    pub broken_engine_ignore_stop_notice: bool,
}

impl Default for WorldParams {
    fn default() -> Self {
        WorldParams {
            net_latency_ms: (1, 3),
            storage_latency_ms: (1, 8),
            storage_host_skew_ms: 0,
            start_ms: (350, 550),
            destroy_ms: (100, 300),
            guest_shutdown_ms: (2000, 8000),
            fence_ms: (200, 800),
            readiness_ms: (1000, 4000),
            boot_ms: 5000,
            disk_locks: true,
            repair_after_ms: None,
            registry_lag_ms: 0,
            #[cfg(test)]
            broken_paxos: None,
            #[cfg(test)]
            broken_engine_skip_s3: false,
            #[cfg(test)]
            broken_engine_ignore_unprotect: false,
            #[cfg(test)]
            broken_engine_restart_stopped: false,
            #[cfg(test)]
            broken_engine_ignore_stop_notice: false,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QemuState {
    Starting,
    Running,
    /// Arrived by a live migration, vCPUs stopped (VIR_MIGRATE_PAUSED):
    /// not running for S1 until resumed by a start.
    Paused,
}

#[derive(Clone, Debug)]
pub struct Qemu {
    pub state: QemuState,
    /// When its readiness condition starts to hold (guest agent up).
    pub ready_at: u64,
    /// Incremented per start, so stale completions are ignored.
    pub serial: u64,
}

pub struct SimHost {
    pub id: HostId,
    pub powered: bool,
    pub paused_since: Option<u64>,
    pub boot: BootId,
    /// Local monotonic clock = virtual time + offset (per boot).
    pub clock_offset: u64,
    pub node: Option<Node>,
    /// Bumps whenever the daemon dies, so its late results are dropped.
    pub daemon_epoch: u64,
    pub wake_at: Option<u64>,
    pub qemu: BTreeMap<DomainId, Qemu>,
    /// Virtual time at which the watchdog resets the host, once armed.
    pub watchdog_deadline: Option<u64>,
    pub storage_fault: Option<StorageFault>,
    /// Extra latency of this host's storage path.
    pub storage_skew_ms: u64,
    /// Storage requests blocked by a hang or a stall.
    pub held_ops: Vec<(u64, Action)>,
    /// Events that reached the host while it was paused.
    pub held_events: Vec<Ev>,
    pub isolated: bool,
    /// libvirtd does not answer; and qemu cannot even be killed.
    pub libvirt_hung: bool,
    pub qemu_stuck: bool,
    /// Starts asked of the hung libvirtd, which it may still carry out.
    pub pending_starts: BTreeSet<DomainId>,
    /// Issue time of the last slot write that succeeded (ground truth for S4).
    pub last_good_write_issue: Option<u64>,
    pub last_resume: Option<u64>,
    pub daemon_started_at: u64,
    /// A stop on purpose under way: whether the watchdog outlives the
    /// daemon, and whether a start waits for the stop (systemd runs a
    /// restart's start only after its stop has finished).
    pub stopping: Option<DaemonStopping>,
    /// The fault (time, class) that recoveries of this host's domains are measured from.
    pub active_fault: Option<(u64, &'static str)>,
}

#[derive(Clone, Copy, Debug)]
pub struct DaemonStopping {
    pub host_reset: bool,
    pub then_start: bool,
}

impl SimHost {
    pub fn running(&self) -> bool {
        self.powered && self.paused_since.is_none()
    }
}

/// Shared storage: the ground truth of every record.
#[derive(Default)]
pub struct Storage {
    pub slots: BTreeMap<HostId, Slot>,
    pub fenced: BTreeMap<HostId, FencedRecord>,
    pub assignments: BTreeMap<HostId, Assignments>,
    /// Fence requests (poison): target host -> the boot it targets.
    pub poison: BTreeMap<HostId, BootId>,
    pub leases: BTreeMap<LeaseKey, Lease>,
    pub stall_until: u64,
}

#[derive(Clone, Debug)]
pub enum Ev {
    Wake {
        host: HostId,
    },
    Deliver {
        to: HostId,
        msg: NetMessage,
    },
    StorageDo {
        host: HostId,
        epoch: u64,
        issued: u64,
        action: Action,
    },
    /// A storage answer that needs no apply (EIO).
    StorageResult {
        host: HostId,
        epoch: u64,
        input: Input,
    },
    QemuStarted {
        host: HostId,
        domain: DomainId,
        serial: u64,
    },
    QemuReady {
        host: HostId,
        domain: DomainId,
        serial: u64,
    },
    QemuStopped {
        host: HostId,
        domain: DomainId,
        serial: u64,
    },
    StartRefused {
        host: HostId,
        epoch: u64,
        domain: DomainId,
        cause: StartFailure,
    },
    FenceDone {
        host: HostId,
        epoch: u64,
        op: OpId,
        target: HostId,
        outcome: FenceOutcome,
    },
    IsolationAnswer {
        host: HostId,
        epoch: u64,
        reachable: bool,
    },
    Watchdog {
        host: HostId,
    },
    DaemonStart {
        host: HostId,
    },
    PowerOn {
        host: HostId,
    },
    StallEnd,
    /// A fence agent cuts the power (part of a fault episode, not a new one).
    FencePowerOff {
        target: HostId,
    },
    /// The host's daemon reads the registry (as it is then) and gives the
    /// engine the protected set; `adopt`: then the domain it just protected
    /// (DomainsAtStart, in the same turn of its loop). Waits while the host
    /// is paused, like everything else there.
    Registry {
        host: HostId,
        adopt: Option<DomainId>,
    },
    /// The daemon's periodic registry read (every REGISTRY_POLL_MS, as the
    /// real daemon's poller): it reaches the engine only when the host's
    /// storage answers reads. `epoch`: the daemon run it belongs to.
    RegistryPoll {
        host: HostId,
        epoch: u64,
    },
    /// A `protect` that waits for the host running the domain (attempt n).
    Protect {
        domain: DomainId,
        attempt: u32,
    },
    /// A live migration `from` -> `to` ends (libvirtd finishes it even if
    /// the daemon that asked died; its answer then goes nowhere).
    MigrationDone {
        from: HostId,
        epoch: u64,
        domain: DomainId,
        to: HostId,
        serial: u64,
    },
    /// A migration that failed: the domain stays on `from`.
    MigrationFailed {
        from: HostId,
        epoch: u64,
        domain: DomainId,
        why: &'static str,
    },
    /// Guest agents and operator starts (guest.rs).
    Guest(super::guest::GuestEv),
    /// The LUN of a block datastore and its drivers (block.rs).
    Block(super::block::BlockEv),
    Command(Command),
    Check,
}

#[derive(PartialEq, Eq, PartialOrd, Ord)]
struct Key(u64, u64);

pub struct World {
    pub now: u64,
    /// The cluster with the domains protected now (the registry).
    pub spec: Arc<ClusterSpec>,
    /// Every domain the cluster knows, protected or not.
    pub domains: BTreeMap<DomainId, DomainSpec>,
    /// When each protected domain was last protected (S4 counts from it).
    pub protected_at: BTreeMap<DomainId, u64>,
    /// Bumped by every protect and unprotect.
    pub registry_version: u64,
    /// The registry version each running daemon has been given: one that
    /// lags (paused) may still act on a domain unprotected meanwhile.
    pub registry_seen: BTreeMap<HostId, u64>,
    pub params: WorldParams,
    pub rng: Rng,
    seq: u64,
    queue: BinaryHeap<Reverse<(Key, usize)>>,
    slab: Vec<Option<Ev>>,
    free: Vec<usize>,
    pub hosts: BTreeMap<HostId, SimHost>,
    pub storage: Storage,
    /// The LUN, for a block datastore (`Storage::leases` is then its
    /// committed view); `None` for a dir datastore.
    pub block: Option<super::block::BlockDevice>,
    pub partitions: Vec<Vec<HostId>>,
    pub one_way: BTreeSet<(HostId, HostId)>,
    pub loss_percent: u8,
    /// Fence agents that do not work against a target, and how.
    pub fence_agents: BTreeMap<(HostId, String), AgentMode>,
    pub broken_domains: BTreeSet<DomainId>,
    pub log: Vec<String>,
    /// Keep only about this many log lines (random runs); None keeps all.
    pub log_cap: Option<usize>,
    pub checker: Checker,
    pub events_processed: u64,
    /// Which guests hang (guest.rs).
    pub guests: super::guest::Guests,
}

/// The fence agent name that means a storage poison request.
pub const STORAGE_FENCE_AGENT: &str = "storage";
/// Events at one virtual instant before the run counts as a livelock.
pub const MAX_EVENTS_PER_INSTANT: u64 = 100_000;
/// A host reset by its watchdog is back (booting) after this long.
pub const WATCHDOG_REBOOT_MS: u64 = 30_000;
/// Period of the ground-truth invariant checks.
pub const CHECK_INTERVAL_MS: u64 = 100;
/// The daemon re-reads the registry this often (daemon::REGISTRY_POLL).
pub const REGISTRY_POLL_MS: u64 = 2_000;

impl World {
    pub fn new(setup: &SimSetup, params: WorldParams) -> World {
        let mut protected = setup.spec.clone();
        protected.domains.retain(|d, _| !setup.unprotected.contains(d));
        let spec = Arc::new(protected);
        let mut rng = Rng::new(setup.seed);
        let mut hosts = BTreeMap::new();
        for hs in &spec.hosts {
            // Drawn and dropped: the ids are stable (`sim_boot_id`), the
            // seed's stream stays the one every campaign has run.
            let _ = rng.next_u64();
            let boot = sim_boot_id(hs.id, 1);
            let clock_offset = rng.range(1_000_000, 1_000_000_000);
            let storage_skew_ms = rng.range(0, params.storage_host_skew_ms);
            hosts.insert(
                hs.id,
                SimHost {
                    id: hs.id,
                    powered: true,
                    paused_since: None,
                    boot,
                    clock_offset,
                    node: None,
                    daemon_epoch: 0,
                    wake_at: None,
                    qemu: BTreeMap::new(),
                    watchdog_deadline: None,
                    storage_fault: None,
                    storage_skew_ms,
                    held_ops: Vec::new(),
                    held_events: Vec::new(),
                    isolated: false,
                    libvirt_hung: false,
                    qemu_stuck: false,
                    pending_starts: BTreeSet::new(),
                    last_good_write_issue: None,
                    last_resume: None,
                    daemon_started_at: 0,
                    stopping: None,
                    active_fault: None,
                },
            );
        }
        // The checker knows every domain's policy (readiness ordering).
        let checker = Checker::new(Arc::new(setup.spec.clone()));
        let mut w = World {
            now: 0,
            spec,
            domains: setup.spec.domains.clone(),
            protected_at: BTreeMap::new(),
            registry_version: 0,
            registry_seen: BTreeMap::new(),
            params,
            rng,
            seq: 0,
            queue: BinaryHeap::new(),
            slab: Vec::new(),
            free: Vec::new(),
            hosts,
            storage: Storage::default(),
            block: None,
            partitions: Vec::new(),
            one_way: BTreeSet::new(),
            loss_percent: 0,
            fence_agents: BTreeMap::new(),
            broken_domains: BTreeSet::new(),
            log: Vec::new(),
            log_cap: None,
            checker,
            events_processed: 0,
            guests: Default::default(),
        };
        if setup.datastore == super::block::DatastoreKind::Block {
            let max_host = w.hosts.keys().copied().max().unwrap_or(HostId(0));
            #[allow(unused_mut)]
            let mut dev = super::block::BlockDevice::new(&w.spec.name, max_host, setup.seed);
            #[cfg(test)]
            {
                dev.flaw = w.params.broken_paxos;
            }
            w.block = Some(dev);
        }
        w.place_initial(setup);
        w.block_place_initial();
        let ids: Vec<HostId> = w.hosts.keys().copied().collect();
        for h in ids {
            w.start_daemon(h);
        }
        w.schedule(CHECK_INTERVAL_MS, Ev::Check);
        w
    }

    /// Time zero: domains run where the setup says, and the protected ones
    /// hold their leases (an unprotected one has none yet).
    fn place_initial(&mut self, setup: &SimSetup) {
        for (d, h) in &setup.initial {
            let Some(host) = self.hosts.get_mut(h) else {
                continue;
            };
            host.qemu.insert(*d, Qemu { state: QemuState::Running, ready_at: 0, serial: 0 });
            if setup.unprotected.contains(d) {
                continue;
            }
            let owner = Owner { host: *h, boot: host.boot };
            let lease = Lease { owner: Some(owner), generation: 1, reason: LeaseReason::Acquired };
            self.storage.leases.insert(LeaseKey::Domain(*d), lease);
        }
        for d in self.spec.domains.keys() {
            self.storage.leases.entry(LeaseKey::Domain(*d)).or_insert(Lease {
                owner: None,
                generation: 0,
                reason: LeaseReason::Acquired,
            });
        }
        self.storage
            .leases
            .insert(LeaseKey::Master, Lease { owner: None, generation: 0, reason: LeaseReason::Acquired });
    }

    // ---- event queue ---------------------------------------------------

    pub fn schedule(&mut self, delay_ms: u64, ev: Ev) {
        self.schedule_at(self.now + delay_ms, ev);
    }

    pub fn schedule_at(&mut self, at: u64, ev: Ev) {
        self.seq += 1;
        let idx = match self.free.pop() {
            Some(i) => {
                self.slab[i] = Some(ev);
                i
            }
            None => {
                self.slab.push(Some(ev));
                self.slab.len() - 1
            }
        };
        self.queue.push(Reverse((Key(at.max(self.now), self.seq), idx)));
    }

    /// Run every event up to and including `until` (virtual ms).
    pub fn run_until(&mut self, until: u64) {
        let mut same_instant = 0u64;
        while let Some(Reverse((Key(at, _), idx))) = self.queue.peek() {
            let (at, idx) = (*at, *idx);
            if at > until {
                break;
            }
            same_instant = if at == self.now { same_instant + 1 } else { 0 };
            if same_instant > MAX_EVENTS_PER_INSTANT {
                // Time must move: an engine that keeps asking for work at
                // the same instant is a livelock.
                self.livelock();
                break;
            }
            self.queue.pop();
            let Some(ev) = self.slab[idx].take() else {
                continue;
            };
            self.free.push(idx);
            self.now = at;
            self.events_processed += 1;
            self.handle(ev);
        }
        self.now = until;
    }

    fn handle(&mut self, ev: Ev) {
        if let Some(h) = ev_host(&ev)
            && self.hosts.get(&h).is_some_and(|x| x.powered && x.paused_since.is_some())
        {
            // A frozen host processes nothing; it catches up on resume.
            if let Some(x) = self.hosts.get_mut(&h)
                && !matches!(ev, Ev::Deliver { .. })
            {
                x.held_events.push(ev);
            }
            return;
        }
        match ev {
            Ev::Wake { host } => self.wake(host),
            Ev::Deliver { to, msg } => self.input(to, Input::Net(msg)),
            Ev::StorageDo { host, epoch, issued, action } => self.storage_do(host, epoch, issued, action),
            Ev::StorageResult { host, epoch, input } => {
                if self.epoch(host) == Some(epoch) {
                    self.input(host, input);
                }
            }
            Ev::QemuStarted { host, domain, serial } => self.qemu_started(host, domain, serial),
            Ev::QemuReady { host, domain, serial } => {
                if self.qemu_serial(host, domain) == Some(serial) {
                    self.input(host, Input::Domain { domain, event: DomainEvent::Ready });
                }
            }
            Ev::QemuStopped { host, domain, serial } => {
                if self.qemu_serial(host, domain) == Some(serial) {
                    self.qemu_gone(host, domain);
                    self.input(host, Input::Domain { domain, event: DomainEvent::Stopped });
                }
            }
            Ev::StartRefused { host, epoch, domain, cause } => {
                if self.epoch(host) == Some(epoch) {
                    self.input(host, Input::Domain { domain, event: DomainEvent::StartFailed { cause } });
                }
            }
            Ev::FenceDone { host, epoch, op, target, outcome } => {
                if self.epoch(host) == Some(epoch) {
                    self.input(host, Input::Fence { op, target, outcome });
                }
            }
            Ev::IsolationAnswer { host, epoch, reachable } => {
                if self.epoch(host) == Some(epoch) {
                    self.input(host, Input::IsolationProbe { reachable });
                }
            }
            Ev::Watchdog { host } => self.watchdog_check(host),
            Ev::DaemonStart { host } => self.start_daemon(host),
            Ev::PowerOn { host } => self.power_on(host),
            Ev::StallEnd => self.stall_end(),
            Ev::FencePowerOff { target } => {
                self.log_sim(&format!("fence agent powers off {target}"));
                self.power_off(target, "fenced");
            }
            Ev::Registry { host, adopt } => self.registry_read(host, adopt),
            Ev::RegistryPoll { host, epoch } => self.registry_poll(host, epoch),
            Ev::Protect { domain, attempt } => self.protect(domain, None, attempt),
            Ev::MigrationDone { from, epoch, domain, to, serial } => {
                self.migration_done(from, epoch, domain, to, serial)
            }
            Ev::MigrationFailed { from, epoch, domain, why } => {
                if self.epoch(from) == Some(epoch) {
                    let running_here = self.hosts[&from].qemu.contains_key(&domain);
                    let result = Err(why.to_string());
                    self.input(from, Input::Migrated { domain, result, running_here });
                }
            }
            Ev::Guest(g) => self.guest_event(g),
            Ev::Block(e) => self.block_event(e),
            Ev::Command(c) => self.apply_command(c),
            Ev::Check => {
                self.check_invariants();
                self.schedule(CHECK_INTERVAL_MS, Ev::Check);
            }
        }
    }

    pub(super) fn epoch(&self, h: HostId) -> Option<u64> {
        self.hosts.get(&h).filter(|x| x.node.is_some()).map(|x| x.daemon_epoch)
    }

    fn qemu_serial(&self, h: HostId, d: DomainId) -> Option<u64> {
        self.hosts.get(&h).and_then(|x| x.qemu.get(&d)).map(|q| q.serial)
    }

    /// A domain's name, protected or not.
    pub fn domain_name(&self, d: DomainId) -> String {
        self.domains.get(&d).map_or_else(|| self.spec.domain_name(d), |s| s.name.clone())
    }

    pub fn local_now(&self, h: HostId) -> Instant {
        Instant(self.now + self.hosts[&h].clock_offset)
    }

    // ---- driving the engines ------------------------------------------

    /// Hand an input to the host's daemon, if it runs.
    pub fn deliver(&mut self, h: HostId, input: Input) {
        self.input(h, input);
    }

    fn input(&mut self, h: HostId, input: Input) {
        let now = self.local_now(h);
        let Some(node) = self.hosts.get_mut(&h).and_then(|x| x.node.as_mut()) else {
            return;
        };
        node.handle_input(now, input);
        self.drain(h);
    }

    fn wake(&mut self, h: HostId) {
        let Some(host) = self.hosts.get_mut(&h) else {
            return;
        };
        if host.wake_at != Some(self.now) {
            if host.wake_at.is_some_and(|w| w < self.now) {
                host.wake_at = None;
            } else {
                return;
            }
        }
        host.wake_at = None;
        let now = self.local_now(h);
        let Some(node) = self.hosts.get_mut(&h).and_then(|x| x.node.as_mut()) else {
            return;
        };
        node.handle_timeout(now);
        self.drain(h);
    }

    /// Execute every action the node asks for, then re-arm its timer.
    fn drain(&mut self, h: HostId) {
        loop {
            let action = {
                let Some(node) = self.hosts.get_mut(&h).and_then(|x| x.node.as_mut()) else {
                    return;
                };
                node.poll_action()
            };
            let Some(a) = action else { break };
            self.execute(h, a);
        }
        let Some(host) = self.hosts.get_mut(&h) else {
            return;
        };
        let Some(node) = host.node.as_ref() else {
            return;
        };
        let at = node.poll_timeout().0.saturating_sub(host.clock_offset).max(self.now);
        if host.wake_at.is_none_or(|w| at < w) {
            host.wake_at = Some(at);
            self.schedule_at(at, Ev::Wake { host: h });
        }
    }

    fn execute(&mut self, h: HostId, a: Action) {
        match a {
            Action::Send { to, msg } => self.send(h, to, msg),
            Action::ReadLease { .. } | Action::CasLease { .. } if self.block.is_some() => self.block_submit(h, a),
            Action::WriteSlot { .. }
            | Action::ReadStorage { .. }
            | Action::ReadLease { .. }
            | Action::CasLease { .. }
            | Action::WriteFenced { .. }
            | Action::WriteAssignments { .. } => self.storage_submit(h, a),
            Action::StartDomain { domain } if self.hosts[&h].libvirt_hung => {
                // libvirt's keepalive closes the connection and the call
                // fails; libvirtd keeps the request and may still carry it
                // out when it answers again (`libvirt_answers`).
                let epoch = self.hosts[&h].daemon_epoch;
                let after = self.spec.timings.io_timeout.as_millis();
                if let Some(x) = self.hosts.get_mut(&h) {
                    x.pending_starts.insert(domain);
                }
                self.schedule(after, Ev::StartRefused { host: h, epoch, domain, cause: StartFailure::HypervisorDown });
            }
            Action::StartDomain { domain } => self.qemu_start(h, domain),
            Action::DestroyDomain { domain, kill } => {
                self.checker_on_stop(h, domain);
                let x = &self.hosts[&h];
                if (!kill && x.libvirt_hung) || (kill && x.qemu_stuck) {
                    // No answer: the engine's own timeouts take over (kill
                    // after io_timeout, then the watchdog).
                    return;
                }
                let (lo, hi) = if kill { (5, 20) } else { self.params.destroy_ms };
                let delay = self.rng.range(lo, hi);
                if let Some(serial) = self.qemu_serial(h, domain) {
                    self.schedule(delay, Ev::QemuStopped { host: h, domain, serial });
                } else {
                    // Already gone: libvirt answers "not running" at once.
                    self.input(h, Input::Domain { domain, event: DomainEvent::Stopped });
                }
            }
            Action::ShutdownDomain { domain, .. } => {
                self.checker_on_stop(h, domain);
                if self.hosts[&h].libvirt_hung {
                    return;
                }
                let (lo, hi) = self.params.guest_shutdown_ms;
                let delay = self.rng.range(lo, hi);
                if let Some(serial) = self.qemu_serial(h, domain) {
                    self.schedule(delay, Ev::QemuStopped { host: h, domain, serial });
                }
            }
            Action::Stopped { written } => self.daemon_stopped(h, written),
            Action::MigrateDomain { domain, to } => self.migrate(h, domain, to),
            Action::Fence { op, target, agent } => self.fence(h, op, target, agent),
            Action::ProbeIsolation => {
                let reachable = !self.hosts[&h].isolated;
                let epoch = self.hosts[&h].daemon_epoch;
                let delay = if reachable { 2 } else { 1000 };
                self.schedule(delay, Ev::IsolationAnswer { host: h, epoch, reachable });
            }
            Action::ProbeReadiness { domain, .. } => {
                let ready = self.hosts[&h]
                    .qemu
                    .get(&domain)
                    .is_some_and(|q| q.state == QemuState::Running && q.ready_at <= self.now)
                    && !self.guest_hung(h, domain);
                if ready {
                    let serial = self.hosts[&h].qemu[&domain].serial;
                    self.schedule(5, Ev::QemuReady { host: h, domain, serial });
                }
            }
            Action::PingGuestAgent { .. } | Action::ResetDomain { .. } => self.execute_guest_action(h, a),
            Action::PetWatchdog => {
                if self.spec.host(h).is_some_and(|s| s.watchdog) {
                    let deadline = self.now + self.spec.timings.watchdog_timeout.as_millis();
                    if let Some(host) = self.hosts.get_mut(&h) {
                        host.watchdog_deadline = Some(deadline);
                    }
                    self.schedule_at(deadline, Ev::Watchdog { host: h });
                }
            }
            Action::Emit(ev) => {
                let who = format!("{}/{}", ev.host, ev.role);
                self.log_at("info", &who, &ev.text);
            }
        }
    }

    /// One fixed-width log line: level, sim time, host/role, message. No
    /// wall time and no hash order, so a seed's log is byte-for-byte stable.
    pub fn log_at(&mut self, level: &str, who: &str, text: &str) {
        let t = self.now;
        self.log.push(format!("{level:<5} {:>5}.{:03} {who:<9} {text}", t / 1000, t % 1000));
        if let Some(cap) = self.log_cap
            && self.log.len() > cap * 2
        {
            self.log.drain(..self.log.len() - cap);
        }
    }

    pub fn log_sim(&mut self, text: &str) {
        self.log_at("fault", "sim", text);
    }

    // ---- network ------------------------------------------------------

    fn link_up(&mut self, from: HostId, to: HostId) -> bool {
        let (a, b) = (&self.hosts[&from], &self.hosts[&to]);
        if a.isolated || b.isolated || self.one_way.contains(&(from, to)) {
            return false;
        }
        let group = |h: HostId| self.partitions.iter().position(|g| g.contains(&h));
        if let (Some(x), Some(y)) = (group(from), group(to))
            && x != y
        {
            return false;
        }
        !(self.loss_percent > 0 && self.rng.chance(u64::from(self.loss_percent)))
    }

    fn send(&mut self, from: HostId, to: Option<HostId>, msg: NetMessage) {
        let targets: Vec<HostId> = match to {
            Some(t) => vec![t],
            None => self.hosts.keys().copied().filter(|h| *h != from).collect(),
        };
        for t in targets {
            if !self.link_up(from, t) {
                continue;
            }
            let (lo, hi) = self.params.net_latency_ms;
            let delay = self.rng.range(lo, hi);
            self.schedule(delay, Ev::Deliver { to: t, msg: msg.clone() });
        }
    }

    // ---- storage ------------------------------------------------------

    fn storage_submit(&mut self, h: HostId, a: Action) {
        let host = &self.hosts[&h];
        let epoch = host.daemon_epoch;
        let issued = self.now;
        match host.storage_fault {
            Some(StorageFault::ReadOnly) if !is_storage_read(&a) => {
                let delay = self.rng.range(1, 5);
                if let Some(input) = failed_result(&a) {
                    self.schedule(delay, Ev::StorageResult { host: h, epoch, input });
                }
            }
            Some(StorageFault::Fail) => {
                let delay = self.rng.range(1, 5);
                if let Some(input) = failed_result(&a) {
                    self.schedule(delay, Ev::StorageResult { host: h, epoch, input });
                }
            }
            Some(StorageFault::Hang) => {
                if let Some(x) = self.hosts.get_mut(&h) {
                    x.held_ops.push((issued, a));
                }
            }
            Some(StorageFault::ReadOnly) | None if self.storage.stall_until > self.now => {
                if let Some(x) = self.hosts.get_mut(&h) {
                    x.held_ops.push((issued, a));
                }
            }
            Some(StorageFault::ReadOnly) | None => {
                let delay = self.storage_delay(h);
                self.schedule(delay, Ev::StorageDo { host: h, epoch, issued, action: a });
            }
        }
    }

    fn storage_delay(&mut self, h: HostId) -> u64 {
        let (lo, hi) = self.params.storage_latency_ms;
        self.rng.range(lo, hi) + self.hosts.get(&h).map_or(0, |x| x.storage_skew_ms)
    }

    /// Release storage requests held by a hang or a stall, in issue order.
    pub fn release_held(&mut self, h: HostId) {
        let held = self.hosts.get_mut(&h).map(|x| std::mem::take(&mut x.held_ops)).unwrap_or_default();
        let epoch = self.hosts[&h].daemon_epoch;
        for (issued, a) in held {
            let delay = self.storage_delay(h);
            self.schedule(delay, Ev::StorageDo { host: h, epoch, issued, action: a });
        }
        self.block_release(h);
    }

    fn stall_end(&mut self) {
        if self.storage.stall_until > self.now {
            return;
        }
        let ids: Vec<HostId> = self.hosts.keys().copied().collect();
        for h in ids {
            if self.hosts[&h].storage_fault.is_none() {
                self.release_held(h);
            }
        }
    }

    /// Apply one storage request at this instant and answer the daemon.
    fn storage_do(&mut self, h: HostId, epoch: u64, issued: u64, action: Action) {
        if !self.hosts[&h].powered {
            // On a LUN a write already sent lands although its host died
            // (block.rs); an NFS client's unsent page is lost with it.
            let own_boot = self.hosts[&h].daemon_epoch == epoch + 1;
            if self.block.is_some() && own_boot && !is_storage_read(&action) {
                let _ = self.apply_storage(h, issued, action);
            }
            return;
        }
        let input = self.apply_storage(h, issued, action);
        if let Some(input) = input
            && self.epoch(h) == Some(epoch)
        {
            self.input(h, input);
        }
    }

    pub(super) fn apply_storage(&mut self, h: HostId, issued: u64, action: Action) -> Option<Input> {
        match action {
            Action::WriteSlot { op, slot } => {
                self.storage.slots.insert(h, slot);
                let host = self.hosts.get_mut(&h)?;
                if host.last_good_write_issue.is_none_or(|l| l < issued) {
                    host.last_good_write_issue = Some(issued);
                }
                Some(Input::SlotWritten { op, result: Ok(()) })
            }
            Action::ReadStorage { op } => {
                let snap = StorageSnapshot {
                    slots: self.storage.slots.iter().filter(|(k, _)| **k != h).map(|(k, v)| (*k, v.clone())).collect(),
                    fenced: self.storage.fenced.clone(),
                    assignments: self.storage.assignments.get(&h).cloned().unwrap_or_default(),
                    poison: self.storage.poison.get(&h).copied(),
                    rejected_records: 0,
                };
                Some(Input::StorageRead { op, result: Ok(snap) })
            }
            Action::ReadLease { op, key } => {
                let l = self.storage.leases.get(&key).copied().unwrap_or(Lease {
                    owner: None,
                    generation: 0,
                    reason: LeaseReason::Acquired,
                });
                Some(Input::LeaseRead { op, key, result: Ok(l) })
            }
            Action::CasLease { op, key, expect_generation, new } => {
                let cur = self.storage.leases.get(&key).copied().unwrap_or(Lease {
                    owner: None,
                    generation: 0,
                    reason: LeaseReason::Acquired,
                });
                if cur.generation != expect_generation {
                    return Some(Input::LeaseCas { op, key, result: Ok(CasOutcome::Conflict(cur)) });
                }
                self.lease_changed(h, key, cur, new);
                self.storage.leases.insert(key, new);
                Some(Input::LeaseCas { op, key, result: Ok(CasOutcome::Done(new)) })
            }
            Action::WriteFenced { op, record } => {
                self.storage.fenced.insert(record.host, record);
                Some(Input::RecordWritten { op, result: Ok(()) })
            }
            Action::WriteAssignments { op, host, assignments } => {
                self.storage.assignments.insert(host, assignments);
                Some(Input::RecordWritten { op, result: Ok(()) })
            }
            _ => None,
        }
    }

    // ---- hypervisor ---------------------------------------------------

    fn qemu_start(&mut self, h: HostId, d: DomainId) {
        self.checker_on_start(h, d);
        let epoch = self.hosts[&h].daemon_epoch;
        if self.hosts[&h].qemu.contains_key(&d) {
            // Already running here: libvirt says so; treat as started. A
            // domain paused by an incoming migration is resumed.
            if let Some(q) = self.hosts.get_mut(&h).and_then(|x| x.qemu.get_mut(&d))
                && q.state == QemuState::Paused
            {
                q.state = QemuState::Running;
                self.check_s1(d);
            }
            let serial = self.hosts[&h].qemu[&d].serial;
            self.schedule(1, Ev::QemuStarted { host: h, domain: d, serial });
            return;
        }
        if self.broken_domains.contains(&d) {
            self.schedule(200, Ev::StartRefused { host: h, epoch, domain: d, cause: StartFailure::Refused });
            return;
        }
        let locked =
            self.params.disk_locks && self.hosts.values().any(|x| x.id != h && x.powered && x.qemu.contains_key(&d));
        if locked {
            self.schedule(50, Ev::StartRefused { host: h, epoch, domain: d, cause: StartFailure::DisksLocked });
            return;
        }
        self.seq += 1;
        let serial = self.seq;
        if let Some(x) = self.hosts.get_mut(&h) {
            x.qemu.insert(d, Qemu { state: QemuState::Starting, ready_at: u64::MAX, serial });
        }
        self.check_s1(d);
        let (lo, hi) = self.params.start_ms;
        let delay = self.rng.range(lo, hi);
        self.schedule(delay, Ev::QemuStarted { host: h, domain: d, serial });
    }

    fn qemu_started(&mut self, h: HostId, d: DomainId, serial: u64) {
        if self.qemu_serial(h, d) != Some(serial) {
            return;
        }
        let (lo, hi) = self.params.readiness_ms;
        let ready_at = self.now + self.rng.range(lo, hi);
        if let Some(q) = self.hosts.get_mut(&h).and_then(|x| x.qemu.get_mut(&d)) {
            q.state = QemuState::Running;
            q.ready_at = ready_at;
        }
        self.checker.domain_running(self.now, d);
        let tracked = self.hosts[&h].node.as_ref().is_some_and(|n| n.local_domains().contains_key(&d));
        if tracked {
            self.input(h, Input::Domain { domain: d, event: DomainEvent::Started });
        } else {
            // As the daemon does: a protected domain started behind its
            // back is adopted, which destroys it unless the lease is ours.
            self.input(h, Input::DomainsAtStart(vec![d]));
        }
    }

    /// libvirtd answers again and works off what it was asked while hung:
    /// every start it kept runs now, although its caller has long been told
    /// the call failed (the worst case for the engine).
    pub fn libvirt_answers(&mut self, h: HostId) {
        let pending = self.hosts.get_mut(&h).map(|x| std::mem::take(&mut x.pending_starts)).unwrap_or_default();
        for d in pending {
            if self.hosts[&h].powered {
                self.log_sim(&format!("libvirtd on {h} carries out its late start of {}", self.domain_name(d)));
                self.qemu_start(h, d);
            }
        }
    }

    /// qemu of `d` on `h` is gone (destroyed, crashed, or host power loss).
    pub fn qemu_gone(&mut self, h: HostId, d: DomainId) {
        let fault = self.hosts.get_mut(&h).and_then(|x| {
            // A paused incoming copy never ran here: nothing is lost.
            let q = x.qemu.remove(&d)?;
            (q.state != QemuState::Paused).then_some(x.active_fault)
        });
        if let Some(Some((at, class))) = fault
            && self.spec.domains.contains_key(&d)
        {
            let others_healthy = self.hosts.values().all(|x| x.id == h || (x.running() && x.node.is_some()));
            self.checker.domain_lost(d, at, class, others_healthy);
        }
    }

    // ---- live migration -----------------------------------------------

    /// `Action::MigrateDomain`: as libvirt's peer-to-peer live migration
    /// with VIR_MIGRATE_PAUSED. It fails when the domain does not run on
    /// `from`, or `to` is off, frozen, unreachable or its libvirtd hangs, and
    /// at random; else the domain leaves `from` and waits paused on `to`.
    fn migrate(&mut self, from: HostId, d: DomainId, to: HostId) {
        let epoch = self.hosts[&from].daemon_epoch;
        let fail = |why| Ev::MigrationFailed { from, epoch, domain: d, why };
        let running = self.hosts[&from].qemu.get(&d).filter(|q| q.state == QemuState::Running).map(|q| q.serial);
        let Some(serial) = running else {
            self.schedule(10, fail("domain is not running"));
            return;
        };
        let target_ok = self.hosts.get(&to).is_some_and(|x| x.running() && !x.libvirt_hung) && self.link_up(from, to);
        if self.hosts[&from].libvirt_hung {
            return; // no answer; the daemon's call would time out (not modelled)
        }
        if !target_ok {
            self.schedule(1_000, fail("cannot reach the target's libvirtd"));
            return;
        }
        if self.rng.chance(10) {
            let delay = self.rng.range(200, 1_500);
            self.schedule(delay, fail("migration job failed"));
            return;
        }
        let delay = self.rng.range(300, 2_000);
        self.schedule(delay, Ev::MigrationDone { from, epoch, domain: d, to, serial });
    }

    fn migration_done(&mut self, from: HostId, epoch: u64, d: DomainId, to: HostId, serial: u64) {
        let source_ok = self.hosts.get(&from).is_some_and(|x| x.powered) && self.qemu_serial(from, d) == Some(serial);
        let target_ok = self.hosts.get(&to).is_some_and(|x| x.powered && !x.qemu.contains_key(&d));
        if !source_ok {
            // The source's qemu went (or the host died): the job is aborted,
            // and libvirt's migrate call fails for the daemon that asked.
            // (Answered here, late; a qemu started since means the daemon
            // already handled the stop, and the answer of this old job
            // must not look like that of a newer migration.)
            if self.epoch(from) == Some(epoch) && self.qemu_serial(from, d).is_none() {
                let result = Err("the domain's qemu went away".to_string());
                self.input(from, Input::Migrated { domain: d, result, running_here: false });
            }
            return;
        }
        if !target_ok {
            if self.epoch(from) == Some(epoch) {
                let result = Err("target went away".to_string());
                self.input(from, Input::Migrated { domain: d, result, running_here: true });
            }
            return;
        }
        self.log_sim(&format!("{} migrated {from} -> {to} (paused there)", self.domain_name(d)));
        if let Some(x) = self.hosts.get_mut(&from) {
            x.qemu.remove(&d);
        }
        self.seq += 1;
        let serial = self.seq;
        if let Some(x) = self.hosts.get_mut(&to) {
            x.qemu.insert(d, Qemu { state: QemuState::Paused, ready_at: u64::MAX, serial });
        }
        self.input(to, Input::Incoming { domain: d });
        match self.epoch(from) {
            Some(e) if e == epoch => {
                self.input(from, Input::Migrated { domain: d, result: Ok(()), running_here: false })
            }
            // The daemon that asked restarted meanwhile: the new one knows
            // nothing of the job and, as from libvirt, gets only the
            // source's STOPPED/MIGRATED event.
            Some(_) => self.input(from, Input::Domain { domain: d, event: DomainEvent::Stopped }),
            None => {}
        }
    }

    // ---- fencing, watchdog, power -------------------------------------

    fn fence(&mut self, from: HostId, op: OpId, target: HostId, agent: String) {
        let epoch = self.hosts[&from].daemon_epoch;
        self.checker_on_fence(from, target);
        if agent == STORAGE_FENCE_AGENT {
            // Poison: written to storage for the target to obey; never a
            // confirmation (only S3(b) confirms it), as the daemon's agent.
            let boot = self.hosts[&target].boot;
            self.storage.poison.insert(target, boot);
            self.schedule(5, Ev::FenceDone { host: from, epoch, op, target, outcome: FenceOutcome::Requested });
            return;
        }
        match self.fence_agents.get(&(target, agent.clone())) {
            Some(AgentMode::Fails) => {
                let delay = self.rng.range(500, 1500);
                self.schedule(delay, Ev::FenceDone { host: from, epoch, op, target, outcome: FenceOutcome::Failed });
                return;
            }
            // No answer ever: the engine's fence_timeout ends the attempt.
            Some(AgentMode::Hangs) => return,
            _ => {}
        }
        let (lo, hi) = self.params.fence_ms;
        let delay = self.rng.range(lo, hi);
        // The BMC cuts power before the agent's status poll confirms it.
        let cut = delay / 2;
        self.schedule(cut, Ev::FencePowerOff { target });
        self.schedule(delay, Ev::FenceDone { host: from, epoch, op, target, outcome: FenceOutcome::Confirmed });
        if let Some((lo, hi)) = self.params.repair_after_ms {
            let back = self.rng.range(lo, hi);
            self.schedule(back, Ev::PowerOn { host: target });
        }
    }

    fn watchdog_check(&mut self, h: HostId) {
        let Some(host) = self.hosts.get(&h) else {
            return;
        };
        if !host.running() || host.watchdog_deadline.is_none_or(|d| d > self.now) {
            return;
        }
        self.log_sim(&format!("watchdog resets {h}"));
        self.power_off(h, "watchdog");
        self.schedule(WATCHDOG_REBOOT_MS, Ev::PowerOn { host: h });
    }

    pub fn power_off(&mut self, h: HostId, class_hint: &'static str) {
        let Some(host) = self.hosts.get_mut(&h) else {
            return;
        };
        if !host.powered {
            return;
        }
        if host.active_fault.is_none() {
            host.active_fault = Some((self.now, class_hint));
        }
        host.powered = false;
        host.paused_since = None;
        host.node = None;
        host.stopping = None;
        host.daemon_epoch += 1;
        host.wake_at = None;
        host.watchdog_deadline = None;
        let held = std::mem::take(&mut host.held_ops);
        host.held_events.clear();
        host.pending_starts.clear();
        let doms: Vec<DomainId> = host.qemu.keys().copied().collect();
        self.block_power_off(h, held);
        for d in doms {
            self.qemu_gone(h, d);
        }
        self.checker.host_down(h, self.now);
    }

    pub fn power_on(&mut self, h: HostId) {
        let _ = self.rng.next_u64();
        let boot = sim_boot_id(h, self.hosts.get(&h).map_or(1, |x| (x.boot & 0xffff) + 1));
        let offset = self.rng.range(1_000_000, 1_000_000_000);
        let Some(host) = self.hosts.get_mut(&h) else {
            return;
        };
        if host.powered {
            return;
        }
        host.powered = true;
        host.boot = boot;
        host.clock_offset = offset;
        host.active_fault = None;
        host.last_good_write_issue = None;
        host.libvirt_hung = false;
        host.qemu_stuck = false;
        self.log_sim(&format!("{h} boots"));
        let delay = self.params.boot_ms;
        self.schedule(delay, Ev::DaemonStart { host: h });
    }

    pub fn start_daemon(&mut self, h: HostId) {
        let (boot, epoch, domains) = {
            let Some(host) = self.hosts.get_mut(&h) else {
                return;
            };
            if let Some(s) = host.stopping.as_mut() {
                s.then_start = true;
                return;
            }
            if !host.powered || host.node.is_some() {
                return;
            }
            host.daemon_epoch += 1;
            host.daemon_started_at = self.now;
            (host.boot, host.daemon_epoch, host.qemu.keys().copied().collect::<Vec<_>>())
        };
        let _ = self.rng.next_u64();
        let incarnation = (u64::from(h.0) << 16) | epoch;
        let cfg = NodeConfig {
            host: h,
            boot,
            incarnation,
            spec: self.spec.clone(),
            rng_seed: self.rng.next_u64(),
            maintenance: self.storage.slots.get(&h).is_some_and(|s| s.maintenance),
            #[cfg(test)]
            broken_skip_s3: self.params.broken_engine_skip_s3,
        };
        let now = self.local_now(h);
        #[allow(unused_mut)]
        let mut node = Node::new(cfg, now);
        #[cfg(test)]
        if self.params.broken_engine_ignore_unprotect {
            node.break_ignore_unprotect();
        }
        #[cfg(test)]
        if self.params.broken_engine_ignore_stop_notice {
            node.break_ignore_stop_notice();
        }
        #[cfg(test)]
        if self.params.broken_engine_restart_stopped {
            node.break_restart_stopped();
        }
        self.registry_seen.insert(h, self.registry_version);
        if let Some(host) = self.hosts.get_mut(&h) {
            host.node = Some(node);
            host.wake_at = None;
        }
        self.input(h, Input::DomainsAtStart(domains));
        self.schedule(REGISTRY_POLL_MS, Ev::RegistryPoll { host: h, epoch });
    }

    /// One periodic registry read of host `h`'s daemon run `epoch`.
    fn registry_poll(&mut self, h: HostId, epoch: u64) {
        let Some(host) = self.hosts.get(&h) else { return };
        if host.daemon_epoch != epoch || host.node.is_none() {
            return;
        }
        let reads_work =
            matches!(host.storage_fault, None | Some(StorageFault::ReadOnly)) && self.storage.stall_until <= self.now;
        if reads_work {
            self.registry_read(h, None);
        }
        self.schedule(REGISTRY_POLL_MS, Ev::RegistryPoll { host: h, epoch });
    }

    pub fn pause(&mut self, h: HostId) {
        if let Some(x) = self.hosts.get_mut(&h)
            && x.running()
        {
            x.paused_since = Some(self.now);
            if x.active_fault.is_none() {
                x.active_fault = Some((self.now, "pause"));
            }
        }
    }

    pub fn resume(&mut self, h: HostId) {
        let Some(x) = self.hosts.get_mut(&h) else {
            return;
        };
        let Some(since) = x.paused_since.take() else {
            return;
        };
        // The (virtual) watchdog was frozen with the host.
        if let Some(d) = x.watchdog_deadline.as_mut() {
            *d += self.now - since;
        }
        x.last_resume = Some(self.now);
        let held = std::mem::take(&mut x.held_events);
        let deadline = x.watchdog_deadline;
        for ev in held {
            self.schedule(0, ev);
        }
        if let Some(d) = deadline {
            self.schedule_at(d, Ev::Watchdog { host: h });
        }
        self.schedule(0, Ev::Wake { host: h });
        if let Some(x) = self.hosts.get_mut(&h) {
            x.wake_at = Some(self.now);
        }
        let doms: Vec<DomainId> = self.hosts[&h].qemu.keys().copied().collect();
        for d in doms {
            self.check_s1(d);
        }
    }

    /// SIGTERM: the engine writes its stop notice, then `daemon_stopped`.
    pub fn stop_daemon(&mut self, h: HostId, host_reset: bool) {
        let Some(x) = self.hosts.get_mut(&h) else {
            return;
        };
        if x.node.is_none() || x.stopping.is_some() {
            return;
        }
        x.stopping = Some(DaemonStopping { host_reset, then_start: false });
        if x.active_fault.is_none() {
            x.active_fault = Some((self.now, "daemon_stop"));
        }
        let grace_ms = self.spec.timings.watchdog_timeout.as_millis();
        self.input(h, Input::Stop(StopNotice { grace_ms, host_reset }));
    }

    /// The engine answered its stop: the daemon exits. With systemd's
    /// watchdog the stop ends the watch; a stop whose notice did not reach
    /// storage is then a failed unit, and FailureAction resets the host.
    fn daemon_stopped(&mut self, h: HostId, written: bool) {
        let Some(x) = self.hosts.get_mut(&h) else {
            return;
        };
        let stop = x.stopping.take().unwrap_or(DaemonStopping { host_reset: true, then_start: false });
        x.node = None;
        x.daemon_epoch += 1;
        x.wake_at = None;
        if !stop.host_reset {
            x.watchdog_deadline = None;
            if !written {
                self.log_sim(&format!("{h}'s unit failed: FailureAction resets it"));
                self.power_off(h, "daemon_stop");
                self.schedule(WATCHDOG_REBOOT_MS, Ev::PowerOn { host: h });
                return;
            }
        }
        if stop.then_start {
            self.start_daemon(h);
        }
    }

    pub fn crash_daemon(&mut self, h: HostId) {
        if let Some(x) = self.hosts.get_mut(&h)
            && x.node.is_some()
        {
            x.node = None;
            x.stopping = None;
            x.daemon_epoch += 1;
            x.wake_at = None;
            if x.active_fault.is_none() {
                x.active_fault = Some((self.now, "daemon_crash"));
            }
        }
    }
}

/// The host an event is about, if it should wait while that host is paused.
fn ev_host(ev: &Ev) -> Option<HostId> {
    match ev {
        Ev::Wake { host }
        | Ev::StorageDo { host, .. }
        | Ev::StorageResult { host, .. }
        | Ev::QemuStarted { host, .. }
        | Ev::QemuReady { host, .. }
        | Ev::QemuStopped { host, .. }
        | Ev::StartRefused { host, .. }
        | Ev::FenceDone { host, .. }
        | Ev::IsolationAnswer { host, .. }
        | Ev::Watchdog { host }
        | Ev::Registry { host, .. }
        | Ev::RegistryPoll { host, .. }
        | Ev::DaemonStart { host } => Some(*host),
        Ev::Deliver { to, .. } => Some(*to),
        Ev::Guest(super::guest::GuestEv::Ping { host, .. }) => Some(*host),
        Ev::Block(e) => e.host(),
        _ => None,
    }
}

fn is_storage_read(a: &Action) -> bool {
    matches!(a, Action::ReadStorage { .. } | Action::ReadLease { .. })
}

/// The answer to a storage request that failed with EIO.
fn failed_result(a: &Action) -> Option<Input> {
    let e = Err(StorageError::Io);
    Some(match a {
        Action::WriteSlot { op, .. } => Input::SlotWritten { op: *op, result: e },
        Action::ReadStorage { op } => Input::StorageRead { op: *op, result: Err(StorageError::Io) },
        Action::ReadLease { op, key } => Input::LeaseRead { op: *op, key: *key, result: Err(StorageError::Io) },
        Action::CasLease { op, key, .. } => Input::LeaseCas { op: *op, key: *key, result: Err(StorageError::Io) },
        Action::WriteFenced { op, .. } | Action::WriteAssignments { op, .. } => {
            Input::RecordWritten { op: *op, result: Err(StorageError::Io) }
        }
        _ => return None,
    })
}

/// A simulated host's boot id: host number, then its boot count, both in
/// hex (h2's third boot is `20003`), so that logs read alike from run to
/// run and a change in how the RNG is drawn leaves golden logs as they were.
fn sim_boot_id(h: HostId, boot: u64) -> BootId {
    (u64::from(h.0) << 16) | (boot & 0xffff)
}
