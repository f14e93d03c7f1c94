//! Eval measurements checked against independent computations, passkey retrieval on a model trained
//! for it, and the long-context and eval stages end to end through the `pretrain-worker` binary.

use std::path::Path;
use std::process::Command;

mod common;

use candle_core::{DType, Device, Tensor};
use pretrain_crd::contract::exit;
use pretrain_crd::spec::Probe;
use pretrain_worker::eval::stage::{HeldOutDoc, perplexity, run_task};
use pretrain_worker::eval::tasks;
use pretrain_worker::eval::{Scorer, encode_request, passkey, probe_logprobs};
use pretrain_worker::model::rope::ntk_base;
use pretrain_worker::model::{Llama, LlamaConfig, Params, Scaling};
use pretrain_worker::tokenize::train::train_bpe;
use pretrain_worker::tokenizer::Encoder;
use pretrain_worker::train::optim::{AdamW, AdamWConfig};

fn config(vocab: usize) -> LlamaConfig {
    LlamaConfig {
        vocab_size: vocab,
        dim: 64,
        layers: 2,
        heads: 4,
        kv_heads: 2,
        ffn_dim: 128,
        rope_base: 10_000.0,
        norm_eps: 1e-5,
        tie_embeddings: true,
        rope_scaling: Scaling::None,
    }
}

/// Log-softmax of one row, in f64.
fn log_softmax(row: &[f32]) -> Vec<f64> {
    let m = row.iter().fold(f32::MIN, |a, &b| a.max(b)) as f64;
    let z = row.iter().map(|&v| (v as f64 - m).exp()).sum::<f64>().ln();
    row.iter().map(|&v| v as f64 - m - z).collect()
}

/// Sum of next-token log-probabilities of `seq[1..]` by one plain forward pass.
fn direct_logprob(model: &Llama, seq: &[u32], from: usize) -> f64 {
    let ids = Tensor::new(&seq[..seq.len() - 1], &Device::Cpu).unwrap().unsqueeze(0).unwrap();
    let logits = model.forward(&ids, DType::F32).unwrap().get(0).unwrap().to_vec2::<f32>().unwrap();
    (from..seq.len()).map(|p| log_softmax(&logits[p - 1])[seq[p] as usize]).sum()
}

/// The log-probability of each next token of `seq` (`seq[1..]`), by one plain forward pass.
fn position_logprobs(model: &Llama, seq: &[u32]) -> Vec<f64> {
    let ids = Tensor::new(&seq[..seq.len() - 1], &Device::Cpu).unwrap().unsqueeze(0).unwrap();
    let logits = model.forward(&ids, DType::F32).unwrap().get(0).unwrap().to_vec2::<f32>().unwrap();
    logits.iter().zip(&seq[1..]).map(|(row, &t)| log_softmax(row)[t as usize]).collect()
}

#[test]
fn perplexity_is_exp_of_the_mean_nll_computed_independently() {
    let dev = Device::Cpu;
    let c = config(40);
    let model = Llama::new(c.clone(), Params::init(&c, 4, &dev).unwrap(), 16, &dev).unwrap();
    let doc = |category: &str, n: usize, k: u32| HeldOutDoc {
        category: category.into(),
        text: "x".repeat(n * 3),
        tokens: (0..n as u32).map(|i| 2 + (i * k) % 37).chain([1]).collect(),
    };
    let docs = vec![doc("web", 20, 3), doc("code", 7, 5), doc("web", 30, 7)];
    let scorer = Scorer::new(&model, DType::F32);
    let got = perplexity(&scorer, &docs, 1, 16).unwrap();

    // Independently: each category's stream after a separator, in windows of 16 predictions.
    let mut total = (0.0, 0u64, 0u64);
    for category in ["code", "web"] {
        let mut stream = vec![1u32];
        let mut bytes = 0;
        for d in docs.iter().filter(|d| d.category == category) {
            stream.extend(&d.tokens);
            bytes += d.text.len() as u64;
        }
        let (mut nll, mut text_nll) = (0.0, 0.0);
        let mut start = 0;
        while start + 1 < stream.len() {
            let end = (start + 17).min(stream.len());
            for (p, lp) in (start + 1..end).zip(position_logprobs(&model, &stream[start..end])) {
                nll -= lp;
                // Bits per byte leave out the end-of-sequence predictions: they have no bytes.
                if stream[p] != 1 {
                    text_nll -= lp;
                }
            }
            start += 16;
        }
        let n = stream.len() as u64 - 1;
        let p = &got[category];
        assert_eq!((p.tokens, p.bytes), (n, bytes));
        assert!((p.perplexity - (nll / n as f64).exp()).abs() < 1e-6 * p.perplexity, "{category}");
        let bpb = text_nll / std::f64::consts::LN_2 / bytes as f64;
        assert!((p.bits_per_byte - bpb).abs() < 1e-6 * bpb);
        total = (total.0 + nll, total.1 + n, total.2 + bytes);
    }
    let all = &got["all"];
    assert_eq!((all.tokens, all.bytes, all.documents), (total.1, total.2, 3));
    assert!((all.perplexity - (total.0 / total.1 as f64).exp()).abs() < 1e-6 * all.perplexity);
}

