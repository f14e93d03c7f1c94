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
}

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

type Keep = (tempfile::TempDir, ControlPlane, Kubelet, tokio::task::JoinHandle<()>);

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

    let images = pretrain_testcluster::install::images(&bins, &tmp.path().join("images"))?;
    let config = KubeletConfig {
        nodes: vec![
            NodeConfig::cpu("cpu-0", "8", "32Gi"),
            NodeConfig::cpu("cpu-1", "8", "32Gi"),
            NodeConfig::gpu("gpu-0", 1, "NVIDIA-H100-80GB-HBM3"),
            NodeConfig::gpu("gpu-1", 1, "NVIDIA-H100-80GB-HBM3"),
        ],
        images,
        dir: tmp.path().join("kubelet"),
        gpu_node_env: vec![(pretrain_worker::context::ENV_TEST_CPU_FOR_GPUS.into(), "1".into())],
    };
    let kubelet = Kubelet::start(&plane, config).await?;
    let kubectl = pretrain_testcluster::control_plane::binary("kubectl")?;
    let chart = pretrain_tests::repo().join("charts/pretrain-operator");
    pretrain_testcluster::install::helm_install(&plane, &chart, &[])?;
    let cluster = Cluster {
        kubeconfig: plane.admin_kubeconfig.clone(),
        s3_pods: format!("http://{gateway}:{port}"),
        s3_local: format!("http://127.0.0.1:{port}"),
        s3_root,
        kubectl,
    };
    Ok((cluster, (tmp, plane, kubelet, server)))
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
    let path = local.path().join("run.yaml");
    std::fs::write(&path, &text).unwrap();
    let out = std::process::Command::new(pretrain_tests::bin("pretrain"))
        .args([
            "run",
            &path.display().to_string(),
            "--store",
            &format!("file://{}", local.path().join("store").display()),
        ])
        .env("AWS_ACCESS_KEY_ID", ACCESS_KEY)
        .env("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
        .env("AWS_ENDPOINT", &cluster.s3_local)
        .env("AWS_ALLOW_HTTP", "true")
        .env("AWS_REGION", "us-east-1")
        .output()
        .unwrap();
    assert!(out.status.success(), "pretrain run: {}", String::from_utf8_lossy(&out.stderr));
    let ours = pretrain_tests::model_sha(&cluster.s3_root.join("bucket/runs/e2e"));
    let theirs = pretrain_tests::model_sha(&local.path().join("store/e2e"));
    assert_eq!(ours, theirs, "the cluster's weights differ from pretrain run's");
}

/// Objects under `<bucket>/runs/<run>/` in the S3 server's directory.
fn stored_files(cluster: &Cluster, run: &str) -> Vec<PathBuf> {
    fn walk(dir: &std::path::Path, out: &mut Vec<PathBuf>) {
        for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            let path = entry.path();
            if path.is_dir() { walk(&path, out) } else { out.push(path) }
        }
    }
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
    assert_eq!(names.len(), 7, "{names:?}");
}
