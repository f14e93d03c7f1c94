//! The objects the operator creates for a run, built from its spec alone (pure: no client, no clock).
//!
//! Per run one ConfigMap holds the manifest every pod reads. Per stage attempt:
//! - data-prep and tokenize: an Indexed Job of `data.shards` map pods (`--phase map`, shard =
//!   `JOB_COMPLETION_INDEX`), then, once every map pod succeeded, a one-pod reduce Job;
//! - train and long-context: a headless Service and an Indexed Job with one pod per node, each with
//!   `gpusPerNode` GPUs, `RANK` = its index, `WORLD_SIZE` = nodes, `MASTER_ADDR` = pod 0's DNS name;
//! - eval: a one-pod Job (one GPU when training used GPUs).
//!
//! Names are deterministic (`<run>-<stage>[-map|-reduce]-<attempt>`), so applying twice is a no-op
//! and the restart of an attempt is a new name. Every object is owned by the PretrainRun, carries
//! the run/stage/attempt labels, and every pod runs non-root with a read-only root filesystem.

use std::collections::BTreeMap;

use k8s_openapi::api::batch::v1::{
    Job, JobSpec, PodFailurePolicy, PodFailurePolicyOnExitCodesRequirement, PodFailurePolicyOnPodConditionsPattern,
    PodFailurePolicyRule,
};
use k8s_openapi::api::core::v1::{
    Affinity, Capabilities, ConfigMap, ConfigMapVolumeSource, Container, EmptyDirVolumeSource, EnvFromSource, EnvVar,
    EnvVarSource, NodeAffinity, NodeSelector, NodeSelectorRequirement, NodeSelectorTerm, ObjectFieldSelector,
    PodAffinityTerm, PodAntiAffinity, PodSecurityContext, PodSpec, PodTemplateSpec, ResourceRequirements,
    SeccompProfile, SecretEnvSource, SecurityContext, Service, ServicePort, ServiceSpec, Toleration, Volume,
    VolumeMount,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta, OwnerReference};
use pretrain_crd::contract::{ENV_WORLD_SIZE, exit};
use pretrain_crd::{PretrainRun, Stage};
use sha2::{Digest, Sha256};

use crate::labels::{
    ANNOTATION_COMPLETION_INDEX, ANNOTATION_CONFIG_HASH, GPU_PRODUCT_LABEL, GPU_RESOURCE, LABEL_ATTEMPT,
    LABEL_KUEUE_QUEUE, LABEL_ROLE, LABEL_RUN, LABEL_STAGE,
};
use crate::plan::invocation::{Invocation, MASTER_PORT, Place, Value, invocation};
use crate::plan::{self, Layout, Role};

/// The field manager of every server-side apply.
pub const FIELD_MANAGER: &str = "pretrain-operator";
/// Where the manifest is mounted in every pod.
pub const SPEC_DIR: &str = "/etc/pretrain";
/// The ConfigMap key (and file name) of the manifest.
pub const SPEC_KEY: &str = "run.yaml";
/// Seconds a training pod gets between SIGTERM and SIGKILL: enough to finish a step and write a
/// checkpoint to object storage.
pub const TRAINING_GRACE_SECONDS: i64 = 600;
/// The same for the other stages (their map tasks commit per shard).
pub const GRACE_SECONDS: i64 = 60;
/// The non-root user pods run as (the distroless `nonroot` user).
pub const RUN_AS_USER: i64 = 65532;
/// Longest object name we generate: Indexed Job pods are named `<job>-<index>-<5 chars>` and their
/// hostname `<job>-<index>` must fit a 63-character DNS label.
const MAX_NAME: usize = 52;

/// `parts` joined with `-`, shortened with a hash when longer than a pod's hostname allows.
pub fn object_name(parts: &[&str]) -> String {
    let name = parts.join("-");
    if name.len() <= MAX_NAME {
        return name;
    }
    let hash = hex::encode(&Sha256::digest(name.as_bytes())[..4]);
    let keep = MAX_NAME - hash.len() - 1;
    let mut cut = name[..keep].to_string();
    while cut.ends_with('-') {
        cut.pop();
    }
    format!("{cut}-{hash}")
}

