//! The fused kernels on a device against the composed candle operations on the CPU in fp32: every
//! op's output and gradients on fresh random inputs at several shapes (odd ones included), NaN
//! propagation, and a whole training step (loss, every gradient, the weights after one AdamW update)
//! fused against unfused on the same device, and with activation recomputation against without.
//! The GPU test binary: run it on the GPU machine.
//!
//!     check-kernels [--device cpu|cuda] [--dtype f32|bf16|both] [--time]
//!
//! Relative errors (Euclidean norm of the difference over that of the reference) must stay under
//! 1e-4 in fp32 and 1e-2 in bf16 (the reference then runs on the bf16-rounded inputs). `--time`
//! also times each op's forward and backward, fused and composed, on a GPU at the training shapes
//! of the two benchmark models.
//! Prints one line per check and exits non-zero if any failed.

use std::time::Instant;

use candle_core::{DType, Device, Tensor, Var};
use pretrain_worker::model::{Kernels, Llama, LlamaConfig, Params, Rope, Scaling};
use pretrain_worker::train::optim::{AdamW, AdamWConfig, clip};

type Op = Box<dyn Fn(Kernels, &[Tensor]) -> candle_core::Result<Tensor>>;

struct Checker {
    device: Device,
    failures: usize,
    checks: usize,
}

fn tolerance(dtype: DType) -> f64 {
    if dtype == DType::BF16 { 1e-2 } else { 1e-4 }
}

fn rel_error(got: &Tensor, want: &Tensor) -> candle_core::Result<f64> {
    let (got, want) =
        (got.to_dtype(DType::F64)?.to_device(&Device::Cpu)?, want.to_dtype(DType::F64)?.to_device(&Device::Cpu)?);
    let diff = (&got - &want)?.sqr()?.sum_all()?.to_scalar::<f64>()?.sqrt();
    let norm = want.sqr()?.sum_all()?.to_scalar::<f64>()?.sqrt();
    Ok(if diff.is_nan() { f64::NAN } else { diff / norm.max(1e-30) })
}

/// The inputs as variables on `device`, the f32 ones in `dtype` (token ids stay as they are).
fn variables(inputs: &[Tensor], device: &Device, dtype: DType) -> candle_core::Result<Vec<Var>> {
    inputs
        .iter()
        .map(|t| {
            let t = if t.dtype() == DType::F32 { t.to_dtype(dtype)? } else { t.clone() };
            Var::from_tensor(&t.to_device(device)?)
        })
        .collect()
}

/// Output and gradients of `sum(op(inputs) * upstream)`, each input on `device` in `dtype`.
fn run(
    (op, kernels): (&Op, Kernels),
    inputs: &[Tensor],
    upstream: &Tensor,
    device: &Device,
    dtype: DType,
) -> candle_core::Result<Vec<Tensor>> {
    let vars = variables(inputs, device, dtype)?;
    let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let out = op(kernels, &ts)?;
    let up = upstream.to_dtype(out.dtype())?.to_device(device)?;
    let grads = (out.broadcast_mul(&up)?.to_dtype(DType::F32)?).sum_all()?.backward()?;
    let mut all = vec![out];
    for (v, t) in vars.iter().zip(inputs) {
        if t.dtype() == DType::F32 {
            all.push(grads.get(v.as_tensor()).cloned().unwrap_or(v.as_tensor().zeros_like()?));
        }
    }
    Ok(all)
}

impl Checker {
    fn report(&mut self, what: &str, rel: f64, limit: f64) {
        self.checks += 1;
        let ok = rel < limit;
        if !ok {
            self.failures += 1;
        }
        println!("{} {what}: relative error {rel:.2e} (limit {limit:.0e})", if ok { "ok  " } else { "FAIL" });
    }

