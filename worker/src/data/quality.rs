//! A fast quality classifier: hashed word unigrams and bigrams, logistic regression trained by SGD.
//!
//! Trained in the stage from labelled text (`{text, label}` JSONL) or from "reference vs. raw"
//! sources (a reference source's documents are the positive class), like the fastText classifiers of
//! DCLM and FineWeb-Edu but small enough to train in seconds on a CPU. Training is deterministic for a
//! seed. The model file is a small header followed by little-endian f32 weights.

use xxhash_rust::xxh3::xxh3_64_with_seed;

use pretrain_crd::seeded::shuffle;

/// Hash buckets of the feature space (2^20).
pub const DEFAULT_BUCKETS: u32 = 1 << 20;

const MAGIC: &[u8; 8] = b"PTQUAL01";

/// A trained classifier.
#[derive(Debug, Clone, PartialEq)]
pub struct QualityModel {
    weights: Vec<f32>,
    bias: f32,
}

/// Feature indices of a text: lowercased words and adjacent word pairs, hashed into `buckets`,
/// with duplicates kept (term frequency), normalised later by length.
pub fn features(text: &str, buckets: u32) -> Vec<u32> {
    let lower = text.to_lowercase();
    let words: Vec<&str> = lower.split(|c: char| !c.is_alphanumeric()).filter(|w| !w.is_empty()).collect();
    let mut out = Vec::with_capacity(words.len() * 2);
    let mut previous = 0u64;
    for w in &words {
        let h = xxh3_64_with_seed(w.as_bytes(), 1);
        out.push((h % u64::from(buckets)) as u32);
        if previous != 0 {
            let pair = xxh3_64_with_seed(&h.to_le_bytes(), previous);
            out.push((pair % u64::from(buckets)) as u32);
        }
        previous = h;
    }
    out
}

fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

/// Training settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Training {
    /// Feature buckets.
    pub buckets: u32,
    /// Passes over the data.
    pub epochs: u32,
    /// SGD step size.
    pub learning_rate: f32,
    /// L2 penalty per step.
    pub l2: f32,
    /// Shuffling seed.
    pub seed: u64,
}

impl Default for Training {
    fn default() -> Self {
        Self { buckets: DEFAULT_BUCKETS, epochs: 5, learning_rate: 0.5, l2: 1e-6, seed: 1234 }
    }
}

/// Why a model could not be trained or loaded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QualityError {
    /// Training needs examples of both classes.
    #[error("training needs documents of both classes; got {positive} positive and {negative} negative")]
    OneClass {
        /// Positive examples.
        positive: usize,
        /// Negative examples.
        negative: usize,
    },
    /// The model file is not one of ours, or is damaged.
    #[error("not a quality model: {0}")]
    BadModel(String),
}

impl QualityModel {
    /// Trains on `(text, is_good)` examples.
    pub fn train(examples: &[(&str, bool)], cfg: Training) -> Result<Self, QualityError> {
        let positive = examples.iter().filter(|e| e.1).count();
        let negative = examples.len() - positive;
        if positive == 0 || negative == 0 {
            return Err(QualityError::OneClass { positive, negative });
        }
        let featurised: Vec<(Vec<u32>, f32)> =
            examples.iter().map(|(t, y)| (features(t, cfg.buckets), if *y { 1.0 } else { 0.0 })).collect();
        // Balance the classes so a skewed corpus does not just learn the majority.
        let weight = |y: f32| if y > 0.5 { 0.5 / positive as f32 } else { 0.5 / negative as f32 };
        let scale = examples.len() as f32;
        let mut model = Self { weights: vec![0.0; cfg.buckets as usize], bias: 0.0 };
        let mut order: Vec<usize> = (0..featurised.len()).collect();
        let mut state = cfg.seed;
        for epoch in 0..cfg.epochs {
            shuffle(&mut order, &mut state);
            let lr = cfg.learning_rate / (1.0 + epoch as f32);
            for &i in &order {
                let (x, y) = &featurised[i];
                let p = model.raw_score(x);
                let g = (p - y) * weight(*y) * scale;
                let per_feature = lr * g / (x.len().max(1) as f32).sqrt();
                for &f in x {
                    let w = &mut model.weights[f as usize];
                    *w -= per_feature + lr * cfg.l2 * *w;
                }
                model.bias -= lr * g * 0.1;
            }
        }
        Ok(model)
    }

    fn raw_score(&self, x: &[u32]) -> f32 {
        let norm = (x.len().max(1) as f32).sqrt();
        let dot: f32 = x.iter().map(|&f| self.weights[f as usize]).sum::<f32>() / norm;
        sigmoid(dot + self.bias)
    }

    /// Probability that a text is of the positive (good) class.
    pub fn score(&self, text: &str) -> f32 {
        self.raw_score(&features(text, self.weights.len() as u32))
    }

