//! A real libvirtd for tests: used when one answers on `qemu:///system`,
//! else started (`virtlogd -d`, `libvirtd -d`) and stopped again by the test.

use havirt::engine::config::DomainId;
use havirt::hypervisor::{LibvirtHypervisor, LibvirtOptions, uuid_string};
use std::cell::Cell;
use std::path::Path;
use std::process::Command;
use std::thread;
use std::time::Duration;

pub const REAL_URI: &str = "qemu:///system";
/// libvirtd must answer within this after `libvirtd -d`.
pub const LIBVIRTD_START_WAIT_MS: u64 = 15_000;
pub const LIBVIRTD_POLL_MS: u64 = 100;

/// Why a real-libvirtd test cannot run here, if it cannot.
pub fn unavailable() -> Option<String> {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let euid = status.lines().find_map(|l| l.strip_prefix("Uid:")).and_then(|l| l.split_whitespace().nth(1));
    if euid != Some("0") {
        return Some("needs root (qemu:///system)".into());
    }
    for tool in ["libvirtd", "virtlogd", "qemu-system-x86_64", "kill"] {
        if which(tool).is_none() {
            return Some(format!("{tool} is not installed (see LAB-NOTES.md, or .ci/run)"));
        }
    }
    None
}

pub fn which(tool: &str) -> Option<std::path::PathBuf> {
    let path = std::env::var("PATH").unwrap_or_default();
    let dirs = path.split(':').chain(["/usr/sbin", "/sbin", "/usr/bin"]);
    dirs.map(|d| Path::new(d).join(tool)).find(|p| p.is_file())
}

/// The libvirt daemons, and which of them this test started.
pub struct Daemons {
    /// Taken when stopped, so a pid is never signalled after it may be reused.
    pub started_libvirtd: Cell<Option<u32>>,
    pub started_virtlogd: Cell<Option<u32>>,
}

impl Daemons {
    pub fn ensure() -> Result<Daemons, String> {
        if let Ok(hv) = LibvirtHypervisor::open(LibvirtOptions::new(REAL_URI)) {
            drop(hv);
            return Ok(Daemons { started_libvirtd: Cell::new(None), started_virtlogd: Cell::new(None) });
        }
        let d = Daemons { started_libvirtd: Cell::new(None), started_virtlogd: Cell::new(None) };
        // virtlogd -d fails harmlessly when one already runs (pidfile lock).
        if run_ok("virtlogd", &["-d"]) {
            d.started_virtlogd.set(read_pid("/run/virtlogd.pid"));
        }
        if !run_ok("libvirtd", &["-d"]) {
            d.stop_what_we_started();
            return Err("libvirtd -d failed to start".into());
        }
        d.started_libvirtd.set(read_pid("/run/libvirtd.pid"));
        for _ in 0..LIBVIRTD_START_WAIT_MS / LIBVIRTD_POLL_MS {
            if LibvirtHypervisor::open(LibvirtOptions::new(REAL_URI)).is_ok() {
                return Ok(d);
            }
            thread::sleep(Duration::from_millis(LIBVIRTD_POLL_MS));
        }
        d.stop_what_we_started();
        Err(format!("libvirtd did not answer on {REAL_URI} within {LIBVIRTD_START_WAIT_MS} ms"))
    }

    pub fn stop_what_we_started(&self) {
        for pid in [self.started_libvirtd.take(), self.started_virtlogd.take()].into_iter().flatten() {
            signal(pid, "-TERM");
        }
    }
}

/// Runs a daemon by its resolved path: root's PATH may lack /usr/sbin.
pub fn run_ok(cmd: &str, args: &[&str]) -> bool {
    let Some(path) = which(cmd) else {
        return false;
    };
    Command::new(path).args(args).status().is_ok_and(|s| s.success())
}

pub fn read_pid(path: &str) -> Option<u32> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// Through kill(1): no unsafe code in tests.
pub fn signal(pid: u32, sig: &str) {
    let kill = which("kill").unwrap_or_else(|| "kill".into());
    let _ = Command::new(kill).args([sig, &pid.to_string()]).status();
}

/// A tiny real domain: 64 MiB, no disk, no OS (it idles in SeaBIOS), a
/// guest-agent channel that nothing answers.
pub fn tiny_domain_xml(name: &str, id: DomainId) -> String {
    // KVM when the device exists, TCG otherwise (LAB-NOTES.md).
    let kind = if Path::new("/dev/kvm").exists() { "kvm" } else { "qemu" };
    format!(
        "<domain type='{kind}'>
  <name>{name}</name>
  <uuid>{}</uuid>
  <memory unit='MiB'>64</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type></os>
  <devices>
    <serial type='pty'/>
    <channel type='unix'><target type='virtio' name='org.qemu.guest_agent.0'/></channel>
    <memballoon model='none'/>
  </devices>
</domain>",
        uuid_string(id)
    )
}

/// Destroys and undefines a domain (a leftover of an interrupted run).
pub fn remove_domain(id: DomainId) {
    let Ok(mut conn) = virt::connect::Connect::open(Some(REAL_URI)) else {
        return;
    };
    if let Ok(dom) = virt::domain::Domain::lookup_by_uuid_string(&conn, &uuid_string(id)) {
        let _ = dom.destroy();
        let _ = dom.undefine();
    }
    let _ = conn.close();
}
