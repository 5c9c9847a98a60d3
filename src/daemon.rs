//! `havirt daemon`: the tokio runtime that drives the engine with real time
//! and executes its actions on real adapters (DESIGN.md §7).
//!
//! One task owns the `Node` and runs the loop: take whatever happened (a
//! worker's result, a network heartbeat, a libvirt event, an operator
//! request, the registry of protected domains), feed it to the engine with
//! the monotonic time, call `handle_timeout` when due, then execute every
//! action. Nothing in the loop blocks: storage, libvirt and fence calls run
//! on tokio's blocking pool, and their results come back as inputs. A call
//! that hangs (a dead NFS server, a hung libvirtd) only occupies its worker
//! thread; the engine times it out by itself and the loop goes on, so S4's
//! self-fence and the watchdog's silence happen on time.
//!
//! The daemon decides nothing; where it must choose (how to run a start,
//! what a libvirt error means) the choice is written next to the code.

mod http;
pub(crate) mod instance;
pub(crate) mod registry;

use crate::config::{Config, ConfigError, Datastore, HostConfig, Watchdog as WatchdogConfig};
use crate::control::{self, Counters, EventRecord, PolicyChanges, Request, Response, StatusReport};
use crate::engine::admission::{Admission, Change};
use crate::engine::config::{ClusterSpec, DomainId, DomainPolicy, HostId, Readiness};
use crate::engine::io::{
    Action, AgentPing, BootId, CasOutcome, DomainEvent, Event, FenceOutcome, Input, Lease, LeaseKey, LeaseReason,
    OperatorCommand, Owner, StartFailure, StopNotice, StorageError,
};
use crate::engine::node::{LocalState, Node, NodeConfig};
use crate::engine::time::{Duration, Instant};
use crate::failover::Failovers;
use crate::fence::watchdog::{self, Watchdog};
use crate::fence::{self, AgentEnv, Fencers};
use crate::hypervisor::metadata::render_policy;
use crate::hypervisor::netmap::NetMap;
use crate::hypervisor::{DomainInfo, Hypervisor, HypervisorError, HypervisorEvent, LibvirtHypervisor, LibvirtOptions};
use crate::hypervisor::{parse_uuid, uuid_string};
use crate::metrics::{Metrics, StorageOp};
use crate::net::udp::{Bound, Identity, Transport};
use crate::net::wire::{ClusterId as WireClusterId, ClusterKey};
use crate::store::inventory;
use crate::store::record::PoisonRequest;
use crate::store::{Store, StoreError};
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use tokio::sync::{mpsc, oneshot};
use tracing::{error, info, warn};

/// How often the registry of protected domains is re-read.
pub const REGISTRY_POLL: std::time::Duration = std::time::Duration::from_secs(2);
/// Events kept for `havirt events`.
pub const EVENTS_KEPT: usize = 10_000;
/// libvirt calls (start, destroy, shutdown, list, agent ping) running at
/// once; more wait. Killing qemu directly is never gated: it is S4's last
/// resort when libvirt calls hang.
pub const MAX_LIBVIRT_CALLS: usize = 16;
/// How long the daemon waits for libvirtd at start before giving up (systemd
/// restarts it).
pub const LIBVIRT_CONNECT_WAIT: std::time::Duration = std::time::Duration::from_secs(30);
/// Pause between reconnection attempts after libvirtd went away.
pub const LIBVIRT_RECONNECT_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);
/// How often the daemon tells systemd what it is doing (STATUS=).
pub const STATUS_NOTIFY_INTERVAL: Duration = Duration::from_secs(5);
/// How often the alerts look at the engine's view even when nothing else
/// made them look (a storage loss shows no event until renew_timeout).
pub const ALERT_CHECK_INTERVAL: Duration = Duration::from_millis(250);

/// How to run one daemon.
#[derive(Clone, Debug)]
pub struct DaemonOptions {
    pub config: PathBuf,
    /// The `[[host]]` to be; default: this machine's host name.
    pub host: Option<String>,
    pub libvirt_uri: String,
    pub socket: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("datastore: {0}")]
    Store(#[from] StoreError),
    #[error(
        "libvirt at {uri} is not reachable after {waited_s} s: {source}; is libvirtd running (systemctl status libvirtd)?"
    )]
    Libvirt {
        uri: String,
        waited_s: u64,
        #[source]
        source: HypervisorError,
    },
    #[error("network: {0}")]
    Net(#[from] crate::net::udp::UdpError),
    #[error("control socket: {0}")]
    Control(#[from] control::ControlError),
    #[error("watchdog {device}: {reason}; fix the [[host]] watchdog setting or the device")]
    Watchdog { device: String, reason: String },
    #[error(
        "this boot ({boot:x}) was fenced by host {by}: the datastore's fenced record says it was powered off, yet it runs. \
         The fence did not cut its power (check that fence agent and BMC), or this machine's boot id is not unique. \
         Its protected domains may run elsewhere now: reboot this host; havirt refuses to run in this boot"
    )]
    FencedBoot { boot: BootId, by: HostId },
    #[error("[[alert]] \"{name}\": secret_file: {source}")]
    AlertSecret {
        name: String,
        #[source]
        source: ConfigError,
    },
    #[error(transparent)]
    Instance(#[from] instance::InstanceError),
    #[error(
        "{why}: the stop notice could not be written to the datastore within io_timeout, and no watchdog resets this \
         host once the daemon is gone (watchdog = \"systemd\" ends with the unit, or the device never opened) while {running} protected domain(s) run here: exiting as a \
         failure, so that the unit's FailureAction=reboot-immediate resets the host before peers may take their leases \
         (DESIGN.md §3). Check the datastore path (havirt check)"
    )]
    StopUnguarded { why: &'static str, running: usize },
    #[error("{what}: {source}")]
    Io {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
}

/// Runs the daemon until SIGTERM or SIGINT.
pub fn run(opts: DaemonOptions) -> Result<(), DaemonError> {
    let (config, warnings) = Config::load(&opts.config)?;
    for w in &warnings {
        warn!("{w}");
    }
    let host_name = match &opts.host {
        Some(h) => h.clone(),
        None => crate::config::machine_hostname()?,
    };
    let me = config.local_host(&host_name)?.clone();
    let key = crate::config::check_key_file(&config.cluster.key_file)?;
    // Before the first datastore I/O: see daemon::instance.
    instance::Instance::of(&config, &me).lock()?;
    let store = Arc::new(open_datastore(&config, me.id)?);
    check_watchdog_present(&me.watchdog)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|source| DaemonError::Io { what: "starting the tokio runtime", source })?;
    runtime.block_on(async move {
        let mut daemon = Daemon::start(opts, config, me, key, store).await?;
        daemon.run().await
    })
}

/// Opens the datastore, bounded by io_timeout: a datastore that is not
/// initialized is an error, one that does not answer is opened anyway, so
/// that the engine starts and self-fences what runs here (S4).
fn open_datastore(config: &Config, me: HostId) -> Result<Store, DaemonError> {
    let (tx, rx) = std::sync::mpsc::channel();
    let (ds, name) = (config.cluster.datastore.clone(), config.cluster.name.clone());
    std::thread::spawn(move || {
        let _ = tx.send(Store::open(&ds, &name, me));
    });
    match rx.recv_timeout(std_duration(config.cluster.timings.io_timeout)) {
        Ok(r) => Ok(r?),
        Err(_) => {
            warn!(
                "datastore {} does not answer; starting anyway (S4 self-fences what runs here)",
                datastore_name(config)
            );
            Ok(Store::open_unchecked(&config.cluster.datastore, &config.cluster.name, me)?)
        }
    }
}

pub(crate) fn datastore_name(config: &Config) -> String {
    match &config.cluster.datastore {
        Datastore::Dir { path } => path.display().to_string(),
        Datastore::Block { device } => device.display().to_string(),
    }
}

/// Refuse to start when the configured watchdog cannot exist. The device is
/// not opened here: opening arms (and pets) it, which the daemon may do only
/// once S4 holds (see `Daemon::pet`).
fn check_watchdog_present(w: &WatchdogConfig) -> Result<(), DaemonError> {
    use std::os::unix::fs::FileTypeExt;
    match w {
        WatchdogConfig::Device { device } => match std::fs::metadata(device) {
            Ok(m) if m.file_type().is_char_device() => Ok(()),
            Ok(_) => Err(DaemonError::Watchdog {
                device: device.display().to_string(),
                reason: "not a character device".into(),
            }),
            Err(e) => Err(DaemonError::Watchdog {
                device: device.display().to_string(),
                reason: format!("{e} (load a watchdog driver, e.g. modprobe softdog)"),
            }),
        },
        _ => Ok(()),
    }
}

// ---------------------------------------------------------------- pieces

/// The engine's clock: milliseconds since the daemon started, monotonic.
struct Clock {
    start: tokio::time::Instant,
}

impl Clock {
    fn now(&self) -> Instant {
        self.at(tokio::time::Instant::now())
    }

    fn at(&self, t: tokio::time::Instant) -> Instant {
        Instant(u64::try_from(t.saturating_duration_since(self.start).as_millis()).unwrap_or(u64::MAX))
    }

    fn deadline(&self, at: Instant) -> tokio::time::Instant {
        self.start + std::time::Duration::from_millis(at.0)
    }
}

/// Everything that reaches the loop besides network messages and operator
/// requests.
enum Internal {
    Engine(Input),
    Hypervisor(HypervisorEvent),
    /// libvirt came back after its connection closed: re-list.
    Reconnected,
    Listed(Vec<DomainInfo>),
    /// The registry as read when `epoch` was current; the read was issued
    /// at `issued` (every successful read is sent: the engine needs its age).
    Registry {
        epoch: u64,
        entries: BTreeMap<DomainId, registry::Entry>,
        issued: tokio::time::Instant,
    },
    Protected {
        result: Result<(DomainId, registry::Entry, String), String>,
        reply: oneshot::Sender<Response>,
    },
    Unprotected {
        result: Result<(DomainId, String), String>,
        reply: oneshot::Sender<Response>,
    },
    /// A destroy or kill finished: `stopped` when qemu is gone.
    Destroyed {
        domain: DomainId,
        stopped: bool,
    },
    /// A worker failed to run something that has no engine input.
    Problem(String),
    StorageFailure(StorageError),
}

