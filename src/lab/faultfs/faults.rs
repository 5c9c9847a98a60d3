//! The control language and the fault table: which fault a request meets.
//!
//! One command per line: `hang`, `eio`, `delay MS`, `readonly`, `ok` or
//! `status`; the first five may end with `netns=NAME`, which limits them to
//! callers in the network namespace `/run/netns/NAME` (a lab host). A fault
//! set for a namespace replaces that namespace's previous one; a fault set
//! without one replaces the global one. A caller in a namespace that has its
//! own fault meets that fault, any other caller meets the global fault. `ok`
//! clears everything, `ok netns=NAME` only that namespace's fault.
//!
//! Pure: the netns name is resolved to an inode by the caller (`gate`).

use std::collections::BTreeMap;
use std::fmt;

/// Longest delay a command may ask for: ten minutes, far beyond any io_timeout.
pub const MAX_DELAY_MS: u64 = 600_000;
/// Longest netns name (a file name under /run/netns).
pub const MAX_NETNS_NAME_BYTES: usize = 255;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// Every request waits, unanswered, until the fault changes.
    Hang,
    /// Every request fails with EIO.
    Eio,
    /// Every request waits `ms` before it runs.
    Delay { ms: u64 },
    /// Requests that would modify the datastore fail with EROFS.
    ReadOnly,
}

impl fmt::Display for Fault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Fault::Hang => f.write_str("hang"),
            Fault::Eio => f.write_str("eio"),
            Fault::Delay { ms } => write!(f, "delay {ms}"),
            Fault::ReadOnly => f.write_str("readonly"),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Command {
    /// `netns`: the name under /run/netns, or every caller.
    Set {
        fault: Fault,
        netns: Option<String>,
    },
    /// `netns`: clear only that namespace's fault; `None` clears all.
    Clear {
        netns: Option<String>,
    },
    /// Fail every request of `netns` waiting now (parked or delayed) with
    /// EIO; the fault stays. A lab host powered off loses its pending I/O
    /// with it (a process in D state on a hung request could not die).
    Abort {
        netns: String,
    },
    Status,
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum CommandError {
    #[error(
        "empty command: use hang, eio, delay MS, readonly, ok or status (optionally followed by netns=NAME), or abort netns=NAME"
    )]
    Empty,
    #[error("unknown command {0:?}: use hang, eio, delay MS, readonly, ok, status or abort netns=NAME")]
    Unknown(String),
    #[error("abort needs netns=NAME: it fails the waiting requests of that namespace")]
    AbortWithoutNetns,
    #[error("delay needs a whole number of milliseconds from 0 to {MAX_DELAY_MS}, got {0:?}")]
    BadDelay(String),
    #[error(
        "invalid netns name {0:?}: give the name of a file under /run/netns (as `ip netns add NAME` makes), without '/'"
    )]
    BadNetns(String),
    #[error("unexpected {0:?}: only netns=NAME may follow the command (status takes nothing)")]
    Extra(String),
}

impl Command {
    pub fn parse(line: &str) -> Result<Command, CommandError> {
        let mut words = line.split_whitespace();
        let verb = words.next().ok_or(CommandError::Empty)?;
        let fault = match verb {
            "hang" => Some(Fault::Hang),
            "eio" => Some(Fault::Eio),
            "readonly" => Some(Fault::ReadOnly),
            "delay" => {
                let ms = words.next().unwrap_or("");
                let parsed = ms.parse::<u64>().ok().filter(|ms| *ms <= MAX_DELAY_MS);
                Some(Fault::Delay { ms: parsed.ok_or_else(|| CommandError::BadDelay(ms.to_string()))? })
            }
            "ok" | "status" | "abort" => None,
            other => return Err(CommandError::Unknown(other.to_string())),
        };
        if verb == "status" {
            return match words.next() {
                Some(extra) => Err(CommandError::Extra(extra.to_string())),
                None => Ok(Command::Status),
            };
        }
        let netns = parse_netns(words.next())?;
        if let Some(extra) = words.next() {
            return Err(CommandError::Extra(extra.to_string()));
        }
        if verb == "abort" {
            return netns.map(|netns| Command::Abort { netns }).ok_or(CommandError::AbortWithoutNetns);
        }
        Ok(match fault {
            Some(fault) => Command::Set { fault, netns },
            None => Command::Clear { netns },
        })
    }
}

fn parse_netns(word: Option<&str>) -> Result<Option<String>, CommandError> {
    let Some(word) = word else { return Ok(None) };
    let name = word.strip_prefix("netns=").ok_or_else(|| CommandError::Extra(word.to_string()))?;
    let valid = !name.is_empty()
        && name.len() <= MAX_NETNS_NAME_BYTES
        && name != "."
        && name != ".."
        && !name.contains('/')
        && !name.contains('\0');
    if valid { Ok(Some(name.to_string())) } else { Err(CommandError::BadNetns(name.to_string())) }
}

/// The faults in force. Namespaces are keyed by name (for `status`, in a
/// fixed order) and matched by the inode of their nsfs file, which is what
/// /proc/<pid>/ns/net of a caller in them shows.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FaultTable {
    global: Option<Fault>,
    netns: BTreeMap<String, (u64, Fault)>,
}

