//! The `PretrainQueue` API: a cluster-wide queue with GPU quota, which the operator's scheduler
//! admits training stages from.

// kube's `printcolumn(...)` repeats argument names by design; clippy reads them as duplicates.
#![allow(clippy::duplicated_attributes)]

use std::collections::BTreeMap;

use kube_derive::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// A queue of PretrainRuns with a GPU quota. Runs name it in `spec.scheduling.queue`; the queue
/// `default` exists implicitly, without a quota limit, until a PretrainQueue of that name is made.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default, JsonSchema)]
#[kube(
    group = "pretrain.dev",
    version = "v1alpha1",
    kind = "PretrainQueue",
    plural = "pretrainqueues",
    shortname = "ptq",
    category = "pretrain",
    status = "PretrainQueueStatus",
    crates(kube_core = "::kube_core"),
    printcolumn(name = "Quota", type_ = "string", json_path = ".status.quota"),
    printcolumn(name = "In use", type_ = "string", json_path = ".status.inUse"),
    printcolumn(name = "Running", type_ = "integer", json_path = ".status.running"),
    printcolumn(name = "Waiting", type_ = "integer", json_path = ".status.waiting"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp"),
    doc = "A PretrainQueue admits the GPU stages of PretrainRuns within a GPU quota per GPU type."
)]
#[serde(rename_all = "camelCase")]
pub struct PretrainQueueSpec {
    /// GPUs the queue's running stages may hold, per GPU type (the node label
    /// `nvidia.com/gpu.product`, e.g. `NVIDIA-H100-80GB-HBM3`), `*` for any type. A type without an
    /// entry (and no `*`) has no quota.
    #[serde(default)]
    pub gpu_quota: BTreeMap<String, u32>,
    /// Whether the queue may use quota that other queues leave idle.
    #[serde(default)]
    pub borrowing: bool,
}

/// What the scheduler last saw of a queue.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PretrainQueueStatus {
    /// The quota, as one line (`NVIDIA-H100-80GB-HBM3: 64, *: 8`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quota: Option<String>,
    /// GPUs held by its running stages, per type, as one line.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub in_use: Option<String>,
    /// Stages of its runs holding GPUs.
    #[serde(default)]
    pub running: u32,
    /// Stages of its runs waiting for admission.
    #[serde(default)]
    pub waiting: u32,
}

/// The name of the queue runs use when they name none.
pub const DEFAULT_QUEUE: &str = "default";
