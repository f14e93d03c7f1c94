//! In-context pretraining order, after Shi et al. (2024), "In-Context Pretraining: Language Modeling
//! Beyond Document Boundaries": embed every document, find each one's nearest neighbours
//! approximately, drop near-identical neighbours (semantic dedup), then traverse the neighbour graph
//! once, visiting every document once, each step to the most similar unvisited neighbour. The stream
//! follows that path; the train loader cuts it into contexts of `train.seqLen` tokens, so related
//! documents share contexts without any guess at bytes per token.
//!
//! - **Embedding.** The paper embeds with Contriever; we use a cheaper, documented one: TF-IDF over
//!   each document's [`TERMS_PER_DOCUMENT`] most frequent words (sublinear term frequency), hashed
//!   into [`FEATURES`] features whose document frequencies fit one fixed table ([`Idf`]), projected to [`DIMS`] dimensions by a random ±1 projection (Achlioptas 2003; inner products are
//!   kept within about 1/sqrt(DIMS)), L2-normalised. Thousands of times cheaper than a transformer
//!   pass, and it ranks neighbours by shared distinctive vocabulary, which is what topical
//!   relatedness means here.
//! - **Neighbours.** Random-hyperplane LSH (Charikar 2002): each of [`TABLES`] tables sorts the
//!   documents by a [`BITS`]-bit sign signature; the [`WINDOW`] documents on either side of a document
//!   in each sorted table are its candidates, scored by exact cosine; the [`NEIGHBOURS`] best are
//!   kept. N log N (the sorts) plus N x candidates, never N^2. (The paper uses FAISS.)
//! - **Semantic dedup.** A document whose neighbour earlier in canonical order (and itself kept) is
//!   at cosine `semanticDedup` or more is dropped, as near-identical.
//! - **Traversal.** The paper's greedy walk: start at the unvisited document fewest others list as
//!   a neighbour, go to the most similar unvisited neighbour while there is one, else start again.
//! - **Partitions, at scale.** The graph and walk of a partition are held in memory, so a large
//!   corpus is split by topic first, as SemDeDup (Abbas et al. 2023) splits before its dedup:
//!   spherical [`kmeans`] on a sample of the embeddings, each document to its [`nearest`] centroid,
//!   each partition planned alone, and the partitions in the order of a path through their
//!   centroids ([`centroid_path`]).
//!
//! Everything is a function of the documents and the seed: no dependence on shard counts or threads.

use std::collections::HashMap;

use rayon::prelude::*;
use xxhash_rust::xxh3::xxh3_64_with_seed;

use pretrain_crd::seeded::splitmix;

/// Terms kept per document.
pub const TERMS_PER_DOCUMENT: usize = 32;
/// Embedding dimensions.
pub const DIMS: usize = 128;
/// LSH tables.
pub const TABLES: usize = 8;
/// Signature bits per table.
pub const BITS: usize = 32;
/// Candidates on either side of a document in each table's order.
pub const WINDOW: usize = 6;
/// Neighbours kept per document.
pub const NEIGHBOURS: usize = 8;

/// The most frequent content words of a text, hashed: (term, count), by count then term.
pub fn top_terms(text: &str) -> Vec<(u32, u16)> {
    let mut counts: HashMap<u32, u16> = HashMap::new();
    for word in text.split(|c: char| !c.is_alphanumeric()) {
        if word.chars().count() < 3 {
            continue; // short words are mostly function words
        }
        let lower = word.to_lowercase();
        let term = xxh3_64_with_seed(lower.as_bytes(), 11) as u32;
        let c = counts.entry(term).or_default();
        *c = c.saturating_add(1);
    }
    let mut terms: Vec<(u32, u16)> = counts.into_iter().collect();
    terms.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    terms.truncate(TERMS_PER_DOCUMENT);
    terms
}

