//! The `PretrainRun` status: what the operator (or the local runner) observed and decided.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Observed state of a run.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PretrainRunStatus {
    /// Where the run stands as a whole.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<RunPhase>,
    /// The stage now queued or running.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stage: Option<String>,
    /// One entry per stage of the run, in pipeline order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub stages: Vec<StageStatus>,
    /// The newest committed checkpoint of the training stages.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_checkpoint: Option<CheckpointStatus>,
    /// Why the run is pending, e.g. "needs 8 nodes x 8 GPUs of type H100, 5 free; 2 ahead of it".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Position in its queue while pending (0 is next).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue_position: Option<u32>,
    /// The metadata.generation this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Admitted, Running, Succeeded, Failed, Suspended.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// The cluster scheduler's go-ahead for a stage attempt that needs GPUs, with its nodes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub admission: Option<Admission>,
    /// The cluster scheduler's request that a running attempt checkpoint and make room.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preemption: Option<Preemption>,
}

/// A stage attempt admitted by the cluster scheduler.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Admission {
    /// The stage.
    pub stage: String,
    /// The attempt admitted.
    pub attempt: u32,
    /// The node each pod of the gang runs on, by index.
    pub nodes: Vec<String>,
    /// RFC 3339 time of the admission.
    pub time: String,
}

/// A running stage attempt asked to checkpoint and stop for a higher-priority one.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Preemption {
    /// The stage.
    pub stage: String,
    /// The attempt to stop.
    pub attempt: u32,
    /// `namespace/run/stage` it makes room for.
    pub by: String,
    /// RFC 3339 time of the request.
    pub time: String,
}

/// Run phases.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum RunPhase {
    /// Accepted, not yet admitted.
    Pending,
    /// Waiting in a queue for resources.
    Queued,
    /// A stage is running.
    Running,
    /// Stopped after a checkpoint (suspend or preemption); resumes when admitted again.
    Suspended,
    /// Every stage committed its outputs.
    Succeeded,
    /// A stage failed beyond its restart budget, or the spec is invalid.
    Failed,
}

/// One stage's state.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct StageStatus {
    /// Stage name (`data-prep`, `tokenize`, `train`, `long-context`, `eval`).
    pub name: String,
    /// Stage phase.
    pub phase: StagePhase,
    /// Attempts started so far (1 on the first run); also the number in the attempt's Job names.
    #[serde(default)]
    pub attempts: u32,
    /// Attempts that failed and count against the restart budget (an attempt that checkpointed
    /// and stopped on request, for suspend or preemption, does not).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub failures: u32,
    /// Attempts the cluster ended (eviction, node loss, a pod's deletion): resumed from the last
    /// checkpoint without counting against the restart budget.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub disruptions: u32,
    /// RFC 3339 time the current attempt started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_time: Option<String>,
    /// RFC 3339 time the stage finished.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finish_time: Option<String>,
    /// The last one-line message from the stage (a failure reason, or progress).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// Stage phases.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum StagePhase {
    /// Not started.
    Pending,
    /// Running.
    Running,
    /// Outputs committed.
    Succeeded,
    /// Failed; may be retried from its checkpoint.
    Failed,
    /// Skipped because committed outputs with the same config hash exist.
    Skipped,
}

/// A committed checkpoint.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CheckpointStatus {
    /// Stage that wrote it.
    pub stage: String,
    /// Optimizer step.
    pub step: u64,
    /// Tokens trained on so far.
    pub tokens: u64,
    /// Training loss at that step.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loss: Option<f64>,
    /// Object-store URL of the checkpoint directory.
    pub url: String,
    /// RFC 3339 time the checkpoint was taken (what preemption would lose counts from here).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time: Option<String>,
}

/// A Kubernetes-style condition.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    /// Admitted, Running, Succeeded, Failed or Suspended.
    #[serde(rename = "type")]
    pub type_: String,
    /// "True", "False" or "Unknown".
    pub status: String,
    /// RFC 3339 time of the last change.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_transition_time: Option<String>,
    /// CamelCase reason.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Human-readable detail.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// The metadata.generation the condition was set for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}
