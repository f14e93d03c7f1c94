//! The route and write tasks, after the cluster task: the shuffle that moves every kept document
//! from its map task to its output shard, in two parallel phases, as a MapReduce shuffle does.
//!
//! - **Route task `r` of `R`** owns a contiguous range of map tasks. It reads each one's documents
//!   and key records once, with the cluster task's decisions for them, and decides each document
//!   alone: quality, duplicates, held out or not ([`held_out`]), copies ([`copies`]), and each copy's
//!   stream position ([`StreamOrder`]), which names its output shard ([`output_shard`]). It writes
//!   one file (`route/<r>-of-<R>/docs.bin`) of sections, one per output shard and one per held-out
//!   file, each sorted by position and compressed as one zstd frame, with the sections' offsets
//!   (`docs.idx`). Memory and local disk
//!   grow with its map tasks' documents (`data.shards` and `data.tasks.route`), not the corpus.
//! - **Write task `w` of `W`** owns a contiguous range of output shards. For each, it downloads that
//!   section of every route file, merges them by position, keeps copies of one document a context
//!   apart ([`Spread`]) and writes `shards/NNNNN.jsonl.zst`; then the same for `heldout/NNNNN.jsonl.zst`
//!   (sorted by document; empty when no held-out document hashes to it). Memory is one read buffer per route task; local disk one output shard.
//!
//! Every decision is a function of the document, the seed and the cluster task's sums, so the bytes
//! written are the same for any number of route and write tasks.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap};
use std::fs::File;
use std::io::{BufRead, BufReader, BufWriter, Read, Write};
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use pretrain_store::{FileEntry, StageDir};
use serde::{Deserialize, Serialize};

use super::buckets::corrupt;
use super::cluster::{CLUSTER_DIR, ClusterTask, DROP, cluster_done, difficulties, shard_entries};
use super::incontext::{Paths, in_context};
use super::keys::KeyRecord;
use super::plan::{Spread, StreamOrder, copies, held_out, held_out_shard, output_shard, passes_quality};
use super::sections::{self, Sections};
use super::stage::{DataPrepError, Result, all_done, check_task, map_dir};
use crate::Context;
use crate::frame::{MapDone, ScratchError, scratch};
use crate::progress::Progress;

/// The route and write outputs' layout: 2 compresses each section of a route file.
const ROUTE_FORMAT: u32 = 2;

/// Bytes before a routed line: position key, document, copy, text bytes, line length.
const HEADER: usize = 8 + 8 + 4 + 4 + 4;

pub(super) fn route_dir(task: u32, tasks: u32) -> String {
    format!("route/{task:05}-of-{tasks:05}")
}

pub(super) fn write_dir(task: u32, tasks: u32) -> String {
    format!("write/{task:05}-of-{tasks:05}")
}

/// The contiguous share of `items` that task `task` of `tasks` owns.
pub(super) fn share(task: u32, tasks: u32, items: u32) -> Range<u32> {
    let at = |t: u32| (u64::from(t) * u64::from(items) / u64::from(tasks.max(1))) as u32;
    at(task)..at(task + 1)
}

/// What a route task routed (`_DONE.json`).
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct RouteTask {
    #[serde(default)]
    format: u32,
    /// Training copies per category.
    pub(super) documents: BTreeMap<String, u64>,
    /// Their text bytes per category.
    pub(super) bytes: BTreeMap<String, u64>,
    /// Held-out documents.
    pub(super) held_out: u64,
}

/// What a write task wrote (`_DONE.json`).
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct WriteTask {
    #[serde(default)]
    format: u32,
    /// The files, in the stage's commit.
    pub(super) files: Vec<FileEntry>,
    /// Training copies written.
    pub(super) documents: u64,
}

pub(super) async fn route_done(dir: &StageDir, task: u32, tasks: u32, hash: &str) -> Result<Option<RouteTask>> {
    let done = MapDone::<RouteTask>::read(dir, &format!("{}/_DONE.json", route_dir(task, tasks))).await?;
    Ok(done.filter(|d| d.config_hash == hash && d.task.format == ROUTE_FORMAT).map(|d| d.task))
}

