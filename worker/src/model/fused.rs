//! Fused operations for a training step, each with its backward (the CPU kernels here, the CUDA ones
//! in pretrain-kernels): causal grouped-query attention
//! (which never forms the `[batch, heads, seq, seq]` scores), the cross-entropy over the vocabulary
//! (`[tokens, vocab]`), RMSNorm, the SwiGLU activation, and the split of projections into
//! attention heads with the RoPE rotation on the way (and the merge back). Composed from candle
//! operations they allocate and stream several full-size temporaries each; fused they read and write
//! each element once or twice.
//!
//! On CUDA devices (feature `cuda`) the same operations run pretrain-kernels' CUDA kernels, in fp32 or
//! bf16 storage (`cuda.rs`). Elsewhere, for other dtypes, or when [`set_enabled`] turned them off,
//! the functions fall back to composed, differentiable candle operations.

use std::sync::atomic::{AtomicBool, Ordering};

#[cfg(feature = "cuda")]
use candle_core::CudaStorage;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, D, DType, Device, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::Rope;
use super::gemm::{self, Mat};

static ENABLED: AtomicBool = AtomicBool::new(true);

/// Turns the fused kernels on or off (on by default) for the whole process, so that a training step
/// can be compared with (or benchmarked against) the composed candle operations.
pub fn set_enabled(enabled: bool) {
    ENABLED.store(enabled, Ordering::Relaxed);
}

/// Whether the fused kernels serve tensors like `x`: fp32 on the CPU; fp32 or bf16 on a CUDA device
/// (feature `cuda`).
fn fused_for(x: &Tensor) -> bool {
    if !ENABLED.load(Ordering::Relaxed) {
        return false;
    }
    match x.device() {
        Device::Cpu => x.dtype() == DType::F32,
        Device::Cuda(_) => cfg!(feature = "cuda") && matches!(x.dtype(), DType::F32 | DType::BF16),
        _ => false,
    }
}

/// A custom op's result on the CUDA device, shaped.
#[cfg(feature = "cuda")]
fn on_gpu(storage: Result<CudaStorage>, shape: impl Into<Shape>) -> Result<(CudaStorage, Shape)> {
    Ok((storage?, shape.into()))
}

fn contiguous_f32<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> Result<&'a [f32]> {
    let (start, end) =
        l.contiguous_offsets().ok_or_else(|| candle_core::Error::Msg(format!("{what}: input must be contiguous")))?;
    Ok(&s.as_slice::<f32>()?[start..end])
}

/// Defines a function whose body is compiled three times, for AVX-512, for AVX2 with FMA and for the
/// baseline, and runs the widest one this CPU has (detected at run time): the loops in it vectorise
/// 16 or 8 lanes wide instead of 4. The body is inlined into each copy (`inline(always)`), so the
/// choice is certain (a closure handed to a dispatcher is not always inlined, and then runs at the
/// baseline). Results do not depend on the copy: Rust never fuses a multiply and an add, and float
/// reductions keep their order.
macro_rules! simd_fn {
    ($(#[$meta:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        $(#[$meta])*
        #[allow(unsafe_code, clippy::too_many_arguments)]
        $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            #[allow(clippy::too_many_arguments)]
            fn body($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512vl,avx512bw,avx512dq,avx2,fma")]
                #[allow(clippy::too_many_arguments)]
                fn v4($($arg: $ty),*) $(-> $ret)? {
                    body($($arg),*)
                }
                #[target_feature(enable = "avx2,fma")]
                #[allow(clippy::too_many_arguments)]
                fn v3($($arg: $ty),*) $(-> $ret)? {
                    body($($arg),*)
                }
                if std::is_x86_feature_detected!("avx512f")
                    && std::is_x86_feature_detected!("avx512vl")
                    && std::is_x86_feature_detected!("avx512bw")
                    && std::is_x86_feature_detected!("avx512dq")
                {
                    // SAFETY: the CPU has every feature `v4` is compiled for (checked just above).
                    return unsafe { v4($($arg),*) };
                }
                if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
                    // SAFETY: the CPU has every feature `v3` is compiled for (checked just above).
                    return unsafe { v3($($arg),*) };
                }
            }
            body($($arg),*)
        }
    };
}
pub(crate) use simd_fn;

