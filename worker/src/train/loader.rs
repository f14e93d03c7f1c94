//! The training data stream: token shards read through memory maps, cut into sequences, prefetched on
//! a thread so that a step never waits for I/O.
//!
//! The stream is every shard's tokens back to back (documents already end in `<|eos|>`), repeated in
//! epochs, cut into sequences of `seq_len` tokens (each read with its next-token targets). Step `s`
//! takes the next `sequences` sequence numbers after the cursor, cut into [`BatchShape::groups`]
//! equal gradient groups (the gang's data-parallel ranks at full size); data-parallel rank `r` of
//! `w` takes groups `r*groups/w..(r+1)*groups/w`, one each at full size and more after a shrink. Sequence numbers map to places in the stream through a seeded
//! permutation within windows of [`BatchShape::window`] sequences, reshuffled every epoch: a step
//! mixes many documents (one long document no longer fills a whole step), while the order data-prep
//! chose (curriculum, related documents packed together) holds at the scale of a window and every
//! sequence stays whole. The cursor (a token position in the repeated sequence numbering) is all that
//! a checkpoint needs to resume the exact same batches, whatever the number of ranks.
//!
//! Long-context training reads whole documents, long ones upsampled within each category
//! ([`TokenStream::upsample_long`], after Fu et al. 2024), in a seeded order.

use std::sync::mpsc::{Receiver, sync_channel};
use std::thread::JoinHandle;

use pretrain_crd::seeded::{shuffle, splitmix};

use crate::tokens::TokenStream;

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
    /// Gradient groups the step's sequences are cut into: the gang's ranks at full size, at least
    /// `world`. A group's gradient is summed the same way on whichever rank holds it.
    pub groups: usize,
    /// Sequences shuffled together; 0 or 1 reads the stream in order.
    pub window: usize,
    /// Seed of the shuffle.
    pub seed: u64,
}

/// Sequences per shuffle window that training uses: at least 1,024 and at least 8 steps' worth.
pub fn shuffle_window(sequences_per_step: usize) -> usize {
    (8 * sequences_per_step).max(1024)
}

impl BatchShape {
    /// The gradient groups this rank trains on.
    pub fn rank_groups(&self) -> std::ops::Range<usize> {
        self.rank * self.groups / self.world..(self.rank + 1) * self.groups / self.world
    }

    /// Sequences per gradient group.
    pub fn group_sequences(&self) -> usize {
        self.sequences / self.groups
    }

    /// Sequences this rank trains on per step.
    pub fn per_rank(&self) -> usize {
        self.rank_groups().len() * self.group_sequences()
    }

    /// The batch of `step` when the step starts at `cursor`.
    pub fn batch(&self, stream: &TokenStream, step: u64, cursor: u64) -> Batch {
        let per_rank = self.per_rank();
        let own = self.rank_groups().start * self.group_sequences();
        let t = self.seq_len;
        let mut inputs = Vec::with_capacity(per_rank * t);
        let mut targets = Vec::with_capacity(per_rank * t);
        let mut tokens = Vec::with_capacity(t + 1);
        let first = cursor / t as u64;
        let offset = cursor % t as u64;
        let mut order = None;
        for i in 0..per_rank {
            let number = first + (own + i) as u64;
            tokens.clear();
            stream.read(self.place(stream, number, &mut order) + offset, t as u64 + 1, &mut tokens);
            inputs.extend_from_slice(&tokens[..t]);
            targets.extend_from_slice(&tokens[1..]);
        }
        Batch { step, inputs, targets, cursor_after: cursor + (self.sequences * t) as u64 }
    }

