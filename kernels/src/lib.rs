//! CUDA kernels for a Llama training step, and what launches them.
//!
//! The kernels (`cuda/*.cu`) are causal grouped-query attention (forward, and a backward that
//! recomputes probabilities from the forward's log-sum-exp), RMSNorm, SwiGLU, the split of
//! projections into RoPE-rotated heads and the merge back, and a cross-entropy that reads the logits
//! in their storage type. Each takes fp32 or bf16 storage and computes in fp32.
//!
//! Each operation here checks its buffers against its shape, picks the kernel and its launch shape,
//! and hands the arguments to a [`Launcher`]: the worker's on a CUDA device (feature `cuda` of this
//! crate builds the [`FATBIN`] it loads), or [`emu::Emu`] (feature `emu`), which runs the same kernel
//! sources compiled for the host, so that every launch path is tested on machines without a GPU.
#![allow(unsafe_code)]

#[cfg(feature = "emu")]
pub mod emu;

/// The kernels compiled by nvcc, one module: machine code for `CUDA_COMPUTE_CAP` (default 90) and PTX
/// for newer GPUs (`cuModuleLoadData` takes it as it is).
#[cfg(feature = "cuda")]
pub const FATBIN: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/pretrain.fatbin"));

/// What a buffer's elements are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ty {
    /// 32-bit float.
    F32,
    /// bfloat16.
    Bf16,
    /// 32-bit unsigned integer (token ids).
    U32,
}

impl Ty {
    fn suffix(self) -> &'static str {
        match self {
            Ty::F32 => "f32",
            Ty::Bf16 => "bf16",
            Ty::U32 => "u32",
        }
    }

    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            Ty::F32 | Ty::U32 => 4,
            Ty::Bf16 => 2,
        }
    }
}

/// A buffer in the launcher's memory (device memory, or host memory for [`emu::Emu`]).
#[derive(Debug, Clone, Copy)]
pub struct Buf<'a> {
    ptr: u64,
    len: usize,
    ty: Ty,
    memory: std::marker::PhantomData<&'a ()>,
}

impl Buf<'_> {
    /// `len` elements of `ty` at address `ptr`.
    ///
    /// # Safety
    /// The memory must be valid for reads and writes of `len` elements of `ty`, aligned for `ty`, for
    /// the lifetime of the buffer and as long as kernels launched with it may run (on a CUDA stream:
    /// until the memory is freed in stream order), and not be accessed by anything else meanwhile,
    /// except by other reads where the kernel only reads it.
    pub unsafe fn new(ptr: u64, len: usize, ty: Ty) -> Self {
        Self { ptr, len, ty, memory: std::marker::PhantomData }
    }

    /// The elements from `offset` on.
    pub fn skip(self, offset: usize) -> Result<Self> {
        if offset > self.len {
            return Err(format!("offset {offset} is past a buffer of {}", self.len));
        }
        Ok(Self { ptr: self.ptr + (offset * self.ty.size()) as u64, len: self.len - offset, ..self })
    }

    /// Elements.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether there are no elements.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn check(&self, what: &str, ty: Ty, len: usize) -> Result<Arg> {
        if self.ty != ty {
            return Err(format!("{what}: {:?} buffer where {ty:?} is needed", self.ty));
        }
        if self.len < len {
            return Err(format!("{what}: {} elements where {len} are needed", self.len));
        }
        Ok(Arg::Ptr(self.ptr))
    }
}

/// One kernel argument, as the kernel's parameter list has it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Arg {
    /// A pointer (device address).
    Ptr(u64),
    /// `int`.
    I32(i32),
    /// `long long`.
    I64(i64),
    /// `float`.
    F32(f32),
}

/// A launch shape: blocks in x, y, z, and threads per block (one-dimensional).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Launch {
    /// Blocks.
    pub grid: (u32, u32, u32),
    /// Threads per block.
    pub threads: u32,
}

/// Runs kernels by name.
pub trait Launcher {
    /// Launches `kernel` (an entry point of cuda/pretrain.cu) over `launch` with `args`, in order
    /// (on a stream: it may still be running when this returns).
    ///
    /// # Safety
    /// `args` must match the kernel's parameters in number and type, and every pointer in them be
    /// valid for what the kernel reads and writes through it.
    unsafe fn launch(&self, kernel: &str, launch: Launch, args: &[Arg]) -> Result<()>;
}

