//! The live dashboard: one small read-only web site over the runs a [`Source`] knows (the cluster's
//! PretrainRuns for the operator, the store's run state for `pretrain run --ui`) and what their
//! stores hold. Pages are rendered on the server ([`page`]); a small script refreshes their parts
//! and draws the training curves from `metrics.jsonl`, read incrementally ([`data`]). Nothing on it
//! writes, and no secret reaches it: store URLs lose their credentials and query.
//!
//! - `/`: every run: phase, stage, goodput and why it waits;
//! - `/runs/{namespace}/{name}`: one run: stage timeline, curves, data funnel, compression, eval;
//! - `/parts/...`: those pages' changing parts, as HTML, for the script;
//! - `/api/runs` and `/api/runs/{namespace}/{name}/metrics/{stage}?offset=&mark=`: JSON.

pub mod data;
mod page;

use std::sync::Arc;

use axum::Router;
use axum::extract::{Path, Query, State};
use axum::http::{StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use pretrain_crd::Stage;
use pretrain_crd::status::PretrainRunStatus;
use pretrain_store::Store;
use serde::Serialize;

/// A run as the dashboard shows it.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RunEntry {
    /// Its namespace; [`LOCAL`] for runs on this machine.
    pub namespace: String,
    /// `metadata.name`.
    pub name: String,
    /// Its stages, in order.
    pub stages: Vec<Stage>,
    /// Where it stands.
    pub status: PretrainRunStatus,
    /// Its store's URL, without credentials ([`redact`]).
    pub store: String,
}

/// The namespace of runs on this machine.
pub const LOCAL: &str = "local";

/// Where the dashboard's runs come from.
#[async_trait::async_trait]
pub trait Source: Send + Sync + 'static {
    /// Every run, in the order the dashboard lists them.
    async fn runs(&self) -> Result<Vec<RunEntry>, String>;
    /// The store of run `name` in `namespace`; `None` when there is no such run.
    async fn store(&self, namespace: &str, name: &str) -> Result<Option<Store>, String>;
    /// Where the runs are, for the page's heading.
    fn place(&self) -> String;
}

type Shared = Arc<dyn Source>;

/// The dashboard's routes over `source`.
pub fn router(source: Shared) -> Router {
    Router::new()
        .route("/", get(index))
        .route("/runs/{namespace}/{name}", get(run_page))
        .route("/parts/runs", get(runs_part))
        .route("/parts/runs/{namespace}/{name}/status", get(status_part))
        .route("/parts/runs/{namespace}/{name}/outputs", get(outputs_part))
        .route("/api/runs", get(runs_json))
        .route("/api/runs/{namespace}/{name}/metrics/{stage}", get(metrics_json))
        .route("/static/dashboard.js", get(|| async { asset("text/javascript", page::SCRIPT) }))
        .route("/static/dashboard.css", get(|| async { asset("text/css", page::STYLE) }))
        .route("/healthz", get(|| async { "ok\n" }))
        .with_state(source)
}

/// Serves the dashboard on `listener` until the process ends.
pub async fn serve(listener: tokio::net::TcpListener, source: Shared) -> std::io::Result<()> {
    axum::serve(listener, router(source)).await
}

fn asset(kind: &'static str, body: &'static str) -> Response {
    ([(header::CONTENT_TYPE, kind), (header::CACHE_CONTROL, "no-cache")], body).into_response()
}

/// A request the dashboard cannot answer, as a status and a line of text.
#[derive(Debug)]
struct Failure(StatusCode, String);

impl IntoResponse for Failure {
    fn into_response(self) -> Response {
        (self.0, [(header::CONTENT_TYPE, "text/plain; charset=utf-8")], format!("{}\n", self.1)).into_response()
    }
}

fn unavailable(why: impl std::fmt::Display) -> Failure {
    Failure(StatusCode::BAD_GATEWAY, why.to_string())
}

fn no_run(namespace: &str, name: &str) -> Failure {
    Failure(StatusCode::NOT_FOUND, format!("no run {namespace}/{name}"))
}

