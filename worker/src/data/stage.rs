//! The data-prep stage: map shards read, extract and filter their slice of the inputs; the reduce
//! deduplicates across all shards, splits off the held-out set, mixes categories and orders the
//! documents, then writes `jsonl.zst` shards and commits.
//!
//! Layout under `<run>/data-prep/`:
//! - `map/<shard>-of-<shards>/`: one map shard's kept documents (`docs.jsonl.zst`), their per-document
//!   records (`keys.bin`: position, source, size, quality score, exact hash), MinHash signatures
//!   (`signatures.bin`, fixed-size, in the same order), LSH band buckets (`bands.bin`: band key and
//!   document, sorted), topic terms for in-context ordering (`terms.bin`), and its statistics
//!   (`_DONE.json`, written last).
//! - `shards/NNNNN.jsonl.zst`, `heldout/00000.jsonl.zst`: the training stream and the held-out split;
//!   each line is `{id, text, source, category, url?, title?}`.
//!
//! Results do not depend on the shard count: every document has a canonical position (input file,
//! then record), dedup keeps the first of each cluster in that order, and every random choice is a
//! hash of the seed and that position.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::File;
use std::io::{BufRead, BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use bytes::Bytes;
use pretrain_crd::spec::{Data, OrderStrategy, QualityClassifier, Source};
use pretrain_store::artifact::DocumentLine;
use pretrain_store::{FileEntry, StageCommit, StageDir, Store};
use serde::{Deserialize, Serialize};
use xxhash_rust::xxh3::xxh3_64_with_seed;

use super::bert::BertScorer;
use super::dedup::{ClusterStats, DiskIndex, MinHasher, exact_key};
use super::filters::{Verdict, apply};
use super::order::{Item as OrderItem, in_context, top_terms};
use super::quality::{QualityError, QualityModel, Training, top_fraction_threshold};
use super::reader::{self, Item, ReadOptions};
use super::runs::{DEFAULT_RUN_ENTRIES, ExternalSorter};
use crate::context::read_url;
use crate::frame::{Phase, ScratchError, StageError, scratch};
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
    /// The reduce ran before every map task finished.
    #[error("map shards {missing:?} of {shards} have not finished for this spec; run them before the reduce")]
    MapsMissing {
        /// The unfinished map tasks.
        missing: Vec<u32>,
        /// Map tasks in all.
        shards: u32,
    },
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
            DataPrepError::Scratch(_) | DataPrepError::Scorer(_) | DataPrepError::MapsMissing { .. } => {
                StageError::Failed(Box::new(e))
            }
        }
    }
}

type Result<T, E = DataPrepError> = std::result::Result<T, E>;

/// One input file of the run, in canonical order.
#[derive(Debug, Clone)]
struct Input {
    source: usize,
    /// The file's path or URL, for messages.
    name: String,
    location: Location,
}

#[derive(Debug, Clone)]
enum Location {
    Local(PathBuf),
    Remote { store: Store, key: object_store::path::Path },
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
pub const OUTPUT_VERSION: u32 = 1;

/// Per-document dedup record in `keys.bin`.
#[derive(Debug, Clone, PartialEq)]
struct KeyRecord {
    input: u32,
    seq: u32,
    source: u16,
    bytes: u32,
    /// Quality score in [0, 1]; 1 when no classifier runs.
    score: f32,
    exact: u128,
}

impl KeyRecord {
    fn write(&self, out: &mut impl Write) -> std::io::Result<()> {
        out.write_all(&self.input.to_le_bytes())?;
        out.write_all(&self.seq.to_le_bytes())?;
        out.write_all(&self.source.to_le_bytes())?;
        out.write_all(&self.bytes.to_le_bytes())?;
        out.write_all(&self.score.to_le_bytes())?;
        out.write_all(&self.exact.to_le_bytes())
    }

    /// The document's canonical position as one sortable number.
    fn doc(&self) -> u64 {
        document_id(self.input, self.seq)
    }

    fn parse_all(bytes: &[u8]) -> Option<Vec<Self>> {
        const SIZE: usize = 34;
        if !bytes.len().is_multiple_of(SIZE) {
            return None;
        }
        let u32_at = |b: &[u8], i: usize| u32::from_le_bytes(b[i..i + 4].try_into().expect("4 bytes"));
        Some(
            bytes
                .chunks_exact(SIZE)
                .map(|r| KeyRecord {
                    input: u32_at(r, 0),
                    seq: u32_at(r, 4),
                    source: u16::from_le_bytes(r[8..10].try_into().expect("2 bytes")),
                    bytes: u32_at(r, 10),
                    score: f32::from_le_bytes(r[14..18].try_into().expect("4 bytes")),
                    exact: u128::from_le_bytes(r[18..34].try_into().expect("16 bytes")),
                })
                .collect(),
        )
    }
}

/// A document's canonical position (input file, then record) as one number that sorts the same way.
fn document_id(input: u32, seq: u32) -> u64 {
    u64::from(input) << 32 | u64::from(seq)
}

/// What one map shard saw.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MapStats {
    /// Input files read.
    pub files: u64,
    /// Documents read, per source.
    pub read: BTreeMap<String, u64>,
    /// Documents kept by the rule filters, per source.
    pub kept: BTreeMap<String, u64>,
    /// Documents dropped, per filter and reason (`c4/too_few_sentences`).
    pub dropped: BTreeMap<String, u64>,
    /// Lines removed by C4 from kept documents, per reason.
    pub lines_removed: BTreeMap<String, u64>,
    /// Empty documents dropped after cleaning.
    pub empty: u64,
    /// Records skipped as malformed.
    pub malformed: u64,
    /// The first malformed records, with file and offset.
    pub malformed_examples: Vec<reader::Skipped>,
}

