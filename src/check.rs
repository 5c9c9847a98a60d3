//! `havirt check`: a preflight of one host, in the manner of vSphere HA's
//! "configuration issues". It reads the configuration, then looks at what
//! this host can see — the cluster key, the datastore (layout, O_DIRECT,
//! locks, write latency, the mount under it), the watchdog, every fence
//! agent's prerequisites, libvirt and the protected domains' disks and
//! bridges — and reports one [`Finding`] per fact, each saying how to fix
//! what is wrong.
//!
//! Order and dependencies: the configuration comes first; without it only the
//! libvirt checks run. A failing check never stops the others, except those
//! that need what it failed to provide (no watchdog check without a local
//! host). Nothing here changes the cluster: no record is written (the
//! datastore test uses a scratch file of its own, removed afterwards), the
//! watchdog is not opened (opening arms it), the lab watchdog is not petted,
//! no fence agent is run.
//!
//! Storage and libvirt can hang (a dead NFS server, a stuck libvirtd). Each
//! is checked on a thread of its own, bounded by [`STORAGE_TIMEOUT_MS`] or
//! [`LIBVIRT_TIMEOUT_MS`]; a check that overruns is reported as such and its
//! thread is left behind (it may sit in the kernel until the storage
//! answers).
//!
//! Other hosts' watchdogs, mounts and libvirt cannot be seen from here: run
//! `havirt check` on every host. Their bridges and libvirt networks can,
//! through the inventories their daemons keep on the datastore: `networks`
//! checks every protected domain against every host it may move to.

mod networks;

use crate::config::{self, Config, ConfigWarning, Datastore, FenceMethod, HostConfig, Watchdog};
use crate::daemon::instance::Instance;
use crate::engine::config::{HostId, Profile, Timings};
use crate::engine::time::Duration as EngineDuration;
use crate::fence::watchdog::{SystemdWatchdog, WatchdogError};
use crate::fence::{AgentEnv, FenceChain};
use crate::hypervisor::{Hypervisor, LibvirtHypervisor, LibvirtOptions, POLICY_KEY, POLICY_NS, PolicyError};
use crate::store::block::{BlockStore, Region};
use crate::store::dir::DirStore;
use crate::store::direct::{self, Access, AlignedBlock};
use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::fs::{self, OpenOptions, TryLockError};
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::Duration;

/// The libvirt URI `havirt check` uses unless told otherwise.
pub const DEFAULT_LIBVIRT_URI: &str = "qemu:///system";
/// Connecting to libvirt and reading every domain must finish within this.
pub const LIBVIRT_TIMEOUT_MS: u64 = 10_000;
/// The datastore checks (and the stat of each protected domain's disks)
/// must finish within this; a healthy datastore needs a few milliseconds.
pub const STORAGE_TIMEOUT_MS: u64 = 30_000;
/// Timed write + fdatasync rounds on the scratch file (or reads of the LUN).
pub const LATENCY_SAMPLES: usize = 5;
/// A write slower than io_timeout / this leaves too little headroom: a busy
/// moment on the server then makes heartbeat writes fail (and S4 self-fence).
pub const LATENCY_WARN_DIVISOR: u64 = 2;
/// The `what` column is padded to the longest subject, at most this wide.
const WHAT_WIDTH_MAX: usize = 12;
/// The scratch file in the datastore: `.havirt-check-<host>-<pid>`.
const SCRATCH_PREFIX: &str = ".havirt-check-";
/// Where the network devices of this host are listed.
const SYS_CLASS_NET: &str = "/sys/class/net";
const MOUNTINFO: &str = "/proc/self/mountinfo";

/// How bad a finding is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    Ok,
    /// Works, but not as the operator probably expects, or cannot be checked.
    Warning,
    /// havirt will not start, or will not protect what it should.
    Error,
}

impl Level {
    pub fn label(self) -> &'static str {
        match self {
            Level::Ok => "ok",
            Level::Warning => "warning",
            Level::Error => "error",
        }
    }
}

/// One fact about this host's setup.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Finding {
    pub level: Level,
    /// Short subject, e.g. "datastore".
    pub what: String,
    /// What was found and, if not ok, how to fix it.
    pub detail: String,
}

impl Finding {
    pub fn new(level: Level, what: &str, detail: impl Into<String>) -> Finding {
        Finding { level, what: what.to_owned(), detail: detail.into() }
    }
}

fn ok(what: &str, detail: impl Into<String>) -> Finding {
    Finding::new(Level::Ok, what, detail)
}

fn warning(what: &str, detail: impl Into<String>) -> Finding {
    Finding::new(Level::Warning, what, detail)
}

fn error(what: &str, detail: impl Into<String>) -> Finding {
    Finding::new(Level::Error, what, detail)
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CheckOptions {
    pub config_path: PathBuf,
    /// `--host`: this host's `[[host]]` name; else the machine's host name.
    pub host: Option<String>,
    pub libvirt_uri: String,
}

impl CheckOptions {
    /// The machine's host name and [`DEFAULT_LIBVIRT_URI`].
    pub fn new(config_path: impl Into<PathBuf>) -> CheckOptions {
        CheckOptions { config_path: config_path.into(), host: None, libvirt_uri: DEFAULT_LIBVIRT_URI.to_owned() }
    }
}

/// Run every check; findings in check order.
pub fn run(opts: &CheckOptions) -> Vec<Finding> {
    let mut out = Vec::new();
    let config = check_config(&opts.config_path, &mut out);
    let mut datastore_dir = None;
    if let Some(config) = &config {
        let local = check_local_host(config, opts.host.as_deref(), &mut out);
        check_timings(&config.cluster.timings, &mut out);
        check_key(&config.cluster.key_file, &mut out);
        out.extend(check_datastore(config, local));
        if let Some(host) = local {
            out.push(check_watchdog(host, &config.cluster.timings));
            out.push(check_daemon_instance(config, host));
        }
        check_fencing(config, local, &mut out);
        check_alerts(config, &mut out);
        networks::check(config, local, &opts.libvirt_uri, &mut out);
        out.push(other_hosts_note(config, local));
        if let Datastore::Dir { path } = &config.cluster.datastore {
            datastore_dir = Some(path.clone());
        }
    }
    check_libvirt(&opts.libvirt_uri, datastore_dir, &mut out);
    out
}

/// One line per finding (`level  what  detail`), then "N errors, M warnings".
pub fn render(findings: &[Finding]) -> String {
    let width = findings.iter().map(|f| f.what.chars().count()).max().unwrap_or(0).min(WHAT_WIDTH_MAX);
    let indent = " ".repeat(8 + width + 2);
    let mut s = String::new();
    for f in findings {
        let detail = f.detail.replace('\n', &format!("\n{indent}"));
        let _ = writeln!(s, "{:<8}{:<width$}  {detail}", f.level.label(), f.what);
    }
    let count = |level| findings.iter().filter(|f| f.level == level).count();
    let plural = |n: usize, word: &str| if n == 1 { format!("{n} {word}") } else { format!("{n} {word}s") };
    let _ = writeln!(s, "{}, {}", plural(count(Level::Error), "error"), plural(count(Level::Warning), "warning"));
    s
}

// ---------------------------------------------------------------- config, host, timings, key

fn check_config(path: &Path, out: &mut Vec<Finding>) -> Option<Config> {
    match Config::load(path) {
        Err(e) => {
            out.push(error("config", e.to_string()));
            None
        }
        Ok((config, warnings)) => {
            let detail = format!(
                "{}: cluster \"{}\", {} hosts, profile {}",
                path.display(),
                config.cluster.name,
                config.hosts.len(),
                profile_name(config.cluster.profile)
            );
            out.push(ok("config", detail));
            // A host that can never be taken over automatically is reported
            // by the takeover check, once per host, with what to do.
            let shown = warnings.iter().filter(|w| !matches!(w, ConfigWarning::NoAutomaticTakeover { .. }));
            out.extend(shown.map(|w| warning("config", w.to_string())));
            Some(config)
        }
    }
}

/// As written in the file.
fn profile_name(p: Profile) -> &'static str {
    match p {
        Profile::Fast => "fast",
        Profile::Default => "default",
        Profile::Conservative => "conservative",
    }
}

