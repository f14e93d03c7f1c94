//! BERT-family models run with candle, in Hugging Face's layout: a directory holding `config.json`,
//! `model.safetensors` and `tokenizer.json` (and, for a sentence-transformers encoder,
//! `sentence_bert_config.json`, whose `max_seq_length` then bounds the input).
//!
//! - [`Encoder`]: document embeddings, the mean of the last hidden states over the tokens,
//!   L2-normalised (sentence-transformers' pooling for all-MiniLM-L6-v2 and its kin). The quality
//!   head data-prep trains ([`super::quality::LinearHead`]) and in-context ordering use them.
//! - [`BertScorer`]: a shipped `BertForSequenceClassification` (as the FineWeb-Edu classifier ships).
//!   A document's score is the model's probability of the positive label: the softmax column of the
//!   label named like `good`/`positive`/`hq` (else the last label) for a multi-label head, the
//!   sigmoid of the output for a single-output head. A regression head (FineWeb-Edu's 0-5 scale)
//!   therefore maps monotonically into (0, 1): `keepTopFraction` keeps the same documents as on the
//!   raw scale, and a threshold `t` means a raw score of `ln(t / (1 - t))`.
//!
//! Documents are truncated to the model's maximum length, as the classifiers were trained, and run
//! one forward pass each, `batch` documents in parallel. Batching documents into one matrix would
//! pad them to one length or group them by length, and either way change the matrix shapes a
//! document is multiplied in, and with them the kernels' rounding (we measured differences of 1e-7
//! between batch sizes on the CPU). One pass per document keeps every score bitwise independent of
//! the batch size, the documents beside it, and so the shard count.

use std::collections::HashMap;

use candle_core::{D, DType, Device, IndexOp, Tensor};
use candle_nn::{Linear, Module, VarBuilder};
use candle_transformers::models::bert::{BertModel, Config};
use rayon::prelude::*;
use tokenizers::{Encoding, Tokenizer, TruncationDirection, TruncationParams, TruncationStrategy};

/// The longest input any BERT-family classifier takes.
const MAX_TOKENS: usize = 512;

/// Why a model could not be loaded or run.
#[derive(Debug, thiserror::Error)]
pub enum BertError {
    /// One of the model's files is missing a piece or does not parse.
    #[error("{file}: {reason}")]
    File {
        /// `config.json`, `model.safetensors`, `tokenizer.json` or `sentence_bert_config.json`.
        file: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// Tokenising or running the model failed.
    #[error("BERT model: {0}")]
    Run(String),
}

fn file_error(file: &'static str) -> impl Fn(String) -> BertError {
    move |reason| BertError::File { file, reason }
}

/// The contents of a model directory's files.
#[derive(Debug, Clone, Copy)]
pub struct ModelFiles<'a> {
    /// `config.json`.
    pub config: &'a [u8],
    /// `model.safetensors`.
    pub weights: &'a [u8],
    /// `tokenizer.json`.
    pub tokenizer: &'a [u8],
    /// `sentence_bert_config.json`, when the directory has one.
    pub sentence_config: Option<&'a [u8]>,
}

/// A BERT encoder and its tokenizer.
pub struct Encoder {
    model: BertModel,
    tokenizer: Tokenizer,
    max_tokens: usize,
    hidden: usize,
    device: Device,
}

impl std::fmt::Debug for Encoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Encoder")
            .field("hidden", &self.hidden)
            .field("max_tokens", &self.max_tokens)
            .field("device", &self.device)
            .finish_non_exhaustive()
    }
}

/// The parsed config (as JSON and as candle's `Config`) and the weights, in f32 on `device`.
type Parsed = (serde_json::Value, Config, HashMap<String, Tensor>);

