//! Golden scenarios, in the manner of Proxmox ha-manager's `src/test/`: a
//! directory `tests/scenarios/<area>-<case>/` holds
//!
//! - `README`: one sentence of intent (what must happen, what must not);
//! - `cluster.toml`: timing profile, hosts, protected domains and policies;
//! - `cmdlist`: timed faults and operator commands;
//! - `log.expect`: the expected event log (compared by `tests/golden.rs`,
//!   written only under `HAVIRT_BLESS=1`).
//!
//! `cmdlist` holds one command per line, `<seconds> <words...>`. Seconds may
//! be fractional (`12.5`, at most millisecond precision) and never go
//! backwards; `#` starts a comment; blank lines are ignored. H is a host name
//! and D a domain name from `cluster.toml`. Every command word:
//!
//! ```text
//! power off H
//! power on H
//! partition H1,H2 | H3          two-way; groups split by `|`, hosts by `,`
//! drop H1 -> H2                 one-way: packets from H1 to H2 are lost
//! heal                          remove every partition and one-way drop
//! isolate H
//! unisolate H
//! loss PERCENT                  random loss on every link, 0-100
//! storage fail H|all            every I/O fails with EIO (`all`: each host)
//! storage hang H|all            every I/O blocks until restored
//! storage readonly H|all        writes fail with EIO, reads work
//! storage restore H|all
//! storage stall SECONDS         all storage I/O blocks this long
//! pause H
//! resume H
//! libvirt hang H               libvirtd stops answering; killing qemu works
//! libvirt stuck H              libvirtd hangs and qemu cannot be killed
//! libvirt ok H
//! daemon crash H
//! daemon stop H                SIGTERM: a stop on purpose; its watchdog device stays armed
//! daemon stop-systemd H        the same with systemd's service watchdog, which the stop ends
//! daemon start H
//! fence fail H AGENT            the agent (named in H's `fence`) fails
//! fence hang H AGENT            the agent never answers (fence_timeout)
//! fence ok H AGENT
//! domain crash D                its qemu dies wherever it runs
//! domain break D                every start of D fails from now on
//! domain fix D
//! confirm H                     the operator confirms H is powered off
//! protect D H                   havirt protect: lease to H, registry, adopt
//! protect D                     the same, wherever D runs (nowhere: the
//!                               master starts it)
//! unprotect D                   D keeps running, unmanaged
//! guest hang D                  D's guest hangs (agent silent) until a reset
//! guest hang-always D           ...and at every boot after it (a broken OS)
//! guest recover D               its guest boots normally again
//! guest shutdown D              the guest powers itself off (on purpose)
//! guest destroy D               the operator runs `virsh destroy D`
//! start D H                     the operator runs `havirt start D` on H
//! end                           required, last: the run stops here
//! ```

use super::SimSetup;
use super::faults::{AgentMode, Command, StorageFault};
use crate::engine::config::{
    AdmissionMode, AdmissionPolicy, ClusterSpec, DomainId, DomainPolicy, DomainSpec, GuestMonitor, HostId, HostSpec,
    IsolationResponse, OnShutdown, Priority, Profile, Readiness,
};
use crate::engine::time::Duration;
use serde::Deserialize;
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// One golden scenario, ready to run.
#[derive(Clone, Debug)]
pub struct Scenario {
    /// The directory name, e.g. `power-fenced`.
    pub name: String,
    pub setup: SimSetup,
    /// Commands in time order (milliseconds of simulated time).
    pub commands: Vec<(u64, Command)>,
    /// The run stops at this simulated time (the `end` command).
    pub end_ms: u64,
}

/// The first words `cmdlist` accepts, for error messages.
const COMMAND_WORDS: &str = "power, partition, drop, heal, isolate, unisolate, loss, storage, \
     pause, resume, daemon, fence, domain, confirm, protect, unprotect, guest, start, end";

/// Why a scenario directory cannot be loaded. Every message names the file
/// (and, for `cmdlist`, the line) and says what was expected.
/// `PartialEq` only: `Overfull` carries the capacity as `f64`.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ScenarioError {
    #[error("{file}: cannot read: {reason}")]
    Read { file: String, reason: String },
    #[error("{file}: is empty; write one sentence of intent (what must happen, what must not)")]
    EmptyReadme { file: String },
    #[error("{file}: {reason}")]
    Toml { file: String, reason: String },
    #[error("{file}: {reason}")]
    Invalid { file: String, reason: String },
    #[error("{file}: domain '{domain}' names unknown host '{word}' in `{field}` (hosts: {known})")]
    DomainHost { file: String, domain: String, field: &'static str, word: String, known: String },
    #[error(
        "{file}: domain '{domain}': readiness '{word}' is not one of started, guest_agent, tcp:PORT (PORT 1-65535)"
    )]
    BadReadiness { file: String, domain: String, word: String },
    #[error(
        "{file}: host '{host}' is over capacity at time 0: its domains need {need_mib} MiB and {need_vcpus} vCPUs, it offers {have_mib} MiB and {have_vcpus} vCPUs (with overcommit); move a domain or enlarge the host"
    )]
    Overfull { file: String, host: String, need_mib: u64, need_vcpus: u64, have_mib: f64, have_vcpus: f64 },
    #[error("{file}:{line}: missing command after the time (expected one of: {COMMAND_WORDS})")]
    MissingCommand { file: String, line: usize },
    #[error("{file}:{line}: unknown command '{word}' (expected one of: {COMMAND_WORDS})")]
    UnknownCommand { file: String, line: usize, word: String },
    #[error("{file}:{line}: '{command}' expects {expected}, found {found}")]
    BadArguments { file: String, line: usize, command: String, expected: &'static str, found: String },
    #[error("{file}:{line}: unknown host '{word}' (hosts: {known})")]
    UnknownHost { file: String, line: usize, word: String, known: String },
    #[error("{file}:{line}: unknown domain '{word}' (domains: {known})")]
    UnknownDomain { file: String, line: usize, word: String, known: String },
    #[error("{file}:{line}: host '{host}' has no fence agent '{word}' (its agents: {known})")]
    UnknownAgent { file: String, line: usize, host: String, word: String, known: String },
    #[error("{file}:{line}: bad {what} '{word}' (expected {expected})")]
    BadNumber { file: String, line: usize, what: &'static str, word: String, expected: &'static str },
    #[error(
        "{file}:{line}: time {word} goes backwards (the previous command is at {previous_ms} ms); keep cmdlist in time order"
    )]
    TimeBackwards { file: String, line: usize, word: String, previous_ms: u64 },
    #[error(
        "{file}:{line}: bad partition '{found}': {reason} (expected groups split by '|', hosts by ',', e.g. 'partition h1,h2 | h3')"
    )]
    BadPartition { file: String, line: usize, found: String, reason: String },
    #[error("{file}:{line}: '{found}' comes after 'end'; 'end' must be the last command")]
    AfterEnd { file: String, line: usize, found: String },
    #[error("{file}: no 'end' command; add a last line such as '120 end'")]
    MissingEnd { file: String },
}