fn check_local_host<'c>(config: &'c Config, host: Option<&str>, out: &mut Vec<Finding>) -> Option<&'c HostConfig> {
    let (name, how) = match host {
        Some(n) => (n.to_owned(), "--host"),
        None => match config::machine_hostname() {
            Ok(n) => (n, "this machine's host name"),
            Err(e) => {
                out.push(error("host", e.to_string()));
                return None;
            }
        },
    };
    match config.local_host(&name) {
        Ok(h) => {
            out.push(ok("host", format!("this host is \"{}\" (id {}), found by {how} \"{name}\"", h.name, h.id.0)));
            Some(h)
        }
        Err(e) => {
            out.push(error("host", e.to_string()));
            None
        }
    }
}

/// Samples of the running daemon's state before it counts as stuck: a
/// healthy daemon is in D state for a moment at every synchronous write.
const STUCK_SAMPLES: usize = 5;
const STUCK_SAMPLE_INTERVAL: Duration = Duration::from_millis(100);

/// Whether this host's daemon runs (it holds the single-instance lock), and
/// whether it is stuck in uninterruptible I/O, which keeps a new daemon
/// from starting until the storage answers.
fn check_daemon_instance(config: &Config, host: &HostConfig) -> Finding {
    let instance = Instance::of(config, host);
    let Some(holder) = instance.holder() else {
        return ok("daemon", format!("no havirt daemon runs for host \"{}\" here", host.name));
    };
    let stuck = (0..STUCK_SAMPLES).all(|i| {
        if i > 0 {
            std::thread::sleep(STUCK_SAMPLE_INTERVAL);
        }
        instance.holder().is_some_and(|h| h.in_disk_sleep())
    });
    if stuck {
        warning(
            "daemon",
            format!(
                "the havirt daemon of host \"{}\" ({holder}) has been in uninterruptible I/O (state D) for {} ms: \
                 its datastore does not answer; it cannot exit and no new daemon starts until it does. \
                 Repair the storage path, or reboot this host",
                host.name,
                STUCK_SAMPLE_INTERVAL.as_millis() * (STUCK_SAMPLES as u128 - 1)
            ),
        )
    } else {
        ok(
            "daemon",
            format!("the havirt daemon of host \"{}\" runs ({holder}); a second one would refuse to start", host.name),
        )
    }
}

fn check_timings(t: &Timings, out: &mut Vec<Finding>) {
    out.push(match t.validate() {
        Ok(()) => ok(
            "timings",
            format!(
                "safe: a host silent on storage is dead after {} > renew {} + watchdog {} + io {} + 1s margin; a host self-fences after {} without a heartbeat write",
                t.host_dead_timeout, t.renew_timeout, t.watchdog_timeout, t.io_timeout, t.renew_timeout
            ),
        ),
        Err(e) => error("timings", e.to_string()),
    });
}

fn check_key(path: &Path, out: &mut Vec<Finding>) {
    match config::check_key_file(path) {
        Ok(key) => {
            out.push(ok("key", format!("{}: {} bytes, not readable by group or others", path.display(), key.len())));
            let uid = fs::metadata(path).map(|m| m.uid()).unwrap_or(0);
            if uid != 0 {
                let shown = path.display();
                out.push(warning(
                    "key",
                    format!("{shown} is owned by uid {uid}, not root: that user can read the cluster key; run `chown root: {shown}`"),
                ));
            }
        }
        Err(e) => out.push(error("key", e.to_string())),
    }
}

/// Each `[[alert]]` receiver as the daemon would start it: a webhook's
/// secret file must pass the cluster key's checks (the daemon refuses to
/// start otherwise), a command's program must be found. Nothing is sent.
fn check_alerts(config: &Config, out: &mut Vec<Finding>) {
    use crate::config::AlertTarget;
    for a in &config.alerts {
        let what = format!("alert {}", a.name);
        let tries = format!("{} tries of at most {} ms", a.attempts, a.timeout_ms);
        out.push(match &a.target {
            AlertTarget::Webhook { url, secret_file } => {
                let origin = crate::alerts::deliver::url_origin(url);
                match secret_file {
                    None => ok(&what, format!("webhook {origin}, signed with the cluster key, {tries}")),
                    Some(path) => match config::check_key_file(path) {
                        Ok(key) => ok(
                            &what,
                            format!("webhook {origin}, signed with {} ({} bytes), {tries}", path.display(), key.len()),
                        ),
                        Err(e) => error(&what, format!("secret_file: {e}")),
                    },
                }
            }
            AlertTarget::Command { argv } => {
                let program = argv.first().map_or("", String::as_str);
                match AgentEnv::default().find_program(program) {
                    Ok(found) => ok(&what, format!("command {} ({}), {tries}", argv.join(" "), found.display())),
                    Err(why) => {
                        error(&what, format!("command {program}: {why}; install it or name it by its absolute path"))
                    }
                }
            }
        });
    }
}

// ---------------------------------------------------------------- datastore

/// What the datastore checks need, owned, for their thread.
struct StorageInput {
    datastore: Datastore,
    cluster: String,
    /// Names the scratch file, so that two hosts checking at once do not meet.
    host_label: String,
    hosts: Vec<HostId>,
    local: Option<HostId>,
    io_timeout: EngineDuration,
}

fn check_datastore(config: &Config, local: Option<&HostConfig>) -> Vec<Finding> {
    let input = StorageInput {
        datastore: config.cluster.datastore.clone(),
        cluster: config.cluster.name.clone(),
        host_label: local.map_or_else(|| "unknown".to_owned(), |h| h.name.clone()),
        hosts: config.hosts.iter().map(|h| h.id).collect(),
        local: local.map(|h| h.id),
        io_timeout: config.cluster.timings.io_timeout,
    };
    let shown = match &input.datastore {
        Datastore::Dir { path } => path.display().to_string(),
        Datastore::Block { device } => device.display().to_string(),
    };
    let result = bounded(Duration::from_millis(STORAGE_TIMEOUT_MS), move || match &input.datastore {
        Datastore::Dir { path } => check_dir(&input, path),
        Datastore::Block { device } => check_block(&input, device),
    });
    result.unwrap_or_else(|why| {
        vec![error(
            "datastore",
            format!(
                "{shown}: the checks {why} within {} s: the storage hangs (NFS server or path down, LUN gone); check `mount`, the server and the network to it",
                STORAGE_TIMEOUT_MS / 1000
            ),
        )]
    })
}

