//! Scoring text with a model: log-likelihoods of continuations (batched) and greedy generation
//! (with a KV cache). Everything the eval stage measures is built from these two, and train's
//! probes at its checkpoints use them too.

use candle_core::{D, DType, Device, Result, Tensor};

use pretrain_crd::spec::Probe;

use crate::model::{KvCache, Llama};
use crate::tokenizer::{Encoder, EncoderError};

/// Score `continuation` after `context` (token ids; the context starts with the document separator).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// Tokens before the continuation.
    pub context: Vec<u32>,
    /// Tokens scored.
    pub continuation: Vec<u32>,
}

/// The score of one request.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Scored {
    /// Sum of the continuation's token log-probabilities (natural log).
    pub logprob: f64,
    /// Tokens scored.
    pub tokens: usize,
    /// Whether every continuation token was the model's most likely one.
    pub greedy: bool,
}

/// A model, the dtype it computes in, and how many tokens one forward pass may hold.
#[derive(Debug, Clone, Copy)]
pub struct Scorer<'a> {
    /// The model.
    pub model: &'a Llama,
    /// Compute dtype.
    pub dtype: DType,
    /// Most tokens (sequences x length) in one forward pass.
    pub batch_tokens: usize,
}

impl<'a> Scorer<'a> {
    /// A scorer over `model`.
    pub fn new(model: &'a Llama, dtype: DType) -> Self {
        Self { model, dtype, batch_tokens: 16_384 }
    }

    fn device(&self) -> &Device {
        self.model.device()
    }

    /// Log-likelihoods of each request's continuation, batched by length. A context longer than the
    /// model's positions is cut from the left; a continuation that alone exceeds them is an error.
    pub fn loglikelihood(&self, requests: &[Request]) -> Result<Vec<Scored>> {
        Ok(self
            .token_logprobs(requests)?
            .into_iter()
            .map(|(logprobs, greedy)| Scored { logprob: logprobs.iter().sum(), tokens: logprobs.len(), greedy })
            .collect())
    }

    /// The log-probability of each continuation token of each request, and whether every one was
    /// the model's most likely token ([`Scorer::loglikelihood`] before the sum).
    pub fn token_logprobs(&self, requests: &[Request]) -> Result<Vec<(Vec<f64>, bool)>> {
        let max = self.model.max_seq_len();
        let mut seqs = Vec::with_capacity(requests.len());
        for (i, r) in requests.iter().enumerate() {
            if r.continuation.is_empty() || r.continuation.len() > max {
                candle_core::bail!(
                    "request {i}: a continuation of {} tokens cannot be scored in {max} positions",
                    r.continuation.len()
                );
            }
            let mut seq: Vec<u32> = r.context.iter().chain(&r.continuation).copied().collect();
            if seq.len() > max + 1 {
                seq.drain(..seq.len() - max - 1);
            }
            if seq.len() < 2 {
                candle_core::bail!("request {i}: needs at least one context token");
            }
            seqs.push(seq);
        }
        let mut order: Vec<usize> = (0..seqs.len()).collect();
        order.sort_by_key(|&i| std::cmp::Reverse(seqs[i].len()));
        let mut out = vec![(Vec::new(), false); seqs.len()];
        let mut at = 0;
        while at < order.len() {
            let len = seqs[order[at]].len() - 1;
            let rows = (self.batch_tokens / len).max(1).min(order.len() - at);
            let batch = &order[at..at + rows];
            let mut inputs = vec![0u32; rows * len];
            let mut targets = vec![0u32; rows * len];
            for (row, &i) in batch.iter().enumerate() {
                let s = &seqs[i];
                let n = s.len() - 1;
                inputs[row * len..row * len + n].copy_from_slice(&s[..n]);
                targets[row * len..row * len + n].copy_from_slice(&s[1..]);
            }
            let device = self.device();
            let ids = Tensor::from_vec(inputs, (rows, len), device)?;
            let tgt = Tensor::from_vec(targets.clone(), (rows, len), device)?;
            let logits = self.model.forward(&ids, self.dtype)?;
            let logp = candle_nn::ops::log_softmax(&logits, D::Minus1)?;
            let picked = logp.gather(&tgt.unsqueeze(2)?, 2)?.squeeze(2)?.to_vec2::<f32>()?;
            let best = logits.argmax(D::Minus1)?.to_vec2::<u32>()?;
            for (row, &i) in batch.iter().enumerate() {
                let n = seqs[i].len() - 1;
                let span = n - requests[i].continuation.len()..n;
                out[i] = (
                    picked[row][span.clone()].iter().map(|&v| f64::from(v)).collect(),
                    span.clone().all(|p| best[row][p] == targets[row * len + p]),
                );
            }
            at += rows;
        }
        Ok(out)
    }

