//! data-prep's decisions, pure: the quality thresholds and who passes them, which documents are
//! held out, how many copies of each the mix trains on, each copy's position in the training stream
//! and so its output shard, and how copies of one document are kept a context apart. Each is a
//! function of one document, the seed and small sums the cluster task makes (the mix's epochs, the
//! difficulty histogram), so any route task decides any document alone; they are tested in memory.
//!
//! Every random choice is a hash of the seed, a purpose and the document's canonical position
//! (input file, then record), so the plan does not depend on the number of map shards or tasks.

use std::collections::{BTreeMap, HashMap, VecDeque};

use pretrain_crd::spec::{CurriculumKey, Data, OrderStrategy, QualityClassifier};
use xxhash_rust::xxh3::xxh3_64_with_seed;

use super::keys::KeyRecord;
use super::quality::ScoreHistogram;

/// The quality threshold of each scored category under `data.quality`: the fixed threshold, or
/// the floor of each category's top fraction in the map tasks' summed score histograms. Empty when
/// no classifier runs.
pub fn quality_thresholds(data: &Data, scores: &ScoreHistogram) -> BTreeMap<String, f32> {
    let q = &data.quality;
    if q.classifier == QualityClassifier::None {
        return BTreeMap::new();
    }
    let category = |s: u16| data.sources.get(usize::from(s)).map_or_else(String::new, |x| x.category().to_string());
    let scored = |c: &str| q.categories.is_empty() || q.categories.iter().any(|x| x == c);
    match q.keep_top_fraction {
        Some(fraction) => scores.top_fraction_thresholds(fraction, category, scored),
        None => (0..data.sources.len() as u16)
            .map(category)
            .filter(|c| scored(c))
            .map(|c| (c, q.threshold as f32))
            .collect(),
    }
}

/// Whether a document of source `source` with quality score `score` passes `thresholds`.
pub fn passes_quality(data: &Data, thresholds: &BTreeMap<String, f32>, source: u16, score: f32) -> bool {
    data.sources.get(usize::from(source)).and_then(|s| thresholds.get(s.category())).is_none_or(|t| score >= *t)
}

/// Whether document `doc` (its canonical id, [`KeyRecord::doc`]) is held out: a hash of the seed and
/// the id, so any task decides it alone.
pub fn held_out(data: &Data, seed: u64, doc: u64) -> bool {
    unit(seed, 1, doc) < data.held_out_fraction
}

/// The held-out file (of `shards`) a held-out document goes to.
pub fn held_out_shard(seed: u64, doc: u64, shards: u32) -> u32 {
    ((unit(seed, 5, doc) * f64::from(shards)) as u32).min(shards.saturating_sub(1))
}

/// Copies of a training document whose category the mix takes at `epochs`: the whole epochs, and
/// one more with the fraction's probability.
pub fn copies(seed: u64, epochs: f64, doc: u64) -> u32 {
    let whole = epochs.floor();
    whole as u32 + u32::from(unit(seed, 2, doc) < epochs - whole)
}

/// A document's difficulty for a curriculum (`curriculumBy`): its length, or its quality score.
pub fn difficulty(by: CurriculumKey, bytes: u32, score: f32) -> f32 {
    match by {
        CurriculumKey::Length => bytes as f32,
        CurriculumKey::Quality => score.clamp(0.0, 1.0),
    }
}

/// The training documents counted by difficulty, in bins of about 1% (a difficulty's top 16 bits,
/// ordered): at most 65,536 bins, whatever the corpus. Tasks count their documents; the sums give
/// every document its quantile ([`Quantiles`]).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DifficultyHistogram(BTreeMap<u32, u64>);

/// The bin of a difficulty (not negative).
fn difficulty_bin(d: f32) -> u32 {
    d.max(0.0).to_bits() >> 16
}

impl DifficultyHistogram {
    /// Counts one document.
    pub fn add(&mut self, d: f32) {
        *self.0.entry(difficulty_bin(d)).or_default() += 1;
    }

    /// Uncounts one document counted before (a near duplicate found later).
    pub fn remove(&mut self, d: f32) {
        if let Some(n) = self.0.get_mut(&difficulty_bin(d)) {
            *n = n.saturating_sub(1);
        }
    }

    /// Adds another task's counts.
    pub fn merge(&mut self, other: &Self) {
        for (bin, n) in &other.0 {
            *self.0.entry(*bin).or_default() += n;
        }
    }