fn check_dir(input: &StorageInput, path: &Path) -> Vec<Finding> {
    let mut out = Vec::new();
    match fs::metadata(path) {
        Err(e) => {
            out.push(error(
                "datastore",
                format!(
                    "{}: {e}: the datastore directory is missing; mount the shared export at this path on every host (and create the cluster's directory once, havirt init)",
                    path.display()
                ),
            ));
            return out;
        }
        Ok(m) if !m.is_dir() => {
            out.push(error(
                "datastore",
                format!("{} is not a directory; point path at the cluster's datastore directory", path.display()),
            ));
            return out;
        }
        Ok(_) => {}
    }
    out.push(check_dir_layout(path, &input.cluster));
    out.extend(check_mount(path));
    let scratch = path.join(format!("{SCRATCH_PREFIX}{}-{}", input.host_label, std::process::id()));
    out.extend(check_direct_io(&scratch, input.io_timeout));
    out.push(check_lock(&scratch));
    if let Err(e) = fs::remove_file(&scratch)
        && e.kind() != std::io::ErrorKind::NotFound
    {
        out.push(warning(
            "datastore",
            format!("cannot remove the scratch file {}: {e}; remove it by hand", scratch.display()),
        ));
    }
    out
}

/// `path` is the cluster's own directory, used as is (as the daemon opens it).
fn check_dir_layout(path: &Path, cluster: &str) -> Finding {
    match DirStore::open(path, cluster) {
        Ok(_) => ok(
            "datastore",
            format!("{}: havirt's layout is there (hosts, leases, fenced, assign, poison, domains)", path.display()),
        ),
        Err(e) => error("datastore", e.to_string()),
    }
}

/// The filesystem under the datastore: shared, and with locks that reach
/// the server.
fn check_mount(path: &Path) -> Vec<Finding> {
    let real = fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    let mounts = read_mounts();
    let Some(m) = mount_of(&mounts, &real) else {
        return vec![warning(
            "mount",
            format!("{}: its mount is not in {MOUNTINFO}; cannot tell whether it is shared", real.display()),
        )];
    };
    let shown = real.display();
    let mut out = Vec::new();
    if let Some(opt) = local_locks(m) {
        out.push(error(
            "mount",
            format!(
                "{shown} is on {} mounted with {opt}: file locks stay on this host, so two hosts could change one lease at once; remount without nolock and with local_lock=none",
                m.fstype
            ),
        ));
    }
    out.push(match fs_kind(&m.fstype) {
        FsKind::Shared => ok("mount", format!("{shown} is on a shared filesystem ({} at {})", m.fstype, m.point.display())),
        FsKind::Fuse => ok(
            "mount",
            format!("{shown} is on a FUSE filesystem ({} at {}); every host must mount the same export", m.fstype, m.point.display()),
        ),
        FsKind::Local => warning(
            "mount",
            format!(
                "{shown} is on a local filesystem ({} at {}): other hosts see this host's heartbeat and leases only if they share this very directory (a lab on one machine); mount the shared export (NFS) here on every host",
                m.fstype,
                m.point.display()
            ),
        ),
    });
    out
}

/// O_DIRECT write + fdatasync and read back of one block in a scratch file,
/// timed: what a heartbeat write costs.
fn check_direct_io(scratch: &Path, io_timeout: EngineDuration) -> Vec<Finding> {
    let file = match direct::open(scratch, Access::CreateReadWrite) {
        Ok(f) => f,
        Err(e) => return vec![error("o_direct", e.to_string())],
    };
    let mut block = AlignedBlock::zeroed();
    for (i, b) in block.0.iter_mut().enumerate() {
        *b = u8::try_from(i % 251).unwrap_or(0);
    }
    let mut samples = Vec::with_capacity(LATENCY_SAMPLES);
    for _ in 0..LATENCY_SAMPLES {
        match timed(|| direct::write_block(&file, scratch, 0, &block)) {
            (Ok(()), took) => samples.push(took),
            (Err(e), _) => return vec![error("o_direct", e.to_string())],
        }
    }
    let read = direct::read_block(&file, scratch, 0);
    let mut out = vec![match read {
        Ok((back, n)) if n == block.0.len() && back.0 == block.0 => {
            ok("o_direct", format!("{}: O_DIRECT write, fdatasync and read back work", scratch.display()))
        }
        Ok(_) => error(
            "o_direct",
            format!(
                "{}: the block read back with O_DIRECT differs from the one written; the storage loses or reorders writes",
                scratch.display()
            ),
        ),
        Err(e) => error("o_direct", e.to_string()),
    }];
    out.push(latency_finding("write + fdatasync of one 4 KiB block", &mut samples, io_timeout));
    out
}

fn latency_finding(what: &str, samples: &mut [Duration], io_timeout: EngineDuration) -> Finding {
    samples.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let median = samples.get(samples.len() / 2).copied().unwrap_or_default();
    let max = samples.last().copied().unwrap_or_default();
    let limit = Duration::from_millis(io_timeout.as_millis() / LATENCY_WARN_DIVISOR);
    let detail = format!(
        "{what}: median {:.2} ms, max {:.2} ms over {} tries (io_timeout {io_timeout})",
        ms(median),
        ms(max),
        samples.len()
    );
    if max >= limit {
        return warning(
            "latency",
            format!(
                "{detail}: slower than io_timeout / {LATENCY_WARN_DIVISOR}, so a busy moment on the storage fails heartbeat writes; use faster storage or the conservative profile"
            ),
        );
    }
    ok("latency", detail)
}

/// Runs `f` and says how long it took (wall time: this is a measurement).
fn timed<T>(f: impl FnOnce() -> T) -> (T, Duration) {
    #[allow(clippy::disallowed_methods)] // a latency report measures wall time by definition
    let start = std::time::Instant::now();
    let v = f();
    (v, start.elapsed())
}

/// Lease changes run under an exclusive lock on the lease file; take one on
/// the scratch file and release it.
fn check_lock(scratch: &Path) -> Finding {
    let shown = scratch.display();
    // Created if the O_DIRECT check could not create it.
    let mut options = OpenOptions::new();
    options.read(true).write(true).create(true).truncate(false).mode(direct::FILE_MODE);
    let file = match options.open(scratch) {
        Ok(f) => f,
        Err(e) => return error("lock", format!("{shown}: cannot open for locking: {e}")),
    };
    match file.try_lock() {
        Ok(()) => match file.unlock() {
            Ok(()) => ok("lock", format!("{shown}: an exclusive file lock was taken and released")),
            Err(e) => error("lock", format!("{shown}: unlock failed: {e}")),
        },
        Err(TryLockError::WouldBlock) => {
            warning("lock", format!("{shown}: a fresh scratch file is locked by someone else; run havirt check again"))
        }
        Err(TryLockError::Error(e)) => error(
            "lock",
            format!(
                "{shown}: an exclusive file lock fails: {e}; lease changes need locks that the server arbitrates (on NFS: run rpc.statd/lockd for NFSv3, or use NFSv4, and do not mount with nolock)"
            ),
        ),
    }
}

