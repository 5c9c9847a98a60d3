//! Failover timelines: for every host failure this daemon acted on (fenced
//! it, or moved its leases as master), one record of what happened when,
//! relative to the detection: its last heartbeat, the detection, each fence
//! attempt, and per domain the lease taken, the define+start reported, the
//! start and the readiness on the survivor. `havirt events --failovers`
//! shows them; the daemon logs one summary event per failover.
//!
//! Built by the daemon from what it already has, with no change to the
//! engine: the engine's view (verdicts, heartbeat ages, where each domain is
//! reported and in which state, as the master reads every slot), the fence
//! and lease compare-and-swap actions it executes, and their results. A
//! remote survivor's progress is known when its slot is next read (every
//! storage_read_interval); a local one's at once.
//!
//! Plain data and no I/O: times are the daemon's engine clock
//! (`engine::time::Instant`), wall time is passed in for display.

use crate::engine::config::{DomainId, HostId};
use crate::engine::io::{BootId, CasOutcome, DomainState, FenceOutcome, Lease, LeaseKey, LeaseReason, OpId};
use crate::engine::time::{Duration, Instant};
use crate::engine::view::NodeView;
use crate::metrics::Metrics;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, VecDeque};
use std::fmt::Write as _;

/// Failover records kept (the oldest go first).
pub const FAILOVERS_KEPT: usize = 32;
/// Host-level steps (fence attempts and results) kept per failover: a
/// fence chain gives up after 10 rounds.
pub const STEPS_KEPT: usize = 64;
/// How long after its detection a failover's domains are followed (a
/// domain that takes longer shows no later step).
pub const FOLLOW_FOR: Duration = Duration::from_secs(600);
/// Fence calls and lease moves awaiting their result; more are not
/// followed (each ends or times out within seconds).
pub const PENDING_MAX: usize = 1024;

/// One failover as `havirt events --failovers` shows it. Times are
/// milliseconds after the detection.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FailoverRecord {
    pub host: String,
    pub host_id: HostId,
    pub boot: Option<BootId>,
    /// Wall-clock time of the detection (ms since the Unix epoch).
    pub detected_unix_ms: u64,
    /// The verdict that was the detection (suspect, storage-lost, isolated).
    pub verdict: String,
    /// How long before the detection its last heartbeat (network or
    /// storage, whichever came later) reached this host, if it ever did.
    pub silent_before_ms: Option<u64>,
    /// Fence attempts and their results.
    pub steps: Vec<Step>,
    pub domains: Vec<DomainTimeline>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Step {
    pub after_ms: u64,
    pub text: String,
}

/// One domain moved off the failed host.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DomainTimeline {
    pub name: String,
    /// The survivor.
    pub to: String,
    pub generation: u64,
    /// Why its lease could move (S3): "fence confirmed", "host_dead_timeout", "released".
    pub reason: String,
    pub lease_ms: u64,
    /// The survivor reported it defining and starting.
    pub starting_ms: Option<u64>,
    /// ... running (qemu started).
    pub running_ms: Option<u64>,
    /// ... ready (its readiness condition holds).
    pub ready_ms: Option<u64>,
}

/// What this daemon knows of one peer, from its views.
#[derive(Clone, Debug, Default)]
struct HostTrack {
    /// Since when it has been in trouble (suspect, storage-lost, isolated),
    /// and with which verdict that began.
    trouble: Option<(Instant, String)>,
    /// Its last heartbeat as known when the trouble began.
    last_sign: Option<Instant>,
    boot: Option<BootId>,
    /// Its verdict in the last view.
    verdict: String,
    /// Its verdicts since the trouble began, for the failover opened later.
    changes: Vec<Step>,
}

struct Tracked {
    /// The trouble streak this failover belongs to (its detection).
    detected_at: Instant,
    last_sign: Option<Instant>,
    record: FailoverRecord,
    /// Domain -> (survivor, lease generation, index in record.domains).
    moved: BTreeMap<DomainId, (HostId, u64, usize)>,
    summarized: bool,
}

