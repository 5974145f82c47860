//! The sample app the demo and the VM tests run behind each agent: it says who it is and
//! whom it saw, its /healthz follows the healthy file, and bad or slow clients get an
//! answer and a closed connection, never a crash.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use isthmus_tests::harness::process::{workspace_binary, ServerProcess};

const IO_TIMEOUT: Duration = Duration::from_secs(10);

/// The sample app's binary (package `isthmus-sample-app`, in `deploy/sample-app`), built
/// once for all the tests here.
fn sample_app() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| workspace_binary("isthmus-sample-app", "sample-app"))
}

/// Starts the app on a free loopback port; its address comes from the first stdout line.
fn start(extra: &[&str]) -> (ServerProcess, SocketAddr) {
    let mut child = Command::new(sample_app())
        .args(["--listen", "127.0.0.1:0", "--name", "vm-b"])
        .args(extra)
        .stdout(Stdio::piped())
        .spawn()
        .expect("starting sample-app");
    let stdout = child.stdout.take().unwrap();
    let app = ServerProcess::new(child);
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line).unwrap();
    let addr = line
        .trim()
        .strip_prefix("listening on ")
        .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
        .parse()
        .unwrap();
    (app, addr)
}

fn connect(addr: SocketAddr) -> TcpStream {
    let stream = TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    stream
}

