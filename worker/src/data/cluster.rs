//! The cluster task, one for the stage, after the dedup tasks (DataTrove's third MinHash step): it
//! unions the duplicate pairs (memory grows with the documents that have a near duplicate, not with
//! the corpus), decides the mix from the dedup tasks' sums, and writes every decision the route
//! tasks need about single documents, sorted by location (`decisions.bin`: `[location, value]`,
//! located per map task by [`ClusterTask::decisions`]): [`DROP`] for an exact or near duplicate (or
//! a semantic one), else a document's place on the in-context path (as `f64` bits).
//!
//! In-context order still plans its path over the whole corpus here (its neighbour graph and
//! traversal read every surviving document's topic terms), so a run that asks for it needs memory in
//! this task that grows with the corpus; the other orders do not.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;

use pretrain_crd::spec::{Data, OrderStrategy};
use pretrain_store::StageDir;
use serde::{Deserialize, Serialize};

use super::buckets::{SourceTally, corrupt, dedup_dir, dedup_done, thresholds, unpack};
use super::dedup::{ClusterStats, Clusters};
use super::keys::{KeyRecord, parse_terms};
use super::order;
use super::plan::{DifficultyHistogram, DocRef, difficulty, held_out, mix_epochs, passes_quality};
use super::runs::{Entry, ExternalSorter, Merge, entry_bytes};
use super::stage::{DataPrepError, Result, map_dir, map_done};
use crate::Context;
use crate::frame::{MapDone, scratch};

/// The decision that drops a document.
pub(super) const DROP: u64 = u64::MAX;

/// The cluster outputs' layout.
const CLUSTER_FORMAT: u32 = 1;

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
    pub(super) semantic_removed: u64,
    /// The near-duplicate verification's counts, over every dedup task.
    pub(super) lsh: ClusterStats,
    /// Training bytes per category before the mix.
    pub(super) bytes_before: BTreeMap<String, u64>,
    /// Epochs of each category the mix takes.
    pub(super) epochs: BTreeMap<String, f64>,
    /// Mean cosine of neighbours on the in-context path, and in canonical order.
    pub(super) adjacent_similarity: Option<[f64; 2]>,
    /// Where each map task's decisions begin in `decisions.bin`, in entries; the last is their count.
    pub(super) decisions: Vec<u64>,
}

impl ClusterTask {
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
    // Near duplicates: every document of a cluster of pairs but its first.
    let mut dropped: HashSet<u64> = HashSet::new();
    let in_context = data.order.strategy == OrderStrategy::InContext;
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
        if in_context {
            dropped.insert(doc);
        }
    }
    for task in 0..data.dedup_tasks() {
        let name = format!("{}/exact.bin", dedup_dir(task, data.dedup_tasks()));
        let local = tmp.path().join("exact.bin");
        ctx.dir.store().download(&ctx.dir.key(&name)?, &local).await?;
        for entry in Merge::<2>::open(std::slice::from_ref(&local)).map_err(scratch(&local))? {
            let [location, doc] = entry.map_err(|e| corrupt(&ctx.dir, &name, &e.to_string()))?;
            if in_context {
                dropped.insert(doc);
            }
            decisions.push([location, DROP]).map_err(scratch(&runs))?;
        }
    }
    if in_context {
        let plan = in_context_plan(ctx, hash, &done.thresholds, &dropped).await?;
        for (d, decision) in plan.decisions {
            if decision == DROP {
                uncount(
                    data,
                    seed,
                    d.key.doc(),
                    (d.key.source, d.key.bytes, d.key.score),
                    &mut sources,
                    &mut difficulties,
                );
                done.semantic_removed += 1;
            }
            decisions.push([u64::from(d.shard) << 32 | d.pos as u64, decision]).map_err(scratch(&runs))?;
        }
        done.adjacent_similarity = Some(plan.similarity);
    }
    done.add_sources(data, &sources);
    done.epochs = mix_epochs(&done.bytes_before, &data.mix.weights, data.mix.max_epochs);
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
fn per_shard(path: &Path, shards: u32) -> std::io::Result<Vec<u64>> {
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

/// The in-context plan's decisions: each surviving document's place on the path, or [`DROP`] for a
/// semantic duplicate; and the path's mean neighbour similarity against canonical order's.
struct InContextPlan {
    decisions: Vec<(DocRef, u64)>,
    similarity: [f64; 2],
}

/// Plans the in-context path over every document that passes quality and is not `dropped` (exact and
/// near duplicates), reading every map task's key records and topic terms.
async fn in_context_plan(
    ctx: &Context,
    hash: &str,
    thresholds: &BTreeMap<String, f32>,
    dropped: &HashSet<u64>,
) -> Result<InContextPlan> {
    let data = ctx.run.spec.data.clone();
    let (docs, terms) = read_keys(ctx, hash).await?;
    let included: Vec<bool> = docs
        .iter()
        .map(|d| passes_quality(&data, thresholds, d.key.source, d.key.score) && !dropped.contains(&d.key.doc()))
        .collect();
    let (seed, threshold) = (ctx.run.spec.seed, data.order.semantic_dedup as f32);
    let (plan, included) = tokio::task::spawn_blocking(move || {
        let plan = order::plan(&terms, &included, seed, threshold);
        (plan, included)
    })
    .await
    .expect("the in-context plan does not panic");
    let decisions = docs
        .into_iter()
        .enumerate()
        .filter(|(i, _)| included[*i])
        .map(|(i, d)| (d, if plan.dropped[i] { DROP } else { plan.position[i].to_bits() }))
        .collect();
    Ok(InContextPlan { decisions, similarity: [plan.adjacent_similarity, plan.canonical_similarity] })
}

/// Every map task's key records, as documents in canonical order, with their topic terms. Every
/// map task must be done for this spec.
async fn read_keys(ctx: &Context, hash: &str) -> Result<(Vec<DocRef>, Vec<Vec<(u32, u16)>>)> {
    let shards = ctx.run.spec.data.shards;
    let mut missing = Vec::new();
    let mut docs: Vec<(DocRef, Vec<(u32, u16)>)> = Vec::new();
    for shard in 0..shards {
        if map_done(&ctx.dir, shard, shards, hash).await?.is_none() {
            missing.push(shard);
            continue;
        }
        let name = format!("{}/keys.bin", map_dir(shard, shards));
        let keys = KeyRecord::parse_all(&ctx.dir.get(&name).await?)
            .ok_or_else(|| corrupt(&ctx.dir, &name, "not a whole number of key records"))?;
        let name = format!("{}/terms.bin", map_dir(shard, shards));
        let terms = parse_terms(&ctx.dir.get(&name).await?)
            .filter(|t| t.len() == keys.len())
            .ok_or_else(|| corrupt(&ctx.dir, &name, "term lists do not match the key records"))?;
        docs.extend(
            keys.into_iter().zip(terms).enumerate().map(|(pos, (key, terms))| (DocRef { shard, pos, key }, terms)),
        );
    }
    if !missing.is_empty() {
        return Err(DataPrepError::TasksMissing { phase: "map", missing, tasks: shards, next: "cluster task" });
    }
    // Canonical order: input file, then record, whatever the shard count.
    docs.sort_by_key(|(d, _)| (d.key.input, d.key.seq));
    Ok(docs.into_iter().unzip())
}
