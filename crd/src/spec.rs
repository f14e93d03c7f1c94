//! The `PretrainRun` spec: every field a user can set, each with the recipe's default.
//!
//! Defaults live in `Default` impls and `#[serde(default)]`, so a manifest parsed by the CLI and one
//! defaulted by the API server (from the generated schema) resolve to the same values.

// kube's `printcolumn(...)` repeats argument names by design; clippy reads them as duplicates.
#![allow(clippy::duplicated_attributes)]

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use kube_derive::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::status::PretrainRunStatus;

/// One training run, end to end: raw text in, a pretrained and evaluated Llama-style model out.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "pretrain.dev",
    version = "v1alpha1",
    kind = "PretrainRun",
    plural = "pretrainruns",
    shortname = "ptr",
    category = "pretrain",
    namespaced,
    status = "PretrainRunStatus",
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase"),
    printcolumn(name = "Stage", type_ = "string", json_path = ".status.stage"),
    printcolumn(name = "Step", type_ = "integer", json_path = ".status.lastCheckpoint.step"),
    printcolumn(name = "Loss", type_ = "number", json_path = ".status.lastCheckpoint.loss"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp"),
    crates(kube_core = "::kube_core"),
    derive = "PartialEq",
    doc = "A PretrainRun trains a Llama-style language model from raw text: data-prep, tokenize, train, long-context and eval."
)]
#[x_kube(
    crates(kube_core = "::kube_core"),
    // Cross-field rules the API server checks too (after applying the schema's defaults); each is
    // guarded with has() so that a partially defaulted object never makes a rule error out.
    validation = Rule::new(concat!(
        "!has(self.longContext) || !has(self.longContext.seqLen) || !has(self.train) || !has(self.train.seqLen)",
        " || self.longContext.seqLen > self.train.seqLen"
    ))
    .message("longContext.seqLen must be greater than train.seqLen")
    .field_path(".longContext.seqLen"),
    validation = Rule::new(concat!(
        "!has(self.train) || !has(self.train.globalBatchTokens) || !has(self.train.seqLen)",
        " || !has(self.train.microBatchSize)",
        " || self.train.globalBatchTokens % (self.train.seqLen * self.train.microBatchSize) == 0"
    ))
    .message("train.globalBatchTokens must be a multiple of train.seqLen x train.microBatchSize")
    .field_path(".train.globalBatchTokens"),
    validation = Rule::new(concat!(
        "!has(self.train) || !has(self.train.optimizer) || !has(self.train.optimizer.minLr)",
        " || !has(self.train.optimizer.lr) || self.train.optimizer.minLr <= self.train.optimizer.lr"
    ))
    .message("train.optimizer.minLr must not exceed train.optimizer.lr")
    .field_path(".train.optimizer.minLr"),
)]
#[serde(rename_all = "camelCase")]
pub struct PretrainRunSpec {
    /// Where every shard, tokenizer, checkpoint and report of the run is kept.
    pub storage: Storage,
    /// Container image of `pretrain-worker` used by every stage's pods.
    #[serde(default = "default_image")]
    pub image: String,
    /// `true` checkpoints the running stage and stops; `false` resumes from the last checkpoint.
    #[serde(default)]
    pub suspend: bool,
    /// Seed for every random choice of the run (sampling, shuffling, initialisation).
    #[serde(default = "default_seed")]
    pub seed: u64,
    /// Which queue admits the run and how it ranks against others.
    #[serde(default)]
    pub scheduling: Scheduling,
    /// Raw text sources and how they are cleaned, deduplicated, mixed and ordered.
    pub data: Data,
    /// The byte-level BPE tokenizer.
    #[serde(default)]
    pub tokenizer: Tokenizer,
    /// The Llama architecture: a preset, optionally with single fields overridden.
    #[serde(default)]
    pub model: Model,
    /// Pretraining: sequence length, token budget, batch, optimizer, schedule, checkpoints, resources.
    #[serde(default)]
    pub train: Train,
    /// Optional continued training at a longer context with rescaled RoPE.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub long_context: Option<LongContext>,
    /// What the eval stage measures.
    #[serde(default)]
    pub eval: Eval,
}

