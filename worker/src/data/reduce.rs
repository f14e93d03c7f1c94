//! The data-prep reduce, the stage's last step: once every write task is done, it gathers the map,
//! cluster, embed, order, route and write tasks' small records into the stage's [`DataPrepStats`] and commits the
//! files the write tasks wrote. It reads no document.

use pretrain_store::StageCommit;
use pretrain_store::artifact::{
    DataPrepStats, DedupStats, HeldOutStats, MapStats, MixStats, QualityStats, StreamStats,
};

use super::incontext::{Paths, in_context, random_pair_similarity};
use super::route::{RouteTask, require_cluster, route_done, write_done};
use super::scoring::trained_eval;
use super::stage::{DataPrepError, OUTPUT_VERSION, Result, all_done, map_done};
use crate::Context;

/// Commits the stage from the task outputs of this spec (`hash`).
pub(super) async fn reduce(ctx: &Context, hash: &str) -> Result<StageCommit> {
    let data = &ctx.run.spec.data;
    let writes = data.write_tasks();
    let (mut files, mut train_documents) = (Vec::new(), 0);
    for done in all_done("write", writes, "reduce", |task| write_done(&ctx.dir, task, writes, hash)).await? {
        files.extend(done.files);
        train_documents += done.documents;
    }
    let cluster = require_cluster(ctx, hash, "reduce").await?;
    let RouteTask { documents, bytes, held_out, .. } = routed(ctx, hash).await?;
    let mut map = MapStats::default();
    for shard in 0..data.shards {
        let done = map_done(&ctx.dir, shard, data.shards, hash).await?.ok_or(DataPrepError::TasksMissing {
            phase: "map",
            missing: vec![shard],
            tasks: data.shards,
            next: "reduce",
        })?;
        map.merge(&done.task.stats);
    }
    let (paths, similarity) = if in_context(data) {
        let paths = Paths::read(ctx, &cluster, hash, "reduce").await?;
        let baseline = random_pair_similarity(ctx, hash).await?;
        let similarity = Some([paths.similarity, baseline]);
        (Some(paths), similarity)
    } else {
        (None, None)
    };
    let mix = cluster.mix(data, paths.as_ref().map(|p| &p.removed_bytes));
    let total: u64 = bytes.values().sum();
    let stats = DataPrepStats {
        output_version: OUTPUT_VERSION,
        map,
        quality: QualityStats {
            thresholds: cluster.thresholds,
            removed: cluster.quality_removed,
            classifier: trained_eval(&ctx.dir, hash).await?,
        },
        dedup: DedupStats {
            candidates: cluster.candidates,
            exact_removed: cluster.exact_removed,
            near_removed: cluster.near_removed,
            lsh_pairs_compared: cluster.lsh.compared,
            lsh_pairs_merged: cluster.lsh.merged,
            lsh_collisions_rejected: cluster.lsh.rejected,
            semantic_removed: paths.as_ref().map_or(0, |p| p.semantic_removed),
        },
        held_out: HeldOutStats { documents: held_out },
        mix: MixStats {
            bytes_before_mix: mix.bytes_before,
            epochs: mix.epochs,
            realised_share: bytes.iter().map(|(c, b)| (c.clone(), *b as f64 / total.max(1) as f64)).collect(),
            documents,
            bytes,
        },
        train: StreamStats {
            documents: train_documents,
            shards: u64::from(data.shards),
            adjacent_similarity: similarity,
        },
    };
    let stats = serde_json::to_value(&stats).expect("data-prep stats serialise");
    Ok(ctx.dir.commit(hash, files, stats).await?)
}

/// The route tasks' records, summed.
async fn routed(ctx: &Context, hash: &str) -> Result<RouteTask> {
    let routes = ctx.run.spec.data.route_tasks();
    let mut sum = RouteTask::default();
    for task in 0..routes {
        let done = route_done(&ctx.dir, task, routes, hash).await?.ok_or(DataPrepError::TasksMissing {
            phase: "route",
            missing: vec![task],
            tasks: routes,
            next: "reduce",
        })?;
        sum.held_out += done.held_out;
        for (c, n) in done.documents {
            *sum.documents.entry(c).or_default() += n;
        }
        for (c, n) in done.bytes {
            *sum.bytes.entry(c).or_default() += n;
        }
    }
    Ok(sum)
}
