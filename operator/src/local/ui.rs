//! `pretrain run --ui ADDR`: the dashboard over a store's local runs. Runs and their stages come from
//! the run state this runner holds (and, once its run ended and it let the state go to the next
//! runner in the queue, from what it last read there), queued runs from the queue's tickets.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use pretrain_crd::Stage;
use pretrain_crd::status::{CheckpointStatus, PretrainRunStatus, RunPhase, StagePhase, StageStatus};
use pretrain_store::Store;

use super::queue::Queue;
use super::state::{RecordPhase, StageRecord, StateDb};
use crate::dashboard::{self, LOCAL, RunEntry, Source};

/// Each run's stage records.
type Records = BTreeMap<String, BTreeMap<Stage, StageRecord>>;

/// The local runs of one store.
#[derive(Debug)]
pub struct LocalRuns {
    store: Store,
    store_url: String,
    queue: Queue,
    state: Mutex<State>,
}

#[derive(Debug)]
enum State {
    /// The run state, held by this runner.
    Held(StateDb, BTreeMap<String, Vec<Stage>>),
    /// What it held last.
    Released(Records, BTreeMap<String, Vec<Stage>>),
}

impl LocalRuns {
    /// Over the run state `db` of `store` (at `store_url`), which runs `run` of `stages`.
    pub fn new(store: Store, store_url: &str, db: StateDb, run: &str, stages: Vec<Stage>) -> Self {
        let plans = BTreeMap::from([(run.to_string(), stages)]);
        Self {
            store,
            store_url: store_url.to_string(),
            queue: Queue::for_store(store_url),
            state: Mutex::new(State::Held(db, plans)),
        }
    }

    /// Lets the run state go (the next runner in the queue may take it), keeping what it holds now.
    pub fn release(&self) {
        let mut state = self.state.lock().expect("ui state");
        if let State::Held(db, plans) = &*state {
            *state = State::Released(all_records(db), plans.clone());
        }
    }

    /// Each run's stages and records, as the state has them now.
    fn read(&self) -> (Records, BTreeMap<String, Vec<Stage>>) {
        match &*self.state.lock().expect("ui state") {
            State::Held(db, plans) => (all_records(db), plans.clone()),
            State::Released(records, plans) => (records.clone(), plans.clone()),
        }
    }
}

/// Every run's records.
fn all_records(db: &StateDb) -> Records {
    db.runs().into_iter().map(|run| (run.clone(), db.records(&run))).collect()
}

#[async_trait::async_trait]
impl Source for LocalRuns {
    async fn runs(&self) -> Result<Vec<RunEntry>, String> {
        let (records, plans) = self.read();
        let waiting = self.queue.waiting();
        let mut runs = Vec::new();
        for (name, records) in &records {
            if waiting.iter().any(|w| &w.run == name) {
                continue;
            }
            let stages = plans.get(name).cloned().unwrap_or_else(|| records.keys().copied().collect());
            let status = status(&self.store, name, &stages, records).await.map_err(|e| e.to_string())?;
            runs.push(RunEntry {
                namespace: LOCAL.into(),
                name: name.clone(),
                stages,
                status,
                store: dashboard::redact(&self.store_url),
            });
        }
        let reason = self.queue.reason(&dashboard::redact(&self.store_url));
        for (place, w) in waiting.into_iter().enumerate() {
            let status = PretrainRunStatus {
                phase: Some(RunPhase::Queued),
                reason: Some(reason.clone()),
                queue_position: u32::try_from(place + 1).ok(),
                ..PretrainRunStatus::default()
            };
            runs.push(RunEntry {
                namespace: LOCAL.into(),
                name: w.run,
                stages: w.stages,
                status,
                store: dashboard::redact(&self.store_url),
            });
        }
        Ok(runs)
    }

    async fn store(&self, namespace: &str, name: &str) -> Result<Option<Store>, String> {
        let known = namespace == LOCAL
            && (self.read().0.contains_key(name) || self.queue.waiting().iter().any(|w| w.run == name));
        Ok(known.then(|| self.store.clone()))
    }

    fn place(&self) -> String {
        format!("this machine · {}", dashboard::redact(&self.store_url))
    }
}