    /// `op` fused on the device in `dtype` against composed on the CPU in fp32 (inputs rounded
    /// through `dtype` first). f32 inputs get gradients; other inputs (token ids) are passed as
    /// they are.
    fn op(&mut self, name: &str, op: &Op, inputs: &[Tensor], dtype: DType) -> candle_core::Result<()> {
        let rounded: Vec<Tensor> = inputs
            .iter()
            .map(|t| if t.dtype() == DType::F32 { t.to_dtype(dtype)?.to_dtype(DType::F32) } else { Ok(t.clone()) })
            .collect::<candle_core::Result<_>>()?;
        let probe = op(Kernels::Composed, &rounded)?;
        let upstream = Tensor::randn(0f32, 1.0, probe.shape(), &Device::Cpu)?.to_dtype(dtype)?.to_dtype(DType::F32)?;
        let want = run((op, Kernels::Composed), &rounded, &upstream, &Device::Cpu, DType::F32);
        let got = run((op, Kernels::Fused), &rounded, &upstream, &self.device, dtype);
        let (want, got) = (want?, got?);
        let limit = tolerance(dtype);
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            let part = if i == 0 { "output".to_string() } else { format!("gradient {i}") };
            self.report(&format!("{name} {dtype:?} {part}"), rel_error(g, w)?, limit);
        }
        Ok(())
    }

    fn nan(&mut self, name: &str, op: &Op, inputs: &[Tensor], dtype: DType) -> candle_core::Result<()> {
        let on: Vec<Tensor> =
            inputs.iter().map(|t| t.to_dtype(dtype)?.to_device(&self.device)).collect::<candle_core::Result<_>>()?;
        let out = op(Kernels::Fused, &on)?.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        self.checks += 1;
        let nans = out.iter().filter(|v| v.is_nan()).count();
        if nans == 0 {
            self.failures += 1;
        }
        println!("{} {name} {dtype:?}: a NaN input gives {nans} NaN outputs", if nans > 0 { "ok  " } else { "FAIL" });
        Ok(())
    }
}

fn randn(shape: &[usize], std: f64) -> Tensor {
    Tensor::randn(0f32, std as f32, shape, &Device::Cpu).expect("random values")
}

/// The ops, each with input shapes (every shape an odd case and a training-sized one).
fn ops() -> Vec<(String, Op, Vec<Tensor>)> {
    let mut all: Vec<(String, Op, Vec<Tensor>)> = Vec::new();
    for (rows, d) in [(37, 70), (512, 768)] {
        all.push((
            format!("rms-norm {rows}x{d}"),
            Box::new(|k, t| k.rms_norm(&t[0], &t[1], 1e-5)),
            vec![randn(&[rows, d], 2.0), (randn(&[d], 0.1) + 1.0).expect("weights")],
        ));
        all.push((
            format!("swiglu {rows}x{d}"),
            Box::new(|k, t| k.swiglu(&t[0], &t[1])),
            vec![randn(&[rows, d], 3.0), randn(&[rows, d], 1.0)],
        ));
    }
    for (b, t, h, hd, offset) in [(2, 7, 3, 16, 5), (2, 256, 12, 64, 0)] {
        for rotate in [false, true] {
            all.push((
                format!("split-heads {b}x{t}x{h}x{hd}{}", if rotate { " rope" } else { "" }),
                Box::new(move |k, x| {
                    let yarn = Scaling::Yarn { factor: 4.0, original_len: 16 };
                    let r = Rope::new(hd, offset + t, 10_000.0, yarn, x[0].device())?;
                    k.split_heads(&x[0], (b, t, h), rotate.then_some(&r), offset)
                }),
                vec![randn(&[b * t, h * hd], 1.0)],
            ));
        }
        all.push((
            format!("merge-heads {b}x{t}x{h}x{hd}"),
            Box::new(|k, x| k.merge_heads(&x[0])),
            vec![randn(&[b, h, t, hd], 1.0)],
        ));
    }
    for (rows, vocab) in [(5, 1000), (256, 32_000)] {
        let targets: Vec<u32> = (0..rows as u32).map(|r| (r * 7919 + 3) % vocab as u32).collect();
        let targets = Tensor::new(targets.as_slice(), &Device::Cpu).expect("targets");
        all.push((
            format!("cross-entropy {rows}x{vocab}"),
            Box::new(|k, t| k.cross_entropy(&t[0], &t[1])),
            vec![randn(&[rows, vocab], 3.0), targets],
        ));
    }
    for (b, h, kv, t, hd) in [(1, 4, 2, 70, 16), (2, 3, 1, 33, 32), (2, 12, 4, 130, 64), (1, 4, 1, 77, 128)] {
        let scale = 1.0 / (hd as f64).sqrt();
        all.push((
            format!("attention {b}x{h}/{kv}x{t}x{hd}"),
            Box::new(move |k, x| k.causal_attention(&x[0], &x[1], &x[2], scale)),
            vec![randn(&[b, h, t, hd], 1.0), randn(&[b, kv, t, hd], 1.0), randn(&[b, kv, t, hd], 1.0)],
        ));
    }
    all
}

