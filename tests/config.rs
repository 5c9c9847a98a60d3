//! The configuration file: the shipped example loads, and every malformed
//! file is refused with a message that names the file, the line and the key.

use havirt::config::{Config, ConfigError, ConfigWarning, Datastore, FenceMethod, Watchdog, check_key_file};
use havirt::engine::config::{AdmissionMode, AdmissionPolicy, HostId, Profile};
use havirt::hypervisor::netmap::NetKind;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;

/// A valid two-host file; the line numbers below refer to it.
const BASE: &str = r#"[cluster]
name = "lab"
key_file = "/etc/havirt/cluster.key"
profile = "default"

[cluster.datastore]
kind = "dir"
path = "/mnt/nfs/.havirt/lab"

[[host]]
name = "h1"
id = 1
addresses = ["192.0.2.11", "198.51.100.11"]
watchdog = "device"

[[host.fence]]
kind = "ipmi"
address = "192.0.2.21"
username = "havirt"
password_file = "/etc/havirt/fence/h1.pw"

[[host]]
name = "h2"
id = 2
addresses = ["192.0.2.12", "198.51.100.12"]
watchdog = "device"

[[host.fence]]
kind = "storage"
"#;

fn tmp_path(name: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("config-tests");
    std::fs::create_dir_all(&dir).expect("create the test directory");
    dir.join(name)
}

fn write(name: &str, text: &str) -> PathBuf {
    let path = tmp_path(&format!("{name}.toml"));
    std::fs::write(&path, text).expect("write the test config");
    path
}

/// BASE with `old` (which must occur once) replaced by `new`.
fn edit(old: &str, new: &str) -> String {
    assert_eq!(BASE.matches(old).count(), 1, "test bug: {old:?} must occur once in BASE");
    BASE.replacen(old, new, 1)
}

/// Load `text` and require an error at `line` for `key` whose message also
/// holds every string in `says`.
#[track_caller]
fn refused(name: &str, text: &str, line: usize, key: &str, says: &[&str]) -> String {
    let path = write(name, text);
    let err = match Config::load(&path) {
        Ok(_) => panic!("{name}: the malformed config was accepted:\n{text}"),
        Err(e) => e,
    };
    assert!(matches!(err, ConfigError::Invalid { .. }), "{name}: {err:?}");
    let msg = err.to_string();
    let shown = path.display().to_string();
    assert!(msg.starts_with(&format!("{shown}:{line}:")), "{name}: wanted {shown}:{line}: in\n{msg}");
    assert!(msg.contains(&format!("key \"{key}\"")), "{name}: wanted key \"{key}\" in\n{msg}");
    for s in says {
        assert!(msg.contains(s), "{name}: wanted {s:?} in\n{msg}");
    }
    msg
}

fn loads(name: &str, text: &str) -> (Config, Vec<ConfigWarning>) {
    let path = write(name, text);
    Config::load(&path).unwrap_or_else(|e| panic!("{name}: refused: {e}"))
}

// ------------------------------------------------------------------ accepted

#[test]
fn shipped_example_loads_cleanly() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/config/havirt.toml");
    let (config, warnings) = Config::load(path).unwrap_or_else(|e| panic!("{e}"));
    assert!(warnings.is_empty(), "{warnings:?}");
    assert_eq!(config.cluster.name, "prod");
    assert_eq!(config.cluster.profile, Profile::Default);
    assert_eq!(config.cluster.timings, Profile::Default.timings());
    assert_eq!(config.cluster.datastore, Datastore::Dir { path: "/mnt/havirt-nfs/.havirt/prod".into() });
    assert_eq!(config.cluster.isolation_addresses.len(), 2);
    assert_eq!(config.hosts.len(), 3);
    for h in &config.hosts {
        assert_eq!(h.addresses.len(), 2, "{}", h.name);
        assert_eq!(h.watchdog, Watchdog::Device { device: "/dev/watchdog".into() });
        let kinds: Vec<&str> = h.fence.iter().map(|f| f.method.kind()).collect();
        assert_eq!(kinds, ["ipmi", "storage"], "{}", h.name);
        assert!(matches!(h.fence[0].method, FenceMethod::Ipmi { cipher: 3, .. }));
    }
    let spec = config.cluster_spec();
    assert_eq!(spec.name, "prod");
    assert_eq!(spec.hosts.len(), 3);
    assert!(spec.domains.is_empty());
    for h in &spec.hosts {
        assert_eq!(h.fence_agents, ["ipmi", "storage"]);
        assert!(h.watchdog);
        assert_eq!((h.memory_mib, h.vcpus), (0, 0), "capacity is the daemon's to fill");
    }
    assert_eq!(config.local_host("hv3").map(|h| h.id), Ok(HostId(3)));
    assert!(config.hosts[0].net_map.is_empty(), "hv1 uses the cluster's names");
    assert_eq!(config.hosts[2].net_map.local(NetKind::Bridge, "br-prod"), "vmbr0");
}