/// The ConfigMap with the run's manifest.
pub fn config_map_name(run: &str) -> String {
    object_name(&[run, "spec"])
}

/// The Job of one role of a stage attempt.
pub fn job_name(run: &str, stage: Stage, role: Role, attempt: u32) -> String {
    let attempt = attempt.to_string();
    match role {
        Role::Map
        | Role::Dedup
        | Role::Cluster
        | Role::Embed
        | Role::Order
        | Role::Route
        | Role::Write
        | Role::Reduce => object_name(&[run, stage.as_str(), role.as_str(), &attempt]),
        Role::Gang | Role::Single => object_name(&[run, stage.as_str(), &attempt]),
    }
}

/// The headless Service of a training stage's gang (shared by its attempts).
pub fn service_name(run: &str, stage: Stage) -> String {
    object_name(&[run, stage.as_str()])
}

/// Errors that make a run unrenderable.
#[derive(Debug, thiserror::Error)]
pub enum RenderError {
    /// The object has no name or namespace, or no uid (needed for owner references).
    #[error("the PretrainRun has no {0}")]
    Missing(&'static str),
    /// The manifest could not be serialised.
    #[error("serialising the manifest: {0}")]
    Yaml(#[from] serde_yaml::Error),
}

/// What every object of a run shares: its name, namespace, owner reference and manifest.
#[derive(Debug, Clone)]
pub struct RunObjects<'a> {
    run: &'a PretrainRun,
    name: String,
    namespace: String,
    owner: OwnerReference,
}

impl<'a> RunObjects<'a> {
    /// Reads the run's identity; a run without a uid (not yet stored by the API server) gets an
    /// owner reference with an empty uid, which is what `pretrain render` prints.
    pub fn new(run: &'a PretrainRun) -> Result<Self, RenderError> {
        let name = run.metadata.name.clone().ok_or(RenderError::Missing("metadata.name"))?;
        let namespace = run.metadata.namespace.clone().unwrap_or_else(|| "default".into());
        let owner = OwnerReference {
            api_version: "pretrain.dev/v1alpha1".into(),
            kind: "PretrainRun".into(),
            name: name.clone(),
            uid: run.metadata.uid.clone().unwrap_or_default(),
            controller: Some(true),
            block_owner_deletion: Some(true),
        };
        Ok(Self { run, name, namespace, owner })
    }

    /// The run's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The run's namespace.
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// The run these objects render.
    pub fn run(&self) -> &'a PretrainRun {
        self.run
    }

    fn meta(&self, name: String, labels: BTreeMap<String, String>) -> ObjectMeta {
        ObjectMeta {
            name: Some(name),
            namespace: Some(self.namespace.clone()),
            labels: Some(labels),
            owner_references: Some(vec![self.owner.clone()]),
            ..ObjectMeta::default()
        }
    }

    fn labels(&self, stage: Option<(Stage, Role, u32)>) -> BTreeMap<String, String> {
        let mut labels = BTreeMap::from([
            ("app.kubernetes.io/name".to_string(), "pretrain".to_string()),
            ("app.kubernetes.io/managed-by".to_string(), FIELD_MANAGER.to_string()),
            (LABEL_RUN.to_string(), self.name.clone()),
        ]);
        if let Some((stage, role, attempt)) = stage {
            labels.insert(LABEL_STAGE.into(), stage.as_str().into());
            labels.insert(LABEL_ROLE.into(), role.as_str().into());
            labels.insert(LABEL_ATTEMPT.into(), attempt.to_string());
        }
        labels
    }

    /// The ConfigMap holding the manifest as the worker reads it (name, namespace and spec only).
    pub fn config_map(&self) -> Result<ConfigMap, RenderError> {
        let manifest = serde_json::json!({
            "apiVersion": "pretrain.dev/v1alpha1",
            "kind": "PretrainRun",
            "metadata": {"name": self.name, "namespace": self.namespace},
            "spec": self.run.spec,
        });
        Ok(ConfigMap {
            metadata: self.meta(config_map_name(&self.name), self.labels(None)),
            data: Some(BTreeMap::from([(SPEC_KEY.to_string(), serde_yaml::to_string(&manifest)?)])),
            ..ConfigMap::default()
        })
    }

