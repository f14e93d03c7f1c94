//! Deduplication: exact (hash of the normalised text) and fuzzy (MinHash signatures, LSH bands, and a
//! Jaccard check of the full signatures before two documents are merged).

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;

use xxhash_rust::xxh3::{xxh3_64_with_seed, xxh3_128};

use super::runs::Merge;
use pretrain_crd::seeded::splitmix;

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

/// What near-duplicate clustering did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ClusterStats {
    /// Candidate pairs (sharing a band key) whose signatures were compared.
    pub compared: u64,
    /// Pairs merged: their signatures agreed on at least the threshold.
    pub merged: u64,
    /// LSH collisions refused by the signature check.
    pub rejected: u64,
}

/// Members of one bucket that later members are verified against, at most: enough that a pair of
/// duplicates is found in a bucket also holding unrelated documents (LSH collisions), bounded so that
/// a huge bucket stays linear in its length.
pub const BUCKET_HEADS: usize = 16;

/// Near-duplicate clusters of `n` documents from their band entries `(band key, document)`, sorted
/// by key then document (document indices in canonical order). Candidates sharing a key are merged
/// only if their full signatures, read on demand by `signature(document, buffer)`, agree on at least
/// `threshold` of components. Returns for each document whether it survives (the first document of
/// each cluster does).
///
/// The entries are streamed run by run (a run of equal keys is a bucket). Each member of a bucket is
/// verified against the bucket's heads: its earlier members that matched no head before them (up to
/// [`BUCKET_HEADS`]); one that matches none becomes a head itself. So a bucket headed by an
/// unrelated document still merges the duplicates behind it, and one of true duplicates costs one
/// comparison a member. Memory is the union-find (4 bytes a document) and [`BUCKET_HEADS`] + 1
/// signatures; the entries and the signatures can live on disk.
pub fn cluster<E>(
    n: usize,
    entries: impl IntoIterator<Item = Result<(u64, u32), E>>,
    signature_len: usize,
    threshold: f64,
    mut signature: impl FnMut(u32, &mut [u64]) -> Result<(), E>,
) -> Result<(Vec<bool>, ClusterStats), E> {
    let mut sets = UnionFind::new(n);
    let mut stats = ClusterStats::default();
    let mut heads: Vec<(u32, Vec<u64>)> = Vec::with_capacity(BUCKET_HEADS);
    let mut other_signature = vec![0u64; signature_len];
    // The current bucket's key, and its first document until that one's signature is needed.
    let mut run: Option<u64> = None;
    let mut pending: Option<u32> = None;
    for entry in entries {
        let (key, doc) = entry?;
        if run != Some(key) {
            (run, pending) = (Some(key), Some(doc));
            heads.clear();
            continue;
        }
        if let Some(first) = pending.take() {
            let mut first_signature = vec![0u64; signature_len];
            signature(first, &mut first_signature)?;
            heads.push((first, first_signature));
        }
        if heads.iter().any(|(head, _)| *head == doc) {
            continue;
        }
        let mut loaded = false;
        let mut matched = false;
        for (head, head_signature) in &heads {
            if sets.find(*head) == sets.find(doc) {
                matched = true;
                continue;
            }
            if !loaded {
                signature(doc, &mut other_signature)?;
                loaded = true;
            }
            stats.compared += 1;
            if jaccard_estimate(head_signature, &other_signature) >= threshold {
                sets.union(*head, doc);
                stats.merged += 1;
                matched = true;
            } else {
                stats.rejected += 1;
            }
        }
        if !matched && heads.len() < BUCKET_HEADS {
            if !loaded {
                signature(doc, &mut other_signature)?;
            }
            heads.push((doc, other_signature.clone()));
        }
    }
    Ok(((0..n as u32).map(|i| sets.find(i) == i).collect(), stats))
}

