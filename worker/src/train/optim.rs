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

/// AdamW state: first and second moments per parameter (fp32) and the update count.
#[derive(Debug)]
pub struct AdamW {
    config: AdamWConfig,
    m: Vec<Tensor>,
    v: Vec<Tensor>,
    /// Updates applied so far (bias correction uses it).
    pub updates: u64,
}

impl AdamW {
    /// Zero moments for `params`.
    pub fn new(config: AdamWConfig, params: &Params) -> Result<Self> {
        let zeros = || params.iter().map(|(_, _, v)| v.as_tensor().zeros_like()).collect::<Result<Vec<_>>>();
        Ok(Self { config, m: zeros()?, v: zeros()?, updates: 0 })
    }

    /// One update with `grads` (in `params` order, already averaged and clipped) at learning rate `lr`.
    pub fn step(&mut self, params: &Params, grads: &[Tensor], lr: f64) -> Result<()> {
        self.updates += 1;
        let (b1, b2) = (self.config.beta1, self.config.beta2);
        let c1 = 1.0 - b1.powi(self.updates as i32);
        let c2 = 1.0 - b2.powi(self.updates as i32);
        for (i, ((_, kind, var), g)) in params.iter().zip(grads).enumerate() {
            let g = g.to_dtype(DType::F32)?;
            let m = ((&self.m[i] * b1)? + (&g * (1.0 - b1))?)?;
            let v = ((&self.v[i] * b2)? + (g.sqr()? * (1.0 - b2))?)?;
            let update = ((&m / c1)? / ((&v / c2)?.sqrt()? + self.config.eps)?)?;
            let p = &var.as_tensor().detach();
            let decayed = match kind {
                ParamKind::Matrix | ParamKind::OutProjection if self.config.weight_decay > 0.0 => {
                    (p * (1.0 - lr * self.config.weight_decay))?
                }
                _ => p.clone(),
            };
            var.set(&(decayed - (update * lr)?)?)?;
            self.m[i] = m;
            self.v[i] = v;
        }
        Ok(())
    }

    /// The moments as named tensors (`exp_avg.<param>`, `exp_avg_sq.<param>`), for checkpoints.
    pub fn state(&self, params: &Params) -> Vec<(String, Tensor)> {
        let mut out = Vec::with_capacity(2 * self.m.len());
        for (i, (name, _, _)) in params.iter().enumerate() {
            out.push((format!("exp_avg.{name}"), self.m[i].clone()));
            out.push((format!("exp_avg_sq.{name}"), self.v[i].clone()));
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
            for (prefix, slot) in [("exp_avg", &mut self.m[i]), ("exp_avg_sq", &mut self.v[i])] {
                let key = format!("{prefix}.{name}");
                let t = saved.remove(&key).ok_or_else(|| format!("missing optimizer tensor {key}"))?;
                if t.dims() != var.as_tensor().dims() {
                    return Err(format!("optimizer tensor {key} has shape {:?}", t.dims()));
                }
                *slot = t.to_dtype(DType::F32).and_then(|t| t.to_device(var.device())).map_err(|e| e.to_string())?;
            }
        }
        self.updates = updates;
        Ok(())
    }
}

/// The global L2 norm of `grads`.
pub fn global_norm(grads: &[Tensor]) -> Result<f64> {
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

    #[test]
    fn first_update_moves_each_weight_by_lr_and_decays_only_matrices() {
        let c = LlamaConfig {
            vocab_size: 8,
            dim: 4,
            layers: 1,
            heads: 2,
            kv_heads: 1,
            ffn_dim: 8,
            rope_base: 10_000.0,
            norm_eps: 1e-5,
            tie_embeddings: true,
        };
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
    fn clipping_bounds_the_global_norm() {
        let dev = Device::Cpu;
        let mut grads = vec![Tensor::new(&[3f32, 0.0], &dev).unwrap(), Tensor::new(&[4f32], &dev).unwrap()];
        assert!((clip(&mut grads, 1.0).unwrap() - 5.0).abs() < 1e-9);
        assert!((global_norm(&grads).unwrap() - 1.0).abs() < 1e-5);
        assert!((clip(&mut grads, 0.0).unwrap() - 1.0).abs() < 1e-5);
    }
}
