//! The workload side's inbound path: terminate mTLS in front of a local app. Each
//! connection's peer is verified against the trust domain by the TLS layer, its SPIFFE ID
//! is checked against the [`AuthorizationPolicy`], and only then is the app connected to
//! and the bytes relayed. The app sees plain TCP from the proxy.
//!
//! The peer identity reaches the operator through the access-log line (`peer=`) and the
//! connection's span, and in-process users (the VM agent, tests) through
//! [`Inbound::on_connection`]. The core's own metrics leave it out of their labels
//! (identities are as many as the mesh has workloads, and a denial is already counted per
//! app); Istio's standard metrics carry it as `source_principal`, as Istio does (below).
//!
//! [`Mode::Permissive`] also accepts plaintext, told apart by the first byte (a TLS
//! connection opens with a handshake record, 0x16); a plaintext peer has no identity and
//! passes only policies that allow it. Like Istio's PERMISSIVE mode this needs the client to
//! speak first: a server-first protocol (the app sends a greeting before the client says
//! anything) waits for the handshake timeout and is refused, so such apps need STRICT mTLS.
//!
//! A connection refused before the app is chosen (handshake timeout, failed handshake,
//! plaintext in STRICT mode) is counted in `connections_refused{direction="inbound"}` by
//! reason; one the policy refuses is counted in `connections{result="denied"}`, one over a
//! quota in `connections{result="over_quota"}` and `quota_refusals{rule,kind}`. An allowed
//! connection may then be delayed or reset by an injected fault ([`crate::authz::admission`]),
//! counted in `faults_injected{rule,kind}`.
//!
//! Istio's standard metrics count every connection past the handshake as
//! `reporter="destination"`: the source from the peer's verified identity (and the
//! catalog's workload at the peer's address when it runs as that identity; a plaintext peer
//! is `unknown`), the destination the program's own workload, the service the one the
//! client's SNI names when the catalog says this workload serves it. Like every value
//! there, the identity is verified or from the catalog, so the label sets are bounded by
//! the mesh.

pub mod hbone;
#[cfg(test)]
mod tests;

use std::fmt;
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use isthmus_proto::drain;
use isthmus_proto::grpc::classify_handshake_error;
use isthmus_proto::identity::SpiffeId;
use isthmus_proto::sni::SniKey;
use isthmus_proto::tls::{self, ClientAuth, Credentials, TlsError, TrustBundle};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::server::TlsStream;

use crate::authz::admission::{Admission, Admitted};
use crate::authz::{AuthorizationPolicy, Decision};
use crate::connection::{
    self, finish_relay, refusal, AccessRecord, ConnectionHandler, Refusal, Tracker,
};
use crate::metrics::istio::{IstioLabels, Peer, Reporter, ResponseFlags, SecurityPolicy, Traffic};
use crate::metrics::{
    BytesLabels, ConnLabels, ConnResult, Direction, DirectionLabels, Flow, Metrics, OpenLabels,
    RuleLabels, ServiceLabels,
};
use crate::original_dst::original_destination;

const DIRECTION: Direction = Direction::inbound;

/// The first byte of every TLS connection: the content type of a handshake record.
const TLS_HANDSHAKE_RECORD: u8 = 0x16;

/// Time for a peer to complete the mTLS handshake (or, in PERMISSIVE mode, to send its
/// first byte); a slow peer holds a connection slot only this long.
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// Time to connect to the local app. The app is local, so a connect either succeeds at once
/// or is refused; the bound is the same 5 s as for an endpoint
/// ([`upstream::DEFAULT_CONNECT_TIMEOUT`](crate::upstream::DEFAULT_CONNECT_TIMEOUT)) because
/// the VM agent sets both from its one `--connect-timeout`.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = crate::upstream::DEFAULT_CONNECT_TIMEOUT;
/// Connections the inbound listener holds at once; further peers wait in the listen backlog.
pub const DEFAULT_MAX_CONNECTIONS: usize = 16_384;

/// Whether plaintext is accepted beside mTLS (Istio's `PeerAuthentication` modes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// mTLS only: a plaintext connection is refused.
    Strict,
    /// mTLS and plaintext; plaintext peers have no identity.
    Permissive,
}

