//! A fast quality classifier: hashed word unigrams and bigrams, logistic regression trained by SGD.
//!
//! Trained in the stage from labelled text (`{text, label}` JSONL) or from "reference vs. raw"
//! sources (a reference source's documents are the positive class), like the fastText classifiers of
//! DCLM and FineWeb-Edu but small enough to train in seconds on a CPU. Training is deterministic for a
//! seed. The model file is a small header followed by little-endian f32 weights.

use std::collections::BTreeMap;

use pretrain_store::artifact::ClassifierEval;
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

/// A logistic-regression head over document embeddings: FineWeb-Edu's recipe of a linear head on a
/// frozen BERT-family encoder. Saved as safetensors under `BertForSequenceClassification`'s names
/// for a single output (`classifier.weight` `[1, dim]`, `classifier.bias` `[1]`).
#[derive(Debug, Clone, PartialEq)]
pub struct LinearHead {
    weight: Vec<f32>,
    bias: f32,
}

/// Training settings of a [`LinearHead`]: full-batch gradient descent with Adam, so the result
/// depends only on the examples.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct HeadTraining {
    /// Gradient steps.
    pub steps: u32,
    /// Adam's step size.
    pub learning_rate: f64,
    /// L2 penalty on the weights.
    pub l2: f64,
}

impl Default for HeadTraining {
    fn default() -> Self {
        Self { steps: 400, learning_rate: 0.05, l2: 1e-4 }
    }
}

impl LinearHead {
    /// Trains on `(embedding, is_good)` examples, the two classes weighted equally.
    pub fn train(examples: &[(&[f32], bool)], cfg: HeadTraining) -> Result<Self, QualityError> {
        let positive = examples.iter().filter(|e| e.1).count();
        let negative = examples.len() - positive;
        if positive == 0 || negative == 0 {
            return Err(QualityError::OneClass { positive, negative });
        }
        let dim = examples[0].0.len();
        let class_weight = |y: bool| if y { 0.5 / positive as f64 } else { 0.5 / negative as f64 };
        // Parameters: the weights, then the bias.
        let mut theta = vec![0f64; dim + 1];
        let (mut m, mut v) = (vec![0f64; dim + 1], vec![0f64; dim + 1]);
        let (beta1, beta2, eps) = (0.9f64, 0.999f64, 1e-8);
        for step in 1..=cfg.steps {
            let mut grad = vec![0f64; dim + 1];
            for (x, y) in examples {
                let z: f64 = x.iter().zip(&theta).map(|(a, w)| f64::from(*a) * w).sum::<f64>() + theta[dim];
                let p = 1.0 / (1.0 + (-z).exp());
                let g = (p - if *y { 1.0 } else { 0.0 }) * class_weight(*y);
                for (gi, xi) in grad.iter_mut().zip(x.iter()) {
                    *gi += g * f64::from(*xi);
                }
                grad[dim] += g;
            }
            for (gi, w) in grad.iter_mut().zip(&theta).take(dim) {
                *gi += cfg.l2 * w;
            }
            let (c1, c2) = (1.0 - beta1.powi(step as i32), 1.0 - beta2.powi(step as i32));
            for i in 0..=dim {
                m[i] = beta1 * m[i] + (1.0 - beta1) * grad[i];
                v[i] = beta2 * v[i] + (1.0 - beta2) * grad[i] * grad[i];
                theta[i] -= cfg.learning_rate * (m[i] / c1) / ((v[i] / c2).sqrt() + eps);
            }
        }
        Ok(Self { weight: theta[..dim].iter().map(|w| *w as f32).collect(), bias: theta[dim] as f32 })
    }

    /// The embedding width the head takes.
    pub fn dim(&self) -> usize {
        self.weight.len()
    }

    /// Probability that the document with this embedding is of the positive (good) class.
    pub fn score(&self, embedding: &[f32]) -> f32 {
        let z: f32 = embedding.iter().zip(&self.weight).map(|(a, w)| a * w).sum::<f32>() + self.bias;
        sigmoid(z)
    }

