//! Goodput of one pretraining job on a simulated cluster of 1,000 nodes of 8 GPUs, failing at Llama
//! 3's rate per GPU, under four recovery policies: fixed-interval checkpoints with restart-only
//! recovery, then Young/Daly's interval (`checkpoint.every: auto`), then elastic shrink and grow
//! (`train.resources.minNodes`), then bad-node quarantine. Admission, shrink and grow are the
//! operator's own scheduler ([`schedule`]) and quarantine its own rule ([`Record::verdict`]); the
//! rest (failures, repairs, checkpoints, restarts) is modelled here, with every assumption below.
//!
//! `cargo run --release -p pretrain-operator --bin sim-goodput` prints the table of
//! `docs/performance.md`; `--days N`, `--seeds N` and `--spares N` (nodes the gang leaves to
//! replace failed ones, 8 by default) change the length, the number of runs and the cluster.
//!
//! The model, in 10-second ticks:
//! - **Failures**: each GPU fails at Llama 3's rate (466 interruptions in 54 days on 16,384 GPUs), a
//!   node at 8 times that; `BAD_NODES` of the nodes are repeat offenders that, together, cause
//!   `BAD_SHARE` of the interruptions (the total rate stays Llama 3's). A failure takes the node out:
//!   `HARDWARE_SHARE` of them for a repair of `REPAIR_HOURS` (Llama 3 attributes 78% of unexpected
//!   interruptions to hardware), the rest for a reboot of `REBOOT_MINUTES`.
//! - **The job** wants all nodes but `--spares`. A failure of one of its
//!   nodes loses the work since the last checkpoint; the gang waits for admission again and then
//!   spends `RESTART_SECONDS` starting (pods, rendezvous, loading the checkpoint). A checkpoint holds
//!   the step loop for `CHECKPOINT_STALL` seconds (`bench-train`'s measured stall for llama-125m).
//! - **Shrink**: with `minNodes` (half the gang), a gang that cannot get all its nodes within `shrinkAfterSeconds`
//!   starts on fewer, as the scheduler picks; its ranks then share the full gang's gradient groups,
//!   so it trains at 1 / ceil(gang / nodes) of full speed (the most loaded rank sets the pace). The
//!   scheduler asks it to grow back once all its nodes fit again: a checkpoint and a restart.
//! - **Quarantine**: a node with `QUARANTINE_AFTER` failures within `QUARANTINE_WINDOW_DAYS` is
//!   taken out until an admin repairs it, `ADMIN_DAYS` later (then it is a good node).
//! - **Goodput** is the work kept (in seconds of the whole gang at full speed) over the wall time;
//!   the loss is split into waiting for nodes, restarts, recomputed work, checkpoint stalls, and
//!   the speed a shrunk gang lacks.

use std::collections::BTreeMap;

use pretrain_operator::k8s::quarantine::{NodeFailure, Policy as QuarantinePolicy, Record};
use pretrain_operator::schedule::{Decision, Gang, Node, Policy, Queue, Request, Resources, Running, schedule};

const NODES: usize = 1000;
const GPUS_PER_NODE: u32 = 8;
/// GPU-hours per interruption in Llama 3's pretraining (Dubey et al. 2024, section 3.3.4).
const GPU_HOURS_PER_INTERRUPTION: f64 = 54.0 * 24.0 * 16_384.0 / 466.0;
const BAD_NODES: usize = 5;
const BAD_SHARE: f64 = 0.3;
const HARDWARE_SHARE: f64 = 0.78;
const REPAIR_HOURS: f64 = 24.0;
const REBOOT_MINUTES: f64 = 10.0;
const RESTART_SECONDS: f64 = 120.0;
const CHECKPOINT_STALL: f64 = 0.17;
const FIXED_INTERVAL: f64 = 1800.0;
const SHRINK_AFTER: i64 = 300;
const QUARANTINE_AFTER: usize = 3;
const QUARANTINE_WINDOW_DAYS: i64 = 7;
const ADMIN_DAYS: f64 = 2.0;
const TICK: i64 = 10;
const JOB: &str = "team/llm/train";

/// One recovery policy.
#[derive(Debug, Clone, Copy)]
struct Recovery {
    name: &'static str,
    auto_interval: bool,
    shrink: bool,
    quarantine: bool,
}

/// Seconds lost, by cause.
#[derive(Debug, Clone, Copy, Default)]
struct Lost {
    waiting: f64,
    restart: f64,
    recomputed: f64,
    checkpoint: f64,
    shrunk: f64,
}

