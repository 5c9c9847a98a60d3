//! Applying faults and operator commands to the simulated world.

use super::faults::{AgentMode, Command, StorageFault};
use super::world::{Ev, World};
use crate::engine::config::HostId;
use crate::engine::io::{Input, OperatorCommand};

/// After a fault is cleared, losses on that host are still blamed on it for
/// this long (a self-fence or zombie kill completes within it).
pub const FAULT_TAIL_MS: u64 = 15_000;

impl World {
    pub fn apply_command(&mut self, c: Command) {
        let text = describe(&c, self);
        self.log_sim(&text);
        if is_fault(&c) {
            self.checker.fault_times.push(self.now);
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
                if let Some(x) = self.hosts.get_mut(&host) {
                    x.libvirt_hung = hung;
                    x.qemu_stuck = qemu_stuck;
                }
            }
            Command::DaemonCrash(h) => self.crash_daemon(h),
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
                    self.checker.domain_lost(d, self.now, "domain_crash", true);
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
        Command::DaemonStart(h) => format!("daemon start on {h}"),
        Command::FenceAgent { target, agent, mode } => format!("fence agent {agent} for {target}: {mode:?}"),
        Command::DomainCrash(d) => format!("domain {} crashes", w.spec.domain_name(*d)),
        Command::DomainBroken { domain, broken } => {
            format!("domain {} {}", w.spec.domain_name(*domain), if *broken { "broken" } else { "fixed" })
        }
        Command::OperatorFenceConfirm(h) => format!("operator confirms {h} is off"),
    }
}
