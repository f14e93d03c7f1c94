//! `spec.data.filters` and `spec.data.quality`: what data-prep keeps.

use std::collections::BTreeSet;

use schemars::{JsonSchema, Schema, SchemaGenerator};
use serde::{Deserialize, Serialize};

use crate::field::Errors;

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

/// Gopher quality filter. The defaults are DataTrove's `GopherQualityFilter`
/// (`pipeline/filters/gopher_quality_filter.py`), which are Rae et al.'s (2021, appendix A).
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

/// Gopher repetition filter. The defaults are DataTrove's `GopherRepetitionFilter`
/// (`pipeline/filters/gopher_repetition_filter.py`), Rae et al.'s table A1.
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

/// C4 filter: line-level cleaning and page-level rules. The defaults are FineWeb's use of it
/// (DataTrove's FineWeb pipeline runs `C4QualityFilter(filter_no_terminal_punct=False)`): C4's
/// rules without the terminal-punctuation line rule, which FineWeb found removes too much.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", default)]
pub struct C4 {
    /// Apply this filter.
    pub enabled: bool,
    /// Drop lines that do not end in terminal punctuation (C4's original rule; off in FineWeb,
    /// and by default).
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
            terminal_punctuation: false,
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

/// FineWeb quality filter. The defaults are DataTrove's `FineWebQualityFilter`
/// (`pipeline/filters/fineweb_quality_filter.py`), as FineWeb ran it (Penedo et al. 2024).
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

/// Language identification. FineWeb keeps English at a score of 0.65 with DataTrove's
/// `LanguageFilter` (`pipeline/filters/language_filter.py`, fastText); we identify with `whatlang`.
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
    /// URL of a model. For `ngram`, a trained model file (else the stage trains one). For `bert`, a
    /// Hugging Face directory (config.json, model.safetensors, tokenizer.json; a sentence-transformers
    /// `sentence_bert_config.json` bounds the input length): a `BertForSequenceClassification` used as
    /// shipped, or, when `labelledUrl` or `referenceSources` is set, an encoder (all-MiniLM-L6-v2,
    /// say) under which the stage trains a linear head on mean-pooled embeddings, FineWeb-Edu's
    /// recipe (a linear head over a frozen encoder).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub model_url: Option<String>,
    /// JSONL file of `{text, label}` to train the classifier (n-gram model or BERT head) from.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub labelled_url: Option<String>,
    /// Sources whose documents are the positive class (the rest of the corpus is the negative).
    pub reference_sources: Vec<String>,
    /// Most labelled documents of each class a classifier trains on (a fifth of them is held out to
    /// measure it: precision, recall, F1 and the score distribution go to the stage's statistics).
    #[schemars(range(min = 10))]
    pub training_documents: u32,
    /// Documents the BERT encoder runs at once, in parallel. Each has a forward pass of its own, so a
    /// score never depends on the batch size or on the documents beside it.
    #[schemars(range(min = 1))]
    pub batch_size: u32,
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
            training_documents: 20_000,
            batch_size: 32,
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
    /// A BERT-family model from `modelUrl`: a shipped sequence classifier, or an encoder with a
    /// linear head trained in the stage.
    Bert,
}

