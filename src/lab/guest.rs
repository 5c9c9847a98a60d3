//! A tiny real guest OS for lab domains (issue 5): Debian's cloud kernel
//! plus a minimal initramfs whose init runs the QEMU guest agent on its
//! virtio-serial port, so that guest-agent monitoring and guest shutdowns
//! are tested against a real guest, not against faked events.
//!
//! - The kernel comes from the `linux-image-*-cloud-amd64` package that
//!   `.ci/setup` downloads into [`GUEST_CACHE`] (`apt-get download`, never
//!   installed). Its virtio console driver is a module: the initramfs
//!   carries the six modules it needs (the package's are uncompressed).
//! - busybox (package `busybox-static`) is the shell and init.
//! - qemu-ga (package `qemu-guest-agent`, installed on the lab machine) is
//!   copied in with the libraries `ldd` names.
//! - `/sbin/shutdown` is a script: qemu-ga's `guest-shutdown` runs
//!   `shutdown -h -P +0 MSG`, which becomes `poweroff -f` (`-r`: `reboot -f`).
//!
//! The image is built once per machine and kept under [`GUEST_CACHE`] in a
//! directory named after everything it is made of (kernel package file,
//! busybox and qemu-ga versions, [`GUEST_FORMAT`]); a change of any of
//! them builds a new one. The cpio archive (newc) is written here, gzip
//! compresses it.
//!
//! The lab boots it with direct kernel boot ([`guest_os_xml`]): `panic=0`
//! makes a kernel panic hang the guest for good (no reboot), which is how
//! the e2e tests hang a guest for real (`echo c > /proc/sysrq-trigger`
//! through the agent's `guest-exec`).

use super::sys::{LabError, io_error, run};
use std::fs;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// Where the kernel package waits and the built images are kept.
pub const GUEST_CACHE: &str = "/var/cache/havirt-lab";
/// Bumped whenever the initramfs' contents change (a new cache key).
pub const GUEST_FORMAT: u32 = 1;
/// The kernel command line: serial console, and a panic hangs for good.
pub const GUEST_CMDLINE: &str = "console=ttyS0 panic=0 quiet";
/// A guest-OS domain's memory: the kernel and the unpacked initramfs fit
/// with room to spare (the empty tiny domains have 64 MiB).
pub const GUEST_MEMORY_MIB: u32 = 128;
/// The virtio console driver and what it needs, in load order (paths
/// under the kernel's `lib/modules/VERSION/kernel/`).
pub const GUEST_MODULES: [&str; 6] = [
    "drivers/virtio/virtio_ring.ko",
    "drivers/virtio/virtio.ko",
    "drivers/virtio/virtio_pci_modern_dev.ko",
    "drivers/virtio/virtio_pci_legacy_dev.ko",
    "drivers/virtio/virtio_pci.ko",
    "drivers/char/virtio_console.ko",
];
/// The guest agent's channel name (libvirt's and qemu-ga's convention).
pub const AGENT_CHANNEL: &str = "org.qemu.guest_agent.0";

/// PID 1 of the guest: mounts, loads the virtio console, finds the agent's
/// port and hands over to busybox init, which keeps qemu-ga running.
const INIT: &str = r#"#!/bin/busybox sh
/bin/busybox --install -s
export PATH=/sbin:/bin:/usr/sbin:/usr/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tmpfs tmpfs /run
ln -s /run /var/run
for m in /lib/modules/*.ko; do insmod "$m"; done
port=
for i in $(seq 1 100); do
  for p in /sys/class/virtio-ports/*; do
    [ "$(cat "$p/name" 2>/dev/null)" = "org.qemu.guest_agent.0" ] && port=/dev/${p##*/}
  done
  [ -n "$port" ] && [ -e "$port" ] && break
  sleep 0.1
done
echo "havirt-guest: up, guest agent on ${port:-NOTHING}" > /dev/console
echo "::respawn:/usr/sbin/qemu-ga -m virtio-serial -p $port -t /run -f /run/qemu-ga.pid" > /etc/inittab
echo "::ctrlaltdel:/bin/poweroff -f" >> /etc/inittab
exec /bin/busybox init
"#;

