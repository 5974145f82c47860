//! sample-app: the small HTTP/1.1 service behind each VM in the quick start
//! (`deploy/quickstart.sh`) and the VM tests; it lives beside the quick start it serves. Every
//! request gets `200 OK` and a body naming the app and the client address it saw, so a test
//! can tell which VM answered and from where the connection came:
//!
//! ```text
//! hello from vm-b
//! client: 10.0.2.15:41822
//! ```
//!
//! `GET /healthz` is the readiness probe's target: `200 ok`, or `503` while the file given
//! with `--healthy-file` is absent, so a test makes a VM unready and ready again by deleting
//! and creating that file.
//!
//! Run: `sample-app --listen 0.0.0.0:9080 --name vm-b [--healthy-file PATH]
//! [--header-timeout 10s]`. The first line on stdout is `listening on ADDR` with the address
//! actually bound (so `--listen 127.0.0.1:0` works); nothing else is printed there.
//!
//! Bounded like the mesh's own servers: a request head is at most 8 KiB (431 beyond) and
//! must arrive within `--header-timeout` (408 if it had begun; an idle keep-alive connection
//! is just closed); a body is at most 1 MiB, read and discarded within the same timeout (413
//! beyond); at most 1,024 connections at once. Bad input gets 400 and the connection
//! closed. SIGTERM or Ctrl-C ends the process.

use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use isthmus_proto::config::DurationFlag;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::Semaphore;
use tokio::time::{timeout_at, Instant};

/// The largest request head (request line and headers) read.
const MAX_HEAD: usize = 8 << 10;
/// The largest request body read (and discarded).
const MAX_BODY: u64 = 1 << 20;
const DEFAULT_HEADER_TIMEOUT: Duration = Duration::from_secs(10);
const MAX_CONNECTIONS: usize = 1024;
/// After refusing a request: how long, and how much, to read of what the client still sends.
const LINGER: Duration = Duration::from_secs(1);
const LINGER_BYTES: u64 = 64 << 10;
const HEALTH_PATH: &str = "/healthz";

struct App {
    name: String,
    healthy_file: Option<PathBuf>,
    header_timeout: Duration,
}

#[derive(Debug, Parser)]
#[command(about = "The sample app: answers every request with its name and the client it saw")]
struct Args {
    /// Address to listen on (port 0: any free port, printed on the first line).
    #[arg(long, default_value = "0.0.0.0:9080")]
    listen: SocketAddr,
    /// The name in every answer (`hello from NAME`).
    #[arg(long, default_value = "sample-app")]
    name: String,
    /// `/healthz` answers 503 while this file is absent; empty or unset: always healthy.
    #[arg(long)]
    healthy_file: Option<PathBuf>,
    /// How long a request head (and body) may take to arrive.
    #[arg(long, default_value_t = DurationFlag(DEFAULT_HEADER_TIMEOUT))]
    header_timeout: DurationFlag,
}

fn main() -> std::process::ExitCode {
    isthmus_proto::program::exit("sample-app", run())
}

#[tokio::main(flavor = "current_thread")]
async fn run() -> anyhow::Result<()> {
    let args = Args::parse();
    let listen = args.listen;
    let app = Arc::new(App {
        name: args.name,
        healthy_file: args.healthy_file.filter(|p| !p.as_os_str().is_empty()),
        header_timeout: args.header_timeout.0,
    });

    let listener = TcpListener::bind(listen)
        .await
        .with_context(|| format!("listening on {listen}"))?;
    println!("listening on {}", listener.local_addr()?);

    let mut terminate = signal(SignalKind::terminate())?;
    let shutdown = async move {
        tokio::select! {
            _ = terminate.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
    };
    tokio::pin!(shutdown);

    let limit = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let permit = tokio::select! {
            permit = limit.clone().acquire_owned() => permit?,
            _ = &mut shutdown => return Ok(()),
        };
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of descriptors and the like: wait rather than spin.
                    eprintln!("sample-app: accept: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = &mut shutdown => return Ok(()),
        };
        let app = app.clone();
        tokio::spawn(async move {
            // An I/O error here is the client going away; nothing to report.
            let _ = serve(stream, peer, &app).await;
            drop(permit);
        });
    }
}

