//! Maintenance mode: a host drains its protected domains by live migration
//! and takes no restarts until the operator ends it.
//!
//! The lease never has two holders, and a domain's vCPUs never run on two
//! hosts:
//!
//! 1. The owner (source) plans a target with the restart planner, over the
//!    hosts that take restarts, and asks libvirt for a live migration that
//!    leaves the domain **paused** on the target (`Action::MigrateDomain`).
//!    During it the source keeps the lease and the domain runs only here.
//! 2. On success the source's qemu is gone. The source moves the lease to
//!    the target by CAS (generation + 1, reason `Migrated`), then tells the
//!    target over the network (`NetMessage::Assign`); the master's
//!    assignment record tells it too, through storage.
//! 3. The target resumes the paused domain only through its ordinary start
//!    path: its own renew CAS of a lease that names it, then
//!    `Action::StartDomain` (which resumes a paused domain).
//! 4. The target holds an incoming domain whose lease does not reach it
//!    within `MIGRATION_HANDOFF_TIMEOUT` (the source died between 1 and 2,
//!    or lost its lease) paused, then destroys it: it never ran there.
//!
//! A failed migration leaves the domain running on the source (libvirt
//! resumes it there); it is reported and not retried until the operator
//! enters maintenance again. Migrations run one at a time per host.
//!
//! The same migration brings a domain back to its preferred host (the first
//! of its affinity) once that host takes restarts again: failback after a
//! maintenance or a repair.

use super::admission::Change;
use super::config::{DomainId, HostId};
use super::io::{Action, CasOutcome, Lease, LeaseKey, LeaseReason, NetMessage, Owner, StorageError};
use super::node::{Local, LocalState, Node, OpKind, SelfFence};
use super::planner::{self, PlanRequest};
use super::time::{Duration, Instant};

/// An incoming (paused) domain whose lease is not handed to us within this
/// is destroyed. The source hands it over one CAS after the migration ends.
pub const MIGRATION_HANDOFF_TIMEOUT: Duration = Duration::from_secs(15);
/// A domain migrated to a host counts against that host's room until its
/// slot reports it, at most this long.
pub const MIGRATION_ROOM_HOLD: Duration = Duration::from_secs(10);
/// How long a handed-over lease stays in our slot (for masters that did
/// not see the move).
pub const HANDOVER_REPORT: Duration = Duration::from_secs(60);
/// An incoming domain's lease is read this often until it is ours.
pub const INCOMING_LEASE_POLL: Duration = Duration::from_millis(500);
/// A failback migration that failed is tried again after this.
pub const FAILBACK_RETRY: Duration = Duration::from_secs(60);

impl Node {
    /// `OperatorCommand::Maintenance`.
    pub(super) fn set_maintenance(&mut self, now: Instant, enter: bool) {
        if enter {
            let retry = !self.migration_failed.is_empty();
            self.migration_failed.clear();
            self.drain_reported = false;
            if !self.maintenance {
                self.maintenance = true;
                self.emit(now, "node", "maintenance mode entered: migrating protected domains away".into());
            } else if retry {
                self.emit(now, "node", "maintenance mode: retrying the domains that did not move".into());
            }
        } else if self.maintenance {
            self.maintenance = false;
            self.migration_failed.clear();
            self.drain_reported = false;
            self.emit(now, "node", "maintenance mode ended: this host takes restarts again".into());
        }
        self.next_slot_write = now;
    }

    /// Domains whose migration failed (or could not be planned), with why.
    pub fn migration_failures(&self) -> &std::collections::BTreeMap<DomainId, String> {
        &self.migration_failed
    }

    pub fn in_maintenance(&self) -> bool {
        self.maintenance
    }

