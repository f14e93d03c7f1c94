//! `spec.data`: sources, extraction, deduplication, the mix and the order of the training stream.

use std::collections::{BTreeMap, BTreeSet};

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::{Filters, Quality, Quantity};
use crate::field::{Errors, FieldError, deserialize_tracking, dns_label, no_credentials, shown};

/// Largest `data.maxDocumentBytes`: one document is held in memory whole.
pub const MAX_DOCUMENT_BYTES: u64 = 1 << 30;

/// The data-prep stage.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Data {
    /// Raw inputs; each becomes documents of its `category`.
    #[schemars(length(min = 1))]
    pub sources: Vec<Source>,
    /// HTML main-content extraction.
    #[serde(default)]
    pub extract: Extract,
    /// Rule filters applied to every source (a source may override single fields).
    #[serde(default)]
    pub filters: Filters,
    /// Model-based quality scoring.
    #[serde(default)]
    pub quality: Quality,
    /// Exact and MinHash near-duplicate removal across all shards.
    #[serde(default)]
    pub dedup: Dedup,
    /// Category proportions of the training mix.
    #[serde(default)]
    pub mix: Mix,
    /// Order of documents in the training stream.
    #[serde(default)]
    pub order: Order,
    /// Fraction of documents held out for evaluation (perplexity, tokenizer compression).
    #[serde(default = "default_held_out_fraction")]
    #[schemars(range(min = 0.0, max = 0.5))]
    pub held_out_fraction: f64,
    /// Number of data-prep map tasks, output shards and held-out files. A map task streams its
    /// input files and sorts its indexes on local disk in 64 MiB runs: memory about 250 MiB
    /// (one batch of documents), local disk about 400 bytes a document of its share plus their
    /// compressed text.
    #[serde(default = "default_shards")]
    #[schemars(range(min = 1, max = 10000))]
    pub shards: u32,
    /// Parallel tasks of the phases after the map (which runs `shards` tasks). The output does not
    /// depend on them: any counts give the same bytes.
    #[serde(default)]
    pub tasks: Tasks,
    /// Documents larger than this are skipped and counted, never loaded whole.
    #[serde(default = "default_max_document_bytes")]
    #[schemars(range(min = 1))]
    pub max_document_bytes: u64,
    /// CPU and memory of each data-prep and tokenize pod.
    #[serde(default)]
    pub resources: CpuResources,
}

/// Parallel tasks of data-prep's phases after the map: dedup, route, write, and for
/// `order.strategy: in-context` embed and order tasks. The cluster task and the reduce are one
/// each: the cluster task holds the documents that have a near duplicate (about 100 bytes each),
/// sorts the drops on local disk (16 bytes each), and for in-context order sums the term counts
/// (32 MiB) and clusters a sample of 32 documents a partition; the reduce reads only the tasks'
/// records.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", default)]
pub struct Tasks {
    /// Dedup tasks: each owns an equal share of the exact-hash and LSH band-key space, finds and
    /// verifies the duplicates in it, and needs memory for one bucket at a time and local disk for
    /// its share of the band entries (about `28 x buckets x documents / dedup` bytes). Default:
    /// `shards`.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 4096))]
    pub dedup: Option<u32>,
    /// Route tasks: each reads a contiguous share of the map tasks' documents once and sends each
    /// kept copy towards its output shard; memory and local disk grow with its share (about `40 x
    /// copies + text bytes` of `shards / route` map tasks), not with the corpus. For in-context
    /// order, as many embed tasks run first, each embedding the same share and sending each
    /// document's embedding to its partition (local disk about 540 bytes a document of its share,
    /// memory 24). Default: `shards`; at most `shards`.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 10000))]
    pub route: Option<u32>,
    /// Write tasks: each merges and writes a contiguous share of the output shards (and held-out
    /// files), one at a time: local disk for one output shard, memory for one read buffer per route
    /// task. Default: `shards`; at most `shards`.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 10000))]
    pub write: Option<u32>,
    /// Order tasks (in-context order only): each plans a contiguous share of the partitions
    /// (`order.partitionDocuments`), one at a time: memory about 1.1 KB a document of the largest
    /// partition. Default: `shards`.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 10000))]
    pub order: Option<u32>,
}

