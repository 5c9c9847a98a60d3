//! The daemon's control socket: a root-only unix socket on which `havirt
//! status`, `events`, `protect`, `unprotect` and `fence confirm` talk to the
//! local daemon. One JSON request line in, one JSON response line out, then
//! the daemon closes the connection.
//!
//! Server: [`bind`] then [`serve`] (or [`serve_with_limits`]) inside the
//! daemon's tokio runtime. `serve` decides nothing: it checks the peer is
//! root, parses the line and hands each [`Request`] to the daemon's main loop
//! as a [`Call`], which answers through the oneshot. Client: [`request`],
//! blocking std, for the CLI. Rendering for the CLI: [`render_status`],
//! [`render_events`], [`status_json`].

use crate::engine::config::{AdmissionMode, HostId, IsolationResponse, OnShutdown, Priority, Readiness};
use crate::engine::io::{DomainState, Event};
use crate::engine::time::Duration;
use crate::engine::view::{DomainView, HostView, NodeView};
use serde::{Deserialize, Serialize};
use std::fmt::Write as _;
use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{Semaphore, mpsc, oneshot};

/// Where the daemon listens unless the config says otherwise.
pub const DEFAULT_SOCKET: &str = "/run/havirt/control.sock";

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Request {
    Status,
    /// Events with a sequence number above `after` (0: all kept).
    Events {
        after: u64,
    },
    /// Protect a domain running on this host, or change its policy: only
    /// the fields given change, the others keep their value.
    Protect {
        domain: String,
        changes: PolicyChanges,
    },
    Unprotect {
        domain: String,
    },
    /// Start a domain stopped on purpose, on this host (`havirt start`).
    Start {
        domain: String,
    },
    /// The operator swears the host is powered off.
    FenceConfirm {
        host: String,
    },
    /// Enter or leave maintenance mode; `host` must be the daemon's own.
    Maintenance {
        host: String,
        enter: bool,
    },
    /// The failover timelines this daemon recorded (`havirt events --failovers`).
    Failovers,
}

/// Policy fields to set; `None` keeps the current value (or the default for
/// a domain protected for the first time).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct PolicyChanges {
    pub priority: Option<Priority>,
    pub isolation_response: Option<IsolationResponse>,
    /// Host names; an empty list clears the affinity.
    pub affinity: Option<Vec<String>>,
    /// `Some("")` clears the group.
    pub anti_affinity: Option<String>,
    pub readiness: Option<Readiness>,
    pub readiness_timeout_s: Option<u64>,
    pub max_restarts: Option<u32>,
    pub on_shutdown: Option<OnShutdown>,
    pub guest_monitor: Option<bool>,
    pub monitor_failure_interval_s: Option<u64>,
    pub monitor_min_uptime_s: Option<u64>,
    pub monitor_max_resets: Option<u32>,
    pub monitor_reset_window_s: Option<u64>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Response {
    Status(Box<StatusReport>),
    Events(Vec<EventRecord>),
    Failovers(Vec<crate::failover::FailoverRecord>),
    /// The request was carried out; what was done, for the operator.
    Done(String),
    /// It was refused or failed; why, and what to do.
    Error(String),
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StatusReport {
    pub cluster: String,
    /// This daemon's host name (from the config).
    pub host_name: String,
    pub uptime_ms: u64,
    pub view: NodeView,
    pub counters: Counters,
}

/// What the adapters rejected or failed, since the daemon started.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counters {
    pub packets_accepted: u64,
    pub packets_rejected: u64,
    pub records_rejected: u64,
    pub storage_errors: u64,
    pub storage_timeouts: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventRecord {
    pub seq: u64,
    /// Wall-clock time the daemon logged it (ms since the Unix epoch).
    pub unix_ms: u64,
    pub event: Event,
}

// ---------------------------------------------------------------------------
// Limits and errors

/// Longest request line, newline excluded. Requests are a few hundred bytes;
/// this only bounds what a broken or hostile client makes the daemon buffer.
pub const MAX_REQUEST_BYTES: usize = 64 * 1024;
/// Longest answer line the client accepts. The event list is the largest
/// answer; this bounds what a broken daemon makes the CLI buffer.
pub const MAX_RESPONSE_BYTES: usize = 16 * 1024 * 1024;
/// How long a connected client may take to send its request line, so that a
/// silent client holds a connection slot only briefly.
pub const READ_TIMEOUT_MS: u64 = 5_000;
/// How long the daemon's main loop may take to answer one request. It
/// answers between two engine steps, so reaching this means it is stuck.
pub const ANSWER_TIMEOUT_MS: u64 = 60_000;
/// How long a client may take to read the answer.
pub const WRITE_TIMEOUT_MS: u64 = 5_000;
/// Connections served at once; one more gets a "busy" error at once, so the
/// accept backlog keeps draining and clients never hang in `connect`.
pub const MAX_CONNECTIONS: usize = 16;
/// Pause after a failed `accept` (EMFILE, ENOMEM), so that a persistent error
/// cannot spin a core.
pub const ACCEPT_ERROR_BACKOFF_MS: u64 = 100;

/// What the daemon's main loop receives: a request and where to answer it.
pub type Call = (Request, oneshot::Sender<Response>);

/// The answer to a peer that is not root.
pub const ROOT_ONLY: &str = "the havirt control socket is for root only";

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ControlError {
    #[error(
        "cannot create the control socket directory {path}: {reason}; create it (mode 0700) or choose another socket path"
    )]
    CreateDir { path: PathBuf, reason: String },
    #[error(
        "another havirt daemon already listens on {path}; stop it first (systemctl stop havirt) or give this one another socket path"
    )]
    AlreadyListening { path: PathBuf },
    #[error("{path} exists and is not a socket; remove it or choose another socket path")]
    NotASocket { path: PathBuf },
    #[error("cannot check whether a daemon still listens on {path}: {reason}")]
    Probe { path: PathBuf, reason: String },
    #[error("cannot remove the stale control socket {path}: {reason}; remove it by hand")]
    RemoveStale { path: PathBuf, reason: String },
    #[error("cannot bind the control socket {path}: {reason}")]
    Bind { path: PathBuf, reason: String },
    #[error("cannot make the control socket {path} root-only (chmod 0600): {reason}")]
    Chmod { path: PathBuf, reason: String },
    #[error("no havirt daemon is listening on {path}: start it (systemctl start havirt) or pass --socket")]
    NoDaemon { path: PathBuf },
    #[error("permission denied on {path}: run as root")]
    PermissionDenied { path: PathBuf },
    #[error(
        "{path} is a stale socket: the havirt daemon is not running; start it (systemctl start havirt) or pass --socket"
    )]
    StaleSocket { path: PathBuf },
    #[error(
        "the daemon at {path} accepts no connections (its queue is full): it may be stuck; see journalctl -u havirt"
    )]
    Busy { path: PathBuf },
    #[error("cannot connect to the havirt daemon on {path}: {reason}")]
    Connect { path: PathBuf, reason: String },
    #[error("the daemon at {path} did not answer within {} s; it may be stuck: see journalctl -u havirt", seconds(*timeout_ms))]
    Timeout { path: PathBuf, timeout_ms: u64 },
    #[error("lost the connection to the daemon at {path}: {reason}")]
    Io { path: PathBuf, reason: String },
    #[error("the daemon at {path} closed the connection without answering; see journalctl -u havirt")]
    NoAnswer { path: PathBuf },
    #[error("the daemon at {path} answered with more than {limit_bytes} bytes; see journalctl -u havirt")]
    AnswerTooLong { path: PathBuf, limit_bytes: usize },
    #[error(
        "cannot read the answer of the daemon at {path}: {reason}; do the CLI and the daemon run the same havirt version?"
    )]
    BadAnswer { path: PathBuf, reason: String },
}

