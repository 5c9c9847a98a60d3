//! The lab's simulated BMCs (src/lab/bmc.rs) against the real fencing
//! tools: `ipmi_sim` powers a test "host" on and off, `ipmitool` and
//! `fence_ipmilan` (fence-agents stdin protocol) drive it, and havirt's own
//! `CommandAgent` and `IpmiAgent` confirm power off through it, or fail on
//! time when the BMC is frozen.
//!
//! Root only (network namespaces). Skipped, saying why, when not root or a
//! tool is missing; under CI (`CI` set, .ci/run installs the tools) a
//! missing tool fails instead. Each test makes its own namespace `hl-tbmc-*`
//! holding the BMC address on lo; every client (ipmitool, fence_ipmilan,
//! havirt's agents through wrapper scripts on their PATH) runs inside it,
//! never in the root namespace (LAB-NOTES). The `World` guard kills
//! everything in the namespace, deletes it and the scratch directory, also
//! when a test fails. Every wait is bounded.
//!
//! The test host's power command writes its pid, then execs a long `sleep`
//! in the foreground: SIGTERM (ipmi_sim's power off) ends it.

use havirt::fence::{AgentEnv, CommandAgent, FenceAgent, FenceOutcome, IpmiAgent, outcome};
use havirt::lab::bmc::{Bmc, BmcError, BmcSpec, IPMITOOL_TIMEOUT};
use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::net::Ipv4Addr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const ADDRESS: Ipv4Addr = Ipv4Addr::new(10, 98, 0, 1);
const USER: &str = "admin";
const PASSWORD: &str = "lab-bmc-pw";
/// A fence that works: fence_ipmilan's off takes ~1.2 s with power_wait 0.
const FENCE_DEADLINE: Duration = Duration::from_secs(15);
/// A fence against a frozen BMC: must fail by then, not hang.
const FROZEN_DEADLINE: Duration = Duration::from_secs(3);
/// What a killed fence run may take beyond its deadline (kill, reap).
const KILL_SLACK: Duration = Duration::from_millis(1500);
/// Bound on waiting for the host process to start or stop.
const HOST_WAIT: Duration = Duration::from_secs(5);
/// Bound on one fence_ipmilan run from the test itself.
const FENCE_IPMILAN_TIMEOUT: Duration = Duration::from_secs(25);
const POLL: Duration = Duration::from_millis(20);

#[allow(clippy::disallowed_methods, reason = "tests time real processes in wall time")]
fn now() -> Instant {
    Instant::now()
}

fn timed<T>(f: impl FnOnce() -> T) -> (T, Duration) {
    let start = now();
    let t = f();
    (t, start.elapsed())
}

fn find_program(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let mut dirs: Vec<PathBuf> = std::env::split_paths(&path).collect();
    dirs.extend(["/usr/sbin", "/usr/bin", "/sbin"].map(PathBuf::from));
    dirs.into_iter().map(|d| d.join(name)).find(|p| p.is_file())
}

/// Why this machine cannot run the tests, if it cannot.
fn unavailable() -> Option<String> {
    // SAFETY: geteuid(2) takes nothing and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        return Some("not root (network namespaces need it)".into());
    }
    let missing: Vec<&str> = ["ip", "ss", "ipmi_sim", "ipmitool", "fence_ipmilan"]
        .into_iter()
        .filter(|p| find_program(p).is_none())
        .collect();
    if missing.is_empty() {
        return None;
    }
    let why = format!("missing {} (Debian: openipmi ipmitool fence-agents iproute2)", missing.join(", "));
    assert!(std::env::var_os("CI").is_none(), "{why}: .ci/run installs them in CI");
    Some(why)
}

fn ip(args: &[&str]) -> bool {
    Command::new("ip").args(args).stdin(Stdio::null()).stderr(Stdio::null()).status().is_ok_and(|s| s.success())
}

