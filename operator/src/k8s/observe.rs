//! Reading the cluster and the store into the planner's terms: a Job (and, when it failed, its pods)
//! into a [`JobView`]; a run's store into the stages committed for its spec and its newest checkpoint.

use std::collections::BTreeSet;

use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{ContainerStateTerminated, Pod};
use pretrain_crd::contract::exit;
use pretrain_crd::status::CheckpointStatus;
use pretrain_crd::{PretrainRunSpec, Stage};
use pretrain_store::Store;

use crate::labels::{ANNOTATION_CONFIG_HASH, LABEL_ATTEMPT, LABEL_ROLE, LABEL_STAGE};
use crate::plan::Role;
use crate::plan::cluster::{Failure, JobState, JobView, LivePod};

/// The label Kubernetes puts on a Job's pods.
pub const LABEL_JOB_NAME: &str = "batch.kubernetes.io/job-name";

/// Whether the Job ended: `Some(true)` complete, `Some(false)` failed, `None` still going.
pub fn job_outcome(job: &Job) -> Option<bool> {
    let status = job.status.as_ref()?;
    let condition = |kind: &str| status.conditions.iter().flatten().any(|c| c.type_ == kind && c.status == "True");
    if condition("Complete") || condition("SuccessCriteriaMet") {
        Some(true)
    } else if condition("Failed") || condition("FailureTarget") {
        Some(false)
    } else {
        None
    }
}

/// What the cluster says about where the run's pods are, beyond the pods themselves.
#[derive(Debug, Clone, Default)]
pub struct PodContext {
    /// Nodes whose `Ready` condition is not True (unreachable or failing): a deleted pod on one of
    /// them cannot be stopped or heard from, so it is lost with its node.
    pub unready_nodes: BTreeSet<String>,
    /// Now, in Unix seconds.
    pub now: i64,
}

impl PodContext {
    /// Whether `pod` has stopped for good: it finished (Succeeded or Failed); or it was deleted
    /// and either its grace period is over (its kubelet would have killed it, so one still listed
    /// has lost its node) or its node is not Ready (the kubelet that would stop it is unreachable).
    /// Until then a deleted pod may still be writing its SIGTERM checkpoint.
    pub fn settled(&self, pod: &Pod) -> bool {
        terminated(pod) || self.lost(pod)
    }

    /// Whether `pod` was deleted and will never report back (see [`PodContext::settled`]).
    pub fn lost(&self, pod: &Pod) -> bool {
        let Some(deleted) = pod.metadata.deletion_timestamp.as_ref() else { return false };
        // The API server sets deletionTimestamp to the request time plus the grace period.
        let overdue = deleted.0.as_second() + POD_STOP_SLACK_SECONDS < self.now;
        let node = pod.spec.as_ref().and_then(|s| s.node_name.as_deref());
        overdue || node.is_some_and(|n| self.unready_nodes.contains(n))
    }
}

/// Seconds past a deleted pod's grace period after which a pod still listed counts as lost.
const POD_STOP_SLACK_SECONDS: i64 = 10;

/// The stage and attempt of one of the run's pods that has not settled.
pub fn live_pod(pod: &Pod) -> Option<LivePod> {
    let labels = pod.metadata.labels.as_ref()?;
    Some(LivePod { stage: labels.get(LABEL_STAGE)?.parse().ok()?, attempt: labels.get(LABEL_ATTEMPT)?.parse().ok()? })
}

