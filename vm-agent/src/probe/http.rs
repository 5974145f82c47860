//! The `httpGet` probe, as the kubelet runs it: a GET over HTTP/1.1 (or HTTPS without checking
//! the app's certificate), the group's headers sent (a `Host` header sets the request's Host),
//! and a status from 200 to 399 passes. A redirect to the same host name is followed (at most
//! 10), so `/healthz` answering `301 /healthz/` is judged by what `/healthz/` says; a redirect
//! elsewhere is not followed and passes, as the kubelet counts it.
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
/// The kubelet's (Go's) limit: the tenth redirect answered fails the try.
const MAX_REDIRECTS: usize = 10;

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

    /// Runs the probe once, following redirects to the same host; `Err` says why it failed.
    pub async fn run(&self, app_host: IpAddr) -> Result<(), String> {
        let origin = hostname(self.host, app_host);
        let (mut scheme, mut host, mut port, mut path) = (
            self.scheme,
            self.host.to_string(),
            self.port,
            self.path.to_string(),
        );
        for _ in 0..MAX_REDIRECTS {
            let hop = HttpGet {
                path: &path,
                port,
                host: &host,
                scheme,
                headers: self.headers,
            };
            let (code, location) = hop.once(app_host).await?;
            let next = location
                .filter(|_| (300..400).contains(&code))
                .and_then(|l| hop.redirect(&l, app_host))
                .filter(|(_, h, _, _)| hostname(h, app_host).eq_ignore_ascii_case(&origin));
            // The kubelet's rule: 200 to 399 passes (a redirect elsewhere among them).
            let Some(next) = next else {
                return if (200..400).contains(&code) {
                    Ok(())
                } else {
                    Err(format!("GET {}: status {code}", hop.url(app_host)))
                };
            };
            (scheme, host, port, path) = next;
        }
        Err(format!(
            "GET {}: stopped after {MAX_REDIRECTS} redirects",
            self.url(app_host)
        ))
    }

    /// Where a redirect to `location` leads: scheme, host (empty: the app's host), port and
    /// path; `None` when it is no URL the probe can follow.
    fn redirect(
        &self,
        location: &str,
        app_host: IpAddr,
    ) -> Option<(HttpScheme, String, u16, String)> {
        let location = location.trim();
        let same = (self.scheme, self.host.to_string(), self.port);
        let absolute = location.split_once("://").filter(|(s, _)| {
            !s.is_empty()
                && s.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"+-.".contains(&b))
        });
        let (scheme, rest) = if let Some(rest) = location.strip_prefix("//") {
            (self.scheme, rest)
        } else if location.starts_with('/') {
            return Some((same.0, same.1, same.2, location.to_string()));
        } else if let Some((s, rest)) = absolute {
            let scheme = match s.to_ascii_lowercase().as_str() {
                "http" => HttpScheme::Http,
                "https" => HttpScheme::Https,
                _ => return None,
            };
            (scheme, rest)
        } else {
            // Relative to the current path's directory.
            let base = request_target(self.path);
            let dir = base.split('?').next().unwrap_or("/");
            let dir = &dir[..=dir.rfind('/').unwrap_or(0)];
            return Some((same.0, same.1, same.2, format!("{dir}{location}")));
        };
        let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
        let (authority, path) = rest.split_at(end);
        let authority = authority.rsplit('@').next().unwrap_or(authority);
        let default_port = match scheme {
            HttpScheme::Http => 80,
            HttpScheme::Https => 443,
        };
        let (host, port) = match authority.strip_prefix('[') {
            Some(v6) => {
                let (h, p) = v6.split_once(']')?;
                (h, p.strip_prefix(':'))
            }
            None => match authority.rsplit_once(':') {
                Some((h, p)) => (h, Some(p)),
                None => (authority, None),
            },
        };
        let port = match port {
            None | Some("") => default_port,
            Some(p) => p.parse().ok()?,
        };
        let host = if host.eq_ignore_ascii_case(&hostname(self.host, app_host)) {
            self.host.to_string()
        } else {
            host.to_string()
        };
        let path = if path.is_empty() { "/" } else { path };
        Some((scheme, host, port, path.to_string()))
    }

    /// One request and its answer: the status code and the `Location` header, if any.
    async fn once(&self, app_host: IpAddr) -> Result<(u16, Option<String>), String> {
        let url = self.url(app_host);
        let fail = |why: String| format!("GET {url}: {why}");
        let tcp = super::connect(self.host, app_host, self.port)
            .await
            .map_err(fail)?;
        match self.scheme {
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
        .map_err(fail)
    }

    /// Sends the request on `s` and returns the response's status code and `Location`.
    async fn exchange<S: AsyncRead + AsyncWrite + Unpin>(
        &self,
        mut s: S,
        app_host: IpAddr,
    ) -> Result<(u16, Option<String>), String> {
        let request = self.request(app_host);
        s.write_all(request.as_bytes())
            .await
            .map_err(|e| e.to_string())?;
        s.flush().await.map_err(|e| e.to_string())?;
        let head = read_head(&mut s).await?;
        Ok((status_of(&head)?, location_of(&head)))
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

/// The host name a probe's URL has: its `host`, else the app's address.
fn hostname(host: &str, app_host: IpAddr) -> String {
    if host.is_empty() {
        app_host.to_string()
    } else {
        host.trim_end_matches('.').to_string()
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

fn location_of(head: &[u8]) -> Option<String> {
    String::from_utf8_lossy(head)
        .lines()
        .skip(1)
        .take_while(|l| !l.is_empty())
        .find_map(|l| {
            let (name, value) = l.split_once(':')?;
            name.trim()
                .eq_ignore_ascii_case("location")
                .then(|| value.trim().to_string())
        })
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
    fn redirect_locations_resolve_as_a_browser_would() {
        let local: IpAddr = "127.0.0.1".parse().unwrap();
        let get = HttpGet {
            path: "/app/healthz",
            port: 8080,
            host: "",
            scheme: HttpScheme::Http,
            headers: &[],
        };
        let to = |l: &str| get.redirect(l, local);
        let here = |path: &str| Some((HttpScheme::Http, String::new(), 8080, path.to_string()));
        assert_eq!(to("/login?next=http://x/"), here("/login?next=http://x/"));
        assert_eq!(to("ready"), here("/app/ready"));
        assert_eq!(
            to("https://127.0.0.1:8443/ok"),
            Some((HttpScheme::Https, String::new(), 8443, "/ok".into()))
        );
        assert_eq!(
            to("http://other.example"),
            Some((HttpScheme::Http, "other.example".into(), 80, "/".into()))
        );
        assert_eq!(
            to("//[::1]/x"),
            Some((HttpScheme::Http, "::1".into(), 80, "/x".into()))
        );
        assert_eq!(to("ftp://127.0.0.1/x"), None);
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