    /// The headless Service through which a training gang's pods find rank 0.
    pub fn service(&self, stage: Stage) -> Service {
        let mut selector = self.labels(None);
        selector.insert(LABEL_STAGE.into(), stage.as_str().into());
        Service {
            metadata: self.meta(service_name(&self.name, stage), selector.clone()),
            spec: Some(ServiceSpec {
                cluster_ip: Some("None".into()),
                selector: Some(selector),
                // Ranks rendezvous before they are ready.
                publish_not_ready_addresses: Some(true),
                ports: Some(vec![ServicePort {
                    name: Some("rendezvous".into()),
                    port: i32::from(MASTER_PORT),
                    ..ServicePort::default()
                }]),
                ..ServiceSpec::default()
            }),
            ..Service::default()
        }
    }

    /// The Job of `role` for attempt `attempt` of `stage`.
    pub fn job(&self, stage: Stage, role: Role, attempt: u32) -> Job {
        let spec = &self.run.spec;
        let name = job_name(&self.name, stage, role, attempt);
        let labels = self.labels(Some((stage, role, attempt)));
        let pods = plan::pods(spec, role).count;
        let pod = self.pod_spec(stage, role, &name);
        let indexed = role.is_task() || role == Role::Gang;
        let mut job_labels = labels.clone();
        let mut suspend = None;
        if let Some(kueue) = &spec.scheduling.kueue {
            // Kueue admits the Job by unsuspending it.
            job_labels.insert(LABEL_KUEUE_QUEUE.into(), kueue.queue_name.clone());
            suspend = Some(true);
        }
        let mut metadata = self.meta(name, job_labels);
        metadata.annotations =
            Some(BTreeMap::from([(ANNOTATION_CONFIG_HASH.to_string(), spec.stage_config_hash(stage))]));
        Job {
            metadata,
            spec: Some(JobSpec {
                completions: Some(pods as i32),
                parallelism: Some(pods as i32),
                completion_mode: Some(if indexed { "Indexed" } else { "NonIndexed" }.into()),
                // A task (map, dedup, route, write) is retried alone, up to MAP_TASK_RETRIES times; every other Job fails
                // at its first failed pod: restarts are the operator's decision, from the last
                // checkpoint, for the whole gang.
                backoff_limit: (!role.is_task()).then_some(0),
                backoff_limit_per_index: role.is_task().then_some(MAP_TASK_RETRIES),
                pod_failure_policy: Some(failure_policy(role)),
                suspend,
                template: PodTemplateSpec {
                    metadata: Some(ObjectMeta { labels: Some(labels), ..ObjectMeta::default() }),
                    spec: Some(pod),
                },
                ..JobSpec::default()
            }),
            ..Job::default()
        }
    }

    /// The pod of a Job named `name`: the worker container, locked down, on a GPU node when the role
    /// needs GPUs, in the gang's Service subdomain for gangs.
    fn pod_spec(&self, stage: Stage, role: Role, name: &str) -> PodSpec {
        let gpus = plan::pods(&self.run.spec, role).gpus;
        let (mounts, volumes) = self.volumes(gpus > 0);
        let node_selector = (gpus > 0)
            .then(|| self.run.spec.train.resources.gpu_type.clone())
            .flatten()
            .map(|product| BTreeMap::from([(GPU_PRODUCT_LABEL.to_string(), product)]));
        let grace = if stage.is_training() { TRAINING_GRACE_SECONDS } else { GRACE_SECONDS };
        PodSpec {
            containers: vec![self.container(stage, role, name, mounts)],
            restart_policy: Some("Never".into()),
            termination_grace_period_seconds: Some(grace),
            subdomain: (role == Role::Gang).then(|| service_name(&self.name, stage)),
            node_selector,
            // GPU nodes are commonly tainted `nvidia.com/gpu:NoSchedule` to keep other pods off.
            tolerations: (gpus > 0).then(|| {
                vec![Toleration {
                    key: Some(GPU_RESOURCE.into()),
                    operator: Some("Exists".into()),
                    effect: Some("NoSchedule".into()),
                    ..Toleration::default()
                }]
            }),
            automount_service_account_token: Some(false),
            enable_service_links: Some(false),
            security_context: Some(PodSecurityContext {
                run_as_non_root: Some(true),
                run_as_user: Some(RUN_AS_USER),
                run_as_group: Some(RUN_AS_USER),
                fs_group: Some(RUN_AS_USER),
                seccomp_profile: Some(SeccompProfile { type_: "RuntimeDefault".into(), ..SeccompProfile::default() }),
                ..PodSecurityContext::default()
            }),
            volumes: Some(volumes),
            ..PodSpec::default()
        }
    }

