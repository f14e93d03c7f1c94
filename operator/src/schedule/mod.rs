//! Cluster-wide admission of stage gangs, pure: from the nodes, what runs on them, the queues and the
//! waiting requests, which gangs start now and where, which training gangs to preempt, and why each
//! of the others waits. No client, no clock (the time is an input), so a simulated cluster drives it
//! in tests and the benchmark.
//!
//! The rules:
//! - a request is a stage's whole gang (`pods` pods of the same shape); it is placed pod by pod on
//!   nodes that can hold it (best fit: the node left with the fewest free GPUs, then CPU), and admitted
//!   only if every pod fits: no partial gang ever starts, so two gangs can never deadlock holding
//!   halves of the cluster;
//! - requests are considered by priority, then submission time, then name (first come, first served
//!   among equals, so equal priorities never starve);
//! - a queue admits GPUs up to its quota per GPU type; with `borrowing` it may also use quota that
//!   other queues leave idle;
//! - the first request that cannot start (the head) holds a reservation: the placement it will get
//!   when running gangs end (by their expected end). A later request may jump ahead (backfill) only if
//!   it leaves that placement untouched or ends before the head's expected start;
//! - a head that cannot fit may preempt training gangs of lower priority that ran at least
//!   `min_runtime` seconds: the set whose release lets it fit and that loses the fewest GPU-seconds of
//!   work since their last checkpoints. Victims are asked to checkpoint and are requeued, never failed;
//! - an elastic gang (`min_pods` below `pods`) that waited past its `shrink_from` time starts on as
//!   many pods as fit, down to `min_pods`, rather than wait for all of them; once all of them fit
//!   again (on its own nodes and the free ones) and nothing waits, it is asked to checkpoint and
//!   requeue, to restart on all of them (a grow, at most once per `min_runtime`).

pub mod cluster;

use std::collections::{BTreeMap, HashMap};

/// Resources of one pod, or free on one node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Resources {
    /// GPUs.
    pub gpus: u32,
    /// CPU in millicores.
    pub cpu_millis: u64,
    /// Memory in bytes.
    pub memory: u64,
}

impl Resources {
    fn fits_in(&self, free: &Resources) -> bool {
        self.gpus <= free.gpus && self.cpu_millis <= free.cpu_millis && self.memory <= free.memory
    }

    fn take(&mut self, used: &Resources) {
        self.gpus -= used.gpus;
        self.cpu_millis -= used.cpu_millis;
        self.memory -= used.memory;
    }

    fn give(&mut self, freed: &Resources) {
        self.gpus += freed.gpus;
        self.cpu_millis += freed.cpu_millis;
        self.memory += freed.memory;
    }

    /// What is left of `self` after `used`, floored at zero.
    fn minus(&self, used: &Resources) -> Resources {
        Resources {
            gpus: self.gpus.saturating_sub(used.gpus),
            cpu_millis: self.cpu_millis.saturating_sub(used.cpu_millis),
            memory: self.memory.saturating_sub(used.memory),
        }
    }
}

/// A node as its labels, taints and conditions describe it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    /// Node name.
    pub name: String,
    /// `nvidia.com/gpu.product`, when it has GPUs.
    pub gpu_type: Option<String>,
    /// Allocatable resources.
    pub allocatable: Resources,
    /// Ready, not cordoned, and without a NoSchedule/NoExecute taint our pods do not tolerate.
    pub schedulable: bool,
}

/// A queue (a `PretrainQueue`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Queue {
    /// Queue name.
    pub name: String,
    /// GPUs the queue may hold per GPU type (`*` for any type); a type not listed has no quota.
    pub gpu_quota: BTreeMap<String, u32>,
    /// May use quota that other queues leave idle.
    pub borrowing: bool,
}

/// What a gang needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Gang {
    /// Pods, all of one shape.
    pub pods: u32,
    /// Fewest pods it may run on (elastic training); `pods` when it needs all of them.
    pub min_pods: u32,
    /// Each pod's resources.
    pub per_pod: Resources,
    /// Required GPU type, if any.
    pub gpu_type: Option<String>,
}