impl Mode {
    pub fn as_str(&self) -> &'static str {
        match self {
            Mode::Strict => "STRICT",
            Mode::Permissive => "PERMISSIVE",
        }
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Mode {
    type Err = String;
    /// `STRICT` or `PERMISSIVE`, in any case.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.eq_ignore_ascii_case("strict") {
            Ok(Mode::Strict)
        } else if s.eq_ignore_ascii_case("permissive") {
            Ok(Mode::Permissive)
        } else {
            Err(format!(
                "{s:?} is not an mTLS mode; use STRICT or PERMISSIVE"
            ))
        }
    }
}

/// Where the local app listens.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum AppTarget {
    /// Every connection goes to this address.
    Fixed(SocketAddr),
    /// `host` on the port the client originally asked for: for connections that the
    /// capture rules redirected to the inbound listener, so one listener serves every
    /// captured app port.
    OriginalPort { host: IpAddr },
}

impl AppTarget {
    /// The app address for a connection accepted as `downstream`; fallible so that a
    /// variant reading the socket (its original destination) can say why it could not.
    pub fn resolve(&self, downstream: &TcpStream) -> io::Result<SocketAddr> {
        match self {
            AppTarget::Fixed(addr) => Ok(*addr),
            AppTarget::OriginalPort { host } => {
                let original = original_destination(downstream)?;
                let local = downstream.local_addr()?;
                // A connection made straight to the listener (nothing redirected it) has
                // the listener's own address as its original destination, and forwarding
                // it to that port would come back here. The port alone decides: the
                // listener may be dual-stack (a v4-mapped local address) or bound to every
                // address, so `host` on its port is very likely the listener again.
                if original.port() == local.port() {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidInput,
                        format!(
                            "the connection to {original} was made to the inbound listener's \
                             own port, not redirected from an app port: forwarding it to \
                             {host} port {} would loop",
                            original.port()
                        ),
                    ));
                }
                Ok(SocketAddr::new(*host, original.port()))
            }
        }
    }
}

/// What [`Inbound::on_connection`] is told about an authorized connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InboundConnection {
    /// The verified SPIFFE ID of the peer; `None` for plaintext (PERMISSIVE mode).
    pub peer: Option<SpiffeId>,
    pub client: SocketAddr,
    /// The server name the client sent in its ClientHello, if any.
    pub sni: Option<String>,
}

/// Called for each connection the policy allowed, before the app is connected to.
pub type ConnectionHook = Arc<dyn Fn(&InboundConnection) + Send + Sync>;

/// What the listener needs, shared by every connection.
pub struct Inbound {
    /// Swapped when the workload certificate is renewed; each handshake uses the current one.
    pub tls: Arc<ArcSwap<rustls::ServerConfig>>,
    /// Swapped when the policy changes; each connection is decided with the current one.
    pub policy: Arc<ArcSwap<AuthorizationPolicy>>,
    /// The policy's quotas and faults with what they count: built once from the policy
    /// ([`Admission::new`]) and shared by every inbound listener of the program, so a
    /// caller's quota holds across them.
    pub admission: Arc<Admission>,
    pub mode: Mode,
    pub app: AppTarget,
    pub metrics: Arc<Metrics>,
    pub tracker: Arc<Tracker>,
    /// For the mTLS handshake (or a PERMISSIVE peer's first byte).
    pub handshake_timeout: Duration,
    /// For the TCP connect to the local app.
    pub connect_timeout: Duration,
    /// Connections held at once.
    pub max_connections: usize,
    pub on_connection: Option<ConnectionHook>,
}

impl fmt::Debug for Inbound {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Inbound")
            .field("policy", &self.policy.load())
            .field("mode", &self.mode)
            .field("app", &self.app)
            .field("handshake_timeout", &self.handshake_timeout)
            .field("connect_timeout", &self.connect_timeout)
            .field("max_connections", &self.max_connections)
            .field("on_connection", &self.on_connection.is_some())
            .finish_non_exhaustive()
    }
}

impl Inbound {
    /// The server config for the inbound listener: `creds` presented, a client certificate
    /// from `bundle`'s trust domains required, no ALPN (the app's protocol is opaque).
    pub fn server_config(
        creds: &Credentials,
        bundle: &TrustBundle,
    ) -> Result<rustls::ServerConfig, TlsError> {
        tls::server_config(creds, bundle, ClientAuth::Required, &[])
    }
}

