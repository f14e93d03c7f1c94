//! One pod on the test kubelet, from its root file system to its final status. See
//! [`crate::kubelet`] for what is modelled and what is not.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context as _, bail};
use k8s_openapi::api::core::v1::{
    Container, ContainerState, ContainerStateTerminated, ContainerStatus, Pod, PodCondition,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Api, DeleteParams, Patch, PatchParams, Preconditions};
use kube::{Client, ResourceExt};
use serde_json::json;
use tokio::sync::watch;

use self::env::container_env;
use self::supervise::{stop_requested, supervise};
use self::volumes::volume_files;
use crate::kubelet::NamesHandle;
use crate::network::Network;

mod env;
mod supervise;
mod volumes;

/// What a pod needs of its kubelet.
#[derive(Debug)]
pub struct Host {
    /// The pod network.
    pub network: Arc<Network>,
    /// The API server's port (reached through the gateway).
    pub api_port: u16,
    /// Image reference to unpacked root.
    pub images: BTreeMap<String, PathBuf>,
    /// Pods' roots and logs.
    pub dir: PathBuf,
    /// Variables added on GPU nodes.
    pub gpu_node_env: Vec<(String, String)>,
    /// Nodes whose GPUs are broken, with what the driver says.
    pub broken_gpus: Arc<std::sync::Mutex<BTreeMap<String, String>>>,
    /// The cluster's pod names.
    pub names: Arc<NamesHandle>,
}

impl Host {
    /// Writes what went wrong to the kubelet's log (`<dir>/kubelet.log`) and to stderr.
    pub fn report(&self, message: &str) {
        crate::kubelet::report(&self.dir, message);
    }
}

/// How the container's last run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ended {
    /// It exited with this code (128 + signal when killed by one).
    Exited(i32),
    /// The pod was stopped for deletion with this grace.
    Stopped(i32),
    /// Killed with the node: nothing more is written.
    Killed,
}

fn now() -> Time {
    Time(jiff::Timestamp::now())
}

