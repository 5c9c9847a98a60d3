//! The daemon's Prometheus metrics: what it measures itself (storage I/O
//! latency, fence attempts, failovers and their recovery time), and what
//! it already knows for `havirt status` (verdicts, heartbeat ages, the
//! master, local domains, the adapters' reject counters), rendered in the
//! Prometheus text format (0.0.4) with `prometheus-client`.
//!
//! [`Metrics`] is cheap to clone and shared with the daemon's workers: the
//! histograms and counters it holds are updated where the thing happens.
//! Everything else is read at scrape time from a [`Snapshot`] of the
//! daemon's own bookkeeping, so nothing is counted twice. [`parse`] reads
//! the format back (tests, and the lab test that scrapes a live daemon).
//!
//! No I/O here: the HTTP side is `daemon::http`.

use crate::control::Counters;
use crate::engine::config::HostId;
use crate::engine::io::FenceOutcome;
use crate::engine::view::NodeView;
use crate::net::udp::NetCounters;
use crate::store::record::RejectCounters;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use std::collections::BTreeMap;
use std::sync::atomic::AtomicU64;

/// Every metric name starts with this (and `_`).
pub const PREFIX: &str = "havirt";
/// The `Content-Type` of [`Metrics::render`]'s text.
pub const CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;
/// Verdict names a peer can have (`engine::peers::verdict_name`), plus
/// "self" for this host: `havirt_host_verdict` has one sample per name.
pub const VERDICTS: [&str; 7] = ["self", "alive", "partitioned", "isolated", "storage-lost", "suspect", "unknown"];
/// Local domain states (`engine::node::local_word`).
pub const LOCAL_STATES: [&str; 7] = ["adopting", "verifying", "starting", "running", "ready", "stopping", "backoff"];
/// Recovery-time buckets (seconds): DESIGN.md §2 targets 2 s (fast) and
/// 3.5 s (default) with a fence agent; host_dead_timeout is 10–50 s.
pub const RECOVERY_BUCKETS_S: [f64; 18] =
    [0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0, 5.0, 6.0, 8.0, 10.0, 15.0, 20.0, 30.0, 45.0, 60.0, 120.0];
/// The `reason` label of `havirt_failovers_total`: why the lease could move (S3).
pub const FAILOVER_REASONS: [&str; 3] = ["fence_confirmed", "host_dead_timeout", "released"];
/// Storage latency buckets: 1 ms doubling to 8.2 s (io_timeout is 1–2 s).
pub const STORAGE_BUCKETS: (f64, f64, u16) = (0.001, 2.0, 14);

type Labels = Vec<(String, String)>;
type HistogramFamily = Family<Labels, Histogram, fn() -> Histogram>;
type FloatGauge = Gauge<f64, AtomicU64>;

/// One kind of storage I/O, for `havirt_storage_io_seconds{op}`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StorageOp {
    /// This host's heartbeat slot (O_DIRECT + fdatasync).
    SlotWrite,
    /// Every peer slot, fence records and this host's assignments.
    StorageRead,
    LeaseRead,
    /// Compare-and-swap of a lease under its file lock.
    LeaseCas,
    FencedWrite,
    AssignmentsWrite,
}

impl StorageOp {
    pub const ALL: [StorageOp; 6] = [
        StorageOp::SlotWrite,
        StorageOp::StorageRead,
        StorageOp::LeaseRead,
        StorageOp::LeaseCas,
        StorageOp::FencedWrite,
        StorageOp::AssignmentsWrite,
    ];

    pub fn name(self) -> &'static str {
        match self {
            StorageOp::SlotWrite => "slot_write",
            StorageOp::StorageRead => "storage_read",
            StorageOp::LeaseRead => "lease_read",
            StorageOp::LeaseCas => "lease_cas",
            StorageOp::FencedWrite => "fenced_write",
            StorageOp::AssignmentsWrite => "assignments_write",
        }
    }
}

/// The word for a fence agent's answer in `havirt_fence_attempts_total`.
pub fn fence_result(o: FenceOutcome) -> &'static str {
    match o {
        FenceOutcome::Confirmed => "success",
        FenceOutcome::Requested => "requested",
        FenceOutcome::Failed => "failed",
    }
}

