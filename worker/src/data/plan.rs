//! The reduce's decisions, pure: the quality thresholds and who passes them, which documents are
//! held out, how many copies of each the mix trains on, and the order of the training stream. They
//! work on [`DocRef`]s in canonical order (input file, then record) and are tested in memory; the
//! dedup tasks (`buckets.rs`) find the duplicates, and reading the map outputs and writing the
//! shards are the reduce's (`reduce.rs`).
//!
//! Every random choice is a hash of the seed, a purpose and the document's canonical position, so
//! the plan does not depend on the number of map shards.

use std::collections::BTreeMap;

use pretrain_crd::spec::{CurriculumKey, Data, OrderStrategy, QualityClassifier};
use xxhash_rust::xxh3::xxh3_64_with_seed;

use super::keys::KeyRecord;
use super::quality::ScoreHistogram;

/// A document the map phase kept: its key record, and where its map shard left it.
#[derive(Debug, Clone, PartialEq)]
pub struct DocRef {
    /// The map shard that holds it.
    pub shard: u32,
    /// Its line in that shard's `docs.jsonl.zst`.
    pub pos: usize,
    /// Its key record.
    pub key: KeyRecord,
}

/// The quality decision: each scored category's threshold, and who passes.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct QualityCut {
    /// The threshold of each scored category (a fixed one, or that of the top fraction).
    pub thresholds: BTreeMap<String, f32>,
    /// Documents under their category's threshold, per category.
    pub removed: BTreeMap<String, u64>,
    /// Whether each document passes.
    pub passes: Vec<bool>,
}

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

/// Applies the quality thresholds (see [`quality_thresholds`]) to every document.
pub fn quality_cut(data: &Data, thresholds: BTreeMap<String, f32>, docs: &[DocRef]) -> QualityCut {
    let mut removed: BTreeMap<String, u64> = BTreeMap::new();
    let passes = docs
        .iter()
        .map(|d| {
            let keep = passes_quality(data, &thresholds, d.key.source, d.key.score);
            if !keep {
                *removed.entry(data.sources[d.key.source as usize].category().to_string()).or_default() += 1;
            }
            keep
        })
        .collect();
    QualityCut { thresholds, removed, passes }
}

/// Where one surviving document goes: held out, or `copies` times into the training stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Placement {
    /// In the held-out split (then never trained on).
    pub held_out: bool,
    /// Copies in the training stream: the category's epochs, the fraction drawn per document.
    pub copies: u32,
}

/// The held-out split and the mix.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct MixPlan {
    /// Training bytes per category before the mix.
    pub bytes_before: BTreeMap<String, u64>,
    /// Epochs of each category the mix takes.
    pub epochs: BTreeMap<String, f64>,
    /// Each document's placement; `None` for one that did not survive.
    pub placements: Vec<Option<Placement>>,
}

/// Splits off the held-out documents, then gives each category the epochs its mix weight asks for
/// (within `maxEpochs`) and each surviving document its copies.
pub fn place(data: &Data, seed: u64, docs: &[DocRef], survivor: &[bool]) -> MixPlan {
    let category_of = |d: &DocRef| data.sources[d.key.source as usize].category().to_string();
    let held_out: Vec<bool> = docs.iter().map(|d| unit(seed, 1, &d.key) < data.held_out_fraction).collect();
    let mut bytes_before: BTreeMap<String, u64> = BTreeMap::new();
    for (i, d) in docs.iter().enumerate() {
        if survivor[i] && !held_out[i] {
            *bytes_before.entry(category_of(d)).or_default() += u64::from(d.key.bytes);
        }
    }
    let epochs = mix_epochs(&bytes_before, &data.mix.weights, data.mix.max_epochs);
    let placements = docs
        .iter()
        .enumerate()
        .map(|(i, d)| {
            survivor[i].then(|| {
                let copies = if held_out[i] {
                    0
                } else {
                    let e = epochs.get(&category_of(d)).copied().unwrap_or(0.0);
                    let whole = e.floor();
                    whole as u32 + u32::from(unit(seed, 2, &d.key) < e - whole)
                };
                Placement { held_out: held_out[i], copies }
            })
        })
        .collect();
    MixPlan { bytes_before, epochs, placements }
}

