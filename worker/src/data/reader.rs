//! Raw inputs to documents: WARC (HTML responses are extracted), JSONL (plain, `.gz`, `.zst`) and
//! plain text, from local paths or object-store URLs with globs. Streaming: one record or line in
//! memory at a time. A malformed record is reported with its file and offset and skipped; a source
//! that cannot be opened is an error naming it.

use std::fs::File;
use std::io::{self, BufRead, BufReader, Read};
use std::path::{Path, PathBuf};

use pretrain_crd::spec::{Extract, SourceFormat};

use super::charset::decode_html;
use super::extract::extract;
use super::warc::{WarcReader, http_payload};

/// A document as read from its source, before any filter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawDocument {
    /// Stable id: the record id, the JSON `id`, or `file:line`.
    pub id: String,
    /// The text (extracted, for HTML).
    pub text: String,
    /// Where the document came from on the web, when known.
    pub url: Option<String>,
    /// The page title, when known.
    pub title: Option<String>,
    /// The charset a web page was decoded from, when it was not UTF-8.
    pub charset: Option<&'static str>,
}

pub use pretrain_store::artifact::Skipped;

/// What a reader yields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Item {
    /// A document.
    Document(RawDocument),
    /// A record that could not be used.
    Skipped(Skipped),
}

/// A source that cannot be read at all.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// Opening or reading the file failed.
    #[error("{file}: {source}")]
    Io {
        /// The file or URL.
        file: String,
        /// The OS error.
        source: io::Error,
    },
    /// The glob is malformed or matched nothing.
    #[error("{url}: {reason}")]
    Source {
        /// The source URL.
        url: String,
        /// What is wrong.
        reason: String,
    },
}

/// A source that matches nothing, or a file that is missing or may not be read, is invalid: no
/// retry can make it appear; another I/O failure fails the attempt.
impl From<ReadError> for crate::frame::StageError {
    fn from(e: ReadError) -> Self {
        use std::io::ErrorKind;
        match &e {
            ReadError::Source { .. } => Self::Invalid(Box::new(e)),
            ReadError::Io { source, .. }
                if matches!(source.kind(), ErrorKind::NotFound | ErrorKind::PermissionDenied) =>
            {
                Self::Invalid(Box::new(e))
            }
            ReadError::Io { .. } => Self::Failed(Box::new(e)),
        }
    }
}

/// How to read one source's files.
#[derive(Debug, Clone)]
pub struct ReadOptions<'a> {
    /// File format.
    pub format: SourceFormat,
    /// JSON field that holds the text.
    pub text_field: &'a str,
    /// Larger documents are skipped.
    pub max_document_bytes: u64,
    /// HTML extraction settings.
    pub extract: &'a Extract,
}

/// The local files a source URL names, sorted: a path, `file://` URL, or glob (`*`, `?`, `[..]`, `**`).
pub fn local_files(url: &str) -> Result<Vec<PathBuf>, ReadError> {
    let pattern = url.strip_prefix("file://").unwrap_or(url);
    let source_error = |reason: String| ReadError::Source { url: url.into(), reason };
    let paths = glob::glob(pattern).map_err(|e| source_error(format!("bad glob: {e}")))?;
    let mut files = Vec::new();
    for entry in paths {
        let path = entry.map_err(|e| ReadError::Io { file: e.path().display().to_string(), source: e.into() })?;
        if path.is_file() {
            files.push(path);
        }
    }
    files.sort();
    if files.is_empty() {
        return Err(source_error("matches no file".into()));
    }
    Ok(files)
}

/// The keys a source names in an object store, sorted. `url` is the source URL for messages
/// (`s3://bucket/crawl/*/warc/*.warc.gz`), `pattern` its key glob inside the bucket
/// (`crawl/*/warc/*.warc.gz`). Listing starts at the pattern's literal prefix, so a glob deep in a
/// bucket does not list the whole bucket.
pub async fn remote_keys(
    store: &pretrain_store::Store,
    url: &str,
    pattern: &str,
) -> Result<Vec<object_store::path::Path>, ReadError> {
    let source_error = |reason: String| ReadError::Source { url: url.into(), reason };
    let matcher = glob::Pattern::new(pattern).map_err(|e| source_error(format!("bad glob: {e}")))?;
    let literal_end = pattern.find(['*', '?', '[']).unwrap_or(pattern.len());
    let prefix = pattern[..literal_end].rsplit_once('/').map_or("", |(dir, _)| dir);
    let keys = if prefix.is_empty() {
        store.list(&Default::default()).await
    } else {
        match pretrain_store::key(prefix) {
            Ok(key) => store.list(&key).await,
            Err(e) => return Err(source_error(e.to_string())),
        }
    }
    .map_err(|e| source_error(e.to_string()))?;
    let options = glob::MatchOptions { require_literal_separator: true, ..Default::default() };
    let matched: Vec<_> = keys.into_iter().filter(|k| matcher.matches_with(k.as_ref(), options)).collect();
    if matched.is_empty() {
        return Err(source_error("matches no object".into()));
    }
    Ok(matched)
}

