//! Every unsafe block of the hypervisor adapter, and why each is sound.
//!
//! Two things are not wrapped by the `virt` crate (LAB-NOTES.md): domain
//! event callbacks (`virConnectDomainEventRegisterAny`) and the connection
//! close callback (`virConnectRegisterCloseCallback`). Both are registered
//! here through `virt-sys` with the same ownership scheme:
//!
//! - The Rust state handed to libvirt is a `Box<EventSink>` turned into a raw
//!   pointer (`opaque`). From then on libvirt owns it: it passes it back to
//!   our callback on every event and calls `free_sink` exactly once when the
//!   callback is deregistered or the connection is disposed. Nothing on the
//!   Rust side keeps the pointer, so it cannot dangle or be freed twice.
//!   If registration fails libvirt has not taken it, and we free it.
//! - Callbacks run on the thread that runs `virEventRunDefaultImpl` (see
//!   `events`), one at a time. `EventSink` is `Sync`, and a callback only
//!   reads it through `&`.
//! - A panic must not unwind into C: the callbacks call only non-panicking
//!   code, and since Rust 1.81 a panic escaping an `extern "C"` fn aborts
//!   rather than being undefined behaviour.
//!
//! The S4 kill path uses pidfds (`pidfd_open`, `pidfd_send_signal`, `poll`)
//! so that a signal goes to the process that was checked, never to a process
//! that later got the same pid. `libc` does not wrap these as functions on
//! every target, hence the raw syscalls.

use super::events::EventSink;
use crate::engine::config::DomainId;
use std::ffi::{c_int, c_void};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use virt::connect::Connect;
use virt::error::Error as VirtError;
use virt::sys;

/// libvirt's lifecycle callback (`virConnectDomainEventCallback`).
unsafe extern "C" fn lifecycle_callback(
    _conn: sys::virConnectPtr,
    dom: sys::virDomainPtr,
    event: c_int,
    detail: c_int,
    opaque: *mut c_void,
) -> c_int {
    // SAFETY: `opaque` is the `Box<EventSink>` leaked in `register_lifecycle`;
    // libvirt keeps it alive until `free_sink`, which it never runs while a
    // callback for this registration is in progress.
    let sink = unsafe { &*(opaque as *const EventSink) };
    let mut raw = [0u8; sys::VIR_UUID_BUFLEN as usize];
    // SAFETY: `dom` is valid for the duration of the callback (libvirt holds
    // a reference); `raw` has the VIR_UUID_BUFLEN bytes libvirt writes.
    let rc = unsafe { sys::virDomainGetUUID(dom, raw.as_mut_ptr()) };
    if rc == 0 {
        sink.lifecycle(DomainId(u128::from_be_bytes(raw)), event, detail);
    }
    0
}

/// libvirt's close callback (`virConnectCloseFunc`).
unsafe extern "C" fn close_callback(_conn: sys::virConnectPtr, reason: c_int, opaque: *mut c_void) {
    // SAFETY: as in `lifecycle_callback`; this box was leaked in
    // `register_close` and stays alive until libvirt calls `free_sink`.
    let sink = unsafe { &*(opaque as *const EventSink) };
    sink.closed(reason);
}

/// `virFreeCallback` for both registrations.
unsafe extern "C" fn free_sink(opaque: *mut c_void) {
    // SAFETY: libvirt calls this exactly once per registration, with the
    // pointer we leaked from a `Box<EventSink>`, after the last callback.
    drop(unsafe { Box::from_raw(opaque as *mut EventSink) });
}

/// Registers lifecycle events for every domain of `conn`; returns the
/// callback id for `deregister_lifecycle`.
pub(super) fn register_lifecycle(conn: &Connect, sink: Box<EventSink>) -> Result<c_int, VirtError> {
    type Lifecycle = unsafe extern "C" fn(sys::virConnectPtr, sys::virDomainPtr, c_int, c_int, *mut c_void) -> c_int;
    type Generic = unsafe extern "C" fn(sys::virConnectPtr, sys::virDomainPtr, *mut c_void);
    // SAFETY: this is C's VIR_DOMAIN_EVENT_CALLBACK cast. libvirt stores the
    // generic pointer and calls it with the lifecycle signature because the
    // event id is VIR_DOMAIN_EVENT_ID_LIFECYCLE; both are plain C function
    // pointers of the same size.
    let generic = unsafe { std::mem::transmute::<Lifecycle, Generic>(lifecycle_callback) };
    let opaque = Box::into_raw(sink) as *mut c_void;
    // SAFETY: `conn.as_ptr()` is a live connection (we hold a reference);
    // a null domain means "all domains"; ownership of `opaque` passes to
    // libvirt on success (freed by `free_sink`).
    let id = unsafe {
        sys::virConnectDomainEventRegisterAny(
            conn.as_ptr(),
            std::ptr::null_mut(),
            sys::VIR_DOMAIN_EVENT_ID_LIFECYCLE as c_int,
            Some(generic),
            opaque,
            Some(free_sink),
        )
    };
    if id < 0 {
        let err = VirtError::last_error();
        // SAFETY: registration failed, so libvirt did not keep `opaque`: it
        // is still ours, from `Box::into_raw` above, and freed only here.
        drop(unsafe { Box::from_raw(opaque as *mut EventSink) });
        return Err(err);
    }
    Ok(id)
}

