//! The reconciler: reads a PretrainRun, its Jobs and its store, asks [`decide`] what to do, and
//! does it with server-side apply (one field manager), deletes, a status patch and Events.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{ConfigMap, Node, Pod, Secret, Service};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Event as KubeEvent, EventType, Recorder, Reporter};
use kube::runtime::finalizer::{self, Event as FinalizerEvent, finalizer};
use kube::runtime::watcher;
use kube::{Client, Resource, ResourceExt};
use pretrain_crd::status::RunPhase;
use pretrain_crd::{PretrainRun, PretrainRunStatus};
use pretrain_store::Store;
use serde_json::json;

use super::metrics::Metrics;
use super::observe::{self, LABEL_JOB_NAME, PodContext};
use super::quarantine::{self, NodeFailure};
use super::render::{self, FIELD_MANAGER, RenderError, RunObjects, job_name};
use crate::labels::LABEL_RUN;
use crate::plan::cluster::{ClusterView, Decision, JobKey, JobState, JobView, LivePod, decide};
use crate::plan::{Layout, goodput, layout};

/// The finalizer that lets the operator stop a deleted run's pods and, when asked, delete its data.
pub const FINALIZER: &str = "pretrain.dev/cleanup";

/// What goes wrong in a reconcile.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The API server said no.
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    /// The store could not be read.
    #[error("store: {0}")]
    Store(#[from] pretrain_store::Error),
    /// The run could not be rendered.
    #[error(transparent)]
    Render(#[from] RenderError),
    /// The run's storage Secret is missing.
    #[error("spec.storage.secretRef: secret {namespace}/{name} not found")]
    Secret {
        /// The run's namespace.
        namespace: String,
        /// The Secret's name.
        name: String,
    },
    /// A deleted run's cleanup waits for its pods, which checkpoint during their grace period,
    /// before deleting its data (the finalizer stays until they are gone).
    #[error("waiting for {live} pods to stop before deleting the run's data")]
    PodsStopping {
        /// Pods of the run still running.
        live: usize,
    },
    /// The finalizer helper refused the run (no name).
    #[error("finalizer: {0}")]
    Finalizer(String),
}

impl Error {
    /// The label value of this error kind in metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Error::Kube(_) => "kube",
            Error::Store(_) => "store",
            Error::Render(_) => "render",
            Error::Secret { .. } => "secret",
            Error::PodsStopping { .. } => "pods-stopping",
            Error::Finalizer(_) => "finalizer",
        }
    }
}

/// Opens the store of a run with the store configuration from its Secret (a seam for tests).
pub type OpenStore = dyn Fn(&PretrainRun, &[(String, String)]) -> Result<Store, pretrain_store::Error> + Send + Sync;

/// What every reconcile shares.
pub struct Context {
    /// The API client.
    pub client: Client,
    /// Publishes Events.
    pub recorder: Recorder,
    /// Opens a run's store.
    pub open_store: Box<OpenStore>,
    /// Counters for `/metrics`.
    pub metrics: Arc<Metrics>,
    /// The clock, in Unix seconds (a seam for tests).
    pub now: Box<dyn Fn() -> i64 + Send + Sync>,
    /// Whether the operator's cluster scheduler admits GPU stages (see [`super::scheduler`]).
    pub scheduler: bool,
    /// Cluster-wide defaults for what a run leaves out.
    pub defaults: RunDefaults,
    /// Consecutive failed reconciles of each run, which set how long the next retry waits.
    pub backoff: Backoff,
    /// When a node that keeps failing attempts is quarantined.
    pub quarantine: quarantine::Policy,
}

/// Per-run exponential backoff of failed reconciles, as controller-runtime's default rate limiter
/// does it: the first retry after 500 ms, each further one twice as late, at most 5 minutes; a
/// reconcile that succeeds starts the run's count again.
#[derive(Debug, Default)]
pub struct Backoff {
    failures: std::sync::Mutex<BTreeMap<String, u32>>,
}

impl Backoff {
    /// The first wait.
    pub const BASE: Duration = Duration::from_millis(500);
    /// The longest wait.
    pub const CAP: Duration = Duration::from_secs(300);

