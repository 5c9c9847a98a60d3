//! What every end-to-end test shares: the skip check, the bounds derived
//! from the default profile, and [`E2e`] (a lab, the observer watching it
//! for the whole test, the placement it started from, and the S1 and
//! recovery assertions).

use havirt::engine::config::{Profile, Timings};
use havirt::lab::LAB_DIR;
use havirt::lab::cluster::{Datastore, Fault, Lab, LabSpec, SETTLE_WAIT};
use havirt::lab::observer::{self, DEFAULT_INTERVAL, Gap, Observation, Observer};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// Every test: 3 hosts (the smallest cluster with a majority after one
/// failure), 6 domains (two per host, round-robin: every victim has some).
pub const HOSTS: u16 = 3;
pub const DOMAINS: u16 = 6;
/// Every wait polls this often.
pub const POLL: Duration = Duration::from_millis(100);
/// How long a recovery is waited for beyond its bound, so that a miss is
/// reported with how long it really took (or that it never happened).
pub const OVERRUN_WAIT: Duration = Duration::from_secs(30);
/// `HAVIRT_E2E_KEEP=1`: a failing test leaves its lab up (run one test).
pub const KEEP_ENV: &str = "HAVIRT_E2E_KEEP";
/// The programs the lab runs (the brief's list, plus what the lab calls).
pub const TOOLS: [&str; 14] = [
    "ip",
    "nft",
    "ipmi_sim",
    "ipmitool",
    "fence_ipmilan",
    "qemu-system-x86_64",
    "qemu-img",
    "libvirtd",
    "virtlogd",
    "virsh",
    "tini",
    "nsenter",
    "unshare",
    "losetup",
];

/// A test kept its lab up (HAVIRT_E2E_KEEP): the lab lock is still ours,
/// and the next `Lab::up` of this process would wait for it forever.
static KEPT: AtomicBool = AtomicBool::new(false);

#[allow(clippy::disallowed_methods, reason = "the end-to-end tests measure real recovery in wall time")]
pub fn now() -> Instant {
    Instant::now()
}

// ------------------------------------------------------------------ bounds

/// The default profile's timings, as the daemons run them.
pub fn timings() -> Timings {
    Profile::Default.timings()
}

/// An engine duration (ms) as a std one.
pub fn std_duration(d: havirt::engine::time::Duration) -> Duration {
    Duration::from_millis(d.as_millis())
}

/// Slack for a loaded 2-core CI machine (six qemu, three libvirtd, three
/// daemons, nine BMC and watchdog processes, faultfs and cargo on 2 cores):
/// scheduling delays, slower libvirt calls and qemu starts.
pub const CI_MARGIN: Duration = Duration::from_secs(5);
/// One domain start through libvirt (LAB-NOTES: ~0.45 s), rounded up.
pub const START: Duration = Duration::from_secs(1);
/// One `fence_ipmilan --action=off` against ipmi_sim with power_wait 0
/// (LAB-NOTES: 1.3–2.3 s), rounded up.
pub const FENCE_AGENT: Duration = Duration::from_secs(3);

/// Fault to running again on a survivor when a fence agent confirms the
/// power-off (S3(a)): detection (network suspect 2 s, storage silent 2 s:
/// the larger, 2 s) + one fence_ipmilan call (3 s) + the master's
/// assignment reaching the assignee through storage (one read interval,
/// 0.25 s) + a start (1 s) + CI margin (5 s) = 11.25 s. It is well below
/// host_dead_timeout (22 s): meeting it proves the fence path was taken.
pub fn fenced_bound() -> Duration {
    let t = timings();
    let detect = std_duration(t.suspect_after).max(std_duration(t.storage_silent_after));
    let bound = detect + FENCE_AGENT + std_duration(t.storage_read_interval) + START + CI_MARGIN;
    assert!(bound < std_duration(t.host_dead_timeout), "the fenced bound {bound:?} must prove S3(a)");
    bound
}

