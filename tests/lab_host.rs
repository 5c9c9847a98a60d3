//! The lab's hosts and networks (src/lab/host.rs, net.rs, down.rs) on this
//! machine: real namespaces, libvirtd and qemu.
//!
//! Root only (CI runs as root); each test prints SKIPPED with the reason
//! otherwise. The lab is one per machine: every test holds the lab lock
//! (`lab::lock`, which also serialises other checkouts' lab tests) and a
//! guard whose Drop runs `lab::down`, also when the test fails. A
//! watchdog aborts a test that outlives `TEST_LIMIT`, after `down`.

mod common;

use common::libvirtd::{tiny_domain_xml, unavailable, which};
use havirt::engine::config::DomainId;
use havirt::lab::host::{Host, HostOptions, share_datastore_mount};
use havirt::lab::net::{Network, heartbeat_addr, host_ns};
use havirt::lab::{self, LAB_DIR, faultfs};
use std::fs::{self, File};
use std::net::UdpSocket;
use std::path::Path;
use std::sync::mpsc;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::thread;
use std::time::{Duration, Instant};

/// Tests of this binary run on threads of one process: one lab at a time.
static LAB: Mutex<()> = Mutex::new(());
/// A test still running after this is stuck: the lab is removed, the
/// process aborts.
const TEST_LIMIT: Duration = Duration::from_secs(60);
const LIBVIRT_WAIT: Duration = Duration::from_secs(10);
/// Power loss must take qemu down within this (issue 4).
const POWER_OFF_MAX: Duration = Duration::from_secs(1);
const UDP_WAIT: Duration = Duration::from_millis(300);
const UDP_PORT: u16 = 47_999;

#[allow(clippy::disallowed_methods, reason = "tests measure real delays")]
fn now() -> Instant {
    Instant::now()
}

/// Holds the lab; its Drop removes the lab, pass or fail.
struct Lab {
    _threads: MutexGuard<'static, ()>,
    _lock: File,
    done: Option<mpsc::Sender<()>>,
}

impl Lab {
    /// Removes the lab but keeps holding it, so that the checks after it
    /// end before the next test builds a lab of its own.
    fn down_timed(self) -> Lab {
        match lab::down() {
            Ok(report) => println!("{report}"),
            Err(e) => panic!("lab down failed: {e}"),
        }
        self
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        match lab::down() {
            Ok(report) => println!("{report}"),
            Err(e) => eprintln!("lab down failed: {e}"),
        }
        drop(self.done.take());
    }
}

/// None (after printing SKIPPED) when the lab cannot run here.
fn lab(test: &str) -> Option<Lab> {
    let missing = unavailable().or_else(|| {
        ["ip", "nft", "tini", "unshare", "nsenter", "setsid", "mount"]
            .into_iter()
            .find(|t| which(t).is_none())
            .map(|t| format!("{t} is not installed (see .ci/run)"))
    });
    if let Some(why) = missing {
        println!("SKIPPED {test}: {why}");
        return None;
    }
    virt::error::clear_error_callback(); // refused connections are expected
    let threads = LAB.lock().unwrap_or_else(PoisonError::into_inner);
    let lock = lab::lock().expect("lab lock");
    let report = lab::down().expect("down before the test");
    if !report.is_empty() {
        println!("removed a leftover lab: {report}");
    }
    let (done, stop) = mpsc::channel::<()>();
    let name = test.to_string();
    thread::spawn(move || {
        if stop.recv_timeout(TEST_LIMIT) == Err(mpsc::RecvTimeoutError::Timeout) {
            eprintln!("{name}: still running after {TEST_LIMIT:?}: removing the lab and aborting");
            let _ = lab::down();
            std::process::abort();
        }
    });
    Some(Lab { _threads: threads, _lock: lock, done: Some(done) })
}

fn host_up(n: u16, opts: HostOptions) -> Host {
    let mut h = Host::new(n, opts).expect("host");
    h.prepare().expect("prepare");
    h.power_on().expect("power on");
    h.wait_libvirt(LIBVIRT_WAIT).expect("libvirtd answers");
    h
}