/// The worker image a run gets when its manifest names none.
pub fn default_image() -> String {
    format!("ghcr.io/pretrain-dev/pretrain-worker:{}", env!("CARGO_PKG_VERSION"))
}

fn default_seed() -> u64 {
    1234
}

/// Object storage for the run: `file://`, `s3://`, `gs://`, `az://` or `memory://`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Storage {
    /// Store URL, e.g. `s3://bucket/prefix` or `file:///data/runs`; the run writes under `<url>/<run>/`.
    #[schemars(length(min = 1))]
    pub url: String,
    /// Secret whose keys are exported as environment variables to every pod (AWS_ACCESS_KEY_ID, ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_ref: Option<SecretRef>,
    /// Delete the run's objects from the store when the PretrainRun is deleted (kept by default).
    #[serde(default)]
    pub delete_on_run_delete: bool,
}

/// A reference to a Secret in the run's namespace.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
pub struct SecretRef {
    /// Name of the Secret.
    #[schemars(length(min = 1))]
    pub name: String,
}

/// Queue and priority of the run.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", default)]
pub struct Scheduling {
    /// Name of the PretrainQueue that admits the run's stages.
    #[schemars(length(min = 1))]
    pub queue: String,
    /// Higher runs first and may preempt lower-priority training.
    #[schemars(range(min = -1000, max = 1000))]
    pub priority: i32,
    /// Hand admission to Kueue instead of the built-in scheduler.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kueue: Option<Kueue>,
}

impl Default for Scheduling {
    fn default() -> Self {
        Self { queue: "default".into(), priority: 0, kueue: None }
    }
}

/// Kueue admission: Jobs are created suspended with the queue label.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Kueue {
    /// The Kueue LocalQueue name.
    #[schemars(length(min = 1))]
    pub queue_name: String,
}

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
    /// Number of data-prep pods and output shards.
    #[serde(default = "default_shards")]
    #[schemars(range(min = 1, max = 10000))]
    pub shards: u32,
    /// Documents larger than this are skipped and counted, never loaded whole.
    #[serde(default = "default_max_document_bytes")]
    #[schemars(range(min = 1))]
    pub max_document_bytes: u64,
    /// CPU and memory of each data-prep and tokenize pod.
    #[serde(default)]
    pub resources: CpuResources,
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
    #[schemars(schema_with = "crate::schema::filters_override")]
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

/// The rule filters, each on by default with its published thresholds.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema, Default)]
#[serde(rename_all = "camelCase", default)]
pub struct Filters {
    /// Gopher quality rules (Rae et al. 2021).
    pub gopher_quality: GopherQuality,
    /// Gopher repetition rules (Rae et al. 2021).
    pub gopher_repetition: GopherRepetition,
    /// C4 rules (Raffel et al. 2020).
    pub c4: C4,
    /// FineWeb rules (Penedo et al. 2024).
    pub fineweb: FineWeb,
    /// Language identification.
    pub language: Language,
}

/// Gopher quality filter.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", default)]
pub struct GopherQuality {
    /// Apply this filter.
    pub enabled: bool,
    /// Fewest words a document may have.
    pub min_words: u64,
    /// Most words a document may have.
    pub max_words: u64,
    /// Smallest mean word length.
    #[schemars(range(min = 0.0))]
    pub min_avg_word_length: f64,
    /// Largest mean word length.
    #[schemars(range(min = 0.0))]
    pub max_avg_word_length: f64,
    /// Most `#` and `...` symbols per word.
    #[schemars(range(min = 0.0))]
    pub max_symbol_word_ratio: f64,
    /// Most lines that start with a bullet, as a fraction of lines.
    #[schemars(range(min = 0.0, max = 1.0))]
    pub max_bullet_lines_ratio: f64,
    /// Most lines that end with an ellipsis, as a fraction of lines.
    #[schemars(range(min = 0.0, max = 1.0))]
    pub max_ellipsis_lines_ratio: f64,
    /// Fewest words with an alphabetic character, as a fraction of words.
    #[schemars(range(min = 0.0, max = 1.0))]
    pub min_alpha_words_ratio: f64,
    /// Fewest English stop words (the, be, to, of, and, that, have, with).
    pub min_stop_words: u32,
}

