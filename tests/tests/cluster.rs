//! End to end on a real Kubernetes control plane: etcd, kube-apiserver (RBAC, Node authorization,
//! admission), kube-controller-manager (Jobs, garbage collection, node lifecycle) and kube-scheduler,
//! built by `scripts/control-plane.sh build`; the test kubelet runs the pods as processes in the
//! images' roots. The operator is installed from the Helm chart with the built `helm` and runs as
//! two replicas with its ServiceAccount's token, so every call it makes passes real RBAC. The store
//! is an S3 server in this process (s3s-fs), which pods reach through the pod network's gateway.
//!
//! One cluster serves every test of this file (each test in a namespace of its own), started on
//! first use. None depends on timing: each waits for what the API server shows, with a deadline.

use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Service};
use kube::ResourceExt as _;
use kube::api::{Api, ListParams};
use pretrain_crd::PretrainRun;
use pretrain_testcluster::{ControlPlane, Kubelet, KubeletConfig, NodeConfig, Options};

const ACCESS_KEY: &str = "cluster-access";
const SECRET_KEY: &str = "cluster-secret";

/// What the tests need of the shared cluster (the cluster itself lives on its own thread).
struct Cluster {
    kubeconfig: PathBuf,
    /// The S3 endpoint as pods reach it (through the gateway).
    s3_pods: String,
    /// The S3 endpoint as this process reaches it.
    s3_local: String,
    /// The S3 server's root directory (`bucket/` inside).
    s3_root: PathBuf,
    kubectl: PathBuf,
    /// The test kubelet (to lose a node).
    kubelet: std::sync::Arc<Kubelet>,
}

/// The GPU product of the two fake GPU nodes each test that trains a gang uses alone: tests run
/// side by side on the one cluster, and a run asks for its test's product (`train.resources.gpuType`).
const GANG_GPU: &str = "NVIDIA-H100-80GB-HBM3";
const QUEUE_GPU: &str = "Test-Queue-GPU";
const LOSS_GPU: &str = "Test-Loss-GPU";
const FLAKY_GPU: &str = "Test-Flaky-GPU";
const ELASTIC_GPU: &str = "Test-Elastic-GPU";

/// The shared cluster, or `None` when `PRETRAIN_SKIP_CLUSTER` is set. Builds the control plane
/// first when `scripts/control-plane.sh build` has not (needs Go and the module proxy).
fn cluster() -> Option<&'static Cluster> {
    if std::env::var_os("PRETRAIN_SKIP_CLUSTER").is_some() {
        eprintln!("PRETRAIN_SKIP_CLUSTER is set: the test on the real control plane is skipped");
        return None;
    }
    static CLUSTER: OnceLock<Cluster> = OnceLock::new();
    Some(CLUSTER.get_or_init(|| {
        if pretrain_testcluster::control_plane::binary("kube-apiserver").is_err() {
            let script = pretrain_tests::repo().join("scripts/control-plane.sh");
            let status = std::process::Command::new("bash").arg(&script).arg("build").status().unwrap();
            assert!(
                status.success(),
                "scripts/control-plane.sh build failed (PRETRAIN_SKIP_CLUSTER=1 skips these tests)"
            );
        }
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
            runtime.block_on(async move {
                match start().await {
                    Ok((cluster, keep)) => {
                        tx.send(Ok(cluster)).unwrap();
                        // Keep the cluster up for the rest of the test process; its processes die
                        // with this thread (parent-death signal) when the process exits.
                        let _keep = keep;
                        std::future::pending::<()>().await;
                    }
                    Err(e) => tx.send(Err(format!("{e:#}"))).unwrap(),
                }
            });
        });
        rx.recv().unwrap().unwrap_or_else(|e| {
            panic!("the test cluster did not start (it needs root; PRETRAIN_SKIP_CLUSTER=1 skips these tests): {e}")
        })
    }))
}

type Keep = (tempfile::TempDir, ControlPlane, tokio::task::JoinHandle<()>);

async fn start() -> anyhow::Result<(Cluster, Keep)> {
    let bins = pretrain_tests::bin("pretrain").parent().unwrap().to_path_buf();
    remove_dead_clusters();
    let tmp = tempfile::Builder::new().prefix("pretrain-cluster-").tempdir()?;
    std::fs::write(tmp.path().join("owner.pid"), std::process::id().to_string())?;
    eprintln!("test cluster: state, logs and pod roots under {}", tmp.path().display());
    let plane = ControlPlane::start(&tmp.path().join("control-plane"), &Options::default()).await?;
    let gateway = plane.network.gateway();

    let s3_root = tmp.path().join("s3");
    std::fs::create_dir_all(s3_root.join("bucket"))?;
    let mut builder = s3s::service::S3ServiceBuilder::new(
        s3s_fs::FileSystem::new(&s3_root).map_err(|e| anyhow::anyhow!("s3s-fs: {e:?}"))?,
    );
    builder.set_auth(s3s::auth::SimpleAuth::from_single(ACCESS_KEY, SECRET_KEY));
    let service = builder.build();
    let listener = tokio::net::TcpListener::bind("0.0.0.0:0").await?;
    let port = listener.local_addr()?.port();
    let server = tokio::spawn(async move {
        loop {
            let Ok((socket, _)) = listener.accept().await else { break };
            let service = service.clone();
            tokio::spawn(async move {
                let builder = hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new());
                let _ = builder.serve_connection(hyper_util::rt::TokioIo::new(socket), service).await;
            });
        }
    });

    let mut images = pretrain_testcluster::install::images(&bins, &tmp.path().join("images"))?;
    // Kueue's manager runs as a pod too, from an image of the built binary (installed on first use).
    let (kueue, root) = pretrain_testcluster::kueue::image(&tmp.path().join("images/kueue"))?;
    images.insert(kueue, root);
    let config = KubeletConfig {
        nodes: vec![
            NodeConfig::cpu("cpu-0", "8", "32Gi"),
            NodeConfig::cpu("cpu-1", "8", "32Gi"),
            NodeConfig::gpu("gpu-0", 1, GANG_GPU),
            NodeConfig::gpu("gpu-1", 1, GANG_GPU),
            NodeConfig::gpu("queue-0", 1, QUEUE_GPU),
            NodeConfig::gpu("queue-1", 1, QUEUE_GPU),
            NodeConfig::gpu("lossy-0", 1, LOSS_GPU),
            NodeConfig::gpu("lossy-1", 1, LOSS_GPU),
            NodeConfig::gpu("flaky-0", 1, FLAKY_GPU),
            NodeConfig::gpu("flaky-1", 1, FLAKY_GPU),
            NodeConfig::gpu("elastic-0", 1, ELASTIC_GPU),
            NodeConfig::gpu("elastic-1", 1, ELASTIC_GPU),
        ],
        images,
        dir: tmp.path().join("kubelet"),
        gpu_node_env: vec![(pretrain_worker::context::ENV_TEST_CPU_FOR_GPUS.into(), "1".into())],
    };
    let kubelet = std::sync::Arc::new(Kubelet::start(&plane, config).await?);
    let kubectl = pretrain_testcluster::control_plane::binary("kubectl")?;
    let chart = pretrain_tests::repo().join("charts/pretrain-operator");
    // Preemption at once (the default waits 15 minutes), and a pass every 2 s.
    let values = ["--set", "scheduler.preemptAfterSeconds=0", "--set", "scheduler.intervalSeconds=2"];
    pretrain_testcluster::install::helm_install(&plane, &chart, &values)?;
    let cluster = Cluster {
        kubeconfig: plane.admin_kubeconfig.clone(),
        s3_pods: format!("http://{gateway}:{port}"),
        s3_local: format!("http://127.0.0.1:{port}"),
        s3_root,
        kubectl,
        kubelet,
    };
    Ok((cluster, (tmp, plane, server)))
}

