//! The faults and operator commands a simulation (random schedule or golden
//! scenario) can apply. Every one is a fault the design claims to survive.

use crate::engine::config::{DomainId, HostId};
use serde::{Deserialize, Serialize};

/// How a fence agent behaves against one target.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum AgentMode {
    Works,
    /// Answers "failed" after a second or so (BMC unreachable, bad password).
    Fails,
    /// Never answers: the engine's fence_timeout must end the attempt.
    Hangs,
}

/// How a host's storage misbehaves.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum StorageFault {
    /// Every I/O fails at once with EIO.
    Fail,
    /// Every I/O blocks until the fault is cleared, then completes (NFS hard mount).
    Hang,
    /// Writes fail with EIO, reads work (an export gone read-only, a full quota).
    ReadOnly,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    /// Power the host off (all its qemu die, its daemon dies).
    PowerOff(HostId),
    /// Power the host on: it boots with a new boot id and starts its daemon.
    PowerOn(HostId),
    /// Two-way partition: hosts in different groups stop hearing each other.
    /// Hosts not named keep their links to everybody.
    Partition(Vec<Vec<HostId>>),
    /// One-way loss: packets from `from` to `to` are dropped.
    DropOneWay {
        from: HostId,
        to: HostId,
    },
    /// Remove every partition and one-way drop (not isolation).
    HealNetwork,
    /// Cut the host from every peer and from its isolation addresses.
    Isolate(HostId),
    Unisolate(HostId),
    /// Random packet loss on every link, in percent.
    NetLoss(u8),
    StorageFault {
        host: HostId,
        fault: StorageFault,
    },
    StorageRestore(HostId),
    /// All storage I/O of every host blocks for this many milliseconds.
    StorageStall {
        millis: u64,
    },
    /// Freeze the whole host (daemon, qemu and its watchdog), as a paused VM.
    Pause(HostId),
    Resume(HostId),
    /// libvirtd on the host stops answering (start, destroy, shutdown hang);
    /// killing qemu directly still works unless `qemu_stuck`, when qemu sits
    /// in uninterruptible sleep and only a reset ends it.
    Hypervisor {
        host: HostId,
        hung: bool,
        qemu_stuck: bool,
    },
    /// The havirt daemon dies; qemu keeps running; the watchdog keeps counting.
    DaemonCrash(HostId),
    /// The daemon stops on purpose (SIGTERM: `systemctl stop` or the stop
    /// half of a restart) with a grace of watchdog_timeout; qemu keeps
    /// running. `host_reset`: its watchdog outlives it (a device); false
    /// for systemd's service watchdog, which a clean stop ends, so nothing
    /// resets the host until a daemon runs again.
    DaemonStop {
        host: HostId,
        host_reset: bool,
    },
    DaemonStart(HostId),
    /// The fence agent `agent` against `target` works, fails, or hangs.
    FenceAgent {
        target: HostId,
        agent: String,
        mode: AgentMode,
    },
    /// qemu of this domain dies wherever it runs.
    DomainCrash(DomainId),
    /// Every start of this domain fails (broken disk), or works again.
    DomainBroken {
        domain: DomainId,
        broken: bool,
    },
    /// The operator confirms the host is powered off.
    OperatorFenceConfirm(HostId),
    /// `havirt protect`, as the daemon does it: the domain's lease moves to
    /// `host` (its current boot, generation + 1, `Acquired`), then every
    /// daemon gets the new protected set, then `host` adopts the domain.
    /// `None`: wherever it runs now (retried while that host cannot protect
    /// it: paused, daemon down, storage failing); where it runs nowhere, its
    /// lease is freed and the master starts it (as if the operator had
    /// started it first).
    Protect {
        domain: DomainId,
        host: Option<HostId>,
    },
    /// `havirt unprotect`: every daemon gets the protected set without the
    /// domain; it keeps running, unmanaged, and its lease stays as it is.
    Unprotect(DomainId),
    /// `havirt maintenance enter|exit` on the host itself.
    Maintenance {
        host: HostId,
        enter: bool,
    },
    /// The operator ends a host's maintenance for sure: `havirt maintenance
    /// exit` on it, repeated every MAINTENANCE_EXIT_RETRY_MS while its
    /// daemon is down (the command fails there, and a real operator tries
    /// again) or it still says maintenance.
    EndMaintenance(HostId),
    /// The guest of this domain hangs (its agent stops answering) until a
    /// reset; `always`: also after every reset or start (a broken OS).
    GuestHang {
        domain: DomainId,
        always: bool,
    },
    /// The guest no longer hangs at every boot (the next reset cures it).
    GuestRecover(DomainId),
    /// The guest powers itself off (`destroy`: the operator runs `virsh
    /// destroy`) where it runs and has booted: a stop on purpose.
    GuestStop {
        domain: DomainId,
        destroy: bool,
    },
    /// `havirt start` of the domain on `host` (retried while it runs nowhere).
    OperatorStart {
        domain: DomainId,
        host: HostId,
    },
}