/// S3(b): no lease of a dead host may pass before its slot has stood
/// still for host_dead_timeout (22 s) on the taker's clock. Its last
/// write may precede the fault by one write interval (0.5 s), and the
/// observer never dates a start early, so 22 - 0.5 = 21.5 s after the
/// fault is the earliest a domain of the host may run elsewhere.
pub fn watchdog_rule_lower() -> Duration {
    let t = timings();
    std_duration(t.host_dead_timeout) - std_duration(t.storage_write_interval)
}

/// Fault to running again by the watchdog rule: host_dead_timeout (22 s),
/// plus the taker seeing it (one read interval, 0.25 s), the assignment
/// read (0.25 s), a start (1 s) and the CI margin (5 s): 28.5 s.
pub fn watchdog_rule_upper() -> Duration {
    let t = timings();
    let read = std_duration(t.storage_read_interval);
    std_duration(t.host_dead_timeout) + read + read + START + CI_MARGIN
}

// ------------------------------------------------------------------ skip

fn find_program(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let mut dirs: Vec<PathBuf> = std::env::split_paths(&path).collect();
    dirs.extend(["/usr/sbin", "/usr/bin", "/sbin", "/bin"].map(PathBuf::from));
    dirs.into_iter().map(|d| d.join(name)).find(|p| p.is_file())
}

/// Why this machine cannot run the lab, if it cannot.
pub fn unavailable() -> Option<String> {
    // SAFETY: geteuid(2) takes nothing and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        return Some("not root (the lab needs namespaces, mounts and nft)".into());
    }
    let missing: Vec<&str> = TOOLS.into_iter().filter(|p| find_program(p).is_none()).collect();
    if !missing.is_empty() {
        return Some(format!(
            "missing {} (Debian: iproute2 nftables openipmi ipmitool fence-agents qemu-system-x86 \
             qemu-utils libvirt-daemon-system libvirt-clients tini util-linux mount)",
            missing.join(", ")
        ));
    }
    if !Path::new("/dev/fuse").exists() {
        return Some("no /dev/fuse (faultfs, the datastore, needs FUSE)".into());
    }
    if KEPT.load(Ordering::SeqCst) {
        return Some(format!("an earlier test kept its lab up ({KEEP_ENV}=1)"));
    }
    None
}

thread_local! {
    /// Why `E2e::up` could not run this thread's test: the harness then
    /// reports it ignored, not passed.
    pub static SKIPPED: std::cell::RefCell<Option<String>> = const { std::cell::RefCell::new(None) };
    /// The datastore of this thread's test (main.rs runs the block_ cases
    /// with Block): `E2e::up` builds its lab on it.
    pub static DATASTORE: std::cell::Cell<Datastore> = const { std::cell::Cell::new(Datastore::Dir) };
}

/// The datastore this thread's test runs on.
pub fn datastore() -> Datastore {
    DATASTORE.with(std::cell::Cell::get)
}

/// Whether storage holds a fence confirmation of `host` (S3(a) evidence),
/// read past faultfs: the dir datastore's `fenced/N` file, or the LUN's
/// fenced record (read from its backing file with the block store).
pub fn fence_confirmed_on_storage(host: u16) -> bool {
    match datastore() {
        Datastore::Dir => Path::new(LAB_DIR).join(format!("backing/cluster/fenced/{host}")).exists(),
        Datastore::Block => {
            let lun = havirt::lab::lun::backing_file(&format!("{}.img", havirt::lab::lun::LUN_NAME));
            let store = havirt::store::block::BlockStore::open(&lun, havirt::lab::cluster::CLUSTER)
                .unwrap_or_else(|e| panic!("the lab's LUN {}: {e}", lun.display()));
            let rec = store.read_fenced(havirt::engine::config::HostId(host));
            rec.unwrap_or_else(|e| panic!("fenced record of h{host} on {}: {e}", lun.display())).is_some()
        }
    }
}

