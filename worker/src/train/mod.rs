//! The train stage: the loop, AdamW, schedules, the prefetching loader, checkpoints.

mod error;
pub mod interval;
pub mod job;
pub mod loader;
mod metrics;
pub mod optim;
mod saver;
pub mod schedule;
pub mod stage;
pub mod tensorboard;
pub mod trainer;
