//! `isthmusctl cluster secret`: what `istioctl create-remote-secret` does, for isthmus. With
//! an admin's kubeconfig of cluster C, it installs the registry's reader role
//! (`deploy/kubernetes/rbac.yaml`) in C, asks C's TokenRequest API for a token of the
//! `isthmus-reader` service account, and prints the remote-cluster Secret a registry in
//! another cluster reads to watch C with exactly that role.
//!
//! The kubeconfig in the Secret carries the server, the CA and the token inline and nothing
//! else: the registry refuses `exec` and auth providers in a Secret's kubeconfig, and the
//! admin's own credentials never leave this host.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use base64::Engine;
use clap::Args;
use isthmus_proto::config::{format_duration, DurationFlag};
use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{Secret, ServiceAccount};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{
    Api, ApiResource, DynamicObject, GroupVersionKind, Patch, PatchParams, PostParams,
};
use kube::config::{KubeConfigOptions, Kubeconfig};
use serde::Deserialize;
use serde_json::json;

use crate::sources::kubernetes::REMOTE_SECRET_LABEL;
use crate::validate;

/// The reader role, installed in the cluster the Secret is for.
const RBAC_YAML: &str = include_str!("../../../deploy/kubernetes/rbac.yaml");
/// Where `rbac.yaml` puts the reader service account.
const READER_NAMESPACE: &str = "isthmus-system";
const READER_ACCOUNT: &str = "isthmus-reader";
/// Istio's annotation naming the cluster a remote-cluster Secret is for.
const CLUSTER_ANNOTATION: &str = "networking.istio.io/cluster";
/// The field manager of the server-side apply of the role.
const FIELD_MANAGER: &str = "isthmusctl";
/// A year, as the Secret is meant to be installed once and rotated deliberately.
const DEFAULT_TOKEN_DURATION: Duration = Duration::from_secs(365 * 24 * 3600);

#[derive(Debug, Args)]
pub(super) struct SecretArgs {
    /// A kubeconfig of an administrator of the cluster the Secret is for: used here to
    /// install the reader role and request its token, and never copied into the Secret.
    #[arg(long)]
    kubeconfig: PathBuf,
    /// The cluster's id in the mesh (a DNS label): the Secret's data key and name suffix.
    #[arg(long)]
    name: String,
    /// The cluster's network, written as the Secret's topology.istio.io/network annotation;
    /// without it the registry reading the Secret uses --cluster-network or its own network.
    #[arg(long)]
    network: Option<String>,
    /// The namespace the Secret goes to in the cluster whose registry reads it (its
    /// --system-namespace).
    #[arg(long, default_value = READER_NAMESPACE)]
    namespace: String,
    /// The kubeconfig context to use; by default its current context.
    #[arg(long)]
    context: Option<String>,
    /// How long the reader's token should be valid. The API server may grant less (its
    /// --service-account-max-token-expiration); the expiry it granted is printed to stderr.
    #[arg(long, default_value_t = DurationFlag(DEFAULT_TOKEN_DURATION))]
    token_duration: DurationFlag,
}

/// How the cluster is reached: taken from the admin's kubeconfig, given to the reader.
#[derive(Debug)]
struct ClusterAccess {
    server: String,
    ca_data: Option<String>,
    tls_server_name: Option<String>,
    insecure_skip_tls_verify: Option<bool>,
}

pub(super) async fn create(args: SecretArgs) -> anyhow::Result<()> {
    validate::dns_label("--name", &args.name).map_err(|e| anyhow::anyhow!("{e}"))?;
    validate::dns_label("--namespace", &args.namespace).map_err(|e| anyhow::anyhow!("{e}"))?;
    if let Some(n) = &args.network {
        validate::dns_label("--network", n).map_err(|e| anyhow::anyhow!("{e}"))?;
    }
    let file = args.kubeconfig.display().to_string();
    // kube's error repeats its cause in its own message: name the cause once.
    let kc = Kubeconfig::read_from(&args.kubeconfig).map_err(|e| {
        let cause = std::error::Error::source(&e).map_or(e.to_string(), |s| s.to_string());
        anyhow::anyhow!("cannot read kubeconfig {file}: {cause}")
    })?;
    let access = cluster_access(&kc, args.context.as_deref(), &file)?;
    let options = KubeConfigOptions {
        context: args.context.clone(),
        ..Default::default()
    };
    let config = kube::Config::from_custom_kubeconfig(kc, &options)
        .await
        .with_context(|| format!("kubeconfig {file}"))?;
    let client = kube::Client::try_from(config).with_context(|| format!("kubeconfig {file}"))?;
    install_reader_role(&client, &access.server).await?;
    let token = request_token(&client, args.token_duration.0).await?;
    let kubeconfig = reader_kubeconfig(&args.name, &access, &token)?;
    print!("{}", secret_yaml(&args, &kubeconfig)?);
    Ok(())
}