    /// Greedy continuation of `prompt`: up to `max_new` tokens, stopping after `stop` says so (it
    /// sees the tokens generated so far). The prompt is cut from the left to leave room.
    pub fn generate(&self, prompt: &[u32], max_new: usize, stop: &dyn Fn(&[u32]) -> bool) -> Result<Vec<u32>> {
        let max = self.model.max_seq_len();
        if prompt.is_empty() || max_new == 0 || max_new >= max {
            candle_core::bail!("cannot generate {max_new} tokens after {} in {max} positions", prompt.len());
        }
        let prompt = &prompt[prompt.len().saturating_sub(max - max_new)..];
        let device = self.device();
        let mut cache = KvCache::new();
        let mut logits =
            self.model.forward_cached(&Tensor::new(prompt, device)?.unsqueeze(0)?, &mut cache, self.dtype)?;
        let mut out = Vec::with_capacity(max_new);
        loop {
            let last = logits.get(0)?.get(logits.dim(1)? - 1)?;
            let next = last.argmax(D::Minus1)?.to_scalar::<u32>()?;
            out.push(next);
            if out.len() == max_new || stop(&out) {
                return Ok(out);
            }
            logits = self.model.forward_cached(&Tensor::new(&[[next]], device)?, &mut cache, self.dtype)?;
        }
    }
}

