//! The test kubelet: the one part of the test cluster that is ours. It registers Nodes with the
//! capacity and labels a GPU node has (`nvidia.com/gpu`, `nvidia.com/gpu.product`), renews their
//! Leases, watches the pods the real kube-scheduler binds to them and runs each container for real,
//! as a process:
//!
//! - in its own network namespace with its own pod IP ([`crate::network`]);
//! - chrooted into a root file system of its own, the container image's root (see [`crate::image`])
//!   with the pod's volumes (ConfigMap, Secret, emptyDir, projected service-account token) written at
//!   their mount paths and an `/etc/hosts` that resolves the pod's own name and the `<pod>.<service>`
//!   names of the pods of its namespace (what cluster DNS would answer for a headless Service);
//! - as the container's user and group (`runAsUser`, `runAsGroup`, `fsGroup`);
//! - with its command and args (`$(VAR)` expanded), its env (values, `fieldRef` to annotations,
//!   labels, name, namespace, node and pod IP, `secretKeyRef`, `configMapKeyRef`, `envFrom`) and the
//!   in-cluster `KUBERNETES_SERVICE_HOST`/`PORT` pointing at the API server through the gateway;
//! - stopped on deletion with SIGTERM, then SIGKILL after the pod's grace period; exit codes and
//!   `terminated` states (`Completed`/`Error`, the log's tail as the message under
//!   `FallbackToLogsOnError`) written to the pod status; restarted per `restartPolicy`; HTTP
//!   readiness and liveness probes.
//!
//! Every request a node makes uses that node's own client certificate, so the Node authorizer and
//! `NodeRestriction` judge it as they judge a real kubelet. A node can be lost ([`Kubelet::lose`]):
//! its processes die and it stops heartbeating, and the node controller takes it from there; and it
//! can come back ([`Kubelet::recover`]), freshly booted.
//!
//! Not modelled: resource limits (no cgroups: memory limits are not enforced, so no OOM kills),
//! image pulls (images are given as unpacked roots), container logs through the API server (they
//! are files under the kubelet's directory), exec, port-forward, init and sidecar containers.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::api::core::v1::{Node, NodeAddress, NodeCondition, NodeSpec, NodeStatus, NodeSystemInfo, Pod, Taint};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta, OwnerReference, Time};
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams, Preconditions};
use kube::runtime::watcher;
use kube::{Client, ResourceExt};
use serde_json::json;
use tokio::sync::watch;

use crate::network::Network;
use crate::process::tail;

/// One node the kubelet registers.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// The Node's name (and `kubernetes.io/hostname`).
    pub name: String,
    /// CPU capacity.
    pub cpu: String,
    /// Memory capacity.
    pub memory: String,
    /// `nvidia.com/gpu` capacity (0: a CPU node).
    pub gpus: u32,
    /// The `nvidia.com/gpu.product` label.
    pub gpu_product: Option<String>,
}

impl NodeConfig {
    /// A CPU node.
    pub fn cpu(name: &str, cpu: &str, memory: &str) -> Self {
        Self { name: name.into(), cpu: cpu.into(), memory: memory.into(), gpus: 0, gpu_product: None }
    }

    /// A node with `gpus` GPUs of `product` (whose pods train on the CPU).
    pub fn gpu(name: &str, gpus: u32, product: &str) -> Self {
        Self { name: name.into(), cpu: "16".into(), memory: "64Gi".into(), gpus, gpu_product: Some(product.into()) }
    }
}

/// What the kubelet runs.
#[derive(Debug, Clone)]
pub struct Config {
    /// The nodes.
    pub nodes: Vec<NodeConfig>,
    /// Image reference to its unpacked root file system.
    pub images: BTreeMap<String, PathBuf>,
    /// Pods' roots and logs.
    pub dir: PathBuf,
    /// Variables added to every container on a GPU node: the one documented test-only override,
    /// which lets pods that requested `nvidia.com/gpu` train on the CPU (see `docs/testing.md`).
    pub gpu_node_env: Vec<(String, String)>,
}

/// The running kubelet; stops every pod and task on drop.
pub struct Kubelet {
    shared: Arc<Shared>,
    /// Each node's heartbeat and pod tasks.
    tasks: Mutex<Vec<(String, tokio::task::JoinHandle<()>)>>,
}

