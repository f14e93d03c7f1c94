//! Helpers for the end-to-end tests in `tests/`: the project's binaries, built on demand.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// The directory holding this profile's binaries (`target/debug`).
pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    // target/debug/deps/<test> -> target/debug
    exe.parent().and_then(|deps| deps.parent()).expect("target/<profile>").to_path_buf()
}

/// Path of a workspace binary (`pretrain`, `pretrain-worker`), building both once per test process
/// so the tests never run stale binaries.
pub fn bin(name: &str) -> PathBuf {
    static BUILT: OnceLock<()> = OnceLock::new();
    BUILT.get_or_init(|| {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let status = Command::new(cargo)
            .args(["build", "--quiet", "-p", "pretrain-operator", "-p", "pretrain-worker", "--bins"])
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .status()
            .expect("cargo runs");
        assert!(status.success(), "building the binaries failed");
    });
    bin_dir().join(format!("{name}{}", std::env::consts::EXE_SUFFIX))
}

/// The repository root.
pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

const SYLLABLES: [&str; 10] = ["ka", "lo", "mi", "ne", "ru", "sa", "to", "vi", "ze", "po"];

/// Prose-like documents of made-up two-syllable words, deterministic in `i`.
pub fn document(i: u64) -> String {
    let mut state = i.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut word = || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        format!("{}{}", SYLLABLES[(state % 10) as usize], SYLLABLES[(state / 10 % 4) as usize])
    };
    (0..4 + i % 12)
        .map(|k| {
            let words: Vec<String> = (0..5 + (i + k) % 7).map(|_| word()).collect();
            format!("{}.", words.join(" "))
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// A run named `name` with its store in `dir/store`, over 300 generated documents.
pub fn manifest(dir: &Path, name: &str, train_tokens: u64) -> PathBuf {
    let lines: Vec<String> =
        (0..300).map(|i| serde_json::json!({"id": format!("d{i}"), "text": document(i)}).to_string()).collect();
    std::fs::write(dir.join("docs.jsonl"), lines.join("\n")).unwrap();
    let off = "{enabled: false}";
    let text = format!(
        r#"apiVersion: pretrain.dev/v1alpha1
kind: PretrainRun
metadata: {{name: {name}}}
spec:
  storage: {{url: "file://{store}"}}
  data:
    sources: [{{name: web, url: "{docs}"}}]
    filters: {{gopherQuality: {off}, gopherRepetition: {off}, c4: {off}, fineweb: {off}, language: {off}}}
    dedup: {{exact: false, minhash: {{enabled: false}}}}
    heldOutFraction: 0.1
    shards: 2
    # The drills train far longer than 300 documents last (to be stopped mid-run): they say so.
    mix: {{maxEpochs: 1000}}
  tokenizer: {{vocabSize: 300}}
  model: {{preset: tiny, dim: 64, layers: 2, heads: 4, kvHeads: 2, ffnDim: 128}}
  train:
    seqLen: 32
    tokens: {train_tokens}
    globalBatchTokens: 256
    microBatchSize: 4
    optimizer: {{lr: 0.003, minLr: 0.0003}}
    schedule: {{warmupSteps: 3}}
    checkpoint: {{everySteps: 5, keep: 2}}
    resources: {{gpusPerNode: 0}}
  longContext: {{seqLen: 64, tokensFraction: 0.25}}
  eval:
    probes: [{{name: kalo, prompt: "kalo", target: " mika"}}]
    passkey: {{lengths: [400], trials: 2}}
"#,
        store = dir.join("store").display(),
        docs = dir.join("docs.jsonl").display(),
    );
    let path = dir.join(format!("{name}.yaml"));
    std::fs::write(&path, text).unwrap();
    path
}

/// The sha256 of the trained weights a run's train stage committed (`store` is `<store>/<run>`):
/// of every tensor, by name, with its dtype, shape and bytes, so that a checkpoint saved whole by one
/// process and one saved in shards by a gang compare equal when their weights are.
pub fn model_sha(store: &Path) -> String {
    use sha2::{Digest, Sha256};
    let commit: serde_json::Value =
        serde_json::from_slice(&std::fs::read(store.join("train/_SUCCESS.json")).unwrap()).unwrap();
    let files: Vec<Vec<u8>> = commit["files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["path"].as_str().unwrap())
        .filter(|p| pretrain_store::artifact::is_file_of(p.rsplit('/').next().unwrap_or_default(), "model"))
        .map(|p| std::fs::read(store.join("train").join(p)).unwrap())
        .collect();
    assert!(!files.is_empty(), "{}: the train stage committed no weights", store.display());
    let mut tensors: Vec<(String, String, Vec<usize>, Vec<u8>)> = Vec::new();
    for bytes in &files {
        let file = safetensors::SafeTensors::deserialize(bytes).unwrap();
        for (name, t) in file.tensors() {
            tensors.push((name, format!("{:?}", t.dtype()), t.shape().to_vec(), t.data().to_vec()));
        }
    }
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    let mut hasher = Sha256::new();
    for (name, dtype, shape, data) in &tensors {
        hasher.update(format!("{name} {dtype} {shape:?} {}\n", data.len()));
        hasher.update(data);
    }
    hex::encode(hasher.finalize())
}

/// Ids of the processes whose command line contains `needle` (this test process excluded).
pub fn processes_mentioning(needle: &str) -> Vec<u32> {
    let me = std::process::id();
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok().map(|pid| (pid, e.path())))
        .filter(|(pid, path)| {
            *pid != me
                && std::fs::read(path.join("cmdline")).is_ok_and(|c| String::from_utf8_lossy(&c).contains(needle))
        })
        .map(|(pid, _)| pid)
        .collect()
}

/// The Python interpreter the reference checks run (`PRETRAIN_PYTHON`, default `python3`), or
/// `None` when `PRETRAIN_SKIP_PYTHON` is set.
pub fn python() -> Option<String> {
    if std::env::var_os("PRETRAIN_SKIP_PYTHON").is_some() {
        eprintln!("PRETRAIN_SKIP_PYTHON is set: the transformers check is skipped");
        return None;
    }
    Some(std::env::var("PRETRAIN_PYTHON").unwrap_or_else(|_| "python3".into()))
}

/// Logits `transformers`' `LlamaForCausalLM` gives for `ids` (rows of equal length) from the
/// Hugging Face directory `dir` (`scripts/check_export.py`), flattened.
pub fn transformers_logits(python: &str, dir: &Path, ids: &[Vec<u32>]) -> Vec<f32> {
    let input = dir.join("ids.json");
    std::fs::write(&input, serde_json::json!({ "ids": ids }).to_string()).unwrap();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/check_export.py");
    let out = std::process::Command::new(python)
        .arg(&script)
        .arg(dir)
        .arg(&input)
        .output()
        .unwrap_or_else(|e| panic!("{python} does not run ({e}); PRETRAIN_SKIP_PYTHON=1 skips this check"));
    std::fs::remove_file(&input).unwrap();
    assert!(
        out.status.success(),
        "{} failed (needs torch and transformers: PRETRAIN_PYTHON=$(scripts/python-env.sh); PRETRAIN_SKIP_PYTHON=1 skips this check): {}",
        script.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    let value: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    value["logits"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap() as f32).collect()
}

/// The largest difference between two logit arrays, relative to the largest logit.
pub fn relative_difference(ours: &[f32], theirs: &[f32]) -> f32 {
    assert_eq!(ours.len(), theirs.len(), "logit counts differ");
    let scale = ours.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-6);
    ours.iter().zip(theirs).fold(0f32, |m, (a, b)| m.max((a - b).abs())) / scale
}
