//! The Helm chart, rendered here without Helm: the templates keep to a small subset of Helm's
//! template language (values, release fields, `quote`, `if`/`if not`/`end`, `toYaml ... | nindent N`,
//! whitespace trimming), which this file renders exactly as Helm would. Every object of the defaults
//! and of representative values validates against the Kubernetes schemas, the values against
//! `values.schema.json`, and the ClusterRole grants exactly the verbs the operator uses.

use std::path::{Path, PathBuf};

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Service, ServiceAccount};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding};
use serde_json::{Value, json};

fn chart() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../charts/pretrain-operator")
}

fn lookup<'a>(root: &'a Value, path: &str) -> &'a Value {
    path.split('.').filter(|p| !p.is_empty()).fold(root, |v, key| &v[key])
}

fn truthy(v: &Value) -> bool {
    match v {
        Value::Null => false,
        Value::Bool(b) => *b,
        Value::Number(n) => n.as_f64() != Some(0.0),
        Value::String(s) => !s.is_empty(),
        Value::Array(a) => !a.is_empty(),
        Value::Object(o) => !o.is_empty(),
    }
}

fn scalar(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        other => other.to_string(),
    }
}

/// Evaluates one pipeline: `.X.y`, `.X.y | quote`, `toYaml .X.y | nindent N`.
fn evaluate(expr: &str, scope: &Value) -> String {
    let stages: Vec<&str> = expr.split('|').map(str::trim).collect();
    let mut words = stages[0].split_whitespace();
    let mut out = match (words.next(), words.next()) {
        (Some("toYaml"), Some(path)) => {
            let yaml = serde_yaml::to_string(lookup(scope, path)).unwrap();
            yaml.trim_end().to_string()
        }
        (Some(path), None) if path.starts_with('.') => scalar(lookup(scope, path)),
        _ => panic!("unsupported template expression {expr:?}"),
    };
    for stage in &stages[1..] {
        let mut words = stage.split_whitespace();
        out = match (words.next(), words.next()) {
            (Some("quote"), None) => serde_json::to_string(&out).unwrap(),
            (Some("nindent"), Some(n)) => {
                let pad = " ".repeat(n.parse().unwrap());
                format!("\n{}", out.lines().map(|l| format!("{pad}{l}")).collect::<Vec<_>>().join("\n"))
            }
            _ => panic!("unsupported template function in {expr:?}"),
        };
    }
    out
}

/// Renders a template as Helm does, for the subset the chart uses.
fn render(template: &str, scope: &Value) -> String {
    let mut out = String::new();
    // One entry per open `if`: whether its body is emitted.
    let mut emitting: Vec<bool> = Vec::new();
    let mut rest = template;
    let mut trim_next = false;
    while !rest.is_empty() {
        let (text, action) = match rest.find("{{") {
            Some(i) => (&rest[..i], Some(&rest[i + 2..])),
            None => (rest, None),
        };
        let text = if trim_next { text.trim_start() } else { text };
        let on = emitting.iter().all(|e| *e);
        let Some(action) = action else {
            if on {
                out.push_str(text);
            }
            break;
        };
        let end = action.find("}}").expect("an action is closed");
        let mut inner = &action[..end];
        rest = &action[end + 2..];
        if let Some(stripped) = inner.strip_prefix('-') {
            inner = stripped;
            if on {
                out.push_str(text.trim_end());
            }
        } else if on {
            out.push_str(text);
        }
        trim_next = inner.ends_with('-');
        let inner = inner.trim_end_matches('-').trim();
        if let Some(cond) = inner.strip_prefix("if ") {
            let value = match cond.trim().strip_prefix("not ") {
                Some(path) => !truthy(lookup(scope, path.trim())),
                None => truthy(lookup(scope, cond.trim())),
            };
            emitting.push(value);
        } else if inner == "end" {
            emitting.pop().expect("an end closes an if");
        } else if emitting.iter().all(|e| *e) {
            out.push_str(&evaluate(inner, scope));
        }
    }
    assert!(emitting.is_empty(), "an if is not closed");
    out
}

fn merge(target: &mut Value, patch: &Value) {
    match (target, patch) {
        (Value::Object(t), Value::Object(p)) => {
            for (k, v) in p {
                merge(t.entry(k.clone()).or_insert(Value::Null), v);
            }
        }
        (t, p) => *t = p.clone(),
    }
}

