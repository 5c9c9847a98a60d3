//! Random runs: a cluster, its hardware timings and a fault schedule, all
//! drawn from one seed (as TigerBeetle's VOPR). Only faults the design claims
//! to survive are injected; the last minutes heal everything and the run must
//! converge (L1) with S1-S5 and L2 holding throughout.

use super::block::DatastoreKind;
use super::faults::{AgentMode, Command, StorageFault};
use super::world::WorldParams;
use super::{RunOutcome, SimSetup, run_commands};
use crate::engine::config::*;
use crate::engine::planner::{self, HostRoom, PlanRequest};
use crate::engine::time::{Duration, Rng};
use std::collections::BTreeMap;

#[derive(Clone, Debug)]
pub struct RandomOptions {
    pub shape: Shape,
    pub duration_ms: u64,
    pub profile: Profile,
    pub datastore: Datastores,
}

/// Which datastore backend random runs use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Datastores {
    /// Every seed this one.
    Only(DatastoreKind),
    /// Both, by seed (`datastore_of`).
    Mixed,
}

/// The datastore a seed runs on: with `Mixed`, five consecutive seeds (one
/// of each `MATRIX_HOSTS` count) on dir, the next five on block, so each
/// host count runs on both and a dir seed is the very run it always was.
pub fn datastore_of(seed: u64, d: Datastores) -> DatastoreKind {
    match d {
        Datastores::Only(k) => k,
        Datastores::Mixed if (seed / MATRIX_HOSTS.len() as u64) % 2 == 1 => DatastoreKind::Block,
        Datastores::Mixed => DatastoreKind::Dir,
    }
}

/// How many hosts and protected domains a random run's cluster has.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Shape {
    /// Every seed the same cluster size.
    Fixed { hosts: u16, domains: u32 },
    /// The clusters users run, drawn from the seed (`shape_of`): every run
    /// of `MATRIX_HOSTS.len()` consecutive seeds covers each host count.
    Matrix,
}

/// Host counts of `Shape::Matrix`: two-host clusters (no tie-breaker) and
/// three first, as most homelabs and small shops run them, up to seven.
pub const MATRIX_HOSTS: [u16; 5] = [2, 3, 4, 5, 7];
/// Protected domains per host of `Shape::Matrix`, from a few to dense.
pub const MATRIX_DOMAINS_PER_HOST: (u32, u32) = (4, 20);

/// (hosts, domains) of the cluster a seed runs.
pub fn shape_of(seed: u64, shape: Shape) -> (u16, u32) {
    match shape {
        Shape::Fixed { hosts, domains } => (hosts, domains),
        Shape::Matrix => {
            let hosts = MATRIX_HOSTS[usize::try_from(seed % MATRIX_HOSTS.len() as u64).unwrap_or(0)];
            let (lo, hi) = MATRIX_DOMAINS_PER_HOST;
            // A stream of its own: the rest of the seed's draws do not move.
            let per_host = u32::try_from(Rng::new(seed ^ 0x5A4E_u64).range(u64::from(lo), u64::from(hi))).unwrap_or(lo);
            (hosts, u32::from(hosts) * per_host)
        }
    }
}

/// The last part of every random run has no new fault: time to converge.
pub const HEAL_MS: u64 = 180_000;
/// Log lines kept per random run (the timeline printed with a violation).
pub const RANDOM_LOG_CAP: usize = 400;