/// Runs `pod` until it ends or `stop` says so, writing its status as it goes.
pub async fn run(
    host: &Host,
    client: &Client,
    pod: &Pod,
    mut stop: watch::Receiver<Option<i64>>,
) -> anyhow::Result<()> {
    let namespace = pod.namespace().unwrap_or_default();
    let name = pod.name_any();
    let uid = pod.uid().unwrap_or_default();
    let spec = pod.spec.as_ref().context("pod without spec")?;
    let container = spec.containers.first().context("pod without containers")?;
    let pods: Api<Pod> = Api::namespaced(client.clone(), &namespace);
    let started = now();

    // The sandbox first: a pod whose network cannot be made says so in its status, as a kubelet
    // does, rather than vanishing into the kubelet's log.
    let network = host.network.pod();
    let pod_ip = network.as_ref().map_or(std::net::Ipv4Addr::UNSPECIFIED, |n| n.address);
    let root = host.dir.join("pods").join(&uid).join("root");
    let log = host.dir.join("logs").join(format!("{namespace}_{name}.log"));
    let prepared = match &network {
        Ok(_) => {
            // A kubelet retries what may be transient (an API call that failed, a Secret not yet
            // there) before it reports the pod stuck.
            let stopping = || stop.borrow().is_some();
            retried(|| prepare(host, client, pod, container, &root), stopping)
                .await
                .map_err(|e| ("CreateContainerConfigError", e))
        }
        Err(e) => Err(("CreatePodSandboxError", anyhow::anyhow!("creating the pod's network: {e:#}"))),
    };
    let mut names = vec![name.clone()];
    if let Some(hostname) = &spec.hostname {
        names.push(hostname.clone());
        if let Some(subdomain) = &spec.subdomain {
            names.push(format!("{hostname}.{subdomain}"));
            names.push(format!("{hostname}.{subdomain}.{namespace}.svc"));
            names.push(format!("{hostname}.{subdomain}.{namespace}.svc.cluster.local"));
        }
    }
    let result = match prepared {
        Ok(()) => {
            host.names.add(&namespace, &names, pod_ip, &root);
            let network = network.as_ref().expect("prepared only with a network");
            let mut result = supervise(host, client, pod, container, &root, &log, network, &mut stop).await;
            if let Err(e) = &result {
                // The container could not be started or watched: it failed to start, as far as
                // the cluster can tell (a kubelet reports StartError), rather than vanishing.
                let message = format!("{e:#}");
                host.report(&format!("pod {namespace}/{name}: StartError: {message}"));
                let state = json!({"terminated": {"exitCode": 128, "reason": "StartError", "message": message}});
                let status = unstarted_status(container, &started, "Failed", &state);
                if pods.patch_status(&name, &PatchParams::default(), &Patch::Merge(&status)).await.is_ok() {
                    result = Ok(Ended::Exited(128));
                }
            }
            host.names.remove(&namespace, &root);
            result
        }
        Err((reason, e)) => {
            // The container cannot start (no network, a missing image, Secret or ConfigMap): say
            // so, as a kubelet does, and wait for the pod's deletion.
            let message = format!("{e:#}");
            host.report(&format!("pod {namespace}/{name}: {reason}: {message}"));
            let state = json!({"waiting": {"reason": reason, "message": message}});
            let status = unstarted_status(container, &started, "Pending", &state);
            pods.patch_status(&name, &PatchParams::default(), &Patch::Merge(&status)).await?;
            let grace = stop_requested(&mut stop).await;
            Ok(if grace < 0 { Ended::Killed } else { Ended::Stopped(0) })
        }
    };
    drop(network);
    let _ = std::fs::remove_dir_all(host.dir.join("pods").join(&uid));
    match result? {
        Ended::Killed => Ok(()),
        Ended::Stopped(_) => {
            let params = DeleteParams {
                grace_period_seconds: Some(0),
                preconditions: Some(Preconditions { uid: Some(uid), resource_version: None }),
                ..DeleteParams::default()
            };
            match pods.delete(&name, &params).await {
                Ok(_) => Ok(()),
                Err(kube::Error::Api(e)) if e.code == 404 || e.code == 409 => Ok(()),
                Err(e) => Err(e.into()),
            }
        }
        Ended::Exited(_) => Ok(()),
    }
}

/// `attempt`, tried up to four times, 1, 2 and 3 s apart, unless `give_up` says to stop.
async fn retried<T, F, Fut>(mut attempt: F, give_up: impl Fn() -> bool) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<T>>,
{
    let mut result = attempt().await;
    for pause in 1..4 {
        if result.is_ok() || give_up() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_secs(pause)).await;
        result = attempt().await;
    }
    result
}

/// The status of a pod whose container never ran: `phase`, and the container's `state`.
fn unstarted_status(
    container: &Container,
    started: &Time,
    phase: &str,
    state: &serde_json::Value,
) -> serde_json::Value {
    json!({"status": {
        "phase": phase, "startTime": started,
        "containerStatuses": [{
            "name": container.name, "image": container.image, "imageID": "", "ready": false,
            "restartCount": 0, "state": state,
        }],
    }})
}

