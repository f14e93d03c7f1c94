//! The artifacts stages leave in the store, as types: what one stage writes and the next stage, the
//! operator's export and the run report read. No stage reads another's outputs except through these.
//!
//! - `<run>/data-prep/shards/NNNNN.jsonl.zst`: [`DocumentLine`]s; the stage's commit carries
//!   [`DataPrepStats`].
//! - `<run>/{train,long-context}/ckpt/step-NNNNNNNNN/` ([`dir_name`]): `state.json`
//!   ([`TrainState`], with the model's shape, [`LlamaConfig`]), `model.safetensors` and
//!   `optim.safetensors` (or a gang's shards of them, [`is_file_of`]), and [`Manifest`]
//!   (`MANIFEST.json`) written last.
//! - `<run>/{train,long-context}/metrics.jsonl`: one [`MetricsLine`] a step; the stage's commit
//!   carries [`TrainStats`].

mod checkpoint;
mod data;
mod eval;
mod tokens;
mod train;

pub use checkpoint::{
    FORMAT_VERSION, InvalidManifest, LlamaConfig, Manifest, ParamKind, RunHistory, Scaling, TrainState, dir_name,
    is_file_of,
};
pub use data::{
    ClassifierEval, DataPrepStats, DedupStats, DocumentLine, HeldOutStats, MapStats, MixStats, QualityStats, Skipped,
    StreamStats,
};
pub use eval::ProbeRow;
pub use tokens::{
    Compression, CompressionReport, Counts, SplitDocuments, SplitTokens, TokenShardStats, TokenizeStats,
    TokenizerStats, TokenizerTraining,
};
pub use train::{MetricsLine, TrainStats};