impl Gang {
    fn gpus(&self) -> u64 {
        u64::from(self.pods) * u64::from(self.per_pod.gpus)
    }
}

/// A stage waiting to start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// `namespace/run/stage`.
    pub id: String,
    /// Its queue.
    pub queue: String,
    /// Higher first.
    pub priority: i32,
    /// When it started waiting (seconds).
    pub submitted: i64,
    /// What it needs.
    pub gang: Gang,
    /// Expected run time in seconds, when known (from the token budget and measured throughput).
    pub expected_seconds: Option<i64>,
    /// From when it may start on fewer pods than its gang has (down to `min_pods`), if ever.
    pub shrink_from: Option<i64>,
}

/// A stage that holds resources.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Running {
    /// `namespace/run/stage`.
    pub id: String,
    /// Its queue.
    pub queue: String,
    /// Its priority.
    pub priority: i32,
    /// Its gang (all its pods, though it may run on fewer).
    pub gang: Gang,
    /// The node of each pod it runs (fewer than the gang's pods when it shrank).
    pub nodes: Vec<String>,
    /// When it started (seconds).
    pub started: i64,
    /// When it last committed a checkpoint (training), if it did.
    pub last_checkpoint: Option<i64>,
    /// Whether it can be preempted (a training stage: it checkpoints on SIGTERM).
    pub preemptible: bool,
    /// When it is expected to end, if known.
    pub expected_end: Option<i64>,
}

impl Running {
    /// GPUs it holds.
    fn gpus(&self) -> u64 {
        self.nodes.len() as u64 * u64::from(self.gang.per_pod.gpus)
    }
}

/// Knobs of the scheduler.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    /// A gang is not preempted before it ran this long (seconds).
    pub min_runtime: i64,
    /// Whether higher priority may preempt at all.
    pub preemption: bool,
}

impl Default for Policy {
    fn default() -> Self {
        Self { min_runtime: 15 * 60, preemption: true }
    }
}

/// Why a request waits, and where it stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Waiting {
    /// The request.
    pub id: String,
    /// Requests of its queue ahead of it.
    pub position: u32,
    /// One line for its status.
    pub reason: String,
}

/// The outcome of one pass.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Decision {
    /// Requests to start now, with the node of each pod.
    pub admit: Vec<(String, Vec<String>)>,
    /// Running gangs to checkpoint and requeue, with the request they make room for
    /// ([`pretrain_crd::status::GROW`] for a shrunk gang that restarts on all its pods).
    pub preempt: Vec<(String, String)>,
    /// Every request that waits.
    pub waiting: Vec<Waiting>,
}

/// The cluster as the pass sees it: free resources per node, GPUs held per queue and type.
struct State<'a> {
    nodes: &'a [Node],
    free: Vec<Resources>,
    index: HashMap<&'a str, usize>,
    queue_use: HashMap<(String, String), u64>,
}

impl<'a> State<'a> {
    fn new(nodes: &'a [Node], running: &[Running]) -> Self {
        let free = nodes.iter().map(|n| n.allocatable).collect();
        let index = nodes.iter().enumerate().map(|(i, n)| (n.name.as_str(), i)).collect();
        let mut state = Self { nodes, free, index, queue_use: HashMap::new() };
        for r in running {
            state.hold(&r.queue, &r.gang, &r.nodes);
        }
        state
    }

    /// Gives back what a running gang holds on `free`.
    fn release(&self, r: &Running, free: &mut [Resources]) {
        for name in &r.nodes {
            if let Some(&i) = self.index.get(name.as_str()) {
                free[i].give(&r.gang.per_pod);
            }
        }
    }

    fn hold(&mut self, queue: &str, gang: &Gang, nodes: &[String]) {
        for name in nodes {
            if let Some(&i) = self.index.get(name.as_str()) {
                let f = &mut self.free[i];
                *f = f.minus(&gang.per_pod);
            }
        }
        *self.queue_use.entry((queue.to_string(), gang_type(gang))).or_default() +=
            nodes.len() as u64 * u64::from(gang.per_pod.gpus);
    }