// ------------------------------------------------------------------ E2e

/// One test's lab, watched by an observer from before the first fault to
/// the end. Dropping it during a panic copies the lab's logs to
/// `target/e2e-logs/NAME/` (and keeps the lab up with HAVIRT_E2E_KEEP=1).
pub struct E2e {
    name: &'static str,
    lab: Option<Lab>,
    observer: Option<Observer>,
    /// Where each domain ran when the lab had settled.
    pub before: BTreeMap<String, Vec<u16>>,
}

impl E2e {
    /// Builds the lab (`adjust` changes the spec), waits until it has
    /// settled and starts the observer. None: skipped (printed why).
    pub fn up(name: &'static str, adjust: impl FnOnce(&mut LabSpec)) -> Option<E2e> {
        if let Some(why) = unavailable() {
            println!("SKIPPED {name}: {why}");
            SKIPPED.with(|s| *s.borrow_mut() = Some(why));
            return None;
        }
        let mut spec = LabSpec::new(HOSTS, DOMAINS, PathBuf::from(env!("CARGO_BIN_EXE_havirt")));
        spec.datastore = datastore();
        adjust(&mut spec);
        // The block_ runs keep logs of their own.
        let name: &'static str = match spec.datastore {
            Datastore::Dir => name,
            Datastore::Block => Box::leak(format!("block_{name}").into_boxed_str()),
        };
        println!(
            "== {name}: lab up ({} hosts, {} domains, fencing {:?}, datastore {})",
            spec.hosts, spec.domains, spec.fencing, spec.datastore
        );
        let lab = Lab::up(spec).unwrap_or_else(|e| panic!("{name}: lab up: {e}"));
        let observer =
            Observer::start(lab.observer_hosts(), DEFAULT_INTERVAL).unwrap_or_else(|e| panic!("{name}: observer: {e}"));
        let before = lab.placement();
        let t = E2e { name, lab: Some(lab), observer: Some(observer), before };
        for (domain, hosts) in &t.before {
            assert_eq!(hosts.len(), 1, "{name}: settled, yet {domain} runs on {hosts:?}");
        }
        Some(t)
    }

    pub fn lab(&self) -> &Lab {
        self.lab.as_ref().expect("the lab is up until finish")
    }

    fn observer(&self) -> &Observer {
        self.observer.as_ref().expect("the observer runs until finish")
    }

    /// What the observer saw so far.
    pub fn seen(&self) -> Observation {
        self.observer().snapshot()
    }

    /// Injects `fault`; returns the instant just before it (a fault's
    /// time, as `Observation::recovery_after` wants it).
    pub fn fault(&mut self, fault: &Fault) -> Instant {
        println!("{}: fault {fault}", self.name);
        let t0 = now();
        let name = self.name;
        let lab = self.lab.as_mut().expect("the lab is up until finish");
        lab.fault(fault).unwrap_or_else(|e| panic!("{name}: fault {fault}: {e}"));
        t0
    }

    /// The master, as host 1..N's daemons see it (the first that names one,
    /// polled until one does).
    pub fn master(&self) -> u16 {
        let found = poll_until(SETTLE_WAIT, || {
            (1..=HOSTS).find_map(|n| self.lab().daemon_status(n).ok().and_then(|r| r.view.master).map(|m| m.0))
        });
        found.unwrap_or_else(|| panic!("{}: no daemon names a master within {SETTLE_WAIT:?}", self.name))
    }

    /// The domains that ran on `host` when the lab settled.
    pub fn domains_on(&self, host: u16) -> Vec<String> {
        self.before.iter().filter(|(_, on)| on.contains(&host)).map(|(d, _)| d.clone()).collect()
    }

    /// The host running the most domains that is not the master (lowest
    /// id on a tie): a failure of it shows fencing, not a master change.
    pub fn busiest_non_master(&self) -> u16 {
        let master = self.master();
        let victim = (1..=HOSTS)
            .filter(|h| *h != master)
            .max_by_key(|h| (self.domains_on(*h).len(), std::cmp::Reverse(*h)))
            .expect("3 hosts");
        assert!(!self.domains_on(victim).is_empty(), "{}: h{victim} runs no domain", self.name);
        victim
    }

    /// Polls the observer until each of `domains` runs again, lastingly,
    /// after the fault at `t0` (bounded by `wait`): see [`lasting_recovery`].
    pub fn wait_recovered(&self, domains: &[String], t0: Instant, wait: Duration) -> BTreeMap<String, Recovery> {
        let start = now();
        loop {
            let seen = self.seen();
            let since = seen.offset(t0);
            let found: BTreeMap<String, Recovery> =
                domains.iter().map(|d| (d.clone(), lasting_recovery(&seen, d, since))).collect();
            if found.values().all(|r| matches!(r, Recovery::Running { .. })) || start.elapsed() >= wait {
                return found;
            }
            std::thread::sleep(POLL);
        }
    }

    /// Asserts that each of `domains` stopped after the fault at `t0` and
    /// ran again (lastingly) within `[lower, upper]` of it, on exactly one
    /// host that `allowed` accepts. Returns each one's (recovery time, new
    /// host).
    pub fn assert_recovered(
        &self,
        domains: &[String],
        t0: Instant,
        lower: Duration,
        upper: Duration,
        allowed: impl Fn(u16) -> bool,
    ) -> BTreeMap<String, (Duration, u16)> {
        assert!(!domains.is_empty(), "{}: no domain to recover", self.name);
        let found = self.wait_recovered(domains, t0, upper + OVERRUN_WAIT);
        let mut out = BTreeMap::new();
        for (domain, r) in found {
            let (took, hosts, from) = match r {
                Recovery::Running { after, hosts, from } => (after, hosts, from),
                other => panic!("{}: {domain} {other:?} {:?} after the fault", self.name, upper + OVERRUN_WAIT),
            };
            let host = match hosts.as_slice() {
                [h] => h.strip_prefix('h').and_then(|n| n.parse::<u16>().ok()).expect("hosts are hN"),
                other => panic!("{}: {domain} ran again on {other:?}, not on one host", self.name),
            };
            println!(
                "RECOVERY {}: {domain} {from:?} -> h{host} in {:.2} s (bounds {:.2}..{:.2} s)",
                self.name,
                took.as_secs_f64(),
                lower.as_secs_f64(),
                upper.as_secs_f64()
            );
            assert!(took <= upper, "{}: {domain} ran again after {took:?}, bound {upper:?}", self.name);
            assert!(took >= lower, "{}: {domain} ran again after {took:?}, before {lower:?}", self.name);
            assert!(allowed(host), "{}: {domain} ran again on h{host}, which it must not", self.name);
            out.insert(domain, (took, host));
        }
        out
    }

    /// Asserts that `domains` never stopped since the observer started
    /// (no gap) and never ran on another host.
    pub fn assert_kept_running(&self, domains: &[String]) {
        let seen = self.seen();
        for d in domains {
            assert!(seen.key(d).is_some(), "{}: the observer never saw {d} running", self.name);
            let gaps = seen.gaps(d);
            assert!(gaps.is_empty(), "{}: {d} stopped: {gaps:?}", self.name);
            assert!(!seen.moved(d), "{}: {d} moved: {:?}", self.name, seen.timeline.get(&seen.key(d).expect("seen")));
        }
    }

    /// Asserts that every domain runs where it ran when the lab settled,
    /// and that the observer never saw one run on another host.
    /// Nothing moved, and every domain ran all along (the no-failure cases).
    pub fn assert_undisturbed(&self) {
        self.assert_nothing_moved();
        let all: Vec<String> = self.before.keys().cloned().collect();
        self.assert_kept_running(&all);
    }

    pub fn assert_nothing_moved(&self) {
        let now_placement = self.lab().placement();
        assert_eq!(now_placement, self.before, "{}: the placement changed", self.name);
        let seen = self.seen();
        for d in self.before.keys() {
            let key = seen.key(d);
            assert!(!seen.moved(d), "{}: {d} moved: {:?}", self.name, key.and_then(|k| seen.timeline.get(&k)));
        }
    }

    /// Waits (bounded) until the lab has settled again.
    pub fn settle(&self, timeout: Duration) {
        if let Err(e) = self.lab().wait_settled(timeout) {
            panic!("{}: {e}\n{}", self.name, self.lab().status_text());
        }
    }

    /// S1, checked now: the observer saw no domain on two hosts at once and
    /// no qemu refused an image lock (the observer's blind spot: a host
    /// whose libvirtd does not answer while its qemu runs).
    pub fn assert_s1(&self) {
        let seen = self.seen();
        assert!(!seen.truncated, "{}: the observer stopped sampling", self.name);
        assert!(seen.samples.len() > 1, "{}: the observer took no samples", self.name);
        assert!(seen.s1_violations.is_empty(), "{}: S1 broken: {:#?}", self.name, seen.s1_violations);
        let refusals = observer::lock_refusals(&observer::lab_qemu_logs(Path::new(LAB_DIR)))
            .unwrap_or_else(|e| panic!("{}: {e}", self.name));
        assert!(refusals.is_empty(), "{}: S1 broken, qemu image lock refused: {refusals:#?}", self.name);
    }

    /// The final S1 check, then the lab down.
    pub fn finish(mut self) {
        self.assert_s1();
        if let Some(o) = self.observer.take() {
            let seen = o.stop();
            println!("{}: observer: {} samples, no double run", self.name, seen.samples.len());
        }
        if let Some(lab) = self.lab.take() {
            lab.down().unwrap_or_else(|e| panic!("{}: lab down: {e}", self.name));
        }
    }

    /// Copies what explains a failure to `target/e2e-logs/NAME/`.
    fn save_logs(&self) {
        let dest = logs_dir().join(self.name);
        let _ = fs::remove_dir_all(&dest);
        if let Err(e) = fs::create_dir_all(&dest) {
            eprintln!("{}: cannot make {}: {e}", self.name, dest.display());
            return;
        }
        for (from, to) in lab_logs() {
            let target = dest.join(to);
            if let Some(parent) = target.parent() {
                let _ = fs::create_dir_all(parent);
            }
            let _ = fs::copy(&from, &target);
        }
        let mut report = String::new();
        if let Some(o) = &self.observer {
            let seen = o.snapshot();
            let _ =
                writeln!(report, "observer: {} samples; S1 violations: {:#?}", seen.samples.len(), seen.s1_violations);
            let _ = writeln!(
                report,
                "names: {:#?}\ntimeline (offsets from the observer's start): {:#?}",
                seen.names, seen.timeline
            );
        }
        let _ = writeln!(report, "placement when settled: {:?}", self.before);
        if let Some(lab) = &self.lab {
            let _ = writeln!(report, "\n{}", lab.status_text());
        }
        let _ = fs::write(dest.join("e2e-report.txt"), report);
        eprintln!("{}: lab logs copied to {}", self.name, dest.display());
    }
}

