//! The Llama architecture in candle: token embedding, blocks of [RMSNorm -> attention with RoPE and
//! grouped-query attention -> residual -> RMSNorm -> SwiGLU MLP -> residual], final RMSNorm, LM head
//! (optionally tied to the embedding).
//!
//! Parameters are named as in Hugging Face `LlamaForCausalLM` (`model.layers.0.self_attn.q_proj.weight`,
//! ...), so checkpoints export without renaming. Every operation used has a backward pass; weights are
//! fp32 `Var`s and the forward pass can compute in bf16 from them.

#[cfg(feature = "cuda")]
pub(crate) mod cuda;
pub mod fused;
mod gemm;
pub mod rope;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use candle_core::{CpuStorage, DType, Device, Layout, Result, Shape, Tensor, Var};

pub use pretrain_store::artifact::{LlamaConfig, ParamKind};
pub use rope::{Rope, Scaling};

/// CUDA device `ordinal`, set up for training (on builds with feature `cuda`: its memory pool keeps
/// freed memory for reuse and tensors track no events; see `cuda::prepare`).
pub fn cuda_device(ordinal: usize) -> Result<Device> {
    let device = Device::new_cuda(ordinal)?;
    #[cfg(feature = "cuda")]
    if let Device::Cuda(d) = &device {
        cuda::prepare(d)?;
    }
    Ok(device)
}

/// The trainable weights, by name.
#[derive(Debug)]
pub struct Params {
    names: Vec<String>,
    kinds: Vec<ParamKind>,
    vars: Vec<Var>,
    index: HashMap<String, usize>,
}

/// A deterministic normal generator (SplitMix64 + Box-Muller), so that a seed fixes the initial weights
/// on every machine.
fn normals(seed: u64, n: usize, std: f64) -> Vec<f32> {
    let mut state = seed;
    let mut next = || pretrain_crd::seeded::unit(&mut state);
    let mut out = Vec::with_capacity(n + 1);
    while out.len() < n {
        let (u1, u2) = (next().max(f64::MIN_POSITIVE), next());
        let r = (-2.0 * u1.ln()).sqrt() * std;
        let theta = 2.0 * std::f64::consts::PI * u2;
        out.push((r * theta.cos()) as f32);
        out.push((r * theta.sin()) as f32);
    }
    out.truncate(n);
    out
}

impl Params {
    /// Initial weights: matrices ~ N(0, 0.02), residual projections scaled by 1/sqrt(2 x layers),
    /// norm gains 1.
    pub fn init(config: &LlamaConfig, seed: u64, device: &Device) -> Result<Self> {
        use rayon::prelude::*;
        // Each tensor has a seed of its own, so they can be drawn in parallel (a 1.1B model's
        // billion draws take seconds on one core).
        let values: Vec<Vec<f32>> = config
            .params()
            .into_par_iter()
            .enumerate()
            .map(|(i, (_, shape, kind))| {
                let n: usize = shape.iter().product();
                match kind {
                    ParamKind::Norm => vec![1f32; n],
                    ParamKind::OutProjection => {
                        normals(seed ^ (i as u64) << 20, n, 0.02 / (2.0 * config.layers as f64).sqrt())
                    }
                    ParamKind::Embedding | ParamKind::Matrix => normals(seed ^ (i as u64) << 20, n, 0.02),
                }
            })
            .collect();
        let mut tensors = Vec::new();
        for ((name, shape, kind), values) in config.params().into_iter().zip(values) {
            tensors.push((name, kind, Tensor::from_vec(values, shape, device)?));
        }
        Self::from_tensors(tensors)
    }

    fn from_tensors(tensors: Vec<(String, ParamKind, Tensor)>) -> Result<Self> {
        let mut params = Self { names: Vec::new(), kinds: Vec::new(), vars: Vec::new(), index: HashMap::new() };
        for (name, kind, tensor) in tensors {
            params.index.insert(name.clone(), params.names.len());
            params.names.push(name);
            params.kinds.push(kind);
            params.vars.push(Var::from_tensor(&tensor)?);
        }
        Ok(params)
    }