/// Requests (and limits) of a CPU-only pod.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", default)]
pub struct CpuResources {
    /// CPU request per pod.
    pub cpu: Quantity,
    /// Memory request and limit per pod.
    pub memory: Quantity,
}

impl Default for CpuResources {
    fn default() -> Self {
        Self { cpu: Quantity("4".into()), memory: Quantity("16Gi".into()) }
    }
}

/// Dedup tasks at most: each owns at least one of the 4096 slices of the key space.
pub const MAX_DEDUP_TASKS: u32 = 4096;

fn default_held_out_fraction() -> f64 {
    0.01
}
fn default_shards() -> u32 {
    4
}
fn default_max_document_bytes() -> u64 {
    8 << 20
}

/// One raw input.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Source {
    /// Unique name of the source (a DNS label), used in reports.
    #[schemars(length(min = 1, max = 63))]
    pub name: String,
    /// File or object URL; `*`, `?` and `**` globs select many files.
    #[schemars(length(min = 1))]
    pub url: String,
    /// Input format; inferred from the file extension when omitted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub format: Option<SourceFormat>,
    /// JSON field (JSONL) or column (Parquet) that holds the text.
    #[serde(default = "default_text_field")]
    #[schemars(length(min = 1))]
    pub text_field: String,
    /// Category used by the mix and the reports; defaults to the source name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub category: Option<String>,
    /// Rule-filter fields that differ for this source, merged over `data.filters`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "crate::spec::filters::filters_override")]
    pub filters: Option<serde_json::Value>,
}

fn default_text_field() -> String {
    "text".into()
}

/// Raw input formats.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum SourceFormat {
    /// WARC (`.warc`, `.warc.gz`), HTML responses are extracted.
    Warc,
    /// JSON lines (`.jsonl`, `.jsonl.gz`, `.jsonl.zst`).
    Jsonl,
    /// Apache Parquet.
    Parquet,
    /// Plain text, one document per file.
    Text,
}

impl SourceFormat {
    /// The format a URL's file extension implies, if any.
    pub fn infer(url: &str) -> Option<Self> {
        let name = url.rsplit('/').next().unwrap_or(url).to_ascii_lowercase();
        let name = ["gz", "zst", "zstd"].iter().find_map(|c| name.strip_suffix(&format!(".{c}"))).unwrap_or(&name);
        let ext = name.rsplit_once('.').map(|(_, e)| e)?;
        match ext {
            "warc" | "arc" => Some(Self::Warc),
            "jsonl" | "ndjson" | "json" => Some(Self::Jsonl),
            "parquet" => Some(Self::Parquet),
            "txt" | "text" | "md" => Some(Self::Text),
            _ => None,
        }
    }
}

impl Source {
    /// The declared format, or the one implied by the URL.
    pub fn resolved_format(&self) -> Option<SourceFormat> {
        self.format.or_else(|| SourceFormat::infer(&self.url))
    }

    /// The category this source's documents belong to.
    pub fn category(&self) -> &str {
        self.category.as_deref().unwrap_or(&self.name)
    }
}

/// HTML main-content extraction.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", default)]
pub struct Extract {
    /// Keep only the main content (drop navigation, sidebars, footers); `false` keeps all visible text.
    pub main_content_only: bool,
    /// Keep the text of tables.
    pub include_tables: bool,
    /// Keep `<pre>`/`<code>` blocks.
    pub include_code: bool,
}

impl Default for Extract {
    fn default() -> Self {
        Self { main_content_only: true, include_tables: true, include_code: true }
    }
}

/// Deduplication.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", default)]
pub struct Dedup {
    /// Remove documents whose normalised text is identical.
    pub exact: bool,
    /// MinHash LSH near-duplicate removal.
    pub minhash: MinHash,
}

