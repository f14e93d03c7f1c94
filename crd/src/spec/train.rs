//! `spec.train`: budget, batch, optimizer, schedule, checkpoints and resources of pretraining.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::Quantity;
use crate::field::Errors;

/// Pretraining.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", default)]
pub struct Train {
    /// Tokens per training sequence. The default, 4096, is the seed recipe's short length (train at
    /// 4K/8K, then extend with `longContext`).
    #[schemars(range(min = 16, max = 1_048_576))]
    pub seq_len: u32,
    /// The run's token budget, long-context's share (`longContext.tokensFraction`) included; omitted
    /// means 20 tokens per parameter (Chinchilla).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub tokens: Option<u64>,
    /// Tokens per optimizer step across all ranks (reached by gradient accumulation).
    #[schemars(range(min = 16))]
    pub global_batch_tokens: u64,
    /// Sequences per forward/backward pass on one rank.
    #[schemars(range(min = 1, max = 4096))]
    pub micro_batch_size: u32,
    /// AdamW.
    pub optimizer: Optimizer,
    /// Learning-rate schedule.
    pub schedule: Schedule,
    /// Numeric precision.
    pub precision: Precision,
    /// Recompute each block's activations in the backward pass instead of keeping them: about a
    /// third more compute for a fraction of the activation memory, so larger micro-batches fit.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub recompute_activations: bool,
    /// Checkpoint cadence and retention.
    pub checkpoint: Checkpointing,
    /// Nodes and per-node resources of the training gang.
    pub resources: Resources,
    /// Gang restarts from the last checkpoint before the run fails.
    #[schemars(range(min = 0, max = 1000))]
    pub max_restarts: u32,
    /// Loss-spike detection.
    pub loss_spike: LossSpike,
}

impl Default for Train {
    fn default() -> Self {
        Self {
            seq_len: 4096,
            tokens: None,
            global_batch_tokens: 524_288,
            micro_batch_size: 8,
            optimizer: Optimizer::default(),
            schedule: Schedule::default(),
            precision: Precision::Auto,
            recompute_activations: false,
            checkpoint: Checkpointing::default(),
            resources: Resources::default(),
            max_restarts: 10,
            loss_spike: LossSpike::default(),
        }
    }
}

/// AdamW with decoupled weight decay.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", default)]
pub struct Optimizer {
    /// Peak learning rate.
    #[schemars(range(min = 0.0, max = 10.0))]
    pub lr: f64,
    /// Final learning rate of the decay.
    #[schemars(range(min = 0.0, max = 10.0))]
    pub min_lr: f64,
    /// Decoupled weight decay (not applied to norms and embeddings).
    #[schemars(range(min = 0.0, max = 10.0))]
    pub weight_decay: f64,
    /// Adam beta1 and beta2.
    #[schemars(length(min = 2, max = 2))]
    pub betas: Vec<f64>,
    /// Adam epsilon.
    #[schemars(range(min = 0.0))]
    pub eps: f64,
    /// Largest global gradient norm; 0 disables clipping.
    #[schemars(range(min = 0.0))]
    pub grad_clip: f64,
}

impl Default for Optimizer {
    fn default() -> Self {
        Self { lr: 3e-4, min_lr: 3e-5, weight_decay: 0.1, betas: vec![0.9, 0.95], eps: 1e-8, grad_clip: 1.0 }
    }
}

/// Learning-rate schedule, a pure function of the step.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", default)]
pub struct Schedule {
    /// `cosine` (warmup then cosine decay to minLr), `wsd` (warmup, stable, short decay), `constant`.
    pub kind: ScheduleKind,
    /// Linear warmup steps.
    pub warmup_steps: u64,
    /// Fraction of the steps spent in the final decay (wsd).
    #[schemars(range(min = 0.0, max = 1.0))]
    pub decay_fraction: f64,
}

impl Default for Schedule {
    fn default() -> Self {
        Self { kind: ScheduleKind::Cosine, warmup_steps: 2000, decay_fraction: 0.1 }
    }
}

/// Schedule shapes.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum ScheduleKind {
    /// Warmup + cosine decay.
    Cosine,
    /// Warmup, stable, decay (MiniCPM).
    Wsd,
    /// Warmup, then constant.
    Constant,
}

/// Numeric precision.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum Precision {
    /// bf16 compute with fp32 master weights on GPUs, fp32 on CPUs.
    Auto,
    /// fp32 everywhere.
    Fp32,
    /// bf16 compute with fp32 master weights (GPUs only).
    Bf16,
}

