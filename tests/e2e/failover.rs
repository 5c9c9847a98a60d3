//! Faults that stop protected domains: each stopped domain must run again
//! within its bound (and, under the watchdog rule, not before it), on a
//! host allowed to run it, and S1 must hold throughout.

use crate::harness::{
    CI_MARGIN, E2e, HOSTS, START, fence_confirmed_on_storage, fenced_bound, poll_until, std_duration, timings,
    watchdog_rule_lower, watchdog_rule_upper,
};
use havirt::lab::cluster::{Fault, Fencing, SETTLE_WAIT};
use std::time::{Duration, Instant};

/// The other domains: those not on `host` when the lab settled.
fn others(t: &E2e, host: u16) -> Vec<String> {
    t.before.keys().filter(|d| !t.before[*d].contains(&host)).cloned().collect()
}

/// Power-off of `victim` (after `before`, e.g. its BMC dying): its domains
/// run again on the other hosts within `[lower, upper]`; the others never stop.
/// Returns the instant just before the power-off.
fn power_off(t: &mut E2e, victim: u16, before: &[Fault], lower: Duration, upper: Duration) -> Instant {
    let stopped = t.domains_on(victim);
    let untouched = others(t, victim);
    for f in before {
        t.fault(f);
    }
    let t0 = t.fault(&Fault::PowerOff(victim));
    t.assert_recovered(&stopped, t0, lower, upper, |h| h != victim);
    t.assert_kept_running(&untouched);
    t.assert_s1();
    t0
}

/// Case 1: a non-master host loses power; fence_ipmilan confirms it off
/// and its domains run again on the survivors well before the watchdog
/// rule could have freed their leases.
fn power_off_fenced_through_fence_ipmilan() {
    let Some(mut t) = E2e::up("power_off_fenced", |_| {}) else { return };
    let victim = t.busiest_non_master();
    let master = t.master();
    power_off(&mut t, victim, &[], Duration::ZERO, fenced_bound());
    assert!(fence_confirmed_on_storage(victim), "no fence confirmation of h{victim} on storage");
    assert_status_shows_fenced(&t, master, victim);
    t.finish();
}

/// `havirt status` on a master must show the new state within this after
/// the recovery (the next storage reads: a few 0.5 s intervals).
const STATUS_SHOWS_WAIT: Duration = Duration::from_secs(10);

/// After the fenced power-off of `victim`: the master's `havirt status`
/// calls it `fenced` (not suspect), and its "tolerates N host failure(s)"
/// counts the live hosts only (at most HOSTS - 2 with one dead).
fn assert_status_shows_fenced(t: &E2e, master: u16, victim: u16) {
    let tolerates = |text: &str| -> Option<u32> {
        let rest = text.split("Failover: tolerates ").nth(1)?;
        rest.split(' ').next()?.parse().ok()
    };
    let fenced_row = |text: &str| {
        text.lines().any(|l| {
            let cols: Vec<&str> = l.split_whitespace().collect();
            cols.get(1) == Some(&format!("h{victim}").as_str()) && cols.get(2) == Some(&"fenced")
        })
    };
    let mut seen = String::new();
    let shown = poll_until(STATUS_SHOWS_WAIT, || {
        seen = t.lab().havirt_on(master, &["status"]).unwrap_or_else(|e| e.to_string());
        (fenced_row(&seen) && tolerates(&seen).is_some_and(|n| n + 2 <= u32::from(HOSTS))).then_some(())
    });
    println!("power_off_fenced: h{master}'s status after the failover:\n{seen}");
    assert!(
        shown.is_some(),
        "h{master}'s havirt status did not show h{victim} fenced and at most {} tolerated host failure(s) \
         within {STATUS_SHOWS_WAIT:?}; it showed:\n{seen}",
        HOSTS - 2
    );
}

