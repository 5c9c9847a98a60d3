//! The invariant checker. It judges from the simulator's ground truth (which
//! host really runs which qemu, which host is really powered, paused or cut
//! off, what storage really holds), never from what the engines believe. It
//! runs alongside the cluster: on every start, lease change and fence, and
//! every `CHECK_INTERVAL_MS`.

use super::world::World;
use crate::engine::config::{ClusterSpec, DomainId, HostId};
use crate::engine::io::{Lease, LeaseKey, LeaseReason};
use serde::Serialize;
use std::collections::BTreeMap;

/// Log lines kept around a violation.
pub const TIMELINE_LINES: usize = 40;

#[derive(Clone, Debug, Serialize)]
pub struct Violation {
    pub invariant: &'static str,
    pub at_ms: u64,
    pub detail: String,
    #[serde(skip)]
    pub timeline: Vec<String>,
}

pub struct Checker {
    pub violations: Vec<Violation>,
    /// Domain lost to a fault: (fault time, fault class, clean start), until
    /// it runs again.
    open: BTreeMap<DomainId, (u64, &'static str, bool)>,
    /// Recovery samples (ms) per fault class, every episode.
    pub recoveries: BTreeMap<&'static str, Vec<u64>>,
    /// The same for clean episodes only: one fault on an otherwise healthy
    /// cluster, no other fault until the domain runs again. These are the
    /// figures DESIGN.md §2 promises; overlapping faults add capacity,
    /// readiness and fencing waits on top.
    pub clean_recoveries: BTreeMap<&'static str, Vec<u64>>,
    /// When fault commands happened (sorted).
    pub fault_times: Vec<u64>,
    /// Domains lost in each episode (fault time): readiness ordering may
    /// hold a domain back behind a higher priority one of the same episode.
    episode_members: BTreeMap<u64, Vec<DomainId>>,
    spec: std::sync::Arc<ClusterSpec>,
    pub false_failovers: u64,
    /// Domains that ran nowhere at the end because no host allowed to
    /// take them had room (L1 does not apply to them).
    pub capacity_waits: u64,
    /// Zombie first seen, and whether it was reported.
    zombie_since: BTreeMap<(HostId, DomainId), (u64, bool)>,
    last_exempt: u64,
    /// Last instant each host had a fault that justifies a failover (L2).
    pub last_fault: BTreeMap<HostId, u64>,
    storage_fault_since: BTreeMap<HostId, u64>,
    /// Last instant each domain had a fault of its own (crash, broken).
    pub domain_fault: BTreeMap<DomainId, u64>,
    pub fault_clear_at: BTreeMap<HostId, u64>,
    /// Domains stopped on purpose (guest.rs).
    pub intents: super::guest::StopIntents,
}

impl Checker {
    pub fn new(spec: std::sync::Arc<ClusterSpec>) -> Checker {
        Checker {
            violations: Vec::new(),
            open: BTreeMap::new(),
            recoveries: BTreeMap::new(),
            clean_recoveries: BTreeMap::new(),
            fault_times: Vec::new(),
            episode_members: BTreeMap::new(),
            spec,
            false_failovers: 0,
            capacity_waits: 0,
            zombie_since: BTreeMap::new(),
            last_exempt: 0,
            last_fault: BTreeMap::new(),
            storage_fault_since: BTreeMap::new(),
            domain_fault: BTreeMap::new(),
            fault_clear_at: BTreeMap::new(),
            intents: Default::default(),
        }
    }

    /// Quiet before a fault: no other fault in this window.
    pub const CLEAN_BEFORE_MS: u64 = 30_000;

    pub fn domain_lost(&mut self, d: DomainId, at: u64, class: &'static str, others_healthy: bool) {
        let quiet = !self.fault_times.iter().any(|t| *t != at && *t + Self::CLEAN_BEFORE_MS > at && *t <= at);
        if !self.open.contains_key(&d) {
            self.episode_members.entry(at).or_default().push(d);
        }
        self.open.entry(d).or_insert((at, class, others_healthy && quiet));
    }

