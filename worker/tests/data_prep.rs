//! The data-prep stage end to end on a small planted corpus: dedup across files and shards, the
//! held-out split, the mix, and results that do not depend on the shard count.

use std::io::Read;
use std::path::Path;

mod common;

use pretrain_crd::Stage;
use pretrain_store::artifact::DocumentLine;
use pretrain_worker::Context;
use pretrain_worker::data::stage::run;
use pretrain_worker::frame::Phase;

fn words(seed: u64, n: usize) -> Vec<String> {
    common::words(seed, n, |state| format!("w{}", state % 3000))
}

fn line(id: &str, text: &str) -> String {
    serde_json::json!({"id": id, "text": text}).to_string()
}

/// web: 40 documents + an exact duplicate (case and spacing differ) + a near duplicate + a broken line;
/// code: 20 documents + a near duplicate of a web document.
fn corpus(dir: &Path) {
    let mut web: Vec<String> = (0..40).map(|i| line(&format!("web-{i}"), &words(i, 300).join(" "))).collect();
    web.push(line("web-dup-exact", &words(3, 300).join("  ").to_uppercase()));
    let mut near = words(5, 300);
    near[100] = "changed".into();
    web.push(line("web-dup-near", &near.join(" ")));
    web.push("{\"id\": \"broken\", \"text\": ".into());
    std::fs::write(dir.join("web.jsonl"), web.join("\n")).unwrap();

    let mut code: Vec<String> = (100..120).map(|i| line(&format!("code-{i}"), &words(i, 100).join(" "))).collect();
    let mut cross = words(7, 300);
    cross[10] = "edited".into();
    code.push(line("code-dup-of-web-7", &cross.join(" ")));
    std::fs::write(dir.join("code.jsonl"), code.join("\n")).unwrap();
}

/// Writes the manifest of run `name` (store in `dir/store`, rule filters off): `data` is the YAML
/// under `spec.data` after `filters`, `train` the flow mapping of `spec.train`.
fn write_manifest(dir: &Path, name: &str, data: &str, train: &str) -> std::path::PathBuf {
    common::write_manifest(dir, name, 7, data, &format!("  model: {{preset: tiny}}\n  train: {train}"))
}

const SMALL_TRAIN: &str = "{seqLen: 64, tokens: 100000, globalBatchTokens: 1024, microBatchSize: 16, schedule: {warmupSteps: 1}, resources: {gpusPerNode: 0}}";

fn manifest(dir: &Path, name: &str, shards: u32) -> std::path::PathBuf {
    let data = format!(
        "    sources:\n      - {{name: web, url: \"{web}\"}}\n      - {{name: code, url: \"{code}\"}}\n    mix: {{weights: {{web: 0.5, code: 0.5}}, maxEpochs: 4}}\n    heldOutFraction: 0.2\n    shards: {shards}",
        web = dir.join("web.jsonl").display(),
        code = dir.join("code.jsonl").display(),
    );
    write_manifest(dir, name, &data, SMALL_TRAIN)
}

/// Runs data-prep of a manifest to its commit; returns the commit stats and the training stream.
async fn prepare_all(manifest: &Path, shards: u32) -> (serde_json::Value, Vec<DocumentLine>) {
    let ctx = Context::from_env(Stage::DataPrep, manifest.to_str().unwrap()).await.unwrap();
    let commit = run(&ctx, Phase::All).await.unwrap().expect("the reduce commits");
    let stage = manifest.parent().unwrap().join("store").join(ctx.run_name()).join("data-prep");
    let mut stream = Vec::new();
    for k in 0..shards {
        stream.extend(read_jsonl_zst(&stage.join(format!("shards/{k:05}.jsonl.zst"))));
    }
    (commit.stats, stream)
}