impl std::fmt::Debug for Kubelet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Kubelet").field("nodes", &self.shared.nodes.lock().unwrap().keys()).finish_non_exhaustive()
    }
}

struct NodeState {
    config: NodeConfig,
    client: Client,
    lost: Arc<AtomicBool>,
}

struct RunningPod {
    node: String,
    /// Send the grace period in seconds to stop the pod (`-1`: killed, no status written).
    stop: watch::Sender<Option<i64>>,
}

/// A namespace's pod names, each with the pod's address and root.
type Names = BTreeMap<String, (Ipv4Addr, PathBuf)>;

struct Shared {
    network: Arc<Network>,
    api_port: u16,
    config: Config,
    nodes: Mutex<BTreeMap<String, NodeState>>,
    pods: Mutex<BTreeMap<String, RunningPod>>,
    /// Per namespace, the DNS names of its running pods.
    names: Mutex<BTreeMap<String, Names>>,
    /// Nodes whose GPUs are broken, with what the driver says.
    broken_gpus: Arc<Mutex<BTreeMap<String, String>>>,
}

impl Kubelet {
    /// Registers the configured nodes with the cluster behind `plane` and starts serving them.
    pub async fn start(plane: &crate::ControlPlane, config: Config) -> anyhow::Result<Self> {
        std::fs::create_dir_all(config.dir.join("pods"))?;
        std::fs::create_dir_all(config.dir.join("logs"))?;
        let mut nodes = BTreeMap::new();
        for node in &config.nodes {
            let client = crate::control_plane::client(&plane.node_kubeconfig(&node.name)?).await?;
            register(&client, node).await.with_context(|| format!("registering node {}", node.name))?;
            let state = NodeState { config: node.clone(), client, lost: Arc::new(AtomicBool::new(false)) };
            nodes.insert(node.name.clone(), state);
        }
        let shared = Arc::new(Shared {
            network: Arc::clone(&plane.network),
            api_port: plane.port,
            config,
            nodes: Mutex::new(nodes),
            pods: Mutex::new(BTreeMap::new()),
            names: Mutex::new(BTreeMap::new()),
            broken_gpus: Arc::default(),
        });
        let mut tasks = Vec::new();
        let names: Vec<String> = shared.nodes.lock().unwrap().keys().cloned().collect();
        for node in names {
            tasks.extend(serve(&shared, &node));
        }
        Ok(Self { shared, tasks: Mutex::new(tasks) })
    }

    /// The machine of a lost node is back, freshly booted: it posts its status (Ready) at once,
    /// heartbeats again and serves the pods bound to it; the pods it ran before are gone (it
    /// confirms the deletion of those the API server still lists).
    pub fn recover(&self, node: &str) {
        let Some(lost) = self.shared.nodes.lock().unwrap().get(node).map(|s| Arc::clone(&s.lost)) else { return };
        let mut tasks = self.tasks.lock().unwrap();
        for (_, task) in tasks.iter().filter(|(n, _)| n == node) {
            task.abort();
        }
        tasks.retain(|(n, _)| n != node);
        lost.store(false, Ordering::SeqCst);
        tasks.extend(serve(&self.shared, node));
    }

    /// Node loss: the node's processes die at once (SIGKILL, no status written) and it stops
    /// heartbeating and answering for its pods, as a machine that lost power would.
    pub fn lose(&self, node: &str) {
        if let Some(state) = self.shared.nodes.lock().unwrap().get(node) {
            state.lost.store(true, Ordering::SeqCst);
        }
        for pod in self.shared.pods.lock().unwrap().values().filter(|p| p.node == node) {
            let _ = pod.stop.send(Some(-1));
        }
    }

    /// A broken GPU: from now on every container on `node` that asks for `nvidia.com/gpu` fails at
    /// once with the exit code of a device failure (74) and `message`, as a worker does on an Xid or
    /// an uncorrectable ECC error. [`Kubelet::repair_gpus`] ends it.
    pub fn break_gpus(&self, node: &str, message: &str) {
        self.shared.broken_gpus.lock().unwrap().insert(node.to_string(), message.to_string());
    }

    /// The node's GPUs work again.
    pub fn repair_gpus(&self, node: &str) {
        self.shared.broken_gpus.lock().unwrap().remove(node);
    }

    /// The log file of a pod's container.
    pub fn log_path(&self, namespace: &str, pod: &str) -> PathBuf {
        self.shared.config.dir.join("logs").join(format!("{namespace}_{pod}.log"))
    }