pub(super) async fn write_done(dir: &StageDir, task: u32, tasks: u32, hash: &str) -> Result<Option<WriteTask>> {
    let done = MapDone::<WriteTask>::read(dir, &format!("{}/_DONE.json", write_dir(task, tasks))).await?;
    Ok(done.filter(|d| d.config_hash == hash && d.task.format == ROUTE_FORMAT).map(|d| d.task))
}

/// The cluster task's decisions, or an error naming it as missing before `next`.
pub(super) async fn require_cluster(ctx: &Context, hash: &str, next: &'static str) -> Result<ClusterTask> {
    cluster_done(&ctx.dir, hash).await?.ok_or(DataPrepError::TasksMissing {
        phase: "cluster",
        missing: vec![0],
        tasks: 1,
        next,
    })
}

/// One copy on its way to an output shard: its section of the route file, position key, document,
/// copy, and where its line is in the task's scratch file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct Routed {
    section: u32,
    key: u64,
    doc: u64,
    copy: u32,
    text_bytes: u32,
    offset: u64,
    len: u32,
}

/// Runs route task `task` of this spec (`hash`), unless it is done.
pub(super) async fn route_task(ctx: &Context, task: u32, hash: &str) -> Result<()> {
    let data = &ctx.run.spec.data;
    let tasks = data.route_tasks();
    check_task("route", task, tasks)?;
    if route_done(&ctx.dir, task, tasks, hash).await?.is_some() {
        return Ok(());
    }
    let cluster = require_cluster(ctx, hash, "route tasks").await?;
    let paths = if in_context(data) { Some(Paths::read(ctx, &cluster, hash, "route tasks").await?) } else { None };
    let epochs = cluster.mix(data, paths.as_ref().map(|p| &p.removed_bytes)).epochs;
    let order = StreamOrder::new(data, ctx.run.spec.seed, &difficulties(&ctx.dir).await?);
    let tmp = tempfile::tempdir().map_err(scratch(Path::new("tempdir")))?;
    let lines_path = tmp.path().join("lines.bin");
    let mut lines = BufWriter::new(File::create(&lines_path).map_err(scratch(&lines_path))?);
    let mut router = Router {
        ctx,
        cluster: &cluster,
        paths: paths.as_ref(),
        epochs,
        order,
        lines_path: lines_path.clone(),
        routed: Vec::new(),
        written: 0,
        done: RouteTask::default(),
    };
    let mut progress = Progress::new(format!("data-prep route {task}"), "documents", None);
    for shard in share(task, tasks, data.shards) {
        router.shard(shard, tmp.path(), &mut lines, &mut progress).await?;
    }
    lines.flush().map_err(scratch(&lines_path))?;
    drop(lines);
    let Router { mut routed, mut done, .. } = router;
    routed.sort_unstable();
    let dir_name = route_dir(task, tasks);
    write_sections(&ctx.dir, &format!("{dir_name}/docs"), &routed, &lines_path, data.shards).await?;
    done.format = ROUTE_FORMAT;
    MapDone { config_hash: hash.into(), task: done }.write(&ctx.dir, &format!("{dir_name}/_DONE.json")).await?;
    Ok(())
}

/// Writes the routed copies (sorted) as the sections of `name`, one per output shard and held-out
/// file, each sorted by position, their lines read from the scratch file `lines`; and the index.
async fn write_sections(dir: &StageDir, name: &str, routed: &[Routed], lines: &Path, shards: u32) -> Result<()> {
    let file = File::open(lines).map_err(scratch(lines))?;
    let mut sections = Sections::create(dir, &format!("{name}.bin"), 2 * shards as usize)?;
    let mut record = Vec::new();
    for r in routed {
        record.clear();
        record.extend_from_slice(&r.key.to_le_bytes());
        record.extend_from_slice(&r.doc.to_le_bytes());
        record.extend_from_slice(&r.copy.to_le_bytes());
        record.extend_from_slice(&r.text_bytes.to_le_bytes());
        record.extend_from_slice(&r.len.to_le_bytes());
        record.resize(HEADER + r.len as usize, 0);
        file.read_exact_at(&mut record[HEADER..], r.offset).map_err(scratch(lines))?;
        sections.push(r.section, &record).await?;
    }
    sections.finish(dir, &format!("{name}.idx")).await
}

