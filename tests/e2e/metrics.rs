//! Observability on a live lab: every daemon's `/metrics`, fetched with curl
//! from inside its host's namespaces (the default metrics_address is that
//! host's loopback) and parsed; then a fenced power-off, after which the
//! master must count the failovers, their recovery times and the fence,
//! and show one failover timeline in `havirt events --failovers`. Also
//! `status --watch` and `events --follow` against a live daemon.

use crate::harness::{E2e, HOSTS, fenced_bound, poll_until};
use havirt::lab::cluster::{Fault, control_socket};
use havirt::metrics::{Exposition, parse};
use std::io::Read;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// The default metrics_address, inside each lab host.
const METRICS_URL: &str = "http://127.0.0.1:9405/metrics";
/// Families every daemon exposes from its start.
const FAMILIES: [&str; 16] = [
    "havirt_uptime_seconds",
    "havirt_is_master",
    "havirt_master",
    "havirt_host_verdict",
    "havirt_heartbeat_age_seconds",
    "havirt_storage_healthy",
    "havirt_leases_held",
    "havirt_local_domains",
    "havirt_protected_domains",
    "havirt_packets_accepted_total",
    "havirt_packets_rejected_total",
    "havirt_storage_records_rejected_total",
    "havirt_storage_errors_total",
    "havirt_storage_io_seconds",
    "havirt_failovers_total",
    "havirt_failover_recovery_seconds",
];
/// A live peer's heartbeats are at most this old (the default profile
/// sends every 0.5 s; a loaded 2-core machine delays some).
const FRESH_S: f64 = 5.0;
/// How long the master may take to see the survivors' reports after the
/// observer saw the domains run (one storage read, plus slack).
const REPORT_WAIT: Duration = Duration::from_secs(15);

fn scrape(t: &E2e, host: u16) -> Result<Exposition, String> {
    let h = t.lab().host(host).map_err(|e| e.to_string())?;
    let out = h.exec(&["curl", "-sS", "--max-time", "5", METRICS_URL]).map_err(|e| e.to_string())?;
    if !out.status.success() {
        return Err(format!("curl on h{host}: {}", String::from_utf8_lossy(&out.stderr).trim()));
    }
    parse(&String::from_utf8_lossy(&out.stdout))
}

/// Every sample is havirt's and belongs to a family with HELP and TYPE.
fn assert_well_formed(e: &Exposition, host: u16) {
    for family in FAMILIES {
        assert!(e.help.get(family).is_some_and(|h| !h.is_empty()), "h{host}: no HELP for {family}");
        assert!(e.types.contains_key(family), "h{host}: no TYPE for {family}");
    }
    for s in &e.samples {
        assert!(s.name.starts_with("havirt_"), "h{host}: {} is not havirt's", s.name);
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|suffix| {
                s.name.strip_suffix(suffix).filter(|f| e.types.get(*f).is_some_and(|t| t == "histogram"))
            })
            .unwrap_or(&s.name);
        assert!(e.types.contains_key(family), "h{host}: sample {} has no TYPE", s.name);
        assert!(s.value.is_finite() && s.value >= 0.0, "h{host}: {} = {}", s.name, s.value);
    }
}

