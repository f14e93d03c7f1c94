//! In-context ordering at scale: embedding, the approximate neighbour graph, semantic dedup and the
//! traversal, on a synthetic corpus of N documents or on a real crawl.
//!
//!     cargo run --release -p pretrain-worker --bin bench-order -- synthetic 1000000
//!     cargo run --release -p pretrain-worker --bin bench-order -- synthetic 1000000 250000
//!     cargo run --release -p pretrain-worker --bin bench-order -- warc CRAWL.warc.gz
//!
//! With a third argument, the plan is split as data-prep's order tasks split it at scale
//! (`order.partitionDocuments`): a sample of 32 documents a partition (by a hash of each document),
//! centred, spherical k-means into `N / partitionDocuments` centroids ordered along a path, each
//! document to its nearest centroid, each partition planned alone and the paths joined. That row prints the
//! partitions' count and largest size, the time to cluster and assign, the summed time to plan the
//! partitions, and the same quality measures, against the first row's single plan.
//!
//! The synthetic corpus: N documents of 150-450 words, each on one of N/40 topics. A topic has 120
//! words of its own, anywhere in a vocabulary of a million words, used with Zipf-distributed
//! frequencies; a document draws 70% of its words from its topic and 30% from the whole vocabulary,
//! Zipf-distributed (so common words are shared by all topics). Prints one Markdown table row:
//! time per phase, peak memory (VmHWM), the mean cosine of adjacent documents on the path against a
//! seeded random order of the same documents, the share of adjacent pairs on one topic (synthetic
//! only), and the time per N log2 N (constant when the method scales as N log N).

use std::time::Instant;

use pretrain_crd::seeded::{shuffle, splitmix};
use pretrain_crd::spec::{Extract, SourceFormat};
use pretrain_worker::data::order::{DIMS, Graph, Partitions, adjacent_similarity, embed, plan, top_terms};
use pretrain_worker::data::reader::{Item, ReadOptions, read_file};
use rayon::prelude::*;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let started = Instant::now();
    let (terms, topics) = match args.get(1).map(String::as_str) {
        Some("synthetic") => synthetic(args.get(2).map_or(100_000, |n| n.parse().expect("N is a count"))),
        Some("warc") => (crawl(args.get(2).expect("usage: bench-order warc CRAWL.warc.gz")), Vec::new()),
        _ => panic!("usage: bench-order synthetic N | warc CRAWL.warc.gz"),
    };
    let prepare = started.elapsed().as_secs_f64();
    let n = terms.len();
    let included = vec![true; n];
    if let Some(size) = args.get(3) {
        partitioned(&terms, &topics, size.parse().expect("partitionDocuments is a count"));
        return;
    }

    let t = Instant::now();
    let embeddings = embed(&terms, &included);
    let embed_s = t.elapsed().as_secs_f64();
    drop(terms);
    let t = Instant::now();
    let graph = Graph::build(&embeddings, &included, 1);
    let graph_s = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let dropped = graph.semantic_duplicates(&included, 0.95);
    let kept: Vec<bool> = dropped.iter().map(|d| !d).collect();
    let path = graph.traverse(&kept);
    let walk_s = t.elapsed().as_secs_f64();
    assert_eq!(path.len(), kept.iter().filter(|k| **k).count(), "every kept document once");

    let mut random: Vec<usize> = (0..n).filter(|&i| kept[i]).collect();
    shuffle(&mut random, &mut 7u64);
    let (ours, baseline) = (adjacent_similarity(&embeddings, &path), adjacent_similarity(&embeddings, &random));
    let same_topic = |p: &[usize]| {
        p.windows(2).filter(|w| topics[w[0]] == topics[w[1]]).count() as f64 / p.len().saturating_sub(1) as f64
    };
    let topic = if topics.is_empty() {
        "-".to_string()
    } else {
        format!("{:.3} / {:.4}", same_topic(&path), same_topic(&random))
    };
    let total = embed_s + graph_s + walk_s;
    let n_log_n = n as f64 * (n as f64).log2();
    println!(
        "| {n} | {embed_s:.1} s | {graph_s:.1} s | {walk_s:.1} s | {total:.1} s | {:.0} MiB | {ours:.3} / {baseline:.3} | {topic} | {} | {:.0} ns |",
        peak_mib(),
        dropped.iter().filter(|d| **d).count(),
        total / n_log_n * 1e9
    );
    eprintln!("prepared the corpus in {prepare:.1} s");
}

