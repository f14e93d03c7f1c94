//! The planner: from a run's spec and what has been observed of its stages, the next thing to do.
//! Pure (no client, no I/O, no clock), so both executors share it: the local runner (child processes)
//! and the operator (Kubernetes Jobs, whose attempt bookkeeping is in [`cluster`]).

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use pretrain_crd::spec::OrderStrategy;
use pretrain_crd::{PretrainRunSpec, Stage};

mod attempt;
pub mod cluster;
pub mod goodput;
pub mod invocation;

/// What has been observed of one stage.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Observed {
    /// Nothing committed for this spec, nothing failed.
    Pending,
    /// Outputs committed for the stage's current config hash.
    Committed,
    /// Attempts that ended without a commit.
    Failed {
        /// Attempts so far.
        attempts: u32,
        /// Whether the last one said retrying cannot help (invalid spec or input).
        permanent: bool,
        /// What the last one said.
        reason: String,
    },
}

/// How a stage's processes are laid out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// `shards` independent map tasks (`--phase map`, `JOB_COMPLETION_INDEX` 0..shards), then
    /// data-prep's phases after the map (`after_map`; none for tokenize), then one reduce
    /// (`--phase reduce`).
    Sharded {
        /// Map tasks.
        shards: u32,
        /// data-prep's tasks after the map.
        after_map: Option<DataTasks>,
    },
    /// All-or-nothing gang of `nodes` processes (ranks), each with `gpus_per_node` GPUs.
    Gang {
        /// Processes.
        nodes: u32,
        /// GPUs each.
        gpus_per_node: u32,
    },
    /// One process.
    Single,
}

/// data-prep's phases after its map: `dedup` independent dedup tasks, one cluster task, for
/// in-context order `route` embed tasks and `order` order tasks, `route` route tasks and `write`
/// write tasks (`--phase dedup|cluster|embed|order|route|write`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DataTasks {
    /// Dedup tasks.
    pub dedup: u32,
    /// Order tasks, for in-context order (after as many embed tasks as route tasks).
    pub order: Option<u32>,
    /// Route tasks.
    pub route: u32,
    /// Write tasks.
    pub write: u32,
}

/// The role of a stage's Job.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// The map pods of a sharded stage.
    Map,
    /// The dedup pods of data-prep, after its map.
    Dedup,
    /// The cluster pod of data-prep, after its dedup pods.
    Cluster,
    /// The embed pods of data-prep's in-context order, after its cluster pod.
    Embed,
    /// The order pods of data-prep's in-context order, after its embed pods.
    Order,
    /// The route pods of data-prep, after its cluster pod (or its order pods).
    Route,
    /// The write pods of data-prep, after its route pods.
    Write,
    /// The reduce pod of a sharded stage.
    Reduce,
    /// A training gang.
    Gang,
    /// A single pod.
    Single,
}

/// The pods of one role's Job, all alike: what the operator renders and the scheduler places.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Pods<'a> {
    /// How many.
    pub count: u32,
    /// GPUs of each.
    pub gpus: u32,
    /// CPU request of each.
    pub cpu: &'a Quantity,
    /// Memory request (and limit) of each.
    pub memory: &'a Quantity,
}

/// The pods of `role`'s Job in `spec`: `data.shards` map pods, `data.tasks.dedup` dedup pods, one
/// cluster pod, `data.tasks.route` embed pods, `data.tasks.order` order pods, `data.tasks.route`
/// route pods, `data.tasks.write` write pods and one reduce pod with
/// `data.resources`, one pod per node with `gpusPerNode` GPUs for a gang, and one pod with at most
/// one GPU for a single-pod stage, both with `train.resources`.
pub fn pods(spec: &PretrainRunSpec, role: Role) -> Pods<'_> {
    let (data, train) = (&spec.data.resources, &spec.train.resources);
    let (count, gpus, cpu, memory) = match role {
        Role::Map => (spec.data.shards.max(1), 0, &data.cpu, &data.memory),
        Role::Dedup => (spec.data.dedup_tasks(), 0, &data.cpu, &data.memory),
        Role::Embed => (spec.data.embed_tasks(), 0, &data.cpu, &data.memory),
        Role::Order => (spec.data.order_tasks(), 0, &data.cpu, &data.memory),
        Role::Route => (spec.data.route_tasks(), 0, &data.cpu, &data.memory),
        Role::Write => (spec.data.write_tasks(), 0, &data.cpu, &data.memory),
        Role::Cluster | Role::Reduce => (1, 0, &data.cpu, &data.memory),
        Role::Gang => (train.nodes.max(1), train.gpus_per_node, &train.cpu, &train.memory),
        Role::Single => (1, train.gpus_per_node.min(1), &train.cpu, &train.memory),
    };
    Pods { count, gpus, cpu, memory }
}