fn read_jsonl_zst(path: &Path) -> Vec<DocumentLine> {
    let mut text = String::new();
    zstd::Decoder::new(std::fs::File::open(path).unwrap()).unwrap().read_to_string(&mut text).unwrap();
    text.lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

struct Output {
    stream: Vec<String>,
    heldout: Vec<String>,
    stats: serde_json::Value,
}

async fn prepare(dir: &Path, name: &str, shards: u32) -> Output {
    let (stats, stream) = prepare_all(&manifest(dir, name, shards), shards).await;
    let stage = dir.join("store").join(name).join("data-prep");
    let mut heldout: Vec<String> = std::fs::read_dir(stage.join("heldout"))
        .unwrap()
        .flat_map(|f| read_jsonl_zst(&f.unwrap().path()))
        .map(|d| d.id)
        .collect();
    heldout.sort();
    Output { stream: stream.into_iter().map(|d| d.id).collect(), heldout, stats }
}

#[tokio::test]
async fn dedups_splits_and_mixes_identically_for_1_and_4_shards() {
    let tmp = tempfile::tempdir().unwrap();
    corpus(tmp.path());
    let one = prepare(tmp.path(), "one", 1).await;
    let four = prepare(tmp.path(), "four", 4).await;

    assert_eq!(one.stream, four.stream, "the training stream does not depend on the shard count");
    assert_eq!(one.heldout, four.heldout);
    assert_eq!(one.stats["dedup"], four.stats["dedup"]);

    let dedup = &one.stats["dedup"];
    assert_eq!(dedup["exactRemoved"], 1, "{dedup}");
    assert_eq!(dedup["nearRemoved"], 2, "{dedup}");
    for gone in ["web-dup-exact", "web-dup-near", "code-dup-of-web-7"] {
        assert!(!one.stream.contains(&gone.to_string()) && !one.heldout.contains(&gone.to_string()), "{gone}");
    }
    assert_eq!(one.stats["map"]["malformed"], 1);
    assert!(one.stats["map"]["malformedExamples"][0]["file"].as_str().unwrap().ends_with("web.jsonl"));

    // Held-out documents never appear in the training stream.
    assert!(!one.heldout.is_empty(), "{}", one.stats);
    assert!(one.heldout.iter().all(|id| !one.stream.contains(id)));

    // Code is a third of web's bytes, so the 50/50 mix repeats code documents (within maxEpochs).
    let share = one.stats["mix"]["realisedShare"]["code"].as_f64().unwrap();
    assert!((share - 0.5).abs() < 0.1, "realised code share {share}");
    let code_copies = one.stream.iter().filter(|id| id.starts_with("code-")).count();
    assert!(code_copies > 20, "code was upsampled: {code_copies}");
    let epochs = one.stats["mix"]["epochs"]["code"].as_f64().unwrap();
    assert!(epochs > 1.0 && epochs <= 4.0, "{epochs}");
}

#[tokio::test]
async fn each_phase_names_the_tasks_of_the_phase_before_that_are_missing() {
    let tmp = tempfile::tempdir().unwrap();
    corpus(tmp.path());
    let ctx = Context::from_env(Stage::DataPrep, manifest(tmp.path(), "partial", 3).to_str().unwrap()).await.unwrap();
    run(&ctx, Phase::Map(1)).await.unwrap();
    let err = run(&ctx, Phase::Reduce).await.unwrap_err().to_string();
    assert_eq!(err, "write tasks [0, 1, 2] of 3 have not finished for this spec; run them before the reduce");
    let err = run(&ctx, Phase::Dedup(0)).await.unwrap_err().to_string();
    assert_eq!(err, "map tasks [0, 2] of 3 have not finished for this spec; run them before the dedup tasks");
    run(&ctx, Phase::Map(0)).await.unwrap();
    run(&ctx, Phase::Map(2)).await.unwrap();
    run(&ctx, Phase::Dedup(1)).await.unwrap();
    let err = run(&ctx, Phase::Reduce).await.unwrap_err().to_string();
    assert_eq!(err, "write tasks [0, 1, 2] of 3 have not finished for this spec; run them before the reduce");
    let err = run(&ctx, Phase::Cluster).await.unwrap_err().to_string();
    assert_eq!(err, "dedup tasks [0, 2] of 3 have not finished for this spec; run them before the cluster task");
    let err = run(&ctx, Phase::Dedup(3)).await.unwrap_err().to_string();
    assert_eq!(err, "dedup task 3 does not exist: spec.data.tasks.dedup is 3");
    run(&ctx, Phase::Dedup(0)).await.unwrap();
    run(&ctx, Phase::Dedup(2)).await.unwrap();
    let err = run(&ctx, Phase::Route(1)).await.unwrap_err().to_string();
    assert_eq!(err, "the cluster task has not finished for this spec; run it before the route tasks");
    run(&ctx, Phase::Cluster).await.unwrap();
    run(&ctx, Phase::Route(1)).await.unwrap();
    let err = run(&ctx, Phase::Write(0)).await.unwrap_err().to_string();
    assert_eq!(err, "route tasks [0, 2] of 3 have not finished for this spec; run them before the write tasks");
    run(&ctx, Phase::Route(0)).await.unwrap();
    run(&ctx, Phase::Route(2)).await.unwrap();
    let err = run(&ctx, Phase::Write(3)).await.unwrap_err().to_string();
    assert_eq!(err, "write task 3 does not exist: spec.data.tasks.write is 3");
    for task in 0..3 {
        run(&ctx, Phase::Write(task)).await.unwrap();
    }
    assert!(run(&ctx, Phase::Reduce).await.unwrap().is_some());
}

#[tokio::test]
async fn ngram_quality_classifier_trained_from_reference_sources_keeps_the_good_documents() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let prose = |i: u64| {
        let topics = ["the river", "a new library", "the council", "our school", "the old bridge", "a local farm"];
        let verbs = ["opened", "was repaired", "discussed plans for", "welcomed visitors to", "described"];
        format!(
            "Last week {} {} the town. Residents said that {} {} the area, and many of them were pleased with the result.",
            topics[(i % 6) as usize],
            verbs[(i / 6 % 5) as usize],
            topics[((i + 3) % 6) as usize],
            verbs[((i + 1) % 5) as usize]
        )
    };
    let spam = |i: u64| {
        let words =
            ["cheap", "click", "buy", "now", "free", "casino", "win", "best", "deal", "online", "offer", "bonus"];
        (0..30).map(|k| words[((i * 5 + k * 7) % 12) as usize]).collect::<Vec<_>>().join(" ")
    };
    let write = |name: &str, docs: Vec<String>| {
        let lines: Vec<String> = docs.iter().enumerate().map(|(i, t)| line(&format!("{name}-{i}"), t)).collect();
        std::fs::write(dir.join(format!("{name}.jsonl")), lines.join("\n")).unwrap();
    };
    write("good", (0..60).map(prose).collect());
    write("spam", (0..60).map(spam).collect());
    write("crawl", (0..40).map(|i| if i % 2 == 0 { prose(i + 100) } else { spam(i + 100) }).collect());
    let data = format!(
        "    sources:\n      - {{name: good, url: \"{d}/good.jsonl\", category: reference}}\n      - {{name: spam, url: \"{d}/spam.jsonl\", category: spam}}\n      - {{name: crawl, url: \"{d}/crawl.jsonl\", category: web}}\n    dedup: {{exact: false, minhash: {{enabled: false}}}}\n    quality: {{classifier: ngram, referenceSources: [good], categories: [web]}}\n    heldOutFraction: 0\n    shards: 2",
        d = dir.display()
    );
    let (stats, kept) = prepare_all(&write_manifest(dir, "quality", &data, SMALL_TRAIN), 2).await;
    assert_eq!(stats["quality"]["removed"]["web"], 20, "{}", stats["quality"]);
    let models = std::fs::read_dir(dir.join("store/quality/data-prep/quality"))
        .unwrap()
        .filter(|e| e.as_ref().unwrap().file_name().to_string_lossy().starts_with("model-"))
        .count();
    assert_eq!(models, 1, "one model, trained once for all shards");
    // Measured on the fifth of the labelled documents it did not train on.
    let eval = &stats["quality"]["classifier"];
    assert_eq!(eval["classifier"], "ngram", "{eval}");
    let (train, heldout) = (&eval["trainExamples"], &eval["heldoutExamples"]);
    let total = |v: &serde_json::Value| v[0].as_u64().unwrap() + v[1].as_u64().unwrap();
    assert_eq!(total(train) + total(heldout), 60 + 100, "60 reference documents against 100 others: {eval}");
    // The split is by text: the spam repeats itself, and every copy of a text falls on one side.
    assert!(total(heldout) >= 10 && total(heldout) < 50, "{eval}");
    assert!(eval["f1"].as_f64().unwrap() > 0.9, "{eval}");
    let crawl: Vec<&DocumentLine> = kept.iter().filter(|d| d.source == "crawl").collect();
    assert_eq!(crawl.len(), 20);
    assert!(crawl.iter().all(|d| d.text.starts_with("Last week")), "only the prose of the crawl is kept");
    assert_eq!(kept.iter().filter(|d| d.source == "spam").count(), 60, "unscored categories are untouched");
}

