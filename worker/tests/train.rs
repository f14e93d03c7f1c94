//! The train stage end to end through the `pretrain-worker` binary: a run killed with SIGKILL and
//! resumed ends with bitwise the same weights as an uninterrupted one; SIGTERM checkpoints and exits
//! with the resume code; held-out loss falls; torn or corrupted checkpoints are never loaded; a
//! checkpoint of another model shape is refused.

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

mod common;

use candle_core::{Device, Tensor};
use pretrain_crd::Stage;
use pretrain_crd::contract::exit;
use pretrain_worker::Context;
use pretrain_worker::checkpoint::{self, Snapshot, TrainState};
use pretrain_worker::model::LlamaConfig;

fn words(seed: u64, n: usize) -> String {
    common::words(seed, n, |state| format!("w{}", state % 50)).join(" ")
}

const STEPS: u64 = 30;

fn manifest(dir: &Path, name: &str, model: &str) -> PathBuf {
    let docs: Vec<String> =
        (0..200).map(|i| serde_json::json!({"id": format!("d{i}"), "text": words(i, 60)}).to_string()).collect();
    std::fs::write(dir.join("docs.jsonl"), docs.join("\n")).unwrap();
    let data = format!(
        "    sources: [{{name: web, url: \"{docs}\"}}]\n    dedup: {{exact: false, minhash: {{enabled: false}}}}\n    heldOutFraction: 0.1\n    shards: 2",
        docs = dir.join("docs.jsonl").display()
    );
    let rest = format!(
        r#"  tokenizer: {{vocabSize: 300}}
  model: {model}
  train:
    seqLen: 32
    tokens: {tokens}
    globalBatchTokens: 256
    microBatchSize: 4
    optimizer: {{lr: 0.003, minLr: 0.0003}}
    schedule: {{warmupSteps: 3}}
    checkpoint: {{everySteps: 3, keep: 2}}
    resources: {{gpusPerNode: 0}}"#,
        tokens = STEPS * 256,
    );
    common::write_manifest(dir, name, 11, &data, &rest)
}

const MODEL: &str = "{preset: tiny, dim: 64, layers: 2, heads: 4, kvHeads: 2, ffnDim: 128}";

fn worker(stage: &str, spec: &Path) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_pretrain-worker"));
    cmd.arg(stage).arg("--spec").arg(spec).stdout(std::process::Stdio::null());
    cmd
}

fn prepare(spec: &Path) {
    for stage in ["data-prep", "tokenize"] {
        let status = worker(stage, spec).status().unwrap();
        assert!(status.success(), "{stage}: {status}");
    }
}

fn commit(store: &Path, run: &str) -> pretrain_store::StageCommit {
    serde_json::from_slice(&std::fs::read(store.join(run).join("train/_SUCCESS.json")).unwrap()).unwrap()
}

fn model_sha(c: &pretrain_store::StageCommit) -> String {
    c.files.iter().find(|f| f.path.ends_with("model.safetensors")).unwrap().sha256.clone()
}

