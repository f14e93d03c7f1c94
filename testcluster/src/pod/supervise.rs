//! A running container: started, restarted per `restartPolicy`, probed, stopped with SIGTERM then
//! SIGKILL after the grace period.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context as _, bail};
use k8s_openapi::api::core::v1::{
    Container, ContainerState, ContainerStateRunning, ContainerStateWaiting, HTTPGetAction, Pod, Probe,
};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::api::Api;
use kube::{Client, ResourceExt};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::sync::watch;

use super::env::expand;
use super::{Ended, Host, Statuses, environment, identity, now, resolve, terminated};
use crate::kubelet::log_tail;

/// `pretrain_crd::contract::exit::DEVICE`: the exit code of a worker whose GPU failed.
const DEVICE_FAILURE: i32 = 74;

/// What the driver says of the node's GPUs when they are broken ([`crate::Kubelet::break_gpus`])
/// and `container` asks for one.
fn broken_gpu(host: &Host, pod: &Pod, container: &Container) -> Option<String> {
    let limits = container.resources.as_ref().and_then(|r| r.limits.as_ref())?;
    let node = pod.spec.as_ref()?.node_name.as_ref()?;
    limits.contains_key("nvidia.com/gpu").then(|| host.broken_gpus.lock().unwrap().get(node).cloned()).flatten()
}

/// Starts the container, restarts it per `restartPolicy`, probes it and writes its status.
#[allow(clippy::too_many_arguments)]
pub(super) async fn supervise(
    host: &Host,
    client: &Client,
    pod: &Pod,
    container: &Container,
    root: &Path,
    log: &Path,
    network: &crate::network::PodNetwork,
    stop: &mut watch::Receiver<Option<i64>>,
) -> anyhow::Result<Ended> {
    let namespace = pod.namespace().unwrap_or_default();
    let spec = pod.spec.as_ref().expect("checked");
    let pod_ip = network.address;
    let statuses = Statuses {
        pods: Api::namespaced(client.clone(), &namespace),
        name: pod.name_any(),
        container,
        pod_ip,
        started: now(),
    };
    let env = environment(host, client, pod, container, pod_ip).await?;
    let mut argv: Vec<String> = container.command.clone().unwrap_or_default();
    argv.extend(container.args.clone().unwrap_or_default());
    let argv: Vec<String> = argv.iter().map(|a| expand(a, &env)).collect();
    let Some(program) = argv.first() else { bail!("container {} has no command", container.name) };
    let program = resolve(root, program, &env)?;
    let workdir = PathBuf::from(container.working_dir.clone().unwrap_or_else(|| "/".into()));
    let (uid, gid, groups) = identity(pod, container);
    let restart = spec.restart_policy.clone().unwrap_or_else(|| "Always".into());

    if let Some(message) = broken_gpu(host, pod, container) {
        // What a worker on a GPU with an Xid says, and its exit code for a device failure.
        std::fs::write(log, format!("{message}\n"))?;
        let ended = terminated(DEVICE_FAILURE, Some(message), now());
        statuses.write("Failed", ended, None, 0, false).await?;
        return Ok(Ended::Exited(DEVICE_FAILURE));
    }
    let mut restarts = 0;
    let mut last: Option<ContainerState> = None;
    loop {
        let out = std::fs::File::options().create(true).append(true).open(log)?;
        let mut command = std::process::Command::new(&program);
        command.args(&argv[1..]).env_clear().envs(env.iter().cloned());
        command.stdin(std::process::Stdio::null()).stdout(out.try_clone()?).stderr(out);
        let sandbox = crate::sys::Sandbox {
            netns: std::fs::File::open(network.path())?,
            root: root.to_path_buf(),
            workdir: workdir.clone(),
            uid,
            gid,
            groups: groups.clone(),
        };
        crate::sys::enter(&mut command, sandbox);
        // After the change of user, which clears the parent-death signal.
        crate::sys::die_with_parent(&mut command);
        let mut child = tokio::process::Command::from(command).spawn().context("starting the container")?;
        let started_at = now();
        let running = ContainerState {
            running: Some(ContainerStateRunning { started_at: Some(started_at.clone()) }),
            ..ContainerState::default()
        };
        let probed = container.readiness_probe.is_none();
        statuses.write("Running", running.clone(), last.clone(), restarts, probed).await?;
        let ended = watch_container(&mut child, container, pod_ip, stop, &statuses, &running, &last, restarts).await?;
        let code = match ended {
            Ended::Killed => return Ok(Ended::Killed),
            Ended::Exited(code) | Ended::Stopped(code) => code,
        };
        let message = (code != 0 && container.termination_message_policy.as_deref() == Some("FallbackToLogsOnError"))
            .then(|| log_tail(log));
        let terminated = terminated(code, message, started_at);
        let again = matches!(ended, Ended::Exited(_)) && (restart == "Always" || (restart == "OnFailure" && code != 0));
        if !again {
            let phase = if code == 0 { "Succeeded" } else { "Failed" };
            statuses.write(phase, terminated, last, restarts, false).await?;
            return Ok(ended);
        }
        restarts += 1;
        last = Some(terminated);
        let waiting = ContainerState {
            waiting: Some(ContainerStateWaiting { reason: Some("CrashLoopBackOff".into()), message: None }),
            ..ContainerState::default()
        };
        statuses.write("Running", waiting, last.clone(), restarts, false).await?;
        tokio::select! {
            () = tokio::time::sleep(Duration::from_secs(1)) => {}
            grace = stop_requested(stop) => return Ok(if grace < 0 { Ended::Killed } else { Ended::Stopped(0) }),
        }
    }
}

