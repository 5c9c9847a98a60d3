//! Guest-agent monitoring (issue 5; vSphere HA's "VM monitoring"): the host
//! that runs a domain with `monitor.enabled` pings its QEMU guest agent,
//! and resets a guest whose agent stayed silent for the failure interval.
//!
//! - Silence counts from the agent's last answer. Before its first answer
//!   after a start, an adoption or a reset, it counts from `min_uptime`
//!   after that instant (the guest boots meanwhile).
//! - Only libvirt's own verdict counts as silence (`AgentPing::NoAnswer`:
//!   the agent is not connected or did not answer in time). When libvirt
//!   itself fails or does not answer, nothing is known and nothing is
//!   reset: a hung libvirtd is not a hung guest.
//! - A reset is `virDomainReset`: the same qemu, disks and lease, so it
//!   touches none of S1-S5. At most `max_resets` per `reset_window`; then
//!   the domain is left running and that is said once.
//! - Reset times are kept in memory: a daemon restart or a move to another
//!   host starts the count afresh (as vSphere's per-host count).

use super::config::{DomainId, GuestMonitor};
use super::io::{Action, AgentPing};
use super::node::{LocalState, Node, SelfFence};
use super::time::{Duration, Instant};
use std::collections::BTreeMap;

/// A guest is pinged every third of its failure interval, within these
/// bounds (so that two pings at least fall in every interval).
pub const GUEST_PING_INTERVAL_MIN: Duration = Duration::from_secs(1);
pub const GUEST_PING_INTERVAL_MAX: Duration = Duration::from_secs(5);
/// A ping the adapter has not answered within this (libvirtd hung; the
/// adapter's own agent timeout is 2 s) is given up as `Unknown`.
pub const GUEST_PING_ANSWER_TIMEOUT: Duration = Duration::from_secs(10);

/// Every monitored run, and the recent resets of every domain.
#[derive(Default)]
pub struct Watches {
    runs: BTreeMap<DomainId, Run>,
    resets: BTreeMap<DomainId, Vec<Instant>>,
}

/// One run of a guest, from its start, adoption or last reset.
struct Run {
    /// The lease generation it runs under: a new one is a new start.
    generation: Option<u64>,
    since: Instant,
    last_ok: Option<Instant>,
    last: Option<AgentPing>,
    inflight: Option<Instant>,
    next_ping: Instant,
    silent_logged: bool,
    limit_logged: bool,
}

impl Run {
    fn new(now: Instant, generation: Option<u64>) -> Run {
        Run {
            generation,
            since: now,
            last_ok: None,
            last: None,
            inflight: None,
            next_ping: now,
            silent_logged: false,
            limit_logged: false,
        }
    }
}

impl Watches {
    /// An unprotected domain: nothing of it is kept.
    pub(super) fn forget(&mut self, d: DomainId) {
        self.runs.remove(&d);
        self.resets.remove(&d);
    }
}

fn ping_interval(m: &GuestMonitor) -> Duration {
    Duration(m.failure_interval.as_millis() / 3).clamp(GUEST_PING_INTERVAL_MIN, GUEST_PING_INTERVAL_MAX)
}

fn window_text(d: Duration) -> String {
    let s = d.as_millis() / 1000;
    if s.is_multiple_of(3600) {
        format!("{}h", s / 3600)
    } else if s.is_multiple_of(60) {
        format!("{}min", s / 60)
    } else {
        format!("{s}s")
    }
}

impl Node {
    /// Every tick: ping the monitored guests that are due, and judge them.
    pub(super) fn monitor_tick(&mut self, now: Instant) {
        let watched: Vec<(DomainId, Option<u64>, GuestMonitor)> = self
            .local
            .iter()
            .filter(|(_, l)| matches!(l.state, LocalState::Running | LocalState::Ready))
            .filter_map(|(d, l)| {
                let m = self.cfg.spec.domains.get(d)?.policy.monitor;
                m.enabled.then_some((*d, l.generation, m))
            })
            .collect();
        self.watch.runs.retain(|d, _| watched.iter().any(|(x, _, _)| x == d));
        let spec = self.cfg.spec.clone();
        self.watch.resets.retain(|d, _| spec.domains.contains_key(d));
        if self.self_fence != SelfFence::Healthy {
            return;
        }
        for (d, generation, m) in watched {
            self.watch_one(now, d, generation, &m);
        }
    }

