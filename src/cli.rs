//! The operator commands of `havirt` (`init`, `status`, `events`, `protect`,
//! `unprotect`, `fence confirm`): each turns its arguments into a control
//! request or a datastore change and prints the answer. Argument parsing
//! is clap's, in `main.rs`.

use crate::control::{self, PolicyChanges, Request, Response};
use crate::engine::config::{IsolationResponse, OnShutdown, Priority, Readiness};
use crate::hypervisor::metadata;
use crate::store::dir::DirStore;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::Path;
use std::time::Duration;

/// How long a command waits for the daemon (protect does libvirt calls and
/// a lease CAS on the datastore).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);
/// Bytes of a new cluster key.
pub const NEW_KEY_BYTES: usize = 64;
/// How often `maintenance enter` reads the drain's progress.
pub const MAINTENANCE_POLL: Duration = Duration::from_millis(500);
/// How often `events --follow` asks for new events.
pub const FOLLOW_INTERVAL: Duration = Duration::from_millis(500);
/// `status --watch` redraws this often unless `--interval` says otherwise.
pub const WATCH_INTERVAL: Duration = Duration::from_secs(1);
/// How long `status --watch` waits for one answer: a stuck daemon shows
/// as an error line that the next redraw replaces.
pub const WATCH_TIMEOUT: Duration = Duration::from_secs(5);
/// Home the cursor and clear the screen (VT100), before each redraw.
pub const CLEAR_SCREEN: &str = "\x1b[H\x1b[2J";
/// How long `havirt start` follows the daemon's events for the outcome.
pub const START_WAIT: Duration = Duration::from_secs(15);

/// What a command prints and how it exits.
pub type Outcome = Result<String, String>;

/// `havirt init`'s options for a block datastore.
#[derive(Clone, Copy, Debug)]
pub struct BlockInit {
    pub max_hosts: u16,
    pub max_domains: u32,
    pub registry_blocks: u32,
    pub force: bool,
}

/// `havirt init`: the datastore layout and a cluster key. Idempotent: an
/// existing datastore keeps its records, an existing key is checked and
/// kept. A block device or an existing regular file is formatted as a
/// block datastore; any other path is a dir datastore's directory.
pub fn init(cluster: &str, datastore: &Path, key_file: &Path, block: BlockInit) -> Outcome {
    let kind = init_datastore(cluster, datastore, block)?;
    let key_note = if key_file.exists() {
        crate::config::check_key_file(key_file).map_err(|e| e.to_string())?;
        format!("kept the existing cluster key {}", key_file.display())
    } else {
        write_new_key(key_file)?;
        format!("wrote a new cluster key {} (mode 0600)", key_file.display())
    };
    Ok(format!(
        "initialized datastore {} for cluster {cluster:?}\n{key_note}\n\nnext:\n  \
         1. copy {} to every host (same path, root-only)\n  \
         2. write /etc/havirt/havirt.toml on every host (cluster name {cluster:?}, datastore {kind} {})\n  \
         3. havirt check\n  \
         4. systemctl enable --now havirt",
        datastore.display(),
        key_file.display(),
        datastore.display()
    ))
}

/// Formats or creates the datastore; returns what the config says of it.
fn init_datastore(cluster: &str, datastore: &Path, b: BlockInit) -> Result<&'static str, String> {
    use crate::store::block::{BlockFormat, BlockStore};
    use std::os::unix::fs::FileTypeExt;
    let shown = datastore.display();
    let meta = std::fs::metadata(datastore);
    let is_block = meta.as_ref().is_ok_and(|m| m.file_type().is_block_device() || m.is_file());
    if !is_block && datastore.starts_with("/dev") {
        return Err(match meta {
            Err(e) => format!(
                "datastore {shown}: {e}: the LUN is not visible on this host; check the iSCSI/FC session and multipath, and name it by /dev/disk/by-id/..."
            ),
            Ok(_) => format!("datastore {shown} is not a block device; name the shared LUN (/dev/disk/by-id/...)"),
        });
    }
    if !is_block {
        DirStore::init(datastore, cluster).map_err(|e| format!("datastore {shown}: {e}"))?;
        return Ok("path");
    }
    let format = BlockFormat {
        max_hosts: b.max_hosts,
        max_domains: b.max_domains,
        registry_blocks: b.registry_blocks,
        ..BlockFormat::default()
    };
    let st = BlockStore::init(datastore, cluster, format, b.force).map_err(|e| format!("datastore {shown}: {e}"))?;
    let l = st.layout();
    eprintln!(
        "block datastore {shown}: {} host slots, {} domain leases, {}-byte ballot sectors, {} bytes (kind = \"block\")",
        l.max_hosts,
        l.max_domains,
        l.sector.bytes(),
        l.device_bytes()
    );
    Ok("(kind = \"block\") device")
}

fn write_new_key(path: &Path) -> Result<(), String> {
    use std::io::Read;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty() && !d.exists()) {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| format!("creating {}: {e}", dir.display()))?;
    }
    let mut key = [0u8; NEW_KEY_BYTES];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut key))
        .map_err(|e| format!("reading /dev/urandom: {e}"))?;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| format!("creating {}: {e}", path.display()))?;
    f.write_all(&key).and_then(|()| f.sync_all()).map_err(|e| format!("writing {}: {e}", path.display()))
}

