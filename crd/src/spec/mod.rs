//! The `PretrainRun` spec: every field a user can set, each with the recipe's default.
//!
//! Defaults live in `Default` impls and `#[serde(default)]`, so a manifest parsed by the CLI and one
//! defaulted by the API server (from the generated schema) resolve to the same values. One module a
//! section of the manifest, each with its rules (`check`) beside its types.
//!
//! With the `kube` feature, `PretrainRun` is the custom resource kube derives; without it (the
//! worker), [`plain::PretrainRun`], a struct of the same shape that needs no Kubernetes crate.

// kube's `printcolumn(...)` repeats argument names by design; clippy reads them as duplicates.
#![allow(clippy::duplicated_attributes)]

pub mod data;
pub mod eval;
pub mod filters;
pub mod long_context;
pub mod model;
pub mod plain;
pub mod tokenizer;
pub mod train;

#[cfg(feature = "kube")]
use kube_derive::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

pub use self::data::{
    CpuResources, CurriculumKey, Data, Dedup, Extract, MinHash, Mix, Order, OrderStrategy, Source, SourceFormat,
};
pub use self::eval::{Benchmark, BenchmarkFormat, Eval, Passkey, Probe};
pub use self::filters::{
    C4, Filters, FineWeb, GopherQuality, GopherRepetition, Language, NgramLimit, Quality, QualityClassifier,
};
pub use self::long_context::{LongContext, RopeScaling, RopeScalingKind};
pub use self::model::{Model, ModelConfig, ModelPreset};
#[cfg(not(feature = "kube"))]
pub use self::plain::{ObjectMeta, PretrainRun, Quantity};
pub use self::tokenizer::{BUILTIN_SPECIAL_TOKENS, Tokenizer};
pub use self::train::{
    CheckpointEvery, Checkpointing, LossSpike, Optimizer, Precision, Resources, Schedule, ScheduleKind, SpikeAction,
    Train,
};
#[cfg(feature = "kube")]
use crate::status::PretrainRunStatus;
#[cfg(feature = "kube")]
pub use k8s_openapi::apimachinery::pkg::api::resource::Quantity;

/// One training run, end to end: raw text in, a pretrained and evaluated Llama-style model out.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[cfg_attr(feature = "kube", derive(CustomResource, KubeSchema))]
#[cfg_attr(
    feature = "kube",
    kube(
        group = "pretrain.dev",
        version = "v1alpha1",
        kind = "PretrainRun",
        plural = "pretrainruns",
        shortname = "ptr",
        category = "pretrain",
        namespaced,
        status = "PretrainRunStatus",
        printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase"),
        printcolumn(name = "Stage", type_ = "string", json_path = ".status.stage"),
        printcolumn(name = "Step", type_ = "integer", json_path = ".status.lastCheckpoint.step"),
        printcolumn(name = "Loss", type_ = "number", json_path = ".status.lastCheckpoint.loss"),
        printcolumn(name = "Goodput", type_ = "number", json_path = ".status.goodput.ratio"),
        printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp"),
        crates(kube_core = "::kube_core"),
        derive = "PartialEq",
        doc = "A PretrainRun trains a Llama-style language model from raw text: data-prep, tokenize, train, long-context and eval."
    )
)]
#[cfg_attr(feature = "kube", x_kube(
    crates(kube_core = "::kube_core"),
    // Cross-field rules the API server checks too (after applying the schema's defaults); each is
    // guarded with has() so that a partially defaulted object never makes a rule error out.
    validation = Rule::new(concat!(
        "!has(self.longContext) || !has(self.longContext.seqLen) || !has(self.train) || !has(self.train.seqLen)",
        " || self.longContext.seqLen > self.train.seqLen"
    ))
    .message("longContext.seqLen must be greater than train.seqLen")
    .field_path(".longContext.seqLen"),
    validation = Rule::new(concat!(
        "!has(self.train) || !has(self.train.globalBatchTokens) || !has(self.train.seqLen)",
        " || !has(self.train.microBatchSize)",
        " || self.train.globalBatchTokens % (self.train.seqLen * self.train.microBatchSize) == 0"
    ))
    .message("train.globalBatchTokens must be a multiple of train.seqLen x train.microBatchSize")
    .field_path(".train.globalBatchTokens"),
    validation = Rule::new(concat!(
        "!has(self.train) || !has(self.train.optimizer) || !has(self.train.optimizer.minLr)",
        " || !has(self.train.optimizer.lr) || self.train.optimizer.minLr <= self.train.optimizer.lr"
    ))
    .message("train.optimizer.minLr must not exceed train.optimizer.lr")
    .field_path(".train.optimizer.minLr"),
))]
#[serde(rename_all = "camelCase")]
pub struct PretrainRunSpec {
    /// Where every shard, tokenizer, checkpoint and report of the run is kept.
    pub storage: Storage,
    /// Container image of `pretrain-worker` used by every stage's pods.
    #[serde(default = "default_image")]
    pub image: String,
    /// `true` checkpoints the running stage and stops; `false` resumes from the last checkpoint.
    #[serde(default)]
    pub suspend: bool,
    /// Seed for every random choice of the run (sampling, shuffling, initialisation).
    #[serde(default = "default_seed")]
    pub seed: u64,
    /// Which queue admits the run and how it ranks against others.
    #[serde(default)]
    pub scheduling: Scheduling,
    /// Raw text sources and how they are cleaned, deduplicated, mixed and ordered.
    pub data: Data,
    /// The byte-level BPE tokenizer.
    #[serde(default)]
    pub tokenizer: Tokenizer,
    /// The Llama architecture: a preset, optionally with single fields overridden.
    #[serde(default)]
    pub model: Model,
    /// Pretraining: sequence length, token budget, batch, optimizer, schedule, checkpoints, resources.
    #[serde(default)]
    pub train: Train,
    /// Optional continued training at a longer context with rescaled RoPE.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub long_context: Option<LongContext>,
    /// What the eval stage measures.
    #[serde(default)]
    pub eval: Eval,
}

