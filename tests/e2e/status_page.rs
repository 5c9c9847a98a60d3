//! The status page and its JSON API on a live lab, in a real browser:
//! Debian's headless chromium, run inside a surviving host's namespaces
//! (the page is on that host's loopback, the default metrics_address, as
//! tests/e2e/metrics.rs scrapes it with curl). Each look at the page is one
//! chromium run that loads it and lets its script poll the API for a few
//! seconds of virtual time (`--virtual-time-budget`), then prints the DOM
//! (`--dump-dom`) or a screenshot; the test asserts on the DOM's ids and
//! data-* attributes (see src/daemon/status_page.html). Before a fenced
//! power loss the victim is alive and runs its domains; after it, the page
//! must show it fenced, its domains on survivors and the failover closed.
//! Screenshots: target/e2e/status-page-{before,after}.png.

use crate::harness::{E2e, HOSTS, fenced_bound, poll_until};
use havirt::lab::cluster::Fault;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

const CHROMIUM: &str = "/usr/bin/chromium";
/// The default metrics_address, inside each lab host.
const PAGE_URL: &str = "http://127.0.0.1:9405/";
const API_URL: &str = "http://127.0.0.1:9405/api/v1";
/// Virtual time the page's script runs before the DOM is taken: the page
/// polls every second, so it has polled several times.
const BUDGET_MS: u32 = 3500;
/// Polls the page must have made within BUDGET_MS: it updates itself.
const POLLS_MIN: u64 = 2;
/// Bounds one chromium run (it takes about a second; the lab loads the machine).
const CHROMIUM_TIMEOUT_S: u32 = 60;
/// After the domains run again, the viewer's status shows the host fenced
/// and the failover closed within this (tests/e2e/failover.rs: 10 s), plus
/// two chromium runs.
const SHOWS_WAIT: Duration = Duration::from_secs(30);

/// Where the screenshots and chromium's profile go: target/e2e/.
fn out_dir() -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).parent().expect("target/tmp is in target/").join("e2e");
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    dir
}

/// chromium's arguments for one headless run inside a lab host (as root:
/// no sandbox; its own profile, never the machine's).
fn chromium(what: &[String]) -> Vec<String> {
    let profile = out_dir().join("chromium-profile");
    let mut args: Vec<String> =
        ["timeout", &CHROMIUM_TIMEOUT_S.to_string(), CHROMIUM, "--headless", "--no-sandbox"].map(String::from).to_vec();
    args.extend(["--disable-gpu", "--no-first-run", "--disable-extensions", "--hide-scrollbars"].map(String::from));
    args.push(format!("--user-data-dir={}", profile.display()));
    args.push(format!("--virtual-time-budget={BUDGET_MS}"));
    args.extend_from_slice(what);
    args.push(PAGE_URL.to_string());
    args
}

