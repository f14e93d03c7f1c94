//! `spec.longContext`: continued training at a longer context with rescaled RoPE.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::{Optimizer, Train};
use crate::field::Errors;

/// Long-context continued training.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LongContext {
    /// The new sequence length; greater than `train.seqLen`.
    #[schemars(range(min = 32, max = 4_194_304))]
    pub seq_len: u32,
    /// How RoPE is rescaled for the new length.
    #[serde(default)]
    pub rope: RopeScaling,
    /// Share of the run's token budget (`train.tokens`) trained at the long length, taken out of
    /// train's: the seed recipe trains about 90% of the tokens at the short length and 10% long
    /// (the default).
    #[serde(default = "default_tokens_fraction")]
    #[schemars(range(min = 0.0, max = 1.0))]
    pub tokens_fraction: f64,
    /// Sequences per pass; defaults to keeping train's tokens per pass.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub micro_batch_size: Option<u32>,
    /// Peak learning rate of the continuation; defaults to a tenth of `train.optimizer.lr` (at least
    /// its `minLr`), so that adapting to the new length does not undo what pretraining learned.
    /// The schedule is train's, decaying to `train.optimizer.minLr` (or to this, if lower).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.0))]
    pub lr: Option<f64>,
    /// The long-context data, as Fu et al. (2024) choose it ("per-source length upsampling"):
    /// every category keeps its share of the tokens, and within each, documents of at least
    /// `longDocumentTokens` are drawn this many times as often as shorter ones. 1 reads the training
    /// stream as it is.
    #[serde(default = "default_upsample_long")]
    #[schemars(range(min = 1.0))]
    pub upsample_long: f64,
    /// The tokens from which a document counts as long; defaults to `train.seqLen` (documents the
    /// base model never saw whole).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub long_document_tokens: Option<u32>,
}

impl LongContext {
    /// The continuation's peak learning rate under `optimizer` (train's settings).
    pub fn peak_lr(&self, optimizer: &Optimizer) -> f64 {
        self.lr.unwrap_or((optimizer.lr / 10.0).max(optimizer.min_lr))
    }
}

fn default_tokens_fraction() -> f64 {
    0.1
}

fn default_upsample_long() -> f64 {
    4.0
}

/// RoPE rescaling.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", default)]
pub struct RopeScaling {
    /// `ntk` (base * s^(d/(d-2))), `yarn`, `linear` (position interpolation) or `none`.
    pub scaling: RopeScalingKind,
    /// Scale factor; defaults to longContext.seqLen / train.seqLen.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1.0))]
    pub factor: Option<f64>,
    /// An explicit new RoPE base; overrides what the scaling would compute.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub base: Option<f64>,
}

impl Default for RopeScaling {
    fn default() -> Self {
        Self { scaling: RopeScalingKind::Ntk, factor: None, base: None }
    }
}

/// RoPE rescaling methods.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum RopeScalingKind {
    /// No rescaling (the baseline), or only the explicit `base`.
    None,
    /// NTK-aware base change.
    Ntk,
    /// YaRN: per-frequency interpolation and attention temperature.
    Yarn,
    /// Linear position interpolation.
    Linear,
}

impl LongContext {
    /// The rules of `spec.longContext`, against the train stage it continues.
    pub(crate) fn check(&self, t: &Train, e: &mut Errors) {
        e.check(
            self.seq_len > t.seq_len,
            "spec.longContext.seqLen",
            format!("must be greater than spec.train.seqLen ({}), got {}", t.seq_len, self.seq_len),
        );
        e.check(
            self.tokens_fraction > 0.0 && self.tokens_fraction < 1.0,
            "spec.longContext.tokensFraction",
            format!("must be above 0 and below 1 (train keeps the rest of the budget), got {}", self.tokens_fraction),
        );
        if let Some(f) = self.rope.factor {
            e.check(f >= 1.0 && f.is_finite(), "spec.longContext.rope.factor", format!("must be at least 1, got {f}"));
            if self.rope.scaling == RopeScalingKind::None {
                e.push("spec.longContext.rope.factor", "has no effect with scaling none; set base or a scaling");
            }
        }
        if let Some(b) = self.rope.base {
            e.check(b > 1.0 && b.is_finite(), "spec.longContext.rope.base", format!("must be greater than 1, got {b}"));
        }
        if let Some(mb) = self.micro_batch_size {
            e.check(mb >= 1, "spec.longContext.microBatchSize", "must be at least 1");
        }
        let u = self.upsample_long;
        e.check(u >= 1.0 && u.is_finite(), "spec.longContext.upsampleLong", format!("must be at least 1, got {u}"));
        if let Some(t) = self.long_document_tokens {
            e.check(t >= 1, "spec.longContext.longDocumentTokens", "must be at least 1");
        }
    }
}
