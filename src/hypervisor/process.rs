//! Finding and killing a domain's qemu without asking libvirt (DESIGN.md §1,
//! S4): when libvirtd hangs, destroy cannot answer, yet the domain must stop
//! before the lease can be taken elsewhere.
//!
//! A qemu started by libvirt carries `-uuid <uuid>` on its command line, and
//! libvirt writes its pid to `/run/libvirt/qemu/<name>.pid`. Every pidfile in
//! that directory is tried first (no name needed, so no libvirt call); when
//! none matches, `/proc` is scanned. A candidate counts only if its command
//! line says qemu and names the uuid, checked *after* a pidfd pins the
//! process, so a recycled pid is never signalled.

#![deny(unsafe_code)]

use super::ffi;
use crate::engine::config::DomainId;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

/// libvirt's qemu pidfile directory (system instance).
pub const QEMU_RUN_DIR: &str = "/run/libvirt/qemu";
/// Where processes are listed.
pub const PROC_DIR: &str = "/proc";
/// At most this many processes are examined in one `/proc` scan.
pub const PROC_SCAN_MAX_ENTRIES: usize = 65_536;
/// A command line longer than this is read only up to it (qemu's are a few KiB).
pub const CMDLINE_MAX_BYTES: usize = 256 * 1024;

/// Why the qemu of a domain could not be killed. What to do next is the
/// caller's: S4 stops petting the watchdog.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum KillError {
    #[error("cannot list {dir}: {error}")]
    Scan { dir: PathBuf, error: String },
    #[error("cannot signal qemu pid {pid}: {error} (pidfd needs Linux 5.3 or later)")]
    Signal { pid: u32, error: String },
    #[error("qemu pid {pid} still exists {waited_ms} ms after SIGKILL (blocked in the kernel, e.g. on hung storage)")]
    Survived { pid: u32, waited_ms: u64 },
}

/// Where to look, so tests can point at a fake `/proc`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProcPaths {
    pub qemu_run_dir: PathBuf,
    pub proc_dir: PathBuf,
}

impl Default for ProcPaths {
    fn default() -> Self {
        ProcPaths { qemu_run_dir: PathBuf::from(QEMU_RUN_DIR), proc_dir: PathBuf::from(PROC_DIR) }
    }
}

impl ProcPaths {
    /// The pid in libvirt's pidfile for domain `name`, if that process is
    /// the domain's qemu.
    pub fn pid_from_pidfile(&self, name: &str, id: DomainId) -> Option<u32> {
        let pid = read_pidfile(&self.qemu_run_dir.join(format!("{name}.pid")))?;
        self.is_qemu_of(pid, id).then_some(pid)
    }

    /// Every running qemu of domain `id`: from pidfiles, else from `/proc`.
    pub fn find_qemu(&self, id: DomainId) -> Result<Vec<u32>, KillError> {
        let mut found = Vec::new();
        // A missing run directory is normal (libvirtd never ran a domain).
        if let Ok(entries) = fs::read_dir(&self.qemu_run_dir) {
            for entry in entries.flatten().take(PROC_SCAN_MAX_ENTRIES) {
                let path = entry.path();
                if path.extension().is_some_and(|e| e == "pid")
                    && let Some(pid) = read_pidfile(&path)
                    && self.is_qemu_of(pid, id)
                    && !found.contains(&pid)
                {
                    found.push(pid);
                }
            }
        }
        if found.is_empty() {
            found = self.scan_proc(id)?;
        }
        found.sort_unstable();
        Ok(found)
    }