/// Downloads (streams) one source object into `dest_dir`, keeping its extension (readers pick
/// decompression by it); `n` keeps names unique.
pub async fn download(
    store: &pretrain_store::Store,
    url: &str,
    key: &object_store::path::Path,
    dest_dir: &Path,
    n: usize,
) -> Result<PathBuf, ReadError> {
    let path = dest_dir.join(format!("{n:06}-{}", key.filename().unwrap_or("object")));
    store.download(key, &path).await.map_err(|e| ReadError::Source { url: url.into(), reason: e.to_string() })?;
    Ok(path)
}

/// Every object a source names, downloaded into `dest` (see `remote_keys`).
pub async fn remote_files(
    store: &pretrain_store::Store,
    url: &str,
    pattern: &str,
    dest: &Path,
) -> Result<Vec<PathBuf>, ReadError> {
    let mut files = Vec::new();
    for (i, key) in remote_keys(store, url, pattern).await?.iter().enumerate() {
        files.push(download(store, url, key, dest, i).await?);
    }
    Ok(files)
}

/// Reads one file, passing every document and every skipped record to `emit`.
pub fn read_file(path: &Path, options: &ReadOptions<'_>, emit: &mut dyn FnMut(Item)) -> Result<(), ReadError> {
    let name = path.display().to_string();
    let io_error = |source: io::Error| ReadError::Io { file: name.clone(), source };
    let file = File::open(path).map_err(io_error)?;
    let lower = name.to_ascii_lowercase();
    match options.format {
        SourceFormat::Warc => {
            let gzip = lower.ends_with(".gz");
            read_warc(BufReader::with_capacity(1 << 20, file), gzip, &name, options, emit);
            Ok(())
        }
        SourceFormat::Jsonl => {
            let reader = decompressed(file, &lower).map_err(io_error)?;
            read_jsonl(reader, &name, options, emit);
            Ok(())
        }
        SourceFormat::Text => {
            let mut reader = decompressed(file, &lower).map_err(io_error)?;
            let mut bytes = Vec::new();
            let n = reader
                .by_ref()
                .take(options.max_document_bytes.saturating_add(1))
                .read_to_end(&mut bytes)
                .map_err(io_error)?;
            if n as u64 > options.max_document_bytes {
                emit(Item::Skipped(Skipped {
                    file: name,
                    offset: 0,
                    reason: format!(
                        "document exceeds the {}-byte limit (maxDocumentBytes)",
                        options.max_document_bytes
                    ),
                }));
                return Ok(());
            }
            match String::from_utf8(bytes) {
                Ok(text) => emit(Item::Document(RawDocument { id: name, text, url: None, title: None, charset: None })),
                Err(e) => emit(Item::Skipped(Skipped {
                    file: name,
                    offset: e.utf8_error().valid_up_to() as u64,
                    reason: "invalid UTF-8".into(),
                })),
            }
            Ok(())
        }
        SourceFormat::Parquet => read_parquet(file, &name, options, emit),
    }
}

/// Reads the text column (and `id`, `url`, `title` when present) of a Parquet file, row group by row
/// group; only those columns are decoded. A row whose text is missing or too large is skipped with
/// its row number.
///
/// The Parquet decoder asserts on some malformed files instead of returning an error; such a panic
/// ends the file like a damaged page does, so one hostile file cannot take the stage down.
pub(crate) fn read_parquet<R: parquet::file::reader::ChunkReader + 'static>(
    file: R,
    name: &str,
    options: &ReadOptions<'_>,
    emit: &mut dyn FnMut(Item),
) -> Result<(), ReadError> {
    let mut rows = 0u64;
    let mut counting = |item: Item| {
        rows += 1;
        emit(item);
    };
    let read = std::panic::AssertUnwindSafe(|| read_parquet_rows(file, name, options, &mut counting));
    match std::panic::catch_unwind(read) {
        Ok(result) => result,
        Err(panic) => {
            let why = panic
                .downcast_ref::<&str>()
                .map(|s| (*s).to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "no message".into());
            emit(Item::Skipped(Skipped {
                file: name.to_string(),
                offset: rows,
                reason: format!("unreadable from here on: the Parquet decoder failed: {why}"),
            }));
            Ok(())
        }
    }
}

