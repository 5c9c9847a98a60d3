//! Restart planning (DESIGN.md §6): where each domain of a failed host starts,
//! and how many host or fault-domain failures the cluster can absorb.
//!
//! `plan` is one greedy pass: requests by priority (highest first), then
//! largest memory first, then `DomainId`; each goes to the best fitting host,
//! whose room then shrinks. What cannot be placed waits with a reason and is
//! retried by the caller when capacity changes (`StartCap` next round).
//!
//! Pure: no I/O, no clock, no hash order. The same input gives the same plan,
//! whatever the order of `hosts` and `requests`.

use super::config::{ClusterSpec, DomainId, DomainPolicy, DomainSpec, HostId, HostSpec, Priority};
use std::cmp::{Ordering, Reverse};
use std::collections::{BTreeMap, BTreeSet};

/// Free room on one candidate host, computed by the caller (capacity * overcommit - used).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostRoom {
    pub id: HostId,
    pub fault_domain: Option<String>,
    pub memory_free_mib: i64,
    pub vcpus_free: i64,
    /// Starts this host may still begin now (max_concurrent_starts - starts in flight).
    pub starts_free: u32,
    /// Anti-affinity groups that already have a domain on this host.
    pub anti_groups: BTreeSet<String>,
    /// Domains already on this host (for spreading a restart storm).
    pub domain_count: u32,
}

#[derive(Clone, Debug)]
pub struct PlanRequest<'a> {
    pub domain: &'a DomainSpec,
    /// Hosts where this domain failed to start recently: use only if nothing else fits.
    pub avoid: Vec<HostId>,
}

/// Why a domain was not placed. When several hosts fail for different
/// reasons, the reason closest to success is given: `StartCap`, then
/// `AntiAffinity`, then `NoCapacity`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WaitReason {
    /// Memory or vCPU room is short on every allowed host.
    NoCapacity,
    /// Host affinity excludes every live host.
    NoAllowedHost,
    /// A host has room, but each such host already runs a member of the
    /// domain's anti-affinity group (hard rule).
    AntiAffinity,
    /// The domain fits, but every fitting host is at its concurrent-start
    /// cap; retried next round.
    StartCap,
    /// Priority `Disabled`: havirt does not restart this domain.
    Disabled,
}

/// The outcome of one planning pass, both lists in planning order.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    pub placements: Vec<(DomainId, HostId)>,
    pub waiting: Vec<(DomainId, WaitReason)>,
}

/// A host's room during one `plan` call, with names interned to small ids.
struct Slot {
    id: HostId,
    fault_domain: usize,
    memory_free_mib: i64,
    vcpus_free: i64,
    starts_free: u32,
    /// Interned anti-affinity groups on this host, sorted.
    groups: Vec<u32>,
    /// `domain_count` plus placements made by this plan.
    domains: u32,
}

/// One request, prepared for the inner loop.
struct Want<'a> {
    id: DomainId,
    memory_mib: i64,
    vcpus: i64,
    group: Option<u32>,
    affinity: &'a [HostId],
    avoid: &'a [HostId],
}

/// Why each allowed host refused one request, for `WaitReason`.
#[derive(Default)]
struct Refusals {
    allowed: bool,
    anti_only: bool,
    cap_only: bool,
}

/// Interned names: anti-affinity groups and fault domains.
#[derive(Default)]
struct Names<'a> {
    groups: BTreeMap<&'a str, u32>,
}

impl<'a> Names<'a> {
    fn group(&mut self, name: &'a str) -> u32 {
        let next = u32::try_from(self.groups.len()).unwrap_or(u32::MAX);
        *self.groups.entry(name).or_insert(next)
    }
}

fn sorted_insert(set: &mut Vec<u32>, v: u32) {
    if let Err(at) = set.binary_search(&v) {
        set.insert(at, v);
    }
}

fn holds(set: &[u32], v: u32) -> bool {
    set.binary_search(&v).is_ok()
}

/// Memory in MiB as a signed room figure; sizes beyond `i64::MAX` never fit.
fn mib(memory_mib: u64) -> i64 {
    i64::try_from(memory_mib).unwrap_or(i64::MAX)
}