/// Removes what the clusters of finished test processes left in the temporary directory (the
/// cluster lives as long as its test process, which exits without dropping it).
fn remove_dead_clusters() {
    for entry in std::fs::read_dir(std::env::temp_dir()).into_iter().flatten().flatten() {
        let path = entry.path();
        if !entry.file_name().to_string_lossy().starts_with("pretrain-cluster-") {
            continue;
        }
        let owner = std::fs::read_to_string(path.join("owner.pid")).ok().and_then(|p| p.trim().parse::<u32>().ok());
        if owner.is_none_or(|pid| !std::path::Path::new("/proc").join(pid.to_string()).exists()) {
            let _ = std::fs::remove_dir_all(&path);
        }
    }
}

impl Cluster {
    async fn client(&self) -> kube::Client {
        pretrain_testcluster::control_plane::client(&self.kubeconfig).await.unwrap()
    }

    fn kubectl(&self, args: &[&str], stdin: Option<&str>) -> std::process::Output {
        use std::io::Write as _;
        let mut child = std::process::Command::new(&self.kubectl)
            .arg(format!("--kubeconfig={}", self.kubeconfig.display()))
            .args(args)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(stdin.unwrap_or("").as_bytes()).unwrap();
        child.wait_with_output().unwrap()
    }

    /// `kubectl ARGS`, which must succeed; its stdout.
    fn kubectl_ok(&self, args: &[&str], stdin: Option<&str>) -> String {
        let out = self.kubectl(args, stdin);
        assert!(
            out.status.success(),
            "kubectl {}: {}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// A namespace with the store's Secret in it.
    fn namespace(&self, name: &str) {
        self.kubectl_ok(&["create", "namespace", name], None);
        self.kubectl_ok(
            &[
                "-n",
                name,
                "create",
                "secret",
                "generic",
                "s3",
                &format!("--from-literal=AWS_ACCESS_KEY_ID={ACCESS_KEY}"),
                &format!("--from-literal=AWS_SECRET_ACCESS_KEY={SECRET_KEY}"),
                &format!("--from-literal=AWS_ENDPOINT={}", self.s3_pods),
                "--from-literal=AWS_ALLOW_HTTP=true",
                "--from-literal=AWS_REGION=us-east-1",
            ],
            None,
        );
    }
}

/// Polls `check` every half second until it gives a value or `limit` passes.
async fn eventually<T, F, Fut>(limit: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let started = Instant::now();
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(started.elapsed() < limit, "gave up after {}s waiting for {what}", limit.as_secs());
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// The status of run `name` once it succeeded or failed.
async fn run_end(client: &kube::Client, namespace: &str, name: &str) -> pretrain_crd::PretrainRunStatus {
    let runs: Api<PretrainRun> = Api::namespaced(client.clone(), namespace);
    eventually(Duration::from_secs(900), "the run to end", || {
        let runs = runs.clone();
        async move {
            let status = runs.get(name).await.ok()?.status?;
            matches!(status.phase?, pretrain_crd::status::RunPhase::Succeeded | pretrain_crd::status::RunPhase::Failed)
                .then_some(status)
        }
    })
    .await
}

/// A small run of every stage over generated documents in the S3 store (the shape of
/// `pretrain_tests::manifest`), in `namespace`.
fn manifest(cluster: &Cluster, name: &str, namespace: &str, docs_key: &str) -> String {
    manifest_with(cluster, name, namespace, docs_key, 5120)
}

/// [`manifest`] training on `tokens` tokens.
fn manifest_with(cluster: &Cluster, name: &str, namespace: &str, docs_key: &str, tokens: u64) -> String {
    let local = tempfile::tempdir().unwrap();
    let file = pretrain_tests::manifest(local.path(), name, tokens);
    let docs = std::fs::read(local.path().join("docs.jsonl")).unwrap();
    let target = cluster.s3_root.join("bucket").join(docs_key);
    std::fs::create_dir_all(target.parent().unwrap()).unwrap();
    std::fs::write(&target, docs).unwrap();
    let text = std::fs::read_to_string(file).unwrap();
    let mut value: serde_yaml::Value = serde_yaml::from_str(&text).unwrap();
    value["metadata"]["namespace"] = namespace.into();
    value["spec"]["storage"] = serde_yaml::from_str("{url: s3://bucket/runs, secretRef: {name: s3}}").unwrap();
    value["spec"]["data"]["sources"][0]["url"] = format!("s3://bucket/{docs_key}").into();
    // What the test nodes have room for (the defaults ask for a large training machine).
    value["spec"]["train"]["resources"] = serde_yaml::from_str("{gpusPerNode: 0, cpu: '2', memory: 4Gi}").unwrap();
    serde_yaml::to_string(&value).unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn the_api_server_refuses_a_bad_manifest_with_the_field_path_and_explains_the_fields() {
    let Some(cluster) = cluster() else { return };
    cluster.namespace("schema");
    let good = manifest(cluster, "schema-run", "schema", "schema/docs.jsonl");
    let bad = good.replace("seqLen: 32", "seqLen: thirty-two");
    assert_ne!(bad, good);
    let out = cluster.kubectl(&["apply", "--dry-run=server", "-f", "-"], Some(&bad));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "the server accepted a string seqLen");
    assert!(stderr.contains("spec.train.seqLen"), "no field path in: {stderr}");
    let explained = cluster.kubectl_ok(&["explain", "pretrainrun.spec.train.seqLen"], None);
    assert!(explained.contains("seqLen") && explained.contains("integer"), "{explained}");
    cluster.kubectl_ok(&["apply", "--dry-run=server", "-f", "-"], Some(&good));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_run_applied_with_kubectl_runs_every_stage_as_jobs_and_ends_with_the_weights_of_pretrain_run() {
    let Some(cluster) = cluster() else { return };
    cluster.namespace("e2e");
    let text = manifest(cluster, "e2e", "e2e", "e2e/docs.jsonl");
    cluster.kubectl_ok(&["apply", "-f", "-"], Some(&text));

    let client = cluster.client().await;
    let status = run_end(&client, "e2e", "e2e").await;
    assert_eq!(status.phase, Some(pretrain_crd::status::RunPhase::Succeeded), "{status:#?}");

    // Every stage ran as Jobs the real Job controller completed.
    let jobs: Api<Job> = Api::namespaced(client, "e2e");
    let listed = jobs.list(&ListParams::default()).await.unwrap().items;
    for stage in ["data-prep", "tokenize", "train", "long-context", "eval"] {
        assert!(
            listed.iter().any(|j| j.labels().get("pretrain.dev/stage").map(String::as_str) == Some(stage)
                && j.status.as_ref().and_then(|s| s.succeeded).unwrap_or(0) > 0),
            "no succeeded Job for {stage}"
        );
    }
    let table = cluster.kubectl_ok(&["-n", "e2e", "get", "ptr"], None);
    assert!(table.contains("Succeeded") && table.starts_with("NAME"), "{table}");
    let described = cluster.kubectl_ok(&["-n", "e2e", "describe", "ptr", "e2e"], None);
    assert!(described.contains("Events:") && described.contains("Succeeded"), "{described}");

    // The same manifest run on this machine trains the same weights.
    let local = tempfile::tempdir().unwrap();
    let out = run_locally(cluster, &text, local.path());
    assert!(out.status.success(), "pretrain run: {}", String::from_utf8_lossy(&out.stderr));
    let ours = pretrain_tests::model_sha(&cluster.s3_root.join("bucket/runs/e2e"));
    let theirs = pretrain_tests::model_sha(&local.path().join("store/e2e"));
    assert_eq!(ours, theirs, "the cluster's weights differ from pretrain run's");
}

/// Objects under `<bucket>/runs/<run>/` in the S3 server's directory.
fn stored_files(cluster: &Cluster, run: &str) -> Vec<PathBuf> {
    let mut out = Vec::new();
    walk(&cluster.s3_root.join("bucket/runs").join(run), &mut out);
    out
}

#[tokio::test(flavor = "multi_thread")]
async fn a_deleted_run_loses_its_objects_through_owner_references_and_its_data_only_after_its_pods() {
    let Some(cluster) = cluster() else { return };
    cluster.namespace("delete");
    let mut value: serde_yaml::Value =
        serde_yaml::from_str(&manifest_with(cluster, "gone", "delete", "delete/docs.jsonl", 2_000_000)).unwrap();
    value["spec"]["storage"]["deleteOnRunDelete"] = true.into();
    cluster.kubectl_ok(&["apply", "-f", "-"], Some(&serde_yaml::to_string(&value).unwrap()));

    // Delete it while training runs and has checkpointed once: its pod checkpoints again on SIGTERM.
    let client = cluster.client().await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), "delete");
    eventually(Duration::from_secs(600), "a training pod that has checkpointed", || {
        let pods = pods.clone();
        async move {
            let listed = pods.list(&ListParams::default().labels("pretrain.dev/stage=train")).await.ok()?;
            let running =
                listed.items.iter().any(|p| p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running"));
            let checkpointed =
                stored_files(cluster, "gone").iter().any(|p| p.to_string_lossy().contains("/train/ckpt/"));
            (running && checkpointed).then_some(())
        }
    })
    .await;
    cluster.kubectl_ok(&["-n", "delete", "delete", "ptr", "gone", "--wait=true", "--timeout=300s"], None);

    // The run is gone only after its pods (the finalizer waits for them), and its data after them.
    let live = pods.list(&ListParams::default().labels("pretrain.dev/run=gone")).await.unwrap().items;
    assert!(
        live.iter().all(|p| matches!(p.status.as_ref().and_then(|s| s.phase.as_deref()), Some("Succeeded" | "Failed"))),
        "pods still running after the run was deleted: {:?}",
        live.iter().map(|p| p.name_any()).collect::<Vec<_>>()
    );
    assert_eq!(stored_files(cluster, "gone"), Vec::<PathBuf>::new(), "the run's data outlived it");

    // The garbage collector removes what the run owned.
    let jobs: Api<Job> = Api::namespaced(client.clone(), "delete");
    let services: Api<Service> = Api::namespaced(client.clone(), "delete");
    let maps: Api<ConfigMap> = Api::namespaced(client.clone(), "delete");
    let selector = ListParams::default().labels("pretrain.dev/run=gone");
    eventually(Duration::from_secs(120), "the run's Jobs, Services, ConfigMaps and pods to be collected", || {
        let (jobs, services, maps, pods, selector) =
            (jobs.clone(), services.clone(), maps.clone(), pods.clone(), selector.clone());
        async move {
            let left = jobs.list(&selector).await.ok()?.items.len()
                + services.list(&selector).await.ok()?.items.len()
                + maps.list(&selector).await.ok()?.items.len()
                + pods.list(&selector).await.ok()?.items.len();
            (left == 0).then_some(())
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn when_the_leading_operator_dies_the_other_replica_takes_over_and_creates_no_job_twice() {
    use k8s_openapi::api::coordination::v1::Lease;
    let Some(cluster) = cluster() else { return };
    cluster.namespace("failover");
    let text = manifest_with(cluster, "failover", "failover", "failover/docs.jsonl", 40_960);
    cluster.kubectl_ok(&["apply", "-f", "-"], Some(&text));
    let client = cluster.client().await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), "failover");
    eventually(Duration::from_secs(600), "a training pod", || {
        let pods = pods.clone();
        async move {
            let listed = pods.list(&ListParams::default().labels("pretrain.dev/stage=train")).await.ok()?;
            (!listed.items.is_empty()).then_some(())
        }
    })
    .await;

    // Kill the leader's process (its pod, without a grace period), mid-run.
    let leases: Api<Lease> = Api::namespaced(client.clone(), "pretrain-system");
    let holder = |lease: Lease| lease.spec.and_then(|s| s.holder_identity);
    let leader = holder(leases.get("pretrain").await.unwrap()).expect("a leader");
    cluster.kubectl_ok(&["-n", "pretrain-system", "delete", "pod", &leader, "--grace-period=0", "--force"], None);
    let next = eventually(Duration::from_secs(120), "another replica to take the lease", || {
        let (leases, leader) = (leases.clone(), leader.clone());
        async move { holder(leases.get("pretrain").await.ok()?).filter(|h| *h != leader) }
    })
    .await;
    assert_ne!(next, leader);

    let status = run_end(&client, "failover", "failover").await;
    assert_eq!(status.phase, Some(pretrain_crd::status::RunPhase::Succeeded), "{status:#?}");
    // Every stage ran once: the new leader took the Jobs over instead of starting them again.
    let jobs: Api<Job> = Api::namespaced(client, "failover");
    let names: Vec<String> =
        jobs.list(&ListParams::default()).await.unwrap().items.iter().map(|j| j.name_any()).collect();
    assert!(names.iter().all(|n| n.ends_with("-1")), "a stage was attempted again: {names:?}");
    // data-prep: map, dedup, cluster, route, write, reduce; tokenize: map, reduce; train;
    // long-context; eval.
    assert_eq!(names.len(), 11, "{names:?}");
}

/// A run of [`manifest_with`]'s shape whose train stage is a gang of `nodes` pods of one fake GPU
/// of type `gpu`, stored under `s3://bucket/<prefix>`, without the long-context stage.
fn gang_manifest(cluster: &Cluster, name: &str, namespace: &str, prefix: &str, tokens: u64, gpu: &str) -> String {
    let docs = format!("{prefix}/docs.jsonl");
    let mut value: serde_yaml::Value =
        serde_yaml::from_str(&manifest_with(cluster, name, namespace, &docs, tokens)).unwrap();
    value["spec"]["storage"]["url"] = format!("s3://bucket/{prefix}").into();
    value["spec"].as_mapping_mut().unwrap().remove("longContext");
    value["spec"]["train"]["resources"] =
        serde_yaml::from_str(&format!("{{nodes: 2, gpusPerNode: 1, gpuType: {gpu}, cpu: '1', memory: 2Gi}}")).unwrap();
    serde_yaml::to_string(&value).unwrap()
}

/// Whether the run stored under `s3://bucket/<prefix>/<run>` has committed a training checkpoint.
fn has_checkpoint(cluster: &Cluster, prefix: &str, run: &str) -> bool {
    let mut files = Vec::new();
    walk(&cluster.s3_root.join("bucket").join(prefix).join(run).join("train/ckpt"), &mut files);
    files.iter().any(|p| p.ends_with("MANIFEST.json"))
}

fn walk(dir: &std::path::Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if path.is_dir() { walk(&path, out) } else { out.push(path) }
    }
}

/// The run's training pods that run, once there are `count` of them and a checkpoint is committed.
async fn training_with_checkpoint(
    cluster: &Cluster,
    client: &kube::Client,
    namespace: &str,
    (prefix, run): (&str, &str),
    count: usize,
) -> Vec<Pod> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
    let selector = format!("pretrain.dev/run={run},pretrain.dev/stage=train");
    eventually(Duration::from_secs(900), &format!("{count} training pods of {run} and a checkpoint"), || {
        let (pods, selector) = (pods.clone(), selector.clone());
        async move {
            let listed = pods.list(&ListParams::default().labels(&selector)).await.ok()?.items;
            let running: Vec<Pod> = listed
                .into_iter()
                .filter(|p| p.metadata.deletion_timestamp.is_none())
                .filter(|p| p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running"))
                .collect();
            (running.len() == count && has_checkpoint(cluster, prefix, run)).then_some(running)
        }
    })
    .await
}

fn train_stage(status: &pretrain_crd::PretrainRunStatus) -> &pretrain_crd::status::StageStatus {
    status.stages.iter().find(|s| s.name == "train").expect("a train stage")
}

/// The sha256 of the weights train committed under `s3://bucket/<prefix>/<run>`.
fn weights(cluster: &Cluster, prefix: &str, run: &str) -> String {
    pretrain_tests::model_sha(&cluster.s3_root.join("bucket").join(prefix).join(run))
}

#[tokio::test(flavor = "multi_thread")]
async fn a_training_pod_deleted_mid_run_restarts_the_gang_from_its_checkpoint_with_the_same_weights() {
    let Some(cluster) = cluster() else { return };
    let client = cluster.client().await;
    // The same run twice, in two namespaces and stores; the two fake GPU nodes take one gang at a
    // time, so the cluster scheduler runs them one after the other.
    for namespace in ["podkill", "undisturbed"] {
        cluster.namespace(namespace);
        let text = gang_manifest(cluster, "gang", namespace, namespace, 100_000, GANG_GPU);
        cluster.kubectl_ok(&["apply", "-f", "-"], Some(&text));
    }
    let running = training_with_checkpoint(cluster, &client, "podkill", ("podkill", "gang"), 2).await;
    let victim = running[1].name_any();
    cluster.kubectl_ok(&["-n", "podkill", "delete", "pod", &victim, "--wait=false"], None);

    let disturbed = run_end(&client, "podkill", "gang").await;
    assert_eq!(disturbed.phase, Some(pretrain_crd::status::RunPhase::Succeeded), "{disturbed:#?}");
    let train = train_stage(&disturbed);
    assert!(train.attempts >= 2, "the gang did not restart: {train:?}");
    assert_eq!(train.failures, 0, "a deleted pod is not the application's failure: {train:?}");
    let reference = run_end(&client, "undisturbed", "gang").await;
    assert_eq!(reference.phase, Some(pretrain_crd::status::RunPhase::Succeeded), "{reference:#?}");
    assert_eq!(train_stage(&reference).attempts, 1, "{reference:#?}");
    // Both runs account for their time: trained steps are a share of the time the gangs held
    // their nodes, and the restarted gang's time is in its record.
    for status in [&disturbed, &reference] {
        let g = status.goodput.as_ref().unwrap_or_else(|| panic!("no goodput: {status:#?}"));
        assert!(g.productive_seconds > 0.0 && g.held_seconds > g.productive_seconds, "{g:?}");
        assert!(g.ratio > 0.0 && g.ratio <= 1.0, "{g:?}");
    }
    let time = train.time.as_ref().expect("the train stage's time");
    assert!(time.held_seconds > 0.0, "{time:?}");
    // The operator keeps the goodput beside the run's stages, for its report.
    let stored = cluster.s3_root.join("bucket/podkill/gang/goodput.json");
    let stored: pretrain_crd::status::Goodput = serde_json::from_slice(&std::fs::read(&stored).unwrap()).unwrap();
    assert_eq!(Some(&stored), disturbed.goodput.as_ref());
    assert_eq!(
        weights(cluster, "podkill", "gang"),
        weights(cluster, "undisturbed", "gang"),
        "the restarted gang ends with other weights than the undisturbed one"
    );
}

/// SIGKILLs the worker process of `pod`, which the test kubelet runs chrooted into
/// `<kubelet dir>/pods/<uid>/root`; returns how many processes it killed.
fn kill_worker(pod: &Pod) -> usize {
    let root = format!("/pods/{}/root", pod.uid().expect("a pod from the API server has a uid"));
    let mut killed = 0;
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let (Some(pid), path) = (entry.file_name().to_str().and_then(|n| n.parse::<u32>().ok()), entry.path()) else {
            continue;
        };
        let chrooted = std::fs::read_link(path.join("root")).is_ok_and(|r| r.to_string_lossy().ends_with(&root));
        let worker =
            std::fs::read(path.join("cmdline")).is_ok_and(|c| String::from_utf8_lossy(&c).contains("pretrain-worker"));
        if chrooted
            && worker
            && std::process::Command::new("kill").args(["-KILL", &pid.to_string()]).status().is_ok_and(|s| s.success())
        {
            killed += 1;
        }
    }
    killed
}

#[tokio::test(flavor = "multi_thread")]
async fn a_rank_that_dies_fails_its_attempt_and_the_peer_it_left_restarts_with_the_gang() {
    let Some(cluster) = cluster() else { return };
    let client = cluster.client().await;
    cluster.namespace("peerlost");
    let text = gang_manifest(cluster, "peers", "peerlost", "peerlost", 100_000, GANG_GPU);
    cluster.kubectl_ok(&["apply", "-f", "-"], Some(&text));
    let running = training_with_checkpoint(cluster, &client, "peerlost", ("peerlost", "peers"), 2).await;
    let (victim, peer) = (running[1].name_any(), running[0].name_any());
    assert_eq!(kill_worker(&running[1]), 1, "the worker of {victim}");

    let status = run_end(&client, "peerlost", "peers").await;
    assert_eq!(status.phase, Some(pretrain_crd::status::RunPhase::Succeeded), "{status:#?}");
    let train = train_stage(&status);
    // One failure, the killed rank's: the rank it left exits "peer lost" (76), which restarts the
    // gang from its checkpoint without counting as a second failure or being named as the cause.
    assert_eq!((train.attempts, train.failures, train.disruptions), (2, 1, 0), "{train:?}");
    let events = cluster.kubectl_ok(&["-n", "peerlost", "get", "events", "--field-selector=reason=StageFailed"], None);
    assert!(events.contains(&victim) && !events.contains(&peer), "the failure names the rank that died:\n{events}");
    let pods: Api<Pod> = Api::namespaced(client.clone(), "peerlost");
    if let Ok(pod) = pods.get(&peer).await {
        let code = pod
            .status
            .and_then(|s| s.container_statuses)
            .and_then(|c| c.first()?.state.clone()?.terminated)
            .map(|t| t.exit_code);
        assert_eq!(code, Some(pretrain_crd::contract::exit::PEER_LOST), "{peer}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_lost_node_is_evicted_and_the_gang_resumes_elsewhere_without_spending_its_restarts() {
    let Some(cluster) = cluster() else { return };
    cluster.namespace("nodeloss");
    let mut value: serde_yaml::Value =
        serde_yaml::from_str(&gang_manifest(cluster, "lossy", "nodeloss", "nodeloss", 100_000, LOSS_GPU)).unwrap();
    // One node of the two, and no restart to spare: a disruption counted as a failure fails the run.
    value["spec"]["train"]["resources"]["nodes"] = 1.into();
    value["spec"]["train"]["maxRestarts"] = 0.into();
    cluster.kubectl_ok(&["apply", "-f", "-"], Some(&serde_yaml::to_string(&value).unwrap()));
    let client = cluster.client().await;
    let running = training_with_checkpoint(cluster, &client, "nodeloss", ("nodeloss", "lossy"), 1).await;
    let node = running[0].spec.as_ref().and_then(|s| s.node_name.clone()).expect("a bound pod");
    // The machine goes away: its processes die and it stops heartbeating. The node controller
    // marks it NotReady and taints it; the taint manager evicts its pods.
    cluster.kubelet.lose(&node);

    let status = run_end(&client, "nodeloss", "lossy").await;
    assert_eq!(status.phase, Some(pretrain_crd::status::RunPhase::Succeeded), "{status:#?}");
    let train = train_stage(&status);
    assert_eq!((train.attempts, train.failures, train.disruptions), (2, 0, 1), "{train:?}");
    let pods: Api<Pod> = Api::namespaced(client.clone(), "nodeloss");
    let second = pods
        .list(&ListParams::default().labels("pretrain.dev/run=lossy,pretrain.dev/stage=train,pretrain.dev/attempt=2"))
        .await
        .unwrap()
        .items;
    assert!(
        second.iter().all(|p| p.spec.as_ref().and_then(|s| s.node_name.as_deref()) != Some(node.as_str())),
        "attempt 2 ran on the lost node {node}"
    );
    let events =
        cluster.kubectl_ok(&["-n", "nodeloss", "get", "events", "--field-selector=reason=StageDisrupted"], None);
    assert!(events.contains("lost with its node") || events.contains("DisruptionTarget"), "{events}");
}

/// Runs `manifest` with `pretrain run` on this machine, its store in `dir`, reading the documents
/// from the cluster's S3 server and training on the CPU as the fake GPU nodes do.
fn run_locally(cluster: &Cluster, manifest: &str, dir: &std::path::Path) -> std::process::Output {
    let path = dir.join("run.yaml");
    std::fs::write(&path, manifest).unwrap();
    std::process::Command::new(pretrain_tests::bin("pretrain"))
        .args(["run", &path.display().to_string(), "--store", &format!("file://{}", dir.join("store").display())])
        .env("AWS_ACCESS_KEY_ID", ACCESS_KEY)
        .env("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
        .env("AWS_ENDPOINT", &cluster.s3_local)
        .env("AWS_ALLOW_HTTP", "true")
        .env("AWS_REGION", "us-east-1")
        .env(pretrain_worker::context::ENV_TEST_CPU_FOR_GPUS, "1")
        .output()
        .unwrap()
}

/// The train Jobs of `run` in `namespace`, by attempt: `(attempt, completions)`.
async fn train_jobs(client: &kube::Client, namespace: &str, run: &str) -> Vec<(u32, i32)> {
    let jobs: Api<Job> = Api::namespaced(client.clone(), namespace);
    let selector = format!("pretrain.dev/run={run},pretrain.dev/stage=train");
    let mut out: Vec<(u32, i32)> = jobs
        .list(&ListParams::default().labels(&selector))
        .await
        .map(|l| l.items)
        .unwrap_or_default()
        .iter()
        .filter_map(|j| {
            let attempt = j.labels().get("pretrain.dev/attempt")?.parse().ok()?;
            Some((attempt, j.spec.as_ref()?.completions?))
        })
        .collect();
    out.sort_unstable();
    out
}

#[tokio::test(flavor = "multi_thread")]
async fn a_gang_that_loses_a_node_shrinks_trains_on_grows_back_and_ends_bitwise_as_an_undisturbed_run() {
    use pretrain_crd::status::RunPhase;
    let Some(cluster) = cluster() else { return };
    cluster.namespace("elastic");
    let mut value: serde_yaml::Value =
        serde_yaml::from_str(&gang_manifest(cluster, "stretch", "elastic", "elastic", 200_000, ELASTIC_GPU)).unwrap();
    // A gang of 2 that may train on 1, after waiting 5 s for a replacement.
    value["spec"]["train"]["resources"]["minNodes"] = 1.into();
    value["spec"]["train"]["resources"]["shrinkAfterSeconds"] = 5.into();
    let text = serde_yaml::to_string(&value).unwrap();
    cluster.kubectl_ok(&["apply", "-f", "-"], Some(&text));
    // The undisturbed reference: the same manifest run by `pretrain run` on this machine, one
    // process training the gang's two gradient groups.
    let local = tempfile::tempdir().unwrap();
    let reference = {
        let (text, dir) = (text.clone(), local.path().to_path_buf());
        std::thread::spawn(move || run_locally(cluster, &text, &dir))
    };
    let client = cluster.client().await;
    let runs: Api<PretrainRun> = Api::namespaced(client.clone(), "elastic");
    let running = training_with_checkpoint(cluster, &client, "elastic", ("elastic", "stretch"), 2).await;
    let node = running[1].spec.as_ref().and_then(|s| s.node_name.clone()).expect("a bound pod");
    cluster.kubelet.lose(&node);

    // No node replaces it: after 5 s the gang resumes on the one left, and keeps committing
    // checkpoints there.
    eventually(Duration::from_secs(600), "attempt 2 on one node", || {
        let client = client.clone();
        async move { train_jobs(&client, "elastic", "stretch").await.contains(&(2, 1)).then_some(()) }
    })
    .await;
    let step_at_shrink =
        runs.get("stretch").await.unwrap().status.and_then(|s| s.last_checkpoint).map_or(0, |c| c.step);
    eventually(Duration::from_secs(600), "a checkpoint of the shrunk gang", || {
        let runs = runs.clone();
        async move {
            let status = runs.get("stretch").await.ok()?.status?;
            let step = status.last_checkpoint.as_ref()?.step;
            (train_stage(&status).attempts == 2 && step > step_at_shrink).then_some(())
        }
    })
    .await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), "elastic");
    let second = pods
        .list(&ListParams::default().labels("pretrain.dev/run=stretch,pretrain.dev/stage=train,pretrain.dev/attempt=2"))
        .await
        .unwrap()
        .items;
    let env = second[0].spec.as_ref().unwrap().containers[0].env.clone().unwrap_or_default();
    let world = env.iter().find(|e| e.name == "WORLD_SIZE").and_then(|e| e.value.clone());
    assert_eq!(world.as_deref(), Some("1"), "the shrunk gang's rank is told the world of one");

    // The machine comes back: the gang checkpoints, stops and restarts on both nodes.
    cluster.kubelet.recover(&node);
    let status = run_end(&client, "elastic", "stretch").await;
    assert_eq!(status.phase, Some(RunPhase::Succeeded), "{status:#?}");
    let train = train_stage(&status);
    assert_eq!((train.attempts, train.failures, train.disruptions), (3, 0, 1), "{train:?}");
    // (The Jobs of the attempts before were deleted as they stopped.)
    assert_eq!(train_jobs(&client, "elastic", "stretch").await.last(), Some(&(3, 2)), "attempt 3 on both nodes");
    let events = cluster.kubectl_ok(&["-n", "elastic", "get", "events", "--field-selector=reason=Growing"], None);
    assert!(events.contains("grow back to 2 nodes"), "{events}");
    let log = std::fs::read_to_string(cluster.kubelet.log_path("elastic", &second[0].name_any())).unwrap();
    assert!(log.contains("checkpoint written by 2 ranks, resuming on 1"), "{log}");

    let out = reference.join().unwrap();
    assert!(out.status.success(), "pretrain run: {}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(
        weights(cluster, "elastic", "stretch"),
        pretrain_tests::model_sha(&local.path().join("store/stretch")),
        "the gang that shrank and grew ends with other weights than the undisturbed run"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_node_whose_gpu_keeps_failing_is_quarantined_avoided_and_cleared_by_an_admin() {
    use k8s_openapi::api::core::v1::Node;
    use pretrain_crd::status::RunPhase;
    let Some(cluster) = cluster() else { return };
    cluster.namespace("flaky");
    // flaky-1 is cordoned at first, so that every attempt lands on flaky-0, whose GPU is broken.
    cluster.kubectl_ok(&["cordon", "flaky-1"], None);
    let xid = "NVRM: Xid (PCI:0000:3b:00): 79, GPU has fallen off the bus";
    cluster.kubelet.break_gpus("flaky-0", xid);
    let mut value: serde_yaml::Value =
        serde_yaml::from_str(&gang_manifest(cluster, "flaky", "flaky", "flaky", 40_960, FLAKY_GPU)).unwrap();
    value["spec"]["train"]["resources"]["nodes"] = 1.into();
    value["spec"]["train"]["maxRestarts"] = 5.into();
    cluster.kubectl_ok(&["apply", "-f", "-"], Some(&serde_yaml::to_string(&value).unwrap()));
    let client = cluster.client().await;
    let nodes: Api<Node> = Api::all(client.clone());

    // Three failed attempts on flaky-0 (the chart's default) quarantine it.
    let node = eventually(Duration::from_secs(900), "flaky-0 to be quarantined", || {
        let nodes = nodes.clone();
        async move { nodes.get("flaky-0").await.ok().filter(pretrain_operator::k8s::quarantine::tainted) }
    })
    .await;
    let record = pretrain_operator::k8s::quarantine::Record::of(&node);
    assert_eq!(record.failures.len(), 3, "{record:?}");
    assert!(
        record.failures.iter().all(|f| f.attempt.starts_with("flaky/flaky/train/") && f.reason.contains("Xid")),
        "{record:?}"
    );
    let quarantined =
        &node.metadata.annotations.as_ref().unwrap()[pretrain_operator::k8s::quarantine::ANNOTATION_QUARANTINED];
    assert!(quarantined.contains("3 failed attempts within 24h00m"), "{quarantined}");
    assert_ne!(node.spec.as_ref().unwrap().unschedulable, Some(true), "cordoning is off by default");
    let events = cluster.kubectl_ok(&["get", "events", "-A", "--field-selector=reason=Quarantined"], None);
    assert!(events.contains("flaky-0") && events.contains("pretrain quarantined node flaky-0"), "{events}");
    // Avoided: with flaky-1 cordoned there is nowhere to go, and the run waits.
    let runs: Api<PretrainRun> = Api::namespaced(client.clone(), "flaky");
    eventually(Duration::from_secs(120), "the run to wait for a node", || {
        let runs = runs.clone();
        async move {
            let status = runs.get("flaky").await.ok()?.status?;
            (status.queue_position.is_some() || status.reason.as_deref().is_some_and(|r| r.contains("needs")))
                .then_some(())
        }
    })
    .await;

    // Once flaky-1 takes pods again, the run finishes there.
    cluster.kubectl_ok(&["uncordon", "flaky-1"], None);
    let status = run_end(&client, "flaky", "flaky").await;
    assert_eq!(status.phase, Some(RunPhase::Succeeded), "{status:#?}");
    let pods: Api<Pod> = Api::namespaced(client.clone(), "flaky");
    let train = train_stage(&status);
    let last = format!("pretrain.dev/run=flaky,pretrain.dev/stage=train,pretrain.dev/attempt={}", train.attempts);
    let finished = pods.list(&ListParams::default().labels(&last)).await.unwrap().items;
    assert!(
        finished.iter().all(|p| p.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some("flaky-1")),
        "the last attempt ran on flaky-1"
    );

    // An admin clears the node: the taint goes, and the failures before the quarantine no longer count.
    cluster.kubelet.repair_gpus("flaky-0");
    cluster.kubectl_ok(&["taint", "nodes", "flaky-0", "pretrain.dev/quarantined-"], None);
    let cleared = nodes.get("flaky-0").await.unwrap();
    assert!(!pretrain_operator::k8s::quarantine::tainted(&cleared));
    let policy = pretrain_operator::k8s::quarantine::Policy::default();
    let record = pretrain_operator::k8s::quarantine::Record::of(&cleared);
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64;
    assert!(record.counted(now, &policy).is_empty(), "{record:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_higher_priority_run_preempts_a_checkpointing_victim_that_waits_in_line_and_resumes() {
    use pretrain_crd::status::RunPhase;
    let Some(cluster) = cluster() else { return };
    cluster.namespace("queue");
    let queue = format!(
        "apiVersion: pretrain.dev/v1alpha1\nkind: PretrainQueue\nmetadata: {{name: research}}\nspec: {{gpuQuota: {{{QUEUE_GPU}: 2}}}}\n"
    );
    cluster.kubectl_ok(&["apply", "-f", "-"], Some(&queue));
    let run = |name: &str, tokens: u64, priority: i32| {
        let mut value: serde_yaml::Value =
            serde_yaml::from_str(&gang_manifest(cluster, name, "queue", "queue", tokens, QUEUE_GPU)).unwrap();
        value["spec"]["scheduling"] =
            serde_yaml::from_str(&format!("{{queue: research, priority: {priority}}}")).unwrap();
        serde_yaml::to_string(&value).unwrap()
    };
    // The victim trains far longer than the test lasts (it is deleted once it has resumed), so
    // that it is still training whenever the urgent run gets to its own training.
    cluster.kubectl_ok(&["apply", "-f", "-"], Some(&run("low", 20_000_000, 0)));
    let client = cluster.client().await;
    let victims = training_with_checkpoint(cluster, &client, "queue", ("queue", "low"), 2).await;

    // The urgent run needs both nodes: the scheduler asks the low one to make room.
    cluster.kubectl_ok(&["apply", "-f", "-"], Some(&run("urgent", 40_960, 100)));
    let runs: Api<PretrainRun> = Api::namespaced(client.clone(), "queue");
    // The victim checkpoints and stops, then waits in line with a reason while the urgent run trains.
    let waiting = eventually(Duration::from_secs(600), "the preempted run to wait in line", || {
        let runs = runs.clone();
        async move {
            let low = runs.get("low").await.ok()?.status?;
            (low.phase == Some(RunPhase::Suspended) && low.queue_position.is_some()).then_some(low)
        }
    })
    .await;
    let reason = waiting.reason.clone().unwrap_or_default();
    assert!(reason.starts_with("train: ") && reason.contains("needs 2"), "{reason}");
    let admitted = waiting.conditions.iter().find(|c| c.type_ == "Admitted").unwrap();
    assert_eq!(admitted.status, "False", "a preempted run waiting again is not admitted: {admitted:?}");
    assert!(admitted.reason.is_some() && admitted.observed_generation.is_some(), "{admitted:?}");
    assert_eq!(train_stage(&waiting).failures, 0, "a preemption is not a failure");
    dashboard_shows_the_wait(&client).await;
    // The run is Suspended as soon as its Jobs are stopped; its pods finish the step and checkpoint
    // on SIGTERM after that, so their logs are waited for, not read at once.
    for pod in &victims {
        let path = cluster.kubelet.log_path("queue", &pod.name_any());
        let what = format!("{} to checkpoint on SIGTERM", pod.name_any());
        eventually(Duration::from_secs(300), &what, || {
            let path = path.clone();
            async move { std::fs::read_to_string(path).ok().filter(|l| l.contains("on SIGTERM")) }
        })
        .await;
    }
    let described = cluster.kubectl_ok(&["-n", "queue", "describe", "ptr", "low"], None);
    assert!(described.contains("Preempted"), "{described}");

    // Once the urgent run is done, the victim is admitted again, resumes from its checkpoint, and
    // its waiting reason and place in line are gone.
    let urgent = run_end(&client, "queue", "urgent").await;
    assert_eq!(urgent.phase, Some(RunPhase::Succeeded), "{urgent:#?}");
    let resumed = training_with_checkpoint(cluster, &client, "queue", ("queue", "low"), 2).await;
    assert!(resumed.iter().all(|p| p.labels().get("pretrain.dev/attempt").map(String::as_str) == Some("2")));
    let status = runs.get("low").await.unwrap().status.unwrap();
    assert_eq!(status.phase, Some(RunPhase::Running), "{status:#?}");
    assert_eq!((status.reason.as_deref(), status.queue_position), (None, None), "{status:#?}");
    let admitted = status.conditions.iter().find(|c| c.type_ == "Admitted").unwrap();
    assert_eq!(admitted.status, "True", "{admitted:?}");
    let rank0 = resumed.iter().find(|p| p.name_any().contains("-train-2-0-")).expect("rank 0 of attempt 2");
    let log = eventually(Duration::from_secs(300), "attempt 2 to say where it resumed", || {
        let path = cluster.kubelet.log_path("queue", &rank0.name_any());
        async move { std::fs::read_to_string(path).ok().filter(|l| l.contains("resuming from")) }
    })
    .await;
    assert!(log.contains("train: resuming from step-"), "{log}");
    cluster.kubectl_ok(&["-n", "queue", "delete", "ptr", "low", "--wait=false"], None);
}

/// `GET path` from an operator replica's dashboard (port 8090, on its pod's address): the status
/// code and the body.
async fn dashboard_get(client: &kube::Client, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let pods: Api<Pod> = Api::namespaced(client.clone(), "pretrain-system");
    let operators = pods.list(&ListParams::default().labels("app.kubernetes.io/name=pretrain-operator")).await.unwrap();
    let ip = operators.items.iter().find_map(|p| p.status.as_ref()?.pod_ip.clone()).expect("an operator pod's address");
    let mut socket = tokio::net::TcpStream::connect((ip.as_str(), 8090)).await.unwrap();
    let request = format!("GET {path} HTTP/1.1\r\nhost: {ip}\r\nconnection: close\r\n\r\n");
    socket.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    socket.read_to_string(&mut response).await.unwrap();
    let code = response.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    (code, response.split_once("\r\n\r\n").map_or(String::new(), |(_, b)| b.to_string()))
}

/// The operator's dashboard shows the preempted run waiting, why and its place in line, and reads
/// its curves from the run's store with the run's own Secret.
async fn dashboard_shows_the_wait(client: &kube::Client) {
    let (code, body) = dashboard_get(client, "/api/runs").await;
    assert_eq!(code, 200, "{body}");
    let runs: serde_json::Value = serde_json::from_str(&body).unwrap();
    let low = runs.as_array().unwrap().iter().find(|r| r["namespace"] == "queue" && r["name"] == "low").unwrap();
    let status = &low["status"];
    assert_eq!(status["phase"], "Suspended", "{low}");
    assert!(status["queuePosition"].as_u64().is_some(), "{low}");
    assert!(status["reason"].as_str().is_some_and(|r| r.starts_with("train: ")), "{low}");
    assert!(low["store"].as_str().is_some_and(|s| s.starts_with("s3://")), "{low}");
    let (code, page) = dashboard_get(client, "/runs/queue/low").await;
    assert_eq!(code, 200, "{page}");
    assert!(page.contains("in the queue; train: ") && page.contains("Suspended"), "{page}");
    let (code, body) = dashboard_get(client, "/api/runs/queue/low/metrics/train?offset=0").await;
    assert_eq!(code, 200, "{body}");
    let chunk: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert!(!chunk["lines"].as_array().unwrap().is_empty(), "the victim's steps before its checkpoint: {chunk}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_suspended_run_checkpoints_and_stops_and_resumes_when_unsuspended() {
    use pretrain_crd::status::RunPhase;
    let Some(cluster) = cluster() else { return };
    cluster.namespace("suspend");
    let text = manifest_with(cluster, "pause", "suspend", "suspend/docs.jsonl", 100_000);
    cluster.kubectl_ok(&["apply", "-f", "-"], Some(&text));
    let client = cluster.client().await;
    training_with_checkpoint(cluster, &client, "suspend", ("runs", "pause"), 1).await;
    cluster.kubectl_ok(
        &["-n", "suspend", "patch", "ptr", "pause", "--type=merge", "-p", "{\"spec\":{\"suspend\":true}}"],
        None,
    );

    let runs: Api<PretrainRun> = Api::namespaced(client.clone(), "suspend");
    let pods: Api<Pod> = Api::namespaced(client.clone(), "suspend");
    let suspended = eventually(Duration::from_secs(600), "the run to stop its pods and read Suspended", || {
        let (runs, pods) = (runs.clone(), pods.clone());
        async move {
            let status = runs.get("pause").await.ok()?.status?;
            let live = pods.list(&ListParams::default().labels("pretrain.dev/stage=train")).await.ok()?.items;
            let stopped = live
                .iter()
                .all(|p| matches!(p.status.as_ref().and_then(|s| s.phase.as_deref()), Some("Succeeded" | "Failed")));
            (status.phase == Some(RunPhase::Suspended) && stopped).then_some(status)
        }
    })
    .await;
    let condition = |s: &pretrain_crd::PretrainRunStatus, t: &str| {
        s.conditions.iter().find(|c| c.type_ == t).map(|c| c.status.clone()).unwrap_or_default()
    };
    assert_eq!(
        (condition(&suspended, "Suspended").as_str(), condition(&suspended, "Admitted").as_str()),
        ("True", "False")
    );
    assert_eq!(train_stage(&suspended).failures, 0);

    cluster.kubectl_ok(
        &["-n", "suspend", "patch", "ptr", "pause", "--type=merge", "-p", "{\"spec\":{\"suspend\":false}}"],
        None,
    );
    let status = run_end(&client, "suspend", "pause").await;
    assert_eq!(status.phase, Some(RunPhase::Succeeded), "{status:#?}");
    let train = train_stage(&status);
    assert_eq!((train.attempts, train.failures), (2, 0), "{train:?}");
    assert_eq!(condition(&status, "Suspended"), "False");
}

/// Kueue installed in the shared cluster (once, by the first test that needs it).
async fn kueue(cluster: &'static Cluster) {
    static INSTALLED: tokio::sync::OnceCell<()> = tokio::sync::OnceCell::const_new();
    INSTALLED
        .get_or_init(|| async {
            let kubeconfig = cluster.kubeconfig.clone();
            tokio::task::spawn_blocking(move || pretrain_testcluster::kueue::install(&kubeconfig))
                .await
                .unwrap()
                .unwrap_or_else(|e| panic!("installing Kueue: {e:#}"));
        })
        .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_run_handed_to_kueue_is_queued_until_kueue_admits_its_jobs_then_succeeds() {
    use pretrain_crd::status::RunPhase;
    let Some(cluster) = cluster() else { return };
    kueue(cluster).await;
    cluster.namespace("kueue");
    // A ClusterQueue that holds every workload (stopPolicy: Hold) until the test lets it go.
    let queues = r#"apiVersion: kueue.x-k8s.io/v1beta2
kind: ResourceFlavor
metadata: {name: default-flavor}
---
apiVersion: kueue.x-k8s.io/v1beta2
kind: ClusterQueue
metadata: {name: research}
spec:
  namespaceSelector: {}
  stopPolicy: Hold
  resourceGroups:
  - coveredResources: [cpu, memory]
    flavors:
    - name: default-flavor
      resources: [{name: cpu, nominalQuota: "16"}, {name: memory, nominalQuota: 64Gi}]
---
apiVersion: kueue.x-k8s.io/v1beta2
kind: LocalQueue
metadata: {name: team, namespace: kueue}
spec: {clusterQueue: research}
"#;
    cluster.kubectl_ok(&["apply", "-f", "-"], Some(queues));
    let mut value: serde_yaml::Value =
        serde_yaml::from_str(&manifest(cluster, "kueued", "kueue", "kueue/docs.jsonl")).unwrap();
    value["spec"]["storage"]["url"] = "s3://bucket/kueue".into();
    value["spec"]["scheduling"] = serde_yaml::from_str("{kueue: {queueName: team}}").unwrap();
    cluster.kubectl_ok(&["apply", "-f", "-"], Some(&serde_yaml::to_string(&value).unwrap()));

    // Held by Kueue: the first Job exists, suspended, and the run says why it waits.
    let client = cluster.client().await;
    let runs: Api<PretrainRun> = Api::namespaced(client.clone(), "kueue");
    let held = eventually(Duration::from_secs(300), "the run to wait for Kueue", || {
        let runs = runs.clone();
        async move {
            let status = runs.get("kueued").await.ok()?.status?;
            (status.phase == Some(RunPhase::Queued)).then_some(status)
        }
    })
    .await;
    assert!(held.reason.as_deref().is_some_and(|r| r.contains("waits for Kueue") && r.contains("team")), "{held:#?}");
    let admitted = held.conditions.iter().find(|c| c.type_ == "Admitted").unwrap();
    assert_eq!(admitted.status, "False", "{admitted:?}");
    let jobs: Api<Job> = Api::namespaced(client.clone(), "kueue");
    let first = jobs.get("kueued-data-prep-map-1").await.unwrap();
    assert_eq!(first.spec.as_ref().and_then(|s| s.suspend), Some(true));
    assert_eq!(first.labels().get("kueue.x-k8s.io/queue-name").map(String::as_str), Some("team"));
    eventually(Duration::from_secs(120), "Kueue's Workload for the held Job", || async {
        let out = cluster.kubectl(&["-n", "kueue", "get", "workloads", "-o", "name"], None);
        (out.status.success() && !out.stdout.is_empty()).then_some(())
    })
    .await;

    // Released: Kueue admits each Job as it comes (it unsuspends them), and the run goes through.
    cluster.kubectl_ok(
        &["patch", "clusterqueue", "research", "--type=merge", "-p", r#"{"spec":{"stopPolicy":"None"}}"#],
        None,
    );
    let status = run_end(&client, "kueue", "kueued").await;
    assert_eq!(status.phase, Some(RunPhase::Succeeded), "{status:#?}");
    let admitted = cluster.kubectl_ok(
        &[
            "-n",
            "kueue",
            "get",
            "workloads",
            "-o",
            "jsonpath={range .items[*]}{.status.admission.clusterQueue}{\"\\n\"}{end}",
        ],
        None,
    );
    let stages = spec_job_count(&client, "kueue", "kueued").await;
    assert_eq!(
        admitted.lines().filter(|l| *l == "research").count(),
        stages,
        "every Job went through Kueue: {admitted}"
    );
}

/// How many Jobs the run created.
async fn spec_job_count(client: &kube::Client, namespace: &str, run: &str) -> usize {
    let jobs: Api<Job> = Api::namespaced(client.clone(), namespace);
    jobs.list(&ListParams::default().labels(&format!("pretrain.dev/run={run}"))).await.unwrap().items.len()
}
