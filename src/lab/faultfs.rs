//! faultfs: a passthrough FUSE filesystem that mirrors a backing directory
//! and injects storage faults, set at run time through a control socket.
//!
//! It stands for the NFS datastore in tests and in the multi-host lab
//! (LAB-NOTES.md, "Shared storage and its faults"): one mount shared by all
//! lab hosts, so that their file locks conflict, with faults that can hit
//! one host's network namespace only. It proves that a hung or failing
//! datastore does not freeze the daemon and makes it self-fence on time.
//!
//! Faults (`faults` has the command language): `hang` (requests wait,
//! unanswered, like a hung NFS server: the caller sits in D state, even
//! SIGKILL waits), `eio`, `delay MS`, `readonly` (modifications fail with
//! EROFS), `ok` (clear), each optionally for one `netns=NAME`; `status`
//! reports the faults and counters. Every request is faultable except the
//! kernel's bookkeeping (forget, release, releasedir), which no caller waits
//! for and which must not leak handles, and flush (see `flush`).
//!
//! What the mount guarantees havirt's store (src/store/direct.rs, dir.rs):
//! - no caching: attributes and entries have a zero TTL (every stat and
//!   open reaches faultfs, so a hang hangs them as on NFS) and every file is
//!   opened with FOPEN_DIRECT_IO; O_DIRECT opens are O_DIRECT on the
//!   backing file, with aligned buffers;
//! - fdatasync/fsync (also of directories) reach the backing file;
//! - flock, POSIX and OFD locks are kept by the kernel for the mount (faultfs
//!   does not ask to handle them), so they conflict between every process
//!   using the mount and die with their holder. Lock calls themselves are
//!   therefore never faulted; havirt opens a lease file before locking it,
//!   and the open is.
//!
//! Run it in the root PID namespace with /run/netns visible: the FUSE header
//! names the caller by its pid in faultfs's namespace, and a caller it
//! cannot see (pid 0) or whose /proc entry is gone meets only the global
//! fault. Lab hosts in PID namespaces of their own are seen (tested).
//!
//! Threads: `SESSION_THREADS` read FUSE requests (each with its own cloned
//! /dev/fuse descriptor), one timer thread serves delays, one thread serves
//! the control socket. A hung request holds no thread (`gate`).

mod backing;
mod control;
pub mod faults;
mod gate;

use backing::{AlignedBuf, Backing, Caller, DirEntry, SetAttr, Statfs};
use fuser::{
    BsdFileFlags, Errno, FileAttr, FileHandle, Filesystem, FopenFlags, Generation, INodeNo, InitFlags, KernelConfig,
    LockOwner, MountOption, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory, ReplyEmpty,
    ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite, Request, SessionACL, TimeOrNow, WriteFlags,
};
use gate::{Access, Gate};
use std::ffi::OsStr;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime};

pub use control::{CLIENT_TIMEOUT, MAX_COMMAND_BYTES};
pub use gate::NETNS_DIR;

/// FUSE request reader threads: a request being served (an fdatasync on
/// the backing disk) does not hold up the others.
pub const SESSION_THREADS: usize = 4;
/// How often `run` checks for a signal or an outside unmount.
pub const END_POLL_INTERVAL: Duration = Duration::from_millis(100);
/// After the lazy unmount, how long `run` waits for the session to end; a
/// mount still busy (files open) then lives on detached until they close.
pub const SESSION_END_WAIT: Duration = Duration::from_secs(5);
/// Attributes and entries are never cached by the kernel (see module doc).
const TTL: Duration = Duration::ZERO;
/// Outstanding background requests the kernel may queue on the mount: 3
/// hosts × (a LUN and 6 disks) × a loop queue depth of 128, rounded up.
const MAX_BACKGROUND: u16 = 4096;
/// Files are uncached (see module doc), and writes to one file from
/// several hosts do not queue behind each other: without parallel direct
/// writes the kernel holds the file's inode lock for a whole write, so one
/// host's hung write to the shared LUN file would hang every other host's
/// writes to it, which real hosts with their own initiators never see.
const FILE_OPEN_FLAGS: FopenFlags = FopenFlags::FOPEN_DIRECT_IO.union(FopenFlags::FOPEN_PARALLEL_DIRECT_WRITES);

