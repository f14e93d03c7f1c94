//! Checkpoints, as DESIGN.md lays them out:
//! `<run>/<stage>/ckpt/step-<09d>/{model.safetensors, optim.safetensors, state.json}`, then
//! `MANIFEST.json` (size and sha256 of every file) written last, then the `ckpt/latest` pointer.
//!
//! Saving snapshots the weights and moments to host memory in the step loop and writes and uploads
//! them on a background task. Loading takes the newest checkpoint whose manifest validates: one
//! without a manifest (torn) or with a file of the wrong size or hash is skipped with a warning naming it.

use std::collections::HashMap;
use std::io::Read;
use std::path::Path;

use bytes::Bytes;
use candle_core::{Device, Tensor};
use pretrain_store::{FileEntry, StageDir};
use sha2::{Digest, Sha256};

pub use pretrain_store::artifact::{FORMAT_VERSION, Manifest, TrainState, dir_name};

/// Host copies of everything a checkpoint holds.
#[derive(Debug)]
pub struct Snapshot {
    /// `state.json`.
    pub state: TrainState,
    /// Weights by name.
    pub model: Vec<(String, Tensor)>,
    /// Optimizer moments by name.
    pub optim: Vec<(String, Tensor)>,
}

impl Snapshot {
    /// Deep copies on the host: the step loop can go on changing the originals.
    pub fn take(
        state: TrainState,
        model: Vec<(String, Tensor)>,
        optim: Vec<(String, Tensor)>,
    ) -> candle_core::Result<Self> {
        let host = |all: Vec<(String, Tensor)>| -> candle_core::Result<Vec<(String, Tensor)>> {
            all.into_iter().map(|(n, t)| Ok((n, t.to_device(&Device::Cpu)?.copy()?))).collect()
        };
        Ok(Self { state, model: host(model)?, optim: host(optim)? })
    }
}

/// A checkpoint failure.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    /// The store failed.
    #[error(transparent)]
    Store(#[from] pretrain_store::Error),
    /// Local files or serialisation failed.
    #[error("checkpoint {name}: {reason}")]
    Local {
        /// Checkpoint directory name.
        name: String,
        /// What failed.
        reason: String,
    },
    /// The checkpoint is incomplete or does not match its manifest (an interrupted save, say).
    #[error("{url}: {reason}")]
    Unusable {
        /// The checkpoint's directory.
        url: String,
        /// What is wrong with it.
        reason: String,
    },
}

/// A store failure as the frame classifies it; a local one fails the attempt; a checkpoint that is
/// asked for by name and unusable cannot become usable.
impl From<CheckpointError> for crate::frame::StageError {
    fn from(e: CheckpointError) -> Self {
        match e {
            CheckpointError::Store(store) => store.into(),
            CheckpointError::Local { .. } => Self::Failed(Box::new(e)),
            CheckpointError::Unusable { .. } => Self::Invalid(Box::new(e)),
        }
    }
}

/// Writes and uploads a checkpoint, then the `latest` pointer, then deletes all but the newest `keep`.
/// Returns the entries of the checkpoint's files (paths relative to the stage directory).
pub async fn save(dir: &StageDir, snapshot: Snapshot, keep: u32) -> Result<Vec<FileEntry>, CheckpointError> {
    let name = dir_name(snapshot.state.step);
    let local = |reason: String| CheckpointError::Local { name: name.clone(), reason };
    let tmp = tempfile::tempdir().map_err(|e| local(e.to_string()))?;
    let step = snapshot.state.step;
    let (tmp_path, name_for_task) = (tmp.path().to_path_buf(), name.clone());
    tokio::task::spawn_blocking(move || write_local(&tmp_path, &snapshot))
        .await
        .expect("checkpoint serialisation does not panic")
        .map_err(|reason| CheckpointError::Local { name: name_for_task, reason })?;
    let mut files = Vec::new();
    for file in ["model.safetensors", "optim.safetensors", "state.json"] {
        let mut entry = dir.put_file(&format!("ckpt/{name}/{file}"), &tmp.path().join(file)).await?;
        entry.path = file.into();
        files.push(entry);
    }
    let manifest = Manifest::new(step, files.clone());
    let json = serde_json::to_vec_pretty(&manifest).expect("a manifest serialises");
    dir.put(&format!("ckpt/{name}/MANIFEST.json"), Bytes::from(json)).await?;
    dir.put("ckpt/latest", Bytes::from(name.clone())).await?;
    retain(dir, keep).await?;
    Ok(in_stage_dir(&name, files))
}

