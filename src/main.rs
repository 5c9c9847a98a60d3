//! The `havirt` command.

use clap::{CommandFactory, Parser, Subcommand};
use havirt::engine::config::Profile;
use havirt::sim::block::DatastoreKind;
use havirt::sim::random::{Datastores, RandomOptions, Shape, run_seed};
use havirt::sim::report::{Verdict, run_seeds};
use havirt::sim::{run_scenario, scenario};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "havirt",
    version,
    about = "High availability for KVM/libvirt hosts",
    long_about = "High availability for KVM/libvirt hosts: a daemon on every host watches its peers by \
network and shared-storage heartbeats, fences hosts that died and restarts their protected domains on \
the survivors, with leases so that no domain ever runs twice.\n\n\
Set up: havirt init, write /etc/havirt/havirt.toml, havirt check, systemctl enable --now havirt, \
then havirt protect DOMAIN on the host that runs it."
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

/// Which host of which config this machine is, and its libvirt.
#[derive(clap::Args)]
struct ThisHost {
    #[arg(long, value_name = "PATH", default_value = havirt::config::DEFAULT_PATH)]
    config: PathBuf,
    /// The [[host]] this machine is (default: its host name).
    #[arg(long)]
    host: Option<String>,
    /// The local libvirt.
    #[arg(long, value_name = "URI", default_value = "qemu:///system")]
    libvirt_uri: String,
}

/// Where the operator commands find the daemon.
#[derive(clap::Args)]
struct SocketArg {
    /// The daemon's control socket.
    #[arg(long, value_name = "PATH", default_value = havirt::control::DEFAULT_SOCKET)]
    socket: PathBuf,
}

