//! The Registration gRPC service: one stream per VM agent. The handler authenticates the
//! caller, reads its Hello and registers the entry before it answers, so a refusal is the
//! call's status; then one task per stream applies health reports and the Deregister, and
//! releases the lease when the stream ends.

use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures_util::Stream;
use isthmus_proto::drain;
use isthmus_proto::grpc::PeerInfo;
use isthmus_proto::identity::TrustDomain;
use isthmus_proto::model::{workload_group_key, Health, Resource, WorkloadGroup};
use isthmus_proto::pb;
use isthmus_proto::registration::{Hello, RegisterAck, RegisterRequest};
use tokio::sync::{mpsc, oneshot};
use tonic::{Request, Response, Status, Streaming};
use tracing::Instrument;

use super::entry::{entry_from_group, group_identity};
use super::error::{status_of, RegistrationError};
use super::metrics::{RefusedLabels, RegistrationMetrics, TakeoverLabels};
use crate::sources::vm_registrations::{Holder, StreamId, Takeover, VmRegistrations};
use crate::views::Views;

/// How long a new stream has to send its Hello.
pub const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// Responses buffered between a stream's task and its HTTP/2 stream: one ack per request,
/// and an agent waits for each before it sends the next.
const STREAM_BUFFER: usize = 4;

#[derive(Debug, Clone)]
pub struct RegistrationService {
    registrations: Arc<VmRegistrations>,
    views: Arc<Views>,
    trust_domain: TrustDomain,
    metrics: RegistrationMetrics,
    shutdown: drain::Watch,
}

type RegisterStream = Pin<Box<dyn Stream<Item = Result<pb::RegisterResponse, Status>> + Send>>;

impl RegistrationService {
    pub fn new(
        registrations: Arc<VmRegistrations>,
        views: Arc<Views>,
        trust_domain: TrustDomain,
        metrics: RegistrationMetrics,
        shutdown: drain::Watch,
    ) -> Self {
        Self {
            registrations,
            views,
            trust_domain,
            metrics,
            shutdown,
        }
    }

    fn group(&self, hello: &Hello) -> Result<WorkloadGroup, RegistrationError> {
        let key = workload_group_key(&hello.namespace, &hello.group);
        self.views
            .with_catalog(|c| match c.get(&key).map(|r| &*r.resource) {
                Some(Resource::WorkloadGroup(g)) => Some(g.as_ref().clone()),
                _ => None,
            })
            .ok_or_else(|| RegistrationError::UnknownGroup {
                namespace: hello.namespace.clone(),
                group: hello.group.clone(),
            })
    }

    /// Everything up to the first Ack: authenticate, read and check the Hello, register.
    async fn open(
        &self,
        peer: Option<PeerInfo>,
        mut inbound: Streaming<pb::RegisterRequest>,
    ) -> Result<(Holder, RegisterAck, Streaming<pb::RegisterRequest>), RegistrationError> {
        let caller = peer
            .as_ref()
            .and_then(|p| p.identity.clone())
            .ok_or(RegistrationError::Unauthenticated)?;
        let first = match tokio::time::timeout(HELLO_TIMEOUT, inbound.message()).await {
            Err(_) => return Err(RegistrationError::NoHello(HELLO_TIMEOUT)),
            Ok(Ok(None)) => return Err(RegistrationError::ClosedBeforeHello),
            Ok(Err(s)) => return Err(RegistrationError::BrokenBeforeHello(s)),
            Ok(Ok(Some(m))) => m,
        };
        let RegisterRequest::Hello(hello) = RegisterRequest::try_from(first)? else {
            return Err(RegistrationError::NotHello);
        };
        let group = self.group(&hello)?;
        let expected = group_identity(&self.trust_domain, &group)?;
        if caller != expected {
            return Err(RegistrationError::IdentityMismatch {
                caller: caller.to_string(),
                expected: expected.to_string(),
                namespace: group.namespace.clone(),
                group: group.name.clone(),
            });
        }
        let now = SystemTime::now();
        let (workload, warnings) = entry_from_group(&group, &hello, caller, now)?;
        let remote = peer.map(|p| p.remote.to_string()).unwrap_or_default();
        let holder = self
            .registrations
            .register(workload, &group.name, remote, now)
            .await?;
        let ack = RegisterAck {
            entry_name: holder.workload.name.clone(),
            namespace: holder.workload.namespace.clone(),
            health: holder.workload.health,
            warnings,
            resumed: holder.takeover != Takeover::New,
            group: Some(group),
        };
        Ok((holder, ack, inbound))
    }
}

#[tonic::async_trait]
impl pb::registration_server::Registration for RegistrationService {
    type RegisterStream = RegisterStream;