fn parse(files: &ModelFiles<'_>, device: &Device) -> Result<Parsed, BertError> {
    let json: serde_json::Value =
        serde_json::from_slice(files.config).map_err(|e| file_error("config.json")(e.to_string()))?;
    let config: Config = serde_json::from_value(json.clone()).map_err(|e| file_error("config.json")(e.to_string()))?;
    let tensors = candle_core::safetensors::load_buffer(files.weights, device)
        .map_err(|e| file_error("model.safetensors")(e.to_string()))?;
    let tensors = tensors
        .into_iter()
        .map(|(name, t)| t.to_dtype(DType::F32).map(|t| (name, t)))
        .collect::<candle_core::Result<_>>()
        .map_err(|e| file_error("model.safetensors")(e.to_string()))?;
    Ok((json, config, tensors))
}

impl Encoder {
    /// Loads an encoder (`BertModel`, with or without a task head) from its files, onto `device`.
    pub fn from_bytes(files: &ModelFiles<'_>, device: &Device) -> Result<Self, BertError> {
        let (_, config, tensors) = parse(files, device)?;
        let vb = VarBuilder::from_tensors(tensors, DType::F32, device);
        Self::load(files, &config, &vb, device)
    }

    fn load(files: &ModelFiles<'_>, config: &Config, vb: &VarBuilder<'_>, device: &Device) -> Result<Self, BertError> {
        let model = BertModel::load(vb.clone(), config).map_err(|e| file_error("model.safetensors")(e.to_string()))?;
        let mut max_tokens = config.max_position_embeddings.min(MAX_TOKENS);
        if let Some(bytes) = files.sentence_config {
            let bad = file_error("sentence_bert_config.json");
            let value: serde_json::Value = serde_json::from_slice(bytes).map_err(|e| bad(e.to_string()))?;
            if let Some(n) = value.get("max_seq_length") {
                let n =
                    n.as_u64().filter(|n| *n > 0).ok_or_else(|| bad(format!("max_seq_length {n} is not a count")))?;
                max_tokens = max_tokens.min(n as usize);
            }
        }
        let mut tokenizer =
            Tokenizer::from_bytes(files.tokenizer).map_err(|e| file_error("tokenizer.json")(e.to_string()))?;
        tokenizer
            .with_truncation(Some(TruncationParams {
                max_length: max_tokens,
                strategy: TruncationStrategy::LongestFirst,
                stride: 0,
                direction: TruncationDirection::Right,
            }))
            .map_err(|e| file_error("tokenizer.json")(e.to_string()))?;
        tokenizer.with_padding(None);
        if tokenizer.get_vocab_size(true) > config.vocab_size {
            return Err(file_error("tokenizer.json")(format!(
                "the vocabulary has {} tokens but config.json says vocab_size {}",
                tokenizer.get_vocab_size(true),
                config.vocab_size
            )));
        }
        Ok(Self { model, tokenizer, max_tokens, hidden: config.hidden_size, device: device.clone() })
    }

    /// The embedding width.
    pub fn dim(&self) -> usize {
        self.hidden
    }

    /// The most tokens of a document the model reads.
    pub fn max_tokens(&self) -> usize {
        self.max_tokens
    }

    fn encode(&self, text: &str) -> Result<Encoding, BertError> {
        // Tokenising a huge document only to truncate it wastes time: a token covers at most a
        // few dozen bytes, so a prefix is enough.
        let mut end = text.len().min(self.max_tokens * 32);
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        self.tokenizer.encode(&text[..end], true).map_err(|e| BertError::Run(format!("tokenizing: {e}")))
    }