/// The settled lab as host `n` sees it: 3 hosts alive with fresh
/// heartbeats, the master named, its own domains counted.
fn assert_settled_view(t: &E2e, e: &Exposition, n: u16, master: u16) {
    for h in 1..=HOSTS {
        let name = format!("h{h}");
        let verdict = if h == n { "self" } else { "alive" };
        let current = e.value("havirt_host_verdict", &[("host", &name), ("verdict", verdict)]);
        assert_eq!(current, Some(1.0), "h{n} sees {name} not {verdict}");
        assert_eq!(e.sum("havirt_host_verdict", &[("host", &name)]), 1.0, "h{n}: one verdict for {name}");
        if h != n {
            for path in ["network", "storage"] {
                let age = e.value("havirt_heartbeat_age_seconds", &[("host", &name), ("path", path)]);
                assert!(age.is_some_and(|a| a < FRESH_S), "h{n}: {path} heartbeat age of {name}: {age:?}");
            }
        }
    }
    let master_name = format!("h{master}");
    assert_eq!(e.value("havirt_master", &[("host", &master_name)]), Some(1.0), "h{n}");
    assert_eq!(e.value("havirt_is_master", &[]), Some(f64::from(u8::from(n == master))), "h{n}");
    let here = t.domains_on(n).len() as f64;
    assert_eq!(e.value("havirt_leases_held", &[]), Some(here), "h{n} runs {:?}", t.domains_on(n));
    let running =
        e.sum("havirt_local_domains", &[("state", "running")]) + e.sum("havirt_local_domains", &[("state", "ready")]);
    assert_eq!(running, here, "h{n}: local domains running or ready");
    assert_eq!(e.value("havirt_protected_domains", &[]), Some(t.before.len() as f64), "h{n}");
    assert_eq!(e.value("havirt_storage_healthy", &[]), Some(1.0), "h{n}");
    for op in ["slot_write", "storage_read"] {
        let count = e.value("havirt_storage_io_seconds_count", &[("op", op)]).unwrap_or(0.0);
        assert!(count > 0.0, "h{n}: no {op} timed");
    }
    assert!(e.value("havirt_packets_accepted_total", &[]).is_some_and(|v| v > 0.0), "h{n}: no packet accepted");
    assert_eq!(e.sum("havirt_packets_rejected_total", &[]), 0.0, "h{n}: rejected packets in a clean lab");
    assert_eq!(e.sum("havirt_storage_records_rejected_total", &[]), 0.0, "h{n}: rejected records in a clean lab");
}

/// A running `status --watch` or `events --follow` must have printed what
/// is asserted within this.
const FOLLOW_WAIT: Duration = Duration::from_secs(15);

/// Runs `havirt ARGS --socket (host's)` (it runs until interrupted) until
/// what it printed satisfies `done`, or `FOLLOW_WAIT` passed; then kills it
/// and returns what it printed, for the caller to assert `done` on.
fn run_until(host: u16, args: &[&str], done: impl Fn(&str) -> bool) -> String {
    let socket = control_socket(host);
    let mut child = Command::new(env!("CARGO_BIN_EXE_havirt"))
        .args(args)
        .arg("--socket")
        .arg(&socket)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("havirt {args:?}: {e}"));
    let printed = Arc::new(Mutex::new(String::new()));
    let mut stdout = child.stdout.take().expect("piped");
    let sink = Arc::clone(&printed);
    let reader = std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n @ 1..) = stdout.read(&mut buf) {
            sink.lock().expect("not poisoned").push_str(&String::from_utf8_lossy(&buf[..n]));
        }
    });
    let _ = poll_until(FOLLOW_WAIT, || done(&printed.lock().expect("not poisoned")).then_some(()));
    let _ = child.kill();
    let out = child.wait_with_output().unwrap_or_else(|e| panic!("havirt {args:?}: {e}"));
    let _ = reader.join();
    assert!(out.stderr.is_empty(), "havirt {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    printed.lock().expect("not poisoned").clone()
}

/// `status --watch` redrew at least twice, each redraw a whole status (the
/// last one may be cut short by the kill).
fn redrawn(watch: &str) -> bool {
    let draws: Vec<&str> = watch.split(havirt::cli::CLEAR_SCREEN).skip(1).collect();
    let whole = draws.iter().filter(|d| d.contains("HOSTS")).count();
    whole >= 2 && draws.iter().rev().skip(1).all(|d| d.contains("HOSTS"))
}

/// After the fenced power-off of `victim`: the master counted `moved`
/// failovers (fence_confirmed) and recovery times more than `before` (a
/// failover count, a recovery count), a successful fence of the victim, and
/// sees the victim no longer alive.
fn assert_failovers_counted(
    t: &E2e,
    master: u16,
    victim: u16,
    moved: f64,
    failovers_before: f64,
    recoveries_before: f64,
) {
    // The master counts a failover when it reads the survivor's report.
    let want = failovers_before + moved;
    let after = poll_until(REPORT_WAIT, || {
        scrape(t, master).ok().filter(|e| e.sum("havirt_failovers_total", &[("reason", "fence_confirmed")]) >= want)
    });
    let after = after.unwrap_or_else(|| panic!("h{master} counted no failovers: {:?}", scrape(t, master)));
    assert_well_formed(&after, master);
    let victim_name = format!("h{victim}");
    assert_eq!(after.sum("havirt_failovers_total", &[]), want, "h{master}: only the fenced host's domains");
    let recoveries = after.value("havirt_failover_recovery_seconds_count", &[]).unwrap_or(0.0);
    assert_eq!(recoveries, recoveries_before + moved, "h{master}: one recovery time per domain");
    let sum = after.value("havirt_failover_recovery_seconds_sum", &[]).unwrap_or(0.0);
    let mean = sum / recoveries;
    println!("METRICS metrics: h{master} measured a mean recovery of {mean:.2} s for {recoveries} domain(s)");
    assert!(mean > 0.0 && mean <= fenced_bound().as_secs_f64(), "mean recovery {mean} s");
    let success = [("target", victim_name.as_str()), ("result", "success")];
    assert!(
        after.sum("havirt_fence_attempts_total", &success) >= 1.0,
        "h{master}: no successful fence of {victim_name}"
    );
    let down = after.value("havirt_host_verdict", &[("host", &victim_name), ("verdict", "alive")]);
    assert_eq!(down, Some(0.0), "h{master} still sees {victim_name} alive");
}

