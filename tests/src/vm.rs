//! Playing a VM on the Registration stream: Hellos to register with, and the client the
//! agent itself uses ([`Registrar`], one call per request, each returning the registry's
//! acknowledgement or its refusal), so tests can act as the VM, or as a misbehaving one.

use std::collections::BTreeMap;
use std::net::IpAddr;

pub use isthmus_proto::registration::Registrar;
use isthmus_proto::registration::Hello;

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

