//! Near-duplicate detection on a JSONL corpus (`{"id": ..., "text": ...}` lines) with data-prep's
//! MinHash at the spec's defaults (5-grams, 14 bands x 8 hashes, signatures verified at Jaccard 0.75):
//! prints the ids of the documents it removes, one a line, and the time on stderr.
//!
//!     cargo run --release -p pretrain-worker --bin bench-dedup -- corpus.jsonl > removed.txt
//!
//! `scripts/bench-dedup.sh` plants near duplicates at known Jaccard similarities, runs this and
//! DataTrove's MinHash dedup on them, and prints recall and precision of both.

use std::io::BufRead;
use std::time::Instant;

use pretrain_crd::spec::MinHash;
use pretrain_worker::data::dedup::{MinHasher, near_duplicate_survivors};

fn main() {
    let path = std::env::args().nth(1).expect("usage: bench-dedup CORPUS.jsonl");
    let file = std::fs::File::open(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    let (mut ids, mut texts) = (Vec::new(), Vec::new());
    for (i, line) in std::io::BufReader::new(file).lines().enumerate() {
        let line = line.unwrap_or_else(|e| panic!("{path}:{}: {e}", i + 1));
        let doc: serde_json::Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("{path}:{}: {e}", i + 1));
        ids.push(doc["id"].to_string());
        texts.push(doc["text"].as_str().unwrap_or_else(|| panic!("{path}:{}: no text", i + 1)).to_string());
    }
    let spec = MinHash::default();
    let started = Instant::now();
    let hasher = MinHasher::new(spec.ngram, spec.buckets, spec.hashes_per_bucket, 0);
    let signatures: Vec<Vec<u64>> = texts.iter().map(|t| hasher.signature(t)).collect();
    let survivors = near_duplicate_survivors(&hasher, &signatures, spec.jaccard_threshold);
    eprintln!("pretrain: {} documents in {:.2} s", texts.len(), started.elapsed().as_secs_f64());
    for (id, kept) in ids.iter().zip(survivors) {
        if !kept {
            println!("{}", id.trim_matches('"'));
        }
    }
}