    pub fn domain_running(&mut self, now: u64, d: DomainId) {
        if let Some((at, class, clean)) = self.open.remove(&d) {
            self.recoveries.entry(class).or_default().push(now - at);
            let later_fault = self.fault_times.iter().any(|t| *t > at && *t <= now);
            if clean && !later_fault {
                // Waiting on purpose for a higher priority domain's guest
                // agent is policy, not recovery speed: counted apart.
                let class = if self.held_by_readiness(d, at) { "readiness_ordered" } else { class };
                self.clean_recoveries.entry(class).or_default().push(now - at);
            }
        }
    }

    fn held_by_readiness(&self, d: DomainId, at: u64) -> bool {
        let prio = |x: &DomainId| self.spec.domains.get(x).map(|s| s.policy.priority);
        self.episode_members.get(&at).is_some_and(|members| {
            members.iter().any(|e| {
                prio(e) > prio(&d)
                    && self
                        .spec
                        .domains
                        .get(e)
                        .is_some_and(|s| s.policy.readiness != crate::engine::config::Readiness::Started)
            })
        })
    }

    pub fn host_down(&mut self, h: HostId, now: u64) {
        self.last_fault.insert(h, now);
    }
}

impl World {
    pub(super) fn violation(&mut self, invariant: &'static str, detail: String) {
        let start = self.log.len().saturating_sub(TIMELINE_LINES);
        let timeline = self.log[start..].to_vec();
        self.log_at("ERROR", "checker", &format!("{invariant} violated: {detail}"));
        self.checker.violations.push(Violation { invariant, at_ms: self.now, detail, timeline });
    }

    fn l2_window(&self) -> u64 {
        self.spec.timings.host_dead_timeout.as_millis() + 60_000
    }

    fn justified(&self, h: HostId, d: Option<DomainId>) -> bool {
        let window = self.l2_window();
        let recent = |t: Option<&u64>| t.is_some_and(|t| self.now.saturating_sub(*t) <= window);
        recent(self.checker.last_fault.get(&h)) || d.is_some_and(|d| recent(self.checker.domain_fault.get(&d)))
    }

    pub fn livelock(&mut self) {
        self.violation("LIVELOCK", format!("more than {} events at one instant", super::world::MAX_EVENTS_PER_INSTANT));
    }

    /// S1: at no instant do two hosts run the same protected domain.
    pub fn check_s1(&mut self, d: DomainId) {
        let holders: Vec<HostId> = self
            .hosts
            .values()
            .filter(|x| x.running() && x.qemu.get(&d).is_some_and(|q| q.state != super::world::QemuState::Paused))
            .map(|x| x.id)
            .collect();
        if holders.len() > 1 {
            let names: Vec<String> = holders.iter().map(|h| h.to_string()).collect();
            let detail = format!("{} runs on {}", self.domain_name(d), names.join(" and "));
            self.violation("S1", detail);
        }
    }

    /// S2: a host starts a protected domain only while it owns the lease.
    /// An unprotected domain is never started (nor stopped) by havirt: after
    /// `unprotect` nobody may start it.
    pub fn checker_on_start(&mut self, h: HostId, d: DomainId) {
        if !self.spec.domains.contains_key(&d) && self.registry_current(h) {
            self.violation("UNMANAGED", format!("{h} starts {}, which is not protected", self.domain_name(d)));
        }
        let boot = self.hosts[&h].boot;
        let owner = self.storage.leases.get(&LeaseKey::Domain(d)).and_then(|l| l.owner);
        if owner.is_none_or(|o| o.host != h || o.boot != boot) {
            let detail =
                format!("{h} starts {} while the lease names {:?}", self.domain_name(d), owner.map(|o| o.host));
            self.violation("S2", detail);
        }
        self.check_stopped_start(h, d);
    }

    /// The host's daemon was given the latest registry. One that lags (it
    /// was paused when the registry changed) still protects what it knew:
    /// its S4 or S5 may stop a domain unprotected meanwhile.
    fn registry_current(&self, h: HostId) -> bool {
        self.registry_seen.get(&h) == Some(&self.registry_version)
    }

