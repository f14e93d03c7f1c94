//! The reconciler against an API server that fails: an in-memory cluster (runs, Jobs, pods,
//! ConfigMaps, Services, Events) answers every request, except that a share of them get a 409
//! conflict or a 500 before anything happens, or a 504 after the write took effect (the operator
//! cannot tell it did: the same as the operator dying between two of its writes). Every reconcile
//! starts from a fresh context, as after an operator restart. Jobs complete, and some fail, on a
//! simulated clock.
//!
//! The run must finish, with no Job created twice, never two live Jobs of one stage and role, and
//! each stage's attempts and failures exactly those the simulation caused.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};

use http::{Method, Request, Response, StatusCode};
use kube::client::Body;
use pretrain_crd::status::RunPhase;
use pretrain_crd::{PretrainRun, Stage};
use pretrain_operator::k8s::controller::{Context, reconcile};
use pretrain_operator::k8s::metrics::Metrics;
use pretrain_operator::k8s::render::{ANNOTATION_CONFIG_HASH, LABEL_ATTEMPT, LABEL_ROLE, LABEL_STAGE};
use pretrain_store::Store;
use serde_json::{Value, json};

/// Planned failures: (stage, role, attempt) whose Job fails once it has run a tick.
const FAILING: [(&str, &str, u32); 4] =
    [("data-prep", "map", 1), ("train", "gang", 1), ("train", "gang", 2), ("eval", "single", 1)];

#[derive(Default)]
struct Cluster {
    run: Value,
    jobs: BTreeMap<String, Value>,
    /// Tick at which each Job was created.
    born: BTreeMap<String, u32>,
    /// Times each Job name was created.
    created: BTreeMap<String, u32>,
    pods: Vec<Value>,
    faults: BTreeMap<&'static str, u32>,
    requests: u32,
    unexpected: Vec<String>,
    tick: u32,
    rng: u64,
}

