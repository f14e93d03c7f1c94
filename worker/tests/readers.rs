//! Readers on real and damaged files: every bad record is counted with its file and offset, the rest
//! is read.

use std::io::Write;
use std::path::{Path, PathBuf};

use flate2::Compression;
use flate2::write::GzEncoder;
use pretrain_crd::spec::{Extract, SourceFormat};
use pretrain_worker::data::reader::{Item, ReadOptions, local_files, read_file};

fn corpus(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/corpus").join(name)
}

fn read(path: &Path, format: SourceFormat, max: u64) -> (Vec<pretrain_worker::data::reader::RawDocument>, Vec<String>) {
    let extract = Extract::default();
    let options = ReadOptions { format, text_field: "text", max_document_bytes: max, extract: &extract };
    let (mut docs, mut skipped) = (Vec::new(), Vec::new());
    read_file(path, &options, &mut |item| match item {
        Item::Document(d) => docs.push(d),
        Item::Skipped(s) => skipped.push(format!("{}@{}: {}", s.file.rsplit('/').next().unwrap(), s.offset, s.reason)),
    })
    .unwrap();
    (docs, skipped)
}

fn warc_record(uri: &str, html: &str) -> Vec<u8> {
    warc_response(uri, "text/html; charset=utf-8", html.as_bytes())
}

/// A WARC response record of an HTTP response with `content_type` and `body`.
fn warc_response(uri: &str, content_type: &str, body: &[u8]) -> Vec<u8> {
    let mut http = format!("HTTP/1.1 200 OK\r\nContent-Type: {content_type}\r\n\r\n").into_bytes();
    http.extend_from_slice(body);
    let mut rec = format!(
        "WARC/1.0\r\nWARC-Type: response\r\nWARC-Target-URI: {uri}\r\nWARC-Record-ID: <urn:{uri}>\r\nContent-Length: {}\r\n\r\n",
        http.len()
    )
    .into_bytes();
    rec.extend_from_slice(&http);
    rec.extend_from_slice(b"\r\n\r\n");
    rec
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut enc = GzEncoder::new(Vec::new(), Compression::fast());
    enc.write_all(bytes).unwrap();
    enc.finish().unwrap()
}

fn page(n: usize) -> String {
    format!(
        "<html><head><title>Page {n}</title></head><body><main><p>Paragraph number {n} of the test crawl.</p></main></body></html>"
    )
}

#[test]
fn warc_gz_survives_a_truncated_member_and_garbage() {
    let tmp = tempfile::tempdir().unwrap();
    let members: Vec<Vec<u8>> = (0..5).map(|i| gzip(&warc_record(&format!("https://x/{i}"), &page(i)))).collect();
    let mut file = Vec::new();
    file.extend_from_slice(&members[0]);
    let damaged_at = file.len();
    file.extend_from_slice(&members[1][..members[1].len() / 2]); // truncated member
    file.extend_from_slice(&members[2]);
    file.extend_from_slice(b"\x00\x01garbage between members\x1f\x1f");
    file.extend_from_slice(&members[3]);
    file.extend_from_slice(&members[4]);
    let path = tmp.path().join("crawl.warc.gz");
    std::fs::write(&path, &file).unwrap();

    let (docs, skipped) = read(&path, SourceFormat::Warc, 1 << 20);
    let urls: Vec<&str> = docs.iter().map(|d| d.url.as_deref().unwrap()).collect();
    assert_eq!(urls, ["https://x/0", "https://x/2", "https://x/3", "https://x/4"]);
    assert_eq!(docs[0].title.as_deref(), Some("Page 0"));
    assert_eq!(docs[0].text, "Paragraph number 0 of the test crawl.");
    assert_eq!(skipped.len(), 2, "{skipped:?}");
    assert!(skipped[0].starts_with(&format!("crawl.warc.gz@{damaged_at}: ")), "{skipped:?}");
}

#[test]
fn plain_warc_resumes_after_a_broken_record_and_skips_oversized_ones() {
    let tmp = tempfile::tempdir().unwrap();
    let mut file = warc_record("https://x/a", &page(1));
    file.extend_from_slice(b"WARC/1.0\r\nWARC-Type: response\r\nContent-Length: banana\r\n\r\nnoise\r\n\r\n");
    file.extend_from_slice(&warc_record("https://x/big", &"<p>big</p>".repeat(1000)));
    file.extend_from_slice(&warc_record("https://x/b", &page(2)));
    let path = tmp.path().join("plain.warc");
    std::fs::write(&path, &file).unwrap();
    let (docs, skipped) = read(&path, SourceFormat::Warc, 4096);
    let urls: Vec<&str> = docs.iter().map(|d| d.url.as_deref().unwrap()).collect();
    assert_eq!(urls, ["https://x/a", "https://x/b"]);
    assert_eq!(skipped.len(), 2, "{skipped:?}");
    assert!(skipped[0].contains("Content-Length is not a number"), "{skipped:?}");
    assert!(skipped[1].contains("exceeds the 4096-byte limit"), "{skipped:?}");
}

