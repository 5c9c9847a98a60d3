//! libvirt's domain lifecycle events as the engine's [`DomainEvent`]s, and
//! the connection close event, delivered on a bounded channel.
//!
//! libvirt dispatches events from its event loop. [`ensure_event_loop`]
//! registers libvirt's default loop implementation (once per process, before
//! any connection is opened, as libvirt requires) and runs it on a thread of
//! its own for the life of the process. Callbacks do nothing but map the
//! event and `try_send` it: they never block that thread, which also drives
//! keepalives. A full queue drops the event and counts it; the stream then
//! reports [`HypervisorEvent::Lagged`] so the daemon re-lists its domains.
//!
//! Mapping (libvirt event, detail → what the engine hears):
//!
//! | libvirt | havirt |
//! |---|---|
//! | STARTED / MIGRATED (arrived paused by live migration) | `HypervisorEvent::Incoming` |
//! | STARTED (any other detail) | `DomainEvent::Started` |
//! | STOPPED / CRASHED, STOPPED / FAILED (qemu died) | `DomainEvent::Crashed` |
//! | STOPPED / SHUTDOWN (guest powered off, `virsh shutdown`) | `DomainEvent::ShutDown` |
//! | STOPPED / DESTROYED (`virsh destroy`, and havirt's own destroys) | `DomainEvent::Destroyed` |
//! | STOPPED / other (saved, migrated, snapshot) | `DomainEvent::Stopped` |
//! | DEFINED, UNDEFINED | `HypervisorEvent::Defined` / `Undefined` |
//! | SUSPENDED, RESUMED, SHUTDOWN (guest began), PMSUSPENDED, CRASHED (guest panic, qemu kept) | nothing: qemu still runs |
//!
//! Each of them means "no qemu any more". The engine restarts a crash, and
//! takes a shutdown or destroy it did not ask for as the guest's or the
//! operator's intent (policy `on_shutdown`); a guest panic with `on_crash`
//! destroy arrives as STOPPED/CRASHED, a qemu killed by SIGKILL as
//! STOPPED/FAILED (libvirt saw no SHUTDOWN event before the monitor closed).

#![deny(unsafe_code)]

use super::ffi;
use crate::engine::config::DomainId;
use crate::engine::io::DomainEvent;
use std::ffi::c_int;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, OnceLock};
use std::thread;
use std::time::Duration;
use virt::connect::Connect;
use virt::error::ErrorNumber;
use virt::sys;

/// Events queued for the daemon before new ones are dropped (and counted).
pub const EVENT_QUEUE_CAPACITY: usize = 4096;
/// Pause after a failed event-loop iteration, so a broken loop cannot spin.
pub const EVENT_LOOP_ERROR_BACKOFF_MS: u64 = 100;

/// What the hypervisor tells the daemon without being asked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HypervisorEvent {
    /// Feed to the engine as `Input::Domain`.
    Domain {
        domain: DomainId,
        event: DomainEvent,
    },
    /// A domain was defined or redefined (DESIGN.md §4: the lease owner
    /// stores its XML on the datastore).
    Defined {
        domain: DomainId,
    },
    Undefined {
        domain: DomainId,
    },
    /// A domain arrived by live migration (feed as `Input::Incoming`: it
    /// runs only once its lease is handed to this host).
    Incoming {
        domain: DomainId,
    },
    /// The connection is gone; no more events come on it. Reopen.
    ConnectionClosed {
        reason: CloseReason,
    },
    /// This many events were dropped on a full queue: re-list the domains.
    Lagged {
        dropped: u64,
    },
}

/// Why libvirt closed the connection (`virConnectCloseReason`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CloseReason {
    /// Misc I/O error.
    Error,
    /// libvirtd closed the socket (it exited or restarted).
    Eof,
    /// libvirtd stopped answering keepalives (hung, or paused).
    Keepalive,
    /// The client closed it.
    Client,
    Unknown(i32),
}

impl CloseReason {
    fn from_raw(reason: c_int) -> CloseReason {
        match u32::try_from(reason) {
            Ok(sys::VIR_CONNECT_CLOSE_REASON_ERROR) => CloseReason::Error,
            Ok(sys::VIR_CONNECT_CLOSE_REASON_EOF) => CloseReason::Eof,
            Ok(sys::VIR_CONNECT_CLOSE_REASON_KEEPALIVE) => CloseReason::Keepalive,
            Ok(sys::VIR_CONNECT_CLOSE_REASON_CLIENT) => CloseReason::Client,
            _ => CloseReason::Unknown(reason),
        }
    }
}

#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum EventsError {
    #[error("cannot register libvirt's default event loop: {0}")]
    LoopSetup(virt::error::Error),
    #[error("cannot start the libvirt event thread: {0}")]
    ThreadSpawn(String),
    #[error("cannot register for {what}: {source}")]
    Register {
        what: &'static str,
        #[source]
        source: virt::error::Error,
    },
}

