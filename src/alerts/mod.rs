//! Alerts: the cluster events an operator must be told of without watching
//! `havirt events` (a host fenced, a failover opened and closed with its
//! timeline, a domain given up, a self-fence, storage lost and back,
//! maintenance entered and ended), sent to `[[alert]]` receivers.
//!
//! [`Observer`] derives them from typed data only: the engine's view
//! (`NodeView`, as `havirt status` shows it) and the failover timelines
//! (`crate::failover`), compared with what it saw the time before. It never
//! reads log text. No I/O and no clock: time is an argument, as in the
//! engine; `deliver` sends what it returns.
//!
//! **Once per cluster.** Every daemon runs an observer, and each alert is
//! sent by exactly one of them, by DESIGN.md §5's roles:
//!
//! - Cluster decisions are the master's, so the master sends them: a host
//!   fenced, a failover opened and closed, a domain given up. Without a
//!   master nobody fences or moves a lease, so there is nothing to send.
//! - What happens to one host is known first (and for sure) by that host,
//!   so it sends it itself, master or not: its self-fence, its storage lost
//!   and back, its maintenance mode. The master learns those a storage read
//!   later, and does not send them again.
//!
//! **De-duplication.** Each alert carries an [`Alert::id`] derived from the
//! cluster, the kind, what it concerns (host, domain), and the generation
//! of the thing: the failed host's boot, the domain's lease generation, or
//! for a host's own events its daemon incarnation and a counter. A retry
//! sends the same id; so does a second master that sees the same fence of
//! the same boot. A receiver keeps the ids it has seen and drops repeats.

pub mod deliver;

use crate::engine::config::{DomainId, HostId};
use crate::engine::io::BootId;
use crate::engine::time::{Duration, Instant};
use crate::engine::view::NodeView;
use crate::failover::{FailoverRecord, render_failovers};
use serde::{Deserialize, Serialize};
use sha2::Digest;
use std::collections::{BTreeMap, BTreeSet};

/// Failover records remembered as opened or closed (twice what
/// `failover::FAILOVERS_KEPT` holds: a record that falls out of that list
/// is not seen again).
pub const FAILOVERS_REMEMBERED: usize = 2 * crate::failover::FAILOVERS_KEPT;
/// Hex characters of an alert id (128 bits of SHA-256).
pub const ID_HEX_CHARS: usize = 32;
/// Version of the alert JSON; a receiver checks it.
pub const FORMAT: u32 = 1;

/// What an alert is about. The JSON name is the snake_case variant name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AlertKind {
    /// The master saw a host confirmed powered off (fence agent, the
    /// operator's `havirt fence confirm`, or a `fenced/` record).
    HostFenced,
    /// The master took the first domain lease off a failed host.
    FailoverOpened,
    /// Every domain moved off the failed host runs again on a survivor.
    FailoverClosed,
    /// The master gave up on a domain after max_restarts failed starts.
    DomainGivenUp,
    /// This host began to self-fence (S4, or a poison request).
    SelfFence,
    /// This host's storage heartbeat writes have failed for
    /// storage_silent_after (its peers see it storage-lost).
    StorageLost,
    /// Its heartbeat writes complete again.
    StorageRestored,
    MaintenanceEntered,
    MaintenanceExited,
    /// The master's admission-control figure fell below `[cluster]
    /// tolerate_*` (admission warn or strict).
    AdmissionBreach,
    /// It meets the requirement again.
    AdmissionRestored,
}

impl AlertKind {
    pub const ALL: [AlertKind; 11] = [
        AlertKind::HostFenced,
        AlertKind::FailoverOpened,
        AlertKind::FailoverClosed,
        AlertKind::DomainGivenUp,
        AlertKind::SelfFence,
        AlertKind::StorageLost,
        AlertKind::StorageRestored,
        AlertKind::MaintenanceEntered,
        AlertKind::MaintenanceExited,
        AlertKind::AdmissionBreach,
        AlertKind::AdmissionRestored,
    ];

    pub fn name(self) -> &'static str {
        match self {
            AlertKind::HostFenced => "host_fenced",
            AlertKind::FailoverOpened => "failover_opened",
            AlertKind::FailoverClosed => "failover_closed",
            AlertKind::DomainGivenUp => "domain_given_up",
            AlertKind::SelfFence => "self_fence",
            AlertKind::StorageLost => "storage_lost",
            AlertKind::StorageRestored => "storage_restored",
            AlertKind::MaintenanceEntered => "maintenance_entered",
            AlertKind::MaintenanceExited => "maintenance_exited",
            AlertKind::AdmissionBreach => "admission_breach",
            AlertKind::AdmissionRestored => "admission_restored",
        }
    }
}

