//! The fused operations on CUDA devices (feature `cuda`): pretrain-kernels' kernels (its fat binary,
//! loaded once per context), launched on candle's stream into buffers allocated from candle's
//! device. Each function here is one custom op's `cuda_fwd` (see `fused/`, whose CPU kernels are
//! the reference the kernels are tested against in `tests/kernels.rs`).
//!
//! Inputs must be contiguous (the callers make them so); outputs are fresh allocations the kernels
//! write in full. Every device pointer is taken through cudarc's `device_ptr(_mut)`, whose guards
//! order the launch after earlier writes and record it for later users, and live until the launch
//! has been queued.
#![allow(unsafe_code)]

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{
    CudaFunction, CudaModule, CudaSlice, CudaStream, DevicePtr, DevicePtrMut, LaunchConfig, PushKernelArg, SyncOnDrop,
};
use candle_core::cuda_backend::cudarc::nvrtc::Ptx;
use candle_core::cuda_backend::{CudaDevice, CudaStorage, CudaStorageSlice};
use candle_core::{Layout, Result};
use pretrain_kernels::{self as kernels, Arg, Buf, Launch, Launcher, Ty};

/// Kernel `name` in `device`'s context. The module is loaded on first use (machine code for the GPU
/// the build targeted; the driver compiles the PTX in it for another), and functions are looked up
/// once.
fn function(device: &CudaDevice, name: &str) -> kernels::Result<CudaFunction> {
    type Loaded = (Vec<(usize, Arc<CudaModule>)>, HashMap<(usize, String), CudaFunction>);
    static LOADED: OnceLock<Mutex<Loaded>> = OnceLock::new();
    let stream = device.cuda_stream();
    let context = stream.context();
    let key = context.cu_ctx() as usize;
    let mut loaded = LOADED.get_or_init(Default::default).lock().unwrap_or_else(|e| e.into_inner());
    let (modules, functions) = &mut *loaded;
    if let Some(f) = functions.get(&(key, name.to_string())) {
        return Ok(f.clone());
    }
    let module = match modules.iter().find(|(k, _)| *k == key) {
        Some((_, module)) => module.clone(),
        None => {
            if kernels::FATBIN.is_empty() {
                return Err(
                    "this build's CUDA kernels are empty (compiled by scripts/nvcc-typecheck, for checks only)".into(),
                );
            }
            let module = context
                .load_module(Ptx::from_binary(kernels::FATBIN.to_vec()))
                .map_err(|e| format!("loading the pretrain kernels: {e}"))?;
            modules.push((key, module.clone()));
            module
        }
    };
    let f = module.load_function(name).map_err(|e| format!("kernel {name}: {e}"))?;
    functions.insert((key, name.to_string()), f.clone());
    Ok(f)
}

/// Launches on a candle CUDA device's stream.
struct Gpu<'a>(&'a CudaDevice);

impl Launcher for Gpu<'_> {
    unsafe fn launch(&self, kernel: &str, launch: Launch, args: &[Arg]) -> kernels::Result<()> {
        let func = function(self.0, kernel)?;
        let stream = self.0.cuda_stream();
        let mut builder = stream.launch_builder(&func);
        for arg in args {
            match arg {
                Arg::Ptr(p) => builder.arg(p),
                Arg::I32(v) => builder.arg(v),
                Arg::I64(v) => builder.arg(v),
                Arg::F32(v) => builder.arg(v),
            };
        }
        let config = LaunchConfig { grid_dim: launch.grid, block_dim: (launch.threads, 1, 1), shared_mem_bytes: 0 };
        // SAFETY: the caller guarantees the arguments match the kernel and point at live memory.
        unsafe { builder.launch(config) }.map(|_| ()).map_err(|e| format!("launching {kernel}: {e}"))
    }
}

fn error(e: String) -> candle_core::Error {
    candle_core::Error::Cuda(e.into())
}

