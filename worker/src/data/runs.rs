//! Sorted runs of fixed-width entries (`W` little-endian `u64`s, compared as tuples) on local disk:
//! an external sort that spills a sorted run whenever its buffer fills, and a k-way merge that
//! streams any number of sorted files back in order. The MinHash LSH index, the exact-hash index
//! and the dedup tasks' outputs are built from these, so their size is bounded by disk, not RAM.
//!
//! A sorted file comes with its slice index ([`SliceIndex`]): where each of [`SLICES`] equal ranges
//! of the first word begins, so that a task owning a range of keys reads only its part of the file.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::fs::File;
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::ops::Range;
use std::path::{Path, PathBuf};

/// One entry: `W` words, sorted as a tuple.
pub type Entry<const W: usize> = [u64; W];

/// Bytes of an entry of `W` words.
pub const fn entry_bytes<const W: usize>() -> usize {
    W * 8
}

/// Entries held in memory before a run is spilled: 4 Mi entries (64 MiB of two-word entries).
pub const DEFAULT_RUN_ENTRIES: usize = 1 << 22;

/// Equal ranges of the first word that a slice index locates: a task owning keys reads its slices.
pub const SLICES: usize = 4096;

/// The slice of a first word: its top 12 bits.
pub fn slice_of(key: u64) -> usize {
    (key >> (64 - SLICES.trailing_zeros())) as usize
}

fn with_path(path: &Path) -> impl Fn(io::Error) -> io::Error + '_ {
    move |e| io::Error::new(e.kind(), format!("{}: {e}", path.display()))
}

fn put<const W: usize>(out: &mut impl Write, entry: &Entry<W>) -> io::Result<()> {
    entry.iter().try_for_each(|w| out.write_all(&w.to_le_bytes()))
}

fn write_entries<const W: usize>(path: &Path, entries: &[Entry<W>]) -> io::Result<()> {
    let mut out = BufWriter::new(File::create(path).map_err(with_path(path))?);
    entries.iter().try_for_each(|e| put(&mut out, e)).map_err(with_path(path))?;
    out.flush().map_err(with_path(path))
}

/// Where each slice of a sorted file begins, in entries: `SLICES + 1` offsets, the last one the
/// number of entries. Stored beside the file as `SLICES + 1` little-endian `u64`s.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SliceIndex(Vec<u64>);

impl SliceIndex {
    /// Bytes of a stored index.
    pub const BYTES: usize = (SLICES + 1) * 8;

    /// Reads a stored index; `None` if the bytes are not one (wrong length, offsets decreasing).
    pub fn parse(bytes: &[u8]) -> Option<Self> {
        if bytes.len() != Self::BYTES {
            return None;
        }
        let offsets: Vec<u64> =
            bytes.chunks_exact(8).map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes"))).collect();
        offsets.windows(2).all(|w| w[0] <= w[1]).then_some(Self(offsets))
    }

    /// The stored form.
    pub fn to_bytes(&self) -> Vec<u8> {
        self.0.iter().flat_map(|o| o.to_le_bytes()).collect()
    }

    /// The entries of slices `slices` (a range of slice numbers).
    pub fn entries(&self, slices: Range<usize>) -> Range<u64> {
        self.0[slices.start]..self.0[slices.end]
    }

    /// Entries in all.
    pub fn len(&self) -> u64 {
        self.0[SLICES]
    }

    /// Whether the file is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The slices task `task` of `tasks` owns: a contiguous share of [`SLICES`], the same for any file.
pub fn task_slices(task: u32, tasks: u32) -> Range<usize> {
    let share = |t: u32| (t as usize * SLICES) / tasks.max(1) as usize;
    share(task)..share(task + 1)
}

/// Writes sorted entries to a file and counts where each slice begins.
struct SortedWriter<const W: usize> {
    out: BufWriter<File>,
    path: PathBuf,
    offsets: Vec<u64>,
    written: u64,
}

impl<const W: usize> SortedWriter<W> {
    fn create(path: &Path) -> io::Result<Self> {
        let out = BufWriter::new(File::create(path).map_err(with_path(path))?);
        Ok(Self { out, path: path.to_path_buf(), offsets: vec![0], written: 0 })
    }

