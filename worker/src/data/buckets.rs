//! The dedup tasks, between the map and the reduce, the way DataTrove splits MinHash dedup: task `t`
//! of `T` owns an equal share of the key space ([`task_slices`]) of the map tasks' sorted exact-hash
//! and LSH band indexes. It downloads its share of each map task's index (a byte range found by the
//! index's slice table), merges them, and keeps the buckets (entries sharing a key) of two or more
//! documents. For those it reads the documents' key records and signatures from the map outputs by
//! byte range, a chunk of documents at a time, and decides:
//! - exact: of the documents sharing a hash that pass quality, all but the first in canonical order
//!   are dropped (`exact.bin`, their ids, sorted);
//! - near: each bucket is verified as [`Bucket`] does, over the members that pass quality and are
//!   not exact duplicates of an earlier member (those are the exact dedup's); the duplicate pairs
//!   found are written (`pairs.bin`), and the reduce unions them.
//!
//! A bucket's decision depends on its members only, so the outputs, summed over the tasks, are the
//! same for any number of tasks. Memory is one chunk of documents and one bucket's heads; local disk
//! holds the task's share of the indexes.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use pretrain_crd::spec::Data;
use pretrain_store::StageDir;
use serde::{Deserialize, Serialize};

use super::dedup::{Bucket, ClusterStats};
use super::keys::KeyRecord;
use super::plan::{passes_quality, quality_thresholds};
use super::quality::ScoreHistogram;
use super::runs::{Entry, ExternalSorter, Merge, SliceIndex, entry_bytes, task_slices};
use super::stage::{DataPrepError, Result, map_dir, map_done};
use crate::Context;
use crate::frame::{MapDone, ScratchError, scratch};
use crate::progress::Progress;

/// Documents whose records are read at once.
const CHUNK: usize = 1 << 16;

/// The dedup outputs' layout.
const DEDUP_FORMAT: u32 = 1;

pub(super) fn dedup_dir(task: u32, tasks: u32) -> String {
    format!("dedup/{task:05}-of-{tasks:05}")
}

/// What a dedup task records beside its outputs (`_DONE.json`).
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct DedupTask {
    #[serde(default)]
    format: u32,
    /// Exact-hash entries in the task's share, and those in buckets of two or more.
    pub(super) exact_entries: u64,
    pub(super) exact_candidates: u64,
    /// Documents dropped as exact duplicates.
    pub(super) exact_dropped: u64,
    /// Band entries in the task's share, and those in buckets of two or more.
    pub(super) band_entries: u64,
    pub(super) band_candidates: u64,
    /// The verification's counts.
    pub(super) near: ClusterStats,
}

pub(super) async fn dedup_done(dir: &StageDir, task: u32, tasks: u32, hash: &str) -> Result<Option<DedupTask>> {
    let done = MapDone::<DedupTask>::read(dir, &format!("{}/_DONE.json", dedup_dir(task, tasks))).await?;
    Ok(done.filter(|d| d.config_hash == hash && d.task.format == DEDUP_FORMAT).map(|d| d.task))
}

/// The quality thresholds of this spec, from every map task's score histogram (the caller checked
/// that every map task is done).
pub(super) async fn thresholds(ctx: &Context) -> Result<BTreeMap<String, f32>> {
    let data = &ctx.run.spec.data;
    let mut scores = ScoreHistogram::default();
    for shard in 0..data.shards {
        let name = format!("{}/scores.bin", map_dir(shard, data.shards));
        let bytes = ctx.dir.get(&name).await?;
        let part = ScoreHistogram::parse(&bytes).ok_or_else(|| corrupt(&ctx.dir, &name, "not a score histogram"))?;
        scores.merge(&part);
    }
    Ok(quality_thresholds(data, &scores))
}

/// Fails unless every map task is done for this spec, naming the phase that needs them (`next`).
async fn require_maps(ctx: &Context, hash: &str, next: &'static str) -> Result<()> {
    let shards = ctx.run.spec.data.shards;
    let mut missing = Vec::new();
    for shard in 0..shards {
        if map_done(&ctx.dir, shard, shards, hash).await?.is_none() {
            missing.push(shard);
        }
    }
    if missing.is_empty() {
        Ok(())
    } else {
        Err(DataPrepError::TasksMissing { phase: "map", missing, tasks: shards, next })
    }
}