/// Bits of a hashed feature: terms are hashed into `2^FEATURE_BITS` features (the hashing trick, as
/// scikit-learn's `HashingVectorizer` does), so document frequencies fit one fixed-size table
/// whatever the corpus's vocabulary.
pub const FEATURE_BITS: u32 = 22;
/// Hashed features.
pub const FEATURES: usize = 1 << FEATURE_BITS;

/// The feature of a hashed term.
pub fn feature(term: u32) -> u32 {
    term >> (32 - FEATURE_BITS)
}

/// Each document's distinct features.
pub fn features(terms: &[(u32, u16)]) -> impl Iterator<Item = u32> + '_ {
    let mut seen: Vec<u32> = terms.iter().map(|(t, _)| feature(*t)).collect();
    seen.sort_unstable();
    seen.dedup();
    seen.into_iter()
}

/// Smoothed inverse document frequencies of the features: `ln((1 + n) / (1 + df)) + 1`.
#[derive(Debug, Clone, PartialEq)]
pub struct Idf {
    weights: Vec<f32>,
}

impl Idf {
    /// From each feature's document frequency (`FEATURES` counts) among `documents`.
    pub fn from_counts(df: &[u64], documents: u64) -> Self {
        let n = documents as f64;
        Self { weights: df.iter().map(|&d| (((1.0 + n) / (1.0 + d as f64)).ln() + 1.0) as f32).collect() }
    }

    /// Over the `included` documents' terms.
    pub fn of(terms: &[Vec<(u32, u16)>], included: &[bool]) -> Self {
        let mut df = vec![0u64; FEATURES];
        for (doc, _) in terms.iter().zip(included).filter(|(_, keep)| **keep) {
            features(doc).for_each(|f| df[f as usize] += 1);
        }
        Self::from_counts(&df, included.iter().filter(|k| **k).count() as u64)
    }

    /// The stored form: `FEATURES` little-endian `f32`.
    pub fn to_bytes(&self) -> Vec<u8> {
        self.weights.iter().flat_map(|w| w.to_le_bytes()).collect()
    }

    /// The stored form read back; `None` unless it holds `FEATURES` weights.
    pub fn parse(bytes: &[u8]) -> Option<Self> {
        (bytes.len() == FEATURES * 4).then(|| Self { weights: floats(bytes) })
    }
}

/// Little-endian `f32`s.
pub fn floats(bytes: &[u8]) -> Vec<f32> {
    bytes.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes"))).collect()
}

/// One document's unit embedding (`DIMS` floats, into `v`; zeros for a document without terms):
/// its terms' sublinear frequencies times their features' IDF, each along its feature's random ±1
/// direction.
pub fn embed_document(terms: &[(u32, u16)], idf: &Idf, v: &mut [f32]) {
    v.fill(0.0);
    for (t, count) in terms {
        let f = feature(*t);
        let weight = ((1.0 + f64::from(*count).ln()) * f64::from(idf.weights[f as usize])) as f32;
        // The feature's random ±1 direction: DIMS sign bits drawn from it.
        let mut state = u64::from(f) ^ 0x5eed_1c0d;
        for block in v.chunks_mut(64) {
            let bits = splitmix(&mut state);
            for (d, x) in block.iter_mut().enumerate() {
                *x += if bits >> d & 1 == 1 { weight } else { -weight };
            }
        }
    }
    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    if norm > 0.0 {
        v.iter_mut().for_each(|x| *x /= norm);
    }
}

/// Unit embeddings of the `included` documents, `DIMS` floats each (zeros for the others), with
/// the IDF of the included documents.
pub fn embed(terms: &[Vec<(u32, u16)>], included: &[bool]) -> Vec<f32> {
    let idf = Idf::of(terms, included);
    let mut out = vec![0f32; terms.len() * DIMS];
    out.par_chunks_mut(DIMS).zip(terms.par_iter().zip(included)).for_each(|(v, (doc, keep))| {
        if *keep {
            embed_document(doc, &idf, v);
        }
    });
    out
}

