//! Sending alerts to the `[[alert]]` receivers, off the daemon's loop.
//!
//! Each receiver (a [`Sink`]) has a bounded queue ([`QUEUE_MAX`]) and a
//! thread of its own. [`Dispatcher::send`] only puts the alert in every
//! queue (`try_send`): it never waits, so a receiver that is slow, hangs or
//! is down never slows the engine or the daemon's loop. A full queue drops
//! the alert for that receiver, and says so (log and `report`, which the
//! daemon counts in `havirt_alerts_total{result="dropped"}`).
//!
//! The thread sends one alert at a time, in order, each in at most
//! `attempts` tries, every try bounded by `timeout`, with a doubling pause
//! between tries (`backoff`, at most [`BACKOFF_MAX`]). A try that the
//! receiver answers with a refusal (an HTTP 4xx other than 408 and 429, a
//! program that cannot be run) is not repeated. Every retry carries the
//! same body, so the same `id`.
//!
//! - Webhook: `POST url` with the alert as JSON, `Content-Type:
//!   application/json`, [`SIGNATURE_HEADER`] = `sha256=` + hex
//!   HMAC-SHA256 of the body under the sink's key, and [`ID_HEADER`].
//!   2xx is delivered; 408, 429, 5xx and transport errors are retried.
//! - Command: the program runs with the alert as JSON (one line) on its
//!   stdin, in a process group of its own that is killed at the timeout
//!   (`fence::process`). Exit 0 is delivered; a non-zero exit is logged
//!   with the end of its stderr and retried.

use super::Alert;
use crate::fence::process::{AgentEnv, Deadline, Run, status_text};
use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;
use std::sync::Arc;
use std::sync::mpsc::{Receiver, SyncSender, TrySendError, sync_channel};
use std::time::Duration;
use tracing::{info, warn};

/// Alerts waiting per receiver; more are dropped (and counted).
pub const QUEUE_MAX: usize = 64;
/// The longest pause between two tries.
pub const BACKOFF_MAX: Duration = Duration::from_secs(60);
/// `sha256=` + hex HMAC-SHA256 of the body.
pub const SIGNATURE_HEADER: &str = "X-Havirt-Signature";
pub const ID_HEADER: &str = "X-Havirt-Alert-Id";
pub const KIND_HEADER: &str = "X-Havirt-Alert-Kind";

/// Where one receiver is.
#[derive(Clone)]
pub enum Target {
    /// `key` signs the body (the `secret_file`, else the cluster key).
    Webhook { url: String, key: Vec<u8> },
    /// argv; the first is the program (a bare name is looked up in PATH).
    Command { argv: Vec<String> },
}

impl std::fmt::Debug for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Target::Webhook { url, .. } => write!(f, "webhook {}", url_origin(url)),
            Target::Command { argv } => write!(f, "command {argv:?}"),
        }
    }
}

/// `scheme://host:port` of a URL, for logs: its path and query may hold
/// a token (chat webhooks put theirs there).
pub fn url_origin(url: &str) -> String {
    match url.parse::<ureq::http::Uri>() {
        Ok(u) => {
            let port = u.port_u16().map(|p| format!(":{p}")).unwrap_or_default();
            format!("{}://{}{port}/...", u.scheme_str().unwrap_or("?"), u.host().unwrap_or("?"))
        }
        Err(_) => "(unparsable URL)".into(),
    }
}

/// How hard one receiver is tried.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Policy {
    /// Tries per alert, the first included (at least 1).
    pub attempts: u32,
    /// One try: connect, send and answer (webhook), or the program's run.
    pub timeout: Duration,
    /// The pause after the first failed try; doubles after each.
    pub backoff: Duration,
}

impl Policy {
    /// The pause after failed try number `attempt` (1-based).
    pub fn backoff_after(&self, attempt: u32) -> Duration {
        let factor = 1u32 << attempt.saturating_sub(1).min(16);
        self.backoff.saturating_mul(factor).min(BACKOFF_MAX)
    }
}

