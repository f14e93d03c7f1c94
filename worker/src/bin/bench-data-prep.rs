//! Benchmark: WARC reading + HTML extraction + rule filters on a crawl, then exact and MinHash dedup
//! of every extracted page, one core.
//!
//!     cargo run --release -p pretrain-worker --bin bench-data-prep -- ../shared/corpus/web-rustdocs-1.95.warc.gz
//!
//! Prints pages/s, MB/s of HTML, the documents kept after each filter, and the speed-up over the
//! baseline given with `--baseline-seconds` (DataTrove 0.10.1 with trafilatura and the same filters;
//! `scripts/bench-data-prep.sh` runs both on the same file).

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::BufReader;
use std::time::Instant;

use pretrain_crd::spec::{Extract, Filters};
use pretrain_worker::data::dedup::{MinHasher, exact_key, near_duplicates};
use pretrain_worker::data::extract::extract;
use pretrain_worker::data::filters::{Verdict, apply};
use pretrain_worker::data::warc::{WarcReader, http_payload};

/// What reading, extracting and filtering the crawl gave.
#[derive(Debug, Default)]
struct Pass {
    pages: u64,
    html_bytes: u64,
    extracted: u64,
    kept: u64,
    skipped: u64,
    dropped: BTreeMap<&'static str, u64>,
    lines_dropped: HashMap<&'static str, u64>,
    texts: Vec<String>,
    extract_time: f64,
    filter_time: f64,
}

/// Reads every response of the WARC file at `path`, extracts its main content and runs the rule
/// filters on it, timing extraction and filters.
fn read_and_filter(path: &str) -> Pass {
    let file = File::open(path).unwrap_or_else(|e| panic!("{path}: {e}"));
    let reader = WarcReader::new(BufReader::with_capacity(1 << 20, file), path.ends_with(".gz"), 8 << 20);
    let (extract_opts, filters) = (Extract::default(), Filters::default());
    let mut pass = Pass::default();
    for item in reader {
        let Ok(record) = item else {
            pass.skipped += 1;
            continue;
        };
        if record.header("WARC-Type") != Some("response") {
            continue;
        }
        let Some(html) = http_payload(&record.block).ok().and_then(|(_, body)| std::str::from_utf8(body).ok()) else {
            pass.skipped += 1;
            continue;
        };
        pass.pages += 1;
        pass.html_bytes += html.len() as u64;
        let t = Instant::now();
        let page = extract(html, &extract_opts);
        pass.extract_time += t.elapsed().as_secs_f64();
        let Ok(page) = page else {
            pass.skipped += 1;
            continue;
        };
        pass.extracted += 1;
        let t = Instant::now();
        let verdict = apply(&filters, &page.text, &mut pass.lines_dropped);
        pass.filter_time += t.elapsed().as_secs_f64();
        pass.texts.push(page.text);
        match verdict {
            Verdict::Keep(_) => pass.kept += 1,
            Verdict::Drop { filter, .. } => *pass.dropped.entry(filter).or_default() += 1,
        }
    }
    pass
}

fn main() {
    let mut args = std::env::args().skip(1);
    let path = args.next().unwrap_or_else(|| "../shared/corpus/web-rustdocs-1.95.warc.gz".into());
    let mut baseline: Option<f64> = None;
    while let Some(flag) = args.next() {
        if flag == "--baseline-seconds" {
            baseline = args.next().and_then(|v| v.parse().ok());
        }
    }
    let start = Instant::now();
    let pass = read_and_filter(&path);
    let secs = start.elapsed().as_secs_f64();
    let texts = &pass.texts;

    // Dedup of every extracted page (not only the kept ones, to exercise it on more text).
    let dedup_start = Instant::now();
    let minhash = MinHasher::new(5, 14, 8, 1234);
    let mut seen = std::collections::HashSet::new();
    let unique: Vec<&String> = texts.iter().filter(|t| seen.insert(exact_key(t))).collect();
    let signatures: Vec<Vec<u64>> = unique.iter().map(|t| minhash.signature(t)).collect();
    let signature_secs = dedup_start.elapsed().as_secs_f64();
    let cluster_start = Instant::now();
    let (survivors, stats) = near_duplicates(&minhash, &signatures, 0.75);
    let cluster_secs = cluster_start.elapsed().as_secs_f64();
    let dedup_secs = dedup_start.elapsed().as_secs_f64();

    let text_mb = texts.iter().map(String::len).sum::<usize>() as f64 / 1e6;
    let mb = pass.html_bytes as f64 / 1e6;
    println!("file: {path}");
    println!("pages: {} ({mb:.1} MB of HTML), unreadable or skipped: {}", pass.pages, pass.skipped);
    println!(
        "time: {secs:.2} s  ({:.0} pages/s, {:.1} MB/s)  extraction {:.2} s, filters {:.2} s",
        pass.pages as f64 / secs,
        mb / secs,
        pass.extract_time,
        pass.filter_time
    );
    println!("kept after each step:");
    let mut left = pass.extracted;
    println!("  extracted             {left}");
    for filter in ["language", "gopher_repetition", "gopher_quality", "c4", "fineweb"] {
        let d = pass.dropped.get(filter).copied().unwrap_or(0);
        left -= d;
        println!("  after {filter:<16} {left} (dropped {d})");
    }
    assert_eq!(left, pass.kept);
    let mut lines: Vec<_> = pass.lines_dropped.iter().collect();
    lines.sort();
    println!("C4 lines removed: {lines:?}");
    println!(
        "dedup of {} extracted pages ({text_mb:.1} MB of text): {dedup_secs:.2} s ({:.0} docs/s, {:.1} MB/s; signatures {signature_secs:.2} s)",
        texts.len(),
        texts.len() as f64 / dedup_secs,
        text_mb / dedup_secs
    );
    println!(
        "  exact duplicates removed {}, near duplicates removed {}, kept {}",
        texts.len() - unique.len(),
        survivors.iter().filter(|s| !**s).count(),
        survivors.iter().filter(|s| **s).count()
    );
    println!(
        "  LSH clustering of {} signatures in memory: {cluster_secs:.3} s; {} candidate pairs compared, {} duplicate pairs, {} LSH collisions refused",
        signatures.len(),
        stats.compared,
        stats.merged,
        stats.rejected
    );
    if let Some(b) = baseline {
        println!("baseline: {b:.1} s -> speed-up {:.1}x", b / secs);
    }
}
