//! The train stage's loop: resume or initialise, then for every optimizer step accumulate gradients
//! over micro-batches, clip, watch for loss spikes, update, log, and checkpoint.

use std::collections::VecDeque;
use std::io::Write;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use bytes::Bytes;
use candle_core::{DType, Device, Tensor};
use pretrain_crd::PretrainRunSpec;
use pretrain_crd::Stage;
use pretrain_crd::spec::{LongContext, Optimizer, Precision, RopeScalingKind, Schedule, SpikeAction};
use pretrain_store::{FileEntry, StageDir};

use super::checkpoint::{self, Snapshot, TrainState};
use super::loader::{BatchShape, Prefetcher, TokenStream, shuffle_window};
use super::optim::{AdamW, AdamWConfig, clip};
use super::schedule::learning_rate;
use crate::Context;
use crate::dist::{self, BUCKET_BYTES};
use crate::eval::{Scorer, probe_logprobs};
use crate::frame::{DeviceError, Outcome, StageError, UpstreamError};
use crate::model::rope::ntk_base;
use crate::model::{Llama, LlamaConfig, Params, Scaling};
use crate::progress::Progress;
use crate::tokenize::stage::Tokenized;

/// Why training stopped early.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// An upstream stage has not committed, or the spec cannot be trained as written.
    #[error("{0}")]
    Invalid(String),
    /// tokenize's outputs cannot be read.
    #[error(transparent)]
    Upstream(#[from] UpstreamError),
    /// The compute device cannot be used.
    #[error(transparent)]
    Device(#[from] DeviceError),
    /// The ranks resumed from different checkpoints (one was written while they loaded).
    #[error("rank {rank} resumed at step {step} but rank 0 at step {leader}; the ranks see different checkpoints")]
    RankMismatch {
        /// This rank.
        rank: usize,
        /// The step it resumed at.
        step: u64,
        /// The step rank 0 resumed at.
        leader: u64,
    },
    /// The store failed.
    #[error(transparent)]
    Store(#[from] pretrain_store::Error),
    /// Loading a checkpoint failed.
    #[error(transparent)]
    Checkpoint(#[from] checkpoint::CheckpointError),
    /// A checkpoint could not be saved (after the store's retries); nothing of it became `latest`.
    #[error("checkpoint {name} was not saved: {source}; {kept}")]
    NotSaved {
        /// The checkpoint's directory name.
        name: String,
        /// Which checkpoint a restart resumes from.
        kept: String,
        /// Why it failed.
        source: checkpoint::CheckpointError,
    },
    /// A token shard is unreadable.
    #[error(transparent)]
    Shard(#[from] crate::tokenize::ShardError),
    /// The tensor library failed.
    #[error("model: {0}")]
    Model(#[from] candle_core::Error),
    /// Local scratch files failed.
    #[error("scratch: {0}")]
    Scratch(#[from] std::io::Error),
    /// A data-parallel peer died, stalled or could not be reached.
    #[error(transparent)]
    Dist(#[from] crate::dist::DistError),
    /// The loss became NaN or infinite.
    #[error("loss is {loss} at step {step}; lower train.optimizer.lr or enable gradient clipping")]
    Diverged {
        /// The step.
        step: u64,
        /// The loss.
        loss: f64,
    },
}

/// An invalid spec or upstream is permanent; a lost peer restarts the gang; the store and the device
/// as the frame classifies them; a rank mismatch (the gang loads again), a divergence, a failed save
/// and anything of the tensor library fail the attempt.
impl From<TrainError> for StageError {
    fn from(e: TrainError) -> Self {
        use TrainError as E;
        match e {
            E::Invalid(_) => StageError::Invalid(Box::new(e)),
            E::Upstream(upstream) => upstream.into(),
            E::Device(device) => device.into(),
            E::Store(store) => store.into(),
            E::Checkpoint(checkpoint) => checkpoint.into(),
            E::NotSaved { source: checkpoint::CheckpointError::Store(ref store), .. } => {
                StageError::for_store(store)(Box::new(e))
            }
            E::Dist(crate::dist::DistError::Peer { .. }) => StageError::PeerLost(Box::new(e)),
            E::RankMismatch { .. }
            | E::NotSaved { .. }
            | E::Shard(_)
            | E::Model(_)
            | E::Scratch(_)
            | E::Dist(_)
            | E::Diverged { .. } => StageError::Failed(Box::new(e)),
        }
    }
}

type Result<T, E = TrainError> = std::result::Result<T, E>;

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

/// Loss-spike detection: z-score of a step's loss against a rolling window of the previous ones.
#[derive(Debug, Clone)]
pub struct SpikeDetector {
    window: VecDeque<f64>,
    size: usize,
    z: f64,
}

impl SpikeDetector {
    /// A detector over `size` steps flagging losses `z` standard deviations above the mean (z = 0 disables).
    pub fn new(size: usize, z: f64, history: &[f64]) -> Self {
        let skip = history.len().saturating_sub(size);
        Self { window: history[skip..].iter().copied().collect(), size, z }
    }

    /// Whether `loss` is a spike; normal losses join the window, spikes do not.
    pub fn observe(&mut self, loss: f64) -> Option<f64> {
        if self.z > 0.0 && self.window.len() >= self.size {
            let n = self.window.len() as f64;
            let mean = self.window.iter().sum::<f64>() / n;
            let var = self.window.iter().map(|l| (l - mean).powi(2)).sum::<f64>() / n;
            let z = (loss - mean) / var.sqrt().max(1e-8);
            if z > self.z {
                return Some(z);
            }
        }
        self.window.push_back(loss);
        if self.window.len() > self.size {
            self.window.pop_front();
        }
        None
    }

    /// The window, for checkpoints.
    pub fn history(&self) -> Vec<f64> {
        self.window.iter().copied().collect()
    }
}

/// Peak FLOP/s the MFU estimate divides by: `PRETRAIN_PEAK_FLOPS`, or bf16 dense peaks of known
/// GPUs, or for CPUs 32 fp32 FLOPs per cycle per core at 3 GHz (two AVX2 FMA units).
fn peak_flops(device: &Device, gpu_type: Option<&str>) -> f64 {
    if let Some(v) = std::env::var("PRETRAIN_PEAK_FLOPS").ok().and_then(|v| v.parse().ok()) {
        return v;
    }
    if device.is_cuda() {
        let name = gpu_type.unwrap_or("").to_ascii_uppercase();
        return if name.contains("H200") || name.contains("H100") {
            989e12
        } else if name.contains("A100") {
            312e12
        } else {
            989e12
        };
    }
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
    cores * 32.0 * 3e9
}

/// What one run of the loop trains: the train stage from a seed, or long-context continuation from
/// train's final weights.
#[derive(Debug, Clone)]
pub struct Job {
    /// The stage, for messages.
    pub label: &'static str,
    /// The model, RoPE scaling included.
    pub config: LlamaConfig,
    /// Tokens per sequence.
    pub seq_len: usize,
    /// Sequences per optimizer step, all ranks together.
    pub sequences: usize,
    /// Sequences per forward pass.
    pub micro: usize,
    /// Optimizer steps.
    pub total_steps: u64,
    /// Optimizer settings.
    pub optimizer: Optimizer,
    /// Learning-rate schedule.
    pub schedule: Schedule,
    /// Initial weights.
    pub start: Start,
    /// Read whole documents longest first (long-context) instead of in shard order.
    pub long_documents_first: bool,
}

/// Where a job's weights come from when it has no checkpoint of its own yet.
#[derive(Debug, Clone)]
pub enum Start {
    /// Freshly initialised from the seed.
    Seed(u64),
    /// A committed checkpoint of another stage (weights only: fresh optimizer and schedule).
    Weights {
        /// The stage directory holding it.
        dir: StageDir,
        /// Its step.
        step: u64,
    },
}

impl Job {
    /// Tokens per optimizer step.
    pub fn step_tokens(&self) -> u64 {
        (self.sequences * self.seq_len) as u64
    }

    /// The train stage's job.
    pub fn train(spec: &PretrainRunSpec, vocab: u32) -> Self {
        let t = &spec.train;
        Self {
            label: "train",
            config: LlamaConfig::from_spec(&spec.model.resolved(), vocab),
            seq_len: t.seq_len as usize,
            sequences: (t.global_batch_tokens / u64::from(t.seq_len)) as usize,
            micro: t.micro_batch_size as usize,
            total_steps: spec.train_steps(),
            optimizer: t.optimizer.clone(),
            schedule: t.schedule.clone(),
            start: Start::Seed(spec.seed),
            long_documents_first: false,
        }
    }

    /// The long-context job: train's model with the new RoPE, `tokensFraction` of train's token
    /// budget at the new length, train's optimizer settings at `longContext.lr` (a tenth of train's
    /// peak by default) with a warmup of at most a tenth of the steps, starting from the final
    /// checkpoint that train committed.
    pub async fn long_context(ctx: &Context, vocab: u32) -> Result<Self> {
        let spec = &ctx.run.spec;
        let lc = spec
            .long_context
            .as_ref()
            .ok_or_else(|| TrainError::Invalid("the spec has no longContext section".into()))?;
        let (train_dir, step) = checkpoint::committed_final(ctx, Stage::Train).await?;
        let base = Self::train(spec, vocab);
        let seq_len = lc.seq_len as usize;
        let world = ctx.world_size as usize;
        let micro = match lc.micro_batch_size {
            Some(m) => m as usize,
            None => (base.micro * base.seq_len / seq_len).max(1),
        };
        // Keep train's tokens per step where the new length allows, in whole micro-batches per rank.
        let unit = micro * world;
        let sequences = ((spec.train.global_batch_tokens as usize / seq_len) / unit).max(1) * unit;
        let step_tokens = (sequences * seq_len) as u64;
        let tokens = (spec.train_tokens() as f64 * lc.tokens_fraction).ceil() as u64;
        let total_steps = tokens.div_ceil(step_tokens).max(1);
        let mut schedule = spec.train.schedule.clone();
        schedule.warmup_steps = schedule.warmup_steps.min(total_steps.div_ceil(10));
        let (rope_base, rope_scaling) = long_context_rope(&base.config, lc, spec.train.seq_len as usize);
        let mut optimizer = spec.train.optimizer.clone();
        optimizer.lr = lc.peak_lr(&spec.train.optimizer);
        optimizer.min_lr = optimizer.min_lr.min(optimizer.lr);
        Ok(Self {
            label: "long-context",
            config: LlamaConfig { rope_base, rope_scaling, ..base.config },
            seq_len,
            sequences,
            micro,
            total_steps,
            optimizer,
            schedule,
            start: Start::Weights { dir: train_dir, step },
            long_documents_first: true,
        })
    }
}

/// The RoPE base and scaling of long-context training: `ntk` is a new base by its formula, `linear`
/// and `yarn` keep the base and rescale, `none` keeps everything; an explicit `base` replaces the base
/// (and, for `ntk`, the computed one). The factor defaults to the ratio of sequence lengths.
pub fn long_context_rope(model: &LlamaConfig, lc: &LongContext, train_seq_len: usize) -> (f64, Scaling) {
    let factor = lc.rope.factor.unwrap_or(lc.seq_len as f64 / train_seq_len as f64);
    let base = lc.rope.base.unwrap_or(model.rope_base);
    match lc.rope.scaling {
        RopeScalingKind::None => (base, Scaling::None),
        RopeScalingKind::Ntk => {
            (lc.rope.base.unwrap_or(ntk_base(model.rope_base, factor, model.head_dim())), Scaling::None)
        }
        RopeScalingKind::Linear => (base, Scaling::Linear { factor }),
        RopeScalingKind::Yarn => (base, Scaling::Yarn { factor, original_len: train_seq_len }),
    }
}

/// Runs the train or long-context stage (as `ctx.stage` says) to its commit, or until SIGTERM.
pub async fn run(ctx: &Context, stop: Arc<AtomicBool>) -> Result<Outcome> {
    let spec = &ctx.run.spec;
    let hash = ctx.config_hash();
    let tok = Tokenized::load(ctx).await?;
    let vocab = tok.vocab_size();
    let job = match ctx.stage {
        Stage::LongContext => Job::long_context(ctx, vocab).await?,
        _ => Job::train(spec, vocab),
    };
    let label = job.label;
    let cache = tempfile::tempdir()?;
    let train_paths = tok.local_shards("shards/", cache.path()).await?;
    let heldout_paths = tok.local_shards("heldout/", cache.path()).await?;
    let mut stream = TokenStream::open(&train_paths)?;
    if stream.len() < job.seq_len as u64 + 1 {
        return Err(TrainError::Invalid(format!(
            "the token shards hold {} tokens, fewer than one sequence of {} tokens",
            stream.len(),
            job.seq_len
        )));
    }
    if job.long_documents_first {
        stream = stream.long_documents_first();
        println!(
            "{label}: longest documents first (the longest has {} tokens; sequences have {})",
            stream.longest_document(),
            job.seq_len
        );
    }
    let stream = Arc::new(stream);
    let heldout = if heldout_paths.is_empty() { None } else { Some(TokenStream::open(&heldout_paths)?) };

    let device = ctx.device()?;
    let dtype = match (spec.train.precision, device.is_cuda()) {
        (Precision::Fp32, _) | (Precision::Auto, false) => DType::F32,
        (Precision::Bf16, false) => {
            return Err(TrainError::Invalid(
                "train.precision bf16 needs GPUs (train.resources.gpusPerNode > 0)".into(),
            ));
        }
        (Precision::Bf16 | Precision::Auto, true) => DType::BF16,
    };
    let config = job.config.clone();
    config.check().map_err(TrainError::Invalid)?;
    let seq_len = job.seq_len;
    let world = ctx.world_size as usize;
    let shape = BatchShape {
        seq_len,
        sequences: job.sequences,
        rank: ctx.rank as usize,
        world,
        window: shuffle_window(job.sequences),
        seed: spec.seed,
    };
    let micro = job.micro;
    if shape.per_rank() == 0 || !shape.per_rank().is_multiple_of(micro) {
        return Err(TrainError::Invalid(format!(
            "{label}: {} sequences per step give {} per rank, not a multiple of the micro-batch size {micro}",
            job.sequences,
            shape.per_rank()
        )));
    }
    let total_steps = job.total_steps;
    let step_tokens = job.step_tokens();
    let opt_config = AdamWConfig::from_spec(&job.optimizer);
    // Data-parallel ranks meet before anything is loaded, so a missing rank fails fast.
    let mut collective = dist::connect(ctx, &device)?;
    let leader = collective.rank() == 0;

    // Resume from the newest valid checkpoint, or start from the seed or the given weights.
    let resumed = checkpoint::load_latest(&ctx.dir, &device).await?;
    let (params, mut optimizer, mut state) = match resumed {
        Some(loaded) => {
            if loaded.state.model != config {
                return Err(TrainError::Invalid(format!(
                    "checkpoint {} was trained with model {:?}, but the spec gives {:?}; delete the stage's checkpoints or restore the model settings",
                    ctx.dir.url(&format!("ckpt/{}", loaded.name)),
                    loaded.state.model,
                    config
                )));
            }
            if loaded.state.config_hash != hash {
                eprintln!(
                    "{label}: {} was made with other training settings; resuming with the current ones",
                    loaded.name
                );
            }
            let (name, state) = (loaded.name.clone(), loaded.state.clone());
            let (params, optimizer) = restore(loaded, &config, opt_config.clone(), &device)?;
            println!("{label}: resuming from {name} (step {} of {total_steps})", state.step);
            (params, optimizer, state)
        }
        None => {
            let params = match &job.start {
                Start::Seed(seed) => Params::init(&config, *seed, &device)?,
                Start::Weights { dir, step } => {
                    let url = dir.url(&format!("ckpt/{}", checkpoint::dir_name(*step)));
                    let loaded = checkpoint::load(dir, *step, &device).await.map_err(|e| match e {
                        checkpoint::CheckpointError::Unusable { reason, .. } => {
                            TrainError::Invalid(format!("starting weights {url}: {reason}"))
                        }
                        e => e.into(),
                    })?;
                    println!("{label}: starting from the weights of {url}");
                    Params::from_named(&config, loaded.model, &device)
                        .map_err(|e| TrainError::Invalid(format!("starting weights {url}: {e}")))?
                }
            };
            // Every rank initialised the same weights from the seed; rank 0's are authoritative.
            dist::broadcast_params(collective.as_mut(), &params)?;
            let optimizer = AdamW::new(opt_config.clone(), &params)?;
            let state = TrainState {
                format_version: checkpoint::FORMAT_VERSION,
                step: 0,
                tokens_seen: 0,
                cursor: 0,
                optimizer_updates: 0,
                lr: 0.0,
                rng_seed: spec.seed,
                world_size: ctx.world_size,
                config_hash: hash.clone(),
                model: config.clone(),
                seq_len,
                loss: None,
                loss_window: Vec::new(),
                saved_unix: None,
            };
            (params, optimizer, state)
        }
    };
    state.config_hash = hash.clone();
    if state.world_size != ctx.world_size && state.step > 0 {
        println!(
            "{label}: checkpoint written by {} ranks, resuming on {}: {} sequences per rank per step, {} micro-batches each",
            state.world_size,
            ctx.world_size,
            shape.per_rank(),
            shape.per_rank() / micro
        );
    }
    state.world_size = ctx.world_size;
    // Every rank must resume from the same step (a checkpoint written meanwhile could differ).
    let leader_step = collective.broadcast(&Tensor::new(&[state.step as f32], &device)?, 0)?.to_vec1::<f32>()?[0];
    if leader_step != state.step as f32 {
        return Err(TrainError::RankMismatch { rank: collective.rank(), step: state.step, leader: leader_step as u64 });
    }
    let mut model = Llama::new(config.clone(), params, seq_len, &device)?;
    model.set_recompute(spec.train.recompute_activations);
    println!(
        "{label}: {} parameters, {:.2} GFLOPs/token, {total_steps} steps of {step_tokens} tokens at {seq_len}, RoPE base {:.0}{}, {} on {device:?}",
        config.parameters(),
        config.flops_per_token(seq_len) / 1e9,
        config.rope_base,
        match config.rope_scaling {
            Scaling::None => String::new(),
            s => format!(" scaled {}", serde_json::to_string(&s).unwrap_or_default()),
        },
        if dtype == DType::BF16 { "bf16" } else { "fp32" }
    );
    let probes = &spec.eval.probes;

    // Metrics: the JSONL so far (up to the resumed step), then one line per step.
    let metrics_path = cache.path().join("metrics.jsonl");
    let mut metrics_lines = Vec::new();
    if let Some(old) = ctx.dir.store().get_opt(&ctx.dir.key("metrics.jsonl")?).await? {
        for line in String::from_utf8_lossy(&old).lines() {
            let step = serde_json::from_str::<serde_json::Value>(line).ok().and_then(|v| v["step"].as_u64());
            if step.is_some_and(|s| s <= state.step) {
                metrics_lines.push(line.to_string());
            }
        }
    }
    let mut metrics = std::fs::File::create(&metrics_path)?;
    for line in &metrics_lines {
        writeln!(metrics, "{line}")?;
    }

    let spike = &spec.train.loss_spike;
    let mut detector = SpikeDetector::new(spike.window as usize, spike.z_score, &state.loss_window);
    let mut prefetch = Prefetcher::start(Arc::clone(&stream), shape, state.step, total_steps, state.cursor, 4);
    let peak = peak_flops(&device, spec.train.resources.gpu_type.as_deref());
    let flops_per_token = config.flops_per_token(seq_len);
    let every = spec.train.checkpoint.every_steps.max(1);
    let keep = spec.train.checkpoint.keep;
    let mut saving: Option<tokio::task::JoinHandle<Result<Vec<FileEntry>>>> = None;
    let mut last_files: Vec<FileEntry> = Vec::new();
    let mut last_print = Instant::now();
    let mut progress = Progress::new(label, "steps", Some(total_steps));
    let run_start = Instant::now();
    let start_step = state.step;

    while state.step < total_steps {
        let Some(batch) = prefetch.next() else { break };
        let step_start = Instant::now();
        let accum = shape.per_rank() / micro;
        let mut grads: Vec<Tensor> = Vec::new();
        let mut loss_sum = 0f64;
        for m in 0..accum {
            let range = m * micro * seq_len..(m + 1) * micro * seq_len;
            let inputs = Tensor::from_slice(&batch.inputs[range.clone()], (micro, seq_len), &device)?;
            let targets = Tensor::from_slice(&batch.targets[range], (micro, seq_len), &device)?;
            let (loss, _) = model.loss(&inputs, &targets, dtype)?;
            loss_sum += f64::from(loss.to_scalar::<f32>()?);
            let store = (loss / accum as f64)?.backward()?;
            for (i, (name, _, var)) in model.params.iter().enumerate() {
                let g = store
                    .get(var.as_tensor())
                    .cloned()
                    .ok_or_else(|| TrainError::Model(candle_core::Error::Msg(format!("no gradient for {name}"))))?;
                if m == 0 {
                    grads.push(g);
                } else {
                    grads[i] = (&grads[i] + g)?;
                }
            }
        }
        // Data-parallel ranks average gradients, loss and the stop request, so every rank applies
        // the same update and they all stop after the same step.
        let mut scalars = [(loss_sum / accum as f64) as f32, f32::from(u8::from(stop.load(Ordering::SeqCst)))];
        dist::all_reduce_gradients(collective.as_mut(), &mut grads, &mut scalars, BUCKET_BYTES)?;
        let stopping = scalars[1] > 0.0;
        // One process keeps its loss in f64; a gang's is the fp32 mean.
        let loss = if collective.world() == 1 { loss_sum / accum as f64 } else { f64::from(scalars[0]) };
        if !loss.is_finite() {
            return Err(TrainError::Diverged { step: state.step, loss });
        }
        let grad_norm = clip(&mut grads, job.optimizer.grad_clip)?;
        let lr = learning_rate(state.step, total_steps, &job.schedule, &job.optimizer);
        let mut event = None;
        match detector.observe(loss) {
            Some(z) => {
                eprintln!(
                    "{label}: loss spike at step {}: {loss:.4} is {z:.1} standard deviations above the window",
                    state.step
                );
                match spike.action {
                    SpikeAction::Log => optimizer.step(&model.params, &grads, lr)?,
                    SpikeAction::Skip => event = Some("skipped"),
                    SpikeAction::Rollback => {
                        event = Some("rolled-back");
                        // Rank 0's newest checkpoint must be complete before any rank reads it.
                        if let Some(previous) = saving.take() {
                            last_files = previous.await.expect("the checkpoint task does not panic")?;
                        }
                        collective.barrier()?;
                        if let Some(loaded) = checkpoint::load_latest(&ctx.dir, &device).await? {
                            let name = loaded.name.clone();
                            let (params, restored) = restore(loaded, &config, opt_config.clone(), &device)?;
                            model = Llama::new(config.clone(), params, seq_len, &device)?;
                            model.set_recompute(spec.train.recompute_activations);
                            optimizer = restored;
                            eprintln!("{label}: rolled back to {name}; continuing past the batch");
                        }
                    }
                }
            }
            None => optimizer.step(&model.params, &grads, lr)?,
        }
        state.step += 1;
        state.tokens_seen += step_tokens;
        state.cursor = batch.cursor_after;
        state.optimizer_updates = optimizer.updates;
        state.lr = lr;
        state.loss = Some(loss);
        state.loss_window = detector.history();

        let seconds = step_start.elapsed().as_secs_f64();
        let tokens_per_s = step_tokens as f64 / seconds / world as f64;
        let mfu = flops_per_token * tokens_per_s / peak;
        let mut line = serde_json::json!({
            "step": state.step, "loss": loss, "gradNorm": grad_norm, "lr": lr, "tokens": state.tokens_seen,
            "tokensPerSecond": tokens_per_s, "mfu": mfu, "seconds": seconds,
        });
        if let Some(e) = event {
            line["event"] = e.into();
        }
        // Held-out loss and probes only at scheduled checkpoints: a checkpoint on SIGTERM must be quick
        // (the grace period runs), and the metrics stay those of an uninterrupted run.
        let scheduled = state.step % every == 0 || state.step == total_steps;
        let checkpointing = scheduled || stopping;
        if !leader {
            // Rank 0 measures, logs and checkpoints for the gang.
            if stopping {
                collective.finish()?;
                return Ok(Outcome::Preempted { step: state.step });
            }
            continue;
        }
        if scheduled && let Some(heldout) = &heldout {
            let heldout_loss = evaluate(&model, heldout, seq_len, micro, dtype, &device)?;
            line["heldoutLoss"] = heldout_loss.into();
        }
        if scheduled && !probes.is_empty() {
            let scorer = Scorer::new(&model, dtype);
            let logprobs = probe_logprobs(&scorer, &tok.encoder, tok.separator, probes)
                .map_err(|e| TrainError::Invalid(format!("spec.eval.probes: {e}")))?;
            line["probes"] = probes
                .iter()
                .zip(logprobs)
                .map(|(p, lp)| (p.name.clone(), serde_json::Value::from(lp)))
                .collect::<serde_json::Map<String, serde_json::Value>>()
                .into();
        }
        writeln!(metrics, "{line}")?;
        let eta = || {
            let done = (state.step - start_step) as f64;
            format_seconds(run_start.elapsed().as_secs_f64() / done * (total_steps - state.step) as f64)
        };
        progress.update(state.step, || {
            format!("loss {loss:.4} lr {lr:.2e} {tokens_per_s:.0} tok/s MFU {:.1}% eta {}", mfu * 100.0, eta())
        });
        if !progress.reporting()
            && (last_print.elapsed().as_secs_f64() >= 5.0 || state.step == total_steps || state.step == start_step + 1)
        {
            last_print = Instant::now();
            println!(
                "{label}: step {}/{total_steps} loss {loss:.4} lr {lr:.2e} grad-norm {grad_norm:.3} {tokens_per_s:.0} tok/s MFU {:.1}% eta {}",
                state.step,
                mfu * 100.0,
                eta()
            );
        }

        if checkpointing {
            if let Some(previous) = saving.take() {
                last_files = previous.await.expect("the checkpoint task does not panic")?;
            }
            metrics.flush()?;
            state.saved_unix =
                std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).ok().map(|d| d.as_secs());
            let snapshot = Snapshot::take(state.clone(), model.params.named(), optimizer.state(&model.params))?;
            let metrics_bytes = Bytes::from(std::fs::read(&metrics_path)?);
            let (dir, keep, step) = (ctx.dir.clone(), keep, state.step);
            saving = Some(tokio::spawn(async move {
                // Metrics first: a checkpoint is never without the metrics of its steps (a resume
                // from an older checkpoint drops the lines past it).
                let saved = async {
                    dir.put("metrics.jsonl", metrics_bytes).await?;
                    checkpoint::save(&dir, snapshot, keep).await
                };
                match saved.await {
                    Ok(files) => Ok(files),
                    Err(source) => Err(not_saved(&dir, step, source).await),
                }
            }));
            if stopping {
                let files = saving.take().expect("just started").await.expect("the checkpoint task does not panic")?;
                drop(files);
                println!("{label}: checkpointed step {} on SIGTERM", state.step);
                collective.finish()?;
                return Ok(Outcome::Preempted { step: state.step });
            }
        }
    }
    if !leader {
        // Wait for rank 0's commit: a gang whose commit failed must not look finished.
        collective.finish()?;
        return Ok(Outcome::Joined { step: state.step });
    }
    if let Some(previous) = saving.take() {
        last_files = previous.await.expect("the checkpoint task does not panic")?;
    }
    metrics.flush()?;
    if last_files.is_empty() {
        // Everything was already trained (resumed at the last step): commit the newest checkpoint.
        let loaded = checkpoint::load_latest(&ctx.dir, &device)
            .await?
            .ok_or_else(|| TrainError::Invalid("no checkpoint to commit".into()))?;
        last_files = loaded.files;
    }
    let metrics_entry = ctx.dir.put_file("metrics.jsonl", &metrics_path).await?;
    let mut files = last_files;
    files.push(metrics_entry);
    let stats = serde_json::json!({
        "steps": state.step,
        "tokens": state.tokens_seen,
        "finalLoss": state.loss,
        "parameters": config.parameters(),
        "flopsPerToken": flops_per_token,
        "model": config,
        "checkpoint": checkpoint::dir_name(state.step),
        "seqLen": seq_len,
        "ropeBase": config.rope_base,
        "ropeScaling": config.rope_scaling,
        "seconds": run_start.elapsed().as_secs_f64(),
        "epochs": state.tokens_seen as f64 / stream.len() as f64,
    });
    let commit = ctx.dir.commit(&hash, files, stats).await?;
    collective.finish()?;
    Ok(Outcome::Committed(Box::new(commit)))
}

/// The error of a checkpoint that failed to save, naming the checkpoint a restart will resume from
/// (read back from the store, which is what the restart will see).
async fn not_saved(dir: &StageDir, step: u64, source: checkpoint::CheckpointError) -> TrainError {
    let latest = match dir.key("ckpt/latest") {
        Ok(key) => dir.store().get_opt(&key).await.ok().flatten(),
        Err(_) => None,
    };
    let kept = match latest {
        Some(name) => format!(
            "{} stays the latest complete checkpoint and a restart resumes from it",
            String::from_utf8_lossy(&name).trim()
        ),
        None => "no earlier checkpoint exists; a restart begins at step 0".into(),
    };
    TrainError::NotSaved { name: checkpoint::dir_name(step), kept, source }
}

/// The weights and optimizer of a loaded checkpoint.
fn restore(
    loaded: checkpoint::Loaded,
    config: &LlamaConfig,
    opt_config: AdamWConfig,
    device: &Device,
) -> Result<(Params, AdamW)> {
    let invalid = |e: String| TrainError::Invalid(format!("checkpoint {}: {e}", loaded.name));
    let params = Params::from_named(config, loaded.model, device).map_err(invalid)?;
    let mut optimizer = AdamW::new(opt_config, &params)?;
    optimizer.restore(&params, loaded.optim, loaded.state.optimizer_updates).map_err(invalid)?;
    Ok((params, optimizer))
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
    let shape = BatchShape { seq_len, sequences, rank: 0, world: 1, window: available, seed: 0 };
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

fn format_seconds(s: f64) -> String {
    if s.is_finite() { pretrain_crd::display::duration(s as u64) } else { "?".into() }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spike_detector_flags_outliers_and_keeps_them_out_of_the_window() {
        let mut d = SpikeDetector::new(4, 3.0, &[]);
        for l in [2.0, 2.1, 1.9, 2.0] {
            assert_eq!(d.observe(l), None);
        }
        assert!(d.observe(9.0).is_some());
        assert_eq!(d.history(), [2.0, 2.1, 1.9, 2.0]);
        assert_eq!(d.observe(2.05), None);
        let restored = SpikeDetector::new(4, 3.0, &d.history());
        assert_eq!(restored.history(), d.history());
        assert_eq!(SpikeDetector::new(4, 0.0, &[1.0; 4]).observe(100.0), None);
    }
}
