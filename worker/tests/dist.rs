//! Data-parallel training through the `pretrain-worker` binary: 2 and 4 processes end with bitwise
//! the weights of 1 process with the same global batch (gradients are summed in one order whatever
//! the number of ranks); a killed rank makes the others stop with the peer-lost exit code instead
//! of hanging; a gang shrunk to 3 ranks resumes from the checkpoint and ends with bitwise the
//! weights of the uninterrupted run.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

mod common;

use pretrain_crd::contract::exit;
use pretrain_worker::checkpoint;

const STEPS: u64 = 24;

/// Run `dp` with its store in `<root>/<store>/store`, reading `<root>/docs.jsonl`.
fn manifest(root: &Path, store: &str) -> PathBuf {
    let docs = root.join("docs.jsonl");
    if !docs.exists() {
        let words = |seed: u64| common::words(seed, 60, |s| format!("w{}", s % 50)).join(" ");
        let lines: Vec<String> =
            (0..200).map(|i| serde_json::json!({"id": format!("d{i}"), "text": words(i)}).to_string()).collect();
        std::fs::write(&docs, lines.join("\n")).unwrap();
    }
    let dir = root.join(store);
    std::fs::create_dir_all(&dir).unwrap();
    let data = format!(
        "    sources: [{{name: web, url: \"{docs}\"}}]\n    dedup: {{exact: false, minhash: {{enabled: false}}}}\n    heldOutFraction: 0.1\n    shards: 1",
        docs = docs.display()
    );
    // 8 sequences per step in 4 gradient groups (the gang of 4 nodes), each one micro-batch of 2:
    // all 4 on one rank, 2 on each of two, 1, 1 and 2 on three, 1 on each of four.
    let rest = format!(
        r#"  tokenizer: {{vocabSize: 300}}
  model: {{preset: tiny, dim: 32, layers: 2, heads: 4, kvHeads: 2, ffnDim: 64}}
  train:
    seqLen: 32
    tokens: {tokens}
    globalBatchTokens: 256
    microBatchSize: 2
    optimizer: {{lr: 0.003, minLr: 0.0003}}
    schedule: {{warmupSteps: 3}}
    checkpoint: {{everySteps: 4, keep: 2}}
    resources: {{nodes: 4, gpusPerNode: 0}}"#,
        tokens = STEPS * 256,
    );
    common::write_manifest(&dir, "dp", 7, &data, &rest)
}

fn worker(stage: &str, spec: &Path) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_pretrain-worker"));
    cmd.arg(stage).arg("--spec").arg(spec).stdout(Stdio::null()).env("RAYON_NUM_THREADS", "1");
    cmd
}

/// Data-prep and tokenize once in the store of `first`, copied to the stores of the others.
fn prepare(root: &Path, first: &str, others: &[&str]) {
    for stage in ["data-prep", "tokenize"] {
        let status = worker(stage, &root.join(first).join("dp.yaml")).status().unwrap();
        assert!(status.success(), "{stage}: {status}");
    }
    for other in others {
        copy_dir(&root.join(first).join("store"), &root.join(other).join("store"));
    }
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &to.join(entry.file_name()));
        } else {
            std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
        }
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind(("127.0.0.1", 0)).unwrap().local_addr().unwrap().port()
}

/// Starts the `world` ranks of a train gang.
fn gang(spec: &Path, world: usize) -> Vec<Child> {
    let port = free_port().to_string();
    (0..world)
        .map(|rank| {
            worker("train", spec)
                .env("RANK", rank.to_string())
                .env("WORLD_SIZE", world.to_string())
                .env("MASTER_ADDR", "127.0.0.1")
                .env("MASTER_PORT", &port)
                .env("PRETRAIN_COLLECTIVE_TIMEOUT", "120")
                .env("PRETRAIN_RENDEZVOUS_TIMEOUT", "120")
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect()
}

/// Waits for a process, failing the test instead of hanging if it never ends.
fn wait(child: &mut Child, limit: Duration) -> (Option<i32>, String) {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            let mut err = String::new();
            std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut err).unwrap();
            return (status.code(), err);
        }
        if Instant::now() > deadline {
            child.kill().unwrap();
            panic!("a rank did not end within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn run_gang(spec: &Path, world: usize) {
    for (rank, mut child) in gang(spec, world).into_iter().enumerate() {
        let (code, err) = wait(&mut child, Duration::from_secs(600));
        assert_eq!(code, Some(exit::DONE), "rank {rank} of {world}: {err}");
    }
}

/// The `dp` run's stage directory in the store `name`.
fn stage_dir(root: &Path, name: &str) -> PathBuf {
    root.join(name).join("store/dp/train")
}

/// The final checkpoint's weights: every tensor of its model file or shards, by name, with its bytes.
fn weights(root: &Path, name: &str) -> Vec<(String, Vec<u8>)> {
    let dir = stage_dir(root, name).join("ckpt").join(checkpoint::dir_name(STEPS));
    let mut tensors = Vec::new();
    for entry in std::fs::read_dir(&dir).unwrap() {
        let file = entry.unwrap().file_name().to_string_lossy().to_string();
        if checkpoint::is_file_of(&file, "model") {
            let bytes = std::fs::read(dir.join(&file)).unwrap();
            let parsed = safetensors::SafeTensors::deserialize(&bytes).unwrap();
            tensors.extend(parsed.tensors().into_iter().map(|(n, t)| (n, t.data().to_vec())));
        }
    }
    tensors.sort();
    assert!(!tensors.is_empty(), "no weights in {}", dir.display());
    tensors
}

/// The files of the final checkpoint, by name.
fn checkpoint_files(root: &Path, name: &str) -> Vec<String> {
    let dir = stage_dir(root, name).join("ckpt").join(checkpoint::dir_name(STEPS));
    let mut files: Vec<String> =
        std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().to_string()).collect();
    files.sort();
    files
}

fn losses(root: &Path, name: &str) -> Vec<(u64, f64)> {
    std::fs::read_to_string(stage_dir(root, name).join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            (v["step"].as_u64().unwrap(), v["loss"].as_f64().unwrap())
        })
        .collect()
}