/// `e^x` in f32, within 2e-7 relative of the exact value and branch-free, so that loops over slices
/// vectorise (libm's `expf` is one call per element, 7% of a CPU training step): `x = n ln 2 + r`
/// with `|r| <= ln 2 / 2`, then `2^n` times Cephes' degree-7 polynomial for `e^r`. NaN stays NaN;
/// the result saturates to `+inf` above 88.7 and to about the smallest normal below -87.3.
#[inline(always)]
fn exp(x: f32) -> f32 {
    // ln 2 split so that `n * LN2_HI` is exact for the n that occur.
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // Adding and subtracting 1.5 x 2^23 rounds to the nearest integer without a call to `round`.
    const ROUND: f32 = 12_582_912.0;
    let x = x.clamp(-87.33, 88.72);
    let n = (x * std::f32::consts::LOG2_E + ROUND) - ROUND;
    let r = x - n * LN2_HI - n * LN2_LO;
    let p = (((((1.987_569_1e-4 * r + 1.398_199_9e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2) * r + 0.166_666_65)
        * r
        + 0.5)
        * (r * r)
        + r
        + 1.0;
    f32::from_bits(((n as i32 + 127) as u32) << 23) * p
}

/// `softmax(scale * s + causal mask)` over the last dimension of `[.., t, t]` scores, composed from
/// candle operations: [`causal_attention`]'s path off the CPU (on it, the fused kernel never forms
/// the scores).
fn causal_softmax(scores: &Tensor, scale: f64) -> Result<Tensor> {
    let t = scores.dim(D::Minus1)?;
    let mask: Vec<f32> =
        (0..t).flat_map(|i| (0..t).map(move |j| if j <= i { 0.0 } else { f32::NEG_INFINITY })).collect();
    let mask = Tensor::from_vec(mask, (t, t), scores.device())?.to_dtype(scores.dtype())?;
    let x = (scores * scale)?.broadcast_add(&mask)?;
    let max = x.max_keepdim(D::Minus1)?.detach();
    let e = x.broadcast_sub(&max)?.exp()?;
    e.broadcast_div(&e.sum_keepdim(D::Minus1)?)
}

/// Mean cross-entropy of `logits` `[n, vocab]` against `targets` `[n]` (u32), in fp32 whatever the
/// logits' dtype (fused, bf16 logits are read as they are: no fp32 copy of them is made).
pub fn cross_entropy(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    if fused_for(logits) {
        let targets = targets.to_dtype(DType::U32)?.contiguous()?;
        return logits.contiguous()?.apply_op2(&targets, CrossEntropy)?.mean_all();
    }
    candle_nn::loss::cross_entropy(&logits.to_dtype(DType::F32)?, targets)
}

/// Per row: `logsumexp(x) - x[target]`.
struct CrossEntropy;

simd_fn! {
    /// `ln(sum(e^row))`, from the row's maximum.
    fn log_sum_exp(row: &[f32]) -> f32 {
        let max = row.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
        max + row.iter().map(|&v| exp(v - max)).sum::<f32>().ln()
    }
}

simd_fn! {
    /// One row of the cross-entropy gradient without the one-hot term: `g * e^(x - lse)`.
    fn softmax_times(out: &mut [f32], row: &[f32], lse: f32, g: f32) {
        for (o, &x) in out.iter_mut().zip(row) {
            *o = g * exp(x - lse);
        }
    }
}

impl CustomOp2 for CrossEntropy {
    fn name(&self) -> &'static str {
        "cross-entropy"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(s1, l1, self.name())?;
        let (n, v) = l1.shape().dims2()?;
        let (start, end) =
            l2.contiguous_offsets().ok_or_else(|| candle_core::Error::Msg("targets must be contiguous".into()))?;
        let targets = &s2.as_slice::<u32>()?[start..end];
        if targets.len() != n {
            candle_core::bail!("cross-entropy: {} targets for {n} rows", targets.len());
        }
        if let Some(bad) = targets.iter().find(|&&t| t as usize >= v) {
            candle_core::bail!("cross-entropy: target {bad} is outside the vocabulary of {v}");
        }
        let losses: Vec<f32> =
            x.par_chunks(v).zip(targets.par_iter()).map(|(row, &t)| log_sum_exp(row) - row[t as usize]).collect();
        Ok((CpuStorage::F32(losses), Shape::from(n)))
    }

    /// Targets outside the vocabulary give NaN losses (they are not read back to be checked).
    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, s1: &CudaStorage, l1: &Layout, s2: &CudaStorage, l2: &Layout) -> Result<(CudaStorage, Shape)> {
        let (n, v) = l1.shape().dims2()?;
        if l2.shape().elem_count() != n {
            candle_core::bail!("cross-entropy: {} targets for {n} rows", l2.shape().elem_count());
        }
        on_gpu(super::cuda::cross_entropy((s1, l1), (s2, l2), n, v), n)
    }

    fn bwd(
        &self,
        logits: &Tensor,
        targets: &Tensor,
        res: &Tensor,
        grad_res: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        // The rows' losses ride along with their gradients: `lse = loss + x[target]`, so the
        // backward does not sum the exponentials again.
        let losses_and_grads = Tensor::stack(&[res, &grad_res.contiguous()?], 0)?;
        let grad = logits.apply_op3_no_bwd(targets, &losses_and_grads, &CrossEntropyGrad)?;
        Ok((Some(grad), None))
    }
}

/// `d logits = g * (softmax(x) - onehot(target))` per row, from the logits, the targets, and each row's
/// loss and gradient (`[2, n]`).
struct CrossEntropyGrad;

impl CustomOp3 for CrossEntropyGrad {
    fn name(&self) -> &'static str {
        "cross-entropy-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(s1, l1, self.name())?;
        let (_, v) = l1.shape().dims2()?;
        let (start, end) =
            l2.contiguous_offsets().ok_or_else(|| candle_core::Error::Msg("targets must be contiguous".into()))?;
        let targets = &s2.as_slice::<u32>()?[start..end];
        let loss_grad = contiguous_f32(s3, l3, self.name())?;
        let n = targets.len();
        if x.len() != n * v || loss_grad.len() != 2 * n {
            candle_core::bail!(
                "cross-entropy-grad: {} logits, {n} targets, {} losses and gradients",
                x.len(),
                loss_grad.len()
            );
        }
        let (losses, g) = loss_grad.split_at(n);
        let mut dx = vec![0f32; x.len()];
        dx.par_chunks_mut(v)
            .zip(x.par_chunks(v))
            .zip(targets.par_iter().zip(losses.par_iter().zip(g.par_iter())))
            .for_each(|((out, row), (&t, (&loss, &g)))| {
                softmax_times(out, row, loss + row[t as usize], g);
                out[t as usize] -= g;
            });
        Ok((CpuStorage::F32(dx), l1.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
        s3: &CudaStorage,
        l3: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let (n, v) = l1.shape().dims2()?;
        if l2.shape().elem_count() != n || l3.shape().elem_count() != 2 * n {
            candle_core::bail!(
                "cross-entropy-grad: {n} rows, {} targets, {} losses and gradients",
                l2.shape().elem_count(),
                l3.shape().elem_count()
            );
        }
        on_gpu(super::cuda::cross_entropy_grad((s1, l1), (s2, l2), (s3, l3), n, v), l1.shape().clone())
    }
}

/// Rows per parallel task of the row-wise kernels: fixed, so that reductions across rows (RMSNorm's
/// weight gradient) add up in the same order whatever the number of threads.
const ROWS_PER_TASK: usize = 32;

/// `x * w / sqrt(mean(x^2) + eps)` over the last dimension, computed in fp32 whatever the input. Fused
/// (one pass forward, one pass backward for both gradients) when `x` and `w` share a dtype the kernels
/// serve; composed otherwise.
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    if fused_for(x) && weight.dtype() == x.dtype() {
        return x.contiguous()?.apply_op2(&weight.contiguous()?, RmsNorm { eps: eps as f32 });
    }
    let dtype = x.dtype();
    let x32 = x.to_dtype(DType::F32)?;
    let mean = x32.sqr()?.mean_keepdim(D::Minus1)?;
    let normed = x32.broadcast_div(&(mean + eps)?.sqrt()?)?;
    normed.to_dtype(dtype)?.broadcast_mul(weight)
}

struct RmsNorm {
    eps: f32,
}

simd_fn! {
    /// RMSNorm of whole rows of `w.len()` values.
    fn rms_norm_rows(out: &mut [f32], x: &[f32], w: &[f32], eps: f32) {
        let d = w.len();
        for (out, row) in out.chunks_mut(d).zip(x.chunks(d)) {
            let r = inv_rms(row, eps);
            for ((o, &v), &w) in out.iter_mut().zip(row).zip(w) {
                *o = v * r * w;
            }
        }
    }
}

simd_fn! {
    /// RMSNorm's input gradient for whole rows into `dx`, and these rows' share of the weight
    /// gradient (returned).
    fn rms_norm_grad_rows(dx: &mut [f32], x: &[f32], g: &[f32], w: &[f32], eps: f32) -> Vec<f32> {
        let d = w.len();
        let mut dw = vec![0f32; d];
        for ((dx, x), g) in dx.chunks_mut(d).zip(x.chunks(d)).zip(g.chunks(d)) {
            let r = inv_rms(x, eps);
            let dot: f32 = x.iter().zip(g).zip(w).map(|((x, g), w)| g * w * x).sum();
            let c = r * r * r * dot / d as f32;
            for (((dx, &x), &g), (&w, dw)) in dx.iter_mut().zip(x).zip(g).zip(w.iter().zip(dw.iter_mut())) {
                *dx = r * g * w - x * c;
                *dw += g * x * r;
            }
        }
        dw
    }
}

