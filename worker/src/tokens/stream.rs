//! Token shards read back to back as one stream (documents already end in the separator), and
//! reordered by document for long-context training.

use std::path::PathBuf;

use super::{ShardError, TokenShard};

/// The shards of a stream, opened and checked.
#[derive(Debug)]
pub struct TokenStream {
    shards: Vec<TokenShard>,
    /// Prefix sums of shard lengths.
    starts: Vec<u64>,
    total: u64,
    /// A document order over the stream; `None` reads the shards in their own order.
    order: Option<DocumentOrder>,
}

/// Documents of a stream in another order.
#[derive(Debug)]
struct DocumentOrder {
    /// `(start in the stream, length)` of each document, in the new order.
    segments: Vec<(u64, u64)>,
    /// Prefix sums of the lengths: where each document starts in the reordered stream.
    starts: Vec<u64>,
}

impl TokenStream {
    /// Opens every shard (in order); all must share one vocabulary.
    pub fn open(paths: &[PathBuf]) -> Result<Self, ShardError> {
        let mut shards = Vec::with_capacity(paths.len());
        let mut starts = Vec::with_capacity(paths.len());
        let mut total = 0;
        for path in paths {
            let shard = TokenShard::open(path)?;
            if let Some(first) = shards.first().map(TokenShard::vocab_size)
                && first != shard.vocab_size()
            {
                return Err(ShardError::Corrupt {
                    path: path.clone(),
                    reason: format!("vocabulary {} differs from the other shards' {first}", shard.vocab_size()),
                });
            }
            starts.push(total);
            total += shard.len();
            shards.push(shard);
        }
        Ok(Self { shards, starts, total, order: None })
    }

    /// The same tokens with whole documents ordered longest first (ties in stream order).
    pub fn long_documents_first(mut self) -> Self {
        let mut docs: Vec<(u64, u64)> = Vec::new();
        for (shard, start) in self.shards.iter().zip(&self.starts) {
            docs.extend((0..shard.documents()).map(|d| {
                let r = shard.document_range(d);
                (start + r.start, r.end - r.start)
            }));
        }
        docs.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        let mut prefix = Vec::with_capacity(docs.len());
        let mut at = 0;
        for (_, len) in &docs {
            prefix.push(at);
            at += len;
        }
        debug_assert_eq!(at, self.total);
        self.order = Some(DocumentOrder { segments: docs, starts: prefix });
        self
    }

    /// The longest document, in tokens.
    pub fn longest_document(&self) -> u64 {
        self.shards
            .iter()
            .flat_map(|s| (0..s.documents()).map(|d| s.document_range(d)))
            .map(|r| r.end - r.start)
            .max()
            .unwrap_or(0)
    }

    /// Tokens in one pass over the data.
    pub fn len(&self) -> u64 {
        self.total
    }

    /// Whether the stream has no tokens.
    pub fn is_empty(&self) -> bool {
        self.total == 0
    }

    /// Vocabulary of the shards.
    pub fn vocab_size(&self) -> Option<u32> {
        self.shards.first().map(TokenShard::vocab_size)
    }

    /// Appends `n` tokens starting at stream position `at` (wrapping into the next epoch).
    pub fn read(&self, mut at: u64, mut n: u64, out: &mut Vec<u32>) {
        assert!(self.total > 0, "reading an empty stream");
        let Some(DocumentOrder { segments, starts: prefix }) = &self.order else {
            return self.read_in_order(at, n, out);
        };
        while n > 0 {
            let pos = at % self.total;
            let k = prefix.partition_point(|&s| s <= pos) - 1;
            let (start, len) = segments[k];
            let within = pos - prefix[k];
            let take = n.min(len - within);
            self.read_in_order(start + within, take, out);
            at += take;
            n -= take;
        }
    }

    fn read_in_order(&self, mut at: u64, mut n: u64, out: &mut Vec<u32>) {
        while n > 0 {
            let pos = at % self.total;
            let k = self.starts.partition_point(|&s| s <= pos) - 1;
            let within = pos - self.starts[k];
            let take = n.min(self.shards[k].len() - within);
            self.shards[k].read(within..within + take, out);
            at += take;
            n -= take;
        }
    }
}
