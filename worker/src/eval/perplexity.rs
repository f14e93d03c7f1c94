//! Held-out perplexity and bits per byte, per category and over all, with a unigram baseline.

use std::collections::BTreeMap;

use serde::Serialize;

use super::{EvalError, Request, Scorer};
use crate::tokens::TokenStream;

type Result<T, E = EvalError> = std::result::Result<T, E>;

/// Held-out perplexity of one category (or all).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Perplexity {
    /// Documents scored.
    pub documents: u64,
    /// Tokens predicted (each document's end-of-sequence token included).
    pub tokens: u64,
    /// UTF-8 bytes of the documents' text.
    pub bytes: u64,
    /// Summed negative log-likelihood, nats.
    pub nll: f64,
    /// Mean NLL per token.
    pub loss: f64,
    /// `exp(loss)`.
    pub perplexity: f64,
    /// The NLL of the text's own tokens (the end-of-sequence predictions left out, as they have no
    /// bytes), in bits per UTF-8 byte of the text: comparable across tokenizers.
    pub bits_per_byte: f64,
    /// Mean NLL per token of the same tokens under the training data's unigram distribution: the
    /// loss of a model that ignores context (the baseline a trained model must beat).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unigram_loss: Option<f64>,
}

impl Perplexity {
    /// From the summed NLL of every predicted token (`nll`) and of the text's tokens alone
    /// (`text_nll`: without the end-of-sequence predictions).
    fn new(documents: u64, tokens: u64, bytes: u64, (nll, text_nll): (f64, f64)) -> Self {
        let loss = nll / tokens.max(1) as f64;
        Self {
            documents,
            tokens,
            bytes,
            nll,
            loss,
            perplexity: loss.exp(),
            bits_per_byte: text_nll / std::f64::consts::LN_2 / bytes.max(1) as f64,
            unigram_loss: None,
        }
    }
}

/// Natural-log unigram probabilities of the training tokens (add-one smoothed), counted over at most
/// `cap` tokens of the shards.
pub fn unigram_logprobs(stream: &TokenStream, vocab: usize, cap: u64) -> Vec<f64> {
    let mut counts = vec![1u64; vocab];
    let n = stream.len().min(cap);
    let mut buf = Vec::with_capacity(1 << 20);
    let mut at = 0;
    while at < n {
        buf.clear();
        let take = (n - at).min(1 << 20);
        stream.read(at, take, &mut buf);
        for &t in &buf {
            if let Some(c) = counts.get_mut(t as usize) {
                *c += 1;
            }
        }
        at += take;
    }
    let total: u64 = counts.iter().sum();
    counts.iter().map(|&c| (c as f64 / total as f64).ln()).collect()
}

/// Adds each category's unigram loss: the mean NLL of its tokens (after the leading separator, as
/// [`perplexity`] predicts them) under `logprobs`.
pub fn add_unigram(report: &mut BTreeMap<String, Perplexity>, docs: &[HeldOutDoc], logprobs: &[f64]) {
    let mut all = (0.0, 0u64);
    let mut by_category: BTreeMap<&str, (f64, u64)> = BTreeMap::new();
    for d in docs {
        let e = by_category.entry(&d.category).or_default();
        for &t in &d.tokens {
            let lp = logprobs.get(t as usize).copied().unwrap_or(f64::NEG_INFINITY);
            e.0 -= lp;
            e.1 += 1;
        }
    }
    for (category, (nll, n)) in by_category {
        all = (all.0 + nll, all.1 + n);
        if let Some(p) = report.get_mut(category) {
            p.unigram_loss = Some(nll / n.max(1) as f64);
        }
    }
    if let Some(p) = report.get_mut("all") {
        p.unigram_loss = Some(all.0 / all.1.max(1) as f64);
    }
}

/// One held-out document, encoded.
#[derive(Debug, Clone)]
pub struct HeldOutDoc {
    /// Category.
    pub category: String,
    /// Text.
    pub text: String,
    /// Tokens, the separator appended.
    pub tokens: Vec<u32>,
}

/// Perplexity per category and over all (`"all"`): each category's documents back to back as in
/// training (after a leading separator), cut into windows of `seq_len` predicted tokens.
pub fn perplexity(
    scorer: &Scorer<'_>,
    docs: &[HeldOutDoc],
    separator: u32,
    seq_len: usize,
) -> Result<BTreeMap<String, Perplexity>> {
    let mut by_category: BTreeMap<&str, Vec<&HeldOutDoc>> = BTreeMap::new();
    for d in docs {
        by_category.entry(&d.category).or_default().push(d);
    }
    let mut out = BTreeMap::new();
    let (mut all_docs, mut all_tokens, mut all_bytes, mut all_nll) = (0, 0, 0, (0.0, 0.0));
    for (category, docs) in by_category {
        let mut stream = vec![separator];
        for d in &docs {
            stream.extend(&d.tokens);
        }
        let requests: Vec<Request> = (0..stream.len() - 1)
            .step_by(seq_len)
            .map(|start| {
                let end = (start + seq_len + 1).min(stream.len());
                Request { context: vec![stream[start]], continuation: stream[start + 1..end].to_vec() }
            })
            .collect();
        let (mut nll, mut text_nll) = (0.0, 0.0);
        for (request, (logprobs, _)) in requests.iter().zip(scorer.token_logprobs(&requests)?) {
            for (&target, lp) in request.continuation.iter().zip(logprobs) {
                nll -= lp;
                if target != separator {
                    text_nll -= lp;
                }
            }
        }
        let tokens = stream.len() as u64 - 1;
        let bytes: u64 = docs.iter().map(|d| d.text.len() as u64).sum();
        out.insert(category.to_string(), Perplexity::new(docs.len() as u64, tokens, bytes, (nll, text_nll)));
        (all_docs, all_tokens, all_bytes) = (all_docs + docs.len() as u64, all_tokens + tokens, all_bytes + bytes);
        all_nll = (all_nll.0 + nll, all_nll.1 + text_nll);
    }
    out.insert("all".into(), Perplexity::new(all_docs, all_tokens, all_bytes, all_nll));
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unigram_loss_is_the_mean_nll_of_each_category_s_tokens() {
        let doc =
            |category: &str, tokens: Vec<u32>| HeldOutDoc { category: category.into(), text: String::new(), tokens };
        let docs = vec![doc("web", vec![0, 1, 1]), doc("code", vec![2])];
        let logprobs = [0.5f64.ln(), 0.25f64.ln(), 0.25f64.ln()];
        let mut report: BTreeMap<String, Perplexity> =
            ["web", "code", "all"].iter().map(|c| (c.to_string(), Perplexity::new(1, 1, 1, (1.0, 1.0)))).collect();
        add_unigram(&mut report, &docs, &logprobs);
        let close = |a: Option<f64>, b: f64| (a.unwrap() - b).abs() < 1e-12;
        assert!(close(report["web"].unigram_loss, -(0.5f64.ln() + 2.0 * 0.25f64.ln()) / 3.0));
        assert!(close(report["code"].unigram_loss, -(0.25f64.ln())));
        assert!(close(report["all"].unigram_loss, -(0.5f64.ln() + 3.0 * 0.25f64.ln()) / 4.0));
    }
}
