//! The artifacts stages leave in the store, as types: what one stage writes and the next stage, the
//! operator's export and the run report read. No stage reads another's outputs except through these.
//!
//! - `<run>/data-prep/shards/NNNNN.jsonl.zst`: [`DocumentLine`]s; the stage's commit carries
//!   [`DataPrepStats`].
//! - `<run>/{train,long-context}/ckpt/step-NNNNNNNNN/` ([`dir_name`]): `state.json`
//!   ([`TrainState`], with the model's shape, [`LlamaConfig`]), `model.safetensors`,
//!   `optim.safetensors`, and [`Manifest`] (`MANIFEST.json`) written last.
//! - `<run>/{train,long-context}/metrics.jsonl`: one [`MetricsLine`] a step; the stage's commit
//!   carries [`TrainStats`].

use std::collections::BTreeMap;

use pretrain_crd::spec::ModelConfig;
use serde::{Deserialize, Serialize};

use crate::FileEntry;

/// One document line of every data-prep file.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DocumentLine {
    /// Source-given or derived id.
    pub id: String,
    /// The cleaned text.
    pub text: String,
    /// Source name.
    pub source: String,
    /// Category (for the mix and the reports).
    pub category: String,
    /// Page URL.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// Page title.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub title: Option<String>,
}

/// The model's shape.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LlamaConfig {
    /// Vocabulary (the tokenizer's, special tokens included).
    pub vocab_size: usize,
    /// Hidden size.
    pub dim: usize,
    /// Blocks.
    pub layers: usize,
    /// Query heads.
    pub heads: usize,
    /// Key/value heads (divides `heads`).
    pub kv_heads: usize,
    /// SwiGLU hidden size.
    pub ffn_dim: usize,
    /// RoPE base.
    pub rope_base: f64,
    /// RMSNorm epsilon.
    pub norm_eps: f64,
    /// LM head shares the embedding.
    pub tie_embeddings: bool,
    /// RoPE rescaling (set by long-context training; none for a base model).
    #[serde(default, skip_serializing_if = "Scaling::is_none")]
    pub rope_scaling: Scaling,
}

/// Where a parameter sits, for weight decay and initialisation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParamKind {
    /// Token embedding.
    Embedding,
    /// RMSNorm gain.
    Norm,
    /// A projection feeding the residual stream (`o_proj`, `down_proj`).
    OutProjection,
    /// Any other matrix.
    Matrix,
}

impl LlamaConfig {
    /// The spec's model with the tokenizer's vocabulary.
    pub fn from_spec(model: &ModelConfig, vocab_size: u32) -> Self {
        Self {
            vocab_size: vocab_size as usize,
            dim: model.dim as usize,
            layers: model.layers as usize,
            heads: model.heads as usize,
            kv_heads: model.kv_heads as usize,
            ffn_dim: model.ffn_dim as usize,
            rope_base: model.rope_base,
            norm_eps: model.norm_eps,
            tie_embeddings: model.tie_embeddings,
            rope_scaling: Scaling::None,
        }
    }

    /// Size of one attention head.
    pub fn head_dim(&self) -> usize {
        self.dim / self.heads
    }

