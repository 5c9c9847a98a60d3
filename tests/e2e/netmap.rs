//! Network mapping (issue 5): hosts that name their LAN differently. Each
//! host has a bridge of its own name (`lan-h1`, `lan-h2`, `lan-h3`), every
//! domain a NIC on its home host's bridge; h2 maps h1's name (the cluster's
//! name of the LAN) to its own, h3 has no map.
//!
//! A domain of h1 must run on h2 after h1's power loss with h2's bridge,
//! while the datastore keeps the cluster's name; `havirt check` on h1 must
//! name every domain that cannot run on some host, and only those.

use crate::harness::{E2e, fenced_bound};
use havirt::lab::LAB_DIR;
use havirt::lab::cluster::{Fault, LanSpec, lan_bridge};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

/// What the datastore holds for lab domain `name` (read from faultfs's
/// backing directory, past any fault).
fn stored_xml(t: &E2e, name: &str) -> String {
    let d = t.lab().domains().iter().find(|d| d.name == name).expect("a lab domain");
    let path = Path::new(LAB_DIR).join(format!("backing/cluster/domains/{}.xml", d.uuid));
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The live definition of `name` from host N's own libvirtd.
fn live_xml(t: &E2e, host: u16, name: &str) -> String {
    let uri = t.lab().host(host).expect("a lab host").libvirt_uri();
    let out =
        Command::new("timeout").args(["10", "virsh", "-q", "-c", &uri, "dumpxml", name]).output().expect("virsh runs");
    assert!(out.status.success(), "virsh dumpxml {name} on h{host}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn source_bridge(name: &str) -> String {
    format!("<source bridge='{name}'/>")
}

/// `havirt check` inside host N (its /sys, libvirt and view of the
/// datastore): (exit status success, stdout).
fn check_on(t: &E2e, host: u16) -> (bool, String) {
    let havirt = env!("CARGO_BIN_EXE_havirt");
    let config = format!("{LAB_DIR}/havirt.toml");
    let h = format!("h{host}");
    let out = t
        .lab()
        .host(host)
        .and_then(|hh| hh.exec(&[havirt, "check", "--config", &config, "--host", &h]))
        .unwrap_or_else(|e| panic!("havirt check on {h}: {e}"));
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned())
}

fn failover_uses_the_survivors_bridge_and_check_names_unmapped_hosts() {
    let setup = |s: &mut havirt::lab::cluster::LabSpec| {
        s.domains = 3;
        s.lan = Some(LanSpec { mapped: vec![2] });
    };
    let Some(mut t) = E2e::up("netmap", setup) else { return };
    // vm1 (h1) may run on h1 and h2 only: h3 has no map for lan-h1.
    t.lab().havirt_on(1, &["protect", "vm1", "--affinity", "h1,h2"]).unwrap_or_else(|e| panic!("netmap: {e}"));
    // h2 stored vm2 (on lan-h2) under the cluster's name.
    let vm2 = stored_xml(&t, "vm2");
    assert!(vm2.contains(&source_bridge(&lan_bridge(1))) && !vm2.contains("lan-h2"), "stored vm2:\n{vm2}");

    let (passed, report) = check_on(&t, 1);
    println!("havirt check on h1:\n{report}");
    assert!(!passed, "check must fail: some domains cannot run on some hosts");
    for line in [
        "domain vm2 cannot run on h3: bridge lan-h1 does not exist there",
        "domain vm3 cannot run on h1: bridge lan-h3 does not exist there",
        "domain vm3 cannot run on h2: bridge lan-h3 does not exist there",
    ] {
        assert!(report.contains(line), "wanted {line:?}");
    }
    assert!(!report.contains("domain vm1 cannot run"), "vm1 runs wherever its affinity allows");
    assert_eq!(report.matches(" cannot run on ").count(), 3, "one line per missing bridge and host");

    let t0 = t.fault(&Fault::PowerOff(1));
    t.assert_recovered(&["vm1".to_string()], t0, Duration::ZERO, fenced_bound(), |h| h == 2);
    t.assert_kept_running(&["vm2".to_string(), "vm3".to_string()]);
    let live = live_xml(&t, 2, "vm1");
    assert!(live.contains(&source_bridge(&lan_bridge(2))) && !live.contains("lan-h1"), "vm1 on h2:\n{live}");
    let stored = stored_xml(&t, "vm1");
    assert!(stored.contains(&source_bridge(&lan_bridge(1))) && !stored.contains("lan-h2"), "stored vm1:\n{stored}");
    t.assert_s1();
    t.finish();
}

/// This file's tests, for the harness (main.rs); `true`: ignored unless asked for.
pub fn tests() -> Vec<(&'static str, fn(), bool)> {
    vec![(
        "failover_uses_the_survivors_bridge_and_check_names_unmapped_hosts",
        failover_uses_the_survivors_bridge_and_check_names_unmapped_hosts,
        false,
    )]
}