    /// Weights read from `tensors` (a loaded checkpoint), checked against the config: every name
    /// present with its shape, nothing extra.
    pub fn from_named(
        config: &LlamaConfig,
        mut tensors: HashMap<String, Tensor>,
        device: &Device,
    ) -> std::result::Result<Self, String> {
        let mut out = Vec::new();
        for (name, shape, kind) in config.params() {
            let t = tensors.remove(&name).ok_or_else(|| format!("missing tensor {name}"))?;
            if t.dims() != shape.as_slice() {
                return Err(format!("tensor {name} has shape {:?}, the config needs {shape:?}", t.dims()));
            }
            let t = t.to_dtype(DType::F32).and_then(|t| t.to_device(device)).map_err(|e| e.to_string())?;
            out.push((name, kind, t));
        }
        if let Some(extra) = tensors.keys().next() {
            return Err(format!("unexpected tensor {extra}"));
        }
        Self::from_tensors(out).map_err(|e| e.to_string())
    }

    /// A weight by name.
    pub fn get(&self, name: &str) -> &Tensor {
        self.vars[self.index[name]].as_tensor()
    }

    /// Names, kinds and variables, in name order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, ParamKind, &Var)> {
        self.names.iter().zip(&self.kinds).zip(&self.vars).map(|((n, k), v)| (n.as_str(), *k, v))
    }

    /// The weights as named tensors (sharing storage with the variables).
    pub fn named(&self) -> Vec<(String, Tensor)> {
        self.iter().map(|(n, _, v)| (n.to_string(), v.as_tensor().clone())).collect()
    }

    /// Number of tensors.
    pub fn len(&self) -> usize {
        self.vars.len()
    }

    /// Whether there are no tensors.
    pub fn is_empty(&self) -> bool {
        self.vars.is_empty()
    }
}

/// The model: shape, weights, RoPE tables.
#[derive(Debug)]
pub struct Llama {
    /// The shape.
    pub config: LlamaConfig,
    /// The weights.
    pub params: Params,
    rope: Rope,
    /// Attention logit multiplier on top of 1/sqrt(head_dim) (YaRN's temperature).
    attention_factor: f64,
    /// Recompute each block's activations in the backward instead of keeping them.
    recompute: bool,
    /// Blocks the backward has run again (with `recompute`).
    recomputed: Arc<AtomicUsize>,
}

/// Keys and values of the positions already run, per layer, for generation one token at a time.
#[derive(Debug, Default)]
pub struct KvCache {
    layers: Vec<(Tensor, Tensor)>,
    len: usize,
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
}

impl Llama {
    /// A model over `params` for sequences up to `max_seq_len`, with the RoPE scaling of `config`.
    pub fn new(config: LlamaConfig, params: Params, max_seq_len: usize, device: &Device) -> Result<Self> {
        let scaling = config.rope_scaling;
        let rope = Rope::new(config.head_dim(), max_seq_len, config.rope_base, scaling, device)?;
        Ok(Self {
            config,
            params,
            rope,
            attention_factor: rope::attention_factor(scaling),
            recompute: false,
            recomputed: Arc::default(),
        })
    }

    /// Turns activation recomputation on or off (off by default): with it, training keeps only each
    /// block's input and output and runs the block's forward again in the backward, for about a
    /// third more compute and a fraction of the activation memory (larger batches fit).
    pub fn set_recompute(&mut self, on: bool) {
        self.recompute = on;
    }

    /// How many blocks backward passes have run again so far (with recomputation on).
    pub fn recomputed_blocks(&self) -> usize {
        self.recomputed.load(Ordering::Relaxed)
    }

    /// Positions the model was built for (its RoPE tables).
    pub fn max_seq_len(&self) -> usize {
        self.rope.len()
    }

