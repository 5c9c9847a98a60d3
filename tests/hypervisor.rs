//! The hypervisor adapter from outside the crate.
//!
//! - Through the public API on `test:///default` (in-process, always runs).
//! - Against a real libvirtd and qemu (`qemu:///system`): starts `virtlogd`
//!   and `libvirtd` itself when none answers (and stops what it started),
//!   runs one tiny domain (64 MiB, no OS: it idles in SeaBIOS; KVM when
//!   /dev/kvm exists, TCG otherwise) through define, policy, start, events,
//!   guest-agent ping, destroy, and the S4 kill of its qemu while libvirtd is
//!   frozen. It skips, saying why, when not root or when libvirt or qemu is
//!   missing or libvirtd cannot start; the whole run is bounded by
//!   `REAL_TEST_MAX_S` so it cannot hang CI.

mod common;

use common::libvirtd::*;
use havirt::engine::config::{DomainId, DomainPolicy, HostId, IsolationResponse, Priority, Readiness};
use havirt::engine::io::DomainEvent;
use havirt::engine::time::Duration as EngineDuration;
use havirt::hypervisor::{
    CloseReason, EventStream, Hypervisor, HypervisorError, HypervisorEvent, LibvirtHypervisor, LibvirtOptions,
    POLICY_NS, PowerState, uuid_string,
};
use std::path::Path;
use std::sync::mpsc;
use std::thread;
use std::time::Duration;

/// The real-libvirtd test fails (never hangs) after this many seconds.
const REAL_TEST_MAX_S: u64 = 180;
/// One lifecycle event must arrive within this.
const EVENT_WAIT_S: u64 = 30;
/// S4: killing qemu with libvirtd frozen must take less than this.
const KILL_MAX_MS: u128 = 3000;

const REAL_NAME: &str = "havirt-it-tiny";
const REAL_ID: DomainId = DomainId(0x5ca1ab1e_0000_4000_8000_00000000e2e0);

fn policy() -> DomainPolicy {
    DomainPolicy {
        priority: Priority::Highest,
        isolation_response: IsolationResponse::Poweroff,
        affinity: vec![HostId(1), HostId(3)],
        anti_affinity: Some("web".into()),
        readiness: Readiness::GuestAgent,
        readiness_timeout: EngineDuration::from_secs(30),
        max_restarts: 2,
        ..DomainPolicy::default()
    }
}

/// The next lifecycle event about `id`, skipping other domains' and
/// (re)definitions (a metadata change redefines).
fn next_lifecycle(events: &EventStream, id: DomainId) -> Option<HypervisorEvent> {
    for _ in 0..1000 {
        match next_event(events, id)? {
            HypervisorEvent::Defined { .. } | HypervisorEvent::Undefined { .. } => {}
            ev => return Some(ev),
        }
    }
    None
}

/// The next event about `id`, skipping other domains'.
fn next_event(events: &EventStream, id: DomainId) -> Option<HypervisorEvent> {
    // Bounded by the number of events examined as well as by time.
    for _ in 0..1000 {
        match events.recv_timeout(Duration::from_secs(EVENT_WAIT_S))? {
            HypervisorEvent::Domain { domain, .. }
            | HypervisorEvent::Defined { domain }
            | HypervisorEvent::Undefined { domain }
                if domain != id => {}
            ev => return Some(ev),
        }
    }
    None
}

#[test]
fn public_api_on_the_test_driver() {
    let hv: Box<dyn Hypervisor> =
        Box::new(LibvirtHypervisor::open(LibvirtOptions::new("test:///default")).expect("open test:///default"));
    let test = hv.list().expect("list").into_iter().find(|d| d.name == "test").expect("the test domain");
    assert_eq!(test.state, PowerState::Running);

    let concrete = LibvirtHypervisor::open(LibvirtOptions::new("test:///default")).expect("open");
    let events = concrete.events().expect("subscribe");
    let id = DomainId(0xb1);
    let xml = format!(
        "<domain type='test'><name>havirt-it-test-driver</name><uuid>{}</uuid>\
         <memory unit='MiB'>64</memory><vcpu>1</vcpu><os><type>hvm</type></os></domain>",
        uuid_string(id)
    );
    assert_eq!(hv.define(&xml), Ok(id));
    assert_eq!(next_event(&events, id), Some(HypervisorEvent::Defined { domain: id }));
    hv.set_policy(id, &policy()).expect("set policy");
    assert_eq!(hv.policy(id), Ok(Some(policy())));
    hv.start(id).expect("start");
    assert_eq!(next_lifecycle(&events, id), Some(HypervisorEvent::Domain { domain: id, event: DomainEvent::Started }));
    hv.destroy(id).expect("destroy");
    assert_eq!(
        next_lifecycle(&events, id),
        Some(HypervisorEvent::Domain { domain: id, event: DomainEvent::Destroyed })
    );
}

// ---------------------------------------------------------------------------
// Real libvirtd.

#[test]
fn real_libvirtd_tiny_domain() {
    let (tx, rx) = mpsc::channel();
    let worker = thread::spawn(move || {
        let result = std::panic::catch_unwind(real_libvirtd_body);
        let _ = tx.send(());
        if let Err(panic) = result {
            std::panic::resume_unwind(panic);
        }
    });
    match rx.recv_timeout(Duration::from_secs(REAL_TEST_MAX_S)) {
        Ok(()) => worker.join().expect("the real-libvirtd test failed (see above)"),
        Err(_) => panic!("the real-libvirtd test did not finish in {REAL_TEST_MAX_S} s"),
    }
}

