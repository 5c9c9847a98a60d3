//! Deterministic cluster simulator: one seed, one exact run (DESIGN.md §7).
//!
//! A run is a `World` (virtual clock, hosts running the real engine, network,
//! storage, hypervisors, watchdogs, fence agents) plus a list of timed
//! commands: from a golden scenario file, or drawn from the seed.

pub mod checker;
pub mod commands;
pub mod faults;
pub mod random;
pub mod report;
pub mod scenario;
pub mod world;

use crate::engine::config::{ClusterSpec, DomainId, HostId};
use checker::Violation;
use faults::Command;
use std::collections::BTreeMap;
use world::{Ev, World, WorldParams};

/// The starting point of a simulated run.
#[derive(Clone, Debug)]
pub struct SimSetup {
    pub spec: ClusterSpec,
    /// Where each protected domain runs (and holds its lease) at time zero.
    pub initial: BTreeMap<DomainId, HostId>,
    pub seed: u64,
}

/// What a golden scenario produced.
pub struct ScenarioOutcome {
    pub log: String,
    pub violations: Vec<String>,
}

/// The outcome of one simulated run.
pub struct RunOutcome {
    pub seed: u64,
    pub violations: Vec<Violation>,
    pub recoveries: BTreeMap<&'static str, Vec<u64>>,
    pub clean_recoveries: BTreeMap<&'static str, Vec<u64>>,
    pub false_failovers: u64,
    pub sim_ms: u64,
    pub events: u64,
    pub log: Vec<String>,
}

/// Run a world through timed commands, then check convergence (L1).
pub fn run_commands(setup: &SimSetup, params: WorldParams, commands: &[(u64, Command)], end_ms: u64, log_cap: Option<usize>) -> RunOutcome {
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
        sim_ms: end_ms,
        events: w.events_processed,
        log: std::mem::take(&mut w.log),
    }
}

/// Run a golden scenario and return its log and any invariant violations.
pub fn run_scenario(s: &scenario::Scenario) -> ScenarioOutcome {
    let out = run_commands(&s.setup, WorldParams::default(), &s.commands, s.end_ms, None);
    let violations = out.violations.iter().map(|v| format!("{} at {} ms: {}", v.invariant, v.at_ms, v.detail)).collect();
    let mut log = out.log.join("\n");
    log.push('\n');
    ScenarioOutcome { log, violations }
}