/// Load and check a scenario directory (everything but `log.expect`).
pub fn load(dir: &Path) -> Result<Scenario, ScenarioError> {
    let name = match dir.file_name() {
        Some(n) => n.to_string_lossy().into_owned(),
        None => dir.display().to_string(),
    };
    let readme_path = dir.join("README");
    if read(&readme_path)?.trim().is_empty() {
        return Err(ScenarioError::EmptyReadme { file: readme_path.display().to_string() });
    }
    let cluster_path = dir.join("cluster.toml");
    let cluster_file = cluster_path.display().to_string();
    let setup = parse_cluster(&name, &read(&cluster_path)?, &cluster_file)?;
    let cmdlist_path = dir.join("cmdlist");
    let cmdlist_file = cmdlist_path.display().to_string();
    let (commands, end_ms) = parse_cmdlist(&read(&cmdlist_path)?, &cmdlist_file, &setup.spec)?;
    Ok(Scenario { name, setup, commands, end_ms })
}

fn read(path: &Path) -> Result<String, ScenarioError> {
    std::fs::read_to_string(path)
        .map_err(|e| ScenarioError::Read { file: path.display().to_string(), reason: e.to_string() })
}

// ---------------------------------------------------------------- cluster.toml

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ClusterFile {
    profile: Profile,
    /// The datastore's backend: `dir` (default) or `block`.
    #[serde(default)]
    kind: super::block::DatastoreKind,
    #[serde(default = "default_seed")]
    seed: u64,
    #[serde(default = "default_memory_overcommit")]
    memory_overcommit: f64,
    #[serde(default = "default_vcpu_overcommit")]
    vcpu_overcommit: f64,
    #[serde(rename = "host", default)]
    hosts: Vec<HostEntry>,
    #[serde(rename = "domain", default)]
    domains: Vec<DomainEntry>,
    /// As `[cluster]` in havirt.toml: "off", "warn" (default), "strict".
    #[serde(default)]
    admission: AdmissionMode,
    #[serde(default = "default_tolerate_host_failures")]
    tolerate_host_failures: u32,
    #[serde(default)]
    tolerate_fault_domain_failures: u32,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct HostEntry {
    name: String,
    memory_mib: u64,
    vcpus: u32,
    #[serde(default)]
    fence: Vec<String>,
    #[serde(default = "default_true")]
    watchdog: bool,
    fault_domain: Option<String>,
    #[serde(default = "default_max_concurrent_starts")]
    max_concurrent_starts: u32,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DomainEntry {
    name: String,
    memory_mib: u64,
    vcpus: u32,
    host: String,
    priority: Option<Priority>,
    isolation_response: Option<IsolationResponse>,
    #[serde(default)]
    affinity: Vec<String>,
    anti_affinity: Option<String>,
    readiness: Option<String>,
    readiness_timeout_s: Option<u64>,
    max_restarts: Option<u32>,
    /// `stop` (default) or `restart`.
    on_shutdown: Option<OnShutdown>,
    /// Guest-agent monitoring and its settings (defaults: GuestMonitor).
    #[serde(default)]
    guest_monitor: bool,
    monitor_failure_interval_s: Option<u64>,
    monitor_min_uptime_s: Option<u64>,
    monitor_max_resets: Option<u32>,
    monitor_reset_window_s: Option<u64>,
    /// `false`: runs on `host` unprotected at time zero (see `protect`).
    #[serde(default = "default_true")]
    protected: bool,
}

fn default_seed() -> u64 {
    1
}
fn default_memory_overcommit() -> f64 {
    1.0
}
fn default_vcpu_overcommit() -> f64 {
    4.0
}
fn default_tolerate_host_failures() -> u32 {
    AdmissionPolicy::default().host_failures
}
fn default_true() -> bool {
    true
}
fn default_max_concurrent_starts() -> u32 {
    4
}

/// `cluster.toml` text into a setup. `name` becomes the cluster name.
fn parse_cluster(name: &str, text: &str, file: &str) -> Result<SimSetup, ScenarioError> {
    let raw: ClusterFile = toml::from_str(text)
        .map_err(|e| ScenarioError::Toml { file: file.to_string(), reason: e.to_string().trim_end().to_string() })?;
    let invalid = |reason: String| ScenarioError::Invalid { file: file.to_string(), reason };
    for (key, v) in [("memory_overcommit", raw.memory_overcommit), ("vcpu_overcommit", raw.vcpu_overcommit)] {
        if !(v.is_finite() && v > 0.0) {
            return Err(invalid(format!("{key} = {v} must be a number greater than 0")));
        }
    }
    let hosts = build_hosts(&raw.hosts, file)?;
    let mut domains = BTreeMap::new();
    let mut initial = BTreeMap::new();
    let mut unprotected = BTreeSet::new();
    let mut names = BTreeSet::new();
    for (i, entry) in raw.domains.iter().enumerate() {
        if !names.insert(entry.name.as_str()) {
            return Err(invalid(format!("domain '{}' is defined twice", entry.name)));
        }
        check_name(&entry.name, "domain", file)?;
        let id = DomainId(i as u128 + 1);
        let (spec, host) = build_domain(id, entry, &hosts, file)?;
        domains.insert(id, spec);
        initial.insert(id, host);
        if !entry.protected {
            unprotected.insert(id);
        }
    }
    let spec = ClusterSpec {
        name: name.to_string(),
        timings: raw.profile.timings(),
        hosts,
        domains,
        memory_overcommit: raw.memory_overcommit,
        vcpu_overcommit: raw.vcpu_overcommit,
        admission: AdmissionPolicy {
            mode: raw.admission,
            host_failures: raw.tolerate_host_failures,
            fault_domain_failures: raw.tolerate_fault_domain_failures,
        },
    };
    check_capacity(&spec, &initial, file)?;
    Ok(SimSetup { spec, initial, unprotected, seed: raw.seed, datastore: raw.kind })
}

/// Names are words of `cmdlist`: no separators, and `all` is a keyword.
fn check_name(name: &str, what: &str, file: &str) -> Result<(), ScenarioError> {
    let ok = !name.is_empty()
        && name != "all"
        && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if ok {
        return Ok(());
    }
    Err(ScenarioError::Invalid {
        file: file.to_string(),
        reason: format!(
            "{what} name '{name}' must be letters, digits, '-', '_' or '.' (and not 'all'), as cmdlist refers to it"
        ),
    })
}

fn build_hosts(entries: &[HostEntry], file: &str) -> Result<Vec<HostSpec>, ScenarioError> {
    let invalid = |reason: String| ScenarioError::Invalid { file: file.to_string(), reason };
    if entries.is_empty() {
        return Err(invalid("no [[host]] entries; a cluster needs at least one host".into()));
    }
    let mut hosts: Vec<HostSpec> = Vec::with_capacity(entries.len());
    for (i, h) in entries.iter().enumerate() {
        check_name(&h.name, "host", file)?;
        if hosts.iter().any(|o| o.name == h.name) {
            return Err(invalid(format!("host '{}' is defined twice", h.name)));
        }
        if h.memory_mib == 0 || h.vcpus == 0 || h.max_concurrent_starts == 0 {
            return Err(invalid(format!(
                "host '{}': memory_mib, vcpus and max_concurrent_starts must be at least 1",
                h.name
            )));
        }
        let id = u16::try_from(i + 1).map_err(|_| invalid(format!("too many hosts (at most {})", u16::MAX)))?;
        hosts.push(HostSpec {
            id: HostId(id),
            name: h.name.clone(),
            fence_agents: h.fence.clone(),
            watchdog: h.watchdog,
            fault_domain: h.fault_domain.clone(),
            memory_mib: h.memory_mib,
            vcpus: h.vcpus,
            max_concurrent_starts: h.max_concurrent_starts,
        });
    }
    Ok(hosts)
}

fn host_names(hosts: &[HostSpec]) -> String {
    hosts.iter().map(|h| h.name.as_str()).collect::<Vec<_>>().join(", ")
}

fn build_domain(
    id: DomainId,
    d: &DomainEntry,
    hosts: &[HostSpec],
    file: &str,
) -> Result<(DomainSpec, HostId), ScenarioError> {
    let lookup = |field: &'static str, word: &str| {
        hosts.iter().find(|h| h.name == word).map(|h| h.id).ok_or_else(|| ScenarioError::DomainHost {
            file: file.to_string(),
            domain: d.name.clone(),
            field,
            word: word.to_string(),
            known: host_names(hosts),
        })
    };
    let host = lookup("host", &d.host)?;
    let affinity = d.affinity.iter().map(|w| lookup("affinity", w)).collect::<Result<Vec<_>, _>>()?;
    if !affinity.is_empty() && !affinity.contains(&host) {
        return Err(ScenarioError::Invalid {
            file: file.to_string(),
            reason: format!(
                "domain '{}' runs on '{}' at time 0, outside its affinity; add the host to `affinity` or move the domain",
                d.name, d.host
            ),
        });
    }
    let defaults = DomainPolicy::default();
    let readiness = match &d.readiness {
        None => defaults.readiness,
        Some(word) => parse_readiness(word).ok_or_else(|| ScenarioError::BadReadiness {
            file: file.to_string(),
            domain: d.name.clone(),
            word: word.clone(),
        })?,
    };
    let policy = DomainPolicy {
        priority: d.priority.unwrap_or(defaults.priority),
        isolation_response: d.isolation_response.unwrap_or(defaults.isolation_response),
        affinity,
        anti_affinity: d.anti_affinity.clone(),
        readiness,
        readiness_timeout: d.readiness_timeout_s.map_or(defaults.readiness_timeout, Duration::from_secs),
        max_restarts: d.max_restarts.unwrap_or(defaults.max_restarts),
        on_shutdown: d.on_shutdown.unwrap_or(defaults.on_shutdown),
        monitor: monitor_policy(d),
    };
    let spec = DomainSpec { id, name: d.name.clone(), memory_mib: d.memory_mib, vcpus: d.vcpus, policy };
    Ok((spec, host))
}

fn monitor_policy(d: &DomainEntry) -> GuestMonitor {
    let m = GuestMonitor::default();
    let secs = |v: Option<u64>, default: Duration| v.map_or(default, Duration::from_secs);
    GuestMonitor {
        enabled: d.guest_monitor,
        failure_interval: secs(d.monitor_failure_interval_s, m.failure_interval),
        min_uptime: secs(d.monitor_min_uptime_s, m.min_uptime),
        max_resets: d.monitor_max_resets.unwrap_or(m.max_resets),
        reset_window: secs(d.monitor_reset_window_s, m.reset_window),
    }
}

fn parse_readiness(word: &str) -> Option<Readiness> {
    match word {
        "started" => Some(Readiness::Started),
        "guest_agent" => Some(Readiness::GuestAgent),
        _ => {
            let port: u16 = word.strip_prefix("tcp:")?.parse().ok()?;
            (port != 0).then_some(Readiness::TcpPort(port))
        }
    }
}

/// The starting placement must fit, or the scenario tests a broken cluster.
fn check_capacity(spec: &ClusterSpec, initial: &BTreeMap<DomainId, HostId>, file: &str) -> Result<(), ScenarioError> {
    for host in &spec.hosts {
        let (mut need_mib, mut need_vcpus) = (0u64, 0u64);
        for (id, _) in initial.iter().filter(|(_, h)| **h == host.id) {
            let d = &spec.domains[id];
            need_mib += d.memory_mib;
            need_vcpus += u64::from(d.vcpus);
        }
        let have_mib = host.memory_mib as f64 * spec.memory_overcommit;
        let have_vcpus = f64::from(host.vcpus) * spec.vcpu_overcommit;
        if need_mib as f64 > have_mib || need_vcpus as f64 > have_vcpus {
            return Err(ScenarioError::Overfull {
                file: file.to_string(),
                host: host.name.clone(),
                need_mib,
                need_vcpus,
                have_mib,
                have_vcpus,
            });
        }
    }
    Ok(())
}

// --------------------------------------------------------------------- cmdlist

/// `cmdlist` text into timed commands and the end time.
fn parse_cmdlist(text: &str, file: &str, spec: &ClusterSpec) -> Result<(Vec<(u64, Command)>, u64), ScenarioError> {
    let mut commands = Vec::new();
    let mut previous_ms = 0;
    let mut end_ms = None;
    for (index, raw) in text.lines().enumerate() {
        let content = raw.split('#').next().unwrap_or("").trim();
        if content.is_empty() {
            continue;
        }
        let ctx = Line { file, line: index + 1, spec };
        if end_ms.is_some() {
            return Err(ScenarioError::AfterEnd { file: file.to_string(), line: ctx.line, found: content.to_string() });
        }
        let words: Vec<&str> = content.split_whitespace().collect();
        let at_ms = ctx.time(words[0], previous_ms)?;
        previous_ms = at_ms;
        match ctx.command(&words[1..])? {
            Parsed::End => end_ms = Some(at_ms),
            Parsed::Commands(list) => commands.extend(list.into_iter().map(|c| (at_ms, c))),
        }
    }
    let end_ms = end_ms.ok_or_else(|| ScenarioError::MissingEnd { file: file.to_string() })?;
    Ok((commands, end_ms))
}

/// Seconds with at most three decimals (`12`, `12.5`, `0.250`) into
/// milliseconds, without going through floating point.
fn seconds_to_ms(word: &str) -> Option<u64> {
    let (int, frac) = match word.split_once('.') {
        Some((i, f)) if !f.is_empty() => (i, f),
        Some(_) => return None,
        None => (word, ""),
    };
    let digits = |s: &str| s.chars().all(|c| c.is_ascii_digit());
    if int.is_empty() || !digits(int) || !digits(frac) || frac.len() > 3 {
        return None;
    }
    let frac_ms: u64 = if frac.is_empty() { 0 } else { format!("{frac:0<3}").parse().ok()? };
    int.parse::<u64>().ok()?.checked_mul(1000)?.checked_add(frac_ms)
}

enum Parsed {
    Commands(Vec<Command>),
    End,
}

/// One `cmdlist` line being parsed: where it is, and the names it may use.
struct Line<'a> {
    file: &'a str,
    line: usize,
    spec: &'a ClusterSpec,
}