fn ask(socket: &Path, req: &Request) -> Result<Response, String> {
    match control::request(socket, req, REQUEST_TIMEOUT).map_err(|e| e.to_string())? {
        Response::Error(e) => Err(e),
        r => Ok(r),
    }
}

pub fn status(socket: &Path, json: bool) -> Outcome {
    match ask(socket, &Request::Status)? {
        Response::Status(r) if json => Ok(control::status_json(&r)),
        Response::Status(r) => Ok(control::render_status(&r)),
        other => Err(unexpected(&other)),
    }
}

/// `havirt status --watch`: redraws the status every `interval` until
/// interrupted (Ctrl-C ends the process). A daemon that does not answer
/// shows its error with the time, and the watch goes on.
pub fn watch_status(socket: &Path, json: bool, interval: Duration) -> Outcome {
    loop {
        let body = match control::request(socket, &Request::Status, WATCH_TIMEOUT) {
            Ok(Response::Status(r)) if json => control::status_json(&r),
            Ok(Response::Status(r)) => control::render_status(&r),
            Ok(Response::Error(e)) => format!("error: {e}"),
            Ok(other) => unexpected(&other),
            Err(e) => format!("error: {e}"),
        };
        let stamp = control::rfc3339_ms(crate::daemon::unix_ms());
        let screen = format!("{CLEAR_SCREEN}havirt status, every {:.1}s   {stamp}\n\n{body}", interval.as_secs_f64());
        let mut out = std::io::stdout().lock();
        if out.write_all(screen.as_bytes()).and_then(|()| out.flush()).is_err() {
            // The terminal or pipe is gone: nobody watches any more.
            return Ok(String::new());
        }
        drop(out);
        std::thread::sleep(interval);
    }
}

/// `havirt events --failovers`: one timeline block per failover (`--json`: as data).
pub fn failovers(socket: &Path, json: bool) -> Outcome {
    match ask(socket, &Request::Failovers)? {
        Response::Failovers(list) if json => Ok(crate::failover::failovers_json(&list)),
        Response::Failovers(list) => Ok(crate::failover::render_failovers(&list).trim_end().to_string()),
        other => Err(unexpected(&other)),
    }
}

/// `havirt events --json`: every event the daemon keeps, as one JSON array.
pub fn events_json(socket: &Path) -> Outcome {
    match ask(socket, &Request::Events { after: 0 })? {
        Response::Events(list) => Ok(control::events_json(&list)),
        other => Err(unexpected(&other)),
    }
}

pub fn events(socket: &Path, follow: bool) -> Outcome {
    let mut after = 0;
    loop {
        match ask(socket, &Request::Events { after })? {
            Response::Events(list) => {
                if let Some(last) = list.last() {
                    after = last.seq;
                }
                if !follow {
                    return Ok(control::render_events(&list).trim_end().to_string());
                }
                let text = control::render_events(&list);
                let mut out = std::io::stdout().lock();
                let _ = out.write_all(text.as_bytes()).and_then(|()| out.flush());
            }
            other => return Err(unexpected(&other)),
        }
        std::thread::sleep(FOLLOW_INTERVAL);
    }
}

pub fn protect(socket: &Path, domain: &str, changes: PolicyChanges) -> Outcome {
    done(ask(socket, &Request::Protect { domain: domain.to_string(), changes })?)
}

/// `havirt start`: asks the daemon, then follows its events about the
/// domain until it runs here or the start is refused (at most START_WAIT).
pub fn start(socket: &Path, domain: &str) -> Outcome {
    let after = match ask(socket, &Request::Events { after: 0 })? {
        Response::Events(list) => list.last().map_or(0, |e| e.seq),
        other => return Err(unexpected(&other)),
    };
    let asked = done(ask(socket, &Request::Start { domain: domain.to_string() })?)?;
    let mut seen = Vec::new();
    let mut after = after;
    for _ in 0..START_WAIT.as_millis() / FOLLOW_INTERVAL.as_millis() {
        std::thread::sleep(FOLLOW_INTERVAL);
        let Response::Events(list) = ask(socket, &Request::Events { after })? else { continue };
        after = list.last().map_or(after, |e| e.seq);
        for e in list.into_iter().filter(|e| e.event.text.contains(domain)) {
            let text = e.event.text.clone();
            seen.push(text.clone());
            if text.contains("refused") || text.contains("failed") {
                return Err(seen.join("\n"));
            }
            if text == format!("{domain} running") {
                return Ok(seen.join("\n"));
            }
        }
    }
    seen.insert(0, asked);
    Ok(seen.join("\n"))
}

pub fn unprotect(socket: &Path, domain: &str) -> Outcome {
    done(ask(socket, &Request::Unprotect { domain: domain.to_string() })?)
}