    /// L2: havirt stops a running protected domain only on a host with a
    /// fault (self-fence, isolation response, zombie after a freeze).
    pub fn checker_on_stop(&mut self, h: HostId, d: DomainId) {
        if self.hosts[&h].qemu.contains_key(&d) && !self.spec.domains.contains_key(&d) && self.registry_current(h) {
            self.violation("UNMANAGED", format!("{h} stops {}, which is not protected", self.domain_name(d)));
            return;
        }
        // Destroying a paused migration copy whose lease never came stops
        // nothing that ran.
        let running = self.hosts[&h].qemu.get(&d).is_some_and(|q| q.state != super::world::QemuState::Paused);
        if running && !self.justified(h, Some(d)) {
            self.checker.false_failovers += 1;
            self.violation("L2", format!("{h} stops {} without any fault", self.domain_name(d)));
        }
    }

    /// L2: fencing a host that is alive on storage and healthy is false.
    pub fn checker_on_fence(&mut self, from: HostId, target: HostId) {
        let x = &self.hosts[&target];
        let healthy = x.running() && x.node.is_some() && !x.isolated && x.storage_fault.is_none();
        if healthy && !self.justified(target, None) {
            self.checker.false_failovers += 1;
            self.violation("L2", format!("{from} fences {target}, which is alive and healthy"));
        }
    }

    /// S3 and L2 on every lease transfer.
    pub fn lease_changed(&mut self, by: HostId, key: LeaseKey, old: Lease, new: Lease) {
        self.note_stopped_lease(key, new);
        let LeaseKey::Domain(d) = key else { return };
        let Some(from) = old.owner else { return };
        if new.owner.is_some_and(|o| o.host == from.host && o.boot == from.boot) {
            return;
        }
        let x = &self.hosts[&from.host];
        let same_boot_up = x.powered && x.boot == from.boot;
        // S3(b) assumes a watchdog that keeps counting. A VM-style pause
        // freezes the guest's watchdog too, so a host just resumed from one
        // may still run qemu when host_dead_timeout frees its leases. Then
        // only qemu's disk locks keep S1 (checked on every start); without
        // them this stays an S3 violation (see disk_locks_cover_the_paused_host).
        let window = self.spec.timings.host_dead_timeout.as_millis() + 1000;
        let watchdog_was_frozen = x.last_resume.is_some_and(|r| self.now.saturating_sub(r) <= window);
        let premise_broken = watchdog_was_frozen && self.params.disk_locks;
        if same_boot_up && x.running() && x.qemu.contains_key(&d) && !premise_broken {
            let detail = format!(
                "{by} moves the lease of {} from {} ({:?}) while it still runs there",
                self.domain_name(d),
                from.host,
                new.reason
            );
            self.violation("S3", detail);
        }
        if new.reason == LeaseReason::FenceConfirmed && same_boot_up {
            let detail = format!("{by} claims {} was fenced, but that boot is powered", from.host);
            self.violation("S3", detail);
        }
        // A release is judged when the domain is stopped (checker_on_stop);
        // a lease freed after a stop on purpose by guest.rs, and a handoff
        // after a live migration, are the owner's own choice.
        let own_release = matches!(new.reason, LeaseReason::Released | LeaseReason::Stopped);
        let handoff = new.reason == LeaseReason::Migrated && by == from.host;
        if same_boot_up && !own_release && !handoff && !self.justified(from.host, Some(d)) {
            self.checker.false_failovers += 1;
            let detail =
                format!("{by} moves {} away from healthy {} ({:?})", self.domain_name(d), from.host, new.reason);
            self.violation("L2", detail);
        }
    }

