//! The whole lab (issue 4): `Lab::up` builds the network, the shared
//! datastore behind faultfs, one BMC, watchdog supervisor and host (with
//! its libvirtd and havirt daemon) per host, and tiny protected qemu
//! domains; `Lab::fault` injects every fault of `lab fault`; dropping the
//! lab (or `Lab::down`) removes all of it, also after a failed test.
//!
//! Hosts are powered on through their BMCs, always: a BMC must know its
//! host is on, or a fence agent's "power off" would find it "already off",
//! report success and leave it running (a false confirmation, S1).
//!
//! ```text
//! LAB_DIR/havirt.toml     the cluster's one config (every host reads it)
//! LAB_DIR/cluster.key     its key (0600)
//! LAB_DIR/bmc.pw          every BMC's password, the fence agents' password_file (0600)
//! LAB_DIR/ds/cluster      the cluster's datastore (through faultfs)
//! LAB_DIR/ds/images       the domains' qcow2 disks (through faultfs), and
//!                         guest-vmlinuz, guest-initrd.gz: the tiny guest OS
//!                         of `LabSpec::guest_os` domains (guest.rs)
//! LAB_DIR/domains/NAME.xml  the domains' definitions as first defined
//! LAB_DIR/faultfs.log     faultfs's output
//! ```

use super::bmc::{Bmc, BmcSpec};
use super::host::{Host, HostOptions, share_datastore_mount};
use super::net::{GATEWAY_ADDR, Network, bmc_addr, heartbeat_addr, host_ns};
use super::supervisor::Supervisor;
use super::sys::{self, LabError, io_error, run, run_args};
use super::{FAULTFS_SOCKET, LAB_DIR, faultfs, lun};
use crate::control::{self, Request, Response, StatusReport};
use crate::engine::config::DomainId;
use crate::engine::io::DomainState;
use crate::hypervisor::uuid_string;
use std::collections::BTreeMap;
use std::fmt;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The lab cluster's name.
pub const CLUSTER: &str = "lab";
/// Every lab BMC's password (a lab secret; in LAB_DIR/bmc.pw, 0600).
pub const BMC_PASSWORD: &str = "havirt-lab-pw";
/// The guest OS kernel and initramfs on the datastore (`LabSpec::guest_os`).
pub const GUEST_KERNEL: &str = "ds/images/guest-vmlinuz";
pub const GUEST_INITRD: &str = "ds/images/guest-initrd.gz";
/// The lab domains' size (LAB-NOTES: 64 MiB, 1 vCPU, ~45 MB RSS idle).
pub const DOMAIN_MEMORY_MIB: u32 = 64;
/// Their disks' virtual size.
pub const DOMAIN_DISK: &str = "64M";
/// The same, for a raw disk on the block datastore.
pub const DOMAIN_DISK_BYTES: u64 = 64 << 20;
/// Priorities of the lab domains: the first round over the hosts high, the
/// second medium, the third low, then again.
pub const PRIORITIES: [&str; 3] = ["high", "medium", "low"];
/// faultfs must answer its control socket within this after its start.
pub const FAULTFS_START_WAIT: Duration = Duration::from_secs(10);
/// A host's libvirtd must answer within this after its power-on.
pub const LIBVIRT_START_WAIT: Duration = Duration::from_secs(20);
/// The cluster must settle (every daemon sees every host up, every domain
/// protected and running once) within this after `up`.
pub const SETTLE_WAIT: Duration = Duration::from_secs(90);
/// One control request to a lab daemon.
pub const CONTROL_TIMEOUT: Duration = Duration::from_secs(5);
/// One `virsh` or `qemu-img` call of the lab.
pub const TOOL_TIMEOUT_S: u32 = 10;
/// How long one guest-agent command may take (`Lab::guest_agent`).
pub const AGENT_COMMAND_TIMEOUT_S: u32 = 3;
/// How often a guest fault's agent command is tried.
pub const AGENT_COMMAND_TRIES: u32 = 5;
/// How long after its agent's `guest-exec` the guest panics. qemu-ga
/// answers a guest-exec once it has spawned the command; a panic at once
/// can win that race (seen in CI on a loaded machine), and then the
/// answer never comes, the command times out and every retry finds the
/// agent gone, although the fault happened. A second's delay lets the
/// answer out first.
pub const GUEST_PANIC_DELAY_S: u64 = 1;
/// How long a power-off through the BMC may take until the host is off.
pub const POWER_WAIT: Duration = Duration::from_secs(10);
const POLL: Duration = Duration::from_millis(100);

/// How the hosts fence each other.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fencing {
    /// The real `fence_ipmilan` through havirt's `command` agent.
    Ipmilan,
    /// `ipmitool` through havirt's `ipmi` agent.
    Ipmitool,
    /// No fence agent: only the watchdog rule (S3(b)) frees leases.
    Disabled,
}

impl Fencing {
    pub fn parse(s: &str) -> Result<Fencing, String> {
        match s {
            "ipmilan" => Ok(Fencing::Ipmilan),
            "ipmitool" => Ok(Fencing::Ipmitool),
            "none" => Ok(Fencing::Disabled),
            _ => Err(format!("{s:?}: use ipmilan, ipmitool or none")),
        }
    }
}

/// What the hosts share as their datastore.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Datastore {
    /// A directory on faultfs (the NFS export); qcow2 disks beside it.
    #[default]
    Dir,
    /// A LUN: a loop device per host over one file on faultfs, formatted
    /// by `havirt init`; raw disks on loop devices of their own (lun.rs).
    Block,
}

impl Datastore {
    pub fn parse(s: &str) -> Result<Datastore, String> {
        match s {
            "dir" => Ok(Datastore::Dir),
            "block" => Ok(Datastore::Block),
            _ => Err(format!("{s:?}: use dir or block")),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Datastore::Dir => "dir",
            Datastore::Block => "block",
        }
    }
}

