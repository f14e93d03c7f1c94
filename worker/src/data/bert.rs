//! A BERT-family quality scorer run with candle: the layout of Hugging Face's
//! `BertForSequenceClassification` (as the FineWeb-Edu classifier ships), loaded from a directory
//! holding `config.json`, `model.safetensors` and `tokenizer.json`.
//!
//! A document's score is the model's probability of the positive label: the softmax column of the
//! label named like `good`/`positive`/`hq` (else the last label) for a multi-label head, the sigmoid
//! of the output for a single-output head. A regression head (FineWeb-Edu's 0-5 scale) therefore
//! maps monotonically into (0, 1): `keepTopFraction` keeps the same documents as on the raw scale,
//! and a threshold `t` means a raw score of `ln(t / (1 - t))`.
//!
//! Documents are scored one at a time, so a score never depends on which other documents shared a
//! batch (and the stage's output never depends on the shard count), and are truncated to the model's
//! maximum length, as the classifiers were trained.

use std::collections::HashMap;

use candle_core::{D, DType, Device, IndexOp, Tensor};
use candle_nn::{Linear, Module, VarBuilder};
use candle_transformers::models::bert::{BertModel, Config};
use tokenizers::{Tokenizer, TruncationDirection, TruncationParams, TruncationStrategy};

/// The longest input any BERT-family classifier takes.
const MAX_TOKENS: usize = 512;

/// Why a scorer could not be loaded or run.
#[derive(Debug, thiserror::Error)]
pub enum BertError {
    /// One of the model's files is missing a piece or does not parse.
    #[error("{file}: {reason}")]
    File {
        /// `config.json`, `model.safetensors` or `tokenizer.json`.
        file: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// Tokenising or running the model failed.
    #[error("BERT scorer: {0}")]
    Run(String),
}

fn file_error(file: &'static str) -> impl Fn(String) -> BertError {
    move |reason| BertError::File { file, reason }
}

/// A loaded sequence classifier.
pub struct BertScorer {
    model: BertModel,
    pooler: Option<Linear>,
    classifier: Linear,
    labels: usize,
    positive: usize,
    tokenizer: Tokenizer,
    max_tokens: usize,
    device: Device,
}

impl std::fmt::Debug for BertScorer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BertScorer")
            .field("labels", &self.labels)
            .field("positive", &self.positive)
            .field("max_tokens", &self.max_tokens)
            .field("device", &self.device)
            .finish_non_exhaustive()
    }
}

/// Label names that mean "keep this document".
const POSITIVE_NAMES: [&str; 8] = ["good", "positive", "hq", "high", "high_quality", "keep", "pos", "1"];

