//! The embedded executor: runs a manifest's stages on this machine as child `pretrain-worker <stage>`
//! processes following the stage contract. What runs next is the planner's decision (`crate::plan`,
//! shared with the operator): stages committed for the same config are skipped, sharded stages fan
//! their map tasks out over `--workers` processes, and a training stage that fails resumes from its
//! last checkpoint within `train.maxRestarts`. Stage phases, attempts and times go to a sled database
//! (`state`) that `pretrain status` reads.

pub mod report;
pub mod state;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use pretrain_crd::contract::{ENV_PROGRESS, PROGRESS_PREFIX, exit};
use pretrain_crd::{PretrainRun, Stage};
use pretrain_store::Store;
use tokio::io::{AsyncBufReadExt, BufReader};

use crate::plan::invocation::{Invocation, Place, Value, invocation};
use crate::plan::{self, Action, Layout, Observed};
use state::{RecordPhase, StageRecord, StateDb};

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
    /// A stage failed and is not retried (again).
    #[error("stage {stage} failed ({}): {reason}", exit_status(*code))]
    StageFailed {
        /// The stage.
        stage: Stage,
        /// Its exit code, `None` if killed by a signal.
        code: Option<i32>,
        /// Why it is not retried, and the last line it wrote to stderr.
        reason: String,
    },
    /// The run state database cannot be used.
    #[error("{0}")]
    State(String),
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
    /// Processes for the map tasks of sharded stages (1: each sharded stage in one process).
    pub workers: usize,
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
    let mut local = LocalRun::open(opts).await?;
    local.skip_committed().await?;
    let interrupt = Interrupt::install();
    // Live progress bars on a terminal; plain log lines otherwise.
    let bars = std::io::IsTerminal::is_terminal(&std::io::stdout()).then(indicatif::MultiProgress::new);
    let manifest = std::path::absolute(&opts.manifest).unwrap_or_else(|_| opts.manifest.clone());
    let (name, store_url) = (local.name.clone(), local.store_url.clone());
    let ctx = WorkerContext { worker: &opts.worker, manifest: &manifest, run: &name, store: &store_url, bars };
    loop {
        let (stage, attempt, layout) = match plan::next(&local.run.spec, &local.stages, &local.observed) {
            Action::Finished => {
                local.write_report().await;
                return Ok(local.outcomes);
            }
            Action::Failed { stage, reason } => {
                let code = local.db.get(&local.name, stage).and_then(|r| r.exit_code);
                return Err(RunError::StageFailed { stage, code, reason });
            }
            Action::Run { stage, attempt, layout } => (stage, attempt, layout),
        };
        if interrupt.requested() {
            return Err(RunError::Interrupted { stage });
        }
        local.started(stage, attempt)?;
        let result = run_stage(&ctx, stage, layout, opts.workers, &interrupt).await;
        local.ended(stage, attempt, result).await?;
    }
}

/// One `pretrain run`: the manifest, its store and state database, the stages selected, and what
/// the planner has seen of each.
struct LocalRun {
    run: PretrainRun,
    name: String,
    store: Store,
    store_url: String,
    db: StateDb,
    stages: Vec<Stage>,
    observed: BTreeMap<Stage, Observed>,
    outcomes: Vec<(Stage, StageOutcome)>,
}

impl LocalRun {
    /// Loads the manifest and opens its store; with `--from`, every earlier stage must have committed.
    async fn open(opts: &RunOptions) -> Result<Self, RunError> {
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
        let db = StateDb::open(&store_url).map_err(RunError::State)?;
        Ok(Self { run, name, store, store_url, db, stages, observed: BTreeMap::new(), outcomes: Vec::new() })
    }

    /// Skips the selected stages whose outputs are committed for this spec.
    async fn skip_committed(&mut self) -> Result<(), RunError> {
        for &stage in &self.stages {
            let hash = self.run.spec.stage_config_hash(stage);
            if self.store.stage(&self.name, stage)?.committed(&hash).await?.is_some() {
                println!("{stage}: outputs committed for this spec; skipped");
                self.observed.insert(stage, Observed::Committed);
                self.outcomes.push((stage, StageOutcome::Skipped));
                if self.db.get(&self.name, stage).is_none_or(|r| r.config_hash != hash) {
                    let record = StageRecord { phase: RecordPhase::Skipped, ..record(&hash) };
                    self.db.put(&self.name, stage, &record).map_err(RunError::State)?;
                }
            }
        }
        Ok(())
    }

    /// Records `stage`'s record, creating it for this spec when needed.
    fn update(&self, stage: Stage, change: impl FnOnce(&mut StageRecord)) -> Result<(), RunError> {
        let hash = self.run.spec.stage_config_hash(stage);
        self.db.update(&self.name, stage, || record(&hash), change).map_err(RunError::State)
    }

