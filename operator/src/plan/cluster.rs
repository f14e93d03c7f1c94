//! The operator's decisions on a cluster, pure: from a run's spec, its last status, the stages the
//! store has committed and what the API server shows of its Jobs, the next status and the Jobs to
//! create or stop. [`crate::k8s`] gathers the inputs and carries the decision out.
//!
//! Each stage attempt is one set of Jobs named by its attempt number, which lives in the status (so
//! the restart count survives operator restarts and Job deletion). A stage's status phase says
//! where its current attempt is: `Running` (its Jobs are in flight), `Failed` (it failed and counts
//! against the budget), `Pending` (nothing in flight: not started, stopped after a checkpoint, or its
//! Jobs vanished), `Succeeded`/`Skipped` (committed).

use std::collections::{BTreeMap, BTreeSet};

use pretrain_crd::status::{CheckpointStatus, Condition, GROW, Goodput, Preemption, RunPhase, StagePhase, StageStatus};
use pretrain_crd::{PretrainRunSpec, PretrainRunStatus, Stage};
use serde::Deserialize;

use super::{Action, Layout, Role, attempt, goodput};

/// What the API server shows of one of the run's Jobs.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct JobView {
    /// Its stage.
    pub stage: Stage,
    /// Its role in the stage.
    pub role: Role,
    /// Its attempt.
    pub attempt: u32,
    /// Whether it was created for the stage's current config hash.
    #[serde(default = "yes")]
    pub current_spec: bool,
    /// Where it is.
    pub state: JobState,
    /// For the independent tasks of a map, dedup, route or write Job: tasks succeeded, and tasks in
    /// all.
    #[serde(default)]
    pub tasks: Option<(u32, u32)>,
}

fn yes() -> bool {
    true
}

/// Where a Job is.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum JobState {
    /// Pods pending or running.
    Active,
    /// Created suspended, waiting for Kueue to admit it (by unsuspending it).
    Suspended,
    /// Not ended, but a pod of it was lost with its node: the Job controller waits for that pod
    /// forever, so the operator ends the attempt (a disruption) and stops the Job.
    Lost(String),
    /// Every pod succeeded.
    Succeeded,
    /// It failed; how its pods ended.
    Failed(Failure),
}

impl JobState {
    /// Whether the Job has not ended (running, waiting for Kueue, or holding a lost pod).
    pub fn is_live(&self) -> bool {
        matches!(self, JobState::Active | JobState::Suspended | JobState::Lost(_))
    }
}

/// How a failed Job's pods ended.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Failure {
    /// They checkpointed on SIGTERM (exit code 75): resume, not a failure.
    Resume,
    /// A failure worth retrying from the checkpoint (a crash, OOM, NCCL error); it counts against
    /// the restart budget.
    Retry(String),
    /// The cluster ended it, not the application: a pod evicted, preempted by the Kubernetes
    /// scheduler, lost with its node (`DisruptionTarget`), or gone without a trace. Resumed from the
    /// checkpoint without counting against the restart budget.
    Disruption(String),
    /// Retrying cannot help (invalid spec or input, a worker without the stage).
    Permanent(String),
}

/// Everything [`decide`] looks at.
#[derive(Debug, Clone)]
pub struct ClusterView<'a> {
    /// The run's spec.
    pub spec: &'a PretrainRunSpec,
    /// `metadata.generation`.
    pub generation: Option<i64>,
    /// The status written by the last reconcile.
    pub status: &'a PretrainRunStatus,
    /// Stages whose outputs the store has committed for the current spec.
    pub committed: &'a BTreeSet<Stage>,
    /// The run's Jobs.
    pub jobs: &'a [JobView],
    /// The newest committed training checkpoint.
    pub checkpoint: Option<CheckpointStatus>,
    /// Seconds since the Unix epoch.
    pub now: i64,
    /// Whether the operator's cluster scheduler admits stages that need GPUs (`status.admission`);
    /// without it, and for runs handed to Kueue, Jobs are created at once.
    pub scheduler: bool,
    /// The run's pods that have not finished (phase neither Succeeded nor Failed), deleted or not:
    /// a new attempt starts only once those of earlier attempts are gone.
    pub live_pods: &'a [LivePod],
    /// Each training stage's newest checkpoint, for goodput.
    pub ledgers: &'a BTreeMap<Stage, goodput::Ledger>,
}

