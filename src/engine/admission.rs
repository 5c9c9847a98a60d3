//! Admission control (DESIGN.md §6): whether a change keeps the cluster
//! able to restart every protected domain after `tolerate_host_failures`
//! host failures (and `tolerate_fault_domain_failures` fault-domain ones).
//!
//! [`Admission`] is a snapshot of what a node knows (the hosts that take
//! restarts now, at their slot sizes, and where each domain runs), so the
//! daemon can take it to a blocking task (`havirt protect` reads libvirt
//! before it knows the domain's size) and ask there. Every node can take
//! one: peers' slots tell each node the whole placement.

use super::config::{AdmissionMode, AdmissionPolicy, ClusterSpec, DomainId, DomainSpec, HostId};
use super::io::DomainReport;
use super::node::Node;
use super::planner::{self, Shortfall, Tolerance, Unit};
use super::time::Instant;
use std::collections::{BTreeMap, BTreeSet};

/// A change that admission control judges.
#[derive(Clone, Copy, Debug)]
pub enum Change<'a> {
    /// A domain starts running (or becomes protected while running) on a host.
    Add { domain: &'a DomainSpec, on: HostId },
    /// A running domain moves to another host (failback).
    Move { domain: DomainId, to: HostId },
}

#[derive(Clone, Debug)]
pub struct Admission {
    policy: AdmissionPolicy,
    /// The hosts that take restarts now, sized as the master plans them.
    live: ClusterSpec,
    placement: BTreeMap<DomainId, HostId>,
}

/// Admission control's answer for one change.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Assessment {
    pub before: Tolerance,
    pub after: Tolerance,
    /// The change leaves the figure below the requirement: what would not
    /// restart, and how to fix it. None: within the requirement.
    pub breach: Option<String>,
    /// Strict mode and a breach: the change must not be made.
    pub refused: bool,
}

impl Admission {
    /// The figure for the cluster as it runs now.
    pub fn tolerance(&self) -> Tolerance {
        planner::tolerance(&self.live, &self.placement)
    }

    /// The hosts that count (take restarts now).
    pub fn hosts(&self) -> BTreeSet<HostId> {
        self.live.hosts.iter().map(|h| h.id).collect()
    }

    pub fn policy(&self) -> AdmissionPolicy {
        self.policy
    }

    /// Why the figure `t` is below the requirement (None: it is not),
    /// naming the worst failure and what would wait then.
    pub fn below(&self, t: Tolerance) -> Option<String> {
        self.below_in(t, &self.live, &self.placement)
    }

    fn below_in(&self, t: Tolerance, spec: &ClusterSpec, placement: &BTreeMap<DomainId, HostId>) -> Option<String> {
        let p = self.policy;
        let (unit, have, need, key, what) = if t.host_failures < p.host_failures {
            (Unit::Host, t.host_failures, p.host_failures, "tolerate_host_failures", "host")
        } else if t.fault_domain_failures < p.fault_domain_failures {
            (
                Unit::FaultDomain,
                t.fault_domain_failures,
                p.fault_domain_failures,
                "tolerate_fault_domain_failures",
                "fault-domain",
            )
        } else {
            return None;
        };
        let mut text = format!("the cluster could absorb {have} {what} failure(s), fewer than {key} = {need}");
        match planner::shortfall(spec, placement, unit, have + 1) {
            Some(s) => text.push_str(&format!(": {}", describe(&s, spec))),
            None => text.push_str(&format!(" (only {} live host(s))", spec.hosts.len())),
        }
        Some(text)
    }