impl Drop for E2e {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            return;
        }
        self.save_logs();
        if std::env::var_os(KEEP_ENV).is_some_and(|v| v == "1")
            && let Some(lab) = self.lab.take()
        {
            KEPT.store(true, Ordering::SeqCst);
            eprintln!("{}: {KEEP_ENV}=1: the lab stays up ({LAB_DIR}); the next `lab up` removes it", self.name);
            std::mem::forget(lab);
        }
    }
}

/// `target/e2e-logs` (next to the havirt binary's profile directory).
fn logs_dir() -> PathBuf {
    let bin = Path::new(env!("CARGO_BIN_EXE_havirt"));
    bin.parent().and_then(Path::parent).unwrap_or(Path::new(".")).join("e2e-logs")
}

/// (file in the lab, its name in the copy): each host's daemon log,
/// console, libvirtd and qemu logs; faultfs's and the BMCs' logs.
fn lab_logs() -> Vec<(PathBuf, PathBuf)> {
    let lab = Path::new(LAB_DIR);
    let mut out = vec![(lab.join("faultfs.log"), PathBuf::from("faultfs.log"))];
    for n in 1..=HOSTS {
        let h = format!("h{n}");
        for f in ["havirt.log", "libvirtd.log", "console.log", "havirt.toml", "start"] {
            out.push((lab.join(&h).join(f), Path::new(&h).join(f)));
        }
        out.push((lab.join("bmc").join(&h).join("ipmi_sim.log"), Path::new(&h).join("ipmi_sim.log")));
        let qemu = lab.join(&h).join("log/qemu");
        for e in fs::read_dir(&qemu).into_iter().flatten().flatten() {
            out.push((e.path(), Path::new(&h).join("qemu").join(e.file_name())));
        }
    }
    out
}

