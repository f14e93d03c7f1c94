//! What train and long-context log and commit: a metrics line a step, the stage's statistics.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::{LlamaConfig, Scaling};

/// One optimizer step of train or long-context, as a line of `metrics.jsonl`. Fields are declared in
/// the order of their JSON names, the order a JSON object of them has always been written in.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MetricsLine {
    /// What loss-spike handling did at this step: `skipped` or `rolled-back` (a spike), or
    /// `new-level` (the spike after `lossSpike.maxConsecutive` in a row: the update was applied and the
    /// detector restarted from the new loss level).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub event: Option<String>,
    /// Gradient norm before clipping.
    pub grad_norm: f64,
    /// Mean loss over the held-out sequences, at scheduled checkpoints.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub heldout_loss: Option<f64>,
    /// Mean training loss of the step (all ranks).
    pub loss: f64,
    /// Learning rate of the step.
    pub lr: f64,
    /// Model FLOPs utilisation of the step.
    pub mfu: f64,
    /// Log-probability of each probe's target, at scheduled checkpoints.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub probes: BTreeMap<String, f64>,
    /// Wall time of the step.
    pub seconds: f64,
    /// Steps done, this one included.
    pub step: u64,
    /// Unix time (seconds) at the end of the step.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time: Option<f64>,
    /// Tokens trained on so far.
    pub tokens: u64,
    /// Tokens per second per rank.
    pub tokens_per_second: f64,
}

/// The statistics train and long-context commit (`_SUCCESS.json`'s `stats`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TrainStats {
    /// The final checkpoint's directory name.
    pub checkpoint: String,
    /// Passes over the training tokens.
    pub epochs: f64,
    /// Loss of the last step.
    pub final_loss: Option<f64>,
    /// Training FLOPs per token at the stage's sequence length.
    pub flops_per_token: f64,
    /// The model's shape.
    pub model: LlamaConfig,
    /// Parameter count.
    pub parameters: u64,
    /// RoPE base.
    pub rope_base: f64,
    /// RoPE scaling.
    pub rope_scaling: Scaling,
    /// Wall time of this attempt.
    pub seconds: f64,
    /// Tokens per sequence.
    pub seq_len: usize,
    /// Optimizer steps done.
    pub steps: u64,
    /// Tokens trained on.
    pub tokens: u64,
}
