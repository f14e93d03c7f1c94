//! The dashboard's pages, rendered on the server (every value escaped by `maud`), and the script and
//! style they load.

use maud::{DOCTYPE, Markup, PreEscaped, html};
use pretrain_crd::status::{PretrainRunStatus, RunPhase, StagePhase, StageStatus};
use pretrain_store::artifact::{DataPrepStats, TokenizeStats};

use super::RunEntry;
use super::data::{Found, RunData};

/// The page script: refreshes the `data-refresh` parts and draws the curves (no dependencies).
pub const SCRIPT: &str = include_str!("dashboard.js");
/// The page style.
pub const STYLE: &str = include_str!("dashboard.css");

/// Seconds between two refreshes of a page's changing parts (the script reads it from the page).
const REFRESH_MS: u32 = 2000;

fn layout(title: &str, place: &str, body: &Markup) -> String {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { (title) " · pretrain" }
                link rel="stylesheet" href="/static/dashboard.css";
                script src="/static/dashboard.js" defer {}
            }
            body data-refresh-ms=(REFRESH_MS) {
                header {
                    a.home href="/" { "pretrain" }
                    span.place { (place) }
                }
                main { (*body) }
            }
        }
    }
    .into_string()
}

/// The list of runs.
pub fn index(place: &str, runs: &[RunEntry]) -> String {
    layout(
        "Runs",
        place,
        &html! {
            h1 { "Runs" }
            div data-refresh="/parts/runs" { (runs_table(runs)) }
        },
    )
}

/// The runs' table (the part of the index page that refreshes).
pub fn runs_table(runs: &[RunEntry]) -> Markup {
    html! {
        @if runs.is_empty() {
            p.empty { "No runs yet." }
        } @else {
            p.count { (runs.len()) " runs: " (by_phase(runs)) }
            div.scroll {
                table.runs {
                    thead { tr { th { "run" } th { "phase" } th { "stage" } th { "stages done" } th { "goodput" } th { "why" } } }
                    tbody {
                        @for run in runs {
                            @let s = &run.status;
                            tr data-run=(run.name) {
                                td.name {
                                    a href=(run_href(run)) { (run.name) }
                                    @if run.namespace != super::LOCAL { span.ns { (run.namespace) } }
                                }
                                td { (phase_badge(s.phase)) }
                                td { (s.stage.as_deref().unwrap_or("-")) }
                                td.num { (done(s)) " / " (run.stages.len()) }
                                td.num { (s.goodput.as_ref().map_or_else(|| "-".to_string(), |g| format!("{:.1}%", 100.0 * g.ratio))) }
                                td.why { (why(s)) }
                            }
                        }
                    }
                }
            }
        }
    }
}

/// One run's page: where it stands, its curves, then what its stages produced.
pub fn run(place: &str, run: &RunEntry, data: &RunData) -> String {
    let href = run_href(run);
    layout(
        &run.name,
        place,
        &html! {
            h1.name { (run.name) }
            div data-refresh=(format!("/parts{href}/status")) { (run_status(run)) }
            section {
                h2 { "Training curves" }
                div #curves data-metrics=(format!("/api{href}/metrics")) data-stages="train long-context" {
                    @for (id, title) in [("loss", "Loss (nats/token)"), ("lr", "Learning rate"), ("throughput", "Tokens/s per rank"), ("grad-norm", "Gradient norm")] {
                        figure.chart {
                            figcaption { (title) }
                            svg #(format!("chart-{id}")) data-points="0" viewBox="0 0 480 220" role="img" aria-label=(title) {}
                        }
                    }
                }
            }
            div data-refresh=(format!("/parts{href}/outputs")) { (run_outputs(data)) }
        },
    )
}

