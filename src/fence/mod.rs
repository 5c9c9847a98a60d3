//! Fence agents and the watchdog: the adapters behind `Action::Fence` and
//! `Action::PetWatchdog` (DESIGN.md §1 S3(a), S4).
//!
//! A [`FenceAgent`] powers one host off and then *confirms* with a status
//! query that it is off; only a confirmed OFF is [`FenceOutcome::Confirmed`],
//! the only fence result that may let a lease move (S3(a)). Every other end
//! (the agent failed, hung, answered "on", or is not a power agent at all) is
//! an `Err` whose message says why; the daemon logs it and reports
//! `FenceOutcome::Failed` ([`outcome`]). The agents in this module never
//! return `Ok(FenceOutcome::Failed)`: a failure without a reason helps nobody
//! at 3 a.m.
//!
//! Agents block (they run real programs and wait for them), so the daemon
//! calls them off its main loop (`spawn_blocking`); each call is bounded by
//! the `deadline` it is given, after which its programs are killed.
//!
//! The engine walks a host's fence chain itself (`Action::Fence` names the
//! entry); [`Fencers`] finds the agent by target host and entry name.
//!
//! Credentials (§8): config and agents hold password *files*, never
//! passwords. A password is read at each call, goes to a fence-agents
//! program on its stdin only (never argv, never the environment), and is
//! masked out of every output an error message quotes. Password files that
//! group or others can read are refused.
//!
//! Layout: [`command`] (fence-agents programs), [`ipmi`] (ipmitool),
//! [`libvirt`] (virsh, for nested labs), [`StorageAgent`] (here), the shared
//! process runner in `process` (alert commands use it too), password files in `secret`, and the
//! [`watchdog`].

pub mod command;
pub mod ipmi;
pub mod libvirt;
pub(crate) mod process;
mod secret;
pub mod watchdog;

pub use crate::engine::io::FenceOutcome;
pub use command::CommandAgent;
pub use ipmi::IpmiAgent;
pub use libvirt::LibvirtAgent;
pub use process::AgentEnv;
pub use secret::PASSWORD_FILE_MAX_BYTES;

use crate::config::{Config, FenceConfig, FenceMethod, HostConfig};
use crate::engine::config::HostId;
use process::Deadline;
use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// How long after a power-off that was accepted the status is polled for
/// OFF. LAB-NOTES: `ipmitool chassis power status` may say "on" for up to
/// ~1 s after `off`; five times that is margin, and a host that still says
/// "on" after it is not going off by itself. Always bounded by the deadline.
pub const OFF_CONFIRM_WINDOW_MS: u64 = 5_000;
/// Pause between two status polls.
pub const STATUS_POLL_INTERVAL_MS: u64 = 250;
/// Status polls per fence call at most (the window allows 21 at the
/// default interval; this bounds a tiny interval too).
pub const STATUS_POLLS_MAX: u32 = 64;

/// Why a host was not confirmed off. Messages never hold a password.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum FenceError {
    #[error(
        "{agent}: password file {path}: {reason}; put the password on the first line of a root-only file (`install -m 600 /dev/null {path}`, then write it), present on every host that may fence this one"
    )]
    PasswordFile { agent: String, path: PathBuf, reason: String },
    #[error(
        "{agent}: password file {path} has mode {mode:04o}: group or others can read the fence password; run `chmod 600 {path}`"
    )]
    PasswordFileMode { agent: String, path: PathBuf, mode: u32 },
    #[error(
        "{agent}: cannot run `{program}`: {reason}; install it (ipmitool, fence-agents, libvirt-clients) or name it by its absolute path"
    )]
    Spawn { agent: String, program: String, reason: String },
    #[error(
        "{agent}: `{step}` did not finish within the fence deadline ({deadline_ms} ms for the whole call) and was killed; check that the BMC or hypervisor answers, or raise fence_timeout_ms"
    )]
    Timeout { agent: String, step: String, deadline_ms: u64 },
    #[error("{agent}: `{step}` failed ({status}): {output}")]
    StepFailed { agent: String, step: String, status: String, output: String },
    #[error("{agent}: `{step}` answered something that is neither on nor off: {output}")]
    UnknownStatus { agent: String, step: String, output: String },
    #[error("{agent}: cannot talk to `{step}`: {reason}")]
    Io { agent: String, step: String, reason: String },
    #[error(
        "{agent}: the host is NOT confirmed off: last status: {last} ({polls} status poll(s) within {window_ms} ms after the power-off)"
    )]
    NotConfirmedOff { agent: String, polls: u32, window_ms: u64, last: String },
    #[error(
        "{agent}: kind \"storage\" is no power agent: the daemon writes the poison record itself, and poison is confirmed only by host_dead_timeout (S3(b)), never by a fence call"
    )]
    NotPowerAgent { agent: String },
    #[error(
        "host {host} has no fence entry named \"{agent}\" (its entries: {known}); the daemon and the configuration disagree"
    )]
    UnknownAgent { host: String, agent: String, known: String },
    #[error("host {host} is not in the configuration; no fence chain for it")]
    UnknownHost { host: HostId },
}

