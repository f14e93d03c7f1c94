//! Data-parallel collectives: every rank of a training gang holds the whole model, computes
//! gradients on its own slice of the global batch, and sums them with the others before the
//! optimizer step, so all ranks apply the same update and their weights stay identical.
//!
//! The sum is taken in one order whatever the number of ranks: the step's sequences are cut into
//! gradient groups (the gang's ranks at full size), each group's gradient is summed over its
//! micro-batches on the rank that holds it, and the groups are added one at a time in group order
//! ([`Collective::sum_in_order`]). On the TCP ring that order is exact, so a gang that shrank to
//! fewer ranks, or one process alone, computes bitwise the same update as the whole gang.
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
    /// The element-wise sum, as fp32, of every rank's `parts` (1-D, of one length; at least one per
    /// rank), added one at a time in rank order and, within a rank, in the order given:
    /// `((r0.p0 + r0.p1) + r1.p0) + ...`. Every rank receives bitwise the same values; on the TCP
    /// ring they are also the same for any split of the same parts over any number of ranks (NCCL
    /// adds in its own order).
    fn sum_in_order(&mut self, parts: &[Tensor]) -> Result<Tensor>;
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
    fn sum_in_order(&mut self, parts: &[Tensor]) -> Result<Tensor> {
        sum_parts(parts)
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

/// How long a collective waits for a peer (`PRETRAIN_COLLECTIVE_TIMEOUT`, 600 s by default); rank 0
/// waits as long for the other ranks' checkpoint shards.
pub fn collective_timeout() -> Duration {
    seconds_from_env(ENV_TIMEOUT, 600)
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
        timeout: collective_timeout(),
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

/// `parts` added one at a time in order, as fp32 (the first is copied, not added to zero, so that
/// its signed zeros stay as they are).
pub(crate) fn sum_parts(parts: &[Tensor]) -> Result<Tensor> {
    let (first, rest) = parts.split_first().ok_or_else(|| DistError::Backend("a sum of no parts".into()))?;
    let mut sum = first.to_dtype(DType::F32)?;
    for part in rest {
        sum = (sum + part.to_dtype(DType::F32)?)?;
    }
    Ok(sum)
}

/// One rank's gradient groups for a step: each group's gradients (one tensor per parameter) and
/// scalars (its loss sum, the stop request) that are summed with them.
#[derive(Debug, Default)]
pub struct Groups {
    /// Per group, in group order: the gradients, then the scalars.
    pub parts: Vec<(Vec<Tensor>, Vec<f32>)>,
}

impl Groups {
    /// Adds the next group; rank 0 (which starts the chain of sums) folds it into the one before,
    /// as the chain would, so that it holds one set of gradients whatever its number of groups.
    pub fn push(&mut self, rank: usize, grads: Vec<Tensor>, scalars: Vec<f32>) -> candle_core::Result<()> {
        match self.parts.last_mut() {
            Some((sum, sum_scalars)) if rank == 0 => {
                for (s, g) in sum.iter_mut().zip(grads) {
                    *s = (&*s + g)?;
                }
                for (s, v) in sum_scalars.iter_mut().zip(scalars) {
                    *s += v;
                }
            }
            _ => self.parts.push((grads, scalars)),
        }
        Ok(())
    }
}

/// Sums the gang's gradient groups in group order ([`Collective::sum_in_order`]), packed into flat
/// fp32 buckets of at most `bucket_bytes`; the scalars travel with the last bucket. Returns the
/// summed gradients (in their dtype) and scalars.
pub fn sum_gradients(
    collective: &mut dyn Collective,
    groups: Groups,
    bucket_bytes: usize,
) -> Result<(Vec<Tensor>, Vec<f32>)> {
    let mut parts = groups.parts;
    if collective.world() == 1 && parts.len() == 1 {
        return Ok(parts.pop().expect("one part"));
    }
    let (template, scalar_count) = match parts.first() {
        Some((grads, scalars)) => (grads.clone(), scalars.len()),
        None => return Err(DistError::Backend("this rank has no gradient group".into())),
    };
    let sizes: Vec<usize> = template.iter().map(Tensor::elem_count).collect();
    let mut ranges = buckets(&sizes, bucket_bytes);
    if ranges.is_empty() {
        ranges.push(0..0);
    }
    let device = template.first().map_or(Device::Cpu, |g| g.device().clone());
    let last = ranges.len() - 1;
    let mut grads = template;
    let mut scalars = vec![0f32; scalar_count];
    for (b, range) in ranges.into_iter().enumerate() {
        let flats = parts
            .iter()
            .map(|(part, part_scalars)| {
                let mut pieces = part[range.clone()]
                    .iter()
                    .map(|g| g.flatten_all()?.to_dtype(DType::F32))
                    .collect::<candle_core::Result<Vec<_>>>()?;
                if b == last && !part_scalars.is_empty() {
                    pieces.push(Tensor::from_slice(part_scalars, part_scalars.len(), &device)?);
                }
                Tensor::cat(&pieces, 0)
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        let summed = collective.sum_in_order(&flats)?;
        let mut offset = 0;
        for g in &mut grads[range] {
            let n = g.elem_count();
            *g = summed.narrow(0, offset, n)?.reshape(g.shape())?.to_dtype(g.dtype())?;
            offset += n;
        }
        if b == last && scalar_count > 0 {
            scalars = summed.narrow(0, offset, scalar_count)?.to_vec1::<f32>()?;
        }
    }
    Ok((grads, scalars))
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
