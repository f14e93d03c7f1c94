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

use pretrain_crd::status::{CheckpointStatus, Condition, Preemption, RunPhase, StagePhase, StageStatus};
use pretrain_crd::{PretrainRunSpec, PretrainRunStatus, Stage};
use serde::Deserialize;

use super::{Action, Layout, Observed, Role};

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

/// Where the current attempt of a stage stands, from its Jobs.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Attempt {
    /// No Job of this attempt exists.
    Missing,
    /// Made for another version of the spec.
    Stale(Vec<JobKey>),
    /// In flight; `next` is a role whose Job is still to be created.
    InFlight { next: Option<Role> },
    /// The last role succeeded.
    Succeeded,
    /// A Job failed.
    Failed(Failure),
}

fn attempt_state(view: &ClusterView<'_>, stage: Stage, attempt: u32) -> Attempt {
    let jobs: Vec<&JobView> = view.jobs.iter().filter(|j| j.stage == stage && j.attempt == attempt).collect();
    if jobs.is_empty() {
        return Attempt::Missing;
    }
    let key = |j: &JobView| JobKey { stage, role: j.role, attempt };
    if jobs.iter().any(|j| !j.current_spec) {
        let active = jobs.iter().filter(|j| j.state.is_live()).map(|j| key(j)).collect();
        return Attempt::Stale(active);
    }
    if let Some(JobState::Failed(f)) = jobs.iter().map(|j| &j.state).find(|s| matches!(s, JobState::Failed(_))) {
        return Attempt::Failed(f.clone());
    }
    if let Some(JobState::Lost(why)) = jobs.iter().map(|j| &j.state).find(|s| matches!(s, JobState::Lost(_))) {
        return Attempt::Failed(Failure::Disruption(why.clone()));
    }
    let roles = Role::of(super::layout(view.spec, stage));
    let done = |role: Role| jobs.iter().any(|j| j.role == role && j.state == JobState::Succeeded);
    if roles.iter().all(|r| done(*r)) {
        return Attempt::Succeeded;
    }
    // The first role not yet succeeded runs next; create it when no Job of it exists.
    let next = roles.iter().copied().find(|r| !done(*r)).filter(|r| !jobs.iter().any(|j| j.role == *r));
    Attempt::InFlight { next }
}

