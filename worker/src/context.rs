//! What a stage process knows about itself: the validated spec, its stage directory, and its place
//! in the gang, all from the command line and the environment of the stage contract.

use std::path::Path;

use pretrain_crd::contract::{
    ENV_JOB_COMPLETION_INDEX, ENV_MASTER_ADDR, ENV_MASTER_PORT, ENV_RANK, ENV_RUN, ENV_STORE, ENV_WORLD_SIZE,
};
use pretrain_crd::{ManifestError, PretrainRun, Stage};
use pretrain_store::{StageDir, Store};

/// Why a stage process cannot start.
#[derive(Debug, thiserror::Error)]
pub enum ContextError {
    /// The spec is unreadable or invalid.
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    /// The spec (or another named input) could not be fetched.
    #[error("{url}: {source}")]
    SpecFetch {
        /// Where the spec was looked for.
        url: String,
        /// The store error.
        source: pretrain_store::Error,
    },
    /// An environment variable of the stage contract is malformed or contradicts the spec.
    #[error("environment variable {name}={value:?}: {reason}")]
    Env {
        /// Variable name.
        name: &'static str,
        /// Its value.
        value: String,
        /// What is wrong.
        reason: String,
    },
    /// A local file named as an input could not be read.
    #[error("{path}: {source}")]
    File {
        /// The file.
        path: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// The store cannot be opened.
    #[error(transparent)]
    Store(#[from] pretrain_store::Error),
}

/// A stage process's view of the run.
#[derive(Debug, Clone)]
pub struct Context {
    /// The validated run.
    pub run: PretrainRun,
    /// The stage this process works on.
    pub stage: Stage,
    /// The stage's output directory.
    pub dir: StageDir,
    /// Rank in the gang (0 for single-process stages).
    pub rank: u32,
    /// Processes in the gang.
    pub world_size: u32,
    /// Rendezvous address of rank 0, `host:port`.
    pub master: String,
    /// Shard index of this pod for sharded stages (defaults to the rank).
    pub shard_index: u32,
}

/// Test-only: `1` makes the stages compute on the CPU even when `gpusPerNode` is above 0. The test
/// kubelet sets it in the pods of its fake GPU nodes, whose pods request `nvidia.com/gpu` from the
/// real scheduler but have no card (`docs/testing.md`); nothing else should set it.
pub const ENV_TEST_CPU_FOR_GPUS: &str = "PRETRAIN_TEST_CPU_FOR_GPUS";

impl Context {
    /// The run's name.
    pub fn run_name(&self) -> &str {
        self.run.metadata.name.as_deref().unwrap_or_default()
    }

    /// The device model stages compute on: the CPU when `train.resources.gpusPerNode` is 0, else the
    /// CUDA device of `LOCAL_RANK` (0 by default).
    pub fn device(&self) -> Result<candle_core::Device, crate::frame::DeviceError> {
        use crate::frame::DeviceError;
        let gpus = self.run.spec.train.resources.gpus_per_node;
        if gpus == 0 || std::env::var(ENV_TEST_CPU_FOR_GPUS).is_ok_and(|v| v == "1") {
            return Ok(candle_core::Device::Cpu);
        }
        if !cfg!(feature = "cuda") {
            return Err(DeviceError::NotBuilt { gpus });
        }
        let local = std::env::var("LOCAL_RANK").ok().and_then(|v| v.parse().ok()).unwrap_or(0);
        crate::model::cuda_device(local).map_err(|e| DeviceError::Init { gpus, local, reason: e.to_string() })
    }

    /// The config hash the stage's commit must carry.
    pub fn config_hash(&self) -> String {
        self.run.spec.stage_config_hash(self.stage)
    }

    /// Builds the context from `--spec` (a file path or a store URL) and the process environment.
    pub async fn from_env(stage: Stage, spec: &str) -> Result<Self, ContextError> {
        let run = read_spec(spec).await?;
        let env = |name: &'static str| std::env::var(name).ok().filter(|v| !v.is_empty());
        let name = run.metadata.name.clone().unwrap_or_default();
        if let Some(value) = env(ENV_RUN)
            && value != name
        {
            return Err(ContextError::Env {
                name: ENV_RUN,
                value,
                reason: format!("the spec's metadata.name is {name:?}"),
            });
        }
        let store_url = env(ENV_STORE).unwrap_or_else(|| run.spec.storage.url.clone());
        let store = Store::open(&store_url)?;
        let number = |name: &'static str, default: u32| -> Result<u32, ContextError> {
            match env(name) {
                None => Ok(default),
                Some(value) => value.parse().map_err(|_| ContextError::Env {
                    name,
                    reason: "must be a non-negative integer".into(),
                    value,
                }),
            }
        };
        let rank = number(ENV_RANK, 0)?;
        let world_size = number(ENV_WORLD_SIZE, 1)?;
        if world_size == 0 || rank >= world_size {
            return Err(ContextError::Env {
                name: ENV_RANK,
                value: rank.to_string(),
                reason: format!("must be below {ENV_WORLD_SIZE} ({world_size})"),
            });
        }
        let shard_index = number(ENV_JOB_COMPLETION_INDEX, rank)?;
        let master = format!(
            "{}:{}",
            env(ENV_MASTER_ADDR).unwrap_or_else(|| "127.0.0.1".into()),
            number(ENV_MASTER_PORT, 29500)?
        );
        let dir = store.stage(&name, stage)?;
        Ok(Self { run, stage, dir, rank, world_size, master, shard_index })
    }
}

/// Reads a manifest from a local file or from an object-store URL (`s3://bucket/runs/run.yaml`).
pub async fn read_spec(spec: &str) -> Result<PretrainRun, ContextError> {
    if !spec.contains("://") || spec.starts_with("file://") {
        let path = spec.strip_prefix("file://").unwrap_or(spec);
        return Ok(pretrain_crd::load(Path::new(path))?);
    }
    let bytes = read_url(spec).await?;
    let text = String::from_utf8_lossy(&bytes);
    Ok(pretrain_crd::parse(&text, spec)?)
}

/// Reads a whole object named by a URL: a local path, `file://`, or any store URL.
pub async fn read_url(url: &str) -> Result<bytes::Bytes, ContextError> {
    if let Some(path) = local_path(url) {
        return tokio::fs::read(path)
            .await
            .map(bytes::Bytes::from)
            .map_err(|source| ContextError::File { path: path.into(), source });
    }
    let (store, key) = remote(url)?;
    store.get(&key).await.map_err(|source| ContextError::SpecFetch { url: url.into(), source })
}

/// Like [`read_url`], but `None` when there is no such file or object (an optional file beside the
/// ones a spec names).
pub async fn read_url_opt(url: &str) -> Result<Option<bytes::Bytes>, ContextError> {
    if let Some(path) = local_path(url) {
        return match tokio::fs::read(path).await {
            Ok(bytes) => Ok(Some(bytes.into())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(ContextError::File { path: path.into(), source }),
        };
    }
    let (store, key) = remote(url)?;
    store.get_opt(&key).await.map_err(|source| ContextError::SpecFetch { url: url.into(), source })
}

/// The store and key of a store URL.
fn remote(url: &str) -> Result<(Store, object_store::path::Path), ContextError> {
    let fetch_error = |source| ContextError::SpecFetch { url: url.into(), source };
    let (dir, name) = url
        .rsplit_once('/')
        .ok_or_else(|| fetch_error(pretrain_store::Error::Url { url: url.into(), reason: "names no object".into() }))?;
    let store = Store::open(dir).map_err(fetch_error)?;
    Ok((store, pretrain_store::key(name).map_err(fetch_error)?))
}

/// The path of a local URL (a path or `file://`).
fn local_path(url: &str) -> Option<&str> {
    (!url.contains("://") || url.starts_with("file://")).then(|| url.strip_prefix("file://").unwrap_or(url))
}
