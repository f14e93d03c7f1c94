//! Files of sections: a task that sends records to many readers (a route task to the output shards,
//! an embed task to the partitions) writes one store file of sections, in section order, each
//! compressed as one zstd frame, and an index of where each begins (`u64` offsets, the last the
//! file's length), so that each reader fetches only its own section of every file.

use std::io::Write;
use std::ops::Range;
use std::path::Path;

use pretrain_store::{FileWriter, StageDir};

use super::buckets::corrupt;
use super::stage::Result;
use crate::frame::scratch;

/// Records flushed to the store in pieces of about this many compressed bytes.
const PIECE: usize = 1 << 20;

/// A file of sections being written.
pub(super) struct Sections {
    name: String,
    writer: FileWriter,
    encoder: zstd::Encoder<'static, Vec<u8>>,
    current: Option<u32>,
    written: u64,
    offsets: Vec<u64>,
}

impl Sections {
    /// Starts file `name` of the stage, of `sections` sections.
    pub(super) fn create(dir: &StageDir, name: &str, sections: usize) -> Result<Self> {
        Ok(Self {
            name: name.to_string(),
            writer: dir.writer(name)?,
            encoder: zstd::Encoder::new(Vec::new(), 1).map_err(scratch(Path::new(name)))?,
            current: None,
            written: 0,
            offsets: vec![0; sections + 1],
        })
    }

    /// Appends `record` to `section`: sections come in increasing order, each record whole.
    pub(super) async fn push(&mut self, section: u32, record: &[u8]) -> Result<()> {
        debug_assert!(self.current.is_none_or(|c| c <= section), "sections in order");
        if self.current != Some(section) {
            self.end_section().await?;
            self.current = Some(section);
        }
        self.encoder.write_all(record).map_err(scratch(Path::new(&self.name)))?;
        if self.encoder.get_ref().len() >= PIECE {
            let piece = std::mem::take(self.encoder.get_mut());
            self.writer.write(&piece).await?;
            self.written += piece.len() as u64;
        }
        Ok(())
    }

    async fn end_section(&mut self) -> Result<()> {
        let Some(section) = self.current else { return Ok(()) };
        let fresh = zstd::Encoder::new(Vec::new(), 1).map_err(scratch(Path::new(&self.name)))?;
        let rest = std::mem::replace(&mut self.encoder, fresh).finish().map_err(scratch(Path::new(&self.name)))?;
        self.writer.write(&rest).await?;
        self.written += rest.len() as u64;
        self.offsets[section as usize + 1] = self.written;
        Ok(())
    }

    /// Finishes the file and writes its index as `index`.
    pub(super) async fn finish(mut self, dir: &StageDir, index: &str) -> Result<()> {
        self.end_section().await?;
        self.writer.finish().await?;
        for k in 1..self.offsets.len() {
            self.offsets[k] = self.offsets[k].max(self.offsets[k - 1]);
        }
        let bytes: Vec<u8> = self.offsets.iter().flat_map(|o| o.to_le_bytes()).collect();
        dir.put(index, bytes.into()).await?;
        Ok(())
    }
}

/// Where sections `wanted` of file `name` lie, from its `index`: one byte range a section.
pub(super) async fn ranges(dir: &StageDir, index: &str, wanted: Range<u32>) -> Result<Vec<Range<u64>>> {
    let range = u64::from(wanted.start) * 8..(u64::from(wanted.end) + 1) * 8;
    let got = dir.store().get_ranges(&dir.key(index)?, std::slice::from_ref(&range)).await?;
    let offsets: Vec<u64> =
        got[0].chunks_exact(8).map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes"))).collect();
    if offsets.len() != wanted.len() + 1 {
        return Err(corrupt(dir, index, "shorter than the sections the spec asks for"));
    }
    Ok(offsets.windows(2).map(|w| w[0]..w[1].max(w[0])).collect())
}