/// One `[[alert]]` receiver, ready to send to.
#[derive(Clone, Debug)]
pub struct Sink {
    /// For logs and the `sink` label.
    pub name: String,
    pub target: Target,
    pub policy: Policy,
}

/// What happened to one alert at one receiver.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Sent,
    /// One try failed and another follows.
    Retried,
    /// Every try failed, or the receiver refused it.
    Failed,
    /// The queue was full: never tried.
    Dropped,
}

impl Outcome {
    /// The `result` label of `havirt_alerts_total`.
    pub fn name(self) -> &'static str {
        match self {
            Outcome::Sent => "sent",
            Outcome::Retried => "retried",
            Outcome::Failed => "failed",
            Outcome::Dropped => "dropped",
        }
    }
}

/// Told of every outcome: (sink name, alert id, outcome). Called on the
/// sinks' threads and from `send`.
pub type Report = Arc<dyn Fn(&str, &str, Outcome) + Send + Sync>;

/// The result of one try.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Try {
    Delivered,
    /// Worth another try (a timeout, a 5xx, a program that failed).
    Again(String),
    /// Another try would get the same answer.
    Refused(String),
}

/// `sha256=` + the hex HMAC-SHA256 of `body` under `key`.
pub fn signature(key: &[u8], body: &[u8]) -> String {
    let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(key).expect("HMAC accepts keys of any length");
    mac.update(body);
    let tag = mac.finalize().into_bytes();
    let mut out = String::from("sha256=");
    for b in tag {
        out.push_str(&format!("{b:02x}"));
    }
    out
}

/// Whether `header` is the signature of `body` under `key`, compared in
/// constant time (what a receiver does).
pub fn verify(key: &[u8], body: &[u8], header: &str) -> bool {
    let Some(hex) = header.strip_prefix("sha256=") else { return false };
    if hex.len() != 64 || !hex.is_ascii() {
        return false;
    }
    let tag: Option<Vec<u8>> = (0..32).map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).ok()).collect();
    let Some(tag) = tag else { return false };
    let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(key).expect("HMAC accepts keys of any length");
    mac.update(body);
    mac.verify_slice(&tag).is_ok()
}

/// The body every receiver gets: the alert as one line of JSON.
pub fn body(alert: &Alert) -> Vec<u8> {
    // An Alert has only strings, numbers and options: it always serializes.
    let mut b = serde_json::to_vec(alert).unwrap_or_default();
    b.push(b'\n');
    b
}

/// Hands alerts to the receivers' threads; cheap to call from the loop.
pub struct Dispatcher {
    queues: Vec<(String, SyncSender<Arc<Alert>>)>,
    report: Report,
}

impl Dispatcher {
    /// Starts one thread per sink. A thread that cannot be started costs
    /// that receiver (logged), not the daemon.
    pub fn start(sinks: Vec<Sink>, report: Report) -> Dispatcher {
        let mut queues = Vec::with_capacity(sinks.len());
        for sink in sinks {
            let (tx, rx) = sync_channel(QUEUE_MAX);
            let name = sink.name.clone();
            let r = Arc::clone(&report);
            let spawned = std::thread::Builder::new().name(format!("alert-{name}")).spawn(move || run(&sink, &rx, &r));
            match spawned {
                Ok(_) => queues.push((name, tx)),
                Err(e) => warn!("alert receiver {name}: cannot start its thread ({e}); it gets no alerts"),
            }
        }
        Dispatcher { queues, report }
    }

    /// No receiver configured.
    pub fn is_empty(&self) -> bool {
        self.queues.is_empty()
    }

    /// Queues `alert` for every receiver; never blocks.
    pub fn send(&self, alert: &Alert) {
        if self.queues.is_empty() {
            return;
        }
        let shared = Arc::new(alert.clone());
        for (name, tx) in &self.queues {
            match tx.try_send(Arc::clone(&shared)) {
                Ok(()) => {}
                Err(TrySendError::Full(_)) => {
                    warn!(
                        "alert {} ({}) dropped for receiver {name}: {QUEUE_MAX} alerts already wait for it \
                         (it is slow, hangs or is down)",
                        alert.id,
                        alert.kind.name()
                    );
                    (self.report)(name, &alert.id, Outcome::Dropped);
                }
                Err(TrySendError::Disconnected(_)) => {
                    warn!("alert {} dropped for receiver {name}: its thread is gone", alert.id);
                    (self.report)(name, &alert.id, Outcome::Dropped);
                }
            }
        }
    }
}