    /// The head as safetensors.
    pub fn to_bytes(&self) -> Vec<u8> {
        let device = candle_core::Device::Cpu;
        let weight = candle_core::Tensor::from_vec(self.weight.clone(), (1, self.weight.len()), &device);
        let bias = candle_core::Tensor::from_vec(vec![self.bias], 1, &device);
        let tensors = [("classifier.weight", weight.expect("shape matches")), ("classifier.bias", bias.expect("1"))];
        safetensors::serialize(tensors.iter().map(|(n, t)| (*n, t)), None).expect("serialising f32 tensors")
    }

    /// Reads a head written by `to_bytes`.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, QualityError> {
        let bad = |e: String| QualityError::BadModel(format!("linear head: {e}"));
        let tensors =
            candle_core::safetensors::load_buffer(bytes, &candle_core::Device::Cpu).map_err(|e| bad(e.to_string()))?;
        let get = |name: &str| -> Result<Vec<f32>, QualityError> {
            let t = tensors.get(name).ok_or_else(|| bad(format!("no {name}")))?;
            t.flatten_all().and_then(|t| t.to_vec1::<f32>()).map_err(|e| bad(format!("{name}: {e}")))
        };
        let (weight, bias) = (get("classifier.weight")?, get("classifier.bias")?);
        if weight.is_empty() || bias.len() != 1 {
            return Err(bad(format!("{} weights and {} biases; expected [1, dim] and [1]", weight.len(), bias.len())));
        }
        Ok(Self { weight, bias: bias[0] })
    }
}

/// Whether a labelled example is held out from training to measure the classifier: a fifth of
/// them, by a hash of the text and the seed (the same split for every classifier and shard).
pub fn held_out(text: &str, seed: u64) -> bool {
    xxh3_64_with_seed(text.as_bytes(), seed ^ 0x9e1d_0a7c).is_multiple_of(5)
}

/// Precision, recall, F1 and AUC at `threshold`, and the score deciles of each class, for held-out
/// `(score, is_good)` pairs.
pub fn evaluate(classifier: &str, scored: &[(f32, bool)], train_examples: [u64; 2], threshold: f32) -> ClassifierEval {
    let positives = scored.iter().filter(|s| s.1).count() as u64;
    let negatives = scored.len() as u64 - positives;
    let true_positive = scored.iter().filter(|(s, y)| *y && *s >= threshold).count() as f64;
    let predicted = scored.iter().filter(|(s, _)| *s >= threshold).count() as f64;
    let ratio = |a: f64, b: f64| if b > 0.0 { a / b } else { 0.0 };
    let (precision, recall) = (ratio(true_positive, predicted), ratio(true_positive, positives as f64));
    let f1 = ratio(2.0 * precision * recall, precision + recall);
    // AUC by ranks (ties count half): the Mann-Whitney U statistic over positives x negatives.
    let mut ranked: Vec<(f32, bool)> = scored.to_vec();
    ranked.sort_by(|a, b| a.0.total_cmp(&b.0));
    let (mut rank_sum, mut i) = (0f64, 0usize);
    while i < ranked.len() {
        let j = ranked[i..].iter().position(|r| r.0 != ranked[i].0).map_or(ranked.len(), |k| i + k);
        let mean_rank = (i + j + 1) as f64 / 2.0; // ranks i+1..=j
        rank_sum += mean_rank * ranked[i..j].iter().filter(|r| r.1).count() as f64;
        i = j;
    }
    let pairs = positives as f64 * negatives as f64;
    let auc = ratio(rank_sum - positives as f64 * (positives as f64 + 1.0) / 2.0, pairs);
    let mut positive_histogram = vec![0u64; 10];
    let mut negative_histogram = vec![0u64; 10];
    for (s, y) in scored {
        let bin = ((s * 10.0) as usize).min(9);
        let histogram = if *y { &mut positive_histogram } else { &mut negative_histogram };
        histogram[bin] += 1;
    }
    ClassifierEval {
        classifier: classifier.into(),
        train_examples,
        heldout_examples: [positives, negatives],
        threshold,
        precision,
        recall,
        f1,
        auc,
        positive_histogram,
        negative_histogram,
    }
}

