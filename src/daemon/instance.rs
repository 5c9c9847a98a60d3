//! One daemon per host and datastore, for as long as its process exists.
//!
//! The Disk Paxos driver (`store::paxos`) relies on one writer per host
//! dblock with at most one write in flight. Across a daemon restart that
//! holds only if the new daemon starts after the old process is gone. A
//! daemon stuck in uninterruptible I/O on a hung LUN (state D) survives
//! SIGKILL, and systemd starts the next one anyway once the final SIGKILL
//! times out; the old write could then land after the new daemon's ballot
//! and roll its dblock back past a promise. The same holds for two daemons
//! started by hand: two writers of one heartbeat slot.
//!
//! The lock is a listening socket in the abstract namespace, bound before
//! the datastore is opened and never closed: the kernel frees the name only
//! when the last thread of the process has exited, after every I/O it
//! issued has returned. It is deliberately not a file: systemd's
//! RuntimeDirectory cleanup, tmpfiles or an operator may unlink a lock file
//! while it is held, and a lock on an unlinked file protects nothing.
//! Abstract names live in the network namespace, which is the host (in the
//! lab too: each lab host has its own).

use crate::config::{Config, HostConfig};
use sha2::{Digest, Sha256};
use std::io;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixListener};

/// Who holds a lock: the pid as this process sees it (none when it runs in
/// a PID namespace this one cannot see into) and its scheduler state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Holder {
    pub pid: Option<i32>,
    /// `/proc/PID/status`'s State line, e.g. "D (disk sleep)".
    pub state: Option<String>,
}

impl std::fmt::Display for Holder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (self.pid, &self.state) {
            (Some(pid), Some(state)) => write!(f, "pid {pid}, state {state}"),
            (Some(pid), None) => write!(f, "pid {pid}"),
            _ => f.write_str("pid not visible from here"),
        }
    }
}

impl Holder {
    /// Stuck in uninterruptible sleep: it exits only when its I/O returns.
    pub fn in_disk_sleep(&self) -> bool {
        self.state.as_deref().is_some_and(|s| s.starts_with('D'))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum InstanceError {
    #[error(
        "another havirt daemon for host {host} of cluster {cluster} on {datastore} still exists ({holder}). \
         Two would write this host's heartbeat and leases at once, so this one does not start. \
         Stop the other (systemctl stop havirt){stuck}"
    )]
    Held { host: String, cluster: String, datastore: String, holder: Holder, stuck: &'static str },
    #[error("the single-instance lock for host {host}: {source}")]
    Io {
        host: String,
        #[source]
        source: io::Error,
    },
}

const STUCK_HINT: &str = "; it is in uninterruptible I/O (state D), so it exits only when the datastore answers: \
     repair the storage path, or reboot this host";

/// What a lock is for.
#[derive(Clone, Debug)]
pub struct Instance {
    pub cluster: String,
    pub host: String,
    /// The datastore as configured (not canonicalized: resolving a path on
    /// a hung NFS mount would block).
    pub datastore: String,
}

impl Instance {
    /// The daemon of host `me` in `config`'s cluster.
    pub fn of(config: &Config, me: &HostConfig) -> Instance {
        Instance {
            cluster: config.cluster.name.clone(),
            host: me.name.clone(),
            datastore: super::datastore_name(config),
        }
    }

    /// The abstract socket name: hashed, because names are at most 107
    /// bytes and datastore paths may be longer.
    fn name(&self) -> String {
        let mut h = Sha256::new();
        for part in [&self.cluster, &self.host, &self.datastore] {
            h.update(part.as_bytes());
            h.update([0u8]);
        }
        let hex: String = h.finalize().iter().take(16).map(|b| format!("{b:02x}")).collect();
        format!("havirt-daemon/{hex}")
    }

    fn addr(&self) -> io::Result<SocketAddr> {
        SocketAddr::from_abstract_name(self.name().as_bytes())
    }