    /// Counts a failure of `key` and returns how long to wait before its next reconcile.
    pub fn failed(&self, key: &str) -> Duration {
        let mut failures = self.failures.lock().expect("the backoff lock is never poisoned");
        let n = failures.entry(key.to_string()).or_insert(0);
        *n = n.saturating_add(1);
        Self::BASE.saturating_mul(1u32 << (*n - 1).min(20)).min(Self::CAP)
    }

    /// Forgets the failures of `key`, after a reconcile that succeeded.
    pub fn succeeded(&self, key: &str) {
        self.failures.lock().expect("the backoff lock is never poisoned").remove(key);
    }
}

/// The key a run's backoff is counted under.
fn backoff_key(run: &PretrainRun) -> String {
    format!("{}/{}", run.namespace().unwrap_or_default(), run.name_any())
}

/// What the operator fills in for runs that leave it out (set from the Helm chart's values).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RunDefaults {
    /// The worker image of runs that keep the built-in default `spec.image`.
    pub worker_image: Option<String>,
    /// The Secret (in the run's namespace) with store credentials for runs without
    /// `spec.storage.secretRef`.
    pub storage_secret: Option<String>,
}

impl RunDefaults {
    /// `run` with the defaults filled in.
    pub fn apply(&self, run: &PretrainRun) -> PretrainRun {
        let mut run = run.clone();
        if let Some(image) = &self.worker_image
            && run.spec.image == pretrain_crd::spec::default_image()
        {
            run.spec.image.clone_from(image);
        }
        if let Some(secret) = &self.storage_secret
            && run.spec.storage.secret_ref.is_none()
        {
            run.spec.storage.secret_ref = Some(pretrain_crd::spec::SecretRef { name: secret.clone() });
        }
        run
    }
}

impl std::fmt::Debug for Context {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Context").finish_non_exhaustive()
    }
}

impl Context {
    /// A context for the cluster the client talks to, opening each run's store with the credentials
    /// of the run's own Secret and nothing of this process's environment: a run reaches only what
    /// its Secret grants, never what the operator's identity could.
    pub fn new(client: Client, metrics: Arc<Metrics>) -> Self {
        let reporter = Reporter { controller: FIELD_MANAGER.into(), instance: std::env::var("POD_NAME").ok() };
        Self {
            recorder: Recorder::new(client.clone(), reporter),
            client,
            open_store: Box::new(|run, options| {
                let options: Vec<(&str, &str)> = options.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
                Store::open_isolated(&run.spec.storage.url, &options)
            }),
            metrics,
            now: Box::new(|| jiff::Timestamp::now().as_second()),
            scheduler: true,
            defaults: RunDefaults::default(),
            backoff: Backoff::default(),
            quarantine: quarantine::Policy::default(),
        }
    }
}

/// One reconcile of `run`, in kube-runtime's finalizer helper: a new run first gets our finalizer
/// (and nothing else: the write brings the run back), a live run is reconciled ([`apply_run`]), a
/// deleted one cleaned up ([`cleanup`]) before the finalizer is removed.
#[tracing::instrument(name = "reconcile", skip_all, fields(run = %run.name_any(), namespace = %run.namespace().unwrap_or_default()))]
pub async fn reconcile(run: Arc<PretrainRun>, ctx: Arc<Context>) -> Result<Action, Error> {
    ctx.metrics.reconciled();
    let rendered = ctx.defaults.apply(&run);
    let objects = RunObjects::new(&rendered)?;
    let runs: Api<PretrainRun> = Api::namespaced(ctx.client.clone(), objects.namespace());
    finalizer(&runs, FINALIZER, run, |event| async {
        match event {
            FinalizerEvent::Apply(run) => apply_run(&run, &objects, ctx.as_ref()).await,
            FinalizerEvent::Cleanup(run) => cleanup(&run, &objects, ctx.as_ref()).await,
        }
    })
    .await
    .map_err(|e| match e {
        finalizer::Error::ApplyFailed(e) | finalizer::Error::CleanupFailed(e) => e,
        finalizer::Error::AddFinalizer(e) | finalizer::Error::RemoveFinalizer(e) => Error::Kube(e),
        other => Error::Finalizer(other.to_string()),
    })
}

