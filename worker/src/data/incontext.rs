//! In-context order at scale (the method is in `order.rs`): no task holds the corpus.
//!
//! - **Map task**: counts its documents' hashed features (`df.bin`, `FEATURES` `u32`s, dense so
//!   any slice can be read alone) and keeps a sample of them ([`Sketch`]: a document is sampled when
//!   a hash of the seed and its id falls under a rate of [`SAMPLE_PER_PARTITION`] documents a
//!   partition, so the sample is the same for any number of map tasks): `sample.bin`.
//! - **Dedup task `t`**: sums slice `t` of every map task's counts ([`sum_df`]).
//! - **Cluster task**: the IDF from the summed counts (`cluster/idf.bin`), and the partitions
//!   ([`partition`]): the sample's surviving documents embedded, centred on their mean, spherical
//!   k-means into about `documents / order.partitionDocuments` centroids, ordered along a path
//!   (`cluster/centroids.bin`: the mean, then the centroids).
//! - **Embed task `e` of `E`** (as many as route tasks, owning the same map tasks): embeds each
//!   surviving document of its map tasks, sends it to its nearest centroid's partition (after
//!   centring), and writes
//!   one file of sections, one per partition, each sorted by document
//!   (`embed/<e>-of-<E>/vectors.bin`, `vectors.idx`). Memory 24 bytes a document; local disk 540.
//! - **Order task `o` of `O`**: plans its share of the partitions one at a time: reads the
//!   partition's section of every embed file, builds its neighbour graph, drops its semantic
//!   duplicates and walks it (`order::plan`); writes each document's decision, sorted by location
//!   (`order/<o>-of-<O>/positions.bin`: [`DROP`], or the partition and the document's rank on its
//!   path), and each partition's length. Memory about 1.1 KB a document of one partition.
//! - **Route tasks** read the decisions of their map tasks from every order task ([`Paths`]) and
//!   place each document at `(documents on earlier partitions + rank) / documents on all`.
//!
//! Every number is a function of the documents, the seed and the spec: the same bytes for any
//! number of map, dedup, embed, order and route tasks.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap};
use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use futures::{StreamExt, TryStreamExt, stream};
use pretrain_crd::spec::{Data, OrderStrategy};
use pretrain_store::StageDir;
use serde::{Deserialize, Serialize};
use xxhash_rust::xxh3::xxh3_64_with_seed;

use super::buckets::{corrupt, dedup_dir};
use super::cluster::{ClusterTask, DROP, per_shard, shard_entries};
use super::keys::{KeyRecord, parse_terms};
use super::order::{self, DIMS, FEATURES, Idf, Partitions, embed_document, features, floats};
use super::plan::{held_out, passes_quality};
use super::route::{require_cluster, share};
use super::runs::ExternalSorter;
use super::sections::{self, Sections};
use super::stage::{DataPrepError, Result, all_done, check_task, map_dir};
use crate::Context;
use crate::frame::{MapDone, scratch};
use crate::progress::Progress;

/// Sampled documents a partition, for its centroid.
pub const SAMPLE_PER_PARTITION: u64 = 32;

/// Ranged reads a route task has in flight, one per order task.
const READS: usize = 16;

/// Lloyd iterations of the partitions' k-means.
const KMEANS_ITERATIONS: usize = 10;

/// The embed and order outputs' layout.
const FORMAT: u32 = 1;

/// Bytes of an embedded document: document, location, source and size, embedding.
const RECORD: usize = 24 + DIMS * 4;

/// Embedding sums are kept in fixed point (this many units to 1), so that they add up to the same
/// number in any order.
const FIXED: f64 = (1u64 << 24) as f64;

/// Whether `data` orders in context (the only order with embed and order tasks).
pub(super) fn in_context(data: &Data) -> bool {
    data.order.strategy == OrderStrategy::InContext
}

fn require_in_context(data: &Data, phase: &str) -> Result<()> {
    if in_context(data) {
        Ok(())
    } else {
        Err(DataPrepError::Invalid(format!(
            "{phase} tasks run only for spec.data.order.strategy: in-context, not {:?}",
            data.order.strategy
        )))
    }
}

/// The sampling hash of document `doc`, and the rate's bound: sampled when the hash is at most it.
fn sample_hash(seed: u64, doc: u64) -> u64 {
    xxh3_64_with_seed(&doc.to_le_bytes(), seed ^ 0x5a_4d_97_1e)
}

