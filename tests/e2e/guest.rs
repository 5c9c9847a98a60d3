//! Domain monitoring against a real guest OS (issue 5): vm1 boots the lab's
//! tiny guest (a kernel, busybox and qemu-ga), the other domains stay
//! empty. A guest that hangs for real (a kernel panic with `panic=0`) is
//! reset once its agent was silent for the failure interval, in the same
//! qemu, and answers again; a guest that shuts itself down stays stopped on
//! every host until `havirt start`, which runs it once even when asked on
//! two hosts at once. (A killed qemu restarting on its host is
//! `failover::killed_qemu_restarts_on_the_same_host`.)

use crate::harness::{CI_MARGIN, E2e, HOSTS, now, poll_until, qemu_pids};
use havirt::control::{self, Request, Response};
use havirt::engine::io::DomainState;
use havirt::lab::cluster::{Fault, GUEST_PANIC_DELAY_S, Lab, control_socket};
use std::time::{Duration, Instant};

/// The domain that boots the guest OS.
const GUEST: &str = "vm1";
/// The failure interval the tests set (the default is 30 s): short, so
/// that a test is quick, and still three pings long (one every 2 s).
const FAILURE_INTERVAL_S: u64 = 6;
/// Its minimum uptime: the TCG guest's boot on a loaded 2-core machine
/// (about 3 s alone) fits many times over.
const MIN_UPTIME_S: u64 = 60;
/// A TCG boot of the guest until its agent answers, on a loaded 2-core
/// machine (about 3 s on an idle one), with room.
const BOOT: Duration = Duration::from_secs(30);
/// How long a stopped guest is watched for a wrong restart: longer than
/// any restart (restart_backoff 1 s + a start 1 s + the master's placement
/// through storage) would take.
const STAYS_STOPPED: Duration = Duration::from_secs(15);

fn lab_up(name: &'static str) -> Option<E2e> {
    E2e::up(name, |s| s.guest_os = 1)
}

/// Polls the guest's agent (through host N's libvirtd) until it answers.
fn wait_agent(lab: &Lab, host: u16, within: Duration) -> Option<Duration> {
    let t0 = now();
    let ping = r#"{"execute":"guest-ping"}"#;
    poll_until(within, || lab.guest_agent(host, GUEST, ping).ok().map(|_| t0.elapsed()))
}

/// The host running `domain` now (exactly one, or the test fails).
fn only_host(t: &E2e, domain: &str) -> u16 {
    let on = t.lab().placement().get(domain).cloned().unwrap_or_default();
    assert_eq!(on.len(), 1, "{domain} runs on {on:?}");
    on[0]
}

/// Host N's daemon events whose text holds `needle`, with the wall time
/// the daemon logged each (ms since the Unix epoch).
fn events_with(host: u16, needle: &str) -> Vec<(u64, String)> {
    match control::request(&control_socket(host), &Request::Events { after: 0 }, Duration::from_secs(5)) {
        Ok(Response::Events(list)) => {
            list.into_iter().filter(|e| e.event.text.contains(needle)).map(|e| (e.unix_ms, e.event.text)).collect()
        }
        _ => Vec::new(),
    }
}

