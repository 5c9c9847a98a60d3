//! The daemon's HTTP/1.1 listener (`metrics_address`): Prometheus
//! `GET /metrics`, the read-only JSON API and the status page, the smallest
//! responder that does the job, on the daemon's tokio runtime.
//!
//! | path                        | body                                         |
//! |-----------------------------|----------------------------------------------|
//! | `GET /`                     | the status page ([`STATUS_PAGE`], embedded)  |
//! | `GET /metrics`              | the Prometheus exposition                    |
//! | `GET /api/v1/status`        | `havirt status --json` ([`control::status_json`]) |
//! | `GET /api/v1/events?after=N`| `havirt events --json` ([`control::events_json`]), at most [`API_EVENTS_MAX`] |
//! | `GET /api/v1/failovers`     | `havirt events --failovers --json` ([`crate::failover::failovers_json`]) |
//!
//! Read-only by construction: a [`Query`] can name nothing but these reads,
//! so no HTTP request can reach a control request that changes anything
//! (protect, maintenance, fence confirm, start). An unknown path is a 404, a
//! known one asked with another method a 405.
//!
//! One request per connection (`Connection: close`); every read, wait and
//! write is bounded, and at most MAX_CONNECTIONS are served at once, so a
//! slow or hostile client costs a task and a socket, never the daemon's
//! loop. The answers are made by the loop (the exposition by
//! `Daemon::render_metrics`, the API by the same handler as the control
//! socket), asked through a channel; a loop that does not answer in time
//! gives a 503.

use crate::control::{self, EventRecord, Request, Response as ControlResponse};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc, oneshot};

/// Longest request head (request line and headers) read; a scrape sends
/// about 200 bytes, a browser about 600.
pub const MAX_REQUEST_BYTES: usize = 8 * 1024;
/// Connections served at once; more are closed at once. A status page
/// polls three paths every second.
pub const MAX_CONNECTIONS: usize = 16;
/// How long a client may take to send its request head.
pub const READ_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the daemon's loop may take to answer.
pub const ANSWER_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a client may take to read the answer.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// Queries waiting for the loop; more get a 503 at once.
pub const QUERIES_QUEUED: usize = MAX_CONNECTIONS;
/// Pause after a failed accept (EMFILE), so that it cannot spin a core.
pub const ACCEPT_ERROR_BACKOFF: Duration = Duration::from_millis(100);
/// Events in one `/api/v1/events` answer (the oldest after `after`): the
/// daemon keeps 10 000, about 1.5 MB of JSON. A client pages on with
/// `after` = the last `seq` it got.
pub const API_EVENTS_MAX: usize = 500;

/// The status page: HTML, CSS and script in one file, no external resource.
pub const STATUS_PAGE: &str = include_str!("status_page.html");
/// Only what the page itself carries runs, and it fetches only this origin.
const PAGE_POLICY: &str = "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; \
                           connect-src 'self'; img-src data:; frame-ancestors 'none'; base-uri 'none'; form-action 'none'";

/// A read of the API: nothing else can be asked over HTTP.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ApiRead {
    Status,
    Events { after: u64 },
    Failovers,
}

impl From<ApiRead> for Request {
    fn from(r: ApiRead) -> Request {
        match r {
            ApiRead::Status => Request::Status,
            ApiRead::Events { after } => Request::Events { after },
            ApiRead::Failovers => Request::Failovers,
        }
    }
}

/// What the loop receives, with where to send its answer.
#[derive(Debug)]
pub enum Query {
    /// The rendered exposition.
    Metrics(oneshot::Sender<String>),
    /// Answered as the control socket answers `Request::from(read)`.
    Api(ApiRead, oneshot::Sender<ControlResponse>),
}

/// What a well-formed request asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Route {
    Page,
    Metrics,
    Api(ApiRead),
}

/// The paths served, for the 404's body.
const PATHS: &str = "/, /metrics, /api/v1/status, /api/v1/events?after=SEQ, /api/v1/failovers";

/// Serves until the receiver of `tx` is dropped.
pub async fn serve(listener: TcpListener, tx: mpsc::Sender<Query>) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let accepted = tokio::select! {
            () = tx.closed() => return,
            accepted = listener.accept() => accepted,
        };
        let Ok((stream, _)) = accepted else {
            tokio::time::sleep(ACCEPT_ERROR_BACKOFF).await;
            continue;
        };
        // Full: the connection is dropped (closed) at once.
        let Ok(permit) = Arc::clone(&slots).try_acquire_owned() else { continue };
        let tx = tx.clone();
        tokio::spawn(async move {
            serve_connection(stream, &tx).await;
            drop(permit);
        });
    }
}

async fn serve_connection(mut stream: TcpStream, tx: &mpsc::Sender<Query>) {
    let response = match tokio::time::timeout(READ_TIMEOUT, read_head(&mut stream)).await {
        Err(_) => Response::error(408, "Request Timeout", "no request within 5 s\n"),
        Ok(Err(r)) => r,
        Ok(Ok(head)) => match route(&head) {
            Ok(Route::Page) => Response::ok("text/html; charset=utf-8", STATUS_PAGE.to_string()),
            Ok(Route::Metrics) => scrape(tx).await,
            Ok(Route::Api(read)) => api(tx, read).await,
            Err(r) => r,
        },
    };
    let write = async {
        stream.write_all(&response.encode()).await?;
        stream.shutdown().await
    };
    let _ = tokio::time::timeout(WRITE_TIMEOUT, write).await;
}

