//! Sidecar mode: the same agent in a Kubernetes pod, injected by the registry's webhook.
//!
//! What differs from a VM, and nothing else:
//!
//! - **Who it is** comes from the pod (the downward API: name, namespace, service
//!   account, IP), not from an onboarding bundle; the mesh root comes from the
//!   `isthmus-ca-root-cert` ConfigMap the registry publishes into the namespace.
//! - **Its certificate** is asked for with the pod's projected service-account token (its
//!   audience the CA's, `isthmus-ca`): the CA checks it with a TokenReview against the
//!   pod's cluster and signs exactly the token's identity. Renewals send the token again
//!   (the kubelet keeps it fresh), so a sidecar whose certificate lapsed, say while the
//!   registry was away, recovers by itself.
//! - **No registration**: the registry's Kubernetes source knows the pod already.
//! - **Capture** is installed once by the pod's init container (`capture-init`, which has
//!   `NET_ADMIN`), for whole address ranges, with the sidecar's uid exempt; the sidecar
//!   itself runs without privileges and never touches the rules. A captured connection to
//!   an address the catalog does not know is passed through as it is, as Istio's
//!   sidecar does.
//! - **The app's probes**, rewritten by the injector to the agent's health port, are run
//!   by the agent against the app ([`AppProbers`]).

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::Duration;

use isthmus_proto::bundle::AgentBundle;
use isthmus_proto::certs::{self, CertsError};
use isthmus_proto::config::ConfigProblems;
use isthmus_proto::identity::SpiffeId;
use isthmus_proto::model::{HttpHeader, HttpScheme, ProbeAction};
use isthmus_proto::pb;
use isthmus_proto::subscription::RegistrySettings;
use isthmus_proto::tls::Credentials;
use serde::{Deserialize, Serialize};

/// Where the injector mounts the projected service-account token.
pub const DEFAULT_TOKEN_PATH: &str = "/var/run/secrets/tokens/isthmus-token";
/// Where the injector mounts the `isthmus-ca-root-cert` ConfigMap (`root-cert.pem`).
pub const DEFAULT_ROOT_DIR: &str = "/var/run/secrets/isthmus";
/// The uid the sidecar runs as, exempt from capture (Istio's 1337, so existing
/// PodSecurity exceptions and network policies keep fitting).
pub const SIDECAR_UID: u32 = 1337;
/// What a pod's init step captures outbound by default: the mesh's allocated VIPs and the
/// usual service CIDR of a cluster (set the cluster's own with `--capture-cidr`).
pub const DEFAULT_CAPTURE_CIDRS: &str = "240.240.0.0/16,10.96.0.0/12";
/// Inbound ports never captured in a pod: the sidecar's own tunnel port (tunnels end at the
/// sidecar, not the app), and its health and metrics ports, which the kubelet and scrapers
/// reach in plain text.
pub const DEFAULT_POD_EXCLUDED_INBOUND: &str = "15008,15020,15021";
/// A projected token is about a kilobyte; anything much larger is the wrong file.
const MAX_TOKEN_BYTES: u64 = 64 * 1024;

/// Who the pod is and where its registry is.
#[derive(Debug, Clone, Serialize)]
pub struct PodConfig {
    /// The registry's gRPC address, `host:port`.
    pub registry: String,
    pub cluster: String,
    pub network: String,
    pub namespace: String,
    pub name: String,
    pub service_account: String,
    pub token_path: PathBuf,
    /// `None`: read from the mesh root.
    pub trust_domain: Option<String>,
    /// The app's probes, by the health-port path the injector rewrote them to.
    pub app_probers: AppProbers,
}

impl PodConfig {
    /// Every missing or bad field at once, each named by its flag and variable.
    pub fn check(&self, p: &mut ConfigProblems) {
        for (flag, value) in [
            ("--registry (ISTHMUS_REGISTRY)", &self.registry),
            ("--cluster (ISTHMUS_CLUSTER)", &self.cluster),
            ("--network (ISTHMUS_NETWORK)", &self.network),
            ("--pod-name (POD_NAME)", &self.name),
            ("--pod-namespace (POD_NAMESPACE)", &self.namespace),
            ("--service-account (SERVICE_ACCOUNT)", &self.service_account),
        ] {
            p.check(!value.trim().is_empty(), flag, || {
                "is empty; the injector sets it from the pod (is this pod injected?)".into()
            });
        }
        if !self.registry.is_empty() {
            p.check(
                self.registry.rsplit_once(':').is_some(),
                "--registry",
                || format!("{:?} is not HOST:PORT", self.registry),
            );
        }
    }

    /// The pod as the rest of the agent knows a VM: a bundle without a token, its group
    /// the pod's name.
    pub fn bundle(&self, trust_domain: &str) -> AgentBundle {
        AgentBundle {
            registry: self.registry.clone(),
            trust_domain: trust_domain.to_string(),
            cluster: self.cluster.clone(),
            network: self.network.clone(),
            group: self.name.clone(),
            namespace: self.namespace.clone(),
            service_account: self.service_account.clone(),
        }
    }

