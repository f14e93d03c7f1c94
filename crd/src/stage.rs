//! The pipeline's stages, their order, and the config hash that decides whether a stage's committed
//! outputs are still valid for a spec.

use std::fmt;
use std::str::FromStr;

use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::spec::PretrainRunSpec;

/// A stage of the pipeline.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Stage {
    /// Raw text to clean, deduplicated, mixed and ordered document shards.
    DataPrep,
    /// BPE tokenizer training and token shards.
    Tokenize,
    /// Pretraining.
    Train,
    /// Continued training at a longer context.
    LongContext,
    /// Perplexity, probes, benchmarks, passkey.
    Eval,
}

impl Stage {
    /// Every stage in pipeline order.
    pub const ALL: [Stage; 5] = [Stage::DataPrep, Stage::Tokenize, Stage::Train, Stage::LongContext, Stage::Eval];

    /// The stage's name on the command line, in object keys and in Job names.
    pub fn as_str(self) -> &'static str {
        match self {
            Stage::DataPrep => "data-prep",
            Stage::Tokenize => "tokenize",
            Stage::Train => "train",
            Stage::LongContext => "long-context",
            Stage::Eval => "eval",
        }
    }

    /// Training stages hold GPUs, run as a gang and checkpoint.
    pub fn is_training(self) -> bool {
        matches!(self, Stage::Train | Stage::LongContext)
    }
}

impl fmt::Display for Stage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An unknown stage name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown stage {0:?}; expected one of data-prep, tokenize, train, long-context, eval")]
pub struct UnknownStage(pub String);

impl FromStr for Stage {
    type Err = UnknownStage;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Stage::ALL.into_iter().find(|st| st.as_str() == s).ok_or_else(|| UnknownStage(s.to_string()))
    }
}

/// Version of the hashed inputs; bump when a stage's output format changes so old outputs are redone.
const CONFIG_HASH_VERSION: u32 = 1;

impl PretrainRunSpec {
    /// The stages this spec runs, in order (`long-context` only when configured).
    pub fn stages(&self) -> Vec<Stage> {
        Stage::ALL.into_iter().filter(|s| *s != Stage::LongContext || self.long_context.is_some()).collect()
    }

    /// The stage that feeds `stage`, if any.
    pub fn upstream(&self, stage: Stage) -> Option<Stage> {
        let stages = self.stages();
        let i = stages.iter().position(|s| *s == stage)?;
        i.checked_sub(1).map(|j| stages[j])
    }

    /// Hex sha256 over everything that determines `stage`'s outputs: its own settings, the seed, and
    /// the hash of the stage that feeds it. Settings that do not change results (image, resources,
    /// restart budget, checkpoint cadence, scheduling) are left out, so editing them never redoes work.
    pub fn stage_config_hash(&self, stage: Stage) -> String {
        let upstream = self.upstream(stage).map(|s| self.stage_config_hash(s));
        let own = match stage {
            Stage::DataPrep => serde_json::to_value(&self.data).map(|mut data| {
                if let Some(map) = data.as_object_mut() {
                    map.remove("resources");
                    map.remove("tasks");
                }
                data
            }),
            Stage::Tokenize => serde_json::to_value(&self.tokenizer),
            Stage::Train => {
                let mut train = serde_json::to_value(&self.train).expect("train serialises");
                if let Some(map) = train.as_object_mut() {
                    for volatile in ["resources", "maxRestarts", "checkpoint"] {
                        map.remove(volatile);
                    }
                }
                Ok(serde_json::json!({ "model": self.model.resolved(), "train": train, "tokens": self.train_tokens() }))
            }
            // The effective peak learning rate, so that a change of its default redoes the stage.
            Stage::LongContext => serde_json::to_value(&self.long_context).map(|lc| {
                let lr = self.long_context.as_ref().map(|l| l.peak_lr(&self.train.optimizer));
                serde_json::json!({ "longContext": lc, "peakLr": lr })
            }),
            Stage::Eval => serde_json::to_value(&self.eval),
        }
        .expect("spec sections serialise to JSON");
        let input = serde_json::json!({
            "version": CONFIG_HASH_VERSION,
            "stage": stage,
            "seed": self.seed,
            "upstream": upstream,
            "config": own,
        });
        hex::encode(Sha256::digest(input.to_string().as_bytes()))
    }
}
