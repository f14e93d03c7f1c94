//! Entry points for fuzzing hostile input: the coverage-guided targets under `fuzz/`
//! (`cargo +nightly fuzz run warc`) and the regression test that replays the kept corpus and its
//! mutations on stable Rust (`worker/tests/fuzz_corpus.rs`) call these same functions.
//!
//! Each takes arbitrary bytes, must never panic, and checks the property that matters for input an
//! attacker controls: documents bounded by the configured limits whatever a length field claims,
//! token shards that never yield a token outside the vocabulary, checkpoint manifests and object
//! keys that never name a path outside their directory.

use std::io::{BufRead, BufReader, Cursor};

use pretrain_crd::spec::{Extract, SourceFormat};

use crate::checkpoint::Manifest;
use crate::data::extract::extract;
use crate::data::reader::{Item, ReadOptions, read_jsonl, read_parquet, read_warc};
use crate::tokens::shard::TokenShard;

/// Documents larger than this are skipped by the readers under fuzzing.
const MAX_DOCUMENT: u64 = 1 << 16;

/// A fuzz target: arbitrary bytes in, a panic when a property fails.
pub type Target = fn(&[u8]);

/// Every target by name: the names of `fuzz/fuzz_targets/*.rs` and of the corpus directories.
pub const TARGETS: [(&str, Target); 8] = [
    ("warc", warc),
    ("jsonl", jsonl),
    ("parquet", parquet),
    ("html", html),
    ("token_shard", token_shard),
    ("checkpoint_manifest", checkpoint_manifest),
    ("run_manifest", run_manifest),
    ("object_key", object_key),
];

fn options<'a>(format: SourceFormat, extract: &'a Extract) -> ReadOptions<'a> {
    ReadOptions { format, text_field: "text", max_document_bytes: MAX_DOCUMENT, extract }
}

/// Documents stay within the size limit; skipped records say why.
fn check(item: Item) {
    match item {
        Item::Document(d) => {
            assert!(d.text.len() as u64 <= MAX_DOCUMENT, "a document of {} bytes passed the limit", d.text.len());
        }
        Item::Skipped(s) => assert!(!s.reason.is_empty(), "a record was skipped without a reason"),
    }
}

/// WARC, plain and gzip-membered, with HTML extraction of the responses.
pub fn warc(data: &[u8]) {
    let extract = Extract::default();
    for gzip in [false, true] {
        read_warc(Cursor::new(data), gzip, "fuzz.warc", &options(SourceFormat::Warc, &extract), &mut check);
    }
}

/// JSONL, plain and through the gzip and zstd decoders.
pub fn jsonl(data: &[u8]) {
    let extract = Extract::default();
    let options = options(SourceFormat::Jsonl, &extract);
    let plain: Box<dyn BufRead> = Box::new(Cursor::new(data.to_vec()));
    read_jsonl(plain, "fuzz.jsonl", &options, &mut check);
    let gzip: Box<dyn BufRead> =
        Box::new(BufReader::new(flate2::bufread::MultiGzDecoder::new(Cursor::new(data.to_vec()))));
    read_jsonl(gzip, "fuzz.jsonl.gz", &options, &mut check);
    if let Ok(decoder) = zstd::Decoder::with_buffer(Cursor::new(data.to_vec())) {
        read_jsonl(Box::new(BufReader::new(decoder)), "fuzz.jsonl.zst", &options, &mut check);
    }
}

/// Parquet files.
pub fn parquet(data: &[u8]) {
    let extract = Extract::default();
    let _ = read_parquet(
        bytes::Bytes::copy_from_slice(data),
        "fuzz.parquet",
        &options(SourceFormat::Parquet, &extract),
        &mut check,
    );
}

/// HTML extraction, main content only and everything.
pub fn html(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else { return };
    for main_content_only in [true, false] {
        let options = Extract { main_content_only, ..Extract::default() };
        if let Ok(page) = extract(text, &options) {
            assert!(
                page.text.len() <= text.len() * 4 + 64,
                "extraction grew {} bytes into {}",
                text.len(),
                page.text.len()
            );
        }
    }
}

/// Token shards: one that opens yields only tokens below its vocabulary, document by document.
pub fn token_shard(data: &[u8]) {
    let Ok(mut file) = tempfile::NamedTempFile::new() else { return };
    if std::io::Write::write_all(&mut file, data).is_err() {
        return;
    }
    let Ok(shard) = TokenShard::open(file.path()) else { return };
    let mut tokens = Vec::new();
    for d in 0..shard.documents().min(4096) {
        let range = shard.document_range(d);
        assert!(range.start <= range.end && range.end <= shard.len(), "document {d} spans {range:?}");
        tokens.clear();
        shard.read(range, &mut tokens);
        assert!(tokens.iter().all(|t| *t < shard.vocab_size()), "a token outside the vocabulary");
    }
}

/// Checkpoint manifests: every file an accepted manifest lists is a plain name inside the
/// checkpoint's directory.
pub fn checkpoint_manifest(data: &[u8]) {
    let Ok(manifest) = Manifest::parse(data) else { return };
    for f in &manifest.files {
        let local = std::path::Path::new("/ckpt").join(&f.path);
        assert_eq!(local.parent(), Some(std::path::Path::new("/ckpt")), "{:?} leaves the directory", f.path);
        pretrain_store::key(&format!("run/train/ckpt/step-000000001/{}", f.path))
            .expect("a listed file is a valid key");
    }
}

/// Run manifests: parsing and validation report errors, never panic; a valid run hashes.
pub fn run_manifest(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let Ok(run) = pretrain_crd::parse(text, "fuzz.yaml") else { return };
    if pretrain_crd::validate::validate(&run).is_ok() {
        for stage in run.spec.stages() {
            assert_eq!(run.spec.stage_config_hash(stage).len(), 64);
        }
    }
}

/// Object keys: an accepted key has no `.` or `..` segment and is relative, and a stage file named
/// by it stays inside the stage's directory.
pub fn object_key(data: &[u8]) {
    let Ok(raw) = std::str::from_utf8(data) else { return };
    let Ok(key) = pretrain_store::key(raw) else { return };
    assert!(key.parts().all(|p| p.as_ref() != ".." && p.as_ref() != "."), "{raw:?} became {key}");
    let Ok(store) = pretrain_store::Store::open("memory://") else { return };
    let dir = store.stage("run", pretrain_crd::Stage::Train).expect("a valid run name");
    if let Ok(file) = dir.key(raw) {
        assert!(file.as_ref().starts_with("run/train/"), "{raw:?} left the stage directory as {file}");
    }
}