impl ClusterView<'_> {
    /// Seconds the checkpoints of `stage` account for.
    pub fn accounted(&self, stage: Stage) -> f64 {
        goodput::accounted(self.ledgers.get(&stage))
    }
}

/// Files the end of `s`'s running attempt in a training stage's time record.
pub(super) fn account_end(view: &ClusterView<'_>, s: &mut StageStatus, stage: Stage, why: goodput::Ended) {
    let Some(start) = s.start_time.as_deref().and_then(parse_time).filter(|_| stage.is_training()) else { return };
    goodput::ended(s.time.get_or_insert_default(), start, view.now, view.accounted(stage), why);
}

/// Goodput of the run's training stages, from `status` as decided.
fn goodput_of(view: &ClusterView<'_>, status: &PretrainRunStatus) -> Option<Goodput> {
    let times: Vec<goodput::StageTimes<'_>> = view
        .spec
        .stages()
        .into_iter()
        .zip(&status.stages)
        .filter(|(stage, _)| stage.is_training())
        .filter_map(|(stage, s)| {
            let running = (s.phase == StagePhase::Running).then(|| s.start_time.as_deref().and_then(parse_time));
            Some(goodput::StageTimes {
                time: s.time.as_ref()?,
                running_since: running.flatten(),
                ledger: view.ledgers.get(&stage),
            })
        })
        .collect();
    let r = &view.spec.train.resources;
    goodput::of(&times, r.nodes * r.gpus_per_node.max(1))
}

/// A pod of the run that is still running or terminating.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LivePod {
    /// Its stage.
    pub stage: Stage,
    /// Its attempt.
    pub attempt: u32,
}

/// Whether a stage of `spec` waits for the cluster scheduler's admission: one that needs GPUs, in
/// a run not handed to Kueue. CPU stages never hold GPUs and are left to the Kubernetes scheduler.
pub fn needs_admission(spec: &PretrainRunSpec, stage: Stage) -> bool {
    let first = Role::of(super::layout(spec, stage))[0];
    spec.scheduling.kueue.is_none() && super::pods(spec, first).gpus > 0
}

/// A Job to create: the first role of a new attempt, or the reduce after its map.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct JobKey {
    /// Its stage.
    pub stage: Stage,
    /// Its role.
    pub role: Role,
    /// Its attempt.
    pub attempt: u32,
}

/// A Kubernetes Event to record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    /// `Normal` or `Warning`.
    pub warning: bool,
    /// CamelCase reason.
    pub reason: &'static str,
    /// What happened.
    pub note: String,
}

/// What to do.
#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    /// The status to write.
    pub status: PretrainRunStatus,
    /// Jobs to create (with their stage's Service for gangs).
    pub create: Vec<JobKey>,
    /// Jobs to stop: their pods get SIGTERM and checkpoint.
    pub stop: Vec<JobKey>,
    /// Events for the transitions.
    pub events: Vec<Event>,
    /// Reconcile again after this many seconds even if nothing changes.
    pub requeue_after: Option<u64>,
}

/// Seconds to wait before restarting after the `failures`-th failure: 10 s doubling to 10 minutes.
pub fn restart_backoff(failures: u32) -> i64 {
    (10i64 << failures.saturating_sub(1).min(6)).min(600)
}

/// How often a run with a stage in flight is looked at (its checkpoint and progress), besides the
/// Job watches.
pub const POLL_SECONDS: u64 = 60;