/// One alert, as sent (JSON body of a webhook, stdin of a command).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Alert {
    pub format: u32,
    /// Stable across retries and senders: de-duplicate on it.
    pub id: String,
    pub kind: AlertKind,
    pub cluster: String,
    /// The host it concerns (the fenced or failed host, the host itself).
    pub host: String,
    /// The domain it concerns (domain_given_up).
    pub domain: Option<String>,
    /// The host whose daemon sent it.
    pub sender: String,
    /// Wall-clock time it was raised at the sender (ms since the Unix epoch).
    pub unix_ms: u64,
    /// One line for a person (a mail subject, a chat message).
    pub text: String,
    /// The failover it belongs to, with its timeline so far.
    pub failover: Option<FailoverRecord>,
    /// That timeline as `havirt events --failovers` prints it.
    pub timeline: Option<String>,
}

/// The alert id: the first 128 bits of SHA-256 over the cluster, the kind
/// and the parts that name one occurrence, NUL-separated, in hex.
pub fn alert_id(cluster: &str, kind: AlertKind, parts: &[&str]) -> String {
    let mut h = sha2::Sha256::new();
    h.update(b"havirt-alert\0");
    h.update(cluster.as_bytes());
    h.update(b"\0");
    h.update(kind.name().as_bytes());
    for p in parts {
        h.update(b"\0");
        h.update(p.as_bytes());
    }
    let digest = h.finalize();
    let mut out = String::with_capacity(ID_HEX_CHARS);
    for b in digest.iter().take(ID_HEX_CHARS / 2) {
        out.push_str(&format!("{b:02x}"));
    }
    out
}

/// A failover record, as the observer tells records apart.
type FailoverKey = (HostId, Option<BootId>, u64);

/// What the observer saw last time, per subject.
#[derive(Clone, Debug, Default, PartialEq)]
struct Seen {
    /// Peers confirmed off, with the boot that was.
    fenced: BTreeMap<HostId, Option<BootId>>,
    given_up: BTreeSet<DomainId>,
    self_fencing: bool,
    storage_lost: bool,
    maintenance: bool,
    /// Master only: why the admission figure is below the requirement.
    admission_breach: Option<String>,
}

/// Derives alerts from successive views; see the module doc.
pub struct Observer {
    cluster: String,
    me: HostId,
    /// This daemon's start, for the ids of this host's own events.
    incarnation: u64,
    storage_silent_after: Duration,
    seen: Option<Seen>,
    /// How many of this host's own events of each kind were raised.
    counts: BTreeMap<AlertKind, u64>,
    /// Failover records with their ordinal among this (host, boot)'s.
    failovers: BTreeMap<FailoverKey, u64>,
    opened: BTreeSet<FailoverKey>,
    closed: BTreeSet<FailoverKey>,
}

impl Observer {
    pub fn new(cluster: &str, me: HostId, incarnation: u64, storage_silent_after: Duration) -> Observer {
        Observer {
            cluster: cluster.to_owned(),
            me,
            incarnation,
            storage_silent_after,
            seen: None,
            counts: BTreeMap::new(),
            failovers: BTreeMap::new(),
            opened: BTreeSet::new(),
            closed: BTreeSet::new(),
        }
    }

    /// The view at `now` (the daemon's engine clock: 0 at its start) and
    /// the failover records; returns the alerts raised since the last call.
    /// The first call only takes note: a state this daemon starts in (a
    /// host fenced before it started, maintenance kept over a restart) is
    /// no news.
    pub fn observe(&mut self, now: Instant, unix_ms: u64, view: &NodeView, failovers: &[FailoverRecord]) -> Vec<Alert> {
        let seen = self.seen_in(now, view);
        let mut out = Vec::new();
        if let Some(before) = self.seen.take() {
            let ctx = Ctx { view, unix_ms, failovers };
            self.master_alerts(&ctx, &before, &seen, &mut out);
            self.own_alerts(&ctx, &before, &seen, &mut out);
        }
        self.seen = Some(seen);
        self.failover_alerts(view, unix_ms, failovers, &mut out);
        out
    }

