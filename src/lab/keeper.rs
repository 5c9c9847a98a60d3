//! `lab up` leaves the lab running: a keeper process (`havirt lab serve`)
//! owns it (the BMCs are its children, the watchdog supervisors its
//! threads) and takes `lab fault` and `lab status` on a unix socket,
//! one request line, one answer: `ok` or `error: WHY` on the first line,
//! then text. `lab down` kills the keeper with everything else.

use super::LAB_DIR;
use super::cluster::{Fault, Lab, LabSpec};
use super::sys::LabError;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The keeper's socket.
pub const SOCKET: &str = "lab.sock";
/// The keeper's output once the lab is up.
pub const LOG: &str = "lab.log";
/// The line the keeper prints on stdout once the lab is up.
pub const READY: &str = "lab ready";
/// A request line's bound.
pub const MAX_REQUEST_BYTES: u64 = 4096;
/// A client waits this long for an answer (a power-on waits for libvirtd).
pub const ANSWER_TIMEOUT: Duration = Duration::from_secs(60);

pub fn socket_path() -> PathBuf {
    Path::new(LAB_DIR).join(SOCKET)
}

/// Builds the lab, prints `READY` on stdout, moves its own output to
/// LAB_DIR/lab.log and serves requests until killed.
pub fn serve(spec: LabSpec) -> Result<(), LabError> {
    let mut lab = Lab::up(spec)?;
    let path = socket_path();
    let io = |source| LabError::Io { path: path.clone(), source };
    let listener = UnixListener::bind(&path).map_err(io)?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).map_err(io)?;
    // `lab down` finds the keeper by its working directory.
    std::env::set_current_dir(LAB_DIR).map_err(|source| LabError::Io { path: LAB_DIR.into(), source })?;
    println!("{READY}");
    let _ = std::io::stdout().flush();
    redirect_output(&Path::new(LAB_DIR).join(LOG))?;
    for stream in listener.incoming() {
        let Ok(mut stream) = stream else { continue };
        let answer = match read_request(&stream) {
            Ok(line) if line == "down" => {
                // The lab goes, then the answer, then the keeper (and the lock).
                let answer = match lab.down() {
                    Ok(report) => format!("ok\n{report}\n"),
                    Err(e) => format!("error: {e}\n"),
                };
                let _ = stream.write_all(answer.as_bytes());
                return Ok(());
            }
            Ok(line) => handle(&mut lab, &line),
            Err(e) => format!("error: {e}"),
        };
        let _ = stream.write_all(answer.as_bytes());
    }
    Ok(())
}

/// `lab down`: a lab kept by `lab up` is torn down by its keeper; then,
/// holding the lab lock (so that no lab being built or used by a test is
/// touched), whatever is left is removed.
pub fn down() -> Result<String, String> {
    let mut out = String::new();
    if UnixStream::connect(socket_path()).is_ok() {
        out.push_str(&request("down")?);
    }
    let _lock = super::lock().map_err(|e| e.to_string())?;
    let report = super::down().map_err(|e| e.to_string())?;
    if out.is_empty() || !report.is_empty() {
        out.push_str(&report.to_string());
    }
    Ok(out.trim_end().to_string())
}

fn redirect_output(log: &Path) -> Result<(), LabError> {
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .map_err(|source| LabError::Io { path: log.to_path_buf(), source })?;
    for fd in [1, 2] {
        // SAFETY: dup2 on a file descriptor we own onto stdout/stderr.
        if unsafe { libc::dup2(file.as_raw_fd(), fd) } < 0 {
            return Err(LabError::Io { path: log.to_path_buf(), source: std::io::Error::last_os_error() });
        }
    }
    Ok(())
}

fn read_request(stream: &UnixStream) -> Result<String, String> {
    stream.set_read_timeout(Some(Duration::from_secs(5))).map_err(|e| e.to_string())?;
    let mut line = String::new();
    BufReader::new(stream.take(MAX_REQUEST_BYTES)).read_line(&mut line).map_err(|e| e.to_string())?;
    Ok(line.trim().to_string())
}

fn handle(lab: &mut Lab, line: &str) -> String {
    let words: Vec<String> = line.split_whitespace().map(String::from).collect();
    match words.split_first() {
        Some((cmd, [])) if cmd == "status" => format!("ok\n{}", lab.status_text()),
        Some((cmd, rest)) if cmd == "fault" => match Fault::parse(rest) {
            Ok(fault) => match lab.fault(&fault) {
                Ok(()) => format!("ok\n{fault}: done\n"),
                Err(e) => format!("error: {fault}: {e}\n"),
            },
            Err(e) => format!("error: {e}\n"),
        },
        _ => format!("error: unknown request {line:?}: send `status`, `fault KIND HOST` or `down`\n"),
    }
}

/// Sends one request to the keeper; its answer's text, or why not.
pub fn request(line: &str) -> Result<String, String> {
    let path = socket_path();
    let mut stream = UnixStream::connect(&path)
        .map_err(|e| format!("no lab is up ({}: {e}); start one with `havirt lab up`", path.display()))?;
    stream.set_read_timeout(Some(ANSWER_TIMEOUT)).map_err(|e| e.to_string())?;
    stream.write_all(format!("{line}\n").as_bytes()).map_err(|e| e.to_string())?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer).map_err(|e| format!("the lab did not answer: {e}"))?;
    match answer.split_once('\n') {
        Some(("ok", rest)) => Ok(rest.to_string()),
        _ => Err(answer.trim().strip_prefix("error: ").unwrap_or(answer.trim()).to_string()),
    }
}

/// `lab up`: starts the keeper (`havirt lab serve ARGS`) in a session of
/// its own, relays its output until it prints `READY`, and returns; the
/// keeper's failure is an error with what it said.
pub fn up_detached(havirt: &Path, serve_args: &[String]) -> Result<(), String> {
    use std::os::unix::process::CommandExt;
    use std::process::{Command, Stdio};
    let mut child = Command::new(havirt)
        .args(["lab", "serve"])
        .args(serve_args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()
        .map_err(|e| format!("cannot run {} lab serve: {e}", havirt.display()))?;
    let stdout = child.stdout.take().expect("piped");
    let stderr = child.stderr.take().expect("piped");
    // The keeper's progress (stderr) is relayed as it comes; its last line
    // says why, if it fails.
    let relay = std::thread::spawn(move || {
        let mut last = String::new();
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            eprintln!("{line}");
            last = line;
        }
        last
    });
    for line in BufReader::new(stdout).lines() {
        let Ok(line) = line else { break };
        if line == READY {
            // The keeper's stderr now goes to its log; the relay thread
            // ends with this process.
            return Ok(());
        }
        println!("{line}");
    }
    let last = relay.join().unwrap_or_default();
    let status = child.wait().map_err(|e| e.to_string())?;
    Err(format!("lab up failed ({status}): {}; `havirt lab down` removes what was made", last.trim()))
}
