//! The Helm chart, rendered without Helm (`support/chart.rs`): every object of the defaults and of
//! representative values validates against the Kubernetes schemas, the values against
//! `values.schema.json`, and the ClusterRole grants exactly the verbs the operator uses.

#[path = "support/chart.rs"]
mod support;

use serde_json::{Value, json};
use support::{chart, kinds, merge, objects, scalar, validate};

#[test]
fn the_default_install_is_valid_kubernetes_and_runs_the_operator_safely() {
    let objects = objects(&json!({}));
    validate(&objects);
    assert_eq!(
        kinds(&objects),
        [
            "Deployment pretrain",
            "PodDisruptionBudget pretrain",
            "ClusterRole pretrain",
            "ClusterRoleBinding pretrain",
            "Role pretrain-leader",
            "RoleBinding pretrain-leader",
            "Service pretrain-dashboard",
            "Service pretrain-metrics",
            "ServiceAccount pretrain",
        ]
    );
    let deployment = &objects[0];
    assert_eq!(deployment["spec"]["replicas"], 2);
    // A drain takes one replica at a time; the budget selects exactly the Deployment's pods.
    let budget = &objects[1];
    assert_eq!(budget["spec"]["maxUnavailable"], 1);
    assert_eq!(budget["spec"]["selector"], deployment["spec"]["selector"]);
    let container = &deployment["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(container["image"], "ghcr.io/pretrain-dev/pretrain:0.1.0");
    assert_eq!(
        container["args"],
        json!([
            "operator",
            "--listen=0.0.0.0:8080",
            "--ui=0.0.0.0:8090",
            "--lease=pretrain-system/pretrain",
            "--schedule-every=5",
            "--preempt-after=900",
            "--quarantine-after=3",
            "--quarantine-window=86400"
        ])
    );
    assert_eq!(container["securityContext"]["readOnlyRootFilesystem"], true);
    assert_eq!(deployment["spec"]["template"]["spec"]["securityContext"]["runAsNonRoot"], true);
    assert_eq!(container["livenessProbe"]["httpGet"]["path"], "/healthz");
    assert_eq!(container["resources"]["limits"]["memory"], "512Mi");
    assert!(container["envFrom"].is_null());
}

#[test]
fn representative_values_turn_on_what_they_name() {
    let objects = objects(&json!({
        "workerImage": "registry.example/pretrain-worker:1.2",
        "storageSecret": "s3-credentials",
        "scheduler": {"enabled": false},
        "defaultQueue": {"create": true, "gpuQuota": {"NVIDIA-H100-80GB-HBM3": 64, "*": 8}},
        "metrics": {"serviceMonitor": {"enabled": true, "interval": "15s"}},
    }));
    validate(&objects);
    let names = kinds(&objects);
    assert!(names.contains(&"PretrainQueue default".to_string()), "{names:?}");
    assert!(names.contains(&"ServiceMonitor pretrain".to_string()), "{names:?}");
    let container = &objects[0]["spec"]["template"]["spec"]["containers"][0];
    assert!(container["args"].as_array().unwrap().contains(&json!("--no-scheduler")));
    let env: Vec<(String, String)> = container["env"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| Some((e["name"].as_str()?.to_string(), e["value"].as_str()?.to_string())))
        .collect();
    assert!(env.contains(&("PRETRAIN_WORKER_IMAGE".into(), "registry.example/pretrain-worker:1.2".into())));
    assert!(env.contains(&("PRETRAIN_STORAGE_SECRET".into(), "s3-credentials".into())));
    assert_eq!(container["envFrom"][0]["secretRef"]["name"], "s3-credentials");
    let queue = objects.iter().find(|o| o["kind"] == "PretrainQueue").unwrap();
    assert_eq!(queue["spec"]["gpuQuota"]["NVIDIA-H100-80GB-HBM3"], 64);
}

#[test]
fn values_outside_the_schema_are_refused() {
    let schema: Value =
        serde_json::from_str(&std::fs::read_to_string(chart().join("values.schema.json")).unwrap()).unwrap();
    let validator = jsonschema::validator_for(&schema).unwrap();
    let mut values: Value =
        serde_yaml::from_str(&std::fs::read_to_string(chart().join("values.yaml")).unwrap()).unwrap();
    assert!(validator.is_valid(&values));
    for bad in [
        json!({"replicas": 0}),
        json!({"image": {"pullPolicy": "Sometimes"}}),
        json!({"storageSecret": "Not_A_Name"}),
        json!({"metrics": {"serviceMonitor": {"interval": "soon"}}}),
        json!({"defaultQueue": {"gpuQuota": {"H100": -1}}}),
        json!({"unknown": 1}),
    ] {
        let mut v = values.clone();
        merge(&mut v, &bad);
        assert!(!validator.is_valid(&v), "accepted {bad}");
    }
    merge(&mut values, &json!({"replicas": 3}));
    assert!(validator.is_valid(&values));
}

/// The operator's API calls, by resource: what the reconciler, the scheduler, the Event recorder
/// and leader election do (`operator/src/k8s/`); the mock-server tests assert each of these calls.
const USED: &[(&str, &str, &[&str])] = &[
    ("pretrain.dev", "pretrainruns", &["list", "watch", "patch"]), // controller watch; finalizer patch
    ("pretrain.dev", "pretrainruns/status", &["patch"]),           // reconciler SSA, scheduler merge
    ("pretrain.dev", "pretrainruns/finalizers", &["update"]),      // blockOwnerDeletion on what it owns
    ("pretrain.dev", "pretrainqueues", &["list"]),                 // scheduler pass
    ("pretrain.dev", "pretrainqueues/status", &["patch"]),         // scheduler pass
    ("batch", "jobs", &["list", "watch", "create", "patch", "delete"]), // SSA creates; stop deletes
    ("", "services", &["create", "patch"]),                        // SSA of a gang's Service
    ("", "configmaps", &["create", "patch"]),                      // SSA of the manifest
    ("", "pods", &["list"]),                                       // failure reasons; scheduler capacity
    ("", "nodes", &["get", "list", "patch"]),                      // a deleted pod's node; capacity; quarantine
    ("", "secrets", &["get"]),                                     // a run's store credentials
    ("events.k8s.io", "events", &["create", "patch"]),             // Recorder
];

#[test]
fn the_cluster_role_grants_exactly_what_the_operator_uses() {
    let objects = objects(&json!({}));
    let role = objects.iter().find(|o| o["kind"] == "ClusterRole").unwrap();
    let mut granted: Vec<(String, String, String)> = Vec::new();
    for rule in role["rules"].as_array().unwrap() {
        for group in rule["apiGroups"].as_array().unwrap() {
            for resource in rule["resources"].as_array().unwrap() {
                for verb in rule["verbs"].as_array().unwrap() {
                    granted.push((scalar(group), scalar(resource), scalar(verb)));
                }
            }
        }
    }
    granted.sort();
    let mut used: Vec<(String, String, String)> = USED
        .iter()
        .flat_map(|(g, r, verbs)| verbs.iter().map(move |v| ((*g).to_string(), (*r).to_string(), (*v).to_string())))
        .collect();
    used.sort();
    assert_eq!(granted, used);
    let leader = objects.iter().find(|o| o["kind"] == "Role").unwrap();
    assert_eq!(leader["rules"][0]["resources"], json!(["leases"]));
    assert_eq!(leader["rules"][0]["verbs"], json!(["get", "create", "update"]));
}
