//! The per-host state machine.
//!
//! Call order (as quinn-proto's `Connection`): feed `handle_input(now, ..)`
//! for everything that happened and `handle_timeout(now)` when
//! `poll_timeout()` is reached (an early call does nothing harmful), then
//! drain `poll_action()` and execute every action. The driver decides nothing.
//!
//! The host's own duties live here: storage and network heartbeats, S4 self
//! fencing, S5 zombie destruction, isolation, and running the domains whose
//! leases it owns. The master's duties are in `master.rs`.

use super::config::{ClusterSpec, DomainId, HostId, IsolationResponse, Readiness, Timings};
use super::io::*;
use super::master::{FenceJob, Master};
use super::peers::Peer;
use super::time::{Duration, Instant, Rng};
use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;

/// Housekeeping period: timeouts are noticed within this.
pub const TICK: Duration = Duration::from_millis(100);
/// Slot writes (or reads) in flight at once, counting timed-out ones that
/// never answered: a hung NFS must not pile up requests.
pub const MAX_INFLIGHT_PER_KIND: usize = 2;
/// How long a host keeps reporting a released lease in its slot.
pub const RELEASE_REPORT: Duration = Duration::from_secs(300);
/// Starts refused because another qemu holds the disks, before giving up.
pub const MAX_DISK_LOCKED_RETRIES: u32 = 100;
/// `Stopping::kill_at` once qemu was killed directly (no later kill is due).
const KILL_ISSUED: Instant = Instant(u64::MAX);
/// Period of the S5 lease audit (one running domain per period).
pub const AUDIT_INTERVAL: Duration = Duration::from_secs(1);
/// A gap this long between two `handle_timeout` calls means the host or
/// the daemon was frozen: what it heard before is stale.
pub const FROZEN_GAP: Duration = Duration::from_secs(1);
/// Released leases listed in one network heartbeat: it must fit one UDP
/// packet (at most net::wire's MAX_RELEASED_PER_PACKET, asserted there). The newest go in every heartbeat,
/// the others take turns, so a burst of releases all get out.
pub const MAX_RELEASED_PER_HEARTBEAT: usize = 10;
/// Of those, how many are always the newest.
pub const NEWEST_RELEASED_PER_HEARTBEAT: usize = 5;
const _: () = assert!(NEWEST_RELEASED_PER_HEARTBEAT < MAX_RELEASED_PER_HEARTBEAT);
/// How often readiness conditions of running domains are probed.
pub const READINESS_POLL: Duration = Duration::from_secs(1);
/// How often a non-master reads the master lease.
pub const MASTER_CHECK_INTERVAL: Duration = Duration::from_secs(1);

#[derive(Clone, Debug)]
pub struct NodeConfig {
    pub host: HostId,
    pub boot: BootId,
    /// New every daemon start (a random nonce in the daemon).
    pub incarnation: u64,
    pub spec: Arc<ClusterSpec>,
    pub rng_seed: u64,
    /// Maintenance mode as this host's previous slot left it (the daemon
    /// reads it back at start, so it survives restarts and reboots).
    pub maintenance: bool,
    /// Test-only defect: take leases without waiting for S3 (proves the
    /// simulator's checker catches double starts).
    #[cfg(test)]
    pub broken_skip_s3: bool,
}

