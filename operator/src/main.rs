//! `pretrain`: validate manifests, print the CRD, run a manifest on this machine, print the objects
//! the operator would create for it, and run the operator.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use pretrain_crd::Stage;
use pretrain_operator::k8s;
use pretrain_operator::k8s::controller::{self, Context, RunDefaults};
use pretrain_operator::k8s::leader::Elector;
use pretrain_operator::k8s::metrics::{self, Metrics};
use pretrain_operator::k8s::render::{self, RunObjects};
use pretrain_operator::local::{self, RunOptions};
use pretrain_operator::schedule::Policy;

#[derive(Debug, Parser)]
#[command(name = "pretrain", version, about = "Train Llama-style models from raw text, on one machine or a cluster")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Check a manifest; prints `ok`, or every error with its field path (exit code 2).
    Validate {
        /// The PretrainRun manifest.
        file: PathBuf,
    },
    /// Print the PretrainRun CustomResourceDefinition as YAML.
    Crd {
        /// Print the PretrainRun field reference (Markdown) instead.
        #[arg(long)]
        reference: bool,
    },
    /// Print every object the operator creates for a manifest (first attempt of each stage), as YAML.
    Render {
        /// The PretrainRun manifest.
        file: PathBuf,
        /// Namespace to render into (default: the manifest's, else `default`).
        #[arg(long, short = 'n')]
        namespace: Option<String>,
    },
    /// Run the operator: reconcile PretrainRuns in every namespace into Jobs (in-cluster or kubeconfig).
    Operator {
        /// Address of `/metrics` and `/healthz`.
        #[arg(long, default_value = "0.0.0.0:8080")]
        listen: String,
        /// Address of the live dashboard (read-only; every replica serves it).
        #[arg(long, default_value = "0.0.0.0:8090")]
        ui: String,
        /// Lease used for leader election, as NAMESPACE/NAME.
        #[arg(long, default_value = "pretrain-system/pretrain-operator", env = "PRETRAIN_LEASE")]
        lease: String,
        /// Reconcile without leader election (a single replica).
        #[arg(long)]
        no_leader_election: bool,
        /// Leave admission of GPU stages to the Kubernetes scheduler (no queues, quota, gangs or
        /// preemption); runs with `spec.scheduling.kueue` are admitted by Kueue either way.
        #[arg(long)]
        no_scheduler: bool,
        /// Seconds between two passes of the cluster scheduler.
        #[arg(long, default_value_t = 5)]
        schedule_every: u64,
        /// Seconds a training gang runs before a higher-priority one may preempt it.
        #[arg(long, default_value_t = Policy::default().min_runtime)]
        preempt_after: i64,
        /// Worker image for runs that keep the built-in default `spec.image`.
        #[arg(long, env = "PRETRAIN_WORKER_IMAGE")]
        worker_image: Option<String>,
        /// Secret with store credentials for runs without `spec.storage.secretRef`.
        #[arg(long, env = "PRETRAIN_STORAGE_SECRET")]
        storage_secret: Option<String>,
        /// Quarantine (taint) a node after this many attempts failed on it within the window
        /// (device errors, lost with the node); 0 never.
        #[arg(long, default_value_t = 3)]
        quarantine_after: usize,
        /// The quarantine window, in seconds.
        #[arg(long, default_value_t = 86_400)]
        quarantine_window: i64,
        /// Cordon quarantined nodes too, so that nothing else is scheduled there.
        #[arg(long)]
        cordon_bad_nodes: bool,
    },
    /// Run a manifest's stages on this machine, skipping stages already committed.
    Run {
        /// The PretrainRun manifest.
        file: PathBuf,
        /// Store URL to use instead of spec.storage.url (e.g. file://./runs).
        #[arg(long)]
        store: Option<String>,
        /// First stage to run.
        #[arg(long)]
        from: Option<Stage>,
        /// Last stage to run.
        #[arg(long)]
        until: Option<Stage>,
        /// The pretrain-worker binary (default: next to this executable, else on PATH).
        #[arg(long, env = "PRETRAIN_WORKER")]
        worker: Option<PathBuf>,
        /// Processes for the map tasks of sharded stages (data-prep, tokenize).
        #[arg(long, default_value_t = 1)]
        workers: usize,
        /// Serve the live dashboard at this address (e.g. 127.0.0.1:8090) while the run runs, and
        /// after it ends until Ctrl-C.
        #[arg(long, value_name = "ADDR")]
        ui: Option<String>,
    },
    /// Write a run's report (Markdown and SVG plots) under <store>/<run>/report/.
    Report {
        /// The run (metadata.name).
        run: Option<String>,
        /// The store; defaults to the manifest's, else file://runs.
        #[arg(long, env = "PRETRAIN_STORE")]
        store: Option<String>,
        /// A manifest naming the run and its store.
        #[arg(long, short = 'f')]
        file: Option<PathBuf>,
    },
    /// Where the runs of a store stand: each stage's phase, attempts, times and newest checkpoint.
    Status {
        /// The run (metadata.name); all runs with state when left out.
        run: Option<String>,
        /// The store; defaults to the manifest's, else file://runs.
        #[arg(long, env = "PRETRAIN_STORE")]
        store: Option<String>,
        /// A manifest naming the run and its store.
        #[arg(long, short = 'f')]
        file: Option<PathBuf>,
    },
    /// Write a checkpoint as a Hugging Face Llama directory (config.json, model.safetensors,
    /// tokenizer.json, tokenizer_config.json, generation_config.json).
    Export {
        /// The run (metadata.name); defaults to the manifest's.
        run: Option<String>,
        /// Output directory.
        #[arg(long, short = 'o')]
        out: PathBuf,
        /// `latest` (long-context's newest, else train's), `train`, `long-context`, or `train/STEP`.
        #[arg(long, default_value = "latest")]
        checkpoint: String,
        /// Output format; `hf` (Hugging Face transformers) is the one there is.
        #[arg(long, default_value = "hf", value_parser = ["hf"])]
        format: String,
        /// The store; defaults to the manifest's, else file://runs.
        #[arg(long, env = "PRETRAIN_STORE")]
        store: Option<String>,
        /// A manifest naming the run and its store.
        #[arg(long, short = 'f')]
        file: Option<PathBuf>,
    },
}