impl Default for GopherQuality {
    fn default() -> Self {
        Self {
            enabled: true,
            min_words: 50,
            max_words: 100_000,
            min_avg_word_length: 3.0,
            max_avg_word_length: 10.0,
            max_symbol_word_ratio: 0.1,
            max_bullet_lines_ratio: 0.9,
            max_ellipsis_lines_ratio: 0.3,
            min_alpha_words_ratio: 0.8,
            min_stop_words: 2,
        }
    }
}

/// An n-gram size and the largest fraction of characters its n-grams may cover.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NgramLimit {
    /// n-gram length in words.
    #[schemars(range(min = 1, max = 64))]
    pub n: u32,
    /// Largest fraction of characters.
    #[schemars(range(min = 0.0, max = 1.0))]
    pub max_fraction: f64,
}

/// Gopher repetition filter.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", default)]
pub struct GopherRepetition {
    /// Apply this filter.
    pub enabled: bool,
    /// Most duplicated lines, as a fraction of lines.
    #[schemars(range(min = 0.0, max = 1.0))]
    pub dup_line_fraction: f64,
    /// Most duplicated paragraphs, as a fraction of paragraphs.
    #[schemars(range(min = 0.0, max = 1.0))]
    pub dup_para_fraction: f64,
    /// Most characters in duplicated lines, as a fraction of characters.
    #[schemars(range(min = 0.0, max = 1.0))]
    pub dup_line_char_fraction: f64,
    /// Most characters in duplicated paragraphs, as a fraction of characters.
    #[schemars(range(min = 0.0, max = 1.0))]
    pub dup_para_char_fraction: f64,
    /// Most characters covered by the most frequent n-gram, per n.
    pub top_ngrams: Vec<NgramLimit>,
    /// Most characters covered by duplicated n-grams, per n.
    pub dup_ngrams: Vec<NgramLimit>,
}

impl Default for GopherRepetition {
    fn default() -> Self {
        let limits =
            |pairs: &[(u32, f64)]| pairs.iter().map(|&(n, max_fraction)| NgramLimit { n, max_fraction }).collect();
        Self {
            enabled: true,
            dup_line_fraction: 0.3,
            dup_para_fraction: 0.3,
            dup_line_char_fraction: 0.2,
            dup_para_char_fraction: 0.2,
            top_ngrams: limits(&[(2, 0.20), (3, 0.18), (4, 0.16)]),
            dup_ngrams: limits(&[(5, 0.15), (6, 0.14), (7, 0.13), (8, 0.12), (9, 0.11), (10, 0.10)]),
        }
    }
}

/// C4 filter: line-level cleaning and page-level rules.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", default)]
pub struct C4 {
    /// Apply this filter.
    pub enabled: bool,
    /// Drop lines that do not end in terminal punctuation.
    pub terminal_punctuation: bool,
    /// Drop lines with fewer words than this.
    pub min_words_per_line: u32,
    /// Drop pages with fewer sentences than this (after line cleaning).
    pub min_sentences: u32,
    /// Drop lines with a word longer than this.
    pub max_word_length: u32,
    /// Drop lines that mention javascript.
    pub remove_javascript: bool,
    /// Drop pages with "lorem ipsum".
    pub remove_lorem_ipsum: bool,
    /// Drop pages with a curly brace.
    pub remove_curly_braces: bool,
    /// Drop lines about cookies, terms of use and privacy policies.
    pub remove_policy_lines: bool,
    /// Remove Wikipedia-style citation markers such as `[1]`.
    pub remove_citations: bool,
}

impl Default for C4 {
    fn default() -> Self {
        Self {
            enabled: true,
            terminal_punctuation: true,
            min_words_per_line: 3,
            min_sentences: 5,
            max_word_length: 1000,
            remove_javascript: true,
            remove_lorem_ipsum: true,
            remove_curly_braces: true,
            remove_policy_lines: true,
            remove_citations: true,
        }
    }
}

