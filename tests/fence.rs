//! Fence agents and watchdogs against real processes and sockets: fake
//! fence-agents programs, a fake `ipmitool` and a fake `virsh` (bash scripts
//! in tests/fence/, copied per test into a scratch bin directory put first
//! on the agents' PATH), password files with real modes, and unix datagram
//! sockets. /dev/watchdog does not exist here, so the device watchdog is
//! tested only for its refusals.

use havirt::config::{Config, FenceMethod, Watchdog as WatchdogConfig};
use havirt::engine::config::HostId;
use havirt::fence::watchdog::{
    self, DeviceWatchdog, LabWatchdog, NoWatchdog, SystemdWatchdog, Watchdog, WatchdogError,
};
use havirt::fence::{
    AgentEnv, CommandAgent, FenceAgent, FenceError, FenceOutcome, Fencers, IpmiAgent, LibvirtAgent, build_agent,
    outcome,
};
use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::time::Duration;

const PASSWORD: &str = "s3cret-pw";
/// A deadline no well-behaved fake comes near.
const DEADLINE_MS: u64 = 10_000;
/// A deadline for the cases that must wait it out.
const SHORT_DEADLINE_MS: u64 = 1_500;
/// What a killed run may take beyond its deadline (kill, reap).
const KILL_SLACK_MS: u64 = 1_000;
const FIXTURES: [&str; 7] =
    ["proto.sh", "fence_fake", "fence_hang", "fence_stuck_on", "fence_leaky", "ipmitool", "virsh"];

/// One test's world: a scratch directory with the fixtures in `bin/`.
struct Lab {
    dir: PathBuf,
    bin: PathBuf,
    env: AgentEnv,
}

