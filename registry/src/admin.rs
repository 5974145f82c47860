//! The registry's admin routes beyond `/metrics` and the health checks: `/debug/catalog`,
//! `/debug/resources`, `/debug/subscribers`, `/debug/vips`, `/debug/registrations`,
//! `/debug/clusters`, `/debug/peers`.

use std::sync::{Arc, Mutex};

use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use isthmus_proto::model::ViewResource;
use serde::Deserialize;
use serde_json::json;

use crate::render;
use crate::sources::kubernetes::ClusterStatuses;
use crate::sources::peers::PeerStatuses;
use crate::sources::static_files::IgnoredDocument;
use crate::sources::vm_registrations::VmRegistrations;
use crate::views::{ViewKey, Views};
use crate::watch::Subscribers;

/// What the sources currently report, for `/debug/resources`: problems, the documents they
/// ignore (kinds isthmus does not read) and what Istio's validation would warn about.
#[derive(Debug, Default, Clone)]
pub struct SourceStatus(Arc<Mutex<SourceReport>>);

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct SourceReport {
    pub errors: Vec<String>,
    pub ignored: Vec<IgnoredDocument>,
    pub warnings: Vec<String>,
}

impl SourceStatus {
    pub fn set(&self, report: SourceReport) {
        *self.0.lock().expect("status lock") = report;
    }
    pub fn get(&self) -> SourceReport {
        self.0.lock().expect("status lock").clone()
    }
}

#[derive(Clone)]
struct AdminState {
    views: Arc<Views>,
    subscribers: Arc<Subscribers>,
    sources: SourceStatus,
    registrations: Arc<VmRegistrations>,
    clusters: ClusterStatuses,
    peers: PeerStatuses,
}

/// Every Kubernetes cluster's sync state: synced, objects per kind, last event and error,
/// reconnects, and since when it has been stale; `summary` is the same in one line.
async fn clusters_status(State(s): State<AdminState>) -> impl IntoResponse {
    let now = crate::sources::kubernetes::now_ms();
    let clusters: Vec<serde_json::Value> = s
        .clusters
        .snapshot()
        .into_iter()
        .map(|c| {
            let summary = c.summary(now);
            let mut v = serde_json::to_value(&c).unwrap_or_default();
            v["summary"] = summary.into();
            v
        })
        .collect();
    Json(json!({ "now_ms": now, "clusters": clusters }))
}

/// Every peered registry's import: connected, synced, the registry of its set followed,
/// when it last confirmed its view, the last error, since when it has been stale, what it
/// brought and what clashed; `summary` is the same in one line.
async fn peers_status(State(s): State<AdminState>) -> impl IntoResponse {
    let now = crate::sources::kubernetes::now_ms();
    let peers: Vec<serde_json::Value> = s
        .peers
        .snapshot()
        .into_iter()
        .map(|p| {
            let summary = p.summary(now);
            let mut v = serde_json::to_value(&p).unwrap_or_default();
            v["summary"] = summary.into();
            v
        })
        .collect();
    Json(json!({ "now_ms": now, "peers": peers }))
}

#[derive(Deserialize)]
struct CatalogQuery {
    network: Option<String>,
    kind: Option<String>,
    /// The namespace whose visibility to show; absent: every namespace, as a gateway sees.
    namespace: Option<String>,
}

pub fn routes(
    views: Arc<Views>,
    subscribers: Arc<Subscribers>,
    sources: SourceStatus,
    registrations: Arc<VmRegistrations>,
    clusters: ClusterStatuses,
    peers: PeerStatuses,
) -> Router {
    Router::new()
        .route("/debug/catalog", get(catalog))
        .route("/debug/resources", get(resources))
        .route("/debug/subscribers", get(subscribers_status))
        .route("/debug/vips", get(vips))
        .route("/debug/registrations", get(registrations_status))
        .route("/debug/clusters", get(clusters_status))
        .route("/debug/peers", get(peers_status))
        .with_state(AdminState {
            views,
            subscribers,
            sources,
            registrations,
            clusters,
            peers,
        })
}