/// Reconciles a live run (`objects`: its rendering, the cluster's defaults applied): decides from its
/// Jobs, pods and store what to create and stop, does it, and writes the status and Events.
async fn apply_run(run: &PretrainRun, objects: &RunObjects<'_>, ctx: &Context) -> Result<Action, Error> {
    let (name, ns) = (objects.name().to_string(), objects.namespace().to_string());
    let runs: Api<PretrainRun> = Api::namespaced(ctx.client.clone(), &ns);
    let status = run.status.clone().unwrap_or_default();
    if let Err(errors) = pretrain_crd::validate_spec(&run.spec) {
        let mut failed = status.clone();
        failed.phase = Some(RunPhase::Failed);
        failed.reason = Some(format!("invalid spec: {errors}"));
        failed.observed_generation = run.metadata.generation;
        if run.status.as_ref() != Some(&failed) {
            patch_status(&runs, run, &failed).await?;
            publish(ctx, run, true, "InvalidSpec", format!("invalid spec: {errors}")).await;
        }
        return Ok(Action::await_change());
    }

    let store = open_store(ctx, objects.run()).await?;
    let stored = observe::store_state(&store, &name, &run.spec).await?;
    let (views, live_pods, now, suspects) = observe_jobs(ctx, run, &ns, &name).await?;
    for (node, failure) in suspects {
        // Best effort: a refused write is tried again by the next reconcile, which sees the attempt.
        if let Err(e) = quarantine::record(&ctx.client, &ctx.recorder, &ctx.quarantine, &node, failure).await {
            tracing::warn!(node, error = %e, "recording a node failure failed");
        }
    }
    let view = ClusterView {
        spec: &run.spec,
        generation: run.metadata.generation,
        status: &status,
        committed: &stored.committed,
        jobs: &views,
        checkpoint: stored.checkpoint,
        now,
        scheduler: ctx.scheduler,
        live_pods: &live_pods,
        ledgers: &stored.ledgers,
    };
    let decision = decide(&view);
    if let Some(goodput) = decision.status.goodput.as_ref().filter(|g| Some(*g) != status.goodput.as_ref()) {
        // Beside the run's stages, so that its report carries it too.
        let json = serde_json::to_vec_pretty(goodput).expect("goodput serialises");
        store.put(&pretrain_store::key(&goodput::key(&name))?, json.into()).await?;
    }
    enact(run, objects, &decision, ctx).await?;
    ctx.metrics.observe_phase(&format!("{ns}/{name}"), decision.status.phase);
    ctx.metrics.observe_goodput(&format!("{ns}/{name}"), decision.status.goodput.as_ref());
    if decision.status != status {
        match patch_status(&runs, run, &decision.status).await {
            // Decided from a copy of the run older than the server's (the cache lags behind a
            // write): decide again from the newer one, or counters written since would be lost.
            Err(Error::Kube(kube::Error::Api(e))) if e.code == 409 => {
                return Ok(Action::requeue(Duration::from_secs(1)));
            }
            other => other?,
        }
    }
    for event in &decision.events {
        if event.reason == "StageRestarted" {
            ctx.metrics.restarted();
        }
        publish(ctx, run, event.warning, event.reason, event.note.clone()).await;
    }
    Ok(decision.requeue_after.map_or_else(Action::await_change, |s| Action::requeue(Duration::from_secs(s))))
}

/// What one look at a run's Jobs and pods found.
type Observed = (Vec<JobView>, Vec<LivePod>, i64, Vec<(String, NodeFailure)>);

