//! Checkpoints, as DESIGN.md lays them out:
//! `<run>/<stage>/ckpt/step-<09d>/{model.safetensors, optim.safetensors, state.json}`, then
//! `MANIFEST.json` (size and sha256 of every file) written last, then the `ckpt/latest` pointer.
//!
//! A gang of `w > 1` ranks saves in shards, each rank uploading its share of the bytes at once:
//! rank `r` writes `model-<r>-of-<w>.safetensors` and `optim-<r>-of-<w>.safetensors` (the tensors
//! [`shard_of`] gives it), then `part-<r>-of-<w>.json` with their sizes and hashes and the gang's
//! id; rank 0 writes its shard, waits for every other rank's part record of this gang, then writes
//! `state.json`, the manifest listing every shard, and the pointer. Loading merges the shards.
//!
//! Saving copies the weights and moments to host memory (on the CPU while the next step's forward and
//! backward run: only its optimizer update waits for the copy), then serialises them as safetensors
//! straight from that copy into parallel part uploads, hashing as they go, on a background task.
//! Loading takes the newest checkpoint whose manifest validates: one without a manifest (torn) or
//! with a file of the wrong size or hash is skipped with a warning naming it.

use std::collections::HashMap;

use bytes::Bytes;
use candle_core::{DType, Device, Tensor};
use pretrain_store::{FileEntry, StageDir};
use safetensors::tensor::{Metadata, TensorInfo};

pub use pretrain_store::artifact::{FORMAT_VERSION, Manifest, TrainState, dir_name, is_file_of};

/// One tensor copied to host memory, as a safetensors file stores it.
#[derive(Debug, Clone)]
pub struct HostTensor {
    /// Its name in the file.
    pub name: String,
    /// Element type.
    pub dtype: safetensors::Dtype,
    /// Dimensions.
    pub shape: Vec<usize>,
    /// Little-endian elements, row-major.
    pub data: Bytes,
}

impl HostTensor {
    /// Copies `tensor` (from any device) to host memory; an f32 tensor is copied once.
    pub fn copy(name: String, tensor: &Tensor) -> candle_core::Result<Self> {
        let data = match tensor.dtype() {
            DType::F32 => Bytes::from_owner(F32Bytes(tensor.flatten_all()?.to_vec1::<f32>()?)),
            _ => {
                let mut bytes = Vec::with_capacity(tensor.elem_count() * tensor.dtype().size_in_bytes());
                tensor.write_bytes(&mut bytes)?;
                Bytes::from(bytes)
            }
        };
        Ok(Self { name, dtype: tensor.dtype().into(), shape: tensor.dims().to_vec(), data })
    }
}

/// f32 elements as their little-endian bytes (the host's order: candle's CPU backend assumes it too).
struct F32Bytes(Vec<f32>);

impl AsRef<[u8]> for F32Bytes {
    fn as_ref(&self) -> &[u8] {
        bytemuck::cast_slice(&self.0)
    }
}

/// Which rank of how many saves a snapshot, and the gang it belongs to (rank 0 takes only part
/// records of its own gang, never those an earlier attempt left).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    /// This rank.
    pub rank: usize,
    /// Ranks saving.
    pub world: usize,
    /// The attempt's gang, the same number on every rank.
    pub gang: u64,
}

impl Shard {
    /// One process saving everything.
    pub const WHOLE: Shard = Shard { rank: 0, world: 1, gang: 0 };

    /// The file of `kind` (`model`, `optim`) this shard writes.
    pub fn file(&self, kind: &str) -> String {
        if self.world <= 1 {
            format!("{kind}.safetensors")
        } else {
            format!("{kind}-{:05}-of-{:05}.safetensors", self.rank, self.world)
        }
    }

    fn part(&self, rank: usize) -> String {
        format!("part-{rank:05}-of-{:05}.json", self.world)
    }
}

/// The shard (of `world`) that saves each tensor of `bytes` bytes: each in turn to the shard with
/// the fewest bytes so far (the lowest on ties), so that every rank uploads about a `world`-th.
pub fn shard_of(bytes: &[usize], world: usize) -> Vec<usize> {
    let mut load = vec![0usize; world.max(1)];
    bytes
        .iter()
        .map(|&b| {
            let (shard, _) = load.iter().enumerate().min_by_key(|(i, l)| (**l, *i)).expect("a shard");
            load[shard] += b;
            shard
        })
        .collect()
}