/// One connection: requests in turn until the client or a response closes it.
async fn serve(mut stream: TcpStream, peer: SocketAddr, app: &App) -> io::Result<()> {
    let mut buf = Vec::with_capacity(1024);
    loop {
        let head_len = match read_head(&mut stream, &mut buf, app.header_timeout).await? {
            Head::Complete(len) => len,
            Head::Closed => return Ok(()),
            Head::Reject(status) => return reject(&mut stream, status).await,
        };
        let request = match parse_head(&buf[..head_len]) {
            Ok(request) => request,
            Err(status) => return reject(&mut stream, status).await,
        };
        buf.drain(..head_len);

        if request.content_length > MAX_BODY {
            return reject(&mut stream, 413).await;
        }
        // The body is not used: skip it, from what was already read and then the socket, so
        // the next request on the connection starts where it should.
        let buffered = buf.len().min(request.content_length as usize);
        buf.drain(..buffered);
        let rest = request.content_length - buffered as u64;
        if rest > 0 {
            let deadline = Instant::now() + app.header_timeout;
            let mut body = (&mut stream).take(rest);
            match timeout_at(deadline, tokio::io::copy(&mut body, &mut tokio::io::sink())).await {
                Ok(Ok(n)) if n == rest => {}
                Ok(Ok(_)) => return Ok(()),
                Ok(Err(e)) => return Err(e),
                Err(_) => return reject(&mut stream, 408).await,
            }
        }

        let (status, body) = respond(&request, peer, app).await;
        let close = !request.keep_alive;
        let head = response_head(status, body.len(), request.connection_header(close));
        stream.write_all(head.as_bytes()).await?;
        if request.method != "HEAD" {
            stream.write_all(body.as_bytes()).await?;
        }
        if close {
            return stream.shutdown().await;
        }
    }
}

enum Head {
    /// A head of this many bytes is at the start of the buffer.
    Complete(usize),
    /// The client closed or idled out between requests: nothing to answer.
    Closed,
    /// Answer with this status and close.
    Reject(u16),
}

/// Reads until the buffer holds a whole request head, within `timeout`.
async fn read_head(
    stream: &mut TcpStream,
    buf: &mut Vec<u8>,
    timeout: Duration,
) -> io::Result<Head> {
    let deadline = Instant::now() + timeout;
    loop {
        // Empty lines before a request line are allowed (RFC 9112, 2.2).
        let blank = buf
            .iter()
            .take_while(|b| matches!(b, b'\r' | b'\n'))
            .count();
        buf.drain(..blank);
        if let Some(end) = head_end(buf) {
            return Ok(if end > MAX_HEAD {
                Head::Reject(431)
            } else {
                Head::Complete(end)
            });
        }
        if buf.len() >= MAX_HEAD {
            return Ok(Head::Reject(431));
        }
        let mut chunk = [0u8; 4096];
        match timeout_at(deadline, stream.read(&mut chunk)).await {
            Ok(Ok(0)) if buf.is_empty() => return Ok(Head::Closed),
            Ok(Ok(0)) => return Ok(Head::Reject(400)),
            Ok(Ok(n)) => buf.extend_from_slice(&chunk[..n]),
            Ok(Err(e)) => return Err(e),
            Err(_) if buf.is_empty() => return Ok(Head::Closed),
            Err(_) => return Ok(Head::Reject(408)),
        }
    }
}

/// Where the head ends: after the empty line (CRLF CRLF, or bare LFs, which RFC 9112
/// lets a server accept).
fn head_end(buf: &[u8]) -> Option<usize> {
    buf.iter().enumerate().find_map(|(i, &b)| {
        if b != b'\n' {
            return None;
        }
        let rest = &buf[i + 1..];
        if rest.starts_with(b"\n") {
            Some(i + 2)
        } else if rest.starts_with(b"\r\n") {
            Some(i + 3)
        } else {
            None
        }
    })
}

#[derive(Debug)]
struct Request {
    method: String,
    /// The path, without query, of an origin-form or absolute-form target.
    path: String,
    http10: bool,
    keep_alive: bool,
    content_length: u64,
}

impl Request {
    /// The `Connection` header the response needs, if any: HTTP/1.1 keeps the connection
    /// unless told otherwise, HTTP/1.0 closes it unless told otherwise.
    fn connection_header(&self, close: bool) -> Option<&'static str> {
        match (self.http10, close) {
            (_, true) => Some("close"),
            (true, false) => Some("keep-alive"),
            (false, false) => None,
        }
    }
}

