//! The master's duties (DESIGN.md §5): hold `master.lease`, classify hosts,
//! order fencing, and move the leases of dead hosts' domains to survivors
//! chosen by the planner. Every move is a compare-and-swap whose reason is
//! one of S3 (a), (b) or (c); the assignee verifies the lease before it starts.

use super::config::{AdmissionMode, ClusterSpec, DomainId, HostId, HostSpec, Priority, Readiness};
use super::io::*;
use super::node::{Node, OpKind, PendingOp, ReadPurpose, SelfFence};
use super::peers::{Verdict, verdict_name};
use super::planner::{self, HostRoom, PlanRequest};
use super::time::{Duration, Instant};
use std::collections::{BTreeMap, BTreeSet};

/// Lease reads in flight while a new master loads the lease table.
pub const MAX_LOAD_INFLIGHT: usize = 64;
/// Rounds over a host's fence chain before waiting for S3(b) or the operator.
pub const MAX_FENCE_ROUNDS: u32 = 10;
/// How often the master recomputes the admission-control figure.
pub const TOLERANCE_INTERVAL: Duration = Duration::from_secs(30);
/// A free master lease is taken by the lowest live host at once, by the
/// others after this much more (in case the lowest cannot).
pub const MASTER_TAKE_DELAY_PER_RANK: Duration = Duration::from_secs(2);

#[derive(Clone, Debug)]
struct Starting {
    host: HostId,
    /// The lease generation the master assigned.
    generation: u64,
    since: Instant,
    priority: Priority,
}

#[derive(Clone, Debug, Default)]
struct Retry {
    attempts: u32,
    not_before: Instant,
    avoid: Vec<HostId>,
    /// Lease generation whose failed start was already counted.
    counted_generation: u64,
}

pub struct Master {
    leases: BTreeMap<DomainId, Lease>,
    load_queue: Vec<DomainId>,
    /// Lease reads of the load in flight (at most MAX_LOAD_INFLIGHT).
    loading: BTreeMap<OpId, DomainId>,
    initial_load_done: bool,
    cas_inflight: BTreeMap<OpId, (DomainId, HostId)>,
    starting: BTreeMap<DomainId, Starting>,
    retries: BTreeMap<DomainId, Retry>,
    given_up: BTreeSet<DomainId>,
    written: BTreeMap<HostId, Assignments>,
    waiting_logged: BTreeSet<DomainId>,
    next_tolerance: Instant,
    tolerance: Option<planner::Tolerance>,
    /// The live hosts `tolerance` was computed for: a change (a host dead,
    /// back, in maintenance) recomputes it at once, not TOLERANCE_INTERVAL
    /// later, so `havirt status` never shows the figure of before.
    tolerance_hosts: BTreeSet<HostId>,
    /// The figure last logged; the log keeps the TOLERANCE_INTERVAL cadence.
    tolerance_logged: Option<planner::Tolerance>,
    /// The figure is below `[cluster] tolerate_*` (admission warn or strict): why.
    admission_breach: Option<String>,
}

impl Master {
    /// A lease value seen on storage by any of our own requests.
    pub(super) fn note_lease(&mut self, d: DomainId, l: Lease) {
        if self.leases.get(&d).is_none_or(|c| c.generation <= l.generation) {
            self.leases.insert(d, l);
        }
    }

    /// The first load (every lease, at become_master) is complete. Later
    /// reads (a newly protected domain, a CAS that timed out) hold back
    /// only their own domain: find_orphans skips a lease not in the cache,
    /// so one slow lease file does not stop every other restart.
    fn loaded(&mut self) -> bool {
        self.initial_load_done |= self.load_queue.is_empty() && self.loading.is_empty();
        self.initial_load_done
    }

    /// A newly protected domain: read its lease before acting on it (an
    /// unread lease is never free).
    pub(super) fn learn(&mut self, d: DomainId) {
        self.leases.remove(&d);
        if !self.load_queue.contains(&d) {
            self.load_queue.push(d);
        }
    }

    /// An unprotected domain: forget it entirely. A CAS in flight may still
    /// land (the lease then names its assignee), but nobody is told to start
    /// it: `domain_cas_done` ignores unprotected domains.
    pub(super) fn forget(&mut self, d: DomainId) {
        self.leases.remove(&d);
        self.load_queue.retain(|x| *x != d);
        self.cas_inflight.retain(|_, (x, _)| *x != d);
        self.starting.remove(&d);
        self.retries.remove(&d);
        self.given_up.remove(&d);
        self.waiting_logged.remove(&d);
    }

    /// Free leases of domains stopped on purpose, as cached (stopped.rs).
    pub(super) fn stopped_leases(&self) -> Vec<(DomainId, u64)> {
        self.leases
            .iter()
            .filter(|(_, l)| l.owner.is_none() && l.reason == LeaseReason::Stopped)
            .map(|(d, l)| (*d, l.generation))
            .collect()
    }

    /// A host that went silent may have taken a free `Stopped` lease by
    /// `havirt start` (read, CAS, start) and died before its slot said so:
    /// read those leases again, or that domain would stay down (L1).
    fn reread_stopped(&mut self) {
        let stopped: Vec<DomainId> = self.stopped_leases().into_iter().map(|(d, _)| d).collect();
        for d in stopped {
            self.learn(d);
        }
    }

    /// The lease generation in our cache, if read.
    pub(super) fn lease_generation(&self, d: DomainId) -> Option<u64> {
        self.leases.get(&d).map(|l| l.generation)
    }

    /// Admission control: (host, fault-domain) failures absorbable, once computed.
    pub(super) fn tolerance(&self) -> Option<(u32, u32)> {
        self.tolerance.map(|t| (t.host_failures, t.fault_domain_failures))
    }

    /// Admission control (warn and strict): why the figure is below the
    /// requirement, while it is.
    pub(super) fn admission_breach(&self) -> Option<&str> {
        self.admission_breach.as_deref()
    }

