//! AdamW with decoupled weight decay, and global-norm gradient clipping.

use candle_core::{DType, Result, Tensor};

use crate::model::{ParamKind, Params};

/// AdamW's settings.
#[derive(Debug, Clone, PartialEq)]
pub struct AdamWConfig {
    /// Adam beta1.
    pub beta1: f64,
    /// Adam beta2.
    pub beta2: f64,
    /// Adam epsilon.
    pub eps: f64,
    /// Decoupled weight decay; norms and embeddings are never decayed.
    pub weight_decay: f64,
}

impl AdamWConfig {
    /// From the spec.
    pub fn from_spec(o: &pretrain_crd::spec::Optimizer) -> Self {
        Self {
            beta1: o.betas.first().copied().unwrap_or(0.9),
            beta2: o.betas.get(1).copied().unwrap_or(0.95),
            eps: o.eps,
            weight_decay: o.weight_decay,
        }
    }
}

/// AdamW state: first and second moments per parameter (fp32), stored together as `[2, numel]`
/// (row 0 the first moment, row 1 the second), and the update count.
#[derive(Debug)]
pub struct AdamW {
    config: AdamWConfig,
    moments: Vec<Tensor>,
    /// Updates applied so far (bias correction uses it).
    pub updates: u64,
    /// Use the fused kernel where it applies (fp32 weights on the CPU, or on a CUDA device with
    /// feature `cuda`); the composed path serves the rest.
    fused: bool,
}

impl AdamW {
    /// Zero moments for `params`.
    pub fn new(config: AdamWConfig, params: &Params) -> Result<Self> {
        let moments = params
            .iter()
            .map(|(_, _, v)| Tensor::zeros((2, v.elem_count()), DType::F32, v.device()))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self { config, moments, updates: 0, fused: true })
    }

    /// One update with `grads` (in `params` order, already averaged and clipped) at learning rate `lr`.
    pub fn step(&mut self, params: &Params, grads: &[Tensor], lr: f64) -> Result<()> {
        self.updates += 1;
        let (b1, b2) = (self.config.beta1, self.config.beta2);
        let c1 = 1.0 - b1.powi(self.updates as i32);
        let c2 = 1.0 - b2.powi(self.updates as i32);
        for (i, ((_, kind, var), g)) in params.iter().zip(grads).enumerate() {
            let decay = match kind {
                ParamKind::Matrix | ParamKind::OutProjection => self.config.weight_decay,
                _ => 0.0,
            };
            let p = var.as_tensor().detach();
            let g = g.to_dtype(DType::F32)?.detach();
            let fused_device = p.device().is_cpu() || (cfg!(feature = "cuda") && p.device().is_cuda());
            if self.fused && fused_device && p.dtype() == DType::F32 {
                // In place, in two passes: the moments from the gradient, then the weights from the
                // moments (no new tensors, nothing kept beyond the weights and moments).
                let op = FusedAdamW {
                    lr: lr as f32,
                    beta1: b1 as f32,
                    beta2: b2 as f32,
                    c1: c1 as f32,
                    c2: c2 as f32,
                    eps: self.config.eps as f32,
                    decay: (lr * decay) as f32,
                };
                self.moments[i].inplace_op2(&g.flatten_all()?.contiguous()?, &Moments(op))?;
                p.inplace_op2(&self.moments[i], &Apply(op))?;
                continue;
            }
            let g = g.flatten_all()?;
            let m = ((self.moments[i].get(0)? * b1)? + (&g * (1.0 - b1))?)?;
            let v = ((self.moments[i].get(1)? * b2)? + (g.sqr()? * (1.0 - b2))?)?;
            let update = ((&m / c1)? / ((&v / c2)?.sqrt()? + self.config.eps)?)?;
            let decayed = if decay > 0.0 { (&p * (1.0 - lr * decay))? } else { p.clone() };
            var.set(&(decayed - (update.reshape(p.shape())? * lr)?)?)?;
            self.moments[i] = Tensor::stack(&[&m, &v], 0)?;
        }
        Ok(())
    }

    /// The moments as named tensors (`exp_avg.<param>`, `exp_avg_sq.<param>`, shaped like the
    /// parameter), for checkpoints.
    pub fn state(&self, params: &Params) -> Vec<(String, Tensor)> {
        let mut out = Vec::with_capacity(2 * self.moments.len());
        for ((name, _, var), mv) in params.iter().zip(&self.moments) {
            let shape = var.as_tensor().shape();
            let row =
                |r: usize| mv.get(r).and_then(|t| t.reshape(shape)).expect("a moment row has the parameter's size");
            out.push((format!("exp_avg.{name}"), row(0)));
            out.push((format!("exp_avg_sq.{name}"), row(1)));
        }
        out
    }

    /// Restores moments saved by [`AdamW::state`].
    pub fn restore(
        &mut self,
        params: &Params,
        mut saved: std::collections::HashMap<String, Tensor>,
        updates: u64,
    ) -> std::result::Result<(), String> {
        for (i, (name, _, var)) in params.iter().enumerate() {
            let mut rows = Vec::with_capacity(2);
            for prefix in ["exp_avg", "exp_avg_sq"] {
                let key = format!("{prefix}.{name}");
                let t = saved.remove(&key).ok_or_else(|| format!("missing optimizer tensor {key}"))?;
                if t.dims() != var.as_tensor().dims() {
                    return Err(format!("optimizer tensor {key} has shape {:?}", t.dims()));
                }
                rows.push(
                    t.to_dtype(DType::F32)
                        .and_then(|t| t.to_device(var.device()))
                        .and_then(|t| t.flatten_all())
                        .map_err(|e| e.to_string())?,
                );
            }
            self.moments[i] = Tensor::stack(&rows, 0).map_err(|e| e.to_string())?;
        }
        self.updates = updates;
        Ok(())
    }
}