/// The LSH index of many map shards on local disk: each shard's band entries (`(band key, document
/// id)`, sorted; see [`runs`](super::runs)) and its signatures (fixed-size, in the shard's order).
#[derive(Debug, Clone)]
pub struct DiskIndex {
    /// Each shard's sorted band entries.
    pub band_files: Vec<PathBuf>,
    /// Each shard's signatures, `signature_len` little-endian `u64`s per document.
    pub signature_files: Vec<PathBuf>,
    /// Every document's id, in canonical (ascending) order; band entries name documents by these.
    pub ids: Vec<u64>,
    /// Where each document's signature is: shard and position within the shard's file.
    pub positions: Vec<(u32, usize)>,
    /// Components of a signature.
    pub signature_len: usize,
}

impl DiskIndex {
    /// [`cluster`] over the `eligible` documents (by canonical index), streaming the shards' band
    /// entries in one k-way merge and reading signatures from disk as candidates need them.
    pub fn cluster(&self, eligible: &[bool], threshold: f64) -> io::Result<(Vec<bool>, ClusterStats)> {
        let signature_bytes = self.signature_len * 8;
        let files = self
            .signature_files
            .iter()
            .map(|p| File::open(p).map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", p.display()))))
            .collect::<io::Result<Vec<_>>>()?;
        let entries = Merge::open(&self.band_files)?.filter_map(|entry| match entry {
            Err(e) => Some(Err(e)),
            Ok((key, doc)) => match self.ids.binary_search(&doc) {
                Ok(i) if eligible[i] => Some(Ok((key, i as u32))),
                Ok(_) => None,
                Err(_) => Some(Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!(
                        "a band bucket names document {} of input {} that no shard lists; the map outputs \
                         disagree (delete the map/ folder and run the stage again)",
                        doc & 0xffff_ffff,
                        doc >> 32
                    ),
                ))),
            },
        });
        let mut raw = vec![0u8; signature_bytes];
        let read_signature = |i: u32, out: &mut [u64]| -> io::Result<()> {
            let (shard, pos) = self.positions[i as usize];
            let path = &self.signature_files[shard as usize];
            files[shard as usize]
                .read_exact_at(&mut raw, (pos * signature_bytes) as u64)
                .map_err(|e| io::Error::new(e.kind(), format!("{}: signature {pos}: {e}", path.display())))?;
            for (o, c) in out.iter_mut().zip(raw.chunks_exact(8)) {
                *o = u64::from_le_bytes(c.try_into().expect("8 bytes"));
            }
            Ok(())
        };
        cluster(self.ids.len(), entries, self.signature_len, threshold, read_signature)
    }
}