/// Case 2: the host's BMC dies, then the host loses power: fencing fails,
/// and only the watchdog rule (S3(b)) may free its leases, not before
/// host_dead_timeout.
fn power_off_with_dead_bmc_waits_for_the_watchdog_rule() {
    let Some(mut t) = E2e::up("power_off_bmc_dead", |_| {}) else { return };
    let victim = t.busiest_non_master();
    power_off(&mut t, victim, &[Fault::BmcDead(victim)], watchdog_rule_lower(), watchdog_rule_upper());
    t.finish();
}

/// Case 3: no fence agent configured: the watchdog rule alone.
fn power_off_without_fencing_waits_for_the_watchdog_rule() {
    let Some(mut t) = E2e::up("power_off_no_fencing", |s| s.fencing = Fencing::Disabled) else { return };
    let victim = t.busiest_non_master();
    power_off(&mut t, victim, &[], watchdog_rule_lower(), watchdog_rule_upper());
    t.finish();
}

/// Case 4: the master loses power: a survivor becomes master, fences it
/// and restarts its domains.
fn master_power_off() {
    let Some(mut t) = E2e::up("master_power_off", |_| {}) else { return };
    let master = t.master();
    power_off(&mut t, master, &[], Duration::ZERO, fenced_bound());
    let survivors: Vec<u16> = (1..=HOSTS).filter(|h| *h != master).collect();
    for n in survivors {
        let new = poll_until(SETTLE_WAIT, || {
            t.lab().daemon_status(n).ok().and_then(|r| r.view.master).map(|m| m.0).filter(|m| *m != master)
        });
        assert!(new.is_some(), "h{n} names no master other than the dead h{master}");
    }
    t.finish();
}

/// Case 12: a domain's qemu is killed: the host restarts it itself
/// (libvirt reports the crash at once; first restart after at most
/// restart_backoff 1 s + a start 1 s + CI margin 5 s = 7 s).
fn killed_qemu_restarts_on_the_same_host() {
    let Some(mut t) = E2e::up("kill_qemu", |_| {}) else { return };
    let host = t.busiest_non_master();
    let domain = t.domains_on(host)[0].clone();
    let untouched: Vec<String> = t.before.keys().filter(|d| **d != domain).cloned().collect();
    let bound = std_duration(timings().restart_backoff) + START + CI_MARGIN;
    let t0 = t.fault(&Fault::KillQemu(host, domain.clone()));
    t.assert_recovered(std::slice::from_ref(&domain), t0, Duration::ZERO, bound, |h| h == host);
    t.assert_kept_running(&untouched);
    t.assert_s1();
    t.finish();
}

/// Case 13: a fenced host is powered on again: it rejoins (every daemon
/// sees it alive), runs none of the domains that moved, and they stay
/// where they are.
fn returning_host_rejoins_without_taking_back() {
    let Some(mut t) = E2e::up("returning_host", |_| {}) else { return };
    let victim = t.busiest_non_master();
    let moved = t.domains_on(victim);
    let t0 = power_off(&mut t, victim, &[], Duration::ZERO, fenced_bound());
    let after_failover = t.lab().placement();
    t.fault(&Fault::PowerOn(victim));
    // Rejoining: libvirtd and the daemon start (a few s), then heartbeats.
    t.settle(SETTLE_WAIT);
    for n in 1..=HOSTS {
        let status = t.lab().daemon_status(n).unwrap_or_else(|e| panic!("h{n}'s daemon: {e}"));
        let verdict = status.view.hosts.iter().find(|h| h.id.0 == victim).map(|h| h.verdict.clone());
        assert!(matches!(verdict.as_deref(), Some("alive" | "self")), "h{n} sees h{victim} as {verdict:?}");
    }
    // Give a wrong "take back" time to happen: a few heartbeat rounds.
    std::thread::sleep(CI_MARGIN);
    assert_eq!(t.lab().placement(), after_failover, "the domains moved after h{victim} returned");
    let seen = t.seen();
    let since = seen.offset(t0);
    for d in &moved {
        let intervals = seen.timeline.get(&seen.key(d).expect("seen")).cloned().unwrap_or_default();
        let back = intervals.iter().filter(|i| i.host == format!("h{victim}") && i.first_seen >= since);
        assert_eq!(back.count(), 0, "{d} ran on h{victim} again: {intervals:?}");
    }
    t.finish();
}

