//! Playing a VM on the Registration stream: Hellos to register with, and the client the
//! agent itself uses ([`Registrar`], one call per request, each returning the registry's
//! acknowledgement or its refusal), so tests can act as the VM, or as a misbehaving one;
//! and waiting on a VM's entry in a subscriber's view.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::time::Duration;

use isthmus_proto::model::{service_view_key, ViewEndpoint, ViewResource};
use isthmus_proto::registration::Hello;
pub use isthmus_proto::registration::Registrar;
use isthmus_proto::subscription::{LocalView, Subscription};

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

// ---- Watching a VM's entry in a subscriber's view ----

/// How long a view waits for each update.
pub const STEP: Duration = Duration::from_secs(20);
/// The endpoint at `address` of `hostname` in a subscriber's view.
pub fn endpoint<'a>(
    view: &'a LocalView,
    hostname: &str,
    address: &str,
) -> Option<&'a ViewEndpoint> {
    match view.resources.get(&service_view_key(hostname)) {
        Some(ViewResource::Service(sv)) => sv.endpoints.iter().find(|e| e.address == address),
        _ => None,
    }
}

/// Receives updates until `pred` holds on the view.
pub async fn until(sub: &mut Subscription, pred: impl Fn(&LocalView) -> bool) {
    while !pred(&sub.view) {
        tokio::time::timeout(STEP, sub.next())
            .await
            .expect("update in time")
            .expect("stream open");
    }
}

/// Receives updates until `pred` holds on the view, asserting `keep` after each one.
pub async fn until_keeping(
    sub: &mut Subscription,
    keep: impl Fn(&LocalView) -> bool,
    pred: impl Fn(&LocalView) -> bool,
) {
    assert!(keep(&sub.view));
    while !pred(&sub.view) {
        tokio::time::timeout(STEP, sub.next())
            .await
            .expect("update in time")
            .expect("stream open");
        assert!(
            keep(&sub.view),
            "view at {}: {:?}",
            sub.view.version,
            sub.view
        );
    }
}

/// Receives every update for `d`, asserting `pred` after each one.
pub async fn always_for(sub: &mut Subscription, d: Duration, pred: impl Fn(&LocalView) -> bool) {
    let deadline = tokio::time::Instant::now() + d;
    assert!(pred(&sub.view));
    while let Ok(update) = tokio::time::timeout_at(deadline, sub.next()).await {
        update.expect("stream open");
        assert!(
            pred(&sub.view),
            "view at {}: {:?}",
            sub.view.version,
            sub.view
        );
    }
}