/// "60", "0.5", "1.25": milliseconds as seconds, without trailing zeros.
fn seconds(ms: u64) -> String {
    let frac = format!("{:03}", ms % 1000);
    let frac = frac.trim_end_matches('0');
    if frac.is_empty() { format!("{}", ms / 1000) } else { format!("{}.{frac}", ms / 1000) }
}

/// Only root may use the control socket (DESIGN.md §8): it can move leases
/// and confirm fences. The socket is also mode 0600; this check is the one
/// that holds if the mode is ever loosened.
pub fn peer_allowed(uid: u32) -> bool {
    uid == 0
}

/// Connects without blocking: on a daemon whose accept backlog is full, a
/// blocking `connect` would hang past any timeout. `WouldBlock` means full.
fn connect_nonblocking(path: &Path) -> io::Result<std::os::unix::net::UnixStream> {
    let socket = socket2::Socket::new(socket2::Domain::UNIX, socket2::Type::STREAM, None)?;
    socket.set_nonblocking(true)?;
    socket.connect(&socket2::SockAddr::unix(path)?)?;
    socket.set_nonblocking(false)?;
    Ok(socket.into())
}

// ---------------------------------------------------------------------------
// Server

/// Binds the control socket at `path`, root-only. Creates the parent
/// directory (mode 0700) if it is missing. A socket file already there is
/// replaced if nothing answers on it (a daemon that crashed), and refused if
/// something does. Call within a tokio runtime.
pub fn bind(path: &Path) -> Result<UnixListener, ControlError> {
    let owned = || path.to_path_buf();
    create_parent(path)?;
    remove_stale(path)?;
    let listener = UnixListener::bind(path).map_err(|e| match e.kind() {
        // Another daemon bound it between our check and our bind.
        io::ErrorKind::AddrInUse => ControlError::AlreadyListening { path: owned() },
        _ => ControlError::Bind { path: owned(), reason: e.to_string() },
    })?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| ControlError::Chmod { path: owned(), reason: e.to_string() })?;
    Ok(listener)
}

fn create_parent(path: &Path) -> Result<(), ControlError> {
    let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) else {
        return Ok(());
    };
    if dir.exists() {
        return Ok(());
    }
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| ControlError::CreateDir { path: dir.to_path_buf(), reason: e.to_string() })
}

fn remove_stale(path: &Path) -> Result<(), ControlError> {
    let owned = || path.to_path_buf();
    match std::fs::symlink_metadata(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(ControlError::Probe { path: owned(), reason: e.to_string() }),
        Ok(meta) if !meta.file_type().is_socket() => return Err(ControlError::NotASocket { path: owned() }),
        Ok(_) => {}
    }
    match connect_nonblocking(path) {
        // Connected, or its backlog is full: a daemon owns it.
        Ok(_) => Err(ControlError::AlreadyListening { path: owned() }),
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Err(ControlError::AlreadyListening { path: owned() }),
        Err(e) if matches!(e.kind(), io::ErrorKind::ConnectionRefused | io::ErrorKind::NotFound) => {
            match std::fs::remove_file(path) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => {
                    Err(ControlError::RemoveStale { path: owned(), reason: e.to_string() })
                }
                _ => Ok(()),
            }
        }
        Err(e) => Err(ControlError::Probe { path: owned(), reason: e.to_string() }),
    }
}

/// Timeouts and the connection limit of [`serve_with_limits`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ServeLimits {
    pub read_timeout_ms: u64,
    pub answer_timeout_ms: u64,
    pub write_timeout_ms: u64,
    pub max_connections: usize,
}

impl Default for ServeLimits {
    fn default() -> Self {
        ServeLimits {
            read_timeout_ms: READ_TIMEOUT_MS,
            answer_timeout_ms: ANSWER_TIMEOUT_MS,
            write_timeout_ms: WRITE_TIMEOUT_MS,
            max_connections: MAX_CONNECTIONS,
        }
    }
}

/// [`serve_with_limits`] with the default limits.
pub async fn serve(listener: UnixListener, tx: mpsc::Sender<Call>) {
    serve_with_limits(listener, tx, ServeLimits::default()).await;
}

