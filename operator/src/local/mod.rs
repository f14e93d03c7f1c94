//! The embedded executor: runs a manifest's stages on this machine as child `pretrain-worker <stage>`
//! processes following the stage contract. What runs next is the planner's decision (`crate::plan`,
//! shared with the operator): stages committed for the same config are skipped, sharded stages fan
//! their map tasks out over `--workers` processes, and a training stage that fails resumes from its
//! last checkpoint within `train.maxRestarts`. Stage phases, attempts and times go to a sled database
//! (`state`) that `pretrain status` reads.

pub mod queue;
pub mod report;
pub mod state;
pub mod ui;
mod worker;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use pretrain_crd::contract::exit;
use pretrain_crd::status::Goodput;
use pretrain_crd::{PretrainRun, Stage};
use pretrain_store::Store;

use crate::plan::goodput::{self, Ended};
use crate::plan::{self, Action, Observed};
use state::{RecordPhase, StageRecord, StateDb};
pub use worker::default_worker;
use worker::{Interrupt, WorkerContext, WorkerExit, run_stage};

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
    /// Serve the dashboard at this address (`HOST:PORT`) while the run runs, and after it ends
    /// until Ctrl-C.
    pub ui: Option<String>,
}

/// What happened to each stage.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StageOutcome {
    /// Committed outputs for this config existed; not run.
    Skipped,
    /// Ran and committed.
    Completed,
}

/// Runs the manifest's stages in order and returns what happened to each. With `opts.ui`, serves the
/// dashboard meanwhile, and afterwards (the run state let go to the next runner in the queue) until
/// Ctrl-C.
pub async fn run(opts: &RunOptions) -> Result<Vec<(Stage, StageOutcome)>, RunError> {
    let local = LocalRun::open(opts).await?;
    let Some(addr) = &opts.ui else { return local.drive(opts).await };
    let runs = Arc::new(ui::LocalRuns::new(
        local.store.clone(),
        &local.store_url,
        local.db.clone(),
        &local.name,
        local.stages.clone(),
    ));
    let at = ui::start(addr, Arc::clone(&runs))
        .await
        .map_err(|e| RunError::State(format!("--ui {addr}: cannot listen there: {e}")))?;
    let name = local.name.clone();
    println!("dashboard: http://{at}/runs/{}/{name}", crate::dashboard::LOCAL);
    let result = local.drive(opts).await;
    runs.release();
    // Ctrl-C during the run stopped it and the dashboard with it.
    if !matches!(result, Err(RunError::Interrupted { .. })) {
        println!("dashboard: the run has ended; it stays at http://{at}/ until Ctrl-C");
        let _ = tokio::signal::ctrl_c().await;
    }
    result
}

