//! `isthmusctl clusters`: each Kubernetes cluster the registry watches and how current it
//! is, read from the registry admin's `/debug/clusters` and printed as a table (then each
//! cluster's last error and problems in full) or as the JSON it serves.
//!
//! The admin port speaks plain HTTP/1.1 on loopback by default; one GET needs no HTTP
//! client library, so the request is written here by hand.

use std::fmt::Write as _;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Args;
use serde::Deserialize;

use super::http;
use crate::sources::kubernetes::ClusterStatus;

/// Where the registry's admin listens when run with its defaults (it binds every address;
/// this reaches it from the same host).
pub(super) const DEFAULT_ADMIN: &str = "127.0.0.1:15014";
/// How long the admin gets to answer.
const ADMIN_TIMEOUT: Duration = Duration::from_secs(10);
/// The largest answer read: a status per cluster is a few KB.
const MAX_RESPONSE: u64 = 16 << 20;
const PATH: &str = "/debug/clusters";

#[derive(Debug, Args)]
pub(super) struct ClustersArgs {
    /// The registry's admin address (host:port), as its --admin-addr. /debug/clusters
    /// answers loopback peers only: from another host, tunnel first (ssh -L
    /// 15014:127.0.0.1:15014 HOST, or kubectl -n isthmus-system port-forward
    /// deploy/isthmus-registry 15014) and pass 127.0.0.1:15014.
    #[arg(long, default_value = DEFAULT_ADMIN)]
    admin: String,
    /// Print /debug/clusters' JSON as the registry serves it.
    #[arg(long)]
    json: bool,
}

/// `/debug/clusters` as served: the registry's clock and every cluster's status.
#[derive(Debug, Deserialize)]
struct ClustersReply {
    now_ms: i64,
    clusters: Vec<ClusterRow>,
}

/// One cluster's status as served: the registry's own type, plus its `summary`.
#[derive(Debug, Deserialize)]
struct ClusterRow {
    #[serde(flatten)]
    status: ClusterStatus,
    summary: String,
}

impl std::ops::Deref for ClusterRow {
    type Target = ClusterStatus;
    fn deref(&self) -> &ClusterStatus {
        &self.status
    }
}

pub(super) async fn show(args: ClustersArgs) -> anyhow::Result<()> {
    show_status(&args.admin, PATH, "clusters'", args.json, table).await
}

/// Prints what the registry admin at `admin` serves at `path` (`what`'s status), as the
/// JSON it serves or as `table` renders it; an answer that is not that status is an error.
pub(super) async fn show_status<T: serde::de::DeserializeOwned>(
    admin: &str,
    path: &str,
    what: &str,
    json: bool,
    table: fn(&T) -> String,
) -> anyhow::Result<()> {
    let body = get(admin, path).await?;
    let reply: T = serde_json::from_str(&body).with_context(|| {
        format!("{path} at {admin}: not the {what} status this isthmusctl reads")
    })?;
    if json {
        println!("{}", body.trim_end());
    } else {
        print!("{}", table(&reply));
    }
    Ok(())
}

/// One HTTP/1.1 GET of `path` at `addr`; the body of a 200 answer.
pub(super) async fn get(addr: &str, path: &str) -> anyhow::Result<String> {
    let (status, body) = http::get(addr, path, "application/json", ADMIN_TIMEOUT, MAX_RESPONSE)
        .await
        .map_err(|e| match e {
            http::GetError::Connect(_) | http::GetError::Read(_) => {
                anyhow::anyhow!("cannot reach the registry admin at {addr} (--admin): {e}")
            }
            e => anyhow::anyhow!("registry admin at {addr}: {e}"),
        })?;
    if status != 200 {
        bail!("registry admin at {addr}: GET {path} answered {status}: {body}");
    }
    Ok(body)
}

