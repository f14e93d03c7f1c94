//! The eval stage: every final checkpoint of the run (train's, and long-context's when configured)
//! measured the same way, then `eval.json` and a Markdown report with a base vs long-context
//! comparison and each probe's log-probability across all checkpoints that training recorded.
//!
//! `pretrain-worker eval --checkpoint train/40` evaluates one checkpoint instead and writes its
//! report under `eval/checkpoints/<stage>-step-<n>/` without committing the stage.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use bytes::Bytes;
use candle_core::{DType, Device};
use pretrain_crd::Stage;
use pretrain_crd::spec::BenchmarkFormat;
use pretrain_store::{StageCommit, StageDir};
use serde::Serialize;

use super::passkey::{self, PasskeyResult};
use super::tasks::{self, Item, Task};
use super::{EvalError, Request, Scorer, encode_request, probe_logprobs};
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

/// Held-out perplexity of one category (or all).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Perplexity {
    /// Documents scored.
    pub documents: u64,
    /// Tokens predicted (each document's end-of-sequence token included).
    pub tokens: u64,
    /// UTF-8 bytes of the documents' text.
    pub bytes: u64,
    /// Summed negative log-likelihood, nats.
    pub nll: f64,
    /// Mean NLL per token.
    pub loss: f64,
    /// `exp(loss)`.
    pub perplexity: f64,
    /// `nll / ln 2 / bytes`: comparable across tokenizers.
    pub bits_per_byte: f64,
    /// Mean NLL per token of the same tokens under the training data's unigram distribution: the
    /// loss of a model that ignores context (the baseline a trained model must beat).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unigram_loss: Option<f64>,
}

impl Perplexity {
    fn new(documents: u64, tokens: u64, bytes: u64, nll: f64) -> Self {
        let loss = nll / tokens.max(1) as f64;
        Self {
            documents,
            tokens,
            bytes,
            nll,
            loss,
            perplexity: loss.exp(),
            bits_per_byte: nll / std::f64::consts::LN_2 / bytes.max(1) as f64,
            unigram_loss: None,
        }
    }
}

/// Natural-log unigram probabilities of the training tokens (add-one smoothed), counted over at most
/// `cap` tokens of the shards.
pub fn unigram_logprobs(stream: &TokenStream, vocab: usize, cap: u64) -> Vec<f64> {
    let mut counts = vec![1u64; vocab];
    let n = stream.len().min(cap);
    let mut buf = Vec::with_capacity(1 << 20);
    let mut at = 0;
    while at < n {
        buf.clear();
        let take = (n - at).min(1 << 20);
        stream.read(at, take, &mut buf);
        for &t in &buf {
            if let Some(c) = counts.get_mut(t as usize) {
                *c += 1;
            }
        }
        at += take;
    }
    let total: u64 = counts.iter().sum();
    counts.iter().map(|&c| (c as f64 / total as f64).ln()).collect()
}

/// Adds each category's unigram loss: the mean NLL of its tokens (after the leading separator, as
/// [`perplexity`] predicts them) under `logprobs`.
pub fn add_unigram(report: &mut BTreeMap<String, Perplexity>, docs: &[HeldOutDoc], logprobs: &[f64]) {
    let mut all = (0.0, 0u64);
    let mut by_category: BTreeMap<&str, (f64, u64)> = BTreeMap::new();
    for d in docs {
        let e = by_category.entry(&d.category).or_default();
        for &t in &d.tokens {
            let lp = logprobs.get(t as usize).copied().unwrap_or(f64::NEG_INFINITY);
            e.0 -= lp;
            e.1 += 1;
        }
    }
    for (category, (nll, n)) in by_category {
        all = (all.0 + nll, all.1 + n);
        if let Some(p) = report.get_mut(category) {
            p.unigram_loss = Some(nll / n.max(1) as f64);
        }
    }
    if let Some(p) = report.get_mut("all") {
        p.unigram_loss = Some(all.0 / all.1.max(1) as f64);
    }
}

/// One held-out document, encoded.
#[derive(Debug, Clone)]
pub struct HeldOutDoc {
    /// Category.
    pub category: String,
    /// Text.
    pub text: String,
    /// Tokens, the separator appended.
    pub tokens: Vec<u32>,
}

