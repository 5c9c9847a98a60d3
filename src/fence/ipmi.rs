//! `kind = "ipmi"`: power off through the BMC with ipmitool over RMCP+:
//!
//! ```text
//! ipmitool -I lanplus -C <cipher> -H <address> -U <username> -f <password_file> chassis power off
//! ipmitool ... chassis power status        # polled until "Chassis Power is off"
//! ```
//!
//! ipmitool reads the password file itself (`-f`), so the password is never
//! in argv; havirt still reads it first, to refuse a file others can read and
//! to mask the password out of any output it quotes. The status is polled
//! because a BMC may say "on" for up to ~1 s after `off` (LAB-NOTES). Cipher
//! suite 3 is the default; without a working one every call first waits
//! ~10 s for a timeout.

use super::process::{AgentEnv, Deadline, Output, Run};
use super::secret::{self, Secret};
use super::{FenceAgent, FenceError, FenceOutcome, PowerState, off_then_confirm};
use std::ffi::OsString;
use std::path::PathBuf;
use std::time::Duration;

/// The program, found in the agent PATH.
pub const IPMITOOL: &str = "ipmitool";

#[derive(Clone, Debug)]
pub struct IpmiAgent {
    name: String,
    address: String,
    username: String,
    password_file: PathBuf,
    cipher: u8,
    env: AgentEnv,
}

impl IpmiAgent {
    pub fn new(
        name: String,
        address: String,
        username: String,
        password_file: PathBuf,
        cipher: u8,
        env: AgentEnv,
    ) -> Self {
        IpmiAgent { name, address, username, password_file, cipher, env }
    }

    fn args(&self, command: &str) -> Vec<OsString> {
        let mut args: Vec<OsString> = ["-I", "lanplus", "-C"].map(OsString::from).into();
        args.push(self.cipher.to_string().into());
        args.extend(["-H", &self.address, "-U", &self.username, "-f"].map(OsString::from));
        args.push(self.password_file.clone().into_os_string());
        args.extend(command.split(' ').map(OsString::from));
        args
    }

    fn run(&self, command: &str, secret: &Secret, deadline: &Deadline) -> Result<Output, FenceError> {
        let step = format!("{IPMITOOL} -H {} {command}", self.address);
        Run {
            agent: &self.name,
            step: &step,
            program: IPMITOOL,
            args: self.args(command),
            stdin: None,
            secret: Some(secret),
        }
        .execute(&self.env, deadline)
    }

    fn status(&self, secret: &Secret, deadline: &Deadline) -> Result<PowerState, FenceError> {
        const COMMAND: &str = "chassis power status";
        let out = self.run(COMMAND, secret, deadline)?;
        if !out.status.success() {
            return Err(out.failed(&self.name, COMMAND));
        }
        parse_status(&out.stdout).ok_or_else(|| FenceError::UnknownStatus {
            agent: self.name.clone(),
            step: COMMAND.into(),
            output: out.quote(),
        })
    }
}

/// `Chassis Power is off` / `Chassis Power is on`.
fn parse_status(stdout: &str) -> Option<PowerState> {
    let line = stdout.lines().map(str::trim).find(|l| l.to_ascii_lowercase().starts_with("chassis power is"))?;
    match line.rsplit(' ').next()?.to_ascii_lowercase().as_str() {
        "off" => Some(PowerState::Off),
        "on" => Some(PowerState::NotOff("on".into())),
        _ => None,
    }
}

impl FenceAgent for IpmiAgent {
    fn name(&self) -> &str {
        &self.name
    }

    fn off(&self, deadline: Duration) -> Result<FenceOutcome, FenceError> {
        let secret = secret::read_password(&self.name, &self.password_file)?;
        off_then_confirm(
            &self.name,
            deadline,
            |d| {
                const COMMAND: &str = "chassis power off";
                let out = self.run(COMMAND, &secret, d)?;
                if out.status.success() { Ok(()) } else { Err(out.failed(&self.name, COMMAND)) }
            },
            |d| self.status(&secret, d),
        )
    }

    fn preflight(&self) -> Result<(), FenceError> {
        secret::read_password(&self.name, &self.password_file)?;
        self.env.find_program(IPMITOOL).map(|_| ()).map_err(|reason| FenceError::Spawn {
            agent: self.name.clone(),
            program: IPMITOOL.into(),
            reason,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_ipmitool_status() {
        assert_eq!(parse_status("Chassis Power is off\n"), Some(PowerState::Off));
        assert_eq!(parse_status("Chassis Power is on\n"), Some(PowerState::NotOff("on".into())));
        assert_eq!(parse_status("Unable to get Chassis Power Status\n"), None);
        assert_eq!(parse_status(""), None);
    }

    #[test]
    fn argv_names_the_file_not_the_password() {
        let agent = IpmiAgent::new(
            "ipmi".into(),
            "10.98.0.1".into(),
            "admin".into(),
            "/etc/havirt/fence/h1.pw".into(),
            3,
            AgentEnv::default(),
        );
        let args: Vec<String> = agent.args("chassis power off").iter().map(|a| a.to_string_lossy().into()).collect();
        assert_eq!(
            args.join(" "),
            "-I lanplus -C 3 -H 10.98.0.1 -U admin -f /etc/havirt/fence/h1.pw chassis power off"
        );
    }
}