impl FaultTable {
    /// `netns`: the name and the inode it resolved to.
    pub fn set(&mut self, fault: Fault, netns: Option<(String, u64)>) {
        match netns {
            None => self.global = Some(fault),
            Some((name, ino)) => {
                self.netns.insert(name, (ino, fault));
            }
        }
    }

    pub fn clear(&mut self, netns: Option<&str>) {
        match netns {
            None => *self = FaultTable::default(),
            Some(name) => {
                self.netns.remove(name);
            }
        }
    }

    /// Whether a request's fault depends on its caller's namespace (then
    /// the caller's namespace must be looked up).
    pub fn by_caller(&self) -> bool {
        !self.netns.is_empty()
    }

    /// The fault a caller in namespace `caller_netns` (inode; `None` when
    /// unknown, e.g. a kernel-initiated request) meets.
    pub fn fault_for(&self, caller_netns: Option<u64>) -> Option<Fault> {
        let own = caller_netns.and_then(|ino| self.netns.values().find(|(i, _)| *i == ino));
        own.map(|(_, fault)| *fault).or(self.global)
    }

    /// In command syntax, `; `-separated: `hang netns=h1; delay 200`.
    pub fn describe(&self) -> String {
        let global = self.global.map(|f| f.to_string());
        let scoped = self.netns.iter().map(|(name, (_, f))| format!("{f} netns={name}"));
        global.into_iter().chain(scoped).collect::<Vec<_>>().join("; ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_parse() {
        assert_eq!(Command::parse("hang"), Ok(Command::Set { fault: Fault::Hang, netns: None }));
        assert_eq!(
            Command::parse(" delay 200 netns=h1 "),
            Ok(Command::Set { fault: Fault::Delay { ms: 200 }, netns: Some("h1".into()) })
        );
        assert_eq!(Command::parse("readonly"), Ok(Command::Set { fault: Fault::ReadOnly, netns: None }));
        assert_eq!(Command::parse("eio netns=h2"), Ok(Command::Set { fault: Fault::Eio, netns: Some("h2".into()) }));
        assert_eq!(Command::parse("ok"), Ok(Command::Clear { netns: None }));
        assert_eq!(Command::parse("ok netns=h3"), Ok(Command::Clear { netns: Some("h3".into()) }));
        assert_eq!(Command::parse("status"), Ok(Command::Status));
        assert_eq!(Command::parse("abort netns=hl-h2"), Ok(Command::Abort { netns: "hl-h2".into() }));
        assert_eq!(Command::parse("abort"), Err(CommandError::AbortWithoutNetns));
    }

    #[test]
    fn bad_commands_say_what_is_valid() {
        assert_eq!(Command::parse("  "), Err(CommandError::Empty));
        assert_eq!(Command::parse("freeze"), Err(CommandError::Unknown("freeze".into())));
        assert_eq!(Command::parse("delay"), Err(CommandError::BadDelay(String::new())));
        assert_eq!(Command::parse("delay -1"), Err(CommandError::BadDelay("-1".into())));
        assert_eq!(Command::parse("delay 600001"), Err(CommandError::BadDelay("600001".into())));
        assert!(Command::parse("delay 600000").is_ok());
        assert_eq!(Command::parse("hang netns=../x"), Err(CommandError::BadNetns("../x".into())));
        assert_eq!(Command::parse("hang netns="), Err(CommandError::BadNetns(String::new())));
        assert_eq!(Command::parse("hang h1"), Err(CommandError::Extra("h1".into())));
        assert_eq!(Command::parse("eio netns=a b"), Err(CommandError::Extra("b".into())));
        assert_eq!(Command::parse("status netns=h1"), Err(CommandError::Extra("netns=h1".into())));
        let msg = CommandError::BadDelay("x".into()).to_string();
        assert!(msg.contains("0 to 600000"), "{msg}");
    }

    #[test]
    fn own_namespace_fault_beats_the_global_one() {
        let mut t = FaultTable::default();
        assert_eq!(t.fault_for(Some(7)), None);
        assert!(!t.by_caller());
        t.set(Fault::Delay { ms: 5 }, None);
        t.set(Fault::Hang, Some(("h1".into(), 7)));
        assert!(t.by_caller());
        assert_eq!(t.fault_for(Some(7)), Some(Fault::Hang));
        assert_eq!(t.fault_for(Some(8)), Some(Fault::Delay { ms: 5 }));
        assert_eq!(t.fault_for(None), Some(Fault::Delay { ms: 5 }));
        assert_eq!(t.describe(), "delay 5; hang netns=h1");
        t.clear(Some("h1"));
        assert_eq!(t.fault_for(Some(7)), Some(Fault::Delay { ms: 5 }));
        t.set(Fault::Eio, Some(("h2".into(), 9)));
        t.clear(None);
        assert_eq!(t, FaultTable::default());
        assert_eq!(t.describe(), "");
    }

    #[test]
    fn a_namespace_fault_alone_spares_other_callers() {
        let mut t = FaultTable::default();
        t.set(Fault::Eio, Some(("h1".into(), 7)));
        t.set(Fault::ReadOnly, Some(("h1".into(), 7)));
        assert_eq!(t.fault_for(Some(7)), Some(Fault::ReadOnly));
        assert_eq!(t.fault_for(Some(1)), None);
        assert_eq!(t.fault_for(None), None);
    }
}
