//! Many seeds at once: run them on every core and sum up what the issue asks
//! for (violations, recovery percentiles per fault class, false failovers).

use super::RunOutcome;
use super::random::{RANDOM_LOG_CAP, RandomOptions, run_seed};
use serde::Serialize;
use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

/// Recovery classes always present in the summary, even when empty.
pub const REQUIRED_CLASSES: [&str; 4] =
    ["fenced_power_loss", "watchdog_power_loss", "storage_loss", "isolation_response"];

#[derive(Serialize, Clone, Copy, Default, Debug)]
pub struct Percentiles {
    pub samples: usize,
    pub p50: f64,
    pub p99: f64,
    pub max: f64,
}

impl Percentiles {
    pub fn of(samples_ms: &[u64]) -> Percentiles {
        if samples_ms.is_empty() {
            return Percentiles::default();
        }
        let mut v = samples_ms.to_vec();
        v.sort_unstable();
        // Index of a quantile; the value is within 0..len by construction.
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss, clippy::cast_precision_loss)]
        let at = |q: f64| {
            let i = ((v.len() as f64 - 1.0) * q).round() as usize;
            v[i.min(v.len() - 1)] as f64 / 1000.0
        };
        Percentiles { samples: v.len(), p50: at(0.5), p99: at(0.99), max: at(1.0) }
    }
}

#[derive(Serialize, Debug)]
pub struct SeedViolation {
    pub seed: u64,
    pub invariant: &'static str,
    pub at_ms: u64,
    pub detail: String,
}

#[derive(Serialize, Debug)]
pub struct Summary {
    pub runs: u64,
    pub violations: Vec<SeedViolation>,
    /// From the fault to the domain running again, over clean episodes (one
    /// fault on a healthy cluster, nothing else until recovery).
    pub recovery_seconds: Percentiles,
    pub recovery_by_class: BTreeMap<String, Percentiles>,
    /// The same over every episode, overlapping faults included.
    pub recovery_seconds_all_episodes: Percentiles,
    pub recovery_by_class_all_episodes: BTreeMap<String, Percentiles>,
    pub false_failovers: u64,
    /// Domains that ran nowhere at the end of a run because no host their
    /// affinity allows had room: L1 holds only with capacity.
    pub capacity_waits: u64,
    pub sim_seconds_per_wall_second: f64,
    pub events: u64,
    /// Runs, violations and false failovers per cluster shape, keyed
    /// `<hosts>x<domains>` and ordered by hosts, then domains.
    pub by_shape: BTreeMap<String, ShapeCounts>,
    /// The same per host count (`<hosts>h`), whatever the domain count.
    pub by_hosts: BTreeMap<String, ShapeCounts>,
}

#[derive(Serialize, Clone, Copy, Default, Debug, PartialEq, Eq)]
pub struct ShapeCounts {
    pub runs: u64,
    pub violations: u64,
    pub false_failovers: u64,
}

impl ShapeCounts {
    fn add(&mut self, r: &RunOutcome) {
        self.runs += 1;
        self.violations += r.violations.len() as u64;
        self.false_failovers += r.false_failovers;
    }
}

/// Run seeds `from..=to` on `workers` threads. `on_violation` sees each
/// failing run (with its timeline) as soon as it ends.
pub fn run_seeds(
    from: u64,
    to: u64,
    o: &RandomOptions,
    workers: usize,
    on_violation: &(dyn Fn(&RunOutcome) + Sync),
) -> (Summary, Vec<RunOutcome>) {
    let next = AtomicU64::new(from);
    let results: Mutex<Vec<RunOutcome>> = Mutex::new(Vec::new());
    // Wall time only measures the simulator's speed for the report.
    #[allow(clippy::disallowed_methods)]
    let wall = std::time::Instant::now();
    std::thread::scope(|s| {
        for _ in 0..workers.max(1) {
            s.spawn(|| {
                loop {
                    let seed = next.fetch_add(1, Ordering::Relaxed);
                    if seed > to {
                        break;
                    }
                    let run = || run_seed(seed, o, Some(RANDOM_LOG_CAP));
                    let mut out = std::panic::catch_unwind(std::panic::AssertUnwindSafe(run))
                        .unwrap_or_else(|panic| crashed(seed, o, panic.as_ref()));
                    if !out.violations.is_empty() {
                        on_violation(&out);
                    }
                    out.log.clear();
                    if let Ok(mut r) = results.lock() {
                        r.push(out);
                    }
                }
            });
        }
    });
    let wall_s = wall.elapsed().as_secs_f64().max(1e-9);
    let mut runs = results.into_inner().unwrap_or_default();
    runs.sort_by_key(|r| r.seed);
    (summarize(&runs, wall_s), runs)
}

/// The invariant name of a run that panicked (the engine's or the
/// simulator's own assertion): the other seeds still run.
pub const CRASH: &str = "CRASH";

/// The message a panic carried (`panic!` gives a `&str` or a `String`).
pub fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".into())
}