/// Lays out the pod's root: the image's files (hard links), the devices a process expects, the
/// volumes at their mount paths, `/etc/hosts` and `/etc/hostname`.
async fn prepare(host: &Host, client: &Client, pod: &Pod, container: &Container, root: &Path) -> anyhow::Result<()> {
    let image = container.image.clone().unwrap_or_default();
    let source = host
        .images
        .get(&image)
        .with_context(|| format!("image {image:?} is not loaded into the test kubelet (ErrImagePull)"))?;
    if root.exists() {
        std::fs::remove_dir_all(root)?;
    }
    std::fs::create_dir_all(root.parent().expect("pods/<uid>"))?;
    let copied = std::process::Command::new("cp").arg("-al").arg(source).arg(root).output()?;
    if !copied.status.success() {
        bail!("copying image {image} into the pod's root: {}", String::from_utf8_lossy(&copied.stderr));
    }
    for dir in ["etc", "tmp", "dev", "proc"] {
        std::fs::create_dir_all(root.join(dir))?;
    }
    std::fs::set_permissions(root.join("tmp"), std::fs::Permissions::from_mode(0o1777))?;
    for (device, minor) in [("null", 3), ("zero", 5), ("random", 8), ("urandom", 9)] {
        let path = root.join("dev").join(device);
        if !path.exists() {
            nix::sys::stat::mknod(
                &path,
                nix::sys::stat::SFlag::S_IFCHR,
                nix::sys::stat::Mode::from_bits_truncate(0o666),
                nix::sys::stat::makedev(1, minor),
            )?;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o666))?;
        }
    }
    std::fs::write(root.join("etc/hostname"), format!("{}\n", pod.name_any()))?;
    std::fs::write(root.join("etc/nsswitch.conf"), "hosts: files dns\n")?;
    std::fs::write(root.join("etc/hosts"), "127.0.0.1\tlocalhost\n")?;

    let spec = pod.spec.as_ref().expect("checked");
    let fs_group = spec.security_context.as_ref().and_then(|s| s.fs_group);
    for mount in container.volume_mounts.iter().flatten() {
        let volume = spec
            .volumes
            .iter()
            .flatten()
            .find(|v| v.name == mount.name)
            .with_context(|| format!("volumeMount {}: no volume of that name", mount.name))?;
        let target = root.join(mount.mount_path.trim_start_matches('/'));
        std::fs::create_dir_all(&target)?;
        let files = volume_files(client, pod, volume).await?;
        let empty_dir = volume.empty_dir.is_some();
        std::fs::set_permissions(&target, std::fs::Permissions::from_mode(if empty_dir { 0o777 } else { 0o755 }))?;
        for (path, (bytes, mode)) in files {
            let file = target.join(&path);
            std::fs::create_dir_all(file.parent().expect("inside the mount"))?;
            std::fs::write(&file, bytes)?;
            std::fs::set_permissions(&file, std::fs::Permissions::from_mode(mode))?;
            if let Some(group) = fs_group {
                nix::unistd::chown(&file, None, Some(nix::unistd::Gid::from_raw(group as u32)))?;
            }
        }
        if let Some(group) = fs_group {
            nix::unistd::chown(&target, None, Some(nix::unistd::Gid::from_raw(group as u32)))?;
        }
    }
    Ok(())
}

/// The user, group and supplementary groups the container runs as.
fn identity(pod: &Pod, container: &Container) -> (u32, u32, Vec<u32>) {
    let pod_context = pod.spec.as_ref().and_then(|s| s.security_context.as_ref());
    let context = container.security_context.as_ref();
    let uid = context.and_then(|c| c.run_as_user).or_else(|| pod_context.and_then(|c| c.run_as_user)).unwrap_or(0);
    let gid = context.and_then(|c| c.run_as_group).or_else(|| pod_context.and_then(|c| c.run_as_group)).unwrap_or(0);
    let mut groups: Vec<u32> = pod_context.and_then(|c| c.fs_group).into_iter().map(|g| g as u32).collect();
    groups.extend(
        pod_context.and_then(|c| c.supplemental_groups.clone()).unwrap_or_default().into_iter().map(|g| g as u32),
    );
    (uid as u32, gid as u32, groups)
}

/// The program's path inside the root: as given when absolute, else found on the image's PATH.
fn resolve(root: &Path, program: &str, env: &[(String, String)]) -> anyhow::Result<PathBuf> {
    if program.starts_with('/') {
        return Ok(PathBuf::from(program));
    }
    let path = env
        .iter()
        .rev()
        .find(|(k, _)| k == "PATH")
        .map_or("/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", |(_, v)| v.as_str());
    for dir in path.split(':') {
        let candidate = Path::new(dir).join(program);
        if root.join(candidate.strip_prefix("/").unwrap_or(&candidate)).is_file() {
            return Ok(candidate);
        }
    }
    bail!("executable {program:?} not found on PATH {path} in the image")
}