/// What qemu-ga's `guest-shutdown` runs (`shutdown -h -P +0 MSG`).
const SHUTDOWN: &str = r#"#!/bin/sh
echo "havirt-guest: shutdown $*" > /dev/console
sync
case " $* " in
  *" -r "*) exec reboot -f ;;
  *" -H "*) exec halt -f ;;
  *) exec poweroff -f ;;
esac
"#;

/// A built image: the kernel and the initramfs, ready for `<kernel>` and
/// `<initrd>` (copy them where every host sees them).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GuestImage {
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    /// The cache key (directory name) it was built under.
    pub key: String,
}

/// The image for this machine: from the cache, or built now (a few
/// seconds) and cached.
pub fn ensure_image() -> Result<GuestImage, LabError> {
    let deb = kernel_deb()?;
    let busybox = package_version("busybox-static")?;
    let agent = package_version("qemu-guest-agent")?;
    let deb_name = deb.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let key = cache_key(&deb_name, &busybox, &agent);
    let dir = Path::new(GUEST_CACHE).join(&key);
    let image = GuestImage { kernel: dir.join("vmlinuz"), initrd: dir.join("initrd.gz"), key };
    if image.kernel.is_file() && image.initrd.is_file() {
        return Ok(image);
    }
    let tmp = Path::new(GUEST_CACHE).join(format!("{}.tmp{}", image.key, std::process::id()));
    let _ = fs::remove_dir_all(&tmp);
    fs::create_dir_all(&tmp).map_err(io_error(&tmp))?;
    let built = build(&deb, &tmp);
    if let Err(e) = built {
        let _ = fs::remove_dir_all(&tmp);
        return Err(e);
    }
    let _ = fs::remove_dir_all(&dir);
    fs::rename(&tmp, &dir).map_err(io_error(&dir))?;
    Ok(image)
}

/// Everything the image is made of, as a directory name.
pub fn cache_key(deb_name: &str, busybox: &str, agent: &str) -> String {
    let clean = |s: &str| {
        s.chars().map(|c| if c.is_ascii_alphanumeric() || ".-+".contains(c) { c } else { '_' }).collect::<String>()
    };
    let kernel = deb_name.trim_end_matches(".deb");
    format!("guest-v{GUEST_FORMAT}-{}-bb{}-ga{}", clean(kernel), clean(busybox), clean(agent))
}

/// The newest kernel package `.ci/setup` downloaded.
fn kernel_deb() -> Result<PathBuf, LabError> {
    let dir = Path::new(GUEST_CACHE);
    let mut debs: Vec<PathBuf> = fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            let name = p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            name.starts_with("linux-image-") && name.ends_with(".deb")
        })
        .collect();
    debs.sort();
    debs.pop().ok_or_else(|| LabError::State {
        what: format!("no linux-image-*.deb in {GUEST_CACHE}: run .ci/setup (it downloads the guest kernel)"),
    })
}

