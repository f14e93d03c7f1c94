//! The cluster task, one for the stage, after the dedup tasks (DataTrove's third MinHash step): it
//! unions the duplicate pairs (memory grows with the documents that have a near duplicate, not with
//! the corpus), decides the mix from the dedup tasks' sums, and writes every decision the route
//! tasks need about single documents, sorted by location (`decisions.bin`: `[location, value]`,
//! located per map task by [`ClusterTask::decisions`]): [`DROP`] for an exact or near duplicate (or
//! a semantic one). For in-context order it also decides the partitions the order tasks plan
//! (`incontext.rs`).

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use pretrain_crd::spec::Data;
use pretrain_store::StageDir;
use serde::{Deserialize, Serialize};

use super::buckets::{SourceTally, corrupt, dedup_dir, dedup_done, thresholds, unpack};
use super::dedup::{ClusterStats, Clusters};
use super::incontext::{Sample, in_context, partition};
use super::plan::{DifficultyHistogram, difficulty, held_out, mix_epochs};
use super::runs::{Entry, ExternalSorter, Merge, entry_bytes};
use super::stage::{DataPrepError, Result};
use crate::Context;
use crate::frame::{MapDone, scratch};

/// The decision that drops a document.
pub(super) const DROP: u64 = u64::MAX;

/// The cluster outputs' layout: 2 moved in-context planning to the embed and order tasks.
const CLUSTER_FORMAT: u32 = 2;

/// Where the cluster task writes.
pub(super) const CLUSTER_DIR: &str = "cluster";

/// What the cluster task decided (`cluster/_DONE.json`): the stage's statistics up to the mix, and
/// the mix itself.
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct ClusterTask {
    #[serde(default)]
    format: u32,
    /// The quality threshold of each scored category.
    pub(super) thresholds: BTreeMap<String, f32>,
    /// Documents under their category's threshold, per category.
    pub(super) quality_removed: BTreeMap<String, u64>,
    /// Documents the map tasks kept.
    pub(super) candidates: u64,
    pub(super) exact_removed: u64,
    pub(super) near_removed: u64,
    /// The near-duplicate verification's counts, over every dedup task.
    pub(super) lsh: ClusterStats,
    /// Training bytes per category after exact and near dedup.
    pub(super) bytes_before: BTreeMap<String, u64>,
    /// In-context order's partitions (0 for the other orders).
    pub(super) partitions: u32,
    /// Where each map task's decisions begin in `decisions.bin`, in entries; the last is their count.
    pub(super) decisions: Vec<u64>,
}

/// The mix: each category's training bytes before it, and the epochs it takes of each.
pub(super) struct Mix {
    pub(super) bytes_before: BTreeMap<String, u64>,
    pub(super) epochs: BTreeMap<String, f64>,
}

impl ClusterTask {
    /// The mix, once semantic dedup (in-context order) has taken `removed` training bytes out of
    /// each category.
    pub(super) fn mix(&self, data: &Data, removed: Option<&BTreeMap<String, u64>>) -> Mix {
        let removed = |c: &str| removed.and_then(|r| r.get(c)).copied().unwrap_or(0);
        let bytes_before: BTreeMap<String, u64> =
            self.bytes_before.iter().map(|(c, b)| (c.clone(), b.saturating_sub(removed(c)))).collect();
        let epochs = mix_epochs(&bytes_before, &data.mix.weights, data.mix.max_epochs);
        Mix { bytes_before, epochs }
    }

    /// Counts the sources' documents, quality removals and training bytes per category.
    fn add_sources(&mut self, data: &Data, sources: &[SourceTally]) {
        for (i, tally) in sources.iter().enumerate() {
            let category = data.sources.get(i).map_or("", |s| s.category()).to_string();
            self.candidates += tally.documents;
            *self.bytes_before.entry(category.clone()).or_default() += tally.train_bytes;
            if tally.quality_removed > 0 {
                *self.quality_removed.entry(category).or_default() += tally.quality_removed;
            }
        }
    }
}

pub(super) async fn cluster_done(dir: &StageDir, hash: &str) -> Result<Option<ClusterTask>> {
    let done = MapDone::<ClusterTask>::read(dir, &format!("{CLUSTER_DIR}/_DONE.json")).await?;
    Ok(done.filter(|d| d.config_hash == hash && d.task.format == CLUSTER_FORMAT).map(|d| d.task))
}

