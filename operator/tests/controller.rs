//! The reconciler against a `tower-test` mock API server that asserts every request: method, path,
//! query (server-side apply with our field manager) and body, in order.

use std::sync::Arc;

use http::{Method, Request, Response};
use kube::client::Body;
use pretrain_crd::PretrainRun;
use pretrain_operator::k8s::controller::{Context, Error, FINALIZER, error_policy, reconcile};
use pretrain_operator::k8s::metrics::Metrics;
use pretrain_store::Store;
use serde_json::{Value, json};
use tower_test::mock::{Handle, SendResponse};

type ApiServer = Handle<Request<Body>, Response<Body>>;

/// A reconcile context on a mock API server, with the store at `store_url` and the clock at 1000.
fn context(store_url: &str) -> (Arc<Context>, ApiServer) {
    let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let client = kube::Client::new(service, "default");
    let mut ctx = Context::new(client, Arc::new(Metrics::default()));
    let url = store_url.to_string();
    ctx.open_store = Box::new(move |_, _| Store::open(&url));
    ctx.now = Box::new(|| 1000);
    (Arc::new(ctx), handle)
}

/// A run as the API server returns it: named `tiny` in namespace `ml`, with a uid and generation.
fn run(spec: &Value, extra_meta: Value, status: Option<Value>) -> PretrainRun {
    let mut meta = json!({"name": "tiny", "namespace": "ml", "uid": "6f1c", "generation": 1});
    let Value::Object(extra) = extra_meta else { panic!("metadata is an object") };
    meta.as_object_mut().unwrap().extend(extra);
    let mut value =
        json!({"apiVersion": "pretrain.dev/v1alpha1", "kind": "PretrainRun", "metadata": meta, "spec": spec});
    if let Some(s) = status {
        value["status"] = s;
    }
    serde_json::from_value(value).unwrap()
}

fn spec(store: &str) -> Value {
    json!({
        "storage": {"url": store},
        "data": {"sources": [{"name": "web", "url": "corpus.jsonl"}], "shards": 3},
        "model": {"preset": "tiny"},
        "train": {"schedule": {"warmupSteps": 10}, "resources": {"gpusPerNode": 0}}
    })
}

/// Takes the next request, checks its method and path (query included), and returns its JSON body
/// (`Null` when empty) with the handle to answer it.
async fn expect(server: &mut ApiServer, method: Method, path_and_query: &str) -> (Value, SendResponse<Response<Body>>) {
    let (request, send) = server.next_request().await.expect("the reconciler made a request");
    assert_eq!(request.method(), method, "{}", request.uri());
    assert_eq!(request.uri().path_and_query().unwrap().as_str(), path_and_query);
    let bytes = request.into_body().collect_bytes().await.unwrap();
    let body = if bytes.is_empty() { Value::Null } else { serde_json::from_slice(&bytes).unwrap() };
    (body, send)
}

fn reply(send: SendResponse<Response<Body>>, body: &Value) {
    send.send_response(Response::builder().body(Body::from(serde_json::to_vec(body).unwrap())).unwrap());
}

const APPLY: &str = "force=true&fieldManager=pretrain-operator";
const LIST_JOBS: &str = "/apis/batch/v1/namespaces/ml/jobs?&labelSelector=pretrain.dev%2Frun%3Dtiny";
const LIST_PODS: &str = "/api/v1/namespaces/ml/pods?&labelSelector=pretrain.dev%2Frun%3Dtiny";
const EVENTS: &str = "/apis/events.k8s.io/v1/namespaces/ml/events?";
const RUN: &str = "/apis/pretrain.dev/v1alpha1/namespaces/ml/pretrainruns/tiny?";

/// The status subresource, written with server-side apply.
fn status_path() -> String {
    format!("/apis/pretrain.dev/v1alpha1/namespaces/ml/pretrainruns/tiny/status?&{APPLY}")
}

fn empty_list(kind: &str) -> Value {
    json!({"apiVersion": "v1", "kind": kind, "metadata": {}, "items": []})
}

#[tokio::test]
async fn a_fresh_run_first_gets_only_its_finalizer() {
    let tmp = tempfile::tempdir().unwrap();
    let store = format!("file://{}", tmp.path().display());
    let (ctx, mut server) = context(&store);
    let fresh = Arc::new(run(&spec(&store), json!({}), None));
    let with_finalizer = serde_json::to_value(run(&spec(&store), json!({"finalizers": [FINALIZER]}), None)).unwrap();
    let answered = tokio::spawn(async move {
        let (body, send) = expect(&mut server, Method::PATCH, RUN).await;
        // A JSON patch whose test makes the server refuse it if the finalizers changed meanwhile.
        assert_eq!(
            body,
            json!([
                {"op": "test", "path": "/metadata/finalizers", "value": null},
                {"op": "add", "path": "/metadata/finalizers", "value": [FINALIZER]},
            ])
        );
        reply(send, &with_finalizer);
        server
    });
    // kube-runtime's finalizer helper: the write brings the run back, and the next reconcile acts.
    let action = reconcile(fresh, Arc::clone(&ctx)).await.unwrap();
    assert_eq!(action, kube::runtime::controller::Action::await_change());
    let mut server = answered.await.unwrap();
    assert!(tokio::time::timeout(std::time::Duration::from_millis(50), server.next_request()).await.is_err());
}