    /// Runs the model over `texts`, `batch` documents at a time in parallel, applies `head` to each
    /// document's last hidden states (`[1, tokens, hidden]` to `[1, k]`) and returns each text's row,
    /// in the order of `texts`.
    fn run(
        &self,
        texts: &[&str],
        batch: usize,
        head: impl Fn(&Tensor) -> candle_core::Result<Tensor> + Sync,
    ) -> Result<Vec<Vec<f32>>, BertError> {
        let one = |text: &&str| -> Result<Vec<f32>, BertError> {
            let encoding = self.encode(text)?;
            let run = || -> candle_core::Result<Vec<f32>> {
                let ids = Tensor::new(encoding.get_ids(), &self.device)?.unsqueeze(0)?;
                let types = Tensor::new(encoding.get_type_ids(), &self.device)?.unsqueeze(0)?;
                head(&self.model.forward(&ids, &types, None)?)?.squeeze(0)?.to_vec1::<f32>()
            };
            run().map_err(|e| BertError::Run(e.to_string()))
        };
        let mut out = Vec::with_capacity(texts.len());
        for chunk in texts.chunks(batch.max(1)) {
            out.extend(chunk.par_iter().map(one).collect::<Result<Vec<_>, _>>()?);
        }
        Ok(out)
    }

    /// Each text's embedding: the mean of its tokens' last hidden states, L2-normalised.
    pub fn embed(&self, texts: &[&str], batch: usize) -> Result<Vec<Vec<f32>>, BertError> {
        self.run(texts, batch, |hidden| {
            let mean = hidden.mean(1)?;
            let norm = mean.sqr()?.sum_keepdim(1)?.sqrt()?.clamp(1e-12, f64::INFINITY)?;
            mean.broadcast_div(&norm)
        })
    }
}

/// A loaded sequence classifier.
pub struct BertScorer {
    encoder: Encoder,
    pooler: Option<Linear>,
    classifier: Linear,
    labels: usize,
    positive: usize,
}

impl std::fmt::Debug for BertScorer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BertScorer")
            .field("encoder", &self.encoder)
            .field("labels", &self.labels)
            .field("positive", &self.positive)
            .finish_non_exhaustive()
    }
}

/// Label names that mean "keep this document".
const POSITIVE_NAMES: [&str; 8] = ["good", "positive", "hq", "high", "high_quality", "keep", "pos", "1"];

impl BertScorer {
    /// Loads a classifier from the contents of its files, onto `device`.
    pub fn from_bytes(files: &ModelFiles<'_>, device: &Device) -> Result<Self, BertError> {
        let (config_json, config, tensors) = parse(files, device)?;
        let classifier_weight = tensors.get("classifier.weight").ok_or_else(|| {
            file_error("model.safetensors")(
                "no classifier.weight: not a sequence classifier (BertForSequenceClassification)".into(),
            )
        })?;
        let (labels, hidden) = classifier_weight.dims2().map_err(|e| file_error("model.safetensors")(e.to_string()))?;
        if hidden != config.hidden_size {
            return Err(file_error("model.safetensors")(format!(
                "classifier.weight is {labels}x{hidden} but config.json says hidden_size {}",
                config.hidden_size
            )));
        }
        let pooler_name =
            ["bert.pooler.dense", "pooler.dense"].into_iter().find(|p| tensors.contains_key(&format!("{p}.weight")));
        let vb = VarBuilder::from_tensors(tensors, DType::F32, device);
        let encoder = Encoder::load(files, &config, &vb, device)?;
        let linear = |name: &str, out: usize| -> Result<Linear, BertError> {
            candle_nn::linear(config.hidden_size, out, vb.pp(name))
                .map_err(|e| file_error("model.safetensors")(format!("{name}: {e}")))
        };
        let pooler = pooler_name.map(|p| linear(p, config.hidden_size)).transpose()?;
        let classifier = linear("classifier", labels)?;
        let positive = positive_label(&config_json, labels);
        Ok(Self { encoder, pooler, classifier, labels, positive })
    }

    /// The probability of the positive label for each text, in batches of at most `batch`.
    pub fn score_batch(&self, texts: &[&str], batch: usize) -> Result<Vec<f32>, BertError> {
        let rows = self.encoder.run(texts, batch, |hidden| {
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
            probabilities.narrow(1, self.positive, 1)
        })?;
        Ok(rows.into_iter().map(|r| r[0]).collect())
    }

    /// The probability of the positive label for one document.
    pub fn score(&self, text: &str) -> Result<f32, BertError> {
        Ok(self.score_batch(&[text], 1)?[0])
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
