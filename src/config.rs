//! The daemon configuration file, `/etc/havirt/havirt.toml`.
//!
//! One file describes the whole cluster and is identical on every host; a
//! daemon picks its own `[[host]]` with `--host NAME` or by its host name
//! ([`Config::local_host`]). `config/havirt.toml` is the commented example.
//!
//! Loading is two steps. Serde reads the text into `Raw*` structs whose
//! checked values are [`toml::Spanned`], so every later refusal can point at
//! a line; then validation turns them into the typed [`Config`]. Every
//! [`ConfigError`] names the file, line, column and key and says how to fix
//! it, because an operator reads it at 3 a.m. on a host that will not start.
//!
//! The cluster key is not read here: the daemon calls [`check_key_file`] at
//! start, so that the example and the tests load without a key on disk.

use crate::engine::config::{
    AdmissionMode, AdmissionPolicy, ClusterSpec, HostId, HostSpec, Profile, Timings, TimingsError,
};
use crate::engine::time::Duration;
use crate::hypervisor::netmap::{NetKind, NetMap};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::fmt;
use std::io::Read;
use std::net::IpAddr;
use std::ops::Range;
use std::path::{Path, PathBuf};
use toml::Spanned;

/// Where the daemon looks when `--config` is not given.
pub const DEFAULT_PATH: &str = "/etc/havirt/havirt.toml";
/// UDP port of the network heartbeat when `net_port` is not set.
pub const DEFAULT_NET_PORT: u16 = 7405;
/// Where the daemon serves Prometheus metrics when `metrics_address` is not
/// set: this host only (the metrics carry no secret, but need no audience).
pub const DEFAULT_METRICS_ADDRESS: std::net::SocketAddr =
    std::net::SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 9405);
/// A configuration file larger than this is not havirt.toml.
pub const CONFIG_SIZE_MAX_BYTES: u64 = 1024 * 1024;
/// HMAC-SHA256 wants a key of at least its output size.
pub const KEY_MIN_BYTES: usize = 32;
/// A key file larger than this is some other file.
pub const KEY_MAX_BYTES: usize = 4096;
/// Host ids are block-backend slots (DESIGN.md §4) and fit in one byte.
pub const HOST_ID_MAX: i64 = 255;
/// Redundant rings per host.
pub const ADDRESSES_MAX: usize = 8;
pub const ISOLATION_ADDRESSES_MAX: usize = 16;
/// Entries in one host's fence chain.
pub const FENCE_CHAIN_MAX: usize = 8;
pub const MAX_CONCURRENT_STARTS_MAX: i64 = 64;
pub const DEFAULT_MAX_CONCURRENT_STARTS: u32 = 4;
/// No havirt timing is sensibly longer than an hour.
pub const TIMING_MAX_MS: i64 = 3_600_000;
/// ipmitool `-C`: cipher suite 3 is RAKP-HMAC-SHA1 with AES, the usual safe one.
pub const DEFAULT_IPMI_CIPHER: u8 = 3;
pub const IPMI_CIPHER_MAX: i64 = 17;
/// The device `watchdog = "device"` opens unless told otherwise.
pub const DEFAULT_WATCHDOG_DEVICE: &str = "/dev/watchdog";
/// Entries of one host's `bridge_map` or `network_map`.
pub const NET_MAP_MAX: usize = 256;
/// A Linux interface name is at most this long (IFNAMSIZ - 1).
pub const BRIDGE_NAME_MAX_BYTES: usize = 15;
/// A libvirt network name is at most this long here.
pub const NETWORK_NAME_MAX_BYTES: usize = 64;
/// Lines searched back from a value for its `key =` (multi-line arrays).
const KEY_LOOKBACK_LINES: usize = 64;
/// `[[alert]]` receivers; each has a thread and a queue in the daemon.
pub const ALERTS_MAX: usize = 8;
/// Words of one alert `command`.
pub const ALERT_ARGV_MAX: usize = 64;
/// A webhook URL longer than this is not one.
pub const ALERT_URL_MAX_BYTES: usize = 2048;
/// One try of one alert (`timeout_ms`), and the first pause (`backoff_ms`).
pub const ALERT_TIMEOUT_MAX_MS: i64 = 300_000;
pub const ALERT_BACKOFF_MAX_MS: i64 = 60_000;
/// Tries of one alert, the first included (`attempts`).
pub const ALERT_ATTEMPTS_MAX: i64 = 10;
/// Defaults: a webhook is retried (receivers restart, networks blink); a
/// command runs once unless told otherwise (it may not be idempotent).
pub const DEFAULT_WEBHOOK_TIMEOUT_MS: u64 = 5_000;
pub const DEFAULT_WEBHOOK_ATTEMPTS: u32 = 5;
pub const DEFAULT_COMMAND_TIMEOUT_MS: u64 = 10_000;
pub const DEFAULT_COMMAND_ATTEMPTS: u32 = 1;
pub const DEFAULT_ALERT_BACKOFF_MS: u64 = 1_000;

// ---------------------------------------------------------------- typed config

/// The validated configuration of the whole cluster.
#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    /// The file it was read from, for messages.
    pub path: PathBuf,
    pub cluster: ClusterConfig,
    /// In file order.
    pub hosts: Vec<HostConfig>,
    /// `[[alert]]` receivers, in file order (`crate::alerts`).
    pub alerts: Vec<AlertConfig>,
}

/// One `[[alert]]` receiver.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AlertConfig {
    /// The `name` key, else `KIND-N` (N: its place among the [[alert]]s).
    pub name: String,
    pub target: AlertTarget,
    /// One try: an HTTP request with its answer, or the command's run.
    pub timeout_ms: u64,
    /// Tries per alert, the first included.
    pub attempts: u32,
    /// The pause after the first failed try (doubles after each).
    pub backoff_ms: u64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AlertTarget {
    /// POST the alert as JSON, signed with HMAC-SHA256 under the key in
    /// `secret_file` (None: the cluster key).
    Webhook { url: String, secret_file: Option<PathBuf> },
    /// Run argv with the alert as JSON on stdin.
    Command { argv: Vec<String> },
}

#[derive(Clone, Debug, PartialEq)]
pub struct ClusterConfig {
    pub name: String,
    /// Root-only file holding the HMAC key; see [`check_key_file`].
    pub key_file: PathBuf,
    pub datastore: Datastore,
    pub profile: Profile,
    /// The profile's timings with `[cluster.timings]` applied; validated.
    pub timings: Timings,
    pub memory_overcommit: f64,
    pub vcpu_overcommit: f64,
    /// Addresses a host pings to tell "isolated" from "peers are down".
    pub isolation_addresses: Vec<IpAddr>,
    pub net_port: u16,
    /// Live-migrate even when libvirt cannot tell that the disks are on
    /// shared storage (it knows NFS, GFS2, OCFS2, CephFS, SMB, ...; not FUSE
    /// or a filesystem of its own); libvirt's VIR_MIGRATE_UNSAFE.
    pub allow_unsafe_migration: bool,
    /// Where the daemon serves Prometheus metrics (`GET /metrics`); None: off.
    pub metrics_address: Option<std::net::SocketAddr>,
    /// `admission`, `tolerate_host_failures`, `tolerate_fault_domain_failures`.
    pub admission: AdmissionPolicy,
}

/// Where the shared records live (DESIGN.md §4).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Datastore {
    /// The cluster's directory on a shared filesystem (NFS), used as is.
    Dir { path: PathBuf },
    /// A raw shared LUN with fixed 4 KiB slots.
    Block { device: PathBuf },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostConfig {
    pub name: String,
    pub id: HostId,
    /// One per ring, ring 0 first.
    pub addresses: Vec<IpAddr>,
    pub fault_domain: Option<String>,
    pub watchdog: Watchdog,
    pub max_concurrent_starts: u32,
    /// Tried in order.
    pub fence: Vec<FenceConfig>,
    /// The libvirt URI other hosts migrate domains to this host with
    /// (maintenance mode); default `qemu+ssh://root@ADDRESS/system`.
    pub migration_uri: String,
    /// `bridge_map` and `network_map`: cluster names of bridges and
    /// libvirt networks -> this host's names (`hypervisor::netmap`).
    pub net_map: NetMap,
}

impl HostConfig {
    /// Where the migration data stream goes: the host's first (ring 0)
    /// address, never its host name (which may resolve elsewhere).
    pub fn migration_data_uri(&self) -> String {
        match self.addresses[0] {
            IpAddr::V4(a) => format!("tcp://{a}"),
            IpAddr::V6(a) => format!("tcp://[{a}]"),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Watchdog {
    /// A hardware or softdog device the daemon pets.
    Device { device: PathBuf },
    /// systemd's watchdog (sd_notify); resets the host only if the unit says so.
    Systemd,
    /// The lab's simulated watchdog, reached over a unix socket.
    Lab { socket: PathBuf },
    /// No watchdog: the host can be taken over only after a confirmed fence.
    None,
}

impl Watchdog {
    /// Whether this watchdog resets the host, as S3(b) needs.
    pub fn resets_host(&self) -> bool {
        !matches!(self, Watchdog::None)
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FenceConfig {
    /// The `name` key, or the kind; unique within one host's chain.
    pub name: String,
    pub method: FenceMethod,
}

/// One fence agent. Holds password *files*, never passwords, so it may be
/// logged.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FenceMethod {
    Ipmi {
        address: String,
        username: String,
        password_file: PathBuf,
        cipher: u8,
    },
    /// A fence-agents program; `options` go to its stdin as `key=value` lines.
    Command {
        agent: String,
        options: BTreeMap<String, String>,
        password_file: Option<PathBuf>,
    },
    /// The host is itself a libvirt domain (the lab).
    Libvirt {
        uri: String,
        domain: String,
    },
    /// Poison pill on shared storage; confirmed only after S3(b).
    Storage,
}

impl FenceMethod {
    pub fn kind(&self) -> &'static str {
        match self {
            FenceMethod::Ipmi { .. } => "ipmi",
            FenceMethod::Command { .. } => "command",
            FenceMethod::Libvirt { .. } => "libvirt",
            FenceMethod::Storage => "storage",
        }
    }

    /// Whether a success of this agent confirms power-off (S3(a)).
    pub fn confirms_power_off(&self) -> bool {
        !matches!(self, FenceMethod::Storage)
    }
}

// ---------------------------------------------------------------- errors

/// A place in the configuration file: `file:line:column: table key "k"`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Location {
    pub file: String,
    /// 1-based.
    pub line: usize,
    /// 1-based, in characters.
    pub column: usize,
    /// The enclosing table, e.g. `[[host]] #2`; empty at the top level.
    pub table: String,
    pub key: String,
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}: ", self.file, self.line, self.column)?;
        if !self.table.is_empty() {
            write!(f, "{} ", self.table)?;
        }
        write!(f, "key \"{}\"", self.key)
    }
}

