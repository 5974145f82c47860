//! The tunnel listeners (HBONE on 15008/tcp, QUIC on 15008/udp): the east-west gateway's
//! second way into its network, beside SNI passthrough. A QUIC tunnel's streams are
//! handled exactly as HTTP/2's (the stream header names the same destination and subset). A remote network's agent opens one mTLS connection
//! (ALPN `h2`, its own certificate, which must be of the mesh's trust domain) and carries
//! each of its connections into this network as an HTTP/2 `CONNECT` stream whose
//! `:authority` is `<hostname>:<port>` of the destination service, as the SNI key names
//! them; the request header `isthmus-subset` names a DestinationRule subset (absent or
//! empty: every endpoint). The bytes on a stream are the caller's own mTLS session with the
//! workload (its ClientHello carries the SNI key), so the workload sees the caller's
//! identity, never the gateway's: the gateway ends only the outer tunnel.
//!
//! A stream is routed with passthrough's lookup, connected and relayed by passthrough's
//! data path (`passthrough::route`, `passthrough::forward`), and counted as a passthrough
//! connection is (`direction="passthrough"`, by service and result, its bytes, Istio's
//! metrics as `reporter="source"`, a `direct` hop). It is answered `200` once an endpoint
//! is connected, `405` for a method other than `CONNECT` (`tunnel_not_connect`), `400` for
//! an authority that is not `host:port` (`tunnel_bad_authority`), `404` for a service,
//! port or subset this network does not have or does not export (passthrough's reasons:
//! `unknown_service`, `unknown_port`, `unknown_subset`, `not_exported`), and `503` when no
//! endpoint can be connected (no healthy one, the destination's connection limit, every
//! attempt failed: counted by result, as passthrough counts them). The handshake and the
//! stream loop are the proxy core's (`tunnel::server`); a refused tunnel or stream is
//! counted in `connections_refused{direction="passthrough"}` by reason.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use arc_swap::ArcSwap;
use http::StatusCode;
use isthmus_proto::drain;
use isthmus_proto::sni::SniKey;
use isthmus_proto::tls::{self, Credentials, TlsError, TrustBundle};
use isthmus_proxy::connection::{self, AccessRecord, ConnectionHandler, Refusal, Tracker};
use isthmus_proxy::metrics::Direction;
use isthmus_proxy::routes::Destination;
use isthmus_proxy::tunnel;
use isthmus_proxy::tunnel::pool::SUBSET_HEADER;
use isthmus_proxy::tunnel::server::{Listener, Pending};
use tokio::net::{TcpListener, TcpStream};

use crate::passthrough::{self, Downstream, Passthrough};

/// The gateway's data path direction: tunnels and their streams are counted with
/// passthrough's connections.
const DIRECTION: Direction = Direction::passthrough;

/// What the tunnel listener needs beside the data path it shares with SNI passthrough.
#[derive(Debug)]
pub struct Tunnel {
    /// The routing table, connect options, metrics and tracker of SNI passthrough; its
    /// handshake timeout bounds the TLS handshake and the HTTP/2 preface, and its
    /// connection limit the tunnels held at once.
    pub passthrough: Arc<Passthrough>,
    pub tls: Arc<TunnelTls>,
    /// Streams one tunnel may carry at once (`MAX_CONCURRENT_STREAMS`).
    pub max_streams: u32,
}

impl Tunnel {
    /// The proxy core's tunnel loop, with passthrough's metrics, tracker and timeout.
    fn listener(&self) -> Listener {
        let p = &self.passthrough;
        Listener {
            direction: DIRECTION,
            metrics: p.metrics.clone(),
            tracker: p.tracker.clone(),
            handshake_timeout: p.handshake_timeout,
            max_streams: self.max_streams,
        }
    }
}