fn skip(why: &str) {
    println!("SKIPPED real_libvirtd_tiny_domain: {why}");
}

fn real_libvirtd_body() {
    // The effective uid, from /proc/self/status.
    if let Some(why) = unavailable() {
        return skip(&why);
    }
    let daemons = match Daemons::ensure() {
        Ok(d) => d,
        Err(why) => return skip(&why),
    };
    // The daemons are only read and stopped after a panic: nothing is left
    // half-updated for the cleanup below.
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run_tiny_domain(&daemons)));
    daemons.stop_what_we_started();
    if let Err(panic) = result {
        std::panic::resume_unwind(panic);
    }
}

fn run_tiny_domain(daemons: &Daemons) {
    remove_domain(REAL_ID);
    let hv = LibvirtHypervisor::open(LibvirtOptions::new(REAL_URI)).expect("open qemu:///system");
    let events = hv.events().expect("subscribe");
    assert!(events.reports_close(), "libvirtd supports the close callback");
    let id = REAL_ID;
    let domain = |event| Some(HypervisorEvent::Domain { domain: id, event });

    assert_eq!(hv.define(&tiny_domain_xml(REAL_NAME, REAL_ID)), Ok(id));
    assert_eq!(next_event(&events, id), Some(HypervisorEvent::Defined { domain: id }));
    hv.set_autostart(id, false).expect("autostart off");
    hv.set_policy(id, &policy()).expect("set policy");
    assert_eq!(hv.policy(id), Ok(Some(policy())));
    let xml = hv.xml(id).expect("xml");
    assert!(xml.contains(POLICY_NS) && xml.contains("<havirt:affinity host=\"h3\"/>"), "{xml}");

    hv.start(id).expect("start");
    assert_eq!(next_lifecycle(&events, id), domain(DomainEvent::Started));
    let info = hv.list().expect("list").into_iter().find(|d| d.id == id).expect("listed");
    assert_eq!(info.state, PowerState::Running);
    assert_eq!(info.policy, Ok(Some(policy())));
    assert!(!info.autostart);
    let pid = info.qemu_pid.expect("qemu pid from libvirt's pidfile");
    assert!(matches!(hv.start(id), Err(HypervisorError::AlreadyRunning(_))));
    // No OS, so no agent: "not answering", promptly, not an error.
    assert_eq!(hv.ping_guest_agent(id), Ok(false));
    // Running policy change reaches the live definition too.
    let mut changed = policy();
    changed.priority = Priority::Low;
    hv.set_policy(id, &changed).expect("set policy while running");
    assert_eq!(hv.policy(id), Ok(Some(changed)));

    hv.destroy(id).expect("destroy");
    assert_eq!(next_lifecycle(&events, id), domain(DomainEvent::Destroyed));
    assert!(!Path::new(&format!("/proc/{pid}")).exists() || !is_live(pid), "qemu {pid} gone after destroy");

    // S4: libvirtd frozen (only one this test started), qemu killed directly.
    hv.start(id).expect("start again");
    assert_eq!(next_lifecycle(&events, id), domain(DomainEvent::Started));
    let pid = hv.list().expect("list").into_iter().find(|d| d.id == id).and_then(|d| d.qemu_pid).expect("pid");
    let ours = daemons.started_libvirtd.get();
    if let Some(libvirtd) = ours {
        signal(libvirtd, "-STOP");
    }
    #[allow(clippy::disallowed_methods)] // measures a real kill for the test's bound
    let t0 = std::time::Instant::now();
    let killed = hv.kill_qemu(id);
    let took = t0.elapsed().as_millis();
    if let Some(libvirtd) = ours {
        signal(libvirtd, "-CONT");
    }
    assert_eq!(killed, Ok(vec![pid]));
    assert!(took < KILL_MAX_MS, "kill_qemu took {took} ms");
    assert_eq!(next_lifecycle(&events, id), domain(DomainEvent::Crashed), "qemu died on its own, for libvirt");
    assert_eq!(hv.kill_qemu(id), Ok(vec![]), "nothing left to kill");

    // A graceful shutdown is only a request: a guest with no OS ignores it.
    hv.start(id).expect("start for shutdown");
    assert_eq!(next_lifecycle(&events, id), domain(DomainEvent::Started));
    hv.shutdown(id).expect("shutdown request");
    hv.destroy(id).expect("destroy after the caller's timeout");
    assert_eq!(next_lifecycle(&events, id), domain(DomainEvent::Destroyed));
    remove_domain(REAL_ID);

    // The close callback: a libvirtd that exits is reported (ours only).
    if let Some(libvirtd) = daemons.started_libvirtd.take() {
        signal(libvirtd, "-TERM");
        let closed = (0..1000).find_map(|_| match events.recv_timeout(Duration::from_secs(EVENT_WAIT_S)) {
            None => Some(None),
            Some(HypervisorEvent::ConnectionClosed { reason }) => Some(Some(reason)),
            Some(_) => None,
        });
        assert_eq!(closed, Some(Some(CloseReason::Eof)), "libvirtd exited");
        assert!(!hv.is_alive());
    }
    println!(
        "real libvirtd: tiny domain ok; daemons {}; kill_qemu took {took} ms",
        if ours.is_some() { "started by this test (libvirtd frozen during the kill)" } else { "already running" }
    );
}

/// A zombie or a vanished process is not live.
fn is_live(pid: u32) -> bool {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let state = stat.rsplit(')').next().and_then(|rest| rest.split_whitespace().next());
    !matches!(state, None | Some("Z") | Some("X"))
}
