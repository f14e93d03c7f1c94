//! The dashboard's data endpoints against a store's contents: the curves' endpoint followed while a
//! writer replaces `metrics.jsonl` (growing, with a torn last line, and rewritten by a resume) ends
//! with exactly the file's lines and never fails; files not there yet or not readable yet are shown
//! as such; committed statistics and eval tables are shown as the store has them.

use std::sync::Arc;

use bytes::Bytes;
use pretrain_crd::Stage;
use pretrain_crd::status::PretrainRunStatus;
use pretrain_operator::dashboard::{self, RunEntry, Source};
use pretrain_store::Store;
use pretrain_store::artifact::MetricsLine;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

struct OneRun {
    store: Store,
}

#[async_trait::async_trait]
impl Source for OneRun {
    async fn runs(&self) -> Result<Vec<RunEntry>, String> {
        Ok(vec![RunEntry {
            namespace: dashboard::LOCAL.into(),
            name: "r".into(),
            stages: Stage::ALL.to_vec(),
            status: PretrainRunStatus::default(),
            store: self.store.url().to_string(),
        }])
    }
    async fn store(&self, namespace: &str, name: &str) -> Result<Option<Store>, String> {
        Ok((namespace == dashboard::LOCAL && name == "r").then(|| self.store.clone()))
    }
    fn place(&self) -> String {
        "test".into()
    }
}

/// Serves the dashboard over a fresh file store; returns its address and the store.
async fn serve() -> (std::net::SocketAddr, Store, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&format!("file://{}", dir.path().display())).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(dashboard::serve(listener, Arc::new(OneRun { store: store.clone() })));
    (addr, store, dir)
}

/// `GET path`: the status code and the body.
async fn get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    let mut socket = tokio::net::TcpStream::connect(addr).await.unwrap();
    let request = format!("GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n");
    socket.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    socket.read_to_string(&mut response).await.unwrap();
    let code = response.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = response.split_once("\r\n\r\n").map_or(String::new(), |(_, b)| b.to_string());
    (code, body)
}

fn line(step: u64, attempt: u64) -> MetricsLine {
    MetricsLine {
        step,
        tokens: step * 4096,
        loss: 8.0 - step as f64 / 100.0 + attempt as f64,
        lr: 1e-3,
        grad_norm: 0.5,
        seconds: 1.0,
        tokens_per_second: 4096.0,
        ..MetricsLine::default()
    }
}

fn text(lines: &[MetricsLine]) -> String {
    lines.iter().map(|l| format!("{}\n", serde_json::to_string(l).unwrap())).collect()
}

/// A reader following `/api/.../metrics/train` as the page's script does.
#[derive(Default)]
struct Reader {
    read: Vec<MetricsLine>,
    offset: u64,
    mark: Option<String>,
    resets: usize,
}

impl Reader {
    async fn follow(&mut self, addr: std::net::SocketAddr) {
        let mut query = format!("offset={}", self.offset);
        if let Some(mark) = &self.mark {
            query.push_str(&format!("&mark={mark}"));
        }
        let (code, body) = get(addr, &format!("/api/runs/local/r/metrics/train?{query}")).await;
        assert_eq!(code, 200, "{body}");
        let chunk: serde_json::Value = serde_json::from_str(&body).unwrap();
        if chunk["reset"].as_bool().unwrap() {
            self.read.clear();
            self.resets += 1;
        }
        let lines: Vec<MetricsLine> = serde_json::from_value(chunk["lines"].clone()).unwrap();
        self.read.extend(lines);
        for w in self.read.windows(2) {
            assert_eq!(w[0].step + 1, w[1].step, "lines in order, none torn or repeated");
        }
        self.offset = chunk["next"].as_u64().unwrap();
        self.mark = chunk["mark"].as_str().map(str::to_string);
    }
}