/// A route task's state: the copies routed so far (their lines in the scratch file) and the counts.
struct Router<'a> {
    ctx: &'a Context,
    cluster: &'a ClusterTask,
    /// In-context order's paths.
    paths: Option<&'a Paths>,
    /// Epochs of each category the mix takes.
    epochs: BTreeMap<String, f64>,
    order: StreamOrder,
    /// The scratch file of the routed lines.
    lines_path: PathBuf,
    routed: Vec<Routed>,
    written: u64,
    done: RouteTask,
}

impl Router<'_> {
    /// Routes the documents of map task `shard`, appending their lines to `lines`.
    async fn shard(&mut self, shard: u32, tmp: &Path, lines: &mut impl Write, progress: &mut Progress) -> Result<()> {
        let (ctx, data) = (self.ctx, &self.ctx.run.spec.data);
        let (seed, shards) = (ctx.run.spec.seed, data.shards);
        let dir = map_dir(shard, shards);
        let name = format!("{dir}/keys.bin");
        let keys = KeyRecord::parse_all(&ctx.dir.get(&name).await?)
            .ok_or_else(|| corrupt(&ctx.dir, &name, "not a whole number of key records"))?;
        let decisions = self.decisions(shard).await?;
        let local = tmp.join("map-docs.jsonl.zst");
        let docs_name = format!("{dir}/docs.jsonl.zst");
        ctx.dir.store().download(&ctx.dir.key(&docs_name)?, &local).await?;
        let decoder = zstd::Decoder::new(File::open(&local).map_err(scratch(&local))?).map_err(scratch(&local))?;
        let mut decisions = decisions.into_iter().peekable();
        let mut count = 0usize;
        for (line_no, line) in BufReader::new(decoder).split(b'\n').enumerate() {
            let line = line.map_err(scratch(&local))?;
            count += 1;
            let record =
                keys.get(line_no).ok_or_else(|| corrupt(&ctx.dir, &docs_name, "more documents than key records"))?;
            let mut decision = None;
            while let Some(&(at, value)) = decisions.peek() {
                if at > line_no as u64 {
                    break;
                }
                decisions.next();
                if at == line_no as u64 {
                    decision = Some(value);
                }
            }
            progress.update(self.written + count as u64, String::new);
            if decision == Some(DROP) || !passes_quality(data, &self.cluster.thresholds, record.source, record.score) {
                continue;
            }
            let doc = record.doc();
            let category = data.sources.get(usize::from(record.source)).map_or("", |s| s.category());
            let (offset, len) = (self.written, line.len() as u32);
            lines.write_all(&line).map_err(scratch(&self.lines_path))?;
            self.written += u64::from(len);
            let copy_of = |section: u32, key: u64, copy: u32| Routed {
                section,
                key,
                doc,
                copy,
                text_bytes: record.bytes,
                offset,
                len,
            };
            if held_out(data, seed, doc) {
                self.done.held_out += 1;
                self.routed.push(copy_of(shards + held_out_shard(seed, doc, shards), doc, 0));
                continue;
            }
            let c = copies(seed, self.epochs.get(category).copied().unwrap_or(0.0), doc);
            let path = decision.map_or(0.0, f64::from_bits);
            for copy in 0..c {
                let position = self.order.position(record, copy, c, path);
                self.routed.push(copy_of(output_shard(position, shards), position.to_bits(), copy));
            }
            *self.done.documents.entry(category.to_string()).or_default() += u64::from(c);
            *self.done.bytes.entry(category.to_string()).or_default() += u64::from(c) * u64::from(record.bytes);
        }
        if count != keys.len() {
            return Err(corrupt(&ctx.dir, &docs_name, "fewer documents than key records"));
        }
        Ok(())
    }

    /// The decisions for map task `shard`: the cluster task's, and the order tasks' for in-context
    /// order: `(line, value)`, sorted by line.
    async fn decisions(&self, shard: u32) -> Result<Vec<(u64, u64)>> {
        let dir = &self.ctx.dir;
        let mut decisions =
            shard_entries(dir, &format!("{CLUSTER_DIR}/decisions.bin"), &self.cluster.decisions, shard).await?;
        if let Some(paths) = self.paths {
            decisions.extend(paths.decisions(dir, shard).await?);
            decisions.sort_unstable();
        }
        Ok(decisions)
    }
}

