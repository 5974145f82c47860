//! The Registration protocol in the mesh's model: what a VM agent says on its stream (a
//! Hello, health reports, a Deregister) and what the registry acknowledges, converted once
//! from protobuf with every problem named by its field; and the name a registered VM's
//! WorkloadEntry gets, so the agent and the registry agree on it; and [`Registrar`], the
//! client side of one stream.

use std::collections::BTreeMap;
use std::net::IpAddr;

use crate::identity::validate_dns_label;
use crate::model::{port_or_zero, Health, Locality, ModelError, WorkloadGroup};
use crate::pb;
use crate::pb::register_request::Request as PbRequest;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;
use tonic::{Status, Streaming};

/// The first message of a registration stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    /// The WorkloadGroup to register from.
    pub group: String,
    /// The group's namespace.
    pub namespace: String,
    /// The VM's address, as other workloads on its network reach it.
    pub address: IpAddr,
    /// The VM's network; empty means the group template's.
    pub network: String,
    /// Empty means the group template's.
    pub locality: Locality,
    /// Labels the VM adds to the template's.
    pub labels: BTreeMap<String, String>,
    /// The port on `address` where the VM's agent accepts tunnels (HBONE); 0: it accepts
    /// none.
    pub tunnel_port: u16,
}

impl Hello {
    /// A Hello with no network, locality or labels of its own, accepting no tunnels.
    pub fn new(group: &str, namespace: &str, address: IpAddr) -> Self {
        Self {
            group: group.to_string(),
            namespace: namespace.to_string(),
            address,
            network: String::new(),
            locality: Locality::default(),
            labels: BTreeMap::new(),
            tunnel_port: 0,
        }
    }

    /// The name of the WorkloadEntry this Hello registers (see [`entry_name`]).
    pub fn entry_name(&self) -> String {
        entry_name(&self.group, &self.address, &self.network)
    }
}

/// A VM's readiness, as its agent's probe last saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthReport {
    pub healthy: bool,
    pub reason: String,
}

impl HealthReport {
    pub fn health(&self) -> Health {
        if self.healthy {
            Health::Healthy
        } else {
            Health::Unhealthy
        }
    }
}

/// One request on a registration stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RegisterRequest {
    Hello(Hello),
    Health(HealthReport),
    Deregister,
}

/// The registry's acknowledgement of one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegisterAck {
    pub entry_name: String,
    pub namespace: String,
    /// The entry's health in the catalog once the request was applied.
    pub health: Health,
    /// Parts of the request the registry ignored, each saying why.
    pub warnings: Vec<String>,
    /// The registration took over an entry that already existed (a reconnect within the
    /// grace period, or a second stream of the same VM).
    pub resumed: bool,
    /// The WorkloadGroup the entry was built from (its probe and ports), when the registry
    /// sent it.
    pub group: Option<WorkloadGroup>,
}

