//! The reconciler against an API server that fails: an in-memory cluster (runs, Jobs, pods,
//! ConfigMaps, Services, Events) answers every request, except that a share of them get a 409
//! conflict or a 500 before anything happens, or a 504 after the write took effect (the operator
//! cannot tell it did: the same as the operator dying between two of its writes). Every reconcile
//! starts from a fresh context, as after an operator restart. Jobs complete, and some fail, on a
//! simulated clock.
//!
//! The run must finish, with no Job created twice, never two live Jobs of one stage and role, and
//! each stage's attempts and failures exactly those the simulation caused.

#[path = "support/fake_api.rs"]
mod fake_api;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};

use fake_api::Cluster;
use pretrain_crd::status::RunPhase;
use pretrain_operator::k8s::controller::reconcile;
use pretrain_operator::labels::{LABEL_ROLE, LABEL_STAGE};
use pretrain_store::Store;

/// Planned failures: (stage, role, attempt) whose Job fails once it has run a tick.
const FAILING: [(&str, &str, u32); 4] =
    [("data-prep", "map", 1), ("train", "gang", 1), ("train", "gang", 2), ("eval", "single", 1)];

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
    let mut c = Cluster::new(seed, rate);
    c.failing = FAILING.to_vec();
    c.add_run("tiny", &fake_api::spec(&store_url));
    let cluster = Arc::new(Mutex::new(c));
    let (client, server) = fake_api::connect(&cluster);
    let store = Store::open(&store_url).unwrap();
    let mut now = 1000;

    let mut reconciles = 0;
    let mut failed_reconciles = 0;
    loop {
        let run = cluster.lock().unwrap().run("tiny");
        match run.status.as_ref().and_then(|s| s.phase) {
            Some(RunPhase::Succeeded) => break,
            Some(RunPhase::Failed) => panic!("the run failed: {:#}", cluster.lock().unwrap().runs["tiny"]["status"]),
            _ => {}
        }
        // At a 50% failure rate a reconcile that makes four writes succeeds about one time in 16.
        assert!(
            reconciles < 3000,
            "seed {seed}: the run is stuck: {:#}",
            cluster.lock().unwrap().runs["tiny"]["status"]
        );
        // A fresh operator every time: nothing carries over but the cluster and the store.
        let ctx = fake_api::context(&client, &store_url, now);
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
        Cluster::simulate(&cluster, &store, &|_| false).await;
        cluster.lock().unwrap().tick += 1;
        // Past any restart backoff (at most 10 minutes).
        now += 700;
    }
    let c = cluster.lock().unwrap();
    assert!(c.unexpected.is_empty(), "requests this server does not know: {:?}", c.unexpected);
    for (name, times) in &c.created {
        assert_eq!(*times, 1, "seed {seed}: Job {name} was created {times} times");
    }
    let stages = c.runs["tiny"]["status"]["stages"].as_array().unwrap();
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