type ControlMsg = (Request, oneshot::Sender<Response>);

/// The current libvirt connection; replaced when libvirtd comes back.
struct HvSlot(Mutex<Arc<LibvirtHypervisor>>);

impl HvSlot {
    fn get(&self) -> Arc<LibvirtHypervisor> {
        Arc::clone(&self.0.lock().unwrap_or_else(PoisonError::into_inner))
    }

    fn set(&self, hv: LibvirtHypervisor) {
        *self.0.lock().unwrap_or_else(PoisonError::into_inner) = Arc::new(hv);
    }
}

/// Shared by the loop and its workers.
struct Shared {
    me: HostId,
    hosts: Vec<HostId>,
    store: Arc<Store>,
    hv: HvSlot,
    libvirt_uri: String,
    fencers: Fencers,
    fence_timeout: std::time::Duration,
    isolation_addresses: Vec<std::net::IpAddr>,
    /// This host's bridge and network names (`hypervisor::netmap`).
    net_map: NetMap,
    /// Boots seen in slots, for aiming poison requests.
    boots: Mutex<BTreeMap<HostId, BootId>>,
    libvirt_gate: tokio::sync::Semaphore,
    /// Bumped by every protect and unprotect: a registry read that began
    /// before one is stale and ignored.
    registry_epoch: AtomicU64,
    /// One isolation probe at a time (each may wait a second per address).
    probing: AtomicBool,
    /// Storage latency and fence attempts are counted by the workers.
    metrics: Metrics,
    tx: mpsc::UnboundedSender<Internal>,
}

impl Shared {
    fn send(&self, msg: Internal) {
        // The loop is gone only while the daemon exits.
        let _ = self.tx.send(msg);
    }

    fn engine(&self, input: Input) {
        self.send(Internal::Engine(input));
    }

    /// Runs one storage call, its latency counted under `op`.
    fn timed<T>(&self, op: StorageOp, call: impl FnOnce() -> T) -> T {
        let start = tokio::time::Instant::now();
        let result = call();
        self.metrics.storage_io(op, start.elapsed());
        result
    }
}

struct Daemon {
    node: Node,
    clock: Clock,
    config: Config,
    host_name: String,
    owner: Owner,
    shared: Arc<Shared>,
    net: Arc<Transport>,
    net_rx: mpsc::Receiver<crate::net::udp::Delivery>,
    rx: mpsc::UnboundedReceiver<Internal>,
    control_rx: mpsc::Receiver<ControlMsg>,
    spec: ClusterSpec,
    protected: BTreeMap<DomainId, registry::Entry>,
    /// Destroys and kills in flight: their Stopped comes from the call's
    /// result, not from libvirt's event (which may never come).
    destroying: BTreeSet<DomainId>,
    watchdog_config: WatchdogConfig,
    watchdog: Option<Box<dyn Watchdog>>,
    watchdog_error_logged: bool,
    /// systemd's service watchdog is on (WatchdogSec): ping it with every pet.
    systemd_watchdog: bool,
    /// The engine's answer to `Input::Stop`: whether the notice was written.
    stopped: Option<bool>,
    events: VecDeque<EventRecord>,
    event_seq: u64,
    counters: Counters,
    /// Failover timelines (`havirt events --failovers`), fed from the engine's view.
    failovers: Failovers,
    /// Reads from `http` (metrics, the read-only API), answered by the loop.
    http_rx: mpsc::Receiver<http::Query>,
    next_status_notify: Instant,
    /// A protect or unprotect is running (one at a time).
    registry_busy: bool,
    /// Alerts (`crate::alerts`): what raises them and what sends them.
    alerts: crate::alerts::Observer,
    alert_sinks: crate::alerts::deliver::Dispatcher,
    next_alert_check: Instant,
}

impl Daemon {
    async fn start(
        opts: DaemonOptions,
        config: Config,
        me: HostConfig,
        key: Vec<u8>,
        store: Arc<Store>,
    ) -> Result<Daemon, DaemonError> {
        let clock = Clock { start: tokio::time::Instant::now() };
        let boot = boot_id();
        let incarnation = random_u64();
        let owner = Owner { host: me.id, boot };
        info!(host = %me.name, id = me.id.0, boot = format!("{boot:x}"), "havirt daemon starting");

        let hv = connect_libvirt(&opts.libvirt_uri).await?;
        let (tx, rx) = mpsc::unbounded_channel();
        let env = AgentEnv::default();
        let shared = Arc::new(Shared {
            me: me.id,
            hosts: config.hosts.iter().map(|h| h.id).collect(),
            store: Arc::clone(&store),
            hv: HvSlot(Mutex::new(Arc::new(hv))),
            libvirt_uri: opts.libvirt_uri.clone(),
            fencers: Fencers::from_config(&config, &env),
            fence_timeout: std_duration(config.cluster.timings.fence_timeout),
            isolation_addresses: config.cluster.isolation_addresses.clone(),
            net_map: me.net_map.clone(),
            boots: Mutex::new(BTreeMap::new()),
            libvirt_gate: tokio::sync::Semaphore::new(MAX_LIBVIRT_CALLS),
            registry_epoch: AtomicU64::new(0),
            probing: AtomicBool::new(false),
            metrics: Metrics::new(),
            tx,
        });

        // The protected domains, then what runs here: the engine adopts
        // each protected one by reading its lease (S5 for those not ours).
        let running = {
            let hv = shared.hv.get();
            tokio::task::spawn_blocking(move || hv.list())
                .await
                .map_err(|e| DaemonError::Io { what: "listing domains", source: std::io::Error::other(e) })?
                .map_err(|source| DaemonError::Libvirt { uri: opts.libvirt_uri.clone(), waited_s: 0, source })?
        };
        // The registry, bounded like any storage call. A datastore that does
        // not answer must not keep the engine from starting: it is what
        // self-fences the domains running here (S4). Until the registry
        // reads, the running domains with a havirt policy count as protected.
        let io_wait = std_duration(config.cluster.timings.io_timeout);
        let read = {
            let store = Arc::clone(&store);
            tokio::time::timeout(
                io_wait,
                tokio::task::spawn_blocking(move || read_registry_cached(&store, &RegistryCache::new())),
            )
        };
        let protected = match read.await {
            Ok(Ok(Ok(entries))) => entries.into_iter().map(|(d, (_, e))| (d, e)).collect(),
            failed => {
                let why = match failed {
                    Ok(Ok(Err(e))) => e.to_string(),
                    Ok(Err(e)) => e.to_string(),
                    _ => format!("no answer within {}", config.cluster.timings.io_timeout),
                };
                warn!(
                    "cannot read the protected domains from the datastore ({why}); using libvirt's metadata meanwhile"
                );
                protected_from_metadata(&running)
            }
        };

        refuse_fenced_boot(&store, me.id, boot, io_wait).await?;
        let maintenance = maintenance_before(&store, me.id, io_wait).await;

        let mut spec = config.cluster_spec();
        let (memory_mib, vcpus) = host_size();
        if let Some(h) = spec.hosts.iter_mut().find(|h| h.id == me.id) {
            h.memory_mib = memory_mib;
            h.vcpus = vcpus;
        }
        spec.domains = protected.iter().map(|(d, e)| (*d, e.spec.clone())).collect();
        for (d, e) in &protected {
            if let Some(p) = &e.problem {
                warn!(domain = %e.spec.name, uuid = %uuid_string(*d), "stored definition: {p}");
            }
        }

        // Network: one socket per ring on our addresses.
        let port = config.cluster.net_port;
        let local: Vec<SocketAddr> = me.addresses.iter().map(|ip| SocketAddr::new(*ip, port)).collect();
        let peers: BTreeMap<HostId, Vec<SocketAddr>> = config
            .hosts
            .iter()
            .filter(|h| h.id != me.id)
            .map(|h| (h.id, h.addresses.iter().map(|ip| SocketAddr::new(*ip, port)).collect()))
            .collect();
        let identity = Identity {
            key: ClusterKey::new(&key),
            // One cluster id for storage records and packets.
            cluster: WireClusterId(crate::store::record::ClusterId::from_name(&config.cluster.name).0),
            host: me.id,
            boot,
            nonce: random_u64(),
        };
        let (net, net_rx) = Bound::bind(&local).await?.start(identity, peers)?;

        let alert_sinks = start_alert_sinks(&config, &key, &shared.metrics)?;
        let listener = control::bind(&opts.socket)?;
        let (control_tx, control_rx) = mpsc::channel(64);
        tokio::spawn(control::serve(listener, control_tx));
        let http_rx = serve_http(config.cluster.metrics_address).await;
        tokio::spawn(keep_inventory(Arc::clone(&shared), config.cluster.name.clone(), me.name.clone()));

        let node_cfg = NodeConfig {
            host: me.id,
            boot,
            incarnation,
            spec: Arc::new(spec.clone()),
            rng_seed: random_u64(),
            maintenance,
            #[cfg(test)]
            broken_skip_s3: false,
        };
        let now = clock.now();
        let mut node = Node::new(node_cfg, now);
        let here: Vec<DomainId> =
            running.iter().filter(|i| i.state.has_qemu() && protected.contains_key(&i.id)).map(|i| i.id).collect();
        info!("{} protected domain(s), {} of them running here", protected.len(), here.len());
        node.handle_input(now, Input::DomainsAtStart(here));
        for i in running.iter().filter(|i| i.autostart && protected.contains_key(&i.id)) {
            // A protected domain must start only where havirt starts it (S5).
            let (hv, id) = (shared.hv.get(), i.id);
            tokio::task::spawn_blocking(move || hv.set_autostart(id, false));
        }

        spawn_event_thread(Arc::clone(&shared));
        spawn_registry_poller(Arc::clone(&shared));
        let systemd_watchdog = std::env::var_os("WATCHDOG_USEC").is_some();
        let _ = sd_notify::notify(&[sd_notify::NotifyState::Ready]);
        Ok(Daemon {
            node,
            clock,
            host_name: me.name.clone(),
            owner,
            shared,
            net: Arc::new(net),
            net_rx,
            rx,
            control_rx,
            spec,
            protected,
            destroying: BTreeSet::new(),
            watchdog_config: me.watchdog.clone(),
            watchdog: None,
            watchdog_error_logged: false,
            systemd_watchdog,
            stopped: None,
            events: VecDeque::new(),
            event_seq: 0,
            counters: Counters::default(),
            failovers: Failovers::new(me.id),
            http_rx,
            next_status_notify: now,
            registry_busy: false,
            alerts: crate::alerts::Observer::new(
                &config.cluster.name,
                me.id,
                incarnation,
                config.cluster.timings.storage_silent_after,
            ),
            alert_sinks,
            next_alert_check: now,
            config,
        })
    }