    fn scan_proc(&self, id: DomainId) -> Result<Vec<u32>, KillError> {
        let scan_err = |e: io::Error| KillError::Scan { dir: self.proc_dir.clone(), error: e.to_string() };
        let mut found = Vec::new();
        for entry in fs::read_dir(&self.proc_dir).map_err(scan_err)?.take(PROC_SCAN_MAX_ENTRIES) {
            let entry = entry.map_err(scan_err)?;
            let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
                continue;
            };
            if self.is_qemu_of(pid, id) {
                found.push(pid);
            }
        }
        Ok(found)
    }

    /// Whether process `pid` is a qemu whose command line has `-uuid <id>`.
    /// A process that vanished meanwhile is not.
    pub fn is_qemu_of(&self, pid: u32, id: DomainId) -> bool {
        let Some(cmdline) = read_capped(&self.proc_dir.join(pid.to_string()).join("cmdline")) else {
            return false;
        };
        cmdline_names_domain(&cmdline, id)
    }

    /// SIGKILLs every qemu of `id` and waits up to `wait_ms` until each has
    /// exited (a zombie counts: its disks and locks are released). Returns the
    /// pids killed, empty when none ran.
    pub fn kill_qemu(&self, id: DomainId, wait_ms: u64) -> Result<Vec<u32>, KillError> {
        let mut pinned = Vec::new();
        for pid in self.find_qemu(id)? {
            let fd = match ffi::pidfd_open(pid) {
                Ok(fd) => fd,
                Err(e) if e.raw_os_error() == Some(libc::ESRCH) => continue,
                Err(e) => return Err(KillError::Signal { pid, error: e.to_string() }),
            };
            // Checked again now that the fd pins the process: if the pid was
            // recycled after the scan, this is someone else and is left alone.
            if !self.is_qemu_of(pid, id) {
                continue;
            }
            match ffi::pidfd_send_sigkill(&fd) {
                Ok(()) => pinned.push((pid, fd)),
                Err(e) if e.raw_os_error() == Some(libc::ESRCH) => continue,
                Err(e) => return Err(KillError::Signal { pid, error: e.to_string() }),
            }
        }
        let mut killed = Vec::with_capacity(pinned.len());
        for (pid, fd) in &pinned {
            let exited = ffi::wait_pidfd_exit(fd, wait_ms).map_err(|e| KillError::Signal { pid: *pid, error: e })?;
            if !exited {
                return Err(KillError::Survived { pid: *pid, waited_ms: wait_ms });
            }
            killed.push(*pid);
        }
        Ok(killed)
    }
}

fn read_pidfile(path: &Path) -> Option<u32> {
    let text = read_capped(path)?;
    std::str::from_utf8(&text).ok()?.trim().parse().ok()
}

fn read_capped(path: &Path) -> Option<Vec<u8>> {
    use std::io::Read as _;
    let file = fs::File::open(path).ok()?;
    let mut buf = Vec::new();
    file.take(CMDLINE_MAX_BYTES as u64).read_to_end(&mut buf).ok()?;
    Some(buf)
}