/// `1 / sqrt(mean(row^2) + eps)`.
#[inline(always)]
fn inv_rms(row: &[f32], eps: f32) -> f32 {
    let ms = row.iter().map(|v| v * v).sum::<f32>() / row.len() as f32;
    1.0 / (ms + eps).sqrt()
}

fn check_norm_weight(l1: &Layout, l2: &Layout, what: &str) -> Result<usize> {
    let d = *l1.dims().last().ok_or_else(|| candle_core::Error::Msg(format!("{what}: a scalar input")))?;
    if l2.dims() != [d] {
        candle_core::bail!("{what}: weight of shape {:?} for rows of {d}", l2.dims());
    }
    Ok(d)
}

impl CustomOp2 for RmsNorm {
    fn name(&self) -> &'static str {
        "rms-norm"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let d = check_norm_weight(l1, l2, self.name())?;
        let x = contiguous_f32(s1, l1, self.name())?;
        let w = contiguous_f32(s2, l2, self.name())?;
        let mut y = vec![0f32; x.len()];
        y.par_chunks_mut(ROWS_PER_TASK * d)
            .zip(x.par_chunks(ROWS_PER_TASK * d))
            .for_each(|(out, rows)| rms_norm_rows(out, rows, w, self.eps));
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, s1: &CudaStorage, l1: &Layout, s2: &CudaStorage, l2: &Layout) -> Result<(CudaStorage, Shape)> {
        let d = check_norm_weight(l1, l2, self.name())?;
        on_gpu(super::cuda::rms_norm((s1, l1), (s2, l2), d, self.eps), l1.shape().clone())
    }

    fn bwd(&self, x: &Tensor, w: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let both = x.apply_op3_no_bwd(w, &grad.contiguous()?, &RmsNormGrad { eps: self.eps })?;
        let (n, d) = (x.elem_count(), w.elem_count());
        Ok((Some(both.narrow(0, 0, n)?.reshape(x.shape())?), Some(both.narrow(0, n, d)?)))
    }
}

/// Both gradients of RMSNorm, `[dx (flattened), dw]` in one buffer: with `r = 1 / rms(x)` and
/// `h = g * w`, `dx = r h - x r^3 sum(h x) / d` and `dw = sum over rows of g x r`.
struct RmsNormGrad {
    eps: f32,
}

impl CustomOp3 for RmsNormGrad {
    fn name(&self) -> &'static str {
        "rms-norm-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let d = check_norm_weight(l1, l2, self.name())?;
        let x = contiguous_f32(s1, l1, self.name())?;
        let w = contiguous_f32(s2, l2, self.name())?;
        let g = contiguous_f32(s3, l3, self.name())?;
        let mut out = vec![0f32; x.len() + d];
        let (dx, dw) = out.split_at_mut(x.len());
        let partials: Vec<Vec<f32>> = dx
            .par_chunks_mut(ROWS_PER_TASK * d)
            .zip(x.par_chunks(ROWS_PER_TASK * d).zip(g.par_chunks(ROWS_PER_TASK * d)))
            .map(|(dx, (x, g))| rms_norm_grad_rows(dx, x, g, w, self.eps))
            .collect();
        for partial in partials {
            dw.iter_mut().zip(partial).for_each(|(a, b)| *a += b);
        }
        Ok((CpuStorage::F32(out), Shape::from(x.len() + d)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
        s3: &CudaStorage,
        l3: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let d = check_norm_weight(l1, l2, self.name())?;
        let n = l1.shape().elem_count();
        on_gpu(super::cuda::rms_norm_grad((s1, l1), (s2, l2), (s3, l3), d, self.eps), n + d)
    }
}

/// `silu(gate) * up`, the SwiGLU activation. Fused where the kernels serve the dtype (both gradients
/// in one pass); composed elsewhere.
pub fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    if fused_for(gate) && up.dtype() == gate.dtype() {
        if gate.shape() != up.shape() {
            candle_core::bail!("swiglu: gate {:?} and up {:?} differ in shape", gate.dims(), up.dims());
        }
        return gate.contiguous()?.apply_op2(&up.contiguous()?, SwiGlu);
    }
    gate.silu()? * up
}

struct SwiGlu;

simd_fn! {
    fn swiglu_chunk(y: &mut [f32], a: &[f32], u: &[f32]) {
        for ((y, &a), &u) in y.iter_mut().zip(a).zip(u) {
            *y = a * sigmoid(a) * u;
        }
    }
}

simd_fn! {
    fn swiglu_grad_chunk(da: &mut [f32], du: &mut [f32], a: &[f32], u: &[f32], g: &[f32]) {
        for ((da, du), ((&a, &u), &g)) in da.iter_mut().zip(du.iter_mut()).zip(a.iter().zip(u).zip(g)) {
            let s = sigmoid(a);
            *da = g * u * s * (1.0 + a * (1.0 - s));
            *du = g * a * s;
        }
    }
}

#[inline(always)]
fn sigmoid(a: f32) -> f32 {
    1.0 / (1.0 + exp(-a))
}

impl CustomOp2 for SwiGlu {
    fn name(&self) -> &'static str {
        "swiglu"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let a = contiguous_f32(s1, l1, self.name())?;
        let u = contiguous_f32(s2, l2, self.name())?;
        let mut y = vec![0f32; a.len()];
        y.par_chunks_mut(4096)
            .zip(a.par_chunks(4096).zip(u.par_chunks(4096)))
            .for_each(|(y, (a, u))| swiglu_chunk(y, a, u));
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, s1: &CudaStorage, l1: &Layout, s2: &CudaStorage, l2: &Layout) -> Result<(CudaStorage, Shape)> {
        on_gpu(super::cuda::swiglu((s1, l1), (s2, l2)), l1.shape().clone())
    }

    fn bwd(&self, a: &Tensor, u: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let both = a.apply_op3_no_bwd(u, &grad.contiguous()?, &SwiGluGrad)?;
        let n = a.elem_count();
        Ok((Some(both.narrow(0, 0, n)?.reshape(a.shape())?), Some(both.narrow(0, n, n)?.reshape(a.shape())?)))
    }
}

/// `[d gate, d up]` in one buffer: with `s = sigmoid(a)`, `d gate = g u s (1 + a (1 - s))` and
/// `d up = g a s`.
struct SwiGluGrad;