/// One training step of a small Llama fused and unfused on the device: loss, every gradient, and
/// the weights after clipping and one AdamW update.
fn step(checker: &mut Checker, dtype: DType) -> candle_core::Result<()> {
    let config = LlamaConfig {
        vocab_size: 512,
        dim: 256,
        layers: 2,
        heads: 4,
        kv_heads: 2,
        ffn_dim: 688,
        rope_base: 10_000.0,
        norm_eps: 1e-5,
        tie_embeddings: false,
        rope_scaling: Scaling::None,
    };
    let (batch, seq) = (2, 96);
    let dev = checker.device.clone();
    let tokens: Vec<u32> = (0..batch * (seq + 1)).map(|i| ((i * 2_654_435_761) % 512) as u32).collect();
    let inputs = Tensor::from_vec(tokens[..batch * seq].to_vec(), (batch, seq), &dev)?;
    let targets = Tensor::from_vec(tokens[batch..].to_vec(), (batch, seq), &dev)?;
    let mut results = Vec::new();
    // Unfused, fused, and fused with every block recomputed in the backward.
    for (kernels, recompute) in [(Kernels::Composed, false), (Kernels::Fused, false), (Kernels::Fused, true)] {
        let mut model = Llama::new(config.clone(), Params::init(&config, 7, &dev)?, seq, &dev)?;
        model.set_kernels(kernels);
        model.set_recompute(recompute);
        let (loss, _) = model.loss(&inputs, &targets, dtype)?;
        let store = loss.backward()?;
        let mut grads: Vec<Tensor> =
            model.params.iter().map(|(_, _, v)| store.get(v.as_tensor()).cloned().expect("a gradient")).collect();
        let before = grads.clone();
        clip(&mut grads, 1.0)?;
        let mut opt = AdamW::new(AdamWConfig { beta1: 0.9, beta2: 0.95, eps: 1e-8, weight_decay: 0.1 }, &model.params)?;
        opt.step(&model.params, &grads, 1e-3)?;
        let weights: Vec<Tensor> = model.params.iter().map(|(_, _, v)| v.as_tensor().clone()).collect();
        let names: Vec<String> = model.params.iter().map(|(n, _, _)| n.to_string()).collect();
        results.push((loss, before, weights, names));
    }
    let limit = tolerance(dtype) * if dtype == DType::BF16 { 2.0 } else { 1.0 };
    let (unfused, fused_run) = (&results[0], &results[1]);
    checker.report(&format!("training step {dtype:?} loss"), rel_error(&fused_run.0, &unfused.0)?, limit);
    let mut worst = (0.0f64, String::new());
    for ((g, w), name) in fused_run.1.iter().zip(&unfused.1).zip(&unfused.3) {
        let e = rel_error(g, w)?;
        if e.is_nan() || e > worst.0 {
            worst = (e, name.clone());
        }
    }
    checker.report(&format!("training step {dtype:?} gradients (worst: {})", worst.1), worst.0, limit);
    let mut worst = 0.0f64;
    for (a, b) in fused_run.2.iter().zip(&unfused.2) {
        worst = worst.max(rel_error(a, b)?);
    }
    checker.report(&format!("training step {dtype:?} weights after AdamW"), worst, limit);
    // Recomputation runs the same kernels again: the same gradients, up to the order of float sums
    // a GPU may change between runs.
    let recomputed = &results[2];
    let mut worst = rel_error(&recomputed.0, &fused_run.0)?;
    for (a, b) in recomputed.1.iter().zip(&fused_run.1) {
        let e = rel_error(a, b)?;
        worst = if e.is_nan() { e } else { worst.max(e) };
    }
    checker.report(&format!("training step {dtype:?} recomputed blocks: loss and gradients"), worst, 1e-5);
    Ok(())
}

/// Milliseconds per forward + backward of `op` at training shapes, fused and composed, on the device.
fn time(device: &Device, dtype: DType) -> candle_core::Result<()> {
    let r = |shape: &[usize]| Tensor::randn(0f32, 1.0, shape, device); // drawn on the device: gigabytes
    let attention: fn(Kernels, &[Tensor]) -> candle_core::Result<Tensor> =
        |k, x| k.causal_attention(&x[0], &x[1], &x[2], 0.125);
    let targets: Vec<u32> = (0..32768u32).map(|i| i * 7919 % 32000).collect();
    let shapes: Vec<(&str, Op, Vec<Tensor>)> = vec![
        (
            "attention 32x12/4x1024x64",
            Box::new(attention),
            vec![r(&[32, 12, 1024, 64])?, r(&[32, 4, 1024, 64])?, r(&[32, 4, 1024, 64])?],
        ),
        (
            "attention 8x32/4x2048x64",
            Box::new(attention),
            vec![r(&[8, 32, 2048, 64])?, r(&[8, 4, 2048, 64])?, r(&[8, 4, 2048, 64])?],
        ),
        ("rms-norm 32768x768", Box::new(|k, t| k.rms_norm(&t[0], &t[1], 1e-5)), vec![r(&[32768, 768])?, r(&[768])?]),
        ("swiglu 32768x2048", Box::new(|k, t| k.swiglu(&t[0], &t[1])), vec![r(&[32768, 2048])?, r(&[32768, 2048])?]),
        (
            "cross-entropy 32768x32000",
            Box::new(|k, t| k.cross_entropy(&t[0], &t[1])),
            vec![r(&[32768, 32000])?, Tensor::from_vec(targets, 32768, device)?],
        ),
    ];
    for (name, op, inputs) in shapes {
        let mut line = format!("time {name} {dtype:?}:");
        for kernels in [Kernels::Fused, Kernels::Composed] {
            let vars = variables(&inputs, device, dtype)?;
            let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
            let mut total = 0.0;
            for rep in 0..6 {
                device.synchronize()?;
                let t0 = Instant::now();
                let out = op(kernels, &ts)?;
                let _ = out.to_dtype(DType::F32)?.sum_all()?.backward()?;
                device.synchronize()?;
                if rep > 0 {
                    total += t0.elapsed().as_secs_f64();
                }
            }
            line += &format!(
                " {} {:.2} ms",
                if kernels == Kernels::Fused { "fused" } else { "composed" },
                total / 5.0 * 1e3
            );
        }
        println!("{line}");
    }
    Ok(())
}

