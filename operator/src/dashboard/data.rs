//! What the dashboard reads from a run's store: `metrics.jsonl` followed as it grows, and the stages'
//! committed statistics and eval tables. Every read is of whole objects or of one version of an
//! object (stores replace objects atomically), and a file that is not there yet, or not readable yet,
//! is shown as such instead of failing the page.

use bytes::Bytes;
use pretrain_crd::Stage;
use pretrain_store::Store;
use pretrain_store::artifact::{DataPrepStats, MetricsLine, TokenizeStats};
use serde::Serialize;

/// At most this many bytes of `metrics.jsonl` per request (about 10,000 steps); the page asks again
/// while `more` is set.
pub const METRICS_CHUNK: u64 = 4 << 20;

/// A part of a stage's `metrics.jsonl` for a reader following it.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct MetricsChunk {
    /// The file is not the one the reader followed (a resume from an older checkpoint rewrote it):
    /// drop what was read before; `lines` start from the beginning.
    pub reset: bool,
    /// Where to read from next: the end of the last whole line returned.
    pub next: u64,
    /// The last whole line before `next`, to send back with it ([`Cursor::mark`]).
    pub mark: Option<String>,
    /// Bytes remain past `next` (more than one chunk was new).
    pub more: bool,
    /// The whole lines after the reader's offset, in order.
    pub lines: Vec<MetricsLine>,
}

/// Where a reader of `metrics.jsonl` stands: the offset it reached, and the mark of the line that
/// ends there (the file is rewritten when a run resumes from an older checkpoint, and the line
/// there may then differ even where its length does not).
#[derive(Debug, Clone, Default, serde::Deserialize)]
pub struct Cursor {
    /// Byte offset: the end of the last whole line read (0: from the start).
    #[serde(default)]
    pub offset: u64,
    /// The `mark` of the chunk that ended there.
    #[serde(default)]
    pub mark: Option<String>,
}

/// `LEN-HASH` of a line (its newline included): its length and the first 8 bytes of its sha256.
fn mark(line: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    format!("{}-{}", line.len(), hex::encode(&Sha256::digest(line)[..8]))
}

/// The whole lines of `stage`'s `metrics.jsonl` past `cursor` (a trailing line without its newline
/// waits for the next read). The file only grows between checkpoints and is rewritten by a resume;
/// a reader whose offset no longer ends the line it read last starts again from the beginning.
pub async fn metrics_since(
    store: &Store,
    run: &str,
    stage: Stage,
    cursor: &Cursor,
) -> Result<MetricsChunk, pretrain_store::Error> {
    let key = store.stage(run, stage)?.key("metrics.jsonl")?;
    let last = cursor.mark.as_deref().and_then(|m| m.split_once('-')).and_then(|(len, _)| len.parse::<u64>().ok());
    if cursor.offset > 0
        && let Some(len) = last.filter(|len| (1..=cursor.offset).contains(len))
    {
        // Read from the start of the reader's last line, to check it is still there.
        let read = store.read_from(&key, cursor.offset - len, METRICS_CHUNK + len).await?;
        if let Some((bytes, size)) = read
            && size >= cursor.offset
            && bytes.len() as u64 >= len
            && Some(mark(&bytes[..len as usize])) == cursor.mark
        {
            let mut chunk = chunk(&bytes.slice(len as usize..), cursor.offset, size);
            chunk.mark = chunk.mark.or_else(|| cursor.mark.clone());
            return Ok(chunk);
        }
    }
    let Some((bytes, size)) = store.read_from(&key, 0, METRICS_CHUNK).await? else {
        return Ok(MetricsChunk { reset: cursor.offset > 0, next: 0, mark: None, more: false, lines: Vec::new() });
    };
    Ok(MetricsChunk { reset: cursor.offset > 0, ..chunk(&bytes, 0, size) })
}

/// The whole lines of `bytes`, read at `offset` of a file of `size` bytes.
fn chunk(bytes: &Bytes, offset: u64, size: u64) -> MetricsChunk {
    let whole = bytes.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
    let lines = bytes[..whole]
        .split(|b| *b == b'\n')
        .filter(|l| !l.is_empty())
        .filter_map(|l| serde_json::from_slice::<MetricsLine>(l).ok())
        .collect();
    let last_start = bytes[..whole.saturating_sub(1)].iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
    let mark = (whole > 0).then(|| mark(&bytes[last_start..whole]));
    let (next, read_to) = (offset + whole as u64, offset + bytes.len() as u64);
    MetricsChunk { reset: false, next, mark, more: read_to < size, lines }
}

/// A value read from the store for the page: there, not there yet, or there but not readable.
#[derive(Debug, Clone, PartialEq)]
pub enum Found<T> {
    /// Read.
    Yes(T),
    /// Not written yet.
    No,
    /// Written but not readable (still being written by a store without atomic writes, or damaged):
    /// why.
    Unreadable(String),
}