#[derive(Subcommand)]
enum Cmd {
    /// Create a cluster's datastore directory and its cluster key.
    Init {
        /// The cluster's name (1 to 32 characters from a-z, 0-9 and -).
        #[arg(long)]
        cluster: String,
        /// The cluster's directory on the shared filesystem, e.g.
        /// /mnt/nfs/.havirt/prod (the config's datastore path), or the
        /// shared LUN, e.g. /dev/disk/by-id/... (formatted: kind = "block").
        #[arg(long, value_name = "PATH")]
        datastore: PathBuf,
        /// Block datastore: host slots (host ids 0 to N-1).
        #[arg(long, value_name = "N", default_value_t = havirt::store::block::DEFAULT_MAX_HOSTS)]
        max_hosts: u16,
        /// Block datastore: domain leases (protected domains, ever).
        #[arg(long, value_name = "N", default_value_t = havirt::store::block::DEFAULT_MAX_DOMAINS)]
        max_domains: u32,
        /// Block datastore: 4 KiB blocks of each copy of the registry (all
        /// protected domains' definitions), two per host.
        #[arg(long, value_name = "N", default_value_t = havirt::store::block::DEFAULT_REGISTRY_BLOCKS)]
        registry_blocks: u32,
        /// Block datastore: format a device that holds data or another
        /// cluster's header (destroys it).
        #[arg(long)]
        force: bool,
        /// Where to write the cluster key (kept if it exists).
        #[arg(long, value_name = "PATH", default_value = "/etc/havirt/cluster.key")]
        key_file: PathBuf,
    },
    /// Run the HA daemon in the foreground (systemd runs it as havirt.service).
    Daemon {
        #[command(flatten)]
        this: ThisHost,
        #[command(flatten)]
        socket: SocketArg,
    },
    /// Show hosts (verdict, heartbeat ages, capacity) and protected domains
    /// (host, state, priority, lease generation) as this host's daemon sees them.
    Status {
        /// One JSON object instead of tables.
        #[arg(long)]
        json: bool,
        /// Redraw every --interval seconds until Ctrl-C.
        #[arg(long, short)]
        watch: bool,
        /// Seconds between redraws of --watch (0.1 to 3600).
        #[arg(long, value_name = "SECONDS", default_value_t = 1.0, requires = "watch", value_parser = parse_interval)]
        interval: f64,
        #[command(flatten)]
        socket: SocketArg,
    },
    /// The daemon's event timeline: detections, fencing, lease moves, restarts.
    Events {
        /// Keep printing new events.
        #[arg(long, short)]
        follow: bool,
        /// One timeline per failover instead: detection, fencing, and per
        /// domain the lease taken, started and ready, in seconds after the
        /// detection (recorded by the daemon that fenced or, as master,
        /// moved the leases).
        #[arg(long, conflicts_with = "follow")]
        failovers: bool,
        /// JSON instead of text (as the HTTP API's /api/v1/events and
        /// /api/v1/failovers serve it).
        #[arg(long, conflicts_with = "follow")]
        json: bool,
        #[command(flatten)]
        socket: SocketArg,
    },
    /// Protect a domain running on this host (or change its policy): if its
    /// host dies, havirt restarts it on a survivor. Options not given keep
    /// their current value.
    Protect(ProtectArgs),
    /// Start, on this host, a protected domain that was stopped on purpose
    /// (shut down from inside the guest, or by the operator): its lease is
    /// taken first, so two hosts asked at once never both run it.
    Start {
        /// Domain name or UUID.
        domain: String,
        #[command(flatten)]
        socket: SocketArg,
    },
    /// Stop protecting a domain; it keeps running where it runs.
    Unprotect {
        /// Domain name or UUID.
        domain: String,
        #[command(flatten)]
        socket: SocketArg,
    },
    /// Maintenance mode: drain this host by live migration before patching
    /// it, and bring it back afterwards.
    Maintenance {
        #[command(subcommand)]
        what: MaintenanceCmd,
    },
    /// Fencing by hand, for hosts with neither watchdog nor fence agent.
    Fence {
        #[command(subcommand)]
        what: FenceCmd,
    },
    /// Preflight: configuration, datastore (O_DIRECT, locks), key, watchdog,
    /// fence agents, libvirt, and every protected domain's disks and bridges.
    Check {
        #[command(flatten)]
        this: ThisHost,
    },
    /// The test lab's tools.
    Lab {
        #[command(subcommand)]
        what: LabCmd,
    },
    /// Run the deterministic cluster simulator. Exits 0 when every run is
    /// clean, 3 when a safety invariant broke, 4 when only liveness did (or
    /// a false failover), 5 when a run crashed; 2 on a usage error.
    Simulate(SimulateArgs),
    /// The built-in demo: one power loss step by step on a 5-host, 40-domain
    /// cluster, then 100 random fault schedules with every invariant checked.
    Demo,
    /// Print performance figures.
    Bench {
        /// What to measure: planner
        what: String,
    },
    /// Write the man pages and shell completions of this CLI under DIR, laid
    /// out like /usr/share (the Debian package's, see .ci/deb).
    #[command(hide = true)]
    GenerateDocs { dir: PathBuf },
}

#[derive(Subcommand)]
enum LabCmd {
    /// Serve a directory through a FUSE mount that can inject storage faults
    /// (a datastore that hangs, fails or is slow); runs until SIGTERM.
    Faultfs {
        /// The directory mirrored (the "NFS export").
        #[arg(long, value_name = "DIR")]
        backing: PathBuf,
        /// Where to mount it.
        #[arg(long, value_name = "DIR")]
        mountpoint: PathBuf,
        /// The control socket for `havirt lab storage-fault`.
        #[arg(long, value_name = "PATH")]
        control: PathBuf,
    },
    /// Remove everything the lab made (its processes, mounts under
    /// /var/tmp/havirt-lab, hl-* network namespaces, the directory), found
    /// by name; safe to run twice. Waits for a lab in use by a test.
    Down,
    /// Build a lab and leave it running: N hosts (netns + own libvirtd and
    /// havirt daemon, a simulated BMC and watchdog each) sharing one
    /// fault-injecting datastore, with M tiny protected qemu domains.
    Up(LabUpArgs),
    /// The process that keeps a lab up (started by `lab up`).
    #[command(hide = true)]
    Serve(LabUpArgs),
    /// Inject a fault into the running lab: power-off H, power-on H,
    /// bmc-dead H, bmc-alive H, pause H, resume H, partition H[,H] [H[,H]]
    /// [--one-way], isolate H, heal, storage-hang H, storage-eio H,
    /// storage-delay H MS, storage-ok H, kill-daemon H, kill-libvirtd H,
    /// kill-qemu H DOMAIN.
    Fault {
        #[arg(required = true, num_args = 1.., allow_hyphen_values = true)]
        words: Vec<String>,
    },
    /// Every lab host's power, BMC and daemon view, and where each domain
    /// really runs (from each host's libvirtd).
    Status,
    /// Up, show status, power off one host through its BMC, print the live
    /// failover timeline and each domain's recovery time, down.
    Demo(LabUpArgs),
    /// Recovery times per fault class over several trials (prints figures,
    /// asserts nothing).
    Bench(havirt::lab::bench::BenchArgs),
    /// Build (once per machine, cached) the lab's tiny guest OS, a kernel
    /// and an initramfs running the QEMU guest agent; print their paths.
    GuestImage,
    /// Set a fault of a running faultfs: hang, eio, delay MS, readonly, ok
    /// (each optionally `netns=NAME`), or ask for its status.
    StorageFault {
        #[arg(long, value_name = "PATH")]
        control: PathBuf,
        /// The command words, e.g. `hang netns=h1`.
        #[arg(required = true, num_args = 1..)]
        command: Vec<String>,
    },
}

