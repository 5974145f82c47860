//! The Watch service: a subscriber names itself, gets a full snapshot of its network's view,
//! then deltas carrying a version, each sent only after the previous one was acknowledged.
//!
//! Acknowledgement is the flow control: while a version is unacknowledged nothing more is
//! sent, and the subscriber's task reads the view's current state when it next sends, so
//! the changes it missed coalesce per key. A subscriber that stops reading holds at most one
//! version in flight and never delays anyone else; no queue grows on its behalf.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use futures_util::Stream;
use isthmus_proto::drain;
use isthmus_proto::grpc::PeerInfo;
use isthmus_proto::identity::{REGISTRY_NAMESPACE, REGISTRY_SERVICE_ACCOUNT};
use isthmus_proto::model::{Node, NodeKind};
use isthmus_proto::pb;
use serde::Serialize;
use tokio::sync::mpsc;
use tonic::{Request, Response, Status, Streaming};
use tracing::Instrument;

use crate::metrics::{KindLabels, PushLabels, RegistryMetrics};
use crate::views::{Catchup, Entry, Resume, View, ViewKey, Views};

/// How long a new stream has to send its Subscribe.
pub const SUBSCRIBE_TIMEOUT: Duration = Duration::from_secs(10);
/// Resources per response when a snapshot is split.
pub const SNAPSHOT_CHUNK: usize = 1000;
/// Encoded bytes per response when a snapshot is split (a part may exceed it only by its one
/// resource). Besides the count, since a stream keeps its encoding buffer as large as the
/// largest message it sent: a 60,000-endpoint view in parts of 1,000 services held ~3 MB
/// per subscriber for as long as it stayed connected.
pub const SNAPSHOT_PART_BYTES: usize = 256 * 1024;
/// Responses buffered between a subscriber's task and its HTTP/2 stream.
const STREAM_BUFFER: usize = 2;

/// What the registry knows of one connected subscriber (for `/debug/subscribers`).
#[derive(Debug)]
pub struct Subscriber {
    pub node: Node,
    pub identity: String,
    pub remote: String,
    pub view: String,
    pub connected_at: SystemTime,
    pub sent_seq: AtomicU64,
    pub acked_seq: AtomicU64,
    pub pushes: AtomicU64,
}

#[derive(Debug, Serialize)]
pub struct SubscriberStatus {
    pub id: String,
    pub kind: &'static str,
    pub network: String,
    pub cluster: String,
    pub identity: String,
    pub remote: String,
    pub view: String,
    pub connected_for_s: u64,
    pub sent_version: u64,
    pub acked_version: u64,
    pub pushes: u64,
}

#[derive(Debug, Default)]
pub struct Subscribers {
    next: AtomicU64,
    map: Mutex<HashMap<u64, Arc<Subscriber>>>,
}

impl Subscribers {
    fn add(&self, s: Subscriber) -> (u64, Arc<Subscriber>) {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let s = Arc::new(s);
        self.map
            .lock()
            .expect("subscribers lock")
            .insert(id, s.clone());
        (id, s)
    }

    fn remove(&self, id: u64) {
        self.map.lock().expect("subscribers lock").remove(&id);
    }

