//! The lab's BMCs (issue 4): one `ipmi_sim` per host, a software BMC that
//! speaks IPMI over LAN (RMCP+), so that the real `fence_ipmilan` and
//! `ipmitool` fence lab hosts exactly as they fence servers (LAB-NOTES.md,
//! "Simulated BMCs").
//!
//! The BMC's chassis power is the host's start command (`startcmd`): power
//! on runs it, power off sends it SIGTERM (then SIGKILL after `kill_wait`).
//! `startnow false`: the lab decides when a host is first powered on,
//! through the BMC ([`Bmc::power_on`]) or directly.
//!
//! ```text
//! DIR/lan.conf        the BMC (address, serial port, user, startcmd); 0600
//! DIR/bmc.emu         the emulated management controller
//! DIR/state/          ipmi_sim's state directory (-s)
//! DIR/ipmi_sim.log    its stdout and stderr
//! ```
//!
//! `ipmi_sim` runs in the BMC network namespace as a child of this process,
//! leading a process group of its own; the host it starts stays in that
//! group unless its start command leaves it. Pitfalls (LAB-NOTES): without
//! `serial ... codec VM` power on/off fail with "Invalid data field"; every
//! call uses cipher suite 3 (others wait ~10 s or accept any password);
//! `kill_wait 0` breaks power off; a duplicate UDP port does not fail (so
//! [`Bmc::start`] checks the port with `ss`); killing `ipmi_sim` leaves the
//! host it started running.

use std::fs;
use std::io::{self, Read};
use std::net::Ipv4Addr;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// The IPMI-over-LAN (RMCP) UDP port.
pub const IPMI_PORT: u16 = 623;
/// The only cipher suite the lab uses (LAB-NOTES): authenticated and fast.
pub const CIPHER_SUITE: u8 = 3;
/// The IPMI user id of the BMC's one user (1 is the anonymous user).
pub const USER_ID: u8 = 2;
/// IPMI 1.5 passwords hold at most 16 bytes (2.0: 20); the lab keeps to 16.
pub const PASSWORD_MAX_BYTES: usize = 16;
/// User names hold at most 16 bytes.
pub const USER_MAX_BYTES: usize = 16;
/// How long [`Bmc::start`] waits for the BMC to answer.
pub const START_TIMEOUT: Duration = Duration::from_secs(10);
/// Between readiness probes, and between status polls.
pub const POLL_INTERVAL: Duration = Duration::from_millis(100);
/// One readiness probe (the BMC answers in ~0.05 s once it listens).
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(1);
/// One operator `ipmitool` call; a frozen BMC would make ipmitool retry
/// for ~20 s.
pub const IPMITOOL_TIMEOUT: Duration = Duration::from_secs(5);
/// ipmitool's own retransmission interval and retries (`-N`, `-R`), so that
/// a lost datagram is resent well within [`IPMITOOL_TIMEOUT`].
pub const IPMITOOL_RETRY_INTERVAL_S: u32 = 1;
pub const IPMITOOL_RETRIES: u32 = 2;
/// How long a killed process is awaited before giving up on reaping it.
pub const REAP_TIMEOUT: Duration = Duration::from_secs(2);
/// The end of `ipmi_sim.log` quoted in an error.
pub const LOG_QUOTED_MAX_BYTES: usize = 400;

/// The BMC's emulated management controller (LAB-NOTES).
pub const BMC_EMU: &str = "mc_setbmc 0x20\n\
                           mc_add 0x20 0 no-device-sdrs 0x23 9 8 0x9f 0x1291 0xf02\n\
                           mc_enable 0x20\n";