/// The WorkloadEntry name of a VM registered from `group`: `<group>-<address>` with `.` and
/// `:` turned into `-`, then `-<network>` when the VM names its network (Istio's naming for
/// auto-registered entries, so two VMs with the same address on different networks get
/// different entries).
pub fn entry_name(group: &str, address: &IpAddr, network: &str) -> String {
    let mut name = format!("{group}-{}", address.to_string().replace(['.', ':'], "-"));
    if !network.is_empty() {
        name.push('-');
        name.push_str(network);
    }
    name
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
                group: None,
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

fn invalid(field: &str, why: impl Into<String>) -> ModelError {
    ModelError::Invalid {
        field: field.to_string(),
        why: why.into(),
    }
}

/// A Kubernetes object name (DNS-1123 subdomain): dot-separated labels, 253 bytes at most.
fn check_object_name(field: &str, name: &str) -> Result<(), ModelError> {
    if name.is_empty() {
        return Err(invalid(field, "is required"));
    }
    if name.len() > 253 {
        return Err(invalid(
            field,
            format!("{name:?} is longer than 253 characters"),
        ));
    }
    for label in name.split('.') {
        validate_dns_label("name", label).map_err(|e| invalid(field, e.to_string()))?;
    }
    Ok(())
}

/// The VM's address: an IP that other workloads can dial.
fn parse_address(field: &str, s: &str) -> Result<IpAddr, ModelError> {
    if s.is_empty() {
        return Err(invalid(field, "is required (the VM's IP address)"));
    }
    let ip: IpAddr = s
        .parse()
        .map_err(|_| invalid(field, format!("{s:?} is not an IP address")))?;
    let what = if ip.is_unspecified() {
        Some("the unspecified address")
    } else if ip.is_loopback() {
        Some("a loopback address")
    } else if ip.is_multicast() {
        Some("a multicast address")
    } else if matches!(ip, IpAddr::V4(v4) if v4.is_broadcast()) {
        Some("the broadcast address")
    } else {
        None
    };
    match what {
        Some(what) => Err(invalid(
            field,
            format!("{ip} is {what}; register the address other workloads reach the VM at"),
        )),
        None => Ok(ip),
    }
}

impl TryFrom<pb::register_request::Hello> for Hello {
    type Error = ModelError;
    fn try_from(h: pb::register_request::Hello) -> Result<Self, ModelError> {
        check_object_name("hello.group", &h.group)?;
        if h.namespace.is_empty() {
            return Err(invalid("hello.namespace", "is required"));
        }
        validate_dns_label("namespace", &h.namespace)
            .map_err(|e| invalid("hello.namespace", e.to_string()))?;
        let address = parse_address("hello.address", &h.address)?;
        if !h.network.is_empty() {
            validate_dns_label("network", &h.network)
                .map_err(|e| invalid("hello.network", e.to_string()))?;
        }
        Ok(Hello {
            group: h.group,
            namespace: h.namespace,
            address,
            network: h.network,
            locality: h.locality.into(),
            labels: h.labels.into_iter().collect(),
            tunnel_port: port_or_zero("hello.tunnel_port", h.tunnel_port)?,
        })
    }
}

impl From<&Hello> for pb::register_request::Hello {
    fn from(h: &Hello) -> Self {
        Self {
            group: h.group.clone(),
            namespace: h.namespace.clone(),
            address: h.address.to_string(),
            network: h.network.clone(),
            locality: Some((&h.locality).into()),
            labels: h.labels.clone().into_iter().collect(),
            tunnel_port: h.tunnel_port.into(),
        }
    }
}

impl TryFrom<pb::RegisterRequest> for RegisterRequest {
    type Error = ModelError;
    fn try_from(r: pb::RegisterRequest) -> Result<Self, ModelError> {
        Ok(match r.request.ok_or(ModelError::MissingKind)? {
            PbRequest::Hello(h) => RegisterRequest::Hello(h.try_into()?),
            PbRequest::Health(h) => RegisterRequest::Health(HealthReport {
                healthy: h.healthy,
                reason: h.reason,
            }),
            PbRequest::Deregister(_) => RegisterRequest::Deregister,
        })
    }
}

impl From<&RegisterRequest> for pb::RegisterRequest {
    fn from(r: &RegisterRequest) -> Self {
        let request = match r {
            RegisterRequest::Hello(h) => PbRequest::Hello(h.into()),
            RegisterRequest::Health(h) => PbRequest::Health(pb::register_request::Health {
                healthy: h.healthy,
                reason: h.reason.clone(),
            }),
            RegisterRequest::Deregister => {
                PbRequest::Deregister(pb::register_request::Deregister {})
            }
        };
        Self {
            request: Some(request),
        }
    }
}

impl From<&RegisterAck> for pb::RegisterResponse {
    fn from(a: &RegisterAck) -> Self {
        Self {
            response: Some(pb::register_response::Response::Ack(
                pb::register_response::Ack {
                    entry_name: a.entry_name.clone(),
                    namespace: a.namespace.clone(),
                    health: match a.health {
                        Health::Healthy => pb::Health::Healthy,
                        Health::Unhealthy => pb::Health::Unhealthy,
                    }
                    .into(),
                    warnings: a.warnings.clone(),
                    resumed: a.resumed,
                    group: a.group.as_ref().map(Into::into),
                },
            )),
        }
    }
}

impl TryFrom<pb::RegisterResponse> for RegisterAck {
    type Error = ModelError;
    fn try_from(r: pb::RegisterResponse) -> Result<Self, ModelError> {
        let pb::register_response::Response::Ack(a) = r.response.ok_or(ModelError::MissingKind)?;
        let health = match a.health() {
            pb::Health::Healthy => Health::Healthy,
            pb::Health::Unhealthy => Health::Unhealthy,
            pb::Health::Unspecified => return Err(invalid("ack.health", "is missing")),
        };
        Ok(RegisterAck {
            entry_name: a.entry_name,
            namespace: a.namespace,
            health,
            warnings: a.warnings,
            resumed: a.resumed,
            group: a.group.map(WorkloadGroup::try_from).transpose()?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pb_hello(address: &str) -> pb::register_request::Hello {
        pb::register_request::Hello {
            group: "vm-web".into(),
            namespace: "shop".into(),
            address: address.into(),
            ..Default::default()
        }
    }

    #[test]
    fn entry_names_follow_istio() {
        let v4: IpAddr = "10.1.0.5".parse().unwrap();
        let v6: IpAddr = "2001:db8::1".parse().unwrap();
        assert_eq!(entry_name("vm-web", &v4, ""), "vm-web-10-1-0-5");
        assert_eq!(
            entry_name("vm-web", &v4, "network-a"),
            "vm-web-10-1-0-5-network-a"
        );
        assert_eq!(entry_name("vm-web", &v6, ""), "vm-web-2001-db8--1");
    }

    #[test]
    fn hello_round_trips_through_protobuf() {
        let mut h = Hello::new("vm-web", "shop", "10.1.0.5".parse().unwrap());
        h.network = "network-a".into();
        h.locality = Locality::parse("eu/eu-1a");
        h.labels.insert("version".into(), "v2".into());
        h.tunnel_port = 15008;
        let req = RegisterRequest::Hello(h);
        let back = RegisterRequest::try_from(pb::RegisterRequest::from(&req)).unwrap();
        assert_eq!(back, req);
    }

    #[test]
    fn bad_hellos_name_the_field() {
        for (address, want) in [
            ("", "is required"),
            ("10.0.0.300", "is not an IP address"),
            ("vm.example.com", "is not an IP address"),
            ("127.0.0.1", "loopback"),
            ("0.0.0.0", "unspecified"),
            ("::", "unspecified"),
            ("ff02::1", "multicast"),
            ("255.255.255.255", "broadcast"),
        ] {
            let err = Hello::try_from(pb_hello(address)).unwrap_err().to_string();
            assert!(
                err.starts_with("hello.address: ") && err.contains(want),
                "{address:?}: {err}"
            );
        }
        let mut h = pb_hello("10.0.0.1");
        h.group = String::new();
        let err = Hello::try_from(h).unwrap_err().to_string();
        assert!(err.starts_with("hello.group: "), "{err}");
        let mut h = pb_hello("10.0.0.1");
        h.namespace = "Shop".into();
        let err = Hello::try_from(h).unwrap_err().to_string();
        assert!(err.starts_with("hello.namespace: "), "{err}");
        let mut h = pb_hello("10.0.0.1");
        h.network = "net_a".into();
        let err = Hello::try_from(h).unwrap_err().to_string();
        assert!(err.starts_with("hello.network: "), "{err}");
        let mut h = pb_hello("10.0.0.1");
        h.tunnel_port = 70000;
        let err = Hello::try_from(h).unwrap_err().to_string();
        assert!(err.starts_with("hello.tunnel_port: "), "{err}");
    }

    #[test]
    fn ack_round_trips_through_protobuf() {
        let ack = RegisterAck {
            entry_name: "vm-web-10-1-0-5".into(),
            namespace: "shop".into(),
            health: Health::Unhealthy,
            warnings: vec!["labels.app: ignored".into()],
            resumed: true,
            group: Some(WorkloadGroup {
                name: "vm-web".into(),
                namespace: "shop".into(),
                ..Default::default()
            }),
        };
        assert_eq!(
            RegisterAck::try_from(pb::RegisterResponse::from(&ack)).unwrap(),
            ack
        );
    }
}