    /// Domains assigned and not yet reported running, with their host.
    pub(super) fn starting_hosts(&self) -> impl Iterator<Item = (DomainId, HostId)> + '_ {
        self.starting.iter().map(|(d, s)| (*d, s.host))
    }

    /// Domains given up on after max_restarts failed starts (alerts).
    pub(super) fn given_up(&self) -> Vec<DomainId> {
        self.given_up.iter().copied().collect()
    }
}

#[derive(Clone, Debug)]
pub struct FenceJob {
    boot: BootId,
    agent: usize,
    round: u32,
    op: Option<OpId>,
    next_try: Instant,
    /// Agents of the chain that wrote a poison request in this job.
    requested: BTreeSet<usize>,
}

impl FenceJob {
    fn new(boot: BootId, next_try: Instant) -> FenceJob {
        FenceJob { boot, agent: 0, round: 0, op: None, next_try, requested: BTreeSet::new() }
    }
}

/// One domain that needs a new home this round.
struct Orphan {
    domain: DomainId,
    lease: Lease,
    reason: LeaseReason,
}

impl Node {
    // ---- master lease -------------------------------------------------

    pub(super) fn master_tick(&mut self, now: Instant) {
        if self.master.is_some() && !self.storage_healthy(now) {
            self.emit(now, "master", "stepping down: own storage heartbeat is failing".into());
            self.master = None;
        }
        // The master re-reads its lease too: if someone took it (S3), it
        // stops acting at once, so at most one master acts on its cache.
        if now >= self.next_master_check && self.storage_healthy(now) {
            self.next_master_check = now + super::node::MASTER_CHECK_INTERVAL;
            let op = self.new_op(now, OpKind::LeaseRead { purpose: ReadPurpose::Master });
            self.actions.push_back(Action::ReadLease { op, key: LeaseKey::Master });
        }
        self.log_verdicts(now);
        self.start_fence_jobs(now);
        self.fence_tick(now);
        self.master_load(now);
    }

    pub(super) fn release_master(&mut self, now: Instant) {
        if self.master.take().is_some() {
            self.emit(now, "master", "stepping down".into());
        }
    }

    /// The master lease was read: reclaim it, or take it if it is free or its
    /// owner is dead by S3, when we are the lowest live host.
    pub(super) fn consider_master(&mut self, now: Instant) {
        let Some(lease) = self.master_lease else {
            return;
        };
        if self.master.is_some() {
            if lease.owner != Some(self.me()) {
                self.emit(now, "master", "stepping down: the master lease is no longer ours".into());
                self.master = None;
            }
            return;
        }
        if !self.storage_healthy(now) || self.self_fence != SelfFence::Healthy {
            return;
        }
        if self.ops.values().any(|p| p.kind == OpKind::MasterCas) {
            return;
        }
        // Even our own lease is re-taken by CAS (we may have released it
        // when we self-fenced, and another host may be taking it now).
        let reason = match lease.owner {
            None => Some(LeaseReason::Acquired),
            Some(o) if o == self.me() => Some(LeaseReason::Renewed),
            Some(o) => self.takeover_reason(now, o, LeaseKey::Master, lease.generation),
        };
        let Some(reason) = reason else {
            self.master_takeable_since = None;
            return;
        };
        if reason != LeaseReason::Renewed && !self.my_turn_for_master(now) {
            return;
        }
        let op = self.new_op(now, OpKind::MasterCas);
        let new = Lease { owner: Some(self.me()), generation: lease.generation + 1, reason };
        self.actions.push_back(Action::CasLease {
            op,
            key: LeaseKey::Master,
            expect_generation: lease.generation,
            new,
        });
    }

    /// A free or dead master's lease goes to the lowest live host first; the
    /// others wait MASTER_TAKE_DELAY_PER_RANK per lower live host (in case it
    /// cannot), counted from when they first saw the lease takeable.
    fn my_turn_for_master(&mut self, now: Instant) -> bool {
        if now.since(self.observing_since) < self.t.suspect_after.max(self.t.storage_silent_after) {
            // Know who is alive first.
            return false;
        }
        let since = *self.master_takeable_since.get_or_insert(now);
        let rank = self.live_rank(now) as u64;
        rank == 0 || now.since(since) >= MASTER_TAKE_DELAY_PER_RANK.saturating_mul(rank)
    }

    /// How many live hosts have a lower id than us.
    fn live_rank(&self, now: Instant) -> usize {
        let me = self.cfg.host;
        self.peers.iter().filter(|(h, _)| **h < me).filter(|(_, p)| self.verdict_of(now, p) == Verdict::Alive).count()
    }

    fn become_master(&mut self, now: Instant, how: &str) {
        self.emit(now, "master", format!("became master ({how})"));
        self.master_takeable_since = None;
        let load_queue: Vec<DomainId> = self.cfg.spec.domains.keys().rev().copied().collect();
        self.master = Some(Master {
            leases: BTreeMap::new(),
            load_queue,
            loading: BTreeMap::new(),
            initial_load_done: false,
            cas_inflight: BTreeMap::new(),
            starting: BTreeMap::new(),
            retries: BTreeMap::new(),
            given_up: BTreeSet::new(),
            written: BTreeMap::new(),
            waiting_logged: BTreeSet::new(),
            next_tolerance: now,
            tolerance: None,
            tolerance_hosts: BTreeSet::new(),
            tolerance_logged: None,
            admission_breach: None,
        });
        self.master_load(now);
    }

    /// A new master reads every domain lease once; after that its cache is
    /// kept by its own CAS results (a conflict returns the current lease).
    pub(super) fn master_load(&mut self, now: Instant) {
        let mut reads = Vec::new();
        if let Some(m) = self.master.as_mut() {
            let room = MAX_LOAD_INFLIGHT.saturating_sub(m.loading.len());
            reads.extend(std::iter::from_fn(|| m.load_queue.pop()).take(room));
        }
        for d in reads {
            let op = self.new_op(now, OpKind::LeaseRead { purpose: ReadPurpose::MasterLoad });
            self.actions.push_back(Action::ReadLease { op, key: LeaseKey::Domain(d) });
            if let Some(m) = self.master.as_mut() {
                m.loading.insert(op, d);
            }
        }
    }