fn write_local(dir: &Path, snapshot: &Snapshot) -> Result<(), String> {
    let to_map = |all: &[(String, Tensor)]| all.iter().cloned().collect::<HashMap<String, Tensor>>();
    candle_core::safetensors::save(&to_map(&snapshot.model), dir.join("model.safetensors"))
        .map_err(|e| e.to_string())?;
    candle_core::safetensors::save(&to_map(&snapshot.optim), dir.join("optim.safetensors"))
        .map_err(|e| e.to_string())?;
    let state = serde_json::to_vec_pretty(&snapshot.state).map_err(|e| e.to_string())?;
    std::fs::write(dir.join("state.json"), state).map_err(|e| e.to_string())
}

/// Steps of the checkpoint directories under `ckpt/`, newest first (whether or not complete).
pub async fn steps(dir: &StageDir) -> Result<Vec<u64>, CheckpointError> {
    let prefix = dir.key("ckpt")?;
    let mut steps: Vec<u64> = dir
        .store()
        .list(&prefix)
        .await?
        .iter()
        .filter_map(|k| k.parts().nth(prefix.parts().count()).map(|p| p.as_ref().to_string()))
        .filter_map(|p| p.strip_prefix("step-").and_then(|s| s.parse().ok()))
        .collect();
    steps.sort_unstable_by(|a, b| b.cmp(a));
    steps.dedup();
    Ok(steps)
}

async fn retain(dir: &StageDir, keep: u32) -> Result<(), CheckpointError> {
    let mut complete = Vec::new();
    for step in steps(dir).await? {
        if dir.store().get_opt(&dir.key(&format!("ckpt/{}/MANIFEST.json", dir_name(step)))?).await?.is_some() {
            complete.push(step);
        }
    }
    for &step in complete.iter().skip(keep.max(1) as usize) {
        // The manifest goes first, so a half-deleted checkpoint is never taken for a whole one.
        let name = dir_name(step);
        dir.store().delete(&dir.key(&format!("ckpt/{name}/MANIFEST.json"))?).await?;
        dir.store().delete_prefix(&dir.key(&format!("ckpt/{name}"))?).await?;
    }
    Ok(())
}

/// A checkpoint read back and verified.
#[derive(Debug)]
pub struct Loaded {
    /// Its directory name.
    pub name: String,
    /// `state.json`.
    pub state: TrainState,
    /// Weights.
    pub model: HashMap<String, Tensor>,
    /// Optimizer moments.
    pub optim: HashMap<String, Tensor>,
    /// The checkpoint's files (paths relative to the stage directory).
    pub files: Vec<FileEntry>,
}

/// The newest checkpoint whose manifest validates, if any; each one skipped is named on stderr.
pub async fn load_latest(dir: &StageDir, device: &Device) -> Result<Option<Loaded>, CheckpointError> {
    for step in steps(dir).await? {
        match load(dir, step, device).await {
            Ok(loaded) => return Ok(Some(loaded)),
            Err(CheckpointError::Unusable { url, reason }) => eprintln!("train: skipping checkpoint {url}: {reason}"),
            Err(e) => return Err(e),
        }
    }
    Ok(None)
}

