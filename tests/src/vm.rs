//! A scriptable VM registration client: what a VM agent says on its Registration stream
//! (Hello, health reports, Deregister), one call per request, each returning the registry's
//! acknowledgement or its refusal. Tests of the registry and of the agent use it to play
//! the VM, or a misbehaving one.

use std::collections::BTreeMap;
use std::net::IpAddr;

use isthmus_proto::pb;
use isthmus_proto::registration::{HealthReport, Hello, RegisterAck, RegisterRequest};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;
use tonic::{Status, Streaming};

/// A Hello for `group` in `namespace` from `address` on `network` (empty: the template's).
pub fn hello(group: &str, namespace: &str, address: &str, network: &str) -> Hello {
    let address: IpAddr = address.parse().expect("an IP address");
    Hello {
        network: network.to_string(),
        ..Hello::new(group, namespace, address)
    }
}

/// `hello` with extra labels.
pub fn with_labels(mut hello: Hello, labels: &[(&str, &str)]) -> Hello {
    hello.labels = labels
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect::<BTreeMap<_, _>>();
    hello
}

/// One open Registration stream.
pub struct Registrar {
    requests: mpsc::Sender<pb::RegisterRequest>,
    responses: Streaming<pb::RegisterResponse>,
    /// The acknowledgement of the Hello.
    pub ack: RegisterAck,
}

impl std::fmt::Debug for Registrar {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registrar").field("ack", &self.ack).finish()
    }
}

impl Registrar {
    /// Opens a stream on `channel` (whose client certificate is the VM's identity) and
    /// registers with `hello`. A refusal is the registry's status.
    pub async fn register(channel: Channel, hello: &Hello) -> Result<Self, Status> {
        Self::open(
            channel,
            pb::RegisterRequest::from(&RegisterRequest::Hello(hello.clone())),
        )
        .await
    }

    /// Opens a stream whose first request is `first`, whatever it is (for protocol tests).
    pub async fn open(channel: Channel, first: pb::RegisterRequest) -> Result<Self, Status> {
        let (tx, rx) = mpsc::channel(4);
        tx.send(first)
            .await
            .map_err(|_| Status::internal("request channel closed"))?;
        let mut client = pb::registration_client::RegistrationClient::new(channel);
        let responses = client.register(ReceiverStream::new(rx)).await?.into_inner();
        let mut registrar = Self {
            requests: tx,
            responses,
            ack: RegisterAck {
                entry_name: String::new(),
                namespace: String::new(),
                health: Default::default(),
                warnings: Vec::new(),
                resumed: false,
            },
        };
        registrar.ack = registrar.next_ack().await?;
        Ok(registrar)
    }

    /// Reports the VM's health; returns the ack (the entry's health in the catalog now).
    pub async fn health(&mut self, healthy: bool, reason: &str) -> Result<RegisterAck, Status> {
        self.send(RegisterRequest::Health(HealthReport {
            healthy,
            reason: reason.to_string(),
        }))
        .await
    }

    /// Removes the entry and ends the stream.
    pub async fn deregister(mut self) -> Result<RegisterAck, Status> {
        self.send(RegisterRequest::Deregister).await
    }

    /// Sends one request and waits for its ack.
    pub async fn send(&mut self, req: RegisterRequest) -> Result<RegisterAck, Status> {
        self.requests
            .send(pb::RegisterRequest::from(&req))
            .await
            .map_err(|_| Status::internal("request channel closed"))?;
        self.next_ack().await
    }

    /// Waits until the registry ends the stream; returns its status (`Ok` for a clean end,
    /// e.g. ABORTED when a newer stream of the same VM took over).
    pub async fn closed(&mut self) -> Status {
        loop {
            match self.responses.message().await {
                Ok(Some(_)) => continue,
                Ok(None) => return Status::ok("stream ended"),
                Err(s) => return s,
            }
        }
    }

    async fn next_ack(&mut self) -> Result<RegisterAck, Status> {
        let resp = self
            .responses
            .message()
            .await?
            .ok_or_else(|| Status::unavailable("the registry ended the stream"))?;
        RegisterAck::try_from(resp).map_err(|e| Status::internal(e.to_string()))
    }
}