    async fn run(&mut self) -> Result<(), DaemonError> {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate()).map_err(|source| DaemonError::Io { what: "SIGTERM", source })?;
        let mut int = signal(SignalKind::interrupt()).map_err(|source| DaemonError::Io { what: "SIGINT", source })?;
        loop {
            let deadline = self.clock.deadline(self.node.poll_timeout());
            tokio::select! {
                Some(msg) = self.rx.recv() => self.internal(msg),
                Some((_, msg)) = self.net_rx.recv() => {
                    let now = self.clock.now();
                    self.node.handle_input(now, Input::Net(msg));
                }
                Some((req, reply)) = self.control_rx.recv() => self.control(req, reply),
                Some(query) = self.http_rx.recv() => match query {
                    http::Query::Metrics(reply) => {
                        let _ = reply.send(self.render_metrics());
                    }
                    // The control socket's own handler: one source for
                    // `havirt status --json` and /api/v1/status.
                    http::Query::Api(read, reply) => self.control(read.into(), reply),
                },
                _ = tokio::time::sleep_until(deadline) => {}
                _ = term.recv() => return self.stop("SIGTERM").await,
                _ = int.recv() => return self.stop("SIGINT").await,
            }
            let now = self.clock.now();
            if now >= self.node.poll_timeout() {
                self.node.handle_timeout(now);
            }
            self.execute_actions().await;
            if now >= self.next_alert_check {
                let view = self.node.view(now);
                self.raise_alerts(now, &view);
            }
            if now >= self.next_status_notify {
                self.next_status_notify = now + STATUS_NOTIFY_INTERVAL;
                let status = self.status_line();
                let _ = sd_notify::notify(&[sd_notify::NotifyState::Status(&status)]);
            }
        }
    }

    /// A clean stop. Protected domains keep running, so the watchdog stays
    /// armed: a restart (upgrade) pets it again in time; a stop with
    /// domains running ends in a reset, as S4 demands of a host that no
    /// longer renews its heartbeat (the others would restart its domains).
    async fn stop(&mut self, why: &'static str) -> Result<(), DaemonError> {
        let host_reset = self.watchdog.as_ref().is_some_and(|w| w.outlives_daemon());
        let written = self.write_stop_notice(host_reset).await;
        let running = self.node.local_domains().len();
        // Peers may take leases by S3(b) from a host whose config has a
        // watchdog (the device may also have failed to open).
        let peers_rely_on_reset = !matches!(self.watchdog_config, WatchdogConfig::None);
        if !written && !host_reset && running > 0 && peers_rely_on_reset {
            return Err(DaemonError::StopUnguarded { why, running });
        }
        if running == 0 {
            if let Some(w) = self.watchdog.as_mut()
                && let Err(e) = w.disarm()
            {
                warn!("watchdog disarm: {e}");
            }
            info!("{why}: stopping; no protected domain runs here, watchdog disarmed");
        } else if self.watchdog.is_some() {
            warn!(
                "{why}: stopping with {running} protected domain(s) running here; the watchdog stays armed: \
                 start havirt again within {} or this host is reset (S4). To stop havirt on a host for good, \
                 unprotect or move its domains first",
                self.config.cluster.timings.watchdog_timeout
            );
        } else {
            warn!("{why}: stopping with {running} protected domain(s) running here and no watchdog armed");
        }
        Ok(())
    }

    /// The last slot write of this incarnation (engine stop.rs): a grace
    /// of watchdog_timeout, so that a restart or an upgrade is not fenced,
    /// and whether this host's watchdog outlives the daemon. Bounded by the
    /// engine's io_timeout (plus a second, should the engine never answer).
    async fn write_stop_notice(&mut self, host_reset: bool) -> bool {
        let t = self.config.cluster.timings;
        let notice = StopNotice { grace_ms: t.watchdog_timeout.as_millis(), host_reset };
        self.node.handle_input(self.clock.now(), Input::Stop(notice));
        self.execute_actions().await;
        let give_up =
            tokio::time::Instant::now() + std_duration(t.io_timeout + t.io_timeout) + std::time::Duration::from_secs(1);
        while self.stopped.is_none() {
            let deadline = self.clock.deadline(self.node.poll_timeout()).min(give_up);
            tokio::select! {
                Some(msg) = self.rx.recv() => self.internal(msg),
                _ = tokio::time::sleep_until(deadline) => {}
            }
            if tokio::time::Instant::now() >= give_up {
                warn!("stop notice: no answer from the engine; exiting without it");
                return false;
            }
            let now = self.clock.now();
            if now >= self.node.poll_timeout() {
                self.node.handle_timeout(now);
            }
            self.execute_actions().await;
        }
        self.stopped == Some(true)
    }

    fn status_line(&self) -> String {
        let v = self.node.view(self.clock.now());
        let alive = v.hosts.iter().filter(|h| h.verdict == "alive" || h.verdict == "self").count();
        format!(
            "{}; {alive}/{} hosts alive; {} domain(s) here; {}",
            if v.is_master { "master" } else { "member" },
            v.hosts.len(),
            self.node.local_domains().len(),
            v.self_fence
        )
    }

    // ------------------------------------------------------------ inputs

    fn internal(&mut self, msg: Internal) {
        let now = self.clock.now();
        match msg {
            Internal::Engine(input) => {
                // Results the failover timelines follow; a storage read
                // brings the slots, so where each domain now runs.
                match &input {
                    Input::Fence { op, outcome, .. } => self.failovers.fence_done(now, unix_ms(), *op, *outcome),
                    Input::LeaseCas { op, result, .. } => {
                        self.failovers.cas_done(now, unix_ms(), *op, result.as_ref().ok());
                    }
                    _ => {}
                }
                let read = matches!(input, Input::StorageRead { .. });
                self.node.handle_input(now, input);
                if read {
                    self.observe(now);
                }
            }
            Internal::Hypervisor(ev) => self.hypervisor_event(now, ev),
            Internal::Reconnected => {
                info!("libvirt connection is back; re-listing domains");
                self.relist();
            }
            Internal::Listed(list) => self.reconcile(now, &list),
            Internal::Registry { epoch, entries, issued } => {
                if epoch == self.shared.registry_epoch.load(Ordering::SeqCst) {
                    let issued = self.clock.at(issued);
                    self.registry_changed(now, entries, Some(issued));
                }
            }
            Internal::Destroyed { domain, stopped } => {
                if stopped {
                    self.destroying.remove(&domain);
                    self.node.handle_input(now, Input::Domain { domain, event: DomainEvent::Stopped });
                }
            }
            Internal::Protected { result, reply } => {
                self.registry_busy = false;
                self.shared.registry_epoch.fetch_add(1, Ordering::SeqCst);
                let response = match result {
                    Ok((id, entry, message)) => {
                        let mut entries = self.protected.clone();
                        entries.insert(id, entry);
                        self.registry_changed(now, entries, None);
                        self.node.handle_input(now, Input::DomainsAtStart(vec![id]));
                        info!("{message}");
                        Response::Done(message)
                    }
                    Err(e) => Response::Error(e),
                };
                let _ = reply.send(response);
            }
            Internal::Unprotected { result, reply } => {
                self.registry_busy = false;
                self.shared.registry_epoch.fetch_add(1, Ordering::SeqCst);
                let response = match result {
                    Ok((id, message)) => {
                        let mut entries = self.protected.clone();
                        entries.remove(&id);
                        self.registry_changed(now, entries, None);
                        info!("{message}");
                        Response::Done(message)
                    }
                    Err(e) => Response::Error(e),
                };
                let _ = reply.send(response);
            }
            Internal::Problem(text) => warn!("{text}"),
            Internal::StorageFailure(e) => match e {
                StorageError::Io => self.counters.storage_errors += 1,
                StorageError::Timeout => self.counters.storage_timeouts += 1,
            },
        }
    }

    /// The registry as read (`issued`: when the read was issued) or as this
    /// daemon just wrote it (None: its age is that of the last read).
    fn registry_changed(
        &mut self,
        now: Instant,
        entries: BTreeMap<DomainId, registry::Entry>,
        issued: Option<Instant>,
    ) {
        let read_issued = issued.unwrap_or(Instant(0));
        if entries == self.protected {
            if issued.is_some() {
                let domains = self.spec.domains.clone();
                self.node.handle_input(now, Input::ProtectedDomains { domains, read_issued });
            }
            return;
        }
        for (d, e) in &entries {
            if self.protected.get(d) != Some(e)
                && let Some(p) = &e.problem
            {
                warn!(domain = %e.spec.name, uuid = %uuid_string(*d), "stored definition: {p}");
            }
        }
        self.protected = entries;
        self.spec.domains = self.protected.iter().map(|(d, e)| (*d, e.spec.clone())).collect();
        self.node.handle_input(now, Input::ProtectedDomains { domains: self.spec.domains.clone(), read_issued });
    }

    fn hypervisor_event(&mut self, now: Instant, ev: HypervisorEvent) {
        match ev {
            HypervisorEvent::Domain { domain, event } => {
                let local = self.node.local_domains().contains_key(&domain);
                match event {
                    DomainEvent::Started if !local && self.protected.contains_key(&domain) => {
                        // Started behind havirt's back (virsh start): adopt
                        // it, which destroys it unless its lease is ours (S5).
                        warn!(domain = %self.domain_name(domain), "protected domain started outside havirt; checking its lease");
                        self.node.handle_input(now, Input::DomainsAtStart(vec![domain]));
                    }
                    DomainEvent::Stopped | DomainEvent::Crashed | DomainEvent::ShutDown | DomainEvent::Destroyed
                        if self.destroying.contains(&domain) => {}
                    _ if local => self.node.handle_input(now, Input::Domain { domain, event }),
                    _ => {}
                }
            }
            HypervisorEvent::Defined { domain } => {
                // DESIGN.md §4: the lease owner keeps the stored definition
                // current, so a survivor defines what ran here.
                if self.protected.contains_key(&domain) && self.node.local_domains().contains_key(&domain) {
                    let shared = Arc::clone(&self.shared);
                    tokio::task::spawn_blocking(move || {
                        let hv = shared.hv.get();
                        let r =
                            hv.xml(domain).map_err(|e| e.to_string()).and_then(|xml| store_xml(&shared, domain, &xml));
                        if let Err(e) = r {
                            shared.send(Internal::Problem(format!(
                                "domain {} was redefined but its stored definition was not updated: {e}",
                                uuid_string(domain)
                            )));
                        }
                    });
                }
            }
            HypervisorEvent::Incoming { domain } => {
                if self.protected.contains_key(&domain) {
                    info!(domain = %self.domain_name(domain), "protected domain arrived by live migration (paused)");
                    self.node.handle_input(now, Input::Incoming { domain });
                }
            }
            HypervisorEvent::Undefined { domain } => {
                if self.protected.contains_key(&domain) {
                    warn!(domain = %self.domain_name(domain), "protected domain undefined here; its stored definition stays (havirt unprotect to drop it)");
                }
            }
            HypervisorEvent::ConnectionClosed { reason } => {
                warn!("libvirt connection closed ({reason:?}); reconnecting");
            }
            HypervisorEvent::Lagged { dropped } => {
                warn!("{dropped} libvirt event(s) dropped; re-listing domains");
                self.relist();
            }
        }
    }

    fn relist(&self) {
        let shared = Arc::clone(&self.shared);
        tokio::spawn(async move {
            let Ok(_permit) = shared.libvirt_gate.acquire().await else { return };
            let hv = shared.hv.get();
            match tokio::task::spawn_blocking(move || hv.list()).await {
                Ok(Ok(list)) => shared.send(Internal::Listed(list)),
                Ok(Err(e)) => shared.send(Internal::Problem(format!("listing domains: {e}"))),
                Err(e) => shared.send(Internal::Problem(format!("listing domains: {e}"))),
            }
        });
    }

    /// After missed events: a local domain whose qemu is gone crashed; a
    /// protected domain running here that the engine does not know is
    /// adopted (and destroyed unless its lease is ours).
    fn reconcile(&mut self, now: Instant, list: &[DomainInfo]) {
        let running: BTreeSet<DomainId> = list.iter().filter(|i| i.state.has_qemu()).map(|i| i.id).collect();
        let gone: Vec<DomainId> = self
            .node
            .local_domains()
            .iter()
            .filter(|(d, l)| {
                matches!(l.state, LocalState::Running | LocalState::Ready)
                    && !running.contains(d)
                    && !self.destroying.contains(d)
            })
            .map(|(d, _)| *d)
            .collect();
        for d in gone {
            self.node.handle_input(now, Input::Domain { domain: d, event: DomainEvent::Crashed });
        }
        let unknown: Vec<DomainId> = running
            .iter()
            .filter(|d| self.protected.contains_key(d) && !self.node.local_domains().contains_key(d))
            .copied()
            .collect();
        if !unknown.is_empty() {
            self.node.handle_input(now, Input::DomainsAtStart(unknown));
        }
    }

    fn domain_name(&self, d: DomainId) -> String {
        self.protected.get(&d).map_or_else(|| uuid_string(d), |e| e.spec.name.clone())
    }

    // ------------------------------------------------------------ control

    fn control(&mut self, req: Request, reply: oneshot::Sender<Response>) {
        let now = self.clock.now();
        match req {
            Request::Status => {
                let net = self.net.counters();
                let mut counters = self.counters;
                counters.packets_accepted = net.accepted;
                counters.packets_rejected = net.drops.total();
                counters.records_rejected = self.shared.store.rejects().total();
                let report = StatusReport {
                    cluster: self.config.cluster.name.clone(),
                    host_name: self.host_name.clone(),
                    uptime_ms: now.0,
                    view: self.node.view(now),
                    counters,
                };
                let _ = reply.send(Response::Status(Box::new(report)));
            }
            Request::Events { after } => {
                let list = self.events.iter().filter(|e| e.seq > after).cloned().collect();
                let _ = reply.send(Response::Events(list));
            }
            Request::Failovers => {
                let _ = reply.send(Response::Failovers(self.failovers.records()));
            }
            Request::FenceConfirm { host } => {
                let response = match self.config.hosts.iter().find(|h| h.name == host) {
                    None => Response::Error(format!(
                        "no host named {host:?} in {}; known: {}",
                        self.config.path.display(),
                        self.config.hosts.iter().map(|h| h.name.as_str()).collect::<Vec<_>>().join(", ")
                    )),
                    Some(h) if h.id == self.shared.me => {
                        Response::Error(format!("{host} is this host: confirm a host's power-off from another host"))
                    }
                    Some(h) => {
                        warn!(host = %host, "operator confirmed that {host} is powered off");
                        self.node.handle_input(now, Input::Operator(OperatorCommand::FenceConfirm(h.id)));
                        Response::Done(format!(
                            "recorded: {host} is powered off (operator). The master takes over its leases; \
                             follow with havirt events"
                        ))
                    }
                };
                let _ = reply.send(response);
            }
            Request::Maintenance { host, enter } => {
                let me = self.config.hosts.iter().find(|h| h.id == self.shared.me).map(|h| h.name.clone());
                let response = if me.as_deref() != Some(host.as_str()) {
                    Response::Error(format!(
                        "this daemon runs on {}, not {host:?}: run `havirt maintenance {} {host}` on {host}",
                        me.unwrap_or_default(),
                        if enter { "enter" } else { "exit" }
                    ))
                } else {
                    self.node.handle_input(now, Input::Operator(OperatorCommand::Maintenance(enter)));
                    Response::Done(if enter {
                        format!(
                            "{host} is in maintenance mode: it takes no restarts and migrates its protected domains away"
                        )
                    } else {
                        format!("{host} left maintenance mode: it takes restarts again")
                    })
                };
                let _ = reply.send(response);
            }
            Request::Protect { domain, changes } => {
                if self.registry_busy {
                    let _ = reply.send(Response::Error("another protect or unprotect is running; try again".into()));
                    return;
                }
                let max = crate::engine::planner::MAX_DOMAINS_PER_HOST as usize;
                if self.node.local_domains().len() >= max {
                    let _ = reply.send(Response::Error(format!(
                        "this host runs {max} protected domains already, the most one heartbeat slot can list; \
                         protect it on another host"
                    )));
                    return;
                }
                self.registry_busy = true;
                let shared = Arc::clone(&self.shared);
                let (owner, hosts) = (self.owner, self.config.hosts.clone());
                let protected = self.protected.keys().copied().collect();
                let admission = self.node.admission(now);
                tokio::spawn(async move {
                    let _permit = shared.libvirt_gate.acquire().await;
                    let s = Arc::clone(&shared);
                    let result = tokio::task::spawn_blocking(move || {
                        protect(&s, owner, &hosts, &protected, &admission, &domain, &changes)
                    })
                    .await
                    .unwrap_or_else(|e| Err(format!("protect failed: {e}")));
                    shared.send(Internal::Protected { result, reply });
                });
            }
            Request::Start { domain } => {
                let found =
                    self.protected.iter().find(|(d, e)| e.spec.name == domain || parse_uuid(&domain) == Some(**d));
                let response = match found {
                    None => Response::Error(format!("{domain:?} is not a protected domain (havirt status lists them)")),
                    Some((&id, entry)) => {
                        let a =
                            self.node.admission(now).assess(Change::Add { domain: &entry.spec, on: self.owner.host });
                        if a.refused {
                            Response::Error(format!(
                                "admission control (strict) refuses to start {} on {}: {}",
                                entry.spec.name,
                                self.host_name,
                                a.breach.unwrap_or_default()
                            ))
                        } else {
                            info!(domain = %entry.spec.name, "operator start");
                            self.node.handle_input(now, Input::Operator(OperatorCommand::Start(id)));
                            let mut text = format!(
                                "start of {} asked on {}: its lease is taken first (havirt events shows the outcome)",
                                entry.spec.name, self.host_name
                            );
                            if let Some(why) = a.breach {
                                text.push_str(&format!("\nwarning: admission control: {why}"));
                            }
                            Response::Done(text)
                        }
                    }
                };
                let _ = reply.send(response);
            }
            Request::Unprotect { domain } => {
                if self.registry_busy {
                    let _ = reply.send(Response::Error("another protect or unprotect is running; try again".into()));
                    return;
                }
                let found =
                    self.protected.iter().find(|(d, e)| e.spec.name == domain || parse_uuid(&domain) == Some(**d));
                let Some((&id, entry)) = found else {
                    let _ = reply.send(Response::Error(format!(
                        "{domain:?} is not a protected domain (havirt status lists them)"
                    )));
                    return;
                };
                self.registry_busy = true;
                let name = entry.spec.name.clone();
                let shared = Arc::clone(&self.shared);
                tokio::task::spawn_blocking(move || {
                    let result = shared
                        .store
                        .remove_domain_xml(id)
                        .map(|()| {
                            (id, format!("{name} is no longer protected: it keeps running, havirt will not restart it"))
                        })
                        .map_err(|e| format!("unprotect {name}: {e}"));
                    shared.send(Internal::Unprotected { result, reply });
                });
            }
        }
    }

    // ------------------------------------------------------------ actions

    async fn execute_actions(&mut self) {
        while let Some(action) = self.node.poll_action() {
            self.execute(action).await;
        }
    }

    async fn execute(&mut self, action: Action) {
        let shared = Arc::clone(&self.shared);
        match action {
            Action::Send { to, msg } => {
                let r = match to {
                    None => self.net.send(&msg).await,
                    Some(h) => self.net.send_to(h, &msg).await,
                };
                if let Err(e) = r {
                    warn!("heartbeat not sent: {e}");
                }
            }
            Action::WriteSlot { op, slot } => blocking(move || {
                let result = shared.timed(StorageOp::SlotWrite, || shared.store.write_slot(&slot));
                let result = result.map_err(|e| storage_failed(&shared, &e));
                shared.engine(Input::SlotWritten { op, result });
            }),
            Action::ReadStorage { op } => blocking(move || {
                let result =
                    shared.timed(StorageOp::StorageRead, || shared.store.read_snapshot(shared.me, &shared.hosts));
                if let Ok(snap) = &result {
                    let mut boots = shared.boots.lock().unwrap_or_else(PoisonError::into_inner);
                    boots.extend(snap.slots.iter().map(|(h, s)| (*h, s.boot)));
                }
                let result = result.map_err(|e| storage_failed(&shared, &e));
                shared.engine(Input::StorageRead { op, result });
            }),
            Action::ReadLease { op, key } => blocking(move || {
                let result = shared.timed(StorageOp::LeaseRead, || shared.store.read_lease(key));
                let result = result.map_err(|e| storage_failed(&shared, &e));
                shared.engine(Input::LeaseRead { op, key, result });
            }),
            Action::CasLease { op, key, expect_generation, new } => {
                // Not a renew, not a maintenance handoff (no failover).
                let moved = !matches!(new.reason, LeaseReason::Renewed | LeaseReason::Migrated);
                if matches!(key, LeaseKey::Domain(_)) && moved {
                    // The master moves a lease: know where the domain was.
                    self.observe(self.clock.now());
                    self.failovers.cas_sent(op, key, &new);
                }
                blocking(move || {
                    let cas = || shared.store.cas_lease(key, expect_generation, new);
                    let result = shared.timed(StorageOp::LeaseCas, cas).map_err(|e| storage_failed(&shared, &e));
                    shared.engine(Input::LeaseCas { op, key, result });
                });
            }
            Action::WriteFenced { op, record } => blocking(move || {
                let result = shared.timed(StorageOp::FencedWrite, || shared.store.write_fenced(&record));
                let result = result.map_err(|e| storage_failed(&shared, &e));
                shared.engine(Input::RecordWritten { op, result });
            }),
            Action::WriteAssignments { op, host, assignments } => blocking(move || {
                let write = || shared.store.write_assignments(host, &assignments);
                let result = shared.timed(StorageOp::AssignmentsWrite, write).map_err(|e| storage_failed(&shared, &e));
                shared.engine(Input::RecordWritten { op, result });
            }),
            Action::StartDomain { domain } => {
                self.destroying.remove(&domain);
                libvirt_call(shared, move |s| {
                    let event = start_domain(s, domain);
                    s.engine(Input::Domain { domain, event });
                });
            }
            Action::MigrateDomain { domain, to } => {
                let Some(target) = self.config.hosts.iter().find(|h| h.id == to) else {
                    let result = Err(format!("host {to} is not in the configuration"));
                    let now = self.clock.now();
                    self.node.handle_input(now, Input::Migrated { domain, result, running_here: true });
                    return;
                };
                let (dest, data) = (target.migration_uri.clone(), target.migration_data_uri());
                let unsafe_storage = self.config.cluster.allow_unsafe_migration;
                let target_map = target.net_map.clone();
                let name = self.domain_name(domain);
                info!(domain = %name, "live-migrating to {} ({dest}, data over {data})", target.name);
                libvirt_call(shared, move |s| {
                    let hv = s.hv.get();
                    let remap = Some((&s.net_map, &target_map));
                    let result = hv.migrate(domain, &dest, &data, unsafe_storage, remap).map_err(|e| e.to_string());
                    // On failure libvirt resumes it here, unless qemu died.
                    let running_here = result.is_err()
                        && hv.list().is_ok_and(|l| l.iter().any(|i| i.id == domain && i.state.has_qemu()));
                    s.engine(Input::Migrated { domain, result, running_here });
                });
            }
            Action::DestroyDomain { domain, kill } => {
                self.destroying.insert(domain);
                let name = self.domain_name(domain);
                let work = move |s: &Shared| {
                    let hv = s.hv.get();
                    let result = if kill { hv.kill_qemu(domain).map(|_| ()) } else { hv.destroy(domain) };
                    match result {
                        Ok(()) | Err(HypervisorError::NoSuchDomain(_)) => {
                            s.send(Internal::Destroyed { domain, stopped: true });
                        }
                        Err(e) => {
                            s.send(Internal::Problem(format!(
                                "{} of {name} failed: {e}",
                                if kill { "killing qemu" } else { "destroy" }
                            )));
                            s.send(Internal::Destroyed { domain, stopped: false });
                        }
                    }
                };
                if kill {
                    // Not gated: libvirt calls may all be hung (S4).
                    blocking(move || work(&shared));
                } else {
                    libvirt_call(shared, work);
                }
            }
            Action::ShutdownDomain { domain, timeout: _ } => {
                // The engine destroys after its own timeout; the Stopped
                // event ends it earlier.
                let name = self.domain_name(domain);
                libvirt_call(shared, move |s| match s.hv.get().shutdown(domain) {
                    Ok(()) => {}
                    Err(HypervisorError::NoSuchDomain(_)) => {
                        s.engine(Input::Domain { domain, event: DomainEvent::Stopped });
                    }
                    Err(e) => s.send(Internal::Problem(format!("shutdown of {name} failed: {e}"))),
                });
            }
            Action::Fence { op, target, agent } => {
                let now = self.clock.now();
                self.observe(now);
                self.failovers.fence_sent(now, unix_ms(), op, target, &agent);
                let name =
                    self.config.hosts.iter().find(|h| h.id == target).map_or(target.to_string(), |h| h.name.clone());
                blocking(move || {
                    let outcome = fence_host(&shared, target, &agent);
                    shared.metrics.fence_attempt(&name, &agent, outcome);
                    shared.engine(Input::Fence { op, target, outcome });
                });
            }
            Action::ProbeIsolation => {
                if shared.probing.swap(true, Ordering::SeqCst) {
                    return;
                }
                blocking(move || {
                    let reachable = shared.isolation_addresses.iter().any(ping);
                    shared.probing.store(false, Ordering::SeqCst);
                    shared.engine(Input::IsolationProbe { reachable });
                });
            }
            Action::ProbeReadiness { domain, readiness } => match readiness {
                Readiness::Started => {
                    let now = self.clock.now();
                    self.node.handle_input(now, Input::Domain { domain, event: DomainEvent::Ready });
                }
                Readiness::GuestAgent => libvirt_call(shared, move |s| {
                    if matches!(s.hv.get().ping_guest_agent(domain), Ok(true)) {
                        s.engine(Input::Domain { domain, event: DomainEvent::Ready });
                    }
                }),
                Readiness::TcpPort(port) => blocking(move || {
                    if tcp_ready(&shared, domain, port) {
                        shared.engine(Input::Domain { domain, event: DomainEvent::Ready });
                    }
                }),
            },
            Action::PingGuestAgent { domain } => libvirt_call(shared, move |s| {
                let result = match s.hv.get().ping_guest_agent(domain) {
                    Ok(true) => AgentPing::Answered,
                    Ok(false) => AgentPing::NoAnswer,
                    // libvirt itself failed: no verdict on the guest.
                    Err(_) => AgentPing::Unknown,
                };
                s.engine(Input::GuestAgent { domain, result });
            }),
            Action::ResetDomain { domain } => {
                let name = self.domain_name(domain);
                libvirt_call(shared, move |s| {
                    if let Err(e) = s.hv.get().reset(domain) {
                        s.send(Internal::Problem(format!("reset of {name} failed: {e}")));
                    }
                });
            }
            Action::PetWatchdog => self.pet(),
            Action::Stopped { written } => self.stopped = Some(written),
            Action::Emit(event) => {
                // Verdicts change and domains start as the engine says so:
                // the failover timelines look then.
                let at = event.at;
                self.log_event(event);
                self.observe(at);
            }
        }
    }

    /// The engine pets only while S4 holds. The watchdog is opened at the
    /// first pet, not at start: opening arms and pets it, and a daemon that
    /// restarts after losing storage must not put its own reset off.
    fn pet(&mut self) {
        if self.systemd_watchdog && !matches!(self.watchdog_config, WatchdogConfig::Systemd) {
            let _ = sd_notify::notify(&[sd_notify::NotifyState::Watchdog]);
        }
        if matches!(self.watchdog_config, WatchdogConfig::None) {
            return;
        }
        if self.watchdog.is_none() {
            match watchdog::open(&self.watchdog_config, std_duration(self.config.cluster.timings.watchdog_timeout)) {
                Ok(w) => {
                    info!("watchdog armed ({:?})", self.watchdog_config);
                    self.watchdog = Some(w);
                    self.watchdog_error_logged = false;
                }
                Err(e) => {
                    if !self.watchdog_error_logged {
                        error!("cannot open the watchdog ({:?}): {e}; retrying at every pet", self.watchdog_config);
                        self.watchdog_error_logged = true;
                    }
                    return;
                }
            }
        }
        if let Some(w) = self.watchdog.as_mut()
            && let Err(e) = w.pet()
        {
            error!("watchdog pet failed: {e}");
            self.watchdog = None;
        }
    }

    /// Shows the engine's view at `now` to the failover timelines, and logs
    /// the summary of every failover whose domains all run again.
    fn observe(&mut self, now: Instant) {
        let view = self.node.view(now);
        for text in self.failovers.observe(now, &view, &self.shared.metrics) {
            let event = Event { at: now, host: self.shared.me, role: "failover".into(), text };
            self.log_event(event);
        }
        self.raise_alerts(now, &view);
    }

    /// Hands the alerts this view raises to the receivers' queues (never
    /// waits: `alerts::deliver`). Nothing is looked at without receivers.
    fn raise_alerts(&mut self, now: Instant, view: &crate::engine::view::NodeView) {
        self.next_alert_check = now + ALERT_CHECK_INTERVAL;
        if self.alert_sinks.is_empty() {
            return;
        }
        let records = self.failovers.records();
        for alert in self.alerts.observe(now, unix_ms(), view, &records) {
            info!(role = "alert", id = %alert.id, kind = alert.kind.name(), "{}", alert.text);
            self.shared.metrics.alert_raised(alert.kind.name());
            self.alert_sinks.send(&alert);
        }
    }

    /// The Prometheus exposition, from what the daemon knows now.
    fn render_metrics(&self) -> String {
        let now = self.clock.now();
        let view = self.node.view(now);
        let snapshot = crate::metrics::Snapshot {
            view: &view,
            net: self.net.counters(),
            rejects: self.shared.store.rejects(),
            counters: self.counters,
            uptime_s: now.0 as f64 / 1000.0,
        };
        self.shared.metrics.render(&snapshot)
    }

    fn log_event(&mut self, event: Event) {
        info!(role = %event.role, "{}", event.text);
        self.event_seq += 1;
        self.events.push_back(EventRecord { seq: self.event_seq, unix_ms: unix_ms(), event });
        while self.events.len() > EVENTS_KEPT {
            self.events.pop_front();
        }
    }
}