/// A sink's thread: one alert at a time until the dispatcher is dropped.
fn run(sink: &Sink, rx: &Receiver<Arc<Alert>>, report: &Report) {
    let client = Client::new(sink);
    while let Ok(alert) = rx.recv() {
        deliver(sink, &client, &alert, report);
    }
}

/// Sends one alert with retries; returns the tries made and the outcome.
pub fn deliver(sink: &Sink, client: &Client, alert: &Alert, report: &Report) -> (u32, Outcome) {
    let body = body(alert);
    let attempts = sink.policy.attempts.max(1);
    for attempt in 1..=attempts {
        let why = match client.try_once(sink, alert, &body) {
            Try::Delivered => {
                info!("alert {} ({}) sent to {} (try {attempt})", alert.id, alert.kind.name(), sink.name);
                report(&sink.name, &alert.id, Outcome::Sent);
                return (attempt, Outcome::Sent);
            }
            Try::Refused(why) => {
                warn!("alert {} ({}) refused by {}: {why}; not retried", alert.id, alert.kind.name(), sink.name);
                report(&sink.name, &alert.id, Outcome::Failed);
                return (attempt, Outcome::Failed);
            }
            Try::Again(why) => why,
        };
        if attempt == attempts {
            warn!(
                "alert {} ({}) not delivered to {}: {why}; gave up after {attempts} tries",
                alert.id,
                alert.kind.name(),
                sink.name
            );
            break;
        }
        let pause = sink.policy.backoff_after(attempt);
        warn!(
            "alert {} ({}) to {}: try {attempt} of {attempts} failed: {why}; retrying in {} ms",
            alert.id,
            alert.kind.name(),
            sink.name,
            pause.as_millis()
        );
        report(&sink.name, &alert.id, Outcome::Retried);
        std::thread::sleep(pause);
    }
    report(&sink.name, &alert.id, Outcome::Failed);
    (attempts, Outcome::Failed)
}

/// What a sink sends with: an HTTP agent for a webhook.
pub struct Client {
    http: Option<ureq::Agent>,
}

impl Client {
    pub fn new(sink: &Sink) -> Client {
        let http = matches!(sink.target, Target::Webhook { .. }).then(|| {
            ureq::Agent::config_builder()
                .timeout_global(Some(sink.policy.timeout))
                // A status is an answer to judge, not an error.
                .http_status_as_error(false)
                // A webhook that moved is a configuration to fix, not to follow.
                .max_redirects(0)
                .user_agent(format!("havirt/{}", env!("CARGO_PKG_VERSION")))
                .build()
                .into()
        });
        Client { http }
    }

    fn try_once(&self, sink: &Sink, alert: &Alert, body: &[u8]) -> Try {
        match &sink.target {
            Target::Webhook { url, key } => match &self.http {
                Some(http) => post(http, url, key, alert, body),
                None => Try::Refused("no HTTP client".into()),
            },
            Target::Command { argv } => command(sink, argv, body),
        }
    }
}

fn post(http: &ureq::Agent, url: &str, key: &[u8], alert: &Alert, body: &[u8]) -> Try {
    let sent = http
        .post(url)
        .header("Content-Type", "application/json")
        .header(SIGNATURE_HEADER, signature(key, body))
        .header(ID_HEADER, alert.id.as_str())
        .header(KIND_HEADER, alert.kind.name())
        .send(body);
    match sent {
        Ok(resp) => judge_status(resp.status().as_u16()),
        Err(e) => Try::Again(e.to_string()),
    }
}

