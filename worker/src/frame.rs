//! The frame every stage runs in: which part of a stage a process runs ([`Phase`]), how it ended
//! ([`Outcome`]) and, when it failed, what whoever runs it should do next ([`StageError`]), each
//! with the one exit code of the stage contract (`pretrain_crd::contract::exit`) that says so.
//!
//! Stages keep error types of their own, detailed enough for their tests and messages; each converts
//! into [`StageError`] by a `From` written beside it, which matches every variant by name, so that a
//! new kind of failure must be classified where it is added. Store failures are classified once,
//! here: what outlasted the store's retries is [`StageError::Unavailable`] (retried later), what no
//! retry can fix (a malformed URL or key) is [`StageError::Invalid`].

use std::error::Error as StdError;
use std::path::Path;

use pretrain_crd::Stage;
use pretrain_crd::contract::exit;
use pretrain_store::{StageCommit, StageDir};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// A failure's cause, boxed: stages return their own error types and the frame only needs to show
/// them.
pub type Cause = Box<dyn StdError + Send + Sync>;

/// Which part of a sharded stage (data-prep, tokenize) a process runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Map task `n` (one Indexed Job index).
    Map(u32),
    /// Dedup task `n` of data-prep, after every map task (one Indexed Job index).
    Dedup(u32),
    /// The cluster task of data-prep, after every dedup task.
    Cluster,
    /// Embed task `n` of data-prep's in-context order, after the cluster task (one Indexed Job
    /// index).
    Embed(u32),
    /// Order task `n` of data-prep's in-context order, after every embed task (one Indexed Job
    /// index).
    Order(u32),
    /// Route task `n` of data-prep, after the cluster task, or the order tasks for in-context
    /// order (one Indexed Job index).
    Route(u32),
    /// Write task `n` of data-prep, after every route task (one Indexed Job index).
    Write(u32),
    /// The step that needs every task before it done, and commits.
    Reduce,
    /// Every task of every phase, then the reduce, in this process.
    All,
}

impl Phase {
    /// The phase's name, as `--phase` takes it.
    pub fn name(self) -> &'static str {
        match self {
            Phase::Map(_) => "map",
            Phase::Dedup(_) => "dedup",
            Phase::Cluster => "cluster",
            Phase::Embed(_) => "embed",
            Phase::Order(_) => "order",
            Phase::Route(_) => "route",
            Phase::Write(_) => "write",
            Phase::Reduce => "reduce",
            Phase::All => "all",
        }
    }
}

/// How a stage process that did not fail ended.
#[derive(Debug)]
pub enum Outcome {
    /// The stage committed these outputs.
    Committed(Box<StageCommit>),
    /// Task `task` of a phase before the reduce (`map`, `dedup`, `cluster`, `route`, `write`)
    /// finished; the reduce commits.
    TaskDone {
        /// The phase.
        phase: &'static str,
        /// Its task.
        task: u32,
    },
    /// A non-leader rank finished its steps; rank 0 committed.
    Joined {
        /// Steps trained.
        step: u64,
    },
    /// Stopped on SIGTERM after checkpointing; resume to continue.
    Preempted {
        /// The step checkpointed.
        step: u64,
    },
    /// One checkpoint was evaluated (`eval --checkpoint`); nothing to commit.
    Measured,
}

impl Outcome {
    /// The process's exit code.
    pub fn exit_code(&self) -> i32 {
        match self {
            Self::Preempted { .. } => exit::RESUME,
            Self::Committed(_) | Self::TaskDone { .. } | Self::Joined { .. } | Self::Measured => exit::DONE,
        }
    }

    /// The line the process prints (to stderr for [`Outcome::Preempted`], to stdout otherwise).
    pub fn describe(&self, stage: Stage, rank: u32) -> String {
        match self {
            Self::Committed(commit) => format!("{stage}: committed {} files", commit.files.len()),
            Self::TaskDone { phase, task } => format!("{stage}: {phase} task {task} done"),
            Self::Joined { step } => format!("{stage}: rank {rank} trained {step} steps; rank 0 committed"),
            Self::Preempted { step } => {
                format!("{stage}: stopped on SIGTERM after checkpointing step {step}; resume to continue")
            }
            Self::Measured => format!("{stage}: measured"),
        }
    }
}