/// Waits for the container to exit, or stops it; probes it meanwhile.
#[allow(clippy::too_many_arguments)]
async fn watch_container(
    child: &mut tokio::process::Child,
    container: &Container,
    pod_ip: Ipv4Addr,
    stop: &mut watch::Receiver<Option<i64>>,
    statuses: &Statuses<'_>,
    running: &ContainerState,
    last: &Option<ContainerState>,
    restarts: i32,
) -> anyhow::Result<Ended> {
    let pid = Pid::from_raw(child.id().context("the container has a pid")? as i32);
    let mut ready = container.readiness_probe.is_none();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut seconds = 0i32;
    let mut liveness_failures = 0;
    loop {
        tokio::select! {
            status = child.wait() => return Ok(Ended::Exited(exit_code(status?))),
            grace = stop_requested(stop) => {
                if grace < 0 {
                    let _ = kill(pid, Signal::SIGKILL);
                    let _ = child.wait().await;
                    return Ok(Ended::Killed);
                }
                return Ok(Ended::Stopped(terminate(child, pid, grace).await?));
            }
            _ = tick.tick() => {
                seconds += 1;
                if let Some(probe) = &container.readiness_probe
                    && due(probe, seconds)
                {
                    let now_ready = probe_ok(probe, container, pod_ip).await;
                    if now_ready != ready {
                        ready = now_ready;
                        statuses.write("Running", running.clone(), last.clone(), restarts, ready).await?;
                    }
                }
                if let Some(probe) = &container.liveness_probe
                    && due(probe, seconds)
                {
                    if probe_ok(probe, container, pod_ip).await {
                        liveness_failures = 0;
                    } else {
                        liveness_failures += 1;
                        if liveness_failures >= probe.failure_threshold.unwrap_or(3) {
                            let grace = probe.termination_grace_period_seconds.unwrap_or(30);
                            return Ok(Ended::Exited(terminate(child, pid, grace).await?));
                        }
                    }
                }
            }
        }
    }
}

/// Waits until the pod is to stop; the grace period in seconds (`-1`: killed with its node, or the
/// kubelet is gone).
pub(super) async fn stop_requested(stop: &mut watch::Receiver<Option<i64>>) -> i64 {
    match stop.wait_for(Option::is_some).await {
        Ok(grace) => grace.unwrap_or(0),
        Err(_) => -1,
    }
}

fn due(probe: &Probe, seconds: i32) -> bool {
    seconds > probe.initial_delay_seconds.unwrap_or(0) && seconds % probe.period_seconds.unwrap_or(10).max(1) == 0
}

/// SIGTERM, then SIGKILL after `grace` seconds; the exit code.
async fn terminate(child: &mut tokio::process::Child, pid: Pid, grace: i64) -> anyhow::Result<i32> {
    let _ = kill(pid, Signal::SIGTERM);
    let waited = tokio::time::timeout(Duration::from_secs(grace.max(0) as u64), child.wait()).await;
    let status = match waited {
        Ok(status) => status?,
        Err(_) => {
            let _ = kill(pid, Signal::SIGKILL);
            child.wait().await?
        }
    };
    Ok(exit_code(status))
}

fn exit_code(status: std::process::ExitStatus) -> i32 {
    use std::os::unix::process::ExitStatusExt as _;
    status.code().unwrap_or_else(|| 128 + status.signal().unwrap_or(0))
}

/// One HTTP GET probe: a 2xx or 3xx answer within the probe's timeout.
async fn probe_ok(probe: &Probe, container: &Container, pod_ip: Ipv4Addr) -> bool {
    let Some(HTTPGetAction { path, port, .. }) = &probe.http_get else {
        // Exec, TCP and gRPC probes are not modelled: they pass.
        return true;
    };
    let port = match port {
        IntOrString::Int(p) => *p,
        IntOrString::String(name) => {
            match container.ports.iter().flatten().find(|p| p.name.as_deref() == Some(name.as_str())) {
                Some(p) => p.container_port,
                None => return false,
            }
        }
    };
    let timeout = Duration::from_secs(probe.timeout_seconds.unwrap_or(1).max(1) as u64);
    let path = path.clone().unwrap_or_else(|| "/".into());
    let attempt = async {
        let mut stream = tokio::net::TcpStream::connect((pod_ip, port as u16)).await.ok()?;
        let request = format!("GET {path} HTTP/1.1\r\nHost: {pod_ip}:{port}\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.ok()?;
        let mut head = vec![0u8; 64];
        let n = stream.read(&mut head).await.ok()?;
        let line = String::from_utf8_lossy(&head[..n]).into_owned();
        let code: u16 = line.split_whitespace().nth(1)?.parse().ok()?;
        Some((200..400).contains(&code))
    };
    matches!(tokio::time::timeout(timeout, attempt).await, Ok(Some(true)))
}
