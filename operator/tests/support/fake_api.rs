//! An in-memory Kubernetes API server for the reconciler: PretrainRuns (with status and
//! finalizers), Jobs, pods, ConfigMaps, Services and Events in namespace `ml`, answering the
//! requests the controller makes. It can fail a share of requests: a 409 conflict or a 500 before
//! anything happens, or a 504 after the write took effect. Jobs complete, or fail, when
//! [`Cluster::simulate`] says. Shared by `tests/api_faults.rs` and `benches/reconcile.rs`, where
//! thousands of reconciles must run in seconds.
//!
//! What it does not model, and what is therefore tested on the real control plane instead
//! (`tests/tests/cluster.rs`): resourceVersions and conflicts from them, server-side apply's field
//! managers and merge semantics, schema validation, garbage collection through owner references,
//! deletion grace periods, admission and RBAC, the Job controller (pod failure policies, indexes),
//! the Kubernetes scheduler, nodes and their loss, label selectors beyond the run and job labels.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use http::{Method, Request, Response, StatusCode};
use kube::client::Body;
use pretrain_crd::{PretrainRun, Stage};
use pretrain_operator::labels::{ANNOTATION_CONFIG_HASH, LABEL_ATTEMPT, LABEL_ROLE, LABEL_RUN, LABEL_STAGE};
use pretrain_store::Store;
use serde_json::{Value, json};

/// The cluster's objects and what happened to them.
#[derive(Default)]
pub struct Cluster {
    /// PretrainRuns by name.
    pub runs: BTreeMap<String, Value>,
    /// Jobs by name.
    pub jobs: BTreeMap<String, Value>,
    /// Tick at which each Job was created.
    pub born: BTreeMap<String, u32>,
    /// Times each Job name was created.
    pub created: BTreeMap<String, u32>,
    /// Pods of failed Jobs.
    pub pods: Vec<Value>,
    /// Faults injected, by kind.
    pub faults: BTreeMap<&'static str, u32>,
    /// Requests answered.
    pub requests: u32,
    /// Requests this server does not know.
    pub unexpected: Vec<String>,
    /// The simulation's clock, in ticks.
    pub tick: u32,
    /// Share of requests that fail.
    pub fault_rate: f64,
    /// Jobs that fail once they have run: (stage, role, attempt).
    pub failing: Vec<(&'static str, &'static str, u32)>,
    rng: u64,
}

impl Cluster {
    /// An empty cluster whose faults follow `seed`.
    pub fn new(seed: u64, fault_rate: f64) -> Self {
        Self { rng: seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1, fault_rate, ..Self::default() }
    }

    /// Adds a run named `name` in namespace `ml` with `spec`.
    pub fn add_run(&mut self, name: &str, spec: &Value) {
        let run = json!({"apiVersion": "pretrain.dev/v1alpha1", "kind": "PretrainRun",
            "metadata": {"name": name, "namespace": "ml", "uid": format!("uid-{name}"), "generation": 1},
            "spec": spec});
        self.runs.insert(name.to_string(), run);
    }

    /// The run as a watch would deliver it now.
    pub fn run(&self, name: &str) -> PretrainRun {
        serde_json::from_value(self.runs[name].clone()).expect("a stored run parses")
    }