/// A lease move in flight: the domain, the host it leaves, the new lease.
type PendingCas = (DomainId, HostId, Lease);

/// Builds failover records; see the module doc for what feeds it.
pub struct Failovers {
    me: HostId,
    hosts: BTreeMap<HostId, HostTrack>,
    host_names: BTreeMap<HostId, String>,
    domain_names: BTreeMap<DomainId, String>,
    /// Where each domain was last reported starting or running.
    domain_host: BTreeMap<DomainId, HostId>,
    fences: BTreeMap<OpId, (HostId, String)>,
    cas: BTreeMap<OpId, PendingCas>,
    list: VecDeque<Tracked>,
}

const TROUBLE: [&str; 3] = ["suspect", "storage-lost", "isolated"];

fn ms(d: Duration) -> u64 {
    d.as_millis()
}

fn reason_word(r: LeaseReason) -> &'static str {
    match r {
        LeaseReason::FenceConfirmed => "fence confirmed",
        LeaseReason::HostDeadTimeout => "host_dead_timeout",
        LeaseReason::Released => "released",
        LeaseReason::Acquired => "free",
        LeaseReason::Renewed => "renewed",
        LeaseReason::Migrated => "migrated",
        LeaseReason::Stopped => "stopped on purpose",
    }
}

/// The `reason` label of `havirt_failovers_total`.
fn reason_label(r: &str) -> &'static str {
    match r {
        "fence confirmed" => "fence_confirmed",
        "host_dead_timeout" => "host_dead_timeout",
        _ => "released",
    }
}

impl Failovers {
    pub fn new(me: HostId) -> Failovers {
        Failovers {
            me,
            hosts: BTreeMap::new(),
            host_names: BTreeMap::new(),
            domain_names: BTreeMap::new(),
            domain_host: BTreeMap::new(),
            fences: BTreeMap::new(),
            cas: BTreeMap::new(),
            list: VecDeque::new(),
        }
    }

    /// The records, oldest first.
    pub fn records(&self) -> Vec<FailoverRecord> {
        self.list.iter().map(|t| t.record.clone()).collect()
    }

    /// A view of the engine at `now`. Returns the summary of each failover whose domains all run again
    /// now, for the event log; counts them in `metrics`.
    pub fn observe(&mut self, now: Instant, view: &NodeView, metrics: &Metrics) -> Vec<String> {
        let mut changed = Vec::new();
        for h in &view.hosts {
            self.host_names.insert(h.id, h.name.clone());
            if h.id == self.me {
                continue;
            }
            let t = self.hosts.entry(h.id).or_default();
            if t.verdict != h.verdict {
                t.verdict.clone_from(&h.verdict);
                if let Some((since, _)) = t.trouble {
                    let step = Step { after_ms: ms(now.since(since)), text: format!("{} {}", h.name, h.verdict) };
                    if t.changes.len() < STEPS_KEPT {
                        t.changes.push(step.clone());
                    }
                    changed.push((h.id, since, step));
                }
            }
            t.boot = h.boot.or(t.boot);
            if TROUBLE.contains(&h.verdict.as_str()) {
                if t.trouble.is_none() {
                    t.trouble = Some((now, h.verdict.clone()));
                    t.changes.clear();
                    let age = match (h.net_age, h.slot_age) {
                        (Some(a), Some(b)) => Some(a.min(b)),
                        (a, b) => a.or(b),
                    };
                    t.last_sign = age.map(|a| now - a);
                }
            } else if h.verdict != "unknown" {
                t.trouble = None;
            }
        }
        // A failed host's later verdicts (storage-lost, then suspect; alive
        // again when it returns) join its open failover.
        for (host, since, step) in changed {
            let open = self.list.iter_mut().find(|t| t.record.host_id == host && t.detected_at == since);
            if let Some(t) = open.filter(|t| t.record.steps.len() < STEPS_KEPT) {
                t.record.steps.push(step);
            }
        }
        for d in &view.domains {
            self.domain_names.insert(d.id, d.name.clone());
            let Some(h) = d.host else { continue };
            if matches!(d.state, Some(DomainState::Starting | DomainState::Running | DomainState::Ready)) {
                self.domain_host.insert(d.id, h);
            }
        }
        self.follow(now, view, metrics)
    }

