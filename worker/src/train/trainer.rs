//! One optimizer step at a time: gradient accumulation over micro-batches in gradient groups, the
//! data-parallel sum of the groups in one order, clipping, the learning rate, loss-spike handling
//! and the update, with the train state a checkpoint records. [`Trainer::step`] returns what the
//! step did; metrics, checkpoints and the loop around it are the stage's.

use std::collections::VecDeque;

use candle_core::{DType, Device, Tensor};
use pretrain_crd::spec::SpikeAction;

use super::error::{Result, TrainError};
use super::job::{Job, Start};
use super::loader::{Batch, BatchShape};
use super::optim::{AdamW, AdamWConfig, clip};
use super::schedule::learning_rate;
use crate::Context;
use crate::checkpoint::{self, Copied, Copying, Loaded, Shard, Snapshot, TrainState};
use crate::dist::{self, BUCKET_BYTES, Collective};
use crate::model::{Llama, LlamaConfig, Params};

/// Loss-spike detection: z-score of a step's loss against a rolling window of the previous ones,
/// with a cap on spikes in a row.
#[derive(Debug, Clone)]
pub struct SpikeDetector {
    window: VecDeque<f64>,
    size: usize,
    z: f64,
    max_consecutive: usize,
    /// Losses of the spikes flagged in a row so far.
    streak: Vec<f64>,
}

/// What the detector made of a step's loss.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Verdict {
    /// Not a spike: it joined the window.
    Normal,
    /// A spike, `z` standard deviations above the window's mean.
    Spike {
        /// Its z-score.
        z: f64,
    },
    /// A spike after the most allowed in a row: the loss has moved to a new level. The window
    /// restarts from the streak's losses, and the step counts as normal.
    NewLevel {
        /// Its z-score.
        z: f64,
        /// Spikes in the streak, this one included.
        streak: usize,
    },
}

impl SpikeDetector {
    /// A detector over `size` steps flagging losses `z` standard deviations above the mean (z = 0
    /// disables), at most `max_consecutive` in a row; `history` and `streak` restore a checkpoint's.
    pub fn new(size: usize, z: f64, max_consecutive: usize, history: &[f64], streak: &[f64]) -> Self {
        let skip = history.len().saturating_sub(size);
        Self { window: history[skip..].iter().copied().collect(), size, z, max_consecutive, streak: streak.to_vec() }
    }

    /// Judges `loss`: normal losses join the window, spikes do not (until a new level is accepted).
    pub fn observe(&mut self, loss: f64) -> Verdict {
        if self.z > 0.0 && self.window.len() >= self.size {
            let n = self.window.len() as f64;
            let mean = self.window.iter().sum::<f64>() / n;
            let var = self.window.iter().map(|l| (l - mean).powi(2)).sum::<f64>() / n;
            let z = (loss - mean) / var.sqrt().max(1e-8);
            if z > self.z {
                self.streak.push(loss);
                if self.streak.len() <= self.max_consecutive {
                    return Verdict::Spike { z };
                }
                let streak = self.streak.len();
                self.window = self.streak.drain(..).collect();
                while self.window.len() > self.size {
                    self.window.pop_front();
                }
                return Verdict::NewLevel { z, streak };
            }
        }
        self.streak.clear();
        self.window.push_back(loss);
        if self.window.len() > self.size {
            self.window.pop_front();
        }
        Verdict::Normal
    }

    /// The window, for checkpoints.
    pub fn history(&self) -> Vec<f64> {
        self.window.iter().copied().collect()
    }

    /// The spikes in a row so far, for checkpoints.
    pub fn streak(&self) -> &[f64] {
        &self.streak
    }
}

/// What one step did.
#[derive(Debug, Clone, Copy)]
pub struct StepReport {
    /// Mean loss over the step's sequences, all ranks.
    pub loss: f64,
    /// Gradient norm before clipping.
    pub grad_norm: f64,
    /// The learning rate applied (or that would have been, for a skipped update).
    pub lr: f64,
    /// The update was not applied: the loss was a spike and the spec says skip or roll back.
    pub spike: Option<SpikeAction>,
    /// The loss was a spike after the most allowed in a row, accepted as a new level (the update
    /// was applied).
    pub new_level: bool,
    /// Some rank was asked to stop: every rank checkpoints and stops after this step.
    pub stopping: bool,
    /// Rank 0 scheduled a checkpoint of this step: every rank saves its shard.
    pub checkpoint: bool,
}