fn domain_names(uri: &str) -> Result<Vec<String>, virt::error::Error> {
    let mut conn = virt::connect::Connect::open(Some(uri))?;
    let doms = conn.list_all_domains(0)?;
    let names = doms.iter().map(|d| d.get_name().unwrap_or_default()).collect();
    let _ = conn.close();
    Ok(names)
}

fn qemu_pids(h: &Host) -> Vec<u32> {
    h.pids()
        .into_iter()
        .filter(|p| fs::read_to_string(format!("/proc/{p}/comm")).is_ok_and(|c| c.starts_with("qemu")))
        .collect()
}

fn assert_nothing_left() {
    let netns = fs::read_dir("/run/netns").into_iter().flatten().flatten();
    let lab_ns: Vec<_> = netns.filter(|e| e.file_name().to_string_lossy().starts_with("hl-")).collect();
    assert!(lab_ns.is_empty(), "netns left: {lab_ns:?}");
    let info = fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
    assert!(!info.contains(LAB_DIR), "mounts left under {LAB_DIR}");
    assert!(!Path::new(LAB_DIR).exists(), "{LAB_DIR} left");
    let left = lab::down().expect("second down");
    assert!(left.is_empty(), "a second down found: {left}");
}

#[test]
fn hosts_run_libvirt_and_power_off_kills_qemu_at_once() {
    let Some(lab) = lab("hosts_run_libvirt_and_power_off_kills_qemu_at_once") else {
        return;
    };
    let t = now();
    let _net = Network::create(2).expect("network");
    let mut h1 = host_up(1, HostOptions::default());
    let h2 = host_up(2, HostOptions::default());
    println!("network and two hosts up in {:?}", t.elapsed());
    assert_eq!(domain_names(&h1.libvirt_uri()).expect("list h1"), Vec::<String>::new());
    assert_eq!(domain_names(&h2.libvirt_uri()).expect("list h2"), Vec::<String>::new());

    let xml = tiny_domain_xml("hl-tiny", DomainId(7));
    let mut conn = virt::connect::Connect::open(Some(&h1.libvirt_uri())).expect("connect h1");
    let dom = virt::domain::Domain::define_xml(&conn, &xml).expect("define");
    dom.create().expect("start the tiny domain");
    let _ = conn.close();
    assert_eq!(qemu_pids(&h1).len(), 1, "one qemu in host 1");
    assert!(qemu_pids(&h2).is_empty(), "no qemu in host 2");
    assert_eq!(domain_names(&h2.libvirt_uri()).expect("list h2"), Vec::<String>::new(), "h2 has its own libvirt");

    assert!(udp_reaches(2, 1), "host 1 answers while on");
    let qemu = qemu_pids(&h1)[0];
    let t = now();
    h1.power_off().expect("power off");
    let took = t.elapsed();
    println!("power off: every process of host 1 gone in {took:?}");
    assert!(took < POWER_OFF_MAX, "power off took {took:?}");
    assert!(!Path::new(&format!("/proc/{qemu}/ns")).exists(), "qemu {qemu} survived power off");
    assert!(!h1.is_on());
    assert!(domain_names(&h1.libvirt_uri()).is_err(), "libvirt of a powered-off host answered");
    assert!(domain_names(&h2.libvirt_uri()).is_ok(), "host 2 unaffected");
    assert!(!udp_reaches(2, 1), "a powered-off host's address answered");

    let t = now();
    h1.power_on().expect("power on again");
    h1.wait_libvirt(LIBVIRT_WAIT).expect("libvirtd answers after reboot");
    println!("host 1 rebooted (libvirt answering) in {:?}", t.elapsed());
    assert_eq!(domain_names(&h1.libvirt_uri()).expect("list"), vec!["hl-tiny".to_string()], "definition persists");
    assert!(qemu_pids(&h1).is_empty(), "the domain does not come back running");
    assert!(udp_reaches(2, 1), "host 1 answers after power on");

    let t = now();
    let lab = lab.down_timed();
    println!("down in {t:?}", t = t.elapsed());
    assert_nothing_left();
    drop(lab);
}