/// Eight topics with their own vocabularies of 80 words, six documents each, interleaved in the
/// file: `web.jsonl` in `dir`.
fn topic_corpus(dir: &Path) {
    let docs: Vec<String> = (0..48u64)
        .map(|i| {
            let topic = i % 8;
            let body = common::words(i, 150, |state| format!("t{topic}w{}", state % 80));
            line(&format!("topic{topic}-{i}"), &body.join(" "))
        })
        .collect();
    std::fs::write(dir.join("web.jsonl"), docs.join("\n")).unwrap();
}

/// How many of the stream's consecutive pairs share a topic.
fn same_topic(stream: &[DocumentLine]) -> usize {
    let topic = |id: &str| id.split('-').next().unwrap().to_string();
    stream.windows(2).filter(|w| topic(&w[0].id) == topic(&w[1].id)).count()
}

const ORDER_TRAIN: &str = "{seqLen: 1024, tokens: 100000, globalBatchTokens: 16384, microBatchSize: 16, schedule: {warmupSteps: 1}, resources: {gpusPerNode: 0}}";

#[tokio::test]
async fn in_context_order_puts_related_documents_side_by_side() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    topic_corpus(dir);
    let data = format!(
        "    sources: [{{name: web, url: \"{d}/web.jsonl\"}}]\n    order: {{strategy: in-context}}\n    heldOutFraction: 0\n    shards: 2",
        d = dir.display()
    );
    let (stats, stream) = prepare_all(&write_manifest(dir, "ordered", &data, ORDER_TRAIN), 2).await;
    assert_eq!(stream.len(), 48);
    // One traversal walks each topic through before it jumps, so all but a few of the 47 pairs of
    // neighbours share a topic; a random order would put about 1 in 8 (6 of 47) on the same topic.
    let same = same_topic(&stream);
    assert!(
        same >= 36,
        "{same} of 47 neighbours share a topic: {:?}",
        stream.iter().map(|d| &d.id).collect::<Vec<_>>()
    );
    let similarity = &stats["train"]["adjacentSimilarity"];
    assert!(
        similarity[0].as_f64().unwrap() > similarity[1].as_f64().unwrap() + 0.2,
        "path against two random documents: {similarity}"
    );
}

