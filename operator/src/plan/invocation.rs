//! How a stage process is started, its arguments and environment (the stage contract,
//! `docs/stage-contract.md`), described once for both executors: the local runner spawns it, the
//! operator renders it into a Job's pod template.

use pretrain_crd::Stage;
use pretrain_crd::contract::{
    ENV_JOB_COMPLETION_INDEX, ENV_MASTER_ADDR, ENV_MASTER_PORT, ENV_RANK, ENV_RUN, ENV_STORE, ENV_WORLD_SIZE,
};

/// Rank 0's rendezvous port.
pub const MASTER_PORT: u16 = 29500;

/// Where one process of a stage runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Place {
    /// On this machine, alone (rank 0 of 1), running map task `index` (0 for other phases).
    Local {
        /// The map task.
        index: u32,
    },
    /// In a pod of its own, alone (a reduce, eval).
    Pod,
    /// In one of the `pods` pods of an Indexed Job, whose completion index is its rank (a map task or
    /// a rank of a gang); a gang's ranks meet rank 0 at `master`.
    Indexed {
        /// Pods of the Job.
        pods: u32,
        /// Rank 0's host name, for a gang.
        master: Option<String>,
    },
}

/// The value of an environment variable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value {
    /// A literal.
    Text(String),
    /// The pod's Indexed Job completion index (from its annotation).
    CompletionIndex,
}

/// Arguments (after the worker binary) and environment of one stage process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invocation {
    /// `<stage> --spec <spec> [--phase map|reduce|all]`.
    pub args: Vec<String>,
    /// The contract's variables, in this order.
    pub env: Vec<(&'static str, Value)>,
}

/// How the process of `stage` running `phase` (none: the stage's only phase) of run `run`, whose
/// store is `store` and whose manifest it reads from `spec`, is started at `place`.
pub fn invocation(
    stage: Stage,
    spec: &str,
    phase: Option<&str>,
    (run, store): (&str, &str),
    place: Place,
) -> Invocation {
    let mut args = vec![stage.as_str().to_string(), "--spec".into(), spec.to_string()];
    if let Some(phase) = phase {
        args.extend(["--phase".into(), phase.to_string()]);
    }
    let text = |v: &str| Value::Text(v.to_string());
    let mut env = vec![(ENV_RUN, text(run)), (ENV_STORE, text(store))];
    match place {
        Place::Local { index } => env.extend([
            (ENV_RANK, text("0")),
            (ENV_WORLD_SIZE, text("1")),
            (ENV_MASTER_ADDR, text("127.0.0.1")),
            (ENV_MASTER_PORT, Value::Text(MASTER_PORT.to_string())),
            (ENV_JOB_COMPLETION_INDEX, Value::Text(index.to_string())),
        ]),
        Place::Pod => {
            env.extend([(ENV_RANK, text("0")), (ENV_WORLD_SIZE, text("1")), (ENV_JOB_COMPLETION_INDEX, text("0"))]);
        }
        Place::Indexed { pods, master } => {
            env.extend([(ENV_RANK, Value::CompletionIndex), (ENV_WORLD_SIZE, Value::Text(pods.to_string()))]);
            if let Some(master) = master {
                env.extend([
                    (ENV_MASTER_ADDR, Value::Text(master)),
                    (ENV_MASTER_PORT, Value::Text(MASTER_PORT.to_string())),
                ]);
            }
        }
    }
    Invocation { args, env }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_local_map_task_and_a_gang_rank_get_the_contracts_variables() {
        let local =
            invocation(Stage::DataPrep, "/tmp/run.yaml", Some("map"), ("r", "file:///s"), Place::Local { index: 3 });
        assert_eq!(local.args, ["data-prep", "--spec", "/tmp/run.yaml", "--phase", "map"]);
        assert!(local.env.contains(&(ENV_JOB_COMPLETION_INDEX, Value::Text("3".into()))));
        assert!(local.env.contains(&(ENV_WORLD_SIZE, Value::Text("1".into()))));

        let master = Some("r-train-gang-1-0.r-train".to_string());
        let rank = invocation(
            Stage::Train,
            "/etc/pretrain/run.yaml",
            None,
            ("r", "s3://b"),
            Place::Indexed { pods: 4, master },
        );
        assert_eq!(rank.args, ["train", "--spec", "/etc/pretrain/run.yaml"]);
        assert!(rank.env.contains(&(ENV_RANK, Value::CompletionIndex)));
        assert!(rank.env.contains(&(ENV_MASTER_ADDR, Value::Text("r-train-gang-1-0.r-train".into()))));
        assert!(!rank.env.iter().any(|(k, _)| *k == ENV_JOB_COMPLETION_INDEX), "the Job controller sets it");
    }
}