#[derive(clap::Args, Clone)]
struct LabUpArgs {
    #[arg(long, default_value_t = 3)]
    hosts: u16,
    #[arg(long, default_value_t = 6)]
    domains: u16,
    /// How hosts fence each other: ipmilan (fence_ipmilan), ipmitool, none.
    #[arg(long, default_value = "ipmilan", value_parser = havirt::lab::cluster::Fencing::parse)]
    fencing: havirt::lab::cluster::Fencing,
    /// Timing profile: default, fast, conservative.
    #[arg(long, default_value = "default")]
    profile: String,
    /// How many domains (vm1, vm2, ...) boot a tiny guest OS with the QEMU
    /// guest agent instead of staying empty.
    #[arg(long, default_value_t = 0)]
    guest_os: u16,
    /// The hosts' shared datastore: dir (a directory, as on NFS) or block
    /// (a LUN: a loop device per host over one file, raw disks on loop
    /// devices of their own, as on iSCSI).
    #[arg(long, default_value = "dir", value_parser = havirt::lab::cluster::Datastore::parse)]
    datastore: havirt::lab::cluster::Datastore,
}

impl LabUpArgs {
    fn spec(&self) -> Result<havirt::lab::cluster::LabSpec, String> {
        let havirt = std::env::current_exe().map_err(|e| format!("cannot find this program: {e}"))?;
        let mut spec = havirt::lab::cluster::LabSpec::new(self.hosts, self.domains, havirt);
        spec.fencing = self.fencing;
        spec.profile = self.profile.clone();
        spec.guest_os = self.guest_os;
        spec.datastore = self.datastore;
        Ok(spec)
    }

    fn to_args(&self) -> Vec<String> {
        let fencing = match self.fencing {
            havirt::lab::cluster::Fencing::Ipmilan => "ipmilan",
            havirt::lab::cluster::Fencing::Ipmitool => "ipmitool",
            havirt::lab::cluster::Fencing::Disabled => "none",
        };
        [
            ("--hosts", self.hosts.to_string()),
            ("--domains", self.domains.to_string()),
            ("--fencing", fencing.into()),
            ("--profile", self.profile.clone()),
            ("--guest-os", self.guest_os.to_string()),
            ("--datastore", self.datastore.name().into()),
        ]
        .into_iter()
        .flat_map(|(k, v)| [k.to_string(), v])
        .collect()
    }
}

#[derive(Subcommand)]
enum MaintenanceCmd {
    /// Live-migrate every protected domain of this host to other hosts (the
    /// planner picks them) and take no restarts here; waits and shows the
    /// progress. Fails (exit 1) if a domain could not move: it keeps running
    /// here. Run it again to retry those.
    Enter {
        /// This host's name in the config (default: the daemon's host).
        host: Option<String>,
        /// Return at once instead of waiting for the drain.
        #[arg(long)]
        no_wait: bool,
        /// Give up waiting after this many seconds (the drain goes on).
        #[arg(long, value_name = "SECONDS", default_value_t = 900)]
        timeout: u64,
        #[command(flatten)]
        socket: SocketArg,
    },
    /// Leave maintenance mode: the host takes restarts again.
    Exit {
        /// This host's name in the config (default: the daemon's host).
        host: Option<String>,
        #[command(flatten)]
        socket: SocketArg,
    },
}