/// `3s ago`, `4m ago`, `2h ago`, `5d ago`.
pub(super) fn age(now_ms: i64, then_ms: i64) -> String {
    let s = (now_ms - then_ms).max(0) / 1000;
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m", s / 60),
        3600..86400 => format!("{}h", s / 3600),
        _ => format!("{}d", s / 86400),
    }
}

/// The objects of a kind, `-` when its API is not installed in the cluster.
fn objects(c: &ClusterRow, kind: &str) -> String {
    match c.kinds.get(kind) {
        Some(k) if k.not_installed => "-".into(),
        Some(k) => k.objects.to_string(),
        None => "0".into(),
    }
}

/// The state in a word or two: the summary up to its cause, which follows the table.
pub(super) fn state(summary: &str) -> &str {
    summary.split_once(": ").map_or(summary, |(s, _)| s)
}

fn row(c: &ClusterRow, now_ms: i64) -> [String; 9] {
    let last_event = c.kinds.values().map(|k| k.last_event_ms).max().unwrap_or(0);
    [
        c.cluster.clone(),
        c.network.clone(),
        state(&c.summary).to_string(),
        objects(c, "Service"),
        objects(c, "EndpointSlice"),
        objects(c, "Pod"),
        if last_event == 0 {
            "-".into()
        } else {
            format!("{} ago", age(now_ms, last_event))
        },
        if c.stale_since_ms == 0 {
            "-".into()
        } else {
            age(now_ms, c.stale_since_ms)
        },
        c.reconnects.to_string(),
    ]
}

/// The table's columns, in order.
pub const COLUMNS: [&str; 9] = [
    "CLUSTER",
    "NETWORK",
    "STATE",
    "SERVICES",
    "ENDPOINTSLICES",
    "PODS",
    "LAST EVENT",
    "STALE",
    "RECONNECTS",
];

/// The table, then each cluster's state, last error and problems in full.
fn table(reply: &ClustersReply) -> String {
    if reply.clusters.is_empty() {
        return "no Kubernetes clusters are watched (see --kubeconfig, --remote-kubeconfigs)\n"
            .into();
    }
    let rows: Vec<Vec<String>> = reply
        .clusters
        .iter()
        .map(|c| row(c, reply.now_ms).to_vec())
        .collect();
    let mut out = grid(&COLUMNS, &rows);
    for c in &reply.clusters {
        details(
            &mut out,
            &Details {
                name: &c.cluster,
                summary: &c.summary,
                last_error: c.last_error.as_deref(),
                last_error_ms: c.last_error_ms,
                problems: &c.problems,
            },
            reply.now_ms,
        );
    }
    out
}

/// Rows under their column names, each column as wide as its widest cell.
pub(super) fn grid(columns: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = columns.iter().map(|c| c.len()).collect();
    for r in rows {
        for (w, cell) in widths.iter_mut().zip(r) {
            *w = (*w).max(cell.len());
        }
    }
    let mut out = String::new();
    let header: Vec<String> = columns.iter().map(|c| c.to_string()).collect();
    for r in std::iter::once(&header).chain(rows) {
        let cells: Vec<String> = r
            .iter()
            .zip(&widths)
            .map(|(cell, w)| format!("{cell:<w$}"))
            .collect();
        let _ = writeln!(out, "{}", cells.join("  ").trim_end());
    }
    out
}

/// What a table row cuts short about one source (a cluster, a peer).
pub(super) struct Details<'a> {
    pub name: &'a str,
    pub summary: &'a str,
    pub last_error: Option<&'a str>,
    pub last_error_ms: i64,
    pub problems: &'a [String],
}

