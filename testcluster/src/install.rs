//! The project's images and chart on the test cluster: the operator and worker images' roots from
//! built binaries, loaded into the test kubelet under the references the chart and the runs use,
//! and the operator installed from the Helm chart with the built `helm`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::Context as _;

use crate::ControlPlane;
use crate::control_plane::binary;

/// The operator image the chart names by default.
pub fn operator_image() -> String {
    format!("ghcr.io/pretrain-dev/pretrain:{}", env!("CARGO_PKG_VERSION"))
}

/// The worker image runs name by default.
pub fn worker_image() -> String {
    format!("ghcr.io/pretrain-dev/pretrain-worker:{}", env!("CARGO_PKG_VERSION"))
}

/// The roots of the operator image (`pretrain`) and the CPU worker image (`pretrain-worker`), built
/// under `dir` from the binaries in `bins`, by image reference.
pub fn images(bins: &Path, dir: &Path) -> anyhow::Result<BTreeMap<String, PathBuf>> {
    let operator = dir.join("operator");
    let worker = dir.join("worker");
    crate::image::build_root(&operator, &[bins.join("pretrain")])?;
    crate::image::build_root(&worker, &[bins.join("pretrain-worker")])?;
    Ok(BTreeMap::from([(operator_image(), operator), (worker_image(), worker)]))
}

/// `helm install pretrain CHART -n pretrain-system --create-namespace --wait` with `extra` arguments.
pub fn helm_install(plane: &ControlPlane, chart: &Path, extra: &[&str]) -> anyhow::Result<()> {
    let out = std::process::Command::new(binary("helm")?)
        .args(["install", "pretrain"])
        .arg(chart)
        .args(["--namespace", "pretrain-system", "--create-namespace", "--wait", "--timeout", "5m"])
        .args(extra)
        .arg(format!("--kubeconfig={}", plane.admin_kubeconfig.display()))
        .env("HELM_CACHE_HOME", plane.dir().join("helm/cache"))
        .env("HELM_CONFIG_HOME", plane.dir().join("helm/config"))
        .env("HELM_DATA_HOME", plane.dir().join("helm/data"))
        .output()
        .context("running helm")?;
    anyhow::ensure!(
        out.status.success(),
        "helm install: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}
