//! faultfs (src/lab/faultfs.rs) on a real FUSE mount: havirt's datastore
//! through it, each fault, per-namespace faults, file locks, unmounting.
//!
//! Runs as root (CI does). Each test mounts its own faultfs over a backing
//! directory on the target disk (not tmpfs) and unmounts it even when it
//! fails (`Mounted`'s Drop clears faults first, so that no thread of this
//! process stays in D state). Skipped, saying so, when /dev/fuse is absent.

use havirt::engine::config::HostId;
use havirt::engine::io::{CasOutcome, Lease, LeaseKey, LeaseReason, Owner, Slot};
use havirt::lab::faultfs::{self, FaultFsError, FaultFsOptions};
use havirt::store::dir::{DirError, DirStore, FREE_LEASE};
use havirt::store::direct::{self, Access, AlignedBlock};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

const CLUSTER: &str = "lab";
/// How long a hung request must stay unanswered to count as hung.
const HANG_CHECK: Duration = Duration::from_millis(300);
/// Bound on every wait for something that should happen promptly.
const PROMPT: Duration = Duration::from_secs(10);
const POLL: Duration = Duration::from_millis(10);
/// Set in the child process of `sigterm_clears_faults_and_unmounts_a_busy_mount`.
const CHILD_ENV: &str = "HAVIRT_FAULTFS_CHILD";

#[allow(clippy::disallowed_methods, reason = "tests measure delays in wall time")]
fn now() -> Instant {
    Instant::now()
}

fn fuse_missing() -> bool {
    let missing = !Path::new("/dev/fuse").exists();
    if missing {
        println!("skipped: /dev/fuse is absent (FUSE unavailable on this machine)");
    }
    missing
}

/// Lines of /proc/self/mountinfo that mount something at `mnt`.
fn mounted_at(mnt: &Path) -> bool {
    let info = fs::read_to_string("/proc/self/mountinfo").expect("read mountinfo");
    let want = mnt.to_str().expect("utf-8 path");
    info.lines().any(|l| l.split(' ').nth(4) == Some(want))
}

fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let start = now();
    while !cond() {
        assert!(start.elapsed() < PROMPT, "timed out waiting for: {what}");
        std::thread::sleep(POLL);
    }
}

fn lazy_unmount(mnt: &Path) {
    let _ = nix::mount::umount2(mnt, nix::mount::MntFlags::MNT_DETACH);
}

/// Directories of one test: backing and mountpoint on the target disk, the
/// control socket in /tmp (a socket path must stay under 108 bytes).
struct Dirs {
    backing: PathBuf,
    mnt: PathBuf,
    ctl: PathBuf,
}

fn dirs(name: &str) -> Dirs {
    let base = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("faultfs").join(name);
    let mnt = base.join("mnt");
    while mounted_at(&mnt) {
        lazy_unmount(&mnt); // left by an earlier run that was killed
    }
    let _ = fs::remove_dir_all(&base);
    let backing = base.join("backing");
    fs::create_dir_all(&backing).expect("backing dir");
    fs::create_dir_all(&mnt).expect("mountpoint");
    let ctl = std::env::temp_dir().join(format!("havirt-faultfs-{}-{name}.sock", std::process::id()));
    Dirs { backing, mnt: mnt.canonicalize().expect("canonical"), ctl }
}

/// A faultfs running on a thread of this process. Drop: clear faults,
/// unmount lazily, join (bounded).
struct Mounted {
    d: Dirs,
    thread: Option<JoinHandle<Result<(), FaultFsError>>>,
}

impl Mounted {
    fn start(name: &str) -> Mounted {
        let d = dirs(name);
        let opts = FaultFsOptions { backing: d.backing.clone(), mountpoint: d.mnt.clone(), control: d.ctl.clone() };
        let thread = std::thread::spawn(move || faultfs::run(opts));
        let mut m = Mounted { d, thread: Some(thread) };
        let failed = |m: &Mounted| m.thread.as_ref().is_some_and(JoinHandle::is_finished);
        wait_until("faultfs mounted", || failed(&m) || (mounted_at(&m.d.mnt) && m.d.ctl.exists()));
        if m.thread.as_ref().is_some_and(JoinHandle::is_finished) {
            let r = m.thread.take().map(|t| t.join());
            panic!("faultfs did not start: {r:?}");
        }
        m
    }