impl Default for Dedup {
    fn default() -> Self {
        Self { exact: true, minhash: MinHash::default() }
    }
}

/// MinHash LSH parameters. The defaults are FineWeb's: DataTrove's `MinhashConfig`
/// (`pipeline/dedup/minhash.py`: word 5-grams, 14 buckets of 8 hashes). The signature check
/// (`jaccardThreshold`) is ours: DataTrove merges every bucket collision.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", default)]
pub struct MinHash {
    /// Apply MinHash dedup.
    pub enabled: bool,
    /// Word n-gram (shingle) length.
    #[schemars(range(min = 1, max = 64))]
    pub ngram: u32,
    /// LSH bands.
    #[schemars(range(min = 1, max = 256))]
    pub buckets: u32,
    /// Hashes per band.
    #[schemars(range(min = 1, max = 256))]
    pub hashes_per_bucket: u32,
    /// A candidate pair is merged only if its signature Jaccard estimate reaches this.
    #[schemars(range(min = 0.0, max = 1.0))]
    pub jaccard_threshold: f64,
}

impl Default for MinHash {
    fn default() -> Self {
        Self { enabled: true, ngram: 5, buckets: 14, hashes_per_bucket: 8, jaccard_threshold: 0.75 }
    }
}

/// Category mix.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", default)]
pub struct Mix {
    /// Relative weight per category; empty keeps the natural proportions.
    pub weights: BTreeMap<String, f64>,
    /// Most times a category's documents may be repeated to reach its weight.
    #[schemars(range(min = 0.0))]
    pub max_epochs: f64,
}

impl Default for Mix {
    fn default() -> Self {
        Self { weights: BTreeMap::new(), max_epochs: 4.0 }
    }
}

/// Document order.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", default)]
pub struct Order {
    /// `shuffle` (seeded), `curriculum`, or `in-context` (related documents in the same context).
    pub strategy: OrderStrategy,
    /// What a curriculum sorts by (easy first).
    pub curriculum_by: CurriculumKey,
    /// In-context order: a document whose neighbour earlier in the input is at least this similar
    /// (cosine of their embeddings) is dropped as near-identical, as Shi et al. (2024) dedup before
    /// traversing; above 1 keeps every document.
    #[schemars(range(min = 0.0, max = 2.0))]
    pub semantic_dedup: f64,
    /// In-context order: documents per partition. The documents are split by topic (k-means on a
    /// sample of their embeddings) into about `documents / partitionDocuments` partitions, each
    /// planned alone by an order task, which holds it in memory (about 1.1 KB a document) and
    /// walks it; the partitions follow each other along a path through their centroids. k-means
    /// follows the topics, so a partition can hold up to about twice this. One partition walks the
    /// whole corpus at once.
    #[schemars(range(min = 2))]
    pub partition_documents: u64,
}

impl Default for Order {
    fn default() -> Self {
        Self {
            strategy: OrderStrategy::Shuffle,
            curriculum_by: CurriculumKey::Quality,
            semantic_dedup: 0.95,
            partition_documents: 1_000_000,
        }
    }
}

/// Ordering strategies.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum OrderStrategy {
    /// Seeded random order.
    Shuffle,
    /// Sorted by `curriculumBy`.
    Curriculum,
    /// One traversal of the documents' nearest-neighbour graph (Shi et al. 2024): related documents
    /// follow each other, so they share training contexts.
    InContext,
}

/// Curriculum keys.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum CurriculumKey {
    /// Highest quality score last.
    Quality,
    /// Longest documents last.
    Length,
}

impl Data {
    /// Dedup tasks: `tasks.dedup`, by default `shards`.
    pub fn dedup_tasks(&self) -> u32 {
        self.tasks.dedup.unwrap_or(self.shards).clamp(1, MAX_DEDUP_TASKS)
    }

    /// Route tasks: `tasks.route`, by default `shards`, at most `shards`.
    pub fn route_tasks(&self) -> u32 {
        self.tasks.route.unwrap_or(self.shards).clamp(1, self.shards.max(1))
    }

