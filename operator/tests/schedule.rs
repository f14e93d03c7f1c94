//! The scheduler on simulated clusters: whole gangs or nothing, no deadlock, priority with the
//! cheapest preemption, backfill that never delays the head, quota, and no starvation over time.

use std::collections::BTreeMap;

use pretrain_operator::schedule::{Decision, Gang, Node, Policy, Queue, Request, Resources, Running, schedule};

const GIB: u64 = 1 << 30;

fn gpu_nodes(n: usize, kind: &str) -> Vec<Node> {
    (0..n)
        .map(|i| Node {
            name: format!("{kind}-{i}"),
            gpu_type: Some(kind.into()),
            allocatable: Resources { gpus: 8, cpu_millis: 96_000, memory: 1024 * GIB },
            schedulable: true,
        })
        .collect()
}

fn gang(pods: u32, gpus: u32) -> Gang {
    Gang { pods, min_pods: pods, per_pod: Resources { gpus, cpu_millis: 16_000, memory: 128 * GIB }, gpu_type: None }
}

fn request(id: &str, priority: i32, submitted: i64, g: Gang) -> Request {
    Request {
        id: id.into(),
        queue: "default".into(),
        priority,
        submitted,
        gang: g,
        expected_seconds: None,
        shrink_from: None,
    }
}

fn running(id: &str, priority: i32, nodes: &[&str], started: i64, checkpoint: Option<i64>) -> Running {
    Running {
        id: id.into(),
        queue: "default".into(),
        priority,
        gang: gang(nodes.len() as u32, 8),
        nodes: nodes.iter().map(|n| n.to_string()).collect(),
        started,
        last_checkpoint: checkpoint,
        preemptible: true,
        expected_end: None,
    }
}

fn open_queue() -> Vec<Queue> {
    vec![Queue { name: "default".into(), gpu_quota: BTreeMap::from([("*".into(), 100_000)]), borrowing: false }]
}

fn admitted(d: &Decision) -> Vec<&str> {
    d.admit.iter().map(|(id, _)| id.as_str()).collect()
}

fn reason<'a>(d: &'a Decision, id: &str) -> &'a str {
    &d.waiting.iter().find(|w| w.id == id).unwrap_or_else(|| panic!("{id} is not waiting: {d:?}")).reason
}

#[test]
fn a_gang_starts_whole_or_not_at_all_and_says_why_it_waits() {
    let nodes = gpu_nodes(4, "H100");
    let d = schedule(&nodes, &[], &open_queue(), &[request("big", 0, 0, gang(6, 8))], 0, Policy::default());
    assert!(d.admit.is_empty());
    assert_eq!(reason(&d, "big"), "needs 6 nodes x 8 GPUs, 4 free; 0 ahead of it");
    // Each pod needs a node of its own: 4 free GPUs on each of 4 nodes are not one 8-GPU pod.
    let half: Vec<Running> = (0..4)
        .map(|i| Running { gang: gang(1, 4), ..running(&format!("r{i}"), 0, &[&format!("H100-{i}")], 0, None) })
        .collect();
    let d = schedule(
        &nodes,
        &half,
        &open_queue(),
        &[request("one", 0, 0, gang(1, 8))],
        0,
        Policy { preemption: false, ..Policy::default() },
    );
    assert!(d.admit.is_empty(), "16 GPUs are free in all, but no node has 8");
    let d = schedule(&nodes, &half, &open_queue(), &[request("fits", 0, 0, gang(4, 4))], 0, Policy::default());
    assert_eq!(d.admit[0].1.len(), 4);
}

#[test]
fn two_gangs_that_each_need_most_of_the_cluster_do_not_deadlock() {
    let nodes = gpu_nodes(4, "H100");
    let reqs = [request("a", 0, 1, gang(3, 8)), request("b", 0, 2, gang(3, 8))];
    let d = schedule(&nodes, &[], &open_queue(), &reqs, 10, Policy::default());
    assert_eq!(admitted(&d), ["a"]);
    assert_eq!(d.admit[0].1.len(), 3);
    assert!(reason(&d, "b").starts_with("needs 3 nodes x 8 GPUs, 1 free; 0 ahead of it"), "{d:?}");
}