/// The tunnel port's TLS: the gateway's own certificate and the mesh roots, a client
/// certificate of the trust domain required, ALPN `h2` only.
///
/// The gateway does not renew its certificate itself: whatever replaces it rewrites the
/// certificate directory, which the Watch client re-reads whenever it connects to the
/// registry. The tunnel port re-reads it the same way, at the first
/// handshake after the chain or the key changed, and keeps the last certificate that
/// loaded when the new files do not (as the Watch client keeps its previous credentials).
#[derive(Debug)]
pub struct TunnelTls {
    cert_dir: PathBuf,
    bundle: TrustBundle,
    config: ArcSwap<rustls::ServerConfig>,
    /// The QUIC listener's, from the same credentials.
    quic: ArcSwap<tunnel::quic::ServerConfig>,
    /// When the chain and the key in use were written.
    written: Mutex<Written>,
}

/// The modification times of the chain and the key.
type Written = [Option<SystemTime>; 2];

impl TunnelTls {
    /// Loads the credentials of `cert_dir`, trusting `bundle` for clients.
    pub fn load(cert_dir: &Path, bundle: TrustBundle) -> Result<Self, TlsError> {
        let written = written(cert_dir);
        let (config, quic) = configs(&Credentials::from_dir(cert_dir)?, &bundle)?;
        Ok(Self {
            cert_dir: cert_dir.to_path_buf(),
            bundle,
            config: ArcSwap::from_pointee(config),
            quic: ArcSwap::from_pointee(quic),
            written: Mutex::new(written),
        })
    }

    /// The config for the next handshake, re-read first if the files changed.
    pub fn current(&self) -> Arc<rustls::ServerConfig> {
        self.reread();
        self.config.load_full()
    }

    /// The QUIC listener's config for the next handshake, re-read first if the files
    /// changed.
    pub fn current_quic(&self) -> Arc<tunnel::quic::ServerConfig> {
        self.reread();
        self.quic.load_full()
    }

    fn reread(&self) {
        let now = written(&self.cert_dir);
        let mut seen = self.written.lock().expect("tunnel TLS poisoned");
        if *seen != now {
            // Once per change, failed or not: a bad file is not re-read at every handshake.
            *seen = now;
            let loaded = Credentials::from_dir(&self.cert_dir)
                .and_then(|creds| Ok((configs(&creds, &self.bundle)?, creds.identity)));
            match loaded {
                Ok(((config, quic), identity)) => {
                    self.config.store(Arc::new(config));
                    self.quic.store(Arc::new(quic));
                    tracing::info!(%identity, "the tunnel port presents the rewritten certificate");
                }
                Err(e) => tracing::warn!(
                    error = %e,
                    dir = %self.cert_dir.display(),
                    "keeping the previous certificate for the tunnel port"
                ),
            }
        }
    }
}

/// The tunnel port's TLS over TCP (ALPN `h2`) and over QUIC, from `creds`.
fn configs(
    creds: &Credentials,
    bundle: &TrustBundle,
) -> Result<(rustls::ServerConfig, tunnel::quic::ServerConfig), TlsError> {
    let h2 = tunnel::server_config(creds, bundle)?;
    let quic = tunnel::quic::listener_config(creds, bundle, tunnel::DEFAULT_MAX_STREAMS)
        .map_err(|e| TlsError::Rustls(rustls::Error::General(e.to_string())))?;
    Ok((h2, quic))
}

fn written(dir: &Path) -> Written {
    [tls::CERT_CHAIN_FILE, tls::KEY_FILE].map(|f| {
        std::fs::metadata(dir.join(f))
            .and_then(|m| m.modified())
            .ok()
    })
}

/// Accepts tunnels until `shutdown`, which also tells the tunnels open then to go away
/// (GOAWAY): their streams finish, and the tracker's drain waits for them.
pub async fn serve(listener: TcpListener, tunnel: Arc<Tunnel>, shutdown: drain::Watch) {
    let serving = Serving {
        listener: tunnel.listener(),
        stop: shutdown.clone(),
        tunnel,
    };
    connection::serve(listener, Arc::new(serving), shutdown).await;
}

