//! The worker processes of a local run: `pretrain-worker <stage>` children with the stage contract's
//! arguments and environment, their map tasks fanned out over `--workers`, their progress drawn,
//! and Ctrl-C forwarded to them as SIGTERM.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use pretrain_crd::Stage;
use pretrain_crd::contract::{ENV_PROGRESS, PROGRESS_PREFIX, exit};
use tokio::io::{AsyncBufReadExt, BufReader};

use super::RunError;
use crate::plan::Layout;
use crate::plan::invocation::{Invocation, Place, Value, invocation};

/// How a worker process (or a stage's processes) ended, when not with a commit.
#[derive(Debug)]
pub(super) enum WorkerExit {
    /// Stopped on request after checkpointing (or before starting).
    Interrupted,
    /// Exited with `code` (`None`: killed by a signal), saying `reason` last.
    Failed { code: Option<i32>, reason: String },
    /// Could not be started.
    Spawn(RunError),
}

/// What every worker of the run is started with.
pub(super) struct WorkerContext<'a> {
    /// The `pretrain-worker` binary.
    pub(super) worker: &'a Path,
    /// The manifest, by absolute path.
    pub(super) manifest: &'a Path,
    /// The run's name.
    pub(super) run: &'a str,
    /// The store's URL.
    pub(super) store: &'a str,
    /// Where workers' progress is drawn, when stdout is a terminal.
    pub(super) bars: Option<indicatif::MultiProgress>,
}

/// Runs one attempt of `stage` laid out as `layout`.
pub(super) async fn run_stage(
    ctx: &WorkerContext<'_>,
    stage: Stage,
    layout: Layout,
    workers: usize,
    interrupt: &Interrupt,
) -> Result<(), WorkerExit> {
    match layout {
        Layout::Sharded { shards, after_map } if workers > 1 && shards > 1 => {
            // Each phase's tasks over `workers` processes, each with its share of the cores, then
            // the reduce.
            run_tasks(ctx, stage, "map", shards, workers, interrupt).await?;
            if let Some(t) = after_map {
                run_tasks(ctx, stage, "dedup", t.dedup, workers, interrupt).await?;
                run_tasks(ctx, stage, "cluster", 1, workers, interrupt).await?;
                if let Some(order) = t.order {
                    run_tasks(ctx, stage, "embed", t.route, workers, interrupt).await?;
                    run_tasks(ctx, stage, "order", order, workers, interrupt).await?;
                }
                run_tasks(ctx, stage, "route", t.route, workers, interrupt).await?;
                run_tasks(ctx, stage, "write", t.write, workers, interrupt).await?;
            }
            run_worker(ctx, stage, Task { phase: "reduce", index: 0, threads: None }, interrupt).await
        }
        // Locally a gang runs as one process (data-parallel ranks on one machine are one process).
        _ => run_worker(ctx, stage, Task { phase: "all", index: 0, threads: None }, interrupt).await,
    }
}

/// Runs tasks 0..`tasks` of `phase` over at most `workers` processes at once; the first failure
/// stops new tasks from starting and is returned once the running ones end.
async fn run_tasks(
    ctx: &WorkerContext<'_>,
    stage: Stage,
    phase: &'static str,
    tasks: u32,
    workers: usize,
    interrupt: &Interrupt,
) -> Result<(), WorkerExit> {
    let threads = (std::thread::available_parallelism().map_or(1, |n| n.get()) / workers).max(1);
    let mut next = 0u32;
    let mut running = tokio::task::JoinSet::new();
    let mut failure = None;
    while next < tasks || !running.is_empty() {
        while failure.is_none() && next < tasks && running.len() < workers && !interrupt.requested() {
            let task = Task { phase, index: next, threads: Some(threads) };
            let owned = OwnedContext::from(ctx);
            let interrupt = interrupt.clone();
            running.spawn(async move { run_worker(&owned.borrow(), stage, task, &interrupt).await });
            next += 1;
        }
        match running.join_next().await {
            Some(Ok(Ok(()))) => {}
            Some(Ok(Err(e))) => failure = failure.or(Some(e)),
            Some(Err(join)) => failure = failure.or(Some(WorkerExit::Failed { code: None, reason: join.to_string() })),
            None => break,
        }
        if interrupt.requested() && failure.is_none() && running.is_empty() {
            failure = Some(WorkerExit::Interrupted);
        }
    }
    failure.map_or(Ok(()), Err)
}