/// The libvirt event (`virDomainEventType`) and detail as havirt sees them.
pub fn map_lifecycle(domain: DomainId, event: c_int, detail: c_int) -> Option<HypervisorEvent> {
    let (Ok(event), Ok(detail)) = (u32::try_from(event), u32::try_from(detail)) else {
        return None;
    };
    let domain_event = |event| Some(HypervisorEvent::Domain { domain, event });
    match event {
        sys::VIR_DOMAIN_EVENT_DEFINED => Some(HypervisorEvent::Defined { domain }),
        sys::VIR_DOMAIN_EVENT_UNDEFINED => Some(HypervisorEvent::Undefined { domain }),
        sys::VIR_DOMAIN_EVENT_STARTED if detail == sys::VIR_DOMAIN_EVENT_STARTED_MIGRATED => {
            Some(HypervisorEvent::Incoming { domain })
        }
        sys::VIR_DOMAIN_EVENT_STARTED => domain_event(DomainEvent::Started),
        sys::VIR_DOMAIN_EVENT_STOPPED => match detail {
            sys::VIR_DOMAIN_EVENT_STOPPED_CRASHED | sys::VIR_DOMAIN_EVENT_STOPPED_FAILED => {
                domain_event(DomainEvent::Crashed)
            }
            sys::VIR_DOMAIN_EVENT_STOPPED_SHUTDOWN => domain_event(DomainEvent::ShutDown),
            sys::VIR_DOMAIN_EVENT_STOPPED_DESTROYED => domain_event(DomainEvent::Destroyed),
            _ => domain_event(DomainEvent::Stopped),
        },
        _ => None,
    }
}

/// The Rust side of one callback registration; owned by libvirt while
/// registered (see `ffi`).
pub(super) struct EventSink {
    tx: SyncSender<HypervisorEvent>,
    dropped: Arc<AtomicU64>,
}

impl EventSink {
    /// Called on the event-loop thread. Never blocks, never panics.
    pub(super) fn lifecycle(&self, domain: DomainId, event: c_int, detail: c_int) {
        if let Some(ev) = map_lifecycle(domain, event, detail) {
            self.deliver(ev);
        }
    }

    pub(super) fn closed(&self, reason: c_int) {
        self.deliver(HypervisorEvent::ConnectionClosed { reason: CloseReason::from_raw(reason) });
    }

