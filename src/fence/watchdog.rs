//! The watchdog: what resets the host when the daemon hangs or S4 cannot be
//! confirmed (DESIGN.md §1). The daemon pets it on `Action::PetWatchdog`,
//! which the engine emits only while S4 holds (storage heartbeat written
//! within renew_timeout and no self-fence under way); the watchdog resets
//! the host when pets stop for its timeout. Peers rely on that for S3(b),
//! so [`open`] refuses a watchdog whose timeout exceeds `watchdog_timeout`.
//!
//! Dropping a watchdog does NOT disarm it: a daemon that dies must get the
//! host reset, as one that hangs. Only [`Watchdog::disarm`] (a clean stop)
//! does.
//!
//! ## Lab protocol
//!
//! The lab has no watchdog device (LAB-NOTES), so a supervisor outside the
//! host plays one. It binds a unix *datagram* socket per host, at the
//! host's `lab_socket`; each datagram is one ASCII line:
//!
//! ```text
//! pet <timeout_ms>\n   the daemon is healthy. The first pet arms the watchdog;
//!                      if no datagram follows within timeout_ms of the last
//!                      pet, the supervisor powers the host off (SIGKILL to the
//!                      init of its PID namespace).
//! disarm\n             magic close: stop watching until the next pet.
//! ```
//!
//! Anything else is ignored by the supervisor. The daemon sends without
//! blocking; a send that fails is a pet that did not happen (and an error).
//! A datagram is at most [`LAB_DATAGRAM_MAX_BYTES`].

use crate::config::Watchdog as WatchdogConfig;
use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The longest lab protocol line ("pet 18446744073709551615\n" is 25).
pub const LAB_DATAGRAM_MAX_BYTES: usize = 64;

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum WatchdogError {
    #[error(
        "cannot open watchdog device {path}: {reason}; load a watchdog driver (the board's, e.g. iTCO_wdt or ipmi_watchdog, or `modprobe softdog`), make sure nothing else holds the device (only one process may; systemd's RuntimeWatchdogSec= does), or set watchdog = \"systemd\" or \"none\" for this host"
    )]
    DeviceOpen { path: PathBuf, reason: String },
    #[error(
        "{path} is not a watchdog device (not a character device); point watchdog.device at /dev/watchdog or /dev/watchdogN"
    )]
    NotADevice { path: PathBuf },
    #[error(
        "watchdog device {path}: {op} failed: {reason}; the driver cannot be set to reset within watchdog_timeout, so it is disarmed again (a driver built with nowayout resets the host anyway)"
    )]
    DeviceIoctl { path: PathBuf, op: &'static str, reason: String },
    #[error(
        "watchdog device {path} would reset after {actual_s} s, later than watchdog_timeout ({limit_ms} ms): S3(b) would not be safe; lower the driver's timeout (module option) or raise watchdog_timeout_ms and host_dead_timeout_ms"
    )]
    DeviceTimeoutTooLong { path: PathBuf, actual_s: u64, limit_ms: u64 },
    #[error(
        "watchdog_timeout {timeout_ms} ms is below 1 s, the resolution of watchdog devices; raise watchdog_timeout_ms"
    )]
    TimeoutTooShort { timeout_ms: u64 },
    #[error("watchdog device {path}: {op} failed: {reason}")]
    DeviceWrite { path: PathBuf, op: &'static str, reason: String },
    #[error(
        "watchdog = \"systemd\" but systemd does not watch this process (WATCHDOG_USEC is not set for it); run havirt from its unit with WatchdogSec= at most watchdog_timeout, WatchdogSignal=SIGKILL and FailureAction=reboot-immediate, or choose another watchdog"
    )]
    SystemdNotEnabled,
    #[error(
        "systemd's watchdog interval ({interval_ms} ms, WatchdogSec=) is longer than watchdog_timeout ({limit_ms} ms): S3(b) would not be safe; set WatchdogSec= to at most watchdog_timeout in the unit"
    )]
    SystemdTimeoutTooLong { interval_ms: u64, limit_ms: u64 },
    #[error("sd_notify(WATCHDOG=1) failed: {reason}")]
    SystemdNotify { reason: String },
    #[error(
        "lab watchdog {socket}: {reason}; start the lab's watchdog supervisor for this host first (it binds a unix datagram socket there)"
    )]
    LabSend { socket: PathBuf, reason: String },
    #[error("the watchdog was disarmed; open it again to pet it")]
    Disarmed,
}

/// Something that resets the host unless petted.
pub trait Watchdog: Send + fmt::Debug {
    /// The host is healthy (S4 holds): put the reset off by one timeout.
    fn pet(&mut self) -> Result<(), WatchdogError>;

    /// A clean stop: stop watching without a reset (for a device, the magic
    /// close: write 'V', then close).
    fn disarm(&mut self) -> Result<(), WatchdogError>;

