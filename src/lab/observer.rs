//! The outside observer of the end-to-end tests (issue 4, "An outside
//! observer"): it watches what really runs on every host, independently of
//! havirt, and turns that into S1 evidence and recovery times.
//!
//! [`Observer`] lists the domains of every host's libvirtd (one
//! [`LibvirtHypervisor`] connection per host) every `interval` on a thread
//! of its own, and keeps the [`Sample`]s. [`Observation::from_samples`] — pure,
//! unit-tested on synthetic samples — turns them into:
//!
//! - `s1_violations`: every stretch of samples in which one domain runs on
//!   two or more hosts ([`DoubleRun`]);
//! - `timeline`: per domain, its running [`Interval`]s per host; its
//!   [`Gap`]s (runs nowhere) and [`Observation::recovery_after`] follow.
//!
//! Definitions, used throughout:
//!
//! - A domain *runs* on a host in a sample when that host's libvirtd listed
//!   it running (`PowerState::Running`: its vCPUs run guest code). A paused
//!   qemu runs none: a live migration leaves the domain paused on its
//!   target until the lease is handed over, and pauses it on its source for
//!   the switchover, so S1 counts guest execution; a paused qemu that holds
//!   image locks shows in [`lock_refusals`]. Domains are keyed by uuid: the lab defines a domain
//!   with the same uuid on every host, and that identity is what S1 counts.
//! - A host whose libvirtd does not answer (refused, failed call) is
//!   recorded as [`HostView::Unreachable`] for that sample and **counts as
//!   running nothing**, for S1 and for downtime alike: in the lab a host
//!   that does not answer is a powered-off host, and a powered-off host runs
//!   nothing. Caveat: a host whose libvirtd is hung (SIGSTOP) while its qemu
//!   still runs is counted as running nothing too, which hides a double
//!   run; qemu's image lock refusals ([`lock_refusals`]) catch that case, so
//!   an S1 check should look at both.
//! - Time is the offset from the observer's `epoch` (a monotonic instant;
//!   `epoch_wall_ms` gives the wall clock). A sample's `at` is when its
//!   round of listings *ended*: every state in it held at some moment
//!   between `started` and `at`. A stop is therefore seen no earlier than
//!   it happened, and a start is dated no earlier than it happened.
//! - A sample lists hosts one after the other, so a domain that moves
//!   between hosts within a few milliseconds could look like a double run
//!   (or a gap could be missed entirely). havirt's takeovers involve
//!   fencing or a lease expiry, seconds long, so neither happens in
//!   practice; a reported double run is real evidence.

use crate::hypervisor::{Hypervisor, LibvirtHypervisor, LibvirtOptions, uuid_string};
use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// The default sampling interval (issue 4: every 100 ms).
pub const DEFAULT_INTERVAL: Duration = Duration::from_millis(100);
/// Samples kept; when reached the observer stops sampling and the
/// observation says `truncated` (5.5 h at 100 ms).
pub const SAMPLES_MAX: usize = 200_000;
/// How often the thread checks for `stop` while it waits for the next round.
pub const STOP_POLL: Duration = Duration::from_millis(20);
/// Keepalive of the observer's connections: a hung libvirtd fails the round's
/// call after about (count + 1) x interval = 3 s, instead of stalling the
/// observer for good.
pub const KEEPALIVE_INTERVAL_S: i32 = 1;
pub const KEEPALIVE_COUNT: u32 = 2;
/// What qemu logs when its image lock refuses a second writer (S1 evidence).
pub const LOCK_REFUSAL: &str = "Failed to get \"write\" lock";

#[derive(Debug, thiserror::Error)]
pub enum ObserverError {
    #[error("observer: cannot start its thread: {0}")]
    Spawn(String),
    #[error("observer: cannot read log {path}: {reason}")]
    ReadLog { path: PathBuf, reason: String },
}

/// What one host's libvirtd said in one sample.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HostView {
    /// The domains with a qemu process: uuid -> name.
    Up { running: BTreeMap<String, String> },
    /// libvirtd did not answer: the host counts as running nothing.
    Unreachable { error: String },
}

impl HostView {
    pub fn runs(&self, domain: &str) -> bool {
        matches!(self, HostView::Up { running } if running.contains_key(domain))
    }
}

/// One round of listings over every host.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Sample {
    pub started: Duration,
    pub at: Duration,
    pub hosts: BTreeMap<String, HostView>,
}

