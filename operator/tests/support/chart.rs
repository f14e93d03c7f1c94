//! The Helm chart rendered without Helm: the templates keep to a small subset of Helm's template
//! language (values, release fields, `quote`, `if`/`if not`/`end`, `toYaml ... | nindent N`,
//! whitespace trimming), which this file renders exactly as Helm would, and checks of the objects
//! against the Kubernetes schemas. Shared by the chart's tests and the docs' command checks.

#![allow(dead_code)]

use std::path::{Path, PathBuf};

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Service, ServiceAccount};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding};
use serde_json::{Value, json};

pub fn chart() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../charts/pretrain-operator")
}

pub fn lookup<'a>(root: &'a Value, path: &str) -> &'a Value {
    path.split('.').filter(|p| !p.is_empty()).fold(root, |v, key| &v[key])
}

pub fn truthy(v: &Value) -> bool {
    match v {
        Value::Null => false,
        Value::Bool(b) => *b,
        Value::Number(n) => n.as_f64() != Some(0.0),
        Value::String(s) => !s.is_empty(),
        Value::Array(a) => !a.is_empty(),
        Value::Object(o) => !o.is_empty(),
    }
}

pub fn scalar(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        other => other.to_string(),
    }
}

/// Evaluates one pipeline: `.X.y`, `.X.y | quote`, `toYaml .X.y | nindent N`.
pub fn evaluate(expr: &str, scope: &Value) -> String {
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
pub fn render(template: &str, scope: &Value) -> String {
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

pub fn merge(target: &mut Value, patch: &Value) {
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
pub fn objects(overrides: &Value) -> Vec<Value> {
    install("pretrain", "pretrain-system", overrides)
}

/// Every object `helm install RELEASE charts/pretrain-operator -n NAMESPACE` with `overrides` over
/// `values.yaml` creates, after checking the values against `values.schema.json`.
pub fn install(release: &str, namespace: &str, overrides: &Value) -> Vec<Value> {
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
        "Release": {"Name": release, "Namespace": namespace},
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
pub fn check<T: schemars::JsonSchema + serde::de::DeserializeOwned + serde::Serialize>(value: &Value) {
    let schema = serde_json::to_value(schemars::schema_for!(T)).unwrap();
    let validator = jsonschema::validator_for(&schema).unwrap();
    let errors: Vec<String> = validator.iter_errors(value).map(|e| format!("{e} at {}", e.instance_path())).collect();
    assert!(errors.is_empty(), "{} {}: {errors:?}", value["kind"], value["metadata"]["name"]);
    let typed: T = serde_json::from_value(value.clone()).unwrap();
    assert_eq!(&serde_json::to_value(typed).unwrap(), value, "a field the type does not know was dropped");
}

pub fn kinds(objects: &[Value]) -> Vec<String> {
    objects
        .iter()
        .map(|o| format!("{} {}", o["kind"].as_str().unwrap(), o["metadata"]["name"].as_str().unwrap()))
        .collect()
}

pub fn validate(objects: &[Value]) {
    for o in objects {
        match o["kind"].as_str().unwrap() {
            "Deployment" => check::<Deployment>(o),
            "PodDisruptionBudget" => check::<PodDisruptionBudget>(o),
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