/// Interns hosts: a host without a fault domain is a fault domain of its own.
/// Returns the slots and, per fault domain, the sorted groups it holds.
fn intern_hosts<'a>(hosts: &'a [HostRoom], names: &mut Names<'a>) -> (Vec<Slot>, Vec<Vec<u32>>) {
    let mut fault_domains: BTreeMap<&str, usize> = BTreeMap::new();
    let mut fd_groups: Vec<Vec<u32>> = Vec::new();
    let mut slots = Vec::with_capacity(hosts.len());
    for h in hosts {
        let fd = match h.fault_domain.as_deref() {
            Some(name) => *fault_domains.entry(name).or_insert_with(|| {
                fd_groups.push(Vec::new());
                fd_groups.len() - 1
            }),
            None => {
                fd_groups.push(Vec::new());
                fd_groups.len() - 1
            }
        };
        let mut groups = Vec::with_capacity(h.anti_groups.len());
        for g in &h.anti_groups {
            let gid = names.group(g);
            sorted_insert(&mut groups, gid);
            sorted_insert(&mut fd_groups[fd], gid);
        }
        slots.push(Slot {
            id: h.id,
            fault_domain: fd,
            memory_free_mib: h.memory_free_mib,
            vcpus_free: h.vcpus_free,
            starts_free: h.starts_free,
            groups,
            domains: h.domain_count,
        });
    }
    (slots, fd_groups)
}

/// Planning order: priority (highest first), then memory (largest first),
/// then `DomainId`. Stable, so equal ids keep their input order.
fn planning_order(a: &DomainSpec, b: &DomainSpec) -> Ordering {
    (Reverse(a.policy.priority), Reverse(a.memory_mib), a.id).cmp(&(
        Reverse(b.policy.priority),
        Reverse(b.memory_mib),
        b.id,
    ))
}

/// Places `requests` on `hosts` (DESIGN.md §6).
///
/// A host fits when it has the memory and vCPU room, a free start, is allowed
/// by the domain's affinity, and runs no member of the domain's anti-affinity
/// group (hard rule). Among fitting hosts the best is, in order: not in
/// `avoid`; in a fault domain not yet holding the domain's group (soft; a host
/// without a fault domain is a fault domain of its own); fewest domains
/// (`domain_count` plus this plan's placements) to spread a restart storm;
/// most free memory; lowest `HostId`.
///
/// Cost: O(requests × hosts) cheap checks; names are interned up front.
pub fn plan(hosts: &[HostRoom], requests: &[PlanRequest<'_>]) -> Plan {
    let mut names = Names::default();
    let (mut slots, mut fd_groups) = intern_hosts(hosts, &mut names);
    let mut order: Vec<&PlanRequest<'_>> = requests.iter().collect();
    order.sort_by(|a, b| planning_order(a.domain, b.domain));
    let mut out = Plan::default();
    for r in order {
        let d = r.domain;
        if d.policy.priority == Priority::Disabled {
            out.waiting.push((d.id, WaitReason::Disabled));
            continue;
        }
        let want = Want {
            id: d.id,
            memory_mib: mib(d.memory_mib),
            vcpus: i64::from(d.vcpus),
            group: d.policy.anti_affinity.as_deref().map(|g| names.group(g)),
            affinity: &d.policy.affinity,
            avoid: &r.avoid,
        };
        match choose(&slots, &fd_groups, &want) {
            Ok(at) => {
                let s = &mut slots[at];
                s.memory_free_mib = s.memory_free_mib.saturating_sub(want.memory_mib);
                s.vcpus_free = s.vcpus_free.saturating_sub(want.vcpus);
                s.starts_free = s.starts_free.saturating_sub(1);
                s.domains = s.domains.saturating_add(1);
                if let Some(g) = want.group {
                    sorted_insert(&mut s.groups, g);
                    sorted_insert(&mut fd_groups[s.fault_domain], g);
                }
                out.placements.push((want.id, s.id));
            }
            Err(reason) => out.waiting.push((want.id, reason)),
        }
    }
    out
}

/// How good a fitting host is; the smallest wins: not avoided, fault domain
/// fresh for the group, fewest domains, most free memory, lowest id.
type Rank = (bool, bool, u32, Reverse<i64>, HostId);

/// The index of the best fitting slot, or why none fits.
fn choose(slots: &[Slot], fd_groups: &[Vec<u32>], want: &Want<'_>) -> Result<usize, WaitReason> {
    let mut best: Option<(usize, Rank)> = None;
    let mut refused = Refusals::default();
    for (at, s) in slots.iter().enumerate() {
        if !want.affinity.is_empty() && !want.affinity.contains(&s.id) {
            continue;
        }
        refused.allowed = true;
        let room =
            s.memory_free_mib >= want.memory_mib && s.vcpus_free >= want.vcpus && s.domains < MAX_DOMAINS_PER_HOST;
        let anti_ok = want.group.is_none_or(|g| !holds(&s.groups, g));
        if !(room && anti_ok && s.starts_free > 0) {
            refused.anti_only |= room && !anti_ok;
            refused.cap_only |= room && anti_ok;
            continue;
        }
        let fd_taken = want.group.is_some_and(|g| holds(&fd_groups[s.fault_domain], g));
        let key: Rank = (want.avoid.contains(&s.id), fd_taken, s.domains, Reverse(s.memory_free_mib), s.id);
        if best.as_ref().is_none_or(|(_, k)| key < *k) {
            best = Some((at, key));
        }
    }
    match best {
        Some((at, _)) => Ok(at),
        None if !refused.allowed => Err(WaitReason::NoAllowedHost),
        None if refused.cap_only => Err(WaitReason::StartCap),
        None if refused.anti_only => Err(WaitReason::AntiAffinity),
        None => Err(WaitReason::NoCapacity),
    }
}

/// How many failures the cluster absorbs with every protected domain restarted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tolerance {
    pub host_failures: u32,
    pub fault_domain_failures: u32,
}