/// Kill every process in netns `name` and delete it, if it exists.
fn purge_netns(name: &str) {
    if !Path::new("/run/netns").join(name).exists() {
        return;
    }
    let out = Command::new("ip").args(["netns", "pids", name]).output();
    for pid in out.map(|o| String::from_utf8_lossy(&o.stdout).into_owned()).unwrap_or_default().split_whitespace() {
        if let Ok(pid) = pid.parse::<libc::pid_t>() {
            // SAFETY: kill(2) takes plain integers and touches no memory of ours.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
    ip(&["netns", "del", name]);
}

/// One test's BMC, its namespace, its host and scratch directory.
struct World {
    name: &'static str,
    netns: String,
    dir: PathBuf,
    env: AgentEnv,
    password_file: PathBuf,
    /// `None` only during setup and teardown.
    bmc: Option<Bmc>,
}

impl World {
    /// `None`: skipped (the reason is printed).
    fn new(name: &'static str) -> Option<World> {
        if let Some(why) = unavailable() {
            println!("SKIPPED {name}: {why}");
            return None;
        }
        let netns = format!("hl-tbmc-{name}");
        purge_netns(&netns); // a previous run killed before its Drop
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("lab_bmc").join(name);
        let _ = fs::remove_dir_all(&dir);
        let bin = dir.join("bin");
        fs::create_dir_all(&bin).expect("scratch dir");
        let mut path = bin.clone().into_os_string();
        path.push(":");
        path.push(std::env::var_os("PATH").unwrap_or_default());
        let mut world = World {
            name,
            netns,
            env: AgentEnv { path: Some(path) },
            password_file: dir.join("fence.pw"),
            dir,
            bmc: None,
        };
        let address = format!("{ADDRESS}/32");
        assert!(ip(&["netns", "add", &world.netns]), "ip netns add {}", world.netns);
        assert!(ip(&["-n", &world.netns, "link", "set", "lo", "up"]), "lo up");
        assert!(ip(&["-n", &world.netns, "addr", "add", &address, "dev", "lo"]), "BMC address");
        world.write_scripts(&bin);
        let (bmc, took) = timed(|| Bmc::start(world.spec()));
        world.bmc = Some(bmc.unwrap_or_else(|e| panic!("{name}: BMC did not start: {e}")));
        println!("{name}: BMC up and answering in {} ms", took.as_millis());
        Some(world)
    }

    fn spec(&self) -> BmcSpec {
        BmcSpec {
            host: 1,
            address: ADDRESS,
            serial_port: 9002,
            power_command: self.dir.join("power"),
            dir: self.dir.join("bmc"),
            netns: self.netns.clone(),
            client_netns: self.netns.clone(),
            user: USER.into(),
            password: PASSWORD.into(),
        }
    }

    /// The host's power command, the password file (0600), and wrappers
    /// that run the real ipmitool and fence_ipmilan in the namespace.
    fn write_scripts(&self, bin: &Path) {
        let power = format!(
            "#!/bin/sh\n# ipmi_sim runs this on power on, SIGTERM ends it on power off.\n\
             echo $$ > {pid}.tmp && mv {pid}.tmp {pid}\nexec sleep 600\n",
            pid = self.pid_file().display()
        );
        write_executable(&self.dir.join("power"), &power);
        for tool in ["ipmitool", "fence_ipmilan"] {
            let real = find_program(tool).expect("checked by unavailable()");
            let script = format!("#!/bin/sh\nexec ip netns exec {} {} \"$@\"\n", self.netns, real.display());
            write_executable(&bin.join(tool), &script);
        }
        fs::write(&self.password_file, format!("{PASSWORD}\n")).expect("password file");
        fs::set_permissions(&self.password_file, fs::Permissions::from_mode(0o600)).expect("chmod password file");
    }

    fn bmc(&self) -> &Bmc {
        self.bmc.as_ref().expect("BMC started")
    }

    fn pid_file(&self) -> PathBuf {
        self.dir.join("host.pid")
    }

    /// The host's pid, when its process is alive (and not a zombie).
    fn host_pid(&self) -> Option<u32> {
        let pid: u32 = fs::read_to_string(self.pid_file()).ok()?.trim().parse().ok()?;
        let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        let state = stat.rsplit(')').next()?.split_whitespace().next()?;
        let cmdline = fs::read(format!("/proc/{pid}/cmdline")).ok()?;
        (state != "Z" && cmdline.starts_with(b"sleep\0")).then_some(pid)
    }

    /// Wait until the host runs (`Some(pid)`) or is gone (`None`).
    fn wait_host(&self, running: bool) -> Option<u32> {
        let start = now();
        loop {
            let pid = self.host_pid();
            if pid.is_some() == running {
                return pid;
            }
            assert!(start.elapsed() < HOST_WAIT, "{}: host still {}", self.name, if running { "off" } else { "on" });
            std::thread::sleep(POLL);
        }
    }

    /// Power on through ipmitool and wait for the host process.
    fn power_on(&self) -> u32 {
        let _ = fs::remove_file(self.pid_file());
        self.bmc().power_on().expect("ipmitool chassis power on");
        self.wait_host(true).expect("host running")
    }

    /// `fence_ipmilan` with the fence-agents stdin protocol, in the
    /// namespace: its exit code and stdout.
    fn fence_ipmilan(&self, action: &str) -> (i32, String) {
        let stdin = format!(
            "ip={ADDRESS}\nusername={USER}\nlanplus=1\ncipher=3\npower_wait=0\naction={action}\npassword={PASSWORD}\n"
        );
        let mut child = Command::new(self.dir.join("bin/fence_ipmilan"))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("run fence_ipmilan");
        child.stdin.take().expect("stdin").write_all(stdin.as_bytes()).expect("write stdin");
        let start = now();
        while child.try_wait().expect("wait fence_ipmilan").is_none() {
            if start.elapsed() > FENCE_IPMILAN_TIMEOUT {
                let _ = child.kill();
                panic!("fence_ipmilan action={action} ran over {} s", FENCE_IPMILAN_TIMEOUT.as_secs());
            }
            std::thread::sleep(POLL);
        }
        let out = child.wait_with_output().expect("fence_ipmilan output");
        (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stdout).into_owned())
    }

    fn command_agent(&self) -> CommandAgent {
        let ip = ADDRESS.to_string();
        let options = [("ip", ip.as_str()), ("username", USER), ("lanplus", "1"), ("cipher", "3"), ("power_wait", "0")]
            .map(|(k, v)| (k.to_owned(), v.to_owned()));
        let options = BTreeMap::from(options);
        let pw = Some(self.password_file.clone());
        CommandAgent::new("ipmilan".into(), "fence_ipmilan".into(), options, pw, self.env.clone())
    }

    fn ipmi_agent(&self) -> IpmiAgent {
        let pw = self.password_file.clone();
        IpmiAgent::new("bmc".into(), ADDRESS.to_string(), USER.into(), pw, 3, self.env.clone())
    }
}

impl Drop for World {
    fn drop(&mut self) {
        if let Some(mut bmc) = self.bmc.take() {
            let _ = bmc.thaw();
            bmc.kill_process_group();
        }
        if let Some(pid) = self.host_pid().and_then(|p| libc::pid_t::try_from(p).ok()) {
            // SAFETY: kill(2) takes plain integers and touches no memory of ours.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        purge_netns(&self.netns);
        let _ = fs::remove_dir_all(&self.dir);
    }
}

fn write_executable(path: &Path, text: &str) {
    fs::write(path, text).expect("write script");
    fs::set_permissions(path, fs::Permissions::from_mode(0o755)).expect("chmod script");
}

#[test]
fn bmc_powers_the_host_through_ipmitool_and_fence_ipmilan() {
    let Some(w) = World::new("power") else { return };
    let bmc = w.bmc();
    assert_eq!(bmc.status().ok(), Some(false), "startnow false: the lab decides when a host powers on");
    assert_eq!(w.host_pid(), None);
    let mut twin = w.spec();
    twin.dir = w.dir.join("twin");
    let twin = Bmc::start(twin).map(|b| b.pid());
    assert!(matches!(twin, Err(BmcError::AddressInUse { .. })), "a second BMC on the same address: {twin:?}");

    let pid = w.power_on();
    let (status, took) = timed(|| bmc.status());
    assert_eq!(status.ok(), Some(true));
    println!("power: host pid {pid} running; ipmitool power status {} ms", took.as_millis());

    let (off, took) = timed(|| bmc.power_off());
    off.expect("ipmitool chassis power off");
    let (_, gone) = timed(|| w.wait_host(false));
    bmc.wait_power(false, HOST_WAIT).expect("status off after ipmitool off");
    println!("power: ipmitool power off {} ms, host gone {} ms later", took.as_millis(), gone.as_millis());

    w.power_on();
    let ((code, out), took) = timed(|| w.fence_ipmilan("status"));
    assert_eq!(code, 0, "fence_ipmilan status of a host that is on: {out}");
    println!("power: fence_ipmilan action=status (ON) {} ms", took.as_millis());
    let ((code, out), took) = timed(|| w.fence_ipmilan("off"));
    assert_eq!(code, 0, "fence_ipmilan action=off: {out}");
    assert_eq!(w.wait_host(false), None);
    println!("power: fence_ipmilan action=off {} ms", took.as_millis());
    let ((code, out), took) = timed(|| w.fence_ipmilan("status"));
    assert_eq!(code, 2, "fence_ipmilan action=status after off: exit 2 is OFF: {out}");
    assert!(out.contains("Status: OFF"), "{out}");
    println!("power: fence_ipmilan action=status (OFF) {} ms", took.as_millis());
    assert_eq!(bmc.status().ok(), Some(false));
}

#[test]
fn havirt_agents_confirm_power_off_through_the_bmc() {
    let Some(w) = World::new("agents") else { return };
    let command = w.command_agent();
    assert_eq!(command.preflight(), Ok(()));
    w.power_on();
    let (result, took) = timed(|| command.off(FENCE_DEADLINE));
    assert_eq!(result, Ok(FenceOutcome::Confirmed));
    assert_eq!(w.wait_host(false), None, "confirmed off, and the host process is gone");
    println!("agents: CommandAgent (fence_ipmilan) confirmed off in {} ms", took.as_millis());

    let ipmi = w.ipmi_agent();
    assert_eq!(ipmi.preflight(), Ok(()));
    w.power_on();
    let (result, took) = timed(|| ipmi.off(FENCE_DEADLINE));
    assert_eq!(result, Ok(FenceOutcome::Confirmed));
    assert_eq!(w.wait_host(false), None, "confirmed off, and the host process is gone");
    println!("agents: IpmiAgent (ipmitool) confirmed off in {} ms", took.as_millis());

    let (result, took) = timed(|| ipmi.off(FENCE_DEADLINE));
    assert_eq!(result, Ok(FenceOutcome::Confirmed), "a host already off is confirmed off");
    println!("agents: IpmiAgent on a host already off: {} ms", took.as_millis());
}

#[test]
fn frozen_bmc_fails_the_agents_on_time_and_thaw_restores_them() {
    let Some(w) = World::new("frozen") else { return };
    let pid = w.power_on();
    w.bmc().freeze().expect("SIGSTOP ipmi_sim");
    let agents: [(&str, Box<dyn FenceAgent>); 2] =
        [("CommandAgent", Box::new(w.command_agent())), ("IpmiAgent", Box::new(w.ipmi_agent()))];
    for (name, agent) in &agents {
        let (result, took) = timed(|| agent.off(FROZEN_DEADLINE));
        assert_eq!(outcome(&result), FenceOutcome::Failed, "{name} against a frozen BMC: {result:?}");
        assert!(took < FROZEN_DEADLINE + KILL_SLACK, "{name} took {} ms", took.as_millis());
        let e = result.map(|_| String::new()).unwrap_or_else(|e| e.to_string());
        assert!(!e.contains(PASSWORD), "{e}");
        println!("frozen: {name} failed in {} ms: {e}", took.as_millis());
    }
    let (status, took) = timed(|| w.bmc().status());
    assert!(matches!(status, Err(BmcError::Timeout { .. })), "{status:?}");
    assert!(took < IPMITOOL_TIMEOUT + KILL_SLACK, "status took {} ms", took.as_millis());
    assert_eq!(w.host_pid(), Some(pid), "nothing fenced the host while its BMC was frozen");

    w.bmc().thaw().expect("SIGCONT ipmi_sim");
    assert_eq!(w.bmc().status().ok(), Some(true), "the thawed BMC answers again");
    for (name, agent) in &agents {
        if w.host_pid().is_none() {
            w.power_on();
        }
        let (result, took) = timed(|| agent.off(FENCE_DEADLINE));
        assert_eq!(result, Ok(FenceOutcome::Confirmed), "{name} after thaw");
        assert_eq!(w.wait_host(false), None);
        println!("frozen: after thaw {name} confirmed off in {} ms", took.as_millis());
    }
}