#[tokio::test]
async fn a_new_run_gets_its_manifest_first_job_status_and_event() {
    let tmp = tempfile::tempdir().unwrap();
    let store = format!("file://{}", tmp.path().display());
    let (ctx, mut server) = context(&store);
    let run = Arc::new(run(&spec(&store), json!({"finalizers": [FINALIZER]}), None));
    let object = serde_json::to_value(&*run).unwrap();
    let answered = tokio::spawn(async move {
        let (_, send) = expect(&mut server, Method::GET, LIST_JOBS).await;
        reply(send, &empty_list("JobList"));
        let (_, send) = expect(&mut server, Method::GET, LIST_PODS).await;
        reply(send, &empty_list("PodList"));

        let (cm, send) =
            expect(&mut server, Method::PATCH, &format!("/api/v1/namespaces/ml/configmaps/tiny-spec?&{APPLY}")).await;
        let manifest: PretrainRun = serde_yaml::from_str(cm["data"]["run.yaml"].as_str().unwrap()).unwrap();
        assert_eq!(manifest.metadata.name.as_deref(), Some("tiny"));
        assert_eq!(manifest.spec.data.shards, 3);
        assert_eq!(cm["metadata"]["ownerReferences"][0]["uid"], "6f1c");
        reply(send, &cm);

        let (job, send) = expect(
            &mut server,
            Method::PATCH,
            &format!("/apis/batch/v1/namespaces/ml/jobs/tiny-data-prep-map-1?&{APPLY}"),
        )
        .await;
        assert_eq!(job["kind"], "Job");
        assert_eq!(job["spec"]["completionMode"], "Indexed");
        assert_eq!(job["spec"]["completions"], 3);
        assert_eq!(job["spec"]["parallelism"], 3);
        assert_eq!(job["spec"]["backoffLimitPerIndex"], 3, "a failed map task is retried alone");
        assert_eq!(job["metadata"]["labels"]["pretrain.dev/attempt"], "1");
        assert_eq!(job["metadata"]["ownerReferences"][0]["kind"], "PretrainRun");
        assert_eq!(job["metadata"]["ownerReferences"][0]["controller"], true);
        let container = &job["spec"]["template"]["spec"]["containers"][0];
        assert_eq!(container["args"], json!(["data-prep", "--spec", "/etc/pretrain/run.yaml", "--phase", "map"]));
        assert_eq!(container["securityContext"]["readOnlyRootFilesystem"], true);
        reply(send, &job);

        let (patch, send) = expect(&mut server, Method::PATCH, &status_path()).await;
        assert_eq!(patch["kind"], "PretrainRun");
        let status = &patch["status"];
        assert_eq!(status["phase"], "Running");
        assert_eq!(status["stage"], "data-prep");
        assert_eq!(status["observedGeneration"], 1);
        assert_eq!(
            status["stages"][0],
            json!({"name": "data-prep", "phase": "Running", "attempts": 1, "startTime": "1970-01-01T00:16:40Z"})
        );
        assert_eq!(status["stages"].as_array().unwrap().len(), 4);
        let running = status["conditions"].as_array().unwrap().iter().find(|c| c["type"] == "Running").unwrap();
        assert_eq!(running["status"], "True");
        reply(send, &object);

        let (event, send) = expect(&mut server, Method::POST, EVENTS).await;
        assert_eq!(event["reason"], "StageStarted");
        assert_eq!(event["regarding"]["name"], "tiny");
        assert_eq!(event["type"], "Normal");
        reply(send, &event);
        server
    });
    let action = reconcile(run, Arc::clone(&ctx)).await.unwrap();
    assert_eq!(action, kube::runtime::controller::Action::requeue(std::time::Duration::from_secs(60)));
    let mut server = answered.await.unwrap();
    assert!(tokio::time::timeout(std::time::Duration::from_millis(50), server.next_request()).await.is_err());
    assert!(ctx.metrics.encode().contains("pretrain_operator_runs{phase=\"Running\"} 1"));
}

