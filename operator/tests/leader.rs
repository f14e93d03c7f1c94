//! Leader election against a `tower-test` mock API server: who may take the Lease, and when.

use std::time::{Duration, Instant};

use http::{Method, Request, Response, StatusCode};
use kube::client::Body;
use pretrain_operator::k8s::leader::Elector;
use serde_json::{Value, json};
use tower_test::mock::{Handle, SendResponse};

type ApiServer = Handle<Request<Body>, Response<Body>>;

const LEASE: &str = "/apis/coordination.k8s.io/v1/namespaces/pretrain-system/leases/pretrain-operator";

fn elector(identity: &str) -> (Elector, ApiServer) {
    let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let client = kube::Client::new(service, "default");
    let api = kube::Api::namespaced(client, "pretrain-system");
    (Elector::new(api, "pretrain-operator", identity, 15), handle)
}

async fn expect(server: &mut ApiServer, method: Method, path: &str) -> (Value, SendResponse<Response<Body>>) {
    let (request, send) = server.next_request().await.expect("a request");
    assert_eq!(request.method(), method);
    assert_eq!(request.uri().path(), path);
    let bytes = request.into_body().collect_bytes().await.unwrap();
    let body = if bytes.is_empty() { Value::Null } else { serde_json::from_slice(&bytes).unwrap() };
    (body, send)
}

fn reply(send: SendResponse<Response<Body>>, status: StatusCode, body: &Value) {
    let response = Response::builder().status(status).body(Body::from(serde_json::to_vec(body).unwrap())).unwrap();
    send.send_response(response);
}

fn status(code: u16, reason: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Status", "metadata": {}, "status": "Failure", "message": reason, "reason": reason, "code": code})
}

fn lease(holder: &str, renewed: &str, transitions: i32) -> Value {
    json!({
        "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
        "metadata": {"name": "pretrain-operator", "namespace": "pretrain-system", "resourceVersion": "41"},
        "spec": {"holderIdentity": holder, "leaseDurationSeconds": 15, "renewTime": renewed,
                 "acquireTime": "2026-11-28T09:00:00.000000Z", "leaseTransitions": transitions}
    })
}

fn at(text: &str) -> jiff::Timestamp {
    text.parse().unwrap()
}

#[tokio::test]
async fn the_first_replica_creates_the_lease() {
    let (elector, mut server) = elector("op-a");
    let answered = tokio::spawn(async move {
        let (_, send) = expect(&mut server, Method::GET, LEASE).await;
        reply(send, StatusCode::NOT_FOUND, &status(404, "NotFound"));
        let (body, send) =
            expect(&mut server, Method::POST, "/apis/coordination.k8s.io/v1/namespaces/pretrain-system/leases").await;
        assert_eq!(body["spec"]["holderIdentity"], "op-a");
        assert_eq!(body["spec"]["leaseDurationSeconds"], 15);
        assert_eq!(body["spec"]["leaseTransitions"], 0);
        reply(send, StatusCode::CREATED, &body);
    });
    assert!(elector.try_acquire(at("2026-11-28T10:00:00Z"), Instant::now()).await.unwrap());
    answered.await.unwrap();
}

#[tokio::test]
async fn a_held_lease_is_left_alone_until_it_expires_by_the_local_clock_then_taken_over() {
    let (elector, mut server) = elector("op-b");
    let answered = tokio::spawn(async move {
        // op-a's renewTime is an hour old by our clock, but the clocks of two machines may differ:
        // what counts is whether the record changes while we watch it.
        for _ in 0..2 {
            let (_, send) = expect(&mut server, Method::GET, LEASE).await;
            reply(send, StatusCode::OK, &lease("op-a", "2026-11-28T09:00:00.000000Z", 0));
        }
        // op-a renewed: the wait starts again.
        let (_, send) = expect(&mut server, Method::GET, LEASE).await;
        reply(send, StatusCode::OK, &lease("op-a", "2026-11-28T09:00:03.000000Z", 0));
        let (_, send) = expect(&mut server, Method::GET, LEASE).await;
        reply(send, StatusCode::OK, &lease("op-a", "2026-11-28T09:00:03.000000Z", 0));
        // A full lease (15 s) unchanged: expired; op-b replaces it, carrying its resourceVersion.
        let (_, send) = expect(&mut server, Method::GET, LEASE).await;
        reply(send, StatusCode::OK, &lease("op-a", "2026-11-28T09:00:03.000000Z", 0));
        let (body, send) = expect(&mut server, Method::PUT, LEASE).await;
        assert_eq!(body["metadata"]["resourceVersion"], "41");
        assert_eq!(body["spec"]["holderIdentity"], "op-b");
        assert_eq!(body["spec"]["leaseTransitions"], 1);
        assert_eq!(body["spec"]["renewTime"], "2026-11-28T10:00:00.000000Z");
        reply(send, StatusCode::OK, &body);
    });
    let now = at("2026-11-28T10:00:00Z");
    let t0 = Instant::now();
    let s = Duration::from_secs;
    assert!(!elector.try_acquire(now, t0).await.unwrap(), "first sight of a held lease");
    assert!(!elector.try_acquire(now, t0 + s(14)).await.unwrap(), "unchanged for less than a lease");
    assert!(!elector.try_acquire(now, t0 + s(16)).await.unwrap(), "renewed meanwhile");
    assert!(!elector.try_acquire(now, t0 + s(30)).await.unwrap(), "14 s since it was renewed");
    assert!(elector.try_acquire(now, t0 + s(31)).await.unwrap(), "15 s without a renewal");
    answered.await.unwrap();
}

#[tokio::test]
async fn the_holder_gives_up_before_another_replica_may_take_over() {
    let (service, _handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let client = kube::Client::new(service, "default");
    let elector = Elector::new(kube::Api::namespaced(client, "pretrain-system"), "pretrain-operator", "op-a", 15);
    assert!(elector.renew_deadline() < Duration::from_secs(15));
    assert!(elector.retry_period() * 3 <= elector.renew_deadline(), "several renewals fit in the deadline");
}

#[tokio::test]
async fn the_holder_renews_and_a_lost_race_is_not_leadership() {
    let (elector, mut server) = elector("op-a");
    let answered = tokio::spawn(async move {
        let (_, send) = expect(&mut server, Method::GET, LEASE).await;
        reply(send, StatusCode::OK, &lease("op-a", "2026-11-28T09:59:55.000000Z", 3));
        let (body, send) = expect(&mut server, Method::PUT, LEASE).await;
        assert_eq!(body["spec"]["leaseTransitions"], 3, "renewing is not a transition");
        assert_eq!(body["spec"]["acquireTime"], "2026-11-28T09:00:00.000000Z");
        reply(send, StatusCode::OK, &body);
        // Someone else wrote the Lease between our read and our write.
        let (_, send) = expect(&mut server, Method::GET, LEASE).await;
        reply(send, StatusCode::OK, &lease("op-a", "2026-11-28T09:59:55.000000Z", 3));
        let (_, send) = expect(&mut server, Method::PUT, LEASE).await;
        reply(send, StatusCode::CONFLICT, &status(409, "Conflict"));
    });
    assert!(elector.try_acquire(at("2026-11-28T10:00:00Z"), Instant::now()).await.unwrap());
    assert!(!elector.try_acquire(at("2026-11-28T10:00:05Z"), Instant::now()).await.unwrap());
    answered.await.unwrap();
}