/// One thread and queue per `[[alert]]`; a webhook signs with its
/// secret_file (checked as the cluster key is), else the cluster key.
fn start_alert_sinks(
    config: &Config,
    cluster_key: &[u8],
    metrics: &Metrics,
) -> Result<crate::alerts::deliver::Dispatcher, DaemonError> {
    use crate::alerts::deliver::{Dispatcher, Policy, Report, Sink, Target};
    use crate::config::AlertTarget;
    let mut sinks = Vec::with_capacity(config.alerts.len());
    for a in &config.alerts {
        let target = match &a.target {
            AlertTarget::Webhook { url, secret_file } => {
                let key = match secret_file {
                    Some(path) => crate::config::check_key_file(path)
                        .map_err(|source| DaemonError::AlertSecret { name: a.name.clone(), source })?,
                    None => cluster_key.to_vec(),
                };
                Target::Webhook { url: url.clone(), key }
            }
            AlertTarget::Command { argv } => Target::Command { argv: argv.clone() },
        };
        let policy = Policy {
            attempts: a.attempts,
            timeout: std::time::Duration::from_millis(a.timeout_ms),
            backoff: std::time::Duration::from_millis(a.backoff_ms),
        };
        info!("alerts to {} ({target:?}, {} tries of at most {} ms each)", a.name, a.attempts, a.timeout_ms);
        sinks.push(Sink { name: a.name.clone(), target, policy });
    }
    let metrics = metrics.clone();
    let report: Report = Arc::new(move |sink: &str, _id: &str, outcome| metrics.alert(sink, outcome.name()));
    Ok(Dispatcher::start(sinks, report))
}

