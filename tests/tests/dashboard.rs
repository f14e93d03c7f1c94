//! The live dashboard in a real browser (Chromium, headless, driven through chromedriver):
//!
//! - `pretrain run --ui` on the tiny example (its training shortened to 32 steps, so that a debug
//!   build runs it in minutes): a second run on the same store waits in the local queue and the
//!   list says why; the loss curve gains points while train runs; the finished run shows its eval
//!   tables, and its curves hold exactly the lines of its `metrics.jsonl`; the queued run starts
//!   once the first one ended, while its dashboard stays;
//! - 200 runs, names of 63 characters among them: every row is there and nothing overflows the
//!   page's width.
//!
//! A screenshot of each state is saved under `target/tmp/dashboard/` (the test prints where).
//! Chromium and chromedriver come from Debian's `chromium` and `chromium-driver`
//! (`scripts/browser-env.sh` installs them and prints chromedriver's path for
//! `PRETRAIN_CHROMEDRIVER`).

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::mpsc::{Receiver, channel};
use std::time::{Duration, Instant};

use fantoccini::{Client, ClientBuilder};
use pretrain_crd::Stage;
use pretrain_crd::status::{PretrainRunStatus, RunPhase};
use pretrain_operator::dashboard::{self, RunEntry, Source};
use pretrain_tests::{bin, repo};
use serde_json::{Value, json};

/// A child process killed when dropped.
struct Process(Child);

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Where the screenshots go.
fn artifacts() -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("dashboard");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// chromedriver, and a headless Chromium session through it (fresh profile, no network calls of
/// its own, a laptop-sized window).
async fn browser(profile: &Path) -> (Process, Client) {
    // kube and object_store enable both of rustls' crypto providers: choose one.
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let driver = std::env::var("PRETRAIN_CHROMEDRIVER").unwrap_or_else(|_| "chromedriver".into());
    let port = free_port();
    let child = Command::new(&driver)
        .arg(format!("--port={port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| {
            panic!("{driver}: {e}; install Chromium and chromedriver with scripts/browser-env.sh (.ci/run does)")
        });
    let driver = Process(child);
    let mut caps = serde_json::Map::new();
    let args = [
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--window-size=1280,1100",
    ]
    .iter()
    .map(|a| a.to_string())
    .chain([format!("--user-data-dir={}", profile.display())]);
    caps.insert("goog:chromeOptions".into(), json!({"binary": chromium(), "args": args.collect::<Vec<_>>()}));
    let deadline = Instant::now() + Duration::from_secs(60);
    let client = loop {
        match ClientBuilder::rustls()
            .unwrap()
            .capabilities(caps.clone())
            .connect(&format!("http://127.0.0.1:{port}"))
            .await
        {
            Ok(client) => break client,
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            Err(e) => panic!("no session from chromedriver: {e}"),
        }
    };
    (driver, client)
}