impl Filters {
    /// The rules of a filter chain at `path`.
    pub(crate) fn check(&self, path: &str, e: &mut Errors) {
        let g = &self.gopher_quality;
        let p = format!("{path}.gopherQuality");
        e.check(
            g.min_words <= g.max_words,
            format!("{p}.minWords"),
            format!("must not exceed maxWords ({} > {})", g.min_words, g.max_words),
        );
        e.check(
            g.min_avg_word_length <= g.max_avg_word_length,
            format!("{p}.minAvgWordLength"),
            "must not exceed maxAvgWordLength",
        );
        for (v, name) in [
            (g.max_bullet_lines_ratio, "maxBulletLinesRatio"),
            (g.max_ellipsis_lines_ratio, "maxEllipsisLinesRatio"),
            (g.min_alpha_words_ratio, "minAlphaWordsRatio"),
        ] {
            e.fraction(v, format!("{p}.{name}"));
        }
        let r = &self.gopher_repetition;
        let p = format!("{path}.gopherRepetition");
        for (v, name) in [
            (r.dup_line_fraction, "dupLineFraction"),
            (r.dup_para_fraction, "dupParaFraction"),
            (r.dup_line_char_fraction, "dupLineCharFraction"),
            (r.dup_para_char_fraction, "dupParaCharFraction"),
        ] {
            e.fraction(v, format!("{p}.{name}"));
        }
        Self::ngram_limits(&r.top_ngrams, &format!("{p}.topNgrams"), e);
        Self::ngram_limits(&r.dup_ngrams, &format!("{p}.dupNgrams"), e);
        let w = &self.fineweb;
        let p = format!("{path}.fineweb");
        for (v, name) in [
            (w.min_line_punctuation_ratio, "minLinePunctuationRatio"),
            (w.max_short_line_ratio, "maxShortLineRatio"),
            (w.max_duplicate_line_char_ratio, "maxDuplicateLineCharRatio"),
        ] {
            e.fraction(v, format!("{p}.{name}"));
        }
        let l = &self.language;
        e.fraction(l.min_score, format!("{path}.language.minScore"));
        if l.enabled {
            e.check(!l.languages.is_empty(), format!("{path}.language.languages"), "must list a language when enabled");
        }
        for (i, code) in l.languages.iter().enumerate() {
            e.check(
                code.len() == 2 && code.bytes().all(|b| b.is_ascii_lowercase()),
                format!("{path}.language.languages[{i}]"),
                format!("must be a two-letter ISO 639-1 code, got {code:?}"),
            );
        }
    }

    fn ngram_limits(limits: &[NgramLimit], path: &str, e: &mut Errors) {
        let mut seen = BTreeSet::new();
        for (i, l) in limits.iter().enumerate() {
            e.check((1..=64).contains(&l.n), format!("{path}[{i}].n"), "must be between 1 and 64");
            e.check(seen.insert(l.n), format!("{path}[{i}].n"), format!("n = {} is listed twice", l.n));
            e.fraction(l.max_fraction, format!("{path}[{i}].maxFraction"));
        }
    }
}

impl Quality {
    /// `names` and `categories`: those of the run's sources.
    pub(crate) fn check(&self, names: &BTreeSet<&str>, categories: &BTreeSet<&str>, e: &mut Errors) {
        e.fraction(self.threshold, "spec.data.quality.threshold");
        if let Some(f) = self.keep_top_fraction {
            e.check(f > 0.0 && f <= 1.0, "spec.data.quality.keepTopFraction", format!("must be in (0, 1], got {f}"));
        }
        for (i, name) in self.reference_sources.iter().enumerate() {
            e.check(
                names.contains(name.as_str()),
                format!("spec.data.quality.referenceSources[{i}]"),
                format!("{name:?} is not the name of a source"),
            );
        }
        for (i, c) in self.categories.iter().enumerate() {
            e.check(
                categories.contains(c.as_str()),
                format!("spec.data.quality.categories[{i}]"),
                format!("{c:?} is not a category of any source"),
            );
        }
        e.check(self.batch_size >= 1, "spec.data.quality.batchSize", "must be at least 1");
        e.check(
            self.training_documents >= 10,
            "spec.data.quality.trainingDocuments",
            format!("must be at least 10 (a fifth is held out), got {}", self.training_documents),
        );
        match self.classifier {
            QualityClassifier::None => {}
            QualityClassifier::Bert => e.check(
                self.model_url.is_some(),
                "spec.data.quality.modelUrl",
                "is required when classifier is bert (a directory with config.json, model.safetensors, tokenizer.json)",
            ),
            QualityClassifier::Ngram => e.check(
                self.model_url.is_some() || self.labelled_url.is_some() || !self.reference_sources.is_empty(),
                "spec.data.quality",
                "the ngram classifier needs modelUrl, labelledUrl or referenceSources to learn from",
            ),
        }
    }
}

/// Schema of a per-source filter override: the `Filters` shape without defaults, so that the API
/// server does not fill in fields the user left to `data.filters`.
pub(crate) fn filters_override(generator: &mut SchemaGenerator) -> Schema {
    let mut value = generator.subschema_for::<Filters>().to_value();
    strip_defaults(&mut value);
    Schema::try_from(value).expect("a schema without defaults is still a schema")
}

fn strip_defaults(value: &mut serde_json::Value) {
    match value {
        serde_json::Value::Object(map) => {
            map.remove("default");
            map.values_mut().for_each(strip_defaults);
        }
        serde_json::Value::Array(items) => items.iter_mut().for_each(strip_defaults),
        _ => {}
    }
}
