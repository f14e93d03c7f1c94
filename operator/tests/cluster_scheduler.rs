//! The cluster scheduler's bridge (`schedule::cluster`), pure: PretrainRuns, Nodes, Pods and
//! PretrainQueues as the API server returns them become the scheduler's inputs, and its decision
//! becomes admission, preemption and why-pending status patches.

use k8s_openapi::api::core::v1::{Node, Pod};
use pretrain_crd::{PretrainQueue, PretrainRun};
use pretrain_operator::schedule::cluster::{patches, queue_status, snapshot};
use pretrain_operator::schedule::{Policy, schedule};
use serde_json::{Value, json};

const H100: &str = "NVIDIA-H100-80GB-HBM3";
const NOW: i64 = 1_800_000_000;

fn node(name: &str, gpus: u32, ready: bool, cordoned: bool) -> Node {
    serde_json::from_value(json!({
        "metadata": {"name": name, "labels": {"nvidia.com/gpu.product": H100}},
        "spec": {"unschedulable": cordoned, "taints": [{"key": "nvidia.com/gpu", "effect": "NoSchedule"}]},
        "status": {
            "allocatable": {"nvidia.com/gpu": gpus.to_string(), "cpu": "96", "memory": "1Ti"},
            "conditions": [{"type": "Ready", "status": if ready { "True" } else { "False" }}]
        }
    }))
    .unwrap()
}

fn pod(name: &str, node: &str, gpus: u32, labels: &Value, phase: &str) -> Pod {
    serde_json::from_value(json!({
        "metadata": {"name": name, "namespace": "ml", "labels": labels},
        "spec": {"nodeName": node, "containers": [{"name": "c", "resources": {"requests": {
            "nvidia.com/gpu": gpus.to_string(), "cpu": "8", "memory": "64Gi"}}}]},
        "status": {"phase": phase}
    }))
    .unwrap()
}

/// A run in namespace `ml` whose train stage (`nodes` x 8 GPUs) is in `status`.
fn run(name: &str, nodes: u32, priority: i32, created: &str, status: &Value) -> PretrainRun {
    serde_json::from_value(json!({
        "apiVersion": "pretrain.dev/v1alpha1", "kind": "PretrainRun",
        "metadata": {"name": name, "namespace": "ml", "creationTimestamp": created},
        "spec": {
            "storage": {"url": "s3://bucket/runs"},
            "data": {"sources": [{"name": "web", "url": "s3://bucket/raw/*.warc.gz"}]},
            "model": {"preset": "llama-1b"},
            "train": {"resources": {"nodes": nodes, "gpusPerNode": 8, "gpuType": H100, "cpu": "32", "memory": "256Gi"}},
            "scheduling": {"queue": "research", "priority": priority}
        },
        "status": status
    }))
    .unwrap()
}

fn queued() -> Value {
    json!({"phase": "Queued", "stage": "train", "stages": [{"name": "train", "phase": "Pending", "attempts": 0}]})
}

fn running(attempt: u32, since: &str) -> Value {
    json!({
        "phase": "Running", "stage": "train",
        "stages": [{"name": "train", "phase": "Running", "attempts": attempt}],
        "admission": {"stage": "train", "attempt": attempt, "nodes": ["a", "b"], "time": since}
    })
}

fn queue(quota: u32) -> PretrainQueue {
    serde_json::from_value(json!({
        "apiVersion": "pretrain.dev/v1alpha1", "kind": "PretrainQueue",
        "metadata": {"name": "research"},
        "spec": {"gpuQuota": {H100: quota}}
    }))
    .unwrap()
}

#[test]
fn capacity_counts_other_pods_but_not_the_gangs_own_and_skips_unusable_nodes() {
    let nodes =
        [node("a", 8, true, false), node("b", 8, true, false), node("c", 8, false, false), node("d", 8, true, true)];
    let gang = json!({"pretrain.dev/run": "big", "pretrain.dev/stage": "train", "pretrain.dev/attempt": "1"});
    let pods = [
        pod("big-train-gang-1-0", "a", 8, &gang, "Running"),
        pod("notebook", "b", 2, &json!({}), "Running"),
        pod("finished", "b", 4, &json!({}), "Succeeded"),
    ];
    let runs = [run("big", 1, 0, "2026-01-01T00:00:00Z", &running(1, "2026-01-01T01:00:00Z"))];
    let view = snapshot(&runs, &nodes, &pods, &[queue(64)], NOW);
    let free: Vec<(String, u32, bool)> =
        view.nodes.iter().map(|n| (n.name.clone(), n.allocatable.gpus, n.schedulable)).collect();
    // The gang's pod on a is the gang's to account for; the notebook holds 2 GPUs of b.
    assert_eq!(free, [("a".into(), 8, true), ("b".into(), 6, true), ("c".into(), 8, false), ("d".into(), 8, false)]);
    assert_eq!(view.running.len(), 1);
    assert_eq!(view.running[0].nodes, ["a", "b"]);
    assert_eq!(view.running[0].gang.pods, 1);
    assert!(view.running[0].preemptible);
    assert!(view.requests.is_empty());
}

