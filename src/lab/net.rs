//! The lab's networks (LAB-NOTES.md, "Network and partitions"): the switch
//! namespace `hl-sw` with bridges br0 (heartbeat, 10.99.0.0/24) and br1
//! (management, 10.98.0.0/24), a namespace `hl-hN` per host, and `hl-bmc`
//! holding every BMC address. Built with `ip`, faulted with `nft`.
//!
//! Faults hit the heartbeat network only (hl-pN ports on br0): a
//! partitioned or isolated host still reaches the BMCs over br1, as a real
//! cluster's fencing network survives a heartbeat switch failure.

use super::faultfs::NETNS_DIR;
use super::sys::{LabError, run_args};
use std::path::Path;

pub const SWITCH_NS: &str = "hl-sw";
pub const BMC_NS: &str = "hl-bmc";
/// Heartbeat bridge and management bridge in `SWITCH_NS`.
pub const HEARTBEAT_BRIDGE: &str = "br0";
pub const MANAGEMENT_BRIDGE: &str = "br1";
/// Hosts are 1..=MAX_HOSTS: BMC N is 10.98.0.N, host N's management address
/// 10.98.0.(100+N), so the two ranges never meet.
pub const MAX_HOSTS: u16 = 99;
/// The heartbeat network's "gateway": the switch's own address on br0, the
/// hosts' isolation address. A partition between hosts leaves it reachable
/// (the hosts are not isolated); `isolate` and power-off cut it off.
pub const GATEWAY_ADDR: &str = "10.99.0.254";
/// The bridge-family nft table (and its chain) in `SWITCH_NS`.
pub const NFT_TABLE: &str = "hl";
const NFT_CHAIN: &str = "filter";

/// Host N's network namespace.
pub fn host_ns(host: u16) -> String {
    format!("hl-h{host}")
}

/// Host N's heartbeat port on br0 in `SWITCH_NS` (its peer is eth0 in hl-hN).
pub fn heartbeat_port(host: u16) -> String {
    format!("hl-p{host}")
}

/// Host N's management port on br1 in `SWITCH_NS` (its peer is eth1).
pub fn management_port(host: u16) -> String {
    format!("hl-m{host}")
}

pub fn heartbeat_addr(host: u16) -> String {
    format!("10.99.0.{host}")
}

pub fn management_addr(host: u16) -> String {
    format!("10.98.0.{}", 100 + host)
}

pub fn bmc_addr(host: u16) -> String {
    format!("10.98.0.{host}")
}

pub(crate) fn check_host(host: u16) -> Result<(), LabError> {
    if host == 0 || host > MAX_HOSTS {
        return Err(LabError::BadHost { host, max: MAX_HOSTS });
    }
    Ok(())
}

/// The networks of a lab of hosts 1..=hosts. Holds no resource: `down`
/// removes the namespaces, found by name.
#[derive(Debug, Clone)]
pub struct Network {
    hosts: u16,
}

fn ip(args: &[&str]) -> Result<(), LabError> {
    run_args("ip", args).map(drop)
}

fn nft(args: &[&str]) -> Result<(), LabError> {
    let mut full = vec!["netns", "exec", SWITCH_NS, "nft"];
    full.extend_from_slice(args);
    ip(&full)
}

/// A veth from `port` in the switch (on `bridge`) to `dev` in `ns`, up.
fn plug(ns: &str, dev: &str, port: &str, bridge: &str, addrs: &[String]) -> Result<(), LabError> {
    ip(&["-n", SWITCH_NS, "link", "add", port, "type", "veth", "peer", "name", dev, "netns", ns])?;
    ip(&["-n", SWITCH_NS, "link", "set", port, "master", bridge, "up"])?;
    for addr in addrs {
        ip(&["-n", ns, "addr", "add", &format!("{addr}/24"), "dev", dev])?;
    }
    ip(&["-n", ns, "link", "set", dev, "up"])
}

fn add_ns(ns: &str) -> Result<(), LabError> {
    ip(&["netns", "add", ns])?;
    ip(&["-n", ns, "link", "set", "lo", "up"])
}