impl BertScorer {
    /// Loads a classifier from the contents of its three files, onto `device`.
    pub fn from_bytes(config: &[u8], weights: &[u8], tokenizer: &[u8], device: &Device) -> Result<Self, BertError> {
        let config_json: serde_json::Value =
            serde_json::from_slice(config).map_err(|e| file_error("config.json")(e.to_string()))?;
        let bert_config: Config =
            serde_json::from_value(config_json.clone()).map_err(|e| file_error("config.json")(e.to_string()))?;

        let tensors = candle_core::safetensors::load_buffer(weights, device)
            .map_err(|e| file_error("model.safetensors")(e.to_string()))?;
        let tensors: HashMap<String, Tensor> = tensors
            .into_iter()
            .map(|(name, t)| t.to_dtype(DType::F32).map(|t| (name, t)))
            .collect::<candle_core::Result<_>>()
            .map_err(|e| file_error("model.safetensors")(e.to_string()))?;
        let classifier_weight = tensors.get("classifier.weight").ok_or_else(|| {
            file_error("model.safetensors")(
                "no classifier.weight: not a sequence classifier (BertForSequenceClassification)".into(),
            )
        })?;
        let (labels, hidden) = classifier_weight.dims2().map_err(|e| file_error("model.safetensors")(e.to_string()))?;
        if hidden != bert_config.hidden_size {
            return Err(file_error("model.safetensors")(format!(
                "classifier.weight is {labels}x{hidden} but config.json says hidden_size {}",
                bert_config.hidden_size
            )));
        }
        let has_pooler =
            tensors.contains_key("bert.pooler.dense.weight") || tensors.contains_key("pooler.dense.weight");
        let prefix =
            if tensors.contains_key("bert.pooler.dense.weight") { "bert.pooler.dense" } else { "pooler.dense" };
        let vb = VarBuilder::from_tensors(tensors, DType::F32, device);
        let model =
            BertModel::load(vb.clone(), &bert_config).map_err(|e| file_error("model.safetensors")(e.to_string()))?;
        let linear = |name: &str, out: usize| -> Result<Linear, BertError> {
            candle_nn::linear(bert_config.hidden_size, out, vb.pp(name))
                .map_err(|e| file_error("model.safetensors")(format!("{name}: {e}")))
        };
        let pooler = if has_pooler { Some(linear(prefix, bert_config.hidden_size)?) } else { None };
        let classifier = linear("classifier", labels)?;

        let positive = positive_label(&config_json, labels);
        let mut tokenizer =
            Tokenizer::from_bytes(tokenizer).map_err(|e| file_error("tokenizer.json")(e.to_string()))?;
        let max_tokens = bert_config.max_position_embeddings.min(MAX_TOKENS);
        tokenizer
            .with_truncation(Some(TruncationParams {
                max_length: max_tokens,
                strategy: TruncationStrategy::LongestFirst,
                stride: 0,
                direction: TruncationDirection::Right,
            }))
            .map_err(|e| file_error("tokenizer.json")(e.to_string()))?;
        tokenizer.with_padding(None);
        if tokenizer.get_vocab_size(true) > bert_config.vocab_size {
            return Err(file_error("tokenizer.json")(format!(
                "the vocabulary has {} tokens but config.json says vocab_size {}",
                tokenizer.get_vocab_size(true),
                bert_config.vocab_size
            )));
        }
        Ok(Self { model, pooler, classifier, labels, positive, tokenizer, max_tokens, device: device.clone() })
    }

    /// The probability of the positive label for one document.
    pub fn score(&self, text: &str) -> Result<f32, BertError> {
        // Tokenising a huge document only to truncate it wastes time: a token covers at most a
        // few dozen bytes, so a prefix is enough.
        let mut end = text.len().min(self.max_tokens * 32);
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        let encoding =
            self.tokenizer.encode(&text[..end], true).map_err(|e| BertError::Run(format!("tokenizing: {e}")))?;
        let run = || -> candle_core::Result<f32> {
            let ids = Tensor::new(encoding.get_ids(), &self.device)?.unsqueeze(0)?;
            let types = Tensor::new(encoding.get_type_ids(), &self.device)?.unsqueeze(0)?;
            let hidden = self.model.forward(&ids, &types, None)?;
            let mut cls = hidden.i((.., 0))?;
            if let Some(pooler) = &self.pooler {
                cls = pooler.forward(&cls)?.tanh()?;
            }
            let logits = self.classifier.forward(&cls)?;
            let probabilities = if self.labels == 1 {
                candle_nn::ops::sigmoid(&logits)?
            } else {
                candle_nn::ops::softmax(&logits, D::Minus1)?
            };
            probabilities.i((0, self.positive))?.to_scalar::<f32>()
        };
        run().map_err(|e| BertError::Run(e.to_string()))
    }
}

/// The index of the positive label: the one `config.json`'s `id2label` names like "good", else the
/// last (0 for a single output).
fn positive_label(config: &serde_json::Value, labels: usize) -> usize {
    let named = config.get("id2label").and_then(|m| m.as_object()).and_then(|m| {
        m.iter()
            .filter_map(|(id, name)| {
                let name = name.as_str()?.to_ascii_lowercase();
                let id: usize = id.parse().ok()?;
                (POSITIVE_NAMES.contains(&name.as_str()) && id < labels).then_some(id)
            })
            .min()
    });
    named.unwrap_or(labels - 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positive_label_follows_id2label_names() {
        let config = serde_json::json!({"id2label": {"0": "bad", "1": "good", "2": "other"}});
        assert_eq!(positive_label(&config, 3), 1);
        assert_eq!(positive_label(&serde_json::json!({"id2label": {"0": "LABEL_0"}}), 1), 0);
        assert_eq!(positive_label(&serde_json::json!({}), 2), 1);
    }
}