pub fn random_setup(seed: u64, o: &RandomOptions) -> SimSetup {
    let mut rng = Rng::new(seed ^ 0x5E7u64);
    let (host_count, domain_count) = shape_of(seed, o.shape);
    let hosts: Vec<HostSpec> = (1..=host_count)
        .map(|i| {
            let fence_agents = match rng.range(0, 9) {
                0 => vec![],
                1 | 2 => vec!["ipmi".to_string(), "pdu".to_string()],
                3 => vec!["ipmi".to_string(), "storage".to_string()],
                _ => vec!["ipmi".to_string()],
            };
            HostSpec {
                id: HostId(i),
                name: format!("h{i}"),
                fence_agents,
                watchdog: true,
                fault_domain: Some(format!("rack{}", i % 2)),
                memory_mib: 64 * 1024,
                vcpus: 32,
                max_concurrent_starts: 8,
            }
        })
        .collect();
    let groups = ["db", "web", "dns", "cache"];
    let mut domains = BTreeMap::new();
    // A group larger than the hosts left after two failures could not be
    // placed: keep groups small enough that L1 is always achievable.
    let group_max = u32::from(host_count.saturating_sub(2).max(1));
    let mut group_sizes: BTreeMap<&str, u32> = BTreeMap::new();
    for i in 1..=domain_count {
        let id = DomainId(u128::from(i));
        let priority = rng.pick(&[
            Priority::Lowest,
            Priority::Low,
            Priority::Medium,
            Priority::Medium,
            Priority::High,
            Priority::Highest,
        ]);
        let isolation_response = match rng.range(0, 5) {
            0 => IsolationResponse::Shutdown,
            1 => IsolationResponse::Poweroff,
            _ => IsolationResponse::Keep,
        };
        let group = rng.pick(&groups);
        let anti_affinity = if rng.chance(20) && group_sizes.get(group).copied().unwrap_or(0) < group_max {
            *group_sizes.entry(group).or_default() += 1;
            Some(group.to_string())
        } else {
            None
        };
        let readiness = if rng.chance(20) { Readiness::GuestAgent } else { Readiness::Started };
        // Some domains prefer a host (the first of two): failback migrates
        // them home whenever that host takes restarts again. Never with an
        // anti-affinity group: the two together can be unsatisfiable.
        let ids: Vec<HostId> = hosts.iter().map(|h| h.id).collect();
        let affinity = if rng.chance(10) && ids.len() >= 2 && anti_affinity.is_none() {
            // Two hosts: one host alone may be full of restarts at healing
            // time (nothing rebalances), which no engine could fix.
            let first = rng.pick(&ids);
            let others: Vec<HostId> = ids.iter().copied().filter(|h| *h != first).collect();
            vec![first, rng.pick(&others)]
        } else {
            Vec::new()
        };
        let policy = DomainPolicy {
            priority,
            isolation_response,
            affinity,
            anti_affinity,
            readiness,
            readiness_timeout: Duration::from_secs(60),
            max_restarts: 3,
            ..DomainPolicy::default()
        };
        let memory_mib = 1024 * rng.range(1, 4);
        let vcpus = u32::try_from(rng.range(1, 4)).unwrap_or(1);
        domains.insert(id, DomainSpec { id, name: format!("vm{i:03}"), memory_mib, vcpus, policy });
    }
    let spec = ClusterSpec {
        name: format!("seed{seed}"),
        timings: o.profile.timings(),
        hosts,
        domains,
        memory_overcommit: 1.0,
        vcpu_overcommit: 4.0,
        admission: AdmissionPolicy::default(),
    };
    let mut spec = spec;
    random_guest_policies(seed, &mut spec);
    let initial = initial_placement(&spec);
    let datastore = datastore_of(seed, o.datastore);
    SimSetup { spec, initial, unprotected: Default::default(), seed, datastore }
}

/// Domains with guest-agent monitoring (percent).
pub const MONITORED_DOMAINS_PERCENT: u64 = 25;
/// Domains restarted after a shutdown on purpose (percent; the others stay stopped).
pub const RESTART_ON_SHUTDOWN_PERCENT: u64 = 15;

/// Guest policies, from a stream of their own (the rest of a seed's
/// cluster stays as it was): some domains are monitored (short settings,
/// so that resets and their limit happen within a run), some are
/// restarted after a shutdown on purpose.
fn random_guest_policies(seed: u64, spec: &mut ClusterSpec) {
    let mut rng = Rng::new(seed ^ 0x6E57_A6E7_u64);
    for d in spec.domains.values_mut() {
        if rng.chance(MONITORED_DOMAINS_PERCENT) {
            d.policy.monitor = GuestMonitor {
                enabled: true,
                failure_interval: Duration::from_secs(rng.range(10, 40)),
                min_uptime: Duration::from_secs(rng.range(10, 120)),
                max_resets: u32::try_from(rng.range(1, 4)).unwrap_or(3),
                reset_window: Duration::from_secs(600),
            };
        }
        if rng.chance(RESTART_ON_SHUTDOWN_PERCENT) {
            d.policy.on_shutdown = OnShutdown::Restart;
        }
    }
}

