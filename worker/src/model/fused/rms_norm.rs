//! RMSNorm, fused: one pass forward, one pass backward for both gradients.

#[cfg(feature = "cuda")]
use candle_core::CudaStorage;
use candle_core::{CpuStorage, CustomOp2, CustomOp3, D, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

#[cfg(feature = "cuda")]
use super::on_gpu;
use super::{In, Kernels, ROWS_PER_TASK, contiguous_f32, forward3, simd_fn};

impl Kernels {
    /// `x * w / sqrt(mean(x^2) + eps)` over the last dimension, computed in fp32 whatever the input. Fused
    /// (one pass forward, one pass backward for both gradients) when `x` and `w` share a dtype the kernels
    /// serve; composed otherwise.
    pub fn rms_norm(self, x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
        if self.serves(x) && weight.dtype() == x.dtype() {
            return x.contiguous()?.apply_op2(&weight.contiguous()?, RmsNorm { eps: eps as f32 });
        }
        let dtype = x.dtype();
        let x32 = x.to_dtype(DType::F32)?;
        let mean = x32.sqr()?.mean_keepdim(D::Minus1)?;
        let normed = x32.broadcast_div(&(mean + eps)?.sqrt()?)?;
        normed.to_dtype(dtype)?.broadcast_mul(weight)
    }
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
        on_gpu(crate::model::cuda::rms_norm((s1, l1), (s2, l2), d, self.eps), l1.shape().clone())
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

    forward3!();
}

impl RmsNormGrad {
    fn cpu3(&self, [(s1, l1), (s2, l2), (s3, l3)]: [In<'_, CpuStorage>; 3]) -> Result<(CpuStorage, Shape)> {
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
    fn cuda3(&self, [(s1, l1), (s2, l2), (s3, l3)]: [In<'_, CudaStorage>; 3]) -> Result<(CudaStorage, Shape)> {
        let d = check_norm_weight(l1, l2, self.name())?;
        let n = l1.shape().elem_count();
        on_gpu(crate::model::cuda::rms_norm_grad((s1, l1), (s2, l2), (s3, l3), d, self.eps), n + d)
    }
}
