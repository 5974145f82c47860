//! The subscriber side of Watch: open a stream, apply the snapshot and deltas to a local
//! copy of the view, acknowledge each version, resume from the last one after a reconnect.

use std::collections::BTreeMap;

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;
use tonic::Streaming;

use crate::model::{ModelError, Node, ViewResource};
use crate::pb;

#[derive(Debug, thiserror::Error)]
pub enum WatchError {
    #[error("the registry refused the Watch: {code:?}: {message}")]
    Refused { code: tonic::Code, message: String },
    #[error("the Watch stream ended")]
    Closed,
    #[error("the registry sent a resource this client cannot read: {0}")]
    BadResource(#[from] ModelError),
}

impl From<tonic::Status> for WatchError {
    fn from(s: tonic::Status) -> Self {
        WatchError::Refused {
            code: s.code(),
            message: s.message().to_string(),
        }
    }
}

/// The subscriber's copy of its view.
#[derive(Debug, Clone, Default)]
pub struct LocalView {
    pub version: String,
    pub resources: BTreeMap<String, ViewResource>,
}

/// What one complete version changed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Update {
    pub version: String,
    pub snapshot: bool,
    pub upserted: Vec<String>,
    pub removed: Vec<String>,
    /// Responses (parts) this version arrived in.
    pub parts: usize,
}

/// One open Watch stream.
pub struct Subscription {
    requests: mpsc::Sender<pb::WatchRequest>,
    responses: Streaming<pb::WatchResponse>,
    pub view: LocalView,
}

impl std::fmt::Debug for Subscription {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Subscription")
            .field("version", &self.view.version)
            .finish()
    }
}

impl Subscription {
    /// Subscribes as `node`; with `resume`, the view and version a previous stream left.
    pub async fn open(
        channel: Channel,
        node: &Node,
        resume: Option<LocalView>,
    ) -> Result<Self, WatchError> {
        let view = resume.unwrap_or_default();
        let (tx, rx) = mpsc::channel(4);
        tx.send(pb::WatchRequest {
            request: Some(pb::watch_request::Request::Subscribe(pb::Subscribe {
                node: Some(node.into()),
                resume_version: view.version.clone(),
            })),
        })
        .await
        .map_err(|_| WatchError::Closed)?;
        let mut client = pb::watch_client::WatchClient::new(channel)
            .max_decoding_message_size(crate::grpc::DEFAULT_MAX_MESSAGE_BYTES);
        let responses = client.watch(ReceiverStream::new(rx)).await?.into_inner();
        Ok(Self {
            requests: tx,
            responses,
            view,
        })
    }

    /// Receives the next complete version, applies it and acknowledges it.
    pub async fn next(&mut self) -> Result<Update, WatchError> {
        let update = self.receive().await?;
        self.ack(&update.version).await?;
        Ok(update)
    }

    /// Receives and applies the next complete version without acknowledging it.
    pub async fn receive(&mut self) -> Result<Update, WatchError> {
        let mut update = Update::default();
        loop {
            let resp = self.responses.message().await?.ok_or(WatchError::Closed)?;
            if resp.snapshot {
                self.view.resources.clear();
                update.snapshot = true;
            }
            for r in resp.upserts {
                let key = r.key.clone();
                let res = ViewResource::try_from(r)?;
                self.view.resources.insert(key.clone(), res);
                update.upserted.push(key);
            }
            for k in resp.removals {
                self.view.resources.remove(&k);
                update.removed.push(k);
            }
            update.parts += 1;
            update.version = resp.version.clone();
            if !resp.more {
                self.view.version = resp.version;
                return Ok(update);
            }
        }
    }

    pub async fn ack(&mut self, version: &str) -> Result<(), WatchError> {
        self.requests
            .send(pb::WatchRequest {
                request: Some(pb::watch_request::Request::Ack(pb::Ack {
                    version: version.to_string(),
                })),
            })
            .await
            .map_err(|_| WatchError::Closed)
    }

    /// Sends a raw request (for tests of protocol errors).
    pub async fn send_raw(&mut self, req: pb::WatchRequest) -> Result<(), WatchError> {
        self.requests
            .send(req)
            .await
            .map_err(|_| WatchError::Closed)
    }
}