/// Place every domain with the planner on empty hosts (no start cap).
fn initial_placement(spec: &ClusterSpec) -> BTreeMap<DomainId, HostId> {
    let rooms: Vec<HostRoom> =
        spec.hosts.iter().map(|h| HostRoom { starts_free: u32::MAX, ..planner::empty_room(h, spec) }).collect();
    let requests: Vec<PlanRequest> =
        spec.domains.values().map(|d| PlanRequest { domain: d, avoid: Vec::new() }).collect();
    planner::plan(&rooms, &requests).placements.into_iter().collect()
}

/// Hardware timings vary per seed, inside what the design assumes.
pub fn random_params(seed: u64) -> WorldParams {
    let mut rng = Rng::new(seed ^ 0xBA5Eu64);
    let slow_storage = rng.range(1, 20);
    WorldParams {
        net_latency_ms: (1, rng.range(2, 10)),
        storage_latency_ms: (1, slow_storage),
        storage_host_skew_ms: rng.range(0, 30),
        start_ms: (300, rng.range(400, 900)),
        fence_ms: (200, rng.range(300, 900)),
        repair_after_ms: Some((60_000, 150_000)),
        // The daemon polls the registry every 2 s.
        registry_lag_ms: 2_500,
        ..WorldParams::default()
    }
}

/// A fault schedule: episodes one after another, sometimes overlapping,
/// never taking more than two hosts out at once, then healing.
pub fn random_faults(seed: u64, o: &RandomOptions, setup: &SimSetup) -> Vec<(u64, Command)> {
    let mut rng = Rng::new(seed ^ 0xFA17u64);
    let mut out: Vec<(u64, Command)> = Vec::new();
    let hosts: Vec<HostId> = setup.spec.hosts.iter().map(|h| h.id).collect();
    let last_fault = o.duration_ms.saturating_sub(HEAL_MS);
    let mut t = rng.range(20_000, 60_000);
    while t < last_fault {
        let h = rng.pick(&hosts);
        let len = rng.range(5_000, 60_000).min(last_fault - t);
        let end = t + len;
        match rng.range(0, 14) {
            0 | 1 => {
                out.push((t, Command::PowerOff(h)));
                out.push((t + rng.range(60_000, 150_000), Command::PowerOn(h)));
            }
            2 => {
                let fault = rng.pick(&[StorageFault::Fail, StorageFault::Hang, StorageFault::ReadOnly]);
                if rng.chance(25) {
                    // The S4 kill path: libvirtd hangs too, sometimes qemu with it.
                    let qemu_stuck = rng.chance(40);
                    out.push((t, Command::Hypervisor { host: h, hung: true, qemu_stuck }));
                    out.push((end, Command::Hypervisor { host: h, hung: false, qemu_stuck: false }));
                }
                out.push((t, Command::StorageFault { host: h, fault }));
                out.push((end, Command::StorageRestore(h)));
            }
            3 => {
                let ms = rng.range(500, setup.spec.timings.renew_timeout.as_millis() * 3 / 4);
                out.push((t, Command::StorageStall { millis: ms }));
            }
            4 => {
                let cut = 1 + rng.index(hosts.len() - 1);
                let (a, b) = hosts.split_at(cut);
                out.push((t, Command::Partition(vec![a.to_vec(), b.to_vec()])));
                out.push((end, Command::HealNetwork));
            }
            5 => {
                let to = rng.pick(&hosts);
                if to != h {
                    out.push((t, Command::DropOneWay { from: h, to }));
                    out.push((end, Command::HealNetwork));
                }
            }
            6 => {
                out.push((t, Command::Isolate(h)));
                out.push((end, Command::Unisolate(h)));
            }
            7 => {
                out.push((t, Command::NetLoss(u8::try_from(rng.range(5, 30)).unwrap_or(30))));
                out.push((end, Command::HealNetwork));
            }
            8 => {
                out.push((t, Command::Pause(h)));
                out.push((end, Command::Resume(h)));
            }
            9 if rng.chance(40) => {
                // A stop on purpose (restart, upgrade, `systemctl stop`):
                // back inside its grace, past it, or never; with a watchdog
                // device, or with systemd's, which the stop ends.
                out.push((t, Command::DaemonStop { host: h, host_reset: rng.chance(50) }));
                if rng.chance(80) {
                    out.push((t + rng.range(200, 14_000), Command::DaemonStart(h)));
                }
            }
            9 => {
                out.push((t, Command::DaemonCrash(h)));
                if rng.chance(80) {
                    out.push((t + rng.range(200, 1500), Command::DaemonStart(h)));
                }
            }
            10 => {
                for agent in setup.spec.host(h).map(|s| s.fence_agents.clone()).unwrap_or_default() {
                    let mode = if rng.chance(30) { AgentMode::Hangs } else { AgentMode::Fails };
                    out.push((t, Command::FenceAgent { target: h, agent: agent.clone(), mode }));
                    out.push((end, Command::FenceAgent { target: h, agent, mode: AgentMode::Works }));
                }
                out.push((t + 1000, Command::PowerOff(h)));
                out.push((t + rng.range(60_000, 150_000), Command::PowerOn(h)));
            }
            11 => {
                let d = DomainId(u128::from(rng.range(1, setup.spec.domains.len() as u64)));
                out.push((t, Command::DomainCrash(d)));
            }
            12 => {
                // Maintenance: the host drains by live migration, then rejoins.
                out.push((t, Command::Maintenance { host: h, enter: true }));
                out.push((end, Command::Maintenance { host: h, enter: false }));
            }
            _ => {
                for x in &hosts {
                    out.push((t, Command::StorageFault { host: *x, fault: StorageFault::Hang }));
                }
                let mut restored = Vec::new();
                for x in &hosts {
                    let at = t + rng.range(5_000, 30_000);
                    restored.push(at);
                    out.push((at, Command::StorageRestore(*x)));
                }
                one_way_during(seed, t, &hosts, &restored, &mut out);
            }
        }
        // Mostly one episode at a time; sometimes the next starts early.
        t = if rng.chance(25) { t + rng.range(2_000, 10_000) } else { end.max(t) + rng.range(20_000, 90_000) };
    }
    heal(&mut out, last_fault, &hosts, setup);
    out.extend(random_registry_changes(seed, setup, last_fault));
    out.extend(random_guest_events(seed, setup, last_fault));
    out.sort_by_key(|(at, _)| *at);
    out
}

