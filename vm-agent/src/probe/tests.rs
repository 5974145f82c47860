//! Every probe method passing and failing against real servers started here on loopback: an
//! HTTP server, an HTTPS server with a self-signed certificate, a gRPC health server, a TCP
//! listener, and commands that exit 0, exit non-zero and hang.

use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};

use isthmus_proto::model::{HttpHeader, HttpScheme};
use isthmus_proto::pb::health::health_check_response::ServingStatus;
use isthmus_proto::pb::health::health_server::{Health, HealthServer};
use isthmus_proto::pb::health::{HealthCheckRequest, HealthCheckResponse};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;

use super::*;

const LOCAL: IpAddr = IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);
const T: Duration = Duration::from_secs(5);

#[test]
fn an_exec_probe_runs_without_the_agents_systemd_variables() {
    let cmd = exec::command("sh", &["-c".into(), "true".into()]);
    crate::notify::tests::assert_no_notify_env(cmd.as_std());
}

fn schedule(success: u32, failure: u32) -> Schedule {
    Schedule {
        initial_delay: Duration::ZERO,
        period: Duration::from_secs(1),
        timeout: Duration::from_secs(1),
        success_threshold: success,
        failure_threshold: failure,
    }
}

#[test]
fn thresholds_count_consecutive_results() {
    let s = schedule(2, 3);
    let mut v = Verdict::new();
    assert!(!v.record(true, &s));
    assert!(v.record(true, &s));
    assert!(v.record(false, &s));
    assert!(v.record(false, &s));
    assert!(v.record(true, &s), "a pass resets the failure count");
    assert!(v.record(false, &s));
    assert!(v.record(false, &s));
    assert!(!v.record(false, &s), "three failures in a row");
    assert!(!v.record(true, &s));
    assert!(v.record(true, &s));
}

#[test]
fn zero_fields_mean_what_they_mean_in_istios_agent() {
    let p = Probe {
        initial_delay_seconds: 0,
        period_seconds: 0,
        timeout_seconds: 0,
        success_threshold: 0,
        failure_threshold: 0,
        action: ProbeAction::Exec {
            command: vec!["true".into()],
        },
    };
    assert_eq!(
        Schedule::of(&p),
        Schedule {
            initial_delay: Duration::ZERO,
            period: Duration::from_secs(10),
            timeout: Duration::from_secs(1),
            success_threshold: 1,
            failure_threshold: 1,
        }
    );
}

/// An HTTP/1.1 server answering each connection with the next of `answers` (a status and
/// extra header lines), over TLS when `tls` is given; returns its port and every request head
/// it read (with the TLS server name the client sent, if any).
async fn http_server(
    answers: &'static [(u16, &'static str)],
    tls: Option<Arc<rustls::ServerConfig>>,
) -> (u16, Arc<Mutex<Vec<(Option<String>, String)>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = seen.clone();
    tokio::spawn(async move {
        for (status, extra) in answers {
            let (tcp, _) = listener.accept().await.unwrap();
            let answer = format!("HTTP/1.1 {status} X\r\n{extra}Content-Length: 0\r\n\r\n");
            match &tls {
                None => {
                    let head = answer_on(tcp, &answer).await;
                    log.lock().unwrap().push((None, head));
                }
                Some(cfg) => {
                    let Ok(s) = tokio_rustls::TlsAcceptor::from(cfg.clone())
                        .accept(tcp)
                        .await
                    else {
                        continue;
                    };
                    let sni = s.get_ref().1.server_name().map(str::to_string);
                    let head = answer_on(s, &answer).await;
                    log.lock().unwrap().push((sni, head));
                }
            }
        }
    });
    (port, seen)
}

async fn answer_on<S: AsyncRead + AsyncWrite + Unpin>(mut s: S, answer: &str) -> String {
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        match s.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
    }
    let _ = s.write_all(answer.as_bytes()).await;
    let _ = s.shutdown().await;
    String::from_utf8_lossy(&head).into_owned()
}

fn http_get(port: u16, host: &str, scheme: HttpScheme, headers: Vec<HttpHeader>) -> ProbeAction {
    ProbeAction::HttpGet {
        path: "healthz?full=1".into(),
        port,
        host: host.into(),
        scheme,
        headers,
    }
}

#[tokio::test]
async fn http_get_passes_on_2xx_and_3xx_fails_otherwise_and_sends_the_groups_headers() {
    let (port, seen) = http_server(&[(200, ""), (302, ""), (503, "")], None).await;
    let headers = vec![
        HttpHeader {
            name: "Host".into(),
            value: "web.example.com".into(),
        },
        HttpHeader {
            name: "X-Probe".into(),
            value: "yes".into(),
        },
    ];
    let get = http_get(port, "", HttpScheme::Http, headers);
    assert_eq!(try_once(&get, LOCAL, T).await, Ok(()));
    assert_eq!(try_once(&get, LOCAL, T).await, Ok(()), "a 302 passes");
    let err = try_once(&get, LOCAL, T).await.unwrap_err();
    assert!(err.contains("status 503"), "{err}");
    let head = seen.lock().unwrap()[0].1.clone();
    assert!(
        head.starts_with("GET /healthz?full=1 HTTP/1.1\r\nHost: web.example.com\r\n"),
        "{head}"
    );
    assert!(head.contains("\r\nX-Probe: yes\r\n"), "{head}");
    // Nothing listens any more.
    let err = try_once(&get, LOCAL, T).await.unwrap_err();
    assert!(err.contains("refused"), "{err}");
}