/// The metrics the daemon updates as things happen; clones share them.
#[derive(Clone, Debug)]
pub struct Metrics {
    storage_io: HistogramFamily,
    fence_attempts: Family<Labels, Counter>,
    failovers: Family<Labels, Counter>,
    recovery: Histogram,
    alerts: Family<Labels, Counter>,
    alerts_raised: Family<Labels, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

fn storage_histogram() -> Histogram {
    let (start, factor, count) = STORAGE_BUCKETS;
    Histogram::new(exponential_buckets(start, factor, count))
}

impl Metrics {
    pub fn new() -> Metrics {
        let storage_io = HistogramFamily::new_with_constructor(storage_histogram);
        // Every kind from the start: a dashboard sees 0, not a gap.
        for op in StorageOp::ALL {
            let _ = storage_io.get_or_create(&vec![("op".into(), op.name().into())]);
        }
        let failovers: Family<Labels, Counter> = Family::default();
        for reason in FAILOVER_REASONS {
            let _ = failovers.get_or_create(&vec![("reason".into(), reason.into())]);
        }
        Metrics {
            storage_io,
            fence_attempts: Family::default(),
            failovers,
            recovery: Histogram::new(RECOVERY_BUCKETS_S),
            alerts: Family::default(),
            alerts_raised: Family::default(),
        }
    }

    /// One completed storage call (failed ones too: a slow failure is the
    /// latency that matters most). A call that never returns is counted by
    /// `havirt_storage_errors_total{kind="timeout"}` instead.
    pub fn storage_io(&self, op: StorageOp, took: std::time::Duration) {
        self.storage_io.get_or_create(&vec![("op".into(), op.name().into())]).observe(took.as_secs_f64());
    }

    /// One fence agent call and what it answered.
    pub fn fence_attempt(&self, target: &str, agent: &str, outcome: FenceOutcome) {
        let labels = vec![
            ("target".into(), target.into()),
            ("agent".into(), agent.into()),
            ("result".into(), fence_result(outcome).into()),
        ];
        self.fence_attempts.get_or_create(&labels).inc();
    }

    /// A domain of a failed host runs again on a survivor; `recovery_s`:
    /// from the failed host's last heartbeat to then, when known.
    pub fn failover(&self, reason: &str, recovery_s: Option<f64>) {
        self.failovers.get_or_create(&vec![("reason".into(), reason.into())]).inc();
        if let Some(s) = recovery_s {
            self.recovery.observe(s);
        }
    }

    /// One alert's fate at one receiver (`alerts::deliver::Outcome::name`).
    pub fn alert(&self, sink: &str, result: &str) {
        self.alerts.get_or_create(&vec![("sink".into(), sink.into()), ("result".into(), result.into())]).inc();
    }

    /// This daemon raised an alert of `kind` (`alerts::AlertKind::name`).
    pub fn alert_raised(&self, kind: &str) {
        self.alerts_raised.get_or_create(&vec![("kind".into(), kind.into())]).inc();
    }

