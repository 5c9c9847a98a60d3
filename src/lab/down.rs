//! `down`: removes everything the lab made, found by name and path, never
//! by remembering, so it works after a killed test, twice, or on a clean
//! machine.

use super::LAB_DIR;
use super::faultfs::{self, NETNS_DIR};
use super::sys::{self, LabError, io_error, run_args, wait_for};
use std::fmt;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Every killed process must be gone within this (D state on a hung
/// datastore is released by clearing faults and by killing faultfs).
pub const KILL_WAIT: Duration = Duration::from_secs(10);
const POLL: Duration = Duration::from_millis(10);
/// The report shows this much of a killed process's arguments.
const DESCRIBE_MAX_CHARS: usize = 100;
/// Unmount sweeps (stacked mounts need one each).
const UNMOUNT_SWEEPS_MAX: usize = 10;
/// faultfs's control socket, whose faults are cleared first.
pub const FAULTFS_SOCKET: &str = "faultfs.sock";
/// Prefix of every name the lab creates.
pub const NAME_PREFIX: &str = "hl-";

/// What `down` removed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct DownReport {
    pub faults_cleared: bool,
    /// "PID ARGV" of each process killed.
    pub killed: Vec<String>,
    /// "DEVICE (BACKING FILE)" of each loop device detached (lun.rs).
    pub loops: Vec<String>,
    pub unmounted: Vec<PathBuf>,
    pub netns: Vec<String>,
    pub removed_dir: bool,
}

impl DownReport {
    pub fn is_empty(&self) -> bool {
        *self == DownReport::default()
    }
}

impl fmt::Display for DownReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_empty() {
            return write!(f, "lab down: nothing to remove");
        }
        writeln!(f, "lab down: faults cleared: {}", self.faults_cleared)?;
        for p in &self.killed {
            writeln!(f, "killed {p}")?;
        }
        for l in &self.loops {
            writeln!(f, "detached {l}")?;
        }
        for m in &self.unmounted {
            writeln!(f, "unmounted {}", m.display())?;
        }
        for n in &self.netns {
            writeln!(f, "deleted netns {n}")?;
        }
        write!(f, "removed {LAB_DIR}: {}", self.removed_dir)
    }
}

/// Removes the lab: clears faultfs faults, kills every process in an hl-*
/// netns or whose cwd or arguments are under LAB_DIR, detaches the lab's
/// loop devices (a crashed run's too), unmounts everything
/// under LAB_DIR (lazily, deepest first), deletes the hl-* netns and
/// LAB_DIR. Safe to run twice, and when nothing exists.
pub fn down() -> Result<DownReport, LabError> {
    let mut report = DownReport::default();
    let socket = Path::new(LAB_DIR).join(FAULTFS_SOCKET);
    if socket.exists() {
        report.faults_cleared = faultfs::control(&socket, "ok").is_ok();
    }
    report.killed = kill_lab_processes()?;
    // Before the unmount: their backing files hold faultfs busy.
    report.loops = super::lun::detach_all()?;
    report.unmounted = unmount_all()?;
    for ns in lab_netns() {
        run_args("ip", &["netns", "del", &ns])?;
        report.netns.push(ns);
    }
    if Path::new(LAB_DIR).exists() {
        fs::remove_dir_all(LAB_DIR).map_err(io_error(Path::new(LAB_DIR)))?;
        report.removed_dir = true;
    }
    Ok(report)
}

/// Names in NETNS_DIR starting with `NAME_PREFIX`, sorted.
fn lab_netns() -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(NETNS_DIR)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| n.starts_with(NAME_PREFIX))
        .collect();
    names.sort();
    names
}

/// This process and its ancestors: never killed (a shell whose cwd is
/// under LAB_DIR may run `lab down`).
fn spared() -> Vec<u32> {
    let mut out = vec![std::process::id()];
    while let Some(&pid) = out.last() {
        let stat = fs::read_to_string(sys::proc_path(pid, "stat")).unwrap_or_default();
        // After the ")" closing comm: state, then ppid.
        let ppid = stat.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().nth(1)?.parse().ok());
        match ppid {
            Some(p) if p > 1 && !out.contains(&p) => out.push(p),
            _ => break,
        }
    }
    out
}

fn lab_processes() -> Vec<u32> {
    let inodes: Vec<u64> = lab_netns().iter().filter_map(|n| sys::ns_inode(&Path::new(NETNS_DIR).join(n))).collect();
    let spared = spared();
    sys::pids()
        .into_iter()
        .filter(|p| !spared.contains(p))
        .filter(|p| {
            let in_netns = sys::ns_inode(&sys::proc_path(*p, "ns/net")).is_some_and(|i| inodes.contains(&i));
            let cwd = fs::read_link(sys::proc_path(*p, "cwd")).is_ok_and(|c| c.starts_with(LAB_DIR));
            in_netns || cwd || sys::cmdline(*p).iter().any(|a| a.contains(LAB_DIR))
        })
        .collect()
}

fn kill_lab_processes() -> Result<Vec<String>, LabError> {
    let mut killed = Vec::new();
    let mut seen: Vec<u32> = Vec::new();
    let what = || "lab down: every lab process gone".to_string();
    wait_for(what, KILL_WAIT, POLL, || {
        let found = lab_processes();
        // Described before any is killed: killing one (unshare) kills
        // others (the host's init and all below it).
        for pid in &found {
            if !seen.contains(pid) {
                seen.push(*pid);
                killed.push(describe(*pid));
            }
        }
        for pid in &found {
            sys::signal(*pid, libc::SIGKILL);
        }
        found.is_empty()
    })?;
    Ok(killed)
}

/// "PID ARGV" on one line, at most `DESCRIBE_MAX_CHARS` long.
fn describe(pid: u32) -> String {
    let argv = sys::cmdline(pid).join(" ").replace('\n', "; ");
    let short: String = argv.chars().take(DESCRIBE_MAX_CHARS).collect();
    let more = if short.len() < argv.len() { "..." } else { "" };
    format!("{pid} {short}{more}")
}

/// Mount points under LAB_DIR in our mount namespace, deepest first.
fn lab_mounts() -> Result<Vec<PathBuf>, LabError> {
    let info = Path::new("/proc/self/mountinfo");
    let text = fs::read_to_string(info).map_err(io_error(info))?;
    let mut mounts: Vec<PathBuf> = text
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(PathBuf::from)
        .filter(|p| p.starts_with(LAB_DIR))
        .collect();
    mounts.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    Ok(mounts)
}

fn unmount_all() -> Result<Vec<PathBuf>, LabError> {
    let mut unmounted = Vec::new();
    for _ in 0..UNMOUNT_SWEEPS_MAX {
        let mounts = lab_mounts()?;
        if mounts.is_empty() {
            return Ok(unmounted);
        }
        for m in mounts {
            // A mount already detached with its parent fails (EINVAL): the
            // next sweep judges.
            if nix::mount::umount2(&m, nix::mount::MntFlags::MNT_DETACH).is_ok() {
                unmounted.push(m);
            }
        }
    }
    Err(LabError::State { what: format!("mounts under {LAB_DIR} remain after {UNMOUNT_SWEEPS_MAX} sweeps") })
}