    /// Start the next migration of the drain, one at a time.
    pub(super) fn maintenance_tick(&mut self, now: Instant) {
        self.recent_migrations.retain(|_, (_, at)| now.since(*at) < MIGRATION_ROOM_HOLD);
        self.failback_blocked.retain(|_, until| now < *until);
        if self.self_fence != SelfFence::Healthy || !self.storage_healthy(now) || self.isolated {
            return;
        }
        if now.since(self.observing_since) < self.t.suspect_after.max(self.t.storage_silent_after) {
            // Just started or resumed: no target is known alive yet, and a
            // drain planned now would give up on every domain.
            return;
        }
        let busy =
            self.local.values().any(|l| matches!(l.state, LocalState::Migrating { .. } | LocalState::Handoff { .. }));
        if busy {
            return;
        }
        if !self.maintenance {
            self.failback_tick(now);
            return;
        }
        let spec = self.cfg.spec.clone();
        let next = self
            .local
            .iter()
            .filter(|(d, l)| {
                matches!(l.state, LocalState::Running | LocalState::Ready)
                    && l.generation.is_some()
                    && !self.migration_failed.contains_key(d)
            })
            .filter_map(|(d, _)| spec.domains.get(d))
            .max_by_key(|s| (s.policy.priority, std::cmp::Reverse(s.id)));
        let Some(ds) = next else {
            if !self.drain_reported {
                self.drain_reported = true;
                let text = if self.migration_failed.is_empty() {
                    "maintenance: no protected domain runs here any more".to_string()
                } else {
                    format!(
                        "maintenance: {} domain(s) could not move and keep running here",
                        self.migration_failed.len()
                    )
                };
                self.emit(now, "node", text);
            }
            return;
        };
        let reports = self.domain_reports();
        let mut rooms = self.host_rooms(now, &reports);
        rooms.retain(|r| self.fit_target(r.id));
        for room in &mut rooms {
            // A migration is not a cold start: the start cap does not apply.
            room.starts_free = room.starts_free.max(1);
            for (d, (h, _)) in &self.recent_migrations {
                if *h == room.id
                    && reports.get(d).is_none_or(|(rh, _)| rh != h)
                    && let Some(s) = spec.domains.get(d)
                {
                    room.occupy(s);
                }
            }
        }
        let plan = planner::plan(&rooms, &[PlanRequest { domain: ds, avoid: Vec::new() }]);
        let d = ds.id;
        let name = ds.name.clone();
        let Some((_, to)) = plan.placements.first().copied() else {
            let why = plan.waiting.first().map_or("no host takes restarts".to_string(), |(_, w)| format!("{w:?}"));
            self.emit(now, "node", format!("maintenance: {name} cannot move ({why}); it keeps running here"));
            self.migration_failed.insert(d, format!("no target host ({why})"));
            return;
        };
        let Some(boot) = self.peers.get(&to).and_then(|p| p.current_boot()) else {
            return;
        };
        self.emit(now, "node", format!("maintenance: migrating {name} to {to}"));
        self.set_state(d, LocalState::Migrating { to, boot });
        self.actions.push_back(Action::MigrateDomain { domain: d, to });
    }

    /// Failback: a domain whose affinity names a preferred host (the first
    /// one) and runs elsewhere goes back there by live migration once that
    /// host takes restarts and has room (after its maintenance, or its
    /// repair). One at a time; a failed attempt waits FAILBACK_RETRY.
    fn failback_tick(&mut self, now: Instant) {
        let me = self.cfg.host;
        let spec = self.cfg.spec.clone();
        let wanting: Vec<(DomainId, HostId)> = self
            .local
            .iter()
            .filter(|(d, l)| {
                matches!(l.state, LocalState::Running | LocalState::Ready)
                    && l.generation.is_some()
                    && !self.failback_blocked.contains_key(d)
            })
            .filter_map(|(d, _)| spec.domains.get(d))
            .filter_map(|s| s.policy.affinity.first().filter(|h| **h != me).map(|h| (s.id, *h)))
            .collect();
        if wanting.is_empty() {
            return;
        }
        let reports = self.domain_reports();
        let rooms = self.host_rooms(now, &reports);
        for (d, to) in wanting {
            let Some(room) = rooms.iter().find(|r| r.id == to && self.fit_target(to)) else { continue };
            let Some(ds) = spec.domains.get(&d) else { continue };
            let mut room = room.clone();
            room.starts_free = room.starts_free.max(1);
            let plan = planner::plan(std::slice::from_ref(&room), &[PlanRequest { domain: ds, avoid: Vec::new() }]);
            if plan.placements.is_empty() {
                continue;
            }
            let Some(boot) = self.peers.get(&to).and_then(|p| p.current_boot()) else { continue };
            let a = self.admission_from(now, &reports).assess(Change::Move { domain: d, to });
            if a.refused {
                let why = a.breach.unwrap_or_default();
                self.emit(now, "node", format!("failback of {} to {to} refused by admission control: {why}", ds.name));
                self.failback_blocked.insert(d, now + FAILBACK_RETRY);
                continue;
            }
            self.emit(now, "node", format!("failback: migrating {} to its preferred host {to}", ds.name));
            self.set_state(d, LocalState::Migrating { to, boot });
            self.actions.push_back(Action::MigrateDomain { domain: d, to });
            return;
        }
    }

