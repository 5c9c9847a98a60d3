//! Faults the design rides out: nothing may move. Each test first checks
//! that its fault really took effect (a test of "nothing happened" that
//! cannot tell a fault that did nothing would pass for the wrong reason).

use crate::harness::{CI_MARGIN, E2e, HOSTS, now, poll_until, qemu_pids, std_duration, timings};
use havirt::lab::cluster::{Fault, SETTLE_WAIT};
use std::collections::BTreeSet;
use std::time::{Duration, Instant};

/// How often the hold loops look at the daemons.
const WATCH: Duration = Duration::from_millis(500);

/// A wrong takeover has happened by host_dead_timeout (22 s, S3(b)) after
/// the fault; hold the fault that long plus the CI margin (5 s) = 27 s.
fn hold_past_host_dead() -> Duration {
    std_duration(timings().host_dead_timeout) + CI_MARGIN
}

/// Polls every WATCH until `until`, calling `look` each time.
fn watch_until(until: Instant, mut look: impl FnMut()) {
    while now() < until {
        look();
        std::thread::sleep(WATCH);
    }
}

/// The verdicts each of `watchers` gives `host`, once (a daemon that does
/// not answer gives none).
fn verdicts_of(t: &E2e, watchers: &[u16], host: u16) -> Vec<String> {
    let verdict = |n: u16| {
        let r = t.lab().daemon_status(n).ok()?;
        r.view.hosts.iter().find(|h| h.id.0 == host).map(|h| h.verdict.clone())
    };
    watchers.iter().filter_map(|n| verdict(*n)).collect()
}

/// Holds a network fault cutting `cut` off for `hold_past_host_dead`:
/// the others must see it partitioned or isolated (silent on the network,
/// alive on storage) within suspect_after (2 s) + CI margin (5 s), and
/// never as suspect or storage-lost (L2: never declared dead for network
/// silence alone). Returns every verdict seen.
fn hold_network_fault(t: &E2e, cut: u16, t0: Instant) -> BTreeSet<String> {
    let others: Vec<u16> = (1..=HOSTS).filter(|h| *h != cut).collect();
    let silent = std_duration(timings().suspect_after) + CI_MARGIN;
    let seen = poll_until(silent, || {
        let v = verdicts_of(t, &others, cut);
        (v.len() == others.len() && v.iter().all(|v| v == "partitioned" || v == "isolated")).then_some(v)
    });
    assert!(seen.is_some(), "h{cut} not seen partitioned by {others:?}: {:?}", verdicts_of(t, &others, cut));
    let mut verdicts = BTreeSet::new();
    watch_until(t0 + hold_past_host_dead(), || verdicts.extend(verdicts_of(t, &others, cut)));
    println!("verdicts of h{cut} while cut off: {verdicts:?}");
    for bad in ["suspect", "storage-lost", "unknown"] {
        assert!(!verdicts.contains(bad), "h{cut} was seen {bad} while alive on storage: {verdicts:?}");
    }
    verdicts
}

/// Case 6: a 2|1 partition of the heartbeat network with healthy storage.
/// DESIGN.md §3 and §5: a host alive on storage is partitioned, never
/// fenced; nothing is restarted and its leases stay valid. So nothing
/// moves, for longer than any takeover rule could wait; then heal.
fn partition_with_healthy_storage_moves_nothing() {
    let Some(mut t) = E2e::up("partition_2_1", |_| {}) else { return };
    let cut = HOSTS;
    let t0 = t.fault(&Fault::Partition { from: vec![cut], to: vec![], both_ways: true });
    hold_network_fault(&t, cut, t0);
    t.assert_nothing_moved();
    t.fault(&Fault::Heal);
    t.settle(SETTLE_WAIT);
    t.assert_undisturbed();
    t.finish();
}

/// Case 7, keep: an isolated host whose domains say `keep` keeps running
/// them (it says it is isolated, within isolation_timeout 5 s + CI margin
/// 5 s); the others do not restart them; nothing doubles.
fn isolated_host_keeps_its_domains() {
    let Some(mut t) = E2e::up("isolated_keep", |_| {}) else { return };
    let victim = t.busiest_non_master();
    for d in t.domains_on(victim) {
        let out = t.lab().havirt_on(victim, &["protect", &d, "--isolation-response", "keep"]);
        out.unwrap_or_else(|e| panic!("protect {d} --isolation-response keep: {e}"));
    }
    let t0 = t.fault(&Fault::Isolate(victim));
    let says = std_duration(timings().isolation_timeout) + CI_MARGIN;
    let isolated = poll_until(says, || t.lab().daemon_status(victim).ok().filter(|r| r.view.isolated));
    assert!(isolated.is_some(), "h{victim} did not say it was isolated within {says:?}");
    hold_network_fault(&t, victim, t0);
    t.assert_nothing_moved();
    t.fault(&Fault::Heal);
    t.settle(SETTLE_WAIT);
    t.assert_undisturbed();
    t.finish();
}

/// Case 9: every storage request of one host takes `delay_ms` more for
/// 15 s. A slot write is many FUSE requests (no attribute or entry cache:
/// path lookups, open, write, fdatasync, flush, release; measured, the
/// oldest last good write: 1.1 s at 50 ms each, 2.2 s at 100 ms, so
/// 12-17 requests per write). At 50 ms a write takes ~0.6 s, under
/// io_timeout (2 s) and far under renew_timeout (8 s): (L2) no
/// self-fence, no fence, nothing moves.
fn storage_delay_below_io_timeout_moves_nothing() {
    storage_delay("storage_delay_50ms", 50);
}

