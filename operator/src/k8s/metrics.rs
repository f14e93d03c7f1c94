//! The operator's Prometheus metrics and its `/metrics`, `/healthz` and `/readyz` endpoint.
//!
//! Readiness and liveness say whether this replica can reach the API server: `/readyz` fails once
//! no API call has succeeded for [`READY_WITHIN`] (a replica cut off from the API server is taken out
//! of its Service), `/healthz` after [`LIVE_WITHIN`] (the kubelet restarts it, with fresh
//! connections). A leader that loses its lease exits on its own; a follower's calls are its lease
//! checks, so a healthy follower is ready too.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::AtomicU64;
use std::time::{Duration, Instant};

use pretrain_crd::status::{Goodput, GoodputLoss, RunPhase};
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Counters and gauges of the reconciler.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    reconciles: Counter,
    errors: Family<Vec<(String, String)>, Counter>,
    restarts: Counter,
    runs: Family<Vec<(String, String)>, Gauge>,
    phases: Mutex<HashMap<String, RunPhase>>,
    goodput: Family<Vec<(String, String)>, Gauge<f64, AtomicU64>>,
    held: Family<Vec<(String, String)>, Gauge<f64, AtomicU64>>,
    lost: Family<Vec<(String, String)>, Gauge<f64, AtomicU64>>,
    api_ok: Mutex<Option<Instant>>,
}

/// `/readyz` fails when the last successful API call is older than this.
pub const READY_WITHIN: Duration = Duration::from_secs(30);
/// `/healthz` fails when the last successful API call is older than this.
pub const LIVE_WITHIN: Duration = Duration::from_secs(120);

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("pretrain_operator");
        let reconciles = Counter::default();
        let errors = Family::<Vec<(String, String)>, Counter>::default();
        let restarts = Counter::default();
        let runs = Family::<Vec<(String, String)>, Gauge>::default();
        registry.register("reconciles", "Reconciles started", reconciles.clone());
        registry.register("reconcile_errors", "Reconciles that failed, by kind of error", errors.clone());
        registry.register("stage_restarts", "Stage attempts started after an earlier attempt ended", restarts.clone());
        registry.register("runs", "PretrainRuns by phase", runs.clone());
        let goodput = Family::<Vec<(String, String)>, Gauge<f64, AtomicU64>>::default();
        let held = Family::<Vec<(String, String)>, Gauge<f64, AtomicU64>>::default();
        let lost = Family::<Vec<(String, String)>, Gauge<f64, AtomicU64>>::default();
        registry.register(
            "goodput_ratio",
            "Productive training time over the time the run's training gangs held their nodes",
            goodput.clone(),
        );
        registry.register("held_gpu_hours", "GPU-hours the run's training gangs held", held.clone());
        registry.register("lost_seconds", "Seconds of the run's training stages lost, by cause", lost.clone());
        Self {
            registry,
            reconciles,
            errors,
            restarts,
            runs,
            phases: Mutex::default(),
            goodput,
            held,
            lost,
            api_ok: Mutex::default(),
        }
    }
}

impl Metrics {
    /// A call to the API server succeeded just now.
    pub fn api_ok(&self) {
        *self.api_ok.lock().expect("metrics lock") = Some(Instant::now());
    }

    /// `None` when an API call succeeded within `window`, else why not.
    pub fn api_unreachable(&self, window: Duration) -> Option<String> {
        match *self.api_ok.lock().expect("metrics lock") {
            Some(at) if at.elapsed() <= window => None,
            Some(at) => Some(format!("no successful API call for {} s\n", at.elapsed().as_secs())),
            None => Some("no successful API call yet\n".into()),
        }
    }

    /// A reconcile started.
    pub fn reconciled(&self) {
        self.reconciles.inc();
    }

    /// A reconcile failed with an error of `kind`.
    pub fn failed(&self, kind: &str) {
        self.errors.get_or_create(&vec![("kind".into(), kind.into())]).inc();
    }

    /// A stage attempt started after an earlier one ended.
    pub fn restarted(&self) {
        self.restarts.inc();
    }

    /// Run `key` (namespace/name) is now in `phase`; `None` once it is deleted.
    pub fn observe_phase(&self, key: &str, phase: Option<RunPhase>) {
        let mut phases = self.phases.lock().expect("metrics lock");
        match phase {
            Some(p) => phases.insert(key.to_string(), p),
            None => phases.remove(key),
        };
        for p in [
            RunPhase::Pending,
            RunPhase::Queued,
            RunPhase::Running,
            RunPhase::Suspended,
            RunPhase::Succeeded,
            RunPhase::Failed,
        ] {
            let n = phases.values().filter(|v| **v == p).count();
            self.runs.get_or_create(&vec![("phase".into(), format!("{p:?}"))]).set(n as i64);
        }
    }

    /// Run `key` (namespace/name) has `goodput` now; `None` once it is deleted.
    pub fn observe_goodput(&self, key: &str, goodput: Option<&Goodput>) {
        let run = || vec![("run".to_string(), key.to_string())];
        let cause = |c: &str| vec![("run".to_string(), key.to_string()), ("cause".to_string(), c.to_string())];
        let Some(g) = goodput else {
            self.goodput.remove(&run());
            self.held.remove(&run());
            for (c, _) in GoodputLoss::default().by_cause() {
                self.lost.remove(&cause(c));
            }
            return;
        };
        self.goodput.get_or_create(&run()).set(g.ratio);
        self.held.get_or_create(&run()).set(g.held_gpu_hours);
        for (c, seconds) in g.lost.by_cause() {
            self.lost.get_or_create(&cause(c)).set(seconds);
        }
    }