    fn eligible(&self, node: usize, gang: &Gang) -> bool {
        let n = &self.nodes[node];
        n.schedulable
            && (gang.per_pod.gpus == 0 || gang.gpu_type.is_none() || n.gpu_type == gang.gpu_type)
            && (gang.per_pod.gpus == 0 || n.gpu_type.is_some())
    }

    /// Places every pod of `gang` on `free` (best fit), or `None` if one does not fit.
    fn place(&self, gang: &Gang, free: &[Resources]) -> Option<Vec<usize>> {
        self.place_pods(gang, gang.pods, free)
    }

    /// Places a gang that may shrink on fewer pods than it has, down to `min_pods`: its ranks then
    /// share the whole gang's gradient groups, so it trains at 1 / ceil(pods / n) of full speed on
    /// `n` pods. Of the most pods that fit, it takes the fewest that train as fast (3 of 4 train no
    /// faster than 2), and leaves the rest to others.
    fn place_shrunk(&self, gang: &Gang, free: &[Resources]) -> Option<Vec<usize>> {
        let fit = u32::try_from(self.slots_in(gang, free)).unwrap_or(u32::MAX).min(gang.pods.saturating_sub(1));
        if fit == 0 || fit < gang.min_pods {
            return None;
        }
        let n = gang.pods.div_ceil(gang.pods.div_ceil(fit));
        self.place_pods(gang, n, free)
    }

    /// Places `pods` pods of `gang` on `free` (best fit), or `None` if one does not fit.
    fn place_pods(&self, gang: &Gang, pods: u32, free: &[Resources]) -> Option<Vec<usize>> {
        let mut free = free.to_vec();
        let mut placed = Vec::with_capacity(pods as usize);
        for _ in 0..pods {
            let best = (0..free.len())
                .filter(|&i| self.eligible(i, gang) && gang.per_pod.fits_in(&free[i]))
                .min_by_key(|&i| (free[i].gpus - gang.per_pod.gpus, free[i].cpu_millis - gang.per_pod.cpu_millis, i))?;
            free[best].take(&gang.per_pod);
            placed.push(best);
        }
        Some(placed)
    }

    /// Pods of `gang` that fit on the free resources now.
    fn slots(&self, gang: &Gang) -> u64 {
        self.slots_in(gang, &self.free)
    }

    /// Pods of `gang` that fit on `free`.
    fn slots_in(&self, gang: &Gang, free: &[Resources]) -> u64 {
        (0..free.len())
            .filter(|&i| self.eligible(i, gang))
            .map(|i| {
                let f = &free[i];
                let p = &gang.per_pod;
                let by = |have: u64, need: u64| have.checked_div(need).unwrap_or(u64::MAX);
                by(u64::from(f.gpus), u64::from(p.gpus)).min(by(f.cpu_millis, p.cpu_millis)).min(by(f.memory, p.memory))
            })
            .map(|n| n.min(u64::from(gang.pods)))
            .sum()
    }
}

fn gang_type(gang: &Gang) -> String {
    gang.gpu_type.clone().unwrap_or_else(|| "*".into())
}

/// Quota of `queue` for `gpu_type`, if it has one (the type's own entry, else `*`).
fn quota(queue: &Queue, gpu_type: &str) -> Option<u64> {
    queue.gpu_quota.get(gpu_type).or_else(|| queue.gpu_quota.get("*")).map(|&q| u64::from(q))
}