/// One way to power off one host.
///
/// `off` powers the target off, then confirms with a status query that it
/// IS off. `Ok(Confirmed)` means exactly that (S3(a)); anything else is an
/// `Err` with the reason. It blocks for at most `deadline` (plus the time to
/// kill and reap a program that overran it, a few ms).
pub trait FenceAgent: Send + Sync + fmt::Debug {
    /// The fence entry's name (`Action::Fence::agent`).
    fn name(&self) -> &str;

    fn off(&self, deadline: Duration) -> Result<FenceOutcome, FenceError>;

    /// What can be checked without touching the target: the password file
    /// is safe and readable, the program exists. For `havirt check` and the
    /// daemon's start; a fence call checks again.
    fn preflight(&self) -> Result<(), FenceError> {
        Ok(())
    }
}

/// The fence result the engine gets for an agent's answer.
pub fn outcome(result: &Result<FenceOutcome, FenceError>) -> FenceOutcome {
    match result {
        Ok(o) => *o,
        // The storage agent: the daemon wrote the poison record before
        // asking, so the engine learns that a request is out (not a
        // confirmation: only S3(b) confirms poison).
        Err(FenceError::NotPowerAgent { .. }) => FenceOutcome::Requested,
        Err(_) => FenceOutcome::Failed,
    }
}

/// Build the agent for one `[[host.fence]]` entry.
pub fn build_agent(entry: &FenceConfig, env: &AgentEnv) -> Arc<dyn FenceAgent> {
    let name = entry.name.clone();
    match &entry.method {
        FenceMethod::Ipmi { address, username, password_file, cipher } => Arc::new(IpmiAgent::new(
            name,
            address.clone(),
            username.clone(),
            password_file.clone(),
            *cipher,
            env.clone(),
        )),
        FenceMethod::Command { agent, options, password_file } => {
            Arc::new(CommandAgent::new(name, agent.clone(), options.clone(), password_file.clone(), env.clone()))
        }
        FenceMethod::Libvirt { uri, domain } => {
            Arc::new(LibvirtAgent::new(name, uri.clone(), domain.clone(), env.clone()))
        }
        FenceMethod::Storage => Arc::new(StorageAgent { name }),
    }
}

/// One host's fence chain, in configuration order (the engine's order).
#[derive(Clone, Debug)]
pub struct FenceChain {
    host: String,
    agents: Vec<Arc<dyn FenceAgent>>,
}

impl FenceChain {
    pub fn from_host(host: &HostConfig, env: &AgentEnv) -> Self {
        FenceChain { host: host.name.clone(), agents: host.fence.iter().map(|f| build_agent(f, env)).collect() }
    }

    /// The target host's name.
    pub fn host(&self) -> &str {
        &self.host
    }

    pub fn names(&self) -> Vec<&str> {
        self.agents.iter().map(|a| a.name()).collect()
    }

    /// The entry `name`, to run on a blocking thread.
    pub fn agent(&self, name: &str) -> Result<Arc<dyn FenceAgent>, FenceError> {
        self.agents.iter().find(|a| a.name() == name).cloned().ok_or_else(|| FenceError::UnknownAgent {
            host: self.host.clone(),
            agent: name.to_owned(),
            known: self.names().join(", "),
        })
    }

