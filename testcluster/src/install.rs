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

/// The project's two CPU images (the operator's `pretrain`, the worker's `pretrain-worker`) built
/// from the binaries in `bins` as OCI archives under `dir` (what `scripts/build-images.sh` writes),
/// then unpacked from those archives into the roots the test kubelet runs pods in, by reference.
pub fn images(bins: &Path, dir: &Path) -> anyhow::Result<BTreeMap<String, PathBuf>> {
    let mut roots = BTreeMap::new();
    for spec in image_specs(bins) {
        let name = spec.binaries[0].file_name().context("a binary's name")?.to_string_lossy().into_owned();
        std::fs::create_dir_all(dir.join("build").join(&name))?;
        let archive = dir.join(format!("{name}.oci.tar"));
        crate::oci::build(&spec, &dir.join("build").join(&name), &archive)?;
        let root = dir.join("roots").join(&name);
        crate::oci::unpack(&archive, &spec.reference, &root)?;
        roots.insert(spec.reference, root);
    }
    Ok(roots)
}

/// The CPU images, from the binaries in `bins`.
pub fn image_specs(bins: &Path) -> Vec<crate::oci::ImageSpec> {
    let spec = |reference: String, binary: &str| crate::oci::ImageSpec {
        reference,
        binaries: vec![bins.join(binary)],
        entrypoint: vec![binary.to_string()],
    };
    vec![spec(operator_image(), "pretrain"), spec(worker_image(), "pretrain-worker")]
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
