//! The `pretrain` command line as a user meets it: validate, crd, render, run.

use std::process::{Command, Output};

use bytes::Bytes;
use pretrain_crd::Stage;
use pretrain_store::Store;
use pretrain_tests::{bin, repo};

fn pretrain(args: &[&str]) -> Output {
    Command::new(bin("pretrain")).args(args).current_dir(repo()).output().expect("pretrain runs")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn validate_accepts_the_examples() {
    for example in ["examples/tiny.yaml", "examples/multinode-gpu.yaml"] {
        let out = pretrain(&["validate", example]);
        assert!(out.status.success(), "{example}: {}", text(&out.stderr));
        assert_eq!(text(&out.stdout), "ok\n");
    }
}

#[test]
fn validate_lists_every_error_and_exits_2() {
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("bad.yaml");
    let manifest = std::fs::read_to_string(repo().join("examples/tiny.yaml"))
        .unwrap()
        .replace("globalBatchTokens: 4096", "globalBatchTokens: 8000")
        .replace("vocabSize: 4096", "vocabSize: 4096\n    vocabsize: 1");
    std::fs::write(&file, manifest).unwrap();
    let out = pretrain(&["validate", file.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    let stderr = text(&out.stderr);
    assert!(stderr.contains("2 error(s)"), "{stderr}");
    assert!(stderr.contains("  spec.tokenizer.vocabsize: unknown field"), "{stderr}");
    assert!(
        stderr.contains(
            "  spec.train.globalBatchTokens: must be a multiple of seqLen x microBatchSize x data-parallel ranks (256 x 16 x 1 = 4096), got 8000"
        ),
        "{stderr}"
    );

    let out = pretrain(&["validate", "no/such/file.yaml"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).starts_with("no/such/file.yaml: cannot read"), "{}", text(&out.stderr));
}

#[test]
fn crd_prints_the_chart_copy() {
    let out = pretrain(&["crd"]);
    assert!(out.status.success());
    let committed = std::fs::read_to_string(repo().join("charts/pretrain-operator/crds/crds.yaml")).unwrap();
    assert_eq!(text(&out.stdout), committed);
}

/// A small run "tiny" over two generated JSONL files, with its store in a fresh directory.
#[test]
fn render_prints_every_object_of_the_run_and_names_a_bad_manifest() {
    let out = pretrain(&["render", "examples/multinode-gpu.yaml", "-n", "ml"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let docs: Vec<serde_yaml::Value> = text(&out.stdout)
        .split("---\n")
        .filter(|d| !d.trim().is_empty())
        .map(|d| serde_yaml::from_str(d).unwrap())
        .collect();
    let kinds: Vec<String> = docs
        .iter()
        .map(|d| format!("{} {}", d["kind"].as_str().unwrap(), d["metadata"]["name"].as_str().unwrap()))
        .collect();
    assert_eq!(kinds[0], "ConfigMap llama-1b-web-spec");
    assert!(kinds.contains(&"Job llama-1b-web-train-1".to_string()), "{kinds:?}");
    assert!(kinds.contains(&"Service llama-1b-web-train".to_string()), "{kinds:?}");
    assert!(docs.iter().all(|d| d["metadata"]["namespace"].as_str() == Some("ml")));
    let out = pretrain(&["render", "no-such.yaml"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("no-such.yaml"), "{}", text(&out.stderr));
}

fn manifest_in(tmp: &std::path::Path) -> (std::path::PathBuf, String) {
    let store = format!("file://{}", tmp.join("store").display());
    for (name, n) in [("web", 30u64), ("code", 10)] {
        let lines: Vec<String> = (0..n)
            .map(|i| {
                let text: Vec<String> =
                    (0..200).map(|w| format!("{name}{}", (i * 7919 + w * 104_729) % 5000)).collect();
                serde_json::json!({"id": format!("{name}-{i}"), "text": text.join(" ")}).to_string()
            })
            .collect();
        std::fs::write(tmp.join(format!("{name}.jsonl")), lines.join("\n")).unwrap();
    }
    let off = "{enabled: false}";
    let manifest = format!(
        r#"apiVersion: pretrain.dev/v1alpha1
kind: PretrainRun
metadata: {{name: tiny}}
spec:
  storage: {{url: "{store}"}}
  data:
    sources:
      - {{name: web, url: "{dir}/web.jsonl"}}
      - {{name: code, url: "{dir}/code.jsonl"}}
    filters: {{gopherQuality: {off}, gopherRepetition: {off}, c4: {off}, fineweb: {off}, language: {off}}}
    shards: 2
  tokenizer: {{vocabSize: 512}}
  model: {{preset: tiny}}
  train: {{seqLen: 64, tokens: 100000, globalBatchTokens: 1024, microBatchSize: 16, schedule: {{warmupSteps: 1}}, resources: {{gpusPerNode: 0}}}}
"#,
        dir = tmp.display()
    );
    let file = tmp.join("run.yaml");
    std::fs::write(&file, manifest).unwrap();
    (file, store)
}

/// Commits `stage` of run "tiny" as if it had run for a spec with `config_hash`.
fn commit_as_done(store_url: &str, stage: Stage, config_hash: &str) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let dir = Store::open(store_url).unwrap().stage("tiny", stage).unwrap();
        let entry = dir.put("out.txt", Bytes::from_static(b"done")).await.unwrap();
        dir.commit(config_hash, vec![entry], serde_json::json!({})).await.unwrap();
    });
}

#[test]
fn run_skips_committed_stages_and_stops_at_the_first_failing_one() {
    let tmp = tempfile::tempdir().unwrap();
    let (file, store_url) = manifest_in(tmp.path());
    let run = pretrain_crd::load(&file).unwrap();
    for stage in [Stage::DataPrep, Stage::Tokenize, Stage::Train] {
        commit_as_done(&store_url, stage, &run.spec.stage_config_hash(stage));
    }

    let out = pretrain(&["run", file.to_str().unwrap(), "--until", "tokenize"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert_eq!(
        stdout,
        "data-prep: outputs committed for this spec; skipped\ntokenize: outputs committed for this spec; skipped\n"
    );

    let out = pretrain(&["run", file.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stdout).contains("train: outputs committed for this spec; skipped\neval: starting"),
        "{}",
        text(&out.stdout)
    );
    // The committed stages are stand-ins without a tokenizer, so eval fails and says on what.
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("error: stage eval failed (exit code 2): ") && stderr.contains("tokenizer.json"),
        "{stderr}"
    );
}

#[test]
fn run_redoes_a_stage_whose_config_changed_and_then_skips_it() {
    let tmp = tempfile::tempdir().unwrap();
    let (file, store_url) = manifest_in(tmp.path());
    let mut other = pretrain_crd::load(&file).unwrap().spec;
    other.data.held_out_fraction = 0.3;
    commit_as_done(&store_url, Stage::DataPrep, &other.stage_config_hash(Stage::DataPrep));
    let file = file.to_str().unwrap();
    let out = pretrain(&["run", file, "--until", "data-prep"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    // A run that ran a stage ends by writing the run's report.
    let report = tmp.path().join("store/tiny/report/README.md");
    assert_eq!(
        text(&out.stdout),
        format!(
            "data-prep: starting\ndata-prep: committed 4 files\ndata-prep: committed\nreport: {}\n",
            report.display()
        )
    );
    assert!(std::fs::read_to_string(&report).unwrap().contains("## Data"));
    let out = pretrain(&["run", file, "--until", "data-prep"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "data-prep: outputs committed for this spec; skipped\n");
}

#[test]
fn run_refuses_bad_stage_ranges_and_a_memory_store() {
    let tmp = tempfile::tempdir().unwrap();
    let (file, _) = manifest_in(tmp.path());
    let file = file.to_str().unwrap();

    let out = pretrain(&["run", file, "--from", "eval", "--until", "train"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("--from eval comes after --until train"), "{}", text(&out.stderr));

    let out = pretrain(&["run", file, "--until", "nope"]);
    assert_eq!(out.status.code(), Some(2), "clap rejects an unknown stage");
    assert!(text(&out.stderr).contains("unknown stage \"nope\""), "{}", text(&out.stderr));

    let out = pretrain(&["run", file, "--from", "train"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr)
            .contains("--from train: stage data-prep has no committed outputs for this spec; run it first"),
        "{}",
        text(&out.stderr)
    );

    let out = pretrain(&["run", file, "--store", "memory://"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("memory:// lives inside one process"), "{}", text(&out.stderr));
}

#[test]
fn worker_refuses_a_run_name_that_contradicts_the_spec() {
    let tmp = tempfile::tempdir().unwrap();
    let (file, _) = manifest_in(tmp.path());
    let out = Command::new(bin("pretrain-worker"))
        .args(["data-prep", "--spec", file.to_str().unwrap()])
        .env("PRETRAIN_RUN", "other")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(pretrain_crd::contract::exit::INVALID));
    assert!(text(&out.stderr).contains("PRETRAIN_RUN=\"other\""), "{}", text(&out.stderr));
}