/// The header's layout against this device and this configuration: sector
/// sizes, host slots, the domain table, and that leases and the registry
/// read (the same header on every host means the same LUN).
fn check_block_layout(input: &StorageInput, store: &BlockStore) -> Vec<Finding> {
    let shown = store.path().display();
    let layout = store.layout();
    let mut out = Vec::new();
    let geo = std::fs::File::open(store.path())
        .map_err(|e| e.to_string())
        .and_then(|f| crate::store::block::geometry(store.path(), &f).map_err(|e| e.to_string()));
    match geo {
        Ok(g) => out.push(ok(
            "sector_size",
            format!(
                "{shown}: logical sectors of {} bytes, physical {} bytes; each ballot is one {}-byte sector, so no write tears into a neighbour's",
                g.logical_bytes,
                g.physical_bytes,
                layout.sector.bytes()
            ),
        )),
        Err(e) => out.push(warning("sector_size", format!("{shown}: sector sizes unknown: {e}"))),
    }
    out.push(ok(
        "datastore",
        format!(
            "{shown}: havirt header of cluster \"{}\": {} host slots, {} domain leases, {} bytes used",
            input.cluster,
            layout.max_hosts,
            layout.max_domains,
            layout.device_bytes()
        ),
    ));
    out.push(ok("o_direct", format!("{shown} opens and reads with O_DIRECT")));
    for host in &input.hosts {
        if let Err(e) = layout.block(Region::Slot, *host) {
            out.push(error(
                "datastore",
                format!("{shown}: {e}; reformat the LUN for more hosts (havirt init --max-hosts)"),
            ));
        }
    }
    match store.read_lease(crate::engine::io::LeaseKey::Master).and_then(|_| store.read_registry()) {
        Ok(r) => {
            let used = r.next_index;
            let line = format!(
                "{shown}: leases and registry read; {used} of {} domain table entries used",
                layout.max_domains
            );
            out.push(if u64::from(used) * 5 >= u64::from(layout.max_domains) * 4 {
                warning(
                    "domains",
                    format!("{line}: nearly full, reformat a larger table before it is (havirt init --max-domains)"),
                )
            } else {
                ok("domains", line)
            });
        }
        Err(e) => out.push(error("datastore", format!("{e}"))),
    }
    out
}

fn check_block(input: &StorageInput, device: &Path) -> Vec<Finding> {
    let shown = device.display();
    let mut out = Vec::new();
    match fs::metadata(device) {
        Err(e) => {
            out.push(error("datastore", format!("{shown}: {e}: the shared LUN is not visible on this host; check the iSCSI/FC session and multipath, and name it by /dev/disk/by-id/...")));
            return out;
        }
        Ok(m) if m.is_file() => out.push(error(
            "datastore",
            format!("{shown} is a regular file, not a block device: hosts do not share it as they share a LUN. Name the shared LUN (/dev/disk/by-id/...), or in a lab attach the file as a loop device (losetup -f --show --direct-io=on {shown})"),
        )),
        Ok(_) => {}
    }
    let store = match BlockStore::open(device, &input.cluster) {
        Ok(s) => s,
        Err(e) => {
            out.push(error("datastore", e.to_string()));
            return out;
        }
    };
    out.extend(check_block_layout(input, &store));
    // Writes would overwrite a live record: only reads are timed here.
    let probe = input.local.or(input.hosts.first().copied()).unwrap_or(HostId(0));
    let mut samples = Vec::with_capacity(LATENCY_SAMPLES);
    for _ in 0..LATENCY_SAMPLES {
        match timed(|| store.read_slot(probe)) {
            (Err(e), _) if !matches!(e, crate::store::block::BlockError::Rejected { .. }) => {
                out.push(error("o_direct", e.to_string()));
                return out;
            }
            (_, took) => samples.push(took),
        }
    }
    out.push(latency_finding("O_DIRECT read of one 4 KiB block", &mut samples, input.io_timeout));
    out
}

// ---------------------------------------------------------------- watchdog

/// This host's watchdog, looked at but never opened or petted.
fn check_watchdog(host: &HostConfig, t: &Timings) -> Finding {
    let limit = Duration::from_millis(t.watchdog_timeout.as_millis());
    match &host.watchdog {
        Watchdog::Device { device } => {
            if limit.as_secs() == 0 {
                let e = WatchdogError::TimeoutTooShort { timeout_ms: t.watchdog_timeout.as_millis() };
                return error("watchdog", e.to_string());
            }
            match fs::metadata(device) {
                Err(e) => error(
                    "watchdog",
                    WatchdogError::DeviceOpen { path: device.clone(), reason: e.to_string() }.to_string(),
                ),
                Ok(m) if !m.file_type().is_char_device() => {
                    error("watchdog", WatchdogError::NotADevice { path: device.clone() }.to_string())
                }
                Ok(_) => ok(
                    "watchdog",
                    format!(
                        "{} is a watchdog character device{}; not opened here (opening arms it, and only the daemon may hold it)",
                        device.display(),
                        watchdog_identity(device)
                    ),
                ),
            }
        }
        Watchdog::Systemd => match SystemdWatchdog::new().check(limit) {
            Ok(()) => ok(
                "watchdog",
                format!(
                    "systemd watches this process within watchdog_timeout ({}); the unit must reset the host on a timeout (FailureAction=reboot-immediate)",
                    t.watchdog_timeout
                ),
            ),
            Err(WatchdogError::SystemdNotEnabled) => warning(
                "watchdog",
                format!(
                    "watchdog = \"systemd\", but WATCHDOG_USEC is not set for this process: expected when havirt check runs from a shell, while the daemon refuses to start without it; give havirt.service WatchdogSec= at most {} and a drop-in with FailureAction=reboot-immediate and WatchdogSignal=SIGKILL",
                    t.watchdog_timeout
                ),
            ),
            Err(e) => error("watchdog", e.to_string()),
        },
        Watchdog::Lab { socket } => match fs::metadata(socket) {
            Ok(m) if m.file_type().is_socket() => ok(
                "watchdog",
                format!("lab watchdog socket {} exists; not petted here (a pet arms it)", socket.display()),
            ),
            Ok(_) => error(
                "watchdog",
                format!(
                    "lab watchdog {} is not a socket; point lab_socket at the supervisor's datagram socket",
                    socket.display()
                ),
            ),
            Err(e) => {
                error("watchdog", WatchdogError::LabSend { socket: socket.clone(), reason: e.to_string() }.to_string())
            }
        },
        Watchdog::None => warning(
            "watchdog",
            format!(
                "watchdog = \"none\": nothing resets this host if the daemon hangs or loses storage, so peers never take it over by timeout (S3(b)); takeover of \"{}\" needs a confirmed power fence or `havirt fence confirm {}`; configure a watchdog device (softdog at least)",
                host.name, host.name
            ),
        ),
    }
}

/// ", identity \"iTCO_wdt\"" from sysfs, when the device is a /dev/watchdogN.
fn watchdog_identity(device: &Path) -> String {
    let name = device.file_name().and_then(|n| n.to_str()).unwrap_or("");
    let node = if name == "watchdog" { "watchdog0" } else { name };
    if !node.starts_with("watchdog") {
        return String::new();
    }
    match fs::read_to_string(Path::new("/sys/class/watchdog").join(node).join("identity")) {
        Ok(id) if !id.trim().is_empty() => format!(" (\"{}\")", id.trim()),
        _ => String::new(),
    }
}