impl MapStats {
    fn merge(&mut self, other: &MapStats) {
        let add = |a: &mut BTreeMap<String, u64>, b: &BTreeMap<String, u64>| {
            for (k, v) in b {
                *a.entry(k.clone()).or_default() += v;
            }
        };
        self.files += other.files;
        add(&mut self.read, &other.read);
        add(&mut self.kept, &other.kept);
        add(&mut self.dropped, &other.dropped);
        add(&mut self.lines_removed, &other.lines_removed);
        self.empty += other.empty;
        self.malformed += other.malformed;
        let room = MALFORMED_EXAMPLES.saturating_sub(self.malformed_examples.len());
        self.malformed_examples.extend(other.malformed_examples.iter().take(room).cloned());
    }
}

const MALFORMED_EXAMPLES: usize = 100;

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct MapDone {
    config_hash: String,
    /// Layout of the map files; outputs of an older layout are mapped again.
    #[serde(default)]
    format: u32,
    documents: u64,
    stats: MapStats,
}

/// The map files' layout: 2 moved signatures out of `keys.bin` and added `bands.bin`.
const MAP_FORMAT: u32 = 2;

fn map_dir(shard: u32, shards: u32) -> String {
    format!("map/{shard:05}-of-{shards:05}")
}

fn hasher(data: &Data, seed: u64) -> Option<MinHasher> {
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

/// Where the trained quality model is kept for every map shard; keyed by the config hash so a model
/// trained for other settings is never reused.
fn quality_model_name(hash: &str) -> String {
    format!("quality/model-{}.bin", &hash[..hash.len().min(16)])
}

/// A model-based quality scorer.
#[derive(Debug)]
enum QualityScorer {
    Ngram(QualityModel),
    Bert(Box<BertScorer>),
}

impl QualityScorer {
    fn score(&self, text: &str) -> Result<f32, String> {
        match self {
            QualityScorer::Ngram(model) => Ok(model.score(text)),
            QualityScorer::Bert(model) => model.score(text).map_err(|e| e.to_string()),
        }
    }
}

/// The configured quality scorer, if any.
async fn quality_scorer(ctx: &Context, hash: &str, all: &[Input]) -> Result<Option<QualityScorer>> {
    let q = &ctx.run.spec.data.quality;
    match q.classifier {
        QualityClassifier::None => Ok(None),
        QualityClassifier::Ngram => Ok(Some(QualityScorer::Ngram(quality_model(ctx, hash, all).await?))),
        QualityClassifier::Bert => {
            let url = q.model_url.as_deref().expect("validated: bert has a modelUrl");
            let dir = url.trim_end_matches('/');
            let config = read_url(&format!("{dir}/config.json")).await?;
            let weights = read_url(&format!("{dir}/model.safetensors")).await?;
            let tokenizer = read_url(&format!("{dir}/tokenizer.json")).await?;
            // Data-prep pods are CPU pods; a GPU build on a GPU node uses the GPU.
            let device = candle_core::Device::cuda_if_available(0).unwrap_or(candle_core::Device::Cpu);
            let scorer =
                tokio::task::spawn_blocking(move || BertScorer::from_bytes(&config, &weights, &tokenizer, &device))
                    .await
                    .expect("loading the model does not panic")
                    .map_err(|e| DataPrepError::Invalid(format!("spec.data.quality.modelUrl: {dir}/{e}")))?;
            Ok(Some(QualityScorer::Bert(Box::new(scorer))))
        }
    }
}

/// The n-gram quality model: loaded from `modelUrl`, else from an earlier map shard, else trained
/// here from `labelledUrl` or from the reference sources against the rest (deterministic, so
/// every shard that trains it gets the same model).
async fn quality_model(ctx: &Context, hash: &str, all: &[Input]) -> Result<QualityModel> {
    let q = &ctx.run.spec.data.quality;
    let bad_model = |url: &str, e: QualityError| DataPrepError::Invalid(format!("{url}: {e}"));
    if let Some(url) = &q.model_url {
        let bytes = read_url(url).await?;
        return QualityModel::from_bytes(&bytes).map_err(|e| bad_model(url, e));
    }
    let name = quality_model_name(hash);
    let key = ctx.dir.key(&name)?;
    if let Some(bytes) = ctx.dir.store().get_opt(&key).await? {
        return QualityModel::from_bytes(&bytes).map_err(|e| bad_model(&ctx.dir.url(&name), e));
    }
    let data = ctx.run.spec.data.clone();
    let examples: Vec<(String, bool)> = match &q.labelled_url {
        Some(url) => labelled_examples(url, &read_url(url).await?)?,
        None => {
            let tmp = tempfile::tempdir().map_err(scratch(Path::new("tempdir")))?;
            let mut local = Vec::new();
            for (i, input) in all.iter().enumerate() {
                let path = match &input.location {
                    Location::Local(p) => p.clone(),
                    Location::Remote { store, key } => reader::download(store, &input.name, key, tmp.path(), i).await?,
                };
                local.push((input.source, path));
            }
            tokio::task::spawn_blocking(move || reference_examples(&data, &local))
                .await
                .expect("sampling does not panic")?
        }
    };
    let borrowed: Vec<(&str, bool)> = examples.iter().map(|(t, y)| (t.as_str(), *y)).collect();
    let training = Training { seed: ctx.run.spec.seed, ..Training::default() };
    let model = QualityModel::train(&borrowed, training)
        .map_err(|e| DataPrepError::Invalid(format!("spec.data.quality: {e}")))?;
    ctx.dir.put(&name, Bytes::from(model.to_bytes())).await?;
    Ok(model)
}

/// `{text, label}` lines; a label is true/false, 1/0, or "good"/"bad"/"hq"/"lq".
fn labelled_examples(url: &str, bytes: &[u8]) -> Result<Vec<(String, bool)>> {
    let mut out = Vec::new();
    for (i, line) in bytes.split(|b| *b == b'\n').enumerate() {
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let bad = |why: &str| DataPrepError::Invalid(format!("{url}:{}: {why}", i + 1));
        let value: serde_json::Value = serde_json::from_slice(line).map_err(|e| bad(&format!("invalid JSON: {e}")))?;
        let text = value.get("text").and_then(|t| t.as_str()).ok_or_else(|| bad("no string field \"text\""))?;
        let label = match value.get("label") {
            Some(serde_json::Value::Bool(b)) => *b,
            Some(serde_json::Value::Number(n)) => n.as_f64().is_some_and(|x| x > 0.5),
            Some(serde_json::Value::String(s)) => matches!(s.as_str(), "good" | "hq" | "positive" | "1" | "true"),
            _ => return Err(bad("no label (true/false, 1/0 or \"good\"/\"bad\")")),
        };
        out.push((text.to_string(), label));
    }
    Ok(out)
}

/// Most documents sampled per class when training from sources.
const QUALITY_SAMPLE: usize = 20_000;

/// Positive examples: documents of the reference sources; negative: the other sources' documents,
/// both as extracted (before the rule filters), the first `QUALITY_SAMPLE` of each in canonical order.
fn reference_examples(data: &Data, inputs: &[(usize, PathBuf)]) -> Result<Vec<(String, bool)>> {
    let reference: HashSet<&str> = data.quality.reference_sources.iter().map(String::as_str).collect();
    let (mut positive, mut negative) = (Vec::new(), Vec::new());
    for (source_index, path) in inputs {
        let source = &data.sources[*source_index];
        let is_reference = reference.contains(source.name.as_str());
        let wanted = if is_reference { &mut positive } else { &mut negative };
        if wanted.len() >= QUALITY_SAMPLE {
            continue;
        }
        let options = ReadOptions {
            format: source.resolved_format().expect("validated: every source has a format"),
            text_field: &source.text_field,
            max_document_bytes: data.max_document_bytes,
            extract: &data.extract,
        };
        reader::read_file(path, &options, &mut |item| {
            if let Item::Document(d) = item
                && wanted.len() < QUALITY_SAMPLE
            {
                wanted.push((d.text, is_reference));
            }
        })?;
    }
    positive.extend(negative);
    Ok(positive)
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
        Phase::Reduce => reduce(ctx, &hash).await.map(Some),
        Phase::All => {
            for shard in 0..data.shards {
                map_shard(ctx, shard, &hash).await?;
            }
            reduce(ctx, &hash).await.map(Some)
        }
    }
}