fn read_parquet_rows<R: parquet::file::reader::ChunkReader + 'static>(
    file: R,
    name: &str,
    options: &ReadOptions<'_>,
    emit: &mut dyn FnMut(Item),
) -> Result<(), ReadError> {
    use parquet::file::reader::{FileReader, SerializedFileReader};
    use parquet::record::Field;
    use parquet::schema::types::Type;

    let source_error = |reason: String| ReadError::Source { url: name.into(), reason };
    let reader =
        SerializedFileReader::new(file).map_err(|e| source_error(format!("not a readable Parquet file: {e}")))?;
    let wanted = [options.text_field, "id", "url", "title"];
    let schema = reader.metadata().file_metadata().schema_descr_ptr();
    let fields: Vec<_> =
        schema.root_schema().get_fields().iter().filter(|f| wanted.contains(&f.name())).cloned().collect();
    if !fields.iter().any(|f| f.name() == options.text_field) {
        return Err(source_error(format!("has no column {:?}", options.text_field)));
    }
    let projection = Type::group_type_builder(schema.root_schema().name())
        .with_fields(fields)
        .build()
        .map_err(|e| source_error(e.to_string()))?;
    let rows = reader.get_row_iter(Some(projection)).map_err(|e| source_error(e.to_string()))?;
    let skip = |row: u64, reason: String| Item::Skipped(Skipped { file: name.to_string(), offset: row, reason });
    for (row_no, row) in rows.enumerate() {
        let row_no = row_no as u64;
        let row = match row {
            Ok(row) => row,
            Err(e) => {
                // A damaged page ends what can be read of this file.
                emit(skip(row_no, format!("unreadable from here on: {e}")));
                return Ok(());
            }
        };
        let (mut text, mut id, mut url, mut title) = (None, None, None, None);
        for (column, value) in row.get_column_iter() {
            let string = match value {
                Field::Str(s) => Some(s.clone()),
                Field::Long(n) => Some(n.to_string()),
                Field::Int(n) => Some(n.to_string()),
                _ => None,
            };
            match column.as_str() {
                c if c == options.text_field => text = string,
                "id" => id = string,
                "url" => url = string,
                "title" => title = string,
                _ => {}
            }
        }
        let Some(text) = text else {
            emit(skip(row_no, format!("no string in column {:?}", options.text_field)));
            continue;
        };
        if text.len() as u64 > options.max_document_bytes {
            emit(skip(
                row_no,
                format!("document exceeds the {}-byte limit (maxDocumentBytes)", options.max_document_bytes),
            ));
            continue;
        }
        let id = id.unwrap_or_else(|| format!("{name}#{row_no}"));
        emit(Item::Document(RawDocument { id, text, url, title, charset: None }));
    }
    Ok(())
}

/// The file's bytes, decompressed by extension (`.gz`, `.zst`).
fn decompressed(file: File, lower_name: &str) -> io::Result<Box<dyn BufRead>> {
    let buffered = BufReader::with_capacity(1 << 20, file);
    Ok(if lower_name.ends_with(".gz") {
        Box::new(BufReader::new(flate2::bufread::MultiGzDecoder::new(buffered)))
    } else if lower_name.ends_with(".zst") || lower_name.ends_with(".zstd") {
        Box::new(BufReader::new(zstd::Decoder::with_buffer(buffered)?))
    } else {
        Box::new(buffered)
    })
}