/// Runs write task `task` of this spec (`hash`), unless it is done.
pub(super) async fn write_task(ctx: &Context, task: u32, hash: &str) -> Result<()> {
    let data = &ctx.run.spec.data;
    let tasks = data.write_tasks();
    check_task("write", task, tasks)?;
    if write_done(&ctx.dir, task, tasks, hash).await?.is_some() {
        return Ok(());
    }
    let routes = data.route_tasks();
    all_done("route", routes, "write tasks", |r| route_done(&ctx.dir, r, routes, hash)).await?;
    let shards = data.shards;
    let mine = share(task, tasks, shards);
    // Each route file's offsets for this task's training sections and held-out sections.
    let mut offsets = Vec::new();
    for r in 0..routes {
        let name = format!("{}/docs.idx", route_dir(r, routes));
        let train = sections::ranges(&ctx.dir, &name, mine.clone()).await?;
        let held = sections::ranges(&ctx.dir, &name, shards + mine.start..shards + mine.end).await?;
        offsets.push((train, held));
    }
    let tmp = tempfile::tempdir().map_err(scratch(Path::new("tempdir")))?;
    let context_bytes = u64::from(ctx.run.spec.train.seq_len) * 4;
    let mut done = WriteTask { format: ROUTE_FORMAT, ..WriteTask::default() };
    let mut progress = Progress::new(format!("data-prep write {task}"), "documents", None);
    for (i, k) in mine.enumerate() {
        let sections = |held: bool| -> Vec<Range<u64>> {
            offsets.iter().map(|(t, h)| if held { h[i].clone() } else { t[i].clone() }).collect()
        };
        let parts = download_sections(&ctx.dir, routes, &sections(false), tmp.path()).await?;
        let name = format!("shards/{k:05}.jsonl.zst");
        let (file, n) = write_merged(&ctx.dir, &parts, &name, Some(context_bytes), &mut progress).await?;
        done.files.push(file);
        done.documents += n;
        let parts = download_sections(&ctx.dir, routes, &sections(true), tmp.path()).await?;
        let name = format!("heldout/{k:05}.jsonl.zst");
        done.files.push(write_merged(&ctx.dir, &parts, &name, None, &mut progress).await?.0);
    }
    let dir_name = write_dir(task, tasks);
    MapDone { config_hash: hash.into(), task: done }.write(&ctx.dir, &format!("{dir_name}/_DONE.json")).await?;
    Ok(())
}

/// Downloads section `ranges[r]` of each route task `r`'s file into `tmp`; the non-empty ones.
async fn download_sections(dir: &StageDir, routes: u32, ranges: &[Range<u64>], tmp: &Path) -> Result<Vec<PathBuf>> {
    let mut parts = Vec::new();
    for (r, range) in (0..routes).zip(ranges) {
        if range.is_empty() {
            continue;
        }
        let local = tmp.join(format!("part-{r:05}.bin"));
        let key = dir.key(&format!("{}/docs.bin", route_dir(r, routes)))?;
        dir.store().download_range(&key, range.clone(), &local).await?;
        parts.push(local);
    }
    Ok(parts)
}

/// One routed line read back: position key, document, copy, text bytes, and the line.
struct Line {
    key: u64,
    doc: u64,
    copy: u32,
    text_bytes: u32,
    line: Vec<u8>,
}