    /// Run the entry `name` (blocking).
    pub fn off(&self, name: &str, deadline: Duration) -> Result<FenceOutcome, FenceError> {
        self.agent(name)?.off(deadline)
    }

    /// [`FenceAgent::preflight`] of every entry, in chain order.
    pub fn preflight(&self) -> Vec<(String, Result<(), FenceError>)> {
        self.agents.iter().map(|a| (a.name().to_owned(), a.preflight())).collect()
    }
}

/// The fence chains of every host of the cluster, by host id: what the
/// daemon needs to execute `Action::Fence { target, agent, .. }`.
#[derive(Clone, Debug)]
pub struct Fencers {
    chains: BTreeMap<HostId, FenceChain>,
}

impl Fencers {
    pub fn from_config(config: &Config, env: &AgentEnv) -> Self {
        Fencers { chains: config.hosts.iter().map(|h| (h.id, FenceChain::from_host(h, env))).collect() }
    }

    pub fn chain(&self, target: HostId) -> Option<&FenceChain> {
        self.chains.get(&target)
    }

    /// The agent of `Action::Fence { target, agent, .. }`.
    pub fn agent(&self, target: HostId, name: &str) -> Result<Arc<dyn FenceAgent>, FenceError> {
        self.chains.get(&target).ok_or(FenceError::UnknownHost { host: target })?.agent(name)
    }
}

/// `kind = "storage"`: the poison pill. It is not a power agent: the daemon
/// writes the poison record on shared storage itself (the target obeys it
/// by self-fencing, S4), and the poison counts only once the target's slot
/// has been still for host_dead_timeout (S3(b)), which the engine measures.
/// A fence call therefore fails at once, with that reason, and the engine
/// goes on down the chain.
#[derive(Clone, Debug)]
pub struct StorageAgent {
    pub name: String,
}

impl FenceAgent for StorageAgent {
    fn name(&self) -> &str {
        &self.name
    }

    fn off(&self, _deadline: Duration) -> Result<FenceOutcome, FenceError> {
        Err(FenceError::NotPowerAgent { agent: self.name.clone() })
    }
}

/// What a status query said.
#[derive(Clone, Debug, PartialEq, Eq)]
enum PowerState {
    Off,
    /// Anything but off, as the tool said it ("on", "running", "paused").
    NotOff(String),
}

/// After a power-off: poll `status` until it says OFF, for at most
/// `window` (and never past the deadline). `window` zero polls once (the
/// power-off failed: the host may have been off already). A status run that
/// overran the deadline ends the wait (as a timeout if it was the first);
/// other failures are remembered and polled again, since a BMC may be busy
/// right after `off`.
fn confirm_off(
    agent: &str,
    deadline: &Deadline,
    window: Duration,
    mut status: impl FnMut(&Deadline) -> Result<PowerState, FenceError>,
) -> Result<FenceOutcome, FenceError> {
    let window_end = deadline.earlier(window);
    let interval = Duration::from_millis(STATUS_POLL_INTERVAL_MS);
    let mut last = String::from("no status answer");
    let mut polls = 0;
    while polls < STATUS_POLLS_MAX {
        polls += 1;
        match status(deadline) {
            Ok(PowerState::Off) => return Ok(FenceOutcome::Confirmed),
            Ok(PowerState::NotOff(state)) => last = format!("the host is {state}"),
            // The first status run hanging says the tool does not answer;
            // a later one cut by the deadline ends the wait with what was seen.
            Err(e @ FenceError::Timeout { .. }) if polls == 1 => return Err(e),
            Err(FenceError::Timeout { .. }) => {
                last.push_str("; the next status run overran the deadline and was killed");
                break;
            }
            Err(e) => last = e.to_string(),
        }
        if !window_end.has_at_least(interval) {
            break;
        }
        std::thread::sleep(interval);
    }
    let window_ms = u64::try_from(window.as_millis()).unwrap_or(u64::MAX);
    Err(FenceError::NotConfirmedOff { agent: agent.to_owned(), polls, window_ms, last })
}