/// Why text could not be scored.
#[derive(Debug, thiserror::Error)]
pub enum ScoreError {
    /// The text could not be encoded.
    #[error("tokenizer: {0}")]
    Encoder(#[from] EncoderError),
    /// The tensor library failed.
    #[error("model: {0}")]
    Model(#[from] candle_core::Error),
}

/// A text request encoded as the model saw documents in training (the separator that ends the
/// previous document, then the text), split the way lm-evaluation-harness splits it: whitespace that
/// ends the context moves to the front of the continuation, the two are encoded together, and the
/// continuation is what follows the context's own tokens. So `"... the" + " ball"` and
/// `"... the " + "ball"` score the same tokens, those the model saw in training.
pub fn encode_request(
    encoder: &Encoder,
    separator: u32,
    context: &str,
    continuation: &str,
) -> std::result::Result<Request, EncoderError> {
    let trimmed = context.trim_end();
    let moved = format!("{}{continuation}", &context[trimmed.len()..]);
    let ctx = encode_prompt(encoder, separator, trimmed)?;
    let whole = encoder.encode(&format!("{trimmed}{moved}"))?;
    let continuation = whole.get(ctx.len() - 1..).unwrap_or_default().to_vec();
    Ok(Request { context: ctx, continuation })
}

/// A generation prompt as the model saw documents in training: the separator, then the context as
/// written (trailing whitespace included).
pub fn encode_prompt(encoder: &Encoder, separator: u32, context: &str) -> std::result::Result<Vec<u32>, EncoderError> {
    let mut prompt = vec![separator];
    prompt.extend(encoder.encode(context)?);
    Ok(prompt)
}

/// The log-probability (natural log) of each probe's target after its prompt.
pub fn probe_logprobs(
    scorer: &Scorer<'_>,
    encoder: &Encoder,
    separator: u32,
    probes: &[Probe],
) -> std::result::Result<Vec<f64>, ScoreError> {
    let requests = probes
        .iter()
        .map(|p| encode_request(encoder, separator, &p.prompt, &p.target))
        .collect::<std::result::Result<Vec<_>, _>>()?;
    Ok(scorer.loglikelihood(&requests)?.into_iter().map(|s| s.logprob).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{LlamaConfig, Params};

    fn model() -> Llama {
        let c = LlamaConfig { tie_embeddings: false, ..LlamaConfig::tiny(50) };
        Llama::new(c.clone(), Params::init(&c, 9, &Device::Cpu).unwrap(), 24, &Device::Cpu).unwrap()
    }

    /// log-probabilities of every next token, by a plain forward pass of one sequence.
    fn direct(model: &Llama, seq: &[u32]) -> Vec<f64> {
        let ids = Tensor::new(&seq[..seq.len() - 1], &Device::Cpu).unwrap().unsqueeze(0).unwrap();
        let logits = model.forward(&ids, DType::F32).unwrap().get(0).unwrap().to_vec2::<f32>().unwrap();
        logits
            .iter()
            .zip(&seq[1..])
            .map(|(row, &t)| {
                let m = row.iter().fold(f32::MIN, |a, &b| a.max(b)) as f64;
                let z: f64 = row.iter().map(|&v| (v as f64 - m).exp()).sum();
                row[t as usize] as f64 - m - z.ln()
            })
            .collect()
    }

    #[test]
    fn batched_scores_match_one_forward_pass_per_request() {
        let m = model();
        let requests = vec![
            Request { context: vec![1, 7, 9], continuation: vec![3, 4] },
            Request { context: vec![1], continuation: vec![5, 6, 7, 8, 9, 10] },
            Request { context: (0..30).collect(), continuation: vec![11] }, // cut from the left
        ];
        let mut scorer = Scorer::new(&m, DType::F32);
        scorer.batch_tokens = 10; // forces several batches
        let got = scorer.loglikelihood(&requests).unwrap();
        for (r, s) in requests.iter().zip(&got) {
            let mut seq: Vec<u32> = r.context.iter().chain(&r.continuation).copied().collect();
            seq.drain(..seq.len().saturating_sub(25));
            let lp = direct(&m, &seq);
            let want: f64 = lp[lp.len() - r.continuation.len()..].iter().sum();
            assert!((s.logprob - want).abs() < 1e-4, "{} vs {want}", s.logprob);
            assert_eq!(s.tokens, r.continuation.len());
        }
        let err = scorer.loglikelihood(&[Request { context: vec![1], continuation: vec![2; 30] }]).unwrap_err();
        assert!(err.to_string().contains("30 tokens cannot be scored in 24 positions"), "{err}");
    }

    #[test]
    fn greedy_generation_follows_the_argmax_and_stops() {
        let m = model();
        let scorer = Scorer::new(&m, DType::F32);
        let prompt = [1u32, 2, 3];
        let out = scorer.generate(&prompt, 5, &|_| false).unwrap();
        assert_eq!(out.len(), 5);
        // Each generated token is the argmax of a full forward pass over everything before it.
        let mut seq = prompt.to_vec();
        for &t in &out {
            let ids = Tensor::new(seq.as_slice(), &Device::Cpu).unwrap().unsqueeze(0).unwrap();
            let logits = m.forward(&ids, DType::F32).unwrap();
            let last = logits.get(0).unwrap().get(seq.len() - 1).unwrap();
            assert_eq!(last.argmax(0).unwrap().to_scalar::<u32>().unwrap(), t);
            seq.push(t);
        }
        let scored = scorer.loglikelihood(&[Request { context: prompt.to_vec(), continuation: out.clone() }]).unwrap();
        assert!(scored[0].greedy);
        assert_eq!(scorer.generate(&prompt, 5, &|o| o.len() == 2).unwrap(), out[..2]);
    }
}