#[test]
fn priority_preempts_the_training_that_loses_the_fewest_gpu_seconds() {
    let nodes = gpu_nodes(4, "H100");
    let run = [
        // Checkpointed 100 s ago on 2 nodes: 1,600 GPU-seconds lost.
        running("cheap", 0, &["H100-0", "H100-1"], 0, Some(9_900)),
        // Checkpointed 2,000 s ago: 32,000 GPU-seconds lost.
        running("dear", 0, &["H100-2", "H100-3"], 0, Some(8_000)),
    ];
    let urgent = [request("urgent", 10, 9_000, gang(2, 8))];
    let d = schedule(&nodes, &run, &open_queue(), &urgent, 10_000, Policy::default());
    assert_eq!(d.preempt, [("cheap".to_string(), "urgent".to_string())]);
    assert!(d.admit.is_empty(), "the victim checkpoints first");
    assert!(reason(&d, "urgent").starts_with("preempting cheap"));
    // A gang younger than the minimum runtime is spared, so the other one goes.
    let young = [running("cheap", 0, &["H100-0", "H100-1"], 9_500, Some(9_900)), run[1].clone()];
    let d = schedule(&nodes, &young, &open_queue(), &urgent, 10_000, Policy::default());
    assert_eq!(d.preempt, [("dear".to_string(), "urgent".to_string())]);
    // Equal priority never preempts; a non-training stage is never a victim.
    let d = schedule(&nodes, &run, &open_queue(), &[request("peer", 0, 9_000, gang(2, 8))], 10_000, Policy::default());
    assert!(d.preempt.is_empty());
    let data = [Running { preemptible: false, ..run[0].clone() }, Running { preemptible: false, ..run[1].clone() }];
    let d = schedule(&nodes, &data, &open_queue(), &urgent, 10_000, Policy::default());
    assert!(d.preempt.is_empty());
    // Needing 3 nodes takes both gangs, and no more.
    let d = schedule(&nodes, &run, &open_queue(), &[request("wide", 10, 0, gang(3, 8))], 10_000, Policy::default());
    assert_eq!(d.preempt.len(), 2);
}

#[test]
fn small_jobs_backfill_only_where_they_cannot_delay_the_head() {
    let nodes = gpu_nodes(4, "H100");
    let run = [Running { expected_end: Some(1_100), ..running("busy", 0, &["H100-0", "H100-1"], 0, None) }];
    let reqs = [
        request("head", 0, 1, gang(4, 8)),
        // Ends at 1,050, before the head can start at 1,100.
        Request { expected_seconds: Some(50), ..request("short", 0, 2, gang(1, 8)) },
        // Would still run at 1,100 on a node the head needs.
        Request { expected_seconds: Some(500), ..request("long", 0, 3, gang(1, 8)) },
        request("unknown", 0, 4, gang(1, 8)),
    ];
    let d = schedule(&nodes, &run, &open_queue(), &reqs, 1_000, Policy::default());
    assert_eq!(admitted(&d), ["short"]);
    assert!(reason(&d, "head").contains("expected to start in 100 s"), "{d:?}");
    assert!(reason(&d, "long").contains("reserved"));
    assert_eq!(d.waiting.iter().map(|w| w.position).collect::<Vec<_>>(), [0, 1, 2]);
}

#[test]
fn queues_hold_their_gpu_quota_and_may_borrow_idle_quota() {
    let nodes = gpu_nodes(4, "H100");
    let queues = |borrowing| {
        vec![
            Queue { name: "research".into(), gpu_quota: BTreeMap::from([("H100".into(), 8)]), borrowing },
            Queue { name: "prod".into(), gpu_quota: BTreeMap::from([("H100".into(), 16)]), borrowing: false },
        ]
    };
    let big = Request {
        queue: "research".into(),
        gang: Gang { gpu_type: Some("H100".into()), ..gang(2, 8) },
        ..request("r", 0, 0, gang(2, 8))
    };
    let d = schedule(&nodes, &[], &queues(false), std::slice::from_ref(&big), 0, Policy::default());
    assert_eq!(reason(&d, "r"), "queue research holds 0 of its 8 GPUs of type H100; needs 16 more");
    let d = schedule(&nodes, &[], &queues(true), std::slice::from_ref(&big), 0, Policy::default());
    assert_eq!(admitted(&d), ["r"], "prod's 16 GPUs are idle");
    let missing = Request { queue: "nope".into(), ..big };
    let d = schedule(&nodes, &[], &queues(true), &[missing], 0, Policy::default());
    assert_eq!(reason(&d, "r"), "queue nope does not exist");
}