/// Runs with registry changes (percent).
pub const REGISTRY_CHANGE_RUNS_PERCENT: u64 = 30;
/// Domains unprotected in such a run, at most.
pub const UNPROTECTED_PER_RUN_MAX: u64 = 3;

/// Operators unprotecting and protecting domains at a low rate, from a
/// stream of its own (the fault schedule of a seed stays as it was): in
/// some runs a few domains are unprotected at a random time (they keep
/// running, unmanaged, and live through the faults that follow), and most
/// are protected again later, wherever they run then (or, running nowhere,
/// started by the master). A domain left unprotected is not expected to run
/// at the end (L1), but must never be started by havirt.
fn random_registry_changes(seed: u64, setup: &SimSetup, last_fault: u64) -> Vec<(u64, Command)> {
    let mut rng = Rng::new(seed ^ 0x9207_EC7E_u64);
    let mut out = Vec::new();
    let n = setup.spec.domains.len() as u64;
    if n == 0 || last_fault <= 30_000 || !rng.chance(REGISTRY_CHANGE_RUNS_PERCENT) {
        return out;
    }
    for _ in 0..rng.range(1, UNPROTECTED_PER_RUN_MAX) {
        let d = DomainId(u128::from(rng.range(1, n)));
        let off = rng.range(20_000, last_fault);
        out.push((off, Command::Unprotect(d)));
        if rng.chance(75) {
            let on = (off + rng.range(1_000, 150_000)).min(last_fault);
            out.push((on, Command::Protect { domain: d, host: None }));
        }
    }
    out
}

/// Runs with guest events (percent), and how many at most per run.
pub const GUEST_EVENT_RUNS_PERCENT: u64 = 50;
pub const GUEST_EVENTS_PER_RUN_MAX: u64 = 4;