fn unix_ms_now() -> u64 {
    #[allow(clippy::disallowed_methods, reason = "matches the daemon's wall-clock event stamps")]
    let t = std::time::SystemTime::now();
    t.duration_since(std::time::UNIX_EPOCH).map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// (a) The guest's kernel panics: its agent goes silent, the host resets
/// the guest after the failure interval (the same qemu process: a reset,
/// not a restart), and the guest boots and answers again. No domain
/// stopped or moved, S1 throughout.
fn hung_guest_is_reset_and_answers_again() {
    let Some(mut t) = lab_up("guest_hang") else { return };
    let host = only_host(&t, GUEST);
    let lab = t.lab();
    let boot = wait_agent(lab, host, BOOT).unwrap_or_else(|| panic!("{GUEST}'s agent never answered"));
    println!("GUEST {GUEST} on h{host}: agent answers ({:.2} s after the lab settled)", boot.as_secs_f64());
    let interval = FAILURE_INTERVAL_S.to_string();
    let uptime = MIN_UPTIME_S.to_string();
    let args = ["protect", GUEST, "--guest-monitor", "on", "--monitor-failure-interval", &interval];
    let protect = [&args[..], &["--monitor-min-uptime", &uptime]].concat();
    lab.havirt_on(host, &protect).unwrap_or_else(|e| panic!("protect {GUEST} with monitoring: {e}"));
    let armed =
        poll_until(BOOT, || (!events_with(host, &format!("{GUEST}: guest agent answers")).is_empty()).then_some(()));
    assert!(armed.is_some(), "h{host} never heard {GUEST}'s agent");
    let pid = qemu_pids(lab, host).get(GUEST).copied().expect("qemu of the guest");

    let hang_ms = unix_ms_now();
    let t0 = t.fault(&Fault::GuestPanic(host, GUEST.into()));
    // Silent from the panic on (GUEST_PANIC_DELAY_S after the fault): the
    // reset comes after the failure interval, plus at most one ping
    // interval (2 s) and one agent timeout (2 s) for the silence to be
    // seen, plus the CI margin.
    let bound = Duration::from_secs(GUEST_PANIC_DELAY_S + FAILURE_INTERVAL_S + 4) + CI_MARGIN;
    let lab = t.lab();
    let reset = poll_until(bound + CI_MARGIN, || events_with(host, &format!("{GUEST}: guest agent silent")).pop());
    let (reset_ms, text) = reset.unwrap_or_else(|| panic!("no reset of {GUEST} within {bound:?}"));
    let to_reset = Duration::from_millis(reset_ms.saturating_sub(hang_ms));
    println!("GUEST hang -> reset decided in {:.2} s: {text}", to_reset.as_secs_f64());
    // Silence counts from the last answer, which may precede the panic by
    // one ping interval (a third of the failure interval: 2 s); the panic
    // comes GUEST_PANIC_DELAY_S after the fault.
    let lower = Duration::from_secs(GUEST_PANIC_DELAY_S + FAILURE_INTERVAL_S - FAILURE_INTERVAL_S / 3);
    assert!(to_reset >= lower, "reset {to_reset:?} after the hang, before {lower:?}: {text}");
    assert!(to_reset <= bound, "reset {to_reset:?} after the hang, bound {bound:?}");
    let back = wait_agent(lab, host, BOOT).unwrap_or_else(|| panic!("{GUEST}'s agent never answered after the reset"));
    let total = t0.elapsed();
    println!(
        "GUEST hang -> reset -> agent answers: {:.2} s (reset at {:.2} s, boot {:.2} s)",
        total.as_secs_f64(),
        to_reset.as_secs_f64(),
        total.saturating_sub(to_reset).as_secs_f64()
    );
    assert!(back <= BOOT);
    assert_eq!(qemu_pids(lab, host).get(GUEST), Some(&pid), "the reset must keep the same qemu");
    t.assert_undisturbed();
    t.finish();
}

/// (b) The guest shuts itself down (its agent's guest-shutdown): it stays
/// stopped on every host for a while, every daemon's status says stopped;
/// then `havirt start` on two other hosts at once runs it exactly once.
fn guest_shutdown_stays_stopped_until_havirt_start() {
    let Some(mut t) = lab_up("guest_shutdown") else { return };
    let host = only_host(&t, GUEST);
    wait_agent(t.lab(), host, BOOT).unwrap_or_else(|| panic!("{GUEST}'s agent never answered"));
    let others: Vec<String> = t.before.keys().filter(|d| *d != GUEST).cloned().collect();
    let t0 = t.fault(&Fault::GuestShutdown(host, GUEST.into()));
    let stopped = poll_until(BOOT, || t.lab().placement()[GUEST].is_empty().then(|| t0.elapsed()));
    let stopped = stopped.unwrap_or_else(|| panic!("{GUEST} did not stop after its guest-shutdown"));
    println!("GUEST {GUEST} powered itself off in {:.2} s", stopped.as_secs_f64());
    std::thread::sleep(STAYS_STOPPED);
    assert_stayed_stopped(&t, t0);
    for n in 1..=HOSTS {
        let view = t.lab().daemon_status(n).unwrap_or_else(|e| panic!("h{n}'s daemon: {e}")).view;
        let d = view.domains.iter().find(|d| d.name == GUEST).expect("protected");
        assert_eq!(d.state, Some(DomainState::Stopped), "h{n}'s status of {GUEST}: {d:?}");
    }
    let status = t.lab().havirt_on(host, &["status"]).expect("havirt status");
    assert!(status.lines().any(|l| l.starts_with(GUEST) && l.contains("stopped")), "{status}");
    t.assert_kept_running(&others);

    // Two operators start it at once on the two other hosts.
    let starters: Vec<u16> = (1..=HOSTS).filter(|h| *h != host).collect();
    let t1 = now();
    let results: Vec<(u16, Result<String, String>)> = std::thread::scope(|s| {
        let lab = t.lab();
        let jobs: Vec<_> = starters
            .iter()
            .map(|h| s.spawn(move || (*h, lab.havirt_on(*h, &["start", GUEST]).map_err(|e| e.to_string()))))
            .collect();
        jobs.into_iter().map(|j| j.join().expect("start thread")).collect()
    });
    for (h, r) in &results {
        println!("GUEST havirt start {GUEST} on h{h}: {r:?}");
    }
    let runs = poll_until(BOOT, || {
        let on = t.lab().placement()[GUEST].clone();
        (on.len() == 1).then(|| on[0])
    });
    let runs = runs.unwrap_or_else(|| panic!("{GUEST} does not run once after havirt start: {results:?}"));
    assert!(starters.contains(&runs), "{GUEST} runs on h{runs}, which was not asked");
    let ok: Vec<u16> = results.iter().filter(|(_, r)| r.is_ok()).map(|(h, _)| *h).collect();
    assert_eq!(ok, vec![runs], "exactly the host that runs it reports success: {results:?}");
    wait_agent(t.lab(), runs, BOOT).unwrap_or_else(|| panic!("{GUEST}'s agent never answered on h{runs}"));
    println!("GUEST havirt start -> agent answers on h{runs}: {:.2} s", t1.elapsed().as_secs_f64());
    std::thread::sleep(CI_MARGIN);
    assert_eq!(t.lab().placement()[GUEST], vec![runs], "{GUEST} after the start");
    t.assert_kept_running(&others);
    t.finish();
}

/// Since the stop at `t0`, the observer never saw the guest run anywhere.
fn assert_stayed_stopped(t: &E2e, t0: Instant) {
    let seen = t.seen();
    let since = seen.offset(t0);
    let key = seen.key(GUEST).expect("seen");
    let after: Vec<_> = seen.timeline[&key].iter().filter(|i| i.first_seen > since).cloned().collect();
    assert!(after.is_empty(), "{GUEST} ran again after its shutdown: {after:?}");
}

/// This file's tests, for the harness (main.rs); `true`: ignored unless asked for.
pub fn tests() -> Vec<(&'static str, fn(), bool)> {
    vec![
        ("hung_guest_is_reset_and_answers_again", hung_guest_is_reset_and_answers_again, false),
        ("guest_shutdown_stays_stopped_until_havirt_start", guest_shutdown_stays_stopped_until_havirt_start, false),
    ]
}
