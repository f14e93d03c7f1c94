//! The cross-entropy over the vocabulary, fused: one pass over the logits forward, one backward.

#[cfg(feature = "cuda")]
use candle_core::CudaStorage;
use candle_core::{CpuStorage, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

#[cfg(feature = "cuda")]
use super::on_gpu;
use super::{In, Kernels, contiguous_f32, exp, forward3, simd_fn};

impl Kernels {
    /// Mean cross-entropy of `logits` `[n, vocab]` against `targets` `[n]` (u32), in fp32 whatever the
    /// logits' dtype (fused, bf16 logits are read as they are: no fp32 copy of them is made).
    pub fn cross_entropy(self, logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
        if self.serves(logits) {
            let targets = targets.to_dtype(DType::U32)?.contiguous()?;
            return logits.contiguous()?.apply_op2(&targets, CrossEntropy)?.mean_all();
        }
        candle_nn::loss::cross_entropy(&logits.to_dtype(DType::F32)?, targets)
    }
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
        on_gpu(crate::model::cuda::cross_entropy((s1, l1), (s2, l2), n, v), n)
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

    forward3!();
}

impl CrossEntropyGrad {
    fn cpu3(&self, [(s1, l1), (s2, l2), (s3, l3)]: [In<'_, CpuStorage>; 3]) -> Result<(CpuStorage, Shape)> {
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
    fn cuda3(&self, [(s1, l1), (s2, l2), (s3, l3)]: [In<'_, CudaStorage>; 3]) -> Result<(CudaStorage, Shape)> {
        let (n, v) = l1.shape().dims2()?;
        if l2.shape().elem_count() != n || l3.shape().elem_count() != 2 * n {
            candle_core::bail!(
                "cross-entropy-grad: {n} rows, {} targets, {} losses and gradients",
                l2.shape().elem_count(),
                l3.shape().elem_count()
            );
        }
        on_gpu(crate::model::cuda::cross_entropy_grad((s1, l1), (s2, l2), (s3, l3), n, v), l1.shape().clone())
    }
}