impl fmt::Display for Datastore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What to build.
#[derive(Clone, Debug)]
pub struct LabSpec {
    pub hosts: u16,
    pub domains: u16,
    pub fencing: Fencing,
    /// The timing profile ("default", "fast", "conservative").
    pub profile: String,
    /// The havirt binary the hosts run.
    pub havirt: PathBuf,
    /// Where the domains first run: all on this host, or (None) spread
    /// round-robin over the hosts.
    pub home: Option<u16>,
    /// How many domains (the first: vm1, vm2, ...) boot the tiny guest OS
    /// of `guest.rs` (a kernel, and qemu-ga answering on its channel)
    /// instead of idling in the BIOS. 0, the default, keeps every domain
    /// empty and the lab fast.
    pub guest_os: u16,
    /// Per-host LAN bridges and network maps (issue 5); None: no guest NICs.
    pub lan: Option<LanSpec>,
    /// TOML appended to the cluster's config as is, after the hosts (e.g.
    /// `[[alert]]` tables for a test's receivers); empty by default.
    pub extra_config: String,
    /// The hosts' datastore (dir by default).
    pub datastore: Datastore,
}

/// The lab's network mapping setup: host N gets a bridge [`lan_bridge`]`(N)`
/// of its own (in its namespace, no uplink), every lab domain a NIC on its
/// home host's bridge, and each host in `mapped` a `bridge_map` from h1's
/// bridge name (the cluster's name of this LAN) to its own. A host left out
/// has no map: a domain stored with the name `lan-h1` cannot run there.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LanSpec {
    pub mapped: Vec<u16>,
}

/// Host N's LAN bridge when [`LabSpec::lan`] is set.
pub fn lan_bridge(host: u16) -> String {
    format!("lan-h{host}")
}

impl LabSpec {
    /// `hosts` hosts, `domains` domains, fence_ipmilan, default profile.
    pub fn new(hosts: u16, domains: u16, havirt: PathBuf) -> LabSpec {
        LabSpec {
            hosts,
            domains,
            fencing: Fencing::Ipmilan,
            profile: "default".into(),
            havirt,
            home: None,
            guest_os: 0,
            lan: None,
            extra_config: String::new(),
            datastore: Datastore::Dir,
        }
    }
}

/// One lab domain: `vmI`, first started on host `home`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LabDomain {
    pub name: String,
    pub uuid: String,
    pub home: u16,
    pub priority: &'static str,
}

/// A fault of `lab fault KIND HOST`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Fault {
    /// Through the host's BMC (`chassis power off`); a dead BMC cannot, so
    /// then the plug is pulled (SIGKILL of the host's init).
    PowerOff(u16),
    /// Through the host's BMC; waits until its libvirtd answers.
    PowerOn(u16),
    /// The BMC stops answering (SIGSTOP of ipmi_sim): fencing it fails.
    BmcDead(u16),
    /// The BMC answers again.
    BmcAlive(u16),
    Pause(u16),
    Resume(u16),
    /// Heartbeats from each of `from` to each of `to` are dropped (and back
    /// when `both_ways`).
    Partition {
        from: Vec<u16>,
        to: Vec<u16>,
        both_ways: bool,
    },
    Isolate(u16),
    Heal,
    StorageHang(u16),
    StorageEio(u16),
    StorageDelay(u16, u64),
    StorageOk(u16),
    KillDaemon(u16),
    KillLibvirtd(u16),
    KillQemu(u16, String),
    /// The guest OS of DOMAIN on host H panics (`echo c >
    /// /proc/sysrq-trigger` through its agent's `guest-exec`,
    /// GUEST_PANIC_DELAY_S after the agent answered); with `panic=0` it
    /// hangs for good: its agent stops answering.
    GuestPanic(u16, String),
    /// The guest OS of DOMAIN on host H shuts itself down (its agent's
    /// `guest-shutdown`: /sbin/shutdown inside the guest powers it off).
    GuestShutdown(u16, String),
}

pub const FAULT_USAGE: &str = "power-off H | power-on H | bmc-dead H | bmc-alive H | pause H | resume H | \
partition H[,H...] [H[,H...]] [--one-way] | isolate H | heal | storage-hang H | storage-eio H | \
storage-delay H MS | storage-ok H | kill-daemon H | kill-libvirtd H | kill-qemu H DOMAIN | \
guest-panic H DOMAIN | guest-shutdown H DOMAIN (H: a host number or hN)";

fn host_word(s: &str) -> Result<u16, String> {
    s.strip_prefix('h').unwrap_or(s).parse().map_err(|_| format!("{s:?} is not a host (write 2 or h2)"))
}

fn host_list(s: &str) -> Result<Vec<u16>, String> {
    s.split(',').map(host_word).collect()
}

impl Fault {
    /// `KIND HOST [ARG]`, as `lab fault` takes it.
    pub fn parse(words: &[String]) -> Result<Fault, String> {
        let w: Vec<&str> = words.iter().map(String::as_str).collect();
        let bad = || format!("cannot read fault {:?}; write {FAULT_USAGE}", w.join(" "));
        let fault = match w.as_slice() {
            ["heal"] => Fault::Heal,
            ["partition", rest @ ..] => {
                let both_ways = !rest.contains(&"--one-way");
                let hosts: Vec<&&str> = rest.iter().filter(|a| **a != "--one-way").collect();
                match hosts.as_slice() {
                    [from] => Fault::Partition { from: host_list(from)?, to: Vec::new(), both_ways },
                    [from, to] => Fault::Partition { from: host_list(from)?, to: host_list(to)?, both_ways },
                    _ => return Err(bad()),
                }
            }
            ["storage-delay", h, ms] => Fault::StorageDelay(host_word(h)?, ms.parse().map_err(|_| bad())?),
            ["kill-qemu", h, domain] => Fault::KillQemu(host_word(h)?, (*domain).to_string()),
            ["guest-panic", h, domain] => Fault::GuestPanic(host_word(h)?, (*domain).to_string()),
            ["guest-shutdown", h, domain] => Fault::GuestShutdown(host_word(h)?, (*domain).to_string()),
            [kind, h] => {
                let h = host_word(h)?;
                match *kind {
                    "power-off" => Fault::PowerOff(h),
                    "power-on" => Fault::PowerOn(h),
                    "bmc-dead" => Fault::BmcDead(h),
                    "bmc-alive" => Fault::BmcAlive(h),
                    "pause" => Fault::Pause(h),
                    "resume" => Fault::Resume(h),
                    "isolate" => Fault::Isolate(h),
                    "storage-hang" => Fault::StorageHang(h),
                    "storage-eio" => Fault::StorageEio(h),
                    "storage-ok" => Fault::StorageOk(h),
                    "kill-daemon" => Fault::KillDaemon(h),
                    "kill-libvirtd" => Fault::KillLibvirtd(h),
                    _ => return Err(bad()),
                }
            }
            _ => return Err(bad()),
        };
        Ok(fault)
    }
}

