//! `isthmusctl peers`: each registry this one imports from (`--peer`) and how current the
//! import is, read from the registry admin's `/debug/peers` and printed as a table (then
//! each peer's last error and problems in full) or as the JSON it serves.

use clap::Args;
use serde::Deserialize;

use super::clusters::{age, details, grid, show_status, state, Details, DEFAULT_ADMIN};
use crate::sources::peers::PeerStatus;

const PATH: &str = "/debug/peers";

#[derive(Debug, Args)]
pub(super) struct PeersArgs {
    /// The registry's admin address (host:port), as its --admin-addr. /debug/peers answers
    /// loopback peers only: from another host, tunnel first (ssh -L 15014:127.0.0.1:15014
    /// HOST) and pass 127.0.0.1:15014.
    #[arg(long, default_value = DEFAULT_ADMIN)]
    admin: String,
    /// Print /debug/peers' JSON as the registry serves it.
    #[arg(long)]
    json: bool,
}

/// `/debug/peers` as served: the registry's clock and every peer's status.
#[derive(Debug, Deserialize)]
struct PeersReply {
    now_ms: i64,
    peers: Vec<PeerRow>,
}

#[derive(Debug, Deserialize)]
struct PeerRow {
    #[serde(flatten)]
    status: PeerStatus,
    summary: String,
}

pub(super) async fn show(args: PeersArgs) -> anyhow::Result<()> {
    show_status(&args.admin, PATH, "peers'", args.json, table).await
}

/// The table's columns, in order.
const COLUMNS: [&str; 9] = [
    "PEER",
    "FOLLOWING",
    "STATE",
    "SERVICES",
    "ENDPOINTS",
    "NETWORKS",
    "LAST SYNC",
    "STALE",
    "RESUMES",
];

fn row(p: &PeerStatus, summary: &str, now_ms: i64) -> Vec<String> {
    let dash_or_age = |ms: i64| {
        if ms == 0 {
            "-".to_string()
        } else {
            age(now_ms, ms)
        }
    };
    vec![
        p.peer.clone(),
        p.following.clone().unwrap_or_else(|| "-".into()),
        state(summary).to_string(),
        p.services.to_string(),
        p.endpoints.to_string(),
        p.networks.to_string(),
        if p.last_sync_ms == 0 {
            "-".into()
        } else {
            format!("{} ago", age(now_ms, p.last_sync_ms))
        },
        dash_or_age(p.stale_since_ms),
        p.resumes.to_string(),
    ]
}

fn table(reply: &PeersReply) -> String {
    if reply.peers.is_empty() {
        return "this registry imports from no peer (see --peer)\n".into();
    }
    let rows: Vec<Vec<String>> = reply
        .peers
        .iter()
        .map(|p| row(&p.status, &p.summary, reply.now_ms))
        .collect();
    let mut out = grid(&COLUMNS, &rows);
    for p in &reply.peers {
        details(
            &mut out,
            &Details {
                name: &p.status.peer,
                summary: &p.summary,
                last_error: p.status.last_error.as_deref(),
                last_error_ms: p.status.last_error_ms,
                problems: &p.status.problems,
            },
            reply.now_ms,
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn served(statuses: &[PeerStatus], now_ms: i64) -> PeersReply {
        crate::ctl::clusters::tests::as_served("peers", statuses, |p| p.summary(now_ms), now_ms)
    }

    #[test]
    fn the_table_shows_each_peer_and_then_what_went_wrong() {
        let now = 1_000_000_000;
        let west = PeerStatus {
            peer: "west".into(),
            following: Some("10.0.0.2:15012".into()),
            connected: true,
            synced: true,
            last_sync_ms: now - 3_000,
            services: 12,
            endpoints: 40,
            networks: 1,
            resumes: 2,
            ..Default::default()
        };
        let north = PeerStatus {
            peer: "north".into(),
            synced: true,
            last_sync_ms: now - 120_000,
            stale_since_ms: now - 90_000,
            last_error: Some("no registry of 10.0.0.9:15012 answered".into()),
            last_error_ms: now - 90_000,
            problems: vec!["Network//network-a: this registry's own is kept".into()],
            ..Default::default()
        };
        let out = table(&served(&[west, north], now));
        let lines: Vec<&str> = out.lines().collect();
        assert!(lines[0].starts_with("PEER"), "{out}");
        assert!(
            lines[1].contains("west") && lines[1].contains("synced") && lines[1].contains("3s ago"),
            "{out}"
        );
        assert!(
            lines[2].contains("north") && lines[2].contains("stale for 90s"),
            "{out}"
        );
        assert!(out.contains("\nnorth:\n"), "{out}");
        assert!(out.contains("problem: Network//network-a"), "{out}");
        assert!(
            !out.contains("\nwest:\n"),
            "nothing to say about west: {out}"
        );
    }

    #[test]
    fn no_peers_says_which_flag_adds_them() {
        let out = table(&served(&[], 0));
        assert!(out.contains("--peer"), "{out}");
    }
}
