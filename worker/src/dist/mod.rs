//! Data-parallel collectives: every rank of a training gang holds the whole model, computes
//! gradients on its own slice of the global batch, and averages them with the others before the
//! optimizer step, so all ranks apply the same update and their weights stay identical.
//!
//! Two backends sit behind [`Collective`]:
//! - [`tcp::Ring`], a ring all-reduce over TCP for CPU processes (tests, CPU-only clusters);
//! - `nccl::Nccl` (feature `nccl`), NCCL through cudarc on GPUs.
//!
//! Both meet through [`tcp::rendezvous`]: rank 0 listens on `MASTER_ADDR:MASTER_PORT`, every other
//! rank reports there, and rank 0 answers with the ring's addresses (and NCCL's unique id). The
//! connections to rank 0 stay open as a liveness channel: a rank that dies makes the others stop
//! with [`pretrain_crd::contract::exit::PEER_LOST`], which the operator reads as "restart the gang
//! from its last checkpoint".

pub mod launch;
pub mod tcp;

#[cfg(feature = "nccl")]
pub mod nccl;

use std::time::Duration;

use candle_core::{DType, Device, Tensor};

use crate::Context;
use crate::model::Params;

/// Why a collective failed.
#[derive(Debug, thiserror::Error)]
pub enum DistError {
    /// The gang could not meet.
    #[error("rendezvous at {master}: {reason}")]
    Rendezvous {
        /// Rank 0's address.
        master: String,
        /// What went wrong, naming the ranks that did not arrive.
        reason: String,
    },
    /// A peer died, stalled or sent something unexpected during a collective.
    #[error("{op} #{seq}: rank {peer}: {reason}")]
    Peer {
        /// The collective.
        op: &'static str,
        /// Its sequence number on this rank.
        seq: u64,
        /// The peer.
        peer: usize,
        /// What happened.
        reason: String,
    },
    /// Tensors could not be moved to or from the backend.
    #[error("collective tensors: {0}")]
    Tensor(#[from] candle_core::Error),
    /// The backend failed (NCCL).
    #[error("{0}")]
    Backend(String),
}

/// Result of a collective.
pub type Result<T, E = DistError> = std::result::Result<T, E>;

/// The collectives data parallelism needs. Tensors are 1-D; every rank calls the same collectives
/// in the same order with the same lengths.
pub trait Collective: std::fmt::Debug {
    /// This process's rank.
    fn rank(&self) -> usize;
    /// Processes in the gang.
    fn world(&self) -> usize;
    /// The element-wise mean over ranks, as fp32; every rank receives bitwise the same values.
    fn all_reduce_mean(&mut self, flat: &Tensor) -> Result<Tensor>;
    /// `root`'s values on every rank.
    fn broadcast(&mut self, flat: &Tensor, root: usize) -> Result<Tensor>;
    /// Returns once every rank has called it.
    fn barrier(&mut self) -> Result<()>;
    /// Tells the peers this rank ends on purpose (so its exit is not taken for a crash).
    fn finish(&mut self) -> Result<()>;
}

/// The gang of one: every collective is the identity.
#[derive(Debug, Clone, Copy, Default)]
pub struct Solo;

impl Collective for Solo {
    fn rank(&self) -> usize {
        0
    }
    fn world(&self) -> usize {
        1
    }
    fn all_reduce_mean(&mut self, flat: &Tensor) -> Result<Tensor> {
        Ok(flat.clone())
    }
    fn broadcast(&mut self, flat: &Tensor, _root: usize) -> Result<Tensor> {
        Ok(flat.clone())
    }
    fn barrier(&mut self) -> Result<()> {
        Ok(())
    }
    fn finish(&mut self) -> Result<()> {
        Ok(())
    }
}

/// Environment variable: seconds a collective waits for a peer before failing (default 600).
pub const ENV_TIMEOUT: &str = "PRETRAIN_COLLECTIVE_TIMEOUT";
/// Environment variable: seconds rank 0 waits for the whole gang to arrive (default 600).
pub const ENV_RENDEZVOUS_TIMEOUT: &str = "PRETRAIN_RENDEZVOUS_TIMEOUT";
/// Gradients travel in flat fp32 buckets of at most this many bytes (PyTorch DDP's default).
pub const BUCKET_BYTES: usize = 25 << 20;

fn seconds_from_env(name: &str, default: u64) -> Duration {
    Duration::from_secs_f64(
        std::env::var(name).ok().and_then(|v| v.parse::<f64>().ok()).filter(|s| *s > 0.0).unwrap_or(default as f64),
    )
}

/// Joins the gang of a stage process: [`Solo`] for a world of one, else NCCL on CUDA devices (when
/// built with `nccl`) or the TCP ring. Exits of peers are watched from here on.
pub fn connect(ctx: &Context, device: &Device) -> Result<Box<dyn Collective>> {
    if ctx.world_size <= 1 {
        return Ok(Box::new(Solo));
    }
    let options = tcp::Options {
        master: ctx.master.clone(),
        rank: ctx.rank as usize,
        world: ctx.world_size as usize,
        gang: format!("{}/{}/{}", ctx.run_name(), ctx.stage, ctx.config_hash()),
        rendezvous_timeout: seconds_from_env(ENV_RENDEZVOUS_TIMEOUT, 600),
        timeout: seconds_from_env(ENV_TIMEOUT, 600),
        watchdog: true,
    };
    if device.is_cuda() {
        #[cfg(feature = "nccl")]
        return Ok(Box::new(nccl::Nccl::connect(&options, device)?));
        #[cfg(not(feature = "nccl"))]
        return Err(DistError::Backend(format!(
            "WORLD_SIZE is {} on CUDA devices, but this pretrain-worker was built without NCCL (build with --features nccl)",
            options.world
        )));
    }
    Ok(Box::new(tcp::Ring::connect(&options)?))
}

/// Consecutive runs of tensors whose fp32 sizes add up to at most `bucket_bytes` (a tensor larger
/// than that is a bucket of its own).
fn buckets(sizes: &[usize], bucket_bytes: usize) -> Vec<std::ops::Range<usize>> {
    let mut out = Vec::new();
    let mut start = 0;
    let mut bytes = 0;
    for (i, &n) in sizes.iter().enumerate() {
        if i > start && bytes + 4 * n > bucket_bytes {
            out.push(start..i);
            start = i;
            bytes = 0;
        }
        bytes += 4 * n;
    }
    if start < sizes.len() {
        out.push(start..sizes.len());
    }
    out
}

/// Averages `grads` over the gang in place, packed into flat fp32 buckets of at most `bucket_bytes`;
/// the `scalars` (the step's loss, the stop request) travel with the last bucket and are averaged too.
pub fn all_reduce_gradients(
    collective: &mut dyn Collective,
    grads: &mut [Tensor],
    scalars: &mut [f32],
    bucket_bytes: usize,
) -> Result<()> {
    if collective.world() == 1 {
        return Ok(());
    }
    let sizes: Vec<usize> = grads.iter().map(Tensor::elem_count).collect();
    let mut groups = buckets(&sizes, bucket_bytes);
    if groups.is_empty() {
        groups.push(0..0);
    }
    let device = grads.first().map_or(Device::Cpu, |g| g.device().clone());
    let last = groups.len() - 1;
    for (b, range) in groups.into_iter().enumerate() {
        let mut parts = grads[range.clone()]
            .iter()
            .map(|g| g.flatten_all()?.to_dtype(DType::F32))
            .collect::<candle_core::Result<Vec<_>>>()?;
        if b == last && !scalars.is_empty() {
            parts.push(Tensor::from_slice(scalars, scalars.len(), &device)?);
        }
        let flat = Tensor::cat(&parts, 0)?;
        let reduced = collective.all_reduce_mean(&flat)?;
        let mut offset = 0;
        for g in &mut grads[range] {
            let n = g.elem_count();
            *g = reduced.narrow(0, offset, n)?.reshape(g.shape())?.to_dtype(g.dtype())?;
            offset += n;
        }
        if b == last && !scalars.is_empty() {
            let values = reduced.narrow(0, offset, scalars.len())?.to_vec1::<f32>()?;
            scalars.copy_from_slice(&values);
        }
    }
    Ok(())
}

/// Replaces every rank's weights with rank 0's, so a gang starts from one set of weights whatever
/// each rank initialised.
pub fn broadcast_params(collective: &mut dyn Collective, params: &Params) -> Result<()> {
    if collective.world() == 1 {
        return Ok(());
    }
    let sizes: Vec<usize> = params.iter().map(|(_, _, v)| v.elem_count()).collect();
    let vars: Vec<_> = params.iter().map(|(_, _, v)| v).collect();
    for range in buckets(&sizes, BUCKET_BYTES) {
        let parts = vars[range.clone()]
            .iter()
            .map(|v| v.as_tensor().flatten_all()?.to_dtype(DType::F32))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let flat = collective.broadcast(&Tensor::cat(&parts, 0)?, 0)?;
        let mut offset = 0;
        for v in &vars[range] {
            let n = v.elem_count();
            v.set(&flat.narrow(0, offset, n)?.reshape(v.shape())?.to_dtype(v.dtype())?)?;
            offset += n;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_group_consecutive_tensors_up_to_the_limit() {
        assert_eq!(buckets(&[], 16), Vec::<std::ops::Range<usize>>::new());
        assert_eq!(buckets(&[2, 2, 2], 16), vec![0..2, 2..3]);
        // A tensor over the limit is a bucket of its own.
        assert_eq!(buckets(&[1, 10, 1], 16), vec![0..1, 1..2, 2..3]);
        assert_eq!(buckets(&[4, 4], 1 << 20), vec![0..2]);
    }
}
