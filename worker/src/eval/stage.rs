//! The eval stage: every final checkpoint of the run (train's, and long-context's when configured)
//! measured the same way, then `eval.json` and a Markdown report with a base vs long-context
//! comparison and each probe's log-probability across all checkpoints that training recorded.
//!
//! `pretrain-worker eval --checkpoint train/40` evaluates one checkpoint instead and writes its
//! report under `eval/checkpoints/<stage>-step-<n>/` without committing the stage.

use std::collections::BTreeMap;

use bytes::Bytes;
use candle_core::{DType, Device};
use pretrain_crd::Stage;
use pretrain_crd::spec::BenchmarkFormat;
use pretrain_store::{StageCommit, StageDir};
use serde::Serialize;

use super::passkey::{self, PasskeyResult};
pub use super::perplexity::{HeldOutDoc, Perplexity, add_unigram, perplexity, unigram_logprobs};
pub use super::report::markdown;
use super::tasks::{self, Item, Task};
use super::{EvalError, Scorer, encode_prompt, encode_request, probe_logprobs};
use crate::Context;
use crate::checkpoint;
use crate::model::{Llama, LlamaConfig, Params};
use crate::progress::Progress;
use crate::tokenizer::Encoder;
use crate::tokens::TokenStream;
use crate::tokens::Tokenized;
use pretrain_store::artifact::DocumentLine;
pub use pretrain_store::artifact::ProbeRow;

type Result<T, E = EvalError> = std::result::Result<T, E>;

/// Items per built-in benchmark.
const BUILTIN_ITEMS: usize = 100;

/// A benchmark's score.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct TaskResult {
    /// `cloze`, `generative` or `loglikelihood`.
    pub format: BenchmarkFormat,
    /// Items scored.
    pub items: usize,
    /// Cloze: accuracy by log-likelihood per character of the choice (lm-evaluation-harness's
    /// `acc_norm`); generative: exact match; loglikelihood: the share of targets greedy decoding gives.
    pub score: f64,
    /// Cloze: accuracy by summed log-likelihood (lm-evaluation-harness's `acc`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub acc_raw: Option<f64>,
    /// Cloze: accuracy by log-likelihood per byte of the choice (UTF-8).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub acc_bytes: Option<f64>,
    /// Loglikelihood: `exp(-mean)` of the targets' log-likelihoods over items.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub perplexity: Option<f64>,
    /// What a uniform guess scores (cloze: mean 1/choices; otherwise 0).
    pub chance: f64,
}

/// Scores a benchmark.
pub fn run_task(scorer: &Scorer<'_>, encoder: &Encoder, separator: u32, task: &Task) -> Result<TaskResult> {
    let result = match task.format {
        BenchmarkFormat::Cloze => run_cloze(scorer, encoder, separator, &task.items)?,
        BenchmarkFormat::Generative => run_generative(scorer, encoder, separator, &task.items)?,
        BenchmarkFormat::Loglikelihood => run_targets(scorer, encoder, separator, &task.items)?,
    };
    Ok(TaskResult { format: task.format, items: task.items.len(), ..result })
}

/// A result with every measure empty, for the runs to fill in.
fn empty(format: BenchmarkFormat) -> TaskResult {
    TaskResult { format, items: 0, score: 0.0, acc_raw: None, acc_bytes: None, perplexity: None, chance: 0.0 }
}

/// Cloze items: each choice's log-likelihood after the context, the best choice by three rules.
fn run_cloze(scorer: &Scorer<'_>, encoder: &Encoder, separator: u32, items: &[Item]) -> Result<TaskResult> {
    let mut requests = Vec::new();
    for item in items {
        let Item::Cloze { context, choices, .. } = item else { unreachable!("cloze task items") };
        for c in choices {
            requests.push(encode_request(encoder, separator, context, c)?);
        }
    }
    let scores = scorer.loglikelihood(&requests)?;
    let (mut chars, mut bytes, mut raw, mut chance, mut at) = (0usize, 0usize, 0usize, 0.0, 0);
    for item in items {
        let Item::Cloze { choices, answer, .. } = item else { unreachable!("cloze task items") };
        let logprobs: Vec<f64> = scores[at..at + choices.len()].iter().map(|s| s.logprob).collect();
        at += choices.len();
        let picked = ClozePicks::new(choices, &logprobs);
        chars += usize::from(picked.per_char == *answer);
        bytes += usize::from(picked.per_byte == *answer);
        raw += usize::from(picked.raw == *answer);
        chance += 1.0 / choices.len() as f64;
    }
    let n = items.len().max(1) as f64;
    Ok(TaskResult {
        score: chars as f64 / n,
        acc_raw: Some(raw as f64 / n),
        acc_bytes: Some(bytes as f64 / n),
        chance: chance / n,
        ..empty(BenchmarkFormat::Cloze)
    })
}