/// What is wrong at a [`Location`]; each message says how to fix it.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum ConfigProblem {
    #[error(
        "TOML syntax error: {detail}; fix the syntax here (quote strings, close every [ and {{, one key = value per line)"
    )]
    Syntax { detail: String },
    #[error(
        "defined twice; keep one definition (a key or a [table] appears once; [[host]] and [[host.fence]] take two brackets so that they can repeat)"
    )]
    DuplicateKey,
    #[error("unknown key; remove it or correct its spelling (this table takes {allowed})")]
    UnknownKey { allowed: String },
    #[error(
        "passwords are never written in havirt.toml; put the password in a root-only file (chmod 600) and name it with password_file = \"/etc/havirt/fence/HOST.pw\""
    )]
    PlaintextPassword,
    #[error("required key is missing; add {example}")]
    Missing { example: String },
    #[error("{detail}; write {expected}")]
    WrongType { detail: String, expected: String },
    #[error("{detail}; correct the value")]
    BadValue { detail: String },
    #[error("{value} is out of range; use a whole number from {min} to {max}{unit}")]
    OutOfRange { value: i64, min: i64, max: i64, unit: &'static str },
    #[error("{value} is out of range; use a number from {min:.1} to {max:.1}")]
    OutOfRangeFloat { value: f64, min: f64, max: f64 },
    #[error("\"{value}\" is not valid here; use one of {allowed}")]
    NotOneOf { value: String, allowed: &'static str },
    #[error("\"{value}\" is not a valid {what}; use {rule}")]
    BadName { value: String, what: &'static str, rule: &'static str },
    #[error(
        "\"{value}\" is not an IP address; write a bare IPv4 or IPv6 address such as \"192.0.2.11\" or \"2001:db8::11\" (no port, no host name)"
    )]
    BadAddress { value: String },
    #[error("\"{value}\" is not an absolute path; write the full path, starting with /")]
    NotAbsolute { value: String },
    #[error(
        "\"{value}\" is not an address and port; write IP:PORT such as \"127.0.0.1:9405\" or \"[::1]:9405\" (no host name), or \"off\""
    )]
    BadSocketAddress { value: String },
    #[error("the list is empty; give at least one {what}")]
    EmptyList { what: &'static str },
    #[error("{count} {what} listed; give at most {max}")]
    TooMany { count: usize, what: &'static str, max: usize },
    #[error("{value} is already used by host \"{host}\"; {fix}")]
    AlreadyUsed { value: String, host: String, fix: &'static str },
    #[error(
        "only {count} [[host]] configured; havirt needs at least 2 hosts (a lone host has nobody to restart its domains): add a [[host]] table for every member"
    )]
    TooFewHosts { count: usize },
    #[error("kind = \"{kind}\" needs this key; add {example}")]
    RequiredForKind { kind: String, example: &'static str },
    #[error("this key does not apply to kind = \"{kind}\"; remove it (kind \"{kind}\" takes {allowed})")]
    NotForKind { kind: String, allowed: &'static str },
    #[error("fence entry name \"{name}\" is used twice in this host's chain; give one of them its own name = \"...\"")]
    DuplicateFenceName { name: String },
    #[error(
        "\"{local}\" is already the local name of \"{first}\"; map each cluster name to a local name of its own (havirt maps a definition back to the cluster names when it stores it, and cannot tell two names on one apart)"
    )]
    DuplicateLocalName { local: String, first: String },
    #[error("alert name \"{name}\" is used by two [[alert]] tables; give each its own name = \"...\"")]
    DuplicateAlertName { name: String },
    #[error("havirt passes \"{key}\" to the agent itself; remove it from options")]
    ReservedOption { key: String },
    #[error("{source}; the timings in effect are profile \"{profile}\" with the [cluster.timings] overrides applied")]
    UnsafeTimings { source: TimingsError, profile: &'static str },
}

/// Why the configuration or the cluster key was refused.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum ConfigError {
    #[error(
        "{path}: cannot read the configuration file: {reason}; check the path (default {DEFAULT_PATH}) or pass --config FILE"
    )]
    Read { path: String, reason: String },
    #[error(
        "{path}: {size} bytes is too large for a configuration file (limit {CONFIG_SIZE_MAX_BYTES}); check that --config names havirt.toml"
    )]
    TooLarge { path: String, size: u64 },
    #[error("{at}: {problem}")]
    /// Boxed to keep `Result<_, ConfigError>` small.
    Invalid { at: Box<Location>, problem: Box<ConfigProblem> },
    #[error(
        "{path}: no [[host]] is named \"{name}\" (configured: {known}); pass --host NAME with one of these names, or add a [[host]] for this machine on every host"
    )]
    UnknownHost { path: String, name: String, known: String },
    #[error("cannot read this machine's host name from {source_path}: {reason}; pass --host NAME")]
    Hostname { source_path: &'static str, reason: String },
    #[error(
        "key file {path}: {reason}; create the cluster key once with `head -c 64 /dev/urandom > {path} && chmod 600 {path}` and copy the same file to every host"
    )]
    KeyFileUnreadable { path: String, reason: String },
    #[error(
        "key file {path} is not a regular file; point key_file at the cluster key file (chmod 600, at least {KEY_MIN_BYTES} bytes)"
    )]
    KeyFileNotRegular { path: String },
    #[error("key file {path} has mode {mode:04o}: group or others can read the cluster key; run `chmod 600 {path}`")]
    KeyFileUnsafeMode { path: String, mode: u32 },
    #[error(
        "key file {path} holds {len} bytes; the cluster key needs {KEY_MIN_BYTES} to {KEY_MAX_BYTES} bytes: regenerate it with `head -c 64 /dev/urandom > {path} && chmod 600 {path}` and copy it to every host"
    )]
    KeyFileSize { path: String, len: u64 },
}

/// Something the daemon accepts but the operator should know.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ConfigWarning {
    /// Neither a watchdog nor a fence agent that confirms power-off.
    NoAutomaticTakeover { at: Location, host: String },
    /// A host with a different number of addresses than the first host.
    RingMismatch { at: Location, host: String, count: usize, expected: usize },
    /// A webhook signed with the cluster key: its receiver holds that key.
    AlertClusterKey { at: Location, name: String },
}

impl fmt::Display for ConfigWarning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConfigWarning::NoAutomaticTakeover { at, host } => write!(
                f,
                "{at}: host \"{host}\" has watchdog = \"none\" and no fence agent that confirms power-off: its domains can only be taken over after `havirt fence confirm {host}`; add a [[host.fence]] entry (ipmi, command or libvirt) or a watchdog"
            ),
            ConfigWarning::RingMismatch { at, host, count, expected } => write!(
                f,
                "{at}: host \"{host}\" has {count} address(es) but the first host has {expected}; the rings it lacks do not reach it, give every host one address per ring"
            ),
            ConfigWarning::AlertClusterKey { at, name } => write!(
                f,
                "{at}: webhook \"{name}\" has no secret_file, so its signatures use the cluster key, and whoever checks them holds the key that authenticates heartbeats; give it a key of its own: secret_file = \"/etc/havirt/alert.key\" (root-only, the same file on every host)"
            ),
        }
    }
}

// ---------------------------------------------------------------- raw (serde) model

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    cluster: Spanned<RawCluster>,
    #[serde(default)]
    host: Vec<Spanned<RawHost>>,
    #[serde(default)]
    alert: Vec<Spanned<RawAlert>>,
}

/// One `[[alert]]`: the keys of both kinds, checked per kind by hand.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAlert {
    kind: Spanned<String>,
    #[serde(default)]
    name: Option<Spanned<String>>,
    #[serde(default)]
    url: Option<Spanned<String>>,
    #[serde(default)]
    secret_file: Option<Spanned<String>>,
    #[serde(default)]
    command: Option<Spanned<Vec<Spanned<String>>>>,
    #[serde(default)]
    timeout_ms: Ms,
    #[serde(default)]
    attempts: Option<Spanned<i64>>,
    #[serde(default)]
    backoff_ms: Ms,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCluster {
    name: Spanned<String>,
    key_file: Spanned<String>,
    #[serde(default)]
    datastore: Option<Spanned<RawDatastore>>,
    #[serde(default)]
    profile: Option<Spanned<String>>,
    #[serde(default)]
    timings: Option<Spanned<RawTimings>>,
    #[serde(default)]
    memory_overcommit: Option<Spanned<f64>>,
    #[serde(default)]
    vcpu_overcommit: Option<Spanned<f64>>,
    #[serde(default)]
    isolation_addresses: Option<Spanned<Vec<Spanned<String>>>>,
    #[serde(default)]
    net_port: Option<Spanned<i64>>,
    #[serde(default)]
    allow_unsafe_migration: Option<Spanned<bool>>,
    #[serde(default)]
    metrics_address: Option<Spanned<String>>,
    #[serde(default)]
    admission: Option<Spanned<String>>,
    #[serde(default)]
    tolerate_host_failures: Option<Spanned<i64>>,
    #[serde(default)]
    tolerate_fault_domain_failures: Option<Spanned<i64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDatastore {
    kind: Spanned<String>,
    #[serde(default)]
    path: Option<Spanned<String>>,
    #[serde(default)]
    device: Option<Spanned<String>>,
}

type Ms = Option<Spanned<i64>>;

/// `[cluster.timings]`: overrides of the engine's [`Timings`], in ms.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTimings {
    #[serde(default)]
    net_heartbeat_interval_ms: Ms,
    #[serde(default)]
    suspect_after_ms: Ms,
    #[serde(default)]
    storage_write_interval_ms: Ms,
    #[serde(default)]
    storage_read_interval_ms: Ms,
    #[serde(default)]
    storage_silent_after_ms: Ms,
    #[serde(default)]
    io_timeout_ms: Ms,
    #[serde(default)]
    renew_timeout_ms: Ms,
    #[serde(default)]
    watchdog_timeout_ms: Ms,
    #[serde(default)]
    host_dead_timeout_ms: Ms,
    #[serde(default)]
    isolation_timeout_ms: Ms,
    #[serde(default)]
    fence_timeout_ms: Ms,
    #[serde(default)]
    fence_retry_backoff_ms: Ms,
    #[serde(default)]
    shutdown_timeout_ms: Ms,
    #[serde(default)]
    restart_backoff_ms: Ms,
    #[serde(default)]
    restart_backoff_max_ms: Ms,
}

