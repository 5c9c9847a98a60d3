//! Alerts from a real cluster to real webhook receivers: a power loss
//! gives exactly one "host fenced" and one "failover closed" alert per
//! cluster (not one per host), from the master, signed, with the timeline;
//! a second receiver that reads every request and never answers delays
//! nothing (the failover still meets the fenced bound).
//!
//! The receivers are sockets of this test process made on a thread that
//! entered the lab's BMC namespace (hl-bmc), on BMC 1's management
//! address: every host reaches it over the management network, and a
//! host's power loss does not take it down.

use crate::harness::{CI_MARGIN, E2e, fenced_bound, poll_until};
use havirt::alerts::deliver::verify;
use havirt::alerts::{Alert, AlertKind};
use havirt::lab::LAB_DIR;
use havirt::lab::cluster::Fault;
use havirt::lab::net::{BMC_NS, bmc_addr};
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex, mpsc};
use std::time::Duration;

const OK_PORT: u16 = 18_601;
const HANG_PORT: u16 = 18_602;
/// After the recovery, until the master has seen every domain running on
/// its survivor (the next slot reads) and sent: a few seconds, bounded.
const ALERTS_WAIT: Duration = Duration::from_secs(20);
/// A hanging receiver holds each connection this long (longer than the
/// sender's timeout, so every try times out).
const HANG_FOR: Duration = Duration::from_secs(30);

/// One request a receiver read: its headers (lower-case names) and body.
type Request = (BTreeMap<String, String>, Vec<u8>);

/// A webhook receiver in hl-bmc: answers 200, or (`hang`) never answers.
fn receiver(port: u16, hang: bool) -> Arc<Mutex<Vec<Request>>> {
    let got: Arc<Mutex<Vec<Request>>> = Arc::default();
    let seen = Arc::clone(&got);
    let (ready, bound) = mpsc::channel();
    std::thread::spawn(move || {
        let ns = std::fs::File::open(format!("/run/netns/{BMC_NS}")).expect("open the BMC netns");
        nix::sched::setns(ns, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
        let listener = TcpListener::bind((bmc_addr(1).as_str(), port)).expect("bind in hl-bmc");
        ready.send(()).expect("ready");
        for stream in listener.incoming().flatten() {
            let seen = Arc::clone(&seen);
            std::thread::spawn(move || serve(stream, hang, &seen));
        }
    });
    bound.recv_timeout(Duration::from_secs(5)).expect("the receiver bound its socket");
    got
}

fn serve(stream: TcpStream, hang: bool, seen: &Mutex<Vec<Request>>) {
    let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
    let mut reader = BufReader::new(stream.try_clone().expect("clone"));
    let mut headers = BTreeMap::new();
    let mut line = String::new();
    while reader.read_line(&mut line).unwrap_or(0) > 0 && !line.trim().is_empty() {
        if let Some((k, v)) = line.split_once(':') {
            headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
        }
        line.clear();
    }
    let len: usize = headers.get("content-length").and_then(|l| l.parse().ok()).unwrap_or(0);
    let mut body = vec![0; len];
    if reader.read_exact(&mut body).is_err() {
        return;
    }
    seen.lock().expect("lock").push((headers, body));
    if hang {
        std::thread::sleep(HANG_FOR);
    } else {
        let mut stream = stream;
        let _ = stream.write_all(b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
    }
}

fn alerts_of(got: &Mutex<Vec<Request>>, key: &[u8]) -> Vec<Alert> {
    let requests = got.lock().expect("lock").clone();
    requests
        .iter()
        .map(|(headers, body)| {
            let sig = headers.get("x-havirt-signature").expect("a signature header");
            assert!(verify(key, body, sig), "the signature of {} does not verify", String::from_utf8_lossy(body));
            serde_json::from_slice(body).unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(body)))
        })
        .collect()
}

fn count(alerts: &[Alert], kind: AlertKind) -> usize {
    alerts.iter().filter(|a| a.kind == kind).count()
}