    /// Time without a pet after which the host is reset, if known.
    fn timeout(&self) -> Option<Duration>;

    /// Whether a missed pet really resets the host (false for
    /// [`NoWatchdog`]).
    fn resets_host(&self) -> bool;

    /// Whether it still resets the host once this process has exited
    /// without disarming it: a device or the lab's supervisor does;
    /// systemd's service watchdog does not outlive a clean stop of the
    /// unit (only a failed one, through FailureAction).
    fn outlives_daemon(&self) -> bool;
}

/// Open the configured watchdog. `timeout` is the cluster's
/// watchdog_timeout: a device is set to it (in whole seconds, rounded down),
/// and a watchdog that would wait longer is refused. A device or lab
/// watchdog is armed (and petted once) on return.
pub fn open(config: &WatchdogConfig, timeout: Duration) -> Result<Box<dyn Watchdog>, WatchdogError> {
    Ok(match config {
        WatchdogConfig::Device { device } => Box::new(DeviceWatchdog::open(device, timeout)?),
        WatchdogConfig::Systemd => {
            let w = SystemdWatchdog::new();
            w.check(timeout)?;
            Box::new(w)
        }
        WatchdogConfig::Lab { socket } => Box::new(LabWatchdog::open(socket, timeout)?),
        WatchdogConfig::None => Box::new(NoWatchdog),
    })
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

// ---------------------------------------------------------------- device

/// Linux watchdog ioctls (`linux/watchdog.h`): type 'W', an `int` argument.
/// The request number layout is `asm-generic/ioctl.h`'s on most
/// architectures; powerpc, mips and sparc use other direction bits.
mod wdioc {
    #[cfg(any(
        target_arch = "powerpc",
        target_arch = "powerpc64",
        target_arch = "mips",
        target_arch = "mips64",
        target_arch = "sparc",
        target_arch = "sparc64"
    ))]
    mod dir {
        pub const READ: u32 = 2;
        pub const WRITE: u32 = 4;
        pub const SHIFT: u32 = 29;
    }
    #[cfg(not(any(
        target_arch = "powerpc",
        target_arch = "powerpc64",
        target_arch = "mips",
        target_arch = "mips64",
        target_arch = "sparc",
        target_arch = "sparc64"
    )))]
    mod dir {
        pub const READ: u32 = 2;
        pub const WRITE: u32 = 1;
        pub const SHIFT: u32 = 30;
    }

    const INT_BYTES: u32 = 4;

    const fn ioc(direction: u32, nr: u32) -> u32 {
        (direction << dir::SHIFT) | (INT_BYTES << 16) | ((b'W' as u32) << 8) | nr
    }

    /// `_IOWR('W', 6, int)`: set the timeout in seconds; the driver writes
    /// back the timeout it really uses.
    pub const SETTIMEOUT: u32 = ioc(dir::READ | dir::WRITE, 6);
    /// `_IOR('W', 7, int)`.
    pub const GETTIMEOUT: u32 = ioc(dir::READ, 7);
}

/// A watchdog device (`/dev/watchdog`, hardware or softdog). Opening it arms
/// it; every write pets it; writing 'V' before closing disarms it (unless
/// the driver was built or loaded with nowayout).
pub struct DeviceWatchdog {
    path: PathBuf,
    /// `None` once disarmed.
    file: Option<File>,
    timeout: Duration,
}

impl fmt::Debug for DeviceWatchdog {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DeviceWatchdog")
            .field("path", &self.path)
            .field("armed", &self.file.is_some())
            .field("timeout", &self.timeout)
            .finish()
    }
}

impl DeviceWatchdog {
    /// Open (and so arm) the device, set its timeout to `timeout` rounded
    /// down to whole seconds, and pet it once. On any error after the open
    /// the device is disarmed again, so a refused start does not reset the
    /// host (except with nowayout).
    pub fn open(path: &Path, timeout: Duration) -> Result<Self, WatchdogError> {
        let secs = timeout.as_secs();
        if secs == 0 {
            return Err(WatchdogError::TimeoutTooShort { timeout_ms: millis(timeout) });
        }
        let device_open = |e: io::Error| WatchdogError::DeviceOpen { path: path.to_path_buf(), reason: e.to_string() };
        let kind = std::fs::metadata(path).map_err(device_open)?;
        if !kind.file_type().is_char_device() {
            return Err(WatchdogError::NotADevice { path: path.to_path_buf() });
        }
        let file = OpenOptions::new().write(true).open(path).map_err(device_open)?;
        let mut w = DeviceWatchdog { path: path.to_path_buf(), file: Some(file), timeout };
        match w.set_timeout(secs).and_then(|()| w.pet()) {
            Ok(()) => Ok(w),
            Err(e) => {
                let _ = w.disarm();
                Err(e)
            }
        }
    }

