//! Deduplication: exact (hash of the normalised text) and fuzzy (MinHash signatures, LSH bands, and a
//! Jaccard check of the full signatures before two documents are merged).

use std::collections::HashMap;

use pretrain_crd::seeded::splitmix;
use xxhash_rust::xxh3::{xxh3_64_with_seed, xxh3_128};

/// Hash of a document's normalised text: lowercase, whitespace runs collapsed. Equal hashes are
/// exact duplicates.
pub fn exact_key(text: &str) -> u128 {
    let mut normalised = String::with_capacity(text.len());
    for word in text.split_whitespace() {
        if !normalised.is_empty() {
            normalised.push(' ');
        }
        normalised.extend(word.chars().flat_map(char::to_lowercase));
    }
    xxh3_128(normalised.as_bytes())
}

const MERSENNE_61: u64 = (1 << 61) - 1;

/// Multiplies modulo 2^61 - 1 without overflow.
fn mul_mod(a: u64, b: u64) -> u64 {
    let product = u128::from(a) * u128::from(b);
    let folded = (product & u128::from(MERSENNE_61)) + (product >> 61);
    let folded = folded as u64;
    if folded >= MERSENNE_61 { folded - MERSENNE_61 } else { folded }
}

/// MinHash over word n-gram shingles with `bands x rows` universal hash permutations.
#[derive(Debug, Clone)]
pub struct MinHasher {
    ngram: usize,
    bands: usize,
    rows: usize,
    permutations: Vec<(u64, u64)>,
}

/// A signature: one minimum per permutation.
pub type Signature = Vec<u64>;

impl MinHasher {
    /// A hasher with `bands * rows` permutations drawn from `seed`.
    pub fn new(ngram: u32, bands: u32, rows: u32, seed: u64) -> Self {
        let mut state = seed ^ 0x6d69_6e68_6173_6800;
        let permutations = (0..bands * rows)
            .map(|_| (splitmix(&mut state) % (MERSENNE_61 - 1) + 1, splitmix(&mut state) % MERSENNE_61))
            .collect();
        Self { ngram: ngram.max(1) as usize, bands: bands as usize, rows: rows as usize, permutations }
    }

    /// Shingle hashes of a text: lowercased alphanumeric words, joined in n-grams. A text shorter than
    /// `ngram` words is one shingle.
    pub fn shingles(&self, text: &str) -> Vec<u64> {
        let lower = text.to_lowercase();
        let words: Vec<&str> = lower.split(|c: char| !c.is_alphanumeric()).filter(|w| !w.is_empty()).collect();
        let n = self.ngram.min(words.len().max(1));
        let mut hashes: Vec<u64> = words
            .windows(n)
            .map(|gram| {
                let mut h = 0u64;
                for w in gram {
                    h = xxh3_64_with_seed(w.as_bytes(), h);
                }
                h % MERSENNE_61
            })
            .collect();
        if hashes.is_empty() {
            hashes.push(xxh3_64_with_seed(lower.trim().as_bytes(), 0) % MERSENNE_61);
        }
        hashes.sort_unstable();
        hashes.dedup();
        hashes
    }

    /// The signature of a text.
    pub fn signature(&self, text: &str) -> Signature {
        let shingles = self.shingles(text);
        self.permutations
            .iter()
            .map(|&(a, b)| {
                shingles.iter().map(|&x| (mul_mod(a, x) + b) % MERSENNE_61).min().expect("at least one shingle")
            })
            .collect()
    }

    /// One key per band: documents that share any band key are candidate duplicates.
    pub fn band_keys(&self, signature: &[u64]) -> Vec<u64> {
        (0..self.bands)
            .map(|band| {
                let rows = &signature[band * self.rows..(band + 1) * self.rows];
                let mut h = band as u64;
                for r in rows {
                    h = xxh3_64_with_seed(&r.to_le_bytes(), h);
                }
                h
            })
            .collect()
    }
}

/// Estimated Jaccard similarity: the fraction of equal signature components.
pub fn jaccard_estimate(a: &[u64], b: &[u64]) -> f64 {
    let same = a.iter().zip(b).filter(|(x, y)| x == y).count();
    same as f64 / a.len().max(1) as f64
}

/// Disjoint sets over the documents named by duplicate pairs (document ids in canonical order):
/// memory grows with the documents that have a duplicate, not with the corpus. The smallest id of a
/// set is its survivor.
#[derive(Debug, Clone, Default)]
pub struct Clusters {
    parent: HashMap<u64, u64>,
}