#[test]
fn base_loads_with_defaults() {
    let (config, warnings) = loads("base", BASE);
    assert!(warnings.is_empty(), "{warnings:?}");
    assert_eq!(config.cluster.net_port, 7405);
    assert_eq!(config.cluster.memory_overcommit, 1.0);
    assert_eq!(config.cluster.vcpu_overcommit, 4.0);
    assert!(config.cluster.isolation_addresses.is_empty());
    assert_eq!(config.hosts[0].max_concurrent_starts, 4);
    assert_eq!(config.hosts[1].fault_domain, None);
}

#[test]
fn safe_timing_override_is_applied() {
    let text = edit(
        "path = \"/mnt/nfs/.havirt/lab\"\n",
        "path = \"/mnt/nfs/.havirt/lab\"\n[cluster.timings]\nhost_dead_timeout_ms = 30000\n",
    );
    let (config, _) = loads("timings_ok", &text);
    assert_eq!(config.cluster.timings.host_dead_timeout.as_millis(), 30_000);
    assert_eq!(config.cluster.timings.renew_timeout, Profile::Default.timings().renew_timeout);
}

#[test]
fn command_and_libvirt_fences_load() {
    let text = edit(
        "kind = \"storage\"\n",
        "kind = \"command\"\nagent = \"fence_redfish\"\noptions = { ip = \"10.0.9.12\", ssl_insecure = \"1\" }\npassword_file = \"/etc/havirt/fence/h2.pw\"\n\n[[host.fence]]\nkind = \"libvirt\"\nuri = \"qemu+ssh://root@10.0.9.1/system\"\ndomain = \"lab-h2\"\n",
    );
    let (config, _) = loads("command_libvirt", &text);
    let FenceMethod::Command { agent, options, .. } = &config.hosts[1].fence[0].method else {
        panic!("{:?}", config.hosts[1].fence)
    };
    assert_eq!(agent, "fence_redfish");
    assert_eq!(options.get("ip").map(String::as_str), Some("10.0.9.12"));
    assert_eq!(config.cluster_spec().hosts[1].fence_agents, ["command", "libvirt"]);
}

// ------------------------------------------------------------------ warnings

#[test]
fn no_watchdog_and_no_fence_is_a_warning_not_an_error() {
    let text = edit("watchdog = \"device\"\n\n[[host.fence]]\nkind = \"storage\"\n", "watchdog = \"none\"\n");
    let (config, warnings) = loads("warn_none", &text);
    assert!(!config.cluster_spec().hosts[1].watchdog);
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    let msg = warnings[0].to_string();
    assert!(msg.contains(":26:") && msg.contains("key \"watchdog\""), "{msg}");
    assert!(msg.contains("havirt fence confirm h2"), "{msg}");
}

#[test]
fn storage_poison_alone_does_not_silence_the_warning() {
    let text = edit(
        "watchdog = \"device\"\n\n[[host.fence]]\nkind = \"storage\"",
        "watchdog = \"none\"\n\n[[host.fence]]\nkind = \"storage\"",
    );
    let (_, warnings) = loads("warn_poison_only", &text);
    assert!(
        matches!(warnings.as_slice(), [ConfigWarning::NoAutomaticTakeover { host, .. }] if host == "h2"),
        "{warnings:?}"
    );
}

#[test]
fn a_fence_agent_makes_watchdog_none_acceptable() {
    let text = edit(
        "watchdog = \"device\"\n\n[[host.fence]]\nkind = \"ipmi\"",
        "watchdog = \"none\"\n\n[[host.fence]]\nkind = \"ipmi\"",
    );
    let (_, warnings) = loads("no_warn_fenced", &text);
    assert!(warnings.is_empty(), "{warnings:?}");
}

#[test]
fn unequal_ring_counts_are_a_warning() {
    let text = edit("addresses = [\"192.0.2.12\", \"198.51.100.12\"]", "addresses = [\"192.0.2.12\"]");
    let (_, warnings) = loads("warn_rings", &text);
    assert!(matches!(warnings.as_slice(), [ConfigWarning::RingMismatch { count: 1, expected: 2, .. }]), "{warnings:?}");
}

// ------------------------------------------------------------------ refused: syntax and shape

#[test]
fn unknown_key_at_top_level() {
    refused("unknown_top", &format!("colour = \"blue\"\n{BASE}"), 1, "colour", &["unknown key", "`cluster`"]);
}

#[test]
fn unknown_key_in_host() {
    let text = edit("id = 1\n", "id = 1\nram_gb = 64\n");
    refused("unknown_host_key", &text, 13, "ram_gb", &["[[host]] #1", "unknown key", "remove it"]);
}

#[test]
fn unknown_key_in_timings() {
    let text = with_timing("host_dead_timeout = 30000");
    refused("unknown_timing", &text, 10, "host_dead_timeout", &["[cluster.timings]", "host_dead_timeout_ms"]);
}

#[test]
fn toml_syntax_error_unclosed_bracket() {
    let text = edit("[[host.fence]]\nkind = \"storage\"", "[[host.fence]\nkind = \"storage\"");
    refused("syntax", &text, 28, "host.fence", &["TOML syntax error", "expected `]`"]);
}

#[test]
fn duplicate_key_in_a_table() {
    let text = edit("id = 2\n", "id = 2\nid = 3\n");
    refused("dup_key", &text, 25, "id", &["defined twice"]);
}