/// One launch's inputs: the stream, and the guards of the pointers taken so far.
struct Inputs<'a> {
    stream: &'a CudaStream,
    guards: Vec<SyncOnDrop<'a>>,
}

impl<'a> Inputs<'a> {
    fn new(stream: &'a CudaStream) -> Self {
        Self { stream, guards: Vec::new() }
    }

    /// A contiguous input as a kernel buffer.
    fn input(&mut self, s: &'a CudaStorage, l: &Layout, what: &str) -> Result<Buf<'a>> {
        let (start, end) = l
            .contiguous_offsets()
            .ok_or_else(|| candle_core::Error::Msg(format!("{what}: inputs must be contiguous")))?;
        fn ptr<'a, T>(x: &'a CudaSlice<T>, stream: &'a CudaStream) -> (u64, SyncOnDrop<'a>) {
            x.device_ptr(stream)
        }
        let ((p, guard), ty) = match &s.slice {
            CudaStorageSlice::F32(x) => (ptr(x, self.stream), Ty::F32),
            CudaStorageSlice::BF16(x) => (ptr(x, self.stream), Ty::Bf16),
            CudaStorageSlice::U32(x) => (ptr(x, self.stream), Ty::U32),
            _ => candle_core::bail!("{what}: {:?} inputs are not supported", s.dtype()),
        };
        self.guards.push(guard);
        // SAFETY: elements start..end of a live device slice of `ty`, borrowed for 'a; candle
        // allocates slices aligned for their type.
        let buf = unsafe { Buf::new(p, end, ty) };
        buf.skip(start).map_err(error)
    }

    /// All of `inputs` as kernel buffers.
    fn all<const N: usize>(&mut self, inputs: [In<'a>; N], what: &str) -> Result<[Buf<'a>; N]> {
        let mut bufs = Vec::with_capacity(N);
        for (s, l) in inputs {
            bufs.push(self.input(s, l, what)?);
        }
        Ok(bufs.try_into().unwrap_or_else(|_| unreachable!("one buffer per input")))
    }
}

/// A fresh, uninitialised slice of `n` elements of `ty`, which a kernel then writes in full.
fn alloc(device: &CudaDevice, ty: Ty, n: usize) -> Result<CudaStorageSlice> {
    let n = n.max(1);
    // SAFETY: the memory is written by the kernel before anything reads it.
    Ok(unsafe {
        match ty {
            Ty::F32 => CudaStorageSlice::F32(device.alloc::<f32>(n)?),
            Ty::Bf16 => CudaStorageSlice::BF16(device.alloc::<half::bf16>(n)?),
            Ty::U32 => CudaStorageSlice::U32(device.alloc::<u32>(n)?),
        }
    })
}

/// A slice to write as a kernel buffer (its guard kept in `guards`).
fn output<'a>(
    slice: &'a mut CudaStorageSlice,
    stream: &'a CudaStream,
    guards: &mut Vec<SyncOnDrop<'a>>,
) -> Result<Buf<'a>> {
    fn ptr<'a, T>(x: &'a mut CudaSlice<T>, stream: &'a CudaStream) -> (u64, SyncOnDrop<'a>, usize) {
        let len = x.len();
        let (p, g) = x.device_ptr_mut(stream);
        (p, g, len)
    }
    let ((p, guard, len), ty) = match slice {
        CudaStorageSlice::F32(x) => (ptr(x, stream), Ty::F32),
        CudaStorageSlice::BF16(x) => (ptr(x, stream), Ty::Bf16),
        CudaStorageSlice::U32(x) => (ptr(x, stream), Ty::U32),
        _ => candle_core::bail!("only f32, bf16 and u32 tensors are written by the kernels"),
    };
    guards.push(guard);
    // SAFETY: a live device slice of `len` elements of `ty`, mutably borrowed for 'a.
    Ok(unsafe { Buf::new(p, len, ty) })
}

type In<'a> = (&'a CudaStorage, &'a Layout);