/// Errors name the operation and what did not fit.
pub type Result<T> = std::result::Result<T, String>;

fn int(what: &str, n: usize) -> Result<Arg> {
    i32::try_from(n).map(Arg::I32).map_err(|_| format!("{what}: {n} does not fit a 32-bit int"))
}

fn activations(ty: Ty, what: &str) -> Result<()> {
    match ty {
        Ty::F32 | Ty::Bf16 => Ok(()),
        Ty::U32 => Err(format!("{what}: activations are f32 or bf16, not u32")),
    }
}

fn blocks(n: usize, per: usize, what: &str) -> Result<u32> {
    u32::try_from(n.div_ceil(per).max(1)).map_err(|_| format!("{what}: {n} elements need too many blocks"))
}

/// Blocks of 256 threads for a grid-stride loop over `n` elements (at most 65536 blocks).
fn stride_launch(n: usize) -> Launch {
    Launch { grid: ((n.div_ceil(256).clamp(1, 65_536)) as u32, 1, 1), threads: 256 }
}

/// `y = x w / sqrt(mean(x^2) + eps)` over `rows` rows of `d`.
pub fn rms_norm(l: &impl Launcher, x: Buf<'_>, w: Buf<'_>, y: Buf<'_>, rows: usize, d: usize, eps: f32) -> Result<()> {
    let what = "rms-norm";
    let ty = x.ty;
    activations(ty, what)?;
    let args = [
        x.check(what, ty, rows * d)?,
        w.check(what, ty, d)?,
        y.check(what, ty, rows * d)?,
        int(what, rows)?,
        int(what, d)?,
        Arg::F32(eps),
    ];
    let launch = Launch { grid: (blocks(rows, 8, what)?, 1, 1), threads: 256 };
    // SAFETY: the arguments follow rms_norm_fwd's parameters, and every buffer holds what the shape
    // needs (checked above).
    unsafe { l.launch(&format!("rms_norm_fwd_{}", ty.suffix()), launch, &args) }
}

/// Rows per block of RMSNorm's backward (`RMS_BWD_ROWS` in cuda/elementwise.cu).
const RMS_BWD_ROWS: usize = 32;

/// f32 elements of scratch [`rms_norm_grad`] needs.
pub fn rms_norm_grad_scratch(rows: usize, d: usize) -> usize {
    rows.div_ceil(RMS_BWD_ROWS).max(1) * d
}