#[derive(Debug)]
struct Response {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl Response {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// Reads one response (framed by Content-Length) from `reader`.
fn read_response(reader: &mut impl BufRead, head_only: bool) -> Response {
    let mut status_line = String::new();
    reader.read_line(&mut status_line).unwrap();
    let status = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status in {status_line:?}"));
    let mut headers = Vec::new();
    loop {
        let mut line = String::new();
        reader.read_line(&mut line).unwrap();
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        let (name, value) = line.split_once(':').unwrap();
        headers.push((name.to_string(), value.trim().to_string()));
    }
    let mut response = Response {
        status,
        headers,
        body: String::new(),
    };
    if !head_only {
        let len: usize = response.header("content-length").unwrap().parse().unwrap();
        let mut body = vec![0; len];
        reader.read_exact(&mut body).unwrap();
        response.body = String::from_utf8(body).unwrap();
    }
    response
}

/// Sends `request` on a fresh connection and reads one response.
fn exchange(addr: SocketAddr, request: &[u8]) -> Response {
    let mut stream = connect(addr);
    stream.write_all(request).unwrap();
    read_response(&mut BufReader::new(stream), false)
}

fn get(addr: SocketAddr, path: &str) -> Response {
    exchange(
        addr,
        format!("GET {path} HTTP/1.1\r\nHost: app\r\nConnection: close\r\n\r\n").as_bytes(),
    )
}

/// Whether the server has closed its side: nothing more arrives, then end of stream.
fn closed(reader: &mut impl Read) -> bool {
    let mut rest = Vec::new();
    reader.read_to_end(&mut rest).is_ok() && rest.is_empty()
}

#[test]
fn says_who_it_is_and_whom_it_saw() {
    let (_app, addr) = start(&[]);
    let stream = connect(addr);
    let client = stream.local_addr().unwrap();
    let mut writer = stream.try_clone().unwrap();
    writer
        .write_all(b"GET /anything?x=1 HTTP/1.1\r\nHost: app\r\n\r\n")
        .unwrap();
    let mut reader = BufReader::new(stream);
    let r = read_response(&mut reader, false);
    assert_eq!(r.status, 200);
    assert_eq!(r.body, format!("hello from vm-b\nclient: {client}\n"));
    assert_eq!(r.header("content-type"), Some("text/plain; charset=utf-8"));
    assert_eq!(r.header("connection"), None);

    // Keep-alive: the same connection serves the next request, a POST whose body is skipped,
    // and then one that asks to close.
    writer
        .write_all(b"POST /submit HTTP/1.1\r\nHost: app\r\nContent-Length: 5\r\n\r\nhello")
        .unwrap();
    let r = read_response(&mut reader, false);
    assert_eq!(r.status, 200);
    assert_eq!(r.body, format!("hello from vm-b\nclient: {client}\n"));
    writer
        .write_all(b"HEAD / HTTP/1.1\r\nHost: app\r\nConnection: close\r\n\r\n")
        .unwrap();
    let r = read_response(&mut reader, true);
    assert_eq!(r.status, 200);
    assert_eq!(r.header("connection"), Some("close"));
    assert!(closed(&mut reader), "HEAD sends no body and then closes");
}

#[test]
fn pipelined_and_http10_requests() {
    let (_app, addr) = start(&[]);
    let mut stream = connect(addr);
    stream
        .write_all(b"GET /a HTTP/1.1\r\nHost: app\r\n\r\nGET /b HTTP/1.1\r\nHost: app\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut reader = BufReader::new(stream);
    assert_eq!(read_response(&mut reader, false).status, 200);
    assert_eq!(read_response(&mut reader, false).status, 200);
    assert!(closed(&mut reader));

    // HTTP/1.0 closes unless asked to keep the connection.
    let mut stream = connect(addr);
    stream.write_all(b"GET / HTTP/1.0\r\n\r\n").unwrap();
    let mut reader = BufReader::new(stream);
    let r = read_response(&mut reader, false);
    assert_eq!((r.status, r.header("connection")), (200, Some("close")));
    assert!(closed(&mut reader));

    let mut stream = connect(addr);
    stream
        .write_all(b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\nGET /healthz HTTP/1.0\r\n\r\n")
        .unwrap();
    let mut reader = BufReader::new(stream);
    let r = read_response(&mut reader, false);
    assert_eq!(
        (r.status, r.header("connection")),
        (200, Some("keep-alive"))
    );
    let r = read_response(&mut reader, false);
    assert_eq!((r.status, r.body.as_str()), (200, "ok\n"));
    assert!(closed(&mut reader));
}

#[test]
fn healthz_follows_the_healthy_file() {
    let (_app, addr) = start(&[]);
    let r = get(addr, "/healthz");
    assert_eq!((r.status, r.body.as_str()), (200, "ok\n"));

    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("healthy");
    let (_app, addr) = start(&["--healthy-file", file.to_str().unwrap()]);
    let r = get(addr, "/healthz");
    assert_eq!(r.status, 503);
    assert!(r.body.contains(file.to_str().unwrap()), "{}", r.body);
    // Only /healthz follows the file.
    assert_eq!(get(addr, "/").status, 200);

    std::fs::write(&file, "").unwrap();
    assert_eq!(get(addr, "/healthz").status, 200);
    assert_eq!(get(addr, "/healthz?probe=1").status, 200);
    std::fs::remove_file(&file).unwrap();
    assert_eq!(get(addr, "/healthz").status, 503);
    assert!(!Path::new(&file).exists());
}

#[test]
fn bad_requests_get_an_answer_and_a_closed_connection() {
    let (_app, addr) = start(&[]);
    let cases: &[(&[u8], u16)] = &[
        (b"garbage\r\n\r\n", 400),
        (b"GET /\r\n\r\n", 400),
        (b"GET / HTTP/1.1 extra\r\n\r\n", 400),
        (b"GET nopath HTTP/1.1\r\n\r\n", 400),
        (b"G(T / HTTP/1.1\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nno colon here\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: a\r\n folded\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nContent-Length: lots\r\n\r\n", 400),
        (
            b"GET / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
            400,
        ),
        (b"GET /\xff\xfe HTTP/1.1\r\n\r\n", 400),
        (b"GET / HTTP/2.0\r\n\r\n", 505),
        (
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
            501,
        ),
        (b"POST / HTTP/1.1\r\nContent-Length: 999999999\r\n\r\n", 413),
    ];
    for (request, status) in cases {
        let mut stream = connect(addr);
        stream.write_all(request).unwrap();
        let mut reader = BufReader::new(stream);
        let r = read_response(&mut reader, false);
        let shown = String::from_utf8_lossy(request);
        assert_eq!(r.status, *status, "{shown:?}");
        assert_eq!(r.header("connection"), Some("close"), "{shown:?}");
        assert!(closed(&mut reader), "{shown:?} left the connection open");
    }

    // A head past 8 KiB, sent whole: refused, and the answer arrives despite the unread rest.
    let mut huge = b"GET / HTTP/1.1\r\nHost: app\r\n".to_vec();
    for i in 0..300 {
        huge.extend_from_slice(format!("X-Filler-{i}: {}\r\n", "y".repeat(32)).as_bytes());
    }
    huge.extend_from_slice(b"\r\n");
    assert_eq!(exchange(addr, &huge).status, 431);

    // A client that stops mid-request.
    let mut stream = connect(addr);
    stream.write_all(b"GET / HTTP/1.1\r\nHost").unwrap();
    stream.shutdown(Shutdown::Write).unwrap();
    assert_eq!(
        read_response(&mut BufReader::new(stream), false).status,
        400
    );

    // Still serving.
    assert_eq!(get(addr, "/").status, 200);
}

#[test]
fn slow_and_idle_clients_are_timed_out() {
    let (_app, addr) = start(&["--header-timeout", "300ms"]);

    let mut stream = connect(addr);
    stream.write_all(b"GET / HTTP/1.1\r\nHo").unwrap();
    let mut reader = BufReader::new(stream);
    let r = read_response(&mut reader, false);
    assert_eq!(r.status, 408);
    assert!(closed(&mut reader));

    // An idle connection is closed without a word.
    let mut stream = connect(addr);
    assert!(closed(&mut stream));

    // A body that never comes.
    let mut stream = connect(addr);
    stream
        .write_all(b"POST / HTTP/1.1\r\nContent-Length: 10\r\n\r\nabc")
        .unwrap();
    assert_eq!(
        read_response(&mut BufReader::new(stream), false).status,
        408
    );

    assert_eq!(get(addr, "/").status, 200);
}
