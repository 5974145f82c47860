//! The SNI passthrough listener (15443): the east-west gateway's data path. It reads the
//! client's ClientHello without terminating TLS, routes on the SNI key
//! `outbound_.<port>_.<subset>_.<hostname>` to a healthy local endpoint of that service,
//! replays the bytes it read and relays both directions until both sides close (the proxy
//! core's `splice(2)` relay, `relay::relay_tcp_metered`, counting Istio's bytes as it goes).
//! The mTLS session is the client's and the endpoint's: the gateway holds no key for it.
//!
//! A connection that is not TLS, has no SNI, names something that is not a mesh key, or a
//! service this network does not export, is closed at once and counted by reason; one that
//! sends nothing is closed when the handshake timeout passes.
//!
//! A routed connection is counted in Istio's standard metrics as Istio's east-west gateway
//! counts it: `reporter="source"`, the gateway itself as the source, the catalog's workload
//! at the endpoint as the destination, and, since the gateway terminates no TLS, no
//! principal on either side and the security policy `unknown`. Its bytes are the TLS
//! records it splices, the ClientHello included. In `isthmus_tcp_connections_opened_total`
//! its hop is `direct`, within the endpoint's network, which is the gateway's own: it
//! routes to its network's workloads only.
//!
//! The part after the ClientHello is the data path's, not the listener's: `route` (the
//! lookup and its refusals) and `forward` (connect, relay, counting) serve the tunnel
//! listener's streams (`tunnel`) as well, a stream being a `Downstream::Tunnel`.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use http::StatusCode;
use isthmus_proto::drain;
use isthmus_proto::sni::SniKey;
use isthmus_proxy::client_hello::{ClientHelloReader, Hello};
use isthmus_proxy::connection::{
    self, finish_relay, refusal, AccessRecord, ConnectionHandler, Refusal, Tracker,
};
use isthmus_proxy::metrics::istio::{
    IstioLabels, Peer, Reporter, ResponseFlags, SecurityPolicy, Traffic, Transit, Transport,
};
use isthmus_proxy::metrics::{ConnResult, Direction, Metrics};
use isthmus_proxy::relay::{self, RelayOutcome};
use isthmus_proxy::routes::{Destination, RouteTable};
use isthmus_proxy::tunnel::server::Pending;
use isthmus_proxy::upstream::{self, ConnectOptions};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const DIRECTION: Direction = Direction::passthrough;

/// Bytes the first read of a connection has room for: a ClientHello is usually 0.3–2 KiB.
const FIRST_READ: usize = 4096;

/// What the listener needs, shared by every connection.
#[derive(Debug)]
pub struct Passthrough {
    pub routes: Arc<ArcSwap<RouteTable>>,
    pub metrics: Arc<Metrics>,
    pub tracker: Arc<Tracker>,
    pub handshake_timeout: Duration,
    pub connect: ConnectOptions,
    /// Connections held at once.
    pub max_connections: usize,
}

/// Accepts until `shutdown`, then returns (open connections carry on; the caller drains
/// them through the tracker).
pub async fn serve(listener: TcpListener, p: Arc<Passthrough>, shutdown: drain::Watch) {
    connection::serve(listener, p, shutdown).await;
}