/// Guests failing and operators stopping and starting domains, from a
/// stream of their own: hangs (sometimes at every boot, sometimes cured
/// later), shutdowns from inside the guest or `virsh destroy`, and most of
/// those started again later by `havirt start` on a random host (a domain
/// left stopped must not run at the end; one started must, L1).
fn random_guest_events(seed: u64, setup: &SimSetup, last_fault: u64) -> Vec<(u64, Command)> {
    let mut rng = Rng::new(seed ^ 0x9E57_0E7E_u64);
    let mut out = Vec::new();
    let n = setup.spec.domains.len() as u64;
    let hosts: Vec<HostId> = setup.spec.hosts.iter().map(|h| h.id).collect();
    if n == 0 || last_fault <= 30_000 || !rng.chance(GUEST_EVENT_RUNS_PERCENT) {
        return out;
    }
    // Hangs mostly hit monitored guests (an unmonitored one just stays hung).
    let monitored: Vec<DomainId> =
        setup.spec.domains.values().filter(|d| d.policy.monitor.enabled).map(|d| d.id).collect();
    for _ in 0..rng.range(1, GUEST_EVENTS_PER_RUN_MAX) {
        let mut domain = DomainId(u128::from(rng.range(1, n)));
        let at = rng.range(20_000, last_fault);
        if rng.chance(50) {
            if !monitored.is_empty() && rng.chance(80) {
                domain = rng.pick(&monitored);
            }
            let always = rng.chance(30);
            out.push((at, Command::GuestHang { domain, always }));
            if always && rng.chance(50) {
                out.push(((at + rng.range(30_000, 300_000)).min(last_fault), Command::GuestRecover(domain)));
            }
            continue;
        }
        out.push((at, Command::GuestStop { domain, destroy: rng.chance(50) }));
        if rng.chance(75) {
            let host = rng.pick(&hosts);
            out.push((
                (at + rng.range(1_000, 150_000)).min(last_fault + 60_000),
                Command::OperatorStart { domain, host },
            ));
        }
    }
    out
}

/// Clear every fault at `at`; powered-off hosts boot again.
fn heal(out: &mut Vec<(u64, Command)>, at: u64, hosts: &[HostId], setup: &SimSetup) {
    out.retain(|(t, _)| *t <= at);
    out.push((at, Command::HealNetwork));
    for h in hosts {
        out.push((at, Command::Unisolate(*h)));
        out.push((at, Command::Hypervisor { host: *h, hung: false, qemu_stuck: false }));
        out.push((at, Command::StorageRestore(*h)));
        out.push((at, Command::Resume(*h)));
        out.push((at, Command::PowerOn(*h)));
        out.push((at + 10_000, Command::DaemonStart(*h)));
        // An "exit" sent while the host was off never arrived: the
        // operator ends every maintenance once the daemons run again, and
        // tries again while a host is still down (fenced during the heal).
        out.push((at + 15_000, Command::EndMaintenance(*h)));
        for agent in setup.spec.host(*h).map(|s| s.fence_agents.clone()).unwrap_or_default() {
            out.push((at, Command::FenceAgent { target: *h, agent, mode: AgentMode::Works }));
        }
    }
}

/// Percent of all-storage outages with a one-way network drop during them:
/// the rules a host decides from what it hears (the all-lost exemption,
/// isolation, master election) meet asymmetric evidence (issue 11).
pub const ONE_WAY_DURING_STORAGE_LOSS_PERCENT: u64 = 50;

/// Maybe a one-way drop between two hosts, starting around the outage at
/// `t` and healed after the last storage restore. A stream of its own, so
/// the rest of the schedule stays as it was.
fn one_way_during(seed: u64, t: u64, hosts: &[HostId], restored: &[u64], out: &mut Vec<(u64, Command)>) {
    let mut rng = Rng::new(seed ^ t ^ 0x0E_4A_u64);
    if hosts.len() < 2 || !rng.chance(ONE_WAY_DURING_STORAGE_LOSS_PERCENT) {
        return;
    }
    let from = rng.pick(hosts);
    let others: Vec<HostId> = hosts.iter().copied().filter(|h| *h != from).collect();
    let to = rng.pick(&others);
    // Before the outage, at its start, or in its middle.
    let start = (t + rng.range(0, 10_000)).saturating_sub(5_000);
    let end = restored.iter().copied().max().unwrap_or(t) + rng.range(0, 20_000);
    out.push((start, Command::DropOneWay { from, to }));
    out.push((end, Command::HealNetwork));
}

pub fn run_seed(seed: u64, o: &RandomOptions, log_cap: Option<usize>) -> RunOutcome {
    let setup = random_setup(seed, o);
    let faults = random_faults(seed, o, &setup);
    let mut params = random_params(seed);
    params.boot_ms = 5000;
    run_commands(&setup, params, &faults, o.duration_ms, log_cap)
}