/// Where a run stands: phase, why, checkpoint, goodput and the stage timeline (a part that
/// refreshes).
pub fn run_status(run: &RunEntry) -> Markup {
    let s = &run.status;
    html! {
        p.summary {
            (phase_badge(s.phase))
            @if let Some(stage) = &s.stage { " at " b { (stage) } }
            @if run.namespace != super::LOCAL { " · namespace " (run.namespace) }
            " · store " code { (run.store) }
        }
        @let why = why(s);
        @if !why.is_empty() { p.why #why { (why) } }
        @if let Some(c) = &s.last_checkpoint {
            p { "Newest checkpoint: " (c.stage) " step " (c.step) ", " (c.tokens) " tokens"
                @if let Some(loss) = c.loss { ", loss " (format!("{loss:.4}")) } }
        }
        @if let Some(g) = s.goodput.as_ref().filter(|g| g.held_seconds > 0.0) {
            p #goodput { (crate::plan::goodput::summary(g)) }
        }
        section { h2 { "Stages" } (timeline(run)) }
    }
}

/// What the stages produced: the data funnel, the tokenizer's compression and the eval tables (a
/// part that refreshes).
pub fn run_outputs(data: &RunData) -> Markup {
    html! {
        section #data { h2 { "Data" } (found(&data.data_prep, "data-prep has not committed yet.", funnel)) }
        section #tokenizer { h2 { "Tokenizer" } (found(&data.tokenize, "tokenize has not committed yet.", compression)) }
        section #eval {
            h2 { "Evaluation" }
            (found(&data.eval, "eval has not written its tables yet.", |html| html! { div.eval { (PreEscaped(html)) } }))
        }
    }
}

/// How many runs are in each phase, the busiest first: `12 running, 3 queued`.
fn by_phase(runs: &[RunEntry]) -> String {
    let mut counts: Vec<(&str, usize)> = Vec::new();
    for run in runs {
        let name = run.status.phase.map_or("Pending", phase_name);
        match counts.iter_mut().find(|(n, _)| *n == name) {
            Some((_, count)) => *count += 1,
            None => counts.push((name, 1)),
        }
    }
    counts.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
    counts.iter().map(|(name, n)| format!("{n} {}", name.to_lowercase())).collect::<Vec<_>>().join(", ")
}

fn run_href(run: &RunEntry) -> String {
    format!("/runs/{}/{}", run.namespace, run.name)
}

fn phase_badge(phase: Option<RunPhase>) -> Markup {
    let name = phase.map_or("Pending", phase_name);
    html! { span class=(format!("phase phase-{}", name.to_lowercase())) { (name) } }
}

fn phase_name(phase: RunPhase) -> &'static str {
    match phase {
        RunPhase::Pending => "Pending",
        RunPhase::Queued => "Queued",
        RunPhase::Running => "Running",
        RunPhase::Suspended => "Suspended",
        RunPhase::Succeeded => "Succeeded",
        RunPhase::Failed => "Failed",
    }
}

fn stage_phase(phase: StagePhase) -> &'static str {
    match phase {
        StagePhase::Pending => "Pending",
        StagePhase::Running => "Running",
        StagePhase::Succeeded => "Succeeded",
        StagePhase::Failed => "Failed",
        StagePhase::Skipped => "Skipped",
    }
}

/// Stages committed or skipped.
fn done(s: &PretrainRunStatus) -> usize {
    s.stages.iter().filter(|st| matches!(st.phase, StagePhase::Succeeded | StagePhase::Skipped)).count()
}

/// Why a run waits or stopped, with its place in the queue.
fn why(s: &PretrainRunStatus) -> String {
    let mut parts = Vec::new();
    if let Some(p) = s.queue_position {
        parts.push(format!("position {p} in the queue"));
    }
    if let Some(reason) = &s.reason {
        parts.push(reason.clone());
    }
    if let Some(p) = &s.preemption {
        parts.push(format!("{} attempt {} preempted by {} at {}", p.stage, p.attempt, p.by, p.time));
    }
    parts.join("; ")
}

/// Unix seconds of an RFC 3339 time.
fn seconds(time: Option<&str>) -> Option<i64> {
    time.and_then(|t| t.parse::<jiff::Timestamp>().ok()).map(jiff::Timestamp::as_second)
}