fn sample_bound(data: &Data) -> u64 {
    let rate = SAMPLE_PER_PARTITION as f64 / data.order.partition_documents as f64;
    if rate >= 1.0 { u64::MAX } else { (rate * u64::MAX as f64) as u64 }
}

/// A map task's feature counts and sample.
pub(super) struct Sketch {
    df: Vec<u32>,
    sample: Vec<u8>,
    bound: u64,
    seed: u64,
}

impl Sketch {
    pub(super) fn new(data: &Data, seed: u64) -> Self {
        Self { df: vec![0; FEATURES], sample: Vec::new(), bound: sample_bound(data), seed }
    }

    /// Counts one document's features, and samples it.
    pub(super) fn add(&mut self, record: &KeyRecord, terms: &[(u32, u16)]) {
        features(terms).for_each(|f| self.df[f as usize] = self.df[f as usize].saturating_add(1));
        let doc = record.doc();
        if sample_hash(self.seed, doc) <= self.bound {
            self.sample.extend_from_slice(&doc.to_le_bytes());
            self.sample.extend_from_slice(&record.source.to_le_bytes());
            self.sample.extend_from_slice(&record.score.to_le_bytes());
            super::keys::write_terms(&mut self.sample, terms).expect("writes to memory");
        }
    }

    /// Writes `df.bin` and `sample.bin` into `out` (empty files without a sketch).
    pub(super) fn finish(sketch: Option<&Self>, out: &Path) -> std::io::Result<()> {
        let mut df = BufWriter::new(File::create(out.join("df.bin"))?);
        if let Some(s) = sketch {
            s.df.iter().try_for_each(|c| df.write_all(&c.to_le_bytes()))?;
        }
        df.flush()?;
        std::fs::write(out.join("sample.bin"), sketch.map_or(&[][..], |s| &s.sample[..]))
    }
}

/// One sampled document: its id, source, score and terms.
struct Sampled {
    doc: u64,
    source: u16,
    score: f32,
    terms: Vec<(u32, u16)>,
}

fn parse_sample(bytes: &[u8]) -> Option<Vec<Sampled>> {
    let mut out = Vec::new();
    let mut at = 0;
    while at < bytes.len() {
        let head = bytes.get(at..at + 14)?;
        let doc = u64::from_le_bytes(head[..8].try_into().expect("8 bytes"));
        let source = u16::from_le_bytes([head[8], head[9]]);
        let score = f32::from_le_bytes(head[10..14].try_into().expect("4 bytes"));
        let n = usize::from(*bytes.get(at + 14)?);
        let end = at + 15 + n * 6;
        let terms = parse_terms(bytes.get(at + 14..end)?)?.pop()?;
        out.push(Sampled { doc, source, score, terms });
        at = end;
    }
    Some(out)
}

/// Dedup task `task`'s slice of the feature counts: slice `task` of every map task's `df.bin`,
/// summed, written as `u64`s to its `df.bin`.
pub(super) async fn sum_df(ctx: &Context, task: u32, tasks: u32) -> Result<()> {
    let shards = ctx.run.spec.data.shards;
    let mine = share(task, tasks, FEATURES as u32);
    let mut sums = vec![0u64; mine.len()];
    for shard in 0..shards {
        let name = format!("{}/df.bin", map_dir(shard, shards));
        let range = u64::from(mine.start) * 4..u64::from(mine.end) * 4;
        let got = ctx.dir.store().get_ranges(&ctx.dir.key(&name)?, std::slice::from_ref(&range)).await?;
        if got[0].len() != sums.len() * 4 {
            return Err(corrupt(&ctx.dir, &name, "not a count for every feature"));
        }
        for (s, c) in sums.iter_mut().zip(got[0].chunks_exact(4)) {
            *s += u64::from(u32::from_le_bytes(c.try_into().expect("4 bytes")));
        }
    }
    let bytes: Vec<u8> = sums.iter().flat_map(|c| c.to_le_bytes()).collect();
    ctx.dir.put(&format!("{}/df.bin", dedup_dir(task, tasks)), bytes.into()).await?;
    Ok(())
}

/// The sample's documents that pass the quality cut, by id, for the cluster task to take its
/// duplicates out of.
pub(super) struct Sample(HashMap<u64, Sampled>);

