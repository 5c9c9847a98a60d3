//! The lab's watchdog supervisor: the watchdog device this machine lacks
//! (LAB-NOTES.md, "What does not exist here").
//!
//! One per lab host. It binds a unix datagram socket (`LAB_DIR/hN/watchdog.sock`
//! in the lab) and reads the protocol of [`crate::fence::watchdog::LabWatchdog`]:
//!
//! - `pet <timeout_ms>` arms it (the first one) or puts the power-off off by
//!   the timeout that pet carries;
//! - `disarm` (magic close) stops watching without firing, until the next pet;
//! - anything else is ignored (and counted).
//!
//! When no datagram arrives for `timeout_ms` after the last pet, it runs the
//! host's power-off action (in the lab: SIGKILL of the host's PID-namespace
//! init) once for that arming, and records when ([`Arming`]). It never fires
//! before `timeout_ms` after it *received* the last pet, so never before the
//! timeout counted from the daemon's send either.
//!
//! After firing, datagrams are discarded for [`FIRE_SETTLE`] after the action
//! returned: a SIGKILL of a PID namespace's init takes some milliseconds to
//! kill everything, and a pet the dying daemon sent meanwhile must not re-arm
//! the watchdog (it would then fire again, at the host's next boot). The next
//! pet after that is a new boot: it arms again.
//!
//! The decisions are in [`Watch`], which takes time as an argument and is
//! unit-tested on synthetic times; [`Supervisor`] only drives it from a
//! thread of its own with the real clock.

use std::io;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::fence::watchdog::LAB_DATAGRAM_MAX_BYTES;

/// How often the supervisor thread checks for `stop` while nothing happens.
pub const STOP_POLL: Duration = Duration::from_millis(50);
/// After the power-off action returned, datagrams are discarded this long
/// (see the module doc). A lab host needs far longer to boot and pet again.
pub const FIRE_SETTLE: Duration = Duration::from_millis(250);
/// A pet's timeout is clamped to this: a nonsense timeout must not overflow
/// the clock, and a day is longer than any lab run.
pub const MAX_TIMEOUT_MS: u64 = 24 * 3600 * 1000;
/// Armings kept in the history; older ones are dropped (a lab runs for
/// hours; every boot arms once).
pub const HISTORY_MAX: usize = 10_000;

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SupervisorError {
    #[error(
        "watchdog supervisor: cannot bind unix datagram socket {socket}: {reason}; check that its directory exists and that no other supervisor serves this host"
    )]
    Bind { socket: PathBuf, reason: String },
    #[error(
        "watchdog supervisor: {socket} exists and is not a socket; refusing to replace it (remove it, or choose another path)"
    )]
    NotASocket { socket: PathBuf },
    #[error("watchdog supervisor: cannot start its thread: {reason}")]
    Spawn { reason: String },
}

/// A moment, on the monotonic clock (for measuring) and as wall-clock
/// milliseconds since the Unix epoch (for matching logs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stamp {
    pub at: Instant,
    pub wall_ms: u64,
}

impl Stamp {
    /// The real clock: this is lab tooling, not the engine.
    #[allow(
        clippy::disallowed_methods,
        reason = "the lab watchdog fires on real time; it is lab tooling, not the engine"
    )]
    pub fn now() -> Stamp {
        let wall = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
        Stamp { at: Instant::now(), wall_ms: u64::try_from(wall.as_millis()).unwrap_or(u64::MAX) }
    }
}

/// One arming: from the first pet to the power-off or the disarm.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Arming {
    pub armed_at: Stamp,
    pub last_pet_at: Stamp,
    /// The timeout carried by the last pet (clamped to [`MAX_TIMEOUT_MS`]).
    pub timeout_ms: u64,
    pub pets: u64,
    /// When the supervisor decided to power off (just before the action).
    pub fired_at: Option<Stamp>,
    /// When the power-off action returned.
    pub action_done_at: Option<Stamp>,
    pub disarmed_at: Option<Stamp>,
    /// Datagrams discarded during [`FIRE_SETTLE`] after this arming fired.
    pub discarded_after_fire: u64,
}

impl Arming {
    /// When it fires unless petted again.
    pub fn deadline(&self) -> Instant {
        self.last_pet_at.at + Duration::from_millis(self.timeout_ms)
    }

    /// From the last pet to the power-off decision (`None`: not fired).
    pub fn fire_delay(&self) -> Option<Duration> {
        self.fired_at.map(|f| f.at.saturating_duration_since(self.last_pet_at.at))
    }
}