/// One process of a stage.
#[derive(Debug, Clone, Copy)]
struct Task {
    phase: &'static str,
    index: u32,
    /// Threads it may use (`RAYON_NUM_THREADS`), when sharing the machine with other tasks.
    threads: Option<usize>,
}

/// A `WorkerContext` that can move into a task.
struct OwnedContext {
    worker: PathBuf,
    manifest: PathBuf,
    run: String,
    store: String,
    bars: Option<indicatif::MultiProgress>,
}

impl OwnedContext {
    fn from(ctx: &WorkerContext<'_>) -> Self {
        Self {
            worker: ctx.worker.to_path_buf(),
            manifest: ctx.manifest.to_path_buf(),
            run: ctx.run.to_string(),
            store: ctx.store.to_string(),
            bars: ctx.bars.clone(),
        }
    }

    fn borrow(&self) -> WorkerContext<'_> {
        WorkerContext {
            worker: &self.worker,
            manifest: &self.manifest,
            run: &self.run,
            store: &self.store,
            bars: self.bars.clone(),
        }
    }
}

/// Ctrl-C for the whole run: remembered, and forwarded as SIGTERM to the running workers.
#[derive(Debug, Clone, Default)]
pub(super) struct Interrupt {
    requested: Arc<AtomicBool>,
    children: Arc<Mutex<Vec<u32>>>,
}

impl Interrupt {
    pub(super) fn install() -> Self {
        let interrupt = Self::default();
        let listener = interrupt.clone();
        tokio::spawn(async move {
            while tokio::signal::ctrl_c().await.is_ok() {
                listener.requested.store(true, Ordering::SeqCst);
                for &pid in listener.children.lock().expect("child list").iter() {
                    terminate(pid);
                }
            }
        });
        interrupt
    }

    pub(super) fn requested(&self) -> bool {
        self.requested.load(Ordering::SeqCst)
    }

    fn add_child(&self, pid: Option<u32>) {
        self.children.lock().expect("child list").extend(pid);
    }

    fn remove_child(&self, pid: Option<u32>) {
        self.children.lock().expect("child list").retain(|p| Some(*p) != pid);
    }
}

/// Runs one worker process, echoing its stderr; the last meaningful stderr line is the reason given
/// when it fails. The worker gets SIGTERM when this process dies, so that it checkpoints rather than
/// runs on orphaned.
async fn run_worker(
    ctx: &WorkerContext<'_>,
    stage: Stage,
    task: Task,
    interrupt: &Interrupt,
) -> Result<(), WorkerExit> {
    if interrupt.requested() {
        return Err(WorkerExit::Interrupted);
    }
    let spec = ctx.manifest.to_string_lossy();
    let place = Place::Local { index: task.index };
    let Invocation { args, env } = invocation(stage, &spec, Some(task.phase), (ctx.run, ctx.store), place);
    let mut command = tokio::process::Command::new(ctx.worker);
    command.args(args);
    for (name, value) in env {
        match value {
            Value::Text(text) => command.env(name, text),
            Value::CompletionIndex => command.env(name, task.index.to_string()),
        };
    }
    command.stdin(Stdio::null()).stderr(Stdio::piped()).kill_on_drop(true);
    if let Some(n) = task.threads {
        command.env("RAYON_NUM_THREADS", n.to_string());
    }
    if ctx.bars.is_some() {
        command.env(ENV_PROGRESS, "json").stdout(Stdio::piped());
    }
    terminate_with_parent(&mut command);
    let mut child = command
        .spawn()
        .map_err(|source| WorkerExit::Spawn(RunError::Spawn { worker: ctx.worker.to_path_buf(), source }))?;
    let pid = child.id();
    interrupt.add_child(pid);

    let bars = ctx.bars.clone();
    let draw =
        child.stdout.take().map(|stdout| tokio::spawn(draw_progress(stdout, bars.clone().expect("piped for bars"))));
    let stderr = child.stderr.take().expect("stderr is piped");
    let echo = tokio::spawn(async move {
        let mut last = String::new();
        let mut reader = BufReader::new(stderr);
        let mut raw = Vec::new();
        // Bytes, not strings: a non-UTF-8 line must not stop the draining (the worker would get EPIPE).
        while matches!(reader.read_until(b'\n', &mut raw).await, Ok(n) if n > 0) {
            let line = String::from_utf8_lossy(&raw).trim_end().to_string();
            raw.clear();
            match &bars {
                Some(bars) => bars.suspend(|| eprintln!("{line}")),
                None => eprintln!("{line}"),
            }
            if !line.trim().is_empty() && !line.starts_with("note: run with `RUST_BACKTRACE") {
                last = line;
            }
        }
        last
    });

    let status = child.wait().await;
    interrupt.remove_child(pid);
    let status =
        status.map_err(|source| WorkerExit::Spawn(RunError::Spawn { worker: ctx.worker.to_path_buf(), source }))?;
    let reason = echo.await.unwrap_or_default();
    if let Some(draw) = draw {
        let _ = draw.await;
    }
    match status.code() {
        Some(exit::DONE) => Ok(()),
        Some(exit::RESUME) => Err(WorkerExit::Interrupted),
        _ if interrupt.requested() => Err(WorkerExit::Interrupted),
        code => Err(WorkerExit::Failed { code, reason }),
    }
}