/// The inner product.
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// Each document's nearest neighbours, most similar first (ties: lower index first).
#[derive(Debug, Clone, PartialEq)]
pub struct Graph {
    /// `NEIGHBOURS` entries per document: (neighbour, cosine); `u32::MAX` pads.
    edges: Vec<(u32, f32)>,
}

impl Graph {
    /// The approximate k-nearest-neighbour graph of the `included` documents' `embeddings`.
    pub fn build(embeddings: &[f32], included: &[bool], seed: u64) -> Self {
        let n = included.len();
        let members: Vec<u32> = (0..n as u32).filter(|&i| included[i as usize]).collect();
        let vector = |i: u32| &embeddings[i as usize * DIMS..(i as usize + 1) * DIMS];
        // Each table: the members sorted by their signature; a document's candidates are its
        // WINDOW neighbours on either side, in its table's slots (u32::MAX where there are fewer).
        let slots = TABLES * 2 * WINDOW;
        let mut candidates = vec![u32::MAX; n * slots];
        for table in 0..TABLES {
            // BITS random ±1 hyperplanes.
            let mut state = seed ^ 0x15c0_7ab1e ^ (table as u64) << 40;
            let planes: Vec<f32> = (0..BITS * DIMS / 64)
                .flat_map(|_| {
                    let bits = splitmix(&mut state);
                    (0..64).map(move |d| if bits >> d & 1 == 1 { 1.0 } else { -1.0 })
                })
                .collect();
            let signature = |v: &[f32]| -> u32 {
                planes
                    .chunks(DIMS)
                    .enumerate()
                    .fold(0u32, |s, (b, plane)| s | u32::from(dot(v, plane) >= 0.0) << (BITS - 1 - b))
            };
            let mut sorted: Vec<(u32, u32)> = members.par_iter().map(|&i| (signature(vector(i)), i)).collect();
            sorted.par_sort_unstable();
            for (at, &(_, i)) in sorted.iter().enumerate() {
                let (from, to) = (at.saturating_sub(WINDOW), (at + WINDOW + 1).min(sorted.len()));
                let mine = &mut candidates[i as usize * slots + table * 2 * WINDOW..][..2 * WINDOW];
                for (slot, j) in mine.iter_mut().zip(sorted[from..to].iter().map(|s| s.1).filter(|&j| j != i)) {
                    *slot = j;
                }
            }
        }
        let mut edges = vec![(u32::MAX, 0f32); n * NEIGHBOURS];
        edges.par_chunks_mut(NEIGHBOURS).zip(candidates.par_chunks(slots)).enumerate().for_each(|(i, (out, c))| {
            let mut c: Vec<u32> = c.iter().copied().filter(|&j| j != u32::MAX).collect();
            c.sort_unstable();
            c.dedup();
            let mut scored: Vec<(u32, f32)> = c.iter().map(|&j| (j, dot(vector(i as u32), vector(j)))).collect();
            scored.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
            for (slot, edge) in out.iter_mut().zip(scored) {
                *slot = edge;
            }
        });
        Self { edges }
    }

