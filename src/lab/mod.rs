//! Tooling for havirt's tests and its multi-host lab (LAB-NOTES.md): not
//! part of the daemon's decisions.
//!
//! # The lab (issue 4)
//!
//! Several real KVM hosts on one Linux machine, so that havirt is proven
//! end to end against real libvirtd and qemu, and fenced through the same
//! tools as real servers. Everything lives under one state directory
//! `LAB_DIR` (`/var/tmp/havirt-lab`), and every name the lab creates starts
//! with `hl-`, so that `lab down` can find and remove all of it, twice.
//!
//! ```text
//! netns hl-sw      the switch: bridge br0 (heartbeat network 10.99.0.0/24)
//!                  and bridge br1 (management network 10.98.0.0/24)
//! netns hl-hN      host N: eth0 10.99.0.N (veth hl-pN in hl-sw on br0),
//!                  eth1 10.98.0.(100+N) (veth hl-mN on br1); lo up
//! netns hl-bmc     the BMCs: eth0 on br1 with 10.98.0.N for every host N;
//!                  one ipmi_sim per host, listening on 10.98.0.N:623
//! LAB_DIR/hN/      host N's state: etc/ (copy of /etc/libvirt), run/, lib/,
//!                  log/, cache/ (bind-mounted over libvirt's paths inside
//!                  the host; run/boot_id is bind-mounted over the kernel's
//!                  boot id, new at every power-on), havirt.sock (its
//!                  daemon's control socket), havirt.log, libvirtd.log,
//!                  start (the host's power: runs it in the foreground),
//!                  console.log (start's output when `Host::power_on` runs it)
//! LAB_DIR/havirt.toml, cluster.key, bmc.pw, domains/  the cluster's config,
//!                  key, BMC password, first domain definitions (cluster.rs)
//! LAB_DIR/lab.sock, lab.log  the keeper of a lab made by `lab up` (keeper.rs)
//! LAB_DIR/bmc/hN/  lan.conf (0600), bmc.emu, state/, ipmi_sim.log of host
//!                  N's BMC (bmc.rs)
//! LAB_DIR/backing  the datastore's backing directory ("the NFS export")
//! LAB_DIR/ds       faultfs mounted over backing (rshared), seen by every
//!                  host at the same path; the cluster's datastore is
//!                  LAB_DIR/ds/cluster
//! LAB_DIR/ds/havirt-lab-block/  with `--datastore block`: the LUN
//!                  (lun.img) and the domains' raw disks (vmI.img), each a
//!                  loop device per host; LAB_DIR/hN/disks/ names host N's,
//!                  seen inside it at LAB_DIR/disks/ (lun.rs)
//! LAB_DIR/hN/watchdog.sock  host N's lab watchdog (the supervisor listens)
//! LAB_DIR/faultfs.sock      faultfs's control socket (`down` clears its
//!                           faults before anything else)
//! /var/tmp/havirt-lab.lock  LAB_LOCK: whoever uses the one lab holds it
//!                           (outside LAB_DIR: `down` leaves it)
//! ```
//!
//! A host is a network namespace plus a private mount and PID namespace
//! whose PID 1 is `tini`, running virtlogd, libvirtd and `havirt daemon`.
//! `LAB_DIR/hN/start` runs it in the foreground (`ip netns exec hl-hN
//! unshare -m -p -f --kill-child --propagation slave --mount-proc tini -s -- ...`) and
//! turns SIGTERM into SIGKILL of the namespace's init: that is the host's
//! power, used by its BMC (`ipmi_sim`'s startcmd) and by the watchdog
//! supervisor. Power loss kills libvirtd, qemu and the daemon at once.
//! libvirt from outside: `qemu:///system?socket=LAB_DIR/hN/run/libvirt-sock`.
//!
//! Faults (`net::Network`) hit the heartbeat network: a partitioned or
//! isolated host still reaches the BMCs over br1.

pub mod bench;
pub mod bmc;
pub mod cluster;
pub mod demo;
mod down;
pub mod faultfs;
pub mod guest;
pub mod host;
pub mod keeper;
pub mod lun;
pub mod net;
pub mod observer;
pub mod supervisor;
mod sys;

pub use down::{DownReport, FAULTFS_SOCKET, down};
pub use sys::{LAB_LOCK, LabError, lock};

/// The lab's state directory (layout above).
pub const LAB_DIR: &str = "/var/tmp/havirt-lab";