    /// Every parameter: name, shape and kind, in name order.
    pub fn params(&self) -> Vec<(String, Vec<usize>, ParamKind)> {
        let (d, hd, f) = (self.dim, self.head_dim(), self.ffn_dim);
        let mut all = vec![
            ("model.embed_tokens.weight".to_string(), vec![self.vocab_size, d], ParamKind::Embedding),
            ("model.norm.weight".to_string(), vec![d], ParamKind::Norm),
        ];
        if !self.tie_embeddings {
            all.push(("lm_head.weight".into(), vec![self.vocab_size, d], ParamKind::Matrix));
        }
        for l in 0..self.layers {
            let p = format!("model.layers.{l}");
            all.extend([
                (format!("{p}.input_layernorm.weight"), vec![d], ParamKind::Norm),
                (format!("{p}.post_attention_layernorm.weight"), vec![d], ParamKind::Norm),
                (format!("{p}.self_attn.q_proj.weight"), vec![self.heads * hd, d], ParamKind::Matrix),
                (format!("{p}.self_attn.k_proj.weight"), vec![self.kv_heads * hd, d], ParamKind::Matrix),
                (format!("{p}.self_attn.v_proj.weight"), vec![self.kv_heads * hd, d], ParamKind::Matrix),
                (format!("{p}.self_attn.o_proj.weight"), vec![d, self.heads * hd], ParamKind::OutProjection),
                (format!("{p}.mlp.gate_proj.weight"), vec![f, d], ParamKind::Matrix),
                (format!("{p}.mlp.up_proj.weight"), vec![f, d], ParamKind::Matrix),
                (format!("{p}.mlp.down_proj.weight"), vec![d, f], ParamKind::OutProjection),
            ]);
        }
        all.sort_by(|a, b| a.0.cmp(&b.0));
        all
    }

    /// Parameter count.
    pub fn parameters(&self) -> u64 {
        self.params().iter().map(|(_, shape, _)| shape.iter().product::<usize>() as u64).sum()
    }

    /// Training FLOPs per token at `seq_len`: 6 per weight of every matrix multiply (the LM head
    /// included, the embedding lookup not) plus the attention scores and values, `12 x layers x dim x
    /// seq_len` (PaLM's estimate, without exploiting causality).
    pub fn flops_per_token(&self, seq_len: usize) -> f64 {
        let matmul: u64 = self
            .params()
            .iter()
            .filter(|(_, _, kind)| matches!(kind, ParamKind::Matrix | ParamKind::OutProjection))
            .map(|(_, shape, _)| shape.iter().product::<usize>() as u64)
            .sum();
        let head = if self.tie_embeddings { (self.vocab_size * self.dim) as u64 } else { 0 };
        6.0 * (matmul + head) as f64 + 12.0 * (self.layers * self.dim * seq_len) as f64
    }

    /// Why this shape cannot be built, if it cannot.
    pub fn check(&self) -> std::result::Result<(), String> {
        if self.heads == 0 || !self.dim.is_multiple_of(self.heads) {
            return Err(format!("dim {} is not a multiple of heads {}", self.dim, self.heads));
        }
        if self.kv_heads == 0 || !self.heads.is_multiple_of(self.kv_heads) {
            return Err(format!("heads {} is not a multiple of kvHeads {}", self.heads, self.kv_heads));
        }
        if !self.head_dim().is_multiple_of(2) {
            return Err(format!("head size {} is odd; RoPE rotates pairs", self.head_dim()));
        }
        Ok(())
    }
}

/// How frequencies are rescaled for a context `factor` times longer than the one trained on. (NTK-aware
/// scaling is a new base, with no scaling.)
///
/// Serialised as in Hugging Face `rope_scaling` (`{"type": "yarn", "factor": 4.0, ...}`); `none` is
/// the default and left out of a config.
#[derive(Debug, Clone, Copy, PartialEq, Default, serde::Serialize, serde::Deserialize)]
#[serde(tag = "type", rename_all = "camelCase", rename_all_fields = "camelCase")]
pub enum Scaling {
    /// Plain RoPE.
    #[default]
    None,
    /// Positions divided by `factor` (position interpolation).
    Linear {
        /// New length / trained length.
        factor: f64,
    },
    /// YaRN: high frequencies kept, low ones interpolated, a ramp between (by rotations per trained
    /// context, `beta_fast` = 32 and `beta_slow` = 1), and attention logits scaled by
    /// `(0.1 ln(factor) + 1)^2`.
    Yarn {
        /// New length / trained length.
        factor: f64,
        /// The context the model was trained at.
        original_len: usize,
    },
}

impl Scaling {
    /// Whether this is plain RoPE.
    pub fn is_none(&self) -> bool {
        matches!(self, Scaling::None)
    }
}

/// Format of `state.json` and `MANIFEST.json`.
pub const FORMAT_VERSION: u32 = 1;