/// The planner's view of one of our Jobs, from the Job and its pods. `None` for a Job without our
/// labels. A failed Job is reported failed only once all its pods have settled: until then its
/// pods may still be checkpointing, and how they end says why it failed.
pub fn job_view(job: &Job, spec: &PretrainRunSpec, pods: &[Pod], cluster: &PodContext) -> Option<JobView> {
    let labels = job.metadata.labels.as_ref()?;
    let stage: Stage = labels.get(LABEL_STAGE)?.parse().ok()?;
    let role = match labels.get(LABEL_ROLE)?.as_str() {
        "map" => Role::Map,
        "dedup" => Role::Dedup,
        "cluster" => Role::Cluster,
        "embed" => Role::Embed,
        "order" => Role::Order,
        "route" => Role::Route,
        "write" => Role::Write,
        "reduce" => Role::Reduce,
        "gang" => Role::Gang,
        "single" => Role::Single,
        _ => return None,
    };
    let attempt = labels.get(LABEL_ATTEMPT)?.parse().ok()?;
    let hash = job.metadata.annotations.as_ref().and_then(|a| a.get(ANNOTATION_CONFIG_HASH));
    let current_spec = hash.is_some_and(|h| *h == spec.stage_config_hash(stage));
    let suspended = job.spec.as_ref().and_then(|s| s.suspend).unwrap_or(false);
    let lost = pods.iter().find(|p| cluster.lost(p) && !terminated(p));
    let state = match job_outcome(job) {
        None if suspended => JobState::Suspended,
        None => match lost {
            Some(pod) => JobState::Lost(lost_with_node(pod)),
            None => JobState::Active,
        },
        Some(true) => JobState::Succeeded,
        Some(false) if pods.iter().any(|p| !cluster.settled(p)) => JobState::Active,
        Some(false) => {
            let expected = job.spec.as_ref().and_then(|s| s.parallelism).unwrap_or(1).max(0) as usize;
            JobState::Failed(classify(pods, expected, job_failure(job), cluster))
        }
    };
    let tasks = role.is_task().then(|| {
        let count = |n: Option<i32>| n.unwrap_or(0).max(0) as u32;
        (count(job.status.as_ref().and_then(|s| s.succeeded)), count(job.spec.as_ref().and_then(|s| s.completions)))
    });
    Some(JobView { stage, role, attempt, current_spec, state, tasks })
}

/// The message of a failed Job's `Failed` condition when its pod failure policy failed it because a
/// pod was disrupted (`DisruptionTarget`).
fn job_failure(job: &Job) -> Option<String> {
    let conditions = job.status.as_ref()?.conditions.as_ref()?;
    let failed =
        conditions.iter().find(|c| matches!(c.type_.as_str(), "Failed" | "FailureTarget") && c.status == "True")?;
    let message = failed.message.clone()?;
    (failed.reason.as_deref() == Some("PodFailurePolicy") && message.contains("DisruptionTarget")).then_some(message)
}

/// How the pod's worker container ended, if it did.
pub fn worker_exit(pod: &Pod) -> Option<&ContainerStateTerminated> {
    let statuses = pod.status.as_ref()?.container_statuses.as_ref()?;
    statuses.iter().find(|c| c.name == "worker")?.state.as_ref()?.terminated.as_ref()
}

/// The last line of what an ended container said (its termination message), blank lines skipped.
pub fn last_line(ended: &ContainerStateTerminated) -> Option<&str> {
    ended.message.as_deref()?.lines().rev().find(|l| !l.trim().is_empty())
}

/// Whether the pod reached a terminal phase (it said how it ended).
fn terminated(pod: &Pod) -> bool {
    matches!(pod.status.as_ref().and_then(|s| s.phase.as_deref()), Some("Succeeded" | "Failed"))
}

fn lost_with_node(pod: &Pod) -> String {
    let name = pod.metadata.name.as_deref().unwrap_or("?");
    let node = pod.spec.as_ref().and_then(|s| s.node_name.as_deref()).unwrap_or("?");
    format!("pod {name} was lost with its node {node}")
}

/// The `DisruptionTarget` condition of a pod the cluster ended (evicted, preempted, deleted by the
/// taint manager or the pod garbage collector), as one line.
fn disruption(pod: &Pod) -> Option<String> {
    let conditions = pod.status.as_ref()?.conditions.as_ref()?;
    let c = conditions.iter().find(|c| c.type_ == "DisruptionTarget" && c.status == "True")?;
    let why: Vec<&str> = [c.reason.as_deref(), c.message.as_deref()].into_iter().flatten().collect();
    Some(if why.is_empty() { "DisruptionTarget".into() } else { why.join(": ") })
}

