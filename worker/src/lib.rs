//! `pretrain-worker`: the processes that do a stage's work. A stage reads its spec, finds its inputs
//! under `<store>/<run>/<upstream>/`, writes its outputs under `<store>/<run>/<stage>/` and commits
//! them with `_SUCCESS.json` last. The worker never talks to Kubernetes.

pub mod allocator;
pub mod checkpoint;
pub mod context;
pub mod data;
pub mod dist;
pub mod eval;
pub mod frame;
pub mod fuzz;
pub mod model;
pub mod progress;
pub mod score;
pub mod tokenize;
pub mod tokenizer;
pub mod tokens;
pub mod train;

pub use context::{Context, ContextError};