/// FineWeb quality filter.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", default)]
pub struct FineWeb {
    /// Apply this filter.
    pub enabled: bool,
    /// Fewest lines ending in punctuation, as a fraction of lines.
    #[schemars(range(min = 0.0, max = 1.0))]
    pub min_line_punctuation_ratio: f64,
    /// Most short lines, as a fraction of lines.
    #[schemars(range(min = 0.0, max = 1.0))]
    pub max_short_line_ratio: f64,
    /// A line shorter than this many characters is short.
    pub short_line_length: u32,
    /// Most characters in duplicated lines, as a fraction of characters.
    #[schemars(range(min = 0.0, max = 1.0))]
    pub max_duplicate_line_char_ratio: f64,
    /// Most newlines per word.
    #[schemars(range(min = 0.0))]
    pub max_newline_ratio: f64,
}

impl Default for FineWeb {
    fn default() -> Self {
        Self {
            enabled: true,
            min_line_punctuation_ratio: 0.12,
            max_short_line_ratio: 0.67,
            short_line_length: 30,
            max_duplicate_line_char_ratio: 0.01,
            max_newline_ratio: 0.3,
        }
    }
}

/// Language identification.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", default)]
pub struct Language {
    /// Apply this filter.
    pub enabled: bool,
    /// Languages to keep, as ISO 639-1 codes.
    pub languages: Vec<String>,
    /// Smallest confidence of the detected language.
    #[schemars(range(min = 0.0, max = 1.0))]
    pub min_score: f64,
}

impl Default for Language {
    fn default() -> Self {
        Self { enabled: true, languages: vec!["en".into()], min_score: 0.65 }
    }
}

/// Model-based quality scoring.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", default)]
pub struct Quality {
    /// Which scorer; `none` keeps every document the rules kept.
    pub classifier: QualityClassifier,
    /// URL of a trained scorer: the n-gram model file, or for BERT a Hugging Face
    /// `BertForSequenceClassification` directory (config.json, model.safetensors, tokenizer.json).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub model_url: Option<String>,
    /// JSONL file of `{text, label}` to train the n-gram classifier from.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub labelled_url: Option<String>,
    /// Sources whose documents are the positive class (the rest of the corpus is the negative).
    pub reference_sources: Vec<String>,
    /// Keep documents scoring at least this. Scores are probabilities: the n-gram model's, or the BERT
    /// classifier's for its positive label (the label named good/positive/hq, else the last; the
    /// sigmoid of a single regression output, so `t` means a raw score of ln(t / (1 - t))).
    #[schemars(range(min = 0.0, max = 1.0))]
    pub threshold: f64,
    /// Instead of the threshold, keep this top fraction of each category by score.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.0, max = 1.0))]
    pub keep_top_fraction: Option<f64>,
    /// Categories that are scored; empty scores all.
    pub categories: Vec<String>,
}

impl Default for Quality {
    fn default() -> Self {
        Self {
            classifier: QualityClassifier::None,
            model_url: None,
            labelled_url: None,
            reference_sources: Vec::new(),
            threshold: 0.5,
            keep_top_fraction: None,
            categories: Vec::new(),
        }
    }
}

/// Quality scorers.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum QualityClassifier {
    /// No model-based scoring.
    None,
    /// Hashed word n-grams with logistic regression, trained in the stage.
    Ngram,
    /// A BERT-family sequence classifier loaded from `modelUrl`.
    Bert,
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

/// MinHash LSH parameters.
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
}