/// Why a stage process failed, as what should happen next.
#[derive(Debug, thiserror::Error)]
pub enum StageError {
    /// The spec, the command line or an input is wrong: retrying cannot help; the run fails.
    #[error(transparent)]
    Invalid(Cause),
    /// A service the stage needs (the object store, the GPU) stayed unavailable past its own
    /// retries: run the stage again later.
    #[error(transparent)]
    Unavailable(Cause),
    /// Another rank of the gang died or stalled: restart the gang from its last checkpoint.
    #[error(transparent)]
    PeerLost(Cause),
    /// The GPU or its interconnect failed ([`device_fault`]): run the stage again; the operator
    /// counts it against the node.
    #[error(transparent)]
    Device(Cause),
    /// Anything else: run the stage again, counting against `maxRestarts`.
    #[error(transparent)]
    Failed(Cause),
}

impl StageError {
    /// The process's exit code.
    pub fn exit_code(&self) -> i32 {
        match self {
            Self::Invalid(_) => exit::INVALID,
            Self::Unavailable(_) => exit::UNAVAILABLE,
            Self::PeerLost(_) => exit::PEER_LOST,
            Self::Device(_) => exit::DEVICE,
            Self::Failed(_) => exit::FAILED,
        }
    }

    /// Whether running the stage again cannot help.
    pub fn is_permanent(&self) -> bool {
        matches!(self, Self::Invalid(_))
    }

    /// How a store failure is classified, as the variant's constructor: for a stage error that wraps
    /// one and keeps its own message. What outlasted the retries is unavailable, a URL or key that
    /// cannot be used is invalid, a corrupt object or a permanent refusal (a missing object, a full
    /// disk) fails the attempt.
    pub fn for_store(e: &pretrain_store::Error) -> fn(Cause) -> StageError {
        use pretrain_store::Error as E;
        match e {
            E::Url { .. } | E::Key { .. } => Self::Invalid,
            E::Object { source, .. } if pretrain_store::retry::is_transient(source) => Self::Unavailable,
            E::Object { .. } | E::Corrupt { .. } => Self::Failed,
        }
    }
}

/// Store failures, as [`StageError::for_store`] says.
impl From<pretrain_store::Error> for StageError {
    fn from(e: pretrain_store::Error) -> Self {
        Self::for_store(&e)(Box::new(e))
    }
}

/// A spec or input that cannot be read: a bad spec or environment, or a local file that is missing
/// or may not be read, is invalid; the store as above.
impl From<crate::ContextError> for StageError {
    fn from(e: crate::ContextError) -> Self {
        use crate::ContextError as E;
        use std::io::ErrorKind;
        match e {
            E::Manifest(_) | E::Env { .. } => Self::Invalid(Box::new(e)),
            E::SpecFetch { ref source, .. } => Self::for_store(source)(Box::new(e)),
            E::File { ref source, .. }
                if matches!(source.kind(), ErrorKind::NotFound | ErrorKind::PermissionDenied) =>
            {
                Self::Invalid(Box::new(e))
            }
            E::File { .. } => Self::Failed(Box::new(e)),
            E::Store(source) => source.into(),
        }
    }
}

/// Why a stage cannot read the committed outputs of the stage before it.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// The upstream stage has not committed for this spec.
    #[error("{stage} has not committed outputs for this spec at {url}; run it first")]
    NotCommitted {
        /// The upstream stage.
        stage: Stage,
        /// Its commit marker.
        url: String,
    },
    /// Reading it failed.
    #[error(transparent)]
    Store(#[from] pretrain_store::Error),
    /// A committed file is not what its stage writes.
    #[error("{url}: {reason}")]
    Corrupt {
        /// The file.
        url: String,
        /// What is wrong.
        reason: String,
    },
}