/// Starts `http` (metrics, API, status page) on `address` (None: off). A
/// port that cannot be bound costs the metrics and the page, not the
/// daemon: HA goes on.
async fn serve_http(address: Option<SocketAddr>) -> mpsc::Receiver<http::Query> {
    let (tx, rx) = mpsc::channel(http::QUERIES_QUEUED);
    let Some(address) = address else {
        info!("metrics, API and status page off (metrics_address = \"off\")");
        return rx;
    };
    match tokio::net::TcpListener::bind(address).await {
        Ok(listener) => {
            info!("metrics on http://{address}/metrics, status page on http://{address}/ (read-only)");
            tokio::spawn(http::serve(listener, tx));
        }
        Err(e) => warn!(
            "metrics, API and status page off: cannot listen on {address} ({e}); set metrics_address to a free port or \"off\""
        ),
    }
    rx
}

// ---------------------------------------------------------------- workers

fn blocking(f: impl FnOnce() + Send + 'static) {
    tokio::task::spawn_blocking(f);
}

/// A libvirt call on the blocking pool, at most MAX_LIBVIRT_CALLS at once.
fn libvirt_call(shared: Arc<Shared>, f: impl FnOnce(&Shared) + Send + 'static) {
    tokio::spawn(async move {
        let Ok(_permit) = shared.libvirt_gate.acquire().await else { return };
        let s = Arc::clone(&shared);
        let _ = tokio::task::spawn_blocking(move || f(&s)).await;
    });
}