/// `state.json`: everything besides tensors that resuming needs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TrainState {
    /// Format of this record.
    pub format_version: u32,
    /// Optimizer steps completed.
    pub step: u64,
    /// Training tokens consumed (all ranks).
    pub tokens_seen: u64,
    /// Data-loader position in the token stream.
    pub cursor: u64,
    /// AdamW updates applied (differs from `step` when spikes were skipped).
    pub optimizer_updates: u64,
    /// Learning rate of the last step (the schedule is a pure function of `step`).
    pub lr: f64,
    /// Seed the run's randomness derives from (initialisation; nothing else draws today).
    pub rng_seed: u64,
    /// Ranks that trained.
    pub world_size: u32,
    /// The stage config hash of the spec that trained.
    pub config_hash: String,
    /// Model shape.
    pub model: LlamaConfig,
    /// Sequence length trained at.
    pub seq_len: usize,
    /// Loss of the last step.
    pub loss: Option<f64>,
    /// Recent losses of the spike detector.
    pub loss_window: Vec<f64>,
    /// When the step loop took the checkpoint (Unix seconds): what a preemption would lose is
    /// counted from here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub saved_unix: Option<u64>,
}

/// `MANIFEST.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Manifest {
    /// Format of this record.
    pub format_version: u32,
    /// Steps completed at the checkpoint.
    pub step: u64,
    /// Every file, paths relative to the checkpoint directory.
    pub files: Vec<FileEntry>,
}

/// A `MANIFEST.json` that cannot be trusted: the checkpoint is unusable.
#[derive(Debug, thiserror::Error)]
#[error("{reason}")]
pub struct InvalidManifest {
    /// What is wrong with it.
    pub reason: String,
}

impl Manifest {
    /// Checkpoint `files` at `step`, in this build's format.
    pub fn new(step: u64, files: Vec<FileEntry>) -> Self {
        Self { format_version: FORMAT_VERSION, step, files }
    }

    /// Parses and checks a `MANIFEST.json`: a format this build reads, and files named by plain
    /// file names (no directories, `..` or absolute paths: the names become local paths on load),
    /// each listed once.
    pub fn parse(bytes: &[u8]) -> Result<Self, InvalidManifest> {
        let invalid = |reason: String| InvalidManifest { reason };
        let manifest: Self =
            serde_json::from_slice(bytes).map_err(|e| invalid(format!("MANIFEST.json is not a manifest: {e}")))?;
        if manifest.format_version > FORMAT_VERSION {
            return Err(invalid(format!(
                "MANIFEST.json format {} is newer than this build reads ({FORMAT_VERSION})",
                manifest.format_version
            )));
        }
        let mut seen = std::collections::BTreeSet::new();
        for f in &manifest.files {
            // One segment that is a valid object key (which also refuses control characters).
            let plain = !f.path.contains('\\')
                && f.path.len() <= 255
                && crate::key(&f.path).is_ok_and(|k| k.parts().count() == 1);
            if !plain {
                return Err(invalid(format!("MANIFEST.json lists {:?}, which is not a plain file name", f.path)));
            }
            if !seen.insert(f.path.as_str()) {
                return Err(invalid(format!("MANIFEST.json lists {:?} twice", f.path)));
            }
        }
        Ok(manifest)
    }
}

/// `step-000000123`.
pub fn dir_name(step: u64) -> String {
    format!("step-{step:09}")
}

/// One optimizer step of train or long-context, as a line of `metrics.jsonl`. Fields are declared in
/// the order of their JSON names, the order a JSON object of them has always been written in.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MetricsLine {
    /// What loss-spike handling did at this step: `skipped` or `rolled-back`.
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

/// A record a reader skipped, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Skipped {
    /// File it was in.
    pub file: String,
    /// Byte offset (WARC) or line number (JSONL) in the file.
    pub offset: u64,
    /// Why it was skipped.
    pub reason: String,
}