impl Sample {
    /// Every map task's sample.
    pub(super) async fn read(ctx: &Context, thresholds: &BTreeMap<String, f32>) -> Result<Self> {
        let data = &ctx.run.spec.data;
        let mut docs = HashMap::new();
        for shard in 0..data.shards {
            let name = format!("{}/sample.bin", map_dir(shard, data.shards));
            let sample =
                parse_sample(&ctx.dir.get(&name).await?).ok_or_else(|| corrupt(&ctx.dir, &name, "truncated"))?;
            docs.extend(
                sample.into_iter().filter(|s| passes_quality(data, thresholds, s.source, s.score)).map(|s| (s.doc, s)),
            );
        }
        Ok(Self(docs))
    }

    /// Takes out a duplicate.
    pub(super) fn remove(&mut self, doc: u64) {
        self.0.remove(&doc);
    }
}

/// Decides the in-context partitions: writes the IDF of the `documents` the map tasks kept from
/// the dedup tasks' feature counts, and the centroids of about `path_documents /
/// order.partitionDocuments` partitions (at most one a sampled document), in the order of a path
/// through them. Returns their number.
pub(super) async fn partition(ctx: &Context, sample: Sample, documents: u64, path_documents: u64) -> Result<u32> {
    let data = &ctx.run.spec.data;
    let tasks = data.dedup_tasks();
    let mut df = vec![0u64; FEATURES];
    for task in 0..tasks {
        let name = format!("{}/df.bin", dedup_dir(task, tasks));
        let bytes = ctx.dir.get(&name).await?;
        let mine = share(task, tasks, FEATURES as u32);
        if bytes.len() != mine.len() * 8 {
            return Err(corrupt(&ctx.dir, &name, "not a count for every feature of its slice"));
        }
        for (d, c) in df[mine.start as usize..mine.end as usize].iter_mut().zip(bytes.chunks_exact(8)) {
            *d = u64::from_le_bytes(c.try_into().expect("8 bytes"));
        }
    }
    let idf = Idf::from_counts(&df, documents);
    drop(df);
    ctx.dir.put("cluster/idf.bin", idf.to_bytes().into()).await?;
    let mut sampled: Vec<Sampled> = sample.0.into_values().collect();
    let seed = ctx.run.spec.seed;
    sampled.sort_by_key(|s| (sample_hash(seed, s.doc), s.doc));
    let wanted = path_documents.div_ceil(data.order.partition_documents).max(1);
    let partitions = wanted.min(sampled.len() as u64).max(1) as usize;
    let centroids = if partitions == 1 {
        Vec::new()
    } else {
        tokio::task::spawn_blocking(move || {
            let mut vectors = vec![0f32; sampled.len() * DIMS];
            for (v, s) in vectors.chunks_exact_mut(DIMS).zip(&sampled) {
                embed_document(&s.terms, &idf, v);
            }
            Partitions::fit(&vectors, partitions, KMEANS_ITERATIONS).to_bytes()
        })
        .await
        .expect("k-means does not panic")
    };
    ctx.dir.put("cluster/centroids.bin", centroids.into()).await?;
    Ok(partitions as u32)
}

pub(super) fn embed_dir(task: u32, tasks: u32) -> String {
    format!("embed/{task:05}-of-{tasks:05}")
}

pub(super) fn order_dir(task: u32, tasks: u32) -> String {
    format!("order/{task:05}-of-{tasks:05}")
}

/// What an embed task embedded (`_DONE.json`).
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct EmbedTask {
    #[serde(default)]
    format: u32,
    /// Documents embedded.
    documents: u64,
    /// The sum of their embeddings, in fixed point ([`FIXED`] to 1).
    sum: Vec<i64>,
    /// Documents sent to each partition.
    partitions: Vec<u64>,
}

/// One partition's path (in an order task's `_DONE.json`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct PartitionPath {
    partition: u32,
    /// Documents on the path.
    documents: u64,
    /// The sum of the cosines of consecutive documents on it.
    similarity: f64,
}

