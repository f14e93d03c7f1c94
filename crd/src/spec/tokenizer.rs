//! `spec.tokenizer`: the byte-level BPE tokenizer.

use std::collections::BTreeSet;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::field::{Errors, no_credentials};

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

impl Tokenizer {
    /// The rules of `spec.tokenizer`.
    pub(crate) fn check(&self, e: &mut Errors) {
        let specials = BUILTIN_SPECIAL_TOKENS.len() + self.special_tokens.len();
        let smallest = 256 + specials as u64;
        e.check(
            u64::from(self.vocab_size) >= smallest && self.vocab_size <= 1 << 20,
            "spec.tokenizer.vocabSize",
            format!(
                "must be between {smallest} (256 bytes + {specials} special tokens) and 1048576, got {}",
                self.vocab_size
            ),
        );
        e.check(self.train_sample_bytes > 0, "spec.tokenizer.trainSampleBytes", "must be greater than 0");
        let mut seen: BTreeSet<&str> = BUILTIN_SPECIAL_TOKENS.into_iter().collect();
        for (i, tok) in self.special_tokens.iter().enumerate() {
            let path = format!("spec.tokenizer.specialTokens[{i}]");
            if tok.is_empty() {
                e.push(path, "must not be empty");
            } else if !seen.insert(tok) {
                e.push(path, format!("{tok:?} is a built-in special token or listed twice"));
            }
        }
        if let Some(url) = &self.url {
            e.check(!url.trim().is_empty(), "spec.tokenizer.url", "must not be empty when set");
            no_credentials(url, "spec.tokenizer.url", e);
        }
    }
}
