//! The train and long-context stages: the loop that drives a [`Trainer`] step by step, measures and
//! logs each step, saves checkpoints in the background, stops on SIGTERM, and commits the final
//! checkpoint with the stage's [`TrainStats`].

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use pretrain_crd::Stage;
use pretrain_crd::spec::{CheckpointEvery, SpikeAction};
use pretrain_store::FileEntry;
use pretrain_store::artifact::{DataPrepStats, RunHistory, TrainStats};

use super::error::Result;
pub use super::error::TrainError;
use super::interval::Interval;
use super::job::{self, Job, LongData};
use super::loader::{BatchShape, Prefetcher};
use super::metrics::{MetricsLine, MetricsLog, Pace, Throughput};
use super::saver::Saver;
use super::tensorboard;
use super::trainer::{StepReport, Trainer};
use crate::Context;
use crate::checkpoint;
use crate::frame::Outcome;
use crate::model::{Llama, Scaling};
use crate::score::{Scorer, probe_logprobs};
use crate::tokens::TokenStream;
use crate::tokens::Tokenized;

/// Set by SIGTERM; the loop checkpoints and stops at the end of the current step.
pub fn stop_flag() -> Arc<AtomicBool> {
    let flag = Arc::new(AtomicBool::new(false));
    let set = Arc::clone(&flag);
    tokio::spawn(async move {
        if let Ok(mut term) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            term.recv().await;
            set.store(true, Ordering::SeqCst);
        }
    });
    flag
}

/// The token streams a job reads: tokenize's shards, copied to a local cache.
struct Streams {
    train: Arc<TokenStream>,
    heldout: Option<TokenStream>,
}

impl Streams {
    async fn open(tok: &Tokenized, job: &Job, cache: &std::path::Path) -> Result<Self> {
        let train_paths = tok.local_shards("shards/", cache).await?;
        let heldout_paths = tok.local_shards("heldout/", cache).await?;
        let mut train = TokenStream::open(&train_paths)?;
        if train.len() < job.seq_len as u64 + 1 {
            return Err(TrainError::Invalid(format!(
                "the token shards hold {} tokens, fewer than one sequence of {} tokens",
                train.len(),
                job.seq_len
            )));
        }
        if let Some(long) = &job.long_data {
            train = long_context_data(tok, train, long, job.label, cache).await?;
        }
        let heldout = if heldout_paths.is_empty() { None } else { Some(TokenStream::open(&heldout_paths)?) };
        Ok(Self { train: Arc::new(train), heldout })
    }
}

/// The long-context stream: long documents upsampled within each category (Fu et al. 2024), with
/// a line per category saying how the share of long-document tokens changed.
async fn long_context_data(
    tok: &Tokenized,
    train: TokenStream,
    long: &LongData,
    label: &str,
    cache: &std::path::Path,
) -> Result<TokenStream> {
    let categories = match tok.categories(cache).await? {
        Some(c) => c,
        None => {
            eprintln!(
                "{label}: tokenize's output has no per-document categories (written by an older version): all documents count as one category"
            );
            vec![0; train.documents() as usize]
        }
    };
    let (train, report) = train
        .upsample_long(&categories, long.long_tokens, long.upsample, long.seed)
        .map_err(|e| TrainError::Invalid(format!("long-context data: {e}")))?;
    let share = |(tokens, long): (u64, u64)| 100.0 * long as f64 / tokens.max(1) as f64;
    for (c, (before, after)) in report.before.iter().zip(&report.after).enumerate() {
        println!(
            "{label}: {}: {} tokens, {:.1}% in documents of {}+ tokens (the training stream: {} tokens, {:.1}%)",
            long.categories.get(c).map_or("all", String::as_str),
            after.0,
            share(*after),
            long.long_tokens,
            before.0,
            share(*before)
        );
    }
    Ok(train)
}

/// Refuses a token budget that would repeat a category beyond `maxEpochs` (the epochs the mix gave
/// each category, from data-prep's commit, times the passes over the stream), and says any
/// repetition ([`job::check_budget`]).
async fn check_budget(ctx: &Context, job: &Job, stream_tokens: u64) -> Result<()> {
    let spec = &ctx.run.spec;
    let dir = ctx.dir.store().stage(ctx.run_name(), Stage::DataPrep)?;
    let epochs = match dir.committed(&spec.stage_config_hash(Stage::DataPrep)).await? {
        Some(commit) => serde_json::from_value::<DataPrepStats>(commit.stats).map(|s| s.mix.epochs).unwrap_or_default(),
        None => Default::default(),
    };
    let budget = job.total_steps * job.step_tokens();
    match job::check_budget(budget, stream_tokens, &epochs, spec.data.mix.max_epochs) {
        Ok(None) => Ok(()),
        Ok(Some(said)) => {
            eprintln!("{}: {said}", job.label);
            Ok(())
        }
        Err(refused) => Err(TrainError::Invalid(refused)),
    }
}

