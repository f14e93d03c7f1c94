//! Rotary position embeddings and their rescalings for longer contexts.
//!
//! Frequencies follow the Llama convention: pairs `(i, i + d/2)` of a head rotate by
//! `position * base^(-2i/d)` ("rotate half").

use candle_core::{D, Device, Result, Tensor};

/// How frequencies are rescaled for a context `factor` times longer than the one trained on.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Scaling {
    /// Plain RoPE.
    None,
    /// Positions divided by `factor` (position interpolation).
    Linear {
        /// New length / trained length.
        factor: f64,
    },
    /// NTK-aware: the base grows to `base * factor^(d / (d - 2))`, stretching low frequencies most.
    Ntk {
        /// New length / trained length.
        factor: f64,
    },
    /// YaRN: high frequencies kept, low ones interpolated, a ramp between (by rotations per trained
    /// context, `beta_fast` = 32 and `beta_slow` = 1), and attention logits scaled by
    /// `(0.1 ln(factor) + 1)^2`.
    Yarn {
        /// New length / trained length.
        factor: f64,
        /// The context the model was trained at.
        original_len: usize,
    },
}

/// Inverse frequencies (`head_dim / 2` of them) for `base` and `scaling`.
pub fn inv_freq(head_dim: usize, base: f64, scaling: Scaling) -> Vec<f64> {
    let half = head_dim / 2;
    let plain = |base: f64| -> Vec<f64> { (0..half).map(|i| base.powf(-((2 * i) as f64) / head_dim as f64)).collect() };
    match scaling {
        Scaling::None => plain(base),
        Scaling::Linear { factor } => plain(base).into_iter().map(|f| f / factor).collect(),
        Scaling::Ntk { factor } => plain(base * factor.powf(head_dim as f64 / (head_dim as f64 - 2.0))),
        Scaling::Yarn { factor, original_len } => {
            let (beta_fast, beta_slow) = (32.0, 1.0);
            // The dimension index at which a frequency makes `rotations` turns over the trained context.
            let dim_at = |rotations: f64| {
                head_dim as f64 * (original_len as f64 / (rotations * 2.0 * std::f64::consts::PI)).ln()
                    / (2.0 * base.ln())
            };
            let low = dim_at(beta_fast).floor().max(0.0);
            let high = dim_at(beta_slow).ceil().min(head_dim as f64 - 1.0);
            plain(base)
                .into_iter()
                .enumerate()
                .map(|(i, f)| {
                    let ramp = ((i as f64 - low) / (high - low).max(1e-3)).clamp(0.0, 1.0);
                    // ramp 0: extrapolate (keep), ramp 1: interpolate (divide by factor).
                    f * (1.0 - ramp) + f / factor * ramp
                })
                .collect()
        }
    }
}

/// Multiplier of the attention logits that a scaling asks for (YaRN's temperature; 1 otherwise).
pub fn attention_factor(scaling: Scaling) -> f64 {
    match scaling {
        Scaling::Yarn { factor, .. } if factor > 1.0 => (0.1 * factor.ln() + 1.0).powi(2),
        _ => 1.0,
    }
}

/// `cos` and `sin` tables, `[seq_len, head_dim]`: each frequency's value stands in both halves, as
/// "rotate half" pairs dimension `i` with `i + head_dim / 2`.
#[derive(Debug, Clone)]
pub struct Rope {
    cos: Tensor,
    sin: Tensor,
}

impl Rope {
    /// Tables for positions `0..seq_len`.
    pub fn new(head_dim: usize, seq_len: usize, base: f64, scaling: Scaling, device: &Device) -> Result<Self> {
        let freqs = inv_freq(head_dim, base, scaling);
        let mut cos = Vec::with_capacity(seq_len * head_dim);
        let mut sin = Vec::with_capacity(seq_len * head_dim);
        for p in 0..seq_len {
            for f in freqs.iter().chain(&freqs) {
                let angle = p as f64 * f;
                cos.push(angle.cos() as f32);
                sin.push(angle.sin() as f32);
            }
        }
        Ok(Self {
            cos: Tensor::from_vec(cos, (seq_len, head_dim), device)?,
            sin: Tensor::from_vec(sin, (seq_len, head_dim), device)?,
        })
    }

    /// Rotates `x` of shape `[batch, heads, seq, head_dim]` (differentiable).
    pub fn apply(&self, x: &Tensor) -> Result<Tensor> {
        let (_, _, seq, dim) = x.dims4()?;
        let table = |t: &Tensor| t.narrow(0, 0, seq)?.to_dtype(x.dtype())?.reshape((1, 1, seq, dim));
        let (cos, sin) = (table(&self.cos)?, table(&self.sin)?);
        let x1 = x.narrow(D::Minus1, 0, dim / 2)?;
        let x2 = x.narrow(D::Minus1, dim / 2, dim / 2)?;
        let rotated = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
        x.broadcast_mul(&cos)? + rotated.broadcast_mul(&sin)?
    }

    /// Positions the tables cover.
    pub fn len(&self) -> usize {
        self.cos.dims()[0]
    }

    /// Whether the tables are empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scalings_keep_high_frequencies_and_stretch_low_ones() {
        let plain = inv_freq(64, 10_000.0, Scaling::None);
        assert_eq!(plain[0], 1.0);
        let linear = inv_freq(64, 10_000.0, Scaling::Linear { factor: 4.0 });
        assert!((linear[5] - plain[5] / 4.0).abs() < 1e-15);
        let ntk = inv_freq(64, 10_000.0, Scaling::Ntk { factor: 4.0 });
        assert_eq!(ntk[0], 1.0);
        // The lowest frequency is divided by exactly the factor under NTK.
        assert!((ntk[31] / plain[31] - 0.25).abs() < 1e-2, "{}", ntk[31] / plain[31]);
        let yarn = inv_freq(64, 10_000.0, Scaling::Yarn { factor: 4.0, original_len: 256 });
        assert_eq!(yarn[0], plain[0]);
        assert!((yarn[31] - plain[31] / 4.0).abs() < 1e-12);
        assert!(attention_factor(Scaling::Yarn { factor: 4.0, original_len: 256 }) > 1.0);
        assert_eq!(attention_factor(Scaling::Ntk { factor: 4.0 }), 1.0);
    }

    #[test]
    fn rotation_preserves_norms_and_position_zero() {
        let dev = Device::Cpu;
        let rope = Rope::new(8, 4, 10_000.0, Scaling::None, &dev).unwrap();
        let x = Tensor::arange(0f32, 64.0, &dev).unwrap().reshape((1, 2, 4, 8)).unwrap();
        let y = rope.apply(&x).unwrap();
        let norm =
            |t: &Tensor| t.sqr().unwrap().sum_keepdim(3).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        for (a, b) in norm(&x).iter().zip(norm(&y)) {
            assert!((a - b).abs() / a.max(1.0) < 1e-5);
        }
        let first = |t: &Tensor| t.narrow(2, 0, 1).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(first(&x), first(&y));
    }
}
