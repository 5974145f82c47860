//! The Kubernetes harness's bulk creation (`KubeApi::create_all`, which the Kubernetes
//! benchmark fills its clusters with) against the real API server: every object is
//! created, and a refused one fails the call with the object and the server's reason.

use isthmus_tests::harness::kube::{self, KubeApi};
use serde_json::json;

fn config_map(name: &str) -> (String, String) {
    let body = json!({"apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": name, "namespace": "bulk"}, "data": {"k": name}});
    (
        "/api/v1/namespaces/bulk/configmaps".into(),
        body.to_string(),
    )
}

#[tokio::test]
async fn create_all_creates_every_object_and_names_a_refusal() {
    if !kube::available() {
        return;
    }
    let api = KubeApi::start("cluster-a").await.unwrap();
    api.create_namespace("bulk", &[]).await.unwrap();

    let objects = (0..40).map(|i| config_map(&format!("cm-{i}"))).collect();
    api.create_all(objects, 8).await.unwrap();
    let names = api
        .kubectl(&[
            "get",
            "configmaps",
            "-n",
            "bulk",
            "-o",
            "jsonpath={.items[*].metadata.name}",
        ])
        .await
        .unwrap();
    let created: Vec<&str> = names
        .split_whitespace()
        .filter(|n| n.starts_with("cm-"))
        .collect();
    assert_eq!(created.len(), 40, "{names}");

    // One that exists already: the API server refuses it (409), and the call says which.
    let again = vec![config_map("cm-new"), config_map("cm-7")];
    let err = api.create_all(again, 2).await.unwrap_err().to_string();
    assert!(
        err.contains("configmaps") && err.contains("409") && err.contains("cm-7"),
        "{err}"
    );
}