/// Perplexity per category and over all (`"all"`): each category's documents back to back as in
/// training (after a leading separator), cut into windows of `seq_len` predicted tokens.
pub fn perplexity(
    scorer: &Scorer<'_>,
    docs: &[HeldOutDoc],
    separator: u32,
    seq_len: usize,
) -> Result<BTreeMap<String, Perplexity>> {
    let mut by_category: BTreeMap<&str, Vec<&HeldOutDoc>> = BTreeMap::new();
    for d in docs {
        by_category.entry(&d.category).or_default().push(d);
    }
    let mut out = BTreeMap::new();
    let (mut all_docs, mut all_tokens, mut all_bytes, mut all_nll) = (0, 0, 0, 0.0);
    for (category, docs) in by_category {
        let mut stream = vec![separator];
        for d in &docs {
            stream.extend(&d.tokens);
        }
        let requests: Vec<Request> = (0..stream.len() - 1)
            .step_by(seq_len)
            .map(|start| {
                let end = (start + seq_len + 1).min(stream.len());
                Request { context: vec![stream[start]], continuation: stream[start + 1..end].to_vec() }
            })
            .collect();
        let nll: f64 = -scorer.loglikelihood(&requests)?.iter().map(|s| s.logprob).sum::<f64>();
        let tokens = stream.len() as u64 - 1;
        let bytes: u64 = docs.iter().map(|d| d.text.len() as u64).sum();
        out.insert(category.to_string(), Perplexity::new(docs.len() as u64, tokens, bytes, nll));
        (all_docs, all_tokens, all_bytes, all_nll) =
            (all_docs + docs.len() as u64, all_tokens + tokens, all_bytes + bytes, all_nll + nll);
    }
    out.insert("all".into(), Perplexity::new(all_docs, all_tokens, all_bytes, all_nll));
    Ok(out)
}

/// A benchmark's score.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct TaskResult {
    /// `cloze` or `generative`.
    pub format: BenchmarkFormat,
    /// Items scored.
    pub items: usize,
    /// Cloze: accuracy by log-likelihood per byte of the choice; generative: exact match.
    pub score: f64,
    /// Cloze: accuracy by summed log-likelihood.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub acc_raw: Option<f64>,
    /// What a uniform guess scores (cloze: mean 1/choices; generative: 0).
    pub chance: f64,
}

/// Scores a benchmark.
pub fn run_task(scorer: &Scorer<'_>, encoder: &Encoder, separator: u32, task: &Task) -> Result<TaskResult> {
    match task.format {
        BenchmarkFormat::Cloze => {
            let mut requests = Vec::new();
            for item in &task.items {
                let Item::Cloze { context, choices, .. } = item else { unreachable!("cloze task items") };
                for c in choices {
                    requests.push(encode_request(encoder, separator, context, c)?);
                }
            }
            let scores = scorer.loglikelihood(&requests)?;
            let (mut norm, mut raw, mut chance, mut at) = (0usize, 0usize, 0.0, 0);
            for item in &task.items {
                let Item::Cloze { choices, answer, .. } = item else { unreachable!("cloze task items") };
                let s = &scores[at..at + choices.len()];
                at += choices.len();
                let argmax = |f: &dyn Fn(usize) -> f64| {
                    (0..choices.len()).max_by(|&a, &b| f(a).total_cmp(&f(b))).expect("at least 2 choices")
                };
                norm += usize::from(argmax(&|k| s[k].logprob / choices[k].len() as f64) == *answer);
                raw += usize::from(argmax(&|k| s[k].logprob) == *answer);
                chance += 1.0 / choices.len() as f64;
            }
            let n = task.items.len().max(1) as f64;
            Ok(TaskResult {
                format: task.format,
                items: task.items.len(),
                score: norm as f64 / n,
                acc_raw: Some(raw as f64 / n),
                chance: chance / n,
            })
        }
        BenchmarkFormat::Generative => {
            let mut correct = 0;
            for item in &task.items {
                let Item::Generative { context, answers, until, max_tokens } = item else {
                    unreachable!("generative task items")
                };
                let prompt = encode_request(encoder, separator, context, "")?.context;
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
            Ok(TaskResult {
                format: task.format,
                items: task.items.len(),
                score: correct as f64 / task.items.len().max(1) as f64,
                acc_raw: None,
                chance: 0.0,
            })
        }
    }
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
        seconds: started.elapsed().as_secs_f64(),
    })
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

/// The Markdown report.
pub fn markdown(run: &str, report: &Report) -> String {
    let mut md = String::new();
    let _ = writeln!(md, "# Evaluation of `{run}`\n");
    for c in &report.checkpoints {
        checkpoint_section(&mut md, c);
    }
    if let [base, long] = &report.checkpoints[..]
        && long.stage == Stage::LongContext.as_str()
    {
        comparison_section(&mut md, base, long);
    }
    if !report.probe_history.is_empty() {
        probe_history_section(&mut md, &report.probe_history);
    }
    md
}