/// Loads checkpoint `step`; [`CheckpointError::Unusable`] says why it is not usable.
pub async fn load(dir: &StageDir, step: u64, device: &Device) -> Result<Loaded, CheckpointError> {
    let name = dir_name(step);
    let unusable = |reason: String| CheckpointError::Unusable { url: dir.url(&format!("ckpt/{name}")), reason };
    let Some(manifest) = dir.store().get_opt(&dir.key(&format!("ckpt/{name}/MANIFEST.json"))?).await? else {
        return Err(unusable("no MANIFEST.json (an interrupted save)".into()));
    };
    let manifest = Manifest::parse(&manifest).map_err(|e| unusable(e.reason))?;
    let tmp = tempfile::tempdir().map_err(|e| CheckpointError::Local { name: name.clone(), reason: e.to_string() })?;
    for f in &manifest.files {
        let local = tmp.path().join(&f.path);
        let key = dir.key(&format!("ckpt/{name}/{}", f.path))?;
        if dir.store().size(&key).await? != Some(f.size) {
            return Err(unusable(format!("{} is missing or not {} bytes", f.path, f.size)));
        }
        dir.store().download(&key, &local).await?;
        let sha =
            sha256_file(&local).map_err(|e| CheckpointError::Local { name: name.clone(), reason: e.to_string() })?;
        if sha != f.sha256 {
            return Err(unusable(format!("{} has sha256 {sha}, the manifest says {}", f.path, f.sha256)));
        }
    }
    for needed in ["model.safetensors", "optim.safetensors", "state.json"] {
        if !manifest.files.iter().any(|f| f.path == needed) {
            return Err(unusable(format!("the manifest lists no {needed}")));
        }
    }
    let state: TrainState = match std::fs::read(tmp.path().join("state.json"))
        .map_err(|e| e.to_string())
        .and_then(|b| serde_json::from_slice(&b).map_err(|e| e.to_string()))
    {
        Ok(s) => s,
        Err(e) => return Err(unusable(format!("state.json: {e}"))),
    };
    let read =
        |file: &str| candle_core::safetensors::load(tmp.path().join(file), device).map_err(|e| format!("{file}: {e}"));
    let (model, optim) = match (read("model.safetensors"), read("optim.safetensors")) {
        (Ok(m), Ok(o)) => (m, o),
        (Err(e), _) | (_, Err(e)) => return Err(unusable(e)),
    };
    let files = in_stage_dir(&name, manifest.files);
    Ok(Loaded { name, state, model, optim, files })
}

/// The directory of `stage` (train or long-context) and the step of the final checkpoint it committed
/// for `ctx`'s spec.
pub async fn committed_final(
    ctx: &crate::Context,
    stage: pretrain_crd::Stage,
) -> Result<(StageDir, u64), crate::frame::UpstreamError> {
    use crate::frame::UpstreamError;
    let dir = ctx.dir.store().stage(ctx.run_name(), stage)?;
    let success = dir.url("_SUCCESS.json");
    let Some(commit) = dir.committed(&ctx.run.spec.stage_config_hash(stage)).await? else {
        return Err(UpstreamError::NotCommitted { stage, url: success });
    };
    match commit.stats["steps"].as_u64() {
        Some(step) => Ok((dir, step)),
        None => Err(UpstreamError::Corrupt { url: success, reason: "records no steps".into() }),
    }
}

/// Manifest entries (paths relative to checkpoint `name`) with paths relative to the stage directory.
fn in_stage_dir(name: &str, files: Vec<FileEntry>) -> Vec<FileEntry> {
    files
        .into_iter()
        .map(|mut f| {
            f.path = format!("ckpt/{name}/{}", f.path);
            f
        })
        .collect()
}

fn sha256_file(path: &Path) -> std::io::Result<String> {
    let mut file = std::fs::File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            return Ok(hex::encode(hasher.finalize()));
        }
        hasher.update(&buf[..n]);
    }
}
