//! The tokenize stage: tokenizer, token shards, compression report.
//!
//! Layout under `<run>/tokenize/`:
//! - `tokenizer.json`: the tokenizer, trained here or copied from `tokenizer.url`;
//!   `tokenizer.meta.json` (written after it) records the spec hash it was made for and its sha256.
//! - `shards/NNNNN.tok`: data-prep's `shards/NNNNN.jsonl.zst`, encoded (format in [`crate::tokens::shard`]);
//!   `map/NNNNN.json` marks one as done (map task `NNNNN` of a sharded run).
//! - `heldout/NNNNN.tok`: data-prep's held-out files, encoded by the map tasks (task `k` takes every
//!   `shards`-th of them from the `k`-th); the reduce sums their counts into the compression report,
//!   so no process reads every token.
//!
//! Documents keep data-prep's order (in-context groups stay adjacent), each followed by the
//! end-of-sequence token.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use pretrain_crd::Stage;
use pretrain_crd::contract::SEPARATORS;
use pretrain_store::artifact::{
    Compression, CompressionReport, Counts, DataPrepStats, DocumentLine, SplitDocuments, SplitTokens, TokenShardStats,
    TokenizeStats, TokenizerStats, TokenizerTraining,
};
use pretrain_store::{FileEntry, StageCommit, StageDir};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use xxhash_rust::xxh3::xxh3_64_with_seed;

use super::train::{BpeError, train_bpe};
use crate::Context;
use crate::frame::{MapDone, Phase, ScratchError, StageError, UpstreamError, scratch};
use crate::progress::Progress;
use crate::tokenizer::{Encoder, EncoderError};
use crate::tokens::{ShardError, ShardWriter};