impl Sample {
    /// The hosts running `domain` (uuid) in this sample, by name order.
    pub fn running_hosts(&self, domain: &str) -> Vec<String> {
        self.hosts.iter().filter(|(_, v)| v.runs(domain)).map(|(h, _)| h.clone()).collect()
    }
}

/// S1 evidence: consecutive samples in which `domain` ran on all `hosts`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DoubleRun {
    pub domain: String,
    pub name: String,
    pub hosts: Vec<String>,
    pub first_seen: Duration,
    pub last_seen: Duration,
    pub samples: u64,
}

/// A domain running on one host, from the first to the last sample that
/// showed it there; `stopped_seen`: the first sample after that (which
/// showed it not running there, or the host unreachable), `None` when it
/// still ran at the last sample.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Interval {
    pub host: String,
    pub first_seen: Duration,
    pub last_seen: Duration,
    pub stopped_seen: Option<Duration>,
}

/// A stretch of samples in which a domain that had run ran on no host.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Gap {
    /// The last sample before the gap (it ran there, on `hosts_before`).
    pub last_running_at: Duration,
    pub hosts_before: Vec<String>,
    /// The first sample of the gap: it had stopped by then.
    pub stopped_at: Duration,
    /// The first sample after the gap (it ran again, on `hosts_after`);
    /// `None`: still stopped at the last sample.
    pub running_again_at: Option<Duration>,
    pub hosts_after: Vec<String>,
}

/// Everything an observer saw, and what follows from it.
#[derive(Clone, Debug)]
pub struct Observation {
    pub epoch: Instant,
    pub epoch_wall_ms: u64,
    pub samples: Vec<Sample>,
    pub s1_violations: Vec<DoubleRun>,
    /// Per domain uuid: its running intervals, by first_seen then host.
    pub timeline: BTreeMap<String, Vec<Interval>>,
    /// uuid -> name, of every domain seen running.
    pub names: BTreeMap<String, String>,
    /// Sampling stopped at [`SAMPLES_MAX`].
    pub truncated: bool,
}

impl Observation {
    /// The pure analysis of `samples` (in time order).
    pub fn from_samples(epoch: Instant, epoch_wall_ms: u64, samples: Vec<Sample>) -> Observation {
        let names = names_of(&samples);
        let s1_violations = double_runs(&samples, &names);
        let timeline = intervals(&samples, &names);
        Observation { epoch, epoch_wall_ms, samples, s1_violations, timeline, names, truncated: false }
    }

    /// `domain` as a uuid key: a uuid seen running, or the name of one.
    pub fn key(&self, domain: &str) -> Option<String> {
        if self.names.contains_key(domain) {
            return Some(domain.to_string());
        }
        self.names.iter().find(|(_, n)| n.as_str() == domain).map(|(u, _)| u.clone())
    }

    /// The offset of `t` from the epoch (zero before it).
    pub fn offset(&self, t: Instant) -> Duration {
        t.saturating_duration_since(self.epoch)
    }

    /// The gaps of `domain` (uuid or name), in time order. Before the first
    /// sample showing it running there is no gap (it had not run yet).
    pub fn gaps(&self, domain: &str) -> Vec<Gap> {
        let Some(key) = self.key(domain) else { return Vec::new() };
        let mut gaps: Vec<Gap> = Vec::new();
        let mut last: Option<(Duration, Vec<String>)> = None;
        let mut open: Option<Gap> = None;
        for s in &self.samples {
            let hosts = s.running_hosts(&key);
            match (hosts.is_empty(), open.take()) {
                (true, Some(g)) => open = Some(g),
                (true, None) => {
                    open = last.take().map(|(at, before)| Gap {
                        last_running_at: at,
                        hosts_before: before,
                        stopped_at: s.at,
                        running_again_at: None,
                        hosts_after: Vec::new(),
                    })
                }
                (false, g) => {
                    if let Some(mut g) = g {
                        g.running_again_at = Some(s.at);
                        g.hosts_after = hosts.clone();
                        gaps.push(g);
                    }
                    last = Some((s.at, hosts));
                }
            }
        }
        gaps.extend(open);
        gaps
    }