/// The model, its optimizer and the state a checkpoint records, on one rank of the gang.
#[derive(Debug)]
pub struct Trainer {
    /// The model being trained.
    pub model: Llama,
    /// AdamW with its moments.
    pub optimizer: AdamW,
    /// Step, tokens, cursor and loss window: `state.json` of the next checkpoint.
    pub state: TrainState,
    /// The gang's collectives (a single process has a trivial one).
    pub collective: Box<dyn Collective>,
    detector: SpikeDetector,
    job: Job,
    shape: BatchShape,
    opt_config: AdamWConfig,
    spike_action: SpikeAction,
    recompute: bool,
    dtype: DType,
    device: Device,
    /// A checkpoint copy still reading the weights and moments.
    copying: Option<Copying>,
    /// The attempt's gang, the same on every rank (rank 0's random number).
    gang: u64,
    /// Seconds the step loop waited for checkpoint copies to finish, not yet counted.
    fenced: f64,
}

impl Trainer {
    /// Meets the other ranks, then resumes from the stage's newest valid checkpoint, or starts from
    /// the job's seed or weights (rank 0's are broadcast); every rank must resume at the same step.
    pub async fn start(ctx: &Context, job: Job, shape: BatchShape, dtype: DType, device: &Device) -> Result<Self> {
        let spec = &ctx.run.spec;
        let opt_config = AdamWConfig::from_spec(&job.optimizer);
        // Data-parallel ranks meet before anything is loaded, so a missing rank fails fast.
        let mut collective = dist::connect(ctx, device)?;
        let (params, optimizer, mut state) = match checkpoint::load_latest(&ctx.dir, device).await? {
            Some(loaded) => resume(ctx, &job, loaded, &opt_config, device)?,
            None => {
                let params = initial_params(&job, device).await?;
                // Every rank initialised the same weights from the seed; rank 0's are authoritative.
                dist::broadcast_params(collective.as_mut(), &params)?;
                let optimizer = AdamW::new(opt_config.clone(), &params)?;
                (params, optimizer, fresh_state(ctx, &job))
            }
        };
        state.config_hash = ctx.config_hash();
        if state.world_size != ctx.world_size && state.step > 0 {
            println!(
                "{}: checkpoint written by {} ranks, resuming on {}: rank {} trains {} of {} gradient groups, {} micro-batches per step",
                job.label,
                state.world_size,
                ctx.world_size,
                ctx.rank,
                shape.rank_groups().len(),
                shape.groups,
                shape.per_rank() / job.micro
            );
        }
        state.world_size = ctx.world_size;
        // Every rank must resume from the same step (a checkpoint written meanwhile could differ),
        // and learns the gang's id from rank 0 in the same broadcast.
        let (leader_step, gang) = leader_start(collective.as_mut(), state.step, device)?;
        if leader_step != state.step as f32 {
            return Err(TrainError::RankMismatch {
                rank: collective.rank(),
                step: state.step,
                leader: leader_step as u64,
            });
        }
        let recompute = spec.train.recompute_activations;
        let mut model = Llama::new(job.config.clone(), params, job.seq_len, device)?;
        model.set_recompute(recompute);
        let spike = &spec.train.loss_spike;
        Ok(Self {
            model,
            optimizer,
            detector: SpikeDetector::new(
                spike.window as usize,
                spike.z_score,
                spike.max_consecutive as usize,
                &state.loss_window,
                &state.spike_streak,
            ),
            state,
            collective,
            job,
            shape,
            opt_config,
            spike_action: spike.action,
            recompute,
            dtype,
            device: device.clone(),
            copying: None,
            gang,
            fenced: 0.0,
        })
    }

    /// The dtype the model computes in.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The device the model lives on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// How this rank cuts batches.
    pub fn shape(&self) -> BatchShape {
        self.shape
    }

    /// Sequences per forward pass.
    pub fn micro(&self) -> usize {
        self.job.micro
    }

    /// Which shard of a checkpoint this rank saves.
    pub fn shard(&self) -> Shard {
        Shard { rank: self.collective.rank(), world: self.collective.world(), gang: self.gang }
    }