/// One training copy of a document at its place in the stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamEntry {
    /// The document, as its index in canonical order.
    pub doc: usize,
    /// Which of its copies.
    pub copy: u32,
    /// The key the stream is sorted by.
    pub key: u64,
}

/// The training stream: every copy of every placed document, ordered by `data.order`: shuffled,
/// easy first, or along the in-context path (`path_position`: each document's place on the
/// traversal of [`super::order::Graph`], as a fraction of it; empty for the other orders).
///
/// A document with `c` copies (a category mixed in at more than one epoch) has copy `k` placed in
/// the `k`-th of `c` equal stretches of the run: shuffled within it, at its difficulty's quantile
/// within it for a curriculum (each epoch of the category runs easy to hard), or at its place on the
/// path (each epoch follows the path). So every category's epochs span the whole run, and copies are
/// a `c`-th of it apart. Then no training context may hold two copies of one document: a copy that
/// would land within one context (`seq_len` tokens, at 4 bytes a token) of the previous copy waits
/// until it no longer does ([`spread_copies`]).
pub fn order(
    data: &Data,
    seed: u64,
    seq_len: u32,
    docs: &[DocRef],
    placements: &[Option<Placement>],
    path_position: &[f64],
) -> Vec<StreamEntry> {
    let quantile = match data.order.strategy {
        OrderStrategy::Curriculum => difficulty_quantiles(data.order.curriculum_by, docs, placements),
        _ => Vec::new(),
    };
    let mut stream = Vec::new();
    for (i, d) in docs.iter().enumerate() {
        let Some(p) = placements[i] else { continue };
        let r = &d.key;
        for copy in 0..p.copies {
            let within = match data.order.strategy {
                OrderStrategy::Curriculum => quantile[i],
                OrderStrategy::InContext => path_position[i],
                OrderStrategy::Shuffle => to_unit(xxh3_64_with_seed(
                    &[u64::from(r.input), u64::from(r.seq), u64::from(copy)].map(u64::to_le_bytes).concat(),
                    seed ^ 3,
                )),
            };
            // A position in [0, 1): positive floats sort as their bits do.
            let at = (f64::from(copy) + within) / f64::from(p.copies);
            stream.push(StreamEntry { doc: i, copy, key: at.to_bits() });
        }
    }
    stream.sort_by_key(|e| (e.key, e.doc));
    let context_bytes = u64::from(seq_len) * 4;
    spread_copies(stream, |doc| u64::from(docs[doc].key.bytes), context_bytes, docs.len())
}

/// Each placed document's rank by difficulty (`curriculumBy`: length, or quality score), canonical
/// order on ties, as a quantile in [0, 1) (0 for documents not placed).
fn difficulty_quantiles(by: CurriculumKey, docs: &[DocRef], placements: &[Option<Placement>]) -> Vec<f64> {
    let difficulty = |d: &DocRef| match by {
        CurriculumKey::Quality => u64::from((d.key.score.clamp(0.0, 1.0) * 1e6) as u32),
        CurriculumKey::Length => u64::from(d.key.bytes),
    };
    let mut ranked: Vec<usize> = (0..docs.len()).filter(|&i| placements[i].is_some_and(|p| p.copies > 0)).collect();
    ranked.sort_by_key(|&i| (difficulty(&docs[i]), i));
    let mut quantile = vec![0.0; docs.len()];
    for (rank, &i) in ranked.iter().enumerate() {
        quantile[i] = rank as f64 / ranked.len() as f64;
    }
    quantile
}