/// Waits until checkpoint `step` of `run` has its manifest (the process then is mid-step).
fn wait_for_checkpoint(child: &mut Child, store: &Path, run: &str, step: u64) {
    let manifest = store.join(run).join(format!("train/ckpt/{}/MANIFEST.json", checkpoint::dir_name(step)));
    let deadline = Instant::now() + Duration::from_secs(600);
    while !manifest.exists() {
        assert!(child.try_wait().unwrap().is_none(), "the run ended before checkpoint {step}");
        assert!(Instant::now() < deadline, "no checkpoint {step} in time");
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn killed_and_resumed_runs_end_with_identical_weights() {
    let tmp = tempfile::tempdir().unwrap();
    let store = tmp.path().join("store");

    let straight = manifest(tmp.path(), "straight", MODEL);
    prepare(&straight);
    assert_eq!(worker("train", &straight).status().unwrap().code(), Some(exit::DONE));
    let reference = commit(&store, "straight");
    assert_eq!(reference.stats["steps"], STEPS);

    // Held-out loss falls over the run.
    let metrics = std::fs::read_to_string(store.join("straight/train/metrics.jsonl")).unwrap();
    let lines: Vec<serde_json::Value> = metrics.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len() as u64, STEPS);
    let heldout: Vec<f64> = lines.iter().filter_map(|l| l["heldoutLoss"].as_f64()).collect();
    assert!(heldout.len() >= 2 && heldout[heldout.len() - 1] < heldout[0] - 0.5, "held-out losses {heldout:?}");

    // SIGKILL somewhere after checkpoint 6, then resume.
    let killed = manifest(tmp.path(), "killed", MODEL);
    prepare(&killed);
    let mut child = worker("train", &killed).spawn().unwrap();
    wait_for_checkpoint(&mut child, &store, "killed", 6);
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(!store.join("killed/train/_SUCCESS.json").exists(), "killed before the commit");
    assert_eq!(worker("train", &killed).status().unwrap().code(), Some(exit::DONE));
    let resumed = commit(&store, "killed");
    assert_eq!(model_sha(&resumed), model_sha(&reference), "bitwise the same weights after SIGKILL + resume");
    // The checkpoints count the failure the stage survived, and the training time, for
    // `checkpoint.every: auto`.
    assert_eq!(final_history(&store, "straight")["failures"], 0);
    assert_eq!(final_history(&store, "killed")["failures"], 1, "{}", final_history(&store, "killed"));
    assert!(final_history(&store, "killed")["trainSeconds"].as_f64().unwrap() > 0.0);

    // SIGTERM: checkpoint, exit 75, resume.
    let termed = manifest(tmp.path(), "termed", MODEL);
    prepare(&termed);
    let mut child = worker("train", &termed).spawn().unwrap();
    wait_for_checkpoint(&mut child, &store, "termed", 3);
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), nix::sys::signal::Signal::SIGTERM).unwrap();
    let status = child.wait().unwrap();
    if status.code() == Some(exit::RESUME) {
        assert!(!store.join("termed/train/_SUCCESS.json").exists());
    } else {
        // The signal landed after the last step: the run simply finished.
        assert_eq!(status.code(), Some(exit::DONE));
    }
    assert_eq!(worker("train", &termed).status().unwrap().code(), Some(exit::DONE));
    assert_eq!(model_sha(&commit(&store, "termed")), model_sha(&reference));
    assert_eq!(final_history(&store, "termed")["failures"], 0, "a preemption that checkpointed is not a failure");

    // `checkpoint.every: auto` with a failure every few microseconds: Young/Daly checkpoints often,
    // says so, and the weights are still the uninterrupted run's.
    let auto = manifest(tmp.path(), "auto", MODEL);
    let text = std::fs::read_to_string(&auto).unwrap().replace(
        "checkpoint: {everySteps: 3, keep: 2}",
        "checkpoint: {every: auto, everySteps: 10, mtbfHours: 0.000000001, keep: 2}",
    );
    std::fs::write(&auto, text).unwrap();
    prepare(&auto);
    let out = worker("train", &auto).stdout(std::process::Stdio::piped()).output().unwrap();
    assert_eq!(out.status.code(), Some(exit::DONE));
    let log = String::from_utf8_lossy(&out.stdout);
    assert!(log.contains("next checkpoint in ") && log.contains("(Young/Daly: the last held the step loop"), "{log}");
    assert_eq!(model_sha(&commit(&store, "auto")), model_sha(&reference));
    let metrics = std::fs::read_to_string(store.join("termed/train/metrics.jsonl")).unwrap();
    let steps: Vec<u64> = metrics
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["step"].as_u64().unwrap())
        .collect();
    assert_eq!(steps, (1..=STEPS).collect::<Vec<_>>(), "one metrics line per step across the restart");
    tensorboard_matches_metrics(&store.join("termed/train"), &metrics);

    // Retention keeps the newest two checkpoints (deleting files; the file store leaves empty folders).
    let mut left: Vec<String> = std::fs::read_dir(store.join("straight/train/ckpt"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file() || std::fs::read_dir(p).unwrap().next().is_some())
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    left.sort();
    assert_eq!(left, ["latest", "step-000000027", "step-000000030"]);
}

fn snapshot(step: u64, config: &LlamaConfig) -> Snapshot {
    let dev = Device::Cpu;
    let weight = Tensor::full(step as f32, (2, 3), &dev).unwrap();
    let state = TrainState {
        step,
        tokens_seen: step * 10,
        cursor: step * 10,
        optimizer_updates: step,
        lr: 0.1,
        config_hash: "h".into(),
        seq_len: 8,
        loss: Some(1.0),
        ..TrainState::new(config.clone())
    };
    Snapshot::take(state, vec![("w".into(), weight.clone())], vec![("exp_avg.w".into(), weight)]).unwrap()
}