async fn map_done(dir: &StageDir, shard: u32, shards: u32, hash: &str) -> Result<Option<MapDone>> {
    let key = dir.key(&format!("{}/_DONE.json", map_dir(shard, shards)))?;
    let Some(bytes) = dir.store().get_opt(&key).await? else { return Ok(None) };
    let done: MapDone = serde_json::from_slice(&bytes).map_err(|e| pretrain_store::Error::Corrupt {
        store: dir.store().url().into(),
        key: key.to_string(),
        reason: e.to_string(),
    })?;
    Ok((done.config_hash == hash && done.format == MAP_FORMAT).then_some(done))
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
        let path = match &input.location {
            Location::Local(p) => p.clone(),
            Location::Remote { store, key } => reader::download(store, &input.name, key, tmp.path(), index).await?,
        };
        mine.push((index as u32, input, path));
    }
    let seed = ctx.run.spec.seed;
    let out = tmp.path().to_path_buf();
    let mut progress = Progress::new(format!("data-prep map {shard}"), "documents", None);
    let (documents, stats) =
        tokio::task::spawn_blocking(move || map_files(&data, seed, model.as_ref(), &mine, &out, &mut progress))
            .await
            .expect("the map task does not panic")?;

    let dir_name = map_dir(shard, shards);
    for file in MAP_FILES {
        ctx.dir.put_file(&format!("{dir_name}/{file}"), &tmp.path().join(file)).await?;
    }
    let done = MapDone { config_hash: hash.into(), format: MAP_FORMAT, documents, stats };
    let json = serde_json::to_vec_pretty(&done).expect("stats serialise");
    ctx.dir.put(&format!("{dir_name}/_DONE.json"), Bytes::from(json)).await?;
    Ok(())
}