    /// Logits `[batch, seq, vocab]` (fp32) for token ids `[batch, seq]`, computing in `dtype`.
    pub fn forward(&self, ids: &Tensor, dtype: DType) -> Result<Tensor> {
        self.run(ids, dtype, None)?.to_dtype(DType::F32)
    }

    /// Logits for `ids` `[batch, new]` following the positions in `cache`, which then holds them too.
    /// Inference only: the cache keeps no gradients.
    pub fn forward_cached(&self, ids: &Tensor, cache: &mut KvCache, dtype: DType) -> Result<Tensor> {
        self.run(ids, dtype, Some(cache))?.to_dtype(DType::F32)
    }

    /// Logits `[batch, seq, vocab]` in `dtype`.
    fn run(&self, ids: &Tensor, dtype: DType, mut cache: Option<&mut KvCache>) -> Result<Tensor> {
        let c = &self.config;
        let (b, t) = ids.dims2()?;
        let w = |name: &str| self.params.get(name).to_dtype(dtype);
        let offset = cache.as_ref().map_or(0, |c| c.len);
        let block = self.block((b, t));

        let mut x = w("model.embed_tokens.weight")?.index_select(&ids.flatten_all()?, 0)?; // [b*t, dim]
        for l in 0..c.layers {
            let weights = BLOCK_WEIGHTS
                .iter()
                .map(|name| w(&format!("model.layers.{l}.{name}.weight")))
                .collect::<Result<Vec<_>>>()?;
            x = match cache.as_deref_mut() {
                Some(cache) => block.forward(&x, &weights, Some((cache, l, offset)))?,
                None if self.recompute => recompute(&block, &x, &weights, &self.recomputed)?,
                None => block.forward(&x, &weights, None)?,
            };
        }
        if let Some(cache) = cache {
            cache.len += t;
        }
        let x = rms_norm(&x, &w("model.norm.weight")?, c.norm_eps)?;
        let head = if c.tie_embeddings { "model.embed_tokens.weight" } else { "lm_head.weight" };
        x.matmul(&w(head)?.t()?)?.reshape((b, t, c.vocab_size))
    }

    fn block(&self, (batch, seq): (usize, usize)) -> Block {
        let scale = self.attention_factor / (self.config.head_dim() as f64).sqrt();
        Block { config: self.config.clone(), rope: self.rope.clone(), scale, batch, seq }
    }

    /// Mean next-token cross-entropy (fp32) of `inputs` against `targets` (both `[batch, seq]`), and
    /// the logits in `dtype`: the loss reads bf16 logits as they are, without an fp32 copy of the
    /// `[tokens, vocab]` matrix.
    pub fn loss(&self, inputs: &Tensor, targets: &Tensor, dtype: DType) -> Result<(Tensor, Tensor)> {
        let logits = self.run(inputs, dtype, None)?;
        let (b, t, v) = logits.dims3()?;
        let loss = fused::cross_entropy(&logits.reshape((b * t, v))?, &targets.flatten_all()?)?;
        Ok((loss, logits))
    }
}

/// The weights of one block, in the order [`Block::forward`] takes them (suffixes of
/// `model.layers.N.`).
const BLOCK_WEIGHTS: [&str; 9] = [
    "input_layernorm",
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "post_attention_layernorm",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
];

/// One transformer block for a batch shape: what it needs besides its weights (cheap to clone, so
/// that the recomputation op can own one).
#[derive(Debug, Clone)]
struct Block {
    config: LlamaConfig,
    rope: Rope,
    /// Attention logit scale.
    scale: f64,
    batch: usize,
    seq: usize,
}