    /// Time from a fault to `domain` running again: `running_again_at -
    /// fault` of the first gap whose `stopped_at` is at or after the fault
    /// (the first sample that saw it down since the fault). Take `fault_at`
    /// just *before* injecting the fault. An upper bound, too long by at
    /// most one interval plus one round. `None`: no such gap (the fault did
    /// not stop it, or the stop and restart fell between two samples), or
    /// it has not run again yet.
    pub fn recovery_after(&self, domain: &str, fault_at: Instant) -> Option<Duration> {
        self.recovery_after_offset(domain, self.offset(fault_at))
    }

    /// [`Observation::recovery_after`] with the fault as an offset from the epoch.
    pub fn recovery_after_offset(&self, domain: &str, fault: Duration) -> Option<Duration> {
        let gap = self.gaps(domain).into_iter().find(|g| g.stopped_at >= fault)?;
        gap.running_again_at.map(|t| t.saturating_sub(fault))
    }

    /// Whether `domain` (uuid or name) ran on more than one host.
    pub fn moved(&self, domain: &str) -> bool {
        let Some(key) = self.key(domain) else { return false };
        let hosts: BTreeSet<&str> = self.timeline.get(&key).into_iter().flatten().map(|i| i.host.as_str()).collect();
        hosts.len() > 1
    }

    /// The S1 violations about `domain` (uuid or name).
    pub fn double_runs_of(&self, domain: &str) -> Vec<&DoubleRun> {
        let key = self.key(domain);
        self.s1_violations.iter().filter(|d| Some(&d.domain) == key.as_ref()).collect()
    }

    /// The samples in which `host` did not answer.
    pub fn unreachable_samples(&self, host: &str) -> usize {
        let down = |s: &&Sample| matches!(s.hosts.get(host), Some(HostView::Unreachable { .. }));
        self.samples.iter().filter(down).count()
    }
}

fn names_of(samples: &[Sample]) -> BTreeMap<String, String> {
    let mut names = BTreeMap::new();
    for view in samples.iter().flat_map(|s| s.hosts.values()) {
        if let HostView::Up { running } = view {
            for (uuid, name) in running {
                names.entry(uuid.clone()).or_insert_with(|| name.clone());
            }
        }
    }
    names
}

fn double_runs(samples: &[Sample], names: &BTreeMap<String, String>) -> Vec<DoubleRun> {
    let mut out: Vec<DoubleRun> = Vec::new();
    // Per domain: the index in `out` of its double run still going on.
    let mut open: BTreeMap<&str, usize> = BTreeMap::new();
    for s in samples {
        let mut still: BTreeMap<&str, usize> = BTreeMap::new();
        for (uuid, name) in names {
            let hosts = s.running_hosts(uuid);
            if hosts.len() < 2 {
                continue;
            }
            match open.get(uuid.as_str()) {
                Some(&i) if out[i].hosts == hosts => {
                    out[i].last_seen = s.at;
                    out[i].samples += 1;
                    still.insert(uuid, i);
                }
                _ => {
                    let (first_seen, last_seen) = (s.at, s.at);
                    let (domain, name) = (uuid.clone(), name.clone());
                    out.push(DoubleRun { domain, name, hosts, first_seen, last_seen, samples: 1 });
                    still.insert(uuid, out.len() - 1);
                }
            }
        }
        open = still;
    }
    out
}

fn intervals(samples: &[Sample], names: &BTreeMap<String, String>) -> BTreeMap<String, Vec<Interval>> {
    let mut timeline: BTreeMap<String, Vec<Interval>> = BTreeMap::new();
    for uuid in names.keys() {
        let mut done: Vec<Interval> = Vec::new();
        let mut open: BTreeMap<&str, Interval> = BTreeMap::new();
        for s in samples {
            for (host, view) in &s.hosts {
                match (view.runs(uuid), open.get_mut(host.as_str())) {
                    (true, Some(i)) => i.last_seen = s.at,
                    (true, None) => {
                        let (first_seen, last_seen) = (s.at, s.at);
                        open.insert(host, Interval { host: host.clone(), first_seen, last_seen, stopped_seen: None });
                    }
                    (false, Some(_)) => {
                        let mut i = open.remove(host.as_str()).expect("present");
                        i.stopped_seen = Some(s.at);
                        done.push(i);
                    }
                    (false, None) => {}
                }
            }
        }
        done.extend(open.into_values());
        done.sort_by(|a, b| (a.first_seen, &a.host).cmp(&(b.first_seen, &b.host)));
        timeline.insert(uuid.clone(), done);
    }
    timeline
}

// ---------------------------------------------------------------- qemu logs

