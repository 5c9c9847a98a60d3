//! The lab observer (src/lab/observer.rs) against a real libvirtd and a tiny
//! real domain: the S1 detector bites (the same libvirtd observed as two
//! hosts shows a running domain as a double run), and a destroy then start
//! is one gap, with its times in the right order. Starts libvirtd when none
//! answers (and stops what it started); SKIPPED, saying why, when not root
//! or libvirt/qemu is missing. Bounded by `TEST_MAX_S`.

#![allow(clippy::disallowed_methods, reason = "the test drives real processes in real time")]

mod common;

use common::libvirtd::*;
use havirt::engine::config::DomainId;
use havirt::hypervisor::{Hypervisor, LibvirtHypervisor, LibvirtOptions, uuid_string};
use havirt::lab::observer::{DEFAULT_INTERVAL, Observation, Observer};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

/// The test fails (never hangs) after this.
const TEST_MAX_S: u64 = 60;
/// Any one wait for the observer to see something.
const SEE_WAIT: Duration = Duration::from_secs(15);
const NAME: &str = "havirt-it-observer";
const ID: DomainId = DomainId(0x5ca1ab1e_0000_4000_8000_0000000000b5);

#[test]
fn real_libvirtd_double_run_and_gap() {
    let (tx, rx) = mpsc::channel();
    let worker = thread::spawn(move || {
        let result = std::panic::catch_unwind(body);
        let _ = tx.send(());
        if let Err(panic) = result {
            std::panic::resume_unwind(panic);
        }
    });
    match rx.recv_timeout(Duration::from_secs(TEST_MAX_S)) {
        Ok(()) => worker.join().expect("the real-libvirtd observer test failed (see above)"),
        Err(_) => panic!("the real-libvirtd observer test did not finish in {TEST_MAX_S} s"),
    }
}

fn body() {
    if let Some(why) = unavailable() {
        return println!("SKIPPED real_libvirtd_double_run_and_gap: {why}");
    }
    let daemons = match Daemons::ensure() {
        Ok(d) => d,
        Err(why) => return println!("SKIPPED real_libvirtd_double_run_and_gap: {why}"),
    };
    let result = std::panic::catch_unwind(|| {
        remove_domain(ID);
        let hv = LibvirtHypervisor::open(LibvirtOptions::new(REAL_URI)).expect("open qemu:///system");
        hv.define(&tiny_domain_xml(NAME, ID)).expect("define");
        hv.start(ID).expect("start");
        double_run_is_detected();
        destroy_and_start_is_one_gap(&hv);
    });
    remove_domain(ID);
    daemons.stop_what_we_started();
    if let Err(panic) = result {
        std::panic::resume_unwind(panic);
    }
}

fn host(name: &str) -> (String, String) {
    (name.to_string(), REAL_URI.to_string())
}

/// Waits (bounded by `SEE_WAIT`) until the observation satisfies `cond`.
fn wait_seen(obs: &Observer, what: &str, cond: impl Fn(&Observation) -> bool) {
    let start = Instant::now();
    while !cond(&obs.snapshot()) {
        assert!(start.elapsed() < SEE_WAIT, "the observer did not see {what} within {SEE_WAIT:?}");
        thread::sleep(Duration::from_millis(20));
    }
}

fn runs_in_last_sample(o: &Observation, uuid: &str) -> Option<bool> {
    o.samples.last().map(|s| !s.running_hosts(uuid).is_empty())
}

fn double_run_is_detected() {
    let uuid = uuid_string(ID);
    let obs = Observer::start(vec![host("h1"), host("h2")], DEFAULT_INTERVAL).expect("observer");
    wait_seen(&obs, "a double run over 3 samples", |o| o.double_runs_of(&uuid).first().is_some_and(|d| d.samples >= 3));
    let o = obs.stop();
    let runs = o.double_runs_of(NAME);
    assert_eq!(runs.len(), 1, "one continuous double run: {runs:?}");
    let d = runs[0];
    assert_eq!((d.domain.as_str(), d.name.as_str()), (uuid.as_str(), NAME));
    assert_eq!(d.hosts, vec!["h1".to_string(), "h2".to_string()]);
    assert!(d.first_seen < d.last_seen, "{d:?}");
    println!(
        "S1 detector: {} samples in {:?}, double run seen {} times from {:?}",
        o.samples.len(),
        o.samples.last().map(|s| s.at),
        d.samples,
        d.first_seen
    );
}

fn destroy_and_start_is_one_gap(hv: &LibvirtHypervisor) {
    let uuid = uuid_string(ID);
    let obs = Observer::start(vec![host("h1")], DEFAULT_INTERVAL).expect("observer");
    wait_seen(&obs, "the domain running", |o| runs_in_last_sample(o, &uuid) == Some(true));
    let fault_at = Instant::now();
    hv.destroy(ID).expect("destroy");
    let destroyed_at = Instant::now();
    wait_seen(&obs, "the domain stopped", |o| runs_in_last_sample(o, &uuid) == Some(false));
    let restart_at = Instant::now();
    hv.start(ID).expect("start again");
    let started_at = Instant::now();
    wait_seen(&obs, "the domain running again", |o| runs_in_last_sample(o, &uuid) == Some(true));
    let o = obs.stop();

    let gaps = o.gaps(&uuid);
    assert_eq!(gaps.len(), 1, "{gaps:?}");
    let g = &gaps[0];
    let again = g.running_again_at.expect("running again");
    assert!(g.last_running_at < g.stopped_at && g.stopped_at < again, "{g:?}");
    assert!(o.offset(fault_at) <= g.stopped_at, "seen stopped before the destroy began: {g:?}");
    assert!(g.stopped_at <= o.offset(restart_at), "{g:?}");
    assert!(again >= o.offset(restart_at), "seen running before the start: {g:?}");
    assert_eq!((g.hosts_before.clone(), g.hosts_after.clone()), (vec!["h1".to_string()], vec!["h1".to_string()]));
    let recovery = o.recovery_after(NAME, fault_at).expect("a recovery");
    assert_eq!(recovery, again - o.offset(fault_at));
    assert!(!o.moved(NAME));
    assert!(o.double_runs_of(NAME).is_empty());
    assert_eq!(o.unreachable_samples("h1"), 0);
    let intervals = &o.timeline[&uuid];
    assert_eq!(intervals.len(), 2, "{intervals:?}");
    assert_eq!(intervals[0].stopped_seen, Some(g.stopped_at));
    println!(
        "gap: destroy took {} ms, seen stopped {} ms after the destroy began; start took {} ms, seen running {} ms after it began; recovery_after = {} ms",
        destroyed_at.duration_since(fault_at).as_millis(),
        (g.stopped_at - o.offset(fault_at)).as_millis(),
        started_at.duration_since(restart_at).as_millis(),
        (again - o.offset(restart_at)).as_millis(),
        recovery.as_millis()
    );
}