#[tokio::test]
async fn redirects_to_the_same_host_are_followed_and_others_pass() {
    // /healthz -> /healthz/ (503): the redirect is judged by where it leads.
    let (port, seen) = http_server(
        &[
            (301, "Location: /healthz/\r\n"),
            (503, ""),
            (302, "Location: ready\r\n"),
            (200, ""),
            (302, "Location: https://elsewhere.example/login\r\n"),
        ],
        None,
    )
    .await;
    let get = ProbeAction::HttpGet {
        path: "/healthz".into(),
        port,
        host: String::new(),
        scheme: HttpScheme::Http,
        headers: vec![],
    };
    let err = try_once(&get, LOCAL, T).await.unwrap_err();
    assert!(err.contains("/healthz/: status 503"), "{err}");
    assert_eq!(try_once(&get, LOCAL, T).await, Ok(()), "relative: /ready");
    assert_eq!(
        try_once(&get, LOCAL, T).await,
        Ok(()),
        "another host: not followed, passes"
    );
    let paths: Vec<String> = seen
        .lock()
        .unwrap()
        .iter()
        .map(|(_, head)| head.lines().next().unwrap_or_default().to_string())
        .collect();
    assert_eq!(
        paths,
        [
            "GET /healthz HTTP/1.1",
            "GET /healthz/ HTTP/1.1",
            "GET /healthz HTTP/1.1",
            "GET /ready HTTP/1.1",
            "GET /healthz HTTP/1.1",
        ]
    );
}

#[tokio::test]
async fn a_redirect_loop_fails_after_ten() {
    let answers: &'static [(u16, &'static str)] = &[(302, "Location: /again\r\n"); 10];
    let (port, _) = http_server(answers, None).await;
    let err = try_once(&http_get(port, "", HttpScheme::Http, vec![]), LOCAL, T)
        .await
        .unwrap_err();
    assert!(err.contains("stopped after 10 redirects"), "{err}");
}

/// A TLS server config with a self-signed certificate for `localhost` (the kubelet's rule:
/// no certificate check, so any certificate does).
fn self_signed() -> Arc<rustls::ServerConfig> {
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["localhost".to_string()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    let key = rustls::pki_types::PrivateKeyDer::try_from(key.serialize_der()).unwrap();
    let cfg = rustls::ServerConfig::builder_with_provider(isthmus_proto::tls::provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![cert.der().clone()], key)
        .unwrap();
    Arc::new(cfg)
}

#[tokio::test]
async fn https_get_takes_any_certificate_and_names_its_host_in_sni() {
    let (port, seen) = http_server(&[(200, ""), (500, ""), (204, "")], Some(self_signed())).await;
    // A named host: the name is resolved and sent as SNI.
    let named = http_get(port, "localhost", HttpScheme::Https, vec![]);
    assert_eq!(try_once(&named, LOCAL, T).await, Ok(()));
    let err = try_once(&named, LOCAL, T).await.unwrap_err();
    assert!(err.contains("status 500"), "{err}");
    // The app's own address: no SNI.
    let by_address = http_get(port, "", HttpScheme::Https, vec![]);
    assert_eq!(try_once(&by_address, LOCAL, T).await, Ok(()));
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen[0].0.as_deref(), Some("localhost"));
    assert!(
        seen[0].1.contains(&format!("Host: localhost:{port}\r\n")),
        "{}",
        seen[0].1
    );
    assert_eq!(seen[2].0, None);
}

#[tokio::test]
async fn https_against_a_plain_http_server_fails_in_the_handshake() {
    // A plain server answers the ClientHello with an HTTP error, as plain servers do.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        let _ = s.write_all(b"HTTP/1.1 400 Bad Request\r\n\r\n").await;
        let _ = s.shutdown().await;
    });
    let get = http_get(port, "", HttpScheme::Https, vec![]);
    let err = try_once(&get, LOCAL, T).await.unwrap_err();
    assert!(err.contains("TLS handshake"), "{err}");
}

/// Answers Check: "" and "shop.Cart" serving, "shop.Down" not serving, anything else unknown.
struct Checks;

