//! Deterministic cluster simulator: one seed, one exact run (DESIGN.md §7).
//!
//! A run is a `World` (virtual clock, hosts running the real engine, network,
//! storage, hypervisors, watchdogs, fence agents) plus a list of timed
//! commands: from a golden scenario file, or drawn from the seed.

pub mod block;
pub mod checker;
pub mod commands;
pub mod faults;
pub mod guest;
pub mod random;
pub mod report;
pub mod scenario;
pub mod world;

use crate::engine::config::{ClusterSpec, DomainId, HostId};
use checker::Violation;
use faults::Command;
use std::collections::{BTreeMap, BTreeSet};
use world::{Ev, World, WorldParams};

/// The starting point of a simulated run.
#[derive(Clone, Debug)]
pub struct SimSetup {
    /// Hosts, timings and every domain the cluster knows (protected or not).
    pub spec: ClusterSpec,
    /// Where each domain runs at time zero; a protected one holds its lease.
    pub initial: BTreeMap<DomainId, HostId>,
    /// Domains of `spec` that run unprotected at time zero (no lease): a
    /// `protect` command protects them later.
    pub unprotected: BTreeSet<DomainId>,
    pub seed: u64,
    /// The datastore's backend (`kind` in cluster.toml).
    pub datastore: block::DatastoreKind,
}

/// What a golden scenario produced.
pub struct ScenarioOutcome {
    pub log: String,
    pub violations: Vec<String>,
    /// The invariant each violation broke, in the same order.
    pub invariants: Vec<&'static str>,
}

/// The outcome of one simulated run.
pub struct RunOutcome {
    pub seed: u64,
    pub violations: Vec<Violation>,
    pub recoveries: BTreeMap<&'static str, Vec<u64>>,
    pub clean_recoveries: BTreeMap<&'static str, Vec<u64>>,
    pub false_failovers: u64,
    /// Domains down at the end for want of room (`Checker::capacity_waits`).
    pub capacity_waits: u64,
    pub sim_ms: u64,
    pub events: u64,
    /// The cluster's shape: hosts and protected domains.
    pub hosts: usize,
    pub domains: usize,
    pub log: Vec<String>,
}

/// Run a world through timed commands, then check convergence (L1).
pub fn run_commands(
    setup: &SimSetup,
    params: WorldParams,
    commands: &[(u64, Command)],
    end_ms: u64,
    log_cap: Option<usize>,
) -> RunOutcome {
    let mut w = World::new(setup, params);
    w.log_cap = log_cap;
    for (at, c) in commands {
        w.schedule_at(*at, Ev::Command(c.clone()));
    }
    w.run_until(end_ms);
    w.check_converged();
    RunOutcome {
        seed: setup.seed,
        violations: std::mem::take(&mut w.checker.violations),
        recoveries: std::mem::take(&mut w.checker.recoveries),
        clean_recoveries: std::mem::take(&mut w.checker.clean_recoveries),
        false_failovers: w.checker.false_failovers,
        capacity_waits: w.checker.capacity_waits,
        sim_ms: end_ms,
        events: w.events_processed,
        hosts: setup.spec.hosts.len(),
        domains: setup.spec.domains.len(),
        log: std::mem::take(&mut w.log),
    }
}

/// Run a golden scenario and return its log and any invariant violations.
pub fn run_scenario(s: &scenario::Scenario) -> ScenarioOutcome {
    let out = run_commands(&s.setup, WorldParams::default(), &s.commands, s.end_ms, None);
    let violations =
        out.violations.iter().map(|v| format!("{} at {} ms: {}", v.invariant, v.at_ms, v.detail)).collect();
    let invariants = out.violations.iter().map(|v| v.invariant).collect();
    let mut log = out.log.join("\n");
    log.push('\n');
    ScenarioOutcome { log, violations, invariants }
}

#[cfg(test)]
mod tests {
    use super::random::{Datastores, RandomOptions, Shape, run_seed};
    use super::world::WorldParams;
    use super::*;
    use crate::engine::config::Profile;

    fn partition_scenario() -> scenario::Scenario {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/scenarios/partition-2-1");
        scenario::load(&dir).expect("partition-2-1 loads")
    }

