//! Hostile input on stable Rust: every fuzz target (`pretrain_worker::fuzz`) replays its kept
//! seeds (`fuzz/seeds/<target>/`) and the cases fuzzing found (`fuzz/regressions/<target>/`), then
//! a fixed number of deterministic mutations of each: bit flips, cut and repeated ranges, and length
//! fields pushed to their extremes. Coverage-guided fuzzing runs the same targets under libFuzzer:
//! `scripts/fuzz.sh` (docs/reliability.md).

use std::path::{Path, PathBuf};

use pretrain_worker::fuzz::TARGETS;

/// Mutations tried per kept case.
const MUTATIONS: usize = 1000;

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz")
}

fn cases(target: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let mut found = Vec::new();
    for kind in ["seeds", "regressions"] {
        let Ok(entries) = std::fs::read_dir(fuzz_dir().join(kind).join(target)) else { continue };
        for entry in entries.flatten() {
            found.push((entry.path(), std::fs::read(entry.path()).unwrap()));
        }
    }
    found.sort();
    found
}

/// Deterministic mutations of `input`, the way a fuzzer starts.
fn mutations(input: &[u8], seed: u64) -> impl Iterator<Item = Vec<u8>> + '_ {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut next = move |n: usize| {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        if n == 0 { 0 } else { (x % n as u64) as usize }
    };
    const EXTREMES: [&[u8]; 6] =
        [b"\xff\xff\xff\xff\xff\xff\xff\xff", b"\0\0\0\0", b"18446744073709551615", b"-1", b"99999999999", b"../"];
    (0..MUTATIONS).map(move |_| {
        let mut m = input.to_vec();
        for _ in 0..1 + next(4) {
            let len = m.len();
            match next(6) {
                0 if len > 0 => {
                    let at = next(len);
                    m[at] ^= 1 << next(8);
                }
                1 if len > 0 => {
                    let at = next(len);
                    m.truncate(at);
                }
                2 if len > 1 => {
                    let (a, b) = (next(len), next(len));
                    m.drain(a.min(b)..a.max(b));
                }
                3 if len > 1 => {
                    let (a, b) = (next(len), next(len));
                    let piece = m[a.min(b)..a.max(b)].to_vec();
                    let at = next(len);
                    m.splice(at..at, piece);
                }
                4 => {
                    let at = next(len + 1);
                    m.splice(at..at, EXTREMES[next(EXTREMES.len())].iter().copied());
                }
                _ if len >= 8 => {
                    // Overwrite 8 bytes: where a binary length field sits, it now claims anything.
                    let at = next(len - 7);
                    m[at..at + 8].copy_from_slice(
                        EXTREMES[next(2)].iter().cycle().take(8).copied().collect::<Vec<_>>().as_slice(),
                    );
                }
                _ => m.push(next(256) as u8),
            }
        }
        m
    })
}

#[test]
fn every_kept_case_and_its_mutations_pass_every_target() {
    let mut ran = 0;
    for (target, run) in TARGETS {
        let cases = cases(target);
        assert!(!cases.is_empty(), "fuzz/seeds/{target}/ holds no seed");
        for (i, (path, bytes)) in cases.iter().enumerate() {
            let replay = std::panic::catch_unwind(|| run(bytes));
            assert!(replay.is_ok(), "{target}: {} panics", path.display());
            for (k, mutated) in mutations(bytes, i as u64 * 7919 + target.len() as u64).enumerate() {
                if std::panic::catch_unwind(|| run(&mutated)).is_err() {
                    let keep = std::env::temp_dir().join(format!("{target}-mutation-{i}-{k}"));
                    std::fs::write(&keep, &mutated).unwrap();
                    panic!("{target}: mutation {k} of {} panics; the input is in {}", path.display(), keep.display());
                }
                ran += 1;
            }
        }
    }
    eprintln!("{ran} mutated inputs over {} targets", TARGETS.len());
}

/// Writes the seeds that are produced by this project's own writers (a Parquet file, a token
/// shard): `cargo test -p pretrain-worker --test fuzz_corpus -- --ignored write_generated_seeds`.
#[test]
#[ignore = "writes fuzz/seeds; run by hand when the formats change"]
fn write_generated_seeds() {
    use std::sync::Arc;

    use parquet::data_type::{ByteArray, ByteArrayType};
    use parquet::file::properties::WriterProperties;
    use parquet::file::writer::SerializedFileWriter;
    use parquet::schema::parser::parse_message_type;

    let seeds = fuzz_dir().join("seeds");
    let schema = Arc::new(
        parse_message_type("message doc { required binary id (UTF8); required binary text (UTF8); }").unwrap(),
    );
    let file = std::fs::File::create(seeds.join("parquet/docs.parquet")).unwrap();
    let mut writer = SerializedFileWriter::new(file, schema, Arc::new(WriterProperties::default())).unwrap();
    let mut group = writer.next_row_group().unwrap();
    for column in [["a", "b"], ["first document text", "second document text"]] {
        let values: Vec<ByteArray> = column.iter().map(|s| ByteArray::from(*s)).collect();
        let mut col = group.next_column().unwrap().unwrap();
        col.typed::<ByteArrayType>().write_batch(&values, None, None).unwrap();
        col.close().unwrap();
    }
    group.close().unwrap();
    writer.close().unwrap();

    let mut shard =
        pretrain_worker::tokens::shard::ShardWriter::create(&seeds.join("token_shard/two.tok"), 300).unwrap();
    shard.push(&[5, 17, 299, 0]).unwrap();
    shard.push(&[42, 0]).unwrap();
    shard.finish().unwrap();
}