/// The stage's file `name` is not what its writer wrote.
pub(super) fn corrupt(dir: &StageDir, name: &str, reason: &str) -> DataPrepError {
    let key = dir.key(name).map_or_else(|_| name.to_string(), |k| k.to_string());
    pretrain_store::Error::Corrupt { store: dir.store().url().into(), key, reason: reason.into() }.into()
}

/// Runs dedup task `task` of this spec (`hash`), unless it is done.
pub(super) async fn dedup_task(ctx: &Context, task: u32, hash: &str) -> Result<()> {
    let data = &ctx.run.spec.data;
    let tasks = data.dedup_tasks();
    if task >= tasks {
        return Err(DataPrepError::Invalid(format!(
            "dedup task {task} does not exist: spec.data.tasks.dedup is {tasks}"
        )));
    }
    if dedup_done(&ctx.dir, task, tasks, hash).await?.is_some() {
        return Ok(());
    }
    require_maps(ctx, hash, "dedup tasks").await?;
    let thresholds = thresholds(ctx).await?;
    let tmp = tempfile::tempdir().map_err(scratch(Path::new("tempdir")))?;
    let maps = MapFiles::new(ctx, data);
    let mut progress = Progress::new(format!("data-prep dedup {task}"), "entries", None);
    let mut done = DedupTask { format: DEDUP_FORMAT, ..DedupTask::default() };
    let exact_out = tmp.path().join("exact.bin");
    let mut dropped = ExternalSorter::<1>::new(&tmp.path().join("exact-runs"), 1 << 20);
    if data.dedup.exact {
        let files = maps.download_share::<4>("exact", task, tasks, tmp.path()).await?;
        let out = tmp.path().join("exact-candidates.bin");
        (done.exact_entries, done.exact_candidates) = candidates::<4>(files, 2, &out).await?;
        let mut pass = ExactPass { data, thresholds: &thresholds, key: None, kept: false, dropped: &mut dropped };
        for_each_chunk::<4>(&out, &maps, false, &mut progress, |e, record, _| pass.visit(e, record)).await?;
    }
    done.exact_dropped = dropped.finish(&exact_out, true).map_err(scratch(&exact_out))?.len();

    let pairs_out = tmp.path().join("pairs.bin");
    let mut pairs = ExternalSorter::<2>::new(&tmp.path().join("pair-runs"), 1 << 20);
    if data.dedup.minhash.enabled {
        let files = maps.download_share::<3>("bands", task, tasks, tmp.path()).await?;
        let out = tmp.path().join("band-candidates.bin");
        (done.band_entries, done.band_candidates) = candidates::<3>(files, 1, &out).await?;
        let mut pass = NearPass {
            data,
            thresholds: &thresholds,
            key: None,
            bucket: Bucket::default(),
            exact: HashSet::new(),
            stats: ClusterStats::default(),
            pairs: &mut pairs,
        };
        for_each_chunk::<3>(&out, &maps, true, &mut progress, |e, record, signature| pass.visit(e, record, signature))
            .await?;
        done.near = pass.stats;
    }
    pairs.finish(&pairs_out, true).map_err(scratch(&pairs_out))?;

    let dir_name = dedup_dir(task, tasks);
    ctx.dir.put_file(&format!("{dir_name}/exact.bin"), &exact_out).await?;
    ctx.dir.put_file(&format!("{dir_name}/pairs.bin"), &pairs_out).await?;
    MapDone { config_hash: hash.into(), task: done }.write(&ctx.dir, &format!("{dir_name}/_DONE.json")).await?;
    Ok(())
}

/// The exact pass's state across chunks: the current hash and whether a member of it was kept.
struct ExactPass<'a> {
    data: &'a Data,
    thresholds: &'a BTreeMap<String, f32>,
    key: Option<[u64; 2]>,
    kept: bool,
    dropped: &'a mut ExternalSorter<1>,
}

impl ExactPass<'_> {
    /// One entry `[hash, hash, document, location]` with its document's record.
    fn visit(&mut self, e: &Entry<4>, record: &KeyRecord) -> std::io::Result<()> {
        if self.key != Some([e[0], e[1]]) {
            (self.key, self.kept) = (Some([e[0], e[1]]), false);
        }
        if !passes_quality(self.data, self.thresholds, record.source, record.score) {
            return Ok(());
        }
        if self.kept {
            self.dropped.push([e[2]])
        } else {
            self.kept = true;
            Ok(())
        }
    }
}