    /// What `change` does to the figure, and whether strict mode refuses it.
    /// A change is a breach when it leaves the figure below the requirement
    /// and either adds load or lowers the figure: a failback that does not
    /// make a degraded cluster worse is not refused.
    pub fn assess(&self, change: Change<'_>) -> Assessment {
        let before = self.tolerance();
        let mut spec = self.live.clone();
        let mut placement = self.placement.clone();
        let adds = match change {
            Change::Add { domain, on } => {
                spec.domains.insert(domain.id, domain.clone());
                // A policy change of a domain that runs already adds nothing.
                placement.insert(domain.id, on).is_none()
            }
            Change::Move { domain, to } => {
                placement.insert(domain, to);
                false
            }
        };
        let after = planner::tolerance(&spec, &placement);
        let worse =
            after.host_failures < before.host_failures || after.fault_domain_failures < before.fault_domain_failures;
        let breach = if self.policy.mode == AdmissionMode::Off || !(adds || worse) {
            None
        } else {
            self.below_in(after, &spec, &placement)
        };
        let refused = self.policy.mode == AdmissionMode::Strict && breach.is_some();
        Assessment { before, after, breach, refused }
    }
}

/// "after a failure of h2, 2 protected domain(s) (3072 MiB, 4 vCPUs) would
/// find no room; add capacity, ..."
fn describe(s: &Shortfall, spec: &ClusterSpec) -> String {
    let names: Vec<String> =
        s.failed.iter().map(|h| spec.host(*h).map_or_else(|| h.to_string(), |x| x.name.clone())).collect();
    format!(
        "after a failure of {}, {} protected domain(s) ({} MiB, {} vCPUs) would find no room on the survivors; \
         add a host or memory, or lower what runs (priority \"disabled\" domains do not count)",
        names.join(" and "),
        s.domains,
        s.memory_mib,
        s.vcpus
    )
}

impl Node {
    /// Admission control's snapshot of the cluster as this node knows it now.
    pub fn admission(&self, now: Instant) -> Admission {
        self.admission_from(now, &self.domain_reports())
    }