fn tokenizer(texts: &[String], vocab: u32) -> Encoder {
    let specials: Vec<String> = ["<|bos|>", "<|eos|>", "<|pad|>"].map(String::from).to_vec();
    Encoder::from_json(&train_bpe(texts, vocab, &specials).unwrap().json).unwrap()
}

/// A tokenizer trained on texts of the words `word0` to `word39`, and its separator.
fn word_tokenizer() -> (Encoder, u32) {
    let texts = common::words(3, 3000, |s| format!("word{}", s % 40));
    let texts: Vec<String> = texts.chunks(50).map(|c| c.join(" ")).collect();
    let enc = tokenizer(&texts, 280);
    let sep = enc.special("<|eos|>").unwrap();
    (enc, sep)
}

#[test]
fn probe_logprobs_match_a_direct_forward_pass() {
    let (enc, sep) = word_tokenizer();
    let dev = Device::Cpu;
    let c = config(enc.vocab_size() as usize);
    let model = Llama::new(c.clone(), Params::init(&c, 8, &dev).unwrap(), 64, &dev).unwrap();
    let probes = vec![
        Probe { name: "a".into(), prompt: "word1 word2".into(), target: " word3 word4".into() },
        Probe { name: "b".into(), prompt: "word39".into(), target: " word7".into() },
    ];
    let got = probe_logprobs(&Scorer::new(&model, DType::F32), &enc, sep, &probes).unwrap();
    for (p, lp) in probes.iter().zip(got) {
        let prompt = enc.encode(&p.prompt).unwrap();
        let target = enc.encode(&p.target).unwrap();
        let seq: Vec<u32> = [sep].iter().chain(&prompt).chain(&target).copied().collect();
        let want = direct_logprob(&model, &seq, 1 + prompt.len());
        assert!((lp - want).abs() < 1e-4, "{}: {lp} vs {want}", p.name);
        assert!(lp < 0.0);
    }
}

#[test]
fn a_context_s_trailing_space_moves_into_the_continuation_as_lm_eval_moves_it() {
    let (enc, sep) = word_tokenizer();
    let apart = encode_request(&enc, sep, "word1 word2", " word3").unwrap();
    assert_eq!(encode_request(&enc, sep, "word1 word2 ", "word3").unwrap(), apart);
    assert_eq!(apart.context, [vec![sep], enc.encode("word1 word2").unwrap()].concat());
    assert_eq!(apart.continuation, enc.encode(" word3").unwrap(), "the tokens training saw after the context");
}