impl CustomOp3 for SwiGluGrad {
    fn name(&self) -> &'static str {
        "swiglu-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let a = contiguous_f32(s1, l1, self.name())?;
        let u = contiguous_f32(s2, l2, self.name())?;
        let g = contiguous_f32(s3, l3, self.name())?;
        let n = a.len();
        let mut out = vec![0f32; 2 * n];
        let (da, du) = out.split_at_mut(n);
        da.par_chunks_mut(4096)
            .zip(du.par_chunks_mut(4096))
            .zip(a.par_chunks(4096).zip(u.par_chunks(4096)).zip(g.par_chunks(4096)))
            .for_each(|((da, du), ((a, u), g))| swiglu_grad_chunk(da, du, a, u, g));
        Ok((CpuStorage::F32(out), Shape::from(2 * n)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
        s3: &CudaStorage,
        l3: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        on_gpu(super::cuda::swiglu_grad((s1, l1), (s2, l2), (s3, l3)), 2 * l1.shape().elem_count())
    }
}

/// The rows of a projection `[batch * seq, heads * head_dim]` as heads `[batch, heads, seq, head_dim]`,
/// rotated by `rope` at positions `offset..offset + seq` when it is given. Fused where the kernels
/// serve the dtype (one copy, the rotation on the way); composed elsewhere ([`Rope::apply_at`]).
pub fn split_heads(
    x: &Tensor,
    (batch, seq, heads): (usize, usize, usize),
    rope: Option<&Rope>,
    offset: usize,
) -> Result<Tensor> {
    let head_dim = x.dim(D::Minus1)? / heads;
    if fused_for(x) {
        let op = SplitHeads { batch, seq, heads, head_dim };
        let x = x.contiguous()?;
        return match rope {
            Some(rope) => {
                let (cos, sin) = rope.window(offset, seq)?;
                x.apply_op3(&cos.contiguous()?, &sin.contiguous()?, op)
            }
            None => x.apply_op1(op),
        };
    }
    let x = x.reshape((batch, seq, heads, head_dim))?.transpose(1, 2)?.contiguous()?;
    match rope {
        Some(rope) => rope.apply_at(&x, offset),
        None => Ok(x),
    }
}

#[derive(Clone, Copy)]
struct SplitHeads {
    batch: usize,
    seq: usize,
    heads: usize,
    head_dim: usize,
}

impl SplitHeads {
    #[cfg(feature = "cuda")]
    fn kernel_shape(&self) -> pretrain_kernels::Heads {
        pretrain_kernels::Heads { batch: self.batch, seq: self.seq, heads: self.heads, head_dim: self.head_dim }
    }

    #[cfg(feature = "cuda")]
    fn heads_shape(&self) -> Shape {
        Shape::from((self.batch, self.heads, self.seq, self.head_dim))
    }

    #[cfg(feature = "cuda")]
    fn rows_shape(&self) -> Shape {
        Shape::from((self.batch * self.seq, self.heads * self.head_dim))
    }

    fn check(&self, l: &Layout) -> Result<()> {
        if l.dims() != [self.batch * self.seq, self.heads * self.head_dim] {
            candle_core::bail!(
                "split-heads: input {:?} is not [{} x {}, {} x {}]",
                l.dims(),
                self.batch,
                self.seq,
                self.heads,
                self.head_dim
            );
        }
        Ok(())
    }

