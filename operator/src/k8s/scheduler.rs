//! The cluster scheduler's loop: every few seconds, read every PretrainRun, Node, Pod and
//! PretrainQueue, run one pure pass ([`crate::schedule::schedule`]), and write what it decided into
//! the runs' status (admission with nodes, a preemption request, or why it waits and its queue
//! position) and the queues' status. The reconciler acts on those fields: it creates an admitted
//! attempt's Jobs on its nodes, and stops a preempted one after its checkpoint.

use std::time::Duration;

use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{Api, ListParams, Patch, PatchParams};
use kube::{Client, ResourceExt};
use pretrain_crd::{PretrainQueue, PretrainRun};
use serde_json::json;

use crate::schedule::cluster::{patches, queue_status, snapshot};
use crate::schedule::{Policy, schedule};

/// The field manager of the scheduler's status writes.
pub const SCHEDULER_MANAGER: &str = "pretrain-scheduler";

/// What one pass did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Pass {
    /// Stage attempts admitted.
    pub admitted: usize,
    /// Gangs asked to checkpoint and make room.
    pub preempted: usize,
    /// Requests still waiting.
    pub waiting: usize,
}

/// One scheduling pass at `now` (Unix seconds).
pub async fn pass(client: &Client, policy: Policy, now: i64) -> Result<Pass, kube::Error> {
    let runs = Api::<PretrainRun>::all(client.clone()).list(&ListParams::default()).await?.items;
    let nodes = Api::<Node>::all(client.clone()).list(&ListParams::default()).await?.items;
    let live = ListParams::default().fields("status.phase!=Succeeded,status.phase!=Failed");
    let pods = Api::<Pod>::all(client.clone()).list(&live).await?.items;
    let queues = Api::<PretrainQueue>::all(client.clone()).list(&ListParams::default()).await?.items;

    let view = snapshot(&runs, &nodes, &pods, &queues, now);
    let decision = schedule(&view.nodes, &view.running, &view.queues, &view.requests, now, policy);
    let params = PatchParams { field_manager: Some(SCHEDULER_MANAGER.into()), ..PatchParams::default() };
    for change in patches(&runs, &decision, now) {
        let api = Api::<PretrainRun>::namespaced(client.clone(), &change.namespace);
        match api.patch_status(&change.name, &params, &Patch::Merge(&change.patch)).await {
            Ok(_) => {}
            // Deleted since the list: nothing to schedule.
            Err(kube::Error::Api(e)) if e.code == 404 => {}
            Err(e) => return Err(e),
        }
    }
    let queue_api = Api::<PretrainQueue>::all(client.clone());
    for queue in &queues {
        let status = queue_status(&view, &decision, &queue.spec, &queue.name_any());
        if queue.status.as_ref() != Some(&status) {
            let patch = json!({ "status": status });
            queue_api.patch_status(&queue.name_any(), &params, &Patch::Merge(&patch)).await?;
        }
    }
    Ok(Pass { admitted: decision.admit.len(), preempted: decision.preempt.len(), waiting: decision.waiting.len() })
}

/// Runs a pass every `interval` until the process ends; a failed pass is logged and retried.
pub async fn run(client: Client, policy: Policy, interval: Duration) {
    loop {
        let now = jiff::Timestamp::now().as_second();
        match pass(&client, policy, now).await {
            Ok(p) if p.admitted + p.preempted > 0 => {
                tracing::info!(admitted = p.admitted, preempted = p.preempted, waiting = p.waiting, "scheduler pass");
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "scheduler pass failed"),
        }
        tokio::time::sleep(interval).await;
    }
}