pub struct FaultFsOptions {
    /// The directory mirrored (the "NFS export").
    pub backing: PathBuf,
    /// Where the FUSE filesystem is mounted.
    pub mountpoint: PathBuf,
    /// The control socket's path (created; a stale one is replaced).
    pub control: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum FaultFsError {
    #[error("{path}: {source}: the {role} must be an existing directory")]
    BadDirectory { role: &'static str, path: PathBuf, source: io::Error },
    #[error(
        "backing directory {backing} and mountpoint {mountpoint} overlap: the backing directory must lie outside the mount, and the mount outside it"
    )]
    Overlap { backing: PathBuf, mountpoint: PathBuf },
    #[error(
        "cannot mount FUSE at {mountpoint}: {source} (faultfs needs /dev/fuse, and root or fusermount3 with user_allow_other)"
    )]
    Mount { mountpoint: PathBuf, source: io::Error },
    #[error("control socket {path}: {source}")]
    ControlBind { path: PathBuf, source: io::Error },
    #[error("control socket {path} is in use by a running faultfs: stop that one or choose another path")]
    ControlInUse { path: PathBuf },
    #[error("control socket {path}: {source} (is faultfs running?)")]
    Control { path: PathBuf, source: io::Error },
    #[error("faultfs refused {command:?}: {message}")]
    Refused { command: String, message: String },
    #[error("control socket {path}: unexpected reply {reply:?} (expected a line starting with \"ok\" or \"error: \")")]
    BadReply { path: PathBuf, reply: String },
    #[error("invalid command {command:?}: give one line of at most {MAX_COMMAND_BYTES} bytes")]
    BadCommand { command: String },
    #[error("cannot install the SIGTERM/SIGINT handlers: {source}")]
    Signals { source: io::Error },
    #[error("cannot start a faultfs thread: {source}")]
    Thread { source: io::Error },
    #[error("the FUSE session ended with an error: {source}")]
    Session { source: io::Error },
    #[error("the FUSE session thread panicked")]
    SessionPanicked,
}

/// Sends one command to a running faultfs; returns its reply line (`ok`,
/// or `ok requests=...` for `status`). A refused command is
/// `FaultFsError::Refused` with faultfs's message.
pub fn control(socket: &Path, command: &str) -> Result<String, FaultFsError> {
    control::send(socket, command)
}

/// Mounts, serves until the mount is unmounted from outside or SIGTERM or
/// SIGINT arrives, then clears every fault (releasing hung callers) and
/// unmounts lazily (a busy mount is detached at once and ends when its last
/// file closes). The control socket exists while `run` runs.
///
/// After an outside lazy unmount of a busy mount, `run` goes on serving the
/// open files until they close (or a signal stops it).
pub fn run(opts: FaultFsOptions) -> Result<(), FaultFsError> {
    let (backing, mountpoint) = check_paths(&opts)?;
    let signals = StopSignals::register()?;
    let store = Backing::new(backing.clone()).map_err(|source| FaultFsError::BadDirectory {
        role: "backing directory",
        path: backing,
        source,
    })?;
    let (gate, timer) = Gate::start(store).map_err(|source| FaultFsError::Thread { source })?;
    let _timer = StopGate { gate: Arc::clone(&gate), timer: Some(timer) };
    let _control = control::ControlServer::start(&opts.control, Arc::clone(&gate))?;
    let fs = FaultFs { gate: Arc::clone(&gate) };
    let session = fuser::Session::new(fs, &mountpoint, &mount_config())
        .map_err(|source| FaultFsError::Mount { mountpoint: mountpoint.clone(), source })?;
    let device = mounted_device(&mountpoint);
    let mounted = Unmount { gate: Arc::clone(&gate), mountpoint, device };
    let worker = std::thread::Builder::new()
        .name("faultfs-session".into())
        .spawn(move || session.run())
        .map_err(|source| FaultFsError::Thread { source })?;
    while !worker.is_finished() && !signals.stop.load(Ordering::SeqCst) {
        std::thread::sleep(END_POLL_INTERVAL);
    }
    drop(mounted);
    finish(worker)
}