impl RawTimings {
    /// Every override with its key, in the order of [`Timings`].
    fn entries(&self) -> [(&'static str, Option<&Spanned<i64>>); 15] {
        [
            ("net_heartbeat_interval_ms", self.net_heartbeat_interval_ms.as_ref()),
            ("suspect_after_ms", self.suspect_after_ms.as_ref()),
            ("storage_write_interval_ms", self.storage_write_interval_ms.as_ref()),
            ("storage_read_interval_ms", self.storage_read_interval_ms.as_ref()),
            ("storage_silent_after_ms", self.storage_silent_after_ms.as_ref()),
            ("io_timeout_ms", self.io_timeout_ms.as_ref()),
            ("renew_timeout_ms", self.renew_timeout_ms.as_ref()),
            ("watchdog_timeout_ms", self.watchdog_timeout_ms.as_ref()),
            ("host_dead_timeout_ms", self.host_dead_timeout_ms.as_ref()),
            ("isolation_timeout_ms", self.isolation_timeout_ms.as_ref()),
            ("fence_timeout_ms", self.fence_timeout_ms.as_ref()),
            ("fence_retry_backoff_ms", self.fence_retry_backoff_ms.as_ref()),
            ("shutdown_timeout_ms", self.shutdown_timeout_ms.as_ref()),
            ("restart_backoff_ms", self.restart_backoff_ms.as_ref()),
            ("restart_backoff_max_ms", self.restart_backoff_max_ms.as_ref()),
        ]
    }
}

/// The engine field behind a `[cluster.timings]` key.
fn timing_mut<'a>(t: &'a mut Timings, key: &str) -> Option<&'a mut Duration> {
    Some(match key {
        "net_heartbeat_interval_ms" => &mut t.net_heartbeat_interval,
        "suspect_after_ms" => &mut t.suspect_after,
        "storage_write_interval_ms" => &mut t.storage_write_interval,
        "storage_read_interval_ms" => &mut t.storage_read_interval,
        "storage_silent_after_ms" => &mut t.storage_silent_after,
        "io_timeout_ms" => &mut t.io_timeout,
        "renew_timeout_ms" => &mut t.renew_timeout,
        "watchdog_timeout_ms" => &mut t.watchdog_timeout,
        "host_dead_timeout_ms" => &mut t.host_dead_timeout,
        "isolation_timeout_ms" => &mut t.isolation_timeout,
        "fence_timeout_ms" => &mut t.fence_timeout,
        "fence_retry_backoff_ms" => &mut t.fence_retry_backoff,
        "shutdown_timeout_ms" => &mut t.shutdown_timeout,
        "restart_backoff_ms" => &mut t.restart_backoff,
        "restart_backoff_max_ms" => &mut t.restart_backoff_max,
        _ => return None,
    })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHost {
    name: Spanned<String>,
    id: Spanned<i64>,
    addresses: Spanned<Vec<Spanned<String>>>,
    #[serde(default)]
    fault_domain: Option<Spanned<String>>,
    /// A string (`"device"`) or a table (`{ kind = "device", device = ... }`),
    /// read by hand because serde's untagged enums lose the spans.
    watchdog: Spanned<toml::Value>,
    #[serde(default)]
    max_concurrent_starts: Option<Spanned<i64>>,
    #[serde(default)]
    migration_uri: Option<Spanned<String>>,
    #[serde(default)]
    fence: Vec<Spanned<RawFence>>,
    #[serde(default)]
    bridge_map: Option<Spanned<RawNetMap>>,
    #[serde(default)]
    network_map: Option<Spanned<RawNetMap>>,
}

/// `bridge_map` / `network_map`: cluster name -> local name.
type RawNetMap = BTreeMap<String, Spanned<String>>;

/// One `[[host.fence]]` entry: all keys of all kinds, checked per kind by
/// hand (a serde tagged enum would lose the spans).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFence {
    kind: Spanned<String>,
    #[serde(default)]
    name: Option<Spanned<String>>,
    #[serde(default)]
    address: Option<Spanned<String>>,
    #[serde(default)]
    username: Option<Spanned<String>>,
    #[serde(default)]
    password_file: Option<Spanned<String>>,
    #[serde(default)]
    cipher: Option<Spanned<i64>>,
    #[serde(default)]
    agent: Option<Spanned<String>>,
    #[serde(default)]
    options: Option<Spanned<BTreeMap<String, Spanned<String>>>>,
    #[serde(default)]
    uri: Option<Spanned<String>>,
    #[serde(default)]
    domain: Option<Spanned<String>>,
}

impl RawFence {
    /// The kind-specific keys present, with the span of their values.
    fn present(&self) -> Vec<(&'static str, Range<usize>)> {
        let s = |o: &Option<Spanned<String>>| o.as_ref().map(Spanned::span);
        let keys = [
            ("address", s(&self.address)),
            ("username", s(&self.username)),
            ("password_file", s(&self.password_file)),
            ("cipher", self.cipher.as_ref().map(Spanned::span)),
            ("agent", s(&self.agent)),
            ("options", self.options.as_ref().map(Spanned::span)),
            ("uri", s(&self.uri)),
            ("domain", s(&self.domain)),
        ];
        keys.into_iter().filter_map(|(k, span)| span.map(|sp| (k, sp))).collect()
    }
}

// ---------------------------------------------------------------- loading

impl Config {
    /// Read, parse and validate a configuration file. Warnings are things
    /// the daemon accepts but should print.
    pub fn load(path: impl AsRef<Path>) -> Result<(Config, Vec<ConfigWarning>), ConfigError> {
        let path = path.as_ref();
        let shown = path.display().to_string();
        let read_error = |e: std::io::Error| ConfigError::Read { path: shown.clone(), reason: e.to_string() };
        let file = std::fs::File::open(path).map_err(read_error)?;
        let size = file.metadata().map_err(read_error)?.len();
        if size > CONFIG_SIZE_MAX_BYTES {
            return Err(ConfigError::TooLarge { path: shown, size });
        }
        let mut text = String::new();
        file.take(CONFIG_SIZE_MAX_BYTES).read_to_string(&mut text).map_err(read_error)?;
        Config::parse(path, &text)
    }

    /// Parse and validate `text` as if read from `path` (used in messages).
    pub fn parse(path: impl AsRef<Path>, text: &str) -> Result<(Config, Vec<ConfigWarning>), ConfigError> {
        let src = Source { file: path.as_ref().display().to_string(), text };
        // Syntax first, so that a syntax error is not reported as a type error.
        if let Err(e) = text.parse::<toml::Table>() {
            return Err(src.syntax_error(&e));
        }
        let raw: RawFile = toml::from_str(text).map_err(|e| src.serde_error(&e))?;
        let cluster = src.cluster(&raw.cluster)?;
        let mut hosts = Vec::with_capacity(raw.host.len());
        for raw_host in &raw.host {
            hosts.push(src.host(raw_host)?);
        }
        src.check_unique(&raw.host, &hosts)?;
        if hosts.len() < 2 {
            let mut at = src.at(raw.host.first().map_or(0, |h| h.span().start), "host");
            if hosts.is_empty() {
                at.table.clear(); // `host` is a top-level key
            }
            return Err(src.invalid(at, ConfigProblem::TooFewHosts { count: hosts.len() }));
        }
        let mut warnings = src.warnings(&raw.host, &hosts);
        let alerts = src.alerts(&raw.alert, &mut warnings)?;
        Ok((Config { path: path.as_ref().to_path_buf(), cluster, hosts, alerts }, warnings))
    }

    /// The `[[host]]` this daemon runs as: `name` from `--host` or the
    /// machine's host name. An exact match wins; otherwise the short names
    /// (before the first dot) must match exactly one host.
    pub fn local_host(&self, name: &str) -> Result<&HostConfig, ConfigError> {
        if let Some(h) = self.hosts.iter().find(|h| h.name == name) {
            return Ok(h);
        }
        let short = |s: &str| s.split('.').next().unwrap_or(s).to_owned();
        let mut matches = self.hosts.iter().filter(|h| short(&h.name) == short(name));
        match (matches.next(), matches.next()) {
            (Some(h), None) => Ok(h),
            _ => Err(ConfigError::UnknownHost {
                path: self.path.display().to_string(),
                name: name.to_owned(),
                known: self.hosts.iter().map(|h| h.name.as_str()).collect::<Vec<_>>().join(", "),
            }),
        }
    }

    pub fn host_by_id(&self, id: HostId) -> Option<&HostConfig> {
        self.hosts.iter().find(|h| h.id == id)
    }

    /// What the engine is told. Capacity (memory, vCPUs) is left 0 for the
    /// daemon to fill from the machine; domains come from libvirt.
    pub fn cluster_spec(&self) -> ClusterSpec {
        let hosts = self
            .hosts
            .iter()
            .map(|h| HostSpec {
                id: h.id,
                name: h.name.clone(),
                fence_agents: h.fence.iter().map(|f| f.name.clone()).collect(),
                watchdog: h.watchdog.resets_host(),
                fault_domain: h.fault_domain.clone(),
                memory_mib: 0,
                vcpus: 0,
                max_concurrent_starts: h.max_concurrent_starts,
            })
            .collect();
        ClusterSpec {
            name: self.cluster.name.clone(),
            timings: self.cluster.timings,
            hosts,
            domains: BTreeMap::new(),
            memory_overcommit: self.cluster.memory_overcommit,
            vcpu_overcommit: self.cluster.vcpu_overcommit,
            admission: self.cluster.admission,
        }
    }
}

/// This machine's host name, for choosing the local `[[host]]` when
/// `--host` is not given.
pub fn machine_hostname() -> Result<String, ConfigError> {
    const SOURCE: &str = "/proc/sys/kernel/hostname";
    let text = std::fs::read_to_string(SOURCE)
        .map_err(|e| ConfigError::Hostname { source_path: SOURCE, reason: e.to_string() })?;
    let name = text.trim();
    if name.is_empty() {
        return Err(ConfigError::Hostname { source_path: SOURCE, reason: "it is empty".into() });
    }
    Ok(name.to_owned())
}