impl Line<'_> {
    fn time(&self, word: &str, previous_ms: u64) -> Result<u64, ScenarioError> {
        let at_ms = seconds_to_ms(word).ok_or_else(|| ScenarioError::BadNumber {
            file: self.file.to_string(),
            line: self.line,
            what: "time",
            word: word.to_string(),
            expected: "seconds such as 10 or 12.5, at most 3 decimals, before the command",
        })?;
        if at_ms < previous_ms {
            return Err(ScenarioError::TimeBackwards {
                file: self.file.to_string(),
                line: self.line,
                word: word.to_string(),
                previous_ms,
            });
        }
        Ok(at_ms)
    }

    fn command(&self, words: &[&str]) -> Result<Parsed, ScenarioError> {
        let Some((&word, args)) = words.split_first() else {
            return Err(ScenarioError::MissingCommand { file: self.file.to_string(), line: self.line });
        };
        let one = |c: Command| Ok(Parsed::Commands(vec![c]));
        match word {
            "end" => self.args::<0>(word, "nothing", args).map(|_| Parsed::End),
            "heal" => self.args::<0>(word, "nothing", args).and(one(Command::HealNetwork)),
            "power" => self.power(args).map(|c| Parsed::Commands(vec![c])),
            "partition" => one(self.partition(args)?),
            "drop" => one(self.drop_one_way(args)?),
            "isolate" => one(Command::Isolate(self.one_host(word, args)?)),
            "unisolate" => one(Command::Unisolate(self.one_host(word, args)?)),
            "loss" => one(self.loss(args)?),
            "storage" => self.storage(args).map(Parsed::Commands),
            "pause" => one(Command::Pause(self.one_host(word, args)?)),
            "resume" => one(Command::Resume(self.one_host(word, args)?)),
            "daemon" => one(self.daemon(args)?),
            "libvirt" => one(self.libvirt(args)?),
            "fence" => one(self.fence(args)?),
            "domain" => one(self.domain_command(args)?),
            "confirm" => one(Command::OperatorFenceConfirm(self.one_host(word, args)?)),
            "maintenance" => one(self.maintenance(args)?),
            "protect" => one(self.protect(args)?),
            "unprotect" => {
                let [d] = self.args::<1>(word, "one DOMAIN", args)?;
                one(Command::Unprotect(self.domain(d)?))
            }
            "guest" => one(self.guest(args)?),
            "start" => {
                let [d, h] = self.args::<2>(word, "DOMAIN HOST", args)?;
                one(Command::OperatorStart { domain: self.domain(d)?, host: self.host(h)? })
            }
            _ => Err(ScenarioError::UnknownCommand {
                file: self.file.to_string(),
                line: self.line,
                word: word.to_string(),
            }),
        }
    }

    /// Exactly `N` argument words, or an error saying what `command` expects.
    fn args<'w, const N: usize>(
        &self,
        command: &str,
        expected: &'static str,
        args: &[&'w str],
    ) -> Result<[&'w str; N], ScenarioError> {
        <[&str; N]>::try_from(args).map_err(|_| self.bad_args(command, expected, args))
    }

    fn bad_args(&self, command: &str, expected: &'static str, args: &[&str]) -> ScenarioError {
        let found = if args.is_empty() { "nothing".to_string() } else { format!("'{}'", args.join(" ")) };
        ScenarioError::BadArguments {
            file: self.file.to_string(),
            line: self.line,
            command: command.to_string(),
            expected,
            found,
        }
    }

    fn host(&self, word: &str) -> Result<HostId, ScenarioError> {
        let hosts = &self.spec.hosts;
        hosts.iter().find(|h| h.name == word).map(|h| h.id).ok_or_else(|| ScenarioError::UnknownHost {
            file: self.file.to_string(),
            line: self.line,
            word: word.to_string(),
            known: host_names(hosts),
        })
    }

    fn domain(&self, word: &str) -> Result<DomainId, ScenarioError> {
        let domains = &self.spec.domains;
        domains.values().find(|d| d.name == word).map(|d| d.id).ok_or_else(|| ScenarioError::UnknownDomain {
            file: self.file.to_string(),
            line: self.line,
            word: word.to_string(),
            known: domains.values().map(|d| d.name.as_str()).collect::<Vec<_>>().join(", "),
        })
    }

    fn one_host(&self, command: &str, args: &[&str]) -> Result<HostId, ScenarioError> {
        let [h] = self.args::<1>(command, "one HOST", args)?;
        self.host(h)
    }

    fn power(&self, args: &[&str]) -> Result<Command, ScenarioError> {
        const EXPECTED: &str = "'off HOST' or 'on HOST'";
        match self.args::<2>("power", EXPECTED, args)? {
            ["off", h] => Ok(Command::PowerOff(self.host(h)?)),
            ["on", h] => Ok(Command::PowerOn(self.host(h)?)),
            _ => Err(self.bad_args("power", EXPECTED, args)),
        }
    }

    fn partition(&self, args: &[&str]) -> Result<Command, ScenarioError> {
        let found = args.join(" ");
        let bad = |reason: String| ScenarioError::BadPartition {
            file: self.file.to_string(),
            line: self.line,
            found: found.clone(),
            reason,
        };
        let mut seen = BTreeSet::new();
        let mut groups = Vec::new();
        for group in found.split('|') {
            let mut hosts = Vec::new();
            for word in group.split(|c: char| c == ',' || c.is_whitespace()) {
                if word.is_empty() {
                    continue;
                }
                let h = self.host(word)?;
                if !seen.insert(h) {
                    return Err(bad(format!("host '{word}' is named twice")));
                }
                hosts.push(h);
            }
            if hosts.is_empty() {
                return Err(bad("a group is empty".into()));
            }
            groups.push(hosts);
        }
        if groups.len() < 2 {
            return Err(bad("at least two groups are needed".into()));
        }
        Ok(Command::Partition(groups))
    }

    fn drop_one_way(&self, args: &[&str]) -> Result<Command, ScenarioError> {
        const EXPECTED: &str = "'FROM -> TO'";
        let joined = args.concat();
        match joined.split_once("->") {
            Some((from, to)) if !from.is_empty() && !to.is_empty() => {
                Ok(Command::DropOneWay { from: self.host(from)?, to: self.host(to)? })
            }
            _ => Err(self.bad_args("drop", EXPECTED, args)),
        }
    }

    fn loss(&self, args: &[&str]) -> Result<Command, ScenarioError> {
        let [word] = self.args::<1>("loss", "one PERCENT", args)?;
        match word.parse::<u8>() {
            Ok(p) if p <= 100 => Ok(Command::NetLoss(p)),
            _ => Err(ScenarioError::BadNumber {
                file: self.file.to_string(),
                line: self.line,
                what: "loss percent",
                word: word.to_string(),
                expected: "a whole number from 0 to 100",
            }),
        }
    }

    fn storage(&self, args: &[&str]) -> Result<Vec<Command>, ScenarioError> {
        const EXPECTED: &str =
            "'fail HOST|all', 'hang HOST|all', 'readonly HOST|all', 'restore HOST|all' or 'stall SECONDS'";
        let [verb, target] = self.args::<2>("storage", EXPECTED, args)?;
        let make: fn(HostId) -> Command = match verb {
            "fail" => |host| Command::StorageFault { host, fault: StorageFault::Fail },
            "hang" => |host| Command::StorageFault { host, fault: StorageFault::Hang },
            "readonly" => |host| Command::StorageFault { host, fault: StorageFault::ReadOnly },
            "restore" => Command::StorageRestore,
            "stall" => {
                let millis = seconds_to_ms(target).ok_or_else(|| ScenarioError::BadNumber {
                    file: self.file.to_string(),
                    line: self.line,
                    what: "stall seconds",
                    word: target.to_string(),
                    expected: "seconds such as 5 or 2.5, at most 3 decimals",
                })?;
                return Ok(vec![Command::StorageStall { millis }]);
            }
            _ => return Err(self.bad_args("storage", EXPECTED, args)),
        };
        if target == "all" {
            return Ok(self.spec.hosts.iter().map(|h| make(h.id)).collect());
        }
        Ok(vec![make(self.host(target)?)])
    }

    fn libvirt(&self, args: &[&str]) -> Result<Command, ScenarioError> {
        const EXPECTED: &str = "'hang HOST', 'stuck HOST' or 'ok HOST'";
        let (hung, qemu_stuck) = match self.args::<2>("libvirt", EXPECTED, args)? {
            ["hang", _] => (true, false),
            ["stuck", _] => (true, true),
            ["ok", _] => (false, false),
            _ => return Err(self.bad_args("libvirt", EXPECTED, args)),
        };
        Ok(Command::Hypervisor { host: self.host(args[1])?, hung, qemu_stuck })
    }

    fn maintenance(&self, args: &[&str]) -> Result<Command, ScenarioError> {
        const EXPECTED: &str = "'enter HOST' or 'exit HOST'";
        match self.args::<2>("maintenance", EXPECTED, args)? {
            ["enter", h] => Ok(Command::Maintenance { host: self.host(h)?, enter: true }),
            ["exit", h] => Ok(Command::Maintenance { host: self.host(h)?, enter: false }),
            _ => Err(self.bad_args("maintenance", EXPECTED, args)),
        }
    }

    fn daemon(&self, args: &[&str]) -> Result<Command, ScenarioError> {
        const EXPECTED: &str = "'crash HOST', 'stop HOST', 'stop-systemd HOST' or 'start HOST'";
        match self.args::<2>("daemon", EXPECTED, args)? {
            ["crash", h] => Ok(Command::DaemonCrash(self.host(h)?)),
            ["stop", h] => Ok(Command::DaemonStop { host: self.host(h)?, host_reset: true }),
            ["stop-systemd", h] => Ok(Command::DaemonStop { host: self.host(h)?, host_reset: false }),
            ["start", h] => Ok(Command::DaemonStart(self.host(h)?)),
            _ => Err(self.bad_args("daemon", EXPECTED, args)),
        }
    }

    fn fence(&self, args: &[&str]) -> Result<Command, ScenarioError> {
        const EXPECTED: &str = "'fail HOST AGENT', 'hang HOST AGENT' or 'ok HOST AGENT'";
        let [verb, h, agent] = self.args::<3>("fence", EXPECTED, args)?;
        let mode = match verb {
            "fail" => AgentMode::Fails,
            "hang" => AgentMode::Hangs,
            "ok" => AgentMode::Works,
            _ => return Err(self.bad_args("fence", EXPECTED, args)),
        };
        let target = self.host(h)?;
        let agents = &self.spec.hosts[usize::from(target.0) - 1].fence_agents;
        if !agents.iter().any(|a| a == agent) {
            let known = if agents.is_empty() { "none".to_string() } else { agents.join(", ") };
            return Err(ScenarioError::UnknownAgent {
                file: self.file.to_string(),
                line: self.line,
                host: h.to_string(),
                word: agent.to_string(),
                known,
            });
        }
        Ok(Command::FenceAgent { target, agent: agent.to_string(), mode })
    }

    fn protect(&self, args: &[&str]) -> Result<Command, ScenarioError> {
        const EXPECTED: &str = "'DOMAIN HOST' or 'DOMAIN'";
        match args {
            [d, h] => Ok(Command::Protect { domain: self.domain(d)?, host: Some(self.host(h)?) }),
            [d] => Ok(Command::Protect { domain: self.domain(d)?, host: None }),
            _ => Err(self.bad_args("protect", EXPECTED, args)),
        }
    }

    fn guest(&self, args: &[&str]) -> Result<Command, ScenarioError> {
        const EXPECTED: &str =
            "'hang DOMAIN', 'hang-always DOMAIN', 'recover DOMAIN', 'shutdown DOMAIN' or 'destroy DOMAIN'";
        let [verb, d] = self.args::<2>("guest", EXPECTED, args)?;
        let domain = self.domain(d)?;
        match verb {
            "hang" => Ok(Command::GuestHang { domain, always: false }),
            "hang-always" => Ok(Command::GuestHang { domain, always: true }),
            "recover" => Ok(Command::GuestRecover(domain)),
            "shutdown" => Ok(Command::GuestStop { domain, destroy: false }),
            "destroy" => Ok(Command::GuestStop { domain, destroy: true }),
            _ => Err(self.bad_args("guest", EXPECTED, args)),
        }
    }

    fn domain_command(&self, args: &[&str]) -> Result<Command, ScenarioError> {
        const EXPECTED: &str = "'crash DOMAIN', 'break DOMAIN' or 'fix DOMAIN'";
        let [verb, d] = self.args::<2>("domain", EXPECTED, args)?;
        match verb {
            "crash" => Ok(Command::DomainCrash(self.domain(d)?)),
            "break" => Ok(Command::DomainBroken { domain: self.domain(d)?, broken: true }),
            "fix" => Ok(Command::DomainBroken { domain: self.domain(d)?, broken: false }),
            _ => Err(self.bad_args("domain", EXPECTED, args)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CLUSTER: &str = r#"
profile = "default"
seed = 7

[[host]]
name = "h1"
memory_mib = 16384
vcpus = 16
fence = ["ipmi"]

[[host]]
name = "h2"
memory_mib = 16384
vcpus = 16
fence = ["ipmi", "pdu"]
fault_domain = "rack2"
max_concurrent_starts = 2

[[host]]
name = "h3"
memory_mib = 16384
vcpus = 16
watchdog = false

[[domain]]
name = "web1"
memory_mib = 2048
vcpus = 2
host = "h1"

[[domain]]
name = "db2"
memory_mib = 4096
vcpus = 4
host = "h2"
priority = "highest"
isolation_response = "shutdown"
affinity = ["h2", "h3"]
anti_affinity = "db"
readiness = "tcp:5432"
readiness_timeout_s = 60
max_restarts = 2

[[domain]]
name = "lab3"
memory_mib = 1024
vcpus = 1
host = "h3"
protected = false
"#;

    fn cluster() -> SimSetup {
        parse_cluster("t", CLUSTER, "t/cluster.toml").expect("test cluster parses")
    }

    fn cmdlist(text: &str) -> Result<(Vec<(u64, Command)>, u64), ScenarioError> {
        parse_cmdlist(text, "t/cmdlist", &cluster().spec)
    }

    #[test]
    fn cluster_toml_builds_hosts_domains_and_defaults() {
        let setup = cluster();
        assert_eq!(setup.seed, 7);
        assert_eq!(setup.spec.name, "t");
        assert_eq!(setup.spec.timings, Profile::Default.timings());
        assert_eq!(setup.spec.memory_overcommit, 1.0);
        assert_eq!(setup.spec.vcpu_overcommit, 4.0);
        let h = &setup.spec.hosts;
        assert_eq!(h.iter().map(|h| h.id).collect::<Vec<_>>(), [HostId(1), HostId(2), HostId(3)]);
        assert_eq!(h[0].fence_agents, ["ipmi"]);
        assert!(h[0].watchdog && !h[2].watchdog);
        assert!(h[2].fence_agents.is_empty());
        assert_eq!((h[0].max_concurrent_starts, h[1].max_concurrent_starts), (4, 2));
        assert_eq!(h[1].fault_domain.as_deref(), Some("rack2"));

        let web1 = &setup.spec.domains[&DomainId(1)];
        assert_eq!(web1.name, "web1");
        assert_eq!(web1.policy, DomainPolicy::default());
        let db2 = &setup.spec.domains[&DomainId(2)];
        assert_eq!((db2.memory_mib, db2.vcpus), (4096, 4));
        assert_eq!(db2.policy.priority, Priority::Highest);
        assert_eq!(db2.policy.isolation_response, IsolationResponse::Shutdown);
        assert_eq!(db2.policy.affinity, [HostId(2), HostId(3)]);
        assert_eq!(db2.policy.anti_affinity.as_deref(), Some("db"));
        assert_eq!(db2.policy.readiness, Readiness::TcpPort(5432));
        assert_eq!(db2.policy.readiness_timeout, Duration::from_secs(60));
        assert_eq!(db2.policy.max_restarts, 2);
        let initial: Vec<_> = setup.initial.into_iter().collect();
        assert_eq!(initial, [(DomainId(1), HostId(1)), (DomainId(2), HostId(2)), (DomainId(3), HostId(3))]);
        assert_eq!(setup.unprotected.into_iter().collect::<Vec<_>>(), [DomainId(3)], "lab3 runs unprotected");
    }

    #[test]
    fn every_command_word_parses() {
        let text = "
# a comment line, then a blank one

0 power off h1   # trailing comment
0.5 power on h1
1 partition h1,h2 | h3
1.25 partition h1 h2|h3
2 drop h1 -> h2
2 drop h3->h1
3 heal
4 isolate h3
4 unisolate h3
5 loss 20
6 storage fail h2
6 storage hang all
7 storage restore h2
7 storage stall 5.5
8 pause h2
8 resume h2
9 daemon crash h2
9 daemon start h2
10 fence fail h2 pdu
10 fence ok h2 pdu
11 domain crash web1
11 domain break db2
11 domain fix db2
12.5 confirm h2
13 unprotect web1
14 protect web1 h2
14 protect db2
15 guest hang web1
15 guest hang-always db2
15 guest recover db2
16 guest shutdown web1
16 guest destroy db2
17 start web1 h3
20 end
";
        let (cmds, end_ms) = cmdlist(text).expect("parses");
        assert_eq!(end_ms, 20_000);
        use Command as C;
        let (h1, h2, h3) = (HostId(1), HostId(2), HostId(3));
        let hang = |host| C::StorageFault { host, fault: StorageFault::Hang };
        let expected = vec![
            (0, C::PowerOff(h1)),
            (500, C::PowerOn(h1)),
            (1000, C::Partition(vec![vec![h1, h2], vec![h3]])),
            (1250, C::Partition(vec![vec![h1, h2], vec![h3]])),
            (2000, C::DropOneWay { from: h1, to: h2 }),
            (2000, C::DropOneWay { from: h3, to: h1 }),
            (3000, C::HealNetwork),
            (4000, C::Isolate(h3)),
            (4000, C::Unisolate(h3)),
            (5000, C::NetLoss(20)),
            (6000, C::StorageFault { host: h2, fault: StorageFault::Fail }),
            (6000, hang(h1)),
            (6000, hang(h2)),
            (6000, hang(h3)),
            (7000, C::StorageRestore(h2)),
            (7000, C::StorageStall { millis: 5500 }),
            (8000, C::Pause(h2)),
            (8000, C::Resume(h2)),
            (9000, C::DaemonCrash(h2)),
            (9000, C::DaemonStart(h2)),
            (10_000, C::FenceAgent { target: h2, agent: "pdu".into(), mode: AgentMode::Fails }),
            (10_000, C::FenceAgent { target: h2, agent: "pdu".into(), mode: AgentMode::Works }),
            (11_000, C::DomainCrash(DomainId(1))),
            (11_000, C::DomainBroken { domain: DomainId(2), broken: true }),
            (11_000, C::DomainBroken { domain: DomainId(2), broken: false }),
            (12_500, C::OperatorFenceConfirm(h2)),
            (13_000, C::Unprotect(DomainId(1))),
            (14_000, C::Protect { domain: DomainId(1), host: Some(h2) }),
            (14_000, C::Protect { domain: DomainId(2), host: None }),
            (15_000, C::GuestHang { domain: DomainId(1), always: false }),
            (15_000, C::GuestHang { domain: DomainId(2), always: true }),
            (15_000, C::GuestRecover(DomainId(2))),
            (16_000, C::GuestStop { domain: DomainId(1), destroy: false }),
            (16_000, C::GuestStop { domain: DomainId(2), destroy: true }),
            (17_000, C::OperatorStart { domain: DomainId(1), host: h3 }),
        ];
        assert_eq!(cmds, expected);
    }

    #[test]
    fn seconds_parse_to_exact_milliseconds() {
        assert_eq!(seconds_to_ms("0"), Some(0));
        assert_eq!(seconds_to_ms("12.5"), Some(12_500));
        assert_eq!(seconds_to_ms("0.001"), Some(1));
        assert_eq!(seconds_to_ms("3.250"), Some(3250));
        for bad in ["", ".5", "5.", "1.2345", "-1", "+1", "1e3", "ten", "1.2.3"] {
            assert_eq!(seconds_to_ms(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn unknown_host_names_the_line_and_the_hosts() {
        let err = cmdlist("# comment\n\n10 power off h1\n20 power off h9\n30 end\n").unwrap_err();
        assert_eq!(err.to_string(), "t/cmdlist:4: unknown host 'h9' (hosts: h1, h2, h3)");
    }

    #[test]
    fn unknown_command_word_is_named() {
        let err = cmdlist("1 heal\n\n2 reboot h1\n3 end\n").unwrap_err();
        assert_eq!(err, ScenarioError::UnknownCommand { file: "t/cmdlist".into(), line: 3, word: "reboot".into() });
        assert!(err.to_string().contains("expected one of: power,"), "{err}");
    }

    #[test]
    fn time_going_backwards_is_an_error() {
        let err = cmdlist("10 pause h1\n5 resume h1\n20 end\n").unwrap_err();
        assert!(matches!(err, ScenarioError::TimeBackwards { line: 2, previous_ms: 10_000, .. }));
        assert!(err.to_string().starts_with("t/cmdlist:2: time 5 goes backwards"), "{err}");
        // Equal times keep file order and are fine.
        assert!(cmdlist("10 pause h1\n10 resume h1\n10 end\n").is_ok());
    }

    #[test]
    fn end_is_required_and_last() {
        assert_eq!(cmdlist("10 heal\n").unwrap_err(), ScenarioError::MissingEnd { file: "t/cmdlist".into() });
        let err = cmdlist("10 end\n20 heal\n").unwrap_err();
        assert!(matches!(err, ScenarioError::AfterEnd { line: 2, .. }), "{err}");
        let err = cmdlist("10 end now\n").unwrap_err();
        assert!(matches!(err, ScenarioError::BadArguments { line: 1, .. }), "{err}");
    }

    #[test]
    fn bad_arguments_say_what_was_expected() {
        let cases = [
            ("1 power of h1", "t/cmdlist:1: 'power' expects 'off HOST' or 'on HOST', found 'of h1'"),
            ("1 isolate", "t/cmdlist:1: 'isolate' expects one HOST, found nothing"),
            ("1 drop h1 h2", "t/cmdlist:1: 'drop' expects 'FROM -> TO', found 'h1 h2'"),
            ("1 loss 101", "t/cmdlist:1: bad loss percent '101' (expected a whole number from 0 to 100)"),
            (
                "1.2345 heal",
                "t/cmdlist:1: bad time '1.2345' (expected seconds such as 10 or 12.5, at most 3 decimals, before the command)",
            ),
            ("1 fence fail h1 pdu", "t/cmdlist:1: host 'h1' has no fence agent 'pdu' (its agents: ipmi)"),
            ("1 fence fail h3 ipmi", "t/cmdlist:1: host 'h3' has no fence agent 'ipmi' (its agents: none)"),
            ("1 domain crash db9", "t/cmdlist:1: unknown domain 'db9' (domains: web1, db2, lab3)"),
            (
                "1 storage stall x",
                "t/cmdlist:1: bad stall seconds 'x' (expected seconds such as 5 or 2.5, at most 3 decimals)",
            ),
            (
                "1",
                "t/cmdlist:1: missing command after the time (expected one of: power, partition, drop, heal, isolate, unisolate, loss, storage, pause, resume, daemon, fence, domain, confirm, protect, unprotect, guest, start, end)",
            ),
            (
                "1 guest nap web1",
                "t/cmdlist:1: 'guest' expects 'hang DOMAIN', 'hang-always DOMAIN', 'recover DOMAIN', 'shutdown DOMAIN' or 'destroy DOMAIN', found 'nap web1'",
            ),
            ("1 start web1", "t/cmdlist:1: 'start' expects DOMAIN HOST, found 'web1'"),
            ("1 protect", "t/cmdlist:1: 'protect' expects 'DOMAIN HOST' or 'DOMAIN', found nothing"),
            ("1 unprotect web1 h1", "t/cmdlist:1: 'unprotect' expects one DOMAIN, found 'web1 h1'"),
        ];
        for (line, message) in cases {
            let err = cmdlist(&format!("{line}\n9 end\n")).unwrap_err();
            assert_eq!(err.to_string(), message, "{line}");
        }
    }

    #[test]
    fn bad_partitions_are_refused() {
        for line in ["1 partition h1,h2", "1 partition h1 | h1", "1 partition h1 || h2"] {
            let err = cmdlist(&format!("{line}\n9 end\n")).unwrap_err();
            assert!(matches!(err, ScenarioError::BadPartition { line: 1, .. }), "{line}: {err}");
        }
    }

    #[test]
    fn cluster_errors_name_the_problem() {
        let parse = |text: &str| parse_cluster("t", text, "t/cluster.toml").unwrap_err();
        let host = "[[host]]\nname = \"h1\"\nmemory_mib = 4096\nvcpus = 4\n";
        let domain = |extra: &str| {
            format!(
                "profile = \"default\"\n{host}[[domain]]\nname = \"d\"\nmemory_mib = 1024\nvcpus = 1\nhost = \"h1\"\n{extra}"
            )
        };
        let err = parse(&domain("colour = \"red\"\n"));
        assert!(matches!(&err, ScenarioError::Toml { reason, .. } if reason.contains("colour")), "{err}");
        let err = parse(&format!("profile = \"quick\"\n{host}"));
        assert!(matches!(&err, ScenarioError::Toml { reason, .. } if reason.contains("quick")), "{err}");
        let err = parse(&domain("readiness = \"tcp:0\"\n"));
        assert!(matches!(err, ScenarioError::BadReadiness { .. }), "{err}");
        let err = parse(&domain("affinity = [\"h9\"]\n"));
        assert_eq!(err.to_string(), "t/cluster.toml: domain 'd' names unknown host 'h9' in `affinity` (hosts: h1)");
        let err = parse(&format!("profile = \"default\"\n{host}{host}"));
        assert!(err.to_string().contains("host 'h1' is defined twice"), "{err}");
        let err = parse(&domain("").replace("memory_mib = 1024", "memory_mib = 8192"));
        assert!(matches!(err, ScenarioError::Overfull { need_mib: 8192, .. }), "{err}");
        let err = parse(&domain("").replace("name = \"d\"", "name = \"all\""));
        assert!(matches!(err, ScenarioError::Invalid { .. }), "{err}");
    }

    /// Every scenario directory of the golden suite loads.
    #[test]
    fn every_golden_scenario_loads() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/scenarios");
        let mut dirs: Vec<_> = std::fs::read_dir(&root)
            .expect("tests/scenarios exists")
            .map(|e| e.expect("readable entry").path())
            .filter(|p| p.is_dir())
            .collect();
        dirs.sort();
        assert!(!dirs.is_empty(), "no scenarios under {}", root.display());
        let failures: Vec<String> = dirs.iter().filter_map(|d| load(d).err().map(|e| e.to_string())).collect();
        assert!(failures.is_empty(), "scenarios that do not load:\n{}", failures.join("\n"));
    }
}