    /// The RoPE rows (`cos`, `sin`), checked to hold `seq x head_dim` values each.
    fn tables<'a>(
        &self,
        (cos, cos_layout): (&'a CpuStorage, &Layout),
        (sin, sin_layout): (&'a CpuStorage, &Layout),
        what: &str,
    ) -> Result<(&'a [f32], &'a [f32])> {
        let (cos, sin) = (contiguous_f32(cos, cos_layout, what)?, contiguous_f32(sin, sin_layout, what)?);
        if cos.len() != self.seq * self.head_dim || sin.len() != cos.len() {
            candle_core::bail!("{what}: tables of {} values for {} x {}", cos.len(), self.seq, self.head_dim);
        }
        Ok((cos, sin))
    }

    /// `[b, heads, seq, hd]` from `[b * seq, heads * hd]`, each head row rotated by its position's
    /// row of `tables` (`cos`, `sin`) when there are any.
    fn forward(&self, x: &[f32], tables: Option<(&[f32], &[f32])>) -> Vec<f32> {
        let Self { seq, heads, head_dim: hd, .. } = *self;
        let mut y = vec![0f32; x.len()];
        y.par_chunks_mut(seq * hd).enumerate().for_each(|(bh, out)| {
            let (b, h) = (bh / heads, bh % heads);
            gather_rows(out, x, hd, (b * seq * heads * hd + h * hd, heads * hd), tables, (0, 1), false);
        });
        y
    }

    /// The inverse: `[b * seq, heads * hd]` from `[b, heads, seq, hd]`, rotated back.
    fn backward(&self, g: &[f32], tables: Option<(&[f32], &[f32])>) -> Vec<f32> {
        let Self { seq, heads, head_dim: hd, .. } = *self;
        let mut dx = vec![0f32; g.len()];
        dx.par_chunks_mut(heads * hd).enumerate().for_each(|(bt, out)| {
            let (b, t) = (bt / seq, bt % seq);
            gather_rows(out, g, hd, ((b * heads * seq + t) * hd, seq * hd), tables, (t, 0), true);
        });
        dx
    }
}

simd_fn! {
    /// The rows of `out` (`hd` each) from `x` at `start + i * stride` (`at`), each rotated by row
    /// `row0 + i * step` (`rows`) of the tables when there are any, by the negative angle when
    /// `inverse`.
    fn gather_rows(
        out: &mut [f32],
        x: &[f32],
        hd: usize,
        at: (usize, usize),
        tables: Option<(&[f32], &[f32])>,
        rows: (usize, usize),
        inverse: bool,
    ) {
        let ((start, stride), (row0, step)) = (at, rows);
        for (i, out) in out.chunks_mut(hd).enumerate() {
            let src = &x[start + i * stride..][..hd];
            match tables {
                None => out.copy_from_slice(src),
                Some((cos, sin)) => {
                    let r = (row0 + i * step) * hd;
                    rotate_half(src, &cos[r..r + hd], &sin[r..r + hd], inverse, out);
                }
            }
        }
    }
}

/// Rotate half: `(x1, x2) -> (x1 c - x2 s, x2 c + x1 s)`, or by `-angle` (the gradient) when `inverse`.
#[inline(always)]
fn rotate_half(x: &[f32], cos: &[f32], sin: &[f32], inverse: bool, out: &mut [f32]) {
    let half = x.len() / 2;
    let (x1, x2) = x.split_at(half);
    let (o1, o2) = out.split_at_mut(half);
    for i in 0..half {
        let (c, s) = (cos[i], if inverse { -sin[i] } else { sin[i] });
        o1[i] = x1[i] * c - x2[i] * s;
        o2[i] = x2[i] * c + x1[i] * s;
    }
}

impl CustomOp1 for SplitHeads {
    fn name(&self) -> &'static str {
        "split-heads"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        self.check(l)?;
        let x = contiguous_f32(s, l, "split-heads")?;
        let y = self.forward(x, None);
        Ok((CpuStorage::F32(y), Shape::from((self.batch, self.heads, self.seq, self.head_dim))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> Result<(CudaStorage, Shape)> {
        self.check(l)?;
        on_gpu(super::cuda::heads((s, l), None, self.kernel_shape(), true), self.heads_shape())
    }

    fn bwd(&self, _x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(grad.contiguous()?.apply_op1_no_bwd(&MergeHeads(*self))?))
    }
}

impl CustomOp3 for SplitHeads {
    fn name(&self) -> &'static str {
        "split-heads-rope"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.check(l1)?;
        let x = contiguous_f32(s1, l1, "split-heads-rope")?;
        let tables = self.tables((s2, l2), (s3, l3), "split-heads-rope")?;
        let y = self.forward(x, Some(tables));
        Ok((CpuStorage::F32(y), Shape::from((self.batch, self.heads, self.seq, self.head_dim))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
        s3: &CudaStorage,
        l3: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        self.check(l1)?;
        let tables = Some(((s2, l2), (s3, l3)));
        on_gpu(super::cuda::heads((s1, l1), tables, self.kernel_shape(), true), self.heads_shape())
    }

    fn bwd(
        &self,
        _x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let grad = grad.contiguous()?.apply_op3_no_bwd(cos, sin, &MergeHeads(*self))?;
        Ok((Some(grad), None, None))
    }
}

/// Heads `[batch, heads, seq, head_dim]` back into rows `[batch * seq, heads * head_dim]` (attention's
/// output for the output projection). Fused where the kernels serve the dtype; composed elsewhere.
pub fn merge_heads(x: &Tensor) -> Result<Tensor> {
    let (batch, heads, seq, head_dim) = x.dims4()?;
    if fused_for(x) {
        return x.contiguous()?.apply_op1(MergeHeads(SplitHeads { batch, seq, heads, head_dim }));
    }
    x.transpose(1, 2)?.reshape((batch * seq, heads * head_dim))
}

/// Heads back into rows, rotated back by the tables when there are any: split-heads' gradient, and
/// [`merge_heads`].
struct MergeHeads(SplitHeads);

impl CustomOp1 for MergeHeads {
    fn name(&self) -> &'static str {
        "merge-heads"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let split = self.0;
        let g = contiguous_f32(s, l, "merge-heads")?;
        if g.len() != split.batch * split.seq * split.heads * split.head_dim {
            candle_core::bail!("merge-heads: {} values for {:?}", g.len(), l.dims());
        }
        let dx = split.backward(g, None);
        Ok((CpuStorage::F32(dx), Shape::from((split.batch * split.seq, split.heads * split.head_dim))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> Result<(CudaStorage, Shape)> {
        let split = self.0;
        if l.dims() != [split.batch, split.heads, split.seq, split.head_dim] {
            candle_core::bail!("merge-heads: input {:?} for {:?}", l.dims(), split.heads_shape());
        }
        on_gpu(super::cuda::heads((s, l), None, split.kernel_shape(), false), split.rows_shape())
    }

    fn bwd(&self, _x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(grad.contiguous()?.apply_op1_no_bwd(&self.0)?))
    }
}

impl CustomOp3 for MergeHeads {
    fn name(&self) -> &'static str {
        "merge-heads-rope"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let split = self.0;
        let g = contiguous_f32(s1, l1, "merge-heads-rope")?;
        let tables = split.tables((s2, l2), (s3, l3), "merge-heads-rope")?;
        let dx = split.backward(g, Some(tables));
        Ok((CpuStorage::F32(dx), Shape::from((split.batch * split.seq, split.heads * split.head_dim))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
        s3: &CudaStorage,
        l3: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let split = self.0;
        if l1.dims() != [split.batch, split.heads, split.seq, split.head_dim] {
            candle_core::bail!("merge-heads-rope: input {:?} for {:?}", l1.dims(), split.heads_shape());
        }
        let tables = Some(((s2, l2), (s3, l3)));
        on_gpu(super::cuda::heads((s1, l1), tables, split.kernel_shape(), false), split.rows_shape())
    }
}

simd_fn! {
    /// Rows `r0..` of causal attention scores (`keys` per row) into probabilities in place: row `i`
    /// sees keys `0..=r0 + i`, the rest become 0.
    fn causal_softmax_rows(p: &mut [f32], keys: usize, r0: usize, scale: f32) {
        for (i, row) in p.chunks_mut(keys).enumerate() {
            let visible = r0 + i + 1;
            let (seen, masked) = row.split_at_mut(visible);
            let max = seen.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v * scale));
            for v in seen.iter_mut() {
                *v = exp(*v * scale - max);
            }
            let sum: f32 = seen.iter().sum();
            let inv = 1.0 / sum;
            seen.iter_mut().for_each(|v| *v *= inv);
            masked.fill(0.0);
        }
    }
}

simd_fn! {
    /// The scores' gradient in place of `dp` (`dO V^T`, `keys` per row): `P (dP - rowsum(dO o)) scale`,
    /// with `g` and `o` the block's rows of the output gradient and output (`hd` per row).
    fn scores_grad(dp: &mut [f32], p: &[f32], g: &[f32], o: &[f32], keys: usize, hd: usize, scale: f32) {
        for ((ds, p), (g, o)) in dp.chunks_mut(keys).zip(p.chunks(keys)).zip(g.chunks(hd).zip(o.chunks(hd))) {
            let d: f32 = g.iter().zip(o).map(|(a, b)| a * b).sum();
            for (ds, &p) in ds.iter_mut().zip(p) {
                *ds = p * (*ds - d) * scale;
            }
        }
    }
}

/// Query rows per block of the fused attention: a block multiplies only the keys its rows can see.
const QUERY_BLOCK: usize = 64;

/// Causal attention `softmax(scale q k^T + mask) v` with grouped-query heads: `q` `[batch, heads, seq,
/// head_dim]`, `k` and `v` `[batch, kv_heads, seq, head_dim]`, query head `i` reading key/value head
/// `i / (heads / kv_heads)`. On the CPU in fp32, and on CUDA devices in fp32 or bf16 for the head
/// sizes of [`pretrain_kernels::ATTENTION_HEAD_DIMS`], it is one fused kernel (FlashAttention's shape:
/// no `seq x seq` tensor is ever stored; the backward recomputes the probabilities block by block, and
/// blocks above the diagonal are never computed); elsewhere it is composed from candle operations.
pub fn causal_attention(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Result<Tensor> {
    let (b, h, t, hd) = q.dims4()?;
    let (kb, kv, kt, khd) = k.dims4()?;
    if (kb, kt, khd) != (b, t, hd) || v.dims() != k.dims() || kv == 0 || !h.is_multiple_of(kv) {
        candle_core::bail!("attention: q {:?}, k {:?}, v {:?} do not fit together", q.dims(), k.dims(), v.dims());
    }
    if fused_for(q) && (q.device().is_cpu() || pretrain_kernels::ATTENTION_HEAD_DIMS.contains(&hd)) {
        let op = Attention {
            scale: scale as f32,
            batch: b,
            heads: h,
            kv_heads: kv,
            seq: t,
            head_dim: hd,
            #[cfg(feature = "cuda")]
            lse: std::sync::Mutex::new(None),
        };
        return q.contiguous()?.apply_op3(&k.contiguous()?, &v.contiguous()?, op);
    }
    // The query heads sharing a key/value head stacked into one `[groups x t, hd]` matrix, so keys
    // and values are never repeated.
    let groups = h / kv;
    let scores = q.contiguous()?.reshape((b, kv, groups * t, hd))?.matmul(&k.t()?.contiguous()?)?;
    let probs = causal_softmax(&scores.reshape((b, h, t, t))?, scale)?;
    probs.reshape((b, kv, groups * t, t))?.matmul(&v.contiguous()?)?.reshape((b, h, t, hd))
}

#[derive(Debug)]
struct Attention {
    scale: f32,
    batch: usize,
    heads: usize,
    kv_heads: usize,
    seq: usize,
    head_dim: usize,
    /// On a CUDA device: the forward's log-sum-exp per query row, which the backward reads.
    #[cfg(feature = "cuda")]
    lse: std::sync::Mutex<Option<CudaStorage>>,
}

impl Attention {
    fn check(&self, q: &Layout, k: &Layout, v: &Layout) -> Result<()> {
        let Self { batch: b, heads: h, kv_heads: kv, seq: t, head_dim: hd, .. } = *self;
        if q.dims() != [b, h, t, hd] || k.dims() != [b, kv, t, hd] || v.dims() != [b, kv, t, hd] {
            candle_core::bail!("attention: q {:?}, k {:?}, v {:?} for {self:?}", q.dims(), k.dims(), v.dims());
        }
        Ok(())
    }

    /// Probabilities of query rows `r0..r0 + rows` of one head over keys `0..r0 + rows` into `p` (row
    /// stride `r0 + rows`): scaled scores, masked above the diagonal, softmax per row.
    fn probabilities(&self, q: &[f32], k: &[f32], r0: usize, rows: usize, p: &mut [f32]) {
        let (hd, keys) = (self.head_dim, r0 + rows);
        gemm::matmul(p, keys, Mat::rows(&q[r0 * hd..], rows, hd, hd), Mat::rows(k, keys, hd, hd).t(), false);
        causal_softmax_rows(&mut p[..rows * keys], keys, r0, self.scale);
    }

    fn blocks(&self) -> impl Iterator<Item = (usize, usize)> + use<> {
        let t = self.seq;
        (0..t).step_by(QUERY_BLOCK).map(move |r0| (r0, QUERY_BLOCK.min(t - r0)))
    }
}

impl CustomOp3 for Attention {
    fn name(&self) -> &'static str {
        "causal-attention"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.check(l1, l2, l3)?;
        let (q, k, v) = (
            contiguous_f32(s1, l1, self.name())?,
            contiguous_f32(s2, l2, self.name())?,
            contiguous_f32(s3, l3, self.name())?,
        );
        let (t, hd, groups) = (self.seq, self.head_dim, self.heads / self.kv_heads);
        let head = t * hd;
        let mut o = vec![0f32; q.len()];
        // One task per key/value head: its query heads one after the other.
        o.par_chunks_mut(groups * head).enumerate().for_each(|(task, o)| {
            let (k, v) = (&k[task * head..(task + 1) * head], &v[task * head..(task + 1) * head]);
            let mut p = vec![0f32; QUERY_BLOCK.min(t) * t];
            for j in 0..groups {
                let q = &q[(task * groups + j) * head..][..head];
                let o = &mut o[j * head..(j + 1) * head];
                for (r0, rows) in self.blocks() {
                    let keys = r0 + rows;
                    self.probabilities(q, k, r0, rows, &mut p);
                    gemm::matmul(
                        &mut o[r0 * hd..],
                        hd,
                        Mat::rows(&p, rows, keys, keys),
                        Mat::rows(v, keys, hd, hd),
                        false,
                    );
                }
            }
        });
        Ok((CpuStorage::F32(o), l1.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
        s3: &CudaStorage,
        l3: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        self.check(l1, l2, l3)?;
        let (o, lse) = super::cuda::attention((s1, l1), (s2, l2), (s3, l3), &self.kernel_shape())?;
        *self.lse.lock().unwrap_or_else(|e| e.into_inner()) = Some(lse);
        Ok((o, l1.shape().clone()))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        o: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let grad = grad.contiguous()?;
        #[cfg(feature = "cuda")]
        if q.device().is_cuda() {
            let lse = self.lse.lock().unwrap_or_else(|e| e.into_inner());
            let lse = lse.as_ref().ok_or_else(|| {
                candle_core::Error::Msg("causal-attention-grad: the forward kept no log-sum-exp".into())
            })?;
            let op = AttentionGrad { attention: self, o: &o.contiguous()?, g: &grad, lse };
            let all = q.contiguous()?.apply_op3_no_bwd(&k.contiguous()?, &v.contiguous()?, &op)?;
            let (nq, nk) = (q.elem_count(), k.elem_count());
            return Ok((
                Some(all.narrow(0, 0, nq)?.reshape(q.shape())?),
                Some(all.narrow(0, nq, nk)?.reshape(k.shape())?),
                Some(all.narrow(0, nq + nk, nk)?.reshape(k.shape())?),
            ));
        }
        let tensors = [q, k, v, o, &grad];
        let guards: Vec<_> = tensors.iter().map(|t| t.storage_and_layout()).collect();
        let mut slices = Vec::with_capacity(5);
        for (storage, layout) in &guards {
            let candle_core::Storage::Cpu(cpu) = &**storage else {
                candle_core::bail!("causal-attention-grad: a tensor left the CPU");
            };
            slices.push(contiguous_f32(cpu, layout, "causal-attention-grad")?);
        }
        let (dq, dk, dv) = self.backward(slices[0], slices[1], slices[2], slices[3], slices[4]);
        drop(guards);
        let device = q.device();
        Ok((
            Some(Tensor::from_vec(dq, q.shape(), device)?),
            Some(Tensor::from_vec(dk, k.shape(), device)?),
            Some(Tensor::from_vec(dv, v.shape(), device)?),
        ))
    }
}

/// Attention's gradients on a CUDA device, `[dq, dk, dv]` flattened into one buffer, from q, k and v
/// (the op's inputs) and the forward's output, its gradient and its log-sum-exp.
#[cfg(feature = "cuda")]
struct AttentionGrad<'a> {
    attention: &'a Attention,
    o: &'a Tensor,
    g: &'a Tensor,
    lse: &'a CudaStorage,
}

#[cfg(feature = "cuda")]
impl CustomOp3 for AttentionGrad<'_> {
    fn name(&self) -> &'static str {
        "causal-attention-grad"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        candle_core::bail!("causal-attention-grad runs on CUDA devices (the CPU's is Attention::backward)")
    }

