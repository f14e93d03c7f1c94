//! One transformer block and its layers, each owning its weights: [RMSNorm -> attention with RoPE
//! and grouped-query heads -> residual -> RMSNorm -> SwiGLU MLP -> residual].
//!
//! The weights are the fp32 variables' tensors; a forward pass in another dtype runs on a
//! [`Block::cast`] of the block (the cast is part of the graph, so gradients reach the variables).

use candle_core::{DType, Result, Tensor};

use super::fused::Kernels;
use super::params::Prefix;
use super::{LlamaConfig, Rope};

/// What a forward pass through the blocks needs besides their weights: the batch shape, the first
/// position, the RoPE tables and the kernels. Cheap to clone (the tables are shared), so that the
/// recomputation op can own one.
#[derive(Debug, Clone)]
pub(crate) struct Pass {
    pub rope: Rope,
    pub batch: usize,
    pub seq: usize,
    /// Position of the first token (the number of positions cached before it).
    pub offset: usize,
    pub kernels: Kernels,
}

/// A linear layer without bias, `x W^T`, with `W` `[out, in]` as Hugging Face stores it.
#[derive(Debug, Clone)]
pub(crate) struct Linear(pub Tensor);

impl Linear {
    fn load(w: &Prefix<'_>, name: &str) -> Result<Self> {
        w.weight(name).map(Self)
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        x.matmul(&self.0.t()?)
    }
}

/// RMSNorm with a learned gain.
#[derive(Debug, Clone)]
pub(crate) struct RmsNorm {
    weight: Tensor,
    eps: f64,
}

impl RmsNorm {
    pub fn load(w: &Prefix<'_>, name: &str, eps: f64) -> Result<Self> {
        Ok(Self { weight: w.weight(name)?, eps })
    }

    pub fn cast(&self, dtype: DType) -> Result<Self> {
        Ok(Self { weight: self.weight.to_dtype(dtype)?, eps: self.eps })
    }

    pub fn forward(&self, x: &Tensor, kernels: Kernels) -> Result<Tensor> {
        kernels.rms_norm(x, &self.weight, self.eps)
    }
}

/// Causal self-attention with RoPE and grouped-query heads (`heads / kv_heads` query heads share one
/// key/value head).
#[derive(Debug, Clone)]
struct Attention {
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    heads: usize,
    kv_heads: usize,
    /// The logit scale: 1/sqrt(head_dim), times YaRN's temperature.
    scale: f64,
}

impl Attention {
    /// `x` `[batch * seq, dim]` attended; with a cache, over the positions it holds too, which it then
    /// keeps this pass's keys and values for.
    fn forward(&self, x: &Tensor, pass: &Pass, cache: Option<&mut LayerCache>) -> Result<Tensor> {
        let (b, t, kernels) = (pass.batch, pass.seq, pass.kernels);
        let heads = |proj: &Linear, n: usize, rope: Option<&Rope>| -> Result<Tensor> {
            kernels.split_heads(&proj.forward(x)?, (b, t, n), rope, pass.offset)
        };
        let q = heads(&self.q, self.heads, Some(&pass.rope))?;
        let k = heads(&self.k, self.kv_heads, Some(&pass.rope))?;
        let v = heads(&self.v, self.kv_heads, None)?;
        let (k, v) = match cache {
            Some(cache) => cache.extend(k, v)?,
            None => (k, v),
        };
        let attn = kernels.causal_attention(&q, &k, &v, self.scale)?; // [b, h, t, hd]
        self.o.forward(&kernels.merge_heads(&attn)?)
    }
}

/// The SwiGLU MLP: `down(silu(gate(x)) * up(x))`.
#[derive(Debug, Clone)]
struct Mlp {
    gate: Linear,
    up: Linear,
    down: Linear,
}

impl Mlp {
    fn forward(&self, x: &Tensor, kernels: Kernels) -> Result<Tensor> {
        let (gate, up) = (self.gate.forward(x)?, self.up.forward(x)?);
        self.down.forward(&kernels.swiglu(&gate, &up)?)
    }
}

/// One transformer block.
#[derive(Debug, Clone)]
pub(crate) struct Block {
    input_norm: RmsNorm,
    attn: Attention,
    post_norm: RmsNorm,
    mlp: Mlp,
}

/// Number of weight tensors in a block.
pub(crate) const BLOCK_WEIGHTS: usize = 9;

