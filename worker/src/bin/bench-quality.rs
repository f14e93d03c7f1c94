//! The two quality classifiers data-prep trains, on the same labels: the hashed n-gram model and a
//! linear head over a BERT-family encoder (all-MiniLM-L6-v2), each measured on the held-out fifth.
//!
//!     cargo run --release -p pretrain-worker --bin bench-quality -- CRAWL.warc.gz ENCODER_DIR [PER_CLASS]
//!
//! The labels: the crawl's pages as extracted, good when the default rule chain (Gopher quality and
//! repetition, C4, FineWeb, language) keeps them, bad when it drops them; at most `PER_CLASS` (default
//! 600) of each, in crawl order. The question asked: how well does each learned scorer reproduce
//! that verdict on pages it did not train on. Prints a Markdown table (`docs/performance.md`).

use std::collections::HashMap;
use std::path::Path;
use std::time::Instant;

use pretrain_crd::spec::{Extract, Filters, SourceFormat};
use pretrain_worker::data::bert::{Encoder, ModelFiles};
use pretrain_worker::data::filters::{Verdict, apply};
use pretrain_worker::data::quality::{HeadTraining, LinearHead, QualityModel, Training, evaluate, held_out};
use pretrain_worker::data::reader::{Item, ReadOptions, read_file};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let [_, crawl, encoder_dir, rest @ ..] = args.as_slice() else {
        panic!("usage: bench-quality CRAWL.warc.gz ENCODER_DIR [PER_CLASS]")
    };
    let per_class: usize = rest.first().map_or(600, |n| n.parse().expect("PER_CLASS is a count"));
    let examples = label(Path::new(crawl), per_class);
    let seed = 1234;
    let (train, test): (Vec<usize>, Vec<usize>) = (0..examples.len()).partition(|&i| !held_out(&examples[i].0, seed));
    let counts = |idx: &[usize]| {
        let good = idx.iter().filter(|&&i| examples[i].1).count() as u64;
        [good, idx.len() as u64 - good]
    };
    eprintln!(
        "{} labelled pages: train {:?}, held out {:?} (good, bad)",
        examples.len(),
        counts(&train),
        counts(&test)
    );

    let started = Instant::now();
    let borrowed: Vec<(&str, bool)> = train.iter().map(|&i| (examples[i].0.as_str(), examples[i].1)).collect();
    let ngram = QualityModel::train(&borrowed, Training { seed, ..Training::default() }).expect("both classes");
    let scored: Vec<(f32, bool)> = test.iter().map(|&i| (ngram.score(&examples[i].0), examples[i].1)).collect();
    let ngram_eval = evaluate("ngram", &scored, counts(&train), 0.5);
    let ngram_time = started.elapsed().as_secs_f64();

    let started = Instant::now();
    let dir = Path::new(encoder_dir);
    let read =
        |name: &str| std::fs::read(dir.join(name)).unwrap_or_else(|e| panic!("{}: {e}", dir.join(name).display()));
    let (config, weights, tokenizer) = (read("config.json"), read("model.safetensors"), read("tokenizer.json"));
    let sentence = std::fs::read(dir.join("sentence_bert_config.json")).ok();
    let files =
        ModelFiles { config: &config, weights: &weights, tokenizer: &tokenizer, sentence_config: sentence.as_deref() };
    let encoder = Encoder::from_bytes(&files, &candle_core::Device::Cpu).expect("the encoder loads");
    let texts: Vec<&str> = examples.iter().map(|(t, _)| t.as_str()).collect();
    let embeddings = encoder.embed(&texts, 32).expect("embedding");
    let embed_time = started.elapsed().as_secs_f64();
    let set: Vec<(&[f32], bool)> = train.iter().map(|&i| (embeddings[i].as_slice(), examples[i].1)).collect();
    let head = LinearHead::train(&set, HeadTraining::default()).expect("both classes");
    let scored: Vec<(f32, bool)> = test.iter().map(|&i| (head.score(&embeddings[i]), examples[i].1)).collect();
    let head_eval = evaluate("bert-head", &scored, counts(&train), 0.5);
    let head_time = started.elapsed().as_secs_f64();

    println!("| classifier | precision | recall | F1 | AUC | train + score time |");
    println!("|---|---:|---:|---:|---:|---:|");
    for (name, e, t) in [
        ("hashed n-grams, logistic regression", &ngram_eval, ngram_time),
        ("all-MiniLM-L6-v2 + linear head", &head_eval, head_time),
    ] {
        println!("| {name} | {:.3} | {:.3} | {:.3} | {:.3} | {t:.1} s |", e.precision, e.recall, e.f1, e.auc);
    }
    eprintln!(
        "encoder: {} pages embedded in {embed_time:.1} s ({:.1} pages/s, at most {} tokens each)",
        texts.len(),
        texts.len() as f64 / embed_time,
        encoder.max_tokens()
    );
}

/// Pages of the crawl labelled by the default rule chain, at most `per_class` of each.
fn label(crawl: &Path, per_class: usize) -> Vec<(String, bool)> {
    let extract = Extract::default();
    let options =
        ReadOptions { format: SourceFormat::Warc, text_field: "text", max_document_bytes: 1 << 22, extract: &extract };
    let filters = Filters::default();
    let mut removed = HashMap::new();
    let (mut good, mut bad) = (Vec::new(), Vec::new());
    read_file(crawl, &options, &mut |item| {
        let Item::Document(doc) = item else { return };
        if doc.text.trim().is_empty() {
            return;
        }
        let keep = matches!(apply(&filters, &doc.text, &mut removed), Verdict::Keep(_));
        let wanted = if keep { &mut good } else { &mut bad };
        if wanted.len() < per_class {
            wanted.push((doc.text, keep));
        }
    })
    .expect("the crawl reads");
    // Interleave the classes in crawl order of each.
    let mut out = Vec::with_capacity(good.len() + bad.len());
    let (mut g, mut b) = (good.into_iter(), bad.into_iter());
    loop {
        match (g.next(), b.next()) {
            (None, None) => break,
            (x, y) => out.extend(x.into_iter().chain(y)),
        }
    }
    out
}