impl LocalRun {
    /// Runs the selected stages until the planner says the run finished or failed.
    async fn drive(mut self, opts: &RunOptions) -> Result<Vec<(Stage, StageOutcome)>, RunError> {
        self.skip_committed().await?;
        let interrupt = Interrupt::install();
        // Live progress bars on a terminal; plain log lines otherwise.
        let bars = std::io::IsTerminal::is_terminal(&std::io::stdout()).then(indicatif::MultiProgress::new);
        let manifest = std::path::absolute(&opts.manifest).unwrap_or_else(|_| opts.manifest.clone());
        let (name, store_url) = (self.name.clone(), self.store_url.clone());
        let ctx = WorkerContext { worker: &opts.worker, manifest: &manifest, run: &name, store: &store_url, bars };
        loop {
            let (stage, attempt, layout) = match plan::next(&self.run.spec, &self.stages, &self.observed) {
                Action::Finished => {
                    self.write_report().await;
                    return Ok(self.outcomes);
                }
                Action::Failed { stage, reason } => {
                    let code = self.db.get(&self.name, stage).and_then(|r| r.exit_code);
                    return Err(RunError::StageFailed { stage, code, reason });
                }
                Action::Run { stage, attempt, layout } => (stage, attempt, layout),
            };
            if interrupt.requested() {
                return Err(RunError::Interrupted { stage });
            }
            self.started(stage, attempt).await?;
            let result = run_stage(&ctx, stage, layout, opts.workers, &interrupt).await;
            self.ended(stage, attempt, result).await?;
        }
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
        let waiting =
            queue::Waiting { run: name.clone(), stages: stages.clone(), pid: std::process::id(), since: state::now() };
        let db = queue::open_in_turn(&store_url, &waiting).await.map_err(RunError::State)?;
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
    async fn started(&self, stage: Stage, attempt: u32) -> Result<(), RunError> {
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
        let accounted = self.accounted(stage).await?;
        let now = state::now();
        self.update(stage, |r| {
            let mut time = r.time.take().filter(|_| r.config_hash == hash);
            if stage.is_training() {
                let t = time.get_or_insert_default();
                // Only restarts within one `pretrain run` wait; the time between two runs is not queueing.
                if attempt == 1 {
                    t.waiting_since = None;
                }
                goodput::started(t, now as i64, accounted);
            }
            *r = StageRecord {
                phase: RecordPhase::Running,
                attempts: attempt,
                started: Some(now),
                time,
                ..record(&hash)
            };
        })
    }

    /// Seconds the newest checkpoint of a training stage accounts for (0 for other stages).
    async fn accounted(&self, stage: Stage) -> Result<f64, RunError> {
        if !stage.is_training() {
            return Ok(0.0);
        }
        let dir = self.store.stage(&self.name, stage)?;
        let ledger = crate::checkpoints::ledger(&dir, &self.run.spec.stage_config_hash(stage)).await?;
        Ok(goodput::accounted(ledger.as_ref()))
    }

    /// Records how `attempt` of `stage` ended, for the planner's next choice.
    async fn ended(&mut self, stage: Stage, attempt: u32, result: Result<(), WorkerExit>) -> Result<(), RunError> {
        let now = state::now();
        let finished = Some(now);
        let accounted = self.accounted(stage).await?;
        let why = match &result {
            Ok(()) => Ended::Other,
            Err(WorkerExit::Interrupted) => Ended::Stopped,
            Err(_) => Ended::Failed,
        };
        self.update(stage, |r| {
            if let (Some(start), Some(t)) = (r.started, r.time.as_mut()) {
                goodput::ended(t, start as i64, now as i64, accounted, why);
                // A restart within this `pretrain run` waits from here (see `started`).
                goodput::waiting(t, now as i64);
            }
        })?;
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
            let goodput = match goodput(&self.db, &self.store, &self.name).await {
                Ok(g) => g,
                Err(e) => {
                    eprintln!("report: goodput not known: {e}");
                    None
                }
            };
            match report::write(&self.store, &self.name, goodput.as_ref()).await {
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
        time: None,
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
            let alive = runner_alive(&r);
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
        if let Some(g) = goodput(&db, &store, &name).await? {
            let _ = writeln!(out, "  {}", goodput::summary(&g));
        }
    }
    Ok(out)
}

/// Goodput of `run`'s training stages, from the state database's records and their newest
/// checkpoints' ledgers (a local run's gang counts as one GPU).
pub async fn goodput(db: &StateDb, store: &Store, run: &str) -> Result<Option<Goodput>, RunError> {
    let records = db.records(run);
    let mut ledgers = BTreeMap::new();
    for (&stage, r) in records.iter().filter(|(s, r)| s.is_training() && r.time.is_some()) {
        if let Some(ledger) = crate::checkpoints::ledger(&store.stage(run, stage)?, &r.config_hash).await? {
            ledgers.insert(stage, ledger);
        }
    }
    Ok(goodput_of(&records, &ledgers))
}

/// Goodput of a run's training stages from their `records` and their newest checkpoints' `ledgers`
/// (those written for the record's config).
pub fn goodput_of(
    records: &BTreeMap<Stage, StageRecord>,
    ledgers: &BTreeMap<Stage, goodput::Ledger>,
) -> Option<Goodput> {
    let times: Vec<goodput::StageTimes<'_>> = records
        .iter()
        .filter(|(s, _)| s.is_training())
        .filter_map(|(stage, r)| {
            let running = r.phase == RecordPhase::Running && runner_alive(r);
            Some(goodput::StageTimes {
                time: r.time.as_ref()?,
                running_since: running.then_some(r.started).flatten().map(|s| s as i64),
                ledger: ledgers.get(stage),
            })
        })
        .collect();
    goodput::of(&times, 1)
}

/// Whether the `pretrain run` that ran a stage last is still running.
fn runner_alive(r: &StageRecord) -> bool {
    r.runner_pid.is_some_and(state::alive)
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