    /// The stored form: `(bin, count)` as two little-endian `u64`s each.
    pub fn to_bytes(&self) -> Vec<u8> {
        self.0.iter().flat_map(|(b, n)| [u64::from(*b), *n]).flat_map(u64::to_le_bytes).collect()
    }

    /// Reads the stored form; `None` if it is not one.
    pub fn parse(bytes: &[u8]) -> Option<Self> {
        if !bytes.len().is_multiple_of(16) {
            return None;
        }
        let mut h = Self::default();
        for e in bytes.chunks_exact(16) {
            let bin = u32::try_from(u64::from_le_bytes(e[..8].try_into().expect("8 bytes"))).ok()?;
            *h.0.entry(bin).or_default() += u64::from_le_bytes(e[8..].try_into().expect("8 bytes"));
        }
        Some(h)
    }

    /// Each bin's place among all the documents.
    pub fn quantiles(&self) -> Quantiles {
        let mut below = 0;
        let mut bins = BTreeMap::new();
        for (bin, n) in &self.0 {
            bins.insert(*bin, (below, *n));
            below += n;
        }
        Quantiles { bins, total: below }
    }
}

/// Where each difficulty bin begins among all the training documents, and how many it holds.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Quantiles {
    bins: BTreeMap<u32, (u64, u64)>,
    total: u64,
}

impl Quantiles {
    /// The quantile in [0, 1) of a document of difficulty `d`, spread within its bin by `u` (a
    /// uniform number of the document's own).
    pub fn at(&self, d: f32, u: f64) -> f64 {
        let (below, n) = self.bins.get(&difficulty_bin(d)).copied().unwrap_or((self.total, 0));
        ((below as f64 + n as f64 * u) / self.total.max(1) as f64).min(1.0 - f64::EPSILON)
    }
}

/// Each training copy's position in the stream, in [0, 1), by `data.order`: the whole stream sorts
/// by it, and it decides the output shard ([`output_shard`]), so any task places any copy alone.
///
/// A document with `c` copies (a category mixed in at more than one epoch) has copy `k` in the `k`-th
/// of `c` equal stretches of the run: shuffled within it, at its difficulty's quantile within it for a
/// curriculum (each epoch of the category runs easy to hard), or at its place on the in-context path
/// (each epoch follows the path). So every category's epochs span the whole run, and a document's
/// copies are a `c`-th of the run apart.
#[derive(Debug, Clone)]
pub struct StreamOrder {
    strategy: OrderStrategy,
    by: CurriculumKey,
    seed: u64,
    quantiles: Quantiles,
}

impl StreamOrder {
    /// The order of `data`, with the training documents' difficulties (for a curriculum).
    pub fn new(data: &Data, seed: u64, difficulties: &DifficultyHistogram) -> Self {
        let quantiles = difficulties.quantiles();
        Self { strategy: data.order.strategy, by: data.order.curriculum_by, seed, quantiles }
    }

    /// The position of copy `copy` of `copies` of the document of `record`; `path` is its place on
    /// the in-context path (used by that order only).
    pub fn position(&self, record: &KeyRecord, copy: u32, copies: u32, path: f64) -> f64 {
        let doc = record.doc();
        let within = match self.strategy {
            OrderStrategy::Curriculum => {
                self.quantiles.at(difficulty(self.by, record.bytes, record.score), unit(self.seed, 4, doc))
            }
            OrderStrategy::InContext => path,
            OrderStrategy::Shuffle => to_unit(xxh3_64_with_seed(
                &[doc >> 32, doc & 0xffff_ffff, u64::from(copy)].map(u64::to_le_bytes).concat(),
                self.seed ^ 3,
            )),
        };
        (f64::from(copy) + within) / f64::from(copies.max(1))
    }
}

/// The output shard (of `shards`) of a stream position: equal stretches of positions, so the shards
/// hold about equal numbers of copies.
pub fn output_shard(position: f64, shards: u32) -> u32 {
    ((position * f64::from(shards)) as u32).min(shards.saturating_sub(1))
}

/// The stream of one output shard, with every copy of a document at least `context_bytes` after the
/// end of its previous copy, so that no training context holds both: a copy that would come too soon
/// waits, and takes the first place where it no longer does; everything else keeps its order. (Only
/// a shard too short to separate them leaves copies closer, at its end. Copies in different shards
/// are a `c`-th of the run apart, so only a run shorter than `c` contexts could put two in one.)
///
/// Memory: the documents of the last context, and the copies waiting.
#[derive(Debug)]
pub struct Spread<T> {
    context_bytes: u64,
    offset: u64,
    /// The end of each document's last copy, for the copies within one context of the offset.
    recent: HashMap<u64, u64>,
    ends: VecDeque<(u64, u64)>,
    waiting: VecDeque<(u64, u64, T)>,
}

