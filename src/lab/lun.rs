//! The lab's block storage (`--datastore block`, issue 13): shared "LUNs"
//! made of loop devices with direct I/O over files on faultfs.
//!
//! Each file under `LAB_DIR/ds/BLOCK_DIR/` (the LUN holding havirt's
//! records, `lun.img`, and one raw disk per domain, `vmI.img`) is attached
//! once per host, from inside that host's network namespace: faultfs
//! charges every request on an open file to the namespace that opened it
//! (`faultfs::gate`), so the requests of host N's loop device, which the
//! kernel makes from its own threads, meet host N's faults. Each host thus
//! has a device of its own for the same data, as iSCSI initiators on
//! real hosts each have a /dev/sdX for one LUN. Their names are symlinks
//! in `LAB_DIR/hN/disks/` (`lun`, `vmI`), which host N sees at
//! `LAB_DIR/disks/` (a bind mount inside it), the one path every host's
//! config and every domain's XML name, as /dev/disk/by-id is on servers.
//!
//! No qemu image locking helps: qemu locks the device node it opens, and
//! no two hosts share one, so only havirt's leases keep a domain from
//! running twice (tested end to end).
//!
//! Loop devices are global kernel objects that outlive the lab's
//! processes: `lab down` (and so every `lab up`) detaches every loop device
//! whose backing file is the lab's, also one a crashed run left.

use super::LAB_DIR;
use super::faultfs::NETNS_DIR;
use super::net::host_ns;
use super::sys::{LabError, io_error, run};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The directory of the block files, under the datastore's backing
/// directory and its faultfs mount. Its name also finds the lab's loop
/// devices after faultfs was unmounted, when the kernel shows their
/// backing file relative to the mount (`/havirt-lab-block/lun.img`).
pub const BLOCK_DIR: &str = "havirt-lab-block";
/// The LUN of havirt's records: room for `havirt init`'s default layout
/// (16 hosts, 256 domains: 71.6 MB), sparse.
pub const LUN_BYTES: u64 = 128 << 20;
/// The LUN's name in `LAB_DIR/disks/` (what the config names).
pub const LUN_NAME: &str = "lun";
/// Where every host sees its own block devices (a bind mount of
/// `LAB_DIR/hN/disks` inside host N).
pub const DISKS_DIR: &str = "disks";

/// `LAB_DIR/disks/NAME`: the device path every host uses.
pub fn shared_path(name: &str) -> PathBuf {
    Path::new(LAB_DIR).join(DISKS_DIR).join(name)
}

/// `LAB_DIR/hN/disks`: host N's device symlinks.
pub fn host_disks(host: u16) -> PathBuf {
    Path::new(LAB_DIR).join(format!("h{host}")).join(DISKS_DIR)
}

/// `LAB_DIR/ds/BLOCK_DIR/FILE`: a block file through faultfs.
pub fn file_on_faultfs(file: &str) -> PathBuf {
    Path::new(LAB_DIR).join("ds").join(BLOCK_DIR).join(file)
}

/// `LAB_DIR/backing/BLOCK_DIR/FILE`: the same file past faultfs.
pub fn backing_file(file: &str) -> PathBuf {
    Path::new(LAB_DIR).join("backing").join(BLOCK_DIR).join(file)
}

/// Creates the sparse backing file `file` of `bytes` (zeros: `havirt init`
/// formats only a LUN that holds no data).
pub fn create_file(file: &str, bytes: u64) -> Result<(), LabError> {
    let path = backing_file(file);
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir).map_err(io_error(dir))?;
    }
    let f = fs::File::create(&path).map_err(io_error(&path))?;
    f.set_len(bytes).map_err(io_error(&path))
}

/// Attaches `file` (on faultfs) as a loop device with direct I/O for host
/// `host` (opened from inside its network namespace) and names it
/// `LAB_DIR/hN/disks/NAME`. Fails when the kernel did not turn direct
/// I/O on: a LUN with a page cache in front would not be one.
pub fn attach(host: u16, file: &str, name: &str) -> Result<PathBuf, LabError> {
    let netns = Path::new(NETNS_DIR).join(host_ns(host));
    let mut cmd = Command::new("nsenter");
    // Only the network namespace: the mount namespace stays the lab's, so
    // the kernel names the backing file by its full path (lab_loops).
    cmd.arg(format!("--net={}", netns.display()))
        .args(["losetup", "--find", "--show", "--direct-io=on"])
        .arg(file_on_faultfs(file));
    let out = run(&mut cmd)?;
    let dev = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    let dio = sysfs(&dev, "loop/dio");
    if dio.as_deref() != Some("1") {
        return Err(LabError::State {
            what: format!(
                "{}: loop device over {} without direct I/O (sysfs dio = {dio:?}): the lab's LUNs need it",
                dev.display(),
                file_on_faultfs(file).display()
            ),
        });
    }
    let dir = host_disks(host);
    fs::create_dir_all(&dir).map_err(io_error(&dir))?;
    let link = dir.join(name);
    std::os::unix::fs::symlink(&dev, &link).map_err(io_error(&link))?;
    Ok(dev)
}

/// `/sys/block/loopN/ATTR` of `/dev/loopN`, trimmed.
fn sysfs(dev: &Path, attr: &str) -> Option<String> {
    let name = dev.file_name()?.to_str()?;
    fs::read_to_string(Path::new("/sys/block").join(name).join(attr)).ok().map(|s| s.trim().to_string())
}

/// Whether a loop device's backing file (as sysfs shows it) is the lab's:
/// under LAB_DIR, or, once faultfs is unmounted, relative to its mount.
pub fn is_lab_backing(shown: &str) -> bool {
    Path::new(shown).starts_with(LAB_DIR) || shown.contains(&format!("/{BLOCK_DIR}/"))
}

/// The lab's loop devices (`/dev/loopN`), in sysfs order, with their backing files.
pub fn lab_loops() -> Vec<(PathBuf, String)> {
    let mut out: Vec<(PathBuf, String)> = fs::read_dir("/sys/block")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let backing = fs::read_to_string(e.path().join("loop/backing_file")).ok()?;
            let backing = backing.trim().to_string();
            is_lab_backing(&backing).then(|| (Path::new("/dev").join(name), backing))
        })
        .collect();
    out.sort();
    out
}

/// Detaches every lab loop device (`losetup -d`: one still open is
/// detached by the kernel when its last user closes it). Returns the
/// devices.
pub fn detach_all() -> Result<Vec<String>, LabError> {
    let mut out = Vec::new();
    for (dev, backing) in lab_loops() {
        run(Command::new("losetup").arg("-d").arg(&dev))?;
        out.push(format!("{} ({backing})", dev.display()));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lab_backing_files_are_recognized_before_and_after_the_unmount() {
        assert!(is_lab_backing("/var/tmp/havirt-lab/ds/havirt-lab-block/lun.img"));
        assert!(is_lab_backing("/havirt-lab-block/vm3.img"));
        assert!(is_lab_backing("/havirt-lab-block/vm3.img (deleted)"));
        assert!(!is_lab_backing("/tmp/leases_loop_512.img"));
        assert!(!is_lab_backing("/var/tmp/havirt-lab-block.img"));
    }
}