/// Quality scores per source, counted in fine bins (the top 24 bits of the score's order-preserving
/// bit pattern, about 5 significant digits): each map task writes its own (`scores.bin`), and their
/// sum gives the keep-top-fraction thresholds without any task holding every score.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ScoreHistogram(BTreeMap<(u16, u32), u64>);

/// A score's bit pattern, ordered as the scores are.
fn ordered_bits(score: f32) -> u32 {
    let bits = score.to_bits();
    if bits & 0x8000_0000 != 0 { !bits } else { bits | 0x8000_0000 }
}

/// The smallest score of bin `bin`.
fn bin_floor(bin: u32) -> f32 {
    let ordered = bin << 8;
    if ordered & 0x8000_0000 != 0 { f32::from_bits(ordered & 0x7fff_ffff) } else { f32::from_bits(!ordered) }
}

impl ScoreHistogram {
    /// Counts one document of source `source`.
    pub fn add(&mut self, source: u16, score: f32) {
        *self.0.entry((source, ordered_bits(score) >> 8)).or_default() += 1;
    }

    /// Adds another task's counts.
    pub fn merge(&mut self, other: &Self) {
        for (k, n) in &other.0 {
            *self.0.entry(*k).or_default() += n;
        }
    }

    /// The stored form: `(source, bin, count)` as three little-endian `u64`s each.
    pub fn to_bytes(&self) -> Vec<u8> {
        self.0.iter().flat_map(|((s, b), n)| [u64::from(*s), u64::from(*b), *n]).flat_map(u64::to_le_bytes).collect()
    }

    /// Reads the stored form; `None` if it is not one.
    pub fn parse(bytes: &[u8]) -> Option<Self> {
        if !bytes.len().is_multiple_of(24) {
            return None;
        }
        let mut h = Self::default();
        for e in bytes.chunks_exact(24) {
            let word = |i: usize| u64::from_le_bytes(e[i * 8..i * 8 + 8].try_into().expect("8 bytes"));
            let key = (u16::try_from(word(0)).ok()?, u32::try_from(word(1)).ok()?);
            *h.0.entry(key).or_default() += word(2);
        }
        Some(h)
    }

    /// The score at or above which each scored category's top `fraction` lies: the floor of the bin
    /// where the count from the top reaches the fraction (so at least that fraction is kept, and at
    /// most one bin more). `category` names each source's category; `scored` says which are scored.
    pub fn top_fraction_thresholds(
        &self,
        fraction: f64,
        category: impl Fn(u16) -> String,
        scored: impl Fn(&str) -> bool,
    ) -> BTreeMap<String, f32> {
        let mut bins: BTreeMap<String, BTreeMap<u32, u64>> = BTreeMap::new();
        for ((source, bin), n) in &self.0 {
            let c = category(*source);
            if scored(&c) {
                *bins.entry(c).or_default().entry(*bin).or_default() += n;
            }
        }
        bins.into_iter()
            .map(|(c, bins)| {
                let total: u64 = bins.values().sum();
                let keep = ((total as f64 * fraction).ceil() as u64).clamp(1, total.max(1));
                let mut seen = 0;
                let bin = bins.iter().rev().find(|(_, n)| {
                    seen += **n;
                    seen >= keep
                });
                (c, bin.map_or(f32::INFINITY, |(b, _)| bin_floor(*b)))
            })
            .collect()
    }
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