/// Accepts until `shutdown`, then returns (open connections carry on; the caller drains
/// them through the tracker).
pub async fn serve(listener: TcpListener, inbound: Arc<Inbound>, shutdown: drain::Watch) {
    connection::serve(listener, inbound, shutdown).await;
}

impl ConnectionHandler for Inbound {
    const DIRECTION: Direction = DIRECTION;
    fn tracker(&self) -> &Arc<Tracker> {
        &self.tracker
    }
    fn max_connections(&self) -> usize {
        self.max_connections
    }
    fn handle(&self, tcp: TcpStream, rec: &mut AccessRecord) -> impl Future<Output = ()> + Send {
        handle(self, tcp, rec)
    }
}

/// The accepted connection, after the handshake.
enum Downstream {
    Tls(Box<TlsStream<TcpStream>>),
    Plaintext(TcpStream),
    /// A stream of a tunnel, not answered yet.
    Tunnel(Box<crate::tunnel::server::Pending>),
}

impl Downstream {
    /// Tells a tunnel's client why its stream is refused; a connection of its own is just
    /// closed.
    fn refuse(&mut self, status: http::StatusCode) {
        if let Downstream::Tunnel(pending) = self {
            pending.refuse(status);
        }
    }
}

struct Accepted {
    stream: Downstream,
    peer: Option<SpiffeId>,
    sni: Option<String>,
}

/// Tells TLS from plaintext, completes the mTLS handshake and reads the peer's identity,
/// all within the handshake timeout.
async fn accept(ib: &Inbound, tcp: TcpStream) -> Result<Accepted, Refusal> {
    let timeout = ib.handshake_timeout;
    let deadline = tokio::time::Instant::now() + timeout;
    let mut first = [0u8; 1];
    match tokio::time::timeout_at(deadline, tcp.peek(&mut first)).await {
        Err(_) => {
            return Err(refusal(
                "handshake_timeout",
                format!("the client sent nothing within {timeout:?}"),
            ))
        }
        Ok(Err(e)) => return Err(refusal(classify_handshake_error(&e), e)),
        Ok(Ok(0)) => {
            return Err(refusal(
                "closed_early",
                "the client closed before sending anything",
            ))
        }
        Ok(Ok(_)) => {}
    }
    if first[0] != TLS_HANDSHAKE_RECORD {
        return match ib.mode {
            Mode::Permissive => Ok(Accepted {
                stream: Downstream::Plaintext(tcp),
                peer: None,
                sni: None,
            }),
            Mode::Strict => Err(refusal(
                "plaintext_in_strict_mode",
                format!(
                    "the first byte is {:#04x}, not a TLS handshake record: the client is not \
                     using mTLS, and STRICT mode accepts nothing else",
                    first[0]
                ),
            )),
        };
    }
    let (stream, peer) =
        connection::accept_mtls(tcp, ib.tls.load_full(), deadline, timeout, "inbound").await?;
    let sni = stream.get_ref().1.server_name().map(str::to_owned);
    Ok(Accepted {
        stream: Downstream::Tls(Box::new(stream)),
        peer: Some(peer),
        sni,
    })
}

async fn handle(ib: &Inbound, tcp: TcpStream, rec: &mut AccessRecord) {
    let _ = tcp.set_nodelay(true);
    let app = match ib.app.resolve(&tcp) {
        Ok(a) => a,
        Err(e) => {
            refuse(ib, rec, refusal("no_app_target", e));
            return;
        }
    };
    // The app address, not the client's SNI: labels stay bounded whatever clients send.
    let service = app.to_string();
    rec.service = Some(service.clone());
    let accepted = match accept(ib, tcp).await {
        Ok(a) => a,
        Err(r) => {
            refuse(ib, rec, r);
            return;
        }
    };
    serve_accepted(ib, accepted, app, rec).await;
}