/// Runs the train or long-context stage (as `ctx.stage` says) to its commit, or until SIGTERM.
pub async fn run(ctx: &Context, stop: Arc<AtomicBool>) -> Result<Outcome> {
    let begun = Instant::now();
    let spec = &ctx.run.spec;
    let tok = Tokenized::load(ctx).await?;
    let job = match ctx.stage {
        Stage::LongContext => Job::long_context(ctx, tok.vocab_size()).await?,
        _ => Job::train(spec, tok.vocab_size()),
    };
    let cache = tempfile::tempdir()?;
    let streams = Streams::open(&tok, &job, cache.path()).await?;
    if ctx.stage == Stage::Train {
        check_budget(ctx, &job, streams.train.len()).await?;
    }
    let device = ctx.device()?;
    let dtype = job::dtype(spec.train.precision, &device)?;
    job.config.check().map_err(TrainError::Invalid)?;
    let shape = job.batch_shape(ctx)?;
    let mut trainer = Trainer::start(ctx, job.clone(), shape, dtype, &device).await?;
    announce(&job, dtype, &device);

    let (first_step, cursor) = (trainer.state.step, trainer.state.cursor);
    let mut metrics = MetricsLog::open(&ctx.dir, cache.path(), first_step).await?;
    let mut prefetch = Prefetcher::start(Arc::clone(&streams.train), shape, first_step, job.total_steps, cursor, 4);
    let throughput = Throughput::new(&job, &device, spec.train.resources.gpu_type.as_deref(), shape.world);
    let wait = crate::dist::collective_timeout();
    let mut saver = Saver::new(ctx.dir.clone(), spec.train.checkpoint.keep, trainer.shard(), wait);
    let gpus = spec.train.resources.nodes * spec.train.resources.gpus_per_node.max(1);
    let mut interval = Interval::new(&spec.train.checkpoint, gpus, first_step);
    if first_step > 0 && !trainer.state.history.stopped {
        trainer.state.history.failures += 1; // resumed after a failure, not a checkpoint on SIGTERM
    }
    trainer.state.history.stopped = false;
    let mut pace = Pace::new(&job, first_step);
    trainer.state.history.startup_seconds += begun.elapsed().as_secs_f64();
    let mut scheduled = due(&interval, &trainer, &job, first_step + 1);
    while trainer.state.step < job.total_steps {
        let Some(batch) = prefetch.next() else { break };
        let started = Instant::now();
        let step = trainer.step(&batch, stop.load(Ordering::SeqCst), scheduled)?;
        if step.spike == Some(SpikeAction::Rollback) {
            // The newest checkpoint must be complete (every shard, and rank 0's manifest) before
            // any rank reads it: each waits for its save, then they meet in the rollback.
            saver.wait().await?;
            trainer.roll_back(ctx).await?;
        }
        let mut line = throughput.line(&trainer.state, &step, started.elapsed().as_secs_f64());
        if !trainer.leader() {
            // Rank 0 measures and logs for the gang; every rank saves its shard.
            match follow(&mut trainer, &mut saver, &step).await? {
                Some(stopped) => return Ok(stopped),
                None => continue,
            }
        }
        count_step(&mut trainer, &mut interval, line.seconds);
        // Held-out loss and probes only at scheduled checkpoints: a checkpoint on SIGTERM must be quick
        // (the grace period runs), and the metrics stay those of an uninterrupted run.
        let held = Instant::now();
        if step.checkpoint {
            measure(&trainer, &streams, &tok, ctx, &mut line)?;
            trainer.state.history.eval_seconds += held.elapsed().as_secs_f64();
        }
        metrics.write(&line)?;
        pace.report(&line);
        if step.checkpoint || step.stopping {
            trainer.state.history.stopped = step.stopping;
            save(&mut trainer, &mut saver, Some(&mut metrics)).await?;
            interval.checkpointed(trainer.state.step, held.elapsed().as_secs_f64());
            announce_interval(&job, &interval, &trainer.state.history, spec.train.checkpoint.every);
            if step.stopping {
                saver.wait().await?;
                println!("{}: checkpointed step {} on SIGTERM", job.label, trainer.state.step);
                trainer.collective.finish()?;
                return Ok(Outcome::Preempted { step: trainer.state.step });
            }
        }
        saver.publish(&mut metrics)?;
        scheduled = due(&interval, &trainer, &job, trainer.state.step + 1);
    }
    if !trainer.leader() {
        return joined(trainer, saver).await;
    }
    let files = saver.finish().await?;
    let stats = stats(&job, &trainer, &streams, pace.seconds());
    commit(ctx, trainer, files, &mut metrics, &stats, &device).await
}

