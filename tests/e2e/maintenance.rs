//! Maintenance mode in the lab: `havirt maintenance enter` drains a host by
//! real libvirt live migration (peer to peer over qemu+tcp, disks on the
//! shared datastore), and `exit` brings it back.

use crate::harness::{E2e, HOSTS, poll_until};
use havirt::lab::cluster::SETTLE_WAIT;
use std::time::Duration;

/// A live migration of a tiny idle domain pauses it for milliseconds; the
/// handoff adds one lease CAS on the source, one renew CAS on the target
/// and a resume, each a few ms on the lab datastore. The observer samples
/// every 100 ms and lists hosts one after the other, so a downtime shows
/// as up to ~3 samples. Bound: 1.5 s, far below any cold restart (a
/// failover restart in the lab takes 2.4 s at best).
const MAX_DOWNTIME: Duration = Duration::from_millis(1500);

/// Case: enter maintenance on the busiest host that is not the master.
/// Every protected domain leaves it by live migration, one at a time, each
/// down only for the migration's switchover and the lease handoff, never
/// on two hosts; the other domains are not touched; the host shows the
/// maintenance flag in every daemon's view. `exit` clears it.
fn maintenance_drains_by_live_migration_and_exit_brings_the_host_back() {
    let Some(t) = E2e::up("maintenance_drains_by_live_migration_and_exit_brings_the_host_back", |_| {}) else {
        return;
    };
    let victim = t.busiest_non_master();
    let moving = t.domains_on(victim);
    let staying: Vec<String> = t.before.keys().filter(|d| !moving.contains(d)).cloned().collect();
    let name = format!("h{victim}");
    println!("maintenance enter {name}: {moving:?} must move");
    let out = t
        .lab()
        .havirt_on(victim, &["maintenance", "enter", &name])
        .unwrap_or_else(|e| panic!("havirt maintenance enter {name} failed: {e}"));
    println!("{out}");
    assert!(out.contains("drained"), "maintenance enter did not report the drain: {out}");

    // Every moved domain runs on exactly one other host now.
    let placement = t.lab().placement();
    for d in &moving {
        let hosts = &placement[d];
        assert_eq!(hosts.len(), 1, "{d} runs on {hosts:?} after the drain");
        assert_ne!(hosts[0], victim, "{d} still runs on {name} after the drain");
    }
    // Downtime: the observer's gaps of each moved domain.
    let seen = t.seen();
    for d in &moving {
        let gaps = seen.gaps(d);
        assert_eq!(gaps.len(), 1, "{d}: expected one switchover, gaps {gaps:?}");
        let g = &gaps[0];
        let again = g.running_again_at.unwrap_or_else(|| panic!("{d} did not run again: {g:?}"));
        let down = again.saturating_sub(g.last_running_at);
        println!(
            "DOWNTIME {d}: {:.3} s ({:?} -> {:?}), bound {MAX_DOWNTIME:?}",
            down.as_secs_f64(),
            g.hosts_before,
            g.hosts_after
        );
        assert!(down <= MAX_DOWNTIME, "{d} was down {down:?} during its migration (bound {MAX_DOWNTIME:?})");
    }
    t.assert_kept_running(&staying);
    for d in &staying {
        assert_eq!(placement[d], t.before[d], "{d} moved though its host stayed in service");
    }
    // Every daemon sees the flag (it travels in the host's slot).
    let flagged = poll_until(SETTLE_WAIT, || {
        let all = (1..=HOSTS).all(|n| {
            t.lab().daemon_status(n).is_ok_and(|r| r.view.hosts.iter().any(|h| h.id.0 == victim && h.maintenance))
        });
        all.then_some(())
    });
    assert!(flagged.is_some(), "not every daemon shows {name} in maintenance");
    let status = t.lab().havirt_on(victim, &["status"]).expect("havirt status");
    assert!(status.contains("maintenance"), "havirt status does not show maintenance:\n{status}");

    // Entering again is harmless and says it is drained.
    let again = t.lab().havirt_on(victim, &["maintenance", "enter"]).expect("maintenance enter again");
    assert!(again.contains("drained"), "second enter: {again}");

    let out = t.lab().havirt_on(victim, &["maintenance", "exit", &name]).expect("maintenance exit");
    println!("{out}");
    let cleared = poll_until(SETTLE_WAIT, || {
        let all = (1..=HOSTS).all(|n| {
            t.lab().daemon_status(n).is_ok_and(|r| r.view.hosts.iter().any(|h| h.id.0 == victim && !h.maintenance))
        });
        all.then_some(())
    });
    assert!(cleared.is_some(), "{name} still shows maintenance after exit");
    // Nothing moved back or elsewhere by itself afterwards.
    std::thread::sleep(Duration::from_secs(3));
    let after = t.lab().placement();
    assert_eq!(after, placement, "domains moved after maintenance exit");
    t.finish();
}

/// Case: `maintenance enter` names another host: refused, nothing moves.
fn maintenance_enter_of_another_host_is_refused() {
    let Some(t) = E2e::up("maintenance_enter_of_another_host_is_refused", |_| {}) else {
        return;
    };
    let err = t.lab().havirt_on(1, &["maintenance", "enter", "h2"]).expect_err("enter h2 on h1 must fail");
    let text = err.to_string();
    println!("refused: {text}");
    assert!(text.contains("run `havirt maintenance enter h2` on h2"), "unclear refusal: {text}");
    t.assert_undisturbed();
    t.finish();
}

/// This file's tests, for the harness (main.rs); `true`: ignored unless asked for.
pub fn tests() -> Vec<(&'static str, fn(), bool)> {
    vec![
        (
            "maintenance_drains_by_live_migration_and_exit_brings_the_host_back",
            maintenance_drains_by_live_migration_and_exit_brings_the_host_back,
            false,
        ),
        ("maintenance_enter_of_another_host_is_refused", maintenance_enter_of_another_host_is_refused, false),
    ]
}
