//! `pretrain-worker <stage> --spec FILE|URL`: one process of one stage, following the stage contract
//! (exit codes in `pretrain_crd::contract::exit`, a one-line reason on stderr when it fails).

use clap::Parser;

// Training allocates and frees large tensors every step; mimalloc reuses them instead of returning
// them to the kernel and faulting fresh zeroed pages in (glibc's behaviour above its mmap threshold).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;
use pretrain_crd::Stage;
use pretrain_crd::contract::exit;
use pretrain_worker::data::stage::{DataPrepError, Phase};
use pretrain_worker::{Context, ContextError};

#[derive(Debug, Parser)]
#[command(name = "pretrain-worker", version, about = "Runs one stage of a PretrainRun")]
struct Cli {
    /// Stage to run: data-prep, tokenize, train, long-context or eval.
    stage: Stage,
    /// The PretrainRun manifest: a file path or an object-store URL.
    #[arg(long)]
    spec: String,
    /// For sharded stages: `map` runs the shard of JOB_COMPLETION_INDEX, `reduce` the cross-shard
    /// step, `all` both in this process.
    #[arg(long, value_enum, default_value_t = PhaseArg::All)]
    phase: PhaseArg,
    /// For eval: measure one checkpoint (`train`, `train/40`, `long-context/step-000000012`) and write
    /// its report under eval/checkpoints/ instead of evaluating the run's final checkpoints.
    #[arg(long)]
    checkpoint: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum PhaseArg {
    All,
    Map,
    Reduce,
}

fn main() {
    let cli = Cli::parse();
    pretrain_worker::allocator::keep_freed_memory();
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("tokio runtime starts");
    let code = runtime.block_on(run(cli));
    std::process::exit(code);
}

async fn run(cli: Cli) -> i32 {
    let ctx = match Context::from_env(cli.stage, &cli.spec).await {
        Ok(ctx) => ctx,
        Err(e @ (ContextError::Manifest(_) | ContextError::Env { .. })) => {
            eprintln!("{e}");
            return exit::INVALID;
        }
        Err(e) => {
            eprintln!("{e}");
            return exit::FAILED;
        }
    };
    match ctx.dir.committed(&ctx.config_hash()).await {
        Ok(Some(_)) if cli.checkpoint.is_none() => {
            println!("{}: outputs already committed for this spec; nothing to do", ctx.stage);
            return exit::DONE;
        }
        Ok(_) => {}
        Err(e) => {
            eprintln!("{e}");
            return exit::FAILED;
        }
    }
    match ctx.stage {
        Stage::DataPrep => {
            let phase = match cli.phase {
                PhaseArg::All => Phase::All,
                PhaseArg::Map => Phase::Map(ctx.shard_index),
                PhaseArg::Reduce => Phase::Reduce,
            };
            match pretrain_worker::data::stage::run(&ctx, phase).await {
                Ok(Some(commit)) => {
                    println!("data-prep: committed {} files", commit.files.len());
                    exit::DONE
                }
                Ok(None) => {
                    println!("data-prep: map shard {} done", ctx.shard_index);
                    exit::DONE
                }
                Err(e @ DataPrepError::Unsupported(_)) => {
                    eprintln!("{e}");
                    exit::INVALID
                }
                Err(e) => {
                    eprintln!("{e}");
                    exit::FAILED
                }
            }
        }
        Stage::Tokenize => {
            use pretrain_worker::tokenize::stage::{self, Phase};
            let phase = match cli.phase {
                PhaseArg::All => Phase::All,
                PhaseArg::Map => Phase::Map(ctx.shard_index),
                PhaseArg::Reduce => Phase::Reduce,
            };
            match stage::run(&ctx, phase).await {
                Ok(Some(commit)) => {
                    println!("tokenize: committed {} files", commit.files.len());
                    exit::DONE
                }
                Ok(None) => {
                    println!("tokenize: map task {} done", ctx.shard_index);
                    exit::DONE
                }
                Err(e) => {
                    eprintln!("{e}");
                    if e.is_invalid() { exit::INVALID } else { exit::FAILED }
                }
            }
        }
        Stage::Train | Stage::LongContext if pretrain_worker::dist::launch::needs_ranks(&ctx) => {
            pretrain_worker::dist::launch::run_node(&ctx).await
        }
        Stage::Train | Stage::LongContext => {
            use pretrain_worker::train::stage::{self, Outcome, TrainError};
            match stage::run(&ctx, stage::stop_flag()).await {
                Ok(Outcome::Done(commit)) => {
                    println!("{}: committed {} files", ctx.stage, commit.files.len());
                    exit::DONE
                }
                Ok(Outcome::Preempted { step }) => {
                    eprintln!("{}: stopped on SIGTERM after checkpointing step {step}; resume to continue", ctx.stage);
                    exit::RESUME
                }
                Ok(Outcome::Joined { step }) => {
                    println!("{}: rank {} trained {step} steps; rank 0 committed", ctx.stage, ctx.rank);
                    exit::DONE
                }
                Err(e @ TrainError::Invalid(_)) => {
                    eprintln!("{e}");
                    exit::INVALID
                }
                Err(e @ TrainError::Dist(pretrain_worker::dist::DistError::Peer { .. })) => {
                    eprintln!("{e}");
                    exit::PEER_LOST
                }
                Err(e) => {
                    eprintln!("{e}");
                    exit::FAILED
                }
            }
        }
        Stage::Eval => {
            use pretrain_worker::eval::{EvalError, stage};
            match stage::run(&ctx, cli.checkpoint.as_deref()).await {
                Ok(Some(commit)) => {
                    println!("eval: committed {} files", commit.files.len());
                    exit::DONE
                }
                Ok(None) => exit::DONE,
                Err(e @ (EvalError::Invalid(_) | EvalError::Task { .. })) => {
                    eprintln!("{e}");
                    exit::INVALID
                }
                Err(e) => {
                    eprintln!("{e}");
                    exit::FAILED
                }
            }
        }
    }
}