/// Parses a request head, or the status that refuses it.
fn parse_head(head: &[u8]) -> Result<Request, u16> {
    let text = std::str::from_utf8(head).map_err(|_| 400u16)?;
    let mut lines = text.split('\n').map(|l| l.strip_suffix('\r').unwrap_or(l));

    let request_line = lines.next().ok_or(400u16)?;
    let mut parts = request_line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(400);
    };
    if method.is_empty() || !method.bytes().all(is_token_byte) {
        return Err(400);
    }
    let http10 = match version {
        "HTTP/1.1" => false,
        "HTTP/1.0" => true,
        v if v.starts_with("HTTP/") => return Err(505),
        _ => return Err(400),
    };
    let path = request_path(target).ok_or(400u16)?;

    let mut keep_alive = !http10;
    let mut content_length: Option<u64> = None;
    for line in lines.take_while(|l| !l.is_empty()) {
        let (name, value) = line.split_once(':').ok_or(400u16)?;
        if name.is_empty() || !name.bytes().all(is_token_byte) {
            // Includes obsolete line folding (a line starting with a space).
            return Err(400);
        }
        let value = value.trim_matches([' ', '\t']);
        if name.eq_ignore_ascii_case("content-length") {
            let n: u64 = value.parse().map_err(|_| 400u16)?;
            if content_length.is_some_and(|c| c != n) {
                return Err(400);
            }
            content_length = Some(n);
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            // Chunked bodies are more than a sample app needs.
            return Err(501);
        } else if name.eq_ignore_ascii_case("connection") {
            for option in value.split(',').map(str::trim) {
                if option.eq_ignore_ascii_case("close") {
                    keep_alive = false;
                } else if option.eq_ignore_ascii_case("keep-alive") && http10 {
                    keep_alive = true;
                }
            }
        }
    }
    Ok(Request {
        method: method.to_string(),
        path,
        http10,
        keep_alive,
        content_length: content_length.unwrap_or(0),
    })
}

fn is_token_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

fn request_path(target: &str) -> Option<String> {
    let origin_form = if target.starts_with('/') || target == "*" {
        target
    } else {
        let (scheme, rest) = target.split_once("://")?;
        if !scheme.eq_ignore_ascii_case("http") && !scheme.eq_ignore_ascii_case("https") {
            return None;
        }
        rest.find('/').map_or("/", |i| &rest[i..])
    };
    let path = origin_form.split(['?', '#']).next().unwrap_or_default();
    if path.bytes().any(|b| b.is_ascii_control() || b == b' ') {
        return None;
    }
    Some(path.to_string())
}

async fn respond(request: &Request, peer: SocketAddr, app: &App) -> (u16, String) {
    if request.path == HEALTH_PATH && matches!(request.method.as_str(), "GET" | "HEAD") {
        return match &app.healthy_file {
            Some(file) if tokio::fs::metadata(file).await.is_err() => {
                (503, format!("not ready: {} is absent\n", file.display()))
            }
            _ => (200, "ok\n".to_string()),
        };
    }
    (200, format!("hello from {}\nclient: {peer}\n", app.name))
}

async fn reject(stream: &mut TcpStream, status: u16) -> io::Result<()> {
    let body = format!("{status} {}\n", reason(status));
    let head = response_head(status, body.len(), Some("close"));
    stream.write_all(format!("{head}{body}").as_bytes()).await?;
    stream.shutdown().await?;
    // Closing with unread input would reset the connection, and the client could lose the
    // answer: read what is still coming, briefly and boundedly, before closing.
    let mut rest = (&mut *stream).take(LINGER_BYTES);
    let _ = tokio::time::timeout(LINGER, tokio::io::copy(&mut rest, &mut tokio::io::sink())).await;
    Ok(())
}

fn response_head(status: u16, body_len: usize, connection: Option<&str>) -> String {
    let connection = connection
        .map(|c| format!("Connection: {c}\r\n"))
        .unwrap_or_default();
    format!(
        "HTTP/1.1 {status} {}\r\nContent-Type: text/plain; charset=utf-8\r\n\
         Content-Length: {body_len}\r\n{connection}\r\n",
        reason(status)
    )
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        408 => "Request Timeout",
        413 => "Content Too Large",
        431 => "Request Header Fields Too Large",
        501 => "Not Implemented",
        503 => "Service Unavailable",
        505 => "HTTP Version Not Supported",
        _ => "",
    }
}