/// One AdamW update of one fp32 parameter (on the CPU, or a CUDA device), in two in-place passes:
/// [`Moments`] on the moments `[2, n]` (first, then second) from the gradient, then [`Apply`] on the
/// weights from the moments.
#[derive(Debug, Clone, Copy)]
struct FusedAdamW {
    lr: f32,
    beta1: f32,
    beta2: f32,
    c1: f32,
    c2: f32,
    eps: f32,
    /// `lr * weight_decay` (0 for norms and embeddings).
    decay: f32,
}

#[cfg(feature = "cuda")]
impl FusedAdamW {
    fn kernel(&self) -> pretrain_kernels::AdamW {
        pretrain_kernels::AdamW {
            lr: self.lr,
            beta1: self.beta1,
            beta2: self.beta2,
            c1: self.c1,
            c2: self.c2,
            eps: self.eps,
            decay: self.decay,
        }
    }
}

/// Elements per parallel task of the CPU passes.
const CHUNK: usize = 1 << 14;

crate::model::fused::simd_fn! {
    /// One chunk of AdamW's first pass: the moments from the gradient.
    fn moments_chunk(h: &FusedAdamW, m: &mut [f32], v: &mut [f32], g: &[f32]) {
        for i in 0..m.len() {
            let gi = g[i];
            m[i] = h.beta1 * m[i] + (1.0 - h.beta1) * gi;
            v[i] = h.beta2 * v[i] + (1.0 - h.beta2) * gi * gi;
        }
    }
}

crate::model::fused::simd_fn! {
    /// One chunk of AdamW's second pass: the weights from the moments.
    fn apply_chunk(h: &FusedAdamW, p: &mut [f32], m: &[f32], v: &[f32]) {
        for i in 0..p.len() {
            let update = (m[i] / h.c1) / ((v[i] / h.c2).sqrt() + h.eps);
            p[i] = p[i] * (1.0 - h.decay) - h.lr * update;
        }
    }
}

fn cpu_view<'a>(s: &'a candle_core::CpuStorage, l: &candle_core::Layout, what: &str) -> Result<&'a [f32]> {
    let (a, b) =
        l.contiguous_offsets().ok_or_else(|| candle_core::Error::Msg(format!("{what}: inputs must be contiguous")))?;
    Ok(&s.as_slice::<f32>()?[a..b])
}

fn cpu_view_mut<'a>(s: &'a mut candle_core::CpuStorage, l: &candle_core::Layout, what: &str) -> Result<&'a mut [f32]> {
    let (a, b) = l
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg(format!("{what}: the tensor written must be contiguous")))?;
    match s {
        candle_core::CpuStorage::F32(v) => Ok(&mut v[a..b]),
        _ => candle_core::bail!("{what}: fp32 tensors only"),
    }
}

/// AdamW's first pass, in place on the moments `[2, n]`, with the gradient `[n]`.
struct Moments(FusedAdamW);

