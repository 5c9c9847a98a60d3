//! The gate every faultable FUSE request passes: it runs the request, fails
//! it, parks it (hang) or schedules it (delay), by the fault its caller meets.
//!
//! A request is a closure that answers the kernel when it is given the
//! backing store (run) or an errno (fail). A parked request is only that
//! closure in a list: it holds no thread, so any number of callers can hang
//! while the session threads go on serving other namespaces and the control
//! socket stays responsive. Every change of the fault table takes all parked
//! and delayed requests and decides them again under the new table (a
//! request is delayed at most once), so `ok` releases them at once.
//!
//! Delayed requests wait in a deadline-ordered map served by one timer
//! thread. Neither list has a limit of its own: each entry is a caller
//! blocked in a system call, so the callers bound them (the kernel queues at
//! most `max_background` asynchronous requests per mount).

use super::backing::Backing;
use super::faults::{Command, Fault, FaultTable};
use fuser::Errno;
use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Where `ip netns add NAME` pins a namespace.
pub const NETNS_DIR: &str = "/run/netns";

/// What a request does once decided: answer with the store, or with an errno.
pub type Job = Box<dyn FnOnce(Result<&Backing, Errno>) + Send>;

/// Whether `readonly` refuses the request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    Reads,
    Modifies,
}

struct Pending {
    job: Job,
    access: Access,
    /// The caller's network namespace inode, looked up once on arrival.
    netns: Option<u64>,
    /// Counted in `faulted` already.
    faulted: bool,
    /// Served a delay already: not delayed again.
    delayed: bool,
}

enum Verdict {
    Run,
    Fail(Errno),
    Park,
    Delay(Duration),
}

#[derive(Default)]
struct State {
    table: FaultTable,
    parked: Vec<Pending>,
    /// By (deadline, arrival number): the timer serves the earliest first.
    delayed: BTreeMap<(Instant, u64), Pending>,
    arrivals: u64,
    stopping: bool,
}

pub struct Gate {
    backing: Backing,
    state: Mutex<State>,
    timer_wake: Condvar,
    requests: AtomicU64,
    faulted: AtomicU64,
}

#[allow(clippy::disallowed_methods, reason = "faultfs delays requests by wall time; it is lab tooling, not the engine")]
fn monotonic_now() -> Instant {
    Instant::now()
}

impl Gate {
    /// The gate and its timer thread (stopped by `stop`).
    pub fn start(backing: Backing) -> std::io::Result<(Arc<Gate>, JoinHandle<()>)> {
        let gate = Arc::new(Gate {
            backing,
            state: Mutex::default(),
            timer_wake: Condvar::new(),
            requests: AtomicU64::new(0),
            faulted: AtomicU64::new(0),
        });
        let g = Arc::clone(&gate);
        let timer = std::thread::Builder::new().name("faultfs-timer".into()).spawn(move || g.serve_delays())?;
        Ok((gate, timer))
    }

