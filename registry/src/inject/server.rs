//! The webhook's TLS front door (15017, `POST /inject`) and its serving certificate.
//!
//! The certificate comes from files an operator provides (re-read when they change), or is
//! issued by the cluster intermediate for the webhook's DNS names (and IP addresses, for a
//! URL such as `https://127.0.0.1:15017/inject`) and reissued at half-life or when the
//! intermediate changes. The API server then trusts the mesh root as the webhook's
//! `caBundle`.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use isthmus_proto::drain;
use isthmus_proto::grpc::{self, ListenerOptions, TlsConnection};
use isthmus_proto::{certs, tls};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use time::OffsetDateTime;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_stream::StreamExt;

use super::metrics::{InjectMetrics, ReasonLabels};
use super::review::{answer, Answer, MAX_REVIEW_BYTES};
use super::InjectSettings;
use crate::ca::{Authority, CaMaterial};

pub const INJECT_PATH: &str = "/inject";
/// Lifetime of an issued webhook certificate (never past the intermediate's); reissued at
/// half-life.
pub const WEBHOOK_CERT_TTL: Duration = Duration::from_secs(7 * 24 * 3600);
/// How often provided certificate files are checked for a replacement.
pub const CERT_FILE_POLL: Duration = Duration::from_secs(10);
/// Reissue no more often than this, whatever the certificate's remaining life.
const MIN_RENEW_INTERVAL: Duration = Duration::from_secs(60);
const ALPN_HTTP1: &[u8] = b"http/1.1";
/// How long a request body may take to arrive: the API server sends a review at once, and
/// waits at most 30 s (`timeoutSeconds`) for the answer.
pub const BODY_READ_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum ServingCertError {
    #[error("webhook certificate {path}: {source}")]
    Files {
        path: PathBuf,
        #[source]
        source: tls::TlsError,
    },
    #[error("the webhook has no DNS name to issue its certificate for (see --webhook-dns-name)")]
    NoNames,
    #[error("webhook DNS name {0:?} cannot go into a certificate")]
    BadName(String),
    #[error("issuing the webhook certificate from the cluster intermediate: {0}")]
    Issue(String),
    #[error("the webhook certificate and key do not go together: {0}")]
    Config(#[from] rustls::Error),
}

/// Where the serving certificate comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServingCert {
    /// PEM files (chain, then key) maintained by the operator.
    Files { cert: PathBuf, key: PathBuf },
    /// Issued by the cluster intermediate for these names (IP addresses become IP SANs).
    Issued { names: Vec<String> },
}

impl ServingCert {
    /// The server config for the current certificate, and when it should be renewed.
    pub fn load(
        &self,
        material: &CaMaterial,
        now: OffsetDateTime,
    ) -> Result<(Arc<rustls::ServerConfig>, Duration), ServingCertError> {
        match self {
            ServingCert::Files { cert, key } => {
                let chain = tls::read_certs(cert).map_err(|source| ServingCertError::Files {
                    path: cert.clone(),
                    source,
                })?;
                let key = tls::read_key(key).map_err(|source| ServingCertError::Files {
                    path: key.clone(),
                    source,
                })?;
                Ok((server_config(chain, key)?, CERT_FILE_POLL))
            }
            ServingCert::Issued { names } => {
                let (chain, key, not_after) = issue(material, names, now)?;
                let life = (not_after - now).max(::time::Duration::ZERO);
                let renew = Duration::try_from(life / 2)
                    .unwrap_or(MIN_RENEW_INTERVAL)
                    .max(MIN_RENEW_INTERVAL);
                Ok((server_config(chain, key)?, renew))
            }
        }
    }

    /// The files' contents, to notice a replacement (empty for an issued certificate).
    fn fingerprint(&self) -> Vec<u8> {
        match self {
            ServingCert::Files { cert, key } => {
                let mut out = std::fs::read(cert).unwrap_or_default();
                out.extend(std::fs::read(key).unwrap_or_default());
                out
            }
            ServingCert::Issued { .. } => Vec::new(),
        }
    }
}

