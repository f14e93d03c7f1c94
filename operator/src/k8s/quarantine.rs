//! Bad-node quarantine. A training attempt that failed because of its node (a worker that exited
//! with [`exit::DEVICE`]: a CUDA Xid or ECC error, an NCCL system error, a GPU that would not start;
//! a pod lost with its NotReady node; or a rank that stalled a collective, which the ranks that
//! waited on it name) is counted against that node, in the node's own annotation
//! `pretrain.dev/failures` (one entry per attempt, so a failed Job seen by many reconciles counts
//! once). A node with `failures` such entries within `window` is quarantined: tainted
//! `pretrain.dev/quarantined:NoSchedule` (the cluster scheduler and kube-scheduler keep our pods
//! off it), cordoned too when the operator is asked to, annotated with when and why, and an Event
//! says so. An admin clears it by removing the taint (`kubectl taint nodes NODE
//! pretrain.dev/quarantined-`, and `kubectl uncordon NODE` if it was cordoned); failures before the
//! quarantine no longer count.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Node, Pod, Taint};
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::events::{Event, EventType, Recorder};
use kube::{Client, Resource, ResourceExt};
use pretrain_crd::contract::exit;
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::observe::{self, PodContext};
use crate::labels::{ANNOTATION_COMPLETION_INDEX, GPU_RESOURCE};

/// The annotation holding a node's failures.
pub const ANNOTATION_FAILURES: &str = "pretrain.dev/failures";
/// The annotation saying when (Unix seconds) and why the node was quarantined.
pub const ANNOTATION_QUARANTINED: &str = "pretrain.dev/quarantined";
/// The taint that keeps pods off a quarantined node.
pub const TAINT: &str = "pretrain.dev/quarantined";
/// Entries kept per node (the newest).
const KEPT: usize = 20;

/// When a node is quarantined.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    /// Failures within `window_seconds` that quarantine a node (0: never).
    pub failures: usize,
    /// The window, in seconds.
    pub window_seconds: i64,
    /// Also cordon the node (`spec.unschedulable`), so that nothing else is scheduled there.
    pub cordon: bool,
}

impl Default for Policy {
    fn default() -> Self {
        Self { failures: 3, window_seconds: 24 * 3600, cordon: false }
    }
}

/// A failure of an attempt that points at its node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeFailure {
    /// Unix seconds it was recorded.
    pub at: i64,
    /// The attempt: `NAMESPACE/RUN/STAGE/ATTEMPT`.
    pub attempt: String,
    /// What failed.
    pub reason: String,
}

/// The nodes that failed the pods of one ended attempt, with why: a worker that exited with
/// [`exit::DEVICE`], a pod lost with its node, or a pod whose rank stalled a collective
/// ([`stalled_pods`]).
pub fn node_failures(pods: &[Pod], cluster: &PodContext) -> Vec<(String, String)> {
    let mut found: Vec<(String, String)> = Vec::new();
    let mut add = |node: String, why: String| {
        if !found.iter().any(|(n, _)| *n == node) {
            found.push((node, why));
        }
    };
    for pod in pods {
        let Some(node) = pod.spec.as_ref().and_then(|s| s.node_name.clone()) else { continue };
        match observe::worker_exit(pod) {
            Some(t) if t.exit_code == exit::DEVICE => {
                let last = observe::last_line(t).map_or("no message", str::trim);
                add(node, format!("pod {}: device failure: {last}", pod.name_any()));
            }
            None if cluster.lost(pod) && cluster.unready_nodes.contains(&node) => {
                add(node, format!("pod {}: lost with its NotReady node", pod.name_any()));
            }
            _ => {}
        }
    }
    for (pod, waited) in stalled_pods(pods) {
        let Some(node) = pod.spec.as_ref().and_then(|s| s.node_name.clone()) else { continue };
        add(
            node,
            format!("pod {}: stalled a collective (its peers in {} waited for it)", pod.name_any(), waited.join(", ")),
        );
    }
    found
}

/// The pods of a gang whose rank stalled a collective, each with the pods that waited for it. A rank
/// that waits past the collective timeout exits with [`exit::PEER_LOST`], naming the rank it waited
/// for (`rank N: nothing for 600 s`). Each rank waits for its predecessor, so when one stalls, the
/// ranks after it name their own predecessors in turn: the culprit is the named rank whose pod did
/// not itself report waiting. (NCCL's watchdog cannot name the rank; those stalls are not counted.)
pub fn stalled_pods(pods: &[Pod]) -> Vec<(&Pod, Vec<String>)> {
    let index = |pod: &Pod| pod.metadata.annotations.as_ref()?.get(ANNOTATION_COMPLETION_INDEX)?.parse::<u32>().ok();
    let gpus = |pod: &Pod| {
        let limits = pod.spec.as_ref()?.containers.first()?.resources.as_ref()?.limits.as_ref()?;
        limits.get(GPU_RESOURCE)?.0.parse::<u32>().ok()
    };
    let mut waited: BTreeMap<u32, Vec<String>> = BTreeMap::new();
    let mut waiting: Vec<u32> = Vec::new();
    for pod in pods {
        let Some(t) = observe::worker_exit(pod).filter(|t| t.exit_code == exit::PEER_LOST) else { continue };
        let (Some(own), Some(rank)) = (index(pod), observe::last_line(t).and_then(stalled_rank)) else { continue };
        waiting.push(own);
        // Ranks are pods on CPUs, and node x GPUs + GPU with several GPUs per pod.
        let named = rank / gpus(pod).unwrap_or(1).max(1);
        waited.entry(named).or_default().push(pod.name_any());
    }
    waited
        .into_iter()
        .filter(|(named, _)| !waiting.contains(named))
        .filter_map(|(named, by)| Some((pods.iter().find(|p| index(p) == Some(named))?, by)))
        .collect()
}

