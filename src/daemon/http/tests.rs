//! The listener against real sockets, with a stand-in for the daemon's loop
//! that answers as the control socket would.

use super::*;
use crate::control::StatusReport;
use crate::engine::config::HostId;
use crate::engine::io::Event;
use crate::engine::time::Instant;
use crate::failover::{DomainTimeline, FailoverRecord, Step};

/// What the stand-in loop answers.
#[derive(Clone)]
struct World {
    status: StatusReport,
    events: Vec<EventRecord>,
    failovers: Vec<FailoverRecord>,
}

fn world(events: u64) -> World {
    let events = (1..=events)
        .map(|seq| EventRecord {
            seq,
            unix_ms: 1_700_000_000_000 + seq,
            event: Event { at: Instant(seq), host: HostId(1), role: "master".into(), text: format!("event {seq}") },
        })
        .collect();
    let failover = FailoverRecord {
        host: "node-bravo".into(),
        host_id: HostId(2),
        // Above 2^53: a JSON number would lose its low bits in a browser.
        boot: Some(0xf439_7c1c_06af_6113),
        detected_unix_ms: 1_700_000_000_000,
        verdict: "storage-lost".into(),
        silent_before_ms: Some(1758),
        steps: vec![Step { after_ms: 477, text: "fenced: command confirmed the power-off".into() }],
        domains: vec![DomainTimeline {
            name: "web".into(),
            to: "node-a".into(),
            generation: 2,
            reason: "fence confirmed".into(),
            lease_ms: 512,
            starting_ms: Some(514),
            running_ms: Some(1329),
            ready_ms: None,
        }],
    };
    World { status: crate::control::tests::report(), events, failovers: vec![failover] }
}

/// A server whose "loop" answers every scrape with "m 1\n" and the API from
/// `w`, filtering events as the daemon does; returns its address.
async fn server(w: World) -> std::net::SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (tx, mut rx) = mpsc::channel::<Query>(4);
    tokio::spawn(async move {
        while let Some(q) = rx.recv().await {
            match q {
                Query::Metrics(reply) => drop(reply.send("m 1\n".to_string())),
                Query::Api(read, reply) => {
                    let answer = match Request::from(read) {
                        Request::Status => ControlResponse::Status(Box::new(w.status.clone())),
                        Request::Events { after } => {
                            ControlResponse::Events(w.events.iter().filter(|e| e.seq > after).cloned().collect())
                        }
                        Request::Failovers => ControlResponse::Failovers(w.failovers.clone()),
                        other => ControlResponse::Error(format!("not a read: {other:?}")),
                    };
                    let _ = reply.send(answer);
                }
            }
        }
    });
    tokio::spawn(serve(listener, tx));
    addr
}

async fn exchange(addr: std::net::SocketAddr, request: &[u8]) -> String {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    s.write_all(request).await.expect("write");
    let mut out = String::new();
    s.read_to_string(&mut out).await.expect("read");
    out
}

async fn get(addr: std::net::SocketAddr, target: &str) -> String {
    exchange(addr, format!("GET {target} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes()).await
}

/// The body of a 200 answer of `content_type`, checked against its Content-Length.
fn body_of<'a>(answer: &'a str, content_type: &str) -> &'a str {
    assert!(answer.starts_with("HTTP/1.1 200 OK\r\n"), "{answer}");
    assert!(answer.contains(&format!("\r\nContent-Type: {content_type}\r\n")), "{answer}");
    assert!(answer.contains("\r\nCache-Control: no-store\r\n"), "{answer}");
    let (head, body) = answer.split_once("\r\n\r\n").expect("a head");
    assert!(head.contains(&format!("\r\nContent-Length: {}\r\n", body.len())), "{head}");
    body
}

fn json(answer: &str) -> serde_json::Value {
    serde_json::from_str(body_of(answer, "application/json")).unwrap_or_else(|e| panic!("{e}: {answer}"))
}