    fn uniform(&mut self) -> f64 {
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        (self.rng >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Applies one request; `None` for a request this server does not know.
    fn handle(&mut self, method: &Method, path: &str, query: &str, body: &Value) -> Option<Value> {
        const RUNS: &str = "/apis/pretrain.dev/v1alpha1/namespaces/ml/pretrainruns/";
        const JOBS: &str = "/apis/batch/v1/namespaces/ml/jobs";
        if let Some(rest) = path.strip_prefix(RUNS) {
            let (name, sub) = rest.split_once('/').map_or((rest, None), |(n, s)| (n, Some(s)));
            let run = self.runs.get_mut(name)?;
            match (method.clone(), sub) {
                (Method::PATCH, None) if body.is_array() => {
                    // The API server's JSON patch reads a missing field as null (a `test` for null passes).
                    if run["metadata"].get("finalizers").is_none() {
                        run["metadata"]["finalizers"] = Value::Null;
                    }
                    let patch: json_patch::Patch = serde_json::from_value(body.clone()).ok()?;
                    json_patch::patch(run, &patch).ok()?;
                }
                (Method::PATCH, None) => run["metadata"]["finalizers"] = body["metadata"]["finalizers"].clone(),
                (Method::PATCH, Some("status")) => run["status"] = body["status"].clone(),
                _ => return None,
            }
            return Some(run.clone());
        }
        match (method.clone(), path) {
            (Method::GET, JOBS) => {
                let run = query.split("run%3D").nth(1)?.split('&').next()?;
                Some(list("JobList", self.jobs.values().filter(|j| j["metadata"]["labels"][LABEL_RUN] == run)))
            }
            (Method::GET, "/api/v1/namespaces/ml/pods") => {
                let run = query.split("run%3D").nth(1)?.split('&').next()?;
                Some(list("PodList", self.pods.iter().filter(|p| p["metadata"]["labels"][LABEL_RUN] == run)))
            }
            (Method::PATCH, p) if p.starts_with(&format!("{JOBS}/")) => {
                let name = p.rsplit('/').next()?.to_string();
                let (created, born, tick) = (&mut self.created, &mut self.born, self.tick);
                let job = self.jobs.entry(name.clone()).or_insert_with(|| {
                    *created.entry(name.clone()).or_default() += 1;
                    born.insert(name.clone(), tick);
                    json!({})
                });
                let kept = job.get("status").cloned();
                *job = body.clone();
                if let Some(s) = kept {
                    job["status"] = s;
                }
                Some(job.clone())
            }
            (Method::DELETE, p) if p.starts_with(&format!("{JOBS}/")) => {
                let name = p.rsplit('/').next()?;
                Some(self.jobs.remove(name).unwrap_or_else(|| status(404, "NotFound")))
            }
            (Method::PATCH, p) if p.starts_with("/api/v1/namespaces/ml/configmaps/") => Some(body.clone()),
            (Method::PATCH, p) if p.starts_with("/api/v1/namespaces/ml/services/") => Some(body.clone()),
            (Method::POST, "/apis/events.k8s.io/v1/namespaces/ml/events") => Some(body.clone()),
            // The event recorder counts a repeated event on the one it created.
            (Method::PATCH, p) if p.starts_with("/apis/events.k8s.io/v1/namespaces/ml/events/") => Some(json!({
                "apiVersion": "events.k8s.io/v1", "kind": "Event", "metadata": {"name": p.rsplit('/').next()},
                "eventTime": null, "series": body.get("series")
            })),
            _ => None,
        }
    }

    /// The kubelet and the workers: a Job that has run a tick completes, or fails as planned (or
    /// when `fail` says); the last Job of a stage commits the stage's outputs to `store`.
    pub async fn simulate(cluster: &Mutex<Self>, store: &Store, fail: &dyn Fn(&str) -> bool) {
        let mut commits = Vec::new();
        {
            let mut guard = cluster.lock().unwrap();
            let c = &mut *guard;
            let mut pods = Vec::new();
            for (name, job) in &mut c.jobs {
                if job.get("status").is_some() || c.born[name] >= c.tick {
                    continue;
                }
                let labels = job["metadata"]["labels"].clone();
                let (run, stage, role) = (
                    labels[LABEL_RUN].as_str().unwrap().to_string(),
                    labels[LABEL_STAGE].as_str().unwrap(),
                    labels[LABEL_ROLE].as_str().unwrap(),
                );
                let attempt: u32 = labels[LABEL_ATTEMPT].as_str().unwrap().parse().unwrap();
                let stage: Stage = stage.parse().unwrap();
                let spec: PretrainRun = serde_json::from_value(c.runs[&run].clone()).unwrap();
                let hash = spec.spec.stage_config_hash(stage);
                assert_eq!(job["metadata"]["annotations"][ANNOTATION_CONFIG_HASH], hash.as_str(), "{name}");
                let fails = c.failing.contains(&(stage.as_str(), role, attempt)) || fail(name);
                let condition = if fails { "Failed" } else { "Complete" };
                job["status"] = json!({"conditions": [{"type": condition, "status": "True"}]});
                if fails {
                    pods.push(failed_pod(name, &labels));
                } else if role != "map" {
                    commits.push((run, stage, hash));
                }
            }
            c.pods.extend(pods);
        }
        for (run, stage, hash) in commits {
            store.stage(&run, stage).unwrap().commit(&hash, vec![], json!({})).await.unwrap();
        }
    }
}

/// The pod of a failed Job that exited 1 (its peers, deleted by the Job controller, are gone).
fn failed_pod(job: &str, job_labels: &Value) -> Value {
    let mut labels = job_labels.clone();
    labels["batch.kubernetes.io/job-name"] = job.into();
    json!({
        "metadata": {"name": format!("{job}-0"), "labels": labels},
        "status": {"phase": "Failed", "containerStatuses": [{
            "name": "worker", "image": "w", "imageID": "", "ready": false, "restartCount": 0,
            "state": {"terminated": {"exitCode": 1, "reason": "Error", "message": "injected failure"}}
        }]}
    })
}

fn status(code: u16, reason: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": reason,
           "reason": reason, "code": code})
}