    fn follow(&mut self, now: Instant, view: &NodeView, metrics: &Metrics) -> Vec<String> {
        let mut done = Vec::new();
        for t in self.list.iter_mut().filter(|t| now.since(t.detected_at) <= FOLLOW_FOR) {
            let after = ms(now.since(t.detected_at));
            for d in &view.domains {
                let Some(&(to, generation, i)) = t.moved.get(&d.id) else { continue };
                if d.host != Some(to) || d.generation.is_none_or(|g| g < generation) {
                    continue;
                }
                let step = &mut t.record.domains[i];
                let reached = match d.state {
                    Some(DomainState::Starting) => 1,
                    Some(DomainState::Running) => 2,
                    Some(DomainState::Ready) => 3,
                    _ => 0,
                };
                if reached >= 1 && step.starting_ms.is_none() {
                    step.starting_ms = Some(after);
                }
                if reached >= 2 && step.running_ms.is_none() {
                    step.running_ms = Some(after);
                    let from = t.last_sign.unwrap_or(t.detected_at);
                    let seconds = now.since(from).as_millis() as f64 / 1000.0;
                    metrics.failover(reason_label(&step.reason), Some(seconds));
                }
                if reached >= 3 && step.ready_ms.is_none() {
                    step.ready_ms = Some(after);
                }
            }
            let all_running = t.record.domains.iter().all(|d| d.running_ms.is_some());
            if !t.summarized && !t.record.domains.is_empty() && all_running {
                t.summarized = true;
                done.push(summary(&t.record));
            }
        }
        done
    }

    /// The failover of `host`'s current trouble, opened if need be.
    fn failover_of(&mut self, now: Instant, unix_ms: u64, host: HostId) -> &mut Tracked {
        let track = self.hosts.get(&host).cloned().unwrap_or_default();
        let in_trouble = track.trouble.is_some();
        let (since, verdict) = track.trouble.unwrap_or((now, "unknown".to_string()));
        let found = self.list.iter().position(|t| t.record.host_id == host && t.detected_at == since);
        let i = match found {
            Some(i) => i,
            None => {
                if self.list.len() >= FAILOVERS_KEPT {
                    self.list.pop_front();
                }
                let record = FailoverRecord {
                    host: self.host_names.get(&host).cloned().unwrap_or_else(|| host.to_string()),
                    host_id: host,
                    boot: track.boot,
                    detected_unix_ms: unix_ms.saturating_sub(ms(now.since(since))),
                    verdict,
                    silent_before_ms: track.last_sign.map(|l| ms(since.since(l))),
                    // Its verdicts up to now (none if opened without trouble).
                    steps: if in_trouble { track.changes } else { Vec::new() },
                    domains: Vec::new(),
                };
                let t = Tracked {
                    detected_at: since,
                    last_sign: track.last_sign,
                    record,
                    moved: BTreeMap::new(),
                    summarized: false,
                };
                self.list.push_back(t);
                self.list.len() - 1
            }
        };
        &mut self.list[i]
    }

    fn step(&mut self, now: Instant, unix_ms: u64, host: HostId, text: String) {
        let t = self.failover_of(now, unix_ms, host);
        if t.record.steps.len() < STEPS_KEPT {
            t.record.steps.push(Step { after_ms: ms(now.since(t.detected_at)), text });
        }
    }

    /// A fence agent call begins.
    pub fn fence_sent(&mut self, now: Instant, unix_ms: u64, op: OpId, target: HostId, agent: &str) {
        if self.fences.len() >= PENDING_MAX {
            self.fences.pop_first();
        }
        self.fences.insert(op, (target, agent.to_string()));
        self.step(now, unix_ms, target, format!("fencing with {agent}"));
    }

