//! `havirt check`: can every protected domain run on every host it may
//! move to, network-wise? For each domain stored on the datastore (its
//! definition holds the cluster's names, `hypervisor::netmap`) and each
//! host its affinity allows, every bridge and libvirt network it plugs
//! into, after that host's `bridge_map`/`network_map`, must exist there.
//!
//! This host is looked at directly (`/sys/class/net/NAME/bridge`, libvirt's
//! active networks); the others through the inventories their daemons keep
//! on the datastore (`store::inventory`). A host without a fresh inventory
//! is reported as unknown, never as fine.

use super::{Finding, LIBVIRT_TIMEOUT_MS, STORAGE_TIMEOUT_MS, SYS_CLASS_NET, bounded, error, ok, warning};
use crate::config::{Config, Datastore, HostConfig};
use crate::daemon::registry;
use crate::engine::config::HostId;
use crate::hypervisor::netmap::{self, NetKind, NetUse};
use crate::hypervisor::{LibvirtHypervisor, LibvirtOptions};
use crate::store::Store;
use crate::store::inventory::{self, INVENTORY_MAX_AGE_S, Inventory};
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::Duration;

const WHAT: &str = "network";

/// One protected domain as stored.
struct Stored {
    name: String,
    /// Hosts it may run on; empty: any.
    affinity: Vec<HostId>,
    /// Its bridges and networks under the cluster's names, or why unknown.
    uses: Result<Vec<NetUse>, String>,
}

/// What one host offers, as far as this check can tell.
enum Offer {
    Known {
        bridges: BTreeSet<String>,
        /// None: libvirt's networks are unknown there.
        networks: Option<BTreeSet<String>>,
    },
    Unknown(String),
}

/// The findings of this check, in domain then host order.
pub(super) fn check(config: &Config, local: Option<&HostConfig>, uri: &str, out: &mut Vec<Finding>) {
    let (ds, cluster) = (config.cluster.datastore.clone(), config.cluster.name.clone());
    let hosts: Vec<(HostId, String)> = config.hosts.iter().map(|h| (h.id, h.name.clone())).collect();
    let read = bounded(Duration::from_millis(STORAGE_TIMEOUT_MS), move || read_datastore(&ds, &cluster, &hosts));
    let (domains, mut inventories) = match read {
        Ok(Ok(found)) => found,
        Ok(Err(e)) => return out.push(error(WHAT, format!("cannot read the protected domains' definitions: {e}"))),
        Err(why) => {
            return out.push(error(
                WHAT,
                format!("reading the stored definitions {why} within {} s", STORAGE_TIMEOUT_MS / 1000),
            ));
        }
    };
    if domains.is_empty() {
        return out.push(ok(WHAT, "no protected domain stored on the datastore: no bridge or network to check"));
    }
    let now_ms = unix_ms();
    let offers: BTreeMap<HostId, Offer> = config
        .hosts
        .iter()
        .map(|h| {
            let offer = if local.is_some_and(|l| l.id == h.id) {
                local_offer(uri)
            } else {
                remote_offer(h, inventories.remove(&h.id), now_ms)
            };
            (h.id, offer)
        })
        .collect();
    judge(config, &domains, &offers, out);
}

/// Every stored definition and every host's inventory (each Ok(None) when
/// absent, Err when rejected).
type InventoryReads = BTreeMap<HostId, Result<Option<Inventory>, String>>;

fn read_datastore(
    ds: &Datastore,
    cluster: &str,
    hosts: &[(HostId, String)],
) -> Result<(Vec<Stored>, InventoryReads), String> {
    // Read-only: host 0 names no ballot of ours (no lease is changed here).
    let store = Store::open(ds, cluster, HostId(0)).map_err(|e| e.to_string())?;
    let mut domains = Vec::new();
    for d in store.list_domain_xml().map_err(|e| e.to_string())? {
        let Some(xml) = store.read_domain_xml(d).map_err(|e| e.to_string())? else { continue };
        let spec = registry::entry(d, &xml).spec;
        let uses = netmap::interfaces(&xml).map_err(|e| e.to_string());
        domains.push(Stored { name: spec.name, affinity: spec.policy.affinity, uses });
    }
    domains.sort_by(|a, b| a.name.cmp(&b.name));
    let inventories = hosts.iter().map(|(id, name)| (*id, store.read_inventory(cluster, *id, name))).collect();
    Ok((domains, inventories))
}

/// This host: bridges from sysfs, networks from libvirt (bounded).
fn local_offer(uri: &str) -> Offer {
    let bridges = match inventory::local_bridges(Path::new(SYS_CLASS_NET)) {
        Ok(b) => b.into_iter().collect(),
        Err(e) => return Offer::Unknown(format!("{SYS_CLASS_NET} cannot be listed here: {e}")),
    };
    let owned = uri.to_owned();
    let networks = bounded(Duration::from_millis(LIBVIRT_TIMEOUT_MS), move || {
        LibvirtHypervisor::open(LibvirtOptions::new(&owned)).and_then(|hv| hv.active_networks())
    });
    Offer::Known { bridges, networks: networks.ok().and_then(Result::ok).map(|n| n.into_iter().collect()) }
}