/// How a failed Job's pods ended (`expected` pods ran; `job_failure`, the Job's own reason when its
/// pod failure policy saw a disruption). In order of precedence:
/// - an exit code for invalid input or a worker without the stage (2, 3): permanent;
/// - any other failure of a pod the cluster left alone (a crash, OOM, a kubelet eviction without
///   `DisruptionTarget`): retried, counting against the budget;
/// - a pod the cluster disrupted (`DisruptionTarget`, a Job failed by that rule, a deleted pod lost
///   with its node, or a pod that is gone): a disruption, not counted;
/// - a rank that stopped because a peer died (76), when nothing above explains it: retried;
/// - every pod checkpointed on SIGTERM (75): resumed.
pub fn classify(pods: &[Pod], expected: usize, job_failure: Option<String>, cluster: &PodContext) -> Failure {
    let mut resumed = false;
    let mut failure: Option<Failure> = None;
    let mut disrupted = job_failure;
    let mut peer_lost: Option<String> = None;
    for pod in pods {
        let name = pod.metadata.name.as_deref().unwrap_or("?");
        let status = pod.status.as_ref();
        let terminated = worker_exit(pod);
        let last_line = terminated.and_then(last_line);
        let permanent = terminated.is_some_and(|t| t.exit_code == exit::INVALID);
        if !permanent && let Some(why) = disruption(pod) {
            disrupted.get_or_insert_with(|| format!("pod {name}: {why}"));
            continue;
        }
        match terminated {
            Some(t) if t.exit_code == exit::DONE => {}
            Some(t) if t.exit_code == exit::RESUME => resumed = true,
            Some(t) if t.exit_code == exit::PEER_LOST => {
                // A healthy rank that stopped because another one died: the other pod says why.
                peer_lost.get_or_insert_with(|| {
                    format!("pod {name} lost a peer of its gang: {}", last_line.map_or("no message", str::trim))
                });
            }
            Some(t) => {
                let why = match (t.reason.as_deref(), last_line) {
                    (Some(reason), Some(line)) if reason != "Error" => format!("{reason}: {}", line.trim()),
                    (_, Some(line)) => line.trim().to_string(),
                    (Some(reason), None) => reason.to_string(),
                    (None, None) => "no message".into(),
                };
                let text = format!("pod {name} exited with code {}: {why}", t.exit_code);
                if permanent {
                    failure = Some(Failure::Permanent(text));
                } else if !matches!(failure, Some(Failure::Permanent(_))) {
                    failure = Some(Failure::Retry(text));
                }
            }
            None if cluster.lost(pod) => {
                disrupted.get_or_insert_with(|| lost_with_node(pod));
            }
            None => {
                let reason = status.and_then(|s| s.reason.clone());
                let phase = status.and_then(|s| s.phase.clone());
                if phase.as_deref() == Some("Failed") || reason.is_some() {
                    let why =
                        [reason, status.and_then(|s| s.message.clone())].into_iter().flatten().collect::<Vec<_>>();
                    let text = format!(
                        "pod {name} failed: {}",
                        if why.is_empty() { "no reason".into() } else { why.join(": ") }
                    );
                    if failure.is_none() {
                        failure = Some(Failure::Retry(text));
                    }
                }
            }
        }
    }
    if pods.len() < expected {
        // A pod that failed on its own stays listed (restartPolicy Never): one that is gone was
        // removed by the cluster (its node deleted, or the pod deleted) before it said anything.
        disrupted.get_or_insert_with(|| {
            format!("{} of the Job's {expected} pods are gone (node lost or pod deleted)", expected - pods.len())
        });
    }
    match (failure, disrupted, peer_lost) {
        (Some(f), _, _) => f,
        (None, Some(why), _) => Failure::Disruption(why),
        (None, None, Some(why)) => Failure::Retry(why),
        (None, None, None) if resumed => Failure::Resume,
        // Every pod exited 0 and the Job still failed: retrying is all that can be done.
        (None, None, None) => Failure::Retry("the Job failed though its pods succeeded".into()),
    }
}

/// What the store says of a run.
#[derive(Debug, Default)]
pub struct StoreState {
    /// The stages whose outputs are committed for the spec.
    pub committed: BTreeSet<Stage>,
    /// The newest checkpoint of the training stages (long-context's when it has one).
    pub checkpoint: Option<CheckpointStatus>,
    /// Each training stage's newest checkpoint for the spec, for goodput.
    pub ledgers: std::collections::BTreeMap<Stage, crate::plan::goodput::Ledger>,
}

