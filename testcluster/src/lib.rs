//! A real Kubernetes control plane for the operator's tests, and the test kubelet that runs its pods.
//!
//! [`ControlPlane`] starts etcd, kube-apiserver, kube-controller-manager and kube-scheduler (built from
//! their Go modules by `scripts/control-plane.sh build`) on this machine; [`Kubelet`] registers fake
//! nodes, GPU nodes among them, and runs the pods bound to them as real processes, each in its own
//! network namespace and root file system. [`image`] builds the root file systems of the project's
//! CPU images and [`oci`] packs them as OCI image archives, from which the kubelet runs its pods.
//! Everything needs root (network namespaces, chroot).

pub mod control_plane;
pub mod image;
pub mod install;
pub mod kubelet;
pub mod kueue;
pub mod network;
pub mod oci;
pub mod pki;
pub mod pod;
pub mod process;
mod sys;

pub use control_plane::{ControlPlane, Options};
pub use kubelet::{Config as KubeletConfig, Kubelet, NodeConfig};