/// In-context order split into partitions of about 12 documents, with 1 embed and 1 order task,
/// then 2 embed and 3 order tasks (and other dedup and write counts): the same bytes and statistics,
/// and the topics still follow each other.
#[tokio::test]
async fn in_context_partitions_keep_topics_together_for_any_number_of_tasks() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    topic_corpus(dir);
    let mut first: Option<(serde_json::Value, Vec<DocumentLine>)> = None;
    for (dedup, route, order, write) in [(1, 1, 1, 1), (3, 2, 3, 2)] {
        let data = format!(
            "    sources: [{{name: web, url: \"{d}/web.jsonl\"}}]\n    order: {{strategy: in-context, partitionDocuments: 12}}\n    heldOutFraction: 0.1\n    shards: 3\n    tasks: {{dedup: {dedup}, route: {route}, order: {order}, write: {write}}}",
            d = dir.display()
        );
        let (stats, stream) = prepare_all(&write_manifest(dir, "partitioned", &data, ORDER_TRAIN), 3).await;
        let same = same_topic(&stream);
        let n = stream.len();
        assert!(n > 30 && n < 48, "the held-out documents are not in the stream: {n}");
        assert!(same * 10 >= (n - 1) * 7, "{same} of {} neighbours share a topic", n - 1);
        let similarity = &stats["train"]["adjacentSimilarity"];
        assert!(similarity[0].as_f64().unwrap() > similarity[1].as_f64().unwrap() + 0.2, "{similarity}");
        let cluster = std::fs::read(dir.join("store/partitioned/data-prep/cluster/_DONE.json")).unwrap();
        let partitions = serde_json::from_slice::<serde_json::Value>(&cluster).unwrap()["partitions"].clone();
        assert_eq!(partitions, 4, "about 43 documents on the path, 12 a partition");
        eprintln!("{dedup}/{route}/{order}/{write} tasks: {same} of {} pairs share a topic; {similarity}", n - 1);
        match &first {
            None => first = Some((stats, stream)),
            Some((want_stats, want_stream)) => {
                assert_eq!(&stats, want_stats, "{dedup}/{route}/{order}/{write} tasks");
                let ids = |s: &[DocumentLine]| s.iter().map(|d| d.id.clone()).collect::<Vec<_>>();
                assert_eq!(ids(&stream), ids(want_stream), "{dedup}/{route}/{order}/{write} tasks");
            }
        }
    }
}