/// The server and CA of the context's cluster (`--context`, else the current context).
fn cluster_access(
    kc: &Kubeconfig,
    context: Option<&str>,
    file: &str,
) -> anyhow::Result<ClusterAccess> {
    let Some(name) = context.or(kc.current_context.as_deref()) else {
        bail!("kubeconfig {file} has no current context: pass --context");
    };
    let Some(ctx) = kc
        .contexts
        .iter()
        .find(|c| c.name == name)
        .and_then(|c| c.context.as_ref())
    else {
        let known: Vec<&str> = kc.contexts.iter().map(|c| c.name.as_str()).collect();
        bail!(
            "kubeconfig {file} has no context {name:?} (its contexts: {})",
            known.join(", ")
        );
    };
    let Some(cluster) = kc
        .clusters
        .iter()
        .find(|c| c.name == ctx.cluster)
        .and_then(|c| c.cluster.as_ref())
    else {
        bail!(
            "kubeconfig {file}: context {name:?} names cluster {:?}, which it does not define",
            ctx.cluster
        );
    };
    let Some(server) = cluster.server.clone() else {
        bail!("kubeconfig {file}: cluster {:?} has no server", ctx.cluster);
    };
    let ca_data = match (
        &cluster.certificate_authority_data,
        &cluster.certificate_authority,
    ) {
        (Some(data), _) => Some(data.clone()),
        (None, Some(path)) => {
            let pem = std::fs::read(path).with_context(|| {
                format!("kubeconfig {file}: reading certificate-authority {path}")
            })?;
            Some(base64::engine::general_purpose::STANDARD.encode(pem))
        }
        (None, None) => None,
    };
    Ok(ClusterAccess {
        server,
        ca_data,
        tls_server_name: cluster.tls_server_name.clone(),
        insecure_skip_tls_verify: cluster.insecure_skip_tls_verify,
    })
}

/// Server-side applies every object of `rbac.yaml` (the namespace, the service account,
/// the roles and their bindings), taking over fields another manager set differently.
async fn install_reader_role(client: &kube::Client, server: &str) -> anyhow::Result<()> {
    let params = PatchParams::apply(FIELD_MANAGER).force();
    for doc in serde_yaml_ng::Deserializer::from_str(RBAC_YAML) {
        let obj = DynamicObject::deserialize(doc).context("deploy/kubernetes/rbac.yaml")?;
        let types = obj
            .types
            .clone()
            .context("rbac.yaml: an object without a kind")?;
        let gvk =
            GroupVersionKind::try_from(&types).map_err(|e| anyhow::anyhow!("rbac.yaml: {e}"))?;
        let resource = ApiResource::from_gvk(&gvk);
        let name = obj.metadata.name.clone().unwrap_or_default();
        let api: Api<DynamicObject> = match &obj.metadata.namespace {
            Some(ns) => Api::namespaced_with(client.clone(), ns, &resource),
            None => Api::all_with(client.clone(), &resource),
        };
        api.patch(&name, &params, &Patch::Apply(&obj))
            .await
            .map_err(|e| {
                api_error(
                    e,
                    format!(
                        "cannot apply the reader role's {} {name} at {server}",
                        gvk.kind
                    ),
                )
            })?;
    }
    Ok(())
}

/// A token of the reader service account from the TokenRequest API (the `token`
/// subresource), valid for `duration` or as long as the API server grants.
async fn request_token(client: &kube::Client, duration: Duration) -> anyhow::Result<String> {
    let accounts: Api<ServiceAccount> = Api::namespaced(client.clone(), READER_NAMESPACE);
    let request = TokenRequest {
        spec: TokenRequestSpec {
            // Empty: the API server's own audiences, which it accepts back.
            audiences: Vec::new(),
            expiration_seconds: Some(duration.as_secs() as i64),
            bound_object_ref: None,
        },
        ..Default::default()
    };
    let granted: TokenRequest = accounts
        .create_subresource("token", READER_ACCOUNT, &PostParams::default(), &request)
        .await
        .map_err(|e| {
            api_error(
                e,
                format!("TokenRequest for {READER_NAMESPACE}/{READER_ACCOUNT} refused"),
            )
        })?;
    let Some(status) = granted.status else {
        bail!("TokenRequest for {READER_NAMESPACE}/{READER_ACCOUNT}: the answer has no token");
    };
    let expiry = status.expiration_timestamp.0;
    let left = expiry.as_second() - k8s_openapi::jiff::Timestamp::now().as_second();
    let granted_for = Duration::from_secs(left.max(0) as u64);
    eprintln!(
        "{}",
        expiry_note(&expiry.to_string(), granted_for, duration)
    );
    Ok(status.token)
}

/// When the token expires, and whether the API server capped what was asked.
fn expiry_note(expiry: &str, granted: Duration, asked: Duration) -> String {
    // A minute of slack for the clocks and the request's own time.
    let capped = if granted + Duration::from_secs(60) < asked {
        "; the API server granted less than asked: its --service-account-max-token-expiration caps it"
    } else {
        ""
    };
    format!(
        "token of {READER_NAMESPACE}/{READER_ACCOUNT} expires at {expiry} (in about {}; asked for {}{capped})",
        format_duration(round_to_minutes(granted)),
        format_duration(asked)
    )
}