#[test]
fn duplicate_table() {
    refused("dup_table", &format!("{BASE}\n[cluster]\nname = \"other\"\n"), 31, "cluster", &["defined twice"]);
}

#[test]
fn wrong_type_string_for_id() {
    refused("id_string", &edit("id = 2\n", "id = \"2\"\n"), 24, "id", &["[[host]] #2", "whole number"]);
}

#[test]
fn missing_cluster_table() {
    let text = BASE.split_once("[[host]]").map(|(_, rest)| format!("[[host]]{rest}")).unwrap_or_default();
    refused("no_cluster", &text, 1, "cluster", &["add a [cluster] table"]);
}

#[test]
fn missing_watchdog() {
    refused(
        "no_watchdog",
        &edit("watchdog = \"device\"\n\n[[host.fence]]\nkind = \"ipmi\"", "\n[[host.fence]]\nkind = \"ipmi\""),
        10,
        "watchdog",
        &["[[host]] #1", "watchdog = \"device\""],
    );
}

// ------------------------------------------------------------------ refused: cluster

#[test]
fn bad_cluster_name() {
    refused("cluster_name", &edit("name = \"lab\"", "name = \"Lab_1\""), 2, "name", &["[cluster]", "a-z, 0-9 and -"]);
}

#[test]
fn relative_key_file() {
    refused(
        "key_rel",
        &edit("key_file = \"/etc/havirt/cluster.key\"", "key_file = \"cluster.key\""),
        3,
        "key_file",
        &["absolute path"],
    );
}

#[test]
fn missing_datastore() {
    let text = edit("[cluster.datastore]\nkind = \"dir\"\npath = \"/mnt/nfs/.havirt/lab\"\n", "");
    refused("no_datastore", &text, 1, "datastore", &["[cluster]", "kind = \"dir\""]);
}

#[test]
fn block_datastore_without_device() {
    let text = edit("kind = \"dir\"\npath = \"/mnt/nfs/.havirt/lab\"\n", "kind = \"block\"\n");
    refused("block_no_device", &text, 6, "device", &["[cluster.datastore]", "kind = \"block\" needs", "device = "]);
}

#[test]
fn unknown_datastore_kind() {
    refused("ds_kind", &edit("kind = \"dir\"", "kind = \"nfs\""), 7, "kind", &["\"dir\", \"block\""]);
}

#[test]
fn unknown_profile() {
    refused(
        "profile",
        &edit("profile = \"default\"", "profile = \"turbo\""),
        4,
        "profile",
        &["\"fast\", \"default\", \"conservative\""],
    );
}

fn with_timing(line: &str) -> String {
    edit("path = \"/mnt/nfs/.havirt/lab\"\n", &format!("path = \"/mnt/nfs/.havirt/lab\"\n[cluster.timings]\n{line}\n"))
}

#[test]
fn unsafe_host_dead_timeout_carries_the_engine_rule() {
    refused(
        "unsafe_timings",
        &with_timing("host_dead_timeout_ms = 15000"),
        10,
        "host_dead_timeout_ms",
        &["[cluster.timings]", "must exceed renew_timeout", "21.000s", "S3(b)", "profile \"default\""],
    );
}

#[test]
fn unsafe_renew_points_at_the_changed_key() {
    // Raising renew_timeout breaks the S3(b) rule: point at the key that was changed.
    refused("unsafe_renew", &with_timing("renew_timeout_ms = 12000"), 10, "renew_timeout_ms", &["host_dead_timeout"]);
}

#[test]
fn zero_timing() {
    refused("zero_timing", &with_timing("renew_timeout_ms = 0"), 10, "renew_timeout_ms", &["from 1 to 3600000 ms"]);
}

#[test]
fn negative_timing() {
    refused("negative_timing", &with_timing("io_timeout_ms = -5"), 10, "io_timeout_ms", &["-5 is out of range"]);
}

#[test]
fn memory_overcommit_out_of_range() {
    let text = edit("profile = \"default\"\n", "profile = \"default\"\nmemory_overcommit = 8.0\n");
    refused("mem_overcommit", &text, 5, "memory_overcommit", &["0.5 to 4.0"]);
}

#[test]
fn admission_defaults_to_warn_with_one_host_failure_and_is_read() {
    let (config, _) = loads("admission_default", BASE);
    let a = config.cluster.admission;
    assert_eq!((a.mode, a.host_failures, a.fault_domain_failures), (AdmissionMode::Warn, 1, 0));
    let text = edit(
        "profile = \"default\"\n",
        "profile = \"default\"\nadmission = \"strict\"\ntolerate_host_failures = 2\ntolerate_fault_domain_failures = 1\n",
    );
    let (config, _) = loads("admission_strict", &text);
    assert_eq!(
        config.cluster_spec().admission,
        AdmissionPolicy { mode: AdmissionMode::Strict, host_failures: 2, fault_domain_failures: 1 }
    );
}

#[test]
fn admission_mode_must_be_one_of_three() {
    let text = edit("profile = \"default\"\n", "profile = \"default\"\nadmission = \"enforce\"\n");
    refused("admission_mode", &text, 5, "admission", &["\"off\", \"warn\", \"strict\"", "enforce"]);
}