/// The near pass's state across chunks: the current bucket.
struct NearPass<'a> {
    data: &'a Data,
    thresholds: &'a BTreeMap<String, f32>,
    key: Option<u64>,
    bucket: Bucket,
    /// Exact hashes of the bucket's members so far.
    exact: HashSet<u128>,
    stats: ClusterStats,
    pairs: &'a mut ExternalSorter<2>,
}

impl NearPass<'_> {
    /// One entry `[band key, document, location]` with its document's record and signature.
    fn visit(&mut self, e: &Entry<3>, record: &KeyRecord, signature: &[u64]) -> std::io::Result<()> {
        if self.key != Some(e[0]) {
            self.key = Some(e[0]);
            self.bucket.clear();
            self.exact.clear();
        }
        if !passes_quality(self.data, self.thresholds, record.source, record.score)
            || (self.data.dedup.exact && !self.exact.insert(record.exact))
        {
            return Ok(());
        }
        let threshold = self.data.dedup.minhash.jaccard_threshold;
        let mut found = Vec::new();
        self.bucket.add(e[1], signature, threshold, &mut self.stats, |a, b| found.push([a, b]));
        found.into_iter().try_for_each(|pair| self.pairs.push(pair))
    }
}

/// Writes the entries of `files` (merged) that share their first `key_words` words with another
/// entry to `out`, in order; returns the entries read and those written.
async fn candidates<const W: usize>(files: Vec<PathBuf>, key_words: usize, out: &Path) -> Result<(u64, u64)> {
    let out = out.to_path_buf();
    let work = move || -> Result<(u64, u64), ScratchError> {
        let mut writer = BufWriter::new(File::create(&out).map_err(scratch(&out))?);
        let put = |w: &mut BufWriter<File>, e: &Entry<W>| e.iter().try_for_each(|x| w.write_all(&x.to_le_bytes()));
        let (mut read, mut written) = (0u64, 0u64);
        let mut first: Option<(Entry<W>, bool)> = None; // the bucket's first entry, and whether it was written
        for entry in Merge::<W>::open(&files).map_err(scratch(&out))? {
            let e = entry.map_err(scratch(&out))?;
            read += 1;
            match &mut first {
                Some((f, written_first)) if f[..key_words] == e[..key_words] => {
                    if !*written_first {
                        put(&mut writer, f).map_err(scratch(&out))?;
                        (*written_first, written) = (true, written + 1);
                    }
                    put(&mut writer, &e).map_err(scratch(&out))?;
                    written += 1;
                }
                _ => first = Some((e, false)),
            }
        }
        writer.flush().map_err(scratch(&out))?;
        Ok((read, written))
    };
    Ok(tokio::task::spawn_blocking(work).await.expect("the candidate pass does not panic")?)
}

/// Reads the candidate entries in `path` a chunk at a time, fetches the records (and signatures,
/// when `signatures`) of the chunk's documents from the map outputs, and visits the entries in order.
async fn for_each_chunk<const W: usize>(
    path: &Path,
    maps: &MapFiles,
    signatures: bool,
    progress: &mut Progress,
    mut visit: impl FnMut(&Entry<W>, &KeyRecord, &[u64]) -> std::io::Result<()>,
) -> Result<()> {
    let mut reader = BufReader::new(File::open(path).map_err(scratch(path))?);
    let mut raw = vec![0u8; entry_bytes::<W>()];
    let mut done = 0u64;
    loop {
        let mut chunk: Vec<Entry<W>> = Vec::with_capacity(CHUNK);
        while chunk.len() < CHUNK {
            match reader.read_exact(&mut raw) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => break,
                Err(e) => return Err(scratch(path)(e).into()),
            }
            let mut e = [0u64; W];
            for (w, c) in e.iter_mut().zip(raw.chunks_exact(8)) {
                *w = u64::from_le_bytes(c.try_into().expect("8 bytes"));
            }
            chunk.push(e);
        }
        if chunk.is_empty() {
            return Ok(());
        }
        let locations: Vec<u64> = chunk.iter().map(|e| e[W - 1]).collect();
        let fetched = maps.fetch(&locations, signatures).await?;
        for e in &chunk {
            let (record, signature) = &fetched[&e[W - 1]];
            if record.doc() != e[W - 2] {
                return Err(DataPrepError::Invalid(format!(
                    "a dedup index entry names document {} of input {}, but its map task holds another there; \
                     the map outputs disagree (delete the data-prep map/ folder and run the stage again)",
                    e[W - 2] & 0xffff_ffff,
                    e[W - 2] >> 32
                )));
            }
            visit(e, record, signature).map_err(scratch(path))?;
        }
        done += chunk.len() as u64;
        progress.update(done, String::new);
    }
}

