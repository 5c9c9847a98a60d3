//! What a node knows, as plain data: `havirt status` and the daemon's
//! control socket show it. Built by `Node::view(now)`; reading it changes
//! nothing.

use super::config::{AdmissionPolicy, DomainId, DomainSpec, HostId, HostSpec, Priority};
use super::io::{BootId, DomainReport, DomainState};
use super::node::{Node, SelfFence, local_word, reported_state};
use super::peers::verdict_name;
use super::time::{Duration, Instant};
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct NodeView {
    pub host: HostId,
    pub boot: BootId,
    /// This node holds the master lease and acts as master.
    pub is_master: bool,
    /// Owner of the master lease as last read (None: free or not read yet).
    pub master: Option<HostId>,
    /// "healthy", "fencing" or "fenced" (S4).
    pub self_fence: String,
    pub isolated: bool,
    /// S4 holds: a slot write completed within renew_timeout.
    pub storage_healthy: bool,
    /// Since the start of our last completed slot write.
    pub last_good_write_age: Option<Duration>,
    /// Every configured host, this one included, by id.
    pub hosts: Vec<HostView>,
    /// Every protected domain, by id.
    pub domains: Vec<DomainView>,
    /// Admission control (master only): host and fault-domain failures the
    /// cluster can absorb now.
    pub tolerance: Option<(u32, u32)>,
    /// `[cluster] admission` and `tolerate_*`, as configured.
    #[serde(default)]
    pub admission: AdmissionPolicy,
    /// Master only, admission warn or strict: why the figure is below the
    /// requirement, while it is.
    #[serde(default)]
    pub admission_breach: Option<String>,
    /// Maintenance mode: domains that did not move off this host, and why.
    #[serde(default)]
    pub migration_failures: Vec<(DomainId, String)>,
    /// Master only: domains given up on after max_restarts failed starts
    /// (not placed again until they run again), by id.
    #[serde(default)]
    pub given_up: Vec<DomainId>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct HostView {
    pub id: HostId,
    pub name: String,
    /// "self" for this host; else the verdict name (alive, partitioned,
    /// isolated, storage-lost, suspect, unknown).
    pub verdict: String,
    /// Since its last network heartbeat reached us (None: never; this host: None).
    pub net_age: Option<Duration>,
    /// Since we first saw its current slot content (storage heartbeat age).
    pub slot_age: Option<Duration>,
    pub boot: Option<BootId>,
    pub isolated: bool,
    pub self_fenced: bool,
    /// Its current boot was confirmed powered off (fence agent, operator,
    /// or a `fenced/` record on storage) and it has not come back since:
    /// `havirt status` calls it fenced rather than by its verdict.
    #[serde(default)]
    pub fenced: bool,
    /// In maintenance mode (takes no restarts; drains by live migration).
    #[serde(default)]
    pub maintenance: bool,
    /// Size (its latest slot's, else our spec's; 0 when neither knows) and
    /// what its protected domains use.
    pub memory_mib: u64,
    pub vcpus: u32,
    pub used_memory_mib: u64,
    pub used_vcpus: u32,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DomainView {
    pub id: DomainId,
    pub name: String,
    pub priority: Priority,
    /// The host whose slot (or our own state) reports the domain.
    pub host: Option<HostId>,
    /// As reported in that slot.
    pub state: Option<DomainState>,
    /// Lease generation that host reports (or the master's cache).
    pub generation: Option<u64>,
    /// What this node is doing with it, when it is local ("running",
    /// "starting", "backoff", ...).
    pub local: Option<String>,
}

impl HostView {
    /// A host with this verdict and nothing else known: the tests' base
    /// (fill in what a test needs with struct update syntax).
    #[cfg(test)]
    pub fn sample(id: u16, name: &str, verdict: &str) -> HostView {
        HostView {
            id: HostId(id),
            name: name.to_string(),
            verdict: verdict.to_string(),
            net_age: None,
            slot_age: None,
            boot: None,
            isolated: false,
            self_fenced: false,
            fenced: false,
            maintenance: false,
            memory_mib: 0,
            vcpus: 0,
            used_memory_mib: 0,
            used_vcpus: 0,
        }
    }
}

impl Node {
    /// What this node knows now, for `havirt status` and the control socket.
    /// Reading it changes nothing.
    pub fn view(&self, now: Instant) -> NodeView {
        let self_fence = match self.self_fence {
            SelfFence::Healthy => "healthy",
            SelfFence::Fencing { .. } => "fencing",
            SelfFence::Fenced { .. } => "fenced",
        };
        let mut hosts: Vec<HostView> = self.cfg.spec.hosts.iter().map(|h| self.host_view(now, h)).collect();
        hosts.sort_by_key(|h| h.id);
        NodeView {
            host: self.cfg.host,
            boot: self.cfg.boot,
            is_master: self.master.is_some(),
            master: self.master_lease.and_then(|l| l.owner).map(|o| o.host),
            self_fence: self_fence.to_string(),
            isolated: self.isolated,
            storage_healthy: self.storage_healthy(now),
            last_good_write_age: self.last_good_write.map(|l| now.since(l)),
            hosts,
            domains: self.cfg.spec.domains.values().map(|d| self.domain_view(d)).collect(),
            tolerance: self.master.as_ref().and_then(|m| m.tolerance()),
            admission: self.cfg.spec.admission,
            admission_breach: self.master.as_ref().and_then(|m| m.admission_breach()).map(str::to_string),
            migration_failures: self.migration_failed.iter().map(|(d, why)| (*d, why.clone())).collect(),
            given_up: self.master.as_ref().map(|m| m.given_up()).unwrap_or_default(),
        }
    }

    fn host_view(&self, now: Instant, h: &HostSpec) -> HostView {
        if h.id == self.cfg.host {
            let (used_memory_mib, used_vcpus) = self.used();
            return HostView {
                id: h.id,
                name: h.name.clone(),
                verdict: "self".into(),
                net_age: None,
                slot_age: None,
                boot: Some(self.cfg.boot),
                isolated: self.isolated,
                self_fenced: matches!(self.self_fence, SelfFence::Fenced { .. }),
                fenced: false,
                maintenance: self.maintenance,
                memory_mib: h.memory_mib,
                vcpus: h.vcpus,
                used_memory_mib,
                used_vcpus,
            };
        }
        let peer = self.peers.get(&h.id);
        let slot = peer.and_then(|p| p.slot.as_ref());
        let (memory_mib, vcpus) = self.host_size(h);
        HostView {
            id: h.id,
            name: h.name.clone(),
            verdict: peer.map_or("unknown", |p| verdict_name(self.verdict_of(now, p))).to_string(),
            net_age: peer.and_then(|p| p.heard_at).map(|t| now.since(t)),
            slot_age: peer.and_then(|p| p.slot_seen_at).map(|t| now.since(t)),
            boot: slot.map(|s| s.boot).or_else(|| peer.and_then(|p| p.heartbeat.as_ref()).map(|hb| hb.boot)),
            isolated: slot.is_some_and(|s| s.isolated),
            self_fenced: slot.is_some_and(|s| s.self_fenced),
            fenced: peer.is_some_and(|p| p.current_boot().is_some_and(|b| p.fenced_boots.contains(&b))),
            maintenance: slot.is_some_and(|s| s.maintenance),
            memory_mib,
            vcpus,
            used_memory_mib: slot.map_or(0, |s| s.used_memory_mib),
            used_vcpus: slot.map_or(0, |s| s.used_vcpus),
        }
    }

    /// Where a domain is, by the newest knowledge: our own state when it is
    /// local, else the report with the highest lease generation among the
    /// latest slots (a slot of a host's current boot first), then our own
    /// release. The master's lease cache fills a generation nobody reports.
    fn domain_view(&self, d: &DomainSpec) -> DomainView {
        let mut best: Option<((bool, u64, bool), HostId, DomainReport)> = None;
        let mut consider = |rank: (bool, u64, bool), h: HostId, r: DomainReport| {
            if best.as_ref().is_none_or(|(b, _, _)| rank > *b) {
                best = Some((rank, h, r));
            }
        };
        for (h, p) in &self.peers {
            let Some(slot) = &p.slot else { continue };
            if let Some(r) = slot.domains.get(&d.id) {
                let released = matches!(r.state, DomainState::Released { .. } | DomainState::HandedOver { .. });
                consider((p.current_boot() == Some(slot.boot), r.generation, !released), *h, *r);
            }
        }
        if let Some((g, failed_start, _)) = self.released.get(&d.id) {
            let state = DomainState::Released { failed_start: *failed_start };
            consider((true, *g, false), self.cfg.host, DomainReport { state, generation: *g });
        }
        if let Some(g) = self.intent.stopped(d.id) {
            consider((true, g, false), self.cfg.host, DomainReport { state: DomainState::Stopped, generation: g });
        }
        let local = self.local.get(&d.id);
        let (host, state, generation) = match (local, best) {
            (Some(l), _) => (Some(self.cfg.host), Some(reported_state(l.state)), l.generation),
            // Stopped on purpose runs nowhere, whoever reports it.
            (None, Some((_, _, r))) if r.state == DomainState::Stopped => (None, Some(r.state), Some(r.generation)),
            (None, Some((_, h, r))) => (Some(h), Some(r.state), Some(r.generation)),
            (None, None) => (None, None, None),
        };
        let cached = self.master.as_ref().and_then(|m| m.lease_generation(d.id));
        DomainView {
            id: d.id,
            name: d.name.clone(),
            priority: d.policy.priority,
            host,
            state,
            generation: generation.or(cached),
            local: local.map(|l| local_word(l.state).to_string()),
        }
    }
}