impl<T> Spread<T> {
    /// An empty stream.
    pub fn new(context_bytes: u64) -> Self {
        Self { context_bytes, offset: 0, recent: HashMap::new(), ends: VecDeque::new(), waiting: VecDeque::new() }
    }

    fn fits(&self, doc: u64) -> bool {
        self.recent.get(&doc).is_none_or(|end| self.offset >= end + self.context_bytes)
    }

    fn emit(&mut self, doc: u64, bytes: u64, item: T, out: &mut impl FnMut(T)) {
        self.offset += bytes;
        self.recent.insert(doc, self.offset);
        self.ends.push_back((self.offset, doc));
        while let Some(&(end, d)) = self.ends.front() {
            if end + self.context_bytes > self.offset {
                break;
            }
            self.ends.pop_front();
            if self.recent.get(&d) == Some(&end) {
                self.recent.remove(&d);
            }
        }
        out(item);
    }

    /// Emits the waiting copies that fit now, first come first.
    fn drain(&mut self, out: &mut impl FnMut(T)) {
        while let Some(k) = self.waiting.iter().position(|(doc, _, _)| self.fits(*doc)) {
            let (doc, bytes, item) = self.waiting.remove(k).expect("a waiting copy");
            self.emit(doc, bytes, item, out);
        }
    }

    /// The next copy in position order: document `doc`, `bytes` of text.
    pub fn push(&mut self, doc: u64, bytes: u64, item: T, out: &mut impl FnMut(T)) {
        self.drain(out);
        if self.fits(doc) {
            self.emit(doc, bytes, item, out);
        } else {
            self.waiting.push_back((doc, bytes, item));
        }
    }

    /// The copies still waiting, at the end of the shard.
    pub fn finish(mut self, out: &mut impl FnMut(T)) {
        loop {
            self.drain(out);
            let Some((doc, bytes, item)) = self.waiting.pop_front() else { return };
            self.emit(doc, bytes, item, out);
        }
    }
}

/// A uniform number in [0, 1) from the seed, a purpose, and a document's canonical position.
fn unit(seed: u64, purpose: u64, doc: u64) -> f64 {
    to_unit(xxh3_64_with_seed(&[doc, purpose].map(u64::to_le_bytes).concat(), seed))
}

/// A hash as a uniform number in [0, 1) (its top 53 bits).
fn to_unit(h: u64) -> f64 {
    (h >> 11) as f64 / (1u64 << 53) as f64
}