    /// A load read that timed out is read again (its late answer, if any,
    /// is ignored): without this the master would wait for it forever.
    pub(super) fn master_load_expired(&mut self, op: OpId) {
        let spec = self.cfg.spec.clone();
        let Some(m) = self.master.as_mut() else {
            return;
        };
        if let Some(d) = m.loading.remove(&op)
            && spec.domains.contains_key(&d)
        {
            m.load_queue.push(d);
        }
    }

    pub(super) fn master_loaded(&mut self, now: Instant, op: OpId, d: DomainId, result: Result<Lease, StorageError>) {
        let protected = self.cfg.spec.domains.contains_key(&d);
        let Some(m) = self.master.as_mut() else {
            return;
        };
        if m.loading.remove(&op).is_none() {
            // Asked by an earlier term of ours as master.
            return;
        }
        match result {
            // The newest of two reads in flight wins (unprotected and
            // protected again while the first was out).
            Ok(l) if protected => m.note_lease(d, l),
            Err(_) if protected => m.load_queue.push(d),
            // Unprotected while the read was out.
            _ => {}
        }
        self.master_load(now);
    }

    pub(super) fn handle_cas(
        &mut self,
        now: Instant,
        op: OpId,
        key: LeaseKey,
        result: Result<CasOutcome, StorageError>,
    ) {
        let pending = self.finish_op(now, op);
        match pending {
            Some(PendingOp { kind: OpKind::Renew(d), .. }) => return self.renewed(now, d, result),
            Some(PendingOp { kind: OpKind::Park(d), .. }) => return self.park_cas(now, d, result),
            Some(PendingOp { kind: OpKind::OperatorStart(d), .. }) => return self.operator_start_cas(now, d, result),
            _ => {}
        }
        if let Some(PendingOp { kind: OpKind::Handoff(d), .. }) = pending {
            self.handed_over(now, d, Some(result));
            return;
        }
        let inflight = self.master.as_mut().and_then(|m| m.cas_inflight.remove(&op));
        let Some(_) = pending else {
            // Timed out: the CAS may or may not have happened; re-read.
            if let LeaseKey::Domain(d) = key
                && self.cfg.spec.domains.contains_key(&d)
                && let Some(m) = self.master.as_mut()
            {
                m.leases.remove(&d);
                m.load_queue.push(d);
            }
            return;
        };
        match (key, result) {
            (LeaseKey::Master, Ok(CasOutcome::Done(l))) => {
                self.master_lease = Some(l);
                if self.master.is_some() {
                    return;
                }
                let how = match l.reason {
                    LeaseReason::Renewed => "renewed its own lease",
                    LeaseReason::FenceConfirmed => "old master fenced",
                    LeaseReason::HostDeadTimeout => "old master dead by host_dead_timeout",
                    LeaseReason::Released => "old master released it",
                    _ => "lease was free",
                };
                self.become_master(now, how);
            }
            (LeaseKey::Master, Ok(CasOutcome::Conflict(l))) => self.master_lease = Some(l),
            (LeaseKey::Master, Err(_)) => {}
            (LeaseKey::Domain(d), result) => self.domain_cas_done(now, d, inflight.map(|x| x.1), result),
        }
    }

    fn domain_cas_done(
        &mut self,
        now: Instant,
        d: DomainId,
        to: Option<HostId>,
        result: Result<CasOutcome, StorageError>,
    ) {
        if !self.cfg.spec.domains.contains_key(&d) {
            // Unprotected while the CAS was out: the lease may name the
            // assignee now, but nobody is asked to start the domain.
            return;
        }
        let Some(m) = self.master.as_mut() else {
            return;
        };
        match result {
            Ok(CasOutcome::Done(l)) => {
                m.leases.insert(d, l);
                let Some(to) = to else { return };
                let priority = self.cfg.spec.domains.get(&d).map_or(Priority::Medium, |s| s.policy.priority);
                m.starting.insert(d, Starting { host: to, generation: l.generation, since: now, priority });
                if to == self.cfg.host {
                    self.handle_assignment(now, d, l.generation);
                } else {
                    let msg = NetMessage::Assign { from: self.cfg.host, domains: vec![(d, l.generation)] };
                    self.actions.push_back(Action::Send { to: Some(to), msg });
                }
            }
            Ok(CasOutcome::Conflict(l)) => {
                m.leases.insert(d, l);
            }
            Err(_) => {
                m.leases.remove(&d);
                m.load_queue.push(d);
            }
        }
    }

    // ---- S3 -----------------------------------------------------------

    pub(super) fn verdict_of(&self, now: Instant, p: &super::peers::Peer) -> Verdict {
        if now.since(self.observing_since) < self.t.suspect_after.max(self.t.storage_silent_after) {
            return Verdict::Unknown;
        }
        p.verdict(now, self.last_read_issued(), self.reads_fresh(now), &self.t)
    }