#[test]
fn a_higher_priority_gang_over_its_queues_quota_preempts_lower_priority_gangs_of_that_queue() {
    // Plenty of free nodes, but the queue's 16 GPUs are all held by its low-priority gang.
    let nodes = gpu_nodes(8, "H100");
    let queues = [
        Queue { name: "research".into(), gpu_quota: BTreeMap::from([("H100".into(), 16)]), borrowing: false },
        Queue { name: "prod".into(), gpu_quota: BTreeMap::from([("H100".into(), 16)]), borrowing: false },
    ];
    let typed = |g: Gang| Gang { gpu_type: Some("H100".into()), ..g };
    let held = |id: &str, queue: &str, nodes: &[&str]| Running {
        queue: queue.into(),
        gang: typed(gang(2, 8)),
        ..running(id, 0, nodes, 0, Some(9_000))
    };
    let run = [held("low", "research", &["H100-0", "H100-1"]), held("other", "prod", &["H100-2", "H100-3"])];
    let urgent =
        Request { queue: "research".into(), gang: typed(gang(2, 8)), ..request("urgent", 10, 9_500, gang(2, 8)) };
    let d = schedule(&nodes, &run, &queues, std::slice::from_ref(&urgent), 10_000, Policy::default());
    // Only its own queue's gang makes room: the other queue's quota is not this queue's to take.
    assert_eq!(d.preempt, [("low".to_string(), "urgent".to_string())]);
    assert!(d.admit.is_empty(), "the victim checkpoints first");
    assert!(reason(&d, "urgent").contains("same queue") && reason(&d, "urgent").contains("quota"), "{d:?}");
    // Equal priority waits for the quota.
    let peer = Request { priority: 0, ..urgent.clone() };
    let d = schedule(&nodes, &run, &queues, &[peer], 10_000, Policy::default());
    assert!(d.preempt.is_empty());
    assert!(reason(&d, "urgent").starts_with("queue research holds 16 of its 16 GPUs"), "{d:?}");
    // Once the victim has stopped, the urgent gang is admitted.
    let d = schedule(&nodes, &run[1..], &queues, &[urgent], 10_060, Policy::default());
    assert_eq!(admitted(&d), ["urgent"]);
}

#[test]
fn pods_land_only_on_ready_nodes_of_their_gpu_type_and_cpu_stages_hold_no_gpus() {
    let mut nodes = gpu_nodes(2, "A100");
    nodes.extend(gpu_nodes(2, "H100"));
    nodes[2].schedulable = false; // H100-0 cordoned
    let h100 = Gang { gpu_type: Some("H100".into()), ..gang(1, 8) };
    let d = schedule(&nodes, &[], &open_queue(), &[request("g", 0, 0, h100)], 0, Policy::default());
    assert_eq!(d.admit[0].1, ["H100-1"]);
    let cpu = Gang {
        pods: 4,
        min_pods: 4,
        per_pod: Resources { gpus: 0, cpu_millis: 48_000, memory: 64 * GIB },
        gpu_type: None,
    };
    let d = schedule(&nodes, &[], &open_queue(), &[request("c", 0, 0, cpu)], 0, Policy::default());
    assert_eq!(d.admit[0].1.len(), 4);
}

/// A day of a busy cluster: runs arrive, start, finish; the pass is replayed every 10 minutes.
#[test]
fn a_simulated_cluster_never_overcommits_never_starts_part_of_a_gang_and_starves_no_one() {
    let nodes = gpu_nodes(16, "H100");
    let mut rng = 0x9E37_79B9_7F4A_7C15u64;
    let mut next = || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    let mut waiting: Vec<Request> = Vec::new();
    let mut active: Vec<Running> = Vec::new();
    let mut started: BTreeMap<String, i64> = BTreeMap::new();
    let mut submitted = 0;
    let mut preemptions = 0;
    for tick in 0..400i64 {
        let now = tick * 600;
        active.retain(|r| r.expected_end.is_none_or(|e| e > now));
        if tick < 250 {
            // About 60% of the cluster's GPU-time asked for while runs arrive, then they drain.
            for _ in 0..u64::from(next() % 3 == 0) {
                let pods = [1u32, 1, 2, 4, 8, 16][(next() % 6) as usize];
                let seconds = 600 * (1 + (next() % 12) as i64);
                let priority = if next() % 10 == 0 { 5 } else { 0 };
                let r = Request {
                    expected_seconds: Some(seconds),
                    ..request(&format!("run-{submitted}"), priority, now, gang(pods, 8))
                };
                submitted += 1;
                waiting.push(r);
            }
        }
        let d = schedule(&nodes, &active, &open_queue(), &waiting, now, Policy::default());
        preemptions += d.preempt.len();
        for (victim, _) in &d.preempt {
            // Victims checkpoint and queue again for the rest of their work.
            let pos = active.iter().position(|r| &r.id == victim).unwrap();
            let r = active.remove(pos);
            let left = r.expected_end.unwrap() - now;
            waiting.push(Request { expected_seconds: Some(left), ..request(&r.id, r.priority, now, r.gang.clone()) });
        }
        for (id, on) in &d.admit {
            let pos = waiting.iter().position(|r| &r.id == id).unwrap();
            let r = waiting.remove(pos);
            assert_eq!(on.len(), r.gang.pods as usize, "{id}: the whole gang or nothing");
            started.entry(id.clone()).or_insert(now);
            active.push(Running {
                id: r.id.clone(),
                queue: r.queue.clone(),
                priority: r.priority,
                gang: r.gang.clone(),
                nodes: on.clone(),
                started: now,
                last_checkpoint: None,
                preemptible: true,
                expected_end: Some(now + r.expected_seconds.unwrap()),
            });
        }
        // No node holds more than it has.
        for n in &nodes {
            let used: u32 = active
                .iter()
                .flat_map(|r| r.nodes.iter().map(move |x| (x, r.gang.per_pod.gpus)))
                .filter(|(x, _)| **x == n.name)
                .map(|(_, g)| g)
                .sum();
            assert!(used <= n.allocatable.gpus, "{} overcommitted at tick {tick}: {used}", n.name);
        }
    }
    assert!(
        waiting.is_empty(),
        "{} runs never started: {:?}",
        waiting.len(),
        waiting.iter().map(|r| &r.id).collect::<Vec<_>>()
    );
    assert_eq!(started.len(), submitted);
    assert!(preemptions > 0, "the urgent runs preempted some training");
}