/// The choice each rule picks: the highest log-likelihood per character (lm-evaluation-harness's
/// `acc_norm`, which divides by the string's length in characters), per UTF-8 byte, and summed.
#[derive(Debug, PartialEq, Eq)]
struct ClozePicks {
    per_char: usize,
    per_byte: usize,
    raw: usize,
}

impl ClozePicks {
    fn new(choices: &[String], logprobs: &[f64]) -> Self {
        let best = |f: &dyn Fn(usize) -> f64| {
            (0..choices.len()).max_by(|&a, &b| f(a).total_cmp(&f(b))).expect("at least 2 choices")
        };
        Self {
            per_char: best(&|k| logprobs[k] / choices[k].chars().count() as f64),
            per_byte: best(&|k| logprobs[k] / choices[k].len() as f64),
            raw: best(&|k| logprobs[k]),
        }
    }
}

/// Generative items: greedy generation to a stop string, exact match after trimming.
fn run_generative(scorer: &Scorer<'_>, encoder: &Encoder, separator: u32, items: &[Item]) -> Result<TaskResult> {
    let mut correct = 0;
    for item in items {
        let Item::Generative { context, answers, until, max_tokens } = item else {
            unreachable!("generative task items")
        };
        let prompt = encode_prompt(encoder, separator, context)?;
        let stop = |out: &[u32]| {
            out.last() == Some(&separator)
                || encoder.decode_lossy(out).is_ok_and(|t| until.iter().any(|u| t.contains(u.as_str())))
        };
        let generated = scorer.generate(&prompt, *max_tokens, &stop)?;
        let ids: Vec<u32> = generated.into_iter().filter(|&t| t != separator).collect();
        let text = encoder.decode_lossy(&ids)?;
        let cut = until.iter().filter_map(|u| text.find(u.as_str())).min().unwrap_or(text.len());
        let output = text[..cut].trim();
        correct += usize::from(answers.iter().any(|a| a.trim() == output));
    }
    Ok(TaskResult { score: correct as f64 / items.len().max(1) as f64, ..empty(BenchmarkFormat::Generative) })
}

/// Target items: the share whose every token is the model's greedy choice, and the perplexity of
/// the targets (`exp` of minus the mean log-likelihood per item), as lm-evaluation-harness reports
/// LAMBADA.
fn run_targets(scorer: &Scorer<'_>, encoder: &Encoder, separator: u32, items: &[Item]) -> Result<TaskResult> {
    let requests = items
        .iter()
        .map(|item| {
            let Item::Target { context, target } = item else { unreachable!("loglikelihood task items") };
            encode_request(encoder, separator, context, target)
        })
        .collect::<std::result::Result<Vec<_>, _>>()?;
    let scores = scorer.loglikelihood(&requests)?;
    let n = items.len().max(1) as f64;
    let greedy = scores.iter().filter(|s| s.greedy).count();
    let mean = scores.iter().map(|s| s.logprob).sum::<f64>() / n;
    Ok(TaskResult {
        score: greedy as f64 / n,
        perplexity: Some((-mean).exp()),
        ..empty(BenchmarkFormat::Loglikelihood)
    })
}

/// Held-out loss in windows of one length.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct LengthLoss {
    /// Tokens per window.
    pub length: usize,
    /// Mean NLL per token.
    pub loss: f64,
}

/// Everything measured on one checkpoint.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CheckpointReport {
    /// `base` (train) or `long-context`, or the checkpoint asked for.
    pub label: String,
    /// Stage that trained it.
    pub stage: String,
    /// Its step.
    pub step: u64,
    /// Tokens it was trained on in its stage.
    pub tokens_seen: u64,
    /// Sequence length it was trained at.
    pub seq_len: usize,
    /// Model shape and RoPE.
    pub model: LlamaConfig,
    /// Held-out perplexity by category, and `all`.
    pub perplexity: BTreeMap<String, Perplexity>,
    /// Probe log-probabilities (nats).
    pub probes: BTreeMap<String, f64>,
    /// Benchmarks by name.
    pub benchmarks: BTreeMap<String, TaskResult>,
    /// Passkey accuracy per length.
    pub passkey: Vec<PasskeyResult>,
    /// Held-out loss (all categories) in windows of each passkey length: how the loss holds up at
    /// lengths the checkpoint was or was not trained at.
    pub loss_by_length: Vec<LengthLoss>,
    /// Seconds the evaluation took.
    pub seconds: f64,
}

