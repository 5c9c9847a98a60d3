//! Running one fence program under a deadline.
//!
//! The child leads a process group of its own, so that a deadline kills it
//! *and* what it started (fence_ipmilan runs ipmitool; a hung script's
//! `sleep`), and its pipes close. Its stdin is written and its output read
//! on helper threads, so no pipe can block the caller past the deadline.
//! Output is capped and has the password masked out before anyone sees it.

use super::FenceError;
use super::secret::Secret;
use std::ffi::{OsStr, OsString};
use std::io::{self, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

/// Output kept per stream; the rest is read and dropped so that the child
/// never blocks on a full pipe.
pub const OUTPUT_MAX_BYTES: usize = 64 * 1024;
/// Output quoted in an error message, from its end (where the reason is).
pub const OUTPUT_QUOTED_MAX_CHARS: usize = 400;
/// How often a running child is checked for exit; also the lateness of a
/// deadline kill.
pub const CHILD_POLL_INTERVAL_MS: u64 = 10;
/// How long output is awaited after the child exited. Pipes stay open past
/// that only if something the child started outlived it (and left its
/// process group); its output is then given up, not waited for.
pub const OUTPUT_GRACE_MS: u64 = 200;
/// What replaces the password in quoted output.
pub const MASK: &str = "********";

/// What the fence programs run with.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AgentEnv {
    /// `PATH` to find the programs (`ipmitool`, `virsh`, a bare agent name)
    /// and to give them; `None`: the daemon's own. Tests put fakes first.
    pub path: Option<OsString>,
}

impl AgentEnv {
    /// The program to execute: `name` itself if it holds a '/', else the
    /// first executable `name` in the search path.
    pub fn find_program(&self, name: &str) -> Result<PathBuf, String> {
        if name.contains('/') {
            return if is_executable(Path::new(name)) {
                Ok(PathBuf::from(name))
            } else {
                Err("no such executable file".into())
            };
        }
        let inherited = std::env::var_os("PATH");
        let search = self.path.as_deref().or(inherited.as_deref()).unwrap_or(OsStr::new("/usr/sbin:/usr/bin"));
        std::env::split_paths(search)
            .map(|dir| dir.join(name))
            .find(|p| is_executable(p))
            .ok_or_else(|| format!("not found in PATH ({})", search.to_string_lossy()))
    }
}

fn is_executable(p: &Path) -> bool {
    p.metadata().is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// The end of one fence call, on the monotonic clock.
#[derive(Clone, Copy, Debug)]
pub struct Deadline {
    end: Instant,
    /// The whole call's budget, for messages.
    total: Duration,
}

/// The adapter's only clock read: a fence call waits for real programs.
#[allow(clippy::disallowed_methods)] // adapter, not engine: a deadline on real child processes is wall time
fn now() -> Instant {
    Instant::now()
}

impl Deadline {
    pub fn after(total: Duration) -> Self {
        Deadline { end: now() + total, total }
    }

    /// This deadline or `window` from now, whichever comes first.
    pub fn earlier(&self, window: Duration) -> Self {
        Deadline { end: self.end.min(now() + window), total: self.total }
    }

    pub fn remaining(&self) -> Duration {
        self.end.saturating_duration_since(now())
    }

    pub fn has_at_least(&self, d: Duration) -> bool {
        self.remaining() >= d
    }

    pub fn total_ms(&self) -> u64 {
        u64::try_from(self.total.as_millis()).unwrap_or(u64::MAX)
    }
}

/// What a program left behind, already masked.
#[derive(Debug)]
pub struct Output {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl Output {
    /// "exit 1", "killed by signal 9".
    pub fn status_text(&self) -> String {
        status_text(self.status)
    }

    /// The end of stderr, or of stdout if stderr is empty, on one line.
    pub fn quote(&self) -> String {
        let text = if self.stderr.trim().is_empty() { &self.stdout } else { &self.stderr };
        let one_line = text.split_whitespace().collect::<Vec<_>>().join(" ");
        if one_line.is_empty() {
            return "no output".into();
        }
        let chars = one_line.chars().count();
        if chars <= OUTPUT_QUOTED_MAX_CHARS {
            return one_line;
        }
        let tail: String = one_line.chars().skip(chars - OUTPUT_QUOTED_MAX_CHARS).collect();
        format!("...{tail}")
    }

    pub fn failed(&self, agent: &str, step: &str) -> FenceError {
        FenceError::StepFailed {
            agent: agent.into(),
            step: step.into(),
            status: self.status_text(),
            output: self.quote(),
        }
    }
}

pub fn status_text(status: ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exit {code}"),
        (None, Some(sig)) => format!("killed by signal {sig}"),
        (None, None) => "unknown exit status".into(),
    }
}

/// One program run: what to run and what to say about it.
pub struct Run<'a> {
    /// Fence entry name, for messages.
    pub agent: &'a str,
    /// What this run does, for messages ("action=off", "chassis power status").
    pub step: &'a str,
    pub program: &'a str,
    pub args: Vec<OsString>,
    /// Written to the child's stdin, then closed; `None`: /dev/null.
    /// Wiped after writing.
    pub stdin: Option<Vec<u8>>,
    /// Masked out of the output.
    pub secret: Option<&'a Secret>,
}