/// Where the map tasks' records and signatures are.
struct MapFiles {
    dir: StageDir,
    shards: u32,
    signature_len: usize,
}

impl MapFiles {
    fn new(ctx: &Context, data: &Data) -> Self {
        let minhash = &data.dedup.minhash;
        let signature_len = if minhash.enabled { (minhash.buckets * minhash.hashes_per_bucket) as usize } else { 0 };
        Self { dir: ctx.dir.clone(), shards: data.shards, signature_len }
    }

    /// Downloads this task's share of every map task's `{name}.bin` into `tmp`.
    async fn download_share<const W: usize>(
        &self,
        name: &str,
        task: u32,
        tasks: u32,
        tmp: &Path,
    ) -> Result<Vec<PathBuf>> {
        let mut files = Vec::new();
        for shard in 0..self.shards {
            let dir = map_dir(shard, self.shards);
            let idx_name = format!("{dir}/{name}.idx");
            let index = SliceIndex::parse(&self.dir.get(&idx_name).await?)
                .ok_or_else(|| corrupt(&self.dir, &idx_name, "not a slice index"))?;
            let entries = index.entries(task_slices(task, tasks));
            let bytes = entry_bytes::<W>() as u64;
            let local = tmp.join(format!("{name}-{shard:05}.bin"));
            let key = self.dir.key(&format!("{dir}/{name}.bin"))?;
            self.dir.store().download_range(&key, entries.start * bytes..entries.end * bytes, &local).await?;
            files.push(local);
        }
        Ok(files)
    }

    /// The key record (and signature, when `signatures`) of each document location
    /// (`shard << 32 | line`).
    async fn fetch(&self, locations: &[u64], signatures: bool) -> Result<HashMap<u64, (KeyRecord, Vec<u64>)>> {
        let mut by_shard: BTreeMap<u32, Vec<u64>> = BTreeMap::new();
        for &l in locations {
            by_shard.entry((l >> 32) as u32).or_default().push(l & 0xffff_ffff);
        }
        let mut out = HashMap::with_capacity(locations.len());
        for (shard, mut lines) in by_shard {
            if shard >= self.shards {
                return Err(DataPrepError::Invalid(format!(
                    "a dedup index entry names map task {shard}, but spec.data.shards is {}",
                    self.shards
                )));
            }
            lines.sort_unstable();
            lines.dedup();
            let dir = map_dir(shard, self.shards);
            let records = self.ranges(&format!("{dir}/keys.bin"), &lines, KeyRecord::SIZE).await?;
            let sig_bytes = self.signature_len * 8;
            let sigs = if signatures {
                self.ranges(&format!("{dir}/signatures.bin"), &lines, sig_bytes).await?
            } else {
                Vec::new()
            };
            for (i, line) in lines.iter().enumerate() {
                let record = KeyRecord::parse(records[i].as_ref().try_into().expect("a whole record"));
                let signature = sigs.get(i).map_or_else(Vec::new, |s| {
                    s.chunks_exact(8).map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes"))).collect()
                });
                out.insert(u64::from(shard) << 32 | line, (record, signature));
            }
        }
        Ok(out)
    }

    /// Records `lines` (sorted) of `size` bytes each from the map file `name`, in one `get_ranges`:
    /// the store reads nearby ranges in one request (object_store joins ranges less than 1 MiB
    /// apart; a local file is read range by range). A chunk's records are spread over the whole
    /// file, so a remote store may read all of one map task's file for a chunk: memory and reads are
    /// bounded by the map tasks' size (`data.shards`), not by the corpus. (Reading each span apart,
    /// at most 4 MiB, was tried: on local files it took 3.6 times as long and more memory.)
    async fn ranges(&self, name: &str, lines: &[u64], size: usize) -> Result<Vec<bytes::Bytes>> {
        let size = size as u64;
        let ranges: Vec<_> = lines.iter().map(|l| l * size..(l + 1) * size).collect();
        let got = self.dir.store().get_ranges(&self.dir.key(name)?, &ranges).await?;
        if got.len() != ranges.len() || got.iter().any(|b| b.len() as u64 != size) {
            return Err(corrupt(&self.dir, name, "shorter than the dedup index says"));
        }
        Ok(got)
    }
}