/// A missing or broken upstream (a file its commit needs that is not there) cannot be fixed by
/// running this stage again; another store failure is classified as the store's.
impl From<UpstreamError> for StageError {
    fn from(e: UpstreamError) -> Self {
        use pretrain_store::Error as E;
        match e {
            UpstreamError::NotCommitted { .. } | UpstreamError::Corrupt { .. } => Self::Invalid(Box::new(e)),
            UpstreamError::Store(E::Object { ref source, .. })
                if matches!(**source, object_store::Error::NotFound { .. }) =>
            {
                Self::Invalid(Box::new(e))
            }
            UpstreamError::Store(source) => source.into(),
        }
    }
}

/// The compute device cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// The spec asks for GPUs from a build without CUDA: no retry can help.
    #[error(
        "train.resources.gpusPerNode is {gpus} but this worker was built without CUDA; build with --features cuda or set gpusPerNode: 0"
    )]
    NotBuilt {
        /// GPUs per node the spec asks for.
        gpus: u32,
    },
    /// The GPU failed to initialise: a fault of the node (driver, card), worth another try.
    #[error("train.resources.gpusPerNode is {gpus} but CUDA device {local} is not usable: {reason}")]
    Init {
        /// GPUs per node the spec asks for.
        gpus: u32,
        /// `LOCAL_RANK`.
        local: usize,
        /// What CUDA said.
        reason: String,
    },
}

/// A build without CUDA is invalid for a GPU spec; a GPU that fails to start is the node's fault.
impl From<DeviceError> for StageError {
    fn from(e: DeviceError) -> Self {
        match e {
            DeviceError::NotBuilt { .. } => Self::Invalid(Box::new(e)),
            DeviceError::Init { .. } => Self::Device(Box::new(e)),
        }
    }
}

/// What CUDA, the driver and NCCL say when the hardware under a process failed, rather than the
/// program: uncorrectable ECC and NVLink errors, a GPU that fell off the bus or is gone, an Xid in
/// the driver's words, NCCL's system and unhandled-CUDA errors.
const DEVICE_FAULTS: [&str; 10] = [
    "CUDA_ERROR_ECC_UNCORRECTABLE",
    "CUDA_ERROR_HARDWARE_STACK_ERROR",
    "CUDA_ERROR_NVLINK_UNCORRECTABLE",
    "CUDA_ERROR_DEVICE_UNAVAILABLE",
    "CUDA_ERROR_NO_DEVICE",
    "uncorrectable ECC error",
    "fallen off the bus",
    "Xid",
    "ncclSystemError",
    "ncclUnhandledCudaError",
];

/// Whether an error's text says the GPU or its interconnect failed ([`DEVICE_FAULTS`]).
pub fn device_fault(text: &str) -> bool {
    DEVICE_FAULTS.iter().any(|sign| text.contains(sign))
}

/// A local scratch file of a stage failed.
#[derive(Debug, thiserror::Error)]
#[error("scratch file {path}: {source}")]
pub struct ScratchError {
    /// The file.
    pub path: String,
    /// The OS error.
    pub source: std::io::Error,
}

/// A map task's completion marker, written after its outputs: the spec it was made for (its config
/// hash) and the task's own record. A reduce (or a rerun of the task) uses the outputs only beside
/// a marker of the current spec; the JSON keeps `configHash` beside the record's own fields.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MapDone<T> {
    /// The config hash of the spec the outputs were made for.
    pub config_hash: String,
    /// What the task records about its outputs.
    #[serde(flatten)]
    pub task: T,
}

