//! Between the cluster and the pure scheduler, still pure: what the API server shows (PretrainRuns,
//! Nodes, Pods, PretrainQueues) becomes the scheduler's nodes, running gangs, queues and requests,
//! and its decision becomes the status changes of each run.
//!
//! - A **request** is a run whose current stage needs GPUs and waits for admission: phase Queued
//!   (or Suspended after a preemption) with no admission for the stage's next attempt. Its
//!   submission time is the run's creation, so a preempted run keeps its place among equals.
//! - A **running gang** is a run whose current stage attempt runs on an admission; it holds the
//!   admitted nodes. Training gangs are preemptible, and what preempting one loses is counted from
//!   its last checkpoint (`status.lastCheckpoint.time`); one already asked to make room costs
//!   nothing more, so later passes do not pick further victims for the same head.
//! - **Free capacity** per node is its allocatable minus the requests of every pod on it that is
//!   not part of a running gang (other workloads, CPU stages, pods still terminating).

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::core::v1::{Node as KubeNode, Pod};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use kube::ResourceExt;
use pretrain_crd::queue::{DEFAULT_QUEUE, PretrainQueueSpec, PretrainQueueStatus};
use pretrain_crd::status::{Admission, Preemption, RunPhase, StagePhase, StageStatus};
use pretrain_crd::{PretrainQueue, PretrainRun, PretrainRunStatus, Stage};

use super::{Decision, Gang, Node, Queue, Request, Resources, Running};
use crate::labels::{GPU_PRODUCT_LABEL, GPU_RESOURCE, LABEL_ATTEMPT, LABEL_RUN, LABEL_STAGE};
use crate::plan::cluster::{format_time, needs_admission, parse_time};
use crate::plan::{self, Role};

/// The scheduler's inputs.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Snapshot {
    /// Nodes with what is free on them for gangs.
    pub nodes: Vec<Node>,
    /// Gangs holding resources.
    pub running: Vec<Running>,
    /// Queues.
    pub queues: Vec<Queue>,
    /// Stages waiting for admission.
    pub requests: Vec<Request>,
}

/// A Kubernetes quantity as a number: `500m`, `4`, `16Gi`, `1.5G`, `1e3`.
pub fn quantity(q: &Quantity) -> Option<f64> {
    let text = q.0.trim();
    let split = text.find(|c: char| c.is_ascii_alphabetic() && c != 'e' && c != 'E').unwrap_or(text.len());
    let (number, suffix) = text.split_at(split);
    let scale = match suffix {
        "" => 1.0,
        "m" => 1e-3,
        "k" => 1e3,
        "M" => 1e6,
        "G" => 1e9,
        "T" => 1e12,
        "P" => 1e15,
        "E" => 1e18,
        "Ki" => 1024.0,
        "Mi" => 1024f64.powi(2),
        "Gi" => 1024f64.powi(3),
        "Ti" => 1024f64.powi(4),
        "Pi" => 1024f64.powi(5),
        "Ei" => 1024f64.powi(6),
        _ => return None,
    };
    number.parse::<f64>().ok().map(|n| n * scale)
}

fn resources(map: Option<&BTreeMap<String, Quantity>>) -> Resources {
    let get = |name: &str| map.and_then(|m| m.get(name)).and_then(quantity).unwrap_or(0.0);
    Resources {
        gpus: get(GPU_RESOURCE).round() as u32,
        cpu_millis: (get("cpu") * 1000.0).round() as u64,
        memory: get("memory").round() as u64,
    }
}

/// What the first Job of `stage` asks for: the pods the operator renders for it.
pub fn stage_gang(run: &PretrainRun, stage: Stage) -> Gang {
    let role = Role::of(plan::layout(&run.spec, stage))[0];
    let pods = plan::pods(&run.spec, role);
    let requests = BTreeMap::from([("cpu".to_string(), pods.cpu.clone()), ("memory".to_string(), pods.memory.clone())]);
    let per_pod = Resources { gpus: pods.gpus, ..resources(Some(&requests)) };
    let min_pods = if role == plan::Role::Gang { run.spec.train.resources.fewest_nodes() } else { pods.count };
    Gang { pods: pods.count, min_pods, per_pod, gpu_type: run.spec.train.resources.gpu_type.clone() }
}

