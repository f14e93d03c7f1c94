//! Every case of `fixtures/transitions.yaml` through the operator's pure decision function.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use pretrain_crd::{PretrainRunSpec, PretrainRunStatus, Stage};
use pretrain_operator::plan::cluster::{ClusterView, JobKey, JobView, LivePod, decide};
use pretrain_operator::plan::goodput::Ledger;
use serde::Deserialize;

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Case {
    name: String,
    spec: String,
    #[serde(default)]
    spec_patch: Option<serde_json::Value>,
    #[serde(default = "one")]
    generation: i64,
    #[serde(default)]
    status: PretrainRunStatus,
    #[serde(default)]
    committed: Vec<Stage>,
    #[serde(default)]
    jobs: Vec<JobView>,
    #[serde(default)]
    live_pods: Vec<LivePod>,
    #[serde(default)]
    now: i64,
    /// The operator runs its cluster scheduler (stages that need GPUs wait for `status.admission`).
    #[serde(default)]
    scheduler: bool,
    /// Each training stage's newest checkpoint (`history` and `savedUnix`).
    #[serde(default)]
    ledgers: BTreeMap<Stage, Ledger>,
    expect: Expect,
}

fn one() -> i64 {
    1
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Expect {
    create: Option<Vec<String>>,
    stop: Option<Vec<String>>,
    phase: Option<String>,
    events: Option<Vec<String>>,
    requeue_after: Option<u64>,
    /// A substring of `status.reason`.
    reason: Option<String>,
    queue_position: Option<u32>,
    /// Condition type to its status.
    #[serde(default)]
    conditions: BTreeMap<String, String>,
    #[serde(default)]
    stages: BTreeMap<String, StageExpect>,
    /// Fields of `status.goodput`.
    goodput: Option<serde_json::Value>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct StageExpect {
    phase: Option<String>,
    attempts: Option<u32>,
    failures: Option<u32>,
    disruptions: Option<u32>,
    message: Option<String>,
    /// Fields of the stage's `time`.
    time: Option<serde_json::Value>,
}

/// Whether every field `want` names has that value in `got` (a null, that `got` lacks it).
fn within(got: &serde_json::Value, want: &serde_json::Value) -> bool {
    match (got, want) {
        (serde_json::Value::Object(g), serde_json::Value::Object(w)) => {
            w.iter().all(|(k, v)| g.get(k).map_or(v.is_null(), |g| within(g, v)))
        }
        (serde_json::Value::Number(g), serde_json::Value::Number(w)) => g.as_f64() == w.as_f64(),
        (g, w) => g == w,
    }
}

fn spec(name: &str, patch: Option<&serde_json::Value>) -> PretrainRunSpec {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name);
    let spec = pretrain_crd::load(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display())).spec;
    let Some(patch) = patch else { return spec };
    let mut value = serde_json::to_value(&spec).unwrap();
    merge(&mut value, patch);
    serde_json::from_value(value).unwrap()
}

fn merge(target: &mut serde_json::Value, patch: &serde_json::Value) {
    match (target, patch) {
        (serde_json::Value::Object(t), serde_json::Value::Object(p)) => {
            for (k, v) in p {
                merge(t.entry(k.clone()).or_insert(serde_json::Value::Null), v);
            }
        }
        (t, p) => *t = p.clone(),
    }
}

fn key(k: &JobKey) -> String {
    let role = format!("{:?}", k.role).to_lowercase();
    format!("{}/{role}/{}", k.stage, k.attempt)
}