    /// Why the lease held by `owner` may be taken now, if it may (S3).
    pub(super) fn takeover_reason(
        &self,
        _now: Instant,
        owner: Owner,
        key: LeaseKey,
        generation: u64,
    ) -> Option<LeaseReason> {
        if owner.host == self.cfg.host {
            // Our own lease: free to move only if we released that generation.
            let released = match key {
                LeaseKey::Domain(d) => self.released.get(&d).map(|r| r.0),
                LeaseKey::Master => None,
            };
            if owner.boot != self.cfg.boot {
                // A lease of our previous boot: that boot's qemu is gone.
                cov_mark::hit!(s3a_off);
                return Some(LeaseReason::FenceConfirmed);
            }
            let released = released.filter(|g| *g >= generation);
            if released.is_some() {
                cov_mark::hit!(s3c_released);
            }
            return released.map(|_| LeaseReason::Released);
        }
        #[cfg(test)]
        if self.cfg.broken_skip_s3 && self.peers.get(&owner.host).is_some_and(|p| !p.net_fresh(_now, &self.t)) {
            return Some(LeaseReason::HostDeadTimeout);
        }
        let Some(peer) = self.peers.get(&owner.host) else {
            // Not a member any more: only the operator can say it is off.
            return None;
        };
        // S3(a): that boot is off, confirmed by a fence agent or the operator.
        if peer.fenced_boots.contains(&owner.boot) {
            cov_mark::hit!(s3a_off);
            return Some(LeaseReason::FenceConfirmed);
        }
        if peer.current_boot().is_some_and(|b| b != owner.boot) {
            // It rebooted since it took the lease: that boot's qemu is gone.
            cov_mark::hit!(s3a_off);
            return Some(LeaseReason::FenceConfirmed);
        }
        // S3(c): it said it released this generation.
        if peer.released(owner.boot, key).is_some_and(|(g, _)| g >= generation) {
            cov_mark::hit!(s3c_released);
            return Some(LeaseReason::Released);
        }
        // S3(b): its storage heartbeat stopped for host_dead_timeout.
        let watchdog = self.cfg.spec.host(owner.host).is_some_and(|h| h.watchdog);
        let issued = self.last_read_issued()?;
        #[cfg(test)]
        if self.broken_ignore_stop_notice
            && watchdog
            && peer.silent_for_host_dead_timeout(issued, self.all_lost_claimed, &self.t)
        {
            return Some(LeaseReason::HostDeadTimeout);
        }
        if watchdog && peer.dead_by_timeout(issued, self.all_lost_claimed, &self.t) {
            cov_mark::hit!(s3b_dead_by_timeout);
            return Some(LeaseReason::HostDeadTimeout);
        }
        None
    }

    // ---- verdicts and fencing -------------------------------------------

    fn log_verdicts(&mut self, now: Instant) {
        if self.master.is_none() {
            return;
        }
        let mut changes = Vec::new();
        for (h, p) in &self.peers {
            let v = self.verdict_of(now, p);
            if self.verdicts.get(h) != Some(&v) {
                changes.push((*h, v));
            }
        }
        for (h, v) in changes {
            let first = !self.verdicts.contains_key(&h);
            self.verdicts.insert(h, v);
            if v == Verdict::Suspect
                && let Some(m) = self.master.as_mut()
            {
                m.reread_stopped();
            }
            if !(first && v == Verdict::Alive) {
                self.emit(now, "master", format!("{h} is {}", verdict_name(v)));
            }
        }
    }

    /// Suspect hosts that hold leases are fenced by the master; the master's
    /// own host is fenced by the lowest live host, which then takes over.
    fn start_fence_jobs(&mut self, now: Instant) {
        if !self.storage_healthy(now) || !self.network_ok(now) {
            return;
        }
        let master_owner = self.master_lease.and_then(|l| l.owner);
        let deputy = self.master.is_none() && self.live_rank(now) == 0;
        let mut targets = Vec::new();
        for (h, p) in &self.peers {
            if self.verdict_of(now, p) != Verdict::Suspect || self.fence_jobs.contains_key(h) {
                continue;
            }
            let Some(boot) = p.current_boot() else {
                continue;
            };
            if p.fenced_boots.contains(&boot) {
                continue;
            }
            let holds = match &self.master {
                Some(m) => m.leases.values().any(|l| l.owner.is_some_and(|o| o.host == *h && o.boot == boot)),
                None => deputy && master_owner.is_some_and(|o| o.host == *h && o.boot == boot),
            };
            if holds {
                targets.push((*h, boot));
            }
        }
        for (h, boot) in targets {
            let agents = self.cfg.spec.host(h).map(|s| s.fence_agents.len()).unwrap_or(0);
            if agents == 0 {
                if self.fence_jobs.insert(h, FenceJob::new(boot, Instant(u64::MAX))).is_none() {
                    let unguarded = self.peers.get(&h).is_some_and(|p| p.unguarded());
                    let how = if unguarded {
                        "its daemon stopped and nothing resets it (systemd watchdog): \
                         waiting for its daemon or the operator (havirt fence confirm)"
                    } else if self.cfg.spec.host(h).is_some_and(|s| s.watchdog) {
                        "waiting for host_dead_timeout"
                    } else {
                        "no watchdog either: waiting for the operator (havirt fence confirm)"
                    };
                    self.emit(now, "fence", format!("{h} has no fence agent; {how}"));
                }
                continue;
            }
            self.fence_jobs.insert(h, FenceJob::new(boot, now));
        }
    }

    fn fence_tick(&mut self, now: Instant) {
        let hosts: Vec<HostId> = self.fence_jobs.keys().copied().collect();
        for h in hosts {
            let Some(p) = self.peers.get(&h) else {
                continue;
            };
            let v = self.verdict_of(now, p);
            let boot_now = p.current_boot();
            let job = self.fence_jobs[&h].clone();
            if p.fenced_boots.contains(&job.boot) || boot_now != Some(job.boot) {
                self.fence_jobs.remove(&h);
                continue;
            }
            if matches!(v, Verdict::Alive | Verdict::Partitioned | Verdict::Isolated | Verdict::StorageLost) {
                if job.op.is_none() {
                    self.emit(now, "fence", format!("{h} is {} again; fencing cancelled", verdict_name(v)));
                    self.fence_jobs.remove(&h);
                }
                continue;
            }
            if v != Verdict::Suspect || job.op.is_some() || now < job.next_try || !self.network_ok(now) {
                continue;
            }
            let Some(agent) = self.cfg.spec.host(h).and_then(|s| s.fence_agents.get(job.agent)).cloned() else {
                continue;
            };
            self.emit(now, "fence", format!("fencing {h} with {agent} (round {})", job.round + 1));
            let op = self.new_op(now, OpKind::Fence);
            if let Some(j) = self.fence_jobs.get_mut(&h) {
                j.op = Some(op);
            }
            self.actions.push_back(Action::Fence { op, target: h, agent });
        }
    }