// ---------------------------------------------------------------- fencing

fn check_fencing(config: &Config, local: Option<&HostConfig>, out: &mut Vec<Finding>) {
    let env = AgentEnv::default();
    for host in &config.hosts {
        let is_local = local.is_some_and(|l| l.id == host.id);
        let chain = FenceChain::from_host(host, &env);
        for ((name, result), entry) in chain.preflight().into_iter().zip(&host.fence) {
            out.push(match result {
                Ok(()) => ok("fence", format!("{}: \"{name}\" ({}): {}", host.name, entry.method.kind(), ready(&entry.method))),
                Err(e) if is_local => warning(
                    "fence",
                    format!("{}: {e} (this host never fences itself, its peers run this agent: run havirt check on every host)", host.name),
                ),
                Err(e) => error("fence", format!("{}: {e}", host.name)),
            });
        }
        out.push(takeover(host, &config.cluster.timings));
    }
}

/// What a passed preflight of `method` means.
fn ready(method: &FenceMethod) -> &'static str {
    match method {
        FenceMethod::Ipmi { .. } => "ipmitool and the password file are ready here",
        FenceMethod::Command { password_file: Some(_), .. } => "the agent program and the password file are ready here",
        FenceMethod::Command { password_file: None, .. } => "the agent program is ready here",
        FenceMethod::Libvirt { .. } => "virsh is ready here (the hypervisor itself is reached only when fencing)",
        FenceMethod::Storage => "poison on the datastore, nothing to run; counts only after host_dead_timeout",
    }
}

/// How a host's domains get taken over when it fails.
fn takeover(host: &HostConfig, t: &Timings) -> Finding {
    let power: Vec<&str> =
        host.fence.iter().filter(|f| f.method.confirms_power_off()).map(|f| f.name.as_str()).collect();
    let name = &host.name;
    match (power.is_empty(), host.watchdog.resets_host()) {
        (false, true) => ok(
            "takeover",
            format!(
                "{name}: after a confirmed power-off by {}, or after {} of storage silence (its watchdog resets it)",
                power.join(" or "),
                t.host_dead_timeout
            ),
        ),
        (false, false) => ok(
            "takeover",
            format!(
                "{name}: only after a confirmed power-off by {} (no watchdog: never by timeout; if fencing fails, `havirt fence confirm {name}`)",
                power.join(" or ")
            ),
        ),
        (true, true) => ok(
            "takeover",
            format!(
                "{name}: after {} of storage silence (its watchdog resets it); a power fence agent would recover faster",
                t.host_dead_timeout
            ),
        ),
        (true, false) => warning(
            "takeover",
            format!(
                "{name}: neither a watchdog nor a fence agent that confirms power-off: its domains are taken over only after `havirt fence confirm {name}`; add a [[host.fence]] entry (ipmi, command or libvirt) or a watchdog"
            ),
        ),
    }
}

fn other_hosts_note(config: &Config, local: Option<&HostConfig>) -> Finding {
    let others: Vec<&str> =
        config.hosts.iter().filter(|h| local.is_none_or(|l| l.id != h.id)).map(|h| h.name.as_str()).collect();
    ok(
        "cluster",
        format!(
            "the watchdog, mounts and libvirt of {} cannot be seen from here (their bridges and networks come from their inventories): run havirt check on every host",
            others.join(", ")
        ),
    )
}

// ---------------------------------------------------------------- libvirt and domains

/// What the libvirt thread brings back about one domain.
struct DomainFacts {
    name: String,
    policy: Result<bool, PolicyError>,
    autostart: bool,
    /// The persistent definition, read for protected domains only.
    xml: Option<Result<String, String>>,
}

fn gather(uri: &str) -> Result<Vec<DomainFacts>, Finding> {
    let hv = LibvirtHypervisor::open(LibvirtOptions::new(uri)).map_err(|e| {
        error(
            "libvirt",
            format!(
                "cannot connect to {uri}: {e}; start libvirtd (`systemctl start libvirtd`, or `virtlogd -d; libvirtd -d` where systemd is not PID 1) and run havirt check as root"
            ),
        )
    })?;
    let list = hv.list().map_err(|e| error("libvirt", format!("{uri}: listing the domains failed: {e}")))?;
    Ok(list
        .into_iter()
        .map(|d| {
            let protected = matches!(d.policy, Ok(Some(_)));
            let xml = protected.then(|| hv.xml(d.id).map_err(|e| e.to_string()));
            DomainFacts { name: d.name, policy: d.policy.map(|p| p.is_some()), autostart: d.autostart, xml }
        })
        .collect())
}

fn check_libvirt(uri: &str, datastore_dir: Option<PathBuf>, out: &mut Vec<Finding>) {
    let owned = uri.to_owned();
    let facts = match bounded(Duration::from_millis(LIBVIRT_TIMEOUT_MS), move || gather(&owned)) {
        Ok(Ok(facts)) => facts,
        Ok(Err(finding)) => return out.push(finding),
        Err(why) => {
            return out.push(error(
                "libvirt",
                format!(
                    "{uri}: connecting and listing the domains {why} within {} s: libvirtd hangs or is overloaded; check `virsh -c {uri} list` and libvirtd's log",
                    LIBVIRT_TIMEOUT_MS / 1000
                ),
            ));
        }
    };
    let protected = facts.iter().filter(|d| matches!(d.policy, Ok(true))).count();
    out.push(ok("libvirt", format!("{uri}: reachable, {} domains, {protected} with a havirt policy", facts.len())));
    let mut to_check = Vec::new();
    for d in facts {
        match &d.policy {
            Err(e) => out.push(error(
                "domain",
                format!(
                    "{}: its havirt policy does not parse: {e}; fix it with havirt protect or `virsh metadata {} {POLICY_NS} --key {POLICY_KEY} --set '<policy .../>'`",
                    d.name, d.name
                ),
            )),
            Ok(true) => to_check.push(d),
            Ok(false) => {}
        }
    }
    if to_check.is_empty() {
        return;
    }
    let checked =
        bounded(Duration::from_millis(STORAGE_TIMEOUT_MS), move || check_domains(&to_check, datastore_dir.as_deref()));
    out.extend(checked.unwrap_or_else(|why| {
        vec![error(
            "domain",
            format!(
                "looking at the protected domains' disks {why} within {} s: their storage hangs",
                STORAGE_TIMEOUT_MS / 1000
            ),
        )]
    }));
}

fn check_domains(domains: &[DomainFacts], datastore_dir: Option<&Path>) -> Vec<Finding> {
    let mounts = read_mounts();
    let datastore_dev = datastore_dir.and_then(|p| fs::metadata(p).ok()).map(|m| m.dev());
    let mut out = Vec::new();
    for d in domains {
        match &d.xml {
            Some(Ok(xml)) => out.extend(check_domain(d, xml, datastore_dev, &mounts)),
            Some(Err(e)) => out.push(error("domain", format!("{}: cannot read its definition: {e}", d.name))),
            None => {}
        }
    }
    out
}