/// Epochs per category so that categories get `weights` shares of the bytes: the largest total that
/// keeps every category within `max_epochs`, and no larger than needed to use the most plentiful
/// category once. Empty weights keep the natural proportions (one epoch each).
pub fn mix_epochs(
    bytes: &BTreeMap<String, u64>,
    weights: &BTreeMap<String, f64>,
    max_epochs: f64,
) -> BTreeMap<String, f64> {
    if weights.is_empty() {
        return bytes.keys().map(|c| (c.clone(), 1.0)).collect();
    }
    let total_weight: f64 = weights.iter().filter(|(c, _)| bytes.get(*c).is_some_and(|b| *b > 0)).map(|(_, w)| w).sum();
    if total_weight <= 0.0 {
        return bytes.keys().map(|c| (c.clone(), 0.0)).collect();
    }
    let share = |c: &str| weights.get(c).copied().unwrap_or(0.0) / total_weight;
    let mut use_all = 0.0f64; // total bytes if the most plentiful category is used once
    let mut cap = f64::INFINITY; // total bytes allowed by max_epochs
    for (c, &b) in bytes {
        let s = share(c);
        if s > 0.0 && b > 0 {
            use_all = use_all.max(b as f64 / s);
            cap = cap.min(b as f64 * max_epochs / s);
        }
    }
    let total = use_all.min(cap);
    bytes.iter().map(|(c, &b)| (c.clone(), if b == 0 { 0.0 } else { share(c) * total / b as f64 })).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mix_upsamples_scarce_categories_within_max_epochs() {
        let bytes: BTreeMap<String, u64> = [("web".into(), 900), ("code".into(), 100)].into();
        let weights: BTreeMap<String, f64> = [("web".into(), 0.5), ("code".into(), 0.5)].into();
        let e = mix_epochs(&bytes, &weights, 4.0);
        // Using all web (900) at 50% would need 9 epochs of code; capped at 4 -> total 800.
        assert!((e["code"] - 4.0).abs() < 1e-9, "{e:?}");
        assert!((e["web"] - 400.0 / 900.0).abs() < 1e-9, "{e:?}");
        let natural = mix_epochs(&bytes, &BTreeMap::new(), 4.0);
        assert_eq!(natural["web"], 1.0);
        let generous = mix_epochs(&bytes, &weights, 10.0);
        assert!((generous["web"] - 1.0).abs() < 1e-9 && (generous["code"] - 9.0).abs() < 1e-9);
    }

    /// A document the map phase kept: its key record, and where its map shard left it.
    #[derive(Debug, Clone, PartialEq)]
    struct DocRef {
        shard: u32,
        pos: usize,
        key: KeyRecord,
    }

    fn data(yaml: &str) -> Data {
        let base = "sources:\n  - {name: web, url: /in/web.jsonl}\n  - {name: code, url: /in/code.jsonl}\n";
        serde_yaml::from_str(&format!("{base}{yaml}")).unwrap()
    }

    /// `n` documents in canonical order, alternating web and code, spread over `shards` map shards
    /// (as a map phase with that many tasks would leave them).
    fn docs(n: u32, shards: u32) -> Vec<DocRef> {
        (0..n)
            .map(|i| DocRef {
                shard: i % shards,
                pos: (i / shards) as usize,
                key: KeyRecord {
                    input: i / 10,
                    seq: i % 10,
                    source: (i % 2) as u16,
                    bytes: 100 + i,
                    score: (i % 7) as f32 / 7.0,
                    exact: u128::from(i % 50),
                },
            })
            .collect()
    }

    /// The thresholds from `all`'s scores, and whether each document passes them.
    fn cut_of(d: &Data, all: &[DocRef]) -> (BTreeMap<String, f32>, Vec<bool>) {
        let mut scores = ScoreHistogram::default();
        all.iter().for_each(|x| scores.add(x.key.source, x.key.score));
        let thresholds = quality_thresholds(d, &scores);
        let passes = all.iter().map(|x| passes_quality(d, &thresholds, x.key.source, x.key.score)).collect();
        (thresholds, passes)
    }

    #[test]
    fn the_quality_cut_keeps_the_top_fraction_of_scored_categories_only() {
        let d =
            data("quality: {classifier: ngram, referenceSources: [web], keepTopFraction: 0.5, categories: [web]}\n");
        let all = docs(140, 1);
        let (thresholds, passes) = cut_of(&d, &all);
        assert_eq!(thresholds.keys().collect::<Vec<_>>(), ["web"]);
        let kept_web = all.iter().zip(&passes).filter(|(x, p)| x.key.source == 0 && **p).count();
        assert!((30..=45).contains(&kept_web), "{kept_web} of 70 web documents kept");
        assert!(all.iter().zip(&passes).all(|(x, p)| x.key.source == 0 || *p), "code is not scored");
    }

    #[test]
    fn placement_holds_out_a_fraction_and_gives_scarce_categories_more_copies() {
        let d = data("heldOutFraction: 0.1\n");
        let held = (0..2000u64).filter(|&doc| held_out(&d, 7, doc << 32)).count();
        assert!((150..=250).contains(&held), "{held} of 2000 held out");
        let shards: Vec<u32> = (0..2000u64).map(|doc| held_out_shard(7, doc, 4)).collect();
        assert!((0..4).all(|k| shards.iter().filter(|s| **s == k).count() > 400), "held-out files about equal");
        let total = |epochs: f64| (0..2000u64).map(|doc| copies(7, epochs, doc)).sum::<u32>();
        assert_eq!(total(3.0), 6000);
        assert!((2700..=3300).contains(&total(1.5)), "{}", total(1.5));
        assert_eq!(total(0.0), 0);
    }

    /// The stream of `all` under `d`: every copy's position, sorted, cut into `shards` output shards,
    /// each spread; as (document index, copy) in stream order.
    fn stream(d: &Data, all: &[DocRef], epochs: f64, path: &[f64], shards: u32) -> Vec<(usize, u32)> {
        let mut difficulties = DifficultyHistogram::default();
        let by = d.order.curriculum_by;
        all.iter().for_each(|x| difficulties.add(difficulty(by, x.key.bytes, x.key.score)));
        let order = StreamOrder::new(d, 5, &difficulties);
        let mut copies_of: Vec<(f64, usize, u32)> = Vec::new();
        for (i, x) in all.iter().enumerate() {
            let c = copies(5, epochs, x.key.doc());
            for copy in 0..c {
                copies_of.push((order.position(&x.key, copy, c, path.get(i).copied().unwrap_or(0.0)), i, copy));
            }
        }
        copies_of.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
        let mut out = Vec::new();
        for k in 0..shards {
            let mut spread = Spread::new(256);
            let mut emit = |item| out.push(item);
            for &(at, i, copy) in copies_of.iter().filter(|c| output_shard(c.0, shards) == k) {
                assert!((0.0..1.0).contains(&at));
                spread.push(all[i].key.doc(), u64::from(all[i].key.bytes), (i, copy), &mut emit);
            }
            spread.finish(&mut emit);
        }
        out
    }

    /// A category at three epochs: in every order, no context (256 bytes here) holds two copies of a
    /// document, every copy is in the stream once, and the copies are spread over the run.
    #[test]
    fn copies_of_a_document_never_share_a_context_and_spread_over_the_run() {
        for strategy in ["shuffle", "curriculum", "in-context"] {
            let d = data(&format!("order: {{strategy: {strategy}}}\n"));
            let all = docs(300, 2);
            // Related documents in pairs, so the in-context walk wants to put copies together.
            // (Terms are hashes, spread over the features.)
            let terms: Vec<Vec<(u32, u16)>> =
                all.iter().map(|x| vec![((x.key.seq / 2).wrapping_mul(0x9e37_79b9), 3), (u32::MAX, 1)]).collect();
            let walk =
                super::super::order::plan(&super::super::order::embed(&terms, &vec![true; all.len()]), 5, 1.1).path;
            let mut path = vec![0.0; all.len()];
            walk.iter().enumerate().for_each(|(rank, &i)| path[i] = rank as f64 / walk.len() as f64);
            for shards in [1, 3] {
                let s = stream(&d, &all, 2.5, &path, shards);
                let total: u32 = all.iter().map(|x| copies(5, 2.5, x.key.doc())).sum();
                assert_eq!(s.len(), total as usize, "{strategy}: every copy once");
                let mut offset = 0u64;
                let mut seen: BTreeMap<usize, (u64, usize)> = BTreeMap::new(); // doc -> (end offset, index)
                let mut gaps = Vec::new();
                for (k, &(i, _)) in s.iter().enumerate() {
                    if let Some((end, at)) = seen.get(&i) {
                        assert!(offset >= end + 256, "{strategy}: two copies of document {i} within a context");
                        gaps.push(k - at);
                    }
                    offset += u64::from(all[i].key.bytes);
                    seen.insert(i, (offset, k));
                }
                let mean = gaps.iter().sum::<usize>() as f64 / gaps.len() as f64;
                assert!(mean > s.len() as f64 / 4.0, "{strategy}: copies {mean:.0} apart in a stream of {}", s.len());
            }
        }
    }

    #[test]
    fn a_copy_too_close_to_the_last_waits_until_a_context_has_passed() {
        let mut out = Vec::new();
        let mut spread = Spread::new(100);
        let mut emit = |x| out.push(x);
        for (doc, bytes) in [(1, 60), (1, 60), (2, 60), (3, 60), (4, 60)] {
            spread.push(doc, bytes, (doc, bytes), &mut emit);
        }
        spread.finish(&mut emit);
        // Document 1's second copy waits until 100 bytes (two documents) are past its first.
        assert_eq!(out.iter().map(|x| x.0).collect::<Vec<_>>(), [1, 2, 3, 1, 4]);
    }

    #[test]
    fn curriculum_puts_short_documents_first_and_every_copy_in_the_stream() {
        let d = data("order: {strategy: curriculum, curriculumBy: length}\n");
        let all = docs(100, 3);
        let s = stream(&d, &all, 1.0, &[], 4);
        assert_eq!(s.len(), 100);
        assert!(s.windows(2).all(|w| all[w[0].0].key.bytes <= all[w[1].0].key.bytes));
        let h = {
            let mut h = DifficultyHistogram::default();
            [0.5f32, 0.25, 0.5, 1e9].iter().for_each(|x| h.add(*x));
            h.remove(1e9);
            h
        };
        assert_eq!(DifficultyHistogram::parse(&h.to_bytes()), Some(h.clone()));
        let q = h.quantiles();
        assert_eq!((q.at(0.25, 0.5), q.at(0.5, 0.0), q.at(0.5, 0.5)), (1.0 / 6.0, 1.0 / 3.0, 2.0 / 3.0));
    }
}