    pub(super) fn handle_fence_result(&mut self, now: Instant, op: OpId, target: HostId, outcome: FenceOutcome) {
        if self.finish_op(now, op).is_none() {
            return;
        }
        let Some(job) = self.fence_jobs.get(&target).cloned() else {
            return;
        };
        if job.op != Some(op) {
            return;
        }
        match outcome {
            FenceOutcome::Confirmed => self.fence_confirmed(now, target, job.boot, "fence agent"),
            FenceOutcome::Failed => self.fence_attempt_failed(now, target, "failed"),
            FenceOutcome::Requested => {
                let text = format!("poison request written for {target}; it counts only after host_dead_timeout");
                self.emit(now, "fence", text);
                if let Some(j) = self.fence_jobs.get_mut(&target) {
                    j.requested.insert(j.agent);
                }
                self.advance_fence_chain(now, target);
            }
        }
    }

    pub(super) fn fence_timed_out(&mut self, now: Instant, op: OpId) {
        let target = self.fence_jobs.iter().find(|(_, j)| j.op == Some(op)).map(|(h, _)| *h);
        if let Some(h) = target {
            self.fence_attempt_failed(now, h, "timed out");
        }
    }

    fn fence_attempt_failed(&mut self, now: Instant, target: HostId, how: &str) {
        let agent = self.fence_jobs.get(&target).map(|j| j.agent);
        let name = agent.and_then(|i| self.cfg.spec.host(target)?.fence_agents.get(i).cloned()).unwrap_or_default();
        self.emit(now, "fence", format!("fencing {target} with {name} {how}"));
        self.advance_fence_chain(now, target);
    }

    /// Move to the next agent that can still confirm; after the whole chain,
    /// wait fence_retry_backoff; after MAX_FENCE_ROUNDS, or when only poison
    /// agents are left, wait for S3(b) or the operator.
    fn advance_fence_chain(&mut self, now: Instant, target: HostId) {
        let agents = self.cfg.spec.host(target).map_or(0, |s| s.fence_agents.len());
        let backoff = self.t.fence_retry_backoff;
        let Some(job) = self.fence_jobs.get_mut(&target) else {
            return;
        };
        job.op = None;
        for _ in 0..agents {
            job.agent += 1;
            if job.agent >= agents {
                job.agent = 0;
                job.round += 1;
                job.next_try = now + backoff;
            }
            if !job.requested.contains(&job.agent) {
                break;
            }
        }
        let only_poison = job.requested.len() >= agents;
        let gave_up = job.round >= MAX_FENCE_ROUNDS || only_poison;
        if gave_up {
            job.next_try = Instant(u64::MAX);
        }
        if gave_up {
            let why = if only_poison { "only poison requests are left" } else { "giving up fencing" };
            let text = format!("{why} for {target}; waiting for host_dead_timeout or the operator");
            self.emit(now, "fence", text);
        }
    }

    fn fence_confirmed(&mut self, now: Instant, target: HostId, boot: BootId, by: &str) {
        self.fence_jobs.remove(&target);
        if let Some(p) = self.peers.get_mut(&target) {
            p.fenced_boots.insert(boot);
        }
        self.emit(now, "fence", format!("{target} confirmed powered off ({by})"));
        if let Some(m) = self.master.as_mut() {
            m.reread_stopped();
        }
        let op = self.new_op(now, OpKind::Record);
        let record = FencedRecord { host: target, boot, by: self.cfg.host };
        self.actions.push_back(Action::WriteFenced { op, record });
        // A dead master's lease can go at once.
        if self.master.is_none() {
            self.next_master_check = now;
        }
    }

    pub(super) fn handle_operator_confirm(&mut self, now: Instant, h: HostId) {
        let Some(boot) = self.peers.get(&h).and_then(|p| p.current_boot()) else {
            self.emit(now, "fence", format!("operator confirm for {h} ignored: host never seen"));
            return;
        };
        self.fence_confirmed(now, h, boot, "operator");
    }

    // ---- placement ----------------------------------------------------

    /// One planning round, after every storage read.
    pub(super) fn master_round(&mut self, now: Instant) {
        let ready = self.master.as_mut().is_some_and(|m| m.loaded());
        if !ready || !self.storage_healthy(now) || !self.reads_fresh(now) {
            return;
        }
        let reports = self.domain_reports();
        self.follow_reported_generations();
        self.track_starting(now, &reports);
        let orphans = self.find_orphans(now);
        let calm = orphans.is_empty();
        self.place(now, orphans, &reports);
        self.write_assignments(now, &reports);
        if calm {
            self.admission_figure(now, &reports);
        }
    }

    /// Admission control (DESIGN.md §6): how many host and fault-domain
    /// failures the live hosts can absorb with what runs now. Recomputed
    /// every TOLERANCE_INTERVAL while nothing is orphaned, and logged then
    /// when it changed; recomputed at once (not logged) when the set of
    /// live hosts changed: a dead host must not count in `havirt status`.
    /// Below `[cluster] tolerate_*` (admission warn or strict), the log line
    /// says so and why.
    fn admission_figure(&mut self, now: Instant, reports: &BTreeMap<DomainId, (HostId, DomainReport)>) {
        let Some(m) = self.master.as_ref() else { return };
        let due = now >= m.next_tolerance;
        if !due {
            let rooms: BTreeSet<HostId> = self.host_rooms(now, reports).iter().map(|r| r.id).collect();
            if m.tolerance_hosts == rooms {
                return;
            }
        }
        let admission = self.admission_from(now, reports);
        let rooms = admission.hosts();
        let t = admission.tolerance();
        let breach = (admission.policy().mode != AdmissionMode::Off).then(|| admission.below(t)).flatten();
        let Some(m) = self.master.as_mut() else { return };
        m.tolerance = Some(t);
        m.tolerance_hosts = rooms;
        m.admission_breach = breach.clone();
        if !due {
            return;
        }
        m.next_tolerance = now + TOLERANCE_INTERVAL;
        if m.tolerance_logged != Some(t) {
            m.tolerance_logged = Some(t);
            let mut text = format!(
                "cluster tolerates {} host failure(s), {} fault-domain failure(s) ({} live hosts)",
                t.host_failures,
                t.fault_domain_failures,
                m.tolerance_hosts.len()
            );
            if let Some(why) = breach {
                text.push_str(&format!("; admission control: {why}"));
            }
            self.emit(now, "master", text);
        }
    }