/// A run shorter than this does not count as a recovery: a start that
/// fails (qemu refusing a disk lock, say) shows qemu in libvirt's list
/// for a moment.
pub const LASTING: Duration = Duration::from_secs(2);

/// What became of a domain after a fault, as the observer saw it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Recovery {
    /// It did not stop (yet).
    NeverStopped,
    /// It stopped and has not run again for LASTING (yet).
    NotRunningAgain,
    /// `after` the fault it ran again on `hosts` (it ran on `from` before)
    /// and kept running for LASTING at least.
    Running { after: Duration, hosts: Vec<String>, from: Vec<String> },
}

/// The first run of `domain` after a stop at or after `since` (an offset
/// from the observer's epoch) that lasted LASTING, or still runs and has
/// for LASTING.
pub fn lasting_recovery(seen: &Observation, domain: &str, since: Duration) -> Recovery {
    let gaps: Vec<Gap> = seen.gaps(domain).into_iter().filter(|g| g.stopped_at >= since).collect();
    let Some(first) = gaps.first() else { return Recovery::NeverStopped };
    let last_sample = seen.samples.last().map_or(Duration::ZERO, |s| s.at);
    for (i, g) in gaps.iter().enumerate() {
        let Some(again) = g.running_again_at else { break };
        let until = gaps.get(i + 1).map_or(last_sample, |next| next.stopped_at);
        if until.saturating_sub(again) >= LASTING {
            let from = first.hosts_before.clone();
            return Recovery::Running { after: again.saturating_sub(since), hosts: g.hosts_after.clone(), from };
        }
    }
    Recovery::NotRunningAgain
}

/// Calls `f` every POLL until it gives Some, or `timeout` passed.
pub fn poll_until<T>(timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let start = now();
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if start.elapsed() >= timeout {
            return None;
        }
        std::thread::sleep(POLL);
    }
}

/// The qemu process of each domain running on `host`: domain name -> pid.
pub fn qemu_pids(lab: &Lab, host: u16) -> BTreeMap<String, u32> {
    let Ok(h) = lab.host(host) else { return BTreeMap::new() };
    let mut out = BTreeMap::new();
    for pid in h.pids() {
        let Ok(raw) = fs::read(format!("/proc/{pid}/cmdline")) else { continue };
        let argv: Vec<String> = raw.split(|b| *b == 0).map(|a| String::from_utf8_lossy(a).into_owned()).collect();
        if !argv.first().is_some_and(|a| a.contains("qemu-system")) {
            continue;
        }
        let guest = argv.iter().find_map(|a| a.strip_prefix("guest=")).and_then(|g| g.split(',').next());
        if let Some(name) = guest {
            out.insert(name.to_string(), pid);
        }
    }
    out
}
