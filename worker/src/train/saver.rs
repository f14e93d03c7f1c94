//! Checkpoints saved in the background while training goes on: the step loop hands over a snapshot
//! and waits only for the save before it.

use bytes::Bytes;
use pretrain_store::{FileEntry, StageDir};
use tokio::task::JoinHandle;

use super::error::{Result, TrainError};
use super::tensorboard;
use crate::checkpoint::{self, Copied, dir_name};

/// The save in flight, and the files of the newest finished one.
#[derive(Debug)]
pub struct Saver {
    dir: StageDir,
    keep: u32,
    pending: Option<JoinHandle<Result<Vec<FileEntry>>>>,
    files: Vec<FileEntry>,
}

impl Saver {
    /// Saves into `dir`, keeping its `keep` newest checkpoints.
    pub fn new(dir: StageDir, keep: u32) -> Self {
        Self { dir, keep, pending: None, files: Vec::new() }
    }

    /// Waits for the save in flight, if any; its error is the step loop's.
    pub async fn wait(&mut self) -> Result<()> {
        if let Some(pending) = self.pending.take() {
            self.files = pending.await.expect("the checkpoint task does not panic")?;
        }
        Ok(())
    }

    /// Starts saving the checkpoint of `step` once its snapshot is copied, with `metrics` (the
    /// metrics of its steps) written first: a checkpoint is never without them, and a resume from an
    /// older checkpoint drops the lines past it. Call [`Saver::wait`] first.
    pub fn start(&mut self, step: u64, snapshot: Copied, metrics: Bytes) {
        debug_assert!(self.pending.is_none(), "one save at a time");
        let (dir, keep) = (self.dir.clone(), self.keep);
        self.pending = Some(tokio::spawn(async move {
            let saved = async {
                let copy_failed = |reason: String| checkpoint::CheckpointError::Local { name: dir_name(step), reason };
                let snapshot = match snapshot.await {
                    Ok(Ok(snapshot)) => snapshot,
                    Ok(Err(e)) => return Err(copy_failed(format!("copying the weights to the host: {e}"))),
                    Err(_) => return Err(copy_failed("the copy of the weights ended without a snapshot".into())),
                };
                dir.put(tensorboard::FILE, Bytes::from(tensorboard::events(&metrics))).await?;
                dir.put("metrics.jsonl", metrics).await?;
                checkpoint::save(&dir, snapshot, keep).await
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
