//! Benchmark: byte-level BPE training and encoding, on all cores.
//!
//!     cargo run --release -p pretrain-worker --bin bench-tokenize -- --out /tmp/bench-tokenize
//!
//! Trains a 32,000-token BPE on the code + legal JSONL of `../shared/corpus` (894 documents), encodes
//! them with pretrain's encoder (cold and warm word cache) and with the `tokenizers` library in this
//! process (the baseline; ids must be identical), then times training on `--train-mb` of text.
//! Writes `tokenizer.json`, `texts.json` and `ours.json` to `--out` for
//! `scripts/tokenize_baseline.py`, which runs the Python `tokenizers` and `tiktoken` peers;
//! `scripts/bench-tokenize.sh` runs both.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::Instant;

use pretrain_worker::tokenize::train::train_bpe;
use pretrain_worker::tokenizer::Encoder;

fn jsonl_gz(path: &Path) -> Vec<String> {
    let mut text = String::new();
    flate2::read::GzDecoder::new(std::fs::File::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display())))
        .read_to_string(&mut text)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    text.lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).expect("a JSON line")["text"]
                .as_str()
                .unwrap_or("")
                .to_string()
        })
        .collect()
}

fn main() {
    let mut corpus = PathBuf::from("../shared/corpus");
    let mut out = std::env::temp_dir().join("bench-tokenize");
    let mut vocab = 32_000u32;
    let mut train_mb = 100u64;
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let value = args.next().unwrap_or_else(|| panic!("{flag} needs a value"));
        match flag.as_str() {
            "--corpus" => corpus = value.into(),
            "--out" => out = value.into(),
            "--vocab" => vocab = value.parse().expect("--vocab is a number"),
            "--train-mb" => train_mb = value.parse().expect("--train-mb is a number"),
            other => panic!("unknown flag {other}"),
        }
    }
    std::fs::create_dir_all(&out).expect("--out can be created");
    let mut texts = jsonl_gz(&corpus.join("code-python-stdlib.jsonl.gz"));
    texts.extend(jsonl_gz(&corpus.join("legal-debian.jsonl.gz")));
    let bytes: usize = texts.iter().map(String::len).sum();
    let threads = rayon::current_num_threads();
    println!("corpus: {} documents, {:.1} MB; {threads} threads", texts.len(), bytes as f64 / 1e6);

    let specials: Vec<String> = ["<|bos|>", "<|eos|>", "<|pad|>"].map(String::from).to_vec();
    let t = Instant::now();
    let trained = train_bpe(&texts, vocab, &specials).expect("training succeeds");
    let train_s = t.elapsed().as_secs_f64();
    println!("train {vocab}: {train_s:.2} s");
    std::fs::write(out.join("tokenizer.json"), &trained.json).expect("write tokenizer.json");
    std::fs::write(out.join("texts.json"), serde_json::to_string(&texts).expect("texts serialise")).expect("write");

    // pretrain's encoder: a fresh one (cold word cache), then the same one again (warm).
    let encoder = Encoder::from_json(&trained.json).expect("tokenizer loads");
    assert!(encoder.is_fast(), "a trained tokenizer takes the fast path");
    let t = Instant::now();
    let ours = encoder.encode_batch(&texts).expect("encodes");
    let cold_s = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let warm = encoder.encode_batch(&texts).expect("encodes");
    let warm_s = t.elapsed().as_secs_f64();
    assert_eq!(ours, warm);
    let tokens: usize = ours.iter().map(Vec::len).sum();

    // Baseline: the tokenizers library's own batch encoder, same process, same threads.
    let library: tokenizers::Tokenizer = trained.json.parse().expect("tokenizer loads");
    let t = Instant::now();
    let theirs =
        library.encode_batch_fast(texts.iter().map(String::as_str).collect::<Vec<_>>(), false).expect("encodes");
    let library_s = t.elapsed().as_secs_f64();
    let identical = theirs.iter().zip(&ours).filter(|(e, o)| e.get_ids() == o.as_slice()).count();

    let mb = bytes as f64 / 1e6;
    println!("bytes/token: {:.3}", bytes as f64 / tokens as f64);
    println!("encode, pretrain (cold cache): {:.1} MB/s, {:.2} M tokens/s", mb / cold_s, tokens as f64 / 1e6 / cold_s);
    println!("encode, pretrain (warm cache): {:.1} MB/s", mb / warm_s);
    println!("encode, tokenizers 0.23 (Rust library): {:.1} MB/s", mb / library_s);
    println!("ratio vs tokenizers library: {:.2}x (cold cache)", library_s / cold_s);
    println!("identical ids: {identical} of {} documents", texts.len());
    assert_eq!(identical, texts.len(), "the fast path must give the library's ids");

    // Training time on `train_mb` of text: the corpus repeated with a changing prefix so that the
    // repeats are new documents.
    let mut big: Vec<String> = Vec::new();
    let mut big_bytes = 0u64;
    let mut round = 0;
    while big_bytes < train_mb * 1_000_000 {
        for t in &texts {
            let doc = format!("copy {round}\n{t}");
            big_bytes += doc.len() as u64;
            big.push(doc);
        }
        round += 1;
    }
    let t = Instant::now();
    train_bpe(&big, vocab, &specials).expect("training succeeds");
    let big_s = t.elapsed().as_secs_f64();
    println!("train {vocab} on {:.0} MB: {big_s:.1} s", big_bytes as f64 / 1e6);

    let report = serde_json::json!({
        "threads": threads, "documents": texts.len(), "bytes": bytes, "tokens": tokens,
        "trainSeconds": train_s, "encodeColdSeconds": cold_s, "encodeWarmSeconds": warm_s,
        "libraryEncodeSeconds": library_s, "trainBigSeconds": big_s, "trainBigBytes": big_bytes,
    });
    std::fs::write(out.join("ours.json"), report.to_string()).expect("write ours.json");
}
