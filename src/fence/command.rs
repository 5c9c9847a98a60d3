//! `kind = "command"`: a fence-agents program (`fence_ipmilan`,
//! `fence_redfish`, ...) driven by the fence-agents stdin protocol.
//!
//! The program is run with no arguments; its stdin gets one `key=value` line
//! per configured option (in key order), then `action=...`, then
//! `password=...` when a password file is configured. This is the protocol
//! Pacemaker's fencer uses, and it keeps the password out of argv (readable
//! in /proc by any user) and out of the environment. A fence is two runs:
//! `action=off`, then `action=status` until it says OFF.
//!
//! Exit codes are fence-agents': `off` 0 = done, anything else failed;
//! `status` 0 = ON, 2 = OFF, anything else = could not tell.
//! For `fence_ipmilan`, options `lanplus = "1"`, `cipher = "3"` and
//! `power_wait = "0"` are the fast settings (LAB-NOTES); `off` waits for the
//! agent's own power_timeout, so the fence deadline should exceed it.

use super::process::{AgentEnv, Deadline, Output, Run};
use super::secret::{self, Secret};
use super::{FenceAgent, FenceError, FenceOutcome, PowerState, off_then_confirm};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

/// fence-agents' exit code for `status`: the target is on.
pub const EXIT_STATUS_ON: i32 = 0;
/// fence-agents' exit code for `status`: the target is off.
pub const EXIT_STATUS_OFF: i32 = 2;

#[derive(Clone, Debug)]
pub struct CommandAgent {
    name: String,
    /// A bare program name (searched in PATH) or an absolute path.
    program: String,
    options: BTreeMap<String, String>,
    password_file: Option<PathBuf>,
    env: AgentEnv,
}

impl CommandAgent {
    pub fn new(
        name: String,
        program: String,
        options: BTreeMap<String, String>,
        password_file: Option<PathBuf>,
        env: AgentEnv,
    ) -> Self {
        CommandAgent { name, program, options, password_file, env }
    }

    /// The stdin of one run. The password goes last, so that an agent that
    /// echoes its input line by line has shown everything else first.
    fn stdin(&self, action: &str, password: Option<&Secret>) -> Vec<u8> {
        let mut text = String::new();
        for (key, value) in &self.options {
            text.push_str(&format!("{key}={value}\n"));
        }
        text.push_str(&format!("action={action}\n"));
        let mut bytes = text.into_bytes();
        if let Some(pw) = password {
            bytes.extend_from_slice(b"password=");
            bytes.extend_from_slice(pw.expose().as_bytes());
            bytes.push(b'\n');
        }
        bytes
    }

    fn run(&self, action: &str, password: Option<&Secret>, deadline: &Deadline) -> Result<Output, FenceError> {
        let step = format!("{} action={action}", self.program);
        Run {
            agent: &self.name,
            step: &step,
            program: &self.program,
            args: Vec::new(),
            stdin: Some(self.stdin(action, password)),
            secret: password,
        }
        .execute(&self.env, deadline)
    }

    fn status(&self, password: Option<&Secret>, deadline: &Deadline) -> Result<PowerState, FenceError> {
        let out = self.run("status", password, deadline)?;
        match out.status.code() {
            Some(EXIT_STATUS_OFF) => Ok(PowerState::Off),
            Some(EXIT_STATUS_ON) => Ok(PowerState::NotOff("on".into())),
            _ => Err(out.failed(&self.name, &format!("{} action=status", self.program))),
        }
    }

    fn password(&self) -> Result<Option<Secret>, FenceError> {
        self.password_file.as_deref().map(|p| secret::read_password(&self.name, p)).transpose()
    }
}

impl FenceAgent for CommandAgent {
    fn name(&self) -> &str {
        &self.name
    }

    fn off(&self, deadline: Duration) -> Result<FenceOutcome, FenceError> {
        let password = self.password()?;
        let pw = password.as_ref();
        off_then_confirm(
            &self.name,
            deadline,
            |d| {
                let out = self.run("off", pw, d)?;
                if out.status.success() {
                    Ok(())
                } else {
                    Err(out.failed(&self.name, &format!("{} action=off", self.program)))
                }
            },
            |d| self.status(pw, d),
        )
    }

    fn preflight(&self) -> Result<(), FenceError> {
        self.password()?;
        self.env.find_program(&self.program).map(|_| ()).map_err(|reason| FenceError::Spawn {
            agent: self.name.clone(),
            program: self.program.clone(),
            reason,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stdin_is_options_then_action_then_password() {
        let options = BTreeMap::from([("ip".to_owned(), "10.0.9.11".to_owned()), ("cipher".into(), "3".into())]);
        let agent = CommandAgent::new("f".into(), "fence_ipmilan".into(), options, None, AgentEnv::default());
        let pw = Secret::for_test("pw");
        let text = String::from_utf8(agent.stdin("off", Some(&pw))).unwrap_or_default();
        assert_eq!(text, "cipher=3\nip=10.0.9.11\naction=off\npassword=pw\n");
        let text = String::from_utf8(agent.stdin("status", None)).unwrap_or_default();
        assert_eq!(text, "cipher=3\nip=10.0.9.11\naction=status\n");
    }
}
