//! Intentional stops (issue 5): a domain shut down from inside its guest,
//! or shut down or destroyed by the operator, is not restarted (policy
//! `on_shutdown = "stop"`, the default) — neither here nor elsewhere.
//!
//! The desired state lives on the lease, so that it survives daemon
//! restarts and master changes: once qemu is confirmed gone, the owner
//! swaps its own lease (CAS from the generation it holds) to *free, reason
//! `Stopped`*. No master places such a lease (`find_orphans`), so no host
//! starts the domain. Until the swap lands the lease still names the owner,
//! alive, so nobody may take it either; the owner refuses assignments of
//! it meanwhile. The owner and the master report the state in their slots
//! (`DomainState::Stopped`), so that every `havirt status` shows it.
//!
//! The operator starts it again with `havirt start DOMAIN` on the host that
//! should run it: that host reads the lease and, if it is free, takes it by
//! CAS (generation + 1) before it starts qemu. Two hosts started at once
//! both CAS from the same generation: one wins, the other is told the lease
//! changed and starts nothing (S1, S2).

use super::config::{DomainId, OnShutdown};
use super::io::*;
use super::node::{Local, LocalState, Node, OpKind, ReadPurpose, SelfFence};
use super::time::Instant;
use std::collections::BTreeMap;

/// What this node knows and does about domains stopped on purpose.
#[derive(Default)]
pub struct Intents {
    /// Stopped on purpose here; their lease is being freed.
    parking: BTreeMap<DomainId, Parking>,
    /// Desired-stopped leases known here (freed by us, or seen by the
    /// master): the generation of the free `Stopped` lease.
    stopped: BTreeMap<DomainId, u64>,
    /// `havirt start` in flight here: its current storage request.
    starting: BTreeMap<DomainId, OpId>,
    /// Test-only defect: restart domains stopped on purpose (proves the
    /// simulator's checker catches it).
    #[cfg(test)]
    broken_restart: bool,
}

struct Parking {
    /// The generation we hold (None: read the lease first).
    generation: Option<u64>,
    /// The read or CAS in flight.
    op: Option<OpId>,
}

impl Intents {
    pub(super) fn forget(&mut self, d: DomainId) {
        self.parking.remove(&d);
        self.stopped.remove(&d);
        self.starting.remove(&d);
    }

    /// Its lease is being freed here: it must neither start nor be adopted.
    pub(super) fn parking(&self, d: DomainId) -> bool {
        self.parking.contains_key(&d)
    }

    /// The generation of its free `Stopped` lease, when known here.
    pub(super) fn stopped(&self, d: DomainId) -> Option<u64> {
        self.stopped.get(&d).copied()
    }
}

impl Node {
    /// Test-only defect, see `Intents::broken_restart`.
    #[cfg(test)]
    pub(crate) fn break_restart_stopped(&mut self) {
        self.intent.broken_restart = true;
    }

    /// libvirt says the domain was shut down or destroyed, not by havirt
    /// (the caller handled `Stopping`). With `on_shutdown = "stop"` its
    /// desired state becomes stopped; otherwise it is restarted as after a
    /// crash (`domain_gone`).
    pub(super) fn stopped_on_purpose(&mut self, now: Instant, d: DomainId, local: Local, how: &str) {
        let policy = self.cfg.spec.domains.get(&d).map(|s| s.policy.on_shutdown);
        #[cfg(test)]
        let policy = if self.intent.broken_restart { Some(OnShutdown::Restart) } else { policy };
        if policy != Some(OnShutdown::Stop) || self.self_fence != SelfFence::Healthy {
            self.domain_gone(now, d, local, false);
            return;
        }
        self.local.remove(&d);
        let name = self.domain_name(d);
        self.emit(
            now,
            "node",
            format!("{name} {how}: desired state stopped, not restarted; freeing its lease (havirt start {name} starts it again)"),
        );
        self.intent.parking.insert(d, Parking { generation: local.generation, op: None });
        self.park_step(now, d);
        self.check_fence_done(now);
    }

    /// Read our lease (generation unknown) or free it; one request at a time.
    fn park_step(&mut self, now: Instant, d: DomainId) {
        let Some(p) = self.intent.parking.get(&d) else { return };
        if p.op.is_some() || !self.storage_healthy(now) {
            return;
        }
        let key = LeaseKey::Domain(d);
        let op = match p.generation {
            None => {
                let op = self.new_op(now, OpKind::LeaseRead { purpose: ReadPurpose::Park });
                self.actions.push_back(Action::ReadLease { op, key });
                op
            }
            Some(g) => {
                let op = self.new_op(now, OpKind::Park(d));
                let new = Lease { owner: None, generation: g + 1, reason: LeaseReason::Stopped };
                self.actions.push_back(Action::CasLease { op, key, expect_generation: g, new });
                op
            }
        };
        if let Some(p) = self.intent.parking.get_mut(&d) {
            p.op = Some(op);
        }
    }