impl Clusters {
    /// The representative (smallest member) of `x`'s set.
    pub fn find(&mut self, x: u64) -> u64 {
        let mut root = x;
        while let Some(&p) = self.parent.get(&root).filter(|p| **p != root) {
            root = p;
        }
        let mut x = x;
        while x != root {
            let next = self.parent.insert(x, root).unwrap_or(root);
            x = next;
        }
        root
    }

    /// Merges the sets of `a` and `b`, keeping the smaller representative.
    pub fn union(&mut self, a: u64, b: u64) {
        let (ra, rb) = (self.find(a), self.find(b));
        if ra != rb {
            let (keep, drop) = if ra < rb { (ra, rb) } else { (rb, ra) };
            self.parent.insert(drop, keep);
            self.parent.entry(keep).or_insert(keep);
        }
    }

    /// Every document that is not the first of its set, sorted.
    pub fn dropped(mut self) -> Vec<u64> {
        let members: Vec<u64> = self.parent.keys().copied().collect();
        let mut dropped: Vec<u64> = members.into_iter().filter(|&x| self.find(x) != x).collect();
        dropped.sort_unstable();
        dropped
    }
}

/// What near-duplicate verification did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ClusterStats {
    /// Candidate pairs (sharing a band key) whose signatures were compared.
    pub compared: u64,
    /// Pairs found to be duplicates: their signatures agreed on at least the threshold.
    pub merged: u64,
    /// LSH collisions refused by the signature check.
    pub rejected: u64,
}

impl ClusterStats {
    /// Adds another task's counts.
    pub fn add(&mut self, other: &Self) {
        self.compared += other.compared;
        self.merged += other.merged;
        self.rejected += other.rejected;
    }
}

/// Members of one bucket that later members are verified against, at most: enough that a pair of
/// duplicates is found in a bucket also holding unrelated documents (LSH collisions), bounded so that
/// a huge bucket stays linear in its length.
pub const BUCKET_HEADS: usize = 16;

/// One LSH bucket (the documents sharing a band key) being verified, its members given in canonical
/// order. Each member is compared with the bucket's heads: earlier members that matched no head
/// before them (up to [`BUCKET_HEADS`]). A pair that agrees on at least the threshold of signature
/// components is a duplicate pair; a member that matches no head becomes a head itself. So a bucket
/// headed by an unrelated document still pairs the duplicates behind it, and one of true duplicates
/// costs one comparison a member.
///
/// The result depends on the bucket's members only, not on any other bucket, so buckets can be
/// verified by any number of tasks in any order; the pairs are clustered afterwards ([`Clusters`]).
#[derive(Debug, Default)]
pub struct Bucket {
    heads: Vec<(u64, Vec<u64>)>,
}

impl Bucket {
    /// Starts a new bucket.
    pub fn clear(&mut self) {
        self.heads.clear();
    }

    /// Verifies `doc` against the heads; `pair(head, doc)` is called for each duplicate found.
    pub fn add(
        &mut self,
        doc: u64,
        signature: &[u64],
        threshold: f64,
        stats: &mut ClusterStats,
        mut pair: impl FnMut(u64, u64),
    ) {
        let mut matched = false;
        for (head, head_signature) in &self.heads {
            if *head == doc {
                return;
            }
            stats.compared += 1;
            if jaccard_estimate(head_signature, signature) >= threshold {
                pair(*head, doc);
                stats.merged += 1;
                matched = true;
            } else {
                stats.rejected += 1;
            }
        }
        if !matched && self.heads.len() < BUCKET_HEADS {
            self.heads.push((doc, signature.to_vec()));
        }
    }
}

/// Near-duplicate clustering of signatures held in memory (in document order): which documents
/// survive (the first of each cluster does), and the verification's counts. The stage does the same
/// from disk, split by band key over its dedup tasks.
pub fn near_duplicates<S: AsRef<[u64]>>(
    hasher: &MinHasher,
    signatures: &[S],
    threshold: f64,
) -> (Vec<bool>, ClusterStats) {
    let mut keyed: Vec<(u64, u64)> = Vec::with_capacity(signatures.len() * hasher.bands);
    for (i, sig) in signatures.iter().enumerate() {
        keyed.extend(hasher.band_keys(sig.as_ref()).into_iter().map(|k| (k, i as u64)));
    }
    keyed.sort_unstable();
    let (mut clusters, mut stats, mut bucket) = (Clusters::default(), ClusterStats::default(), Bucket::default());
    let mut key = None;
    for (k, doc) in keyed {
        if key != Some(k) {
            key = Some(k);
            bucket.clear();
        }
        bucket.add(doc, signatures[doc as usize].as_ref(), threshold, &mut stats, |a, b| clusters.union(a, b));
    }
    let mut survivors = vec![true; signatures.len()];
    for doc in clusters.dropped() {
        survivors[doc as usize] = false;
    }
    (survivors, stats)
}