impl fmt::Display for Fault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let list = |hs: &[u16]| hs.iter().map(|h| format!("h{h}")).collect::<Vec<_>>().join(",");
        match self {
            Fault::PowerOff(h) => write!(f, "power-off h{h}"),
            Fault::PowerOn(h) => write!(f, "power-on h{h}"),
            Fault::BmcDead(h) => write!(f, "bmc-dead h{h}"),
            Fault::BmcAlive(h) => write!(f, "bmc-alive h{h}"),
            Fault::Pause(h) => write!(f, "pause h{h}"),
            Fault::Resume(h) => write!(f, "resume h{h}"),
            Fault::Partition { from, to, both_ways } => {
                write!(f, "partition {} | {}{}", list(from), list(to), if *both_ways { "" } else { " (one way)" })
            }
            Fault::Isolate(h) => write!(f, "isolate h{h}"),
            Fault::Heal => write!(f, "heal"),
            Fault::StorageHang(h) => write!(f, "storage-hang h{h}"),
            Fault::StorageEio(h) => write!(f, "storage-eio h{h}"),
            Fault::StorageDelay(h, ms) => write!(f, "storage-delay h{h} {ms} ms"),
            Fault::StorageOk(h) => write!(f, "storage-ok h{h}"),
            Fault::KillDaemon(h) => write!(f, "kill-daemon h{h}"),
            Fault::KillLibvirtd(h) => write!(f, "kill-libvirtd h{h}"),
            Fault::KillQemu(h, d) => write!(f, "kill-qemu h{h} {d}"),
            Fault::GuestPanic(h, d) => write!(f, "guest-panic h{h} {d}"),
            Fault::GuestShutdown(h, d) => write!(f, "guest-shutdown h{h} {d}"),
        }
    }
}

#[allow(clippy::disallowed_methods, reason = "the lab waits in wall time for real processes")]
fn now() -> Instant {
    Instant::now()
}

/// The running lab. Dropping it tears everything down (`down`).
pub struct Lab {
    spec: LabSpec,
    net: Network,
    hosts: Vec<Host>,
    bmcs: Vec<Bmc>,
    supervisors: Vec<Supervisor>,
    faultfs: Option<Child>,
    domains: Vec<LabDomain>,
    dead_bmcs: Vec<u16>,
    _lock: fs::File,
}

fn lab_path(rel: &str) -> PathBuf {
    Path::new(LAB_DIR).join(rel)
}

fn write_secret(path: &Path, text: &str) -> Result<(), LabError> {
    fs::write(path, text).map_err(io_error(path))?;
    fs::set_permissions(path, fs::Permissions::from_mode(0o600)).map_err(io_error(path))
}

fn domain_uuid(i: u16) -> String {
    // The number first, so that the uuids' short forms differ.
    uuid_string(DomainId((u128::from(i) << 96) | 0x6c61_6200_0000_0000_0000))
}

/// A BMC's failure, as the lab reports it (the message names the host).
fn bmc_err(e: super::bmc::BmcError) -> LabError {
    LabError::State { what: e.to_string() }
}

/// Progress of `up`, for the one watching (on stderr: stdout carries
/// results, e.g. `lab bench --json`).
fn say(what: &str) {
    eprintln!("lab: {what}");
}

/// A host's control socket.
pub fn control_socket(host: u16) -> PathBuf {
    lab_path(&format!("h{host}/havirt.sock"))
}

fn watchdog_socket(host: u16) -> PathBuf {
    lab_path(&format!("h{host}/watchdog.sock"))
}

/// The one config of the lab cluster.
pub fn config_text(spec: &LabSpec) -> String {
    let lab = LAB_DIR;
    let mut text = format!(
        "# The havirt lab's cluster (written by `havirt lab up`).\n\
         [cluster]\nname = \"{CLUSTER}\"\nkey_file = \"{lab}/cluster.key\"\nprofile = \"{}\"\n\
         isolation_addresses = [\"{GATEWAY_ADDR}\"]\n\
         # Tiny idle domains: a restart storm of 30+ must fit on two hosts.\n\
         vcpu_overcommit = 16.0\n\
         # faultfs (FUSE) is shared, but libvirt cannot tell\n\
         allow_unsafe_migration = true\n\n\
         [cluster.datastore]\n",
        spec.profile
    );
    match spec.datastore {
        Datastore::Dir => text.push_str(&format!("kind = \"dir\"\npath = \"{lab}/ds/cluster\"\n")),
        Datastore::Block => text.push_str(&format!(
            "# Every host's own loop device of one LUN, at the same path on each (lun.rs)\n\
             kind = \"block\"\ndevice = \"{}\"\n",
            lun::shared_path(lun::LUN_NAME).display()
        )),
    }
    for n in 1..=spec.hosts {
        text.push_str(&format!(
            "\n[[host]]\nname = \"h{n}\"\nid = {n}\naddresses = [\"{}\"]\n\
             watchdog = {{ kind = \"lab\", lab_socket = \"{}\" }}\n\
             migration_uri = \"qemu+tcp://{}/system\"\n",
            heartbeat_addr(n),
            watchdog_socket(n).display(),
            heartbeat_addr(n)
        ));
        let bmc = bmc_addr(n);
        match spec.fencing {
            // power_wait 0: fence_ipmilan still polls the power status
            // until it reads "off" before it reports success.
            Fencing::Ipmilan => text.push_str(&format!(
                "\n[[host.fence]]\nkind = \"command\"\nagent = \"fence_ipmilan\"\n\
                 options = {{ ip = \"{bmc}\", username = \"admin\", lanplus = \"1\", cipher = \"3\", power_wait = \"0\" }}\n\
                 password_file = \"{lab}/bmc.pw\"\n"
            )),
            Fencing::Ipmitool => text.push_str(&format!(
                "\n[[host.fence]]\nkind = \"ipmi\"\naddress = \"{bmc}\"\nusername = \"admin\"\n\
                 password_file = \"{lab}/bmc.pw\"\ncipher = 3\n"
            )),
            Fencing::Disabled => {}
        }
        if n != 1 && spec.lan.as_ref().is_some_and(|l| l.mapped.contains(&n)) {
            text.push_str(&format!("\n[host.bridge_map]\n\"{}\" = \"{}\"\n", lan_bridge(1), lan_bridge(n)));
        }
    }
    if !spec.extra_config.is_empty() {
        text.push('\n');
        text.push_str(&spec.extra_config);
    }
    text
}

