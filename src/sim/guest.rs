//! Guests in the simulator (issue 5): guest agents that answer pings once
//! the guest has booted, guests that hang (until a reset, or at every boot:
//! a broken OS), guests shut down from inside or destroyed by the operator,
//! and the operator's `havirt start`. The checker's side: a domain stopped
//! on purpose must not run again until the operator starts it (unless a
//! fault on its host lost the intent before its lease was freed), and a
//! reset must only hit a guest whose agent really went silent.

use super::faults::Command;
use super::world::{Ev, QemuState, World};
use crate::engine::config::{DomainId, HostId, OnShutdown};
use crate::engine::io::{Action, AgentPing, DomainEvent, Input, Lease, LeaseKey, LeaseReason, OperatorCommand};
use std::collections::{BTreeMap, BTreeSet};

/// The adapter answers a ping of a hung (connected) agent after its agent
/// timeout (hypervisor::libvirt::AGENT_PING_TIMEOUT_S).
pub const AGENT_TIMEOUT_MS: u64 = 2_000;
/// An operator start that did not get the domain running is tried again
/// after this long...
pub const START_RETRY_MS: u64 = 5_000;
/// ...at most this many times.
pub const START_ATTEMPTS_MAX: u32 = 12;

/// The guests' state: which runs hang.
#[derive(Default)]
pub struct Guests {
    /// qemu runs (domain and serial: the initial ones share serial 0)
    /// whose guest hangs until a reset.
    hung: BTreeSet<(DomainId, u64)>,
    /// Domains whose guest hangs at every boot.
    always: BTreeSet<DomainId>,
}

/// Ground truth of intentional stops, for the checker.
#[derive(Default)]
pub struct StopIntents {
    /// Stopped on purpose: the host it ran on, when, and whether storage
    /// holds its lease free with reason `Stopped` (the intent is durable).
    stopped: BTreeMap<DomainId, Intent>,
    /// The operator asked these hosts to start it.
    start_requested: BTreeMap<DomainId, BTreeSet<HostId>>,
}

#[derive(Clone, Copy, Debug)]
struct Intent {
    on: HostId,
    since: u64,
    durable: bool,
    /// Stopped during a fault episode of its host, when havirt may be
    /// stopping it itself (self-fence, isolation response): until its
    /// lease is freed as stopped, a restart is as right as none.
    loose: bool,
}

impl StopIntents {
    /// Unprotected: the operator manages it by hand from now on.
    pub fn forget(&mut self, d: DomainId) {
        self.stopped.remove(&d);
        self.start_requested.remove(&d);
    }
}

/// Guest events of the simulated world.
#[derive(Clone, Debug)]
pub enum GuestEv {
    /// A ping's answer reaches the daemon of `host` (run `epoch`).
    Ping { host: HostId, epoch: u64, domain: DomainId, result: AgentPing },
    /// The operator's `havirt start` (attempt n).
    Start { domain: DomainId, host: HostId, attempt: u32 },
}

impl World {
    /// Whether the guest of `d` on `h` hangs now.
    pub fn guest_hung(&self, h: HostId, d: DomainId) -> bool {
        let serial = self.hosts.get(&h).and_then(|x| x.qemu.get(&d)).map(|q| q.serial);
        self.guests.always.contains(&d) || serial.is_some_and(|s| self.guests.hung.contains(&(d, s)))
    }

    /// The guest commands of `Command`; false for any other command.
    pub fn apply_guest_command(&mut self, c: &Command) -> bool {
        match c {
            Command::GuestHang { domain, always } => self.guest_hang(*domain, *always),
            Command::GuestRecover(d) => {
                // Future boots are fine; a guest hanging now hangs until reset.
                if self.guests.always.remove(d) {
                    self.guest_hang(*d, false);
                }
            }
            Command::GuestStop { domain, destroy } => self.guest_stop(*domain, *destroy),
            Command::OperatorStart { domain, host } => self.operator_start(*domain, *host, 0),
            _ => return false,
        }
        true
    }

    fn guest_hang(&mut self, d: DomainId, always: bool) {
        if always {
            self.guests.always.insert(d);
        }
        let runs: Vec<(DomainId, u64)> =
            self.hosts.values().filter(|x| x.powered).filter_map(|x| x.qemu.get(&d)).map(|q| (d, q.serial)).collect();
        self.guests.hung.extend(runs);
    }

