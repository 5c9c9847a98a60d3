//! What the lab's builders share: `LabError`, running a tool with its
//! failure reported in full, signals, and finding processes by namespace.
//!
//! Processes are always found in /proc by what they are (their network or
//! PID namespace, their cmdline), never remembered: a host started by its
//! BMC, or a lab left by a killed test, is found the same way.

use std::ffi::OsStr;
use std::fs;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

#[derive(Debug, thiserror::Error)]
pub enum LabError {
    #[error("`{command}` failed ({status}): {stderr}")]
    Command { command: String, status: String, stderr: String },
    #[error("cannot run `{command}`: {source} (is it installed? .ci/run lists the lab's Debian packages)")]
    Spawn { command: String, source: io::Error },
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("host number {host} is out of range: lab hosts are numbered 1..={max}")]
    BadHost { host: u16, max: u16 },
    #[error("{what}: not done within {waited_ms} ms")]
    Timeout { what: String, waited_ms: u128 },
    /// A wait that failed with the log that says why (its path and end).
    #[error("{what}: not done within {waited_ms} ms; see {}, which ends with:\n{tail}", log.display())]
    TimeoutSee { what: String, waited_ms: u128, log: PathBuf, tail: String },
    /// A step that failed with the log that says why (its path and end).
    #[error("{what}; see {}, which ends with:\n{tail}", log.display())]
    FailedSee { what: String, log: PathBuf, tail: String },
    #[error("{what}")]
    State { what: String },
}

pub(crate) fn io_error(path: &Path) -> impl FnOnce(io::Error) -> LabError + '_ {
    move |source| LabError::Io { path: path.to_path_buf(), source }
}

fn describe(cmd: &Command) -> String {
    let mut parts = vec![cmd.get_program().to_string_lossy().into_owned()];
    parts.extend(cmd.get_args().map(|a| a.to_string_lossy().into_owned()));
    parts.join(" ")
}

/// Runs `cmd` to completion with no stdin; a non-zero exit is
/// `LabError::Command` with the command line and its stderr.
pub(crate) fn run(cmd: &mut Command) -> Result<Output, LabError> {
    let command = describe(cmd);
    let out =
        cmd.stdin(Stdio::null()).output().map_err(|source| LabError::Spawn { command: command.clone(), source })?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr).trim().to_string();
        return Err(LabError::Command { command, status: out.status.to_string(), stderr });
    }
    Ok(out)
}

/// `run` of a program and its arguments.
pub(crate) fn run_args<S: AsRef<OsStr>>(program: &str, args: &[S]) -> Result<Output, LabError> {
    run(Command::new(program).args(args))
}

/// Sends `sig` to `pid`; a process already gone is not an error (callers
/// kill what they just found, which may exit meanwhile).
pub(crate) fn signal(pid: u32, sig: libc::c_int) {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return;
    };
    if pid > 0 {
        // SAFETY: kill(2) takes plain integers and touches no memory of ours.
        let _ = unsafe { libc::kill(pid, sig) };
    }
}

/// The inode of a namespace file (/run/netns/NAME or /proc/PID/ns/KIND).
pub(crate) fn ns_inode(path: &Path) -> Option<u64> {
    fs::metadata(path).ok().map(|m| m.ino())
}

/// Every pid in /proc, ascending.
pub(crate) fn pids() -> Vec<u32> {
    let mut out: Vec<u32> = fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .collect();
    out.sort_unstable();
    out
}

/// Pids whose namespace of `kind` ("net", "pid") has inode `ino`.
pub(crate) fn pids_in_ns(kind: &str, ino: u64) -> Vec<u32> {
    pids().into_iter().filter(|p| ns_inode(&proc_path(*p, &format!("ns/{kind}"))) == Some(ino)).collect()
}

pub(crate) fn proc_path(pid: u32, what: &str) -> PathBuf {
    PathBuf::from(format!("/proc/{pid}/{what}"))
}

/// A process's arguments (empty for kernel threads and zombies).
pub(crate) fn cmdline(pid: u32) -> Vec<String> {
    let raw = fs::read(proc_path(pid, "cmdline")).unwrap_or_default();
    raw.split(|b| *b == 0).filter(|a| !a.is_empty()).map(|a| String::from_utf8_lossy(a).into_owned()).collect()
}