    /// Write tasks: `tasks.write`, by default `shards`, at most `shards`.
    pub fn write_tasks(&self) -> u32 {
        self.tasks.write.unwrap_or(self.shards).clamp(1, self.shards.max(1))
    }

    /// Order tasks (in-context order): `tasks.order`, by default `shards`.
    pub fn order_tasks(&self) -> u32 {
        self.tasks.order.unwrap_or(self.shards).clamp(1, 10_000)
    }

    /// Embed tasks (in-context order): as many as route tasks, owning the same shares.
    pub fn embed_tasks(&self) -> u32 {
        self.route_tasks()
    }

    /// The sources' categories, sorted, each once: the numbering of tokenize's per-document
    /// category files.
    pub fn categories(&self) -> Vec<String> {
        let set: BTreeSet<&str> = self.sources.iter().map(Source::category).collect();
        set.into_iter().map(String::from).collect()
    }

    /// The rules of `spec.data`.
    pub(crate) fn check(&self, e: &mut Errors) {
        e.check(!self.sources.is_empty(), "spec.data.sources", "must list at least one source");
        let d = self.order.semantic_dedup;
        e.check(
            (0.0..=2.0).contains(&d),
            "spec.data.order.semanticDedup",
            format!("must be a cosine similarity in [0, 1], or above 1 to keep every document; got {d}"),
        );
        let mut names = BTreeSet::new();
        for (i, s) in self.sources.iter().enumerate() {
            s.check(&format!("spec.data.sources[{i}]"), &self.filters, e);
            if !names.insert(s.name.as_str()) {
                e.push(format!("spec.data.sources[{i}].name"), format!("{:?} is used by an earlier source", s.name));
            }
        }
        self.filters.check("spec.data.filters", e);
        let categories: BTreeSet<&str> = self.sources.iter().map(Source::category).collect();
        self.quality.check(&names, &categories, e);
        self.dedup.minhash.check(e);
        self.mix.check(&categories, e);
        e.check(
            (0.0..0.5).contains(&self.held_out_fraction),
            "spec.data.heldOutFraction",
            format!("must be at least 0 and below 0.5, got {}", self.held_out_fraction),
        );
        e.check((1..=10_000).contains(&self.shards), "spec.data.shards", "must be between 1 and 10000");
        if let Some(dedup) = self.tasks.dedup {
            e.check(
                (1..=MAX_DEDUP_TASKS).contains(&dedup),
                "spec.data.tasks.dedup",
                format!("must be between 1 and {MAX_DEDUP_TASKS}, got {dedup}"),
            );
        }
        if let Some(n) = self.tasks.order {
            e.check(
                (1..=10_000).contains(&n),
                "spec.data.tasks.order",
                format!("must be between 1 and 10000, got {n}"),
            );
        }
        e.check(
            self.order.partition_documents >= 2,
            "spec.data.order.partitionDocuments",
            format!("must be at least 2, got {}", self.order.partition_documents),
        );
        for (field, tasks) in [("route", self.tasks.route), ("write", self.tasks.write)] {
            if let Some(n) = tasks {
                e.check(
                    (1..=self.shards).contains(&n),
                    format!("spec.data.tasks.{field}"),
                    format!("must be between 1 and spec.data.shards ({}), got {n}", self.shards),
                );
            }
        }
        e.check(
            (1..=MAX_DOCUMENT_BYTES).contains(&self.max_document_bytes),
            "spec.data.maxDocumentBytes",
            format!("must be between 1 and {MAX_DOCUMENT_BYTES} (1 GiB), got {}", self.max_document_bytes),
        );
    }
}

impl MinHash {
    fn check(&self, e: &mut Errors) {
        e.check((1..=64).contains(&self.ngram), "spec.data.dedup.minhash.ngram", "must be between 1 and 64");
        e.check((1..=256).contains(&self.buckets), "spec.data.dedup.minhash.buckets", "must be between 1 and 256");
        e.check(
            (1..=256).contains(&self.hashes_per_bucket),
            "spec.data.dedup.minhash.hashesPerBucket",
            "must be between 1 and 256",
        );
        e.fraction(self.jaccard_threshold, "spec.data.dedup.minhash.jaccardThreshold");
    }
}