/// The tensors of `all` that `shard` saves ([`shard_of`] by their bytes).
pub fn own_shard(all: Vec<(String, Tensor)>, shard: Shard) -> Vec<(String, Tensor)> {
    let bytes: Vec<usize> = all.iter().map(|(_, t)| t.elem_count() * t.dtype().size_in_bytes()).collect();
    let owners = shard_of(&bytes, shard.world);
    all.into_iter().zip(owners).filter(|(_, o)| *o == shard.rank).map(|(t, _)| t).collect()
}

/// A rank's part record: the files it saved for a checkpoint.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct Part {
    gang: u64,
    files: Vec<FileEntry>,
}

/// Host copies of everything a checkpoint holds.
#[derive(Debug)]
pub struct Snapshot {
    /// `state.json`.
    pub state: TrainState,
    /// Weights.
    pub model: Vec<HostTensor>,
    /// Optimizer moments.
    pub optim: Vec<HostTensor>,
}

impl Snapshot {
    /// Copies `model` and `optim` to host memory now: the step loop can go on changing the originals.
    pub fn take(
        state: TrainState,
        model: Vec<(String, Tensor)>,
        optim: Vec<(String, Tensor)>,
    ) -> candle_core::Result<Self> {
        let host = |all: Vec<(String, Tensor)>| -> candle_core::Result<Vec<HostTensor>> {
            all.into_iter().map(|(n, t)| HostTensor::copy(n, &t)).collect()
        };
        Ok(Self { state, model: host(model)?, optim: host(optim)? })
    }

    /// Copies `model` and `optim` on a thread of its own while the caller goes on reading them;
    /// nothing may write them before [`Copying::fence`]. The snapshot (or the copy's error) arrives
    /// on the receiver.
    pub fn start(state: TrainState, model: Vec<(String, Tensor)>, optim: Vec<(String, Tensor)>) -> (Copying, Copied) {
        let (send, receive) = tokio::sync::oneshot::channel();
        let thread = std::thread::Builder::new()
            .name("checkpoint-copy".into())
            .spawn(move || {
                // The saver may have gone (the step loop failed meanwhile): nothing to hand over.
                let _ = send.send(Self::take(state, model, optim));
            })
            .expect("a thread for the checkpoint copy");
        (Copying { thread: Some(thread) }, receive)
    }
}

/// Where a snapshot copied by [`Snapshot::start`] arrives.
pub type Copied = tokio::sync::oneshot::Receiver<candle_core::Result<Snapshot>>;