#[derive(Debug, thiserror::Error)]
pub enum BmcError {
    #[error("BMC of host {host}: {what} is not valid for lan.conf: {why}")]
    InvalidSpec { host: u16, what: &'static str, why: String },
    #[error("BMC of host {host}: {path}: {source}")]
    Io { host: u16, path: PathBuf, source: io::Error },
    #[error("BMC of host {host}: cannot run `{program}`: {source} (install openipmi, ipmitool and iproute2)")]
    Spawn { host: u16, program: String, source: io::Error },
    #[error(
        "BMC of host {host}: {address}:{port} is already in use in netns {netns} ({listener}); \
         stop that BMC first (a duplicate UDP port does not fail)"
    )]
    AddressInUse { host: u16, address: Ipv4Addr, port: u16, netns: String, listener: String },
    #[error("BMC of host {host}: ipmi_sim exited ({status}) before answering: {log}")]
    Exited { host: u16, status: String, log: String },
    #[error("BMC of host {host}: no answer at {address} within {timeout_ms} ms: {last}")]
    NotAnswering { host: u16, address: Ipv4Addr, timeout_ms: u128, last: String },
    #[error("BMC of host {host}: `ipmitool ... {command}` did not finish within {timeout_ms} ms (BMC frozen or dead?)")]
    Timeout { host: u16, command: String, timeout_ms: u128 },
    #[error("BMC of host {host}: `ipmitool ... {command}` failed ({status}): {output}")]
    Failed { host: u16, command: String, status: String, output: String },
    #[error("BMC of host {host}: power did not turn {want} within {timeout_ms} ms")]
    PowerNotReached { host: u16, want: &'static str, timeout_ms: u128 },
    #[error("BMC of host {host}: signal {signal} to ipmi_sim (pid {pid}): {source}")]
    Signal { host: u16, signal: &'static str, pid: u32, source: io::Error },
}

/// One lab BMC.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BmcSpec {
    /// The lab host number N (1..=254): names the BMC, its GUID.
    pub host: u16,
    /// Where the BMC listens (UDP 623): 10.98.0.N in the lab.
    pub address: Ipv4Addr,
    /// The TCP port of the BMC's serial interface (`serial 15 ... codec VM`,
    /// required for power control), on `address`.
    pub serial_port: u16,
    /// The host's power: run in the foreground on power on, SIGTERM on
    /// power off. An absolute path with no spaces or quotes (lan.conf's
    /// `startcmd`; ipmi_sim adds the `exec` itself).
    pub power_command: PathBuf,
    /// The BMC's files (LAB_DIR/bmc/hN).
    pub dir: PathBuf,
    /// The network namespace that holds `address` ("hl-bmc").
    pub netns: String,
    /// The namespace [`Bmc`]'s own ipmitool calls come from: one that
    /// reaches `address` (the BMC namespace itself does, over lo). Never
    /// the root namespace (LAB-NOTES).
    pub client_netns: String,
    pub user: String,
    pub password: String,
}

impl BmcSpec {
    /// Host `host`'s BMC in the lab layout (src/lab/mod.rs): 10.98.0.N in
    /// netns hl-bmc, serial port 9002, files in LAB_DIR/bmc/hN, power
    /// LAB_DIR/hN/start, user admin.
    pub fn lab(lab_dir: &Path, host: u16, password: &str) -> BmcSpec {
        let [hi, lo] = host.to_be_bytes();
        BmcSpec {
            host,
            address: Ipv4Addr::new(10, 98, hi, lo),
            serial_port: 9002,
            power_command: lab_dir.join(format!("h{host}")).join("start"),
            dir: lab_dir.join("bmc").join(format!("h{host}")),
            netns: "hl-bmc".into(),
            client_netns: "hl-bmc".into(),
            user: "admin".into(),
            password: password.into(),
        }
    }

    pub fn state_dir(&self) -> PathBuf {
        self.dir.join("state")
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.join("ipmi_sim.log")
    }