    /// Periodic checks: S4, S5, and fault bookkeeping for L2.
    pub fn check_invariants(&mut self) {
        self.track_faults();
        let t = self.spec.timings;
        let bound = (t.renew_timeout + t.io_timeout + t.io_timeout + t.watchdog_timeout).as_millis() + 1000;
        let zombie_grace = (t.io_timeout + t.io_timeout).as_millis() + 2000;
        let handoff_ms = crate::engine::maintenance::MIGRATION_HANDOFF_TIMEOUT.as_millis();
        let mut found = Vec::new();
        for x in self.hosts.values() {
            // Only protected domains: S4 and S5 are about them.
            let protected: Vec<DomainId> =
                x.qemu.keys().filter(|d| self.spec.domains.contains_key(d)).copied().collect();
            if !x.running() || protected.is_empty() {
                continue;
            }
            let has_watchdog = self.spec.host(x.id).is_some_and(|s| s.watchdog);
            let host_anchor = x
                .last_good_write_issue
                .unwrap_or(0)
                .max(self.checker.last_exempt)
                .max(x.last_resume.map_or(0, |r| r.saturating_sub(t.renew_timeout.as_millis())));
            // A domain protected while storage was already gone counts from then.
            let protected_at = |d: &DomainId| self.protected_at.get(d).copied().unwrap_or(0);
            let anchor = protected.iter().map(|d| host_anchor.max(protected_at(d))).min().unwrap_or(host_anchor);
            // A daemon that stopped on purpose and said, on storage, that
            // nothing resets this host: S4 exists so that S3(b) is safe,
            // and that notice withdraws S3(b) from its slot (stop.rs).
            // A daemon started after it has renew_timeout for its first
            // write, as after any start (`Node::check_self_fence`).
            let notice_on_storage = self
                .storage
                .slots
                .get(&x.id)
                .is_some_and(|s| s.boot == x.boot && s.stopped.is_some_and(|n| !n.host_reset));
            let unguarded = notice_on_storage && x.node.is_none();
            let anchor = if notice_on_storage { anchor.max(x.daemon_started_at) } else { anchor };
            if (has_watchdog || x.node.is_some()) && !unguarded && self.now.saturating_sub(anchor) > bound {
                found.push((
                    "S4",
                    format!(
                        "{} still runs protected domains {} ms after its last good storage write",
                        x.id,
                        self.now - anchor
                    ),
                ));
            }
            for d in &protected {
                let owner = self.storage.leases.get(&LeaseKey::Domain(*d)).and_then(|l| l.owner);
                let ours = owner.is_some_and(|o| o.host == x.id && o.boot == x.boot);
                if ours {
                    self.checker.zombie_since.remove(&(x.id, *d));
                    continue;
                }
                let entry = self.checker.zombie_since.entry((x.id, *d)).or_insert((self.now, false));
                // A copy paused by an incoming migration runs nothing; it
                // waits for its lease that long before it is destroyed.
                let paused = x.qemu.get(d).is_some_and(|q| q.state == super::world::QemuState::Paused);
                let grace = if paused { zombie_grace + handoff_ms } else { zombie_grace };
                // A daemon that started after the copy arrived cannot know
                // since when it waits: its handoff clock starts with it.
                let since = if paused { entry.0.max(x.daemon_started_at) } else { entry.0 };
                if self.now - since > grace && !entry.1 {
                    entry.1 = true;
                    found.push((
                        "S5",
                        format!("zombie {} on {} for {} ms", self.spec.domain_name(*d), x.id, self.now - entry.0),
                    ));
                }
            }
        }
        self.checker.zombie_since.retain(|(h, d), _| {
            self.hosts[h].running() && self.hosts[h].qemu.contains_key(d) && self.spec.domains.contains_key(d)
        });
        for (inv, detail) in found {
            self.violation(inv, detail);
        }
    }

    fn track_faults(&mut self) {
        let t = self.spec.timings;
        // A self-fence comes renew_timeout after the start of the last good
        // write, which is up to one interval before storage went away; a
        // failed write is retried within a tick. An outage longer than
        // renew - interval - tick (minus latency) may therefore end in a
        // self-fence; shorter stalls must not (L2).
        let storage_justifies = t
            .renew_timeout
            .as_millis()
            .saturating_sub(t.storage_write_interval.as_millis() + crate::engine::node::TICK.as_millis() + 200);
        let stalled = self.storage.stall_until > self.now;
        let all_lost = self.partitions.is_empty()
            && self.one_way.is_empty()
            && self.hosts.values().all(|x| {
                x.running()
                    && x.node.is_some()
                    && !x.isolated
                    && (x.storage_fault.is_some() || self.storage.stall_until > self.now)
            });
        if all_lost {
            self.checker.last_exempt = self.now;
        }
        let now = self.now;
        // A storage fault together with any network fault makes a host look
        // dead from outside: fencing it is the right answer, not a false one.
        let net_disturbed = !self.partitions.is_empty()
            || !self.one_way.is_empty()
            || self.loss_percent > 0
            || self.hosts.values().any(|x| x.isolated);
        for x in self.hosts.values_mut() {
            let faulty = !x.powered || x.paused_since.is_some() || x.node.is_none() || x.isolated;
            if x.storage_fault.is_some() || (stalled && x.powered) {
                let since = *self.checker.storage_fault_since.entry(x.id).or_insert(now);
                if now - since >= storage_justifies || net_disturbed {
                    self.checker.last_fault.insert(x.id, now);
                }
            } else {
                self.checker.storage_fault_since.remove(&x.id);
            }
            if faulty {
                self.checker.last_fault.insert(x.id, now);
            }
            if self.checker.fault_clear_at.get(&x.id).is_some_and(|c| *c <= now) {
                self.checker.fault_clear_at.remove(&x.id);
                x.active_fault = None;
            }
        }
    }