/// What data-prep's map tasks saw, one task's or all of them merged.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MapStats {
    /// Input files read.
    pub files: u64,
    /// Documents read, per source.
    pub read: BTreeMap<String, u64>,
    /// Documents kept by the rule filters, per source.
    pub kept: BTreeMap<String, u64>,
    /// Documents dropped, per filter and reason (`c4/too_few_sentences`).
    pub dropped: BTreeMap<String, u64>,
    /// Lines removed by C4 from kept documents, per reason.
    pub lines_removed: BTreeMap<String, u64>,
    /// Empty documents dropped after cleaning.
    pub empty: u64,
    /// Records skipped as malformed.
    pub malformed: u64,
    /// The first malformed records, with file and offset.
    pub malformed_examples: Vec<Skipped>,
}

impl MapStats {
    /// Malformed records kept as examples, at most.
    pub const MALFORMED_EXAMPLES: usize = 100;

    /// Adds another task's counts (and examples, up to [`MapStats::MALFORMED_EXAMPLES`]).
    pub fn merge(&mut self, other: &MapStats) {
        let add = |a: &mut BTreeMap<String, u64>, b: &BTreeMap<String, u64>| {
            for (k, v) in b {
                *a.entry(k.clone()).or_default() += v;
            }
        };
        self.files += other.files;
        add(&mut self.read, &other.read);
        add(&mut self.kept, &other.kept);
        add(&mut self.dropped, &other.dropped);
        add(&mut self.lines_removed, &other.lines_removed);
        self.empty += other.empty;
        self.malformed += other.malformed;
        let room = Self::MALFORMED_EXAMPLES.saturating_sub(self.malformed_examples.len());
        self.malformed_examples.extend(other.malformed_examples.iter().take(room).cloned());
    }
}

/// The statistics data-prep commits (`_SUCCESS.json`'s `stats`): the funnel from documents read to
/// documents trained on.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct DataPrepStats {
    /// Layout version of the outputs.
    pub output_version: u32,
    /// What the map tasks read, kept and dropped.
    pub map: MapStats,
    /// The quality cut.
    pub quality: QualityStats,
    /// Exact and near-duplicate removal.
    pub dedup: DedupStats,
    /// The held-out split.
    pub held_out: HeldOutStats,
    /// The category mix.
    pub mix: MixStats,
    /// The training stream.
    pub train: StreamStats,
}

/// The quality cut of data-prep.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct QualityStats {
    /// Threshold of each scored category.
    pub thresholds: BTreeMap<String, f32>,
    /// Documents under it, per category.
    pub removed: BTreeMap<String, u64>,
}

/// Deduplication in data-prep.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct DedupStats {
    /// Documents the map tasks kept.
    pub candidates: u64,
    /// Exact duplicates removed.
    pub exact_removed: u64,
    /// Near duplicates removed.
    pub near_removed: u64,
    /// Candidate pairs whose signatures were compared.
    pub lsh_pairs_compared: u64,
    /// Pairs merged.
    pub lsh_pairs_merged: u64,
    /// Band collisions the signature check refused.
    pub lsh_collisions_rejected: u64,
}

/// The held-out split.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct HeldOutStats {
    /// Documents held out.
    pub documents: u64,
}

/// The category mix, per category.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct MixStats {
    /// Training bytes before the mix.
    pub bytes_before_mix: BTreeMap<String, u64>,
    /// Epochs taken.
    pub epochs: BTreeMap<String, f64>,
    /// Documents in the training stream (copies counted).
    pub documents: BTreeMap<String, u64>,
    /// Bytes in the training stream.
    pub bytes: BTreeMap<String, u64>,
    /// Share of the stream's bytes.
    pub realised_share: BTreeMap<String, f64>,
}

/// The training stream data-prep wrote.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct StreamStats {
    /// Documents (copies counted).
    pub documents: u64,
    /// Output shards.
    pub shards: u64,
}

/// How a tokenizer was trained (none when it was copied from `tokenizer.url`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TokenizerTraining {
    /// Documents in the training sample.
    pub sample_documents: u64,
    /// Bytes in the training sample.
    pub sample_bytes: u64,
    /// Training time.
    pub seconds: f64,
}

