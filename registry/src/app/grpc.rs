//! The gRPC front door on 15012: the registry's serving certificate (issued from the
//! cluster intermediate, reissued at half-life or when the intermediate changes), the TLS
//! listener, and tonic with the Watch, Certificates and Registration services.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use isthmus_proto::drain;
use isthmus_proto::grpc::{self, ListenerMetrics, ListenerOptions};
use isthmus_proto::identity::SpiffeId;
use isthmus_proto::pb;
use isthmus_proto::tls::{self, ClientAuth, ServerIdentity, TrustBundle};
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::ca::service::CertificateService;
use crate::ca::{Authority, CaMaterial};
use crate::registration::RegistrationService;
use crate::sources::peers::ClientTls;
use crate::watch::WatchService;

/// Largest request the registry decodes: requests are small (Subscribe, Ack, a CSR, a
/// Hello), so a bigger one is a bug or an attack.
pub const MAX_REQUEST_BYTES: usize = 1024 * 1024;
pub use isthmus_proto::identity::{REGISTRY_NAMESPACE, REGISTRY_SERVICE_ACCOUNT};
/// Lifetime of the registry's serving certificate; renewed at half-life.
const SERVING_CERT_TTL: Duration = Duration::from_secs(24 * 3600);
/// HTTP/2 pings on idle gRPC connections: a VM agent whose network was cut sends no
/// FIN, and its registration should start its grace period within seconds, not when TCP
/// gives up minutes later.
const GRPC_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
const GRPC_KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(5);

/// The services the gRPC server carries.
pub(super) struct Services {
    pub watch: WatchService,
    pub certificates: CertificateService,
    pub registration: RegistrationService,
}

/// The TLS config the gRPC listener serves with: the receiver for the listener, the sender
/// for [`renew_serving_cert`].
pub(super) type ServingTls = (
    watch::Sender<Arc<rustls::ServerConfig>>,
    watch::Receiver<Arc<rustls::ServerConfig>>,
);

pub(super) fn serving_tls(authority: &Authority) -> anyhow::Result<ServingTls> {
    let config = serving_config(&authority.current()).context("issuing the serving certificate")?;
    Ok(watch::channel(config))
}

/// Serves `services` on `listener` until `shutdown`: stops accepting, ends the streams, and
/// returns once the connections are closed.
pub(super) async fn serve(
    listener: TcpListener,
    tls: watch::Receiver<Arc<rustls::ServerConfig>>,
    options: ListenerOptions,
    metrics: ListenerMetrics,
    services: Services,
    shutdown: drain::Watch,
) {
    let incoming = grpc::tls_incoming(listener, tls, options, metrics, shutdown.clone());
    let served = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(GRPC_KEEPALIVE_INTERVAL))
        .http2_keepalive_timeout(Some(GRPC_KEEPALIVE_TIMEOUT))
        .add_service(
            pb::watch_server::WatchServer::new(services.watch)
                .max_decoding_message_size(MAX_REQUEST_BYTES),
        )
        .add_service(
            pb::certificates_server::CertificatesServer::new(services.certificates)
                .max_decoding_message_size(MAX_REQUEST_BYTES),
        )
        .add_service(
            pb::registration_server::RegistrationServer::new(services.registration)
                .max_decoding_message_size(MAX_REQUEST_BYTES),
        )
        .serve_with_incoming_shutdown(incoming, shutdown.signaled())
        .await;
    if let Err(e) = served {
        tracing::error!(error = %e, "gRPC server failed");
    }
}

fn serving_config(material: &CaMaterial) -> anyhow::Result<Arc<rustls::ServerConfig>> {
    let id = SpiffeId::registry(&material.trust_domain);
    let creds =
        material.self_credentials(&id, SERVING_CERT_TTL, ::time::OffsetDateTime::now_utc())?;
    let bundle = TrustBundle::new(material.root_der(), material.trust_domain.as_str(), &[])?;
    Ok(Arc::new(tls::server_config(
        &creds,
        &bundle,
        ClientAuth::Optional,
        &[tls::ALPN_H2],
    )?))
}

/// Reissues the serving certificate when the intermediate changes or at half-life.
pub(super) async fn renew_serving_cert(
    authority: Arc<Authority>,
    tx: watch::Sender<Arc<rustls::ServerConfig>>,
    shutdown: drain::Watch,
) {
    let mut ca = authority.subscribe();
    let stop = shutdown.signaled();
    tokio::pin!(stop);
    loop {
        tokio::select! {
            _ = &mut stop => return,
            changed = ca.changed() => if changed.is_err() { return },
            _ = tokio::time::sleep(SERVING_CERT_TTL / 2) => {}
        }
        match serving_config(&authority.current()) {
            Ok(cfg) => {
                tx.send_replace(cfg);
                tracing::info!("registry serving certificate reissued");
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot reissue the registry serving certificate; keeping the current one")
            }
        }
    }
}

/// The client TLS config this registry presents to the registries it peers with: its own
/// identity, from its cluster's intermediate, verified against the mesh root. A new
/// certificate is issued at half-life or when the intermediate changes; if that fails the
/// last one is kept (and the failure logged). Fails when none can be issued at all.
pub(super) fn peer_client_tls(authority: Arc<Authority>) -> anyhow::Result<ClientTls> {
    struct Issued {
        material: Arc<CaMaterial>,
        at: Instant,
        config: Arc<rustls::ClientConfig>,
    }
    fn issue(material: &CaMaterial) -> anyhow::Result<Arc<rustls::ClientConfig>> {
        let id = SpiffeId::registry(&material.trust_domain);
        let creds =
            material.self_credentials(&id, SERVING_CERT_TTL, ::time::OffsetDateTime::now_utc())?;
        let bundle = TrustBundle::new(material.root_der(), material.trust_domain.as_str(), &[])?;
        Ok(Arc::new(tls::client_config(
            Some(&creds),
            &bundle,
            ServerIdentity::TrustDomain,
            &[tls::ALPN_H2],
        )?))
    }
    let material = authority.current();
    let first =
        issue(&material).context("issuing the registry's client certificate for its peers")?;
    let issued = std::sync::Mutex::new(Issued {
        material,
        at: Instant::now(),
        config: first,
    });
    Ok(Arc::new(move || {
        let mut issued = issued.lock().unwrap_or_else(|e| e.into_inner());
        let material = authority.current();
        let fresh =
            Arc::ptr_eq(&issued.material, &material) && issued.at.elapsed() < SERVING_CERT_TTL / 2;
        if !fresh {
            match issue(&material) {
                Ok(config) => {
                    *issued = Issued {
                        material,
                        at: Instant::now(),
                        config,
                    }
                }
                Err(e) => {
                    tracing::error!(error = %e, "cannot issue the registry's client certificate for its peers; keeping the current one")
                }
            }
        }
        issued.config.clone()
    }))
}