    /// The worker container of a Job named `name`: the stage's invocation, the store's Secret as
    /// environment, its resources, and no privileges.
    fn container(&self, stage: Stage, role: Role, name: &str, mounts: Vec<VolumeMount>) -> Container {
        let spec = &self.run.spec;
        let plan::Pods { count: pods, gpus, cpu, memory } = plan::pods(spec, role);
        let (phase, place) = match role {
            Role::Map | Role::Dedup | Role::Embed | Role::Order | Role::Route | Role::Write => {
                (Some(role.as_str()), Place::Indexed { pods, master: None })
            }
            Role::Gang => {
                let master = format!("{name}-0.{}", service_name(&self.name, stage));
                (None, Place::Indexed { pods, master: Some(master) })
            }
            Role::Cluster | Role::Reduce => (Some(role.as_str()), Place::Pod),
            Role::Single => (None, Place::Pod),
        };
        let spec_path = format!("{SPEC_DIR}/{SPEC_KEY}");
        let Invocation { args, env } = invocation(stage, &spec_path, phase, (&self.name, &spec.storage.url), place);
        let mut env: Vec<EnvVar> = env.into_iter().map(|(name, value)| env_var(name, value)).collect();
        env.extend([env_value("TMPDIR", "/tmp"), env_value("HOME", "/tmp")]);
        let env_from = spec.storage.secret_ref.as_ref().map(|secret| {
            vec![EnvFromSource {
                secret_ref: Some(SecretEnvSource { name: secret.name.clone(), optional: Some(false) }),
                ..EnvFromSource::default()
            }]
        });
        Container {
            name: "worker".into(),
            image: Some(spec.image.clone()),
            command: Some(vec!["pretrain-worker".into()]),
            args: Some(args),
            env: Some(env),
            env_from,
            resources: Some(resources(cpu, memory, gpus)),
            volume_mounts: Some(mounts),
            ports: (role == Role::Gang).then(|| {
                vec![k8s_openapi::api::core::v1::ContainerPort {
                    name: Some("rendezvous".into()),
                    container_port: i32::from(MASTER_PORT),
                    ..Default::default()
                }]
            }),
            security_context: Some(SecurityContext {
                allow_privilege_escalation: Some(false),
                read_only_root_filesystem: Some(true),
                run_as_non_root: Some(true),
                capabilities: Some(Capabilities { drop: Some(vec!["ALL".into()]), ..Capabilities::default() }),
                ..SecurityContext::default()
            }),
            termination_message_policy: Some("FallbackToLogsOnError".into()),
            ..Container::default()
        }
    }

    /// The spec (read-only, from the run's ConfigMap), a writable `/tmp`, and for GPU pods a
    /// memory-backed `/dev/shm`: NCCL exchanges buffers through shared memory, and the container
    /// default (64 MiB) is too small.
    fn volumes(&self, gpus: bool) -> (Vec<VolumeMount>, Vec<Volume>) {
        let mut mounts = vec![
            VolumeMount {
                name: "spec".into(),
                mount_path: SPEC_DIR.into(),
                read_only: Some(true),
                ..VolumeMount::default()
            },
            VolumeMount { name: "tmp".into(), mount_path: "/tmp".into(), ..VolumeMount::default() },
        ];
        let mut volumes = vec![
            Volume {
                name: "spec".into(),
                config_map: Some(ConfigMapVolumeSource {
                    name: config_map_name(&self.name),
                    ..ConfigMapVolumeSource::default()
                }),
                ..Volume::default()
            },
            Volume { name: "tmp".into(), empty_dir: Some(EmptyDirVolumeSource::default()), ..Volume::default() },
        ];
        if gpus {
            mounts.push(VolumeMount { name: "shm".into(), mount_path: "/dev/shm".into(), ..VolumeMount::default() });
            volumes.push(Volume {
                name: "shm".into(),
                empty_dir: Some(EmptyDirVolumeSource {
                    medium: Some("Memory".into()),
                    ..EmptyDirVolumeSource::default()
                }),
                ..Volume::default()
            });
        }
        (mounts, volumes)
    }