/// How a command failed: its input is unusable (a usage or manifest error, exit code 2, the message
/// as it is), or it failed (exit code 1, `error: ` and the message).
enum Failed {
    Usage(String),
    Error(String),
}

impl<E: std::fmt::Display> From<E> for Failed {
    fn from(e: E) -> Self {
        Failed::Error(e.to_string())
    }
}

fn main() -> ExitCode {
    // kube's TLS and object_store's each enable one of rustls' crypto providers, and with both in
    // the process rustls cannot choose by itself: the first API call would panic.
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    exit(dispatch(Cli::parse().command))
}

/// Runs one command.
fn dispatch(command: Command) -> Result<(), Failed> {
    match command {
        Command::Validate { file } => load(&file).map(|_| println!("ok")),
        Command::Crd { reference } => {
            print!("{}", if reference { pretrain_crd::reference_markdown() } else { pretrain_crd::crd_yaml() });
            Ok(())
        }
        Command::Render { file, namespace } => render(&file, namespace),
        Command::Operator {
            listen,
            ui,
            lease,
            no_leader_election,
            no_scheduler,
            schedule_every,
            preempt_after,
            worker_image,
            storage_secret,
            quarantine_after,
            quarantine_window,
            cordon_bad_nodes,
        } => {
            let scheduler = (!no_scheduler).then(|| {
                let policy = Policy { min_runtime: preempt_after.max(0), ..Policy::default() };
                (std::time::Duration::from_secs(schedule_every.max(1)), policy)
            });
            let defaults = RunDefaults { worker_image, storage_secret };
            let quarantine = pretrain_operator::k8s::quarantine::Policy {
                failures: quarantine_after,
                window_seconds: quarantine_window.max(1),
                cordon: cordon_bad_nodes,
            };
            let addresses = Addresses { listen, ui, lease };
            Ok(block_on(operator(&addresses, no_leader_election, scheduler, defaults, quarantine))?)
        }
        Command::Export { run, out, checkpoint, format: _, store, file } => {
            export(target(store, run, file.as_deref())?, &checkpoint, &out)
        }
        Command::Status { run, store, file } => {
            let (store, run) = target(store, run, file.as_deref())?;
            print!("{}", block_on(local::status(&store, run.as_deref()))?);
            Ok(())
        }
        Command::Report { run, store, file } => report(target(store, run, file.as_deref())?),
        Command::Run { file, store, from, until, worker, workers, ui } => {
            if workers == 0 {
                return Err(Failed::Usage("--workers must be at least 1".into()));
            }
            let worker = worker.unwrap_or_else(local::default_worker);
            let opts = RunOptions { manifest: file, store, from, until, worker, workers, ui };
            match block_on(local::run(&opts)) {
                Ok(_) => Ok(()),
                Err(local::RunError::Manifest(e)) => Err(Failed::Usage(e.to_string())),
                Err(e) => Err(e.into()),
            }
        }
    }
}

fn exit(done: Result<(), Failed>) -> ExitCode {
    match done {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failed::Usage(message)) => {
            eprintln!("{message}");
            ExitCode::from(2)
        }
        Err(Failed::Error(message)) => {
            eprintln!("error: {message}");
            ExitCode::FAILURE
        }
    }
}

/// Runs `work` to completion on a multi-threaded runtime.
fn block_on<F: std::future::Future>(work: F) -> F::Output {
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("tokio runtime starts");
    runtime.block_on(work)
}

/// A manifest, validated.
fn load(file: &std::path::Path) -> Result<pretrain_crd::PretrainRun, Failed> {
    pretrain_crd::load(file).map_err(|e| Failed::Usage(e.to_string()))
}

/// `pretrain render`: the objects the operator creates for the manifest, as YAML.
fn render(file: &std::path::Path, namespace: Option<String>) -> Result<(), Failed> {
    let mut run = load(file)?;
    if namespace.is_some() {
        run.metadata.namespace = namespace;
    }
    let objects = RunObjects::new(&run)?.all()?;
    print!("{}", render::to_yaml_stream(&objects)?);
    Ok(())
}