fn storage_failed(shared: &Shared, e: &StoreError) -> StorageError {
    let kind = e.storage_error();
    shared.send(Internal::StorageFailure(kind));
    kind
}

/// Define from the stored definition (the cluster's copy: what ran on the
/// dead host), keep autostart off, start. A domain already running counts
/// as started: the engine verified its lease first.
fn start_domain(s: &Shared, d: DomainId) -> DomainEvent {
    let hv = s.hv.get();
    // Arrived paused by a live migration whose lease is now ours: it is
    // already defined here; resuming it is its start.
    match hv.resume_if_paused(d) {
        Ok(true) => return DomainEvent::Started,
        Ok(false) => {}
        Err(e) => {
            // A paused copy that cannot run here: boot the domain afresh
            // instead (its memory state is lost, its disks are not).
            s.send(Internal::Problem(format!(
                "resuming {} failed ({e}); destroying the paused copy and booting it afresh",
                uuid_string(d)
            )));
            if let Err(e) = hv.destroy(d) {
                s.send(Internal::Problem(format!("destroying the paused copy of {}: {e}", uuid_string(d))));
                return DomainEvent::StartFailed { cause: start_failure(&e) };
            }
        }
    }
    match s.store.read_domain_xml(d) {
        Ok(Some(xml)) => {
            let defined = match s.net_map.to_local(&xml) {
                Ok(local) => hv.define(&local).map_err(|e| (start_failure(&e), e.to_string())),
                Err(e) => {
                    Err((StartFailure::Refused, format!("mapping its bridges and networks to this host's names: {e}")))
                }
            };
            if let Err((cause, e)) = defined {
                s.send(Internal::Problem(format!("defining {} from the datastore failed: {e}", uuid_string(d))));
                return DomainEvent::StartFailed { cause };
            }
        }
        Ok(None) => {}
        Err(e) => {
            s.send(Internal::Problem(format!("reading the definition of {}: {e}", uuid_string(d))));
            return DomainEvent::StartFailed { cause: StartFailure::Refused };
        }
    }
    if let Err(e) = hv.set_autostart(d, false) {
        s.send(Internal::Problem(format!("autostart off for {}: {e}", uuid_string(d))));
    }
    match hv.start(d) {
        Ok(()) | Err(HypervisorError::AlreadyRunning(_)) => DomainEvent::Started,
        Err(e) => {
            let text = e.to_string();
            // qemu's image locking: another qemu still holds the disks.
            let cause = if text.contains("Failed to get \"write\" lock") || text.contains("Is another process using") {
                StartFailure::DisksLocked
            } else {
                start_failure(&e)
            };
            s.send(Internal::Problem(format!("start of {} failed: {text}", uuid_string(d))));
            DomainEvent::StartFailed { cause }
        }
    }
}

/// A failure of libvirt's connection (libvirtd hung, restarting, its
/// keepalive timed out) says nothing of the domain, and the call may still
/// be carried out: `HypervisorDown`. Any other error is libvirt's refusal.
fn start_failure(e: &HypervisorError) -> StartFailure {
    if e.is_connection_failure() { StartFailure::HypervisorDown } else { StartFailure::Refused }
}

/// Stores this host's definition of `d` under the cluster's bridge and
/// network names (`hypervisor::netmap`): the datastore never holds one
/// host's local names, so the next host maps from the cluster names.
fn store_xml(s: &Shared, d: DomainId, xml: &str) -> Result<(), String> {
    let cluster = s.net_map.to_cluster(xml).map_err(|e| format!("mapping back to the cluster's names: {e}"))?;
    s.store.write_domain_xml(d, &cluster).map_err(|e| e.to_string())
}

/// Keeps this host's inventory (bridges, libvirt networks) on the
/// datastore for `havirt check` on the other hosts: now, then every
/// INVENTORY_INTERVAL_S. Informational only: a write that fails is logged,
/// and one still blocked (hung storage or libvirtd) is not doubled.
async fn keep_inventory(shared: Arc<Shared>, cluster: String, host: String) {
    let busy = Arc::new(AtomicBool::new(false));
    loop {
        if !busy.swap(true, Ordering::SeqCst) {
            let (s, b, cluster, host) = (Arc::clone(&shared), Arc::clone(&busy), cluster.clone(), host.clone());
            blocking(move || {
                if let Err(e) = write_inventory(&s, &cluster, &host) {
                    warn!(
                        "host inventory not written (havirt check on other hosts cannot see this host's networks): {e}"
                    );
                }
                b.store(false, Ordering::SeqCst);
            });
        }
        tokio::time::sleep(std::time::Duration::from_secs(inventory::INVENTORY_INTERVAL_S)).await;
    }
}