/// Case 5: a host freezes (every process SIGSTOPped) for 60 s. It is
/// silent on network and storage, so the survivors fence it through its
/// BMC, which works: the domains run again elsewhere within the fenced
/// bound, the host is really off (the confirmation was true), and when the
/// 60 s are over it runs none of its old domains (a resumed zombie would
/// break S1; S5 would have to destroy it).
fn paused_host_is_fenced_and_never_runs_its_domains_again() {
    let Some(mut t) = E2e::up("pause_60s", |_| {}) else { return };
    let victim = t.busiest_non_master();
    let stopped = t.domains_on(victim);
    let untouched = others(&t, victim);
    let t0 = t.fault(&Fault::Pause(victim));
    let recovered = t.assert_recovered(&stopped, t0, Duration::ZERO, fenced_bound(), |h| h != victim);
    assert!(fence_confirmed_on_storage(victim), "no fence confirmation of h{victim} on storage");
    // ipmi_sim reports "off" once the host's start command has exited,
    // which the power-off waits for: a confirmed host is off by now.
    let off = poll_until(POWER_SETTLE, || (!t.lab().host(victim).is_ok_and(|h| h.is_on())).then_some(()));
    assert!(off.is_some(), "h{victim} was confirmed fenced but is still on");
    std::thread::sleep(PAUSE.saturating_sub(t0.elapsed()));
    if t.lab().host(victim).is_ok_and(|h| h.is_on()) {
        t.fault(&Fault::Resume(victim));
    }
    // A few heartbeat rounds for anything wrong (a zombie, a take-back).
    std::thread::sleep(CI_MARGIN);
    let now_placement = t.lab().placement();
    for (d, (_, host)) in &recovered {
        assert_eq!(now_placement[d], vec![*host], "{d} after the pause");
    }
    t.assert_kept_running(&untouched);
    t.finish();
}

/// How long the pause of case 5 lasts (the 60 s: past every
/// timeout of the profile).
const PAUSE: Duration = Duration::from_secs(60);
/// A fenced host's processes are gone within this of the confirmation.
const POWER_SETTLE: Duration = Duration::from_secs(10);

/// Case 8: one host's storage hangs. It cannot write its slot, so it
/// self-fences after renew_timeout (S4): its qemu, stuck on the same hung
/// storage, cannot be killed, so its watchdog resets it; the survivors
/// restart its domains, at the latest by the watchdog rule. Then its
/// storage comes back.
fn hung_storage_self_fences_and_the_others_restart() {
    let Some(mut t) = E2e::up("storage_hang", |_| {}) else { return };
    let victim = t.busiest_non_master();
    let stopped = t.domains_on(victim);
    let untouched = others(&t, victim);
    let t0 = t.fault(&Fault::StorageHang(victim));
    let recovered = t.assert_recovered(&stopped, t0, Duration::ZERO, watchdog_rule_upper(), |h| h != victim);
    // S4: stopped on the victim by the watchdog. Its qemu sits in D state on
    // the hung datastore (its disk is there too), so neither libvirt's
    // destroy nor SIGKILL ends it; the daemon then stops petting, and the
    // lab watchdog powers the host off (its pending I/O is aborted): the
    // last pet comes at the latest at renew_timeout (8 s), the reset
    // watchdog_timeout (10 s) later, + CI margin (5 s) = 23 s after the
    // fault. (A real server's reset ends such a qemu the same way.)
    let tm = timings();
    let self_fence = std_duration(tm.renew_timeout) + std_duration(tm.watchdog_timeout) + CI_MARGIN;
    let seen = t.seen();
    let since = seen.offset(t0);
    for d in &stopped {
        let on_victim = seen.timeline[&seen.key(d).expect("seen")]
            .iter()
            .filter(|i| i.host == format!("h{victim}") && i.first_seen <= since)
            .filter_map(|i| i.stopped_seen)
            .next_back();
        let stop = on_victim.unwrap_or_else(|| panic!("{d} never stopped on h{victim}"));
        let took = stop.saturating_sub(since);
        println!("storage_hang: {d} stopped on h{victim} {:.2} s after the fault", took.as_secs_f64());
        assert!(took <= self_fence, "{d} stopped on h{victim} {took:?} after the fault, bound {self_fence:?}");
    }
    t.fault(&Fault::StorageOk(victim));
    t.settle(SETTLE_WAIT);
    let now_placement = t.lab().placement();
    for (d, (_, host)) in &recovered {
        assert_eq!(now_placement[d], vec![*host], "{d} after the storage came back");
    }
    t.assert_kept_running(&untouched);
    t.finish();
}