/// Check the cluster key file and return the key: it must exist, be a
/// regular file, be unreadable by group and others (`mode & 0o077 == 0`)
/// and hold [`KEY_MIN_BYTES`] to [`KEY_MAX_BYTES`] bytes (used as they are).
/// The mode is taken from the opened file, so it is the file that is read.
pub fn check_key_file(path: impl AsRef<Path>) -> Result<Vec<u8>, ConfigError> {
    use std::os::unix::fs::PermissionsExt;
    let shown = path.as_ref().display().to_string();
    let unreadable = |e: std::io::Error| ConfigError::KeyFileUnreadable { path: shown.clone(), reason: e.to_string() };
    let file = std::fs::File::open(path.as_ref()).map_err(unreadable)?;
    let meta = file.metadata().map_err(unreadable)?;
    if !meta.is_file() {
        return Err(ConfigError::KeyFileNotRegular { path: shown });
    }
    let mode = meta.permissions().mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(ConfigError::KeyFileUnsafeMode { path: shown, mode });
    }
    let max = u64::try_from(KEY_MAX_BYTES).unwrap_or(u64::MAX);
    let min = u64::try_from(KEY_MIN_BYTES).unwrap_or(0);
    if meta.len() > max {
        return Err(ConfigError::KeyFileSize { path: shown, len: meta.len() });
    }
    let mut key = Vec::with_capacity(KEY_MAX_BYTES);
    file.take(max + 1).read_to_end(&mut key).map_err(unreadable)?;
    let len = u64::try_from(key.len()).unwrap_or(u64::MAX);
    if !(min..=max).contains(&len) {
        return Err(ConfigError::KeyFileSize { path: shown, len });
    }
    Ok(key)
}

// ---------------------------------------------------------------- validation

/// The text being validated, for turning spans into locations.
struct Source<'a> {
    file: String,
    text: &'a str,
}

type Res<T> = Result<T, ConfigError>;

const NAME_RULE: &str = "1 to 32 characters from a-z, 0-9 and -";
const HOST_NAME_RULE: &str = "1 to 64 characters from A-Z, a-z, 0-9, '.', '_' and '-' (the machine's host name)";
const LABEL_RULE: &str = "1 to 64 characters from A-Z, a-z, 0-9, '.', '_' and '-'";
const TEXT_RULE: &str = "1 to 255 characters, no line breaks or control characters";
const BRIDGE_RULE: &str =
    "a Linux interface name: 1 to 15 characters, no '/', ':' or white space, not \".\" or \"..\" (see `ip link`)";
const NETWORK_RULE: &str = "a libvirt network name: 1 to 64 characters, no '/' or white space (see `virsh net-list`)";