fn write_inventory(s: &Shared, cluster: &str, host: &str) -> Result<(), String> {
    let bridges = inventory::local_bridges(std::path::Path::new("/sys/class/net"))
        .map_err(|e| format!("listing /sys/class/net: {e}"))?;
    let networks = match s.hv.get().active_networks() {
        Ok(n) => Some(n),
        Err(e) => {
            warn!("host inventory: libvirt networks unknown: {e}");
            None
        }
    };
    let inv = inventory::Inventory {
        format: inventory::FORMAT,
        cluster: cluster.to_owned(),
        host: host.to_owned(),
        host_id: s.me.0,
        written_unix_ms: unix_ms(),
        bridges,
        networks,
    };
    s.store.write_inventory(s.me, &inv).map_err(|e| e.to_string())
}

/// One fence agent. The storage agent writes the poison request for the
/// target's current boot (as last read from its slot) itself.
fn fence_host(s: &Shared, target: HostId, agent: &str) -> FenceOutcome {
    let a = match s.fencers.agent(target, agent) {
        Ok(a) => a,
        Err(e) => {
            s.send(Internal::Problem(format!("fence {target} with {agent}: {e}")));
            return FenceOutcome::Failed;
        }
    };
    let result = a.off(s.fence_timeout);
    if matches!(result, Err(fence::FenceError::NotPowerAgent { .. })) {
        let boot = s.boots.lock().unwrap_or_else(PoisonError::into_inner).get(&target).copied();
        let Some(boot) = boot else {
            s.send(Internal::Problem(format!("poison for {target}: its boot is unknown (no slot read yet)")));
            return FenceOutcome::Failed;
        };
        if let Err(e) = s.store.write_poison(&PoisonRequest { target, boot, by: s.me }) {
            s.send(Internal::Problem(format!("poison for {target}: {e}")));
            return FenceOutcome::Failed;
        }
    } else if let Err(e) = &result {
        s.send(Internal::Problem(format!("fence {target} with {agent}: {e}")));
    }
    fence::outcome(&result)
}

/// One ICMP echo through the system's `ping` (no raw sockets in havirt).
fn ping(addr: &std::net::IpAddr) -> bool {
    std::process::Command::new("ping")
        .args(["-n", "-q", "-c", "1", "-W", "1", &addr.to_string()])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// `tcp:PORT` readiness: a TCP connect to the guest's addresses that
/// libvirt knows (DHCP lease or guest agent).
fn tcp_ready(s: &Shared, d: DomainId, port: u16) -> bool {
    let Ok(addrs) = s.hv.get().addresses(d) else { return false };
    addrs.iter().any(|ip| {
        std::net::TcpStream::connect_timeout(&SocketAddr::new(*ip, port), std::time::Duration::from_secs(1)).is_ok()
    })
}

/// `havirt protect` on the host that runs the domain: the lease first
/// (owned by us), then the policy, then the stored definition that makes
/// it protected. A registry entry therefore never appears with a free
/// lease the master could hand to another host.
fn protect(
    s: &Shared,
    owner: Owner,
    hosts: &[HostConfig],
    protected: &BTreeSet<DomainId>,
    admission: &Admission,
    domain: &str,
    changes: &PolicyChanges,
) -> Result<(DomainId, registry::Entry, String), String> {
    let hv = s.hv.get();
    let list = hv.list().map_err(|e| format!("listing domains: {e}"))?;
    let info = list.iter().find(|i| i.name == domain || parse_uuid(domain) == Some(i.id)).ok_or_else(|| {
        format!("no domain {domain:?} on this host (virsh list --all); protect it on the host that runs it")
    })?;
    let name = info.name.clone();
    if !info.persistent {
        return Err(format!(
            "{name} is transient: protect needs a persistent definition (virsh define) that other hosts can define"
        ));
    }
    if !info.state.has_qemu() {
        return Err(format!(
            "{name} is not running here: start it first (havirt restarts running domains where their host died)"
        ));
    }
    let current = match &info.policy {
        Ok(Some(p)) => p.clone(),
        Ok(None) => DomainPolicy::default(),
        Err(e) => return Err(format!("{name} has an unreadable havirt policy ({e}); fix or remove it first")),
    };
    let policy = apply_changes(current, changes, hosts)?;
    // Admission control sees the domain as it will be protected: its size
    // from libvirt's definition, the policy just computed.
    let mut candidate =
        registry::entry(info.id, &hv.xml(info.id).map_err(|e| format!("reading the definition of {name}: {e}"))?).spec;
    candidate.policy = policy.clone();
    let assessment = admission.assess(Change::Add { domain: &candidate, on: owner.host });
    if assessment.refused {
        return Err(format!(
            "admission control (strict) refuses to protect {name}: {}; or set [cluster] admission = \"warn\"",
            assessment.breach.unwrap_or_default()
        ));
    }
    let key = LeaseKey::Domain(info.id);
    let lease = s.store.read_lease(key).map_err(|e| format!("reading the lease of {name}: {e}"))?;
    let generation = match lease.owner {
        Some(o) if o == owner => lease.generation,
        Some(o) if protected.contains(&info.id) => {
            let holder = hosts.iter().find(|h| h.id == o.host).map_or(o.host.to_string(), |h| h.name.clone());
            return Err(format!(
                "{name} is protected and its lease is held by {holder} (boot {:x}): it must not run here; \
                 havirt destroys it here unless the lease is ours",
                o.boot
            ));
        }
        _ => {
            let new = Lease { owner: Some(owner), generation: lease.generation + 1, reason: LeaseReason::Acquired };
            match s.store.cas_lease(key, lease.generation, new) {
                Ok(CasOutcome::Done(l)) => l.generation,
                Ok(CasOutcome::Conflict(l)) => {
                    return Err(format!("the lease of {name} changed meanwhile (now {l:?}); try again"));
                }
                Err(e) => return Err(format!("taking the lease of {name}: {e}")),
            }
        }
    };
    hv.set_policy(info.id, &policy).map_err(|e| format!("writing the policy of {name}: {e}"))?;
    hv.set_autostart(info.id, false).map_err(|e| format!("turning autostart off for {name}: {e}"))?;
    let xml = hv.xml(info.id).map_err(|e| format!("reading the definition of {name}: {e}"))?;
    store_xml(s, info.id, &xml).map_err(|e| format!("storing the definition of {name}: {e}"))?;
    let entry = registry::entry(info.id, &xml);
    let mut message = format!("{name} is protected ({}), lease generation {generation}", render_policy(&policy));
    if let Some(why) = assessment.breach {
        message.push_str(&format!("\nwarning: admission control: {why}"));
    }
    Ok((info.id, entry, message))
}

fn apply_changes(mut p: DomainPolicy, c: &PolicyChanges, hosts: &[HostConfig]) -> Result<DomainPolicy, String> {
    if let Some(v) = c.priority {
        p.priority = v;
    }
    if let Some(v) = c.isolation_response {
        p.isolation_response = v;
    }
    if let Some(names) = &c.affinity {
        p.affinity = names
            .iter()
            .map(|n| {
                hosts.iter().find(|h| &h.name == n).map(|h| h.id).ok_or_else(|| {
                    let known: Vec<&str> = hosts.iter().map(|h| h.name.as_str()).collect();
                    format!("affinity: no host named {n:?}; known: {}", known.join(", "))
                })
            })
            .collect::<Result<_, _>>()?;
    }
    if let Some(g) = &c.anti_affinity {
        p.anti_affinity = (!g.is_empty()).then(|| g.clone());
    }
    if let Some(r) = c.readiness {
        p.readiness = r;
    }
    if let Some(s) = c.readiness_timeout_s {
        p.readiness_timeout = Duration::from_secs(s);
    }
    if let Some(m) = c.max_restarts {
        p.max_restarts = m;
    }
    if let Some(o) = c.on_shutdown {
        p.on_shutdown = o;
    }
    let m = &mut p.monitor;
    let secs = |s: Option<u64>, d: Duration| s.map_or(d, Duration::from_secs);
    m.enabled = c.guest_monitor.unwrap_or(m.enabled);
    m.failure_interval = secs(c.monitor_failure_interval_s, m.failure_interval);
    m.min_uptime = secs(c.monitor_min_uptime_s, m.min_uptime);
    m.max_resets = c.monitor_max_resets.unwrap_or(m.max_resets);
    m.reset_window = secs(c.monitor_reset_window_s, m.reset_window);
    Ok(p)
}

/// Registry entries with the stamp they were read at.
type RegistryCache = BTreeMap<DomainId, (crate::store::XmlStamp, registry::Entry)>;

/// Reads every stored definition; those unchanged since `cached` are not
/// read again.
fn read_registry_cached(store: &Store, cached: &RegistryCache) -> Result<RegistryCache, StoreError> {
    let mut out = BTreeMap::new();
    for d in store.list_domain_xml()? {
        let Some(stamp) = store.xml_stamp(d)? else { continue };
        if let Some((s, e)) = cached.get(&d)
            && *s == stamp
        {
            out.insert(d, (*s, e.clone()));
            continue;
        }
        if let Some(xml) = store.read_domain_xml(d)? {
            out.insert(d, (stamp, registry::entry(d, &xml)));
        }
    }
    Ok(out)
}

/// The running domains that carry a havirt policy, as protected: what the
/// engine must know to self-fence them when the registry cannot be read.
fn protected_from_metadata(running: &[DomainInfo]) -> BTreeMap<DomainId, registry::Entry> {
    running
        .iter()
        .filter(|i| i.state.has_qemu())
        .filter_map(|i| {
            let policy = i.policy.clone().ok().flatten()?;
            let spec =
                crate::engine::config::DomainSpec { id: i.id, name: i.name.clone(), memory_mib: 0, vcpus: 0, policy };
            let problem = Some("the registry could not be read at start; protected by its libvirt metadata".into());
            Some((i.id, registry::Entry { spec, problem }))
        })
        .collect()
}

/// Re-reads the registry every REGISTRY_POLL and reports every read (its
/// age matters to the engine, changed or not). One read
/// at a time: a hung datastore holds one thread, not one per poll.
fn spawn_registry_poller(shared: Arc<Shared>) {
    tokio::spawn(async move {
        let mut cache = RegistryCache::new();
        loop {
            tokio::time::sleep(REGISTRY_POLL).await;
            let epoch = shared.registry_epoch.load(Ordering::SeqCst);
            let store = Arc::clone(&shared.store);
            let old = cache.clone();
            let issued = tokio::time::Instant::now();
            match tokio::task::spawn_blocking(move || read_registry_cached(&store, &old)).await {
                Ok(Ok(new)) => {
                    cache = new;
                    let entries: BTreeMap<_, _> = cache.iter().map(|(d, (_, e))| (*d, e.clone())).collect();
                    shared.send(Internal::Registry { epoch, entries, issued });
                }
                Ok(Err(e)) => shared.send(Internal::Problem(format!("reading the protected domains: {e}"))),
                Err(e) => shared.send(Internal::Problem(format!("reading the protected domains: {e}"))),
            }
        }
    });
}

/// libvirt's events on a thread of their own (the stream blocks); on a
/// closed connection it reconnects and asks the loop to re-list.
fn spawn_event_thread(shared: Arc<Shared>) {
    let spawned = std::thread::Builder::new().name("libvirt-events".into()).spawn(move || {
        loop {
            let hv = shared.hv.get();
            let stream = match hv.events() {
                Ok(s) => s,
                Err(e) => {
                    shared.send(Internal::Problem(format!("libvirt events: {e}")));
                    std::thread::sleep(LIBVIRT_RECONNECT_INTERVAL);
                    reconnect(&shared);
                    continue;
                }
            };
            drop(hv);
            loop {
                let Some(ev) = stream.recv_timeout(std::time::Duration::from_secs(1)) else {
                    if shared.tx.is_closed() {
                        return;
                    }
                    continue;
                };
                let closed = matches!(ev, HypervisorEvent::ConnectionClosed { .. });
                shared.send(Internal::Hypervisor(ev));
                if closed {
                    break;
                }
            }
            drop(stream);
            reconnect(&shared);
        }
    });
    if let Err(e) = spawned {
        error!("cannot start the libvirt event thread: {e}");
    }
}

fn reconnect(shared: &Shared) {
    loop {
        if shared.tx.is_closed() {
            return;
        }
        match LibvirtHypervisor::open(LibvirtOptions::new(&shared.libvirt_uri)) {
            Ok(hv) => {
                shared.hv.set(hv);
                shared.send(Internal::Reconnected);
                return;
            }
            Err(_) => std::thread::sleep(LIBVIRT_RECONNECT_INTERVAL),
        }
    }
}

async fn connect_libvirt(uri: &str) -> Result<LibvirtHypervisor, DaemonError> {
    let started = tokio::time::Instant::now();
    loop {
        let u = uri.to_string();
        let r = tokio::task::spawn_blocking(move || LibvirtHypervisor::open(LibvirtOptions::new(&u)))
            .await
            .map_err(|e| DaemonError::Io { what: "connecting to libvirt", source: std::io::Error::other(e) })?;
        match r {
            Ok(hv) => return Ok(hv),
            Err(source) if started.elapsed() >= LIBVIRT_CONNECT_WAIT => {
                return Err(DaemonError::Libvirt {
                    uri: uri.to_string(),
                    waited_s: LIBVIRT_CONNECT_WAIT.as_secs(),
                    source,
                });
            }
            Err(e) => {
                warn!("libvirt at {uri} not reachable yet: {e}");
                tokio::time::sleep(LIBVIRT_RECONNECT_INTERVAL).await;
            }
        }
    }
}

/// A boot that a peer confirmed powered off (`fenced/<host>` names it) must
/// not run havirt: the fence did not cut its power (an agent or BMC that
/// reports "off" without doing it), or boot ids are not unique here. Its
/// leases count as free to every master for as long as that boot lives, so
/// any lease it took would be taken from it again while its qemu runs
/// (found in the lab, whose hosts once shared one kernel boot id). A read
/// that fails or does not answer in time is no evidence: the engine's own
/// storage checks (S4) take over.
async fn refuse_fenced_boot(
    store: &Arc<Store>,
    me: HostId,
    boot: BootId,
    io_wait: std::time::Duration,
) -> Result<(), DaemonError> {
    let store = Arc::clone(store);
    let read = tokio::time::timeout(io_wait, tokio::task::spawn_blocking(move || store.read_fenced(me))).await;
    match read {
        Ok(Ok(Ok(Some(record)))) if record.boot == boot => Err(DaemonError::FencedBoot { boot, by: record.by }),
        Ok(Ok(Err(e))) => {
            warn!("cannot read this host's fence record ({e}); going on");
            Ok(())
        }
        _ => Ok(()),
    }
}

/// Maintenance mode as this host's last slot left it (a daemon restart or
/// a reboot in maintenance stays in maintenance). Unreadable: not in it.
async fn maintenance_before(store: &Arc<Store>, me: HostId, io_wait: std::time::Duration) -> bool {
    let store = Arc::clone(store);
    let read = tokio::time::timeout(io_wait, tokio::task::spawn_blocking(move || store.read_slot(me))).await;
    matches!(read, Ok(Ok(Ok(Some(slot)))) if slot.maintenance)
}

// ---------------------------------------------------------------- host facts

/// The kernel's boot id, folded to 64 bits: changes on every boot.
fn boot_id() -> BootId {
    let text = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap_or_default();
    match parse_uuid(text.trim()) {
        Some(DomainId(v)) => {
            // Truncation intended: the halves are folded together.
            #[allow(clippy::cast_possible_truncation)]
            let folded = (v as u64) ^ ((v >> 64) as u64);
            folded
        }
        None => random_u64(),
    }
}

/// 64 random bits from the kernel (incarnations, nonces, the engine's seed).
fn random_u64() -> u64 {
    use std::io::Read;
    let mut b = [0u8; 8];
    match std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut b)) {
        Ok(()) => u64::from_le_bytes(b),
        // No /dev/urandom: the clock's nanoseconds still differ per start.
        Err(_) => {
            #[allow(clippy::disallowed_methods, reason = "fallback entropy, not engine time")]
            let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
            u64::try_from(t.as_nanos() & u128::from(u64::MAX)).unwrap_or(0) ^ u64::from(std::process::id())
        }
    }
}