/// The stream with every copy of a document at least `context_bytes` after the end of its previous
/// copy, so that no training context holds both: a copy that would come too soon waits, and takes
/// the first place where it no longer does; everything else keeps its order. (Only a stream too
/// short to separate them leaves copies closer, at its end.)
fn spread_copies(
    stream: Vec<StreamEntry>,
    bytes: impl Fn(usize) -> u64,
    context_bytes: u64,
    docs: usize,
) -> Vec<StreamEntry> {
    let mut out = Vec::with_capacity(stream.len());
    let mut last_end: Vec<Option<u64>> = vec![None; docs];
    let mut waiting: std::collections::VecDeque<StreamEntry> = std::collections::VecDeque::new();
    let mut offset = 0u64;
    let mut input = stream.into_iter();
    loop {
        let fits = |e: &StreamEntry, offset: u64| last_end[e.doc].is_none_or(|end| offset >= end + context_bytes);
        let next = if let Some(k) = waiting.iter().position(|e| fits(e, offset)) {
            waiting.remove(k).expect("a waiting entry")
        } else if let Some(e) = input.next() {
            if !fits(&e, offset) {
                waiting.push_back(e);
                continue;
            }
            e
        } else if let Some(e) = waiting.pop_front() {
            e
        } else {
            break;
        };
        offset += bytes(next.doc);
        last_end[next.doc] = Some(offset);
        out.push(next);
    }
    out
}