/// Why the stage failed.
#[derive(Debug, thiserror::Error)]
pub enum TokenizeError {
    /// data-prep's outputs cannot be read.
    #[error(transparent)]
    Upstream(#[from] UpstreamError),
    /// The reduce ran before every map task finished.
    #[error(
        "map tasks {missing:?} of {tasks} have not finished for this spec and tokenizer; run them before the reduce"
    )]
    MapsMissing {
        /// The unfinished map tasks.
        missing: Vec<u32>,
        /// Map tasks in all.
        tasks: usize,
    },
    /// The spec asks for something impossible (a shard that does not exist, a tokenizer without an
    /// end-of-sequence token, too small a corpus).
    #[error("{0}")]
    Invalid(String),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] pretrain_store::Error),
    /// `tokenizer.url` could not be read.
    #[error(transparent)]
    Fetch(#[from] crate::ContextError),
    /// Tokenizer training failed.
    #[error(transparent)]
    Train(#[from] BpeError),
    /// The tokenizer failed to load or encode.
    #[error(transparent)]
    Encoder(#[from] EncoderError),
    /// A token shard could not be written.
    #[error(transparent)]
    Shard(#[from] ShardError),
    /// An input line is not a data-prep document.
    #[error("{file}:{line}: {reason}")]
    Input {
        /// The input file.
        file: String,
        /// 1-based line.
        line: u64,
        /// What is wrong.
        reason: String,
    },
    /// Local scratch files failed.
    #[error(transparent)]
    Scratch(#[from] ScratchError),
}

/// The spec, the corpus or data-prep's committed outputs must change for an invalid failure;
/// the store, scratch files, an early reduce or the tokenizer library may do better on another try.
impl From<TokenizeError> for StageError {
    fn from(e: TokenizeError) -> Self {
        use TokenizeError as E;
        match e {
            E::Upstream(upstream) => upstream.into(),
            E::Store(store) => store.into(),
            E::Fetch(fetch) => fetch.into(),
            E::Invalid(_) | E::Input { .. } | E::Train(BpeError::TooSmall { .. } | BpeError::Unreachable { .. }) => {
                StageError::Invalid(Box::new(e))
            }
            E::MapsMissing { .. } | E::Train(BpeError::Library(_)) | E::Encoder(_) | E::Shard(_) | E::Scratch(_) => {
                StageError::Failed(Box::new(e))
            }
        }
    }
}

type Result<T, E = TokenizeError> = std::result::Result<T, E>;

/// `tokenizer.meta.json`: which spec the stored tokenizer belongs to.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
struct TokenizerMeta {
    config_hash: String,
    sha256: String,
    size: u64,
    vocab_size: u32,
    separator: String,
    /// `None` when copied from `tokenizer.url`.
    training: Option<TokenizerTraining>,
}

/// What a map task records beside its token shard (`map/NNNNN.json`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct MapTask {
    tokenizer_sha256: String,
    file: FileEntry,
    /// `shards/NNNNN.cat`: each document's category (absent from tasks of older versions).
    #[serde(default)]
    category_file: Option<FileEntry>,
    categories: BTreeMap<String, Counts>,
    /// The held-out files the task encoded, and their counts per category.
    #[serde(default)]
    heldout_files: Vec<FileEntry>,
    #[serde(default)]
    heldout: BTreeMap<String, Counts>,
    /// Layout of the task's outputs: 1 added the held-out files.
    #[serde(default)]
    format: u32,
    seconds: f64,
}

/// The map tasks' layout.
const MAP_FORMAT: u32 = 1;

/// The committed data-prep outputs this stage reads.
#[derive(Debug)]
struct Upstream {
    dir: StageDir,
    /// `shards/NNNNN.jsonl.zst`, in order.
    shards: Vec<String>,
    /// `heldout/NNNNN.jsonl.zst`, in order.
    heldout: Vec<String>,
    /// Bytes of training text, when data-prep recorded it.
    train_bytes: Option<u64>,
}

async fn upstream(ctx: &Context) -> Result<Upstream> {
    let dir = ctx.dir.store().stage(ctx.run_name(), Stage::DataPrep)?;
    let hash = ctx.run.spec.stage_config_hash(Stage::DataPrep);
    let Some(commit) = dir.committed(&hash).await? else {
        return Err(UpstreamError::NotCommitted { stage: Stage::DataPrep, url: dir.url("_SUCCESS.json") }.into());
    };
    let shards: Vec<String> = commit
        .files
        .iter()
        .map(|f| f.path.clone())
        .filter(|p| p.starts_with("shards/") && p.ends_with(".jsonl.zst"))
        .collect();
    let heldout = commit.files.iter().map(|f| f.path.clone()).filter(|p| p.starts_with("heldout/")).collect();
    let train_bytes = serde_json::from_value::<DataPrepStats>(commit.stats).ok().map(|s| s.mix.bytes.values().sum());
    Ok(Upstream { dir, shards, heldout, train_bytes })
}

/// Runs the stage's `phase`; returns the commit when the reduce ran.
pub async fn run(ctx: &Context, phase: Phase) -> Result<Option<StageCommit>> {
    let hash = ctx.config_hash();
    let upstream = upstream(ctx).await?;
    if upstream.shards.is_empty() {
        return Err(TokenizeError::Invalid(format!(
            "data-prep committed no training shards under {}: nothing to tokenize",
            upstream.dir.url("shards/")
        )));
    }
    if let Phase::Map(k) = phase
        && k as usize >= upstream.shards.len()
    {
        return Err(TokenizeError::Invalid(format!(
            "map task {k} does not exist: data-prep committed {} shards",
            upstream.shards.len()
        )));
    }
    // One tokenizer for everything this process does.
    let (encoder, meta) = tokenizer(ctx, &upstream, &hash).await?;
    let tok = (&encoder, &meta);
    match phase {
        Phase::Map(k) => {
            map_shard(ctx, &upstream, &hash, tok, k).await?;
            Ok(None)
        }
        Phase::Reduce => reduce(ctx, &upstream, &hash, tok).await.map(Some),
        Phase::Dedup(_) | Phase::Cluster | Phase::Embed(_) | Phase::Order(_) | Phase::Route(_) | Phase::Write(_) => {
            Err(TokenizeError::Invalid(format!("tokenize has no {} phase; run map or reduce", phase.name())))
        }
        Phase::All => {
            for k in 0..upstream.shards.len() as u32 {
                map_shard(ctx, &upstream, &hash, tok, k).await?;
            }
            reduce(ctx, &upstream, &hash, tok).await.map(Some)
        }
    }
}

/// The stored tokenizer if it was made for this spec; otherwise trains (or fetches) and stores it.
///
/// Training is deterministic, so map tasks that race here store identical files.
async fn tokenizer(ctx: &Context, upstream: &Upstream, hash: &str) -> Result<(Arc<Encoder>, TokenizerMeta)> {
    if let Some(meta) = ctx.dir.store().get_opt(&ctx.dir.key("tokenizer.meta.json")?).await?
        && let Ok(meta) = serde_json::from_slice::<TokenizerMeta>(&meta)
        && meta.config_hash == hash
    {
        let json = ctx.dir.get("tokenizer.json").await?;
        if hex::encode(Sha256::digest(&json)) == meta.sha256 {
            let text = String::from_utf8_lossy(&json);
            return Ok((Arc::new(Encoder::from_json(&text)?), meta));
        }
        eprintln!("tokenize: {} does not match its meta file; making it again", ctx.dir.url("tokenizer.json"));
    }
    let spec = &ctx.run.spec.tokenizer;
    let (json, training) = match &spec.url {
        Some(url) => {
            let bytes = crate::context::read_url(url).await?;
            let json = String::from_utf8(bytes.to_vec())
                .map_err(|e| TokenizeError::Invalid(format!("tokenizer.url {url}: not UTF-8: {e}")))?;
            (json, None)
        }
        None => {
            let started = Instant::now();
            let sample = sample(ctx, upstream).await?;
            let sample_bytes = sample.iter().map(|t| t.len() as u64).sum();
            let documents = sample.len() as u64;
            let mut specials: Vec<String> =
                pretrain_crd::spec::BUILTIN_SPECIAL_TOKENS.iter().map(|s| (*s).to_string()).collect();
            specials.extend(spec.special_tokens.iter().filter(|s| !specials.contains(s)).cloned().collect::<Vec<_>>());
            let vocab_size = spec.vocab_size;
            println!("tokenize: training a {vocab_size}-token BPE on {documents} documents ({sample_bytes} bytes)");
            let trained = tokio::task::spawn_blocking(move || train_bpe(&sample, vocab_size, &specials))
                .await
                .expect("tokenizer training does not panic")?;
            let seconds = started.elapsed().as_secs_f64();
            println!("tokenize: trained in {seconds:.1} s");
            (trained.json, Some(TokenizerTraining { sample_documents: documents, sample_bytes, seconds }))
        }
    };
    let encoder = Encoder::from_json(&json).map_err(|e| match &spec.url {
        Some(url) => TokenizeError::Invalid(format!("tokenizer.url {url}: {e}")),
        None => e.into(),
    })?;
    let separator = SEPARATORS.iter().find(|s| encoder.special(s).is_some()).ok_or_else(|| {
        TokenizeError::Invalid(format!(
            "tokenizer.url {}: has none of the end-of-sequence tokens {SEPARATORS:?} as a special token",
            spec.url.as_deref().unwrap_or_default()
        ))
    })?;
    if !encoder.is_fast() {
        println!("tokenize: the tokenizer is not plain byte-level BPE; encoding through the tokenizers library");
    }
    let entry = ctx.dir.put("tokenizer.json", Bytes::from(json)).await?;
    let meta = TokenizerMeta {
        config_hash: hash.into(),
        sha256: entry.sha256,
        size: entry.size,
        vocab_size: encoder.vocab_size(),
        separator: (*separator).to_string(),
        training,
    };
    ctx.dir.put("tokenizer.meta.json", Bytes::from(serde_json::to_vec_pretty(&meta).expect("meta serialises"))).await?;
    Ok((Arc::new(encoder), meta))
}

/// About `tokenizer.trainSampleBytes` of training text, drawn from every shard with the same
/// probability so categories come in their mix proportion; which lines are drawn depends only on the seed.
async fn sample(ctx: &Context, upstream: &Upstream) -> Result<Vec<String>> {
    let want = ctx.run.spec.tokenizer.train_sample_bytes;
    let rate = upstream.train_bytes.filter(|&t| t > 0).map_or(1.0, |t| (want as f64 / t as f64).min(1.0));
    let seed = ctx.run.spec.seed;
    let tmp = tempfile::tempdir().map_err(scratch(Path::new("tempdir")))?;
    let mut texts = Vec::new();
    let mut bytes = 0u64;
    for (k, name) in upstream.shards.iter().enumerate() {
        let local = fetch(&upstream.dir, name, tmp.path()).await?;
        let display = upstream.dir.url(name);
        let rest = want.saturating_sub(bytes);
        let (drawn, drawn_bytes) = tokio::task::spawn_blocking(move || {
            let mut drawn = Vec::new();
            let mut drawn_bytes = 0u64;
            for_each_line(&local, &display, |line_no, line| {
                let h = xxh3_64_with_seed(&[k as u64, line_no].map(u64::to_le_bytes).concat(), seed ^ 0x7e57);
                if drawn_bytes >= rest || (h >> 11) as f64 / (1u64 << 53) as f64 >= rate {
                    return Ok(());
                }
                let doc = parse(&display, line_no, line)?;
                drawn_bytes += doc.text.len() as u64;
                drawn.push(doc.text);
                Ok(())
            })?;
            Ok::<_, TokenizeError>((drawn, drawn_bytes))
        })
        .await
        .expect("sampling does not panic")?;
        texts.extend(drawn);
        bytes += drawn_bytes;
    }
    Ok(texts)
}

async fn fetch(dir: &StageDir, name: &str, tmp: &Path) -> Result<PathBuf> {
    let local = tmp.join(name.replace('/', "_"));
    dir.store().download(&dir.key(name)?, &local).await?;
    Ok(local)
}

fn parse(file: &str, line_no: u64, line: &[u8]) -> Result<DocumentLine> {
    serde_json::from_slice(line).map_err(|e| TokenizeError::Input {
        file: file.into(),
        line: line_no + 1,
        reason: format!("not a data-prep document: {e}"),
    })
}

/// Calls `f(line_number, line)` for every line of a `jsonl.zst` file (0-based numbers).
fn for_each_line(path: &Path, display: &str, mut f: impl FnMut(u64, &[u8]) -> Result<()>) -> Result<()> {
    let file = File::open(path).map_err(scratch(path))?;
    let decoder = zstd::Decoder::new(file).map_err(scratch(path))?;
    let mut reader = BufReader::with_capacity(1 << 20, decoder);
    let mut line = Vec::new();
    let mut n = 0u64;
    loop {
        line.clear();
        let read = reader.read_until(b'\n', &mut line).map_err(|e| TokenizeError::Input {
            file: display.into(),
            line: n + 1,
            reason: e.to_string(),
        })?;
        if read == 0 {
            return Ok(());
        }
        if line.last() == Some(&b'\n') {
            line.pop();
        }
        if !line.is_empty() {
            f(n, &line)?;
        }
        n += 1;
    }
}

/// Text of documents encoded per parallel batch.
const BATCH_BYTES: usize = 4 << 20;

/// Encodes a data-prep `jsonl.zst` file into a token shard, and writes each document's category
/// (its index in `categories`, [`write_categories`]) beside it (`.cat`); returns counts per category.
pub fn encode_file(
    encoder: &Encoder,
    separator: u32,
    input: &Path,
    display: &str,
    output: &Path,
    categories: &[String],
    progress: &mut Progress,
) -> Result<BTreeMap<String, Counts>> {
    let mut writer = ShardWriter::create(output, encoder.vocab_size())?;
    let mut category_of = Vec::new();
    let mut counts: BTreeMap<String, Counts> = BTreeMap::new();
    let (tx, rx) = std::sync::mpsc::sync_channel::<Vec<DocumentLine>>(2);
    std::thread::scope(|scope| {
        // Decompress and parse on one thread while the pool encodes the previous batch.
        let reader = scope.spawn(move || {
            let mut batch = Vec::new();
            let mut batch_bytes = 0;
            for_each_line(input, display, |line_no, line| {
                let doc = parse(display, line_no, line)?;
                batch_bytes += doc.text.len();
                batch.push(doc);
                if batch_bytes >= BATCH_BYTES {
                    batch_bytes = 0;
                    // A closed channel means the encoder failed; its error is the one reported.
                    let _ = tx.send(std::mem::take(&mut batch));
                }
                Ok(())
            })?;
            let _ = tx.send(batch);
            Ok::<_, TokenizeError>(())
        });
        let encoded = (|| {
            for batch in rx {
                let texts: Vec<&str> = batch.iter().map(|d| d.text.as_str()).collect();
                let ids = encoder.encode_batch(&texts)?;
                for (doc, mut tokens) in batch.iter().zip(ids) {
                    tokens.push(separator);
                    writer.push(&tokens)?;
                    let index =
                        categories.iter().position(|c| *c == doc.category).ok_or_else(|| TokenizeError::Input {
                            file: display.into(),
                            line: category_of.len() as u64 + 1,
                            reason: format!("category {:?} is not one of the spec's {categories:?}", doc.category),
                        })?;
                    category_of.push(index as u16);
                    let c = counts.entry(doc.category.clone()).or_default();
                    c.documents += 1;
                    c.tokens += tokens.len() as u64;
                    c.bytes += doc.text.len() as u64;
                    c.chars += doc.text.chars().count() as u64;
                }
                let total = Counts::total(counts.values());
                progress.update(total.documents, || format!("{} tokens", total.tokens));
            }
            Ok::<_, TokenizeError>(())
        })();
        let read = reader.join().expect("the reader thread does not panic");
        encoded.and(read)
    })?;
    writer.finish()?;
    let path = output.with_extension("cat");
    std::fs::write(&path, write_categories(&category_of)).map_err(scratch(&path))?;
    Ok(counts)
}

/// A category file: one little-endian u16 per document of its shard, in order.
pub fn write_categories(categories: &[u16]) -> Vec<u8> {
    categories.iter().flat_map(|c| c.to_le_bytes()).collect()
}

fn map_name(k: u32) -> String {
    format!("map/{k:05}.json")
}

fn shard_name(k: u32) -> String {
    format!("shards/{k:05}.tok")
}

async fn map_done(ctx: &Context, k: u32) -> Result<Option<MapDone<MapTask>>> {
    Ok(MapDone::read(&ctx.dir, &map_name(k)).await?)
}

/// Encodes data-prep's file `name` (downloaded into `tmp`) into the local `output`, with a progress
/// bar `label`; returns its counts per category.
async fn encode_stored(
    upstream: &Upstream,
    (encoder, separator): (&Arc<Encoder>, u32),
    categories: Vec<String>,
    name: String,
    tmp: PathBuf,
    output: PathBuf,
    label: String,
) -> Result<BTreeMap<String, Counts>> {
    let local = fetch(&upstream.dir, &name, &tmp).await?;
    let display = upstream.dir.url(&name);
    let enc = Arc::clone(encoder);
    let mut progress = Progress::new(label, "documents", None);
    tokio::task::spawn_blocking(move || {
        encode_file(&enc, separator, &local, &display, &output, &categories, &mut progress)
    })
    .await
    .expect("encoding does not panic")
}

async fn map_shard(
    ctx: &Context,
    upstream: &Upstream,
    hash: &str,
    (encoder, meta): (&Arc<Encoder>, &TokenizerMeta),
    k: u32,
) -> Result<()> {
    let input = &upstream.shards[k as usize];
    if let Some(done) = map_done(ctx, k).await?
        && done.config_hash == hash
        && done.task.tokenizer_sha256 == meta.sha256
        && done.task.format == MAP_FORMAT
    {
        return Ok(());
    }
    let started = Instant::now();
    let tmp = tempfile::tempdir().map_err(scratch(Path::new("tempdir")))?;
    let separator = encoder.special(&meta.separator).expect("the separator was checked when the tokenizer loaded");
    let names = ctx.run.spec.data.categories();
    let encode = |name: &str, output: PathBuf, label: String| {
        encode_stored(
            upstream,
            (encoder, separator),
            names.clone(),
            name.to_string(),
            tmp.path().to_path_buf(),
            output,
            label,
        )
    };
    let output = tmp.path().join("out.tok");
    let categories = encode(input, output.clone(), format!("tokenize map {k}")).await?;
    let file = ctx.dir.put_file(&shard_name(k), &output).await?;
    let category_file =
        Some(ctx.dir.put_file(&shard_name(k).replace(".tok", ".cat"), &output.with_extension("cat")).await?);
    let mut task = MapTask {
        tokenizer_sha256: meta.sha256.clone(),
        file,
        category_file,
        categories,
        heldout_files: Vec::new(),
        heldout: BTreeMap::new(),
        format: MAP_FORMAT,
        seconds: 0.0,
    };
    let shards = upstream.shards.len();
    for (i, name) in upstream.heldout.iter().enumerate().filter(|(i, _)| i % shards == k as usize) {
        let output = tmp.path().join(format!("heldout-{i:05}.tok"));
        let counts = encode(name, output.clone(), format!("tokenize held-out {i}")).await?;
        for (category, c) in &counts {
            task.heldout.entry(category.clone()).or_default().add(c);
        }
        let stored = name.trim_end_matches(".jsonl.zst").to_string() + ".tok";
        task.heldout_files.push(ctx.dir.put_file(&stored, &output).await?);
    }
    let seconds = started.elapsed().as_secs_f64();
    task.seconds = seconds;
    let total = Counts::total(task.categories.values());
    println!(
        "tokenize: shard {}/{}: {} documents, {} tokens, {:.2} bytes/token, {:.1} MB/s",
        k + 1,
        upstream.shards.len(),
        total.documents,
        total.tokens,
        total.bytes as f64 / total.tokens.max(1) as f64,
        total.bytes as f64 / 1e6 / seconds.max(1e-9)
    );
    MapDone { config_hash: hash.into(), task }.write(&ctx.dir, &map_name(k)).await?;
    Ok(())
}

async fn reduce(
    ctx: &Context,
    upstream: &Upstream,
    hash: &str,
    (encoder, meta): (&Arc<Encoder>, &TokenizerMeta),
) -> Result<StageCommit> {
    let mut files = vec![FileEntry { path: "tokenizer.json".into(), size: meta.size, sha256: meta.sha256.clone() }];
    let mut train: BTreeMap<String, Counts> = BTreeMap::new();
    // The held-out files: encoded for evaluation, and the text the compression report is measured on.
    let mut heldout: BTreeMap<String, Counts> = BTreeMap::new();
    let mut heldout_files = Vec::new();
    let mut shards = Vec::new();
    let mut missing = Vec::new();
    for k in 0..upstream.shards.len() as u32 {
        match map_done(ctx, k).await? {
            Some(MapDone { config_hash, task: done })
                if config_hash == hash && done.tokenizer_sha256 == meta.sha256 && done.format == MAP_FORMAT =>
            {
                for (category, c) in &done.categories {
                    train.entry(category.clone()).or_default().add(c);
                }
                for (category, c) in &done.heldout {
                    heldout.entry(category.clone()).or_default().add(c);
                }
                let total = Counts::total(done.categories.values());
                shards.push(TokenShardStats {
                    file: done.file.path.clone(),
                    documents: total.documents,
                    tokens: total.tokens,
                });
                files.push(done.file);
                files.extend(done.category_file);
                heldout_files.extend(done.heldout_files);
            }
            _ => missing.push(k),
        }
    }
    if !missing.is_empty() {
        return Err(TokenizeError::MapsMissing { missing, tasks: upstream.shards.len() });
    }
    heldout_files.sort_by(|a, b| a.path.cmp(&b.path));
    files.extend(heldout_files);
    let report: BTreeMap<String, Compression> = heldout.iter().map(|(c, n)| (c.clone(), Compression::of(n))).collect();
    let all_heldout = Counts::total(heldout.values());
    print_report(meta.vocab_size, &report, &Compression::of(&all_heldout));

    let stats = TokenizeStats {
        tokenizer: TokenizerStats {
            sha256: meta.sha256.clone(),
            vocab_size: meta.vocab_size,
            requested_vocab_size: ctx.run.spec.tokenizer.vocab_size,
            separator: meta.separator.clone(),
            trained: meta.training.clone(),
            url: ctx.run.spec.tokenizer.url.clone(),
            fast_path: encoder.is_fast(),
        },
        tokens: SplitTokens {
            train: train.iter().map(|(c, n)| (c.clone(), n.tokens)).collect(),
            heldout: heldout.iter().map(|(c, n)| (c.clone(), n.tokens)).collect(),
        },
        documents: SplitDocuments {
            train: train.iter().map(|(c, n)| (c.clone(), n.documents)).collect(),
            heldout: all_heldout.documents,
        },
        compression: CompressionReport { heldout: report, all: Compression::of(&all_heldout) },
        shards,
    };
    let stats = serde_json::to_value(&stats).expect("tokenize stats serialise");
    Ok(ctx.dir.commit(hash, files, stats).await?)
}

fn print_report(vocab_size: u32, report: &BTreeMap<String, Compression>, all: &Compression) {
    if report.is_empty() {
        println!("tokenize: no held-out documents (data.heldOutFraction is 0); no compression report");
        return;
    }
    println!("tokenize: vocabulary {vocab_size}; compression on the held-out split:");
    println!(
        "  {:<16} {:>9} {:>12} {:>12} {:>11} {:>11}",
        "category", "documents", "bytes", "tokens", "bytes/tok", "chars/tok"
    );
    for (category, c) in report.iter().chain([(&"all".to_string(), all)]) {
        println!(
            "  {:<16} {:>9} {:>12} {:>12} {:>11.3} {:>11.3}",
            category, c.counts.documents, c.counts.bytes, c.counts.tokens, c.bytes_per_token, c.chars_per_token
        );
    }
}
