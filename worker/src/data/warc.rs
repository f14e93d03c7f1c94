//! WARC reading: records from `.warc` and `.warc.gz` files, streaming, one record in memory at a time.
//!
//! Common Crawl compresses each record as its own gzip member, so a damaged member costs one record:
//! the reader reports it with its byte offset, goes back to just after the member's start (a damaged
//! deflate stream may have run on into the next members) and resumes at the next gzip header found
//! from there. Uncompressed files resume at the next `WARC/` version line.

use std::io::{self, BufRead, BufReader, Read, Seek, SeekFrom};

use flate2::bufread::GzDecoder;

/// A WARC record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// WARC header fields in order.
    pub headers: Vec<(String, String)>,
    /// The record block (for `response` records: HTTP headers and payload).
    pub block: Vec<u8>,
    /// Byte offset of the record in the file (of its gzip member, for compressed files).
    pub offset: u64,
}

impl Record {
    /// The first header with this name (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }
}

/// Part of a file that could not be read as a record, and where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Damaged {
    /// Byte offset in the file.
    pub offset: u64,
    /// What was wrong.
    pub reason: String,
}

/// Counts bytes consumed from the underlying reader, for offsets.
#[derive(Debug)]
struct Counting<R> {
    inner: R,
    consumed: u64,
}

impl<R: BufRead> Read for Counting<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.consumed += n as u64;
        Ok(n)
    }
}

impl<R: BufRead> BufRead for Counting<R> {
    fn fill_buf(&mut self) -> io::Result<&[u8]> {
        self.inner.fill_buf()
    }
    fn consume(&mut self, amt: usize) {
        self.consumed += amt as u64;
        self.inner.consume(amt);
    }
}

type Member<R> = BufReader<GzDecoder<Counting<R>>>;

/// Reads records from a WARC stream. Blocks larger than `max_block` bytes are reported and skipped
/// without being held in memory.
#[derive(Debug)]
pub struct WarcReader<R> {
    input: Option<Counting<R>>,
    member: Option<(Member<R>, u64)>,
    gzip: bool,
    max_block: u64,
    /// After damage: candidates that turn out not to be members are skipped silently.
    resyncing: bool,
}

const LINE_LIMIT: usize = 64 << 10;

enum Parsed {
    Record(Record),
    TooLarge(u64),
}

impl<R: BufRead + Seek> WarcReader<R> {
    /// A reader over `input`, positioned at its start; `gzip` for `.warc.gz` files.
    pub fn new(input: R, gzip: bool, max_block: u64) -> Self {
        Self { input: Some(Counting { inner: input, consumed: 0 }), member: None, gzip, max_block, resyncing: false }
    }

    fn next_plain(&mut self) -> Option<Result<Record, Damaged>> {
        let input = self.input.as_mut()?;
        let offset = input.consumed;
        match read_record(input, offset, self.max_block) {
            Ok(None) => None,
            Ok(Some(Parsed::Record(r))) => Some(Ok(r)),
            Ok(Some(Parsed::TooLarge(len))) => Some(Err(too_large(offset, len, self.max_block))),
            Err(reason) => {
                skip_to_version_line(input);
                Some(Err(Damaged { offset, reason }))
            }
        }
    }

    fn next_gzip(&mut self) -> Option<Result<Record, Damaged>> {
        loop {
            if self.member.is_none() {
                let mut input = self.input.take()?;
                match input.fill_buf() {
                    Ok([]) => return None,
                    Ok(_) => {}
                    Err(e) => {
                        return Some(Err(Damaged { offset: input.consumed, reason: format!("read error: {e}") }));
                    }
                }
                let offset = input.consumed;
                self.member = Some((BufReader::with_capacity(64 << 10, GzDecoder::new(input)), offset));
            }
            let (member, offset) = self.member.as_mut().expect("a member is open");
            let offset = *offset;
            match read_record(member, offset, self.max_block) {
                Ok(Some(Parsed::Record(r))) => {
                    self.resyncing = false;
                    return Some(Ok(r));
                }
                Ok(Some(Parsed::TooLarge(len))) => {
                    self.resyncing = false;
                    return Some(Err(too_large(offset, len, self.max_block)));
                }
                Ok(None) => {
                    // The member ended cleanly; the next one starts where it stopped.
                    let (member, _) = self.member.take().expect("a member is open");
                    self.input = Some(member.into_inner().into_inner());
                }
                Err(reason) => {
                    let (member, _) = self.member.take().expect("a member is open");
                    let mut input = member.into_inner().into_inner();
                    if input.inner.seek(SeekFrom::Start(offset + 1)).is_err() {
                        return Some(Err(Damaged { offset, reason: format!("{reason}; cannot seek past it") }));
                    }
                    input.consumed = offset + 1;
                    skip_to_gzip_candidate(&mut input, false);
                    self.input = Some(input);
                    if !std::mem::replace(&mut self.resyncing, true) {
                        return Some(Err(Damaged { offset, reason }));
                    }
                }
            }
        }
    }
}

impl<R: BufRead + Seek> Iterator for WarcReader<R> {
    type Item = Result<Record, Damaged>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.gzip { self.next_gzip() } else { self.next_plain() }
    }
}

fn too_large(offset: u64, len: u64, max: u64) -> Damaged {
    Damaged { offset, reason: format!("record block of {len} bytes exceeds the {max}-byte limit (maxDocumentBytes)") }
}

