//! Rotary position embeddings and their rescalings for longer contexts.
//!
//! Frequencies follow the Llama convention: pairs `(i, i + d/2)` of a head rotate by
//! `position * base^(-2i/d)` ("rotate half").

use candle_core::{D, Device, Result, Tensor};
pub use pretrain_store::artifact::Scaling;

/// The NTK-aware base for a context `factor` times longer: `base * factor^(d / (d - 2))`, which
/// divides the lowest frequency by exactly `factor` and leaves the highest unchanged.
pub fn ntk_base(base: f64, factor: f64, head_dim: usize) -> f64 {
    base * factor.powf(head_dim as f64 / (head_dim as f64 - 2.0))
}

/// Inverse frequencies (`head_dim / 2` of them) for `base` and `scaling`.
pub fn inv_freq(head_dim: usize, base: f64, scaling: Scaling) -> Vec<f64> {
    let half = head_dim / 2;
    let plain = |base: f64| -> Vec<f64> { (0..half).map(|i| base.powf(-((2 * i) as f64) / head_dim as f64)).collect() };
    match scaling {
        Scaling::None => plain(base),
        Scaling::Linear { factor } => plain(base).into_iter().map(|f| f / factor).collect(),
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

    /// Rotates `x` of shape `[batch, heads, seq, head_dim]` at positions `0..seq` (differentiable).
    pub fn apply(&self, x: &Tensor) -> Result<Tensor> {
        self.apply_at(x, 0)
    }

    /// Rotates `x` of shape `[batch, heads, seq, head_dim]` at positions `offset..offset + seq`.
    pub fn apply_at(&self, x: &Tensor, offset: usize) -> Result<Tensor> {
        let (_, _, seq, dim) = x.dims4()?;
        let (cos, sin) = self.window(offset, seq)?;
        let table = |t: &Tensor| t.to_dtype(x.dtype())?.reshape((1, 1, seq, dim));
        let (cos, sin) = (table(&cos)?, table(&sin)?);
        let x1 = x.narrow(D::Minus1, 0, dim / 2)?;
        let x2 = x.narrow(D::Minus1, dim / 2, dim / 2)?;
        let rotated = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
        x.broadcast_mul(&cos)? + rotated.broadcast_mul(&sin)?
    }

    /// The `cos` and `sin` rows `[seq, head_dim]` of positions `offset..offset + seq`, or an error
    /// naming the first position past the tables.
    pub fn window(&self, offset: usize, seq: usize) -> Result<(Tensor, Tensor)> {
        if offset + seq > self.len() {
            candle_core::bail!(
                "position {} is beyond the {} positions the RoPE tables were built for",
                offset + seq - 1,
                self.len()
            );
        }
        Ok((self.cos.narrow(0, offset, seq)?, self.sin.narrow(0, offset, seq)?))
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

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() <= 1e-12 * a.abs().max(b.abs()).max(1.0)
    }

    #[test]
    fn none_is_the_llama_formula() {
        let f = inv_freq(64, 10_000.0, Scaling::None);
        assert_eq!(f.len(), 32);
        for (i, v) in f.iter().enumerate() {
            assert!(close(*v, 1.0 / 10_000f64.powf(2.0 * i as f64 / 64.0)), "{i}: {v}");
        }
    }

    #[test]
    fn linear_divides_every_frequency_by_the_factor() {
        let plain = inv_freq(64, 10_000.0, Scaling::None);
        let linear = inv_freq(64, 10_000.0, Scaling::Linear { factor: 4.0 });
        for (p, l) in plain.iter().zip(&linear) {
            assert!(close(*l, p / 4.0));
        }
        // Position interpolation: position 4p under factor 4 is plain position p.
        let dev = Device::Cpu;
        let a = Rope::new(16, 64, 10_000.0, Scaling::None, &dev).unwrap();
        let b = Rope::new(16, 64, 10_000.0, Scaling::Linear { factor: 4.0 }, &dev).unwrap();
        let row = |r: &Rope, p: usize| r.cos.get(p).unwrap().to_vec1::<f32>().unwrap();
        for p in [1, 5, 15] {
            for (x, y) in row(&a, p).iter().zip(row(&b, 4 * p)) {
                assert!((x - y).abs() < 1e-5);
            }
        }
    }

    #[test]
    fn ntk_is_a_new_base_by_the_formula() {
        // base' = base * s^(d / (d - 2)), and the frequencies are plain RoPE at base'.
        let (base, s, d) = (10_000f64, 8f64, 64usize);
        let expected = base * s.powf(64.0 / 62.0);
        assert!(close(ntk_base(base, s, d), expected));
        let ntk = inv_freq(d, ntk_base(base, s, d), Scaling::None);
        for (i, v) in ntk.iter().enumerate() {
            assert!(close(*v, expected.powf(-(2.0 * i as f64) / d as f64)));
        }
        // The highest frequency is kept; the lowest is divided by exactly s.
        let plain = inv_freq(d, base, Scaling::None);
        assert_eq!(ntk[0], plain[0]);
        assert!(close(ntk[31] * s, plain[31]));
    }

    #[test]
    fn yarn_ramps_from_extrapolation_to_interpolation() {
        let (base, s, d, len) = (10_000f64, 4f64, 64usize, 256usize);
        let yarn = inv_freq(d, base, Scaling::Yarn { factor: s, original_len: len });
        let plain = inv_freq(d, base, Scaling::None);
        // The YaRN paper's boundaries: the dimension where a frequency turns r times over the
        // trained context, d ln(L / (2 pi r)) / (2 ln base), for r = 32 (keep) and r = 1 (interpolate).
        let at = |r: f64| d as f64 * (len as f64 / (r * 2.0 * std::f64::consts::PI)).ln() / (2.0 * base.ln());
        let (low, high) = (at(32.0).floor().max(0.0), at(1.0).ceil());
        assert!(low < high && high < 32.0, "{low} {high}");
        for i in 0..32 {
            let gamma = ((i as f64 - low) / (high - low)).clamp(0.0, 1.0);
            assert!(close(yarn[i], plain[i] * (1.0 - gamma) + plain[i] / s * gamma), "{i}");
        }
        assert_eq!(yarn[0], plain[0]);
        assert!(close(yarn[31], plain[31] / s));
        // Attention temperature sqrt(1/t) = 0.1 ln s + 1 on both q and k: logits times its square.
        let t = attention_factor(Scaling::Yarn { factor: s, original_len: len });
        assert!(close(t, (0.1 * s.ln() + 1.0).powi(2)));
        assert_eq!(attention_factor(Scaling::Linear { factor: s }), 1.0);
    }

    #[test]
    fn scaling_serialises_like_hugging_face_rope_scaling() {
        let y = Scaling::Yarn { factor: 4.0, original_len: 256 };
        let json = serde_json::to_value(y).unwrap();
        assert_eq!(json, serde_json::json!({"type": "yarn", "factor": 4.0, "originalLen": 256}));
        assert_eq!(serde_json::from_value::<Scaling>(json).unwrap(), y);
        assert_eq!(serde_json::from_value::<Scaling>(serde_json::json!({"type": "none"})).unwrap(), Scaling::None);
    }

    #[test]
    fn positions_past_the_tables_are_an_error() {
        let dev = Device::Cpu;
        let rope = Rope::new(8, 4, 10_000.0, Scaling::None, &dev).unwrap();
        let x = Tensor::zeros((1, 1, 2, 8), candle_core::DType::F32, &dev).unwrap();
        assert!(rope.apply_at(&x, 2).is_ok());
        let err = rope.apply_at(&x, 3).unwrap_err().to_string();
        assert!(err.contains("position 4 is beyond the 4 positions"), "{err}");
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
