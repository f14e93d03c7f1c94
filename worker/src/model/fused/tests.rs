//! The fused kernels against the composed candle operations, values and gradients.

use super::attention::causal_softmax;
use super::*;
use candle_core::{D, Device, Var};

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
        let x =
            (scores.as_tensor() * 0.7).unwrap().broadcast_add(&Tensor::from_vec(mask, (5, 5), &dev).unwrap()).unwrap();
        candle_nn::ops::softmax(&x, D::Minus1).unwrap()
    };
    close(&fused, &composed);
    let g1 = (fused * &weights).unwrap().sum_all().unwrap().backward().unwrap();
    let g2 = (composed * &weights).unwrap().sum_all().unwrap().backward().unwrap();
    close(g1.get(&scores).unwrap(), g2.get(&scores).unwrap());

    let logits = Var::from_tensor(&Tensor::randn(0f32, 2.0, (6, 11), &dev).unwrap()).unwrap();
    let targets = Tensor::new(&[0u32, 3, 10, 5, 5, 1], &dev).unwrap();
    let fused = Kernels::Fused.cross_entropy(&logits, &targets).unwrap();
    let composed = candle_nn::loss::cross_entropy(logits.as_tensor(), &targets).unwrap();
    close(&fused, &composed);
    let g1 = (fused * 3.0).unwrap().backward().unwrap();
    let g2 = (composed * 3.0).unwrap().backward().unwrap();
    close(g1.get(&logits).unwrap(), g2.get(&logits).unwrap());
    assert!(Kernels::Fused.cross_entropy(&logits, &Tensor::new(&[0u32, 3, 11, 5, 5, 1], &dev).unwrap()).is_err());
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
    let fused = Kernels::Fused.rms_norm(&x, &w, 1e-5).unwrap();
    let composed = {
        let mean = x.sqr().unwrap().mean_keepdim(D::Minus1).unwrap();
        x.broadcast_div(&(mean + 1e-5).unwrap().sqrt().unwrap()).unwrap().broadcast_mul(&w).unwrap()
    };
    close(&fused, &composed);
    for (a, b) in grads(&fused, &up, &[&x, &w]).iter().zip(grads(&composed, &up, &[&x, &w])) {
        close(a, &b);
    }
    assert!(Kernels::Fused.rms_norm(&x, &Tensor::ones(6, DType::F32, &dev).unwrap(), 1e-5).is_err());

    // More elements than one parallel task takes, and not a multiple of it.
    let (gate, up) = (var(&[3, 3001], &dev), var(&[3, 3001], &dev));
    let weights = Tensor::randn(0f32, 1.0, (3, 3001), &dev).unwrap();
    let fused = Kernels::Fused.swiglu(&gate, &up).unwrap();
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
        let fused = Kernels::Fused.split_heads(&x, (b, t, n), Some(&rope), offset).unwrap();
        let composed = rope.apply_at(&reshaped, offset).unwrap();
        close(&fused, &composed);
        close(&grads(&fused, &weights, &[&x])[0], &grads(&composed, &weights, &[&x])[0]);
    }
    let err = Kernels::Fused.split_heads(&x, (b, t, n), Some(&rope), 5).unwrap_err().to_string();
    assert!(err.contains("position 9 is beyond the 9 positions"), "{err}");
    let plain = Kernels::Fused.split_heads(&x, (b, t, n), None, 0).unwrap();
    close(&plain, &reshaped);
    close(&grads(&plain, &weights, &[&x])[0], &grads(&reshaped, &weights, &[&x])[0]);

    let heads = var(&[b, n, t, hd], &dev);
    let weights = Tensor::randn(0f32, 1.0, (b * t, n * hd), &dev).unwrap();
    let fused = Kernels::Fused.merge_heads(&heads).unwrap();
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
        let fused = Kernels::Fused.causal_attention(&q, &k, &v, 0.4).unwrap();
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
    assert!(Kernels::Fused.causal_attention(&q, &k, &k, 1.0).is_err(), "3 heads cannot share 2 key/value heads");
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

#[test]
fn attention_over_cached_keys_equals_the_last_rows_of_full_attention() {
    let dev = Device::Cpu;
    let (b, h, kv, t, hd) = (2, 4, 2, 7, 4);
    let q = Tensor::randn(0f32, 1.0, (b, h, t, hd), &dev).unwrap();
    let (k, v) = (
        Tensor::randn(0f32, 1.0, (b, kv, t, hd), &dev).unwrap(),
        Tensor::randn(0f32, 1.0, (b, kv, t, hd), &dev).unwrap(),
    );
    let full = Kernels::Fused.causal_attention(&q, &k, &v, 0.5).unwrap();
    for last in [1, 3] {
        let queries = q.narrow(2, t - last, last).unwrap();
        for kernels in [Kernels::Fused, Kernels::Composed] {
            let cached = kernels.causal_attention(&queries, &k, &v, 0.5).unwrap();
            close(&cached, &full.narrow(2, t - last, last).unwrap());
        }
    }
    let long = Tensor::randn(0f32, 1.0, (b, h, t + 1, hd), &dev).unwrap();
    assert!(Kernels::Fused.causal_attention(&long, &k, &v, 0.5).is_err(), "more queries than keys");
}
