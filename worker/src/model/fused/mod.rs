//! Fused operations for a training step, each with its backward (the CPU kernels here, the CUDA ones
//! in pretrain-kernels): causal grouped-query attention
//! (which never forms the `[batch, heads, seq, seq]` scores), the cross-entropy over the vocabulary
//! (`[tokens, vocab]`), RMSNorm, the SwiGLU activation, and the split of projections into
//! attention heads with the RoPE rotation on the way (and the merge back). Composed from candle
//! operations they allocate and stream several full-size temporaries each; fused they read and write
//! each element once or twice.
//!
//! On CUDA devices (feature `cuda`) the same operations run pretrain-kernels' CUDA kernels, in fp32 or
//! bf16 storage (`cuda.rs`). Elsewhere, for other dtypes, or with [`Kernels::Composed`],
//! the operations fall back to composed, differentiable candle operations.

mod attention;
mod cross_entropy;
mod heads;
mod rms_norm;
mod swiglu;
#[cfg(test)]
mod tests;

#[cfg(feature = "cuda")]
use candle_core::CudaStorage;
#[cfg(feature = "cuda")]
use candle_core::Shape;
use candle_core::{CpuStorage, DType, Device, Layout, Result, Tensor};

/// Which implementation a model's operations run: the fused kernels (the default), or the composed,
/// differentiable candle operations they replace, so that a training step can be compared with (or
/// benchmarked against) the composed one. A value, not a switch: two models in one process can differ.
///
/// The operations are methods ([`Kernels::causal_attention`], [`Kernels::cross_entropy`],
/// [`Kernels::rms_norm`], [`Kernels::swiglu`], [`Kernels::split_heads`], [`Kernels::merge_heads`]).
/// `Fused` falls back to the composed operations for tensors the kernels do not serve.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Kernels {
    /// The fused kernels where they serve the tensors (see [`Kernels::serves`]).
    #[default]
    Fused,
    /// Always the composed candle operations.
    Composed,
}

impl Kernels {
    /// Whether the fused kernels serve tensors like `x`: with `Fused`, fp32 on the CPU; fp32 or bf16
    /// on a CUDA device (feature `cuda`).
    pub fn serves(self, x: &Tensor) -> bool {
        if self == Self::Composed {
            return false;
        }
        match x.device() {
            Device::Cpu => x.dtype() == DType::F32,
            Device::Cuda(_) => cfg!(feature = "cuda") && matches!(x.dtype(), DType::F32 | DType::BF16),
            _ => false,
        }
    }
}

/// A custom op's result on the CUDA device, shaped.
#[cfg(feature = "cuda")]
pub(crate) fn on_gpu(storage: Result<CudaStorage>, shape: impl Into<Shape>) -> Result<(CudaStorage, Shape)> {
    Ok((storage?, shape.into()))
}

pub(crate) fn contiguous_f32<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> Result<&'a [f32]> {
    let (start, end) =
        l.contiguous_offsets().ok_or_else(|| candle_core::Error::Msg(format!("{what}: input must be contiguous")))?;
    Ok(&s.as_slice::<f32>()?[start..end])
}

/// Defines a function whose body is compiled three times, for AVX-512, for AVX2 with FMA and for the
/// baseline, and runs the widest one this CPU has (detected at run time): the loops in it vectorise
/// 16 or 8 lanes wide instead of 4. The body is inlined into each copy (`inline(always)`), so the
/// choice is certain (a closure handed to a dispatcher is not always inlined, and then runs at the
/// baseline). Results do not depend on the copy: Rust never fuses a multiply and an add, and float
/// reductions keep their order.
macro_rules! simd_fn {
    ($(#[$meta:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        $(#[$meta])*
        #[allow(unsafe_code, clippy::too_many_arguments)]
        $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            #[allow(clippy::too_many_arguments)]
            fn body($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512vl,avx512bw,avx512dq,avx2,fma")]
                #[allow(clippy::too_many_arguments)]
                fn v4($($arg: $ty),*) $(-> $ret)? {
                    body($($arg),*)
                }
                #[target_feature(enable = "avx2,fma")]
                #[allow(clippy::too_many_arguments)]
                fn v3($($arg: $ty),*) $(-> $ret)? {
                    body($($arg),*)
                }
                if std::is_x86_feature_detected!("avx512f")
                    && std::is_x86_feature_detected!("avx512vl")
                    && std::is_x86_feature_detected!("avx512bw")
                    && std::is_x86_feature_detected!("avx512dq")
                {
                    // SAFETY: the CPU has every feature `v4` is compiled for (checked just above).
                    return unsafe { v4($($arg),*) };
                }
                if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
                    // SAFETY: the CPU has every feature `v3` is compiled for (checked just above).
                    return unsafe { v3($($arg),*) };
                }
            }
            body($($arg),*)
        }
    };
}
pub(crate) use simd_fn;

/// One input of a custom op: its storage and its layout.
pub(crate) type In<'a, S> = (&'a S, &'a Layout);

/// The `cpu_fwd` and `cuda_fwd` of a `CustomOp3` impl, whose six-argument signatures candle's trait
/// dictates, written once: they hand the three inputs as an array of [`In`] pairs to the op's own `cpu3` and
/// `cuda3` (the latter on builds with feature `cuda`).
macro_rules! forward3 {
    () => {
        fn cpu_fwd(
            &self,
            s1: &CpuStorage,
            l1: &Layout,
            s2: &CpuStorage,
            l2: &Layout,
            s3: &CpuStorage,
            l3: &Layout,
        ) -> Result<(CpuStorage, Shape)> {
            self.cpu3([(s1, l1), (s2, l2), (s3, l3)])
        }

        #[cfg(feature = "cuda")]
        fn cuda_fwd(
            &self,
            s1: &CudaStorage,
            l1: &Layout,
            s2: &CudaStorage,
            l2: &Layout,
            s3: &CudaStorage,
            l3: &Layout,
        ) -> Result<(CudaStorage, Shape)> {
            self.cuda3([(s1, l1), (s2, l2), (s3, l3)])
        }
    };
}
pub(crate) use forward3;

/// `e^x` in f32, within 2e-7 relative of the exact value and branch-free, so that loops over slices
/// vectorise (libm's `expf` is one call per element, 7% of a CPU training step): `x = n ln 2 + r`
/// with `|r| <= ln 2 / 2`, then `2^n` times Cephes' degree-7 polynomial for `e^r`. NaN stays NaN;
/// the result saturates to `+inf` above 88.7 and to about the smallest normal below -87.3.
#[inline(always)]
pub(crate) fn exp(x: f32) -> f32 {
    // ln 2 split so that `n * LN2_HI` is exact for the n that occur.
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // Adding and subtracting 1.5 x 2^23 rounds to the nearest integer without a call to `round`.
    const ROUND: f32 = 12_582_912.0;
    let x = x.clamp(-87.33, 88.72);
    let n = (x * std::f32::consts::LOG2_E + ROUND) - ROUND;
    let r = x - n * LN2_HI - n * LN2_LO;
    let p = (((((1.987_569_1e-4 * r + 1.398_199_9e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2) * r + 0.166_666_65)
        * r
        + 0.5)
        * (r * r)
        + r
        + 1.0;
    f32::from_bits(((n as i32 + 127) as u32) << 23) * p
}

/// Rows per parallel task of the row-wise kernels: fixed, so that reductions across rows (RMSNorm's
/// weight gradient) add up in the same order whatever the number of threads.
pub(crate) const ROWS_PER_TASK: usize = 32;