/// The shape every power agent shares: run the power-off; if it worked, poll
/// status for [`OFF_CONFIRM_WINDOW_MS`]; if it failed, look once (a host
/// already off, e.g. a lab VM that died, cannot be powered off again but is
/// confirmed off all the same) and otherwise report the power-off's failure.
fn off_then_confirm(
    agent: &str,
    deadline: Duration,
    off: impl FnOnce(&Deadline) -> Result<(), FenceError>,
    status: impl FnMut(&Deadline) -> Result<PowerState, FenceError>,
) -> Result<FenceOutcome, FenceError> {
    let deadline = Deadline::after(deadline);
    match off(&deadline) {
        Ok(()) => confirm_off(agent, &deadline, Duration::from_millis(OFF_CONFIRM_WINDOW_MS), status),
        Err(e @ FenceError::Timeout { .. }) => Err(e),
        Err(off_error) => match confirm_off(agent, &deadline, Duration::ZERO, status) {
            Ok(confirmed) => Ok(confirmed),
            Err(FenceError::Timeout { .. } | FenceError::NotConfirmedOff { .. }) => Err(off_error),
            Err(other) => Err(other),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;

    #[test]
    fn storage_agent_is_a_request_never_a_confirmation() {
        let a = StorageAgent { name: "poison".into() };
        let r = a.off(Duration::from_secs(5));
        assert_eq!(outcome(&r), FenceOutcome::Requested);
        let msg = r.expect_err("storage never confirms").to_string();
        assert!(msg.contains("poison is confirmed only by host_dead_timeout"), "{msg}");
    }

    #[test]
    fn confirm_polls_until_off() {
        let calls = Cell::new(0);
        let r = confirm_off("x", &Deadline::after(Duration::from_secs(5)), Duration::from_secs(5), |_| {
            calls.set(calls.get() + 1);
            Ok(if calls.get() < 3 { PowerState::NotOff("on".into()) } else { PowerState::Off })
        });
        assert_eq!(r, Ok(FenceOutcome::Confirmed));
        assert_eq!(calls.get(), 3);
    }

    #[test]
    fn confirm_with_zero_window_polls_once() {
        let calls = Cell::new(0);
        let r = confirm_off("x", &Deadline::after(Duration::from_secs(5)), Duration::ZERO, |_| {
            calls.set(calls.get() + 1);
            Ok(PowerState::NotOff("on".into()))
        });
        assert_eq!(calls.get(), 1);
        assert!(matches!(r, Err(FenceError::NotConfirmedOff { polls: 1, .. })), "{r:?}");
    }

    #[test]
    fn a_status_run_cut_by_the_deadline_keeps_what_was_seen() {
        let timeout = || FenceError::Timeout { agent: "x".into(), step: "status".into(), deadline_ms: 5 };
        let calls = Cell::new(0);
        let r = confirm_off("x", &Deadline::after(Duration::from_secs(5)), Duration::from_secs(5), |_| {
            calls.set(calls.get() + 1);
            if calls.get() < 3 { Ok(PowerState::NotOff("on".into())) } else { Err(timeout()) }
        });
        let Err(FenceError::NotConfirmedOff { polls: 3, last, .. }) = r else { panic!("{r:?}") };
        assert!(last.starts_with("the host is on;") && last.contains("overran the deadline"), "{last}");
        let r = confirm_off("x", &Deadline::after(Duration::from_secs(5)), Duration::from_secs(5), |_| Err(timeout()));
        assert_eq!(r, Err(timeout()));
    }

    #[test]
    fn failed_off_is_reported_unless_status_says_off() {
        let off_failed = |_: &Deadline| {
            Err(FenceError::StepFailed {
                agent: "x".into(),
                step: "off".into(),
                status: "exit 1".into(),
                output: "".into(),
            })
        };
        let on = |_: &Deadline| Ok(PowerState::NotOff("on".into()));
        let r = off_then_confirm("x", Duration::from_secs(5), off_failed, on);
        assert!(matches!(r, Err(FenceError::StepFailed { .. })), "{r:?}");
        let r = off_then_confirm("x", Duration::from_secs(5), off_failed, |_| Ok(PowerState::Off));
        assert_eq!(r, Ok(FenceOutcome::Confirmed));
    }
}