    /// The whole exposition: these metrics and the snapshot's.
    pub fn render(&self, s: &Snapshot<'_>) -> String {
        let mut r = Registry::with_prefix(PREFIX);
        register_view(&mut r, s);
        register_counters(&mut r, s);
        r.register(
            "storage_io_seconds",
            "Latency of this daemon's completed storage calls by kind (slot_write: own heartbeat slot with fdatasync; \
             storage_read: all slots, fence records and assignments; lease_read; lease_cas: lease compare-and-swap \
             under its lock; fenced_write; assignments_write)",
            self.storage_io.clone(),
        );
        r.register(
            "fence_attempts",
            "Fence agent calls made by this daemon, by target host, agent and result (success: power-off \
             confirmed; requested: poison request written; failed: error or timeout)",
            self.fence_attempts.clone(),
        );
        r.register(
            "failovers",
            "Domains of a failed host that this daemon, as master, moved to a survivor and then saw running there, \
             by the reason their lease moved (fence_confirmed: S3(a); host_dead_timeout: S3(b); released: S3(c))",
            self.failovers.clone(),
        );
        r.register(
            "failover_recovery_seconds",
            "Per failed-over domain, as this master measures it on its own clock: from the failed host's last \
             heartbeat (network or storage, whichever came later) to the domain reported running on the survivor \
             (a remote survivor's report arrives with the next storage read)",
            self.recovery.clone(),
        );
        r.register(
            "alerts",
            "Alerts by [[alert]] receiver and result (sent; retried: a try failed and another follows; failed: \
             every try failed or the receiver refused it; dropped: its queue was full, never tried)",
            self.alerts.clone(),
        );
        r.register(
            "alerts_raised",
            "Alerts this daemon raised, by kind (each alert is raised by one daemon of the cluster)",
            self.alerts_raised.clone(),
        );
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::prometheus_text::encode(&mut out, &r);
        sorted(&out)
    }
}

/// The exposition with each family's samples in a fixed order (by their
/// labels, `le` aside, so that a histogram's buckets keep theirs): the
/// families hash their label sets, and a reader compares scrapes.
fn sorted(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut samples: Vec<&str> = Vec::new();
    let flush = |samples: &mut Vec<&str>, out: &mut String| {
        samples.sort_by_key(|line| sort_key(line));
        for line in samples.drain(..) {
            out.push_str(line);
            out.push('\n');
        }
    };
    for line in text.lines() {
        if line.starts_with('#') {
            flush(&mut samples, &mut out);
            out.push_str(line);
            out.push('\n');
        } else {
            samples.push(line);
        }
    }
    flush(&mut samples, &mut out);
    out
}

/// A sample's labels without `le`.
fn sort_key(line: &str) -> String {
    let labels = match (line.find('{'), line.rfind('}')) {
        (Some(a), Some(b)) if a < b => &line[a + 1..b],
        _ => "",
    };
    labels.split(',').filter(|l| !l.starts_with("le=")).collect::<Vec<_>>().join(",")
}

/// What the daemon knows at scrape time.
#[derive(Clone, Copy, Debug)]
pub struct Snapshot<'a> {
    pub view: &'a NodeView,
    pub net: NetCounters,
    pub rejects: RejectCounters,
    pub counters: Counters,
    pub uptime_s: f64,
}

fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs.iter().map(|(k, v)| ((*k).to_string(), (*v).to_string())).collect()
}

fn host_name(v: &NodeView, id: HostId) -> String {
    v.hosts.iter().find(|h| h.id == id).map_or_else(|| id.to_string(), |h| h.name.clone())
}

fn gauge(r: &mut Registry, name: &str, help: &str, value: i64) {
    let g: Gauge = Gauge::default();
    g.set(value);
    r.register(name, help, g);
}

fn register_view(r: &mut Registry, s: &Snapshot<'_>) {
    let v = s.view;
    let up: FloatGauge = Gauge::default();
    up.set(s.uptime_s);
    r.register("uptime_seconds", "Seconds since this daemon started", up);
    gauge(r, "is_master", "1 when this host holds the master lease and acts as master", i64::from(v.is_master));
    let master: Family<Labels, Gauge> = Family::default();
    if let Some(m) = v.master {
        master.get_or_create(&labels(&[("host", &host_name(v, m))])).set(1);
    }
    r.register("master", "1 for the host owning the master lease, as last read here (no sample: none)", master);
    let verdicts: Family<Labels, Gauge> = Family::default();
    let ages: Family<Labels, FloatGauge> = Family::default();
    for h in &v.hosts {
        for name in VERDICTS {
            verdicts.get_or_create(&labels(&[("host", &h.name), ("verdict", name)])).set(i64::from(h.verdict == name));
        }
        for (path, age) in [("network", h.net_age), ("storage", h.slot_age)] {
            if let Some(a) = age {
                ages.get_or_create(&labels(&[("host", &h.name), ("path", path)])).set(a.as_millis() as f64 / 1000.0);
            }
        }
    }
    r.register(
        "host_verdict",
        "Each configured host's verdict as this daemon sees it: 1 for the current one, 0 for the others \
         (self: this host)",
        verdicts,
    );
    r.register(
        "heartbeat_age_seconds",
        "Per peer: since its last network heartbeat reached this host (path=network) and since its storage \
         slot last changed (path=storage); no sample until first heard",
        ages,
    );
    gauge(r, "storage_healthy", "1 while this host's own heartbeat writes keep it clear of self-fencing (S4)", {
        i64::from(v.storage_healthy)
    });
    if let Some(a) = v.last_good_write_age {
        let g: FloatGauge = Gauge::default();
        g.set(a.as_millis() as f64 / 1000.0);
        r.register("heartbeat_write_age_seconds", "Since the start of this host's last completed heartbeat write", g);
    }
    register_domains(r, v);
}

