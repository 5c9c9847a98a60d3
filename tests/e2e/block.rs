//! The block datastore's premise (issue 13): on a LUN, as on an iSCSI
//! cluster, nothing but havirt's leases keeps a domain from running on two
//! hosts. qemu's image locks do not span hosts (each host opens a device
//! node of its own), so two hosts can start the same domain on the same
//! disk when asked directly; the block_ cases (main.rs) then prove that
//! havirt never does.

use crate::harness::{HOSTS, POLL, SKIPPED, poll_until, unavailable};
use havirt::lab::cluster::{Datastore, Lab, LabSpec};
use havirt::lab::lun;
use havirt::lab::observer::{DEFAULT_INTERVAL, Observer};
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

/// The probe domain: not protected, its own raw disk on the lab's LUNs.
const PROBE: &str = "probe";
const PROBE_UUID: &str = "0b10c000-0000-4000-8000-00000000beef";
/// How long both copies must be seen running together.
const BOTH_RUNNING_WAIT: Duration = Duration::from_secs(20);

fn virsh(lab: &Lab, host: u16, args: &[&str]) -> Result<String, String> {
    let uri = lab.host(host).map_err(|e| e.to_string())?.libvirt_uri();
    let out = Command::new("timeout")
        .args(["10", "virsh", "-q", "-c", &uri])
        .args(args)
        .output()
        .map_err(|e| format!("virsh: {e}"))?;
    if !out.status.success() {
        return Err(format!("virsh {args:?} on h{host}: {}", String::from_utf8_lossy(&out.stderr).trim()));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The probe, unprotected, defined and started on h1 and h2 by hand (no
/// havirt involved): both qemu run on one disk at once, and the observer
/// counts it as a double run (so it would count one havirt made).
fn block_qemu_locks_do_not_stop_a_double_start() {
    let name = "block_qemu_locks_do_not_stop_a_double_start";
    if let Some(why) = unavailable() {
        println!("SKIPPED {name}: {why}");
        SKIPPED.with(|s| *s.borrow_mut() = Some(why));
        return;
    }
    let mut spec = LabSpec::new(HOSTS, 1, PathBuf::from(env!("CARGO_BIN_EXE_havirt")));
    spec.datastore = Datastore::Block;
    let lab = Lab::up(spec).unwrap_or_else(|e| panic!("{name}: lab up: {e}"));
    let file = format!("{PROBE}.img");
    lun::create_file(&file, havirt::lab::cluster::DOMAIN_DISK_BYTES).expect("probe disk");
    for h in [1, 2] {
        lun::attach(h, &file, PROBE).unwrap_or_else(|e| panic!("{name}: probe disk on h{h}: {e}"));
    }
    let xml = havirt::lab::cluster::with_block_disk(
        &havirt::lab::cluster::domain_xml(PROBE, PROBE_UUID),
        &lun::shared_path(PROBE),
    );
    let xml_path = std::env::temp_dir().join(format!("havirt-e2e-{PROBE}.xml"));
    std::fs::write(&xml_path, xml).expect("probe xml");
    let observer = Observer::start(lab.observer_hosts(), DEFAULT_INTERVAL).expect("observer");
    for h in [1, 2] {
        virsh(&lab, h, &["define", &xml_path.to_string_lossy()]).unwrap_or_else(|e| panic!("{name}: {e}"));
        // A qemu image lock held by the other host would fail this start.
        virsh(&lab, h, &["start", PROBE]).unwrap_or_else(|e| panic!("{name}: a second start refused: {e}"));
    }
    let running_on = |h| virsh(&lab, h, &["list", "--name", "--state-running"]).is_ok_and(|o| o.contains(PROBE));
    let both = poll_until(BOTH_RUNNING_WAIT, || (running_on(1) && running_on(2)).then_some(()));
    let counted = poll_until(BOTH_RUNNING_WAIT, || {
        let seen = observer.snapshot();
        seen.s1_violations.iter().any(|d| d.name == PROBE).then_some(())
    });
    let seen = observer.stop();
    for h in [1, 2] {
        let _ = virsh(&lab, h, &["destroy", PROBE]);
    }
    std::thread::sleep(POLL);
    lab.down().unwrap_or_else(|e| panic!("{name}: lab down: {e}"));
    let _ = std::fs::remove_file(&xml_path);
    assert!(both.is_some(), "{name}: the probe did not run on h1 and h2 at once within {BOTH_RUNNING_WAIT:?}");
    assert!(counted.is_some(), "{name}: the observer did not count the double run: {:#?}", seen.s1_violations);
}

/// This file's tests, for the harness (main.rs); `true`: ignored unless asked for.
pub fn tests() -> Vec<(&'static str, fn(), bool)> {
    vec![("block_qemu_locks_do_not_stop_a_double_start", block_qemu_locks_do_not_stop_a_double_start, false)]
}