const MAP_FILES: [&str; 5] = ["docs.jsonl.zst", "keys.bin", "signatures.bin", "bands.bin", "terms.bin"];

fn map_files(
    data: &Data,
    seed: u64,
    model: Option<&QualityScorer>,
    inputs: &[(u32, Input, PathBuf)],
    out: &Path,
    progress: &mut Progress,
) -> Result<(u64, MapStats)> {
    let mut read = 0u64;
    let docs_path = out.join("docs.jsonl.zst");
    let keys_path = out.join("keys.bin");
    let mut docs = zstd::Encoder::new(BufWriter::new(File::create(&docs_path).map_err(scratch(&docs_path))?), 3)
        .map_err(scratch(&docs_path))?;
    let mut keys = BufWriter::new(File::create(&keys_path).map_err(scratch(&keys_path))?);
    // Topic terms for in-context ordering (empty for other orders).
    let terms_path = out.join("terms.bin");
    let mut terms = BufWriter::new(File::create(&terms_path).map_err(scratch(&terms_path))?);
    let in_context = data.order.strategy == OrderStrategy::InContext;
    let minhash = hasher(data, seed);
    // MinHash signatures in document order, and the LSH band entries sorted on local disk.
    let signatures_path = out.join("signatures.bin");
    let mut signatures = BufWriter::new(File::create(&signatures_path).map_err(scratch(&signatures_path))?);
    let runs_dir = out.join("band-runs");
    std::fs::create_dir_all(&runs_dir).map_err(scratch(&runs_dir))?;
    let mut bands = ExternalSorter::new(&runs_dir, DEFAULT_RUN_ENTRIES);
    let mut stats = MapStats::default();
    let mut documents = 0u64;
    let mut lines_removed: HashMap<&'static str, u64> = HashMap::new();
    let mut write_error = None;
    let mut score_error = None;
    for (index, input, path) in inputs {
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
                if stats.malformed_examples.len() < MALFORMED_EXAMPLES {
                    s.file = input.name.clone();
                    stats.malformed_examples.push(s);
                }
            }
            Item::Document(doc) => {
                seq += 1;
                read += 1;
                progress.update(read, || format!("{} files", stats.files));
                *stats.read.entry(source.name.clone()).or_default() += 1;
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
                let score = match model.map(|m| m.score(&text)) {
                    None => 1.0,
                    Some(Ok(score)) => score,
                    Some(Err(e)) => {
                        score_error.get_or_insert_with(|| format!("{}: record {seq}: {e}", input.name));
                        return;
                    }
                };
                *stats.kept.entry(source.name.clone()).or_default() += 1;
                let record = KeyRecord {
                    input: *index,
                    seq,
                    source: input.source as u16,
                    bytes: text.len().min(u32::MAX as usize) as u32,
                    score,
                    exact: exact_key(&text),
                };
                let signature = minhash.as_ref().map(|m| m.signature(&text)).unwrap_or_default();
                let line = DocumentLine {
                    id: doc.id,
                    text,
                    source: source.name.clone(),
                    category: source.category().to_string(),
                    url: doc.url,
                    title: doc.title,
                };
                let result = serde_json::to_writer(&mut docs, &line)
                    .map_err(std::io::Error::other)
                    .and_then(|()| docs.write_all(b"\n"))
                    .and_then(|()| record.write(&mut keys))
                    .and_then(|()| signature.iter().try_for_each(|h| signatures.write_all(&h.to_le_bytes())))
                    .and_then(|()| match &minhash {
                        Some(m) => m.band_keys(&signature).into_iter().try_for_each(|k| bands.push((k, record.doc()))),
                        None => Ok(()),
                    })
                    .and_then(|()| if in_context { write_terms(&mut terms, &top_terms(&line.text)) } else { Ok(()) });
                if let Err(e) = result {
                    write_error.get_or_insert(e);
                }
                documents += 1;
            }
        })?;
        if let Some(e) = write_error.take() {
            return Err(scratch(out)(e).into());
        }
        if let Some(e) = score_error.take() {
            return Err(DataPrepError::Scorer(e));
        }
    }
    docs.finish().and_then(|mut w| w.flush()).map_err(scratch(&docs_path))?;
    keys.flush().map_err(scratch(&keys_path))?;
    signatures.flush().map_err(scratch(&signatures_path))?;
    let bands_path = out.join("bands.bin");
    bands.finish(&bands_path).map_err(scratch(&bands_path))?;
    terms.flush().map_err(scratch(&terms_path))?;
    stats.lines_removed = lines_removed.into_iter().map(|(k, v)| (k.to_string(), v)).collect();
    Ok((documents, stats))
}