fn register_domains(r: &mut Registry, v: &NodeView) {
    let mut by_state: BTreeMap<&str, i64> = LOCAL_STATES.iter().map(|s| (*s, 0)).collect();
    for d in &v.domains {
        if let Some(l) = d.local.as_deref() {
            *by_state.entry(l).or_default() += 1;
        }
    }
    let held = by_state.iter().filter(|(s, _)| **s != "adopting").map(|(_, n)| n).sum();
    gauge(
        r,
        "leases_held",
        "Domain leases this host holds: protected domains it runs, starts, restarts or stops (adopted ones count \
         once their lease is read)",
        held,
    );
    let local: Family<Labels, Gauge> = Family::default();
    for (state, n) in by_state {
        local.get_or_create(&labels(&[("state", state)])).set(n);
    }
    r.register("local_domains", "Protected domains on this host by what this daemon is doing with them", local);
    let protected = i64::try_from(v.domains.len()).unwrap_or(i64::MAX);
    gauge(r, "protected_domains", "Protected domains in the registry as this daemon last read it", protected);
}

fn counter_family(r: &mut Registry, name: &str, help: &str, label: &str, values: &[(&str, u64)]) {
    let f: Family<Labels, Counter> = Family::default();
    for (value, n) in values {
        f.get_or_create(&labels(&[(label, value)])).inc_by(*n);
    }
    r.register(name, help, f);
}

fn register_counters(r: &mut Registry, s: &Snapshot<'_>) {
    let accepted: Counter = Counter::default();
    accepted.inc_by(s.net.accepted);
    r.register("packets_accepted", "Heartbeat packets accepted (authenticated, fresh) since start", accepted);
    let d = s.net.drops;
    counter_family(
        r,
        "packets_rejected",
        "Heartbeat packets dropped unread since start, by reason (bad_mac: wrong cluster key; replayed: old \
         sequence; foreign_cluster; unknown_sender; ...)",
        "reason",
        &[
            ("truncated", d.truncated),
            ("bad_magic", d.bad_magic),
            ("unsupported_version", d.unsupported_version),
            ("foreign_cluster", d.foreign_cluster),
            ("bad_mac", d.bad_mac),
            ("replayed", d.replayed),
            ("unknown_sender", d.unknown_sender),
            ("mismatch", d.mismatch),
            ("malformed", d.malformed),
            ("too_large", d.too_large),
        ],
    );
    let x = s.rejects;
    counter_family(
        r,
        "storage_records_rejected",
        "Storage records read but not accepted since start, by reason (bad_checksum: corrupt or torn; \
         foreign_cluster; future_version; ...); a rejected slot counts as no heartbeat",
        "reason",
        &[
            ("truncated", x.truncated),
            ("bad_magic", x.bad_magic),
            ("future_version", x.future_version),
            ("wrong_kind", x.wrong_kind),
            ("foreign_cluster", x.foreign_cluster),
            ("bad_checksum", x.bad_checksum),
            ("payload_too_large", x.payload_too_large),
            ("wrong_subject", x.wrong_subject),
            ("malformed", x.malformed),
        ],
    );
    counter_family(
        r,
        "storage_errors",
        "Storage calls that failed (io) or did not answer within io_timeout (timeout) since start",
        "kind",
        &[("io", s.counters.storage_errors), ("timeout", s.counters.storage_timeouts)],
    );
}

// ---------------------------------------------------------------- parsing

/// One sample line: `name{label="value",...} value`.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

/// A parsed exposition: samples in order, HELP and TYPE by family name.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Exposition {
    pub samples: Vec<Sample>,
    pub help: BTreeMap<String, String>,
    pub types: BTreeMap<String, String>,
}

impl Exposition {
    /// Samples named `name` whose labels include every pair of `with`.
    pub fn find<'a>(&'a self, name: &'a str, with: &'a [(&'a str, &'a str)]) -> impl Iterator<Item = &'a Sample> {
        self.samples
            .iter()
            .filter(move |s| s.name == name && with.iter().all(|(k, v)| s.labels.get(*k).is_some_and(|x| x == v)))
    }

    /// The one sample named `name` with labels `with` (None: none or several).
    pub fn value(&self, name: &str, with: &[(&str, &str)]) -> Option<f64> {
        let mut it = self.find(name, with);
        let first = it.next()?;
        it.next().is_none().then_some(first.value)
    }

    /// The cumulative count of histogram `name`'s bucket `le` (bounds are
    /// compared as numbers: "3" and "3.0" are one bound).
    pub fn bucket(&self, name: &str, le: f64, with: &[(&str, &str)]) -> Option<f64> {
        let bucket = format!("{name}_bucket");
        let bound = |s: &Sample| match s.labels.get("le").map(String::as_str) {
            Some("+Inf") => Some(f64::INFINITY),
            Some(v) => v.parse::<f64>().ok(),
            None => None,
        };
        self.find(&bucket, with).find(|s| bound(s) == Some(le)).map(|s| s.value)
    }

    /// The sum of every sample named `name` with labels `with` (0: none).
    pub fn sum(&self, name: &str, with: &[(&str, &str)]) -> f64 {
        self.find(name, with).map(|s| s.value).sum()
    }
}

