//! The eval stage and the measurements it is made of: held-out perplexity and bits per byte,
//! probability probes, cloze and generative benchmarks, passkey retrieval.

pub mod passkey;
pub mod perplexity;
mod report;
pub mod stage;
pub mod tasks;

pub use crate::score::{Request, ScoreError, Scored, Scorer, encode_prompt, encode_request, probe_logprobs};
use crate::tokenizer::EncoderError;

/// Why an evaluation failed.
#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    /// Upstream outputs are missing or the spec cannot be evaluated as written.
    #[error("{0}")]
    Invalid(String),
    /// A line of a task file is malformed.
    #[error("{file}:{line}: {reason}")]
    Task {
        /// The task file.
        file: String,
        /// 1-based line.
        line: usize,
        /// What is wrong.
        reason: String,
    },
    /// An upstream stage's outputs cannot be read.
    #[error(transparent)]
    Upstream(#[from] crate::frame::UpstreamError),
    /// A benchmark file could not be read.
    #[error(transparent)]
    Fetch(#[from] crate::ContextError),
    /// The compute device cannot be used.
    #[error(transparent)]
    Device(#[from] crate::frame::DeviceError),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] pretrain_store::Error),
    /// Loading a checkpoint failed.
    #[error(transparent)]
    Checkpoint(#[from] crate::checkpoint::CheckpointError),
    /// The tensor library failed.
    #[error("model: {0}")]
    Model(#[from] candle_core::Error),
    /// Text could not be encoded.
    #[error("tokenizer: {0}")]
    Encoder(#[from] EncoderError),
    /// Local scratch files failed.
    #[error("scratch: {0}")]
    Scratch(#[from] std::io::Error),
}

/// A spec, task file or upstream that cannot be evaluated is permanent; the store, the device and
/// checkpoints as their own errors are classified; the tensor library, the tokenizer and scratch
/// files fail the attempt.
impl From<EvalError> for crate::frame::StageError {
    fn from(e: EvalError) -> Self {
        match e {
            EvalError::Invalid(_) | EvalError::Task { .. } => Self::Invalid(Box::new(e)),
            EvalError::Upstream(upstream) => upstream.into(),
            EvalError::Fetch(fetch) => fetch.into(),
            EvalError::Device(device) => device.into(),
            EvalError::Store(store) => store.into(),
            EvalError::Checkpoint(checkpoint) => checkpoint.into(),
            EvalError::Model(_) | EvalError::Encoder(_) | EvalError::Scratch(_) => Self::Failed(Box::new(e)),
        }
    }
}

/// Scoring fails in the tokenizer or the tensor library.
impl From<ScoreError> for EvalError {
    fn from(e: ScoreError) -> Self {
        match e {
            ScoreError::Encoder(e) => Self::Encoder(e),
            ScoreError::Model(e) => Self::Model(e),
        }
    }
}