/// The next status and actions for a run.
pub fn decide(view: &ClusterView<'_>) -> Decision {
    let now = format_time(view.now);
    let old = view.status;
    let mut status = old.clone();
    status.last_checkpoint = view.checkpoint.clone().or_else(|| old.last_checkpoint.clone());
    let spec_changed = old.observed_generation.is_some() && old.observed_generation != view.generation;
    status.observed_generation = view.generation;
    status.stages = attempt::carried_over(view);
    status.reason = None;
    status.queue_position = None;
    let mut decision = Decision { status, create: vec![], stop: vec![], events: vec![], requeue_after: None };

    // A run that failed stays failed until its spec is edited; an edit gives every stage a fresh budget.
    if old.phase == Some(RunPhase::Failed) {
        if !spec_changed {
            decision.status.observed_generation = old.observed_generation;
            decision.status.reason.clone_from(&old.reason);
            return decision;
        }
        for s in &mut decision.status.stages {
            if s.phase == StagePhase::Failed {
                s.phase = StagePhase::Pending;
            }
            s.failures = 0;
        }
    }
    attempt::adopt_unrecorded(view, &mut decision, &now);
    let observed = attempt::settle(view, &mut decision, &now);

    // The shared planner picks the stage to work on.
    match super::next(view.spec, &view.spec.stages(), &observed) {
        Action::Finished => {
            decision.status.stage = None;
            if old.phase != Some(RunPhase::Succeeded) {
                decision.events.push(Event {
                    warning: false,
                    reason: "RunSucceeded",
                    note: "every stage committed its outputs".into(),
                });
            }
            let why = "every stage committed its outputs";
            set_phase(&mut decision, &now, RunPhase::Succeeded, "AllStagesCommitted", why);
        }
        Action::Failed { stage, reason } => {
            decision.status.stage = Some(stage.as_str().into());
            decision.events.push(Event { warning: true, reason: "RunFailed", note: format!("{stage}: {reason}") });
            decision.status.reason = Some(format!("{stage}: {reason}"));
            set_phase(&mut decision, &now, RunPhase::Failed, "StageFailed", &format!("{stage}: {reason}"));
        }
        Action::Run { stage, layout, .. } => {
            decision.status.stage = Some(stage.as_str().into());
            // Each step either completes the decision (and says so) or leaves it to the next.
            let held = preempt(view, &mut decision, stage, &now)
                || suspend(view, &mut decision, stage, &now)
                || start_attempt(view, &mut decision, stage, layout, &now)
                || wait_for_kueue(view, &mut decision, stage, &now);
            if !held {
                running(&mut decision, stage, layout, &now);
            }
        }
    }
    decision.status.goodput = goodput_of(view, &decision.status).or_else(|| old.goodput.clone());
    decision
}

/// The status entry of `stage`.
fn entry<'a>(view: &ClusterView<'_>, decision: &'a mut Decision, stage: Stage) -> &'a mut StageStatus {
    let index = view.spec.stages().iter().position(|s| *s == stage).expect("a stage of the spec");
    &mut decision.status.stages[index]
}

/// The preemption the cluster scheduler recorded for this attempt of `stage`, if any.
fn preemption<'a>(view: &ClusterView<'a>, stage: Stage, attempt: u32) -> Option<&'a Preemption> {
    view.status.preemption.as_ref().filter(|p| p.stage == stage.as_str() && p.attempt == attempt)
}