    /// The projected token, read afresh each time (the kubelet rotates it in place).
    pub fn read_token(&self) -> Result<String, PodError> {
        let path = &self.token_path;
        let mut text = String::new();
        std::fs::File::open(path)
            .and_then(|f| f.take(MAX_TOKEN_BYTES + 1).read_to_string(&mut text))
            .map_err(|source| PodError::Token {
                path: path.clone(),
                source,
            })?;
        let token = text.trim();
        if token.is_empty() || text.len() as u64 > MAX_TOKEN_BYTES {
            return Err(PodError::BadToken {
                path: path.clone(),
                why: if token.is_empty() {
                    "it is empty".into()
                } else {
                    format!("it is larger than {MAX_TOKEN_BYTES} bytes")
                },
            });
        }
        Ok(token.to_string())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PodError {
    #[error(
        "cannot read the pod's service-account token {}: {source}; the injector mounts it \
         (a projected token with the CA's audience): is this pod injected, and is \
         --token the mount's path?",
        .path.display()
    )]
    Token {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the pod's service-account token {} is unusable: {why}", .path.display())]
    BadToken { path: PathBuf, why: String },
    #[error("the registry's CA refused the pod's service-account token for {identity}: {source}")]
    Refused {
        identity: String,
        #[source]
        source: CertsError,
    },
}

/// Asks the CA for a certificate of `identity` with the pod's token, and keeps the key and
/// chain in the registry settings' certificate directory.
pub async fn request_certificate(
    registry: &RegistrySettings,
    pod: &PodConfig,
    identity: &SpiffeId,
) -> Result<Credentials, PodError> {
    let token = pod.read_token()?;
    let refused = |source| PodError::Refused {
        identity: identity.to_string(),
        source,
    };
    let req = pb::CertificateRequest {
        kubernetes_token: token,
        cluster: pod.cluster.clone(),
        ..Default::default()
    };
    certs::obtain(registry, None, identity, req, &registry.cert_dir)
        .await
        .map_err(refused)
}

/// The app's probes the injector moved onto the agent's health port
/// (`ISTHMUS_APP_PROBERS`): each health-port path, the probe it stands for. The kubelet
/// keeps the probe's timing and thresholds; the agent runs one try per request.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct AppProbers(pub BTreeMap<String, AppProbe>);

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AppProbe {
    #[serde(skip)]
    pub action: ProbeAction,
    /// What `/config_dump` shows of the action (header values left out).
    pub summary: String,
    pub timeout: Duration,
}

/// One entry of `ISTHMUS_APP_PROBERS`, as the injector writes it (Kubernetes' field names).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct ProberSpec {
    http_get: Option<HttpGetSpec>,
    tcp_socket: Option<PortSpec>,
    grpc: Option<GrpcSpec>,
    #[serde(default)]
    timeout_seconds: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct HttpGetSpec {
    #[serde(default)]
    path: String,
    port: u16,
    #[serde(default)]
    host: String,
    #[serde(default)]
    scheme: Option<String>,
    #[serde(default)]
    http_headers: Vec<HeaderSpec>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct HeaderSpec {
    name: String,
    value: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PortSpec {
    port: u16,
    #[serde(default)]
    host: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct GrpcSpec {
    port: u16,
    #[serde(default)]
    service: String,
}

/// Kubernetes' default probe timeout.
const DEFAULT_PROBE_TIMEOUT_S: u64 = 1;

impl AppProbers {
    /// Parses `ISTHMUS_APP_PROBERS`; empty means none. Errors name the entry and field.
    pub fn parse(json: &str) -> Result<Self, String> {
        if json.trim().is_empty() {
            return Ok(Self::default());
        }
        let specs: BTreeMap<String, serde_json::Value> = serde_json::from_str(json)
            .map_err(|e| format!("not a JSON object of health-port paths to probes: {e}"))?;
        let mut probers = BTreeMap::new();
        for (path, value) in specs {
            if !path.starts_with("/app-health/") {
                return Err(format!(
                    "{path:?}: the injector's paths start with /app-health/<container>/"
                ));
            }
            let spec: ProberSpec = serde_path_to_error::deserialize(value)
                .map_err(|e| format!("{path:?}: {}: {}", e.path(), e.inner()))?;
            probers.insert(
                path.clone(),
                spec.into_probe().map_err(|e| format!("{path:?}: {e}"))?,
            );
        }
        Ok(Self(probers))
    }
}

impl ProberSpec {
    fn into_probe(self) -> Result<AppProbe, String> {
        let zero = |port: u16| {
            if port == 0 {
                Err(
                    "port 0 cannot be probed (a named port the injector could not resolve?)"
                        .to_string(),
                )
            } else {
                Ok(port)
            }
        };
        let (action, summary) = match (self.http_get, self.tcp_socket, self.grpc) {
            (Some(h), None, None) => {
                let scheme = match h.scheme.as_deref().unwrap_or("HTTP") {
                    s if s.eq_ignore_ascii_case("http") => HttpScheme::Http,
                    s if s.eq_ignore_ascii_case("https") => HttpScheme::Https,
                    other => return Err(format!("httpGet.scheme {other:?} is not HTTP or HTTPS")),
                };
                let summary = format!("httpGet {}:{}{}", scheme.as_str(), h.port, h.path);
                let action = ProbeAction::HttpGet {
                    path: if h.path.is_empty() {
                        "/".into()
                    } else {
                        h.path
                    },
                    port: zero(h.port)?,
                    host: h.host,
                    scheme,
                    headers: h
                        .http_headers
                        .into_iter()
                        .map(|x| HttpHeader {
                            name: x.name,
                            value: x.value,
                        })
                        .collect(),
                };
                (action, summary)
            }
            (None, Some(t), None) => (
                ProbeAction::TcpSocket {
                    host: t.host,
                    port: zero(t.port)?,
                },
                format!("tcpSocket {}", t.port),
            ),
            (None, None, Some(g)) => (
                ProbeAction::Grpc {
                    port: zero(g.port)?,
                    service: g.service.clone(),
                },
                format!("grpc {} {:?}", g.port, g.service),
            ),
            _ => return Err("needs exactly one of httpGet, tcpSocket, grpc".into()),
        };
        Ok(AppProbe {
            action,
            summary,
            timeout: Duration::from_secs(
                self.timeout_seconds
                    .filter(|t| *t > 0)
                    .unwrap_or(DEFAULT_PROBE_TIMEOUT_S),
            ),
        })
    }
}

/// The mesh root's path in the mounted ConfigMap directory.
pub fn root_cert_path(dir: &Path) -> PathBuf {
    AgentBundle::root_cert_path(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probers_parse_as_the_injector_writes_them() {
        let p = AppProbers::parse(
            r#"{"/app-health/web/readyz": {"httpGet": {"path": "/ready", "port": 8080, "scheme": "HTTP", "httpHeaders": [{"name": "X-A", "value": "1"}]}, "timeoutSeconds": 3},
                "/app-health/web/livez": {"tcpSocket": {"port": 8080}},
                "/app-health/db/startupz": {"grpc": {"port": 9090, "service": "db"}}}"#,
        )
        .unwrap();
        assert_eq!(p.0.len(), 3);
        let ready = &p.0["/app-health/web/readyz"];
        assert_eq!(ready.timeout, Duration::from_secs(3));
        match &ready.action {
            ProbeAction::HttpGet {
                path,
                port,
                headers,
                ..
            } => {
                assert_eq!((path.as_str(), *port), ("/ready", 8080));
                assert_eq!(headers[0].name, "X-A");
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(p.0["/app-health/web/livez"].timeout, Duration::from_secs(1));
        assert!(AppProbers::parse("").unwrap().0.is_empty());
    }

    #[test]
    fn bad_probers_name_the_entry_and_field() {
        for (bad, want) in [
            ("[1]", "not a JSON object"),
            (r#"{"/other": {"tcpSocket": {"port": 1}}}"#, "/app-health/"),
            (r#"{"/app-health/a/readyz": {}}"#, "exactly one of"),
            (
                r#"{"/app-health/a/readyz": {"tcpSocket": {"port": 1}, "grpc": {"port": 2}}}"#,
                "exactly one of",
            ),
            (
                r#"{"/app-health/a/readyz": {"tcpSocket": {"port": 0}}}"#,
                "port 0",
            ),
            (
                r#"{"/app-health/a/readyz": {"tcpSocket": {"port": "http"}}}"#,
                "tcpSocket.port",
            ),
            (
                r#"{"/app-health/a/readyz": {"httpGet": {"port": 1, "scheme": "FTP"}}}"#,
                "FTP",
            ),
            (r#"{"/app-health/a/readyz": {"exec": {}}}"#, "exec"),
        ] {
            let err = AppProbers::parse(bad).unwrap_err();
            assert!(err.contains(want), "{bad}: {err}");
        }
    }

    #[test]
    fn a_pod_without_its_downward_api_is_named_field_by_field() {
        let pod = PodConfig {
            registry: "isthmus-registry".into(),
            cluster: "c1".into(),
            network: "".into(),
            namespace: "shop".into(),
            name: "".into(),
            service_account: "web".into(),
            token_path: "/nonexistent/token".into(),
            trust_domain: None,
            app_probers: AppProbers::default(),
        };
        let mut p = ConfigProblems::new("the sidecar's configuration");
        pod.check(&mut p);
        let all = p.to_string();
        for want in ["ISTHMUS_NETWORK", "POD_NAME", "not HOST:PORT"] {
            assert!(all.contains(want), "{want} missing in {all}");
        }
        let err = pod.read_token().unwrap_err().to_string();
        assert!(
            err.contains("/nonexistent/token") && err.contains("injected"),
            "{err}"
        );
        let dir = tempfile::tempdir().unwrap();
        let empty = dir.path().join("token");
        std::fs::write(&empty, "\n").unwrap();
        let pod = PodConfig {
            token_path: empty,
            ..pod
        };
        assert!(pod.read_token().unwrap_err().to_string().contains("empty"));
    }
}