/// One datagram of the lab protocol.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Datagram {
    Pet {
        timeout_ms: u64,
    },
    Disarm,
    /// Anything else (ignored).
    Other,
}

/// Parses one datagram (one line; the final newline is optional). `pet 0`
/// is no pet: a zero timeout would fire at once.
pub fn parse_datagram(bytes: &[u8]) -> Datagram {
    let Ok(text) = std::str::from_utf8(bytes) else { return Datagram::Other };
    let line = text.strip_suffix('\n').unwrap_or(text);
    if line == "disarm" {
        return Datagram::Disarm;
    }
    match line.strip_prefix("pet ").map(str::parse::<u64>) {
        Some(Ok(ms)) if ms > 0 => Datagram::Pet { timeout_ms: ms.min(MAX_TIMEOUT_MS) },
        _ => Datagram::Other,
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Idle,
    /// The last arming in the history is being watched.
    Armed,
    /// The last arming fired; its action has not returned yet.
    Firing,
    /// The last arming fired; datagrams are discarded until then.
    Settling {
        until: Instant,
    },
}

/// The supervisor's decisions, on time given by the caller. Call order: for
/// each datagram `handle_timeout(now)` first (a pet that arrives after the
/// deadline is too late), then `handle_datagram`; when `handle_timeout`
/// returns true, run the power-off action, then `handle_action_done`.
/// Between events, wait at most until `poll_timeout()`.
#[derive(Debug)]
pub struct Watch {
    history: Vec<Arming>,
    state: State,
    /// Datagrams that were neither a pet nor a disarm.
    pub ignored: u64,
}

impl Default for Watch {
    fn default() -> Self {
        Self::new()
    }
}

impl Watch {
    pub fn new() -> Watch {
        Watch { history: Vec::new(), state: State::Idle, ignored: 0 }
    }

    pub fn history(&self) -> &[Arming] {
        &self.history
    }

    pub fn is_armed(&self) -> bool {
        self.state == State::Armed
    }

    pub fn handle_datagram(&mut self, now: Stamp, bytes: &[u8]) {
        if let State::Settling { until } = self.state {
            if now.at < until {
                if let Some(last) = self.history.last_mut() {
                    last.discarded_after_fire += 1;
                }
                return;
            }
            self.state = State::Idle;
        }
        match (parse_datagram(bytes), self.state) {
            (Datagram::Pet { timeout_ms }, State::Armed) => {
                let a = self.current();
                a.last_pet_at = now;
                a.timeout_ms = timeout_ms;
                a.pets += 1;
            }
            (Datagram::Pet { timeout_ms }, _) => {
                if self.history.len() >= HISTORY_MAX {
                    self.history.remove(0);
                }
                self.history.push(Arming {
                    armed_at: now,
                    last_pet_at: now,
                    timeout_ms,
                    pets: 1,
                    fired_at: None,
                    action_done_at: None,
                    disarmed_at: None,
                    discarded_after_fire: 0,
                });
                self.state = State::Armed;
            }
            (Datagram::Disarm, State::Armed) => {
                self.current().disarmed_at = Some(now);
                self.state = State::Idle;
            }
            (Datagram::Disarm, _) => {}
            (Datagram::Other, _) => self.ignored += 1,
        }
    }

    /// True: the deadline passed, power off now (once per arming).
    pub fn handle_timeout(&mut self, now: Stamp) -> bool {
        if self.state != State::Armed || now.at < self.current().deadline() {
            return false;
        }
        self.current().fired_at = Some(now);
        self.state = State::Firing;
        true
    }

    pub fn handle_action_done(&mut self, now: Stamp) {
        assert_eq!(self.state, State::Firing, "action done without firing");
        self.current().action_done_at = Some(now);
        self.state = State::Settling { until: now.at + FIRE_SETTLE };
    }

    /// The next deadline, if armed.
    pub fn poll_timeout(&self) -> Option<Instant> {
        match self.state {
            State::Armed => self.history.last().map(Arming::deadline),
            _ => None,
        }
    }

    fn current(&mut self) -> &mut Arming {
        self.history.last_mut().expect("an armed watch has an arming")
    }
}

/// The power-off action: runs on the supervisor's thread, so it should
/// return promptly (a SIGKILL does).
pub type OnExpire = Box<dyn FnMut() + Send + 'static>;

/// A power-off action that runs `program args...` and waits for it; a
/// failure is logged (the history still says when it fired). In the lab:
/// `sh -c 'kill -KILL "$(cat LAB_DIR/hN/init.pid)"'` or the like.
pub fn command_action(program: impl Into<PathBuf>, args: Vec<String>) -> OnExpire {
    let program = program.into();
    Box::new(move || match Command::new(&program).args(&args).status() {
        Ok(s) if s.success() => {}
        Ok(s) => tracing::warn!("watchdog power-off {} {:?} exited with {s}", program.display(), args),
        Err(e) => tracing::warn!("watchdog power-off {} {:?} did not run: {e}", program.display(), args),
    })
}

/// A running supervisor: one thread serving one socket.
#[derive(Debug)]
pub struct Supervisor {
    socket: PathBuf,
    stop: Arc<AtomicBool>,
    shared: Arc<Mutex<Vec<Arming>>>,
    thread: Option<JoinHandle<()>>,
}

impl Supervisor {
    /// Binds `socket` (a stale socket file there is replaced) and starts
    /// watching on a thread of its own.
    pub fn start(socket: &Path, on_expire: OnExpire) -> Result<Supervisor, SupervisorError> {
        let bind_error = |e: io::Error| SupervisorError::Bind { socket: socket.to_path_buf(), reason: e.to_string() };
        match std::fs::symlink_metadata(socket) {
            Ok(m) if m.file_type().is_socket() => std::fs::remove_file(socket).map_err(bind_error)?,
            Ok(_) => return Err(SupervisorError::NotASocket { socket: socket.to_path_buf() }),
            Err(_) => {}
        }
        let sock = UnixDatagram::bind(socket).map_err(bind_error)?;
        let stop = Arc::new(AtomicBool::new(false));
        let shared = Arc::new(Mutex::new(Vec::new()));
        let (t_stop, t_shared) = (Arc::clone(&stop), Arc::clone(&shared));
        let thread = std::thread::Builder::new()
            .name("lab-watchdog".into())
            .spawn(move || run(sock, on_expire, &t_stop, &t_shared))
            .map_err(|e| SupervisorError::Spawn { reason: e.to_string() })?;
        Ok(Supervisor { socket: socket.to_path_buf(), stop, shared, thread: Some(thread) })
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Every arming so far, oldest first (at most [`HISTORY_MAX`]).
    pub fn history(&self) -> Vec<Arming> {
        self.shared.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }

    /// Stops watching (without firing), waits for the thread (at most about
    /// [`STOP_POLL`], plus a power-off action under way), removes the socket,
    /// and returns the history.
    pub fn stop(mut self) -> Vec<Arming> {
        self.shutdown();
        self.history()
    }

    fn shutdown(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            if t.join().is_err() {
                tracing::warn!("watchdog supervisor {}: its thread panicked", self.socket.display());
            }
            let _ = std::fs::remove_file(&self.socket);
        }
    }
}

impl Drop for Supervisor {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// The driver: decides nothing, feeds `Watch` and runs the action.
fn run(sock: UnixDatagram, mut on_expire: OnExpire, stop: &AtomicBool, shared: &Mutex<Vec<Arming>>) {
    let mut watch = Watch::new();
    let mut buf = [0u8; LAB_DATAGRAM_MAX_BYTES + 1];
    let publish = |w: &Watch| *shared.lock().unwrap_or_else(PoisonError::into_inner) = w.history().to_vec();
    while !stop.load(Ordering::SeqCst) {
        fire_if_due(&mut watch, &mut on_expire, &publish);
        let now = Stamp::now();
        let wait = watch.poll_timeout().map_or(STOP_POLL, |d| d.saturating_duration_since(now.at).min(STOP_POLL));
        // A zero read timeout means "block forever" to the kernel.
        if sock.set_read_timeout(Some(wait.max(Duration::from_millis(1)))).is_err() {
            std::thread::sleep(Duration::from_millis(1));
        }
        match sock.recv(&mut buf) {
            Ok(n) => {
                // A pet that arrives after the deadline is too late.
                fire_if_due(&mut watch, &mut on_expire, &publish);
                watch.handle_datagram(Stamp::now(), &buf[..n.min(buf.len())]);
                publish(&watch);
            }
            Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                tracing::warn!("watchdog supervisor: recv failed: {e}");
                std::thread::sleep(STOP_POLL);
            }
        }
    }
}

fn fire_if_due(watch: &mut Watch, on_expire: &mut OnExpire, publish: &impl Fn(&Watch)) {
    if watch.handle_timeout(Stamp::now()) {
        publish(watch);
        on_expire();
        watch.handle_action_done(Stamp::now());
        publish(watch);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(base: Stamp, ms: u64) -> Stamp {
        Stamp { at: base.at + Duration::from_millis(ms), wall_ms: base.wall_ms + ms }
    }

    #[test]
    fn parses_the_protocol() {
        assert_eq!(parse_datagram(b"pet 4000\n"), Datagram::Pet { timeout_ms: 4000 });
        assert_eq!(parse_datagram(b"pet 4000"), Datagram::Pet { timeout_ms: 4000 });
        assert_eq!(parse_datagram(b"pet 99999999999999\n"), Datagram::Pet { timeout_ms: MAX_TIMEOUT_MS });
        assert_eq!(parse_datagram(b"disarm\n"), Datagram::Disarm);
        for other in [&b"pet 0\n"[..], b"pet\n", b"pet -1\n", b"pet 10 \n", b"PET 10\n", b"\xff", b""] {
            assert_eq!(parse_datagram(other), Datagram::Other, "{other:?}");
        }
    }

    #[test]
    fn fires_once_at_the_deadline_of_the_last_pet() {
        let t0 = Stamp::now();
        let mut w = Watch::new();
        assert_eq!(w.poll_timeout(), None);
        w.handle_datagram(t0, b"pet 1000\n");
        w.handle_datagram(at(t0, 600), b"pet 1000\n");
        assert!(!w.handle_timeout(at(t0, 1000)), "petted at 600: not due before 1600");
        assert_eq!(w.poll_timeout(), Some(at(t0, 1600).at));
        assert!(!w.handle_timeout(at(t0, 1599)));
        assert!(w.handle_timeout(at(t0, 1600)));
        assert!(!w.handle_timeout(at(t0, 1700)), "once per arming");
        w.handle_action_done(at(t0, 1610));
        assert!(!w.handle_timeout(at(t0, 9000)));
        let a = &w.history()[0];
        assert_eq!((a.armed_at, a.last_pet_at, a.pets), (t0, at(t0, 600), 2));
        assert_eq!(a.fired_at, Some(at(t0, 1600)));
        assert_eq!(a.fire_delay(), Some(Duration::from_millis(1000)));
    }

    #[test]
    fn the_timeout_is_the_last_pets() {
        let t0 = Stamp::now();
        let mut w = Watch::new();
        w.handle_datagram(t0, b"pet 5000\n");
        w.handle_datagram(at(t0, 100), b"pet 200\n");
        assert!(w.handle_timeout(at(t0, 300)));
    }

    #[test]
    fn disarm_stops_watching_and_a_pet_rearms() {
        let t0 = Stamp::now();
        let mut w = Watch::new();
        w.handle_datagram(t0, b"pet 100\n");
        w.handle_datagram(at(t0, 50), b"disarm\n");
        assert!(!w.handle_timeout(at(t0, 10_000)));
        assert_eq!(w.poll_timeout(), None);
        w.handle_datagram(at(t0, 10_000), b"pet 100\n");
        assert!(w.handle_timeout(at(t0, 10_100)));
        assert_eq!(w.history().len(), 2);
        assert_eq!(w.history()[0].disarmed_at, Some(at(t0, 50)));
        assert_eq!(w.history()[0].fired_at, None);
    }

    #[test]
    fn pets_of_the_dying_host_are_discarded_then_a_new_boot_rearms() {
        let t0 = Stamp::now();
        let mut w = Watch::new();
        w.handle_datagram(t0, b"pet 100\n");
        assert!(w.handle_timeout(at(t0, 100)));
        w.handle_action_done(at(t0, 110));
        w.handle_datagram(at(t0, 120), b"pet 100\n");
        assert!(!w.is_armed(), "a pet sent while the host died must not re-arm");
        w.handle_datagram(at(t0, 2000), b"pet 100\n");
        assert!(w.is_armed());
        assert_eq!(w.history().len(), 2);
        assert_eq!(w.history()[0].discarded_after_fire, 1);
        assert!(w.handle_timeout(at(t0, 2100)));
    }

    #[test]
    fn garbage_is_counted_and_changes_nothing() {
        let t0 = Stamp::now();
        let mut w = Watch::new();
        w.handle_datagram(t0, b"hello");
        w.handle_datagram(t0, b"disarm\n");
        assert!(!w.is_armed());
        assert_eq!((w.ignored, w.history().len()), (1, 0));
    }
}
