//! The Llama model against a reference: logits, loss and gradients of a tiny model match PyTorch on
//! fixed weights and input (`worker/tests/fixtures/golden-llama.safetensors`, written by
//! `scripts/golden_llama.py`), and the tiny model can overfit one batch.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use pretrain_worker::model::{Llama, LlamaConfig, Params};
use pretrain_worker::train::optim::{AdamW, AdamWConfig, clip};

fn golden_config() -> LlamaConfig {
    LlamaConfig::tiny(64)
}

fn values(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_dtype(DType::F32).unwrap().to_vec1().unwrap()
}

/// Largest |a - b| / max(|b|, floor) over the elements; the floor keeps near-zero entries from
/// dominating (it is 1% of the reference's largest magnitude).
fn relative_error(ours: &[f32], reference: &[f32]) -> f32 {
    assert_eq!(ours.len(), reference.len());
    let floor = reference.iter().fold(0f32, |m, v| m.max(v.abs())) * 0.01;
    ours.iter().zip(reference).map(|(a, b)| (a - b).abs() / b.abs().max(floor).max(1e-12)).fold(0.0, f32::max)
}

#[test]
fn logits_loss_and_gradients_match_pytorch() {
    let dev = Device::Cpu;
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/golden-llama.safetensors");
    let mut all = candle_core::safetensors::load(path, &dev).unwrap();
    let ids = |t: Tensor| t.to_dtype(DType::U32).unwrap();
    let inputs = ids(all.remove("inputs").unwrap());
    let targets = ids(all.remove("targets").unwrap());
    let logits_ref = all.remove("logits").unwrap();
    let loss_ref = values(&all.remove("loss").unwrap())[0];
    let grads_ref: HashMap<String, Tensor> =
        all.iter().filter_map(|(k, v)| k.strip_prefix("grad.").map(|n| (n.to_string(), v.clone()))).collect();
    all.retain(|k, _| !k.starts_with("grad."));

    let config = golden_config();
    let params = Params::from_named(&config, all, &dev).unwrap();
    let model = Llama::new(config, params, 16, &dev).unwrap();
    let (loss, logits) = model.loss(&inputs, &targets, DType::F32).unwrap();
    let logits_err = relative_error(&values(&logits), &values(&logits_ref));
    assert!(logits_err < 1e-4, "logits differ by {logits_err}");
    let loss_value = loss.to_scalar::<f32>().unwrap();
    assert!(((loss_value - loss_ref) / loss_ref).abs() < 1e-4, "loss {loss_value} vs {loss_ref}");

    let grads = loss.backward().unwrap();
    assert_eq!(grads_ref.len(), model.params.len());
    for (name, _, var) in model.params.iter() {
        let ours = values(grads.get(var.as_tensor()).unwrap());
        let err = relative_error(&ours, &values(&grads_ref[name]));
        assert!(err < 1e-4, "gradient of {name} differs by {err}");
    }
}

#[test]
fn tiny_model_overfits_one_batch() {
    let dev = Device::Cpu;
    let config = golden_config();
    let model = Llama::new(config.clone(), Params::init(&config, 5, &dev).unwrap(), 32, &dev).unwrap();
    let tokens: Vec<u32> = (0..4 * 17).map(|i| ((i * 7 + i / 5) % 64) as u32).collect();
    let rows = |offset: usize| -> Vec<u32> {
        (0..4).flat_map(|r| tokens[r * 17 + offset..r * 17 + offset + 16].to_vec()).collect()
    };
    let inputs = Tensor::from_vec(rows(0), (4, 16), &dev).unwrap();
    let targets = Tensor::from_vec(rows(1), (4, 16), &dev).unwrap();
    let mut opt =
        AdamW::new(AdamWConfig { beta1: 0.9, beta2: 0.95, eps: 1e-8, weight_decay: 0.0 }, &model.params).unwrap();
    let mut last = f32::MAX;
    for _ in 0..150 {
        let (loss, _) = model.loss(&inputs, &targets, DType::F32).unwrap();
        last = loss.to_scalar().unwrap();
        if last < 0.05 {
            break;
        }
        let store = loss.backward().unwrap();
        let mut grads: Vec<Tensor> =
            model.params.iter().map(|(_, _, v)| store.get(v.as_tensor()).unwrap().clone()).collect();
        clip(&mut grads, 1.0).unwrap();
        opt.step(&model.params, &grads, 1e-2).unwrap();
    }
    assert!(last < 0.1, "loss after overfitting one batch: {last}");
}