/// Whether rank 0 schedules a checkpoint of `step` (the last step is always one). It decides a step
/// ahead, and the decision travels in the step's all-reduce, so every rank saves its shard of it.
fn due(interval: &Interval, trainer: &Trainer, job: &Job, step: u64) -> bool {
    trainer.leader() && (interval.due(step, &trainer.state.history) || step == job.total_steps)
}

/// A rank other than 0 after `step`: it saves its shard when the step is a checkpoint, and after a
/// stop request, saves it and stops (`Some`).
async fn follow(trainer: &mut Trainer, saver: &mut Saver, step: &StepReport) -> Result<Option<Outcome>> {
    if step.checkpoint || step.stopping {
        save(trainer, saver, None).await?;
    }
    if !step.stopping {
        return Ok(None);
    }
    saver.wait().await?;
    trainer.collective.finish()?;
    Ok(Some(Outcome::Preempted { step: trainer.state.step }))
}

/// A rank other than 0 at the end: once its last shard is saved, it waits for rank 0's commit (a
/// gang whose commit failed must not look finished).
async fn joined(mut trainer: Trainer, mut saver: Saver) -> Result<Outcome> {
    saver.wait().await?;
    trainer.collective.finish()?;
    Ok(Outcome::Joined { step: trainer.state.step })
}

/// With `checkpoint.every: auto`, says the interval chosen after a checkpoint, and why.
fn announce_interval(job: &Job, interval: &Interval, history: &RunHistory, every: CheckpointEvery) {
    if every == CheckpointEvery::Auto {
        println!(
            "{}: next checkpoint in {} steps (Young/Daly: the last held the step loop {:.2} s; MTBF {:.2} h after {} failures)",
            job.label,
            interval.steps(history),
            interval.cost().unwrap_or(0.0),
            interval.mtbf_seconds(history) / 3600.0,
            history.failures
        );
    }
}

/// Counts a finished step of `seconds` in the ledger: its wait for the last checkpoint's copy is the
/// checkpoint's, the rest training's; the interval learns both.
fn count_step(trainer: &mut Trainer, interval: &mut Interval, seconds: f64) {
    let fenced = trainer.take_fenced();
    let history = &mut trainer.state.history;
    history.train_seconds += seconds - fenced;
    history.checkpoint_seconds += fenced;
    interval.stalled(fenced);
    interval.step_done(seconds - fenced);
}

/// Waits for the save in flight, then hands a snapshot of this rank's shard to the saver, with the
/// metrics of its steps on rank 0. The time this takes is the next checkpoint's to record.
async fn save(trainer: &mut Trainer, saver: &mut Saver, metrics: Option<&mut MetricsLog>) -> Result<()> {
    let saving = Instant::now();
    saver.wait().await?;
    trainer.state.saved_unix =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).ok().map(|d| d.as_secs());
    let step = trainer.state.step;
    let metrics = metrics.map(MetricsLog::bytes).transpose()?;
    saver.start(step, trainer.snapshot()?, metrics);
    trainer.state.history.checkpoint_seconds += saving.elapsed().as_secs_f64();
    Ok(())
}

/// What the stage commits about itself, `seconds` after its loop began.
fn stats(job: &Job, trainer: &Trainer, streams: &Streams, seconds: f64) -> TrainStats {
    let state = &trainer.state;
    TrainStats {
        checkpoint: checkpoint::dir_name(state.step),
        epochs: state.tokens_seen as f64 / streams.train.len() as f64,
        final_loss: state.loss,
        flops_per_token: job.config.flops_per_token(job.seq_len),
        model: job.config.clone(),
        parameters: job.config.parameters(),
        rope_base: job.config.rope_base,
        rope_scaling: job.config.rope_scaling,
        seconds,
        seq_len: job.seq_len,
        steps: state.step,
        tokens: state.tokens_seen,
    }
}

