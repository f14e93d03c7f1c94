//! `pretrain-testcluster up`: the test cluster by hand, for debugging the operator. Starts the
//! control plane and the test kubelet with a CPU node and fake GPU nodes under `--dir`, writes the
//! admin kubeconfig path to `--dir/kubeconfig-path` and runs until SIGTERM or Ctrl-C, then stops
//! everything. `scripts/control-plane.sh up` and `down` wrap it.
//!
//! `pretrain-testcluster images`: the project's CPU images as OCI archives, without a container
//! engine (`scripts/build-images.sh` wraps it).

use std::collections::BTreeMap;
use std::path::PathBuf;

use clap::{Parser, Subcommand};
use pretrain_testcluster::{ControlPlane, Kubelet, KubeletConfig, NodeConfig, Options};

#[derive(Debug, Parser)]
#[command(name = "pretrain-testcluster", about = "A real Kubernetes control plane with a test kubelet")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Start the cluster and keep it up until SIGTERM or Ctrl-C.
    Up {
        /// Where the cluster keeps its state, certificates and logs.
        #[arg(long)]
        dir: PathBuf,
        /// Fake GPU nodes to register.
        #[arg(long, default_value_t = 2)]
        nodes: usize,
        /// GPUs per node.
        #[arg(long, default_value_t = 8)]
        gpus_per_node: u32,
        /// Build the operator and worker images from the `pretrain` and `pretrain-worker` binaries
        /// in this directory and install the operator from the Helm chart in `--chart`.
        #[arg(long)]
        with_operator: Option<PathBuf>,
        /// The operator's Helm chart.
        #[arg(long, default_value = "charts/pretrain-operator")]
        chart: PathBuf,
    },
    /// Build the operator and CPU worker images as OCI archives (`<binary>.oci.tar`).
    Images {
        /// The directory of the `pretrain` and `pretrain-worker` binaries.
        #[arg(long)]
        bins: PathBuf,
        /// Where the archives go.
        #[arg(long)]
        out: PathBuf,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let (dir, nodes, gpus_per_node, with_operator, chart) = match Cli::parse().command {
        Command::Up { dir, nodes, gpus_per_node, with_operator, chart } => {
            (dir, nodes, gpus_per_node, with_operator, chart)
        }
        Command::Images { bins, out } => {
            std::fs::create_dir_all(&out)?;
            for spec in pretrain_testcluster::install::image_specs(&bins) {
                let name = spec.binaries[0].file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
                let work = tempfile::tempdir()?;
                let built = pretrain_testcluster::oci::build(&spec, work.path(), &out.join(format!("{name}.oci.tar")))?;
                println!("{} {} {}", spec.reference, built.digest, built.path.display());
            }
            return Ok(());
        }
    };
    std::fs::create_dir_all(&dir)?;
    let images = match &with_operator {
        Some(bins) => pretrain_testcluster::install::images(bins, &dir.join("images"))?,
        None => BTreeMap::new(),
    };
    let plane = ControlPlane::start(&dir.join("control-plane"), &Options::default()).await?;
    let config = KubeletConfig {
        // A CPU node for the operator and the CPU stages (GPU nodes are tainted), and the GPU nodes.
        nodes: std::iter::once(NodeConfig::cpu("cpu-node-0", "8", "32Gi"))
            .chain(
                (0..nodes).map(|i| NodeConfig::gpu(&format!("gpu-node-{i}"), gpus_per_node, "NVIDIA-H100-80GB-HBM3")),
            )
            .collect(),
        images,
        dir: dir.join("kubelet"),
        // The pods of the fake GPU nodes train on the CPU (the worker's one test-only override).
        gpu_node_env: vec![("PRETRAIN_TEST_CPU_FOR_GPUS".into(), "1".into())],
    };
    let kubelet = Kubelet::start(&plane, config).await?;
    if with_operator.is_some() {
        pretrain_testcluster::install::helm_install(&plane, &chart, &[])?;
    }
    std::fs::write(dir.join("kubeconfig-path"), plane.admin_kubeconfig.display().to_string())?;
    println!("{}", plane.admin_kubeconfig.display());
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    drop(kubelet);
    drop(plane);
    Ok(())
}
