//! Applying faults and operator commands to the simulated world.

use super::faults::{AgentMode, Command, StorageFault};
use super::world::{Ev, World};
use crate::engine::config::{ClusterSpec, DomainId, HostId};
use crate::engine::io::{Input, Lease, LeaseKey, LeaseReason, OperatorCommand, Owner};
use std::sync::Arc;

/// After a fault is cleared, losses on that host are still blamed on it for
/// this long (a self-fence or zombie kill completes within it).
pub const FAULT_TAIL_MS: u64 = 15_000;
/// A `protect` waits this long for the host that runs the domain to be able
/// to protect it (running, daemon up, storage working)...
pub const PROTECT_RETRY_MS: u64 = 10_000;
/// ...at most this many times, then gives up (the domain stays unprotected).
pub const PROTECT_ATTEMPTS_MAX: u32 = 12;
/// How often `Command::EndMaintenance` tries again.
pub const MAINTENANCE_EXIT_RETRY_MS: u64 = 5_000;

impl World {
    pub fn apply_command(&mut self, c: Command) {
        let text = describe(&c, self);
        self.log_sim(&text);
        if is_fault(&c) {
            self.checker.fault_times.push(self.now);
        }
        if self.apply_guest_command(&c) {
            return;
        }
        match c {
            Command::PowerOff(h) => {
                let class = self.power_loss_class(h);
                self.power_off(h, class);
            }
            Command::PowerOn(h) => self.power_on(h),
            Command::Partition(groups) => self.partitions = groups,
            Command::DropOneWay { from, to } => {
                self.one_way.insert((from, to));
            }
            Command::HealNetwork => {
                self.partitions.clear();
                self.one_way.clear();
                self.loss_percent = 0;
            }
            Command::Isolate(h) => {
                if let Some(x) = self.hosts.get_mut(&h) {
                    x.isolated = true;
                    if x.active_fault.is_none() {
                        x.active_fault = Some((self.now, "isolation_response"));
                    }
                }
            }
            Command::Unisolate(h) => {
                if let Some(x) = self.hosts.get_mut(&h) {
                    x.isolated = false;
                }
                self.clear_fault_later(h);
            }
            Command::NetLoss(p) => self.loss_percent = p.min(100),
            Command::StorageFault { host, fault } => {
                if let Some(x) = self.hosts.get_mut(&host) {
                    x.storage_fault = Some(fault);
                    if x.active_fault.is_none() {
                        x.active_fault = Some((self.now, "storage_loss"));
                    }
                }
                if fault == StorageFault::Fail {
                    // Requests already held by a stall now fail too.
                    self.release_held(host);
                }
            }
            Command::StorageRestore(h) => {
                if let Some(x) = self.hosts.get_mut(&h) {
                    x.storage_fault = None;
                }
                if self.storage.stall_until <= self.now {
                    self.release_held(h);
                }
                self.clear_fault_later(h);
            }
            Command::StorageStall { millis } => {
                self.storage.stall_until = self.storage.stall_until.max(self.now + millis);
                self.schedule(millis, Ev::StallEnd);
            }
            Command::Pause(h) => self.pause(h),
            Command::Resume(h) => {
                self.resume(h);
                self.clear_fault_later(h);
            }
            Command::Hypervisor { host, hung, qemu_stuck } => {
                let was_hung = self.hosts.get(&host).is_some_and(|x| x.libvirt_hung);
                if let Some(x) = self.hosts.get_mut(&host) {
                    x.libvirt_hung = hung;
                    x.qemu_stuck = qemu_stuck;
                }
                if was_hung && !hung {
                    self.libvirt_answers(host);
                }
            }
            Command::DaemonCrash(h) => self.crash_daemon(h),
            Command::DaemonStop { host, host_reset } => self.stop_daemon(host, host_reset),
            Command::DaemonStart(h) => {
                self.start_daemon(h);
                self.clear_fault_later(h);
            }
            Command::FenceAgent { target, agent, mode } => {
                if mode == AgentMode::Works {
                    self.fence_agents.remove(&(target, agent));
                } else {
                    self.fence_agents.insert((target, agent), mode);
                }
            }
            Command::DomainCrash(d) => {
                self.checker.domain_fault.insert(d, self.now);
                let on: Vec<HostId> =
                    self.hosts.values().filter(|x| x.running() && x.qemu.contains_key(&d)).map(|x| x.id).collect();
                for h in on {
                    self.hosts.get_mut(&h).map(|x| x.qemu.remove(&d));
                    if self.spec.domains.contains_key(&d) {
                        self.checker.domain_lost(d, self.now, "domain_crash", true);
                    }
                    self.deliver(h, Input::Domain { domain: d, event: crate::engine::io::DomainEvent::Crashed });
                }
            }
            Command::DomainBroken { domain, broken } => {
                self.checker.domain_fault.insert(domain, self.now);
                if broken {
                    self.broken_domains.insert(domain);
                } else {
                    self.broken_domains.remove(&domain);
                }
            }
            Command::OperatorFenceConfirm(h) => {
                // The operator tells every running daemon (havirt fence confirm).
                let ids: Vec<HostId> = self.hosts.keys().copied().filter(|x| *x != h).collect();
                for x in ids {
                    self.deliver(x, Input::Operator(OperatorCommand::FenceConfirm(h)));
                }
            }
            Command::Protect { domain, host } => self.protect(domain, host, 0),
            Command::Unprotect(d) => self.unprotect(d),
            Command::Maintenance { host, enter } => {
                self.deliver(host, Input::Operator(OperatorCommand::Maintenance(enter)));
            }
            Command::EndMaintenance(host) => {
                self.deliver(host, Input::Operator(OperatorCommand::Maintenance(false)));
                let node = self.hosts.get(&host).map(|x| x.node.as_ref().map(|n| n.in_maintenance()));
                // None: no such host. Some(None): its daemon does not run.
                if matches!(node, Some(None | Some(true))) {
                    self.schedule(MAINTENANCE_EXIT_RETRY_MS, Ev::Command(Command::EndMaintenance(host)));
                }
            }
            Command::GuestHang { .. }
            | Command::GuestRecover(_)
            | Command::GuestStop { .. }
            | Command::OperatorStart { .. } => {}
        }
    }