/// Why `request` may not take more GPUs from its queue, if it may not, once gangs of its queue
/// holding `freed` GPUs of its type have stopped.
fn over_quota(state: &State<'_>, queues: &HashMap<&str, &Queue>, request: &Request, freed: u64) -> Option<String> {
    let gpus = request.gang.gpus();
    if gpus == 0 {
        return None;
    }
    let kind = gang_type(&request.gang);
    let Some(queue) = queues.get(request.queue.as_str()) else {
        return Some(format!("queue {} does not exist", request.queue));
    };
    let used = state.queue_use.get(&(queue.name.clone(), kind.clone())).copied().unwrap_or(0).saturating_sub(freed);
    let own = quota(queue, &kind).unwrap_or(0);
    if used + gpus <= own {
        return None;
    }
    if queue.borrowing {
        // Quota other queues leave idle.
        let idle: u64 = queues
            .values()
            .filter(|q| q.name != queue.name)
            .map(|q| {
                let u = state.queue_use.get(&(q.name.clone(), kind.clone())).copied().unwrap_or(0);
                quota(q, &kind).unwrap_or(0).saturating_sub(u)
            })
            .sum();
        if used + gpus <= own + idle {
            return None;
        }
    }
    Some(format!(
        "queue {} holds {used} of its {own} GPUs{}; needs {gpus} more",
        queue.name,
        if kind == "*" { String::new() } else { format!(" of type {kind}") }
    ))
}

fn describe(gang: &Gang) -> String {
    let p = &gang.per_pod;
    if p.gpus > 0 {
        let kind = gang.gpu_type.as_deref().map(|t| format!(" of type {t}")).unwrap_or_default();
        format!("{} nodes x {} GPUs{kind}", gang.pods, p.gpus)
    } else {
        format!("{} pods x {} CPU, {} GiB", gang.pods, p.cpu_millis as f64 / 1000.0, p.memory >> 30)
    }
}

/// One scheduling pass at time `now`.
pub fn schedule(
    nodes: &[Node],
    running: &[Running],
    queues: &[Queue],
    requests: &[Request],
    now: i64,
    policy: Policy,
) -> Decision {
    let queues: HashMap<&str, &Queue> = queues.iter().map(|q| (q.name.as_str(), q)).collect();
    let mut state = State::new(nodes, running);
    let mut order: Vec<&Request> = requests.iter().collect();
    order.sort_by(|a, b| b.priority.cmp(&a.priority).then(a.submitted.cmp(&b.submitted)).then(a.id.cmp(&b.id)));
    let mut decision = Decision::default();
    // The head's reservation: its expected start and the resources it will use, per node.
    let mut reservation: Option<(i64, Vec<Resources>)> = None;
    let mut ahead: HashMap<&str, u32> = HashMap::new();
    for request in order {
        let position = ahead.entry(request.queue.as_str()).or_default();
        let wait = |decision: &mut Decision, position: &mut u32, reason: String| {
            decision.waiting.push(Waiting { id: request.id.clone(), position: *position, reason });
            *position += 1;
        };
        if let Some(why) = over_quota(&state, &queues, request, 0) {
            let room = if policy.preemption && reservation.is_none() {
                make_quota(&state, &queues, running, request, now, policy, &mut decision)
            } else {
                None
            };
            let why = match room {
                Some((reserved, preempting)) => {
                    reservation = Some(reserved);
                    preempting
                }
                None => why,
            };
            wait(&mut decision, position, why);
            continue;
        }
        // Where it may go now: everything free, less what the head has reserved unless it ends in time.
        let ends_in_time = |start: i64| request.expected_seconds.is_some_and(|s| now + s <= start);
        let free: Vec<Resources> = match &reservation {
            Some((start, reserved)) if !ends_in_time(*start) => {
                state.free.iter().zip(reserved).map(|(f, r)| f.minus(r)).collect()
            }
            _ => state.free.clone(),
        };
        let may_shrink = request.shrink_from.is_some_and(|from| now >= from);
        let placed = state
            .place(&request.gang, &free)
            .or_else(|| may_shrink.then(|| state.place_shrunk(&request.gang, &free)).flatten());
        if let Some(placed) = placed {
            let names: Vec<String> = placed.iter().map(|&i| nodes[i].name.clone()).collect();
            state.hold(&request.queue, &request.gang, &names);
            decision.admit.push((request.id.clone(), names));
            continue;
        }
        if reservation.is_some() {
            let why = format!(
                "needs {}, {} free; waits behind the reserved head of the cluster",
                describe(&request.gang),
                state.slots(&request.gang)
            );
            wait(&mut decision, position, why);
            continue;
        }
        // The head: preempt lower-priority training, or reserve where it will start.
        if policy.preemption
            && let Some(victims) = victims(&state, running, request, now, policy, &|_| true, &|_| true)
        {
            // Nothing else may take what the victims free while they checkpoint.
            reservation = Some(preempt(&state, running, request, &victims, &mut decision, now));
            let names: Vec<&str> = victims.iter().map(|v| running[*v].id.as_str()).collect();
            let why = format!("preempting {} (lower priority) to fit {}", names.join(", "), describe(&request.gang));
            wait(&mut decision, position, why);
            continue;
        }
        let (start, reserved) = reserve(&state, running, &request.gang, now);
        let why = format!(
            "needs {}, {} free; {} ahead of it{}",
            describe(&request.gang),
            state.slots(&request.gang),
            *position,
            if start == i64::MAX { String::new() } else { format!("; expected to start in {} s", start - now) }
        );
        reservation = Some((start, reserved));
        wait(&mut decision, position, why);
    }
    if decision.waiting.is_empty() {
        grow(&state, running, now, policy, &mut decision);
    }
    decision
}