impl Default for Order {
    fn default() -> Self {
        Self { strategy: OrderStrategy::Shuffle, curriculum_by: CurriculumKey::Quality }
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
    /// Nearest neighbours packed into the same training context.
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

/// The byte-level BPE tokenizer.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", default)]
pub struct Tokenizer {
    /// Vocabulary size, including the 256 byte tokens and the special tokens.
    #[schemars(range(min = 260, max = 1_048_576))]
    pub vocab_size: u32,
    /// Bytes of clean text sampled (across categories, in mix proportion) to train on.
    #[schemars(range(min = 1))]
    pub train_sample_bytes: u64,
    /// Special tokens beyond the built-in `<|bos|>`, `<|eos|>` and `<|pad|>`.
    pub special_tokens: Vec<String>,
    /// Reuse an existing `tokenizer.json` instead of training one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
}

/// Special tokens every tokenizer has.
pub const BUILTIN_SPECIAL_TOKENS: [&str; 3] = ["<|bos|>", "<|eos|>", "<|pad|>"];

impl Default for Tokenizer {
    fn default() -> Self {
        Self { vocab_size: 32_000, train_sample_bytes: 100_000_000, special_tokens: Vec::new(), url: None }
    }
}

/// The model: a preset, and optional overrides of single fields.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", default)]
pub struct Model {
    /// Base shape.
    pub preset: ModelPreset,
    /// Hidden size (overrides the preset).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 8))]
    pub dim: Option<u32>,
    /// Transformer blocks (overrides the preset).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub layers: Option<u32>,
    /// Attention (query) heads (overrides the preset).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub heads: Option<u32>,
    /// Key/value heads for grouped-query attention; divides `heads` (overrides the preset).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub kv_heads: Option<u32>,
    /// SwiGLU hidden size (overrides the preset).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub ffn_dim: Option<u32>,
    /// RoPE base (theta) (overrides the preset).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rope_base: Option<f64>,
    /// RMSNorm epsilon (overrides the preset).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub norm_eps: Option<f64>,
    /// Share the token embedding with the LM head (overrides the preset).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tie_embeddings: Option<bool>,
}

impl Default for Model {
    fn default() -> Self {
        Self {
            preset: ModelPreset::Llama125m,
            dim: None,
            layers: None,
            heads: None,
            kv_heads: None,
            ffn_dim: None,
            rope_base: None,
            norm_eps: None,
            tie_embeddings: None,
        }
    }
}

/// Named model shapes.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum ModelPreset {
    /// 256 wide, 4 blocks: a few million parameters, trains on a CPU in minutes.
    #[serde(rename = "tiny")]
    Tiny,
    /// 768 wide, 12 blocks, 12 heads, 4 kv heads (about 125M parameters with a 32k vocabulary).
    #[serde(rename = "llama-125m")]
    Llama125m,
    /// TinyLlama's shape: 2048 wide, 22 blocks, 32 heads, 4 kv heads (about 1.1B parameters).
    #[serde(rename = "llama-1b")]
    Llama1b,
    /// Llama 2 7B's shape: 4096 wide, 32 blocks, 32 heads, 32 kv heads, SwiGLU 11008 (6.7B parameters).
    #[serde(rename = "llama-7b")]
    Llama7b,
}

/// A fully resolved model shape.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ModelConfig {
    /// Hidden size.
    pub dim: u32,
    /// Transformer blocks.
    pub layers: u32,
    /// Query heads.
    pub heads: u32,
    /// Key/value heads.
    pub kv_heads: u32,
    /// SwiGLU hidden size.
    pub ffn_dim: u32,
    /// RoPE base.
    pub rope_base: f64,
    /// RMSNorm epsilon.
    pub norm_eps: f64,
    /// LM head shares the embedding matrix.
    pub tie_embeddings: bool,
}

impl ModelPreset {
    /// The shape this preset names.
    pub fn config(self) -> ModelConfig {
        let (dim, layers, heads, kv_heads, ffn_dim, tie_embeddings) = match self {
            Self::Tiny => (256, 4, 8, 4, 688, true),
            Self::Llama125m => (768, 12, 12, 4, 2048, false),
            Self::Llama1b => (2048, 22, 32, 4, 5632, false),
            Self::Llama7b => (4096, 32, 32, 32, 11008, false),
        };
        ModelConfig { dim, layers, heads, kv_heads, ffn_dim, rope_base: 10_000.0, norm_eps: 1e-5, tie_embeddings }
    }
}