    /// `havirt protect` as the daemon does it (see `Command::Protect`).
    pub fn protect(&mut self, d: DomainId, host: Option<HostId>, attempt: u32) {
        let name = self.domain_name(d);
        if self.spec.domains.contains_key(&d) || !self.domains.contains_key(&d) {
            return;
        }
        let runs: Vec<HostId> =
            self.hosts.values().filter(|x| x.powered && x.qemu.contains_key(&d)).map(|x| x.id).collect();
        let target = match (host, runs.as_slice()) {
            (Some(h), _) => Some(h),
            (None, []) => None,
            (None, [h]) => Some(*h),
            (None, _) => return,
        };
        if host.is_none()
            && let Some(h) = target
            && !self.can_protect_on(h)
        {
            // The daemon there cannot take the lease now: the operator tries again.
            if attempt < PROTECT_ATTEMPTS_MAX {
                self.schedule(PROTECT_RETRY_MS, Ev::Protect { domain: d, attempt: attempt + 1 });
            } else {
                self.log_sim(&format!("{name} stays unprotected: {h} could not protect it"));
            }
            return;
        }
        let key = LeaseKey::Domain(d);
        let free = Lease { owner: None, generation: 0, reason: LeaseReason::Acquired };
        let current = self.storage.leases.get(&key).copied().unwrap_or(free);
        let owner = target.map(|h| Owner { host: h, boot: self.hosts[&h].boot });
        let lease = Lease { owner, generation: current.generation + 1, reason: LeaseReason::Acquired };
        // `havirt protect` on the host that runs it (or, for one running
        // nowhere, on the first host).
        let writer = target.or_else(|| self.hosts.keys().next().copied()).expect("a cluster has hosts");
        self.force_lease(key, lease, writer);
        let whom = target.map_or_else(|| "free: the master starts it".to_string(), |h| format!("to {h}"));
        self.log_sim(&format!("{name} protected: lease generation {} {whom}", lease.generation));
        let mut spec: ClusterSpec = (*self.spec).clone();
        spec.domains.insert(d, self.domains[&d].clone());
        self.spec = Arc::new(spec);
        self.protected_at.insert(d, self.now);
        self.registry_changed(target.map(|h| (h, d)));
    }