fn run_id(run: &PretrainRun, stage: Stage) -> String {
    format!("{}/{}/{stage}", run.namespace().unwrap_or_default(), run.name_any())
}

/// The run's current stage and its status entry.
fn current(run: &PretrainRun) -> Option<(Stage, &PretrainRunStatus, &StageStatus)> {
    let status = run.status.as_ref()?;
    let stage: Stage = status.stage.as_deref()?.parse().ok()?;
    let entry = status.stages.iter().find(|s| s.name == stage.as_str())?;
    Some((stage, status, entry))
}

/// From when a waiting elastic gang may start on fewer nodes: `shrinkAfterSeconds` after the stage
/// began to wait for this attempt.
fn shrink_from(run: &PretrainRun, stage: Stage, gang: &Gang, now: i64) -> Option<i64> {
    if gang.min_pods >= gang.pods || !stage.is_training() {
        return None;
    }
    let (_, _, entry) = current(run)?;
    let since = entry.time.as_ref().and_then(|t| t.waiting_since.as_deref()).and_then(parse_time).unwrap_or(now);
    Some(since + i64::from(run.spec.train.resources.shrink_after_seconds))
}

/// Where a run stands for the scheduler.
enum Place {
    Waiting { stage: Stage, attempt: u32 },
    Holding { stage: Stage, admission: Admission },
    Elsewhere,
}

fn place(run: &PretrainRun) -> Place {
    if run.spec.scheduling.kueue.is_some() || run.metadata.deletion_timestamp.is_some() {
        return Place::Elsewhere;
    }
    let Some(status) = run.status.as_ref() else { return Place::Elsewhere };
    let Some((stage, _, entry)) = current(run) else { return Place::Elsewhere };
    let (attempts, phase) = (entry.attempts, entry.phase);
    if !needs_admission(&run.spec, stage) {
        return Place::Elsewhere;
    }
    let admission = status.admission.as_ref().filter(|a| a.stage == stage.as_str());
    match (status.phase, phase) {
        // Waiting for its next attempt: never started, stopped, or failed and past its backoff (the
        // reconciler says Queued only once the backoff is over).
        (Some(RunPhase::Queued | RunPhase::Suspended), StagePhase::Pending | StagePhase::Failed)
            if !run.spec.suspend =>
        {
            let attempt = attempts + 1;
            match admission {
                // Admitted, not started yet: it holds its nodes already.
                Some(a) if a.attempt == attempt => Place::Holding { stage, admission: a.clone() },
                _ => Place::Waiting { stage, attempt },
            }
        }
        (_, StagePhase::Running) => match admission {
            Some(a) if a.attempt == attempts => Place::Holding { stage, admission: a.clone() },
            _ => Place::Elsewhere,
        },
        _ => Place::Elsewhere,
    }
}

/// The scheduler's view of the cluster at `now`.
pub fn snapshot(
    runs: &[PretrainRun],
    nodes: &[KubeNode],
    pods: &[Pod],
    queues: &[PretrainQueue],
    now: i64,
) -> Snapshot {
    let mut snapshot = Snapshot::default();
    let gang_pods = gangs(runs, now, &mut snapshot);
    let (held, unbound) = other_pods(pods, &gang_pods);
    snapshot.nodes = free_nodes(nodes, &held);
    reserve_for_unbound(&mut snapshot.nodes, nodes, unbound);
    snapshot.queues = queues_of(queues);
    snapshot
}

/// `(namespace, run, stage, attempt)` of a gang's pods.
type GangKey = (String, String, String, String);