    /// For the bookkeeping requests that bypass the gate (forget, release).
    pub fn backing(&self) -> &Backing {
        &self.backing
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A request from the thread `pid` (the FUSE header's caller), on the
    /// open file `fh` if it names one. A request on an open file meets the
    /// faults of the namespace that opened it: the kernel makes requests on
    /// its own for a process (a loop device's reads and writes come from
    /// its worker threads, in the root namespace), and a lab host's loop
    /// device, set up from inside the host, is that host's LUN.
    pub fn submit(&self, pid: u32, fh: Option<u64>, access: Access, job: Job) {
        self.requests.fetch_add(1, Ordering::Relaxed);
        let by_caller = self.lock().table.by_caller();
        let netns =
            if by_caller { fh.and_then(|fh| self.backing.opener(fh)).or_else(|| caller_netns(pid)) } else { None };
        self.dispatch(Pending { job, access, netns, faulted: false, delayed: false });
    }

    fn dispatch(&self, mut p: Pending) {
        let mut st = self.lock();
        // Once stopping, nothing waits: the timer thread is gone.
        let fault = if st.stopping { None } else { st.table.fault_for(p.netns) };
        let verdict = match fault {
            None => Verdict::Run,
            Some(Fault::Eio) => Verdict::Fail(Errno::EIO),
            Some(Fault::ReadOnly) if p.access == Access::Modifies => Verdict::Fail(Errno::EROFS),
            Some(Fault::ReadOnly) => Verdict::Run,
            Some(Fault::Hang) => Verdict::Park,
            Some(Fault::Delay { .. }) if p.delayed => Verdict::Run,
            Some(Fault::Delay { ms }) => Verdict::Delay(Duration::from_millis(ms)),
        };
        if !matches!(verdict, Verdict::Run) && !p.faulted {
            p.faulted = true;
            self.faulted.fetch_add(1, Ordering::Relaxed);
        }
        match verdict {
            Verdict::Park => st.parked.push(p),
            Verdict::Delay(d) => {
                p.delayed = true;
                st.arrivals += 1;
                let key = (monotonic_now() + d, st.arrivals);
                st.delayed.insert(key, p);
                self.timer_wake.notify_one();
            }
            Verdict::Run => {
                drop(st);
                (p.job)(Ok(&self.backing));
            }
            Verdict::Fail(e) => {
                drop(st);
                (p.job)(Err(e));
            }
        }
    }

    /// Applies a control command; the reply line (`ok ...` or `error: ...`).
    pub fn command(&self, line: &str) -> String {
        if self.lock().stopping {
            return "error: faultfs is stopping (faults cleared, unmounting)".into();
        }
        match Command::parse(line) {
            Err(e) => format!("error: {e}"),
            Ok(Command::Status) => self.status(),
            Ok(Command::Clear { netns }) => {
                self.change(|t| t.clear(netns.as_deref()));
                "ok".into()
            }
            Ok(Command::Set { fault, netns: None }) => {
                self.change(|t| t.set(fault, None));
                "ok".into()
            }
            Ok(Command::Abort { netns }) => match netns_inode(&netns) {
                Err(e) => format!("error: {e}"),
                Ok(ino) => format!("ok aborted={}", self.abort(ino)),
            },
            Ok(Command::Set { fault, netns: Some(name) }) => match netns_inode(&name) {
                Err(e) => format!("error: {e}"),
                Ok(ino) => {
                    self.change(|t| t.set(fault, Some((name, ino))));
                    "ok".into()
                }
            },
        }
    }

    /// Changes the table, then decides every waiting request again (outside
    /// the lock: running one answers the kernel).
    fn change(&self, edit: impl FnOnce(&mut FaultTable)) {
        let waiting: Vec<Pending> = {
            let mut st = self.lock();
            edit(&mut st.table);
            let mut w = std::mem::take(&mut st.parked);
            w.extend(std::mem::take(&mut st.delayed).into_values());
            w
        };
        for p in waiting {
            self.dispatch(p);
        }
    }

    /// Fails the waiting requests of the namespace with inode `ino` (EIO);
    /// returns how many.
    fn abort(&self, ino: u64) -> usize {
        let doomed: Vec<Pending> = {
            let mut st = self.lock();
            let (doomed, kept): (Vec<Pending>, Vec<Pending>) =
                std::mem::take(&mut st.parked).into_iter().partition(|p| p.netns == Some(ino));
            st.parked = kept;
            let delayed = std::mem::take(&mut st.delayed);
            let (gone, stay): (BTreeMap<_, _>, BTreeMap<_, _>) =
                delayed.into_iter().partition(|(_, p)| p.netns == Some(ino));
            st.delayed = stay;
            doomed.into_iter().chain(gone.into_values()).collect()
        };
        let n = doomed.len();
        for p in doomed {
            (p.job)(Err(Errno::EIO));
        }
        n
    }

    pub fn status(&self) -> String {
        let st = self.lock();
        format!(
            "ok requests={} faulted={} parked={} delayed={} faults=[{}]",
            self.requests.load(Ordering::Relaxed),
            self.faulted.load(Ordering::Relaxed),
            st.parked.len(),
            st.delayed.len(),
            st.table.describe()
        )
    }

    /// Clears every fault (releasing every waiting request) and stops the
    /// timer thread. Requests arriving later run unfaulted.
    pub fn stop(&self) {
        self.change(|t| t.clear(None));
        self.lock().stopping = true;
        self.timer_wake.notify_all();
    }

    fn serve_delays(&self) {
        let mut st = self.lock();
        loop {
            if st.stopping {
                return;
            }
            let Some(&(due, n)) = st.delayed.keys().next() else {
                st = self.timer_wake.wait(st).unwrap_or_else(PoisonError::into_inner);
                continue;
            };
            let now = monotonic_now();
            if due > now {
                st = self.timer_wake.wait_timeout(st, due - now).unwrap_or_else(PoisonError::into_inner).0;
                continue;
            }
            if let Some(p) = st.delayed.remove(&(due, n)) {
                drop(st);
                self.dispatch(p);
                st = self.lock();
            }
        }
    }
}

/// The inode of a caller's network namespace; `None` if the caller is gone
/// or unknown (pid 0: a request the kernel makes on its own).
pub fn caller_netns(pid: u32) -> Option<u64> {
    if pid == 0 {
        return None;
    }
    std::fs::metadata(format!("/proc/{pid}/ns/net")).ok().map(|m| m.ino())
}

/// The inode of `/run/netns/NAME`, which must be a network namespace (a
/// file on nsfs, like /proc/self/ns/net), not a leftover plain file.
fn netns_inode(name: &str) -> Result<u64, String> {
    let path = Path::new(NETNS_DIR).join(name);
    let m = std::fs::metadata(&path)
        .map_err(|e| format!("netns {name:?}: {}: {e} (create it with `ip netns add {name}`)", path.display()))?;
    let nsfs = std::fs::metadata("/proc/self/ns/net").map_err(|e| format!("/proc/self/ns/net: {e}"))?;
    if m.dev() != nsfs.dev() {
        return Err(format!("{} is not a network namespace (nothing is mounted there)", path.display()));
    }
    Ok(m.ino())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    /// A gate over a directory nobody writes (the jobs here touch nothing).
    fn gate() -> (Arc<Gate>, JoinHandle<()>) {
        Gate::start(Backing::new(std::env::temp_dir()).expect("temp dir")).expect("gate")
    }

    /// Submits a job that reports Ok(()) when run or its errno.
    fn submit(g: &Gate, access: Access) -> mpsc::Receiver<Result<(), Errno>> {
        let (tx, rx) = mpsc::channel();
        g.submit(
            0,
            None,
            access,
            Box::new(move |r| {
                let _ = tx.send(r.map(|_| ()));
            }),
        );
        rx
    }

    const WAIT: Duration = Duration::from_secs(5);

    #[test]
    fn hung_requests_hold_no_thread_and_run_on_ok() {
        let (g, timer) = gate();
        assert_eq!(g.command("hang"), "ok");
        let hung: Vec<_> = (0..100).map(|_| submit(&g, Access::Reads)).collect();
        assert!(hung.iter().all(|rx| rx.try_recv().is_err()));
        assert!(g.status().contains("parked=100"), "{}", g.status());
        assert_eq!(g.command("ok"), "ok");
        assert!(hung.iter().all(|rx| rx.recv_timeout(WAIT) == Ok(Ok(()))));
        assert_eq!(g.status(), "ok requests=100 faulted=100 parked=0 delayed=0 faults=[]");
        g.stop();
        timer.join().expect("timer thread");
    }

    #[test]
    fn a_fault_change_decides_waiting_requests_again() {
        let (g, timer) = gate();
        g.command("hang");
        let rx = submit(&g, Access::Reads);
        g.command("eio");
        assert_eq!(rx.recv_timeout(WAIT), Ok(Err(Errno::EIO)));
        g.command("delay 600000");
        let rx = submit(&g, Access::Modifies);
        g.command("readonly");
        assert_eq!(rx.recv_timeout(WAIT), Ok(Err(Errno::EROFS)));
        assert_eq!(submit(&g, Access::Reads).recv_timeout(WAIT), Ok(Ok(())));
        assert!(g.status().starts_with("ok requests=3 faulted=2 "), "{}", g.status());
        g.stop();
        timer.join().expect("timer thread");
    }

    #[test]
    fn delayed_requests_run_once_due_and_stop_releases_everything() {
        let (g, timer) = gate();
        g.command("delay 20");
        assert_eq!(submit(&g, Access::Reads).recv_timeout(WAIT), Ok(Ok(())));
        g.command("hang");
        let rx = submit(&g, Access::Reads);
        g.stop();
        assert_eq!(rx.recv_timeout(WAIT), Ok(Ok(())));
        assert!(g.command("hang").starts_with("error: faultfs is stopping"));
        assert_eq!(submit(&g, Access::Modifies).recv_timeout(WAIT), Ok(Ok(())));
        timer.join().expect("timer thread");
    }

    #[test]
    fn an_unknown_netns_is_refused() {
        let (g, timer) = gate();
        let reply = g.command("hang netns=havirt-no-such-netns");
        assert!(reply.starts_with("error: netns \"havirt-no-such-netns\": /run/netns/"), "{reply}");
        assert!(g.status().ends_with("faults=[]"));
        g.stop();
        timer.join().expect("timer thread");
    }
}