    /// The daemon that would run `havirt protect` for a domain on `h` can
    /// take its lease now.
    fn can_protect_on(&self, h: HostId) -> bool {
        let x = &self.hosts[&h];
        x.running() && x.node.is_some() && x.storage_fault.is_none() && self.storage.stall_until <= self.now
    }

    /// `havirt unprotect`: the domain keeps running and keeps its lease.
    pub fn unprotect(&mut self, d: DomainId) {
        if !self.spec.domains.contains_key(&d) {
            return;
        }
        let mut spec: ClusterSpec = (*self.spec).clone();
        spec.domains.remove(&d);
        self.spec = Arc::new(spec);
        self.protected_at.remove(&d);
        self.checker.intents.forget(d);
        self.registry_changed(None);
    }

    /// Every daemon reads the new registry within `registry_lag_ms`; the
    /// one that protected a domain (it runs there) at once, and adopts it
    /// right after, in the same turn of its loop.
    fn registry_changed(&mut self, adopt: Option<(HostId, DomainId)>) {
        self.registry_version += 1;
        let ids: Vec<HostId> = self.hosts.values().filter(|x| x.node.is_some()).map(|x| x.id).collect();
        for h in ids {
            let protecting = adopt.filter(|(at, _)| *at == h).map(|(_, d)| d);
            let lag = self.params.registry_lag_ms;
            let delay = if protecting.is_some() || lag == 0 { 0 } else { self.rng.range(0, lag) };
            self.schedule(delay, Ev::Registry { host: h, adopt: protecting });
        }
    }

    /// A daemon reads the registry as it is now (a later read never shows
    /// an older one) and hands it to its engine.
    pub fn registry_read(&mut self, h: HostId, adopt: Option<DomainId>) {
        if self.hosts.get(&h).is_none_or(|x| x.node.is_none()) {
            return;
        }
        self.registry_seen.insert(h, self.registry_version);
        let read_issued = self.local_now(h);
        self.deliver(h, Input::ProtectedDomains { domains: self.spec.domains.clone(), read_issued });
        if let Some(d) = adopt {
            self.deliver(h, Input::DomainsAtStart(vec![d]));
        }
    }

    fn clear_fault_later(&mut self, h: HostId) {
        self.checker.fault_clear_at.insert(h, self.now + FAULT_TAIL_MS);
    }

    /// Power loss is recovered by fencing if the host has a working agent,
    /// else by host_dead_timeout (watchdog) or the operator.
    fn power_loss_class(&self, h: HostId) -> &'static str {
        let agents = self.spec.host(h).map(|s| s.fence_agents.clone()).unwrap_or_default();
        if agents.iter().any(|a| !self.fence_agents.contains_key(&(h, a.clone()))) {
            "fenced_power_loss"
        } else {
            "watchdog_power_loss"
        }
    }
}

/// Commands that start a fault (as opposed to healing one).
fn is_fault(c: &Command) -> bool {
    !matches!(
        c,
        Command::PowerOn(_)
            | Command::HealNetwork
            | Command::Unisolate(_)
            | Command::StorageRestore(_)
            | Command::Resume(_)
            | Command::DaemonStart(_)
            | Command::Hypervisor { hung: false, .. }
            | Command::FenceAgent { mode: AgentMode::Works, .. }
            | Command::DomainBroken { broken: false, .. }
            | Command::OperatorFenceConfirm(_)
            | Command::Protect { .. }
            | Command::Unprotect(_)
            | Command::Maintenance { .. }
            | Command::EndMaintenance(_)
            | Command::GuestRecover(_)
            | Command::GuestStop { .. }
            | Command::OperatorStart { .. }
    )
}

