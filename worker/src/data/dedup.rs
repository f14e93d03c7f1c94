//! Deduplication: exact (hash of the normalised text) and fuzzy (MinHash signatures, LSH bands, and a
//! Jaccard check of the full signatures before two documents are merged).

use xxhash_rust::xxh3::{xxh3_64_with_seed, xxh3_128};

use super::random::splitmix;

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

/// Disjoint sets over document indices; the smallest index of a set is its survivor.
#[derive(Debug, Clone)]
pub struct UnionFind {
    parent: Vec<u32>,
}

impl UnionFind {
    /// `n` singleton sets.
    pub fn new(n: usize) -> Self {
        Self { parent: (0..n as u32).collect() }
    }

    /// The representative (smallest member) of `x`'s set.
    pub fn find(&mut self, x: u32) -> u32 {
        let mut root = x;
        while self.parent[root as usize] != root {
            root = self.parent[root as usize];
        }
        let mut x = x;
        while self.parent[x as usize] != root {
            let next = self.parent[x as usize];
            self.parent[x as usize] = root;
            x = next;
        }
        root
    }

    /// Merges the sets of `a` and `b`, keeping the smaller representative.
    pub fn union(&mut self, a: u32, b: u32) {
        let (ra, rb) = (self.find(a), self.find(b));
        if ra != rb {
            let (keep, drop) = if ra < rb { (ra, rb) } else { (rb, ra) };
            self.parent[drop as usize] = keep;
        }
    }
}

/// Near-duplicate clusters among `signatures` (in document order): candidates share a band key,
/// and are merged only if their signatures agree on at least `threshold` of components. Returns
/// for each document whether it survives (the first document of each cluster does).
///
/// Band keys are sorted and scanned run by run, so the working set is the key list, not a map.
pub fn near_duplicate_survivors<S: AsRef<[u64]>>(hasher: &MinHasher, signatures: &[S], threshold: f64) -> Vec<bool> {
    let mut keyed: Vec<(u64, u32)> = Vec::with_capacity(signatures.len() * hasher.bands);
    for (i, sig) in signatures.iter().enumerate() {
        keyed.extend(hasher.band_keys(sig.as_ref()).into_iter().map(|k| (k, i as u32)));
    }
    keyed.sort_unstable();
    let mut sets = UnionFind::new(signatures.len());
    for run in keyed.chunk_by(|a, b| a.0 == b.0) {
        // Compare each member with the run's first: enough to connect a cluster of true duplicates,
        // and linear in the run length for huge buckets.
        let first = run[0].1;
        for &(_, other) in &run[1..] {
            if other != first
                && sets.find(first) != sets.find(other)
                && jaccard_estimate(signatures[first as usize].as_ref(), signatures[other as usize].as_ref())
                    >= threshold
            {
                sets.union(first, other);
            }
        }
    }
    (0..signatures.len() as u32).map(|i| sets.find(i) == i).collect()
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

    #[test]
    fn union_find_keeps_the_first_document() {
        let mut sets = UnionFind::new(5);
        sets.union(4, 2);
        sets.union(2, 3);
        assert_eq!((sets.find(4), sets.find(3), sets.find(0)), (2, 2, 0));
    }
}
