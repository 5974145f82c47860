//! The `httpGet` probe, as the kubelet runs it: one GET over HTTP/1.1 (or HTTPS without
//! checking the app's certificate), the group's headers sent (a `Host` header sets the
//! request's Host), and a status from 200 to 399 passes. Redirects are not followed: a 3xx
//! passes, as the kubelet counts a redirect it does not follow.
//!
//! The request is written by hand: a probe needs one request and one status line, and a
//! hand-written request sends the path and headers exactly as the operator wrote them.

use std::net::IpAddr;
use std::sync::{Arc, OnceLock};

use isthmus_proto::model::{HttpHeader, HttpScheme};
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_rustls::TlsConnector;

/// The response head is read up to this size; the status line must be within it.
const MAX_RESPONSE_HEAD: usize = 16 * 1024;
/// Sent unless the group names its own `User-Agent`, so the app's logs tell probes apart.
const USER_AGENT: &str = "isthmus-probe/1.0";

/// One `httpGet` probe, ready to run.
pub(super) struct HttpGet<'a> {
    pub path: &'a str,
    pub port: u16,
    /// Empty: the app's host.
    pub host: &'a str,
    pub scheme: HttpScheme,
    pub headers: &'a [HttpHeader],
}

impl HttpGet<'_> {
    /// The URL as the reason for a failure names it.
    pub fn url(&self, app_host: IpAddr) -> String {
        let scheme = match self.scheme {
            HttpScheme::Http => "http",
            HttpScheme::Https => "https",
        };
        format!(
            "{scheme}://{}{}",
            authority(self.host, app_host, self.port),
            request_target(self.path)
        )
    }

    /// Runs the probe once; `Err` says why it failed.
    pub async fn run(&self, app_host: IpAddr) -> Result<(), String> {
        let url = self.url(app_host);
        let fail = |why: String| format!("GET {url}: {why}");
        let tcp = super::connect(self.host, app_host, self.port)
            .await
            .map_err(fail)?;
        let code = match self.scheme {
            HttpScheme::Http => self.exchange(tcp, app_host).await,
            HttpScheme::Https => {
                let name = server_name(self.host, app_host);
                let tls = connector()
                    .map_err(fail)?
                    .connect(name, tcp)
                    .await
                    .map_err(|e| fail(format!("TLS handshake: {e}")))?;
                self.exchange(tls, app_host).await
            }
        }
        .map_err(fail)?;
        // The kubelet's rule: 200 to 399 passes.
        if (200..400).contains(&code) {
            Ok(())
        } else {
            Err(fail(format!("status {code}")))
        }
    }

    /// Sends the request on `s` and returns the response's status code.
    async fn exchange<S: AsyncRead + AsyncWrite + Unpin>(
        &self,
        mut s: S,
        app_host: IpAddr,
    ) -> Result<u16, String> {
        let request = self.request(app_host);
        s.write_all(request.as_bytes())
            .await
            .map_err(|e| e.to_string())?;
        s.flush().await.map_err(|e| e.to_string())?;
        status_of(&read_head(&mut s).await?)
    }

    fn request(&self, app_host: IpAddr) -> String {
        let named = |n: &str| self.headers.iter().any(|h| h.name.eq_ignore_ascii_case(n));
        let host = self
            .headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case("host"))
            .map(|h| h.value.clone())
            .unwrap_or_else(|| authority(self.host, app_host, self.port));
        let mut r = format!(
            "GET {} HTTP/1.1\r\nHost: {host}\r\n",
            request_target(self.path)
        );
        if !named("user-agent") {
            r += &format!("User-Agent: {USER_AGENT}\r\n");
        }
        if !named("accept") {
            r += "Accept: */*\r\n";
        }
        for h in self
            .headers
            .iter()
            .filter(|h| !h.name.eq_ignore_ascii_case("host"))
        {
            r += &format!("{}: {}\r\n", h.name, h.value);
        }
        r + "Connection: close\r\n\r\n"
    }
}

/// `host:port` as a Host header and a URL carry it (an IPv6 address in brackets).
fn authority(host: &str, app_host: IpAddr, port: u16) -> String {
    let host = if host.is_empty() {
        app_host.to_string()
    } else {
        host.to_string()
    };
    if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

/// The TLS server name: the probe's `host` when it is a DNS name (so the app sees it as SNI),
/// otherwise the address dialled (rustls sends no SNI for an address).
fn server_name(host: &str, app_host: IpAddr) -> ServerName<'static> {
    if let Ok(ip) = host.parse::<IpAddr>() {
        return ServerName::IpAddress(ip.into());
    }
    match ServerName::try_from(host.trim_end_matches('.').to_string()) {
        Ok(name) if !host.is_empty() => name,
        _ => ServerName::IpAddress(app_host.into()),
    }
}