/// The file a writer puts at its `version`: steps grow by 7 a version; from version 20 on, a resume
/// from step 60 has rewritten what followed (its lines differ, not their lengths), and every third
/// version ends in a torn line.
fn version(v: u64) -> (Vec<MetricsLine>, String) {
    let steps = 1 + v * 7;
    let lines: Vec<MetricsLine> =
        (1..=steps).map(|s| if v >= 20 && s > 60 { line(s, 1) } else { line(s, 0) }).collect();
    let mut body = text(&lines);
    if v % 3 == 2 {
        body.push_str("{\"gradNorm\":0.5,\"loss\":7.");
    }
    (lines, body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_curves_follow_a_file_being_rewritten_without_errors_or_torn_lines() {
    let (addr, store, _dir) = serve().await;
    let key = store.stage("r", Stage::Train).unwrap().key("metrics.jsonl").unwrap();
    // Before the file exists: no lines, no error.
    let mut reader = Reader::default();
    reader.follow(addr).await;
    assert!(reader.read.is_empty());

    // A read after every version: the reader sees each one's whole lines, and starts again once,
    // at the resume.
    for v in 0..30 {
        store.put(&key, Bytes::from(version(v).1)).await.unwrap();
        reader.follow(addr).await;
        assert_eq!(reader.read, version(v).0, "version {v}");
    }
    assert_eq!(reader.resets, 1);

    // Reads while a writer replaces the file as fast as it can: whatever the interleaving, the
    // reader ends with exactly the last version's whole lines.
    let mut fresh = Reader::default();
    let writer = {
        let (store, key) = (store.clone(), key.clone());
        tokio::spawn(async move {
            for v in 30..120 {
                store.put(&key, Bytes::from(version(v).1)).await.unwrap();
            }
        })
    };
    while !writer.is_finished() {
        reader.follow(addr).await;
        fresh.follow(addr).await;
    }
    writer.await.unwrap();
    let (last, body) = version(119);
    for r in [&mut reader, &mut fresh] {
        r.follow(addr).await;
        assert_eq!(r.read, last, "the reader ends with exactly the file's whole lines");
        assert_eq!(r.offset, text(&last).len() as u64);
        assert!(body.len() as u64 > r.offset, "the torn line is left for later");
    }

    // A reader whose offset lies past a file that shrank, or whose mark is not the line there,
    // starts again from the beginning.
    for query in ["offset=999999", "offset=120&mark=120-0011223344556677"] {
        let (code, body) = get(addr, &format!("/api/runs/local/r/metrics/train?{query}")).await;
        assert_eq!(code, 200);
        let chunk: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(chunk["reset"], true, "{query}");
        assert_eq!(chunk["lines"].as_array().unwrap().len(), last.len());
    }
    // A stage that is not a training stage has no curves, nor has a run that does not exist.
    assert_eq!(get(addr, "/api/runs/local/r/metrics/eval").await.0, 404);
    assert_eq!(get(addr, "/api/runs/local/nobody/metrics/train").await.0, 404);
}

#[tokio::test]
async fn outputs_show_what_is_committed_and_say_what_is_not_yet() {
    let (addr, store, _dir) = serve().await;
    let outputs = "/parts/runs/local/r/outputs";
    let (code, body) = get(addr, outputs).await;
    assert_eq!(code, 200, "{body}");
    for missing in ["data-prep has not committed yet", "tokenize has not committed yet", "eval has not written"] {
        assert!(body.contains(missing), "{missing}: {body}");
    }
    // A commit record cut off while written (a store without atomic writes): not readable yet.
    let data_prep = store.stage("r", Stage::DataPrep).unwrap();
    store
        .put(&data_prep.key("_SUCCESS.json").unwrap(), Bytes::from_static(b"{\"formatVersion\":1,\"run\""))
        .await
        .unwrap();
    let (code, body) = get(addr, outputs).await;
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("Not readable yet"), "{body}");
    // Committed: the funnel's numbers, as committed.
    let mut stats = pretrain_store::artifact::DataPrepStats::default();
    stats.map.read.insert("web".into(), 6023);
    stats.map.kept.insert("web".into(), 398);
    stats.mix.documents.insert("web".into(), 1400);
    stats.dedup.exact_removed = 57;
    data_prep.commit("hash", Vec::new(), serde_json::to_value(&stats).unwrap()).await.unwrap();
    let eval = store.stage("r", Stage::Eval).unwrap();
    let report = "# Evaluation of `r`\n\n## base\n\n| held-out | loss |\n|---|---:|\n| web <b>x</b> | 5.4510 |\n";
    store.put(&eval.key("report.md").unwrap(), Bytes::from(report)).await.unwrap();
    let (code, body) = get(addr, outputs).await;
    assert_eq!(code, 200, "{body}");
    for shown in [
        "<td>web</td><td class=\"num\">6023</td><td class=\"num\">398</td><td class=\"num\">1400</td>",
        "Dedup removed 57 exact",
    ] {
        assert!(body.contains(shown), "{shown}: {body}");
    }
    assert!(body.contains("5.4510</td>") && body.contains("web &lt;b&gt;x&lt;/b&gt;"), "{body}");
    // The pages and their parts answer; a run that does not exist is a 404.
    for path in ["/", "/parts/runs", "/runs/local/r", "/parts/runs/local/r/status", "/api/runs", "/static/dashboard.js"]
    {
        assert_eq!(get(addr, path).await.0, 200, "{path}");
    }
    assert_eq!(get(addr, "/runs/local/nobody").await.0, 404);
}
