//! Start-up phase 6: the control plane beside the data plane. The readiness probe of the
//! group's template, the Registration stream (the entry, its health, its lease; it waits
//! for the app's ports to be captured before the first health report), certificate
//! renewal at half-life. (The catalog snapshot writer starts with the catalog, so that it
//! knows which version is already on disk.) Registration has its own stop
//! signal: at shutdown it deregisters before the listeners stop accepting.

use std::sync::Arc;

use isthmus_proto::drain;
use isthmus_proto::model::WorkloadGroup;
use isthmus_proto::program::Tasks;
use isthmus_proto::registration::HealthReport;
use isthmus_proto::tls::Credentials;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::inputs::Inputs;
use crate::capture::CaptureProgress;
use crate::registration::{Registration, RegistrationState};
use crate::{identity, probe};

/// What the control plane publishes, and the registration task to stop first.
pub(crate) struct Control {
    pub registration: watch::Receiver<RegistrationState>,
    pub health: watch::Receiver<HealthReport>,
    /// Deregisters when `deregister` fires.
    pub registration_task: JoinHandle<()>,
    pub deregister: drain::Trigger,
}

/// Starts the control plane; `creds` and `group` are where renewal and registration
/// publish (the receivers are in `cx`).
pub(crate) fn start(
    cx: &Inputs,
    creds: watch::Sender<Arc<Credentials>>,
    group: watch::Sender<Option<WorkloadGroup>>,
    captured: &watch::Receiver<CaptureProgress>,
    tasks: &mut Tasks,
) -> Control {
    let (health_tx, health) = watch::channel(HealthReport {
        healthy: false,
        reason: "not probed yet".into(),
    });
    tasks.spawn(
        "probe",
        probe::run(
            cx.group.clone(),
            cx.config.app_host,
            health_tx,
            cx.agent_metrics.clone(),
            cx.shutdown.clone(),
        ),
    );
    let (state_tx, registration) = watch::channel(RegistrationState::default());
    let (deregister, registration_shutdown) = drain::channel();
    let renewal = match &cx.config.pod {
        Some(pod) => identity::Renewal::PodToken(Arc::new(pod.clone())),
        None => identity::Renewal::Certificate,
    };
    tasks.spawn(
        "certificate renewal",
        identity::keep_renewed(
            cx.settings.clone(),
            renewal,
            creds,
            cx.agent_metrics.clone(),
            cx.shutdown.clone(),
        ),
    );
    // A pod is not registered: the registry's Kubernetes source knows it already.
    if cx.config.pod.is_some() {
        drop(group);
        state_tx.send_replace(RegistrationState {
            entry: Some(format!("Pod {}/{}", cx.bundle.namespace, cx.bundle.group)),
            namespace: Some(cx.bundle.namespace.clone()),
            warnings: vec![
                "a pod is not registered: the registry's Kubernetes source knows it".into(),
            ],
            ..RegistrationState::default()
        });
        return Control {
            registration,
            health,
            registration_task: tokio::spawn(async move {
                registration_shutdown.signaled().await;
            }),
            deregister,
        };
    }
    let registration_task = tokio::spawn(
        Registration {
            registry: cx.settings.clone(),
            hello: cx.hello.clone(),
            creds: cx.creds.clone(),
            health: health.clone(),
            group,
            group_path: cx.config.group_path(),
            state: state_tx,
            metrics: cx.agent_metrics.clone(),
            captured: captured.clone(),
        }
        .run(registration_shutdown),
    );
    Control {
        registration,
        health,
        registration_task,
        deregister,
    }
}
