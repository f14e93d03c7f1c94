//! Token shards: the files training streams from.
//!
//! Layout, little-endian:
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 8 | magic `PTTOKENS` |
//! | 8 | 4 | format version (1) |
//! | 12 | 4 | bytes per token: 2 (vocabulary up to 65,536) or 4 |
//! | 16 | 4 | vocabulary size; every token is below it |
//! | 20 | 4 | reserved, 0 |
//! | 24 | 8 | token count `T` |
//! | 32 | 8 | document count `D` |
//! | 40 | `T` x width | the tokens, documents back to back, each ending in `<|eos|>` |
//! | .. | 0-7 | zero padding to a multiple of 8 |
//! | .. | (`D` + 1) x 8 | document index: token offset of each document's start, then `T` |
//!
//! A shard is checked whole when it is opened (size, index, every token below the vocabulary), and is
//! read through a memory map.

use std::fs::File;
use std::io::{BufWriter, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

/// First bytes of every token shard.
pub const MAGIC: &[u8; 8] = b"PTTOKENS";
/// Format version written and read.
pub const FORMAT_VERSION: u32 = 1;
const HEADER: usize = 40;

/// Why a shard cannot be written or read.
#[derive(Debug, thiserror::Error)]
pub enum ShardError {
    /// The file system failed.
    #[error("token shard {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The file is not a valid token shard.
    #[error("token shard {path}: {reason}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
}

/// Bytes per token for a vocabulary.
pub fn token_width(vocab_size: u32) -> u32 {
    if vocab_size <= 1 << 16 { 2 } else { 4 }
}

/// Writes one shard, document by document.
#[derive(Debug)]
pub struct ShardWriter {
    path: PathBuf,
    out: BufWriter<File>,
    width: u32,
    vocab_size: u32,
    offsets: Vec<u64>,
    tokens: u64,
}

impl ShardWriter {
    /// Creates (truncates) the file.
    pub fn create(path: &Path, vocab_size: u32) -> Result<Self, ShardError> {
        let io = |source| ShardError::Io { path: path.into(), source };
        let mut out = BufWriter::with_capacity(1 << 20, File::create(path).map_err(io)?);
        out.write_all(&[0; HEADER]).map_err(io)?;
        Ok(Self { path: path.into(), out, width: token_width(vocab_size), vocab_size, offsets: vec![0], tokens: 0 })
    }

    /// Appends one document's tokens (the caller includes the separator).
    pub fn push(&mut self, tokens: &[u32]) -> Result<(), ShardError> {
        if let Some(bad) = tokens.iter().find(|&&t| t >= self.vocab_size) {
            return Err(ShardError::Corrupt {
                path: self.path.clone(),
                reason: format!("token {bad} is outside the vocabulary of {}", self.vocab_size),
            });
        }
        let io = |source| ShardError::Io { path: self.path.clone(), source };
        let mut buf = Vec::with_capacity(tokens.len() * self.width as usize);
        if self.width == 2 {
            tokens.iter().for_each(|&t| buf.extend_from_slice(&(t as u16).to_le_bytes()));
        } else {
            tokens.iter().for_each(|&t| buf.extend_from_slice(&t.to_le_bytes()));
        }
        self.out.write_all(&buf).map_err(io)?;
        self.tokens += tokens.len() as u64;
        self.offsets.push(self.tokens);
        Ok(())
    }

    /// Tokens written so far.
    pub fn tokens(&self) -> u64 {
        self.tokens
    }

    /// Writes the index and the header and syncs the file; returns its size.
    pub fn finish(mut self) -> Result<u64, ShardError> {
        let path = self.path.clone();
        let io = |source| ShardError::Io { path: path.clone(), source };
        let body = self.tokens * u64::from(self.width);
        let pad = (8 - body % 8) % 8;
        self.out.write_all(&vec![0; pad as usize]).map_err(io)?;
        for offset in &self.offsets {
            self.out.write_all(&offset.to_le_bytes()).map_err(io)?;
        }
        let mut header = Vec::with_capacity(HEADER);
        header.extend_from_slice(MAGIC);
        header.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        header.extend_from_slice(&self.width.to_le_bytes());
        header.extend_from_slice(&self.vocab_size.to_le_bytes());
        header.extend_from_slice(&0u32.to_le_bytes());
        header.extend_from_slice(&self.tokens.to_le_bytes());
        header.extend_from_slice(&(self.offsets.len() as u64 - 1).to_le_bytes());
        self.out.seek(SeekFrom::Start(0)).map_err(io)?;
        self.out.write_all(&header).map_err(io)?;
        let file = self.out.into_inner().map_err(|e| io(e.into_error()))?;
        file.sync_all().map_err(io)?;
        Ok(HEADER as u64 + body + pad + 8 * self.offsets.len() as u64)
    }
}

/// A validated, memory-mapped token shard.
#[derive(Debug)]
pub struct TokenShard {
    path: PathBuf,
    map: memmap2::Mmap,
    width: u32,
    vocab_size: u32,
    tokens: u64,
    documents: u64,
    index_at: usize,
}

impl TokenShard {
    /// Opens and checks a shard: header, exact size, document index, and every token.
    pub fn open(path: &Path) -> Result<Self, ShardError> {
        let file = File::open(path).map_err(|source| ShardError::Io { path: path.into(), source })?;
        let map = map_read_only(&file).map_err(|source| ShardError::Io { path: path.into(), source })?;
        Self::check(path, map)
    }

    fn check(path: &Path, map: memmap2::Mmap) -> Result<Self, ShardError> {
        let corrupt = |reason: String| ShardError::Corrupt { path: path.into(), reason };
        if map.len() < HEADER {
            return Err(corrupt(format!("{} bytes is shorter than the {HEADER}-byte header", map.len())));
        }
        if &map[..8] != MAGIC {
            return Err(corrupt(format!("bad magic {:?}, expected {:?}", &map[..8], MAGIC)));
        }
        let u32_at = |at: usize| u32::from_le_bytes(map[at..at + 4].try_into().expect("4 bytes"));
        let u64_at = |at: usize| u64::from_le_bytes(map[at..at + 8].try_into().expect("8 bytes"));
        let version = u32_at(8);
        if version != FORMAT_VERSION {
            return Err(corrupt(format!("format version {version}; this build reads version {FORMAT_VERSION}")));
        }
        let (width, vocab_size, tokens, documents) = (u32_at(12), u32_at(16), u64_at(24), u64_at(32));
        if !(width == 2 || width == 4) || vocab_size == 0 || (width == 2 && vocab_size > 1 << 16) {
            return Err(corrupt(format!("{width} bytes per token cannot hold a vocabulary of {vocab_size}")));
        }
        let body = tokens.checked_mul(u64::from(width));
        let expected = body.and_then(|b| {
            let pad = (8 - b % 8) % 8;
            documents.checked_add(1)?.checked_mul(8)?.checked_add(HEADER as u64 + b + pad)
        });
        if expected != Some(map.len() as u64) {
            return Err(corrupt(format!(
                "{} bytes, but the header's {tokens} tokens and {documents} documents need {}",
                map.len(),
                expected.map_or("more than 2^64".into(), |e| e.to_string())
            )));
        }
        let index_at = map.len() - 8 * (documents as usize + 1);
        let shard = Self { path: path.into(), map, width, vocab_size, tokens, documents, index_at };
        let mut last = 0;
        for d in 0..=documents as usize {
            let offset = shard.offset(d);
            if (d == 0 && offset != 0) || offset < last || offset > tokens {
                return Err(corrupt(format!("document index entry {d} ({offset}) is out of order")));
            }
            last = offset;
        }
        if last != tokens {
            return Err(corrupt(format!("document index ends at {last}, not at the {tokens} tokens")));
        }
        let body = &shard.map[HEADER..HEADER + (tokens * u64::from(width)) as usize];
        let bad = if width == 2 {
            body.chunks_exact(2).map(|c| u32::from(u16::from_le_bytes([c[0], c[1]]))).position(|t| t >= vocab_size)
        } else {
            body.chunks_exact(4).map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]])).position(|t| t >= vocab_size)
        };
        if let Some(at) = bad {
            return Err(corrupt(format!("token {at} is outside the vocabulary of {vocab_size}")));
        }
        Ok(shard)
    }

    fn offset(&self, d: usize) -> u64 {
        let at = self.index_at + 8 * d;
        u64::from_le_bytes(self.map[at..at + 8].try_into().expect("8 bytes"))
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Tokens in the shard.
    pub fn len(&self) -> u64 {
        self.tokens
    }

    /// Whether the shard holds no tokens.
    pub fn is_empty(&self) -> bool {
        self.tokens == 0
    }

    /// Documents in the shard.
    pub fn documents(&self) -> u64 {
        self.documents
    }

    /// Vocabulary size of the tokenizer that wrote it.
    pub fn vocab_size(&self) -> u32 {
        self.vocab_size
    }

    /// Token range `[start, end)` of document `d`.
    pub fn document_range(&self, d: u64) -> std::ops::Range<u64> {
        assert!(d < self.documents, "document {d} of {}", self.documents);
        self.offset(d as usize)..self.offset(d as usize + 1)
    }

    /// Appends tokens `[start, end)` to `out`.
    pub fn read(&self, range: std::ops::Range<u64>, out: &mut Vec<u32>) {
        assert!(range.start <= range.end && range.end <= self.tokens, "{range:?} of {} tokens", self.tokens);
        let w = self.width as usize;
        let bytes = &self.map[HEADER + range.start as usize * w..HEADER + range.end as usize * w];
        if w == 2 {
            out.extend(bytes.chunks_exact(2).map(|c| u32::from(u16::from_le_bytes([c[0], c[1]]))));
        } else {
            out.extend(bytes.chunks_exact(4).map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]])));
        }
    }
}