/// A page served in Latin-1 (declared in the HTTP header) and one in Shift_JIS (declared nowhere) are
/// read, decoded, and say which charset they came in.
#[test]
fn pages_in_other_charsets_are_decoded_not_dropped() {
    let tmp = tempfile::tempdir().unwrap();
    let german = "<html><body><main><p>Schöne Grüße aus München und Köln.</p></main></body></html>";
    let japanese = "<html><body><main><p>日本語のウェブページです。東京の天気は晴れです。今日はとても良い天気ですね。</p></main></body></html>";
    let mut file =
        warc_response("https://x.de/a", "text/html; charset=iso-8859-1", &encoding_rs::WINDOWS_1252.encode(german).0);
    file.extend(warc_response("https://x.jp/b", "text/html", &encoding_rs::SHIFT_JIS.encode(japanese).0));
    let path = tmp.path().join("charsets.warc");
    std::fs::write(&path, &file).unwrap();
    let (docs, skipped) = read(&path, SourceFormat::Warc, 1 << 20);
    assert!(skipped.is_empty(), "{skipped:?}");
    let got: Vec<(&str, Option<&str>)> = docs.iter().map(|d| (d.text.as_str(), d.charset)).collect();
    assert_eq!(
        got,
        [
            ("Schöne Grüße aus München und Köln.", Some("windows-1252")),
            ("日本語のウェブページです。東京の天気は晴れです。今日はとても良い天気ですね。", Some("Shift_JIS"))
        ]
    );
}

