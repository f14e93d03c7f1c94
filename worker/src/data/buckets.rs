//! The dedup tasks, between the map and the cluster task, the way DataTrove splits MinHash dedup:
//! task `t` of `T` owns an equal share of the key space ([`task_slices`]) of the map tasks' sorted
//! exact-hash and LSH band indexes. It downloads its share of each map task's index (a byte range
//! found by the index's slice table) and merges them.
//! - Exact: every document has one exact-hash entry, which carries its source, size and quality
//!   score, so the task sees each document of its share once. Of the documents sharing a hash that
//!   pass quality, all but the first in canonical order are dropped (`exact.bin`: `[location,
//!   document]`, sorted). The task counts each source's documents, quality and exact removals, and
//!   the bytes and difficulties (`difficulty.bin`) of the rest that are not held out: the cluster
//!   task needs only these sums, less the near duplicates, to decide the mix.
//! - Near: the buckets (band entries sharing a key) of two or more documents are verified as
//!   [`Bucket`] does, over the members that pass quality and are not exact duplicates of an earlier
//!   member, reading their key records and signatures from the map outputs by byte range, a chunk of
//!   documents at a time. The duplicate pairs found are written (`pairs.bin`), with each paired
//!   document's location and record (`members.bin`); the cluster task unions them.
//!
//! A bucket's decision depends on its members only, so the outputs, summed over the tasks, are the
//! same for any number of tasks. Memory is one chunk of documents and one bucket; local disk holds
//! the task's share of the indexes.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use pretrain_crd::spec::Data;
use pretrain_store::StageDir;
use serde::{Deserialize, Serialize};

use super::dedup::{Bucket, ClusterStats};
use super::incontext::{in_context, sum_df};
use super::keys::KeyRecord;
use super::plan::{DifficultyHistogram, difficulty, held_out, passes_quality, quality_thresholds};
use super::quality::ScoreHistogram;
use super::runs::{Entry, ExternalSorter, Merge, SliceIndex, entry_bytes, task_slices};
use super::stage::{DataPrepError, Result, all_done, check_task, map_dir, map_done};
use crate::Context;
use crate::frame::{MapDone, ScratchError, scratch};
use crate::progress::Progress;

/// Documents whose records are read at once.
const CHUNK: usize = 1 << 16;

/// The dedup outputs' layout: 3 adds the feature-count slice of in-context order (`df.bin`).
const DEDUP_FORMAT: u32 = 3;

pub(super) fn dedup_dir(task: u32, tasks: u32) -> String {
    format!("dedup/{task:05}-of-{tasks:05}")
}

/// What a dedup task records beside its outputs (`_DONE.json`).
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct DedupTask {
    #[serde(default)]
    format: u32,
    /// Exact-hash entries in the task's share: one a document.
    pub(super) exact_entries: u64,
    /// Documents dropped as exact duplicates.
    pub(super) exact_dropped: u64,
    /// Band entries in the task's share, and those in buckets of two or more.
    pub(super) band_entries: u64,
    pub(super) band_candidates: u64,
    /// The verification's counts.
    pub(super) near: ClusterStats,
    /// The share's documents by source (index in `spec.data.sources`).
    pub(super) sources: Vec<SourceTally>,
}

/// One source's documents in a dedup task's share.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct SourceTally {
    /// Documents.
    pub(super) documents: u64,
    /// Under the quality threshold.
    pub(super) quality_removed: u64,
    /// Exact duplicates of a document that passes quality.
    pub(super) exact_removed: u64,
    /// Text bytes of the others that are not held out: the training candidates, before near dedup.
    pub(super) train_bytes: u64,
}

impl SourceTally {
    /// Adds another task's counts, source by source.
    pub(super) fn add_all(all: &mut Vec<Self>, other: &[Self]) {
        if all.len() < other.len() {
            all.resize(other.len(), Self::default());
        }
        for (a, b) in all.iter_mut().zip(other) {
            a.documents += b.documents;
            a.quality_removed += b.quality_removed;
            a.exact_removed += b.exact_removed;
            a.train_bytes += b.train_bytes;
        }
    }
}

