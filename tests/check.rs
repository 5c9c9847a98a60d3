//! `havirt check` end to end: a real datastore directory made with
//! `DirStore::init`, a configuration file and key on disk, and libvirt's
//! in-process `test:///default` driver.
//!
//! Scratch directories live under cargo's per-crate `CARGO_TARGET_TMPDIR`
//! (as in tests/store.rs), on the target directory's filesystem, where
//! O_DIRECT works. `test:///default` state is shared by every test of this
//! process: each test asserts only on its own subjects, and the domains test
//! uses names of its own.

use havirt::check::{self, CheckOptions, Finding, Level};
use havirt::engine::config::{DomainId, HostId};
use havirt::hypervisor::{Hypervisor, LibvirtHypervisor, LibvirtOptions, POLICY_NS, uuid_string};
use havirt::store::dir::DirStore;
use havirt::store::inventory::{self, Inventory};
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

const CLUSTER: &str = "lab";
const URI: &str = "test:///default";
const KEY_BYTES: usize = 64;

/// A fresh directory for one test.
fn scratch(name: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("check").join(name);
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).expect("scratch dir");
    dir
}

/// A key file with `mode`, a config naming it and `datastore`; returns the
/// config path and the key path. h2's IPMI password file does not exist.
fn setup(dir: &Path, datastore: &Path, key_mode: u32) -> (PathBuf, PathBuf) {
    let key = dir.join("cluster.key");
    fs::write(&key, [7u8; KEY_BYTES]).expect("write key");
    fs::set_permissions(&key, fs::Permissions::from_mode(key_mode)).expect("chmod key");
    let text = format!(
        r#"[cluster]
name = "{CLUSTER}"
key_file = "{key}"
datastore = {{ kind = "dir", path = "{datastore}" }}

[[host]]
name = "h1"
id = 1
addresses = ["192.0.2.11"]
watchdog = "none"

[[host.fence]]
kind = "storage"

[[host]]
name = "h2"
id = 2
addresses = ["192.0.2.12"]
watchdog = "device"

[[host.fence]]
kind = "ipmi"
address = "192.0.2.21"
username = "havirt"
password_file = "{password}"
"#,
        key = key.display(),
        password = dir.join("h2-ipmi.pw").display(),
        datastore = datastore.display()
    );
    let config = dir.join("havirt.toml");
    fs::write(&config, text).expect("write config");
    (config, key)
}

fn options(config: &Path) -> CheckOptions {
    CheckOptions { config_path: config.to_path_buf(), host: Some("h1".into()), libvirt_uri: URI.into() }
}

/// The findings about `what`, with the whole report in the panic message.
fn about<'f>(findings: &'f [Finding], what: &str) -> Vec<&'f Finding> {
    findings.iter().filter(|f| f.what == what).collect()
}

#[track_caller]
fn all_ok(findings: &[Finding], what: &str) {
    let these = about(findings, what);
    let report = check::render(findings);
    assert!(!these.is_empty(), "no finding about {what}:\n{report}");
    assert!(these.iter().all(|f| f.level == Level::Ok), "{what} not ok:\n{report}");
}

#[track_caller]
fn has_error(findings: &[Finding], what: &str, says: &str) {
    let report = check::render(findings);
    assert!(
        about(findings, what).iter().any(|f| f.level == Level::Error && f.detail.contains(says)),
        "wanted an error about {what} saying {says:?}:\n{report}"
    );
}

#[test]
fn a_healthy_datastore_and_key_check_ok() {
    let dir = scratch("healthy");
    let datastore = dir.join(CLUSTER);
    DirStore::init(&datastore, CLUSTER).expect("init datastore");
    let (config, _) = setup(&dir, &datastore, 0o600);
    let findings = check::run(&options(&config));
    for what in ["config", "host", "timings", "datastore", "o_direct", "lock", "libvirt"] {
        all_ok(&findings, what);
    }
    let key = about(&findings, "key");
    assert!(key.iter().any(|f| f.level == Level::Ok), "{}", check::render(&findings));
    assert!(key.iter().all(|f| f.level != Level::Error), "{}", check::render(&findings));
    let latency = about(&findings, "latency");
    assert!(latency.len() == 1 && latency[0].detail.contains("median"), "{}", check::render(&findings));
    // h1: watchdog "none" and only storage poison: a warning, once.
    let takeover = about(&findings, "takeover");
    let warned: Vec<_> = takeover.iter().filter(|f| f.level == Level::Warning).collect();
    assert!(warned.len() == 1 && warned[0].detail.contains("havirt fence confirm h1"), "{}", check::render(&findings));
    assert!(about(&findings, "watchdog").iter().all(|f| f.level == Level::Warning));
    // This host fences h2: its missing password file is an error here.
    has_error(&findings, "fence", "h2-ipmi.pw");
    // The scratch file is gone: the datastore holds havirt's layout only.
    let left: Vec<_> = fs::read_dir(&datastore).expect("list").flatten().map(|e| e.file_name()).collect();
    assert!(left.iter().all(|n| !n.to_string_lossy().starts_with(".havirt-check")), "{left:?}");
    let text = check::render(&findings);
    assert!(text.lines().any(|l| l.starts_with("ok      datastore")), "{text}");
}