/// Accepts connections until the receiver of `tx` is dropped; each is served
/// in its own task: one request line in, one response line out. Accept
/// errors never end the loop.
pub async fn serve_with_limits(listener: UnixListener, tx: mpsc::Sender<Call>, limits: ServeLimits) {
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    loop {
        let accepted = tokio::select! {
            () = tx.closed() => return,
            accepted = listener.accept() => accepted,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(_) => {
                tokio::time::sleep(std::time::Duration::from_millis(ACCEPT_ERROR_BACKOFF_MS)).await;
                continue;
            }
        };
        match Arc::clone(&slots).try_acquire_owned() {
            Ok(permit) => {
                let tx = tx.clone();
                tokio::spawn(async move {
                    serve_connection(stream, &tx, limits).await;
                    drop(permit);
                });
            }
            Err(_) => {
                let busy = format!(
                    "the daemon is serving {} control requests already; try again in a few seconds",
                    limits.max_connections
                );
                // A fresh socket's buffer takes one short line without waiting.
                let _ = stream.try_write(&encode_response(&Response::Error(busy)));
            }
        }
    }
}

async fn serve_connection(mut stream: UnixStream, tx: &mpsc::Sender<Call>, limits: ServeLimits) {
    let response = match stream.peer_cred() {
        Err(e) => Response::Error(format!("cannot read the credentials of the peer: {e}")),
        Ok(cred) if !peer_allowed(cred.uid()) => Response::Error(ROOT_ONLY.to_string()),
        Ok(_) => answer(&mut stream, tx, limits).await,
    };
    let write = async {
        stream.write_all(&encode_response(&response)).await?;
        stream.shutdown().await
    };
    // The client may be gone or not reading: nothing more to do either way.
    let _ = tokio::time::timeout(std::time::Duration::from_millis(limits.write_timeout_ms), write).await;
}

async fn answer(stream: &mut UnixStream, tx: &mpsc::Sender<Call>, limits: ServeLimits) -> Response {
    let read = tokio::time::timeout(std::time::Duration::from_millis(limits.read_timeout_ms), read_line(stream));
    let line = match read.await {
        Err(_) => {
            return Response::Error(format!(
                "no request line within {} s; send one JSON request followed by a newline",
                seconds(limits.read_timeout_ms)
            ));
        }
        Ok(Err(message)) => return Response::Error(message),
        Ok(Ok(line)) => line,
    };
    match parse_request(&line) {
        Ok(request) => forward(request, tx, limits.answer_timeout_ms).await,
        Err(message) => Response::Error(message),
    }
}

/// One line of at most `MAX_REQUEST_BYTES` (newline removed). A client that
/// closes its side instead of sending a newline is served too.
async fn read_line(stream: &mut UnixStream) -> Result<Vec<u8>, String> {
    let limit = u64::try_from(MAX_REQUEST_BYTES + 1).unwrap_or(u64::MAX);
    let mut reader = BufReader::new((&mut *stream).take(limit));
    let mut line = Vec::new();
    reader.read_until(b'\n', &mut line).await.map_err(|e| format!("cannot read the request: {e}"))?;
    if line.last() == Some(&b'\n') {
        line.pop();
    } else if line.len() > MAX_REQUEST_BYTES {
        return Err(format!("request longer than {MAX_REQUEST_BYTES} bytes; a control request is one short JSON line"));
    }
    Ok(line)
}

/// Parses one request line; the error says what was expected.
pub fn parse_request(line: &[u8]) -> Result<Request, String> {
    if line.iter().all(u8::is_ascii_whitespace) {
        return Err("empty request; send one JSON request followed by a newline, e.g. \"Status\"".to_string());
    }
    serde_json::from_slice(line).map_err(|e| {
        format!(
            "invalid request: {e}; send one JSON request followed by a newline, e.g. \"Status\" or {{\"Events\":{{\"after\":0}}}}"
        )
    })
}

async fn forward(request: Request, tx: &mpsc::Sender<Call>, answer_timeout_ms: u64) -> Response {
    let (reply_tx, reply_rx) = oneshot::channel();
    let exchange = async {
        tx.send((request, reply_tx)).await.map_err(|_| "the daemon is shutting down")?;
        reply_rx.await.map_err(|_| "the daemon dropped the request; see journalctl -u havirt")
    };
    match tokio::time::timeout(std::time::Duration::from_millis(answer_timeout_ms), exchange).await {
        Ok(Ok(response)) => response,
        Ok(Err(message)) => Response::Error(message.to_string()),
        Err(_) => Response::Error(format!(
            "the daemon did not answer within {} s; it may be stuck: see journalctl -u havirt",
            seconds(answer_timeout_ms)
        )),
    }
}

/// One JSON line. A response that cannot be encoded becomes an error
/// response, so that no request can crash the daemon.
fn encode_response(response: &Response) -> Vec<u8> {
    let mut line = serde_json::to_vec(response).unwrap_or_else(|e| {
        let error = Response::Error(format!("cannot encode the answer: {e}"));
        serde_json::to_vec(&error).expect("an error string always encodes")
    });
    line.push(b'\n');
    line
}

// ---------------------------------------------------------------------------
// Client (blocking, for the CLI)

/// Sends one request to the daemon listening on `path` and waits at most
/// `timeout` in all for its answer. Errors say what to do.
pub fn request(path: &Path, req: &Request, timeout: std::time::Duration) -> Result<Response, ControlError> {
    #[allow(clippy::disallowed_methods)] // client, not engine: the operator's timeout is wall time
    let now = std::time::Instant::now();
    // A timeout too large to add is as good as none: wait about a year.
    let deadline = now.checked_add(timeout).unwrap_or_else(|| now + std::time::Duration::from_secs(365 * 86_400));
    let timeout_ms = u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX);
    let mut stream = connect_nonblocking(path).map_err(|e| connect_error(path, &e))?;
    let mut line = serde_json::to_vec(req).expect("a Request always encodes");
    line.push(b'\n');
    // A daemon that refuses us (busy, not root) answers and closes without
    // reading: the write then fails, but its answer is still there to read.
    let written = set_timeout(&stream, deadline, path, timeout_ms)
        .and_then(|()| stream.write_all(&line).map_err(|e| io_error(path, &e, timeout_ms)));
    let answer = read_answer(&mut stream, deadline, path, timeout_ms);
    let answer = match (answer, written) {
        (Err(ControlError::NoAnswer { .. }), Err(e)) => return Err(e),
        (answer, _) => answer?,
    };
    serde_json::from_slice(&answer)
        .map_err(|e| ControlError::BadAnswer { path: path.to_path_buf(), reason: e.to_string() })
}