#[test]
fn an_elastic_gang_shrinks_after_its_wait_and_grows_back_when_its_nodes_return() {
    // 5 nodes, two of them lost: a gang of 4 that may run on 2 waits for all 4, then shrinks.
    let mut nodes = gpu_nodes(5, "H100");
    nodes[3].schedulable = false;
    nodes[4].schedulable = false;
    let elastic = Request { shrink_from: Some(300), ..request("train", 0, 0, Gang { min_pods: 2, ..gang(4, 8) }) };
    let policy = Policy { min_runtime: 600, ..Policy::default() };
    let d = schedule(&nodes, &[], &open_queue(), std::slice::from_ref(&elastic), 299, policy);
    assert!(d.admit.is_empty(), "it waits for all its nodes until shrink_from: {d:?}");
    assert_eq!(reason(&d, "train"), "needs 4 nodes x 8 GPUs, 3 free; 0 ahead of it");
    // Three of four ranks train no faster than two (one of the three holds two gradient groups):
    // it takes two, and leaves the third node to others.
    let other = request("other", 0, 5, gang(1, 8));
    let d = schedule(&nodes, &[], &open_queue(), &[elastic.clone(), other.clone()], 300, policy);
    assert_eq!(d.admit[0], ("train".to_string(), vec!["H100-0".to_string(), "H100-1".into()]));
    assert_eq!(d.admit[1], ("other".to_string(), vec!["H100-2".to_string()]));
    // Never below min_pods: with one node left it waits.
    let lonely: Vec<Node> = nodes.iter().cloned().enumerate().map(|(i, n)| Node { schedulable: i == 0, ..n }).collect();
    let d = schedule(&lonely, &[], &open_queue(), std::slice::from_ref(&elastic), 900, policy);
    assert!(d.admit.is_empty(), "{d:?}");
    // A gang that may not shrink waits however long.
    let rigid = Request { shrink_from: None, ..elastic.clone() };
    assert!(schedule(&nodes, &[], &open_queue(), &[rigid], 10_000, policy).admit.is_empty());

    // Running on 2 of its 4 pods, it holds 16 GPUs; a node comes back, and free nodes serve
    // waiting gangs first.
    let shrunk = Running {
        gang: Gang { min_pods: 2, ..gang(4, 8) },
        ..running("train", 0, &["H100-0", "H100-1"], 300, Some(800))
    };
    nodes[3].schedulable = true;
    let d = schedule(&nodes, std::slice::from_ref(&shrunk), &open_queue(), std::slice::from_ref(&other), 1000, policy);
    assert_eq!(admitted(&d), ["other"]);
    assert!(d.preempt.is_empty(), "it does not grow while others need the nodes: {d:?}");
    // Once its nodes are back and nothing waits, it is asked to checkpoint and restart on all 4,
    // but not before it ran min_runtime.
    let d = schedule(&nodes, std::slice::from_ref(&shrunk), &open_queue(), &[], 899, policy);
    assert!(d.preempt.is_empty(), "{d:?}");
    let d = schedule(&nodes, std::slice::from_ref(&shrunk), &open_queue(), &[], 900, policy);
    assert_eq!(d.preempt, [("train".to_string(), pretrain_crd::status::GROW.to_string())]);
    // Asked to grow, it waits for all 4 again, and they are free: it starts whole.
    let d = schedule(&nodes, &[], &open_queue(), std::slice::from_ref(&elastic), 950, policy);
    assert_eq!(d.admit[0].1.len(), 4);
}