    /// Where sequence `number` starts in the stream; `order` caches the last window's permutation
    /// as `(epoch, window, permutation)`.
    fn place(&self, stream: &TokenStream, number: u64, order: &mut Option<(u64, u64, Vec<u64>)>) -> u64 {
        let t = self.seq_len as u64;
        let per_epoch = stream.len() / t;
        let window = self.window as u64;
        if window < 2 || per_epoch < 2 {
            return number * t;
        }
        let (epoch, within) = (number / per_epoch, number % per_epoch);
        let (w, j) = (within / window, within % window);
        let base = w * window;
        if !matches!(order, Some((e, k, _)) if *e == epoch && *k == w) {
            let size = window.min(per_epoch - base);
            let mut permutation: Vec<u64> = (0..size).collect();
            let mut state = self.seed ^ splitmix(&mut (epoch.wrapping_mul(0x1_0000_0001) ^ w));
            shuffle(&mut permutation, &mut state);
            *order = Some((epoch, w, permutation));
        }
        let (_, _, permutation) = order.as_ref().expect("set above");
        (base + permutation[j as usize]) * t
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
    use crate::tokens::ShardWriter;
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
    fn a_reordered_stream_reads_whole_documents_across_epochs() {
        let dir = tempfile::tempdir().unwrap();
        let plain = stream(dir.path());
        let categories = vec![0u16; plain.documents() as usize];
        let (s, _) = plain.upsample_long(&categories, 100, 1.0, 5).unwrap();
        assert_eq!(s.len(), 25);
        let mut pass = Vec::new();
        s.read(0, 25, &mut pass);
        let mut sorted = pass.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, (0..25).collect::<Vec<u32>>(), "every token once a pass");
        let mut out = Vec::new();
        s.read(22, 8, &mut out);
        assert_eq!(out, [&pass[22..], &pass[..5]].concat(), "the pass ends, then the next begins");
    }

