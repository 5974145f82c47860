//! Who may register into a WorkloadGroup, and the entry a VM gets from the group's
//! template and its Hello.

use std::time::SystemTime;

use isthmus_proto::identity::SpiffeId;
use isthmus_proto::model::{Address, Health, ModelError, Origin, Workload, WorkloadGroup};
use isthmus_proto::registration::Hello;

use super::error::RegistrationError;
use crate::validate::{check_label_key, check_label_value};

/// The identity a group's VMs must hold: its namespace and its template's service account.
pub fn group_identity(
    trust_domain: &isthmus_proto::TrustDomain,
    group: &WorkloadGroup,
) -> Result<SpiffeId, RegistrationError> {
    SpiffeId::workload(
        trust_domain,
        &group.namespace,
        &group.template.service_account,
    )
    .map_err(|source| RegistrationError::BadGroup {
        namespace: group.namespace.clone(),
        group: group.name.clone(),
        source,
    })
}

/// The entry a VM saying `hello` gets from `group`: the template's labels (with the VM's
/// own added where the template is silent), ports, service account and namespace; the VM's
/// address and tunnel port (only its agent knows whether it accepts tunnels), and its
/// network and locality where it names them. A group with a readiness probe starts its VMs
/// unhealthy until their first healthy report. Returns the entry and what of the Hello was
/// ignored.
pub fn entry_from_group(
    group: &WorkloadGroup,
    hello: &Hello,
    identity: SpiffeId,
    now: SystemTime,
) -> Result<(Workload, Vec<String>), RegistrationError> {
    let t = &group.template;
    let mut warnings = Vec::new();
    let mut labels = t.labels.clone();
    for (key, value) in &hello.labels {
        let field = format!("hello.labels.{key}");
        let checked = check_label_key(key).and_then(|()| check_label_value(key, value));
        if let Err(why) = checked {
            return Err(ModelError::Invalid {
                field,
                why: why.into(),
            }
            .into());
        }
        match t.labels.get(key) {
            Some(ours) if ours != value => warnings.push(format!(
                "{field}: the group template sets {key}={ours}; the VM's value {value:?} is ignored"
            )),
            Some(_) => {}
            None => {
                labels.insert(key.clone(), value.clone());
            }
        }
    }
    let network = if hello.network.is_empty() {
        t.network.clone()
    } else {
        if !t.network.is_empty() && t.network != hello.network {
            warnings.push(format!(
                "hello.network: the VM says {}, the group template {}; the VM's network is used",
                hello.network, t.network
            ));
        }
        hello.network.clone()
    };
    let name = hello.entry_name();
    let health = if group.probe.is_some() {
        Health::Unhealthy
    } else {
        Health::Healthy
    };
    let workload = Workload {
        uid: format!("{}/{}/{}", t.cluster, group.namespace, name),
        name,
        namespace: group.namespace.clone(),
        address: Address::Ip(hello.address),
        network,
        cluster: t.cluster.clone(),
        locality: if hello.locality.is_empty() {
            t.locality.clone()
        } else {
            hello.locality.clone()
        },
        identity: Some(identity),
        labels,
        ports: t.ports.clone(),
        weight: t.weight,
        health,
        origin: Origin::Vm,
        last_confirmed_ms: now
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_millis() as i64)
            .unwrap_or_default(),
        services: t.services.clone(),
        service_account: t.service_account.clone(),
        stale_since_ms: 0,
        tunnel_port: hello.tunnel_port,
    };
    Ok((workload, warnings))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registration::error::status_of;
    use isthmus_proto::model::{Locality, Probe, ProbeAction};
    use isthmus_proto::TrustDomain;

    fn group(probe: bool) -> WorkloadGroup {
        WorkloadGroup {
            name: "vm-web".into(),
            namespace: "shop".into(),
            labels: Default::default(),
            template: Workload {
                namespace: "shop".into(),
                network: "network-a".into(),
                cluster: "cluster-a".into(),
                locality: Locality::parse("eu/eu-1"),
                labels: [("app".to_string(), "web".to_string())].into(),
                ports: [("http".to_string(), 8080)].into(),
                weight: 1,
                origin: Origin::Vm,
                service_account: "web".into(),
                ..Default::default()
            },
            probe: probe.then(|| Probe {
                initial_delay_seconds: 0,
                period_seconds: 5,
                timeout_seconds: 1,
                success_threshold: 1,
                failure_threshold: 3,
                action: ProbeAction::TcpSocket {
                    host: String::new(),
                    port: 8080,
                },
            }),
        }
    }

    fn id() -> SpiffeId {
        group_identity(&TrustDomain::new("cluster.local").unwrap(), &group(false)).unwrap()
    }

    #[test]
    fn the_entry_comes_from_the_template_and_the_hello() {
        let mut hello = Hello::new("vm-web", "shop", "10.1.0.5".parse().unwrap());
        hello.network = "network-a".into();
        hello.labels.insert("version".into(), "v2".into());
        hello.labels.insert("app".into(), "admin".into());
        let (w, warnings) =
            entry_from_group(&group(true), &hello, id(), SystemTime::now()).unwrap();
        assert_eq!(w.name, "vm-web-10-1-0-5-network-a");
        assert_eq!(w.uid, "cluster-a/shop/vm-web-10-1-0-5-network-a");
        assert_eq!(w.namespace, "shop");
        assert_eq!(w.address, "10.1.0.5");
        assert_eq!(w.locality, Locality::parse("eu/eu-1"), "the template's");
        assert_eq!(
            w.labels,
            [
                ("app".to_string(), "web".to_string()),
                ("version".to_string(), "v2".to_string())
            ]
            .into()
        );
        assert_eq!(w.ports, [("http".to_string(), 8080)].into());
        assert_eq!(w.origin, Origin::Vm);
        assert_eq!(w.tunnel_port, 0, "the agent accepts no tunnels");
        assert_eq!(
            w.health,
            Health::Unhealthy,
            "a probe group waits for a report"
        );
        assert_eq!(
            w.identity.unwrap().as_str(),
            "spiffe://cluster.local/ns/shop/sa/web"
        );
        assert_eq!(warnings.len(), 1);
        assert!(warnings[0].contains("hello.labels.app"), "{warnings:?}");
    }

    #[test]
    fn without_a_probe_the_entry_starts_healthy_and_the_vm_may_name_network_and_locality() {
        let mut hello = Hello::new("vm-web", "shop", "2001:db8::5".parse().unwrap());
        hello.network = "network-b".into();
        hello.locality = Locality::parse("us/us-2");
        let (w, warnings) =
            entry_from_group(&group(false), &hello, id(), SystemTime::now()).unwrap();
        assert_eq!(w.health, Health::Healthy);
        assert_eq!(w.name, "vm-web-2001-db8--5-network-b");
        assert_eq!(w.network, "network-b");
        assert_eq!(w.locality, Locality::parse("us/us-2"));
        assert!(warnings[0].starts_with("hello.network"), "{warnings:?}");
    }

    #[test]
    fn the_entry_carries_the_vm_agents_tunnel_port() {
        let mut hello = Hello::new("vm-web", "shop", "10.1.0.5".parse().unwrap());
        hello.tunnel_port = 15008;
        let (w, _) = entry_from_group(&group(false), &hello, id(), SystemTime::now()).unwrap();
        assert_eq!(w.tunnel_port, 15008);
        assert_eq!(
            w.ports,
            [("http".to_string(), 8080)].into(),
            "ports unchanged"
        );
    }

    #[test]
    fn a_bad_label_is_named() {
        let mut hello = Hello::new("vm-web", "shop", "10.1.0.5".parse().unwrap());
        hello.labels.insert("bad key!".into(), "x".into());
        let err = entry_from_group(&group(false), &hello, id(), SystemTime::now()).unwrap_err();
        assert_eq!(status_of(&err).code(), tonic::Code::InvalidArgument);
        assert!(
            err.to_string().starts_with("hello.labels.bad key!: "),
            "{err}"
        );
    }
}