/// The full summary when it carries a cause, the last error (with its age) and each
/// problem, under the source's name; nothing when all is well.
pub(super) fn details(out: &mut String, d: &Details, now_ms: i64) {
    let mut lines = Vec::new();
    if state(d.summary) != d.summary {
        lines.push(d.summary.to_string());
    }
    if let Some(e) = d.last_error {
        if !d.summary.ends_with(e) {
            let when = if d.last_error_ms == 0 {
                String::new()
            } else {
                format!(" ({} ago)", age(now_ms, d.last_error_ms))
            };
            lines.push(format!("last error{when}: {e}"));
        }
    }
    lines.extend(d.problems.iter().map(|p| format!("problem: {p}")));
    if !lines.is_empty() {
        let _ = writeln!(out, "\n{}:", d.name);
        for l in lines {
            let _ = writeln!(out, "  {l}");
        }
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use crate::sources::kubernetes::{ClusterStatus, KindStatus};

    /// A reply as the admin builds it from the source's own type (each status with its
    /// `summary`, under `list`), so a renamed field fails here rather than showing as zero.
    pub(in crate::ctl) fn as_served<T: serde::Serialize, R: serde::de::DeserializeOwned>(
        list: &str,
        statuses: &[T],
        summary: impl Fn(&T) -> String,
        now_ms: i64,
    ) -> R {
        let items: Vec<serde_json::Value> = statuses
            .iter()
            .map(|c| {
                let mut v = serde_json::to_value(c).unwrap();
                v["summary"] = summary(c).into();
                v
            })
            .collect();
        let body = serde_json::json!({"now_ms": now_ms, list: items}).to_string();
        serde_json::from_str(&body).unwrap()
    }

    fn served(statuses: &[ClusterStatus], now_ms: i64) -> ClustersReply {
        as_served("clusters", statuses, |c| c.summary(now_ms), now_ms)
    }

    fn kind(objects: usize, last_event_ms: i64) -> KindStatus {
        KindStatus {
            synced: true,
            objects,
            last_event_ms,
            ..Default::default()
        }
    }

    #[test]
    fn the_table_shows_each_cluster_and_then_what_went_wrong_in_full() {
        let now = 1_000_000_000;
        let a = ClusterStatus {
            cluster: "cluster-a".into(),
            network: "net-a".into(),
            synced: true,
            kinds: [
                ("Service".to_string(), kind(3, now - 3_000)),
                ("EndpointSlice".to_string(), kind(4, now - 65_000)),
                ("Pod".to_string(), kind(5, now - 10_000)),
            ]
            .into(),
            ..Default::default()
        };
        let b = ClusterStatus {
            cluster: "cluster-b".into(),
            network: "net-b".into(),
            synced: true,
            kinds: [("Service".to_string(), kind(1, now - 7_200_000))].into(),
            last_error: Some("connection refused".into()),
            last_error_ms: now - 2_000,
            reconnects: 2,
            stale_since_ms: now - 12_000,
            problems: vec!["ServiceEntry shop/x: no hosts".into()],
            ..Default::default()
        };
        let text = table(&served(&[a, b], now));
        let lines: Vec<&str> = text.lines().collect();
        let cells = |l: &str| {
            l.split("  ")
                .filter(|c| !c.is_empty())
                .map(str::trim)
                .map(String::from)
                .collect::<Vec<_>>()
        };
        assert_eq!(cells(lines[0]), COLUMNS);
        assert_eq!(
            cells(lines[1]),
            [
                "cluster-a",
                "net-a",
                "synced",
                "3",
                "4",
                "5",
                "3s ago",
                "-",
                "0"
            ]
        );
        assert_eq!(
            cells(lines[2]),
            [
                "cluster-b",
                "net-b",
                "stale for 12s",
                "1",
                "0",
                "0",
                "2h ago",
                "12s",
                "2"
            ]
        );
        assert!(
            text.contains("\ncluster-b:\n  stale for 12s: connection refused\n  problem: ServiceEntry shop/x: no hosts\n"),
            "{text}"
        );
        assert!(!text.contains("cluster-a:"), "{text}");
    }

    #[test]
    fn no_clusters_says_which_flags_add_them() {
        let text = table(&served(&[], 0));
        assert_eq!(
            text,
            "no Kubernetes clusters are watched (see --kubeconfig, --remote-kubeconfigs)\n"
        );
    }
}