/// The next status and actions for a run.
pub fn decide(view: &ClusterView<'_>) -> Decision {
    let spec = view.spec;
    let now = format_time(view.now);
    let old = view.status;
    let mut status = old.clone();
    status.last_checkpoint = view.checkpoint.clone().or_else(|| old.last_checkpoint.clone());
    let spec_changed = old.observed_generation.is_some() && old.observed_generation != view.generation;
    status.observed_generation = view.generation;
    // One entry per stage of the spec, in order, keeping what was recorded.
    let previous: BTreeMap<&str, &StageStatus> = old.stages.iter().map(|s| (s.name.as_str(), s)).collect();
    status.stages = spec
        .stages()
        .into_iter()
        .map(|stage| {
            previous.get(stage.as_str()).map_or_else(
                || StageStatus {
                    name: stage.as_str().into(),
                    phase: StagePhase::Pending,
                    attempts: 0,
                    failures: 0,
                    disruptions: 0,
                    start_time: None,
                    finish_time: None,
                    message: None,
                },
                |s| (*s).clone(),
            )
        })
        .collect();
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

    // The status write that recorded a new attempt can be lost after its Jobs were created (the API
    // failed, or the operator restarted in between). The Jobs carry their attempt: adopt it, so the
    // attempt and, once it ends, its failure are counted.
    for (i, stage) in spec.stages().into_iter().enumerate() {
        let s = &mut decision.status.stages[i];
        let newest = view.jobs.iter().filter(|j| j.stage == stage && j.current_spec).map(|j| j.attempt).max();
        if let Some(attempt) = newest.filter(|a| *a > s.attempts) {
            let resumed = attempt > 1;
            s.attempts = attempt;
            s.phase = StagePhase::Running;
            s.start_time = Some(now.clone());
            s.finish_time = None;
            s.message = None;
            decision.events.push(Event {
                warning: false,
                reason: if resumed { "StageRestarted" } else { "StageStarted" },
                note: format!("{stage}: attempt {attempt} (found running; its start was not recorded)"),
            });
        }
    }

    // What became of each stage's current attempt.
    let mut permanent = BTreeSet::new();
    for (i, stage) in spec.stages().into_iter().enumerate() {
        let s = &mut decision.status.stages[i];
        if view.committed.contains(&stage) {
            if !matches!(s.phase, StagePhase::Succeeded | StagePhase::Skipped) {
                s.phase = if s.attempts == 0 { StagePhase::Skipped } else { StagePhase::Succeeded };
                s.finish_time.get_or_insert_with(|| now.clone());
                s.message = None;
                if s.attempts > 0 {
                    decision.events.push(Event {
                        warning: false,
                        reason: "StageSucceeded",
                        note: format!("{stage}: outputs committed (attempt {})", s.attempts),
                    });
                }
            }
            continue;
        }
        if matches!(s.phase, StagePhase::Succeeded | StagePhase::Skipped) {
            // Committed once, no longer for this spec: it runs again.
            s.phase = StagePhase::Pending;
            s.failures = 0;
            s.finish_time = None;
        }
        if s.phase != StagePhase::Running {
            continue;
        }
        let ended = |s: &mut StageStatus, phase: StagePhase, message: String| {
            s.phase = phase;
            s.finish_time = Some(now.clone());
            s.message = Some(message);
        };
        match attempt_state(view, stage, s.attempts) {
            Attempt::InFlight { next } => {
                if let Some(role) = next {
                    decision.create.push(JobKey { stage, role, attempt: s.attempts });
                }
            }
            Attempt::Stale(active) => {
                decision.stop.extend(active);
                ended(s, StagePhase::Pending, "the spec changed; restarting with the new one".into());
                decision.events.push(Event {
                    warning: false,
                    reason: "SpecChanged",
                    note: format!("{stage}: the spec changed; attempt {} stopped", s.attempts),
                });
            }
            Attempt::Missing => {
                ended(s, StagePhase::Pending, format!("the Jobs of attempt {} disappeared; resuming", s.attempts));
            }
            Attempt::Succeeded => {
                s.failures += 1;
                ended(s, StagePhase::Failed, "the stage's pods exited 0 without committing its outputs".into());
            }
            Attempt::Failed(Failure::Resume) => {
                ended(s, StagePhase::Pending, "checkpointed and stopped; resuming".into());
            }
            Attempt::Failed(Failure::Disruption(reason)) => {
                // What is still running of the attempt stops (a Job holding a lost pod never ends).
                decision.stop.extend(in_flight(view, stage, s.attempts));
                s.disruptions += 1;
                decision.events.push(Event {
                    warning: true,
                    reason: "StageDisrupted",
                    note: format!(
                        "{stage}: attempt {} ended by the cluster, not counted against the restart budget: {reason}",
                        s.attempts
                    ),
                });
                ended(s, StagePhase::Pending, format!("disrupted ({reason}); resuming"));
            }
            Attempt::Failed(Failure::Retry(reason)) => {
                s.failures += 1;
                decision.events.push(Event {
                    warning: true,
                    reason: "StageFailed",
                    note: format!("{stage}: attempt {} failed: {reason}", s.attempts),
                });
                ended(s, StagePhase::Failed, reason);
            }
            Attempt::Failed(Failure::Permanent(reason)) => {
                s.failures += 1;
                permanent.insert(stage);
                ended(s, StagePhase::Failed, reason);
            }
        }
    }

    // The shared planner picks the stage to work on.
    let observed: BTreeMap<Stage, Observed> = spec
        .stages()
        .into_iter()
        .zip(&decision.status.stages)
        .map(|(stage, s)| {
            let o = if view.committed.contains(&stage) {
                Observed::Committed
            } else if s.phase == StagePhase::Failed {
                Observed::Failed {
                    attempts: s.failures,
                    permanent: permanent.contains(&stage),
                    reason: s.message.clone().unwrap_or_default(),
                }
            } else {
                Observed::Pending
            };
            (stage, o)
        })
        .collect();
    let index = |stage: Stage| spec.stages().iter().position(|s| *s == stage).expect("a stage of the spec");
    match super::next(spec, &spec.stages(), &observed) {
        Action::Finished => {
            decision.status.stage = None;
            if old.phase != Some(RunPhase::Succeeded) {
                decision.events.push(Event {
                    warning: false,
                    reason: "RunSucceeded",
                    note: "every stage committed its outputs".into(),
                });
            }
            set_phase(
                &mut decision,
                &now,
                RunPhase::Succeeded,
                "AllStagesCommitted",
                "every stage committed its outputs",
            );
        }
        Action::Failed { stage, reason } => {
            decision.status.stage = Some(stage.as_str().into());
            decision.events.push(Event { warning: true, reason: "RunFailed", note: format!("{stage}: {reason}") });
            decision.status.reason = Some(format!("{stage}: {reason}"));
            set_phase(&mut decision, &now, RunPhase::Failed, "StageFailed", &format!("{stage}: {reason}"));
        }
        Action::Run { stage, layout, .. } => {
            decision.status.stage = Some(stage.as_str().into());
            let s = &mut decision.status.stages[index(stage)];
            let preempted = |attempt: u32| -> Option<&Preemption> {
                old.preemption.as_ref().filter(|p| p.stage == stage.as_str() && p.attempt == attempt)
            };
            if s.phase == StagePhase::Running
                && let Some(p) = preempted(s.attempts)
            {
                // Make room for a higher-priority gang: the pods checkpoint on SIGTERM, and the stage
                // queues again for admission; the attempt does not count as a failure.
                decision.stop.extend(in_flight(view, stage, s.attempts));
                decision.create.retain(|k| k.stage != stage);
                s.phase = StagePhase::Pending;
                s.finish_time = Some(now.clone());
                let why = format!("preempted by {}: checkpointing and stopping", p.by);
                s.message = Some(why.clone());
                decision.events.push(Event {
                    warning: true,
                    reason: "Preempted",
                    note: format!(
                        "{stage}: attempt {} preempted by {}; it resumes from its checkpoint",
                        s.attempts, p.by
                    ),
                });
                decision.status.reason = Some(format!("{stage}: {why}"));
                set_phase(&mut decision, &now, RunPhase::Suspended, "Preempted", &format!("{stage}: {why}"));
                decision.requeue_after = Some(POLL_SECONDS);
                return decision;
            }
            if spec.suspend {
                if s.phase == StagePhase::Running {
                    decision.stop.extend(in_flight(view, stage, s.attempts));
                    decision.create.retain(|k| k.stage != stage);
                    s.phase = StagePhase::Pending;
                    s.finish_time = Some(now.clone());
                    s.message = Some("suspended: checkpointing and stopping".into());
                    decision.events.push(Event {
                        warning: false,
                        reason: "Suspended",
                        note: format!("{stage}: attempt {} asked to checkpoint and stop", s.attempts),
                    });
                }
                set_phase(&mut decision, &now, RunPhase::Suspended, "SpecSuspend", "spec.suspend is true");
                return decision;
            }
            if s.phase != StagePhase::Running {
                let wait = if s.phase == StagePhase::Failed {
                    let since = s.finish_time.as_deref().and_then(parse_time).unwrap_or(view.now);
                    restart_backoff(s.failures) - (view.now - since)
                } else {
                    0
                };
                if wait > 0 {
                    decision.requeue_after = Some(wait as u64);
                    let why = format!("{stage}: restarting in {wait} s after failure {}", s.failures);
                    decision.status.reason = Some(why.clone());
                    set_phase(&mut decision, &now, RunPhase::Pending, "RestartBackoff", &why);
                    return decision;
                }
                let attempt = s.attempts + 1;
                let admitted =
                    old.admission.as_ref().is_some_and(|a| a.stage == stage.as_str() && a.attempt == attempt);
                let lingering = view.live_pods.iter().filter(|p| p.stage == stage && p.attempt < attempt).count();
                if view.scheduler && needs_admission(spec, stage) && !admitted {
                    // The cluster scheduler writes the admission (and meanwhile why it waits).
                    decision.status.queue_position = old.queue_position;
                    // The scheduler's reason, once it has written one (a reason of the reconciler's
                    // own, such as the restart backoff, is not carried over).
                    let scheduler_said = matches!(old.phase, Some(RunPhase::Queued | RunPhase::Suspended));
                    let waiting = old
                        .reason
                        .clone()
                        .filter(|_| scheduler_said)
                        .unwrap_or_else(|| format!("{stage}: waiting for the cluster scheduler"));
                    decision.status.reason = Some(waiting.clone());
                    decision.requeue_after = Some(POLL_SECONDS);
                    match preempted(s.attempts) {
                        Some(p) if s.attempts > 0 => {
                            let why = format!("{stage}: preempted by {}; queued again: {waiting}", p.by);
                            set_phase(&mut decision, &now, RunPhase::Suspended, "Preempted", &why);
                        }
                        _ => set_phase(&mut decision, &now, RunPhase::Queued, "WaitingForAdmission", &waiting),
                    }
                    return decision;
                }
                if lingering > 0 {
                    // Pods of an earlier attempt may still be writing their SIGTERM checkpoint: the
                    // next attempt would resume from an older one, or race them to the store.
                    let why = format!(
                        "{stage}: waiting for {lingering} pod{} of attempt {} to stop before attempt {attempt} starts",
                        if lingering == 1 { "" } else { "s" },
                        s.attempts
                    );
                    decision.status.reason = Some(why.clone());
                    decision.requeue_after = Some(2);
                    // An admitted run keeps its phase, so that the cluster scheduler keeps its nodes.
                    let phase = match old.phase {
                        Some(p @ (RunPhase::Queued | RunPhase::Suspended)) => p,
                        _ => RunPhase::Pending,
                    };
                    set_phase(&mut decision, &now, phase, "WaitingForPreviousAttempt", &why);
                    return decision;
                }
                let resumed = s.attempts > 0;
                s.attempts += 1;
                s.phase = StagePhase::Running;
                s.start_time = Some(now.clone());
                s.finish_time = None;
                s.message = None;
                let first = Role::of(layout)[0];
                decision.create.push(JobKey { stage, role: first, attempt: s.attempts });
                decision.events.push(Event {
                    warning: false,
                    reason: if resumed { "StageRestarted" } else { "StageStarted" },
                    note: format!(
                        "{stage}: attempt {}{}",
                        s.attempts,
                        if resumed && stage.is_training() { ", from the last checkpoint" } else { "" }
                    ),
                });
            }
            let attempt = decision.status.stages[index(stage)].attempts;
            // Jobs handed to Kueue are created suspended; Kueue admits them by unsuspending them.
            let live: Vec<&JobView> = view
                .jobs
                .iter()
                .filter(|j| j.stage == stage && j.attempt == attempt && j.current_spec && j.state.is_live())
                .collect();
            let created = decision.create.iter().any(|k| k.stage == stage);
            let kueue = spec.scheduling.kueue.as_ref();
            let suspended = !live.is_empty() && live.iter().all(|j| j.state == JobState::Suspended);
            if suspended || (kueue.is_some() && live.is_empty() && created) {
                let why = match kueue {
                    Some(k) => {
                        format!("{stage}: attempt {attempt} waits for Kueue to admit it (LocalQueue {})", k.queue_name)
                    }
                    None => format!("{stage}: the Jobs of attempt {attempt} are suspended"),
                };
                decision.status.reason = Some(why.clone());
                decision.requeue_after = Some(POLL_SECONDS);
                set_phase(&mut decision, &now, RunPhase::Queued, "WaitingForKueue", &why);
                return decision;
            }
            let layout_note = match layout {
                Layout::Sharded { shards } => format!("{shards} shards"),
                Layout::Gang { nodes, gpus_per_node } => format!("{nodes} nodes x {gpus_per_node} GPUs"),
                Layout::Single => "1 pod".into(),
            };
            set_phase(&mut decision, &now, RunPhase::Running, "StageRunning", &format!("{stage}: {layout_note}"));
            decision.requeue_after = Some(POLL_SECONDS);
        }
    }
    decision
}

fn in_flight(view: &ClusterView<'_>, stage: Stage, attempt: u32) -> Vec<JobKey> {
    view.jobs
        .iter()
        .filter(|j| j.stage == stage && j.attempt == attempt && j.state.is_live())
        .map(|j| JobKey { stage, role: j.role, attempt })
        .collect()
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