/// An installed Debian package's version.
fn package_version(package: &str) -> Result<String, LabError> {
    let out = run(Command::new("dpkg-query").args(["-W", "-f", "${Version}", package])).map_err(|_| {
        LabError::State { what: format!("package {package} is not installed: run .ci/setup (the lab guest needs it)") }
    })?;
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// Builds vmlinuz and initrd.gz into `out`.
fn build(deb: &Path, out: &Path) -> Result<(), LabError> {
    let extracted = out.join("kernel-package");
    run(Command::new("dpkg-deb").arg("-x").arg(deb).arg(&extracted))?;
    let (vmlinuz, modules) = kernel_files(&extracted)?;
    fs::copy(&vmlinuz, out.join("vmlinuz")).map_err(io_error(&vmlinuz))?;
    let mut archive = Cpio::default();
    for dir in ["bin", "sbin", "usr", "usr/bin", "usr/sbin", "etc", "proc", "sys", "dev", "run", "var", "tmp"] {
        archive.dir(dir);
    }
    archive.dir("lib");
    archive.dir("lib/modules");
    for (i, m) in GUEST_MODULES.iter().enumerate() {
        let from = modules.join(m);
        let name = Path::new(m).file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        // Numbered: init loads them in the shell's glob order.
        archive.file(&format!("lib/modules/{i}-{name}"), &fs::read(&from).map_err(io_error(&from))?, 0o644);
    }
    archive.file("init", INIT.as_bytes(), 0o755);
    archive.file("sbin/shutdown", SHUTDOWN.as_bytes(), 0o755);
    let busybox = Path::new("/bin/busybox");
    archive.file("bin/busybox", &fs::read(busybox).map_err(io_error(busybox))?, 0o755);
    add_with_libraries(&mut archive, Path::new("/usr/sbin/qemu-ga"))?;
    fs::remove_dir_all(&extracted).map_err(io_error(&extracted))?;
    gzip(&archive.finish(), &out.join("initrd.gz"))
}

/// The kernel image and the modules' directory of an extracted package.
fn kernel_files(root: &Path) -> Result<(PathBuf, PathBuf), LabError> {
    let boot = root.join("boot");
    let vmlinuz = fs::read_dir(&boot)
        .map_err(io_error(&boot))?
        .flatten()
        .map(|e| e.path())
        .find(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("vmlinuz-")))
        .ok_or_else(|| LabError::State { what: format!("no vmlinuz-* in {}", boot.display()) })?;
    let version = vmlinuz.file_name().map(|n| n.to_string_lossy().trim_start_matches("vmlinuz-").to_string());
    let modules = root.join("lib/modules").join(version.unwrap_or_default()).join("kernel");
    Ok((vmlinuz, modules))
}

/// A dynamically linked program and every library `ldd` names, at the
/// same paths as on this machine (its directories are made as needed).
fn add_with_libraries(archive: &mut Cpio, program: &Path) -> Result<(), LabError> {
    let out = run(Command::new("ldd").arg(program))?;
    let mut files = vec![program.to_path_buf()];
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        // "libx.so.1 => /lib/.../libx.so.1 (0x...)" or "/lib64/ld-linux... (0x...)"
        let path = line.split("=>").last().unwrap_or("").split_whitespace().next().unwrap_or("");
        if path.starts_with('/') {
            files.push(PathBuf::from(path));
        }
    }
    for f in files {
        let bytes = fs::read(&f).map_err(io_error(&f))?;
        let rel = f.to_string_lossy().trim_start_matches('/').to_string();
        let mut parent = String::new();
        for part in Path::new(&rel).parent().into_iter().flat_map(|p| p.iter()) {
            if !parent.is_empty() {
                parent.push('/');
            }
            parent.push_str(&part.to_string_lossy());
            archive.dir(&parent);
        }
        archive.file(&rel, &bytes, 0o755);
    }
    Ok(())
}

/// `gzip -9 -n` of `data` into `path` (mode 0644: qemu runs as another user).
fn gzip(data: &[u8], path: &Path) -> Result<(), LabError> {
    let file = fs::File::create(path).map_err(io_error(path))?;
    let mut child = Command::new("gzip")
        .args(["-9", "-n", "-c"])
        .stdin(Stdio::piped())
        .stdout(file)
        .spawn()
        .map_err(|source| LabError::Spawn { command: "gzip".into(), source })?;
    let written = child.stdin.take().map(|mut stdin| stdin.write_all(data));
    let status = child.wait().map_err(io_error(path))?;
    if !status.success() || !matches!(written, Some(Ok(()))) {
        return Err(LabError::State { what: format!("gzip into {} failed ({status})", path.display()) });
    }
    fs::set_permissions(path, fs::Permissions::from_mode(0o644)).map_err(io_error(path))
}

/// A cpio archive in the kernel's initramfs format ("newc"), root-owned.
#[derive(Default)]
pub struct Cpio {
    out: Vec<u8>,
    inode: u32,
    dirs: Vec<String>,
}

