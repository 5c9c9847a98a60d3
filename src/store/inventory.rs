//! Host inventories: what networks each host offers, for `havirt check` on
//! another host (issue 5, network mapping).
//!
//! Every daemon writes `<datastore>/inventory/<id>.json` at start and every
//! [`INVENTORY_INTERVAL_S`]: its Linux bridges (`/sys/class/net/*/bridge`)
//! and the active libvirt networks, with the time of writing. `havirt
//! check` reads the others' to tell whether each protected domain can run
//! on each host after that host's `bridge_map`/`network_map`. Nothing else
//! reads them, and no decision of the daemon depends on them.
//!
//! The file is two lines: the JSON of [`Inventory`], then `crc32c=` and the
//! CRC-32C of the first line in hex. It is replaced atomically (temporary
//! file, fsync, rename). A record that is too large, fails its checksum,
//! does not parse, or names another cluster or host is rejected with
//! [`InventoryError`], never used; one older than [`INVENTORY_MAX_AGE_S`]
//! is reported as stale by the reader.

use crate::engine::config::HostId;
use serde::{Deserialize, Serialize};
use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// The daemon rewrites its inventory this often.
pub const INVENTORY_INTERVAL_S: u64 = 60;
/// An inventory older than this (2.5 intervals) says nothing reliable: its
/// daemon has stopped, or cannot write.
pub const INVENTORY_MAX_AGE_S: u64 = 150;
/// A larger file is not an inventory.
pub const INVENTORY_MAX_BYTES: u64 = 256 * 1024;
/// Bridges or networks listed, at most, each.
pub const NAMES_MAX: usize = 4096;
/// The format this code writes and reads.
pub const FORMAT: u32 = 1;
/// The subdirectory of the datastore.
pub const DIR: &str = "inventory";

/// One host's networks, as its daemon last saw them.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Inventory {
    pub format: u32,
    pub cluster: String,
    pub host: String,
    pub host_id: u16,
    /// Wall-clock time of writing (ms since the Unix epoch).
    pub written_unix_ms: u64,
    /// Linux bridges, sorted.
    pub bridges: Vec<String>,
    /// Active libvirt networks, sorted; None: libvirt did not answer.
    pub networks: Option<Vec<String>>,
}

/// Why an inventory was not written or was rejected.
#[derive(Debug, thiserror::Error)]
pub enum InventoryError {
    #[error("{path}: {op} failed: {source}")]
    Io { op: &'static str, path: PathBuf, source: io::Error },
    #[error(
        "{path}: rejected: {reason}; the writing daemon rewrites it within {INVENTORY_INTERVAL_S} s (delete the file if it stays)"
    )]
    Rejected { path: PathBuf, reason: String },
}

/// `<datastore>/inventory/<id>.json`.
pub fn path(datastore: &Path, host: HostId) -> PathBuf {
    datastore.join(DIR).join(format!("{}.json", host.0))
}

/// Writes `inv` as host `host`'s inventory, atomically. Creates the
/// directory (0700) on first use: datastores made before it lack it.
pub fn write(datastore: &Path, host: HostId, inv: &Inventory) -> Result<(), InventoryError> {
    let path = path(datastore, host);
    let io = |op| {
        let path = path.clone();
        move |source| InventoryError::Io { op, path, source }
    };
    DirBuilder::new().recursive(true).mode(0o700).create(datastore.join(DIR)).map_err(io("create directory"))?;
    let text = encode(inv);
    let tmp = path.with_extension("json.tmp");
    let mut f =
        OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&tmp).map_err(io("create"))?;
    f.write_all(text.as_bytes()).map_err(io("write"))?;
    f.sync_all().map_err(io("fsync"))?;
    fs::rename(&tmp, &path).map_err(io("rename"))
}

/// Host `host`'s inventory: Ok(None) when none was ever written.
pub fn read(datastore: &Path, cluster: &str, host: HostId, name: &str) -> Result<Option<Inventory>, InventoryError> {
    let path = path(datastore, host);
    let f = match File::open(&path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        r => r.map_err(|source| InventoryError::Io { op: "open", path: path.clone(), source })?,
    };
    let mut text = String::new();
    f.take(INVENTORY_MAX_BYTES + 1).read_to_string(&mut text).map_err(|source| InventoryError::Io {
        op: "read",
        path: path.clone(),
        source,
    })?;
    decode(&text, cluster, host, name).map(Some).map_err(|reason| InventoryError::Rejected { path, reason })
}

pub fn encode(inv: &Inventory) -> String {
    // Serializing plain strings and numbers cannot fail.
    let json = serde_json::to_string(inv).unwrap_or_default();
    format!("{json}\ncrc32c={:08x}\n", crc32c::crc32c(json.as_bytes()))
}

