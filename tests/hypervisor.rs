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

use havirt::engine::config::{DomainId, DomainPolicy, HostId, IsolationResponse, Priority, Readiness};
use havirt::engine::io::DomainEvent;
use havirt::engine::time::Duration as EngineDuration;
use havirt::hypervisor::{
    CloseReason, EventStream, Hypervisor, HypervisorError, HypervisorEvent, LibvirtHypervisor, LibvirtOptions,
    POLICY_NS, PowerState, uuid_string,
};
use std::cell::Cell;
use std::path::Path;
use std::process::Command;
use std::sync::mpsc;
use std::thread;
use std::time::Duration;

/// The real-libvirtd test fails (never hangs) after this many seconds.
const REAL_TEST_MAX_S: u64 = 180;
/// One lifecycle event must arrive within this.
const EVENT_WAIT_S: u64 = 30;
/// libvirtd must answer within this after `libvirtd -d`.
const LIBVIRTD_START_WAIT_MS: u64 = 15_000;
const LIBVIRTD_POLL_MS: u64 = 100;
/// S4: killing qemu with libvirtd frozen must take less than this.
const KILL_MAX_MS: u128 = 3000;

const REAL_URI: &str = "qemu:///system";
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
    assert_eq!(next_lifecycle(&events, id), Some(HypervisorEvent::Domain { domain: id, event: DomainEvent::Stopped }));
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
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let euid = status.lines().find_map(|l| l.strip_prefix("Uid:")).and_then(|l| l.split_whitespace().nth(1));
    if euid != Some("0") {
        return skip("needs root (qemu:///system)");
    }
    for tool in ["libvirtd", "virtlogd", "qemu-system-x86_64", "kill"] {
        if which(tool).is_none() {
            return skip(&format!("{tool} is not installed (see LAB-NOTES.md, or .ci/run)"));
        }
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

fn which(tool: &str) -> Option<std::path::PathBuf> {
    let path = std::env::var("PATH").unwrap_or_default();
    let dirs = path.split(':').chain(["/usr/sbin", "/sbin", "/usr/bin"]);
    dirs.map(|d| Path::new(d).join(tool)).find(|p| p.is_file())
}

/// The libvirt daemons, and which of them this test started.
struct Daemons {
    /// Taken when stopped, so a pid is never signalled after it may be reused.
    started_libvirtd: Cell<Option<u32>>,
    started_virtlogd: Cell<Option<u32>>,
}

impl Daemons {
    fn ensure() -> Result<Daemons, String> {
        if let Ok(hv) = LibvirtHypervisor::open(LibvirtOptions::new(REAL_URI)) {
            drop(hv);
            return Ok(Daemons { started_libvirtd: Cell::new(None), started_virtlogd: Cell::new(None) });
        }
        let d = Daemons { started_libvirtd: Cell::new(None), started_virtlogd: Cell::new(None) };
        // virtlogd -d fails harmlessly when one already runs (pidfile lock).
        if run_ok("virtlogd", &["-d"]) {
            d.started_virtlogd.set(read_pid("/run/virtlogd.pid"));
        }
        if !run_ok("libvirtd", &["-d"]) {
            d.stop_what_we_started();
            return Err("libvirtd -d failed to start".into());
        }
        d.started_libvirtd.set(read_pid("/run/libvirtd.pid"));
        for _ in 0..LIBVIRTD_START_WAIT_MS / LIBVIRTD_POLL_MS {
            if LibvirtHypervisor::open(LibvirtOptions::new(REAL_URI)).is_ok() {
                return Ok(d);
            }
            thread::sleep(Duration::from_millis(LIBVIRTD_POLL_MS));
        }
        d.stop_what_we_started();
        Err(format!("libvirtd did not answer on {REAL_URI} within {LIBVIRTD_START_WAIT_MS} ms"))
    }

    fn stop_what_we_started(&self) {
        for pid in [self.started_libvirtd.take(), self.started_virtlogd.take()].into_iter().flatten() {
            signal(pid, "-TERM");
        }
    }
}

/// Runs a daemon by its resolved path: root's PATH may lack /usr/sbin.
fn run_ok(cmd: &str, args: &[&str]) -> bool {
    let Some(path) = which(cmd) else {
        return false;
    };
    Command::new(path).args(args).status().is_ok_and(|s| s.success())
}

fn read_pid(path: &str) -> Option<u32> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// Through kill(1): no unsafe code in tests.
fn signal(pid: u32, sig: &str) {
    let kill = which("kill").unwrap_or_else(|| "kill".into());
    let _ = Command::new(kill).args([sig, &pid.to_string()]).status();
}

fn tiny_domain_xml() -> String {
    // KVM when the device exists, TCG otherwise (LAB-NOTES.md).
    let kind = if Path::new("/dev/kvm").exists() { "kvm" } else { "qemu" };
    format!(
        "<domain type='{kind}'>
  <name>{REAL_NAME}</name>
  <uuid>{}</uuid>
  <memory unit='MiB'>64</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type></os>
  <devices>
    <serial type='pty'/>
    <channel type='unix'><target type='virtio' name='org.qemu.guest_agent.0'/></channel>
    <memballoon model='none'/>
  </devices>
</domain>",
        uuid_string(REAL_ID)
    )
}

/// Removes a leftover of an interrupted earlier run.
fn remove_leftover() {
    let Ok(mut conn) = virt::connect::Connect::open(Some(REAL_URI)) else {
        return;
    };
    if let Ok(dom) = virt::domain::Domain::lookup_by_uuid_string(&conn, &uuid_string(REAL_ID)) {
        let _ = dom.destroy();
        let _ = dom.undefine();
    }
    let _ = conn.close();
}

fn run_tiny_domain(daemons: &Daemons) {
    remove_leftover();
    let hv = LibvirtHypervisor::open(LibvirtOptions::new(REAL_URI)).expect("open qemu:///system");
    let events = hv.events().expect("subscribe");
    assert!(events.reports_close(), "libvirtd supports the close callback");
    let id = REAL_ID;
    let domain = |event| Some(HypervisorEvent::Domain { domain: id, event });

    assert_eq!(hv.define(&tiny_domain_xml()), Ok(id));
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
    assert_eq!(next_lifecycle(&events, id), domain(DomainEvent::Stopped));
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
    assert_eq!(next_lifecycle(&events, id), domain(DomainEvent::Stopped));
    remove_leftover();

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