    fn deliver(&self, ev: HypervisorEvent) {
        match self.tx.try_send(ev) {
            Ok(()) | Err(TrySendError::Disconnected(_)) => {}
            Err(TrySendError::Full(_)) => {
                self.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

static EVENT_LOOP: OnceLock<Result<(), EventsError>> = OnceLock::new();

/// Registers libvirt's default event loop and starts its thread, once per
/// process. Must run before the first connection is opened.
pub fn ensure_event_loop() -> Result<(), EventsError> {
    EVENT_LOOP.get_or_init(start_event_loop).clone()
}

fn start_event_loop() -> Result<(), EventsError> {
    // libvirt prints every error to stderr unless told not to; errors reach
    // the caller as values instead.
    virt::error::clear_error_callback();
    virt::event::event_register_default_impl().map_err(EventsError::LoopSetup)?;
    thread::Builder::new()
        .name("libvirt-events".into())
        .spawn(|| {
            // Runs for the life of the process: libvirt's default loop has no
            // way to stop, and every connection depends on it.
            loop {
                if virt::event::event_run_default_impl().is_err() {
                    thread::sleep(Duration::from_millis(EVENT_LOOP_ERROR_BACKOFF_MS));
                }
            }
        })
        .map_err(|e| EventsError::ThreadSpawn(e.to_string()))?;
    Ok(())
}

/// Lifecycle events of every domain on one connection, plus its close event.
/// Dropping the stream deregisters both.
pub struct EventStream {
    rx: Receiver<HypervisorEvent>,
    dropped: Arc<AtomicU64>,
    /// Our own reference on the connection: the callbacks belong to it.
    conn: Connect,
    lifecycle_id: c_int,
    close_registered: bool,
}

impl EventStream {
    /// One stream per connection: libvirt allows one close callback each.
    pub(super) fn subscribe(conn: &Connect) -> Result<EventStream, EventsError> {
        let (tx, rx) = mpsc::sync_channel(EVENT_QUEUE_CAPACITY);
        let dropped = Arc::new(AtomicU64::new(0));
        let sink = |tx: SyncSender<HypervisorEvent>| Box::new(EventSink { tx, dropped: dropped.clone() });
        let mut conn = conn.clone();
        let lifecycle_id = match ffi::register_lifecycle(&conn, sink(tx.clone())) {
            Ok(id) => id,
            Err(source) => {
                let _ = conn.close();
                return Err(EventsError::Register { what: "domain lifecycle events", source });
            }
        };
        let close_registered = match ffi::register_close(&conn, sink(tx)) {
            Ok(()) => true,
            // Drivers without a connection to lose (test:///) cannot report one.
            Err(e) if e.code() == ErrorNumber::NoSupport => false,
            Err(source) => {
                let _ = ffi::deregister_lifecycle(&conn, lifecycle_id);
                let _ = conn.close();
                return Err(EventsError::Register { what: "connection close events", source });
            }
        };
        Ok(EventStream { rx, dropped, conn, lifecycle_id, close_registered })
    }

    /// The next event, waiting at most `timeout`; `None` when none came.
    pub fn recv_timeout(&self, timeout: Duration) -> Option<HypervisorEvent> {
        if let Some(lag) = self.take_lag() {
            return Some(lag);
        }
        // Disconnected cannot happen while the stream holds its registrations;
        // either way there is nothing to hand out.
        self.rx.recv_timeout(timeout).ok()
    }

    /// The next event if one is queued.
    pub fn try_recv(&self) -> Option<HypervisorEvent> {
        self.take_lag().or_else(|| self.rx.try_recv().ok())
    }

    /// Whether libvirt will report a lost connection on this stream.
    pub fn reports_close(&self) -> bool {
        self.close_registered
    }

    fn take_lag(&self) -> Option<HypervisorEvent> {
        let dropped = self.dropped.swap(0, Ordering::Relaxed);
        (dropped > 0).then_some(HypervisorEvent::Lagged { dropped })
    }
}

impl Drop for EventStream {
    fn drop(&mut self) {
        // Failures mean the connection is already gone, which removed the
        // callbacks with it; there is nothing else to undo.
        let _ = ffi::deregister_lifecycle(&self.conn, self.lifecycle_id);
        if self.close_registered {
            let _ = ffi::unregister_close(&self.conn);
        }
        let _ = self.conn.close();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: DomainId = DomainId(42);

    fn ev(event: u32, detail: u32) -> Option<HypervisorEvent> {
        map_lifecycle(D, event as c_int, detail as c_int)
    }

    #[test]
    fn lifecycle_mapping() {
        let domain = |event| Some(HypervisorEvent::Domain { domain: D, event });
        assert_eq!(
            ev(sys::VIR_DOMAIN_EVENT_STARTED, sys::VIR_DOMAIN_EVENT_STARTED_BOOTED),
            domain(DomainEvent::Started)
        );
        assert_eq!(
            ev(sys::VIR_DOMAIN_EVENT_STARTED, sys::VIR_DOMAIN_EVENT_STARTED_MIGRATED),
            Some(HypervisorEvent::Incoming { domain: D })
        );
        assert_eq!(
            ev(sys::VIR_DOMAIN_EVENT_STOPPED, sys::VIR_DOMAIN_EVENT_STOPPED_SHUTDOWN),
            domain(DomainEvent::ShutDown)
        );
        assert_eq!(
            ev(sys::VIR_DOMAIN_EVENT_STOPPED, sys::VIR_DOMAIN_EVENT_STOPPED_DESTROYED),
            domain(DomainEvent::Destroyed)
        );
        for detail in [sys::VIR_DOMAIN_EVENT_STOPPED_SAVED, sys::VIR_DOMAIN_EVENT_STOPPED_MIGRATED] {
            assert_eq!(ev(sys::VIR_DOMAIN_EVENT_STOPPED, detail), domain(DomainEvent::Stopped), "{detail}");
        }
        for detail in [sys::VIR_DOMAIN_EVENT_STOPPED_CRASHED, sys::VIR_DOMAIN_EVENT_STOPPED_FAILED] {
            assert_eq!(ev(sys::VIR_DOMAIN_EVENT_STOPPED, detail), domain(DomainEvent::Crashed), "{detail}");
        }
        assert_eq!(ev(sys::VIR_DOMAIN_EVENT_DEFINED, 0), Some(HypervisorEvent::Defined { domain: D }));
        assert_eq!(ev(sys::VIR_DOMAIN_EVENT_UNDEFINED, 0), Some(HypervisorEvent::Undefined { domain: D }));
        for event in [
            sys::VIR_DOMAIN_EVENT_SUSPENDED,
            sys::VIR_DOMAIN_EVENT_RESUMED,
            sys::VIR_DOMAIN_EVENT_SHUTDOWN,
            sys::VIR_DOMAIN_EVENT_PMSUSPENDED,
            sys::VIR_DOMAIN_EVENT_CRASHED,
        ] {
            assert_eq!(ev(event, 0), None, "{event}");
        }
        assert_eq!(map_lifecycle(D, -1, 0), None);
    }

    #[test]
    fn a_full_queue_drops_and_reports_the_lag() {
        let (tx, rx) = mpsc::sync_channel(1);
        let dropped = Arc::new(AtomicU64::new(0));
        let sink = EventSink { tx, dropped: dropped.clone() };
        for _ in 0..3 {
            sink.lifecycle(D, sys::VIR_DOMAIN_EVENT_STARTED as c_int, 0);
        }
        assert_eq!(dropped.load(Ordering::Relaxed), 2);
        assert_eq!(rx.try_recv(), Ok(HypervisorEvent::Domain { domain: D, event: DomainEvent::Started }));
        sink.closed(sys::VIR_CONNECT_CLOSE_REASON_KEEPALIVE as c_int);
        assert_eq!(rx.try_recv(), Ok(HypervisorEvent::ConnectionClosed { reason: CloseReason::Keepalive }));
    }
}