    /// Two clusters of unit vectors, a little apart: the head separates them on held-out points,
    /// is deterministic and round-trips through safetensors.
    #[test]
    fn a_linear_head_learns_embedding_classes_and_round_trips() {
        let point = |i: u64, good: bool| -> Vec<f32> {
            let mut state = i * 2 + u64::from(good);
            let mut v: Vec<f32> =
                (0..16).map(|_| (pretrain_crd::seeded::splitmix(&mut state) % 1000) as f32 / 1000.0 - 0.5).collect();
            v[3] += if good { 0.4 } else { -0.4 };
            let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
            v.iter().map(|x| x / n).collect()
        };
        let train: Vec<(Vec<f32>, bool)> =
            (0..200).flat_map(|i| [(point(i, true), true), (point(i, false), false)]).collect();
        let examples: Vec<(&[f32], bool)> = train.iter().map(|(x, y)| (x.as_slice(), *y)).collect();
        let head = LinearHead::train(&examples, HeadTraining::default()).unwrap();
        assert_eq!(head, LinearHead::train(&examples, HeadTraining::default()).unwrap(), "deterministic");
        let scored: Vec<(f32, bool)> = (1000..1100)
            .flat_map(|i| [(head.score(&point(i, true)), true), (head.score(&point(i, false)), false)])
            .collect();
        let eval = evaluate("bert-head", &scored, [200, 200], 0.5);
        assert!(eval.f1 > 0.9 && eval.auc > 0.95, "{eval:?}");
        assert_eq!(eval.heldout_examples, [100, 100]);
        assert_eq!(eval.positive_histogram.iter().sum::<u64>(), 100);
        assert_eq!(LinearHead::from_bytes(&head.to_bytes()).unwrap(), head);
        assert!(LinearHead::from_bytes(b"nonsense").is_err());
        assert!(LinearHead::train(&examples[..1], HeadTraining::default()).is_err());
    }

    #[test]
    fn evaluation_counts_precision_recall_and_auc() {
        let scored = [(0.9, true), (0.8, false), (0.7, true), (0.2, true), (0.1, false), (0.1, false)];
        let eval = evaluate("ngram", &scored, [0, 0], 0.5);
        assert!((eval.precision - 2.0 / 3.0).abs() < 1e-12);
        assert!((eval.recall - 2.0 / 3.0).abs() < 1e-12);
        assert!((eval.f1 - 2.0 / 3.0).abs() < 1e-12);
        // Positive-negative pairs won: 0.9 beats all 3, 0.7 beats 2, 0.2 beats 2: 7 of 9.
        assert!((eval.auc - 7.0 / 9.0).abs() < 1e-12, "{}", eval.auc);
        assert_eq!(eval.positive_histogram, [0, 0, 1, 0, 0, 0, 0, 1, 0, 1]);
        let tied = evaluate("ngram", &[(0.5, true), (0.5, false)], [0, 0], 0.5);
        assert!((tied.auc - 0.5).abs() < 1e-12);
    }

    #[test]
    fn top_fraction_thresholds_keep_the_best_from_merged_histograms() {
        let (mut a, mut b) = (ScoreHistogram::default(), ScoreHistogram::default());
        for (i, s) in [0.1f32, 0.9, 0.5, 0.7, 0.3, -2.0, 3.5].into_iter().enumerate() {
            if i % 2 == 0 { &mut a } else { &mut b }.add(0, s);
        }
        b.add(1, 0.42);
        a.merge(&ScoreHistogram::parse(&b.to_bytes()).unwrap());
        let at = |fraction: f64| {
            a.top_fraction_thresholds(fraction, |s| ["web", "code"][usize::from(s)].to_string(), |c| c == "web")
        };
        let kept = |t: f32| [0.1f32, 0.9, 0.5, 0.7, 0.3, -2.0, 3.5].iter().filter(|s| **s >= t).count();
        assert_eq!(kept(at(3.0 / 7.0)["web"]), 3);
        assert_eq!(kept(at(1.0)["web"]), 7, "negative scores too");
        assert_eq!(kept(at(0.01)["web"]), 1);
        assert!(!at(0.5).contains_key("code"), "code is not scored");
        // The floor is within 5 significant digits of the score that decides.
        assert!((at(3.0 / 7.0)["web"] - 0.7).abs() < 1e-4 && at(3.0 / 7.0)["web"] <= 0.7);
        assert_eq!(ScoreHistogram::parse(&[1, 2, 3]), None);
    }
}