/// [`cluster`] over signatures held in memory (in document order).
pub fn near_duplicate_survivors<S: AsRef<[u64]>>(hasher: &MinHasher, signatures: &[S], threshold: f64) -> Vec<bool> {
    let mut keyed: Vec<(u64, u32)> = Vec::with_capacity(signatures.len() * hasher.bands);
    for (i, sig) in signatures.iter().enumerate() {
        keyed.extend(hasher.band_keys(sig.as_ref()).into_iter().map(|k| (k, i as u32)));
    }
    keyed.sort_unstable();
    let len = signatures.first().map_or(0, |s| s.as_ref().len());
    let copy = |doc: u32, out: &mut [u64]| {
        out.copy_from_slice(signatures[doc as usize].as_ref());
        Ok::<(), std::convert::Infallible>(())
    };
    match cluster(signatures.len(), keyed.into_iter().map(Ok), len, threshold, copy) {
        Ok((survivors, _)) => survivors,
        Err(never) => match never {},
    }
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

    /// The on-disk index (three shards' sorted band files and signature files) finds exactly the
    /// clusters the in-memory one does, and skips documents that are not eligible.
    #[test]
    fn disk_index_matches_the_in_memory_clustering() {
        use std::io::Write;

        use crate::data::runs::ExternalSorter;

        let hasher = MinHasher::new(5, 14, 8, 3);
        let mut docs = Vec::new();
        let mut state = 17u64;
        for base in 0..60u64 {
            let words = vocabulary_text(base, 200);
            docs.push(words.join(" "));
            let mut copy = words.clone();
            for w in copy.iter_mut() {
                if splitmix(&mut state) % 100 < 1 {
                    *w = format!("edit{}", splitmix(&mut state));
                }
            }
            docs.push(copy.join(" "));
        }
        let signatures: Vec<Signature> = docs.iter().map(|d| hasher.signature(d)).collect();
        let want = near_duplicate_survivors(&hasher, &signatures, 0.75);
        assert!(want.iter().filter(|k| !**k).count() >= 50, "the plant has duplicates");

        // Documents are ids (input i / 40, record i % 40), dealt round-robin to three shards.
        let dir = tempfile::tempdir().unwrap();
        let ids: Vec<u64> = (0..docs.len() as u64).map(|i| ((i / 40) << 32) | (i % 40)).collect();
        let mut positions = vec![(0, 0); docs.len()];
        let (mut band_files, mut signature_files) = (Vec::new(), Vec::new());
        for shard in 0..3u32 {
            let runs = dir.path().join(format!("runs-{shard}"));
            std::fs::create_dir_all(&runs).unwrap();
            let mut sorter = ExternalSorter::new(&runs, 100);
            let sig_path = dir.path().join(format!("signatures-{shard}.bin"));
            let mut sig_file = std::fs::File::create(&sig_path).unwrap();
            for (pos, i) in (shard as usize..docs.len()).step_by(3).enumerate() {
                positions[i] = (shard, pos);
                for h in &signatures[i] {
                    sig_file.write_all(&h.to_le_bytes()).unwrap();
                }
                for key in hasher.band_keys(&signatures[i]) {
                    sorter.push((key, ids[i])).unwrap();
                }
            }
            let bands = dir.path().join(format!("bands-{shard}.bin"));
            sorter.finish(&bands).unwrap();
            band_files.push(bands);
            signature_files.push(sig_path);
        }
        let index = DiskIndex { band_files, signature_files, ids, positions, signature_len: 112 };
        let (got, stats) = index.cluster(&vec![true; docs.len()], 0.75).unwrap();
        assert_eq!(got, want);
        assert_eq!(stats.merged as usize, want.iter().filter(|k| !**k).count());

        // Without the originals, their copies have nothing to merge with and all survive.
        let eligible: Vec<bool> = (0..docs.len()).map(|i| i % 2 == 1).collect();
        let (got, _) = index.cluster(&eligible, 0.75).unwrap();
        assert!(got.iter().all(|k| *k));
    }

    /// A bucket whose first member is unrelated (an LSH collision) still merges the duplicates
    /// behind it: they are verified against each other, not only against the first.
    #[test]
    fn duplicates_behind_an_unrelated_bucket_head_are_merged() {
        let unrelated: Vec<u64> = (0..16).collect();
        let a: Vec<u64> = (100..116).collect();
        let signatures = [unrelated, a.clone(), a];
        let entries = [(7u64, 0u32), (7, 1), (7, 2)].map(Ok::<_, std::convert::Infallible>);
        let read = |doc: u32, out: &mut [u64]| {
            out.copy_from_slice(&signatures[doc as usize]);
            Ok(())
        };
        let (survivors, stats) = cluster(3, entries, 16, 0.8, read).unwrap();
        assert_eq!(survivors, [true, true, false], "{stats:?}");
        assert_eq!((stats.merged, stats.rejected), (1, 2));
    }

    #[test]
    fn union_find_keeps_the_first_document() {
        let mut sets = UnionFind::new(5);
        sets.union(4, 2);
        sets.union(2, 3);
        assert_eq!((sets.find(4), sets.find(3), sets.find(0)), (2, 2, 0));
    }
}