/// Over its queue's quota: the first such request may preempt lower-priority gangs of its own queue
/// (and GPU type) whose GPUs bring it within the quota. Returns the reservation and why it waits.
fn make_quota(
    state: &State<'_>,
    queues: &HashMap<&str, &Queue>,
    running: &[Running],
    request: &Request,
    now: i64,
    policy: Policy,
    decision: &mut Decision,
) -> Option<((i64, Vec<Resources>), String)> {
    let within = |chosen: &[usize]| {
        let freed: u64 = chosen.iter().map(|&v| running[v].gpus()).sum();
        over_quota(state, queues, request, freed).is_none()
    };
    let same_queue = |r: &Running| r.queue == request.queue && gang_type(&r.gang) == gang_type(&request.gang);
    let victims = victims(state, running, request, now, policy, &same_queue, &within)?;
    let reserved = preempt(state, running, request, &victims, decision, now);
    let names: Vec<&str> = victims.iter().map(|v| running[*v].id.as_str()).collect();
    let why = format!(
        "preempting {} (lower priority, same queue) to fit {} in queue {}'s quota",
        names.join(", "),
        describe(&request.gang),
        request.queue
    );
    Some((reserved, why))
}

/// Shrunk gangs that fit on all their pods again, on their own nodes and what is free, are asked
/// to checkpoint and restart on all of them (one per pass, so that two never count on the same free
/// nodes); not before they ran `min_runtime`, so that a gang does not restart again and again.
fn grow(state: &State<'_>, running: &[Running], now: i64, policy: Policy, decision: &mut Decision) {
    let mut shrunk: Vec<&Running> = running
        .iter()
        .filter(|r| r.preemptible && (r.nodes.len() as u64) < u64::from(r.gang.pods))
        .filter(|r| now - r.started >= policy.min_runtime)
        .filter(|r| !decision.preempt.iter().any(|(id, _)| *id == r.id))
        .collect();
    shrunk.sort_by(|a, b| b.priority.cmp(&a.priority).then(a.id.cmp(&b.id)));
    for r in shrunk {
        let mut free = state.free.clone();
        state.release(r, &mut free);
        if state.place(&r.gang, &free).is_some() {
            decision.preempt.push((r.id.clone(), pretrain_crd::status::GROW.to_string()));
            return;
        }
    }
}