    /// Refuse what lan.conf cannot quote or IPMI cannot hold.
    pub fn validate(&self) -> Result<(), BmcError> {
        let bad = |what, why: &str| Err(BmcError::InvalidSpec { host: self.host, what, why: why.into() });
        let plain = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_graphic() && b != b'"' && b != b'\\');
        if !(1..=254).contains(&self.host) {
            return bad("host", "must be 1..=254");
        }
        if !plain(&self.user) || self.user.len() > USER_MAX_BYTES {
            return bad("user", "1..=16 printable ASCII characters, no quote or backslash");
        }
        if !plain(&self.password) || self.password.len() > PASSWORD_MAX_BYTES {
            return bad("password", "1..=16 printable ASCII characters, no quote or backslash");
        }
        let cmd = self.power_command.to_str().unwrap_or("");
        if !self.power_command.is_absolute() || !plain(cmd) {
            return bad("power_command", "an absolute path of printable ASCII, no spaces or quotes");
        }
        if !plain(&self.netns) || !plain(&self.client_netns) {
            return bad("netns", "a network namespace name");
        }
        Ok(())
    }

    /// lan.conf as LAB-NOTES proves it works, with `startnow false`.
    pub fn lan_conf(&self) -> String {
        let (a, n, u, p) = (self.address, self.host, &self.user, &self.password);
        format!(
            "# havirt lab: BMC of host {n} (src/lab/bmc.rs)\n\
             name \"h{n}-bmc\"\n\
             set_working_mc 0x20\n\
             \x20 startlan 1\n\
             \x20   addr {a} {IPMI_PORT}\n\
             \x20   priv_limit admin\n\
             \x20   allowed_auths_admin none md2 md5 straight\n\
             \x20   guid a123456789abcdefa123456789ab{n:04x}\n\
             \x20 endlan\n\
             \x20 serial 15 {a} {port} codec VM\n\
             \x20 startcmd \"{cmd}\"\n\
             \x20 startnow false\n\
             \x20 poweroff_wait 0\n\
             \x20 kill_wait 1\n\
             \x20 user {USER_ID} true \"{u}\" \"{p}\" admin 10 none md2 md5 straight\n",
            port = self.serial_port,
            cmd = self.power_command.display(),
        )
    }
}

#[allow(clippy::disallowed_methods, reason = "the lab waits for real processes in wall time")]
fn now() -> Instant {
    Instant::now()
}

/// A running `ipmi_sim`. Dropping it kills `ipmi_sim` (not the host it
/// started: see [`Bmc::kill_process_group`]).
#[derive(Debug)]
pub struct Bmc {
    spec: BmcSpec,
    child: Child,
    /// Set once the child is reaped.
    exited: Option<ExitStatus>,
}

impl Bmc {
    /// Write the BMC's files, start `ipmi_sim` in `spec.netns` and wait,
    /// bounded by [`START_TIMEOUT`], until it answers a power status query.
    pub fn start(spec: BmcSpec) -> Result<Bmc, BmcError> {
        spec.validate()?;
        if let Some(listener) = udp_listener(&spec)? {
            let (host, address, netns) = (spec.host, spec.address, spec.netns.clone());
            return Err(BmcError::AddressInUse { host, address, port: IPMI_PORT, netns, listener });
        }
        write_files(&spec)?;
        let io = |path: PathBuf| move |source| BmcError::Io { host: spec.host, path, source };
        let log = fs::File::create(spec.log_path()).map_err(io(spec.log_path()))?;
        let log2 = log.try_clone().map_err(io(spec.log_path()))?;
        let state = spec.state_dir();
        let child = Command::new("ip")
            .args(["netns", "exec", &spec.netns, "ipmi_sim", "-n", "-c", "lan.conf", "-f", "bmc.emu", "-s"])
            .arg(&state)
            .current_dir(&spec.dir)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            .process_group(0)
            .spawn()
            .map_err(|source| BmcError::Spawn { host: spec.host, program: "ip netns exec".into(), source })?;
        // From here on, Drop kills the child whatever happens.
        let mut bmc = Bmc { spec, child, exited: None };
        bmc.wait_answering()?;
        Ok(bmc)
    }

    pub fn spec(&self) -> &BmcSpec {
        &self.spec
    }