    /// Says and records that `attempt` of `stage` starts.
    fn started(&self, stage: Stage, attempt: u32) -> Result<(), RunError> {
        if attempt == 1 {
            println!("{stage}: starting");
        } else {
            println!(
                "{stage}: attempt {attempt} of {}{}",
                plan::attempts_allowed(&self.run.spec, stage),
                if stage.is_training() { ", resuming from the last checkpoint" } else { "" }
            );
        }
        let hash = self.run.spec.stage_config_hash(stage);
        self.update(stage, |r| {
            *r = StageRecord {
                phase: RecordPhase::Running,
                attempts: attempt,
                started: Some(state::now()),
                ..record(&hash)
            };
        })
    }

    /// Records how `attempt` of `stage` ended, for the planner's next choice.
    async fn ended(&mut self, stage: Stage, attempt: u32, result: Result<(), WorkerExit>) -> Result<(), RunError> {
        let finished = Some(state::now());
        match result {
            Ok(()) => {
                let hash = self.run.spec.stage_config_hash(stage);
                if self.store.stage(&self.name, stage)?.committed(&hash).await?.is_none() {
                    return Err(RunError::NotCommitted { stage });
                }
                self.update(stage, |r| {
                    r.phase = RecordPhase::Committed;
                    r.finished = finished;
                })?;
                println!("{stage}: committed");
                self.observed.insert(stage, Observed::Committed);
                self.outcomes.push((stage, StageOutcome::Completed));
            }
            Err(WorkerExit::Interrupted) => {
                self.update(stage, |r| {
                    r.phase = RecordPhase::Interrupted;
                    r.finished = finished;
                })?;
                return Err(RunError::Interrupted { stage });
            }
            Err(WorkerExit::Spawn(e)) => return Err(e),
            Err(WorkerExit::Failed { code, reason }) => {
                let permanent = code == Some(exit::INVALID);
                self.update(stage, |r| {
                    r.phase = RecordPhase::Failed;
                    r.finished = finished;
                    r.exit_code = code;
                    r.reason = Some(reason.clone());
                })?;
                if !permanent && attempt < plan::attempts_allowed(&self.run.spec, stage) {
                    eprintln!("{stage}: attempt {attempt} failed ({}): {reason}", exit_status(code));
                }
                self.observed.insert(stage, Observed::Failed { attempts: attempt, permanent, reason });
            }
        }
        Ok(())
    }

    /// The run's report, when a stage ran.
    async fn write_report(&self) {
        if self.outcomes.iter().any(|(_, o)| *o == StageOutcome::Completed) {
            match report::write(&self.store, &self.name).await {
                Ok(keys) => println!("report: {}", report_location(&self.store_url, &keys[0])),
                Err(e) => eprintln!("report: not written: {e}"),
            }
        }
    }
}

/// How a worker ended, for people: `exit code 69`, or `killed by a signal` when it has no code.
fn exit_status(code: Option<i32>) -> String {
    code.map_or_else(|| "killed by a signal".to_string(), |c| format!("exit code {c}"))
}

/// Where a report key can be opened: a local path for `file://` stores, else its URL.
pub fn report_location(store_url: &str, key: &str) -> String {
    match store_url.strip_prefix("file://") {
        Some(root) => Path::new(root).join(key).display().to_string(),
        None => format!("{}/{key}", store_url.trim_end_matches('/')),
    }
}

/// A fresh record for a stage of config `hash`.
fn record(hash: &str) -> StageRecord {
    StageRecord {
        phase: RecordPhase::Running,
        config_hash: hash.to_string(),
        attempts: 0,
        started: None,
        finished: None,
        exit_code: None,
        reason: None,
        runner_pid: Some(std::process::id()),
    }
}