/// [`near_duplicates`]' survivors.
pub fn near_duplicate_survivors<S: AsRef<[u64]>>(hasher: &MinHasher, signatures: &[S], threshold: f64) -> Vec<bool> {
    near_duplicates(hasher, signatures, threshold).0
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;

    fn vocabulary_text(seed: u64, words: usize) -> Vec<String> {
        let mut state = seed;
        (0..words).map(|_| format!("w{}", splitmix(&mut state) % 5000)).collect()
    }

    fn true_jaccard(hasher: &MinHasher, a: &str, b: &str) -> f64 {
        let sa: HashSet<u64> = hasher.shingles(a).into_iter().collect();
        let sb: HashSet<u64> = hasher.shingles(b).into_iter().collect();
        sa.intersection(&sb).count() as f64 / sa.union(&sb).count() as f64
    }

    #[test]
    fn exact_key_ignores_case_and_spacing_only() {
        assert_eq!(exact_key("Hello  World\n"), exact_key("hello world"));
        assert_ne!(exact_key("hello world"), exact_key("hello, world"));
    }

    #[test]
    fn mul_mod_matches_wide_arithmetic() {
        for (a, b) in [(MERSENNE_61 - 1, MERSENNE_61 - 1), (123_456_789, 987_654_321), (1 << 60, 3)] {
            assert_eq!(u128::from(mul_mod(a, b)), u128::from(a) * u128::from(b) % u128::from(MERSENNE_61));
        }
    }

    /// Planted near-duplicates at known similarity: recall >= 0.95 at J >= 0.8, no merge below 0.5.
    #[test]
    fn minhash_finds_near_duplicates_and_spares_dissimilar_documents() {
        let hasher = MinHasher::new(5, 14, 8, 7);
        let mut docs = Vec::new();
        let mut pairs = Vec::new();
        let mut state = 99u64;
        for base_id in 0..150u64 {
            let base = vocabulary_text(base_id, 400);
            // Edit a fraction of words to plant a copy at a chosen distance.
            let edit = [0.005, 0.01, 0.02, 0.08, 0.15, 0.3][base_id as usize % 6];
            let mut copy = base.clone();
            for w in copy.iter_mut() {
                if (splitmix(&mut state) % 10_000) as f64 / 10_000.0 < edit {
                    *w = format!("edit{}", splitmix(&mut state));
                }
            }
            let (a, b) = (base.join(" "), copy.join(" "));
            let j = true_jaccard(&hasher, &a, &b);
            pairs.push((docs.len(), docs.len() + 1, j));
            docs.push(a);
            docs.push(b);
        }
        let signatures: Vec<Signature> = docs.iter().map(|d| hasher.signature(d)).collect();
        let survivors = near_duplicate_survivors(&hasher, &signatures, 0.75);
        let (mut high, mut found) = (0, 0);
        for &(a, b, j) in &pairs {
            let merged = survivors[a] && !survivors[b];
            if j >= 0.8 {
                high += 1;
                found += usize::from(merged);
            }
            assert!(!(j < 0.5 && merged), "merged a pair at J = {j:.2}");
        }
        assert!(high >= 40, "the plant has enough similar pairs: {high}");
        assert!(found as f64 / high as f64 >= 0.95, "recall {found}/{high}");
        // Unrelated bases never merge with each other.
        let bases: Vec<usize> = pairs.iter().map(|p| p.0).collect();
        assert!(bases.iter().all(|&i| survivors[i]));
    }

    /// A bucket whose first member is unrelated (an LSH collision) still merges the duplicates
    /// behind it: they are verified against each other, not only against the first.
    #[test]
    fn duplicates_behind_an_unrelated_bucket_head_are_paired() {
        let unrelated: Vec<u64> = (0..16).collect();
        let a: Vec<u64> = (100..116).collect();
        let mut bucket = Bucket::default();
        let (mut stats, mut pairs) = (ClusterStats::default(), Vec::new());
        for (doc, signature) in [(0, &unrelated), (1, &a), (2, &a)] {
            bucket.add(doc, signature, 0.8, &mut stats, |x, y| pairs.push((x, y)));
        }
        assert_eq!(pairs, [(1, 2)], "{stats:?}");
        assert_eq!((stats.merged, stats.rejected), (1, 2));
    }

    #[test]
    fn clusters_keep_the_first_document_and_hold_only_the_paired_ones() {
        let mut sets = Clusters::default();
        sets.union(40, 20);
        sets.union(20, 30);
        sets.union(7, 9);
        assert_eq!((sets.find(40), sets.find(30), sets.find(5)), (20, 20, 5));
        assert_eq!(sets.dropped(), [9, 30, 40]);
    }
}