#[derive(Subcommand)]
enum FenceCmd {
    /// Swear that HOST is powered off, so that its domains are restarted
    /// elsewhere. Wrong here means domains running twice: check first.
    Confirm {
        /// The host's name in the config.
        host: String,
        #[command(flatten)]
        socket: SocketArg,
    },
}

#[derive(clap::Args)]
struct ProtectArgs {
    /// Domain name or UUID.
    domain: String,
    /// Restart priority: disabled, lowest, low, medium, high, highest.
    #[arg(long, value_parser = havirt::cli::parse_priority)]
    priority: Option<havirt::engine::config::Priority>,
    /// What to do with it when this host is isolated: keep, shutdown, poweroff.
    #[arg(long, value_parser = havirt::cli::parse_isolation_response)]
    isolation_response: Option<havirt::engine::config::IsolationResponse>,
    /// Hosts it may run on, comma-separated ("" for any host); the first is
    /// preferred: it returns there by live migration when it can (failback).
    #[arg(long, value_name = "HOSTS")]
    affinity: Option<String>,
    /// Domains of one group never share a host ("" to leave the group).
    #[arg(long, value_name = "GROUP")]
    anti_affinity: Option<String>,
    /// When it counts as up after a restart: started, guest-agent, tcp:PORT.
    #[arg(long, value_parser = havirt::cli::parse_readiness)]
    readiness: Option<havirt::engine::config::Readiness>,
    /// Seconds to wait for readiness before starting lower priorities anyway.
    #[arg(long, value_name = "SECONDS")]
    readiness_timeout: Option<u64>,
    /// Failed starts before havirt gives up on it.
    #[arg(long)]
    max_restarts: Option<u32>,
    /// When it is shut down from inside the guest, or by the operator
    /// (virsh shutdown/destroy): stop (stays stopped on every host until
    /// havirt start) or restart (here, as after a crash).
    #[arg(long, value_parser = havirt::cli::parse_on_shutdown)]
    on_shutdown: Option<havirt::engine::config::OnShutdown>,
    /// Guest-agent monitoring: on (reset the guest when its QEMU guest
    /// agent stops answering) or off.
    #[arg(long, value_name = "on|off", value_parser = havirt::cli::parse_switch)]
    guest_monitor: Option<bool>,
    /// Seconds of guest-agent silence that mean a hung guest (default 30).
    #[arg(long, value_name = "SECONDS")]
    monitor_failure_interval: Option<u64>,
    /// Seconds after a start or reset to wait for the agent's first answer
    /// (default 120).
    #[arg(long, value_name = "SECONDS")]
    monitor_min_uptime: Option<u64>,
    /// Resets per window before leaving a hung guest alone (default 3).
    #[arg(long, value_name = "N")]
    monitor_max_resets: Option<u32>,
    /// The window of --monitor-max-resets, in seconds (default 3600).
    #[arg(long, value_name = "SECONDS")]
    monitor_reset_window: Option<u64>,
    #[command(flatten)]
    socket: SocketArg,
}