fn connect_error(path: &Path, e: &io::Error) -> ControlError {
    let path = path.to_path_buf();
    match e.kind() {
        io::ErrorKind::NotFound => ControlError::NoDaemon { path },
        io::ErrorKind::PermissionDenied => ControlError::PermissionDenied { path },
        io::ErrorKind::ConnectionRefused => ControlError::StaleSocket { path },
        io::ErrorKind::WouldBlock => ControlError::Busy { path },
        _ => ControlError::Connect { path, reason: e.to_string() },
    }
}

fn io_error(path: &Path, e: &io::Error, timeout_ms: u64) -> ControlError {
    match e.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => {
            ControlError::Timeout { path: path.to_path_buf(), timeout_ms }
        }
        _ => ControlError::Io { path: path.to_path_buf(), reason: e.to_string() },
    }
}

/// Arms the socket's read and write timeouts with what is left until `deadline`.
fn set_timeout(
    stream: &std::os::unix::net::UnixStream,
    deadline: std::time::Instant,
    path: &Path,
    timeout_ms: u64,
) -> Result<(), ControlError> {
    #[allow(clippy::disallowed_methods)] // client, not engine: the operator's timeout is wall time
    let left = deadline.saturating_duration_since(std::time::Instant::now());
    if left.is_zero() {
        return Err(ControlError::Timeout { path: path.to_path_buf(), timeout_ms });
    }
    let armed = stream.set_read_timeout(Some(left)).and_then(|()| stream.set_write_timeout(Some(left)));
    armed.map_err(|e| io_error(path, &e, timeout_ms))
}

/// The answer line (newline removed), at most `MAX_RESPONSE_BYTES`.
fn read_answer(
    stream: &mut std::os::unix::net::UnixStream,
    deadline: std::time::Instant,
    path: &Path,
    timeout_ms: u64,
) -> Result<Vec<u8>, ControlError> {
    let mut answer = Vec::new();
    let mut chunk = vec![0u8; 64 * 1024];
    loop {
        set_timeout(stream, deadline, path, timeout_ms)?;
        let n = match stream.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(io_error(path, &e, timeout_ms)),
        };
        if let Some(end) = chunk[..n].iter().position(|&b| b == b'\n') {
            answer.extend_from_slice(&chunk[..end]);
            break;
        }
        answer.extend_from_slice(&chunk[..n]);
        if answer.len() > MAX_RESPONSE_BYTES {
            return Err(ControlError::AnswerTooLong { path: path.to_path_buf(), limit_bytes: MAX_RESPONSE_BYTES });
        }
    }
    if answer.is_empty() {
        return Err(ControlError::NoAnswer { path: path.to_path_buf() });
    }
    Ok(answer)
}

// ---------------------------------------------------------------------------
// Rendering for the CLI

/// `havirt status`: a header (cluster, this host, uptime, master; this
/// node's self-fence, isolation and storage (S4) state; failover capacity
/// when known, i.e. on the master), then a HOSTS table, a DOMAINS table and the counters.
pub fn render_status(r: &StatusReport) -> String {
    let v = &r.view;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "Cluster: {}   Host: {} ({})   Uptime: {}   Master: {}",
        clean(&r.cluster),
        clean(&r.host_name),
        v.host,
        age(Duration(r.uptime_ms)),
        master_text(v)
    );
    let storage = if v.storage_healthy { "ok" } else { "LOST" };
    let last_write = v.last_good_write_age.map_or_else(|| "never".to_string(), |a| format!("{} ago", age(a)));
    let _ = write!(
        out,
        "Self-fence: {}   Isolated: {}   Storage: {storage} (last write {last_write})",
        clean(&v.self_fence),
        if v.isolated { "yes" } else { "no" }
    );
    if let Some((hosts, fault_domains)) = v.tolerance {
        let _ = write!(out, "\nFailover: tolerates {hosts} host failure(s), {fault_domains} fault-domain failure(s)");
        let a = v.admission;
        if a.mode != AdmissionMode::Off {
            let _ = write!(
                out,
                "; admission control {}: needs {} host, {} fault-domain",
                admission_word(a.mode),
                a.host_failures,
                a.fault_domain_failures
            );
        }
        if let Some(why) = &v.admission_breach {
            let _ = write!(out, "\nAdmission: BELOW REQUIREMENT: {}", clean(why));
        }
    }
    out.push_str("\n\nHOSTS\n");
    let hosts: Vec<Vec<String>> = v.hosts.iter().map(|h| host_row(v, h)).collect();
    table(
        &mut out,
        &["ID", "NAME", "VERDICT", "NET-AGE", "SLOT-AGE", "MEM(used/size)", "VCPUS(used/size)", "FLAGS"],
        &hosts,
    );
    out.push_str("\nDOMAINS\n");
    if v.domains.is_empty() {
        out.push_str("(none protected)\n");
    } else {
        let mut domains: Vec<&DomainView> = v.domains.iter().collect();
        domains.sort_by(|a, b| a.name.cmp(&b.name).then(a.id.cmp(&b.id)));
        let rows: Vec<Vec<String>> = domains.iter().map(|d| domain_row(v, d)).collect();
        table(&mut out, &["NAME", "UUID", "PRIORITY", "HOST", "STATE", "GEN", "LOCAL"], &rows);
    }
    let c = &r.counters;
    let _ = writeln!(
        out,
        "\nCounters: packets {} accepted, {} rejected   records {} rejected   storage {} errors, {} timeouts",
        c.packets_accepted, c.packets_rejected, c.records_rejected, c.storage_errors, c.storage_timeouts
    );
    out
}

fn master_text(v: &NodeView) -> String {
    match v.master {
        None => "none".to_string(),
        Some(m) if v.is_master => format!("{} ({m}, this host)", clean(&host_name(v, m))),
        Some(m) => format!("{} ({m})", clean(&host_name(v, m))),
    }
}