#[test]
fn jsonl_counts_broken_lines_and_keeps_the_rest() {
    let tmp = tempfile::tempdir().unwrap();
    let lines = [
        r#"{"id": "a", "text": "first"}"#,
        r#"{"text": "no closing brace""#,
        r#"{"id": 7, "content": "wrong field"}"#,
        &format!(r#"{{"id": "huge", "text": "{}"}}"#, "x".repeat(5000)),
        "",
        r#"{"text": "last", "url": "https://y"}"#,
    ];
    let mut raw = lines.join("\n").into_bytes();
    raw.extend_from_slice(b"\n{\"text\": \"bad \xff utf8\"}\n");
    let path = tmp.path().join("docs.jsonl.gz");
    std::fs::write(&path, gzip(&raw)).unwrap();
    let (docs, skipped) = read(&path, SourceFormat::Jsonl, 1000);
    let ids: Vec<&str> = docs.iter().map(|d| d.id.as_str()).collect();
    assert_eq!(ids[0], "a");
    assert!(ids[1].ends_with("docs.jsonl.gz:6"), "{ids:?}");
    assert_eq!(docs[1].url.as_deref(), Some("https://y"));
    assert_eq!(skipped.len(), 4, "{skipped:#?}");
    assert!(skipped[0].starts_with("docs.jsonl.gz@2: invalid JSON"));
    assert!(skipped[1].starts_with("docs.jsonl.gz@3: no string field \"text\""));
    assert!(skipped[2].starts_with("docs.jsonl.gz@4: line exceeds the 1000-byte limit"));
    assert!(skipped[3].starts_with("docs.jsonl.gz@7: invalid JSON"));

    // A truncated gzip stream keeps what was read and reports where it stopped.
    let mut many = Vec::new();
    for _ in 0..2000 {
        many.extend_from_slice(lines[0].as_bytes());
        many.push(b'\n');
    }
    let compressed = gzip(&many);
    std::fs::write(&path, &compressed[..compressed.len() - 40]).unwrap();
    let (docs, skipped) = read(&path, SourceFormat::Jsonl, 1000);
    assert!(docs.len() > 1000 && docs.len() < 2000, "{}", docs.len());
    assert_eq!(skipped.len(), 1);
    assert!(skipped[0].contains("unreadable from here on"), "{skipped:?}");
}

#[test]
fn globs_expand_sorted_and_an_empty_match_names_the_source() {
    let tmp = tempfile::tempdir().unwrap();
    for name in ["b.jsonl", "a.jsonl", "c.txt"] {
        std::fs::write(tmp.path().join(name), "{}").unwrap();
    }
    let files = local_files(&format!("{}/*.jsonl", tmp.path().display())).unwrap();
    let names: Vec<&str> = files.iter().map(|p| p.file_name().unwrap().to_str().unwrap()).collect();
    assert_eq!(names, ["a.jsonl", "b.jsonl"]);
    let err = local_files(&format!("file://{}/*.parquet", tmp.path().display())).unwrap_err().to_string();
    assert!(err.ends_with("*.parquet: matches no file"), "{err}");
}

#[tokio::test]
async fn object_store_globs_list_from_the_literal_prefix_and_download() {
    use pretrain_store::{Store, key};
    let store = Store::open("memory://").unwrap();
    for k in
        ["crawl/seg-1/warc/a.warc.gz", "crawl/seg-2/warc/b.warc.gz", "crawl/seg-2/wet/c.warc.gz", "other/d.warc.gz"]
    {
        store.put(&key(k).unwrap(), bytes::Bytes::from(k.as_bytes().to_vec())).await.unwrap();
    }
    let tmp = tempfile::tempdir().unwrap();
    let files = pretrain_worker::data::reader::remote_files(
        &store,
        "s3://b/crawl/*/warc/*.warc.gz",
        "crawl/*/warc/*.warc.gz",
        tmp.path(),
    )
    .await
    .unwrap();
    let names: Vec<String> = files.iter().map(|p| p.file_name().unwrap().to_string_lossy().into_owned()).collect();
    assert_eq!(names, ["000000-a.warc.gz", "000001-b.warc.gz"]);
    assert_eq!(std::fs::read(&files[1]).unwrap(), b"crawl/seg-2/warc/b.warc.gz");
    let err = pretrain_worker::data::reader::remote_files(&store, "s3://b/x/*.jsonl", "x/*.jsonl", tmp.path())
        .await
        .unwrap_err()
        .to_string();
    assert_eq!(err, "s3://b/x/*.jsonl: matches no object");
}

#[test]
fn shared_corpus_reads_without_damage() {
    let (code, skipped) = read(&corpus("code-python-stdlib.jsonl.gz"), SourceFormat::Jsonl, 8 << 20);
    assert_eq!((code.len(), skipped.len()), (168, 0));
    let (legal, skipped) = read(&corpus("legal-debian.jsonl.gz"), SourceFormat::Jsonl, 8 << 20);
    assert_eq!((legal.len(), skipped.len()), (726, 0));
}

/// The whole crawl (6,023 pages): slow in debug builds, so run it with
/// `cargo test -p pretrain-worker --release -- --ignored`.
#[test]
#[ignore]
fn shared_warc_reads_every_page() {
    let (docs, skipped) = read(&corpus("web-rustdocs-1.95.warc.gz"), SourceFormat::Warc, 8 << 20);
    assert_eq!(docs.len() + skipped.len(), 6023, "{skipped:?}");
    assert!(skipped.len() < 10, "{skipped:?}");
}

#[test]
fn parquet_reads_the_text_column_and_skips_bad_rows() {
    use std::sync::Arc;

    use parquet::data_type::{ByteArray, ByteArrayType, Int64Type};
    use parquet::file::properties::WriterProperties;
    use parquet::file::writer::SerializedFileWriter;
    use parquet::schema::parser::parse_message_type;

    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("code.parquet");
    let schema = Arc::new(
        parse_message_type(
            "message doc { required int64 id; optional binary content (UTF8); required binary lang (UTF8); }",
        )
        .unwrap(),
    );
    let mut writer =
        SerializedFileWriter::new(std::fs::File::create(&path).unwrap(), schema, Arc::new(WriterProperties::default()))
            .unwrap();
    let mut group = writer.next_row_group().unwrap();
    let ids = [10i64, 11, 12, 13];
    // Row 12 has no content; row 13 is larger than the limit.
    let contents: Vec<ByteArray> = ["def f():\n    return 1\n", "print('hi')\n", &"x".repeat(500)]
        .iter()
        .map(|s| ByteArray::from(s.as_bytes().to_vec()))
        .collect();
    let definition = [1i16, 1, 0, 1];
    let langs: Vec<ByteArray> = (0..4).map(|_| ByteArray::from("python")).collect();
    let mut column = group.next_column().unwrap().unwrap();
    column.typed::<Int64Type>().write_batch(&ids, None, None).unwrap();
    column.close().unwrap();
    let mut column = group.next_column().unwrap().unwrap();
    column.typed::<ByteArrayType>().write_batch(&contents, Some(&definition), None).unwrap();
    column.close().unwrap();
    let mut column = group.next_column().unwrap().unwrap();
    column.typed::<ByteArrayType>().write_batch(&langs, None, None).unwrap();
    column.close().unwrap();
    group.close().unwrap();
    writer.close().unwrap();

    let extract = Extract::default();
    let options = ReadOptions {
        format: SourceFormat::Parquet,
        text_field: "content",
        max_document_bytes: 100,
        extract: &extract,
    };
    let (mut docs, mut skipped) = (Vec::new(), Vec::new());
    read_file(&path, &options, &mut |item| match item {
        Item::Document(d) => docs.push((d.id, d.text)),
        Item::Skipped(s) => skipped.push((s.offset, s.reason)),
    })
    .unwrap();
    assert_eq!(docs, [("10".into(), "def f():\n    return 1\n".into()), ("11".into(), "print('hi')\n".into())]);
    assert_eq!(skipped.len(), 2, "{skipped:?}");
    assert_eq!(skipped[0], (2, "no string in column \"content\"".into()));
    assert!(skipped[1].1.contains("exceeds the 100-byte limit"), "{skipped:?}");

    let missing = ReadOptions { text_field: "text", ..options };
    let err = read_file(&path, &missing, &mut |_| {}).unwrap_err().to_string();
    assert!(err.ends_with("code.parquet: has no column \"text\""), "{err}");
    std::fs::write(&path, b"not parquet at all").unwrap();
    let err = read_file(&path, &options, &mut |_| {}).unwrap_err().to_string();
    assert!(err.contains("not a readable Parquet file"), "{err}");
}