#[derive(clap::Args)]
struct SimulateArgs {
    /// A range of seeds, A..B (inclusive).
    #[arg(long)]
    seeds: Option<String>,
    /// One seed, replayed exactly.
    #[arg(long)]
    seed: Option<u64>,
    /// A golden scenario directory: print its event log.
    #[arg(long)]
    scenario: Option<PathBuf>,
    #[arg(long, default_value_t = 5)]
    hosts: u16,
    #[arg(long, default_value_t = 40)]
    domains: u32,
    /// Draw each seed's cluster shape from the seed: 2, 3, 4, 5 or 7 hosts
    /// (seed mod 5), 4 to 20 protected domains per host.
    #[arg(long, conflicts_with_all = ["hosts", "domains"])]
    matrix: bool,
    /// Simulated time per run, e.g. 20m, 90s.
    #[arg(long, default_value = "20m")]
    duration: String,
    #[arg(long, default_value = "default")]
    profile: String,
    /// The datastore backend: dir (NFS, a CAS under a file lock), block (a
    /// raw LUN, Disk Paxos per sector) or mixed (by seed: five on dir, the
    /// next five on block). Default: mixed with --matrix, else dir.
    #[arg(long)]
    datastore: Option<String>,
    /// Print one JSON summary.
    #[arg(long)]
    json: bool,
    /// Print the whole timeline of a single seed.
    #[arg(long)]
    verbose: bool,
    /// Worker threads (default: all cores).
    #[arg(long)]
    jobs: Option<usize>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if !matches!(cli.command, Cmd::Daemon { .. }) {
        // Like any Unix tool, `havirt status | head` ends quietly when the
        // reader goes away, instead of panicking on EPIPE. Not the daemon:
        // a client closing the control socket must never kill it.
        // SAFETY: restores the default disposition of one signal before any
        // thread exists; no handler is installed.
        #[allow(unsafe_code)]
        unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        }
    }
    let result = match cli.command {
        Cmd::Simulate(a) => simulate(a),
        Cmd::Bench { what } => bench(&what),
        Cmd::Demo => demo(),
        Cmd::Daemon { this, socket } => daemon(this, socket.socket),
        Cmd::Check { this } => check(this),
        Cmd::Init { cluster, datastore, key_file, max_hosts, max_domains, registry_blocks, force } => {
            let block = havirt::cli::BlockInit { max_hosts, max_domains, registry_blocks, force };
            print(havirt::cli::init(&cluster, &datastore, &key_file, block))
        }
        Cmd::Status { json, watch: false, socket, .. } => print(havirt::cli::status(&socket.socket, json)),
        Cmd::Status { json, watch: true, interval, socket } => {
            print(havirt::cli::watch_status(&socket.socket, json, std::time::Duration::from_secs_f64(interval)))
        }
        Cmd::Events { failovers: true, json, socket, .. } => print(havirt::cli::failovers(&socket.socket, json)),
        Cmd::Events { json: true, socket, .. } => print(havirt::cli::events_json(&socket.socket)),
        Cmd::Events { follow, socket, .. } => print(havirt::cli::events(&socket.socket, follow)),
        Cmd::Protect(a) => protect(a),
        Cmd::Unprotect { domain, socket } => print(havirt::cli::unprotect(&socket.socket, &domain)),
        Cmd::Start { domain, socket } => print(havirt::cli::start(&socket.socket, &domain)),
        Cmd::Lab { what: LabCmd::Faultfs { backing, mountpoint, control } } => {
            havirt::lab::faultfs::run(havirt::lab::faultfs::FaultFsOptions { backing, mountpoint, control })
                .map(|()| ExitCode::SUCCESS)
                .map_err(|e| e.to_string())
        }
        Cmd::Lab { what: LabCmd::Up(args) } => std::env::current_exe()
            .map_err(|e| e.to_string())
            .and_then(|exe| havirt::lab::keeper::up_detached(&exe, &args.to_args()))
            .and_then(|()| havirt::lab::keeper::request("status"))
            .map(|status| {
                print!("{status}");
                println!("the lab is up: `havirt lab fault KIND HOST`, `havirt lab status`, `havirt lab down`");
                ExitCode::SUCCESS
            }),
        Cmd::Lab { what: LabCmd::Serve(args) } => args
            .spec()
            .and_then(|spec| havirt::lab::keeper::serve(spec).map_err(|e| e.to_string()))
            .map(|()| ExitCode::SUCCESS),
        Cmd::Lab { what: LabCmd::Fault { words } } => {
            print(havirt::lab::keeper::request(&format!("fault {}", words.join(" "))))
        }
        Cmd::Lab { what: LabCmd::Status } => print(havirt::lab::keeper::request("status")),
        Cmd::Lab { what: LabCmd::Demo(args) } => args
            .spec()
            .and_then(|spec| havirt::lab::demo::run(spec).map_err(|e| e.to_string()))
            .map(|()| ExitCode::SUCCESS),
        Cmd::Lab { what: LabCmd::Bench(args) } => std::env::current_exe()
            .map_err(|e| e.to_string())
            .and_then(|exe| havirt::lab::bench::run(&exe, &args))
            .map(|()| ExitCode::SUCCESS),
        Cmd::Lab { what: LabCmd::Down } => print(havirt::lab::keeper::down()),
        Cmd::Lab { what: LabCmd::GuestImage } => print(
            havirt::lab::guest::ensure_image()
                .map(|i| format!("kernel {}\ninitrd {}", i.kernel.display(), i.initrd.display()))
                .map_err(|e| e.to_string()),
        ),
        Cmd::Lab { what: LabCmd::StorageFault { control, command } } => {
            print(havirt::lab::faultfs::control(&control, &command.join(" ")).map_err(|e| e.to_string()))
        }
        Cmd::Maintenance { what: MaintenanceCmd::Enter { host, no_wait, timeout, socket } } => {
            let wait = (!no_wait).then(|| std::time::Duration::from_secs(timeout));
            print(havirt::cli::maintenance(&socket.socket, host.as_deref(), true, wait))
        }
        Cmd::Maintenance { what: MaintenanceCmd::Exit { host, socket } } => {
            print(havirt::cli::maintenance(&socket.socket, host.as_deref(), false, None))
        }
        Cmd::Fence { what: FenceCmd::Confirm { host, socket } } => {
            print(havirt::cli::fence_confirm(&socket.socket, &host))
        }
        Cmd::GenerateDocs { dir } => havirt::docs::generate(Cli::command(), &dir)
            .map(|files| {
                println!("wrote {} files under {}", files.len(), dir.display());
                ExitCode::SUCCESS
            })
            .map_err(|e| e.to_string()),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("havirt: {e}");
            ExitCode::from(2)
        }
    }
}