/// One checkpoint's tables: held-out perplexity, benchmarks, passkey and probes.
fn checkpoint_section(md: &mut String, c: &CheckpointReport) {
    let _ = writeln!(
        md,
        "## {} ({} step {}, {} tokens, trained at {} tokens, RoPE base {:.1}{})\n",
        c.label,
        c.stage,
        c.step,
        c.tokens_seen,
        c.seq_len,
        c.model.rope_base,
        if c.model.rope_scaling.is_none() {
            String::new()
        } else {
            format!(", {}", serde_json::to_string(&c.model.rope_scaling).unwrap_or_default())
        }
    );
    let _ = writeln!(md, "| held-out | documents | tokens | bytes | loss | unigram loss | perplexity | bits/byte |");
    let _ = writeln!(md, "|---|---:|---:|---:|---:|---:|---:|---:|");
    for (cat, p) in &c.perplexity {
        let unigram = p.unigram_loss.map_or_else(|| "-".into(), |u| format!("{u:.4}"));
        let _ = writeln!(
            md,
            "| {cat} | {} | {} | {} | {:.4} | {unigram} | {:.2} | {:.4} |",
            p.documents, p.tokens, p.bytes, p.loss, p.perplexity, p.bits_per_byte
        );
    }
    if !c.benchmarks.is_empty() {
        let _ = writeln!(md, "\n| benchmark | form | items | score | chance |");
        let _ = writeln!(md, "|---|---|---:|---:|---:|");
        for (name, b) in &c.benchmarks {
            let form = match b.format {
                BenchmarkFormat::Cloze => "cloze, acc per byte",
                BenchmarkFormat::Generative => "generative, exact match",
            };
            let _ = writeln!(md, "| {name} | {form} | {} | {:.3} | {:.3} |", b.items, b.score, b.chance);
        }
    }
    if !c.passkey.is_empty() {
        let _ = writeln!(md, "\n| passkey length | correct | accuracy | key log-prob |");
        let _ = writeln!(md, "|---:|---:|---:|---:|");
        for p in &c.passkey {
            let _ = writeln!(
                md,
                "| {} | {}/{} | {:.2} | {:.2} |",
                p.length, p.correct, p.trials, p.accuracy, p.key_logprob
            );
        }
    }
    if !c.probes.is_empty() {
        let _ = writeln!(md, "\n| probe | log-prob |\n|---|---:|");
        for (name, lp) in &c.probes {
            let _ = writeln!(md, "| {name} | {lp:.3} |");
        }
    }
    let _ = writeln!(md);
}

/// Base against long-context on the measures both have.
fn comparison_section(md: &mut String, base: &CheckpointReport, long: &CheckpointReport) {
    let _ = writeln!(md, "## {} vs {}\n", base.label, long.label);
    let _ = writeln!(md, "| measure | {} | {} |\n|---|---:|---:|", base.label, long.label);
    if let (Some(a), Some(b)) = (base.perplexity.get("all"), long.perplexity.get("all")) {
        let _ = writeln!(
            md,
            "| held-out bits/byte (at {} vs {} tokens) | {:.4} | {:.4} |",
            base.seq_len, long.seq_len, a.bits_per_byte, b.bits_per_byte
        );
    }
    for (name, a) in &base.benchmarks {
        if let Some(b) = long.benchmarks.get(name) {
            let _ = writeln!(md, "| {name} | {:.3} | {:.3} |", a.score, b.score);
        }
    }
    for (a, b) in base.passkey.iter().zip(&long.passkey) {
        let _ = writeln!(md, "| passkey at {} tokens | {:.2} | {:.2} |", a.length, a.accuracy, b.accuracy);
    }
    let _ = writeln!(md);
}

/// The probes at every checkpoint training recorded.
fn probe_history_section(md: &mut String, history: &[ProbeRow]) {
    let names: Vec<&String> =
        history.iter().flat_map(|r| r.logprobs.keys()).collect::<std::collections::BTreeSet<_>>().into_iter().collect();
    let _ = writeln!(md, "## Probes across checkpoints (log-prob of the target, nats)\n");
    let _ = write!(md, "| stage | step | tokens |");
    for n in &names {
        let _ = write!(md, " {n} |");
    }
    let _ = write!(md, "\n|---|---:|---:|");
    for _ in &names {
        let _ = write!(md, "---:|");
    }
    let _ = writeln!(md);
    for r in history {
        let _ = write!(md, "| {} | {} | {} |", r.stage, r.step, r.tokens);
        for n in &names {
            match r.logprobs.get(*n) {
                Some(v) => {
                    let _ = write!(md, " {v:.3} |");
                }
                None => md.push_str(" |"),
            }
        }
        let _ = writeln!(md);
    }
    let _ = writeln!(md);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unigram_loss_is_the_mean_nll_of_each_category_s_tokens() {
        let doc =
            |category: &str, tokens: Vec<u32>| HeldOutDoc { category: category.into(), text: String::new(), tokens };
        let docs = vec![doc("web", vec![0, 1, 1]), doc("code", vec![2])];
        let logprobs = [0.5f64.ln(), 0.25f64.ln(), 0.25f64.ln()];
        let mut report: BTreeMap<String, Perplexity> =
            ["web", "code", "all"].iter().map(|c| (c.to_string(), Perplexity::new(1, 1, 1, 1.0))).collect();
        add_unigram(&mut report, &docs, &logprobs);
        let close = |a: Option<f64>, b: f64| (a.unwrap() - b).abs() < 1e-12;
        assert!(close(report["web"].unigram_loss, -(0.5f64.ln() + 2.0 * 0.25f64.ln()) / 3.0));
        assert!(close(report["code"].unigram_loss, -(0.25f64.ln())));
        assert!(close(report["all"].unigram_loss, -(0.5f64.ln() + 3.0 * 0.25f64.ln()) / 4.0));
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
