//! The control socket: one command per line in, one reply line out.
//!
//! Connections are served one at a time, each bounded in bytes and in idle
//! time, so a stuck client delays the next one by at most
//! `CONTROL_IDLE_TIMEOUT` and cannot grow memory. The socket never touches
//! the FUSE mount: it answers while every FUSE request hangs.

use super::FaultFsError;
use super::gate::Gate;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

/// Longest command line accepted.
pub const MAX_COMMAND_BYTES: usize = 256;
/// Most bytes one connection may send (many commands on one connection).
pub const MAX_CONNECTION_BYTES: u64 = 64 * 1024;
/// A connection silent this long is closed.
pub const CONTROL_IDLE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the client waits for faultfs to answer.
pub const CLIENT_TIMEOUT: Duration = Duration::from_secs(5);
/// Pause after a failed accept (e.g. out of descriptors), so that the loop
/// does not spin.
const ACCEPT_RETRY_PAUSE: Duration = Duration::from_millis(50);

/// The listening socket and its thread; stopping removes the socket file.
pub struct ControlServer {
    path: PathBuf,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl ControlServer {
    /// Binds `path`, replacing a stale socket file (one nobody listens on)
    /// but never a live one.
    pub fn start(path: &Path, gate: Arc<Gate>) -> Result<ControlServer, FaultFsError> {
        let bind_err = |source| FaultFsError::ControlBind { path: path.to_path_buf(), source };
        if path.exists() {
            if UnixStream::connect(path).is_ok() {
                return Err(FaultFsError::ControlInUse { path: path.to_path_buf() });
            }
            std::fs::remove_file(path).map_err(bind_err)?;
        }
        let listener = UnixListener::bind(path).map_err(bind_err)?;
        let stop = Arc::new(AtomicBool::new(false));
        let s = Arc::clone(&stop);
        let thread = std::thread::Builder::new()
            .name("faultfs-control".into())
            .spawn(move || serve(&listener, &gate, &s))
            .map_err(bind_err)?;
        Ok(ControlServer { path: path.to_path_buf(), stop, thread: Some(thread) })
    }
}

impl Drop for ControlServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wakes the blocking accept; the thread then sees `stop`.
        let _ = UnixStream::connect(&self.path);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

fn serve(listener: &UnixListener, gate: &Gate, stop: &AtomicBool) {
    for conn in listener.incoming() {
        if stop.load(Ordering::SeqCst) {
            return;
        }
        match conn {
            Ok(stream) => {
                let _ = answer(stream, gate);
            }
            Err(_) => std::thread::sleep(ACCEPT_RETRY_PAUSE),
        }
    }
}

fn answer(stream: UnixStream, gate: &Gate) -> io::Result<()> {
    stream.set_read_timeout(Some(CONTROL_IDLE_TIMEOUT))?;
    stream.set_write_timeout(Some(CONTROL_IDLE_TIMEOUT))?;
    let mut out = stream.try_clone()?;
    let mut lines = BufReader::new(stream.take(MAX_CONNECTION_BYTES));
    let mut line = String::new();
    loop {
        line.clear();
        if lines.read_line(&mut line)? == 0 {
            return Ok(());
        }
        let reply = if line.len() > MAX_COMMAND_BYTES {
            format!("error: command longer than {MAX_COMMAND_BYTES} bytes")
        } else {
            gate.command(line.trim())
        };
        writeln!(out, "{reply}")?;
    }
}

/// Sends one command, returns the reply line (`ok ...`); a refusal
/// (`error: ...`) is `FaultFsError::Refused`.
pub fn send(socket: &Path, command: &str) -> Result<String, FaultFsError> {
    if command.contains('\n') || command.len() > MAX_COMMAND_BYTES {
        return Err(FaultFsError::BadCommand { command: command.to_string() });
    }
    let io_err = |source| FaultFsError::Control { path: socket.to_path_buf(), source };
    let mut stream = UnixStream::connect(socket).map_err(io_err)?;
    stream.set_read_timeout(Some(CLIENT_TIMEOUT)).map_err(io_err)?;
    stream.set_write_timeout(Some(CLIENT_TIMEOUT)).map_err(io_err)?;
    writeln!(stream, "{command}").map_err(io_err)?;
    stream.shutdown(std::net::Shutdown::Write).map_err(io_err)?;
    let mut reply = String::new();
    BufReader::new(stream.take(MAX_CONNECTION_BYTES)).read_line(&mut reply).map_err(io_err)?;
    let reply = reply.trim_end().to_string();
    if reply == "ok" || reply.starts_with("ok ") {
        Ok(reply)
    } else if let Some(msg) = reply.strip_prefix("error: ") {
        Err(FaultFsError::Refused { command: command.to_string(), message: msg.to_string() })
    } else {
        Err(FaultFsError::BadReply { path: socket.to_path_buf(), reply })
    }
}