    /// The pid of `ipmi_sim` (`ip netns exec` execs it, so it is the child).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    fn wait_answering(&mut self) -> Result<(), BmcError> {
        let start = now();
        loop {
            if let Some(status) = self.try_reap() {
                let log = log_tail(&self.spec.log_path());
                return Err(BmcError::Exited { host: self.spec.host, status: status.to_string(), log });
            }
            let Err(e) = self.ipmitool("chassis power status", PROBE_TIMEOUT) else { break };
            if start.elapsed() >= START_TIMEOUT {
                let (host, address, timeout_ms) = (self.spec.host, self.spec.address, START_TIMEOUT.as_millis());
                return Err(BmcError::NotAnswering { host, address, timeout_ms, last: e.to_string() });
            }
            std::thread::sleep(POLL_INTERVAL);
        }
        // Someone else's BMC on the same port would have answered too.
        match udp_listener(&self.spec)? {
            Some(l) if l.contains(&format!("pid={},", self.pid())) => Ok(()),
            other => Err(BmcError::AddressInUse {
                host: self.spec.host,
                address: self.spec.address,
                port: IPMI_PORT,
                netns: self.spec.netns.clone(),
                listener: other.unwrap_or_else(|| "nobody".into()),
            }),
        }
    }

    /// `chassis power on`, as an operator would.
    pub fn power_on(&self) -> Result<(), BmcError> {
        self.ipmitool("chassis power on", IPMITOOL_TIMEOUT).map(|_| ())
    }

    /// `chassis power off` (the host gets SIGTERM, SIGKILL after 1 s). The
    /// status may say "on" for up to ~1 s more: see [`Bmc::wait_power`].
    pub fn power_off(&self) -> Result<(), BmcError> {
        self.ipmitool("chassis power off", IPMITOOL_TIMEOUT).map(|_| ())
    }

    /// `chassis power status`: true when on.
    pub fn status(&self) -> Result<bool, BmcError> {
        const COMMAND: &str = "chassis power status";
        let out = self.ipmitool(COMMAND, IPMITOOL_TIMEOUT)?;
        match out.trim().rsplit(' ').next() {
            Some("on") => Ok(true),
            Some("off") => Ok(false),
            _ => Err(BmcError::Failed {
                host: self.spec.host,
                command: COMMAND.into(),
                status: "unexpected output".into(),
                output: out,
            }),
        }
    }

    /// Poll the status until it is `on`, bounded by `timeout`.
    pub fn wait_power(&self, on: bool, timeout: Duration) -> Result<(), BmcError> {
        let start = now();
        while self.status()? != on {
            if start.elapsed() >= timeout {
                let want = if on { "on" } else { "off" };
                return Err(BmcError::PowerNotReached { host: self.spec.host, want, timeout_ms: timeout.as_millis() });
            }
            std::thread::sleep(POLL_INTERVAL);
        }
        Ok(())
    }

    /// Stop answering (SIGSTOP): the "bmc-dead" fault, a BMC that died with
    /// its server. Requests queue in the socket and are answered on thaw.
    pub fn freeze(&self) -> Result<(), BmcError> {
        self.signal(libc::SIGSTOP, "SIGSTOP")
    }

    /// Answer again (SIGCONT).
    pub fn thaw(&self) -> Result<(), BmcError> {
        self.signal(libc::SIGCONT, "SIGCONT")
    }

    /// Kill `ipmi_sim` (SIGKILL, even when frozen) and reap it. The host it
    /// started keeps running (LAB-NOTES): the lab kills both when it means
    /// both. Idempotent.
    pub fn kill(&mut self) {
        if self.exited.is_none() {
            let _ = self.child.kill();
            self.reap_bounded();
        }
    }

    /// Kill `ipmi_sim` and everything in its process group: the host it
    /// started, unless the host's start command left the group (setsid).
    pub fn kill_process_group(&mut self) {
        if self.exited.is_none() {
            let pgid = libc::pid_t::try_from(self.pid()).unwrap_or(0);
            if pgid > 0 {
                // SAFETY: kill(2) takes plain integers and touches no memory of ours.
                unsafe { libc::kill(-pgid, libc::SIGKILL) };
            }
        }
        self.kill();
    }

    fn signal(&self, signal: libc::c_int, name: &'static str) -> Result<(), BmcError> {
        let pid = self.pid();
        let err = |source| BmcError::Signal { host: self.spec.host, signal: name, pid, source };
        if self.exited.is_some() {
            return Err(err(io::Error::from_raw_os_error(libc::ESRCH)));
        }
        let raw = libc::pid_t::try_from(pid).map_err(|_| err(io::Error::from_raw_os_error(libc::ESRCH)))?;
        // SAFETY: kill(2) takes plain integers and touches no memory of ours.
        if unsafe { libc::kill(raw, signal) } == 0 { Ok(()) } else { Err(err(io::Error::last_os_error())) }
    }

    fn try_reap(&mut self) -> Option<ExitStatus> {
        if self.exited.is_none() {
            self.exited = self.child.try_wait().ok().flatten();
        }
        self.exited
    }

    fn reap_bounded(&mut self) {
        let start = now();
        while self.try_reap().is_none() && start.elapsed() < REAP_TIMEOUT {
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Run `ipmitool -I lanplus -C 3 -H ADDR -U USER -E COMMAND` in the
    /// client namespace, killed after `timeout`. The password goes in the
    /// environment (`-E`), not argv. Returns stdout.
    fn ipmitool(&self, command: &str, timeout: Duration) -> Result<String, BmcError> {
        let s = &self.spec;
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &s.client_netns, "ipmitool", "-I", "lanplus", "-C"])
            .arg(CIPHER_SUITE.to_string())
            .args(["-N", &IPMITOOL_RETRY_INTERVAL_S.to_string(), "-R", &IPMITOOL_RETRIES.to_string()])
            .args(["-H", &s.address.to_string(), "-U", &s.user, "-E"])
            .args(command.split(' '))
            .env("IPMI_PASSWORD", &s.password);
        let (status, stdout, stderr) = run_bounded(cmd, timeout)
            .map_err(|source| BmcError::Spawn { host: s.host, program: "ip netns exec ipmitool".into(), source })?
            .ok_or_else(|| BmcError::Timeout {
                host: s.host,
                command: command.into(),
                timeout_ms: timeout.as_millis(),
            })?;
        if status.success() {
            Ok(stdout)
        } else {
            let output = format!("{stdout}{stderr}").trim().to_owned();
            Err(BmcError::Failed { host: s.host, command: command.into(), status: status.to_string(), output })
        }
    }
}