impl Mix {
    /// `categories`: those of the run's sources.
    fn check(&self, categories: &BTreeSet<&str>, e: &mut Errors) {
        for (category, w) in &self.weights {
            let path = format!("spec.data.mix.weights.{category}");
            e.check(
                categories.contains(category.as_str()),
                &path,
                format!("{category:?} is not a category of any source"),
            );
            e.check(*w >= 0.0 && w.is_finite(), &path, format!("must be 0 or more, got {w}"));
        }
        if !self.weights.is_empty() {
            e.check(
                self.weights.values().any(|w| *w > 0.0),
                "spec.data.mix.weights",
                "at least one weight must be greater than 0",
            );
            for category in categories.iter().filter(|c| !self.weights.contains_key(**c)) {
                e.push(
                    "spec.data.mix.weights",
                    format!(
                        "category {category:?} has no weight; give it one (0 leaves its documents out of training)"
                    ),
                );
            }
        }
        e.positive(self.max_epochs, "spec.data.mix.maxEpochs");
    }
}

impl Source {
    /// The rules of one source at `path`.
    pub(crate) fn check(&self, path: &str, global: &Filters, e: &mut Errors) {
        if let Err(why) = dns_label(&self.name, 63) {
            e.push(format!("{path}.name"), why);
        }
        e.check(!self.url.trim().is_empty(), format!("{path}.url"), "must not be empty");
        no_credentials(&self.url, &format!("{path}.url"), e);
        if self.resolved_format().is_none() {
            e.push(
                format!("{path}.format"),
                format!("cannot be inferred from {}; set one of warc, jsonl, parquet, text", shown(&self.url)),
            );
        }
        e.check(!self.text_field.is_empty(), format!("{path}.textField"), "must not be empty");
        if let Some(category) = &self.category
            && let Err(why) = dns_label(category, 63)
        {
            e.push(format!("{path}.category"), why);
        }
        if self.filters.is_some() {
            match self.filters_over(global, &format!("{path}.filters")) {
                Ok(merged) => merged.check(&format!("{path}.filters"), e),
                Err(errs) => e.extend(errs),
            }
        }
    }
}

impl Source {
    /// The filters that apply to this source: its `filters` fields merged over the global `filters`;
    /// `path` names the source's `filters` field in errors.
    pub fn filters_over(&self, global: &Filters, path: &str) -> Result<Filters, Vec<FieldError>> {
        let Some(overrides) = &self.filters else {
            return Ok(global.clone());
        };
        let mut merged = serde_json::to_value(global).expect("filters serialise to JSON");
        merge(&mut merged, overrides);
        let mut unknown = Vec::new();
        match deserialize_tracking::<_, Filters>(&merged, &mut unknown) {
            Ok(filters) if unknown.is_empty() => Ok(filters),
            Ok(_) => Err(unknown.into_iter().map(|e| FieldError { path: format!("{path}.{}", e.path), ..e }).collect()),
            Err(e) => Err(vec![FieldError { path: join(path, &e.path().to_string()), message: e.inner().to_string() }]),
        }
    }
}

fn join(prefix: &str, path: &str) -> String {
    if path == "." { prefix.to_string() } else { format!("{prefix}.{path}") }
}

/// Deep merge: objects merge key by key, anything else in `overrides` replaces the base value.
fn merge(base: &mut serde_json::Value, overrides: &serde_json::Value) {
    match (base, overrides) {
        (serde_json::Value::Object(b), serde_json::Value::Object(o)) => {
            for (k, v) in o {
                match b.get_mut(k) {
                    Some(slot) => merge(slot, v),
                    None => {
                        b.insert(k.clone(), v.clone());
                    }
                }
            }
        }
        (slot, v) => *slot = v.clone(),
    }
}