    /// Stops every pod (SIGKILL) and every task.
    pub fn stop(&mut self) {
        for pod in self.shared.pods.lock().unwrap().values() {
            let _ = pod.stop.send(Some(-1));
        }
        for (_, task) in self.tasks.lock().unwrap().drain(..) {
            task.abort();
        }
    }
}

impl Drop for Kubelet {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Writes what went wrong to `<dir>/kubelet.log` (the test harness captures stderr, and shows it
/// only for the test that started the cluster, if it fails) and to stderr.
pub fn report(dir: &Path, message: &str) {
    use std::io::Write as _;
    let line = format!("{} test kubelet: {message}\n", jiff::Timestamp::now());
    eprint!("{line}");
    if let Ok(mut file) = std::fs::OpenOptions::new().create(true).append(true).open(dir.join("kubelet.log")) {
        let _ = file.write_all(line.as_bytes());
    }
}

fn quantity(s: &str) -> Quantity {
    Quantity(s.to_string())
}

async fn register(client: &Client, node: &NodeConfig) -> anyhow::Result<()> {
    let nodes: Api<Node> = Api::all(client.clone());
    let mut labels = BTreeMap::from([
        ("kubernetes.io/hostname".to_string(), node.name.clone()),
        ("kubernetes.io/os".to_string(), "linux".to_string()),
        ("kubernetes.io/arch".to_string(), "amd64".to_string()),
    ]);
    if let Some(product) = &node.gpu_product {
        labels.insert("nvidia.com/gpu.product".into(), product.clone());
        labels.insert("nvidia.com/gpu.count".into(), node.gpus.to_string());
    }
    // GPU nodes carry the taint GPU node pools commonly have, so that only pods asking for GPUs
    // (which tolerate it) land there.
    let taints = node
        .gpu_product
        .is_some()
        .then(|| vec![Taint { key: "nvidia.com/gpu".into(), effect: "NoSchedule".into(), ..Taint::default() }]);
    let object = Node {
        metadata: ObjectMeta { name: Some(node.name.clone()), labels: Some(labels), ..ObjectMeta::default() },
        spec: Some(NodeSpec { taints, ..NodeSpec::default() }),
        status: None,
    };
    match nodes.create(&PostParams::default(), &object).await {
        Ok(_) => {}
        Err(kube::Error::Api(e)) if e.code == 409 => {}
        Err(e) => return Err(e.into()),
    }
    patch_node_status(client, node).await
}

async fn patch_node_status(client: &Client, node: &NodeConfig) -> anyhow::Result<()> {
    let nodes: Api<Node> = Api::all(client.clone());
    let mut capacity = BTreeMap::from([
        ("cpu".to_string(), quantity(&node.cpu)),
        ("memory".to_string(), quantity(&node.memory)),
        ("pods".to_string(), quantity("110")),
    ]);
    if node.gpus > 0 {
        capacity.insert("nvidia.com/gpu".into(), quantity(&node.gpus.to_string()));
    }
    let now = Time(jiff::Timestamp::now());
    let condition = |kind: &str, status: &str, reason: &str, message: &str| NodeCondition {
        type_: kind.into(),
        status: status.into(),
        reason: Some(reason.into()),
        message: Some(message.into()),
        last_heartbeat_time: Some(now.clone()),
        last_transition_time: Some(now.clone()),
    };
    let status = NodeStatus {
        capacity: Some(capacity.clone()),
        allocatable: Some(capacity),
        conditions: Some(vec![
            condition("Ready", "True", "KubeletReady", "the test kubelet is posting ready status"),
            condition("MemoryPressure", "False", "KubeletHasSufficientMemory", "no memory pressure"),
            condition("DiskPressure", "False", "KubeletHasNoDiskPressure", "no disk pressure"),
            condition("PIDPressure", "False", "KubeletHasSufficientPID", "no PID pressure"),
        ]),
        addresses: Some(vec![
            NodeAddress { type_: "InternalIP".into(), address: "127.0.0.1".into() },
            NodeAddress { type_: "Hostname".into(), address: node.name.clone() },
        ]),
        node_info: Some(NodeSystemInfo {
            architecture: "amd64".into(),
            operating_system: "linux".into(),
            kubelet_version: crate::control_plane::KUBERNETES_VERSION.into(),
            kube_proxy_version: String::new(),
            container_runtime_version: "pretrain-test-kubelet://1".into(),
            os_image: "pretrain test kubelet".into(),
            kernel_version: String::new(),
            boot_id: String::new(),
            machine_id: String::new(),
            system_uuid: String::new(),
            ..NodeSystemInfo::default()
        }),
        ..NodeStatus::default()
    };
    let patch = json!({"status": status});
    nodes.patch_status(&node.name, &PatchParams::default(), &Patch::Strategic(&patch)).await?;
    Ok(())
}

/// A node's tasks: its heartbeat and its pods.
fn serve(shared: &Arc<Shared>, node: &str) -> [(String, tokio::task::JoinHandle<()>); 2] {
    [
        (node.to_string(), tokio::spawn(heartbeat(Arc::clone(shared), node.to_string()))),
        (node.to_string(), tokio::spawn(serve_pods(Arc::clone(shared), node.to_string()))),
    ]
}

/// Renews the node's Lease every 2 s and posts its status at once and then every 10 s, until the
/// node is lost.
async fn heartbeat(shared: Arc<Shared>, node: String) {
    let (client, config, lost) = {
        let nodes = shared.nodes.lock().unwrap();
        let state = &nodes[&node];
        (state.client.clone(), state.config.clone(), Arc::clone(&state.lost))
    };
    let leases: Api<Lease> = Api::namespaced(client.clone(), "kube-node-lease");
    let mut tick = 0u64;
    while !lost.load(Ordering::SeqCst) {
        if let Err(e) = renew(&client, &leases, &node).await {
            report(&shared.config.dir, &format!("node {node}: renewing its lease: {e}"));
        }
        if tick.is_multiple_of(5)
            && let Err(e) = patch_node_status(&client, &config).await
        {
            report(&shared.config.dir, &format!("node {node}: posting its status: {e}"));
        }
        tick += 1;
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
}

async fn renew(client: &Client, leases: &Api<Lease>, node: &str) -> anyhow::Result<()> {
    let now = MicroTime(jiff::Timestamp::now());
    match leases.get_opt(node).await? {
        Some(mut lease) => {
            let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
            spec.renew_time = Some(now);
            spec.holder_identity = Some(node.into());
            leases.replace(node, &PostParams::default(), &lease).await?;
        }
        None => {
            let uid = Api::<Node>::all(client.clone()).get(node).await?.uid().unwrap_or_default();
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(node.into()),
                    owner_references: Some(vec![OwnerReference {
                        api_version: "v1".into(),
                        kind: "Node".into(),
                        name: node.into(),
                        uid,
                        ..OwnerReference::default()
                    }]),
                    ..ObjectMeta::default()
                },
                spec: Some(LeaseSpec {
                    holder_identity: Some(node.into()),
                    lease_duration_seconds: Some(40),
                    renew_time: Some(now),
                    ..LeaseSpec::default()
                }),
            };
            leases.create(&PostParams::default(), &lease).await?;
        }
    }
    Ok(())
}

/// Watches the pods bound to `node` and starts, stops and finalizes them.
async fn serve_pods(shared: Arc<Shared>, node: String) {
    let (client, lost) = {
        let nodes = shared.nodes.lock().unwrap();
        (nodes[&node].client.clone(), Arc::clone(&nodes[&node].lost))
    };
    let pods: Api<Pod> = Api::all(client.clone());
    let config = watcher::Config::default().fields(&format!("spec.nodeName={node}"));
    let mut events = watcher(pods, config).boxed();
    loop {
        let event = match events.try_next().await {
            Ok(Some(event)) => event,
            Ok(None) => return,
            Err(e) => {
                report(&shared.config.dir, &format!("node {node}: watching pods: {e}"));
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        if lost.load(Ordering::SeqCst) {
            return;
        }
        match event {
            watcher::Event::Apply(pod) | watcher::Event::InitApply(pod) => {
                observe(&shared, &client, &node, pod).await;
            }
            watcher::Event::Delete(pod) => {
                // Gone from the API server (force-deleted): kill what is left.
                if let Some(running) = shared.pods.lock().unwrap().get(&pod.uid().unwrap_or_default()) {
                    let _ = running.stop.send(Some(-1));
                }
            }
            watcher::Event::Init | watcher::Event::InitDone => {}
        }
    }
}

async fn observe(shared: &Arc<Shared>, client: &Client, node: &str, pod: Pod) {
    let uid = pod.uid().unwrap_or_default();
    let deleting = pod.metadata.deletion_timestamp.is_some();
    let grace = pod.metadata.deletion_grace_period_seconds.unwrap_or(30);
    {
        let running = shared.pods.lock().unwrap();
        if let Some(p) = running.get(&uid) {
            if deleting && p.stop.borrow().is_none() {
                let _ = p.stop.send(Some(grace));
            }
            return;
        }
    }
    let phase = pod.status.as_ref().and_then(|s| s.phase.clone()).unwrap_or_default();
    let terminal = phase == "Succeeded" || phase == "Failed";
    if deleting {
        // Not running here (never started, or finished): confirm the deletion.
        let pods: Api<Pod> = Api::namespaced(client.clone(), &pod.namespace().unwrap_or_default());
        let params = DeleteParams {
            grace_period_seconds: Some(0),
            preconditions: Some(Preconditions { uid: Some(uid), resource_version: None }),
            ..DeleteParams::default()
        };
        let _ = pods.delete(&pod.name_any(), &params).await;
        return;
    }
    if terminal {
        return;
    }
    let (stop, stopped) = watch::channel(None);
    shared.pods.lock().unwrap().insert(uid.clone(), RunningPod { node: node.into(), stop });
    let shared = Arc::clone(shared);
    let client = client.clone();
    tokio::spawn(async move {
        let name = format!("{}/{}", pod.namespace().unwrap_or_default(), pod.name_any());
        if let Err(e) = crate::pod::run(&shared_view(&shared), &client, &pod, stopped).await {
            report(&shared.config.dir, &format!("pod {name}: {e:#}"));
        }
        shared.pods.lock().unwrap().remove(&uid);
    });
}

fn shared_view(shared: &Arc<Shared>) -> crate::pod::Host {
    crate::pod::Host {
        network: Arc::clone(&shared.network),
        api_port: shared.api_port,
        images: shared.config.images.clone(),
        dir: shared.config.dir.clone(),
        gpu_node_env: shared.config.gpu_node_env.clone(),
        broken_gpus: Arc::clone(&shared.broken_gpus),
        names: Arc::new(NamesHandle(Arc::clone(shared))),
    }
}

/// The cluster's pod names (what cluster DNS answers), shared by every pod of this kubelet.
pub struct NamesHandle(Arc<Shared>);

impl std::fmt::Debug for NamesHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NamesHandle").finish_non_exhaustive()
    }
}

impl NamesHandle {
    /// Adds a pod's names and rewrites `/etc/hosts` in every root of its namespace.
    pub fn add(&self, namespace: &str, names: &[String], address: Ipv4Addr, root: &Path) {
        let mut all = self.0.names.lock().unwrap();
        let entries = all.entry(namespace.into()).or_default();
        for name in names {
            entries.insert(name.clone(), (address, root.to_path_buf()));
        }
        write_hosts(entries);
    }