/// The resources of a view, decoded into the model.
pub fn view_resources(views: &Views, key: &ViewKey) -> (String, Vec<ViewResource>) {
    let view = views.view(key);
    let st = view.state.read().expect("view lock");
    let resources = st
        .entries
        .values()
        .filter_map(|e| ViewResource::try_from(e.decode()).ok())
        .collect();
    (view.version_of(&st), resources)
}

async fn catalog(State(s): State<AdminState>, Query(q): Query<CatalogQuery>) -> impl IntoResponse {
    if q.kind.as_deref() == Some("export") {
        // What the registries peered with this one import.
        let (version, resources) = view_resources(&s.views, &ViewKey::export());
        return Json(render::view_json("", &version, &resources)).into_response();
    }
    let networks = s.views.known_networks();
    let Some(network) = q.network.filter(|n| !n.is_empty()) else {
        return (
            StatusCode::BAD_REQUEST,
            Json(json!({"error": "pass ?network=<id>", "networks": networks})),
        )
            .into_response();
    };
    if !s.views.knows_network(&network) {
        return (StatusCode::NOT_FOUND, Json(json!({"error": format!("no network {network:?} in the catalog and no subscriber in it"), "networks": networks}))).into_response();
    }
    let gateway = q.kind.as_deref() == Some("gateway");
    let namespace = q.namespace.filter(|n| !n.is_empty());
    if let Some(ns) = &namespace {
        if let Err(e) = crate::validate::dns_label("namespace", ns) {
            return (
                StatusCode::BAD_REQUEST,
                Json(json!({"error": e.to_string()})),
            )
                .into_response();
        }
    }
    let (version, resources) = view_resources(
        &s.views,
        &ViewKey {
            network: network.clone(),
            gateway,
            namespace: (!gateway).then_some(namespace).flatten(),
            cluster: None,
            export: false,
        },
    );
    Json(render::view_json(&network, &version, &resources)).into_response()
}

async fn resources(State(s): State<AdminState>) -> impl IntoResponse {
    let resources: Vec<_> = s.views.with_catalog(|c| {
        c.resources()
            .map(
                |r| json!({"key": r.resource.key(), "kind": r.resource.kind(), "origin": r.origin}),
            )
            .collect()
    });
    let report = s.sources.get();
    Json(json!({
        "resources": resources,
        "errors": report.errors,
        "ignored": report.ignored,
        "warnings": report.warnings,
    }))
}

async fn vips(State(s): State<AdminState>) -> impl IntoResponse {
    let (allocations, pools) = s.views.with_vips(|t| {
        let allocations: Vec<_> = t
            .iter()
            .map(|a| {
                json!({
                    "hostname": a.hostname,
                    "ipv4": a.ipv4.to_string(),
                    "ipv6": a.ipv6.to_string(),
                    "state": if a.is_active() { "active" } else { "released" },
                    "released_at": a.released_at.map(|t| {
                        ::time::OffsetDateTime::from(t)
                            .format(&::time::format_description::well_known::Rfc3339)
                            .unwrap_or_default()
                    }),
                })
            })
            .collect();
        let p = t.pools();
        (
            allocations,
            json!({"ipv4": p.ipv4.to_string(), "ipv6": p.ipv6.to_string()}),
        )
    });
    Json(json!({"pools": pools, "allocations": allocations}))
}

async fn subscribers_status(State(s): State<AdminState>) -> impl IntoResponse {
    Json(json!({"subscribers": s.subscribers.status()}))
}

async fn registrations_status(State(s): State<AdminState>) -> impl IntoResponse {
    Json(json!({
        "grace_s": s.registrations.grace().as_secs_f64(),
        "registrations": s.registrations.status().await,
    }))
}