    fn set_timeout(&mut self, secs: u64) -> Result<(), WatchdogError> {
        let Some(file) = &self.file else { return Err(WatchdogError::Disarmed) };
        let fd = file.as_raw_fd();
        let mut value = libc::c_int::try_from(secs).unwrap_or(libc::c_int::MAX);
        let set = ioctl_int(fd, wdioc::SETTIMEOUT, &mut value);
        if set.is_err() {
            // Some drivers have a fixed timeout: acceptable if short enough.
            ioctl_int(fd, wdioc::GETTIMEOUT, &mut value).map_err(|get| WatchdogError::DeviceIoctl {
                path: self.path.clone(),
                op: "WDIOC_SETTIMEOUT (and WDIOC_GETTIMEOUT)",
                reason: format!("{}; {get}", set.err().map(|e| e.to_string()).unwrap_or_default()),
            })?;
        }
        let actual_s = u64::try_from(value).unwrap_or(0);
        if actual_s == 0 {
            return Err(WatchdogError::DeviceIoctl {
                path: self.path.clone(),
                op: "WDIOC_SETTIMEOUT",
                reason: "the driver reports a timeout of 0 s".into(),
            });
        }
        if actual_s > secs {
            return Err(WatchdogError::DeviceTimeoutTooLong {
                path: self.path.clone(),
                actual_s,
                limit_ms: millis(self.timeout),
            });
        }
        self.timeout = Duration::from_secs(actual_s);
        Ok(())
    }

    fn write(&mut self, byte: u8, op: &'static str) -> Result<(), WatchdogError> {
        let Some(file) = &mut self.file else { return Err(WatchdogError::Disarmed) };
        file.write_all(&[byte]).map_err(|e| WatchdogError::DeviceWrite {
            path: self.path.clone(),
            op,
            reason: e.to_string(),
        })
    }
}

/// One `int` ioctl on `fd`.
fn ioctl_int(fd: libc::c_int, request: u32, value: &mut libc::c_int) -> io::Result<()> {
    // SAFETY: both watchdog requests used here read and/or write exactly one
    // `int` through the pointer, which points at a live, exclusive c_int.
    let rc = unsafe { libc::ioctl(fd, request as libc::Ioctl, value as *mut libc::c_int) };
    if rc < 0 { Err(io::Error::last_os_error()) } else { Ok(()) }
}

impl Watchdog for DeviceWatchdog {
    fn pet(&mut self) -> Result<(), WatchdogError> {
        // Any byte but 'V' pets (and clears a pending magic close).
        self.write(b'1', "pet (write)")
    }

    fn disarm(&mut self) -> Result<(), WatchdogError> {
        let result = self.write(b'V', "magic close (write 'V')");
        self.file = None;
        result
    }

    fn timeout(&self) -> Option<Duration> {
        Some(self.timeout)
    }

    fn resets_host(&self) -> bool {
        true
    }

    fn outlives_daemon(&self) -> bool {
        true
    }
}

// ---------------------------------------------------------------- systemd

/// systemd's service watchdog: `sd_notify("WATCHDOG=1")`. It resets the
/// host only if the unit says so (`WatchdogSec=`, `WatchdogSignal=SIGKILL` so
/// that no core dump delays the failure, `FailureAction=reboot-immediate`);
/// it does not help if systemd itself hangs (that is RuntimeWatchdogSec=,
/// systemd's own use of the device). Without `NOTIFY_SOCKET` a pet does
/// nothing and does not fail.
#[derive(Debug)]
pub struct SystemdWatchdog {
    /// `WATCHDOG_USEC`, when set for this process.
    interval: Option<Duration>,
}

impl Default for SystemdWatchdog {
    fn default() -> Self {
        Self::new()
    }
}

impl SystemdWatchdog {
    /// Reads `WATCHDOG_USEC` (and `WATCHDOG_PID`) from the environment.
    pub fn new() -> Self {
        SystemdWatchdog { interval: sd_notify::watchdog_enabled() }
    }

    /// Whether systemd watches this process within `limit`.
    pub fn check(&self, limit: Duration) -> Result<(), WatchdogError> {
        match self.interval {
            None => Err(WatchdogError::SystemdNotEnabled),
            Some(i) if i > limit => {
                Err(WatchdogError::SystemdTimeoutTooLong { interval_ms: millis(i), limit_ms: millis(limit) })
            }
            Some(_) => Ok(()),
        }
    }
}

impl Watchdog for SystemdWatchdog {
    fn pet(&mut self) -> Result<(), WatchdogError> {
        sd_notify::notify(&[sd_notify::NotifyState::Watchdog])
            .map_err(|e| WatchdogError::SystemdNotify { reason: e.to_string() })
    }