    pub(super) fn admission_from(
        &self,
        now: Instant,
        reports: &BTreeMap<DomainId, (HostId, DomainReport)>,
    ) -> Admission {
        let rooms: BTreeSet<HostId> = self.host_rooms(now, reports).iter().map(|r| r.id).collect();
        let mut live = (*self.cfg.spec).clone();
        live.hosts = live.hosts.iter().filter(|h| rooms.contains(&h.id)).map(|h| self.sized(h)).collect();
        let mut placement: BTreeMap<DomainId, HostId> = reports.iter().map(|(d, (h, _))| (*d, *h)).collect();
        if let Some(m) = self.master.as_ref() {
            placement.extend(m.starting_hosts());
        }
        Admission { policy: self.cfg.spec.admission, live, placement }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::config::{DomainPolicy, HostSpec, Priority, Profile};

    const GIB: u64 = 1024;

    fn dom(id: u128, memory_gib: u64) -> DomainSpec {
        DomainSpec {
            id: DomainId(id),
            name: format!("vm{id}"),
            memory_mib: memory_gib * GIB,
            vcpus: 1,
            policy: DomainPolicy::default(),
        }
    }

    /// Three 16 GiB hosts; h1 and h2 run 8 GiB each, h3 nothing.
    fn admission(mode: AdmissionMode) -> Admission {
        let hosts = (1..=3u16)
            .map(|i| HostSpec {
                id: HostId(i),
                name: format!("h{i}"),
                fence_agents: Vec::new(),
                watchdog: true,
                fault_domain: None,
                memory_mib: 16 * GIB,
                vcpus: 16,
                max_concurrent_starts: 4,
            })
            .collect();
        let domains = [dom(1, 8), dom(2, 8)].into_iter().map(|d| (d.id, d)).collect();
        let live = ClusterSpec {
            name: "t".into(),
            timings: Profile::Default.timings(),
            hosts,
            domains,
            memory_overcommit: 1.0,
            vcpu_overcommit: 4.0,
            admission: AdmissionPolicy::default(),
        };
        let placement = [(DomainId(1), HostId(1)), (DomainId(2), HostId(2))].into_iter().collect();
        Admission { policy: AdmissionPolicy { mode, host_failures: 1, fault_domain_failures: 0 }, live, placement }
    }

    #[test]
    fn strict_refuses_an_add_that_breaks_the_requirement_and_says_by_how_much() {
        let a = admission(AdmissionMode::Strict);
        assert_eq!(a.tolerance().host_failures, 2);
        // 8 GiB on h3: any one host's 8 GiB fits in another's 8 GiB free.
        let fits = a.assess(Change::Add { domain: &dom(3, 8), on: HostId(3) });
        assert_eq!((fits.refused, fits.breach.as_deref()), (false, None), "{fits:?}");
        // 14 GiB on h3: losing h3 leaves 8 + 8 GiB free, not one 14 GiB block.
        let big = dom(3, 14);
        let r = a.assess(Change::Add { domain: &big, on: HostId(3) });
        assert!(r.refused, "{r:?}");
        assert_eq!(r.after.host_failures, 0);
        let why = r.breach.expect("a breach");
        assert!(why.contains("fewer than tolerate_host_failures = 1"), "{why}");
        assert!(why.contains("after a failure of h3, 1 protected domain(s) (14336 MiB, 1 vCPUs)"), "{why}");
    }

    #[test]
    fn warn_reports_and_off_says_nothing() {
        let big = dom(3, 14);
        let w = admission(AdmissionMode::Warn).assess(Change::Add { domain: &big, on: HostId(3) });
        assert!(!w.refused && w.breach.is_some(), "{w:?}");
        let o = admission(AdmissionMode::Off).assess(Change::Add { domain: &big, on: HostId(3) });
        assert!(!o.refused && o.breach.is_none(), "{o:?}");
    }

    #[test]
    fn a_disabled_domain_does_not_count() {
        let mut big = dom(3, 14);
        big.policy.priority = Priority::Disabled;
        let r = admission(AdmissionMode::Strict).assess(Change::Add { domain: &big, on: HostId(3) });
        assert!(!r.refused, "{r:?}");
    }

    #[test]
    fn a_policy_change_or_a_move_that_does_not_make_it_worse_is_not_refused() {
        // Degraded: only h1 and h2 live, each 8 of 16 GiB used: 1 failure still fits
        // (8 GiB onto the other's 8 free). Make h2's domain 12 GiB: 0 failures.
        let mut a = admission(AdmissionMode::Strict);
        a.live.hosts.retain(|h| h.id != HostId(3));
        a.live.domains.insert(DomainId(2), dom(2, 12));
        assert_eq!(a.tolerance().host_failures, 0);
        assert!(a.below(a.tolerance()).is_some());
        // Re-protecting vm1 with a new policy adds nothing: not refused.
        let r = a.assess(Change::Add { domain: &dom(1, 8), on: HostId(1) });
        assert!(!r.refused, "{r:?}");
        // A new domain is refused: the cluster is below the requirement already.
        let r = a.assess(Change::Add { domain: &dom(5, 1), on: HostId(1) });
        assert!(r.refused, "{r:?}");
        // Moving vm1 to h2 (20 GiB on a 16 GiB host is the planner's business, not ours):
        // no worse, so not refused.
        let r = a.assess(Change::Move { domain: DomainId(1), to: HostId(2) });
        assert_eq!(r.after, r.before);
        assert!(!r.refused, "{r:?}");
    }

    #[test]
    fn a_move_that_lowers_the_figure_below_the_requirement_is_refused() {
        // vm1 and vm2 both on h1 (16 GiB full), h2 and h3 empty: one failure fits.
        let mut a = admission(AdmissionMode::Strict);
        a.placement.insert(DomainId(2), HostId(1));
        a.live.domains.insert(DomainId(4), dom(4, 16));
        a.placement.insert(DomainId(4), HostId(2));
        // Losing h1 puts vm1 and vm2 on h3; losing h2 puts vm4 on h3: 1 failure fits.
        assert_eq!(a.tolerance().host_failures, 1);
        // vm2 back to h3: losing h2 needs 16 GiB with h1 at 8 free and h3 at 8: no.
        let r = a.assess(Change::Move { domain: DomainId(2), to: HostId(3) });
        assert!(r.after.host_failures < r.before.host_failures, "{r:?}");
        assert!(r.refused, "{r:?}");
    }
}