#[test]
fn pending_pods_of_other_workloads_hold_the_node_they_will_take() {
    let nodes = [node("a", 8, true, false), node("b", 8, true, false), node("e", 8, true, false)];
    let pending = |name: &str, gpus: u32, extra: Value| {
        let mut value = serde_json::to_value(pod(name, "", gpus, &json!({}), "Pending")).unwrap();
        value["spec"].as_object_mut().unwrap().remove("nodeName");
        for (k, v) in extra.as_object().unwrap() {
            value[k.split('.').next().unwrap()][k.split('.').nth(1).unwrap()] = v.clone();
        }
        serde_json::from_value::<Pod>(value).unwrap()
    };
    let pods = [
        pod("notebook", "a", 2, &json!({}), "Running"),
        // The Kubernetes scheduler nominated b for this one (it preempts there).
        pending("nominated", 4, json!({"status.nominatedNodeName": "b"})),
        // Not placed yet: it goes where most GPUs are free, e (8), before a (6) and b (4).
        pending("waiting", 8, json!({})),
        // Its selector matches no node: it holds nothing.
        pending("nowhere", 1, json!({"spec.nodeSelector": {"pool": "other"}})),
    ];
    let view = snapshot(&[], &nodes, &pods, &[queue(64)], NOW);
    let free: Vec<(String, u32)> = view.nodes.iter().map(|n| (n.name.clone(), n.allocatable.gpus)).collect();
    assert_eq!(free, [("a".into(), 6), ("b".into(), 4), ("e".into(), 0)]);
}

#[test]
fn a_gang_that_failed_is_admitted_again_once_its_backoff_is_over() {
    let nodes = [node("a", 8, true, false), node("b", 8, true, false)];
    // After its backoff the reconciler says Queued; the stage is still Failed until attempt 2 starts.
    let failed = json!({
        "phase": "Queued", "stage": "train",
        "stages": [{"name": "train", "phase": "Failed", "attempts": 1, "failures": 1}],
        "admission": {"stage": "train", "attempt": 1, "nodes": ["a", "b"], "time": "2026-01-01T00:00:00Z"}
    });
    let runs = [run("again", 2, 0, "2026-01-01T00:00:00Z", &failed)];
    let view = snapshot(&runs, &nodes, &[], &[queue(64)], NOW);
    assert_eq!(view.requests.iter().map(|r| r.id.as_str()).collect::<Vec<_>>(), ["ml/again/train"]);
    let decision = schedule(&view.nodes, &view.running, &view.queues, &view.requests, NOW, Policy::default());
    let changes = patches(&runs, &decision, NOW);
    assert_eq!(changes[0].patch["status"]["admission"]["attempt"], 2, "{changes:?}");
    // During the backoff (phase Pending) it is not a request yet.
    let mut backoff = failed;
    backoff["phase"] = "Pending".into();
    let view = snapshot(&[run("again", 2, 0, "2026-01-01T00:00:00Z", &backoff)], &nodes, &[], &[queue(64)], NOW);
    assert!(view.requests.is_empty());
}