fn host_name(v: &NodeView, id: HostId) -> String {
    v.hosts.iter().find(|h| h.id == id).map_or_else(|| id.to_string(), |h| h.name.clone())
}

/// The verdict `havirt status` shows: "fenced" for a host whose current
/// boot was confirmed powered off and that is not heard from (its engine
/// verdict stays suspect or unknown: silence), else the engine's verdict.
pub fn shown_verdict(h: &HostView) -> &str {
    let heard = matches!(h.verdict.as_str(), "self" | "alive" | "partitioned" | "isolated" | "storage-lost");
    if h.fenced && !heard { "fenced" } else { &h.verdict }
}

fn host_row(v: &NodeView, h: &HostView) -> Vec<String> {
    let mut flags = Vec::new();
    if v.master == Some(h.id) {
        flags.push("master");
    }
    if h.isolated {
        flags.push("isolated");
    }
    if h.self_fenced {
        flags.push("self-fenced");
    }
    if h.maintenance {
        flags.push("maintenance");
    }
    let size = |known: bool, text: String| if known { text } else { "?".to_string() };
    vec![
        h.id.to_string(),
        h.name.clone(),
        shown_verdict(h).to_string(),
        h.net_age.map_or_else(|| "-".to_string(), age),
        h.slot_age.map_or_else(|| "-".to_string(), age),
        format!("{}/{}", mib(h.used_memory_mib), size(h.memory_mib > 0, mib(h.memory_mib))),
        format!("{}/{}", h.used_vcpus, size(h.vcpus > 0, h.vcpus.to_string())),
        if flags.is_empty() { "-".to_string() } else { flags.join(",") },
    ]
}

fn domain_row(v: &NodeView, d: &DomainView) -> Vec<String> {
    let uuid = format!("{:032x}", d.id.0);
    vec![
        d.name.clone(),
        uuid[..8].to_string(),
        crate::hypervisor::metadata::priority_str(d.priority).to_string(),
        d.host.map_or_else(|| "-".to_string(), |h| host_name(v, h)),
        d.state.map_or("-", state_name).to_string(),
        d.generation.map_or_else(|| "-".to_string(), |g| g.to_string()),
        d.local.clone().unwrap_or_else(|| "-".to_string()),
    ]
}

fn state_name(s: DomainState) -> &'static str {
    match s {
        DomainState::Starting => "starting",
        DomainState::Running => "running",
        DomainState::Ready => "ready",
        DomainState::Released { failed_start: false } => "released",
        DomainState::Released { failed_start: true } => "released(start-failed)",
        DomainState::HandedOver { .. } => "migrated-away",
        DomainState::Stopped => "stopped",
    }
}

/// Fixed-width columns, as wide as their widest cell, two spaces apart; no
/// trailing blanks.
fn table(out: &mut String, header: &[&str], rows: &[Vec<String>]) {
    let header: Vec<String> = header.iter().map(|h| (*h).to_string()).collect();
    let lines: Vec<Vec<String>> =
        std::iter::once(header).chain(rows.iter().map(|r| r.iter().map(|c| clean(c)).collect())).collect();
    let columns = lines.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..columns)
        .map(|i| lines.iter().filter_map(|l| l.get(i)).map(|c| c.chars().count()).max().unwrap_or(0))
        .collect();
    for line in &lines {
        let mut text = String::new();
        for (cell, width) in line.iter().zip(&widths) {
            let _ = write!(text, "{cell:<width$}  ");
        }
        out.push_str(text.trim_end());
        out.push('\n');
    }
}

/// Ages and uptimes: "0.4s", "12.0s", "3m05s", "2h10m", "4d03h" (rounded down).
fn age(d: Duration) -> String {
    let ms = d.as_millis();
    let s = ms / 1000;
    if s < 60 {
        format!("{s}.{}s", (ms % 1000) / 100)
    } else if s < 3600 {
        format!("{}m{:02}s", s / 60, s % 60)
    } else if s < 86_400 {
        format!("{}h{:02}m", s / 3600, (s % 3600) / 60)
    } else {
        format!("{}d{:02}h", s / 86_400, (s % 86_400) / 3600)
    }
}

/// "512M", "4G", "1.5G" (tenths rounded down).
fn mib(m: u64) -> String {
    if m < 1024 {
        return format!("{m}M");
    }
    let tenths = m * 10 / 1024;
    if tenths.is_multiple_of(10) { format!("{}G", tenths / 10) } else { format!("{}.{}G", tenths / 10, tenths % 10) }
}

/// Names come from libvirt and peers: never let one drive the terminal.
fn clean(s: &str) -> String {
    s.chars().map(|c| if c.is_control() { '?' } else { c }).collect()
}

/// `havirt events`: one line per event, oldest first as given: UTC time
/// (RFC 3339, milliseconds), host, role, text. Empty input gives "".
pub fn render_events(events: &[EventRecord]) -> String {
    let host_width = events.iter().map(|e| e.event.host.to_string().len()).max().unwrap_or(0);
    let role_width = events.iter().map(|e| clean(&e.event.role).chars().count()).max().unwrap_or(0);
    let mut out = String::new();
    for e in events {
        let Event { host, role, text, .. } = &e.event;
        let line = format!(
            "{}  {:<host_width$}  {:<role_width$}  {}",
            rfc3339_ms(e.unix_ms),
            host.to_string(),
            clean(role),
            clean(text)
        );
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// Milliseconds since the Unix epoch as RFC 3339 UTC with milliseconds,
/// e.g. "2023-11-14T22:13:20.123Z".
pub fn rfc3339_ms(unix_ms: u64) -> String {
    let (days, ms_of_day) = (unix_ms / 86_400_000, unix_ms % 86_400_000);
    let (year, month, day) = civil_from_days(days);
    let s = ms_of_day / 1000;
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        s / 3600,
        (s % 3600) / 60,
        s % 60,
        ms_of_day % 1000
    )
}

/// (year, month, day) of a day count since 1970-01-01, proleptic Gregorian
/// (Howard Hinnant's `civil_from_days`, for non-negative days).
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    (year, month, day)
}

// ---------------------------------------------------------------------------
// JSON for scripts

