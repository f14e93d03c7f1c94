//! What `pretrain render` prints: every object validates against the Kubernetes schemas (the
//! k8s-openapi types' JSON schemas, and a lossless round trip through the types, which catches a
//! misspelled field), and the objects say what the operator contract promises.

use std::path::Path;

use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{ConfigMap, Service};
use pretrain_crd::Stage;
use pretrain_operator::k8s::render::{Object, RunObjects, job_name, object_name, to_yaml_stream};
use pretrain_operator::plan::{Role, layout};
use serde_json::Value;

fn fixture(name: &str) -> pretrain_crd::PretrainRun {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name);
    pretrain_crd::load(&path).unwrap()
}

/// Validates `value` against the JSON schema of `T` and checks that it survives `T` unchanged.
fn check<T: schemars::JsonSchema + serde::de::DeserializeOwned + serde::Serialize>(value: &Value) {
    let schema = serde_json::to_value(schemars::schema_for!(T)).unwrap();
    let validator = jsonschema::validator_for(&schema).unwrap();
    let errors: Vec<String> = validator.iter_errors(value).map(|e| format!("{} at {}", e, e.instance_path())).collect();
    assert!(errors.is_empty(), "{}: {errors:?}", value["metadata"]["name"]);
    let typed: T = serde_json::from_value(value.clone()).unwrap();
    assert_eq!(&serde_json::to_value(typed).unwrap(), value, "a field the type does not know was dropped");
}

#[test]
fn every_rendered_object_is_valid_kubernetes() {
    for name in ["gpu-gang.yaml", "cpu-minimal.yaml"] {
        let run = fixture(name);
        let objects = RunObjects::new(&run).unwrap().all().unwrap();
        let yaml = to_yaml_stream(&objects).unwrap();
        let docs: Vec<Value> =
            yaml.split("---\n").filter(|d| !d.trim().is_empty()).map(|d| serde_yaml::from_str(d).unwrap()).collect();
        assert_eq!(docs.len(), objects.len());
        for doc in &docs {
            match doc["kind"].as_str().unwrap() {
                "ConfigMap" => check::<ConfigMap>(doc),
                "Service" => check::<Service>(doc),
                "Job" => check::<Job>(doc),
                other => panic!("unexpected kind {other}"),
            }
            let name = doc["metadata"]["name"].as_str().unwrap();
            assert!(name.len() <= 52 && name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-'));
            assert_eq!(doc["metadata"]["ownerReferences"][0]["kind"], "PretrainRun");
        }
    }
}

#[test]
fn a_gpu_gang_is_an_indexed_job_with_rendezvous_gpus_and_a_checkpoint_grace_period() {
    let run = fixture("gpu-gang.yaml"); // 8 shards; 4 nodes x 8 GPUs
    let objects = RunObjects::new(&run).unwrap().all().unwrap();
    let kinds: Vec<String> = objects
        .iter()
        .map(|o| match o {
            Object::ConfigMap(c) => format!("ConfigMap {}", c.metadata.name.as_deref().unwrap()),
            Object::Service(s) => format!("Service {}", s.metadata.name.as_deref().unwrap()),
            Object::Job(j) => format!("Job {}", j.metadata.name.as_deref().unwrap()),
        })
        .collect();
    assert_eq!(
        kinds,
        [
            "ConfigMap gang-spec",
            "Job gang-data-prep-map-1",
            "Job gang-data-prep-dedup-1",
            "Job gang-data-prep-cluster-1",
            "Job gang-data-prep-route-1",
            "Job gang-data-prep-write-1",
            "Job gang-data-prep-reduce-1",
            "Job gang-tokenize-map-1",
            "Job gang-tokenize-reduce-1",
            "Service gang-train",
            "Job gang-train-1",
            "Service gang-long-context",
            "Job gang-long-context-1",
            "Job gang-eval-1",
        ]
    );
    let objects = RunObjects::new(&run).unwrap();
    let job = serde_json::to_value(objects.job(Stage::Train, Role::Gang, 3)).unwrap();
    assert_eq!(job["metadata"]["name"], "gang-train-3");
    let spec = &job["spec"];
    assert_eq!((spec["completions"].as_i64(), spec["parallelism"].as_i64()), (Some(4), Some(4)));
    assert_eq!(spec["completionMode"], "Indexed");
    assert_eq!(spec["backoffLimit"], 0);
    assert!(spec.get("backoffLimitPerIndex").is_none());
    // A gang is all or nothing: invalid input or a disrupted pod fails it at once (the operator
    // reads which rule did, and does not count a disruption against the restart budget).
    assert_eq!(spec["podFailurePolicy"]["rules"][0]["onExitCodes"]["values"], serde_json::json!([2]));
    assert_eq!(spec["podFailurePolicy"]["rules"][1]["action"], "FailJob");
    assert_eq!(spec["podFailurePolicy"]["rules"][1]["onPodConditions"][0]["type"], "DisruptionTarget");
    // A map task is retried alone: one failed shard does not kill the others; invalid input fails
    // the Job at once; a disrupted pod does not count.
    let map = serde_json::to_value(objects.job(Stage::DataPrep, Role::Map, 1)).unwrap();
    assert!(map["spec"].get("backoffLimit").is_none(), "{}", map["spec"]);
    assert_eq!(map["spec"]["backoffLimitPerIndex"], 3);
    assert_eq!(map["spec"]["podFailurePolicy"]["rules"][0]["action"], "FailJob");
    assert_eq!(map["spec"]["podFailurePolicy"]["rules"][0]["onExitCodes"]["values"], serde_json::json!([2]));
    assert_eq!(map["spec"]["podFailurePolicy"]["rules"][1]["action"], "Ignore");
    assert_eq!(map["spec"]["podFailurePolicy"]["rules"][1]["onPodConditions"][0]["type"], "DisruptionTarget");
    let pod = &spec["template"]["spec"];
    assert_eq!(pod["subdomain"], "gang-train");
    assert_eq!(pod["restartPolicy"], "Never");
    assert_eq!(pod["terminationGracePeriodSeconds"], 600);
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    let container = &pod["containers"][0];
    assert_eq!(container["resources"]["limits"]["nvidia.com/gpu"], "8");
    assert_eq!(container["args"], serde_json::json!(["train", "--spec", "/etc/pretrain/run.yaml"]));
    let env: std::collections::BTreeMap<String, Value> = container["env"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e["name"].as_str().unwrap().to_string(), e.get("value").cloned().unwrap_or(e["valueFrom"].clone())))
        .collect();
    assert_eq!(env["WORLD_SIZE"], "4");
    assert_eq!(env["MASTER_ADDR"], "gang-train-3-0.gang-train");
    assert_eq!(env["MASTER_PORT"], "29500");
    assert_eq!(env["PRETRAIN_STORE"], "s3://bucket/runs");
    assert_eq!(
        env["RANK"]["fieldRef"]["fieldPath"],
        "metadata.annotations['batch.kubernetes.io/job-completion-index']"
    );
    assert!(pod["volumes"].as_array().unwrap().iter().any(|v| v["name"] == "shm"), "NCCL gets shared memory");
    assert_eq!(job["metadata"]["annotations"]["pretrain.dev/config-hash"], run.spec.stage_config_hash(Stage::Train));

    let eval = serde_json::to_value(objects.job(Stage::Eval, Role::Single, 1)).unwrap();
    assert_eq!(eval["spec"]["completions"], 1);
    assert_eq!(eval["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"], "1");
    let map = serde_json::to_value(objects.job(Stage::DataPrep, Role::Map, 1)).unwrap();
    assert_eq!(map["spec"]["completions"], 8);
    assert!(map["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu").is_none());
}