    /// Nothing to do: systemd stops watching when the service stops, and a
    /// clean exit is no watchdog failure. (It cannot be paused while the
    /// service runs.)
    fn disarm(&mut self) -> Result<(), WatchdogError> {
        Ok(())
    }

    fn timeout(&self) -> Option<Duration> {
        self.interval
    }

    fn resets_host(&self) -> bool {
        self.interval.is_some()
    }

    fn outlives_daemon(&self) -> bool {
        false
    }
}

// ---------------------------------------------------------------- lab

/// The lab's watchdog: datagrams to an outside supervisor (protocol in the
/// module documentation).
#[derive(Debug)]
pub struct LabWatchdog {
    socket: PathBuf,
    sock: UnixDatagram,
    timeout: Duration,
    disarmed: bool,
}

impl LabWatchdog {
    /// Arm: send the first pet. Fails if no supervisor listens at `socket`.
    pub fn open(socket: &Path, timeout: Duration) -> Result<Self, WatchdogError> {
        let send_error = |e: io::Error| WatchdogError::LabSend { socket: socket.to_path_buf(), reason: e.to_string() };
        let sock = UnixDatagram::unbound().map_err(send_error)?;
        // A pet must never block the daemon: a full supervisor queue is a missed pet.
        sock.set_nonblocking(true).map_err(send_error)?;
        let mut w = LabWatchdog { socket: socket.to_path_buf(), sock, timeout, disarmed: false };
        w.pet()?;
        Ok(w)
    }

    fn send(&self, line: &str) -> Result<(), WatchdogError> {
        debug_assert!(line.len() <= LAB_DATAGRAM_MAX_BYTES);
        let send_error = |reason: String| WatchdogError::LabSend { socket: self.socket.clone(), reason };
        let sent = self.sock.send_to(line.as_bytes(), &self.socket).map_err(|e| send_error(e.to_string()))?;
        if sent != line.len() {
            return Err(send_error(format!("sent {sent} of {} bytes", line.len())));
        }
        Ok(())
    }
}

impl Watchdog for LabWatchdog {
    fn pet(&mut self) -> Result<(), WatchdogError> {
        if self.disarmed {
            return Err(WatchdogError::Disarmed);
        }
        self.send(&format!("pet {}\n", millis(self.timeout)))
    }

    fn disarm(&mut self) -> Result<(), WatchdogError> {
        self.disarmed = true;
        self.send("disarm\n")
    }

    fn timeout(&self) -> Option<Duration> {
        Some(self.timeout)
    }

    fn resets_host(&self) -> bool {
        true
    }

    fn outlives_daemon(&self) -> bool {
        true
    }
}

// ---------------------------------------------------------------- none

/// `watchdog = "none"`: pets go nowhere. Such a host is never taken over by
/// S3(b), only after a confirmed fence (the config warns about it).
#[derive(Clone, Copy, Debug, Default)]
pub struct NoWatchdog;

impl Watchdog for NoWatchdog {
    fn pet(&mut self) -> Result<(), WatchdogError> {
        Ok(())
    }

    fn disarm(&mut self) -> Result<(), WatchdogError> {
        Ok(())
    }

    fn timeout(&self) -> Option<Duration> {
        None
    }

    fn resets_host(&self) -> bool {
        false
    }

    fn outlives_daemon(&self) -> bool {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
    #[test]
    fn ioctl_numbers_match_linux_headers() {
        assert_eq!(wdioc::SETTIMEOUT, 0xC004_5706);
        assert_eq!(wdioc::GETTIMEOUT, 0x8004_5707);
    }

    #[test]
    fn device_timeout_below_a_second_is_refused() {
        let e = DeviceWatchdog::open(Path::new("/dev/watchdog"), Duration::from_millis(900)).map(|_| ());
        assert_eq!(e, Err(WatchdogError::TimeoutTooShort { timeout_ms: 900 }));
    }

    #[test]
    fn a_regular_file_is_no_watchdog() {
        let e = DeviceWatchdog::open(Path::new("/proc/self/status"), Duration::from_secs(10)).map(|_| ());
        assert_eq!(e, Err(WatchdogError::NotADevice { path: "/proc/self/status".into() }));
    }

    #[test]
    fn systemd_check_needs_a_short_enough_interval() {
        let w = SystemdWatchdog { interval: Some(Duration::from_secs(10)) };
        assert_eq!(w.check(Duration::from_secs(10)), Ok(()));
        assert_eq!(
            w.check(Duration::from_secs(4)),
            Err(WatchdogError::SystemdTimeoutTooLong { interval_ms: 10_000, limit_ms: 4_000 })
        );
        assert_eq!(
            SystemdWatchdog { interval: None }.check(Duration::from_secs(4)),
            Err(WatchdogError::SystemdNotEnabled)
        );
    }
}
