//! Kueue on the test cluster, run the way a cluster runs it: its CRDs (copied next to the binary by
//! `scripts/control-plane.sh build`, from the pinned `sigs.k8s.io/kueue` module) applied with
//! server-side apply, and its manager as a Deployment in `kueue-system` whose pod the test kubelet
//! runs from an image of the built `kueue` binary, with its configuration in a ConfigMap and a
//! self-signed certificate in a Secret.
//!
//! What differs from Kueue's own install: no admission webhooks are registered (the cluster has no
//! kube-proxy to reach them, and the operator creates its Jobs suspended with the queue label, which
//! is what Kueue's Job webhook would ensure), so internal certificate management and the
//! on-demand visibility server are off; its ServiceAccount is bound to `cluster-admin` instead of
//! Kueue's own roles.

use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};

use crate::control_plane::binary;

/// The image reference of the manager (Kueue's own registry and tag).
pub const IMAGE: &str = "registry.k8s.io/kueue/kueue:v0.17.0";

/// The directory of Kueue's CRDs next to the built binaries.
pub fn crds() -> anyhow::Result<PathBuf> {
    let dir = binary("kueue")?.parent().context("the binaries' directory")?.join("kueue-crds");
    if !dir.is_dir() {
        bail!("{} is missing: run scripts/control-plane.sh build", dir.display());
    }
    Ok(dir)
}

/// The manager's image as an OCI archive under `dir`, unpacked into a root for the kubelet.
pub fn image(dir: &Path) -> anyhow::Result<(String, PathBuf)> {
    let spec = crate::oci::ImageSpec {
        reference: IMAGE.into(),
        binaries: vec![binary("kueue")?],
        entrypoint: vec!["kueue".into()],
    };
    std::fs::create_dir_all(dir.join("build"))?;
    let archive = dir.join("kueue.oci.tar");
    crate::oci::build(&spec, &dir.join("build"), &archive)?;
    let root = dir.join("root");
    crate::oci::unpack(&archive, IMAGE, &root)?;
    Ok((IMAGE.into(), root))
}

/// Installs the CRDs and the manager with the admin `kubeconfig`, and waits until it is ready. The
/// kubelet must have been started with [`image`] among its images.
pub fn install(kubeconfig: &Path) -> anyhow::Result<()> {
    let crds = crds()?;
    kubectl(kubeconfig, &["apply", "--server-side", "-f", &crds.display().to_string()], None)?;
    kubectl(kubeconfig, &["wait", "--for=condition=Established", "crd", "--all", "--timeout=120s"], None)?;
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_string()])?;
    let manifests = format!(
        r#"apiVersion: v1
kind: Namespace
metadata: {{name: kueue-system}}
---
apiVersion: v1
kind: ServiceAccount
metadata: {{name: kueue, namespace: kueue-system}}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata: {{name: kueue-test-admin}}
roleRef: {{apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: cluster-admin}}
subjects: [{{kind: ServiceAccount, name: kueue, namespace: kueue-system}}]
---
apiVersion: v1
kind: Secret
metadata: {{name: kueue-certs, namespace: kueue-system}}
stringData:
  tls.crt: {crt}
  tls.key: {key}
---
apiVersion: v1
kind: ConfigMap
metadata: {{name: kueue-config, namespace: kueue-system}}
data:
  config.yaml: |
    apiVersion: config.kueue.x-k8s.io/v1beta2
    kind: Configuration
    namespace: kueue-system
    leaderElection: {{leaderElect: false}}
    health: {{healthProbeBindAddress: ":8081"}}
    metrics: {{bindAddress: ":8443"}}
    webhook: {{port: 9443, certDir: /certs}}
    internalCertManagement: {{enable: false}}
    featureGates: {{VisibilityOnDemand: false}}
    integrations: {{frameworks: [batch/job]}}
---
apiVersion: apps/v1
kind: Deployment
metadata: {{name: kueue, namespace: kueue-system}}
spec:
  replicas: 1
  selector: {{matchLabels: {{app: kueue}}}}
  template:
    metadata: {{labels: {{app: kueue}}}}
    spec:
      serviceAccountName: kueue
      securityContext: {{runAsNonRoot: true, runAsUser: 65532, runAsGroup: 65532, fsGroup: 65532}}
      containers:
        - name: manager
          image: {IMAGE}
          command: [kueue]
          args: [--config=/config/config.yaml]
          resources: {{requests: {{cpu: 100m, memory: 128Mi}}}}
          ports: [{{name: health, containerPort: 8081}}]
          readinessProbe: {{httpGet: {{path: /readyz, port: health}}, periodSeconds: 2}}
          volumeMounts:
            - {{name: config, mountPath: /config}}
            - {{name: certs, mountPath: /certs}}
            # Read whenever internal certificate management is off; no setting moves it.
            - {{name: certs, mountPath: /etc/kueue/metrics/certs}}
      volumes:
        - {{name: config, configMap: {{name: kueue-config}}}}
        - {{name: certs, secret: {{secretName: kueue-certs}}}}
"#,
        crt = serde_json::to_string(&cert.cert.pem())?,
        key = serde_json::to_string(&cert.signing_key.serialize_pem())?,
    );
    kubectl(kubeconfig, &["apply", "-f", "-"], Some(&manifests))?;
    kubectl(kubeconfig, &["-n", "kueue-system", "rollout", "status", "deployment/kueue", "--timeout=180s"], None)?;
    Ok(())
}

/// `kubectl ARGS` as the cluster's admin, which must succeed; its stdout.
fn kubectl(kubeconfig: &Path, args: &[&str], stdin: Option<&str>) -> anyhow::Result<String> {
    use std::io::Write as _;
    let mut child = std::process::Command::new(binary("kubectl")?)
        .arg(format!("--kubeconfig={}", kubeconfig.display()))
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .context("running kubectl")?;
    child.stdin.take().context("kubectl's stdin")?.write_all(stdin.unwrap_or("").as_bytes())?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "kubectl {}: {}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