impl Source<'_> {
    fn invalid(&self, at: Location, problem: ConfigProblem) -> ConfigError {
        ConfigError::Invalid { at: Box::new(at), problem: Box::new(problem) }
    }

    /// An error at a value, located at its key when the key is on the same
    /// line (so that `id = 0` reports the column of `id`).
    fn err_at<T>(&self, span: Range<usize>, key: &str, problem: ConfigProblem) -> Res<T> {
        Err(self.invalid(self.at_key(span, key), problem))
    }

    fn cluster(&self, raw: &Spanned<RawCluster>) -> Res<ClusterConfig> {
        let c = raw.get_ref();
        let name = self.cluster_name(&c.name)?;
        let key_file = self.abs_path(&c.key_file, "key_file")?;
        let Some(datastore) = &c.datastore else {
            let example = "a [cluster.datastore] table with kind = \"dir\" and path = \"/mnt/nfs/.havirt/NAME\", or kind = \"block\" and device = \"/dev/disk/by-id/...\"";
            return Err(self
                .invalid(self.at(raw.span().start, "datastore"), ConfigProblem::Missing { example: example.into() }));
        };
        let datastore = self.datastore(datastore)?;
        let profile = match &c.profile {
            None => Profile::Default,
            Some(p) => match Profile::parse(p.get_ref()) {
                Some(profile) => profile,
                None => {
                    let allowed = "\"fast\", \"default\", \"conservative\"";
                    return self.err_at(
                        p.span(),
                        "profile",
                        ConfigProblem::NotOneOf { value: p.get_ref().clone(), allowed },
                    );
                }
            },
        };
        let timings = self.timings(raw, profile)?;
        let memory_overcommit = self.float(c.memory_overcommit.as_ref(), "memory_overcommit", 1.0, 0.5, 4.0)?;
        let vcpu_overcommit = self.float(c.vcpu_overcommit.as_ref(), "vcpu_overcommit", 4.0, 1.0, 16.0)?;
        let isolation_addresses = match &c.isolation_addresses {
            None => Vec::new(),
            Some(list) => self.ip_list(list, "isolation_addresses", 0, ISOLATION_ADDRESSES_MAX)?,
        };
        let port = self.int(c.net_port.as_ref(), "net_port", i64::from(DEFAULT_NET_PORT), 1, 65_535, "")?;
        let net_port = u16::try_from(port).unwrap_or(DEFAULT_NET_PORT);
        let metrics_address = self.metrics_address(c.metrics_address.as_ref())?;
        let admission = self.admission(c)?;
        Ok(ClusterConfig {
            name,
            key_file,
            datastore,
            profile,
            timings,
            memory_overcommit,
            vcpu_overcommit,
            isolation_addresses,
            net_port,
            allow_unsafe_migration: c.allow_unsafe_migration.as_ref().is_some_and(|b| *b.get_ref()),
            metrics_address,
            admission,
        })
    }

    /// `admission = "off" | "warn" | "strict"` (default "warn"),
    /// `tolerate_host_failures` (default 1), `tolerate_fault_domain_failures`
    /// (default 0): at most 64, far more than any cluster havirt runs.
    fn admission(&self, c: &RawCluster) -> Res<AdmissionPolicy> {
        let d = AdmissionPolicy::default();
        let mode = match &c.admission {
            None => d.mode,
            Some(v) => match v.get_ref().as_str() {
                "off" => AdmissionMode::Off,
                "warn" => AdmissionMode::Warn,
                "strict" => AdmissionMode::Strict,
                other => {
                    let allowed = "\"off\", \"warn\", \"strict\"";
                    return self.err_at(
                        v.span(),
                        "admission",
                        ConfigProblem::NotOneOf { value: other.into(), allowed },
                    );
                }
            },
        };
        let count = |v: Option<&Spanned<i64>>, key: &str, default: u32| -> Res<u32> {
            let n = self.int(v, key, i64::from(default), 0, 64, "")?;
            Ok(u32::try_from(n).unwrap_or(default))
        };
        Ok(AdmissionPolicy {
            mode,
            host_failures: count(c.tolerate_host_failures.as_ref(), "tolerate_host_failures", d.host_failures)?,
            fault_domain_failures: count(
                c.tolerate_fault_domain_failures.as_ref(),
                "tolerate_fault_domain_failures",
                d.fault_domain_failures,
            )?,
        })
    }

    /// `metrics_address`: "IP:PORT", or "off" (or "") for no metrics.
    fn metrics_address(&self, v: Option<&Spanned<String>>) -> Res<Option<std::net::SocketAddr>> {
        let Some(v) = v else { return Ok(Some(DEFAULT_METRICS_ADDRESS)) };
        let text = v.get_ref().trim();
        if text.is_empty() || text == "off" {
            return Ok(None);
        }
        match text.parse() {
            Ok(addr) => Ok(Some(addr)),
            Err(_) => {
                let problem = ConfigProblem::BadSocketAddress { value: v.get_ref().clone() };
                self.err_at(v.span(), "metrics_address", problem)
            }
        }
    }

    fn cluster_name(&self, name: &Spanned<String>) -> Res<String> {
        let v = name.get_ref();
        let ok =
            (1..=32).contains(&v.len()) && v.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
        if !ok {
            let problem = ConfigProblem::BadName { value: v.clone(), what: "cluster name", rule: NAME_RULE };
            return self.err_at(name.span(), "name", problem);
        }
        Ok(v.clone())
    }

    fn datastore(&self, raw: &Spanned<RawDatastore>) -> Res<Datastore> {
        let d = raw.get_ref();
        let kind = d.kind.get_ref().as_str();
        // (the key this kind needs, its value, the other kind's key, its value, an example, what it takes)
        let (key, value, other_key, other, example, takes) = match kind {
            "dir" => (
                "path",
                &d.path,
                "device",
                &d.device,
                "path = \"/mnt/nfs/.havirt/NAME\" (the cluster's directory on the shared mount)",
                "kind and path",
            ),
            "block" => (
                "device",
                &d.device,
                "path",
                &d.path,
                "device = \"/dev/disk/by-id/...\" (the shared LUN)",
                "kind and device",
            ),
            _ => {
                let problem = ConfigProblem::NotOneOf { value: kind.to_owned(), allowed: "\"dir\", \"block\"" };
                return self.err_at(d.kind.span(), "kind", problem);
            }
        };
        if let Some(o) = other {
            let problem = ConfigProblem::NotForKind { kind: kind.to_owned(), allowed: takes };
            return self.err_at(o.span(), other_key, problem);
        }
        let Some(value) = value else {
            let problem = ConfigProblem::RequiredForKind { kind: kind.to_owned(), example };
            return Err(self.invalid(self.at(raw.span().start, key), problem));
        };
        let path = self.abs_path(value, key)?;
        Ok(if kind == "dir" { Datastore::Dir { path } } else { Datastore::Block { device: path } })
    }

    /// The profile's timings with the overrides applied, validated by the
    /// engine's own rules.
    fn timings(&self, raw: &Spanned<RawCluster>, profile: Profile) -> Res<Timings> {
        let c = raw.get_ref();
        let mut timings = profile.timings();
        if let Some(t) = &c.timings {
            for (key, value) in t.get_ref().entries() {
                let Some(value) = value else { continue };
                let ms = self.int(Some(value), key, 0, 1, TIMING_MAX_MS, " ms")?;
                let Some(slot) = timing_mut(&mut timings, key) else {
                    unreachable!("[cluster.timings] key {key} has no engine field");
                };
                *slot = Duration::from_millis(ms.unsigned_abs());
            }
        }
        let Err(source) = timings.validate() else { return Ok(timings) };
        let at = self.timings_location(raw, &source);
        Err(self.invalid(at, ConfigProblem::UnsafeTimings { source, profile: profile_name(profile) }))
    }

    /// Point a timing error at the override that the engine's rule names
    /// first, else at any override it involves, else at the profile.
    fn timings_location(&self, raw: &Spanned<RawCluster>, e: &TimingsError) -> Location {
        let names: Vec<&str> = match e {
            TimingsError::HostDeadTooShort { .. } => {
                vec!["host_dead_timeout", "renew_timeout", "watchdog_timeout", "io_timeout"]
            }
            TimingsError::RenewTooShort { .. } => vec!["renew_timeout", "io_timeout", "storage_write_interval"],
            TimingsError::SuspectTooLong { .. } => vec!["suspect_after", "renew_timeout"],
            TimingsError::TooTight { name, base_name, .. } => vec![name, base_name],
            TimingsError::Zero { name } => vec![name],
        };
        let keys: Vec<String> = names.iter().map(|n| format!("{n}_ms")).collect();
        let c = raw.get_ref();
        if let Some(t) = &c.timings {
            let entries = t.get_ref().entries();
            for key in &keys {
                if let Some((_, Some(v))) = entries.iter().find(|(k, _)| k == key) {
                    return self.at_key(v.span(), key);
                }
            }
            return self.at(t.span().start, &keys[0]);
        }
        match &c.profile {
            Some(p) => self.at_key(p.span(), "profile"),
            None => self.at(raw.span().start, &keys[0]),
        }
    }

    fn host(&self, raw: &Spanned<RawHost>) -> Res<HostConfig> {
        let h = raw.get_ref();
        let name = self.label(&h.name, "name", "host name", HOST_NAME_RULE)?;
        let id = self.int(Some(&h.id), "id", 0, 1, HOST_ID_MAX, " (the id is also the host's storage slot)")?;
        let id = HostId(u16::try_from(id).unwrap_or(0));
        let addresses = self.ip_list(&h.addresses, "addresses", 1, ADDRESSES_MAX)?;
        let fault_domain = match &h.fault_domain {
            Some(f) => Some(self.label(f, "fault_domain", "fault domain", LABEL_RULE)?),
            None => None,
        };
        let watchdog = self.watchdog(&h.watchdog)?;
        let starts = self.int(
            h.max_concurrent_starts.as_ref(),
            "max_concurrent_starts",
            i64::from(DEFAULT_MAX_CONCURRENT_STARTS),
            1,
            MAX_CONCURRENT_STARTS_MAX,
            "",
        )?;
        let max_concurrent_starts = u32::try_from(starts).unwrap_or(DEFAULT_MAX_CONCURRENT_STARTS);
        if h.fence.len() > FENCE_CHAIN_MAX {
            let problem = ConfigProblem::TooMany { count: h.fence.len(), what: "fence entries", max: FENCE_CHAIN_MAX };
            return Err(self.invalid(self.at(h.fence[FENCE_CHAIN_MAX].span().start, "fence"), problem));
        }
        let mut fence: Vec<FenceConfig> = Vec::with_capacity(h.fence.len());
        for raw_fence in &h.fence {
            let entry = self.fence(raw_fence)?;
            if fence.iter().any(|f| f.name == entry.name) {
                let span = raw_fence.get_ref().name.as_ref().map_or(raw_fence.get_ref().kind.span(), Spanned::span);
                let key = if raw_fence.get_ref().name.is_some() { "name" } else { "kind" };
                return self.err_at(span, key, ConfigProblem::DuplicateFenceName { name: entry.name });
            }
            fence.push(entry);
        }
        let migration_uri = match &h.migration_uri {
            Some(u) => {
                let text = self.text(u, "migration_uri")?;
                if !text.contains("://") {
                    return self.err_at(
                        u.span(),
                        "migration_uri",
                        ConfigProblem::BadName {
                            value: text,
                            what: "libvirt URI",
                            rule: "a libvirt URI such as \"qemu+ssh://root@10.0.1.12/system\"",
                        },
                    );
                }
                text
            }
            None => match addresses[0] {
                IpAddr::V4(a) => format!("qemu+ssh://root@{a}/system"),
                IpAddr::V6(a) => format!("qemu+ssh://root@[{a}]/system"),
            },
        };
        let bridges = self.net_map(h.bridge_map.as_ref(), NetKind::Bridge)?;
        let networks = self.net_map(h.network_map.as_ref(), NetKind::Network)?;
        let Ok(net_map) = NetMap::new(bridges, networks) else {
            unreachable!("net_map refuses two cluster names on one local name");
        };
        Ok(HostConfig {
            name,
            id,
            addresses,
            fault_domain,
            watchdog,
            max_concurrent_starts,
            fence,
            migration_uri,
            net_map,
        })
    }

    /// `watchdog = "device" | "systemd" | "none"`, or a table with `kind`
    /// and `device` (for "device") or `lab_socket` (for "lab").
    fn watchdog(&self, raw: &Spanned<toml::Value>) -> Res<Watchdog> {
        let span = raw.span();
        let allowed = "\"device\", \"systemd\", \"lab\", \"none\"";
        let (kind, table) = match raw.get_ref() {
            toml::Value::String(s) => (s.clone(), None),
            toml::Value::Table(t) => match t.get("kind") {
                Some(toml::Value::String(s)) => (s.clone(), Some(t)),
                _ => {
                    let example = "kind = \"device\" to the watchdog table".into();
                    return self.err_at(span, "watchdog.kind", ConfigProblem::Missing { example });
                }
            },
            other => {
                let detail = format!("invalid type: {}", other.type_str());
                let expected =
                    format!("a string ({allowed}) or a table {{ kind = \"device\", device = \"/dev/watchdog1\" }}");
                return self.err_at(span, "watchdog", ConfigProblem::WrongType { detail, expected });
            }
        };
        let takes: &[&str] = match kind.as_str() {
            "device" => &["kind", "device"],
            "lab" => &["kind", "lab_socket"],
            "systemd" | "none" => &["kind"],
            _ => return self.err_at(span, "watchdog", ConfigProblem::NotOneOf { value: kind, allowed }),
        };
        let get = |key: &str| -> Res<Option<PathBuf>> { self.watchdog_path(span.clone(), table, key) };
        if let Some(t) = table
            && let Some(extra) = t.keys().find(|k| !takes.contains(&k.as_str()))
        {
            let problem = if ["device", "lab_socket"].contains(&extra.as_str()) {
                let allowed = match kind.as_str() {
                    "device" => "kind and device",
                    "lab" => "kind and lab_socket",
                    _ => "only kind",
                };
                ConfigProblem::NotForKind { kind, allowed }
            } else {
                ConfigProblem::UnknownKey { allowed: "kind, device (for \"device\"), lab_socket (for \"lab\")".into() }
            };
            return self.err_at(span, &format!("watchdog.{extra}"), problem);
        }
        Ok(match kind.as_str() {
            "device" => Watchdog::Device { device: get("device")?.unwrap_or_else(|| DEFAULT_WATCHDOG_DEVICE.into()) },
            "lab" => match get("lab_socket")? {
                Some(socket) => Watchdog::Lab { socket },
                None => {
                    let problem =
                        ConfigProblem::RequiredForKind { kind, example: "lab_socket = \"/run/havirt-lab/HOST.sock\"" };
                    return self.err_at(span, "watchdog.lab_socket", problem);
                }
            },
            "systemd" => Watchdog::Systemd,
            _ => Watchdog::None,
        })
    }

    fn watchdog_path(&self, span: Range<usize>, table: Option<&toml::Table>, key: &str) -> Res<Option<PathBuf>> {
        let dotted = format!("watchdog.{key}");
        match table.and_then(|t| t.get(key)) {
            None => Ok(None),
            Some(toml::Value::String(s)) if s.starts_with('/') => Ok(Some(PathBuf::from(s))),
            Some(toml::Value::String(s)) => self.err_at(span, &dotted, ConfigProblem::NotAbsolute { value: s.clone() }),
            Some(other) => {
                let detail = format!("invalid type: {}", other.type_str());
                let expected = "a quoted absolute path".into();
                self.err_at(span, &dotted, ConfigProblem::WrongType { detail, expected })
            }
        }
    }

    fn fence(&self, raw: &Spanned<RawFence>) -> Res<FenceConfig> {
        let f = raw.get_ref();
        let kind = f.kind.get_ref().as_str();
        let takes: &'static str = match kind {
            "ipmi" => "address, username, password_file, cipher, name",
            "command" => "agent, options, password_file, name",
            "libvirt" => "uri, domain, name",
            "storage" => "only name",
            _ => {
                let allowed = "\"ipmi\", \"command\", \"libvirt\", \"storage\"";
                return self.err_at(f.kind.span(), "kind", ConfigProblem::NotOneOf { value: kind.to_owned(), allowed });
            }
        };
        for (key, span) in f.present() {
            if !takes.split(", ").any(|k| k == key) {
                return self.err_at(span, key, ConfigProblem::NotForKind { kind: kind.to_owned(), allowed: takes });
            }
        }
        let need = |value, key, example| self.need(raw.span().start, value, kind, key, example);
        let method = match kind {
            "ipmi" => FenceMethod::Ipmi {
                address: self.text(need(&f.address, "address", "address = \"192.0.2.21\" (the BMC)")?, "address")?,
                username: self.text(need(&f.username, "username", "username = \"havirt\"")?, "username")?,
                password_file: self.abs_path(
                    need(&f.password_file, "password_file", "password_file = \"/etc/havirt/fence/HOST.pw\"")?,
                    "password_file",
                )?,
                cipher: u8::try_from(self.int(
                    f.cipher.as_ref(),
                    "cipher",
                    i64::from(DEFAULT_IPMI_CIPHER),
                    0,
                    IPMI_CIPHER_MAX,
                    "",
                )?)
                .unwrap_or(DEFAULT_IPMI_CIPHER),
            },
            "command" => FenceMethod::Command {
                agent: self.agent(need(&f.agent, "agent", "agent = \"fence_ipmilan\"")?)?,
                options: self.fence_options(f.options.as_ref())?,
                password_file: match &f.password_file {
                    Some(p) => Some(self.abs_path(p, "password_file")?),
                    None => None,
                },
            },
            "libvirt" => FenceMethod::Libvirt {
                uri: self.text(need(&f.uri, "uri", "uri = \"qemu+ssh://root@192.0.2.1/system\"")?, "uri")?,
                domain: self.text(need(&f.domain, "domain", "domain = \"lab-h1\" (the host's own VM)")?, "domain")?,
            },
            _ => FenceMethod::Storage,
        };
        let name = match &f.name {
            Some(n) => self.label(n, "name", "fence entry name", LABEL_RULE)?,
            None => kind.to_owned(),
        };
        Ok(FenceConfig { name, method })
    }

    /// A key the fence kind requires; reported at the entry's header.
    fn need<'r>(
        &self,
        header: usize,
        value: &'r Option<Spanned<String>>,
        kind: &str,
        key: &str,
        example: &'static str,
    ) -> Res<&'r Spanned<String>> {
        match value {
            Some(v) => Ok(v),
            None => {
                let problem = ConfigProblem::RequiredForKind { kind: kind.to_owned(), example };
                Err(self.invalid(self.at(header, key), problem))
            }
        }
    }

    /// A fence-agents program: a bare name looked up in PATH, or a full path.
    fn agent(&self, v: &Spanned<String>) -> Res<String> {
        let s = v.get_ref();
        let bare =
            !s.is_empty() && s.len() <= 64 && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b));
        let path = s.starts_with('/') && !s.chars().any(|c| c.is_whitespace() || c.is_control());
        if !(bare || path) {
            let rule = "a program name such as \"fence_ipmilan\" or its absolute path, without arguments (arguments go in options)";
            return self.err_at(
                v.span(),
                "agent",
                ConfigProblem::BadName { value: s.clone(), what: "fence agent", rule },
            );
        }
        Ok(s.clone())
    }

    /// `options`: key=value lines for the agent's stdin, so neither side may
    /// hold a line break; passwords come from `password_file` only.
    fn fence_options(&self, raw: Option<&Spanned<BTreeMap<String, Spanned<String>>>>) -> Res<BTreeMap<String, String>> {
        let mut out = BTreeMap::new();
        let Some(raw) = raw else { return Ok(out) };
        for (key, value) in raw.get_ref() {
            let dotted = format!("options.{key}");
            if is_password_key(key) {
                return self.err_at(value.span(), &dotted, ConfigProblem::PlaintextPassword);
            }
            if key == "action" {
                return self.err_at(value.span(), &dotted, ConfigProblem::ReservedOption { key: key.clone() });
            }
            if key.is_empty() || !key.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-') {
                let rule = "letters, digits, '_' and '-' (a fence-agents stdin option name)";
                let problem = ConfigProblem::BadName { value: key.clone(), what: "option name", rule };
                return self.err_at(value.span(), &dotted, problem);
            }
            out.insert(key.clone(), self.text(value, &dotted)?);
        }
        Ok(out)
    }

    /// One host's `bridge_map` or `network_map`: valid names on both sides,
    /// at most NET_MAP_MAX entries, and no local name twice (it could not be
    /// mapped back). Problems are reported at the value, as `map.key`.
    fn net_map(&self, raw: Option<&Spanned<RawNetMap>>, kind: NetKind) -> Res<BTreeMap<String, String>> {
        let mut out = BTreeMap::new();
        let Some(raw) = raw else { return Ok(out) };
        let map_key = kind.map_key();
        if raw.get_ref().len() > NET_MAP_MAX {
            let problem = ConfigProblem::TooMany { count: raw.get_ref().len(), what: "entries", max: NET_MAP_MAX };
            return self.err_at(raw.span(), map_key, problem);
        }
        // In file order, so that the later of two entries is reported.
        let mut entries: Vec<(&String, &Spanned<String>)> = raw.get_ref().iter().collect();
        entries.sort_by_key(|(_, v)| v.span().start);
        let mut locals: BTreeMap<&str, &str> = BTreeMap::new();
        for (cluster, local) in entries {
            let dotted = format!("{map_key}.{cluster}");
            self.net_name(cluster, local.span(), &dotted, kind)?;
            self.net_name(local.get_ref(), local.span(), &dotted, kind)?;
            if let Some(first) = locals.insert(local.get_ref(), cluster) {
                let problem = ConfigProblem::DuplicateLocalName { local: local.get_ref().clone(), first: first.into() };
                return self.err_at(local.span(), &dotted, problem);
            }
            out.insert(cluster.clone(), local.get_ref().clone());
        }
        Ok(out)
    }

    /// A bridge is a Linux interface name (1 to 15 bytes, no '/', ':' or
    /// white space, not "." or ".."); a libvirt network name has no '/'.
    fn net_name(&self, name: &str, span: Range<usize>, key: &str, kind: NetKind) -> Res<()> {
        let (max, forbidden, what, rule) = match kind {
            NetKind::Bridge => (BRIDGE_NAME_MAX_BYTES, "/:", "bridge name", BRIDGE_RULE),
            NetKind::Network => (NETWORK_NAME_MAX_BYTES, "/", "libvirt network name", NETWORK_RULE),
        };
        let ok = (1..=max).contains(&name.len())
            && name != "."
            && name != ".."
            && !name.chars().any(|c| c.is_whitespace() || c.is_control() || forbidden.contains(c));
        if ok {
            return Ok(());
        }
        self.err_at(span, key, ConfigProblem::BadName { value: name.to_owned(), what, rule })
    }

    /// Names, ids and addresses must be unique across hosts; the later of
    /// two is the one reported.
    fn check_unique(&self, raws: &[Spanned<RawHost>], hosts: &[HostConfig]) -> Res<()> {
        let mut names: BTreeMap<&str, &str> = BTreeMap::new();
        let mut ids: BTreeMap<HostId, &str> = BTreeMap::new();
        let mut addresses: BTreeMap<IpAddr, &str> = BTreeMap::new();
        for (raw, host) in raws.iter().zip(hosts) {
            let r = raw.get_ref();
            if let Some(other) = names.insert(&host.name, &host.name) {
                let fix = "give every host its own name";
                let problem =
                    ConfigProblem::AlreadyUsed { value: format!("\"{}\"", host.name), host: other.into(), fix };
                return self.err_at(r.name.span(), "name", problem);
            }
            if let Some(other) = ids.insert(host.id, &host.name) {
                let fix = "give every host a unique id from 1 to 255";
                let problem = ConfigProblem::AlreadyUsed { value: host.id.0.to_string(), host: other.into(), fix };
                return self.err_at(r.id.span(), "id", problem);
            }
            for (addr, span) in host.addresses.iter().zip(r.addresses.get_ref().iter().map(Spanned::span)) {
                if let Some(other) = addresses.insert(*addr, &host.name) {
                    let fix = "every address must belong to one host only";
                    let problem = ConfigProblem::AlreadyUsed { value: addr.to_string(), host: other.into(), fix };
                    return Err(self.invalid(self.at(span.start, "addresses"), problem));
                }
            }
        }
        Ok(())
    }

    /// Every `[[alert]]`, with a warning for each webhook signed with the
    /// cluster key.
    fn alerts(&self, raws: &[Spanned<RawAlert>], warnings: &mut Vec<ConfigWarning>) -> Res<Vec<AlertConfig>> {
        if raws.len() > ALERTS_MAX {
            let problem = ConfigProblem::TooMany { count: raws.len(), what: "[[alert]] tables", max: ALERTS_MAX };
            return Err(self.invalid(self.at(raws[ALERTS_MAX].span().start, "alert"), problem));
        }
        let mut out: Vec<AlertConfig> = Vec::with_capacity(raws.len());
        for (i, raw) in raws.iter().enumerate() {
            let alert = self.alert(raw, i + 1)?;
            if out.iter().any(|a| a.name == alert.name) {
                let r = raw.get_ref();
                let (span, key) = r.name.as_ref().map_or((r.kind.span(), "kind"), |n| (n.span(), "name"));
                return self.err_at(span, key, ConfigProblem::DuplicateAlertName { name: alert.name });
            }
            if matches!(alert.target, AlertTarget::Webhook { secret_file: None, .. }) {
                let at = self.at_key(raw.get_ref().kind.span(), "secret_file");
                warnings.push(ConfigWarning::AlertClusterKey { at, name: alert.name.clone() });
            }
            out.push(alert);
        }
        Ok(out)
    }

    fn alert(&self, raw: &Spanned<RawAlert>, ordinal: usize) -> Res<AlertConfig> {
        let a = raw.get_ref();
        let kind = a.kind.get_ref().as_str();
        let (takes, timeout, attempts) = match kind {
            "webhook" => (
                "url, secret_file, name, timeout_ms, attempts, backoff_ms",
                DEFAULT_WEBHOOK_TIMEOUT_MS,
                DEFAULT_WEBHOOK_ATTEMPTS,
            ),
            "command" => (
                "command, name, timeout_ms, attempts, backoff_ms",
                DEFAULT_COMMAND_TIMEOUT_MS,
                DEFAULT_COMMAND_ATTEMPTS,
            ),
            _ => {
                let problem = ConfigProblem::NotOneOf { value: kind.to_owned(), allowed: "\"webhook\", \"command\"" };
                return self.err_at(a.kind.span(), "kind", problem);
            }
        };
        let other: [(&str, Option<Range<usize>>); 3] = [
            ("url", a.url.as_ref().map(Spanned::span)),
            ("secret_file", a.secret_file.as_ref().map(Spanned::span)),
            ("command", a.command.as_ref().map(Spanned::span)),
        ];
        for (key, span) in other {
            if let Some(span) = span
                && !takes.split(", ").any(|k| k == key)
            {
                return self.err_at(span, key, ConfigProblem::NotForKind { kind: kind.to_owned(), allowed: takes });
            }
        }
        let target = if kind == "webhook" {
            let example = "url = \"https://alerts.example.org/havirt\"";
            let url = self.alert_url(self.need(raw.span().start, &a.url, kind, "url", example)?)?;
            let secret_file = match &a.secret_file {
                Some(p) => Some(self.abs_path(p, "secret_file")?),
                None => None,
            };
            AlertTarget::Webhook { url, secret_file }
        } else {
            AlertTarget::Command { argv: self.alert_argv(raw, a.command.as_ref())? }
        };
        let name = match &a.name {
            Some(n) => self.label(n, "name", "alert name", LABEL_RULE)?,
            None => format!("{kind}-{ordinal}"),
        };
        let timeout_ms = self.int(a.timeout_ms.as_ref(), "timeout_ms", 0, 1, ALERT_TIMEOUT_MAX_MS, " ms")?;
        let tries = self.int(a.attempts.as_ref(), "attempts", i64::from(attempts), 1, ALERT_ATTEMPTS_MAX, "")?;
        let backoff_ms = self.int(a.backoff_ms.as_ref(), "backoff_ms", 0, 1, ALERT_BACKOFF_MAX_MS, " ms")?;
        Ok(AlertConfig {
            name,
            target,
            timeout_ms: if a.timeout_ms.is_some() { timeout_ms.unsigned_abs() } else { timeout },
            attempts: u32::try_from(tries).unwrap_or(attempts),
            backoff_ms: if a.backoff_ms.is_some() { backoff_ms.unsigned_abs() } else { DEFAULT_ALERT_BACKOFF_MS },
        })
    }

    /// An http:// or https:// URL with a host, on one line.
    fn alert_url(&self, v: &Spanned<String>) -> Res<String> {
        let s = v.get_ref();
        let parsed = s.parse::<ureq::http::Uri>().ok();
        let ok = s.len() <= ALERT_URL_MAX_BYTES
            && !s.chars().any(|c| c.is_control() || c.is_whitespace())
            && parsed.as_ref().is_some_and(|u| {
                matches!(u.scheme_str(), Some("http" | "https")) && u.host().is_some_and(|h| !h.is_empty())
            });
        if !ok {
            let rule = "an http:// or https:// URL with a host, such as \"https://alerts.example.org/havirt\" (at most 2048 characters, no spaces)";
            return self.err_at(
                v.span(),
                "url",
                ConfigProblem::BadName { value: s.clone(), what: "webhook URL", rule },
            );
        }
        Ok(s.clone())
    }

    /// `command = ["program", "arg", ...]`: a program name or absolute
    /// path, then its arguments, each on one line.
    fn alert_argv(&self, raw: &Spanned<RawAlert>, v: Option<&Spanned<Vec<Spanned<String>>>>) -> Res<Vec<String>> {
        let example = "command = [\"/usr/local/bin/havirt-mail\", \"ops@example.org\"] (the alert JSON comes on stdin)";
        let Some(v) = v else {
            let problem = ConfigProblem::RequiredForKind { kind: "command".into(), example };
            return Err(self.invalid(self.at(raw.span().start, "command"), problem));
        };
        let words = v.get_ref();
        if words.is_empty() {
            return self.err_at(v.span(), "command", ConfigProblem::EmptyList { what: "word (the program)" });
        }
        if words.len() > ALERT_ARGV_MAX {
            let problem = ConfigProblem::TooMany { count: words.len(), what: "words", max: ALERT_ARGV_MAX };
            return self.err_at(v.span(), "command", problem);
        }
        let program = &words[0];
        let p = program.get_ref();
        let bare = !p.is_empty() && p.bytes().all(|b| b.is_ascii_alphanumeric() || b"_.-+".contains(&b));
        let path = p.starts_with('/') && !p.chars().any(|c| c.is_whitespace() || c.is_control());
        if !(bare || path) {
            let rule = "a program name such as \"havirt-mail\" or its absolute path, alone in the first word (arguments go in the next words)";
            let problem = ConfigProblem::BadName { value: p.clone(), what: "program", rule };
            return Err(self.invalid(self.at(program.span().start, "command"), problem));
        }
        let mut out = Vec::with_capacity(words.len());
        for w in words {
            let s = w.get_ref();
            if s.len() > 4096 || s.chars().any(char::is_control) {
                let rule = "at most 4096 characters, no line breaks or control characters";
                let problem = ConfigProblem::BadName { value: s.clone(), what: "command word", rule };
                return Err(self.invalid(self.at(w.span().start, "command"), problem));
            }
            out.push(s.clone());
        }
        Ok(out)
    }

    fn warnings(&self, raws: &[Spanned<RawHost>], hosts: &[HostConfig]) -> Vec<ConfigWarning> {
        let mut out = Vec::new();
        let expected = hosts.first().map_or(0, |h| h.addresses.len());
        for (raw, host) in raws.iter().zip(hosts) {
            let confirms = host.fence.iter().any(|f| f.method.confirms_power_off());
            if !host.watchdog.resets_host() && !confirms {
                let at = self.at_key(raw.get_ref().watchdog.span(), "watchdog");
                out.push(ConfigWarning::NoAutomaticTakeover { at, host: host.name.clone() });
            }
            if host.addresses.len() != expected {
                let at = self.at_key(raw.get_ref().addresses.span(), "addresses");
                let count = host.addresses.len();
                out.push(ConfigWarning::RingMismatch { at, host: host.name.clone(), count, expected });
            }
        }
        out
    }

    // ------------------------------------------------------------ scalar checks

    fn int(
        &self,
        v: Option<&Spanned<i64>>,
        key: &str,
        default: i64,
        min: i64,
        max: i64,
        unit: &'static str,
    ) -> Res<i64> {
        let Some(v) = v else { return Ok(default) };
        let value = *v.get_ref();
        if !(min..=max).contains(&value) {
            return self.err_at(v.span(), key, ConfigProblem::OutOfRange { value, min, max, unit });
        }
        Ok(value)
    }

    fn float(&self, v: Option<&Spanned<f64>>, key: &str, default: f64, min: f64, max: f64) -> Res<f64> {
        let Some(v) = v else { return Ok(default) };
        let value = *v.get_ref();
        if !(min..=max).contains(&value) {
            return self.err_at(v.span(), key, ConfigProblem::OutOfRangeFloat { value, min, max });
        }
        Ok(value)
    }

    fn ip_list(&self, list: &Spanned<Vec<Spanned<String>>>, key: &str, min: usize, max: usize) -> Res<Vec<IpAddr>> {
        let items = list.get_ref();
        if items.len() < min {
            return self.err_at(list.span(), key, ConfigProblem::EmptyList { what: "IP address" });
        }
        if items.len() > max {
            return self.err_at(
                list.span(),
                key,
                ConfigProblem::TooMany { count: items.len(), what: "addresses", max },
            );
        }
        let mut out = Vec::with_capacity(items.len());
        for item in items {
            match item.get_ref().parse::<IpAddr>() {
                Ok(ip) => out.push(ip),
                Err(_) => {
                    let problem = ConfigProblem::BadAddress { value: item.get_ref().clone() };
                    return Err(self.invalid(self.at(item.span().start, key), problem));
                }
            }
        }
        Ok(out)
    }

    fn label(&self, v: &Spanned<String>, key: &str, what: &'static str, rule: &'static str) -> Res<String> {
        let s = v.get_ref();
        let ok = (1..=64).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
        if !ok {
            return self.err_at(v.span(), key, ConfigProblem::BadName { value: s.clone(), what, rule });
        }
        Ok(s.clone())
    }

    /// Free text on one line (addresses, user names, URIs, option values).
    fn text(&self, v: &Spanned<String>, key: &str) -> Res<String> {
        let s = v.get_ref();
        if s.is_empty() || s.len() > 255 || s.chars().any(char::is_control) {
            return self.err_at(
                v.span(),
                key,
                ConfigProblem::BadName { value: s.clone(), what: "value", rule: TEXT_RULE },
            );
        }
        Ok(s.clone())
    }

    fn abs_path(&self, v: &Spanned<String>, key: &str) -> Res<PathBuf> {
        let s = v.get_ref();
        if !s.starts_with('/') || s.chars().any(char::is_control) {
            return self.err_at(v.span(), key, ConfigProblem::NotAbsolute { value: s.clone() });
        }
        Ok(PathBuf::from(s))
    }

    // ------------------------------------------------------------ locations

    /// The location of byte `offset`, reported for `key`.
    fn at(&self, offset: usize, key: &str) -> Location {
        let offset = char_floor(self.text, offset);
        let line_begin = line_start(self.text, offset);
        let line = self.text[..line_begin].matches('\n').count() + 1;
        let column = self.text[line_begin..offset].chars().count() + 1;
        Location { file: self.file.clone(), line, column, table: table_context(self.text, offset), key: key.to_owned() }
    }

    /// The location of the key that holds the value at `span`, if it is on
    /// the value's line; else of the value itself.
    fn at_key(&self, span: Range<usize>, key: &str) -> Location {
        match key_before(self.text, span.start) {
            Some(k) if k.name == key || key.starts_with(&format!("{}.", k.name)) => self.at(k.start, key),
            _ => self.at(span.start, key),
        }
    }

    fn syntax_error(&self, e: &toml::de::Error) -> ConfigError {
        let offset = e.span().map_or(0, |s| s.start);
        let detail = one_line(e.message());
        if detail == "duplicate key" {
            let span = e.span().unwrap_or(0..0);
            let key = self.text.get(span).unwrap_or("").trim_matches(|c| c == '"' || c == '\'').to_owned();
            return self.invalid(self.at(offset, &key), ConfigProblem::DuplicateKey);
        }
        let key = match key_before(self.text, offset) {
            Some(k) => k.name,
            None => header_name(line_at(self.text, offset)).unwrap_or_default(),
        };
        // A number beyond 64 bits fails in the parser, but is no syntax error.
        let problem = if detail.starts_with("invalid type") {
            ConfigProblem::BadValue { detail: detail.replace(", expected any valid TOML value", "") }
        } else {
            ConfigProblem::Syntax { detail }
        };
        self.invalid(self.at(offset, &key), problem)
    }

    /// Type, unknown-key and missing-key errors from serde.
    fn serde_error(&self, e: &toml::de::Error) -> ConfigError {
        let offset = e.span().map_or(0, |s| s.start);
        let msg = one_line(e.message());
        if let Some(key) = between(&msg, "unknown field `", "`") {
            let problem = if is_password_key(key) {
                ConfigProblem::PlaintextPassword
            } else {
                let allowed = msg.split_once(", expected ").map_or("the keys shown in config/havirt.toml", |(_, a)| a);
                ConfigProblem::UnknownKey { allowed: allowed.to_owned() }
            };
            return self.invalid(self.at(offset, key), problem);
        }
        if let Some(key) = between(&msg, "missing field `", "`") {
            let mut at = self.at(offset, key);
            if e.span().is_none_or(|s| s.is_empty()) {
                at.table.clear(); // the top level: its span is empty
            }
            return self.invalid(at, ConfigProblem::Missing { example: missing_example(key) });
        }
        // Point at the key when the value follows it directly, else (an
        // element of an array) at the value.
        let at = match key_before(self.text, offset) {
            Some(k) if self.text.get(k.eq + 1..offset).is_some_and(|gap| gap.trim().is_empty()) => {
                self.at(k.start, &k.name)
            }
            Some(k) => self.at(offset, &k.name),
            None => self.at(offset, ""),
        };
        let problem = if msg.starts_with("invalid type") {
            ConfigProblem::WrongType { expected: expected_phrase(&msg), detail: msg }
        } else {
            ConfigProblem::BadValue { detail: msg }
        };
        self.invalid(at, problem)
    }
}