/// The run's Jobs as the planner sees them (with their pods' outcomes), its pods still running, the
/// clock, and the nodes its failed or lost attempts point at.
async fn observe_jobs(ctx: &Context, run: &PretrainRun, ns: &str, name: &str) -> Result<Observed, Error> {
    let selector = ListParams::default().labels(&format!("{LABEL_RUN}={name}"));
    let jobs: Api<Job> = Api::namespaced(ctx.client.clone(), ns);
    let listed = jobs.list(&selector).await?;
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), ns);
    let run_pods = pods.list(&selector).await?.items;
    let cluster = pod_context(ctx, &run_pods).await?;
    let (mut views, mut suspects) = (Vec::new(), Vec::new());
    for job in &listed.items {
        let job_name = job.name_any();
        let own: Vec<Pod> =
            run_pods.iter().filter(|p| p.labels().get(LABEL_JOB_NAME) == Some(&job_name)).cloned().collect();
        let Some(view) = observe::job_view(job, &run.spec, &own, &cluster) else { continue };
        if matches!(view.state, JobState::Failed(_) | JobState::Lost(_)) {
            let attempt = format!("{ns}/{name}/{}/{}", view.stage, view.attempt);
            for (node, reason) in quarantine::node_failures(&own, &cluster) {
                suspects.push((node, NodeFailure { at: cluster.now, attempt: attempt.clone(), reason }));
            }
        }
        views.push(view);
    }
    let live_pods = run_pods.iter().filter(|p| !cluster.settled(p)).filter_map(observe::live_pod).collect();
    Ok((views, live_pods, cluster.now, suspects))
}

/// Creates and stops what `decision` says, in order: the manifest, a gang's Service, the Jobs.
async fn enact(run: &PretrainRun, objects: &RunObjects<'_>, decision: &Decision, ctx: &Context) -> Result<(), Error> {
    let ns = objects.namespace();
    let ssa = PatchParams::apply(FIELD_MANAGER).force();
    let jobs: Api<Job> = Api::namespaced(ctx.client.clone(), ns);
    for key in &decision.stop {
        stop_job(&jobs, &job_name(objects.name(), key.stage, key.role, key.attempt)).await?;
    }
    if decision.create.is_empty() {
        return Ok(());
    }
    let config_map = objects.config_map()?;
    let config_maps: Api<ConfigMap> = Api::namespaced(ctx.client.clone(), ns);
    config_maps.patch(&config_map.name_any(), &ssa, &Patch::Apply(&config_map)).await?;
    for &JobKey { stage, role, attempt } in &decision.create {
        if matches!(layout(&run.spec, stage), Layout::Gang { .. }) {
            let service = objects.service(stage);
            let services: Api<Service> = Api::namespaced(ctx.client.clone(), ns);
            services.patch(&service.name_any(), &ssa, &Patch::Apply(&service)).await?;
        }
        let mut job = objects.job(stage, role, attempt);
        let admission = decision.status.admission.as_ref();
        if let Some(a) = admission.filter(|a| a.stage == stage.as_str() && a.attempt == attempt) {
            render::place_on(&mut job, &a.nodes);
        }
        jobs.patch(&job.name_any(), &ssa, &Patch::Apply(&job)).await?;
    }
    Ok(())
}

/// A deleted run: stop its Jobs (their pods checkpoint), delete its store data when the spec asks,
/// once no pod of it runs. Owner references delete the Jobs, Services and ConfigMap afterwards.
async fn cleanup(run: &PretrainRun, objects: &RunObjects<'_>, ctx: &Context) -> Result<Action, Error> {
    let name = objects.name();
    let jobs: Api<Job> = Api::namespaced(ctx.client.clone(), objects.namespace());
    let listed = jobs.list(&ListParams::default().labels(&format!("{LABEL_RUN}={name}"))).await?;
    for job in listed.items.iter().filter(|j| observe::job_outcome(j).is_none()) {
        stop_job(&jobs, &job.name_any()).await?;
    }
    if run.spec.storage.delete_on_run_delete {
        // Stopped pods checkpoint during their grace period: the data goes only after every pod.
        let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), objects.namespace());
        let listed = pods.list(&ListParams::default().labels(&format!("{LABEL_RUN}={name}"))).await?.items;
        let cluster = pod_context(ctx, &listed).await?;
        let live = listed.iter().filter(|p| !cluster.settled(p)).count();
        if live > 0 {
            return Err(Error::PodsStopping { live });
        }
        let store = open_store(ctx, objects.run()).await?;
        let prefix = pretrain_store::key(name)?;
        let removed = store.delete_prefix(&prefix).await?;
        publish(ctx, run, false, "DataDeleted", format!("deleted {removed} objects under {}", store.url())).await;
    }
    ctx.metrics.observe_phase(&format!("{}/{name}", objects.namespace()), None);
    ctx.metrics.observe_goodput(&format!("{}/{name}", objects.namespace()), None);
    Ok(Action::await_change())
}