/// Checkpointing.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", default)]
pub struct Checkpointing {
    /// `steps`: a checkpoint every `everySteps` steps. `auto`: the interval that loses the least
    /// time to checkpoints and to recomputing lost steps, Young and Daly's sqrt(2 x cost x MTBF),
    /// from the measured cost of the last checkpoint (the time the step loop waited for it) and the
    /// gang's mean time between failures; at most `everySteps` apart.
    pub every: CheckpointEvery,
    /// Steps between checkpoints (with `every: auto`, the most).
    #[schemars(range(min = 1))]
    pub every_steps: u64,
    /// `every: auto`: the gang's mean time between failures before any is observed, in hours.
    /// Defaults to Llama 3's rate (466 interruptions in 54 days on 16,384 GPUs: 45,566 GPU-hours per
    /// interruption) divided by the gang's GPUs (CPU pods count as one each). Each failure the stage
    /// survives then pulls the estimate towards what it observes: (this + training time) / (1 +
    /// failures).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.0))]
    pub mtbf_hours: Option<f64>,
    /// Checkpoints kept (older ones are deleted after a newer one is committed).
    #[schemars(range(min = 1, max = 1000))]
    pub keep: u32,
}

impl Default for Checkpointing {
    fn default() -> Self {
        Self { every: CheckpointEvery::Steps, every_steps: 1000, mtbf_hours: None, keep: 3 }
    }
}

/// How checkpoints are spaced.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum CheckpointEvery {
    /// Every `everySteps` steps.
    Steps,
    /// Young/Daly's interval from the measured checkpoint cost and failure rate.
    Auto,
}

/// The training gang: one pod per node.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", default)]
pub struct Resources {
    /// Nodes (pods) in the data-parallel gang.
    #[schemars(range(min = 1, max = 4096))]
    pub nodes: u32,
    /// Fewest nodes the gang may shrink to: when an attempt fails (a node lost) and the whole gang
    /// cannot be admitted again within `shrinkAfterSeconds`, training resumes from its checkpoint on
    /// as many nodes as fit, down to this many, with the same global batch (more micro-batches per
    /// rank) and bitwise the same updates; it grows back at a checkpoint once the nodes return.
    /// Unset: the gang always has `nodes`.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 4096))]
    pub min_nodes: Option<u32>,
    /// Seconds a gang that may shrink waits for all its nodes before it starts on fewer.
    #[schemars(range(min = 0))]
    pub shrink_after_seconds: u32,
    /// GPUs per node; 0 trains on CPUs.
    #[schemars(range(min = 0, max = 16))]
    pub gpus_per_node: u32,
    /// GPU type to place on (matched against the node label `nvidia.com/gpu.product`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gpu_type: Option<String>,
    /// CPU request per pod.
    pub cpu: Quantity,
    /// Memory request per pod.
    pub memory: Quantity,
}

impl Default for Resources {
    fn default() -> Self {
        Self {
            nodes: 1,
            min_nodes: None,
            shrink_after_seconds: 300,
            gpus_per_node: 8,
            gpu_type: None,
            cpu: Quantity("16".into()),
            memory: Quantity("128Gi".into()),
        }
    }
}

impl Resources {
    /// Data-parallel ranks: one per GPU, or one per node on CPUs.
    pub fn ranks(&self) -> u64 {
        u64::from(self.nodes) * u64::from(self.gpus_per_node.max(1))
    }

    /// The fewest nodes the gang may train on (`minNodes`, else all of them).
    pub fn fewest_nodes(&self) -> u32 {
        self.min_nodes.unwrap_or(self.nodes).clamp(1, self.nodes.max(1))
    }
}

/// Loss-spike handling.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", default)]
pub struct LossSpike {
    /// A step whose loss is this many standard deviations above the window mean is a spike.
    #[schemars(range(min = 0.0))]
    pub z_score: f64,
    /// Steps in the rolling window.
    #[schemars(range(min = 2))]
    pub window: u32,
    /// What to do about a spike.
    pub action: SpikeAction,
    /// Most spikes handled (skipped or rolled back) in a row: the next one means the loss has moved
    /// to a new level, so its update is applied and the window restarts from the losses of the
    /// streak (a `new-level` event in the metrics), so that a lasting shift never stalls training.
    #[schemars(range(min = 1))]
    pub max_consecutive: u32,
}

impl Default for LossSpike {
    fn default() -> Self {
        Self { z_score: 6.0, window: 100, action: SpikeAction::Skip, max_consecutive: 10 }
    }
}

/// Loss-spike actions.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum SpikeAction {
    /// Log it and carry on.
    Log,
    /// Skip the optimizer update of that batch.
    Skip,
    /// Reload the previous checkpoint and skip past the batch.
    Rollback,
}