/// The job's shape and cost, once at the start.
fn announce(job: &Job, dtype: DType, device: &Device) {
    let config = &job.config;
    println!(
        "{}: {} parameters, {:.2} GFLOPs/token, {} steps of {} tokens at {}, RoPE base {:.0}{}, {} on {device:?}",
        job.label,
        config.parameters(),
        config.flops_per_token(job.seq_len) / 1e9,
        job.total_steps,
        job.step_tokens(),
        job.seq_len,
        config.rope_base,
        match config.rope_scaling {
            Scaling::None => String::new(),
            s => format!(" scaled {}", serde_json::to_string(&s).unwrap_or_default()),
        },
        if dtype == DType::BF16 { "bf16" } else { "fp32" }
    );
}

/// Held-out loss and the probes' log-probabilities, at a scheduled checkpoint.
fn measure(trainer: &Trainer, streams: &Streams, tok: &Tokenized, ctx: &Context, line: &mut MetricsLine) -> Result<()> {
    let (model, dtype) = (&trainer.model, trainer.dtype());
    let shape = trainer.shape();
    if let Some(heldout) = &streams.heldout {
        line.heldout_loss = Some(evaluate(model, heldout, shape.seq_len, trainer.micro(), dtype, trainer.device())?);
    }
    let probes = &ctx.run.spec.eval.probes;
    if !probes.is_empty() {
        let logprobs = probe_logprobs(&Scorer::new(model, dtype), &tok.encoder, tok.separator, probes)
            .map_err(|e| TrainError::Invalid(format!("spec.eval.probes: {e}")))?;
        line.probes = probes.iter().map(|p| p.name.clone()).zip(logprobs).collect();
    }
    Ok(())
}

/// Commits the stage: the newest checkpoint's files (the one saved last, or, when everything was
/// already trained, the one it resumed from) and the metrics, with `stats`.
async fn commit(
    ctx: &Context,
    mut trainer: Trainer,
    mut files: Vec<FileEntry>,
    metrics: &mut MetricsLog,
    stats: &TrainStats,
    device: &Device,
) -> Result<Outcome> {
    if files.is_empty() {
        let loaded = checkpoint::load_latest(&ctx.dir, device)
            .await?
            .ok_or_else(|| TrainError::Invalid("no checkpoint to commit".into()))?;
        files = loaded.files;
    }
    let lines = metrics.bytes()?;
    ctx.dir.put(tensorboard::FILE, bytes::Bytes::from(tensorboard::events(&lines))).await?;
    files.push(ctx.dir.put("metrics.jsonl", lines).await?);
    let stats = serde_json::to_value(stats).expect("train stats serialise");
    let commit = ctx.dir.commit(&ctx.config_hash(), files, stats).await?;
    trainer.collective.finish()?;
    Ok(Outcome::Committed(Box::new(commit)))
}

/// Mean loss over up to 8 micro-batches of held-out sequences: the same ones every time, drawn from
/// the whole held-out stream.
pub fn evaluate(
    model: &Llama,
    stream: &TokenStream,
    seq_len: usize,
    micro: usize,
    dtype: DType,
    device: &Device,
) -> Result<f64> {
    let available = (stream.len().saturating_sub(1) / seq_len as u64) as usize;
    let sequences = available.min(8 * micro).max(1);
    let shape = BatchShape { seq_len, sequences, rank: 0, world: 1, groups: 1, window: available, seed: 0 };
    let batch = shape.batch(stream, 0, 0);
    let mut total = 0f64;
    let mut n = 0;
    for chunk in (0..sequences).collect::<Vec<_>>().chunks(micro) {
        let range = chunk[0] * seq_len..(chunk[chunk.len() - 1] + 1) * seq_len;
        let inputs = Tensor::from_slice(&batch.inputs[range.clone()], (chunk.len(), seq_len), device)?;
        let targets = Tensor::from_slice(&batch.targets[range], (chunk.len(), seq_len), device)?;
        let (loss, _) = model.loss(&inputs, &targets.detach(), dtype)?;
        total += f64::from(loss.detach().to_scalar::<f32>()?) * chunk.len() as f64;
        n += chunk.len();
    }
    Ok(total / n as f64)
}