#[test]
#[expect(clippy::too_many_lines, reason = "one fixture-driven check, read top to bottom")]
fn every_transition_decides_as_the_fixture_says() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/transitions.yaml");
    // Through JSON values, so that enums read as `{failed: {retry: ...}}` rather than YAML tags.
    let value: serde_json::Value = serde_yaml::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let cases: Vec<Case> = serde_json::from_value(value).unwrap();
    assert!(cases.len() >= 20, "the fixture holds every transition");
    let mut failures = Vec::new();
    for case in &cases {
        let spec = spec(&case.spec, case.spec_patch.as_ref());
        let committed: BTreeSet<Stage> = case.committed.iter().copied().collect();
        let view = ClusterView {
            spec: &spec,
            generation: Some(case.generation),
            status: &case.status,
            committed: &committed,
            jobs: &case.jobs,
            checkpoint: None,
            now: case.now,
            scheduler: case.scheduler,
            live_pods: &case.live_pods,
            ledgers: &case.ledgers,
        };
        let d = decide(&view);
        let mut problems = Vec::new();
        let check = |problems: &mut Vec<String>, what: &str, got: String, want: String| {
            if got != want {
                problems.push(format!("{what}: got {got}, want {want}"));
            }
        };
        if let Some(want) = &case.expect.create {
            check(
                &mut problems,
                "create",
                format!("{:?}", d.create.iter().map(key).collect::<Vec<_>>()),
                format!("{want:?}"),
            );
        }
        if let Some(want) = &case.expect.stop {
            check(
                &mut problems,
                "stop",
                format!("{:?}", d.stop.iter().map(key).collect::<Vec<_>>()),
                format!("{want:?}"),
            );
        }
        if let Some(want) = &case.expect.phase {
            check(&mut problems, "phase", format!("{:?}", d.status.phase), format!("Some({want})"));
        }
        if let Some(want) = &case.expect.events {
            check(
                &mut problems,
                "events",
                format!("{:?}", d.events.iter().map(|e| e.reason).collect::<Vec<_>>()),
                format!("{want:?}"),
            );
        }
        if let Some(want) = &case.expect.reason {
            let reason = d.status.reason.clone().unwrap_or_default();
            if !reason.contains(want.as_str()) {
                problems.push(format!("reason: {reason:?} lacks {want:?}"));
            }
        }
        if let Some(want) = case.expect.queue_position {
            check(&mut problems, "queuePosition", format!("{:?}", d.status.queue_position), format!("Some({want})"));
        }
        if let Some(want) = case.expect.requeue_after {
            check(&mut problems, "requeueAfter", format!("{:?}", d.requeue_after), format!("Some({want})"));
        }
        for (name, want) in &case.expect.stages {
            let Some(got) = d.status.stages.iter().find(|s| s.name == *name) else {
                problems.push(format!("no status for stage {name}"));
                continue;
            };
            if let Some(p) = &want.phase {
                check(&mut problems, &format!("{name}.phase"), format!("{:?}", got.phase), p.clone());
            }
            if let Some(a) = want.attempts {
                check(&mut problems, &format!("{name}.attempts"), got.attempts.to_string(), a.to_string());
            }
            if let Some(f) = want.failures {
                check(&mut problems, &format!("{name}.failures"), got.failures.to_string(), f.to_string());
            }
            if let Some(n) = want.disruptions {
                check(&mut problems, &format!("{name}.disruptions"), got.disruptions.to_string(), n.to_string());
            }
            if let Some(m) = &want.message {
                let message = got.message.clone().unwrap_or_default();
                if !message.contains(m.as_str()) {
                    problems.push(format!("{name}.message: {message:?} lacks {m:?}"));
                }
            }
            if let Some(t) = &want.time {
                let time = serde_json::to_value(&got.time).unwrap();
                if !within(&time, t) {
                    problems.push(format!("{name}.time: got {time}, want {t}"));
                }
            }
        }
        if let Some(want) = &case.expect.goodput {
            let got = serde_json::to_value(&d.status.goodput).unwrap();
            if !within(&got, want) {
                problems.push(format!("goodput: got {got}, want {want}"));
            }
        }
        for (type_, want) in &case.expect.conditions {
            let got = d.status.conditions.iter().find(|c| c.type_ == *type_).map(|c| c.status.clone());
            check(&mut problems, &format!("condition {type_}"), format!("{got:?}"), format!("{:?}", Some(want)));
        }
        // Every condition says why it holds or not, for the generation decided on.
        for c in &d.status.conditions {
            if c.reason.is_none() || c.observed_generation != Some(case.generation) {
                problems.push(format!("condition {} lacks a reason or the generation: {c:?}", c.type_));
            }
        }
        // The status always lists the spec's stages in order and records the generation it saw.
        let names: Vec<String> = spec.stages().iter().map(|s| s.to_string()).collect();
        check(
            &mut problems,
            "stages",
            format!("{:?}", d.status.stages.iter().map(|s| &s.name).collect::<Vec<_>>()),
            format!("{names:?}"),
        );
        check(
            &mut problems,
            "observedGeneration",
            format!("{:?}", d.status.observed_generation),
            format!("Some({})", case.generation),
        );
        if !problems.is_empty() {
            failures.push(format!("{}:\n  {}", case.name, problems.join("\n  ")));
        }
        // Deciding again on the decided status (the Jobs created, nothing else changed) is stable:
        // it creates nothing twice.
        let mut jobs = case.jobs.clone();
        jobs.extend(d.create.iter().map(|k| JobView {
            stage: k.stage,
            role: k.role,
            attempt: k.attempt,
            current_spec: true,
            state: pretrain_operator::plan::cluster::JobState::Active,
            tasks: None,
        }));
        let again = decide(&ClusterView { status: &d.status, jobs: &jobs, ..view });
        if again.create.iter().any(|k| d.create.contains(k)) {
            failures.push(format!("{}: a second reconcile recreated {:?}", case.name, again.create));
        }
    }
    assert!(failures.is_empty(), "{} of {} cases failed:\n{}", failures.len(), cases.len(), failures.join("\n"));
}