    /// Where each domain is reported to run, from every current slot and
    /// our own local state.
    pub(super) fn domain_reports(&self) -> BTreeMap<DomainId, (HostId, DomainReport)> {
        let mut out = BTreeMap::new();
        for (h, p) in &self.peers {
            let Some(slot) = &p.slot else { continue };
            if p.current_boot() != Some(slot.boot) {
                continue;
            }
            for (d, r) in &slot.domains {
                if !matches!(
                    r.state,
                    DomainState::Released { .. } | DomainState::HandedOver { .. } | DomainState::Stopped
                ) {
                    out.insert(*d, (*h, *r));
                }
            }
        }
        for (d, l) in &self.local {
            if matches!(l.state, super::node::LocalState::Incoming { .. }) {
                continue;
            }
            let state = match l.state {
                super::node::LocalState::Ready => DomainState::Ready,
                super::node::LocalState::Running
                | super::node::LocalState::Adopting
                | super::node::LocalState::Migrating { .. }
                | super::node::LocalState::Handoff { .. } => DomainState::Running,
                _ => DomainState::Starting,
            };
            out.insert(*d, (self.cfg.host, DomainReport { state, generation: l.generation.unwrap_or(0) }));
        }
        out
    }

    /// Owners renew their leases before every start and report the
    /// generation they hold: follow them, so that a takeover CAS after their
    /// death does not first fail on a stale generation.
    fn follow_reported_generations(&mut self) {
        let mut seen = Vec::new();
        for (h, p) in &self.peers {
            let Some(slot) = &p.slot else { continue };
            for (d, r) in &slot.domains {
                // Only protected domains: a peer with another registry view
                // may report one we do not manage.
                if !self.cfg.spec.domains.contains_key(d) {
                    continue;
                }
                if let DomainState::HandedOver { to, boot } = r.state {
                    let owner = Owner { host: to, boot };
                    seen.push((
                        *d,
                        Lease { owner: Some(owner), generation: r.generation, reason: LeaseReason::Migrated },
                    ));
                } else if r.state == DomainState::Stopped {
                    // Freed by its owner when it stopped on purpose.
                    seen.push((*d, Lease { owner: None, generation: r.generation, reason: LeaseReason::Stopped }));
                } else if r.generation > 0 && !matches!(r.state, DomainState::Released { .. }) {
                    let owner = Owner { host: *h, boot: slot.boot };
                    seen.push((
                        *d,
                        Lease { owner: Some(owner), generation: r.generation, reason: LeaseReason::Renewed },
                    ));
                }
            }
        }
        if let Some(m) = self.master.as_mut() {
            for (d, l) in seen {
                m.note_lease(d, l);
            }
        }
    }

    fn track_starting(&mut self, now: Instant, reports: &BTreeMap<DomainId, (HostId, DomainReport)>) {
        let spec = self.cfg.spec.clone();
        let mut events = Vec::new();
        let Some(m) = self.master.as_mut() else {
            return;
        };
        m.starting.retain(|d, s| {
            // Ready where it was assigned, or wherever a later generation
            // took it (a failback right after the start hands it over): a
            // dead host's slot may still say Ready for an older run.
            let ready = reports
                .get(d)
                .is_some_and(|(h, r)| r.state == DomainState::Ready && (*h == s.host || r.generation > s.generation));
            let timeout = spec.domains.get(d).map_or(Duration::ZERO, |x| x.policy.readiness_timeout);
            if !ready && now.since(s.since) >= timeout {
                events.push(format!(
                    "{} not ready after {}; no longer holding back lower priorities",
                    spec.domain_name(*d),
                    timeout
                ));
                return false;
            }
            if ready {
                m.retries.remove(d);
            }
            !ready
        });
        // Given up on, yet running again under a newer lease (its owner
        // retried it once its release aged out): judged afresh if it stops
        // again, or it would never be restarted after a later failure (L1).
        // A dead host's slot still lists its old run: only a generation
        // past the last counted failure counts.
        let runs = |d: &DomainId| {
            let counted = m.retries.get(d).map_or(0, |r| r.counted_generation);
            reports.get(d).is_some_and(|(_, r)| {
                matches!(r.state, DomainState::Running | DomainState::Ready) && r.generation > counted
            })
        };
        let again: Vec<DomainId> = m.given_up.iter().filter(|d| runs(d)).copied().collect();
        for d in again {
            m.given_up.remove(&d);
            m.retries.remove(&d);
        }
        for e in events {
            self.emit(now, "master", e);
        }
    }

    fn find_orphans(&mut self, now: Instant) -> Vec<Orphan> {
        let Some(m) = self.master.as_ref() else {
            return Vec::new();
        };
        let busy: BTreeSet<DomainId> = m.cas_inflight.values().map(|(d, _)| *d).collect();
        // S3(b) only with a registry read issued within host_dead_timeout
        // (Input::ProtectedDomains says why).
        let registry_stale = now.since(self.registry_read_issued) > self.t.host_dead_timeout;
        let mut held_back: Vec<DomainId> = Vec::new();
        let mut out = Vec::new();
        for (d, spec) in &self.cfg.spec.domains {
            if spec.policy.priority == Priority::Disabled || m.given_up.contains(d) || busy.contains(d) {
                continue;
            }
            let Some(lease) = m.leases.get(d).copied() else {
                continue;
            };
            // Judged by the lease alone: a dead owner's slot still lists the
            // domain as running, so reports do not count here.
            let reason = match lease.owner {
                // Stopped on purpose: only the operator starts it (stopped.rs).
                None if lease.reason == LeaseReason::Stopped => continue,
                None => Some(LeaseReason::Acquired),
                Some(o) => self.takeover_reason(now, o, LeaseKey::Domain(*d), lease.generation),
            };
            if registry_stale && matches!(reason, Some(LeaseReason::HostDeadTimeout)) {
                held_back.push(*d);
                continue;
            }
            if let Some(reason) = reason {
                out.push(Orphan { domain: *d, lease, reason });
            }
        }
        if !registry_stale {
            self.registry_stale_logged = false;
        } else if let Some(d) = held_back.first()
            && !self.registry_stale_logged
        {
            self.registry_stale_logged = true;
            let text = format!(
                "not taking {} (and {} more) by host_dead_timeout: the protected-domain registry was last read {} ago",
                self.domain_name(*d),
                held_back.len() - 1,
                now.since(self.registry_read_issued)
            );
            self.emit(now, "master", text);
        }
        self.count_failed_starts(now, &out);
        out
    }