    fn cuda_fwd(
        &self,
        s1: &CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
        s3: &CudaStorage,
        l3: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        self.attention.check(l1, l2, l3)?;
        let (o, o_layout) = self.o.storage_and_layout();
        let (g, g_layout) = self.g.storage_and_layout();
        let (candle_core::Storage::Cuda(o), candle_core::Storage::Cuda(g)) = (&*o, &*g) else {
            candle_core::bail!("causal-attention-grad: the output or its gradient left the GPU");
        };
        let shape = self.attention.kernel_shape();
        let lse_layout = Layout::contiguous(shape.rows());
        let out = super::cuda::attention_grad(
            ((s1, l1), (s2, l2), (s3, l3)),
            ((o, o_layout), (g, g_layout), (self.lse, &lse_layout)),
            &shape,
        )?;
        Ok((out, Shape::from(l1.shape().elem_count() + 2 * l2.shape().elem_count())))
    }
}

impl Attention {
    #[cfg(feature = "cuda")]
    fn kernel_shape(&self) -> pretrain_kernels::Attention {
        pretrain_kernels::Attention {
            batch: self.batch,
            heads: self.heads,
            kv_heads: self.kv_heads,
            seq: self.seq,
            head_dim: self.head_dim,
            scale: self.scale,
            cuda_cores: false,
        }
    }

