//! Reliability drills on whole runs: a run whose store fails 5% of its operations (503s, resets
//! after the write, slow answers, cut downloads, lost upload parts) ends with exactly the outputs of
//! a clean run, and a full disk during a checkpoint keeps the previous checkpoint as `latest`.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Output};

use pretrain_tests::{bin, manifest, model_sha};

const STAGES: [&str; 5] = ["data-prep", "tokenize", "train", "long-context", "eval"];

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn run(file: &Path, faults: Option<&str>, extra: &[&str]) -> Output {
    let mut cmd = Command::new(bin("pretrain"));
    cmd.arg("run").arg(file).args(extra);
    if let Some(spec) = faults {
        cmd.env(pretrain_store::ENV_FAULTS, spec);
    }
    cmd.output().expect("pretrain runs")
}

/// Fields of metrics lines and checkpoint states that record the clock rather than the model, and
/// the config hash, which covers the store URL (the two runs write to different directories).
const TIMING: [&str; 5] = ["tokensPerSecond", "mfu", "seconds", "savedUnix", "configHash"];

fn strip(v: &mut serde_json::Value) {
    match v {
        serde_json::Value::Object(map) => {
            for k in TIMING {
                map.remove(k);
            }
            map.values_mut().for_each(strip);
        }
        serde_json::Value::Array(items) => items.iter_mut().for_each(strip),
        _ => {}
    }
}

fn without_timing(json: &str) -> String {
    let mut v: serde_json::Value = serde_json::from_str(json).unwrap();
    strip(&mut v);
    v.to_string()
}

/// What a stage committed, file by file: the sha256 of each binary output, and text outputs with
/// the store's directory replaced and JSON without its timings.
fn outputs(store: &Path, stage: &str) -> BTreeMap<String, String> {
    let commit: serde_json::Value =
        serde_json::from_slice(&std::fs::read(store.join(stage).join("_SUCCESS.json")).unwrap()).unwrap();
    let root = store.parent().unwrap().display().to_string();
    let mut out = BTreeMap::new();
    for f in commit["files"].as_array().unwrap() {
        let path = f["path"].as_str().unwrap().to_string();
        let read = || std::fs::read_to_string(store.join(stage).join(&path)).unwrap().replace(&root, "<store>");
        let value = if path.ends_with(".jsonl") {
            read().lines().map(without_timing).collect::<Vec<_>>().join("\n")
        } else if path.ends_with(".json") {
            without_timing(&read())
        } else if path.ends_with(".md") {
            read()
        } else {
            f["sha256"].as_str().unwrap().to_string()
        };
        out.insert(path, value);
    }
    out
}

#[test]
fn a_run_whose_store_fails_five_percent_of_operations_ends_with_the_outputs_of_a_clean_run() {
    let clean = tempfile::tempdir().unwrap();
    let out = run(&manifest(clean.path(), "drill", 5120), None, &[]);
    assert!(out.status.success(), "{}", text(&out.stderr));

    let faulty = tempfile::tempdir().unwrap();
    let log = faulty.path().join("faults.log");
    // PRETRAIN_DRILL_FAULTS=rate=0.2 runs the same drill harder (docs/reliability.md).
    let faults = std::env::var("PRETRAIN_DRILL_FAULTS").unwrap_or_else(|_| "rate=0.05,delay-ms=20".into());
    let spec = format!("{faults},log={}", log.display());
    let out = run(&manifest(faulty.path(), "drill", 5120), Some(&spec), &[]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    for stage in STAGES {
        assert!(stdout.contains(&format!("{stage}: committed\n")), "{stdout}");
    }
    let stderr = text(&out.stderr);
    assert!(!stderr.contains(": attempt "), "no stage needed a second attempt:\n{stderr}");

    let injected = std::fs::read_to_string(&log).unwrap();
    let mut kinds = BTreeMap::<&str, usize>::new();
    for line in injected.lines() {
        *kinds.entry(line.split(' ').next().unwrap()).or_default() += 1;
    }
    // About 250 store operations at 5%: a dozen faults on average, none only once in 10^5 runs.
    eprintln!("faults injected: {} {kinds:?}", injected.lines().count());
    assert!(!kinds.is_empty(), "no fault was injected");
    let (a, b) = (clean.path().join("store/drill"), faulty.path().join("store/drill"));
    for stage in STAGES {
        let (want, got) = (outputs(&a, stage), outputs(&b, stage));
        assert_eq!(want.keys().collect::<Vec<_>>(), got.keys().collect::<Vec<_>>(), "{stage}: other files");
        for (path, value) in &want {
            assert!(got[path] == *value, "{stage}/{path} differs from the clean run's:\n{value}\n{}", got[path]);
        }
    }
}

#[test]
fn a_full_disk_or_a_read_only_store_during_a_checkpoint_keeps_the_previous_one_latest() {
    let clean = tempfile::tempdir().unwrap();
    let out = run(&manifest(clean.path(), "disk", 5120), None, &["--until", "train"]);
    assert!(out.status.success(), "{}", text(&out.stderr));

    // 20 steps, a checkpoint every 5: the disk fills up while step 10 is saved.
    let tmp = tempfile::tempdir().unwrap();
    let file = manifest(tmp.path(), "disk", 5120);
    let ckpt = tmp.path().join("store/disk/train/ckpt");
    let out = run(&file, Some("full=disk/train/ckpt/step-000000010/"), &["--until", "train"]);
    assert!(!out.status.success());
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("checkpoint step-000000010 was not saved")
            && stderr.contains("No space left on device")
            && stderr.contains("step-000000005 stays the latest complete checkpoint"),
        "{stderr}"
    );
    assert_eq!(std::fs::read_to_string(ckpt.join("latest")).unwrap(), "step-000000005");
    assert!(!ckpt.join("step-000000010/MANIFEST.json").exists());

    // Then the store turns read-only under the stage: the rerun resumes from step 5 and fails to
    // save step 10 again, without touching what is there.
    let out = run(&file, Some("readonly=disk/train/"), &["--until", "train"]);
    assert!(!out.status.success());
    let stderr = text(&out.stderr);
    assert!(stderr.contains("Read-only file system"), "{stderr}");
    assert_eq!(std::fs::read_to_string(ckpt.join("latest")).unwrap(), "step-000000005");
    assert!(ckpt.join("step-000000005/MANIFEST.json").exists());

    // With the disk back, the run resumes from step 5 and ends with the clean run's weights.
    let out = run(&file, None, &["--until", "train"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("train: resuming from step-000000005"), "{}", text(&out.stdout));
    assert_eq!(model_sha(&tmp.path().join("store/disk")), model_sha(&clean.path().join("store/disk")));
}
