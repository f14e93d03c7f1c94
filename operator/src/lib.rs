//! The PretrainRun operator and the `pretrain` command line.
//!
//! `plan` decides what to run next from a spec and observed stage states (pure); `local` executes its
//! decisions on one machine as child `pretrain-worker` processes, `k8s` on a cluster as Jobs.

pub mod checkpoints;
pub mod dashboard;
pub mod export;
pub mod k8s;
pub mod labels;
pub mod local;
pub mod plan;
pub mod schedule;