/// `xml` with a NIC on `bridge` (a tap device in the host's namespace).
pub fn with_lan_nic(xml: &str, bridge: &str) -> String {
    let nic = format!(
        "  <interface type='bridge'>\n      <source bridge='{bridge}'/>\n      <model type='virtio'/>\n    </interface>\n  </devices>"
    );
    xml.replacen("</devices>", &nic, 1)
}

/// A tiny domain with its qcow2 disk on the datastore (LAB-NOTES).
pub fn domain_xml(name: &str, uuid: &str) -> String {
    let kind = if kvm_usable() { "kvm" } else { "qemu" };
    let disk = disk_path(Datastore::Dir, name);
    format!(
        "<domain type='{kind}'>
  <name>{name}</name>
  <uuid>{uuid}</uuid>
  <memory unit='MiB'>{DOMAIN_MEMORY_MIB}</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type></os>
  <on_crash>destroy</on_crash>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2' cache='none'/>
      <source file='{}'/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <serial type='pty'/>
    <memballoon model='none'/>
  </devices>
</domain>",
        disk.display()
    )
}

/// Where domain `name`'s disk is, as its XML names it: a qcow2 file on
/// the dir datastore, or the host's own device of its raw disk (lun.rs).
pub fn disk_path(datastore: Datastore, name: &str) -> PathBuf {
    match datastore {
        Datastore::Dir => lab_path(&format!("ds/images/{name}.qcow2")),
        Datastore::Block => lun::shared_path(name),
    }
}

/// `xml` with its (one, qcow2 file) disk made a raw block device at
/// `dev`: a LUN as on an iSCSI cluster, with nothing but havirt's leases
/// between two hosts' qemu (no image lock spans two device nodes).
pub fn with_block_disk(xml: &str, dev: &Path) -> String {
    let Some(start) = xml.find("<disk type='file'") else { return xml.to_string() };
    let Some(len) = xml[start..].find("</disk>") else { return xml.to_string() };
    let disk = format!(
        "<disk type='block' device='disk'>\n      <driver name='qemu' type='raw' cache='none' io='native'/>\n      \
         <source dev='{}'/>\n      <target dev='vda' bus='virtio'/>\n    </disk>",
        dev.display()
    );
    format!("{}{disk}{}", &xml[..start], &xml[start + len + "</disk>".len()..])
}

/// KVM when /dev/kvm opens for reading and writing, TCG otherwise.
pub fn kvm_usable() -> bool {
    fs::OpenOptions::new().read(true).write(true).open("/dev/kvm").is_ok()
}

/// `timeout T virsh -c URI ARGS...`, its stdout.
fn virsh(uri: &str, args: &[&str]) -> Result<String, LabError> {
    let mut cmd = Command::new("timeout");
    cmd.args([&TOOL_TIMEOUT_S.to_string(), "virsh", "-q", "-c", uri]).args(args);
    Ok(String::from_utf8_lossy(&run(&mut cmd)?.stdout).into_owned())
}

/// The names of the domains running on a host, from its libvirtd (None: it
/// does not answer).
pub fn running_on(host: &Host) -> Option<Vec<String>> {
    // Running vCPUs only: a copy paused by an incoming live migration runs
    // no guest code (the observer counts the same way).
    let out = virsh(&host.libvirt_uri(), &["list", "--name", "--state-running"]).ok()?;
    Some(out.lines().map(str::trim).filter(|l| !l.is_empty()).map(String::from).collect())
}

impl Lab {
    /// Builds the lab (after removing whatever an earlier run left), and
    /// waits until it has settled. Holds the machine's lab lock until
    /// dropped.
    pub fn up(spec: LabSpec) -> Result<Lab, LabError> {
        if spec.hosts < 2 {
            return Err(LabError::State { what: format!("a lab needs 2 or more hosts, not {}", spec.hosts) });
        }
        if let Some(home) = spec.home.filter(|h| !(1..=spec.hosts).contains(h)) {
            return Err(LabError::BadHost { host: home, max: spec.hosts });
        }
        let lock = super::lock()?;
        // We hold the lock: whatever exists is a leftover.
        super::down()?;
        let net = Network::create(spec.hosts)?;
        say(&format!("network: {} hosts on hl-sw (heartbeat 10.99.0.0/24, BMCs 10.98.0.0/24)", spec.hosts));
        let mut lab = Lab {
            spec,
            net,
            hosts: Vec::new(),
            bmcs: Vec::new(),
            supervisors: Vec::new(),
            faultfs: None,
            domains: Vec::new(),
            dead_bmcs: Vec::new(),
            _lock: lock,
        };
        lab.build()?;
        Ok(lab)
    }

    fn build(&mut self) -> Result<(), LabError> {
        for dir in ["backing", "ds", "domains"] {
            fs::create_dir_all(lab_path(dir)).map_err(io_error(&lab_path(dir)))?;
        }
        let mut key = vec![0u8; 64];
        let urandom = Path::new("/dev/urandom");
        std::io::Read::read_exact(&mut fs::File::open(urandom).map_err(io_error(urandom))?, &mut key)
            .map_err(io_error(urandom))?;
        write_secret(&lab_path("cluster.key"), &key.iter().map(|b| format!("{b:02x}")).collect::<String>())?;
        write_secret(&lab_path("bmc.pw"), &format!("{BMC_PASSWORD}\n"))?;
        say("datastore: faultfs over LAB_DIR/backing, mounted at LAB_DIR/ds");
        self.start_faultfs()?;
        let datastore = match self.spec.datastore {
            Datastore::Dir => lab_path("ds/cluster"),
            Datastore::Block => self.make_lun()?,
        };
        self.havirt_ok(&[
            "init",
            "--cluster",
            CLUSTER,
            "--datastore",
            &datastore.to_string_lossy(),
            "--key-file",
            &lab_path("cluster.key").to_string_lossy(),
        ])?;
        let config = lab_path("havirt.toml");
        fs::write(&config, config_text(&self.spec)).map_err(io_error(&config))?;
        fs::create_dir_all(lab_path("ds/images")).map_err(io_error(&lab_path("ds/images")))?;
        for n in 1..=self.spec.hosts {
            self.add_host(n)?;
        }
        if self.spec.lan.is_some() {
            // In the host's network namespace, which outlives its power cycles.
            for n in 1..=self.spec.hosts {
                let (ns, br) = (host_ns(n), lan_bridge(n));
                run_args("ip", &["-n", &ns, "link", "add", &br, "type", "bridge"])?;
                run_args("ip", &["-n", &ns, "link", "set", &br, "up"])?;
            }
            say("LAN bridges: lan-hN in each host, bridge_map on the mapped hosts");
        }
        for n in 1..=self.spec.hosts {
            self.power_on(n)?;
            say(&format!("h{n}: powered on through its BMC ({}), libvirtd up", bmc_addr(n)));
        }
        self.wait_daemons()?;
        say("havirt daemons answering");
        if self.spec.guest_os > 0 {
            self.install_guest_image()?;
        }
        for i in 1..=self.spec.domains {
            self.add_domain(i)?;
        }
        self.wait_settled(SETTLE_WAIT)?;
        say("settled: every daemon sees every host alive and every domain running once");
        Ok(())
    }

