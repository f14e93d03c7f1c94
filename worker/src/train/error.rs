//! Why training stops early, and what the runner does about each cause.

use crate::checkpoint;
use crate::frame::{DeviceError, StageError, UpstreamError};

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
    Shard(#[from] crate::tokens::ShardError),
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
/// as the frame classifies them; an error of the tensor library or the collectives that says the GPU
/// failed is the device's; a rank mismatch (the gang loads again), a divergence, a failed save and
/// anything else of the tensor library fail the attempt.
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
            E::Model(_) | E::Dist(_) if crate::frame::device_fault(&e.to_string()) => StageError::Device(Box::new(e)),
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

pub(crate) type Result<T, E = TrainError> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use pretrain_crd::contract::exit;

    use super::*;

    #[test]
    fn errors_of_the_tensor_library_that_say_the_hardware_failed_are_the_devices() {
        let code = |text: &str| StageError::from(TrainError::Model(candle_core::Error::Msg(text.into()))).exit_code();
        assert_eq!(code("NCCL error: ncclSystemError: System call or external library call failed"), exit::DEVICE);
        assert_eq!(
            code("DriverError(CUDA_ERROR_ECC_UNCORRECTABLE, \"uncorrectable ECC error encountered\")"),
            exit::DEVICE
        );
        assert_eq!(code("DriverError(CUDA_ERROR_OUT_OF_MEMORY, \"out of memory\")"), exit::FAILED);
        assert_eq!(code("shape mismatch in matmul"), exit::FAILED);
    }
}