/// One protected domain: autostart off, disks on shared storage, bridges
/// present. One ok line when all is well, else one line per problem.
fn check_domain(d: &DomainFacts, xml: &str, datastore_dev: Option<u64>, mounts: &[Mount]) -> Vec<Finding> {
    let name = &d.name;
    let mut problems = Vec::new();
    if d.autostart {
        problems.push(warning(
            "domain",
            format!("{name}: autostart is on: libvirtd starts it at boot whether or not this host holds its lease; run `virsh autostart --disable {name}`"),
        ));
    }
    let devices = domain_devices(xml);
    for disk in &devices.disks {
        problems.extend(check_disk(name, disk, datastore_dev, mounts));
    }
    for iface in &devices.interfaces {
        problems.extend(check_interface(name, iface));
    }
    if !problems.is_empty() {
        return problems;
    }
    let devices_here: Vec<&str> = devices.interfaces.iter().map(|i| i.device.as_str()).collect();
    let net = if devices_here.is_empty() {
        String::new()
    } else {
        format!("; {} present here (the network lines say which other hosts have them)", devices_here.join(", "))
    };
    vec![ok("domain", format!("{name}: {} disk(s), all on shared storage{net}", devices.disks.len()))]
}

fn check_disk(domain: &str, disk: &DiskSource, datastore_dev: Option<u64>, mounts: &[Mount]) -> Option<Finding> {
    let path = match disk {
        DiskSource::File(p) => p,
        DiskSource::Device(p) => {
            return match fs::metadata(p) {
                Ok(_) => None,
                Err(e) => Some(error(
                    "domain",
                    format!(
                        "{domain}: disk device {p}: {e}: the domain cannot start on this host; attach the shared LUN here under the same path"
                    ),
                )),
            };
        }
        // Network disks and pool volumes are as shared as their storage.
        DiskSource::Network(_) | DiskSource::Volume(_) => return None,
    };
    let meta = match fs::metadata(path) {
        Ok(m) => m,
        Err(e) => {
            return Some(error(
                "domain",
                format!(
                    "{domain}: disk {path}: {e}: the domain cannot start on this host; mount its storage here, or move the disk to the shared datastore mount"
                ),
            ));
        }
    };
    if datastore_dev == Some(meta.dev()) {
        return None;
    }
    let real = fs::canonicalize(path).unwrap_or_else(|_| PathBuf::from(path));
    let m = mount_of(mounts, &real)?;
    match fs_kind(&m.fstype) {
        FsKind::Shared | FsKind::Fuse => None,
        FsKind::Local => Some(warning(
            "domain",
            format!(
                "{domain}: disk {path} is on a local filesystem ({} at {}), not on the datastore's shared filesystem: after this host fails no other host can start the domain; move the disk to the shared mount",
                m.fstype,
                m.point.display()
            ),
        )),
    }
}

fn check_interface(domain: &str, iface: &HostInterface) -> Option<Finding> {
    let dev = &iface.device;
    let valid = !dev.is_empty() && !dev.contains('/') && dev != "." && dev != "..";
    if valid && Path::new(SYS_CLASS_NET).join(dev).exists() {
        return None;
    }
    let (what, fix) = match iface.kind {
        InterfaceKind::Bridge => {
            ("bridge", "create the bridge here (hosts that name it differently map it with bridge_map)")
        }
        InterfaceKind::Direct => ("macvtap source device", "use the same interface name on every host"),
    };
    Some(error(
        "domain",
        format!(
            "{domain}: {what} \"{dev}\" does not exist on this host ({SYS_CLASS_NET}/{dev}): the domain cannot start here; {fix}"
        ),
    ))
}

// ---------------------------------------------------------------- bounded threads

/// Runs `f` on a thread of its own and waits at most `limit`. `Err` says
/// what happened ("did not finish", "failed") for a message. A thread that
/// overruns is left running.
fn bounded<T: Send + 'static>(limit: Duration, f: impl FnOnce() -> T + Send + 'static) -> Result<T, &'static str> {
    let (tx, rx) = mpsc::sync_channel(1);
    let spawned = std::thread::Builder::new().name("havirt-check".into()).spawn(move || {
        let _ = tx.send(f());
    });
    if spawned.is_err() {
        return Err("could not start (no thread)");
    }
    match rx.recv_timeout(limit) {
        Ok(v) => Ok(v),
        Err(mpsc::RecvTimeoutError::Timeout) => Err("did not finish"),
        Err(mpsc::RecvTimeoutError::Disconnected) => Err("failed (the check panicked)"),
    }
}

// ---------------------------------------------------------------- mounts

/// One line of /proc/self/mountinfo.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Mount {
    point: PathBuf,
    fstype: String,
    /// Per-mount and superblock options, comma-separated.
    options: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum FsKind {
    /// A network or cluster filesystem.
    Shared,
    /// FUSE: shared or not depending on what serves it.
    Fuse,
    Local,
}

/// Network and cluster filesystems: what other hosts can see too.
const SHARED_FS: &[&str] = &[
    "nfs",
    "nfs4",
    "cifs",
    "smb3",
    "ceph",
    "glusterfs",
    "gfs2",
    "ocfs2",
    "lustre",
    "beegfs",
    "gpfs",
    "fuse.glusterfs",
    "fuse.cephfs",
];

fn fs_kind(fstype: &str) -> FsKind {
    if SHARED_FS.contains(&fstype) {
        FsKind::Shared
    } else if fstype.starts_with("fuse.") || fstype == "fuse" {
        FsKind::Fuse
    } else {
        FsKind::Local
    }
}

/// The NFS option that keeps file locks on this client, if any.
fn local_locks(m: &Mount) -> Option<&'static str> {
    if !m.fstype.starts_with("nfs") {
        return None;
    }
    let opts: Vec<&str> = m.options.split(',').collect();
    ["nolock", "local_lock=all", "local_lock=flock"].into_iter().find(|o| opts.contains(o))
}

fn read_mounts() -> Vec<Mount> {
    fs::read_to_string(MOUNTINFO).map(|t| parse_mountinfo(&t)).unwrap_or_default()
}

/// `36 35 98:0 /mnt1 /mnt2 rw,noatime master:1 - ext3 /dev/root rw,errors=continue`
fn parse_mountinfo(text: &str) -> Vec<Mount> {
    let mut out = Vec::new();
    for line in text.lines() {
        let fields: Vec<&str> = line.split(' ').collect();
        let Some(dash) = fields.iter().position(|f| *f == "-") else { continue };
        let (Some(point), Some(opts), Some(fstype)) = (fields.get(4), fields.get(5), fields.get(dash + 1)) else {
            continue;
        };
        let super_opts = fields.get(dash + 3).copied().unwrap_or("");
        out.push(Mount {
            point: PathBuf::from(unescape_octal(point)),
            fstype: (*fstype).to_owned(),
            options: format!("{opts},{super_opts}"),
        });
    }
    out
}