    /// L1 after healing: every protected domain that is not broken runs on
    /// exactly one host.
    pub fn check_converged(&mut self) {
        let stopped = self.check_stopped_converged();
        let (mut found, mut waits) = (Vec::new(), Vec::new());
        for (d, spec) in self.spec.domains.iter() {
            let skip = spec.policy.priority == crate::engine::config::Priority::Disabled
                || self.broken_domains.contains(d)
                || stopped.contains(d);
            if skip {
                continue;
            }
            let n = self.hosts.values().filter(|x| x.running() && x.qemu.contains_key(d)).count();
            if n == 0
                && let Some(why) = self.no_room_for(spec)
            {
                // L1 holds "whenever the survivors have the capacity":
                // nothing rebalances running domains to make room.
                waits.push(format!("{} runs nowhere, as L1 allows: {why}", spec.name));
                continue;
            }
            if n != 1 {
                found.push(format!("{} runs on {n} hosts after healing", spec.name));
            }
        }
        for text in waits {
            self.checker.capacity_waits += 1;
            self.log_at("info", "checker", &text);
        }
        for detail in found {
            self.violation("L1", detail);
        }
    }

    /// Why no host may take `want` as the cluster runs now, if none may:
    /// every running host its affinity allows lacks memory or vCPUs (with
    /// the overcommit), or runs a member of its anti-affinity group. The
    /// checker's own arithmetic over the qemu processes that exist, not the
    /// engine's view.
    fn no_room_for(&self, want: &crate::engine::config::DomainSpec) -> Option<String> {
        let mut refused = Vec::new();
        for hs in &self.spec.hosts {
            let Some(x) = self.hosts.get(&hs.id).filter(|x| x.running()) else { continue };
            if !want.policy.affinity.is_empty() && !want.policy.affinity.contains(&hs.id) {
                continue;
            }
            let running: Vec<_> = x.qemu.keys().filter_map(|d| self.spec.domains.get(d)).collect();
            let group = want.policy.anti_affinity.as_ref();
            if group.is_some() && running.iter().any(|r| r.policy.anti_affinity.as_ref() == group) {
                refused.push(format!("{}: runs a member of its anti-affinity group", hs.name));
                continue;
            }
            #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss, clippy::cast_precision_loss)]
            let (memory, vcpus) = (
                (hs.memory_mib as f64 * self.spec.memory_overcommit).floor() as u64,
                (f64::from(hs.vcpus) * self.spec.vcpu_overcommit).floor() as u64,
            );
            let used_memory: u64 = running.iter().map(|r| r.memory_mib).sum();
            let used_vcpus: u64 = running.iter().map(|r| u64::from(r.vcpus)).sum();
            let (free_memory, free_vcpus) = (memory.saturating_sub(used_memory), vcpus.saturating_sub(used_vcpus));
            if free_memory >= want.memory_mib && free_vcpus >= u64::from(want.vcpus) {
                return None;
            }
            refused.push(format!("{}: {free_memory} MiB and {free_vcpus} vCPUs free", hs.name));
        }
        Some(format!(
            "no host its affinity allows has room for {} MiB and {} vCPUs ({})",
            want.memory_mib,
            want.vcpus,
            if refused.is_empty() { "none runs".to_string() } else { refused.join("; ") }
        ))
    }
}