/// Accepts QUIC tunnels on `endpoint` (the tunnel port over UDP) until `shutdown`; each
/// stream goes the way an HTTP/2 tunnel's does.
pub async fn serve_quic(
    endpoint: tunnel::quic::Endpoint,
    tunnel: Arc<Tunnel>,
    shutdown: drain::Watch,
) {
    let listener = tunnel.listener();
    let (p, l) = (tunnel.passthrough.clone(), listener.clone());
    let on_stream = move |pending, _peer, rec| serve_stream(p.clone(), l.clone(), pending, rec);
    let tls = tunnel.tls.clone();
    let config = move || Some(tls.current_quic());
    listener
        .serve_quic(endpoint, config, shutdown, on_stream)
        .await;
}

/// The listener while it serves: the tunnel, the core's loop settings, and the watch that
/// tells tunnels to go away.
struct Serving {
    tunnel: Arc<Tunnel>,
    listener: Listener,
    stop: drain::Watch,
}

impl ConnectionHandler for Serving {
    const DIRECTION: Direction = DIRECTION;
    fn tracker(&self) -> &Arc<Tracker> {
        &self.tunnel.passthrough.tracker
    }
    fn max_connections(&self) -> usize {
        self.tunnel.passthrough.max_connections
    }
    fn handle(&self, tcp: TcpStream, rec: &mut AccessRecord) -> impl Future<Output = ()> + Send {
        serve_tunnel(self, tcp, rec)
    }
}

async fn serve_tunnel(s: &Serving, tcp: TcpStream, rec: &mut AccessRecord) {
    match s.listener.accept(tcp, s.tunnel.tls.current()).await {
        Err(r) => s.listener.refuse(rec, r),
        Ok((tls, peer)) => {
            let (p, listener) = (&s.tunnel.passthrough, &s.listener);
            let on_stream =
                |pending, _peer, rec| serve_stream(p.clone(), listener.clone(), pending, rec);
            s.listener
                .serve(tls, peer, rec, s.stop.clone(), on_stream)
                .await;
        }
    }
}

/// One stream, to its end: refused, or routed into the network.
async fn serve_stream(
    p: Arc<Passthrough>,
    listener: Listener,
    mut pending: Pending,
    mut rec: AccessRecord,
) -> AccessRecord {
    match destination(&p, &pending, &mut rec) {
        Ok(dest) => {
            let down = Downstream::Tunnel(Box::new(pending));
            passthrough::forward(&p, down, &dest, &mut rec).await;
        }
        Err((status, r)) => {
            pending.refuse(status);
            listener.refuse(&mut rec, r);
        }
    }
    rec
}

/// The destination a stream asks for, or its refusal.
fn destination(
    p: &Passthrough,
    pending: &Pending,
    rec: &mut AccessRecord,
) -> Result<Arc<Destination>, (StatusCode, Refusal)> {
    let key = target(pending)?;
    if !key.subset.is_empty() {
        rec.destination = format!("{} (subset {})", rec.destination, key.subset);
    }
    passthrough::route(p, &key).map_err(|r| (StatusCode::NOT_FOUND, r))
}

/// The service port (and subset) a stream names, as the SNI key would carry them.
fn target(pending: &Pending) -> Result<SniKey, (StatusCode, Refusal)> {
    let what = "a service's hostname:port";
    let (host, port) = pending
        .connect_authority()?
        .rsplit_once(':')
        .ok_or_else(|| pending.bad_authority(what))?;
    let port = match port.parse::<u16>() {
        Ok(n) if n != 0 && !port.starts_with('+') && !host.is_empty() => n,
        _ => return Err(pending.bad_authority(what)),
    };
    let subset = pending
        .headers
        .get(SUBSET_HEADER)
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
        .unwrap_or_default();
    Ok(SniKey::new(port, &subset, &host.to_ascii_lowercase()))
}

#[cfg(test)]
pub(crate) mod tests;