/// The held-out documents of the run's data-prep commit, encoded, up to `max_tokens` tokens.
async fn held_out(ctx: &Context, tok: &Tokenized, max_tokens: u64) -> Result<Vec<HeldOutDoc>> {
    let dir = ctx.dir.store().stage(ctx.run_name(), Stage::DataPrep)?;
    let Some(commit) = dir.committed(&ctx.run.spec.stage_config_hash(Stage::DataPrep)).await? else {
        return Err(EvalError::Invalid(format!(
            "data-prep has not committed outputs for this spec at {}; run it first",
            dir.url("_SUCCESS.json")
        )));
    };
    let mut docs = Vec::new();
    let mut total = 0u64;
    for f in commit.files.iter().filter(|f| f.path.starts_with("heldout/")) {
        let url = dir.url(&f.path);
        let bytes = dir.get(&f.path).await?;
        let raw = zstd::decode_all(&bytes[..]).map_err(|e| EvalError::Task {
            file: url.clone(),
            line: 0,
            reason: format!("not zstd: {e}"),
        })?;
        let text = String::from_utf8(raw).map_err(|_| EvalError::Task {
            file: url.clone(),
            line: 0,
            reason: "not UTF-8".into(),
        })?;
        for (i, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
            let doc: DocumentLine = serde_json::from_str(line).map_err(|e| EvalError::Task {
                file: url.clone(),
                line: i + 1,
                reason: e.to_string(),
            })?;
            let mut tokens = tok.encoder.encode(&doc.text)?;
            tokens.push(tok.separator);
            total += tokens.len() as u64;
            docs.push(HeldOutDoc { category: doc.category, text: doc.text, tokens });
            if total >= max_tokens {
                return Ok(docs);
            }
        }
    }
    Ok(docs)
}

/// The tasks: the spec's benchmark files, then the two built from held-out text.
async fn load_tasks(ctx: &Context, docs: &[HeldOutDoc]) -> Result<Vec<Task>> {
    let mut out = Vec::new();
    for b in &ctx.run.spec.eval.benchmarks {
        let bytes = crate::context::read_url(&b.url).await?;
        let text = String::from_utf8(bytes.to_vec()).map_err(|_| EvalError::Task {
            file: b.url.clone(),
            line: 0,
            reason: "not UTF-8".into(),
        })?;
        out.push(tasks::parse(&b.name, b.format, &b.url, &text)?);
    }
    let texts: Vec<&str> = docs.iter().map(|d| d.text.as_str()).collect();
    for task in [
        tasks::next_sentence(&texts, BUILTIN_ITEMS, ctx.run.spec.seed),
        tasks::last_word(&texts, BUILTIN_ITEMS, ctx.run.spec.seed),
    ] {
        if task.items.is_empty() {
            eprintln!("eval: the held-out documents give no {} items; skipping it", task.name);
        } else {
            out.push(task);
        }
    }
    Ok(out)
}

/// What every checkpoint is measured on.
struct Suite<'a> {
    tok: &'a Tokenized,
    docs: Vec<HeldOutDoc>,
    tasks: Vec<Task>,
    passkey_lengths: Vec<usize>,
    passkey_trials: usize,
    seed: u64,
    probes: &'a [pretrain_crd::spec::Probe],
    /// Unigram log-probabilities of the training tokens, when the shards are readable.
    unigram: Option<Vec<f64>>,
}