/// Maps a file read-only.
#[allow(unsafe_code)]
fn map_read_only(file: &File) -> std::io::Result<memmap2::Mmap> {
    // SAFETY: the map is read-only and token shards are immutable once written (a commit records
    // their sha256, and nothing rewrites a committed shard in place); `TokenShard::open` validates the
    // contents before any use, so a file changed underneath gives wrong tokens, never unsoundness
    // beyond what the OS's page cache allows for any mapped read.
    unsafe { memmap2::Mmap::map(file) }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, vocab: u32, docs: &[Vec<u32>]) -> PathBuf {
        let path = dir.join("s.tok");
        let mut w = ShardWriter::create(&path, vocab).unwrap();
        for d in docs {
            w.push(d).unwrap();
        }
        let size = w.finish().unwrap();
        assert_eq!(size, std::fs::metadata(&path).unwrap().len());
        path
    }

    #[test]
    fn round_trips_both_widths() {
        let dir = tempfile::tempdir().unwrap();
        for vocab in [300, 70_000] {
            let docs = vec![vec![1, 2, 3], vec![], vec![vocab - 1, 0]];
            let shard = TokenShard::open(&write(dir.path(), vocab, &docs)).unwrap();
            assert_eq!((shard.len(), shard.documents(), shard.vocab_size()), (5, 3, vocab));
            for (d, doc) in docs.iter().enumerate() {
                let mut out = Vec::new();
                shard.read(shard.document_range(d as u64), &mut out);
                assert_eq!(&out, doc);
            }
        }
    }

    #[test]
    fn rejects_corruption_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(dir.path(), 300, &[vec![1, 2, 3], vec![4, 5]]);
        let good = std::fs::read(&path).unwrap();
        let cases: Vec<(Vec<u8>, &str)> = vec![
            ([b"XXTOKENS".as_slice(), &good[8..]].concat(), "bad magic"),
            ([&good[..8], &2u32.to_le_bytes(), &good[12..]].concat(), "format version 2"),
            (good[..good.len() - 1].to_vec(), "bytes, but the header"),
            ([&good[..40], &999u16.to_le_bytes(), &good[42..]].concat(), "outside the vocabulary"),
            ([&good[..good.len() - 16], &9u64.to_le_bytes(), &good[good.len() - 8..]].concat(), "out of order"),
            (good[..10].to_vec(), "shorter than"),
        ];
        for (bytes, expected) in cases {
            std::fs::write(&path, &bytes).unwrap();
            let err = TokenShard::open(&path).unwrap_err().to_string();
            assert!(err.contains(expected) && err.contains("s.tok"), "{err}");
        }
        let mut w = ShardWriter::create(&path, 10).unwrap();
        assert!(w.push(&[10]).unwrap_err().to_string().contains("outside the vocabulary of 10"));
    }
}