/// Draws a worker's `@progress` lines as bars (one per label) and prints its other lines above them.
async fn draw_progress(stdout: tokio::process::ChildStdout, bars: indicatif::MultiProgress) {
    use indicatif::{ProgressBar, ProgressStyle};
    let mut drawn: BTreeMap<String, ProgressBar> = BTreeMap::new();
    let mut reader = BufReader::new(stdout);
    let mut raw = Vec::new();
    while matches!(reader.read_until(b'\n', &mut raw).await, Ok(n) if n > 0) {
        let line = String::from_utf8_lossy(&raw).trim_end().to_string();
        raw.clear();
        let event = line
            .strip_prefix(PROGRESS_PREFIX)
            .and_then(|json| serde_json::from_str::<pretrain_crd::contract::ProgressEvent>(json).ok());
        let Some(event) = event else {
            let _ = bars.println(&line);
            continue;
        };
        let bar = drawn.entry(event.label.clone()).or_insert_with(|| {
            let bar = match event.total {
                Some(total) => ProgressBar::new(total).with_style(
                    ProgressStyle::with_template(
                        "{prefix:>18} {bar:28.cyan/blue} {pos}/{len} {msg} [{elapsed_precise}]",
                    )
                    .expect("template parses")
                    .progress_chars("=> "),
                ),
                None => ProgressBar::new_spinner().with_style(
                    ProgressStyle::with_template("{prefix:>18} {spinner} {pos} {msg} ({per_sec}) [{elapsed_precise}]")
                        .expect("template parses"),
                ),
            };
            let bar = bars.add(bar.with_prefix(event.label.clone()));
            bar.enable_steady_tick(std::time::Duration::from_millis(200));
            bar
        });
        bar.set_position(event.done);
        bar.set_message(format!("{} {}", event.unit, event.message).trim().to_string());
    }
    for bar in drawn.into_values() {
        bar.finish();
    }
}

/// Has the kernel send the child SIGTERM when this process exits (Linux), so a killed runner leaves
/// no orphaned worker: training checkpoints and exits, and the next `pretrain run` resumes it.
#[allow(unsafe_code)]
fn terminate_with_parent(command: &mut tokio::process::Command) {
    #[cfg(target_os = "linux")]
    // SAFETY: the closure runs in the child between fork and exec and only calls prctl(2), which is
    // async-signal-safe; it allocates nothing and touches no locks.
    unsafe {
        command.pre_exec(|| {
            nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGTERM).map_err(std::io::Error::from)
        });
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
