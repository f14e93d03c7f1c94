//! Load: the reconciler with many PretrainRuns in one namespace (500 by default, `RUNS=N`), every
//! run taken through its stages on an in-memory API server, then a burst of pod failures in half of
//! them at once. Prints reconcile latency percentiles for the steady state (the baseline) and for
//! the three rounds after the burst (failures seen, backoff, restarts), their ratio, throughput,
//! and the process's peak memory.
//!
//!     cargo bench -p pretrain-operator --bench reconcile

#[path = "../tests/support/fake_api.rs"]
mod fake_api;

use std::sync::{Arc, Mutex};
use std::time::Instant;

use fake_api::Cluster;
use pretrain_operator::k8s::controller::reconcile;
use pretrain_store::Store;

fn percentiles(mut ms: Vec<f64>) -> String {
    ms.sort_by(f64::total_cmp);
    let at = |p: f64| ms[((ms.len() - 1) as f64 * p).round() as usize];
    format!(
        "n={:>5}  p50 {:>6.2} ms  p90 {:>6.2} ms  p99 {:>6.2} ms  max {:>6.2} ms",
        ms.len(),
        at(0.5),
        at(0.9),
        at(0.99),
        ms[ms.len() - 1]
    )
}

fn p99(mut ms: Vec<f64>) -> f64 {
    ms.sort_by(f64::total_cmp);
    ms[((ms.len() - 1) as f64 * 0.99).round() as usize]
}

/// A line of /proc/self/status in MiB (VmRSS, VmHWM).
fn memory_mib(key: &str) -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix(key)?.trim_start_matches(':').trim().strip_suffix("kB")?.trim().parse().ok())
        .unwrap_or(0.0);
    kib / 1024.0
}

#[tokio::main]
async fn main() {
    let runs: usize = std::env::var("RUNS").ok().and_then(|s| s.parse().ok()).unwrap_or(500);
    let tmp = tempfile::tempdir().unwrap();
    let store_url = format!("file://{}", tmp.path().display());
    let mut c = Cluster::new(1, 0.0);
    let names: Vec<String> = (0..runs).map(|i| format!("run-{i:04}")).collect();
    for name in &names {
        c.add_run(name, &fake_api::spec(&store_url));
    }
    let cluster = Arc::new(Mutex::new(c));
    let (client, server) = fake_api::connect(&cluster);
    let store = Store::open(&store_url).unwrap();
    let rss_before = memory_mib("VmRSS");

    let (mut steady, mut burst) = (Vec::new(), Vec::new());
    let mut now = 1000;
    let started = Instant::now();
    let mut reconciles = 0usize;
    // Burst: when the runs reach training, the pods of every other run's Job fail at once.
    let mut burst_tick = None;
    for tick in 0..60 {
        let mut all_done = true;
        for name in &names {
            let run = cluster.lock().unwrap().run(name);
            let phase = run.status.as_ref().and_then(|s| s.phase);
            if phase == Some(pretrain_crd::status::RunPhase::Succeeded) {
                continue;
            }
            all_done = false;
            let ctx = fake_api::context(&client, &store_url, now);
            let t = Instant::now();
            reconcile(Arc::new(run), Arc::new(ctx)).await.expect("no faults are injected");
            let ms = t.elapsed().as_secs_f64() * 1e3;
            reconciles += 1;
            if burst_tick.is_some_and(|b| (b..b + 3).contains(&tick)) { burst.push(ms) } else { steady.push(ms) }
        }
        if all_done {
            break;
        }
        let training = {
            let c = cluster.lock().unwrap();
            c.jobs.keys().filter(|k| k.contains("-train-") && c.jobs[*k].get("status").is_none()).count()
        };
        let fail_now = burst_tick.is_none() && training == runs;
        if fail_now {
            burst_tick = Some(tick + 1);
        }
        let fail =
            |job: &str| fail_now && job.contains("-train-") && job[4..8].parse::<usize>().is_ok_and(|i| i % 2 == 0);
        Cluster::simulate(&cluster, &store, &fail).await;
        cluster.lock().unwrap().tick += 1;
        now += 700;
    }
    let seconds = started.elapsed().as_secs_f64();
    let c = cluster.lock().unwrap();
    let succeeded = names.iter().filter(|n| c.runs[*n]["status"]["phase"] == "Succeeded").count();
    assert_eq!(succeeded, runs, "every run finishes");
    assert!(!burst.is_empty(), "the burst happened");
    println!(
        "reconcile load: {runs} PretrainRuns in one namespace, {reconciles} reconciles, {} API requests",
        c.requests
    );
    println!("  steady state (baseline): {}", percentiles(steady.clone()));
    println!("  burst ({} pod failures at once): {}", runs / 2, percentiles(burst.clone()));
    println!("  burst p99 / steady p99 = {:.2}", p99(burst) / p99(steady));
    println!("  throughput {:.0} reconciles/s on one task", reconciles as f64 / seconds);
    println!(
        "  memory: {:.0} MiB resident before, {:.0} MiB after, {:.0} MiB peak",
        rss_before,
        memory_mib("VmRSS"),
        memory_mib("VmHWM")
    );
    drop(c);
    server.abort();
}