    /// Every object of the run's first attempt at each stage, in creation order: what
    /// `pretrain render` prints.
    pub fn all(&self) -> Result<Vec<Object>, RenderError> {
        let mut objects = vec![Object::ConfigMap(Box::new(self.config_map()?))];
        for stage in self.run.spec.stages() {
            let layout = plan::layout(&self.run.spec, stage);
            if matches!(layout, Layout::Gang { .. }) {
                objects.push(Object::Service(Box::new(self.service(stage))));
            }
            for &role in Role::of(layout) {
                objects.push(Object::Job(Box::new(self.job(stage, role, 1))));
            }
        }
        Ok(objects)
    }
}

/// One rendered object.
#[derive(Debug, Clone)]
pub enum Object {
    /// The manifest.
    ConfigMap(Box<ConfigMap>),
    /// A gang's headless Service.
    Service(Box<Service>),
    /// A stage's Job.
    Job(Box<Job>),
}

impl Object {
    /// The object as YAML, with its `apiVersion` and `kind`.
    pub fn to_yaml(&self) -> Result<String, serde_yaml::Error> {
        match self {
            Object::ConfigMap(o) => serde_yaml::to_string(o),
            Object::Service(o) => serde_yaml::to_string(o),
            Object::Job(o) => serde_yaml::to_string(o),
        }
    }
}

/// Every object as one multi-document YAML stream.
pub fn to_yaml_stream(objects: &[Object]) -> Result<String, serde_yaml::Error> {
    let mut out = String::new();
    for object in objects {
        out.push_str("---\n");
        out.push_str(&object.to_yaml()?);
    }
    Ok(out)
}

/// How often the Job controller retries one failed task (map, dedup, route, write) before
/// the Job fails; the other shards go on meanwhile.
pub const MAP_TASK_RETRIES: i32 = 3;

/// A Job's pod failure policy. Invalid input (exit code 2)
/// fails the whole Job at once, since no retry can help. A pod the cluster disrupted (evicted,
/// preempted, deleted by the taint manager or with its node: `DisruptionTarget`) does not count as
/// a failure: a task (map, dedup, route, write) is simply retried without spending its retries; any other Job (a gang is
/// all or nothing) fails at once, and the operator, reading the rule in the Job's condition or the
/// pod's, resumes it from the checkpoint without spending the stage's restart budget.
fn failure_policy(role: Role) -> PodFailurePolicy {
    PodFailurePolicy {
        rules: vec![
            PodFailurePolicyRule {
                action: "FailJob".into(),
                on_exit_codes: Some(PodFailurePolicyOnExitCodesRequirement {
                    container_name: Some("worker".into()),
                    operator: "In".into(),
                    values: vec![exit::INVALID],
                }),
                ..PodFailurePolicyRule::default()
            },
            PodFailurePolicyRule {
                action: if role.is_task() { "Ignore" } else { "FailJob" }.into(),
                on_pod_conditions: Some(vec![PodFailurePolicyOnPodConditionsPattern {
                    type_: "DisruptionTarget".into(),
                    status: "True".into(),
                }]),
                ..PodFailurePolicyRule::default()
            },
        ],
    }
}