    fn ctl(&self, command: &str) -> String {
        faultfs::control(&self.d.ctl, command).unwrap_or_else(|e| panic!("{command}: {e}"))
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.d.mnt.join(rel)
    }

    /// Unmounts from outside and checks that `run` returns Ok and leaves
    /// nothing mounted and no socket. Close files on the mount first: a
    /// busy mount, detached, is served until its last file closes.
    fn stop(mut self) {
        self.ctl("ok");
        lazy_unmount(&self.d.mnt);
        let t = self.thread.take().expect("running");
        wait_until("faultfs::run returns", || t.is_finished());
        t.join().expect("no panic").expect("run ends cleanly");
        assert!(!mounted_at(&self.d.mnt), "{} still mounted", self.d.mnt.display());
        assert!(!self.d.ctl.exists(), "control socket left behind");
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        let Some(t) = self.thread.take() else { return };
        let _ = faultfs::control(&self.d.ctl, "ok");
        lazy_unmount(&self.d.mnt);
        let start = now();
        while !t.is_finished() && start.elapsed() < PROMPT {
            std::thread::sleep(POLL);
        }
        if t.is_finished() {
            let _ = t.join();
        }
    }
}

fn store(m: &Mounted) -> DirStore {
    DirStore::init(&m.d.mnt, CLUSTER).expect("init through faultfs")
}

fn slot(host: u16, seq: u64) -> Slot {
    Slot {
        host: HostId(host),
        boot: 1000,
        incarnation: 1,
        seq,
        isolated: false,
        self_fenced: false,
        maintenance: false,
        released_master: None,
        memory_mib: 4096,
        vcpus: 2,
        used_memory_mib: 0,
        used_vcpus: 0,
        domains: Default::default(),
        stopped: None,
    }
}

fn owned(host: u16, generation: u64) -> Lease {
    Lease { owner: Some(Owner { host: HostId(host), boot: 1000 }), generation, reason: LeaseReason::Acquired }
}

fn os_error(r: io::Result<impl std::fmt::Debug>) -> i32 {
    match r {
        Ok(v) => panic!("expected an error, got {v:?}"),
        Err(e) => e.raw_os_error().unwrap_or_else(|| panic!("not an OS error: {e}")),
    }
}

/// The value of a counter in a `status` reply.
fn counter(status: &str, name: &str) -> u64 {
    let word = status.split(' ').find_map(|w| w.strip_prefix(&format!("{name}="))).expect("counter in status");
    word.parse().expect("number")
}

#[test]
fn havirt_store_works_through_the_mount() {
    if fuse_missing() {
        return;
    }
    let m = Mounted::start("store");
    let st = store(&m);
    DirStore::open(&m.d.mnt, CLUSTER).expect("open");
    st.write_slot(&slot(1, 7)).expect("write slot");
    assert_eq!(st.read_slot(HostId(1)).expect("read slot"), Some(slot(1, 7)));
    st.write_slot(&slot(1, 8)).expect("rewrite in place");
    assert_eq!(st.read_slot(HostId(1)).expect("read slot"), Some(slot(1, 8)));
    assert_eq!(st.read_slot(HostId(2)).expect("missing slot"), None);

    let key = LeaseKey::Master;
    assert_eq!(st.read_lease(key).expect("free"), FREE_LEASE);
    assert_eq!(st.cas_lease(key, 0, owned(1, 1)).expect("cas"), CasOutcome::Done(owned(1, 1)));
    assert_eq!(st.cas_lease(key, 0, owned(2, 1)).expect("cas"), CasOutcome::Conflict(owned(1, 1)));
    assert_eq!(st.cas_lease(key, 1, owned(2, 2)).expect("cas"), CasOutcome::Done(owned(2, 2)));
    let d = havirt::engine::config::DomainId(42);
    st.write_domain_xml(d, "<domain/>").expect("xml (create, fsync, rename)");
    assert_eq!(st.read_domain_xml(d).expect("xml"), Some("<domain/>".into()));

    // What went through the mount is on the backing disk, block-sized.
    let on_disk = m.d.backing.join("hosts").join("1.hb");
    assert_eq!(fs::metadata(&on_disk).expect("backing file").len(), 4096);
    let status = m.ctl("status");
    assert!(counter(&status, "requests") > 20, "{status}");
    assert_eq!(counter(&status, "faulted"), 0, "{status}");
    assert!(status.ends_with("faults=[]"), "{status}");
    // The store keeps its slot file open: a mount in use does not end.
    drop(st);
    m.stop();
}

