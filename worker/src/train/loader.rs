//! The training data stream: token shards read through memory maps, cut into sequences, prefetched on
//! a thread so that a step never waits for I/O.
//!
//! The stream is every shard's tokens back to back (documents already end in `<|eos|>`), repeated in
//! epochs. Step `s` reads `sequences` windows of `seq_len + 1` tokens starting every `seq_len` tokens
//! from the cursor (inputs and their next-token targets); data-parallel rank `r` of `w` takes the
//! `r`-th of `w` equal slices. The cursor (a token position in the repeated stream) is all that a
//! checkpoint needs to resume the exact same batches, whatever the number of ranks.
//!
//! Long-context training reorders the stream by document, longest first
//! ([`TokenStream::long_documents_first`]), so that its few steps see whole long documents rather
//! than windows spanning many short ones.

use std::path::PathBuf;
use std::sync::mpsc::{Receiver, sync_channel};
use std::thread::JoinHandle;

use crate::tokenize::{ShardError, TokenShard};

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

/// One rank's data for one optimizer step.
#[derive(Debug, Clone, PartialEq)]
pub struct Batch {
    /// Optimizer step this batch is for.
    pub step: u64,
    /// `[sequences, seq_len]` input ids, row-major.
    pub inputs: Vec<u32>,
    /// `[sequences, seq_len]` target ids (inputs shifted by one).
    pub targets: Vec<u32>,
    /// Stream position after this step (what a checkpoint taken after it saves).
    pub cursor_after: u64,
}

/// How batches are cut.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchShape {
    /// Tokens per sequence.
    pub seq_len: usize,
    /// Sequences per step across all ranks.
    pub sequences: usize,
    /// This rank.
    pub rank: usize,
    /// Ranks.
    pub world: usize,
}

impl BatchShape {
    /// Sequences this rank trains on per step.
    pub fn per_rank(&self) -> usize {
        self.sequences / self.world
    }

    /// The batch of `step` when the step starts at `cursor`.
    pub fn batch(&self, stream: &TokenStream, step: u64, cursor: u64) -> Batch {
        let per_rank = self.per_rank();
        let t = self.seq_len;
        let mut inputs = Vec::with_capacity(per_rank * t);
        let mut targets = Vec::with_capacity(per_rank * t);
        let mut window = Vec::with_capacity(t + 1);
        for i in 0..per_rank {
            let index = (self.rank * per_rank + i) as u64;
            window.clear();
            stream.read(cursor + index * t as u64, t as u64 + 1, &mut window);
            inputs.extend_from_slice(&window[..t]);
            targets.extend_from_slice(&window[1..]);
        }
        Batch { step, inputs, targets, cursor_after: cursor + (self.sequences * t) as u64 }
    }
}

/// Batches produced ahead of the training loop on their own thread.
#[derive(Debug)]
pub struct Prefetcher {
    rx: Option<Receiver<Batch>>,
    thread: Option<JoinHandle<()>>,
}

impl Prefetcher {
    /// Starts producing the batches of steps `first_step..last_step` from `cursor`, keeping up to
    /// `depth` ready.
    pub fn start(
        stream: std::sync::Arc<TokenStream>,
        shape: BatchShape,
        first_step: u64,
        last_step: u64,
        cursor: u64,
        depth: usize,
    ) -> Self {
        let (tx, rx) = sync_channel(depth.max(1));
        let thread = std::thread::Builder::new()
            .name("prefetch".into())
            .spawn(move || {
                let mut cursor = cursor;
                for step in first_step..last_step {
                    let batch = shape.batch(&stream, step, cursor);
                    cursor = batch.cursor_after;
                    if tx.send(batch).is_err() {
                        return; // the loop stopped early
                    }
                }
            })
            .expect("the prefetch thread starts");
        Self { rx: Some(rx), thread: Some(thread) }
    }
}

impl Iterator for Prefetcher {
    type Item = Batch;

    /// The next batch; `None` after the last step.
    fn next(&mut self) -> Option<Batch> {
        self.rx.as_ref()?.recv().ok()
    }
}

impl Drop for Prefetcher {
    fn drop(&mut self) {
        drop(self.rx.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tokenize::ShardWriter;
    use std::sync::Arc;

    fn stream(dir: &std::path::Path) -> TokenStream {
        let mut paths = Vec::new();
        for (k, docs) in
            [vec![(0..10).collect::<Vec<u32>>()], vec![(10..13).collect(), (13..25).collect()]].iter().enumerate()
        {
            let path = dir.join(format!("{k}.tok"));
            let mut w = ShardWriter::create(&path, 100).unwrap();
            for d in docs {
                w.push(d).unwrap();
            }
            w.finish().unwrap();
            paths.push(path);
        }
        TokenStream::open(&paths).unwrap()
    }

    #[test]
    fn reads_across_shards_and_epochs() {
        let dir = tempfile::tempdir().unwrap();
        let s = stream(dir.path());
        assert_eq!(s.len(), 25);
        let mut out = Vec::new();
        s.read(8, 6, &mut out);
        assert_eq!(out, [8, 9, 10, 11, 12, 13]);
        out.clear();
        s.read(23, 4, &mut out);
        assert_eq!(out, [23, 24, 0, 1]);
    }

    #[test]
    fn long_documents_come_first_whole() {
        let dir = tempfile::tempdir().unwrap();
        let s = stream(dir.path()).long_documents_first();
        assert_eq!(s.len(), 25);
        assert_eq!(s.longest_document(), 12);
        let mut out = Vec::new();
        s.read(0, 25, &mut out);
        let expected: Vec<u32> = (13..25).chain(0..10).chain(10..13).collect();
        assert_eq!(out, expected);
        out.clear();
        s.read(20, 8, &mut out);
        // Positions 20.. are the end of the 10-token document, the 3-token one, then the next epoch.
        assert_eq!(out, [8, 9, 10, 11, 12, 13, 14, 15]);
    }

    #[test]
    fn ranks_split_a_step_and_the_cursor_resumes_it() {
        let dir = tempfile::tempdir().unwrap();
        let s = Arc::new(stream(dir.path()));
        let shape = |rank, world| BatchShape { seq_len: 3, sequences: 4, rank, world };
        let whole = shape(0, 1).batch(&s, 0, 2);
        assert_eq!(whole.inputs, [2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13]);
        assert_eq!(whole.targets, [3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14]);
        assert_eq!(whole.cursor_after, 14);
        let r1 = shape(1, 2).batch(&s, 0, 2);
        assert_eq!(r1.inputs, whole.inputs[6..]);
        // A prefetcher started from a saved cursor yields what an uninterrupted one yields.
        let all: Vec<Batch> = {
            let mut p = Prefetcher::start(Arc::clone(&s), shape(0, 1), 0, 5, 0, 2);
            std::iter::from_fn(|| p.next()).collect()
        };
        assert_eq!(all.len(), 5);
        let mut resumed = Prefetcher::start(Arc::clone(&s), shape(0, 1), 3, 5, all[2].cursor_after, 2);
        assert_eq!(resumed.next().as_ref(), Some(&all[3]));
        assert_eq!(resumed.next().as_ref(), Some(&all[4]));
        assert_eq!(resumed.next(), None);
    }
}