impl candle_core::InplaceOp2 for Moments {
    fn name(&self) -> &'static str {
        "adamw-moments"
    }

    fn cpu_fwd(
        &self,
        s1: &mut candle_core::CpuStorage,
        l1: &candle_core::Layout,
        s2: &candle_core::CpuStorage,
        l2: &candle_core::Layout,
    ) -> Result<()> {
        use rayon::prelude::*;
        let g = cpu_view(s2, l2, self.name())?;
        let mv = cpu_view_mut(s1, l1, self.name())?;
        let n = g.len();
        if mv.len() != 2 * n {
            candle_core::bail!("adamw-moments: {} moments for {n} gradients", mv.len());
        }
        let (m, v) = mv.split_at_mut(n);
        m.par_chunks_mut(CHUNK)
            .zip(v.par_chunks_mut(CHUNK))
            .zip(g.par_chunks(CHUNK))
            .for_each(|((m, v), g)| moments_chunk(&self.0, m, v, g));
        Ok(())
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &mut candle_core::CudaStorage,
        l1: &candle_core::Layout,
        s2: &candle_core::CudaStorage,
        l2: &candle_core::Layout,
    ) -> Result<()> {
        let n = l2.shape().elem_count();
        if l1.shape().elem_count() != 2 * n {
            candle_core::bail!("adamw-moments: {} moments for {n} gradients", l1.shape().elem_count());
        }
        crate::model::cuda::adamw_moments((s1, l1), (s2, l2), &self.0.kernel())
    }
}

/// AdamW's second pass, in place on the weights `[n]`, with the moments `[2, n]`.
struct Apply(FusedAdamW);

impl candle_core::InplaceOp2 for Apply {
    fn name(&self) -> &'static str {
        "adamw-apply"
    }

    fn cpu_fwd(
        &self,
        s1: &mut candle_core::CpuStorage,
        l1: &candle_core::Layout,
        s2: &candle_core::CpuStorage,
        l2: &candle_core::Layout,
    ) -> Result<()> {
        use rayon::prelude::*;
        let mv = cpu_view(s2, l2, self.name())?;
        let p = cpu_view_mut(s1, l1, self.name())?;
        let n = p.len();
        if mv.len() != 2 * n {
            candle_core::bail!("adamw-apply: {} moments for {n} weights", mv.len());
        }
        let (m, v) = mv.split_at(n);
        p.par_chunks_mut(CHUNK)
            .zip(m.par_chunks(CHUNK).zip(v.par_chunks(CHUNK)))
            .for_each(|(p, (m, v))| apply_chunk(&self.0, p, m, v));
        Ok(())
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &mut candle_core::CudaStorage,
        l1: &candle_core::Layout,
        s2: &candle_core::CudaStorage,
        l2: &candle_core::Layout,
    ) -> Result<()> {
        let n = l1.shape().elem_count();
        if l2.shape().elem_count() != 2 * n {
            candle_core::bail!("adamw-apply: {} moments for {n} weights", l2.shape().elem_count());
        }
        crate::model::cuda::adamw_apply((s1, l1), (s2, l2), &self.0.kernel())
    }
}

/// Partial sums of squares of a gradient on a CUDA device, in one pass without a squared copy.
#[cfg(feature = "cuda")]
struct SumSquares;

#[cfg(feature = "cuda")]
impl candle_core::CustomOp1 for SumSquares {
    fn name(&self) -> &'static str {
        "sum-squares"
    }

    fn cpu_fwd(
        &self,
        _: &candle_core::CpuStorage,
        _: &candle_core::Layout,
    ) -> Result<(candle_core::CpuStorage, candle_core::Shape)> {
        candle_core::bail!("sum-squares runs on CUDA devices (global_norm sums CPU tensors itself)")
    }

    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &candle_core::Layout,
    ) -> Result<(candle_core::CudaStorage, candle_core::Shape)> {
        let parts = pretrain_kernels::sum_squares_parts(l.shape().elem_count());
        Ok((crate::model::cuda::sum_squares((s, l))?, candle_core::Shape::from(parts)))
    }
}

/// The global L2 norm of `grads`. On a GPU the sum stays on the device until the end: one transfer
/// and one synchronisation per step instead of one per tensor.
pub fn global_norm(grads: &[Tensor]) -> Result<f64> {
    #[cfg(feature = "cuda")]
    if grads.first().is_some_and(|g| g.device().is_cuda()) {
        let mut total: Option<Tensor> = None;
        for g in grads {
            let g = g.contiguous()?;
            let part = match g.dtype() {
                DType::F32 | DType::BF16 => g.apply_op1_no_bwd(&SumSquares)?.sum_all()?,
                _ => g.to_dtype(DType::F32)?.sqr()?.sum_all()?,
            };
            total = Some(match total {
                None => part,
                Some(t) => (t + part)?,
            });
        }
        let sum = match total {
            Some(t) => t.to_scalar::<f32>()? as f64,
            None => 0.0,
        };
        return Ok(sum.sqrt());
    }
    let mut total = 0f64;
    for g in grads {
        total += g.to_dtype(DType::F32)?.sqr()?.sum_all()?.to_scalar::<f32>()? as f64;
    }
    Ok(total.sqrt())
}

