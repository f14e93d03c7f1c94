//! The names the operator's objects carry and the cluster's objects are read by: labels,
//! annotations and resources. Shared by the pure scheduler (`schedule/`) and the Kubernetes layer
//! (`k8s/`), so that neither imports the other for them.

/// The extended resource of NVIDIA GPUs.
pub const GPU_RESOURCE: &str = "nvidia.com/gpu";
/// The node label naming a node's GPU model (NVIDIA's GPU feature discovery sets it).
pub const GPU_PRODUCT_LABEL: &str = "nvidia.com/gpu.product";
/// Label: the run an object belongs to.
pub const LABEL_RUN: &str = "pretrain.dev/run";
/// Label: the stage.
pub const LABEL_STAGE: &str = "pretrain.dev/stage";
/// Label: the attempt (1-based).
pub const LABEL_ATTEMPT: &str = "pretrain.dev/attempt";
/// Label: `map` or `reduce` for sharded stages, `gang` or `single` for the others.
pub const LABEL_ROLE: &str = "pretrain.dev/role";
/// Annotation on a Job: the config hash of its stage when it was created.
pub const ANNOTATION_CONFIG_HASH: &str = "pretrain.dev/config-hash";
/// Label Kueue reads to queue a Job.
pub const LABEL_KUEUE_QUEUE: &str = "kueue.x-k8s.io/queue-name";
/// Annotation Kubernetes sets on an Indexed Job's pods.
pub const ANNOTATION_COMPLETION_INDEX: &str = "batch.kubernetes.io/job-completion-index";
