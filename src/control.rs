//! The daemon's control socket: a root-only unix socket on which `havirt
//! status`, `events`, `protect`, `unprotect` and `fence confirm` talk to the
//! local daemon. One JSON request line in, one JSON response line out.

use crate::engine::config::{IsolationResponse, Priority, Readiness};
use crate::engine::io::Event;
use crate::engine::view::NodeView;
use serde::{Deserialize, Serialize};

/// Where the daemon listens unless the config says otherwise.
pub const DEFAULT_SOCKET: &str = "/run/havirt/control.sock";

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Request {
    Status,
    /// Events with a sequence number above `after` (0: all kept).
    Events {
        after: u64,
    },
    /// Protect a domain running on this host, or change its policy: only
    /// the fields given change, the others keep their value.
    Protect {
        domain: String,
        changes: PolicyChanges,
    },
    Unprotect {
        domain: String,
    },
    /// The operator swears the host is powered off.
    FenceConfirm {
        host: String,
    },
}

/// Policy fields to set; `None` keeps the current value (or the default for
/// a domain protected for the first time).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct PolicyChanges {
    pub priority: Option<Priority>,
    pub isolation_response: Option<IsolationResponse>,
    /// Host names; an empty list clears the affinity.
    pub affinity: Option<Vec<String>>,
    /// `Some("")` clears the group.
    pub anti_affinity: Option<String>,
    pub readiness: Option<Readiness>,
    pub readiness_timeout_s: Option<u64>,
    pub max_restarts: Option<u32>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Response {
    Status(Box<StatusReport>),
    Events(Vec<EventRecord>),
    /// The request was carried out; what was done, for the operator.
    Done(String),
    /// It was refused or failed; why, and what to do.
    Error(String),
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StatusReport {
    pub cluster: String,
    /// This daemon's host name (from the config).
    pub host_name: String,
    pub uptime_ms: u64,
    pub view: NodeView,
    pub counters: Counters,
}

/// What the adapters rejected or failed, since the daemon started.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counters {
    pub packets_accepted: u64,
    pub packets_rejected: u64,
    pub records_rejected: u64,
    pub storage_errors: u64,
    pub storage_timeouts: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventRecord {
    pub seq: u64,
    /// Wall-clock time the daemon logged it (ms since the Unix epoch).
    pub unix_ms: u64,
    pub event: Event,
}
