//! The cluster's pod network, the way a bridge CNI plugin makes one: a Linux bridge on the host
//! holding the gateway address, and for every pod a network namespace with a veth pair into the
//! bridge and an address of its own. Pods reach each other, the API server and anything else that
//! listens on the host (the test's S3 server) through the gateway, and each may bind any port.
//!
//! There is no kube-proxy: Service cluster IPs do not route. What pods need of them is mapped in
//! one place, [`crate::kubelet`]: `KUBERNETES_SERVICE_HOST` is the gateway (the API server listens on
//! every host address), and a headless Service's `<pod>.<service>` names are written into every pod's
//! `/etc/hosts`, the way cluster DNS answers them.

use std::net::Ipv4Addr;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

use anyhow::{Context as _, bail};

/// Runs `ip` with `args`; an error with its stderr when it fails.
fn ip(args: &[&str]) -> anyhow::Result<()> {
    let output = Command::new("ip").args(args).output().context("running `ip` (iproute2)")?;
    if !output.status.success() {
        bail!("ip {}: {}", args.join(" "), String::from_utf8_lossy(&output.stderr).trim());
    }
    Ok(())
}

fn exists(kind: &str, name: &str) -> bool {
    match kind {
        "link" => Command::new("ip").args(["link", "show", name]).output().is_ok_and(|o| o.status.success()),
        _ => std::path::Path::new("/run/netns").join(name).exists(),
    }
}

/// The bridge and the address range of one cluster.
#[derive(Debug)]
pub struct Network {
    bridge: String,
    /// The second octet of `10.X.0.0/16`.
    octet: u8,
    next: AtomicU32,
}

impl Network {
    /// Creates a bridge with a free name and a free `10.X.0.0/16` range (clusters of concurrent
    /// tests each get their own); needs root (CAP_NET_ADMIN).
    pub fn create() -> anyhow::Result<Self> {
        if !nix::unistd::Uid::effective().is_root() {
            bail!("the test cluster's pod network needs root (it creates a bridge and network namespaces)");
        }
        sweep();
        // Start from the process id so that concurrent test processes rarely collide; skip taken ones.
        let start = std::process::id();
        for i in 0..200u32 {
            let octet = 100 + ((start + i) % 150) as u8;
            let bridge = format!("ptbr{octet}");
            if exists("link", &bridge) {
                continue;
            }
            if ip(&["link", "add", &bridge, "type", "bridge"]).is_err() {
                continue;
            }
            std::fs::create_dir_all(OWNERS)?;
            std::fs::write(Path::new(OWNERS).join(&bridge), std::process::id().to_string())?;
            let network = Self { bridge, octet, next: AtomicU32::new(2) };
            ip(&["addr", "add", &format!("{}/16", network.gateway()), "dev", &network.bridge])?;
            ip(&["link", "set", &network.bridge, "up"])?;
            return Ok(network);
        }
        bail!("no free bridge name ptbr100..ptbr249")
    }

    /// The host's address on the bridge: pods reach host services here.
    pub fn gateway(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, self.octet, 0, 1)
    }

    /// Creates the network namespace of a pod with a fresh address; the pod's processes enter it.
    /// `ip` can fail when many pods start at once: a failed attempt is undone and retried with
    /// fresh names, up to five times.
    pub fn pod(&self) -> anyhow::Result<PodNetwork> {
        let mut last = None;
        for attempt in 1..=5u64 {
            match self.try_pod() {
                Ok(pod) => return Ok(pod),
                Err(e) => last = Some(e),
            }
            std::thread::sleep(std::time::Duration::from_millis(100 * attempt));
        }
        Err(last.expect("an attempt failed")).context("5 attempts")
    }

    fn try_pod(&self) -> anyhow::Result<PodNetwork> {
        let n = self.next.fetch_add(1, Ordering::SeqCst);
        if n >= 65_000 {
            bail!("the pod network 10.{}.0.0/16 is full", self.octet);
        }
        let address = Ipv4Addr::new(10, self.octet, (n >> 8) as u8, (n & 0xff) as u8);
        let namespace = format!("pt{}-{n}", self.octet);
        let host_end = format!("ptv{}-{n}", self.octet);
        if exists("netns", &namespace) {
            ip(&["netns", "del", &namespace])?;
        }
        ip(&["netns", "add", &namespace])?;
        // From here on, dropping it removes what was made.
        let pod = PodNetwork { namespace, host_end, address };
        ip(&["link", "add", &pod.host_end, "type", "veth", "peer", "name", "eth0", "netns", &pod.namespace])?;
        ip(&["link", "set", &pod.host_end, "master", &self.bridge, "up"])?;
        ip(&["-n", &pod.namespace, "addr", "add", &format!("{address}/16"), "dev", "eth0"])?;
        ip(&["-n", &pod.namespace, "link", "set", "eth0", "up"])?;
        ip(&["-n", &pod.namespace, "link", "set", "lo", "up"])?;
        ip(&["-n", &pod.namespace, "route", "add", "default", "via", &self.gateway().to_string()])?;
        Ok(pod)
    }
}

impl Drop for Network {
    fn drop(&mut self) {
        let _ = ip(&["link", "del", &self.bridge]);
        let _ = std::fs::remove_file(Path::new(OWNERS).join(&self.bridge));
    }
}

/// Which process made each bridge, so that what a killed test left behind is removed by the next.
const OWNERS: &str = "/run/pretrain-testcluster";

/// Removes the bridges and pod namespaces of test processes that are gone.
fn sweep() {
    let Ok(entries) = std::fs::read_dir(OWNERS) else { return };
    for entry in entries.flatten() {
        let bridge = entry.file_name().to_string_lossy().into_owned();
        let owner: Option<i32> = std::fs::read_to_string(entry.path()).ok().and_then(|s| s.trim().parse().ok());
        let alive = owner.is_some_and(|pid| Path::new("/proc").join(pid.to_string()).exists());
        if alive {
            continue;
        }
        let _ = ip(&["link", "del", &bridge]);
        if let Some(octet) = bridge.strip_prefix("ptbr") {
            let prefix = format!("pt{octet}-");
            for ns in std::fs::read_dir("/run/netns").into_iter().flatten().flatten() {
                let name = ns.file_name().to_string_lossy().into_owned();
                if name.starts_with(&prefix) {
                    let _ = ip(&["netns", "del", &name]);
                }
            }
        }
        let _ = std::fs::remove_file(entry.path());
    }
}

/// One pod's network namespace and address; removed on drop.
#[derive(Debug)]
pub struct PodNetwork {
    /// The namespace's name (`/run/netns/<name>`).
    pub namespace: String,
    host_end: String,
    /// The pod's IP.
    pub address: Ipv4Addr,
}

impl PodNetwork {
    /// The namespace's file, for `setns`.
    pub fn path(&self) -> std::path::PathBuf {
        std::path::Path::new("/run/netns").join(&self.namespace)
    }
}

impl Drop for PodNetwork {
    fn drop(&mut self) {
        let _ = ip(&["link", "del", &self.host_end]);
        let _ = ip(&["netns", "del", &self.namespace]);
    }
}