/// The backing file descriptor behind an O_DIRECT open through the mount
/// is O_DIRECT too (faultfs runs in this process: its fds are ours).
fn backing_fd_flags(backing_file: &Path) -> Vec<u32> {
    let mut flags = Vec::new();
    for e in fs::read_dir("/proc/self/fd").expect("fds").flatten() {
        if fs::read_link(e.path()).ok().as_deref() != Some(backing_file) {
            continue;
        }
        let info = fs::read_to_string(Path::new("/proc/self/fdinfo").join(e.file_name())).unwrap_or_default();
        let octal = info.lines().find_map(|l| l.strip_prefix("flags:")).map(str::trim);
        flags.extend(octal.and_then(|o| u32::from_str_radix(o, 8).ok()));
    }
    flags
}

#[test]
fn o_direct_reaches_the_backing_file_and_nothing_is_cached() {
    if fuse_missing() {
        return;
    }
    let m = Mounted::start("direct");
    let path = m.path("blk");
    let f = direct::open(&path, Access::CreateReadWrite).expect("O_DIRECT open through FUSE");
    let block = AlignedBlock::from_bytes(&[7u8; 4096]);
    direct::write_block(&f, &path, 0, &block).expect("O_DIRECT write + fdatasync");
    let backing = m.d.backing.join("blk");
    let flags = backing_fd_flags(&backing);
    let o_direct = u32::try_from(libc::O_DIRECT).expect("flag");
    assert!(!flags.is_empty() && flags.iter().all(|f| f & o_direct != 0), "backing fd flags {flags:?}");
    // An unaligned O_DIRECT access fails as it does on a local disk.
    assert_eq!(os_error(f.write_at(&[1u8; 100], 3)), libc::EINVAL);

    // Written behind faultfs's back: seen at once through the mount, by
    // O_DIRECT and by buffered reads alike (no page cache, no attr cache).
    fs::write(&backing, vec![9u8; 8192]).expect("write backing");
    let (b, n) = direct::read_block(&f, &path, 4096).expect("read");
    assert_eq!((n, b.0[0]), (4096, 9));
    let mut plain = File::open(&path).expect("buffered open");
    let mut buf = Vec::new();
    plain.read_to_end(&mut buf).expect("buffered read");
    assert_eq!(buf, vec![9u8; 8192]);
    assert_eq!(fs::metadata(&path).expect("stat").len(), 8192);
    drop((f, plain));
    m.stop();
}