/// Wall-clock milliseconds since the Unix epoch (event times, `status --watch`).
pub fn unix_ms() -> u64 {
    #[allow(clippy::disallowed_methods, reason = "wall-clock time of an event for the operator, not engine time")]
    let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    u64::try_from(t.as_millis()).unwrap_or(u64::MAX)
}

fn std_duration(d: Duration) -> std::time::Duration {
    std::time::Duration::from_millis(d.as_millis())
}

/// This host's memory (MiB) and logical CPUs, for the planner; (0, 0) when
/// unknown (the planner then places nothing here, and says so).
fn host_size() -> (u64, u32) {
    let Ok(mut sys) = sysinfo::System::new() else {
        warn!("cannot read this host's memory and CPUs; it takes no restarts");
        return (0, 0);
    };
    sys.refresh_memory();
    sys.refresh_cpu_list(sysinfo::CpuRefreshKind::nothing());
    let cpus = u32::try_from(sys.cpus().len()).unwrap_or(u32::MAX);
    (sys.total_memory() / (1024 * 1024), cpus)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::config::{IsolationResponse, Priority};

    fn hosts() -> Vec<HostConfig> {
        let text =
            std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/config/havirt.toml")).expect("example");
        Config::parse("havirt.toml", &text).expect("example parses").0.hosts
    }

    #[test]
    fn policy_changes_keep_what_is_not_given() {
        let start = DomainPolicy { priority: Priority::High, max_restarts: 7, ..DomainPolicy::default() };
        let c = PolicyChanges {
            isolation_response: Some(IsolationResponse::Shutdown),
            affinity: Some(vec!["hv2".into()]),
            ..PolicyChanges::default()
        };
        let p = apply_changes(start, &c, &hosts()).expect("applies");
        assert_eq!(p.priority, Priority::High);
        assert_eq!(p.max_restarts, 7);
        assert_eq!(p.isolation_response, IsolationResponse::Shutdown);
        assert_eq!(p.affinity, vec![HostId(2)]);
        let clear = PolicyChanges { affinity: Some(vec![]), anti_affinity: Some(String::new()), ..Default::default() };
        let p = apply_changes(p, &clear, &hosts()).expect("applies");
        assert!(p.affinity.is_empty());
        assert_eq!(p.anti_affinity, None);
    }

    #[test]
    fn affinity_to_an_unknown_host_is_refused_with_the_known_ones() {
        let c = PolicyChanges { affinity: Some(vec!["hv9".into()]), ..PolicyChanges::default() };
        let e = apply_changes(DomainPolicy::default(), &c, &hosts()).unwrap_err();
        assert!(e.contains("hv9") && e.contains("hv1, hv2, hv3"), "{e}");
    }

    #[test]
    fn boot_id_is_stable_within_a_boot() {
        assert_eq!(boot_id(), boot_id());
        assert_ne!(random_u64(), random_u64());
    }
}