    /// The neighbours of document `i`, most similar first.
    pub fn neighbours(&self, i: usize) -> impl Iterator<Item = (usize, f32)> + '_ {
        self.edges[i * NEIGHBOURS..(i + 1) * NEIGHBOURS]
            .iter()
            .take_while(|e| e.0 != u32::MAX)
            .map(|e| (e.0 as usize, e.1))
    }

    /// Documents to drop as near-identical to a neighbour before them in canonical order that is
    /// itself kept: cosine at least `threshold`.
    pub fn semantic_duplicates(&self, included: &[bool], threshold: f32) -> Vec<bool> {
        let mut dropped = vec![false; included.len()];
        for i in 0..included.len() {
            dropped[i] = included[i]
                && self
                    .neighbours(i)
                    .any(|(j, similarity)| j < i && !dropped[j] && included[j] && similarity >= threshold);
        }
        dropped
    }

    /// One traversal of the `included` documents, each visited once: start at the unvisited document
    /// fewest others list as a neighbour (lowest index on ties), step to the most similar unvisited
    /// neighbour while there is one, then start again.
    pub fn traverse(&self, included: &[bool]) -> Vec<usize> {
        let n = included.len();
        let mut in_links = vec![0u32; n];
        for i in (0..n).filter(|&i| included[i]) {
            for (j, _) in self.neighbours(i) {
                in_links[j] += 1;
            }
        }
        let mut starts: Vec<usize> = (0..n).filter(|&i| included[i]).collect();
        starts.sort_unstable_by_key(|&i| (in_links[i], i));
        let mut visited = vec![false; n];
        let mut path = Vec::with_capacity(starts.len());
        for start in starts {
            if visited[start] {
                continue;
            }
            let mut current = start;
            loop {
                visited[current] = true;
                path.push(current);
                match self.neighbours(current).find(|&(j, _)| included[j] && !visited[j]) {
                    Some((next, _)) => current = next,
                    None => break,
                }
            }
        }
        path
    }
}

/// The mean cosine similarity of consecutive documents of `path`.
pub fn adjacent_similarity(embeddings: &[f32], path: &[usize]) -> f64 {
    let vector = |i: usize| &embeddings[i * DIMS..(i + 1) * DIMS];
    let total: f64 = path.windows(2).map(|w| f64::from(dot(vector(w[0]), vector(w[1])))).sum();
    total / path.len().saturating_sub(1).max(1) as f64
}

/// The in-context plan of one partition.
#[derive(Debug, Clone, PartialEq)]
pub struct PathPlan {
    /// Documents dropped as near-identical to an earlier neighbour.
    pub dropped: Vec<bool>,
    /// The kept documents, in the order of the path.
    pub path: Vec<usize>,
    /// The sum of the cosines of consecutive documents on the path.
    pub similarity: f64,
}

/// Plans the path over unit `embeddings` (`DIMS` floats a document, in canonical order): builds
/// their neighbour graph, drops semantic duplicates at cosine `threshold` (above 1: none) and
/// traverses the rest.
pub fn plan(embeddings: &[f32], seed: u64, threshold: f32) -> PathPlan {
    let included = vec![true; embeddings.len() / DIMS];
    let graph = Graph::build(embeddings, &included, seed);
    let dropped = graph.semantic_duplicates(&included, threshold);
    let kept: Vec<bool> = dropped.iter().map(|d| !d).collect();
    let path = graph.traverse(&kept);
    let similarity = adjacent_similarity(embeddings, &path) * path.len().saturating_sub(1) as f64;
    PathPlan { dropped, path, similarity }
}

/// The mean cosine of two distinct documents drawn at random from `n` unit vectors whose sum is
/// `sum`: `(|sum|^2 - n) / (n (n - 1))`, the baseline the in-context path is measured against.
pub fn random_pair_similarity(sum: &[f64], n: u64) -> f64 {
    if n < 2 {
        return 0.0;
    }
    let n = n as f64;
    (sum.iter().map(|x| x * x).sum::<f64>() - n) / (n * (n - 1.0))
}

/// The index of the centroid (`DIMS` floats each) most similar to `v` (the first on ties).
pub fn nearest(v: &[f32], centroids: &[f32]) -> usize {
    let mut best = (0, f32::NEG_INFINITY);
    for (i, c) in centroids.chunks_exact(DIMS).enumerate() {
        let s = dot(v, c);
        if s > best.1 {
            best = (i, s);
        }
    }
    best.0
}

