//! `havirt lab demo`: a lab comes up, one host loses power through its
//! BMC, and the failover is shown as it happens: the survivors' daemon
//! events and, from an outside observer, where each domain runs again and
//! after how long. Then the host comes back (nothing runs twice) and the
//! lab is removed.

use super::cluster::{Fault, Lab, LabSpec, SETTLE_WAIT};
use super::observer::{self, DEFAULT_INTERVAL, Observer};
use super::sys::LabError;
use crate::control::{self, Request, Response};
use std::collections::BTreeMap;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// The demo gives up waiting for the failover after this.
pub const FAILOVER_WAIT: Duration = Duration::from_secs(120);
const POLL: Duration = Duration::from_millis(100);

#[allow(clippy::disallowed_methods, reason = "the demo measures wall time")]
fn now() -> (Instant, u64) {
    let wall = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis());
    (Instant::now(), u64::try_from(wall).unwrap_or(u64::MAX))
}

fn secs(d: Duration) -> String {
    format!("{:>6.2} s", d.as_secs_f64())
}

pub fn run(spec: LabSpec) -> Result<(), LabError> {
    println!(
        "== lab up: {} hosts, {} domains, fencing {:?}, profile {}, datastore {}",
        spec.hosts, spec.domains, spec.fencing, spec.profile, spec.datastore
    );
    let mut lab = Lab::up(spec)?;
    println!("\n{}", lab.status_text());
    let observer = Observer::start(lab.observer_hosts(), DEFAULT_INTERVAL)
        .map_err(|e| LabError::State { what: format!("observer: {e}") })?;
    // The victim: the host running the most domains that is not the master
    // (any host would do; this shows fencing rather than a master change).
    let placement = lab.placement();
    let victim = lab.busiest_host(&placement);
    let moving: Vec<String> = placement.iter().filter(|(_, on)| on.contains(&victim)).map(|(d, _)| d.clone()).collect();
    let witness = (1..=lab.spec().hosts).find(|h| *h != victim).unwrap_or(1);
    let mut seen_events = lab_events_after(witness, 0).last().map_or(0, |e| e.seq);

    println!("== h{victim} runs {}; powering it off through its BMC (ipmitool chassis power off)", moving.join(", "));
    println!("   timeline (from the fault; events as h{witness}'s daemon logged them, placement from libvirt):");
    let (t0, t0_wall) = now();
    lab.fault(&Fault::PowerOff(victim))?;
    println!("{}  h{victim} is off", secs(t0.elapsed()));
    let mut placed: BTreeMap<String, u16> = BTreeMap::new();
    while placed.len() < moving.len() && t0.elapsed() < FAILOVER_WAIT {
        for e in lab_events_after(witness, seen_events) {
            seen_events = e.seq;
            let at = Duration::from_millis(e.unix_ms.saturating_sub(t0_wall));
            println!("{}  [h{witness} {}] {}", secs(at), e.event.role, e.event.text);
        }
        for (domain, on) in lab.placement() {
            if moving.contains(&domain)
                && !placed.contains_key(&domain)
                && let [h] = on.as_slice()
                && *h != victim
            {
                println!("{}  {domain} running on h{h}", secs(t0.elapsed()));
                placed.insert(domain, *h);
            }
        }
        std::thread::sleep(POLL);
    }
    let seen = observer.snapshot();
    println!(
        "\n== recovery (fault → running again, measured by the observer every {} ms)",
        DEFAULT_INTERVAL.as_millis()
    );
    println!("domain   priority  from  to    recovery");
    for domain in &moving {
        let prio = lab.domains().iter().find(|d| &d.name == domain).map_or("-", |d| d.priority);
        let to = placed.get(domain).map_or("-".to_string(), |h| format!("h{h}"));
        let took = seen.recovery_after(domain, t0).map_or("not yet".to_string(), secs);
        println!("{domain:<8} {prio:<9} h{victim:<4} {to:<5} {took}");
    }
    println!("\n== h{victim} powered on again through its BMC: it rejoins empty, nothing runs twice");
    lab.fault(&Fault::PowerOn(victim))?;
    lab.wait_settled(SETTLE_WAIT)?;
    let seen = observer.stop();
    let refusals = observer::lock_refusals(&observer::lab_qemu_logs(std::path::Path::new(super::LAB_DIR)))
        .map_err(|e| LabError::State { what: e.to_string() })?;
    println!("{}", lab.status_text());
    println!(
        "S1 (a domain on two hosts at once): {} seen in {} samples; qemu image-lock refusals: {}",
        seen.s1_violations.len(),
        seen.samples.len(),
        refusals.len()
    );
    let missing: Vec<&String> = moving.iter().filter(|d| !placed.contains_key(*d)).collect();
    let report = lab.down()?;
    println!(
        "== lab down: {} processes, {} mounts, {} namespaces removed",
        report.killed.len(),
        report.unmounted.len(),
        report.netns.len()
    );
    if !missing.is_empty() || !seen.s1_violations.is_empty() || !refusals.is_empty() {
        return Err(LabError::State {
            what: format!(
                "the demo failed: not recovered {missing:?}, double runs {:?}, lock refusals {refusals:?}",
                seen.s1_violations
            ),
        });
    }
    Ok(())
}

/// Host N's daemon's events after `after` (none when it does not answer).
fn lab_events_after(n: u16, after: u64) -> Vec<control::EventRecord> {
    match control::request(&super::cluster::control_socket(n), &Request::Events { after }, Duration::from_secs(2)) {
        Ok(Response::Events(events)) => events,
        _ => Vec::new(),
    }
}
