//! The static source's part of start-up and its poller: the resources directory is applied
//! once before the registry serves, then re-read every `--resource-poll`.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use isthmus_proto::drain;
use isthmus_proto::identity::TrustDomain;

use super::config::RegistryConfig;
use crate::admin::{SourceReport, SourceStatus};
use crate::ingest::Ingest;
use crate::metrics::{IgnoredLabels, RegistryMetrics, SourceLabels};
use crate::sources::static_files::{StaticSource, ORIGIN_PREFIX};
use crate::views::Views;

/// The static source with what it reports to.
#[derive(Clone)]
pub(super) struct StaticResources {
    source: Arc<Mutex<StaticSource>>,
    ingest: Ingest,
    metrics: RegistryMetrics,
    status: SourceStatus,
}

impl StaticResources {
    /// The source for `dir`, seeded with what the store holds from it so that a file broken
    /// at start keeps its last good resources.
    pub(super) fn new(
        dir: PathBuf,
        cfg: &RegistryConfig,
        trust_domain: TrustDomain,
        views: &Views,
        ingest: Ingest,
        metrics: RegistryMetrics,
        status: SourceStatus,
    ) -> Self {
        let mut source = StaticSource::new(dir, cfg.source_defaults(trust_domain));
        source.seed(views.resources_with_origin(ORIGIN_PREFIX));
        Self {
            source: Arc::new(Mutex::new(source)),
            ingest,
            metrics,
            status,
        }
    }

    /// Scans once and hands the resources to ingest when they changed. `force` hands them
    /// over even when the scan saw no change (after a failed write).
    pub(super) async fn sync(&self, force: bool) -> anyhow::Result<()> {
        let s = self.source.clone();
        let (scan, resources, dir) = tokio::task::spawn_blocking(move || {
            let mut s = s.lock().expect("static source lock");
            let scan = s.scan();
            let resources = (scan.changed || force).then(|| s.resources());
            (scan, resources, s.dir().to_path_buf())
        })
        .await?;
        let labels = SourceLabels { source: "static" };
        self.metrics
            .resource_errors
            .get_or_create(&labels)
            .set(scan.errors.len() as i64);
        self.metrics.ignored_documents.clear();
        for i in &scan.ignored {
            let kind = i.object.split(' ').next().unwrap_or_default().to_string();
            self.metrics
                .ignored_documents
                .get_or_create(&IgnoredLabels {
                    source: "static",
                    kind,
                })
                .inc();
        }
        let report = SourceReport {
            errors: scan.errors.iter().map(|e| e.to_string()).collect(),
            ignored: scan.ignored,
            warnings: scan.warnings.iter().map(|w| w.to_string()).collect(),
        };
        let previous = self.status.get();
        for w in report
            .warnings
            .iter()
            .filter(|w| !previous.warnings.contains(w))
        {
            tracing::warn!(warning = %w, "resource loaded with a warning");
        }
        if report != previous {
            for m in report
                .errors
                .iter()
                .filter(|m| !previous.errors.contains(m))
            {
                tracing::error!(error = %m, "invalid resource; what it defined before stays in force");
            }
            if !report.errors.is_empty() && report.errors != previous.errors {
                self.metrics
                    .resource_error_events
                    .get_or_create(&labels)
                    .inc();
            }
            self.status.set(report);
        }
        if let Some(resources) = resources {
            let report = self
                .ingest
                .replace_origin(ORIGIN_PREFIX, resources)
                .await
                .context("writing static resources to the store")?;
            tracing::info!(upserted = report.upserted, removed = report.removed, dir = %dir.display(), "static resources applied");
        }
        Ok(())
    }

    /// Re-reads the directory every `every` until `shutdown`; a failed write is retried
    /// with the whole set on the next round.
    pub(super) async fn poll(self, every: Duration, shutdown: drain::Watch) {
        let stop = shutdown.signaled();
        tokio::pin!(stop);
        let mut retry = false;
        loop {
            tokio::select! {
                _ = &mut stop => return,
                _ = tokio::time::sleep(every) => {}
            }
            match self.sync(retry).await {
                Ok(()) => retry = false,
                Err(e) => {
                    tracing::error!(error = %format!("{e:#}"), "static resources not applied; retrying");
                    retry = true;
                }
            }
        }
    }
}