/// Spherical k-means (Lloyd's iterations on cosine similarity) of unit `vectors` into `k` unit
/// centroids, starting from the first `k` vectors (the sample is in hash order, so they are a
/// random choice); a centroid that loses every vector keeps its place. Deterministic.
pub fn kmeans(vectors: &[f32], k: usize, iterations: usize) -> Vec<f32> {
    let mut centroids = vectors[..k * DIMS].to_vec();
    for _ in 0..iterations {
        let assigned: Vec<usize> = vectors.par_chunks_exact(DIMS).map(|v| nearest(v, &centroids)).collect();
        let mut sums = vec![0f64; k * DIMS];
        for (v, &c) in vectors.chunks_exact(DIMS).zip(&assigned) {
            sums[c * DIMS..(c + 1) * DIMS].iter_mut().zip(v).for_each(|(s, x)| *s += f64::from(*x));
        }
        let mut moved = false;
        for (c, sum) in centroids.chunks_exact_mut(DIMS).zip(sums.chunks_exact(DIMS)) {
            let norm = sum.iter().map(|x| x * x).sum::<f64>().sqrt();
            if norm > 0.0 {
                for (x, s) in c.iter_mut().zip(sum) {
                    let next = (s / norm) as f32;
                    moved |= next != *x;
                    *x = next;
                }
            }
        }
        if !moved {
            break;
        }
    }
    centroids
}

/// The centroids (`DIMS` floats each) in the order of a greedy path: from the first, each step to
/// the most similar one not yet visited (the first on ties).
pub fn centroid_path(centroids: &[f32]) -> Vec<usize> {
    let k = centroids.len() / DIMS;
    let vector = |i: usize| &centroids[i * DIMS..(i + 1) * DIMS];
    let mut visited = vec![false; k];
    let mut path = Vec::with_capacity(k);
    let mut current = 0;
    while path.len() < k {
        visited[current] = true;
        path.push(current);
        let next = (0..k).filter(|&j| !visited[j]).map(|j| (j, dot(vector(current), vector(j)))).fold(
            None,
            |best: Option<(usize, f32)>, (j, s)| match best {
                Some((_, b)) if b >= s => best,
                _ => Some((j, s)),
            },
        );
        match next {
            Some((j, _)) => current = j,
            None => break,
        }
    }
    path
}

/// The partitions of in-context order at scale: spherical k-means centroids of a sample of the
/// embeddings, after centring them on the sample's mean (documents share common words, so their
/// embeddings share a direction; a centroid near it would draw most documents, and partitions would
/// be uneven), in the order of a path through them.
#[derive(Debug, Clone, PartialEq)]
pub struct Partitions {
    mean: Vec<f32>,
    centroids: Vec<f32>,
}

impl Partitions {
    /// `k` partitions of the unit `sample` embeddings (`DIMS` floats each, in a random order), by
    /// `iterations` Lloyd iterations.
    pub fn fit(sample: &[f32], k: usize, iterations: usize) -> Self {
        let n = sample.len() / DIMS;
        let mut mean = vec![0f64; DIMS];
        for v in sample.chunks_exact(DIMS) {
            mean.iter_mut().zip(v).for_each(|(m, x)| *m += f64::from(*x));
        }
        let mean: Vec<f32> = mean.iter().map(|m| (m / n.max(1) as f64) as f32).collect();
        let mut centred = sample.to_vec();
        for v in centred.chunks_exact_mut(DIMS) {
            v.iter_mut().zip(&mean).for_each(|(x, m)| *x -= m);
            let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
            if norm > 0.0 {
                v.iter_mut().for_each(|x| *x /= norm);
            }
        }
        let centroids = kmeans(&centred, k, iterations);
        let centroids =
            centroid_path(&centroids).into_iter().flat_map(|c| centroids[c * DIMS..(c + 1) * DIMS].to_vec()).collect();
        Self { mean, centroids }
    }

    /// How many.
    pub fn len(&self) -> usize {
        self.centroids.len() / DIMS
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.centroids.is_empty()
    }

