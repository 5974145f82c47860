//! The isthmus `Network` kind: a network's gateways and, optionally, its CIDRs.

use std::net::IpAddr;

use isthmus_proto::model::{Gateway, Locality, Network, Resource};
use serde::Deserialize;

use super::metadata::{nullable, Meta};
use super::problems::{port_or_report, Problems};
use crate::validate::{check_locality, parse_cidr};

/// Istio's east-west gateway port for AUTO_PASSTHROUGH.
const DEFAULT_SNI_PORT: u16 = 15443;
/// Istio's HBONE port, which our tunnel takes over.
const DEFAULT_TUNNEL_PORT: u16 = 15008;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub(super) struct NetworkSpec {
    #[serde(deserialize_with = "nullable")]
    gateways: Vec<GatewaySpec>,
    #[serde(deserialize_with = "nullable")]
    cidrs: Vec<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
struct GatewaySpec {
    address: Option<String>,
    sni_port: Option<u32>,
    tunnel_port: Option<u32>,
    locality: Option<String>,
}

pub(super) fn network(meta: &Meta, spec: NetworkSpec, p: &mut Problems) -> Vec<(Resource, String)> {
    let mut gateways: Vec<Gateway> = Vec::new();
    for (i, g) in spec.gateways.into_iter().enumerate() {
        let field = format!("spec.gateways[{i}]");
        let address = match g.address.as_deref() {
            None | Some("") => {
                p.add(format!("{field}.address"), "is required");
                None
            }
            Some(a) => match a.parse::<IpAddr>() {
                Ok(ip) => Some(ip),
                Err(_) => {
                    p.add(
                        format!("{field}.address"),
                        format!("{a:?} is not an IP address (a gateway is dialled by address, never by name)"),
                    );
                    None
                }
            },
        };
        let sni_port = port_or_report(
            p,
            format!("{field}.sniPort"),
            g.sni_port.unwrap_or(DEFAULT_SNI_PORT.into()),
        );
        let tunnel_port = port_or_report(
            p,
            format!("{field}.tunnelPort"),
            g.tunnel_port.unwrap_or(DEFAULT_TUNNEL_PORT.into()),
        );
        let locality = match g.locality.as_deref() {
            None => Locality::default(),
            Some(l) => {
                p.check(format!("{field}.locality"), check_locality(l));
                Locality::parse(l)
            }
        };
        let (Some(address), Some(sni_port), Some(tunnel_port)) = (address, sni_port, tunnel_port)
        else {
            continue;
        };
        if gateways.iter().any(|other| other.address == address) {
            p.add(
                format!("{field}.address"),
                format!("{address} is listed twice"),
            );
            continue;
        }
        gateways.push(Gateway {
            address,
            sni_port,
            tunnel_port,
            locality,
        });
    }
    let mut cidrs = Vec::new();
    for (i, c) in spec.cidrs.iter().enumerate() {
        match parse_cidr(c) {
            Ok(c) => cidrs.push(c),
            Err(m) => p.add(format!("spec.cidrs[{i}]"), m),
        }
    }
    vec![(
        Resource::Network(Network {
            id: meta.name.clone(),
            gateways,
            cidrs,
        }),
        "metadata.name".into(),
    )]
}