/// Where one kept document goes: held out, or `copies` times into the training stream.
#[derive(Debug, Clone, Copy)]
struct Placement {
    held_out: bool,
    copies: u32,
}

/// A uniform number in [0, 1) from the seed, a purpose, and a document's canonical position.
fn unit(seed: u64, purpose: u64, input: u32, seq: u32) -> f64 {
    let h = xxh3_64_with_seed(&[u64::from(input) << 32 | u64::from(seq), purpose].map(u64::to_le_bytes).concat(), seed);
    (h >> 11) as f64 / (1u64 << 53) as f64
}

async fn reduce(ctx: &Context, hash: &str) -> Result<StageCommit> {
    let spec = &ctx.run.spec;
    let data = &spec.data;
    let shards = data.shards;
    let minhash = hasher(data, spec.seed);
    let signature_len =
        minhash.as_ref().map_or(0, |_| (data.dedup.minhash.buckets * data.dedup.minhash.hashes_per_bucket) as usize);
    let tmp = tempfile::tempdir().map_err(scratch(Path::new("tempdir")))?;

    // Every map shard must be done for this spec.
    let mut stats = MapStats::default();
    let mut missing = Vec::new();
    let mut records: Vec<(u32, usize, KeyRecord)> = Vec::new();
    let mut doc_terms: HashMap<(u32, usize), Vec<(u32, u16)>> = HashMap::new();
    for shard in 0..shards {
        let Some(done) = map_done(&ctx.dir, shard, shards, hash).await? else {
            missing.push(shard);
            continue;
        };
        stats.merge(&done.stats);
        let key = ctx.dir.key(&format!("{}/keys.bin", map_dir(shard, shards)))?;
        let bytes = ctx.dir.store().get(&key).await?;
        let parsed = KeyRecord::parse_all(&bytes).ok_or_else(|| pretrain_store::Error::Corrupt {
            store: ctx.dir.store().url().into(),
            key: key.to_string(),
            reason: "not a whole number of key records".into(),
        })?;
        if data.order.strategy == OrderStrategy::InContext {
            let key = ctx.dir.key(&format!("{}/terms.bin", map_dir(shard, shards)))?;
            let bytes = ctx.dir.store().get(&key).await?;
            let parsed_terms = parse_terms(&bytes).filter(|t| t.len() == parsed.len()).ok_or_else(|| {
                pretrain_store::Error::Corrupt {
                    store: ctx.dir.store().url().into(),
                    key: key.to_string(),
                    reason: "term lists do not match the key records".into(),
                }
            })?;
            doc_terms.extend(parsed_terms.into_iter().enumerate().map(|(i, t)| ((shard, i), t)));
        }
        records.extend(parsed.into_iter().enumerate().map(|(i, r)| (shard, i, r)));
    }
    if !missing.is_empty() {
        return Err(DataPrepError::MapsMissing { missing, shards });
    }

    // Canonical order: input file, then record, whatever the shard count.
    records.sort_by_key(|(_, _, r)| (r.input, r.seq));
    let total = records.len();

    // Quality: a threshold, or the top fraction of each scored category.
    let category_of = |r: &KeyRecord| data.sources[r.source as usize].category().to_string();
    let q = &data.quality;
    let scored = |category: &str| q.categories.is_empty() || q.categories.iter().any(|c| c == category);
    let mut cut: BTreeMap<String, f32> = BTreeMap::new();
    if q.classifier != QualityClassifier::None {
        let mut by_category: BTreeMap<String, Vec<f32>> = BTreeMap::new();
        for (_, _, r) in &records {
            by_category.entry(category_of(r)).or_default().push(r.score);
        }
        for (category, scores) in by_category {
            if scored(&category) {
                let threshold = match q.keep_top_fraction {
                    Some(fraction) => top_fraction_threshold(&scores, fraction),
                    None => q.threshold as f32,
                };
                cut.insert(category, threshold);
            }
        }
    }
    let mut quality_removed: BTreeMap<String, u64> = BTreeMap::new();
    let passes_quality: Vec<bool> = records
        .iter()
        .map(|(_, _, r)| {
            let category = category_of(r);
            let keep = cut.get(&category).is_none_or(|t| r.score >= *t);
            if !keep {
                *quality_removed.entry(category).or_default() += 1;
            }
            keep
        })
        .collect();

    let mut seen = HashSet::new();
    let exact_survivor: Vec<bool> = records
        .iter()
        .zip(&passes_quality)
        .map(|((_, _, r), pass)| *pass && (!data.dedup.exact || seen.insert(r.exact)))
        .collect();
    let exact_removed = exact_survivor.iter().zip(&passes_quality).filter(|(s, p)| **p && !**s).count();
    let mut survivor = exact_survivor.clone();
    let mut near_removed = 0;
    let mut near = ClusterStats::default();
    if minhash.is_some() {
        let (keep, stats) = near_duplicates(ctx, &records, &exact_survivor, signature_len, tmp.path()).await?;
        near = stats;
        for (i, keep) in keep.into_iter().enumerate() {
            if survivor[i] && !keep {
                survivor[i] = false;
                near_removed += 1;
            }
        }
    }

    // Held-out split, then the mix by bytes per category.
    let held_out: Vec<bool> =
        records.iter().map(|(_, _, r)| unit(spec.seed, 1, r.input, r.seq) < data.held_out_fraction).collect();
    let mut bytes_by_category: BTreeMap<String, u64> = BTreeMap::new();
    for (i, (_, _, r)) in records.iter().enumerate() {
        if survivor[i] && !held_out[i] {
            *bytes_by_category.entry(category_of(r)).or_default() += u64::from(r.bytes);
        }
    }
    let epochs = mix_epochs(&bytes_by_category, &data.mix.weights, data.mix.max_epochs);
    let mut placements: HashMap<(u32, usize), Placement> = HashMap::new();
    for (i, (shard, pos, r)) in records.iter().enumerate() {
        if !survivor[i] {
            continue;
        }
        let copies = if held_out[i] {
            0
        } else {
            let e = epochs.get(&category_of(r)).copied().unwrap_or(0.0);
            let whole = e.floor();
            whole as u32 + u32::from(unit(spec.seed, 2, r.input, r.seq) < e - whole)
        };
        placements.insert((*shard, *pos), Placement { held_out: held_out[i], copies });
    }

    // Order: every training copy gets a position in the stream.
    let mut stream: Vec<(u32, usize, u32, u64)> = Vec::new(); // shard, pos, copy, sort key
    for (i, (shard, pos, r)) in records.iter().enumerate() {
        let Some(p) = placements.get(&(*shard, *pos)) else { continue };
        for copy in 0..p.copies {
            let key = match data.order.strategy {
                // Easy first: shortest (or lowest-scoring) documents first, canonical order on ties.
                OrderStrategy::Curriculum if data.order.curriculum_by == pretrain_crd::spec::CurriculumKey::Quality => {
                    (u64::from((r.score.clamp(0.0, 1.0) * 1e6) as u32) << 32) | i as u64
                }
                OrderStrategy::Curriculum => (u64::from(r.bytes) << 32) | i as u64,
                _ => xxh3_64_with_seed(
                    &[u64::from(r.input), u64::from(r.seq), u64::from(copy)].map(u64::to_le_bytes).concat(),
                    spec.seed ^ 3,
                ),
            };
            stream.push((*shard, *pos, copy, key));
        }
    }
    stream.sort_by_key(|&(_, _, _, key)| key);
    if data.order.strategy == OrderStrategy::InContext {
        // Contexts of train.seqLen tokens, at about 4 bytes a token.
        let canonical: HashMap<(u32, usize), usize> =
            records.iter().enumerate().map(|(i, (shard, pos, _))| ((*shard, *pos), i)).collect();
        let terms: Vec<Vec<(u32, u16)>> =
            records.iter().map(|(shard, pos, _)| doc_terms.remove(&(*shard, *pos)).unwrap_or_default()).collect();
        let items: Vec<OrderItem> = stream
            .iter()
            .map(|(shard, pos, _, _)| {
                let doc = canonical[&(*shard, *pos)];
                OrderItem { doc, bytes: records[doc].2.bytes }
            })
            .collect();
        let context_bytes = u64::from(spec.train.seq_len) * 4;
        let order = in_context(&items, &terms, context_bytes, spec.seed);
        stream = order.into_iter().map(|i| stream[i]).collect();
    }
    let train_docs = stream.len();
    let out_shards = shards as usize;
    let mut position: HashMap<(u32, usize), Vec<usize>> = HashMap::new();
    for (p, &(shard, pos, _, _)) in stream.iter().enumerate() {
        position.entry((shard, pos)).or_default().push(p);
    }
    drop(stream);

    // Route documents to output shards on local disk, then sort each shard by position.
    let route_path = |k: usize| tmp.path().join(format!("route-{k:05}.bin"));
    let heldout_path = tmp.path().join("heldout.bin");
    let mut routes: Vec<BufWriter<File>> = (0..=out_shards)
        .map(|k| {
            let p = if k == out_shards { heldout_path.clone() } else { route_path(k) };
            File::create(&p).map(BufWriter::new).map_err(scratch(&p))
        })
        .collect::<Result<_, ScratchError>>()?;
    let mut category_docs: BTreeMap<String, u64> = BTreeMap::new();
    let mut category_bytes_out: BTreeMap<String, u64> = BTreeMap::new();
    let mut heldout_docs = 0u64;
    for shard in 0..shards {
        let local = tmp.path().join("map-docs.jsonl.zst");
        let key = ctx.dir.key(&format!("{}/docs.jsonl.zst", map_dir(shard, shards)))?;
        ctx.dir.store().download(&key, &local).await?;
        let decoder = zstd::Decoder::new(File::open(&local).map_err(scratch(&local))?).map_err(scratch(&local))?;
        for (pos, line) in BufReader::new(decoder).split(b'\n').enumerate() {
            let line = line.map_err(scratch(&local))?;
            let Some(p) = placements.get(&(shard, pos)) else { continue };
            if p.held_out {
                heldout_docs += 1;
                write_routed(&mut routes[out_shards], (u64::from(shard) << 32) | pos as u64, &line)
                    .map_err(scratch(&heldout_path))?;
                continue;
            }
            let doc: DocumentLine =
                serde_json::from_slice(&line).map_err(|e| scratch(&local)(std::io::Error::other(e)))?;
            for &at in position.get(&(shard, pos)).map(Vec::as_slice).unwrap_or_default() {
                let k = at * out_shards / train_docs.max(1);
                write_routed(&mut routes[k], at as u64, &line).map_err(scratch(&route_path(k)))?;
                *category_docs.entry(doc.category.clone()).or_default() += 1;
                *category_bytes_out.entry(doc.category.clone()).or_default() += doc.text.len() as u64;
            }
        }
    }
    for (k, w) in routes.iter_mut().enumerate() {
        w.flush().map_err(scratch(&route_path(k)))?;
    }
    drop(routes);

    let mut files = Vec::new();
    for k in 0..=out_shards {
        let (src, name) = if k == out_shards {
            (heldout_path.clone(), "heldout/00000.jsonl.zst".to_string())
        } else {
            (route_path(k), format!("shards/{k:05}.jsonl.zst"))
        };
        files.push(write_sorted(&ctx.dir, &src, &name).await?);
    }

    let total_out: u64 = category_bytes_out.values().sum();
    let realised: BTreeMap<&String, f64> =
        category_bytes_out.iter().map(|(c, b)| (c, *b as f64 / total_out.max(1) as f64)).collect();
    let commit_stats = serde_json::json!({
        "outputVersion": OUTPUT_VERSION,
        "map": stats,
        "quality": {"thresholds": cut, "removed": quality_removed},
        "dedup": {
            "candidates": total,
            "exactRemoved": exact_removed,
            "nearRemoved": near_removed,
            "lshPairsCompared": near.compared,
            "lshPairsMerged": near.merged,
            "lshCollisionsRejected": near.rejected,
        },
        "heldOut": {"documents": heldout_docs},
        "mix": {
            "bytesBeforeMix": bytes_by_category,
            "epochs": epochs,
            "documents": category_docs,
            "bytes": category_bytes_out,
            "realisedShare": realised,
        },
        "train": {"documents": train_docs, "shards": out_shards},
    });
    Ok(ctx.dir.commit(hash, files, commit_stats).await?)
}