/// A document's source, size and score packed into two words of an index entry, as the map writes
/// them: `[source << 32 | bytes, score bits]`.
pub(super) fn pack(record: &KeyRecord) -> [u64; 2] {
    [u64::from(record.source) << 32 | u64::from(record.bytes), u64::from(record.score.to_bits())]
}

/// The source, size and score of [`pack`]ed words.
pub(super) fn unpack(words: [u64; 2]) -> (u16, u32, f32) {
    ((words[0] >> 32) as u16, words[0] as u32, f32::from_bits(words[1] as u32))
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
    all_done("map", shards, next, |shard| map_done(&ctx.dir, shard, shards, hash)).await.map(drop)
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
    check_task("dedup", task, tasks)?;
    if dedup_done(&ctx.dir, task, tasks, hash).await?.is_some() {
        return Ok(());
    }
    require_maps(ctx, hash, "dedup tasks").await?;
    let thresholds = thresholds(ctx).await?;
    let tmp = tempfile::tempdir().map_err(scratch(Path::new("tempdir")))?;
    let maps = MapFiles::new(ctx, data);
    let mut done = DedupTask { format: DEDUP_FORMAT, ..DedupTask::default() };
    let out = |name: &str| tmp.path().join(name);

    let files = maps.download_share::<6>("exact", task, tasks, tmp.path()).await?;
    let mut pass = ExactPass::new(data, ctx.run.spec.seed, thresholds.clone(), &out("exact-runs"));
    let mut progress = Progress::new(format!("data-prep dedup {task}"), "entries", None);
    let pass = tokio::task::spawn_blocking(move || -> Result<ExactPass, ScratchError> {
        let path = files.first().cloned().unwrap_or_default();
        for entry in Merge::<6>::open(&files).map_err(scratch(&path))? {
            pass.visit(&entry.map_err(scratch(&path))?).map_err(scratch(&path))?;
            progress.update(pass.entries, String::new);
        }
        Ok(pass)
    })
    .await
    .expect("the exact pass does not panic")?;
    (done.exact_entries, done.exact_dropped, done.sources) = (pass.entries, pass.dropped, pass.sources);
    pass.drops.finish(&out("exact.bin"), true).map_err(scratch(&out("exact.bin")))?;
    std::fs::write(out("difficulty.bin"), pass.difficulties.to_bytes()).map_err(scratch(&out("difficulty.bin")))?;

    let mut pairs = ExternalSorter::<2>::new(&out("pair-runs"), 1 << 20);
    let mut members = ExternalSorter::<4>::new(&out("member-runs"), 1 << 20);
    if data.dedup.minhash.enabled {
        let files = maps.download_share::<3>("bands", task, tasks, tmp.path()).await?;
        (done.band_entries, done.band_candidates) = candidates::<3>(files, 1, &out("band-candidates.bin")).await?;
        let mut pass = NearPass {
            data,
            thresholds: &thresholds,
            key: None,
            bucket: Bucket::default(),
            exact: HashSet::new(),
            accepted: HashMap::new(),
            stats: ClusterStats::default(),
            pairs: &mut pairs,
            members: &mut members,
        };
        let mut progress = Progress::new(format!("data-prep dedup {task} near"), "entries", None);
        for_each_chunk::<3>(&out("band-candidates.bin"), &maps, &mut progress, |e, record, signature| {
            pass.visit(e, record, signature)
        })
        .await?;
        done.near = pass.stats;
    }
    pairs.finish(&out("pairs.bin"), true).map_err(scratch(&out("pairs.bin")))?;
    members.finish(&out("members.bin"), true).map_err(scratch(&out("members.bin")))?;

    if in_context(data) {
        sum_df(ctx, task, tasks).await?;
    }
    let dir_name = dedup_dir(task, tasks);
    for name in ["exact.bin", "pairs.bin", "members.bin", "difficulty.bin"] {
        ctx.dir.put_file(&format!("{dir_name}/{name}"), &out(name)).await?;
    }
    MapDone { config_hash: hash.into(), task: done }.write(&ctx.dir, &format!("{dir_name}/_DONE.json")).await?;
    Ok(())
}

