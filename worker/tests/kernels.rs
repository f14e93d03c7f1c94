//! The CUDA kernels (pretrain-kernels), run on the host by its emulation, against the CPU reference
//! path of the same operations (`pretrain_worker::model::fused`, itself tested against composed
//! candle operations): forward values and gradients, in fp32 (relative error under 1e-4) and bf16
//! storage (under 1e-2, against the reference run on the same bf16-rounded inputs), at odd shapes,
//! and NaN inputs giving NaN outputs.

use candle_core::{DType, Device, Tensor, Var};
use pretrain_kernels::emu::{Emu, Host};
use pretrain_kernels::{self as kernels, Attention, Heads, Ty};
use pretrain_worker::model::{Kernels, Rope, Scaling};

#[allow(dead_code)] // these tests use only its random draws
mod common;

/// Deterministic values in [-scale, scale).
fn values(n: usize, seed: u64, scale: f32) -> Vec<f32> {
    common::draws(seed, n).into_iter().map(|s| ((s >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale).collect()
}

/// The values as the kernel sees them in `ty` storage.
fn rounded(v: &[f32], ty: Ty) -> Vec<f32> {
    Host::from_f32(v, ty).to_f32()
}

fn tolerance(ty: Ty) -> f32 {
    if ty == Ty::Bf16 { 1e-2 } else { 1e-4 }
}

/// `|got - want| / |want|` (Euclidean norms) under the dtype's tolerance, and NaN-free.
fn assert_close(what: &str, ty: Ty, got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    assert!(got.iter().all(|v| v.is_finite()), "{what}: non-finite output");
    let diff: f64 = got.iter().zip(want).map(|(a, b)| ((a - b) as f64).powi(2)).sum::<f64>().sqrt();
    let norm: f64 = want.iter().map(|b| (*b as f64).powi(2)).sum::<f64>().sqrt();
    let rel = diff / norm.max(1e-30);
    assert!(rel < tolerance(ty) as f64, "{what} ({ty:?}): relative error {rel:e}");
}

fn tensor(v: &[f32], shape: &[usize]) -> Tensor {
    Tensor::from_vec(v.to_vec(), shape, &Device::Cpu).unwrap()
}

fn flat(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_dtype(DType::F32).unwrap().to_vec1().unwrap()
}

/// The reference's output, and the gradients of `sum(out * upstream)` for `inputs`.
fn reference(
    inputs: &[(&[f32], &[usize])],
    upstream: &[f32],
    f: impl Fn(&[Tensor]) -> Tensor,
) -> (Vec<f32>, Vec<Vec<f32>>) {
    let vars: Vec<Var> = inputs.iter().map(|(v, s)| Var::from_tensor(&tensor(v, s)).unwrap()).collect();
    let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let out = f(&ts);
    let g = tensor(upstream, out.dims());
    let grads = (&out * &g).unwrap().sum_all().unwrap().backward().unwrap();
    let grads = vars.iter().map(|v| grads.get(v.as_tensor()).map(flat).unwrap_or_default()).collect();
    (flat(&out), grads)
}

const TYPES: [Ty; 2] = [Ty::F32, Ty::Bf16];

#[test]
fn rms_norm_and_its_gradients_match_the_cpu_path() {
    for (rows, d) in [(37, 70), (65, 256), (1, 1)] {
        for ty in TYPES {
            let x = rounded(&values(rows * d, 1, 2.0), ty);
            let w = rounded(&values(d, 2, 1.0), ty);
            let up = rounded(&values(rows * d, 3, 1.0), ty);
            let (want, grads) = reference(&[(&x, &[rows, d]), (&w, &[d])], &up, |t| {
                Kernels::Fused.rms_norm(&t[0], &t[1], 1e-5).unwrap()
            });
            let (hx, hw, hg) = (Host::from_f32(&x, ty), Host::from_f32(&w, ty), Host::from_f32(&up, ty));
            let y = Host::zeros(rows * d, ty);
            kernels::rms_norm(&Emu, hx.buf(), hw.buf(), y.buf(), rows, d, 1e-5).unwrap();
            assert_close("rms-norm", ty, &y.to_f32(), &want);

            let (dx, dw) = (Host::zeros(rows * d, ty), Host::zeros(d, ty));
            let scratch = Host::zeros(kernels::rms_norm_grad_scratch(rows, d), Ty::F32);
            kernels::rms_norm_grad(
                &Emu,
                (hx.buf(), hw.buf(), hg.buf()),
                (dx.buf(), dw.buf()),
                scratch.buf(),
                rows,
                d,
                1e-5,
            )
            .unwrap();
            assert_close("rms-norm dx", ty, &dx.to_f32(), &grads[0]);
            assert_close("rms-norm dw", ty, &dw.to_f32(), &grads[1]);
        }
    }
}

#[test]
fn swiglu_and_its_gradients_match_the_cpu_path() {
    for n in [1, 3001] {
        for ty in TYPES {
            let a = rounded(&values(n, 4, 6.0), ty);
            let u = rounded(&values(n, 5, 2.0), ty);
            let up = rounded(&values(n, 6, 1.0), ty);
            let (want, grads) =
                reference(&[(&a, &[n]), (&u, &[n])], &up, |t| Kernels::Fused.swiglu(&t[0], &t[1]).unwrap());
            let (ha, hu, hg) = (Host::from_f32(&a, ty), Host::from_f32(&u, ty), Host::from_f32(&up, ty));
            let y = Host::zeros(n, ty);
            kernels::swiglu(&Emu, ha.buf(), hu.buf(), y.buf(), n).unwrap();
            assert_close("swiglu", ty, &y.to_f32(), &want);
            let (da, du) = (Host::zeros(n, ty), Host::zeros(n, ty));
            kernels::swiglu_grad(&Emu, (ha.buf(), hu.buf(), hg.buf()), (da.buf(), du.buf()), n).unwrap();
            assert_close("swiglu da", ty, &da.to_f32(), &grads[0]);
            assert_close("swiglu du", ty, &du.to_f32(), &grads[1]);
        }
    }
}

#[test]
fn heads_split_with_rope_and_merge_back_match_the_cpu_path() {
    let (batch, seq, nheads, hd, offset) = (2, 7, 3, 8, 5);
    let rope = Rope::new(hd, 16, 10_000.0, Scaling::Yarn { factor: 4.0, original_len: 4 }, &Device::Cpu).unwrap();
    let (cos, sin) = rope.window(offset, seq).unwrap();
    let (hcos, hsin) = (Host::from_f32(&flat(&cos), Ty::F32), Host::from_f32(&flat(&sin), Ty::F32));
    let shape = Heads { batch, seq, heads: nheads, head_dim: hd };
    let n = batch * seq * nheads * hd;
    for ty in TYPES {
        for rotate in [false, true] {
            let x = rounded(&values(n, 7, 3.0), ty);
            let up = rounded(&values(n, 8, 1.0), ty);
            let (want, grads) = reference(&[(&x, &[batch * seq, nheads * hd])], &up, |t| {
                Kernels::Fused.split_heads(&t[0], (batch, seq, nheads), rotate.then_some(&rope), offset).unwrap()
            });
            let tables = rotate.then(|| (hcos.buf(), hsin.buf()));
            let (hx, hg) = (Host::from_f32(&x, ty), Host::from_f32(&up, ty));
            let (y, dx) = (Host::zeros(n, ty), Host::zeros(n, ty));
            kernels::heads(&Emu, shape, hx.buf(), y.buf(), tables, true).unwrap();
            assert_close("split-heads", ty, &y.to_f32(), &want);
            kernels::heads(&Emu, shape, hg.buf(), dx.buf(), tables, false).unwrap();
            assert_close("split-heads gradient", ty, &dx.to_f32(), &grads[0]);
        }
        // merge_heads is the split's gradient without rotation.
        let x = rounded(&values(n, 9, 3.0), ty);
        let want = flat(&Kernels::Fused.merge_heads(&tensor(&x, &[batch, nheads, seq, hd])).unwrap());
        let (hx, y) = (Host::from_f32(&x, ty), Host::zeros(n, ty));
        kernels::heads(&Emu, shape, hx.buf(), y.buf(), None, false).unwrap();
        assert_close("merge-heads", ty, &y.to_f32(), &want);
    }
}

#[test]
fn cross_entropy_and_its_gradient_match_the_cpu_path_without_fp32_logits() {
    for (rows, vocab) in [(5, 1000), (3, 33)] {
        for ty in TYPES {
            let logits = rounded(&values(rows * vocab, 10, 8.0), ty);
            let targets: Vec<u32> = (0..rows as u32).map(|r| (r * 7919 + 3) % vocab as u32).collect();
            let t = Tensor::new(targets.as_slice(), &Device::Cpu).unwrap();
            // The mean loss times 2.5, so that each row's gradient is 2.5 / rows.
            let (want, grads) =
                reference(&[(&logits, &[rows, vocab])], &[2.5], |x| Kernels::Fused.cross_entropy(&x[0], &t).unwrap());
            let (hl, ht) = (Host::from_f32(&logits, ty), Host::from_u32(&targets));
            let loss = Host::zeros(rows, Ty::F32);
            kernels::cross_entropy(&Emu, hl.buf(), ht.buf(), loss.buf(), rows, vocab).unwrap();
            let losses = loss.to_f32();
            let mean = losses.iter().sum::<f32>() / rows as f32;
            assert_close("cross-entropy", ty, &[mean], &want);

            let mut loss_grad = losses.clone();
            loss_grad.extend(std::iter::repeat_n(2.5 / rows as f32, rows));
            let (hlg, dl) = (Host::from_f32(&loss_grad, Ty::F32), Host::zeros(rows * vocab, ty));
            kernels::cross_entropy_grad(&Emu, (hl.buf(), ht.buf(), hlg.buf()), dl.buf(), rows, vocab).unwrap();
            assert_close("cross-entropy gradient", ty, &dl.to_f32(), &grads[0]);
        }
    }
}

#[test]
fn attention_and_its_gradients_match_the_cpu_path() {
    // (batch, heads, kv_heads, seq, head_dim): grouped and not, a short last tile, every head size.
    // bf16 at head size 64 runs on the tensor cores (wmma), unless `cuda_cores`.
    let cases = [
        (1, 4, 2, 70, 16, false),
        (2, 3, 1, 33, 32, false),
        (1, 2, 2, 65, 64, false),
        (1, 2, 2, 65, 64, true),
        (1, 6, 2, 150, 64, false),
        (1, 2, 1, 19, 128, false),
    ];
    for (b, h, kv, t, hd, cuda_cores) in cases {
        let scale = 1.3 / (hd as f32).sqrt();
        for ty in TYPES {
            if cuda_cores && ty == Ty::F32 {
                continue;
            }
            let (nq, nk) = (b * h * t * hd, b * kv * t * hd);
            let q = rounded(&values(nq, 11, 1.5), ty);
            let k = rounded(&values(nk, 12, 1.5), ty);
            let v = rounded(&values(nk, 13, 1.0), ty);
            let up = rounded(&values(nq, 14, 1.0), ty);
            let (want, grads) =
                reference(&[(&q, &[b, h, t, hd]), (&k, &[b, kv, t, hd]), (&v, &[b, kv, t, hd])], &up, |x| {
                    Kernels::Fused.causal_attention(&x[0], &x[1], &x[2], scale as f64).unwrap()
                });
            let shape = Attention { batch: b, heads: h, kv_heads: kv, seq: t, head_dim: hd, scale, cuda_cores };
            let (hq, hk, hv, hg) =
                (Host::from_f32(&q, ty), Host::from_f32(&k, ty), Host::from_f32(&v, ty), Host::from_f32(&up, ty));
            let (o, lse, delta) =
                (Host::zeros(nq, ty), Host::zeros(shape.rows(), Ty::F32), Host::zeros(shape.rows(), Ty::F32));
            kernels::attention(&Emu, &shape, (hq.buf(), hk.buf(), hv.buf()), o.buf(), lse.buf()).unwrap();
            let what = format!("attention {b}x{h}/{kv}x{t}x{hd}{}", if cuda_cores { " (CUDA cores)" } else { "" });
            assert_close(&what, ty, &o.to_f32(), &want);

            let (dq, dk, dv) = (Host::zeros(nq, ty), Host::zeros(nk, ty), Host::zeros(nk, ty));
            kernels::attention_grad(
                &Emu,
                &shape,
                (hq.buf(), hk.buf(), hv.buf(), o.buf(), hg.buf()),
                (lse.buf(), delta.buf()),
                (dq.buf(), dk.buf(), dv.buf()),
            )
            .unwrap();
            assert_close(&format!("{what} dq"), ty, &dq.to_f32(), &grads[0]);
            assert_close(&format!("{what} dk"), ty, &dk.to_f32(), &grads[1]);
            assert_close(&format!("{what} dv"), ty, &dv.to_f32(), &grads[2]);
        }
    }
}

#[test]
fn nan_inputs_never_pass_as_numbers() {
    let ty = Ty::Bf16;
    let (rows, d) = (3, 40);
    let mut x = values(rows * d, 15, 1.0);
    x[d + 7] = f32::NAN; // row 1
    let (hx, hw, y) = (Host::from_f32(&x, ty), Host::from_f32(&vec![1.0; d], ty), Host::zeros(rows * d, ty));
    kernels::rms_norm(&Emu, hx.buf(), hw.buf(), y.buf(), rows, d, 1e-5).unwrap();
    let y = y.to_f32();
    assert!(y[d..2 * d].iter().all(|v| v.is_nan()), "the NaN row is NaN throughout");
    assert!(y[..d].iter().chain(&y[2 * d..]).all(|v| v.is_finite()), "the other rows are untouched");

    let mut logits = values(2 * 50, 16, 4.0);
    logits[50 + 9] = f32::NAN;
    let (hl, ht, loss) = (Host::from_f32(&logits, ty), Host::from_u32(&[3, 4]), Host::zeros(2, Ty::F32));
    kernels::cross_entropy(&Emu, hl.buf(), ht.buf(), loss.buf(), 2, 50).unwrap();
    let loss = loss.to_f32();
    assert!(loss[0].is_finite() && loss[1].is_nan(), "{loss:?}");

    // Both attention kernels: CUDA cores (head size 16) and tensor cores (64).
    for hd in [16, 64] {
        let t = 20;
        let mut q = values(t * hd, 17, 1.0);
        q[5 * hd] = f32::NAN; // query row 5
        let kv = values(t * hd, 18, 1.0);
        let shape = Attention { batch: 1, heads: 1, kv_heads: 1, seq: t, head_dim: hd, scale: 0.25, cuda_cores: false };
        let (hq, hk) = (Host::from_f32(&q, ty), Host::from_f32(&kv, ty));
        let (o, lse) = (Host::zeros(t * hd, ty), Host::zeros(t, Ty::F32));
        kernels::attention(&Emu, &shape, (hq.buf(), hk.buf(), hk.buf()), o.buf(), lse.buf()).unwrap();
        let o = o.to_f32();
        assert!(o[5 * hd..6 * hd].iter().all(|v| v.is_nan()), "head size {hd}: the NaN row");
        assert!(o[..5 * hd].iter().chain(&o[6 * hd..]).all(|v| v.is_finite()), "head size {hd}: the other rows");
    }
}

#[test]
fn launches_check_their_buffers_and_shapes() {
    let (a, small) = (Host::zeros(10, Ty::F32), Host::zeros(9, Ty::F32));
    let err = kernels::swiglu(&Emu, a.buf(), a.buf(), small.buf(), 10).unwrap_err();
    assert!(err.contains("swiglu") && err.contains("9 elements"), "{err}");
    let bf = Host::zeros(10, Ty::Bf16);
    let err = kernels::swiglu(&Emu, a.buf(), bf.buf(), a.buf(), 10).unwrap_err();
    assert!(err.contains("Bf16 buffer where F32"), "{err}");
    let shape = Attention { batch: 1, heads: 1, kv_heads: 1, seq: 2, head_dim: 5, scale: 1.0, cuda_cores: false };
    let err = kernels::attention(&Emu, &shape, (a.buf(), a.buf(), a.buf()), a.buf(), a.buf()).unwrap_err();
    assert!(err.contains("head size 5"), "{err}");
}

#[test]
fn adamw_matches_the_cpu_update() {
    let n = 1537;
    let (p, g) = (values(n, 19, 0.5), values(n, 20, 0.01));
    let mut mv = values(n, 21, 0.001);
    mv.extend(values(n, 22, 1e-4).iter().map(|v| v.abs()));
    let h = kernels::AdamW {
        lr: 3e-4,
        beta1: 0.9,
        beta2: 0.95,
        c1: 1.0 - 0.9f32.powi(3),
        c2: 1.0 - 0.95f32.powi(3),
        eps: 1e-8,
        decay: 3e-5,
    };
    // The CPU kernel's update (worker/src/train/optim.rs, adamw_chunk), element by element.
    let mut want = vec![0f32; 3 * n];
    for i in 0..n {
        let m = h.beta1 * mv[i] + (1.0 - h.beta1) * g[i];
        let v = h.beta2 * mv[n + i] + (1.0 - h.beta2) * g[i] * g[i];
        want[i] = p[i] * (1.0 - h.decay) - h.lr * ((m / h.c1) / ((v / h.c2).sqrt() + h.eps));
        want[n + i] = m;
        want[2 * n + i] = v;
    }
    let (hp, hg, hmv) = (Host::from_f32(&p, Ty::F32), Host::from_f32(&g, Ty::F32), Host::from_f32(&mv, Ty::F32));
    kernels::adamw_moments(&Emu, &h, hmv.buf(), hg.buf(), n).unwrap();
    kernels::adamw_apply(&Emu, &h, hp.buf(), hmv.buf(), n).unwrap();
    let moments = hmv.to_f32();
    assert_close("adamw weights", Ty::F32, &hp.to_f32(), &want[..n]);
    assert_close("adamw first moments", Ty::F32, &moments[..n], &want[n..2 * n]);
    assert_close("adamw second moments", Ty::F32, &moments[n..], &want[2 * n..]);
}

#[test]
fn sum_of_squares_matches_the_norm() {
    for n in [1, 300, 5_001] {
        for ty in TYPES {
            let x = rounded(&values(n, 23, 2.0), ty);
            let want: f64 = x.iter().map(|v| (*v as f64).powi(2)).sum();
            let (hx, sums) = (Host::from_f32(&x, ty), Host::zeros(kernels::sum_squares_parts(n), Ty::F32));
            kernels::sum_squares(&Emu, hx.buf(), sums.buf(), n).unwrap();
            let got: f64 = sums.to_f32().iter().map(|&v| v as f64).sum();
            assert!(((got - want) / want).abs() < 1e-5, "{n} {ty:?}: {got} vs {want}");
        }
    }
}

/// The GPU check binary itself, run on the CPU (fused CPU kernels against the composed operations),
/// so that what the GPU machine runs is exercised in CI.
#[test]
fn the_gpu_check_binary_passes_on_the_cpu() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_check-kernels"))
        .args(["--device", "cpu"])
        .output()
        .expect("check-kernels runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(!stdout.contains("FAIL") && stdout.contains("training step F32 gradients"), "{stdout}");
}

#[test]
fn tensor_core_attention_reads_unaligned_inputs_as_aligned_ones() {
    // Inputs 2 bytes past a 16-byte boundary take the one-value-at-a-time loads instead of the
    // 16-byte ones; the results must not differ.
    let (t, hd) = (40, 64);
    let (q, kv) = (values(2 * t * hd, 24, 1.0), values(t * hd, 25, 1.0));
    let shape = Attention { batch: 1, heads: 2, kv_heads: 1, seq: t, head_dim: hd, scale: 0.125, cuda_cores: false };
    let run = |offset: usize| {
        let padded = |v: &[f32]| Host::from_f32(&[vec![0.0; offset], v.to_vec()].concat(), Ty::Bf16);
        let (hq, hkv) = (padded(&q), padded(&kv));
        let (o, lse) = (Host::zeros(2 * t * hd, Ty::Bf16), Host::zeros(2 * t, Ty::F32));
        let (q, kv) = (hq.buf().skip(offset).unwrap(), hkv.buf().skip(offset).unwrap());
        kernels::attention(&Emu, &shape, (q, kv, kv), o.buf(), lse.buf()).unwrap();
        o.to_f32()
    };
    let (aligned, unaligned) = (run(0), run(1));
    assert!(aligned.iter().all(|v| v.is_finite()));
    assert_eq!(aligned, unaligned);
}