    /// Gradients of q, k and v from the output `o` and its gradient `g`, per key/value head: with
    /// `P` recomputed block by block, `dV += P^T dO`, `dS = P (dO V^T - rowsum(dO o)) scale`,
    /// `dQ = dS K` and `dK += dS^T Q`.
    fn backward(&self, q: &[f32], k: &[f32], v: &[f32], o: &[f32], g: &[f32]) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
        let (t, hd, groups) = (self.seq, self.head_dim, self.heads / self.kv_heads);
        let head = t * hd;
        let (mut dq, mut dk, mut dv) = (vec![0f32; q.len()], vec![0f32; k.len()], vec![0f32; k.len()]);
        dq.par_chunks_mut(groups * head)
            .zip(dk.par_chunks_mut(head).zip(dv.par_chunks_mut(head)))
            .enumerate()
            .for_each(|(task, (dq, (dk, dv)))| {
                let (k, v) = (&k[task * head..(task + 1) * head], &v[task * head..(task + 1) * head]);
                let block = QUERY_BLOCK.min(t) * t;
                let (mut p, mut dp) = (vec![0f32; block], vec![0f32; block]);
                for j in 0..groups {
                    let at = (task * groups + j) * head;
                    let (q, o, g) = (&q[at..at + head], &o[at..at + head], &g[at..at + head]);
                    let dq = &mut dq[j * head..(j + 1) * head];
                    for (r0, rows) in self.blocks() {
                        let keys = r0 + rows;
                        self.probabilities(q, k, r0, rows, &mut p);
                        let g_rows = Mat::rows(&g[r0 * hd..], rows, hd, hd);
                        gemm::matmul(dv, hd, Mat::rows(&p, rows, keys, keys).t(), g_rows, true);
                        gemm::matmul(&mut dp, keys, g_rows, Mat::rows(v, keys, hd, hd).t(), false);
                        let block = r0 * hd..(r0 + rows) * hd;
                        let (g_block, o_block) = (&g[block.clone()], &o[block]);
                        scores_grad(&mut dp[..rows * keys], &p[..rows * keys], g_block, o_block, keys, hd, self.scale);
                        let ds = Mat::rows(&dp, rows, keys, keys);
                        gemm::matmul(&mut dq[r0 * hd..], hd, ds, Mat::rows(k, keys, hd, hd), false);
                        gemm::matmul(dk, hd, ds.t(), Mat::rows(&q[r0 * hd..], rows, hd, hd), true);
                    }
                }
            });
        (dq, dk, dv)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn close(a: &Tensor, b: &Tensor) {
        let a: Vec<f32> = a.flatten_all().unwrap().to_vec1().unwrap();
        let b: Vec<f32> = b.flatten_all().unwrap().to_vec1().unwrap();
        for (x, y) in a.iter().zip(&b) {
            assert!((x - y).abs() < 1e-5 * (1.0 + y.abs()), "{x} vs {y}");
        }
    }

    #[test]
    fn fused_kernels_match_the_composed_operations_and_their_gradients() {
        let dev = Device::Cpu;
        let scores = Var::from_tensor(&Tensor::randn(0f32, 1.0, (2, 3, 5, 5), &dev).unwrap()).unwrap();
        let weights = Tensor::randn(0f32, 1.0, (2, 3, 5, 5), &dev).unwrap();
        let fused = causal_softmax(&scores, 0.7).unwrap();
        let composed = {
            let mask: Vec<f32> =
                (0..5).flat_map(|i| (0..5).map(move |j| if j <= i { 0.0 } else { f32::NEG_INFINITY })).collect();
            let x = (scores.as_tensor() * 0.7)
                .unwrap()
                .broadcast_add(&Tensor::from_vec(mask, (5, 5), &dev).unwrap())
                .unwrap();
            candle_nn::ops::softmax(&x, D::Minus1).unwrap()
        };
        close(&fused, &composed);
        let g1 = (fused * &weights).unwrap().sum_all().unwrap().backward().unwrap();
        let g2 = (composed * &weights).unwrap().sum_all().unwrap().backward().unwrap();
        close(g1.get(&scores).unwrap(), g2.get(&scores).unwrap());

        let logits = Var::from_tensor(&Tensor::randn(0f32, 2.0, (6, 11), &dev).unwrap()).unwrap();
        let targets = Tensor::new(&[0u32, 3, 10, 5, 5, 1], &dev).unwrap();
        let fused = cross_entropy(&logits, &targets).unwrap();
        let composed = candle_nn::loss::cross_entropy(logits.as_tensor(), &targets).unwrap();
        close(&fused, &composed);
        let g1 = (fused * 3.0).unwrap().backward().unwrap();
        let g2 = (composed * 3.0).unwrap().backward().unwrap();
        close(g1.get(&logits).unwrap(), g2.get(&logits).unwrap());
        assert!(cross_entropy(&logits, &Tensor::new(&[0u32, 3, 11, 5, 5, 1], &dev).unwrap()).is_err());
    }