/// MinHash near-duplicate clustering across every map shard, from the shards' sorted band buckets
/// and signatures downloaded to `scratch_dir` and read from disk: memory holds the union-find, not
/// the index. `records` are in canonical order with their map shard and position; only `eligible`
/// documents (kept by quality and exact dedup) take part. Returns which records survive.
async fn near_duplicates(
    ctx: &Context,
    records: &[(u32, usize, KeyRecord)],
    eligible: &[bool],
    signature_len: usize,
    scratch_dir: &Path,
) -> Result<(Vec<bool>, ClusterStats)> {
    let shards = ctx.run.spec.data.shards;
    let mut band_files = Vec::new();
    let mut signature_files = Vec::new();
    for shard in 0..shards {
        for (name, list) in [("bands.bin", &mut band_files), ("signatures.bin", &mut signature_files)] {
            let local = scratch_dir.join(format!("{shard:05}-{name}"));
            let key = ctx.dir.key(&format!("{}/{name}", map_dir(shard, shards)))?;
            ctx.dir.store().download(&key, &local).await?;
            list.push(local);
        }
    }
    let threshold = ctx.run.spec.data.dedup.minhash.jaccard_threshold;
    let index = DiskIndex {
        band_files,
        signature_files,
        ids: records.iter().map(|(_, _, r)| r.doc()).collect(),
        positions: records.iter().map(|(shard, pos, _)| (*shard, *pos)).collect(),
        signature_len,
    };
    let eligible = eligible.to_vec();
    let scratch_dir = scratch_dir.to_path_buf();
    let work = move || index.cluster(&eligible, threshold).map_err(scratch(&scratch_dir));
    Ok(tokio::task::spawn_blocking(work).await.expect("near-duplicate clustering does not panic")?)
}

