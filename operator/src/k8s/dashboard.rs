//! The operator's dashboard: every PretrainRun in the cluster, as the API server has it, and what
//! each run's store holds, opened with the run's own storage Secret (as the controller does).

use std::sync::Arc;

use kube::api::ListParams;
use kube::{Api, ResourceExt};
use pretrain_crd::PretrainRun;
use pretrain_store::Store;

use super::controller::{Context, open_store};
use crate::dashboard::{self, RunEntry, Source};

/// The cluster's runs.
pub struct ClusterRuns {
    ctx: Arc<Context>,
}

impl std::fmt::Debug for ClusterRuns {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterRuns").finish_non_exhaustive()
    }
}

impl ClusterRuns {
    /// Over the cluster `ctx` talks to.
    pub fn new(ctx: Arc<Context>) -> Self {
        Self { ctx }
    }
}

#[async_trait::async_trait]
impl Source for ClusterRuns {
    async fn runs(&self) -> Result<Vec<RunEntry>, String> {
        let api: Api<PretrainRun> = Api::all(self.ctx.client.clone());
        let list = api.list(&ListParams::default()).await.map_err(|e| format!("listing PretrainRuns: {e}"))?;
        let mut runs: Vec<RunEntry> = list
            .items
            .into_iter()
            .map(|run| RunEntry {
                namespace: run.namespace().unwrap_or_else(|| "default".into()),
                name: run.name_any(),
                stages: run.spec.stages(),
                status: run.status.clone().unwrap_or_default(),
                store: dashboard::redact(&run.spec.storage.url),
            })
            .collect();
        runs.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
        Ok(runs)
    }

    async fn store(&self, namespace: &str, name: &str) -> Result<Option<Store>, String> {
        // A list by name, not a get: the operator's ClusterRole grants PretrainRuns list and watch.
        let api: Api<PretrainRun> = Api::namespaced(self.ctx.client.clone(), namespace);
        let named = ListParams::default().fields(&format!("metadata.name={name}"));
        let found = api.list(&named).await.map_err(|e| format!("PretrainRun {namespace}/{name}: {e}"))?;
        let Some(run) = found.items.into_iter().next() else { return Ok(None) };
        open_store(&self.ctx, &self.ctx.defaults.apply(&run)).await.map(Some).map_err(|e| e.to_string())
    }

    fn place(&self) -> String {
        "cluster".into()
    }
}