/// mountinfo writes space, tab, newline and backslash as `\040` etc.
fn unescape_octal(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let digits = b.get(i + 1..i + 4).filter(|d| b[i] == b'\\' && d.iter().all(|c| (b'0'..=b'7').contains(c)));
        match digits.and_then(|d| u8::from_str_radix(std::str::from_utf8(d).unwrap_or(""), 8).ok()) {
            Some(c) => {
                out.push(c);
                i += 4;
            }
            None => {
                out.push(b[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The mount that holds `path` (absolute, symlinks resolved): the longest
/// mount point above it; the later of two equal ones (it is on top).
fn mount_of<'m>(mounts: &'m [Mount], path: &Path) -> Option<&'m Mount> {
    let mut best: Option<&Mount> = None;
    for m in mounts.iter().filter(|m| path.starts_with(&m.point)) {
        if best.is_none_or(|b| m.point.components().count() >= b.point.components().count()) {
            best = Some(m);
        }
    }
    best
}

// ---------------------------------------------------------------- domain XML

/// Where a disk's data is.
#[derive(Clone, Debug, PartialEq, Eq)]
enum DiskSource {
    /// `<source file=.../>` (or `dir=`).
    File(String),
    /// `<source dev=.../>`: a block device.
    Device(String),
    /// `<source protocol='rbd' name='pool/img'/>`: "rbd:pool/img".
    Network(String),
    /// `<source pool='p' volume='v'/>`: "p/v".
    Volume(String),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum InterfaceKind {
    /// `<interface type='bridge'><source bridge='br0'/>`.
    Bridge,
    /// `<interface type='direct'><source dev='eth0'/>` (macvtap).
    Direct,
}

/// A host network device a domain plugs into.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct HostInterface {
    kind: InterfaceKind,
    device: String,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct DomainDevices {
    /// In document order; a disk without a source (an empty cdrom) is left out.
    disks: Vec<DiskSource>,
    /// Sorted, without duplicates.
    interfaces: Vec<HostInterface>,
}

/// The disk sources and host network devices of a libvirt domain XML. A
/// small scan, not a full parser: only elements inside `<devices>` count
/// (so `<metadata>` cannot fake a disk), and only a disk's first `<source>`
/// (later ones belong to its backing chain or mirror).
fn domain_devices(xml: &str) -> DomainDevices {
    let mut out = DomainDevices::default();
    let mut interfaces = BTreeSet::new();
    let (mut in_devices, mut disk_open, mut disk_has_source) = (false, false, false);
    let mut iface: Option<Option<InterfaceKind>> = None;
    for tag in tags(xml) {
        match (tag.name, tag.end) {
            ("devices", false) => in_devices = !tag.empty,
            ("devices", true) => in_devices = false,
            ("disk", false) if in_devices => (disk_open, disk_has_source) = (!tag.empty, false),
            ("disk", true) => disk_open = false,
            ("interface", false) if in_devices && !tag.empty => {
                iface = Some(match attr(tag.attrs, "type").as_deref() {
                    Some("bridge") => Some(InterfaceKind::Bridge),
                    Some("direct") => Some(InterfaceKind::Direct),
                    _ => None,
                });
            }
            ("interface", true) => iface = None,
            ("source", false) if disk_open && !disk_has_source => {
                disk_has_source = true;
                out.disks.extend(disk_source(tag.attrs));
            }
            ("source", false) => {
                let attr_name = match iface {
                    Some(Some(InterfaceKind::Bridge)) => Some(("bridge", InterfaceKind::Bridge)),
                    Some(Some(InterfaceKind::Direct)) => Some(("dev", InterfaceKind::Direct)),
                    _ => None,
                };
                if let Some((a, kind)) = attr_name
                    && let Some(device) = attr(tag.attrs, a)
                {
                    interfaces.insert(HostInterface { kind, device });
                }
            }
            _ => {}
        }
    }
    out.interfaces = interfaces.into_iter().collect();
    out
}

fn disk_source(attrs: &str) -> Option<DiskSource> {
    if let Some(f) = attr(attrs, "file").or_else(|| attr(attrs, "dir")) {
        return Some(DiskSource::File(f));
    }
    if let Some(d) = attr(attrs, "dev") {
        return Some(DiskSource::Device(d));
    }
    if let Some(p) = attr(attrs, "protocol") {
        return Some(DiskSource::Network(format!("{p}:{}", attr(attrs, "name").unwrap_or_default())));
    }
    let pool = attr(attrs, "pool")?;
    Some(DiskSource::Volume(format!("{pool}/{}", attr(attrs, "volume").unwrap_or_default())))
}

/// One start, end or empty-element tag.
struct Tag<'a> {
    name: &'a str,
    /// `</name>`.
    end: bool,
    /// `<name/>`.
    empty: bool,
    /// The text between the name and `>` (or `/>`).
    attrs: &'a str,
}

/// Every element tag of `xml`, skipping comments, processing instructions,
/// CDATA and declarations. A `>` inside a quoted attribute value does not
/// end the tag.
fn tags(xml: &str) -> Vec<Tag<'_>> {
    let mut out = Vec::new();
    let mut rest = xml;
    while let Some(lt) = rest.find('<') {
        rest = &rest[lt..];
        let skip = [("<!--", "-->"), ("<![CDATA[", "]]>"), ("<?", "?>"), ("<!", ">")];
        if let Some((_, close)) = skip.iter().find(|(open, _)| rest.starts_with(open)) {
            rest = rest.find(close).map_or("", |i| &rest[i + close.len()..]);
            continue;
        }
        let Some(gt) = tag_end(rest) else { break };
        let inner = &rest[1..gt];
        rest = &rest[gt + 1..];
        let (end, inner) = match inner.strip_prefix('/') {
            Some(i) => (true, i),
            None => (false, inner),
        };
        let (empty, inner) = match inner.strip_suffix('/') {
            Some(i) => (true, i),
            None => (false, inner),
        };
        let split = inner.find(|c: char| c.is_ascii_whitespace()).unwrap_or(inner.len());
        out.push(Tag { name: &inner[..split], end, empty, attrs: &inner[split..] });
    }
    out
}

/// Index of the `>` that closes the tag starting at `s[0]`, outside quotes.
fn tag_end(s: &str) -> Option<usize> {
    let mut quote = None;
    for (i, c) in s.char_indices().skip(1) {
        match quote {
            Some(q) if c == q => quote = None,
            Some(_) => {}
            None if c == '\'' || c == '"' => quote = Some(c),
            None if c == '>' => return Some(i),
            None => {}
        }
    }
    None
}

/// The value of attribute `name` (exactly that name), entities decoded.
fn attr(attrs: &str, name: &str) -> Option<String> {
    let mut rest = attrs;
    loop {
        rest = rest.trim_start();
        let eq = rest.find('=')?;
        let key = rest[..eq].trim();
        let after = rest[eq + 1..].trim_start();
        let quote = after.chars().next().filter(|c| *c == '\'' || *c == '"')?;
        let close = after[1..].find(quote)? + 1;
        if key == name {
            return Some(unescape_xml(&after[1..close]));
        }
        rest = &after[close + 1..];
    }
}

fn unescape_xml(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(amp) = rest.find('&') {
        out.push_str(&rest[..amp]);
        rest = &rest[amp..];
        let Some(semi) = rest.find(';') else { break };
        let entity = &rest[1..semi];
        let c = match entity {
            "lt" => Some('<'),
            "gt" => Some('>'),
            "amp" => Some('&'),
            "apos" => Some('\''),
            "quot" => Some('"'),
            e => e
                .strip_prefix("#x")
                .map(|h| u32::from_str_radix(h, 16))
                .or_else(|| e.strip_prefix('#').map(str::parse::<u32>))
                .and_then(Result::ok)
                .and_then(char::from_u32),
        };
        match c {
            Some(c) => {
                out.push(c);
                rest = &rest[semi + 1..];
            }
            None => {
                out.push('&');
                rest = &rest[1..];
            }
        }
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const DOMAIN: &str = r#"<domain type='kvm'>
  <name>web1</name>
  <metadata>
    <havirt:policy xmlns:havirt="https://havirt.dev/xmlns/policy/1" priority="high"/>
    <other:x xmlns:other="urn:x"><disk><source file='/fake/in/metadata'/></disk></other:x>
  </metadata>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <!-- <disk><source file='/commented/out'/></disk> -->
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2' cache='none'/>
      <source file='/mnt/nfs/images/web1 &amp; co.qcow2' index='2'/>
      <backingStore type='file'>
        <format type='qcow2'/>
        <source file='/var/lib/libvirt/images/base.qcow2'/>
      </backingStore>
      <target dev='vda' bus='virtio'/>
    </disk>
    <disk type="block" device="disk"><source dev="/dev/disk/by-id/wwn-0x5000"/><target dev="vdb"/></disk>
    <disk type='network' device='disk'>
      <source protocol='rbd' name='pool/img'><host name='mon1' port='6789'/></source>
    </disk>
    <disk type='volume'><source pool='default' volume='v1.qcow2'/></disk>
    <disk type='file' device='cdrom'><target dev='sda' bus='sata'/><readonly/></disk>
    <interface type='bridge'><mac address='52:54:00:00:00:01'/><source bridge='br0'/><model type='virtio'/></interface>
    <interface type='bridge'><source bridge='br0'/></interface>
    <interface type='direct'><source dev='eno1' mode='bridge'/></interface>
    <interface type='network'><source network='default'/></interface>
    <hostdev mode='subsystem' type='usb'><source><vendor id='0x1'/></source></hostdev>
  </devices>
</domain>"#;

    #[test]
    fn disks_are_the_first_source_of_each_disk_in_devices() {
        let d = domain_devices(DOMAIN);
        assert_eq!(
            d.disks,
            vec![
                DiskSource::File("/mnt/nfs/images/web1 & co.qcow2".into()),
                DiskSource::Device("/dev/disk/by-id/wwn-0x5000".into()),
                DiskSource::Network("rbd:pool/img".into()),
                DiskSource::Volume("default/v1.qcow2".into()),
            ]
        );
    }

    #[test]
    fn bridges_and_macvtap_devices_are_listed_once() {
        let d = domain_devices(DOMAIN);
        let iface = |kind, device: &str| HostInterface { kind, device: device.into() };
        assert_eq!(d.interfaces, vec![iface(InterfaceKind::Bridge, "br0"), iface(InterfaceKind::Direct, "eno1")]);
    }

    #[test]
    fn a_domain_without_devices_has_none() {
        assert_eq!(domain_devices("<domain><name>x</name><devices/></domain>"), DomainDevices::default());
        assert_eq!(domain_devices(""), DomainDevices::default());
        assert_eq!(domain_devices("<domain><devices><disk><source file='/x'"), DomainDevices::default());
    }

    #[test]
    fn attributes_match_whole_names_and_both_quotes() {
        assert_eq!(attr(" xfile='/a' file=\"/b\"", "file"), Some("/b".into()));
        assert_eq!(attr(" a = 'x>y' b='2'", "b"), Some("2".into()));
        assert_eq!(attr(" a='1'", "b"), None);
        assert_eq!(attr(" a=unquoted", "a"), None);
        assert_eq!(unescape_xml("&lt;&#x41;&#66;&apos;&bogus;&"), "<AB'&bogus;&");
        let t = tags("<a x='>'/><b>");
        assert_eq!((t[0].name, t[0].empty, t[0].attrs), ("a", true, " x='>'"));
        assert_eq!((t[1].name, t[1].empty, t[1].end), ("b", false, false));
    }

    #[test]
    fn render_pads_columns_and_counts() {
        let findings = vec![
            ok("datastore", "/mnt/x: fine"),
            warning("key", "owned by uid 1000\nsecond line"),
            error("libvirt", "down"),
            error("domain", "bad"),
        ];
        let text = render(&findings);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "ok      datastore  /mnt/x: fine");
        assert_eq!(lines[1], "warning key        owned by uid 1000");
        assert_eq!(lines[2], format!("{}second line", " ".repeat(19)));
        assert_eq!(lines[3], "error   libvirt    down");
        assert_eq!(lines.last().copied(), Some("2 errors, 1 warning"));
        assert_eq!(render(&[]), "0 errors, 0 warnings\n");
    }

    #[test]
    fn levels_order_by_severity() {
        assert!(Level::Ok < Level::Warning && Level::Warning < Level::Error);
        assert_eq!(Level::Warning.label(), "warning");
    }

    const MOUNTINFO_TEXT: &str = "\
22 1 254:0 / / rw,relatime shared:1 - ext4 /dev/vda rw
30 22 0:40 / /mnt/nfs rw,relatime shared:2 - nfs4 srv:/export rw,vers=4.2,local_lock=none,addr=10.0.0.1
31 22 0:41 / /mnt/old rw shared:3 - nfs srv:/old rw,vers=3,nolock,addr=10.0.0.1
32 22 0:42 / /mnt/my\\040disk rw shared:4 - fuse.sshfs x rw
33 22 0:43 / /mnt/nfs rw shared:5 - tmpfs tmpfs rw
";

    #[test]
    fn mountinfo_finds_the_mount_on_top() {
        let mounts = parse_mountinfo(MOUNTINFO_TEXT);
        assert_eq!(mounts.len(), 5);
        let of = |p: &str| mount_of(&mounts, Path::new(p)).map(|m| m.fstype.as_str());
        assert_eq!(of("/var/tmp"), Some("ext4"));
        assert_eq!(of("/mnt/nfs/.havirt/lab"), Some("tmpfs"), "the later mount on one point is on top");
        assert_eq!(of("/mnt/nfsother"), Some("ext4"), "a mount point is a whole path component");
        assert_eq!(of("/mnt/my disk/a"), Some("fuse.sshfs"));
        assert_eq!(fs_kind("nfs4"), FsKind::Shared);
        assert_eq!(fs_kind("fuse.sshfs"), FsKind::Fuse);
        assert_eq!(fs_kind("ext4"), FsKind::Local);
        assert_eq!(local_locks(&mounts[1]), None);
        assert_eq!(local_locks(&mounts[2]), Some("nolock"));
        assert_eq!(unescape_octal("a\\134b\\09"), "a\\b\\09");
    }

    #[test]
    fn bounded_reports_overruns_and_panics() {
        assert_eq!(bounded(Duration::from_secs(5), || 7), Ok(7));
        let slow = bounded(Duration::from_millis(10), || std::thread::sleep(Duration::from_secs(1)));
        assert_eq!(slow, Err("did not finish"));
        let panicked: Result<(), _> = bounded(Duration::from_secs(5), || panic!("test"));
        assert!(panicked.is_err());
    }
}