/// The built-in last-word task scored as lm-evaluation-harness scores LAMBADA: on a model trained on
/// text in which every word follows from the one before, the target word is its greedy choice.
#[test]
fn last_word_is_the_greedy_choice_of_a_model_trained_on_predictable_text() {
    const WORDS: [&str; 12] =
        ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india", "juliet", "kilo", "lima"];
    // Documents that run through the words in a cycle, from a different word each.
    let docs: Vec<String> = (0..40)
        .map(|d| (0..80).map(|i| WORDS[(d * 5 + i) % WORDS.len()]).collect::<Vec<_>>().join(" ") + ".")
        .collect();
    let enc = tokenizer(&docs, 300);
    let sep = enc.special("<|eos|>").unwrap();
    let mut stream = Vec::new();
    for d in &docs[..30] {
        stream.extend(enc.encode(d).unwrap());
        stream.push(sep);
    }
    let dev = Device::Cpu;
    let c = config(enc.vocab_size() as usize);
    let model = Llama::new(c.clone(), Params::init(&c, 3, &dev).unwrap(), 32, &dev).unwrap();
    let mut opt =
        AdamW::new(AdamWConfig { weight_decay: 0.0, ..AdamWConfig::from_spec(&Default::default()) }, &model.params)
            .unwrap();
    // Trained at every position it is scored at: scoring cuts contexts to the model's 32.
    let (batch, t) = (8, 32);
    for step in 0..200 {
        let rows: Vec<u32> = (0..batch)
            .flat_map(|b| {
                let at = (step * 97 + b * 331) % (stream.len() - t - 1);
                stream[at..at + t + 1].to_vec()
            })
            .collect();
        let all = Tensor::from_vec(rows, (batch, t + 1), &dev).unwrap();
        let (inputs, targets) = (all.narrow(1, 0, t).unwrap(), all.narrow(1, 1, t).unwrap());
        let (loss, _) = model.loss(&inputs.contiguous().unwrap(), &targets.contiguous().unwrap(), DType::F32).unwrap();
        let grads = loss.backward().unwrap();
        let g: Vec<Tensor> = model.params.iter().map(|(_, _, v)| grads.get(v.as_tensor()).unwrap().clone()).collect();
        opt.step(&model.params, &g, 1e-2).unwrap();
    }
    // Held-out documents (not trained on).
    let held_out: Vec<&str> = docs[30..].iter().map(String::as_str).collect();
    let task = tasks::last_word(&held_out, 50, 7);
    assert!(task.items.len() >= 30, "{} items", task.items.len());
    let scored = run_task(&Scorer::new(&model, DType::F32), &enc, sep, &task).unwrap();
    eprintln!("trained: {scored:?}");
    assert!(scored.score >= 0.9, "{scored:?}");
    assert!(scored.perplexity.unwrap() < 1.5, "{scored:?}");
    let untrained = Llama::new(c.clone(), Params::init(&c, 3, &dev).unwrap(), 32, &dev).unwrap();
    let before = run_task(&Scorer::new(&untrained, DType::F32), &enc, sep, &task).unwrap();
    assert!(before.score < 0.2 && before.perplexity.unwrap() > 10.0, "{before:?}");
}

/// A tokenizer that knows the passkey prompt's words, its separator, and 4,000 keys.
fn passkey_tokenizer() -> (Encoder, u32, Vec<String>) {
    let keys = common::words(5, 4000, |s| (10_000 + s % 90_000).to_string());
    let sample: Vec<String> = keys
        .chunks(40)
        .map(|k| {
            k.iter()
                .map(|k| format!("The grass is green. The pass key is {k}. Remember it. {k} is the pass key. There and back again. There is important info hidden inside a lot of irrelevant text. Find it and memorize it. I will quiz you about the important info there. What is the pass key? The pass key is {k}. The sky is blue. The sun is yellow. Here we go."))
                .collect::<String>()
        })
        .collect();
    let enc = tokenizer(&sample, 400);
    let sep = enc.special("<|eos|>").unwrap();
    (enc, sep, keys)
}