    pub fn len(&self) -> usize {
        self.map.lock().expect("subscribers lock").len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn status(&self) -> Vec<SubscriberStatus> {
        let map = self.map.lock().expect("subscribers lock");
        let mut out: Vec<_> = map
            .values()
            .map(|s| SubscriberStatus {
                id: s.node.id.clone(),
                kind: s.node.kind.as_str(),
                network: s.node.network.clone(),
                cluster: s.node.cluster.clone(),
                identity: s.identity.clone(),
                remote: s.remote.clone(),
                view: s.view.clone(),
                connected_for_s: s.connected_at.elapsed().map(|d| d.as_secs()).unwrap_or(0),
                sent_version: s.sent_seq.load(Ordering::Relaxed),
                acked_version: s.acked_seq.load(Ordering::Relaxed),
                pushes: s.pushes.load(Ordering::Relaxed),
            })
            .collect();
        out.sort_by(|a, b| (&a.network, &a.id).cmp(&(&b.network, &b.id)));
        out
    }
}

#[derive(Debug, Clone)]
pub struct WatchService {
    views: Arc<Views>,
    subscribers: Arc<Subscribers>,
    metrics: RegistryMetrics,
    shutdown: drain::Watch,
}

impl WatchService {
    pub fn new(
        views: Arc<Views>,
        subscribers: Arc<Subscribers>,
        metrics: RegistryMetrics,
        shutdown: drain::Watch,
    ) -> Self {
        Self {
            views,
            subscribers,
            metrics,
            shutdown,
        }
    }

    fn refuse(&self, reason: &'static str, status: Status) -> Status {
        self.metrics
            .watch_refused
            .get_or_create(&KindLabels { kind: reason })
            .inc();
        tracing::warn!(reason, message = status.message(), "watch refused");
        status
    }

