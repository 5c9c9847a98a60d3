//! Two real `havirt daemon` processes on one machine: one datastore
//! directory, real UDP heartbeats on loopback (127.0.0.1 and 127.0.0.2),
//! each with its own libvirt (`test:///` driver, private to the process, so
//! a killed daemon is a host whose domains died with it).
//!
//! A domain protected on host a is taken over by host b when a is killed
//! with SIGKILL: through a fence agent that confirms a is gone (S3(a)),
//! through the watchdog rule after host_dead_timeout (S3(b)), and, for a
//! host with neither, only after `havirt fence confirm`.

use havirt::control::{self, Request, Response, StatusReport};
use havirt::engine::config::HostId;
use havirt::engine::io::DomainState;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

mod common;

use common::libvirtd::{self, Daemons, REAL_URI};
use havirt::hypervisor::{Hypervisor, LibvirtHypervisor, LibvirtOptions, parse_uuid};

const HAVIRT: &str = env!("CARGO_BIN_EXE_havirt");
const VM_UUID: &str = "1ea5a7e0-0000-4000-8000-000000000001";
/// The fast profile's host_dead_timeout.
const HOST_DEAD: Duration = Duration::from_secs(10);

/// How host a can be taken over once it dies.
#[derive(Clone, Copy, PartialEq)]
enum TakeOver {
    /// A fence agent that kills its process and confirms it is gone.
    FenceAgent,
    /// A watchdog (the lab kind; the test drains its pets): S3(b).
    Watchdog,
    /// Neither: only the operator can confirm.
    Operator,
}

struct Pair {
    dir: PathBuf,
    /// Host a's libvirt when not its own test driver (a real libvirtd).
    a_uri: Option<String>,
    children: Vec<(String, Child)>,
    _supervisor: Option<UnixDatagram>,
    /// When host a's lab watchdog was petted (ms since the Unix epoch).
    pets: Arc<Mutex<Vec<u64>>>,
    /// A faultfs under the datastore: its faults are cleared before the
    /// daemons are killed (a process blocked in a hung mount cannot die).
    faultfs_control: Option<PathBuf>,
}

impl Drop for Pair {
    fn drop(&mut self) {
        if let Some(control) = &self.faultfs_control {
            let _ = havirt::lab::faultfs::control(control, "ok");
        }
        for (_, c) in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        if std::thread::panicking() {
            for name in ["a", "b"] {
                let log = std::fs::read_to_string(self.dir.join(format!("{name}.log"))).unwrap_or_default();
                eprintln!("---- daemon {name} log ----\n{log}");
            }
        }
    }
}

fn scratch(name: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("daemon").join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("scratch dir");
    dir
}

fn free_port() -> u16 {
    let s = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
    s.local_addr().expect("addr").port()
}

fn node_xml(with_vm: bool) -> String {
    let vm = format!(
        "<domain type='test'><name>vm1</name><uuid>{VM_UUID}</uuid><memory unit='KiB'>262144</memory>\
         <vcpu>1</vcpu><os><type arch='x86_64'>hvm</type></os></domain>"
    );
    format!(
        "<node><cpu><mhz>2000</mhz><model>test</model><nodes>1</nodes><sockets>1</sockets><cores>2</cores>\
         <threads>1</threads></cpu><memory>4194304</memory>{}</node>",
        if with_vm { vm.as_str() } else { "" }
    )
}

/// A datastore named `*.img` is a block datastore (a file standing for the
/// LUN: both daemons run on this machine); any other, a directory.
fn is_block(ds: &Path) -> bool {
    ds.extension().is_some_and(|e| e == "img")
}

fn datastore_toml(ds: &Path) -> String {
    if is_block(ds) {
        format!("kind = \"block\"\ndevice = \"{}\"", ds.display())
    } else {
        format!("kind = \"dir\"\npath = \"{}\"", ds.display())
    }
}