/// A snapshot being copied from tensors the step loop still reads.
#[derive(Debug)]
pub struct Copying {
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Copying {
    /// Waits until the copy is done, so the tensors may change; returns the seconds waited.
    pub fn fence(&mut self) -> f64 {
        let Some(thread) = self.thread.take() else { return 0.0 };
        let waited = std::time::Instant::now();
        if let Err(panic) = thread.join() {
            std::panic::resume_unwind(panic);
        }
        waited.elapsed().as_secs_f64()
    }
}

impl Drop for Copying {
    /// The tensors outlive no copy of them: a step loop that ends early still waits.
    fn drop(&mut self) {
        let _ = self.thread.take().map(std::thread::JoinHandle::join);
    }
}

/// A safetensors file of `tensors` as chunks of bytes: its header, then each tensor's data, laid out
/// as the `safetensors` crate lays them out (by descending dtype alignment, then name), without
/// copying the data.
pub fn safetensors_chunks(tensors: &[HostTensor]) -> Result<Vec<Bytes>, String> {
    let mut order: Vec<&HostTensor> = tensors.iter().collect();
    order.sort_by(|a, b| b.dtype.cmp(&a.dtype).then_with(|| a.name.cmp(&b.name)));
    let mut offset = 0;
    let mut infos = Vec::with_capacity(order.len());
    for t in &order {
        let end = offset + t.data.len();
        infos
            .push((t.name.clone(), TensorInfo { dtype: t.dtype, shape: t.shape.clone(), data_offsets: (offset, end) }));
        offset = end;
    }
    let metadata = Metadata::new(None, infos).map_err(|e| e.to_string())?;
    let mut header = serde_json::to_vec(&metadata).map_err(|e| e.to_string())?;
    header.resize(header.len().next_multiple_of(8), b' ');
    let mut first = (header.len() as u64).to_le_bytes().to_vec();
    first.extend(header);
    Ok(std::iter::once(Bytes::from(first)).chain(order.iter().map(|t| t.data.clone())).collect())
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

/// Uploads a checkpoint, then the `latest` pointer, then deletes all but the newest `keep`. Returns
/// the entries of the checkpoint's files (paths relative to the stage directory).
pub async fn save(dir: &StageDir, snapshot: Snapshot, keep: u32) -> Result<Vec<FileEntry>, CheckpointError> {
    save_shard(dir, snapshot, Shard::WHOLE, keep, std::time::Duration::ZERO).await
}

/// Uploads `shard`'s part of a checkpoint (`snapshot` holds its tensors). Rank 0 then waits up to
/// `wait` for every other rank's part record, and writes `state.json`, the manifest, the pointer,
/// and deletes all but the newest `keep`; it returns the entries of every file of the checkpoint
/// (paths relative to the stage directory). Other ranks write their part record and return none.
pub async fn save_shard(
    dir: &StageDir,
    snapshot: Snapshot,
    shard: Shard,
    keep: u32,
    wait: std::time::Duration,
) -> Result<Vec<FileEntry>, CheckpointError> {
    let name = dir_name(snapshot.state.step);
    let local = |reason: String| CheckpointError::Local { name: name.clone(), reason };
    let mut files = Vec::new();
    for (kind, tensors) in [("model", &snapshot.model), ("optim", &snapshot.optim)] {
        let file = shard.file(kind);
        let chunks = safetensors_chunks(tensors).map_err(|e| local(format!("{file}: {e}")))?;
        files.push(dir.put_chunks(&format!("ckpt/{name}/{file}"), chunks).await?);
    }
    for entry in &mut files {
        entry.path = entry.path.rsplit('/').next().unwrap_or_default().to_string();
    }
    if shard.rank > 0 {
        let part = serde_json::to_vec(&Part { gang: shard.gang, files }).map_err(|e| local(e.to_string()))?;
        dir.put(&format!("ckpt/{name}/{}", shard.part(shard.rank)), Bytes::from(part)).await?;
        return Ok(Vec::new());
    }
    for rank in 1..shard.world {
        files.extend(wait_for_part(dir, &name, shard, rank, wait).await?);
    }
    let state = serde_json::to_vec_pretty(&snapshot.state).map_err(|e| local(e.to_string()))?;
    let mut state_entry = dir.put(&format!("ckpt/{name}/state.json"), Bytes::from(state)).await?;
    state_entry.path = "state.json".into();
    files.push(state_entry);
    let manifest = Manifest::new(snapshot.state.step, files.clone());
    let json = serde_json::to_vec_pretty(&manifest).expect("a manifest serialises");
    dir.put(&format!("ckpt/{name}/MANIFEST.json"), Bytes::from(json)).await?;
    dir.put("ckpt/latest", Bytes::from(name.clone())).await?;
    retain(dir, keep).await?;
    Ok(in_stage_dir(&name, files))
}

/// The files of `rank`'s part of checkpoint `name`, once its record of this gang is there (polled
/// every 100 ms, for at most `wait`).
async fn wait_for_part(
    dir: &StageDir,
    name: &str,
    shard: Shard,
    rank: usize,
    wait: std::time::Duration,
) -> Result<Vec<FileEntry>, CheckpointError> {
    let key = dir.key(&format!("ckpt/{name}/{}", shard.part(rank)))?;
    let deadline = std::time::Instant::now() + wait;
    loop {
        if let Some(bytes) = dir.store().get_opt(&key).await?
            && let Ok(part) = serde_json::from_slice::<Part>(&bytes)
            && part.gang == shard.gang
        {
            return Ok(part.files);
        }
        if std::time::Instant::now() >= deadline {
            return Err(CheckpointError::Local {
                name: name.to_string(),
                reason: format!(
                    "rank {rank} of {} did not save its shard within {:.0} s",
                    shard.world,
                    wait.as_secs_f64()
                ),
            });
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
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
    if !manifest.files.iter().any(|f| f.path == "state.json") {
        return Err(unusable("the manifest lists no state.json".into()));
    }
    for kind in ["model", "optim"] {
        if !manifest.files.iter().any(|f| is_file_of(&f.path, kind)) {
            return Err(unusable(format!("the manifest lists no {kind}.safetensors (nor shards of it)")));
        }
    }
    // Each file read into memory in parallel ranges and hashed as they arrive; nothing on local disk.
    let mut contents = HashMap::new();
    for f in &manifest.files {
        let key = dir.key(&format!("ckpt/{name}/{}", f.path))?;
        if dir.store().size(&key).await? != Some(f.size) {
            return Err(unusable(format!("{} is missing or not {} bytes", f.path, f.size)));
        }
        let (bytes, sha) = dir.store().read_hashed(&key, f.size).await?;
        if sha != f.sha256 {
            return Err(unusable(format!("{} has sha256 {sha}, the manifest says {}", f.path, f.sha256)));
        }
        contents.insert(f.path.as_str(), bytes);
    }
    let state: TrainState = match serde_json::from_slice(&contents["state.json"]) {
        Ok(s) => s,
        Err(e) => return Err(unusable(format!("state.json: {e}"))),
    };
    // Shards merge: each tensor is in exactly one of them.
    let read = |kind: &str| -> Result<HashMap<String, Tensor>, String> {
        let mut all = HashMap::new();
        for (file, bytes) in contents.iter().filter(|(f, _)| is_file_of(f, kind)) {
            for (name, t) in candle_core::safetensors::load_buffer(bytes, device).map_err(|e| format!("{file}: {e}"))? {
                if all.insert(name.clone(), t).is_some() {
                    return Err(format!("{file}: {name} is in two shards"));
                }
            }
        }
        Ok(all)
    };
    let (model, optim) = match (read("model"), read("optim")) {
        (Ok(m), Ok(o)) => (m, o),
        (Err(e), _) | (_, Err(e)) => return Err(unusable(e)),
    };
    drop(contents);
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

#[cfg(test)]
mod tests {
    use super::*;

    fn tensors() -> Vec<(String, Tensor)> {
        let f32s = Tensor::arange(0f32, 12.0, &Device::Cpu).unwrap().reshape((3, 4)).unwrap();
        let bf16s = Tensor::arange(0f32, 5.0, &Device::Cpu).unwrap().to_dtype(DType::BF16).unwrap();
        let u8s = Tensor::new(&[1u8, 2, 3], &Device::Cpu).unwrap();
        vec![("b.weight".into(), f32s.clone()), ("a.weight".into(), f32s), ("norm".into(), bf16s), ("ids".into(), u8s)]
    }

    #[test]
    fn chunks_are_the_bytes_the_safetensors_crate_writes() {
        let named = tensors();
        let host: Vec<HostTensor> = named.iter().map(|(n, t)| HostTensor::copy(n.clone(), t).unwrap()).collect();
        let ours: Vec<u8> = safetensors_chunks(&host).unwrap().concat();
        let theirs = safetensors::serialize(named.iter().map(|(n, t)| (n.as_str(), t)), None).unwrap();
        assert!(ours == theirs, "the layouts differ");
        let loaded = candle_core::safetensors::load_buffer(&ours, &Device::Cpu).unwrap();
        for (name, t) in &named {
            let back = &loaded[name];
            assert_eq!(back.dtype(), t.dtype());
            let same = back.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap()
                == t.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
            assert!(same, "{name} reads back different");
        }
    }

    #[test]
    fn a_copy_beside_the_loop_holds_the_values_at_its_start() {
        let weight = Tensor::arange(0f32, 1000.0, &Device::Cpu).unwrap();
        let moment = Tensor::ones(1000, DType::F32, &Device::Cpu).unwrap();
        let config = crate::model::LlamaConfig::from_spec(&pretrain_crd::spec::ModelPreset::Tiny.config(), 256);
        let state = TrainState { step: 7, ..TrainState::new(config) };
        let (mut copying, mut copied) =
            Snapshot::start(state, vec![("w".into(), weight.clone())], vec![("m".into(), moment)]);
        // Reading goes on beside the copy; writing waits for the fence.
        assert_eq!(weight.sum_all().unwrap().to_scalar::<f32>().unwrap(), 499_500.0);
        copying.fence();
        weight.inplace_op1(&Negate).unwrap();
        let snapshot = copied.try_recv().expect("the copy arrived").unwrap();
        assert_eq!(snapshot.state.step, 7);
        let w: &[f32] = bytemuck::cast_slice(&snapshot.model[0].data);
        assert_eq!(w[999], 999.0, "the snapshot holds the weights before the update");
        assert_eq!(weight.to_vec1::<f32>().unwrap()[999], -999.0);
        assert_eq!(snapshot.optim[0].shape, [1000]);
    }

    /// Negates in place (an update the copy must not see).
    struct Negate;

    impl candle_core::InplaceOp1 for Negate {
        fn name(&self) -> &'static str {
            "negate"
        }

        fn cpu_fwd(&self, storage: &mut candle_core::CpuStorage, _: &candle_core::Layout) -> candle_core::Result<()> {
            if let candle_core::CpuStorage::F32(v) = storage {
                v.iter_mut().for_each(|x| *x = -*x);
            }
            Ok(())
        }
    }
}