    /// The stream's first message: a Subscribe naming the node, and the version it resumes
    /// from; any other start is refused and counted.
    async fn subscribe(
        &self,
        inbound: &mut Streaming<pb::WatchRequest>,
    ) -> Result<(Node, String), Status> {
        let first = match tokio::time::timeout(SUBSCRIBE_TIMEOUT, inbound.message()).await {
            Err(_) => {
                return Err(self.refuse(
                    "no_subscribe",
                    Status::deadline_exceeded("no Subscribe within 10s"),
                ))
            }
            Ok(Err(s)) => return Err(s),
            Ok(Ok(None)) => {
                return Err(self.refuse(
                    "no_subscribe",
                    Status::cancelled("stream closed before Subscribe"),
                ))
            }
            Ok(Ok(Some(m))) => m,
        };
        let Some(pb::watch_request::Request::Subscribe(sub)) = first.request else {
            return Err(self.refuse(
                "bad_subscribe",
                Status::invalid_argument("the first message of a Watch stream must be Subscribe"),
            ));
        };
        let node = sub
            .node
            .ok_or_else(|| Status::invalid_argument("subscribe.node: missing"))
            .and_then(|n| Node::try_from(n).map_err(|e| Status::invalid_argument(e.to_string())))
            .and_then(|n| {
                check_subscriber(&n).map_err(Status::invalid_argument)?;
                Ok(n)
            })
            .map_err(|s| self.refuse("bad_subscribe", s))?;
        Ok((node, sub.resume_version))
    }
}

/// Longest subscriber id accepted (a DNS name's length: ids are names, not documents).
const MAX_NODE_ID: usize = 253;

/// A subscriber's names are checked as the names they are before anything logs or keys on
/// them: the network and cluster as DNS labels, the locality as label values, the id as
/// printable ASCII without spaces (an agent's id holds its address, `:` included), bounded.
/// A refusal quotes the value escaped, so a newline or terminal escape never reaches the log
/// as it came.
fn check_subscriber(node: &Node) -> Result<(), String> {
    use crate::validate::{check_locality, check_network_id, dns_label};
    let id_ok = !node.id.is_empty()
        && node.id.len() <= MAX_NODE_ID
        && node.id.bytes().all(|b| b.is_ascii_graphic());
    if !id_ok {
        return Err(format!(
            "subscribe.node.id {:?}: 1 to {MAX_NODE_ID} printable characters without spaces",
            truncated(&node.id)
        ));
    }
    check_network_id(&node.network)
        .map_err(|e| format!("subscribe.node.network {:?}: {e}", truncated(&node.network)))?;
    if !node.cluster.is_empty() {
        dns_label("cluster", &node.cluster)
            .map_err(|e| format!("subscribe.node.cluster {:?}: {e}", truncated(&node.cluster)))?;
    }
    let locality = node.locality.to_string();
    if !locality.is_empty() {
        check_locality(&locality)
            .map_err(|e| format!("subscribe.node.locality {:?}: {e}", truncated(&locality)))?;
    }
    Ok(())
}

/// At most 64 characters of a refused value, for messages and logs.
fn truncated(s: &str) -> String {
    s.chars().take(64).collect()
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<pb::WatchResponse, Status>> + Send>>;

#[tonic::async_trait]
impl pb::watch_server::Watch for WatchService {
    type WatchStream = WatchStream;

    async fn watch(
        &self,
        request: Request<Streaming<pb::WatchRequest>>,
    ) -> Result<Response<WatchStream>, Status> {
        let peer = request.extensions().get::<PeerInfo>().cloned();
        let Some(identity) = peer.as_ref().and_then(|p| p.identity.clone()) else {
            return Err(self.refuse(
                "unauthenticated",
                Status::unauthenticated(
                    "Watch needs a mesh client certificate; get one with `isthmusctl cert request`",
                ),
            ));
        };
        let mut inbound = request.into_inner();
        let (node, resume_version) = self.subscribe(&mut inbound).await?;
        if node.kind == NodeKind::Peer && !identity.is_registry() {
            return Err(self.refuse(
                "peer_not_allowed",
                Status::permission_denied(format!(
                    "only a registry ({REGISTRY_NAMESPACE}/{REGISTRY_SERVICE_ACCOUNT}) may import this registry's services as a peer; the client is {identity}"
                )),
            ));
        }
        let key = ViewKey::for_subscriber(&node, &identity);
        let view = self.views.view(&key);
        let resume = view.parse_version(&resume_version);
        let (id, sub_state) = self.subscribers.add(Subscriber {
            identity: identity.to_string(),
            remote: peer.map(|p| p.remote.to_string()).unwrap_or_default(),
            view: key.to_string(),
            connected_at: SystemTime::now(),
            sent_seq: AtomicU64::new(0),
            acked_seq: AtomicU64::new(resume.seq.unwrap_or(0)),
            pushes: AtomicU64::new(0),
            node,
        });
        let kind = sub_state.node.kind.as_str();
        self.metrics
            .subscribers
            .get_or_create(&KindLabels { kind })
            .inc();
        tracing::info!(node = %sub_state.node.id, kind, network = %key.network, %identity, resume = ?resume, "subscriber connected");

        let (tx, rx) = mpsc::channel(STREAM_BUFFER);
        let session = Session {
            view,
            tx,
            sub: sub_state.clone(),
            metrics: self.metrics.clone(),
        };
        let subscribers = self.subscribers.clone();
        let metrics = self.metrics.clone();
        let shutdown = self.shutdown.clone();
        // One span per subscriber: every line it logs names the node and its identity.
        let span = tracing::info_span!("watch", node = %sub_state.node.id, %identity, view = %key);
        tokio::spawn(
            async move {
                let result = session.run(inbound, resume, shutdown).await;
                subscribers.remove(id);
                metrics
                    .subscribers
                    .get_or_create(&KindLabels { kind })
                    .dec();
                tracing::info!(?result, "subscriber disconnected");
            }
            .instrument(span),
        );
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }
}

struct Session {
    view: Arc<View>,
    tx: mpsc::Sender<Result<pb::WatchResponse, Status>>,
    sub: Arc<Subscriber>,
    metrics: RegistryMetrics,
}

/// Why a session ended; logged through Debug when the subscriber disconnects.
#[derive(Debug)]
#[allow(dead_code)]
enum End {
    ClientClosed,
    StreamError(String),
    Protocol(String),
    Shutdown,
}

impl Session {
    async fn run(
        self,
        mut inbound: Streaming<pb::WatchRequest>,
        resume: Resume,
        shutdown: drain::Watch,
    ) -> End {
        let mut notify = self.view.subscribe();
        let stop = shutdown.signaled();
        tokio::pin!(stop);
        // The version sent and not yet acknowledged, if any.
        let mut awaiting: Option<u64>;
        let mut sent: Option<u64> = None;
        notify.borrow_and_update();
        let resuming = resume != Resume::default();
        match self.send_catchup(&resume, resuming).await {
            Ok(Some(seq)) => {
                sent = Some(seq);
                awaiting = Some(seq);
            }
            Ok(None) => awaiting = None,
            Err(e) => return e,
        }
        loop {
            tokio::select! {
                _ = &mut stop => return End::Shutdown,
                msg = inbound.message() => match msg {
                    Ok(Some(pb::WatchRequest { request: Some(pb::watch_request::Request::Ack(ack)) })) => {
                        match self.view.parse_version(&ack.version).seq {
                            Some(v) if Some(v) == awaiting => {
                                awaiting = None;
                                self.sub.acked_seq.store(v, Ordering::Relaxed);
                            }
                            // A stale or foreign ack is ignored; the current one is still awaited.
                            _ => tracing::debug!(version = %ack.version, "ack for a version not awaited"),
                        }
                    }
                    Ok(Some(_)) => {
                        let msg = "only Ack may follow Subscribe on a Watch stream";
                        let _ = self.tx.send(Err(Status::invalid_argument(msg))).await;
                        return End::Protocol(msg.into());
                    }
                    Ok(None) => return End::ClientClosed,
                    Err(s) => return End::StreamError(s.message().to_string()),
                },
                changed = notify.changed(), if awaiting.is_none() => {
                    if changed.is_err() {
                        return End::Shutdown;
                    }
                }
            }
            if awaiting.is_none() && self.view.seq() != sent.unwrap_or(u64::MAX) {
                notify.borrow_and_update();
                let from = Resume {
                    seq: sent,
                    digest: None,
                };
                match self.send_catchup(&from, false).await {
                    Ok(Some(seq)) => {
                        sent = Some(seq);
                        awaiting = Some(seq);
                    }
                    Ok(None) => {}
                    Err(e) => return e,
                }
            }
        }
    }

    /// Sends what the subscriber at `from` is missing; returns the version sent, if any.
    /// `confirm` sends an empty delta even when nothing changed (a resume acknowledgement).
    async fn send_catchup(&self, from: &Resume, confirm: bool) -> Result<Option<u64>, End> {
        let (seq, kind, oldest) = match self.view.catchup(from) {
            Catchup::UpToDate { .. } if !confirm => return Ok(None),
            Catchup::UpToDate { version, seq } => {
                self.send(response(version, false, Vec::new(), Vec::new(), false))
                    .await?;
                (seq, "resume", None)
            }
            Catchup::Delta {
                version,
                seq,
                upserts,
                removals,
                oldest_change,
            } => {
                let upserts = upserts.iter().map(Entry::decode).collect();
                self.send(response(version, false, upserts, removals, false))
                    .await?;
                (seq, if confirm { "resume" } else { "delta" }, oldest_change)
            }
            Catchup::Snapshot {
                version,
                seq,
                entries,
            } => {
                let chunks = snapshot_parts(
                    &entries,
                    Entry::encoded_len,
                    SNAPSHOT_CHUNK,
                    SNAPSHOT_PART_BYTES,
                );
                if chunks.is_empty() {
                    self.send(response(
                        version.clone(),
                        true,
                        Vec::new(),
                        Vec::new(),
                        false,
                    ))
                    .await?;
                }
                // Each part is copied out of the view only when the stream can take it: a
                // snapshot copied whole before sending held a second copy of the view per
                // subscriber receiving one (about 90 MB for a 100,000-endpoint view).
                for (i, chunk) in chunks.iter().enumerate() {
                    let upserts = chunk.iter().map(Entry::decode).collect();
                    self.send(response(
                        version.clone(),
                        i == 0,
                        upserts,
                        Vec::new(),
                        i + 1 < chunks.len(),
                    ))
                    .await?;
                }
                // Building the view on first use and encoding its parts leave free pages
                // behind; a snapshot of several parts is worth handing them back.
                if chunks.len() > 1 {
                    isthmus_proto::allocator::release_free_memory();
                }
                (seq, "snapshot", None)
            }
        };
        if let Some(t) = oldest {
            self.metrics
                .push_latency
                .observe(Instant::now().duration_since(t).as_secs_f64());
        }
        self.metrics
            .pushes
            .get_or_create(&PushLabels { r#type: kind })
            .inc();
        self.sub.sent_seq.store(seq, Ordering::Relaxed);
        self.sub.pushes.fetch_add(1, Ordering::Relaxed);
        Ok(Some(seq))
    }

    async fn send(&self, r: pb::WatchResponse) -> Result<(), End> {
        self.tx.send(Ok(r)).await.map_err(|_| End::ClientClosed)
    }
}

/// A snapshot's resources in parts of at most `max_resources` and about `max_bytes` each
/// (`encoded_len`: a resource's encoded size).
fn snapshot_parts<T>(
    entries: &[T],
    encoded_len: impl Fn(&T) -> usize,
    max_resources: usize,
    max_bytes: usize,
) -> Vec<&[T]> {
    let mut parts = Vec::new();
    let (mut start, mut bytes) = (0, 0);
    for (i, e) in entries.iter().enumerate() {
        let len = encoded_len(e);
        if i > start && (i - start == max_resources || bytes + len > max_bytes) {
            parts.push(&entries[start..i]);
            (start, bytes) = (i, 0);
        }
        bytes += len;
    }
    if start < entries.len() {
        parts.push(&entries[start..]);
    }
    parts
}

fn response(
    version: String,
    snapshot: bool,
    upserts: Vec<pb::ViewResource>,
    removals: Vec<String>,
    more: bool,
) -> pb::WatchResponse {
    pb::WatchResponse {
        version,
        snapshot,
        upserts,
        removals,
        more,
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use isthmus_proto::pb;

    use super::snapshot_parts;

    fn len(r: &Arc<pb::ViewResource>) -> usize {
        prost::Message::encoded_len(r.as_ref())
    }

    fn resource(key: usize, bytes: usize) -> Arc<pb::ViewResource> {
        Arc::new(pb::ViewResource {
            key: format!("svc/{key}{}", "x".repeat(bytes)),
            ..Default::default()
        })
    }

    #[test]
    fn snapshot_parts_are_bounded_by_count_and_by_bytes_and_keep_every_resource_in_order() {
        let small: Vec<_> = (0..2500).map(|i| resource(i, 0)).collect();
        let parts = snapshot_parts(&small, len, 1000, 1 << 20);
        assert_eq!(
            parts.iter().map(|p| p.len()).collect::<Vec<_>>(),
            [1000, 1000, 500]
        );
        // Big resources: parts close at the byte limit, a single oversized one goes alone.
        let big: Vec<_> = (0..10)
            .map(|i| resource(i, if i == 4 { 5000 } else { 300 }))
            .collect();
        let parts = snapshot_parts(&big, len, 1000, 1000);
        for p in &parts {
            let bytes: usize = p.iter().map(len).sum();
            assert!(
                p.len() == 1 || bytes <= 1000,
                "{} resources, {bytes} bytes",
                p.len()
            );
        }
        let keys: Vec<&str> = parts
            .iter()
            .flat_map(|p| p.iter())
            .map(|r| r.key.as_str())
            .collect();
        let all: Vec<&str> = big.iter().map(|r| r.key.as_str()).collect();
        assert_eq!(keys, all);
        assert!(parts.iter().any(|p| p.len() == 1 && p[0].key.len() > 5000));
        assert!(snapshot_parts::<Arc<pb::ViewResource>>(&[], len, 1000, 1000).is_empty());
    }
}