impl<'a> Suite<'a> {
    /// Everything measured at each checkpoint: held-out documents, benchmarks, passkey lengths, the
    /// unigram baseline over the training shards, and the probes.
    async fn load(ctx: &'a Context, tok: &'a Tokenized) -> Result<Self> {
        let spec = &ctx.run.spec;
        let docs = held_out(ctx, tok, spec.eval.max_held_out_tokens).await?;
        if docs.is_empty() {
            return Err(EvalError::Invalid(
                "the run has no held-out documents to evaluate on; set data.heldOutFraction above 0".into(),
            ));
        }
        let tasks = load_tasks(ctx, &docs).await?;
        let mut passkey_lengths: Vec<usize> = spec.eval.passkey.lengths.iter().map(|&l| l as usize).collect();
        if passkey_lengths.is_empty() {
            passkey_lengths.push(spec.train.seq_len as usize);
            passkey_lengths.extend(spec.long_context.as_ref().map(|lc| lc.seq_len as usize));
        }
        let cache = tempfile::tempdir()?;
        let shards = tok.local_shards("shards/", cache.path()).await?;
        let unigram = match TokenStream::open(&shards) {
            Ok(stream) if !stream.is_empty() => Some(unigram_logprobs(&stream, tok.vocab_size() as usize, 100_000_000)),
            Ok(_) => None,
            Err(e) => return Err(EvalError::Invalid(e.to_string())),
        };
        Ok(Self {
            unigram,
            tok,
            docs,
            tasks,
            passkey_lengths,
            passkey_trials: spec.eval.passkey.trials as usize,
            seed: spec.seed,
            probes: &spec.eval.probes,
        })
    }
}

impl Suite<'_> {
    /// Measurements taken per checkpoint (for progress).
    fn measurements(&self) -> u64 {
        (2 + self.tasks.len() + self.passkey_lengths.len()) as u64
    }
}

