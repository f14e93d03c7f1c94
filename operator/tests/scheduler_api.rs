//! One pass of the cluster scheduler against a `tower-test` mock API server that asserts every
//! request: it lists runs, nodes, live pods and queues, then writes the admission into the run's
//! status and the usage into the queue's, with its own field manager.

use http::{Method, Request, Response};
use kube::client::Body;
use pretrain_operator::k8s::scheduler::pass;
use pretrain_operator::schedule::Policy;
use serde_json::{Value, json};
use tower_test::mock::{Handle, SendResponse};

type ApiServer = Handle<Request<Body>, Response<Body>>;

async fn expect(server: &mut ApiServer, method: Method, path_and_query: &str) -> (Value, SendResponse<Response<Body>>) {
    let (request, send) = server.next_request().await.expect("the scheduler made a request");
    assert_eq!(request.method(), method, "{}", request.uri());
    assert_eq!(request.uri().path_and_query().unwrap().as_str(), path_and_query);
    if method == Method::PATCH {
        assert_eq!(request.headers()["content-type"], "application/merge-patch+json");
    }
    let bytes = request.into_body().collect_bytes().await.unwrap();
    let body = if bytes.is_empty() { Value::Null } else { serde_json::from_slice(&bytes).unwrap() };
    (body, send)
}

fn reply(send: SendResponse<Response<Body>>, body: &Value) {
    send.send_response(Response::builder().body(Body::from(serde_json::to_vec(body).unwrap())).unwrap());
}

fn list(kind: &str, items: &[Value]) -> Value {
    json!({"apiVersion": "v1", "kind": kind, "metadata": {}, "items": items})
}

const H100: &str = "NVIDIA-H100-80GB-HBM3";

#[tokio::test]
async fn a_pass_admits_a_queued_gang_and_reports_the_queue() {
    let (service, mut server) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let client = kube::Client::new(service, "default");
    let run = json!({
        "apiVersion": "pretrain.dev/v1alpha1", "kind": "PretrainRun",
        "metadata": {"name": "big", "namespace": "ml", "creationTimestamp": "2026-01-01T00:00:00Z"},
        "spec": {
            "storage": {"url": "s3://bucket/runs"},
            "data": {"sources": [{"name": "web", "url": "s3://bucket/raw/*.warc.gz"}]},
            "model": {"preset": "llama-1b"},
            "train": {"resources": {"nodes": 2, "gpusPerNode": 8, "gpuType": H100}},
            "scheduling": {"queue": "research"}
        },
        "status": {"phase": "Queued", "stage": "train", "stages": [{"name": "train", "phase": "Pending", "attempts": 0}]}
    });
    let node = |name: &str| {
        json!({
            "metadata": {"name": name, "labels": {"nvidia.com/gpu.product": H100}},
            "status": {"allocatable": {"nvidia.com/gpu": "8", "cpu": "96", "memory": "1Ti"},
                       "conditions": [{"type": "Ready", "status": "True"}]}
        })
    };
    let queue = json!({
        "apiVersion": "pretrain.dev/v1alpha1", "kind": "PretrainQueue",
        "metadata": {"name": "research"}, "spec": {"gpuQuota": {H100: 32}}
    });
    let answered = tokio::spawn(async move {
        let (_, send) = expect(&mut server, Method::GET, "/apis/pretrain.dev/v1alpha1/pretrainruns?").await;
        reply(send, &list("PretrainRunList", std::slice::from_ref(&run)));
        let (_, send) = expect(&mut server, Method::GET, "/api/v1/nodes?").await;
        reply(send, &list("NodeList", &[node("n1"), node("n2")]));
        let (_, send) = expect(
            &mut server,
            Method::GET,
            "/api/v1/pods?&fieldSelector=status.phase%21%3DSucceeded%2Cstatus.phase%21%3DFailed",
        )
        .await;
        reply(send, &list("PodList", &[]));
        let (_, send) = expect(&mut server, Method::GET, "/apis/pretrain.dev/v1alpha1/pretrainqueues?").await;
        reply(send, &list("PretrainQueueList", std::slice::from_ref(&queue)));

        let (patch, send) = expect(
            &mut server,
            Method::PATCH,
            "/apis/pretrain.dev/v1alpha1/namespaces/ml/pretrainruns/big/status?&fieldManager=pretrain-scheduler",
        )
        .await;
        let admission = &patch["status"]["admission"];
        assert_eq!(admission["stage"], "train");
        assert_eq!(admission["attempt"], 1);
        assert_eq!(admission["nodes"], json!(["n1", "n2"]));
        assert_eq!(admission["time"], "2027-01-15T08:00:00Z");
        assert_eq!(patch["status"]["queuePosition"], Value::Null);
        assert!(patch["status"].as_object().unwrap().contains_key("reason"), "the waiting reason is cleared");
        reply(send, &run);

        let (patch, send) = expect(
            &mut server,
            Method::PATCH,
            "/apis/pretrain.dev/v1alpha1/pretrainqueues/research/status?&fieldManager=pretrain-scheduler",
        )
        .await;
        assert_eq!(
            patch,
            json!({"status": {"quota": format!("{H100}: 32"), "inUse": format!("{H100}: 16"), "running": 1, "waiting": 0}})
        );
        reply(send, &queue);
    });
    let now = "2027-01-15T08:00:00Z".parse::<jiff::Timestamp>().unwrap().as_second();
    let done = pass(&client, Policy::default(), now).await.unwrap();
    assert_eq!((done.admitted, done.preempted, done.waiting), (1, 0, 0));
    answered.await.unwrap();
}