/// Reads up to the blank line that ends the head (a GET has no body).
async fn read_head(stream: &mut TcpStream) -> Result<Vec<u8>, Response> {
    let mut head = Vec::with_capacity(512);
    let mut chunk = [0u8; 1024];
    loop {
        let n = stream.read(&mut chunk).await.map_err(|_| Response::error(400, "Bad Request", "read failed\n"))?;
        if n == 0 {
            return Err(Response::error(400, "Bad Request", "the request ended before its blank line\n"));
        }
        head.extend_from_slice(&chunk[..n]);
        if head.windows(4).any(|w| w == b"\r\n\r\n") || head.windows(2).any(|w| w == b"\n\n") {
            return Ok(head);
        }
        if head.len() > MAX_REQUEST_BYTES {
            return Err(Response::error(431, "Request Header Fields Too Large", "request head over 8 KiB\n"));
        }
    }
}

/// The request line's route: an unknown path is a 404 whatever the method,
/// a known one asked with anything but GET a 405.
pub fn route(head: &[u8]) -> Result<Route, Response> {
    let line = head.split(|b| *b == b'\n').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let mut words = line.trim_end_matches('\r').split(' ');
    let (method, target, version) = (words.next(), words.next(), words.next());
    let bad = || Response::error(400, "Bad Request", "expected: GET PATH HTTP/1.1\n");
    let (Some(method), Some(target), Some(version)) = (method, target, version) else { return Err(bad()) };
    if !version.starts_with("HTTP/1.") || words.next().is_some() {
        return Err(bad());
    }
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let route = match path {
        "/" => Route::Page,
        "/metrics" => Route::Metrics,
        "/api/v1/status" => Route::Api(ApiRead::Status),
        "/api/v1/failovers" => Route::Api(ApiRead::Failovers),
        "/api/v1/events" => Route::Api(ApiRead::Events { after: after_param(query)? }),
        _ => return Err(Response::error(404, "Not Found", &format!("no such path; havirt serves {PATHS}\n"))),
    };
    if method != "GET" {
        let mut r = Response::error(405, "Method Not Allowed", "read-only: GET only\n");
        r.allow = true;
        return Err(r);
    }
    Ok(route)
}

/// `after=SEQ` in a query string (0 when absent); other parameters are ignored.
fn after_param(query: &str) -> Result<u64, Response> {
    let Some(value) = query.split('&').find_map(|p| p.strip_prefix("after=")) else { return Ok(0) };
    value.parse().map_err(|_| {
        Response::error(
            400,
            "Bad Request",
            &format!("after={value}: expected an event sequence number (0 to 2^64-1)\n"),
        )
    })
}

fn busy() -> Response {
    Response::error(503, "Service Unavailable", "the daemon is busy with other requests; retry\n")
}

fn late() -> Response {
    Response::error(503, "Service Unavailable", "the daemon's loop did not answer within 5 s\n")
}

async fn scrape(tx: &mpsc::Sender<Query>) -> Response {
    let (reply, answer) = oneshot::channel();
    if tx.try_send(Query::Metrics(reply)).is_err() {
        return busy();
    }
    match tokio::time::timeout(ANSWER_TIMEOUT, answer).await {
        Ok(Ok(body)) => Response::ok(crate::metrics::CONTENT_TYPE, body),
        _ => late(),
    }
}

async fn api(tx: &mpsc::Sender<Query>, read: ApiRead) -> Response {
    let (reply, answer) = oneshot::channel();
    if tx.try_send(Query::Api(read, reply)).is_err() {
        return busy();
    }
    match tokio::time::timeout(ANSWER_TIMEOUT, answer).await {
        Ok(Ok(answer)) => api_body(read, answer),
        _ => late(),
    }
}

/// The JSON of the loop's answer, shaped by the same functions as the CLI's `--json`.
pub fn api_body(read: ApiRead, answer: ControlResponse) -> Response {
    let json = "application/json";
    match (read, answer) {
        (ApiRead::Status, ControlResponse::Status(r)) => Response::ok(json, control::status_json(&r) + "\n"),
        (ApiRead::Events { .. }, ControlResponse::Events(list)) => {
            let first: &[EventRecord] = &list[..list.len().min(API_EVENTS_MAX)];
            Response::ok(json, control::events_json(first) + "\n")
        }
        (ApiRead::Failovers, ControlResponse::Failovers(list)) => {
            Response::ok(json, crate::failover::failovers_json(&list) + "\n")
        }
        (_, ControlResponse::Error(e)) => Response::error(500, "Internal Server Error", &format!("{e}\n")),
        (read, other) => {
            Response::error(500, "Internal Server Error", &format!("the daemon answered {read:?} with {other:?}\n"))
        }
    }
}

/// One HTTP answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    pub reason: &'static str,
    pub content_type: &'static str,
    pub body: String,
    /// Say `Allow: GET` (405).
    pub allow: bool,
}

impl Response {
    fn ok(content_type: &'static str, body: String) -> Response {
        Response { status: 200, reason: "OK", content_type, body, allow: false }
    }

    fn error(status: u16, reason: &'static str, body: &str) -> Response {
        Response { status, reason, content_type: "text/plain; charset=utf-8", body: body.to_string(), allow: false }
    }

    /// Every answer is current state: never cached, never sniffed as
    /// another type; the page runs only its own script.
    pub fn encode(&self) -> Vec<u8> {
        let allow = if self.allow { "Allow: GET\r\n" } else { "" };
        let policy = if self.content_type.starts_with("text/html") {
            format!("Content-Security-Policy: {PAGE_POLICY}\r\n")
        } else {
            String::new()
        };
        let head = format!(
            "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nCache-Control: no-store\r\n\
             X-Content-Type-Options: nosniff\r\n{policy}{allow}Connection: close\r\n\r\n",
            self.status,
            self.reason,
            self.content_type,
            self.body.len()
        );
        let mut out = head.into_bytes();
        out.extend_from_slice(self.body.as_bytes());
        out
    }
}

#[cfg(test)]
mod tests;