    /// The LUN file and every host's loop device of it; returns host 1's
    /// device (for `havirt init`).
    fn make_lun(&self) -> Result<PathBuf, LabError> {
        let file = format!("{}.img", lun::LUN_NAME);
        lun::create_file(&file, lun::LUN_BYTES)?;
        let mut first = None;
        for n in 1..=self.spec.hosts {
            let dev = lun::attach(n, &file, lun::LUN_NAME)?;
            first.get_or_insert(dev);
        }
        say(&format!(
            "block datastore: {} on faultfs, a loop device (direct I/O) per host, at {} in each",
            lun::file_on_faultfs(&file).display(),
            lun::shared_path(lun::LUN_NAME).display()
        ));
        first.ok_or_else(|| LabError::State { what: "a lab has hosts".into() })
    }

    /// Domain `name`'s raw disk and every host's loop device of it.
    fn make_block_disk(&self, name: &str) -> Result<(), LabError> {
        let file = format!("{name}.img");
        lun::create_file(&file, DOMAIN_DISK_BYTES)?;
        for n in 1..=self.spec.hosts {
            lun::attach(n, &file, name)?;
        }
        Ok(())
    }

    fn start_faultfs(&mut self) -> Result<(), LabError> {
        let ds = lab_path("ds");
        share_datastore_mount(&ds)?;
        let log_path = lab_path("faultfs.log");
        let log = fs::File::create(&log_path).map_err(io_error(&log_path))?;
        let log2 = log.try_clone().map_err(io_error(&log_path))?;
        let socket = lab_path(FAULTFS_SOCKET);
        let child = Command::new(&self.spec.havirt)
            .args(["lab", "faultfs", "--backing"])
            .arg(lab_path("backing"))
            .arg("--mountpoint")
            .arg(&ds)
            .arg("--control")
            .arg(&socket)
            .current_dir(LAB_DIR)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            .process_group(0)
            .spawn()
            .map_err(|source| LabError::Spawn {
                command: format!("{} lab faultfs", self.spec.havirt.display()),
                source,
            })?;
        self.faultfs = Some(child);
        sys::wait_for_logged(
            || format!("faultfs answering on {}", socket.display()),
            &log_path,
            FAULTFS_START_WAIT,
            POLL,
            || faultfs::control(&socket, "status").is_ok(),
        )
    }

    fn add_host(&mut self, n: u16) -> Result<(), LabError> {
        let daemon = vec![
            self.spec.havirt.to_string_lossy().into_owned(),
            "daemon".into(),
            "--config".into(),
            lab_path("havirt.toml").to_string_lossy().into_owned(),
            "--host".into(),
            format!("h{n}"),
            "--socket".into(),
            control_socket(n).to_string_lossy().into_owned(),
        ];
        // A host that loses power loses its pending storage I/O too (its
        // qemu may sit in D state on a hung datastore).
        let abort = vec![
            self.spec.havirt.to_string_lossy().into_owned(),
            "lab".into(),
            "storage-fault".into(),
            "--control".into(),
            lab_path(FAULTFS_SOCKET).to_string_lossy().into_owned(),
            "abort".into(),
            format!("netns={}", host_ns(n)),
        ];
        let disks = self.spec.datastore == Datastore::Block;
        let host = Host::new(n, HostOptions { daemon: Some(daemon), power_off_hook: Some(abort), disks })?;
        host.prepare()?;
        // The watchdog's reset: the host loses power, as a real one would.
        let on_expire = Box::new(move || {
            tracing::warn!("lab watchdog of host {n} fired: powering it off");
            if let Err(e) = Host::new(n, HostOptions::default()).and_then(|mut h| h.power_off()) {
                tracing::warn!("lab watchdog of host {n}: power-off failed: {e}");
            }
        });
        let supervisor = Supervisor::start(&watchdog_socket(n), on_expire)
            .map_err(|e| LabError::State { what: format!("host {n}'s watchdog supervisor: {e}") })?;
        let bmc = Bmc::start(BmcSpec::lab(Path::new(LAB_DIR), n, BMC_PASSWORD)).map_err(bmc_err)?;
        self.hosts.push(host);
        self.supervisors.push(supervisor);
        self.bmcs.push(bmc);
        Ok(())
    }

    fn add_domain(&mut self, i: u16) -> Result<(), LabError> {
        let name = format!("vm{i}");
        let uuid = domain_uuid(i);
        let home = self.spec.home.unwrap_or((i - 1) % self.spec.hosts + 1);
        // Each host gets a mix: vm1..vmN high, the next N medium, ...
        let priority = PRIORITIES[usize::from((i - 1) / self.spec.hosts) % PRIORITIES.len()];
        let disk = disk_path(self.spec.datastore, &name);
        match self.spec.datastore {
            Datastore::Dir => {
                run(Command::new("timeout")
                    .args([&TOOL_TIMEOUT_S.to_string(), "qemu-img", "create", "-q", "-f", "qcow2"])
                    .arg(&disk)
                    .arg(DOMAIN_DISK))?;
            }
            Datastore::Block => self.make_block_disk(&name)?,
        }
        let xml_path = lab_path(&format!("domains/{name}.xml"));
        let mut xml = if i <= self.spec.guest_os {
            // TCG: this machine's (nested, paravirtual) KVM hangs a Linux
            // guest in its decompressor; TCG boots it in a few seconds.
            let (kernel, initrd) = (lab_path(GUEST_KERNEL), lab_path(GUEST_INITRD));
            super::guest::guest_os_xml(&name, &uuid, "qemu", &disk, &kernel, &initrd)
        } else {
            domain_xml(&name, &uuid)
        };
        if self.spec.lan.is_some() {
            xml = with_lan_nic(&xml, &lan_bridge(home));
        }
        if self.spec.datastore == Datastore::Block {
            xml = with_block_disk(&xml, &disk);
        }
        fs::write(&xml_path, xml).map_err(io_error(&xml_path))?;
        let uri = self.host(home)?.libvirt_uri();
        virsh(&uri, &["define", &xml_path.to_string_lossy()])?;
        virsh(&uri, &["start", &name])?;
        self.havirt_on(home, &["protect", &name, "--priority", priority])?;
        say(&format!("{name}: started on h{home}, protected (priority {priority})"));
        self.domains.push(LabDomain { name, uuid, home, priority });
        Ok(())
    }

