//! `GET /metrics` over HTTP/1.1 for Prometheus: the smallest responder that
//! does the job, on the daemon's tokio runtime. One request per connection
//! (`Connection: close`); anything but `GET /metrics` is refused (404, 405);
//! every read, wait and write is bounded, and at most MAX_CONNECTIONS are
//! served at once, so a slow or hostile client costs a task and a socket,
//! never the daemon's loop. The exposition itself is made by the loop
//! (`Daemon::render_metrics`), asked through a channel; a loop that does not
//! answer in time gives a 503.

use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc, oneshot};

/// Longest request head (request line and headers) read; a scrape sends
/// about 200 bytes.
pub const MAX_REQUEST_BYTES: usize = 8 * 1024;
/// Connections served at once; more are closed at once.
pub const MAX_CONNECTIONS: usize = 8;
/// How long a client may take to send its request head.
pub const READ_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the daemon's loop may take to render the metrics.
pub const ANSWER_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a client may take to read the answer.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// Scrapes waiting for the loop; more get a 503 at once.
pub const SCRAPES_QUEUED: usize = 4;
/// Pause after a failed accept (EMFILE), so that it cannot spin a core.
pub const ACCEPT_ERROR_BACKOFF: Duration = Duration::from_millis(100);

/// What the loop receives: where to send the rendered exposition.
pub type Scrape = oneshot::Sender<String>;

/// Serves until the receiver of `tx` is dropped.
pub async fn serve(listener: TcpListener, tx: mpsc::Sender<Scrape>) {
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

async fn serve_connection(mut stream: TcpStream, tx: &mpsc::Sender<Scrape>) {
    let response = match tokio::time::timeout(READ_TIMEOUT, read_head(&mut stream)).await {
        Err(_) => Response::error(408, "Request Timeout", "no request within 5 s\n"),
        Ok(Err(r)) => r,
        Ok(Ok(head)) => match route(&head) {
            Ok(()) => scrape(tx).await,
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

/// Only `GET /metrics` (a query string is ignored).
pub fn route(head: &[u8]) -> Result<(), Response> {
    let line = head.split(|b| *b == b'\n').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let mut words = line.trim_end_matches('\r').split(' ');
    let (method, target, version) = (words.next(), words.next(), words.next());
    let (Some(method), Some(target), Some(version)) = (method, target, version) else {
        return Err(Response::error(400, "Bad Request", "expected: GET /metrics HTTP/1.1\n"));
    };
    if !version.starts_with("HTTP/1.") || words.next().is_some() {
        return Err(Response::error(400, "Bad Request", "expected: GET /metrics HTTP/1.1\n"));
    }
    let path = target.split('?').next().unwrap_or_default();
    if path != "/metrics" {
        return Err(Response::error(404, "Not Found", "havirt serves /metrics only\n"));
    }
    if method != "GET" {
        let mut r = Response::error(405, "Method Not Allowed", "GET only\n");
        r.allow = true;
        return Err(r);
    }
    Ok(())
}

async fn scrape(tx: &mpsc::Sender<Scrape>) -> Response {
    let (reply, answer) = oneshot::channel();
    if tx.try_send(reply).is_err() {
        return Response::error(503, "Service Unavailable", "the daemon is busy with other scrapes; retry\n");
    }
    match tokio::time::timeout(ANSWER_TIMEOUT, answer).await {
        Ok(Ok(body)) => {
            Response { status: 200, reason: "OK", content_type: crate::metrics::CONTENT_TYPE, body, allow: false }
        }
        _ => Response::error(503, "Service Unavailable", "the daemon's loop did not answer within 5 s\n"),
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
    fn error(status: u16, reason: &'static str, body: &str) -> Response {
        Response { status, reason, content_type: "text/plain; charset=utf-8", body: body.to_string(), allow: false }
    }

    pub fn encode(&self) -> Vec<u8> {
        let allow = if self.allow { "Allow: GET\r\n" } else { "" };
        let head = format!(
            "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\n{allow}Connection: close\r\n\r\n",
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
mod tests {
    use super::*;

    /// A server whose "loop" answers every scrape with "m 1\n"; returns its address.
    async fn server() -> std::net::SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (tx, mut rx) = mpsc::channel::<Scrape>(4);
        tokio::spawn(async move {
            while let Some(reply) = rx.recv().await {
                let _ = reply.send("m 1\n".to_string());
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

    #[tokio::test]
    async fn get_metrics_answers_and_everything_else_is_refused() {
        let addr = server().await;
        let ok = exchange(addr, b"GET /metrics HTTP/1.1\r\nHost: x\r\nAccept: */*\r\n\r\n").await;
        assert!(ok.starts_with("HTTP/1.1 200 OK\r\n"), "{ok}");
        assert!(ok.contains("Content-Type: text/plain; version=0.0.4"), "{ok}");
        assert!(ok.ends_with("Content-Length: 4\r\nConnection: close\r\n\r\nm 1\n"), "{ok}");
        let query = exchange(addr, b"GET /metrics?x=1 HTTP/1.0\n\n").await;
        assert!(query.starts_with("HTTP/1.1 200 OK"), "{query}");
        let other = exchange(addr, b"GET / HTTP/1.1\r\n\r\n").await;
        assert!(other.starts_with("HTTP/1.1 404 Not Found"), "{other}");
        let post = exchange(addr, b"POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n").await;
        assert!(post.starts_with("HTTP/1.1 405 Method Not Allowed") && post.contains("Allow: GET\r\n"), "{post}");
        let junk = exchange(addr, b"hello\r\n\r\n").await;
        assert!(junk.starts_with("HTTP/1.1 400 Bad Request"), "{junk}");
        let big = format!("GET /metrics HTTP/1.1\r\nX: {}\r\n", "a".repeat(MAX_REQUEST_BYTES));
        let big = exchange(addr, big.as_bytes()).await;
        assert!(big.starts_with("HTTP/1.1 431"), "{big}");
    }

    #[tokio::test]
    async fn a_silent_client_times_out_and_does_not_block_others() {
        let addr = server().await;
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
        // Capacity 1, never read: the first scrape waits, the next is busy.
        let (tx, _rx) = mpsc::channel::<Scrape>(1);
        tokio::spawn(serve(listener, tx));
        let first = tokio::spawn(exchange(addr, b"GET /metrics HTTP/1.1\r\n\r\n"));
        tokio::time::sleep(Duration::from_millis(200)).await;
        let busy = exchange(addr, b"GET /metrics HTTP/1.1\r\n\r\n").await;
        assert!(busy.starts_with("HTTP/1.1 503") && busy.contains("busy"), "{busy}");
        let first = first.await.expect("joined");
        assert!(first.starts_with("HTTP/1.1 503") && first.contains("did not answer"), "{first}");
    }
}
