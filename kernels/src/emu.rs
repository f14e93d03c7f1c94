//! The kernels run on the host (feature `emu`): cuda/emu.hpp gives them the CUDA execution model on
//! OS threads, one block at a time, and [`Emu`] launches them synchronously through the same
//! [`Launcher`] interface a GPU does. [`Host`] is memory for them.

use std::ffi::{CString, c_char, c_int, c_uint, c_void};

use super::{Arg, Buf, Launch, Launcher, Result, Ty};

unsafe extern "C" {
    fn pretrain_emu_launch(
        name: *const c_char,
        gx: c_uint,
        gy: c_uint,
        gz: c_uint,
        threads: c_uint,
        args: *mut *mut c_void,
    ) -> c_int;
}

/// Runs kernels on the host, each to completion before `launch` returns.
#[derive(Debug, Clone, Copy, Default)]
pub struct Emu;

impl Launcher for Emu {
    unsafe fn launch(&self, kernel: &str, launch: Launch, args: &[Arg]) -> Result<()> {
        if launch.threads == 0 || launch.threads > 1024 {
            return Err(format!("{kernel}: {} threads per block", launch.threads));
        }
        // Every argument in an 8-byte slot, as the kernel's parameter type reads it.
        let mut slots: Vec<u64> = args
            .iter()
            .map(|a| match *a {
                Arg::Ptr(p) => p,
                Arg::I32(v) => v as u32 as u64,
                Arg::I64(v) => v as u64,
                Arg::F32(v) => v.to_bits() as u64,
            })
            .collect();
        let mut pointers: Vec<*mut c_void> = slots.iter_mut().map(|s| (s as *mut u64).cast()).collect();
        let name = CString::new(kernel).map_err(|_| format!("kernel name {kernel:?}"))?;
        let (gx, gy, gz) = launch.grid;
        // SAFETY: the caller guarantees the arguments match the kernel's parameters and their
        // pointers are valid; the slots outlive the call, which runs the kernel to completion.
        let rc = unsafe { pretrain_emu_launch(name.as_ptr(), gx, gy, gz, launch.threads, pointers.as_mut_ptr()) };
        if rc != 0 {
            return Err(format!("no kernel named {kernel}"));
        }
        Ok(())
    }
}

/// Host memory for emulated kernels: `len` elements of `ty`, 64-byte aligned (as device allocations
/// are at least), zeroed.
#[derive(Debug)]
pub struct Host {
    bytes: *mut u8,
    layout: std::alloc::Layout,
    len: usize,
    ty: Ty,
}

// SAFETY: `Host` owns its allocation like a `Box<[u8]>` does.
unsafe impl Send for Host {}

impl Host {
    /// `len` zeros.
    pub fn zeros(len: usize, ty: Ty) -> Self {
        let layout = std::alloc::Layout::from_size_align((len * ty.size()).max(1), 64).expect("a valid layout");
        // SAFETY: the layout has a non-zero size.
        let bytes = unsafe { std::alloc::alloc_zeroed(layout) };
        if bytes.is_null() {
            std::alloc::handle_alloc_error(layout);
        }
        Self { bytes, layout, len, ty }
    }

    /// `values` stored as `ty` (f32, or bf16 rounded to nearest even as CUDA converts).
    pub fn from_f32(values: &[f32], ty: Ty) -> Self {
        let host = Self::zeros(values.len(), ty);
        for (i, &v) in values.iter().enumerate() {
            // SAFETY: `i < len`, inside the allocation, and nothing else holds it.
            unsafe {
                match ty {
                    Ty::F32 => host.bytes.cast::<f32>().add(i).write(v),
                    Ty::Bf16 => host.bytes.cast::<u16>().add(i).write(to_bf16(v)),
                    Ty::U32 => host.bytes.cast::<u32>().add(i).write(v as u32),
                }
            }
        }
        host
    }

    /// Token ids.
    pub fn from_u32(values: &[u32]) -> Self {
        let host = Self::zeros(values.len(), Ty::U32);
        for (i, &v) in values.iter().enumerate() {
            // SAFETY: as in `from_f32`.
            unsafe { host.bytes.cast::<u32>().add(i).write(v) };
        }
        host
    }

    /// The elements as f32.
    pub fn to_f32(&self) -> Vec<f32> {
        (0..self.len)
            // SAFETY: `i < len`, inside the allocation; no kernel runs (`Emu` launches are synchronous).
            .map(|i| unsafe {
                match self.ty {
                    Ty::F32 => self.bytes.cast::<f32>().add(i).read(),
                    Ty::Bf16 => f32::from_bits((self.bytes.cast::<u16>().add(i).read() as u32) << 16),
                    Ty::U32 => self.bytes.cast::<u32>().add(i).read() as f32,
                }
            })
            .collect()
    }

    /// The memory as a kernel buffer.
    pub fn buf(&self) -> Buf<'_> {
        // SAFETY: the allocation holds `len` elements of `ty`, 64-byte aligned, for the borrow; kernels
        // run by `Emu` finish before `launch` returns, and `Host` hands out no references into it.
        unsafe { Buf::new(self.bytes as u64, self.len, self.ty) }
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        // SAFETY: `bytes` came from `alloc_zeroed` with `layout`.
        unsafe { std::alloc::dealloc(self.bytes, self.layout) };
    }
}

/// f32 to bf16 bits, rounded to nearest even; NaN stays NaN.
pub fn to_bf16(v: f32) -> u16 {
    let u = v.to_bits();
    if (u & 0x7fff_ffff) > 0x7f80_0000 {
        return ((u >> 16) | 0x40) as u16;
    }
    ((u + 0x7fff + ((u >> 16) & 1)) >> 16) as u16
}