/// The number, 500 ms per request. The slot file is kept open, so
/// a heartbeat is a pwrite + fdatasync (two requests: 1.0 s measured
/// through faultfs, under io_timeout); its reopening every SLOT_FILE_REOPEN
/// (5 s) takes ~4 s (path lookups, open, fstat). Still the host self-fences
/// after renew_timeout: not yet explained (see the issue note).
fn storage_delay_500ms_moves_nothing() {
    storage_delay("storage_delay_500ms", 500);
}

fn storage_delay(name: &'static str, delay_ms: u64) {
    let Some(mut t) = E2e::up(name, |_| {}) else { return };
    let victim = t.busiest_non_master();
    let t0 = t.fault(&Fault::StorageDelay(victim, delay_ms));
    let mut slowest = Duration::ZERO;
    watch_until(t0 + DELAY_HOLD, || {
        if let Ok(r) = t.lab().daemon_status(victim) {
            assert_eq!(r.view.self_fence, "healthy", "h{victim} self-fences under a {delay_ms} ms delay");
            let age = r.view.last_good_write_age.map_or(Duration::ZERO, std_duration);
            slowest = slowest.max(age);
        }
    });
    t.fault(&Fault::StorageOk(victim));
    println!("{name}: h{victim}'s oldest last good slot write seen: {:.2} s", slowest.as_secs_f64());
    // The delay reached the daemon: without it a write completes within
    // a few ms of every write interval (0.5 s).
    let undelayed = std_duration(timings().storage_write_interval) + Duration::from_millis(delay_ms);
    assert!(slowest >= undelayed, "h{victim}'s slot writes never took longer: oldest {slowest:?}");
    t.settle(SETTLE_WAIT);
    std::thread::sleep(CI_MARGIN);
    t.assert_undisturbed();
    t.finish();
}

const DELAY_HOLD: Duration = Duration::from_secs(15);
/// A killed daemon or libvirtd is restarted 1 s after it died (the lab's
/// Restart=always); it must answer again within that + its start + the
/// CI margin: 1 + 4 + 5 = 10 s.
const COME_BACK: Duration = Duration::from_secs(10);

/// Case 10: the daemon of a host is killed: its domains keep running (the
/// same qemu processes), the daemon comes back (a new one: uptime younger
/// than the kill) and reclaims its leases, and nothing moves.
fn killed_daemon_comes_back_and_nothing_moves() {
    let Some(mut t) = E2e::up("kill_daemon", |_| {}) else { return };
    let victim = t.busiest_non_master();
    let pids = qemu_pids(t.lab(), victim);
    assert_eq!(pids.keys().cloned().collect::<Vec<_>>(), t.domains_on(victim), "qemu processes of h{victim}");
    let t0 = t.fault(&Fault::KillDaemon(victim));
    let back = poll_until(COME_BACK, || {
        let r = t.lab().daemon_status(victim).ok()?;
        (u128::from(r.uptime_ms) < t0.elapsed().as_millis()).then_some(r)
    });
    assert!(back.is_some(), "h{victim}'s daemon did not come back within {COME_BACK:?}");
    t.settle(SETTLE_WAIT);
    std::thread::sleep(CI_MARGIN);
    assert_eq!(qemu_pids(t.lab(), victim), pids, "h{victim}'s qemu processes changed");
    t.assert_undisturbed();
    t.finish();
}

/// Case 11: libvirtd of a host is killed: its qemu processes keep running,
/// libvirtd comes back, and nothing moves. (The observer cannot list the
/// host while libvirtd is down, so its domains show a gap there; the
/// unchanged qemu pids prove they kept running.)
fn killed_libvirtd_comes_back_and_nothing_moves() {
    let Some(mut t) = E2e::up("kill_libvirtd", |_| {}) else { return };
    let victim = t.busiest_non_master();
    let pids = qemu_pids(t.lab(), victim);
    assert_eq!(pids.keys().cloned().collect::<Vec<_>>(), t.domains_on(victim), "qemu processes of h{victim}");
    t.fault(&Fault::KillLibvirtd(victim));
    let host = t.lab().host(victim).expect("a lab host");
    host.wait_libvirt(COME_BACK).unwrap_or_else(|e| panic!("h{victim}'s libvirtd did not come back: {e}"));
    t.settle(SETTLE_WAIT);
    std::thread::sleep(CI_MARGIN);
    assert_eq!(qemu_pids(t.lab(), victim), pids, "h{victim}'s qemu processes changed");
    t.assert_nothing_moved();
    let elsewhere: Vec<String> = t.before.keys().filter(|d| !t.before[*d].contains(&victim)).cloned().collect();
    t.assert_kept_running(&elsewhere);
    t.finish();
}

/// This file's tests, for the harness (main.rs); `true`: ignored unless asked for.
pub fn tests() -> Vec<(&'static str, fn(), bool)> {
    vec![
        ("partition_with_healthy_storage_moves_nothing", partition_with_healthy_storage_moves_nothing, false),
        ("isolated_host_keeps_its_domains", isolated_host_keeps_its_domains, false),
        ("storage_delay_below_io_timeout_moves_nothing", storage_delay_below_io_timeout_moves_nothing, false),
        ("storage_delay_500ms_moves_nothing", storage_delay_500ms_moves_nothing, true),
        ("killed_daemon_comes_back_and_nothing_moves", killed_daemon_comes_back_and_nothing_moves, false),
        ("killed_libvirtd_comes_back_and_nothing_moves", killed_libvirtd_comes_back_and_nothing_moves, false),
    ]
}