/// `havirt maintenance enter|exit`. Entering waits (unless `wait` is None)
/// until no protected domain is left here but those that could not move,
/// printing each move as it happens.
pub fn maintenance(socket: &Path, host: Option<&str>, enter: bool, wait: Option<Duration>) -> Outcome {
    let first = status_report(socket)?;
    let host = host.map_or_else(|| first.host_name.clone(), str::to_string);
    let text = done(ask(socket, &Request::Maintenance { host: host.clone(), enter })?)?;
    let Some(limit) = wait.filter(|_| enter) else {
        return Ok(text);
    };
    println!("{text}");
    // Counted in polls: the clock is read by the daemon only.
    let mut polls_left = limit.as_millis() / MAINTENANCE_POLL.as_millis();
    let mut shown: std::collections::BTreeMap<String, String> = std::collections::BTreeMap::new();
    loop {
        let r = status_report(socket)?;
        let v = &r.view;
        let name_of = |d| v.domains.iter().find(|x| x.id == d).map_or_else(|| format!("{d:?}"), |x| x.name.clone());
        let host_name = |h| v.hosts.iter().find(|x| x.id == h).map_or_else(|| h.to_string(), |x| x.name.clone());
        let mut here = Vec::new();
        for d in &v.domains {
            let line = match (d.host, d.local.as_deref()) {
                (Some(h), Some(local)) if h == v.host => {
                    here.push(d.id);
                    format!("{local} on {}", host_name(h))
                }
                (Some(h), _) => format!("runs on {}", host_name(h)),
                (None, _) => "nowhere".to_string(),
            };
            if shown.get(&d.name) != Some(&line) {
                if shown.contains_key(&d.name) || d.host == Some(v.host) {
                    println!("  {}: {line}", d.name);
                }
                shown.insert(d.name.clone(), line);
            }
        }
        let stuck: Vec<_> = v.migration_failures.iter().filter(|(d, _)| here.contains(d)).collect();
        if here.len() == stuck.len() {
            if stuck.is_empty() {
                return Ok(format!("{host} is drained: no protected domain runs here"));
            }
            let lines: Vec<String> = stuck.iter().map(|(d, why)| format!("  {}: {why}", name_of(*d))).collect();
            return Err(format!(
                "{} domain(s) could not move and keep running on {host}:\n{}\n(run `havirt maintenance enter` again to retry)",
                stuck.len(),
                lines.join("\n")
            ));
        }
        if polls_left == 0 {
            return Err(format!(
                "{} domain(s) still on {host} after {} s; the drain goes on (havirt status)",
                here.len() - stuck.len(),
                limit.as_secs()
            ));
        }
        polls_left -= 1;
        std::thread::sleep(MAINTENANCE_POLL);
    }
}

fn status_report(socket: &Path) -> Result<Box<control::StatusReport>, String> {
    match ask(socket, &Request::Status)? {
        Response::Status(r) => Ok(r),
        other => Err(unexpected(&other)),
    }
}

pub fn fence_confirm(socket: &Path, host: &str) -> Outcome {
    done(ask(socket, &Request::FenceConfirm { host: host.to_string() })?)
}

fn done(r: Response) -> Outcome {
    match r {
        Response::Done(text) => Ok(text),
        other => Err(unexpected(&other)),
    }
}

fn unexpected(r: &Response) -> String {
    format!("unexpected answer from the daemon: {r:?}")
}

// ---------------------------------------------------------------- values

// The words are the policy element's (one vocabulary for the XML and the CLI).

pub fn parse_priority(s: &str) -> Result<Priority, String> {
    metadata::parse_priority(s).ok_or_else(|| format!("{s:?}: use {}", metadata::PRIORITIES))
}

pub fn parse_isolation_response(s: &str) -> Result<IsolationResponse, String> {
    metadata::parse_isolation(s).ok_or_else(|| format!("{s:?}: use {}", metadata::ISOLATION_RESPONSES))
}

pub fn parse_on_shutdown(s: &str) -> Result<OnShutdown, String> {
    metadata::parse_on_shutdown(s).ok_or_else(|| format!("{s:?}: use {}", metadata::ON_SHUTDOWN_VALUES))
}

pub fn parse_switch(s: &str) -> Result<bool, String> {
    metadata::parse_switch(s).ok_or_else(|| format!("{s:?}: use {}", metadata::SWITCH_VALUES))
}

pub fn parse_readiness(s: &str) -> Result<Readiness, String> {
    metadata::parse_readiness(s).ok_or_else(|| format!("{s:?}: use {}", metadata::READINESS_VALUES))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_parse_and_refuse_with_the_choices() {
        assert_eq!(parse_priority("high"), Ok(Priority::High));
        assert!(parse_priority("hi").unwrap_err().contains("highest"));
        assert_eq!(parse_isolation_response("poweroff"), Ok(IsolationResponse::Poweroff));
        assert_eq!(parse_readiness("tcp:22"), Ok(Readiness::TcpPort(22)));
        assert!(parse_readiness("tcp:0").is_err());
        assert!(parse_readiness("tcp:x").unwrap_err().contains("tcp:PORT"));
    }
}
