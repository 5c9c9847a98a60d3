//! The control socket end to end: `bind` and `serve` on a real unix socket in
//! a temp dir, a stub daemon answering through the channel, and the blocking
//! client (run on tokio's blocking pool). Checks the round trip, what bad or
//! silent clients get, and what bind and the client say about stale, live,
//! missing and foreign files.

use havirt::control::EventRecord;
use havirt::control::{
    Call, ControlError, Counters, MAX_REQUEST_BYTES, PolicyChanges, ROOT_ONLY, Request, Response, ServeLimits,
    StatusReport, bind, request, serve, serve_with_limits,
};
use havirt::engine::config::HostId;
use havirt::engine::io::Event;
use havirt::engine::time::Instant;
use havirt::engine::view::NodeView;
use havirt::failover::FailoverRecord;
use std::io::{Read, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;
use tokio::sync::mpsc;

/// Longest a client waits in these tests before failing them.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(10);
/// Short server timeouts for the tests that wait for one to fire.
const SHORT_MS: u64 = 200;

/// A fresh directory under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("havirt-control-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create the test dir");
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn report() -> StatusReport {
    let view = NodeView {
        host: HostId(1),
        boot: 7,
        is_master: false,
        master: None,
        self_fence: "healthy".to_string(),
        isolated: false,
        storage_healthy: true,
        last_good_write_age: None,
        hosts: vec![],
        domains: vec![],
        tolerance: None,
        admission: Default::default(),
        admission_breach: None,
        migration_failures: vec![],
        given_up: Vec::new(),
    };
    StatusReport {
        cluster: "test".to_string(),
        host_name: "node-a".to_string(),
        uptime_ms: 1_000,
        view,
        counters: Counters::default(),
    }
}

fn events() -> Vec<EventRecord> {
    let event = |seq: u64, text: &str| EventRecord {
        seq,
        unix_ms: 1_700_000_000_000 + seq,
        event: Event { at: Instant(seq), host: HostId(2), role: "master".into(), text: text.into() },
    };
    vec![event(1, "daemon started"), event(2, "became master")]
}

fn failovers() -> Vec<FailoverRecord> {
    vec![FailoverRecord {
        host: "node-b".into(),
        host_id: HostId(2),
        boot: Some(0xab),
        detected_unix_ms: 1_700_000_000_000,
        verdict: "suspect".into(),
        silent_before_ms: None,
        steps: vec![],
        domains: vec![],
    }]
}

/// The stub daemon: Status gets `report()`, Events `events()` (after the
/// sequence number asked), Failovers `failovers()`, anything else
/// `Done(debug)`. Counts what reached it.
async fn answer(mut rx: mpsc::Receiver<Call>, seen: Arc<AtomicUsize>) {
    while let Some((req, reply)) = rx.recv().await {
        seen.fetch_add(1, Ordering::SeqCst);
        let response = match req {
            Request::Status => Response::Status(Box::new(report())),
            Request::Events { after } => Response::Events(events().into_iter().filter(|e| e.seq > after).collect()),
            Request::Failovers => Response::Failovers(failovers()),
            other => Response::Done(format!("{other:?}")),
        };
        let _ = reply.send(response);
    }
}

/// Binds `path` and serves it with the stub daemon; returns its counter.
fn start(path: &Path, limits: ServeLimits) -> Arc<AtomicUsize> {
    let listener = bind(path).expect("bind the control socket");
    let (tx, rx) = mpsc::channel(8);
    let seen = Arc::new(AtomicUsize::new(0));
    tokio::spawn(serve_with_limits(listener, tx, limits));
    tokio::spawn(answer(rx, Arc::clone(&seen)));
    seen
}

async fn call(path: &Path, req: Request) -> Result<Response, ControlError> {
    let path = path.to_path_buf();
    tokio::task::spawn_blocking(move || request(&path, &req, CLIENT_TIMEOUT)).await.expect("client thread")
}

/// Sends raw bytes, closes the sending side, then reads the one answer line.
async fn raw(path: &Path, bytes: &'static [u8]) -> Response {
    let path = path.to_path_buf();
    let answer = tokio::task::spawn_blocking(move || {
        let mut stream = std::os::unix::net::UnixStream::connect(&path).expect("connect");
        stream.set_read_timeout(Some(CLIENT_TIMEOUT)).expect("set timeout");
        stream.write_all(bytes).expect("send");
        stream.shutdown(std::net::Shutdown::Write).expect("close the sending side");
        let mut answer = String::new();
        stream.read_to_string(&mut answer).expect("read the answer");
        answer
    });
    let answer = answer.await.expect("client thread");
    assert!(answer.ends_with('\n') && answer.lines().count() == 1, "one line: {answer:?}");
    serde_json::from_str(&answer).expect("a JSON Response")
}

fn error_text(response: Response) -> String {
    match response {
        Response::Error(text) => text,
        other => panic!("expected an error, got {other:?}"),
    }
}

#[tokio::test]
async fn requests_round_trip() {
    let dir = TempDir::new("round-trip");
    let path = dir.0.join("control.sock");
    let seen = start(&path, ServeLimits::default());
    assert_eq!(call(&path, Request::Status).await, Ok(Response::Status(Box::new(report()))));
    let protect = Request::Protect { domain: "web".to_string(), changes: PolicyChanges::default() };
    let done = call(&path, protect.clone()).await.expect("answered");
    assert_eq!(done, Response::Done(format!("{protect:?}")));
    assert_eq!(seen.load(Ordering::SeqCst), 2);
    // A client that closes its side instead of sending a newline is served.
    assert_eq!(raw(&path, b"\"Status\"").await, Response::Status(Box::new(report())));
}

/// `havirt ARGS --socket PATH` (the real binary) on the blocking pool: (success, stdout).
async fn havirt(path: &Path, args: &'static [&'static str]) -> (bool, String) {
    let path = path.to_path_buf();
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_havirt")).args(args).arg("--socket").arg(&path).output()
    });
    let out = out.await.expect("client thread").expect("run havirt");
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The CLI's --json prints what the HTTP API serves: the same functions
/// shape both (src/daemon/http.rs).
#[tokio::test]
async fn json_of_events_and_failovers_is_the_apis() {
    let dir = TempDir::new("json");
    let path = dir.0.join("control.sock");
    start(&path, ServeLimits::default());
    let (ok, out) = havirt(&path, &["events", "--json"]).await;
    assert!(ok, "{out}");
    assert_eq!(out, havirt::control::events_json(&events()) + "\n");
    let parsed: serde_json::Value = serde_json::from_str(&out).expect("JSON");
    assert_eq!(parsed[1]["text"], "became master");
    assert_eq!(parsed[1]["host_id"], 2);
    let (ok, out) = havirt(&path, &["events", "--failovers", "--json"]).await;
    assert!(ok, "{out}");
    assert_eq!(out, havirt::failover::failovers_json(&failovers()) + "\n");
    let parsed: serde_json::Value = serde_json::from_str(&out).expect("JSON");
    assert_eq!((parsed[0]["host"].as_str(), parsed[0]["boot"].as_str()), (Some("node-b"), Some("00000000000000ab")));
    let (ok, _) = havirt(&path, &["events", "--json", "--follow"]).await;
    assert!(!ok, "--json with --follow is refused");
}