impl Model {
    /// The preset's shape with this spec's overrides applied.
    pub fn resolved(&self) -> ModelConfig {
        let base = self.preset.config();
        ModelConfig {
            dim: self.dim.unwrap_or(base.dim),
            layers: self.layers.unwrap_or(base.layers),
            heads: self.heads.unwrap_or(base.heads),
            kv_heads: self.kv_heads.unwrap_or(base.kv_heads),
            ffn_dim: self.ffn_dim.unwrap_or(base.ffn_dim),
            rope_base: self.rope_base.unwrap_or(base.rope_base),
            norm_eps: self.norm_eps.unwrap_or(base.norm_eps),
            tie_embeddings: self.tie_embeddings.unwrap_or(base.tie_embeddings),
        }
    }
}

impl ModelConfig {
    /// Parameters for a given vocabulary size (embeddings, blocks, norms, LM head).
    /// Saturates instead of overflowing, so an absurd (invalid) shape cannot panic.
    pub fn parameters(&self, vocab_size: u32) -> u64 {
        let (d, f, v) = (u64::from(self.dim), u64::from(self.ffn_dim), u64::from(vocab_size));
        let head_dim = d.checked_div(u64::from(self.heads)).unwrap_or(0);
        let kv = head_dim.saturating_mul(u64::from(self.kv_heads));
        let attention = d.saturating_mul(d).saturating_mul(2).saturating_add(d.saturating_mul(kv).saturating_mul(2));
        let mlp = d.saturating_mul(f).saturating_mul(3);
        let per_block = attention.saturating_add(mlp).saturating_add(2 * d);
        let blocks = u64::from(self.layers).saturating_mul(per_block);
        let embedding = v.saturating_mul(d);
        let head = if self.tie_embeddings { 0 } else { embedding };
        embedding.saturating_add(blocks).saturating_add(d).saturating_add(head)
    }
}

/// Pretraining.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", default)]
pub struct Train {
    /// Tokens per training sequence.
    #[schemars(range(min = 16, max = 1_048_576))]
    pub seq_len: u32,
    /// Token budget; omitted means 20 tokens per parameter (Chinchilla).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub tokens: Option<u64>,
    /// Tokens per optimizer step across all ranks (reached by gradient accumulation).
    #[schemars(range(min = 16))]
    pub global_batch_tokens: u64,
    /// Sequences per forward/backward pass on one rank.
    #[schemars(range(min = 1, max = 4096))]
    pub micro_batch_size: u32,
    /// AdamW.
    pub optimizer: Optimizer,
    /// Learning-rate schedule.
    pub schedule: Schedule,
    /// Numeric precision.
    pub precision: Precision,
    /// Recompute each block's activations in the backward pass instead of keeping them: about a
    /// third more compute for a fraction of the activation memory, so larger micro-batches fit.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub recompute_activations: bool,
    /// Checkpoint cadence and retention.
    pub checkpoint: Checkpointing,
    /// Nodes and per-node resources of the training gang.
    pub resources: Resources,
    /// Gang restarts from the last checkpoint before the run fails.
    #[schemars(range(min = 0, max = 1000))]
    pub max_restarts: u32,
    /// Loss-spike detection.
    pub loss_spike: LossSpike,
}

impl Default for Train {
    fn default() -> Self {
        Self {
            seq_len: 2048,
            tokens: None,
            global_batch_tokens: 524_288,
            micro_batch_size: 8,
            optimizer: Optimizer::default(),
            schedule: Schedule::default(),
            precision: Precision::Auto,
            recompute_activations: false,
            checkpoint: Checkpointing::default(),
            resources: Resources::default(),
            max_restarts: 10,
            loss_spike: LossSpike::default(),
        }
    }
}

/// AdamW with decoupled weight decay.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", default)]
pub struct Optimizer {
    /// Peak learning rate.
    #[schemars(range(min = 0.0, max = 10.0))]
    pub lr: f64,
    /// Final learning rate of the decay.
    #[schemars(range(min = 0.0, max = 10.0))]
    pub min_lr: f64,
    /// Decoupled weight decay (not applied to norms and embeddings).
    #[schemars(range(min = 0.0, max = 10.0))]
    pub weight_decay: f64,
    /// Adam beta1 and beta2.
    #[schemars(length(min = 2, max = 2))]
    pub betas: Vec<f64>,
    /// Adam epsilon.
    #[schemars(range(min = 0.0))]
    pub eps: f64,
    /// Largest global gradient norm; 0 disables clipping.
    #[schemars(range(min = 0.0))]
    pub grad_clip: f64,
}

