//! NCCL collectives on CUDA devices (feature `nccl`), through cudarc.
//!
//! Rank 0 makes NCCL's unique id and hands it out through the TCP rendezvous; the rendezvous
//! connections then stay open as the liveness channel ([`Membership::watch`]). NCCL itself never
//! times out on a dead peer, so a second watchdog ends the process with
//! [`exit::PEER_LOST`] when one collective has been waiting longer than the collective timeout.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use candle_core::cuda_backend::CudaStorage;
use candle_core::cuda_backend::cudarc::nccl::safe::{Comm, Id, ReduceOp};
use candle_core::{CpuStorage, DType, Device, InplaceOp1, Layout, Tensor};
use pretrain_crd::contract::exit;

use super::tcp::{Membership, Options, rendezvous};
use super::{Collective, DistError, Result};

/// A NCCL communicator over one CUDA device per rank.
pub struct Nccl {
    comm: Comm,
    rank: usize,
    world: usize,
    device: Device,
    membership: Membership,
    /// Milliseconds since `epoch` at which the running collective started, 0 when none runs.
    busy_since: Arc<AtomicU64>,
    epoch: Instant,
}

impl std::fmt::Debug for Nccl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Nccl").field("rank", &self.rank).field("world", &self.world).finish_non_exhaustive()
    }
}

fn nccl_error(what: &str, e: impl std::fmt::Debug) -> DistError {
    DistError::Backend(format!("NCCL {what}: {e:?}"))
}

struct Op<'a> {
    comm: &'a Comm,
    root: Option<usize>,
}

impl InplaceOp1 for Op<'_> {
    fn name(&self) -> &'static str {
        if self.root.is_some() { "nccl-broadcast" } else { "nccl-all-reduce" }
    }

    fn cpu_fwd(&self, _: &mut CpuStorage, _: &Layout) -> candle_core::Result<()> {
        candle_core::bail!("{} needs a CUDA tensor", self.name())
    }

    fn cuda_fwd(&self, storage: &mut CudaStorage, layout: &Layout) -> candle_core::Result<()> {
        if !layout.is_contiguous() || layout.start_offset() != 0 {
            candle_core::bail!("{} needs a contiguous tensor of its own", self.name());
        }
        let slice = storage.as_cuda_slice_mut::<f32>()?;
        let done = match self.root {
            None => self.comm.all_reduce_in_place(slice, &ReduceOp::Sum),
            Some(root) => self.comm.broadcast_in_place(slice, root as i32),
        };
        done.map(|_| ()).map_err(|e| candle_core::Error::Msg(format!("{}: {e:?}", self.name())))
    }
}

impl Nccl {
    /// Meets the gang over TCP, then opens the NCCL communicator on `device`.
    pub fn connect(options: &Options, device: &Device) -> Result<Self> {
        let Device::Cuda(cuda) = device else {
            return Err(DistError::Backend("NCCL needs a CUDA device".into()));
        };
        let membership = rendezvous(options, || {
            let id = Id::new().map_err(|e| nccl_error("unique id", e))?;
            Ok(id.internal().iter().map(|&c| c as u8).collect())
        })?;
        let bytes: [u8; 128] = membership
            .payload
            .as_slice()
            .try_into()
            .map_err(|_| DistError::Backend(format!("NCCL id of {} bytes, not 128", membership.payload.len())))?;
        let id = Id::uninit(bytes.map(|b| b as std::ffi::c_char));
        let comm = Comm::from_rank(cuda.cuda_stream(), options.rank, options.world, id)
            .map_err(|e| nccl_error("communicator", e))?;
        if options.watchdog {
            membership.watch()?;
        }
        let busy_since = Arc::new(AtomicU64::new(0));
        let epoch = Instant::now();
        if options.watchdog {
            let (busy, timeout, rank) = (Arc::clone(&busy_since), options.timeout, options.rank);
            std::thread::Builder::new()
                .name("nccl-watchdog".into())
                .spawn(move || {
                    loop {
                        std::thread::sleep(Duration::from_secs(1));
                        let since = busy.load(Ordering::SeqCst);
                        let now = epoch.elapsed().as_millis() as u64;
                        if since > 0 && now.saturating_sub(since) > timeout.as_millis() as u64 {
                            eprintln!(
                                "rank {rank}: a NCCL collective has waited {:.0} s for its peers ({} sets the limit); stopping so the gang restarts from its last checkpoint",
                                timeout.as_secs_f64(),
                                super::ENV_TIMEOUT
                            );
                            std::process::exit(exit::PEER_LOST);
                        }
                    }
                })
                .map_err(|e| DistError::Backend(format!("watchdog thread: {e}")))?;
        }
        Ok(Self {
            comm,
            rank: options.rank,
            world: options.world,
            device: device.clone(),
            membership,
            busy_since,
            epoch,
        })
    }

    /// Runs `op` on a private fp32 copy of `flat` and waits for it, under the watchdog.
    fn run(&self, flat: &Tensor, root: Option<usize>) -> Result<Tensor> {
        let out = flat.to_dtype(DType::F32)?.copy()?;
        self.busy_since.store((self.epoch.elapsed().as_millis() as u64).max(1), Ordering::SeqCst);
        let done = out.inplace_op1(&Op { comm: &self.comm, root }).and_then(|()| self.device.synchronize());
        self.busy_since.store(0, Ordering::SeqCst);
        done?;
        Ok(out)
    }
}

impl Collective for Nccl {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world(&self) -> usize {
        self.world
    }

    /// This rank's parts added in order, then NCCL's sum over ranks (in NCCL's order: bitwise the
    /// same on every rank, but not for another split over another number of ranks).
    fn sum_in_order(&mut self, parts: &[Tensor]) -> Result<Tensor> {
        self.run(&super::sum_parts(parts)?, None)
    }

    fn broadcast(&mut self, flat: &Tensor, root: usize) -> Result<Tensor> {
        self.run(flat, Some(root))
    }

    fn barrier(&mut self) -> Result<()> {
        let one = Tensor::zeros(1, DType::F32, &self.device)?;
        self.run(&one, None).map(drop)
    }

    fn finish(&mut self) -> Result<()> {
        self.barrier()?;
        self.membership.finish();
        Ok(())
    }
}