#[tokio::test]
async fn a_failed_map_pod_is_read_from_its_pods_and_counted_in_status() {
    let tmp = tempfile::tempdir().unwrap();
    let store = format!("file://{}", tmp.path().display());
    let (ctx, mut server) = context(&store);
    let status = json!({"phase": "Running", "stages": [{"name": "data-prep", "phase": "Running", "attempts": 1}], "observedGeneration": 1});
    let run = run(&spec(&store), json!({"finalizers": [FINALIZER]}), Some(status));
    let hash = run.spec.stage_config_hash(pretrain_crd::Stage::DataPrep);
    let object = serde_json::to_value(&run).unwrap();
    let run = Arc::new(run);
    let answered = tokio::spawn(async move {
        let (_, send) = expect(&mut server, Method::GET, LIST_JOBS).await;
        let job = json!({
            "apiVersion": "batch/v1", "kind": "Job",
            "metadata": {"name": "tiny-data-prep-map-1", "namespace": "ml",
                "labels": {"pretrain.dev/run": "tiny", "pretrain.dev/stage": "data-prep", "pretrain.dev/role": "map", "pretrain.dev/attempt": "1"},
                "annotations": {"pretrain.dev/config-hash": hash}},
            "status": {"failed": 1, "conditions": [{"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded"}]}
        });
        reply(send, &json!({"apiVersion": "batch/v1", "kind": "JobList", "metadata": {}, "items": [job]}));

        // The run's pods, one list for all its Jobs.
        let (_, send) = expect(&mut server, Method::GET, LIST_PODS).await;
        let pod = json!({
            "apiVersion": "v1", "kind": "Pod", "metadata": {"name": "tiny-data-prep-map-1-2-x7k2p",
                "labels": {"pretrain.dev/run": "tiny", "pretrain.dev/stage": "data-prep", "pretrain.dev/attempt": "1",
                    "batch.kubernetes.io/job-name": "tiny-data-prep-map-1"}},
            "status": {"phase": "Failed", "containerStatuses": [{
                "name": "worker", "image": "w", "imageID": "", "ready": false, "restartCount": 0,
                "state": {"terminated": {"exitCode": 137, "reason": "OOMKilled", "message": "reading shard 2\n"}}
            }]}
        });
        reply(send, &json!({"apiVersion": "v1", "kind": "PodList", "metadata": {}, "items": [pod]}));

        let (patch, send) = expect(&mut server, Method::PATCH, &status_path()).await;
        let stage = &patch["status"]["stages"][0];
        assert_eq!(stage["phase"], "Failed");
        assert_eq!(stage["failures"], 1);
        assert_eq!(
            stage["message"],
            "pod tiny-data-prep-map-1-2-x7k2p exited with code 137: OOMKilled: reading shard 2"
        );
        assert_eq!(patch["status"]["phase"], "Pending");
        reply(send, &object);

        let (event, send) = expect(&mut server, Method::POST, EVENTS).await;
        assert_eq!(event["type"], "Warning");
        assert_eq!(event["reason"], "StageFailed");
        reply(send, &event);
    });
    let action = reconcile(run, ctx).await.unwrap();
    // The restart waits for the backoff.
    assert_eq!(action, kube::runtime::controller::Action::requeue(std::time::Duration::from_secs(10)));
    answered.await.unwrap();
}

#[tokio::test]
async fn an_invalid_spec_fails_the_run_without_creating_anything() {
    let tmp = tempfile::tempdir().unwrap();
    let store = format!("file://{}", tmp.path().display());
    let (ctx, mut server) = context(&store);
    let mut bad = spec(&store);
    bad["train"]["seqLen"] = json!(2048);
    bad["longContext"] = json!({"seqLen": 1024});
    let run = Arc::new(run(&bad, json!({"finalizers": [FINALIZER]}), None));
    let object = serde_json::to_value(&*run).unwrap();
    let answered = tokio::spawn(async move {
        let (patch, send) = expect(&mut server, Method::PATCH, &status_path()).await;
        assert_eq!(patch["status"]["phase"], "Failed");
        assert!(patch["status"]["reason"].as_str().unwrap().contains("longContext.seqLen"), "{patch}");
        reply(send, &object);
        let (event, send) = expect(&mut server, Method::POST, EVENTS).await;
        assert_eq!(event["reason"], "InvalidSpec");
        reply(send, &event);
    });
    assert_eq!(reconcile(run, ctx).await.unwrap(), kube::runtime::controller::Action::await_change());
    answered.await.unwrap();
}