impl Block {
    /// The residual stream `x` `[batch * seq, dim]` after the block with `weights` (in
    /// [`BLOCK_WEIGHTS`] order); with a cache, attention also sees (and the cache keeps) the
    /// positions before these (layer `l`, starting at position `offset`).
    fn forward(&self, x: &Tensor, weights: &[Tensor], cache: Option<(&mut KvCache, usize, usize)>) -> Result<Tensor> {
        let c = &self.config;
        let (b, t, h, kv) = (self.batch, self.seq, c.heads, c.kv_heads);
        let [norm1, wq, wk, wv, wo, norm2, gate_w, up_w, down_w] = weights else {
            candle_core::bail!("a block has {} weights, not {}", weights.len(), BLOCK_WEIGHTS.len());
        };
        let linear = |x: &Tensor, w: &Tensor| x.matmul(&w.t()?);
        let offset = cache.as_ref().map_or(0, |(_, _, offset)| *offset);
        let hidden = rms_norm(x, norm1, c.norm_eps)?;
        let heads = |w: &Tensor, n: usize, rotate: bool| -> Result<Tensor> {
            fused::split_heads(&linear(&hidden, w)?, (b, t, n), rotate.then_some(&self.rope), offset)
        };
        let q = heads(wq, h, true)?;
        let mut k = heads(wk, kv, true)?;
        let mut v = heads(wv, kv, false)?;
        let attn = match cache {
            None => fused::causal_attention(&q, &k, &v, self.scale)?,
            Some((cache, l, offset)) => {
                if let Some((pk, pv)) = cache.layers.get(l) {
                    k = Tensor::cat(&[pk, &k], 2)?;
                    v = Tensor::cat(&[pv, &v], 2)?;
                }
                if cache.layers.len() > l {
                    cache.layers[l] = (k.clone(), v.clone());
                } else {
                    cache.layers.push((k.clone(), v.clone()));
                }
                let (k, v) = (repeat_kv(&k, h / kv)?, repeat_kv(&v, h / kv)?);
                let scores = (q.matmul(&k.t()?.contiguous()?)? * self.scale)?;
                let scores =
                    if t > 1 { scores.broadcast_add(&offset_mask(t, offset, q.dtype(), q.device())?)? } else { scores };
                candle_nn::ops::softmax_last_dim(&scores.to_dtype(DType::F32)?)?.to_dtype(q.dtype())?.matmul(&v)?
            }
        }; // [b, h, t, hd]
        let x = (x + linear(&fused::merge_heads(&attn)?, wo)?)?;
        let hidden = rms_norm(&x, norm2, c.norm_eps)?;
        let (gate, up) = (linear(&hidden, gate_w)?, linear(&hidden, up_w)?);
        x + linear(&fused::swiglu(&gate, &up)?, down_w)?
    }
}

/// [`Block::forward`] keeping only its input and output for the backward, which runs the block
/// again: activation recomputation, trading a second forward per block for the memory of its
/// intermediate activations. The gradients are the same as without it (the forward is
/// deterministic).
fn recompute(block: &Block, x: &Tensor, weights: &[Tensor], counter: &Arc<AtomicUsize>) -> Result<Tensor> {
    // Forward on detached copies: candle keeps no graph of them.
    let detached: Vec<Tensor> = weights.iter().map(Tensor::detach).collect();
    let out = block.forward(&x.detach(), &detached, None)?;
    // The weights travel as one flat tensor, so that one op carries all their gradients.
    let shapes: Vec<Shape> = weights.iter().map(|w| w.shape().clone()).collect();
    let flat = Tensor::cat(&weights.iter().map(|w| w.flatten_all()).collect::<Result<Vec<_>>>()?, 0)?;
    x.apply_op2(&flat, Recompute { block: block.clone(), shapes, out, counter: Arc::clone(counter) })
}

/// The op [`recompute`] records: its forward hands back the output computed without a graph; its
/// backward runs the block again with one and differentiates it.
struct Recompute {
    block: Block,
    shapes: Vec<Shape>,
    out: Tensor,
    /// The model's count of blocks run again.
    counter: Arc<AtomicUsize>,
}