fn check_paths(opts: &FaultFsOptions) -> Result<(PathBuf, PathBuf), FaultFsError> {
    let dir = |role, path: &Path| {
        let bad = |source| FaultFsError::BadDirectory { role, path: path.to_path_buf(), source };
        let canonical = path.canonicalize().map_err(bad)?;
        if !canonical.is_dir() {
            return Err(bad(io::Error::from(io::ErrorKind::NotADirectory)));
        }
        Ok(canonical)
    };
    let backing = dir("backing directory", &opts.backing)?;
    let mountpoint = dir("mountpoint", &opts.mountpoint)?;
    if backing.starts_with(&mountpoint) || mountpoint.starts_with(&backing) {
        return Err(FaultFsError::Overlap { backing, mountpoint });
    }
    Ok((backing, mountpoint))
}

fn mount_config() -> fuser::Config {
    let mut config = fuser::Config::default();
    config.mount_options = vec![
        MountOption::FSName("faultfs".into()),
        MountOption::Subtype("faultfs".into()),
        // Permissions are checked by the kernel, as for a local filesystem:
        // faultfs runs as root, qemu opens disk images as libvirt-qemu.
        MountOption::DefaultPermissions,
    ];
    config.acl = SessionACL::All;
    config.n_threads = Some(SESSION_THREADS);
    config.clone_fd = true;
    config
}

/// Waits (bounded) for the session to end after the unmount.
fn finish(worker: JoinHandle<io::Result<()>>) -> Result<(), FaultFsError> {
    let polls = SESSION_END_WAIT.as_millis() / END_POLL_INTERVAL.as_millis().max(1);
    for _ in 0..polls {
        if worker.is_finished() {
            return match worker.join() {
                Ok(Ok(())) => Ok(()),
                Ok(Err(source)) => Err(FaultFsError::Session { source }),
                Err(_) => Err(FaultFsError::SessionPanicked),
            };
        }
        std::thread::sleep(END_POLL_INTERVAL);
    }
    // Busy: detached already; the session serves the open files until
    // they close (or the process exits, which aborts the connection).
    Ok(())
}

/// Releases every waiting request, then unmounts lazily: on every way out
/// of `run` once mounted.
struct Unmount {
    gate: Arc<Gate>,
    mountpoint: PathBuf,
    /// Ours, as mountinfo showed it after mounting.
    device: Option<String>,
}

impl Drop for Unmount {
    fn drop(&mut self) {
        self.gate.stop();
        // Only our own mount: once unmounted from outside, the path may
        // already hold the next one (a lab restarting faultfs).
        if self.device.is_none() || mounted_device(&self.mountpoint) == self.device {
            let _ = nix::mount::umount2(&self.mountpoint, nix::mount::MntFlags::MNT_DETACH);
        }
    }
}

/// The device (`major:minor`) of the topmost mount at `mountpoint`, read
/// from /proc/self/mountinfo: asking the mount itself could hang.
fn mounted_device(mountpoint: &Path) -> Option<String> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    let want = mountinfo_escape(mountpoint.to_str()?);
    let line = info.lines().rfind(|l| l.split(' ').nth(4) == Some(want.as_str()))?;
    line.split(' ').nth(2).map(str::to_string)
}

/// How mountinfo writes a path: space, tab, newline and backslash in octal.
fn mountinfo_escape(path: &str) -> String {
    let mut out = String::with_capacity(path.len());
    for c in path.chars() {
        match c {
            ' ' => out.push_str("\\040"),
            '\t' => out.push_str("\\011"),
            '\n' => out.push_str("\\012"),
            '\\' => out.push_str("\\134"),
            c => out.push(c),
        }
    }
    out
}

/// Stops the gate and joins its timer thread.
struct StopGate {
    gate: Arc<Gate>,
    timer: Option<JoinHandle<()>>,
}

impl Drop for StopGate {
    fn drop(&mut self) {
        self.gate.stop();
        if let Some(t) = self.timer.take() {
            let _ = t.join();
        }
    }
}

/// SIGTERM and SIGINT end every `run` in the process. While none runs they
/// keep their default action (terminate): the first `run` registers, once,
/// a default action that applies whenever `idle` is set.
struct StopSignals {
    stop: Arc<AtomicBool>,
    ids: Vec<signal_hook::SigId>,
}

struct SignalState {
    runs: usize,
    idle: Arc<AtomicBool>,
}

static SIGNALS: Mutex<Option<SignalState>> = Mutex::new(None);
const STOP_SIGNALS: [i32; 2] = [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT];