fn connector() -> Result<TlsConnector, String> {
    static CONFIG: OnceLock<Result<Arc<rustls::ClientConfig>, String>> = OnceLock::new();
    CONFIG
        .get_or_init(|| {
            isthmus_proto::tls::probe_client_config()
                .map(Arc::new)
                .map_err(|e| format!("TLS client: {e}"))
        })
        .clone()
        .map(TlsConnector::from)
}

/// The path as a request line can carry it, built as the kubelet builds its URL: a missing
/// leading `/` added, the fragment dropped, and every byte a URI may not hold as it is
/// percent-encoded (escapes already written are kept).
pub(super) fn request_target(path: &str) -> String {
    let path = path.split('#').next().unwrap_or_default();
    let (path, query) = match path.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (path, None),
    };
    let mut out = String::with_capacity(path.len() + 1);
    if !path.starts_with('/') {
        out.push('/');
    }
    encode_into(&mut out, path);
    if let Some(q) = query {
        out.push('?');
        encode_into(&mut out, q);
    }
    out
}

fn encode_into(out: &mut String, s: &str) {
    let bytes = s.as_bytes();
    for (i, &b) in bytes.iter().enumerate() {
        let escape_written = b == b'%'
            && bytes.get(i + 1).is_some_and(u8::is_ascii_hexdigit)
            && bytes.get(i + 2).is_some_and(u8::is_ascii_hexdigit);
        // RFC 3986 pchar and query characters: unreserved, sub-delims, ':', '@', '/', '?'.
        if escape_written || b.is_ascii_alphanumeric() || b"-._~!$&'()*+,;=:@/?".contains(&b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
}

/// Reads until the end of the response head (or the peer closes, or the cap).
async fn read_head<S: AsyncRead + Unpin>(s: &mut S) -> Result<Vec<u8>, String> {
    let mut head = Vec::with_capacity(512);
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < MAX_RESPONSE_HEAD {
        match s.read(&mut buf).await {
            Ok(0) => break,
            Ok(n) => head.extend_from_slice(&buf[..n]),
            // A server that closes without a TLS close_notify after its answer is common;
            // what was read still counts.
            Err(_) if head.contains(&b'\n') => break,
            Err(e) => return Err(e.to_string()),
        }
    }
    Ok(head)
}

fn status_of(head: &[u8]) -> Result<u16, String> {
    let text = String::from_utf8_lossy(head);
    let line = text.lines().next().unwrap_or_default();
    let mut parts = line.split_whitespace();
    match (
        parts.next(),
        parts.next().and_then(|c| c.parse::<u16>().ok()),
    ) {
        (Some(version), Some(code)) if version.starts_with("HTTP/") => Ok(code),
        _ if head.is_empty() => Err("the connection closed without an answer".into()),
        _ => Err(format!(
            "not an HTTP response: {:?}",
            line.chars().take(60).collect::<String>()
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_sent_as_the_kubelet_sends_them() {
        assert_eq!(request_target("/healthz"), "/healthz");
        assert_eq!(request_target("healthz"), "/healthz");
        assert_eq!(
            request_target("/ready?full=1&x=a b"),
            "/ready?full=1&x=a%20b"
        );
        assert_eq!(request_target("/a b/%41%zz"), "/a%20b/%41%25zz");
        assert_eq!(request_target("/x#frag"), "/x");
        assert_eq!(request_target("/caf\u{e9}"), "/caf%C3%A9");
    }

    #[test]
    fn the_host_header_follows_the_groups_host_header() {
        let local: IpAddr = "127.0.0.1".parse().unwrap();
        let headers = [
            HttpHeader {
                name: "host".into(),
                value: "web.example.com".into(),
            },
            HttpHeader {
                name: "X-Probe".into(),
                value: "1".into(),
            },
        ];
        let get = HttpGet {
            path: "/",
            port: 8080,
            host: "",
            scheme: HttpScheme::Http,
            headers: &headers,
        };
        let r = get.request(local);
        assert!(
            r.starts_with("GET / HTTP/1.1\r\nHost: web.example.com\r\n"),
            "{r}"
        );
        assert!(r.contains("\r\nX-Probe: 1\r\n"), "{r}");
        assert_eq!(r.matches("ost:").count(), 1, "{r}");
        let v6 = HttpGet {
            headers: &[],
            ..get
        };
        assert!(v6
            .request("::1".parse().unwrap())
            .contains("Host: [::1]:8080\r\n"));
    }
}