/// A seed whose run panicked, as a run with one `CRASH` violation.
fn crashed(seed: u64, o: &RandomOptions, panic: &(dyn std::any::Any + Send)) -> RunOutcome {
    let text = panic_message(panic);
    let setup = super::random::random_setup(seed, o);
    RunOutcome {
        seed,
        violations: vec![super::checker::Violation { invariant: CRASH, at_ms: 0, detail: text, timeline: Vec::new() }],
        recoveries: BTreeMap::new(),
        clean_recoveries: BTreeMap::new(),
        false_failovers: 0,
        capacity_waits: 0,
        sim_ms: 0,
        events: 0,
        hosts: setup.spec.hosts.len(),
        domains: setup.spec.domains.len(),
        log: Vec::new(),
    }
}

/// What runs found, worst last: `havirt simulate` exits with its code, so a
/// script tells a broken safety invariant from a slow recovery or a crash.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Verdict {
    Clean,
    /// L1, L2 or a livelock broken, or a false failover: nothing unsafe.
    Liveness,
    /// A safety invariant (S1-S5), or havirt touched what it must not: an
    /// unprotected domain, one stopped on purpose, a guest that answers.
    Safety,
    /// A run panicked.
    Crash,
}

impl Verdict {
    pub fn of<'a>(invariants: impl IntoIterator<Item = &'a str>, false_failovers: u64) -> Verdict {
        let start = if false_failovers > 0 { Verdict::Liveness } else { Verdict::Clean };
        invariants.into_iter().map(Verdict::of_invariant).fold(start, Verdict::max)
    }

    fn of_invariant(name: &str) -> Verdict {
        match name {
            CRASH => Verdict::Crash,
            "UNMANAGED" | "STOPPED" | "RESET" => Verdict::Safety,
            s if s.starts_with('S') => Verdict::Safety,
            _ => Verdict::Liveness,
        }
    }

    /// 0 clean, 3 safety, 4 liveness, 5 crash (2 stays the usage error).
    pub fn exit_code(self) -> u8 {
        match self {
            Verdict::Clean => 0,
            Verdict::Safety => 3,
            Verdict::Liveness => 4,
            Verdict::Crash => 5,
        }
    }
}

pub fn summarize(runs: &[RunOutcome], wall_s: f64) -> Summary {
    let (clean, clean_by_class) = collect(runs.iter().map(|r| &r.clean_recoveries));
    let (all, by_class) = collect(runs.iter().map(|r| &r.recoveries));
    let mut violations = Vec::new();
    let (mut false_failovers, mut capacity_waits, mut sim_ms, mut events) = (0, 0, 0, 0);
    let (mut by_shape, mut by_hosts) = (BTreeMap::new(), BTreeMap::new());
    for r in runs {
        for v in &r.violations {
            violations.push(SeedViolation {
                seed: r.seed,
                invariant: v.invariant,
                at_ms: v.at_ms,
                detail: v.detail.clone(),
            });
        }
        false_failovers += r.false_failovers;
        capacity_waits += r.capacity_waits;
        sim_ms += r.sim_ms;
        events += r.events;
        // Zero-padded so that the keys sort by size.
        by_shape.entry(format!("{:02}x{:03}", r.hosts, r.domains)).or_insert_with(ShapeCounts::default).add(r);
        by_hosts.entry(format!("{:02}h", r.hosts)).or_insert_with(ShapeCounts::default).add(r);
    }
    Summary {
        runs: runs.len() as u64,
        violations,
        recovery_seconds: Percentiles::of(&clean),
        recovery_by_class: clean_by_class,
        recovery_seconds_all_episodes: Percentiles::of(&all),
        recovery_by_class_all_episodes: by_class,
        false_failovers,
        capacity_waits,
        sim_seconds_per_wall_second: (sim_ms as f64 / 1000.0) / wall_s,
        events,
        by_shape,
        by_hosts,
    }
}

/// All samples, and percentiles per class (the required classes always listed).
fn collect<'a>(
    maps: impl Iterator<Item = &'a BTreeMap<&'static str, Vec<u64>>>,
) -> (Vec<u64>, BTreeMap<String, Percentiles>) {
    let mut all = Vec::new();
    let mut by_class: BTreeMap<String, Vec<u64>> =
        REQUIRED_CLASSES.iter().map(|c| (c.to_string(), Vec::new())).collect();
    for m in maps {
        for (class, v) in m {
            all.extend_from_slice(v);
            by_class.entry(class.to_string()).or_default().extend_from_slice(v);
        }
    }
    let by_class = by_class.into_iter().map(|(k, v)| (k, Percentiles::of(&v))).collect();
    (all, by_class)
}

#[cfg(test)]
mod verdict_tests {
    use super::Verdict;

    #[test]
    fn the_worst_finding_decides_the_exit_code() {
        assert_eq!(Verdict::of([], 0).exit_code(), 0);
        assert_eq!(Verdict::of([], 2), Verdict::Liveness);
        assert_eq!(Verdict::of(["L1", "L2", "LIVELOCK"], 0), Verdict::Liveness);
        assert_eq!(Verdict::of(["L1", "S4"], 0), Verdict::Safety);
        assert_eq!(Verdict::of(["STOPPED"], 0), Verdict::Safety);
        assert_eq!(Verdict::of(["S1", super::CRASH, "L1"], 0), Verdict::Crash);
        let codes = [Verdict::Liveness, Verdict::Safety, Verdict::Crash].map(Verdict::exit_code);
        assert_eq!(codes, [4, 3, 5]);
    }
}
