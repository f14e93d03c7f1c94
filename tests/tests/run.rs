//! `pretrain run` end to end: a micro manifest through all five stages (map tasks fanned out over
//! two workers), a rerun that starts nothing, `pretrain status`, and a runner killed mid-train whose
//! rerun resumes from the checkpoint to the same final weights as an uninterrupted run.

use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use pretrain_tests::{
    bin, manifest, model_sha, processes_mentioning, python, relative_difference, transformers_logits,
};

fn pretrain(args: &[&str]) -> Output {
    Command::new(bin("pretrain")).args(args).output().expect("pretrain runs")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn a_micro_manifest_runs_all_five_stages_and_a_rerun_starts_none() {
    let tmp = tempfile::tempdir().unwrap();
    let file = manifest(tmp.path(), "micro", 5120);
    let file = file.to_str().unwrap();
    let out = pretrain(&["run", file, "--workers", "2"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    for stage in ["data-prep", "tokenize", "train", "long-context", "eval"] {
        assert!(stdout.contains(&format!("{stage}: starting\n")), "{stdout}");
        assert!(stdout.contains(&format!("{stage}: committed\n")), "{stdout}");
    }
    let store = tmp.path().join("store/micro");
    let report = std::fs::read_to_string(store.join("eval/report.md")).unwrap();
    assert!(report.contains("## base vs long-context"), "{report}");
    // The run's report: every section, and the plots it links.
    let page_path = store.join("report/README.md");
    assert!(stdout.contains(&format!("report: {}", page_path.display())), "{stdout}");
    let page = std::fs::read_to_string(&page_path).unwrap();
    for section in ["## Goodput", "## Data", "## Tokenizer", "## Training", "## Evaluation", "### base vs long-context"]
    {
        assert!(page.contains(section), "{section} missing from\n{page}");
    }
    for plot in ["loss.svg", "lr.svg", "throughput.svg", "probes.svg"] {
        assert!(page.contains(&format!("]({plot})")), "{plot} not linked");
        let svg = std::fs::read_to_string(store.join("report").join(plot)).unwrap();
        assert!(svg.starts_with("<svg"), "{plot}");
    }
    // The two map tasks each wrote their shard.
    for stage in ["data-prep", "tokenize"] {
        let commit = std::fs::read_to_string(store.join(stage).join("_SUCCESS.json")).unwrap();
        assert!(commit.contains("00001"), "{stage}: {commit}");
    }

    // Asked for progress reports (as the runner does on a terminal), a worker writes `@progress` lines
    // ending at its total.
    let out = Command::new(bin("pretrain-worker"))
        .args(["eval", "--spec", file, "--checkpoint", "train"])
        .env("PRETRAIN_PROGRESS", "json")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    let last =
        stdout.lines().filter_map(|l| l.strip_prefix("@progress ")).next_back().unwrap_or_else(|| panic!("{stdout}"));
    let event: serde_json::Value = serde_json::from_str(last).unwrap();
    assert_eq!(event["label"], "eval");
    assert_eq!(event["done"], event["total"], "{event}");

    let out = pretrain(&["status", "-f", file]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let status = text(&out.stdout);
    for stage in ["data-prep", "tokenize", "train", "long-context", "eval"] {
        let line = status.lines().find(|l| l.trim_start().starts_with(stage)).unwrap_or_else(|| panic!("{status}"));
        assert!(line.contains("committed"), "{line}");
    }
    // Train takes 75% of the 5,120-token budget (long-context the other 25%): 15 steps of 256 tokens.
    assert!(status.contains("checkpoint step-000000015"), "{status}");
    // Goodput of the two training stages: a share of the time they held, never more than all of it.
    let percent = status
        .lines()
        .find_map(|l| l.trim_start().strip_prefix("goodput "))
        .and_then(|rest| rest.split('%').next())
        .and_then(|p| p.parse::<f64>().ok())
        .unwrap_or_else(|| panic!("no goodput in\n{status}"));
    assert!(percent > 0.0 && percent <= 100.0, "{status}");

    // The long-context checkpoint as a Hugging Face Llama directory.
    let hf = tmp.path().join("hf");
    let out = pretrain(&["export", "-f", file, "--checkpoint", "long-context", "-o", hf.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).starts_with("exported file://"), "{}", text(&out.stdout));
    check_hf_directory(&hf, 64);
    check_hf_logits(&store.join("long-context"), &hf);
    let out = pretrain(&["export", "-f", file, "--checkpoint", "train/999", "-o", hf.to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("step-000000999"), "{}", text(&out.stderr));

    let out = pretrain(&["run", file]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let expected: String = ["data-prep", "tokenize", "train", "long-context", "eval"]
        .iter()
        .map(|s| format!("{s}: outputs committed for this spec; skipped\n"))
        .collect();
    assert_eq!(text(&out.stdout), expected);
}

/// `transformers` loads the exported directory (`LlamaForCausalLM`, `AutoTokenizer`) and gives the
/// logits our model computes from the checkpoint (`stage`'s latest), over its whole trained length.
fn check_hf_logits(stage: &Path, hf: &Path) {
    use candle_core::{DType, Device, Tensor};
    use pretrain_worker::model::{Llama, LlamaConfig, Params};

    let Some(python) = python() else { return };
    let name = std::fs::read_to_string(stage.join("ckpt/latest")).unwrap();
    let checkpoint = stage.join("ckpt").join(name.trim());
    let state: serde_json::Value =
        serde_json::from_slice(&std::fs::read(checkpoint.join("state.json")).unwrap()).unwrap();
    let config: LlamaConfig = serde_json::from_value(state["model"].clone()).unwrap();
    let seq_len = state["seqLen"].as_u64().unwrap() as usize;
    let tensors = candle_core::safetensors::load(checkpoint.join("model.safetensors"), &Device::Cpu).unwrap();
    let params = Params::from_named(&config, tensors, &Device::Cpu).unwrap();
    let vocab = config.vocab_size as u32;
    let model = Llama::new(config, params, seq_len, &Device::Cpu).unwrap();
    let ids: Vec<Vec<u32>> =
        (0..2u32).map(|r| (0..seq_len as u32).map(|i| (i * 37 + r * 11 + 5) % vocab).collect()).collect();
    let input = Tensor::from_vec(ids.concat(), (2, seq_len), &Device::Cpu).unwrap();
    let ours: Vec<f32> = model.forward(&input, DType::F32).unwrap().flatten_all().unwrap().to_vec1().unwrap();
    let theirs = transformers_logits(&python, hf, &ids);
    let diff = relative_difference(&ours, &theirs);
    eprintln!(
        "exported long-context checkpoint: largest logit difference from transformers {diff:.2e} of the largest logit"
    );
    assert!(diff < 1e-4, "transformers' logits differ from ours by {diff:.2e} of the largest logit");
}

/// An exported directory as `transformers` reads it: a Llama config, and safetensors whose tensor
/// names and shapes are exactly those `LlamaForCausalLM` of that config has.
fn check_hf_directory(dir: &Path, seq_len: u64) {
    let read = |name: &str| std::fs::read(dir.join(name)).unwrap_or_else(|e| panic!("{name}: {e}"));
    let config: serde_json::Value = serde_json::from_slice(&read("config.json")).unwrap();
    assert_eq!(config["architectures"][0], "LlamaForCausalLM");
    assert_eq!(config["max_position_embeddings"], seq_len);
    let tokenizer: serde_json::Value = serde_json::from_slice(&read("tokenizer.json")).unwrap();
    assert_eq!(tokenizer["model"]["type"], "BPE");
    let eos = config["eos_token_id"].as_u64().expect("the separator token ends generation");
    let generation: serde_json::Value = serde_json::from_slice(&read("generation_config.json")).unwrap();
    assert_eq!(generation["eos_token_id"], eos);
    let tokenizer_config: serde_json::Value = serde_json::from_slice(&read("tokenizer_config.json")).unwrap();
    assert_eq!(tokenizer_config["tokenizer_class"], "PreTrainedTokenizerFast");

    let weights = read("model.safetensors");
    let n = u64::from_le_bytes(weights[..8].try_into().unwrap()) as usize;
    let header: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(&weights[8..8 + n]).unwrap();
    let c = |k: &str| config[k].as_u64().unwrap();
    let (d, v, f, heads, kv) =
        (c("hidden_size"), c("vocab_size"), c("intermediate_size"), c("num_attention_heads"), c("num_key_value_heads"));
    let hd = c("head_dim");
    let mut expected =
        vec![("model.embed_tokens.weight".to_string(), vec![v, d]), ("model.norm.weight".to_string(), vec![d])];
    if config["tie_word_embeddings"] == false {
        expected.push(("lm_head.weight".into(), vec![v, d]));
    }
    for l in 0..c("num_hidden_layers") {
        let p = format!("model.layers.{l}");
        expected.extend([
            (format!("{p}.input_layernorm.weight"), vec![d]),
            (format!("{p}.post_attention_layernorm.weight"), vec![d]),
            (format!("{p}.self_attn.q_proj.weight"), vec![heads * hd, d]),
            (format!("{p}.self_attn.k_proj.weight"), vec![kv * hd, d]),
            (format!("{p}.self_attn.v_proj.weight"), vec![kv * hd, d]),
            (format!("{p}.self_attn.o_proj.weight"), vec![d, heads * hd]),
            (format!("{p}.mlp.gate_proj.weight"), vec![f, d]),
            (format!("{p}.mlp.up_proj.weight"), vec![f, d]),
            (format!("{p}.mlp.down_proj.weight"), vec![d, f]),
        ]);
    }
    let mut got: Vec<(String, Vec<u64>)> = header
        .iter()
        .filter(|(k, _)| *k != "__metadata__")
        .map(|(k, t)| {
            assert_eq!(t["dtype"], "F32", "{k}");
            (k.clone(), t["shape"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap()).collect())
        })
        .collect();
    got.sort();
    expected.sort();
    assert_eq!(got, expected);
}

/// Whether any process's command line mentions `needle`.
#[test]
fn a_killed_runner_leaves_a_checkpoint_and_the_rerun_ends_with_the_same_weights() {
    let tokens = 60 * 256;
    let whole = tempfile::tempdir().unwrap();
    let file = manifest(whole.path(), "kill", tokens);
    let out = pretrain(&["run", file.to_str().unwrap(), "--until", "train"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let expected = model_sha(&whole.path().join("store/kill"));

    let tmp = tempfile::tempdir().unwrap();
    let file = manifest(tmp.path(), "kill", tokens);
    let file = file.to_str().unwrap();
    let mut runner = Command::new(bin("pretrain"))
        .args(["run", file, "--until", "train"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let first = tmp.path().join("store/kill/train/ckpt/step-000000005/MANIFEST.json");
    let deadline = Instant::now() + Duration::from_secs(600);
    while !first.exists() {
        assert!(runner.try_wait().unwrap().is_none(), "the run ended before its first checkpoint");
        assert!(Instant::now() < deadline, "no checkpoint in time");
        std::thread::sleep(Duration::from_millis(5));
    }
    runner.kill().unwrap();
    runner.wait().unwrap();
    // The worker got SIGTERM from the kernel when the runner died: it checkpoints and exits.
    let deadline = Instant::now() + Duration::from_secs(120);
    while !processes_mentioning(file).is_empty() {
        assert!(Instant::now() < deadline, "the worker outlived its runner");
        std::thread::sleep(Duration::from_millis(20));
    }
    let latest = std::fs::read_to_string(tmp.path().join("store/kill/train/ckpt/latest")).unwrap();
    assert!(!tmp.path().join("store/kill/train/_SUCCESS.json").exists(), "killed before the end");

    let out = pretrain(&["status", "-f", file]);
    let status = text(&out.stdout);
    let line = status.lines().find(|l| l.trim_start().starts_with("train")).unwrap_or_else(|| panic!("{status}"));
    assert!(line.contains("stopped") && line.contains(&format!("checkpoint {}", latest.trim())), "{line}");

    let out = pretrain(&["run", file, "--until", "train"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains(&format!("train: resuming from {}", latest.trim())), "{}", text(&out.stdout));
    assert_eq!(model_sha(&tmp.path().join("store/kill")), expected);
}