    /// The guest OS image (built once per machine) onto the datastore,
    /// where every host's qemu reads it.
    fn install_guest_image(&self) -> Result<(), LabError> {
        let image = super::guest::ensure_image()?;
        for (from, to) in [(&image.kernel, GUEST_KERNEL), (&image.initrd, GUEST_INITRD)] {
            let to = lab_path(to);
            fs::copy(from, &to).map_err(io_error(from))?;
            fs::set_permissions(&to, fs::Permissions::from_mode(0o644)).map_err(io_error(&to))?;
        }
        say(&format!("guest OS {} on the datastore", image.key));
        Ok(())
    }

    /// Waits until every daemon answers its control socket.
    fn wait_daemons(&self) -> Result<(), LabError> {
        for n in 1..=self.spec.hosts {
            let what = || format!("host {n}'s daemon answering on {}", control_socket(n).display());
            let log = self.host(n)?.dir().join("havirt.log");
            sys::wait_for_logged(what, &log, SETTLE_WAIT, POLL, || self.daemon_status(n).is_ok())?;
        }
        Ok(())
    }

    pub fn spec(&self) -> &LabSpec {
        &self.spec
    }

    pub fn domains(&self) -> &[LabDomain] {
        &self.domains
    }

    pub fn host(&self, n: u16) -> Result<&Host, LabError> {
        self.hosts.get(usize::from(n).wrapping_sub(1)).ok_or(LabError::BadHost { host: n, max: self.spec.hosts })
    }

    pub fn hosts(&self) -> &[Host] {
        &self.hosts
    }

    fn bmc(&self, n: u16) -> Result<&Bmc, LabError> {
        self.host(n)?;
        Ok(&self.bmcs[usize::from(n) - 1])
    }

    /// (name, libvirt URI) of every host, for an `Observer`.
    pub fn observer_hosts(&self) -> Vec<(String, String)> {
        self.hosts.iter().map(|h| (format!("h{}", h.number()), h.libvirt_uri())).collect()
    }

    /// Runs the havirt CLI against host N's daemon.
    pub fn havirt_on(&self, n: u16, args: &[&str]) -> Result<String, LabError> {
        let socket = control_socket(n);
        let mut full: Vec<&str> = args.to_vec();
        full.extend(["--socket", socket.to_str().unwrap_or_default()]);
        self.havirt_ok(&full)
    }

