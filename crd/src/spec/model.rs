//! `spec.model`: the Llama architecture, as a preset with single fields overridden.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::field::Errors;

/// The model: a preset, and optional overrides of single fields.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", default)]
pub struct Model {
    /// Base shape.
    pub preset: ModelPreset,
    /// Hidden size (overrides the preset).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 8))]
    pub dim: Option<u32>,
    /// Transformer blocks (overrides the preset).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub layers: Option<u32>,
    /// Attention (query) heads (overrides the preset).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub heads: Option<u32>,
    /// Key/value heads for grouped-query attention; divides `heads` (overrides the preset).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub kv_heads: Option<u32>,
    /// SwiGLU hidden size (overrides the preset).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub ffn_dim: Option<u32>,
    /// RoPE base (theta) (overrides the preset).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rope_base: Option<f64>,
    /// RMSNorm epsilon (overrides the preset).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub norm_eps: Option<f64>,
    /// Share the token embedding with the LM head (overrides the preset).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tie_embeddings: Option<bool>,
}

impl Default for Model {
    fn default() -> Self {
        Self {
            preset: ModelPreset::Llama125m,
            dim: None,
            layers: None,
            heads: None,
            kv_heads: None,
            ffn_dim: None,
            rope_base: None,
            norm_eps: None,
            tie_embeddings: None,
        }
    }
}

/// Named model shapes.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum ModelPreset {
    /// 256 wide, 4 blocks: a few million parameters, trains on a CPU in minutes.
    #[serde(rename = "tiny")]
    Tiny,
    /// 768 wide, 12 blocks, 12 heads, 4 kv heads (about 125M parameters with a 32k vocabulary).
    #[serde(rename = "llama-125m")]
    Llama125m,
    /// TinyLlama's shape: 2048 wide, 22 blocks, 32 heads, 4 kv heads (about 1.1B parameters).
    #[serde(rename = "llama-1b")]
    Llama1b,
    /// Llama 2 7B's shape: 4096 wide, 32 blocks, 32 heads, 32 kv heads, SwiGLU 11008 (6.7B parameters).
    #[serde(rename = "llama-7b")]
    Llama7b,
}

/// A fully resolved model shape.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ModelConfig {
    /// Hidden size.
    pub dim: u32,
    /// Transformer blocks.
    pub layers: u32,
    /// Query heads.
    pub heads: u32,
    /// Key/value heads.
    pub kv_heads: u32,
    /// SwiGLU hidden size.
    pub ffn_dim: u32,
    /// RoPE base.
    pub rope_base: f64,
    /// RMSNorm epsilon.
    pub norm_eps: f64,
    /// LM head shares the embedding matrix.
    pub tie_embeddings: bool,
}

impl ModelPreset {
    /// The shape this preset names.
    pub fn config(self) -> ModelConfig {
        let (dim, layers, heads, kv_heads, ffn_dim, tie_embeddings) = match self {
            Self::Tiny => (256, 4, 8, 4, 688, true),
            Self::Llama125m => (768, 12, 12, 4, 2048, false),
            Self::Llama1b => (2048, 22, 32, 4, 5632, false),
            Self::Llama7b => (4096, 32, 32, 32, 11008, false),
        };
        ModelConfig { dim, layers, heads, kv_heads, ffn_dim, rope_base: 10_000.0, norm_eps: 1e-5, tie_embeddings }
    }
}

impl Model {
    /// The preset's shape with this spec's overrides applied.
    pub fn resolved(&self) -> ModelConfig {
        let base = self.preset.config();
        ModelConfig {
            dim: self.dim.unwrap_or(base.dim),
            layers: self.layers.unwrap_or(base.layers),
            heads: self.heads.unwrap_or(base.heads),
            kv_heads: self.kv_heads.unwrap_or(base.kv_heads),
            ffn_dim: self.ffn_dim.unwrap_or(base.ffn_dim),
            rope_base: self.rope_base.unwrap_or(base.rope_base),
            norm_eps: self.norm_eps.unwrap_or(base.norm_eps),
            tie_embeddings: self.tie_embeddings.unwrap_or(base.tie_embeddings),
        }
    }
}