/// The stages of `spec` whose outputs `store` has committed for the spec, and the newest checkpoint
/// of each training stage written for the spec.
pub async fn store_state(
    store: &Store,
    run: &str,
    spec: &PretrainRunSpec,
) -> Result<StoreState, pretrain_store::Error> {
    let mut found = StoreState::default();
    for stage in spec.stages() {
        let hash = spec.stage_config_hash(stage);
        let dir = store.stage(run, stage)?;
        if dir.committed(&hash).await?.is_some() {
            found.committed.insert(stage);
        }
        if !stage.is_training() {
            continue;
        }
        if let Some((name, state)) = crate::checkpoints::newest_for(&dir, &hash).await? {
            found.checkpoint = Some(CheckpointStatus {
                stage: stage.as_str().into(),
                step: state.step,
                tokens: state.tokens_seen,
                loss: state.loss,
                url: dir.url(&format!("ckpt/{name}")),
                time: state.saved_unix.map(crate::plan::cluster::format_time),
            });
            found.ledgers.insert(stage, state.into_ledger());
        }
    }
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(name: &str, status: &serde_json::Value) -> Pod {
        serde_json::from_value(serde_json::json!({"metadata": {"name": name}, "status": status})).unwrap()
    }

    fn exited(name: &str, code: i32, reason: &str, message: &str) -> Pod {
        pod(
            name,
            &serde_json::json!({"phase": "Failed", "containerStatuses": [{
                "name": "worker", "image": "w", "imageID": "", "ready": false, "restartCount": 0,
                "state": {"terminated": {"exitCode": code, "reason": reason, "message": message}}
            }]}),
        )
    }

    /// `classify` of pods of a Job that ran as many pods as given, failed by its backoff limit.
    fn of(pods: &[Pod]) -> Failure {
        classify(pods, pods.len(), None, &PodContext { now: 1_000, ..PodContext::default() })
    }

    fn with(mut pod: Pod, change: impl FnOnce(&mut Pod)) -> Pod {
        change(&mut pod);
        pod
    }

    fn disrupted(pod: Pod, reason: &str) -> Pod {
        with(pod, |p| {
            let status = p.status.get_or_insert_with(Default::default);
            status.conditions = Some(vec![
                serde_json::from_value(serde_json::json!({
                    "type": "DisruptionTarget", "status": "True", "reason": reason,
                    "message": "Taint manager: deleting due to NoExecute taint"
                }))
                .unwrap(),
            ]);
        })
    }

    #[test]
    fn failures_are_classified_by_exit_code_and_kubelet_reason() {
        // A crashed rank fails the gang even though the others checkpointed when the Job stopped them.
        let crashed = [
            exited("r0", exit::RESUME, "Error", ""),
            exited("r1", 1, "Error", "step 12\nNCCL error: unhandled system error\n"),
        ];
        assert_eq!(
            of(&crashed),
            Failure::Retry("pod r1 exited with code 1: NCCL error: unhandled system error".into())
        );
        assert_eq!(
            of(&[exited("r0", 137, "OOMKilled", "")]),
            Failure::Retry("pod r0 exited with code 137: OOMKilled".into())
        );
        let evicted =
            pod("r0", &serde_json::json!({"phase": "Failed", "reason": "Evicted", "message": "low on memory"}));
        assert_eq!(of(&[evicted]), Failure::Retry("pod r0 failed: Evicted: low on memory".into()));
        // Invalid input is permanent whatever the other pods did.
        let invalid =
            [exited("m0", 1, "Error", "x"), exited("m1", exit::INVALID, "Error", "data.sources[0]: no files\n")];
        assert!(matches!(of(&invalid), Failure::Permanent(m) if m.ends_with("data.sources[0]: no files")));
        // The ranks that stopped because a peer died do not hide the peer's own reason...
        let lost = [
            exited("r0", exit::PEER_LOST, "Error", "all-reduce #9: rank 2: connection lost\n"),
            exited("r2", 137, "OOMKilled", ""),
        ];
        assert_eq!(of(&lost), Failure::Retry("pod r2 exited with code 137: OOMKilled".into()));
        // ...and when only they say anything, they are a retry, not a resume.
        let only_lost = [
            exited("r0", exit::RESUME, "Error", ""),
            exited("r1", exit::PEER_LOST, "Error", "all-reduce #9: rank 2: connection lost\n"),
        ];
        assert_eq!(
            of(&only_lost),
            Failure::Retry("pod r1 lost a peer of its gang: all-reduce #9: rank 2: connection lost".into())
        );
        // Every pod checkpointed on SIGTERM: resume, not a failure.
        assert_eq!(of(&[exited("r0", exit::RESUME, "Error", ""), exited("r1", 0, "Completed", "")]), Failure::Resume);
    }

    #[test]
    fn what_the_cluster_did_to_a_gang_is_a_disruption_not_a_failure() {
        let cluster = PodContext { now: 1_000, ..PodContext::default() };
        let peer = exited("r0", exit::PEER_LOST, "Error", "all-reduce #9: rank 1: connection lost\n");
        // The dead rank's pod is gone (its node deleted, or the pod): the survivors' code says
        // only that a peer died.
        assert!(
            matches!(classify(std::slice::from_ref(&peer), 2, None, &cluster), Failure::Disruption(m) if m.contains("1 of the Job's 2 pods are gone"))
        );
        assert!(matches!(classify(&[], 1, None, &cluster), Failure::Disruption(m) if m.contains("gone")));
        // The taint manager or the pod garbage collector marked the pod.
        let tainted = disrupted(pod("r1", &serde_json::json!({"phase": "Failed"})), "DeletionByTaintManager");
        assert!(
            matches!(classify(&[peer.clone(), tainted], 2, None, &cluster), Failure::Disruption(m) if m.starts_with("pod r1: DeletionByTaintManager"))
        );
        // The Job's pod failure policy saw it first.
        let by_rule = "Pod ns/r1 has condition DisruptionTarget matching FailJob rule at index 1".to_string();
        assert_eq!(
            classify(&[exited("r0", exit::RESUME, "Error", "")], 1, Some(by_rule.clone()), &cluster),
            Failure::Disruption(by_rule)
        );
        // A deleted pod still listed past its grace period, or on a node that is not Ready, is lost
        // with its node...
        let deleting = |at: i64, node: &str| {
            with(pod("r1", &serde_json::json!({"phase": "Running"})), |p| {
                p.metadata.deletion_timestamp = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                    jiff::Timestamp::from_second(at).unwrap(),
                ));
                p.spec =
                    Some(k8s_openapi::api::core::v1::PodSpec { node_name: Some(node.into()), ..Default::default() });
            })
        };
        assert!(!cluster.settled(&deleting(1_200, "gpu-1")), "within its grace period it may still checkpoint");
        assert!(cluster.settled(&deleting(900, "gpu-1")));
        let unready = PodContext { now: 1_000, unready_nodes: ["gpu-1".to_string()].into() };
        assert!(unready.settled(&deleting(1_200, "gpu-1")));
        assert!(
            matches!(classify(&[peer.clone(), deleting(1_200, "gpu-1")], 2, None, &unready), Failure::Disruption(m) if m.contains("lost with its node gpu-1"))
        );
        // ...but an application failure still counts, disruption or not.
        let crashed = exited("r2", 1, "Error", "panicked\n");
        assert!(matches!(classify(&[peer, crashed], 3, None, &cluster), Failure::Retry(m) if m.contains("panicked")));
    }

    #[tokio::test]
    async fn the_store_says_which_stages_are_committed_and_the_newest_checkpoint_for_this_spec() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::open(&format!("file://{}", tmp.path().display())).unwrap();
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/gpu-gang.yaml");
        let spec = pretrain_crd::load(&path).unwrap().spec;
        let commit = |stage: Stage, hash: String| {
            let store = store.clone();
            async move {
                let dir = store.stage("gang", stage).unwrap();
                let file = dir.put("out.txt", "x".into()).await.unwrap();
                dir.commit(&hash, vec![file], serde_json::json!({})).await.unwrap();
            }
        };
        commit(Stage::DataPrep, spec.stage_config_hash(Stage::DataPrep)).await;
        commit(Stage::Tokenize, "an older spec".into()).await;
        let train = store.stage("gang", Stage::Train).unwrap();
        let state = |hash: String| {
            serde_json::json!({"step": 40, "tokensSeen": 1_310_720, "configHash": hash, "loss": 3.25, "cursor": 7,
                "savedUnix": 1_700, "history": {"trainSeconds": 600.0, "startupSeconds": 12.5}})
        };
        train
            .put("ckpt/step-000000040/state.json", state(spec.stage_config_hash(Stage::Train)).to_string().into())
            .await
            .unwrap();
        train.put("ckpt/latest", "step-000000040".into()).await.unwrap();
        let found = store_state(&store, "gang", &spec).await.unwrap();
        assert_eq!(found.committed.into_iter().collect::<Vec<_>>(), [Stage::DataPrep]);
        let ledger = &found.ledgers[&Stage::Train];
        assert_eq!((ledger.history.train_seconds, ledger.history.startup_seconds), (600.0, 12.5));
        assert_eq!(ledger.saved_unix, Some(1_700));
        let checkpoint = found.checkpoint.unwrap();
        assert_eq!((checkpoint.stage.as_str(), checkpoint.step, checkpoint.tokens), ("train", 40, 1_310_720));
        assert_eq!(checkpoint.loss, Some(3.25));
        assert!(checkpoint.url.ends_with("gang/train/ckpt/step-000000040"), "{}", checkpoint.url);
        // A checkpoint of another spec is not this run's progress.
        train.put("ckpt/step-000000040/state.json", state("other".into()).to_string().into()).await.unwrap();
        let found = store_state(&store, "gang", &spec).await.unwrap();
        assert!(found.checkpoint.is_none() && found.ledgers.is_empty());
    }
}