#[tokio::test]
async fn the_socket_is_root_only_and_its_new_directory_private() {
    let dir = TempDir::new("modes");
    let path = dir.0.join("run/havirt/control.sock");
    let _seen = start(&path, ServeLimits::default());
    let mode = |p: &Path| std::fs::metadata(p).expect("exists").permissions().mode() & 0o7777;
    assert_eq!(mode(&path), 0o600, "socket mode");
    assert_eq!(mode(&dir.0.join("run/havirt")), 0o700, "created directory mode");
    assert_eq!(mode(&dir.0.join("run")), 0o700, "created directory mode");
}

#[tokio::test]
async fn bad_requests_get_an_error_and_reach_nobody() {
    let dir = TempDir::new("bad-requests");
    let path = dir.0.join("control.sock");
    let seen = start(&path, ServeLimits::default());
    let invalid = error_text(raw(&path, b"{not json\n").await);
    assert!(invalid.starts_with("invalid request: "), "{invalid}");
    let unknown = error_text(raw(&path, b"\"Reboot\"\n").await);
    assert!(unknown.contains("Reboot"), "{unknown}");
    assert!(error_text(raw(&path, b"\n").await).starts_with("empty request"));
    // A valid request, but too long: read no further than the limit.
    let huge = Request::Unprotect { domain: "x".repeat(MAX_REQUEST_BYTES) };
    let too_long = error_text(call(&path, huge).await.expect("answered"));
    assert!(too_long.starts_with(&format!("request longer than {MAX_REQUEST_BYTES} bytes")), "{too_long}");
    assert_eq!(seen.load(Ordering::SeqCst), 0, "nothing was forwarded");
    assert_eq!(call(&path, Request::Status).await, Ok(Response::Status(Box::new(report()))));
}

