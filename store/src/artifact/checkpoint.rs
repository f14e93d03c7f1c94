//! A checkpoint: the model's shape, the train state, and the manifest written last.

use pretrain_crd::spec::ModelConfig;
use serde::{Deserialize, Serialize};

use crate::FileEntry;

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
    /// The smallest shape with every feature of the architecture (two blocks, grouped-query
    /// attention with two query heads per key-value head, SwiGLU, a tied LM head): tests' model.
    pub fn tiny(vocab_size: usize) -> Self {
        Self {
            vocab_size,
            dim: 32,
            layers: 2,
            heads: 4,
            kv_heads: 2,
            ffn_dim: 48,
            rope_base: 10_000.0,
            norm_eps: 1e-5,
            tie_embeddings: true,
            rope_scaling: Scaling::None,
        }
    }

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
    /// The losses of the spikes flagged in a row up to this step (none after a normal step).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub spike_streak: Vec<f64>,
    /// When the step loop took the checkpoint (Unix seconds): what a preemption would lose is
    /// counted from here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub saved_unix: Option<u64>,
    /// The stage's attempts up to this checkpoint, for the checkpoint interval.
    #[serde(default)]
    pub history: RunHistory,
}

impl TrainState {
    /// The state of `model` before its first step: nothing trained, one rank, seed 1.
    pub fn new(model: LlamaConfig) -> Self {
        Self {
            format_version: FORMAT_VERSION,
            step: 0,
            tokens_seen: 0,
            cursor: 0,
            optimizer_updates: 0,
            lr: 0.0,
            rng_seed: 1,
            world_size: 1,
            config_hash: String::new(),
            model,
            seq_len: 0,
            loss: None,
            loss_window: Vec::new(),
            spike_streak: Vec::new(),
            saved_unix: None,
            history: RunHistory::default(),
        }
    }
}

/// What a stage's attempts went through, carried from checkpoint to checkpoint.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct RunHistory {
    /// Attempts that resumed after a failure (not after a checkpoint taken on SIGTERM).
    pub failures: u32,
    /// Wall seconds of the steps up to this checkpoint, over all attempts.
    pub train_seconds: f64,
    /// This checkpoint was taken on SIGTERM (a preemption, not a failure, ended the attempt).
    pub stopped: bool,
    /// Seconds the step loop spent on checkpoints up to this one: starting each, and waiting for a
    /// copy of the weights to finish before an update.
    pub checkpoint_seconds: f64,
    /// Seconds of held-out loss and probes at checkpoints.
    pub eval_seconds: f64,
    /// Seconds from the start of each attempt to its first step: joining the gang, loading the
    /// checkpoint, opening the data.
    pub startup_seconds: f64,
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

/// Whether a checkpoint file (a name in its directory) holds `kind` (`model`, `optim`): the whole
/// `<kind>.safetensors` one process writes, or a shard `<kind>-<r>-of-<w>.safetensors` of a gang.
pub fn is_file_of(file: &str, kind: &str) -> bool {
    file.strip_prefix(kind)
        .is_some_and(|rest| rest == ".safetensors" || (rest.starts_with('-') && rest.ends_with(".safetensors")))
}
