//! The records map tasks leave for the reduce, beside their documents: one [`KeyRecord`] a kept
//! document (`keys.bin`), and its topic terms for in-context ordering (`terms.bin`).

use std::io::Write;

/// Per-document dedup record in `keys.bin`.
#[derive(Debug, Clone, PartialEq)]
pub struct KeyRecord {
    /// Index of the input file, in the canonical order of inputs.
    pub input: u32,
    /// Record within the input file.
    pub seq: u32,
    /// Index of the source in `spec.data.sources`.
    pub source: u16,
    /// Size of the document's text.
    pub bytes: u32,
    /// Quality score in [0, 1]; 1 when no classifier runs.
    pub score: f32,
    /// Exact-dedup hash of the normalised text.
    pub exact: u128,
}

impl KeyRecord {
    /// Appends the record (34 bytes).
    pub fn write(&self, out: &mut impl Write) -> std::io::Result<()> {
        out.write_all(&self.input.to_le_bytes())?;
        out.write_all(&self.seq.to_le_bytes())?;
        out.write_all(&self.source.to_le_bytes())?;
        out.write_all(&self.bytes.to_le_bytes())?;
        out.write_all(&self.score.to_le_bytes())?;
        out.write_all(&self.exact.to_le_bytes())
    }

    /// The document's canonical position as one sortable number.
    pub fn doc(&self) -> u64 {
        document_id(self.input, self.seq)
    }

    /// Bytes of a record.
    pub const SIZE: usize = 34;

    /// One record.
    pub fn parse(r: &[u8; Self::SIZE]) -> Self {
        let u32_at = |i: usize| u32::from_le_bytes(r[i..i + 4].try_into().expect("4 bytes"));
        KeyRecord {
            input: u32_at(0),
            seq: u32_at(4),
            source: u16::from_le_bytes(r[8..10].try_into().expect("2 bytes")),
            bytes: u32_at(10),
            score: f32::from_le_bytes(r[14..18].try_into().expect("4 bytes")),
            exact: u128::from_le_bytes(r[18..34].try_into().expect("16 bytes")),
        }
    }

    /// Every record of a `keys.bin`; `None` when it is not a whole number of records.
    pub fn parse_all(bytes: &[u8]) -> Option<Vec<Self>> {
        if !bytes.len().is_multiple_of(Self::SIZE) {
            return None;
        }
        Some(bytes.chunks_exact(Self::SIZE).map(|r| Self::parse(r.try_into().expect("a record"))).collect())
    }
}

/// A document's canonical position (input file, then record) as one number that sorts the same way.
pub fn document_id(input: u32, seq: u32) -> u64 {
    u64::from(input) << 32 | u64::from(seq)
}

/// Appends one document's terms to `terms.bin`.
pub fn write_terms(out: &mut impl Write, terms: &[(u32, u16)]) -> std::io::Result<()> {
    out.write_all(&[terms.len() as u8])?;
    for (t, c) in terms {
        out.write_all(&t.to_le_bytes())?;
        out.write_all(&c.to_le_bytes())?;
    }
    Ok(())
}

/// Every document's terms of a `terms.bin`; `None` when it is truncated.
pub fn parse_terms(bytes: &[u8]) -> Option<Vec<Vec<(u32, u16)>>> {
    let mut out = Vec::new();
    let mut at = 0;
    while at < bytes.len() {
        let n = usize::from(bytes[at]);
        at += 1;
        let end = at + n * 6;
        let chunk = bytes.get(at..end)?;
        out.push(
            chunk
                .chunks_exact(6)
                .map(|c| (u32::from_le_bytes(c[..4].try_into().expect("4 bytes")), u16::from_le_bytes([c[4], c[5]])))
                .collect(),
        );
        at = end;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_records_round_trip() {
        let r = KeyRecord { input: 3, seq: 9, source: 2, bytes: 77, score: 0.25, exact: u128::MAX - 5 };
        let mut buf = Vec::new();
        r.write(&mut buf).unwrap();
        r.write(&mut buf).unwrap();
        assert_eq!(KeyRecord::parse_all(&buf).unwrap(), vec![r.clone(), r]);
        assert!(KeyRecord::parse_all(&buf[1..]).is_none());
    }

    #[test]
    fn terms_round_trip() {
        let docs = [vec![(7u32, 3u16), (9, 1)], vec![], vec![(u32::MAX, u16::MAX)]];
        let mut buf = Vec::new();
        for d in &docs {
            write_terms(&mut buf, d).unwrap();
        }
        assert_eq!(parse_terms(&buf).unwrap(), docs);
        assert!(parse_terms(&buf[..buf.len() - 1]).is_none());
    }
}