#[tokio::test]
async fn a_silent_client_neither_blocks_others_nor_stays_forever() {
    let dir = TempDir::new("silent");
    let path = dir.0.join("control.sock");
    let limits = ServeLimits { read_timeout_ms: SHORT_MS, ..ServeLimits::default() };
    let _seen = start(&path, limits);
    let silent_path = path.clone();
    let silent = tokio::task::spawn_blocking(move || {
        let mut stream = std::os::unix::net::UnixStream::connect(&silent_path).expect("connect");
        stream.set_read_timeout(Some(CLIENT_TIMEOUT)).expect("set timeout");
        let mut answer = String::new();
        stream.read_to_string(&mut answer).expect("read the answer");
        answer
    });
    assert_eq!(call(&path, Request::Status).await, Ok(Response::Status(Box::new(report()))));
    let answer: Response = serde_json::from_str(&silent.await.expect("client thread")).expect("a JSON Response");
    assert_eq!(error_text(answer), "no request line within 0.2 s; send one JSON request followed by a newline");
}

#[tokio::test]
async fn a_stuck_daemon_is_reported_not_waited_for() {
    let dir = TempDir::new("stuck");
    let path = dir.0.join("control.sock");
    let listener = bind(&path).expect("bind");
    let (tx, mut rx) = mpsc::channel::<Call>(8);
    let limits = ServeLimits { answer_timeout_ms: SHORT_MS, ..ServeLimits::default() };
    tokio::spawn(serve_with_limits(listener, tx, limits));
    // Takes requests and never answers them.
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Some(call) = rx.recv().await {
            held.push(call);
        }
    });
    let stuck = error_text(call(&path, Request::Status).await.expect("answered"));
    assert!(stuck.starts_with("the daemon did not answer within 0.2 s"), "{stuck}");
}

#[tokio::test]
async fn extra_connections_are_told_the_daemon_is_busy() {
    let dir = TempDir::new("busy");
    let path = dir.0.join("control.sock");
    let _seen = start(&path, ServeLimits { max_connections: 1, ..ServeLimits::default() });
    let _holder = std::os::unix::net::UnixStream::connect(&path).expect("connect");
    tokio::time::sleep(Duration::from_millis(100)).await; // let serve accept it
    let busy = error_text(call(&path, Request::Status).await.expect("answered"));
    assert!(busy.starts_with("the daemon is serving 1 control requests already"), "{busy}");
}

#[tokio::test]
async fn serve_ends_when_the_daemon_drops_its_receiver() {
    let dir = TempDir::new("shutdown");
    let path = dir.0.join("control.sock");
    let listener = bind(&path).expect("bind");
    let (tx, rx) = mpsc::channel::<Call>(8);
    let server = tokio::spawn(serve(listener, tx));
    drop(rx);
    tokio::time::timeout(Duration::from_secs(5), server).await.expect("serve returned").expect("no panic");
}

#[tokio::test]
async fn a_second_daemon_cannot_take_a_live_socket() {
    let dir = TempDir::new("live");
    let path = dir.0.join("control.sock");
    let _seen = start(&path, ServeLimits::default());
    let err = bind(&path).expect_err("the socket is live");
    assert_eq!(err, ControlError::AlreadyListening { path: path.clone() });
    assert!(err.to_string().starts_with(&format!("another havirt daemon already listens on {}", path.display())));
    assert_eq!(call(&path, Request::Status).await, Ok(Response::Status(Box::new(report()))), "still served");
}

#[tokio::test]
async fn a_stale_socket_is_replaced_and_a_foreign_file_is_not() {
    let dir = TempDir::new("stale");
    let path = dir.0.join("control.sock");
    drop(std::os::unix::net::UnixListener::bind(&path).expect("bind a socket"));
    assert!(path.exists(), "a crashed daemon leaves its socket file");
    let stale = call(&path, Request::Status).await.expect_err("nothing listens");
    assert_eq!(stale, ControlError::StaleSocket { path: path.clone() });
    let _seen = start(&path, ServeLimits::default());
    assert_eq!(call(&path, Request::Status).await, Ok(Response::Status(Box::new(report()))));

    let file = dir.0.join("not-a-socket");
    std::fs::write(&file, "data").expect("write a file");
    assert_eq!(bind(&file).expect_err("a regular file"), ControlError::NotASocket { path: file.clone() });
    assert_eq!(std::fs::read_to_string(&file).expect("still there"), "data");
}

