//! The data-prep reduce: reads every map task's key records, makes the plan (`plan.rs`) with the
//! near-duplicate clusters, routes each kept document to its output shard on local disk, writes
//! the shards sorted by stream position, and commits with the stage's [`DataPrepStats`].

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::File;
use std::io::{BufRead, BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use pretrain_crd::spec::OrderStrategy;
use pretrain_store::artifact::{
    DataPrepStats, DedupStats, DocumentLine, HeldOutStats, MapStats, MixStats, QualityStats, StreamStats,
};
use pretrain_store::{FileEntry, StageCommit, StageDir};

use super::buckets::{corrupt, dedup_dir, dedup_done, thresholds};
use super::dedup::{ClusterStats, Clusters};
use super::keys::{KeyRecord, parse_terms};
use super::order;
use super::plan::{self, DocRef, MixPlan, Placement, StreamEntry};
use super::scoring::trained_eval;
use super::stage::{DataPrepError, OUTPUT_VERSION, Result, map_dir, map_done};
use crate::Context;
use crate::frame::{ScratchError, scratch};

/// Reduces the committed map outputs of this spec (`hash`) to the stage's commit.
pub(super) async fn reduce(ctx: &Context, hash: &str) -> Result<StageCommit> {
    let spec = &ctx.run.spec;
    let data = &spec.data;
    let tmp = tempfile::tempdir().map_err(scratch(Path::new("tempdir")))?;
    let (docs, terms, map) = read_keys(ctx, hash).await?;
    let thresholds = thresholds(ctx).await?;
    let cut = plan::quality_cut(data, thresholds, &docs);
    let dedup = read_dedup(ctx, hash).await?;
    let mut survivor = cut.passes.clone();
    let (mut exact_removed, mut near_removed) = (0, 0);
    for (keep, d) in survivor.iter_mut().zip(&docs) {
        if *keep && dedup.exact.contains(&d.key.doc()) {
            *keep = false;
            exact_removed += 1;
        } else if *keep && dedup.near.contains(&d.key.doc()) {
            *keep = false;
            near_removed += 1;
        }
    }
    let (mut semantic_removed, mut path) = (0, None);
    if data.order.strategy == OrderStrategy::InContext {
        let included = survivor.clone();
        let threshold = data.order.semantic_dedup as f32;
        let seed = spec.seed;
        let plan = tokio::task::spawn_blocking(move || order::plan(&terms, &included, seed, threshold))
            .await
            .expect("the in-context plan does not panic");
        for (keep, dropped) in survivor.iter_mut().zip(&plan.dropped) {
            if *dropped && *keep {
                *keep = false;
                semantic_removed += 1;
            }
        }
        path = Some(plan);
    }
    let mix = plan::place(data, spec.seed, &docs, &survivor);
    let positions = path.as_ref().map(|p| p.position.as_slice()).unwrap_or_default();
    let stream = plan::order(data, spec.seed, spec.train.seq_len, &docs, &mix.placements, positions);
    let routed = route(ctx, &docs, &mix.placements, &stream, tmp.path()).await?;
    let stats = DataPrepStats {
        output_version: OUTPUT_VERSION,
        map,
        quality: QualityStats {
            thresholds: cut.thresholds,
            removed: cut.removed,
            classifier: trained_eval(&ctx.dir, hash).await?,
        },
        dedup: DedupStats {
            candidates: docs.len() as u64,
            exact_removed,
            near_removed,
            lsh_pairs_compared: dedup.stats.compared,
            lsh_pairs_merged: dedup.stats.merged,
            lsh_collisions_rejected: dedup.stats.rejected,
            semantic_removed,
        },
        held_out: HeldOutStats { documents: routed.held_out },
        mix: routed.mix_stats(mix),
        train: StreamStats {
            documents: stream.len() as u64,
            shards: u64::from(data.shards),
            adjacent_similarity: path.map(|p| [p.adjacent_similarity, p.canonical_similarity]),
        },
    };
    let stats = serde_json::to_value(&stats).expect("data-prep stats serialise");
    Ok(ctx.dir.commit(hash, routed.files, stats).await?)
}

/// Every map task's key records, as documents in canonical order, with their topic terms (for
/// in-context ordering; empty otherwise) and the tasks' merged statistics. Every map task must be
/// done for this spec.
async fn read_keys(ctx: &Context, hash: &str) -> Result<(Vec<DocRef>, Vec<Vec<(u32, u16)>>, MapStats)> {
    let data = &ctx.run.spec.data;
    let shards = data.shards;
    let in_context = data.order.strategy == OrderStrategy::InContext;
    let mut stats = MapStats::default();
    let mut missing = Vec::new();
    let mut docs: Vec<(DocRef, Vec<(u32, u16)>)> = Vec::new();
    for shard in 0..shards {
        let Some(done) = map_done(&ctx.dir, shard, shards, hash).await? else {
            missing.push(shard);
            continue;
        };
        stats.merge(&done.task.stats);
        let name = format!("{}/keys.bin", map_dir(shard, shards));
        let bytes = ctx.dir.get(&name).await?;
        let keys = KeyRecord::parse_all(&bytes)
            .ok_or_else(|| corrupt(&ctx.dir, &name, "not a whole number of key records"))?;
        let mut terms = Vec::new();
        if in_context {
            let name = format!("{}/terms.bin", map_dir(shard, shards));
            let bytes = ctx.dir.get(&name).await?;
            terms = parse_terms(&bytes)
                .filter(|t| t.len() == keys.len())
                .ok_or_else(|| corrupt(&ctx.dir, &name, "term lists do not match the key records"))?;
        }
        let mut terms = terms.into_iter();
        docs.extend(
            keys.into_iter()
                .enumerate()
                .map(|(pos, key)| (DocRef { shard, pos, key }, terms.next().unwrap_or_default())),
        );
    }
    if !missing.is_empty() {
        return Err(DataPrepError::TasksMissing { phase: "map", missing, tasks: shards, next: "reduce" });
    }
    // Canonical order: input file, then record, whatever the shard count.
    docs.sort_by_key(|(d, _)| (d.key.input, d.key.seq));
    let (docs, terms) = docs.into_iter().unzip();
    Ok((docs, terms, stats))
}

/// What the dedup tasks decided: the exact duplicates, the near duplicates (every document of a
/// cluster of duplicate pairs but its first), and the verification's counts. Memory grows with the
/// duplicates, not with the corpus.
struct Dedup {
    exact: HashSet<u64>,
    near: HashSet<u64>,
    stats: ClusterStats,
}

/// Every dedup task's outputs for this spec (all must be done), the pairs clustered.
async fn read_dedup(ctx: &Context, hash: &str) -> Result<Dedup> {
    let tasks = ctx.run.spec.data.dedup_tasks();
    let mut missing = Vec::new();
    let (mut exact, mut clusters, mut stats) = (HashSet::new(), Clusters::default(), ClusterStats::default());
    for task in 0..tasks {
        let Some(done) = dedup_done(&ctx.dir, task, tasks, hash).await? else {
            missing.push(task);
            continue;
        };
        stats.add(&done.near);
        let dir = dedup_dir(task, tasks);
        let name = format!("{dir}/exact.bin");
        let bytes = ctx.dir.get(&name).await?;
        let ids = words(&bytes).filter(|w| w.len() as u64 == done.exact_dropped);
        exact.extend(ids.ok_or_else(|| corrupt(&ctx.dir, &name, "not the documents its _DONE.json counts"))?);
        let name = format!("{dir}/pairs.bin");
        let bytes = ctx.dir.get(&name).await?;
        let pairs = words(&bytes).filter(|w| w.len() % 2 == 0);
        for pair in pairs.ok_or_else(|| corrupt(&ctx.dir, &name, "not a whole number of pairs"))?.chunks_exact(2) {
            clusters.union(pair[0], pair[1]);
        }
    }
    if !missing.is_empty() {
        return Err(DataPrepError::TasksMissing { phase: "dedup", missing, tasks, next: "reduce" });
    }
    Ok(Dedup { exact, near: clusters.dropped().into_iter().collect(), stats })
}

/// A file of little-endian `u64`s; `None` if its length is not a multiple of 8.
fn words(bytes: &[u8]) -> Option<Vec<u64>> {
    bytes
        .len()
        .is_multiple_of(8)
        .then(|| bytes.chunks_exact(8).map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes"))).collect())
}

/// What routing wrote: the output files, and the counts of the mix it realised.
struct Routed {
    files: Vec<FileEntry>,
    held_out: u64,
    documents: BTreeMap<String, u64>,
    bytes: BTreeMap<String, u64>,
}

impl Routed {
    fn mix_stats(&self, mix: MixPlan) -> MixStats {
        let total: u64 = self.bytes.values().sum();
        MixStats {
            bytes_before_mix: mix.bytes_before,
            epochs: mix.epochs,
            documents: self.documents.clone(),
            bytes: self.bytes.clone(),
            realised_share: self.bytes.iter().map(|(c, b)| (c.clone(), *b as f64 / total.max(1) as f64)).collect(),
        }
    }
}

/// Routes each placed document from its map task's `docs.jsonl.zst` to the output shard of each of
/// its stream positions (or to the held-out file) on local disk, then writes each shard sorted by
/// position.
async fn route(
    ctx: &Context,
    docs: &[DocRef],
    placements: &[Option<Placement>],
    stream: &[StreamEntry],
    tmp: &Path,
) -> Result<Routed> {
    let shards = ctx.run.spec.data.shards;
    let out_shards = shards as usize;
    let train_docs = stream.len();
    let index: HashMap<(u32, usize), usize> = docs.iter().enumerate().map(|(i, d)| ((d.shard, d.pos), i)).collect();
    let mut positions: Vec<Vec<usize>> = vec![Vec::new(); docs.len()];
    for (at, entry) in stream.iter().enumerate() {
        positions[entry.doc].push(at);
    }
    let route_path = |k: usize| tmp.join(format!("route-{k:05}.bin"));
    let heldout_path = tmp.join("heldout.bin");
    let paths: Vec<PathBuf> = (0..out_shards).map(route_path).chain([heldout_path.clone()]).collect();
    let mut routes: Vec<BufWriter<File>> = paths
        .iter()
        .map(|p| File::create(p).map(BufWriter::new).map_err(scratch(p)))
        .collect::<Result<_, ScratchError>>()?;
    let mut routed = Routed { files: Vec::new(), held_out: 0, documents: BTreeMap::new(), bytes: BTreeMap::new() };
    for shard in 0..shards {
        let local = tmp.join("map-docs.jsonl.zst");
        let key = ctx.dir.key(&format!("{}/docs.jsonl.zst", map_dir(shard, shards)))?;
        ctx.dir.store().download(&key, &local).await?;
        let decoder = zstd::Decoder::new(File::open(&local).map_err(scratch(&local))?).map_err(scratch(&local))?;
        for (pos, line) in BufReader::new(decoder).split(b'\n').enumerate() {
            let line = line.map_err(scratch(&local))?;
            let Some(&doc) = index.get(&(shard, pos)) else { continue };
            let Some(placement) = placements[doc] else { continue };
            if placement.held_out {
                routed.held_out += 1;
                write_routed(&mut routes[out_shards], (u64::from(shard) << 32) | pos as u64, &line)
                    .map_err(scratch(&heldout_path))?;
                continue;
            }
            let document: DocumentLine =
                serde_json::from_slice(&line).map_err(|e| scratch(&local)(std::io::Error::other(e)))?;
            for &at in &positions[doc] {
                let k = at * out_shards / train_docs.max(1);
                write_routed(&mut routes[k], at as u64, &line).map_err(scratch(&paths[k]))?;
                *routed.documents.entry(document.category.clone()).or_default() += 1;
                *routed.bytes.entry(document.category.clone()).or_default() += document.text.len() as u64;
            }
        }
    }
    for (w, path) in routes.iter_mut().zip(&paths) {
        w.flush().map_err(scratch(path))?;
    }
    drop(routes);
    for (k, path) in paths.iter().enumerate() {
        let name =
            if k == out_shards { "heldout/00000.jsonl.zst".to_string() } else { format!("shards/{k:05}.jsonl.zst") };
        routed.files.push(write_sorted(&ctx.dir, path, &name).await?);
    }
    Ok(routed)
}

/// Appends one line with its stream position to a routing file.
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