/// RMSNorm's gradients: `dx` (`rows x d`) and `dw` (`d`, summed over rows in a fixed order), from `x`,
/// `w` and the output's gradient `g`; `scratch` holds [`rms_norm_grad_scratch`] f32s.
#[allow(clippy::too_many_arguments)]
pub fn rms_norm_grad(
    l: &impl Launcher,
    (x, w, g): (Buf<'_>, Buf<'_>, Buf<'_>),
    (dx, dw): (Buf<'_>, Buf<'_>),
    scratch: Buf<'_>,
    rows: usize,
    d: usize,
    eps: f32,
) -> Result<()> {
    let what = "rms-norm-grad";
    let ty = x.ty;
    activations(ty, what)?;
    let parts = rows.div_ceil(RMS_BWD_ROWS).max(1);
    let part = scratch.check(what, Ty::F32, rms_norm_grad_scratch(rows, d))?;
    let args = [
        x.check(what, ty, rows * d)?,
        w.check(what, ty, d)?,
        g.check(what, ty, rows * d)?,
        dx.check(what, ty, rows * d)?,
        part,
        int(what, rows)?,
        int(what, d)?,
        Arg::F32(eps),
    ];
    let launch = Launch { grid: (blocks(rows, RMS_BWD_ROWS, what)?, 1, 1), threads: 256 };
    // SAFETY: as in `rms_norm`, for rms_norm_bwd's parameters.
    unsafe { l.launch(&format!("rms_norm_bwd_{}", ty.suffix()), launch, &args)? };
    let args = [part, dw.check(what, ty, d)?, int(what, parts)?, int(what, d)?];
    let launch = Launch { grid: (blocks(d, 256, what)?, 1, 1), threads: 256 };
    // SAFETY: as in `rms_norm`, for rms_norm_dw's parameters.
    unsafe { l.launch(&format!("rms_norm_dw_{}", ty.suffix()), launch, &args) }
}

/// `y = silu(a) u` over `n` elements.
pub fn swiglu(l: &impl Launcher, a: Buf<'_>, u: Buf<'_>, y: Buf<'_>, n: usize) -> Result<()> {
    let what = "swiglu";
    let ty = a.ty;
    activations(ty, what)?;
    let args = [a.check(what, ty, n)?, u.check(what, ty, n)?, y.check(what, ty, n)?, Arg::I64(n as i64)];
    // SAFETY: as in `rms_norm`, for swiglu_fwd's parameters.
    unsafe { l.launch(&format!("swiglu_fwd_{}", ty.suffix()), stride_launch(n), &args) }
}

/// SwiGLU's gradients `da` and `du` from `a`, `u` and the output's gradient `g`.
pub fn swiglu_grad(
    l: &impl Launcher,
    (a, u, g): (Buf<'_>, Buf<'_>, Buf<'_>),
    (da, du): (Buf<'_>, Buf<'_>),
    n: usize,
) -> Result<()> {
    let what = "swiglu-grad";
    let ty = a.ty;
    activations(ty, what)?;
    let args = [
        a.check(what, ty, n)?,
        u.check(what, ty, n)?,
        g.check(what, ty, n)?,
        da.check(what, ty, n)?,
        du.check(what, ty, n)?,
        Arg::I64(n as i64),
    ];
    // SAFETY: as in `rms_norm`, for swiglu_bwd's parameters.
    unsafe { l.launch(&format!("swiglu_bwd_{}", ty.suffix()), stride_launch(n), &args) }
}

/// The shape of a split into heads: rows `[batch * seq, heads * head_dim]`, heads `[batch, heads,
/// seq, head_dim]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Heads {
    /// Sequences.
    pub batch: usize,
    /// Positions per sequence.
    pub seq: usize,
    /// Heads.
    pub heads: usize,
    /// Values per head (even).
    pub head_dim: usize,
}

/// Rows into heads (`split`) or heads into rows, rotated by RoPE when `tables` (`cos`, `sin`: f32,
/// `seq x head_dim`, one row per position) are given: by the positions' angles when splitting, by
/// their negatives when merging (the split's gradient).
pub fn heads(
    l: &impl Launcher,
    shape: Heads,
    src: Buf<'_>,
    dst: Buf<'_>,
    tables: Option<(Buf<'_>, Buf<'_>)>,
    split: bool,
) -> Result<()> {
    let what = if split { "split-heads" } else { "merge-heads" };
    let ty = src.ty;
    activations(ty, what)?;
    let Heads { batch, seq, heads, head_dim } = shape;
    if !head_dim.is_multiple_of(2) {
        return Err(format!("{what}: head size {head_dim} is odd"));
    }
    let n = batch * seq * heads * head_dim;
    let (cos, sin) = match tables {
        Some((cos, sin)) => (cos.check(what, Ty::F32, seq * head_dim)?, sin.check(what, Ty::F32, seq * head_dim)?),
        None => (Arg::Ptr(0), Arg::Ptr(0)),
    };
    let args = [
        src.check(what, ty, n)?,
        dst.check(what, ty, n)?,
        cos,
        sin,
        int(what, batch)?,
        int(what, seq)?,
        int(what, heads)?,
        int(what, head_dim)?,
        Arg::I32(split as i32),
    ];
    // SAFETY: as in `rms_norm`, for heads' parameters (null tables mean no rotation).
    unsafe { l.launch(&format!("heads_{}", ty.suffix()), stride_launch(n / 2), &args) }
}

/// Threads per block of the cross-entropy kernels (one block per row).
const CE_THREADS: u32 = 1024;

/// Per row of `logits` (`rows x vocab`): `loss = logsumexp(row) - row[target]` into `loss` (f32).
/// Targets are u32 and must be inside the vocabulary (one that is not gives NaN).
pub fn cross_entropy(
    l: &impl Launcher,
    logits: Buf<'_>,
    targets: Buf<'_>,
    loss: Buf<'_>,
    rows: usize,
    vocab: usize,
) -> Result<()> {
    let what = "cross-entropy";
    let ty = logits.ty;
    activations(ty, what)?;
    let args = [
        logits.check(what, ty, rows * vocab)?,
        targets.check(what, Ty::U32, rows)?,
        loss.check(what, Ty::F32, rows)?,
        int(what, rows)?,
        int(what, vocab)?,
    ];
    let launch = Launch { grid: (blocks(rows, 1, what)?, 1, 1), threads: CE_THREADS };
    // SAFETY: as in `rms_norm`, for cross_entropy_fwd's parameters.
    unsafe { l.launch(&format!("cross_entropy_fwd_{}", ty.suffix()), launch, &args) }
}

/// `dlogits = g (softmax(row) - onehot(target))` per row, from the forward's `loss` and the rows'
/// gradients `g`, both in `loss_grad` (f32 `[2, rows]`: losses, then gradients).
pub fn cross_entropy_grad(
    l: &impl Launcher,
    (logits, targets, loss_grad): (Buf<'_>, Buf<'_>, Buf<'_>),
    dlogits: Buf<'_>,
    rows: usize,
    vocab: usize,
) -> Result<()> {
    let what = "cross-entropy-grad";
    let ty = logits.ty;
    activations(ty, what)?;
    let args = [
        logits.check(what, ty, rows * vocab)?,
        targets.check(what, Ty::U32, rows)?,
        loss_grad.check(what, Ty::F32, 2 * rows)?,
        dlogits.check(what, ty, rows * vocab)?,
        int(what, rows)?,
        int(what, vocab)?,
    ];
    let launch = Launch { grid: (blocks(rows, 1, what)?, 1, 1), threads: CE_THREADS };
    // SAFETY: as in `rms_norm`, for cross_entropy_bwd's parameters.
    unsafe { l.launch(&format!("cross_entropy_bwd_{}", ty.suffix()), launch, &args) }
}

/// The shape of causal attention: q and o `[batch, heads, seq, head_dim]`, k and v `[batch,
/// kv_heads, seq, head_dim]`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Attention {
    /// Sequences.
    pub batch: usize,
    /// Query heads (a multiple of `kv_heads`).
    pub heads: usize,
    /// Key/value heads.
    pub kv_heads: usize,
    /// Positions.
    pub seq: usize,
    /// Values per head: one of [`ATTENTION_HEAD_DIMS`].
    pub head_dim: usize,
    /// Multiplier of the scores before the softmax.
    pub scale: f32,
    /// Use the CUDA-core kernels even where the tensor-core ones apply (bf16 with head size
    /// [`TENSOR_CORE_HEAD_DIM`]); for tests that compare the two.
    pub cuda_cores: bool,
}

/// The head size of the tensor-core attention kernels (bf16).
pub const TENSOR_CORE_HEAD_DIM: usize = 64;

/// Rows (queries or keys) per block of the tensor-core kernels (`ROWS` in cuda/attention_mma.cu).
const MMA_ROWS: usize = 64;

/// The head sizes the attention kernels are built for.
pub const ATTENTION_HEAD_DIMS: [usize; 4] = [16, 32, 64, 128];

impl Attention {
    fn check(&self, what: &str) -> Result<(usize, usize)> {
        let Self { batch, heads, kv_heads, seq, head_dim, .. } = *self;
        if kv_heads == 0 || !heads.is_multiple_of(kv_heads) {
            return Err(format!("{what}: {heads} query heads for {kv_heads} key/value heads"));
        }
        if !ATTENTION_HEAD_DIMS.contains(&head_dim) {
            return Err(format!("{what}: head size {head_dim} is not one of {ATTENTION_HEAD_DIMS:?}"));
        }
        Ok((batch * heads * seq * head_dim, batch * kv_heads * seq * head_dim))
    }

    /// f32 elements of the forward's log-sum-exp (and of the backward's row sums): one per query row.
    pub fn rows(&self) -> usize {
        self.batch * self.heads * self.seq
    }

    fn tensor_cores(&self, ty: Ty) -> bool {
        ty == Ty::Bf16 && self.head_dim == TENSOR_CORE_HEAD_DIM && !self.cuda_cores
    }

    fn dims(&self, what: &str) -> Result<[Arg; 4]> {
        Ok([int(what, self.heads)?, int(what, self.kv_heads)?, int(what, self.seq)?, Arg::F32(self.scale)])
    }

    fn grid(&self, rows_per_block: usize, heads: usize, what: &str) -> Result<(u32, u32, u32)> {
        let per = |n: usize| u32::try_from(n).map_err(|_| format!("{what}: {n} blocks in one grid dimension"));
        Ok((blocks(self.seq, rows_per_block, what)?, per(heads)?, per(self.batch)?))
    }
}

/// Query rows per block of the forward (`ATT_FWD_ROWS` in cuda/attention.cu).
const ATT_FWD_ROWS: usize = 64;

/// `o = softmax(scale q k^T + causal mask) v`, and each query row's log-sum-exp into `lse` (f32,
/// [`Attention::rows`]), which [`attention_grad`] needs.
pub fn attention(
    l: &impl Launcher,
    shape: &Attention,
    (q, k, v): (Buf<'_>, Buf<'_>, Buf<'_>),
    o: Buf<'_>,
    lse: Buf<'_>,
) -> Result<()> {
    let what = "attention";
    let ty = q.ty;
    activations(ty, what)?;
    let (nq, nk) = shape.check(what)?;
    if nq == 0 {
        return Ok(()); // nothing to compute (a CUDA grid may not be empty)
    }
    let [heads, kv_heads, seq, scale] = shape.dims(what)?;
    let args = [
        q.check(what, ty, nq)?,
        k.check(what, ty, nk)?,
        v.check(what, ty, nk)?,
        o.check(what, ty, nq)?,
        lse.check(what, Ty::F32, shape.rows())?,
        heads,
        kv_heads,
        seq,
        scale,
    ];
    let (kernel, launch) = if shape.tensor_cores(ty) {
        let launch = Launch { grid: shape.grid(MMA_ROWS, shape.heads, what)?, threads: 128 };
        ("attention_fwd_mma_bf16_64".to_string(), launch)
    } else {
        let launch = Launch { grid: shape.grid(ATT_FWD_ROWS, shape.heads, what)?, threads: ATT_FWD_ROWS as u32 };
        (format!("attention_fwd_{}_{}", ty.suffix(), shape.head_dim), launch)
    };
    // SAFETY: as in `rms_norm`, for attention_fwd's (and attention_fwd_mma's) parameters.
    unsafe { l.launch(&kernel, launch, &args) }
}

/// The gradients `dq`, `dk`, `dv` of [`attention`] from its inputs, its output `o`, its `lse` and the
/// output's gradient `g`; `delta` is f32 scratch of [`Attention::rows`].
pub fn attention_grad(
    l: &impl Launcher,
    shape: &Attention,
    (q, k, v, o, g): (Buf<'_>, Buf<'_>, Buf<'_>, Buf<'_>, Buf<'_>),
    (lse, delta): (Buf<'_>, Buf<'_>),
    (dq, dk, dv): (Buf<'_>, Buf<'_>, Buf<'_>),
) -> Result<()> {
    let what = "attention-grad";
    let ty = q.ty;
    activations(ty, what)?;
    let (nq, nk) = shape.check(what)?;
    if nq == 0 {
        return Ok(());
    }
    let hd = shape.head_dim;
    let [heads, kv_heads, seq, scale] = shape.dims(what)?;
    let rows = shape.rows();
    let (q, k, v, g) = (q.check(what, ty, nq)?, k.check(what, ty, nk)?, v.check(what, ty, nk)?, g.check(what, ty, nq)?);
    let (lse, delta) = (lse.check(what, Ty::F32, rows)?, delta.check(what, Ty::F32, rows)?);
    let suffix = ty.suffix();

    let args = [o.check(what, ty, nq)?, g, delta, int(what, rows)?, int(what, hd)?];
    let launch = Launch { grid: (blocks(rows, 8, what)?, 1, 1), threads: 256 };
    // SAFETY: as in `rms_norm`, for attention_delta's parameters.
    unsafe { l.launch(&format!("attention_delta_{suffix}"), launch, &args)? };

    // Key rows per block of the dK/dV pass and query rows per block of the dQ pass, and threads per
    // block (`AttBwdKV<HD>::KEYS` and `AttBwdQ<HD>::QUERIES` in cuda/attention.cu, one thread per
    // row; 4 warps of 16 rows each in cuda/attention_mma.cu).
    let (per_block, threads, names) = if shape.tensor_cores(ty) {
        (MMA_ROWS, 128, ["attention_bwd_kv_mma_bf16_64".to_string(), "attention_bwd_q_mma_bf16_64".to_string()])
    } else {
        let names = [format!("attention_bwd_kv_{suffix}_{hd}"), format!("attention_bwd_q_{suffix}_{hd}")];
        (4096 / hd, (4096 / hd) as u32, names)
    };
    let args = [q, k, v, g, lse, delta, dk.check(what, ty, nk)?, dv.check(what, ty, nk)?, heads, kv_heads, seq, scale];
    let launch = Launch { grid: shape.grid(per_block, shape.kv_heads, what)?, threads };
    // SAFETY: as in `rms_norm`, for attention_bwd_kv's (and attention_bwd_kv_mma's) parameters.
    unsafe { l.launch(&names[0], launch, &args)? };

    let args = [q, k, v, g, lse, delta, dq.check(what, ty, nq)?, heads, kv_heads, seq, scale];
    let launch = Launch { grid: shape.grid(per_block, shape.heads, what)?, threads };
    // SAFETY: as in `rms_norm`, for attention_bwd_q's (and attention_bwd_q_mma's) parameters.
    unsafe { l.launch(&names[1], launch, &args) }
}

/// One AdamW update's settings (decoupled weight decay; `c1`, `c2` the bias corrections
/// `1 - beta^t`; `decay` is `lr * weight_decay`), for [`adamw_moments`] then [`adamw_apply`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamW {
    /// Learning rate.
    pub lr: f32,
    /// First-moment decay.
    pub beta1: f32,
    /// Second-moment decay.
    pub beta2: f32,
    /// `1 - beta1^t`.
    pub c1: f32,
    /// `1 - beta2^t`.
    pub c2: f32,
    /// Added to the second moment's square root.
    pub eps: f32,
    /// `lr * weight_decay`.
    pub decay: f32,
}

/// AdamW's first pass, in place: the moments `mv` (fp32 `[2, n]`: first, then second) from the
/// gradient `g`.
pub fn adamw_moments(l: &impl Launcher, h: &AdamW, mv: Buf<'_>, g: Buf<'_>, n: usize) -> Result<()> {
    let what = "adamw-moments";
    let args = [
        mv.check(what, Ty::F32, 2 * n)?,
        g.check(what, Ty::F32, n)?,
        Arg::I64(n as i64),
        Arg::F32(h.beta1),
        Arg::F32(h.beta2),
    ];
    // SAFETY: as in `rms_norm`, for adamw_moments_f32's parameters.
    unsafe { l.launch("adamw_moments_f32", stride_launch(n), &args) }
}

/// AdamW's second pass, in place: the `n` fp32 weights `p` from the updated moments `mv`.
pub fn adamw_apply(l: &impl Launcher, h: &AdamW, p: Buf<'_>, mv: Buf<'_>, n: usize) -> Result<()> {
    let what = "adamw-apply";
    let args = [
        p.check(what, Ty::F32, n)?,
        mv.check(what, Ty::F32, 2 * n)?,
        Arg::I64(n as i64),
        Arg::F32(h.lr),
        Arg::F32(h.c1),
        Arg::F32(h.c2),
        Arg::F32(h.eps),
        Arg::F32(h.decay),
    ];
    // SAFETY: as in `rms_norm`, for adamw_apply_f32's parameters.
    unsafe { l.launch("adamw_apply_f32", stride_launch(n), &args) }
}

/// Blocks of [`sum_squares`]: its partial sums.
pub fn sum_squares_parts(n: usize) -> usize {
    n.div_ceil(256).clamp(1, 1024)
}

/// Partial sums of `x^2` over `n` elements into `sums` (f32, [`sum_squares_parts`]), whose total is
/// the squared L2 norm (added up by the caller, in a fixed order).
pub fn sum_squares(l: &impl Launcher, x: Buf<'_>, sums: Buf<'_>, n: usize) -> Result<()> {
    let what = "sum-squares";
    let ty = x.ty;
    activations(ty, what)?;
    let parts = sum_squares_parts(n);
    let args = [x.check(what, ty, n)?, sums.check(what, Ty::F32, parts)?, Arg::I64(n as i64)];
    let launch = Launch { grid: (parts as u32, 1, 1), threads: 256 };
    // SAFETY: as in `rms_norm`, for sum_squares' parameters.
    unsafe { l.launch(&format!("sum_squares_{}", ty.suffix()), launch, &args) }
}