    /// The guest powers itself off (or the operator destroys it) where it
    /// runs, has booted and holds its lease (a zombie's stop would say
    /// nothing about the domain). A hung guest cannot shut itself down.
    fn guest_stop(&mut self, d: DomainId, destroy: bool) {
        let owner = self.storage.leases.get(&LeaseKey::Domain(d)).and_then(|l| l.owner);
        let on = self.hosts.values().find(|x| {
            x.running()
                && owner.is_some_and(|o| o.host == x.id && o.boot == x.boot)
                && x.qemu.get(&d).is_some_and(|q| q.state == QemuState::Running && q.ready_at <= self.now)
        });
        let Some(h) = on.map(|x| x.id) else {
            self.log_sim(&format!("{} runs nowhere booted: nothing stops", self.domain_name(d)));
            return;
        };
        if !destroy && self.guest_hung(h, d) {
            self.log_sim(&format!("{} hangs: it cannot shut itself down", self.domain_name(d)));
            return;
        }
        let loose = self.hosts[&h].active_fault.is_some();
        self.hosts.get_mut(&h).map(|x| x.qemu.remove(&d));
        let stop = self.spec.domains.get(&d).is_some_and(|s| s.policy.on_shutdown == OnShutdown::Stop);
        if stop {
            let intent = Intent { on: h, since: self.now, durable: false, loose };
            self.checker.intents.stopped.insert(d, intent);
            self.checker.intents.start_requested.remove(&d);
        }
        let event = if destroy { DomainEvent::Destroyed } else { DomainEvent::ShutDown };
        self.deliver(h, Input::Domain { domain: d, event });
    }

    /// `havirt start D` on `h`: asked while the daemon there can act,
    /// retried while the domain does not run.
    pub fn operator_start(&mut self, d: DomainId, h: HostId, attempt: u32) {
        let runs = self.hosts.values().any(|x| x.powered && x.qemu.contains_key(&d));
        if runs || attempt > START_ATTEMPTS_MAX || !self.spec.domains.contains_key(&d) {
            return;
        }
        let x = &self.hosts[&h];
        if x.running() && x.node.is_some() && x.storage_fault.is_none() {
            self.checker.intents.start_requested.entry(d).or_default().insert(h);
            self.deliver(h, Input::Operator(OperatorCommand::Start(d)));
        }
        self.schedule(START_RETRY_MS, Ev::Guest(GuestEv::Start { domain: d, host: h, attempt: attempt + 1 }));
    }

    /// `Action::PingGuestAgent` and `Action::ResetDomain` of host `h`.
    pub fn execute_guest_action(&mut self, h: HostId, a: Action) {
        if self.hosts[&h].libvirt_hung {
            // No answer: the engine gives the ping up; the reset never happens.
            return;
        }
        match a {
            Action::PingGuestAgent { domain } => self.ping(h, domain),
            Action::ResetDomain { domain } => self.reset(h, domain),
            _ => {}
        }
    }

    fn ping(&mut self, h: HostId, d: DomainId) {
        let epoch = self.hosts[&h].daemon_epoch;
        let q = self.hosts[&h].qemu.get(&d).map(|q| (q.state, q.ready_at));
        let booted = q.is_some_and(|(s, ready_at)| s == QemuState::Running && ready_at <= self.now);
        let (result, delay) = match (booted, self.guest_hung(h, d)) {
            (true, false) => (AgentPing::Answered, self.rng.range(2, 10)),
            // Connected, but the guest does not answer: the agent timeout.
            (true, true) => (AgentPing::NoAnswer, AGENT_TIMEOUT_MS),
            // Booting (not connected yet) or gone: libvirt says so at once.
            (false, _) => (AgentPing::NoAnswer, self.rng.range(2, 10)),
        };
        self.schedule(delay, Ev::Guest(GuestEv::Ping { host: h, epoch, domain: d, result }));
    }

