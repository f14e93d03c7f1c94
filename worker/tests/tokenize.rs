//! The tokenize stage: exact encoding against the `tokenizers` library (Rust and Python), round
//! trips on the shared corpus, token shards that decode to data-prep's documents in order, sharded
//! runs, reuse of a given tokenizer, and clear errors for bad input.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

mod common;

use pretrain_crd::Stage;
use pretrain_store::artifact::DocumentLine;
use pretrain_worker::Context;
use pretrain_worker::frame::{Phase, StageError};
use pretrain_worker::tokenize::stage::{TokenizeError, run};
use pretrain_worker::tokenize::train::{BpeError, train_bpe};
use pretrain_worker::tokenizer::Encoder;
use pretrain_worker::tokens::TokenShard;

fn shared(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/corpus").join(name)
}

fn jsonl_gz(path: &Path, limit: usize) -> Vec<String> {
    let mut text = String::new();
    flate2::read::GzDecoder::new(std::fs::File::open(path).unwrap()).read_to_string(&mut text).unwrap();
    text.lines()
        .take(limit)
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["text"].as_str().unwrap().to_string())
        .collect()
}

/// Texts with what byte-level BPE must not damage: scripts, emoji, combining marks, odd whitespace.
const UNICODE: [&str; 8] = [
    "Съешь же ещё этих мягких французских булок, да выпей чаю.",
    "日本語のテキストと  English  mixed\u{3000}全角スペース",
    "emoji 👩‍👩‍👧 and flags 🇪🇺, combining e\u{301} vs é",
    "tabs\tand\r\nCRLF\u{85}NEL\u{2028}LS  \n\n   trailing   ",
    "كتابة عربية من اليمين إلى اليسار",
    "   leading spaces, 'quotes' it's we'll they'd I'M",
    "numbers 3.14159 1,000,000 ٣٤ ⅷ and $%^&*() {}[]",
    "",
];

/// A tokenizer trained on part of the shared corpus, and the texts to check it on.
fn fixture() -> &'static (String, Vec<String>) {
    static FIXTURE: OnceLock<(String, Vec<String>)> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let mut texts = jsonl_gz(&shared("code-python-stdlib.jsonl.gz"), 40);
        texts.extend(jsonl_gz(&shared("legal-debian.jsonl.gz"), 200));
        texts.extend(UNICODE.iter().map(|s| s.to_string()));
        let specials: Vec<String> = ["<|bos|>", "<|eos|>", "<|pad|>"].map(String::from).to_vec();
        let trained = train_bpe(&texts, 3000, &specials).unwrap();
        (trained.json, texts)
    })
}

#[test]
fn fast_encoder_matches_the_rust_library_and_round_trips() {
    let (json, texts) = fixture();
    let encoder = Encoder::from_json(json).unwrap();
    assert!(encoder.is_fast());
    let library: tokenizers::Tokenizer = json.parse().unwrap();
    let batch = encoder.encode_batch(texts).unwrap();
    let (mut bytes, mut tokens) = (0, 0);
    for (text, ids) in texts.iter().zip(&batch) {
        let expected = library.encode(text.as_str(), false).unwrap().get_ids().to_vec();
        assert_eq!(ids, &expected, "{:?}", &text[..text.len().min(80)]);
        assert_eq!(&encoder.decode(ids).unwrap(), text);
        bytes += text.len();
        tokens += ids.len();
    }
    // A 3,000-token vocabulary on code and licences compresses well past one byte a token.
    assert!(bytes as f64 / tokens as f64 > 2.5, "{bytes} bytes in {tokens} tokens");
}

#[test]
fn python_tokenizers_loads_the_file_and_encodes_identically() {
    let (json, texts) = fixture();
    let tmp = tempfile::tempdir().unwrap();
    let (tokenizer, texts_path) = (tmp.path().join("tokenizer.json"), tmp.path().join("texts.json"));
    std::fs::write(&tokenizer, json).unwrap();
    std::fs::write(&texts_path, serde_json::to_string(texts).unwrap()).unwrap();
    let Some(python) =
        common::python_json::<Vec<Vec<u32>>>("check_tokenizer.py", &[&tokenizer, &texts_path], "tokenizers")
    else {
        return;
    };
    let ours = Encoder::from_json(json).unwrap().encode_batch(texts).unwrap();
    assert_eq!(python.len(), ours.len());
    for (i, (p, o)) in python.iter().zip(&ours).enumerate() {
        assert_eq!(p, o, "text {i}");
    }
}

fn words(seed: u64, n: usize) -> String {
    common::words(seed, n, |state| format!("word{} ünï{}", state % 700, state % 13)).join(" ")
}

/// Two categories of generated documents.
fn corpus(dir: &Path, docs: u64) {
    let line = |id: String, text: String| serde_json::json!({"id": id, "text": text}).to_string();
    let web: Vec<String> = (0..docs).map(|i| line(format!("web-{i}"), words(i, 120))).collect();
    std::fs::write(dir.join("web.jsonl"), web.join("\n")).unwrap();
    let code: Vec<String> =
        (0..docs / 2).map(|i| line(format!("code-{i}"), format!("def f{i}(x):\n    return x * {i}\n"))).collect();
    std::fs::write(dir.join("code.jsonl"), code.join("\n")).unwrap();
}