impl ConnectionHandler for Passthrough {
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

/// Reads until the ClientHello's server name is known; returns it and every byte read.
async fn read_server_name(
    tcp: &mut TcpStream,
    timeout: Duration,
) -> Result<(String, Vec<u8>), Refusal> {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut reader = ClientHelloReader::new();
    // Room for a usual ClientHello at once; the bytes are read straight into what is kept.
    reader.buffer().reserve(FIRST_READ);
    loop {
        match tokio::time::timeout_at(deadline, tcp.read_buf(reader.buffer())).await {
            Err(_) => {
                return Err(refusal(
                    "handshake_timeout",
                    format!(
                        "no complete ClientHello within {timeout:?} ({} bytes received)",
                        reader.received().len()
                    ),
                ))
            }
            Ok(Err(e)) => return Err(refusal("client_error", e)),
            Ok(Ok(0)) => {
                return Err(refusal(
                    "closed_before_client_hello",
                    format!(
                        "client closed after {} bytes, before a complete ClientHello",
                        reader.received().len()
                    ),
                ))
            }
            Ok(Ok(_)) => {}
        }
        match reader.parse() {
            Ok(Hello::NeedMore) => continue,
            Ok(Hello::ServerName(name)) => return Ok((name, reader.into_received())),
            Err(e) => return Err(refusal(e.reason(), e)),
        }
    }
}

async fn handle(p: &Passthrough, mut tcp: TcpStream, rec: &mut AccessRecord) {
    let routed = async {
        let (sni, hello) = read_server_name(&mut tcp, p.handshake_timeout).await?;
        rec.destination = sni.clone();
        let key = SniKey::parse(&sni).map_err(|e| refusal("not_mesh_key", e))?;
        Ok::<_, Refusal>((route(p, &key)?, hello))
    };
    let (dest, hello) = match routed.await {
        Ok(r) => r,
        Err(r) => {
            p.metrics.refuse(DIRECTION, r.reason);
            rec.result = r.reason;
            rec.error = Some(r.detail);
            return;
        }
    };
    forward(p, Downstream::Passthrough { tcp, hello }, &dest, rec).await;
}

/// The destination `key` names in this network, or why a connection to it is refused: its
/// service, port or subset is unknown here (`unknown_service`, `unknown_port`,
/// `unknown_subset`), or the service is not exported to other networks (`not_exported`).
/// The tunnel listener routes its streams with this same lookup.
pub(crate) fn route(p: &Passthrough, key: &SniKey) -> Result<Arc<Destination>, Refusal> {
    let dest = p
        .routes
        .load()
        .lookup(&key.hostname, key.port, &key.subset)
        .map_err(|e| refusal(e.reason(), e))?;
    if !dest.exported() {
        return Err(refusal(
            "not_exported",
            format!(
                "{} is not exported to other networks (cluster-local, or its exportTo \
                 is not every namespace)",
                key.hostname
            ),
        ));
    }
    Ok(dest)
}

/// A routed connection into the network, before its endpoint is connected.
pub(crate) enum Downstream {
    /// A connection to the SNI port and what was read from it (the ClientHello), which is
    /// replayed to the endpoint before anything else.
    Passthrough { tcp: TcpStream, hello: Vec<u8> },
    /// A tunnel's stream, answered `200` once the endpoint is connected, `503` when none
    /// can be.
    Tunnel(Box<Pending>),
}

/// Connects a routed connection to an endpoint of `dest` and relays until both sides
/// close, counting it by service and result, its bytes, and in Istio's metrics.
pub(crate) async fn forward(
    p: &Passthrough,
    down: Downstream,
    dest: &Arc<Destination>,
    rec: &mut AccessRecord,
) {
    let service = &dest.key.hostname;
    rec.service = Some(service.clone());
    let open = p.metrics.open(DIRECTION, service);
    let result = connect_and_relay(p, down, dest, rec).await;
    drop(open);
    rec.finish(result);
    p.metrics.closed(
        DIRECTION,
        service,
        result,
        rec.bytes_to_upstream,
        rec.bytes_from_upstream,
    );
}

async fn connect_and_relay(
    p: &Passthrough,
    mut down: Downstream,
    dest: &Arc<Destination>,
    rec: &mut AccessRecord,
) -> ConnResult {
    // A tunnel's stream has nothing to replay: the endpoint's TCP connection is all.
    let hello = Arc::new(match &mut down {
        Downstream::Passthrough { hello, .. } => std::mem::take(hello),
        Downstream::Tunnel(_) => Vec::new(),
    });
    let up = upstream::connect(dest, p.connect, &p.metrics, DIRECTION, |mut s, _t| {
        let hello = hello.clone();
        async move {
            s.write_all(&hello).await?;
            Ok(s)
        }
    })
    .await;
    let up = match up {
        Ok(up) => up,
        Err(e) => {
            rec.error = Some(e.to_string());
            if let Downstream::Tunnel(pending) = &mut down {
                pending.refuse(StatusCode::SERVICE_UNAVAILABLE);
            }
            p.metrics
                .istio
                .refused(istio_labels(p, dest, None).with_flags(ResponseFlags::ConnectFailed));
            return e.result();
        }
    };
    rec.endpoint = Some(up.target.addr);
    rec.bytes_to_upstream = hello.len() as u64;
    // Every connection to one endpoint of one service has the same labels: they are
    // built once, and found by the service and the endpoint after that.
    let target = &up.target;
    let report = p.metrics.istio.open_memo(
        "gateway",
        &[
            &dest.service.hostname,
            &dest.service.name,
            &dest.service.namespace,
            &target.uid,
            &target.network,
        ],
        || {
            let transit = Transit {
                source_network: target.network.clone(),
                destination_network: target.network.clone(),
                transport: Transport::Direct,
            };
            (istio_labels(p, dest, Some(&target.uid)), Some(transit))
        },
    );
    report.add_received(hello.len() as u64);
    let (endpoint, lease) = (up.stream, up.lease);
    let relayed = async {
        match down {
            Downstream::Passthrough { tcp, .. } => {
                relay::relay_tcp_metered(tcp, endpoint, report.meter()).await
            }
            Downstream::Tunnel(pending) => match pending.accept().await {
                Ok(stream) => relay::relay_metered(stream, endpoint, report.meter()).await,
                Err(e) => RelayOutcome::failed(e),
            },
        }
    };
    let result = finish_relay(rec, p.tracker.closing(), relayed).await;
    drop(lease);
    result
}

/// Istio's labels of a connection to `dest` (`-` for the flags), with the endpoint (its
/// uid in the view) once connected.
fn istio_labels(p: &Passthrough, dest: &Destination, endpoint: Option<&str>) -> IstioLabels {
    let m = &p.metrics.istio;
    let destination = endpoint.map_or_else(Peer::default, |uid| {
        m.catalog().endpoint(uid, None).without_principal()
    });
    IstioLabels::new(&Traffic {
        reporter: Reporter::source,
        source: &m.local().peer.without_principal(),
        destination: &destination,
        service: Some(&dest.service),
        security: SecurityPolicy::unknown,
        flags: ResponseFlags::None,
    })
}