    /// Every tick: retry parking, keep the desired-stopped list current.
    pub(super) fn intent_tick(&mut self, now: Instant) {
        let waiting: Vec<DomainId> =
            self.intent.parking.iter().filter(|(_, p)| p.op.is_none()).map(|(d, _)| *d).collect();
        for d in waiting {
            self.park_step(now, d);
        }
        if let Some(m) = self.master.as_ref() {
            for (d, g) in m.stopped_leases() {
                let known = self.intent.stopped.entry(d).or_insert(g);
                *known = (*known).max(g);
            }
        }
        // Superseded: started here or elsewhere since, or unprotected.
        let spec = self.cfg.spec.clone();
        let newer = |d: &DomainId, g: u64| {
            self.peers
                .values()
                .filter_map(|p| p.slot.as_ref())
                .any(|s| s.domains.get(d).is_some_and(|r| r.generation > g))
        };
        let gone: Vec<DomainId> = self
            .intent
            .stopped
            .iter()
            .filter(|(d, g)| !spec.domains.contains_key(d) || self.local.contains_key(d) || newer(d, **g))
            .map(|(d, _)| *d)
            .collect();
        for d in gone {
            self.intent.stopped.remove(&d);
        }
    }

    /// A storage request of ours timed out: the next tick (parking) or the
    /// operator (start) tries again.
    pub(super) fn intent_op_expired(&mut self, op: OpId) {
        for p in self.intent.parking.values_mut() {
            if p.op == Some(op) {
                p.op = None;
            }
        }
        self.intent.starting.retain(|_, o| *o != op);
    }

    /// `ReadPurpose::Park`: the generation we hold, if the lease is ours.
    pub(super) fn park_read(&mut self, now: Instant, d: DomainId, result: Result<Lease, StorageError>) {
        let me = self.me();
        let Some(p) = self.intent.parking.get_mut(&d) else { return };
        p.op = None;
        match result {
            Ok(l) if l.owner == Some(me) => {
                p.generation = Some(l.generation);
                self.park_step(now, d);
            }
            Ok(l) => {
                self.intent.parking.remove(&d);
                if l.owner.is_none() && l.reason == LeaseReason::Stopped {
                    self.intent.stopped.insert(d, l.generation);
                }
            }
            Err(_) => {}
        }
    }

    /// A lease value our own CAS saw: the master (if we are it) keeps its
    /// cache where storage is, as `renewed` does.
    fn note_own_cas(&mut self, d: DomainId, result: &Result<CasOutcome, StorageError>) {
        if let (Some(m), Ok(CasOutcome::Done(l) | CasOutcome::Conflict(l))) = (self.master.as_mut(), result)
            && self.cfg.spec.domains.contains_key(&d)
        {
            m.note_lease(d, *l);
        }
    }

    /// `OpKind::Park`: our lease is free now (or was taken meanwhile).
    pub(super) fn park_cas(&mut self, now: Instant, d: DomainId, result: Result<CasOutcome, StorageError>) {
        self.note_own_cas(d, &result);
        let me = self.me();
        let Some(p) = self.intent.parking.get_mut(&d) else { return };
        p.op = None;
        let Some(g) = p.generation else { return };
        let freed = |l: &Lease| l.owner.is_none() && l.reason == LeaseReason::Stopped && l.generation == g + 1;
        match result {
            Ok(CasOutcome::Done(l)) | Ok(CasOutcome::Conflict(l)) if freed(&l) => {
                self.intent.parking.remove(&d);
                self.intent.stopped.insert(d, l.generation);
                // A stale assignment of the generation we gave up is ignored.
                self.assignments_seen.insert(d, g);
                let text =
                    format!("{}: lease freed (generation {}); no host restarts it", self.domain_name(d), l.generation);
                self.emit(now, "node", text);
            }
            Ok(CasOutcome::Conflict(l)) if l.owner == Some(me) && l.generation > g => {
                p.generation = Some(l.generation);
                self.park_step(now, d);
            }
            Ok(CasOutcome::Done(l) | CasOutcome::Conflict(l)) => {
                self.intent.parking.remove(&d);
                let owner = l.owner.map_or_else(|| "nobody".to_string(), |o| o.host.to_string());
                let text =
                    format!("{}: its lease moved meanwhile (now {owner}); leaving it there", self.domain_name(d));
                self.emit(now, "node", text);
            }
            Err(_) => {}
        }
    }