fn manifest(dir: &Path, name: &str, shards: u32, tokenizer: &str) -> PathBuf {
    let data = format!(
        "    sources:\n      - {{name: web, url: \"{web}\"}}\n      - {{name: code, url: \"{code}\"}}\n    dedup: {{exact: false, minhash: {{enabled: false}}}}\n    heldOutFraction: 0.1\n    shards: {shards}",
        web = dir.join("web.jsonl").display(),
        code = dir.join("code.jsonl").display(),
    );
    let rest = format!(
        "  tokenizer: {tokenizer}\n  model: {{preset: tiny}}\n  train: {{seqLen: 64, tokens: 100000, globalBatchTokens: 1024, microBatchSize: 16, schedule: {{warmupSteps: 1}}, resources: {{gpusPerNode: 0}}}}"
    );
    common::write_manifest(dir, name, 7, &data, &rest)
}

async fn data_prep(manifest: &Path) {
    let ctx = Context::from_env(Stage::DataPrep, manifest.to_str().unwrap()).await.unwrap();
    pretrain_worker::data::stage::run(&ctx, pretrain_worker::frame::Phase::All).await.unwrap();
}

async fn tokenize(manifest: &Path, phase: Phase) -> Result<Option<pretrain_store::StageCommit>, TokenizeError> {
    let ctx = Context::from_env(Stage::Tokenize, manifest.to_str().unwrap()).await.unwrap();
    run(&ctx, phase).await
}

