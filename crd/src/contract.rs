//! The stage contract between the operator (or the local runner) and `pretrain-worker`: environment
//! variables and exit codes.

/// Environment variable with the run name (`metadata.name`).
pub const ENV_RUN: &str = "PRETRAIN_RUN";
/// Environment variable with the store URL (overrides `spec.storage.url`).
pub const ENV_STORE: &str = "PRETRAIN_STORE";
/// Rank of this process in its gang.
pub const ENV_RANK: &str = "RANK";
/// Processes in the gang.
pub const ENV_WORLD_SIZE: &str = "WORLD_SIZE";
/// Rendezvous host (rank 0).
pub const ENV_MASTER_ADDR: &str = "MASTER_ADDR";
/// Rendezvous port.
pub const ENV_MASTER_PORT: &str = "MASTER_PORT";
/// Index of this pod in an Indexed Job (sharded stages).
pub const ENV_JOB_COMPLETION_INDEX: &str = "JOB_COMPLETION_INDEX";

/// End-of-sequence tokens, in order of preference: the tokenize stage separates documents with the
/// first of them its tokenizer has as a special token, and an exported model ends generation there.
pub const SEPARATORS: [&str; 5] = ["<|eos|>", "<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>"];

/// Set to `json` by a runner that draws progress bars: the worker then reports progress as
/// [`PROGRESS_PREFIX`] lines on stdout instead of its periodic log lines.
pub const ENV_PROGRESS: &str = "PRETRAIN_PROGRESS";
/// Prefix of a progress line, followed by a JSON [`ProgressEvent`].
pub const PROGRESS_PREFIX: &str = "@progress ";

/// One progress report of a worker process.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ProgressEvent {
    /// What is progressing (`train`, `data-prep map 1`, ...).
    pub label: String,
    /// Unit of `done` and `total` (`steps`, `documents`, ...).
    pub unit: String,
    /// Units done.
    pub done: u64,
    /// Units in all, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total: Option<u64>,
    /// The latest numbers worth showing (loss, rate, ...).
    #[serde(default)]
    pub message: String,
}

/// Exit codes of `pretrain-worker`.
pub mod exit {
    /// The stage committed its outputs (or found them committed already).
    pub const DONE: i32 = 0;
    /// The stage failed; the last stderr line says why. Run it again (counted against
    /// `maxRestarts`).
    pub const FAILED: i32 = 1;
    /// The spec, the command line or an input is invalid; retrying cannot help.
    pub const INVALID: i32 = 2;
    /// A service the stage needs (the object store, the GPU) stayed unavailable past the stage's own
    /// retries (EX_UNAVAILABLE). Run it again after a backoff, as for [`FAILED`].
    pub const UNAVAILABLE: i32 = 69;
    /// The GPU or its interconnect failed under the stage (a CUDA error such as an Xid or an
    /// uncorrectable ECC error, an NCCL system error, a GPU that would not start): the node is
    /// suspect (EX_IOERR). Run it again, as for [`FAILED`]; the operator counts it against the node,
    /// and quarantines a node that keeps failing.
    pub const DEVICE: i32 = 74;
    /// The stage checkpointed on SIGTERM and wants to be resumed (EX_TEMPFAIL).
    pub const RESUME: i32 = 75;
    /// Another rank of the gang died or stalled; this one is healthy. Restart the gang from its
    /// last checkpoint (the failure is the other rank's, whose exit says why).
    pub const PEER_LOST: i32 = 76;
}