/// Runs `launch` with the inputs as buffers and fresh outputs of the given types and lengths, and
/// returns the outputs.
fn run<const N: usize, const M: usize>(
    what: &str,
    inputs: [In<'_>; N],
    outputs: [(Ty, usize); M],
    launch: impl FnOnce(&Gpu<'_>, [Buf<'_>; N], [Buf<'_>; M]) -> kernels::Result<()>,
) -> Result<[CudaStorage; M]> {
    let device = inputs[0].0.device.clone();
    let stream = device.cuda_stream();
    let mut slices: Vec<CudaStorageSlice> =
        outputs.iter().map(|&(ty, n)| alloc(&device, ty, n)).collect::<Result<_>>()?;
    {
        let mut taken = Inputs::new(&stream); // its guards live until the launch is queued
        let ins = taken.all(inputs, what)?;
        let mut guards = Vec::with_capacity(M);
        let outs: Vec<Buf<'_>> = slices.iter_mut().map(|s| output(s, &stream, &mut guards)).collect::<Result<_>>()?;
        let outs: [Buf<'_>; M] = outs.try_into().unwrap_or_else(|_| unreachable!("one buffer per output"));
        launch(&Gpu(&device), ins, outs).map_err(error)?;
    }
    let stored: Vec<CudaStorage> =
        slices.into_iter().map(|slice| CudaStorage { slice, device: device.clone() }).collect();
    Ok(stored.try_into().unwrap_or_else(|_| unreachable!("one storage per output")))
}

fn ty_of(s: &CudaStorage, what: &str) -> Result<Ty> {
    match &s.slice {
        CudaStorageSlice::F32(_) => Ok(Ty::F32),
        CudaStorageSlice::BF16(_) => Ok(Ty::Bf16),
        _ => candle_core::bail!("{what}: {:?} activations are not supported (f32 or bf16)", s.dtype()),
    }
}

/// RMSNorm of `x` (`rows x d`) by `w` (`d`).
pub(super) fn rms_norm(x: In<'_>, w: In<'_>, d: usize, eps: f32) -> Result<CudaStorage> {
    let ty = ty_of(x.0, "rms-norm")?;
    let rows = x.1.shape().elem_count() / d.max(1);
    let [y] =
        run("rms-norm", [x, w], [(ty, rows * d)], |gpu, [x, w], [y]| kernels::rms_norm(gpu, x, w, y, rows, d, eps))?;
    Ok(y)
}

/// RMSNorm's gradients, `[dx (flattened), dw]` in one buffer.
pub(super) fn rms_norm_grad(x: In<'_>, w: In<'_>, g: In<'_>, d: usize, eps: f32) -> Result<CudaStorage> {
    let ty = ty_of(x.0, "rms-norm-grad")?;
    let rows = x.1.shape().elem_count() / d.max(1);
    let scratch = kernels::rms_norm_grad_scratch(rows, d);
    let [out, _] =
        run("rms-norm-grad", [x, w, g], [(ty, rows * d + d), (Ty::F32, scratch)], |gpu, [x, w, g], [out, s]| {
            kernels::rms_norm_grad(gpu, (x, w, g), (out, out.skip(rows * d)?), s, rows, d, eps)
        })?;
    Ok(out)
}

/// `silu(a) u`.
pub(super) fn swiglu(a: In<'_>, u: In<'_>) -> Result<CudaStorage> {
    let ty = ty_of(a.0, "swiglu")?;
    let n = a.1.shape().elem_count();
    let [y] = run("swiglu", [a, u], [(ty, n)], |gpu, [a, u], [y]| kernels::swiglu(gpu, a, u, y, n))?;
    Ok(y)
}

/// SwiGLU's gradients, `[d gate, d up]` in one buffer.
pub(super) fn swiglu_grad(a: In<'_>, u: In<'_>, g: In<'_>) -> Result<CudaStorage> {
    let ty = ty_of(a.0, "swiglu-grad")?;
    let n = a.1.shape().elem_count();
    let [out] = run("swiglu-grad", [a, u, g], [(ty, 2 * n)], |gpu, [a, u, g], [out]| {
        kernels::swiglu_grad(gpu, (a, u, g), (out, out.skip(n)?), n)
    })?;
    Ok(out)
}

/// Rows into heads (`split`) or back, rotated by the RoPE `tables` when given.
pub(super) fn heads(
    src: In<'_>,
    tables: Option<(In<'_>, In<'_>)>,
    shape: kernels::Heads,
    split: bool,
) -> Result<CudaStorage> {
    let what = if split { "split-heads" } else { "merge-heads" };
    let ty = ty_of(src.0, what)?;
    let n = src.1.shape().elem_count();
    let [y] = match tables {
        Some((cos, sin)) => run(what, [src, cos, sin], [(ty, n)], |gpu, [x, c, s], [y]| {
            kernels::heads(gpu, shape, x, y, Some((c, s)), split)
        })?,
        None => run(what, [src], [(ty, n)], |gpu, [x], [y]| kernels::heads(gpu, shape, x, y, None, split))?,
    };
    Ok(y)
}

/// Per-row cross-entropy losses (f32) of `logits` `[rows, vocab]` against u32 `targets`.
pub(super) fn cross_entropy(logits: In<'_>, targets: In<'_>, rows: usize, vocab: usize) -> Result<CudaStorage> {
    ty_of(logits.0, "cross-entropy")?;
    let [loss] = run("cross-entropy", [logits, targets], [(Ty::F32, rows)], |gpu, [x, t], [loss]| {
        kernels::cross_entropy(gpu, x, t, loss, rows, vocab)
    })?;
    Ok(loss)
}

/// The logits' gradient from the rows' losses and gradients (`loss_grad`, f32 `[2, rows]`).
pub(super) fn cross_entropy_grad(
    logits: In<'_>,
    targets: In<'_>,
    loss_grad: In<'_>,
    rows: usize,
    vocab: usize,
) -> Result<CudaStorage> {
    let ty = ty_of(logits.0, "cross-entropy-grad")?;
    let [dx] =
        run("cross-entropy-grad", [logits, targets, loss_grad], [(ty, rows * vocab)], |gpu, [x, t, lg], [dx]| {
            kernels::cross_entropy_grad(gpu, (x, t, lg), dx, rows, vocab)
        })?;
    Ok(dx)
}

/// Causal attention's output, and its rows' log-sum-exp (f32) for the backward.
pub(super) fn attention(
    q: In<'_>,
    k: In<'_>,
    v: In<'_>,
    shape: &kernels::Attention,
) -> Result<(CudaStorage, CudaStorage)> {
    let ty = ty_of(q.0, "attention")?;
    let n = q.1.shape().elem_count();
    let [o, lse] = run("attention", [q, k, v], [(ty, n), (Ty::F32, shape.rows())], |gpu, [q, k, v], [o, lse]| {
        kernels::attention(gpu, shape, (q, k, v), o, lse)
    })?;
    Ok((o, lse))
}

/// Causal attention's gradients, `[dq, dk, dv]` (flattened) in one buffer.
pub(super) fn attention_grad(
    (q, k, v): (In<'_>, In<'_>, In<'_>),
    (o, g, lse): (In<'_>, In<'_>, In<'_>),
    shape: &kernels::Attention,
) -> Result<CudaStorage> {
    let ty = ty_of(q.0, "attention-grad")?;
    let (nq, nk) = (q.1.shape().elem_count(), k.1.shape().elem_count());
    let outputs = [(ty, nq + 2 * nk), (Ty::F32, shape.rows())];
    let [out, _] = run("attention-grad", [q, k, v, o, g, lse], outputs, |gpu, [q, k, v, o, g, lse], [out, delta]| {
        let (dk, dv) = (out.skip(nq)?, out.skip(nq + nk)?);
        kernels::attention_grad(gpu, shape, (q, k, v, o, g), (lse, delta), (out, dk, dv))
    })?;
    Ok(out)
}

/// Runs `launch` with `target` written in place and the inputs as buffers.
fn run_in_place<const N: usize>(
    what: &str,
    (target, layout): (&mut CudaStorage, &Layout),
    inputs: [In<'_>; N],
    launch: impl FnOnce(&Gpu<'_>, Buf<'_>, [Buf<'_>; N]) -> kernels::Result<()>,
) -> Result<()> {
    let device = target.device.clone();
    let stream = device.cuda_stream();
    let start = layout
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg(format!("{what}: the tensor written must be contiguous")))?
        .0;
    let mut guards = Vec::with_capacity(1);
    let written = output(&mut target.slice, &stream, &mut guards)?.skip(start).map_err(error)?;
    let mut taken = Inputs::new(&stream); // its guards live until the launch is queued
    let ins = taken.all(inputs, what)?;
    launch(&Gpu(&device), written, ins).map_err(error)
}

/// AdamW's moments `mv` (fp32 `[2, n]`) updated in place from the gradient `g`.
pub(crate) fn adamw_moments(mv: (&mut CudaStorage, &Layout), g: In<'_>, h: &kernels::AdamW) -> Result<()> {
    let n = g.1.shape().elem_count();
    run_in_place("adamw-moments", mv, [g], |gpu, mv, [g]| kernels::adamw_moments(gpu, h, mv, g, n))
}

/// The fp32 weights `p` updated in place from AdamW's moments `mv`.
pub(crate) fn adamw_apply(p: (&mut CudaStorage, &Layout), mv: In<'_>, h: &kernels::AdamW) -> Result<()> {
    let n = p.1.shape().elem_count();
    run_in_place("adamw-apply", p, [mv], |gpu, p, [mv]| kernels::adamw_apply(gpu, h, p, mv, n))
}

/// Partial sums of `x^2` (f32, [`kernels::sum_squares_parts`] of them).
pub(crate) fn sum_squares(x: In<'_>) -> Result<CudaStorage> {
    ty_of(x.0, "sum-squares")?;
    let n = x.1.shape().elem_count();
    let [sums] = run("sum-squares", [x], [(Ty::F32, kernels::sum_squares_parts(n))], |gpu, [x], [sums]| {
        kernels::sum_squares(gpu, x, sums, n)
    })?;
    Ok(sums)
}

/// Sets up a CUDA device for training, like PyTorch's caching allocator does:
/// - the default memory pool keeps freed memory (release threshold: unlimited) instead of handing it
///   back to the driver at every synchronisation, so that a step after the first allocates nothing
///   new from the driver;
/// - no per-tensor event tracking: every kernel, copy and collective runs on the device's one stream
///   (NCCL's communicator included), which orders them already; the events cost two driver calls
///   per allocation.
pub(crate) fn prepare(device: &CudaDevice) -> Result<()> {
    use candle_core::cuda_backend::cudarc::driver::sys;
    let stream = device.cuda_stream();
    let mut pool: sys::CUmemoryPool = std::ptr::null_mut();
    // SAFETY: `pool` is a valid out-pointer; the device handle comes from a live context.
    unsafe { sys::cuDeviceGetDefaultMemPool(&mut pool, stream.context().cu_device()) }
        .result()
        .map_err(|e| error(format!("default memory pool: {e}")))?;
    let mut threshold = u64::MAX;
    // SAFETY: the release threshold attribute takes a pointer to a u64, which lives for the call.
    unsafe {
        sys::cuMemPoolSetAttribute(
            pool,
            sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
            (&mut threshold as *mut u64).cast(),
        )
    }
    .result()
    .map_err(|e| error(format!("memory pool release threshold: {e}")))?;
    // SAFETY: one stream per device (see above), so no use needs an event to order it.
    unsafe { device.disable_event_tracking() };
    Ok(())
}