impl Drop for Bmc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Run `cmd` in a process group of its own; past `timeout` kill the group
/// and return `None`. Its output is small (ipmitool, ss): read after exit.
fn run_bounded(mut cmd: Command, timeout: Duration) -> io::Result<Option<(ExitStatus, String, String)>> {
    let mut child = cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).process_group(0).spawn()?;
    let start = now();
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if start.elapsed() >= timeout {
            if let Ok(pgid) = libc::pid_t::try_from(child.id()) {
                // SAFETY: kill(2) takes plain integers and touches no memory of ours.
                unsafe { libc::kill(-pgid, libc::SIGKILL) };
            }
            let _ = child.wait();
            return Ok(None);
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let read = |pipe: Option<&mut dyn Read>| {
        let mut text = String::new();
        if let Some(p) = pipe {
            let _ = p.read_to_string(&mut text);
        }
        text
    };
    let stdout = read(child.stdout.as_mut().map(|p| p as &mut dyn Read));
    let stderr = read(child.stderr.as_mut().map(|p| p as &mut dyn Read));
    Ok(Some((status, stdout, stderr)))
}

/// The `ss` line of whatever listens on ADDR:623/udp in the BMC namespace.
fn udp_listener(spec: &BmcSpec) -> Result<Option<String>, BmcError> {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", &spec.netns, "ss", "-H", "-l", "-n", "-p", "-u"]);
    let spawn =
        |source| BmcError::Spawn { host: spec.host, program: format!("ip netns exec {} ss", spec.netns), source };
    let failed = |status: String, output: String| BmcError::Failed {
        host: spec.host,
        command: format!("(ip netns exec {} ss -lnpu)", spec.netns),
        status,
        output,
    };
    let (status, stdout, stderr) =
        run_bounded(cmd, IPMITOOL_TIMEOUT).map_err(spawn)?.ok_or_else(|| failed("timeout".into(), String::new()))?;
    if !status.success() {
        return Err(failed(status.to_string(), stderr));
    }
    let local = format!("{}:{IPMI_PORT}", spec.address);
    let wildcard = format!("0.0.0.0:{IPMI_PORT}");
    Ok(stdout
        .lines()
        .find(|l| {
            l.split_whitespace().nth(3).is_some_and(|a| a == local || a == wildcard || a == format!("*:{IPMI_PORT}"))
        })
        .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" ")))
}