    /// The OpenMetrics text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        encode(&mut out, &self.registry).expect("writing to a String cannot fail");
        out
    }
}

/// Serves `GET /metrics` and `GET /healthz` (and `/readyz`) on `listener` until the process ends.
pub async fn serve(listener: tokio::net::TcpListener, metrics: std::sync::Arc<Metrics>) {
    loop {
        let Ok((mut socket, _)) = listener.accept().await else { continue };
        let metrics = std::sync::Arc::clone(&metrics);
        tokio::spawn(async move {
            let mut request = vec![0u8; 4096];
            let Ok(n) = socket.read(&mut request).await else { return };
            let line = String::from_utf8_lossy(&request[..n]);
            let path = line.split_whitespace().nth(1).unwrap_or("/");
            let (code, kind, body) = match path {
                "/metrics" => {
                    ("200 OK", "application/openmetrics-text; version=1.0.0; charset=utf-8", metrics.encode())
                }
                "/healthz" | "/readyz" => {
                    let window = if path == "/readyz" { READY_WITHIN } else { LIVE_WITHIN };
                    match metrics.api_unreachable(window) {
                        None => ("200 OK", "text/plain", "ok\n".to_string()),
                        Some(why) => ("503 Service Unavailable", "text/plain", why),
                    }
                }
                _ => ("404 Not Found", "text/plain", "not found\n".to_string()),
            };
            let response = format!(
                "HTTP/1.1 {code}\r\ncontent-type: {kind}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = socket.write_all(response.as_bytes()).await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_reconciles_errors_restarts_and_runs_by_phase() {
        let m = Metrics::default();
        m.reconciled();
        m.reconciled();
        m.failed("kube");
        m.restarted();
        m.observe_phase("ns/a", Some(RunPhase::Running));
        m.observe_phase("ns/b", Some(RunPhase::Running));
        m.observe_phase("ns/b", Some(RunPhase::Succeeded));
        let text = m.encode();
        assert!(text.contains("pretrain_operator_reconciles_total 2"), "{text}");
        assert!(text.contains("pretrain_operator_reconcile_errors_total{kind=\"kube\"} 1"), "{text}");
        assert!(text.contains("pretrain_operator_stage_restarts_total 1"), "{text}");
        assert!(text.contains("pretrain_operator_runs{phase=\"Running\"} 1"), "{text}");
        assert!(text.contains("pretrain_operator_runs{phase=\"Succeeded\"} 1"), "{text}");
        m.observe_phase("ns/a", None);
        assert!(m.encode().contains("pretrain_operator_runs{phase=\"Running\"} 0"));
        let mut g = Goodput { ratio: 0.875, held_gpu_hours: 64.0, ..Goodput::default() };
        g.lost.recomputed = 120.5;
        m.observe_goodput("ns/b", Some(&g));
        let text = m.encode();
        assert!(text.contains("pretrain_operator_goodput_ratio{run=\"ns/b\"} 0.875"), "{text}");
        assert!(text.contains("pretrain_operator_held_gpu_hours{run=\"ns/b\"} 64.0"), "{text}");
        assert!(text.contains("pretrain_operator_lost_seconds{run=\"ns/b\",cause=\"recomputed\"} 120.5"), "{text}");
        assert!(text.contains("pretrain_operator_lost_seconds{run=\"ns/b\",cause=\"admission\"} 0.0"), "{text}");
        m.observe_goodput("ns/b", None);
        assert!(!m.encode().contains("ns/b"), "a deleted run's series go");
    }

    #[tokio::test]
    async fn serves_metrics_and_health() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let metrics = std::sync::Arc::new(Metrics::default());
        metrics.reconciled();
        tokio::spawn(serve(listener, std::sync::Arc::clone(&metrics)));
        let get = |path: &'static str| async move {
            let mut socket = tokio::net::TcpStream::connect(addr).await.unwrap();
            socket.write_all(format!("GET {path} HTTP/1.1\r\nhost: x\r\n\r\n").as_bytes()).await.unwrap();
            let mut response = String::new();
            socket.read_to_string(&mut response).await.unwrap();
            response
        };
        // Before any API call succeeded, neither ready nor live.
        for path in ["/readyz", "/healthz"] {
            let response = get(path).await;
            assert!(
                response.starts_with("HTTP/1.1 503") && response.contains("no successful API call yet"),
                "{response}"
            );
        }
        metrics.api_ok();
        for (path, expect) in [
            ("/readyz", "HTTP/1.1 200"),
            ("/healthz", "HTTP/1.1 200"),
            ("/metrics", "pretrain_operator_reconciles_total 1"),
            ("/nope", "404"),
        ] {
            let response = get(path).await;
            assert!(response.contains(expect), "{path}: {response}");
        }
    }

    #[test]
    fn an_old_api_success_is_not_ready() {
        let metrics = Metrics::default();
        *metrics.api_ok.lock().unwrap() = Instant::now().checked_sub(READY_WITHIN + Duration::from_secs(5));
        assert!(metrics.api_unreachable(READY_WITHIN).is_some_and(|w| w.starts_with("no successful API call for 3")));
        assert!(metrics.api_unreachable(LIVE_WITHIN).is_none());
    }
}