/// What one simulated run did.
#[derive(Debug, Clone, Copy, Default)]
struct Outcome {
    wall: f64,
    kept: f64,
    lost: Lost,
    failures: u32,
    gang_failures: u32,
    shrinks: u32,
    grows: u32,
    quarantined: u32,
}

/// xorshift64*: reproducible without a dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn unit(&mut self) -> f64 {
        ((self.next() >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    }

    /// An exponential draw of mean `mean`.
    fn exponential(&mut self, mean: f64) -> f64 {
        -mean * self.unit().ln()
    }
}

/// A node's state in the simulation.
#[derive(Debug, Clone)]
struct SimNode {
    /// Failures per second while up.
    rate: f64,
    /// Out (failed, or quarantined) until this time.
    down_until: f64,
    /// When it fails next.
    next_failure: f64,
    record: Record,
}

/// Where the job stands.
#[derive(Debug, Clone)]
enum Job {
    Waiting { since: i64 },
    Starting { nodes: Vec<usize>, until: f64 },
    Training { nodes: Vec<usize>, started: i64 },
}

struct Sim {
    recovery: Recovery,
    /// Nodes of the gang.
    gang: u32,
    rng: Rng,
    nodes: Vec<SimNode>,
    job: Job,
    /// Work done, in seconds of the whole gang at full speed, and at the last checkpoint.
    work: f64,
    checkpointed: f64,
    /// Wall seconds of training since the last checkpoint.
    since_checkpoint: f64,
    /// Training seconds and failures survived, for the auto interval's MTBF.
    trained: f64,
    /// The cluster as the scheduler last saw it: failures so far, nodes up, and whether the gang
    /// could shrink. The scheduler is asked again only when it changed.
    asked: Option<(u32, usize, bool)>,
    out: Outcome,
}

fn node_name(i: usize) -> String {
    format!("node-{i:04}")
}

impl Sim {
    fn new(recovery: Recovery, gang: u32, seed: u64) -> Self {
        let per_node = f64::from(GPUS_PER_NODE) / (GPU_HOURS_PER_INTERRUPTION * 3600.0);
        let total = per_node * NODES as f64;
        let bad_rate = BAD_SHARE * total / BAD_NODES as f64;
        let good_rate = (1.0 - BAD_SHARE) * total / (NODES - BAD_NODES) as f64;
        let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
        let mut bad: Vec<usize> = Vec::new();
        while bad.len() < BAD_NODES {
            let i = (rng.next() % NODES as u64) as usize;
            if !bad.contains(&i) {
                bad.push(i);
            }
        }
        let nodes = (0..NODES)
            .map(|i| {
                let rate = if bad.contains(&i) { bad_rate } else { good_rate };
                SimNode { rate, down_until: 0.0, next_failure: rng.exponential(1.0 / rate), record: Record::default() }
            })
            .collect();
        Self {
            recovery,
            gang,
            rng,
            nodes,
            job: Job::Waiting { since: 0 },
            work: 0.0,
            checkpointed: 0.0,
            since_checkpoint: 0.0,
            trained: 0.0,
            asked: None,
            out: Outcome::default(),
        }
    }

    fn quarantine_policy() -> QuarantinePolicy {
        QuarantinePolicy { failures: QUARANTINE_AFTER, window_seconds: QUARANTINE_WINDOW_DAYS * 86_400, cordon: false }
    }

    /// The scheduler's view: every node, schedulable when up.
    fn scheduler_nodes(&self, now: f64) -> Vec<Node> {
        self.nodes
            .iter()
            .enumerate()
            .map(|(i, n)| Node {
                name: node_name(i),
                gpu_type: Some("H100".into()),
                allocatable: Resources { gpus: GPUS_PER_NODE, cpu_millis: 192_000, memory: 2048 << 30 },
                schedulable: n.down_until <= now,
            })
            .collect()
    }

    fn gang(&self) -> Gang {
        Gang {
            pods: self.gang,
            min_pods: if self.recovery.shrink { self.gang / 2 } else { self.gang },
            per_pod: Resources { gpus: GPUS_PER_NODE, cpu_millis: 96_000, memory: 1024 << 30 },
            gpu_type: Some("H100".into()),
        }
    }

    /// Whether the cluster changed since the scheduler was last asked (`may_shrink` included).
    fn changed(&mut self, now: i64, may_shrink: bool) -> bool {
        let up = self.nodes.iter().filter(|n| n.down_until <= now as f64).count();
        let seen = Some((self.out.failures, up, may_shrink));
        let changed = seen != self.asked;
        self.asked = seen;
        changed
    }