/// The clock and the readiness of the nodes of `pods` that are being deleted (the only ones
/// [`PodContext::settled`] asks about): a node that is gone counts as not Ready.
async fn pod_context(ctx: &Context, pods: &[Pod]) -> Result<PodContext, Error> {
    let mut cluster = PodContext { now: (ctx.now)(), ..PodContext::default() };
    let nodes: BTreeSet<&str> = pods
        .iter()
        .filter(|p| p.metadata.deletion_timestamp.is_some())
        .filter_map(|p| p.spec.as_ref()?.node_name.as_deref())
        .collect();
    let api: Api<Node> = Api::all(ctx.client.clone());
    for name in nodes {
        let ready = api.get_opt(name).await?.is_some_and(|node| {
            let conditions = node.status.and_then(|s| s.conditions).unwrap_or_default();
            conditions.iter().any(|c| c.type_ == "Ready" && c.status == "True")
        });
        if !ready {
            cluster.unready_nodes.insert(name.to_string());
        }
    }
    Ok(cluster)
}

/// Opens `run`'s store (defaults applied) with the store configuration in its storage Secret.
pub(crate) async fn open_store(ctx: &Context, run: &PretrainRun) -> Result<Store, Error> {
    let mut vars = Vec::new();
    if let Some(secret) = &run.spec.storage.secret_ref {
        let namespace = run.namespace().unwrap_or_else(|| "default".into());
        let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &namespace);
        let Some(found) = secrets.get_opt(&secret.name).await? else {
            return Err(Error::Secret { namespace, name: secret.name.clone() });
        };
        for (key, value) in found.data.unwrap_or_default() {
            vars.push((key, String::from_utf8_lossy(&value.0).into_owned()));
        }
    }
    let options = Store::env_options(&run.spec.storage.url, &vars);
    Ok((ctx.open_store)(run, &options)?)
}

/// Deletes a Job with background propagation, so its pods get SIGTERM and their grace period to
/// checkpoint; one already gone is fine.
async fn stop_job(jobs: &Api<Job>, name: &str) -> Result<(), Error> {
    match jobs.delete(name, &DeleteParams::background()).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 404 => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Applies the reconciler's part of the status of `run`, as of the version of `run` it was decided
/// from: the API server refuses the write (409) if the run changed since, so a decision made from a
/// stale cache never overwrites a newer status (attempts, failures and disruptions written since).
/// `admission` and `preemption` belong to the cluster scheduler (it merge-patches them): they are
/// left out.
async fn patch_status(runs: &Api<PretrainRun>, run: &PretrainRun, status: &PretrainRunStatus) -> Result<(), Error> {
    let ours = PretrainRunStatus { admission: None, preemption: None, ..status.clone() };
    let mut patch = json!({"apiVersion": "pretrain.dev/v1alpha1", "kind": "PretrainRun", "status": ours});
    if let Some(version) = run.resource_version() {
        patch["metadata"] = json!({"resourceVersion": version});
    }
    let name = run.name_any();
    runs.patch_status(&name, &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(&patch)).await?;
    Ok(())
}

/// Records an Event on the run; a failure to record one never fails the reconcile.
async fn publish(ctx: &Context, run: &PretrainRun, warning: bool, reason: &str, mut note: String) {
    // The API server refuses notes over 1 kB.
    if note.len() > 1000 {
        let end = (0..=1000).rev().find(|i| note.is_char_boundary(*i)).unwrap_or(0);
        note.truncate(end);
        note.push('…');
    }
    let event = KubeEvent {
        type_: if warning { EventType::Warning } else { EventType::Normal },
        reason: reason.into(),
        note: Some(note),
        action: "Reconcile".into(),
        secondary: None,
    };
    if let Err(e) = ctx.recorder.publish(&event, &run.object_ref(&())).await {
        tracing::warn!(run = %run.name_any(), reason, error = %e, "recording an event failed");
    }
}

/// What to do after a failed reconcile: count it and retry after the run's backoff ([`Backoff`]).
/// (The controller runtime hands the run and context over by value.)
#[allow(clippy::needless_pass_by_value)]
pub fn error_policy(run: Arc<PretrainRun>, error: &Error, ctx: Arc<Context>) -> Action {
    let (name, namespace) = (run.name_any(), run.namespace().unwrap_or_default());
    if let Error::PodsStopping { .. } = error {
        // Not a failure: the cleanup looks again shortly.
        tracing::info!(run = name, namespace, "{error}");
        return Action::requeue(Duration::from_secs(2));
    }
    ctx.metrics.failed(error.kind());
    tracing::error!(run = name, namespace, error = %error, "reconcile failed");
    let wait = ctx.backoff.failed(&backoff_key(&run));
    // A refusal the user can act on (an object the API server finds invalid, a missing Secret)
    // shows in `kubectl describe`, not only in the operator's log.
    let refused = match error {
        Error::Kube(kube::Error::Api(e)) => (400..500).contains(&e.code) && e.code != 409,
        Error::Secret { .. } | Error::Render(_) | Error::Finalizer(_) => true,
        Error::Kube(_) | Error::Store(_) | Error::PodsStopping { .. } => false,
    };
    if refused && let Ok(handle) = tokio::runtime::Handle::try_current() {
        let note = error.to_string();
        handle.spawn(async move { publish(&ctx, &run, true, "ReconcileFailed", note).await });
    }
    Action::requeue(wait)
}

/// Logs as JSON lines on stdout (the operator process's), at the level `RUST_LOG` sets (`info` by
/// default): each line carries the reconcile span's run and namespace.
pub fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt().json().with_env_filter(filter).with_current_span(true).try_init();
}