/// Case 19: a fenced power-off of a non-master, with two receivers.
fn a_power_loss_alerts_once_per_cluster_and_a_hanging_receiver_delays_nothing() {
    let extra = format!(
        "[[alert]]\nkind = \"webhook\"\nname = \"receiver\"\nurl = \"http://{a}:{OK_PORT}/havirt\"\n\n\
         [[alert]]\nkind = \"webhook\"\nname = \"hangs\"\nurl = \"http://{a}:{HANG_PORT}/havirt\"\n\
         timeout_ms = 2000\nattempts = 2\n",
        a = bmc_addr(1)
    );
    let Some(mut t) = E2e::up("alerts_power_off", |s| s.extra_config = extra) else { return };
    let ok = receiver(OK_PORT, false);
    let hang = receiver(HANG_PORT, true);
    let key = std::fs::read(format!("{LAB_DIR}/cluster.key")).expect("the lab's cluster key");
    let (master, victim) = (t.master(), t.busiest_non_master());
    let stopped = t.domains_on(victim);
    let t0 = t.fault(&Fault::PowerOff(victim));
    t.assert_recovered(&stopped, t0, Duration::ZERO, fenced_bound(), |h| h != victim);
    let recovered_after = t0.elapsed();
    let wanted = |a: &[Alert]| count(a, AlertKind::HostFenced) >= 1 && count(a, AlertKind::FailoverClosed) >= 1;
    let arrived = poll_until(ALERTS_WAIT, || wanted(&alerts_of(&ok, &key)).then_some(()));
    // Time for a duplicate from another host, or a second send, to show.
    std::thread::sleep(CI_MARGIN);
    let alerts = alerts_of(&ok, &key);
    for a in &alerts {
        println!("alert from {}: {} {}: {}", a.sender, a.kind.name(), a.id, a.text);
    }
    assert!(
        arrived.is_some(),
        "no host_fenced and failover_closed within {ALERTS_WAIT:?} of the recovery: {alerts:#?}"
    );
    let (victim_name, master_name) = (format!("h{victim}"), format!("h{master}"));
    for kind in [AlertKind::HostFenced, AlertKind::FailoverOpened, AlertKind::FailoverClosed] {
        let of_kind: Vec<&Alert> = alerts.iter().filter(|a| a.kind == kind).collect();
        assert_eq!(of_kind.len(), 1, "exactly one {} per cluster: {of_kind:#?}", kind.name());
        let a = of_kind[0];
        assert_eq!(
            (a.host.as_str(), a.sender.as_str(), a.cluster.as_str()),
            (victim_name.as_str(), master_name.as_str(), "lab")
        );
    }
    let closed = alerts.iter().find(|a| a.kind == AlertKind::FailoverClosed).expect("closed");
    let timeline = closed.timeline.as_deref().unwrap_or_default();
    assert!(timeline.contains(&format!("FAILOVER of {victim_name}")), "{timeline}");
    let record = closed.failover.as_ref().expect("the failover record");
    let mut moved: Vec<&str> = record.domains.iter().map(|d| d.name.as_str()).collect();
    moved.sort_unstable();
    assert_eq!(moved, stopped.iter().map(String::as_str).collect::<Vec<_>>(), "the timeline names every moved domain");
    assert!(record.domains.iter().all(|d| d.running_ms.is_some()), "{record:#?}");
    let ids: std::collections::BTreeSet<&str> = alerts.iter().map(|a| a.id.as_str()).collect();
    assert_eq!(ids.len(), alerts.len(), "no alert was sent twice");
    let hung = hang.lock().expect("lock").len();
    assert!(hung >= 1, "the hanging receiver was tried");
    println!(
        "alerts_power_off: recovered {recovered_after:?} after the power-off (bound {:?}); the hanging receiver got {hung} request(s)",
        fenced_bound()
    );
    t.assert_s1();
    t.finish();
}

/// This file's tests, for the harness (main.rs); `true`: ignored unless asked for.
pub fn tests() -> Vec<(&'static str, fn(), bool)> {
    vec![(
        "a_power_loss_alerts_once_per_cluster_and_a_hanging_receiver_delays_nothing",
        a_power_loss_alerts_once_per_cluster_and_a_hanging_receiver_delays_nothing,
        false,
    )]
}