/// What an order task decided (`_DONE.json`).
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct OrderTask {
    #[serde(default)]
    format: u32,
    partitions: Vec<PartitionPath>,
    /// Documents dropped as semantic duplicates.
    semantic_removed: u64,
    /// Training bytes they took out of each category (held-out documents never count).
    removed_bytes: BTreeMap<String, u64>,
    /// Where each map task's decisions begin in `positions.bin`, in entries; the last is their
    /// count.
    positions: Vec<u64>,
}

async fn embed_done(dir: &StageDir, task: u32, tasks: u32, hash: &str) -> Result<Option<EmbedTask>> {
    let done = MapDone::<EmbedTask>::read(dir, &format!("{}/_DONE.json", embed_dir(task, tasks))).await?;
    Ok(done.filter(|d| d.config_hash == hash && d.task.format == FORMAT).map(|d| d.task))
}

async fn order_done(dir: &StageDir, task: u32, tasks: u32, hash: &str) -> Result<Option<OrderTask>> {
    let done = MapDone::<OrderTask>::read(dir, &format!("{}/_DONE.json", order_dir(task, tasks))).await?;
    Ok(done.filter(|d| d.config_hash == hash && d.task.format == FORMAT).map(|d| d.task))
}

/// Runs embed task `task` of this spec (`hash`), unless it is done.
pub(super) async fn embed_task(ctx: &Context, task: u32, hash: &str) -> Result<()> {
    let data = &ctx.run.spec.data;
    require_in_context(data, "embed")?;
    let tasks = data.embed_tasks();
    check_task("embed", task, tasks)?;
    if embed_done(&ctx.dir, task, tasks, hash).await?.is_some() {
        return Ok(());
    }
    let cluster = require_cluster(ctx, hash, "embed tasks").await?;
    let idf = Idf::parse(&ctx.dir.get("cluster/idf.bin").await?)
        .ok_or_else(|| corrupt(&ctx.dir, "cluster/idf.bin", "not a weight for every feature"))?;
    let bytes = ctx.dir.get("cluster/centroids.bin").await?;
    let partitions = match cluster.partitions {
        0 | 1 if bytes.is_empty() => None,
        k => Some(
            Partitions::parse(&bytes, k as usize)
                .ok_or_else(|| corrupt(&ctx.dir, "cluster/centroids.bin", "not a centroid for every partition"))?,
        ),
    };
    let tmp = tempfile::tempdir().map_err(scratch(Path::new("tempdir")))?;
    let records_path = tmp.path().join("records.bin");
    let mut records = BufWriter::new(File::create(&records_path).map_err(scratch(&records_path))?);
    // (partition, document, record number): the records sorted into sections.
    let mut index: Vec<(u32, u64, u64)> = Vec::new();
    let mut done = EmbedTask {
        format: FORMAT,
        documents: 0,
        sum: vec![0; DIMS],
        partitions: vec![0; cluster.partitions as usize],
    };
    let mut progress = Progress::new(format!("data-prep embed {task}"), "documents", None);
    let (mut v, mut record) = (vec![0f32; DIMS], Vec::with_capacity(RECORD));
    for shard in share(task, tasks, data.shards) {
        let dir = map_dir(shard, data.shards);
        let name = format!("{dir}/keys.bin");
        let keys = KeyRecord::parse_all(&ctx.dir.get(&name).await?)
            .ok_or_else(|| corrupt(&ctx.dir, &name, "not a whole number of key records"))?;
        let name = format!("{dir}/terms.bin");
        let terms = parse_terms(&ctx.dir.get(&name).await?)
            .filter(|t| t.len() == keys.len())
            .ok_or_else(|| corrupt(&ctx.dir, &name, "term lists do not match the key records"))?;
        let mut drops = cluster_drops(ctx, &cluster, shard).await?.into_iter().peekable();
        for (line, (key, terms)) in keys.iter().zip(&terms).enumerate() {
            let dropped = drops.next_if(|&at| at == line as u64).is_some();
            if dropped || !passes_quality(data, &cluster.thresholds, key.source, key.score) {
                continue;
            }
            embed_document(terms, &idf, &mut v);
            let partition = partitions.as_ref().map_or(0, |p| p.assign(&v) as u32);
            record.clear();
            record.extend_from_slice(&key.doc().to_le_bytes());
            record.extend_from_slice(&(u64::from(shard) << 32 | line as u64).to_le_bytes());
            record.extend_from_slice(&(u64::from(key.source) << 32 | u64::from(key.bytes)).to_le_bytes());
            v.iter().for_each(|x| record.extend_from_slice(&x.to_le_bytes()));
            records.write_all(&record).map_err(scratch(&records_path))?;
            for (s, x) in done.sum.iter_mut().zip(&v) {
                *s += (f64::from(*x) * FIXED).round() as i64;
            }
            index.push((partition, key.doc(), done.documents));
            done.partitions[partition as usize] += 1;
            done.documents += 1;
            progress.update(done.documents, String::new);
        }
    }
    records.flush().map_err(scratch(&records_path))?;
    drop(records);
    index.sort_unstable();
    let file = File::open(&records_path).map_err(scratch(&records_path))?;
    let name = embed_dir(task, tasks);
    let mut sections = Sections::create(&ctx.dir, &format!("{name}/vectors.bin"), cluster.partitions as usize)?;
    let mut buf = vec![0u8; RECORD];
    for (partition, _, n) in index {
        file.read_exact_at(&mut buf, n * RECORD as u64).map_err(scratch(&records_path))?;
        sections.push(partition, &buf).await?;
    }
    sections.finish(&ctx.dir, &format!("{name}/vectors.idx")).await?;
    MapDone { config_hash: hash.into(), task: done }.write(&ctx.dir, &format!("{name}/_DONE.json")).await?;
    Ok(())
}