/// Every object of the chart for `overrides` over `values.yaml`, after checking the values.
fn objects(overrides: &Value) -> Vec<Value> {
    let mut values: Value =
        serde_yaml::from_str(&std::fs::read_to_string(chart().join("values.yaml")).unwrap()).unwrap();
    merge(&mut values, overrides);
    let schema: Value =
        serde_json::from_str(&std::fs::read_to_string(chart().join("values.schema.json")).unwrap()).unwrap();
    let validator = jsonschema::validator_for(&schema).unwrap();
    let errors: Vec<String> = validator.iter_errors(&values).map(|e| format!("{e} at {}", e.instance_path())).collect();
    assert!(errors.is_empty(), "values: {errors:?}");
    let chart_yaml: Value =
        serde_yaml::from_str(&std::fs::read_to_string(chart().join("Chart.yaml")).unwrap()).unwrap();
    let scope = json!({
        "Values": values,
        "Release": {"Name": "pretrain", "Namespace": "pretrain-system"},
        "Chart": {"AppVersion": chart_yaml["appVersion"], "Version": chart_yaml["version"]},
    });
    let mut files: Vec<PathBuf> =
        std::fs::read_dir(chart().join("templates")).unwrap().map(|e| e.unwrap().path()).collect();
    files.sort();
    let mut out = Vec::new();
    for file in files {
        let text = render(&std::fs::read_to_string(&file).unwrap(), &scope);
        for doc in text.split("\n---\n") {
            let value: Value = serde_yaml::from_str(doc).unwrap_or_else(|e| panic!("{}: {e}\n{doc}", file.display()));
            if !value.is_null() {
                out.push(value);
            }
        }
    }
    out
}

/// Validates `value` against the JSON schema of `T` and checks it survives `T` unchanged.
fn check<T: schemars::JsonSchema + serde::de::DeserializeOwned + serde::Serialize>(value: &Value) {
    let schema = serde_json::to_value(schemars::schema_for!(T)).unwrap();
    let validator = jsonschema::validator_for(&schema).unwrap();
    let errors: Vec<String> = validator.iter_errors(value).map(|e| format!("{e} at {}", e.instance_path())).collect();
    assert!(errors.is_empty(), "{} {}: {errors:?}", value["kind"], value["metadata"]["name"]);
    let typed: T = serde_json::from_value(value.clone()).unwrap();
    assert_eq!(&serde_json::to_value(typed).unwrap(), value, "a field the type does not know was dropped");
}

fn kinds(objects: &[Value]) -> Vec<String> {
    objects
        .iter()
        .map(|o| format!("{} {}", o["kind"].as_str().unwrap(), o["metadata"]["name"].as_str().unwrap()))
        .collect()
}

fn validate(objects: &[Value]) {
    for o in objects {
        match o["kind"].as_str().unwrap() {
            "Deployment" => check::<Deployment>(o),
            "ServiceAccount" => check::<ServiceAccount>(o),
            "Service" => check::<Service>(o),
            "ClusterRole" => check::<ClusterRole>(o),
            "ClusterRoleBinding" => check::<ClusterRoleBinding>(o),
            "Role" => check::<Role>(o),
            "RoleBinding" => check::<RoleBinding>(o),
            "PretrainQueue" => {
                let queue: pretrain_crd::PretrainQueue = serde_json::from_value(o.clone()).unwrap();
                assert_eq!(queue.metadata.name.as_deref(), Some("default"));
            }
            "ServiceMonitor" => {
                assert_eq!(o["apiVersion"], "monitoring.coreos.com/v1");
                assert_eq!(o["spec"]["endpoints"][0]["port"], "metrics");
            }
            other => panic!("unexpected kind {other}"),
        }
    }
}

#[test]
fn the_default_install_is_valid_kubernetes_and_runs_the_operator_safely() {
    let objects = objects(&json!({}));
    validate(&objects);
    assert_eq!(
        kinds(&objects),
        [
            "Deployment pretrain",
            "ClusterRole pretrain",
            "ClusterRoleBinding pretrain",
            "Role pretrain-leader",
            "RoleBinding pretrain-leader",
            "Service pretrain-metrics",
            "ServiceAccount pretrain",
        ]
    );
    let deployment = &objects[0];
    assert_eq!(deployment["spec"]["replicas"], 2);
    let container = &deployment["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(container["image"], "ghcr.io/pretrain-dev/pretrain:0.1.0");
    assert_eq!(
        container["args"],
        json!(["operator", "--listen=0.0.0.0:8080", "--lease=pretrain-system/pretrain", "--schedule-every=5"])
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
    ("pretrain.dev", "pretrainqueues", &["list"]),                 // scheduler pass
    ("pretrain.dev", "pretrainqueues/status", &["patch"]),         // scheduler pass
    ("batch", "jobs", &["list", "watch", "create", "patch", "delete"]), // SSA creates; stop deletes
    ("", "services", &["create", "patch"]),                        // SSA of a gang's Service
    ("", "configmaps", &["create", "patch"]),                      // SSA of the manifest
    ("", "pods", &["list"]),                                       // failure reasons; scheduler capacity
    ("", "nodes", &["list"]),                                      // scheduler capacity
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