#[test]
fn tolerate_host_failures_out_of_range() {
    let text = edit("profile = \"default\"\n", "profile = \"default\"\ntolerate_host_failures = -1\n");
    refused("tolerate_hosts", &text, 5, "tolerate_host_failures", &["-1 is out of range"]);
}

#[test]
fn vcpu_overcommit_out_of_range() {
    let text = edit("profile = \"default\"\n", "profile = \"default\"\nvcpu_overcommit = 0.5\n");
    refused("vcpu_overcommit", &text, 5, "vcpu_overcommit", &["1.0 to 16.0"]);
}

#[test]
fn metrics_address_is_localhost_by_default_and_can_be_moved_or_off() {
    let (config, _) = loads("metrics-default", BASE);
    assert_eq!(config.cluster.metrics_address, Some("127.0.0.1:9405".parse().expect("addr")));
    for (value, want) in [("\"[::1]:9500\"", Some("[::1]:9500")), ("\"off\"", None), ("\"\"", None)] {
        let text = edit("profile = \"default\"\n", &format!("profile = \"default\"\nmetrics_address = {value}\n"));
        let (config, _) = loads("metrics-set", &text);
        assert_eq!(config.cluster.metrics_address, want.map(|w| w.parse().expect("addr")), "{value}");
    }
}

#[test]
fn metrics_address_without_a_port_is_refused() {
    let text = edit("profile = \"default\"\n", "profile = \"default\"\nmetrics_address = \"localhost\"\n");
    refused("metrics_address", &text, 5, "metrics_address", &["\"localhost\"", "IP:PORT", "\"off\""]);
}

#[test]
fn net_port_zero() {
    let text = edit("profile = \"default\"\n", "profile = \"default\"\nnet_port = 0\n");
    refused("net_port", &text, 5, "net_port", &["from 1 to 65535"]);
}

#[test]
fn bad_isolation_address() {
    let text =
        edit("profile = \"default\"\n", "profile = \"default\"\nisolation_addresses = [\"10.0.0.1\", \"gateway\"]\n");
    refused("isolation", &text, 5, "isolation_addresses", &["\"gateway\" is not an IP address"]);
}

// ------------------------------------------------------------------ refused: hosts

#[test]
fn host_id_zero() {
    refused("id_zero", &edit("id = 1\n", "id = 0\n"), 12, "id", &["[[host]] #1", "from 1 to 255"]);
}

#[test]
fn host_id_256() {
    refused("id_256", &edit("id = 2\n", "id = 256\n"), 24, "id", &["[[host]] #2", "256 is out of range"]);
}

#[test]
fn duplicate_host_id() {
    let msg = refused(
        "dup_id",
        &edit("id = 2\n", "id = 1\n"),
        24,
        "id",
        &["1 is already used by host \"h1\"", "unique id from 1 to 255"],
    );
    assert!(msg.contains(":24:1: [[host]] #2 key \"id\""), "{msg}");
}

#[test]
fn duplicate_host_name() {
    refused(
        "dup_name",
        &edit("name = \"h2\"", "name = \"h1\""),
        23,
        "name",
        &["\"h1\" is already used by host \"h1\""],
    );
}

#[test]
fn duplicate_address() {
    let text = edit("[\"192.0.2.12\", \"198.51.100.12\"]", "[\"192.0.2.12\", \"192.0.2.11\"]");
    refused("dup_addr", &text, 25, "addresses", &["192.0.2.11 is already used by host \"h1\""]);
}

#[test]
fn bad_ip_address() {
    let text = edit("[\"192.0.2.11\", \"198.51.100.11\"]", "[\"192.0.2.300\"]");
    refused("bad_ip", &text, 13, "addresses", &["\"192.0.2.300\" is not an IP address"]);
}

#[test]
fn empty_addresses() {
    refused(
        "empty_addr",
        &edit("[\"192.0.2.12\", \"198.51.100.12\"]", "[]"),
        25,
        "addresses",
        &["at least one IP address"],
    );
}

#[test]
fn one_host_only() {
    let text = BASE.split_once("\n[[host]]\nname = \"h2\"").map(|(head, _)| head.to_owned()).unwrap_or_default();
    refused("one_host", &text, 10, "host", &["at least 2 hosts"]);
}

#[test]
fn no_host_at_all() {
    let text = BASE.split_once("[[host]]").map(|(head, _)| head.to_owned()).unwrap_or_default();
    let msg = refused("no_host", &text, 1, "host", &["only 0 [[host]]"]);
    assert!(msg.contains(":1:1: key \"host\""), "{msg}");
}

#[test]
fn max_concurrent_starts_zero() {
    let text = edit(
        "watchdog = \"device\"\n\n[[host.fence]]\nkind = \"ipmi\"",
        "watchdog = \"device\"\nmax_concurrent_starts = 0\n\n[[host.fence]]\nkind = \"ipmi\"",
    );
    refused("starts_zero", &text, 15, "max_concurrent_starts", &["from 1 to 64"]);
}

