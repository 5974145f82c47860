//! AdmissionReview `admission.k8s.io/v1` in and out. A body that is not an AdmissionReview
//! is answered with HTTP 400 and what was wrong; a review whose object cannot be injected is
//! answered `allowed: false` with the reason, which the API server shows to whoever created
//! the pod.

use base64::Engine;
use serde::Deserialize;
use serde_json::{json, Value};

use super::metrics::{InjectMetrics, ReasonLabels};
use super::pod::{inject, InjectError, Injection, SkipReason};
use super::InjectSettings;

/// Largest review the webhook reads: the API server refuses objects above ~3 MiB itself,
/// so anything bigger is not from it.
pub const MAX_REVIEW_BYTES: usize = 4 * 1024 * 1024;
pub const ADMISSION_API_VERSION: &str = "admission.k8s.io/v1";
pub const ADMISSION_KIND: &str = "AdmissionReview";

/// How the webhook answers one request body.
#[derive(Debug, Clone, PartialEq)]
pub enum Answer {
    /// HTTP 200 with this AdmissionReview.
    Review(Value),
    /// HTTP 400 with this message: the body is not an AdmissionReview.
    BadRequest(String),
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ReviewIn {
    api_version: String,
    kind: String,
    request: Option<RequestIn>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct RequestIn {
    uid: String,
    kind: GroupVersionKind,
    #[serde(default)]
    namespace: String,
    #[serde(default)]
    operation: String,
    object: Option<Value>,
}

#[derive(Debug, Deserialize)]
struct GroupVersionKind {
    #[serde(default)]
    group: String,
    version: String,
    kind: String,
}

/// The answer to one request body (at most [`MAX_REVIEW_BYTES`], checked by the caller),
/// counted in `metrics`.
pub fn answer(body: &[u8], settings: &InjectSettings, metrics: &InjectMetrics) -> Answer {
    let refuse = |reason: &'static str, message: String| {
        metrics.errors.get_or_create(&ReasonLabels { reason }).inc();
        Answer::BadRequest(message)
    };
    let value: Value = match serde_json::from_slice(body) {
        Ok(v) => v,
        Err(e) => {
            return refuse(
                "not_a_review",
                format!(
                "the body is not an AdmissionReview ({ADMISSION_API_VERSION}): it is not JSON: {e}"
            ),
            )
        }
    };
    if !value.is_object() {
        return refuse(
            "not_a_review",
            format!(
                "the body is not an AdmissionReview ({ADMISSION_API_VERSION}): a JSON object was expected, got {}",
                json_kind(&value)
            ),
        );
    }
    let review: ReviewIn = match serde_path_to_error::deserialize(value) {
        Ok(r) => r,
        Err(e) => {
            let at = e.path().to_string();
            return refuse(
                "not_a_review",
                format!("the AdmissionReview is malformed at {at}: {}", e.inner()),
            );
        }
    };
    if review.api_version != ADMISSION_API_VERSION || review.kind != ADMISSION_KIND {
        return refuse(
            "not_a_review",
            format!(
                "expected apiVersion {ADMISSION_API_VERSION} kind {ADMISSION_KIND}, got apiVersion {:?} kind {:?} (set admissionReviewVersions: [v1] in the webhook configuration)",
                review.api_version, review.kind
            ),
        );
    }
    let Some(request) = review.request else {
        return refuse("not_a_review", "the AdmissionReview has no request".into());
    };
    if request.uid.is_empty() {
        return refuse(
            "not_a_review",
            "the AdmissionReview's request.uid is empty".into(),
        );
    }
    Answer::Review(respond(&request, settings, metrics))
}

fn respond(request: &RequestIn, settings: &InjectSettings, metrics: &InjectMetrics) -> Value {
    let uid = &request.uid;
    let refuse = |reason: &'static str, message: String| {
        metrics.errors.get_or_create(&ReasonLabels { reason }).inc();
        tracing::warn!(%uid, namespace = %request.namespace, reason, %message, "pod refused by the injector");
        review(json!({
            "uid": uid,
            "allowed": false,
            "status": {"code": 400, "reason": "BadRequest", "message": message},
        }))
    };
    let gvk = &request.kind;
    if !(gvk.group.is_empty() && gvk.version == "v1" && gvk.kind == "Pod") {
        let group = if gvk.group.is_empty() {
            "core"
        } else {
            &gvk.group
        };
        return refuse(
            "wrong_kind",
            format!(
                "the sidecar injector takes core/v1 Pod, not {group}/{}/{} (check the webhook configuration's rules)",
                gvk.version, gvk.kind
            ),
        );
    }
    if request.operation != "CREATE" {
        // Only a new pod gets containers; anything else passes untouched.
        let reason = "not_create";
        metrics.skips.get_or_create(&ReasonLabels { reason }).inc();
        return review(json!({"uid": uid, "allowed": true}));
    }
    let Some(object) = request.object.as_ref().filter(|o| o.is_object()) else {
        return refuse(
            "bad_pod",
            "the AdmissionReview's request.object is missing or not an object".into(),
        );
    };
    match inject(object, &request.namespace, settings) {
        Ok(Injection::Patch(patch)) => {
            metrics.injections.inc();
            let bytes = serde_json::to_vec(&patch).expect("JSON values serialize");
            tracing::debug!(%uid, namespace = %request.namespace, "sidecar injected");
            review(json!({
                "uid": uid,
                "allowed": true,
                "patchType": "JSONPatch",
                "patch": base64::engine::general_purpose::STANDARD.encode(bytes),
            }))
        }
        Ok(Injection::Skip(why)) => {
            metrics
                .skips
                .get_or_create(&ReasonLabels {
                    reason: why.label(),
                })
                .inc();
            let mut response = json!({"uid": uid, "allowed": true});
            if matches!(why, SkipReason::HostNetwork) {
                response["warnings"] = json!([why.to_string()]);
            }
            review(response)
        }
        Err(e) => refuse(e.reason(), refusal_message(&e)),
    }
}

fn json_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn refusal_message(e: &InjectError) -> String {
    format!("isthmus sidecar injection: {e}")
}

fn review(response: Value) -> Value {
    json!({
        "apiVersion": ADMISSION_API_VERSION,
        "kind": ADMISSION_KIND,
        "response": response,
    })
}