#[test]
fn posix_operations_pass_through() {
    if fuse_missing() {
        return;
    }
    let m = Mounted::start("posix");
    fs::create_dir(m.path("d")).expect("mkdir");
    fs::write(m.path("d/a"), b"hello").expect("create + write");
    fs::set_permissions(m.path("d/a"), fs::Permissions::from_mode(0o640)).expect("chmod");
    assert_eq!(fs::metadata(m.d.backing.join("d/a")).expect("stat").mode() & 0o7777, 0o640);
    OpenOptions::new().write(true).open(m.path("d/a")).expect("open").set_len(2).expect("truncate");
    assert_eq!(fs::read(m.path("d/a")).expect("read"), b"he");
    fs::rename(m.path("d/a"), m.path("d/b")).expect("rename");
    fs::rename(m.path("d"), m.path("e")).expect("rename dir");
    assert_eq!(fs::read(m.path("e/b")).expect("read after renames"), b"he");
    let mut names: Vec<_> =
        fs::read_dir(m.path("e")).expect("readdir").map(|e| e.expect("entry").file_name()).collect();
    names.sort();
    assert_eq!(names, ["b"]);
    std::os::unix::fs::symlink("b", m.path("e/l")).expect("symlink");
    assert_eq!(fs::read_link(m.path("e/l")).expect("readlink"), Path::new("b"));
    fs::hard_link(m.path("e/b"), m.path("e/h")).expect("link");
    assert_eq!(fs::metadata(m.path("e/h")).expect("stat").nlink(), 2);
    let mut f = OpenOptions::new().create_new(true).write(true).mode(0o600).open(m.path("e/n")).expect("O_EXCL");
    f.write_all(b"x").expect("write");
    f.sync_all().expect("fsync");
    drop(f);
    assert_eq!(os_error(OpenOptions::new().create_new(true).write(true).open(m.path("e/n"))), libc::EEXIST);
    File::open(m.path("e")).expect("open dir").sync_all().expect("fsync dir");
    for n in ["b", "l", "h", "n"] {
        fs::remove_file(m.path(&format!("e/{n}"))).expect("unlink");
    }
    fs::remove_dir(m.path("e")).expect("rmdir");
    assert_eq!(fs::read_dir(&m.d.backing).expect("backing").count(), 0);
    let stat = nix::sys::statvfs::statvfs(&m.d.mnt).expect("statfs");
    assert!(stat.blocks() > 0);
    m.stop();
}

/// Reads `path` on a thread; the result arrives on the channel.
fn read_on_thread(path: PathBuf) -> mpsc::Receiver<io::Result<Vec<u8>>> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(fs::read(&path));
    });
    rx
}

#[test]
fn hang_blocks_requests_until_ok() {
    if fuse_missing() {
        return;
    }
    let m = Mounted::start("hang");
    fs::write(m.path("f"), b"data").expect("write");
    let f = File::open(m.path("f")).expect("open before the hang");
    assert_eq!(m.ctl("hang"), "ok");
    let whole = read_on_thread(m.path("f"));
    let (tx, on_open) = mpsc::channel();
    std::thread::spawn(move || {
        let mut b = [0u8; 4];
        let _ = tx.send(f.read_at(&mut b, 0).map(|n| b[..n].to_vec()));
    });
    assert_eq!(whole.recv_timeout(HANG_CHECK).err(), Some(mpsc::RecvTimeoutError::Timeout), "read returned");
    assert_eq!(on_open.recv_timeout(Duration::ZERO).err(), Some(mpsc::RecvTimeoutError::Timeout));
    // The control socket answers while requests hang; they hold no thread.
    let status = m.ctl("status");
    assert!(counter(&status, "parked") >= 2, "{status}");
    assert!(status.contains("faults=[hang]"), "{status}");
    assert_eq!(m.ctl("ok"), "ok");
    assert_eq!(whole.recv_timeout(PROMPT).expect("released").expect("read"), b"data");
    assert_eq!(on_open.recv_timeout(PROMPT).expect("released").expect("read"), b"data");
    let status = m.ctl("status");
    assert_eq!(counter(&status, "parked"), 0, "{status}");
    assert!(counter(&status, "faulted") >= 2, "{status}");
    m.stop();
}

#[test]
fn eio_fails_every_request() {
    if fuse_missing() {
        return;
    }
    let m = Mounted::start("eio");
    let st = store(&m);
    st.write_slot(&slot(1, 1)).expect("write");
    m.ctl("eio");
    assert_eq!(os_error(fs::read(m.path("hosts/1.hb"))), libc::EIO);
    assert_eq!(os_error(fs::metadata(m.path("lab"))), libc::EIO);
    match st.read_slot(HostId(1)) {
        Err(DirError::Direct(e)) => assert!(e.to_string().contains("Input/output error"), "{e}"),
        other => panic!("expected EIO, got {other:?}"),
    }
    assert!(st.write_slot(&slot(1, 2)).is_err());
    m.ctl("ok");
    assert_eq!(st.read_slot(HostId(1)).expect("read after ok"), Some(slot(1, 1)));
    m.stop();
}