fn profile_name(p: Profile) -> &'static str {
    match p {
        Profile::Fast => "fast",
        Profile::Default => "default",
        Profile::Conservative => "conservative",
    }
}

fn is_password_key(key: &str) -> bool {
    matches!(key, "password" | "passwd" | "pass")
}

fn missing_example(key: &str) -> String {
    match key {
        "cluster" => "a [cluster] table with name, key_file and [cluster.datastore]".into(),
        "key_file" => "key_file = \"/etc/havirt/cluster.key\"".into(),
        "name" => "name = \"...\"".into(),
        "id" => "id = N (1 to 255, unique)".into(),
        "addresses" => "addresses = [\"192.0.2.11\"] (one per ring)".into(),
        "watchdog" => "watchdog = \"device\" (or \"systemd\", \"lab\", \"none\")".into(),
        "kind" => "kind = \"...\" (see config/havirt.toml for the kinds)".into(),
        other => format!("{other} = ..."),
    }
}

/// Turn serde's "expected i64" into advice an operator can follow.
fn expected_phrase(msg: &str) -> String {
    let expected = msg.rsplit_once("expected ").map_or("", |(_, e)| e);
    let phrase = match expected {
        "i64" | "u64" | "u32" | "u16" | "u8" | "an integer" => "a whole number without quotes, e.g. 3",
        "f64" | "a float" => "a number without quotes, e.g. 1.5",
        "a string" => "a quoted string, e.g. \"text\"",
        "a sequence" => "an array, e.g. [\"192.0.2.11\"] (and [[host]] for hosts)",
        "a boolean" => "true or false",
        e if e == "a map" || e.starts_with("struct") => "a table",
        e => return format!("{e} instead"),
    };
    phrase.to_owned()
}