/// The training documents' difficulties, as the cluster task left them (for a curriculum).
pub(super) async fn difficulties(dir: &StageDir) -> Result<DifficultyHistogram> {
    let name = format!("{CLUSTER_DIR}/difficulty.bin");
    DifficultyHistogram::parse(&dir.get(&name).await?).ok_or_else(|| corrupt(dir, &name, "not a histogram"))
}

/// Runs the cluster task of this spec (`hash`), unless it is done.
pub(super) async fn cluster_task(ctx: &Context, hash: &str) -> Result<()> {
    if cluster_done(&ctx.dir, hash).await?.is_some() {
        return Ok(());
    }
    let data = &ctx.run.spec.data;
    let seed = ctx.run.spec.seed;
    let tmp = tempfile::tempdir().map_err(scratch(Path::new("tempdir")))?;
    let sums = read_dedup(ctx, hash).await?;
    let mut done = ClusterTask {
        format: CLUSTER_FORMAT,
        thresholds: thresholds(ctx).await?,
        exact_removed: sums.exact_removed,
        lsh: sums.lsh,
        ..ClusterTask::default()
    };
    let (mut sources, mut difficulties) = (sums.sources, sums.difficulties);
    let runs = tmp.path().join("decision-runs");
    let mut decisions = ExternalSorter::<2>::new(&runs, 1 << 20);
    let mut sample = if in_context(data) { Some(Sample::read(ctx, &done.thresholds).await?) } else { None };
    // Near duplicates: every document of a cluster of pairs but its first.
    for doc in sums.clusters.dropped() {
        let &[location, packed, score] = sums.members.get(&doc).ok_or_else(|| {
            DataPrepError::Invalid(format!(
                "document {} of input {} is in a duplicate pair, but no dedup task recorded it in members.bin; \
                 delete the data-prep dedup/ folder and run the stage again",
                doc & 0xffff_ffff,
                doc >> 32
            ))
        })?;
        let (source, bytes, score) = unpack([packed, score]);
        uncount(data, seed, doc, (source, bytes, score), &mut sources, &mut difficulties);
        decisions.push([location, DROP]).map_err(scratch(&runs))?;
        done.near_removed += 1;
        if let Some(s) = &mut sample {
            s.remove(doc);
        }
    }
    for task in 0..data.dedup_tasks() {
        let name = format!("{}/exact.bin", dedup_dir(task, data.dedup_tasks()));
        let local = tmp.path().join("exact.bin");
        ctx.dir.store().download(&ctx.dir.key(&name)?, &local).await?;
        for entry in Merge::<2>::open(std::slice::from_ref(&local)).map_err(scratch(&local))? {
            let [location, doc] = entry.map_err(|e| corrupt(&ctx.dir, &name, &e.to_string()))?;
            if let Some(s) = &mut sample {
                s.remove(doc);
            }
            decisions.push([location, DROP]).map_err(scratch(&runs))?;
        }
    }
    done.add_sources(data, &sources);
    if let Some(sample) = sample {
        let quality_removed: u64 = done.quality_removed.values().sum();
        let path_documents = done.candidates.saturating_sub(quality_removed + done.exact_removed + done.near_removed);
        done.partitions = partition(ctx, sample, done.candidates, path_documents).await?;
    }
    let out = tmp.path().join("decisions.bin");
    decisions.finish(&out, true).map_err(scratch(&out))?;
    done.decisions = per_shard(&out, data.shards).map_err(scratch(&out))?;
    ctx.dir.put_file(&format!("{CLUSTER_DIR}/decisions.bin"), &out).await?;
    ctx.dir.put(&format!("{CLUSTER_DIR}/difficulty.bin"), difficulties.to_bytes().into()).await?;
    MapDone { config_hash: hash.into(), task: done }.write(&ctx.dir, &format!("{CLUSTER_DIR}/_DONE.json")).await?;
    Ok(())
}

/// Takes a dropped document out of the training candidates' sums, unless it was held out (then it
/// was never in them).
fn uncount(
    data: &Data,
    seed: u64,
    doc: u64,
    (source, bytes, score): (u16, u32, f32),
    sources: &mut [SourceTally],
    difficulties: &mut DifficultyHistogram,
) {
    if held_out(data, seed, doc) {
        return;
    }
    if let Some(tally) = sources.get_mut(usize::from(source)) {
        tally.train_bytes = tally.train_bytes.saturating_sub(u64::from(bytes));
    }
    difficulties.remove(difficulty(data.order.curriculum_by, bytes, score));
}