/// Dedup, route and write tasks (as many as the shards by default) are indexed and retried alone,
/// like map tasks; the cluster task is one pod.
#[test]
fn dedup_route_and_write_tasks_are_indexed_jobs_retried_by_index() {
    let run = fixture("gpu-gang.yaml");
    let objects = RunObjects::new(&run).unwrap();
    for role in [Role::Dedup, Role::Route, Role::Write] {
        let job = serde_json::to_value(objects.job(Stage::DataPrep, role, 1)).unwrap();
        assert_eq!(job["spec"]["completions"], 8, "{role:?}");
        assert_eq!(job["spec"]["completionMode"], "Indexed");
        assert_eq!(job["spec"]["backoffLimitPerIndex"], 3);
        assert_eq!(job["spec"]["podFailurePolicy"]["rules"][1]["action"], "Ignore");
        let args = &job["spec"]["template"]["spec"]["containers"][0]["args"];
        let phase = role.as_str();
        assert_eq!(*args, serde_json::json!(["data-prep", "--spec", "/etc/pretrain/run.yaml", "--phase", phase]));
    }
    let cluster = serde_json::to_value(objects.job(Stage::DataPrep, Role::Cluster, 1)).unwrap();
    assert_eq!(cluster["spec"]["completions"], 1);
    assert_eq!(cluster["spec"]["backoffLimit"], 0);
    let args = &cluster["spec"]["template"]["spec"]["containers"][0]["args"];
    assert_eq!(*args, serde_json::json!(["data-prep", "--spec", "/etc/pretrain/run.yaml", "--phase", "cluster"]));
}