fn chromium() -> String {
    std::env::var("PRETRAIN_CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into())
}

/// Evaluates `script` (a function body) in the page.
async fn eval(client: &Client, script: &str) -> Value {
    client.execute(script, vec![]).await.unwrap_or_else(|e| panic!("{script}: {e}"))
}

/// Polls `script` until it returns something other than `null`/`false`, for at most `limit`.
async fn wait_for(client: &Client, what: &str, limit: Duration, script: &str) -> Value {
    let deadline = Instant::now() + limit;
    loop {
        let value = eval(client, script).await;
        if !(value.is_null() || value == Value::Bool(false)) {
            return value;
        }
        assert!(Instant::now() < deadline, "{what}: not within {limit:?}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

async fn screenshot(client: &Client, name: &str) {
    let png = client.screenshot().await.unwrap();
    let path = artifacts().join(name);
    std::fs::write(&path, png).unwrap();
    println!("screenshot: {}", path.display());
}

/// The page's width is its window's: no row, name or table pushes it wider.
async fn assert_fits(client: &Client, what: &str) {
    let widths = eval(client, "return [document.documentElement.scrollWidth, window.innerWidth];").await;
    let (page, window) = (widths[0].as_u64().unwrap(), widths[1].as_u64().unwrap());
    assert!(page <= window, "{what}: the page is {page} px wide in a window of {window}");
}

/// The tiny example, shortened and renamed, with its store in `dir/store`.
fn tiny(dir: &Path, name: &str) -> PathBuf {
    let text = std::fs::read_to_string(repo().join("examples/tiny.yaml")).unwrap();
    let mut run: serde_yaml::Value = serde_yaml::from_str(&text).unwrap();
    run["metadata"]["name"] = name.into();
    run["spec"]["storage"]["url"] = format!("file://{}", dir.join("store").display()).into();
    for source in run["spec"]["data"]["sources"].as_sequence_mut().unwrap() {
        let url = repo().join(source["url"].as_str().unwrap());
        source["url"] = url.display().to_string().into();
    }
    // 32 steps of 4,096 tokens, a checkpoint every 8.
    run["spec"]["train"]["tokens"] = 131_072.into();
    run["spec"]["train"]["checkpoint"]["everySteps"] = 8.into();
    run["spec"]["eval"]["passkey"]["trials"] = 2.into();
    let path = dir.join(format!("{name}.yaml"));
    std::fs::write(&path, serde_yaml::to_string(&run).unwrap()).unwrap();
    path
}

/// Starts `pretrain run` with `args`; its stdout lines arrive on the receiver.
fn pretrain_run(args: &[&str]) -> (Process, Receiver<String>) {
    let mut child = Command::new(bin("pretrain"))
        .arg("run")
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("pretrain runs");
    let stdout = child.stdout.take().unwrap();
    let (send, receive) = channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            println!("| {line}");
            if send.send(line).is_err() {
                break;
            }
        }
    });
    (Process(child), receive)
}

/// The first line from `lines` that starts with `prefix`.
fn line_starting(lines: &Receiver<String>, prefix: &str) -> String {
    loop {
        let line = lines.recv_timeout(Duration::from_secs(600)).unwrap_or_else(|e| panic!("waiting for {prefix}: {e}"));
        if line.starts_with(prefix) {
            return line;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_tiny_example_watched_in_chromium_while_it_trains_waits_and_finishes() {
    let tmp = tempfile::tempdir().unwrap();
    let first = tiny(tmp.path(), "tiny");
    let (mut run, lines) = pretrain_run(&[first.to_str().unwrap(), "--ui", "127.0.0.1:0"]);
    let url = line_starting(&lines, "dashboard: ").trim_start_matches("dashboard: ").to_string();
    let base = url.trim_end_matches("/runs/local/tiny").to_string();

    // A second run on the same store, with the longest name a run may have, waits in the queue; the
    // list says why.
    let long = format!("queued-behind-tiny-{}", "x".repeat(50 - 19));
    let second = tiny(tmp.path(), &long);
    let (queued, queued_lines) = pretrain_run(&[second.to_str().unwrap()]);
    line_starting(&queued_lines, "queued at position 1");
    let (_driver, client) = browser(&tmp.path().join("profile")).await;
    client.goto(&format!("{base}/")).await.unwrap();
    let why = wait_for(
        &client,
        "the queued run's row",
        Duration::from_secs(60),
        &format!(
            "const row = document.querySelector('tr[data-run=\"{long}\"]');
             return row && row.textContent.includes('Queued') ? row.querySelector('td.why').textContent : null;"
        ),
    )
    .await;
    let why = why.as_str().unwrap();
    assert!(why.starts_with("position 1 in the queue; waiting for run `tiny` (pid "), "{why}");
    assert!(why.contains("one `pretrain run` at a time uses the run state of file://"), "{why}");
    assert_fits(&client, "the list with a 50-character name").await;
    screenshot(&client, "1-queued.png").await;

    // While train runs, the loss curve gains points.
    client.goto(&url).await.unwrap();
    let points = "return Number(document.getElementById('chart-loss').dataset.points);";
    let train_phase = "const p = document.querySelector('tr[data-stage=\"train\"] .phase'); return p && p.textContent;";
    let first_points = wait_for(
        &client,
        "loss points while train runs",
        Duration::from_secs(900),
        &format!(
            "const n = (() => {{ {points} }})(); const p = (() => {{ {train_phase} }})(); return n > 0 ? [n, p] : null;"
        ),
    )
    .await;
    let n = first_points[0].as_u64().unwrap();
    assert_eq!(first_points[1], "Running", "train was still running when the curve had {n} points");
    screenshot(&client, "2-training.png").await;
    let more = wait_for(
        &client,
        "more loss points",
        Duration::from_secs(900),
        &format!("const n = (() => {{ {points} }})(); return n > {n} ? n : null;"),
    )
    .await;
    println!("loss points: {n}, then {more}");

    // Finished: the eval tables, and curves holding exactly the stage's metrics lines.
    wait_for(
        &client,
        "the finished run's eval tables",
        Duration::from_secs(1800),
        "const s = document.querySelector('p.summary .phase');
         return s && s.textContent === 'Succeeded' && document.querySelector('#eval table') !== null;",
    )
    .await;
    line_starting(&lines, "dashboard: the run has ended");
    // One more refresh of the curves after the last write.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_curves_hold_the_metrics(&client, &tmp.path().join("store/tiny")).await;
    let eval_text = eval(&client, "return document.getElementById('eval').textContent;").await;
    for shown in ["held-out", "passkey correct", "benchmark"] {
        assert!(eval_text.as_str().unwrap().contains(shown), "{shown}: {eval_text}");
    }
    assert_fits(&client, "the finished run's page").await;
    screenshot(&client, "3-finished.png").await;
    client.close().await.unwrap();
    // The finished run let the run state go: the queued run starts while the dashboard stays.
    line_starting(&queued_lines, "data-prep: starting");
    drop(queued);

    // Ctrl-C ends the dashboard; the run's exit says it succeeded.
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(run.0.id() as i32), nix::sys::signal::Signal::SIGINT).unwrap();
    let status = run.0.wait().unwrap();
    assert!(status.success(), "{status}");
}

/// The loss chart has a point for every line of each training stage's `metrics.jsonl` under `store`.
async fn assert_curves_hold_the_metrics(client: &Client, store: &Path) {
    for stage in ["train", "long-context"] {
        let text = std::fs::read_to_string(store.join(stage).join("metrics.jsonl")).unwrap();
        let shown = eval(
            client,
            &format!(
                "return Number(document.querySelector('#chart-loss polyline[data-series=\"{stage}\"]').dataset.count);"
            ),
        )
        .await;
        assert_eq!(shown.as_u64().unwrap(), text.lines().count() as u64, "{stage}");
    }
}

/// Many runs, as a busy cluster has them.
struct ManyRuns;

#[async_trait::async_trait]
impl Source for ManyRuns {
    async fn runs(&self) -> Result<Vec<RunEntry>, String> {
        Ok((0..200)
            .map(|i| {
                let name =
                    if i % 10 == 0 { format!("{i:03}-{}", "long-name-".repeat(6)) } else { format!("run-{i:03}") };
                let phase = [RunPhase::Running, RunPhase::Queued, RunPhase::Succeeded, RunPhase::Failed][i % 4];
                RunEntry {
                    namespace: format!("team-{}", i % 7),
                    name: name[..name.len().min(63)].to_string(),
                    stages: Stage::ALL.to_vec(),
                    status: PretrainRunStatus {
                        phase: Some(phase),
                        stage: Some("train".into()),
                        queue_position: (phase == RunPhase::Queued).then_some(i as u32),
                        reason: (phase == RunPhase::Queued)
                            .then(|| "waiting for 64 GPUs in queue research: 32 free of the quota's 256".into()),
                        ..PretrainRunStatus::default()
                    },
                    store: "s3://bucket/runs".into(),
                }
            })
            .collect())
    }
    async fn store(&self, _: &str, _: &str) -> Result<Option<pretrain_store::Store>, String> {
        Err("no stores here".into())
    }
    fn place(&self) -> String {
        "cluster".into()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_runs_and_long_names_fit_the_page() {
    let tmp = tempfile::tempdir().unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(dashboard::serve(listener, Arc::new(ManyRuns)));
    let (_driver, client) = browser(&tmp.path().join("profile")).await;
    client.goto(&format!("http://{addr}/")).await.unwrap();
    let rows = eval(&client, "return document.querySelectorAll('table.runs tbody tr').length;").await;
    assert_eq!(rows, 200);
    let longest = eval(
        &client,
        "return Math.max(...[...document.querySelectorAll('td.name a')].map(a => a.textContent.length));",
    )
    .await;
    assert_eq!(longest, 63);
    assert_fits(&client, "200 runs").await;
    screenshot(&client, "4-many-runs.png").await;
    client.close().await.unwrap();
}
