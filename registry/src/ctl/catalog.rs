//! `isthmusctl catalog`: the view a subscriber in a network gets, as the registry sends it
//! (one Watch snapshot over mTLS), printed as a table or JSON.

use std::time::Duration;

use anyhow::{bail, Context};
use clap::Args;
use isthmus_proto::model::{Node, NodeKind, ViewResource};
use isthmus_proto::subscription::Subscription;
use isthmus_proto::tls::Credentials;

use super::connect::{connect, RegistryConn};
use crate::render;

/// How long to wait for the registry's snapshot.
const SNAPSHOT_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, Args)]
pub(super) struct CatalogArgs {
    #[command(flatten)]
    conn: RegistryConn,
    /// The network whose view to show.
    #[arg(long)]
    network: String,
    /// Whose view: a workload's (split horizon) or a gateway's (local endpoints only).
    #[arg(long, default_value = "workload")]
    kind: String,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

/// The registry serves a view to any network name, so a typo would print an empty view:
/// refuse a network that no Network resource and no endpoint names, listing those that are.
fn check_network_known(network: &str, resources: &[ViewResource]) -> anyhow::Result<()> {
    let mut known = std::collections::BTreeSet::new();
    for r in resources {
        match r {
            ViewResource::Network(n) => {
                known.insert(n.id.clone());
            }
            ViewResource::Service(sv) => {
                known.extend(sv.endpoints.iter().map(|e| e.network.clone()));
            }
        }
    }
    known.remove("");
    if known.contains(network) {
        return Ok(());
    }
    let list = if known.is_empty() {
        "none yet".to_string()
    } else {
        known.into_iter().collect::<Vec<_>>().join(", ")
    };
    bail!(
        "--network {network:?}: no such network in the catalog (no Network resource or \
         workload names it); known networks: {list}"
    )
}

/// Subscribes once, waits for the snapshot and prints it.
pub(super) async fn show(args: CatalogArgs) -> anyhow::Result<()> {
    let kind = NodeKind::parse(&args.kind)
        .with_context(|| format!("--kind {:?}: use workload or gateway", args.kind))?;
    let Some(dir) = &args.conn.cert_dir else {
        bail!("--cert-dir is required: the registry only serves views over mTLS");
    };
    let creds =
        Credentials::from_dir(dir).with_context(|| format!("--cert-dir {}", dir.display()))?;
    let channel = connect(&args.conn, Some(&creds)).await?;
    let node = Node {
        id: format!("isthmusctl-{}", std::process::id()),
        kind,
        network: args.network.clone(),
        ..Default::default()
    };
    let mut sub = Subscription::open(channel, &node, None).await?;
    tokio::time::timeout(SNAPSHOT_TIMEOUT, sub.next())
        .await
        .with_context(|| {
            format!(
                "no snapshot from the registry within {}s",
                SNAPSHOT_TIMEOUT.as_secs()
            )
        })??;
    let resources: Vec<_> = sub.view.resources.values().cloned().collect();
    check_network_known(&args.network, &resources)?;
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&render::view_json(
                &args.network,
                &sub.view.version,
                &resources
            ))?
        );
    } else {
        print!(
            "{}",
            render::view_table(&args.network, &sub.view.version, &resources)
        );
    }
    Ok(())
}