    /// Category 0: 40 documents of 5 tokens and 10 of 40; category 1: 100 of 5, interleaved.
    /// Upsampling documents of 40+ tokens 4 times keeps each category's tokens (in expectation) and
    /// raises category 0's share of long-document tokens from 2/3 to about 8/9; whole documents only.
    #[test]
    fn long_documents_are_upsampled_within_each_category() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("0.tok");
        let mut w = ShardWriter::create(&path, 5000).unwrap();
        let (mut categories, mut next) = (Vec::new(), 0u32);
        for i in 0..150u32 {
            let (category, len) = match i % 3 {
                0 if i < 120 && i % 12 == 0 => (0u16, 40),
                0 | 1 if i < 120 => (0, 5),
                _ => (1, 5),
            };
            w.push(&(next..next + len).collect::<Vec<u32>>()).unwrap();
            next += len;
            categories.push(category);
        }
        w.finish().unwrap();
        let open = || TokenStream::open(std::slice::from_ref(&path)).unwrap();
        let before: Vec<(u64, u64)> = (0..2u16)
            .map(|c| {
                let docs = (0..150).filter(|&i| categories[i] == c);
                let lens: Vec<u64> = docs.map(|i| if i % 3 == 0 && i < 120 && i % 12 == 0 { 40 } else { 5 }).collect();
                (lens.iter().sum(), lens.iter().filter(|&&l| l >= 40).sum())
            })
            .collect();
        let (s, report) = open().upsample_long(&categories, 40, 4.0, 3).unwrap();
        assert_eq!(report.before, before);
        for c in 0..2 {
            let (tokens, after) = (report.before[c].0 as f64, report.after[c].0 as f64);
            assert!((after - tokens).abs() <= 0.25 * tokens, "category {c}: {after} tokens, was {tokens}");
        }
        let share = |(t, l): (u64, u64)| l as f64 / t as f64;
        assert!(share(report.after[0]) > 0.8 && share(report.before[0]) < 0.7, "{report:?}");
        assert_eq!(report.after[1].1, 0);
        // The stream is whole documents: every run of consecutive ids starts at a document start.
        let mut out = Vec::new();
        s.read(0, s.len(), &mut out);
        assert_eq!(out.len() as u64, report.after.iter().map(|a| a.0).sum::<u64>());
        let (again, _) = open().upsample_long(&categories, 40, 4.0, 3).unwrap();
        let mut second = Vec::new();
        again.read(0, again.len(), &mut second);
        assert_eq!(out, second, "deterministic");
        let (plain, report) = open().upsample_long(&categories, 40, 1.0, 3).unwrap();
        assert_eq!(report.after, report.before, "no upsampling: the stream's documents, shuffled");
        assert_eq!(plain.len(), open().len());
        assert!(open().upsample_long(&categories[1..], 40, 4.0, 3).is_err());
    }

    #[test]
    fn ranks_split_a_step_and_the_cursor_resumes_it() {
        let dir = tempfile::tempdir().unwrap();
        let s = Arc::new(stream(dir.path()));
        let shape = |rank, world| BatchShape { seq_len: 3, sequences: 4, rank, world, groups: 4, window: 0, seed: 0 };
        let whole = shape(0, 1).batch(&s, 0, 2);
        assert_eq!(whole.inputs, [2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13]);
        assert_eq!(whole.targets, [3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14]);
        assert_eq!(whole.cursor_after, 14);
        let r1 = shape(1, 2).batch(&s, 0, 2);
        assert_eq!(r1.inputs, whole.inputs[6..]);
        // Three ranks share four groups: the last rank takes two.
        let thirds: Vec<Vec<u32>> = (0..3).map(|r| shape(r, 3).batch(&s, 0, 2).inputs).collect();
        assert_eq!(thirds, [&whole.inputs[..3], &whole.inputs[3..6], &whole.inputs[6..]]);
        assert_eq!(shape(2, 3).rank_groups(), 2..4);
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

    #[test]
    fn shuffled_sequences_cover_each_window_once_per_epoch_and_resume_exactly() {
        // One 1,000-token document: token i is i, so a sequence's first token says where it starts.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("0.tok");
        let mut w = ShardWriter::create(&path, 2000).unwrap();
        w.push(&(0..1000).collect::<Vec<u32>>()).unwrap();
        w.finish().unwrap();
        let s = Arc::new(TokenStream::open(&[path]).unwrap());
        let shape = |rank, world| BatchShape { seq_len: 10, sequences: 4, rank, world, groups: 4, window: 16, seed: 7 };
        // 100 sequences per epoch: windows of 16 (the last one of 4); 25 steps per epoch.
        let epoch = |first_step: u64, cursor: u64| -> Vec<Batch> {
            let mut p = Prefetcher::start(Arc::clone(&s), shape(0, 1), first_step, first_step + 25, cursor, 2);
            std::iter::from_fn(|| p.next()).collect()
        };
        let first = epoch(0, 0);
        let starts: Vec<u32> = first.iter().flat_map(|b| b.inputs.chunks(10).map(|c| c[0])).collect();
        for (k, window) in starts.chunks(16).enumerate() {
            let mut sorted = window.to_vec();
            sorted.sort_unstable();
            let expected: Vec<u32> = (0..window.len() as u32).map(|i| (k as u32 * 16 + i) * 10).collect();
            assert_eq!(sorted, expected, "window {k} is a permutation of its sequences");
        }
        assert_ne!(starts[..16], (0..16).map(|i| i * 10).collect::<Vec<u32>>()[..], "the order is shuffled");
        for b in &first {
            for (inputs, targets) in b.inputs.chunks(10).zip(b.targets.chunks(10)) {
                assert_eq!(inputs[0] + 1, targets[0], "targets are the next tokens");
                assert_eq!(inputs[9] - inputs[0], 9, "sequences stay whole");
            }
        }
        // The next epoch visits the same sequences in another order.
        let second = epoch(25, first[24].cursor_after);
        let again: Vec<u32> = second.iter().flat_map(|b| b.inputs.chunks(10).map(|c| c[0])).collect();
        assert_ne!(again, starts);
        let mut a = again;
        a.sort_unstable();
        let mut b = starts;
        b.sort_unstable();
        assert_eq!(a, b);
        // Resuming mid-epoch from a saved cursor, and splitting a step across ranks, read the same.
        let resumed = Prefetcher::start(Arc::clone(&s), shape(0, 1), 10, 12, first[9].cursor_after, 2);
        assert_eq!(resumed.collect::<Vec<_>>(), first[10..12]);
        let r1 = shape(1, 2).batch(&s, 10, first[9].cursor_after);
        assert_eq!(r1.inputs, first[10].inputs[20..]);
    }
}