/// Makes room for a higher-priority gang when the scheduler preempted the running attempt: the pods
/// checkpoint on SIGTERM, and the stage queues again for admission; the attempt does not count as a
/// failure. Returns whether it did.
fn preempt(view: &ClusterView<'_>, decision: &mut Decision, stage: Stage, now: &str) -> bool {
    let s = entry(view, decision, stage);
    let Some(p) = preemption(view, stage, s.attempts).filter(|_| s.phase == StagePhase::Running) else {
        return false;
    };
    let (attempts, by) = (s.attempts, p.by.clone());
    account_end(view, s, stage, goodput::Ended::Stopped);
    s.phase = StagePhase::Pending;
    s.finish_time = Some(now.into());
    let nodes = view.spec.train.resources.nodes;
    let (reason, why, note) = if by == GROW {
        (
            "Growing",
            format!("checkpointing and stopping to restart on all {nodes} nodes"),
            format!("{stage}: attempt {attempts} checkpoints and stops to grow back to {nodes} nodes"),
        )
    } else {
        (
            "Preempted",
            format!("preempted by {by}: checkpointing and stopping"),
            format!("{stage}: attempt {attempts} preempted by {by}; it resumes from its checkpoint"),
        )
    };
    s.message = Some(why.clone());
    decision.stop.extend(attempt::in_flight(view, stage, attempts));
    decision.create.retain(|k| k.stage != stage);
    decision.events.push(Event { warning: by != GROW, reason, note });
    decision.status.reason = Some(format!("{stage}: {why}"));
    set_phase(decision, now, RunPhase::Suspended, reason, &format!("{stage}: {why}"));
    decision.requeue_after = Some(POLL_SECONDS);
    true
}

/// `spec.suspend`: the running attempt checkpoints and stops, and nothing starts. Returns whether
/// the run is suspended.
fn suspend(view: &ClusterView<'_>, decision: &mut Decision, stage: Stage, now: &str) -> bool {
    if !view.spec.suspend {
        return false;
    }
    let s = entry(view, decision, stage);
    if s.phase == StagePhase::Running {
        let attempts = s.attempts;
        account_end(view, s, stage, goodput::Ended::Stopped);
        s.phase = StagePhase::Pending;
        s.finish_time = Some(now.into());
        s.message = Some("suspended: checkpointing and stopping".into());
        decision.stop.extend(attempt::in_flight(view, stage, attempts));
        decision.create.retain(|k| k.stage != stage);
        decision.events.push(Event {
            warning: false,
            reason: "Suspended",
            note: format!("{stage}: attempt {attempts} asked to checkpoint and stop"),
        });
    }
    set_phase(decision, now, RunPhase::Suspended, "SpecSuspend", "spec.suspend is true");
    true
}

/// Starts the next attempt of a stage that is not running, once nothing holds it back: the restart
/// backoff, the cluster scheduler's admission, or pods of the attempt before. Returns whether it is
/// held back (the decision is then complete).
fn start_attempt(view: &ClusterView<'_>, decision: &mut Decision, stage: Stage, layout: Layout, now: &str) -> bool {
    let s = entry(view, decision, stage);
    if s.phase == StagePhase::Running {
        return false;
    }
    // Waiting starts here, not when an attempt ends: a suspended run never gets this far.
    if stage.is_training() {
        goodput::waiting(s.time.get_or_insert_default(), view.now);
    }
    let wait = if s.phase == StagePhase::Failed {
        let since = s.finish_time.as_deref().and_then(parse_time).unwrap_or(view.now);
        restart_backoff(s.failures) - (view.now - since)
    } else {
        0
    };
    if wait > 0 {
        let why = format!("{stage}: restarting in {wait} s after failure {}", s.failures);
        decision.requeue_after = Some(wait as u64);
        decision.status.reason = Some(why.clone());
        set_phase(decision, now, RunPhase::Pending, "RestartBackoff", &why);
        return true;
    }
    let attempt = s.attempts + 1;
    if wait_for_admission(view, decision, stage, attempt, now) || wait_for_previous(view, decision, stage, attempt, now)
    {
        return true;
    }
    let s = entry(view, decision, stage);
    let resumed = s.attempts > 0;
    s.attempts = attempt;
    s.phase = StagePhase::Running;
    s.start_time = Some(now.into());
    if let Some(time) = s.time.as_mut() {
        goodput::started(time, view.now, view.accounted(stage));
    }
    s.finish_time = None;
    s.message = None;
    decision.create.push(JobKey { stage, role: Role::of(layout)[0], attempt });
    decision.events.push(Event {
        warning: false,
        reason: if resumed { "StageRestarted" } else { "StageStarted" },
        note: format!(
            "{stage}: attempt {attempt}{}",
            if resumed && stage.is_training() { ", from the last checkpoint" } else { "" }
        ),
    });
    false
}