/// The shared corpus's Debian licenses (full of near duplicates) and Python sources, through a
/// quality cut, exact and MinHash dedup, a 40/60 mix and held-out split, with 1, 4 and 16 dedup
/// tasks and 1 to 3 route and write tasks: the same output bytes and the same statistics; then the
/// same in in-context order, in partitions of about 100 documents, with 1 to 3 embed and order
/// tasks. (The task counts are not part of the spec's hash, so the later runs reuse the map tasks'
/// outputs and redo the phases after it.)
#[tokio::test]
async fn the_outputs_do_not_depend_on_the_number_of_tasks_on_the_shared_corpus() {
    let tmp = tempfile::tempdir().unwrap();
    let shared = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/corpus");
    let outputs = |name: &str| {
        let stage = tmp.path().join("store").join(name).join("data-prep");
        let mut files = Vec::new();
        for sub in ["shards", "heldout"] {
            let mut names: Vec<_> = std::fs::read_dir(stage.join(sub)).unwrap().map(|e| e.unwrap().path()).collect();
            names.sort();
            files.extend(names.into_iter().map(|p| (p.file_name().unwrap().to_owned(), std::fs::read(p).unwrap())));
        }
        files
    };
    let orders = [("tasks", ""), ("tasks-in-context", "\n    order: {strategy: in-context, partitionDocuments: 100}")];
    for (name, order) in orders {
        check_task_counts(&shared, tmp.path(), name, order, &outputs).await;
    }
}

/// A committed file's name and bytes.
type StageFile = (std::ffi::OsString, Vec<u8>);

/// Runs data-prep of the shared corpus as run `name` (`order` added to its data) with several task
/// counts a phase, and checks that each gives the same bytes and statistics.
async fn check_task_counts(
    shared: &Path,
    dir: &Path,
    name: &str,
    order: &str,
    outputs: &dyn Fn(&str) -> Vec<StageFile>,
) {
    let mut first = None;
    for (dedup, route, order_tasks, write) in [(1, 1, 1, 1), (4, 2, 3, 3), (16, 3, 2, 2)] {
        let data = format!(
            "    sources:\n      - {{name: legal, url: \"{legal}\"}}\n      - {{name: code, url: \"{code}\"}}\n    quality: {{classifier: ngram, referenceSources: [code], keepTopFraction: 0.9}}\n    mix: {{weights: {{legal: 0.4, code: 0.6}}, maxEpochs: 3}}\n    heldOutFraction: 0.05\n    shards: 3\n    tasks: {{dedup: {dedup}, route: {route}, order: {order_tasks}, write: {write}}}{order}",
            legal = shared.join("legal-debian.jsonl.gz").display(),
            code = shared.join("code-python-stdlib.jsonl.gz").display(),
        );
        let manifest = write_manifest(dir, name, &data, SMALL_TRAIN);
        let ctx = Context::from_env(Stage::DataPrep, manifest.to_str().unwrap()).await.unwrap();
        let commit = run(&ctx, Phase::All).await.unwrap().expect("the reduce commits");
        let dedup = &commit.stats["dedup"];
        assert!(dedup["nearRemoved"].as_u64().unwrap() > 10, "the licenses have near duplicates: {dedup}");
        assert!(dedup["exactRemoved"].as_u64().unwrap() > 100, "and exact ones: {dedup}");
        if !order.is_empty() {
            let cluster = std::fs::read(dir.join(format!("store/{name}/data-prep/cluster/_DONE.json"))).unwrap();
            let partitions = serde_json::from_slice::<serde_json::Value>(&cluster).unwrap()["partitions"].clone();
            assert!(partitions.as_u64().unwrap() > 2, "in partitions: {partitions}");
            assert!(commit.stats["train"]["adjacentSimilarity"].is_array(), "{}", commit.stats["train"]);
        }
        let files = outputs(name);
        let tasks = format!("{name}: {dedup}/{route}/{order_tasks}/{write} tasks");
        match &first {
            None => first = Some((commit.stats, files)),
            Some((stats, want)) => {
                assert_eq!(&commit.stats, stats, "{tasks}");
                assert!(files == *want, "{tasks} write other bytes");
            }
        }
    }
}