    /// A fence agent call ended.
    pub fn fence_done(&mut self, now: Instant, unix_ms: u64, op: OpId, outcome: FenceOutcome) {
        let Some((target, agent)) = self.fences.remove(&op) else { return };
        let text = match outcome {
            FenceOutcome::Confirmed => format!("fenced: {agent} confirmed the power-off"),
            FenceOutcome::Requested => format!("{agent}: poison request written (counts after host_dead_timeout)"),
            FenceOutcome::Failed => format!("{agent} failed"),
        };
        self.step(now, unix_ms, target, text);
    }

    /// A lease compare-and-swap is sent: followed when it moves a domain
    /// lease off another host by S3.
    pub fn cas_sent(&mut self, op: OpId, key: LeaseKey, new: &Lease) {
        let LeaseKey::Domain(d) = key else { return };
        let takeover =
            matches!(new.reason, LeaseReason::FenceConfirmed | LeaseReason::HostDeadTimeout | LeaseReason::Released);
        let (Some(owner), Some(&from)) = (new.owner, self.domain_host.get(&d)) else { return };
        if !takeover || from == owner.host || from == self.me {
            return;
        }
        if self.cas.len() >= PENDING_MAX {
            self.cas.pop_first();
        }
        self.cas.insert(op, (d, from, *new));
    }

    /// A compare-and-swap's result: a done takeover from a host in trouble
    /// (or one fenced or dead by S3) joins that host's failover.
    pub fn cas_done(&mut self, now: Instant, unix_ms: u64, op: OpId, result: Option<&CasOutcome>) {
        let Some((d, from, new)) = self.cas.remove(&op) else { return };
        let Some(CasOutcome::Done(lease)) = result else { return };
        let in_trouble = self.hosts.get(&from).is_some_and(|h| h.trouble.is_some());
        if new.reason == LeaseReason::Released && !in_trouble {
            // Released by a live host (a failed start): no host failure.
            return;
        }
        let Some(owner) = lease.owner else { return };
        let name = self.domain_names.get(&d).cloned().unwrap_or_else(|| format!("{:032x}", d.0));
        let to = self.host_names.get(&owner.host).cloned().unwrap_or_else(|| owner.host.to_string());
        let t = self.failover_of(now, unix_ms, from);
        let timeline = DomainTimeline {
            name,
            to,
            generation: lease.generation,
            reason: reason_word(new.reason).to_string(),
            lease_ms: ms(now.since(t.detected_at)),
            starting_ms: None,
            running_ms: None,
            ready_ms: None,
        };
        let i = match t.moved.get(&d) {
            // Moved again (its start failed on the first survivor).
            Some(&(_, _, i)) => {
                t.record.domains[i] = timeline;
                i
            }
            None => {
                t.record.domains.push(timeline);
                t.record.domains.len() - 1
            }
        };
        t.moved.insert(d, (owner.host, lease.generation, i));
        t.summarized = false;
    }
}

/// "+S.mmms" after the detection.
fn offset(after_ms: u64) -> String {
    format!("+{}", Duration(after_ms))
}

fn summary(r: &FailoverRecord) -> String {
    let slowest = r.domains.iter().filter_map(|d| d.running_ms).max().unwrap_or(0);
    let from = match r.silent_before_ms {
        Some(s) => format!("{} after its last heartbeat", Duration(slowest + s)),
        None => format!("{} after its detection", Duration(slowest)),
    };
    let moved: Vec<String> = r.domains.iter().map(|d| format!("{} on {}", d.name, d.to)).collect();
    format!(
        "failover of {}: {} running again, the last {from} (timeline: havirt events --failovers)",
        r.host,
        moved.join(", ")
    )
}

