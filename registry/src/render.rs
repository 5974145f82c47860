//! How a network's view is shown to people: a JSON document (`/debug/catalog`,
//! `isthmusctl catalog --json`) and a table (`isthmusctl catalog`).

use std::fmt::Write;

use isthmus_proto::model::{EndpointKind, Health, ServiceView, ViewResource};
use serde_json::{json, Value};

fn endpoint_kind(k: EndpointKind) -> &'static str {
    match k {
        EndpointKind::Workload => "workload",
        EndpointKind::Gateway => "gateway",
    }
}

fn health(h: Health) -> &'static str {
    match h {
        Health::Healthy => "healthy",
        Health::Unhealthy => "unhealthy",
    }
}

fn service_json(sv: &ServiceView) -> Value {
    let s = &sv.service;
    json!({
        "hostname": s.hostname,
        "namespace": s.namespace,
        "ports": s.ports.iter().map(|p| json!({"name": p.name, "number": p.number, "protocol": p.protocol, "targetPort": p.target_port})).collect::<Vec<_>>(),
        "addresses": s.addresses.iter().map(|a| json!({"cluster": a.cluster, "address": a.address})).collect::<Vec<_>>(),
        "allocatedAddresses": s.allocated_addresses,
        "endpoints": sv.endpoints.iter().map(|e| json!({
            "kind": endpoint_kind(e.kind),
            "address": e.address,
            "ports": e.ports.iter().map(|(k, v)| (k.to_string(), json!(v))).collect::<serde_json::Map<_, _>>(),
            "network": e.network,
            "cluster": e.cluster,
            "locality": e.locality.to_string(),
            "weight": e.weight,
            "health": health(e.health),
            "identities": e.identities.iter().map(|i| i.to_string()).collect::<Vec<_>>(),
            "uid": e.uid,
            "tunnelPort": e.tunnel_port,
        })).collect::<Vec<_>>(),
    })
}

/// The whole view as JSON: `{network, version, services: [...], networks: [...]}`.
pub fn view_json(network: &str, version: &str, resources: &[ViewResource]) -> Value {
    let mut services = Vec::new();
    let mut networks = Vec::new();
    for r in resources {
        match r {
            ViewResource::Service(sv) => services.push(service_json(sv)),
            ViewResource::Network(n) => networks.push(json!({
                "id": n.id,
                "gateways": n.gateways.iter().map(|g| json!({"address": g.address, "sniPort": g.sni_port, "tunnelPort": g.tunnel_port})).collect::<Vec<_>>(),
            })),
        }
    }
    json!({"network": network, "version": version, "services": services, "networks": networks})
}

/// The view as a table for a terminal.
pub fn view_table(network: &str, version: &str, resources: &[ViewResource]) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "view of network {network} (version {version})");
    networks_table(&mut out, resources);
    let mut svcs: Vec<_> = resources
        .iter()
        .filter_map(|r| match r {
            ViewResource::Service(s) => Some(s),
            _ => None,
        })
        .collect();
    svcs.sort_by(|a, b| a.service.hostname.cmp(&b.service.hostname));
    for sv in svcs {
        service_table(&mut out, sv);
    }
    out
}

/// The networks and their gateways, one line each.
fn networks_table(out: &mut String, resources: &[ViewResource]) {
    let mut nets: Vec<_> = resources
        .iter()
        .filter_map(|r| match r {
            ViewResource::Network(n) => Some(n),
            _ => None,
        })
        .collect();
    nets.sort_by(|a, b| a.id.cmp(&b.id));
    if !nets.is_empty() {
        let _ = writeln!(out, "\nNETWORK          GATEWAYS");
        for n in nets {
            let gws: Vec<String> = n
                .gateways
                .iter()
                .map(|g| format!("{}:{}", g.address, g.sni_port))
                .collect();
            let _ = writeln!(
                out,
                "{:<16} {}",
                n.id,
                if gws.is_empty() {
                    "-".to_string()
                } else {
                    gws.join(", ")
                }
            );
        }
    }
}

/// One service's line, then its endpoints (when it has any), one line each; `-` where an
/// endpoint accepts no tunnels.
fn service_table(out: &mut String, sv: &ServiceView) {
    let s = &sv.service;
    let ports: Vec<String> = s
        .ports
        .iter()
        .map(|p| format!("{}/{}", p.number, p.protocol))
        .collect();
    let vips = if s.allocated_addresses.is_empty() {
        String::new()
    } else {
        format!("  vips {}", s.allocated_addresses.join(","))
    };
    let _ = writeln!(
        out,
        "\nSERVICE {}  ports {}{}  ({} endpoints)",
        s.hostname,
        ports.join(","),
        vips,
        sv.endpoints.len()
    );
    if sv.endpoints.is_empty() {
        return;
    }
    let _ = writeln!(
        out,
        "  {:<8} {:<22} {:<12} {:>6}  {:<9} {:<14} {:<6} IDENTITY",
        "KIND", "ADDRESS", "NETWORK", "WEIGHT", "HEALTH", "PORTS", "TUNNEL"
    );
    for e in &sv.endpoints {
        let ports: Vec<String> = e.ports.iter().map(|(k, v)| format!("{k}->{v}")).collect();
        let ids: Vec<String> = e.identities.iter().map(|i| i.to_string()).collect();
        let ids = match ids.len() {
            0 => "-".to_string(),
            1 => ids[0].clone(),
            n => format!("{} (+{} more)", ids[0], n - 1),
        };
        let tunnel = match e.tunnel_port {
            0 => "-".to_string(),
            p => p.to_string(),
        };
        let _ = writeln!(
            out,
            "  {:<8} {:<22} {:<12} {:>6}  {:<9} {:<14} {:<6} {}",
            endpoint_kind(e.kind),
            e.address,
            e.network,
            e.weight,
            health(e.health),
            ports.join(","),
            tunnel,
            ids
        );
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use isthmus_proto::model::{Address, Service, ViewEndpoint};

    use super::*;

    fn endpoint(address: &str, tunnel_port: u16) -> ViewEndpoint {
        ViewEndpoint {
            kind: EndpointKind::Workload,
            address: Address::parse(address).unwrap(),
            ports: [(80, 8080)].into(),
            network: "net-a".into(),
            cluster: "c".into(),
            locality: Default::default(),
            identities: vec![],
            weight: 1,
            health: Health::Healthy,
            labels: Default::default(),
            uid: format!("c/shop/{address}"),
            tunnel_port,
            stale_since_ms: 0,
            subset_weights: Default::default(),
        }
    }

    fn view() -> Vec<ViewResource> {
        vec![ViewResource::Service(Arc::new(ServiceView {
            service: Service {
                hostname: "web.shop".into(),
                ..Default::default()
            },
            endpoints: vec![endpoint("10.0.0.1", 15008), endpoint("10.0.0.2", 0)],
            ..Default::default()
        }))]
    }

    #[test]
    fn endpoints_show_their_tunnel_port_when_they_have_one() {
        let table = view_table("net-a", "1", &view());
        let line = |address: &str| {
            table
                .lines()
                .find(|l| l.contains(address))
                .unwrap()
                .split_whitespace()
                .collect::<Vec<_>>()
        };
        assert!(table.contains(" TUNNEL "), "{table}");
        assert_eq!(line("10.0.0.1")[6], "15008", "{table}");
        assert_eq!(line("10.0.0.2")[6], "-", "{table}");
        let json = view_json("net-a", "1", &view());
        let ports: Vec<&Value> = json["services"][0]["endpoints"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| &e["tunnelPort"])
            .collect();
        assert_eq!(ports, [&json!(15008), &json!(0)]);
    }
}
