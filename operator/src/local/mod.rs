//! The embedded executor: runs a manifest's stages in order on this machine, each as a child
//! `pretrain-worker <stage>` process following the stage contract, skipping stages whose outputs are
//! already committed for the same config.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use pretrain_crd::contract::{
    ENV_JOB_COMPLETION_INDEX, ENV_MASTER_ADDR, ENV_MASTER_PORT, ENV_RANK, ENV_RUN, ENV_STORE, ENV_WORLD_SIZE, exit,
};
use pretrain_crd::{PretrainRun, Stage};
use pretrain_store::Store;
use tokio::io::{AsyncBufReadExt, BufReader};

/// Why a local run stopped.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The manifest is unreadable or invalid.
    #[error(transparent)]
    Manifest(#[from] pretrain_crd::ManifestError),
    /// The store cannot be used.
    #[error(transparent)]
    Store(#[from] pretrain_store::Error),
    /// The store URL cannot serve separate stage processes.
    #[error("store {url:?}: {reason}")]
    StoreUnusable {
        /// The URL.
        url: String,
        /// Why not.
        reason: String,
    },
    /// `--from` or `--until` names a stage the run does not have, or they are out of order.
    #[error("{0}")]
    StageRange(String),
    /// The worker binary could not be started.
    #[error("cannot start {worker}: {source}")]
    Spawn {
        /// Path of the worker binary.
        worker: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// A stage failed.
    #[error("stage {stage} failed (exit code {code:?}): {reason}")]
    StageFailed {
        /// The stage.
        stage: Stage,
        /// Its exit code, `None` if killed by a signal.
        code: Option<i32>,
        /// The last line it wrote to stderr.
        reason: String,
    },
    /// The worker does not implement a stage yet.
    #[error("stage {stage} cannot run: {reason}")]
    Unavailable {
        /// The stage.
        stage: Stage,
        /// The worker's explanation.
        reason: String,
    },
    /// Interrupted (Ctrl-C) at or before a stage; a running stage was asked to checkpoint first.
    #[error("interrupted at stage {stage}; run the same command again to resume")]
    Interrupted {
        /// The stage.
        stage: Stage,
    },
    /// The worker exited 0 but left no matching commit.
    #[error("stage {stage} exited successfully but committed no outputs for this spec")]
    NotCommitted {
        /// The stage.
        stage: Stage,
    },
}

/// What to run.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// The manifest file.
    pub manifest: PathBuf,
    /// Store URL overriding `spec.storage.url`.
    pub store: Option<String>,
    /// First stage to run; the stages before it must be committed already for this spec.
    pub from: Option<Stage>,
    /// Last stage to run.
    pub until: Option<Stage>,
    /// The `pretrain-worker` binary.
    pub worker: PathBuf,
}

/// What happened to each stage.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StageOutcome {
    /// Committed outputs for this config existed; not run.
    Skipped,
    /// Ran and committed.
    Completed,
}

/// Runs the manifest's stages in order and returns what happened to each.
pub async fn run(opts: &RunOptions) -> Result<Vec<(Stage, StageOutcome)>, RunError> {
    let run = pretrain_crd::load(&opts.manifest)?;
    let store_url = opts.store.clone().unwrap_or_else(|| run.spec.storage.url.clone());
    if store_url.starts_with("memory://") {
        return Err(RunError::StoreUnusable {
            url: store_url,
            reason: "memory:// lives inside one process and stages run as separate processes; use file://".into(),
        });
    }
    let store = Store::open(&store_url)?;
    let stages = selected_stages(&run, opts.from, opts.until)?;
    let manifest = std::path::absolute(&opts.manifest).unwrap_or_else(|_| opts.manifest.clone());
    let name = run.metadata.name.clone().unwrap_or_default();
    if let Some(&first) = stages.first() {
        for earlier in run.spec.stages().into_iter().take_while(|s| *s != first) {
            let hash = run.spec.stage_config_hash(earlier);
            if store.stage(&name, earlier)?.committed(&hash).await?.is_none() {
                return Err(RunError::StageRange(format!(
                    "--from {first}: stage {earlier} has no committed outputs for this spec; run it first"
                )));
            }
        }
    }
    let interrupt = Interrupt::install();
    let mut outcomes = Vec::new();
    for stage in stages {
        if interrupt.requested() {
            return Err(RunError::Interrupted { stage });
        }
        let hash = run.spec.stage_config_hash(stage);
        let dir = store.stage(&name, stage)?;
        if dir.committed(&hash).await?.is_some() {
            println!("{stage}: outputs committed for this spec; skipped");
            outcomes.push((stage, StageOutcome::Skipped));
            continue;
        }
        println!("{stage}: starting");
        run_worker(&opts.worker, stage, &manifest, &name, &store_url, &interrupt).await?;
        if dir.committed(&hash).await?.is_none() {
            return Err(RunError::NotCommitted { stage });
        }
        println!("{stage}: committed");
        outcomes.push((stage, StageOutcome::Completed));
    }
    Ok(outcomes)
}