struct Statuses<'a> {
    pods: Api<Pod>,
    name: String,
    container: &'a Container,
    pod_ip: Ipv4Addr,
    started: Time,
}

impl Statuses<'_> {
    async fn write(
        &self,
        phase: &str,
        state: ContainerState,
        last: Option<ContainerState>,
        restarts: i32,
        ready: bool,
    ) -> anyhow::Result<()> {
        let time = now();
        let condition = |kind: &str, status: bool| PodCondition {
            type_: kind.into(),
            status: if status { "True" } else { "False" }.into(),
            last_transition_time: Some(time.clone()),
            ..PodCondition::default()
        };
        let running = state.running.is_some();
        let status = ContainerStatus {
            name: self.container.name.clone(),
            image: self.container.image.clone().unwrap_or_default(),
            image_id: String::new(),
            ready: ready && running,
            started: Some(running),
            restart_count: restarts,
            state: Some(state),
            last_state: last,
            ..ContainerStatus::default()
        };
        let patch = json!({"status": {
            "phase": phase,
            "podIP": self.pod_ip.to_string(),
            "podIPs": [{"ip": self.pod_ip.to_string()}],
            "hostIP": "127.0.0.1",
            "hostIPs": [{"ip": "127.0.0.1"}],
            "startTime": self.started,
            "conditions": [
                condition("PodScheduled", true),
                condition("Initialized", true),
                condition("ContainersReady", ready && running),
                condition("Ready", ready && running),
            ],
            "containerStatuses": [status],
        }});
        self.pods.patch_status(&self.name, &PatchParams::default(), &Patch::Merge(&patch)).await?;
        Ok(())
    }
}

/// The container's environment: the kubelet's own variables (with the fake GPU node's for GPU
/// containers), then the container's, Secrets and ConfigMaps resolved.
async fn environment(
    host: &Host,
    client: &Client,
    pod: &Pod,
    container: &Container,
    pod_ip: std::net::Ipv4Addr,
) -> anyhow::Result<Vec<(String, String)>> {
    let spec = pod.spec.as_ref().expect("checked");
    let mut env = vec![
        ("PATH".to_string(), "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".to_string()),
        ("HOSTNAME".to_string(), spec.hostname.clone().unwrap_or_else(|| pod.name_any())),
        ("KUBERNETES_SERVICE_HOST".to_string(), host.network.gateway().to_string()),
        ("KUBERNETES_SERVICE_PORT".to_string(), host.api_port.to_string()),
        ("KUBERNETES_SERVICE_PORT_HTTPS".to_string(), host.api_port.to_string()),
    ];
    let gpus = container.resources.as_ref().and_then(|r| r.limits.as_ref()).and_then(|l| l.get("nvidia.com/gpu"));
    if gpus.is_some() {
        env.extend(host.gpu_node_env.iter().cloned());
    }
    // Resolving the environment reads Secrets and ConfigMaps: retried, as a kubelet retries.
    for (k, v) in retried(|| container_env(client, pod, container, pod_ip), || false).await? {
        env.retain(|(key, _)| *key != k);
        env.push((k, v));
    }
    Ok(env)
}

/// A container's state once it exited with `code`.
fn terminated(code: i32, message: Option<String>, started_at: Time) -> ContainerState {
    ContainerState {
        terminated: Some(ContainerStateTerminated {
            exit_code: code,
            reason: Some(if code == 0 { "Completed" } else { "Error" }.into()),
            message,
            started_at: Some(started_at),
            finished_at: Some(now()),
            ..ContainerStateTerminated::default()
        }),
        ..ContainerState::default()
    }
}