fn metrics_and_failover_timeline() {
    if Command::new("curl").arg("--version").stdout(Stdio::null()).status().is_err() {
        println!("SKIPPED metrics: no curl (Debian: curl; .ci/setup installs it)");
        return;
    }
    let Some(mut t) = E2e::up("metrics", |_| {}) else { return };
    let master = t.master();
    let victim = t.busiest_non_master();
    let stopped = t.domains_on(victim);
    for n in 1..=HOSTS {
        // Settled means every daemon ran a while: its peers are alive.
        let e = poll_until(Duration::from_secs(10), || scrape(&t, n).ok())
            .unwrap_or_else(|| panic!("h{n}: {METRICS_URL} does not answer: {:?}", scrape(&t, n).err()));
        assert_well_formed(&e, n);
        assert_settled_view(&t, &e, n, master);
    }
    let before = scrape(&t, master).unwrap_or_else(|e| panic!("{e}"));
    let failovers_before = before.sum("havirt_failovers_total", &[("reason", "fence_confirmed")]);
    let recoveries_before = before.value("havirt_failover_recovery_seconds_count", &[]).unwrap_or(0.0);

    let watch = run_until(master, &["status", "--watch", "--interval", "0.3"], redrawn);
    assert!(redrawn(&watch), "status --watch did not redraw twice within {FOLLOW_WAIT:?}:\n{watch}");
    let followed = |t: &str| t.contains("daemon started") && t.contains("became master");
    let follow = run_until(master, &["events", "--follow"], followed);
    assert!(followed(&follow), "events --follow within {FOLLOW_WAIT:?}:\n{follow}");

    let t0 = t.fault(&Fault::PowerOff(victim));
    t.assert_recovered(&stopped, t0, Duration::ZERO, fenced_bound(), |h| h != victim);

    assert_failovers_counted(&t, master, victim, stopped.len() as f64, failovers_before, recoveries_before);
    let victim_name = format!("h{victim}");
    let timeline = t.lab().havirt_on(master, &["events", "--failovers"]).unwrap_or_else(|e| panic!("{e}"));
    println!("TIMELINE metrics (h{master}):\n{timeline}");
    assert_eq!(timeline.matches("FAILOVER of ").count(), 1, "one failover:\n{timeline}");
    assert!(timeline.contains(&format!("FAILOVER of {victim_name} ")), "{timeline}");
    assert!(timeline.contains("fenced: ") && timeline.contains("confirmed the power-off"), "{timeline}");
    for d in &stopped {
        assert!(timeline.contains(&format!("  {d} -> h")), "no block for {d}:\n{timeline}");
    }
    assert_eq!(timeline.matches("lease taken").count(), stopped.len(), "{timeline}");
    assert_eq!(timeline.matches("started (running)").count(), stopped.len(), "{timeline}");
    assert!(!timeline.contains("started (running): not seen yet"), "{timeline}");
    let events = t.lab().havirt_on(master, &["events"]).unwrap_or_else(|e| panic!("{e}"));
    assert!(events.contains(&format!("failover of {victim_name}: ")), "no summary event:\n{events}");
    t.finish();
}

/// This file's tests, for the harness (main.rs); `true`: ignored unless asked for.
pub fn tests() -> Vec<(&'static str, fn(), bool)> {
    vec![("metrics_and_failover_timeline", metrics_and_failover_timeline, false)]
}