/// In-context order adds as many embed tasks as route tasks and `data.tasks.order` order tasks,
/// indexed like the others, between the cluster task and the route tasks.
#[test]
fn in_context_order_adds_embed_and_order_tasks() {
    let mut run = fixture("gpu-gang.yaml");
    run.spec.data.order.strategy = pretrain_crd::spec::OrderStrategy::InContext;
    run.spec.data.tasks.order = Some(3);
    run.spec.data.tasks.route = Some(5);
    let roles = Role::of(layout(&run.spec, Stage::DataPrep));
    let names: Vec<&str> = roles.iter().map(|r| r.as_str()).collect();
    assert_eq!(names, ["map", "dedup", "cluster", "embed", "order", "route", "write", "reduce"]);
    let objects = RunObjects::new(&run).unwrap();
    for (role, count) in [(Role::Embed, 5), (Role::Order, 3), (Role::Route, 5)] {
        let job = serde_json::to_value(objects.job(Stage::DataPrep, role, 1)).unwrap();
        check::<Job>(&job);
        assert_eq!(job["spec"]["completions"], count, "{role:?}");
        assert_eq!(job["spec"]["completionMode"], "Indexed");
        assert_eq!(job["spec"]["backoffLimitPerIndex"], 3);
        let args = &job["spec"]["template"]["spec"]["containers"][0]["args"];
        let phase = role.as_str();
        assert_eq!(*args, serde_json::json!(["data-prep", "--spec", "/etc/pretrain/run.yaml", "--phase", phase]));
    }
    // The other orders have neither.
    run.spec.data.order.strategy = pretrain_crd::spec::OrderStrategy::Shuffle;
    assert!(!Role::of(layout(&run.spec, Stage::DataPrep)).contains(&Role::Embed));
}

#[test]
fn long_names_are_shortened_deterministically() {
    let run = "a-run-whose-name-is-much-longer-than-kubernetes-allows-for-hostnames";
    let a = job_name(run, Stage::LongContext, Role::Gang, 12);
    assert!(a.len() <= 52, "{a}");
    assert_eq!(a, job_name(run, Stage::LongContext, Role::Gang, 12));
    assert_ne!(a, job_name(run, Stage::LongContext, Role::Gang, 13));
    assert_eq!(object_name(&["short", "train", "1"]), "short-train-1");
}

#[test]
fn an_admitted_gang_is_kept_on_its_nodes_and_tolerates_gpu_taints() {
    let run = fixture("gpu-gang.yaml");
    let objects = RunObjects::new(&run).unwrap();
    let mut job = objects.job(Stage::Train, Role::Gang, 2);
    pretrain_operator::k8s::render::place_on(&mut job, &["n3".into(), "n1".into(), "n3".into()]);
    let value = serde_json::to_value(&job).unwrap();
    check::<Job>(&value);
    let pod = &value["spec"]["template"]["spec"];
    // One term per node, since a field selector takes one value (the API server refuses more).
    let terms = &pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"];
    let on =
        |node: &str| serde_json::json!({"matchFields": [{"key": "metadata.name", "operator": "In", "values": [node]}]});
    assert_eq!(*terms, serde_json::json!([on("n1"), on("n3")]));
    // One pod of the attempt per node.
    let apart = &pod["affinity"]["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][0];
    assert_eq!(apart["topologyKey"], "kubernetes.io/hostname");
    assert_eq!(
        apart["labelSelector"]["matchLabels"],
        serde_json::json!({"pretrain.dev/run": "gang", "pretrain.dev/stage": "train", "pretrain.dev/attempt": "2"})
    );
    assert_eq!(pod["tolerations"][0]["key"], "nvidia.com/gpu");
    // CPU stages neither tolerate GPU taints nor get placed.
    let map = serde_json::to_value(objects.job(Stage::DataPrep, Role::Map, 1)).unwrap();
    assert!(map["spec"]["template"]["spec"]["tolerations"].is_null());
}

#[test]
fn a_gang_admitted_on_fewer_nodes_runs_that_many_ranks() {
    let run = fixture("gpu-gang.yaml"); // 4 nodes x 8 GPUs
    let objects = RunObjects::new(&run).unwrap();
    let world = |job: &Job| {
        let value = serde_json::to_value(job).unwrap();
        let env = value["spec"]["template"]["spec"]["containers"][0]["env"].as_array().unwrap().clone();
        let world = env.iter().find(|e| e["name"] == "WORLD_SIZE").unwrap()["value"].clone();
        (value["spec"]["completions"].as_i64(), value["spec"]["parallelism"].as_i64(), world)
    };
    let mut whole = objects.job(Stage::Train, Role::Gang, 2);
    pretrain_operator::k8s::render::place_on(&mut whole, &["n0".into(), "n1".into(), "n2".into(), "n3".into()]);
    assert_eq!(world(&whole), (Some(4), Some(4), "4".into()));
    let mut shrunk = objects.job(Stage::Train, Role::Gang, 3);
    pretrain_operator::k8s::render::place_on(&mut shrunk, &["n0".into(), "n2".into()]);
    check::<Job>(&serde_json::to_value(&shrunk).unwrap());
    assert_eq!(world(&shrunk), (Some(2), Some(2), "2".into()));
}

#[test]
fn a_kueue_run_creates_suspended_jobs_with_the_queue_label() {
    let mut run = fixture("gpu-gang.yaml");
    run.spec.scheduling.kueue = Some(pretrain_crd::spec::Kueue { queue_name: "team-a".into() });
    let job = serde_json::to_value(RunObjects::new(&run).unwrap().job(Stage::Train, Role::Gang, 1)).unwrap();
    assert_eq!(job["spec"]["suspend"], true);
    assert_eq!(job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"], "team-a");
}