/// The lines of map task `shard` the cluster task dropped, sorted.
async fn cluster_drops(ctx: &Context, cluster: &ClusterTask, shard: u32) -> Result<Vec<u64>> {
    let entries = shard_entries(&ctx.dir, "cluster/decisions.bin", &cluster.decisions, shard).await?;
    Ok(entries.into_iter().filter(|(_, v)| *v == DROP).map(|(line, _)| line).collect())
}

/// Every embed task's `_DONE.json`, or an error naming the missing ones before `next`.
async fn embeds_done(ctx: &Context, hash: &str, next: &'static str) -> Result<Vec<EmbedTask>> {
    let tasks = ctx.run.spec.data.embed_tasks();
    all_done("embed", tasks, next, |task| embed_done(&ctx.dir, task, tasks, hash)).await
}

/// Runs order task `task` of this spec (`hash`), unless it is done.
pub(super) async fn order_task(ctx: &Context, task: u32, hash: &str) -> Result<()> {
    let data = &ctx.run.spec.data;
    require_in_context(data, "order")?;
    let tasks = data.order_tasks();
    check_task("order", task, tasks)?;
    if order_done(&ctx.dir, task, tasks, hash).await?.is_some() {
        return Ok(());
    }
    let cluster = require_cluster(ctx, hash, "order tasks").await?;
    let embeds = embeds_done(ctx, hash, "order tasks").await?;
    let (seed, threshold) = (ctx.run.spec.seed, data.order.semantic_dedup as f32);
    let tmp = tempfile::tempdir().map_err(scratch(Path::new("tempdir")))?;
    let runs = tmp.path().join("position-runs");
    let mut positions = ExternalSorter::<2>::new(&runs, 1 << 20);
    let mut done = OrderTask { format: FORMAT, ..OrderTask::default() };
    let mut progress = Progress::new(format!("data-prep order {task}"), "partitions", None);
    for partition in share(task, tasks, cluster.partitions) {
        let documents: u64 = embeds.iter().map(|e| e.partitions.get(partition as usize).copied().unwrap_or(0)).sum();
        let (records, embeddings) =
            read_partition(ctx, embeds.len() as u32, (partition, documents), tmp.path()).await?;
        if records.len() as u64 != documents {
            return Err(DataPrepError::Invalid(format!(
                "partition {partition} holds {} documents, but the embed tasks sent it {documents}; delete the data-prep embed/ folder and run the embed tasks again",
                records.len()
            )));
        }
        let plan = tokio::task::spawn_blocking(move || order::plan(&embeddings, seed, threshold))
            .await
            .expect("the in-context plan does not panic");
        let mut decision = vec![DROP; records.len()];
        for (rank, &i) in plan.path.iter().enumerate() {
            decision[i] = u64::from(partition) << 32 | rank as u64;
        }
        for (&[doc, location, packed], value) in records.iter().zip(decision) {
            positions.push([location, value]).map_err(scratch(&runs))?;
            if value == DROP {
                done.semantic_removed += 1;
                if !held_out(data, seed, doc) {
                    let category = data.sources.get((packed >> 32) as usize).map_or("", |s| s.category());
                    *done.removed_bytes.entry(category.to_string()).or_default() += packed & 0xffff_ffff;
                }
            }
        }
        let documents = plan.path.len() as u64;
        done.partitions.push(PartitionPath { partition, documents, similarity: plan.similarity });
        progress.update(done.partitions.len() as u64, String::new);
    }
    let out = tmp.path().join("positions.bin");
    positions.finish(&out, false).map_err(scratch(&out))?;
    done.positions = per_shard(&out, data.shards).map_err(scratch(&out))?;
    let name = order_dir(task, tasks);
    ctx.dir.put_file(&format!("{name}/positions.bin"), &out).await?;
    MapDone { config_hash: hash.into(), task: done }.write(&ctx.dir, &format!("{name}/_DONE.json")).await?;
    Ok(())
}