impl Default for Optimizer {
    fn default() -> Self {
        Self { lr: 3e-4, min_lr: 3e-5, weight_decay: 0.1, betas: vec![0.9, 0.95], eps: 1e-8, grad_clip: 1.0 }
    }
}

/// Learning-rate schedule, a pure function of the step.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", default)]
pub struct Schedule {
    /// `cosine` (warmup then cosine decay to minLr), `wsd` (warmup, stable, short decay), `constant`.
    pub kind: ScheduleKind,
    /// Linear warmup steps.
    pub warmup_steps: u64,
    /// Fraction of the steps spent in the final decay (wsd).
    #[schemars(range(min = 0.0, max = 1.0))]
    pub decay_fraction: f64,
}

impl Default for Schedule {
    fn default() -> Self {
        Self { kind: ScheduleKind::Cosine, warmup_steps: 2000, decay_fraction: 0.1 }
    }
}

/// Schedule shapes.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum ScheduleKind {
    /// Warmup + cosine decay.
    Cosine,
    /// Warmup, stable, decay (MiniCPM).
    Wsd,
    /// Warmup, then constant.
    Constant,
}

/// Numeric precision.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum Precision {
    /// bf16 compute with fp32 master weights on GPUs, fp32 on CPUs.
    Auto,
    /// fp32 everywhere.
    Fp32,
    /// bf16 compute with fp32 master weights (GPUs only).
    Bf16,
}

/// Checkpointing.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", default)]
pub struct Checkpointing {
    /// Steps between checkpoints.
    #[schemars(range(min = 1))]
    pub every_steps: u64,
    /// Checkpoints kept (older ones are deleted after a newer one is committed).
    #[schemars(range(min = 1, max = 1000))]
    pub keep: u32,
}

impl Default for Checkpointing {
    fn default() -> Self {
        Self { every_steps: 1000, keep: 3 }
    }
}

/// The training gang: one pod per node.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", default)]
pub struct Resources {
    /// Nodes (pods) in the data-parallel gang.
    #[schemars(range(min = 1, max = 4096))]
    pub nodes: u32,
    /// GPUs per node; 0 trains on CPUs.
    #[schemars(range(min = 0, max = 16))]
    pub gpus_per_node: u32,
    /// GPU type to place on (matched against the node label `nvidia.com/gpu.product`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gpu_type: Option<String>,
    /// CPU request per pod.
    pub cpu: Quantity,
    /// Memory request per pod.
    pub memory: Quantity,
}

impl Default for Resources {
    fn default() -> Self {
        Self {
            nodes: 1,
            gpus_per_node: 8,
            gpu_type: None,
            cpu: Quantity("16".into()),
            memory: Quantity("128Gi".into()),
        }
    }
}

impl Resources {
    /// Data-parallel ranks: one per GPU, or one per node on CPUs.
    pub fn ranks(&self) -> u64 {
        u64::from(self.nodes) * u64::from(self.gpus_per_node.max(1))
    }
}

/// Loss-spike handling.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", default)]
pub struct LossSpike {
    /// A step whose loss is this many standard deviations above the window mean is a spike.
    #[schemars(range(min = 0.0))]
    pub z_score: f64,
    /// Steps in the rolling window.
    #[schemars(range(min = 2))]
    pub window: u32,
    /// What to do about a spike.
    pub action: SpikeAction,
}

impl Default for LossSpike {
    fn default() -> Self {
        Self { z_score: 6.0, window: 100, action: SpikeAction::Skip }
    }
}

/// Loss-spike actions.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum SpikeAction {
    /// Log it and carry on.
    Log,
    /// Skip the optimizer update of that batch.
    Skip,
    /// Reload the previous checkpoint and skip past the batch.
    Rollback,
}