#[test]
fn a_world_readable_key_is_an_error_naming_it() {
    let dir = scratch("world_readable_key");
    DirStore::init(&dir.join(CLUSTER), CLUSTER).expect("init datastore");
    let (config, key) = setup(&dir, &dir.join(CLUSTER), 0o644);
    let findings = check::run(&options(&config));
    has_error(&findings, "key", &key.display().to_string());
    has_error(&findings, "key", "chmod 600");
    all_ok(&findings, "datastore");
}

#[test]
fn a_missing_datastore_is_an_error_naming_it() {
    let dir = scratch("missing_datastore");
    let datastore = dir.join("not-mounted").join(CLUSTER);
    let (config, _) = setup(&dir, &datastore, 0o600);
    let findings = check::run(&options(&config));
    has_error(&findings, "datastore", &datastore.display().to_string());
    // Nothing was created where the datastore should be.
    assert!(!datastore.exists());
    assert!(about(&findings, "o_direct").is_empty() && about(&findings, "lock").is_empty());
    all_ok(&findings, "key");
}

#[test]
fn a_datastore_without_the_layout_is_an_error() {
    let dir = scratch("no_layout");
    let datastore = dir.join(CLUSTER);
    fs::create_dir_all(&datastore).expect("bare directory");
    let (config, _) = setup(&dir, &datastore, 0o600);
    let findings = check::run(&options(&config));
    has_error(&findings, "datastore", "not initialized");
    // The directory itself works: its I/O is still checked.
    all_ok(&findings, "o_direct");
    all_ok(&findings, "lock");
}

#[test]
fn an_unreadable_config_still_checks_libvirt() {
    let dir = scratch("no_config");
    let findings = check::run(&options(&dir.join("absent.toml")));
    has_error(&findings, "config", "absent.toml");
    all_ok(&findings, "libvirt");
    assert!(about(&findings, "datastore").is_empty());
}

/// A test-driver domain with `devices` and `metadata` in its definition.
fn define(hv: &LibvirtHypervisor, name: &str, id: u128, metadata: &str, devices: &str) {
    let xml = format!(
        "<domain type='test'><name>{name}</name><uuid>{}</uuid><memory unit='MiB'>64</memory><vcpu>1</vcpu>\
         <os><type>hvm</type></os><metadata>{metadata}</metadata><devices>{devices}</devices></domain>",
        uuid_string(DomainId(id))
    );
    hv.define(&xml).expect("define");
}