    /// `sum(out * weights)`'s gradients with respect to `vars`.
    fn grads(out: &Tensor, weights: &Tensor, vars: &[&Var]) -> Vec<Tensor> {
        let store = (out * weights).unwrap().sum_all().unwrap().backward().unwrap();
        vars.iter().map(|v| store.get(v.as_tensor()).unwrap().clone()).collect()
    }

    fn var(shape: &[usize], dev: &Device) -> Var {
        Var::from_tensor(&Tensor::randn(0f32, 1.0, shape, dev).unwrap()).unwrap()
    }

    #[test]
    fn rms_norm_and_swiglu_match_the_composed_operations_and_their_gradients() {
        let dev = Device::Cpu;
        // 70 rows of an odd width: several parallel tasks, the last one short.
        let (x, w) = (var(&[2, 35, 7], &dev), var(&[7], &dev));
        let up = Tensor::randn(0f32, 1.0, (2, 35, 7), &dev).unwrap();
        let fused = rms_norm(&x, &w, 1e-5).unwrap();
        let composed = {
            let mean = x.sqr().unwrap().mean_keepdim(D::Minus1).unwrap();
            x.broadcast_div(&(mean + 1e-5).unwrap().sqrt().unwrap()).unwrap().broadcast_mul(&w).unwrap()
        };
        close(&fused, &composed);
        for (a, b) in grads(&fused, &up, &[&x, &w]).iter().zip(grads(&composed, &up, &[&x, &w])) {
            close(a, &b);
        }
        assert!(rms_norm(&x, &Tensor::ones(6, DType::F32, &dev).unwrap(), 1e-5).is_err());

        // More elements than one parallel task takes, and not a multiple of it.
        let (gate, up) = (var(&[3, 3001], &dev), var(&[3, 3001], &dev));
        let weights = Tensor::randn(0f32, 1.0, (3, 3001), &dev).unwrap();
        let fused = swiglu(&gate, &up).unwrap();
        let composed = (gate.silu().unwrap() * up.as_tensor()).unwrap();
        close(&fused, &composed);
        for (a, b) in grads(&fused, &weights, &[&gate, &up]).iter().zip(grads(&composed, &weights, &[&gate, &up])) {
            close(a, &b);
        }
    }

    #[test]
    fn split_heads_with_rope_and_merge_heads_match_reshapes_and_their_gradients() {
        let dev = Device::Cpu;
        let (b, t, n, hd) = (2, 5, 3, 6);
        let rope = crate::model::Rope::new(hd, 9, 10_000.0, crate::model::Scaling::None, &dev).unwrap();
        let x = var(&[b * t, n * hd], &dev);
        let weights = Tensor::randn(0f32, 1.0, (b, n, t, hd), &dev).unwrap();
        let reshaped = x.reshape((b, t, n, hd)).unwrap().transpose(1, 2).unwrap().contiguous().unwrap();
        for offset in [0, 4] {
            let fused = split_heads(&x, (b, t, n), Some(&rope), offset).unwrap();
            let composed = rope.apply_at(&reshaped, offset).unwrap();
            close(&fused, &composed);
            close(&grads(&fused, &weights, &[&x])[0], &grads(&composed, &weights, &[&x])[0]);
        }
        let err = split_heads(&x, (b, t, n), Some(&rope), 5).unwrap_err().to_string();
        assert!(err.contains("position 9 is beyond the 9 positions"), "{err}");
        let plain = split_heads(&x, (b, t, n), None, 0).unwrap();
        close(&plain, &reshaped);
        close(&grads(&plain, &weights, &[&x])[0], &grads(&reshaped, &weights, &[&x])[0]);

        let heads = var(&[b, n, t, hd], &dev);
        let weights = Tensor::randn(0f32, 1.0, (b * t, n * hd), &dev).unwrap();
        let fused = merge_heads(&heads).unwrap();
        let composed = heads.transpose(1, 2).unwrap().reshape((b * t, n * hd)).unwrap();
        close(&fused, &composed);
        close(&grads(&fused, &weights, &[&heads])[0], &grads(&composed, &weights, &[&heads])[0]);
    }

    #[test]
    fn fused_attention_matches_the_composed_operations_and_their_gradients() {
        let dev = Device::Cpu;
        // 70 positions: a full query block and a short one; 3 query heads per key/value head.
        for (b, h, kv, t, hd) in [(2, 6, 2, 70, 6), (1, 2, 2, 3, 4)] {
            let (q, k, v) = (var(&[b, h, t, hd], &dev), var(&[b, kv, t, hd], &dev), var(&[b, kv, t, hd], &dev));
            let weights = Tensor::randn(0f32, 1.0, (b, h, t, hd), &dev).unwrap();
            let fused = causal_attention(&q, &k, &v, 0.4).unwrap();
            let composed = {
                let repeat = |x: &Tensor| {
                    let x = x.unsqueeze(2).unwrap().repeat((1, 1, h / kv, 1, 1)).unwrap();
                    x.reshape((b, h, t, hd)).unwrap()
                };
                let (k, v) = (repeat(k.as_tensor()), repeat(v.as_tensor()));
                let mask: Vec<f32> =
                    (0..t).flat_map(|i| (0..t).map(move |j| if j <= i { 0.0 } else { f32::NEG_INFINITY })).collect();
                let scores = (q.matmul(&k.t().unwrap()).unwrap() * 0.4)
                    .unwrap()
                    .broadcast_add(&Tensor::from_vec(mask, (t, t), &dev).unwrap())
                    .unwrap();
                candle_nn::ops::softmax(&scores, D::Minus1).unwrap().matmul(&v).unwrap()
            };
            close(&fused, &composed);
            let vars = [&q, &k, &v];
            for (a, b) in grads(&fused, &weights, &vars).iter().zip(grads(&composed, &weights, &vars)) {
                close(a, &b);
            }
        }
        let (q, k) = (var(&[1, 3, 4, 2], &dev), var(&[1, 2, 4, 2], &dev));
        assert!(causal_attention(&q, &k, &k, 1.0).is_err(), "3 heads cannot share 2 key/value heads");
    }

    #[test]
    fn fast_exp_is_within_2e7_of_libm_and_keeps_nan() {
        let mut worst = 0f64;
        for i in -87_000..88_000 {
            let x = i as f32 / 1000.0 + 0.000_37;
            let want = f64::from(x).exp();
            worst = worst.max(((f64::from(exp(x)) - want) / want).abs());
        }
        assert!(worst < 2e-7, "largest relative error {worst:e}");
        assert_eq!(exp(0.0), 1.0);
        assert!(exp(f32::NAN).is_nan());
        assert_eq!(exp(100.0), f32::INFINITY);
        assert!(exp(-100.0) > 0.0 && exp(-100.0) < 2.0 * f32::MIN_POSITIVE);
    }
}