impl Role {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Map => "map",
            Role::Dedup => "dedup",
            Role::Cluster => "cluster",
            Role::Embed => "embed",
            Role::Order => "order",
            Role::Route => "route",
            Role::Write => "write",
            Role::Reduce => "reduce",
            Role::Gang => "gang",
            Role::Single => "single",
        }
    }

    /// Whether the role's pods are independent tasks of an Indexed Job, each retried alone.
    pub fn is_task(self) -> bool {
        matches!(self, Role::Map | Role::Dedup | Role::Embed | Role::Order | Role::Route | Role::Write)
    }

    /// The roles of a layout's Jobs, in the order they run.
    pub fn of(layout: Layout) -> &'static [Role] {
        match layout {
            Layout::Sharded { after_map: None, .. } => &[Role::Map, Role::Reduce],
            Layout::Sharded { after_map: Some(DataTasks { order: None, .. }), .. } => {
                &[Role::Map, Role::Dedup, Role::Cluster, Role::Route, Role::Write, Role::Reduce]
            }
            Layout::Sharded { after_map: Some(DataTasks { order: Some(_), .. }), .. } => &[
                Role::Map,
                Role::Dedup,
                Role::Cluster,
                Role::Embed,
                Role::Order,
                Role::Route,
                Role::Write,
                Role::Reduce,
            ],
            Layout::Gang { .. } => &[Role::Gang],
            Layout::Single => &[Role::Single],
        }
    }
}

/// The planner's decision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Run `stage` (attempt `attempt`, 1-based) laid out as `layout`.
    Run {
        /// The stage.
        stage: Stage,
        /// Which attempt this is.
        attempt: u32,
        /// Its processes.
        layout: Layout,
    },
    /// Every selected stage is committed.
    Finished,
    /// `stage` failed and will not be retried.
    Failed {
        /// The stage.
        stage: Stage,
        /// Why it is not retried, and what it said.
        reason: String,
    },
}

/// How `stage` runs under `spec`.
pub fn layout(spec: &PretrainRunSpec, stage: Stage) -> Layout {
    match stage {
        Stage::DataPrep => Layout::Sharded {
            shards: spec.data.shards.max(1),
            after_map: Some(DataTasks {
                dedup: spec.data.dedup_tasks(),
                order: (spec.data.order.strategy == OrderStrategy::InContext).then(|| spec.data.order_tasks()),
                route: spec.data.route_tasks(),
                write: spec.data.write_tasks(),
            }),
        },
        Stage::Tokenize => Layout::Sharded { shards: spec.data.shards.max(1), after_map: None },
        Stage::Train | Stage::LongContext => {
            Layout::Gang { nodes: spec.train.resources.nodes.max(1), gpus_per_node: spec.train.resources.gpus_per_node }
        }
        Stage::Eval => Layout::Single,
    }
}

/// Attempts a stage gets before the run fails: training stages resume from their last checkpoint up
/// to `train.maxRestarts` times; the others are retried twice (their map tasks skip finished work).
pub fn attempts_allowed(spec: &PretrainRunSpec, stage: Stage) -> u32 {
    if stage.is_training() { spec.train.max_restarts + 1 } else { 3 }
}