#[test]
fn a_queued_gang_that_fits_is_admitted_on_nodes_and_one_that_does_not_learns_why() {
    let nodes = [node("a", 8, true, false), node("b", 8, true, false), node("c", 8, true, false)];
    let runs = [
        run("first", 2, 0, "2026-01-01T00:00:00Z", &queued()),
        run("second", 2, 0, "2026-01-01T00:05:00Z", &queued()),
        // Handed to Kueue: not ours to admit.
        {
            let mut r = run("kueued", 1, 0, "2026-01-01T00:00:00Z", &queued());
            r.spec.scheduling.kueue = Some(pretrain_crd::spec::Kueue { queue_name: "team".into() });
            r
        },
    ];
    let queues = [queue(64)];
    let view = snapshot(&runs, &nodes, &[], &queues, NOW);
    assert_eq!(view.requests.iter().map(|r| r.id.as_str()).collect::<Vec<_>>(), ["ml/first/train", "ml/second/train"]);
    let decision = schedule(&view.nodes, &view.running, &view.queues, &view.requests, NOW, Policy::default());
    let changes = patches(&runs, &decision, NOW);
    assert_eq!(changes.len(), 2, "{changes:?}");
    assert_eq!(changes[0].name, "first");
    let admission = &changes[0].patch["status"]["admission"];
    assert_eq!(admission["stage"], "train");
    assert_eq!(admission["attempt"], 1);
    assert_eq!(admission["nodes"].as_array().unwrap().len(), 2);
    // Why it waited goes with the admission (a stale "needs 2 nodes ..." stayed while it ran).
    assert_eq!(changes[0].patch["status"]["reason"], serde_json::Value::Null);
    assert!(changes[0].patch["status"].as_object().unwrap().contains_key("reason"));
    assert_eq!(changes[1].name, "second");
    let reason = changes[1].patch["status"]["reason"].as_str().unwrap();
    assert!(reason.starts_with("train: needs 2 nodes x 8 GPUs of type NVIDIA-H100-80GB-HBM3, 1 free"), "{reason}");
    assert_eq!(changes[1].patch["status"]["queuePosition"], 0);

    // The queue's status counts the admitted gang as running.
    let status = queue_status(&view, &decision, &queues[0].spec, "research");
    assert_eq!(status.in_use.as_deref(), Some("NVIDIA-H100-80GB-HBM3: 16"));
    assert_eq!((status.running, status.waiting), (1, 1));

    // The next pass, with the admission written: first holds its nodes, second still waits and
    // nothing changes.
    let mut runs = runs;
    let mut first = runs[0].status.clone().unwrap();
    first.admission = serde_json::from_value(admission.clone()).unwrap();
    runs[0].status = Some(first);
    runs[1].status.as_mut().unwrap().reason = Some(reason.to_string());
    runs[1].status.as_mut().unwrap().queue_position = Some(0);
    let view = snapshot(&runs, &nodes, &[], &queues, NOW + 5);
    assert_eq!(view.running.len(), 1);
    let decision = schedule(&view.nodes, &view.running, &view.queues, &view.requests, NOW + 5, Policy::default());
    assert!(patches(&runs, &decision, NOW + 5).is_empty());
}

#[test]
fn a_higher_priority_gang_preempts_the_cheapest_running_one_once() {
    let nodes = [node("a", 8, true, false), node("b", 8, true, false)];
    let long_ago = "2026-01-01T00:00:00Z";
    let mut low = running(3, long_ago);
    low["lastCheckpoint"] = json!({"stage": "train", "step": 100, "tokens": 1, "url": "s3://x", "time": long_ago});
    let runs = [run("low", 2, 0, long_ago, &low), run("urgent", 2, 100, "2027-01-01T00:00:00Z", &queued())];
    let view = snapshot(&runs, &nodes, &[], &[queue(64)], NOW);
    let decision = schedule(&view.nodes, &view.running, &view.queues, &view.requests, NOW, Policy::default());
    let changes = patches(&runs, &decision, NOW);
    let low_patch = changes.iter().find(|c| c.name == "low").expect("the low-priority run is preempted");
    assert_eq!(low_patch.patch["status"]["preemption"]["by"], "ml/urgent/train");
    assert_eq!(low_patch.patch["status"]["preemption"]["attempt"], 3);
    let urgent = changes.iter().find(|c| c.name == "urgent").unwrap();
    assert!(urgent.patch["status"]["reason"].as_str().unwrap().contains("preempting ml/low/train"));

    // Asked once: the next pass does not ask again.
    let mut runs = runs;
    runs[0].status.as_mut().unwrap().preemption =
        serde_json::from_value(low_patch.patch["status"]["preemption"].clone()).unwrap();
    let view = snapshot(&runs, &nodes, &[], &[queue(64)], NOW + 5);
    let decision = schedule(&view.nodes, &view.running, &view.queues, &view.requests, NOW + 5, Policy::default());
    assert!(patches(&runs, &decision, NOW + 5).iter().all(|c| c.name != "low"));
}

#[test]
fn a_queue_over_its_quota_waits_and_the_default_queue_exists_implicitly() {
    let nodes = [node("a", 8, true, false), node("b", 8, true, false)];
    let runs = [run("first", 2, 0, "2026-01-01T00:00:00Z", &queued())];
    let view = snapshot(&runs, &nodes, &[], &[queue(8)], NOW);
    let decision = schedule(&view.nodes, &view.running, &view.queues, &view.requests, NOW, Policy::default());
    let reason = patches(&runs, &decision, NOW)[0].patch["status"]["reason"].as_str().unwrap().to_string();
    assert!(reason.contains("queue research holds 0 of its 8 GPUs"), "{reason}");

    let mut defaulted = run("d", 1, 0, "2026-01-01T00:00:00Z", &queued());
    defaulted.spec.scheduling.queue = "default".into();
    let view = snapshot(&[defaulted], &nodes, &[], &[], NOW);
    let decision = schedule(&view.nodes, &view.running, &view.queues, &view.requests, NOW, Policy::default());
    assert_eq!(decision.admit.len(), 1, "{decision:?}");
}