#[tokio::test]
async fn deleting_a_run_stops_its_jobs_deletes_its_data_when_asked_and_drops_the_finalizer() {
    let tmp = tempfile::tempdir().unwrap();
    let store = format!("file://{}", tmp.path().display());
    let s = Store::open(&store).unwrap();
    s.put(&pretrain_store::key("tiny/train/ckpt/latest").unwrap(), "step-000000010".into()).await.unwrap();
    s.put(&pretrain_store::key("other/train/ckpt/latest").unwrap(), "step-000000010".into()).await.unwrap();
    let (ctx, mut server) = context(&store);
    let mut spec = spec(&store);
    spec["storage"]["deleteOnRunDelete"] = json!(true);
    let meta = json!({"finalizers": ["other.io/keep", FINALIZER], "deletionTimestamp": "2026-11-28T00:00:00Z"});
    let run = Arc::new(run(&spec, meta, None));
    let object = serde_json::to_value(&*run).unwrap();
    let answered = tokio::spawn(async move {
        let (_, send) = expect(&mut server, Method::GET, LIST_JOBS).await;
        let job = |name: &str, status: Value| json!({"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": name, "namespace": "ml"}, "status": status});
        let items = [
            job("tiny-train-1", json!({"active": 2})),
            job("tiny-tokenize-reduce-1", json!({"conditions": [{"type": "Complete", "status": "True"}]})),
        ];
        reply(send, &json!({"apiVersion": "batch/v1", "kind": "JobList", "metadata": {}, "items": items}));

        let (body, send) = expect(&mut server, Method::DELETE, "/apis/batch/v1/namespaces/ml/jobs/tiny-train-1?").await;
        assert_eq!(body["propagationPolicy"], "Background");
        reply(send, &json!({"apiVersion": "v1", "kind": "Status", "status": "Success", "metadata": {}}));

        // The data goes only once no pod of the run runs (a stopped pod checkpoints first).
        let (_, send) = expect(&mut server, Method::GET, LIST_PODS).await;
        let pod = json!({"metadata": {"name": "tiny-tokenize-reduce-1-x"}, "status": {"phase": "Succeeded"}});
        reply(send, &json!({"apiVersion": "v1", "kind": "PodList", "metadata": {}, "items": [pod]}));

        let (event, send) = expect(&mut server, Method::POST, EVENTS).await;
        assert_eq!(event["reason"], "DataDeleted");
        reply(send, &event);

        let (body, send) = expect(&mut server, Method::PATCH, RUN).await;
        assert_eq!(
            body,
            json!([
                {"op": "test", "path": "/metadata/finalizers/1", "value": FINALIZER},
                {"op": "remove", "path": "/metadata/finalizers/1"},
            ])
        );
        reply(send, &object);
    });
    reconcile(run, ctx).await.unwrap();
    answered.await.unwrap();
    assert!(s.get_opt(&pretrain_store::key("tiny/train/ckpt/latest").unwrap()).await.unwrap().is_none());
    assert!(
        s.get_opt(&pretrain_store::key("other/train/ckpt/latest").unwrap()).await.unwrap().is_some(),
        "other runs' data is kept"
    );
}

#[tokio::test]
async fn a_deleted_run_keeps_its_data_while_a_pod_still_runs_its_sigterm_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let store = format!("file://{}", tmp.path().display());
    let s = Store::open(&store).unwrap();
    s.put(&pretrain_store::key("tiny/train/ckpt/latest").unwrap(), "step-000000010".into()).await.unwrap();
    let (ctx, mut server) = context(&store);
    let mut spec = spec(&store);
    spec["storage"]["deleteOnRunDelete"] = json!(true);
    let meta = json!({"finalizers": [FINALIZER], "deletionTimestamp": "2026-11-28T00:00:00Z"});
    let run = Arc::new(run(&spec, meta, None));
    let answered = tokio::spawn(async move {
        let (_, send) = expect(&mut server, Method::GET, LIST_JOBS).await;
        reply(send, &empty_list("JobList"));
        let (_, send) = expect(&mut server, Method::GET, LIST_PODS).await;
        let pod = json!({"metadata": {"name": "tiny-train-1-0-x", "deletionTimestamp": "2026-11-28T00:00:00Z"},
                         "status": {"phase": "Running"}});
        reply(send, &json!({"apiVersion": "v1", "kind": "PodList", "metadata": {}, "items": [pod]}));
    });
    let error = reconcile(Arc::clone(&run), Arc::clone(&ctx)).await.unwrap_err();
    answered.await.unwrap();
    assert!(matches!(error, Error::PodsStopping { live: 1 }), "{error}");
    // Not a failure: looked at again shortly, the finalizer kept.
    let action = error_policy(run, &error, Arc::clone(&ctx));
    assert_eq!(action, kube::runtime::controller::Action::requeue(std::time::Duration::from_secs(2)));
    assert!(!ctx.metrics.encode().contains("pods-stopping"), "not counted as a failed reconcile");
    assert!(
        s.get_opt(&pretrain_store::key("tiny/train/ckpt/latest").unwrap()).await.unwrap().is_some(),
        "the data of a run whose pods still run is kept"
    );
}