/// The runs' gangs: those that wait for admission (requests) and those that hold theirs (running);
/// returns the keys of the running gangs' pods, which the gangs account for.
fn gangs(runs: &[PretrainRun], now: i64, snapshot: &mut Snapshot) -> BTreeSet<GangKey> {
    let mut gang_pods: BTreeSet<GangKey> = BTreeSet::new();
    for run in runs {
        let queue = run.spec.scheduling.queue.clone();
        let priority = run.spec.scheduling.priority;
        let submitted = run.metadata.creation_timestamp.as_ref().map_or(now, |t| t.0.as_second());
        match place(run) {
            Place::Waiting { stage, .. } => {
                let gang = stage_gang(run, stage);
                snapshot.requests.push(Request {
                    id: run_id(run, stage),
                    queue,
                    priority,
                    submitted,
                    shrink_from: shrink_from(run, stage, &gang, now),
                    gang,
                    expected_seconds: None,
                });
            }
            Place::Holding { stage, admission } => {
                let started = parse_time(&admission.time).unwrap_or(now);
                let checkpoint = run
                    .status
                    .as_ref()
                    .and_then(|s| s.last_checkpoint.as_ref())
                    .filter(|c| c.stage == stage.as_str())
                    .and_then(|c| c.time.as_deref())
                    .and_then(parse_time)
                    .filter(|t| *t >= started);
                // A gang already asked to make room loses nothing more by being chosen again: the
                // pass then picks it first instead of preempting another gang for the same head.
                let leaving = run
                    .status
                    .as_ref()
                    .and_then(|s| s.preemption.as_ref())
                    .is_some_and(|p| p.stage == stage.as_str() && p.attempt == admission.attempt);
                let checkpoint = if leaving { Some(now) } else { checkpoint };
                gang_pods.insert((
                    run.namespace().unwrap_or_default(),
                    run.name_any(),
                    stage.as_str().to_string(),
                    admission.attempt.to_string(),
                ));
                snapshot.running.push(Running {
                    id: run_id(run, stage),
                    queue,
                    priority,
                    gang: stage_gang(run, stage),
                    nodes: admission.nodes.clone(),
                    started,
                    last_checkpoint: checkpoint,
                    preemptible: stage.is_training(),
                    expected_end: None,
                });
            }
            Place::Elsewhere => {}
        }
    }

    gang_pods
}

