//! Faults that stop protected domains: each stopped domain must run again
//! within its bound (and, under the watchdog rule, not before it), on a
//! host allowed to run it, and S1 must hold throughout.

use crate::harness::{
    CI_MARGIN, E2e, HOSTS, START, fenced_bound, poll_until, std_duration, timings, watchdog_rule_lower,
    watchdog_rule_upper,
};
use havirt::lab::LAB_DIR;
use havirt::lab::cluster::{Fault, Fencing, SETTLE_WAIT};
use std::path::Path;
use std::time::{Duration, Instant};

/// The other domains: those not on `host` when the lab settled.
fn others(t: &E2e, host: u16) -> Vec<String> {
    t.before.keys().filter(|d| !t.before[*d].contains(&host)).cloned().collect()
}

/// Whether storage holds a fence confirmation of `host` (S3(a) evidence),
/// read from the datastore's backing directory (past faultfs).
fn fence_confirmed_on_storage(host: u16) -> bool {
    Path::new(LAB_DIR).join(format!("backing/cluster/fenced/{host}")).exists()
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
#[test]
fn power_off_fenced_through_fence_ipmilan() {
    let Some(mut t) = E2e::up("power_off_fenced", |_| {}) else { return };
    let victim = t.busiest_non_master();
    power_off(&mut t, victim, &[], Duration::ZERO, fenced_bound());
    assert!(fence_confirmed_on_storage(victim), "no fence confirmation of h{victim} on storage");
    t.finish();
}

/// Case 2: the host's BMC dies, then the host loses power: fencing fails,
/// and only the watchdog rule (S3(b)) may free its leases, not before
/// host_dead_timeout.
#[test]
fn power_off_with_dead_bmc_waits_for_the_watchdog_rule() {
    let Some(mut t) = E2e::up("power_off_bmc_dead", |_| {}) else { return };
    let victim = t.busiest_non_master();
    power_off(&mut t, victim, &[Fault::BmcDead(victim)], watchdog_rule_lower(), watchdog_rule_upper());
    t.finish();
}

/// Case 3: no fence agent configured: the watchdog rule alone.
#[test]
fn power_off_without_fencing_waits_for_the_watchdog_rule() {
    let Some(mut t) = E2e::up("power_off_no_fencing", |s| s.fencing = Fencing::Disabled) else { return };
    let victim = t.busiest_non_master();
    power_off(&mut t, victim, &[], watchdog_rule_lower(), watchdog_rule_upper());
    t.finish();
}

/// Case 4: the master loses power: a survivor becomes master, fences it
/// and restarts its domains.
#[test]
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
#[test]
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
#[test]
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