/// Passkey prompts of `length` tokens followed by their key, each with a mask of the positions
/// whose next token repeats the key (every occurrence but the first): the loss is taken there only,
/// so every step teaches retrieval.
fn passkey_examples(enc: &Encoder, sep: u32, keys: &[String], length: usize) -> Vec<(Vec<u32>, Vec<f32>)> {
    keys.iter()
        .enumerate()
        .map(|(i, k)| {
            let (mut ids, answer) =
                passkey::prompt(enc, sep, length, k.parse().unwrap(), (i % 11) as f64 / 10.0).unwrap();
            ids.extend(&answer);
            let mut mask = vec![0f32; ids.len()];
            let starts: Vec<usize> =
                (0..=ids.len() - answer.len()).filter(|&p| ids[p..].starts_with(&answer)).collect();
            assert!(starts.len() >= 2, "the key occurs in the needle and the answer");
            for &p in &starts[1..] {
                // Target position p + j is predicted at input position p + j - 1.
                mask[p - 1..p - 1 + answer.len()].fill(1.0);
            }
            (ids, mask)
        })
        .collect()
}

/// `steps` AdamW steps of 16 examples on the masked retrieval loss, at `lr` after 20 warmup steps.
fn train_passkey(model: &Llama, examples: &[(Vec<u32>, Vec<f32>)], steps: usize, lr: f64) {
    let t = examples.iter().map(|e| e.0.len()).min().unwrap();
    let dev = Device::Cpu;
    let mut opt =
        AdamW::new(AdamWConfig { weight_decay: 0.0, ..AdamWConfig::from_spec(&Default::default()) }, &model.params)
            .unwrap();
    let batch = 16;
    for step in 0..steps {
        let (mut rows, mut masks) = (Vec::new(), Vec::new());
        for b in 0..batch {
            let (ids, mask) = &examples[(step * batch + b) % examples.len()];
            rows.extend_from_slice(&ids[ids.len() - t..]);
            masks.extend_from_slice(&mask[ids.len() - t..ids.len() - 1]);
        }
        let all = Tensor::from_vec(rows, (batch, t), &dev).unwrap();
        let mask = Tensor::from_vec(masks, (batch, t - 1), &dev).unwrap();
        let (inputs, targets) = (all.narrow(1, 0, t - 1).unwrap(), all.narrow(1, 1, t - 1).unwrap());
        let logp = candle_nn::ops::log_softmax(&model.forward(&inputs, DType::F32).unwrap(), 2).unwrap();
        let picked = logp.gather(&targets.contiguous().unwrap().unsqueeze(2).unwrap(), 2).unwrap().squeeze(2).unwrap();
        let count = f64::from(mask.sum_all().unwrap().to_scalar::<f32>().unwrap());
        let loss = ((picked * &mask).unwrap().sum_all().unwrap() / -count).unwrap();
        let grads = loss.backward().unwrap();
        let g: Vec<Tensor> = model.params.iter().map(|(_, _, v)| grads.get(v.as_tensor()).unwrap().clone()).collect();
        opt.step(&model.params, &g, lr * ((step + 1) as f64 / 20.0).min(1.0)).unwrap();
    }
}

/// Keys are uniform over 90,000 values and no key's tokens are a prefix of another's, so without
/// reading the key from the context no model does better on average than log(1/90,000) (Gibbs'
/// inequality). Beating that by 2 nats (7x) means the model retrieves (part of) the key.
fn passkey_chance() -> f64 {
    -(90_000f64).ln()
}

/// The passkey model of these tests: 2 layers of 96 (heads of 24).
fn passkey_config(vocab: u32) -> LlamaConfig {
    LlamaConfig { dim: 96, ffn_dim: 192, ..config(vocab as usize) }
}