fn word(record: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(record[at..at + 8].try_into().expect("8 bytes"))
}

/// Partition `partition`'s section of every embed file: each document's `[document, location,
/// source << 32 | bytes]` and its embedding, in canonical order (whichever embed task sent it). The
/// sections are downloaded into `tmp` and merged as they decompress, so memory holds only the
/// result.
async fn read_partition(
    ctx: &Context,
    embeds: u32,
    (partition, documents): (u32, u64),
    tmp: &Path,
) -> Result<(Vec<[u64; 3]>, Vec<f32>)> {
    let mut parts = Vec::new();
    for e in 0..embeds {
        let dir = embed_dir(e, embeds);
        let (name, index) = (format!("{dir}/vectors.bin"), format!("{dir}/vectors.idx"));
        let range = sections::ranges(&ctx.dir, &index, partition..partition + 1).await?.remove(0);
        if range.is_empty() {
            continue;
        }
        let local = tmp.join(format!("section-{e:05}.bin"));
        ctx.dir.store().download_range(&ctx.dir.key(&name)?, range, &local).await?;
        parts.push((name, local));
    }
    let dir = ctx.dir.clone();
    tokio::task::spawn_blocking(move || merge_sections(&dir, &parts, documents as usize))
        .await
        .expect("the merge does not panic")
}

/// Reads the next whole record into `buf`; `false` at the end, an error at a partial record.
fn read_record(reader: &mut impl Read, buf: &mut [u8]) -> std::io::Result<bool> {
    let mut filled = 0;
    while filled < buf.len() {
        match reader.read(&mut buf[filled..]) {
            Ok(0) if filled == 0 => return Ok(false),
            Ok(0) => return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "a partial record")),
            Ok(n) => filled += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(true)
}

/// Merges sections of records sorted by document (`(store name, local file)`) into canonical order;
/// `documents` is how many they hold.
fn merge_sections(dir: &StageDir, parts: &[(String, PathBuf)], documents: usize) -> Result<(Vec<[u64; 3]>, Vec<f32>)> {
    let mut readers = Vec::new();
    for (_, local) in parts {
        let decoder = File::open(local).and_then(zstd::Decoder::new).map_err(scratch(local))?;
        readers.push(BufReader::with_capacity(1 << 16, decoder));
    }
    let mut heads: Vec<Vec<u8>> = vec![vec![0u8; RECORD]; parts.len()];
    let mut heap = BinaryHeap::new();
    let mut next = |i: usize, heads: &mut Vec<Vec<u8>>, heap: &mut BinaryHeap<Reverse<(u64, usize)>>| -> Result<()> {
        match read_record(&mut readers[i], &mut heads[i]) {
            Ok(true) => heap.push(Reverse((word(&heads[i], 0), i))),
            Ok(false) => {}
            Err(e) => return Err(corrupt(dir, &parts[i].0, &format!("a section does not decompress whole: {e}"))),
        }
        Ok(())
    };
    for i in 0..parts.len() {
        next(i, &mut heads, &mut heap)?;
    }
    let (mut records, mut embeddings) = (Vec::with_capacity(documents), Vec::with_capacity(documents * DIMS));
    while let Some(Reverse((_, i))) = heap.pop() {
        let r = &heads[i];
        records.push([word(r, 0), word(r, 8), word(r, 16)]);
        embeddings.extend(floats(&r[24..]));
        next(i, &mut heads, &mut heap)?;
    }
    Ok((records, embeddings))
}