fn one_line(s: &str) -> String {
    s.trim().replace('\n', "; ")
}

fn between<'a>(s: &'a str, open: &str, close: &str) -> Option<&'a str> {
    let rest = s.split_once(open)?.1;
    Some(rest.split_once(close)?.0)
}

fn char_floor(s: &str, offset: usize) -> usize {
    let mut o = offset.min(s.len());
    while !s.is_char_boundary(o) {
        o -= 1;
    }
    o
}

fn line_start(s: &str, offset: usize) -> usize {
    s[..offset].rfind('\n').map_or(0, |i| i + 1)
}

/// The whole line that holds `offset`.
fn line_at(s: &str, offset: usize) -> &str {
    let offset = char_floor(s, offset);
    let begin = line_start(s, offset);
    let end = s[offset..].find('\n').map_or(s.len(), |i| offset + i);
    &s[begin..end]
}

/// `[name]` or `[[name]]` → (name, is_array), comments and spaces removed.
fn parse_header(line: &str) -> Option<(String, bool)> {
    let t = line.trim();
    if !t.starts_with('[') {
        return None;
    }
    let array = t.starts_with("[[");
    let close = if array { "]]" } else { "]" };
    let inner = &t[if array { 2 } else { 1 }..];
    let end = inner.find(close)?;
    let name: String = inner[..end].chars().filter(|c| !c.is_whitespace() && *c != '"' && *c != '\'').collect();
    Some((name, array))
}