/// `havirt events --failovers`: one block per failover, oldest first.
pub fn render_failovers(records: &[FailoverRecord]) -> String {
    let mut out = String::new();
    for (i, r) in records.iter().enumerate() {
        if i > 0 {
            out.push('\n');
        }
        let boot = r.boot.map(|b| format!(" (boot {b:x})")).unwrap_or_default();
        let _ = writeln!(
            out,
            "FAILOVER of {}{boot}: {} at {}",
            clean(&r.host),
            clean(&r.verdict),
            crate::control::rfc3339_ms(r.detected_unix_ms)
        );
        if let Some(s) = r.silent_before_ms {
            let _ = writeln!(out, "  -{}  last heartbeat from {}", Duration(s), clean(&r.host));
        }
        let _ = writeln!(out, "  {}  detected: {} {}", offset(0), clean(&r.host), clean(&r.verdict));
        for s in &r.steps {
            let _ = writeln!(out, "  {}  {}", offset(s.after_ms), clean(&s.text));
        }
        for d in &r.domains {
            let _ = writeln!(out, "  {} -> {} ({})", clean(&d.name), clean(&d.to), d.reason);
            let _ = writeln!(out, "    {}  lease taken (generation {})", offset(d.lease_ms), d.generation);
            let later =
                [(d.starting_ms, "defined and starting"), (d.running_ms, "started (running)"), (d.ready_ms, "ready")];
            for (at, what) in later {
                match at {
                    Some(a) => {
                        let _ = writeln!(out, "    {}  {what}", offset(a));
                    }
                    None => {
                        let _ = writeln!(out, "    {:>8}  {what}: not seen yet", "-");
                    }
                }
            }
        }
    }
    if records.is_empty() {
        out.push_str("no failover since this daemon started\n");
    }
    out
}

/// `havirt events --failovers --json` and `GET /api/v1/failovers`: the
/// records as data, oldest first, as the alerts carry them (`failover`):
/// `host`, `host_id`, `boot` (16 hex digits or null: a JSON number would
/// lose bits in a browser), `detected_unix_ms`, `verdict`,
/// `silent_before_ms`, `steps[]` (`after_ms`, `text`) and `domains[]`
/// (`name`, `to`, `generation`, `reason`, `lease_ms`, `starting_ms`,
/// `running_ms`, `ready_ms`), times in ms after the detection.
pub fn failovers_json(records: &[FailoverRecord]) -> String {
    let list: Vec<serde_json::Value> = records
        .iter()
        .map(|r| {
            let mut v = serde_json::to_value(r).expect("a failover record always encodes");
            v["boot"] = r.boot.map(|b| format!("{b:016x}")).into();
            v
        })
        .collect();
    serde_json::to_string_pretty(&list).expect("failover records always encode")
}