/// One line where qemu's image lock refused a second writer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LockRefusal {
    pub file: PathBuf,
    /// 1-based.
    pub line_no: usize,
    pub line: String,
}

/// The lines of `files` containing [`LOCK_REFUSAL`], in the order given. A
/// missing file has none (a host that never ran the domain has no log).
pub fn lock_refusals(files: &[PathBuf]) -> Result<Vec<LockRefusal>, ObserverError> {
    let mut out = Vec::new();
    for file in files {
        let bytes = match std::fs::read(file) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(ObserverError::ReadLog { path: file.clone(), reason: e.to_string() }),
        };
        let text = String::from_utf8_lossy(&bytes);
        for (i, line) in text.lines().enumerate() {
            if line.contains(LOCK_REFUSAL) {
                out.push(LockRefusal { file: file.clone(), line_no: i + 1, line: line.to_string() });
            }
        }
    }
    Ok(out)
}

/// The lab's qemu logs: `LAB_DIR/h*/log/qemu/*.log`, sorted.
pub fn lab_qemu_logs(lab_dir: &Path) -> Vec<PathBuf> {
    let list = |dir: &Path| -> Vec<PathBuf> {
        let mut v: Vec<PathBuf> = std::fs::read_dir(dir).into_iter().flatten().flatten().map(|e| e.path()).collect();
        v.sort();
        v
    };
    let hosts = list(lab_dir).into_iter().filter(|p| {
        let name = p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        name.strip_prefix('h').is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
    });
    hosts.flat_map(|h| list(&h.join("log/qemu"))).filter(|p| p.extension().is_some_and(|e| e == "log")).collect()
}

// ---------------------------------------------------------------- the thread

#[allow(
    clippy::disallowed_methods,
    reason = "the observer samples real hosts on real time; lab tooling, not the engine"
)]
fn clock() -> (Instant, u64) {
    let wall = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
    (Instant::now(), u64::try_from(wall.as_millis()).unwrap_or(u64::MAX))
}

struct Shared {
    samples: Vec<Sample>,
    truncated: bool,
}

/// A running observer (see the module doc).
pub struct Observer {
    epoch: Instant,
    epoch_wall_ms: u64,
    stop: Arc<AtomicBool>,
    shared: Arc<Mutex<Shared>>,
    thread: Option<JoinHandle<()>>,
}

impl Observer {
    /// Starts sampling `hosts` (name, libvirt URI) every `interval`. The
    /// first round starts at once; a round that takes longer than
    /// `interval` delays the next (rounds never overlap).
    pub fn start(hosts: Vec<(String, String)>, interval: Duration) -> Result<Observer, ObserverError> {
        let (epoch, epoch_wall_ms) = clock();
        let stop = Arc::new(AtomicBool::new(false));
        let shared = Arc::new(Mutex::new(Shared { samples: Vec::new(), truncated: false }));
        let (t_stop, t_shared) = (Arc::clone(&stop), Arc::clone(&shared));
        let thread = std::thread::Builder::new()
            .name("lab-observer".into())
            .spawn(move || run(hosts, interval, epoch, &t_stop, &t_shared))
            .map_err(|e| ObserverError::Spawn(e.to_string()))?;
        Ok(Observer { epoch, epoch_wall_ms, stop, shared, thread: Some(thread) })
    }

    pub fn epoch(&self) -> Instant {
        self.epoch
    }

    /// What was seen so far (the observer goes on).
    pub fn snapshot(&self) -> Observation {
        let shared = self.shared.lock().unwrap_or_else(PoisonError::into_inner);
        let mut o = Observation::from_samples(self.epoch, self.epoch_wall_ms, shared.samples.clone());
        o.truncated = shared.truncated;
        o
    }

    /// Stops (after the round under way) and returns everything seen.
    pub fn stop(mut self) -> Observation {
        self.shutdown();
        self.snapshot()
    }

    fn shutdown(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take()
            && t.join().is_err()
        {
            tracing::warn!("lab observer: its thread panicked");
        }
    }
}