/// Case 7, poweroff: the isolated host powers off its domains after
/// isolation_timeout and releases their leases; the master restarts them
/// on the others. Never two at once (S1), and not before the isolation
/// response may fire: isolation_timeout (5 s) minus one network heartbeat
/// interval (0.5 s: the last heartbeat heard may precede the fault).
/// Upper: isolation_timeout (5 s) + the release on storage (one write
/// interval, 0.5 s) + the master reading it and the assignee reading its
/// assignment (two read intervals, 0.5 s) + a start (1 s) + CI margin
/// (5 s) = 12 s.
fn isolated_host_powers_off_and_the_others_restart() {
    let Some(mut t) = E2e::up("isolated_poweroff", |_| {}) else { return };
    let victim = t.busiest_non_master();
    let stopped = t.domains_on(victim);
    let untouched = others(&t, victim);
    for d in &stopped {
        let out = t.lab().havirt_on(victim, &["protect", d, "--isolation-response", "poweroff"]);
        out.unwrap_or_else(|e| panic!("protect {d} --isolation-response poweroff: {e}"));
    }
    let tm = timings();
    let isolation = std_duration(tm.isolation_timeout);
    let lower = isolation - std_duration(tm.net_heartbeat_interval);
    let read = std_duration(tm.storage_read_interval);
    let upper = isolation + std_duration(tm.storage_write_interval) + read + read + START + CI_MARGIN;
    let t0 = t.fault(&Fault::Isolate(victim));
    let recovered = t.assert_recovered(&stopped, t0, lower, upper, |h| h != victim);
    let isolated = poll_until(CI_MARGIN, || t.lab().daemon_status(victim).ok().filter(|r| r.view.isolated));
    assert!(isolated.is_some(), "h{victim} never said it was isolated");
    t.fault(&Fault::Heal);
    t.settle(SETTLE_WAIT);
    let now_placement = t.lab().placement();
    for (d, (_, host)) in &recovered {
        assert_eq!(now_placement[d], vec![*host], "{d} after the heal");
    }
    t.assert_kept_running(&untouched);
    t.finish();
}

/// This file's tests, for the harness (main.rs); `true`: ignored unless asked for.
pub fn tests() -> Vec<(&'static str, fn(), bool)> {
    vec![
        ("power_off_fenced_through_fence_ipmilan", power_off_fenced_through_fence_ipmilan, false),
        (
            "power_off_with_dead_bmc_waits_for_the_watchdog_rule",
            power_off_with_dead_bmc_waits_for_the_watchdog_rule,
            false,
        ),
        (
            "power_off_without_fencing_waits_for_the_watchdog_rule",
            power_off_without_fencing_waits_for_the_watchdog_rule,
            false,
        ),
        ("master_power_off", master_power_off, false),
        ("killed_qemu_restarts_on_the_same_host", killed_qemu_restarts_on_the_same_host, false),
        ("returning_host_rejoins_without_taking_back", returning_host_rejoins_without_taking_back, false),
        (
            "paused_host_is_fenced_and_never_runs_its_domains_again",
            paused_host_is_fenced_and_never_runs_its_domains_again,
            false,
        ),
        ("hung_storage_self_fences_and_the_others_restart", hung_storage_self_fences_and_the_others_restart, false),
        ("isolated_host_powers_off_and_the_others_restart", isolated_host_powers_off_and_the_others_restart, false),
    ]
}