impl Block {
    /// Block `layer`'s weights from `model.layers.{layer}.*`.
    pub fn load(params: &super::Params, config: &LlamaConfig, layer: usize, attention_factor: f64) -> Result<Self> {
        let prefix = format!("model.layers.{layer}");
        let (attn, mlp) = (format!("{prefix}.self_attn"), format!("{prefix}.mlp"));
        let (w, a, m) = (params.prefix(&prefix), params.prefix(&attn), params.prefix(&mlp));
        Ok(Self {
            input_norm: RmsNorm::load(&w, "input_layernorm", config.norm_eps)?,
            attn: Attention {
                q: Linear::load(&a, "q_proj")?,
                k: Linear::load(&a, "k_proj")?,
                v: Linear::load(&a, "v_proj")?,
                o: Linear::load(&a, "o_proj")?,
                heads: config.heads,
                kv_heads: config.kv_heads,
                scale: attention_factor / (config.head_dim() as f64).sqrt(),
            },
            post_norm: RmsNorm::load(&w, "post_attention_layernorm", config.norm_eps)?,
            mlp: Mlp {
                gate: Linear::load(&m, "gate_proj")?,
                up: Linear::load(&m, "up_proj")?,
                down: Linear::load(&m, "down_proj")?,
            },
        })
    }

    /// The weights, in a fixed order ([`Block::with_weights`] takes them back in it).
    pub fn weights(&self) -> [&Tensor; BLOCK_WEIGHTS] {
        let Self { input_norm, attn, post_norm, mlp } = self;
        [
            &input_norm.weight,
            &attn.q.0,
            &attn.k.0,
            &attn.v.0,
            &attn.o.0,
            &post_norm.weight,
            &mlp.gate.0,
            &mlp.up.0,
            &mlp.down.0,
        ]
    }

    /// The same block with other weights (in [`Block::weights`]' order, same shapes).
    pub fn with_weights(&self, weights: [Tensor; BLOCK_WEIGHTS]) -> Self {
        let [norm1, q, k, v, o, norm2, gate, up, down] = weights;
        let mut block = self.clone();
        block.input_norm.weight = norm1;
        block.attn.q = Linear(q);
        block.attn.k = Linear(k);
        block.attn.v = Linear(v);
        block.attn.o = Linear(o);
        block.post_norm.weight = norm2;
        block.mlp = Mlp { gate: Linear(gate), up: Linear(up), down: Linear(down) };
        block
    }

    /// The block with each weight mapped by `f`.
    pub fn map(&self, f: impl Fn(&Tensor) -> Result<Tensor>) -> Result<Self> {
        let mapped: Vec<Tensor> = self.weights().into_iter().map(f).collect::<Result<_>>()?;
        let weights: [Tensor; BLOCK_WEIGHTS] = mapped.try_into().expect("one tensor per weight");
        Ok(self.with_weights(weights))
    }

    /// The block computing in `dtype`.
    pub fn cast(&self, dtype: DType) -> Result<Self> {
        self.map(|w| w.to_dtype(dtype))
    }

    /// The residual stream `x` `[batch * seq, dim]` after the block.
    pub fn forward(&self, x: &Tensor, pass: &Pass, cache: Option<&mut LayerCache>) -> Result<Tensor> {
        let hidden = self.input_norm.forward(x, pass.kernels)?;
        let x = (x + self.attn.forward(&hidden, pass, cache)?)?;
        let hidden = self.post_norm.forward(&x, pass.kernels)?;
        x + self.mlp.forward(&hidden, pass.kernels)?
    }
}

/// Keys and values of the positions already run, per layer, for generation one token at a time.
#[derive(Debug, Default)]
pub struct KvCache {
    pub(crate) layers: Vec<LayerCache>,
    pub(crate) len: usize,
}

impl KvCache {
    /// An empty cache.
    pub fn new() -> Self {
        Self::default()
    }

    /// Positions cached.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Layer `l`'s cache (empty the first time).
    pub(crate) fn layer(&mut self, l: usize) -> &mut LayerCache {
        if self.layers.len() <= l {
            self.layers.resize_with(l + 1, LayerCache::default);
        }
        &mut self.layers[l]
    }
}

/// One layer's cached keys and values `[batch, kv_heads, positions, head_dim]`.
#[derive(Debug, Default)]
pub(crate) struct LayerCache(Option<(Tensor, Tensor)>);

impl LayerCache {
    /// The cached keys and values followed by `k` and `v`, which the cache then holds.
    fn extend(&mut self, k: Tensor, v: Tensor) -> Result<(Tensor, Tensor)> {
        let (k, v) = match &self.0 {
            Some((pk, pv)) => (Tensor::cat(&[pk, &k], 2)?, Tensor::cat(&[pv, &v], 2)?),
            None => (k, v),
        };
        self.0 = Some((k.clone(), v.clone()));
        Ok((k, v))
    }
}
