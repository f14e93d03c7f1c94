//! Benchmark: one scheduling pass over 1,000 queued runs on 1,000 nodes, against the 50 ms target.
//!
//!     cargo run --release -p pretrain-operator --bin bench-schedule
//!
//! The cluster: 1,000 8-GPU nodes of two types, half of them busy with 300 running gangs (some
//! preemptible, with checkpoints of various ages); 1,000 waiting requests of 1 to 16 pods, CPU and
//! GPU, mixed priorities, most with an expected duration. Prints the median pass time of 7, the
//! process's peak memory, and the ratio to the target.

use std::collections::BTreeMap;
use std::time::Instant;

use pretrain_operator::schedule::{Gang, Node, Policy, Queue, Request, Resources, Running, schedule};

const GIB: u64 = 1 << 30;
const KINDS: [&str; 2] = ["H100", "A100"];

/// xorshift64: the scenario's numbers, the same on every run.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// 1,000 8-GPU nodes of two types; one in 50 is not schedulable.
fn nodes() -> Vec<Node> {
    (0..1000)
        .map(|i| Node {
            name: format!("node-{i}"),
            gpu_type: Some(KINDS[i % 2].to_string()),
            allocatable: Resources { gpus: 8, cpu_millis: 96_000, memory: 1024 * GIB },
            schedulable: i % 50 != 0,
        })
        .collect()
}

fn queues() -> Vec<Queue> {
    ["research", "prod", "eval"]
        .iter()
        .map(|q| Queue {
            name: q.to_string(),
            gpu_quota: BTreeMap::from([("H100".into(), 3000), ("A100".into(), 3000), ("*".into(), 1000)]),
            borrowing: *q != "prod",
        })
        .collect()
}

fn gang(pods: u32, gpus: u32, kind: Option<&str>) -> Gang {
    Gang {
        pods,
        min_pods: pods,
        per_pod: Resources { gpus, cpu_millis: if gpus > 0 { 32_000 } else { 8_000 }, memory: 128 * GIB },
        gpu_type: kind.map(str::to_string),
    }
}

/// 300 running gangs filling about half the cluster.
fn running(queues: &[Queue], rng: &mut Rng) -> Vec<Running> {
    let mut running = Vec::new();
    let mut node = 0usize;
    for i in 0..300 {
        let pods = [1u32, 1, 2, 2, 4][i % 5];
        let on: Vec<String> = (0..pods).map(|k| format!("node-{}", (node + 2 * k as usize) % 1000)).collect();
        node += 2 * pods as usize + 1;
        running.push(Running {
            id: format!("running-{i}"),
            queue: queues[i % 3].name.clone(),
            priority: (i % 3) as i32,
            gang: gang(pods, 8, Some(KINDS[(node - 1) % 2])),
            nodes: on,
            started: 0,
            last_checkpoint: Some((rng.next() % 3600) as i64),
            preemptible: i % 4 != 0,
            expected_end: (i % 5 != 0).then(|| 3600 + (rng.next() % 36_000) as i64),
        });
    }
    running
}

/// 1,000 waiting requests of 1 to 16 pods, CPU and GPU, mixed priorities.
fn requests(queues: &[Queue], rng: &mut Rng) -> Vec<Request> {
    (0..1000)
        .map(|i| {
            let pods = [1u32, 2, 4, 8, 16][(rng.next() % 5) as usize];
            let gpus = if i % 4 == 0 { 0 } else { 8 };
            Request {
                id: format!("queued-{i}"),
                queue: queues[i % 3].name.clone(),
                priority: (rng.next() % 4) as i32,
                submitted: i as i64,
                gang: gang(pods, gpus, (gpus > 0 && i % 3 != 0).then_some(KINDS[i % 2])),
                expected_seconds: (i % 7 != 0).then(|| 600 + (rng.next() % 7200) as i64),
                shrink_from: None,
            }
        })
        .collect()
}

fn main() {
    let mut rng = Rng(0x2545_F491_4F6C_DD1D);
    let (nodes, queues) = (nodes(), queues());
    let running = running(&queues, &mut rng);
    let requests = requests(&queues, &mut rng);
    let mut times = Vec::new();
    let mut decision = None;
    for _ in 0..7 {
        let t = Instant::now();
        let d = schedule(&nodes, &running, &queues, &requests, 4000, Policy::default());
        times.push(t.elapsed().as_secs_f64());
        decision = Some(d);
    }
    times.sort_by(f64::total_cmp);
    let median = times[times.len() / 2];
    let d = decision.expect("seven passes ran");
    let peak_kib = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("VmHWM:")).map(str::to_string))
        .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse::<u64>().ok()))
        .unwrap_or(0);
    println!(
        "one pass over {} queued runs on {} nodes ({} running): {:.1} ms median of 7 (min {:.1}, max {:.1}); {} admitted, {} preempted, {} waiting; peak memory {:.1} MiB",
        requests.len(),
        nodes.len(),
        running.len(),
        median * 1e3,
        times[0] * 1e3,
        times[times.len() - 1] * 1e3,
        d.admit.len(),
        d.preempt.len(),
        d.waiting.len(),
        peak_kib as f64 / 1024.0
    );
    println!("target 50 ms: {:.2}x of the budget", median / 0.050);
}