fn read_docs(path: &Path) -> Vec<DocumentLine> {
    let mut text = String::new();
    zstd::Decoder::new(std::fs::File::open(path).unwrap()).unwrap().read_to_string(&mut text).unwrap();
    text.lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

/// Decodes every document of a token shard, checking each ends in the separator.
fn decode_shard(encoder: &Encoder, path: &Path) -> Vec<String> {
    let shard = TokenShard::open(path).unwrap();
    let eos = encoder.special("<|eos|>").unwrap();
    (0..shard.documents())
        .map(|d| {
            let mut ids = Vec::new();
            shard.read(shard.document_range(d), &mut ids);
            assert_eq!(ids.pop(), Some(eos), "document {d} of {} ends in <|eos|>", path.display());
            assert!(!ids.contains(&eos));
            encoder.decode(&ids).unwrap()
        })
        .collect()
}

const TOKENIZER: &str = "{vocabSize: 600, specialTokens: [\"<|user|>\"]}";

#[tokio::test]
async fn token_shards_decode_to_the_data_prep_documents_in_order() {
    let tmp = tempfile::tempdir().unwrap();
    corpus(tmp.path(), 300);
    let m = manifest(tmp.path(), "run", 3, TOKENIZER);
    data_prep(&m).await;
    let commit = tokenize(&m, Phase::All).await.unwrap().expect("the reduce commits");

    let prep = tmp.path().join("store/run/data-prep");
    let stage = tmp.path().join("store/run/tokenize");
    let json = std::fs::read_to_string(stage.join("tokenizer.json")).unwrap();
    let encoder = Encoder::from_json(&json).unwrap();
    assert_eq!(encoder.vocab_size(), 600);
    assert_eq!(encoder.special("<|user|>"), Some(3));
    let mut train_docs = 0;
    for k in 0..3 {
        let expected: Vec<String> =
            read_docs(&prep.join(format!("shards/{k:05}.jsonl.zst"))).into_iter().map(|d| d.text).collect();
        let decoded = decode_shard(&encoder, &stage.join(format!("shards/{k:05}.tok")));
        assert_eq!(decoded, expected, "shard {k}");
        train_docs += expected.len() as u64;
        // Each document's category beside the shard: its index among the sorted categories.
        let categories: Vec<u16> = std::fs::read(stage.join(format!("shards/{k:05}.cat")))
            .unwrap()
            .chunks_exact(2)
            .map(|c| u16::from_le_bytes([c[0], c[1]]))
            .collect();
        let want: Vec<u16> = read_docs(&prep.join(format!("shards/{k:05}.jsonl.zst")))
            .iter()
            .map(|d| u16::from(d.category == "web"))
            .collect();
        assert_eq!(categories, want, "shard {k}: categories (code 0, web 1)");
    }
    // Every held-out file, encoded by the map task of its number.
    for k in 0..3 {
        let heldout: Vec<String> =
            read_docs(&prep.join(format!("heldout/{k:05}.jsonl.zst"))).into_iter().map(|d| d.text).collect();
        assert!(!heldout.is_empty(), "held-out file {k}");
        assert_eq!(decode_shard(&encoder, &stage.join(format!("heldout/{k:05}.tok"))), heldout);
    }

    // The commit: every file, tokens per category and split, the report, the tokenizer's hash.
    let paths: Vec<&str> = commit.files.iter().map(|f| f.path.as_str()).collect();
    assert_eq!(
        paths,
        [
            "heldout/00000.tok",
            "heldout/00001.tok",
            "heldout/00002.tok",
            "shards/00000.cat",
            "shards/00000.tok",
            "shards/00001.cat",
            "shards/00001.tok",
            "shards/00002.cat",
            "shards/00002.tok",
            "tokenizer.json"
        ]
    );
    let stats = &commit.stats;
    let sha = commit.files.iter().find(|f| f.path == "tokenizer.json").unwrap().sha256.clone();
    assert_eq!(stats["tokenizer"]["sha256"], sha.as_str());
    assert_eq!(stats["tokenizer"]["vocabSize"], 600);
    let counted: u64 = stats["documents"]["train"].as_object().unwrap().values().map(|v| v.as_u64().unwrap()).sum();
    assert_eq!(counted, train_docs);
    let shard_tokens: u64 =
        (0..3).map(|k| TokenShard::open(&stage.join(format!("shards/{k:05}.tok"))).unwrap().len()).sum();
    let train_tokens: u64 = stats["tokens"]["train"].as_object().unwrap().values().map(|v| v.as_u64().unwrap()).sum();
    assert_eq!(train_tokens, shard_tokens);
    for category in ["web", "code"] {
        let c = &stats["compression"]["heldout"][category];
        let bpt = c["bytesPerToken"].as_f64().unwrap();
        assert!(bpt > 1.5 && c["charsPerToken"].as_f64().unwrap() <= bpt, "{category}: {c}");
    }

    // Running again finds the commit's work done and produces the same files.
    let again = tokenize(&m, Phase::All).await.unwrap().unwrap();
    assert_eq!(again.files, commit.files);
}

#[tokio::test]
async fn map_tasks_then_reduce_equal_one_process() {
    let tmp = tempfile::tempdir().unwrap();
    corpus(tmp.path(), 120);
    let all = manifest(tmp.path(), "all", 2, TOKENIZER);
    let split = manifest(tmp.path(), "split", 2, TOKENIZER);
    data_prep(&all).await;
    data_prep(&split).await;
    let one = tokenize(&all, Phase::All).await.unwrap().unwrap();

    let err = tokenize(&split, Phase::Reduce).await.unwrap_err();
    assert!(err.to_string().contains("map tasks [0, 1] of 2 have not finished"), "{err}");
    assert!(tokenize(&split, Phase::Map(1)).await.unwrap().is_none());
    assert!(tokenize(&split, Phase::Map(0)).await.unwrap().is_none());
    let err = StageError::from(tokenize(&split, Phase::Map(2)).await.unwrap_err());
    assert!(err.is_permanent() && err.to_string().contains("map task 2 does not exist"), "{err}");
    let two = tokenize(&split, Phase::Reduce).await.unwrap().unwrap();
    assert_eq!(one.files, two.files, "same tokenizer and shards, byte for byte");
}

#[tokio::test]
async fn reuses_a_given_tokenizer_and_refuses_one_without_a_separator() {
    let tmp = tempfile::tempdir().unwrap();
    corpus(tmp.path(), 120);
    let trained = manifest(tmp.path(), "trained", 1, TOKENIZER);
    data_prep(&trained).await;
    let first = tokenize(&trained, Phase::All).await.unwrap().unwrap();
    let path = tmp.path().join("store/trained/tokenize/tokenizer.json");

    let reused = manifest(tmp.path(), "reused", 1, &format!("{{url: \"{}\"}}", path.display()));
    data_prep(&reused).await;
    let second = tokenize(&reused, Phase::All).await.unwrap().unwrap();
    assert_eq!(second.stats["tokenizer"]["trained"], serde_json::Value::Null);
    assert_eq!(first.files, second.files);

    let json = std::fs::read_to_string(&path).unwrap().replace("<|eos|>", "<|end|>");
    let bad = tmp.path().join("no-eos.json");
    std::fs::write(&bad, json).unwrap();
    let refused = manifest(tmp.path(), "refused", 1, &format!("{{url: \"{}\"}}", bad.display()));
    data_prep(&refused).await;
    let err = StageError::from(tokenize(&refused, Phase::All).await.unwrap_err());
    assert!(err.is_permanent(), "{err}");
    assert!(err.to_string().contains("no-eos.json") && err.to_string().contains("end-of-sequence"), "{err}");
}

#[tokio::test]
async fn tiny_corpora_and_missing_data_prep_are_clear_errors() {
    let tmp = tempfile::tempdir().unwrap();
    corpus(tmp.path(), 4);
    let m = manifest(tmp.path(), "tiny", 1, "{vocabSize: 32000}");
    let err = tokenize(&m, Phase::All).await.unwrap_err();
    assert!(err.to_string().contains("data-prep has not committed"), "{err}");

    data_prep(&m).await;
    let err = tokenize(&m, Phase::All).await.unwrap_err();
    assert!(matches!(err, TokenizeError::Train(BpeError::TooSmall { vocab_size: 32000, .. })), "{err}");
    assert!(err.to_string().contains("tokenizer.vocabSize is too large"), "{err}");
    assert!(StageError::from(err).is_permanent());
}