    /// Proof that the checker bites: an engine that skips the S3 wait takes
    /// over the leases of a host that is only partitioned, and the checker,
    /// judging from ground truth, reports two instances (S1) and the unsafe
    /// takeover (S3). Disk locks are off so that qemu's own locking does not
    /// hide the engine's mistake.
    #[test]
    fn checker_reports_s1_when_the_engine_skips_the_s3_wait() {
        let s = partition_scenario();
        let params = WorldParams { disk_locks: false, broken_engine_skip_s3: true, ..WorldParams::default() };
        let out = run_commands(&s.setup, params, &s.commands, s.end_ms, None);
        let kinds: Vec<&str> = out.violations.iter().map(|v| v.invariant).collect();
        assert!(kinds.contains(&"S1"), "expected an S1 violation, got {kinds:?}");
        assert!(kinds.contains(&"S3"), "expected an S3 violation, got {kinds:?}");
        let s1 = out.violations.iter().find(|v| v.invariant == "S1").expect("S1");
        assert!(!s1.timeline.is_empty(), "a violation carries its timeline");
    }

    /// A stop notice without a reset (systemd's watchdog) must keep S3(b)
    /// away: an engine that ignores it starts web2 and app2 a second time,
    /// and the checker says so; the real engine runs the scenario clean.
    #[test]
    fn checker_reports_s1_when_the_engine_ignores_an_unguarded_stop() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/scenarios/daemon-stop-systemd-watchdog");
        let s = scenario::load(&dir).expect("daemon-stop-systemd-watchdog loads");
        let broken =
            WorldParams { disk_locks: false, broken_engine_ignore_stop_notice: true, ..WorldParams::default() };
        let out = run_commands(&s.setup, broken, &s.commands, s.end_ms, None);
        let kinds: Vec<&str> = out.violations.iter().map(|v| v.invariant).collect();
        assert!(kinds.contains(&"S1"), "expected an S1 violation, got {kinds:?}");
        let real = WorldParams { disk_locks: false, ..WorldParams::default() };
        let out = run_commands(&s.setup, real, &s.commands, s.end_ms, None);
        assert!(out.violations.is_empty(), "{:?}", out.violations);
    }

    /// The same run with the real engine is clean: the test above fails
    /// because of the defect, not because of the scenario.
    #[test]
    fn the_real_engine_passes_the_same_partition() {
        let s = partition_scenario();
        let params = WorldParams { disk_locks: false, ..WorldParams::default() };
        let out = run_commands(&s.setup, params, &s.commands, s.end_ms, None);
        assert!(out.violations.is_empty(), "{:?}", out.violations);
    }

    /// With disk locks off the engine alone must still keep S1 through a
    /// power loss (the lock is a second line, not the first).
    #[test]
    fn power_loss_is_safe_without_disk_locks() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/scenarios/power-fenced");
        let s = scenario::load(&dir).expect("loads");
        let params = WorldParams { disk_locks: false, ..WorldParams::default() };
        let out = run_commands(&s.setup, params, &s.commands, s.end_ms, None);
        assert!(out.violations.is_empty(), "{:?}", out.violations);
    }

    /// Proof that the checker bites on unprotect: an engine that keeps
    /// managing an unprotected domain restarts it when its host dies, and
    /// the checker reports the start. The real engine leaves it down.
    #[test]
    fn checker_reports_a_start_after_unprotect() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/scenarios/unprotect-power-off");
        let s = scenario::load(&dir).expect("unprotect-power-off loads");
        let params = WorldParams { broken_engine_ignore_unprotect: true, ..WorldParams::default() };
        let out = run_commands(&s.setup, params, &s.commands, s.end_ms, None);
        let kinds: Vec<&str> = out.violations.iter().map(|v| v.invariant).collect();
        assert!(kinds.contains(&"UNMANAGED"), "expected an UNMANAGED violation, got {kinds:?}");
        let real = run_commands(&s.setup, WorldParams::default(), &s.commands, s.end_ms, None);
        assert!(real.violations.is_empty(), "{:?}", real.violations);
    }

    /// Proof that the checker bites on intentional stops: an engine that
    /// restarts a guest that shut itself down is reported (STOPPED); the
    /// real engine leaves it stopped until the operator's start.
    #[test]
    fn checker_reports_a_restart_of_a_domain_stopped_on_purpose() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/scenarios/guest-shutdown-stays-stopped");
        let s = scenario::load(&dir).expect("guest-shutdown-stays-stopped loads");
        let params = WorldParams { broken_engine_restart_stopped: true, ..WorldParams::default() };
        let out = run_commands(&s.setup, params, &s.commands, s.end_ms, None);
        let kinds: Vec<&str> = out.violations.iter().map(|v| v.invariant).collect();
        assert!(kinds.contains(&"STOPPED"), "expected a STOPPED violation, got {kinds:?}");
        let real = run_commands(&s.setup, WorldParams::default(), &s.commands, s.end_ms, None);
        assert!(real.violations.is_empty(), "{:?}", real.violations);
    }

    /// The random runs do exercise guest monitoring and intentional stops
    /// (a suite that never resets or stops a guest proves nothing of them).
    #[test]
    fn random_runs_hang_reset_stop_and_start_guests() {
        let o = RandomOptions {
            shape: Shape::Fixed { hosts: 5, domains: 40 },
            duration_ms: 20 * 60_000,
            profile: Profile::Default,
            datastore: Datastores::Only(block::DatastoreKind::Dir),
        };
        let mut counts = [0usize; 4];
        let marks = ["resetting the guest", "reached the limit", "lease freed", "(operator; lease"];
        for seed in 1..=80 {
            let out = run_seed(seed, &o, None);
            assert!(out.violations.is_empty(), "seed {seed}: {:?}", out.violations);
            for (count, mark) in counts.iter_mut().zip(marks) {
                *count += out.log.iter().filter(|l| l.contains(mark)).count();
            }
        }
        for (count, mark) in counts.iter().zip(marks) {
            assert!(*count > 0, "no {mark:?} in 80 random runs");
        }
    }

    /// One seed, one exact run: the whole timeline is identical twice.
    #[test]
    fn a_seed_replays_exactly() {
        let o = RandomOptions {
            shape: Shape::Fixed { hosts: 5, domains: 40 },
            duration_ms: 300_000,
            profile: Profile::Default,
            datastore: Datastores::Only(block::DatastoreKind::Dir),
        };
        for seed in [3, 77] {
            let a = run_seed(seed, &o, None);
            let b = run_seed(seed, &o, None);
            assert!(a.log.len() > 50, "a run logs its timeline");
            assert_eq!(a.log, b.log, "seed {seed} diverged");
        }
    }

    fn run_golden(name: &str) -> RunOutcome {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/scenarios").join(name);
        let s = scenario::load(&dir).expect("scenario loads");
        run_commands(&s.setup, WorldParams::default(), &s.commands, s.end_ms, None)
    }

    /// Each of S3's three ways for a lease to leave a host is taken by the
    /// golden scenario meant for it (a scenario that stopped reaching its
    /// branch would still pass on its log alone if the log moved with it).
    #[test]
    fn each_s3_branch_is_taken_by_its_scenario() {
        {
            cov_mark::check!(s3a_off);
            assert!(run_golden("power-fenced").violations.is_empty());
        }
        {
            cov_mark::check!(s3b_dead_by_timeout);
            assert!(run_golden("power-watchdog-only").violations.is_empty());
        }
        {
            cov_mark::check!(s3c_released);
            assert!(run_golden("storage-lost-one").violations.is_empty());
        }
    }

    /// A frozen host whose qemu still holds its disks: without disk locks
    /// the resumed zombie would collide; with them the checker stays quiet.
    #[test]
    fn disk_locks_cover_the_paused_host() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/scenarios/host-paused-no-fence");
        let s = scenario::load(&dir).expect("loads");
        let locked = run_commands(&s.setup, WorldParams::default(), &s.commands, s.end_ms, None);
        assert!(locked.violations.is_empty(), "{:?}", locked.violations);
        let unlocked = run_commands(
            &s.setup,
            WorldParams { disk_locks: false, ..WorldParams::default() },
            &s.commands,
            s.end_ms,
            None,
        );
        assert!(
            unlocked.violations.iter().any(|v| v.invariant == "S1"),
            "a VM-style pause without disk locks collides"
        );
    }
}
