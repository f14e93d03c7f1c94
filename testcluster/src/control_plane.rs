//! A real Kubernetes control plane on loopback, started the way envtest starts one: etcd, then
//! kube-apiserver (client certificates, service-account keys, `Node,RBAC` authorization, the default
//! admission plugins plus `OwnerReferencesPermissionEnforcement` and `NodeRestriction`), then
//! kube-controller-manager (Job, garbage collector, node lifecycle, taint eviction, namespace,
//! service accounts, pod GC) and kube-scheduler. The binaries are the ones `scripts/control-plane.sh
//! build` compiled from the Kubernetes, etcd and Helm Go modules.
//!
//! Every process is this one's child and dies with it: they are stopped on drop (SIGTERM, then
//! SIGKILL after a grace period, by process id only) and, should this process die first, by the
//! kernel's parent-death signal.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::bail;

use crate::network::Network;
use crate::pki::{CertFiles, Pki};
use crate::process::Process;

/// The Kubernetes release the binaries are built from (`tests/controlplane/kubernetes/go.mod`).
pub const KUBERNETES_VERSION: &str = "v1.37.2";

/// Where `scripts/control-plane.sh build` puts the binaries: `$PRETRAIN_K8S_BIN`, else
/// `~/.cache/pretrain/k8s-v1.37.2/bin`.
pub fn bin_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("PRETRAIN_K8S_BIN") {
        return PathBuf::from(dir);
    }
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(|| PathBuf::from("/tmp"));
    cache.join("pretrain").join(format!("k8s-{KUBERNETES_VERSION}")).join("bin")
}

/// The path of one control-plane binary, or an error that says how to build it.
pub fn binary(name: &str) -> anyhow::Result<PathBuf> {
    let path = bin_dir().join(name);
    if !path.is_file() {
        bail!("{} is missing: build the control plane with `scripts/control-plane.sh build`", path.display());
    }
    Ok(path)
}

/// A port on loopback nobody listens on now.
pub fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// The controllers the controller-manager runs: Jobs and their pods' lifecycle, garbage collection
/// through owner references, node loss (heartbeats, taints, evictions), namespaces and their service
/// accounts, and what the operator's own Deployment needs (ReplicaSets, PodDisruptionBudgets).
pub const CONTROLLERS: &[&str] = &[
    "job-controller",
    "garbage-collector-controller",
    "node-lifecycle-controller",
    "taint-eviction-controller",
    "pod-garbage-collector-controller",
    "namespace-controller",
    "serviceaccount-controller",
    "root-ca-certificate-publisher-controller",
    "deployment-controller",
    "replicaset-controller",
    "disruption-controller",
];

/// Settings of a control plane.
#[derive(Debug, Clone)]
pub struct Options {
    /// Seconds without a heartbeat after which the node controller marks a node unreachable.
    pub node_monitor_grace_seconds: u32,
    /// Seconds pods tolerate a not-ready or unreachable node before they are evicted (the
    /// `DefaultTolerationSeconds` admission plugin; Kubernetes' default is 300).
    pub eviction_toleration_seconds: u32,
    /// Print each component's log on its exit (otherwise only kept in files).
    pub verbose: bool,
}

impl Default for Options {
    fn default() -> Self {
        Self { node_monitor_grace_seconds: 20, eviction_toleration_seconds: 5, verbose: false }
    }
}

/// A running control plane.
#[derive(Debug)]
pub struct ControlPlane {
    dir: PathBuf,
    /// The CA and every certificate.
    pub pki: Pki,
    /// `https://127.0.0.1:PORT`.
    pub server: String,
    /// The API server's port (on every host address).
    pub port: u16,
    /// The pod network.
    pub network: std::sync::Arc<Network>,
    /// A kubeconfig with cluster-admin rights (`system:masters`).
    pub admin_kubeconfig: PathBuf,
    // Stopped in reverse order of start on drop: the scheduler first, etcd last.
    processes: Vec<Process>,
}

impl ControlPlane {
    /// Starts etcd, kube-apiserver, kube-controller-manager and kube-scheduler with their state and
    /// logs under `dir`; returns once the API server answers `/readyz` and the controllers run.
    pub async fn start(dir: &Path, options: &Options) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let dir = dir.canonicalize()?;
        let network = std::sync::Arc::new(Network::create()?);
        let pki = Pki::create(&dir.join("pki"), &[network.gateway()])?;
        let mut processes = Vec::new();

        let (etcd_client, etcd_peer) = (free_port()?, free_port()?);
        let etcd_url = format!("http://127.0.0.1:{etcd_client}");
        processes.push(Process::spawn(
            "etcd",
            &binary("etcd")?,
            &etcd_args(&dir, &etcd_url, etcd_peer),
            &dir.join("etcd.log"),
        )?);