/// Whether `attempt` of a stage that needs the cluster scheduler's admission still waits for it
/// (the scheduler writes the admission, and meanwhile why the run waits).
fn wait_for_admission(view: &ClusterView<'_>, decision: &mut Decision, stage: Stage, attempt: u32, now: &str) -> bool {
    let old = view.status;
    let admitted = old.admission.as_ref().is_some_and(|a| a.stage == stage.as_str() && a.attempt == attempt);
    if !view.scheduler || !needs_admission(view.spec, stage) || admitted {
        return false;
    }
    decision.status.queue_position = old.queue_position;
    // The scheduler's reason, once it has written one (a reason of the reconciler's own, such as the
    // restart backoff, is not carried over).
    let scheduler_said = matches!(old.phase, Some(RunPhase::Queued | RunPhase::Suspended));
    let waiting = old
        .reason
        .clone()
        .filter(|_| scheduler_said)
        .unwrap_or_else(|| format!("{stage}: waiting for the cluster scheduler"));
    decision.status.reason = Some(waiting.clone());
    decision.requeue_after = Some(POLL_SECONDS);
    let previous = attempt - 1;
    match preemption(view, stage, previous) {
        Some(p) if previous > 0 && p.by == GROW => {
            let nodes = view.spec.train.resources.nodes;
            let why = format!("{stage}: stopped to restart on all {nodes} nodes; queued again: {waiting}");
            set_phase(decision, now, RunPhase::Suspended, "Growing", &why);
        }
        Some(p) if previous > 0 => {
            let why = format!("{stage}: preempted by {}; queued again: {waiting}", p.by);
            set_phase(decision, now, RunPhase::Suspended, "Preempted", &why);
        }
        _ => set_phase(decision, now, RunPhase::Queued, "WaitingForAdmission", &waiting),
    }
    true
}

/// Whether pods of an earlier attempt are still running: they may still be writing their SIGTERM
/// checkpoint, and `attempt` would resume from an older one, or race them to the store.
fn wait_for_previous(view: &ClusterView<'_>, decision: &mut Decision, stage: Stage, attempt: u32, now: &str) -> bool {
    let lingering = view.live_pods.iter().filter(|p| p.stage == stage && p.attempt < attempt).count();
    if lingering == 0 {
        return false;
    }
    let why = format!(
        "{stage}: waiting for {lingering} pod{} of attempt {} to stop before attempt {attempt} starts",
        if lingering == 1 { "" } else { "s" },
        attempt - 1
    );
    decision.status.reason = Some(why.clone());
    decision.requeue_after = Some(2);
    // An admitted run keeps its phase, so that the cluster scheduler keeps its nodes.
    let phase = match view.status.phase {
        Some(p @ (RunPhase::Queued | RunPhase::Suspended)) => p,
        _ => RunPhase::Pending,
    };
    set_phase(decision, now, phase, "WaitingForPreviousAttempt", &why);
    true
}

