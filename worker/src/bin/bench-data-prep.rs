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
use pretrain_worker::data::dedup::{DiskIndex, MinHasher, exact_key, near_duplicate_survivors};
use pretrain_worker::data::extract::extract;
use pretrain_worker::data::filters::{Verdict, apply};
use pretrain_worker::data::runs::ExternalSorter;
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
    let cluster_start = Instant::now();
    let survivors = near_duplicate_survivors(&minhash, &signatures, 0.75);
    let memory_cluster_secs = cluster_start.elapsed().as_secs_f64();
    let dedup_secs = dedup_start.elapsed().as_secs_f64();

    // The stage's way: the same index on disk (band entries sorted in spilled runs of 16 Ki entries,
    // signatures in a file read on demand), which bounds memory by the union-find.
    let disk_start = Instant::now();
    let scratch = tempfile::tempdir().expect("a temporary directory");
    let runs = scratch.path().join("runs");
    std::fs::create_dir_all(&runs).expect("runs directory");
    let mut sorter = ExternalSorter::new(&runs, 1 << 14);
    let sig_path = scratch.path().join("signatures.bin");
    let mut sig_file = std::io::BufWriter::new(File::create(&sig_path).expect("signature file"));
    for (i, sig) in signatures.iter().enumerate() {
        for h in sig {
            std::io::Write::write_all(&mut sig_file, &h.to_le_bytes()).expect("signature written");
        }
        for key in minhash.band_keys(sig) {
            sorter.push((key, i as u64)).expect("band entry written");
        }
    }
    std::io::Write::flush(&mut sig_file).expect("signatures flushed");
    let bands = scratch.path().join("bands.bin");
    let entries = sorter.finish(&bands).expect("band entries sorted");
    let index = DiskIndex {
        band_files: vec![bands],
        signature_files: vec![sig_path],
        ids: (0..signatures.len() as u64).collect(),
        positions: (0..signatures.len()).map(|i| (0, i)).collect(),
        signature_len: signatures[0].len(),
    };
    let (disk_survivors, stats) = index.cluster(&vec![true; signatures.len()], 0.75).expect("clustering from disk");
    let disk_secs = disk_start.elapsed().as_secs_f64();
    assert_eq!(disk_survivors, survivors, "the disk index clusters as the in-memory one does");
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
    println!(
        "  LSH clustering of {} signatures: in memory {memory_cluster_secs:.3} s; disk-backed (write {entries} band entries in sorted runs + merge + read signatures) {disk_secs:.3} s, ratio {:.2}x; {} candidate pairs compared, {} merged, {} LSH collisions refused",
        signatures.len(),
        disk_secs / memory_cluster_secs.max(1e-9),
        stats.compared,
        stats.merged,
        stats.rejected
    );
    if let Some(b) = baseline {
        println!("baseline: {b:.1} s -> speed-up {:.1}x", b / secs);
    }
}