impl Network {
    /// Creates the switch, hosts 1..=hosts and the BMC namespace. Fails if
    /// a lab network exists already (run `lab::down` first).
    pub fn create(hosts: u16) -> Result<Network, LabError> {
        check_host(hosts)?;
        if Path::new(NETNS_DIR).join(SWITCH_NS).exists() {
            return Err(LabError::State {
                what: format!("netns {SWITCH_NS} exists: a lab is up (remove it with `lab::down`)"),
            });
        }
        add_ns(SWITCH_NS)?;
        for bridge in [HEARTBEAT_BRIDGE, MANAGEMENT_BRIDGE] {
            ip(&["-n", SWITCH_NS, "link", "add", bridge, "type", "bridge"])?;
            ip(&["-n", SWITCH_NS, "link", "set", bridge, "up"])?;
        }
        ip(&["-n", SWITCH_NS, "addr", "add", &format!("{GATEWAY_ADDR}/24"), "dev", HEARTBEAT_BRIDGE])?;
        for n in 1..=hosts {
            let ns = host_ns(n);
            add_ns(&ns)?;
            plug(&ns, "eth0", &heartbeat_port(n), HEARTBEAT_BRIDGE, &[heartbeat_addr(n)])?;
            plug(&ns, "eth1", &management_port(n), MANAGEMENT_BRIDGE, &[management_addr(n)])?;
        }
        add_ns(BMC_NS)?;
        let bmcs: Vec<String> = (1..=hosts).map(bmc_addr).collect();
        plug(BMC_NS, "eth0", "hl-mb", MANAGEMENT_BRIDGE, &bmcs)?;
        let chain = "{ type filter hook forward priority 0; policy accept; }";
        nft(&["add", "table", "bridge", NFT_TABLE])?;
        nft(&["add", "chain", "bridge", NFT_TABLE, NFT_CHAIN, chain])?;
        Ok(Network { hosts })
    }

    /// The network of a lab already up (made by `create`, maybe by another
    /// process), for its fault helpers.
    pub fn existing(hosts: u16) -> Result<Network, LabError> {
        check_host(hosts)?;
        Ok(Network { hosts })
    }

    pub fn hosts(&self) -> u16 {
        self.hosts
    }

    /// Drops heartbeat traffic from each host of `from` to each of `to`,
    /// and back when `both_ways`. Adds to the partitions already set.
    pub fn partition(&self, from: &[u16], to: &[u16], both_ways: bool) -> Result<(), LabError> {
        for &a in from {
            for &b in to {
                self.check(a)?;
                self.check(b)?;
                self.drop_rule(a, b)?;
                if both_ways {
                    self.drop_rule(b, a)?;
                }
            }
        }
        Ok(())
    }

    fn drop_rule(&self, from: u16, to: u16) -> Result<(), LabError> {
        let (i, o) = (heartbeat_port(from), heartbeat_port(to));
        nft(&["add", "rule", "bridge", NFT_TABLE, NFT_CHAIN, "iifname", &i, "oifname", &o, "drop"])
    }

    /// Cuts host N off the heartbeat network (its switch port down): its
    /// address no longer answers at all.
    pub fn isolate(&self, host: u16) -> Result<(), LabError> {
        self.check(host)?;
        ip(&["-n", SWITCH_NS, "link", "set", &heartbeat_port(host), "down"])
    }

    /// Removes every partition rule and brings every host's port back up.
    pub fn heal(&self) -> Result<(), LabError> {
        nft(&["flush", "chain", "bridge", NFT_TABLE, NFT_CHAIN])?;
        for n in 1..=self.hosts {
            ip(&["-n", SWITCH_NS, "link", "set", &heartbeat_port(n), "up"])?;
        }
        Ok(())
    }

    fn check(&self, host: u16) -> Result<(), LabError> {
        if host == 0 || host > self.hosts {
            return Err(LabError::BadHost { host, max: self.hosts });
        }
        Ok(())
    }
}