/// `havirt status --json`: pretty JSON with field names kept stable for
/// scripts, independent of the internal types. Times are milliseconds
/// (`*_ms`), `null` when unknown; hosts are named, ids given beside.
///
/// - `cluster`, `host` (this host's name), `host_id`, `uptime_ms`
/// - `master` (name of the master lease owner or null), `is_master`
/// - `self_fence` ("healthy" | "fencing" | "fenced"), `isolated`,
///   `storage_healthy` (S4), `last_good_write_age_ms`
/// - `tolerates_host_failures`, `tolerates_fault_domain_failures`: null
///   unless this host is the master
/// - `admission`: `mode` ("off" | "warn" | "strict"), `tolerate_host_failures`,
///   `tolerate_fault_domain_failures` (as configured), `breach` (master
///   only: why the figure is below them, else null)
/// - `hosts[]`: `id`, `name`, `verdict` ("fenced" for a silent host whose
///   boot was confirmed off, else the engine's), `fenced`, `net_age_ms`, `slot_age_ms`, `boot`
///   (16 hex digits or null), `isolated`, `self_fenced`, `maintenance`, `memory_mib` (0:
///   unknown), `used_memory_mib`, `vcpus` (0: unknown), `used_vcpus`
/// - `domains[]` (by uuid): `uuid` (8-4-4-4-12), `name`, `priority`, `host`
///   (name or null), `host_id`, `state` ("starting" | "running" | "ready" |
///   "released" | "released(start-failed)" | null), `generation`, `local`
/// - `counters`: `packets_accepted`, `packets_rejected`, `records_rejected`,
///   `storage_errors`, `storage_timeouts`
///
/// The HTTP API's `GET /api/v1/status` serves this same text.
pub fn status_json(r: &StatusReport) -> String {
    let v = &r.view;
    let json = StatusJson {
        cluster: &r.cluster,
        host: &r.host_name,
        host_id: v.host.0,
        uptime_ms: r.uptime_ms,
        master: v.master.map(|m| host_name(v, m)),
        is_master: v.is_master,
        self_fence: &v.self_fence,
        isolated: v.isolated,
        storage_healthy: v.storage_healthy,
        last_good_write_age_ms: v.last_good_write_age.map(Duration::as_millis),
        tolerates_host_failures: v.tolerance.map(|t| t.0),
        tolerates_fault_domain_failures: v.tolerance.map(|t| t.1),
        admission: AdmissionJson {
            mode: admission_word(v.admission.mode),
            tolerate_host_failures: v.admission.host_failures,
            tolerate_fault_domain_failures: v.admission.fault_domain_failures,
            breach: v.admission_breach.as_deref(),
        },
        hosts: v.hosts.iter().map(host_json).collect(),
        domains: v.domains.iter().map(|d| domain_json(v, d)).collect(),
        counters: r.counters,
    };
    serde_json::to_string_pretty(&json).expect("a status report always encodes")
}

/// `havirt events --json` and `GET /api/v1/events`: a JSON array, oldest
/// first, of `seq` (page on with `after=seq`), `unix_ms`, `time` (RFC 3339
/// UTC), `host_id` (the host that logged it), `role`, `text`.
pub fn events_json(events: &[EventRecord]) -> String {
    let list: Vec<EventJson<'_>> = events
        .iter()
        .map(|e| EventJson {
            seq: e.seq,
            unix_ms: e.unix_ms,
            time: rfc3339_ms(e.unix_ms),
            host_id: e.event.host.0,
            role: &e.event.role,
            text: &e.event.text,
        })
        .collect();
    serde_json::to_string_pretty(&list).expect("events always encode")
}

#[derive(Serialize)]
struct EventJson<'a> {
    seq: u64,
    unix_ms: u64,
    time: String,
    host_id: u16,
    role: &'a str,
    text: &'a str,
}

#[derive(Serialize)]
struct AdmissionJson<'a> {
    mode: &'static str,
    tolerate_host_failures: u32,
    tolerate_fault_domain_failures: u32,
    breach: Option<&'a str>,
}

/// `[cluster] admission`'s word for a mode.
pub fn admission_word(m: AdmissionMode) -> &'static str {
    match m {
        AdmissionMode::Off => "off",
        AdmissionMode::Warn => "warn",
        AdmissionMode::Strict => "strict",
    }
}

#[derive(Serialize)]
struct StatusJson<'a> {
    cluster: &'a str,
    host: &'a str,
    host_id: u16,
    uptime_ms: u64,
    master: Option<String>,
    is_master: bool,
    self_fence: &'a str,
    isolated: bool,
    storage_healthy: bool,
    last_good_write_age_ms: Option<u64>,
    tolerates_host_failures: Option<u32>,
    tolerates_fault_domain_failures: Option<u32>,
    admission: AdmissionJson<'a>,
    hosts: Vec<HostJson<'a>>,
    domains: Vec<DomainJson<'a>>,
    counters: Counters,
}

#[derive(Serialize)]
struct HostJson<'a> {
    id: u16,
    name: &'a str,
    verdict: &'a str,
    fenced: bool,
    net_age_ms: Option<u64>,
    slot_age_ms: Option<u64>,
    boot: Option<String>,
    isolated: bool,
    self_fenced: bool,
    maintenance: bool,
    memory_mib: u64,
    used_memory_mib: u64,
    vcpus: u32,
    used_vcpus: u32,
}

#[derive(Serialize)]
struct DomainJson<'a> {
    uuid: String,
    name: &'a str,
    priority: &'static str,
    host: Option<String>,
    host_id: Option<u16>,
    state: Option<&'static str>,
    generation: Option<u64>,
    local: Option<&'a str>,
}

fn host_json(h: &HostView) -> HostJson<'_> {
    HostJson {
        id: h.id.0,
        name: &h.name,
        verdict: shown_verdict(h),
        fenced: h.fenced,
        net_age_ms: h.net_age.map(Duration::as_millis),
        slot_age_ms: h.slot_age.map(Duration::as_millis),
        boot: h.boot.map(|b| format!("{b:016x}")),
        isolated: h.isolated,
        self_fenced: h.self_fenced,
        maintenance: h.maintenance,
        memory_mib: h.memory_mib,
        used_memory_mib: h.used_memory_mib,
        vcpus: h.vcpus,
        used_vcpus: h.used_vcpus,
    }
}