    /// Takes the lock for the rest of this process's life, or says who
    /// holds it.
    pub fn lock(&self) -> Result<(), InstanceError> {
        let io_err = |source| InstanceError::Io { host: self.host.clone(), source };
        let addr = self.addr().map_err(io_err)?;
        match UnixListener::bind_addr(&addr) {
            Ok(listener) => {
                // Never closed: see the module comment.
                std::mem::forget(listener);
                Ok(())
            }
            Err(e) if e.kind() == io::ErrorKind::AddrInUse => {
                let holder = self.holder().unwrap_or(Holder { pid: None, state: None });
                let stuck = if holder.in_disk_sleep() { STUCK_HINT } else { "" };
                Err(InstanceError::Held {
                    host: self.host.clone(),
                    cluster: self.cluster.clone(),
                    datastore: self.datastore.clone(),
                    holder,
                    stuck,
                })
            }
            Err(e) => Err(io_err(e)),
        }
    }

    /// The process that holds the lock, if one does. Found without
    /// connecting: nobody accepts on the socket, so every connection would
    /// stay in its backlog, and a full backlog makes connect block.
    pub fn holder(&self) -> Option<Holder> {
        let inode = bound_inode(&format!("@{}", self.name()))?;
        let pid = socket_owner(inode);
        Some(Holder { pid, state: pid.and_then(proc_state) })
    }
}

/// The inode of the listening socket bound to `path` in this network
/// namespace (`/proc/net/unix`: "... Inode Path", abstract names with '@').
fn bound_inode(path: &str) -> Option<u64> {
    let table = std::fs::read_to_string("/proc/net/unix").ok()?;
    table.lines().skip(1).find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        match fields.as_slice() {
            [.., inode, p] if *p == path => inode.parse().ok(),
            _ => None,
        }
    })
}

/// The process with an fd on socket `inode`, if this PID namespace sees it.
fn socket_owner(inode: u64) -> Option<i32> {
    let wanted = format!("socket:[{inode}]");
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
        let pid: i32 = e.file_name().to_str()?.parse().ok()?;
        let fds = std::fs::read_dir(e.path().join("fd")).ok()?;
        fds.flatten()
            .any(|fd| std::fs::read_link(fd.path()).is_ok_and(|l| l.as_os_str() == wanted.as_str()))
            .then_some(pid)
    })
}

fn proc_state(pid: i32) -> Option<String> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find_map(|l| l.strip_prefix("State:"))?;
    Some(line.trim().to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn instance(datastore: &str) -> Instance {
        Instance { cluster: "unit".into(), host: "h1".into(), datastore: datastore.into() }
    }

    #[test]
    fn a_second_lock_is_refused_and_names_the_holder() {
        let ds = format!("/tmp/instance-test-{}", std::process::id());
        let first = instance(&ds);
        assert_eq!(first.holder(), None, "nobody holds a fresh name");
        first.lock().expect("first lock");
        let err = instance(&ds).lock().expect_err("second lock");
        let text = err.to_string();
        let me = std::process::id().to_string();
        assert!(text.contains(&format!("pid {me}")), "{text}");
        assert!(text.contains("host h1 of cluster unit"), "{text}");
        let holder = first.holder().expect("held");
        assert_eq!(holder.pid, Some(std::process::id() as i32));
        assert!(!holder.in_disk_sleep(), "{holder}");
    }

    #[test]
    fn names_differ_by_cluster_host_and_datastore() {
        let name =
            |c: &str, h: &str, ds: &str| Instance { cluster: c.into(), host: h.into(), datastore: ds.into() }.name();
        let (a, b, c, d) =
            (name("c", "h1", "/ds"), name("c", "h2", "/ds"), name("c", "h1", "/ds2"), name("c\0h1", "", "/ds"));
        assert!(a != b && a != c && b != c && a != d, "{a} {b} {c} {d}");
        assert!(a.len() < 107);
    }
}