#[test]
fn unknown_watchdog_kind() {
    let text = edit(
        "watchdog = \"device\"\n\n[[host.fence]]\nkind = \"storage\"",
        "watchdog = \"hpwdt\"\n\n[[host.fence]]\nkind = \"storage\"",
    );
    refused("watchdog_kind", &text, 26, "watchdog", &["\"device\", \"systemd\", \"lab\", \"none\""]);
}

#[test]
fn lab_watchdog_without_socket() {
    let text = edit(
        "watchdog = \"device\"\n\n[[host.fence]]\nkind = \"storage\"",
        "watchdog = \"lab\"\n\n[[host.fence]]\nkind = \"storage\"",
    );
    refused("lab_no_socket", &text, 26, "watchdog.lab_socket", &["lab_socket = "]);
}

// ------------------------------------------------------------------ refused: fence chains

#[test]
fn unknown_fence_kind() {
    refused(
        "fence_kind",
        &edit("kind = \"storage\"", "kind = \"smoke\""),
        29,
        "kind",
        &["[[host]] #2 [[host.fence]] #1", "\"ipmi\", \"command\", \"libvirt\", \"storage\""],
    );
}

#[test]
fn plaintext_password_in_fence_entry() {
    let text = edit(
        "password_file = \"/etc/havirt/fence/h1.pw\"\n",
        "password_file = \"/etc/havirt/fence/h1.pw\"\npassword = \"hunter2\"\n",
    );
    let msg = refused("password", &text, 21, "password", &["password_file", "chmod 600"]);
    assert!(!msg.contains("hunter2"), "a password must never be echoed: {msg}");
}

#[test]
fn plaintext_password_in_command_options() {
    let text = edit(
        "kind = \"storage\"\n",
        "kind = \"command\"\nagent = \"fence_ipmilan\"\noptions = { ip = \"10.0.9.12\", password = \"hunter2\" }\n",
    );
    let msg = refused("options_password", &text, 31, "options.password", &["password_file"]);
    assert!(!msg.contains("hunter2"), "a password must never be echoed: {msg}");
}

#[test]
fn ipmi_without_address() {
    refused(
        "ipmi_no_addr",
        &edit("address = \"192.0.2.21\"\n", ""),
        16,
        "address",
        &["[[host]] #1 [[host.fence]] #1", "kind = \"ipmi\" needs"],
    );
}

#[test]
fn command_fence_without_agent() {
    refused(
        "command_no_agent",
        &edit("kind = \"storage\"", "kind = \"command\""),
        28,
        "agent",
        &["kind = \"command\" needs", "fence_ipmilan"],
    );
}

#[test]
fn libvirt_fence_without_domain() {
    let text = edit("kind = \"storage\"", "kind = \"libvirt\"\nuri = \"qemu:///system\"");
    refused("libvirt_no_domain", &text, 28, "domain", &["kind = \"libvirt\" needs"]);
}

#[test]
fn key_of_another_fence_kind() {
    let text = edit("kind = \"storage\"", "kind = \"storage\"\ncipher = 3");
    refused("storage_cipher", &text, 30, "cipher", &["does not apply to kind = \"storage\""]);
}

#[test]
fn duplicate_fence_name() {
    refused(
        "dup_fence",
        &format!("{BASE}\n[[host.fence]]\nkind = \"storage\"\n"),
        32,
        "kind",
        &["\"storage\" is used twice"],
    );
}

#[test]
fn ipmi_cipher_out_of_range() {
    let text = edit("username = \"havirt\"\n", "username = \"havirt\"\ncipher = 18\n");
    refused("cipher", &text, 20, "cipher", &["from 0 to 17"]);
}

#[test]
fn dir_datastore_with_a_device() {
    let text = edit("kind = \"dir\"\n", "kind = \"dir\"\ndevice = \"/dev/sdb\"\n");
    refused("dir_device", &text, 8, "device", &["does not apply to kind = \"dir\"", "kind and path"]);
}

#[test]
fn single_bracket_host_table() {
    // `[host]` where `[[host]]` was meant: the second host is then a duplicate.
    let text = edit("[[host]]\nname = \"h1\"", "[host]\nname = \"h1\"");
    refused("single_bracket", &text, 22, "host", &["defined twice", "two brackets"]);
}

#[test]
fn wrong_type_in_a_multiline_array_points_at_the_element() {
    let text = edit("[\"192.0.2.12\", \"198.51.100.12\"]", "[\n  \"192.0.2.12\",\n  12,\n]");
    refused("multiline", &text, 27, "addresses", &["expected a string", "quoted string"]);
}

#[test]
fn unknown_key_in_watchdog_table() {
    let text = edit(
        "watchdog = \"device\"\n\n[[host.fence]]\nkind = \"storage\"",
        "watchdog = { kind = \"device\", devce = \"/dev/watchdog1\" }\n\n[[host.fence]]\nkind = \"storage\"",
    );
    refused("watchdog_key", &text, 26, "watchdog.devce", &["unknown key"]);
}

#[test]
fn fence_option_with_a_line_break() {
    let text = edit(
        "kind = \"storage\"\n",
        "kind = \"command\"\nagent = \"fence_ipmilan\"\noptions = { ip = \"10.0.9.12\\naction=on\" }\n",
    );
    refused("option_newline", &text, 31, "options.ip", &["no line breaks"]);
}