impl<T: Serialize + DeserializeOwned> MapDone<T> {
    /// The marker `name` in `dir`, if there is one; one that does not parse is corrupt.
    pub async fn read(dir: &StageDir, name: &str) -> Result<Option<Self>, pretrain_store::Error> {
        let key = dir.key(name)?;
        let Some(bytes) = dir.store().get_opt(&key).await? else { return Ok(None) };
        serde_json::from_slice(&bytes).map(Some).map_err(|e| pretrain_store::Error::Corrupt {
            store: dir.store().url().into(),
            key: key.to_string(),
            reason: e.to_string(),
        })
    }

    /// Writes the marker `name` in `dir`: the last write of a map task.
    pub async fn write(&self, dir: &StageDir, name: &str) -> Result<(), pretrain_store::Error> {
        let json = serde_json::to_vec_pretty(self).expect("a map marker serialises");
        dir.put(name, bytes::Bytes::from(json)).await?;
        Ok(())
    }
}

/// Maps an I/O error on the scratch file `path` to a [`ScratchError`].
pub fn scratch(path: &Path) -> impl Fn(std::io::Error) -> ScratchError + '_ {
    move |source| ScratchError { path: path.display().to_string(), source }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn object(source: object_store::Error) -> pretrain_store::Error {
        pretrain_store::Error::Object { store: "s3://b".into(), key: "k".into(), source: Box::new(source) }
    }

    #[test]
    fn store_failures_are_classified_by_what_a_retry_can_do() {
        let outage = object(object_store::Error::Generic { store: "S3", source: "503 Service Unavailable".into() });
        assert_eq!(StageError::from(outage).exit_code(), exit::UNAVAILABLE);
        let missing = object(object_store::Error::NotFound { path: "k".into(), source: "404".into() });
        assert_eq!(StageError::from(missing).exit_code(), exit::FAILED);
        let url = pretrain_store::Error::Url { url: "ftp://x".into(), reason: "unsupported scheme".into() };
        assert_eq!(StageError::from(url).exit_code(), exit::INVALID);
    }

    #[test]
    fn an_upstream_read_keeps_the_store_classification_and_a_missing_commit_is_permanent() {
        let outage = object(object_store::Error::Generic { store: "S3", source: "connection reset".into() });
        let e = StageError::from(UpstreamError::from(outage));
        assert!(matches!(e, StageError::Unavailable(_)), "{e:?}");
        let missing =
            UpstreamError::NotCommitted { stage: Stage::Tokenize, url: "file:///r/tokenize/_SUCCESS.json".into() };
        let e = StageError::from(missing);
        assert!(e.is_permanent() && e.to_string().contains("run it first"), "{e}");
    }

    #[test]
    fn a_gpu_that_fails_to_start_is_the_nodes_and_a_build_without_cuda_is_invalid() {
        let init = DeviceError::Init { gpus: 8, local: 3, reason: "CUDA_ERROR_ECC_UNCORRECTABLE".into() };
        assert_eq!(StageError::from(init).exit_code(), exit::DEVICE);
        assert_eq!(StageError::from(DeviceError::NotBuilt { gpus: 8 }).exit_code(), exit::INVALID);
    }

    #[test]
    fn text_that_says_the_hardware_failed_is_a_device_fault() {
        assert!(device_fault("DriverError(CUDA_ERROR_ECC_UNCORRECTABLE, \"uncorrectable ECC error encountered\")"));
        assert!(device_fault("NVRM: Xid (PCI:0000:3b:00): 79, GPU has fallen off the bus"));
        assert!(!device_fault("DriverError(CUDA_ERROR_OUT_OF_MEMORY, \"out of memory\")"));
    }

    #[test]
    fn a_wrapping_error_is_classified_as_its_store_failure_and_keeps_its_message() {
        let outage = object(object_store::Error::Generic { store: "S3", source: "503".into() });
        let e = crate::ContextError::SpecFetch { url: "s3://b/run.yaml".into(), source: outage };
        let e = StageError::from(e);
        assert_eq!(e.exit_code(), exit::UNAVAILABLE);
        assert_eq!(e.to_string(), "s3://b/run.yaml: s3://b/k: Generic S3 error: 503");
    }
}