impl Lab {
    fn new(name: &str) -> Self {
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("fence").join(name);
        let _ = fs::remove_dir_all(&dir);
        let bin = dir.join("bin");
        fs::create_dir_all(&bin).expect("scratch bin dir");
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fence");
        for f in FIXTURES {
            fs::copy(src.join(f), bin.join(f)).expect("copy fixture");
            fs::set_permissions(bin.join(f), fs::Permissions::from_mode(0o755)).expect("chmod fixture");
        }
        let mut path = bin.clone().into_os_string();
        if let Some(inherited) = std::env::var_os("PATH") {
            path.push(":");
            path.push(inherited);
        }
        Lab { dir, bin, env: AgentEnv { path: Some(path) } }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    fn password_file(&self, mode: u32) -> PathBuf {
        let p = self.path("fence.pw");
        fs::write(&p, format!("{PASSWORD}\n")).expect("write password file");
        fs::set_permissions(&p, fs::Permissions::from_mode(mode)).expect("chmod password file");
        p
    }

    /// A fence-agents program from tests/fence with a state file "on".
    fn command(&self, program: &str, password_file: Option<PathBuf>) -> (CommandAgent, PathBuf) {
        let state = self.path("host.state");
        fs::write(&state, "on\n").expect("state file");
        let options = BTreeMap::from([
            ("state".to_owned(), state.display().to_string()),
            ("ip".to_owned(), "10.98.0.1".to_owned()),
            ("username".to_owned(), "admin".to_owned()),
        ]);
        (CommandAgent::new("fake".into(), program.into(), options, password_file, self.env.clone()), state)
    }
}

fn read(p: impl AsRef<Path>) -> String {
    fs::read_to_string(p.as_ref()).unwrap_or_default()
}

/// Run `f` and measure it on the wall clock.
#[allow(clippy::disallowed_methods)] // these tests time real processes
fn timed<T>(f: impl FnOnce() -> T) -> (T, Duration) {
    let start = std::time::Instant::now();
    let t = f();
    (t, start.elapsed())
}

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

// ---------------------------------------------------------------- command (fence-agents)

#[test]
fn command_agent_confirms_off_with_the_password_on_stdin_only() {
    let lab = Lab::new("command-ok");
    let pw = lab.password_file(0o600);
    let (agent, state) = lab.command("fence_fake", Some(pw.clone()));
    assert_eq!(agent.preflight(), Ok(()));
    assert_eq!(agent.off(ms(DEADLINE_MS)), Ok(FenceOutcome::Confirmed));
    assert_eq!(read(&state).trim(), "off");

    let stdin = read(lab.path("host.state.stdin"));
    let off = format!("action=off\npassword={PASSWORD}\n");
    let status = format!("action=status\npassword={PASSWORD}\n");
    assert!(stdin.contains(&off) && stdin.contains(&status), "{stdin}");
    assert!(stdin.contains("ip=10.98.0.1\n") && stdin.contains("username=admin\n"), "{stdin}");
    assert!(!stdin.contains(&pw.display().to_string()), "the file name is havirt's, not the agent's: {stdin}");
    let argv = read(lab.path("host.state.argv"));
    assert_eq!(argv.lines().count(), 2, "one off and one status run: {argv}");
    assert!(!argv.contains(PASSWORD), "password in argv: {argv}");
    let env = read(lab.path("host.state.env"));
    assert!(!env.is_empty() && !env.contains(PASSWORD), "password in the environment");
    assert!(env.contains("LC_ALL=C") && !env.contains("NOTIFY_SOCKET="), "agent environment");
}

#[test]
fn command_agent_without_password_file_sends_no_password() {
    let lab = Lab::new("command-nopw");
    let program = lab.bin.join("fence_fake").display().to_string();
    let (agent, _) = lab.command(&program, None);
    assert_eq!(agent.off(ms(DEADLINE_MS)), Ok(FenceOutcome::Confirmed));
    assert!(!read(lab.path("host.state.stdin")).contains("password"), "no password line");
}

#[test]
fn command_agent_that_hangs_is_killed_at_the_deadline() {
    let lab = Lab::new("command-hang");
    let (agent, _) = lab.command("fence_hang", Some(lab.password_file(0o600)));
    let (result, took) = timed(|| agent.off(ms(SHORT_DEADLINE_MS)));
    assert!(
        matches!(&result, Err(FenceError::Timeout { deadline_ms: SHORT_DEADLINE_MS, step, .. }) if step.contains("action=off")),
        "{result:?}"
    );
    assert_eq!(outcome(&result), FenceOutcome::Failed);
    assert!(took >= ms(SHORT_DEADLINE_MS) && took < ms(SHORT_DEADLINE_MS + KILL_SLACK_MS), "took {took:?}");
    // The agent's own child (which held its stdout) died with its process group.
    let pid = read(lab.path("host.state.pids")).trim().to_owned();
    assert!(!pid.is_empty(), "fence_hang recorded its child");
    let gone = (0..50).any(|_| {
        let stat = read(format!("/proc/{pid}/stat"));
        let dead = stat.is_empty() || stat.rsplit(')').next().is_some_and(|s| s.trim_start().starts_with('Z'));
        if !dead {
            std::thread::sleep(ms(20));
        }
        dead
    });
    assert!(gone, "the hung agent's child {pid} survived the deadline");
}

#[test]
fn command_agent_whose_status_stays_on_is_not_confirmed() {
    let lab = Lab::new("command-stuck-on");
    let (agent, _) = lab.command("fence_stuck_on", None);
    let (result, took) = timed(|| agent.off(ms(SHORT_DEADLINE_MS)));
    match &result {
        Err(e @ FenceError::NotConfirmedOff { polls, last, .. }) => {
            assert!(*polls >= 2 && last.contains("on"), "{e}");
            assert!(e.to_string().contains("NOT confirmed off"), "{e}");
        }
        other => panic!("expected NotConfirmedOff, got {other:?}"),
    }
    assert!(took < ms(SHORT_DEADLINE_MS + KILL_SLACK_MS), "took {took:?}");
}

#[test]
fn command_agent_errors_never_show_the_password() {
    let lab = Lab::new("command-leaky");
    let (agent, _) = lab.command("fence_leaky", Some(lab.password_file(0o600)));
    let result = agent.off(ms(DEADLINE_MS));
    let msg = result.as_ref().map(|_| String::new()).unwrap_or_else(|e| e.to_string());
    assert!(matches!(result, Err(FenceError::StepFailed { .. })), "{result:?}");
    assert!(msg.contains("exit 1") && msg.contains("login as admin with password ********"), "{msg}");
    assert!(!msg.contains(PASSWORD), "{msg}");
    assert!(!format!("{result:?}").contains(PASSWORD));
    assert!(!format!("{agent:?}").contains(PASSWORD));
}

#[test]
fn password_file_readable_by_others_is_refused_before_running() {
    let lab = Lab::new("command-pw-mode");
    let pw = lab.password_file(0o644);
    let (agent, state) = lab.command("fence_fake", Some(pw.clone()));
    let expected = FenceError::PasswordFileMode { agent: "fake".into(), path: pw.clone(), mode: 0o644 };
    assert_eq!(agent.preflight(), Err(expected.clone()));
    let result = agent.off(ms(DEADLINE_MS));
    assert_eq!(result, Err(expected));
    let msg = result.map(|_| String::new()).unwrap_or_else(|e| e.to_string());
    assert!(msg.contains(&format!("chmod 600 {}", pw.display())), "{msg}");
    assert!(!lab.path("host.state.argv").exists(), "the agent ran");
    assert_eq!(read(&state).trim(), "on");
}

#[test]
fn missing_password_file_and_missing_program_are_named() {
    let lab = Lab::new("command-missing");
    let (agent, _) = lab.command("fence_fake", Some(lab.path("nope.pw")));
    let msg = agent.off(ms(DEADLINE_MS)).map(|_| String::new()).unwrap_or_else(|e| e.to_string());
    assert!(msg.contains("nope.pw") && msg.contains("install -m 600"), "{msg}");

    let (agent, _) = lab.command("fence_no_such_agent", None);
    let result = agent.off(ms(DEADLINE_MS));
    assert!(
        matches!(&result, Err(FenceError::Spawn { program, reason, .. }) if program == "fence_no_such_agent" && reason.contains("not found in PATH")),
        "{result:?}"
    );
}

// ---------------------------------------------------------------- ipmi

fn ipmi_agent(lab: &Lab, password_file: PathBuf) -> IpmiAgent {
    IpmiAgent::new("bmc".into(), "10.98.0.1".into(), "admin".into(), password_file, 3, lab.env.clone())
}

#[test]
fn ipmi_agent_polls_status_until_off() {
    let lab = Lab::new("ipmi-ok");
    let pw = lab.password_file(0o600);
    fs::write(lab.bin.join("ipmitool.expect_pw"), PASSWORD).expect("expected password");
    let agent = ipmi_agent(&lab, pw.clone());
    assert_eq!(agent.preflight(), Ok(()));
    assert_eq!(agent.off(ms(DEADLINE_MS)), Ok(FenceOutcome::Confirmed));
    // "on" for three polls after off, then "off".
    assert_eq!(read(lab.bin.join("ipmitool.polls")).trim(), "4");
    let argv = read(lab.bin.join("ipmitool.argv"));
    let lines: Vec<&str> = argv.lines().collect();
    let prefix = format!("-I lanplus -C 3 -H 10.98.0.1 -U admin -f {}", pw.display());
    assert_eq!(lines.first().copied(), Some(format!("{prefix} chassis power off").as_str()));
    assert_eq!(lines.len(), 5, "{argv}");
    assert!(lines[1..].iter().all(|l| *l == format!("{prefix} chassis power status")), "{argv}");
    assert!(!argv.contains(PASSWORD));
    assert!(!read(lab.bin.join("ipmitool.env")).contains(PASSWORD));
}

#[test]
fn ipmi_status_that_stays_on_is_not_confirmed() {
    let lab = Lab::new("ipmi-stays-on");
    fs::write(lab.bin.join("ipmitool.lag"), "1000").expect("lag");
    let agent = ipmi_agent(&lab, lab.password_file(0o600));
    let (result, took) = timed(|| agent.off(ms(SHORT_DEADLINE_MS)));
    assert!(matches!(&result, Err(FenceError::NotConfirmedOff { last, .. }) if last.contains("on")), "{result:?}");
    assert!(took < ms(SHORT_DEADLINE_MS + KILL_SLACK_MS), "took {took:?}");
}

#[test]
fn ipmi_wrong_password_fails_and_unsafe_file_is_refused() {
    let lab = Lab::new("ipmi-pw");
    fs::write(lab.bin.join("ipmitool.expect_pw"), "another").expect("expected password");
    let result = ipmi_agent(&lab, lab.password_file(0o600)).off(ms(DEADLINE_MS));
    assert!(
        matches!(&result, Err(FenceError::StepFailed { output, .. }) if output.contains("RMCP+ session")),
        "{result:?}"
    );
    fs::remove_file(lab.bin.join("ipmitool.argv")).expect("argv record");
    let pw = lab.password_file(0o640);
    let result = ipmi_agent(&lab, pw.clone()).off(ms(DEADLINE_MS));
    assert_eq!(result, Err(FenceError::PasswordFileMode { agent: "bmc".into(), path: pw, mode: 0o640 }));
    assert!(!lab.bin.join("ipmitool.argv").exists(), "ipmitool ran with an unsafe password file");
}

// ---------------------------------------------------------------- libvirt

fn libvirt_agent(lab: &Lab) -> LibvirtAgent {
    LibvirtAgent::new("outer".into(), "qemu+tcp://10.99.0.254/system".into(), "lab-h1".into(), lab.env.clone())
}

#[test]
fn libvirt_agent_destroys_and_confirms_shut_off() {
    let lab = Lab::new("libvirt-ok");
    let agent = libvirt_agent(&lab);
    assert_eq!(agent.off(ms(DEADLINE_MS)), Ok(FenceOutcome::Confirmed));
    assert_eq!(read(lab.bin.join("virsh.lab-h1.state")).trim(), "shut off");
    assert_eq!(
        read(lab.bin.join("virsh.argv")),
        "-c qemu+tcp://10.99.0.254/system destroy lab-h1\n-c qemu+tcp://10.99.0.254/system domstate lab-h1\n"
    );
}

#[test]
fn libvirt_domain_already_off_is_confirmed() {
    let lab = Lab::new("libvirt-already-off");
    fs::write(lab.bin.join("virsh.lab-h1.state"), "shut off\n").expect("state");
    assert_eq!(libvirt_agent(&lab).off(ms(DEADLINE_MS)), Ok(FenceOutcome::Confirmed));
}

#[test]
fn libvirt_domain_still_running_is_not_confirmed() {
    let lab = Lab::new("libvirt-stuck");
    fs::write(lab.bin.join("virsh.lab-h1.mode"), "stuck\n").expect("mode");
    let result = libvirt_agent(&lab).off(ms(SHORT_DEADLINE_MS));
    assert!(matches!(&result, Err(FenceError::NotConfirmedOff { last, .. }) if last.contains("running")), "{result:?}");
}

// ---------------------------------------------------------------- chain from config

fn config(lab: &Lab) -> Config {
    let text = format!(
        r#"
[cluster]
name = "lab"
key_file = "/etc/havirt/cluster.key"
datastore = {{ kind = "dir", path = "/mnt/lab" }}

[[host]]
name = "h1"
id = 1
addresses = ["192.0.2.11"]
watchdog = {{ kind = "lab", lab_socket = "/run/havirt-lab/h1.sock" }}

[[host.fence]]
kind = "command"
name = "fake"
agent = "fence_fake"
options = {{ state = "{state}", username = "admin" }}
password_file = "{pw}"

[[host.fence]]
kind = "storage"

[[host]]
name = "h2"
id = 2
addresses = ["192.0.2.12"]
watchdog = "none"

[[host.fence]]
kind = "libvirt"
uri = "qemu:///system"
domain = "lab-h2"
"#,
        state = lab.path("host.state").display(),
        pw = lab.password_file(0o600).display(),
    );
    Config::parse("/lab/havirt.toml", &text).expect("test config loads").0
}

#[test]
fn chains_are_built_from_the_config_and_found_by_action_fields() {
    let lab = Lab::new("chain");
    fs::write(lab.path("host.state"), "on\n").expect("state");
    let config = config(&lab);
    assert!(matches!(config.hosts[0].fence[0].method, FenceMethod::Command { .. }));
    let fencers = Fencers::from_config(&config, &lab.env);
    let chain = fencers.chain(HostId(1)).expect("h1 chain");
    assert_eq!((chain.host(), chain.names()), ("h1", vec!["fake", "storage"]));
    assert!(chain.preflight().iter().all(|(_, r)| r.is_ok()), "{:?}", chain.preflight());

    // What the daemon does with Action::Fence { target: h1, agent: "fake" }.
    let agent = fencers.agent(HostId(1), "fake").expect("agent");
    let result = std::thread::spawn(move || agent.off(ms(DEADLINE_MS))).join().expect("fence thread");
    assert_eq!(result, Ok(FenceOutcome::Confirmed));
    assert_eq!(read(lab.path("host.state")).trim(), "off");

    let storage = chain.off("storage", ms(DEADLINE_MS));
    assert_eq!(outcome(&storage), FenceOutcome::Requested, "a poison request, never a confirmation");
    let msg = storage.map(|_| String::new()).unwrap_or_else(|e| e.to_string());
    assert!(msg.contains("poison is confirmed only by host_dead_timeout"), "{msg}");

    let unknown = fencers.agent(HostId(2), "fake").map(|_| ());
    assert_eq!(
        unknown,
        Err(FenceError::UnknownAgent { host: "h2".into(), agent: "fake".into(), known: "libvirt".into() })
    );
    assert_eq!(fencers.agent(HostId(9), "fake").map(|_| ()), Err(FenceError::UnknownHost { host: HostId(9) }));
    let libvirt = build_agent(&config.hosts[1].fence[0], &lab.env);
    assert_eq!(libvirt.name(), "libvirt");
}

// ---------------------------------------------------------------- watchdogs

#[test]
fn lab_watchdog_pets_arrive_on_a_real_datagram_socket() {
    let lab = Lab::new("watchdog-lab");
    let path = lab.path("h1.sock");
    let supervisor = UnixDatagram::bind(&path).expect("bind supervisor socket");
    supervisor.set_read_timeout(Some(ms(DEADLINE_MS))).expect("read timeout");
    let recv = || {
        let mut buf = [0u8; watchdog::LAB_DATAGRAM_MAX_BYTES];
        let n = supervisor.recv(&mut buf).expect("datagram");
        String::from_utf8_lossy(&buf[..n]).into_owned()
    };
    let mut w = LabWatchdog::open(&path, Duration::from_secs(10)).expect("lab watchdog");
    assert_eq!(recv(), "pet 10000\n", "open arms with a first pet");
    assert!(w.resets_host() && w.timeout() == Some(Duration::from_secs(10)));
    for _ in 0..3 {
        w.pet().expect("pet");
        assert_eq!(recv(), "pet 10000\n");
    }
    w.disarm().expect("disarm");
    assert_eq!(recv(), "disarm\n");
    assert_eq!(w.pet(), Err(WatchdogError::Disarmed));

    let mut boxed =
        watchdog::open(&WatchdogConfig::Lab { socket: path.clone() }, Duration::from_secs(4)).expect("open lab");
    assert_eq!(recv(), "pet 4000\n");
    boxed.pet().expect("pet");
    assert_eq!(recv(), "pet 4000\n");
}

#[test]
fn lab_watchdog_without_supervisor_fails_with_the_socket_named() {
    let lab = Lab::new("watchdog-lab-missing");
    let path = lab.path("nobody.sock");
    let e = LabWatchdog::open(&path, Duration::from_secs(10)).map(|_| ()).expect_err("no supervisor");
    assert!(matches!(&e, WatchdogError::LabSend { socket, .. } if *socket == path), "{e}");
    assert!(e.to_string().contains("supervisor"), "{e}");
}

#[test]
fn no_watchdog_never_fails_and_resets_nothing() {
    let mut w = watchdog::open(&WatchdogConfig::None, Duration::from_secs(10)).expect("none");
    assert_eq!((w.pet(), w.disarm(), w.pet()), (Ok(()), Ok(()), Ok(())));
    assert!(!w.resets_host() && w.timeout().is_none());
    let mut n = NoWatchdog;
    assert_eq!(n.pet(), Ok(()));
}

#[test]
fn systemd_watchdog_without_notify_socket_does_not_fail() {
    if std::env::var_os("NOTIFY_SOCKET").is_some() {
        return; // running under systemd: the pet would really go there
    }
    let mut w = SystemdWatchdog::new();
    assert_eq!((w.pet(), w.pet(), w.disarm()), (Ok(()), Ok(()), Ok(())));
    if std::env::var_os("WATCHDOG_USEC").is_none() {
        assert_eq!(w.timeout(), None);
        let refused = watchdog::open(&WatchdogConfig::Systemd, Duration::from_secs(10)).map(|_| ());
        assert_eq!(refused, Err(WatchdogError::SystemdNotEnabled));
    }
}

/// Set for the child run of [`systemd_watchdog_child`].
const CHILD_MARK: &str = "HAVIRT_FENCE_TEST_SYSTEMD_CHILD";

#[test]
fn systemd_watchdog_pets_the_notify_socket() {
    let lab = Lab::new("watchdog-systemd");
    let path = lab.path("notify.sock");
    let systemd = UnixDatagram::bind(&path).expect("bind notify socket");
    systemd.set_read_timeout(Some(ms(DEADLINE_MS))).expect("read timeout");
    // The environment is the process's: run this test binary again with it.
    let exe = std::env::current_exe().expect("test binary");
    let out = std::process::Command::new(exe)
        .args(["systemd_watchdog_child", "--exact", "--ignored", "--nocapture", "--test-threads=1"])
        .env(CHILD_MARK, "1")
        .env("NOTIFY_SOCKET", &path)
        .env("WATCHDOG_USEC", "4000000")
        .env_remove("WATCHDOG_PID")
        .output()
        .expect("run child");
    assert!(out.status.success(), "child: {}", String::from_utf8_lossy(&out.stdout));
    let mut buf = [0u8; 256];
    for _ in 0..2 {
        let n = systemd.recv(&mut buf).expect("WATCHDOG=1 datagram");
        assert_eq!(&buf[..n], b"WATCHDOG=1\n");
    }
}

#[test]
#[ignore = "run by systemd_watchdog_pets_the_notify_socket in a child process with NOTIFY_SOCKET set"]
fn systemd_watchdog_child() {
    if std::env::var_os(CHILD_MARK).is_none() {
        return;
    }
    let mut w = SystemdWatchdog::new();
    assert_eq!(w.timeout(), Some(Duration::from_secs(4)));
    assert!(w.resets_host());
    w.pet().expect("pet");
    let too_long = watchdog::open(&WatchdogConfig::Systemd, Duration::from_secs(3)).map(|_| ());
    assert_eq!(too_long, Err(WatchdogError::SystemdTimeoutTooLong { interval_ms: 4000, limit_ms: 3000 }));
    let mut boxed = watchdog::open(&WatchdogConfig::Systemd, Duration::from_secs(10)).expect("systemd watchdog");
    boxed.pet().expect("pet through open()");
}

#[test]
fn device_watchdog_missing_device_is_a_clear_error() {
    let path = PathBuf::from("/dev/watchdog-havirt-test-missing");
    let e = DeviceWatchdog::open(&path, Duration::from_secs(10)).map(|_| ()).expect_err("no device here");
    assert!(matches!(&e, WatchdogError::DeviceOpen { path: p, .. } if *p == path), "{e}");
    let msg = e.to_string();
    assert!(msg.contains("softdog") && msg.contains("watchdog = \"systemd\""), "{msg}");
    let via_config =
        watchdog::open(&WatchdogConfig::Device { device: path.clone() }, Duration::from_secs(10)).map(|_| ());
    assert!(matches!(via_config, Err(WatchdogError::DeviceOpen { .. })));
}

#[test]
fn device_watchdog_refuses_a_character_device_that_is_no_watchdog() {
    // /dev/null opens like a watchdog but answers no watchdog ioctl: the
    // open is undone (magic close) and refused.
    let e = DeviceWatchdog::open(Path::new("/dev/null"), Duration::from_secs(10)).map(|_| ());
    assert!(matches!(&e, Err(WatchdogError::DeviceIoctl { op, .. }) if op.contains("WDIOC_SETTIMEOUT")), "{e:?}");
}