pub(super) fn deregister_lifecycle(conn: &Connect, id: c_int) -> Result<(), VirtError> {
    // SAFETY: live connection; `id` came from `register_lifecycle` on it.
    // libvirt frees the sink through `free_sink`.
    let rc = unsafe { sys::virConnectDomainEventDeregisterAny(conn.as_ptr(), id) };
    if rc < 0 { Err(VirtError::last_error()) } else { Ok(()) }
}

/// Registers the close callback: libvirt reports a lost connection (EOF,
/// keepalive timeout, error) through it. One per connection.
pub(super) fn register_close(conn: &Connect, sink: Box<EventSink>) -> Result<(), VirtError> {
    let opaque = Box::into_raw(sink) as *mut c_void;
    // SAFETY: live connection; ownership of `opaque` passes to libvirt on
    // success (freed by `free_sink` on unregister or disposal).
    let rc =
        unsafe { sys::virConnectRegisterCloseCallback(conn.as_ptr(), Some(close_callback), opaque, Some(free_sink)) };
    if rc < 0 {
        let err = VirtError::last_error();
        // SAFETY: registration failed, so `opaque` is still ours (see above).
        drop(unsafe { Box::from_raw(opaque as *mut EventSink) });
        return Err(err);
    }
    Ok(())
}

pub(super) fn unregister_close(conn: &Connect) -> Result<(), VirtError> {
    // SAFETY: live connection; the callback is the one `register_close`
    // installed. libvirt frees the sink through `free_sink`.
    let rc = unsafe { sys::virConnectUnregisterCloseCallback(conn.as_ptr(), Some(close_callback)) };
    if rc < 0 { Err(VirtError::last_error()) } else { Ok(()) }
}

/// A pidfd for `pid`: the process itself, whatever later reuses its pid.
pub(super) fn pidfd_open(pid: u32) -> io::Result<OwnedFd> {
    let pid = libc::pid_t::try_from(pid).map_err(|_| io::Error::from_raw_os_error(libc::ESRCH))?;
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1;
    // it touches no memory of ours.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    let fd = c_int::try_from(fd).map_err(|_| io::Error::from_raw_os_error(libc::EBADF))?;
    // SAFETY: the kernel just returned this fd to us; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

pub(super) fn pidfd_send_sigkill(fd: &OwnedFd) -> io::Result<()> {
    // SAFETY: pidfd_send_signal(fd, sig, info = NULL, flags = 0) reads no
    // memory of ours (info is null); `fd` is a live pidfd we own.
    let rc =
        unsafe { libc::syscall(libc::SYS_pidfd_send_signal, fd.as_raw_fd(), libc::SIGKILL, std::ptr::null::<u8>(), 0) };
    if rc < 0 { Err(io::Error::last_os_error()) } else { Ok(()) }
}

/// `poll` calls interrupted by a signal before the wait gives up.
const POLL_EINTR_RETRIES_MAX: u32 = 8;

/// Waits until the process exits (a pidfd polls readable then; a zombie
/// counts), at most `wait_ms`. `Ok(false)`: still there.
pub(super) fn wait_pidfd_exit(fd: &OwnedFd, wait_ms: u64) -> Result<bool, String> {
    let timeout = c_int::try_from(wait_ms).unwrap_or(c_int::MAX);
    let mut pfd = libc::pollfd { fd: fd.as_raw_fd(), events: libc::POLLIN, revents: 0 };
    // A signal may interrupt the wait; each retry waits the full timeout
    // again, which errs on the side of waiting, and the retries are bounded.
    for _ in 0..POLL_EINTR_RETRIES_MAX {
        // SAFETY: one valid `pollfd` that lives across the call; nfds = 1.
        let rc = unsafe { libc::poll(&mut pfd, 1, timeout) };
        if rc >= 0 {
            return Ok(rc > 0);
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err.to_string());
        }
    }
    Err(format!("poll interrupted {POLL_EINTR_RETRIES_MAX} times"))
}