#[test]
fn delay_delays_every_request() {
    if fuse_missing() {
        return;
    }
    let m = Mounted::start("delay");
    fs::write(m.path("f"), b"data").expect("write");
    let f = File::open(m.path("f")).expect("open");
    let mut b = [0u8; 4];
    m.ctl("delay 200");
    let t = now();
    f.read_at(&mut b, 0).expect("delayed read");
    let delayed = t.elapsed();
    assert!(delayed >= Duration::from_millis(200), "read took {delayed:?}");
    assert!(delayed < Duration::from_secs(2), "read took {delayed:?}");
    m.ctl("ok");
    let t = now();
    f.read_at(&mut b, 0).expect("read");
    assert!(t.elapsed() < Duration::from_millis(100), "read took {:?} after ok", t.elapsed());
    assert_eq!(&b, b"data");
    drop(f);
    m.stop();
}

#[test]
fn readonly_refuses_modifications_only() {
    if fuse_missing() {
        return;
    }
    let m = Mounted::start("readonly");
    let st = store(&m);
    st.write_slot(&slot(1, 1)).expect("write");
    m.ctl("readonly");
    assert_eq!(st.read_slot(HostId(1)).expect("reads work"), Some(slot(1, 1)));
    match st.write_slot(&slot(1, 2)) {
        Err(DirError::Direct(e)) => assert!(e.to_string().contains("Read-only file system"), "{e}"),
        other => panic!("expected EROFS, got {other:?}"),
    }
    assert_eq!(os_error(fs::create_dir(m.path("x"))), libc::EROFS);
    assert_eq!(os_error(fs::remove_file(m.path("hosts/1.hb"))), libc::EROFS);
    m.ctl("ok");
    st.write_slot(&slot(1, 2)).expect("write after ok");
    drop(st); // its kept slot file would hold the mount
    m.stop();
}

#[test]
fn bad_commands_are_refused_with_a_reason() {
    if fuse_missing() {
        return;
    }
    let m = Mounted::start("commands");
    for (cmd, says) in [
        ("freeze", "unknown command"),
        ("delay soon", "milliseconds"),
        ("hang netns=havirt-no-such-ns", "ip netns add"),
        ("hang netns=../etc", "invalid netns"),
    ] {
        match faultfs::control(&m.d.ctl, cmd) {
            Err(FaultFsError::Refused { message, .. }) => assert!(message.contains(says), "{cmd}: {message}"),
            other => panic!("{cmd}: expected a refusal, got {other:?}"),
        }
    }
    assert!(matches!(faultfs::control(&m.d.ctl, "a\nb"), Err(FaultFsError::BadCommand { .. })));
    assert!(m.ctl("status").ends_with("faults=[]"));
    m.stop();
}

/// A network namespace made for one test; deleted on drop.
struct Netns(String);

impl Netns {
    fn add(tag: &str) -> Netns {
        let name = format!("hvfs-{tag}-{}", std::process::id());
        let _ = Command::new("ip").args(["netns", "del", &name]).stderr(Stdio::null()).status();
        let ok = Command::new("ip").args(["netns", "add", &name]).status().expect("run ip (iproute2)");
        assert!(ok.success(), "ip netns add {name} failed (needs root)");
        Netns(name)
    }

    fn exec(&self, args: &[&str]) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.0]).args(args).stdout(Stdio::piped()).stderr(Stdio::piped());
        c
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