/// The rank a collective waited for, from a worker's last line: `... rank N: nothing for ...`.
fn stalled_rank(line: &str) -> Option<u32> {
    let before = &line[..line.find(": nothing for ")?];
    let number = before.rsplit("rank ").next()?;
    number.parse().ok()
}

/// A node's record, read from its annotations.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Record {
    /// Its failures, oldest first.
    pub failures: Vec<NodeFailure>,
    /// When it was last quarantined (Unix seconds).
    pub quarantined_at: Option<i64>,
}

impl Record {
    /// The record in `node`'s annotations (malformed ones read as empty).
    pub fn of(node: &Node) -> Self {
        let annotations = node.metadata.annotations.as_ref();
        let get = |key: &str| annotations.and_then(|a| a.get(key));
        let failures = get(ANNOTATION_FAILURES).and_then(|v| serde_json::from_str(v).ok()).unwrap_or_default();
        let quarantined_at = get(ANNOTATION_QUARANTINED)
            .and_then(|v| serde_json::from_str::<serde_json::Value>(v).ok())
            .and_then(|v| v["at"].as_i64());
        Self { failures, quarantined_at }
    }

    /// Adds `failure` unless its attempt is recorded already; whether it was added.
    pub fn add(&mut self, failure: NodeFailure) -> bool {
        if self.failures.iter().any(|f| f.attempt == failure.attempt) {
            return false;
        }
        self.failures.push(failure);
        let extra = self.failures.len().saturating_sub(KEPT);
        self.failures.drain(..extra);
        true
    }

    /// The failures that count at `now`: within the window, and after the last quarantine.
    pub fn counted(&self, now: i64, policy: &Policy) -> Vec<&NodeFailure> {
        let since = (now - policy.window_seconds).max(self.quarantined_at.map_or(i64::MIN, |q| q + 1));
        self.failures.iter().filter(|f| f.at >= since).collect()
    }

    /// Why the node is to be quarantined at `now`, if it is.
    pub fn verdict(&self, now: i64, policy: &Policy) -> Option<String> {
        let counted = self.counted(now, policy);
        if policy.failures == 0 || counted.len() < policy.failures {
            return None;
        }
        let attempts: Vec<&str> = counted.iter().map(|f| f.attempt.as_str()).collect();
        Some(format!(
            "{} failed attempts within {}: {}; last: {}",
            counted.len(),
            pretrain_crd::display::duration(policy.window_seconds.max(0) as u64),
            attempts.join(", "),
            counted.last().map_or("", |f| f.reason.as_str())
        ))
    }
}

/// Whether `node` carries the quarantine taint.
pub fn tainted(node: &Node) -> bool {
    node.spec.as_ref().and_then(|s| s.taints.as_ref()).is_some_and(|ts| ts.iter().any(|t| t.key == TAINT))
}