impl Train {
    /// The rules of `spec.train`; `steps` is the run's optimizer steps when the model is valid.
    pub(crate) fn check(&self, steps: Option<u64>, e: &mut Errors) {
        e.check(
            (16..=1 << 20).contains(&self.seq_len),
            "spec.train.seqLen",
            format!("must be between 16 and 1048576, got {}", self.seq_len),
        );
        e.check(self.micro_batch_size >= 1, "spec.train.microBatchSize", "must be at least 1");
        self.check_batch(e);
        self.optimizer.check(e);
        self.schedule.check(steps.filter(|_| self.global_batch_tokens > 0), e);
        e.check(self.checkpoint.every_steps >= 1, "spec.train.checkpoint.everySteps", "must be at least 1");
        e.check(self.checkpoint.keep >= 1, "spec.train.checkpoint.keep", "must keep at least 1 checkpoint");
        if let Some(h) = self.checkpoint.mtbf_hours {
            e.check(h > 0.0 && h.is_finite(), "spec.train.checkpoint.mtbfHours", format!("must be positive, got {h}"));
        }
        e.check(self.resources.nodes >= 1, "spec.train.resources.nodes", "must be at least 1");
        if let Some(min) = self.resources.min_nodes {
            e.check(
                (1..=self.resources.nodes).contains(&min),
                "spec.train.resources.minNodes",
                format!("must be between 1 and spec.train.resources.nodes ({}), got {min}", self.resources.nodes),
            );
        }
        e.check(self.resources.gpus_per_node <= 16, "spec.train.resources.gpusPerNode", "must be at most 16");
        if self.precision == Precision::Bf16 && self.resources.gpus_per_node == 0 {
            e.push("spec.train.precision", "bf16 needs GPUs (gpusPerNode > 0); use auto or fp32 on CPUs");
        }
        e.check(self.loss_spike.window >= 2, "spec.train.lossSpike.window", "must be at least 2");
        e.check(self.loss_spike.max_consecutive >= 1, "spec.train.lossSpike.maxConsecutive", "must be at least 1");
    }

    /// The global batch is whole micro-batches on every rank, and the budget at least one of it.
    fn check_batch(&self, e: &mut Errors) {
        let ranks = self.resources.ranks();
        let per_step = u64::from(self.seq_len).saturating_mul(u64::from(self.micro_batch_size)).saturating_mul(ranks);
        let shape = format!(
            "seqLen x microBatchSize x data-parallel ranks ({} x {} x {ranks} = {per_step})",
            self.seq_len, self.micro_batch_size
        );
        if self.global_batch_tokens < per_step.max(1) {
            e.push(
                "spec.train.globalBatchTokens",
                format!("must be at least {shape}, got {}", self.global_batch_tokens),
            );
        } else if per_step > 0 && !self.global_batch_tokens.is_multiple_of(per_step) {
            e.push(
                "spec.train.globalBatchTokens",
                format!("must be a multiple of {shape}, got {}", self.global_batch_tokens),
            );
        }
        if let Some(tokens) = self.tokens {
            e.check(
                tokens >= self.global_batch_tokens,
                "spec.train.tokens",
                format!("must be at least one global batch ({} tokens), got {tokens}", self.global_batch_tokens),
            );
        }
    }
}

impl Optimizer {
    fn check(&self, e: &mut Errors) {
        e.positive(self.lr, "spec.train.optimizer.lr");
        e.check(
            self.min_lr >= 0.0 && self.min_lr <= self.lr,
            "spec.train.optimizer.minLr",
            format!("must be between 0 and lr ({}), got {}", self.lr, self.min_lr),
        );
        e.check(self.weight_decay >= 0.0, "spec.train.optimizer.weightDecay", "must be 0 or more");
        if self.betas.len() == 2 {
            for (i, b) in self.betas.iter().enumerate() {
                e.check(
                    (0.0..1.0).contains(b),
                    format!("spec.train.optimizer.betas[{i}]"),
                    format!("must be at least 0 and below 1, got {b}"),
                );
            }
        } else {
            e.push("spec.train.optimizer.betas", format!("must have exactly 2 values, got {}", self.betas.len()));
        }
        e.positive(self.eps, "spec.train.optimizer.eps");
        e.check(self.grad_clip >= 0.0, "spec.train.optimizer.gradClip", "must be 0 (off) or more");
    }
}

impl Schedule {
    /// `steps`: the run's optimizer steps, when they can be known.
    fn check(&self, steps: Option<u64>, e: &mut Errors) {
        if let Some(steps) = steps {
            e.check(
                self.warmup_steps < steps.max(1),
                "spec.train.schedule.warmupSteps",
                format!("must be fewer than the run's {steps} optimizer steps, got {}", self.warmup_steps),
            );
        }
        if self.kind == ScheduleKind::Wsd {
            e.check(
                self.decay_fraction > 0.0 && self.decay_fraction <= 1.0,
                "spec.train.schedule.decayFraction",
                format!("must be in (0, 1] for wsd, got {}", self.decay_fraction),
            );
        }
    }
}
