//! TensorBoard event files of a training stage, written from its `metrics.jsonl` beside it
//! (`<run>/<stage>/tensorboard/events.out.tfevents.0.pretrain`) whenever the metrics are saved, so
//! `tensorboard --logdir` on a synced copy of the run shows train and long-context side by side.
//!
//! The format is TensorFlow's: a TFRecord file (each record its length, a masked CRC-32C of the
//! length, the bytes, a masked CRC-32C of the bytes) of `Event` protocol buffers, the first holding
//! the file version, each next one a step's `Summary` of scalar values. No well-kept Rust crate
//! writes it (`tensorboard-rs` is unmaintained since 2022 and pulls in `image` and protobuf 2), and
//! the five protobuf fields it needs are encoded here by hand. Checked by reading the files back with
//! the `tensorboard` Python package's event reader (`scripts/check_tensorboard.py`).

use pretrain_store::artifact::MetricsLine;

/// The event file's name under the stage's prefix.
pub const FILE: &str = "tensorboard/events.out.tfevents.0.pretrain";

/// The event file of every parseable line of `metrics_jsonl` (others, such as a torn last line,
/// are skipped).
pub fn events(metrics_jsonl: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    let lines: Vec<MetricsLine> =
        metrics_jsonl.split(|b| *b == b'\n').filter_map(|l| serde_json::from_slice::<MetricsLine>(l).ok()).collect();
    let start = lines.first().map_or(0.0, |l| l.time.unwrap_or(0.0));
    record(&mut out, &event(start, 0, Body::FileVersion("brain.Event:2")));
    let mut elapsed = 0.0;
    for line in &lines {
        elapsed += line.seconds;
        let time = line.time.unwrap_or(start + elapsed);
        record(&mut out, &event(time, line.step as i64, Body::Summary(&scalars(line))));
    }
    out
}

/// The scalars of one step, by tag.
pub fn scalars(line: &MetricsLine) -> Vec<(String, f32)> {
    let mut out = vec![
        ("loss".to_string(), line.loss as f32),
        ("lr".to_string(), line.lr as f32),
        ("grad_norm".to_string(), line.grad_norm as f32),
        ("tokens_per_second".to_string(), line.tokens_per_second as f32),
        ("mfu".to_string(), line.mfu as f32),
    ];
    if let Some(h) = line.heldout_loss {
        out.push(("heldout_loss".into(), h as f32));
    }
    out.extend(line.probes.iter().map(|(name, lp)| (format!("probe/{name}"), *lp as f32)));
    out
}

#[derive(Clone, Copy)]
enum Body<'a> {
    FileVersion(&'a str),
    Summary(&'a [(String, f32)]),
}

/// An `Event`: wall_time (1, double), step (2, int64), file_version (3, string) or summary (5,
/// `Summary`: repeated value (1) of `Value`: tag (1, string), simple_value (2, float)).
fn event(wall_time: f64, step: i64, body: Body<'_>) -> Vec<u8> {
    let mut out = vec![0x09];
    out.extend_from_slice(&wall_time.to_le_bytes());
    out.push(0x10);
    varint(&mut out, step as u64);
    match body {
        Body::FileVersion(v) => field(&mut out, 0x1a, v.as_bytes()),
        Body::Summary(values) => {
            let mut summary = Vec::new();
            for (tag, value) in values {
                let mut v = Vec::new();
                field(&mut v, 0x0a, tag.as_bytes());
                v.push(0x15);
                v.extend_from_slice(&value.to_le_bytes());
                field(&mut summary, 0x0a, &v);
            }
            field(&mut out, 0x2a, &summary);
        }
    }
    out
}

/// A length-delimited field: its key, the length, the bytes.
fn field(out: &mut Vec<u8>, key: u8, bytes: &[u8]) {
    out.push(key);
    varint(out, bytes.len() as u64);
    out.extend_from_slice(bytes);
}

fn varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// One TFRecord.
fn record(out: &mut Vec<u8>, data: &[u8]) {
    let len = (data.len() as u64).to_le_bytes();
    out.extend_from_slice(&len);
    out.extend_from_slice(&masked_crc(&len).to_le_bytes());
    out.extend_from_slice(data);
    out.extend_from_slice(&masked_crc(data).to_le_bytes());
}

/// TFRecord's masked CRC-32C.
fn masked_crc(bytes: &[u8]) -> u32 {
    let crc = crc32c::crc32c(bytes);
    crc.rotate_right(15).wrapping_add(0xa282_ead8)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_frame_events_with_checked_lengths() {
        let line = MetricsLine {
            event: None,
            grad_norm: 1.5,
            heldout_loss: Some(3.0),
            loss: 4.0,
            lr: 1e-3,
            mfu: 0.1,
            probes: [("capital".to_string(), -2.5)].into(),
            seconds: 0.5,
            step: 7,
            time: Some(1_700_000_000.0),
            tokens: 100,
            tokens_per_second: 200.0,
        };
        let json = serde_json::to_string(&line).unwrap();
        let file = events(format!("{json}\n{json}\n{{\"torn").as_bytes());
        // Walk the records: each length's CRC and each body's CRC check out.
        let (mut at, mut records) = (0, 0);
        while at < file.len() {
            let len = u64::from_le_bytes(file[at..at + 8].try_into().unwrap()) as usize;
            assert_eq!(u32::from_le_bytes(file[at + 8..at + 12].try_into().unwrap()), masked_crc(&file[at..at + 8]));
            let body = &file[at + 12..at + 12 + len];
            assert_eq!(u32::from_le_bytes(file[at + 12 + len..at + 16 + len].try_into().unwrap()), masked_crc(body));
            at += 16 + len;
            records += 1;
        }
        assert_eq!(records, 3, "the version and two steps; the torn line is skipped");
        assert_eq!(scalars(&line).len(), 7);
        // CRC-32C of "123456789" is 0xE3069283 (the standard check value).
        assert_eq!(crc32c::crc32c(b"123456789"), 0xE306_9283);
        let mut v = Vec::new();
        varint(&mut v, 300);
        assert_eq!(v, [0xac, 0x02]);
    }
}