        let port = free_port()?;
        let server = format!("https://127.0.0.1:{port}");
        let sa_key = pki.service_account_key.display().to_string();
        let tolerate = options.eviction_toleration_seconds;
        processes.push(Process::spawn(
            "kube-apiserver",
            &binary("kube-apiserver")?,
            &apiserver_args(&dir, &etcd_url, port, &pki, &network.gateway().to_string(), tolerate),
            &dir.join("kube-apiserver.log"),
        )?);

        let admin = pki.client("admin", "pretrain-test-admin", Some("system:masters"))?;
        let admin_kubeconfig = dir.join("admin.kubeconfig");
        pki.kubeconfig(&admin_kubeconfig, &server, &admin)?;
        let mut plane = Self { dir: dir.clone(), pki, server, port, admin_kubeconfig, network, processes };
        plane.wait_ready(Duration::from_secs(120)).await?;

        let manager = plane.component_kubeconfig("kube-controller-manager", "system:kube-controller-manager")?;
        let grace = options.node_monitor_grace_seconds;
        let process = Process::spawn(
            "kube-controller-manager",
            &binary("kube-controller-manager")?,
            &[
                component_flags("kube-controller-manager", &manager, &dir)?,
                vec![
                    format!("--controllers={}", CONTROLLERS.join(",")),
                    format!("--root-ca-file={}", plane.pki.ca.cert.display()),
                    format!("--service-account-private-key-file={sa_key}"),
                    "--use-service-account-credentials=true".into(),
                    format!("--node-monitor-grace-period={grace}s"),
                    "--node-monitor-period=2s".into(),
                ],
            ]
            .concat(),
            &dir.join("kube-controller-manager.log"),
        )?;
        plane.processes.push(process);