impl StopSignals {
    fn register() -> Result<StopSignals, FaultFsError> {
        let err = |source| FaultFsError::Signals { source };
        let mut state = SIGNALS.lock().unwrap_or_else(PoisonError::into_inner);
        if state.is_none() {
            let idle = Arc::new(AtomicBool::new(true));
            for sig in STOP_SIGNALS {
                signal_hook::flag::register_conditional_default(sig, Arc::clone(&idle)).map_err(err)?;
            }
            *state = Some(SignalState { runs: 0, idle });
        }
        let stop = Arc::new(AtomicBool::new(false));
        let mut ids = Vec::with_capacity(STOP_SIGNALS.len());
        for sig in STOP_SIGNALS {
            match signal_hook::flag::register(sig, Arc::clone(&stop)) {
                Ok(id) => ids.push(id),
                Err(e) => {
                    ids.into_iter().for_each(|id| {
                        signal_hook::low_level::unregister(id);
                    });
                    return Err(err(e));
                }
            }
        }
        if let Some(s) = state.as_mut() {
            s.runs += 1;
            s.idle.store(false, Ordering::SeqCst);
        }
        Ok(StopSignals { stop, ids })
    }
}

impl Drop for StopSignals {
    fn drop(&mut self) {
        for id in self.ids.drain(..) {
            signal_hook::low_level::unregister(id);
        }
        let mut state = SIGNALS.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(s) = state.as_mut() {
            s.runs = s.runs.saturating_sub(1);
            if s.runs == 0 {
                s.idle.store(true, Ordering::SeqCst);
            }
        }
    }
}

/// The FUSE side: each operation becomes a job for the gate.
struct FaultFs {
    gate: Arc<Gate>,
}

/// Answers the kernel with an operation's result.
trait Answer<T>: Send + 'static {
    fn answer(self, r: Result<T, Errno>);
}

impl Answer<FileAttr> for ReplyEntry {
    fn answer(self, r: Result<FileAttr, Errno>) {
        match r {
            Ok(a) => self.entry(&TTL, &a, Generation(0)),
            Err(e) => self.error(e),
        }
    }
}

impl Answer<FileAttr> for ReplyAttr {
    fn answer(self, r: Result<FileAttr, Errno>) {
        match r {
            Ok(a) => self.attr(&TTL, &a),
            Err(e) => self.error(e),
        }
    }
}

impl Answer<Vec<u8>> for ReplyData {
    fn answer(self, r: Result<Vec<u8>, Errno>) {
        match r {
            Ok(d) => self.data(&d),
            Err(e) => self.error(e),
        }
    }
}

impl Answer<(AlignedBuf, usize)> for ReplyData {
    fn answer(self, r: Result<(AlignedBuf, usize), Errno>) {
        match r {
            Ok((buf, n)) => self.data(&buf.as_slice()[..n]),
            Err(e) => self.error(e),
        }
    }
}

impl Answer<()> for ReplyEmpty {
    fn answer(self, r: Result<(), Errno>) {
        match r {
            Ok(()) => self.ok(),
            Err(e) => self.error(e),
        }
    }
}

/// A file handle of a regular file (opened uncached) or of a directory.
enum Opened {
    File(u64),
    Dir(u64),
}

impl Answer<Opened> for ReplyOpen {
    fn answer(self, r: Result<Opened, Errno>) {
        match r {
            Ok(Opened::File(fh)) => self.opened(FileHandle(fh), FILE_OPEN_FLAGS),
            Ok(Opened::Dir(fh)) => self.opened(FileHandle(fh), FopenFlags::empty()),
            Err(e) => self.error(e),
        }
    }
}

impl Answer<u32> for ReplyWrite {
    fn answer(self, r: Result<u32, Errno>) {
        match r {
            Ok(n) => self.written(n),
            Err(e) => self.error(e),
        }
    }
}

impl Answer<(FileAttr, u64)> for ReplyCreate {
    fn answer(self, r: Result<(FileAttr, u64), Errno>) {
        match r {
            Ok((a, fh)) => self.created(&TTL, &a, Generation(0), FileHandle(fh), FILE_OPEN_FLAGS),
            Err(e) => self.error(e),
        }
    }
}

impl Answer<Statfs> for ReplyStatfs {
    fn answer(self, r: Result<Statfs, Errno>) {
        match r {
            Ok(s) => self.statfs(s.blocks, s.bfree, s.bavail, s.files, s.ffree, s.bsize, s.namelen, s.frsize),
            Err(e) => self.error(e),
        }
    }
}