    fn watch_one(&mut self, now: Instant, d: DomainId, generation: Option<u64>, m: &GuestMonitor) {
        let run = self.watch.runs.entry(d).or_insert_with(|| Run::new(now, generation));
        if generation.is_some() && run.generation.is_some() && run.generation != generation {
            // Restarted (crash, or started again) since: a new boot.
            *run = Run::new(now, generation);
        }
        run.generation = run.generation.or(generation);
        if run.inflight.is_some_and(|t| now.since(t) >= GUEST_PING_ANSWER_TIMEOUT) {
            run.inflight = None;
            run.last = Some(AgentPing::Unknown);
        }
        if run.inflight.is_none() && now >= run.next_ping {
            run.inflight = Some(now);
            run.next_ping = now + ping_interval(m);
            self.actions.push_back(Action::PingGuestAgent { domain: d });
        }
        self.judge(now, d, m);
    }

    /// Reset a guest silent for the whole failure interval, within the limit.
    fn judge(&mut self, now: Instant, d: DomainId, m: &GuestMonitor) {
        let Some(run) = self.watch.runs.get(&d) else { return };
        let from = run.last_ok.unwrap_or(run.since + m.min_uptime);
        if run.last != Some(AgentPing::NoAnswer) || now < from + m.failure_interval {
            return;
        }
        let silent = now.since(run.last_ok.unwrap_or(run.since));
        let (limit_logged, generation) = (run.limit_logged, run.generation);
        let name = self.domain_name(d);
        let window = window_text(m.reset_window);
        let resets = self.watch.resets.entry(d).or_default();
        resets.retain(|t| now.since(*t) < m.reset_window);
        if resets.len() >= m.max_resets as usize {
            let done = resets.len();
            if !limit_logged {
                if let Some(r) = self.watch.runs.get_mut(&d) {
                    r.limit_logged = true;
                }
                let text = format!(
                    "{name}: guest agent silent for {silent}, but {done} resets in {window} reached the limit; leaving it running"
                );
                self.emit(now, "node", text);
            }
            return;
        }
        resets.push(now);
        let n = resets.len();
        self.watch.runs.insert(d, Run { next_ping: now + ping_interval(m), ..Run::new(now, generation) });
        let text = format!(
            "{name}: guest agent silent for {silent} (failure interval {}): resetting the guest (reset {n} of {} per {window})",
            m.failure_interval, m.max_resets
        );
        self.emit(now, "node", text);
        self.actions.push_back(Action::ResetDomain { domain: d });
    }

    /// `Input::GuestAgent`: a ping came back.
    pub(super) fn handle_guest_agent(&mut self, now: Instant, d: DomainId, result: AgentPing) {
        let failure_interval = self.cfg.spec.domains.get(&d).map(|s| s.policy.monitor.failure_interval);
        let name = self.domain_name(d);
        let Some(run) = self.watch.runs.get_mut(&d) else { return };
        run.inflight = None;
        let mut text = None;
        match result {
            AgentPing::Answered if run.last_ok.is_none() => {
                text = Some(format!("{name}: guest agent answers, {} after start or reset", now.since(run.since)));
            }
            AgentPing::Answered if run.silent_logged => {
                text = Some(format!("{name}: guest agent answers again"));
            }
            AgentPing::NoAnswer if run.last_ok.is_some() && !run.silent_logged => {
                let within = failure_interval.unwrap_or_default();
                text = Some(format!("{name}: guest agent stopped answering; reset unless it answers within {within}"));
                run.silent_logged = true;
            }
            _ => {}
        }
        if result == AgentPing::Answered {
            run.last_ok = Some(now);
            run.silent_logged = false;
            run.limit_logged = false;
        }
        run.last = Some(result);
        if let Some(text) = text {
            self.emit(now, "node", text);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pings_fall_thrice_per_interval_within_bounds() {
        let m = |s| GuestMonitor { failure_interval: Duration::from_secs(s), ..GuestMonitor::default() };
        assert_eq!(ping_interval(&m(30)), GUEST_PING_INTERVAL_MAX);
        assert_eq!(ping_interval(&m(6)), Duration::from_secs(2));
        assert_eq!(ping_interval(&m(1)), GUEST_PING_INTERVAL_MIN);
    }

    #[test]
    fn windows_read_in_their_largest_unit() {
        assert_eq!(window_text(Duration::from_secs(3600)), "1h");
        assert_eq!(window_text(Duration::from_secs(600)), "10min");
        assert_eq!(window_text(Duration::from_secs(45)), "45s");
    }
}