impl Run<'_> {
    /// Run to completion or until the deadline, whichever is first. A run
    /// past the deadline kills the whole process group and is an error.
    pub fn execute(self, env: &AgentEnv, deadline: &Deadline) -> Result<Output, FenceError> {
        let timeout = || FenceError::Timeout {
            agent: self.agent.into(),
            step: self.step.into(),
            deadline_ms: deadline.total_ms(),
        };
        if deadline.remaining().is_zero() {
            return Err(timeout());
        }
        let spawn_error =
            |reason: String| FenceError::Spawn { agent: self.agent.into(), program: self.program.into(), reason };
        let program = env.find_program(self.program).map_err(spawn_error)?;
        let mut cmd = Command::new(&program);
        cmd.args(&self.args)
            .stdin(if self.stdin.is_some() { Stdio::piped() } else { Stdio::null() })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // Parsed output ("Chassis Power is off", "shut off") must not be translated.
            .env("LC_ALL", "C")
            // The daemon's systemd watchdog is its own: no child may pet it.
            .env_remove("NOTIFY_SOCKET")
            .env_remove("WATCHDOG_USEC")
            .env_remove("WATCHDOG_PID")
            .process_group(0);
        if let Some(path) = &env.path {
            cmd.env("PATH", path);
        }
        let mut child = cmd.spawn().map_err(|e| spawn_error(e.to_string()))?;
        let writer = self.stdin.map(|bytes| spawn_writer(&mut child, bytes));
        let stdout = child.stdout.take().map(spawn_reader);
        let stderr = child.stderr.take().map(spawn_reader);
        let status = match wait_until(&mut child, deadline) {
            Ok(Some(status)) => status,
            Ok(None) => return Err(timeout()),
            Err(e) => {
                return Err(FenceError::Io { agent: self.agent.into(), step: self.step.into(), reason: e.to_string() });
            }
        };
        if let Some(w) = writer {
            // A child that exits without reading its stdin gets EPIPE; its exit status tells the rest.
            let _ = w.recv_timeout(Duration::from_millis(OUTPUT_GRACE_MS));
        }
        let collect = |rx: Option<mpsc::Receiver<Vec<u8>>>| {
            let bytes = rx.and_then(|rx| rx.recv_timeout(Duration::from_millis(OUTPUT_GRACE_MS)).ok());
            mask(&String::from_utf8_lossy(&bytes.unwrap_or_default()), self.secret)
        };
        Ok(Output { status, stdout: collect(stdout), stderr: collect(stderr) })
    }
}

/// Wait for the child until the deadline; past it kill its process group,
/// reap it and return `None`.
fn wait_until(child: &mut Child, deadline: &Deadline) -> io::Result<Option<ExitStatus>> {
    let poll = Duration::from_millis(CHILD_POLL_INTERVAL_MS);
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(Some(status));
        }
        let left = deadline.remaining();
        if left.is_zero() {
            kill_group(child);
            child.wait()?;
            return Ok(None);
        }
        thread::sleep(left.min(poll));
    }
}

