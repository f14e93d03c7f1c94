//! What a run of the training loop trains: the train stage from a seed, or long-context
//! continuation from train's final weights, with its batch shape and precision.

use candle_core::{DType, Device};
use pretrain_crd::spec::{LongContext, Optimizer, Precision, RopeScalingKind, Schedule};
use pretrain_crd::{PretrainRunSpec, Stage};
use pretrain_store::StageDir;

use super::error::{Result, TrainError};
use super::loader::{BatchShape, shuffle_window};
use crate::Context;
use crate::checkpoint;
use crate::model::rope::ntk_base;
use crate::model::{LlamaConfig, Scaling};

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
    /// Gradient groups per step: the gang's data-parallel ranks at full size
    /// (`spec.train.resources`), whatever number of ranks trains now.
    pub groups: usize,
    /// Optimizer steps.
    pub total_steps: u64,
    /// Optimizer settings.
    pub optimizer: Optimizer,
    /// Learning-rate schedule.
    pub schedule: Schedule,
    /// Initial weights.
    pub start: Start,
    /// Long-context data: long documents upsampled within each category ([`LongData`]), instead of
    /// the stream in shard order.
    pub long_data: Option<LongData>,
}

/// How long-context training draws its data ([`crate::tokens::TokenStream::upsample_long`]).
#[derive(Debug, Clone, PartialEq)]
pub struct LongData {
    /// Tokens from which a document is long.
    pub long_tokens: u64,
    /// How much more often a long document is drawn.
    pub upsample: f64,
    /// Seed of the draws and the shuffle.
    pub seed: u64,
    /// The spec's categories, in the numbering of tokenize's category files.
    pub categories: Vec<String>,
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
            groups: t.resources.ranks() as usize,
            total_steps: spec.train_steps(),
            optimizer: t.optimizer.clone(),
            schedule: t.schedule.clone(),
            start: Start::Seed(spec.seed),
            long_data: None,
        }
    }

    /// The long-context job: train's model with the new RoPE, its `tokensFraction` share of the run's
    /// token budget at the new length, train's optimizer settings at `longContext.lr` (a tenth of train's
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
        let micro = match lc.micro_batch_size {
            Some(m) => m as usize,
            None => (base.micro * base.seq_len / seq_len).max(1),
        };
        // Keep train's tokens per step where the new length allows, in whole micro-batches per
        // gradient group (so the steps do not depend on how many ranks train).
        let unit = micro * base.groups;
        let sequences = ((spec.train.global_batch_tokens as usize / seq_len) / unit).max(1) * unit;
        let step_tokens = (sequences * seq_len) as u64;
        let tokens = spec.long_context_tokens();
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
            groups: base.groups,
            total_steps,
            optimizer,
            schedule,
            start: Start::Weights { dir: train_dir, step },
            long_data: Some(LongData {
                long_tokens: u64::from(lc.long_document_tokens.unwrap_or(spec.train.seq_len)),
                upsample: lc.upsample_long,
                seed: spec.seed,
                categories: spec.data.categories(),
            }),
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

impl Job {
    /// How this rank cuts the job's batches: each gradient group is whole micro-batches, and no
    /// more ranks train than there are groups (a gang may shrink, never grow past its size).
    pub fn batch_shape(&self, ctx: &Context) -> Result<BatchShape> {
        let shape = BatchShape {
            seq_len: self.seq_len,
            sequences: self.sequences,
            rank: ctx.rank as usize,
            world: ctx.world_size as usize,
            groups: self.groups,
            window: shuffle_window(self.sequences),
            seed: ctx.run.spec.seed,
        };
        if shape.world > self.groups {
            return Err(TrainError::Invalid(format!(
                "{}: {} ranks, but spec.train.resources makes a gang of at most {} (WORLD_SIZE is over the nodes x GPUs per node)",
                self.label, shape.world, self.groups
            )));
        }
        if shape.group_sequences() == 0
            || !self.sequences.is_multiple_of(self.groups)
            || !shape.group_sequences().is_multiple_of(self.micro)
        {
            return Err(TrainError::Invalid(format!(
                "{}: {} sequences per step do not split into {} groups of whole micro-batches of {}",
                self.label, self.sequences, self.groups, self.micro
            )));
        }
        Ok(shape)
    }
}

/// The dtype the spec's precision gives on `device`: bf16 on GPUs unless fp32 is asked for.
pub fn dtype(precision: Precision, device: &Device) -> Result<DType> {
    match (precision, device.is_cuda()) {
        (Precision::Fp32, _) | (Precision::Auto, false) => Ok(DType::F32),
        (Precision::Bf16, false) => {
            Err(TrainError::Invalid("train.precision bf16 needs GPUs (train.resources.gpusPerNode > 0)".into()))
        }
        (Precision::Bf16 | Precision::Auto, true) => Ok(DType::BF16),
    }
}

/// The token budget against the data. When training needs more tokens than the stream holds, the
/// loader reads the stream again, which multiplies every category's epochs (those the mix gave it,
/// `epochs`): refused when a category would go over `max_epochs`, said with the numbers otherwise.
/// `Ok(None)` when the budget fits in one pass.
pub fn check_budget(
    budget: u64,
    stream_tokens: u64,
    epochs: &std::collections::BTreeMap<String, f64>,
    max_epochs: f64,
) -> std::result::Result<Option<String>, String> {
    let passes = budget as f64 / stream_tokens.max(1) as f64;
    if passes <= 1.0 {
        return Ok(None);
    }
    let repeated: Vec<String> = epochs.iter().map(|(c, e)| format!("{c} {:.2}", e * passes)).collect();
    let worst = epochs.iter().map(|(c, e)| (c, e * passes)).max_by(|a, b| a.1.total_cmp(&b.1));
    let said = format!(
        "spec.train.tokens is {budget} but the training stream holds {stream_tokens} tokens: the loader reads it {passes:.2} times, so the categories train for {} epochs",
        if repeated.is_empty() { "unknown".to_string() } else { repeated.join(", ") }
    );
    match worst {
        Some((category, e)) if e > max_epochs * (1.0 + 1e-9) => Err(format!(
            "{said}, and {category} goes over spec.data.mix.maxEpochs ({max_epochs}); lower spec.train.tokens to at most {}, raise maxEpochs, or add data",
            (stream_tokens as f64 * max_epochs / (e / passes)).floor() as u64
        )),
        _ => Ok(Some(said)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_budget_beyond_the_stream_is_said_and_refused_over_max_epochs() {
        let epochs: std::collections::BTreeMap<String, f64> = [("web".into(), 1.0), ("code".into(), 2.0)].into();
        assert_eq!(check_budget(900, 1000, &epochs, 4.0), Ok(None));
        let said = check_budget(1500, 1000, &epochs, 4.0).unwrap().unwrap();
        assert!(said.contains("1.50 times") && said.contains("code 3.00, web 1.50"), "{said}");
        let refused = check_budget(2500, 1000, &epochs, 4.0).unwrap_err();
        assert!(refused.contains("code goes over spec.data.mix.maxEpochs (4)"), "{refused}");
        assert!(refused.contains("at most 2000"), "{refused}");
    }
}
