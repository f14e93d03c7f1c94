//! The data-prep stage: map shards read, extract and filter their slice of the inputs; dedup tasks
//! find the duplicates in shares of the key space; the cluster task unions them and decides the
//! mix; route and write tasks move every kept document to its output shard, split off the held-out
//! set and order the stream; the reduce commits (see `docs/architecture.md`).
//!
//! Layout under `<run>/data-prep/`:
//! - `map/<shard>-of-<shards>/`: one map shard's kept documents (`docs.jsonl.zst`), their per-document
//!   records (`keys.bin`: position, source, size, quality score, exact hash), MinHash signatures
//!   (`signatures.bin`, fixed-size, in the same order), LSH band buckets (`bands.bin`: band key and
//!   document, sorted), topic terms for in-context ordering (`terms.bin`), and its statistics
//!   (`_DONE.json`, written last).
//!   For in-context order also the feature counts (`df.bin`) and a sample (`sample.bin`).
//! - `dedup/`, `cluster/`, `embed/`, `order/`, `route/`, `write/`: the later phases' outputs
//!   (`buckets.rs`, `cluster.rs`, `incontext.rs`, `route.rs`).
//! - `shards/NNNNN.jsonl.zst`, `heldout/NNNNN.jsonl.zst`: the training stream and the held-out split;
//!   each line is `{id, text, source, category, url?, title?}`.
//!
//! Results do not depend on the shard count: every document has a canonical position (input file,
//! then record), dedup keeps the first of each cluster in that order, and every random choice is a
//! hash of the seed and that position.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use pretrain_crd::spec::{Data, OrderStrategy, QualityClassifier, Source};
use pretrain_store::artifact::DocumentLine;
pub use pretrain_store::artifact::MapStats;
use pretrain_store::{StageCommit, StageDir, Store};
use serde::{Deserialize, Serialize};

use super::buckets::{dedup_task, pack};
use super::cluster::cluster_task;
use super::dedup::{MinHasher, exact_key};
use super::filters::{Verdict, apply};
use super::incontext::{Sketch, embed_task, in_context, order_task};
use super::keys::{KeyRecord, write_terms};
use super::order::top_terms;
use super::quality::ScoreHistogram;
use super::reader::{self, Item, ReadOptions};
use super::reduce::reduce;
use super::route::{route_task, write_task};
use super::runs::{DEFAULT_RUN_ENTRIES, ExternalSorter};
use super::scoring::{QualityScorer, quality_scorer};
use crate::frame::{MapDone, Phase, ScratchError, StageError, scratch};
use crate::progress::Progress;
use crate::{Context, ContextError};