#[tonic::async_trait]
impl Health for Checks {
    async fn check(
        &self,
        req: tonic::Request<HealthCheckRequest>,
    ) -> Result<tonic::Response<HealthCheckResponse>, tonic::Status> {
        let status = match req.into_inner().service.as_str() {
            "" | "shop.Cart" => ServingStatus::Serving,
            "shop.Down" => ServingStatus::NotServing,
            other => return Err(tonic::Status::not_found(format!("no service {other}"))),
        };
        Ok(tonic::Response::new(HealthCheckResponse {
            status: status.into(),
        }))
    }
}

async fn grpc_server() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(HealthServer::new(Checks))
            .serve_with_incoming(incoming),
    );
    port
}

#[tokio::test]
async fn grpc_health_check_passes_only_when_serving() {
    let port = grpc_server().await;
    let grpc = |service: &str| ProbeAction::Grpc {
        port,
        service: service.into(),
    };
    assert_eq!(try_once(&grpc(""), LOCAL, T).await, Ok(()));
    assert_eq!(try_once(&grpc("shop.Cart"), LOCAL, T).await, Ok(()));
    let err = try_once(&grpc("shop.Down"), LOCAL, T).await.unwrap_err();
    assert!(err.contains("NOT_SERVING"), "{err}");
    let err = try_once(&grpc("shop.Gone"), LOCAL, T).await.unwrap_err();
    assert!(err.contains("NotFound"), "{err}");
    // An HTTP/1 server on the port: not a gRPC health server.
    let (http_port, _) = http_server(&[(200, "")], None).await;
    let not_grpc = ProbeAction::Grpc {
        port: http_port,
        service: String::new(),
    };
    assert!(try_once(&not_grpc, LOCAL, T).await.is_err());
    // Nothing listening.
    let free = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let closed = free.local_addr().unwrap().port();
    drop(free);
    let err = try_once(
        &ProbeAction::Grpc {
            port: closed,
            service: String::new(),
        },
        LOCAL,
        T,
    )
    .await
    .unwrap_err();
    assert!(err.contains("cannot connect"), "{err}");
}

#[tokio::test]
async fn tcp_socket_passes_while_something_listens() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let tcp = ProbeAction::TcpSocket {
        host: String::new(),
        port,
    };
    assert_eq!(try_once(&tcp, LOCAL, T).await, Ok(()));
    let named = ProbeAction::TcpSocket {
        host: "localhost".into(),
        port,
    };
    assert_eq!(try_once(&named, LOCAL, T).await, Ok(()));
    drop(listener);
    let err = try_once(&tcp, LOCAL, T).await.unwrap_err();
    assert!(err.contains("refused"), "{err}");
}

#[tokio::test]
async fn exec_passes_on_exit_0_and_names_the_failure() {
    let run = |argv: &[&str]| ProbeAction::Exec {
        command: argv.iter().map(|s| s.to_string()).collect(),
    };
    assert_eq!(try_once(&run(&["true"]), LOCAL, T).await, Ok(()));
    let err = try_once(&run(&["false"]), LOCAL, T).await.unwrap_err();
    assert!(
        err.contains("exec false") && err.contains("exit status: 1"),
        "{err}"
    );
    let err = try_once(&run(&["sh", "-c", "echo broken >&2; exit 3"]), LOCAL, T)
        .await
        .unwrap_err();
    assert!(err.contains("broken"), "{err}");
    let err = try_once(&run(&["/no/such/program"]), LOCAL, T)
        .await
        .unwrap_err();
    assert!(err.contains("/no/such/program"), "{err}");
}

#[tokio::test]
async fn a_hung_exec_probe_is_killed_with_what_it_started() {
    let dir = tempfile::tempdir().unwrap();
    let pid_file = dir.path().join("pid");
    let script = format!("sleep 30 & echo $! > {}; wait", pid_file.display());
    let hang = ProbeAction::Exec {
        command: vec!["sh".into(), "-c".into(), script],
    };
    let started = std::time::Instant::now();
    let err = try_once(&hang, LOCAL, Duration::from_millis(500))
        .await
        .unwrap_err();
    assert!(err.contains("killed"), "{err}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    // The command's own child went with it: gone, or a zombie awaiting its reaper.
    let pid = std::fs::read_to_string(&pid_file).unwrap();
    let stat = format!("/proc/{}/stat", pid.trim());
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        match std::fs::read_to_string(&stat) {
            Err(_) => break,
            Ok(s)
                if s.rsplit(')')
                    .next()
                    .unwrap_or("")
                    .trim_start()
                    .starts_with('Z') =>
            {
                break
            }
            Ok(s) => {
                assert!(std::time::Instant::now() < deadline, "still running: {s}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

#[tokio::test]
async fn a_probe_that_does_not_answer_in_time_fails_naming_what_it_tried() {
    // A listener that never accepts: the connection completes (backlog) but no answer comes.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let get = http_get(port, "", HttpScheme::Http, vec![]);
    let err = try_once(&get, LOCAL, Duration::from_millis(300))
        .await
        .unwrap_err();
    assert!(
        err.contains("no answer within") && err.contains(&SocketAddr::new(LOCAL, port).to_string()),
        "{err}"
    );
    drop(listener);
}