fn config_text(dir: &Path, ds: &Path, port: u16, how: TakeOver) -> String {
    let fence_agent = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/daemon/fence_pid");
    let a_extra = match how {
        TakeOver::FenceAgent => format!(
            "watchdog = \"none\"\n\n[[host.fence]]\nkind = \"command\"\nagent = \"{}\"\noptions = {{ pidfile = \"{}\" }}\n",
            fence_agent.display(),
            dir.join("a.pid").display()
        ),
        TakeOver::Watchdog => {
            format!("watchdog = {{ kind = \"lab\", lab_socket = \"{}\" }}\n", dir.join("a-watchdog.sock").display())
        }
        TakeOver::Operator => "watchdog = \"none\"\n".to_string(),
    };
    format!(
        r#"[cluster]
name = "pair"
key_file = "{key}"
profile = "fast"
isolation_addresses = ["127.0.0.1"]
net_port = {port}

[cluster.datastore]
{datastore}

[[host]]
name = "a"
id = 1
addresses = ["127.0.0.1"]
{a_extra}
[[host]]
name = "b"
id = 2
addresses = ["127.0.0.2"]
watchdog = "none"
"#,
        key = dir.join("cluster.key").display(),
        datastore = datastore_toml(ds),
    )
}

fn havirt(args: &[&str]) -> (bool, String) {
    let out = Command::new(HAVIRT).args(args).stdin(Stdio::null()).output().expect("run havirt");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

impl Pair {
    fn start_with(name: &str, how: TakeOver, a_uri: Option<String>) -> Pair {
        let dir = scratch(name);
        let pair = Pair::prepare(&dir, &dir.join("ds"), how, a_uri);
        pair.spawn_both()
    }

    /// As `start_with`, on a block datastore (a file as the LUN).
    fn start_block(name: &str, how: TakeOver) -> Pair {
        let dir = scratch(name);
        let lun = dir.join("lun.img");
        std::fs::File::create(&lun).expect("the LUN file");
        let pair = Pair::prepare(&dir, &lun, how, None);
        pair.spawn_both()
    }

    /// Datastore, key, config and node files; no daemon yet.
    fn prepare(dir: &Path, ds: &Path, how: TakeOver, a_uri: Option<String>) -> Pair {
        let dir = dir.to_path_buf();
        let port = free_port();
        let key = dir.join("cluster.key");
        let mut args = vec!["init", "--cluster", "pair", "--datastore", ds.to_str().expect("utf-8")];
        args.extend(["--key-file", key.to_str().expect("utf-8")]);
        if is_block(ds) {
            args.extend(["--max-hosts", "4", "--max-domains", "8", "--registry-blocks", "16"]);
        }
        let (ok, out) = havirt(&args);
        assert!(ok, "havirt init: {out}");
        std::fs::write(dir.join("havirt.toml"), config_text(&dir, ds, port, how)).expect("config");
        std::fs::write(dir.join("a.xml"), node_xml(true)).expect("node a");
        std::fs::write(dir.join("b.xml"), node_xml(false)).expect("node b");
        // The lab watchdog's supervisor: record when it is petted.
        let pets = Arc::new(Mutex::new(Vec::new()));
        let supervisor = (how == TakeOver::Watchdog).then(|| {
            let s = UnixDatagram::bind(dir.join("a-watchdog.sock")).expect("supervisor socket");
            let r = s.try_clone().expect("clone");
            let pets = Arc::clone(&pets);
            std::thread::spawn(move || {
                let mut buf = [0u8; 64];
                while let Ok(n) = r.recv(&mut buf) {
                    if buf[..n].starts_with(b"pet") {
                        pets.lock().expect("pets").push(unix_ms());
                    }
                }
            });
            s
        });
        Pair { dir, a_uri, children: Vec::new(), _supervisor: supervisor, pets, faultfs_control: None }
    }

    fn spawn_both(mut self) -> Pair {
        for host in ["a", "b"] {
            self.spawn(host);
        }
        self
    }

    fn spawn(&mut self, host: &str) {
        let log = std::fs::File::create(self.dir.join(format!("{host}.log"))).expect("log");
        let uri = match (&self.a_uri, host) {
            (Some(uri), "a") => uri.clone(),
            _ => format!("test://{}", self.dir.join(format!("{host}.xml")).display()),
        };
        let child = Command::new(HAVIRT)
            .args(["daemon", "--config", self.path("havirt.toml").as_str(), "--host", host])
            .args(["--libvirt-uri", &uri, "--socket", self.socket(host).as_str()])
            .env("HAVIRT_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("spawn daemon");
        std::fs::write(self.dir.join(format!("{host}.pid")), child.id().to_string()).expect("pidfile");
        self.children.push((host.to_string(), child));
    }

    fn path(&self, name: &str) -> String {
        self.dir.join(name).display().to_string()
    }

    fn socket(&self, host: &str) -> String {
        self.path(&format!("{host}.sock"))
    }

    /// SIGKILL, and reap it (a zombie would still "exist" for kill -0).
    fn kill(&mut self, host: &str) {
        let i = self.children.iter().position(|(h, _)| h == host).expect("running");
        let (_, mut c) = self.children.remove(i);
        c.kill().expect("SIGKILL");
        c.wait().expect("reap");
    }

    fn status(&self, host: &str) -> Option<StatusReport> {
        let sock = self.socket(host);
        match control::request(Path::new(&sock), &Request::Status, Duration::from_secs(5)) {
            Ok(Response::Status(r)) => Some(*r),
            _ => None,
        }
    }

    fn events(&self, host: &str) -> String {
        havirt(&["events", "--socket", self.socket(host).as_str()]).1
    }

    fn wait_for(&self, what: &str, limit: Duration, mut ok: impl FnMut() -> bool) -> Duration {
        #[allow(clippy::disallowed_methods, reason = "a test against real processes waits in wall time")]
        let start = Instant::now();
        while start.elapsed() < limit {
            if ok() {
                return start.elapsed();
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("{what}: not within {limit:?}\nb's events:\n{}", self.events("b"));
    }
}

/// Wall-clock ms, to compare with the daemon's event stamps.
fn unix_ms() -> u64 {
    #[allow(clippy::disallowed_methods, reason = "compared with the daemon's wall-clock event stamps")]
    let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("after 1970");
    u64::try_from(t.as_millis()).expect("ms fit")
}

fn verdict(r: &StatusReport, host: u16) -> String {
    r.view.hosts.iter().find(|h| h.id == HostId(host)).map(|h| h.verdict.clone()).unwrap_or_default()
}

/// (host, state) of vm1 in a status report.
fn vm1(r: &StatusReport) -> (Option<HostId>, Option<DomainState>) {
    r.view.domains.iter().find(|d| d.name == "vm1").map_or((None, None), |d| (d.host, d.state))
}

fn running(s: Option<DomainState>) -> bool {
    matches!(s, Some(DomainState::Running | DomainState::Ready))
}

/// Both daemons up and alive to each other, vm1 protected on a, b sees it there.
fn protected_pair(name: &str, how: TakeOver) -> Pair {
    protected_pair_with(name, how, None)
}

fn protected_pair_with(name: &str, how: TakeOver, a_uri: Option<String>) -> Pair {
    protect_vm1(Pair::start_with(name, how, a_uri))
}

fn protect_vm1(pair: Pair) -> Pair {
    pair.wait_for("a and b see each other alive", Duration::from_secs(30), || {
        pair.status("a").is_some_and(|r| verdict(&r, 2) == "alive")
            && pair.status("b").is_some_and(|r| verdict(&r, 1) == "alive")
    });
    let (ok, out) = havirt(&["protect", "vm9", "--socket", pair.socket("a").as_str()]);
    assert!(!ok && out.contains("no domain \"vm9\" on this host"), "{out}");
    let (ok, out) = havirt(&["protect", "vm1", "--priority", "high", "--socket", pair.socket("a").as_str()]);
    assert!(ok, "protect: {out}");
    assert!(out.contains("vm1 is protected"), "{out}");
    pair.wait_for("b sees vm1 running on a", Duration::from_secs(15), || {
        pair.status("b").is_some_and(|r| {
            let (h, s) = vm1(&r);
            h == Some(HostId(1)) && running(s)
        })
    });
    let (ok, table) = havirt(&["status", "--socket", pair.socket("b").as_str()]);
    assert!(ok && table.contains("vm1") && table.contains("alive"), "{table}");
    pair
}

fn taken_over_by_b(pair: &Pair) -> bool {
    pair.status("b").is_some_and(|r| {
        let (h, s) = vm1(&r);
        h == Some(HostId(2)) && running(s)
    })
}

#[test]
fn sigkilled_host_is_fenced_and_its_domain_restarted_on_the_survivor() {
    let mut pair = protected_pair("fence_agent", TakeOver::FenceAgent);
    pair.kill("a");
    let took = pair.wait_for("vm1 running on b after a was killed", HOST_DEAD + Duration::from_secs(10), || {
        taken_over_by_b(&pair)
    });
    println!("SIGKILL of a -> vm1 running on b: {:.2} s (fence agent, fast profile)", took.as_secs_f64());
    let r = pair.status("b").expect("b answers");
    assert_ne!(verdict(&r, 1), "alive", "b must report a dead");
    assert!(r.view.is_master, "b took the master lease");
    let events = pair.events("b");
    assert!(events.contains("fence"), "{events}");
    // Confirmed fencing does not wait for host_dead_timeout.
    assert!(took < HOST_DEAD, "fenced takeover took {took:?}");

    // Unprotect: it keeps running where it is, and is no longer listed.
    let (ok, out) = havirt(&["unprotect", "vm1", "--socket", pair.socket("b").as_str()]);
    assert!(ok && out.contains("no longer protected"), "unprotect: {out}");
    let r = pair.status("b").expect("b answers");
    assert!(r.view.domains.is_empty(), "still listed: {:?}", r.view.domains);
    let (ok, out) = havirt(&["unprotect", "vm1", "--socket", pair.socket("b").as_str()]);
    assert!(!ok && out.contains("not a protected domain"), "{out}");
}

/// The same on a block datastore: leases by Disk Paxos, the registry on
/// the device, no file lock anywhere.
#[test]
fn block_datastore_host_is_fenced_and_its_domain_restarted_on_the_survivor() {
    let mut pair = protect_vm1(Pair::start_block("block_fence_agent", TakeOver::FenceAgent));
    pair.kill("a");
    let took = pair.wait_for("vm1 running on b after a was killed", HOST_DEAD + Duration::from_secs(10), || {
        taken_over_by_b(&pair)
    });
    println!(
        "block datastore: SIGKILL of a -> vm1 running on b: {:.2} s (fence agent, fast profile)",
        took.as_secs_f64()
    );
    let r = pair.status("b").expect("b answers");
    assert!(r.view.is_master, "b took the master lease");
    assert!(took < HOST_DEAD, "fenced takeover took {took:?}");
    let (ok, out) = havirt(&["unprotect", "vm1", "--socket", pair.socket("b").as_str()]);
    assert!(ok && out.contains("no longer protected"), "unprotect: {out}");
}

#[test]
fn sigkilled_host_with_a_watchdog_is_taken_over_after_host_dead_timeout() {
    let mut pair = protected_pair("watchdog", TakeOver::Watchdog);
    pair.kill("a");
    let took = pair.wait_for("vm1 running on b after a was killed", HOST_DEAD + Duration::from_secs(10), || {
        taken_over_by_b(&pair)
    });
    println!("SIGKILL of a -> vm1 running on b: {:.2} s (watchdog rule, fast profile)", took.as_secs_f64());
    // S3(b): never before a's slot has been still for host_dead_timeout.
    assert!(took >= HOST_DEAD, "took over after {took:?}, before host_dead_timeout");
}

#[test]
fn host_without_watchdog_or_fence_agent_waits_for_the_operator() {
    let mut pair = protected_pair("operator", TakeOver::Operator);
    pair.kill("a");
    // Well past every timeout: nothing may move without proof a is off.
    std::thread::sleep(HOST_DEAD + Duration::from_secs(3));
    let r = pair.status("b").expect("b answers");
    assert_eq!(vm1(&r).0, Some(HostId(1)), "vm1 moved without a confirmed fence");
    assert_ne!(verdict(&r, 1), "alive");
    let (ok, out) = havirt(&["fence", "confirm", "a", "--socket", pair.socket("b").as_str()]);
    assert!(ok, "fence confirm: {out}");
    let took =
        pair.wait_for("vm1 running on b after the confirmation", Duration::from_secs(10), || taken_over_by_b(&pair));
    println!("fence confirm -> vm1 running on b: {:.2} s", took.as_secs_f64());
}

/// `[cluster] admission = "strict"`, `tolerate_host_failures = 1`: a second
/// domain on a that b could not take if a failed is refused, saying why, and
/// stays unprotected; the first, which b can take, was protected.
#[test]
fn strict_admission_refuses_a_protect_that_breaks_tolerate_host_failures() {
    // As large as this machine (each daemon reports the machine's memory as
    // its host's size): b cannot take vm1 and vm2 together.
    let meminfo = std::fs::read_to_string("/proc/meminfo").expect("/proc/meminfo");
    let total_kib: u64 = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("MemTotal in /proc/meminfo");
    let dir = scratch("admission_strict");
    let mut pair = Pair::prepare(&dir, &dir.join("ds"), TakeOver::FenceAgent, None);
    let config = std::fs::read_to_string(dir.join("havirt.toml")).expect("config");
    let strict = config.replacen("net_port =", "admission = \"strict\"\ntolerate_host_failures = 1\nnet_port =", 1);
    assert_ne!(strict, config, "the config has a net_port line to put the admission keys before");
    std::fs::write(dir.join("havirt.toml"), strict).expect("config");
    let vm2 = format!(
        "<domain type='test'><name>vm2</name><uuid>1ea5a7e0-0000-4000-8000-000000000002</uuid>\
         <memory unit='KiB'>{total_kib}</memory><vcpu>1</vcpu><os><type arch='x86_64'>hvm</type></os></domain></node>"
    );
    let node_a = node_xml(true).replace("</node>", &vm2);
    std::fs::write(dir.join("a.xml"), node_a).expect("node a");
    pair = protect_vm1(pair.spawn_both());
    let (ok, out) = havirt(&["protect", "vm2", "--socket", pair.socket("a").as_str()]);
    assert!(!ok, "protect vm2 must be refused: {out}");
    for part in [
        "admission control (strict) refuses to protect vm2",
        "fewer than tolerate_host_failures = 1",
        "after a failure of a, ",
        "admission = \"warn\"",
    ] {
        assert!(out.contains(part), "the refusal lacks {part:?}: {out}");
    }
    let r = pair.status("a").expect("a answers");
    assert!(r.view.domains.iter().all(|d| d.name != "vm2"), "vm2 must stay unprotected: {:?}", r.view.domains);
    // The master (either host) shows the requirement next to the figure.
    let tables: Vec<String> =
        ["a", "b"].iter().map(|h| havirt(&["status", "--socket", pair.socket(h).as_str()]).1).collect();
    assert!(tables.iter().any(|t| t.contains("admission control strict: needs 1 host")), "{tables:?}");
}

/// A second daemon for a host whose daemon still exists refuses to start
/// before it touches the datastore, and names the one that runs; the first
/// goes on and nothing moves.
#[test]
fn second_daemon_for_a_host_refuses_to_start_and_names_the_first() {
    let pair = protect_vm1(Pair::start_block("second_daemon", TakeOver::FenceAgent));
    let first = pair.children.iter().find(|(h, _)| h == "a").map(|(_, c)| c.id()).expect("a runs");
    let child = Command::new(HAVIRT)
        .args(["daemon", "--config", pair.path("havirt.toml").as_str(), "--host", "a"])
        .args(["--libvirt-uri", &format!("test://{}", pair.path("a.xml")), "--socket", pair.path("a2.sock").as_str()])
        .env("HAVIRT_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run the second daemon");
    let mut second = Some(child);
    pair.wait_for("the second daemon exits", Duration::from_secs(20), || {
        second.as_mut().is_some_and(|c| c.try_wait().expect("try_wait").is_some())
    });
    let out = second.take().expect("exited").wait_with_output().expect("its output");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(!out.status.success(), "the second daemon must refuse: {text}");
    assert!(text.contains("another havirt daemon for host a of cluster pair"), "{text}");
    assert!(text.contains(&format!("pid {first}")), "must name pid {first}: {text}");
    assert!(!Path::new(&pair.path("a2.sock")).exists(), "it bound a control socket: {text}");
    let r = pair.status("a").expect("the first daemon still answers");
    assert_eq!(vm1(&r).0, Some(HostId(1)), "vm1 moved: {:?}", r.view.domains);
    assert_eq!(verdict(&pair.status("b").expect("b answers"), 1), "alive");
}

#[test]
fn control_commands_explain_what_is_wrong() {
    let dir = scratch("no_daemon");
    let sock = dir.join("none.sock");
    let (ok, out) = havirt(&["status", "--socket", sock.to_str().expect("utf-8")]);
    assert!(!ok);
    assert!(out.contains(sock.to_str().expect("utf-8")), "{out}");
}

/// A daemon killed and started again on a host whose domain runs on a real
/// libvirtd: it adopts the running domain (its lease is still its own), the
/// qemu process is never touched, and the peer moves nothing.
#[test]
fn restarted_daemon_adopts_its_running_domain_and_nothing_moves() {
    if let Some(why) = libvirtd::unavailable() {
        println!("SKIPPED restarted_daemon_adopts_its_running_domain: {why}");
        return;
    }
    let daemons = match Daemons::ensure() {
        Ok(d) => d,
        Err(why) => {
            println!("SKIPPED restarted_daemon_adopts_its_running_domain: {why}");
            return;
        }
    };
    let id = parse_uuid(VM_UUID).expect("uuid");
    libvirtd::remove_domain(id);
    let result = std::panic::catch_unwind(|| {
        let hv = LibvirtHypervisor::open(LibvirtOptions::new(REAL_URI)).expect("open");
        hv.define(&libvirtd::tiny_domain_xml("vm1", id)).expect("define vm1");
        hv.start(id).expect("start vm1");
        let qemu =
            |hv: &LibvirtHypervisor| hv.list().expect("list").into_iter().find(|d| d.id == id).and_then(|d| d.qemu_pid);
        let pid = qemu(&hv).expect("qemu pid");

        let mut pair = protected_pair_with("restart", TakeOver::FenceAgent, Some(REAL_URI.into()));
        pair.kill("a");
        pair.spawn("a");
        pair.wait_for("a adopts vm1 again", Duration::from_secs(15), || {
            pair.status("a").is_some_and(|r| {
                r.view
                    .domains
                    .iter()
                    .any(|d| d.name == "vm1" && d.local.as_deref().is_some_and(|l| l == "running" || l == "ready"))
            })
        });
        // Past suspect_after, storage_silent_after and a fence round.
        std::thread::sleep(Duration::from_secs(5));
        assert_eq!(qemu(&hv), Some(pid), "vm1's qemu was touched by the daemon restart");
        let r = pair.status("b").expect("b answers");
        assert_eq!(vm1(&r).0, Some(HostId(1)), "vm1 moved");
        assert_eq!(verdict(&r, 1), "alive");
        let events = pair.events("b");
        assert!(!events.contains("fencing"), "b fenced a over a daemon restart:\n{events}");
    });
    libvirtd::remove_domain(id);
    daemons.stop_what_we_started();
    if let Err(panic) = result {
        std::panic::resume_unwind(panic);
    }
}

/// faultfs, the fault-injecting FUSE datastore, as a child process.
struct FaultFs {
    child: Child,
    mountpoint: PathBuf,
    control: PathBuf,
}

impl FaultFs {
    fn start(dir: &Path) -> Result<FaultFs, String> {
        if !Path::new("/dev/fuse").exists() {
            return Err("/dev/fuse is missing".into());
        }
        let (backing, mountpoint, control) = (dir.join("backing"), dir.join("mnt"), dir.join("faultfs.sock"));
        for d in [&backing, &mountpoint] {
            std::fs::create_dir_all(d).map_err(|e| e.to_string())?;
        }
        let log = std::fs::File::create(dir.join("faultfs.log")).map_err(|e| e.to_string())?;
        let child = Command::new(HAVIRT)
            .args(["lab", "faultfs", "--backing", &backing.display().to_string()])
            .args(["--mountpoint", &mountpoint.display().to_string(), "--control", &control.display().to_string()])
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(|e| e.to_string())?)
            .stderr(log)
            .spawn()
            .map_err(|e| e.to_string())?;
        let fs = FaultFs { child, mountpoint, control };
        for _ in 0..100 {
            if fs.fault("status").is_ok_and(|r| r.starts_with("ok")) {
                return Ok(fs);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Err("faultfs did not come up".into())
    }

    fn fault(&self, command: &str) -> Result<String, String> {
        havirt::lab::faultfs::control(&self.control, command).map_err(|e| e.to_string())
    }
}

impl Drop for FaultFs {
    fn drop(&mut self) {
        // Clear faults first: processes blocked in the mount must finish.
        let _ = self.fault("ok");
        libvirtd::signal(self.child.id(), "-TERM");
        let _ = self.child.wait();
    }
}

/// S4 with a datastore that hangs (a dead NFS server): the daemon's loop
/// keeps answering, the host stops petting its watchdog and destroys its
/// protected domain within renew_timeout of its last good write, and once
/// the datastore answers again it runs the domain again.
#[test]
fn hung_datastore_makes_the_host_self_fence_on_time() {
    const RENEW: Duration = Duration::from_secs(3); // the fast profile's renew_timeout
    let dir = scratch("hung_storage");
    let fs = match FaultFs::start(&dir) {
        Ok(fs) => fs,
        Err(why) => {
            println!("SKIPPED hung_datastore_makes_the_host_self_fence_on_time: {why}");
            return;
        }
    };
    // Host a alone (b stays down): with a peer that also lost storage and
    // still hears a, the all-lost exemption would rightly keep both running.
    let mut pair = Pair::prepare(&dir, &fs.mountpoint.join("ds"), TakeOver::Watchdog, None);
    pair.faultfs_control = Some(fs.control.clone());
    pair.spawn("a");
    pair.wait_for("a runs with a healthy datastore", Duration::from_secs(15), || {
        pair.status("a").is_some_and(|r| r.view.storage_healthy)
    });
    let (ok, out) = havirt(&["protect", "vm1", "--socket", pair.socket("a").as_str()]);
    assert!(ok, "protect: {out}");
    let runs_vm1 = |r: &StatusReport| {
        r.view
            .domains
            .iter()
            .any(|d| d.name == "vm1" && d.local.as_deref().is_some_and(|l| l == "running" || l == "ready"))
    };
    pair.wait_for("vm1 runs on a", Duration::from_secs(10), || pair.status("a").is_some_and(|r| runs_vm1(&r)));
    assert!(!pair.pets.lock().expect("pets").is_empty(), "the watchdog was never petted");

    assert_eq!(fs.fault("hang").as_deref(), Ok("ok"));
    let hung_ms = unix_ms();
    #[allow(clippy::disallowed_methods, reason = "a test against real processes waits in wall time")]
    let hung = Instant::now();
    let mut slowest = Duration::ZERO;
    let mut fenced_after = None;
    while hung.elapsed() < RENEW + Duration::from_secs(5) {
        #[allow(clippy::disallowed_methods, reason = "a test against real processes waits in wall time")]
        let asked = Instant::now();
        let r = pair.status("a").expect("the daemon's loop answers while its datastore hangs");
        slowest = slowest.max(asked.elapsed());
        if !runs_vm1(&r) && r.view.self_fence != "healthy" {
            fenced_after = Some(hung.elapsed());
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let fenced_after = fenced_after
        .unwrap_or_else(|| panic!("no self-fence within {:?}\n{}", RENEW + Duration::from_secs(5), pair.events("a")));
    println!(
        "datastore hung -> vm1 destroyed after {:.2} s (renew_timeout {:.0} s); slowest status answer {} ms",
        fenced_after.as_secs_f64(),
        RENEW.as_secs_f64(),
        slowest.as_millis()
    );
    assert!(slowest < Duration::from_secs(1), "the loop stalled for {slowest:?}");
    // S4: counted from the start of the last good write, which was at most
    // one write interval (250 ms) before the hang; never early.
    assert!(fenced_after >= RENEW - Duration::from_millis(300), "self-fenced after {fenced_after:?}: too early");
    assert!(fenced_after <= RENEW + Duration::from_millis(1000), "self-fenced after {fenced_after:?}: too late");
    // S4: pets stop once renew_timeout has passed without a good write, and
    // resume only when no protected domain runs here any more.
    // "Done" follows the destroy once the releases are out: wait for it.
    let fence_done = || match control::request(
        Path::new(&pair.socket("a")),
        &Request::Events { after: 0 },
        Duration::from_secs(5),
    ) {
        Ok(Response::Events(events)) => {
            events.iter().find(|e| e.event.text.starts_with("self-fence done")).map(|e| e.unix_ms)
        }
        _ => None,
    };
    pair.wait_for("a self-fence done event", Duration::from_secs(5), || fence_done().is_some());
    let done_ms = fence_done().expect("a self-fence done event");
    let pets = pair.pets.lock().expect("pets").clone();
    let late: Vec<u64> = pets.iter().filter(|p| **p > hung_ms + 3300 && **p < done_ms).map(|p| p - hung_ms).collect();
    assert!(late.is_empty(), "petted at {late:?} ms after the hang, past renew_timeout, with vm1 still here");
    let before_fence = pets.iter().filter(|p| **p < done_ms).max().map(|p| p.saturating_sub(hung_ms));
    println!("last pet before the self-fence finished: {before_fence:?} ms after the hang");
    let events = pair.events("a");
    assert!(events.contains("self-fenc"), "{events}");

    // The datastore answers again: the host rejoins and runs vm1 again.
    assert_eq!(fs.fault("ok").as_deref(), Ok("ok"));
    let back = pair.wait_for("vm1 runs on a again", Duration::from_secs(20), || {
        pair.status("a").is_some_and(|r| runs_vm1(&r) && r.view.storage_healthy)
    });
    println!("datastore back -> vm1 running again after {:.2} s", back.as_secs_f64());
    drop(pair);
    drop(fs);
}