    /// The partition of a unit embedding: its nearest centroid, after centring.
    pub fn assign(&self, v: &[f32]) -> usize {
        let centred: Vec<f32> = v.iter().zip(&self.mean).map(|(x, m)| x - m).collect();
        nearest(&centred, &self.centroids)
    }

    /// The stored form: the mean, then the centroids in path order, little-endian `f32`s.
    pub fn to_bytes(&self) -> Vec<u8> {
        self.mean.iter().chain(&self.centroids).flat_map(|x| x.to_le_bytes()).collect()
    }

    /// The stored form read back; `None` unless it holds a mean and `k` centroids.
    pub fn parse(bytes: &[u8], k: usize) -> Option<Self> {
        let all = floats(bytes);
        (bytes.len() == (k + 1) * DIMS * 4)
            .then(|| Self { mean: all[..DIMS].to_vec(), centroids: all[DIMS..].to_vec() })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pretrain_crd::seeded::shuffle;

    /// Ten topics with their own vocabularies, twenty documents each, shuffled together.
    fn corpus() -> (Vec<Vec<(u32, u16)>>, Vec<usize>) {
        let mut state = 5u64;
        let mut terms = Vec::new();
        let mut topic_of = Vec::new();
        for doc in 0..200usize {
            let topic = doc % 10;
            let words: Vec<String> = (0..120)
                .map(|_| {
                    let r = splitmix(&mut state);
                    // Mostly topic words, some shared filler.
                    if r.is_multiple_of(4) {
                        format!("common{}", r % 40)
                    } else {
                        format!("topic{topic}word{}", r % 60)
                    }
                })
                .collect();
            terms.push(top_terms(&words.join(" ")));
            topic_of.push(topic);
        }
        (terms, topic_of)
    }

    #[test]
    fn the_traversal_visits_every_document_once_and_keeps_topics_together() {
        let (terms, topic_of) = corpus();
        let included = vec![true; terms.len()];
        let embeddings = embed(&terms, &included);
        let graph = Graph::build(&embeddings, &included, 1);
        let path = graph.traverse(&included);
        let mut sorted = path.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, (0..200).collect::<Vec<_>>(), "a permutation");
        let same = |p: &[usize]| p.windows(2).filter(|w| topic_of[w[0]] == topic_of[w[1]]).count() as f64 / 199.0;
        let mut random: Vec<usize> = (0..200).collect();
        shuffle(&mut random, &mut 9u64);
        assert!(
            same(&path) > 0.85 && same(&random) < 0.2,
            "same-topic neighbours: {} vs {}",
            same(&path),
            same(&random)
        );
        let (ours, theirs) = (adjacent_similarity(&embeddings, &path), adjacent_similarity(&embeddings, &random));
        assert!(ours > theirs + 0.2, "adjacent similarity {ours:.3} against {theirs:.3} for a random order");
        assert_eq!(graph, Graph::build(&embeddings, &included, 1), "deterministic");
        // Neighbours are mostly of the document's own topic.
        let own: usize =
            (0..200).map(|i| graph.neighbours(i).filter(|(j, _)| topic_of[*j] == topic_of[i]).count()).sum();
        assert!(own as f64 > 0.9 * (200 * NEIGHBOURS) as f64, "{own} of {}", 200 * NEIGHBOURS);
    }

    #[test]
    fn semantic_dedup_drops_the_later_of_near_identical_documents() {
        let (mut terms, _) = corpus();
        // Document 200 repeats document 3's terms with one count changed; 201 repeats 200.
        let mut near = terms[3].clone();
        near[0].1 += 1;
        terms.push(near.clone());
        terms.push(near);
        let mut included = vec![true; terms.len()];
        let embeddings = embed(&terms, &included);
        let graph = Graph::build(&embeddings, &included, 1);
        let dropped = graph.semantic_duplicates(&included, 0.98);
        let gone: Vec<usize> = (0..terms.len()).filter(|&i| dropped[i]).collect();
        assert_eq!(gone, [200, 201]);
        // Excluded documents are neither dropped nor kept against.
        included[3] = false;
        let dropped = graph.semantic_duplicates(&included, 0.98);
        assert_eq!((0..terms.len()).filter(|&i| dropped[i]).collect::<Vec<_>>(), [201]);
        let path = graph.traverse(&included);
        assert_eq!(path.len(), terms.len() - 1);
        assert!(!path.contains(&3));
    }