    /// Starts a checkpoint of this rank's shard of the weights and moments ([`checkpoint::shard_of`])
    /// and of the state. On the CPU the copy runs beside the next step's forward and backward, which
    /// only read them, and the update waits for it; on a GPU the copy to the host is made now (it is
    /// fast, and a device's stream orders it anyway).
    pub fn snapshot(&mut self) -> Result<Copied> {
        self.fence();
        let shard = self.shard();
        let own = |all| checkpoint::own_shard(all, shard);
        let (state, model, optim) =
            (self.state.clone(), own(self.model.params.named()), own(self.optimizer.state(&self.model.params)));
        if self.device.is_cpu() {
            let (copying, copied) = Snapshot::start(state, model, optim);
            self.copying = Some(copying);
            return Ok(copied);
        }
        let (send, copied) = tokio::sync::oneshot::channel();
        let _ = send.send(Ok(Snapshot::take(state, model, optim)?));
        Ok(copied)
    }

    /// Seconds the step loop waited for checkpoint copies since the last call.
    pub fn take_fenced(&mut self) -> f64 {
        std::mem::take(&mut self.fenced)
    }

    fn fence(&mut self) {
        if let Some(mut copying) = self.copying.take() {
            self.fenced += copying.fence();
        }
    }

    /// Whether this rank measures, logs and checkpoints for the gang (rank 0).
    pub fn leader(&self) -> bool {
        self.collective.rank() == 0
    }

    /// Trains on one batch: sums each of this rank's gradient groups over its micro-batches, sums
    /// gradients, loss and the stop request over the gang in group order (so the update does not
    /// depend on the number of ranks), clips, and updates unless the loss is a spike to skip or
    /// roll back (see [`Trainer::roll_back`]); the state then counts the step.
    pub fn step(&mut self, batch: &Batch, stop: bool, checkpoint: bool) -> Result<StepReport> {
        let (micro, seq_len) = (self.job.micro, self.job.seq_len);
        // Every micro-batch's loss is scaled by the step's whole count, so the summed gradients are
        // the mean over the global batch whichever rank computed them.
        let total = (self.shape.sequences / micro) as f64;
        let per_group = self.shape.group_sequences() / micro;
        let rank = self.collective.rank();
        let mut groups = dist::Groups::default();
        for (i, _) in self.shape.rank_groups().enumerate() {
            let mut grads: Vec<Tensor> = Vec::new();
            let mut loss_sum = 0f32;
            for m in i * per_group..(i + 1) * per_group {
                let range = m * micro * seq_len..(m + 1) * micro * seq_len;
                let inputs = Tensor::from_slice(&batch.inputs[range.clone()], (micro, seq_len), &self.device)?;
                let targets = Tensor::from_slice(&batch.targets[range], (micro, seq_len), &self.device)?;
                let (loss, _) = self.model.loss(&inputs, &targets, self.dtype)?;
                loss_sum += loss.to_scalar::<f32>()?;
                let store = (loss / total)?.backward()?;
                for (p, (name, _, var)) in self.model.params.iter().enumerate() {
                    let g = store
                        .get(var.as_tensor())
                        .cloned()
                        .ok_or_else(|| TrainError::Model(candle_core::Error::Msg(format!("no gradient for {name}"))))?;
                    if grads.len() == p {
                        grads.push(g);
                    } else {
                        grads[p] = (&grads[p] + g)?;
                    }
                }
            }
            // The stop and checkpoint requests ride with this rank's first group.
            let flag = |set: bool| if i == 0 { f32::from(u8::from(set)) } else { 0.0 };
            groups.push(rank, grads, vec![loss_sum, flag(stop), flag(checkpoint)])?;
        }
        // The gang sums gradients, losses and stop requests, so every rank applies the same update
        // and they all stop after the same step.
        let (mut grads, scalars) = dist::sum_gradients(self.collective.as_mut(), groups, BUCKET_BYTES)?;
        let (stopping, checkpoint) = (scalars[1] > 0.0, scalars[2] > 0.0);
        let loss = f64::from(scalars[0]) / total;
        if !loss.is_finite() {
            return Err(TrainError::Diverged { step: self.state.step, loss });
        }
        let grad_norm = clip(&mut grads, self.job.optimizer.grad_clip)?;
        let lr = learning_rate(self.state.step, self.job.total_steps, &self.job.schedule, &self.job.optimizer);
        let verdict = self.detector.observe(loss);
        let (label, step) = (&self.job.label, self.state.step);
        let spike = match verdict {
            Verdict::Spike { z } => {
                eprintln!(
                    "{label}: loss spike at step {step}: {loss:.4} is {z:.1} standard deviations above the window"
                );
                Some(self.spike_action).filter(|a| *a != SpikeAction::Log)
            }
            Verdict::NewLevel { z, streak } => {
                eprintln!(
                    "{label}: loss spike at step {step} ({loss:.4}, z {z:.1}) is the {streak}th in a row: the loss has moved to a new level, which is accepted (the update is applied)"
                );
                None
            }
            Verdict::Normal => None,
        };
        if spike.is_none() {
            self.fence();
            self.optimizer.step(&self.model.params, &grads, lr)?;
        }
        let state = &mut self.state;
        state.step += 1;
        state.tokens_seen += self.job.step_tokens();
        state.cursor = batch.cursor_after;
        state.optimizer_updates = self.optimizer.updates;
        state.lr = lr;
        state.loss = Some(loss);
        state.loss_window = self.detector.history();
        state.spike_streak = self.detector.streak().to_vec();
        let new_level = matches!(verdict, Verdict::NewLevel { .. });
        Ok(StepReport { loss, grad_norm, lr, spike, new_level, stopping, checkpoint })
    }