    /// A start that failed on its assignee counts toward max_restarts.
    fn count_failed_starts(&mut self, now: Instant, orphans: &[Orphan]) {
        let mut events = Vec::new();
        for o in orphans {
            let Some(owner) = o.lease.owner else { continue };
            let key = LeaseKey::Domain(o.domain);
            let failed = self
                .peers
                .get(&owner.host)
                .and_then(|p| p.released(owner.boot, key))
                .is_some_and(|(g, failed_start)| failed_start && g >= o.lease.generation);
            let failed = failed || (owner.host == self.cfg.host && self.released.get(&o.domain).is_some_and(|r| r.1));
            if !failed {
                continue;
            }
            let max = self.cfg.spec.domains.get(&o.domain).map_or(0, |s| s.policy.max_restarts);
            let backoff = self.backoff(0);
            let Some(m) = self.master.as_mut() else {
                return;
            };
            let r = m.retries.entry(o.domain).or_default();
            if r.counted_generation >= o.lease.generation {
                continue;
            }
            r.counted_generation = o.lease.generation;
            r.attempts += 1;
            r.avoid.push(owner.host);
            let delay = Duration(backoff.as_millis().saturating_mul(1 << r.attempts.min(10)));
            r.not_before = now + delay.min(self.t.restart_backoff_max);
            m.starting.remove(&o.domain);
            if r.attempts > max {
                m.given_up.insert(o.domain);
                events.push(format!(
                    "giving up on {}: {} failed starts (max_restarts {max})",
                    self.cfg.spec.domain_name(o.domain),
                    r.attempts
                ));
            }
        }
        for e in events {
            self.emit(now, "master", e);
        }
    }

    fn place(&mut self, now: Instant, orphans: Vec<Orphan>, reports: &BTreeMap<DomainId, (HostId, DomainReport)>) {
        if let Some(m) = self.master.as_mut() {
            // An orphan again: its start failed or its host died.
            for o in &orphans {
                m.starting.remove(&o.domain);
            }
        }
        let spec = self.cfg.spec.clone();
        let (requests, held_back) = self.gate_requests(now, &orphans, &spec);
        for d in held_back {
            self.log_waiting(now, d, "higher priorities not ready yet".into());
        }
        if requests.is_empty() {
            return;
        }
        let rooms = self.host_rooms(now, reports);
        let plan = planner::plan(&rooms, &requests);
        for (d, why) in &plan.waiting {
            self.log_waiting(now, *d, format!("{why:?}"));
        }
        let placements = readiness_cut(&spec, plan.placements);
        let by_domain: BTreeMap<DomainId, &Orphan> = orphans.iter().map(|o| (o.domain, o)).collect();
        for (d, h) in placements {
            let Some(o) = by_domain.get(&d) else { continue };
            let boot = if h == self.cfg.host {
                Some(self.cfg.boot)
            } else {
                self.peers.get(&h).and_then(|p| p.current_boot())
            };
            let Some(boot) = boot else { continue };
            self.assign(now, d, h, boot, o.lease, o.reason);
        }
    }

