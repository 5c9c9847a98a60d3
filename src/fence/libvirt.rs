//! `kind = "libvirt"`: the target host is itself a libvirt domain (nested
//! labs). Power-off is `virsh -c URI destroy NAME`; it is confirmed when
//! `virsh -c URI domstate NAME` says "shut off" (any other state, including
//! "crashed" whose qemu may still hold the disks, is not off).
//!
//! This goes through the `virsh` CLI, not the `virt` crate, on purpose: the
//! fence path stays independent of the hypervisor module (its connection,
//! event loop and any hang in it), talks to a *different* libvirtd (the one
//! under the target), and gets the same deadline-and-kill as every other
//! agent. A destroy of a domain that is already off fails; the status run
//! after it still confirms it (see `off_then_confirm`).

use super::process::{AgentEnv, Deadline, Output, Run};
use super::{FenceAgent, FenceError, FenceOutcome, PowerState, off_then_confirm};
use std::ffi::OsString;
use std::time::Duration;

/// The program, found in the agent PATH.
pub const VIRSH: &str = "virsh";
/// What `virsh domstate` prints for a domain that is powered off.
pub const STATE_SHUT_OFF: &str = "shut off";

#[derive(Clone, Debug)]
pub struct LibvirtAgent {
    name: String,
    uri: String,
    domain: String,
    env: AgentEnv,
}

impl LibvirtAgent {
    pub fn new(name: String, uri: String, domain: String, env: AgentEnv) -> Self {
        LibvirtAgent { name, uri, domain, env }
    }

    fn run(&self, command: &str, deadline: &Deadline) -> Result<Output, FenceError> {
        let step = format!("{VIRSH} -c {} {command} {}", self.uri, self.domain);
        let args = ["-c", &self.uri, command, &self.domain].map(OsString::from).into();
        Run { agent: &self.name, step: &step, program: VIRSH, args, stdin: None, secret: None }
            .execute(&self.env, deadline)
    }

    fn domstate(&self, deadline: &Deadline) -> Result<PowerState, FenceError> {
        let out = self.run("domstate", deadline)?;
        if !out.status.success() {
            return Err(out.failed(&self.name, "domstate"));
        }
        match out.stdout.lines().map(str::trim).find(|l| !l.is_empty()) {
            Some(STATE_SHUT_OFF) => Ok(PowerState::Off),
            Some(state) => Ok(PowerState::NotOff(state.to_owned())),
            None => Err(FenceError::UnknownStatus {
                agent: self.name.clone(),
                step: "domstate".into(),
                output: out.quote(),
            }),
        }
    }
}

impl FenceAgent for LibvirtAgent {
    fn name(&self) -> &str {
        &self.name
    }

    fn off(&self, deadline: Duration) -> Result<FenceOutcome, FenceError> {
        off_then_confirm(
            &self.name,
            deadline,
            |d| {
                let out = self.run("destroy", d)?;
                if out.status.success() { Ok(()) } else { Err(out.failed(&self.name, "destroy")) }
            },
            |d| self.domstate(d),
        )
    }

    fn preflight(&self) -> Result<(), FenceError> {
        self.env.find_program(VIRSH).map(|_| ()).map_err(|reason| FenceError::Spawn {
            agent: self.name.clone(),
            program: VIRSH.into(),
            reason,
        })
    }
}