    /// Removes the names of the pod whose root is `root`.
    pub fn remove(&self, namespace: &str, root: &Path) {
        let mut all = self.0.names.lock().unwrap();
        if let Some(entries) = all.get_mut(namespace) {
            entries.retain(|_, (_, r)| r != root);
            write_hosts(entries);
        }
    }
}

fn write_hosts(entries: &Names) {
    let mut by_root: BTreeMap<&PathBuf, ()> = BTreeMap::new();
    for (_, root) in entries.values() {
        by_root.insert(root, ());
    }
    let mut text = String::from("127.0.0.1\tlocalhost\n::1\tlocalhost\n");
    for (name, (address, _)) in entries {
        text.push_str(&format!("{address}\t{name}\n"));
    }
    for root in by_root.keys() {
        let path = root.join("etc/hosts");
        let tmp = root.join("etc/.hosts.tmp");
        if std::fs::write(&tmp, &text).is_ok() {
            let _ = std::fs::rename(&tmp, &path);
        }
    }
}

/// The tail of a log file, for a terminated container's message.
pub fn log_tail(path: &Path) -> String {
    let text = tail(path, 80);
    let bytes = text.as_bytes();
    let start = bytes.len().saturating_sub(2048);
    String::from_utf8_lossy(&bytes[start..]).into_owned()
}
