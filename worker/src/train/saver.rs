//! Checkpoints saved in the background while training goes on: the step loop hands over a snapshot
//! and waits only for the save before it. Between checkpoints the saver also publishes the stage's
//! `metrics.jsonl` now and then, so that the dashboard's curves move while the run trains.

use std::time::{Duration, Instant};

use bytes::Bytes;
use pretrain_store::{FileEntry, StageDir};
use tokio::task::JoinHandle;

use super::error::{Result, TrainError};
use super::tensorboard;
use crate::checkpoint::{self, Copied, Shard, dir_name};

/// Metrics are published at most this often between checkpoints...
const PUBLISH_EVERY: Duration = Duration::from_secs(10);
/// ...and at most this share of the time (a long run's file grows, and each put rewrites it).
const PUBLISH_SHARE: f64 = 0.01;

/// The save in flight, the files of the newest finished one, and the metrics put in flight.
#[derive(Debug)]
pub struct Saver {
    dir: StageDir,
    keep: u32,
    shard: Shard,
    /// How long rank 0 waits for the other ranks' shards.
    wait: Duration,
    pending: Option<JoinHandle<Result<Vec<FileEntry>>>>,
    files: Vec<FileEntry>,
    published: Published,
}

/// Whether `task` is there and not finished.
fn running<T>(task: Option<&JoinHandle<T>>) -> bool {
    task.is_some_and(|t| !t.is_finished())
}

/// The last put of `metrics.jsonl` between checkpoints.
#[derive(Debug)]
struct Published {
    at: Instant,
    seconds: f64,
    pending: Option<JoinHandle<f64>>,
}

impl Saver {
    /// Saves `shard` of each checkpoint into `dir`, keeping its `keep` newest checkpoints; rank 0
    /// waits up to `wait` for the other ranks' shards.
    pub fn new(dir: StageDir, keep: u32, shard: Shard, wait: Duration) -> Self {
        let published = Published { at: Instant::now(), seconds: 0.0, pending: None };
        Self { dir, keep, shard, wait, pending: None, files: Vec::new(), published }
    }

    /// Puts `metrics.jsonl` (every line so far, from `metrics`) in the background when the last put
    /// is at least [`PUBLISH_EVERY`] old and a hundred times its own duration, and no save or put is
    /// running (a finished save waits for [`Saver::wait`] to collect it). Only the dashboard reads
    /// it before the next checkpoint: a resume keeps the lines up to its checkpoint, and a failed put
    /// is only said.
    pub fn publish(&mut self, metrics: &mut super::metrics::MetricsLog) -> Result<()> {
        let due = PUBLISH_EVERY.max(Duration::from_secs_f64(self.published.seconds / PUBLISH_SHARE));
        let busy = running(self.pending.as_ref()) || running(self.published.pending.as_ref());
        if busy || self.published.at.elapsed() < due {
            return Ok(());
        }
        if let Some(done) = self.published.pending.take() {
            self.published.seconds = futures::FutureExt::now_or_never(done).and_then(|r| r.ok()).unwrap_or(0.0);
        }
        let (dir, bytes) = (self.dir.clone(), metrics.bytes()?);
        self.published.at = Instant::now();
        self.published.pending = Some(tokio::spawn(async move {
            let began = Instant::now();
            if let Err(e) = dir.put("metrics.jsonl", bytes).await {
                eprintln!("metrics.jsonl not published (the next checkpoint writes it): {e}");
            }
            began.elapsed().as_secs_f64()
        }));
        Ok(())
    }

    /// Waits for the metrics put in flight: a save's own put of the file must land after it.
    async fn published(&mut self) {
        if let Some(pending) = self.published.pending.take() {
            self.published.seconds = pending.await.unwrap_or(0.0);
        }
    }

    /// Waits for the save in flight, if any; its error is the step loop's.
    pub async fn wait(&mut self) -> Result<()> {
        self.published().await;
        if let Some(pending) = self.pending.take() {
            self.files = pending.await.expect("the checkpoint task does not panic")?;
        }
        Ok(())
    }

    /// Starts saving this rank's shard of the checkpoint of `step` once its snapshot is copied; rank
    /// 0 writes `metrics` (the metrics of its steps) first: a checkpoint is never without them, and a
    /// resume from an older checkpoint drops the lines past it. Call [`Saver::wait`] first.
    pub fn start(&mut self, step: u64, snapshot: Copied, metrics: Option<Bytes>) {
        debug_assert!(self.pending.is_none(), "one save at a time");
        let (dir, keep, shard, wait) = (self.dir.clone(), self.keep, self.shard, self.wait);
        self.pending = Some(tokio::spawn(async move {
            let saved = async {
                let copy_failed = |reason: String| checkpoint::CheckpointError::Local { name: dir_name(step), reason };
                let snapshot = match snapshot.await {
                    Ok(Ok(snapshot)) => snapshot,
                    Ok(Err(e)) => return Err(copy_failed(format!("copying the weights to the host: {e}"))),
                    Err(_) => return Err(copy_failed("the copy of the weights ended without a snapshot".into())),
                };
                if let Some(metrics) = metrics {
                    dir.put(tensorboard::FILE, Bytes::from(tensorboard::events(&metrics))).await?;
                    dir.put("metrics.jsonl", metrics).await?;
                }
                checkpoint::save_shard(&dir, snapshot, shard, keep, wait).await
            };
            match saved.await {
                Ok(files) => Ok(files),
                Err(source) => Err(not_saved(&dir, step, source).await),
            }
        }));
    }

    /// The files of the newest checkpoint saved in this attempt (none when it saved nothing), once
    /// the save in flight has finished.
    pub async fn finish(mut self) -> Result<Vec<FileEntry>> {
        self.wait().await?;
        Ok(self.files)
    }
}

/// The error of a checkpoint that failed to save, naming the checkpoint a restart will resume from
/// (read back from the store, which is what the restart will see).
async fn not_saved(dir: &StageDir, step: u64, source: checkpoint::CheckpointError) -> TrainError {
    let latest = match dir.key("ckpt/latest") {
        Ok(key) => dir.store().get_opt(&key).await.ok().flatten(),
        Err(_) => None,
    };
    let kept = match latest {
        Some(name) => format!(
            "{} stays the latest complete checkpoint and a restart resumes from it",
            String::from_utf8_lossy(&name).trim()
        ),
        None => "no earlier checkpoint exists; a restart begins at step 0".into(),
    };
    TrainError::NotSaved { name: checkpoint::dir_name(step), kept, source }
}