/// Where each map task's entries begin in a file of `[location, value]` entries sorted by location,
/// and (last) their count.
pub(super) fn per_shard(path: &Path, shards: u32) -> std::io::Result<Vec<u64>> {
    let mut offsets = vec![0u64; shards as usize + 1];
    for entry in Merge::<2>::open(&[path.to_path_buf()])? {
        let [location, _] = entry?;
        let shard = ((location >> 32) as usize).min(shards as usize - 1);
        offsets[shard + 1] += 1;
    }
    for k in 1..offsets.len() {
        offsets[k] += offsets[k - 1];
    }
    Ok(offsets)
}

/// What the dedup tasks found, summed: each source's counts and the training candidates'
/// difficulties before near dedup, the pairs clustered, and each paired document's `[location,
/// packed record]`.
struct DedupSums {
    sources: Vec<SourceTally>,
    difficulties: DifficultyHistogram,
    exact_removed: u64,
    lsh: ClusterStats,
    clusters: Clusters,
    members: HashMap<u64, [u64; 3]>,
}

/// Every dedup task's outputs for this spec (all must be done).
async fn read_dedup(ctx: &Context, hash: &str) -> Result<DedupSums> {
    let tasks = ctx.run.spec.data.dedup_tasks();
    let mut missing = Vec::new();
    let mut sums = DedupSums {
        sources: Vec::new(),
        difficulties: DifficultyHistogram::default(),
        exact_removed: 0,
        lsh: ClusterStats::default(),
        clusters: Clusters::default(),
        members: HashMap::new(),
    };
    for task in 0..tasks {
        let Some(done) = dedup_done(&ctx.dir, task, tasks, hash).await? else {
            missing.push(task);
            continue;
        };
        SourceTally::add_all(&mut sums.sources, &done.sources);
        sums.lsh.add(&done.near);
        sums.exact_removed += done.exact_dropped;
        let dir = dedup_dir(task, tasks);
        let name = format!("{dir}/difficulty.bin");
        let part = DifficultyHistogram::parse(&ctx.dir.get(&name).await?)
            .ok_or_else(|| corrupt(&ctx.dir, &name, "not a histogram"))?;
        sums.difficulties.merge(&part);
        let name = format!("{dir}/pairs.bin");
        let pairs = words::<2>(&ctx.dir.get(&name).await?)
            .ok_or_else(|| corrupt(&ctx.dir, &name, "not a whole number of pairs"))?;
        pairs.into_iter().for_each(|[a, b]| sums.clusters.union(a, b));
        let name = format!("{dir}/members.bin");
        let members = words::<4>(&ctx.dir.get(&name).await?)
            .ok_or_else(|| corrupt(&ctx.dir, &name, "not a whole number of members"))?;
        sums.members.extend(members.into_iter().map(|[doc, location, packed, score]| (doc, [location, packed, score])));
    }
    if !missing.is_empty() {
        return Err(DataPrepError::TasksMissing { phase: "dedup", missing, tasks, next: "cluster task" });
    }
    Ok(sums)
}

/// A file of `W`-word entries; `None` if its length is not a whole number of them.
fn words<const W: usize>(bytes: &[u8]) -> Option<Vec<Entry<W>>> {
    bytes.len().is_multiple_of(entry_bytes::<W>()).then(|| {
        bytes
            .chunks_exact(entry_bytes::<W>())
            .map(|c| std::array::from_fn(|i| u64::from_le_bytes(c[i * 8..i * 8 + 8].try_into().expect("8 bytes"))))
            .collect()
    })
}

/// Map task `shard`'s entries of `name`, a file of `[location, value]` entries sorted by location
/// whose map tasks begin at `offsets` (in entries): `(line, value)`, sorted by line.
pub(super) async fn shard_entries(dir: &StageDir, name: &str, offsets: &[u64], shard: u32) -> Result<Vec<(u64, u64)>> {
    let (from, to) = (offsets[shard as usize], offsets[shard as usize + 1]);
    if from == to {
        return Ok(Vec::new());
    }
    let range = from * 16..to * 16;
    let got = dir.store().get_ranges(&dir.key(name)?, std::slice::from_ref(&range)).await?;
    let bytes = got.first().filter(|b| b.len() as u64 == (to - from) * 16);
    let bytes = bytes.ok_or_else(|| corrupt(dir, name, "shorter than its index in _DONE.json"))?;
    let word = |c: &[u8]| u64::from_le_bytes(c.try_into().expect("8 bytes"));
    Ok(bytes.chunks_exact(16).map(|c| (word(&c[..8]) & 0xffff_ffff, word(&c[8..]))).collect())
}
