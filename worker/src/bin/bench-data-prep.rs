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
use pretrain_worker::data::dedup::{MinHasher, exact_key, near_duplicate_survivors};
use pretrain_worker::data::extract::extract;
use pretrain_worker::data::filters::{Verdict, apply};
use pretrain_worker::data::warc::{WarcReader, http_payload};

fn main() {
    let mut args = std::env::args().skip(1);
    let path = args.next().unwrap_or_else(|| "../shared/corpus/web-rustdocs-1.95.warc.gz".into());
    let mut baseline: Option<f64> = None;
    while let Some(flag) = args.next() {
        if flag == "--baseline-seconds" {
            baseline = args.next().and_then(|v| v.parse().ok());
        }
    }
    let file = File::open(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    let reader = WarcReader::new(BufReader::with_capacity(1 << 20, file), path.ends_with(".gz"), 8 << 20);
    let (extract_opts, filters) = (Extract::default(), Filters::default());

    let start = Instant::now();
    let (mut pages, mut html_bytes, mut extracted, mut kept, mut skipped) = (0u64, 0u64, 0u64, 0u64, 0u64);
    let mut dropped: BTreeMap<&'static str, u64> = BTreeMap::new();
    let mut lines_dropped: HashMap<&'static str, u64> = HashMap::new();
    let mut texts: Vec<String> = Vec::new();
    let (mut extract_time, mut filter_time) = (0.0, 0.0);
    for item in reader {
        let Ok(record) = item else {
            skipped += 1;
            continue;
        };
        if record.header("WARC-Type") != Some("response") {
            continue;
        }
        let Ok((_, body)) = http_payload(&record.block) else {
            skipped += 1;
            continue;
        };
        let Ok(html) = std::str::from_utf8(body) else {
            skipped += 1;
            continue;
        };
        pages += 1;
        html_bytes += body.len() as u64;
        let t = Instant::now();
        let page = extract(html, &extract_opts);
        extract_time += t.elapsed().as_secs_f64();
        let Ok(page) = page else {
            skipped += 1;
            continue;
        };
        extracted += 1;
        let t = Instant::now();
        let verdict = apply(&filters, &page.text, &mut lines_dropped);
        filter_time += t.elapsed().as_secs_f64();
        texts.push(page.text);
        match verdict {
            Verdict::Keep(_) => kept += 1,
            Verdict::Drop { filter, .. } => *dropped.entry(filter).or_default() += 1,
        }
    }
    let secs = start.elapsed().as_secs_f64();

    // Dedup of every extracted page (not only the kept ones, to exercise it on more text).
    let dedup_start = Instant::now();
    let minhash = MinHasher::new(5, 14, 8, 1234);
    let mut seen = std::collections::HashSet::new();
    let unique: Vec<&String> = texts.iter().filter(|t| seen.insert(exact_key(t))).collect();
    let signatures: Vec<Vec<u64>> = unique.iter().map(|t| minhash.signature(t)).collect();
    let signature_secs = dedup_start.elapsed().as_secs_f64();
    let survivors = near_duplicate_survivors(&minhash, &signatures, 0.75);
    let dedup_secs = dedup_start.elapsed().as_secs_f64();
    let text_mb = texts.iter().map(String::len).sum::<usize>() as f64 / 1e6;
    let mb = html_bytes as f64 / 1e6;
    println!("file: {path}");
    println!("pages: {pages} ({mb:.1} MB of HTML), unreadable or skipped: {skipped}");
    println!(
        "time: {secs:.2} s  ({:.0} pages/s, {:.1} MB/s)  extraction {extract_time:.2} s, filters {filter_time:.2} s",
        pages as f64 / secs,
        mb / secs
    );
    println!("kept after each step:");
    let mut left = extracted;
    println!("  extracted             {left}");
    for filter in ["language", "gopher_repetition", "gopher_quality", "c4", "fineweb"] {
        let d = dropped.get(filter).copied().unwrap_or(0);
        left -= d;
        println!("  after {filter:<16} {left} (dropped {d})");
    }
    assert_eq!(left, kept);
    let mut lines: Vec<_> = lines_dropped.into_iter().collect();
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
    if let Some(b) = baseline {
        println!("baseline: {b:.1} s -> speed-up {:.1}x", b / secs);
    }
}