fn write_terms(out: &mut impl Write, terms: &[(u32, u16)]) -> std::io::Result<()> {
    out.write_all(&[terms.len() as u8])?;
    for (t, c) in terms {
        out.write_all(&t.to_le_bytes())?;
        out.write_all(&c.to_le_bytes())?;
    }
    Ok(())
}

fn parse_terms(bytes: &[u8]) -> Option<Vec<Vec<(u32, u16)>>> {
    let mut out = Vec::new();
    let mut at = 0;
    while at < bytes.len() {
        let n = usize::from(bytes[at]);
        at += 1;
        let end = at + n * 6;
        let chunk = bytes.get(at..end)?;
        out.push(
            chunk
                .chunks_exact(6)
                .map(|c| (u32::from_le_bytes(c[..4].try_into().expect("4 bytes")), u16::from_le_bytes([c[4], c[5]])))
                .collect(),
        );
        at = end;
    }
    Some(out)
}

fn write_routed(out: &mut impl Write, position: u64, line: &[u8]) -> std::io::Result<()> {
    out.write_all(&position.to_le_bytes())?;
    out.write_all(&(line.len() as u64).to_le_bytes())?;
    out.write_all(line)
}

/// Reads a routed file, sorts its lines by position, and writes them as one `jsonl.zst` file.
async fn write_sorted(dir: &StageDir, routed: &Path, name: &str) -> Result<FileEntry> {
    let mut raw = Vec::new();
    File::open(routed).and_then(|mut f| f.read_to_end(&mut raw)).map_err(scratch(routed))?;
    let mut lines: Vec<(u64, &[u8])> = Vec::new();
    let mut at = 0;
    while at + 16 <= raw.len() {
        let pos = u64::from_le_bytes(raw[at..at + 8].try_into().expect("8 bytes"));
        let len = u64::from_le_bytes(raw[at + 8..at + 16].try_into().expect("8 bytes")) as usize;
        lines.push((pos, &raw[at + 16..at + 16 + len]));
        at += 16 + len;
    }
    lines.sort_by_key(|(pos, _)| *pos);
    let mut encoder = zstd::Encoder::new(Vec::new(), 3).map_err(scratch(routed))?;
    let mut writer = dir.writer(name)?;
    for (_, line) in lines {
        encoder.write_all(line).and_then(|()| encoder.write_all(b"\n")).map_err(scratch(routed))?;
        if encoder.get_ref().len() > 1 << 20 {
            let chunk = std::mem::take(encoder.get_mut());
            writer.write(&chunk).await?;
        }
    }
    let rest = encoder.finish().map_err(scratch(routed))?;
    writer.write(&rest).await?;
    Ok(writer.finish().await?)
}