/// An operator command's answer: printed, exit 0; a refusal: stderr, exit 1.
/// `--interval`: seconds, 0.1 to 3600.
fn parse_interval(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if (0.1..=3600.0).contains(&v) => Ok(v),
        _ => Err(format!("{s:?}: give seconds from 0.1 to 3600, e.g. 2 or 0.5")),
    }
}

fn print(outcome: havirt::cli::Outcome) -> Result<ExitCode, String> {
    match outcome {
        Ok(text) => {
            if !text.is_empty() {
                println!("{text}");
            }
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            eprintln!("havirt: {e}");
            Ok(ExitCode::from(1))
        }
    }
}

fn protect(a: ProtectArgs) -> Result<ExitCode, String> {
    let list = |s: String| s.split(',').map(str::trim).filter(|h| !h.is_empty()).map(String::from).collect();
    let changes = havirt::control::PolicyChanges {
        priority: a.priority,
        isolation_response: a.isolation_response,
        affinity: a.affinity.map(list),
        anti_affinity: a.anti_affinity,
        readiness: a.readiness,
        readiness_timeout_s: a.readiness_timeout,
        max_restarts: a.max_restarts,
        on_shutdown: a.on_shutdown,
        guest_monitor: a.guest_monitor,
        monitor_failure_interval_s: a.monitor_failure_interval,
        monitor_min_uptime_s: a.monitor_min_uptime,
        monitor_max_resets: a.monitor_max_resets,
        monitor_reset_window_s: a.monitor_reset_window,
    };
    print(havirt::cli::protect(&a.socket.socket, &a.domain, changes))
}