/// Above this many combinations of k failed hosts (or fault domains),
/// `tolerance` checks only the worst case instead of every combination.
pub const TOLERANCE_COMBINATIONS_MAX: u64 = 2_000;
/// Protected domains one host may run: its heartbeat slot lists each one in
/// one 4 KiB record, which holds 134 in the worst case. A slot that does
/// not fit cannot be written, and a host whose slot writes fail self-fences
/// (S4), so the planner never places more, with a margin for releases.
pub const MAX_DOMAINS_PER_HOST: u32 = 128;

/// How many host (and fault-domain) failures the cluster can absorb: for k = 1.., every
/// protected (non-Disabled) domain of the failed hosts must be placeable on the survivors
/// with `plan` (ignoring start caps). placement: where each domain runs now.
///
/// For each k, every combination of k failed hosts is checked when there are
/// at most `TOLERANCE_COMBINATIONS_MAX` of them; otherwise only the k hosts
/// carrying the most protected memory (the worst case, ties to the lowest
/// `HostId`), so a large cluster's figure is an estimate, not a proof.
/// Fault domains are counted the same way; a host without a fault domain is a
/// fault domain of its own. At least one host (fault domain) must survive, so
/// the figures are at most the number of hosts (fault domains) minus one.
///
/// Capacity per host is `memory_mib * memory_overcommit` and
/// `vcpus * vcpu_overcommit`, floored; every placed domain (Disabled too)
/// uses room on its host. Domains placed on hosts not in `spec` are ignored.
pub fn tolerance(spec: &ClusterSpec, placement: &BTreeMap<DomainId, HostId>) -> Tolerance {
    let base = Survey::new(spec, placement);
    Tolerance {
        host_failures: base.absorbable(&failure_units(spec, Unit::Host)),
        fault_domain_failures: base.absorbable(&failure_units(spec, Unit::FaultDomain)),
    }
}

/// What fails together: one host, or one fault domain (a host without one
/// is a fault domain of its own).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Unit {
    Host,
    FaultDomain,
}

/// Sets of host indices of `spec.hosts` that fail together.
fn failure_units(spec: &ClusterSpec, unit: Unit) -> Vec<Vec<usize>> {
    if unit == Unit::Host {
        return (0..spec.hosts.len()).map(|i| vec![i]).collect();
    }
    let mut by_fd: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
    let mut units: Vec<Vec<usize>> = Vec::new();
    for (i, h) in spec.hosts.iter().enumerate() {
        match h.fault_domain.as_deref() {
            Some(name) => by_fd.entry(name).or_default().push(i),
            None => units.push(vec![i]),
        }
    }
    units.extend(by_fd.into_values());
    units
}

/// What would not restart after the worst failure of `k` units.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Shortfall {
    /// The failed hosts of that worst case.
    pub failed: Vec<HostId>,
    /// Protected domains of the failed hosts that find no room.
    pub domains: u32,
    pub memory_mib: u64,
    pub vcpus: u32,
}

/// Admission control's "by how much": over the failure combinations of `k`
/// units that `tolerance` checks, the one that leaves the most protected
/// memory unplaced, and what waits then. None: every such failure is
/// absorbed (or `k` leaves no survivor, which no cluster absorbs).
pub fn shortfall(spec: &ClusterSpec, placement: &BTreeMap<DomainId, HostId>, unit: Unit, k: u32) -> Option<Shortfall> {
    let base = Survey::new(spec, placement);
    let units = failure_units(spec, unit);
    let k = usize::try_from(k).ok().filter(|k| (1..units.len()).contains(k))?;
    let mut combos = Vec::new();
    if combinations_at_most(units.len(), k, TOLERANCE_COMBINATIONS_MAX) {
        let mut pick: Vec<usize> = (0..k).collect();
        loop {
            combos.push(pick.clone());
            if !next_combination(&mut pick, units.len()) {
                break;
            }
        }
    } else {
        combos.push(base.heaviest(&units, k));
    }
    let mut worst: Option<Shortfall> = None;
    for pick in combos {
        let s = base.waiting(&units, &pick, spec);
        if s.domains > 0 && worst.as_ref().is_none_or(|w| s.memory_mib > w.memory_mib) {
            worst = Some(s);
        }
    }
    worst
}

