//! A lab host (LAB-NOTES.md, "Several hosts on one machine"): network
//! namespace hl-hN, a private mount namespace (slave: mounts made later
//! under a shared mount, the datastore, are seen) and a private PID
//! namespace whose init is `tini`, running virtlogd, libvirtd and, when
//! configured, a daemon (havirt's). `LAB_DIR/hN/start` runs it in the
//! foreground and is the host's power.
//!
//! The host's processes are found in /proc by namespace, never remembered:
//! a host powered on by its BMC is seen and powered off the same way.
//! `pause` freezes the host with SIGSTOP to every process of its PID
//! namespace (no cgroup to create and remove), `resume` sends SIGCONT.

use super::LAB_DIR;
use super::faultfs::NETNS_DIR;
use super::net::{check_host, host_ns};
use super::sys::{self, LabError, io_error, run, run_args, wait_for};
use std::fs::{self, OpenOptions};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::Duration;

/// After `power_on`, the host's init must exist within this.
pub const POWER_ON_WAIT: Duration = Duration::from_secs(5);
/// After SIGKILL of the init, every process of the host must be gone
/// within this (a process in D state on a hung datastore stays longer).
pub const POWER_OFF_WAIT: Duration = Duration::from_secs(5);
/// Bound on waiting for killed daemons to be gone.
pub const KILL_WAIT: Duration = Duration::from_secs(5);
pub const POLL: Duration = Duration::from_millis(10);
/// libvirtd and the daemon inside a host are restarted this long after they
/// die (`sleep`'s argument: havirt.service's RestartSec, 500 ms).
pub const RESPAWN_DELAY_S: &str = "0.5";
const LIBVIRT_POLL: Duration = Duration::from_millis(50);
/// `pause` repeats its sweep while processes appear (forks) during it.
const PAUSE_SWEEPS_MAX: usize = 10;
/// The host's state directories, bind-mounted over libvirt's paths inside
/// (each mount point made when missing: see `inner_script`).
const STATE_DIRS: [(&str, &str); 5] = [
    ("run", "/run/libvirt"),
    ("lib", "/var/lib/libvirt"),
    ("log", "/var/log/libvirt"),
    ("cache", "/var/cache/libvirt"),
    ("etc", "/etc/libvirt"),
];

#[derive(Debug, Clone, Default)]
pub struct HostOptions {
    /// The daemon the host runs after libvirtd (havirt's, with its
    /// arguments), its output appended to `LAB_DIR/hN/havirt.log`; None:
    /// libvirtd only.
    pub daemon: Option<Vec<String>>,
    /// Run (repeatedly, until every process of the host is gone) when the
    /// host has lost power: the lab's faultfs `abort` of the host's waiting
    /// storage requests, which a process in D state needs to die.
    pub power_off_hook: Option<Vec<String>>,
    /// The host's block devices (`LAB_DIR/hN/disks`, lun.rs) are bound
    /// over `LAB_DIR/disks` inside it (`--datastore block`).
    pub disks: bool,
}

/// Host N of the lab. Holds only the `start` process it spawned (to reap it).
#[derive(Debug)]
pub struct Host {
    n: u16,
    dir: PathBuf,
    opts: HostOptions,
    start: Option<Child>,
}

/// Quotes `s` for sh (single quotes; a quote inside becomes '\'').
fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

impl Host {
    pub fn new(n: u16, opts: HostOptions) -> Result<Host, LabError> {
        check_host(n)?;
        Ok(Host { n, dir: Path::new(LAB_DIR).join(format!("h{n}")), opts, start: None })
    }

    pub fn number(&self) -> u16 {
        self.n
    }