/// What pods other than the gangs' hold, per node, and the pods not bound to a node yet.
fn other_pods<'a>(
    pods: &'a [Pod],
    gang_pods: &BTreeSet<GangKey>,
) -> (BTreeMap<String, Resources>, Vec<(&'a Pod, Resources)>) {
    // Pods not bound yet hold the node the Kubernetes scheduler nominated for them, or wait to be
    // placed by `reserve_for_unbound`.
    let mut held: BTreeMap<String, Resources> = BTreeMap::new();
    let mut unbound: Vec<(&Pod, Resources)> = Vec::new();
    for pod in pods {
        let Some(spec) = pod.spec.as_ref() else { continue };
        let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
        if matches!(phase, Some("Succeeded" | "Failed")) {
            continue;
        }
        let labels = pod.labels();
        let key = |k: &str| labels.get(k).cloned().unwrap_or_default();
        let member = (pod.namespace().unwrap_or_default(), key(LABEL_RUN), key(LABEL_STAGE), key(LABEL_ATTEMPT));
        if gang_pods.contains(&member) {
            continue;
        }
        let mut wants = Resources::default();
        for c in &spec.containers {
            wants.give(&resources(c.resources.as_ref().and_then(|r| r.requests.as_ref())));
        }
        let nominated = pod.status.as_ref().and_then(|s| s.nominated_node_name.clone());
        match spec.node_name.clone().or(nominated) {
            Some(node) => held.entry(node).or_default().give(&wants),
            None if pod.metadata.deletion_timestamp.is_none() => unbound.push((pod, wants)),
            None => {}
        }
    }

    (held, unbound)
}

/// Each node with what is free on it once `held` is taken, and whether gangs may use it.
fn free_nodes(nodes: &[KubeNode], held: &BTreeMap<String, Resources>) -> Vec<Node> {
    let mut free = Vec::new();
    for node in nodes {
        let name = node.name_any();
        let status = node.status.as_ref();
        let spec = node.spec.as_ref();
        let ready = status
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
        let cordoned = spec.and_then(|s| s.unschedulable).unwrap_or(false);
        // Our GPU pods tolerate the usual `nvidia.com/gpu` taint; any other NoSchedule/NoExecute
        // taint keeps them off the node.
        let tainted = spec.and_then(|s| s.taints.as_ref()).is_some_and(|ts| {
            ts.iter().any(|t| matches!(t.effect.as_str(), "NoSchedule" | "NoExecute") && t.key != GPU_RESOURCE)
        });
        let allocatable = resources(status.and_then(|s| s.allocatable.as_ref()));
        let used = held.get(&name).copied().unwrap_or_default();
        free.push(Node {
            gpu_type: node.labels().get(GPU_PRODUCT_LABEL).cloned(),
            allocatable: allocatable.minus(&used),
            schedulable: ready && !cordoned && !tainted,
            name,
        });
    }
    free
}

// A pending pod of another workload will take a node before a gang admitted now can start
// there: reserve what it asks for where the Kubernetes scheduler would most likely put it, the
// usable node its node selector allows with the most free GPUs, then CPU (its default scoring
// prefers the least allocated node). Pods that fit nowhere hold nothing.
fn reserve_for_unbound(free: &mut [Node], nodes: &[KubeNode], unbound: Vec<(&Pod, Resources)>) {
    for (pod, wants) in unbound {
        let selector = pod.spec.as_ref().and_then(|s| s.node_selector.clone()).unwrap_or_default();
        let fits = |n: &&mut Node| {
            let labels = nodes.iter().find(|k| k.name_any() == n.name).map(|k| k.labels().clone()).unwrap_or_default();
            n.schedulable && wants.fits_in(&n.allocatable) && selector.iter().all(|(k, v)| labels.get(k) == Some(v))
        };
        if let Some(node) = free
            .iter_mut()
            .filter(fits)
            .max_by_key(|n| (n.allocatable.gpus, n.allocatable.cpu_millis, std::cmp::Reverse(n.name.clone())))
        {
            node.allocatable.take(&wants);
        }
    }
}

/// The cluster's queues; until a cluster defines it, the default queue admits by capacity alone.
fn queues_of(queues: &[PretrainQueue]) -> Vec<Queue> {
    let mut out = Vec::new();
    let mut has_default = false;
    for q in queues {
        has_default |= q.name_any() == DEFAULT_QUEUE;
        out.push(Queue { name: q.name_any(), gpu_quota: q.spec.gpu_quota.clone(), borrowing: q.spec.borrowing });
    }
    if !has_default {
        out.push(Queue {
            name: DEFAULT_QUEUE.into(),
            gpu_quota: BTreeMap::from([("*".to_string(), u32::MAX)]),
            borrowing: false,
        });
    }
    out
}

/// A change to one run's status.
#[derive(Debug, Clone, PartialEq)]
pub struct StatusPatch {
    /// Namespace of the run.
    pub namespace: String,
    /// Name of the run.
    pub name: String,
    /// The JSON merge patch for its status subresource (`{"status": {...}}`).
    pub patch: serde_json::Value,
}

/// The status changes `decision` makes, only where the status would change.
pub fn patches(runs: &[PretrainRun], decision: &Decision, now: i64) -> Vec<StatusPatch> {
    let mut out = Vec::new();
    let time = format_time(now);
    for run in runs {
        let status = run.status.clone().unwrap_or_default();
        let mut change = serde_json::Map::new();
        match place(run) {
            Place::Waiting { stage, attempt } => {
                let id = run_id(run, stage);
                if let Some((_, nodes)) = decision.admit.iter().find(|(r, _)| *r == id) {
                    let admission =
                        Admission { stage: stage.as_str().into(), attempt, nodes: nodes.clone(), time: time.clone() };
                    change.insert("admission".into(), serde_json::to_value(admission).expect("serialisable"));
                    // The scheduler wrote why the run waited and its place in line: it clears both
                    // (the reconciler's apply leaves fields another manager owns alone).
                    change.insert("queuePosition".into(), serde_json::Value::Null);
                    change.insert("reason".into(), serde_json::Value::Null);
                } else if let Some(w) = decision.waiting.iter().find(|w| w.id == id) {
                    let reason = format!("{stage}: {}", w.reason);
                    if status.reason.as_deref() != Some(reason.as_str()) {
                        change.insert("reason".into(), reason.into());
                    }
                    if status.queue_position != Some(w.position) {
                        change.insert("queuePosition".into(), w.position.into());
                    }
                }
            }
            Place::Holding { stage, admission } => {
                let id = run_id(run, stage);
                if let Some((_, by)) = decision.preempt.iter().find(|(r, _)| *r == id) {
                    let already = status
                        .preemption
                        .as_ref()
                        .is_some_and(|p| p.stage == stage.as_str() && p.attempt == admission.attempt);
                    if !already {
                        let p = Preemption {
                            stage: stage.as_str().into(),
                            attempt: admission.attempt,
                            by: by.clone(),
                            time: time.clone(),
                        };
                        change.insert("preemption".into(), serde_json::to_value(p).expect("serialisable"));
                    }
                }
            }
            Place::Elsewhere => {}
        }
        if !change.is_empty() {
            out.push(StatusPatch {
                namespace: run.namespace().unwrap_or_default(),
                name: run.name_any(),
                patch: serde_json::json!({ "status": change }),
            });
        }
    }
    out
}

fn per_type_line(map: &BTreeMap<String, u64>) -> Option<String> {
    (!map.is_empty()).then(|| map.iter().map(|(k, v)| format!("{k}: {v}")).collect::<Vec<_>>().join(", "))
}

/// A queue's status after a pass: its quota, the GPUs its running gangs hold (admitted this pass
/// included), and how many of its stages run and wait.
pub fn queue_status(view: &Snapshot, decision: &Decision, spec: &PretrainQueueSpec, name: &str) -> PretrainQueueStatus {
    let mut in_use: BTreeMap<String, u64> = BTreeMap::new();
    let mut running = 0;
    let mut hold = |gang: &Gang| {
        running += 1;
        let kind = gang.gpu_type.clone().unwrap_or_else(|| "*".into());
        *in_use.entry(kind).or_default() += u64::from(gang.pods) * u64::from(gang.per_pod.gpus);
    };
    for r in view.running.iter().filter(|r| r.queue == name) {
        hold(&r.gang);
    }
    let admitted: BTreeSet<&str> = decision.admit.iter().map(|(id, _)| id.as_str()).collect();
    for r in view.requests.iter().filter(|r| r.queue == name && admitted.contains(r.id.as_str())) {
        hold(&r.gang);
    }
    let waiting = view.requests.iter().filter(|r| r.queue == name && !admitted.contains(r.id.as_str())).count();
    let quota: BTreeMap<String, u64> = spec.gpu_quota.iter().map(|(k, v)| (k.clone(), u64::from(*v))).collect();
    PretrainQueueStatus {
        quota: per_type_line(&quota),
        in_use: per_type_line(&in_use),
        running,
        waiting: waiting as u32,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantities_read_as_kubernetes_writes_them() {
        let q = |s: &str| quantity(&Quantity(s.into()));
        assert_eq!(q("500m"), Some(0.5));
        assert_eq!(q("4"), Some(4.0));
        assert_eq!(q("16Gi"), Some(16.0 * 1024f64.powi(3)));
        assert_eq!(q("1.5G"), Some(1.5e9));
        assert_eq!(q("1e3"), Some(1000.0));
        assert_eq!(q("12x"), None);
    }
}