fn describe(c: &Command, w: &World) -> String {
    let names = |hs: &[HostId]| hs.iter().map(|h| h.to_string()).collect::<Vec<_>>().join(",");
    match c {
        Command::PowerOff(h) => format!("power off {h}"),
        Command::PowerOn(h) => format!("power on {h}"),
        Command::Partition(g) => format!("partition {}", g.iter().map(|x| names(x)).collect::<Vec<_>>().join(" | ")),
        Command::DropOneWay { from, to } => format!("drop {from} -> {to}"),
        Command::HealNetwork => "heal network".into(),
        Command::Isolate(h) => format!("isolate {h}"),
        Command::Unisolate(h) => format!("unisolate {h}"),
        Command::NetLoss(p) => format!("packet loss {p}%"),
        Command::StorageFault { host, fault } => {
            let what = match fault {
                StorageFault::Fail => "fails",
                StorageFault::Hang => "hangs",
                StorageFault::ReadOnly => "turns read-only",
            };
            format!("storage {what} on {host}")
        }
        Command::StorageRestore(h) => format!("storage restored on {h}"),
        Command::StorageStall { millis } => format!("storage stalls for {millis} ms"),
        Command::Pause(h) => format!("pause {h}"),
        Command::Resume(h) => format!("resume {h}"),
        Command::Hypervisor { host, hung, qemu_stuck } => match (hung, qemu_stuck) {
            (false, _) => format!("libvirtd answers again on {host}"),
            (true, false) => format!("libvirtd hangs on {host}"),
            (true, true) => format!("libvirtd hangs on {host} and its qemu cannot be killed"),
        },
        Command::DaemonCrash(h) => format!("daemon crash on {h}"),
        Command::DaemonStop { host, host_reset: true } => format!("daemon stop on {host}"),
        Command::DaemonStop { host, host_reset: false } => {
            format!("daemon stop on {host} (systemd watchdog: nothing resets it)")
        }
        Command::DaemonStart(h) => format!("daemon start on {h}"),
        Command::FenceAgent { target, agent, mode } => format!("fence agent {agent} for {target}: {mode:?}"),
        Command::DomainCrash(d) => format!("domain {} crashes", w.domain_name(*d)),
        Command::DomainBroken { domain, broken } => {
            format!("domain {} {}", w.domain_name(*domain), if *broken { "broken" } else { "fixed" })
        }
        Command::OperatorFenceConfirm(h) => format!("operator confirms {h} is off"),
        Command::Protect { domain, host: Some(h) } => format!("protect {} on {h}", w.domain_name(*domain)),
        Command::Protect { domain, host: None } => format!("protect {}", w.domain_name(*domain)),
        Command::Unprotect(d) => format!("unprotect {}", w.domain_name(*d)),
        Command::Maintenance { host, enter: true } => format!("maintenance enter {host}"),
        Command::Maintenance { host, enter: false } => format!("maintenance exit {host}"),
        Command::EndMaintenance(host) => format!("maintenance exit {host} (until it is done)"),
        Command::GuestHang { domain, always: false } => format!("guest of {} hangs", w.domain_name(*domain)),
        Command::GuestHang { domain, always: true } => {
            format!("guest of {} hangs, and at every boot", w.domain_name(*domain))
        }
        Command::GuestRecover(d) => format!("guest of {} boots normally again", w.domain_name(*d)),
        Command::GuestStop { domain, destroy: false } => {
            format!("guest of {} shuts itself down", w.domain_name(*domain))
        }
        Command::GuestStop { domain, destroy: true } => format!("operator destroys {}", w.domain_name(*domain)),
        Command::OperatorStart { domain, host } => format!("operator starts {} on {host}", w.domain_name(*domain)),
    }
}