fn run_in(t: &E2e, host: u16, args: &[String]) -> Result<String, String> {
    let h = t.lab().host(host).map_err(|e| e.to_string())?;
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = h.exec(&argv).map_err(|e| e.to_string())?;
    if !out.status.success() {
        return Err(format!("{argv:?} on h{host}: {}\n{}", out.status, String::from_utf8_lossy(&out.stderr)));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The page's DOM after BUDGET_MS of its script, as host `viewer` serves it.
fn dom(t: &E2e, viewer: u16) -> Result<Dom, String> {
    run_in(t, viewer, &chromium(&["--dump-dom".into()])).map(|html| Dom { html })
}

fn screenshot(t: &E2e, viewer: u16, name: &str) {
    let path = out_dir().join(name);
    let _ = std::fs::remove_file(&path);
    let args = chromium(&[format!("--screenshot={}", path.display()), "--window-size=1100,900".into()]);
    run_in(t, viewer, &args).unwrap_or_else(|e| panic!("screenshot: {e}"));
    let size = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
    assert!(size > 1000, "no screenshot at {} ({size} bytes)", path.display());
    println!("STATUS-PAGE screenshot {} ({size} bytes)", path.display());
}

/// A dumped DOM, read through its open tags' attributes.
struct Dom {
    html: String,
}

type Attrs = BTreeMap<String, String>;

impl Dom {
    /// The attributes of every `<tag ...>` that has attribute `key`.
    fn tags(&self, tag: &str, key: &str) -> Vec<Attrs> {
        let open = format!("<{tag} ");
        let mut out = Vec::new();
        for piece in self.html.split(&open).skip(1) {
            let Some(end) = piece.find('>') else { continue };
            let attrs = attributes(&piece[..end]);
            if attrs.contains_key(key) {
                out.push(attrs);
            }
        }
        out
    }

    /// The row of `data-KIND="name"` in #hosts or #domains.
    fn row(&self, kind: &str, name: &str) -> Option<Attrs> {
        let key = format!("data-{kind}");
        self.tags("tr", &key).into_iter().find(|a| a.get(&key).map(String::as_str) == Some(name))
    }

    fn attr(&self, tag: &str, key: &str) -> Option<String> {
        self.tags(tag, key).first().and_then(|a| a.get(key).cloned())
    }

    fn polls(&self) -> u64 {
        self.attr("body", "data-polls").and_then(|p| p.parse().ok()).unwrap_or(0)
    }

    fn connected(&self) -> bool {
        self.attr("span", "data-state").as_deref() == Some("ok") && self.polls() >= POLLS_MIN
    }
}

/// `a="1" b="x y"` as chromium serializes attributes (values quoted, `"` escaped).
fn attributes(text: &str) -> Attrs {
    let mut out = Attrs::new();
    let mut rest = text.trim();
    while let Some(eq) = rest.find("=\"") {
        let name = rest[..eq].trim().to_string();
        let after = &rest[eq + 2..];
        let Some(close) = after.find('"') else { break };
        out.insert(name, after[..close].replace("&amp;", "&"));
        rest = after[close + 1..].trim_start();
    }
    out
}

fn running(state: Option<&String>) -> bool {
    matches!(state.map(String::as_str), Some("running" | "ready"))
}

/// What must hold before the fault: all hosts alive (the viewer "self"),
/// the master marked, each of the victim's domains running on it.
fn before_problems(d: &Dom, viewer: u16, master: u16, victim: u16, stopped: &[String]) -> Vec<String> {
    let mut problems = Vec::new();
    if !d.connected() {
        problems.push(format!("page not updating (polls {}, conn {:?})", d.polls(), d.attr("span", "data-state")));
    }
    for n in 1..=HOSTS {
        let want = if n == viewer { "self" } else { "alive" };
        let row = d.row("host", &format!("h{n}"));
        let verdict = row.as_ref().and_then(|r| r.get("data-verdict").cloned());
        if verdict.as_deref() != Some(want) {
            problems.push(format!("h{n}: verdict {verdict:?}, want {want}"));
        }
        let is_master = row.as_ref().and_then(|r| r.get("data-master").cloned());
        if is_master.as_deref() != Some(if n == master { "true" } else { "false" }) {
            problems.push(format!("h{n}: data-master {is_master:?} (master is h{master})"));
        }
    }
    for dom in stopped {
        let row = d.row("domain", dom);
        let host = row.as_ref().and_then(|r| r.get("data-host").cloned());
        if host != Some(format!("h{victim}")) || !running(row.as_ref().and_then(|r| r.get("data-state"))) {
            problems.push(format!("{dom}: {row:?}, want running on h{victim}"));
        }
    }
    problems
}

/// What must hold after: the victim fenced, its domains running on the
/// survivors (where the lab runs them), one closed failover of the victim.
fn after_problems(t: &E2e, d: &Dom, victim: u16, stopped: &[String]) -> Vec<String> {
    let mut problems = Vec::new();
    if !d.connected() {
        problems.push(format!("page not updating (polls {})", d.polls()));
    }
    let verdict = d.row("host", &format!("h{victim}")).and_then(|r| r.get("data-verdict").cloned());
    if verdict.as_deref() != Some("fenced") {
        problems.push(format!("h{victim}: verdict {verdict:?}, want fenced"));
    }
    let placement = t.lab().placement();
    for dom in stopped {
        let row = d.row("domain", dom);
        let shown = row.as_ref().and_then(|r| r.get("data-host").cloned()).unwrap_or_default();
        let runs_on: Vec<String> = placement.get(dom).into_iter().flatten().map(|h| format!("h{h}")).collect();
        let ok = shown != format!("h{victim}")
            && runs_on == [shown.clone()]
            && running(row.as_ref().and_then(|r| r.get("data-state")));
        if !ok {
            problems.push(format!("{dom}: {row:?}, the lab runs it on {runs_on:?}"));
        }
    }
    let failovers = d.tags("div", "data-failover");
    let of_victim: Vec<&Attrs> =
        failovers.iter().filter(|f| f.get("data-host") == Some(&format!("h{victim}"))).collect();
    if of_victim.len() != 1 || of_victim[0].get("data-closed").map(String::as_str) != Some("true") {
        problems.push(format!("failovers shown: {failovers:?}, want one closed of h{victim}"));
    }
    for dom in stopped {
        let moved = d.tags("div", "data-failover-domain");
        if !moved.iter().any(|m| m.get("data-failover-domain") == Some(dom)) {
            problems.push(format!("{dom} not in the failover timeline"));
        }
    }
    problems
}

/// Waits (bounded) until `problems` is empty; panics with the last DOM seen.
fn wait_for_page(t: &E2e, viewer: u16, what: &str, wait: Duration, problems: impl Fn(&Dom) -> Vec<String>) -> Dom {
    let mut last = (String::from("no chromium run yet"), Vec::new());
    let shown = poll_until(wait, || match dom(t, viewer) {
        Err(e) => {
            last = (e, Vec::new());
            None
        }
        Ok(d) => {
            let p = problems(&d);
            if p.is_empty() {
                return Some(d);
            }
            last = (d.html, p);
            None
        }
    });
    shown.unwrap_or_else(|| panic!("{what}: not shown within {wait:?}: {:?}\nlast DOM:\n{}", last.1, last.0))
}

/// The API answers as `havirt status --json` does, and only to GET on its paths.
fn assert_api(t: &E2e, viewer: u16) {
    let curl = |args: &[&str]| -> String {
        let mut argv = vec!["curl", "-sS", "--max-time", "5"];
        argv.extend_from_slice(args);
        let argv: Vec<String> = argv.into_iter().map(String::from).collect();
        run_in(t, viewer, &argv).unwrap_or_else(|e| panic!("{e}"))
    };
    let api: serde_json::Value =
        serde_json::from_str(&curl(&[&format!("{API_URL}/status")])).unwrap_or_else(|e| panic!("status: {e}"));
    let cli = t.lab().havirt_on(viewer, &["status", "--json"]).unwrap_or_else(|e| panic!("{e}"));
    let cli: serde_json::Value = serde_json::from_str(&cli).unwrap_or_else(|e| panic!("status --json: {e}"));
    let shape = |v: &serde_json::Value| {
        let hosts: Vec<_> =
            v["hosts"].as_array().into_iter().flatten().map(|h| (h["name"].clone(), h["verdict"].clone())).collect();
        let domains: Vec<_> =
            v["domains"].as_array().into_iter().flatten().map(|d| (d["name"].clone(), d["host"].clone())).collect();
        (v["cluster"].clone(), v["host"].clone(), v["master"].clone(), hosts, domains)
    };
    assert_eq!(shape(&api), shape(&cli), "h{viewer}: /api/v1/status and havirt status --json differ");
    let events: serde_json::Value = serde_json::from_str(&curl(&[&format!("{API_URL}/events")])).expect("events");
    assert!(
        events
            .as_array()
            .is_some_and(|e| e.iter().any(|e| e["text"].as_str().is_some_and(|x| x.starts_with("daemon started")))),
        "h{viewer}: /api/v1/events: {events}"
    );
    let code = |args: &[&str]| curl(&[&["-o", "/dev/null", "-w", "%{http_code}"], args].concat());
    assert_eq!(code(&["-X", "POST", &format!("{API_URL}/status")]), "405", "POST");
    assert_eq!(code(&[&format!("{API_URL}/maintenance")]), "404", "unknown path");
}

fn status_page_shows_a_power_loss() {
    if !Path::new(CHROMIUM).exists() {
        let why = format!("no {CHROMIUM} (Debian: chromium; .ci/setup installs it)");
        assert!(std::env::var_os("CI").is_none(), "under CI: {why}");
        println!("SKIPPED status_page: {why}");
        crate::harness::SKIPPED.with(|s| *s.borrow_mut() = Some(why));
        return;
    }
    let Some(mut t) = E2e::up("status_page", |_| {}) else { return };
    let master = t.master();
    let victim = t.busiest_non_master();
    // The master survives: its view is the cluster's.
    let viewer = master;
    let stopped = t.domains_on(victim);
    println!("status_page: h{viewer}'s page, h{victim} to lose power, its domains {stopped:?}");
    assert_api(&t, viewer);

    let before = wait_for_page(&t, viewer, "before the power loss", Duration::from_secs(20), |d| {
        before_problems(d, viewer, master, victim, &stopped)
    });
    println!("STATUS-PAGE before: {} polls in {BUDGET_MS} ms of virtual time", before.polls());
    screenshot(&t, viewer, "status-page-before.png");

    let t0 = t.fault(&Fault::PowerOff(victim));
    let wait = fenced_bound() + SHOWS_WAIT;
    wait_for_page(&t, viewer, "after the power loss", wait, |d| after_problems(&t, d, victim, &stopped));
    println!("STATUS-PAGE after: shown {:.1} s after the power-off", t0.elapsed().as_secs_f64());
    t.assert_recovered(&stopped, t0, Duration::ZERO, fenced_bound(), |h| h != victim);
    screenshot(&t, viewer, "status-page-after.png");
    t.finish();
}

/// This file's tests, for the harness (main.rs); `true`: ignored unless asked for.
pub fn tests() -> Vec<(&'static str, fn(), bool)> {
    vec![("status_page_shows_a_power_loss", status_page_shows_a_power_loss, false)]
}