impl Cpio {
    /// A directory (once; parents first).
    pub fn dir(&mut self, name: &str) {
        if self.dirs.iter().any(|d| d == name) {
            return;
        }
        self.dirs.push(name.to_string());
        self.entry(name, 0o040_755, &[]);
    }

    pub fn file(&mut self, name: &str, data: &[u8], mode: u32) {
        self.entry(name, 0o100_000 | mode, data);
    }

    fn entry(&mut self, name: &str, mode: u32, data: &[u8]) {
        self.inode += 1;
        let name_len = name.len() + 1;
        let header = format!(
            "070701{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}",
            self.inode,
            mode,
            0, // uid
            0, // gid
            1, // nlink
            0, // mtime: fixed, so that a rebuild is byte-identical
            data.len(),
            0,
            0,
            0,
            0,
            name_len,
            0 // check
        );
        self.out.extend_from_slice(header.as_bytes());
        self.out.extend_from_slice(name.as_bytes());
        self.out.push(0);
        self.pad();
        self.out.extend_from_slice(data);
        self.pad();
    }

    fn pad(&mut self) {
        while !self.out.len().is_multiple_of(4) {
            self.out.push(0);
        }
    }

    /// The archive with its trailer.
    pub fn finish(mut self) -> Vec<u8> {
        self.entry("TRAILER!!!", 0, &[]);
        self.out
    }
}

/// A lab domain that boots the guest OS: direct kernel boot from
/// `kernel`/`initrd` (on the datastore, so that every host can start it),
/// the agent's channel, a serial console (`virsh console`), and the same
/// qcow2 disk as the empty tiny domains
/// (unused by the guest; qemu's image lock still guards S1).
pub fn guest_os_xml(name: &str, uuid: &str, kind: &str, disk: &Path, kernel: &Path, initrd: &Path) -> String {
    format!(
        "<domain type='{kind}'>
  <name>{name}</name>
  <uuid>{uuid}</uuid>
  <memory unit='MiB'>{GUEST_MEMORY_MIB}</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <kernel>{}</kernel>
    <initrd>{}</initrd>
    <cmdline>{GUEST_CMDLINE}</cmdline>
  </os>
  <features><acpi/></features>
  <on_crash>destroy</on_crash>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2' cache='none'/>
      <source file='{}'/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <serial type='pty'/>
    <channel type='unix'>
      <target type='virtio' name='{AGENT_CHANNEL}'/>
    </channel>
    <memballoon model='none'/>
  </devices>
</domain>",
        kernel.display(),
        initrd.display(),
        disk.display()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpio_entries_are_aligned_and_end_with_the_trailer() {
        let mut c = Cpio::default();
        c.dir("bin");
        c.dir("bin");
        c.file("bin/x", b"abc", 0o755);
        let out = c.finish();
        assert_eq!(out.len() % 4, 0);
        assert!(out.starts_with(b"070701"));
        let text = String::from_utf8_lossy(&out);
        assert_eq!(text.matches("070701").count(), 3, "one directory, one file, the trailer");
        assert!(text.contains("TRAILER!!!"));
    }

    #[test]
    fn the_cache_key_names_every_input() {
        let k = cache_key("linux-image-6.1.0-56-cloud-amd64_6.1.192-2_amd64.deb", "1:1.35.0-4", "1:7.2+dfsg-7");
        assert_eq!(k, "guest-v1-linux-image-6.1.0-56-cloud-amd64_6.1.192-2_amd64-bb1_1.35.0-4-ga1_7.2+dfsg-7");
    }

    #[test]
    fn the_guest_xml_boots_the_kernel_with_the_agent_channel() {
        let xml = guest_os_xml("g1", "u", "kvm", Path::new("/d"), Path::new("/k"), Path::new("/i"));
        assert!(xml.contains("<kernel>/k</kernel>") && xml.contains("<initrd>/i</initrd>"));
        assert!(xml.contains("panic=0"));
        assert!(xml.contains("name='org.qemu.guest_agent.0'"));
    }
}