    fn havirt_ok(&self, args: &[&str]) -> Result<String, LabError> {
        let out = run(Command::new(&self.spec.havirt).args(args))?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Host N's daemon's status (an error when it does not answer).
    pub fn daemon_status(&self, n: u16) -> Result<StatusReport, String> {
        match control::request(&control_socket(n), &Request::Status, CONTROL_TIMEOUT) {
            Ok(Response::Status(report)) => Ok(*report),
            Ok(other) => Err(format!("unexpected answer {other:?}")),
            Err(e) => Err(e.to_string()),
        }
    }

    /// Which hosts run each lab domain, read from every host's libvirtd
    /// (a host that does not answer runs nothing).
    pub fn placement(&self) -> BTreeMap<String, Vec<u16>> {
        let mut out: BTreeMap<String, Vec<u16>> = self.domains.iter().map(|d| (d.name.clone(), Vec::new())).collect();
        for h in &self.hosts {
            for name in running_on(h).unwrap_or_default() {
                out.entry(name).or_default().push(h.number());
            }
        }
        out
    }

    /// The master, as the first daemon that answers names it.
    pub fn master(&self) -> Option<u16> {
        (1..=self.spec.hosts).find_map(|n| self.daemon_status(n).ok()?.view.master.map(|m| m.0))
    }

    /// The host to fault: the one running the most domains in `placement`
    /// (lowest number on a tie), the master excepted unless no other host
    /// runs any (a fault must stop some domain).
    pub fn busiest_host(&self, placement: &BTreeMap<String, Vec<u16>>) -> u16 {
        let master = self.master();
        let load = |h: u16| placement.values().filter(|on| on.contains(&h)).count();
        let busiest = (1..=self.spec.hosts)
            .filter(|h| Some(*h) != master)
            .max_by_key(|h| (load(*h), std::cmp::Reverse(*h)))
            .unwrap_or(1);
        match master {
            Some(m) if load(busiest) == 0 => m,
            _ => busiest,
        }
    }

    /// Why the lab has not settled, if it has not: every host that is on
    /// and not paused must answer, see every other such host alive, and
    /// report every domain running; every domain must run on exactly one
    /// host.
    pub fn unsettled(&self) -> Option<String> {
        let up: Vec<u16> = self.hosts.iter().filter(|h| h.is_on()).map(Host::number).collect();
        for (name, hosts) in self.placement() {
            if hosts.len() != 1 {
                return Some(format!("{name} runs on {hosts:?}"));
            }
        }
        for &n in &up {
            let report = match self.daemon_status(n) {
                Ok(r) => r,
                Err(e) => return Some(format!("h{n}'s daemon: {e}")),
            };
            let view = &report.view;
            for h in &view.hosts {
                let peer_up = up.contains(&h.id.0);
                if peer_up && h.verdict != "self" && h.verdict != "alive" {
                    return Some(format!("h{n} sees {} as {}", h.name, h.verdict));
                }
            }
            if view.master.is_none() {
                return Some(format!("h{n} knows no master"));
            }
            for d in &self.domains {
                let seen = view.domains.iter().find(|v| v.name == d.name);
                let running = seen.is_some_and(|v| {
                    matches!(v.state, Some(DomainState::Running | DomainState::Ready)) && v.host.is_some()
                });
                if !running {
                    return Some(format!("h{n} does not see {} running ({seen:?})", d.name));
                }
            }
        }
        None
    }

    /// Waits until `unsettled` says nothing.
    pub fn wait_settled(&self, timeout: Duration) -> Result<(), LabError> {
        let start = now();
        loop {
            let Some(why) = self.unsettled() else { return Ok(()) };
            if start.elapsed() >= timeout {
                return Err(LabError::Timeout {
                    what: format!("the lab settling: {why}"),
                    waited_ms: timeout.as_millis(),
                });
            }
            std::thread::sleep(POLL);
        }
    }

    /// Powers host N on through its BMC and waits for its libvirtd.
    /// A failure names the log that says why: the BMC's (ipmi_sim runs
    /// the host's start command, whose output it logs) while the host is
    /// not up, then its libvirtd's.
    fn power_on(&mut self, n: u16) -> Result<(), LabError> {
        let bmc = self.bmc(n)?;
        bmc.power_on().map_err(bmc_err)?;
        let bmc_log = bmc.spec().log_path();
        let host = self.host(n)?;
        let what = || format!("host {n} on after its BMC's power on (ipmi_sim runs its start command)");
        sys::wait_for_logged(what, &bmc_log, POWER_WAIT, super::host::POLL, || host.is_on())?;
        host.wait_libvirt(LIBVIRT_START_WAIT).map_err(|e| {
            if host.is_on() {
                e
            } else {
                let what = format!("host {n} went off by itself after its BMC's power on ({e})");
                LabError::FailedSee { what, tail: sys::log_tail(&bmc_log), log: bmc_log.clone() }
            }
        })
    }

    fn faultfs_command(&self, command: &str) -> Result<(), LabError> {
        faultfs::control(&lab_path(FAULTFS_SOCKET), command)
            .map(drop)
            .map_err(|e| LabError::State { what: format!("faultfs {command:?}: {e}") })
    }

    /// Injects `fault`; returns when it holds.
    pub fn fault(&mut self, fault: &Fault) -> Result<(), LabError> {
        match fault {
            Fault::PowerOff(n) => {
                let n = *n;
                if self.dead_bmcs.contains(&n) {
                    self.host(n)?;
                    self.hosts[usize::from(n) - 1].power_off()?;
                } else {
                    self.bmc(n)?.power_off().map_err(bmc_err)?;
                    let host = self.host(n)?;
                    let what = || format!("host {n} off after its BMC's power off");
                    let log = self.bmc(n)?.spec().log_path();
                    sys::wait_for_logged(what, &log, POWER_WAIT, super::host::POLL, || !host.is_on())?;
                }
            }
            Fault::PowerOn(n) => self.power_on(*n)?,
            Fault::BmcDead(n) => {
                self.bmc(*n)?.freeze().map_err(bmc_err)?;
                self.dead_bmcs.push(*n);
            }
            Fault::BmcAlive(n) => {
                self.bmc(*n)?.thaw().map_err(bmc_err)?;
                self.dead_bmcs.retain(|b| b != n);
            }
            Fault::Pause(n) => self.host(*n)?.pause()?,
            Fault::Resume(n) => self.host(*n)?.resume()?,
            Fault::Partition { from, to, both_ways } => {
                let to: Vec<u16> = if to.is_empty() {
                    (1..=self.spec.hosts).filter(|h| !from.contains(h)).collect()
                } else {
                    to.clone()
                };
                self.net.partition(from, &to, *both_ways)?;
            }
            Fault::Isolate(n) => self.net.isolate(*n)?,
            Fault::Heal => self.net.heal()?,
            Fault::StorageHang(n) => self.faultfs_command(&format!("hang netns={}", host_ns(*n)))?,
            Fault::StorageEio(n) => self.faultfs_command(&format!("eio netns={}", host_ns(*n)))?,
            Fault::StorageDelay(n, ms) => self.faultfs_command(&format!("delay {ms} netns={}", host_ns(*n)))?,
            Fault::StorageOk(n) => self.faultfs_command(&format!("ok netns={}", host_ns(*n)))?,
            Fault::KillDaemon(n) => {
                self.host(*n)?.kill_daemon()?;
            }
            Fault::KillLibvirtd(n) => {
                self.host(*n)?.kill_libvirtd()?;
            }
            Fault::KillQemu(n, domain) => self.kill_qemu(*n, domain)?,
            Fault::GuestPanic(n, domain) => {
                let script = format!("sleep {GUEST_PANIC_DELAY_S}; echo c > /proc/sysrq-trigger");
                let exec = serde_json::json!({"execute": "guest-exec", "arguments": {"path": "/bin/sh", "arg": ["-c", script]}});
                self.guest_agent_retried(*n, domain, &exec.to_string())?;
            }
            Fault::GuestShutdown(n, domain) => {
                // libvirt's agent shutdown: qemu-ga's guest-shutdown, which
                // never answers (the guest is gone), handled by libvirt.
                virsh(&self.host(*n)?.libvirt_uri(), &["shutdown", "--mode", "agent", domain])?;
            }
        }
        Ok(())
    }

    /// One guest-agent command (JSON) to `domain` on host N, through its
    /// libvirtd; the agent's answer. An error when the agent does not
    /// answer within AGENT_COMMAND_TIMEOUT_S.
    pub fn guest_agent(&self, n: u16, domain: &str, json: &str) -> Result<String, LabError> {
        let timeout = AGENT_COMMAND_TIMEOUT_S.to_string();
        virsh(&self.host(n)?.libvirt_uri(), &["qemu-agent-command", domain, json, "--timeout", &timeout])
    }

    /// `guest_agent`, tried up to AGENT_COMMAND_TRIES times: the agent
    /// serves one command at a time, and the daemon's monitoring pings
    /// share it (a busy agent fails libvirt's sync: "not available for now").
    fn guest_agent_retried(&self, n: u16, domain: &str, json: &str) -> Result<String, LabError> {
        let mut tries = 1;
        loop {
            match self.guest_agent(n, domain, json) {
                Err(_) if tries < AGENT_COMMAND_TRIES => tries += 1,
                other => return other,
            }
            std::thread::sleep(POLL);
        }
    }

    /// SIGKILL of the qemu process of `domain` on host N.
    fn kill_qemu(&self, n: u16, domain: &str) -> Result<(), LabError> {
        let host = self.host(n)?;
        let want = format!("guest={domain},");
        let victims: Vec<u32> = host
            .pids()
            .into_iter()
            .filter(|p| {
                let argv = sys::cmdline(*p);
                argv.first().is_some_and(|a| a.contains("qemu-system")) && argv.iter().any(|a| a.starts_with(&want))
            })
            .collect();
        if victims.is_empty() {
            return Err(LabError::State { what: format!("no qemu of {domain} runs on host {n}") });
        }
        for pid in victims {
            sys::signal(pid, libc::SIGKILL);
        }
        Ok(())
    }

    /// `lab status`: every host (power, BMC, its daemon's view) and where
    /// each domain really runs.
    pub fn status_text(&self) -> String {
        let mut out = String::new();
        out.push_str(&format!(
            "lab: {} hosts, {} domains, fencing {:?}, profile {}, datastore {}\n",
            self.spec.hosts,
            self.domains.len(),
            self.spec.fencing,
            self.spec.profile,
            self.spec.datastore
        ));
        out.push_str("host  power  bmc    daemon view (verdicts of h1..hN; master)\n");
        for h in &self.hosts {
            let n = h.number();
            let power = if h.is_on() { "on" } else { "off" };
            let bmc = if self.dead_bmcs.contains(&n) { "dead" } else { "ok" };
            let view = match self.daemon_status(n) {
                Ok(r) => {
                    let verdicts: Vec<String> =
                        r.view.hosts.iter().map(|v| format!("{}={}", v.name, v.verdict)).collect();
                    let master = r.view.master.map_or("none".to_string(), |m| format!("h{}", m.0));
                    format!("{}; master {master}; self-fence {}", verdicts.join(" "), r.view.self_fence)
                }
                Err(_) if !h.is_on() => "-".to_string(),
                Err(e) => format!("no answer: {e}"),
            };
            out.push_str(&format!("h{n:<4} {power:<6} {bmc:<6} {view}\n"));
        }
        out.push_str("domain   priority  runs on (from each host's libvirtd)\n");
        for (name, hosts) in self.placement() {
            let prio = self.domains.iter().find(|d| d.name == name).map_or("-", |d| d.priority);
            let on: Vec<String> = hosts.iter().map(|h| format!("h{h}")).collect();
            let on = if on.is_empty() { "nowhere".to_string() } else { on.join(", ") };
            out.push_str(&format!("{name:<8} {prio:<9} {on}\n"));
        }
        out
    }

    /// Tears the lab down: supervisors first (a dying daemon must not
    /// fire them), then everything `lab::down` finds.
    pub fn down(mut self) -> Result<super::DownReport, LabError> {
        self.teardown()
    }

    fn teardown(&mut self) -> Result<super::DownReport, LabError> {
        for s in self.supervisors.drain(..) {
            s.stop();
        }
        for n in self.dead_bmcs.drain(..) {
            if let Some(b) = self.bmcs.get(usize::from(n) - 1) {
                let _ = b.thaw();
            }
        }
        let report = super::down();
        for mut b in self.bmcs.drain(..) {
            b.kill();
        }
        if let Some(mut child) = self.faultfs.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        self.hosts.clear();
        report
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if self.supervisors.is_empty() && self.bmcs.is_empty() && self.faultfs.is_none() && self.hosts.is_empty() {
            return;
        }
        if let Err(e) = self.teardown() {
            eprintln!("lab teardown: {e}; run `havirt lab down`");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(s: &str) -> Vec<String> {
        s.split_whitespace().map(String::from).collect()
    }

    #[test]
    fn faults_parse_as_lab_fault_takes_them() {
        assert_eq!(Fault::parse(&words("power-off 2")), Ok(Fault::PowerOff(2)));
        assert_eq!(Fault::parse(&words("kill-qemu h3 vm4")), Ok(Fault::KillQemu(3, "vm4".into())));
        assert_eq!(Fault::parse(&words("storage-delay h1 500")), Ok(Fault::StorageDelay(1, 500)));
        assert_eq!(
            Fault::parse(&words("partition 1,2 3 --one-way")),
            Ok(Fault::Partition { from: vec![1, 2], to: vec![3], both_ways: false })
        );
        assert_eq!(
            Fault::parse(&words("partition h3")),
            Ok(Fault::Partition { from: vec![3], to: vec![], both_ways: true })
        );
        assert_eq!(Fault::parse(&words("heal")), Ok(Fault::Heal));
        let err = Fault::parse(&words("power-off")).unwrap_err();
        assert!(err.contains("power-off H"), "{err}");
        assert!(Fault::parse(&words("pause hx")).unwrap_err().contains("not a host"));
        assert!(Fault::parse(&words("melt 1")).is_err());
    }

    #[test]
    fn config_of_the_lab_is_valid() {
        for fencing in [Fencing::Ipmilan, Fencing::Ipmitool, Fencing::Disabled] {
            let spec = LabSpec { fencing, ..LabSpec::new(3, 3, PathBuf::from("/usr/bin/havirt")) };
            let text = config_text(&spec);
            let parsed = crate::config::Config::parse("lab.toml", &text);
            assert!(parsed.is_ok(), "{fencing:?}: {parsed:?}\n{text}");
        }
    }

    #[test]
    fn lan_maps_h1s_bridge_on_the_mapped_hosts_only() {
        use crate::hypervisor::netmap::{NetKind, interfaces};
        let spec =
            LabSpec { lan: Some(LanSpec { mapped: vec![2] }), ..LabSpec::new(3, 3, PathBuf::from("/usr/bin/havirt")) };
        let text = config_text(&spec);
        let (config, _) = crate::config::Config::parse("lab.toml", &text).expect("lab config with maps");
        let local: Vec<&str> = config.hosts.iter().map(|h| h.net_map.local(NetKind::Bridge, "lan-h1")).collect();
        assert_eq!(local, ["lan-h1", "lan-h2", "lan-h1"]);
        let xml = with_lan_nic(&domain_xml("vm1", &domain_uuid(1)), &lan_bridge(1));
        let uses = interfaces(&xml).expect("well-formed");
        assert_eq!(uses.iter().map(ToString::to_string).collect::<Vec<_>>(), ["bridge lan-h1"]);
    }
}