    /// Orphans that may be planned now: not given up, past their retry
    /// backoff, and not held back by a higher priority restart that is not
    /// ready yet (readiness ordering). Also returns the held-back ones.
    fn gate_requests<'a>(
        &self,
        now: Instant,
        orphans: &[Orphan],
        spec: &'a ClusterSpec,
    ) -> (Vec<PlanRequest<'a>>, Vec<DomainId>) {
        let Some(m) = self.master.as_ref() else {
            return (Vec::new(), Vec::new());
        };
        let blocking = m
            .starting
            .iter()
            .filter(|(d, _)| spec.domains.get(d).is_some_and(|x| x.policy.readiness != Readiness::Started))
            .map(|(_, s)| s.priority)
            .max();
        let mut requests = Vec::new();
        let mut held_back = Vec::new();
        for o in orphans {
            let Some(ds) = spec.domains.get(&o.domain) else {
                continue;
            };
            if m.given_up.contains(&o.domain) {
                continue;
            }
            if blocking.is_some_and(|b| ds.policy.priority < b) {
                held_back.push(o.domain);
                continue;
            }
            let retry = m.retries.get(&o.domain);
            if retry.is_some_and(|r| now < r.not_before) {
                continue;
            }
            let avoid = retry.map(|r| r.avoid.clone()).unwrap_or_default();
            requests.push(PlanRequest { domain: ds, avoid });
        }
        (requests, held_back)
    }

    fn log_waiting(&mut self, now: Instant, d: DomainId, why: String) {
        let first = self.master.as_mut().is_some_and(|m| m.waiting_logged.insert(d));
        if first {
            self.emit(now, "master", format!("{} waits: {why}", self.domain_name(d)));
        }
    }

    /// Move one lease to its new host (CAS); the host starts it on success.
    fn assign(&mut self, now: Instant, d: DomainId, h: HostId, boot: BootId, lease: Lease, reason: LeaseReason) {
        let why = match reason {
            LeaseReason::FenceConfirmed => "fence confirmed",
            LeaseReason::HostDeadTimeout => "host_dead_timeout",
            LeaseReason::Released => "released",
            _ => "free",
        };
        self.emit(now, "master", format!("restarting {} on {h} ({why})", self.domain_name(d)));
        let op = self.new_op(now, OpKind::Cas);
        let new = Lease { owner: Some(Owner { host: h, boot }), generation: lease.generation + 1, reason };
        if let Some(m) = self.master.as_mut() {
            m.cas_inflight.insert(op, (d, h));
            m.waiting_logged.remove(&d);
        }
        self.actions.push_back(Action::CasLease {
            op,
            key: LeaseKey::Domain(d),
            expect_generation: lease.generation,
            new,
        });
    }

    /// A host as the master plans with it: its size from its latest slot
    /// (each daemon knows its own host), else from the spec.
    pub(super) fn sized(&self, hs: &HostSpec) -> HostSpec {
        let (memory_mib, vcpus) = self.host_size(hs);
        HostSpec { memory_mib, vcpus, ..hs.clone() }
    }

    /// Memory and vCPUs of a host: per field, its latest slot's figure when
    /// not 0, else the spec's.
    pub(super) fn host_size(&self, hs: &HostSpec) -> (u64, u32) {
        let slot = self.peers.get(&hs.id).and_then(|p| p.slot.as_ref());
        let memory = slot.map_or(0, |s| s.memory_mib);
        let vcpus = slot.map_or(0, |s| s.vcpus);
        (if memory > 0 { memory } else { hs.memory_mib }, if vcpus > 0 { vcpus } else { hs.vcpus })
    }

    /// Hosts that may receive restarts: alive on storage, not isolated, not
    /// self-fenced (network silence alone does not matter: assignments travel
    /// through storage).
    pub(super) fn host_rooms(
        &self,
        now: Instant,
        reports: &BTreeMap<DomainId, (HostId, DomainReport)>,
    ) -> Vec<HostRoom> {
        let spec = &self.cfg.spec;
        let mut rooms = Vec::new();
        for hs in &spec.hosts {
            if self.host_in_maintenance(hs.id) {
                continue;
            }
            let ok = if hs.id == self.cfg.host {
                !self.isolated && self.self_fence == SelfFence::Healthy && self.storage_healthy(now)
            } else {
                self.peers.get(&hs.id).is_some_and(|p| {
                    matches!(self.verdict_of(now, p), Verdict::Alive | Verdict::Partitioned)
                        && p.slot
                            .as_ref()
                            .is_some_and(|s| !s.isolated && !s.self_fenced && Some(s.boot) == p.current_boot())
                })
            };
            if !ok {
                continue;
            }
            let mut room = planner::empty_room(&self.sized(hs), spec);
            let m = self.master.as_ref();
            for (d, (h, r)) in reports {
                if *h != hs.id {
                    continue;
                }
                let Some(ds) = spec.domains.get(d) else {
                    continue;
                };
                room.occupy(ds);
                if r.state == DomainState::Starting {
                    room.starts_free = room.starts_free.saturating_sub(1);
                }
            }
            // Assigned but not reported yet.
            for (d, s) in m.map(|m| m.starting.iter()).into_iter().flatten() {
                if s.host != hs.id || reports.get(d).is_some_and(|(h, _)| *h == hs.id) {
                    continue;
                }
                let Some(ds) = spec.domains.get(d) else {
                    continue;
                };
                room.occupy(ds);
                room.starts_free = room.starts_free.saturating_sub(1);
            }
            rooms.push(room);
        }
        rooms
    }

    /// Per-host assignment records: every lease the host owns (per our
    /// cache) that it does not report running. Travels through storage, so a
    /// network partition cannot stop a restart.
    fn write_assignments(&mut self, now: Instant, reports: &BTreeMap<DomainId, (HostId, DomainReport)>) {
        let Some(m) = self.master.as_ref() else {
            return;
        };
        let mut want: BTreeMap<HostId, BTreeMap<DomainId, u64>> = BTreeMap::new();
        for (d, l) in &m.leases {
            let Some(o) = l.owner else { continue };
            if reports.get(d).is_some_and(|(h, _)| *h == o.host) {
                continue;
            }
            let current = if o.host == self.cfg.host {
                o.boot == self.cfg.boot
            } else {
                self.peers.get(&o.host).and_then(|p| p.current_boot()) == Some(o.boot)
            };
            if current {
                want.entry(o.host).or_default().insert(*d, l.generation);
            }
        }
        let mine = want.get(&self.cfg.host).cloned().unwrap_or_default();
        let mut writes = Vec::new();
        // Every host's record, ours too, is written once when we become
        // master: a record left by an earlier master may be stale.
        for hs in &self.cfg.spec.hosts {
            let domains = want.remove(&hs.id).unwrap_or_default();
            let old = m.written.get(&hs.id);
            if old.map(|a| &a.domains) == Some(&domains) {
                continue;
            }
            let seq = old.map_or(1, |a| a.seq + 1);
            writes.push((hs.id, Assignments { seq, domains }));
        }
        for (h, a) in writes {
            if let Some(m) = self.master.as_mut() {
                m.written.insert(h, a.clone());
            }
            let op = self.new_op(now, OpKind::Record);
            self.actions.push_back(Action::WriteAssignments { op, host: h, assignments: a });
        }
        for (d, g) in mine {
            self.handle_assignment(now, d, g);
        }
    }
}

/// Readiness ordering inside one round: once a domain that must become ready
/// (guest agent, TCP port) is placed, lower priorities wait for it. Domains
/// whose readiness is "started" hold nobody back (vSphere's "resources
/// allocated" condition).
fn readiness_cut(spec: &ClusterSpec, placements: Vec<(DomainId, HostId)>) -> Vec<(DomainId, HostId)> {
    let prio = |d: &DomainId| spec.domains.get(d).map_or(Priority::Disabled, |s| s.policy.priority);
    let gate = placements
        .iter()
        .filter(|(d, _)| spec.domains.get(d).is_some_and(|s| s.policy.readiness != Readiness::Started))
        .map(|(d, _)| prio(d))
        .max();
    placements.into_iter().filter(|(d, _)| gate.is_none_or(|g| prio(d) >= g)).collect()
}