/// Epochs per category so that categories get `weights` shares of the bytes: the largest total that
/// keeps every category within `max_epochs`, and no larger than needed to use the most plentiful
/// category once. Empty weights keep the natural proportions (one epoch each).
pub fn mix_epochs(
    bytes: &BTreeMap<String, u64>,
    weights: &BTreeMap<String, f64>,
    max_epochs: f64,
) -> BTreeMap<String, f64> {
    if weights.is_empty() {
        return bytes.keys().map(|c| (c.clone(), 1.0)).collect();
    }
    let total_weight: f64 = weights.iter().filter(|(c, _)| bytes.get(*c).is_some_and(|b| *b > 0)).map(|(_, w)| w).sum();
    if total_weight <= 0.0 {
        return bytes.keys().map(|c| (c.clone(), 0.0)).collect();
    }
    let share = |c: &str| weights.get(c).copied().unwrap_or(0.0) / total_weight;
    let mut use_all = 0.0f64; // total bytes if the most plentiful category is used once
    let mut cap = f64::INFINITY; // total bytes allowed by max_epochs
    for (c, &b) in bytes {
        let s = share(c);
        if s > 0.0 && b > 0 {
            use_all = use_all.max(b as f64 / s);
            cap = cap.min(b as f64 * max_epochs / s);
        }
    }
    let total = use_all.min(cap);
    bytes.iter().map(|(c, &b)| (c.clone(), if b == 0 { 0.0 } else { share(c) * total / b as f64 })).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mix_upsamples_scarce_categories_within_max_epochs() {
        let bytes: BTreeMap<String, u64> = [("web".into(), 900), ("code".into(), 100)].into();
        let weights: BTreeMap<String, f64> = [("web".into(), 0.5), ("code".into(), 0.5)].into();
        let e = mix_epochs(&bytes, &weights, 4.0);
        // Using all web (900) at 50% would need 9 epochs of code; capped at 4 -> total 800.
        assert!((e["code"] - 4.0).abs() < 1e-9, "{e:?}");
        assert!((e["web"] - 400.0 / 900.0).abs() < 1e-9, "{e:?}");
        let natural = mix_epochs(&bytes, &BTreeMap::new(), 4.0);
        assert_eq!(natural["web"], 1.0);
        let generous = mix_epochs(&bytes, &weights, 10.0);
        assert!((generous["web"] - 1.0).abs() < 1e-9 && (generous["code"] - 9.0).abs() < 1e-9);
    }

    #[test]
    fn key_records_round_trip() {
        let r = KeyRecord { input: 3, seq: 9, source: 2, bytes: 77, score: 0.25, exact: u128::MAX - 5 };
        let mut buf = Vec::new();
        r.write(&mut buf).unwrap();
        r.write(&mut buf).unwrap();
        assert_eq!(KeyRecord::parse_all(&buf).unwrap(), vec![r.clone(), r]);
        assert!(KeyRecord::parse_all(&buf[1..]).is_none());
    }
}