#[test]
fn gangs_of_two_and_four_train_bitwise_as_one_process_and_a_shrunk_gang_resumes_bitwise() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let solo = manifest(root, "solo");
    let specs: Vec<PathBuf> = ["duo", "quad", "killed"].iter().map(|n| manifest(root, n)).collect();
    prepare(root, "solo", &["duo", "quad", "killed"]);

    let status = worker("train", &solo).env("RANK", "0").env("WORLD_SIZE", "1").status().unwrap();
    assert_eq!(status.code(), Some(exit::DONE));
    let reference = weights(root, "solo");
    let reference_losses = losses(root, "solo");
    assert_eq!(reference_losses.len() as u64, STEPS);

    // The same global batch split over 2 and 4 processes: bitwise the same training.
    for (run, spec, world) in [("duo", &specs[0], 2), ("quad", &specs[1], 4)] {
        run_gang(spec, world);
        assert!(weights(root, run) == reference, "{world} ranks end with other weights than one process");
        assert_eq!(losses(root, run), reference_losses, "{world} ranks: other losses");
    }
    // One process saves whole files; each rank of a gang saves its shard, and rank 0 the manifest.
    assert!(checkpoint_files(root, "solo").contains(&"model.safetensors".to_string()));
    let quad = checkpoint_files(root, "quad");
    for rank in 0..4 {
        for kind in ["model", "optim"] {
            assert!(quad.contains(&format!("{kind}-{rank:05}-of-00004.safetensors")), "{quad:?}");
        }
    }
    assert!(quad.contains(&"MANIFEST.json".to_string()) && !quad.contains(&"model.safetensors".to_string()));
    let manifest: serde_json::Value = serde_json::from_slice(
        &std::fs::read(stage_dir(root, "quad").join("ckpt").join(checkpoint::dir_name(STEPS)).join("MANIFEST.json"))
            .unwrap(),
    )
    .unwrap();
    assert_eq!(manifest["files"].as_array().unwrap().len(), 9, "4 model shards, 4 optim shards, state.json");

    // Kill rank 3 of 4 once a checkpoint exists: the others stop with the peer-lost code, not a hang.
    let killed = &specs[2];
    let mut ranks = gang(killed, 4);
    let first = stage_dir(root, "killed").join("ckpt").join(checkpoint::dir_name(4)).join("MANIFEST.json");
    let deadline = Instant::now() + Duration::from_secs(600);
    while !first.exists() {
        assert!(ranks.iter_mut().all(|c| c.try_wait().unwrap().is_none()), "a rank ended before checkpoint 4");
        assert!(Instant::now() < deadline, "no checkpoint 4 in time");
        std::thread::sleep(Duration::from_millis(2));
    }
    ranks[3].kill().unwrap();
    ranks[3].wait().unwrap();
    for (rank, child) in ranks.iter_mut().enumerate().take(3) {
        let (code, err) = wait(child, Duration::from_secs(300));
        assert_eq!(code, Some(exit::PEER_LOST), "rank {rank} after rank 3 died: {err}");
        if rank == 0 {
            assert!(err.contains("rank 3"), "rank 0 names the lost rank: {err}");
        }
    }
    assert!(!stage_dir(root, "killed").join("_SUCCESS.json").exists());

    // The gang shrinks to three ranks (the last one takes two groups), resumes from the four
    // shards, and ends with bitwise the weights and losses of the uninterrupted run.
    run_gang(killed, 3);
    assert!(weights(root, "killed") == reference, "shrunk to 3 ranks: other weights than the uninterrupted run");
    let resumed = losses(root, "killed");
    assert_eq!(resumed.iter().map(|(s, _)| *s).collect::<Vec<_>>(), (1..=STEPS).collect::<Vec<_>>());
    assert_eq!(resumed, reference_losses, "shrunk to 3 ranks: other losses");
}