/// `d` to the nearest minute, so that it prints as `2d` rather than `172799s`.
fn round_to_minutes(d: Duration) -> Duration {
    Duration::from_secs((d.as_secs() + 30) / 60 * 60)
}

/// A kubeconfig for the reader: the cluster's server and CA, the token, nothing to run.
fn reader_kubeconfig(id: &str, access: &ClusterAccess, token: &str) -> anyhow::Result<String> {
    let mut cluster = serde_json::Map::new();
    cluster.insert("server".into(), json!(access.server));
    if let Some(ca) = &access.ca_data {
        cluster.insert("certificate-authority-data".into(), json!(ca));
    }
    if let Some(n) = &access.tls_server_name {
        cluster.insert("tls-server-name".into(), json!(n));
    }
    if let Some(i) = access.insecure_skip_tls_verify {
        cluster.insert("insecure-skip-tls-verify".into(), json!(i));
    }
    let config = json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": id, "cluster": cluster}],
        "users": [{"name": READER_ACCOUNT, "user": {"token": token}}],
        "contexts": [{"name": id, "context": {"cluster": id, "user": READER_ACCOUNT}}],
        "current-context": id,
        "preferences": {},
    });
    Ok(serde_yaml_ng::to_string(&config)?)
}

/// The remote-cluster Secret, as Istio writes one: the kubeconfig under the cluster's id.
fn secret_yaml(args: &SecretArgs, kubeconfig: &str) -> anyhow::Result<String> {
    let mut annotations = BTreeMap::from([(CLUSTER_ANNOTATION.to_string(), args.name.clone())]);
    if let Some(n) = &args.network {
        annotations.insert(
            crate::sources::kubernetes::mapping::labels::NETWORK.to_string(),
            n.clone(),
        );
    }
    let secret = Secret {
        metadata: ObjectMeta {
            name: Some(format!("istio-remote-secret-{}", args.name)),
            namespace: Some(args.namespace.clone()),
            labels: Some(BTreeMap::from([(
                REMOTE_SECRET_LABEL.to_string(),
                "true".to_string(),
            )])),
            annotations: Some(annotations),
            ..Default::default()
        },
        string_data: Some(BTreeMap::from([(
            args.name.clone(),
            kubeconfig.to_string(),
        )])),
        ..Default::default()
    };
    Ok(serde_yaml_ng::to_string(&secret)?)
}

/// An API error as the API server put it (its message, code and reason) after `what`;
/// any other error with its causes.
fn api_error(e: kube::Error, what: String) -> anyhow::Error {
    match e {
        kube::Error::Api(s) => anyhow::anyhow!("{what}: {} ({} {})", s.message, s.code, s.reason),
        other => anyhow::Error::new(other).context(what),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_expiry_note_says_when_the_api_server_capped_the_token() {
        let day = Duration::from_secs(86400);
        let asked = 365 * day;
        let full = expiry_note("T", asked - Duration::from_secs(2), asked);
        assert_eq!(
            full,
            "token of isthmus-system/isthmus-reader expires at T (in about 365d; asked for 365d)"
        );
        let capped = expiry_note("T", 2 * day, asked);
        assert!(
            capped.ends_with("(in about 2d; asked for 365d; the API server granted less than asked: its --service-account-max-token-expiration caps it)"),
            "{capped}"
        );
    }

    #[test]
    fn the_secret_is_istios_remote_secret_shape() {
        let args = SecretArgs {
            kubeconfig: PathBuf::new(),
            name: "cluster-b".into(),
            network: Some("net-b".into()),
            namespace: "isthmus-system".into(),
            context: None,
            token_duration: DurationFlag(DEFAULT_TOKEN_DURATION),
        };
        let access = ClusterAccess {
            server: "https://10.0.0.1:6443".into(),
            ca_data: Some("Q0E=".into()),
            tls_server_name: None,
            insecure_skip_tls_verify: None,
        };
        let kubeconfig = reader_kubeconfig("cluster-b", &access, "tok").unwrap();
        let secret: Secret =
            serde_yaml_ng::from_str(&secret_yaml(&args, &kubeconfig).unwrap()).unwrap();
        let m = &secret.metadata;
        assert_eq!(m.name.as_deref(), Some("istio-remote-secret-cluster-b"));
        assert_eq!(m.labels.as_ref().unwrap()["istio/multiCluster"], "true");
        let a = m.annotations.as_ref().unwrap();
        assert_eq!(a["networking.istio.io/cluster"], "cluster-b");
        assert_eq!(a["topology.istio.io/network"], "net-b");
        let text = &secret.string_data.unwrap()["cluster-b"];
        let kc = Kubeconfig::from_yaml(text).unwrap();
        assert_eq!(kc.current_context.as_deref(), Some("cluster-b"));
        let cluster = kc.clusters[0].cluster.as_ref().unwrap();
        assert_eq!(cluster.server.as_deref(), Some("https://10.0.0.1:6443"));
        assert_eq!(cluster.certificate_authority_data.as_deref(), Some("Q0E="));
        let user = kc.auth_infos[0].auth_info.as_ref().unwrap();
        assert!(user.exec.is_none() && user.auth_provider.is_none());
    }
}