/// What a host is doing with one of its domains.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LocalState {
    /// Found running at daemon start; its lease is being read.
    Adopting,
    /// Lease being verified before a start.
    Verifying,
    Starting,
    Running,
    Ready,
    /// Destroy or shutdown asked; `kill_at`: when to kill qemu directly.
    Stopping {
        kill_at: Instant,
        then: AfterStop,
    },
    /// Crashed or refused; restart after this instant (lease still ours).
    Backoff {
        until: Instant,
    },
    /// Live migration to `to` (in `boot`) under way; the lease is ours.
    Migrating {
        to: HostId,
        boot: BootId,
    },
    /// Migrated (qemu gone here, paused there); our lease is being handed
    /// to the target by CAS.
    Handoff {
        to: HostId,
        boot: BootId,
    },
    /// Arrived paused by a migration; runs only once the lease is ours
    /// (maintenance.rs). Not reported in our slot.
    Incoming {
        since: Instant,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AfterStop {
    /// Self-fence or zombie: nothing more.
    Forget,
    /// Give the lease up for the master to place elsewhere.
    Release { failed_start: bool },
}

#[derive(Clone, Debug)]
pub struct Local {
    pub state: LocalState,
    /// Generation of the lease we own (None while adopting).
    pub generation: Option<u64>,
    pub restarts: u32,
    /// Starts retried here after `DisksLocked` or `HypervisorDown`.
    pub start_retries: u32,
    /// A start libvirtd did not answer may still happen (StartFailure::
    /// HypervisorDown): the lease stays ours, and a self-fence destroys it
    /// like a running domain rather than forgetting it.
    pub start_in_doubt: bool,
    /// A paused copy that arrived by migration exists here (since then)
    /// while we verify its lease: a failed verify goes back to waiting
    /// (`Incoming`), never forgets that copy.
    pub incoming_since: Option<Instant>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SelfFence {
    Healthy,
    /// S4 triggered at `since`: destroying everything (killing qemu after
    /// io_timeout). The watchdog is no longer petted, so if qemu cannot be
    /// confirmed gone the host resets within watchdog_timeout of the last
    /// pet, which came before renew_timeout ran out: the S3(b) budget is
    /// renew + watchdog + io + margin (DESIGN.md §1), with nothing else added.
    Fencing {
        since: Instant,
    },
    /// Every protected domain confirmed gone and every lease released, since.
    Fenced {
        since: Instant,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum OpKind {
    SlotWrite,
    StorageRead,
    LeaseRead {
        purpose: ReadPurpose,
    },
    Cas,
    /// CAS of the master lease.
    MasterCas,
    /// Our own CAS before starting this domain.
    Renew(DomainId),
    /// Handing our lease to a migration target.
    Handoff(DomainId),
    /// Freeing our lease of a domain stopped on purpose (stopped.rs).
    Park(DomainId),
    /// Taking a free lease for `havirt start` (stopped.rs).
    OperatorStart(DomainId),
    Record,
    Fence,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum ReadPurpose {
    Verify,
    Audit,
    Master,
    MasterLoad,
    Park,
    OperatorStart,
}

#[derive(Clone, Copy, Debug)]
pub(super) struct PendingOp {
    pub kind: OpKind,
    pub issued: Instant,
    /// Past io_timeout: treated as failed; a late answer is ignored.
    pub expired: bool,
}

pub struct Node {
    pub(super) cfg: NodeConfig,
    pub(super) t: Timings,
    pub(super) actions: VecDeque<Action>,
    next_op: u64,
    pub(super) ops: BTreeMap<OpId, PendingOp>,
    pub(super) started: Instant,
    pub(super) next_tick: Instant,
    last_timeout_call: Instant,
    /// Last time one of our storage requests was slow or failed.
    storage_trouble_at: Option<Instant>,
    /// When the newest registry read we were given was issued (`Node::new`:
    /// the spec it starts with counts as read then). S3(b) needs it fresh.
    pub(super) registry_read_issued: Instant,
    /// A takeover was held back by a stale registry (logged once per spell).
    pub(super) registry_stale_logged: bool,
    /// Since when we have been listening without a gap (start or resume):
    /// no peer is judged on silence we could not have heard.
    pub(super) observing_since: Instant,
    // Own heartbeats.
    hb_seq: u64,
    next_hb: Instant,
    slot_seq: u64,
    pub(super) next_slot_write: Instant,
    /// Start of the last slot write that completed: the S4 anchor.
    pub(super) last_good_write: Option<Instant>,
    next_read: Instant,
    /// Issue and completion of our latest successful storage read.
    pub(super) last_read: Option<(Instant, Instant)>,
    /// When we last sent a heartbeat claiming `hears_all_lost`: a peer may
    /// hold its domains on that claim (the exemption), so our S3(b) clock
    /// for every peer restarts there.
    pub(super) all_lost_claimed: Option<Instant>,
    pub(super) self_fence: SelfFence,
    // Isolation.
    last_probe_ok: Option<Instant>,
    next_probe: Instant,
    pub(super) isolated: bool,
    // What we know of everybody else.
    pub(super) peers: BTreeMap<HostId, Peer>,
    pub(super) local: BTreeMap<DomainId, Local>,
    /// Leases we gave up: generation, failed start, when.
    pub(super) released: BTreeMap<DomainId, (u64, bool, Instant)>,
    /// Master lease generation we gave up when we self-fenced.
    released_master: Option<u64>,
    /// Assignments we saw, so each is verified once.
    pub(super) assignments_seen: BTreeMap<DomainId, u64>,
    next_audit: Instant,
    next_readiness_poll: Instant,
    audit_cursor: Option<DomainId>,
    pub(super) next_master_check: Instant,
    pub(super) master_lease: Option<Lease>,
    /// When we first saw the master lease free or its owner dead.
    pub(super) master_takeable_since: Option<Instant>,
    /// A poison request for this boot was obeyed (one self-fence per boot).
    poison_obeyed: bool,
    pub(super) master: Option<Master>,
    pub(super) fence_jobs: BTreeMap<HostId, FenceJob>,
    /// Verdicts last logged (by the master).
    pub(super) verdicts: BTreeMap<HostId, super::peers::Verdict>,
    /// Maintenance mode (maintenance.rs).
    pub(super) maintenance: bool,
    /// Domains the drain left here, with why.
    pub(super) migration_failed: BTreeMap<DomainId, String>,
    /// The end of the drain was logged.
    pub(super) drain_reported: bool,
    /// Domains we migrated, target and when: room held on the target
    /// until its slot reports them.
    pub(super) recent_migrations: BTreeMap<DomainId, (HostId, Instant)>,
    /// Leases we handed to a migration target: (target, its boot,
    /// generation, when), reported in our slot for HANDOVER_REPORT.
    pub(super) handed_over: BTreeMap<DomainId, (HostId, BootId, u64, Instant)>,
    /// Failback migrations that failed: not before this again.
    pub(super) failback_blocked: BTreeMap<DomainId, Instant>,
    /// Last lease read of each incoming domain.
    pub(super) incoming_polled: BTreeMap<DomainId, Instant>,
    /// Test-only defect: keep managing unprotected domains (proves the
    /// simulator's checker catches a start after unprotect). Not in
    /// NodeConfig, whose literal the daemon writes.
    #[cfg(test)]
    pub(super) broken_ignore_unprotect: bool,
    /// Test-only defect: take leases by S3(b) from a host whose daemon
    /// stopped with nothing to reset it (proves the checker catches it).
    #[cfg(test)]
    pub(super) broken_ignore_stop_notice: bool,
    /// Domains stopped on purpose (stopped.rs).
    pub(super) intent: super::stopped::Intents,
    /// Guest-agent monitoring (monitor.rs).
    pub(super) watch: super::monitor::Watches,
    /// A stop on purpose is under way (stop.rs).
    pub(super) stopping: Option<super::stop::Stopping>,
}

impl Node {
    pub fn new(cfg: NodeConfig, now: Instant) -> Node {
        let t = cfg.spec.timings;
        let mut rng = Rng::new(cfg.rng_seed);
        // Spread the first heartbeats so hosts do not write in lockstep.
        let jitter = Duration(rng.range(0, t.storage_write_interval.as_millis() / 2));
        let peers = cfg.spec.hosts.iter().filter(|h| h.id != cfg.host).map(|h| (h.id, Peer::default())).collect();
        let mut node = Node {
            t,
            actions: VecDeque::new(),
            next_op: 1,
            ops: BTreeMap::new(),
            started: now,
            next_tick: now,
            last_timeout_call: now,
            storage_trouble_at: None,
            registry_read_issued: now,
            registry_stale_logged: false,
            observing_since: now,
            hb_seq: 0,
            next_hb: now,
            slot_seq: 0,
            next_slot_write: now + jitter,
            last_good_write: None,
            next_read: now + jitter,
            last_read: None,
            all_lost_claimed: None,
            self_fence: SelfFence::Healthy,
            last_probe_ok: None,
            next_probe: now,
            isolated: false,
            peers,
            local: BTreeMap::new(),
            released: BTreeMap::new(),
            released_master: None,
            assignments_seen: BTreeMap::new(),
            next_audit: now + AUDIT_INTERVAL,
            next_readiness_poll: now,
            audit_cursor: None,
            next_master_check: now,
            master_lease: None,
            master_takeable_since: None,
            poison_obeyed: false,
            master: None,
            fence_jobs: BTreeMap::new(),
            verdicts: BTreeMap::new(),
            maintenance: false,
            migration_failed: BTreeMap::new(),
            drain_reported: false,
            recent_migrations: BTreeMap::new(),
            handed_over: BTreeMap::new(),
            incoming_polled: BTreeMap::new(),
            failback_blocked: BTreeMap::new(),
            #[cfg(test)]
            broken_ignore_unprotect: false,
            #[cfg(test)]
            broken_ignore_stop_notice: false,
            intent: Default::default(),
            watch: Default::default(),
            stopping: None,
            cfg,
        };
        node.emit(
            now,
            "node",
            format!("daemon started (boot {:x}, incarnation {:x})", node.cfg.boot, node.cfg.incarnation),
        );
        if node.cfg.maintenance {
            node.maintenance = true;
            node.emit(now, "node", "in maintenance mode (kept from before the restart)".into());
        }
        node
    }

    pub fn host(&self) -> HostId {
        self.cfg.host
    }

    /// Test-only defect, see `broken_ignore_unprotect`.
    #[cfg(test)]
    pub(crate) fn break_ignore_unprotect(&mut self) {
        self.broken_ignore_unprotect = true;
    }

    /// Test-only defect, see `broken_ignore_stop_notice`.
    #[cfg(test)]
    pub(crate) fn break_ignore_stop_notice(&mut self) {
        self.broken_ignore_stop_notice = true;
    }

    pub fn is_master(&self) -> bool {
        self.master.is_some()
    }

    pub fn local_domains(&self) -> &BTreeMap<DomainId, Local> {
        &self.local
    }

    pub fn self_fence_state(&self) -> SelfFence {
        self.self_fence
    }

    pub fn poll_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    /// The next instant `handle_timeout` has work to do.
    pub fn poll_timeout(&self) -> Instant {
        if self.stopping.is_some() {
            return self.next_tick;
        }
        self.next_tick.min(self.next_hb).min(self.next_slot_write).min(self.next_read)
    }

    pub(super) fn me(&self) -> Owner {
        Owner { host: self.cfg.host, boot: self.cfg.boot }
    }

    pub(super) fn new_op(&mut self, now: Instant, kind: OpKind) -> OpId {
        let op = OpId(self.next_op);
        self.next_op += 1;
        self.ops.insert(op, PendingOp { kind, issued: now, expired: false });
        op
    }

    /// Take the pending op for a result; None for unknown or expired ops.
    pub(super) fn finish_op(&mut self, now: Instant, op: OpId) -> Option<PendingOp> {
        let p = self.ops.remove(&op)?;
        if p.kind != OpKind::Fence && (p.expired || now.since(p.issued) > self.t.storage_write_interval) {
            self.storage_trouble_at = Some(now);
        }
        if p.expired { None } else { Some(p) }
    }

    fn inflight(&self, kind: OpKind) -> usize {
        self.ops.values().filter(|p| p.kind == kind).count()
    }

    fn live_inflight(&self, kind: OpKind) -> usize {
        self.ops.values().filter(|p| p.kind == kind && !p.expired).count()
    }

    pub(super) fn emit(&mut self, now: Instant, role: &str, text: String) {
        let ev = Event { at: now, host: self.cfg.host, role: role.to_string(), text };
        self.actions.push_back(Action::Emit(ev));
    }

    pub(super) fn domain_name(&self, d: DomainId) -> String {
        self.cfg.spec.domain_name(d)
    }

    /// S4 clock: a completed write started within renew_timeout.
    pub(super) fn storage_healthy(&self, now: Instant) -> bool {
        self.last_good_write.is_some_and(|l| now.since(l) < self.t.renew_timeout)
    }

    /// Our slot writes have been failing long enough to tell others.
    fn storage_lost(&self, now: Instant) -> bool {
        let anchor = self.last_good_write.unwrap_or(self.started);
        now.since(anchor) >= self.t.storage_silent_after
    }

    /// Our own reads are recent enough to judge other slots.
    /// Our own reads are recent, and our own storage has answered promptly
    /// for a whole silence window: only then is another slot's silence its
    /// own (a stall that hits everybody must not look like deaths).
    pub(super) fn reads_fresh(&self, now: Instant) -> bool {
        let smooth = self.storage_trouble_at.is_none_or(|t| now.since(t) >= self.t.storage_silent_after);
        smooth && self.last_read.is_some_and(|(_, done)| now.since(done) < self.t.storage_silent_after)
    }

    pub(super) fn last_read_issued(&self) -> Option<Instant> {
        self.last_read.map(|(issued, _)| issued)
    }

    /// Our storage is lost, and we hear every peer say its storage is lost
    /// too (and that it has not self-fenced): what our heartbeats claim as
    /// `hears_all_lost`. One-way evidence only: on its own it exempts nothing.
    fn hears_all_lost(&self, now: Instant) -> bool {
        if !self.storage_lost(now) || self.peers.is_empty() {
            return false;
        }
        self.peers.values().all(|p| {
            p.net_fresh(now, &self.t) && p.heartbeat.as_ref().is_some_and(|h| h.storage_lost && !h.self_fenced)
        })
    }

    /// DESIGN.md §3, the all-lost exemption from S4: every member lost
    /// storage and all hear each other, *both ways*: we hear every peer, and
    /// every peer's latest heartbeat claims it hears all (us included).
    /// Each claim restarts its sender's own S3(b) clocks (`all_lost_claimed`),
    /// so no peer may take our leases before host_dead_timeout after the last
    /// claim we relied on; we drop the exemption at most suspect_after after
    /// that claim was sent, which leaves watchdog_timeout + margin.
    pub(super) fn exempt(&self, now: Instant) -> bool {
        self.hears_all_lost(now) && self.peers.values().all(|p| p.heartbeat.as_ref().is_some_and(|h| h.hears_all_lost))
    }

    // ---- inputs ------------------------------------------------------

    pub fn handle_input(&mut self, now: Instant, input: Input) {
        let storage_failed = match &input {
            Input::SlotWritten { result, .. } | Input::RecordWritten { result, .. } => result.is_err(),
            Input::StorageRead { result, .. } => result.is_err(),
            Input::LeaseRead { result, .. } => result.is_err(),
            Input::LeaseCas { result, .. } => result.is_err(),
            _ => false,
        };
        if storage_failed {
            self.storage_trouble_at = Some(now);
        }
        if self.stopping.is_some() {
            if let Input::SlotWritten { op, result } = input {
                self.stop_slot_written(now, op, result);
            }
            return;
        }
        match input {
            Input::Stop(notice) => self.handle_stop(now, notice),
            Input::DomainsAtStart(list) => self.handle_domains_at_start(now, list),
            Input::ProtectedDomains { domains, read_issued } => {
                self.handle_protected_domains(now, domains, read_issued)
            }
            Input::Net(NetMessage::Heartbeat(hb)) => self.handle_heartbeat(now, hb),
            Input::Net(NetMessage::Assign { from, domains }) => {
                let _ = from;
                for (d, g) in domains {
                    self.handle_assignment(now, d, g);
                }
            }
            Input::SlotWritten { op, result } => self.handle_slot_written(now, op, result),
            Input::StorageRead { op, result } => self.handle_storage_read(now, op, result),
            Input::LeaseRead { op, key, result } => self.handle_lease_read(now, op, key, result),
            Input::LeaseCas { op, key, result } => self.handle_cas(now, op, key, result),
            Input::RecordWritten { op, result } => {
                if self.finish_op(now, op).is_some() && result.is_err() {
                    self.emit(now, "node", "storage record write failed".into());
                }
            }
            Input::Domain { domain, event } => self.handle_domain_event(now, domain, event),
            Input::Fence { op, target, outcome } => self.handle_fence_result(now, op, target, outcome),
            Input::IsolationProbe { reachable } => {
                if reachable {
                    self.last_probe_ok = Some(now);
                }
            }
            Input::Operator(OperatorCommand::FenceConfirm(h)) => self.handle_operator_confirm(now, h),
            Input::Operator(OperatorCommand::Maintenance(enter)) => self.set_maintenance(now, enter),
            Input::Incoming { domain } => self.handle_incoming(now, domain),
            Input::Migrated { domain, result, running_here } => self.handle_migrated(now, domain, result, running_here),
            Input::Operator(OperatorCommand::Start(d)) => self.handle_operator_start(now, d),
            Input::GuestAgent { domain, result } => self.handle_guest_agent(now, domain, result),
        }
    }

    /// At daemon start, and later for newly protected domains: adopt what
    /// runs here once its lease is read. A domain we already handle (local,
    /// or assigned and starting) is left alone.
    fn handle_domains_at_start(&mut self, now: Instant, list: Vec<DomainId>) {
        for d in list {
            if !self.cfg.spec.domains.contains_key(&d) || self.local.contains_key(&d) {
                continue;
            }
            self.local.insert(
                d,
                Local {
                    state: LocalState::Adopting,
                    generation: None,
                    restarts: 0,
                    start_retries: 0,
                    start_in_doubt: false,
                    incoming_since: None,
                },
            );
            let op = self.new_op(now, OpKind::LeaseRead { purpose: ReadPurpose::Verify });
            self.actions.push_back(Action::ReadLease { op, key: LeaseKey::Domain(d) });
            if self.self_fence != SelfFence::Healthy {
                // Protected while we self-fence (S4): it goes too.
                if matches!(self.self_fence, SelfFence::Fenced { .. }) {
                    self.self_fence = SelfFence::Fencing { since: now };
                }
                self.force_stop(now, d);
            }
        }
    }

    fn handle_heartbeat(&mut self, now: Instant, hb: Heartbeat) {
        let Some(peer) = self.peers.get_mut(&hb.host) else {
            return;
        };
        if peer.observe_heartbeat(now, hb) == Some(true) {
            // A release over the network (S3(c)): place it now.
            self.master_round(now);
        }
    }

    fn handle_slot_written(&mut self, now: Instant, op: OpId, result: Result<(), StorageError>) {
        // A write that answers after io_timeout still completed: it counts
        // for S4 from its start, like any other.
        let Some(p) = self.ops.get(&op).copied() else {
            return;
        };
        self.finish_op(now, op);
        if result.is_err() {
            // Retry soon: the sooner a write lands after an outage, the
            // fewer outages shorter than renew_timeout end in a self-fence.
            self.next_slot_write = self.next_slot_write.min(now + TICK);
            return;
        }
        if now.since(p.issued) > self.t.storage_write_interval {
            // A slow write proves little about now (S4 counts from its
            // start): write again at once instead of next interval.
            self.next_slot_write = now;
        }
        let was_lost = !self.storage_healthy(now) && self.last_good_write.is_some();
        if self.last_good_write.is_none_or(|l| l < p.issued) {
            self.last_good_write = Some(p.issued);
        }
        if was_lost && self.storage_healthy(now) {
            self.emit(now, "node", "storage heartbeat writes work again".into());
        }
        if let SelfFence::Fenced { since } = self.self_fence
            && p.issued >= since
        {
            // A slot built after the fence, with its released leases,
            // is on storage: the host may take assignments again.
            self.self_fence = SelfFence::Healthy;
            self.emit(now, "node", "self-fence over: released leases published".into());
        }
    }

    fn handle_storage_read(&mut self, now: Instant, op: OpId, result: Result<StorageSnapshot, StorageError>) {
        let Some(p) = self.finish_op(now, op) else {
            return;
        };
        let Ok(snap) = result else { return };
        let prev_done = self.last_read.map(|(_, d)| d);
        self.last_read = Some((p.issued, now));
        for (h, peer) in self.peers.iter_mut() {
            peer.observe_slot(now, prev_done, snap.slots.get(h));
            if let Some(f) = snap.fenced.get(h) {
                peer.fenced_boots.insert(f.boot);
            }
        }
        if snap.poison == Some(self.cfg.boot) && !self.poison_obeyed {
            // Someone asked us to fence ourselves (storage fence agent): do
            // it now, once per boot, through the S4 path.
            self.poison_obeyed = true;
            self.emit(now, "node", "poison request found on storage: self-fencing".into());
            self.start_self_fence(now);
            return;
        }
        for (d, g) in snap.assignments.domains.clone() {
            self.handle_assignment(now, d, g);
        }
        self.master_round(now);
    }

    /// The master moved a lease to us: verify it, then start.
    pub(super) fn handle_assignment(&mut self, now: Instant, d: DomainId, generation: u64) {
        if self.assignments_seen.get(&d).is_some_and(|g| *g >= generation) {
            return;
        }
        if self.released.get(&d).is_some_and(|(g, _, _)| *g >= generation) {
            return;
        }
        // An incoming migration resumes through the ordinary start path.
        let incoming_since = self.local.get(&d).and_then(|l| match l.state {
            LocalState::Incoming { since } => Some(since),
            _ => None,
        });
        if !self.cfg.spec.domains.contains_key(&d)
            || (self.local.contains_key(&d) && incoming_since.is_none())
            || self.intent.parking(d)
        {
            return;
        }
        if !self.storage_healthy(now) || self.self_fence != SelfFence::Healthy {
            return;
        }
        self.assignments_seen.insert(d, generation);
        self.local.insert(
            d,
            Local {
                state: LocalState::Verifying,
                generation: Some(generation),
                restarts: 0,
                start_retries: 0,
                start_in_doubt: false,
                incoming_since,
            },
        );
        self.renew_before_start(now, d, generation);
    }

    /// Every start is preceded by our own compare-and-swap of the lease from
    /// the generation we believe we own to the next one. A takeover racing
    /// with us (S3 evidence that has become stale) then fails on the
    /// generation, or makes our CAS fail: never both.
    fn renew_before_start(&mut self, now: Instant, d: DomainId, generation: u64) {
        let op = self.new_op(now, OpKind::Renew(d));
        let new = Lease { owner: Some(self.me()), generation: generation + 1, reason: LeaseReason::Renewed };
        self.actions.push_back(Action::CasLease { op, key: LeaseKey::Domain(d), expect_generation: generation, new });
    }

    /// Our renew CAS came back: start if the lease is ours now.
    pub(super) fn renewed(&mut self, now: Instant, d: DomainId, result: Result<CasOutcome, StorageError>) {
        let protected = self.cfg.spec.domains.contains_key(&d);
        if let (Some(m), Ok(CasOutcome::Done(l) | CasOutcome::Conflict(l)), true) =
            (self.master.as_mut(), &result, protected)
        {
            // We are master: keep the cache where storage really is.
            m.note_lease(d, *l);
        }
        let Some(local) = self.local.get(&d).cloned() else {
            return;
        };
        if local.state != LocalState::Verifying {
            return;
        }
        match result {
            Ok(CasOutcome::Done(l)) if l.owner == Some(self.me()) => {
                if !self.storage_healthy(now) || self.self_fence != SelfFence::Healthy {
                    // Ours but we may not start now: the assignment record
                    // lists it again, with the new generation.
                    if let Some(x) = self.local.get_mut(&d) {
                        x.generation = Some(l.generation);
                    }
                    self.drop_verifying(now, d);
                    return;
                }
                self.emit(now, "node", format!("starting {} (lease generation {})", self.domain_name(d), l.generation));
                if let Some(x) = self.local.get_mut(&d) {
                    x.generation = Some(l.generation);
                    x.state = LocalState::Starting;
                    // The start resumes the paused copy: it is ours now.
                    x.incoming_since = None;
                }
                self.actions.push_back(Action::StartDomain { domain: d });
            }
            Ok(CasOutcome::Conflict(l)) if l.owner == Some(self.me()) && Some(l.generation) > local.generation => {
                // Ours at a newer generation (an earlier renew of ours that
                // timed out did land): renew from there.
                if let Some(x) = self.local.get_mut(&d) {
                    x.generation = Some(l.generation);
                }
                self.renew_before_start(now, d, l.generation);
            }
            Ok(_) => {
                // Not ours: this generation is dead for us (assignments_seen
                // keeps it), so a stale assignment record is not retried.
                self.emit(now, "node", format!("not starting {}: lease is not ours", self.domain_name(d)));
                // Taken by S3 (this host fenced, reset or past its watchdog
                // rule): a late start of ours is adopted and destroyed (S5).
                if let Some(x) = self.local.get_mut(&d) {
                    x.start_in_doubt = false;
                }
                self.drop_verifying(now, d);
            }
            // Failed: perhaps applied; the master lists it again.
            Err(_) => self.abandon_verify(now, d),
        }
    }

    fn handle_lease_read(&mut self, now: Instant, op: OpId, key: LeaseKey, result: Result<Lease, StorageError>) {
        let Some(p) = self.finish_op(now, op) else {
            // Expired verify: let a later assignment or retry try again.
            if let LeaseKey::Domain(d) = key {
                self.abandon_verify(now, d);
            }
            return;
        };
        let OpKind::LeaseRead { purpose } = p.kind else {
            return;
        };
        match (purpose, key) {
            (ReadPurpose::Master, _) | (_, LeaseKey::Master) => {
                if let Ok(l) = result {
                    self.master_lease = Some(l);
                    self.consider_master(now);
                }
            }
            (ReadPurpose::MasterLoad, LeaseKey::Domain(d)) => self.master_loaded(now, op, d, result),
            (ReadPurpose::Verify, LeaseKey::Domain(d)) => self.verified(now, d, result),
            (ReadPurpose::Park, LeaseKey::Domain(d)) => self.park_read(now, d, result),
            (ReadPurpose::OperatorStart, LeaseKey::Domain(d)) => self.operator_start_read(now, d, result),
            (ReadPurpose::Audit, LeaseKey::Domain(d)) => {
                if let Ok(l) = result {
                    self.audit(now, d, l);
                }
            }
        }
    }

    fn abandon_verify(&mut self, now: Instant, d: DomainId) {
        if self.local.get(&d).is_some_and(|l| l.state == LocalState::Verifying) {
            self.drop_verifying(now, d);
            self.assignments_seen.remove(&d);
        }
    }

    /// A verify that did not end in a start: forget the domain, unless a
    /// paused migration copy of it is here (then wait for its lease again)
    /// or a start libvirtd never answered may still run it (then keep the
    /// lease and retry: a self-fence must destroy it, not forget it).
    fn drop_verifying(&mut self, now: Instant, d: DomainId) {
        match self.local.get_mut(&d) {
            Some(l) if l.start_in_doubt => l.state = LocalState::Backoff { until: now },
            Some(l) if l.incoming_since.is_some() => {
                l.state = LocalState::Incoming { since: l.incoming_since.unwrap_or_default() };
                l.generation = None;
            }
            _ => {
                self.local.remove(&d);
            }
        }
    }

    /// A lease read before a start (or at adoption) came back.
    fn verified(&mut self, now: Instant, d: DomainId, result: Result<Lease, StorageError>) {
        let Some(local) = self.local.get(&d).cloned() else {
            return;
        };
        let me = self.me();
        let Ok(lease) = result else {
            if local.state == LocalState::Verifying {
                self.abandon_verify(now, d);
            } else if local.state == LocalState::Adopting {
                // Keep it running; the audit reads the lease again.
                self.set_state(d, LocalState::Running);
            }
            return;
        };
        // A generation we released is not ours any more, even while the
        // lease still names us (the master may be moving it right now).
        let released = self.released.get(&d).is_some_and(|r| r.0 >= lease.generation);
        // Nor is one being freed because the domain stopped on purpose: a
        // qemu started meanwhile (virsh start) would run on a free lease.
        let ours = lease.owner == Some(me) && !released && !self.intent.parking(d);
        match local.state {
            LocalState::Adopting if ours => {
                self.emit(now, "node", format!("adopted running domain {}", self.domain_name(d)));
                if let Some(l) = self.local.get_mut(&d) {
                    l.state = LocalState::Running;
                    l.generation = Some(lease.generation);
                }
            }
            LocalState::Adopting => self.destroy_zombie(now, d, lease),
            // Handed to us after a migration: start (resume) it the usual way.
            LocalState::Incoming { .. } if ours => self.handle_assignment(now, d, lease.generation),
            _ => {}
        }
    }

    /// S5: a domain runs here but its lease names someone else.
    fn destroy_zombie(&mut self, now: Instant, d: DomainId, lease: Lease) {
        let owner = lease.owner.map(|o| o.host.to_string()).unwrap_or_else(|| "nobody".into());
        let name = self.domain_name(d);
        let text = if lease.owner.is_none() && lease.reason == LeaseReason::Stopped {
            format!(
                "zombie {name}: started outside havirt, but its desired state is stopped; destroying (havirt start {name} starts it)"
            )
        } else {
            format!("zombie {name}: lease owned by {owner}; destroying")
        };
        self.emit(now, "node", text);
        self.stop_domain(now, d, false, AfterStop::Forget);
    }

    fn audit(&mut self, now: Instant, d: DomainId, lease: Lease) {
        let me = self.me();
        let Some(local) = self.local.get_mut(&d) else {
            return;
        };
        if lease.owner == Some(me) {
            if local.generation.is_none() {
                local.generation = Some(lease.generation);
            }
            return;
        }
        match local.state {
            LocalState::Running | LocalState::Ready | LocalState::Starting | LocalState::Adopting => {
                self.destroy_zombie(now, d, lease);
            }
            // Not running here and not ours any more: nothing to restart.
            LocalState::Backoff { .. } => {
                self.local.remove(&d);
            }
            _ => {}
        }
    }

    pub(super) fn set_state(&mut self, d: DomainId, s: LocalState) {
        if let Some(l) = self.local.get_mut(&d) {
            l.state = s;
        }
    }

    /// Destroy (or gracefully shut down) a domain and remember what follows.
    pub(super) fn stop_domain(&mut self, now: Instant, d: DomainId, graceful: bool, then: AfterStop) {
        let wait = if graceful { self.t.shutdown_timeout } else { self.t.io_timeout };
        if let Some(l) = self.local.get_mut(&d) {
            if matches!(l.state, LocalState::Stopping { .. }) {
                return;
            }
            l.state = LocalState::Stopping { kill_at: now + wait, then };
        }
        if graceful {
            self.actions.push_back(Action::ShutdownDomain { domain: d, timeout: self.t.shutdown_timeout });
        } else {
            self.actions.push_back(Action::DestroyDomain { domain: d, kill: false });
        }
    }

    fn handle_domain_event(&mut self, now: Instant, d: DomainId, event: DomainEvent) {
        let Some(mut local) = self.local.get(&d).cloned() else {
            return;
        };
        let readiness = self.cfg.spec.domains.get(&d).map(|s| s.policy.readiness);
        match (local.state, event) {
            // The migration's answer decides (its qemu leaves by design, with
            // a STOPPED/MIGRATED event before the answer).
            (LocalState::Handoff { .. }, _) => return,
            (LocalState::Migrating { .. }, DomainEvent::Stopped | DomainEvent::Started | DomainEvent::Ready) => return,
            // qemu died, or the guest or the operator stopped it, during the
            // migration: the migration fails, and this is why (an operator's
            // destroy stays a destroy).
            (LocalState::Migrating { .. }, _) => {
                local.state = LocalState::Running;
                self.set_state(d, LocalState::Running);
            }
            // Paused here; gone again (the migration was aborted).
            (LocalState::Incoming { .. }, DomainEvent::Stopped | DomainEvent::Crashed) => {
                self.local.remove(&d);
                return;
            }
            (LocalState::Incoming { .. }, _) => return,
            _ => {}
        }
        match event {
            DomainEvent::Started => {
                let s = if readiness == Some(Readiness::Started) { LocalState::Ready } else { LocalState::Running };
                // A start libvirtd kept while it hung has run after all: it is
                // this lease's start (the lease stayed ours).
                let late = local.start_in_doubt && matches!(local.state, LocalState::Backoff { .. });
                if local.state == LocalState::Starting || late {
                    self.emit(now, "node", format!("{} running", self.domain_name(d)));
                    self.set_state(d, s);
                    if let Some(l) = self.local.get_mut(&d) {
                        l.start_in_doubt = false;
                    }
                }
            }
            DomainEvent::Ready => {
                if local.state == LocalState::Running {
                    self.emit(now, "node", format!("{} ready", self.domain_name(d)));
                    self.set_state(d, LocalState::Ready);
                }
            }
            DomainEvent::Stopped => self.domain_gone(now, d, local, false),
            DomainEvent::Crashed => self.domain_gone(now, d, local, true),
            // havirt's own stops end in `Stopping`, whatever libvirt calls them.
            DomainEvent::ShutDown | DomainEvent::Destroyed if matches!(local.state, LocalState::Stopping { .. }) => {
                self.domain_gone(now, d, local, false)
            }
            DomainEvent::ShutDown => self.stopped_on_purpose(now, d, local, "shut down (guest or operator)"),
            DomainEvent::Destroyed => self.stopped_on_purpose(now, d, local, "destroyed by the operator"),
            DomainEvent::StartFailed { cause } => self.start_failed(now, d, local, cause),
        }
    }

    pub(super) fn domain_gone(&mut self, now: Instant, d: DomainId, local: Local, crashed: bool) {
        match local.state {
            // Killed directly (libvirtd did not answer the destroy) while a
            // start libvirtd never answered may still run it: no qemu now
            // proves nothing. The domain stays, so its lease is not released
            // and a self-fence never completes: the watchdog resets the host
            // (S4), which ends the late start too.
            LocalState::Stopping { kill_at, .. } if local.start_in_doubt && kill_at == KILL_ISSUED => {
                let name = self.domain_name(d);
                self.emit(
                    now,
                    "node",
                    format!(
                        "{name}: killed, but libvirtd never answered its start; keeping the lease until libvirtd answers or the watchdog resets this host"
                    ),
                );
            }
            LocalState::Stopping { then, .. } => {
                self.local.remove(&d);
                if let (AfterStop::Release { failed_start }, Some(g)) = (then, local.generation) {
                    self.release(now, d, g, failed_start);
                    if self.self_fence == SelfFence::Healthy {
                        self.emit(now, "node", format!("{} stopped; lease released", self.domain_name(d)));
                    }
                }
                self.check_fence_done(now);
            }
            _ if self.self_fence != SelfFence::Healthy => {
                self.local.remove(&d);
                self.check_fence_done(now);
            }
            _ => {
                let what = if crashed { "crashed" } else { "stopped on its own" };
                let max = self.cfg.spec.domains.get(&d).map_or(0, |s| s.policy.max_restarts);
                if local.restarts >= max {
                    self.emit(
                        now,
                        "node",
                        format!("{} {what}; local restarts exhausted, releasing", self.domain_name(d)),
                    );
                    self.local.remove(&d);
                    if let Some(g) = local.generation {
                        self.release(now, d, g, true);
                    }
                    return;
                }
                let until = now + self.backoff(local.restarts);
                self.emit(
                    now,
                    "node",
                    format!("{} {what}; restarting here after {}", self.domain_name(d), until.since(now)),
                );
                if let Some(l) = self.local.get_mut(&d) {
                    l.restarts += 1;
                    l.state = LocalState::Backoff { until };
                }
            }
        }
    }

    fn start_failed(&mut self, now: Instant, d: DomainId, local: Local, cause: StartFailure) {
        if local.state != LocalState::Starting {
            return;
        }
        let name = self.domain_name(d);
        let retry = match cause {
            StartFailure::DisksLocked if local.start_retries < MAX_DISK_LOCKED_RETRIES => {
                (local.start_retries == 0).then(|| format!("{name}: disks locked by another qemu; retrying"))
            }
            // Never released for this: the start may still run here.
            StartFailure::HypervisorDown => (local.start_retries == 0).then(|| {
                format!("{name}: libvirtd did not answer the start; keeping the lease (the start may still happen) and retrying")
            }),
            StartFailure::DisksLocked | StartFailure::Refused => {
                self.emit(now, "node", format!("start of {name} failed; lease released"));
                self.local.remove(&d);
                if let Some(g) = local.generation {
                    self.release(now, d, g, true);
                }
                return;
            }
        };
        if let Some(text) = retry {
            self.emit(now, "node", text);
        }
        let until = now + self.backoff(local.start_retries.min(3));
        if let Some(l) = self.local.get_mut(&d) {
            l.start_retries += 1;
            l.start_in_doubt |= cause == StartFailure::HypervisorDown;
            l.state = LocalState::Backoff { until };
        }
    }

    /// Publish a release at once: the next heartbeat carries it (S3(c)), so
    /// the master need not wait a heartbeat interval to move the domain.
    fn release(&mut self, now: Instant, d: DomainId, generation: u64, failed_start: bool) {
        self.released.insert(d, (generation, failed_start, now));
        self.next_hb = now;
    }

    pub(super) fn backoff(&self, attempt: u32) -> Duration {
        let base = self.t.restart_backoff.as_millis();
        let ms = base.saturating_mul(1u64 << attempt.min(16));
        Duration(ms.min(self.t.restart_backoff_max.as_millis()))
    }

    // ---- time ---------------------------------------------------------

    pub fn handle_timeout(&mut self, now: Instant) {
        if now.since(self.last_timeout_call) >= FROZEN_GAP {
            self.emit(
                now,
                "node",
                format!("resumed after a {} freeze; judging peers afresh", now.since(self.last_timeout_call)),
            );
            self.observing_since = now;
        }
        self.last_timeout_call = now;
        self.expire_ops(now);
        if self.stopping.is_some() {
            self.stop_tick(now);
            return;
        }
        if now >= self.next_hb {
            self.next_hb = now + self.t.net_heartbeat_interval;
            self.send_heartbeat(now);
            if self.may_pet(now) {
                self.actions.push_back(Action::PetWatchdog);
            }
        }
        if now >= self.next_slot_write {
            self.next_slot_write = now + self.t.storage_write_interval;
            self.write_slot(now);
        }
        if now >= self.next_read {
            self.next_read = now + self.t.storage_read_interval;
            if self.inflight(OpKind::StorageRead) < MAX_INFLIGHT_PER_KIND {
                let op = self.new_op(now, OpKind::StorageRead);
                self.actions.push_back(Action::ReadStorage { op });
            }
        }
        if now >= self.next_tick {
            self.next_tick = now + TICK;
            self.check_self_fence(now);
            self.check_isolation(now);
            self.local_timers(now);
            self.monitor_tick(now);
            self.intent_tick(now);
            self.prune_released(now);
            self.maybe_audit(now);
            self.maintenance_tick(now);
            self.master_tick(now);
        }
    }

    fn expire_ops(&mut self, now: Instant) {
        let io = self.t.io_timeout;
        let fence = self.t.fence_timeout;
        let mut expired = Vec::new();
        for (op, p) in self.ops.iter_mut() {
            let limit = if p.kind == OpKind::Fence { fence } else { io };
            if !p.expired && now.since(p.issued) >= limit {
                p.expired = true;
                if p.kind != OpKind::Fence {
                    self.storage_trouble_at = Some(now);
                }
                expired.push((*op, p.kind));
            }
        }
        for (op, kind) in expired {
            match kind {
                OpKind::Fence => self.fence_timed_out(now, op),
                OpKind::Renew(d) => self.abandon_verify(now, d),
                OpKind::Handoff(d) => self.handed_over(now, d, None),
                OpKind::Park(_)
                | OpKind::OperatorStart(_)
                | OpKind::LeaseRead { purpose: ReadPurpose::Park | ReadPurpose::OperatorStart } => {
                    self.intent_op_expired(op)
                }
                OpKind::LeaseRead { purpose: ReadPurpose::MasterLoad } => self.master_load_expired(op),
                _ => {}
            }
        }
    }

    fn send_heartbeat(&mut self, now: Instant) {
        self.hb_seq += 1;
        let hears_all_lost = self.hears_all_lost(now);
        if hears_all_lost {
            self.all_lost_claimed = Some(now);
        }
        let hb = Heartbeat {
            host: self.cfg.host,
            boot: self.cfg.boot,
            incarnation: self.cfg.incarnation,
            seq: self.hb_seq,
            storage_lost: self.storage_lost(now),
            hears_all_lost,
            self_fenced: matches!(self.self_fence, SelfFence::Fenced { .. }),
            released: self.released_for_heartbeat(),
        };
        self.actions.push_back(Action::Send { to: None, msg: NetMessage::Heartbeat(hb) });
    }

    /// Newest releases first, at most MAX_RELEASED_PER_HEARTBEAT.
    fn released_for_heartbeat(&self) -> Vec<Release> {
        let mut v: Vec<(Instant, Release)> = self
            .released
            .iter()
            .map(|(d, (g, failed_start, at))| {
                (*at, Release { key: LeaseKey::Domain(*d), generation: *g, failed_start: *failed_start })
            })
            .collect();
        v.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.key.cmp(&b.1.key)));
        let mut all: Vec<Release> = Vec::new();
        if let Some(g) = self.released_master {
            all.push(Release { key: LeaseKey::Master, generation: g, failed_start: false });
        }
        all.extend(v.into_iter().map(|(_, r)| r));
        if all.len() <= MAX_RELEASED_PER_HEARTBEAT {
            return all;
        }
        let older = all.split_off(NEWEST_RELEASED_PER_HEARTBEAT);
        let turn = MAX_RELEASED_PER_HEARTBEAT - NEWEST_RELEASED_PER_HEARTBEAT;
        let start = usize::try_from(self.hb_seq).unwrap_or(0).wrapping_mul(turn) % older.len();
        all.extend(older.iter().cycle().skip(start).take(turn.min(older.len())).copied());
        all
    }

    /// The watchdog is petted only while S4 holds (DESIGN.md §1).
    fn may_pet(&self, now: Instant) -> bool {
        let runs_domains = !self.local.is_empty();
        match self.self_fence {
            SelfFence::Fencing { .. } => false,
            SelfFence::Fenced { .. } => !runs_domains,
            SelfFence::Healthy => !runs_domains || self.storage_healthy(now) || self.exempt(now),
        }
    }

    fn write_slot(&mut self, now: Instant) {
        if self.live_inflight(OpKind::SlotWrite) > 0 || self.inflight(OpKind::SlotWrite) >= MAX_INFLIGHT_PER_KIND {
            return;
        }
        self.issue_slot_write(now);
    }

    pub(super) fn issue_slot_write(&mut self, now: Instant) -> OpId {
        self.slot_seq += 1;
        let slot = self.build_slot(now);
        let op = self.new_op(now, OpKind::SlotWrite);
        self.actions.push_back(Action::WriteSlot { op, slot });
        op
    }

    /// Memory and vCPUs our protected domains use (what the slot reports).
    pub(super) fn used(&self) -> (u64, u32) {
        let (mut mem, mut cpu) = (0u64, 0u32);
        let here = self.local.iter().filter(|(_, l)| !matches!(l.state, LocalState::Incoming { .. }));
        for s in here.filter_map(|(d, _)| self.cfg.spec.domains.get(d)) {
            mem = mem.saturating_add(s.memory_mib);
            cpu = cpu.saturating_add(s.vcpus);
        }
        (mem, cpu)
    }

    pub(super) fn build_slot(&self, _now: Instant) -> Slot {
        let mut domains = BTreeMap::new();
        for (d, l) in &self.local {
            if matches!(l.state, LocalState::Incoming { .. }) {
                continue;
            }
            let report = DomainReport { state: reported_state(l.state), generation: l.generation.unwrap_or(0) };
            domains.insert(*d, report);
        }
        // Releases fill what room the record has left, newest first (a
        // slot that does not fit would fail and self-fence this host); the
        // heartbeats carry them too.
        let mut released: Vec<_> = self.released.iter().filter(|(d, _)| !domains.contains_key(*d)).collect();
        released.sort_by_key(|(d, (_, _, at))| (std::cmp::Reverse(*at), **d));
        let room = (super::planner::MAX_DOMAINS_PER_HOST as usize).saturating_sub(domains.len());
        for (d, (g, failed_start, _)) in released.into_iter().take(room) {
            let state = DomainState::Released { failed_start: *failed_start };
            domains.insert(*d, DomainReport { state, generation: *g });
        }
        let room = (super::planner::MAX_DOMAINS_PER_HOST as usize).saturating_sub(domains.len());
        let handed = self.handed_over.iter().filter(|(d, _)| !domains.contains_key(*d)).take(room);
        let handed: Vec<_> = handed.map(|(d, (to, boot, g, _))| (*d, *to, *boot, *g)).collect();
        for (d, to, boot, g) in handed {
            domains.insert(d, DomainReport { state: DomainState::HandedOver { to, boot }, generation: g });
        }
        // Then the desired-stopped domains we know of (stopped.rs).
        for (d, report) in self.stopped_reports() {
            if domains.len() >= super::planner::MAX_DOMAINS_PER_HOST as usize {
                break;
            }
            domains.entry(d).or_insert(report);
        }
        let (mem, cpu) = self.used();
        let size = self.cfg.spec.host(self.cfg.host);
        Slot {
            host: self.cfg.host,
            boot: self.cfg.boot,
            incarnation: self.cfg.incarnation,
            seq: self.slot_seq,
            isolated: self.isolated,
            self_fenced: matches!(self.self_fence, SelfFence::Fenced { .. }),
            maintenance: self.maintenance,
            released_master: self.released_master,
            used_memory_mib: mem,
            used_vcpus: cpu,
            domains,
            memory_mib: size.map_or(0, |h| h.memory_mib),
            vcpus: size.map_or(0, |h| h.vcpus),
            stopped: self.stopping.map(|s| s.notice),
        }
    }

    /// S4: no completed slot write for renew_timeout (from the start of the
    /// last good one): destroy every protected domain.
    fn check_self_fence(&mut self, now: Instant) {
        match self.self_fence {
            SelfFence::Healthy => {
                let anchor = self.last_good_write.unwrap_or(self.started);
                if now.since(anchor) < self.t.renew_timeout || self.exempt(now) {
                    return;
                }
                self.emit(
                    now,
                    "node",
                    format!(
                        "self-fence: no storage heartbeat for {}; destroying all protected domains",
                        now.since(anchor)
                    ),
                );
                self.start_self_fence(now);
            }
            SelfFence::Fencing { since } => {
                let stuck_at = since + self.t.io_timeout + self.t.io_timeout;
                if now >= stuck_at && now < stuck_at + TICK {
                    self.emit(
                        now,
                        "node",
                        "self-fence: domains still not gone; the watchdog will reset this host".into(),
                    );
                }
            }
            SelfFence::Fenced { .. } => {}
        }
    }

    /// S4 (or a poison request): destroy every protected domain, stop
    /// petting the watchdog (may_pet), give up the master lease.
    fn start_self_fence(&mut self, now: Instant) {
        if self.self_fence != SelfFence::Healthy {
            return;
        }
        self.self_fence = SelfFence::Fencing { since: now };
        self.release_master(now);
        if let Some(l) = self.master_lease
            && l.owner == Some(self.me())
        {
            self.give_up_master(l.generation);
        }
        let doms: Vec<DomainId> = self.local.keys().copied().collect();
        for d in doms {
            self.force_stop(now, d);
        }
        self.check_fence_done(now);
    }

    /// We stopped acting as master: that generation is given up (S3(c)).
    pub(super) fn give_up_master(&mut self, generation: u64) {
        self.released_master = Some(generation);
    }

    /// Self-fence one domain. Its lease is published as released only once
    /// qemu is confirmed gone.
    fn force_stop(&mut self, now: Instant, d: DomainId) {
        let release = AfterStop::Release { failed_start: false };
        match self.local.get(&d).map(|l| (l.state, l.generation)) {
            Some((LocalState::Stopping { kill_at, .. }, _)) => {
                self.set_state(d, LocalState::Stopping { kill_at, then: release });
            }
            Some((LocalState::Verifying | LocalState::Backoff { .. }, g))
                if self.local.get(&d).is_none_or(|l| l.incoming_since.is_none() && !l.start_in_doubt) =>
            {
                // Not running here (a renew in flight may still land: then
                // the lease is ours at a newer generation and stays so).
                self.local.remove(&d);
                if let Some(g) = g {
                    self.release(now, d, g, false);
                }
            }
            Some(_) => {
                if let Some(l) = self.local.get_mut(&d) {
                    l.state = LocalState::Stopping { kill_at: now + self.t.io_timeout, then: release };
                }
                self.actions.push_back(Action::DestroyDomain { domain: d, kill: false });
            }
            None => {}
        }
    }

    pub(super) fn check_fence_done(&mut self, now: Instant) {
        if matches!(self.self_fence, SelfFence::Fencing { .. }) && self.local.is_empty() {
            self.self_fence = SelfFence::Fenced { since: now };
            self.assignments_seen.clear();
            self.emit(now, "node", "self-fence done: no protected domain runs here".into());
        }
    }

    /// We hear a peer or an isolation address: our own network works, so a
    /// silent peer is its problem, not ours. Nobody is fenced otherwise.
    pub(super) fn network_ok(&self, now: Instant) -> bool {
        let recent = |t: Option<Instant>| t.is_some_and(|t| now.since(t) < self.t.suspect_after);
        !self.isolated && (self.peers.values().any(|p| recent(p.heard_at)) || recent(self.last_probe_ok))
    }

    fn check_isolation(&mut self, now: Instant) {
        if self.peers.is_empty() {
            return;
        }
        let last_peer =
            self.peers.values().filter_map(|p| p.heard_at).max().unwrap_or(self.started).max(self.observing_since);
        let silent = now.since(last_peer);
        if silent >= self.t.suspect_after && now >= self.next_probe {
            // Probe the isolation addresses while the silence lasts.
            self.next_probe = now + self.t.net_heartbeat_interval;
            self.actions.push_back(Action::ProbeIsolation);
        }
        let probe_silent = now.since(self.last_probe_ok.unwrap_or(self.started).max(self.observing_since));
        let isolated = silent >= self.t.isolation_timeout && probe_silent >= self.t.isolation_timeout;
        if isolated && !self.isolated {
            self.isolated = true;
            self.emit(now, "node", "isolated: no peer and no isolation address answers".into());
            self.apply_isolation_response(now);
        } else if !isolated && self.isolated {
            self.isolated = false;
            self.emit(now, "node", "isolation over".into());
        }
    }

    fn apply_isolation_response(&mut self, now: Instant) {
        let doms: Vec<(DomainId, IsolationResponse)> = self
            .local
            .keys()
            .filter_map(|d| self.cfg.spec.domains.get(d).map(|s| (*d, s.policy.isolation_response)))
            .collect();
        for (d, resp) in doms {
            let release = AfterStop::Release { failed_start: false };
            match resp {
                IsolationResponse::Keep => {}
                IsolationResponse::Shutdown => {
                    self.emit(now, "node", format!("isolation response: shutting down {}", self.domain_name(d)));
                    self.stop_domain(now, d, true, release);
                }
                IsolationResponse::Poweroff => {
                    self.emit(now, "node", format!("isolation response: powering off {}", self.domain_name(d)));
                    self.stop_domain(now, d, false, release);
                }
            }
        }
    }

    /// Kills after a stuck stop, restarts after a backoff, readiness probes.
    fn local_timers(&mut self, now: Instant) {
        if now >= self.next_readiness_poll {
            self.next_readiness_poll = now + READINESS_POLL;
            let probes: Vec<(DomainId, Readiness)> = self
                .local
                .iter()
                .filter(|(_, l)| l.state == LocalState::Running)
                .filter_map(|(d, _)| self.cfg.spec.domains.get(d).map(|s| (*d, s.policy.readiness)))
                .filter(|(_, r)| *r != Readiness::Started)
                .collect();
            for (domain, readiness) in probes {
                self.actions.push_back(Action::ProbeReadiness { domain, readiness });
            }
        }
        let doms: Vec<(DomainId, LocalState)> = self.local.iter().map(|(d, l)| (*d, l.state)).collect();
        for (d, s) in doms {
            match s {
                LocalState::Stopping { kill_at, then } if now >= kill_at => {
                    self.emit(now, "node", format!("{} did not stop in time; killing qemu", self.domain_name(d)));
                    self.set_state(d, LocalState::Stopping { kill_at: KILL_ISSUED, then });
                    self.actions.push_back(Action::DestroyDomain { domain: d, kill: true });
                }
                LocalState::Incoming { since } if now.since(since) >= super::maintenance::MIGRATION_HANDOFF_TIMEOUT => {
                    self.incoming_expired(now, d);
                }
                LocalState::Incoming { .. } => self.poll_incoming_lease(now, d),
                LocalState::Backoff { until } if now >= until => {
                    if !self.storage_healthy(now) || self.self_fence != SelfFence::Healthy {
                        continue;
                    }
                    let Some(g) = self.local.get(&d).and_then(|l| l.generation) else {
                        // Adopted while storage failed: learn the generation
                        // first (the audit answer fills it in), then retry.
                        self.set_state(d, LocalState::Backoff { until: now + self.backoff(0) });
                        let op = self.new_op(now, OpKind::LeaseRead { purpose: ReadPurpose::Audit });
                        self.actions.push_back(Action::ReadLease { op, key: LeaseKey::Domain(d) });
                        continue;
                    };
                    self.set_state(d, LocalState::Verifying);
                    self.renew_before_start(now, d, g);
                }
                _ => {}
            }
        }
    }

    fn prune_released(&mut self, now: Instant) {
        self.released.retain(|_, (_, _, at)| now.since(*at) < RELEASE_REPORT);
        self.handed_over.retain(|_, (_, _, _, at)| now.since(*at) < super::maintenance::HANDOVER_REPORT);
        let local = &self.local;
        self.incoming_polled
            .retain(|d, _| local.get(d).is_some_and(|l| matches!(l.state, LocalState::Incoming { .. })));
    }

    /// S5 audit: read the lease of one running domain per period.
    fn maybe_audit(&mut self, now: Instant) {
        if now < self.next_audit || !self.storage_healthy(now) {
            return;
        }
        self.next_audit = now + AUDIT_INTERVAL;
        let next = match self.audit_cursor {
            Some(c) => self.local.range((std::ops::Bound::Excluded(c), std::ops::Bound::Unbounded)).next(),
            None => None,
        }
        .or_else(|| self.local.iter().next())
        .map(|(d, l)| (*d, l.state));
        let Some((d, state)) = next else { return };
        self.audit_cursor = Some(d);
        if matches!(state, LocalState::Running | LocalState::Ready) {
            let op = self.new_op(now, OpKind::LeaseRead { purpose: ReadPurpose::Audit });
            self.actions.push_back(Action::ReadLease { op, key: LeaseKey::Domain(d) });
        }
    }
}

/// What our slot says about a domain in this local state.
pub(super) fn reported_state(s: LocalState) -> DomainState {
    match s {
        LocalState::Verifying | LocalState::Starting | LocalState::Backoff { .. } | LocalState::Incoming { .. } => {
            DomainState::Starting
        }
        LocalState::Adopting
        | LocalState::Running
        | LocalState::Stopping { .. }
        | LocalState::Migrating { .. }
        | LocalState::Handoff { .. } => DomainState::Running,
        LocalState::Ready => DomainState::Ready,
    }
}

/// A short lowercase word for a local state (`havirt status`).
pub fn local_word(s: LocalState) -> &'static str {
    match s {
        LocalState::Adopting => "adopting",
        LocalState::Verifying => "verifying",
        LocalState::Starting => "starting",
        LocalState::Running => "running",
        LocalState::Ready => "ready",
        LocalState::Stopping { .. } => "stopping",
        LocalState::Backoff { .. } => "backoff",
        LocalState::Migrating { .. } => "migrating",
        LocalState::Handoff { .. } => "handing-over",
        LocalState::Incoming { .. } => "incoming",
    }
}
