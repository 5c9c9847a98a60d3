//! Alert webhooks against real HTTP receivers on 127.0.0.1: one that
//! records and answers 200, one that answers 500 (bounded retries, the same
//! id every time), and one that reads the request and never answers (the
//! sender goes on, and so do the other receivers). Each receiver is a std
//! `TcpListener` in this test; the sender is the daemon's own
//! `alerts::deliver` with the `ureq` client.

use havirt::alerts::deliver::{
    Client, Dispatcher, ID_HEADER, KIND_HEADER, Outcome, Policy, QUEUE_MAX, Report, SIGNATURE_HEADER, Sink, Target,
    deliver, verify,
};
use havirt::alerts::{Alert, AlertKind, FORMAT};
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const KEY: &[u8] = b"0123456789abcdef0123456789abcdef-alert-test-key";
/// Longest a test waits for something that should happen in milliseconds.
const WAIT_MAX: Duration = Duration::from_secs(10);

/// The wall clock: these tests time real sockets and threads.
#[allow(clippy::disallowed_methods, reason = "tests time real sockets and threads in wall time")]
fn now() -> Instant {
    Instant::now()
}

/// One request as the receiver read it.
#[derive(Clone, Debug)]
struct Request {
    at: Instant,
    line: String,
    /// Header names in lower case.
    headers: BTreeMap<String, String>,
    body: Vec<u8>,
}

#[derive(Clone, Copy)]
enum Answer {
    /// 200 after `fail` answers of 500.
    Status { fail: usize },
    /// Read the request, then hold the connection without a word.
    Hang,
}

/// A real HTTP/1.1 receiver on 127.0.0.1: one thread per connection.
struct Receiver {
    url: String,
    requests: Arc<Mutex<Vec<Request>>>,
}

impl Receiver {
    fn start(answer: Answer) -> Receiver {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1");
        let url = format!("http://{}/hook/secret-token", listener.local_addr().expect("address"));
        let requests: Arc<Mutex<Vec<Request>>> = Arc::default();
        let seen = Arc::clone(&requests);
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let seen = Arc::clone(&seen);
                std::thread::spawn(move || serve(stream, answer, &seen));
            }
        });
        Receiver { url, requests }
    }

    fn requests(&self) -> Vec<Request> {
        self.requests.lock().expect("lock").clone()
    }

    /// Waits (bounded) until `n` requests came.
    fn wait_for(&self, n: usize) -> Vec<Request> {
        let start = now();
        while start.elapsed() < WAIT_MAX {
            let r = self.requests();
            if r.len() >= n {
                return r;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        panic!("{} request(s) after {WAIT_MAX:?}, wanted {n}", self.requests().len());
    }
}

fn serve(stream: TcpStream, answer: Answer, seen: &Mutex<Vec<Request>>) {
    let _ = stream.set_read_timeout(Some(WAIT_MAX));
    let mut reader = BufReader::new(stream.try_clone().expect("clone"));
    let mut line = String::new();
    if reader.read_line(&mut line).unwrap_or(0) == 0 {
        return;
    }
    let mut headers = BTreeMap::new();
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h).unwrap_or(0) == 0 || h.trim().is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
        }
    }
    let len: usize = headers.get("content-length").and_then(|l| l.parse().ok()).unwrap_or(0);
    let mut body = vec![0; len];
    if reader.read_exact(&mut body).is_err() {
        return;
    }
    let n = {
        let mut s = seen.lock().expect("lock");
        s.push(Request { at: now(), line: line.trim().to_string(), headers, body });
        s.len()
    };
    let mut stream = stream;
    match answer {
        Answer::Hang => std::thread::sleep(WAIT_MAX),
        Answer::Status { fail } => {
            let status = if n > fail { "200 OK" } else { "500 Internal Server Error" };
            let _ = write!(stream, "HTTP/1.1 {status}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
        }
    }
}

fn alert(id: &str) -> Alert {
    Alert {
        format: FORMAT,
        id: id.into(),
        kind: AlertKind::FailoverClosed,
        cluster: "lab".into(),
        host: "h2".into(),
        domain: None,
        sender: "h1".into(),
        unix_ms: 1_700_000_000_000,
        text: "failover of h2 closed: vm1 on h1 running again".into(),
        failover: None,
        timeline: Some("FAILOVER of h2 ...\n".into()),
    }
}

fn webhook(name: &str, url: &str, attempts: u32, timeout_ms: u64, backoff_ms: u64) -> Sink {
    Sink {
        name: name.into(),
        target: Target::Webhook { url: url.into(), key: KEY.to_vec() },
        policy: Policy {
            attempts,
            timeout: Duration::from_millis(timeout_ms),
            backoff: Duration::from_millis(backoff_ms),
        },
    }
}

type Outcomes = Arc<Mutex<Vec<(String, String, Outcome)>>>;

fn recorder() -> (Report, Outcomes) {
    let seen: Outcomes = Arc::default();
    let s = Arc::clone(&seen);
    let report: Report =
        Arc::new(move |sink: &str, id: &str, o| s.lock().expect("lock").push((sink.into(), id.into(), o)));
    (report, seen)
}

fn outcomes_of(seen: &Outcomes, sink: &str) -> Vec<Outcome> {
    seen.lock().expect("lock").iter().filter(|s| s.0 == sink).map(|s| s.2).collect()
}