/// The exact pass over every document of the task's share, in hash order: it counts each source's
/// documents, drops the exact duplicates (`[location, document]`, when exact dedup is on) and counts
/// the training candidates' bytes and difficulties.
struct ExactPass {
    data: Data,
    seed: u64,
    thresholds: BTreeMap<String, f32>,
    /// The current hash, and whether a member of it was kept.
    key: Option<[u64; 2]>,
    kept: bool,
    entries: u64,
    dropped: u64,
    drops: ExternalSorter<2>,
    sources: Vec<SourceTally>,
    difficulties: DifficultyHistogram,
}

impl ExactPass {
    fn new(data: &Data, seed: u64, thresholds: BTreeMap<String, f32>, runs: &Path) -> Self {
        Self {
            data: data.clone(),
            seed,
            thresholds,
            key: None,
            kept: false,
            entries: 0,
            dropped: 0,
            drops: ExternalSorter::new(runs, 1 << 20),
            sources: vec![SourceTally::default(); data.sources.len()],
            difficulties: DifficultyHistogram::default(),
        }
    }

    /// One entry `[hash, hash, document, location, packed record (2 words)]`.
    fn visit(&mut self, e: &Entry<6>) -> std::io::Result<()> {
        self.entries += 1;
        if self.key != Some([e[0], e[1]]) {
            (self.key, self.kept) = (Some([e[0], e[1]]), false);
        }
        let (source, bytes, score) = unpack([e[4], e[5]]);
        let Some(tally) = self.sources.get_mut(usize::from(source)) else {
            return Err(std::io::Error::other(format!(
                "an exact-hash entry names source {source}, but spec.data.sources has {}; the map outputs \
                 disagree with the spec (delete the data-prep map/ folder and run the stage again)",
                self.data.sources.len()
            )));
        };
        tally.documents += 1;
        if !passes_quality(&self.data, &self.thresholds, source, score) {
            tally.quality_removed += 1;
        } else if self.kept && self.data.dedup.exact {
            tally.exact_removed += 1;
            self.dropped += 1;
            self.drops.push([e[3], e[2]])?;
        } else {
            self.kept = true;
            if !held_out(&self.data, self.seed, e[2]) {
                tally.train_bytes += u64::from(bytes);
                self.difficulties.add(difficulty(self.data.order.curriculum_by, bytes, score));
            }
        }
        Ok(())
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
    /// The bucket's members verified so far: `[location, packed record]` by document.
    accepted: HashMap<u64, [u64; 3]>,
    stats: ClusterStats,
    pairs: &'a mut ExternalSorter<2>,
    /// `[document, location, packed record]` of every document in a pair.
    members: &'a mut ExternalSorter<4>,
}

impl NearPass<'_> {
    /// One entry `[band key, document, location]` with its document's record and signature.
    fn visit(&mut self, e: &Entry<3>, record: &KeyRecord, signature: &[u64]) -> std::io::Result<()> {
        if self.key != Some(e[0]) {
            self.key = Some(e[0]);
            self.bucket.clear();
            self.exact.clear();
            self.accepted.clear();
        }
        if !passes_quality(self.data, self.thresholds, record.source, record.score)
            || (self.data.dedup.exact && !self.exact.insert(record.exact))
        {
            return Ok(());
        }
        let [packed, score] = pack(record);
        self.accepted.insert(e[1], [e[2], packed, score]);
        let threshold = self.data.dedup.minhash.jaccard_threshold;
        let mut found = Vec::new();
        self.bucket.add(e[1], signature, threshold, &mut self.stats, |a, b| found.push([a, b]));
        for pair in found {
            self.pairs.push(pair)?;
            for doc in pair {
                let [location, packed, score] = self.accepted[&doc];
                self.members.push([doc, location, packed, score])?;
            }
        }
        Ok(())
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

/// Reads the candidate entries in `path` a chunk at a time, fetches the records and signatures of
/// the chunk's documents from the map outputs, and visits the entries in order.
async fn for_each_chunk<const W: usize>(
    path: &Path,
    maps: &MapFiles,
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
        let fetched = maps.fetch(&locations).await?;
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

    /// The key record and signature of each document location
    /// (`shard << 32 | line`).
    async fn fetch(&self, locations: &[u64]) -> Result<HashMap<u64, (KeyRecord, Vec<u64>)>> {
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
            let sigs = self.ranges(&format!("{dir}/signatures.bin"), &lines, sig_bytes).await?;
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