    fn write(&mut self, entry: &Entry<W>) -> io::Result<()> {
        let slice = slice_of(entry[0]);
        while self.offsets.len() <= slice {
            self.offsets.push(self.written);
        }
        put(&mut self.out, entry).map_err(with_path(&self.path))?;
        self.written += 1;
        Ok(())
    }

    fn finish(mut self) -> io::Result<SliceIndex> {
        self.out.flush().map_err(with_path(&self.path))?;
        self.offsets.resize(SLICES + 1, self.written);
        Ok(SliceIndex(self.offsets))
    }
}

/// Sorts any number of entries with a bounded buffer, spilling sorted runs into `dir`.
#[derive(Debug)]
pub struct ExternalSorter<const W: usize> {
    dir: PathBuf,
    buffer: Vec<Entry<W>>,
    capacity: usize,
    runs: Vec<PathBuf>,
}

impl<const W: usize> ExternalSorter<W> {
    /// A sorter that keeps at most `capacity` entries in memory and spills runs into `dir`.
    pub fn new(dir: &Path, capacity: usize) -> Self {
        let capacity = capacity.max(1);
        Self { dir: dir.to_path_buf(), buffer: Vec::with_capacity(capacity.min(1 << 16)), capacity, runs: Vec::new() }
    }

    /// Adds an entry.
    pub fn push(&mut self, entry: Entry<W>) -> io::Result<()> {
        self.buffer.push(entry);
        if self.buffer.len() >= self.capacity {
            self.spill()?;
        }
        Ok(())
    }

    fn spill(&mut self) -> io::Result<()> {
        std::fs::create_dir_all(&self.dir).map_err(with_path(&self.dir))?;
        self.buffer.sort_unstable();
        let path = self.dir.join(format!("run-{:05}.bin", self.runs.len()));
        write_entries(&path, &self.buffer)?;
        self.buffer.clear();
        self.runs.push(path);
        Ok(())
    }

    /// Writes every entry, sorted, to `out` (equal entries once when `unique`); returns the file's
    /// slice index. Spilled runs are removed.
    pub fn finish(mut self, out: &Path, unique: bool) -> io::Result<SliceIndex> {
        let mut writer = SortedWriter::<W>::create(out)?;
        let mut last: Option<Entry<W>> = None;
        let mut write = |entry: Entry<W>| {
            if unique && last == Some(entry) {
                return Ok(());
            }
            last = Some(entry);
            writer.write(&entry)
        };
        if self.runs.is_empty() {
            self.buffer.sort_unstable();
            std::mem::take(&mut self.buffer).into_iter().try_for_each(&mut write)?;
        } else {
            if !self.buffer.is_empty() {
                self.spill()?;
            }
            for entry in Merge::<W>::open(&self.runs)? {
                write(entry?)?;
            }
            for run in &self.runs {
                std::fs::remove_file(run).map_err(with_path(run))?;
            }
        }
        writer.finish()
    }
}

/// Streams the entries of several sorted files in sorted order (ties: the earlier file first).
#[derive(Debug)]
pub struct Merge<const W: usize> {
    readers: Vec<(PathBuf, BufReader<File>)>,
    heads: BinaryHeap<Reverse<(Entry<W>, usize)>>,
    failed: bool,
}

impl<const W: usize> Merge<W> {
    /// Opens `paths`, each sorted.
    pub fn open(paths: &[PathBuf]) -> io::Result<Self> {
        let mut merge = Self { readers: Vec::with_capacity(paths.len()), heads: BinaryHeap::new(), failed: false };
        for (i, path) in paths.iter().enumerate() {
            let file = File::open(path).map_err(with_path(path))?;
            merge.readers.push((path.clone(), BufReader::with_capacity(1 << 16, file)));
            if let Some(entry) = merge.read(i)? {
                merge.heads.push(Reverse((entry, i)));
            }
        }
        Ok(merge)
    }