/// The stages as a table, with a bar for each one's time on a shared axis.
fn timeline(run: &RunEntry) -> Markup {
    let now = jiff::Timestamp::now().as_second();
    let span = |st: &StageStatus| {
        let start = seconds(st.start_time.as_deref())?;
        Some((start, seconds(st.finish_time.as_deref()).unwrap_or(now).max(start)))
    };
    let spans: Vec<(i64, i64)> = run.status.stages.iter().filter_map(span).collect();
    let first = spans.iter().map(|s| s.0).min().unwrap_or(now);
    let width = (spans.iter().map(|s| s.1).max().unwrap_or(now) - first).max(1) as f64;
    let stages: Vec<(String, Option<&StageStatus>)> = run
        .stages
        .iter()
        .map(|stage| (stage.to_string(), run.status.stages.iter().find(|st| st.name == stage.as_str())))
        .collect();
    html! {
        div.scroll {
            table.stages {
                thead { tr { th { "stage" } th { "phase" } th { "attempts" } th { "restarts" } th { "took" } th.bar-head { "time" } th { "note" } } }
                tbody {
                    @for (name, st) in &stages {
                        tr data-stage=(name) {
                            td { (name) }
                            @match st {
                                None => { td { span.phase.phase-pending { "Pending" } } td {} td {} td {} td {} td {} }
                                Some(st) => {
                                    td { span class=(format!("phase phase-{}", stage_phase(st.phase).to_lowercase())) { (stage_phase(st.phase)) } }
                                    td.num { (st.attempts) }
                                    td.num { (restarts(st)) }
                                    td.num { (span(st).map_or_else(|| "-".to_string(), |(a, b)| pretrain_crd::display::duration((b - a) as u64))) }
                                    td.bar {
                                        @if let Some((a, b)) = span(st) {
                                            span.track { span class=(format!("fill fill-{}", stage_phase(st.phase).to_lowercase()))
                                                style=(format!("left:{:.2}%;width:{:.2}%", 100.0 * (a - first) as f64 / width, (100.0 * (b - a) as f64 / width).max(0.5))) {} }
                                        }
                                    }
                                    td.note { (st.message.as_deref().unwrap_or("")) }
                                }
                            }
                        }
                    }
                }
            }
        }
    }
}

/// Restarts of a stage, by cause.
fn restarts(st: &StageStatus) -> String {
    let mut parts = Vec::new();
    if st.failures > 0 {
        parts.push(format!("{} failed", st.failures));
    }
    if st.disruptions > 0 {
        parts.push(format!("{} disrupted", st.disruptions));
    }
    if parts.is_empty() { "-".into() } else { parts.join(", ") }
}

fn found<T>(value: &Found<T>, missing: &str, show: impl Fn(&T) -> Markup) -> Markup {
    match value {
        Found::Yes(v) => show(v),
        Found::No => html! { p.empty { (missing) } },
        Found::Unreadable(why) => html! { p.empty { "Not readable yet: " (why) } },
    }
}

/// The data funnel: per category, what was read, kept by the rules and mixed in.
fn funnel(s: &DataPrepStats) -> Markup {
    let most = s.map.read.values().copied().max().unwrap_or(1).max(1) as f64;
    let bar = |n: u64, kind: &str| html! { span.track { span class=(format!("fill fill-{kind}")) style=(format!("width:{:.2}%", 100.0 * n as f64 / most)) {} } };
    html! {
        div.scroll {
            table.funnel {
                thead { tr { th { "category" } th { "read" } th { "kept by the rules" } th { "in the mix" } th { "mixed bytes" } th.bar-head { "documents: " span.key.fill-read { "read" } " " span.key.fill-kept { "kept" } " " span.key.fill-mixed { "mixed" } } } }
                tbody {
                    @for (cat, read) in &s.map.read {
                        @let kept = s.map.kept.get(cat).copied().unwrap_or(0);
                        @let mixed = s.mix.documents.get(cat).copied().unwrap_or(0);
                        tr {
                            td { (cat) }
                            td.num { (read) }
                            td.num { (kept) }
                            td.num { (mixed) }
                            td.num { (s.mix.bytes.get(cat).copied().unwrap_or(0)) }
                            td.bar { (bar(*read, "read")) (bar(kept, "kept")) (bar(mixed, "mixed")) }
                        }
                    }
                }
            }
        }
        p { "Dedup removed " (s.dedup.exact_removed) " exact and " (s.dedup.near_removed) " near duplicates; "
            (s.held_out.documents) " documents held out." }
    }
}

/// The tokenizer's vocabulary and its compression on the held-out split.
fn compression(s: &TokenizeStats) -> Markup {
    let all = ("all".to_string(), &s.compression.all);
    html! {
        p { "Vocabulary " (s.tokenizer.vocab_size) "." }
        table.compression {
            thead { tr { th { "held-out category" } th { "bytes/token" } th { "chars/token" } } }
            tbody {
                @for (cat, c) in s.compression.heldout.iter().map(|(k, v)| (k.clone(), v)).chain([all]) {
                    tr { td { (cat) } td.num { (format!("{:.3}", c.bytes_per_token)) } td.num { (format!("{:.3}", c.chars_per_token)) } }
                }
            }
        }
    }
}