/// The next action for the `selected` stages (in pipeline order) given what was observed of each;
/// a stage missing from `observed` is pending.
pub fn next(spec: &PretrainRunSpec, selected: &[Stage], observed: &BTreeMap<Stage, Observed>) -> Action {
    for &stage in selected {
        match observed.get(&stage).unwrap_or(&Observed::Pending) {
            Observed::Committed => continue,
            Observed::Pending => return Action::Run { stage, attempt: 1, layout: layout(spec, stage) },
            Observed::Failed { permanent: true, reason, .. } => {
                return Action::Failed { stage, reason: format!("not retried (invalid spec or input): {reason}") };
            }
            Observed::Failed { attempts, reason, .. } => {
                let allowed = attempts_allowed(spec, stage);
                if *attempts >= allowed {
                    return Action::Failed { stage, reason: format!("gave up after {attempts} attempts: {reason}") };
                }
                return Action::Run { stage, attempt: attempts + 1, layout: layout(spec, stage) };
            }
        }
    }
    Action::Finished
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The spec of a YAML fixture (`tests/fixtures/*.yaml` of this crate).
    fn fixture(name: &str) -> PretrainRunSpec {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name);
        pretrain_crd::load(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display())).spec
    }

    fn observed(states: &[(Stage, Observed)]) -> BTreeMap<Stage, Observed> {
        states.iter().cloned().collect()
    }

    fn failed(attempts: u32, permanent: bool) -> Observed {
        Observed::Failed { attempts, permanent, reason: "boom".into() }
    }

    #[test]
    fn runs_the_first_uncommitted_stage_with_its_layout() {
        let spec = fixture("gpu-gang.yaml");
        let all = spec.stages();
        assert_eq!(
            next(&spec, &all, &BTreeMap::new()),
            Action::Run {
                stage: Stage::DataPrep,
                attempt: 1,
                layout: Layout::Sharded {
                    shards: 8,
                    after_map: Some(DataTasks { dedup: 8, order: None, route: 8, write: 8 })
                }
            }
        );
        let done = observed(&[(Stage::DataPrep, Observed::Committed), (Stage::Tokenize, Observed::Committed)]);
        assert_eq!(
            next(&spec, &all, &done),
            Action::Run { stage: Stage::Train, attempt: 1, layout: Layout::Gang { nodes: 4, gpus_per_node: 8 } }
        );
        let all_done: BTreeMap<_, _> = all.iter().map(|s| (*s, Observed::Committed)).collect();
        assert_eq!(next(&spec, &all, &all_done), Action::Finished);
        // The eval stage is one process; a run without longContext has no long-context stage.
        let spec = fixture("cpu-minimal.yaml");
        assert!(!spec.stages().contains(&Stage::LongContext));
        let upstream = observed(&[
            (Stage::DataPrep, Observed::Committed),
            (Stage::Tokenize, Observed::Committed),
            (Stage::Train, Observed::Committed),
        ]);
        assert_eq!(
            next(&spec, &spec.stages(), &upstream),
            Action::Run { stage: Stage::Eval, attempt: 1, layout: Layout::Single }
        );
    }

    #[test]
    fn training_resumes_within_its_restart_budget_and_invalid_input_is_not_retried() {
        let spec = fixture("gpu-gang.yaml"); // maxRestarts: 2
        let selected = [Stage::Train];
        assert_eq!(
            next(&spec, &selected, &observed(&[(Stage::Train, failed(2, false))])),
            Action::Run { stage: Stage::Train, attempt: 3, layout: Layout::Gang { nodes: 4, gpus_per_node: 8 } }
        );
        assert!(matches!(
            next(&spec, &selected, &observed(&[(Stage::Train, failed(3, false))])),
            Action::Failed { stage: Stage::Train, reason } if reason == "gave up after 3 attempts: boom"
        ));
        assert!(matches!(
            next(&spec, &[Stage::DataPrep], &observed(&[(Stage::DataPrep, failed(1, true))])),
            Action::Failed { stage: Stage::DataPrep, reason } if reason.starts_with("not retried")
        ));
        assert_eq!(attempts_allowed(&spec, Stage::Eval), 3);
    }

    #[test]
    fn only_the_selected_stages_are_considered() {
        let spec = fixture("gpu-gang.yaml");
        let selected = [Stage::Tokenize, Stage::Train];
        let obs = observed(&[(Stage::Tokenize, Observed::Committed)]);
        assert!(matches!(next(&spec, &selected, &obs), Action::Run { stage: Stage::Train, .. }));
        assert_eq!(next(&spec, &[Stage::Tokenize], &obs), Action::Finished);
    }
}