    /// After a spike with `rollBack`: every rank reloads the weights and optimizer of the stage's
    /// newest checkpoint (which rank 0 finished writing before the barrier) and goes on past the
    /// batch; the step, cursor and loss window stay where they are.
    pub async fn roll_back(&mut self, ctx: &Context) -> Result<()> {
        self.fence();
        self.collective.barrier()?;
        if let Some(loaded) = checkpoint::load_latest(&ctx.dir, &self.device).await? {
            let name = loaded.name.clone();
            let (params, restored) = restore(loaded, &self.job.config, self.opt_config.clone(), &self.device)?;
            self.model = Llama::new(self.job.config.clone(), params, self.job.seq_len, &self.device)?;
            self.model.set_recompute(self.recompute);
            self.optimizer = restored;
            self.state.optimizer_updates = self.optimizer.updates;
            eprintln!("{}: rolled back to {name}; continuing past the batch", self.job.label);
        }
        Ok(())
    }
}

/// Rank 0's step (as fp32) and a number naming this attempt's gang, the same on every rank: rank 0's
/// random 48 bits (two 24-bit halves, which fp32 carries exactly), in one broadcast.
fn leader_start(collective: &mut dyn Collective, step: u64, device: &Device) -> Result<(f32, u64)> {
    use std::hash::{BuildHasher, Hasher};
    // The standard library's hasher keys come from the operating system's randomness.
    let random = std::collections::hash_map::RandomState::new().build_hasher().finish();
    let values = [step as f32, (random & 0xFF_FFFF) as f32, ((random >> 24) & 0xFF_FFFF) as f32];
    let shared = collective.broadcast(&Tensor::new(&values, device)?, 0)?.to_vec1::<f32>()?;
    Ok((shared[0], shared[1] as u64 | (shared[2] as u64) << 24))
}

/// The weights, optimizer and state of the stage's own checkpoint, which must be of the job's model.
fn resume(
    ctx: &Context,
    job: &Job,
    loaded: Loaded,
    opt_config: &AdamWConfig,
    device: &Device,
) -> Result<(Params, AdamW, TrainState)> {
    if loaded.state.model != job.config {
        return Err(TrainError::Invalid(format!(
            "checkpoint {} was trained with model {:?}, but the spec gives {:?}; delete the stage's checkpoints or restore the model settings",
            ctx.dir.url(&format!("ckpt/{}", loaded.name)),
            loaded.state.model,
            job.config
        )));
    }
    if loaded.state.config_hash != ctx.config_hash() {
        eprintln!(
            "{}: {} was made with other training settings; resuming with the current ones",
            job.label, loaded.name
        );
    }
    let (name, state) = (loaded.name.clone(), loaded.state.clone());
    let (params, optimizer) = restore(loaded, &job.config, opt_config.clone(), device)?;
    println!("{}: resuming from {name} (step {} of {})", job.label, state.step, job.total_steps);
    Ok((params, optimizer, state))
}

/// The job's first weights: from its seed, or another stage's committed checkpoint.
async fn initial_params(job: &Job, device: &Device) -> Result<Params> {
    match &job.start {
        Start::Seed(seed) => Ok(Params::init(&job.config, *seed, device)?),
        Start::Weights { dir, step } => {
            let url = dir.url(&format!("ckpt/{}", checkpoint::dir_name(*step)));
            let loaded = checkpoint::load(dir, *step, device).await.map_err(|e| match e {
                checkpoint::CheckpointError::Unusable { reason, .. } => {
                    TrainError::Invalid(format!("starting weights {url}: {reason}"))
                }
                e => e.into(),
            })?;
            println!("{}: starting from the weights of {url}", job.label);
            Params::from_named(&job.config, loaded.model, device)
                .map_err(|e| TrainError::Invalid(format!("starting weights {url}: {e}")))
        }
    }
}

