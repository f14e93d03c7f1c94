//! Passkey retrieval (Mohtashami & Jaggi, 2023): a five-digit number hidden at some depth in filler
//! text of a given length; the model is asked for it at the end and must generate it. Accuracy at each
//! length shows how far the model's context really reaches; the mean log-probability of the key is a
//! finer signal for models too small to get it exactly.

use serde::Serialize;

use super::{EvalError, Request, Scorer};
use crate::tokenizer::Encoder;
use pretrain_crd::seeded::splitmix;

const INTRO: &str = "There is important info hidden inside a lot of irrelevant text. Find it and memorize it. I will quiz you about the important info there.";
const FILLER: &str = " The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again.";
const QUESTION: &str = " What is the pass key? The pass key is";
/// Tokens left free after the prompt for the answer.
const ANSWER_TOKENS: usize = 8;

/// Accuracy at one length.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PasskeyResult {
    /// Context length in tokens (prompt and answer).
    pub length: usize,
    /// Trials run (keys at evenly spread depths).
    pub trials: usize,
    /// Trials whose generated number was the key.
    pub correct: usize,
    /// `correct / trials`.
    pub accuracy: f64,
    /// Mean log-probability (nats) of the key's tokens after the prompt.
    pub key_logprob: f64,
}

/// The prompt of one trial: separator, intro, filler with the needle at `depth` (0 = first, 1 = last
/// filler position), the question; as long as fits in `length - 8` tokens. Returns the prompt and the
/// key's continuation tokens.
pub fn prompt(
    encoder: &Encoder,
    separator: u32,
    length: usize,
    key: u32,
    depth: f64,
) -> Result<(Vec<u32>, Vec<u32>), EvalError> {
    let intro = encoder.encode(INTRO)?;
    let filler = encoder.encode(FILLER)?;
    let needle = encoder.encode(&format!(" The pass key is {key}. Remember it. {key} is the pass key."))?;
    let question = encoder.encode(QUESTION)?;
    let fixed = 1 + intro.len() + needle.len() + question.len() + ANSWER_TOKENS;
    if length < fixed + filler.len() {
        return Err(EvalError::Invalid(format!(
            "passkey length {length} is too short: the prompt without filler already takes {fixed} tokens"
        )));
    }
    let repeats = (length - fixed) / filler.len();
    let before = (depth.clamp(0.0, 1.0) * repeats as f64).round() as usize;
    let mut out = Vec::with_capacity(length);
    out.push(separator);
    out.extend(&intro);
    for _ in 0..before {
        out.extend(&filler);
    }
    out.extend(&needle);
    for _ in before..repeats {
        out.extend(&filler);
    }
    out.extend(&question);
    Ok((out, encoder.encode(&format!(" {key}"))?))
}

/// Runs `trials` passkey trials at `length` tokens; keys come from `seed`.
pub fn run(
    scorer: &Scorer<'_>,
    encoder: &Encoder,
    separator: u32,
    length: usize,
    trials: usize,
    seed: u64,
) -> Result<PasskeyResult, EvalError> {
    let mut state = seed ^ length as u64;
    let mut correct = 0;
    let mut requests = Vec::with_capacity(trials);
    for t in 0..trials {
        let key = 10_000 + (splitmix(&mut state) % 90_000) as u32;
        let depth = if trials == 1 { 0.5 } else { t as f64 / (trials - 1) as f64 };
        let (ids, answer) = prompt(encoder, separator, length, key, depth)?;
        let generated = scorer.generate(&ids, ANSWER_TOKENS, &|out| {
            // Stop once a number has started and something else follows.
            let text = encoder.decode_lossy(out).unwrap_or_default();
            let trimmed = text.trim_start();
            trimmed.starts_with(|c: char| c.is_ascii_digit()) && trimmed.contains(|c: char| !c.is_ascii_digit())
        })?;
        let text = encoder.decode_lossy(&generated)?;
        let digits: String = text.trim_start().chars().take_while(char::is_ascii_digit).collect();
        if digits == key.to_string() {
            correct += 1;
        }
        requests.push(Request { context: ids, continuation: answer });
    }
    let scores = scorer.loglikelihood(&requests)?;
    let key_logprob = scores.iter().map(|s| s.logprob).sum::<f64>() / trials.max(1) as f64;
    Ok(PasskeyResult { length, trials, correct, accuracy: correct as f64 / trials.max(1) as f64, key_logprob })
}