/// The name inside a header-like line, even an unclosed one.
fn header_name(line: &str) -> Option<String> {
    let t = line.trim();
    if !t.starts_with('[') {
        return None;
    }
    Some(t.trim_matches(|c| c == '[' || c == ']').trim().to_owned())
}

/// The table that encloses `offset`, named for people: `[cluster]`,
/// `[[host]] #2`, `[[host]] #2 [[host.fence]] #1`. Counts headers line by
/// line; tables written inline are attributed to their parent.
fn table_context(s: &str, offset: usize) -> String {
    let mut current = String::new();
    let (mut host_n, mut fence_n, mut alert_n) = (0usize, 0usize, 0usize);
    let mut begin = 0usize;
    for line in s.split_inclusive('\n') {
        if begin > offset {
            break;
        }
        begin += line.len();
        let Some((name, array)) = parse_header(line) else { continue };
        current = match (name.as_str(), array) {
            ("host", true) => {
                host_n += 1;
                fence_n = 0;
                format!("[[host]] #{host_n}")
            }
            ("host.fence", true) => {
                fence_n += 1;
                format!("[[host]] #{host_n} [[host.fence]] #{fence_n}")
            }
            ("alert", true) => {
                alert_n += 1;
                format!("[[alert]] #{alert_n}")
            }
            (n, true) => format!("[[{n}]]"),
            (n, false) if n.starts_with("host.") && host_n > 0 => format!("[[host]] #{host_n} [{n}]"),
            (n, false) => format!("[{n}]"),
        };
    }
    current
}

/// The nearest `key =` before `offset`: on its line, else on earlier lines
/// of the same table (a multi-line array). The name is without quotes.
fn key_before(s: &str, offset: usize) -> Option<KeyRef> {
    let mut end = char_floor(s, offset);
    for _ in 0..KEY_LOOKBACK_LINES {
        let begin = line_start(s, end);
        // A line that starts with `[` is a table header (or an unclosed one).
        if line_at(s, begin).trim_start().starts_with('[') {
            return None;
        }
        let prefix = &s[begin..end];
        if let Some(eq) = last_assignment(prefix) {
            let (start, name) = key_token(s, begin, begin + eq)?;
            return Some(KeyRef { start, eq: begin + eq, name });
        }
        if begin == 0 {
            return None;
        }
        end = begin - 1;
    }
    None
}

/// A `key =` found in the text: where the key starts, where its `=` is.
struct KeyRef {
    start: usize,
    eq: usize,
    name: String,
}

/// Byte index of the last `=` outside strings and comments in `line`.
fn last_assignment(line: &str) -> Option<usize> {
    let mut quote: Option<char> = None;
    let mut escaped = false;
    let mut last = None;
    for (i, c) in line.char_indices() {
        match quote {
            Some(q) => {
                if escaped {
                    escaped = false;
                } else if c == '\\' && q == '"' {
                    escaped = true;
                } else if c == q {
                    quote = None;
                }
            }
            None => match c {
                '"' | '\'' => quote = Some(c),
                '#' => break,
                '=' => last = Some(i),
                _ => {}
            },
        }
    }
    last
}

/// The key written just before the `=` at `eq`.
fn key_token(s: &str, line_begin: usize, eq: usize) -> Option<(usize, String)> {
    let before = s[line_begin..eq].trim_end();
    let is_key = |c: char| c.is_ascii_alphanumeric() || "_-.\"'".contains(c);
    let start = before.char_indices().rev().take_while(|(_, c)| is_key(*c)).last().map(|(i, _)| i)?;
    let name = before[start..].trim_matches(|c| c == '"' || c == '\'').to_owned();
    (!name.is_empty()).then_some((line_begin + start, name))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
[cluster]
name = "lab"
key_file = "/etc/havirt/cluster.key"
datastore = { kind = "dir", path = "/mnt/nfs/.havirt/lab" }

[[host]]
name = "h1.example.com"
id = 1
addresses = ["192.0.2.11"]
watchdog = "device"

[[host.fence]]
kind = "storage"

[[host]]
name = "h2"
id = 2
addresses = ["192.0.2.12"]
watchdog = { kind = "lab", lab_socket = "/run/lab/h2.sock" }
"#;

    #[test]
    fn every_timing_key_maps_to_an_engine_field() {
        let raw: RawTimings = toml::from_str("").expect("empty timings table");
        let mut t = Profile::Default.timings();
        for (key, _) in raw.entries() {
            assert!(timing_mut(&mut t, key).is_some(), "{key}");
        }
    }

    #[test]
    fn minimal_config_gives_defaults_and_spec() {
        let (config, warnings) = Config::parse("/x.toml", MINIMAL).expect("minimal config loads");
        assert!(warnings.is_empty(), "{warnings:?}");
        assert_eq!(config.cluster.profile, Profile::Default);
        assert_eq!(config.cluster.timings, Profile::Default.timings());
        assert_eq!(config.cluster.net_port, DEFAULT_NET_PORT);
        assert_eq!(config.hosts[0].watchdog, Watchdog::Device { device: DEFAULT_WATCHDOG_DEVICE.into() });
        assert_eq!(config.hosts[1].watchdog, Watchdog::Lab { socket: "/run/lab/h2.sock".into() });
        let spec = config.cluster_spec();
        assert_eq!(spec.hosts[0].fence_agents, vec!["storage".to_owned()]);
        assert_eq!(spec.hosts[1].max_concurrent_starts, DEFAULT_MAX_CONCURRENT_STARTS);
        assert!(spec.hosts.iter().all(|h| h.watchdog && h.memory_mib == 0 && h.vcpus == 0));
    }

    #[test]
    fn local_host_matches_exact_then_short_name() {
        let (config, _) = Config::parse("/x.toml", MINIMAL).expect("minimal config loads");
        assert_eq!(config.local_host("h2").map(|h| h.id), Ok(HostId(2)));
        assert_eq!(config.local_host("h1").map(|h| h.id), Ok(HostId(1)));
        assert_eq!(config.local_host("h2.example.com").map(|h| h.id), Ok(HostId(2)));
        let err = config.local_host("h9").expect_err("unknown host").to_string();
        assert!(err.contains("/x.toml") && err.contains("h1.example.com, h2") && err.contains("--host"), "{err}");
    }

    #[test]
    fn context_names_the_table_and_ordinal() {
        let s = "a = 1\n[cluster]\nb = 2\n[[host]]\nc = 3\n[[host]]\n[[host.fence]]\nd = 4\n";
        assert_eq!(table_context(s, 0), "");
        assert_eq!(table_context(s, s.find("b =").unwrap_or(0)), "[cluster]");
        assert_eq!(table_context(s, s.find("c =").unwrap_or(0)), "[[host]] #1");
        assert_eq!(table_context(s, s.find("d =").unwrap_or(0)), "[[host]] #2 [[host.fence]] #1");
    }

    #[test]
    fn key_before_finds_inline_and_multiline_keys() {
        let s = "x = { kind = \"a=b\", device = 5 }\naddresses = [\n  \"1\",\n  2,\n]\n";
        assert_eq!(key_before(s, s.find('5').unwrap_or(0)).map(|k| k.name), Some("device".into()));
        assert_eq!(key_before(s, s.find("2,").unwrap_or(0)).map(|k| k.name), Some("addresses".into()));
        assert!(key_before("[[host]]\n", 3).is_none());
    }
}