#[test]
fn empty_file() {
    refused("empty", "", 1, "cluster", &["add a [cluster] table"]);
}

#[test]
fn missing_config_file_names_the_path() {
    let path = tmp_path("no-such-config.toml");
    let _ = std::fs::remove_file(&path);
    let err = Config::load(&path).expect_err("missing file");
    assert!(matches!(err, ConfigError::Read { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(msg.contains(&path.display().to_string()) && msg.contains("--config"), "{msg}");
}

// ------------------------------------------------------------------ local host

#[test]
fn unknown_local_host_names_the_file_and_the_choices() {
    let (config, _) = loads("local", BASE);
    let err = config.local_host("h7").expect_err("h7 is not configured");
    let msg = err.to_string();
    assert!(msg.contains("local.toml") && msg.contains("h1, h2") && msg.contains("--host NAME"), "{msg}");
}

// ------------------------------------------------------------------ key file

fn key_file(name: &str, len: usize, mode: u32) -> PathBuf {
    let path = tmp_path(name);
    std::fs::write(&path, vec![0x5a_u8; len]).expect("write the key");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).expect("chmod the key");
    path
}

#[test]
fn key_file_missing_is_refused_with_the_command_to_create_it() {
    let path = tmp_path("no-such.key");
    let _ = std::fs::remove_file(&path);
    let msg = check_key_file(&path).expect_err("missing key").to_string();
    assert!(msg.contains(&path.display().to_string()), "{msg}");
    assert!(msg.contains("head -c 64 /dev/urandom") && msg.contains("chmod 600"), "{msg}");
}

#[test]
fn world_readable_key_is_refused_with_the_chmod() {
    let path = key_file("world.key", 64, 0o644);
    let err = check_key_file(&path).expect_err("world-readable key");
    assert!(matches!(err, ConfigError::KeyFileUnsafeMode { mode: 0o644, .. }), "{err:?}");
    let msg = err.to_string();
    assert!(msg.contains(&format!("chmod 600 {}", path.display())) && msg.contains("0644"), "{msg}");
}

#[test]
fn group_readable_key_is_refused() {
    let path = key_file("group.key", 64, 0o640);
    assert!(matches!(check_key_file(&path), Err(ConfigError::KeyFileUnsafeMode { mode: 0o640, .. })));
}

#[test]
fn short_key_is_refused_with_the_size() {
    let path = key_file("short.key", 31, 0o600);
    let err = check_key_file(&path).expect_err("31-byte key");
    assert!(matches!(err, ConfigError::KeyFileSize { len: 31, .. }), "{err:?}");
    let msg = err.to_string();
    assert!(msg.contains("at least") || msg.contains("32 to 4096"), "{msg}");
    assert!(msg.contains("chmod 600"), "{msg}");
}

#[test]
fn private_key_of_32_bytes_is_accepted() {
    let path = key_file("good.key", 32, 0o600);
    assert_eq!(check_key_file(&path).map(|k| k.len()), Ok(32));
    let path = key_file("good64.key", 64, 0o400);
    assert_eq!(check_key_file(&path).map(|k| k.len()), Ok(64));
}

// ------------------------------------------------------------------ network maps

#[test]
fn network_maps_load_inline_and_as_tables() {
    let text = edit("id = 2\n", "id = 2\nbridge_map = { \"br-prod\" = \"vmbr0\", \"br-backup\" = \"vmbr1\" }\n");
    let text = format!("{text}\n[host.network_map]\n\"default\" = \"lan\"\n");
    let (config, warnings) = loads("net_maps", &text);
    assert!(warnings.is_empty(), "{warnings:?}");
    let (h1, h2) = (&config.hosts[0].net_map, &config.hosts[1].net_map);
    assert!(h1.is_empty());
    assert_eq!(h2.local(NetKind::Bridge, "br-prod"), "vmbr0");
    assert_eq!(h2.local(NetKind::Bridge, "br-backup"), "vmbr1");
    assert_eq!(h2.local(NetKind::Bridge, "br-other"), "br-other", "unlisted names stay");
    assert_eq!(h2.cluster(NetKind::Bridge, "vmbr1"), "br-backup");
    assert_eq!(h2.local(NetKind::Network, "default"), "lan");
    assert_eq!(h2.local(NetKind::Bridge, "default"), "default", "bridges and networks are apart");
}

#[test]
fn bridge_name_longer_than_an_interface_name() {
    let text = edit("id = 2\n", "id = 2\nbridge_map = { \"br-prod\" = \"bridge-of-prod-1\" }\n");
    let msg = refused("bridge_long", &text, 25, "bridge_map.br-prod", &["[[host]] #2", "bridge-of-prod-1", "1 to 15"]);
    assert!(msg.contains("ip link"), "{msg}");
}

#[test]
fn empty_cluster_bridge_name() {
    let text = edit("id = 2\n", "id = 2\nbridge_map = { \"\" = \"vmbr0\" }\n");
    refused("bridge_empty", &text, 25, "bridge_map.", &["not a valid bridge name"]);
}

#[test]
fn bridge_name_with_a_slash() {
    let text = edit("id = 2\n", "id = 2\nbridge_map = { \"br-prod\" = \"vm/br0\" }\n");
    refused("bridge_slash", &text, 25, "bridge_map.br-prod", &["\"vm/br0\"", "no '/'"]);
}

#[test]
fn network_name_with_white_space() {
    let text = edit("id = 2\n", "id = 2\nnetwork_map = { \"default\" = \"my lan\" }\n");
    refused("network_space", &text, 25, "network_map.default", &["libvirt network name", "virsh net-list"]);
}

#[test]
fn two_cluster_names_on_one_local_bridge() {
    let text = edit("id = 2\n", "id = 2\nbridge_map = { \"br-prod\" = \"vmbr0\", \"br-test\" = \"vmbr0\" }\n");
    let msg = refused("bridge_dup", &text, 25, "bridge_map.br-test", &["already the local name of \"br-prod\""]);
    assert!(msg.contains("maps a definition back"), "{msg}");
}

#[test]
fn network_map_value_of_the_wrong_type() {
    let text = edit("id = 2\n", "id = 2\nnetwork_map = { \"default\" = 1 }\n");
    refused("network_type", &text, 25, "default", &["[[host]] #2", "quoted string"]);
}

#[test]
fn migration_uri_defaults_to_ssh_on_the_first_address_and_refuses_a_bare_name() {
    let (config, _) = loads("migration_default", BASE);
    let h = &config.hosts[0];
    assert_eq!(h.migration_uri, format!("qemu+ssh://root@{}/system", h.addresses[0]));
    assert_eq!(h.migration_data_uri(), format!("tcp://{}", h.addresses[0]));
    assert!(!config.cluster.allow_unsafe_migration);
    let text = edit(
        "watchdog = \"device\"\n\n[[host.fence]]\nkind = \"ipmi\"",
        "watchdog = \"device\"\nmigration_uri = \"hv2\"\n\n[[host.fence]]\nkind = \"ipmi\"",
    );
    refused("migration_uri_bare", &text, 15, "migration_uri", &["qemu+ssh://"]);
}

// ---------------------------------------------------------------- [[alert]]

const ALERTS: &str = r#"
[[alert]]
kind = "webhook"
url = "https://alerts.example.org/havirt"
secret_file = "/etc/havirt/alert.key"

[[alert]]
kind = "command"
name = "mail"
command = ["/usr/local/bin/havirt-mail", "ops@example.org"]
timeout_ms = 3000
attempts = 2
backoff_ms = 500
"#;

/// The 1-based line of the only line of `text` holding `needle`.
fn line_of(text: &str, needle: &str) -> usize {
    let lines: Vec<usize> = text.lines().enumerate().filter(|(_, l)| l.contains(needle)).map(|(i, _)| i + 1).collect();
    assert_eq!(lines.len(), 1, "test bug: {needle:?} must be on one line");
    lines[0]
}

#[test]
fn alerts_load_with_their_defaults() {
    use havirt::config::AlertTarget;
    let (config, warnings) = loads("alerts", &format!("{BASE}{ALERTS}"));
    assert!(warnings.is_empty(), "{warnings:?}");
    let [hook, mail] = config.alerts.as_slice() else { panic!("two alerts: {:?}", config.alerts) };
    assert_eq!(hook.name, "webhook-1", "named by kind and place");
    assert_eq!(
        hook.target,
        AlertTarget::Webhook {
            url: "https://alerts.example.org/havirt".into(),
            secret_file: Some("/etc/havirt/alert.key".into())
        }
    );
    assert_eq!((hook.timeout_ms, hook.attempts, hook.backoff_ms), (5_000, 5, 1_000));
    assert_eq!(mail.name, "mail");
    assert_eq!(
        mail.target,
        AlertTarget::Command { argv: vec!["/usr/local/bin/havirt-mail".into(), "ops@example.org".into()] }
    );
    assert_eq!((mail.timeout_ms, mail.attempts, mail.backoff_ms), (3_000, 2, 500));
    assert!(loads("no-alerts", BASE).0.alerts.is_empty());
}

#[test]
fn a_webhook_without_a_secret_file_is_signed_with_the_cluster_key_and_warned_of() {
    let text = format!("{BASE}\n[[alert]]\nkind = \"webhook\"\nurl = \"http://127.0.0.1:8080/hook\"\n");
    let (config, warnings) = loads("alert-cluster-key", &text);
    assert_eq!(config.alerts.len(), 1);
    let [ConfigWarning::AlertClusterKey { at, name }] = warnings.as_slice() else { panic!("{warnings:?}") };
    assert_eq!(
        (name.as_str(), at.line, at.table.as_str()),
        ("webhook-1", line_of(&text, "kind = \"webhook\""), "[[alert]] #1")
    );
    let shown = warnings[0].to_string();
    assert!(shown.contains("secret_file = \"/etc/havirt/alert.key\""), "{shown}");
}

#[test]
fn alert_errors_name_the_line_the_key_and_the_fix() {
    let with = |extra: &str| format!("{BASE}{ALERTS}{extra}");
    let t = with("\n[[alert]]\nkind = \"pager\"\n");
    refused("alert-kind", &t, line_of(&t, "\"pager\""), "kind", &["[[alert]] #3", "\"webhook\", \"command\""]);
    let t = with("\n[[alert]]\nkind = \"webhook\"\nsecret_file = \"/k\"\n");
    let msg = refused("alert-no-url", &t, t.lines().count() - 2, "url", &["kind = \"webhook\" needs this key"]);
    assert!(msg.contains("url = \"https://"), "{msg}");
    let t = with("\n[[alert]]\nkind = \"webhook\"\nurl = \"ftp://example.org/x\"\n");
    refused("alert-bad-url", &t, line_of(&t, "ftp://"), "url", &["http:// or https:// URL"]);
    let t = with("\n[[alert]]\nkind = \"webhook\"\nurl = \"https:///nohost\"\n");
    refused("alert-no-host", &t, line_of(&t, "nohost"), "url", &["with a host"]);
    let t = with("\n[[alert]]\nkind = \"webhook\"\nurl = \"https://a.example\"\ncommand = [\"x\"]\n");
    refused(
        "alert-command-on-webhook",
        &t,
        line_of(&t, "command = [\"x\"]"),
        "command",
        &["does not apply to kind = \"webhook\""],
    );
    let t = with("\n[[alert]]\nkind = \"command\"\nurl = \"https://a.example\"\n");
    refused(
        "alert-url-on-command",
        &t,
        line_of(&t, "https://a.example"),
        "url",
        &["does not apply to kind = \"command\""],
    );
    let t = with("\n[[alert]]\nkind = \"command\"\ncommand = []\n");
    refused("alert-empty-command", &t, line_of(&t, "command = []"), "command", &["give at least one word"]);
    let t = with("\n[[alert]]\nkind = \"command\"\ncommand = [\"mail -s x\"]\n");
    refused("alert-program-with-args", &t, line_of(&t, "mail -s x"), "command", &["arguments go in the next words"]);
    let t = with("\n[[alert]]\nkind = \"command\"\nname = \"x\"\n");
    refused("alert-no-command", &t, t.lines().count() - 2, "command", &["kind = \"command\" needs this key"]);
    let t = with("\n[[alert]]\nkind = \"command\"\ncommand = [\"true\"]\nattempts = 0\n");
    refused("alert-attempts", &t, line_of(&t, "attempts = 0"), "attempts", &["from 1 to 10"]);
    let t = with("\n[[alert]]\nkind = \"command\"\ncommand = [\"true\"]\ntimeout_ms = 999999\n");
    refused("alert-timeout", &t, line_of(&t, "999999"), "timeout_ms", &["from 1 to 300000 ms"]);
    let t = with("\n[[alert]]\nkind = \"command\"\nname = \"mail\"\ncommand = [\"true\"]\n");
    let dup = t.lines().count() - 1;
    refused("alert-duplicate-name", &t, dup, "name", &["\"mail\" is used by two [[alert]] tables"]);
    let t = with("\n[[alert]]\nkind = \"command\"\ncommand = [\"true\"]\nevery = 3\n");
    refused("alert-unknown-key", &t, line_of(&t, "every = 3"), "every", &["unknown key"]);
    let t = with("\n[[alert]]\nkind = \"webhook\"\nurl = \"https://a.example\"\nsecret_file = \"alert.key\"\n");
    refused("alert-relative-secret", &t, line_of(&t, "\"alert.key\""), "secret_file", &["absolute path"]);
}

#[test]
fn at_most_eight_alert_receivers() {
    let one = "\n[[alert]]\nkind = \"command\"\ncommand = [\"true\"]\n";
    let t = format!("{BASE}{}", one.repeat(9));
    refused("alert-too-many", &t, t.lines().count() - 2, "alert", &["9 [[alert]] tables listed; give at most 8"]);
}

/// The commented [[alert]] examples in config/havirt.toml load as written
/// once uncommented (the documentation is a test).
#[test]
fn shipped_alert_examples_load_when_uncommented() {
    use havirt::config::AlertTarget;
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/config/havirt.toml");
    let text = std::fs::read_to_string(path).expect("the example");
    let (head, tail) = text.split_once("# Optional alert receivers").expect("the alert section");
    // An example: "# [[alert]]" and the "# key = value" lines after it, up to a bare "#".
    let mut in_example = false;
    let mut uncommented = Vec::new();
    for l in tail.lines() {
        in_example = (in_example && l != "#") || l == "# [[alert]]";
        uncommented.push(if in_example { l.trim_start_matches("# ").to_string() } else { l.to_string() });
    }
    let (config, warnings) = loads("shipped-alerts", &format!("{head}#{}\n", uncommented.join("\n")));
    assert!(warnings.is_empty(), "{warnings:?}");
    let names: Vec<&str> = config.alerts.iter().map(|a| a.name.as_str()).collect();
    assert_eq!(names, ["ops-hook", "mail"]);
    assert!(matches!(&config.alerts[0].target, AlertTarget::Webhook { secret_file: Some(_), .. }));
    assert!(matches!(&config.alerts[1].target, AlertTarget::Command { argv } if argv.len() == 2));
}
