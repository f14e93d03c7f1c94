//! Attempt bookkeeping of the cluster planner: carrying each stage's status over from the last
//! reconcile, adopting an attempt whose start was not recorded, and settling what became of each
//! running attempt from its Jobs (committed, still in flight, stale, vanished, checkpointed,
//! disrupted, failed). [`super::cluster::decide`] then chooses what runs next.

use std::collections::{BTreeMap, BTreeSet};

use pretrain_crd::Stage;
use pretrain_crd::status::{StagePhase, StageStatus};

use super::cluster::{ClusterView, Decision, Event, Failure, JobKey, JobState, JobView, account_end};
use super::goodput::{self, Ended};
use super::{Observed, Role};

/// Where the current attempt of a stage stands, from its Jobs.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Attempt {
    /// No Job of this attempt exists.
    Missing,
    /// Made for another version of the spec.
    Stale(Vec<JobKey>),
    /// In flight; `next` is a role whose Job is still to be created, `progress` says which phase
    /// runs and how far it got.
    InFlight { next: Option<Role>, progress: String },
    /// The last role succeeded.
    Succeeded,
    /// A Job failed.
    Failed(Failure),
}

/// The roles of `stage`'s Jobs, in the order they run.
fn roles_of(view: &ClusterView<'_>, stage: Stage) -> &'static [Role] {
    Role::of(super::layout(view.spec, stage))
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
    let roles = roles_of(view, stage);
    let done = |role: Role| jobs.iter().any(|j| j.role == role && j.state == JobState::Succeeded);
    if roles.iter().all(|r| done(*r)) {
        return Attempt::Succeeded;
    }
    // The first role not yet succeeded runs next; create it when no Job of it exists.
    let current = roles.iter().copied().find(|r| !done(*r)).expect("a role is not done");
    let job = jobs.iter().find(|j| j.role == current);
    let progress = match job.map(|j| j.tasks) {
        None => format!("{}: starting", current.as_str()),
        Some(Some((done, all))) => format!("{}: {done} of {all} tasks done", current.as_str()),
        Some(None) => format!("{}: running", current.as_str()),
    };
    Attempt::InFlight { next: job.is_none().then_some(current), progress }
}

/// The Jobs of an attempt that have not ended.
pub(super) fn in_flight(view: &ClusterView<'_>, stage: Stage, attempt: u32) -> Vec<JobKey> {
    view.jobs
        .iter()
        .filter(|j| j.stage == stage && j.attempt == attempt && j.state.is_live())
        .map(|j| JobKey { stage, role: j.role, attempt })
        .collect()
}

/// One status entry per stage of the spec, in order, keeping what the last reconcile recorded.
pub(super) fn carried_over(view: &ClusterView<'_>) -> Vec<StageStatus> {
    let previous: BTreeMap<&str, &StageStatus> = view.status.stages.iter().map(|s| (s.name.as_str(), s)).collect();
    view.spec
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
                    time: None,
                },
                |s| (*s).clone(),
            )
        })
        .collect()
}

/// The status write that recorded a new attempt can be lost after its Jobs were created (the API
/// failed, or the operator restarted in between). The Jobs carry their attempt: adopt it, so the
/// attempt and, once it ends, its failure are counted.
pub(super) fn adopt_unrecorded(view: &ClusterView<'_>, decision: &mut Decision, now: &str) {
    for (i, stage) in view.spec.stages().into_iter().enumerate() {
        let s = &mut decision.status.stages[i];
        let newest = view.jobs.iter().filter(|j| j.stage == stage && j.current_spec).map(|j| j.attempt).max();
        if let Some(attempt) = newest.filter(|a| *a > s.attempts) {
            let resumed = attempt > 1;
            s.attempts = attempt;
            s.phase = StagePhase::Running;
            s.start_time = Some(now.into());
            if stage.is_training() {
                goodput::started(s.time.get_or_insert_default(), view.now, view.accounted(stage));
            }
            s.finish_time = None;
            s.message = None;
            decision.events.push(Event {
                warning: false,
                reason: if resumed { "StageRestarted" } else { "StageStarted" },
                note: format!("{stage}: attempt {attempt} (found running; its start was not recorded)"),
            });
        }
    }
}

/// What became of a stage's running attempt: its new phase is in its status entry; these are the
/// Jobs to create and stop and the event to record.
#[derive(Debug, Default)]
struct Settled {
    create: Option<JobKey>,
    stop: Vec<JobKey>,
    event: Option<Event>,
    /// It failed in a way no retry can help.
    permanent: bool,
}