/// The state of a job that has trained nothing yet.
fn fresh_state(ctx: &Context, job: &Job) -> TrainState {
    TrainState {
        format_version: checkpoint::FORMAT_VERSION,
        step: 0,
        tokens_seen: 0,
        cursor: 0,
        optimizer_updates: 0,
        lr: 0.0,
        rng_seed: ctx.run.spec.seed,
        world_size: ctx.world_size,
        config_hash: ctx.config_hash(),
        model: job.config.clone(),
        seq_len: job.seq_len,
        loss: None,
        loss_window: Vec::new(),
        spike_streak: Vec::new(),
        saved_unix: None,
        history: Default::default(),
    }
}

/// The weights and optimizer of a loaded checkpoint.
fn restore(loaded: Loaded, config: &LlamaConfig, opt_config: AdamWConfig, device: &Device) -> Result<(Params, AdamW)> {
    let invalid = |e: String| TrainError::Invalid(format!("checkpoint {}: {e}", loaded.name));
    let params = Params::from_named(config, loaded.model, device).map_err(invalid)?;
    let mut optimizer = AdamW::new(opt_config, &params)?;
    optimizer.restore(&params, loaded.optim, loaded.state.optimizer_updates).map_err(invalid)?;
    Ok((params, optimizer))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spike_detector_flags_outliers_and_keeps_them_out_of_the_window() {
        let mut d = SpikeDetector::new(4, 3.0, 10, &[], &[]);
        for l in [2.0, 2.1, 1.9, 2.0] {
            assert_eq!(d.observe(l), Verdict::Normal);
        }
        assert!(matches!(d.observe(9.0), Verdict::Spike { .. }));
        assert_eq!(d.history(), [2.0, 2.1, 1.9, 2.0]);
        assert_eq!(d.observe(2.05), Verdict::Normal);
        let restored = SpikeDetector::new(4, 3.0, 10, &d.history(), d.streak());
        assert_eq!(restored.history(), d.history());
        assert_eq!(SpikeDetector::new(4, 0.0, 10, &[1.0; 4], &[]).observe(100.0), Verdict::Normal);
    }

    #[test]
    fn a_lasting_shift_in_the_loss_is_accepted_after_the_most_spikes_in_a_row() {
        let mut d = SpikeDetector::new(4, 3.0, 3, &[2.0, 2.1, 1.9, 2.0], &[]);
        // The loss jumps to about 5 and stays there: three spikes are handled, the fourth is a new
        // level, and the detector then judges against it.
        let verdicts: Vec<Verdict> = [5.0, 5.1, 4.9, 5.0].iter().map(|&l| d.observe(l)).collect();
        assert!(verdicts[..3].iter().all(|v| matches!(v, Verdict::Spike { .. })), "{verdicts:?}");
        assert!(matches!(verdicts[3], Verdict::NewLevel { streak: 4, .. }), "{verdicts:?}");
        assert_eq!(d.history(), [5.0, 5.1, 4.9, 5.0]);
        assert!(d.streak().is_empty());
        assert_eq!(d.observe(5.05), Verdict::Normal);
        // A streak survives a checkpoint: two spikes, a restore, two more reach the cap.
        let mut d = SpikeDetector::new(4, 3.0, 3, &[2.0, 2.1, 1.9, 2.0], &[]);
        d.observe(9.0);
        d.observe(9.0);
        let mut restored = SpikeDetector::new(4, 3.0, 3, &d.history(), d.streak());
        assert!(matches!(restored.observe(9.0), Verdict::Spike { .. }));
        assert!(matches!(restored.observe(9.0), Verdict::NewLevel { streak: 4, .. }));
        // A normal step ends a streak.
        let mut d = SpikeDetector::new(4, 3.0, 2, &[2.0, 2.1, 1.9, 2.0], &[]);
        for l in [9.0, 9.0, 2.0, 9.0, 9.0] {
            assert!(!matches!(d.observe(l), Verdict::NewLevel { .. }));
        }
    }
}