    fn seen_in(&self, now: Instant, view: &NodeView) -> Seen {
        let me = view.hosts.iter().find(|h| h.id == self.me);
        // As the engine's heartbeat flag: no write yet counts from the start.
        let write_age = view.last_good_write_age.unwrap_or(Duration(now.0));
        Seen {
            fenced: view.hosts.iter().filter(|h| h.id != self.me && h.fenced).map(|h| (h.id, h.boot)).collect(),
            given_up: view.given_up.iter().copied().collect(),
            self_fencing: view.self_fence != "healthy",
            storage_lost: write_age >= self.storage_silent_after,
            maintenance: me.is_some_and(|h| h.maintenance),
            admission_breach: view.admission_breach.clone(),
        }
    }

    /// Host fenced and domain given up: sent by the master only.
    fn master_alerts(&mut self, ctx: &Ctx<'_>, before: &Seen, now: &Seen, out: &mut Vec<Alert>) {
        if !ctx.view.is_master {
            return;
        }
        for (&host, &boot) in &now.fenced {
            if before.fenced.get(&host) == Some(&boot) {
                continue;
            }
            let name = ctx.host_name(host);
            let boot_text = boot.map_or("unknown".to_string(), |b| format!("{b:x}"));
            let id = alert_id(&self.cluster, AlertKind::HostFenced, &[&name, &boot_text]);
            let record = ctx.failovers.iter().rev().find(|r| r.host_id == host && r.boot == boot);
            let how = record
                .and_then(|r| r.steps.iter().rev().find(|s| s.text.starts_with("fenced")))
                .map_or(String::new(), |s| format!(" ({})", s.text));
            let text = format!("{name} (boot {boot_text}) is fenced: confirmed powered off{how}");
            out.push(self.alert(ctx, AlertKind::HostFenced, id, &name, None, text, record));
        }
        if now.admission_breach.is_some() != before.admission_breach.is_some() {
            let me = ctx.host_name(self.me);
            let (kind, text) = match &now.admission_breach {
                Some(why) => (AlertKind::AdmissionBreach, format!("admission control: {why}")),
                None => (
                    AlertKind::AdmissionRestored,
                    "admission control: the cluster meets its tolerate_* requirement again".to_string(),
                ),
            };
            let n = self.counts.entry(kind).or_default();
            *n += 1;
            let parts = [me.as_str(), &format!("{:x}", self.incarnation), &n.to_string()];
            let id = alert_id(&self.cluster, kind, &parts);
            out.push(self.alert(ctx, kind, id, &me, None, text, None));
        }
        for d in now.given_up.difference(&before.given_up) {
            let view = ctx.view.domains.iter().find(|v| v.id == *d);
            let name = view.map_or_else(|| format!("{:032x}", d.0), |v| v.name.clone());
            let generation = view.and_then(|v| v.generation).unwrap_or(0);
            let id =
                alert_id(&self.cluster, AlertKind::DomainGivenUp, &[&format!("{:032x}", d.0), &generation.to_string()]);
            let host = view.and_then(|v| v.host).map_or_else(|| ctx.host_name(self.me), |h| ctx.host_name(h));
            let text = format!(
                "{name} is given up: it failed to start max_restarts times; havirt starts it again only once it runs \
                 (havirt start {name})"
            );
            out.push(self.alert(ctx, AlertKind::DomainGivenUp, id, &host, Some(name), text, None));
        }
    }

    /// This host's own events: sent by this host, master or not.
    fn own_alerts(&mut self, ctx: &Ctx<'_>, before: &Seen, now: &Seen, out: &mut Vec<Alert>) {
        let me = ctx.host_name(self.me);
        let mut raised = Vec::new();
        if now.self_fencing && !before.self_fencing {
            let text = format!(
                "{me} is self-fencing ({}): it destroys its protected domains; the others restart them",
                ctx.view.self_fence
            );
            raised.push((AlertKind::SelfFence, text));
        }
        if now.storage_lost != before.storage_lost {
            raised.push(if now.storage_lost {
                let age = ctx.view.last_good_write_age.map_or("ever".into(), |a| a.to_string());
                let text = format!(
                    "{me} lost its storage: no heartbeat write completed for {age}; it self-fences after renew_timeout"
                );
                (AlertKind::StorageLost, text)
            } else {
                (AlertKind::StorageRestored, format!("{me}: storage heartbeat writes work again"))
            });
        }
        if now.maintenance != before.maintenance {
            raised.push(if now.maintenance {
                (AlertKind::MaintenanceEntered, format!("{me} entered maintenance mode: it drains its domains"))
            } else {
                (AlertKind::MaintenanceExited, format!("{me} left maintenance mode: it takes restarts again"))
            });
        }
        for (kind, text) in raised {
            let n = self.counts.entry(kind).or_default();
            *n += 1;
            let parts =
                [me.as_str(), &format!("{:x}", ctx.view.boot), &format!("{:x}", self.incarnation), &n.to_string()];
            let id = alert_id(&self.cluster, kind, &parts);
            out.push(self.alert(ctx, kind, id, &me, None, text, None));
        }
    }