/// Names come from the config and libvirt: never let one drive the terminal.
fn clean(s: &str) -> String {
    s.chars().map(|c| if c.is_control() { '?' } else { c }).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::config::Priority;
    use crate::engine::io::Owner;
    use crate::engine::view::{DomainView, HostView};

    const WEB: DomainId = DomainId(1);
    const APP: DomainId = DomainId(2);

    fn host(id: u16, verdict: &str, net_ms: Option<u64>, slot_ms: Option<u64>) -> HostView {
        HostView {
            net_age: net_ms.map(Duration),
            slot_age: slot_ms.map(Duration),
            boot: Some(0xb00 + u64::from(id)),
            ..HostView::sample(id, &format!("h{id}"), verdict)
        }
    }

    fn domain(id: DomainId, name: &str, on: u16, state: DomainState, generation: u64) -> DomainView {
        DomainView {
            id,
            name: name.into(),
            priority: Priority::Medium,
            host: Some(HostId(on)),
            state: Some(state),
            generation: Some(generation),
            local: None,
        }
    }

    /// h1 (this host, master) sees h2 with `verdict`, and web and app where given.
    fn view(verdict: &str, web: (u16, DomainState, u64), app: (u16, DomainState, u64)) -> NodeView {
        NodeView {
            host: HostId(1),
            boot: 0xb01,
            is_master: true,
            master: Some(HostId(1)),
            self_fence: "healthy".into(),
            isolated: false,
            storage_healthy: true,
            last_good_write_age: None,
            hosts: vec![
                host(1, "self", None, None),
                host(2, verdict, Some(2000), Some(1600)),
                host(3, "alive", Some(100), Some(100)),
            ],
            domains: vec![domain(WEB, "web", web.0, web.1, web.2), domain(APP, "app", app.0, app.1, app.2)],
            tolerance: None,
            admission: Default::default(),
            admission_breach: None,
            migration_failures: Vec::new(),
            given_up: Vec::new(),
        }
    }

    fn lease(to: u16, generation: u64, reason: LeaseReason) -> Lease {
        Lease { owner: Some(Owner { host: HostId(to), boot: 0xb00 + u64::from(to) }), generation, reason }
    }

    /// The golden scenario power-fenced, as the master's daemon sees it:
    /// h2 suspect at 12.000 s, fenced by ipmi, web to h1 (this host), app to h3.
    #[test]
    fn a_fenced_power_off_gives_one_timeline() {
        use DomainState::{Ready, Running, Starting};
        let m = Metrics::new();
        let mut f = Failovers::new(HostId(1));
        let unix = |t: u64| 1_700_000_000_000 + t;
        assert!(f.observe(Instant(10_000), &view("alive", (2, Running, 2), (2, Running, 2)), &m).is_empty());
        f.observe(Instant(11_600), &view("partitioned", (2, Running, 2), (2, Running, 2)), &m);
        f.observe(Instant(11_800), &view("storage-lost", (2, Running, 2), (2, Running, 2)), &m);
        f.observe(Instant(12_000), &view("suspect", (2, Running, 2), (2, Running, 2)), &m);
        f.fence_sent(Instant(12_000), unix(12_000), OpId(7), HostId(2), "ipmi");
        f.fence_done(Instant(12_730), unix(12_730), OpId(7), FenceOutcome::Confirmed);
        f.cas_sent(OpId(8), LeaseKey::Domain(WEB), &lease(1, 3, LeaseReason::FenceConfirmed));
        f.cas_sent(OpId(9), LeaseKey::Domain(APP), &lease(3, 3, LeaseReason::FenceConfirmed));
        // A renewal by this host is no takeover.
        f.cas_sent(OpId(10), LeaseKey::Domain(WEB), &lease(1, 4, LeaseReason::Renewed));
        f.cas_done(
            Instant(12_936),
            unix(12_936),
            OpId(8),
            Some(&CasOutcome::Done(lease(1, 3, LeaseReason::FenceConfirmed))),
        );
        f.cas_done(
            Instant(12_940),
            unix(12_940),
            OpId(9),
            Some(&CasOutcome::Done(lease(3, 3, LeaseReason::FenceConfirmed))),
        );
        f.cas_done(Instant(12_941), unix(12_941), OpId(10), Some(&CasOutcome::Done(lease(1, 4, LeaseReason::Renewed))));
        assert!(f.observe(Instant(12_945), &view("suspect", (1, Starting, 3), (2, Running, 2)), &m).is_empty());
        assert!(f.observe(Instant(13_200), &view("suspect", (1, Starting, 3), (3, Starting, 3)), &m).is_empty());
        let done = f.observe(Instant(13_477), &view("suspect", (1, Ready, 3), (3, Running, 3)), &m);
        assert_eq!(
            done,
            ["failover of h2: web on h1, app on h3 running again, the last 3.277s after its last heartbeat \
              (timeline: havirt events --failovers)"]
        );
        f.observe(Instant(13_700), &view("suspect", (1, Ready, 3), (3, Ready, 3)), &m);
        let records = f.records();
        assert_eq!(records.len(), 1, "one failover");
        let expected = "\
FAILOVER of h2 (boot b02): storage-lost at 2023-11-14T22:13:31.800Z
  -1.600s  last heartbeat from h2
  +0.000s  detected: h2 storage-lost
  +0.200s  h2 suspect
  +0.200s  fencing with ipmi
  +0.930s  fenced: ipmi confirmed the power-off
  web -> h1 (fence confirmed)
    +1.136s  lease taken (generation 3)
    +1.145s  defined and starting
    +1.677s  started (running)
    +1.677s  ready
  app -> h3 (fence confirmed)
    +1.140s  lease taken (generation 3)
    +1.400s  defined and starting
    +1.677s  started (running)
    +1.900s  ready
";
        assert_eq!(render_failovers(&records), expected);
        let e = crate::metrics::parse(&m.render(&crate::metrics::Snapshot {
            view: &view("suspect", (1, Ready, 3), (3, Ready, 3)),
            net: Default::default(),
            rejects: Default::default(),
            counters: Default::default(),
            uptime_s: 14.0,
        }))
        .expect("parses");
        assert_eq!(e.value("havirt_failovers_total", &[("reason", "fence_confirmed")]), Some(2.0));
        assert_eq!(e.value("havirt_failover_recovery_seconds_count", &[]), Some(2.0));
        let sum = e.value("havirt_failover_recovery_seconds_sum", &[]).expect("sum");
        assert!((sum - 2.0 * 3.277).abs() < 1e-9, "both from the last heartbeat at 10.200 s: {sum}");
    }

    #[test]
    fn a_release_by_a_live_host_is_no_failover_and_a_new_trouble_is_a_new_one() {
        use DomainState::Running;
        let m = Metrics::new();
        let mut f = Failovers::new(HostId(1));
        f.observe(Instant(1_000), &view("alive", (2, Running, 2), (2, Running, 2)), &m);
        f.cas_sent(OpId(1), LeaseKey::Domain(WEB), &lease(3, 3, LeaseReason::Released));
        f.cas_done(Instant(1_100), 0, OpId(1), Some(&CasOutcome::Done(lease(3, 3, LeaseReason::Released))));
        assert!(f.records().is_empty(), "a failed start released by a live host");
        f.observe(Instant(2_000), &view("storage-lost", (2, Running, 2), (2, Running, 2)), &m);
        f.cas_sent(OpId(2), LeaseKey::Domain(APP), &lease(3, 3, LeaseReason::Released));
        f.cas_done(Instant(2_500), 0, OpId(2), Some(&CasOutcome::Conflict(lease(2, 5, LeaseReason::Renewed))));
        assert!(f.records().is_empty(), "a conflict moved nothing");
        f.cas_sent(OpId(3), LeaseKey::Domain(APP), &lease(3, 6, LeaseReason::Released));
        f.cas_done(Instant(2_600), 0, OpId(3), Some(&CasOutcome::Done(lease(3, 6, LeaseReason::Released))));
        f.observe(Instant(3_000), &view("alive", (2, Running, 2), (2, Running, 2)), &m);
        f.observe(Instant(9_000), &view("suspect", (2, Running, 2), (2, Running, 2)), &m);
        f.fence_sent(Instant(9_000), 0, OpId(4), HostId(2), "ipmi");
        f.fence_done(Instant(9_500), 0, OpId(4), FenceOutcome::Failed);
        let r = f.records();
        assert_eq!(r.len(), 2, "{r:#?}");
        assert_eq!((r[0].verdict.as_str(), r[0].domains[0].name.as_str()), ("storage-lost", "app"));
        assert_eq!(r[0].steps, [Step { after_ms: 1_000, text: "h2 alive".into() }], "it came back");
        assert_eq!(r[1].steps[1], Step { after_ms: 500, text: "ipmi failed".into() });
        assert!(render_failovers(&r).contains("    -  started (running): not seen yet"), "{}", render_failovers(&r));
        assert_eq!(render_failovers(&[]), "no failover since this daemon started\n");
    }
}