    fn decide(&self, now: i64, running: &[Running], requests: &[Request]) -> Decision {
        let queue =
            Queue { name: "team".into(), gpu_quota: BTreeMap::from([("*".into(), u32::MAX)]), borrowing: false };
        // Grow as soon as all nodes are back (the cluster has nothing else to run).
        let policy = Policy { min_runtime: 0, preemption: true };
        schedule(&self.scheduler_nodes(now as f64), running, &[queue], requests, now, policy)
    }

    /// Seconds between checkpoints now.
    fn interval(&self) -> f64 {
        if !self.recovery.auto_interval {
            return FIXED_INTERVAL;
        }
        let prior = GPU_HOURS_PER_INTERRUPTION * 3600.0 / f64::from(self.gang * GPUS_PER_NODE);
        let mtbf = (prior + self.trained) / f64::from(1 + self.out.gang_failures);
        (2.0 * CHECKPOINT_STALL * mtbf).sqrt()
    }

    /// Node failures during the tick ending at `now`; whether one hit the job's nodes.
    fn failures(&mut self, now: f64) -> bool {
        let mut hit = false;
        for i in 0..self.nodes.len() {
            if self.nodes[i].next_failure > now {
                continue;
            }
            self.out.failures += 1;
            let repair = if self.rng.unit() < HARDWARE_SHARE {
                self.rng.exponential(REPAIR_HOURS * 3600.0)
            } else {
                self.rng.exponential(REBOOT_MINUTES * 60.0)
            };
            let node = &mut self.nodes[i];
            node.down_until = now + repair;
            node.next_failure = node.down_until + self.rng.exponential(1.0 / node.rate);
            let on_job = match &self.job {
                Job::Starting { nodes, .. } | Job::Training { nodes, .. } => nodes.contains(&i),
                Job::Waiting { .. } => false,
            };
            if on_job {
                hit = true;
                self.quarantine(i, now);
            }
        }
        hit
    }

    /// Counts a failure of the job against node `i`, and quarantines it when the rule says so.
    fn quarantine(&mut self, i: usize, now: f64) {
        if !self.recovery.quarantine {
            return;
        }
        let policy = Self::quarantine_policy();
        let node = &mut self.nodes[i];
        let attempt = format!("{JOB}/{}", self.out.gang_failures);
        node.record.add(NodeFailure { at: now as i64, attempt, reason: "device failure".into() });
        if node.record.verdict(now as i64, &policy).is_some() {
            node.record.quarantined_at = Some(now as i64);
            // Out until an admin repairs it; repaired, it fails like any other node.
            let good = (1.0 - BAD_SHARE) * f64::from(GPUS_PER_NODE) * NODES as f64
                / (GPU_HOURS_PER_INTERRUPTION * 3600.0)
                / (NODES - BAD_NODES) as f64;
            node.down_until = node.down_until.max(now + ADMIN_DAYS * 86_400.0);
            node.rate = good;
            node.next_failure = node.down_until + self.rng.exponential(1.0 / good);
            self.out.quarantined += 1;
        }
    }

    fn tick(&mut self, now: i64) {
        let dt = TICK as f64;
        if self.failures(now as f64) {
            self.out.gang_failures += 1;
            if let Job::Training { .. } = self.job {
                self.out.lost.recomputed += self.work - self.checkpointed;
                self.work = self.checkpointed;
            }
            self.since_checkpoint = 0.0;
            self.job = Job::Waiting { since: now };
            self.asked = None;
        }
        match self.job.clone() {
            Job::Waiting { since } => {
                self.out.lost.waiting += dt;
                let may_shrink = self.recovery.shrink && now >= since + SHRINK_AFTER;
                if !self.changed(now, may_shrink) {
                    return;
                }
                let request = Request {
                    id: JOB.into(),
                    queue: "team".into(),
                    priority: 0,
                    submitted: 0,
                    gang: self.gang(),
                    expected_seconds: None,
                    shrink_from: self.recovery.shrink.then_some(since + SHRINK_AFTER),
                };
                let decision = self.decide(now, &[], &[request]);
                if let Some((_, names)) = decision.admit.first() {
                    let nodes: Vec<usize> = names.iter().filter_map(|n| n[5..].parse().ok()).collect();
                    if (nodes.len() as u32) < self.gang {
                        self.out.shrinks += 1;
                    }
                    self.job = Job::Starting { nodes, until: now as f64 + RESTART_SECONDS };
                    self.asked = None;
                }
            }
            Job::Starting { nodes, until } => {
                self.out.lost.restart += dt;
                if now as f64 >= until {
                    self.job = Job::Training { nodes, started: now };
                }
            }
            Job::Training { nodes, started } => self.train(now, &nodes, started),
        }
    }