/// Reads the Prometheus text format: `# HELP name text`, `# TYPE name kind`,
/// other `#` comments, blank lines, and samples. Errors name the line.
pub fn parse(text: &str) -> Result<Exposition, String> {
    let mut out = Exposition::default();
    for (i, line) in text.lines().enumerate() {
        let at = |what: &str| format!("line {}: {what}: {line:?}", i + 1);
        let line = line.trim_end();
        if line.is_empty() {
            continue;
        }
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, help) = rest.split_once(' ').unwrap_or((rest, ""));
            check_name(name).map_err(|e| at(&e))?;
            out.help.insert(name.to_string(), help.to_string());
        } else if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').ok_or_else(|| at("TYPE without a type"))?;
            check_name(name).map_err(|e| at(&e))?;
            const KINDS: [&str; 5] = ["counter", "gauge", "histogram", "summary", "untyped"];
            if !KINDS.contains(&kind) {
                return Err(at("unknown TYPE"));
            }
            out.types.insert(name.to_string(), kind.to_string());
        } else if line.starts_with('#') {
            continue;
        } else {
            out.samples.push(parse_sample(line).map_err(|e| at(&e))?);
        }
    }
    Ok(out)
}

fn check_name(name: &str) -> Result<(), String> {
    let mut chars = name.chars();
    let first_ok = chars.next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':');
    if first_ok && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':') {
        Ok(())
    } else {
        Err(format!("bad metric name {name:?}"))
    }
}

fn parse_sample(line: &str) -> Result<Sample, String> {
    let name_end = line.find(['{', ' ']).ok_or("a sample needs a value")?;
    let name = &line[..name_end];
    check_name(name)?;
    let mut rest = &line[name_end..];
    let mut labels = BTreeMap::new();
    if let Some(body) = rest.strip_prefix('{') {
        rest = parse_labels(body, &mut labels)?;
    }
    let mut fields = rest.split_whitespace();
    let value = fields.next().ok_or("a sample needs a value")?;
    let value = match value {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        v => v.parse::<f64>().map_err(|_| format!("bad value {v:?}"))?,
    };
    // An optional timestamp (integer milliseconds), nothing more.
    if let Some(ts) = fields.next() {
        ts.parse::<i64>().map_err(|_| format!("bad timestamp {ts:?}"))?;
    }
    if fields.next().is_some() {
        return Err("text after the value".into());
    }
    Ok(Sample { name: name.to_string(), labels, value })
}

