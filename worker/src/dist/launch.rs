//! One process per GPU. A training pod gets `RANK` = its node's index and `WORLD_SIZE` = nodes; with
//! several GPUs per node its worker starts one copy of itself per GPU with `LOCAL_RANK` = the GPU,
//! `RANK` = node × GPUs + GPU and `WORLD_SIZE` = nodes × GPUs (as torchrun does), forwards SIGTERM to
//! them, and exits with the code that says most about the gang.

use std::process::Stdio;

use pretrain_crd::contract::{ENV_RANK, ENV_WORLD_SIZE, exit};
use tokio::process::Command;

use crate::Context;

/// Environment variable naming the GPU of a rank on its node.
pub const ENV_LOCAL_RANK: &str = "LOCAL_RANK";

/// Whether this process must start one rank per GPU instead of training itself.
pub fn needs_ranks(ctx: &Context) -> bool {
    ctx.run.spec.train.resources.gpus_per_node > 1 && std::env::var_os(ENV_LOCAL_RANK).is_none()
}

/// The exit code of a node from its ranks' codes: a real failure first (invalid spec, then any other
/// failure), then a lost peer, then a resume request, then success.
pub fn node_exit(codes: &[i32]) -> i32 {
    let rank = |c: i32| match c {
        exit::DONE => 0,
        exit::RESUME => 1,
        exit::PEER_LOST => 2,
        exit::INVALID => 4,
        _ => 3,
    };
    codes.iter().copied().max_by_key(|c| rank(*c)).unwrap_or(exit::DONE)
}

/// Runs this node's ranks to their end and returns the node's exit code.
pub async fn run_node(ctx: &Context) -> i32 {
    let gpus = ctx.run.spec.train.resources.gpus_per_node;
    let world = ctx.world_size * gpus;
    let exe = match std::env::current_exe() {
        Ok(exe) => exe,
        Err(e) => {
            eprintln!("cannot find this executable to start one rank per GPU: {e}");
            return exit::FAILED;
        }
    };
    let mut children = Vec::new();
    for local in 0..gpus {
        let rank = ctx.rank * gpus + local;
        let spawned = Command::new(&exe)
            .args(std::env::args_os().skip(1))
            .env(ENV_LOCAL_RANK, local.to_string())
            .env(ENV_RANK, rank.to_string())
            .env(ENV_WORLD_SIZE, world.to_string())
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .spawn();
        match spawned {
            Ok(child) => children.push(child),
            Err(e) => {
                eprintln!("starting rank {rank} (GPU {local}): {e}");
                return exit::FAILED;
            }
        }
    }
    println!(
        "{}: node {} runs ranks {}..{} of {world}, one per GPU",
        ctx.stage,
        ctx.rank,
        ctx.rank * gpus,
        (ctx.rank + 1) * gpus
    );
    let pids: Vec<i32> = children.iter().filter_map(|c| c.id()).map(|p| p as i32).collect();
    // SIGTERM to the pod reaches this process only: pass it on so every rank checkpoints.
    let forward = tokio::spawn(async move {
        if let Ok(mut term) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            term.recv().await;
            for pid in pids {
                let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGTERM);
            }
        }
    });
    let mut codes = Vec::new();
    for mut child in children {
        let code = match child.wait().await {
            Ok(status) => status.code().unwrap_or(exit::FAILED),
            Err(e) => {
                eprintln!("waiting for a rank: {e}");
                exit::FAILED
            }
        };
        codes.push(code);
    }
    forward.abort();
    node_exit(&codes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_node_reports_the_most_telling_exit() {
        assert_eq!(node_exit(&[0, 0]), exit::DONE);
        assert_eq!(node_exit(&[exit::RESUME, 0]), exit::RESUME);
        assert_eq!(node_exit(&[exit::PEER_LOST, exit::RESUME]), exit::PEER_LOST);
        assert_eq!(node_exit(&[exit::PEER_LOST, 137, 0]), 137);
        assert_eq!(node_exit(&[1, exit::INVALID]), exit::INVALID);
    }
}