impl Cluster {
    fn uniform(&mut self) -> f64 {
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        (self.rng >> 11) as f64 / (1u64 << 53) as f64
    }
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

/// Applies one request to the cluster; `None` for a request this server does not know.
fn handle(c: &mut Cluster, method: &Method, path: &str, query: &str, body: &Value) -> Option<Value> {
    const RUN: &str = "/apis/pretrain.dev/v1alpha1/namespaces/ml/pretrainruns/tiny";
    const JOBS: &str = "/apis/batch/v1/namespaces/ml/jobs";
    match (method.clone(), path) {
        (Method::PATCH, RUN) => {
            c.run["metadata"]["finalizers"] = body["metadata"]["finalizers"].clone();
            Some(c.run.clone())
        }
        (Method::PATCH, p) if p == format!("{RUN}/status") => {
            c.run["status"] = body["status"].clone();
            Some(c.run.clone())
        }
        (Method::GET, JOBS) => Some(list("JobList", c.jobs.values())),
        (Method::GET, "/api/v1/namespaces/ml/pods") => {
            let job = query.split("job-name%3D").nth(1)?.split('&').next()?.to_string();
            let pods = c.pods.iter().filter(|p| p["metadata"]["labels"]["batch.kubernetes.io/job-name"] == job);
            Some(list("PodList", pods))
        }
        (Method::PATCH, p) if p.starts_with(&format!("{JOBS}/")) => {
            let name = p.rsplit('/').next()?.to_string();
            let job = c.jobs.entry(name.clone()).or_insert_with(|| {
                *c.created.entry(name.clone()).or_default() += 1;
                c.born.insert(name.clone(), c.tick);
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
            Some(c.jobs.remove(name).unwrap_or_else(|| status(404, "NotFound")))
        }
        (Method::PATCH, p) if p.starts_with("/api/v1/namespaces/ml/configmaps/") => Some(body.clone()),
        (Method::PATCH, p) if p.starts_with("/api/v1/namespaces/ml/services/") => Some(body.clone()),
        (Method::POST, "/apis/events.k8s.io/v1/namespaces/ml/events") => Some(body.clone()),
        // The event recorder counts a repeated event on the one it created.
        (Method::PATCH, p) if p.starts_with("/apis/events.k8s.io/v1/namespaces/ml/events/") => {
            Some(json!({"apiVersion": "events.k8s.io/v1", "kind": "Event", "metadata": {"name": p.rsplit('/').next()},
                        "eventTime": null, "series": body.get("series")}))
        }
        _ => None,
    }
}

/// Serves requests until the client goes away, failing `rate` of them.
async fn serve(
    mut server: tower_test::mock::Handle<Request<Body>, Response<Body>>,
    cluster: Arc<Mutex<Cluster>>,
    rate: f64,
) {
    while let Some((request, send)) = server.next_request().await {
        let method = request.method().clone();
        let path = request.uri().path().to_string();
        let query = request.uri().query().unwrap_or("").to_string();
        let bytes = request.into_body().collect_bytes().await.unwrap();
        let body: Value = if bytes.is_empty() { Value::Null } else { serde_json::from_slice(&bytes).unwrap() };
        let mut c = cluster.lock().unwrap();
        c.requests += 1;
        let roll = if c.uniform() < rate { Some(c.uniform()) } else { None };
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
        let Some(answer) = handle(&mut c, &method, &path, &query, &body) else {
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

/// The kubelet and the workers: a Job that has run a tick completes, or fails as planned; the last
/// Job of a stage commits the stage's outputs.
async fn simulate(cluster: &Mutex<Cluster>, store: &Store, spec: &pretrain_crd::PretrainRunSpec) {
    let mut commits = Vec::new();
    {
        let mut c = cluster.lock().unwrap();
        let c = &mut *c;
        let mut pods = Vec::new();
        for (name, job) in &mut c.jobs {
            if job.get("status").is_some() || c.born[name] >= c.tick {
                continue;
            }
            let labels = job["metadata"]["labels"].clone();
            let (stage, role) = (labels[LABEL_STAGE].as_str().unwrap(), labels[LABEL_ROLE].as_str().unwrap());
            let attempt: u32 = labels[LABEL_ATTEMPT].as_str().unwrap().parse().unwrap();
            assert_eq!(
                job["metadata"]["annotations"][ANNOTATION_CONFIG_HASH],
                spec.stage_config_hash(stage.parse().unwrap()),
                "{name}"
            );
            let fails = FAILING.contains(&(stage, role, attempt));
            let condition = if fails { "Failed" } else { "Complete" };
            job["status"] = json!({"conditions": [{"type": condition, "status": "True"}]});
            if fails {
                pods.push(json!({
                    "metadata": {"name": format!("{name}-0"), "labels": {"batch.kubernetes.io/job-name": name}},
                    "status": {"phase": "Failed", "containerStatuses": [{
                        "name": "worker", "image": "w", "imageID": "", "ready": false, "restartCount": 0,
                        "state": {"terminated": {"exitCode": 1, "reason": "Error", "message": "injected failure"}}
                    }]}
                }));
            } else if role != "map" {
                commits.push(stage.parse::<Stage>().unwrap());
            }
        }
        c.pods.extend(pods);
    }
    for stage in commits {
        let dir = store.stage("tiny", stage).unwrap();
        dir.commit(&spec.stage_config_hash(stage), vec![], json!({})).await.unwrap();
    }
}

/// What one drill saw.
#[derive(Debug, Default)]
struct Summary {
    reconciles: u32,
    failed_reconciles: u32,
    requests: u32,
    faults: BTreeMap<&'static str, u32>,
    jobs: usize,
}

#[tokio::test]
async fn runs_finish_with_exact_restart_counts_while_the_api_fails_their_requests() {
    // 30 clusters failing a fifth of all requests, 4 failing half.
    let mut total = Summary::default();
    for (seed, rate) in (1..=30).map(|s| (s, 0.2)).chain((31..=34).map(|s| (s, 0.5))) {
        let one = drill(seed, rate).await;
        total.reconciles += one.reconciles;
        total.failed_reconciles += one.failed_reconciles;
        total.requests += one.requests;
        total.jobs += one.jobs;
        for (k, v) in one.faults {
            *total.faults.entry(k).or_default() += v;
        }
    }
    let faults: u32 = total.faults.values().sum();
    eprintln!(
        "34 runs finished: {} reconciles ({} failed), {} requests, {faults} faults {:?}, {} Jobs, each created once",
        total.reconciles, total.failed_reconciles, total.requests, total.faults, total.jobs
    );
}

async fn drill(seed: u64, rate: f64) -> Summary {
    let tmp = tempfile::tempdir().unwrap();
    let store_url = format!("file://{}", tmp.path().display());
    let spec = json!({
        "storage": {"url": store_url},
        "data": {"sources": [{"name": "web", "url": "corpus.jsonl"}], "shards": 2},
        "model": {"preset": "tiny"},
        "train": {"schedule": {"warmupSteps": 10}, "resources": {"gpusPerNode": 0}, "maxRestarts": 3},
    });
    let run = json!({"apiVersion": "pretrain.dev/v1alpha1", "kind": "PretrainRun",
        "metadata": {"name": "tiny", "namespace": "ml", "uid": "6f1c", "generation": 1}, "spec": spec});
    let parsed: PretrainRun = serde_json::from_value(run.clone()).unwrap();
    let cluster =
        Arc::new(Mutex::new(Cluster { run, rng: seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1, ..Cluster::default() }));
    let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let server = tokio::spawn(serve(handle, Arc::clone(&cluster), rate));
    let client = kube::Client::new(service, "ml");
    let store = Store::open(&store_url).unwrap();
    let clock = Arc::new(AtomicI64::new(1000));

    let mut reconciles = 0;
    let mut failed_reconciles = 0;
    loop {
        let run: PretrainRun = serde_json::from_value(cluster.lock().unwrap().run.clone()).unwrap();
        match run.status.as_ref().and_then(|s| s.phase) {
            Some(RunPhase::Succeeded) => break,
            Some(RunPhase::Failed) => panic!("the run failed: {:#}", cluster.lock().unwrap().run["status"]),
            _ => {}
        }
        // At a 50% failure rate a reconcile that makes four writes succeeds about one time in 16.
        assert!(reconciles < 3000, "seed {seed}: the run is stuck: {:#}", cluster.lock().unwrap().run["status"]);
        // A fresh operator every time: nothing carries over but the cluster and the store.
        let mut ctx = Context::new(client.clone(), Arc::new(Metrics::default()));
        let url = store_url.clone();
        ctx.open_store = Box::new(move |_| Store::open(&url));
        let now = Arc::clone(&clock);
        ctx.now = Box::new(move || now.load(Ordering::SeqCst));
        ctx.scheduler = false;
        if reconcile(Arc::new(run), Arc::new(ctx)).await.is_err() {
            failed_reconciles += 1;
        }
        reconciles += 1;
        {
            let c = cluster.lock().unwrap();
            let mut live = BTreeSet::new();
            for job in c.jobs.values().filter(|j| j.get("status").is_none()) {
                let labels = &job["metadata"]["labels"];
                let key = (labels[LABEL_STAGE].to_string(), labels[LABEL_ROLE].to_string());
                assert!(live.insert(key.clone()), "two live Jobs for {key:?}: {:?}", c.jobs.keys());
            }
        }
        simulate(&cluster, &store, &parsed.spec).await;
        let mut c = cluster.lock().unwrap();
        c.tick += 1;
        // Past any restart backoff (at most 10 minutes).
        clock.fetch_add(700, Ordering::SeqCst);
    }
    let c = cluster.lock().unwrap();
    assert!(c.unexpected.is_empty(), "requests this server does not know: {:?}", c.unexpected);
    for (name, times) in &c.created {
        assert_eq!(*times, 1, "seed {seed}: Job {name} was created {times} times");
    }
    let stages = c.run["status"]["stages"].as_array().unwrap();
    assert_eq!(stages.len(), 4, "data-prep, tokenize, train and eval: {stages:?}");
    for s in stages {
        let stage = s["name"].as_str().unwrap();
        let planned = FAILING.iter().filter(|(f, ..)| *f == stage).count() as u64;
        assert_eq!(s["phase"], "Succeeded", "{s}");
        assert_eq!(s["attempts"].as_u64().unwrap_or(1), planned + 1, "seed {seed}: {stage}: attempts in {s}");
        assert_eq!(s["failures"].as_u64().unwrap_or(0), planned, "seed {seed}: {stage}: failures in {s}");
    }
    assert!(c.faults.values().sum::<u32>() > 0, "seed {seed}: no fault injected");
    let summary = Summary {
        reconciles,
        failed_reconciles,
        requests: c.requests,
        faults: c.faults.clone(),
        jobs: c.created.len(),
    };
    drop(c);
    server.abort();
    summary
}