fn main() {
    let mut device = "cpu".to_string();
    let mut dtypes = "both".to_string();
    let mut timing = false;
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        match flag.as_str() {
            "--device" => device = args.next().expect("--device needs cpu or cuda"),
            "--dtype" => dtypes = args.next().expect("--dtype needs f32, bf16 or both"),
            "--time" => timing = true,
            other => panic!("unknown flag {other}"),
        }
    }
    let device = match device.as_str() {
        "cpu" => Device::Cpu,
        "cuda" => pretrain_worker::model::cuda_device(0).unwrap_or_else(|e| panic!("no CUDA device: {e}")),
        other => panic!("device {other}: cpu or cuda"),
    };
    let dtypes: Vec<DType> = match dtypes.as_str() {
        "f32" => vec![DType::F32],
        "bf16" => vec![DType::BF16],
        "both" => vec![DType::F32, DType::BF16],
        other => panic!("dtype {other}: f32, bf16 or both"),
    };
    let mut checker = Checker { device: device.clone(), failures: 0, checks: 0 };
    for &dtype in &dtypes {
        if dtype == DType::BF16 && device.is_cpu() {
            println!("skip bf16 on the CPU: the fused CPU kernels are fp32 (bf16 trains on GPUs)");
            continue;
        }
        for (name, op, inputs) in ops() {
            if let Err(e) = checker.op(&name, &op, &inputs, dtype) {
                checker.failures += 1;
                println!("FAIL {name} {dtype:?}: {e}");
            }
        }
        let mut nan_q = randn(&[1, 2, 40, 64], 1.0).flatten_all().and_then(|t| t.to_vec1::<f32>()).expect("values");
        nan_q[3 * 64 + 1] = f32::NAN;
        let q = Tensor::from_vec(nan_q, (1, 2, 40, 64), &Device::Cpu).expect("q");
        let kv = randn(&[1, 1, 40, 64], 1.0);
        let attention: Op = Box::new(|k, x| k.causal_attention(&x[0], &x[1], &x[2], 0.125));
        let mut nan_x = randn(&[4, 96], 1.0).flatten_all().and_then(|t| t.to_vec1::<f32>()).expect("values");
        nan_x[100] = f32::NAN;
        let norm: Op = Box::new(|k, x| k.rms_norm(&x[0], &x[1], 1e-5));
        for (name, op, inputs) in [
            ("attention", attention, vec![q, kv.clone(), kv]),
            ("rms-norm", norm, vec![Tensor::from_vec(nan_x, (4, 96), &Device::Cpu).expect("x"), randn(&[96], 1.0)]),
        ] {
            if let Err(e) = checker.nan(name, &op, &inputs, dtype) {
                checker.failures += 1;
                println!("FAIL {name} NaN {dtype:?}: {e}");
            }
        }
        if let Err(e) = step(&mut checker, dtype) {
            checker.failures += 1;
            println!("FAIL training step {dtype:?}: {e}");
        }
        if timing && device.is_cpu() {
            println!("skip --time on the CPU: its shapes are a GPU's (gigabytes per op)");
        } else if timing {
            time(&device, dtype).unwrap_or_else(|e| println!("timing failed: {e}"));
        }
    }
    println!("{} of {} checks passed", checker.checks - checker.failures.min(checker.checks), checker.checks);
    if checker.failures > 0 {
        std::process::exit(1);
    }
}