async fn find(source: &Shared, namespace: &str, name: &str) -> Result<RunEntry, Failure> {
    let runs = source.runs().await.map_err(unavailable)?;
    runs.into_iter().find(|r| r.namespace == namespace && r.name == name).ok_or_else(|| no_run(namespace, name))
}

/// The run's store, without listing every run.
async fn store_of(source: &Shared, namespace: &str, name: &str) -> Result<Store, Failure> {
    source.store(namespace, name).await.map_err(unavailable)?.ok_or_else(|| no_run(namespace, name))
}

async fn index(State(source): State<Shared>) -> Result<Html<String>, Failure> {
    let runs = source.runs().await.map_err(unavailable)?;
    Ok(Html(page::index(&source.place(), &runs)))
}

async fn runs_part(State(source): State<Shared>) -> Result<Html<String>, Failure> {
    let runs = source.runs().await.map_err(unavailable)?;
    Ok(Html(page::runs_table(&runs).into_string()))
}

/// A run and what its store holds.
async fn read_run(source: &Shared, namespace: &str, name: &str) -> Result<(RunEntry, data::RunData), Failure> {
    let run = find(source, namespace, name).await?;
    Ok((run, read_outputs(source, namespace, name).await?))
}

/// What the run's store holds.
async fn read_outputs(source: &Shared, namespace: &str, name: &str) -> Result<data::RunData, Failure> {
    let store = store_of(source, namespace, name).await?;
    data::RunData::read(&store, name).await.map_err(unavailable)
}

async fn run_page(
    State(source): State<Shared>,
    Path((namespace, name)): Path<(String, String)>,
) -> Result<Html<String>, Failure> {
    let (run, read) = read_run(&source, &namespace, &name).await?;
    Ok(Html(page::run(&source.place(), &run, &read)))
}

async fn status_part(
    State(source): State<Shared>,
    Path((namespace, name)): Path<(String, String)>,
) -> Result<Html<String>, Failure> {
    let run = find(&source, &namespace, &name).await?;
    Ok(Html(page::run_status(&run).into_string()))
}

async fn outputs_part(
    State(source): State<Shared>,
    Path((namespace, name)): Path<(String, String)>,
) -> Result<Html<String>, Failure> {
    let read = read_outputs(&source, &namespace, &name).await?;
    Ok(Html(page::run_outputs(&read).into_string()))
}

async fn runs_json(State(source): State<Shared>) -> Result<axum::Json<Vec<RunEntry>>, Failure> {
    Ok(axum::Json(source.runs().await.map_err(unavailable)?))
}

async fn metrics_json(
    State(source): State<Shared>,
    Path((namespace, name, stage)): Path<(String, String, String)>,
    Query(cursor): Query<data::Cursor>,
) -> Result<axum::Json<data::MetricsChunk>, Failure> {
    let stage = match stage.parse::<Stage>() {
        Ok(s) if s.is_training() => s,
        _ => return Err(Failure(StatusCode::NOT_FOUND, format!("{stage}: not a training stage"))),
    };
    let store = store_of(&source, &namespace, &name).await?;
    let chunk = data::metrics_since(&store, &name, stage, &cursor).await.map_err(unavailable)?;
    Ok(axum::Json(chunk))
}

/// `url` without what may be a secret: credentials before the host, and the query.
pub fn redact(url: &str) -> String {
    let url = url.split(['?', '#']).next().unwrap_or(url);
    match url.split_once("://") {
        Some((scheme, rest)) => {
            let (authority, path) = rest.split_once('/').map_or((rest, ""), |(a, p)| (a, p));
            let host = authority.rsplit_once('@').map_or(authority, |(_, host)| host);
            if path.is_empty() && !rest.contains('/') {
                format!("{scheme}://{host}")
            } else {
                format!("{scheme}://{host}/{path}")
            }
        }
        None => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_urls_lose_credentials_and_queries() {
        assert_eq!(redact("s3://key:secret@bucket/runs?region=x"), "s3://bucket/runs");
        assert_eq!(redact("file://runs"), "file://runs");
        assert_eq!(redact("file:///tmp/a/b"), "file:///tmp/a/b");
        assert_eq!(redact("gs://bucket"), "gs://bucket");
        assert_eq!(redact("https://u:p@host/x#frag"), "https://host/x");
    }
}