    /// Failover opened (its first domain lease moved) and closed (every
    /// moved domain runs again), once per record. Records exist only where
    /// this daemon acted as master (`failover` module).
    fn failover_alerts(&mut self, view: &NodeView, unix_ms: u64, records: &[FailoverRecord], out: &mut Vec<Alert>) {
        let ctx = Ctx { view, unix_ms, failovers: records };
        for r in records {
            let key = (r.host_id, r.boot, r.detected_unix_ms);
            if !self.failovers.contains_key(&key) {
                let ordinal = self.failovers.keys().filter(|k| (k.0, k.1) == (key.0, key.1)).count() as u64 + 1;
                self.failovers.insert(key, ordinal);
            }
            let ordinal = self.failovers[&key];
            let boot = r.boot.map_or("unknown".to_string(), |b| format!("{b:x}"));
            let parts = [r.host.as_str(), &boot, &ordinal.to_string()];
            // Opened as master; closed only if opened here.
            if view.is_master && !r.domains.is_empty() && self.opened.insert(key) {
                let moved: Vec<String> = r.domains.iter().map(|d| format!("{} to {}", d.name, d.to)).collect();
                let text = format!("failover of {} ({}): moving {}", r.host, r.verdict, moved.join(", "));
                let id = alert_id(&self.cluster, AlertKind::FailoverOpened, &parts);
                out.push(self.alert(&ctx, AlertKind::FailoverOpened, id, &r.host, None, text, Some(r)));
            }
            let all_running = !r.domains.is_empty() && r.domains.iter().all(|d| d.running_ms.is_some());
            if all_running && self.opened.contains(&key) && self.closed.insert(key) {
                let slowest = r.domains.iter().filter_map(|d| d.running_ms).max().unwrap_or(0);
                let moved: Vec<String> = r.domains.iter().map(|d| format!("{} on {}", d.name, d.to)).collect();
                let text = format!(
                    "failover of {} closed: {} running again, the last {} after the detection",
                    r.host,
                    moved.join(", "),
                    Duration(slowest)
                );
                let id = alert_id(&self.cluster, AlertKind::FailoverClosed, &parts);
                out.push(self.alert(&ctx, AlertKind::FailoverClosed, id, &r.host, None, text, Some(r)));
            }
        }
        self.forget_old_failovers();
    }

    fn forget_old_failovers(&mut self) {
        while self.failovers.len() > FAILOVERS_REMEMBERED {
            // The oldest detection first.
            let Some(oldest) = self.failovers.keys().min_by_key(|k| k.2).copied() else { break };
            self.failovers.remove(&oldest);
            self.opened.remove(&oldest);
            self.closed.remove(&oldest);
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn alert(
        &self,
        ctx: &Ctx<'_>,
        kind: AlertKind,
        id: String,
        host: &str,
        domain: Option<String>,
        text: String,
        failover: Option<&FailoverRecord>,
    ) -> Alert {
        Alert {
            format: FORMAT,
            id,
            kind,
            cluster: self.cluster.clone(),
            host: host.to_owned(),
            domain,
            sender: ctx.host_name(self.me),
            unix_ms: ctx.unix_ms,
            text,
            failover: failover.cloned(),
            timeline: failover.map(|r| render_failovers(std::slice::from_ref(r))),
        }
    }
}

struct Ctx<'a> {
    view: &'a NodeView,
    unix_ms: u64,
    failovers: &'a [FailoverRecord],
}

impl Ctx<'_> {
    fn host_name(&self, id: HostId) -> String {
        self.view.hosts.iter().find(|h| h.id == id).map_or_else(|| id.to_string(), |h| h.name.clone())
    }
}

#[cfg(test)]
mod tests;
