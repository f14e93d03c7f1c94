//! Reading the cluster and the store into the planner's terms: a Job (and, when it failed, its pods)
//! into a [`JobView`]; a run's store into the stages committed for its spec and its newest checkpoint.

use std::collections::BTreeSet;

use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::Pod;
use pretrain_crd::contract::exit;
use pretrain_crd::status::CheckpointStatus;
use pretrain_crd::{PretrainRunSpec, Stage};
use pretrain_store::Store;
use serde::Deserialize;

use super::render::{ANNOTATION_CONFIG_HASH, LABEL_ATTEMPT, LABEL_ROLE, LABEL_STAGE};
use crate::plan::Role;
use crate::plan::cluster::{Failure, JobState, JobView};

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

/// The planner's view of one of our Jobs; `pods` are its pods (read only when it failed). `None`
/// for a Job without our labels.
pub fn job_view(job: &Job, spec: &PretrainRunSpec, pods: &[Pod]) -> Option<JobView> {
    let labels = job.metadata.labels.as_ref()?;
    let stage: Stage = labels.get(LABEL_STAGE)?.parse().ok()?;
    let role = match labels.get(LABEL_ROLE)?.as_str() {
        "map" => Role::Map,
        "reduce" => Role::Reduce,
        "gang" => Role::Gang,
        "single" => Role::Single,
        _ => return None,
    };
    let attempt = labels.get(LABEL_ATTEMPT)?.parse().ok()?;
    let hash = job.metadata.annotations.as_ref().and_then(|a| a.get(ANNOTATION_CONFIG_HASH));
    let current_spec = hash.is_some_and(|h| *h == spec.stage_config_hash(stage));
    let state = match job_outcome(job) {
        None => JobState::Active,
        Some(true) => JobState::Succeeded,
        Some(false) => JobState::Failed(classify(pods)),
    };
    Some(JobView { stage, role, attempt, current_spec, state })
}

/// How a failed Job's pods ended. Any worker exit code other than done (0) and resume (75) is a
/// failure, permanent for invalid-spec (2) and missing-stage (3); pods killed by the kubelet
/// (OOM, eviction, node loss) are retried; pods that all checkpointed on SIGTERM are resumed. A
/// rank that stopped because a peer died (76) is retried, but the failed peer's reason wins.
pub fn classify(pods: &[Pod]) -> Failure {
    let mut resumed = false;
    let mut failure: Option<Failure> = None;
    let mut peer_lost: Option<String> = None;
    for pod in pods {
        let name = pod.metadata.name.as_deref().unwrap_or("?");
        let status = pod.status.as_ref();
        let terminated = status
            .and_then(|s| s.container_statuses.as_ref())
            .and_then(|cs| cs.iter().find(|c| c.name == "worker"))
            .and_then(|c| c.state.as_ref()?.terminated.as_ref());
        let last_line =
            terminated.and_then(|t| t.message.as_deref()).and_then(|m| m.lines().rev().find(|l| !l.trim().is_empty()));
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
                if matches!(t.exit_code, exit::INVALID | exit::UNAVAILABLE) {
                    failure = Some(Failure::Permanent(text));
                } else if !matches!(failure, Some(Failure::Permanent(_))) {
                    failure = Some(Failure::Retry(text));
                }
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
    match failure {
        Some(f) => f,
        None if peer_lost.is_some() => Failure::Retry(peer_lost.expect("checked")),
        None if resumed => Failure::Resume,
        // No pod says what happened: they were deleted with their node, or never started.
        None => Failure::Retry("the Job failed and its pods are gone (node lost or pods deleted)".into()),
    }
}

/// What the operator reads of a checkpoint's `state.json`.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct CheckpointState {
    step: u64,
    tokens_seen: u64,
    config_hash: String,
    #[serde(default)]
    loss: Option<f64>,
    #[serde(default)]
    saved_unix: Option<i64>,
}