/// The plan split into partitions of about `size` documents, as data-prep's order tasks split it.
fn partitioned(terms: &[Vec<(u32, u16)>], topics: &[u32], size: usize) {
    let n = terms.len();
    let t = Instant::now();
    let embeddings = embed(terms, &vec![true; n]);
    let embed_s = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let hash = |i: usize| splitmix(&mut (i as u64 ^ 0x5a4d));
    let bound = (32.0 / size as f64).min(1.0) * u64::MAX as f64;
    let mut sample: Vec<usize> = (0..n).filter(|&i| (hash(i) as f64) <= bound).collect();
    sample.sort_by_key(|&i| (hash(i), i));
    let k = n.div_ceil(size).min(sample.len()).max(1);
    let vectors: Vec<f32> = sample.iter().flat_map(|&i| embeddings[i * DIMS..(i + 1) * DIMS].to_vec()).collect();
    let partitions = Partitions::fit(&vectors, k, 10);
    let assigned: Vec<usize> = embeddings.par_chunks_exact(DIMS).map(|v| partitions.assign(v)).collect();
    let mut members = vec![Vec::new(); k];
    assigned.iter().enumerate().for_each(|(i, &p)| members[p].push(i));
    let cluster_s = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let (mut path, mut dropped) = (Vec::new(), 0);
    for m in &members {
        let part: Vec<f32> = m.iter().flat_map(|&i| embeddings[i * DIMS..(i + 1) * DIMS].to_vec()).collect();
        let p = plan(&part, 1, 0.95);
        dropped += p.dropped.iter().filter(|d| **d).count();
        path.extend(p.path.iter().map(|&j| m[j]));
    }
    let plan_s = t.elapsed().as_secs_f64();
    let mut random = path.clone();
    shuffle(&mut random, &mut 7u64);
    let (ours, baseline) = (adjacent_similarity(&embeddings, &path), adjacent_similarity(&embeddings, &random));
    let same = |p: &[usize]| {
        p.windows(2).filter(|w| topics[w[0]] == topics[w[1]]).count() as f64 / p.len().saturating_sub(1) as f64
    };
    let largest = members.iter().map(Vec::len).max().unwrap_or(0);
    let topic = if topics.is_empty() { "-".to_string() } else { format!("{:.3} / {:.4}", same(&path), same(&random)) };
    println!(
        "| {n} | {k} of up to {size} (largest {largest}) | {embed_s:.1} s | {cluster_s:.1} s | {plan_s:.1} s | {ours:.3} / {baseline:.3} | {topic} | {dropped} |"
    );
}

/// Documents' top terms and topics of the synthetic corpus.
fn synthetic(n: usize) -> (Vec<Vec<(u32, u16)>>, Vec<u32>) {
    const VOCABULARY: f64 = 1_000_000.0;
    let topics = (n / 40).max(1) as u64;
    // A Zipf draw (exponent about 1) over the vocabulary: exp of a uniform draw of its log.
    let zipf_rank =
        |state: &mut u64, n: f64| ((splitmix(state) >> 11) as f64 / (1u64 << 53) as f64 * n.ln()).exp() as u64;
    let zipf = |state: &mut u64| zipf_rank(state, VOCABULARY);
    (0..n as u64)
        .into_par_iter()
        .map(|i| {
            let mut state = i.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0xbe7c;
            let topic = splitmix(&mut state) % topics;
            let words = 150 + splitmix(&mut state) % 300;
            let text: Vec<String> = (0..words)
                .map(|_| {
                    if splitmix(&mut state) % 10 < 7 {
                        // The topic's k-th word (k Zipf-distributed over its 120), anywhere in the
                        // vocabulary.
                        let k = zipf_rank(&mut state, 120.0);
                        let mut topic_state = topic.wrapping_mul(1_000_003) ^ k;
                        format!("w{}", splitmix(&mut topic_state) % VOCABULARY as u64)
                    } else {
                        format!("w{}", zipf(&mut state))
                    }
                })
                .collect();
            (top_terms(&text.join(" ")), topic as u32)
        })
        .unzip()
}

/// Top terms of a crawl's pages, as extracted.
fn crawl(path: &str) -> Vec<Vec<(u32, u16)>> {
    let extract = Extract::default();
    let options =
        ReadOptions { format: SourceFormat::Warc, text_field: "text", max_document_bytes: 1 << 22, extract: &extract };
    let mut out = Vec::new();
    read_file(std::path::Path::new(path), &options, &mut |item| {
        if let Item::Document(doc) = item
            && !doc.text.trim().is_empty()
        {
            out.push(top_terms(&doc.text));
        }
    })
    .expect("the crawl reads");
    out
}

/// The process's peak resident memory.
fn peak_mib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .unwrap_or(0);
    kib / 1024
}