impl Recompute {
    fn output<S: candle_core::backend::BackendStorage>(
        &self,
        pick: impl Fn(&candle_core::Storage) -> Option<&S>,
    ) -> Result<(S, Shape)> {
        let (storage, layout) = self.out.storage_and_layout();
        let storage = pick(&storage)
            .ok_or_else(|| candle_core::Error::Msg("recompute: the output is on another device".into()))?;
        Ok((storage.try_clone(layout)?, self.out.shape().clone()))
    }
}

impl candle_core::CustomOp2 for Recompute {
    fn name(&self) -> &'static str {
        "recompute-block"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        self.output(|s| match s {
            candle_core::Storage::Cpu(c) => Some(c),
            _ => None,
        })
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _: &candle_core::CudaStorage,
        _: &Layout,
        _: &candle_core::CudaStorage,
        _: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        self.output(|s| match s {
            candle_core::Storage::Cuda(c) => Some(c),
            _ => None,
        })
    }

    fn bwd(&self, x: &Tensor, flat: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        self.counter.fetch_add(1, Ordering::Relaxed);
        let x = Var::from_tensor(&x.detach())?;
        let flat = Var::from_tensor(&flat.detach())?;
        let mut weights = Vec::with_capacity(self.shapes.len());
        let mut at = 0;
        for shape in &self.shapes {
            let n = shape.elem_count();
            weights.push(flat.as_tensor().narrow(0, at, n)?.reshape(shape)?);
            at += n;
        }
        let out = self.block.forward(x.as_tensor(), &weights, None)?;
        // d sum(out * grad) / d out = grad: the block's backward, driven by the incoming gradient.
        let grads = (out * grad.detach())?.sum_all()?.backward()?;
        Ok((grads.get(x.as_tensor()).cloned(), grads.get(flat.as_tensor()).cloned()))
    }
}

/// `[t, offset + t]` additive mask: query `i` (at position `offset + i`) sees keys up to its own position.
fn offset_mask(t: usize, offset: usize, dtype: DType, device: &Device) -> Result<Tensor> {
    let total = offset + t;
    let mask: Vec<f32> =
        (0..t).flat_map(|i| (0..total).map(move |j| if j <= offset + i { 0.0 } else { f32::NEG_INFINITY })).collect();
    Tensor::from_vec(mask, (t, total), device)?.to_dtype(dtype)
}

/// `x * w / sqrt(mean(x^2) + eps)` over the last dimension, in fp32 whatever the input.
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    fused::rms_norm(x, weight, eps)
}