    /// A failed migration: a maintenance drain reports it (until the
    /// operator enters again); a failback tries again after FAILBACK_RETRY.
    fn note_failed_migration(&mut self, now: Instant, d: DomainId, why: String) {
        if self.maintenance {
            self.migration_failed.insert(d, why);
        } else {
            self.failback_blocked.insert(d, now + FAILBACK_RETRY);
        }
    }

    /// `Input::Migrated`: the migration of a domain of ours ended.
    pub(super) fn handle_migrated(
        &mut self,
        now: Instant,
        d: DomainId,
        result: Result<(), String>,
        running_here: bool,
    ) {
        let Some(local) = self.local.get(&d).cloned() else {
            return;
        };
        let LocalState::Migrating { to, boot } = local.state else {
            return;
        };
        let name = self.domain_name(d);
        match result {
            Ok(()) => {
                self.set_state(d, LocalState::Handoff { to, boot });
                self.hand_over(now, d);
            }
            Err(e) if running_here => {
                self.emit(now, "node", format!("migration of {name} to {to} failed: {e}; it keeps running here"));
                self.note_failed_migration(now, d, format!("migration to {to} failed: {e}"));
                self.set_state(d, LocalState::Running);
            }
            Err(e) => {
                self.emit(now, "node", format!("migration of {name} to {to} failed: {e}; qemu is gone"));
                self.note_failed_migration(now, d, format!("migration to {to} failed: {e}"));
                self.set_state(d, LocalState::Running);
                self.domain_gone(now, d, Local { state: LocalState::Running, ..local }, true);
            }
        }
    }

    /// CAS our lease to the migration target (again, after a failure).
    fn hand_over(&mut self, now: Instant, d: DomainId) {
        let Some(l) = self.local.get(&d) else { return };
        let (LocalState::Handoff { to, boot }, Some(g)) = (l.state, l.generation) else {
            return;
        };
        let op = self.new_op(now, OpKind::Handoff(d));
        let new = Lease { owner: Some(Owner { host: to, boot }), generation: g + 1, reason: LeaseReason::Migrated };
        self.actions.push_back(Action::CasLease { op, key: LeaseKey::Domain(d), expect_generation: g, new });
    }