    #[test]
    fn partitions_follow_the_topics_and_the_random_baseline_is_the_mean_over_pairs() {
        let (terms, topic_of) = corpus();
        let embeddings = embed(&terms, &vec![true; terms.len()]);
        // Ten topics into ten centroids, from the first ten documents (one of each topic): each
        // topic goes whole to a centroid of its own.
        let centroids = kmeans(&embeddings, 10, 10);
        let assigned: Vec<usize> = embeddings.chunks_exact(DIMS).map(|v| nearest(v, &centroids)).collect();
        for i in 0..200 {
            assert_eq!(assigned[i], topic_of[i], "document {i}");
        }
        assert_eq!(kmeans(&embeddings, 10, 10), centroids, "deterministic");
        let path = centroid_path(&centroids);
        let mut sorted = path.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, (0..10).collect::<Vec<_>>(), "every centroid once");
        assert_eq!(path[0], 0);
        // The baseline from the sum of the vectors is the mean cosine over every pair.
        let n = 60;
        let sum: Vec<f64> = (0..DIMS).map(|d| (0..n).map(|i| f64::from(embeddings[i * DIMS + d])).sum()).collect();
        let (mut total, mut pairs) = (0.0, 0);
        for i in 0..n {
            for j in 0..n {
                if i != j {
                    total +=
                        f64::from(dot(&embeddings[i * DIMS..(i + 1) * DIMS], &embeddings[j * DIMS..(j + 1) * DIMS]));
                    pairs += 1;
                }
            }
        }
        let baseline = random_pair_similarity(&sum, n as u64);
        assert!((baseline - total / f64::from(pairs)).abs() < 1e-5, "{baseline} against {}", total / f64::from(pairs));
    }

    #[test]
    fn centred_partitions_keep_each_topic_whole_and_round_trip() {
        let (terms, topic_of) = corpus();
        let embeddings = embed(&terms, &vec![true; terms.len()]);
        let partitions = Partitions::fit(&embeddings, 10, 10);
        assert_eq!(partitions.len(), 10);
        let assigned: Vec<usize> = embeddings.chunks_exact(DIMS).map(|v| partitions.assign(v)).collect();
        for topic in 0..10 {
            let mut of: Vec<usize> = (0..200).filter(|&i| topic_of[i] == topic).map(|i| assigned[i]).collect();
            of.sort_unstable();
            of.dedup();
            assert_eq!(of.len(), 1, "topic {topic} is split: {of:?}");
        }
        let mut used = assigned;
        used.sort_unstable();
        used.dedup();
        assert_eq!(used.len(), 10, "one partition a topic");
        let bytes = partitions.to_bytes();
        assert_eq!(Partitions::parse(&bytes, 10), Some(partitions));
        assert!(Partitions::parse(&bytes, 9).is_none());
    }

    #[test]
    fn idf_round_trips_and_weighs_rare_features_more() {
        let (terms, _) = corpus();
        let idf = Idf::of(&terms, &vec![true; terms.len()]);
        assert_eq!(Idf::parse(&idf.to_bytes()), Some(idf.clone()));
        assert!(Idf::parse(&idf.to_bytes()[4..]).is_none());
        let common = feature(
            terms[0]
                .iter()
                .map(|t| t.0)
                .find(|&t| terms.iter().filter(|d| d.iter().any(|x| x.0 == t)).count() > 50)
                .unwrap(),
        );
        let rare = feature(u32::MAX - 7);
        assert!(idf.weights[rare as usize] > idf.weights[common as usize] + 1.0);
    }
}