/// Decides, admits and relays a connection (or tunnel stream) whose peer is verified.
async fn serve_accepted(
    ib: &Inbound,
    mut accepted: Accepted,
    app: SocketAddr,
    rec: &mut AccessRecord,
) {
    let service = app.to_string();
    rec.service = Some(service.clone());
    // A tunnel's stream has named its destination already.
    if let Some(sni) = &accepted.sni {
        rec.destination = sni.clone();
    }
    if let Some(peer) = &accepted.peer {
        rec.peer_identity = Some(peer.to_string());
        tracing::Span::current().record("peer", tracing::field::display(peer));
    }
    let istio = istio_labels(ib, &accepted, rec.client.ip());
    let decision = ib.policy.load().decide(accepted.peer.as_ref());
    if let Decision::Deny { reason } = decision {
        tracing::info!(%reason, "connection denied by the authorization policy");
        accepted.stream.refuse(http::StatusCode::UNAUTHORIZED);
        rec.error = Some(reason);
        ib.metrics
            .istio
            .refused(istio.with_flags(ResponseFlags::Denied));
        count(ib, rec, &service, ConnResult::denied);
        return;
    }
    // Held until the connection ends: its places in the callers' open-at-once quotas.
    let (_admitted, istio) = match admit(ib, &mut accepted, app.port(), istio, rec, &service).await
    {
        Some(admitted) => admitted,
        None => return,
    };
    if let Some(hook) = &ib.on_connection {
        hook(&InboundConnection {
            peer: accepted.peer,
            client: rec.client,
            sni: accepted.sni,
        });
    }
    let open = ib
        .metrics
        .connections_open
        .get_or_create(&OpenLabels {
            direction: DIRECTION,
            service: service.clone(),
        })
        .clone();
    open.inc();
    let result = relay(ib, accepted.stream, app, &service, istio, rec).await;
    open.dec();
    count(ib, rec, &service, result);
}

/// Applies the quotas and faults of the policy to an allowed connection: `None` when it
/// was refused by a quota or reset by a fault (counted, and the connection closed);
/// otherwise what it holds and its Istio labels, flagged if it was delayed.
async fn admit(
    ib: &Inbound,
    accepted: &mut Accepted,
    port: u16,
    istio: IstioLabels,
    rec: &mut AccessRecord,
    service: &str,
) -> Option<(Option<Admitted>, IstioLabels)> {
    if ib.admission.is_empty() {
        return Some((None, istio));
    }
    let admitted = match ib.admission.admit(accepted.peer.as_ref(), port) {
        Ok(a) => a,
        Err(over) => {
            tracing::info!(detail = %over.detail, "connection refused by a quota");
            accepted.stream.refuse(http::StatusCode::TOO_MANY_REQUESTS);
            ib.metrics
                .quota_refusals
                .get_or_create(&RuleLabels {
                    rule: format!("quotas[{}]", over.rule),
                    kind: over.limit.as_str(),
                })
                .inc();
            ib.metrics
                .istio
                .refused(istio.with_flags(ResponseFlags::RateLimited));
            rec.error = Some(over.detail);
            count(ib, rec, service, ConnResult::over_quota);
            return None;
        }
    };
    let Some(fault) = admitted.fault else {
        return Some((Some(admitted), istio));
    };
    let rule = format!("faults[{}]", fault.rule);
    let injected = |kind| {
        ib.metrics
            .faults
            .get_or_create(&RuleLabels {
                rule: rule.clone(),
                kind,
            })
            .inc();
    };
    if let Some(delay) = fault.delay {
        injected("delay");
        tracing::debug!(?delay, %rule, "delaying the connection (injected fault)");
        tokio::time::sleep(delay).await;
    }
    if fault.abort {
        injected("abort");
        tracing::info!(%rule, "resetting the connection (injected fault)");
        // A reset, not a close: the caller sees what a crashed or refusing server gives.
        match &mut accepted.stream {
            Downstream::Tls(tls) => drop(tls.get_ref().0.set_zero_linger()),
            Downstream::Plaintext(tcp) => drop(tcp.set_zero_linger()),
            // A stream's equivalent of a TCP reset (RFC 9113, 8.5).
            Downstream::Tunnel(pending) => pending.reset(),
        }
        ib.metrics
            .istio
            .refused(istio.with_flags(ResponseFlags::FaultAborted));
        rec.error = Some(format!("reset by an injected fault ({rule})"));
        count(ib, rec, service, ConnResult::fault_abort);
        return None;
    }
    let istio = istio.with_flags(ResponseFlags::FaultDelayed);
    Some((Some(admitted), istio))
}