fn write_files(spec: &BmcSpec) -> Result<(), BmcError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| BmcError::Io { host: spec.host, path, source }
    };
    let state = spec.state_dir();
    fs::create_dir_all(&state).map_err(io(&state))?;
    fs::set_permissions(&spec.dir, fs::Permissions::from_mode(0o700)).map_err(io(&spec.dir))?;
    // lan.conf holds the password: private from its creation on.
    let lan = spec.dir.join("lan.conf");
    let _ = fs::remove_file(&lan);
    let mut file = fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&lan).map_err(io(&lan))?;
    io::Write::write_all(&mut file, spec.lan_conf().as_bytes()).map_err(io(&lan))?;
    let emu = spec.dir.join("bmc.emu");
    fs::write(&emu, BMC_EMU).map_err(io(&emu))
}

fn log_tail(path: &Path) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let mut start = text.len().saturating_sub(LOG_QUOTED_MAX_BYTES);
    while !text.is_char_boundary(start) {
        start += 1;
    }
    let tail = text[start..].trim();
    if tail.is_empty() { "(ipmi_sim.log is empty)".into() } else { tail.into() }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> BmcSpec {
        BmcSpec::lab(Path::new("/var/tmp/havirt-lab"), 3, "pw")
    }

    #[test]
    fn lab_spec_follows_the_layout() {
        let s = spec();
        assert_eq!(s.address, Ipv4Addr::new(10, 98, 0, 3));
        assert_eq!(s.dir, Path::new("/var/tmp/havirt-lab/bmc/h3"));
        assert_eq!(s.power_command, Path::new("/var/tmp/havirt-lab/h3/start"));
        assert_eq!((s.netns.as_str(), s.client_netns.as_str()), ("hl-bmc", "hl-bmc"));
        assert!(s.validate().is_ok());
    }

    #[test]
    fn lan_conf_has_what_power_control_needs() {
        let conf = spec().lan_conf();
        for line in [
            "  addr 10.98.0.3 623",
            "  serial 15 10.98.0.3 9002 codec VM",
            "  startcmd \"/var/tmp/havirt-lab/h3/start\"",
            "  startnow false",
            "  poweroff_wait 0",
            "  kill_wait 1",
            "  user 2 true \"admin\" \"pw\" admin 10 none md2 md5 straight",
            "    guid a123456789abcdefa123456789ab0003",
        ] {
            assert!(conf.lines().any(|l| l.trim_start() == line.trim_start()), "{line:?} missing from:\n{conf}");
        }
    }

    #[test]
    fn specs_lan_conf_cannot_quote_are_refused() {
        let mut s = spec();
        s.password = "a\"b".into();
        assert!(matches!(s.validate(), Err(BmcError::InvalidSpec { what: "password", .. })));
        let mut s = spec();
        s.password = "x".repeat(PASSWORD_MAX_BYTES + 1);
        assert!(matches!(s.validate(), Err(BmcError::InvalidSpec { what: "password", .. })));
        let mut s = spec();
        s.power_command = "/lab/h1/start now".into();
        assert!(matches!(s.validate(), Err(BmcError::InvalidSpec { what: "power_command", .. })));
        let mut s = spec();
        s.host = 0;
        assert!(matches!(s.validate(), Err(BmcError::InvalidSpec { what: "host", .. })));
    }
}