    /// A hard reset: the same qemu reboots its guest (a hang ends, unless
    /// the guest hangs at every boot).
    fn reset(&mut self, h: HostId, d: DomainId) {
        let Some((serial, state, ready_at)) = self.hosts[&h].qemu.get(&d).map(|q| (q.serial, q.state, q.ready_at))
        else {
            return;
        };
        let interval = self.spec.domains.get(&d).map_or(0, |s| s.policy.monitor.failure_interval.as_millis());
        let answered_all_along = state == QemuState::Running && ready_at.saturating_add(interval) <= self.now;
        if !self.guest_hung(h, d) && answered_all_along {
            let detail = format!("{h} resets {}, whose guest agent answers", self.domain_name(d));
            self.violation("RESET", detail);
        }
        self.log_sim(&format!("{} is reset on {h}", self.domain_name(d)));
        self.guests.hung.remove(&(d, serial));
        let (lo, hi) = self.params.readiness_ms;
        let ready_at = self.now + self.rng.range(lo, hi);
        if let Some(q) = self.hosts.get_mut(&h).and_then(|x| x.qemu.get_mut(&d)) {
            q.ready_at = ready_at;
        }
    }

    pub fn guest_event(&mut self, ev: GuestEv) {
        match ev {
            GuestEv::Ping { host, epoch, domain, result } => {
                if self.epoch(host) == Some(epoch) {
                    self.deliver(host, Input::GuestAgent { domain, result });
                }
            }
            GuestEv::Start { domain, host, attempt } => self.operator_start(domain, host, attempt),
        }
    }

    // ---- checker ------------------------------------------------------

    /// A start of a domain stopped on purpose: fine when the operator asked
    /// this host; excused when a fault on its host lost the intent before
    /// its lease was freed; a violation otherwise.
    pub fn check_stopped_start(&mut self, h: HostId, d: DomainId) {
        let Some(i) = self.checker.intents.stopped.get(&d).copied() else { return };
        if self.checker.intents.start_requested.get(&d).is_some_and(|hs| hs.contains(&h)) {
            self.checker.intents.forget(d);
            return;
        }
        if !i.durable && (i.loose || self.checker.last_fault.get(&i.on).is_some_and(|t| *t >= i.since)) {
            self.checker.intents.forget(d);
            return;
        }
        let detail = format!(
            "{h} starts {}, stopped on purpose on {} at {} ms and not started by the operator",
            self.domain_name(d),
            i.on,
            i.since
        );
        self.violation("STOPPED", detail);
    }

    /// Every lease change: a free `Stopped` lease makes the intent durable,
    /// and must follow an intentional stop; a lease taken by a host the
    /// operator asked to start the domain ends the intent.
    pub fn note_stopped_lease(&mut self, key: LeaseKey, new: Lease) {
        let LeaseKey::Domain(d) = key else { return };
        let asked = |h: HostId| self.checker.intents.start_requested.get(&d).is_some_and(|hs| hs.contains(&h));
        if new.owner.is_some_and(|o| asked(o.host)) {
            // `havirt start` took the lease: the domain is protected as any
            // other from now on, and restarted elsewhere if that start fails.
            self.checker.intents.forget(d);
            return;
        }
        if new.owner.is_some() || new.reason != LeaseReason::Stopped {
            return;
        }
        match self.checker.intents.stopped.get_mut(&d) {
            Some(intent) => intent.durable = true,
            None => {
                let detail = format!("the lease of {} is freed as stopped, but nobody stopped it", self.domain_name(d));
                self.violation("STOPPED", detail);
            }
        }
    }

    /// L1 for domains stopped on purpose: they run nowhere once their
    /// intent is durable; and it must be, unless a fault on their host may
    /// have lost it. Returns the domains the usual L1 check skips.
    pub fn check_stopped_converged(&mut self) -> BTreeSet<DomainId> {
        let intents: Vec<(DomainId, Intent)> = self.checker.intents.stopped.iter().map(|(d, i)| (*d, *i)).collect();
        let mut skip = BTreeSet::new();
        for (d, i) in intents {
            skip.insert(d);
            let n = self.hosts.values().filter(|x| x.running() && x.qemu.contains_key(&d)).count();
            let faulted = i.loose || self.checker.last_fault.get(&i.on).is_some_and(|t| *t >= i.since);
            if i.durable && n != 0 {
                self.violation(
                    "STOPPED",
                    format!("{} runs on {n} hosts though stopped on purpose", self.domain_name(d)),
                );
            } else if !i.durable && !faulted {
                let text = format!("{} was stopped on purpose but its lease was never freed", self.domain_name(d));
                self.violation("L1", text);
            }
        }
        skip
    }
}
