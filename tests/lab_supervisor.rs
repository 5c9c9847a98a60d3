//! The lab watchdog supervisor (src/lab/supervisor.rs) against the real
//! `LabWatchdog` the daemon uses: pets keep it quiet, silence fires it once
//! within the timeout plus `FIRE_SLACK`, never before, a disarm stops it, and
//! a new boot arms it again. Each test runs about a second.

#![allow(clippy::disallowed_methods, reason = "the test measures a real-time watchdog")]

use havirt::fence::watchdog::{LabWatchdog, Watchdog};
use havirt::lab::supervisor::{Arming, FIRE_SETTLE, Supervisor};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread;
use std::time::{Duration, Instant};

const TIMEOUT: Duration = Duration::from_millis(300);
const PET_EVERY: Duration = Duration::from_millis(100);
/// The acceptance bound: fired within timeout + this of the last pet.
const FIRE_SLACK: Duration = Duration::from_millis(100);

/// A test's own directory, removed when the test ends (also on failure).
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> TempDir {
        let dir = std::env::temp_dir().join(format!("havirt-lab-supervisor-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A supervisor whose power-off action counts; declared after the TempDir
/// it lives in, so that it stops first.
fn counting_supervisor(dir: &TempDir) -> (Supervisor, Arc<AtomicUsize>, PathBuf) {
    let fired = Arc::new(AtomicUsize::new(0));
    let f = Arc::clone(&fired);
    let path = dir.0.join("watchdog.sock");
    let sup = Supervisor::start(&path, Box::new(move || _ = f.fetch_add(1, Ordering::SeqCst))).expect("start");
    (sup, fired, path)
}

/// Pets for `pets` rounds; returns when the last pet was sent.
fn pet_for(w: &mut LabWatchdog, pets: u32) -> Instant {
    let mut last = Instant::now();
    for _ in 0..pets {
        thread::sleep(PET_EVERY);
        last = Instant::now();
        w.pet().expect("pet");
    }
    last
}

/// Waits (bounded) until `n` fires were counted.
fn wait_fired(fired: &AtomicUsize, n: usize, limit: Duration) -> Option<Instant> {
    let start = Instant::now();
    while start.elapsed() < limit {
        if fired.load(Ordering::SeqCst) >= n {
            return Some(Instant::now());
        }
        thread::sleep(Duration::from_millis(1));
    }
    None
}

fn check_fired_in_time(a: &Arming, last_pet_sent: Instant, what: &str) {
    let fired = a.fired_at.expect("fired");
    let from_send = fired.at.duration_since(last_pet_sent);
    let delay = a.fire_delay().expect("fired");
    println!(
        "{what}: timeout {} ms; fired {} ms after the last pet was received, {} ms after it was sent; action returned after {} us",
        a.timeout_ms,
        delay.as_millis(),
        from_send.as_millis(),
        a.action_done_at.expect("done").at.duration_since(fired.at).as_micros()
    );
    assert!(delay >= TIMEOUT && from_send >= TIMEOUT, "{what}: fired before the timeout: {a:?}");
    assert!(from_send <= TIMEOUT + FIRE_SLACK, "{what}: fired {from_send:?} after the last pet: {a:?}");
}

#[test]
fn silence_fires_once_in_time_and_a_new_boot_rearms() {
    let dir = TempDir::new("fire");
    let (sup, fired, path) = counting_supervisor(&dir);
    let mut w = LabWatchdog::open(&path, TIMEOUT).expect("open");
    let last = pet_for(&mut w, 10);
    assert_eq!(fired.load(Ordering::SeqCst), 0, "fired while petted");
    wait_fired(&fired, 1, TIMEOUT * 4).expect("fires after pets stop");
    thread::sleep(TIMEOUT * 2);
    assert_eq!(fired.load(Ordering::SeqCst), 1, "fires once per arming");
    let h = sup.history();
    assert_eq!(h.len(), 1);
    assert_eq!(h[0].pets, 11);
    check_fired_in_time(&h[0], last, "first boot");
    drop(w);

    // The host powered on again: its daemon opens the watchdog anew.
    thread::sleep(FIRE_SETTLE);
    let mut w = LabWatchdog::open(&path, TIMEOUT).expect("open again");
    let last = pet_for(&mut w, 3);
    wait_fired(&fired, 2, TIMEOUT * 4).expect("fires again after the re-arm");
    let h = sup.stop();
    assert_eq!(h.len(), 2);
    check_fired_in_time(&h[1], last, "second boot");
    assert_eq!(fired.load(Ordering::SeqCst), 2);
    assert!(!path.exists(), "stop removes the socket");
}

#[test]
fn disarm_stops_watching_without_firing() {
    let dir = TempDir::new("disarm");
    let (sup, fired, path) = counting_supervisor(&dir);
    let mut w = LabWatchdog::open(&path, TIMEOUT).expect("open");
    pet_for(&mut w, 3);
    w.disarm().expect("disarm");
    thread::sleep(TIMEOUT * 3);
    assert_eq!(fired.load(Ordering::SeqCst), 0, "fired after a disarm");
    let h = sup.stop();
    assert_eq!(h.len(), 1);
    assert!(h[0].disarmed_at.is_some() && h[0].fired_at.is_none(), "{h:?}");
}

#[test]
fn stop_without_pets_fires_nothing() {
    let dir = TempDir::new("idle");
    let (sup, fired, path) = counting_supervisor(&dir);
    let mut w = LabWatchdog::open(&path, TIMEOUT).expect("open");
    w.pet().expect("pet");
    let start = Instant::now();
    while sup.history().first().is_none_or(|a| a.pets < 2) && start.elapsed() < TIMEOUT {
        thread::sleep(Duration::from_millis(1));
    }
    // Stopping the supervisor while armed is the lab tearing down, not a fault.
    let h = sup.stop();
    assert_eq!((h.len(), h[0].pets), (1, 2), "{h:?}");
    thread::sleep(TIMEOUT * 2);
    assert_eq!(fired.load(Ordering::SeqCst), 0);
}