#[test]
fn the_client_says_how_to_start_a_missing_daemon() {
    let dir = TempDir::new("missing");
    let path = dir.0.join("control.sock");
    let err = request(&path, &Request::Status, CLIENT_TIMEOUT).expect_err("no socket");
    assert_eq!(err, ControlError::NoDaemon { path: path.clone() });
    let text = format!(
        "no havirt daemon is listening on {}: start it (systemctl start havirt) or pass --socket",
        path.display()
    );
    assert_eq!(err.to_string(), text);
}

#[test]
fn the_client_gives_up_on_a_daemon_that_never_answers() {
    let dir = TempDir::new("client-timeout");
    let path = dir.0.join("control.sock");
    // Listens (the kernel completes connects) but never accepts or answers.
    let _listener = std::os::unix::net::UnixListener::bind(&path).expect("bind");
    let err = request(&path, &Request::Status, Duration::from_millis(300)).expect_err("no answer");
    assert_eq!(err, ControlError::Timeout { path: path.clone(), timeout_ms: 300 });
    assert!(err.to_string().starts_with(&format!("the daemon at {} did not answer within 0.3 s", path.display())));
}

/// Environment variable naming the socket for `client_as_nobody`.
const NOBODY_SOCKET_ENV: &str = "HAVIRT_TEST_NOBODY_SOCKET";
const NOBODY_UID: u32 = 65_534;

/// Runs `client_as_nobody` in a child process as uid/gid 65534 and returns
/// what it printed; None when this test process is not root.
fn run_as_nobody(path: &Path) -> Option<String> {
    let euid = std::fs::metadata("/proc/self").expect("procfs").uid();
    if euid != 0 {
        eprintln!("skipped: only root can run a client as another user");
        return None;
    }
    use std::os::unix::process::CommandExt;
    let output = std::process::Command::new(std::env::current_exe().expect("test binary"))
        .args(["--ignored", "--exact", "client_as_nobody", "--nocapture", "--test-threads=1"])
        .env(NOBODY_SOCKET_ENV, path)
        .uid(NOBODY_UID)
        .gid(NOBODY_UID)
        .output()
        .expect("run the test binary as nobody");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(output.status.success(), "child failed: {stdout}{}", String::from_utf8_lossy(&output.stderr));
    Some(stdout)
}

#[test]
#[ignore = "helper: run_as_nobody starts it as uid 65534"]
fn client_as_nobody() {
    let path = PathBuf::from(std::env::var_os(NOBODY_SOCKET_ENV).expect("socket path in the environment"));
    match request(&path, &Request::Status, CLIENT_TIMEOUT) {
        Ok(response) => println!("RESPONSE {response:?}"),
        Err(e) => println!("CLIENT-ERROR {e}"),
    }
}

#[tokio::test]
async fn a_non_root_peer_is_refused_by_mode_and_by_credentials() {
    let dir = TempDir::new("non-root");
    std::fs::set_permissions(&dir.0, std::fs::Permissions::from_mode(0o755)).expect("chmod the test dir");
    let path = dir.0.join("control.sock");
    let seen = start(&path, ServeLimits::default());
    let child_path = path.clone();
    let Some(denied) = tokio::task::spawn_blocking(move || run_as_nobody(&child_path)).await.expect("thread") else {
        return;
    };
    let expected = format!("CLIENT-ERROR permission denied on {}: run as root", path.display());
    assert!(denied.contains(&expected), "{denied}");
    // Were the mode loosened, the peer check still refuses.
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o666)).expect("chmod the socket");
    let child_path = path.clone();
    let refused = tokio::task::spawn_blocking(move || run_as_nobody(&child_path)).await.expect("thread");
    let refused = refused.expect("root");
    assert!(refused.contains(&format!("RESPONSE Error({ROOT_ONLY:?})")), "{refused}");
    assert_eq!(seen.load(Ordering::SeqCst), 0, "nothing was forwarded");
}