/// Reads the next routed line of a section; `None` at its end.
fn read_line(reader: &mut impl Read) -> std::io::Result<Option<Line>> {
    let mut header = [0u8; HEADER];
    match reader.read_exact(&mut header) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let u64_at = |i: usize| u64::from_le_bytes(header[i..i + 8].try_into().expect("8 bytes"));
    let u32_at = |i: usize| u32::from_le_bytes(header[i..i + 4].try_into().expect("4 bytes"));
    let mut line = vec![0u8; u32_at(24) as usize];
    reader.read_exact(&mut line)?;
    Ok(Some(Line { key: u64_at(0), doc: u64_at(8), copy: u32_at(16), text_bytes: u32_at(20), line }))
}

/// Merges the sorted sections `parts` by position and writes them as `name` (`jsonl.zst`); with
/// `context_bytes`, copies of a document are kept that far apart ([`Spread`]). Returns the file and
/// the lines written.
async fn write_merged(
    dir: &StageDir,
    parts: &[PathBuf],
    name: &str,
    context_bytes: Option<u64>,
    progress: &mut Progress,
) -> Result<(FileEntry, u64)> {
    let mut readers = parts
        .iter()
        .map(|p| {
            let decoder = File::open(p).and_then(zstd::Decoder::new).map_err(scratch(p))?;
            Ok(BufReader::with_capacity(1 << 16, decoder))
        })
        .collect::<Result<Vec<_>, ScratchError>>()?;
    let mut heap = BinaryHeap::new();
    let mut heads: Vec<Option<Line>> = Vec::with_capacity(parts.len());
    for (i, reader) in readers.iter_mut().enumerate() {
        let head = read_line(reader).map_err(scratch(&parts[i]))?;
        if let Some(l) = &head {
            heap.push(Reverse((l.key, l.doc, l.copy, i)));
        }
        heads.push(head);
    }
    let encoder = zstd::Encoder::new(Vec::new(), 3).map_err(scratch(Path::new(name)))?;
    let mut out = Output { encoder, lines: 0, error: None };
    let mut writer = dir.writer(name)?;
    let mut spread = context_bytes.map(Spread::new);
    while let Some(Reverse((_, _, _, i))) = heap.pop() {
        let line = heads[i].take().expect("a head for every heap entry");
        let next = read_line(&mut readers[i]).map_err(scratch(&parts[i]))?;
        if let Some(l) = &next {
            heap.push(Reverse((l.key, l.doc, l.copy, i)));
        }
        heads[i] = next;
        match &mut spread {
            Some(spread) => spread.push(line.doc, u64::from(line.text_bytes), line.line, &mut |l| out.put(&l)),
            None => out.put(&line.line),
        }
        out.check(name)?;
        if out.encoder.get_ref().len() > 1 << 20 {
            writer.write(&std::mem::take(out.encoder.get_mut())).await?;
        }
        progress.update(out.lines, String::new);
    }
    if let Some(spread) = spread {
        spread.finish(&mut |l| out.put(&l));
        out.check(name)?;
    }
    let lines = out.lines;
    let rest = out.encoder.finish().map_err(scratch(Path::new(name)))?;
    writer.write(&rest).await?;
    Ok((writer.finish().await?, lines))
}

/// An output file being compressed, and the first error compressing it.
struct Output {
    encoder: zstd::Encoder<'static, Vec<u8>>,
    lines: u64,
    error: Option<std::io::Error>,
}

impl Output {
    fn put(&mut self, line: &[u8]) {
        self.lines += 1;
        if let Err(e) = self.encoder.write_all(line).and_then(|()| self.encoder.write_all(b"\n")) {
            self.error.get_or_insert(e);
        }
    }

    /// The first error compressing, if any.
    fn check(&mut self, name: &str) -> Result<(), ScratchError> {
        self.error.take().map_or(Ok(()), |e| Err(scratch(Path::new(name))(e)))
    }
}