/// Whether the attempt's Jobs wait for Kueue: Jobs handed to Kueue are created suspended, and Kueue
/// admits them by unsuspending them.
fn wait_for_kueue(view: &ClusterView<'_>, decision: &mut Decision, stage: Stage, now: &str) -> bool {
    let attempt = entry(view, decision, stage).attempts;
    let live: Vec<&JobView> = view
        .jobs
        .iter()
        .filter(|j| j.stage == stage && j.attempt == attempt && j.current_spec && j.state.is_live())
        .collect();
    let created = decision.create.iter().any(|k| k.stage == stage);
    let kueue = view.spec.scheduling.kueue.as_ref();
    let suspended = !live.is_empty() && live.iter().all(|j| j.state == JobState::Suspended);
    if !(suspended || (kueue.is_some() && live.is_empty() && created)) {
        return false;
    }
    let why = match kueue {
        Some(k) => format!("{stage}: attempt {attempt} waits for Kueue to admit it (LocalQueue {})", k.queue_name),
        None => format!("{stage}: the Jobs of attempt {attempt} are suspended"),
    };
    decision.status.reason = Some(why.clone());
    decision.requeue_after = Some(POLL_SECONDS);
    set_phase(decision, now, RunPhase::Queued, "WaitingForKueue", &why);
    true
}

/// The stage runs: the run is `Running`, and looked at again after [`POLL_SECONDS`].
fn running(decision: &mut Decision, stage: Stage, layout: Layout, now: &str) {
    let layout_note = match layout {
        Layout::Sharded { shards, after_map: None } => format!("{shards} shards"),
        Layout::Sharded { shards, after_map: Some(t) } => match t.order {
            None => format!("{shards} shards; {} dedup, {} route and {} write tasks", t.dedup, t.route, t.write),
            Some(order) => format!(
                "{shards} shards; {} dedup, {} embed, {order} order, {} route and {} write tasks",
                t.dedup, t.route, t.route, t.write
            ),
        },
        Layout::Gang { nodes, gpus_per_node } => format!("{nodes} nodes x {gpus_per_node} GPUs"),
        Layout::Single => "1 pod".into(),
    };
    set_phase(decision, now, RunPhase::Running, "StageRunning", &format!("{stage}: {layout_note}"));
    decision.requeue_after = Some(POLL_SECONDS);
}

/// Sets the run phase and its conditions. `Admitted` is True only while the current stage attempt
/// holds its admission and runs (not while a preempted run waits again, nor while Kueue has yet to
/// admit); each of the others is True in its phase. Every condition carries the phase's reason and
/// message (why it is True, or why not) and the generation it describes; its transition time changes
/// only with its status.
fn set_phase(decision: &mut Decision, now: &str, phase: RunPhase, reason: &str, message: &str) {
    let status = &mut decision.status;
    status.phase = Some(phase);
    let truth = [
        ("Admitted", phase == RunPhase::Running),
        ("Running", phase == RunPhase::Running),
        ("Succeeded", phase == RunPhase::Succeeded),
        ("Failed", phase == RunPhase::Failed),
        ("Suspended", phase == RunPhase::Suspended),
    ];
    let now = Some(now.to_string());
    let generation = status.observed_generation;
    for (type_, on) in truth {
        let value = if on { "True" } else { "False" };
        let condition = match status.conditions.iter_mut().position(|c| c.type_ == type_) {
            Some(i) => &mut status.conditions[i],
            None => {
                status.conditions.push(Condition {
                    type_: type_.into(),
                    status: String::new(),
                    last_transition_time: None,
                    reason: None,
                    message: None,
                    observed_generation: None,
                });
                status.conditions.last_mut().expect("just pushed")
            }
        };
        if condition.status != value {
            condition.status = value.into();
            condition.last_transition_time.clone_from(&now);
        }
        condition.reason = Some(reason.to_string());
        condition.message = Some(message.to_string());
        condition.observed_generation = generation;
    }
}

/// RFC 3339 in UTC.
pub fn format_time(unix: i64) -> String {
    jiff::Timestamp::from_second(unix).map(|t| t.to_string()).unwrap_or_default()
}

/// Unix seconds of an RFC 3339 time.
pub fn parse_time(text: &str) -> Option<i64> {
    text.parse::<jiff::Timestamp>().ok().map(|t| t.as_second())
}
