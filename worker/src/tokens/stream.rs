//! Token shards read back to back as one stream (documents already end in the separator), and
//! reordered by document for long-context training.

use std::path::PathBuf;

use pretrain_crd::seeded::{shuffle, splitmix};

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

/// Documents of a stream in another order (some perhaps repeated, some left out).
#[derive(Debug)]
struct DocumentOrder {
    /// `(start in the stream, length)` of each document, in the new order.
    segments: Vec<(u64, u64)>,
    /// Prefix sums of the lengths: where each document starts in the reordered stream.
    starts: Vec<u64>,
    /// Tokens in one pass over the reordered stream.
    total: u64,
}

impl DocumentOrder {
    fn new(segments: Vec<(u64, u64)>) -> Self {
        let mut starts = Vec::with_capacity(segments.len());
        let mut total = 0;
        for (_, len) in &segments {
            starts.push(total);
            total += len;
        }
        Self { segments, starts, total }
    }
}

/// What [`TokenStream::upsample_long`] did, per category (by index): tokens, and tokens in long
/// documents, before and after.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct UpsampleReport {
    /// `(tokens, long-document tokens)` of each category in the training stream.
    pub before: Vec<(u64, u64)>,
    /// The same in the long-context stream.
    pub after: Vec<(u64, u64)>,
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

    /// `(start, length)` of every document, in stream order.
    fn document_segments(&self) -> Vec<(u64, u64)> {
        let mut docs = Vec::new();
        for (shard, start) in self.shards.iter().zip(&self.starts) {
            docs.extend((0..shard.documents()).map(|d| {
                let r = shard.document_range(d);
                (start + r.start, r.end - r.start)
            }));
        }
        docs
    }

    /// Long-context data after Fu et al. (2024), per-source length upsampling: every category
    /// (`categories`: each document's, in stream order) keeps its share of the stream's tokens, and
    /// within it documents of at least `long` tokens are drawn `upsample` times as often as shorter
    /// ones. A document's expected copies are its weight times its category's tokens over the
    /// category's weighted tokens: below one (a short document), it is kept with that probability;
    /// above, repeated. The copies are then shuffled, each whole, by `seed`.
    pub fn upsample_long(
        mut self,
        categories: &[u16],
        long: u64,
        upsample: f64,
        seed: u64,
    ) -> Result<(Self, UpsampleReport), String> {
        let docs = self.document_segments();
        if categories.len() != docs.len() {
            return Err(format!("{} document categories for {} documents", categories.len(), docs.len()));
        }
        let n = categories.iter().map(|&c| usize::from(c) + 1).max().unwrap_or(0);
        let mut report = UpsampleReport { before: vec![(0, 0); n], after: vec![(0, 0); n] };
        let weight = |len: u64| if len >= long { upsample } else { 1.0 };
        let mut weighted = vec![0f64; n];
        for (&(_, len), &c) in docs.iter().zip(categories) {
            let b = &mut report.before[usize::from(c)];
            b.0 += len;
            b.1 += if len >= long { len } else { 0 };
            weighted[usize::from(c)] += weight(len) * len as f64;
        }
        let mut segments = Vec::new();
        for (d, (&(start, len), &c)) in docs.iter().zip(categories).enumerate() {
            let c = usize::from(c);
            let expected = weight(len) * report.before[c].0 as f64 / weighted[c];
            let draw = {
                let mut state = seed ^ 0x10e6_c0de ^ (d as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
                (splitmix(&mut state) >> 11) as f64 / (1u64 << 53) as f64
            };
            let copies = expected.floor() as u64 + u64::from(draw < expected.fract());
            for _ in 0..copies {
                segments.push((start, len));
                let a = &mut report.after[c];
                a.0 += len;
                a.1 += if len >= long { len } else { 0 };
            }
        }
        if segments.is_empty() {
            return Err("no document was drawn".into());
        }
        shuffle(&mut segments, &mut (seed ^ 0x5_4ff1e));
        self.order = Some(DocumentOrder::new(segments));
        Ok((self, report))
    }

    /// Documents in the stream's shards.
    pub fn documents(&self) -> u64 {
        self.shards.iter().map(TokenShard::documents).sum()
    }

    /// Tokens in one pass over the data (as reordered, if it is).
    pub fn len(&self) -> u64 {
        self.order.as_ref().map_or(self.total, |o| o.total)
    }

    /// Whether the stream has no tokens.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Vocabulary of the shards.
    pub fn vocab_size(&self) -> Option<u32> {
        self.shards.first().map(TokenShard::vocab_size)
    }

    /// Appends `n` tokens starting at stream position `at` (wrapping into the next epoch).
    pub fn read(&self, mut at: u64, mut n: u64, out: &mut Vec<u32>) {
        assert!(self.total > 0, "reading an empty stream");
        let Some(DocumentOrder { segments, starts: prefix, total }) = &self.order else {
            return self.read_in_order(at, n, out);
        };
        while n > 0 {
            let pos = at % total;
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