#[test]
fn a_webhook_posts_signed_json_with_its_id() {
    let rx = Receiver::start(Answer::Status { fail: 0 });
    let sink = webhook("hook", &rx.url, 3, 2_000, 10);
    let (report, seen) = recorder();
    let a = alert("id-1");
    assert_eq!(deliver(&sink, &Client::new(&sink), &a, &report), (1, Outcome::Sent));
    let [r] = rx.requests().try_into().expect("one request");
    assert_eq!(r.line, "POST /hook/secret-token HTTP/1.1");
    assert_eq!(r.headers.get("content-type").map(String::as_str), Some("application/json"));
    assert_eq!(r.headers.get(&ID_HEADER.to_ascii_lowercase()).map(String::as_str), Some("id-1"));
    assert_eq!(r.headers.get(&KIND_HEADER.to_ascii_lowercase()).map(String::as_str), Some("failover_closed"));
    let sig = r.headers.get(&SIGNATURE_HEADER.to_ascii_lowercase()).expect("signature header");
    assert!(verify(KEY, &r.body, sig), "the signature verifies over the body received");
    assert!(!verify(b"another key", &r.body, sig));
    let got: Alert = serde_json::from_slice(&r.body).expect("the body is the alert as JSON");
    assert_eq!(got, a);
    assert_eq!(outcomes_of(&seen, "hook"), [Outcome::Sent]);
}

#[test]
fn a_receiver_that_answers_500_gets_a_bounded_number_of_tries_with_backoff_and_one_id() {
    let rx = Receiver::start(Answer::Status { fail: usize::MAX });
    let sink = webhook("broken", &rx.url, 3, 2_000, 100);
    let (report, seen) = recorder();
    let started = now();
    assert_eq!(deliver(&sink, &Client::new(&sink), &alert("id-500"), &report), (3, Outcome::Failed));
    std::thread::sleep(Duration::from_millis(300));
    let r = rx.requests();
    assert_eq!(r.len(), 3, "exactly `attempts` tries");
    assert!(r.iter().all(|q| q.body == r[0].body), "every retry carries the same body");
    assert!(r.iter().all(|q| q.headers.get("x-havirt-alert-id").map(String::as_str) == Some("id-500")));
    let gaps: Vec<Duration> = r.windows(2).map(|w| w[1].at - w[0].at).collect();
    assert!(
        gaps[0] >= Duration::from_millis(100) && gaps[1] >= Duration::from_millis(200),
        "backoff doubles: {gaps:?}"
    );
    assert!(started.elapsed() < Duration::from_secs(3), "bounded: {:?}", started.elapsed());
    assert_eq!(outcomes_of(&seen, "broken"), [Outcome::Retried, Outcome::Retried, Outcome::Failed]);

    // A receiver that comes back within the tries gets the alert.
    let flaky = Receiver::start(Answer::Status { fail: 2 });
    let sink = webhook("flaky", &flaky.url, 5, 2_000, 10);
    assert_eq!(deliver(&sink, &Client::new(&sink), &alert("id-flaky"), &report), (3, Outcome::Sent));
    assert_eq!(flaky.requests().len(), 3);
}

#[test]
fn a_hanging_receiver_delays_neither_the_sender_nor_the_other_receivers() {
    let hang = Receiver::start(Answer::Hang);
    let ok = Receiver::start(Answer::Status { fail: 0 });
    let (report, seen) = recorder();
    let sinks = vec![webhook("hang", &hang.url, 2, 300, 50), webhook("ok", &ok.url, 2, 2_000, 50)];
    let d = Dispatcher::start(sinks, report);
    let started = now();
    for i in 0..5 {
        d.send(&alert(&format!("id-{i}")));
    }
    let queued_in = started.elapsed();
    assert!(queued_in < Duration::from_millis(50), "send waits for no receiver: {queued_in:?}");
    let got = ok.wait_for(5);
    let ids: Vec<&str> = got.iter().map(|r| r.headers["x-havirt-alert-id"].as_str()).collect();
    assert_eq!(ids, ["id-0", "id-1", "id-2", "id-3", "id-4"], "in order");
    assert!(started.elapsed() < Duration::from_secs(2), "the other receiver was not held up: {:?}", started.elapsed());
    // The hanging one: each try ends at its timeout, two tries per alert.
    let first = hang.wait_for(2);
    assert!(first[1].at - first[0].at < Duration::from_secs(2), "a try ends at its timeout");
    let bound = now();
    while outcomes_of(&seen, "hang").iter().filter(|o| **o == Outcome::Failed).count() < 1 {
        assert!(bound.elapsed() < WAIT_MAX, "the hanging receiver's first alert never failed");
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(outcomes_of(&seen, "hang")[..2], [Outcome::Retried, Outcome::Failed]);
    assert_eq!(outcomes_of(&seen, "ok"), [Outcome::Sent; 5]);
}

#[test]
fn a_full_queue_behind_a_hanging_receiver_drops_and_counts() {
    let hang = Receiver::start(Answer::Hang);
    let (report, seen) = recorder();
    let d = Dispatcher::start(vec![webhook("hang", &hang.url, 1, 5_000, 10)], report);
    hang.wait_for(0);
    let started = now();
    for i in 0..QUEUE_MAX + 20 {
        d.send(&alert(&format!("q-{i}")));
    }
    assert!(started.elapsed() < Duration::from_millis(200), "never waits: {:?}", started.elapsed());
    let dropped = outcomes_of(&seen, "hang").iter().filter(|o| **o == Outcome::Dropped).count();
    assert!((19..=20).contains(&dropped), "{dropped} dropped (the thread holds at most one)");
}