    /// The handoff CAS answered (or timed out: `result` None).
    pub(super) fn handed_over(&mut self, now: Instant, d: DomainId, result: Option<Result<CasOutcome, StorageError>>) {
        if let (Some(m), Some(Ok(CasOutcome::Done(l) | CasOutcome::Conflict(l)))) = (self.master.as_mut(), &result)
            && self.cfg.spec.domains.contains_key(&d)
        {
            m.note_lease(d, *l);
        }
        let Some(local) = self.local.get(&d).cloned() else {
            return;
        };
        let (LocalState::Handoff { to, boot }, Some(g)) = (local.state, local.generation) else {
            return;
        };
        let target = Owner { host: to, boot };
        let name = self.domain_name(d);
        match result {
            Some(Ok(CasOutcome::Done(l) | CasOutcome::Conflict(l)))
                if l.owner == Some(target) && l.generation == g + 1 =>
            {
                self.local.remove(&d);
                // The master may still list the old generation for us.
                self.assignments_seen.insert(d, l.generation);
                self.recent_migrations.insert(d, (to, now));
                self.handed_over.insert(d, (to, boot, l.generation, now));
                // An older release of ours would hide the handover in our
                // slot (releases go first): the lease has moved on since.
                self.released.remove(&d);
                self.emit(
                    now,
                    "node",
                    format!("{name} migrated to {to}; lease handed over (generation {})", l.generation),
                );
                let msg = NetMessage::Assign { from: self.cfg.host, domains: vec![(d, l.generation)] };
                self.actions.push_back(Action::Send { to: Some(to), msg });
                self.check_fence_done(now);
            }
            Some(Ok(CasOutcome::Conflict(l))) => {
                // Someone took the lease from us (we were judged dead): the
                // paused copy on the target is destroyed there by timeout.
                let owner = l.owner.map_or("nobody".to_string(), |o| o.host.to_string());
                self.emit(now, "node", format!("handoff of {name} to {to} lost: the lease is now {owner}'s"));
                self.local.remove(&d);
                self.check_fence_done(now);
            }
            // Failed or unknown: try again (a CAS that did land shows as a
            // conflict naming the target).
            _ => self.hand_over(now, d),
        }
    }

    /// `Input::Incoming`: a protected domain arrived here paused.
    pub(super) fn handle_incoming(&mut self, now: Instant, d: DomainId) {
        if !self.cfg.spec.domains.contains_key(&d) || self.local.contains_key(&d) {
            return;
        }
        self.emit(now, "node", format!("{} arriving by migration; waiting for its lease", self.domain_name(d)));
        self.local.insert(
            d,
            Local {
                state: LocalState::Incoming { since: now },
                generation: None,
                restarts: 0,
                start_retries: 0,
                start_in_doubt: false,
                incoming_since: Some(now),
            },
        );
        if self.self_fence != SelfFence::Healthy || !self.storage_healthy(now) {
            // S4: a host that cannot write its heartbeat holds no domain,
            // not even a paused one (its leases may be taken any moment).
            self.emit(
                now,
                "node",
                format!("{}: storage heartbeat failing; destroying the paused copy", self.domain_name(d)),
            );
            self.stop_domain(now, d, false, super::node::AfterStop::Forget);
        }
    }

    /// Read an incoming domain's lease (at most one read in flight, every
    /// INCOMING_LEASE_POLL): the network hint and the master's assignment
    /// record may both be late or lost.
    pub(super) fn poll_incoming_lease(&mut self, now: Instant, d: DomainId) {
        if self.incoming_polled.get(&d).is_some_and(|at| now.since(*at) < INCOMING_LEASE_POLL) {
            return;
        }
        self.incoming_polled.insert(d, now);
        let op = self.new_op(now, OpKind::LeaseRead { purpose: super::node::ReadPurpose::Verify });
        self.actions.push_back(Action::ReadLease { op, key: LeaseKey::Domain(d) });
    }

    /// An incoming domain whose lease never came: destroy the paused copy.
    pub(super) fn incoming_expired(&mut self, now: Instant, d: DomainId) {
        let name = self.domain_name(d);
        self.emit(now, "node", format!("{name}: lease not handed over after migration; destroying the paused copy"));
        self.stop_domain(now, d, false, super::node::AfterStop::Forget);
    }

    /// A migration target must look healthy from here right now: its last
    /// network heartbeat does not say its storage is lost or that it
    /// self-fenced (its slot may be too old to say so).
    fn fit_target(&self, h: HostId) -> bool {
        self.peers.get(&h).and_then(|p| p.heartbeat.as_ref()).is_some_and(|hb| !hb.storage_lost && !hb.self_fenced)
    }

    /// Hosts in maintenance per their latest slot, and this one.
    pub(super) fn host_in_maintenance(&self, h: HostId) -> bool {
        if h == self.cfg.host {
            return self.maintenance;
        }
        self.peers.get(&h).and_then(|p| p.slot.as_ref()).is_some_and(|s| s.maintenance)
    }
}