        let scheduler = plane.component_kubeconfig("kube-scheduler", "system:kube-scheduler")?;
        let process = Process::spawn(
            "kube-scheduler",
            &binary("kube-scheduler")?,
            &component_flags("kube-scheduler", &scheduler, &dir)?,
            &dir.join("kube-scheduler.log"),
        )?;
        plane.processes.push(process);
        if options.verbose {
            for p in &mut plane.processes {
                p.print_log_on_exit = true;
            }
        }
        plane.wait_controllers(Duration::from_secs(120)).await?;
        Ok(plane)
    }

    fn component_kubeconfig(&self, name: &str, user: &str) -> anyhow::Result<PathBuf> {
        let cert = self.pki.client(name, user, None)?;
        let path = self.dir.join(format!("{name}.kubeconfig"));
        self.pki.kubeconfig(&path, &self.server, &cert)?;
        Ok(path)
    }

    /// A kubeconfig for node `node` (user `system:node:<node>` in `system:nodes`, as the Node
    /// authorizer and `NodeRestriction` expect of a kubelet).
    pub fn node_kubeconfig(&self, node: &str) -> anyhow::Result<PathBuf> {
        let cert: CertFiles =
            self.pki.client(&format!("node-{node}"), &format!("system:node:{node}"), Some("system:nodes"))?;
        let path = self.dir.join(format!("node-{node}.kubeconfig"));
        self.pki.kubeconfig(&path, &self.server, &cert)?;
        Ok(path)
    }

    /// The directory holding the cluster's state and logs.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// A client with cluster-admin rights.
    pub async fn admin(&self) -> anyhow::Result<kube::Client> {
        client(&self.admin_kubeconfig).await
    }

    async fn wait_ready(&mut self, deadline: Duration) -> anyhow::Result<()> {
        let started = std::time::Instant::now();
        loop {
            for p in &mut self.processes {
                p.check_running()?;
            }
            if let Ok(client) = self.admin().await {
                let request = http_get("/readyz");
                if let Ok(text) = client.request_text(request).await
                    && text.trim() == "ok"
                {
                    return Ok(());
                }
            }
            if started.elapsed() > deadline {
                bail!(
                    "kube-apiserver not ready after {}s; its log: {}",
                    deadline.as_secs(),
                    self.dir.join("kube-apiserver.log").display()
                );
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// Waits until the controller-manager has created the `default` ServiceAccount and the
    /// `kube-root-ca.crt` ConfigMap in `default` (pods need both), and the scheduler holds no error.
    async fn wait_controllers(&mut self, deadline: Duration) -> anyhow::Result<()> {
        use k8s_openapi::api::core::v1::{ConfigMap, ServiceAccount};
        let client = self.admin().await?;
        let accounts: kube::Api<ServiceAccount> = kube::Api::namespaced(client.clone(), "default");
        let config_maps: kube::Api<ConfigMap> = kube::Api::namespaced(client, "default");
        let started = std::time::Instant::now();
        loop {
            for p in &mut self.processes {
                p.check_running()?;
            }
            if accounts.get_opt("default").await?.is_some() && config_maps.get_opt("kube-root-ca.crt").await?.is_some()
            {
                return Ok(());
            }
            if started.elapsed() > deadline {
                bail!(
                    "kube-controller-manager made no default ServiceAccount in {}s; its log: {}",
                    deadline.as_secs(),
                    self.dir.join("kube-controller-manager.log").display()
                );
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// Stops every component, the scheduler first and etcd last.
    pub fn stop(&mut self) {
        while let Some(mut p) = self.processes.pop() {
            p.stop(Duration::from_secs(10));
        }
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The flags the controller-manager and the scheduler share: their kubeconfig for every purpose, a
/// loopback serving port of their own with self-signed certificates, no leader election.
fn component_flags(name: &str, kubeconfig: &Path, dir: &Path) -> anyhow::Result<Vec<String>> {
    let kubeconfig = kubeconfig.display();
    Ok(vec![
        format!("--kubeconfig={kubeconfig}"),
        format!("--authentication-kubeconfig={kubeconfig}"),
        format!("--authorization-kubeconfig={kubeconfig}"),
        "--bind-address=127.0.0.1".into(),
        format!("--secure-port={}", free_port()?),
        format!("--cert-dir={}", dir.join(name).display()),
        "--leader-elect=false".into(),
        "--v=1".into(),
    ])
}

fn http_get(path: &str) -> http::Request<Vec<u8>> {
    http::Request::get(path).body(Vec::new()).expect("a valid request")
}

/// A client from a kubeconfig file.
pub async fn client(kubeconfig: &Path) -> anyhow::Result<kube::Client> {
    // kube's TLS cannot choose between the two rustls providers its dependents enable.
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let config = kube::config::Kubeconfig::read_from(kubeconfig)?;
    let config = kube::Config::from_custom_kubeconfig(config, &kube::config::KubeConfigOptions::default()).await?;
    Ok(kube::Client::try_from(config)?)
}

/// etcd's flags: its data under `dir`, clients at `etcd_url`, one member at port `etcd_peer`.
fn etcd_args(dir: &Path, etcd_url: &str, etcd_peer: u16) -> Vec<String> {
    vec![
        "--name=pretrain-test".into(),
        format!("--data-dir={}", dir.join("etcd").display()),
        format!("--listen-client-urls={etcd_url}"),
        format!("--advertise-client-urls={etcd_url}"),
        format!("--listen-peer-urls=http://127.0.0.1:{etcd_peer}"),
        format!("--initial-advertise-peer-urls=http://127.0.0.1:{etcd_peer}"),
        format!("--initial-cluster=pretrain-test=http://127.0.0.1:{etcd_peer}"),
        // A test cluster's data is thrown away: skip the fsyncs (as envtest does).
        "--unsafe-no-fsync".into(),
        "--log-level=warn".into(),
    ]
}

/// kube-apiserver's flags: etcd at `etcd_url`, serving on `port` of every address with `pki`'s
/// certificates, advertised to pods at `gateway`.
fn apiserver_args(dir: &Path, etcd_url: &str, port: u16, pki: &Pki, gateway: &str, tolerate: u32) -> Vec<String> {
    vec![
        format!("--etcd-servers={etcd_url}"),
        // Every host address: pods reach it through the pod network's gateway.
        "--bind-address=0.0.0.0".into(),
        // The `kubernetes` Service's endpoint: the address pods reach the API server at.
        format!("--advertise-address={gateway}"),
        format!("--secure-port={port}"),
        format!("--cert-dir={}", dir.join("apiserver").display()),
        format!("--tls-cert-file={}", pki.serving.cert.display()),
        format!("--tls-private-key-file={}", pki.serving.key.display()),
        format!("--client-ca-file={}", pki.ca.cert.display()),
        "--service-cluster-ip-range=10.0.0.0/24".into(),
        "--service-account-issuer=https://kubernetes.default.svc".into(),
        format!("--service-account-key-file={}", pki.service_account_public_key().display()),
        format!("--service-account-signing-key-file={}", pki.service_account_key.display()),
        "--authorization-mode=Node,RBAC".into(),
        "--enable-admission-plugins=OwnerReferencesPermissionEnforcement,NodeRestriction".into(),
        format!("--default-not-ready-toleration-seconds={tolerate}"),
        format!("--default-unreachable-toleration-seconds={tolerate}"),
        "--allow-privileged=true".into(),
        // Nothing dials kubelets here (no logs or exec through the API server).
        "--kubelet-preferred-address-types=InternalIP".into(),
        "--v=1".into(),
    ]
}