/// Passkey retrieval is measured two ways: exact answers, and the log-probability of the key. The
/// model here learns to copy the key (most greedy answers start with it) but, trained on nothing
/// after the key, runs on with more digits, so it answers no trial exactly; the test checks the
/// log-probability against the bound no model can beat without reading the key.
///
/// About a minute in release mode, far longer in debug builds, so CI leaves it out; run it with
/// `cargo test --release -p pretrain-worker --test eval -- --ignored`.
#[test]
#[ignore = "trains a model for a minute; run with --release -- --ignored"]
fn passkey_retrieval_beats_chance_on_a_model_trained_for_it() {
    const LENGTH: usize = 96;
    let (enc, sep, keys) = passkey_tokenizer();
    let dev = Device::Cpu;
    let c = passkey_config(enc.vocab_size());
    let model = Llama::new(c.clone(), Params::init(&c, 2, &dev).unwrap(), LENGTH, &dev).unwrap();
    train_passkey(&model, &passkey_examples(&enc, sep, &keys, LENGTH), 500, 3e-3);
    let scorer = Scorer::new(&model, DType::F32);
    let result = passkey::run(&scorer, &enc, sep, LENGTH, 10, 99).unwrap();
    let untrained = Llama::new(c.clone(), Params::init(&c, 2, &dev).unwrap(), LENGTH, &dev).unwrap();
    let before = passkey::run(&Scorer::new(&untrained, DType::F32), &enc, sep, LENGTH, 10, 99).unwrap();
    eprintln!("trained: {result:?}\nuntrained: {before:?}");
    assert!(result.key_logprob > passkey_chance() + 2.0, "{result:?} vs chance {}", passkey_chance());
    assert!(before.key_logprob < passkey_chance(), "{before:?}");
}

/// The long-context recipe on that model: trained for retrieval at 96 tokens, it is at chance at
/// NEW tokens, where the needle is farther back than any distance it saw; with RoPE rescaled by
/// NTK (as `longContext.rope` does) and a short continuation at the new length, it retrieves there.
///
/// Minutes in release mode; run it with `cargo test --release -p pretrain-worker --test eval --
/// --ignored`.
#[test]
#[ignore = "trains a model for minutes; run with --release -- --ignored"]
fn long_context_extension_makes_passkey_work_at_the_new_length() {
    const BASE: usize = 96;
    const NEW: usize = 384;
    let (enc, sep, keys) = passkey_tokenizer();
    let dev = Device::Cpu;
    let c = passkey_config(enc.vocab_size());
    let base = Llama::new(c.clone(), Params::init(&c, 2, &dev).unwrap(), NEW, &dev).unwrap();
    train_passkey(&base, &passkey_examples(&enc, sep, &keys, BASE), 500, 3e-3);
    let at_base = passkey::run(&Scorer::new(&base, DType::F32), &enc, sep, BASE, 10, 99).unwrap();
    let base_at_new = passkey::run(&Scorer::new(&base, DType::F32), &enc, sep, NEW, 10, 99).unwrap();

    let factor = NEW as f64 / BASE as f64;
    let long = LlamaConfig { rope_base: ntk_base(c.rope_base, factor, c.dim / c.heads), ..c };
    let copied = base.params.named().into_iter().map(|(n, t)| (n, t.copy().unwrap())).collect();
    let extended = Llama::new(long.clone(), Params::from_named(&long, copied, &dev).unwrap(), NEW, &dev).unwrap();
    train_passkey(&extended, &passkey_examples(&enc, sep, &keys[..1000], NEW), 150, 1e-3);
    let extended_at_new = passkey::run(&Scorer::new(&extended, DType::F32), &enc, sep, NEW, 10, 99).unwrap();
    eprintln!("base at {BASE}: {at_base:?}\nbase at {NEW}: {base_at_new:?}\nextended at {NEW}: {extended_at_new:?}");
    let chance = passkey_chance();
    assert!(at_base.key_logprob > chance + 2.0, "the base retrieves at its own length: {at_base:?}");
    assert!(base_at_new.key_logprob < chance + 0.5, "the base at {NEW} is at chance: {base_at_new:?}");
    assert!(extended_at_new.key_logprob > chance + 2.0, "extended at {NEW}: {extended_at_new:?} vs chance {chance}");
}

fn worker(stage: &str, spec: &Path) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_pretrain-worker"));
    cmd.arg(stage).arg("--spec").arg(spec);
    cmd
}

fn run_ok(stage: &str, spec: &Path) -> String {
    let out = worker(stage, spec).output().unwrap();
    assert!(out.status.success(), "{stage}: {}\n{}", out.status, String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn json(path: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))).unwrap()
}

