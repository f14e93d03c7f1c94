//! The train stage: the loop, AdamW, schedules, the prefetching loader, checkpoints.

pub mod checkpoint;
pub mod loader;
pub mod optim;
pub mod schedule;
pub mod stage;