/// Settles every stage's current attempt, and says what the shared planner sees of each stage.
pub(super) fn settle(view: &ClusterView<'_>, decision: &mut Decision, now: &str) -> BTreeMap<Stage, Observed> {
    let mut permanent = BTreeSet::new();
    for (i, stage) in view.spec.stages().into_iter().enumerate() {
        let s = &mut decision.status.stages[i];
        let settled = if view.committed.contains(&stage) {
            if s.phase == StagePhase::Running {
                account_end(view, s, stage, Ended::Other);
            }
            Settled { event: committed(s, stage, now), ..Settled::default() }
        } else {
            if matches!(s.phase, StagePhase::Succeeded | StagePhase::Skipped) {
                // Committed once, no longer for this spec: it runs again.
                s.phase = StagePhase::Pending;
                s.failures = 0;
                s.finish_time = None;
            }
            if s.phase != StagePhase::Running {
                continue;
            }
            settle_running(view, s, stage, now)
        };
        decision.create.extend(settled.create);
        decision.stop.extend(settled.stop);
        decision.events.extend(settled.event);
        if settled.permanent {
            permanent.insert(stage);
        }
    }
    view.spec
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
        .collect()
}

/// A stage whose outputs the store committed: succeeded (or skipped, when it never ran).
fn committed(s: &mut StageStatus, stage: Stage, now: &str) -> Option<Event> {
    if matches!(s.phase, StagePhase::Succeeded | StagePhase::Skipped) {
        return None;
    }
    s.phase = if s.attempts == 0 { StagePhase::Skipped } else { StagePhase::Succeeded };
    s.finish_time.get_or_insert_with(|| now.into());
    s.message = None;
    (s.attempts > 0).then(|| Event {
        warning: false,
        reason: "StageSucceeded",
        note: format!("{stage}: outputs committed (attempt {})", s.attempts),
    })
}

/// What the Jobs of a running attempt say became of it.
fn settle_running(view: &ClusterView<'_>, s: &mut StageStatus, stage: Stage, now: &str) -> Settled {
    let ended = |s: &mut StageStatus, phase: StagePhase, message: String, why: Ended| {
        account_end(view, s, stage, why);
        s.phase = phase;
        s.finish_time = Some(now.into());
        s.message = Some(message);
    };
    let mut settled = Settled::default();
    match attempt_state(view, stage, s.attempts) {
        Attempt::InFlight { next, progress } => {
            settled.create = next.map(|role| JobKey { stage, role, attempt: s.attempts });
            // Only a sharded stage has phases worth naming; a gang's message is its own.
            if roles_of(view, stage).len() > 1 {
                s.message = Some(progress);
            }
        }
        Attempt::Stale(active) => {
            settled.stop = active;
            ended(s, StagePhase::Pending, "the spec changed; restarting with the new one".into(), Ended::Other);
            settled.event = Some(Event {
                warning: false,
                reason: "SpecChanged",
                note: format!("{stage}: the spec changed; attempt {} stopped", s.attempts),
            });
        }
        Attempt::Missing => {
            let why = format!("the Jobs of attempt {} disappeared; resuming", s.attempts);
            ended(s, StagePhase::Pending, why, Ended::Failed);
        }
        Attempt::Succeeded => {
            s.failures += 1;
            let why = "the stage's pods exited 0 without committing its outputs".into();
            ended(s, StagePhase::Failed, why, Ended::Failed);
        }
        Attempt::Failed(Failure::Resume) => {
            ended(s, StagePhase::Pending, "checkpointed and stopped; resuming".into(), Ended::Stopped);
        }
        Attempt::Failed(Failure::Disruption(reason)) => {
            // What is still running of the attempt stops (a Job holding a lost pod never ends).
            settled.stop = in_flight(view, stage, s.attempts);
            s.disruptions += 1;
            settled.event = Some(Event {
                warning: true,
                reason: "StageDisrupted",
                note: format!(
                    "{stage}: attempt {} ended by the cluster, not counted against the restart budget: {reason}",
                    s.attempts
                ),
            });
            ended(s, StagePhase::Pending, format!("disrupted ({reason}); resuming"), Ended::Failed);
        }
        Attempt::Failed(Failure::Retry(reason)) => {
            s.failures += 1;
            settled.event = Some(Event {
                warning: true,
                reason: "StageFailed",
                note: format!("{stage}: attempt {} failed: {reason}", s.attempts),
            });
            ended(s, StagePhase::Failed, reason, Ended::Failed);
        }
        Attempt::Failed(Failure::Permanent(reason)) => {
            s.failures += 1;
            settled.permanent = true;
            ended(s, StagePhase::Failed, reason, Ended::Failed);
        }
    }
    settled
}