#[test]
#[expect(clippy::too_many_lines, reason = "one end-to-end scenario, read top to bottom")]
fn long_context_continues_from_train_and_eval_reports_both() {
    let dir = tempfile::tempdir().unwrap();
    const SYLLABLES: [&str; 10] = ["ka", "lo", "mi", "ne", "ru", "sa", "to", "vi", "ze", "po"];
    let words = |seed: u64, n: usize| {
        common::words(seed, n, |s| format!("{}{}", SYLLABLES[(s % 10) as usize], SYLLABLES[(s / 10 % 5) as usize]))
            .join(" ")
    };
    // Documents of 4 to 23 sentences of 5 to 12 words.
    let docs: Vec<String> = (0..200u64)
        .map(|i| {
            let text: Vec<String> =
                (0..4 + i % 20).map(|k| format!("{}.", words(i * 100 + k, 5 + ((i + k) % 8) as usize))).collect();
            serde_json::json!({"id": format!("d{i}"), "text": text.join(" ")}).to_string()
        })
        .collect();
    std::fs::write(dir.path().join("docs.jsonl"), docs.join("\n")).unwrap();
    std::fs::write(
        dir.path().join("task.jsonl"),
        "{\"context\": \"kalo mika\", \"choices\": [\" neru\", \" saka\"], \"answer\": 0}\n",
    )
    .unwrap();
    let data = format!(
        "    sources: [{{name: web, url: \"{}\"}}]\n    dedup: {{exact: false, minhash: {{enabled: false}}}}\n    heldOutFraction: 0.1\n    shards: 1",
        dir.path().join("docs.jsonl").display()
    );
    let rest = |task: &str| {
        format!(
            r#"  tokenizer: {{vocabSize: 300}}
  model: {{preset: tiny, dim: 64, layers: 2, heads: 4, kvHeads: 2, ffnDim: 128}}
  train:
    seqLen: 32
    tokens: 5120
    globalBatchTokens: 256
    microBatchSize: 4
    optimizer: {{lr: 0.003, minLr: 0.0003}}
    schedule: {{warmupSteps: 3}}
    checkpoint: {{everySteps: 5, keep: 2}}
    resources: {{gpusPerNode: 0}}
  longContext: {{seqLen: 128, rope: {{scaling: ntk}}, tokensFraction: 0.25}}
  eval:
    probes: [{{name: kalo, prompt: "kalo", target: " mika"}}]
    benchmarks: [{{name: mine, url: "{task}", format: cloze}}]
    passkey: {{lengths: [400], trials: 2}}"#
        )
    };
    let task = dir.path().join("task.jsonl");
    let spec = common::write_manifest(dir.path(), "lc", 3, &data, &rest(&task.display().to_string()));
    for stage in ["data-prep", "tokenize", "train"] {
        run_ok(stage, &spec);
    }
    let out = run_ok("long-context", &spec);
    assert!(out.contains("long-context: starting from the weights of"), "{out}");
    let store = dir.path().join("store/lc");
    let train = json(&store.join("train/_SUCCESS.json"));
    let lc = json(&store.join("long-context/_SUCCESS.json"));
    // 25% of 5,120 tokens in steps of two 128-token sequences: 5 steps.
    assert_eq!(lc["stats"]["steps"], 5);
    assert_eq!(lc["stats"]["seqLen"], 128);
    let want = ntk_base(10_000.0, 4.0, 16);
    assert!((lc["stats"]["ropeBase"].as_f64().unwrap() - want).abs() < 1e-6, "{}", lc["stats"]["ropeBase"]);
    // It continued from train's weights: its first loss is near train's last, far below ln(vocab).
    let first_lc: serde_json::Value = serde_json::from_str(
        std::fs::read_to_string(store.join("long-context/metrics.jsonl")).unwrap().lines().next().unwrap(),
    )
    .unwrap();
    let train_final = train["stats"]["finalLoss"].as_f64().unwrap();
    assert!(first_lc["loss"].as_f64().unwrap() < train_final + 0.5, "{first_lc} vs {train_final}");
    // Resuming works as in train: with the commit removed, the stage resumes from its last checkpoint.
    std::fs::remove_file(store.join("long-context/_SUCCESS.json")).unwrap();
    let out = run_ok("long-context", &spec);
    assert!(out.contains("long-context: resuming from step-000000005 (step 5 of 5)"), "{out}");
    let again = json(&store.join("long-context/_SUCCESS.json"));
    let model_sha = |c: &serde_json::Value| {
        c["files"]
            .as_array()
            .unwrap()
            .iter()
            .find(|f| f["path"].as_str().unwrap().ends_with("model.safetensors"))
            .unwrap()["sha256"]
            .clone()
    };
    assert_eq!(model_sha(&again), model_sha(&lc));
    // Probes were recorded at train's checkpoints: every 5 of its 15 steps (75% of the 5,120 tokens).
    let metrics = std::fs::read_to_string(store.join("train/metrics.jsonl")).unwrap();
    assert_eq!(metrics.lines().filter(|l| l.contains("\"probes\"")).count(), 3, "{metrics}");

    let out = run_ok("eval", &spec);
    assert!(out.contains("## base vs long-context"), "{out}");
    let report = json(&store.join("eval/eval.json"));
    let checkpoints = report["checkpoints"].as_array().unwrap();
    assert_eq!(checkpoints.len(), 2);
    assert_eq!(checkpoints[0]["label"], "base");
    assert_eq!(checkpoints[1]["label"], "long-context");
    for c in checkpoints {
        let all = &c["perplexity"]["all"];
        assert!(all["tokens"].as_u64().unwrap() > 100);
        let (loss, ppl) = (all["loss"].as_f64().unwrap(), all["perplexity"].as_f64().unwrap());
        assert!((ppl - loss.exp()).abs() < 1e-9 * ppl);
        assert!(all["unigramLoss"].as_f64().unwrap() > 0.0, "{all}");
        assert_eq!(c["benchmarks"]["mine"]["items"], 1);
        assert!(c["benchmarks"]["heldout-next-sentence"]["items"].as_u64().unwrap() > 0, "{c}");
        assert_eq!(c["passkey"][0]["length"], 400);
        assert!(c["probes"]["kalo"].as_f64().unwrap() < 0.0);
    }
    // Train's three checkpoints with probes, and long-context's one.
    assert_eq!(report["probeHistory"].as_array().unwrap().len(), 4, "{report}");
    let md = std::fs::read_to_string(store.join("eval/report.md")).unwrap();
    assert!(md.contains("## Probes across checkpoints"), "{md}");
    assert!(md.contains("| passkey at 400 tokens |"), "{md}");
    assert!(md.contains("| held-out loss in 400-token windows |"), "{md}");
    for c in checkpoints {
        assert_eq!(c["lossByLength"][0]["length"], 400, "{c}");
        assert!(c["lossByLength"][0]["loss"].as_f64().unwrap() > 0.0, "{c}");
    }

    // One checkpoint on demand, written beside the committed report.
    // (20 steps, a checkpoint every 5, two kept: 15 and 20.)
    let out = worker("eval", &spec).args(["--checkpoint", "train/15"]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let one = json(&store.join("eval/checkpoints/train-step-000000015/eval.json"));
    assert_eq!(one["checkpoints"][0]["step"], 15);
    let out = worker("eval", &spec).args(["--checkpoint", "train/5"]).output().unwrap();
    assert_eq!(out.status.code(), Some(exit::INVALID), "{}", String::from_utf8_lossy(&out.stderr));

    // A malformed task file fails with its file and line.
    std::fs::write(
        dir.path().join("bad.jsonl"),
        "{\"context\": \"a\", \"choices\": [\" b\", \" c\"], \"answer\": 0}\n{\"context\": \"a\"}\n",
    )
    .unwrap();
    let bad = dir.path().join("bad.jsonl");
    let spec = common::write_manifest(dir.path(), "lc", 3, &data, &rest(&bad.display().to_string()));
    let out = worker("eval", &spec).output().unwrap();
    assert_eq!(out.status.code(), Some(exit::INVALID));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("bad.jsonl:2: missing field `choices`"), "{stderr}");
}
