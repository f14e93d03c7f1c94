//! What eval reports that other readers use.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// One probe reading recorded during training, as eval reports it (`eval.json`'s `probeHistory`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ProbeRow {
    /// Stage that trained.
    pub stage: String,
    /// Step of the checkpoint.
    pub step: u64,
    /// Tokens seen in that stage.
    pub tokens: u64,
    /// Log-probability per probe.
    pub logprobs: BTreeMap<String, f64>,
}