/// The stages of `spec` whose outputs `store` has committed for the spec, and the newest checkpoint
/// of its training stages (long-context's when it has one) written for the spec.
pub async fn store_state(
    store: &Store,
    run: &str,
    spec: &PretrainRunSpec,
) -> Result<(BTreeSet<Stage>, Option<CheckpointStatus>), pretrain_store::Error> {
    let mut committed = BTreeSet::new();
    let mut checkpoint = None;
    for stage in spec.stages() {
        let hash = spec.stage_config_hash(stage);
        let dir = store.stage(run, stage)?;
        if dir.committed(&hash).await?.is_some() {
            committed.insert(stage);
        }
        if !stage.is_training() {
            continue;
        }
        let Some(crate::checkpoints::Newest { name, state: Some(state) }) = crate::checkpoints::newest(&dir).await?
        else {
            continue;
        };
        if let Ok(state) = serde_json::from_value::<CheckpointState>(state)
            && state.config_hash == hash
        {
            checkpoint = Some(CheckpointStatus {
                stage: stage.as_str().into(),
                step: state.step,
                tokens: state.tokens_seen,
                loss: state.loss,
                url: dir.url(&format!("ckpt/{name}")),
                time: state.saved_unix.map(crate::plan::cluster::format_time),
            });
        }
    }
    Ok((committed, checkpoint))
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

    #[test]
    fn failures_are_classified_by_exit_code_and_kubelet_reason() {
        // A crashed rank fails the gang even though the others checkpointed when the Job stopped them.
        let crashed = [
            exited("r0", exit::RESUME, "Error", ""),
            exited("r1", 1, "Error", "step 12\nNCCL error: unhandled system error\n"),
        ];
        assert_eq!(
            classify(&crashed),
            Failure::Retry("pod r1 exited with code 1: NCCL error: unhandled system error".into())
        );
        assert_eq!(
            classify(&[exited("r0", 137, "OOMKilled", "")]),
            Failure::Retry("pod r0 exited with code 137: OOMKilled".into())
        );
        let evicted =
            pod("r0", &serde_json::json!({"phase": "Failed", "reason": "Evicted", "message": "low on memory"}));
        assert_eq!(classify(&[evicted]), Failure::Retry("pod r0 failed: Evicted: low on memory".into()));
        // Invalid input is permanent whatever the other pods did.
        let invalid =
            [exited("m0", 1, "Error", "x"), exited("m1", exit::INVALID, "Error", "data.sources[0]: no files\n")];
        assert!(matches!(classify(&invalid), Failure::Permanent(m) if m.ends_with("data.sources[0]: no files")));
        // The ranks that stopped because a peer died do not hide the peer's own reason...
        let lost = [
            exited("r0", exit::PEER_LOST, "Error", "all-reduce #9: rank 2: connection lost\n"),
            exited("r2", 137, "OOMKilled", ""),
        ];
        assert_eq!(classify(&lost), Failure::Retry("pod r2 exited with code 137: OOMKilled".into()));
        // ...and when only they say anything (the dead pod is gone), they are a retry, not a resume.
        let only_lost = [
            exited("r0", exit::RESUME, "Error", ""),
            exited("r1", exit::PEER_LOST, "Error", "all-reduce #9: rank 2: connection lost\n"),
        ];
        assert_eq!(
            classify(&only_lost),
            Failure::Retry("pod r1 lost a peer of its gang: all-reduce #9: rank 2: connection lost".into())
        );
        // Every pod checkpointed on SIGTERM: resume, not a failure.
        assert_eq!(
            classify(&[exited("r0", exit::RESUME, "Error", ""), exited("r1", 0, "Completed", "")]),
            Failure::Resume
        );
        // Nothing left to read: the node went away with the pods.
        assert!(matches!(classify(&[]), Failure::Retry(m) if m.contains("node lost")));
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
        let state = |hash: String| serde_json::json!({"step": 40, "tokensSeen": 1_310_720, "configHash": hash, "loss": 3.25, "cursor": 7});
        train
            .put("ckpt/step-000000040/state.json", state(spec.stage_config_hash(Stage::Train)).to_string().into())
            .await
            .unwrap();
        train.put("ckpt/latest", "step-000000040".into()).await.unwrap();
        let (committed, checkpoint) = store_state(&store, "gang", &spec).await.unwrap();
        assert_eq!(committed.into_iter().collect::<Vec<_>>(), [Stage::DataPrep]);
        let checkpoint = checkpoint.unwrap();
        assert_eq!((checkpoint.stage.as_str(), checkpoint.step, checkpoint.tokens), ("train", 40, 1_310_720));
        assert_eq!(checkpoint.loss, Some(3.25));
        assert!(checkpoint.url.ends_with("gang/train/ckpt/step-000000040"), "{}", checkpoint.url);
        // A checkpoint of another spec is not this run's progress.
        train.put("ckpt/step-000000040/state.json", state("other".into()).to_string().into()).await.unwrap();
        assert!(store_state(&store, "gang", &spec).await.unwrap().1.is_none());
    }
}