/// A uniform number in [0, 1) from the seed, a purpose, and a document's canonical position.
fn unit(seed: u64, purpose: u64, key: &KeyRecord) -> f64 {
    to_unit(xxh3_64_with_seed(&[key.doc(), purpose].map(u64::to_le_bytes).concat(), seed))
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

    fn cut_of(d: &Data, all: &[DocRef]) -> QualityCut {
        let mut scores = ScoreHistogram::default();
        all.iter().for_each(|x| scores.add(x.key.source, x.key.score));
        quality_cut(d, quality_thresholds(d, &scores), all)
    }

    #[test]
    fn the_quality_cut_keeps_the_top_fraction_of_scored_categories_only() {
        let d =
            data("quality: {classifier: ngram, referenceSources: [web], keepTopFraction: 0.5, categories: [web]}\n");
        let all = docs(140, 1);
        let cut = cut_of(&d, &all);
        assert_eq!(cut.thresholds.keys().collect::<Vec<_>>(), ["web"]);
        let kept_web = all.iter().zip(&cut.passes).filter(|(x, p)| x.key.source == 0 && **p).count();
        assert!((30..=45).contains(&kept_web), "{kept_web} of 70 web documents kept");
        assert!(all.iter().zip(&cut.passes).all(|(x, p)| x.key.source == 0 || *p), "code is not scored");
        assert_eq!(cut.removed["web"], 70 - kept_web as u64);
    }

    #[test]
    fn placement_holds_out_a_fraction_and_gives_scarce_categories_more_copies() {
        let d = data("heldOutFraction: 0.1\nmix: {weights: {web: 0.25, code: 0.75}, maxEpochs: 4}\n");
        let all = docs(2000, 1);
        let survivor = vec![true; all.len()];
        let mix = place(&d, 7, &all, &survivor);
        let held = mix.placements.iter().flatten().filter(|p| p.held_out).count();
        assert!((150..=250).contains(&held), "{held} of 2000 held out");
        assert!(mix.placements.iter().flatten().all(|p| !p.held_out || p.copies == 0));
        let copies = |source: u16| -> u32 {
            all.iter()
                .zip(&mix.placements)
                .filter(|(x, _)| x.key.source == source)
                .map(|(_, p)| p.unwrap().copies)
                .sum()
        };
        let ratio = f64::from(copies(1)) / f64::from(copies(0));
        assert!((2.7..=3.3).contains(&ratio), "code:web copies {ratio}, weights ask for 3");
        assert!(place(&d, 7, &all, &vec![false; all.len()]).placements.iter().all(Option::is_none));
    }

    #[test]
    fn the_plan_does_not_depend_on_the_number_of_map_shards() {
        for order in ["shuffle", "curriculum", "in-context"] {
            let d = data(&format!("mix: {{weights: {{web: 0.3, code: 0.7}}}}\norder: {{strategy: {order}}}\n"));
            let plan = |shards: u32| {
                let all = docs(300, shards);
                let terms: Vec<Vec<(u32, u16)>> = all.iter().map(|x| vec![(x.key.seq % 5, 1)]).collect();
                let cut = cut_of(&d, &all);
                let mix = place(&d, 11, &all, &cut.passes);
                order_of(&d, &all, &mix, &terms)
            };
            assert_eq!(plan(1), plan(4), "{order}");
            assert_eq!(plan(1), plan(16), "{order}");
        }
    }

    fn order_of(d: &Data, all: &[DocRef], mix: &MixPlan, terms: &[Vec<(u32, u16)>]) -> Vec<(u32, u32, u32)> {
        let path = super::super::order::plan(terms, &vec![true; all.len()], 11, 1.1);
        order(d, 11, 64, all, &mix.placements, &path.position)
            .into_iter()
            .map(|e| (all[e.doc].key.input, all[e.doc].key.seq, e.copy))
            .collect()
    }

    /// A category at three epochs beside one at one: in every order, no context (256 bytes here) holds
    /// two copies of a document, and the copies are spread over the run.
    #[test]
    fn copies_of_a_document_never_share_a_context_and_spread_over_the_run() {
        for strategy in ["shuffle", "curriculum", "in-context"] {
            let d = data(&format!(
                "mix: {{weights: {{web: 0.25, code: 0.75}}, maxEpochs: 3}}\norder: {{strategy: {strategy}}}\n"
            ));
            let all = docs(300, 2);
            let mix = place(&d, 5, &all, &vec![true; all.len()]);
            assert!(mix.placements.iter().flatten().any(|p| p.copies >= 2), "some documents are upsampled");
            // Related documents in pairs, so the in-context walk wants to put copies together.
            let terms: Vec<Vec<(u32, u16)>> = all.iter().map(|x| vec![(x.key.seq / 2, 3), (9999, 1)]).collect();
            let path = super::super::order::plan(&terms, &vec![true; all.len()], 5, 1.1);
            let stream = order(&d, 5, 64, &all, &mix.placements, &path.position);
            let total: u32 = mix.placements.iter().flatten().map(|p| p.copies).sum();
            assert_eq!(stream.len(), total as usize, "{strategy}: every copy once");
            let mut offset = 0u64;
            let mut seen: BTreeMap<usize, (u64, usize)> = BTreeMap::new(); // doc -> (end offset, index)
            let mut gaps = Vec::new();
            for (k, e) in stream.iter().enumerate() {
                if let Some((end, at)) = seen.get(&e.doc) {
                    assert!(offset >= end + 256, "{strategy}: two copies of document {} within a context", e.doc);
                    gaps.push(k - at);
                }
                offset += u64::from(all[e.doc].key.bytes);
                seen.insert(e.doc, (offset, k));
            }
            let mean = gaps.iter().sum::<usize>() as f64 / gaps.len() as f64;
            assert!(
                mean > stream.len() as f64 / 6.0,
                "{strategy}: copies {mean:.0} apart in a stream of {}",
                stream.len()
            );
        }
    }

    #[test]
    fn curriculum_puts_short_documents_first_and_every_copy_in_the_stream() {
        let d = data("mix: {weights: {web: 0.5, code: 0.5}}\norder: {strategy: curriculum, curriculumBy: length}\n");
        let all = docs(100, 3);
        let mix = place(&d, 1, &all, &[true; 100]);
        let stream = order(&d, 1, 64, &all, &mix.placements, &[]);
        let total: u32 = mix.placements.iter().flatten().map(|p| p.copies).sum();
        assert_eq!(stream.len(), total as usize);
        assert!(stream.windows(2).all(|w| all[w[0].doc].key.bytes <= all[w[1].doc].key.bytes));
    }
}