/// Keeps the pods of an admitted gang on exactly the nodes the cluster scheduler chose for it, one
/// pod per node: a required node affinity on the Node's name (`matchFields` on `metadata.name`, not
/// a label a node could share or change) and a required anti-affinity between the attempt's own pods
/// on `kubernetes.io/hostname`. The Kubernetes scheduler still binds each pod. An elastic gang
/// admitted on fewer nodes than it has pods (`train.resources.minNodes`) runs that many:
/// completions, parallelism and `WORLD_SIZE` shrink with it.
pub fn place_on(job: &mut Job, nodes: &[String]) {
    shrink_to(job, nodes.len());
    let mut hosts: Vec<String> = nodes.to_vec();
    hosts.sort();
    hosts.dedup();
    let Some(spec) = job.spec.as_mut() else { return };
    let own = spec.template.metadata.as_ref().and_then(|m| m.labels.clone()).unwrap_or_default();
    let selector: BTreeMap<String, String> =
        own.into_iter().filter(|(k, _)| [LABEL_RUN, LABEL_STAGE, LABEL_ATTEMPT].contains(&k.as_str())).collect();
    let Some(pod) = spec.template.spec.as_mut() else { return };
    // A field selector takes one value per requirement: one term per node (terms are ORed).
    let terms = hosts
        .into_iter()
        .map(|host| NodeSelectorTerm {
            match_fields: Some(vec![NodeSelectorRequirement {
                key: "metadata.name".into(),
                operator: "In".into(),
                values: Some(vec![host]),
            }]),
            ..NodeSelectorTerm::default()
        })
        .collect();
    pod.affinity = Some(Affinity {
        node_affinity: Some(NodeAffinity {
            required_during_scheduling_ignored_during_execution: Some(NodeSelector { node_selector_terms: terms }),
            ..NodeAffinity::default()
        }),
        pod_anti_affinity: Some(PodAntiAffinity {
            required_during_scheduling_ignored_during_execution: Some(vec![PodAffinityTerm {
                label_selector: Some(LabelSelector { match_labels: Some(selector), ..LabelSelector::default() }),
                topology_key: "kubernetes.io/hostname".into(),
                ..PodAffinityTerm::default()
            }]),
            ..PodAntiAffinity::default()
        }),
        ..Affinity::default()
    });
}

/// An Indexed Job of more than `pods` pods becomes one of `pods`, its workers told the new world size.
fn shrink_to(job: &mut Job, pods: usize) {
    let Some(spec) = job.spec.as_mut() else { return };
    let (Some(completions), Ok(pods)) = (spec.completions, i32::try_from(pods)) else { return };
    if pods == 0 || pods >= completions || spec.completion_mode.as_deref() != Some("Indexed") {
        return;
    }
    spec.completions = Some(pods);
    spec.parallelism = Some(pods);
    let containers = spec.template.spec.iter_mut().flat_map(|p| p.containers.iter_mut());
    for var in containers.flat_map(|c| c.env.iter_mut().flatten()) {
        if var.name == ENV_WORLD_SIZE && var.value.is_some() {
            var.value = Some(pods.to_string());
        }
    }
}

fn env_value(name: &str, value: &str) -> EnvVar {
    EnvVar { name: name.into(), value: Some(value.into()), ..EnvVar::default() }
}

/// A contract variable in a pod: a literal, or the completion index from the pod's annotation.
fn env_var(name: &str, value: Value) -> EnvVar {
    match value {
        Value::Text(text) => env_value(name, &text),
        Value::CompletionIndex => EnvVar {
            name: name.into(),
            value_from: Some(EnvVarSource {
                field_ref: Some(ObjectFieldSelector {
                    field_path: format!("metadata.annotations['{ANNOTATION_COMPLETION_INDEX}']"),
                    ..ObjectFieldSelector::default()
                }),
                ..EnvVarSource::default()
            }),
            ..EnvVar::default()
        },
    }
}

/// Requests of `cpu`, `memory` and `gpus`; memory and GPUs are limits too.
fn resources(cpu: &Quantity, memory: &Quantity, gpus: u32) -> ResourceRequirements {
    let mut requests = BTreeMap::from([("cpu".to_string(), cpu.clone()), ("memory".to_string(), memory.clone())]);
    let mut limits = BTreeMap::from([("memory".to_string(), memory.clone())]);
    if gpus > 0 {
        let gpus = Quantity(gpus.to_string());
        requests.insert(GPU_RESOURCE.into(), gpus.clone());
        limits.insert(GPU_RESOURCE.into(), gpus);
    }
    ResourceRequirements { requests: Some(requests), limits: Some(limits), ..ResourceRequirements::default() }
}
