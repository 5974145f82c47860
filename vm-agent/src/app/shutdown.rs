//! The stop order, the reverse of start-up: STOPPING and not ready; deregister (the entry
//! leaves the views at once, so peers stop choosing this VM before it stops accepting);
//! stop accepting; let open connections finish until `--drain-deadline`; remove the capture
//! rules (only now: open connections were redirected by them); stop and join the rest
//! (control plane, DNS, admin, health). The program skeleton's [`Stop`] runs the accepting,
//! in-flight and rest steps; the agent adds deregistration before and the capture removal
//! to the in-flight work.

use std::sync::Arc;
use std::time::Duration;

use isthmus_proto::drain;
use isthmus_proto::program::{Stop, TASK_STOP_DEADLINE};
use isthmus_proxy::connection::Tracker;
use tokio::task::JoinHandle;

use super::capture::{self, Capture};
use crate::notify::Notifier;

/// Everything the stop order needs.
pub(crate) struct Teardown {
    pub notifier: Arc<Notifier>,
    pub deregister: drain::Trigger,
    pub registration: JoinHandle<()>,
    pub trackers: Vec<Arc<Tracker>>,
    pub drain_deadline: Duration,
    pub capture: Capture,
    pub stop: Stop,
}

impl Teardown {
    pub(crate) async fn run(self) {
        let _ = self.notifier.send(&[
            ("STOPPING", "1"),
            ("STATUS", "stopping: deregistering and draining"),
        ]);
        self.stop.readiness.drain();
        deregister(self.deregister, self.registration).await;
        let (trackers, deadline, capture) = (self.trackers, self.drain_deadline, self.capture);
        self.stop
            .run(async move {
                isthmus_proxy::connection::drain_all(&trackers, deadline).await;
                capture::remove(capture).await;
            })
            .await;
    }
}

/// Stops the registration, which deregisters, waiting for it within a bound.
async fn deregister(trigger: drain::Trigger, task: JoinHandle<()>) {
    trigger.fire();
    if tokio::time::timeout(TASK_STOP_DEADLINE, task)
        .await
        .is_err()
    {
        tracing::warn!(
            deadline = ?TASK_STOP_DEADLINE,
            "deregistration did not finish in time"
        );
    }
}