fn remote_offer(host: &HostConfig, read: Option<Result<Option<Inventory>, String>>, now_ms: u64) -> Offer {
    let name = &host.name;
    let inv = match read {
        Some(Ok(Some(inv))) => inv,
        Some(Ok(None)) | None => {
            return Offer::Unknown(format!("no inventory of {name} on the datastore: daemon not running on {name}?"));
        }
        Some(Err(e)) => return Offer::Unknown(format!("the inventory of {name} was rejected: {e}")),
    };
    let age_s = now_ms.abs_diff(inv.written_unix_ms) / 1000;
    if age_s > INVENTORY_MAX_AGE_S {
        return Offer::Unknown(format!(
            "the inventory of {name} is {age_s} s old (rewritten every {} s): daemon not running on {name}, or its clock is off?",
            inventory::INVENTORY_INTERVAL_S
        ));
    }
    Offer::Known { bridges: inv.bridges.into_iter().collect(), networks: inv.networks.map(|n| n.into_iter().collect()) }
}

/// One error per (domain, host, missing network); one warning per host that
/// cannot be judged; one ok line when nothing is missing.
fn judge(config: &Config, domains: &[Stored], offers: &BTreeMap<HostId, Offer>, out: &mut Vec<Finding>) {
    let mut missing = 0;
    let mut unknown: BTreeMap<HostId, String> = BTreeMap::new();
    for d in domains {
        let uses = match &d.uses {
            Ok(u) => u,
            Err(e) => {
                out.push(error(WHAT, format!("domain {}: its stored definition does not parse: {e}", d.name)));
                continue;
            }
        };
        for host in config.hosts.iter().filter(|h| d.affinity.is_empty() || d.affinity.contains(&h.id)) {
            for need in uses {
                if let Some(w) = ambiguous(&d.name, host, need) {
                    out.push(w);
                }
                match has(offers.get(&host.id), host, need) {
                    Some(true) => {}
                    Some(false) => {
                        missing += 1;
                        out.push(error(WHAT, cannot_run(&d.name, host, need)));
                    }
                    None => {
                        let why = match offers.get(&host.id) {
                            Some(Offer::Unknown(why)) => why.clone(),
                            _ => format!("the libvirt networks of {} are unknown (libvirtd did not answer)", host.name),
                        };
                        unknown.entry(host.id).or_insert(why);
                    }
                }
            }
        }
    }
    for (id, why) in &unknown {
        let name = config.host_by_id(*id).map_or("?", |h| h.name.as_str());
        out.push(warning(
            WHAT,
            format!("cannot tell whether the protected domains' bridges and networks exist on {name}: {why}"),
        ));
    }
    if missing == 0 {
        let checked = config.hosts.iter().filter(|h| !unknown.contains_key(&h.id)).count();
        out.push(ok(
            WHAT,
            format!(
                "{} protected domain(s): their bridges and networks exist, after each host's map, on the {checked} host(s) that could be checked",
                domains.len()
            ),
        ));
    }
}

/// Whether `host` offers `need` (under its local name); None: unknown.
fn has(offer: Option<&Offer>, host: &HostConfig, need: &NetUse) -> Option<bool> {
    let Some(Offer::Known { bridges, networks }) = offer else { return None };
    let local = host.net_map.local(need.kind, &need.name);
    match need.kind {
        NetKind::Bridge => Some(bridges.contains(local)),
        NetKind::Network => networks.as_ref().map(|n| n.contains(local)),
    }
}

/// A cluster name that `host` uses as the local name of another: the
/// domain would run there on it, but be stored back under the other name.
fn ambiguous(domain: &str, host: &HostConfig, need: &NetUse) -> Option<Finding> {
    let other = host.net_map.cluster(need.kind, &need.name);
    if other == need.name || host.net_map.local(need.kind, &need.name) != need.name {
        return None;
    }
    let (word, key, h, name) = (need.kind.word(), need.kind.map_key(), &host.name, &need.name);
    Some(warning(
        WHAT,
        format!(
            "domain {domain} uses {word} {name}, which {h}'s {key} makes the local name of {other}: on {h} its definition would be stored back as {other}; give the LAN one cluster name, or map {name} in {h}'s {key} too"
        ),
    ))
}

fn cannot_run(domain: &str, host: &HostConfig, need: &NetUse) -> String {
    let local = host.net_map.local(need.kind, &need.name);
    let (word, key, h) = (need.kind.word(), need.kind.map_key(), &host.name);
    let name = &need.name;
    if local == need.name {
        format!(
            "domain {domain} cannot run on {h}: {word} {name} does not exist there; create it on {h}, or map {name} to {h}'s own {word} with {key} in {h}'s [[host]]"
        )
    } else {
        format!(
            "domain {domain} cannot run on {h}: {word} {name} (mapped to {local}) does not exist there; create {local} on {h}, or correct {key} in {h}'s [[host]]"
        )
    }
}

fn unix_ms() -> u64 {
    #[allow(clippy::disallowed_methods, reason = "the age of another host's inventory, for a report")]
    let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    u64::try_from(t.as_millis()).unwrap_or(u64::MAX)
}