/// Parses `k="v",...}` into `out`; returns what follows the `}`.
fn parse_labels<'a>(mut s: &'a str, out: &mut BTreeMap<String, String>) -> Result<&'a str, String> {
    loop {
        s = s.trim_start_matches([' ', ',']);
        if let Some(rest) = s.strip_prefix('}') {
            return Ok(rest);
        }
        if s.is_empty() {
            return Err("unterminated label set (no })".into());
        }
        let (key, after) = s.split_once("=\"").ok_or("a label needs =\"value\"")?;
        check_name(key)?;
        let mut value = String::new();
        let mut chars = after.char_indices();
        let end = loop {
            match chars.next() {
                None => return Err("unterminated label value".into()),
                Some((i, '"')) => break i,
                Some((_, '\\')) => match chars.next() {
                    Some((_, 'n')) => value.push('\n'),
                    Some((_, c @ ('\\' | '"'))) => value.push(c),
                    _ => return Err("bad escape in a label value".into()),
                },
                Some((_, c)) => value.push(c),
            }
        };
        if out.insert(key.to_string(), value).is_some() {
            return Err(format!("label {key} given twice"));
        }
        s = &after[end + 1..];
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::config::DomainId;
    use crate::engine::config::Priority;
    use crate::engine::time::Duration;
    use crate::engine::view::{DomainView, HostView};

    fn host(id: u16, verdict: &str, net_ms: Option<u64>, slot_ms: Option<u64>) -> HostView {
        HostView {
            net_age: net_ms.map(Duration),
            slot_age: slot_ms.map(Duration),
            ..HostView::sample(id, &format!("h{id}"), verdict)
        }
    }

    fn domain(n: u128, host: u16, local: Option<&str>) -> DomainView {
        DomainView {
            id: DomainId(n),
            name: format!("vm{n}"),
            priority: Priority::Medium,
            host: Some(HostId(host)),
            state: None,
            generation: Some(1),
            local: local.map(str::to_string),
        }
    }

    fn view() -> NodeView {
        NodeView {
            host: HostId(1),
            boot: 1,
            is_master: true,
            master: Some(HostId(1)),
            self_fence: "healthy".into(),
            isolated: false,
            storage_healthy: true,
            last_good_write_age: Some(Duration(120)),
            hosts: vec![
                host(1, "self", None, None),
                host(2, "alive", Some(250), Some(400)),
                host(3, "suspect", None, None),
            ],
            domains: vec![domain(1, 1, Some("running")), domain(2, 1, Some("adopting")), domain(3, 2, None)],
            tolerance: None,
            admission: Default::default(),
            admission_breach: None,
            migration_failures: Vec::new(),
            given_up: Vec::new(),
        }
    }

    fn rendered(m: &Metrics) -> Exposition {
        let v = view();
        let mut net = NetCounters::default();
        (net.accepted, net.drops.bad_mac, net.drops.replayed) = (100, 2, 1);
        let rejects = RejectCounters { bad_checksum: 3, ..RejectCounters::default() };
        let counters = Counters { storage_timeouts: 4, ..Counters::default() };
        let s = Snapshot { view: &v, net, rejects, counters, uptime_s: 12.5 };
        let text = m.render(&s);
        parse(&text).unwrap_or_else(|e| panic!("{e}\n{text}"))
    }

    #[test]
    fn the_snapshot_is_rendered_with_help_and_types() {
        let e = rendered(&Metrics::new());
        assert_eq!(e.value("havirt_is_master", &[]), Some(1.0));
        assert_eq!(e.value("havirt_master", &[("host", "h1")]), Some(1.0));
        assert_eq!(e.value("havirt_host_verdict", &[("host", "h2"), ("verdict", "alive")]), Some(1.0));
        assert_eq!(e.value("havirt_host_verdict", &[("host", "h2"), ("verdict", "suspect")]), Some(0.0));
        assert_eq!(e.value("havirt_host_verdict", &[("host", "h3"), ("verdict", "suspect")]), Some(1.0));
        assert_eq!(e.sum("havirt_host_verdict", &[]), 3.0, "one current verdict per host");
        assert_eq!(e.value("havirt_heartbeat_age_seconds", &[("host", "h2"), ("path", "network")]), Some(0.25));
        assert_eq!(e.value("havirt_heartbeat_age_seconds", &[("host", "h2"), ("path", "storage")]), Some(0.4));
        assert_eq!(e.find("havirt_heartbeat_age_seconds", &[("host", "h3")]).count(), 0, "never heard: no sample");
        assert_eq!(e.value("havirt_leases_held", &[]), Some(1.0));
        assert_eq!(e.value("havirt_local_domains", &[("state", "adopting")]), Some(1.0));
        assert_eq!(e.value("havirt_protected_domains", &[]), Some(3.0));
        assert_eq!(e.value("havirt_packets_accepted_total", &[]), Some(100.0));
        assert_eq!(e.value("havirt_packets_rejected_total", &[("reason", "bad_mac")]), Some(2.0));
        assert_eq!(e.sum("havirt_packets_rejected_total", &[]), 3.0);
        assert_eq!(e.value("havirt_storage_records_rejected_total", &[("reason", "bad_checksum")]), Some(3.0));
        assert_eq!(e.value("havirt_storage_errors_total", &[("kind", "timeout")]), Some(4.0));
        assert_eq!(e.value("havirt_uptime_seconds", &[]), Some(12.5));
        for family in ["havirt_host_verdict", "havirt_failovers_total", "havirt_failover_recovery_seconds"] {
            assert!(e.help.get(family).is_some_and(|h| !h.is_empty()), "no HELP for {family}: {:?}", e.help);
            assert!(e.types.contains_key(family), "no TYPE for {family}");
        }
        assert_eq!(e.types["havirt_storage_io_seconds"], "histogram");
        assert_eq!(e.value("havirt_storage_io_seconds_count", &[("op", "lease_cas")]), Some(0.0));
    }

    #[test]
    fn measured_metrics_accumulate() {
        let m = Metrics::new();
        m.storage_io(StorageOp::SlotWrite, std::time::Duration::from_millis(3));
        m.storage_io(StorageOp::SlotWrite, std::time::Duration::from_millis(5));
        m.fence_attempt("h2", "ipmi", FenceOutcome::Failed);
        m.clone().fence_attempt("h2", "ipmi", FenceOutcome::Confirmed);
        m.failover("fence_confirmed", Some(2.7));
        m.failover("host_dead_timeout", None);
        let e = rendered(&m);
        assert_eq!(e.value("havirt_storage_io_seconds_count", &[("op", "slot_write")]), Some(2.0));
        assert_eq!(e.bucket("havirt_storage_io_seconds", 0.004, &[("op", "slot_write")]), Some(1.0));
        let sum = e.value("havirt_storage_io_seconds_sum", &[("op", "slot_write")]).expect("sum");
        assert!((sum - 0.008).abs() < 1e-9, "{sum}");
        let success = [("target", "h2"), ("agent", "ipmi"), ("result", "success")];
        assert_eq!(e.value("havirt_fence_attempts_total", &success), Some(1.0));
        assert_eq!(e.sum("havirt_fence_attempts_total", &[]), 2.0);
        assert_eq!(e.sum("havirt_failovers_total", &[]), 2.0);
        assert_eq!(e.value("havirt_failover_recovery_seconds_count", &[]), Some(1.0));
        assert_eq!(e.bucket("havirt_failover_recovery_seconds", 3.0, &[]), Some(1.0));
        assert_eq!(e.bucket("havirt_failover_recovery_seconds", 2.5, &[]), Some(0.0));
        assert_eq!(e.bucket("havirt_failover_recovery_seconds", f64::INFINITY, &[]), Some(1.0));
    }

    #[test]
    fn alerts_are_counted_by_receiver_result_and_kind() {
        let m = Metrics::new();
        m.alert("ops", "retried");
        m.alert("ops", "sent");
        m.clone().alert("ops", "sent");
        m.alert("mail", "dropped");
        m.alert_raised("host_fenced");
        let e = rendered(&m);
        assert_eq!(e.value("havirt_alerts_total", &[("sink", "ops"), ("result", "sent")]), Some(2.0));
        assert_eq!(e.value("havirt_alerts_total", &[("sink", "ops"), ("result", "retried")]), Some(1.0));
        assert_eq!(e.value("havirt_alerts_total", &[("sink", "mail"), ("result", "dropped")]), Some(1.0));
        assert_eq!(e.value("havirt_alerts_raised_total", &[("kind", "host_fenced")]), Some(1.0));
        assert_eq!(
            e.types.get("havirt_alerts_total").or(e.types.get("havirt_alerts")).map(String::as_str),
            Some("counter")
        );
    }

    #[test]
    fn the_parser_reads_the_format_and_names_bad_lines() {
        let text = "# HELP x_total A counter.\n# TYPE x_total counter\n\
                    x_total{a=\"1\",b=\"q\\\"uote\\\\ \\n\"} 3 1700000000000\n# a comment\n\ny +Inf\n";
        let e = parse(text).expect("valid");
        assert_eq!(e.help["x_total"], "A counter.");
        assert_eq!(e.types["x_total"], "counter");
        assert_eq!(e.samples[0].labels["b"], "q\"uote\\ \n");
        assert_eq!(e.value("x_total", &[("a", "1")]), Some(3.0));
        assert_eq!(e.value("y", &[]), Some(f64::INFINITY));
        for (bad, why) in [
            ("x{a=\"1 2", "unterminated label value"),
            ("x{a=\"1\"", "unterminated label set"),
            ("x 1 2 3", "text after"),
            ("x{a=\"1\",a=\"2\"} 1", "twice"),
            ("1x 1", "bad metric name"),
            ("x", "needs a value"),
            ("x one", "bad value"),
            ("# TYPE x gauge2", "unknown TYPE"),
        ] {
            let e = parse(&format!("ok 1\n{bad}\n")).expect_err(bad);
            assert!(e.starts_with("line 2: ") && e.contains(why), "{bad}: {e}");
        }
    }
}