/// Receives one datagram on `to`'s heartbeat address, sent from `from`'s,
/// each socket made on a thread that entered the host's netns (setns
/// moves only the calling thread).
fn udp_reaches(from: u16, to: u16) -> bool {
    let in_ns = |host: u16| {
        let ns = File::open(format!("/run/netns/{}", host_ns(host))).expect("open netns");
        nix::sched::setns(ns, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
    };
    let (ready, bound) = mpsc::channel();
    let receiver = thread::spawn(move || {
        in_ns(to);
        let sock = UdpSocket::bind((heartbeat_addr(to).as_str(), UDP_PORT)).expect("bind");
        sock.set_read_timeout(Some(UDP_WAIT)).expect("timeout");
        ready.send(()).expect("ready");
        let mut buf = [0u8; 16];
        matches!(sock.recv_from(&mut buf), Ok((5, _))) && &buf[..5] == b"hello"
    });
    bound.recv().expect("receiver bound");
    thread::spawn(move || {
        in_ns(from);
        let sock = UdpSocket::bind((heartbeat_addr(from).as_str(), 0)).expect("bind sender");
        // A few sends: the first may wait for ARP.
        for _ in 0..3 {
            let _ = sock.send_to(b"hello", (heartbeat_addr(to).as_str(), UDP_PORT));
            thread::sleep(Duration::from_millis(20));
        }
    })
    .join()
    .expect("sender");
    receiver.join().expect("receiver")
}

#[test]
fn partition_blocks_heartbeats_and_heal_restores_them() {
    let Some(lab) = lab("partition_blocks_heartbeats_and_heal_restores_them") else {
        return;
    };
    let net = Network::create(2).expect("network");
    assert!(udp_reaches(1, 2) && udp_reaches(2, 1), "connected before the partition");
    net.partition(&[1], &[2], true).expect("partition");
    assert!(!udp_reaches(1, 2) && !udp_reaches(2, 1), "partition h1|h2 both ways");
    net.heal().expect("heal");
    assert!(udp_reaches(1, 2), "healed");
    net.partition(&[1], &[2], false).expect("one-way partition");
    assert!(!udp_reaches(1, 2) && udp_reaches(2, 1), "one way only");
    net.heal().expect("heal");
    net.isolate(2).expect("isolate");
    assert!(!udp_reaches(1, 2), "isolated host unreachable");
    net.heal().expect("heal");
    assert!(udp_reaches(1, 2) && udp_reaches(2, 1), "healed after isolation");
    let lab = lab.down_timed();
    assert_nothing_left();
    drop(lab);
}

#[test]
fn host_sees_later_datastore_mount_pauses_and_loses_daemons() {
    let Some(lab) = lab("host_sees_later_datastore_mount_pauses_and_loses_daemons") else {
        return;
    };
    let ds = Path::new(LAB_DIR).join("ds");
    share_datastore_mount(&ds).expect("share the datastore mount point");
    let _net = Network::create(1).expect("network");
    let daemon = vec!["sleep".to_string(), "4242".to_string()];
    let h = host_up(1, HostOptions { daemon: Some(daemon), ..HostOptions::default() });

    // faultfs mounted over ds after the host started, as in the lab.
    let mut faultfs = start_faultfs(&ds);
    fs::write(ds.join("seen"), "from outside").expect("write through faultfs");
    let path = ds.join("seen");
    let path = path.to_str().expect("utf-8");
    let cat = h.exec_ok(&["cat", path]).expect("cat inside");
    assert_eq!(String::from_utf8_lossy(&cat.stdout), "from outside");

    h.pause().expect("pause");
    let states: Vec<String> = h.pids().iter().map(|p| status_state(*p)).collect();
    assert!(states.iter().all(|s| s.starts_with('T')), "paused: {states:?}");
    let t = now();
    assert!(h.wait_libvirt(Duration::from_millis(300)).is_err(), "a paused libvirtd answered");
    assert!(t.elapsed() < Duration::from_secs(1), "wait_libvirt is bounded on a paused host");
    h.resume().expect("resume");
    assert!(h.pids().iter().all(|p| !status_state(*p).starts_with('T')), "resumed");
    h.wait_libvirt(LIBVIRT_WAIT).expect("libvirt after resume");

    assert_eq!(h.kill_daemon().expect("kill daemon"), 1);
    assert!(h.is_on(), "the host survives its daemon");
    assert_eq!(h.kill_libvirtd().expect("kill libvirtd"), 1);
    assert!(h.is_on(), "the host survives its libvirtd");
    assert!(domain_names(&h.libvirt_uri()).is_err(), "libvirtd is gone");

    // ipmi_sim's power off: SIGTERM to the start script it runs.
    let start = h.dir().join("start");
    let script = fs::read_dir("/proc").expect("/proc").flatten().find_map(|e| {
        let argv = fs::read(e.path().join("cmdline")).ok()?;
        let argv: Vec<&[u8]> = argv.split(|b| *b == 0).collect();
        (argv.get(1) == Some(&start.as_os_str().as_encoded_bytes())).then(|| e.file_name())
    });
    let script = script.expect("the start script runs").into_string().expect("pid");
    let t = now();
    let term = std::process::Command::new("kill").args(["-TERM", &script]).status().expect("kill");
    assert!(term.success());
    while h.is_on() {
        assert!(t.elapsed() < POWER_OFF_MAX, "SIGTERM to start did not power the host off");
        thread::sleep(Duration::from_millis(5));
    }
    println!("SIGTERM to start: host off in {:?}", t.elapsed());
    let link = std::process::Command::new("ip").args(["-n", &host_ns(1), "-o", "link", "show", "eth0"]).output();
    let link = String::from_utf8_lossy(&link.expect("ip link show").stdout).into_owned();
    assert!(link.contains("state DOWN"), "an off host's eth0 has no link: {link}");

    // A host process stuck on a hung datastore: down clears the fault first.
    let h = host_up(1, HostOptions::default());
    let socket = Path::new(LAB_DIR).join(lab::FAULTFS_SOCKET);
    faultfs::control(&socket, &format!("hang netns={}", host_ns(1))).expect("hang host 1's datastore");
    h.exec_ok(&["sh", "-c", &format!("cat {path} >/dev/null 2>&1 &")]).expect("background cat");
    thread::sleep(Duration::from_millis(200));
    let comm = |p: &u32| fs::read_to_string(format!("/proc/{p}/comm")).unwrap_or_default();
    assert!(h.pids().iter().any(|p| comm(p) == "cat\n"), "cat hangs in host 1");
    assert_eq!(fs::read_to_string(ds.join("seen")).expect("outside read"), "from outside", "only host 1 hangs");
    let t = now();
    let lab = lab.down_timed(); // no power off first: down alone must cope
    println!("down with a hung datastore in {:?}", t.elapsed());
    let _ = faultfs.wait();
    assert_nothing_left();
    drop(lab);
}

/// `havirt lab faultfs` over LAB_DIR/backing at `ds`, controlled at
/// LAB_DIR/faultfs.sock; returns once it answers.
fn start_faultfs(ds: &Path) -> std::process::Child {
    let backing = Path::new(LAB_DIR).join("backing");
    fs::create_dir_all(&backing).expect("backing");
    let socket = Path::new(LAB_DIR).join(lab::FAULTFS_SOCKET);
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_havirt"))
        .args(["lab", "faultfs", "--backing"])
        .args([backing.as_os_str(), "--mountpoint".as_ref(), ds.as_os_str(), "--control".as_ref(), socket.as_os_str()])
        .spawn()
        .expect("spawn havirt lab faultfs");
    let t = now();
    while faultfs::control(&socket, "status").is_err() {
        assert!(t.elapsed() < LIBVIRT_WAIT, "faultfs did not answer on {}", socket.display());
        thread::sleep(Duration::from_millis(10));
    }
    child
}

fn status_state(pid: u32) -> String {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status.lines().find_map(|l| l.strip_prefix("State:")).unwrap_or("gone").trim().to_string()
}
