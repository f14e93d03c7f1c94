//! tokenize's statistics: the tokenizer, token counts and compression.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// How a tokenizer was trained (none when it was copied from `tokenizer.url`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TokenizerTraining {
    /// Documents in the training sample.
    pub sample_documents: u64,
    /// Bytes in the training sample.
    pub sample_bytes: u64,
    /// Training time.
    pub seconds: f64,
}

/// Documents, tokens, bytes and characters of some encoded text.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Counts {
    /// Documents.
    pub documents: u64,
    /// Tokens, separators included.
    pub tokens: u64,
    /// UTF-8 bytes of text.
    pub bytes: u64,
    /// Characters of text.
    pub chars: u64,
}

impl Counts {
    /// The sum of per-category counts.
    pub fn total<'a>(all: impl IntoIterator<Item = &'a Counts>) -> Counts {
        all.into_iter().fold(Counts::default(), |mut sum, c| {
            sum.add(c);
            sum
        })
    }

    /// Adds `other`'s counts.
    pub fn add(&mut self, other: &Counts) {
        self.documents += other.documents;
        self.tokens += other.tokens;
        self.bytes += other.bytes;
        self.chars += other.chars;
    }
}

/// Bytes and characters per token of some text.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Compression {
    /// What was measured.
    #[serde(flatten)]
    pub counts: Counts,
    /// UTF-8 bytes per token (separators not counted as tokens).
    pub bytes_per_token: f64,
    /// Characters per token.
    pub chars_per_token: f64,
}

impl Compression {
    /// The compression of `counts`.
    pub fn of(counts: &Counts) -> Self {
        let tokens = counts.tokens.saturating_sub(counts.documents).max(1) as f64;
        Self {
            counts: counts.clone(),
            bytes_per_token: counts.bytes as f64 / tokens,
            chars_per_token: counts.chars as f64 / tokens,
        }
    }
}

/// The statistics tokenize commits (`_SUCCESS.json`'s `stats`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TokenizeStats {
    /// The tokenizer.
    pub tokenizer: TokenizerStats,
    /// Tokens per category, of the training shards and of the held-out split.
    pub tokens: SplitTokens,
    /// Documents per category of the training shards, and of the held-out split.
    pub documents: SplitDocuments,
    /// Compression on the held-out split, per category and over all of it.
    pub compression: CompressionReport,
    /// Each token shard.
    pub shards: Vec<TokenShardStats>,
}

/// The tokenizer tokenize used.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TokenizerStats {
    /// SHA-256 of `tokenizer.json`.
    pub sha256: String,
    /// Its vocabulary size.
    pub vocab_size: u32,
    /// The spec's `tokenizer.vocabSize`.
    pub requested_vocab_size: u32,
    /// The special token that ends every document.
    pub separator: String,
    /// How it was trained.
    pub trained: Option<TokenizerTraining>,
    /// Where it was copied from, instead.
    pub url: Option<String>,
    /// Whether encoding took the fast path (no pre-tokenizer quirks to emulate).
    pub fast_path: bool,
}

/// Tokens per category.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SplitTokens {
    /// Of the training shards.
    pub train: BTreeMap<String, u64>,
    /// Of the held-out split.
    pub heldout: BTreeMap<String, u64>,
}

/// Documents of the training shards per category, and of the held-out split.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SplitDocuments {
    /// Per category, of the training shards.
    pub train: BTreeMap<String, u64>,
    /// Of the held-out split.
    pub heldout: u64,
}

/// Compression on the held-out split.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CompressionReport {
    /// Per category.
    pub heldout: BTreeMap<String, Compression>,
    /// Over all of it.
    pub all: Compression,
}

/// One token shard of tokenize.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TokenShardStats {
    /// Its path in the stage directory.
    pub file: String,
    /// Documents in it.
    pub documents: u64,
    /// Tokens in it.
    pub tokens: u64,
}