/// The worker image a run gets when its manifest names none.
pub fn default_image() -> String {
    format!("ghcr.io/pretrain-dev/pretrain-worker:{}", env!("CARGO_PKG_VERSION"))
}

fn default_seed() -> u64 {
    1234
}

/// Object storage for the run: `file://`, `s3://`, `gs://`, `az://` or `memory://`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Storage {
    /// Store URL, e.g. `s3://bucket/prefix` or `file:///data/runs`; the run writes under `<url>/<run>/`.
    #[schemars(length(min = 1))]
    pub url: String,
    /// Secret whose keys are exported as environment variables to every pod (AWS_ACCESS_KEY_ID, ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_ref: Option<SecretRef>,
    /// Delete the run's objects from the store when the PretrainRun is deleted (kept by default).
    #[serde(default)]
    pub delete_on_run_delete: bool,
}

/// A reference to a Secret in the run's namespace.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
pub struct SecretRef {
    /// Name of the Secret.
    #[schemars(length(min = 1))]
    pub name: String,
}

/// Queue and priority of the run.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", default)]
pub struct Scheduling {
    /// Name of the PretrainQueue that admits the run's stages.
    #[schemars(length(min = 1))]
    pub queue: String,
    /// Higher runs first and may preempt lower-priority training.
    #[schemars(range(min = -1000, max = 1000))]
    pub priority: i32,
    /// Hand admission to Kueue instead of the built-in scheduler.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kueue: Option<Kueue>,
}

impl Default for Scheduling {
    fn default() -> Self {
        Self { queue: "default".into(), priority: 0, kueue: None }
    }
}

/// Kueue admission: Jobs are created suspended with the queue label.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Kueue {
    /// The Kueue LocalQueue name.
    #[schemars(length(min = 1))]
    pub queue_name: String,
}

impl PretrainRunSpec {
    /// The run's token budget: `train.tokens` as set, or 20 tokens per parameter (Chinchilla). Train
    /// and long-context share it.
    pub fn total_tokens(&self) -> u64 {
        self.train
            .tokens
            .unwrap_or_else(|| self.model.resolved().parameters(self.tokenizer.vocab_size).saturating_mul(20))
    }

    /// Long-context's share of the budget: `longContext.tokensFraction` of it (0 without
    /// `longContext`).
    pub fn long_context_tokens(&self) -> u64 {
        let total = self.total_tokens();
        self.long_context.as_ref().map_or(0, |lc| ((total as f64 * lc.tokens_fraction).ceil() as u64).min(total))
    }

    /// The train stage's token budget: the run's, less long-context's share.
    pub fn train_tokens(&self) -> u64 {
        self.total_tokens() - self.long_context_tokens()
    }

    /// Optimizer steps of the train stage (the budget rounded up to whole global batches).
    pub fn train_steps(&self) -> u64 {
        self.train_tokens().div_ceil(self.train.global_batch_tokens.max(1))
    }
}