    /// `LAB_DIR/hN`.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn netns(&self) -> String {
        host_ns(self.n)
    }

    /// libvirt of this host from outside it.
    pub fn libvirt_uri(&self) -> String {
        format!("qemu:///system?socket={}/run/libvirt-sock", self.dir.display())
    }

    /// Makes the state directories (etc/ copied from /etc/libvirt once,
    /// without its domains, with `cgroup_controllers = [ ]`, which two
    /// hosts running the same domain need) and writes `start`.
    pub fn prepare(&self) -> Result<(), LabError> {
        for (sub, _) in STATE_DIRS.iter().filter(|(s, _)| *s != "etc") {
            let path = self.dir.join(sub);
            fs::create_dir_all(&path).map_err(io_error(&path))?;
        }
        let etc = self.dir.join("etc");
        if !etc.exists() {
            run_args("cp", &[Path::new("-a"), Path::new("/etc/libvirt"), &etc])?;
            // Nothing another libvirtd of this machine defined or marked
            // for autostart: domains, and networks (a lab host would start
            // the machine's NAT network, with its dnsmasq, in its netns).
            for dir in ["qemu", "qemu/autostart", "qemu/networks", "qemu/networks/autostart"] {
                let dir = etc.join(dir);
                for entry in fs::read_dir(&dir).into_iter().flatten().flatten() {
                    if entry.path().extension().is_some_and(|e| e == "xml") {
                        fs::remove_file(entry.path()).map_err(io_error(&entry.path()))?;
                    }
                }
            }
            let conf = etc.join("qemu.conf");
            let mut text = fs::read_to_string(&conf).map_err(io_error(&conf))?;
            text.push_str("\n# havirt lab: hosts share cgroup paths otherwise\ncgroup_controllers = [ ]\n");
            // qemu as root: libvirt cannot tell that faultfs (FUSE) is
            // shared, so after a live migration the source would give the
            // images back to root and the target's qemu (libvirt-qemu)
            // could not reopen them. On NFS libvirt knows and leaves them.
            text.push_str("user = \"root\"\ngroup = \"root\"\n");
            fs::write(&conf, text).map_err(io_error(&conf))?;
            // Live migration between lab hosts (maintenance mode): libvirt
            // over TCP on the host's heartbeat address (`libvirtd -l`), and
            // a host UUID of its own (libvirt refuses to migrate to a host
            // with its own UUID, and all lab hosts share this machine's).
            let conf = etc.join("libvirtd.conf");
            let mut text = fs::read_to_string(&conf).map_err(io_error(&conf))?;
            text.push_str(&format!(
                "\n# havirt lab: migration over the lab network\nlisten_tls = 0\nlisten_tcp = 1\n\
                 listen_addr = \"{}\"\nauth_tcp = \"none\"\nhost_uuid = \"00000000-0000-4000-8000-{:012}\"\n",
                super::net::heartbeat_addr(self.n),
                self.n
            ));
            fs::write(&conf, text).map_err(io_error(&conf))?;
        }
        let qemu = self.dir.join("lib/qemu");
        fs::create_dir_all(&qemu).map_err(io_error(&qemu))?;
        run_args("chown", &[Path::new("libvirt-qemu"), &qemu])?;
        let start = self.dir.join("start");
        fs::write(&start, self.start_script()).map_err(io_error(&start))?;
        fs::set_permissions(&start, fs::Permissions::from_mode(0o755)).map_err(io_error(&start))
    }

    /// What runs inside the namespaces, as PID 1's child.
    fn inner_script(&self) -> String {
        let r = self.dir.display();
        // Each mount point is made first: on a machine where no libvirtd
        // ever ran, /run/libvirt does not exist (libvirtd makes it at its
        // first start), and the lab must not depend on one having run
        // (issue 12). The directory is made on the machine's filesystem
        // (a mount namespace shares it), empty, as libvirtd would make it.
        let mut lines: Vec<String> = STATE_DIRS
            .iter()
            .map(|(sub, target)| format!("mkdir -p {target} && mount --bind {r}/{sub} {target}"))
            .collect();
        // Every boot of every host has a boot id of its own, as real machines
        // do (they all share this machine's kernel): a lease belongs to a
        // (host, boot), and a rebooted host must not take its old leases for
        // its own (DESIGN.md §1, Incarnation).
        lines.push(format!("mount --bind {r}/run/boot_id /proc/sys/kernel/random/boot_id"));
        if self.opts.disks {
            let shared = Path::new(LAB_DIR).join(super::lun::DISKS_DIR);
            lines.push(format!("mkdir -p {0} && mount --bind {r}/{1} {0}", shared.display(), super::lun::DISKS_DIR));
        }
        lines.push("virtlogd -d -p /run/libvirt/virtlogd.pid".into());
        // libvirtd and the daemon are restarted RESPAWN_DELAY_S after they
        // die, as systemd does on a server (Restart=always, RestartSec=500ms).
        // `set +e`: the script runs under `sh -e`, and a killed daemon's
        // status would end the loop. Each loop is orphaned at once, so tini reaps it and killing it
        // leaves the host up (tini exits, powering the host off, only when
        // its own child, `sleep`, does).
        lines.push(format!(
            "(set +e; while :; do libvirtd -l -p /run/libvirt/libvirtd.pid; sleep {RESPAWN_DELAY_S}; done </dev/null >>{r}/libvirtd.log 2>&1 &)"
        ));
        if let Some(daemon) = &self.opts.daemon {
            let argv: Vec<String> = daemon.iter().map(|a| quote(a)).collect();
            lines.push(format!(
                "(set +e; while :; do {}; sleep {RESPAWN_DELAY_S}; done </dev/null >>{r}/havirt.log 2>&1 &)",
                argv.join(" ")
            ));
        }
        lines.push("exec sleep infinity".into());
        lines.join("\n")
    }

    /// The power script: runs the host in the foreground; SIGTERM or
    /// SIGINT (ipmi_sim's power off) SIGKILLs the PID namespace's init,
    /// and unshare's --kill-child does too when unshare dies.
    fn start_script(&self) -> String {
        let (r, n, ns) = (self.dir.display(), self.n, self.netns());
        let inner = quote(&self.inner_script());
        let hook = match &self.opts.power_off_hook {
            // Until every process of the host is gone (bounded: 100 x 20 ms,
            // well within ipmi_sim's kill_wait of 1 s).
            Some(argv) => format!(
                "i=0\nwhile [ -n \"$(ip netns pids {ns})\" ] && [ $i -lt 100 ]; do\n    {} >/dev/null 2>&1\n    sleep 0.02; i=$((i+1))\ndone\n",
                argv.iter().map(|a| quote(a)).collect::<Vec<_>>().join(" ")
            ),
            None => String::new(),
        };
        format!(
            "#!/bin/sh
# Lab host {n}'s power (written by havirt::lab::host): runs the host in the
# foreground. SIGTERM or SIGINT is a power cut: SIGKILL of the host's PID
# namespace init (unshare --fork ignores SIGTERM). Each start is a reboot:
# run/ starts empty (with a new boot id); definitions in lib/ and etc/ persist. The host's NICs
# (eth0, eth1) have link only while it runs: an off host does not answer.
PATH=/usr/sbin:/usr/bin:/sbin:/bin
export PATH
links() {{ ip -n {ns} link set eth0 $1; ip -n {ns} link set eth1 $1; }}
rm -rf {r}/run && mkdir -p {r}/run
cat /proc/sys/kernel/random/uuid > {r}/run/boot_id
links up
ip netns exec {ns} unshare -m -p -f --kill-child --propagation slave --mount-proc \\
    tini -s -- sh -ec {inner} &
outer=$!
cut() {{
    links down
    for init in $(cat /proc/$outer/task/*/children 2>/dev/null); do kill -KILL $init 2>/dev/null; done
    kill -KILL $outer 2>/dev/null
}}
trap cut TERM INT
wait $outer
rc=$?
wait $outer 2>/dev/null
links down
{hook}exit $rc
"
        )
    }

    /// Spawns `start` in a session of its own (output appended to
    /// `LAB_DIR/hN/console.log`) and waits until the host's init exists.
    pub fn power_on(&mut self) -> Result<(), LabError> {
        if self.is_on() {
            return Err(LabError::State { what: format!("host {} is already on", self.n) });
        }
        self.reap_start();
        let log_path = self.dir.join("console.log");
        let log = OpenOptions::new().create(true).append(true).open(&log_path).map_err(io_error(&log_path))?;
        let err = log.try_clone().map_err(io_error(&log_path))?;
        let start = self.dir.join("start");
        let child = Command::new("setsid")
            .arg(&start)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(err)
            .spawn()
            .map_err(|source| LabError::Spawn { command: format!("setsid {}", start.display()), source })?;
        self.start = Some(child);
        let what = || format!("host {} powering on (its init)", self.n);
        sys::wait_for_logged(what, &log_path, POWER_ON_WAIT, POLL, || self.is_on())
    }

    /// Where the host's libvirtd (and virtlogd) write their output.
    pub fn libvirtd_log(&self) -> PathBuf {
        self.dir.join("libvirtd.log")
    }

    /// SIGKILL of the host's init: every process of the host dies at once,
    /// and its NICs lose link.
    /// Returns when all are gone (bounded by `POWER_OFF_WAIT`); a host
    /// already off is not an error.
    pub fn power_off(&mut self) -> Result<(), LabError> {
        if let Some(init) = self.init_pid() {
            // No link from the moment of the cut, as `start` does (the
            // script may not be ours: a BMC may have started it).
            self.links("down")?;
            let pidns = sys::ns_inode(&sys::proc_path(init, "ns/pid"));
            sys::signal(init, libc::SIGKILL);
            if let Some(ino) = pidns {
                let what = || format!("host {}: every process gone after SIGKILL of its init", self.n);
                wait_for(what, POWER_OFF_WAIT, POLL, || sys::pids_in_ns("pid", ino).is_empty())?;
            }
        }
        if let Some(mut child) = self.start.take() {
            let what = || format!("host {}: its start script exiting", self.n);
            wait_for(what, POWER_OFF_WAIT, POLL, || child.try_wait().map_or(true, |s| s.is_some()))?;
        }
        Ok(())
    }

    fn links(&self, state: &str) -> Result<(), LabError> {
        for dev in ["eth0", "eth1"] {
            run_args("ip", &["-n", &self.netns(), "link", "set", dev, state])?;
        }
        Ok(())
    }

    fn reap_start(&mut self) {
        if let Some(child) = &mut self.start
            && child.try_wait().map_or(true, |s| s.is_some())
        {
            self.start = None;
        }
    }

    pub fn is_on(&self) -> bool {
        self.init_pid().is_some()
    }

    /// The host's init (tini, pid 1 in its PID namespace), in our PID
    /// namespace: the process of its netns whose inner pid is 1.
    pub fn init_pid(&self) -> Option<u32> {
        let net = sys::ns_inode(&Path::new(NETNS_DIR).join(self.netns()))?;
        sys::pids_in_ns("net", net).into_iter().find(|p| sys::inner_pid(*p) == Some(1))
    }

    /// Every process of the host (its PID namespace), ascending.
    pub fn pids(&self) -> Vec<u32> {
        let Some(init) = self.init_pid() else {
            return Vec::new();
        };
        sys::ns_inode(&sys::proc_path(init, "ns/pid")).map(|ino| sys::pids_in_ns("pid", ino)).unwrap_or_default()
    }

    /// Waits until libvirtd answers on `libvirt_uri`. Bounded even when
    /// the host is paused (a connection to a stopped libvirtd waits
    /// forever): the tries run on a thread of their own, left behind on
    /// timeout until its try returns.
    pub fn wait_libvirt(&self, timeout: Duration) -> Result<(), LabError> {
        let uri = self.libvirt_uri();
        // Each refused try would be printed on stderr (process-wide, as
        // src/hypervisor does): errors are values here.
        virt::error::clear_error_callback();
        let what = format!("libvirtd of host {} answering on {uri}", self.n);
        let (tx, rx) = mpsc::channel();
        let spawned = std::thread::Builder::new().name(format!("hl-h{}-libvirt", self.n)).spawn(move || {
            let answered = wait_for(
                || what,
                timeout,
                LIBVIRT_POLL,
                || virt::connect::Connect::open(Some(&uri)).is_ok_and(|mut c| c.close().is_ok()),
            );
            let _ = tx.send(answered);
        });
        spawned.map_err(|source| LabError::Io { path: self.dir.clone(), source })?;
        let answered = rx.recv_timeout(timeout + LIBVIRT_POLL).unwrap_or_else(|_| {
            Err(LabError::Timeout {
                what: format!("host {}: a libvirt connection returning", self.n),
                waited_ms: timeout.as_millis(),
            })
        });
        answered.map_err(|e| sys::with_log(e, &self.libvirtd_log()))
    }

    /// Runs `cmd` inside the host (its mount, network and PID namespaces;
    /// libvirt there is plain `qemu:///system`). Any exit status is
    /// returned; an error means the host is off or nsenter failed to run.
    pub fn exec(&self, cmd: &[&str]) -> Result<Output, LabError> {
        let init = self.init_pid().ok_or_else(|| self.off())?;
        let mut c = Command::new("nsenter");
        c.args(["-t", &init.to_string(), "-m", "-n", "-p", "--"]).args(cmd).stdin(Stdio::null());
        c.output().map_err(|source| LabError::Spawn { command: format!("nsenter ... {}", cmd.join(" ")), source })
    }

    /// Like `exec`, but a non-zero exit is an error with its stderr.
    pub fn exec_ok(&self, cmd: &[&str]) -> Result<Output, LabError> {
        let init = self.init_pid().ok_or_else(|| self.off())?;
        run(Command::new("nsenter").args(["-t", &init.to_string(), "-m", "-n", "-p", "--"]).args(cmd))
    }

    fn off(&self) -> LabError {
        LabError::State { what: format!("host {} is off", self.n) }
    }

    /// Freezes every process of the host (SIGSTOP), until `resume`.
    pub fn pause(&self) -> Result<(), LabError> {
        for _ in 0..PAUSE_SWEEPS_MAX {
            let running: Vec<u32> =
                self.pids().into_iter().filter(|p| !matches!(sys::state(*p), Some('T' | 'Z') | None)).collect();
            if running.is_empty() {
                return if self.is_on() { Ok(()) } else { Err(self.off()) };
            }
            for pid in running {
                sys::signal(pid, libc::SIGSTOP);
            }
            std::thread::sleep(POLL);
        }
        Err(LabError::Timeout { what: format!("host {}: every process stopped", self.n), waited_ms: 0 })
    }

    pub fn resume(&self) -> Result<(), LabError> {
        let pids = self.pids();
        if pids.is_empty() {
            return Err(self.off());
        }
        for pid in pids {
            sys::signal(pid, libc::SIGCONT);
        }
        Ok(())
    }

    /// SIGKILLs the host's daemon (the process whose arguments are
    /// `HostOptions::daemon`); the host stays up. Returns how many died.
    pub fn kill_daemon(&self) -> Result<usize, LabError> {
        let Some(daemon) = self.opts.daemon.clone() else {
            return Ok(0);
        };
        self.kill_where("its daemon", |argv| *argv == daemon)
    }

    /// SIGKILLs the host's libvirtd; the host (and its qemu) stays up.
    pub fn kill_libvirtd(&self) -> Result<usize, LabError> {
        self.kill_where("libvirtd", |argv| argv.first().is_some_and(|a| Path::new(a).ends_with("libvirtd")))
    }

    fn kill_where(&self, what: &str, matches: impl Fn(&[String]) -> bool) -> Result<usize, LabError> {
        let found = || -> Vec<u32> { self.pids().into_iter().filter(|p| matches(&sys::cmdline(*p))).collect() };
        let victims = found();
        for pid in &victims {
            sys::signal(*pid, libc::SIGKILL);
        }
        let describe = || format!("host {}: {what} gone after SIGKILL", self.n);
        wait_for(describe, KILL_WAIT, POLL, || found().is_empty())?;
        Ok(victims.len())
    }
}

/// Makes `path` (the datastore mount point, LAB_DIR/ds) a shared mount,
/// bind-mounting it on itself first when it is no mount point: a mount made
/// under it later (faultfs) then reaches every host started afterwards.
/// Call before the hosts start.
pub fn share_datastore_mount(path: &Path) -> Result<(), LabError> {
    fs::create_dir_all(path).map_err(io_error(path))?;
    if !is_mount_point(path)? {
        run_args("mount", &[Path::new("--bind"), path, path])?;
    }
    run_args("mount", &[Path::new("--make-rshared"), path]).map(drop)
}

fn is_mount_point(path: &Path) -> Result<bool, LabError> {
    let info = Path::new("/proc/self/mountinfo");
    let text = fs::read_to_string(info).map_err(io_error(info))?;
    let want = path.to_string_lossy();
    Ok(text.lines().any(|l| l.split(' ').nth(4) == Some(&*want)))
}