/// `cmdline` is NUL-separated: argv[0] must name qemu, and some `-uuid`
/// must be followed by the domain's uuid.
pub fn cmdline_names_domain(cmdline: &[u8], id: DomainId) -> bool {
    let mut args = cmdline.split(|b| *b == 0);
    let Some(argv0) = args.next() else {
        return false;
    };
    let exe = argv0.rsplit(|b| *b == b'/').next().unwrap_or(argv0);
    if !exe.windows(4).any(|w| w == b"qemu") {
        return false;
    }
    let want = super::uuid_string(id);
    let mut previous_was_flag = false;
    for arg in args {
        if previous_was_flag && arg.eq_ignore_ascii_case(want.as_bytes()) {
            return true;
        }
        previous_was_flag = arg == b"-uuid";
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::process::CommandExt as _;
    use std::process::{Command, Stdio};

    const ID: DomainId = DomainId(0x11111111_2222_3333_4444_555555555555);
    const OTHER: DomainId = DomainId(0x99999999_2222_3333_4444_555555555555);

    fn cmdline(args: &[&str]) -> Vec<u8> {
        args.join("\0").into_bytes()
    }

    #[test]
    fn cmdline_must_be_qemu_with_the_uuid() {
        let uuid = "11111111-2222-3333-4444-555555555555";
        assert!(cmdline_names_domain(&cmdline(&["/usr/bin/qemu-system-x86_64", "-name", "x", "-uuid", uuid]), ID));
        assert!(!cmdline_names_domain(&cmdline(&["/usr/bin/qemu-system-x86_64", "-uuid", uuid]), OTHER));
        assert!(!cmdline_names_domain(&cmdline(&["/usr/bin/vi", "-uuid", uuid]), ID));
        assert!(!cmdline_names_domain(&cmdline(&["/usr/bin/qemu-system-x86_64", uuid]), ID));
        assert!(!cmdline_names_domain(b"", ID));
    }

    fn fake_proc(tag: &str) -> (PathBuf, ProcPaths) {
        let root = std::env::temp_dir().join(format!("havirt-proc-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&root);
        let paths = ProcPaths { qemu_run_dir: root.join("run"), proc_dir: root.join("proc") };
        fs::create_dir_all(&paths.qemu_run_dir).expect("temp dir");
        for (pid, args) in [
            ("100", vec!["qemu-system-x86_64", "-uuid", "11111111-2222-3333-4444-555555555555"]),
            ("200", vec!["qemu-system-x86_64", "-uuid", "99999999-2222-3333-4444-555555555555"]),
            ("300", vec!["bash"]),
        ] {
            fs::create_dir_all(paths.proc_dir.join(pid)).expect("temp dir");
            fs::write(paths.proc_dir.join(pid).join("cmdline"), cmdline(&args)).expect("write");
        }
        fs::create_dir_all(paths.proc_dir.join("self")).expect("temp dir");
        (root, paths)
    }

    #[test]
    fn finds_by_pidfile_and_by_scan_and_ignores_stale_pidfiles() {
        let (root, paths) = fake_proc("find");
        // No pidfile: found by scanning.
        assert_eq!(paths.find_qemu(ID), Ok(vec![100]));
        // A stale pidfile pointing at another process is ignored.
        fs::write(paths.qemu_run_dir.join("vm1.pid"), "300\n").expect("write");
        assert_eq!(paths.pid_from_pidfile("vm1", ID), None);
        assert_eq!(paths.find_qemu(ID), Ok(vec![100]));
        fs::write(paths.qemu_run_dir.join("vm1.pid"), "100").expect("write");
        assert_eq!(paths.pid_from_pidfile("vm1", ID), Some(100));
        assert_eq!(paths.find_qemu(OTHER), Ok(vec![200]));
        assert_eq!(paths.find_qemu(DomainId(7)), Ok(vec![]));
        let _ = fs::remove_dir_all(root);
    }

    /// 10 ms apart: 5 s at most.
    const EXEC_WAIT_TRIES: u32 = 500;

    #[test]
    fn kills_a_real_process_that_looks_like_the_domains_qemu() {
        let uuid = "11111111-2222-3333-4444-555555555555";
        // A shell whose argv[0] says qemu and whose arguments carry -uuid;
        // `; :` keeps the shell itself alive (no exec of the last command).
        let mut child = Command::new("sh")
            .arg0("qemu-system-havirt-test")
            .args(["-c", "sleep 20; :", "sh", "-uuid", uuid])
            .stdin(Stdio::null())
            .spawn()
            .expect("spawn sh");
        let paths = ProcPaths::default();
        let pid = child.id();
        // spawn returns after exec, but the kernel may show the new command
        // line a moment later: wait for it, bounded.
        for _ in 0..EXEC_WAIT_TRIES {
            if paths.is_qemu_of(pid, ID) {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        assert!(paths.find_qemu(ID).expect("scan").contains(&pid));
        let killed = paths.kill_qemu(ID, 5000).expect("kill");
        assert!(killed.contains(&pid), "{killed:?}");
        let status = child.wait().expect("wait");
        assert_eq!(std::os::unix::process::ExitStatusExt::signal(&status), Some(libc::SIGKILL));
        assert_eq!(paths.kill_qemu(ID, 100), Ok(vec![]));
    }
}