    /// `havirt start DOMAIN` on this host: read its lease first.
    pub(super) fn handle_operator_start(&mut self, now: Instant, d: DomainId) {
        let name = self.domain_name(d);
        let refuse = if !self.cfg.spec.domains.contains_key(&d) {
            Some("it is not protected".to_string())
        } else if self.local.contains_key(&d) {
            Some("it runs here already".to_string())
        } else if self.intent.parking(d) {
            Some("its lease is still being freed here; try again in a moment".to_string())
        } else if self.intent.starting.contains_key(&d) {
            Some("a start is in progress".to_string())
        } else if !self.storage_healthy(now) || self.self_fence != SelfFence::Healthy {
            Some("this host's storage heartbeat is failing".to_string())
        } else {
            None
        };
        if let Some(why) = refuse {
            self.emit(now, "node", format!("operator start of {name} refused: {why}"));
            return;
        }
        let op = self.new_op(now, OpKind::LeaseRead { purpose: ReadPurpose::OperatorStart });
        self.actions.push_back(Action::ReadLease { op, key: LeaseKey::Domain(d) });
        self.intent.starting.insert(d, op);
    }

    /// `ReadPurpose::OperatorStart`: a free lease is taken by CAS.
    pub(super) fn operator_start_read(&mut self, now: Instant, d: DomainId, result: Result<Lease, StorageError>) {
        if self.intent.starting.remove(&d).is_none() {
            return;
        }
        let name = self.domain_name(d);
        let lease = match result {
            Ok(l) if l.owner.is_none() => l,
            Ok(l) => {
                let owner = l.owner.map(|o| o.host.to_string()).unwrap_or_default();
                self.emit(now, "node", format!("operator start of {name} refused: its lease is held by {owner}"));
                return;
            }
            Err(_) => {
                self.emit(now, "node", format!("operator start of {name} failed: its lease could not be read"));
                return;
            }
        };
        let op = self.new_op(now, OpKind::OperatorStart(d));
        let new = Lease { owner: Some(self.me()), generation: lease.generation + 1, reason: LeaseReason::Acquired };
        let key = LeaseKey::Domain(d);
        self.actions.push_back(Action::CasLease { op, key, expect_generation: lease.generation, new });
        self.intent.starting.insert(d, op);
    }

    /// `OpKind::OperatorStart`: start it if the lease is ours now.
    pub(super) fn operator_start_cas(&mut self, now: Instant, d: DomainId, result: Result<CasOutcome, StorageError>) {
        self.note_own_cas(d, &result);
        self.intent.starting.remove(&d);
        let name = self.domain_name(d);
        let lease = match result {
            Ok(CasOutcome::Done(l)) if l.owner == Some(self.me()) => l,
            Ok(CasOutcome::Done(l) | CasOutcome::Conflict(l)) => {
                let owner = l.owner.map_or_else(|| "nobody".to_string(), |o| o.host.to_string());
                let text = format!("operator start of {name} refused: the lease changed meanwhile (now {owner})");
                self.emit(now, "node", text);
                return;
            }
            Err(_) => {
                // Perhaps applied: then the master assigns it to us (owner,
                // not running) and it starts through the usual renew.
                self.emit(now, "node", format!("operator start of {name}: taking the lease failed on storage"));
                return;
            }
        };
        self.intent.stopped.remove(&d);
        if self.local.contains_key(&d) || !self.storage_healthy(now) || self.self_fence != SelfFence::Healthy {
            // Ours but not startable now: the master's assignment starts it.
            return;
        }
        self.emit(now, "node", format!("starting {name} (operator; lease generation {})", lease.generation));
        let local = Local {
            state: LocalState::Starting,
            generation: Some(lease.generation),
            restarts: 0,
            start_retries: 0,
            start_in_doubt: false,
            incoming_since: None,
        };
        self.local.insert(d, local);
        self.actions.push_back(Action::StartDomain { domain: d });
    }

    /// Desired-stopped domains for our slot (not those we run).
    pub(super) fn stopped_reports(&self) -> Vec<(DomainId, DomainReport)> {
        self.intent
            .stopped
            .iter()
            .filter(|(d, _)| !self.local.contains_key(d))
            .map(|(d, g)| (*d, DomainReport { state: DomainState::Stopped, generation: *g }))
            .collect()
    }
}
