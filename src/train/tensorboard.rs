//! TensorBoard event files for `--report-to tensorboard`, the scalars of
//! `metrics.jsonl` under transformers' tag names (`train/loss`,
//! `train/learning_rate`, `eval/loss`, ...).
//!
//! Written by hand rather than with a crate: the Rust TensorBoard writers on
//! the registry are unmaintained and pull in a protobuf code generator, while
//! a scalar event is a dozen bytes of protobuf in TFRecord framing (length,
//! data, each followed by its masked CRC-32C).

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

/// Which keys of a `metrics.jsonl` line become which TensorBoard tags.
const TAGS: &[(&str, &str)] = &[
    ("loss", "train/loss"),
    ("lr", "train/learning_rate"),
    ("grad_norm", "train/grad_norm"),
    ("epoch", "train/epoch"),
    ("tokens_per_second", "train/tokens_per_second"),
    ("loss_scale", "train/loss_scale"),
    ("router_aux_loss", "train/aux_loss"),
    ("eval_loss", "eval/loss"),
];

/// The prefix TensorBoard looks for in a run folder.
pub const EVENTS_PREFIX: &str = "events.out.tfevents.";

/// An event file, appended record by record and flushed after each line of
/// metrics (a crash loses at most the record being written, which
/// TensorBoard's reader skips).
pub struct EventWriter {
    file: std::io::BufWriter<std::fs::File>,
    path: PathBuf,
}

impl EventWriter {
    /// Creates `DIR/events.out.tfevents.SECONDS.HOST.PID.0` (TensorFlow's
    /// naming, so the file sorts after older ones of the same folder) and
    /// writes the version record. A run resumed at step `resumed_at` also
    /// writes a session-start event at the step after it, which makes
    /// TensorBoard drop the steps from there on that earlier files hold (what
    /// a killed run logged after its last checkpoint).
    pub fn create(dir: &Path, resumed_at: Option<u64>) -> Result<Self> {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("{}: cannot create the TensorBoard folder", dir.display()))?;
        let now = wall_time();
        let host = hostname();
        let name = format!(
            "{EVENTS_PREFIX}{}.{host}.{}.0",
            now as u64,
            std::process::id()
        );
        let path = dir.join(name);
        let file = std::fs::File::create(&path)
            .with_context(|| format!("{}: cannot create", path.display()))?;
        let mut w = Self {
            file: std::io::BufWriter::new(file),
            path,
        };
        w.record(&event(now, 0, Payload::FileVersion("brain.Event:2")))?;
        if let Some(step) = resumed_at {
            w.record(&event(now, step as i64 + 1, Payload::SessionStart))?;
        }
        w.flush()?;
        Ok(w)
    }

    /// The file written.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Writes the numeric fields of a `metrics.jsonl` line as scalars at its
    /// `step`, then flushes.
    pub fn metrics_line(&mut self, line: &serde_json::Value) -> Result<()> {
        let Some(step) = line["step"].as_i64() else {
            return Ok(());
        };
        let now = wall_time();
        for (key, tag) in TAGS {
            if let Some(v) = line[*key].as_f64() {
                self.record(&event(now, step, Payload::Scalar(tag, v as f32)))?;
            }
        }
        self.flush()
    }

    fn record(&mut self, data: &[u8]) -> Result<()> {
        let len = (data.len() as u64).to_le_bytes();
        let mut rec = Vec::with_capacity(data.len() + 16);
        rec.extend_from_slice(&len);
        rec.extend_from_slice(&masked_crc32c(&len).to_le_bytes());
        rec.extend_from_slice(data);
        rec.extend_from_slice(&masked_crc32c(data).to_le_bytes());
        self.file
            .write_all(&rec)
            .with_context(|| format!("{}: cannot write", self.path.display()))
    }

    fn flush(&mut self) -> Result<()> {
        self.file
            .flush()
            .with_context(|| format!("{}: cannot write", self.path.display()))
    }
}

fn wall_time() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: gethostname writes at most buf.len() bytes into buf.
    let ok = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) } == 0;
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    let name = String::from_utf8_lossy(&buf[..end]).into_owned();
    match ok && !name.is_empty() {
        true => name.replace(['/', ' '], "_"),
        false => "localhost".into(),
    }
}

/// What an event carries besides its time and step.
enum Payload<'a> {
    FileVersion(&'a str),
    Scalar(&'a str, f32),
    /// `SessionLog { status: START }`.
    SessionStart,
}

/// `tensorflow.Event` in protobuf wire format: wall_time (1, double),
/// step (2, int64), then file_version (3), summary (5) or session_log (6).
fn event(wall_time: f64, step: i64, payload: Payload) -> Vec<u8> {
    let mut e = vec![0x09];
    e.extend_from_slice(&wall_time.to_le_bytes());
    e.push(0x10);
    varint(&mut e, step as u64);
    match payload {
        Payload::FileVersion(v) => bytes_field(&mut e, 3, v.as_bytes()),
        Payload::Scalar(tag, value) => {
            // Summary.Value: tag (1, string), simple_value (2, float).
            let mut v = Vec::new();
            bytes_field(&mut v, 1, tag.as_bytes());
            v.push(0x15);
            v.extend_from_slice(&value.to_le_bytes());
            let mut summary = Vec::new();
            bytes_field(&mut summary, 1, &v);
            bytes_field(&mut e, 5, &summary);
        }
        // SessionLog.status (1, enum) = START (1).
        Payload::SessionStart => bytes_field(&mut e, 6, &[0x08, 0x01]),
    }
    e
}

fn bytes_field(out: &mut Vec<u8>, field: u8, data: &[u8]) {
    out.push(field << 3 | 2);
    varint(out, data.len() as u64);
    out.extend_from_slice(data);
}

fn varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push(v as u8 | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// CRC-32C (Castagnoli), bitwise over a table built once.
fn crc32c(data: &[u8]) -> u32 {
    static TABLE: std::sync::OnceLock<[u32; 256]> = std::sync::OnceLock::new();
    let table = TABLE.get_or_init(|| {
        let mut t = [0u32; 256];
        for (i, e) in t.iter_mut().enumerate() {
            let mut c = i as u32;
            for _ in 0..8 {
                c = if c & 1 != 0 {
                    0x82F6_3B78 ^ (c >> 1)
                } else {
                    c >> 1
                };
            }
            *e = c;
        }
        t
    });
    !data.iter().fold(!0u32, |c, &b| {
        table[((c ^ u32::from(b)) & 0xff) as usize] ^ (c >> 8)
    })
}

/// TFRecord's masked CRC: rotated and offset so that a CRC of data holding
/// CRCs does not degenerate.
fn masked_crc32c(data: &[u8]) -> u32 {
    let c = crc32c(data);
    (c.rotate_right(15)).wrapping_add(0xa282_ead8)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_matches_the_standard_check_value() {
        // The check value of CRC-32C (RFC 3720, appendix B.4).
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
        // RFC 3720 B.4: 32 bytes of zeros.
        assert_eq!(crc32c(&[0u8; 32]), 0x8A91_36AA);
    }

    #[test]
    fn varints_are_little_endian_groups_of_seven() {
        let mut v = Vec::new();
        varint(&mut v, 300);
        assert_eq!(v, [0xAC, 0x02]);
    }
}
