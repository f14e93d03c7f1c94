//! `pretrain-worker <stage> --spec FILE|URL`: one process of one stage, following the stage contract
//! (exit codes in `pretrain_crd::contract::exit`, a one-line reason on stderr when it fails).

use clap::Parser;

// Training allocates and frees large tensors every step; mimalloc reuses them instead of returning
// them to the kernel and faulting fresh zeroed pages in (glibc's behaviour above its mmap threshold).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;
use pretrain_crd::Stage;
use pretrain_crd::contract::exit;
use pretrain_store::StageCommit;
use pretrain_worker::dist::launch;
use pretrain_worker::frame::{Outcome, Phase, StageError};
use pretrain_worker::{Context, data, eval, tokenize, train};

#[derive(Debug, Parser)]
#[command(name = "pretrain-worker", version, about = "Runs one stage of a PretrainRun")]
struct Cli {
    /// Stage to run: data-prep, tokenize, train, long-context or eval.
    stage: Stage,
    /// The PretrainRun manifest: a file path or an object-store URL.
    #[arg(long)]
    spec: String,
    /// For sharded stages: `map` runs the map task of JOB_COMPLETION_INDEX; for data-prep, `dedup`,
    /// `route` and `write` run that task of their phase and `cluster` the one cluster task; `reduce`
    /// runs the step that commits, `all` every task in this process.
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
    Dedup,
    Cluster,
    Embed,
    Order,
    Route,
    Write,
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
        Err(e) => return failed(&e.into()),
    };
    match ctx.dir.committed(&ctx.config_hash()).await {
        Ok(Some(_)) if cli.checkpoint.is_none() => {
            println!("{}: outputs already committed for this spec; nothing to do", ctx.stage);
            return exit::DONE;
        }
        Ok(_) => {}
        Err(e) => return failed(&e.into()),
    }
    if matches!(ctx.stage, Stage::Train | Stage::LongContext) && launch::needs_ranks(&ctx) {
        return launch::run_node(&ctx).await;
    }
    match dispatch(&ctx, &cli).await {
        Ok(outcome) => {
            let line = outcome.describe(ctx.stage, ctx.rank);
            if matches!(outcome, Outcome::Preempted { .. }) {
                eprintln!("{line}")
            } else {
                println!("{line}")
            }
            outcome.exit_code()
        }
        Err(e) => failed(&e),
    }
}

/// Runs this process's part of the stage.
async fn dispatch(ctx: &Context, cli: &Cli) -> Result<Outcome, StageError> {
    let phase = match cli.phase {
        PhaseArg::All => Phase::All,
        PhaseArg::Map => Phase::Map(ctx.shard_index),
        PhaseArg::Dedup => Phase::Dedup(ctx.shard_index),
        PhaseArg::Cluster => Phase::Cluster,
        PhaseArg::Embed => Phase::Embed(ctx.shard_index),
        PhaseArg::Order => Phase::Order(ctx.shard_index),
        PhaseArg::Route => Phase::Route(ctx.shard_index),
        PhaseArg::Write => Phase::Write(ctx.shard_index),
        PhaseArg::Reduce => Phase::Reduce,
    };
    let task = Outcome::TaskDone { phase: phase.name(), task: ctx.shard_index };
    let committed = |commit: Option<StageCommit>, otherwise: Outcome| match commit {
        Some(commit) => Outcome::Committed(Box::new(commit)),
        None => otherwise,
    };
    Ok(match ctx.stage {
        Stage::DataPrep => committed(data::stage::run(ctx, phase).await?, task),
        Stage::Tokenize => committed(tokenize::stage::run(ctx, phase).await?, task),
        Stage::Train | Stage::LongContext => train::stage::run(ctx, train::stage::stop_flag()).await?,
        Stage::Eval => committed(eval::stage::run(ctx, cli.checkpoint.as_deref()).await?, Outcome::Measured),
    })
}

/// Prints why the stage failed (the last stderr line, which the runner and the operator report) and
/// returns the exit code that says what to do next.
fn failed(e: &StageError) -> i32 {
    eprintln!("{e}");
    e.exit_code()
}