/// 2xx delivered; 408, 429 and 5xx worth another try; the rest refused.
pub fn judge_status(code: u16) -> Try {
    match code {
        200..=299 => Try::Delivered,
        408 | 429 | 500..=599 => Try::Again(format!("HTTP {code}")),
        _ => Try::Refused(format!("HTTP {code}")),
    }
}

fn command(sink: &Sink, argv: &[String], body: &[u8]) -> Try {
    let Some((program, args)) = argv.split_first() else {
        return Try::Refused("empty command".into());
    };
    let run = Run {
        agent: &sink.name,
        step: "alert",
        program,
        args: args.iter().map(Into::into).collect(),
        stdin: Some(body.to_vec()),
        secret: None,
    };
    use crate::fence::FenceError;
    match run.execute(&AgentEnv::default(), &Deadline::after(sink.policy.timeout)) {
        Ok(out) if out.status.success() => Try::Delivered,
        Ok(out) => Try::Again(format!("{program} failed ({}): {}", status_text(out.status), out.quote())),
        Err(FenceError::Spawn { reason, .. }) => Try::Refused(format!("cannot run {program}: {reason}")),
        Err(FenceError::Timeout { .. }) => {
            Try::Again(format!("{program} did not finish within {} ms and was killed", sink.policy.timeout.as_millis()))
        }
        Err(e) => Try::Again(e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::alerts::AlertKind;
    use std::sync::Mutex;

    fn alert(id: &str) -> Alert {
        Alert {
            format: crate::alerts::FORMAT,
            id: id.into(),
            kind: AlertKind::HostFenced,
            cluster: "prod".into(),
            host: "h2".into(),
            domain: None,
            sender: "h1".into(),
            unix_ms: 1,
            text: "h2 is fenced".into(),
            failover: None,
            timeline: None,
        }
    }

    fn policy(attempts: u32, timeout_ms: u64) -> Policy {
        Policy { attempts, timeout: Duration::from_millis(timeout_ms), backoff: Duration::from_millis(5) }
    }

    fn command(argv: &[&str], p: Policy) -> Sink {
        Sink {
            name: "cmd".into(),
            target: Target::Command { argv: argv.iter().map(|s| s.to_string()).collect() },
            policy: p,
        }
    }

    #[allow(clippy::disallowed_methods, reason = "tests time real child processes in wall time")]
    fn now() -> std::time::Instant {
        std::time::Instant::now()
    }

    type Seen = Arc<Mutex<Vec<(String, String, Outcome)>>>;

    fn recorder() -> (Report, Seen) {
        let seen: Seen = Arc::default();
        let s = Arc::clone(&seen);
        let report: Report = Arc::new(move |sink: &str, id: &str, o| {
            s.lock().expect("lock").push((sink.to_string(), id.to_string(), o));
        });
        (report, seen)
    }

    #[test]
    fn backoff_doubles_up_to_its_bound() {
        let p = Policy { attempts: 5, timeout: Duration::from_secs(5), backoff: Duration::from_secs(1) };
        let pauses: Vec<u64> = (1..=8).map(|a| p.backoff_after(a).as_secs()).collect();
        assert_eq!(pauses, [1, 2, 4, 8, 16, 32, 60, 60]);
        assert_eq!(p.backoff_after(u32::MAX), BACKOFF_MAX, "no overflow");
    }

    #[test]
    fn statuses_are_judged_as_a_receiver_means_them() {
        assert_eq!(judge_status(200), Try::Delivered);
        assert_eq!(judge_status(204), Try::Delivered);
        for code in [408, 429, 500, 502, 503] {
            assert_eq!(judge_status(code), Try::Again(format!("HTTP {code}")));
        }
        for code in [301, 400, 401, 403, 404] {
            assert_eq!(judge_status(code), Try::Refused(format!("HTTP {code}")));
        }
    }

    #[test]
    fn the_signature_verifies_under_its_key_only() {
        let body = br#"{"id":"x"}"#;
        let sig = signature(b"k1", body);
        assert!(sig.starts_with("sha256=") && sig.len() == 7 + 64, "{sig}");
        assert!(verify(b"k1", body, &sig));
        assert!(!verify(b"k2", body, &sig), "another key");
        assert!(!verify(b"k1", br#"{"id":"y"}"#, &sig), "another body");
        assert!(!verify(b"k1", body, &sig[..40]), "cut");
        assert!(!verify(b"k1", body, "sha1=00"), "another scheme");
        // RFC 4231 test case 2: HMAC-SHA256("Jefe", "what do ya want for nothing?").
        assert_eq!(
            signature(b"Jefe", b"what do ya want for nothing?"),
            "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn a_url_is_logged_without_its_path() {
        assert_eq!(url_origin("https://hooks.example.org/services/T0/B0/secret"), "https://hooks.example.org/...");
        assert_eq!(url_origin("http://127.0.0.1:8080/x?token=1"), "http://127.0.0.1:8080/...");
    }

    #[test]
    fn a_command_gets_the_alert_on_stdin() {
        let out = std::env::temp_dir().join(format!("havirt-alert-cmd-{}", std::process::id()));
        let script = format!("cat > {}", out.display());
        let sink = command(&["sh", "-c", &script], policy(1, 5_000));
        let (report, seen) = recorder();
        let a = alert("a1");
        assert_eq!(deliver(&sink, &Client::new(&sink), &a, &report), (1, Outcome::Sent));
        let got: Alert = serde_json::from_slice(&std::fs::read(&out).expect("written")).expect("JSON");
        assert_eq!(got, a);
        let _ = std::fs::remove_file(&out);
        assert_eq!(seen.lock().expect("lock").as_slice(), [("cmd".to_string(), "a1".to_string(), Outcome::Sent)]);
    }

    #[test]
    fn a_failing_command_is_retried_within_its_bound_with_its_stderr() {
        let sink = command(&["sh", "-c", "echo 'mail: relay refused' >&2; exit 3"], policy(3, 5_000));
        let (report, seen) = recorder();
        assert_eq!(deliver(&sink, &Client::new(&sink), &alert("a2"), &report), (3, Outcome::Failed));
        let outcomes: Vec<Outcome> = seen.lock().expect("lock").iter().map(|s| s.2).collect();
        assert_eq!(outcomes, [Outcome::Retried, Outcome::Retried, Outcome::Failed]);
        let client = Client::new(&sink);
        let Try::Again(why) = client.try_once(&sink, &alert("a2"), b"{}") else { panic!("a failure") };
        assert!(why.contains("exit 3") && why.contains("mail: relay refused"), "{why}");
    }

    #[test]
    fn a_hanging_command_is_killed_at_its_timeout_and_a_missing_one_refused() {
        let sink = command(&["sh", "-c", "sleep 30"], policy(1, 200));
        let (report, _) = recorder();
        let started = now();
        assert_eq!(deliver(&sink, &Client::new(&sink), &alert("a3"), &report), (1, Outcome::Failed));
        assert!(started.elapsed() < Duration::from_secs(5), "{:?}", started.elapsed());
        let missing = command(&["/nonexistent/havirt-notify"], policy(5, 200));
        assert_eq!(
            deliver(&missing, &Client::new(&missing), &alert("a4"), &report),
            (1, Outcome::Failed),
            "not retried"
        );
    }

    #[test]
    fn a_full_queue_drops_and_counts_without_waiting() {
        // The receiver hangs on its first alert; the queue holds QUEUE_MAX more.
        // (sleep 5: a child left behind when the test binary exits ends soon.)
        let sink = command(&["sh", "-c", "sleep 5"], policy(1, 10_000));
        let (report, seen) = recorder();
        let d = Dispatcher::start(vec![sink], report);
        let started = now();
        for i in 0..QUEUE_MAX + 10 {
            d.send(&alert(&format!("q{i}")));
        }
        assert!(started.elapsed() < Duration::from_secs(1), "send waited: {:?}", started.elapsed());
        let dropped = seen.lock().expect("lock").iter().filter(|s| s.2 == Outcome::Dropped).count();
        // The thread took one alert off the queue, or not yet.
        assert!((9..=10).contains(&dropped), "{dropped} dropped");
    }
}
