//! The SwiGLU activation, fused: both gradients in one pass.

#[cfg(feature = "cuda")]
use candle_core::CudaStorage;
use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

#[cfg(feature = "cuda")]
use super::on_gpu;
use super::{In, Kernels, contiguous_f32, exp, forward3, simd_fn};

impl Kernels {
    /// `silu(gate) * up`, the SwiGLU activation. Fused where the kernels serve the dtype (both gradients
    /// in one pass); composed elsewhere.
    pub fn swiglu(self, gate: &Tensor, up: &Tensor) -> Result<Tensor> {
        if self.serves(gate) && up.dtype() == gate.dtype() {
            if gate.shape() != up.shape() {
                candle_core::bail!("swiglu: gate {:?} and up {:?} differ in shape", gate.dims(), up.dims());
            }
            return gate.contiguous()?.apply_op2(&up.contiguous()?, SwiGlu);
        }
        gate.silu()? * up
    }
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
        on_gpu(crate::model::cuda::swiglu((s1, l1), (s2, l2)), l1.shape().clone())
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

    forward3!();
}

impl SwiGluGrad {
    fn cpu3(&self, [(s1, l1), (s2, l2), (s3, l3)]: [In<'_, CpuStorage>; 3]) -> Result<(CpuStorage, Shape)> {
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
    fn cuda3(&self, [(s1, l1), (s2, l2), (s3, l3)]: [In<'_, CudaStorage>; 3]) -> Result<(CudaStorage, Shape)> {
        on_gpu(crate::model::cuda::swiglu_grad((s1, l1), (s2, l2), (s3, l3)), 2 * l1.shape().elem_count())
    }
}