    async fn register(
        &self,
        request: Request<Streaming<pb::RegisterRequest>>,
    ) -> Result<Response<RegisterStream>, Status> {
        let peer = request.extensions().get::<PeerInfo>().cloned();
        let remote = peer.as_ref().map(|p| p.remote);
        let (holder, ack, inbound) = match self.open(peer, request.into_inner()).await {
            Ok(opened) => opened,
            Err(e) => {
                let reason = e.reason();
                self.metrics
                    .refused
                    .get_or_create(&RefusedLabels { reason })
                    .inc();
                tracing::warn!(reason, error = %e, ?remote, "VM registration refused");
                return Err(status_of(&e));
            }
        };
        let takeover = holder.takeover.as_str();
        self.metrics
            .accepted
            .get_or_create(&TakeoverLabels { takeover })
            .inc();
        let w = &holder.workload;
        let identity = w
            .identity
            .as_ref()
            .map(|i| i.to_string())
            .unwrap_or_default();
        let span = tracing::info_span!("registration", entry = %format!("{}/{}", w.namespace, w.name), %identity);
        span.in_scope(|| {
            tracing::info!(address = %w.address, network = %w.network, health = ?w.health, takeover, ?remote, warnings = ?ack.warnings, "VM registered");
        });

        let (tx, rx) = mpsc::channel(STREAM_BUFFER);
        // The first ack fits: the channel is new.
        let _ = tx.try_send(Ok(pb::RegisterResponse::from(&ack)));
        let session = Session {
            registrations: self.registrations.clone(),
            key: holder.key,
            stream: holder.stream,
            entry_name: ack.entry_name,
            namespace: ack.namespace,
            tx,
        };
        let shutdown = self.shutdown.clone();
        tokio::spawn(
            async move {
                let end = session.run(inbound, holder.superseded, shutdown).await;
                tracing::info!(?end, "VM registration stream ended");
            }
            .instrument(span),
        );
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }
}

/// One registration stream after its Hello.
struct Session {
    registrations: Arc<VmRegistrations>,
    key: String,
    stream: StreamId,
    entry_name: String,
    namespace: String,
    tx: mpsc::Sender<Result<pb::RegisterResponse, Status>>,
}

/// Why a stream ended; logged through Debug.
#[derive(Debug)]
#[allow(dead_code)]
enum End {
    Deregistered,
    /// Without a Deregister: the entry waits out the grace period.
    Disconnected(String),
    /// A newer stream of the same VM took the entry over.
    Superseded {
        by: String,
    },
    Shutdown,
}

impl Session {
    async fn run(
        self,
        mut inbound: Streaming<pb::RegisterRequest>,
        mut superseded: oneshot::Receiver<String>,
        shutdown: drain::Watch,
    ) -> End {
        let stop = shutdown.signaled();
        tokio::pin!(stop);
        loop {
            let msg = tokio::select! {
                _ = &mut stop => {
                    self.registrations.forget_stream(self.stream).await;
                    let _ = self.tx.send(Err(Status::unavailable("the registry is shutting down; register again"))).await;
                    return End::Shutdown;
                }
                by = &mut superseded => {
                    let by = by.unwrap_or_default();
                    let msg = format!("a newer registration of {}/{} (from {by}) took the entry over", self.namespace, self.entry_name);
                    let _ = self.tx.send(Err(Status::aborted(msg))).await;
                    return End::Superseded { by };
                }
                msg = inbound.message() => msg,
            };
            let request = match msg {
                Ok(Some(m)) => m,
                Ok(None) => return self.disconnect("the agent closed the stream").await,
                Err(s) => {
                    return self
                        .disconnect(&format!("stream error: {}", s.message()))
                        .await
                }
            };
            let (health, warnings) = match RegisterRequest::try_from(request) {
                Ok(RegisterRequest::Health(report)) => {
                    match self
                        .registrations
                        .set_health(&self.key, self.stream, report.health(), SystemTime::now())
                        .await
                    {
                        Ok(Some(health)) => {
                            tracing::info!(?health, reason = %report.reason, "VM health reported");
                            (health, Vec::new())
                        }
                        // Taken over meanwhile: the superseded signal ends this stream next.
                        Ok(None) => continue,
                        Err(e) => (
                            report.health(),
                            vec![format!("the registry could not store this report yet ({e}); it keeps retrying")],
                        ),
                    }
                }
                Ok(RegisterRequest::Deregister) => {
                    let warnings = match self.registrations.deregister(&self.key, self.stream).await
                    {
                        Ok(_) => Vec::new(),
                        Err(e) => vec![format!(
                            "the registry could not store the removal yet ({e}); it keeps retrying"
                        )],
                    };
                    tracing::info!("VM deregistered");
                    self.ack(Health::Unhealthy, warnings).await;
                    return End::Deregistered;
                }
                Ok(RegisterRequest::Hello(_)) => {
                    return self.refuse(RegistrationError::SecondHello).await;
                }
                Err(e) => return self.refuse(e.into()).await,
            };
            self.ack(health, warnings).await;
        }
    }

    async fn ack(&self, health: Health, warnings: Vec<String>) {
        let ack = RegisterAck {
            entry_name: self.entry_name.clone(),
            namespace: self.namespace.clone(),
            health,
            warnings,
            resumed: false,
            group: None,
        };
        let _ = self.tx.send(Ok(pb::RegisterResponse::from(&ack))).await;
    }

    async fn disconnect(&self, why: &str) -> End {
        self.registrations
            .disconnect(&self.key, self.stream, SystemTime::now())
            .await;
        End::Disconnected(why.to_string())
    }

    /// A bad request mid-stream ends it; the entry waits out the grace period as after any
    /// other disconnect.
    async fn refuse(&self, e: RegistrationError) -> End {
        let _ = self.tx.send(Err(status_of(&e))).await;
        self.disconnect(&e.to_string()).await
    }
}