/// The run's stages between `from` and `until`, inclusive.
pub fn selected_stages(run: &PretrainRun, from: Option<Stage>, until: Option<Stage>) -> Result<Vec<Stage>, RunError> {
    let stages = run.spec.stages();
    let index = |s: Stage, flag: &str| {
        stages.iter().position(|x| *x == s).ok_or_else(|| {
            RunError::StageRange(format!("{flag} {s}: the run has no {s} stage (it runs {})", list(&stages)))
        })
    };
    let first = from.map(|s| index(s, "--from")).transpose()?.unwrap_or(0);
    let last = until.map(|s| index(s, "--until")).transpose()?.unwrap_or(stages.len() - 1);
    if first > last {
        return Err(RunError::StageRange(format!("--from {} comes after --until {}", stages[first], stages[last])));
    }
    Ok(stages[first..=last].to_vec())
}

fn list(stages: &[Stage]) -> String {
    stages.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(", ")
}

/// Ctrl-C for the whole run: remembered, and forwarded as SIGTERM to the running worker.
#[derive(Debug, Clone, Default)]
struct Interrupt {
    requested: Arc<AtomicBool>,
    child: Arc<Mutex<Option<u32>>>,
}

impl Interrupt {
    fn install() -> Self {
        let interrupt = Self::default();
        let listener = interrupt.clone();
        tokio::spawn(async move {
            while tokio::signal::ctrl_c().await.is_ok() {
                listener.requested.store(true, Ordering::SeqCst);
                if let Some(pid) = *listener.child.lock().expect("child slot") {
                    terminate(pid);
                }
            }
        });
        interrupt
    }

    fn requested(&self) -> bool {
        self.requested.load(Ordering::SeqCst)
    }

    fn set_child(&self, pid: Option<u32>) {
        *self.child.lock().expect("child slot") = pid;
    }
}

/// Runs one worker process, echoing its stderr; the last meaningful stderr line is the reason given
/// when it fails.
async fn run_worker(
    worker: &Path,
    stage: Stage,
    manifest: &Path,
    run: &str,
    store: &str,
    interrupt: &Interrupt,
) -> Result<(), RunError> {
    let mut child = tokio::process::Command::new(worker)
        .arg(stage.as_str())
        .arg("--spec")
        .arg(manifest)
        .env(ENV_RUN, run)
        .env(ENV_STORE, store)
        .env(ENV_RANK, "0")
        .env(ENV_WORLD_SIZE, "1")
        .env(ENV_MASTER_ADDR, "127.0.0.1")
        .env(ENV_MASTER_PORT, "29500")
        .env(ENV_JOB_COMPLETION_INDEX, "0")
        .stdin(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|source| RunError::Spawn { worker: worker.to_path_buf(), source })?;
    interrupt.set_child(child.id());

    let stderr = child.stderr.take().expect("stderr is piped");
    let echo = tokio::spawn(async move {
        let mut last = String::new();
        let mut reader = BufReader::new(stderr);
        let mut raw = Vec::new();
        // Bytes, not strings: a non-UTF-8 line must not stop the draining (the worker would get EPIPE).
        while matches!(reader.read_until(b'\n', &mut raw).await, Ok(n) if n > 0) {
            let line = String::from_utf8_lossy(&raw).trim_end().to_string();
            raw.clear();
            eprintln!("{line}");
            if !line.trim().is_empty() && !line.starts_with("note: run with `RUST_BACKTRACE") {
                last = line;
            }
        }
        last
    });

    let status = child.wait().await.map_err(|source| RunError::Spawn { worker: worker.to_path_buf(), source });
    interrupt.set_child(None);
    let status = status?;
    let reason = echo.await.unwrap_or_default();
    match status.code() {
        Some(exit::DONE) => Ok(()),
        Some(exit::RESUME) => Err(RunError::Interrupted { stage }),
        _ if interrupt.requested() => Err(RunError::Interrupted { stage }),
        Some(exit::UNAVAILABLE) => Err(RunError::Unavailable { stage, reason }),
        code => Err(RunError::StageFailed { stage, code, reason }),
    }
}

/// Asks a worker to checkpoint and exit (the stage contract's SIGTERM).
fn terminate(pid: u32) {
    use nix::sys::signal::{Signal, kill};
    use nix::unistd::Pid;
    if let Ok(pid) = i32::try_from(pid) {
        // The worker may already be gone; there is nothing left to stop then.
        let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
    }
}

/// The `pretrain-worker` next to this executable, else the one on `PATH`.
pub fn default_worker() -> PathBuf {
    let name = format!("pretrain-worker{}", std::env::consts::EXE_SUFFIX);
    std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|dir| dir.join(&name)))
        .filter(|p| p.is_file())
        .unwrap_or_else(|| PathBuf::from(name))
}