/// Why the stage failed.
#[derive(Debug, thiserror::Error)]
pub enum DataPrepError {
    /// A source could not be listed or read.
    #[error(transparent)]
    Read(#[from] reader::ReadError),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] pretrain_store::Error),
    /// A file the spec names (a quality model, a labels file) could not be read.
    #[error(transparent)]
    Fetch(#[from] ContextError),
    /// Local scratch files failed.
    #[error(transparent)]
    Scratch(#[from] ScratchError),
    /// The spec or an input cannot be used as written (a quality model that does not load, a
    /// malformed labels file, a map task that does not exist).
    #[error("{0}")]
    Invalid(String),
    /// The quality scorer failed on a document.
    #[error("quality scorer: {0}")]
    Scorer(String),
    /// A phase ran before every task of the phase before it finished.
    #[error("{}", tasks_missing(phase, missing, *tasks, next))]
    TasksMissing {
        /// The unfinished phase: `map`, `dedup`, `cluster`, `route` or `write`.
        phase: &'static str,
        /// Its unfinished tasks.
        missing: Vec<u32>,
        /// Its tasks in all.
        tasks: u32,
        /// The phase that needs them.
        next: &'static str,
    },
}

fn tasks_missing(phase: &str, missing: &[u32], tasks: u32, next: &str) -> String {
    if tasks == 1 {
        format!("the {phase} task has not finished for this spec; run it before the {next}")
    } else {
        format!("{phase} tasks {missing:?} of {tasks} have not finished for this spec; run them before the {next}")
    }
}

/// Every task's record of `phase` (`tasks` of them, each read by `done`), or an error naming the
/// ones not finished for this spec, before `next`.
pub(super) async fn all_done<T, F, Fut>(
    phase: &'static str,
    tasks: u32,
    next: &'static str,
    mut done: F,
) -> Result<Vec<T>>
where
    F: FnMut(u32) -> Fut,
    Fut: std::future::Future<Output = Result<Option<T>>>,
{
    let (mut records, mut missing) = (Vec::new(), Vec::new());
    for task in 0..tasks {
        match done(task).await? {
            Some(record) => records.push(record),
            None => missing.push(task),
        }
    }
    if missing.is_empty() { Ok(records) } else { Err(DataPrepError::TasksMissing { phase, missing, tasks, next }) }
}

/// Fails unless `task` is one of the `tasks` of `phase` (`spec.data.tasks.<phase>`).
pub(super) fn check_task(phase: &str, task: u32, tasks: u32) -> Result<()> {
    if task < tasks {
        Ok(())
    } else {
        Err(DataPrepError::Invalid(format!("{phase} task {task} does not exist: spec.data.tasks.{phase} is {tasks}")))
    }
}

/// What running data-prep again can fix: not the spec or the inputs; a store outage, a scorer
/// failure or an early reduce, yes.
impl From<DataPrepError> for StageError {
    fn from(e: DataPrepError) -> Self {
        match e {
            DataPrepError::Read(read) => read.into(),
            DataPrepError::Store(store) => store.into(),
            DataPrepError::Fetch(fetch) => fetch.into(),
            DataPrepError::Invalid(_) => StageError::Invalid(Box::new(e)),
            DataPrepError::Scratch(_) | DataPrepError::Scorer(_) | DataPrepError::TasksMissing { .. } => {
                StageError::Failed(Box::new(e))
            }
        }
    }
}

pub(super) type Result<T, E = DataPrepError> = std::result::Result<T, E>;

/// One input file of the run, in canonical order.
#[derive(Debug, Clone)]
pub(super) struct Input {
    pub(super) source: usize,
    /// The file's path or URL, for messages.
    pub(super) name: String,
    pub(super) location: Location,
}

/// Where an input file is.
#[derive(Debug, Clone)]
pub(super) enum Location {
    Local(PathBuf),
    Remote { store: Store, key: object_store::path::Path },
}

impl Input {
    /// A local path to the file: the file itself, or a download of it into `tmp` (named by `index`,
    /// its place in the run's inputs).
    pub(super) async fn local(&self, tmp: &Path, index: usize) -> Result<PathBuf> {
        Ok(match &self.location {
            Location::Local(p) => p.clone(),
            Location::Remote { store, key } => reader::download(store, &self.name, key, tmp, index).await?,
        })
    }
}

/// Lists every input file of every source, sources in spec order, files sorted.
async fn inputs(data: &Data) -> Result<Vec<Input>> {
    let mut all = Vec::new();
    for (i, source) in data.sources.iter().enumerate() {
        match source.url.split_once("://") {
            Some((scheme @ ("s3" | "gs" | "az"), rest)) => {
                let (bucket, pattern) = rest.split_once('/').unwrap_or((rest, ""));
                let store = Store::open(&format!("{scheme}://{bucket}"))?;
                for key in reader::remote_keys(&store, &source.url, pattern).await? {
                    let name = format!("{scheme}://{bucket}/{key}");
                    all.push(Input { source: i, name, location: Location::Remote { store: store.clone(), key } });
                }
            }
            _ => {
                for path in reader::local_files(&source.url)? {
                    all.push(Input { source: i, name: path.display().to_string(), location: Location::Local(path) });
                }
            }
        }
    }
    Ok(all)
}

/// Bumped when the output format changes, so committed outputs of an older format are redone.
pub const OUTPUT_VERSION: u32 = 2;

/// What a map task records beside its outputs (`_DONE.json`).
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct MapTask {
    /// Layout of the map files; outputs of an older layout are mapped again.
    #[serde(default)]
    format: u32,
    documents: u64,
    pub(super) stats: MapStats,
}

/// The map files' layout: 2 moved signatures out of `keys.bin` and added `bands.bin`; 3 put each
/// document's location in the band entries, indexed them by slice (`bands.idx`) and added the
/// exact-hash index (`exact.bin`, `exact.idx`) and the score histogram (`scores.bin`); 4 writes an
/// exact-hash entry for every document (exact dedup on or off), with its source, size and score; 5
/// adds in-context order's feature counts (`df.bin`) and sample (`sample.bin`).
const MAP_FORMAT: u32 = 5;

pub(super) fn map_dir(shard: u32, shards: u32) -> String {
    format!("map/{shard:05}-of-{shards:05}")
}

pub(super) fn hasher(data: &Data, seed: u64) -> Option<MinHasher> {
    let m = &data.dedup.minhash;
    m.enabled.then(|| MinHasher::new(m.ngram, m.buckets, m.hashes_per_bucket, seed))
}

fn check_supported(data: &Data) -> Result<()> {
    if data.order.strategy == OrderStrategy::Curriculum
        && data.order.curriculum_by == pretrain_crd::spec::CurriculumKey::Quality
        && data.quality.classifier == QualityClassifier::None
    {
        return Err(DataPrepError::Invalid(
            "spec.data.order.curriculumBy: quality needs a quality classifier (spec.data.quality.classifier)".into(),
        ));
    }
    Ok(())
}

/// Runs the stage's `phase` and returns the commit when the reduce ran.
pub async fn run(ctx: &Context, phase: Phase) -> Result<Option<StageCommit>> {
    let data = &ctx.run.spec.data;
    check_supported(data)?;
    let hash = ctx.config_hash();
    match phase {
        Phase::Map(shard) => {
            map_shard(ctx, shard, &hash).await?;
            Ok(None)
        }
        Phase::Dedup(task) => {
            dedup_task(ctx, task, &hash).await?;
            Ok(None)
        }
        Phase::Cluster => {
            cluster_task(ctx, &hash).await?;
            Ok(None)
        }
        Phase::Embed(task) => {
            embed_task(ctx, task, &hash).await?;
            Ok(None)
        }
        Phase::Order(task) => {
            order_task(ctx, task, &hash).await?;
            Ok(None)
        }
        Phase::Route(task) => {
            route_task(ctx, task, &hash).await?;
            Ok(None)
        }
        Phase::Write(task) => {
            write_task(ctx, task, &hash).await?;
            Ok(None)
        }
        Phase::Reduce => reduce(ctx, &hash).await.map(Some),
        Phase::All => {
            for shard in 0..data.shards {
                map_shard(ctx, shard, &hash).await?;
            }
            for task in 0..data.dedup_tasks() {
                dedup_task(ctx, task, &hash).await?;
            }
            cluster_task(ctx, &hash).await?;
            if in_context(data) {
                for task in 0..data.embed_tasks() {
                    embed_task(ctx, task, &hash).await?;
                }
                for task in 0..data.order_tasks() {
                    order_task(ctx, task, &hash).await?;
                }
            }
            for task in 0..data.route_tasks() {
                route_task(ctx, task, &hash).await?;
            }
            for task in 0..data.write_tasks() {
                write_task(ctx, task, &hash).await?;
            }
            reduce(ctx, &hash).await.map(Some)
        }
    }
}

pub(super) async fn map_done(dir: &StageDir, shard: u32, shards: u32, hash: &str) -> Result<Option<MapDone<MapTask>>> {
    let done = MapDone::<MapTask>::read(dir, &format!("{}/_DONE.json", map_dir(shard, shards))).await?;
    Ok(done.filter(|d| d.config_hash == hash && d.task.format == MAP_FORMAT))
}

async fn map_shard(ctx: &Context, shard: u32, hash: &str) -> Result<()> {
    let data = ctx.run.spec.data.clone();
    let shards = data.shards;
    if shard >= shards {
        return Err(DataPrepError::Invalid(format!("map shard {shard} does not exist: spec.data.shards is {shards}")));
    }
    if map_done(&ctx.dir, shard, shards, hash).await?.is_some() {
        return Ok(());
    }
    let all = inputs(&data).await?;
    let model = quality_scorer(ctx, hash, &all).await?;
    let tmp = tempfile::tempdir().map_err(scratch(Path::new("tempdir")))?;
    // Fetch this shard's remote inputs first; the map itself is synchronous CPU work.
    let mut mine = Vec::new();
    for (index, input) in all.into_iter().enumerate() {
        if index as u32 % shards != shard {
            continue;
        }
        let path = input.local(tmp.path(), index).await?;
        mine.push((index as u32, input, path));
    }
    let seed = ctx.run.spec.seed;
    let out = tmp.path().to_path_buf();
    let mut progress = Progress::new(format!("data-prep map {shard}"), "documents", None);
    let (documents, stats) =
        tokio::task::spawn_blocking(move || map_files(&data, seed, shard, model.as_ref(), &mine, &out, &mut progress))
            .await
            .expect("the map task does not panic")?;

    let dir_name = map_dir(shard, shards);
    for file in MAP_FILES {
        ctx.dir.put_file(&format!("{dir_name}/{file}"), &tmp.path().join(file)).await?;
    }
    let done = MapDone { config_hash: hash.into(), task: MapTask { format: MAP_FORMAT, documents, stats } };
    done.write(&ctx.dir, &format!("{dir_name}/_DONE.json")).await?;
    Ok(())
}

const MAP_FILES: [&str; 11] = [
    "docs.jsonl.zst",
    "keys.bin",
    "signatures.bin",
    "bands.bin",
    "bands.idx",
    "exact.bin",
    "exact.idx",
    "scores.bin",
    "terms.bin",
    "df.bin",
    "sample.bin",
];

/// A map task's outputs, written as documents are kept: `docs.jsonl.zst`, their key records, MinHash
/// signatures (in document order), LSH band entries (sorted on local disk) and topic terms (for
/// in-context ordering; empty for other orders).
struct MapWriter {
    out: PathBuf,
    docs: zstd::Encoder<'static, BufWriter<File>>,
    keys: BufWriter<File>,
    signatures: BufWriter<File>,
    /// `[band key, document, location]`, location being `shard << 32 | line`.
    bands: ExternalSorter<3>,
    /// `[exact hash (2 words), document, location, source << 32 | bytes, score bits]`, one a
    /// document (the dedup tasks count the documents from these, with exact dedup on or off).
    exact: ExternalSorter<6>,
    scores: ScoreHistogram,
    terms: BufWriter<File>,
    /// In-context order's feature counts and sample.
    sketch: Option<Sketch>,
    minhash: Option<MinHasher>,
    shard: u32,
    written: u64,
}

impl MapWriter {
    fn create(out: &Path, data: &Data, seed: u64, shard: u32) -> Result<Self, ScratchError> {
        let create = |name: &str| {
            let path = out.join(name);
            File::create(&path).map(BufWriter::new).map_err(scratch(&path))
        };
        let docs_path = out.join("docs.jsonl.zst");
        let docs = zstd::Encoder::new(create("docs.jsonl.zst")?, 3).map_err(scratch(&docs_path))?;
        Ok(Self {
            out: out.to_path_buf(),
            docs,
            keys: create("keys.bin")?,
            signatures: create("signatures.bin")?,
            bands: ExternalSorter::new(&out.join("band-runs"), DEFAULT_RUN_ENTRIES),
            exact: ExternalSorter::new(&out.join("exact-runs"), DEFAULT_RUN_ENTRIES),
            scores: ScoreHistogram::default(),
            terms: create("terms.bin")?,
            minhash: hasher(data, seed),
            sketch: in_context(data).then(|| Sketch::new(data, seed)),
            shard,
            written: 0,
        })
    }

    /// Writes one kept document and its records.
    fn write(&mut self, line: &DocumentLine, record: &KeyRecord) -> std::io::Result<()> {
        let signature = self.minhash.as_ref().map(|m| m.signature(&line.text)).unwrap_or_default();
        serde_json::to_writer(&mut self.docs, line).map_err(std::io::Error::other)?;
        self.docs.write_all(b"\n")?;
        record.write(&mut self.keys)?;
        signature.iter().try_for_each(|h| self.signatures.write_all(&h.to_le_bytes()))?;
        let location = u64::from(self.shard) << 32 | self.written;
        if let Some(m) = &self.minhash {
            m.band_keys(&signature).into_iter().try_for_each(|k| self.bands.push([k, record.doc(), location]))?;
        }
        let hash = record.exact;
        let [packed, score] = pack(record);
        self.exact.push([(hash >> 64) as u64, hash as u64, record.doc(), location, packed, score])?;
        self.scores.add(record.source, record.score);
        self.written += 1;
        if let Some(sketch) = &mut self.sketch {
            let terms = top_terms(&line.text);
            write_terms(&mut self.terms, &terms)?;
            sketch.add(record, &terms);
        }
        Ok(())
    }

    fn finish(self) -> Result<(), ScratchError> {
        let path = |name: &str| self.out.join(name);
        self.docs.finish().and_then(|mut w| w.flush()).map_err(scratch(&path("docs.jsonl.zst")))?;
        let mut keys = self.keys;
        keys.flush().map_err(scratch(&path("keys.bin")))?;
        let mut signatures = self.signatures;
        signatures.flush().map_err(scratch(&path("signatures.bin")))?;
        for (name, index) in [
            ("bands", self.bands.finish(&path("bands.bin"), false)),
            ("exact", self.exact.finish(&path("exact.bin"), false)),
        ] {
            let index = index.map_err(scratch(&path(&format!("{name}.bin"))))?;
            let idx = path(&format!("{name}.idx"));
            std::fs::write(&idx, index.to_bytes()).map_err(scratch(&idx))?;
        }
        let scores = path("scores.bin");
        std::fs::write(&scores, self.scores.to_bytes()).map_err(scratch(&scores))?;
        Sketch::finish(self.sketch.as_ref(), &self.out).map_err(scratch(&path("df.bin")))?;
        let mut terms = self.terms;
        terms.flush().map_err(scratch(&path("terms.bin")))
    }
}

/// A kept document's line and key record; `at` is its input file, source index and record number.
fn kept(
    doc: reader::RawDocument,
    text: String,
    score: f32,
    source: &Source,
    at: (u32, u16, u32),
) -> (DocumentLine, KeyRecord) {
    let (input, source_index, seq) = at;
    let record = KeyRecord {
        input,
        seq,
        source: source_index,
        bytes: text.len().min(u32::MAX as usize) as u32,
        score,
        exact: exact_key(&text),
    };
    let line = DocumentLine {
        id: doc.id,
        text,
        source: source.name.clone(),
        category: source.category().to_string(),
        url: doc.url,
        title: doc.title,
    };
    (line, record)
}

/// A document the rules kept: as read, its cleaned text, its place (input file, source, record) and
/// its file's position in the task's inputs (for messages).
type KeptDocument = (reader::RawDocument, String, (u32, u16, u32), usize);

/// Documents the rules kept, waiting for their quality scores: scored a batch at a time (the BERT
/// models run a batch at once), then written in the order they were read.
struct Pending<'a> {
    docs: Vec<KeptDocument>,
    model: Option<&'a QualityScorer>,
    batch: usize,
}

impl Pending<'_> {
    fn is_full(&self) -> bool {
        self.docs.len() >= self.batch
    }

    /// Scores and writes the waiting documents.
    fn flush(&mut self, data: &Data, inputs: &[(u32, Input, PathBuf)], writer: &mut MapWriter) -> Result<u64> {
        let docs = std::mem::take(&mut self.docs);
        let scores = match self.model {
            None => vec![1.0; docs.len()],
            Some(model) => {
                let texts: Vec<&str> = docs.iter().map(|d| d.1.as_str()).collect();
                model.score_batch(&texts, self.batch).map_err(|e| {
                    let (_, _, (_, _, seq), file) = &docs[0];
                    DataPrepError::Scorer(format!("{}: records {seq} and after: {e}", inputs[*file].1.name))
                })?
            }
        };
        let written = docs.len() as u64;
        for ((doc, text, at, _), score) in docs.into_iter().zip(scores) {
            let (line, record) = kept(doc, text, score, &data.sources[usize::from(at.1)], at);
            writer.write(&line, &record).map_err(scratch(&writer.out))?;
        }
        Ok(written)
    }
}

fn map_files(
    data: &Data,
    seed: u64,
    shard: u32,
    model: Option<&QualityScorer>,
    inputs: &[(u32, Input, PathBuf)],
    out: &Path,
    progress: &mut Progress,
) -> Result<(u64, MapStats)> {
    let mut read = 0u64;
    let mut writer = MapWriter::create(out, data, seed, shard)?;
    let mut stats = MapStats::default();
    let mut documents = 0u64;
    let mut lines_removed: HashMap<&'static str, u64> = HashMap::new();
    let batch = if model.is_some() { data.quality.batch_size as usize } else { 1 };
    let mut pending = Pending { docs: Vec::with_capacity(batch), model, batch };
    let mut flush_error = None;
    for (position, (index, input, path)) in inputs.iter().enumerate() {
        let source: &Source = &data.sources[input.source];
        let filters =
            source.filters_over(&data.filters, "filters").map_err(|e| DataPrepError::Invalid(format!("{}", e[0])))?;
        let format = source.resolved_format().expect("validated: every source has a format");
        let options = ReadOptions {
            format,
            text_field: &source.text_field,
            max_document_bytes: data.max_document_bytes,
            extract: &data.extract,
        };
        stats.files += 1;
        let mut seq = 0u32;
        reader::read_file(path, &options, &mut |item| match item {
            Item::Skipped(mut s) => {
                stats.malformed += 1;
                if stats.malformed_examples.len() < MapStats::MALFORMED_EXAMPLES {
                    s.file = input.name.clone();
                    stats.malformed_examples.push(s);
                }
            }
            Item::Document(_) if flush_error.is_some() => {}
            Item::Document(doc) => {
                seq += 1;
                read += 1;
                progress.update(read, || format!("{} files", stats.files));
                *stats.read.entry(source.name.clone()).or_default() += 1;
                if let Some(charset) = doc.charset {
                    *stats.decoded.entry(charset.to_string()).or_default() += 1;
                }
                let text = match apply(&filters, &doc.text, &mut lines_removed) {
                    Verdict::Keep(text) => text,
                    Verdict::Drop { filter, reason } => {
                        *stats.dropped.entry(format!("{filter}/{reason}")).or_default() += 1;
                        return;
                    }
                };
                if text.trim().is_empty() {
                    stats.empty += 1;
                    return;
                }
                *stats.kept.entry(source.name.clone()).or_default() += 1;
                pending.docs.push((doc, text, (*index, input.source as u16, seq), position));
                if pending.is_full() && flush_error.is_none() {
                    match pending.flush(data, inputs, &mut writer) {
                        Ok(n) => documents += n,
                        Err(e) => flush_error = Some(e),
                    }
                }
            }
        })?;
        if let Some(e) = flush_error.take() {
            return Err(e);
        }
    }
    documents += pending.flush(data, inputs, &mut writer)?;
    writer.finish()?;
    stats.lines_removed = lines_removed.into_iter().map(|(k, v)| (k.to_string(), v)).collect();
    Ok((documents, stats))
}
