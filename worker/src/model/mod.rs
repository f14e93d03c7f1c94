//! The Llama architecture in candle: token embedding, blocks of [RMSNorm -> attention with RoPE and
//! grouped-query attention -> residual -> RMSNorm -> SwiGLU MLP -> residual], final RMSNorm, LM head
//! (optionally tied to the embedding).
//!
//! Parameters are named as in Hugging Face `LlamaForCausalLM` (`model.layers.0.self_attn.q_proj.weight`,
//! ...), so checkpoints export without renaming. Every operation used has a backward pass; weights are
//! fp32 `Var`s and the forward pass can compute in bf16 from them.

mod block;
#[cfg(feature = "cuda")]
pub(crate) mod cuda;
pub mod fused;
mod gemm;
mod params;
mod recompute;
pub mod rope;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use candle_core::{DType, Device, Result, Tensor};

pub use self::block::KvCache;
use self::block::{Block, Linear, Pass, RmsNorm};
pub use self::fused::Kernels;
pub use self::params::Params;
use self::recompute::recompute;
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

/// The model: its shape, the weights by name (for the optimizer and checkpoints), and the layers
/// that own them (sharing storage with the named variables).
#[derive(Debug)]
pub struct Llama {
    /// The shape.
    pub config: LlamaConfig,
    /// The weights by name.
    pub params: Params,
    embed: Tensor,
    blocks: Vec<Block>,
    norm: RmsNorm,
    /// The output projection; `None` when tied to the embedding.
    head: Option<Linear>,
    rope: Rope,
    /// Recompute each block's activations in the backward instead of keeping them.
    recompute: bool,
    kernels: Kernels,
    /// Blocks the backward has run again (with `recompute`).
    recomputed: Arc<AtomicUsize>,
}

impl Llama {
    /// A model over `params` for sequences up to `max_seq_len`, with the RoPE scaling of `config`,
    /// running the fused kernels.
    pub fn new(config: LlamaConfig, params: Params, max_seq_len: usize, device: &Device) -> Result<Self> {
        let scaling = config.rope_scaling;
        let rope = Rope::new(config.head_dim(), max_seq_len, config.rope_base, scaling, device)?;
        let attention_factor = rope::attention_factor(scaling);
        let blocks =
            (0..config.layers).map(|l| Block::load(&params, &config, l, attention_factor)).collect::<Result<_>>()?;
        let model = params.prefix("model");
        let head = if config.tie_embeddings { None } else { Some(Linear(params.prefix("").weight("lm_head")?)) };
        Ok(Self {
            embed: model.weight("embed_tokens")?,
            blocks,
            norm: RmsNorm::load(&model, "norm", config.norm_eps)?,
            head,
            config,
            params,
            rope,
            recompute: false,
            kernels: Kernels::default(),
            recomputed: Arc::default(),
        })
    }

    /// Turns activation recomputation on or off (off by default): with it, training keeps only each
    /// block's input and output and runs the block's forward again in the backward, for about a
    /// third more compute and a fraction of the activation memory (larger batches fit).
    pub fn set_recompute(&mut self, on: bool) {
        self.recompute = on;
    }

    /// Chooses the kernels the model runs (fused by default).
    pub fn set_kernels(&mut self, kernels: Kernels) {
        self.kernels = kernels;
    }

    /// How many blocks backward passes have run again so far (with recomputation on).
    pub fn recomputed_blocks(&self) -> usize {
        self.recomputed.load(Ordering::Relaxed)
    }

    /// Positions the model was built for (its RoPE tables).
    pub fn max_seq_len(&self) -> usize {
        self.rope.len()
    }

    /// The device the weights are on.
    pub fn device(&self) -> &Device {
        self.embed.device()
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
        let (batch, seq) = ids.dims2()?;
        let offset = cache.as_ref().map_or(0, |c| c.len);
        let pass = Pass { rope: self.rope.clone(), batch, seq, offset, kernels: self.kernels };
        let mut x = self.embed.to_dtype(dtype)?.index_select(&ids.flatten_all()?, 0)?; // [b*t, dim]
        for (l, block) in self.blocks.iter().enumerate() {
            let block = block.cast(dtype)?;
            x = match cache.as_deref_mut() {
                Some(cache) => block.forward(&x, &pass, Some(cache.layer(l)))?,
                None if self.recompute => recompute(&block, &x, &pass, &self.recomputed)?,
                None => block.forward(&x, &pass, None)?,
            };
        }
        if let Some(cache) = cache {
            cache.len += seq;
        }
        let x = self.norm.cast(dtype)?.forward(&x, self.kernels)?;
        let head = self.head.as_ref().map_or(&self.embed, |h| &h.0);
        Linear(head.to_dtype(dtype)?).forward(&x)?.reshape((batch, seq, self.config.vocab_size))
    }

    /// Mean next-token cross-entropy (fp32) of `inputs` against `targets` (both `[batch, seq]`), and
    /// the logits in `dtype`: the loss reads bf16 logits as they are, without an fp32 copy of the
    /// `[tokens, vocab]` matrix.
    pub fn loss(&self, inputs: &Tensor, targets: &Tensor, dtype: DType) -> Result<(Tensor, Tensor)> {
        let logits = self.run(inputs, dtype, None)?;
        let (b, t, v) = logits.dims3()?;
        let loss = self.kernels.cross_entropy(&logits.reshape((b * t, v))?, &targets.flatten_all()?)?;
        Ok((loss, logits))
    }
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