/// Repeats each key/value head `n` times: `[b, kv, t, d]` -> `[b, kv * n, t, d]`.
fn repeat_kv(x: &Tensor, n: usize) -> Result<Tensor> {
    if n == 1 {
        return Ok(x.clone());
    }
    let (b, kv, t, d) = x.dims4()?;
    Tensor::cat(&vec![x; n], 2)?.reshape((b, kv * n, t, d))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny() -> LlamaConfig {
        LlamaConfig::tiny(64)
    }

    #[test]
    fn counts_parameters_like_the_preset_formula() {
        let c = tiny();
        let per_layer = 2 * 32 + 32 * 32 + 2 * (16 * 32) + 32 * 32 + 3 * 48 * 32;
        assert_eq!(c.parameters(), (64 * 32 + 32 + 2 * per_layer) as u64);
        let spec = pretrain_crd::spec::ModelPreset::Tiny.config();
        assert_eq!(LlamaConfig::from_spec(&spec, 4096).parameters(), spec.parameters(4096));
    }

    #[test]
    fn forward_is_causal_and_gradients_reach_every_weight() {
        let dev = Device::Cpu;
        let c = tiny();
        let model = Llama::new(c.clone(), Params::init(&c, 1, &dev).unwrap(), 16, &dev).unwrap();
        let ids = Tensor::new(&[[1u32, 5, 9, 3, 7, 2]], &dev).unwrap();
        let changed = Tensor::new(&[[1u32, 5, 9, 3, 7, 60]], &dev).unwrap();
        let a = model.forward(&ids, DType::F32).unwrap();
        let b = model.forward(&changed, DType::F32).unwrap();
        assert_eq!(a.dims(), [1, 6, 64]);
        // Changing the last token changes nothing before it.
        let prefix = |t: &Tensor| t.narrow(1, 0, 5).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(prefix(&a), prefix(&b));
        let targets = Tensor::new(&[[5u32, 9, 3, 7, 2, 1]], &dev).unwrap();
        let (loss, _) = model.loss(&ids, &targets, DType::F32).unwrap();
        let loss_value = loss.to_scalar::<f32>().unwrap();
        assert!((loss_value - (64f32).ln()).abs() < 0.1, "near-uniform at init: {loss_value}");
        let grads = loss.backward().unwrap();
        for (name, _, var) in model.params.iter() {
            let g = grads.get(var.as_tensor()).unwrap_or_else(|| panic!("no gradient for {name}"));
            let norm = g.sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap();
            assert!(norm > 0.0 && norm.is_finite(), "{name}: {norm}");
        }
    }

    #[test]
    fn recomputed_blocks_give_the_same_loss_and_gradients() {
        let dev = Device::Cpu;
        let c = LlamaConfig { tie_embeddings: false, ..tiny() };
        let ids = Tensor::new(&[[1u32, 5, 9, 3, 7, 2], [4, 4, 8, 63, 0, 12]], &dev).unwrap();
        let targets = Tensor::new(&[[5u32, 9, 3, 7, 2, 1], [4, 8, 63, 0, 12, 6]], &dev).unwrap();
        let run = |recompute: bool| {
            let mut model = Llama::new(c.clone(), Params::init(&c, 5, &dev).unwrap(), 16, &dev).unwrap();
            model.set_recompute(recompute);
            let (loss, _) = model.loss(&ids, &targets, DType::F32).unwrap();
            let grads = loss.backward().unwrap();
            let all: Vec<Vec<f32>> = model
                .params
                .iter()
                .map(|(name, _, v)| {
                    let g = grads.get(v.as_tensor()).unwrap_or_else(|| panic!("no gradient for {name}"));
                    g.flatten_all().unwrap().to_vec1().unwrap()
                })
                .collect();
            (loss.to_scalar::<f32>().unwrap(), all, model.recomputed_blocks())
        };
        let (plain, recomputed) = (run(false), run(true));
        assert_eq!((plain.2, recomputed.2), (0, c.layers), "every block ran again in the backward, once");
        assert_eq!(plain.0, recomputed.0);
        assert_eq!(plain.1, recomputed.1, "bitwise the same gradients");
    }

    #[test]
    fn cached_generation_matches_the_full_forward_pass() {
        let dev = Device::Cpu;
        for scaling in [Scaling::None, Scaling::Yarn { factor: 2.0, original_len: 8 }] {
            let c = LlamaConfig { rope_scaling: scaling, ..tiny() };
            let model = Llama::new(c.clone(), Params::init(&c, 3, &dev).unwrap(), 16, &dev).unwrap();
            let ids = [4u32, 8, 15, 16, 23, 42, 7, 1];
            let full = model.forward(&Tensor::new(&ids[..], &dev).unwrap().unsqueeze(0).unwrap(), DType::F32).unwrap();
            let mut cache = KvCache::new();
            // A prompt of 5 positions, then one token at a time.
            let mut parts = vec![
                model
                    .forward_cached(
                        &Tensor::new(&ids[..5], &dev).unwrap().unsqueeze(0).unwrap(),
                        &mut cache,
                        DType::F32,
                    )
                    .unwrap(),
            ];
            for &id in &ids[5..] {
                parts.push(model.forward_cached(&Tensor::new(&[[id]], &dev).unwrap(), &mut cache, DType::F32).unwrap());
            }
            assert_eq!(cache.len(), 8);
            let cached = Tensor::cat(&parts, 1).unwrap();
            let diff = (full - cached).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            assert!(diff < 1e-4, "{scaling:?}: {diff}");
        }
    }
}
