//! Fused CPU kernels for the two largest activations of a training step, each with its backward:
//! the causal softmax of attention scores (`[batch, heads, seq, seq]`) and the cross-entropy over
//! the vocabulary (`[tokens, vocab]`). Composed from candle operations they allocate and stream five
//! or more full-size temporaries each; fused they read and write each element once or twice.
//!
//! On other devices (or dtypes) the same functions fall back to composed, differentiable operations.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, D, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

fn contiguous_f32<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> Result<&'a [f32]> {
    let (start, end) =
        l.contiguous_offsets().ok_or_else(|| candle_core::Error::Msg(format!("{what}: input must be contiguous")))?;
    Ok(&s.as_slice::<f32>()?[start..end])
}

/// `softmax(scale * s + causal mask)` over the last dimension of `[.., t, t]` scores.
pub fn causal_softmax(scores: &Tensor, scale: f64) -> Result<Tensor> {
    if scores.device().is_cpu() && scores.dtype() == DType::F32 {
        return scores.contiguous()?.apply_op1(CausalSoftmax { scale: scale as f32 });
    }
    let t = scores.dim(D::Minus1)?;
    let mask: Vec<f32> =
        (0..t).flat_map(|i| (0..t).map(move |j| if j <= i { 0.0 } else { f32::NEG_INFINITY })).collect();
    let mask = Tensor::from_vec(mask, (t, t), scores.device())?.to_dtype(scores.dtype())?;
    let x = (scores * scale)?.broadcast_add(&mask)?;
    let max = x.max_keepdim(D::Minus1)?.detach();
    let e = x.broadcast_sub(&max)?.exp()?;
    e.broadcast_div(&e.sum_keepdim(D::Minus1)?)
}

struct CausalSoftmax {
    scale: f32,
}

impl CustomOp1 for CausalSoftmax {
    fn name(&self) -> &'static str {
        "causal-softmax"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(s, l, self.name())?;
        let t = l.dims()[l.dims().len() - 1];
        let mut y = vec![0f32; x.len()];
        y.par_chunks_mut(t).zip(x.par_chunks(t)).enumerate().for_each(|(row, (out, inp))| {
            let visible = row % t + 1;
            let max = inp[..visible].iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v * self.scale));
            let mut sum = 0f32;
            for (o, &v) in out[..visible].iter_mut().zip(&inp[..visible]) {
                *o = (v * self.scale - max).exp();
                sum += *o;
            }
            let inv = 1.0 / sum;
            out[..visible].iter_mut().for_each(|o| *o *= inv);
        });
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }

    fn bwd(&self, _arg: &Tensor, res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(res.apply_op2_no_bwd(&grad_res.contiguous()?, &CausalSoftmaxGrad { scale: self.scale })?))
    }
}

/// `dx = scale * y * (g - sum(g * y))` per row.
struct CausalSoftmaxGrad {
    scale: f32,
}

impl CustomOp2 for CausalSoftmaxGrad {
    fn name(&self) -> &'static str {
        "causal-softmax-grad"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let y = contiguous_f32(s1, l1, self.name())?;
        let g = contiguous_f32(s2, l2, self.name())?;
        let t = l1.dims()[l1.dims().len() - 1];
        let mut dx = vec![0f32; y.len()];
        dx.par_chunks_mut(t).zip(y.par_chunks(t).zip(g.par_chunks(t))).enumerate().for_each(|(row, (out, (y, g)))| {
            let visible = row % t + 1;
            let dot: f32 = y[..visible].iter().zip(&g[..visible]).map(|(a, b)| a * b).sum();
            for ((o, &y), &g) in out[..visible].iter_mut().zip(&y[..visible]).zip(&g[..visible]) {
                *o = self.scale * y * (g - dot);
            }
        });
        Ok((CpuStorage::F32(dx), l1.shape().clone()))
    }
}

/// Mean cross-entropy of `logits` `[n, vocab]` against `targets` `[n]` (u32).
pub fn cross_entropy(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    if logits.device().is_cpu() && logits.dtype() == DType::F32 {
        let targets = targets.to_dtype(DType::U32)?.contiguous()?;
        return logits.contiguous()?.apply_op2(&targets, CrossEntropy)?.mean_all();
    }
    candle_nn::loss::cross_entropy(logits, targets)
}

/// Per row: `logsumexp(x) - x[target]`.
struct CrossEntropy;

fn log_sum_exp(row: &[f32]) -> f32 {
    let max = row.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    max + row.iter().map(|&v| (v - max).exp()).sum::<f32>().ln()
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

    fn bwd(
        &self,
        logits: &Tensor,
        targets: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let grad = logits.apply_op3_no_bwd(targets, &grad_res.contiguous()?, &CrossEntropyGrad)?;
        Ok((Some(grad), None))
    }
}

/// `d logits = g * (softmax(x) - onehot(target))` per row.
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
        let g = contiguous_f32(s3, l3, self.name())?;
        let mut dx = vec![0f32; x.len()];
        dx.par_chunks_mut(v).zip(x.par_chunks(v)).zip(targets.par_iter().zip(g.par_iter())).for_each(
            |((out, row), (&t, &g))| {
                let lse = log_sum_exp(row);
                for (o, &x) in out.iter_mut().zip(row) {
                    *o = g * (x - lse).exp();
                }
                out[t as usize] -= g;
            },
        );
        Ok((CpuStorage::F32(dx), l1.shape().clone()))
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
}