/// Runs the controller until SIGTERM or Ctrl-C: PretrainRuns and the Jobs they own, every namespace.
pub async fn run(ctx: Arc<Context>) {
    let client = ctx.client.clone();
    let runs: Api<PretrainRun> = Api::all(client.clone());
    let jobs: Api<Job> = Api::all(client);
    Controller::new(runs, watcher::Config::default())
        .owns(jobs, watcher::Config::default().labels(LABEL_RUN))
        .shutdown_on_signal()
        .run(
            |run, ctx| async move {
                let key = backoff_key(&run);
                let action = reconcile(run, Arc::clone(&ctx)).await?;
                ctx.backoff.succeeded(&key);
                Ok(action)
            },
            error_policy,
            ctx,
        )
        .for_each(|result| async move {
            if let Err(e) = result {
                tracing::warn!(error = %e, "controller");
            }
        })
        .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failed_reconciles_back_off_exponentially_per_run_until_one_succeeds() {
        let backoff = Backoff::default();
        let waits: Vec<Duration> = (0..12).map(|_| backoff.failed("ns/a")).collect();
        assert_eq!(waits[..4], [500, 1000, 2000, 4000].map(Duration::from_millis));
        assert_eq!(waits[11], Backoff::CAP);
        assert_eq!(backoff.failed("ns/b"), Backoff::BASE, "each run counts its own failures");
        backoff.succeeded("ns/a");
        assert_eq!(backoff.failed("ns/a"), Backoff::BASE);
    }

    #[test]
    fn cluster_defaults_fill_in_only_what_a_run_leaves_out() {
        let run: PretrainRun = pretrain_crd::parse(
            "apiVersion: pretrain.dev/v1alpha1\nkind: PretrainRun\nmetadata: {name: r}\nspec:\n  storage: {url: s3://b/runs}\n  data: {sources: [{name: web, url: s3://b/raw.jsonl}]}\n",
            "r.yaml",
        )
        .unwrap();
        let defaults =
            RunDefaults { worker_image: Some("registry.example/worker:2".into()), storage_secret: Some("s3".into()) };
        let filled = defaults.apply(&run);
        assert_eq!(filled.spec.image, "registry.example/worker:2");
        assert_eq!(filled.spec.storage.secret_ref.as_ref().map(|s| s.name.as_str()), Some("s3"));
        let mut own = run.clone();
        own.spec.image = "mine:1".into();
        own.spec.storage.secret_ref = Some(pretrain_crd::spec::SecretRef { name: "mine".into() });
        assert_eq!(defaults.apply(&own), own);
        assert_eq!(RunDefaults::default().apply(&run), run);
    }
}
