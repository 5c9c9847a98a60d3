//! A rule as a test: `src/engine` stays pure (no I/O, no clock, no tokio,
//! no libvirt, no unseeded randomness, no hash-order iteration), so that the
//! simulator and the daemon run exactly the same decisions.

use std::path::Path;

/// Each forbidden text, with the reason it is forbidden.
const FORBIDDEN: &[(&str, &str)] = &[
    ("std::fs", "file I/O belongs to src/store"),
    ("std::net", "sockets belong to src/net"),
    ("std::io", "I/O belongs to the adapters"),
    ("std::process", "processes belong to the adapters"),
    ("std::thread", "the engine is single-threaded and driven"),
    ("std::env", "configuration is passed in"),
    ("std::time", "time is an argument (engine::time::Instant)"),
    ("Instant::now", "time is an argument"),
    ("SystemTime", "time is an argument"),
    ("tokio", "the runtime belongs to src/daemon.rs"),
    ("virt::", "libvirt belongs to src/hypervisor"),
    ("rand::", "randomness comes from a seed (engine::time::Rng)"),
    ("thread_rng", "randomness comes from a seed"),
    ("HashMap", "iteration order must be fixed (BTreeMap)"),
    ("HashSet", "iteration order must be fixed (BTreeSet)"),
];

#[test]
fn engine_has_no_io_clock_or_unseeded_randomness() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/engine");
    let mut files = 0;
    let mut found = Vec::new();
    for entry in std::fs::read_dir(&dir).expect("src/engine exists") {
        let path = entry.expect("readable dir entry").path();
        if path.extension().is_none_or(|e| e != "rs") {
            continue;
        }
        files += 1;
        let text = std::fs::read_to_string(&path).expect("readable source");
        for (n, line) in text.lines().enumerate() {
            let code = line.split("//").next().unwrap_or("");
            for (what, why) in FORBIDDEN {
                if code.contains(what) {
                    found.push(format!("{}:{}: `{what}`: {why}", path.display(), n + 1));
                }
            }
        }
    }
    assert!(files >= 5, "expected the engine sources in {}", dir.display());
    assert!(found.is_empty(), "src/engine must stay pure:\n{}", found.join("\n"));
}

#[test]
fn the_purity_scan_sees_a_violation() {
    // The scan above must be able to fail: a line like this one would.
    let line = "let t = std::time::Instant::now();";
    assert!(FORBIDDEN.iter().any(|(what, _)| line.contains(what)));
}