pub(crate) fn read_warc<R: BufRead + std::io::Seek>(
    input: R,
    gzip: bool,
    name: &str,
    options: &ReadOptions<'_>,
    emit: &mut dyn FnMut(Item),
) {
    let skip = |offset, reason: String| Item::Skipped(Skipped { file: name.to_string(), offset, reason });
    for item in WarcReader::new(input, gzip, options.max_document_bytes) {
        let record = match item {
            Ok(record) => record,
            Err(damage) => {
                emit(skip(damage.offset, damage.reason));
                continue;
            }
        };
        let kind = record.header("WARC-Type").unwrap_or_default().to_ascii_lowercase();
        let url = record.header("WARC-Target-URI").map(str::to_string);
        let id = record.header("WARC-Record-ID").map_or_else(|| format!("{name}@{}", record.offset), str::to_string);
        match kind.as_str() {
            "response" => {
                let (content_type, body) = match http_payload(&record.block) {
                    Ok(payload) => payload,
                    Err(reason) => {
                        emit(skip(record.offset, reason));
                        continue;
                    }
                };
                let is_html = content_type.as_deref().is_none_or(|t| t.contains("html"));
                if !is_html {
                    emit(skip(record.offset, format!("content type {} is not HTML", content_type.unwrap_or_default())));
                    continue;
                }
                let html = decode_html(body, content_type.as_deref(), url.as_deref());
                match extract(&html.text, options.extract) {
                    Ok(page) => emit(Item::Document(RawDocument {
                        id,
                        text: page.text,
                        url,
                        title: page.title,
                        charset: html.charset,
                    })),
                    Err(reason) => emit(skip(record.offset, reason)),
                }
            }
            // WET files: the text was extracted already.
            "conversion" => match String::from_utf8(record.block) {
                Ok(text) => emit(Item::Document(RawDocument { id, text, url, title: None, charset: None })),
                Err(_) => emit(skip(record.offset, "invalid UTF-8".into())),
            },
            // warcinfo, request, metadata, revisit: not documents.
            _ => {}
        }
    }
}

pub(crate) fn read_jsonl(
    mut input: Box<dyn BufRead>,
    name: &str,
    options: &ReadOptions<'_>,
    emit: &mut dyn FnMut(Item),
) {
    let skip = |line: u64, reason: String| Item::Skipped(Skipped { file: name.to_string(), offset: line, reason });
    let mut buf = Vec::new();
    let mut line_no = 0u64;
    loop {
        line_no += 1;
        match read_bounded_line(&mut input, options.max_document_bytes, &mut buf) {
            Ok(Line::End) => return,
            Ok(Line::TooLong) => {
                emit(skip(
                    line_no,
                    format!("line exceeds the {}-byte limit (maxDocumentBytes)", options.max_document_bytes),
                ));
                continue;
            }
            Ok(Line::Complete) => {}
            Err(e) => {
                // A damaged compressed stream cannot be resumed; what was read so far stands.
                emit(skip(line_no, format!("unreadable from here on: {e}")));
                return;
            }
        }
        if buf.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let value: serde_json::Value = match serde_json::from_slice(&buf) {
            Ok(v) => v,
            Err(e) => {
                emit(skip(line_no, format!("invalid JSON: {e}")));
                continue;
            }
        };
        let Some(text) = value.get(options.text_field).and_then(|t| t.as_str()) else {
            emit(skip(line_no, format!("no string field {:?}", options.text_field)));
            continue;
        };
        let id = match value.get("id") {
            Some(serde_json::Value::String(s)) => s.clone(),
            Some(serde_json::Value::Number(n)) => n.to_string(),
            _ => format!("{name}:{line_no}"),
        };
        let field = |k: &str| value.get(k).and_then(|v| v.as_str()).map(str::to_string);
        emit(Item::Document(RawDocument {
            id,
            text: text.to_string(),
            url: field("url"),
            title: field("title"),
            charset: None,
        }));
    }
}

enum Line {
    Complete,
    TooLong,
    End,
}

/// Reads one line into `buf` unless it is longer than `max` bytes, in which case the rest of the line
/// is skipped without being held in memory.
fn read_bounded_line<R: BufRead + ?Sized>(r: &mut R, max: u64, buf: &mut Vec<u8>) -> io::Result<Line> {
    buf.clear();
    let mut too_long = false;
    let mut any = false;
    loop {
        let available = r.fill_buf()?;
        if available.is_empty() {
            return Ok(if !any {
                Line::End
            } else if too_long {
                Line::TooLong
            } else {
                Line::Complete
            });
        }
        any = true;
        let (chunk, done) = match memchr::memchr(b'\n', available) {
            Some(i) => (&available[..i], Some(i + 1)),
            None => (available, None),
        };
        if !too_long {
            if (buf.len() + chunk.len()) as u64 > max {
                too_long = true;
                buf.clear();
            } else {
                buf.extend_from_slice(chunk);
            }
        }
        let used = done.unwrap_or(available.len());
        r.consume(used);
        if done.is_some() {
            return Ok(if too_long { Line::TooLong } else { Line::Complete });
        }
    }
}