#[tokio::test]
async fn get_metrics_answers_and_everything_else_is_refused() {
    let addr = server(world(0)).await;
    let ok = exchange(addr, b"GET /metrics HTTP/1.1\r\nHost: x\r\nAccept: */*\r\n\r\n").await;
    assert_eq!(body_of(&ok, "text/plain; version=0.0.4; charset=utf-8"), "m 1\n");
    let query = exchange(addr, b"GET /metrics?x=1 HTTP/1.0\n\n").await;
    assert!(query.starts_with("HTTP/1.1 200 OK"), "{query}");
    let other = get(addr, "/nope").await;
    assert!(other.starts_with("HTTP/1.1 404 Not Found") && other.contains("/api/v1/status"), "{other}");
    let post = exchange(addr, b"POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n").await;
    assert!(post.starts_with("HTTP/1.1 405 Method Not Allowed") && post.contains("Allow: GET\r\n"), "{post}");
    let junk = exchange(addr, b"hello\r\n\r\n").await;
    assert!(junk.starts_with("HTTP/1.1 400 Bad Request"), "{junk}");
    let big = format!("GET /metrics HTTP/1.1\r\nX: {}\r\n", "a".repeat(MAX_REQUEST_BYTES));
    let big = exchange(addr, big.as_bytes()).await;
    assert!(big.starts_with("HTTP/1.1 431"), "{big}");
}

#[test]
fn routes_are_reads_only() {
    let r = |line: &str| route(format!("{line}\r\n\r\n").as_bytes());
    assert_eq!(r("GET / HTTP/1.1"), Ok(Route::Page));
    assert_eq!(r("GET /?x HTTP/1.1"), Ok(Route::Page));
    assert_eq!(r("GET /metrics HTTP/1.1"), Ok(Route::Metrics));
    assert_eq!(r("GET /api/v1/status HTTP/1.1"), Ok(Route::Api(ApiRead::Status)));
    assert_eq!(r("GET /api/v1/failovers HTTP/1.1"), Ok(Route::Api(ApiRead::Failovers)));
    assert_eq!(r("GET /api/v1/events HTTP/1.1"), Ok(Route::Api(ApiRead::Events { after: 0 })));
    assert_eq!(r("GET /api/v1/events?x=1&after=42 HTTP/1.1"), Ok(Route::Api(ApiRead::Events { after: 42 })));
    let status = |line: &str| r(line).err().map(|e| (e.status, e.body));
    let (code, body) = status("GET /api/v1/events?after=-1 HTTP/1.1").expect("refused");
    assert_eq!((code, body.as_str()), (400, "after=-1: expected an event sequence number (0 to 2^64-1)\n"));
    // Unknown paths, whatever the method; near misses too.
    for path in ["/api/v1/status/", "/api/v1", "/api/v2/status", "/index.html", "//metrics", "/api/v1/protect"] {
        assert_eq!(status(&format!("GET {path} HTTP/1.1")).map(|s| s.0), Some(404), "{path}");
        assert_eq!(status(&format!("POST {path} HTTP/1.1")).map(|s| s.0), Some(404), "{path}");
    }
    // Every known path refuses every other method.
    for path in ["/", "/metrics", "/api/v1/status", "/api/v1/events", "/api/v1/failovers"] {
        for method in ["POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"] {
            let e = r(&format!("{method} {path} HTTP/1.1")).expect_err("not a GET");
            assert_eq!((e.status, e.allow, e.body.as_str()), (405, true, "read-only: GET only\n"), "{method} {path}");
        }
    }
}

#[tokio::test]
async fn api_serves_the_control_sockets_json() {
    let w = world(3);
    let addr = server(w.clone()).await;

    // Byte for byte what `havirt status --json` prints.
    let status = get(addr, "/api/v1/status").await;
    let expected = crate::control::status_json(&w.status) + "\n";
    assert_eq!(body_of(&status, "application/json"), expected);
    let s = json(&status);
    assert_eq!((s["cluster"].as_str(), s["master"].as_str()), (Some("prod"), Some("node-a")));
    let verdicts: Vec<_> = s["hosts"].as_array().expect("hosts").iter().map(|h| h["verdict"].clone()).collect();
    assert_eq!(verdicts, ["self", "partitioned"]);
    assert_eq!(s["hosts"][1]["maintenance"], false);

    let events = json(&get(addr, "/api/v1/events").await);
    let seqs: Vec<_> = events.as_array().expect("events").iter().map(|e| e["seq"].as_u64()).collect();
    assert_eq!(seqs, [Some(1), Some(2), Some(3)]);
    assert_eq!(events[0]["text"], "event 1");
    assert_eq!(events[0]["time"], "2023-11-14T22:13:20.001Z");
    assert_eq!(events[0]["host_id"], 1);
    let later = json(&get(addr, "/api/v1/events?after=2").await);
    assert_eq!(later.as_array().map(|a| a.iter().map(|e| e["seq"].as_u64()).collect::<Vec<_>>()), Some(vec![Some(3)]));

    let failovers = get(addr, "/api/v1/failovers").await;
    assert_eq!(body_of(&failovers, "application/json"), crate::failover::failovers_json(&w.failovers) + "\n");
    let f = json(&failovers);
    assert_eq!(f[0]["boot"], "f4397c1c06af6113");
    assert_eq!((f[0]["host"].as_str(), f[0]["domains"][0]["running_ms"].as_u64()), (Some("node-bravo"), Some(1329)));
    assert!(f[0]["domains"][0]["ready_ms"].is_null());
}