/// Documents, tokens, bytes and characters of some encoded text.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Counts {
    /// Documents.
    pub documents: u64,
    /// Tokens, separators included.
    pub tokens: u64,
    /// UTF-8 bytes of text.
    pub bytes: u64,
    /// Characters of text.
    pub chars: u64,
}

impl Counts {
    /// The sum of per-category counts.
    pub fn total<'a>(all: impl IntoIterator<Item = &'a Counts>) -> Counts {
        all.into_iter().fold(Counts::default(), |mut sum, c| {
            sum.add(c);
            sum
        })
    }

    /// Adds `other`'s counts.
    pub fn add(&mut self, other: &Counts) {
        self.documents += other.documents;
        self.tokens += other.tokens;
        self.bytes += other.bytes;
        self.chars += other.chars;
    }
}

/// Bytes and characters per token of some text.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Compression {
    /// What was measured.
    #[serde(flatten)]
    pub counts: Counts,
    /// UTF-8 bytes per token (separators not counted as tokens).
    pub bytes_per_token: f64,
    /// Characters per token.
    pub chars_per_token: f64,
}

impl Compression {
    /// The compression of `counts`.
    pub fn of(counts: &Counts) -> Self {
        let tokens = counts.tokens.saturating_sub(counts.documents).max(1) as f64;
        Self {
            counts: counts.clone(),
            bytes_per_token: counts.bytes as f64 / tokens,
            chars_per_token: counts.chars as f64 / tokens,
        }
    }
}

/// The statistics tokenize commits (`_SUCCESS.json`'s `stats`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TokenizeStats {
    /// The tokenizer.
    pub tokenizer: TokenizerStats,
    /// Tokens per category, of the training shards and of the held-out split.
    pub tokens: SplitTokens,
    /// Documents per category of the training shards, and of the held-out split.
    pub documents: SplitDocuments,
    /// Compression on the held-out split, per category and over all of it.
    pub compression: CompressionReport,
    /// Each token shard.
    pub shards: Vec<TokenShardStats>,
}

/// The tokenizer tokenize used.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TokenizerStats {
    /// SHA-256 of `tokenizer.json`.
    pub sha256: String,
    /// Its vocabulary size.
    pub vocab_size: u32,
    /// The spec's `tokenizer.vocabSize`.
    pub requested_vocab_size: u32,
    /// The special token that ends every document.
    pub separator: String,
    /// How it was trained.
    pub trained: Option<TokenizerTraining>,
    /// Where it was copied from, instead.
    pub url: Option<String>,
    /// Whether encoding took the fast path (no pre-tokenizer quirks to emulate).
    pub fast_path: bool,
}

/// Tokens per category.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SplitTokens {
    /// Of the training shards.
    pub train: BTreeMap<String, u64>,
    /// Of the held-out split.
    pub heldout: BTreeMap<String, u64>,
}

/// Documents of the training shards per category, and of the held-out split.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SplitDocuments {
    /// Per category, of the training shards.
    pub train: BTreeMap<String, u64>,
    /// Of the held-out split.
    pub heldout: u64,
}

/// Compression on the held-out split.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CompressionReport {
    /// Per category.
    pub heldout: BTreeMap<String, Compression>,
    /// Over all of it.
    pub all: Compression,
}

/// One token shard of tokenize.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TokenShardStats {
    /// Its path in the stage directory.
    pub file: String,
    /// Documents in it.
    pub documents: u64,
    /// Tokens in it.
    pub tokens: u64,
}

/// One probe reading recorded during training, as eval reports it (`eval.json`'s `probeHistory`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ProbeRow {
    /// Stage that trained.
    pub stage: String,
    /// Step of the checkpoint.
    pub step: u64,
    /// Tokens seen in that stage.
    pub tokens: u64,
    /// Log-probability per probe.
    pub logprobs: BTreeMap<String, f64>,
}