/// The cluster as it runs now, per host index of `spec.hosts`.
struct Survey<'a> {
    rooms: Vec<HostRoom>,
    /// Protected domains running on each host.
    protected: Vec<Vec<&'a DomainSpec>>,
}

/// `units * factor`, floored. `as` saturates at the `i64` range (NaN gives 0),
/// which is the intent for absurd overcommit figures.
#[allow(clippy::cast_possible_truncation, clippy::cast_precision_loss)]
fn scaled(units: u64, factor: f64) -> i64 {
    (units as f64 * factor).floor() as i64
}

impl HostRoom {
    /// Account for a domain that runs (or is being started) on this host.
    pub fn occupy(&mut self, d: &DomainSpec) {
        self.memory_free_mib = self.memory_free_mib.saturating_sub(mib(d.memory_mib));
        self.vcpus_free = self.vcpus_free.saturating_sub(i64::from(d.vcpus));
        self.domain_count = self.domain_count.saturating_add(1);
        if let Some(g) = &d.policy.anti_affinity {
            self.anti_groups.insert(g.clone());
        }
    }
}

/// The room of an empty host: its size times the cluster's overcommit, its
/// own start cap.
pub fn empty_room(h: &HostSpec, spec: &ClusterSpec) -> HostRoom {
    HostRoom {
        id: h.id,
        fault_domain: h.fault_domain.clone(),
        memory_free_mib: scaled(h.memory_mib, spec.memory_overcommit),
        vcpus_free: scaled(u64::from(h.vcpus), spec.vcpu_overcommit),
        starts_free: h.max_concurrent_starts,
        anti_groups: BTreeSet::new(),
        domain_count: 0,
    }
}

impl<'a> Survey<'a> {
    fn new(spec: &'a ClusterSpec, placement: &BTreeMap<DomainId, HostId>) -> Self {
        let index: BTreeMap<HostId, usize> = spec.hosts.iter().enumerate().map(|(i, h)| (h.id, i)).collect();
        let mut rooms: Vec<HostRoom> =
            spec.hosts.iter().map(|h| HostRoom { starts_free: u32::MAX, ..empty_room(h, spec) }).collect();
        let mut protected = vec![Vec::new(); rooms.len()];
        for (id, host) in placement {
            let (Some(d), Some(&at)) = (spec.domains.get(id), index.get(host)) else {
                continue;
            };
            rooms[at].occupy(d);
            if d.policy.priority != Priority::Disabled {
                protected[at].push(d);
            }
        }
        Survey { rooms, protected }
    }

    /// The largest k such that losing any k of `units` (each a set of host
    /// indices) leaves every protected domain placeable.
    fn absorbable(&self, units: &[Vec<usize>]) -> u32 {
        let n = units.len();
        for k in 1..n {
            let ok = if combinations_at_most(n, k, TOLERANCE_COMBINATIONS_MAX) {
                let mut pick: Vec<usize> = (0..k).collect();
                loop {
                    if !self.survives(units, &pick) {
                        break false;
                    }
                    if !next_combination(&mut pick, n) {
                        break true;
                    }
                }
            } else {
                self.survives(units, &self.heaviest(units, k))
            };
            if !ok {
                return u32::try_from(k - 1).unwrap_or(u32::MAX);
            }
        }
        u32::try_from(n.saturating_sub(1)).unwrap_or(u32::MAX)
    }

    /// The k units carrying the most protected memory, ties to the first.
    fn heaviest(&self, units: &[Vec<usize>], k: usize) -> Vec<usize> {
        let load = |u: &Vec<usize>| -> u64 {
            u.iter().flat_map(|&h| self.protected[h].iter()).map(|d| d.memory_mib).fold(0, u64::saturating_add)
        };
        let mut by_load: Vec<(Reverse<u64>, usize)> =
            units.iter().enumerate().map(|(i, u)| (Reverse(load(u)), i)).collect();
        by_load.sort();
        by_load.into_iter().take(k).map(|(_, i)| i).collect()
    }

    /// Whether the protected domains of the failed units all fit on the rest.
    fn survives(&self, units: &[Vec<usize>], failed_units: &[usize]) -> bool {
        self.plan_after(units, failed_units).waiting.is_empty()
    }