#[tokio::test]
async fn events_come_in_bounded_pages() {
    let total = API_EVENTS_MAX as u64 + 7;
    let addr = server(world(total)).await;
    let first = json(&get(addr, "/api/v1/events").await);
    let first = first.as_array().expect("events");
    assert_eq!(first.len(), API_EVENTS_MAX);
    assert_eq!((first[0]["seq"].as_u64(), first[API_EVENTS_MAX - 1]["seq"].as_u64()), (Some(1), Some(500)));
    let rest = json(&get(addr, "/api/v1/events?after=500").await);
    let rest: Vec<_> = rest.as_array().expect("events").iter().filter_map(|e| e["seq"].as_u64()).collect();
    assert_eq!(rest, (501..=total).collect::<Vec<_>>());
    let none = json(&get(addr, &format!("/api/v1/events?after={total}")).await);
    assert_eq!(none, serde_json::json!([]));
}

#[tokio::test]
async fn the_page_is_self_contained() {
    let addr = server(world(0)).await;
    let answer = get(addr, "/").await;
    let page = body_of(&answer, "text/html; charset=utf-8");
    assert_eq!(page, STATUS_PAGE);
    assert!(answer.contains("\r\nContent-Security-Policy: default-src 'none'; "), "{answer}");
    assert!(answer.contains("connect-src 'self'"), "{answer}");
    for id in ["id=\"hosts\"", "id=\"domains\"", "id=\"failovers\"", "id=\"events\"", "id=\"conn\"", "data-polls"] {
        assert!(page.contains(id), "no {id} in the page");
    }
    for api in ["/api/v1/status", "/api/v1/failovers", "/api/v1/events?after="] {
        assert!(page.contains(api), "the page does not poll {api}");
    }
    // No external resource: nothing loaded from another origin, no markup from data.
    for external in ["http://", "https://", "//cdn", "src=", "href=", "@import", "innerHTML", "eval("] {
        assert!(!page.contains(external), "the page contains {external}");
    }
}

#[tokio::test]
async fn a_silent_client_times_out_and_does_not_block_others() {
    let addr = server(world(0)).await;
    let mut silent = TcpStream::connect(addr).await.expect("connect");
    silent.write_all(b"GET /metr").await.expect("write");
    let ok = exchange(addr, b"GET /metrics HTTP/1.1\r\n\r\n").await;
    assert!(ok.starts_with("HTTP/1.1 200 OK"), "{ok}");
    let mut out = String::new();
    silent.read_to_string(&mut out).await.expect("read");
    assert!(out.starts_with("HTTP/1.1 408"), "{out}");
}

#[tokio::test]
async fn a_loop_that_does_not_answer_gives_503() {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    // Capacity 1, never read: the first query waits, the next is busy.
    let (tx, _rx) = mpsc::channel::<Query>(1);
    tokio::spawn(serve(listener, tx));
    let first = tokio::spawn(exchange(addr, b"GET /api/v1/status HTTP/1.1\r\n\r\n"));
    tokio::time::sleep(Duration::from_millis(200)).await;
    let busy = get(addr, "/metrics").await;
    assert!(busy.starts_with("HTTP/1.1 503") && busy.contains("busy"), "{busy}");
    // The page needs no loop: it is served while the loop is stuck.
    assert!(get(addr, "/").await.starts_with("HTTP/1.1 200 OK"));
    let first = first.await.expect("joined");
    assert!(first.starts_with("HTTP/1.1 503") && first.contains("did not answer"), "{first}");
}

#[test]
fn an_unexpected_answer_is_a_500_that_says_so() {
    let r = api_body(ApiRead::Status, ControlResponse::Done("x".into()));
    assert_eq!((r.status, r.body.as_str()), (500, "the daemon answered Status with Done(\"x\")\n"));
    let r = api_body(ApiRead::Failovers, ControlResponse::Error("broken".into()));
    assert_eq!((r.status, r.body.as_str()), (500, "broken\n"));
}