#[test]
fn protected_domains_need_shared_disks_and_their_bridges() {
    let dir = scratch("domains");
    let datastore = dir.join(CLUSTER);
    DirStore::init(&datastore, CLUSTER).expect("init datastore");
    let (config, _) = setup(&dir, &datastore, 0o600);
    let shared = dir.join("good.qcow2");
    fs::write(&shared, b"disk").expect("disk image");
    let missing = dir.join("missing.qcow2");
    let local = PathBuf::from("/dev/shm/havirt-check-test-local.qcow2");
    fs::write(&local, b"disk").expect("local disk");
    let disk = |p: &Path, dev: &str| {
        format!("<disk type='file' device='disk'><source file='{}'/><target dev='{dev}'/></disk>", p.display())
    };
    let policy = |attrs: &str| format!("<havirt:policy xmlns:havirt='{POLICY_NS}' {attrs}/>");
    let hv = LibvirtHypervisor::open(LibvirtOptions::new(URI)).expect("open test driver");
    // Any network device of this host will do as an existing "bridge": lo.
    let good_devices = format!("{}<interface type='bridge'><source bridge='lo'/></interface>", disk(&shared, "vda"));
    define(&hv, "chk-good", 0xc4ec_0001, &policy("priority='high'"), &good_devices);
    let bad_devices = format!(
        "{}{}<interface type='bridge'><source bridge='hvchk-nobr0'/></interface>",
        disk(&missing, "vda"),
        disk(&local, "vdb")
    );
    define(&hv, "chk-bad", 0xc4ec_0002, &policy("priority='high'"), &bad_devices);
    define(&hv, "chk-typo", 0xc4ec_0003, &policy("priority='urgent'"), "");
    define(&hv, "chk-plain", 0xc4ec_0004, "", &disk(&missing, "vda"));

    let findings = check::run(&options(&config));
    let _ = fs::remove_file(&local);
    let report = check::render(&findings);
    println!("{report}");
    let domain = about(&findings, "domain");
    let on = |name: &str| domain.iter().filter(|f| f.detail.starts_with(&format!("{name}:"))).collect::<Vec<_>>();
    let good = on("chk-good");
    assert!(good.len() == 1 && good[0].level == Level::Ok && good[0].detail.contains("lo present here"), "{report}");
    has_error(&findings, "domain", &format!("chk-bad: disk {}", missing.display()));
    has_error(&findings, "domain", "chk-bad: bridge \"hvchk-nobr0\" does not exist");
    let local_disk = on("chk-bad").into_iter().find(|f| f.detail.contains(&local.display().to_string()));
    assert!(local_disk.is_some_and(|f| f.level == Level::Warning && f.detail.contains("local filesystem")), "{report}");
    has_error(&findings, "domain", "chk-typo: its havirt policy does not parse");
    assert!(on("chk-plain").is_empty(), "an unprotected domain is not checked:\n{report}");
}

// ------------------------------------------------------------------ networks per host

/// A stored (cluster-named) definition with `policy` and `devices`.
fn store_definition(store: &DirStore, name: &str, id: u128, policy: &str, devices: &str) {
    let xml = format!(
        "<domain type='kvm'><name>{name}</name><uuid>{}</uuid><memory unit='KiB'>65536</memory><vcpu>1</vcpu>\
         <metadata><havirt:policy xmlns:havirt='{POLICY_NS}' {policy}</havirt:policy></metadata>\
         <devices>{devices}</devices></domain>",
        uuid_string(DomainId(id))
    );
    store.write_domain_xml(DomainId(id), &xml).expect("store definition");
}

fn bridge(name: &str) -> String {
    format!("<interface type='bridge'><source bridge='{name}'/></interface>")
}

fn h2_inventory(written_unix_ms: u64) -> Inventory {
    Inventory {
        format: inventory::FORMAT,
        cluster: CLUSTER.into(),
        host: "h2".into(),
        host_id: 2,
        written_unix_ms,
        bridges: vec!["lan-h2".into()],
        networks: Some(vec!["lan".into()]),
    }
}

fn unix_ms_now() -> u64 {
    #[allow(clippy::disallowed_methods, reason = "a fresh inventory is stamped with wall time")]
    let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("after 1970");
    u64::try_from(t.as_millis()).expect("fits")
}

/// h2 maps the cluster's `lanx` to its `lan-h2`, `lany` to a `vmbr9` it
/// lacks, and the `default` network to its `lan`; h1 (here) has none of
/// these bridges.
fn networks_setup(name: &str) -> (PathBuf, DirStore, PathBuf) {
    let dir = scratch(name);
    let datastore = dir.join(CLUSTER);
    let store = DirStore::init(&datastore, CLUSTER).expect("init datastore");
    let (config, _) = setup(&dir, &datastore, 0o600);
    let text = fs::read_to_string(&config).expect("config").replacen(
        "watchdog = \"device\"\n",
        "watchdog = \"device\"\nbridge_map = { \"lanx\" = \"lan-h2\", \"lany\" = \"vmbr9\" }\nnetwork_map = { \"default\" = \"lan\" }\n",
        1,
    );
    fs::write(&config, text).expect("config with maps");
    let only = |h: &str| format!("><havirt:affinity host='{h}'/>");
    store_definition(
        &store,
        "net-ok",
        0x2e70_0001,
        &only("h2"),
        &format!("{}{}", bridge("lanx"), "<interface type='network'><source network='default'/></interface>"),
    );
    store_definition(&store, "net-unmapped", 0x2e70_0002, &only("h2"), &bridge("br-x"));
    store_definition(&store, "net-mapped-missing", 0x2e70_0003, &only("h2"), &bridge("lany"));
    store_definition(&store, "net-local", 0x2e70_0004, &only("h1"), &bridge("hvchk-nobr1"));
    store_definition(&store, "net-ambiguous", 0x2e70_0005, &only("h2"), &bridge("lan-h2"));
    (config, store, datastore)
}