impl<T> Found<T> {
    /// The value, if read.
    pub fn get(&self) -> Option<&T> {
        match self {
            Self::Yes(v) => Some(v),
            _ => None,
        }
    }
}

/// What a run's page shows from its store besides the curves.
#[derive(Debug, Clone)]
pub struct RunData {
    /// data-prep's committed statistics: the funnel.
    pub data_prep: Found<DataPrepStats>,
    /// tokenize's committed statistics: the compression report.
    pub tokenize: Found<TokenizeStats>,
    /// The eval stage's tables, as HTML (from its `report.md`).
    pub eval: Found<String>,
    /// The training stages that have written `metrics.jsonl`.
    pub curves: Vec<Stage>,
}

impl RunData {
    /// Reads it; errors reaching the store are errors, files not there or not readable are not.
    pub async fn read(store: &Store, run: &str) -> Result<Self, pretrain_store::Error> {
        let data_prep = stats(store, run, Stage::DataPrep).await?;
        let tokenize = stats(store, run, Stage::Tokenize).await?;
        let eval_key = store.stage(run, Stage::Eval)?.key("report.md")?;
        let eval = match store.get_opt(&eval_key).await? {
            None => Found::No,
            Some(bytes) => match std::str::from_utf8(&bytes) {
                Ok(text) => Found::Yes(eval_html(text)),
                Err(e) => Found::Unreadable(format!("{eval_key}: not UTF-8: {e}")),
            },
        };
        let mut curves = Vec::new();
        for stage in [Stage::Train, Stage::LongContext] {
            if store.size(&store.stage(run, stage)?.key("metrics.jsonl")?).await?.is_some() {
                curves.push(stage);
            }
        }
        Ok(Self { data_prep, tokenize, eval, curves })
    }
}

/// A stage's committed statistics as `T`.
async fn stats<T: serde::de::DeserializeOwned>(
    store: &Store,
    run: &str,
    stage: Stage,
) -> Result<Found<T>, pretrain_store::Error> {
    match store.stage(run, stage)?.commit_record().await {
        Ok(None) => Ok(Found::No),
        Ok(Some(commit)) => Ok(match serde_json::from_value(commit.stats) {
            Ok(stats) => Found::Yes(stats),
            Err(e) => Found::Unreadable(format!("{stage}'s statistics: {e}")),
        }),
        Err(pretrain_store::Error::Corrupt { key, reason, .. }) => Ok(Found::Unreadable(format!("{key}: {reason}"))),
        Err(e) => Err(e),
    }
}

/// The eval report's tables as HTML, its title left out (the page has its own). Raw HTML in the
/// Markdown is shown as text: the report is the stage's output, not the page's.
fn eval_html(markdown: &str) -> String {
    use pulldown_cmark::{Event, Options, Parser, html};
    let body =
        markdown.split_once('\n').filter(|(first, _)| first.starts_with("# ")).map_or(markdown, |(_, rest)| rest);
    let parser = Parser::new_ext(body, Options::ENABLE_TABLES).map(|event| match event {
        Event::Html(text) | Event::InlineHtml(text) => Event::Text(text),
        other => other,
    });
    let mut out = String::new();
    html::push_html(&mut out, parser);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn eval_tables_become_html_and_raw_html_stays_text() {
        let html = eval_html("# Evaluation of `x`\n\n## base\n\n| a | b |\n|---|---:|\n| <script>1</script> | 2 |\n");
        assert!(!html.contains("Evaluation of"), "{html}");
        assert!(html.contains("<h2>base</h2>") && html.contains("<table>"), "{html}");
        assert!(html.contains("&lt;script&gt;") && !html.contains("<script>"), "{html}");
    }

    #[test]
    fn chunks_hold_whole_lines_only() {
        let line = |s: u64| {
            format!("{}\n", serde_json::to_string(&MetricsLine { step: s, ..MetricsLine::default() }).unwrap())
        };
        let text = format!("{}{}{{\"step\":3,", line(1), line(2));
        let c = chunk(&Bytes::from(text.clone()), 0, text.len() as u64);
        assert_eq!(c.lines.iter().map(|l| l.step).collect::<Vec<_>>(), [1, 2]);
        assert_eq!(c.mark, Some(mark(line(2).as_bytes())));
        assert_eq!(c.next, (line(1).len() + line(2).len()) as u64);
        assert!(!c.more, "the partial line is the file's end");
        let c = chunk(&Bytes::from("{\"step\":3,".to_string()), 40, 50);
        assert_eq!((c.lines.len(), c.next, c.more), (0, 40, false));
    }
}