/// SIGKILL the child's process group. The child is not reaped yet, so its
/// pid (= the group id) cannot have been reused.
fn kill_group(child: &mut Child) {
    match i32::try_from(child.id()) {
        Ok(pgid) if pgid > 0 => {
            // SAFETY: kill(2) takes plain integers and touches no memory of ours.
            let rc = unsafe { libc::kill(-pgid, libc::SIGKILL) };
            if rc != 0 {
                let _ = child.kill();
            }
        }
        _ => {
            let _ = child.kill();
        }
    }
}

fn spawn_writer(child: &mut Child, mut bytes: Vec<u8>) -> mpsc::Receiver<()> {
    let (tx, rx) = mpsc::channel();
    let stdin = child.stdin.take();
    thread::spawn(move || {
        if let Some(mut stdin) = stdin {
            let _ = stdin.write_all(&bytes);
        }
        bytes.fill(0);
        std::hint::black_box(&bytes);
        let _ = tx.send(());
    });
    rx
}

fn spawn_reader(mut pipe: impl Read + Send + 'static) -> mpsc::Receiver<Vec<u8>> {
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let mut kept = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            match pipe.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    let room = OUTPUT_MAX_BYTES.saturating_sub(kept.len());
                    kept.extend_from_slice(&buf[..n.min(room)]);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => break,
            }
        }
        let _ = tx.send(kept);
    });
    rx
}

/// `text` with every occurrence of the secret replaced by [`MASK`].
pub fn mask(text: &str, secret: Option<&Secret>) -> String {
    match secret {
        Some(s) if !s.expose().is_empty() => text.replace(s.expose(), MASK),
        _ => text.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn output(code: i32, stdout: &str, stderr: &str) -> Output {
        Output { status: ExitStatus::from_raw(code << 8), stdout: stdout.into(), stderr: stderr.into() }
    }

    #[test]
    fn status_text_names_exit_codes_and_signals() {
        assert_eq!(status_text(ExitStatus::from_raw(2 << 8)), "exit 2");
        assert_eq!(status_text(ExitStatus::from_raw(9)), "killed by signal 9");
    }

    #[test]
    fn quote_prefers_stderr_and_keeps_the_end() {
        assert_eq!(output(1, "out", "  err\n line2 ").quote(), "err line2");
        assert_eq!(output(1, "out\n", "\n").quote(), "out");
        assert_eq!(output(1, "", "").quote(), "no output");
        let long = "x".repeat(OUTPUT_QUOTED_MAX_CHARS) + "END";
        let q = output(1, "", &long).quote();
        assert!(q.starts_with("...") && q.ends_with("END"), "{q}");
        assert_eq!(q.chars().count(), OUTPUT_QUOTED_MAX_CHARS + 3);
    }

    #[test]
    fn mask_hides_the_secret() {
        let s = Secret::for_test("hunter2");
        assert_eq!(mask("pw hunter2 and hunter2", Some(&s)), format!("pw {MASK} and {MASK}"));
        assert_eq!(mask("pw hunter2", None), "pw hunter2");
    }

    #[test]
    fn find_program_uses_the_given_path() {
        let env = AgentEnv { path: Some("/nonexistent-dir:/bin:/usr/bin".into()) };
        assert!(env.find_program("sh").is_ok_and(|p| p.ends_with("sh")));
        let missing = env.find_program("no-such-fence-agent").expect_err("missing");
        assert!(missing.contains("not found in PATH (/nonexistent-dir:/bin:/usr/bin)"), "{missing}");
        assert!(env.find_program("/nonexistent/fence_x").is_err());
        assert!(env.find_program("/bin/sh").is_ok());
    }

    #[test]
    fn deadline_narrows_but_never_widens() {
        let d = Deadline::after(Duration::from_secs(10));
        assert!(d.earlier(Duration::from_secs(1)).remaining() <= Duration::from_secs(1));
        assert!(d.earlier(Duration::from_secs(100)).remaining() <= Duration::from_secs(10));
        assert_eq!(d.total_ms(), 10_000);
    }
}