/// Records that `attempt` failed on `node` because of `reason` at `now`, and quarantines the node
/// when that makes too many. The write carries the node's resourceVersion: a node changed since it
/// was read refuses it, and the next reconcile (which sees the attempt again) tries again.
pub async fn record(
    client: &Client,
    recorder: &Recorder,
    policy: &Policy,
    node_name: &str,
    failure: NodeFailure,
) -> Result<(), kube::Error> {
    let nodes: Api<Node> = Api::all(client.clone());
    let Some(node) = nodes.get_opt(node_name).await? else { return Ok(()) };
    let mut record = Record::of(&node);
    let now = failure.at;
    if !record.add(failure) {
        return Ok(());
    }
    let mut annotations: BTreeMap<String, String> = BTreeMap::new();
    annotations
        .insert(ANNOTATION_FAILURES.into(), serde_json::to_string(&record.failures).expect("failures serialise"));
    let mut spec = serde_json::Map::new();
    let verdict = record.verdict(now, policy).filter(|_| !tainted(&node));
    if let Some(why) = &verdict {
        annotations.insert(ANNOTATION_QUARANTINED.into(), json!({"at": now, "reason": why}).to_string());
        let mut taints: Vec<Taint> = node.spec.as_ref().and_then(|s| s.taints.clone()).unwrap_or_default();
        taints.push(Taint { key: TAINT.into(), value: None, effect: "NoSchedule".into(), time_added: None });
        spec.insert("taints".into(), serde_json::to_value(&taints).expect("taints serialise"));
        if policy.cordon {
            spec.insert("unschedulable".into(), json!(true));
        }
    }
    let mut patch = json!({"metadata": {"annotations": annotations, "resourceVersion": node.resource_version()}});
    if !spec.is_empty() {
        patch["spec"] = serde_json::Value::Object(spec);
    }
    nodes.patch(node_name, &PatchParams::default(), &Patch::Merge(&patch)).await?;
    if let Some(why) = verdict {
        tracing::warn!(node = node_name, reason = %why, "node quarantined");
        let event = Event {
            type_: EventType::Warning,
            reason: "Quarantined".into(),
            note: Some(format!("pretrain quarantined node {node_name}: {why}").chars().take(1000).collect()),
            action: "Quarantine".into(),
            secondary: None,
        };
        if let Err(e) = recorder.publish(&event, &node.object_ref(&())).await {
            tracing::warn!(node = node_name, error = %e, "quarantine event not published");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn failure(at: i64, attempt: &str) -> NodeFailure {
        NodeFailure { at, attempt: attempt.into(), reason: "Xid 79".into() }
    }

    /// Pod `index` of a gang on `node`, ended with `code` and `message`.
    fn ranked(index: u32, node: &str, code: i32, message: &str) -> Pod {
        let annotations = BTreeMap::from([(ANNOTATION_COMPLETION_INDEX, index.to_string())]);
        serde_json::from_value(json!({
            "metadata": {"name": format!("r-train-3-{index}"), "annotations": annotations},
            "spec": {"nodeName": node, "containers": [{"name": "worker", "resources": {"limits": {"nvidia.com/gpu": "1"}}}]},
            "status": {"phase": "Failed", "containerStatuses": [{"name": "worker", "image": "w", "imageID": "", "ready": false, "restartCount": 0,
                "state": {"terminated": {"exitCode": code, "message": message}}}]}
        }))
        .unwrap()
    }

    #[test]
    fn the_rank_that_stalled_a_collective_is_the_one_named_that_did_not_wait_itself() {
        let waited = |n: u32| {
            format!(
                "train: all-reduce #41: rank {n}: nothing for 600 s (stalled or unreachable; PRETRAIN_COLLECTIVE_TIMEOUT sets the limit)"
            )
        };
        // Rank 1 hung: 2 waited for it, 3 for 2; 0 lost its peers when they exited; 1 was killed.
        let pods = vec![
            ranked(0, "n0", exit::PEER_LOST, "rank 0: rank 2 is gone (closed its connection without finishing)"),
            ranked(1, "n1", 137, ""),
            ranked(2, "n2", exit::PEER_LOST, &waited(1)),
            ranked(3, "n3", exit::PEER_LOST, &waited(2)),
        ];
        let failures = node_failures(&pods, &PodContext::default());
        assert_eq!(failures.len(), 1, "{failures:?}");
        assert_eq!(failures[0].0, "n1");
        assert!(
            failures[0].1.contains("pod r-train-3-1: stalled a collective (its peers in r-train-3-2 waited for it)"),
            "{failures:?}"
        );
        // Ranks that lost a peer that exited are not stalls.
        let crashed = vec![ranked(0, "n0", exit::PEER_LOST, "rank 0: rank 1 is gone"), ranked(1, "n1", 1, "boom")];
        assert!(node_failures(&crashed, &PodContext::default()).is_empty());
        assert_eq!(stalled_rank("x: broadcast #3: rank 12: nothing for 5 s"), Some(12));
        assert_eq!(stalled_rank("rank 3: connection lost"), None);
    }

    #[test]
    fn a_node_is_judged_by_distinct_attempts_in_the_window_since_its_last_quarantine() {
        let policy = Policy { failures: 3, window_seconds: 3600, cordon: false };
        let mut r = Record::default();
        assert!(r.add(failure(100, "ns/a/train/1")));
        assert!(!r.add(failure(160, "ns/a/train/1")), "one attempt counts once");
        assert!(r.add(failure(200, "ns/a/train/2")));
        assert_eq!(r.verdict(300, &policy), None);
        assert!(r.add(failure(300, "ns/b/train/1")));
        let why = r.verdict(300, &policy).unwrap();
        assert!(
            why.starts_with("3 failed attempts within 1h00m: ns/a/train/1, ns/a/train/2, ns/b/train/1; last: Xid 79"),
            "{why}"
        );
        // An hour later the first has left the window.
        assert_eq!(r.verdict(100 + 3601, &policy), None);
        // After a quarantine (cleared by an admin), earlier failures no longer count.
        r.quarantined_at = Some(300);
        assert_eq!(r.counted(400, &policy).len(), 0);
        assert_eq!(r.verdict(300, &Policy { failures: 0, ..policy }), None, "0 never quarantines");
        for i in 0..30 {
            r.add(failure(400 + i, &format!("ns/c/train/{i}")));
        }
        assert_eq!(r.failures.len(), KEPT);
        assert_eq!(r.failures[0].attempt, "ns/c/train/10");
    }
}