#[tokio::test]
async fn torn_or_corrupted_checkpoints_are_never_loaded() {
    let tmp = tempfile::tempdir().unwrap();
    let store = pretrain_store::Store::open(&format!("file://{}", tmp.path().display())).unwrap();
    let dir = store.stage("r", Stage::Train).unwrap();
    let config = LlamaConfig::from_spec(&pretrain_crd::spec::ModelPreset::Tiny.config(), 300);
    for step in [1, 2, 3] {
        checkpoint::save(&dir, snapshot(step, &config), 5).await.unwrap();
    }
    let ckpt = tmp.path().join("r/train/ckpt");
    let loaded = checkpoint::load_latest(&dir, &Device::Cpu).await.unwrap().unwrap();
    assert_eq!(loaded.state.step, 3);
    assert_eq!(std::fs::read_to_string(ckpt.join("latest")).unwrap(), "step-000000003");

    // Newest: a flipped byte (same size, wrong hash). Next: truncated. Both skipped.
    let model3 = ckpt.join("step-000000003/model.safetensors");
    let mut bytes = std::fs::read(&model3).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0xFF;
    std::fs::write(&model3, &bytes).unwrap();
    let model2 = ckpt.join("step-000000002/model.safetensors");
    let bytes = std::fs::read(&model2).unwrap();
    std::fs::write(&model2, &bytes[..bytes.len() / 2]).unwrap();
    let loaded = checkpoint::load_latest(&dir, &Device::Cpu).await.unwrap().unwrap();
    assert_eq!(loaded.state.step, 1);
    assert_eq!(loaded.model["w"].flatten_all().unwrap().to_vec1::<f32>().unwrap(), [1.0; 6]);

    // Without its manifest (a save cut short), the last one is not a checkpoint either.
    std::fs::remove_file(ckpt.join("step-000000001/MANIFEST.json")).unwrap();
    assert!(checkpoint::load_latest(&dir, &Device::Cpu).await.unwrap().is_none());

    // Retention deletes the oldest complete checkpoints.
    for step in [4, 5, 6] {
        checkpoint::save(&dir, snapshot(step, &config), 2).await.unwrap();
    }
    assert_eq!(checkpoint::steps(&dir).await.unwrap(), [6, 5, 1]);
}

#[tokio::test]
async fn a_checkpoint_of_another_model_shape_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let first = manifest(tmp.path(), "shape", MODEL);
    prepare(&first);
    // Train part way: stop after the first checkpoint.
    let mut child = worker("train", &first).spawn().unwrap();
    wait_for_checkpoint(&mut child, &tmp.path().join("store"), "shape", 3);
    child.kill().unwrap();
    child.wait().unwrap();

    let wider = manifest(tmp.path(), "shape", "{preset: tiny, dim: 96, layers: 2, heads: 4, kvHeads: 2, ffnDim: 128}");
    let ctx = Context::from_env(Stage::Train, wider.to_str().unwrap()).await.unwrap();
    let flag = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let err = pretrain_worker::train::stage::run(&ctx, flag).await.unwrap_err();
    let message = err.to_string();
    assert!(message.contains("was trained with model") && message.contains("step-000000003"), "{message}");
    assert!(matches!(err, pretrain_worker::train::stage::TrainError::Invalid(_)));
}

/// The stage's TensorBoard event file, read back by the `tensorboard` package's reader: every scalar
/// of every step of `metrics.jsonl`, once (a resumed run included), at the step's time.
fn tensorboard_matches_metrics(stage: &Path, metrics: &str) {
    let logdir = stage.join("tensorboard");
    let Some(read) = common::python_json::<std::collections::BTreeMap<String, Vec<(u64, f64, f64)>>>(
        "check_tensorboard.py",
        &[&logdir],
        "tensorboard",
    ) else {
        return;
    };
    let lines: Vec<pretrain_store::artifact::MetricsLine> =
        metrics.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let mut expected: std::collections::BTreeMap<String, Vec<(u64, f64, f64)>> = Default::default();
    for line in &lines {
        for (tag, value) in pretrain_worker::train::tensorboard::scalars(line) {
            expected.entry(tag).or_default().push((line.step, f64::from(value), line.time.unwrap()));
        }
    }
    assert_eq!(read.keys().collect::<Vec<_>>(), expected.keys().collect::<Vec<_>>(), "tags");
    assert!(read.contains_key("loss") && read.contains_key("heldout_loss"), "{:?}", read.keys());
    for (tag, want) in &expected {
        let got = &read[tag];
        assert_eq!(got.len(), want.len(), "{tag}: one value a step");
        for (g, w) in got.iter().zip(want) {
            assert_eq!(g.0, w.0, "{tag}: steps");
            assert!((g.1 - w.1).abs() <= 1e-6 * w.1.abs().max(1e-30), "{tag} at step {}: {} vs {}", w.0, g.1, w.1);
            assert!((g.2 - w.2).abs() < 1e-3, "{tag} at step {}: wall time {} vs {}", w.0, g.2, w.2);
        }
    }
}

/// `history` of the final checkpoint's `state.json`.
fn final_history(store: &Path, run: &str) -> serde_json::Value {
    let state = store.join(run).join(format!("train/ckpt/{}/state.json", checkpoint::dir_name(STEPS)));
    let state: serde_json::Value = serde_json::from_slice(&std::fs::read(state).unwrap()).unwrap();
    state["history"].clone()
}