/// `pretrain export`: a checkpoint as a Hugging Face model directory.
fn export((store, run): (String, Option<String>), checkpoint: &str, out: &std::path::Path) -> Result<(), Failed> {
    let run = run.ok_or_else(|| Failed::Usage("name the run, or give its manifest with -f".into()))?;
    let exported = block_on(async {
        let store = pretrain_store::Store::open(&store)?;
        pretrain_operator::export::export(&store, &run, checkpoint, out).await
    })?;
    println!("exported {} (step {}) to {}", exported.checkpoint, exported.step, out.display());
    Ok(())
}

/// `pretrain report`: writes the run's report and prints where.
fn report((store, run): (String, Option<String>)) -> Result<(), Failed> {
    let run = run.ok_or_else(|| Failed::Usage("name the run: pretrain report RUN, or -f MANIFEST".into()))?;
    let keys = block_on(async {
        let s = pretrain_store::Store::open(&store)?;
        // The local runner's records give goodput; for a run the operator ran, the report reads it
        // from the store.
        let goodput = match local::state::StateDb::open(&store) {
            Ok(db) => local::goodput(&db, &s, &run).await.unwrap_or_else(|e| {
                eprintln!("report: goodput not known: {e}");
                None
            }),
            Err(_) => None,
        };
        local::report::write(&s, &run, goodput.as_ref()).await
    })?;
    println!("{}", local::report_location(&store, &keys[0]));
    Ok(())
}

/// The store and run a command is about: `--store`/`RUN`, else the manifest's, else `file://runs`.
fn target(
    store: Option<String>,
    run: Option<String>,
    file: Option<&std::path::Path>,
) -> Result<(String, Option<String>), Failed> {
    let manifest = file.map(load).transpose()?;
    let store =
        store.or_else(|| manifest.as_ref().map(|m| m.spec.storage.url.clone())).unwrap_or_else(|| "file://runs".into());
    let run = run.or_else(|| manifest.as_ref().and_then(|m| m.metadata.name.clone()));
    Ok((store, run))
}

/// Where the operator listens, and its leader lease.
struct Addresses {
    listen: String,
    ui: String,
    lease: String,
}

/// The operator process: metrics and health endpoint, the dashboard, leader election, then the
/// controller and (every `scheduler` interval) the cluster scheduler.
async fn operator(
    addresses: &Addresses,
    no_leader_election: bool,
    scheduler: Option<(std::time::Duration, Policy)>,
    defaults: RunDefaults,
    quarantine: pretrain_operator::k8s::quarantine::Policy,
) -> anyhow::Result<()> {
    let Addresses { listen, ui, lease } = addresses;
    controller::init_logging();
    let client = kube::Client::try_default().await?;
    let metrics = std::sync::Arc::new(Metrics::default());
    let listener = tokio::net::TcpListener::bind(listen).await?;
    tokio::spawn(metrics::serve(listener, std::sync::Arc::clone(&metrics)));
    // Health: an API call every 10 s, whatever this replica leads (see metrics' module docs).
    tokio::spawn({
        let (client, metrics) = (client.clone(), std::sync::Arc::clone(&metrics));
        async move {
            loop {
                if client.apiserver_version().await.is_ok() {
                    metrics.api_ok();
                }
                tokio::time::sleep(std::time::Duration::from_secs(10)).await;
            }
        }
    });
    let mut ctx = Context::new(client.clone(), metrics);
    ctx.scheduler = scheduler.is_some();
    ctx.defaults = defaults;
    ctx.quarantine = quarantine;
    let ctx = std::sync::Arc::new(ctx);
    let dashboard = tokio::net::TcpListener::bind(ui).await?;
    let runs = std::sync::Arc::new(k8s::dashboard::ClusterRuns::new(std::sync::Arc::clone(&ctx)));
    tokio::spawn(async move {
        if let Err(e) = pretrain_operator::dashboard::serve(dashboard, runs).await {
            tracing::error!("dashboard: {e}");
        }
    });
    let work = {
        let client = client.clone();
        async move {
            let scheduling = async {
                match scheduler {
                    Some((every, policy)) => k8s::scheduler::run(client, policy, every).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                () = controller::run(ctx) => {}
                () = scheduling => {}
            }
        }
    };
    if no_leader_election {
        work.await;
        return Ok(());
    }
    let (namespace, name) =
        lease.split_once('/').ok_or_else(|| anyhow::anyhow!("--lease {lease}: expected NAMESPACE/NAME"))?;
    let identity = std::env::var("POD_NAME").unwrap_or_else(|_| format!("pretrain-operator-{}", std::process::id()));
    let elector = Elector::new(kube::Api::namespaced(client, namespace), name, &identity, 15);
    let lost = elector.lead().await;
    tokio::select! {
        () = work => Ok(()),
        () = lost => anyhow::bail!("lost the leader lease {lease}; exiting so that a leader takes over"),
    }
}