async fn evaluate_checkpoint(
    suite: &Suite<'_>,
    label: &str,
    dir: &StageDir,
    step: u64,
    device: &Device,
    progress: &mut (Progress, u64),
) -> Result<CheckpointReport> {
    let mut tick = |what: &str| {
        progress.1 += 1;
        let done = progress.1;
        progress.0.update(done, || format!("{label}: {what}"));
    };
    let started = std::time::Instant::now();
    let url = dir.url(&format!("ckpt/{}", checkpoint::dir_name(step)));
    let loaded = checkpoint::load(dir, step, device).await?;
    let config = loaded.state.model.clone();
    let params =
        Params::from_named(&config, loaded.model, device).map_err(|e| EvalError::Invalid(format!("{url}: {e}")))?;
    let seq_len = loaded.state.seq_len;
    let longest = suite.passkey_lengths.iter().copied().max().unwrap_or(0).max(seq_len);
    let model = Llama::new(config.clone(), params, longest, device)?;
    let dtype = if device.is_cuda() { DType::BF16 } else { DType::F32 };
    let scorer = Scorer::new(&model, dtype);
    let (encoder, separator) = (&suite.tok.encoder, suite.tok.separator);
    println!("eval: {label}: {url} (trained at {seq_len} tokens)");

    let mut perplexity = perplexity(&scorer, &suite.docs, separator, seq_len)?;
    if let Some(u) = &suite.unigram {
        add_unigram(&mut perplexity, &suite.docs, u);
    }
    tick("perplexity");
    if let Some(all) = perplexity.get("all") {
        println!(
            "eval: {label}: held-out loss {:.4} (unigram {}), perplexity {:.2}, {:.4} bits/byte over {} tokens",
            all.loss,
            all.unigram_loss.map_or_else(|| "-".into(), |u| format!("{u:.4}")),
            all.perplexity,
            all.bits_per_byte,
            all.tokens
        );
    }
    let probes = probe_logprobs(&scorer, encoder, separator, suite.probes)?;
    tick("probes");
    let probes = suite.probes.iter().zip(probes).map(|(p, lp)| (p.name.clone(), lp)).collect();
    let mut benchmarks = BTreeMap::new();
    for task in &suite.tasks {
        let r = run_task(&scorer, encoder, separator, task)?;
        tick(&task.name);
        println!("eval: {label}: {} {:.3} over {} items (chance {:.3})", task.name, r.score, r.items, r.chance);
        benchmarks.insert(task.name.clone(), r);
    }
    let loss_by_length = losses_by_length(suite, &scorer, seq_len, &perplexity)?;
    let mut passkeys = Vec::new();
    for &length in &suite.passkey_lengths {
        let r = passkey::run(&scorer, encoder, separator, length, suite.passkey_trials, suite.seed)?;
        tick(&format!("passkey {length}"));
        println!(
            "eval: {label}: passkey at {length} tokens {}/{} (key log-prob {:.2})",
            r.correct, r.trials, r.key_logprob
        );
        passkeys.push(r);
    }
    Ok(CheckpointReport {
        label: label.to_string(),
        stage: dir.stage().to_string(),
        step,
        tokens_seen: loaded.state.tokens_seen,
        seq_len,
        model: config,
        perplexity,
        probes,
        benchmarks,
        passkey: passkeys,
        loss_by_length,
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// The held-out loss over all categories in windows of each passkey length (the perplexity already
/// measured at the checkpoint's own length is reused).
fn losses_by_length(
    suite: &Suite<'_>,
    scorer: &Scorer<'_>,
    seq_len: usize,
    at_own_length: &BTreeMap<String, Perplexity>,
) -> Result<Vec<LengthLoss>> {
    let mut out = Vec::new();
    for &length in &suite.passkey_lengths {
        let all = if length == seq_len {
            at_own_length.get("all").copied()
        } else {
            perplexity(scorer, &suite.docs, suite.tok.separator, length)?.get("all").copied()
        };
        if let Some(all) = all {
            out.push(LengthLoss { length, loss: all.loss });
        }
    }
    Ok(out)
}

/// Probe readings from a stage's `metrics.jsonl` (written at every checkpoint).
async fn probe_history(dir: &StageDir) -> Result<Vec<ProbeRow>> {
    let Some(bytes) = dir.store().get_opt(&dir.key("metrics.jsonl")?).await? else {
        return Ok(Vec::new());
    };
    let mut rows = Vec::new();
    for line in String::from_utf8_lossy(&bytes).lines() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else { continue };
        let Some(probes) = v["probes"].as_object() else { continue };
        rows.push(ProbeRow {
            stage: dir.stage().to_string(),
            step: v["step"].as_u64().unwrap_or(0),
            tokens: v["tokens"].as_u64().unwrap_or(0),
            logprobs: probes.iter().filter_map(|(k, v)| Some((k.clone(), v.as_f64()?))).collect(),
        });
    }
    Ok(rows)
}

/// `eval.json`.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Report {
    /// Per checkpoint.
    pub checkpoints: Vec<CheckpointReport>,
    /// Probe log-probabilities at every checkpoint training recorded.
    pub probe_history: Vec<ProbeRow>,
    /// Benchmarks: name and where the items came from.
    pub tasks: BTreeMap<String, String>,
}

/// Which checkpoint `--checkpoint` names: `<stage>` (its newest) or `<stage>/<step>` (or
/// `<stage>/step-<09d>`).
pub fn parse_checkpoint_arg(arg: &str) -> Result<(Stage, Option<u64>)> {
    let (stage, step) = match arg.split_once('/') {
        Some((s, n)) => (s, Some(n)),
        None => (arg, None),
    };
    let stage: Stage = stage.parse().map_err(|e| EvalError::Invalid(format!("--checkpoint {arg:?}: {e}")))?;
    if !stage.is_training() {
        return Err(EvalError::Invalid(format!("--checkpoint {arg:?}: only train and long-context have checkpoints")));
    }
    let step = match step {
        None => None,
        Some(n) => Some(
            n.trim_start_matches("step-")
                .parse::<u64>()
                .map_err(|_| EvalError::Invalid(format!("--checkpoint {arg:?}: {n:?} is not a step number")))?,
        ),
    };
    Ok((stage, step))
}

/// Runs the stage: evaluates train's final checkpoint (and long-context's) and commits the report;
/// or, with `only`, evaluates that one checkpoint and writes its report without committing.
pub async fn run(ctx: &Context, only: Option<&str>) -> Result<Option<StageCommit>> {
    let tok = Tokenized::load(ctx).await?;
    let suite = Suite::load(ctx, &tok).await?;
    let device = ctx.device()?;
    let targets = targets(ctx, only).await?;
    let mut checkpoints = Vec::new();
    let total = suite.measurements() * targets.len() as u64;
    let mut progress = (Progress::new("eval", "measurements", Some(total)), 0);
    for (label, dir, step) in &targets {
        checkpoints.push(evaluate_checkpoint(&suite, label, dir, *step, &device, &mut progress).await?);
    }
    let mut probe_rows = Vec::new();
    for stage in [Stage::Train, Stage::LongContext] {
        probe_rows.extend(probe_history(&ctx.dir.store().stage(ctx.run_name(), stage)?).await?);
    }
    let report = Report {
        checkpoints,
        probe_history: probe_rows,
        tasks: suite.tasks.iter().map(|t| (t.name.clone(), t.source.clone())).collect(),
    };
    let json = serde_json::to_vec_pretty(&report).expect("the report serialises");
    let markdown = markdown(ctx.run_name(), &report);
    print!("{markdown}");
    if only.is_some() {
        let prefix = format!("checkpoints/{}", targets[0].0);
        ctx.dir.put(&format!("{prefix}/eval.json"), Bytes::from(json)).await?;
        ctx.dir.put(&format!("{prefix}/report.md"), Bytes::from(markdown)).await?;
        println!("eval: wrote {}", ctx.dir.url(&format!("{prefix}/report.md")));
        return Ok(None);
    }
    let files = vec![
        ctx.dir.put("eval.json", Bytes::from(json)).await?,
        ctx.dir.put("report.md", Bytes::from(markdown)).await?,
    ];
    Ok(Some(ctx.dir.commit(&ctx.config_hash(), files, summary(&report)).await?))
}

/// The checkpoints to evaluate, each with its label: the one `--checkpoint` names, or the final
/// checkpoints of train (`base`) and long-context.
async fn targets(ctx: &Context, only: Option<&str>) -> Result<Vec<(String, StageDir, u64)>> {
    let mut targets = Vec::new();
    if let Some(arg) = only {
        let (stage, step) = parse_checkpoint_arg(arg)?;
        let dir = ctx.dir.store().stage(ctx.run_name(), stage)?;
        let step = match step {
            Some(s) => s,
            None => *checkpoint::steps(&dir).await?.first().ok_or_else(|| {
                EvalError::Invalid(format!("--checkpoint {arg}: no checkpoints under {}", dir.url("ckpt/")))
            })?,
        };
        targets.push((format!("{stage}-{}", checkpoint::dir_name(step)), dir, step));
    } else {
        for (stage, label) in [(Stage::Train, "base"), (Stage::LongContext, "long-context")] {
            if stage == Stage::LongContext && ctx.run.spec.long_context.is_none() {
                continue;
            }
            let (dir, step) = checkpoint::committed_final(ctx, stage).await?;
            targets.push((label.to_string(), dir, step));
        }
    }
    Ok(targets)
}

/// The stage's commit statistics: per checkpoint, its step, perplexity, bits per byte, benchmark
/// scores and passkey accuracies.
fn summary(report: &Report) -> serde_json::Value {
    let checkpoints: BTreeMap<String, serde_json::Value> = report
        .checkpoints
        .iter()
        .map(|c| {
            let all = c.perplexity.get("all");
            (
                c.label.clone(),
                serde_json::json!({
                    "step": c.step,
                    "perplexity": all.map(|p| p.perplexity),
                    "bitsPerByte": all.map(|p| p.bits_per_byte),
                    "benchmarks": c.benchmarks.iter().map(|(k, v)| (k.clone(), v.score)).collect::<BTreeMap<_, _>>(),
                    "passkey": c.passkey.iter().map(|p| (p.length.to_string(), p.accuracy)).collect::<BTreeMap<_, _>>(),
                }),
            )
        })
        .collect();
    serde_json::json!({ "checkpoints": checkpoints })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn acc_norm_divides_by_characters_as_lm_eval_does_and_acc_bytes_by_bytes() {
        // " café" is 5 characters in 6 bytes: per character it loses, per byte it wins.
        let choices = [" café".to_string(), " cafe".to_string()];
        let picks = ClozePicks::new(&choices, &[-5.5, -5.4]);
        assert_eq!(picks, ClozePicks { per_char: 1, per_byte: 0, raw: 1 });
        let picks = ClozePicks::new(&choices, &[-5.0, -5.4]);
        assert_eq!(picks, ClozePicks { per_char: 0, per_byte: 0, raw: 0 });
    }

    #[test]
    fn checkpoint_arguments_name_a_stage_and_maybe_a_step() {
        assert_eq!(parse_checkpoint_arg("train").unwrap(), (Stage::Train, None));
        assert_eq!(parse_checkpoint_arg("train/40").unwrap(), (Stage::Train, Some(40)));
        assert_eq!(parse_checkpoint_arg("long-context/step-000000012").unwrap(), (Stage::LongContext, Some(12)));
        assert!(parse_checkpoint_arg("tokenize").unwrap_err().to_string().contains("only train and long-context"));
        assert!(parse_checkpoint_arg("train/x").unwrap_err().to_string().contains("not a step number"));
        assert!(parse_checkpoint_arg("trian").unwrap_err().to_string().contains("unknown stage"));
    }
}