    /// The model as bytes: magic, bucket count, bias, weights.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(16 + self.weights.len() * 4);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&(self.weights.len() as u32).to_le_bytes());
        out.extend_from_slice(&self.bias.to_le_bytes());
        for w in &self.weights {
            out.extend_from_slice(&w.to_le_bytes());
        }
        out
    }

    /// Reads a model written by `to_bytes`, checking its size against its header.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, QualityError> {
        if bytes.len() < 16 || &bytes[..8] != MAGIC {
            return Err(QualityError::BadModel("wrong magic".into()));
        }
        let buckets = u32::from_le_bytes(bytes[8..12].try_into().expect("4 bytes")) as usize;
        if buckets == 0 || bytes.len() != 16 + buckets * 4 {
            return Err(QualityError::BadModel(format!(
                "{} bytes, expected {} for {buckets} buckets",
                bytes.len(),
                16 + buckets * 4
            )));
        }
        let bias = f32::from_le_bytes(bytes[12..16].try_into().expect("4 bytes"));
        let weights = bytes[16..].chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes"))).collect();
        Ok(Self { weights, bias })
    }
}

/// The scores at or above which the top `fraction` of `scores` lie (keep-top-fraction per category).
pub fn top_fraction_threshold(scores: &[f32], fraction: f64) -> f32 {
    if scores.is_empty() {
        return f32::INFINITY;
    }
    let mut sorted = scores.to_vec();
    sorted.sort_by(|a, b| b.total_cmp(a));
    let keep = ((scores.len() as f64 * fraction).ceil() as usize).clamp(1, scores.len());
    sorted[keep - 1]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn prose(i: usize) -> String {
        let subjects = ["The committee", "Our research team", "The city council", "A small company", "The author"];
        let verbs = ["published", "reviewed", "announced", "discussed", "explained"];
        let objects = [
            "a detailed report on water quality",
            "the results of a long study",
            "new guidelines for schools",
            "a plan to improve public transport",
            "the history of the region",
        ];
        format!(
            "{} {} {} on Tuesday. {} also {} {} in the following weeks, and the response was thoughtful.",
            subjects[i % 5],
            verbs[(i / 5) % 5],
            objects[(i / 25) % 5],
            subjects[(i + 2) % 5],
            verbs[(i + 3) % 5],
            objects[(i + 1) % 5]
        )
    }

    fn spam(i: usize) -> String {
        let words =
            ["cheap", "click", "buy", "now", "free", "casino", "win", "best", "price", "deal", "viagra", "online"];
        (0..25).map(|k| words[(i * 7 + k * 5) % words.len()]).collect::<Vec<_>>().join(" ") + " !!! $$$ >>> click here"
    }

    #[test]
    fn learns_to_separate_prose_from_spam_and_generalises() {
        let train: Vec<(String, bool)> = (0..100).flat_map(|i| [(prose(i), true), (spam(i), false)]).collect();
        let examples: Vec<(&str, bool)> = train.iter().map(|(t, y)| (t.as_str(), *y)).collect();
        let model = QualityModel::train(&examples, Training { buckets: 1 << 16, ..Training::default() }).unwrap();
        let correct = (100..125)
            .map(|i| usize::from(model.score(&prose(i)) > 0.5) + usize::from(model.score(&spam(i)) < 0.5))
            .sum::<usize>();
        assert!(correct >= 48, "held-out accuracy {correct}/50");
    }

    #[test]
    fn training_is_deterministic_and_models_round_trip() {
        let examples = [("good clean sentence here.", true), ("buy cheap now now now", false)];
        let cfg = Training { buckets: 1024, ..Training::default() };
        let a = QualityModel::train(&examples, cfg).unwrap();
        let b = QualityModel::train(&examples, cfg).unwrap();
        assert_eq!(a, b);
        let bytes = a.to_bytes();
        assert_eq!(QualityModel::from_bytes(&bytes).unwrap(), a);
        assert!(QualityModel::from_bytes(&bytes[..bytes.len() - 4]).is_err());
        assert!(QualityModel::from_bytes(b"PTQUAL02xxxxxxxx").is_err());
        assert_eq!(
            QualityModel::train(&[("only good", true)], cfg),
            Err(QualityError::OneClass { positive: 1, negative: 0 })
        );
    }

    #[test]
    fn top_fraction_threshold_keeps_the_best() {
        let scores = [0.1, 0.9, 0.5, 0.7, 0.3];
        assert_eq!(top_fraction_threshold(&scores, 0.4), 0.7);
        assert_eq!(top_fraction_threshold(&scores, 1.0), 0.1);
        assert_eq!(top_fraction_threshold(&scores, 0.01), 0.9);
    }
}
