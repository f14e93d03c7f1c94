//! `pretrain export`'s Hugging Face directory against `transformers`: `LlamaForCausalLM` loads the
//! config `export` writes and our weights as they are, and gives our model's logits, for every RoPE
//! setting long-context training can leave behind (plain, NTK as a new base, linear, YaRN) and for
//! tied and untied embeddings.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use pretrain_operator::export::hf_config;
use pretrain_store::artifact::TrainState;
use pretrain_tests::{python, relative_difference, transformers_logits};
use pretrain_worker::model::{Llama, LlamaConfig, Params, Scaling};

const VOCAB: usize = 97;

fn config(rope_base: f64, rope_scaling: Scaling, tie_embeddings: bool) -> LlamaConfig {
    LlamaConfig {
        vocab_size: VOCAB,
        dim: 64,
        layers: 2,
        heads: 4,
        kv_heads: 2,
        ffn_dim: 128,
        rope_base,
        norm_eps: 1e-5,
        tie_embeddings,
        rope_scaling,
    }
}

/// Random weights sharp enough that positions matter: the initial N(0, 0.02) attention is nearly
/// uniform, which would hide a wrong RoPE, so queries, keys and the other matrices are scaled up, and
/// norm gains moved away from 1 so that a missing or misplaced gain shows.
fn weights(config: &LlamaConfig) -> Params {
    let init = Params::init(config, 42, &Device::Cpu).unwrap();
    let named: HashMap<String, Tensor> = init
        .named()
        .into_iter()
        .map(|(name, t)| {
            let t = if name.ends_with("norm.weight") {
                (t + 0.3).unwrap()
            } else if name.contains("q_proj") || name.contains("k_proj") {
                (t * 12.0).unwrap()
            } else {
                (t * 6.0).unwrap()
            };
            (name, t)
        })
        .collect();
    Params::from_named(config, named, &Device::Cpu).unwrap()
}

fn tokens(rows: usize, len: usize, seed: u64) -> Vec<Vec<u32>> {
    let mut state = seed;
    (0..rows)
        .map(|_| {
            (0..len)
                .map(|_| {
                    state = state.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
                    ((state >> 33) % VOCAB as u64) as u32
                })
                .collect()
        })
        .collect()
}

fn our_logits(model: &Llama, ids: &[Vec<u32>]) -> Vec<f32> {
    let input = Tensor::from_vec(ids.concat(), (ids.len(), ids[0].len()), &Device::Cpu).unwrap();
    model.forward(&input, DType::F32).unwrap().flatten_all().unwrap().to_vec1().unwrap()
}

#[test]
fn transformers_gives_our_logits_for_every_rope_setting() {
    let Some(python) = python() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let (trained, long) = (24, 96);
    let head_dim = 16.0;
    let ntk_base = 10_000f64 * 4f64.powf(head_dim / (head_dim - 2.0));
    let cases = [
        ("plain", config(10_000.0, Scaling::None, true), trained),
        ("untied", config(10_000.0, Scaling::None, false), trained),
        ("ntk", config(ntk_base, Scaling::None, true), long),
        ("linear", config(10_000.0, Scaling::Linear { factor: 4.0 }, true), long),
        ("yarn", config(10_000.0, Scaling::Yarn { factor: 4.0, original_len: trained }, false), long),
    ];
    for (name, config, seq_len) in cases {
        let dir = tmp.path().join(name);
        std::fs::create_dir_all(&dir).unwrap();
        let params = weights(&config);
        let tensors: HashMap<String, Tensor> = params.named().into_iter().collect();
        candle_core::safetensors::save(&tensors, dir.join("model.safetensors")).unwrap();
        let state = TrainState { seq_len, ..TrainState::new(config.clone()) };
        let hf = hf_config(&state, None);
        std::fs::write(dir.join("config.json"), serde_json::to_vec_pretty(&hf).unwrap()).unwrap();

        let model = Llama::new(config.clone(), params, seq_len, &Device::Cpu).unwrap();
        let ids = tokens(2, seq_len, 7);
        let ours = our_logits(&model, &ids);
        let theirs = transformers_logits(&python, &dir, &ids);
        let diff = relative_difference(&ours, &theirs);
        eprintln!("{name}: largest logit difference {diff:.2e} of the largest logit");
        assert!(diff < 1e-4, "{name}: transformers' logits differ from ours by {diff:.2e} of the largest logit");

        // The check can fail: the same weights under plain RoPE give clearly different logits at
        // these positions, so a scaling that `transformers` ignored or misread would not pass.
        if seq_len == long {
            let plain = self::config(10_000.0, Scaling::None, config.tie_embeddings);
            let baseline = Llama::new(plain.clone(), weights(&plain), seq_len, &Device::Cpu).unwrap();
            let gap = relative_difference(&our_logits(&baseline, &ids), &ours);
            assert!(gap > 1e-2, "{name}: plain RoPE gives nearly the same logits ({gap:.2e})");
        }
    }
}
