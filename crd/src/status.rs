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
    /// Goodput of the training stages so far.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub goodput: Option<Goodput>,
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

/// [`Preemption::by`] when a gang that shrank (`train.resources.minNodes`) stops to restart on all
/// its nodes.
pub const GROW: &str = "grow";

/// A running stage attempt asked to checkpoint and stop, for a higher-priority one or to grow back.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Preemption {
    /// The stage.
    pub stage: String,
    /// The attempt to stop.
    pub attempt: u32,
    /// `namespace/run/stage` it makes room for, or `grow` when a gang that shrank restarts on all
    /// its nodes.
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
    /// Where a training stage's attempts spent their time (for goodput).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time: Option<StageTime>,
}

/// Where a training stage's attempts spent their time, in seconds. The operator adds each attempt
/// when it ends: its wall time, and the part of it that no checkpoint kept (the checkpoints'
/// ledger, `state.json`'s `history`, says what each attempt kept), by why the attempt ended.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", default)]
pub struct StageTime {
    /// Wall seconds of the ended attempts, from their start to their end.
    pub held_seconds: f64,
    /// Seconds spent waiting to start attempts: for admission, and for the restart backoff.
    pub queued_seconds: f64,
    /// Seconds of attempts that failed or that the cluster ended, which no checkpoint kept: the
    /// steps since the last checkpoint (recomputed by the next attempt), and the failure itself.
    pub recomputed_seconds: f64,
    /// Seconds of attempts stopped to make room (preempted or suspended) that no checkpoint kept.
    pub preempted_seconds: f64,
    /// Seconds of other attempts that no checkpoint kept: pods starting before the worker, the
    /// commit after the last checkpoint, attempts stopped by a spec change.
    pub other_seconds: f64,
    /// The ledger's seconds when the current attempt started.
    pub ledger_at_start: f64,
    /// RFC 3339 time the stage began waiting for its next attempt, while it waits.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub waiting_since: Option<String>,
}

/// The share of the time the training gangs held their nodes that advanced the model, and where
/// the rest went.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Goodput {
    /// Productive seconds over held seconds less those in flight (0 to 1).
    pub ratio: f64,
    /// GPU-hours the training gangs held (a pod without GPUs counts as one).
    pub held_gpu_hours: f64,
    /// Wall seconds the training gangs held their nodes.
    pub held_seconds: f64,
    /// Seconds of training steps that checkpoints kept.
    pub productive_seconds: f64,
    /// Seconds of the running attempt since its newest checkpoint: neither kept nor lost yet.
    pub in_flight_seconds: f64,
    /// Seconds lost, by cause.
    pub lost: GoodputLoss,
}

/// Lost seconds by cause. All but `admission` are part of the held time.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct GoodputLoss {
    /// Waiting for admission and restart backoffs, holding no nodes.
    pub admission: f64,
    /// From a worker's start to its first step: joining the gang, loading the checkpoint and data.
    pub startup: f64,
    /// Failed or disrupted attempts' time that no checkpoint kept.
    pub recomputed: f64,
    /// The step loop held by checkpoints.
    pub checkpoint: f64,
    /// Preempted or suspended attempts' time that no checkpoint kept.
    pub preemption: f64,
    /// Held-out loss and probes at checkpoints.
    pub evaluation: f64,
    /// The rest: pods starting before the worker, commits, attempts stopped by a spec change.
    pub other: f64,
}

impl GoodputLoss {
    /// Each cause with its seconds, in the order above.
    pub fn by_cause(&self) -> [(&'static str, f64); 7] {
        [
            ("admission", self.admission),
            ("startup", self.startup),
            ("recomputed", self.recomputed),
            ("checkpoint", self.checkpoint),
            ("preemption", self.preemption),
            ("evaluation", self.evaluation),
            ("other", self.other),
        ]
    }
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