    fn read(&mut self, i: usize) -> io::Result<Option<Entry<W>>> {
        let (path, reader) = &mut self.readers[i];
        let mut buf = vec![0u8; entry_bytes::<W>()];
        let mut filled = 0;
        while filled < buf.len() {
            match reader.read(&mut buf[filled..]) {
                Ok(0) if filled == 0 => return Ok(None),
                Ok(0) => {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!(
                            "{}: ends inside an entry (not a whole number of {}-byte entries)",
                            path.display(),
                            entry_bytes::<W>()
                        ),
                    ));
                }
                Ok(n) => filled += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(with_path(path)(e)),
            }
        }
        let mut entry = [0u64; W];
        for (w, c) in entry.iter_mut().zip(buf.chunks_exact(8)) {
            *w = u64::from_le_bytes(c.try_into().expect("8 bytes"));
        }
        Ok(Some(entry))
    }
}

impl<const W: usize> Iterator for Merge<W> {
    type Item = io::Result<Entry<W>>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed {
            return None;
        }
        let Reverse((entry, i)) = self.heads.pop()?;
        match self.read(i) {
            Ok(Some(next)) => {
                if next < entry {
                    self.failed = true;
                    let path = self.readers[i].0.display().to_string();
                    return Some(Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("{path}: entries are not sorted"),
                    )));
                }
                self.heads.push(Reverse((next, i)));
            }
            Ok(None) => {}
            Err(e) => {
                self.failed = true;
                return Some(Err(e));
            }
        }
        Some(Ok(entry))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pretrain_crd::seeded::splitmix;

    #[test]
    fn spilled_runs_merge_into_one_sorted_file_with_its_slice_index() {
        let dir = tempfile::tempdir().unwrap();
        let mut state = 5;
        // Keys spread over the whole word, so every slice is exercised; a few repeat.
        let entries: Vec<Entry<3>> =
            (0..1000).map(|i| [splitmix(&mut state) | (i % 3), splitmix(&mut state) % 4, i % 2]).collect();
        let mut sorter = ExternalSorter::new(&dir.path().join("runs"), 64);
        for e in entries.iter().chain(&entries[..10]) {
            sorter.push(*e).unwrap();
        }
        let out = dir.path().join("sorted.bin");
        let index = sorter.finish(&out, true).unwrap();
        assert_eq!(index.len(), 1000, "the ten repeated entries are written once");
        let got: Vec<Entry<3>> = Merge::open(&[out]).unwrap().map(Result::unwrap).collect();
        let mut want = entries;
        want.sort_unstable();
        assert_eq!(got, want);
        // Only the output is left: the spilled runs are gone.
        assert_eq!(std::fs::read_dir(dir.path().join("runs")).unwrap().count(), 0);
        // The index finds each task's keys, whatever the number of tasks.
        for tasks in [1, 3, 8] {
            let mut seen = 0;
            for task in 0..tasks {
                let slices = task_slices(task, tasks);
                let range = index.entries(slices.clone());
                for e in &got[range.start as usize..range.end as usize] {
                    assert!(slices.contains(&slice_of(e[0])));
                }
                seen += range.end - range.start;
            }
            assert_eq!(seen, 1000, "{tasks} tasks see every entry once");
        }
        assert_eq!(SliceIndex::parse(&index.to_bytes()), Some(index));
        assert_eq!(SliceIndex::parse(&[0; 16]), None);
    }

    #[test]
    fn merge_interleaves_files_and_refuses_damaged_ones() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a.bin");
        let b = dir.path().join("b.bin");
        write_entries(&a, &[[1, 0], [3, 0], [5, 0]]).unwrap();
        write_entries(&b, &[[2, 0], [3, 1], [9, 0]]).unwrap();
        let keys: Vec<Entry<2>> = Merge::open(&[a.clone(), b.clone()]).unwrap().map(Result::unwrap).collect();
        assert_eq!(keys, vec![[1, 0], [2, 0], [3, 0], [3, 1], [5, 0], [9, 0]]);

        let mut bytes = std::fs::read(&b).unwrap();
        bytes.truncate(bytes.len() - 3);
        std::fs::write(&b, &bytes).unwrap();
        let err = Merge::<2>::open(&[a.clone(), b]).unwrap().find_map(Result::err).unwrap();
        assert!(err.to_string().contains("b.bin: ends inside an entry"), "{err}");

        write_entries(&a, &[[4, 0], [2, 0]]).unwrap();
        let err = Merge::<2>::open(&[a]).unwrap().find_map(Result::err).unwrap();
        assert!(err.to_string().contains("not sorted"), "{err}");
    }
}