/// Checks everything a reader relies on; the reason says what is wrong.
pub fn decode(text: &str, cluster: &str, host: HostId, name: &str) -> Result<Inventory, String> {
    if text.len() as u64 > INVENTORY_MAX_BYTES {
        return Err(format!("larger than {INVENTORY_MAX_BYTES} bytes"));
    }
    let (json, rest) = text.split_once('\n').ok_or("not two lines (torn or foreign file)")?;
    let sum = rest.strip_suffix('\n').unwrap_or(rest).strip_prefix("crc32c=").ok_or("no crc32c line")?;
    let sum = u32::from_str_radix(sum, 16).map_err(|_| format!("unreadable checksum {sum:?}"))?;
    if sum != crc32c::crc32c(json.as_bytes()) {
        return Err("checksum mismatch (corrupt file)".into());
    }
    let inv: Inventory = serde_json::from_str(json).map_err(|e| format!("not an inventory: {e}"))?;
    if inv.format != FORMAT {
        return Err(format!("format {} (this havirt reads {FORMAT})", inv.format));
    }
    if inv.cluster != cluster || inv.host != name || inv.host_id != host.0 {
        return Err(format!(
            "written for host {} (id {}) of cluster {:?}, not {name} (id {}) of {cluster:?}",
            inv.host, inv.host_id, inv.cluster, host.0
        ));
    }
    let lists = [Some(&inv.bridges), inv.networks.as_ref()];
    for list in lists.into_iter().flatten() {
        if list.len() > NAMES_MAX {
            return Err(format!("more than {NAMES_MAX} names"));
        }
        if let Some(bad) = list.iter().find(|n| n.is_empty() || n.len() > 255 || n.chars().any(char::is_control)) {
            return Err(format!("bad name {bad:?}"));
        }
    }
    Ok(inv)
}

/// The Linux bridges under `sys_class_net` (`/sys/class/net`): devices
/// with a `bridge` directory. Sorted.
pub fn local_bridges(sys_class_net: &Path) -> Result<Vec<String>, io::Error> {
    let mut out = Vec::new();
    for entry in fs::read_dir(sys_class_net)? {
        let entry = entry?;
        if entry.path().join("bridge").is_dir()
            && let Some(name) = entry.file_name().to_str()
        {
            out.push(name.to_owned());
        }
        if out.len() == NAMES_MAX {
            break;
        }
    }
    out.sort();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Inventory {
        Inventory {
            format: FORMAT,
            cluster: "lab".into(),
            host: "h2".into(),
            host_id: 2,
            written_unix_ms: 1_700_000_000_000,
            bridges: vec!["lan-h2".into(), "vmbr0".into()],
            networks: Some(vec!["default".into()]),
        }
    }

    #[test]
    fn round_trip() {
        let text = encode(&sample());
        assert_eq!(decode(&text, "lab", HostId(2), "h2"), Ok(sample()));
    }

    #[test]
    fn corrupt_or_foreign_records_are_rejected() {
        let text = encode(&sample());
        let flipped = text.replacen("lan-h2", "lan-h3", 1);
        assert!(decode(&flipped, "lab", HostId(2), "h2").is_err_and(|e| e.contains("checksum")));
        assert!(decode(&text[..text.len() / 2], "lab", HostId(2), "h2").is_err());
        assert!(decode("", "lab", HostId(2), "h2").is_err());
        assert!(decode(&text, "prod", HostId(2), "h2").is_err_and(|e| e.contains("cluster")));
        assert!(decode(&text, "lab", HostId(3), "h3").is_err_and(|e| e.contains("not h3")));
        let mut future = sample();
        future.format = 2;
        assert!(decode(&encode(&future), "lab", HostId(2), "h2").is_err_and(|e| e.contains("format 2")));
        let json = "{\"format\":1}";
        let partial = format!("{json}\ncrc32c={:08x}\n", crc32c::crc32c(json.as_bytes()));
        assert!(decode(&partial, "lab", HostId(2), "h2").is_err_and(|e| e.contains("not an inventory")));
    }

    #[test]
    fn write_then_read_through_the_datastore() {
        let dir = std::env::temp_dir().join(format!("havirt-inventory-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).expect("temp dir");
        assert!(matches!(read(&dir, "lab", HostId(2), "h2"), Ok(None)));
        write(&dir, HostId(2), &sample()).expect("write");
        assert_eq!(read(&dir, "lab", HostId(2), "h2").expect("read"), Some(sample()));
        fs::write(path(&dir, HostId(2)), "garbage").expect("overwrite");
        let err = read(&dir, "lab", HostId(2), "h2").expect_err("garbage is rejected").to_string();
        assert!(err.contains("inventory/2.json: rejected"), "{err}");
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn bridges_are_devices_with_a_bridge_directory() {
        let dir = std::env::temp_dir().join(format!("havirt-sysnet-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        for d in ["br0/bridge", "eth0", "lan-h1/bridge"] {
            fs::create_dir_all(dir.join(d)).expect("fake sysfs");
        }
        assert_eq!(local_bridges(&dir).expect("listed"), ["br0", "lan-h1"]);
        let _ = fs::remove_dir_all(&dir);
    }
}