    /// The restart plan for the protected domains of the failed units on the rest.
    fn plan_after(&self, units: &[Vec<usize>], failed_units: &[usize]) -> Plan {
        let failed = self.failed_hosts(units, failed_units);
        let survivors: Vec<HostRoom> =
            self.rooms.iter().zip(&failed).filter(|(_, f)| !**f).map(|(r, _)| r.clone()).collect();
        let requests: Vec<PlanRequest<'_>> = self
            .protected
            .iter()
            .zip(&failed)
            .filter(|(_, f)| **f)
            .flat_map(|(ds, _)| ds.iter())
            .map(|d| PlanRequest { domain: d, avoid: Vec::new() })
            .collect();
        plan(&survivors, &requests)
    }

    fn failed_hosts(&self, units: &[Vec<usize>], failed_units: &[usize]) -> Vec<bool> {
        let mut failed = vec![false; self.rooms.len()];
        for &u in failed_units {
            for &h in &units[u] {
                failed[h] = true;
            }
        }
        failed
    }

    /// What waits (other than Disabled) when the failed units fail.
    fn waiting(&self, units: &[Vec<usize>], failed_units: &[usize], spec: &ClusterSpec) -> Shortfall {
        let failed = self.failed_hosts(units, failed_units);
        let mut s = Shortfall {
            failed: spec.hosts.iter().zip(&failed).filter(|(_, f)| **f).map(|(h, _)| h.id).collect(),
            domains: 0,
            memory_mib: 0,
            vcpus: 0,
        };
        for (d, why) in self.plan_after(units, failed_units).waiting {
            let Some(ds) = spec.domains.get(&d) else { continue };
            if why == WaitReason::Disabled {
                continue;
            }
            s.domains = s.domains.saturating_add(1);
            s.memory_mib = s.memory_mib.saturating_add(ds.memory_mib);
            s.vcpus = s.vcpus.saturating_add(ds.vcpus);
        }
        s
    }
}

/// Whether C(n, k) <= `max`, without overflow.
fn combinations_at_most(n: usize, k: usize, max: u64) -> bool {
    let k = k.min(n.saturating_sub(k));
    let mut c: u128 = 1;
    for i in 0..k {
        // C(n, i+1) = C(n, i) * (n - i) / (i + 1), exact at every step.
        c = c * (n - i) as u128 / (i + 1) as u128;
        if c > u128::from(max) {
            return false;
        }
    }
    true
}

/// Advances `pick` (strictly increasing indices below `n`) to the next
/// combination in lexicographic order; false after the last one.
fn next_combination(pick: &mut [usize], n: usize) -> bool {
    let k = pick.len();
    for i in (0..k).rev() {
        if pick[i] < n - k + i {
            pick[i] += 1;
            for j in i + 1..k {
                pick[j] = pick[j - 1] + 1;
            }
            return true;
        }
    }
    false
}