impl Answer<(Arc<[DirEntry]>, usize)> for ReplyDirectory {
    fn answer(mut self, r: Result<(Arc<[DirEntry]>, usize), Errno>) {
        let (entries, from) = match r {
            Ok(listing) => listing,
            Err(e) => return self.error(e),
        };
        for (i, e) in entries.iter().enumerate().skip(from) {
            let next = u64::try_from(i + 1).unwrap_or(u64::MAX);
            if self.add(INodeNo(e.ino), next, e.kind, &e.name) {
                break;
            }
        }
        self.ok();
    }
}

impl FaultFs {
    fn submit<T: 'static, R: Answer<T>>(
        &self,
        req: &Request,
        access: Access,
        reply: R,
        op: impl FnOnce(&Backing) -> Result<T, Errno> + Send + 'static,
    ) {
        self.gate.submit(req.pid(), None, access, Box::new(move |store| reply.answer(store.and_then(op))));
    }

    /// `submit` for a request on the open file `fh` (see `Gate::submit`).
    fn submit_on<T: 'static, R: Answer<T>>(
        &self,
        req: &Request,
        fh: FileHandle,
        access: Access,
        reply: R,
        op: impl FnOnce(&Backing) -> Result<T, Errno> + Send + 'static,
    ) {
        self.gate.submit(req.pid(), Some(fh.0), access, Box::new(move |store| reply.answer(store.and_then(op))));
    }
}

fn caller(req: &Request) -> Caller {
    Caller { uid: req.uid(), gid: req.gid() }
}

/// Opening for writing, or truncating, modifies the datastore.
fn open_access(flags: i32) -> Access {
    if flags & libc::O_ACCMODE != libc::O_RDONLY || flags & libc::O_TRUNC != 0 {
        Access::Modifies
    } else {
        Access::Reads
    }
}

