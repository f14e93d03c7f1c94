//! The PretrainRun operator and the `pretrain` command line.
//!
//! `local` runs a manifest's stages on one machine as child `pretrain-worker` processes.

pub mod local;