impl ModelConfig {
    /// Parameters for a given vocabulary size (embeddings, blocks, norms, LM head).
    /// Saturates instead of overflowing, so an absurd (invalid) shape cannot panic.
    pub fn parameters(&self, vocab_size: u32) -> u64 {
        let (d, f, v) = (u64::from(self.dim), u64::from(self.ffn_dim), u64::from(vocab_size));
        let head_dim = d.checked_div(u64::from(self.heads)).unwrap_or(0);
        let kv = head_dim.saturating_mul(u64::from(self.kv_heads));
        let attention = d.saturating_mul(d).saturating_mul(2).saturating_add(d.saturating_mul(kv).saturating_mul(2));
        let mlp = d.saturating_mul(f).saturating_mul(3);
        let per_block = attention.saturating_add(mlp).saturating_add(2 * d);
        let blocks = u64::from(self.layers).saturating_mul(per_block);
        let embedding = v.saturating_mul(d);
        let head = if self.tie_embeddings { 0 } else { embedding };
        embedding.saturating_add(blocks).saturating_add(d).saturating_add(head)
    }
}

impl Model {
    /// The rules of `spec.model`, each reported against the first field the user set.
    pub(crate) fn check(&self, e: &mut Errors) {
        let c = self.resolved();
        // Report against the first field the user set among those a rule reads, else against the preset.
        let field = |candidates: &[(bool, &str)]| {
            candidates
                .iter()
                .find(|(set, _)| *set)
                .map_or_else(|| "spec.model.preset".to_string(), |(_, name)| format!("spec.model.{name}"))
        };
        let (dim, heads, kv_heads) =
            ((self.dim.is_some(), "dim"), (self.heads.is_some(), "heads"), (self.kv_heads.is_some(), "kvHeads"));
        e.check(
            (8..=65_536).contains(&c.dim),
            field(&[dim]),
            format!("dim must be between 8 and 65536, got {}", c.dim),
        );
        e.check(
            (1..=1024).contains(&c.layers),
            field(&[(self.layers.is_some(), "layers")]),
            format!("layers must be between 1 and 1024, got {}", c.layers),
        );
        e.check(
            (1..=1 << 20).contains(&c.ffn_dim),
            field(&[(self.ffn_dim.is_some(), "ffnDim")]),
            format!("ffnDim must be between 1 and 1048576, got {}", c.ffn_dim),
        );
        if c.heads == 0 || c.kv_heads == 0 || c.heads > 1024 {
            e.push(field(&[heads, kv_heads]), "heads and kvHeads must be between 1 and 1024");
            return;
        }
        if !c.dim.is_multiple_of(c.heads) {
            e.push(field(&[heads, dim]), format!("dim ({}) must be a multiple of heads ({})", c.dim, c.heads));
        } else if !(c.dim / c.heads).is_multiple_of(2) {
            e.push(
                field(&[dim, heads]),
                format!("head dimension dim / heads = {} must be even for RoPE", c.dim / c.heads),
            );
        }
        if !c.heads.is_multiple_of(c.kv_heads) {
            e.push(
                field(&[kv_heads, heads]),
                format!("heads ({}) must be a multiple of kvHeads ({})", c.heads, c.kv_heads),
            );
        }
        e.check(
            c.rope_base > 1.0 && c.rope_base.is_finite(),
            field(&[(self.rope_base.is_some(), "ropeBase")]),
            format!("ropeBase must be greater than 1, got {}", c.rope_base),
        );
        e.check(
            c.norm_eps > 0.0 && c.norm_eps < 1.0,
            field(&[(self.norm_eps.is_some(), "normEps")]),
            format!("normEps must be in (0, 1), got {}", c.norm_eps),
        );
    }
}