impl Filesystem for FaultFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> io::Result<()> {
        // No FUSE_POSIX_LOCKS / FUSE_FLOCK_LOCKS: the kernel keeps locks.
        // Loop devices' direct I/O reaches FUSE as background requests, of
        // which the kernel lets at most max_background (default 12) be
        // outstanding per mount: one host's hung LUN would fill them and
        // hang every other host's LUN behind it. Room for every loop
        // device's whole queue instead.
        let _ = config.set_max_background(MAX_BACKGROUND);
        // And asynchronous direct I/O (the loop driver's) stays
        // asynchronous: without it the kernel waits for each request while
        // holding the file's inode lock (see FILE_OPEN_FLAGS).
        let _ = config.add_capabilities(InitFlags::FUSE_ASYNC_DIO);
        Ok(())
    }

    fn lookup(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let name = name.to_owned();
        self.submit(req, Access::Reads, reply, move |b| b.lookup(parent.0, &name));
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        self.gate.backing().forget(ino.0, nlookup);
    }

    fn getattr(&self, req: &Request, ino: INodeNo, fh: Option<FileHandle>, reply: ReplyAttr) {
        match fh {
            Some(fh) => self.submit_on(req, fh, Access::Reads, reply, move |b| b.getattr(ino.0, Some(fh.0))),
            None => self.submit(req, Access::Reads, reply, move |b| b.getattr(ino.0, None)),
        }
    }

    fn setattr(
        &self,
        req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let s = SetAttr { mode, uid, gid, size, atime, mtime };
        self.submit(req, Access::Modifies, reply, move |b| b.setattr(ino.0, fh.map(|f| f.0), s));
    }

    fn readlink(&self, req: &Request, ino: INodeNo, reply: ReplyData) {
        self.submit(req, Access::Reads, reply, move |b| b.readlink(ino.0));
    }

    fn mknod(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        rdev: u32,
        reply: ReplyEntry,
    ) {
        let (name, c) = (name.to_owned(), caller(req));
        self.submit(req, Access::Modifies, reply, move |b| b.mknod(parent.0, &name, mode, rdev, c));
    }

    fn mkdir(&self, req: &Request, parent: INodeNo, name: &OsStr, mode: u32, _umask: u32, reply: ReplyEntry) {
        let (name, c) = (name.to_owned(), caller(req));
        self.submit(req, Access::Modifies, reply, move |b| b.mkdir(parent.0, &name, mode, c));
    }

    fn unlink(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let name = name.to_owned();
        self.submit(req, Access::Modifies, reply, move |b| b.unlink(parent.0, &name));
    }

    fn rmdir(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let name = name.to_owned();
        self.submit(req, Access::Modifies, reply, move |b| b.rmdir(parent.0, &name));
    }

    fn symlink(&self, req: &Request, parent: INodeNo, link_name: &OsStr, target: &Path, reply: ReplyEntry) {
        let (name, target, c) = (link_name.to_owned(), target.to_owned(), caller(req));
        self.submit(req, Access::Modifies, reply, move |b| b.symlink(parent.0, &name, &target, c));
    }

    fn rename(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        let (name, newname) = (name.to_owned(), newname.to_owned());
        let flags = flags.bits();
        self.submit(req, Access::Modifies, reply, move |b| b.rename(parent.0, &name, newparent.0, &newname, flags));
    }

    fn link(&self, req: &Request, ino: INodeNo, newparent: INodeNo, newname: &OsStr, reply: ReplyEntry) {
        let newname = newname.to_owned();
        self.submit(req, Access::Modifies, reply, move |b| b.link(ino.0, newparent.0, &newname));
    }

    fn open(&self, req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let flags = flags.0;
        let opener = gate::caller_netns(req.pid());
        self.submit(req, open_access(flags), reply, move |b| b.open(ino.0, flags, opener).map(Opened::File));
    }

    fn read(
        &self,
        req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        self.submit_on(req, fh, Access::Reads, reply, move |b| b.read(fh.0, offset, size));
    }

    fn write(
        &self,
        req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let data = data.to_vec();
        self.submit_on(req, fh, Access::Modifies, reply, move |b| b.write(fh.0, offset, &data));
    }

    /// close(2) of a descriptor, also of each copy a fork made. Nothing to
    /// write back (no cache), and never faulted: NFS does not call the
    /// server to close a clean file either, and a hung flush would hang
    /// every exec of a process holding a datastore file (the child closes
    /// its copies), e.g. the daemon starting a fence agent.
    fn flush(&self, _req: &Request, _ino: INodeNo, _fh: FileHandle, _lock_owner: LockOwner, reply: ReplyEmpty) {
        reply.ok();
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        self.gate.backing().release(fh.0);
        reply.ok();
    }

    fn fsync(&self, req: &Request, _ino: INodeNo, fh: FileHandle, datasync: bool, reply: ReplyEmpty) {
        self.submit_on(req, fh, Access::Reads, reply, move |b| b.fsync(fh.0, datasync));
    }

    fn opendir(&self, req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        self.submit(req, Access::Reads, reply, move |b| b.opendir(ino.0).map(Opened::Dir));
    }

    fn readdir(&self, req: &Request, _ino: INodeNo, fh: FileHandle, offset: u64, reply: ReplyDirectory) {
        self.submit(req, Access::Reads, reply, move |b| b.readdir(fh.0, offset));
    }

    fn releasedir(&self, _req: &Request, _ino: INodeNo, fh: FileHandle, _flags: OpenFlags, reply: ReplyEmpty) {
        self.gate.backing().releasedir(fh.0);
        reply.ok();
    }

    fn fsyncdir(&self, req: &Request, ino: INodeNo, _fh: FileHandle, datasync: bool, reply: ReplyEmpty) {
        self.submit(req, Access::Reads, reply, move |b| b.fsyncdir(ino.0, datasync));
    }

    fn statfs(&self, req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        self.submit(req, Access::Reads, reply, |b| b.statfs());
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let (name, c) = (name.to_owned(), caller(req));
        let opener = gate::caller_netns(req.pid());
        self.submit(req, Access::Modifies, reply, move |b| b.create(parent.0, &name, mode, flags, c, opener));
    }

    fn fallocate(
        &self,
        req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        self.submit_on(req, fh, Access::Modifies, reply, move |b| b.fallocate(fh.0, offset, length, mode));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_paths_are_escaped_as_the_kernel_does() {
        assert_eq!(mountinfo_escape("/mnt/ds"), "/mnt/ds");
        assert_eq!(mountinfo_escape("/mnt/a b\\c"), "/mnt/a\\040b\\134c");
        assert_eq!(mounted_device(Path::new("/")).map(|d| d.contains(':')), Some(true));
        assert_eq!(mounted_device(Path::new("/havirt/not/a/mount")), None);
    }
}