fn domain_json<'a>(v: &NodeView, d: &'a DomainView) -> DomainJson<'a> {
    let hex = format!("{:032x}", d.id.0);
    DomainJson {
        uuid: format!("{}-{}-{}-{}-{}", &hex[..8], &hex[8..12], &hex[12..16], &hex[16..20], &hex[20..]),
        name: &d.name,
        priority: crate::hypervisor::metadata::priority_str(d.priority),
        host: d.host.map(|h| host_name(v, h)),
        host_id: d.host.map(|h| h.0),
        state: d.state.map(state_name),
        generation: d.generation,
        local: d.local.as_deref(),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::engine::config::DomainId;

    fn host(id: u16, name: &str, verdict: &str) -> HostView {
        HostView::sample(id, name, verdict)
    }

    /// Two hosts (this one, node-a, is master), one partitioned and isolated
    /// peer, two domains.
    pub(crate) fn report() -> StatusReport {
        let mut a = host(1, "node-a", "self");
        (a.slot_age, a.boot, a.memory_mib, a.vcpus, a.used_memory_mib, a.used_vcpus) =
            (Some(Duration(412)), Some(0xab), 65_536, 32, 6_144, 6);
        let mut b = host(2, "node-bravo", "partitioned");
        (b.net_age, b.slot_age, b.isolated, b.used_memory_mib, b.used_vcpus) =
            (Some(Duration(75_300)), Some(Duration(1_200)), true, 512, 1);
        let web = DomainView {
            id: DomainId(0x1a2b_3c4d_0000_4000_8000_0000_0000_0001),
            name: "web".to_string(),
            priority: Priority::High,
            host: Some(HostId(1)),
            state: Some(DomainState::Ready),
            generation: Some(7),
            local: Some("running".to_string()),
        };
        let db = DomainView {
            id: DomainId(0x0000_0000_0000_4000_8000_0000_0000_0002),
            name: "db".to_string(),
            priority: Priority::Highest,
            host: Some(HostId(2)),
            state: Some(DomainState::Released { failed_start: true }),
            generation: Some(12),
            local: None,
        };
        let view = NodeView {
            host: HostId(1),
            boot: 0xab,
            is_master: true,
            master: Some(HostId(1)),
            self_fence: "healthy".to_string(),
            isolated: false,
            storage_healthy: true,
            last_good_write_age: Some(Duration(412)),
            hosts: vec![a, b],
            domains: vec![web, db],
            tolerance: Some((1, 0)),
            admission: Default::default(),
            admission_breach: None,
            migration_failures: Vec::new(),
            given_up: Vec::new(),
        };
        let counters = Counters { packets_accepted: 1200, packets_rejected: 3, ..Counters::default() };
        StatusReport {
            cluster: "prod".to_string(),
            host_name: "node-a".to_string(),
            uptime_ms: 3_723_000,
            view,
            counters,
        }
    }

    #[test]
    fn status_renders_header_tables_and_counters() {
        let expected = "\
Cluster: prod   Host: node-a (h1)   Uptime: 1h02m   Master: node-a (h1, this host)
Self-fence: healthy   Isolated: no   Storage: ok (last write 0.4s ago)
Failover: tolerates 1 host failure(s), 0 fault-domain failure(s); admission control warn: needs 1 host, 0 fault-domain

HOSTS
ID  NAME        VERDICT      NET-AGE  SLOT-AGE  MEM(used/size)  VCPUS(used/size)  FLAGS
h1  node-a      self         -        0.4s      6G/64G          6/32              master
h2  node-bravo  partitioned  1m15s    1.2s      512M/?          1/?               isolated

DOMAINS
NAME  UUID      PRIORITY  HOST        STATE                   GEN  LOCAL
db    00000000  highest   node-bravo  released(start-failed)  12   -
web   1a2b3c4d  high      node-a      ready                   7    running

Counters: packets 1200 accepted, 3 rejected   records 0 rejected   storage 0 errors, 0 timeouts
";
        assert_eq!(render_status(&report()), expected);
    }

    #[test]
    fn status_without_master_tolerance_or_domains_says_so() {
        let mut r = report();
        (r.view.is_master, r.view.master, r.view.tolerance, r.view.storage_healthy) = (false, None, None, false);
        r.view.last_good_write_age = None;
        r.view.domains.clear();
        let text = render_status(&r);
        let header: Vec<&str> = text.lines().take(2).collect();
        assert!(header[0].ends_with("Master: none"), "{text}");
        assert_eq!(header[1], "Self-fence: healthy   Isolated: no   Storage: LOST (last write never)");
        assert!(text.contains("DOMAINS\n(none protected)\n"), "{text}");
        assert!(!text.contains("Failover"), "{text}");
        assert!(!text.lines().any(|l| l.ends_with(' ')), "no trailing blanks:\n{text}");
    }

    #[test]
    fn a_silent_host_confirmed_off_shows_fenced() {
        let fenced = HostView { fenced: true, ..host(2, "node-b", "suspect") };
        assert_eq!(shown_verdict(&fenced), "fenced");
        assert_eq!(shown_verdict(&HostView { fenced: true, ..host(2, "node-b", "unknown") }), "fenced");
        // Heard again (a new boot clears `fenced`; until then its verdict wins).
        assert_eq!(shown_verdict(&HostView { fenced: true, ..host(2, "node-b", "alive") }), "alive");
        assert_eq!(shown_verdict(&host(2, "node-b", "suspect")), "suspect");
        let mut r = report();
        r.view.hosts[1] = HostView { fenced: true, ..host(2, "node-b", "suspect") };
        let text = render_status(&r);
        assert!(text.lines().any(|l| l.starts_with("h2 ") && l.contains(" fenced ")), "{text}");
        let json: serde_json::Value = serde_json::from_str(&status_json(&r)).expect("json");
        assert_eq!(
            (json["hosts"][1]["verdict"].as_str(), json["hosts"][1]["fenced"].as_bool()),
            (Some("fenced"), Some(true))
        );
    }

    #[test]
    fn names_cannot_inject_terminal_control() {
        let mut r = report();
        r.view.domains[0].name = "evil\u{1b}[2J".to_string();
        r.cluster = "c\nx".to_string();
        let text = render_status(&r);
        assert!(!text.contains('\u{1b}'));
        assert!(text.starts_with("Cluster: c?x   "), "{text}");
        assert!(text.contains("evil?[2J"), "{text}");
    }

    #[test]
    fn ages_memory_and_seconds_are_short() {
        let cases = [(0, "0.0s"), (412, "0.4s"), (59_999, "59.9s"), (60_000, "1m00s"), (3_599_000, "59m59s")];
        for (ms, text) in cases {
            assert_eq!(age(Duration(ms)), text);
        }
        assert_eq!(age(Duration(3_600_000)), "1h00m");
        assert_eq!(age(Duration(90_061_000)), "1d01h");
        assert_eq!(
            (mib(0), mib(1023), mib(1024), mib(1536), mib(65_536)),
            ("0M".into(), "1023M".into(), "1G".into(), "1.5G".into(), "64G".into())
        );
        assert_eq!((seconds(60_000), seconds(500), seconds(1_250)), ("60".into(), "0.5".into(), "1.25".into()));
    }

    #[test]
    fn rfc3339_matches_known_dates() {
        assert_eq!(rfc3339_ms(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339_ms(951_782_400_000), "2000-02-29T00:00:00.000Z");
        assert_eq!(rfc3339_ms(951_868_799_999), "2000-02-29T23:59:59.999Z");
        assert_eq!(rfc3339_ms(1_700_000_000_123), "2023-11-14T22:13:20.123Z");
        assert_eq!(rfc3339_ms(4_107_542_400_000), "2100-03-01T00:00:00.000Z");
        assert_eq!(rfc3339_ms(1_709_164_800_000), "2024-02-29T00:00:00.000Z");
    }

    #[test]
    fn events_render_one_aligned_line_each() {
        let event = |seq, unix_ms, host, role: &str, text: &str| EventRecord {
            seq,
            unix_ms,
            event: Event {
                at: crate::engine::time::Instant(seq),
                host: HostId(host),
                role: role.to_string(),
                text: text.to_string(),
            },
        };
        let events = [
            event(1, 1_700_000_000_123, 1, "node", "daemon started"),
            event(2, 1_700_000_001_000, 12, "master", "h2 suspect: no heartbeat for 2.000s"),
        ];
        let expected = "\
2023-11-14T22:13:20.123Z  h1   node    daemon started
2023-11-14T22:13:21.000Z  h12  master  h2 suspect: no heartbeat for 2.000s
";
        assert_eq!(render_events(&events), expected);
        assert_eq!(render_events(&[]), "");
    }

    #[test]
    fn status_json_has_the_documented_names() {
        let json: serde_json::Value = serde_json::from_str(&status_json(&report())).expect("valid JSON");
        let top = ["cluster", "host", "host_id", "uptime_ms", "master", "is_master", "self_fence", "isolated"];
        let more = ["storage_healthy", "last_good_write_age_ms", "tolerates_host_failures"];
        for key in top.iter().chain(&more).chain(&["tolerates_fault_domain_failures", "hosts", "domains", "counters"]) {
            assert!(json.get(key).is_some(), "missing {key}");
        }
        assert_eq!(json["master"], "node-a");
        assert_eq!(json["tolerates_host_failures"], 1);
        assert_eq!(json["hosts"][0]["boot"], "00000000000000ab");
        assert_eq!(json["hosts"][1]["net_age_ms"], 75_300);
        assert_eq!(json["hosts"][0]["net_age_ms"], serde_json::Value::Null);
        assert_eq!(json["domains"][0]["uuid"], "1a2b3c4d-0000-4000-8000-000000000001");
        assert_eq!(json["domains"][1]["state"], "released(start-failed)");
        assert_eq!(json["domains"][1]["host"], "node-bravo");
        assert_eq!(json["counters"]["packets_accepted"], 1200);
    }

    #[test]
    fn only_root_may_use_the_socket() {
        assert!(peer_allowed(0));
        assert!(!peer_allowed(1));
        assert!(!peer_allowed(65_534));
    }

    #[test]
    fn requests_parse_or_say_what_was_expected() {
        assert_eq!(parse_request(b"\"Status\""), Ok(Request::Status));
        assert_eq!(parse_request(br#"{"Events":{"after":5}}"#), Ok(Request::Events { after: 5 }));
        let bad = parse_request(b"{\"Stat").expect_err("truncated JSON");
        assert!(bad.starts_with("invalid request: ") && bad.contains("e.g. \"Status\""), "{bad}");
        let unknown = parse_request(b"\"Reboot\"").expect_err("unknown request");
        assert!(unknown.contains("Reboot"), "{unknown}");
        assert!(parse_request(b"  ").expect_err("blank").starts_with("empty request"));
    }

    #[test]
    fn client_errors_say_what_to_do() {
        let path = Path::new("/run/havirt/control.sock");
        let cases = [
            (
                io::ErrorKind::NotFound,
                "no havirt daemon is listening on /run/havirt/control.sock: start it (systemctl start havirt) or pass --socket",
            ),
            (io::ErrorKind::PermissionDenied, "permission denied on /run/havirt/control.sock: run as root"),
            (
                io::ErrorKind::ConnectionRefused,
                "/run/havirt/control.sock is a stale socket: the havirt daemon is not running; start it (systemctl start havirt) or pass --socket",
            ),
        ];
        for (kind, text) in cases {
            assert_eq!(connect_error(path, &io::Error::from(kind)).to_string(), text);
        }
        let timeout = io_error(path, &io::Error::from(io::ErrorKind::WouldBlock), 2_500).to_string();
        assert!(timeout.starts_with("the daemon at /run/havirt/control.sock did not answer within 2.5 s"), "{timeout}");
    }

    #[test]
    fn a_response_is_one_json_line() {
        let line = encode_response(&Response::Done("ok".to_string()));
        assert_eq!(line, b"{\"Done\":\"ok\"}\n");
    }
}
