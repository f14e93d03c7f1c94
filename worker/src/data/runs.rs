//! Sorted runs of `(key, value)` pairs of `u64` on local disk: an external sort that spills a sorted
//! run whenever its buffer fills, and a k-way merge that streams any number of sorted files back in
//! order. The MinHash LSH index is built from these, so its size is bounded by disk, not RAM.
//!
//! A file is a plain sequence of 16-byte entries, key then value, little-endian.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::fs::File;
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

/// One entry: sorted by key, then value.
pub type Entry = (u64, u64);

const ENTRY_BYTES: usize = 16;

/// Entries held in memory before a run is spilled: 4 Mi entries, 64 MiB.
pub const DEFAULT_RUN_ENTRIES: usize = 1 << 22;

fn with_path(path: &Path) -> impl Fn(io::Error) -> io::Error + '_ {
    move |e| io::Error::new(e.kind(), format!("{}: {e}", path.display()))
}

fn write_entries(path: &Path, entries: &[Entry]) -> io::Result<()> {
    let mut out = BufWriter::new(File::create(path).map_err(with_path(path))?);
    for (k, v) in entries {
        out.write_all(&k.to_le_bytes()).and_then(|()| out.write_all(&v.to_le_bytes())).map_err(with_path(path))?;
    }
    out.flush().map_err(with_path(path))
}

/// Sorts any number of entries with a bounded buffer, spilling sorted runs into `dir`.
#[derive(Debug)]
pub struct ExternalSorter {
    dir: PathBuf,
    buffer: Vec<Entry>,
    capacity: usize,
    runs: Vec<PathBuf>,
    total: u64,
}

impl ExternalSorter {
    /// A sorter that keeps at most `capacity` entries in memory and spills runs into `dir`.
    pub fn new(dir: &Path, capacity: usize) -> Self {
        let capacity = capacity.max(1);
        Self {
            dir: dir.to_path_buf(),
            buffer: Vec::with_capacity(capacity.min(1 << 16)),
            capacity,
            runs: Vec::new(),
            total: 0,
        }
    }

    /// Adds an entry.
    pub fn push(&mut self, entry: Entry) -> io::Result<()> {
        self.buffer.push(entry);
        self.total += 1;
        if self.buffer.len() >= self.capacity {
            self.spill()?;
        }
        Ok(())
    }

    fn spill(&mut self) -> io::Result<()> {
        self.buffer.sort_unstable();
        let path = self.dir.join(format!("run-{:05}.bin", self.runs.len()));
        write_entries(&path, &self.buffer)?;
        self.buffer.clear();
        self.runs.push(path);
        Ok(())
    }

    /// Writes every entry, sorted, to `out`; returns how many. Spilled runs are removed.
    pub fn finish(mut self, out: &Path) -> io::Result<u64> {
        if self.runs.is_empty() {
            self.buffer.sort_unstable();
            write_entries(out, &self.buffer)?;
            return Ok(self.total);
        }
        if !self.buffer.is_empty() {
            self.spill()?;
        }
        let mut writer = BufWriter::new(File::create(out).map_err(with_path(out))?);
        for entry in Merge::open(&self.runs)? {
            let (k, v) = entry?;
            writer
                .write_all(&k.to_le_bytes())
                .and_then(|()| writer.write_all(&v.to_le_bytes()))
                .map_err(with_path(out))?;
        }
        writer.flush().map_err(with_path(out))?;
        for run in &self.runs {
            std::fs::remove_file(run).map_err(with_path(run))?;
        }
        Ok(self.total)
    }
}

/// Streams the entries of several sorted files in sorted order (ties: the earlier file first).
#[derive(Debug)]
pub struct Merge {
    readers: Vec<(PathBuf, BufReader<File>)>,
    heads: BinaryHeap<Reverse<(Entry, usize)>>,
    failed: bool,
}

impl Merge {
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

    fn read(&mut self, i: usize) -> io::Result<Option<Entry>> {
        let (path, reader) = &mut self.readers[i];
        let mut buf = [0u8; ENTRY_BYTES];
        let mut filled = 0;
        while filled < ENTRY_BYTES {
            match reader.read(&mut buf[filled..]) {
                Ok(0) if filled == 0 => return Ok(None),
                Ok(0) => {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("{}: ends inside an entry (not a whole number of 16-byte entries)", path.display()),
                    ));
                }
                Ok(n) => filled += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(with_path(path)(e)),
            }
        }
        let k = u64::from_le_bytes(buf[..8].try_into().expect("8 bytes"));
        let v = u64::from_le_bytes(buf[8..].try_into().expect("8 bytes"));
        Ok(Some((k, v)))
    }
}

impl Iterator for Merge {
    type Item = io::Result<Entry>;

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
    fn spilled_runs_merge_into_one_sorted_file() {
        let dir = tempfile::tempdir().unwrap();
        let mut state = 5;
        let entries: Vec<Entry> = (0..1000).map(|_| (splitmix(&mut state) % 50, splitmix(&mut state))).collect();
        let mut sorter = ExternalSorter::new(dir.path(), 64);
        for e in &entries {
            sorter.push(*e).unwrap();
        }
        let out = dir.path().join("sorted.bin");
        assert_eq!(sorter.finish(&out).unwrap(), 1000);
        let got: Vec<Entry> = Merge::open(&[out]).unwrap().map(Result::unwrap).collect();
        let mut want = entries;
        want.sort_unstable();
        assert_eq!(got, want);
        // Only the output is left: the 16 spilled runs are gone.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn merge_interleaves_files_and_refuses_damaged_ones() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a.bin");
        let b = dir.path().join("b.bin");
        write_entries(&a, &[(1, 0), (3, 0), (5, 0)]).unwrap();
        write_entries(&b, &[(2, 0), (3, 1), (9, 0)]).unwrap();
        let keys: Vec<Entry> = Merge::open(&[a.clone(), b.clone()]).unwrap().map(Result::unwrap).collect();
        assert_eq!(keys, vec![(1, 0), (2, 0), (3, 0), (3, 1), (5, 0), (9, 0)]);

        let mut bytes = std::fs::read(&b).unwrap();
        bytes.truncate(bytes.len() - 3);
        std::fs::write(&b, &bytes).unwrap();
        let err = Merge::open(&[a.clone(), b]).unwrap().find_map(Result::err).unwrap();
        assert!(err.to_string().contains("b.bin: ends inside an entry"), "{err}");

        write_entries(&a, &[(4, 0), (2, 0)]).unwrap();
        let err = Merge::open(&[a]).unwrap().find_map(Result::err).unwrap();
        assert!(err.to_string().contains("not sorted"), "{err}");
    }
}