/// `pretrain status`: every stage of `run` (or of every run with state) as the state database and the
/// store see it: phase, attempts, times, and for training stages the newest checkpoint.
pub async fn status(store_url: &str, run: Option<&str>) -> Result<String, RunError> {
    use std::fmt::Write as _;
    let db = StateDb::open(store_url).map_err(RunError::State)?;
    let store = Store::open(store_url)?;
    let runs = match run {
        Some(r) => vec![r.to_string()],
        None => db.runs(),
    };
    let mut out = String::new();
    if runs.is_empty() {
        let _ = writeln!(out, "no runs have state in {}", db.path().display());
    }
    for name in runs {
        let _ = writeln!(out, "run {name} (store {store_url})");
        let _ =
            writeln!(out, "  {:<13} {:<12} {:>8}  {:<24} {:>9}  note", "stage", "phase", "attempts", "started", "took");
        for stage in Stage::ALL {
            let Some(r) = db.get(&name, stage) else { continue };
            let alive = r.runner_pid.is_some_and(|pid| Path::new(&format!("/proc/{pid}")).exists());
            let phase = match r.phase {
                RecordPhase::Running if !alive => "stopped".to_string(),
                p => serde_json::to_value(p).ok().and_then(|v| v.as_str().map(str::to_string)).unwrap_or_default(),
            };
            let took = match (r.started, r.finished.or(alive.then(state::now))) {
                (Some(a), Some(b)) if b >= a => pretrain_crd::display::duration(b - a),
                _ => "-".into(),
            };
            let mut note = r.reason.clone().filter(|_| r.phase == RecordPhase::Failed).unwrap_or_default();
            if stage.is_training() {
                let dir = store.stage(&name, stage)?;
                if let Some(newest) = crate::checkpoints::newest(&dir).await? {
                    let loss = newest.state.and_then(|v| v["loss"].as_f64());
                    note = format!(
                        "{}checkpoint {}{}",
                        if note.is_empty() { String::new() } else { format!("{note}; ") },
                        newest.name,
                        loss.map(|l| format!(" (loss {l:.4})")).unwrap_or_default()
                    );
                }
            }
            let _ = writeln!(
                out,
                "  {:<13} {:<12} {:>8}  {:<24} {:>9}  {note}",
                stage.as_str(),
                phase,
                if r.attempts == 0 { "-".to_string() } else { r.attempts.to_string() },
                r.started.map(state::format_time).unwrap_or_else(|| "-".into()),
                took
            );
        }
    }
    Ok(out)
}

/// How a worker process (or a stage's processes) ended, when not with a commit.
#[derive(Debug)]
enum WorkerExit {
    /// Stopped on request after checkpointing (or before starting).
    Interrupted,
    /// Exited with `code` (`None`: killed by a signal), saying `reason` last.
    Failed { code: Option<i32>, reason: String },
    /// Could not be started.
    Spawn(RunError),
}

/// What every worker of the run is started with.
struct WorkerContext<'a> {
    worker: &'a Path,
    manifest: &'a Path,
    run: &'a str,
    store: &'a str,
    /// Where workers' progress is drawn, when stdout is a terminal.
    bars: Option<indicatif::MultiProgress>,
}

/// Runs one attempt of `stage` laid out as `layout`.
async fn run_stage(
    ctx: &WorkerContext<'_>,
    stage: Stage,
    layout: Layout,
    workers: usize,
    interrupt: &Interrupt,
) -> Result<(), WorkerExit> {
    match layout {
        Layout::Sharded { shards } if workers > 1 && shards > 1 => {
            // Map tasks over `workers` processes, each with its share of the cores, then the reduce.
            let threads = (std::thread::available_parallelism().map_or(1, |n| n.get()) / workers).max(1);
            let mut next = 0u32;
            let mut running = tokio::task::JoinSet::new();
            let mut failure = None;
            while next < shards || !running.is_empty() {
                while failure.is_none() && next < shards && running.len() < workers && !interrupt.requested() {
                    let task = Task { phase: "map", index: next, threads: Some(threads) };
                    let owned = OwnedContext::from(ctx);
                    let interrupt = interrupt.clone();
                    running.spawn(async move { run_worker(&owned.borrow(), stage, task, &interrupt).await });
                    next += 1;
                }
                match running.join_next().await {
                    Some(Ok(Ok(()))) => {}
                    Some(Ok(Err(e))) => failure = failure.or(Some(e)),
                    Some(Err(join)) => {
                        failure = failure.or(Some(WorkerExit::Failed { code: None, reason: join.to_string() }))
                    }
                    None => break,
                }
                if interrupt.requested() && failure.is_none() && running.is_empty() {
                    failure = Some(WorkerExit::Interrupted);
                }
            }
            if let Some(f) = failure {
                return Err(f);
            }
            run_worker(ctx, stage, Task { phase: "reduce", index: 0, threads: None }, interrupt).await
        }
        // Locally a gang runs as one process (data-parallel ranks on one machine are one process).
        _ => run_worker(ctx, stage, Task { phase: "all", index: 0, threads: None }, interrupt).await,
    }
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

/// Ctrl-C for the whole run: remembered, and forwarded as SIGTERM to the running workers.
#[derive(Debug, Clone, Default)]
struct Interrupt {
    requested: Arc<AtomicBool>,
    children: Arc<Mutex<Vec<u32>>>,
}

impl Interrupt {
    fn install() -> Self {
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

    fn requested(&self) -> bool {
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