/// A deterministic restart storm for benchmarks (`benches/planner.rs`,
/// `havirt bench planner`): `hosts` empty hosts of 256 GiB and 64 cores at a
/// 4x vCPU overcommit (256 vCPUs), in 8 fault domains, with start caps high
/// enough not to limit; `domains` domains of 0.5–8 GiB and 1–4 vCPUs (about
/// 95% of the memory of 128 hosts for 10,000 domains), 10% in one of 50
/// anti-affinity groups, priorities mixed with about 1% Disabled.
/// Host ids are 1..=`hosts`, at most `u16::MAX` hosts.
pub fn bench_case(hosts: usize, domains: usize) -> (Vec<HostRoom>, Vec<DomainSpec>) {
    const PRIORITIES: [Priority; 5] =
        [Priority::Lowest, Priority::Low, Priority::Medium, Priority::High, Priority::Highest];
    let rooms = (1..=u16::try_from(hosts).unwrap_or(u16::MAX))
        .map(|h| HostRoom {
            id: HostId(h),
            fault_domain: Some(format!("rack{}", h % 8)),
            memory_free_mib: 256 * 1024,
            vcpus_free: 64 * 4,
            starts_free: 10_000,
            anti_groups: BTreeSet::new(),
            domain_count: 0,
        })
        .collect();
    let specs = (0..domains)
        .map(|i| {
            let priority = if i % 97 == 0 { Priority::Disabled } else { PRIORITIES[(i * 13) % 5] };
            DomainSpec {
                id: DomainId(i as u128 + 1),
                name: format!("vm{i}"),
                memory_mib: 512 << ((i * 7) % 5),
                vcpus: [1, 2, 3, 4][(i * 3) % 4],
                policy: DomainPolicy {
                    priority,
                    anti_affinity: (i % 10 == 0).then(|| format!("group{}", (i / 10) % 50)),
                    ..DomainPolicy::default()
                },
            }
        })
        .collect();
    (rooms, specs)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::config::Profile;

    const GIB: i64 = 1024;

    fn host(id: u16, memory_gib: i64) -> HostRoom {
        HostRoom {
            id: HostId(id),
            fault_domain: None,
            memory_free_mib: memory_gib * GIB,
            vcpus_free: 64,
            starts_free: 100,
            anti_groups: BTreeSet::new(),
            domain_count: 0,
        }
    }

    fn dom(id: u128, memory_gib: u64, priority: Priority) -> DomainSpec {
        DomainSpec {
            id: DomainId(id),
            name: format!("vm{id}"),
            memory_mib: memory_gib * 1024,
            vcpus: 1,
            policy: DomainPolicy { priority, ..DomainPolicy::default() },
        }
    }

    fn grouped(id: u128, group: &str) -> DomainSpec {
        let mut d = dom(id, 1, Priority::Medium);
        d.policy.anti_affinity = Some(group.to_string());
        d
    }

    fn reqs(domains: &[DomainSpec]) -> Vec<PlanRequest<'_>> {
        domains.iter().map(|d| PlanRequest { domain: d, avoid: Vec::new() }).collect()
    }

    fn placed(p: &Plan, id: u128) -> Option<HostId> {
        p.placements.iter().find(|(d, _)| d.0 == id).map(|(_, h)| *h)
    }

    fn waits(p: &Plan, id: u128) -> Option<WaitReason> {
        p.waiting.iter().find(|(d, _)| d.0 == id).map(|(_, w)| *w)
    }

    #[test]
    fn higher_priority_wins_scarce_capacity() {
        // Largest-first alone would pick the 8 GiB low-priority domain.
        let ds = [dom(1, 8, Priority::Low), dom(2, 4, Priority::High)];
        let p = plan(&[host(1, 8)], &reqs(&ds));
        assert_eq!(placed(&p, 2), Some(HostId(1)));
        assert_eq!(waits(&p, 1), Some(WaitReason::NoCapacity));
        assert_eq!(p.placements.len(), 1);
    }

    #[test]
    fn larger_domain_first_at_equal_priority() {
        // Id order alone would pick the 4 GiB domain.
        let ds = [dom(1, 4, Priority::Medium), dom(2, 8, Priority::Medium)];
        let p = plan(&[host(1, 8)], &reqs(&ds));
        assert_eq!(p.placements, vec![(DomainId(2), HostId(1))]);
        assert_eq!(p.waiting, vec![(DomainId(1), WaitReason::NoCapacity)]);
    }

    #[test]
    fn a_host_takes_no_more_domains_than_its_slot_can_list() {
        let mut full = host(1, 64);
        full.domain_count = MAX_DOMAINS_PER_HOST - 1;
        let ds = [dom(1, 1, Priority::Medium), dom(2, 1, Priority::Medium)];
        let p = plan(&[full], &reqs(&ds));
        assert_eq!(p.placements.len(), 1);
        assert_eq!(p.waiting.len(), 1);
    }

    #[test]
    fn vcpu_shortage_is_no_capacity() {
        let mut d = dom(1, 1, Priority::Medium);
        d.vcpus = 65;
        let p = plan(&[host(1, 64)], &reqs(std::slice::from_ref(&d)));
        assert_eq!(p.waiting, vec![(DomainId(1), WaitReason::NoCapacity)]);
    }

    #[test]
    fn anti_affinity_never_shares_a_host() {
        let ds = [grouped(1, "db"), grouped(2, "db")];
        let p = plan(&[host(1, 64)], &reqs(&ds));
        assert_eq!(p.placements, vec![(DomainId(1), HostId(1))]);
        assert_eq!(p.waiting, vec![(DomainId(2), WaitReason::AntiAffinity)]);

        let p = plan(&[host(1, 64), host(2, 64)], &reqs(&ds));
        assert_eq!(p.placements.len(), 2);
        assert_ne!(placed(&p, 1), placed(&p, 2));

        // A member already running counts too, even on the roomiest host.
        let mut busy = host(1, 64);
        busy.anti_groups.insert("db".to_string());
        let p = plan(&[busy, host(2, 2)], &reqs(&ds[..1]));
        assert_eq!(placed(&p, 1), Some(HostId(2)));
    }

    #[test]
    fn anti_affinity_prefers_a_fresh_fault_domain() {
        let mut h1 = host(1, 64);
        h1.fault_domain = Some("rackA".into());
        h1.anti_groups.insert("db".into());
        let mut h2 = host(2, 64);
        h2.fault_domain = Some("rackA".into());
        let mut h3 = host(3, 32);
        h3.fault_domain = Some("rackB".into());
        h3.domain_count = 10;
        // Spreading alone prefers h2 (fewer domains, more memory).
        let ds = [grouped(1, "db")];
        let p = plan(&[h1.clone(), h2.clone(), h3.clone()], &reqs(&ds));
        assert_eq!(placed(&p, 1), Some(HostId(3)));

        // Placements of this plan count: the second member avoids rackA, and
        // the third, with no fresh rack left, still goes on (soft rule).
        let ds = [grouped(1, "web"), grouped(2, "web"), grouped(3, "web")];
        let mut h4 = host(4, 64);
        h4.fault_domain = Some("rackB".into());
        let p = plan(&[h2, h3, h4], &reqs(&ds));
        assert_eq!(placed(&p, 1), Some(HostId(2)));
        assert_eq!(placed(&p, 2), Some(HostId(4)));
        assert_eq!(placed(&p, 3), Some(HostId(3)));
    }

    #[test]
    fn affinity_restricts_hosts() {
        let mut d = dom(1, 4, Priority::Medium);
        d.policy.affinity = vec![HostId(3)];
        let hosts = [host(1, 64), host(2, 64), host(3, 8)];
        let p = plan(&hosts, &reqs(std::slice::from_ref(&d)));
        assert_eq!(placed(&p, 1), Some(HostId(3)));

        d.policy.affinity = vec![HostId(9)];
        let p = plan(&hosts, &reqs(std::slice::from_ref(&d)));
        assert_eq!(p.waiting, vec![(DomainId(1), WaitReason::NoAllowedHost)]);
    }

    #[test]
    fn start_cap_makes_the_rest_wait() {
        let mut h = host(1, 64);
        h.starts_free = 1;
        let ds = [dom(1, 1, Priority::Medium), dom(2, 1, Priority::Medium)];
        let p = plan(&[h.clone()], &reqs(&ds));
        assert_eq!(p.placements, vec![(DomainId(1), HostId(1))]);
        assert_eq!(p.waiting, vec![(DomainId(2), WaitReason::StartCap)]);

        // Fits only on the capped host: StartCap, not NoCapacity.
        h.starts_free = 0;
        let p = plan(&[h, host(2, 0)], &reqs(&ds[..1]));
        assert_eq!(p.waiting, vec![(DomainId(1), WaitReason::StartCap)]);
    }

    #[test]
    fn avoided_host_only_when_nothing_else_fits() {
        let d = dom(1, 4, Priority::Medium);
        let avoid = [PlanRequest { domain: &d, avoid: vec![HostId(1)] }];
        let p = plan(&[host(1, 64), host(2, 16)], &avoid);
        assert_eq!(placed(&p, 1), Some(HostId(2)));
        let p = plan(&[host(1, 64), host(2, 2)], &avoid);
        assert_eq!(placed(&p, 1), Some(HostId(1)));
    }

    #[test]
    fn storm_spreads_evenly() {
        let per_host = |p: &Plan| {
            let mut n: BTreeMap<HostId, u32> = BTreeMap::new();
            for (_, h) in &p.placements {
                *n.entry(*h).or_default() += 1;
            }
            (1..=4).map(|i| n.get(&HostId(i)).copied().unwrap_or(0)).collect::<Vec<_>>()
        };
        let ds: Vec<DomainSpec> = (1..=20).map(|i| dom(i, 2, Priority::Medium)).collect();
        let hosts: Vec<HostRoom> = (1..=4).map(|i| host(i, 64)).collect();
        let p = plan(&hosts, &reqs(&ds));
        assert!(p.waiting.is_empty());
        assert_eq!(per_host(&p), vec![5, 5, 5, 5]);

        // Count beats free memory: unequal hosts still share the storm.
        let hosts: Vec<HostRoom> = [64, 48, 32, 24].into_iter().zip(1..).map(|(m, i)| host(i, m)).collect();
        assert_eq!(per_host(&plan(&hosts, &reqs(&ds))), vec![5, 5, 5, 5]);

        // Domains already running count: a host with 4 gets none of 8 more.
        let mut hosts: Vec<HostRoom> = (1..=4).map(|i| host(i, 64)).collect();
        hosts[0].domain_count = 4;
        assert_eq!(per_host(&plan(&hosts, &reqs(&ds[..8]))), vec![0, 3, 3, 2]);
    }

    #[test]
    fn disabled_is_never_placed() {
        let ds = [dom(1, 1, Priority::Disabled)];
        let p = plan(&[host(1, 64)], &reqs(&ds));
        assert!(p.placements.is_empty());
        assert_eq!(p.waiting, vec![(DomainId(1), WaitReason::Disabled)]);
    }

    #[test]
    fn same_input_same_plan_whatever_the_order() {
        let (mut hosts, domains) = bench_case(16, 600);
        let first = plan(&hosts, &reqs(&domains));
        assert_eq!(first, plan(&hosts, &reqs(&domains)));
        hosts.reverse();
        let mut rev = reqs(&domains);
        rev.reverse();
        assert_eq!(first, plan(&hosts, &rev));
    }

    #[test]
    fn large_plan_keeps_room_and_groups() {
        let (hosts, domains) = bench_case(32, 2_500);
        let p = plan(&hosts, &reqs(&domains));
        assert!(!p.placements.is_empty() && !p.waiting.is_empty());
        let by_id: BTreeMap<DomainId, &DomainSpec> = domains.iter().map(|d| (d.id, d)).collect();
        let mut used: BTreeMap<HostId, (i64, i64)> = BTreeMap::new();
        let mut pairs: BTreeSet<(HostId, &str)> = BTreeSet::new();
        for (d, h) in &p.placements {
            let d = by_id[d];
            let u = used.entry(*h).or_default();
            u.0 += mib(d.memory_mib);
            u.1 += i64::from(d.vcpus);
            if let Some(g) = &d.policy.anti_affinity {
                assert!(pairs.insert((*h, g.as_str())), "{g} twice on {h}");
            }
        }
        for h in &hosts {
            let u = used.get(&h.id).copied().unwrap_or_default();
            assert!(u.0 <= h.memory_free_mib && u.1 <= h.vcpus_free, "{} overfull", h.id);
        }
        assert_eq!(p.placements.len() + p.waiting.len(), domains.len());
    }

    fn cluster(fault_domains: [&str; 3]) -> (ClusterSpec, BTreeMap<DomainId, HostId>) {
        let hosts = (1..=3u16)
            .zip(fault_domains)
            .map(|(i, fd)| HostSpec {
                id: HostId(i),
                name: format!("h{i}"),
                fence_agents: Vec::new(),
                watchdog: true,
                fault_domain: Some(fd.to_string()),
                memory_mib: 16 * 1024,
                vcpus: 16,
                max_concurrent_starts: 1,
            })
            .collect();
        // Each host runs two 4 GiB domains: 50% full.
        let domains: BTreeMap<DomainId, DomainSpec> =
            (1..=6).map(|i| (DomainId(i), dom(i, 4, Priority::Medium))).collect();
        let placement = (1..=6u16).map(|i| (DomainId(u128::from(i)), HostId(i.div_ceil(2)))).collect();
        let spec = ClusterSpec {
            name: "t".into(),
            timings: Profile::Default.timings(),
            hosts,
            domains,
            memory_overcommit: 1.0,
            vcpu_overcommit: 1.0,
            admission: crate::engine::config::AdmissionPolicy::default(),
        };
        (spec, placement)
    }

    #[test]
    fn half_full_three_hosts_tolerate_one_failure() {
        let (spec, placement) = cluster(["a", "b", "c"]);
        let t = tolerance(&spec, &placement);
        assert_eq!(t, Tolerance { host_failures: 1, fault_domain_failures: 1 });

        // Losing rack "a" loses two hosts, which the third cannot absorb.
        let (spec, placement) = cluster(["a", "a", "c"]);
        assert_eq!(tolerance(&spec, &placement), Tolerance { host_failures: 1, fault_domain_failures: 0 });
    }

    #[test]
    fn tolerance_follows_overcommit_and_disabled() {
        // At 1.5x memory every host has 16 GiB free: two failures fit.
        let (mut spec, placement) = cluster(["a", "b", "c"]);
        spec.memory_overcommit = 1.5;
        assert_eq!(tolerance(&spec, &placement).host_failures, 2);

        // With half the domains Disabled, two failures need only 8 GiB on one host.
        let (mut spec, placement) = cluster(["a", "b", "c"]);
        for d in spec.domains.values_mut().filter(|d| d.id.0 % 2 == 0) {
            d.policy.priority = Priority::Disabled;
        }
        assert_eq!(tolerance(&spec, &placement).host_failures, 2);
    }

    #[test]
    fn combination_counting() {
        assert!(combinations_at_most(128, 1, 2_000));
        assert!(!combinations_at_most(128, 2, 2_000));
        assert!(combinations_at_most(128, 127, 2_000));
        assert!(combinations_at_most(14, 4, 2_000)); // 1001
        assert!(!combinations_at_most(15, 5, 2_000)); // 3003
        let mut pick = vec![0, 1];
        let mut seen = 1;
        while next_combination(&mut pick, 4) {
            seen += 1;
        }
        assert_eq!((seen, pick), (6, vec![2, 3]));
    }
}
