//! data-prep's outputs: the training stream's document lines and the stage's statistics.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// One document line of every data-prep file.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DocumentLine {
    /// Source-given or derived id.
    pub id: String,
    /// The cleaned text.
    pub text: String,
    /// Source name.
    pub source: String,
    /// Category (for the mix and the reports).
    pub category: String,
    /// Page URL.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// Page title.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub title: Option<String>,
}

/// A record a reader skipped, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Skipped {
    /// File it was in.
    pub file: String,
    /// Byte offset (WARC) or line number (JSONL) in the file.
    pub offset: u64,
    /// Why it was skipped.
    pub reason: String,
}

/// What data-prep's map tasks saw, one task's or all of them merged.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MapStats {
    /// Input files read.
    pub files: u64,
    /// Documents read, per source.
    pub read: BTreeMap<String, u64>,
    /// Web pages read in a charset other than UTF-8 (decoded), per charset.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub decoded: BTreeMap<String, u64>,
    /// Documents kept by the rule filters, per source.
    pub kept: BTreeMap<String, u64>,
    /// Documents dropped, per filter and reason (`c4/too_few_sentences`).
    pub dropped: BTreeMap<String, u64>,
    /// Lines removed by C4 from kept documents, per reason.
    pub lines_removed: BTreeMap<String, u64>,
    /// Empty documents dropped after cleaning.
    pub empty: u64,
    /// Records skipped as malformed.
    pub malformed: u64,
    /// The first malformed records, with file and offset.
    pub malformed_examples: Vec<Skipped>,
}

impl MapStats {
    /// Malformed records kept as examples, at most.
    pub const MALFORMED_EXAMPLES: usize = 100;

    /// Adds another task's counts (and examples, up to [`MapStats::MALFORMED_EXAMPLES`]).
    pub fn merge(&mut self, other: &MapStats) {
        let add = |a: &mut BTreeMap<String, u64>, b: &BTreeMap<String, u64>| {
            for (k, v) in b {
                *a.entry(k.clone()).or_default() += v;
            }
        };
        self.files += other.files;
        add(&mut self.read, &other.read);
        add(&mut self.decoded, &other.decoded);
        add(&mut self.kept, &other.kept);
        add(&mut self.dropped, &other.dropped);
        add(&mut self.lines_removed, &other.lines_removed);
        self.empty += other.empty;
        self.malformed += other.malformed;
        let room = Self::MALFORMED_EXAMPLES.saturating_sub(self.malformed_examples.len());
        self.malformed_examples.extend(other.malformed_examples.iter().take(room).cloned());
    }
}

/// The statistics data-prep commits (`_SUCCESS.json`'s `stats`): the funnel from documents read to
/// documents trained on.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct DataPrepStats {
    /// Layout version of the outputs.
    pub output_version: u32,
    /// What the map tasks read, kept and dropped.
    pub map: MapStats,
    /// The quality cut.
    pub quality: QualityStats,
    /// Exact and near-duplicate removal.
    pub dedup: DedupStats,
    /// The held-out split.
    pub held_out: HeldOutStats,
    /// The category mix.
    pub mix: MixStats,
    /// The training stream.
    pub train: StreamStats,
}

/// The quality cut of data-prep.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct QualityStats {
    /// Threshold of each scored category.
    pub thresholds: BTreeMap<String, f32>,
    /// Documents under it, per category.
    pub removed: BTreeMap<String, u64>,
    /// How the classifier trained in the stage did on its held-out examples.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub classifier: Option<ClassifierEval>,
}

/// A quality classifier trained in data-prep, measured on the labelled examples it did not train on.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct ClassifierEval {
    /// `ngram`, or `bert-head` (a linear head over a frozen BERT-family encoder).
    pub classifier: String,
    /// Examples trained on, positive and negative.
    pub train_examples: [u64; 2],
    /// Held-out examples, positive and negative.
    pub heldout_examples: [u64; 2],
    /// The score at which a document counts as positive for the figures below.
    pub threshold: f32,
    /// Held-out positives among the documents scoring at least `threshold`.
    pub precision: f64,
    /// Held-out positives scoring at least `threshold`, of all held-out positives.
    pub recall: f64,
    /// Harmonic mean of precision and recall.
    pub f1: f64,
    /// Area under the ROC curve: the chance a held-out positive outscores a held-out negative.
    pub auc: f64,
    /// Held-out positives per score decile ([0, 0.1), ..., [0.9, 1]).
    pub positive_histogram: Vec<u64>,
    /// Held-out negatives per score decile.
    pub negative_histogram: Vec<u64>,
}

/// Deduplication in data-prep.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct DedupStats {
    /// Documents the map tasks kept.
    pub candidates: u64,
    /// Exact duplicates removed.
    pub exact_removed: u64,
    /// Near duplicates removed.
    pub near_removed: u64,
    /// Candidate pairs whose signatures were compared.
    pub lsh_pairs_compared: u64,
    /// Pairs merged.
    pub lsh_pairs_merged: u64,
    /// Band collisions the signature check refused.
    pub lsh_collisions_rejected: u64,
    /// Documents dropped as near-identical neighbours by in-context ordering's semantic dedup.
    pub semantic_removed: u64,
}

/// The held-out split.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct HeldOutStats {
    /// Documents held out.
    pub documents: u64,
}

/// The category mix, per category.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct MixStats {
    /// Training bytes before the mix.
    pub bytes_before_mix: BTreeMap<String, u64>,
    /// Epochs taken.
    pub epochs: BTreeMap<String, f64>,
    /// Documents in the training stream (copies counted).
    pub documents: BTreeMap<String, u64>,
    /// Bytes in the training stream.
    pub bytes: BTreeMap<String, u64>,
    /// Share of the stream's bytes.
    pub realised_share: BTreeMap<String, f64>,
}

/// The training stream data-prep wrote.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct StreamStats {
    /// Documents (copies counted).
    pub documents: u64,
    /// Output shards.
    pub shards: u64,
    /// In-context order: the mean cosine similarity of consecutive documents on its paths (within
    /// each partition), and of two random documents of them (the baseline), over the document
    /// embeddings.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub adjacent_similarity: Option<[f64; 2]>,
}