/// Asks `victims` to make room for `request` and returns the reservation of what they free: the
/// victims hold their nodes until they have checkpointed, and the head starts there then.
fn preempt(
    state: &State<'_>,
    running: &[Running],
    request: &Request,
    victims: &[usize],
    decision: &mut Decision,
    now: i64,
) -> (i64, Vec<Resources>) {
    let mut after = state.free.clone();
    for &v in victims {
        let r = &running[v];
        state.release(r, &mut after);
        decision.preempt.push((r.id.clone(), request.id.clone()));
    }
    let placement = state.place(&request.gang, &after).unwrap_or_default();
    let mut reserved = vec![Resources::default(); state.nodes.len()];
    for i in placement {
        reserved[i].give(&request.gang.per_pod);
    }
    (now, reserved)
}

/// When `gang` will fit as running gangs end (by expected end; never, if one it needs has none),
/// and the resources it will use then, per node.
fn reserve(state: &State<'_>, running: &[Running], gang: &Gang, now: i64) -> (i64, Vec<Resources>) {
    let mut ending: Vec<&Running> = running.iter().filter(|r| r.expected_end.is_some()).collect();
    ending.sort_by_key(|r| r.expected_end);
    let mut free = state.free.clone();
    for r in ending {
        state.release(r, &mut free);
        if let Some(placed) = state.place(gang, &free) {
            let mut reserved = vec![Resources::default(); free.len()];
            for i in placed {
                reserved[i].give(&gang.per_pod);
            }
            return (r.expected_end.unwrap_or(now).max(now), reserved);
        }
    }
    // Unknown: reserve what it would use on an empty cluster, so that nothing backfills onto it.
    let empty: Vec<Resources> = state.nodes.iter().map(|n| n.allocatable).collect();
    let mut reserved = vec![Resources::default(); free.len()];
    for i in state.place(gang, &empty).unwrap_or_default() {
        reserved[i].give(&gang.per_pod);
    }
    (i64::MAX, reserved)
}

/// The cheapest set of running gangs to preempt so that `request` fits on the nodes and `enough`
/// says the set suffices (its queue's quota): among the `eligible` that have lower priority, are
/// preemptible and ran past the minimum runtime; cheapest = fewest GPU-seconds lost since their
/// last checkpoint.
fn victims(
    state: &State<'_>,
    running: &[Running],
    request: &Request,
    now: i64,
    policy: Policy,
    eligible: &dyn Fn(&Running) -> bool,
    enough: &dyn Fn(&[usize]) -> bool,
) -> Option<Vec<usize>> {
    let lost = |r: &Running| u64::try_from(now - r.last_checkpoint.unwrap_or(r.started)).unwrap_or(0) * r.gpus().max(1);
    let mut candidates: Vec<usize> = (0..running.len())
        .filter(|&i| {
            let r = &running[i];
            r.preemptible && r.priority < request.priority && now - r.started >= policy.min_runtime && eligible(r)
        })
        .collect();
    if candidates.is_empty() {
        return None;
    }
    // Cheapest per GPU freed first.
    candidates.sort_by(|&a, &b| {
        let (ra, rb) = (&running[a], &running[b]);
        (u128::from(lost(ra)) * u128::from(rb.gpus().max(1)))
            .cmp(&(u128::from(lost(rb)) * u128::from(ra.gpus().max(1))))
            .then(ra.id.cmp(&rb.id))
    });
    let freed = |chosen: &[usize]| {
        let mut free = state.free.clone();
        for &v in chosen {
            state.release(&running[v], &mut free);
        }
        free
    };
    let mut chosen = Vec::new();
    for &c in &candidates {
        chosen.push(c);
        let fits = |set: &[usize]| state.place(&request.gang, &freed(set)).is_some() && enough(set);
        if fits(&chosen) {
            // Drop victims the gang fits without, most expensive first.
            let mut by_cost = chosen.clone();
            by_cost.sort_by_key(|&v| std::cmp::Reverse(lost(&running[v])));
            for v in by_cost {
                let without: Vec<usize> = chosen.iter().copied().filter(|&x| x != v).collect();
                if fits(&without) {
                    chosen = without;
                }
            }
            return Some(chosen);
        }
    }
    None
}