    fn train(&mut self, now: i64, nodes: &[usize], started: i64) {
        let dt = TICK as f64;
        let speed = 1.0 / f64::from(self.gang.div_ceil(nodes.len() as u32));
        self.work += dt * speed;
        self.out.lost.shrunk += dt * (1.0 - speed);
        self.trained += dt;
        self.since_checkpoint += dt;
        if self.since_checkpoint >= self.interval() {
            self.checkpoint();
        }
        if (nodes.len() as u32) < self.gang && self.changed(now, false) {
            let running = Running {
                id: JOB.into(),
                queue: "team".into(),
                priority: 0,
                gang: self.gang(),
                nodes: nodes.iter().map(|&i| node_name(i)).collect(),
                started,
                last_checkpoint: None,
                preemptible: true,
                expected_end: None,
            };
            if !self.decide(now, &[running], &[]).preempt.is_empty() {
                // Grow: checkpoint on SIGTERM, then wait for all the nodes (free now) and restart.
                self.checkpoint();
                self.out.grows += 1;
                self.job = Job::Waiting { since: now };
                self.asked = None;
            }
        }
    }

    /// A checkpoint: it holds the loop for the stall (work not done), and keeps the work so far.
    fn checkpoint(&mut self) {
        let speed_lost = CHECKPOINT_STALL.min(self.work - self.checkpointed);
        self.work -= speed_lost;
        self.out.lost.checkpoint += speed_lost;
        self.checkpointed = self.work;
        self.since_checkpoint = 0.0;
    }

    fn run(mut self, days: f64) -> Outcome {
        let end = (days * 86_400.0) as i64;
        let mut now = 0;
        while now < end {
            now += TICK;
            self.tick(now);
        }
        self.out.wall = end as f64;
        self.out.kept = self.work;
        self.out
    }
}

fn arg(name: &str, default: f64) -> f64 {
    let args: Vec<String> = std::env::args().collect();
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn main() {
    let days = arg("--days", 54.0);
    let seeds = arg("--seeds", 5.0) as u64;
    let gang = NODES as u32 - arg("--spares", 8.0) as u32;
    let policies = [
        Recovery {
            name: "fixed 30 min interval, restart only",
            auto_interval: false,
            shrink: false,
            quarantine: false,
        },
        Recovery { name: "auto interval, restart only", auto_interval: true, shrink: false, quarantine: false },
        Recovery { name: "auto interval + shrink", auto_interval: true, shrink: true, quarantine: false },
        Recovery { name: "auto interval + shrink + quarantine", auto_interval: true, shrink: true, quarantine: true },
    ];
    println!(
        "{NODES} nodes x {GPUS_PER_NODE} GPUs, a gang of {gang} nodes, {days} days, {seeds} seeds; Llama 3's {GPU_HOURS_PER_INTERRUPTION:.0} GPU-hours per interruption"
    );
    println!(
        "| policy | goodput | waiting | restarts | recomputed | checkpoints | shrunk | failures (of the gang) | shrinks | grows | quarantined |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for recovery in policies {
        let outcomes: Vec<Outcome> = (0..seeds).map(|seed| Sim::new(recovery, gang, seed + 1).run(days)).collect();
        let n = outcomes.len() as f64;
        let mean = |f: &dyn Fn(&Outcome) -> f64| outcomes.iter().map(f).sum::<f64>() / n;
        let share = |f: &dyn Fn(&Outcome) -> f64| 100.0 * mean(&|o| f(o) / o.wall);
        let (lo, hi) = outcomes
            .iter()
            .map(|o| 100.0 * o.kept / o.wall)
            .fold((f64::MAX, f64::MIN), |(lo, hi), g| (lo.min(g), hi.max(g)));
        println!(
            "| {} | {:.1}% ({lo:.1}-{hi:.1}) | {:.2}% | {:.2}% | {:.2}% | {:.2}% | {:.2}% | {:.0} ({:.0}) | {:.1} | {:.1} | {:.1} |",
            recovery.name,
            share(&|o| o.kept),
            share(&|o| o.lost.waiting),
            share(&|o| o.lost.restart),
            share(&|o| o.lost.recomputed),
            share(&|o| o.lost.checkpoint),
            share(&|o| o.lost.shrunk),
            mean(&|o| f64::from(o.failures)),
            mean(&|o| f64::from(o.gang_failures)),
            mean(&|o| f64::from(o.shrinks)),
            mean(&|o| f64::from(o.grows)),
            mean(&|o| f64::from(o.quarantined)),
        );
    }
}