/// The pid in its own innermost PID namespace (last field of NSpid).
pub(crate) fn inner_pid(pid: u32) -> Option<u32> {
    let status = fs::read_to_string(proc_path(pid, "status")).ok()?;
    let line = status.lines().find_map(|l| l.strip_prefix("NSpid:"))?;
    let fields: Vec<&str> = line.split_whitespace().collect();
    if fields.len() < 2 {
        return None; // in our own PID namespace
    }
    fields.last()?.parse().ok()
}

/// A process's state letter (R, S, D, T, Z...), None when gone.
pub(crate) fn state(pid: u32) -> Option<char> {
    let status = fs::read_to_string(proc_path(pid, "status")).ok()?;
    status.lines().find_map(|l| l.strip_prefix("State:"))?.trim().chars().next()
}

#[allow(clippy::disallowed_methods, reason = "the lab waits in wall time for real processes")]
fn now() -> std::time::Instant {
    std::time::Instant::now()
}

/// Polls `done` every `poll` until it holds, or fails after `timeout`.
pub(crate) fn wait_for(
    what: impl FnOnce() -> String,
    timeout: std::time::Duration,
    poll: std::time::Duration,
    mut done: impl FnMut() -> bool,
) -> Result<(), LabError> {
    let start = now();
    loop {
        if done() {
            return Ok(());
        }
        if start.elapsed() >= timeout {
            return Err(LabError::Timeout { what: what(), waited_ms: timeout.as_millis() });
        }
        std::thread::sleep(poll);
    }
}

/// How many last lines of a log an error quotes.
pub const LOG_TAIL_LINES: usize = 12;
/// At most this many bytes of a log are read for its tail.
const LOG_TAIL_BYTES_MAX: u64 = 64 * 1024;

/// The last `LOG_TAIL_LINES` lines of the log at `path`, indented, for an
/// error message; says so when the log is missing or empty.
pub fn log_tail(path: &Path) -> String {
    use std::io::{Read, Seek, SeekFrom};
    let Ok(mut file) = fs::File::open(path) else {
        return "    (no such file)".into();
    };
    let len = file.metadata().map_or(0, |m| m.len());
    let _ = file.seek(SeekFrom::Start(len.saturating_sub(LOG_TAIL_BYTES_MAX)));
    let mut raw = Vec::new();
    let _ = file.take(LOG_TAIL_BYTES_MAX).read_to_end(&mut raw);
    let text = String::from_utf8_lossy(&raw);
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    if lines.is_empty() {
        return "    (empty)".into();
    }
    lines[lines.len().saturating_sub(LOG_TAIL_LINES)..]
        .iter()
        .map(|l| format!("    {l}"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// `wait_for`, whose timeout names `log` (where to look) and quotes its end.
pub(crate) fn wait_for_logged(
    what: impl FnOnce() -> String,
    log: &Path,
    timeout: std::time::Duration,
    poll: std::time::Duration,
    done: impl FnMut() -> bool,
) -> Result<(), LabError> {
    wait_for(what, timeout, poll, done).map_err(|e| with_log(e, log))
}

/// A timeout (or any failure) of a step with the log that says why.
pub(crate) fn with_log(e: LabError, log: &Path) -> LabError {
    let tail = log_tail(log);
    match e {
        LabError::Timeout { what, waited_ms } => LabError::TimeoutSee { what, waited_ms, log: log.to_path_buf(), tail },
        other => LabError::FailedSee { what: other.to_string(), log: log.to_path_buf(), tail },
    }
}

/// Serialises users of the one lab on this machine (tests of several
/// checkouts, a developer's `lab up`): held while the returned file is open.
pub const LAB_LOCK: &str = "/var/tmp/havirt-lab.lock";

/// Waits for and takes the machine-wide lab lock (`LAB_LOCK`, outside
/// LAB_DIR so that `down` leaves it alone).
pub fn lock() -> Result<fs::File, LabError> {
    let path = Path::new(LAB_LOCK);
    let file = fs::OpenOptions::new().create(true).truncate(false).write(true).open(path).map_err(io_error(path))?;
    file.lock().map_err(io_error(path))?;
    Ok(file)
}
