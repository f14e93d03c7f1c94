//! What each step reports: its line of `metrics.jsonl` (kept in a local file the checkpoints upload),
//! the progress bar and the log line.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use bytes::Bytes;
use candle_core::Device;
use pretrain_store::StageDir;
pub use pretrain_store::artifact::MetricsLine;

use super::error::Result;
use super::job::Job;
use super::trainer::StepReport;
use crate::checkpoint::TrainState;
use crate::progress::Progress;

/// The stage's `metrics.jsonl`, written locally as steps complete.
#[derive(Debug)]
pub struct MetricsLog {
    path: PathBuf,
    file: File,
}

impl MetricsLog {
    /// The log in `cache`, beginning with the stage's stored lines up to `step` (a resume from an
    /// older checkpoint drops the lines past it).
    pub async fn open(dir: &StageDir, cache: &Path, step: u64) -> Result<Self> {
        #[derive(serde::Deserialize)]
        struct Step {
            step: u64,
        }
        let path = cache.join("metrics.jsonl");
        let mut file = File::create(&path)?;
        if let Some(old) = dir.store().get_opt(&dir.key("metrics.jsonl")?).await? {
            for line in String::from_utf8_lossy(&old).lines() {
                if serde_json::from_str::<Step>(line).is_ok_and(|s| s.step <= step) {
                    writeln!(file, "{line}")?;
                }
            }
        }
        Ok(Self { path, file })
    }

    /// Appends one step's line.
    pub fn write(&mut self, line: &MetricsLine) -> Result<()> {
        let json = serde_json::to_string(line).expect("a metrics line serialises");
        writeln!(self.file, "{json}")?;
        Ok(())
    }

    /// Everything written so far.
    pub fn bytes(&mut self) -> Result<Bytes> {
        self.file.flush()?;
        Ok(Bytes::from(std::fs::read(&self.path)?))
    }
}

/// Tokens per second and model FLOPs utilisation of a step.
#[derive(Debug, Clone, Copy)]
pub struct Throughput {
    flops_per_token: f64,
    peak: f64,
    step_tokens: u64,
    world: usize,
}

impl Throughput {
    /// For `job` on `device` (of `gpu_type`, when the spec names it) with `world` ranks.
    pub fn new(job: &Job, device: &Device, gpu_type: Option<&str>, world: usize) -> Self {
        Self {
            flops_per_token: job.config.flops_per_token(job.seq_len),
            peak: peak_flops(device, gpu_type),
            step_tokens: job.step_tokens(),
            world,
        }
    }

    /// The metrics line of a step that took `seconds` and left `state`.
    pub fn line(&self, state: &TrainState, step: &StepReport, seconds: f64) -> MetricsLine {
        let tokens_per_second = self.step_tokens as f64 / seconds / self.world as f64;
        MetricsLine {
            event: match (step.spike, step.new_level) {
                (Some(pretrain_crd::spec::SpikeAction::Rollback), _) => Some("rolled-back".into()),
                (Some(_), _) => Some("skipped".into()),
                (None, true) => Some("new-level".into()),
                (None, false) => None,
            },
            grad_norm: step.grad_norm,
            heldout_loss: None,
            loss: step.loss,
            lr: step.lr,
            mfu: self.flops_per_token * tokens_per_second / self.peak,
            probes: Default::default(),
            seconds,
            step: state.step,
            time: std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).ok().map(|d| d.as_secs_f64()),
            tokens: state.tokens_seen,
            tokens_per_second,
        }
    }
}

/// Peak FLOP/s the MFU estimate divides by: `PRETRAIN_PEAK_FLOPS`, or bf16 dense peaks of known
/// GPUs, or for CPUs 32 fp32 FLOPs per cycle per core at 3 GHz (two AVX2 FMA units).
fn peak_flops(device: &Device, gpu_type: Option<&str>) -> f64 {
    if let Some(v) = std::env::var("PRETRAIN_PEAK_FLOPS").ok().and_then(|v| v.parse().ok()) {
        return v;
    }
    if device.is_cuda() {
        let name = gpu_type.unwrap_or("").to_ascii_uppercase();
        return if name.contains("H200") || name.contains("H100") {
            989e12
        } else if name.contains("A100") {
            312e12
        } else {
            989e12
        };
    }
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
    cores * 32.0 * 3e9
}

/// The progress bar, or a log line every 5 seconds where there is none, with the time left.
#[derive(Debug)]
pub struct Pace {
    label: &'static str,
    total_steps: u64,
    start_step: u64,
    started: Instant,
    last_print: Instant,
    progress: Progress,
}

impl Pace {
    /// For `job`, resumed at `start_step`.
    pub fn new(job: &Job, start_step: u64) -> Self {
        Self {
            label: job.label,
            total_steps: job.total_steps,
            start_step,
            started: Instant::now(),
            last_print: Instant::now(),
            progress: Progress::new(job.label, "steps", Some(job.total_steps)),
        }
    }

    /// Wall time since the loop began.
    pub fn seconds(&self) -> f64 {
        self.started.elapsed().as_secs_f64()
    }

    /// Shows a finished step.
    pub fn report(&mut self, line: &MetricsLine) {
        let (step, total) = (line.step, self.total_steps);
        let done = (step - self.start_step) as f64;
        let eta = format_seconds(self.started.elapsed().as_secs_f64() / done * (total - step) as f64);
        let (loss, lr, tps, mfu) = (line.loss, line.lr, line.tokens_per_second, line.mfu * 100.0);
        self.progress.update(step, || format!("loss {loss:.4} lr {lr:.2e} {tps:.0} tok/s MFU {mfu:.1}% eta {eta}"));
        if !self.progress.reporting()
            && (self.last_print.elapsed().as_secs_f64() >= 5.0 || step == total || step == self.start_step + 1)
        {
            self.last_print = Instant::now();
            println!(
                "{}: step {step}/{total} loss {loss:.4} lr {lr:.2e} grad-norm {:.3} {tps:.0} tok/s MFU {mfu:.1}% eta {eta}",
                self.label, line.grad_norm
            );
        }
    }
}

fn format_seconds(s: f64) -> String {
    if s.is_finite() { pretrain_crd::display::duration(s as u64) } else { "?".into() }
}
