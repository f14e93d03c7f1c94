//! The operator's Prometheus metrics and its `/metrics` + `/healthz` endpoint.

use std::collections::HashMap;
use std::sync::Mutex;

use pretrain_crd::status::RunPhase;
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
}

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
        Self { registry, reconciles, errors, restarts, runs, phases: Mutex::default() }
    }
}

impl Metrics {
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
                "/healthz" | "/readyz" => ("200 OK", "text/plain", "ok\n".to_string()),
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
    }

    #[tokio::test]
    async fn serves_metrics_and_health() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let metrics = std::sync::Arc::new(Metrics::default());
        metrics.reconciled();
        tokio::spawn(serve(listener, metrics));
        for (path, expect) in
            [("/healthz", "ok"), ("/metrics", "pretrain_operator_reconciles_total 1"), ("/nope", "404")]
        {
            let mut socket = tokio::net::TcpStream::connect(addr).await.unwrap();
            socket.write_all(format!("GET {path} HTTP/1.1\r\nhost: x\r\n\r\n").as_bytes()).await.unwrap();
            let mut response = String::new();
            socket.read_to_string(&mut response).await.unwrap();
            assert!(response.contains(expect), "{path}: {response}");
        }
    }
}