/// Scales `grads` so their global norm is at most `max_norm` (0 disables); returns the norm before.
pub fn clip(grads: &mut [Tensor], max_norm: f64) -> Result<f64> {
    let norm = global_norm(grads)?;
    if max_norm > 0.0 && norm > max_norm {
        let scale = max_norm / (norm + 1e-6);
        for g in grads.iter_mut() {
            *g = (&*g * scale)?;
        }
    }
    Ok(norm)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::LlamaConfig;
    use candle_core::Device;

    /// A one-block model small enough to check updates element by element.
    fn small(tie_embeddings: bool) -> LlamaConfig {
        LlamaConfig {
            vocab_size: 8,
            dim: 4,
            layers: 1,
            heads: 2,
            kv_heads: 1,
            ffn_dim: 8,
            rope_base: 10_000.0,
            norm_eps: 1e-5,
            tie_embeddings,
            rope_scaling: Default::default(),
        }
    }

    #[test]
    fn first_update_moves_each_weight_by_lr_and_decays_only_matrices() {
        let c = small(true);
        let params = Params::init(&c, 3, &Device::Cpu).unwrap();
        let before: Vec<Vec<f32>> =
            params.iter().map(|(_, _, v)| v.flatten_all().unwrap().to_vec1().unwrap()).collect();
        let grads: Vec<Tensor> = params.iter().map(|(_, _, v)| v.ones_like().unwrap()).collect();
        let mut opt =
            AdamW::new(AdamWConfig { beta1: 0.9, beta2: 0.95, eps: 1e-8, weight_decay: 0.5 }, &params).unwrap();
        opt.step(&params, &grads, 0.01).unwrap();
        for ((_, kind, v), b) in params.iter().zip(&before) {
            let after: Vec<f32> = v.flatten_all().unwrap().to_vec1().unwrap();
            for (a, b) in after.iter().zip(b) {
                // Bias-corrected Adam's first step is lr * sign(g); decay multiplies by 1 - lr * wd.
                let expected = match kind {
                    ParamKind::Matrix | ParamKind::OutProjection => b * (1.0 - 0.005) - 0.01,
                    _ => b - 0.01,
                };
                assert!((a - expected).abs() < 1e-6, "{kind:?}: {a} vs {expected}");
            }
        }
        assert_eq!(opt.state(&params).len(), 2 * params.len());
    }

    #[test]
    fn fused_and_composed_updates_agree() {
        let c = small(false);
        let config = AdamWConfig { beta1: 0.9, beta2: 0.95, eps: 1e-8, weight_decay: 0.1 };
        let (a, b) = (Params::init(&c, 3, &Device::Cpu).unwrap(), Params::init(&c, 3, &Device::Cpu).unwrap());
        let mut fused = AdamW::new(config.clone(), &a).unwrap();
        let mut composed = AdamW::new(config, &b).unwrap();
        composed.fused = false;
        for step in 0..3 {
            let grads: Vec<Tensor> =
                a.iter().map(|(_, _, v)| (v.as_tensor().sin().unwrap() * (step as f64 + 1.0)).unwrap()).collect();
            fused.step(&a, &grads, 0.01).unwrap();
            composed.step(&b, &grads, 0.01).unwrap();
        }
        for ((_, _, x), (_, _, y)) in a.iter().zip(b.iter()) {
            let x: Vec<f32> = x.flatten_all().unwrap().to_vec1().unwrap();
            let y: Vec<f32> = y.flatten_all().unwrap().to_vec1().unwrap();
            for (x, y) in x.iter().zip(&y) {
                assert!((x - y).abs() < 1e-5, "{x} vs {y}");
            }
        }
        let (sa, sb) = (fused.state(&a), composed.state(&b));
        assert_eq!(sa.len(), sb.len());
        assert_eq!(sa[0].1.dims(), a.get(&sa[0].0["exp_avg.".len()..]).dims());
    }

    #[test]
    fn clipping_bounds_the_global_norm() {
        let dev = Device::Cpu;
        let mut grads = vec![Tensor::new(&[3f32, 0.0], &dev).unwrap(), Tensor::new(&[4f32], &dev).unwrap()];
        assert!((clip(&mut grads, 1.0).unwrap() - 5.0).abs() < 1e-9);
        assert!((global_norm(&grads).unwrap() - 1.0).abs() < 1e-5);
        assert!((clip(&mut grads, 0.0).unwrap() - 1.0).abs() < 1e-5);
    }
}