/// RFC 3339 of Unix seconds.
fn rfc3339(secs: u64) -> Option<String> {
    jiff::Timestamp::from_second(i64::try_from(secs).ok()?).ok().map(|t| t.to_string())
}

/// A local run's status in the operator's terms, from its stage records and store.
pub async fn status(
    store: &Store,
    run: &str,
    stages: &[Stage],
    records: &BTreeMap<Stage, StageRecord>,
) -> Result<PretrainRunStatus, pretrain_store::Error> {
    // Each training stage's newest checkpoint, read once: for the status and for goodput's ledger.
    let mut newest = BTreeMap::new();
    for (&stage, r) in records.iter().filter(|(s, _)| s.is_training()) {
        if let Some(found) = crate::checkpoints::newest_for(&store.stage(run, stage)?, &r.config_hash).await? {
            newest.insert(stage, found);
        }
    }
    let mut status = PretrainRunStatus::default();
    for &stage in stages {
        let Some(r) = records.get(&stage) else { continue };
        let alive = super::runner_alive(r);
        let phase = match r.phase {
            RecordPhase::Running if alive => StagePhase::Running,
            RecordPhase::Running | RecordPhase::Interrupted => StagePhase::Pending,
            RecordPhase::Committed => StagePhase::Succeeded,
            RecordPhase::Skipped => StagePhase::Skipped,
            RecordPhase::Failed => StagePhase::Failed,
        };
        let stopped = match r.phase {
            RecordPhase::Interrupted => {
                Some("interrupted after a checkpoint; run the same command again to resume".into())
            }
            RecordPhase::Running if !alive => Some(format!(
                "the `pretrain run` that ran it (pid {}) is gone; run the same command again to resume",
                r.runner_pid.unwrap_or_default()
            )),
            _ => None,
        };
        let failed = r.phase == RecordPhase::Failed;
        if phase == StagePhase::Running || (status.stage.is_none() && (failed || stopped.is_some())) {
            status.stage = Some(stage.to_string());
            status.reason = if failed { r.reason.clone() } else { stopped.clone() };
            status.phase = Some(match phase {
                StagePhase::Running => RunPhase::Running,
                StagePhase::Failed => RunPhase::Failed,
                _ => RunPhase::Suspended,
            });
        }
        if let Some((name, state)) = newest.get(&stage).filter(|_| r.phase != RecordPhase::Skipped) {
            status.last_checkpoint = Some(CheckpointStatus {
                stage: stage.to_string(),
                step: state.step,
                tokens: state.tokens_seen,
                loss: state.loss,
                url: dashboard::redact(&format!("{}/{run}/{stage}/ckpt/{name}", store.url().trim_end_matches('/'))),
                time: state.saved_unix.and_then(|s| u64::try_from(s).ok()).and_then(rfc3339),
            });
        }
        status.stages.push(StageStatus {
            name: stage.to_string(),
            phase,
            attempts: r.attempts,
            failures: r.attempts.saturating_sub(1) + u32::from(failed),
            disruptions: 0,
            start_time: r.started.and_then(rfc3339),
            finish_time: r.finished.filter(|_| phase != StagePhase::Running).and_then(rfc3339),
            message: if failed { r.reason.clone() } else { stopped },
            time: r.time.clone(),
        });
    }
    if status.phase.is_none() {
        let finished = !stages.is_empty()
            && status.stages.len() == stages.len()
            && status.stages.iter().all(|s| matches!(s.phase, StagePhase::Succeeded | StagePhase::Skipped));
        status.phase = Some(if finished { RunPhase::Succeeded } else { RunPhase::Pending });
    }
    let ledgers = newest.into_iter().map(|(stage, (_, state))| (stage, state.into_ledger())).collect();
    status.goodput = super::goodput_of(records, &ledgers);
    Ok(status)
}

/// Starts the dashboard of `runs` on `addr`; returns the address it listens on.
pub async fn start(addr: &str, runs: Arc<LocalRuns>) -> std::io::Result<std::net::SocketAddr> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    tokio::spawn(async move {
        if let Err(e) = dashboard::serve(listener, runs).await {
            eprintln!("dashboard: {e}");
        }
    });
    Ok(local)
}