/// Reads one line (without the line ending), refusing lines over `LINE_LIMIT`. `None` at end of input.
fn read_line<R: BufRead>(r: &mut R, line: &mut Vec<u8>) -> Result<Option<()>, String> {
    line.clear();
    let n = r.by_ref().take(LINE_LIMIT as u64 + 1).read_until(b'\n', line).map_err(|e| e.to_string())?;
    if n == 0 {
        return Ok(None);
    }
    if line.len() > LINE_LIMIT {
        return Err(format!("header line longer than {LINE_LIMIT} bytes"));
    }
    while line.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
        line.pop();
    }
    Ok(Some(()))
}

fn read_record<R: BufRead>(r: &mut R, offset: u64, max_block: u64) -> Result<Option<Parsed>, String> {
    let mut line = Vec::new();
    // Records are separated by blank lines.
    loop {
        match read_line(r, &mut line)? {
            None => return Ok(None),
            Some(()) if line.is_empty() => continue,
            Some(()) => break,
        }
    }
    if !line.starts_with(b"WARC/") {
        let shown = String::from_utf8_lossy(&line[..line.len().min(40)]).into_owned();
        return Err(format!("expected a WARC version line, found {shown:?}"));
    }
    let mut headers = Vec::new();
    loop {
        if read_line(r, &mut line)?.is_none() {
            return Err("truncated record: end of input inside the WARC headers".into());
        }
        if line.is_empty() {
            break;
        }
        let text = String::from_utf8_lossy(&line);
        let Some((name, value)) = text.split_once(':') else {
            return Err(format!("malformed WARC header line {text:?}"));
        };
        headers.push((name.trim().to_string(), value.trim().to_string()));
    }
    let length = headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case("Content-Length"))
        .ok_or("WARC record without Content-Length")?
        .1
        .parse::<u64>()
        .map_err(|_| "WARC Content-Length is not a number".to_string())?;
    if length > max_block {
        let skipped = io::copy(&mut r.by_ref().take(length), &mut io::sink()).map_err(|e| e.to_string())?;
        if skipped < length {
            return Err(format!("truncated record: expected {length} bytes, got {skipped}"));
        }
        return Ok(Some(Parsed::TooLarge(length)));
    }
    // Grow as data arrives: a damaged Content-Length must not reserve gigabytes up front.
    let mut block = Vec::with_capacity(length.min(1 << 20) as usize);
    let got = r.by_ref().take(length).read_to_end(&mut block).map_err(|e| e.to_string())?;
    if (got as u64) < length {
        return Err(format!("truncated record: expected {length} bytes, got {got}"));
    }
    Ok(Some(Parsed::Record(Record { headers, block, offset })))
}

/// Moves to the next gzip member header (`1f 8b 08`), past the current byte if `skip_current`. A
/// header split across the buffer boundary is taken as a candidate; a false one is skipped later.
fn skip_to_gzip_candidate<R: BufRead>(r: &mut R, skip_current: bool) {
    let mut from = usize::from(skip_current);
    loop {
        let Ok(buf) = r.fill_buf() else { return };
        if buf.is_empty() {
            return;
        }
        let mut found = None;
        let mut at = from.min(buf.len());
        while let Some(i) = memchr::memchr(0x1f, &buf[at..]) {
            let candidate = at + i;
            let next = &buf[candidate + 1..buf.len().min(candidate + 3)];
            if next.len() < 2 || next == [0x8b, 0x08] {
                found = Some(candidate);
                break;
            }
            at = candidate + 1;
        }
        match found {
            Some(i) => {
                r.consume(i);
                return;
            }
            None => {
                let n = buf.len();
                r.consume(n);
                from = 0;
            }
        }
    }
}

/// Moves to the next line that starts with `WARC/` (leaving it unread).
fn skip_to_version_line<R: BufRead>(r: &mut R) {
    loop {
        let Ok(buf) = r.fill_buf() else { return };
        if buf.is_empty() {
            return;
        }
        if buf.len() >= 5 && &buf[..5] == b"WARC/" {
            return;
        }
        match memchr::memchr(b'\n', buf) {
            Some(i) => r.consume(i + 1),
            None => {
                let n = buf.len();
                r.consume(n);
            }
        }
    }
}

/// The HTTP payload of a `response` record block: (content type, body), or why it has none.
pub fn http_payload(block: &[u8]) -> Result<(Option<String>, &[u8]), String> {
    // The first blank line ends the headers, whichever line ending the server used.
    let crlf = memchr::memmem::find(block, b"\r\n\r\n").map(|i| (i, i + 4));
    let lf = memchr::memmem::find(block, b"\n\n").map(|i| (i, i + 2));
    let end = match (crlf, lf) {
        (Some(a), Some(b)) => a.min(b),
        (a, b) => a.or(b).ok_or("HTTP response without a header/body separator")?,
    };
    let head = String::from_utf8_lossy(&block[..end.0]);
    let mut lines = head.lines();
    let status = lines.next().unwrap_or_default();
    let code = status.split_whitespace().nth(1).unwrap_or_default();
    if !code.starts_with('2') {
        return Err(format!("HTTP status {code:?}"));
    }
    let content_type = lines
        .filter_map(|l| l.split_once(':'))
        .find(|(k, _)| k.trim().eq_ignore_ascii_case("content-type"))
        .map(|(_, v)| v.trim().to_ascii_lowercase());
    Ok((content_type, &block[end.1..]))
}
