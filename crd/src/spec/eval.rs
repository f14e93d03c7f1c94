//! `spec.eval`: probes, benchmarks and passkey retrieval.

use std::collections::BTreeSet;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::field::{Errors, no_credentials};

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
    /// `cloze` (choices scored by log-likelihood, lm-evaluation-harness's `acc_norm`), `generative`
    /// (greedy, exact match) or `loglikelihood` (a target's log-likelihood and whether greedy decoding
    /// gives it, as lm-evaluation-harness scores LAMBADA).
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
    /// A target continuation scored by its log-likelihood (perplexity) and whether greedy decoding
    /// produces it (accuracy).
    Loglikelihood,
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

impl Eval {
    /// The rules of `spec.eval`.
    pub(crate) fn check(&self, e: &mut Errors) {
        let mut names = BTreeSet::new();
        for (i, p) in self.probes.iter().enumerate() {
            let path = format!("spec.eval.probes[{i}]");
            e.check(!p.name.is_empty(), format!("{path}.name"), "must not be empty");
            e.check(names.insert(p.name.as_str()), format!("{path}.name"), format!("{:?} is used twice", p.name));
            e.check(!p.prompt.is_empty(), format!("{path}.prompt"), "must not be empty");
            e.check(!p.target.is_empty(), format!("{path}.target"), "must not be empty");
        }
        let mut names = BTreeSet::new();
        for (i, b) in self.benchmarks.iter().enumerate() {
            let path = format!("spec.eval.benchmarks[{i}]");
            e.check(!b.name.is_empty(), format!("{path}.name"), "must not be empty");
            e.check(names.insert(b.name.as_str()), format!("{path}.name"), format!("{:?} is used twice", b.name));
            e.check(!b.url.trim().is_empty(), format!("{path}.url"), "must not be empty");
            no_credentials(&b.url, &format!("{path}.url"), e);
        }
        for (i, len) in self.passkey.lengths.iter().enumerate() {
            e.check(
                *len >= 64,
                format!("spec.eval.passkey.lengths[{i}]"),
                format!("must be at least 64 tokens, got {len}"),
            );
        }
        e.check(self.passkey.trials >= 1, "spec.eval.passkey.trials", "must be at least 1");
        e.check(self.max_held_out_tokens >= 1, "spec.eval.maxHeldOutTokens", "must be at least 1");
    }
}