#[test]
fn stored_domains_need_their_bridges_on_every_host_after_its_map() {
    let (config, _store, datastore) = networks_setup("networks");
    inventory::write(&datastore, HostId(2), &h2_inventory(unix_ms_now())).expect("h2 inventory");
    let findings = check::run(&options(&config));
    let report = check::render(&findings);
    println!("{report}");
    has_error(&findings, "network", "domain net-unmapped cannot run on h2: bridge br-x does not exist there");
    has_error(
        &findings,
        "network",
        "domain net-mapped-missing cannot run on h2: bridge lany (mapped to vmbr9) does not exist there",
    );
    has_error(&findings, "network", "domain net-local cannot run on h1: bridge hvchk-nobr1 does not exist there");
    let net = about(&findings, "network");
    assert!(net.iter().all(|f| !f.detail.contains("net-ok")), "net-ok runs on h2 after its map:\n{report}");
    let ambiguous = net.iter().filter(|f| f.level == Level::Warning).collect::<Vec<_>>();
    assert!(
        ambiguous.len() == 1
            && ambiguous[0].detail.contains(
                "domain net-ambiguous uses bridge lan-h2, which h2's bridge_map makes the local name of lanx"
            ),
        "{report}"
    );
    assert_eq!(net.len(), 4, "{report}");
}

#[test]
fn a_missing_stale_or_corrupt_inventory_is_unknown_not_fine() {
    let (config, _store, datastore) = networks_setup("networks_unknown");
    let warned = |says: &str| {
        let findings = check::run(&options(&config));
        let report = check::render(&findings);
        let net = about(&findings, "network");
        assert!(
            net.iter().any(|f| f.level == Level::Warning && f.detail.contains(says)),
            "wanted a warning saying {says:?}:\n{report}"
        );
        assert!(net.iter().all(|f| !f.detail.contains("cannot run on h2")), "nothing is judged on h2:\n{report}");
    };
    warned("no inventory of h2 on the datastore: daemon not running on h2?");
    let old = unix_ms_now() - 1000 * (inventory::INVENTORY_MAX_AGE_S + 60);
    inventory::write(&datastore, HostId(2), &h2_inventory(old)).expect("old inventory");
    warned("s old (rewritten every 60 s): daemon not running on h2");
    fs::write(inventory::path(&datastore, HostId(2)), "{\"bridges\":[\"br-x\"]}\n").expect("corrupt");
    warned("the inventory of h2 was rejected");
}

#[test]
fn alert_receivers_are_checked_as_the_daemon_starts_them() {
    let dir = scratch("alerts");
    let datastore = dir.join(CLUSTER);
    DirStore::init(&datastore, CLUSTER).expect("init datastore");
    let (config, _) = setup(&dir, &datastore, 0o600);
    let good = dir.join("alert.key");
    fs::write(&good, [9u8; 32]).expect("write alert key");
    fs::set_permissions(&good, fs::Permissions::from_mode(0o600)).expect("chmod");
    let open = dir.join("open.key");
    fs::write(&open, [9u8; 32]).expect("write alert key");
    fs::set_permissions(&open, fs::Permissions::from_mode(0o644)).expect("chmod");
    let alerts = format!(
        "\n[[alert]]\nkind = \"webhook\"\nname = \"hook\"\nurl = \"https://alerts.example.org/x/token\"\nsecret_file = \"{}\"\n\
         \n[[alert]]\nkind = \"webhook\"\nname = \"open\"\nurl = \"https://alerts.example.org/y\"\nsecret_file = \"{}\"\n\
         \n[[alert]]\nkind = \"command\"\nname = \"sh\"\ncommand = [\"sh\", \"-c\", \"cat\"]\n\
         \n[[alert]]\nkind = \"command\"\nname = \"gone\"\ncommand = [\"/nonexistent/notify\"]\n",
        good.display(),
        open.display()
    );
    let mut text = fs::read_to_string(&config).expect("config");
    text.push_str(&alerts);
    fs::write(&config, text).expect("write config");
    let findings = check::run(&options(&config));
    all_ok(&findings, "alert hook");
    let hook = &about(&findings, "alert hook")[0].detail;
    assert!(hook.contains("https://alerts.example.org/...") && !hook.contains("token"), "{hook}");
    has_error(&findings, "alert open", "chmod 600");
    all_ok(&findings, "alert sh");
    has_error(&findings, "alert gone", "/nonexistent/notify");
}