/// Long-context continued training.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LongContext {
    /// The new sequence length; greater than `train.seqLen`.
    #[schemars(range(min = 32, max = 4_194_304))]
    pub seq_len: u32,
    /// How RoPE is rescaled for the new length.
    #[serde(default)]
    pub rope: RopeScaling,
    /// Fraction of the train token budget spent at the long length.
    #[serde(default = "default_tokens_fraction")]
    #[schemars(range(min = 0.0, max = 1.0))]
    pub tokens_fraction: f64,
    /// Sequences per pass; defaults to keeping train's tokens per pass.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub micro_batch_size: Option<u32>,
    /// Peak learning rate of the continuation; defaults to a tenth of `train.optimizer.lr` (at least
    /// its `minLr`), so that adapting to the new length does not undo what pretraining learned.
    /// The schedule is train's, decaying to `train.optimizer.minLr` (or to this, if lower).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.0))]
    pub lr: Option<f64>,
}

impl LongContext {
    /// The continuation's peak learning rate under `optimizer` (train's settings).
    pub fn peak_lr(&self, optimizer: &Optimizer) -> f64 {
        self.lr.unwrap_or((optimizer.lr / 10.0).max(optimizer.min_lr))
    }
}

fn default_tokens_fraction() -> f64 {
    0.05
}

/// RoPE rescaling.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", default)]
pub struct RopeScaling {
    /// `ntk` (base * s^(d/(d-2))), `yarn`, `linear` (position interpolation) or `none`.
    pub scaling: RopeScalingKind,
    /// Scale factor; defaults to longContext.seqLen / train.seqLen.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1.0))]
    pub factor: Option<f64>,
    /// An explicit new RoPE base; overrides what the scaling would compute.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub base: Option<f64>,
}

impl Default for RopeScaling {
    fn default() -> Self {
        Self { scaling: RopeScalingKind::Ntk, factor: None, base: None }
    }
}

/// RoPE rescaling methods.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum RopeScalingKind {
    /// No rescaling (the baseline), or only the explicit `base`.
    None,
    /// NTK-aware base change.
    Ntk,
    /// YaRN: per-frequency interpolation and attention temperature.
    Yarn,
    /// Linear position interpolation.
    Linear,
}

/// The eval stage.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", default)]
pub struct Eval {
    /// (prompt, target) pairs whose target log-probability is tracked across checkpoints.
    pub probes: Vec<Probe>,
    /// Cloze and generative benchmarks (JSONL task files).
    pub benchmarks: Vec<Benchmark>,
    /// Passkey retrieval.
    pub passkey: Passkey,
    /// Most held-out tokens scored for perplexity.
    #[schemars(range(min = 1))]
    pub max_held_out_tokens: u64,
}

impl Default for Eval {
    fn default() -> Self {
        Self { probes: Vec::new(), benchmarks: Vec::new(), passkey: Passkey::default(), max_held_out_tokens: 1_000_000 }
    }
}

/// A probability probe.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Probe {
    /// Unique name.
    #[schemars(length(min = 1))]
    pub name: String,
    /// Text before the target.
    #[schemars(length(min = 1))]
    pub prompt: String,
    /// The continuation whose log-probability is recorded.
    #[schemars(length(min = 1))]
    pub target: String,
}

/// A benchmark task file.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Benchmark {
    /// Unique name.
    #[schemars(length(min = 1))]
    pub name: String,
    /// URL of the JSONL task file.
    #[schemars(length(min = 1))]
    pub url: String,
    /// `cloze` (choices scored by normalised log-likelihood) or `generative` (greedy, exact match).
    pub format: BenchmarkFormat,
}

/// Benchmark forms.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum BenchmarkFormat {
    /// Continuations scored by length-normalised log-likelihood.
    Cloze,
    /// Greedy generation scored by exact match.
    Generative,
}

/// Passkey retrieval.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", default)]
pub struct Passkey {
    /// Context lengths in tokens; empty tests train's and long-context's sequence lengths.
    pub lengths: Vec<u32>,
    /// Trials per length.
    #[schemars(range(min = 1, max = 10000))]
    pub trials: u32,
}

impl Default for Passkey {
    fn default() -> Self {
        Self { lengths: Vec::new(), trials: 20 }
    }
}