fn respond(code: StatusCode, body: &Value) -> Response<Body> {
    Response::builder().status(code).body(Body::from(serde_json::to_vec(body).unwrap())).unwrap()
}

fn list<'a>(kind: &str, items: impl Iterator<Item = &'a Value>) -> Value {
    json!({"apiVersion": "v1", "kind": kind, "metadata": {"resourceVersion": "1"}, "items": items.collect::<Vec<_>>()})
}

/// A client for the cluster, and the task serving its requests.
pub fn connect(cluster: &Arc<Mutex<Cluster>>) -> (kube::Client, tokio::task::JoinHandle<()>) {
    let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    (kube::Client::new(service, "ml"), tokio::spawn(serve(handle, Arc::clone(cluster))))
}

async fn serve(mut server: tower_test::mock::Handle<Request<Body>, Response<Body>>, cluster: Arc<Mutex<Cluster>>) {
    while let Some((request, send)) = server.next_request().await {
        let method = request.method().clone();
        let path = request.uri().path().to_string();
        let query = request.uri().query().unwrap_or("").to_string();
        let bytes = request.into_body().collect_bytes().await.unwrap();
        let body: Value = if bytes.is_empty() { Value::Null } else { serde_json::from_slice(&bytes).unwrap() };
        let mut c = cluster.lock().unwrap();
        c.requests += 1;
        let rate = c.fault_rate;
        let roll = if rate > 0.0 && c.uniform() < rate { Some(c.uniform()) } else { None };
        match roll {
            Some(r) if r < 0.3 => {
                *c.faults.entry("409 conflict").or_default() += 1;
                send.send_response(respond(StatusCode::CONFLICT, &status(409, "Conflict")));
                continue;
            }
            Some(r) if r < 0.6 => {
                *c.faults.entry("500 error").or_default() += 1;
                send.send_response(respond(StatusCode::INTERNAL_SERVER_ERROR, &status(500, "InternalError")));
                continue;
            }
            _ => {}
        }
        let Some(answer) = c.handle(&method, &path, &query, &body) else {
            c.unexpected.push(format!("{method} {path}?{query}"));
            send.send_response(respond(StatusCode::NOT_FOUND, &status(404, "NotFound")));
            continue;
        };
        if roll.is_some() {
            // The write happened; the answer is lost.
            *c.faults.entry("504 after the write").or_default() += 1;
            send.send_response(respond(StatusCode::GATEWAY_TIMEOUT, &status(504, "Timeout")));
        } else if answer["kind"] == "Status" {
            send.send_response(respond(StatusCode::NOT_FOUND, &answer));
        } else {
            send.send_response(respond(StatusCode::OK, &answer));
        }
    }
}

/// A fresh reconcile context, as after an operator restart: nothing carries over but the cluster
/// and the store.
pub fn context(client: &kube::Client, store_url: &str, now: i64) -> pretrain_operator::k8s::controller::Context {
    let mut ctx = pretrain_operator::k8s::controller::Context::new(
        client.clone(),
        Arc::new(pretrain_operator::k8s::metrics::Metrics::default()),
    );
    let url = store_url.to_string();
    ctx.open_store = Box::new(move |_, _| Store::open(&url));
    ctx.now = Box::new(move || now);
    ctx.scheduler = false;
    ctx
}

/// A small CPU-only spec storing in `store_url`.
pub fn spec(store_url: &str) -> Value {
    json!({
        "storage": {"url": store_url},
        "data": {"sources": [{"name": "web", "url": "corpus.jsonl"}], "shards": 2},
        "model": {"preset": "tiny"},
        "train": {"schedule": {"warmupSteps": 10}, "resources": {"gpusPerNode": 0}, "maxRestarts": 3},
    })
}