/// A child process killed and reaped on drop.
struct Reaped(Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn a_netns_fault_hits_only_callers_in_that_namespace() {
    if fuse_missing() {
        return;
    }
    // Dropped in reverse: faults cleared and unmounted first, then the
    // child (no longer hung) reaped, then the namespace deleted.
    let ns = Netns::add("sel");
    let mut hung: Option<Reaped> = None;
    let m = Mounted::start("netns");
    fs::write(m.path("f"), b"data").expect("write");
    let file = m.path("f");
    let file = file.to_str().expect("utf-8");

    m.ctl(&format!("eio netns={}", ns.0));
    let out = ns.exec(&["cat", file]).output().expect("cat in netns");
    assert!(!out.status.success(), "cat in {} succeeded", ns.0);
    assert!(String::from_utf8_lossy(&out.stderr).contains("Input/output error"), "{out:?}");
    assert_eq!(fs::read(m.path("f")).expect("root namespace unaffected"), b"data");

    m.ctl(&format!("hang netns={}", ns.0));
    assert!(m.ctl("status").contains(&format!("faults=[hang netns={}]", ns.0)));
    let child = hung.insert(Reaped(ns.exec(&["cat", file]).spawn().expect("spawn cat")));
    std::thread::sleep(HANG_CHECK);
    assert!(child.0.try_wait().expect("try_wait").is_none(), "cat in {} did not hang", ns.0);
    assert_eq!(fs::read(m.path("f")).expect("root namespace unaffected"), b"data");
    m.ctl(&format!("ok netns={}", ns.0));
    let start = now();
    let status = loop {
        if let Some(s) = child.0.try_wait().expect("try_wait") {
            break s;
        }
        assert!(start.elapsed() < PROMPT, "cat still hung after ok");
        std::thread::sleep(POLL);
    };
    assert!(status.success(), "cat failed after ok");
    let mut out = String::new();
    child.0.stdout.take().expect("stdout").read_to_string(&mut out).expect("output");
    assert_eq!(out, "data");
    m.stop();
}

/// Whether `flock -n` (util-linux) from another process gets the lock now.
fn flock_free(path: &Path) -> bool {
    Command::new("flock").arg("-n").arg(path).arg("true").status().expect("run flock").success()
}

#[test]
fn flock_excludes_between_processes_and_dies_with_its_holder() {
    if fuse_missing() {
        return;
    }
    let m = Mounted::start("flock");
    let st = store(&m).with_lock_wait(Duration::from_millis(50));
    let key = LeaseKey::Master;
    st.cas_lease(key, 0, owned(1, 1)).expect("cas creates the lease file");
    let lease = st.lease_path(key);
    assert!(flock_free(&lease));

    // --no-fork: the lock belongs to the process we kill, not to a child.
    let holder =
        Command::new("flock").arg("--no-fork").arg(&lease).args(["sleep", "60"]).spawn().expect("spawn holder");
    let mut holder = Reaped(holder);
    wait_until("holder has the lock", || !flock_free(&lease));
    let mine = File::open(&lease).expect("open lease");
    assert!(matches!(mine.try_lock(), Err(fs::TryLockError::WouldBlock)));
    match st.cas_lease(key, 1, owned(2, 2)) {
        Err(e @ DirError::LockTimeout { .. }) => println!("as expected: {e}"),
        other => panic!("expected a lock timeout, got {other:?}"),
    }
    holder.0.kill().expect("kill holder");
    holder.0.wait().expect("reap holder");
    wait_until("lock released with its holder", || flock_free(&lease));
    mine.try_lock().expect("lock after the holder died");
    mine.unlock().expect("unlock");
    drop(mine);
    assert_eq!(st.cas_lease(key, 1, owned(2, 2)).expect("cas"), CasOutcome::Done(owned(2, 2)));
    m.stop();
}

/// Child half of the SIGTERM test: runs faultfs in its own process, so
/// that the signal does not stop the other tests' mounts.
#[test]
#[ignore = "run by sigterm_clears_faults_and_unmounts_a_busy_mount in a child process"]
fn faultfs_child_process() {
    let Ok(spec) = std::env::var(CHILD_ENV) else { return };
    let mut parts = spec.split('\n').map(PathBuf::from);
    let (backing, mountpoint, control) = (parts.next(), parts.next(), parts.next());
    let opts = FaultFsOptions {
        backing: backing.expect("backing"),
        mountpoint: mountpoint.expect("mountpoint"),
        control: control.expect("control"),
    };
    faultfs::run(opts).expect("run ends cleanly on SIGTERM");
}

#[test]
fn sigterm_clears_faults_and_unmounts_a_busy_mount() {
    if fuse_missing() {
        return;
    }
    let d = dirs("sigterm");
    let spec = format!("{}\n{}\n{}", d.backing.display(), d.mnt.display(), d.ctl.display());
    let exe = std::env::current_exe().expect("test binary");
    let child = Command::new(exe)
        .args(["--exact", "faultfs_child_process", "--ignored", "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, spec)
        .stdout(Stdio::null())
        .spawn()
        .expect("spawn child");
    let mut child = Reaped(child);
    wait_until("child mounted", || mounted_at(&d.mnt) && d.ctl.exists());
    fs::write(d.mnt.join("f"), b"data").expect("write");
    let busy = File::open(d.mnt.join("f")).expect("keep a file open");
    faultfs::control(&d.ctl, "hang").expect("hang");
    let hung = read_on_thread(d.mnt.join("f"));
    assert!(hung.recv_timeout(HANG_CHECK).is_err(), "read returned");

    let pid = libc::pid_t::try_from(child.0.id()).expect("pid");
    // SAFETY: kill(2) takes two integers and shares no memory.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0, "SIGTERM: {}", io::Error::last_os_error());
    // Faults are cleared before the unmount: the hung read completes.
    assert_eq!(hung.recv_timeout(PROMPT).expect("released").expect("read"), b"data");
    wait_until("mount detached", || !mounted_at(&d.mnt));
    let start = now();
    let status = loop {
        if let Some(s) = child.0.try_wait().expect("try_wait") {
            break s;
        }
        assert!(start.elapsed() < PROMPT, "faultfs did not exit");
        std::thread::sleep(POLL);
    };
    assert!(status.success(), "faultfs exited with {status}");
    assert!(!d.ctl.exists(), "control socket left behind");
    drop(busy);
}

/// Mean time of `f`, over `rounds` calls.
fn mean(rounds: u32, mut f: impl FnMut(u32)) -> Duration {
    let t = now();
    for i in 0..rounds {
        f(i);
    }
    t.elapsed() / rounds
}

/// Prints what the mount costs (directly on the backing disk vs through
/// faultfs); fails only on a pathological cost.
#[test]
fn overhead_of_a_4k_o_direct_write_and_fdatasync() {
    if fuse_missing() {
        return;
    }
    const ROUNDS: u32 = 500;
    let m = Mounted::start("overhead");
    let block = AlignedBlock::from_bytes(&[5u8; 4096]);
    let mut us = Vec::new();
    for dir in [m.d.backing.clone(), m.d.mnt.clone()] {
        let path = dir.join("bench");
        let f = direct::open(&path, Access::CreateReadWrite).expect("open");
        let write = mean(ROUNDS, |_| direct::write_block(&f, &path, 0, &block).expect("write + fdatasync"));
        let read = mean(ROUNDS, |_| assert_eq!(direct::read_block(&f, &path, 0).expect("read").1, 4096));
        drop(f);
        let st = DirStore::init(&dir, CLUSTER).expect("store");
        let slot_write = mean(ROUNDS, |i| st.write_slot(&slot(1, u64::from(i))).expect("write slot"));
        let slot_read = mean(ROUNDS, |_| assert!(st.read_slot(HostId(1)).expect("read slot").is_some()));
        us.push([write, read, slot_write, slot_read].map(|d| d.as_micros()));
    }
    let (d, f) = (us[0], us[1]);
    println!("mean of {ROUNDS}, direct on the backing disk vs through faultfs, in us:");
    println!("  4 KiB O_DIRECT pwrite + fdatasync: {} vs {}", d[0], f[0]);
    println!("  4 KiB O_DIRECT pread:              {} vs {}", d[1], f[1]);
    println!("  DirStore::write_slot:              {} vs {}", d[2], f[2]);
    println!("  DirStore::read_slot:               {} vs {}", d[3], f[3]);
    assert!(f[0] < 50_000, "through faultfs: {} us per write", f[0]);
    m.stop();
}