/// Istio's labels of an accepted connection (`-` for the flags): who the peer is, and this
/// workload as the destination.
fn istio_labels(ib: &Inbound, accepted: &Accepted, client: IpAddr) -> IstioLabels {
    let m = &ib.metrics.istio;
    let (catalog, local) = (m.catalog(), m.local());
    let (source, destination, security) = match &accepted.peer {
        Some(id) => (
            catalog.peer(client, Some(id)),
            local.peer.clone(),
            SecurityPolicy::mutual_tls,
        ),
        // A plaintext peer proves nothing: its address alone does not name a workload.
        None => (
            Peer::default(),
            local.peer.without_principal(),
            SecurityPolicy::none,
        ),
    };
    let wanted = accepted
        .sni
        .as_deref()
        .and_then(|s| SniKey::parse(s).ok())
        .map(|k| k.hostname);
    let service = local
        .address
        .and_then(|a| catalog.service_at(a, wanted.as_deref()));
    IstioLabels::new(&Traffic {
        reporter: Reporter::destination,
        source: &source,
        destination: &destination,
        service: service.as_ref(),
        security,
        flags: ResponseFlags::None,
    })
}

fn refuse(ib: &Inbound, rec: &mut AccessRecord, r: Refusal) {
    tracing::debug!(reason = r.reason, detail = %r.detail, "inbound connection refused");
    ib.metrics.refuse(DIRECTION, r.reason);
    rec.result = r.reason;
    rec.error = Some(r.detail);
}

/// Records how a connection to the app ended, in the access record and the metrics.
fn count(ib: &Inbound, rec: &mut AccessRecord, service: &str, result: ConnResult) {
    rec.finish(result);
    ib.metrics
        .connections
        .get_or_create(&ConnLabels {
            direction: DIRECTION,
            service: service.to_string(),
            result,
        })
        .inc();
    for (flow, n) in [
        (Flow::to_upstream, rec.bytes_to_upstream),
        (Flow::from_upstream, rec.bytes_from_upstream),
    ] {
        if n > 0 {
            ib.metrics
                .bytes
                .get_or_create(&BytesLabels {
                    direction: DIRECTION,
                    service: service.to_string(),
                    flow,
                })
                .inc_by(n);
        }
    }
}

async fn relay(
    ib: &Inbound,
    mut down: Downstream,
    app: SocketAddr,
    service: &str,
    istio: IstioLabels,
    rec: &mut AccessRecord,
) -> ConnResult {
    let started = tokio::time::Instant::now();
    let up = match tokio::time::timeout(ib.connect_timeout, TcpStream::connect(app)).await {
        Ok(Ok(s)) => s,
        failed => {
            rec.error = Some(match failed {
                Ok(Err(e)) => format!("cannot connect to the app at {app}: {e} (is it listening?)"),
                _ => format!(
                    "connecting to the app at {app} timed out after {:?}",
                    ib.connect_timeout
                ),
            });
            down.refuse(http::StatusCode::SERVICE_UNAVAILABLE);
            ib.metrics
                .connect_failures
                .get_or_create(&ServiceLabels {
                    service: service.to_string(),
                })
                .inc();
            ib.metrics
                .istio
                .refused(istio.with_flags(ResponseFlags::ConnectFailed));
            return ConnResult::upstream_connect_failed;
        }
    };
    ib.metrics
        .connect_duration
        .get_or_create(&DirectionLabels {
            direction: DIRECTION,
        })
        .observe(started.elapsed().as_secs_f64());
    let _ = up.set_nodelay(true);
    rec.endpoint = Some(app);
    let report = ib.metrics.istio.open(istio);
    let relayed = async {
        match down {
            Downstream::Tls(tls) => crate::relay::relay_metered(*tls, up, report.meter()).await,
            Downstream::Plaintext(tcp) => {
                crate::relay::relay_tcp_metered(tcp, up, report.meter()).await
            }
            Downstream::Tunnel(pending) => match pending.accept().await {
                Ok(stream) => crate::relay::relay_metered(stream, up, report.meter()).await,
                Err(e) => crate::relay::RelayOutcome::failed(e),
            },
        }
    };
    finish_relay(rec, ib.tracker.closing(), relayed).await
}