/// The in-context paths, as the route tasks and the reduce read them: where each partition's
/// documents begin on the whole path, and what the order tasks removed.
pub(super) struct Paths {
    tasks: Vec<OrderTask>,
    /// Documents on the paths of the partitions before each, and (last) on all.
    starts: Vec<u64>,
    /// Training bytes semantic dedup took out of each category.
    pub(super) removed_bytes: BTreeMap<String, u64>,
    pub(super) semantic_removed: u64,
    /// The mean cosine of consecutive documents within the partitions' paths.
    pub(super) similarity: f64,
}

impl Paths {
    /// Every order task's decisions for this spec (all must be done), before `next`.
    pub(super) async fn read(ctx: &Context, cluster: &ClusterTask, hash: &str, next: &'static str) -> Result<Self> {
        let count = ctx.run.spec.data.order_tasks();
        let tasks = all_done("order", count, next, |task| order_done(&ctx.dir, task, count, hash)).await?;
        let mut by_partition = vec![None; cluster.partitions as usize];
        let (mut removed_bytes, mut semantic_removed) = (BTreeMap::new(), 0);
        for t in &tasks {
            semantic_removed += t.semantic_removed;
            for (c, b) in &t.removed_bytes {
                *removed_bytes.entry(c.clone()).or_default() += b;
            }
            for p in &t.partitions {
                if let Some(slot) = by_partition.get_mut(p.partition as usize) {
                    *slot = Some(p.clone());
                }
            }
        }
        let (mut starts, mut similarity, mut pairs) = (vec![0u64], 0.0, 0u64);
        for (p, path) in by_partition.into_iter().enumerate() {
            let path = path.ok_or_else(|| {
                DataPrepError::Invalid(format!(
                    "no order task planned partition {p} of {}; delete the data-prep order/ folder and run the order tasks again",
                    cluster.partitions
                ))
            })?;
            starts.push(starts[p] + path.documents);
            similarity += path.similarity;
            pairs += path.documents.saturating_sub(1);
        }
        let similarity = similarity / pairs.max(1) as f64;
        Ok(Self { tasks, starts, removed_bytes, semantic_removed, similarity })
    }

    /// The lines of map task `shard` the order tasks decided on, with their decisions: [`DROP`], or
    /// the place on the whole path as a fraction of it (`f64` bits). Sorted by line.
    pub(super) async fn decisions(&self, dir: &StageDir, shard: u32) -> Result<Vec<(u64, u64)>> {
        let count = self.tasks.len() as u32;
        let total = *self.starts.last().expect("a start for every partition and the end");
        // One small ranged read per order task, READS at a time.
        let parts: Vec<Vec<(u64, u64)>> = stream::iter(self.tasks.iter().enumerate())
            .map(|(task, done)| async move {
                let name = format!("{}/positions.bin", order_dir(task as u32, count));
                let entries = shard_entries(dir, &name, &done.positions, shard).await?;
                entries
                    .into_iter()
                    .map(|(line, value)| {
                        if value == DROP {
                            return Ok((line, DROP));
                        }
                        let (partition, rank) = ((value >> 32) as usize, value & 0xffff_ffff);
                        let start =
                            self.starts.get(partition).ok_or_else(|| corrupt(dir, &name, "an unknown partition"))?;
                        Ok((line, ((start + rank) as f64 / total.max(1) as f64).to_bits()))
                    })
                    .collect::<Result<Vec<_>>>()
            })
            .buffered(READS)
            .try_collect()
            .await?;
        let mut out: Vec<(u64, u64)> = parts.into_iter().flatten().collect();
        out.sort_unstable();
        Ok(out)
    }
}

/// The mean cosine of two random documents of the path, from the embed tasks' sums.
pub(super) async fn random_pair_similarity(ctx: &Context, hash: &str) -> Result<f64> {
    let mut sum = vec![0i64; DIMS];
    let mut documents = 0;
    for done in embeds_done(ctx, hash, "reduce").await? {
        documents += done.documents;
        for (s, x) in sum.iter_mut().zip(&done.sum) {
            *s += x;
        }
    }
    let sum: Vec<f64> = sum.iter().map(|s| *s as f64 / FIXED).collect();
    Ok(order::random_pair_similarity(&sum, documents))
}