fn daemon(this: ThisHost, socket: PathBuf) -> Result<ExitCode, String> {
    // journald adds its own timestamps.
    let journal = std::env::var_os("JOURNAL_STREAM").is_some();
    let filter = tracing_subscriber::EnvFilter::try_from_env("HAVIRT_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_target(false).with_writer(std::io::stderr);
    if journal {
        builder.without_time().with_ansi(false).init();
    } else {
        builder.init();
    }
    let ThisHost { config, host, libvirt_uri } = this;
    let opts = havirt::daemon::DaemonOptions { config, host, libvirt_uri, socket };
    match havirt::daemon::run(opts) {
        Ok(()) => Ok(ExitCode::SUCCESS),
        Err(e) => {
            tracing::error!("{e}");
            Err(e.to_string())
        }
    }
}

fn check(this: ThisHost) -> Result<ExitCode, String> {
    let ThisHost { config, host, libvirt_uri } = this;
    let findings = havirt::check::run(&havirt::check::CheckOptions { config_path: config, host, libvirt_uri });
    print!("{}", havirt::check::render(&findings));
    let errors = findings.iter().any(|f| matches!(f.level, havirt::check::Level::Error));
    Ok(if errors { ExitCode::from(1) } else { ExitCode::SUCCESS })
}

fn parse_duration(s: &str) -> Result<u64, String> {
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = num.parse().map_err(|_| format!("--duration {s:?}: expected a number and a unit, e.g. 20m or 90s"))?;
    match unit {
        "ms" => Ok(n),
        "s" | "" => Ok(n * 1000),
        "m" => Ok(n * 60_000),
        "h" => Ok(n * 3_600_000),
        _ => Err(format!("--duration {s:?}: unknown unit {unit:?} (use ms, s, m or h)")),
    }
}

fn parse_range(s: &str) -> Result<(u64, u64), String> {
    let bad = || format!("--seeds {s:?}: expected A..B, e.g. 1..2000");
    let (a, b) = s.split_once("..").ok_or_else(bad)?;
    let a: u64 = a.parse().map_err(|_| bad())?;
    let b: u64 = b.trim_start_matches('=').parse().map_err(|_| bad())?;
    if b < a {
        return Err(bad());
    }
    Ok((a, b))
}

fn simulate(a: SimulateArgs) -> Result<ExitCode, String> {
    if let Some(dir) = &a.scenario {
        let s = scenario::load(dir).map_err(|e| e.to_string())?;
        let out = run_scenario(&s);
        print!("{}", out.log);
        for v in &out.violations {
            println!("VIOLATION {v}");
        }
        return Ok(ExitCode::from(Verdict::of(out.invariants.iter().copied(), 0).exit_code()));
    }
    let profile = Profile::parse(&a.profile)
        .ok_or_else(|| format!("--profile {:?}: use fast, default or conservative", a.profile))?;
    profile.timings().validate().map_err(|e| e.to_string())?;
    let shape = if a.matrix { Shape::Matrix } else { Shape::Fixed { hosts: a.hosts.max(2), domains: a.domains } };
    let datastore = match a.datastore.as_deref() {
        None if a.matrix => Datastores::Mixed,
        None => Datastores::Only(DatastoreKind::Dir),
        Some("mixed") => Datastores::Mixed,
        Some(k) => Datastores::Only(
            DatastoreKind::parse(k).ok_or_else(|| format!("--datastore {k:?}: use dir, block or mixed"))?,
        ),
    };
    let o = RandomOptions { shape, duration_ms: parse_duration(&a.duration)?, profile, datastore };
    if let Some(seed) = a.seed {
        let out = run_seed(seed, &o, None);
        println!("SEED={seed} datastore={}", havirt::sim::random::datastore_of(seed, datastore).name());
        if a.verbose {
            for l in &out.log {
                println!("{l}");
            }
        }
        for v in &out.violations {
            println!("VIOLATION seed={seed} {} at {} ms: {}", v.invariant, v.at_ms, v.detail);
        }
        let s = havirt::sim::report::summarize(std::slice::from_ref(&out), 1.0);
        if a.json {
            println!("{}", serde_json::to_string_pretty(&s).map_err(|e| e.to_string())?);
        }
        let found = out.violations.iter().map(|v| v.invariant);
        return Ok(ExitCode::from(Verdict::of(found, out.false_failovers).exit_code()));
    }
    let (from, to) = parse_range(a.seeds.as_deref().unwrap_or("1..100"))?;
    let workers = a.jobs.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let print_violation = |r: &havirt::sim::RunOutcome| {
        eprintln!("SEED={} failed:", r.seed);
        for v in &r.violations {
            eprintln!("  {} at {} ms: {}", v.invariant, v.at_ms, v.detail);
            for l in &v.timeline {
                eprintln!("    {l}");
            }
        }
        let shape =
            if a.matrix { "--matrix".to_string() } else { format!("--hosts {} --domains {}", a.hosts, a.domains) };
        let kind = havirt::sim::random::datastore_of(r.seed, datastore).name();
        eprintln!(
            "  replay: havirt simulate --seed {} {shape} --datastore {kind} --duration {} --profile {} --verbose",
            r.seed, a.duration, a.profile
        );
    };
    let (summary, _) = run_seeds(from, to, &o, workers, &print_violation);
    if a.json {
        println!("{}", serde_json::to_string_pretty(&summary).map_err(|e| e.to_string())?);
    } else {
        println!(
            "{} runs, {} violations, {} false failovers, {} domains down for want of room at the end; {:.0} sim s per wall s\nrecovery from fault to running, clean episodes (one fault on a healthy cluster): p50 {:.2}s p99 {:.2}s max {:.2}s",
            summary.runs,
            summary.violations.len(),
            summary.false_failovers,
            summary.capacity_waits,
            summary.sim_seconds_per_wall_second,
            summary.recovery_seconds.p50,
            summary.recovery_seconds.p99,
            summary.recovery_seconds.max,
        );
        for (class, p) in &summary.recovery_by_class {
            println!("  {class:<22} n={:<5} p50 {:.2}s p99 {:.2}s max {:.2}s", p.samples, p.p50, p.p99, p.max);
        }
    }
    let found = summary.violations.iter().map(|v| v.invariant);
    Ok(ExitCode::from(Verdict::of(found, summary.false_failovers).exit_code()))
}

fn demo() -> Result<ExitCode, String> {
    use havirt::engine::config::HostId;
    use havirt::sim::faults::Command;
    let o = RandomOptions {
        shape: Shape::Fixed { hosts: 5, domains: 40 },
        duration_ms: 20 * 60_000,
        profile: Profile::Default,
        datastore: Datastores::Only(DatastoreKind::Dir),
    };
    let setup = havirt::sim::random::random_setup(1, &o);
    println!("== One host loses power: 5 hosts, 40 protected domains, default timings");
    let commands = vec![(30_000, Command::PowerOff(HostId(2)))];
    let out = havirt::sim::run_commands(&setup, havirt::sim::world::WorldParams::default(), &commands, 40_000, None);
    // The first seconds only adopt what runs already: show from the master on.
    let start = out.log.iter().position(|l| l.contains("became master")).unwrap_or(0);
    for line in out.log.iter().skip(start) {
        println!("{line}");
    }
    println!();
    println!("== 100 random fault schedules of 20 simulated minutes, every invariant checked");
    simulate(SimulateArgs {
        seeds: Some("1..100".into()),
        seed: None,
        scenario: None,
        hosts: 5,
        domains: 40,
        matrix: false,
        duration: "20m".into(),
        profile: "default".into(),
        datastore: None,
        json: false,
        verbose: false,
        jobs: None,
    })
}

fn bench(what: &str) -> Result<ExitCode, String> {
    match what {
        "planner" => {
            use havirt::engine::planner::{PlanRequest, bench_case, plan};
            let (hosts, domains) = bench_case(128, 10_000);
            let requests: Vec<PlanRequest> =
                domains.iter().map(|d| PlanRequest { domain: d, avoid: Vec::new() }).collect();
            let runs = 20;
            let mut best = f64::MAX;
            let mut placed = 0;
            for _ in 0..runs {
                // A benchmark measures wall time by definition.
                #[allow(clippy::disallowed_methods)]
                let t = std::time::Instant::now();
                let p = plan(&hosts, &requests);
                best = best.min(t.elapsed().as_secs_f64() * 1000.0);
                placed = p.placements.len();
            }
            println!(
                "planner 128 hosts x 10000 domains: best of {runs} = {best:.2} ms ({placed} placed; target <= 50 ms)"
            );
            Ok(ExitCode::SUCCESS)
        }
        _ => Err(format!("bench {what:?}: unknown (try: planner)")),
    }
}