impl Drop for Observer {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn run(hosts: Vec<(String, String)>, interval: Duration, epoch: Instant, stop: &AtomicBool, shared: &Mutex<Shared>) {
    let mut conns: Vec<Option<LibvirtHypervisor>> = hosts.iter().map(|_| None).collect();
    let mut next = Duration::ZERO;
    while !stop.load(Ordering::SeqCst) {
        let started = clock().0.saturating_duration_since(epoch);
        if started < next {
            std::thread::sleep((next - started).min(STOP_POLL));
            continue;
        }
        let mut views = BTreeMap::new();
        for ((name, uri), conn) in hosts.iter().zip(conns.iter_mut()) {
            views.insert(name.clone(), view(uri, conn));
        }
        let at = clock().0.saturating_duration_since(epoch);
        let mut s = shared.lock().unwrap_or_else(PoisonError::into_inner);
        if s.samples.len() >= SAMPLES_MAX {
            s.truncated = true;
            return;
        }
        s.samples.push(Sample { started, at, hosts: views });
        drop(s);
        next = (next + interval).max(at);
    }
}

/// One host's listing, (re)connecting when needed.
fn view(uri: &str, conn: &mut Option<LibvirtHypervisor>) -> HostView {
    if conn.is_none() {
        let mut opts = LibvirtOptions::new(uri);
        if opts.keepalive_interval_s > 0 {
            opts.keepalive_interval_s = KEEPALIVE_INTERVAL_S;
            opts.keepalive_count = KEEPALIVE_COUNT;
        }
        match LibvirtHypervisor::open(opts) {
            Ok(c) => *conn = Some(c),
            Err(e) => return HostView::Unreachable { error: e.to_string() },
        }
    }
    let listed = conn.as_ref().map(|c| c.list());
    match listed {
        Some(Ok(domains)) => HostView::Up {
            running: domains
                .into_iter()
                .filter(|d| d.state == crate::hypervisor::PowerState::Running)
                .map(|d| (uuid_string(d.id), d.name))
                .collect(),
        },
        Some(Err(e)) => {
            // A broken connection (libvirtd restarted, host rebooted): next round reconnects.
            *conn = None;
            HostView::Unreachable { error: e.to_string() }
        }
        None => HostView::Unreachable { error: "no connection".into() },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str = "00000000-0000-0000-0000-00000000000a";
    const B: &str = "00000000-0000-0000-0000-00000000000b";

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    /// A sample at `at` ms: per host, `Some(running uuids)` or `None` (unreachable).
    fn sample(at: u64, hosts: &[(&str, Option<&[&str]>)]) -> Sample {
        let view = |running: &Option<&[&str]>| match running {
            Some(r) => {
                HostView::Up { running: r.iter().map(|u| (u.to_string(), format!("dom-{}", &u[35..]))).collect() }
            }
            None => HostView::Unreachable { error: "connection refused".into() },
        };
        let hosts = hosts.iter().map(|(h, r)| (h.to_string(), view(r))).collect();
        Sample { started: ms(at.saturating_sub(5)), at: ms(at), hosts }
    }

    fn observe(samples: Vec<Sample>) -> Observation {
        #[allow(clippy::disallowed_methods, reason = "an epoch for synthetic offsets")]
        let epoch = Instant::now();
        Observation::from_samples(epoch, 0, samples)
    }

    #[test]
    fn a_double_run_is_reported_once_per_stretch() {
        let o = observe(vec![
            sample(0, &[("h1", Some(&[A, B])), ("h2", Some(&[]))]),
            sample(100, &[("h1", Some(&[A])), ("h2", Some(&[A]))]),
            sample(200, &[("h1", Some(&[A])), ("h2", Some(&[A, B]))]),
            sample(300, &[("h1", Some(&[])), ("h2", Some(&[A]))]),
            sample(400, &[("h1", Some(&[A])), ("h2", Some(&[A]))]),
        ]);
        let expected = |first, last, samples| DoubleRun {
            domain: A.into(),
            name: "dom-a".into(),
            hosts: vec!["h1".into(), "h2".into()],
            first_seen: ms(first),
            last_seen: ms(last),
            samples,
        };
        assert_eq!(o.s1_violations, vec![expected(100, 200, 2), expected(400, 400, 1)]);
        assert_eq!(o.double_runs_of("dom-a").len(), 2);
        assert!(o.double_runs_of(B).is_empty());
    }

    #[test]
    fn an_unreachable_host_runs_nothing() {
        let o = observe(vec![
            sample(0, &[("h1", Some(&[A])), ("h2", Some(&[]))]),
            sample(100, &[("h1", None), ("h2", Some(&[A]))]),
            sample(200, &[("h1", None), ("h2", Some(&[A]))]),
        ]);
        assert!(o.s1_violations.is_empty(), "a powered-off host runs nothing");
        assert_eq!(o.unreachable_samples("h1"), 2);
        assert_eq!(o.unreachable_samples("h2"), 0);
        assert!(o.gaps(A).is_empty(), "it ran somewhere in every sample");
        assert!(o.moved(A));
        assert_eq!(o.timeline[A][0].stopped_seen, Some(ms(100)));
    }

    #[test]
    fn a_gap_and_its_recovery_on_another_host() {
        let o = observe(vec![
            sample(0, &[("h1", Some(&[])), ("h2", Some(&[]))]),
            sample(100, &[("h1", Some(&[A, B])), ("h2", Some(&[]))]),
            sample(200, &[("h1", Some(&[A, B])), ("h2", Some(&[]))]),
            sample(300, &[("h1", None), ("h2", Some(&[]))]),
            sample(400, &[("h1", Some(&[])), ("h2", Some(&[B]))]),
            sample(500, &[("h1", Some(&[])), ("h2", Some(&[A, B]))]),
            sample(600, &[("h1", Some(&[])), ("h2", Some(&[B]))]),
        ]);
        let gaps = o.gaps("dom-a");
        assert_eq!(gaps.len(), 2, "{gaps:?}");
        let g = &gaps[0];
        assert_eq!((g.last_running_at, g.stopped_at, g.running_again_at), (ms(200), ms(300), Some(ms(500))));
        assert_eq!((g.hosts_before.clone(), g.hosts_after.clone()), (vec!["h1".into()], vec!["h2".into()]));
        assert_eq!((gaps[1].stopped_at, gaps[1].running_again_at), (ms(600), None));
        // The fault at 250 ms: first seen down at 300, running again at 500.
        assert_eq!(o.recovery_after_offset(A, ms(250)), Some(ms(250)));
        assert_eq!(o.recovery_after(A, o.epoch + ms(250)), Some(ms(250)));
        // A later fault meets the second gap, which has not ended.
        assert_eq!(o.recovery_after_offset(A, ms(550)), None);
        // B was down only for the sample at 300.
        assert_eq!(o.recovery_after_offset(B, ms(250)), Some(ms(150)));
        assert!(o.moved(A) && o.moved("dom-b"));
        assert!(o.s1_violations.is_empty());
        let on = |host: &str, first, last, stopped| Interval {
            host: host.into(),
            first_seen: ms(first),
            last_seen: ms(last),
            stopped_seen: stopped,
        };
        assert_eq!(o.timeline[A], vec![on("h1", 100, 200, Some(ms(300))), on("h2", 500, 500, Some(ms(600)))]);
        assert_eq!(o.timeline[B], vec![on("h1", 100, 200, Some(ms(300))), on("h2", 400, 600, None)]);
    }

    #[test]
    fn no_gap_before_the_first_run_and_unknown_domains_are_empty() {
        let o = observe(vec![sample(0, &[("h1", Some(&[]))]), sample(100, &[("h1", Some(&[A]))])]);
        assert!(o.gaps(A).is_empty());
        assert!(!o.moved(A));
        assert_eq!(o.recovery_after_offset(A, ms(0)), None);
        assert!(o.gaps("nothing").is_empty() && !o.moved("nothing"));
        assert_eq!(o.key("dom-a").as_deref(), Some(A));
    }

    #[test]
    fn lock_refusals_are_found_in_logs() {
        let dir = std::env::temp_dir().join(format!("havirt-observer-logs-{}", std::process::id()));
        let qemu = dir.join("h2/log/qemu");
        std::fs::create_dir_all(&qemu).expect("dir");
        std::fs::create_dir_all(dir.join("bmc")).expect("dir");
        let line = "2025-01-01T00:00:00.000000Z qemu-system-x86_64: -blockdev {...}: Failed to get \"write\" lock";
        std::fs::write(qemu.join("tiny.log"), format!("starting up\n{line}\nIs another process using the image?\n"))
            .expect("write");
        std::fs::write(qemu.join("tiny.log.old"), format!("{line}\n")).expect("write");
        let logs = lab_qemu_logs(&dir);
        assert_eq!(logs, vec![qemu.join("tiny.log")]);
        let mut files = logs.clone();
        files.push(dir.join("h3/log/qemu/missing.log"));
        let found = lock_refusals(&files).expect("scan");
        assert_eq!(found, vec![LockRefusal { file: qemu.join("tiny.log"), line_no: 2, line: line.into() }]);
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }
}