/// A TLS server config presenting `chain` and asking no client certificate (the API
/// server calls webhooks without one unless told otherwise).
fn server_config(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> Result<Arc<rustls::ServerConfig>, ServingCertError> {
    let mut cfg = rustls::ServerConfig::builder_with_provider(tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_no_client_auth()
        .with_single_cert(chain, key)?;
    cfg.alpn_protocols = vec![ALPN_HTTP1.to_vec()];
    Ok(Arc::new(cfg))
}

/// A serving certificate for `names` signed by the cluster intermediate: the chain (leaf,
/// intermediate and any CA above it but the root), the key, and when it expires.
pub fn issue(
    material: &CaMaterial,
    names: &[String],
    now: OffsetDateTime,
) -> Result<
    (
        Vec<CertificateDer<'static>>,
        PrivateKeyDer<'static>,
        OffsetDateTime,
    ),
    ServingCertError,
> {
    use rcgen::{DnType, ExtendedKeyUsagePurpose, IsCa, KeyUsagePurpose, SanType};
    let first = names.first().ok_or(ServingCertError::NoNames)?;
    let issue_err = |e: rcgen::Error| ServingCertError::Issue(e.to_string());
    let mut params = rcgen::CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, first);
    params.subject_alt_names = names
        .iter()
        .map(|n| match n.parse::<IpAddr>() {
            Ok(ip) => Ok(SanType::IpAddress(ip)),
            Err(_) => rcgen::string::Ia5String::try_from(n.as_str())
                .map(SanType::DnsName)
                .map_err(|_| ServingCertError::BadName(n.clone())),
        })
        .collect::<Result<_, _>>()?;
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.use_authority_key_identifier_extension = true;
    let validity = certs::LeafValidity::issued(now, WEBHOOK_CERT_TTL, material.not_after);
    params.not_before = validity.not_before;
    params.not_after = validity.not_after;
    params.serial_number = Some(crate::ca::random_serial());
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(issue_err)?;
    let chain_pem = material
        .sign_params(&params, &key)
        .map_err(|e| ServingCertError::Issue(e.to_string()))?
        .concat();
    let chain = tls::parse_certs(Path::new("<webhook certificate>"), chain_pem.as_bytes())
        .map_err(|e| ServingCertError::Issue(e.to_string()))?;
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
    Ok((chain, key, validity.not_after))
}

/// Keeps `tx` at a current certificate: reissued at half-life or when the intermediate
/// changes, or re-read when the provided files change.
pub async fn keep_serving_cert(
    source: ServingCert,
    authority: Arc<Authority>,
    tx: watch::Sender<Arc<rustls::ServerConfig>>,
    mut renew_in: Duration,
    shutdown: drain::Watch,
) {
    let mut ca = authority.subscribe();
    let stop = shutdown.signaled();
    tokio::pin!(stop);
    let mut seen = source.fingerprint();
    loop {
        tokio::select! {
            _ = &mut stop => return,
            changed = ca.changed(), if matches!(source, ServingCert::Issued { .. }) => {
                if changed.is_err() { return }
            }
            _ = tokio::time::sleep(renew_in) => {}
        }
        if let ServingCert::Files { .. } = source {
            let now_seen = source.fingerprint();
            if now_seen == seen {
                continue;
            }
            seen = now_seen;
        }
        match source.load(&authority.current(), OffsetDateTime::now_utc()) {
            Ok((cfg, next)) => {
                tx.send_replace(cfg);
                renew_in = next;
                tracing::info!("webhook serving certificate renewed");
            }
            Err(e) => {
                renew_in = MIN_RENEW_INTERVAL;
                tracing::error!(error = %e, "cannot renew the webhook serving certificate; keeping the current one");
            }
        }
    }
}

#[derive(Clone)]
struct WebhookState {
    settings: Arc<InjectSettings>,
    metrics: InjectMetrics,
}

/// The webhook's routes: `POST /inject`.
pub fn routes(settings: Arc<InjectSettings>, metrics: InjectMetrics) -> Router {
    Router::new()
        .route(INJECT_PATH, post(inject_route))
        .with_state(WebhookState { settings, metrics })
}

async fn inject_route(State(s): State<WebhookState>, headers: HeaderMap, body: Body) -> Response {
    let too_large = |s: &WebhookState, what: String| {
        let reason = "too_large";
        s.metrics
            .errors
            .get_or_create(&ReasonLabels { reason })
            .inc();
        (
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "the request body {what} is over the webhook's limit of {MAX_REVIEW_BYTES} bytes\n"
            ),
        )
            .into_response()
    };
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if let Some(n) = declared.filter(|n| *n > MAX_REVIEW_BYTES as u64) {
        return too_large(&s, format!("({n} bytes)"));
    }
    let read = tokio::time::timeout(
        BODY_READ_TIMEOUT,
        axum::body::to_bytes(body, MAX_REVIEW_BYTES),
    );
    let bytes = match read.await {
        Ok(Ok(b)) => b,
        Ok(Err(e)) => return too_large(&s, format!("could not be read whole ({e}) and")),
        Err(_) => {
            let reason = "body_timeout";
            s.metrics
                .errors
                .get_or_create(&ReasonLabels { reason })
                .inc();
            return (
                StatusCode::REQUEST_TIMEOUT,
                format!(
                    "the request body did not arrive within {}s\n",
                    BODY_READ_TIMEOUT.as_secs()
                ),
            )
                .into_response();
        }
    };
    let (settings, metrics) = (s.settings.clone(), s.metrics.clone());
    match answer(&bytes, &settings, &metrics) {
        Answer::Review(v) => Json(v).into_response(),
        Answer::BadRequest(message) => {
            (StatusCode::BAD_REQUEST, format!("{message}\n")).into_response()
        }
    }
}

/// The TLS connections of [`grpc::tls_incoming`] as axum's listener: handshakes run
/// beside the accept loop, bounded in time and number.
struct TlsListener {
    incoming: tokio_stream::wrappers::ReceiverStream<Result<TlsConnection, std::io::Error>>,
    local: SocketAddr,
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsConnection;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            match self.incoming.next().await {
                Some(Ok(conn)) => return (conn, self.local),
                Some(Err(e)) => tracing::debug!(error = %e, "webhook connection failed"),
                // Shutdown: axum's graceful shutdown ends the server.
                None => std::future::pending::<()>().await,
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(self.local)
    }
}

/// Serves the webhook on `listener` until `shutdown`.
pub async fn serve(
    listener: TcpListener,
    tls: watch::Receiver<Arc<rustls::ServerConfig>>,
    options: ListenerOptions,
    router: Router,
    metrics: InjectMetrics,
    shutdown: drain::Watch,
) {
    let local = match listener.local_addr() {
        Ok(a) => a,
        Err(e) => {
            tracing::error!(error = %e, "webhook listener has no address");
            return;
        }
    };
    let incoming = grpc::tls_incoming(listener, tls, options, metrics.listener, shutdown.clone());
    let served = axum::serve(TlsListener { incoming, local }, router)
        .with_graceful_shutdown(shutdown.signaled())
        .await;
    if let Err(e) = served {
        tracing::error!(error = %e, "webhook server failed");
    }
}
