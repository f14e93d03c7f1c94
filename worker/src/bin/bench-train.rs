//! Benchmark: training throughput of the Llama presets, on this machine's CPU cores or one GPU.
//!
//!     cargo run --release -p pretrain-worker --bin bench-train -- [--preset tiny|llama-125m|llama-1b]
//!         [--steps 5] [--batch 8] [--seq 256] [--vocab 32000] [--device cpu|cuda] [--dtype f32|bf16]
//!         [--unfused] [--recompute]
//!
//! Runs forward, backward and AdamW on random tokens (fp32 master weights; compute in `--dtype`) and
//! prints tokens/s with a breakdown and the model FLOPs utilisation against `--peak-tflops` (989, an
//! H100's bf16 dense peak, on GPUs); `--unfused` runs the composed candle operations instead of the
//! fused kernels (the straightforward candle baseline); `--recompute` recomputes each block's
//! activations in the backward. `scripts/bench-train.sh` runs the same shapes in PyTorch on the
//! CPU for the ratio, `scripts/bench-gpu.sh` on a GPU.

use std::time::Instant;

// Training allocates and frees large tensors every step; mimalloc reuses them instead of returning
// them to the kernel and faulting fresh zeroed pages in (glibc's behaviour above its mmap threshold).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use candle_core::{DType, Device, Tensor};
use pretrain_crd::spec::ModelPreset;
use pretrain_worker::model::{Kernels, Llama, LlamaConfig, Params};
use pretrain_worker::train::optim::{AdamW, AdamWConfig, clip};

/// The benchmark's flags.
#[derive(Debug, clap::Parser)]
struct Args {
    /// tiny, llama-125m or llama-1b.
    #[arg(long, default_value = "tiny")]
    preset: String,
    /// Timed steps (after one warm-up step).
    #[arg(long, default_value_t = 5)]
    steps: usize,
    /// Sequences per step.
    #[arg(long, default_value_t = 8)]
    batch: usize,
    /// Tokens per sequence.
    #[arg(long, default_value_t = 256)]
    seq: usize,
    /// Vocabulary size.
    #[arg(long, default_value_t = 32_000)]
    vocab: u32,
    /// cpu or cuda.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// f32 or bf16.
    #[arg(long, default_value = "f32")]
    dtype: String,
    /// The peak the MFU divides by (default: 989 on GPUs, none on CPUs).
    #[arg(long)]
    peak_tflops: Option<f64>,
    /// The composed candle operations instead of the fused kernels.
    #[arg(long)]
    unfused: bool,
    /// Recompute each block's activations in the backward.
    #[arg(long)]
    recompute: bool,
}

fn main() {
    pretrain_worker::allocator::keep_freed_memory();
    let Args { preset, steps, batch, seq, vocab, device, dtype, peak_tflops, unfused, recompute } =
        <Args as clap::Parser>::parse();
    let spec = match preset.as_str() {
        "tiny" => ModelPreset::Tiny,
        "llama-125m" => ModelPreset::Llama125m,
        "llama-1b" => ModelPreset::Llama1b,
        other => panic!("preset {other}: tiny, llama-125m or llama-1b"),
    }
    .config();
    let dev = match device.as_str() {
        "cpu" => Device::Cpu,
        "cuda" => pretrain_worker::model::cuda_device(0).unwrap_or_else(|e| panic!("no CUDA device: {e}")),
        other => panic!("device {other}: cpu or cuda"),
    };
    let dtype = match dtype.as_str() {
        "f32" => DType::F32,
        "bf16" => DType::BF16,
        other => panic!("dtype {other}: f32 or bf16"),
    };
    let peak_tflops = peak_tflops.unwrap_or(if dev.is_cuda() { 989.0 } else { 0.0 });
    let config = LlamaConfig::from_spec(&spec, vocab);
    let mut model = Llama::new(config.clone(), Params::init(&config, 1, &dev).unwrap(), seq, &dev).unwrap();
    model.set_recompute(recompute);
    model.set_kernels(if unfused { Kernels::Composed } else { Kernels::Fused });
    let mut opt =
        AdamW::new(AdamWConfig { beta1: 0.9, beta2: 0.95, eps: 1e-8, weight_decay: 0.1 }, &model.params).unwrap();
    let tokens: Vec<u32> = (0..batch * (seq + 1)).map(|i| ((i * 2_654_435_761) % vocab as usize) as u32).collect();
    let inputs = Tensor::from_vec(tokens[..batch * seq].to_vec(), (batch, seq), &dev).unwrap();
    let targets = Tensor::from_vec(tokens[batch..].to_vec(), (batch, seq), &dev).unwrap();
    println!(
        "{preset}: {} parameters, batch {batch} x {seq}, vocab {vocab}, {dtype:?} on {device} ({} threads)",
        config.parameters(),
        rayon::current_num_threads()
    );
    let (mut fwd, mut bwd, mut upd) = (0.0, 0.0, 0.0);
    for step in 0..=steps {
        let (f, b, u) = train_step(&model, &mut opt, &inputs, &targets, dtype, None);
        if step > 0 {
            // step 0 warms caches and allocations
            (fwd, bwd, upd) = (fwd + f, bwd + b, upd + u);
        }
    }
    let total = fwd + bwd + upd;
    let tokens_per_s = (steps * batch * seq) as f64 / total;
    println!(
        "pretrain (candle): {tokens_per_s:.0} tokens/s; per step forward {:.3} s, backward {:.3} s, optimizer {:.3} s",
        fwd / steps as f64,
        bwd / steps as f64,
        upd / steps as f64
    );
    if peak_tflops > 0.0 {
        let mfu = tokens_per_s * config.flops_per_token(seq) / (peak_tflops * 1e12);
        println!("MFU {:.1}% of {peak_tflops} TFLOP/s", 100.0 * mfu);
        println!("RESULT mfu={mfu:.4}");
    }
    println!("RESULT tokens_per_s={tokens_per_s:.1}");
    if !dev.is_cuda() {
        checkpoint_times(&model, &mut opt, &inputs, &targets, dtype);
    }
}

/// One training step; with `copying`, a checkpoint copy runs beside the forward and backward and the
/// update waits for it. Returns the seconds of the forward, the backward and the update.
fn train_step(
    model: &Llama,
    opt: &mut AdamW,
    inputs: &Tensor,
    targets: &Tensor,
    dtype: DType,
    copying: Option<&mut pretrain_worker::checkpoint::Copying>,
) -> (f64, f64, f64) {
    let t0 = Instant::now();
    let (loss, _) = model.loss(inputs, targets, dtype).unwrap();
    let _ = loss.to_scalar::<f32>().unwrap();
    let t1 = Instant::now();
    let store = loss.backward().unwrap();
    let t2 = Instant::now();
    let mut grads: Vec<Tensor> =
        model.params.iter().map(|(_, _, v)| store.get(v.as_tensor()).unwrap().clone()).collect();
    clip(&mut grads, 1.0).unwrap();
    if let Some(copying) = copying {
        copying.fence();
    }
    opt.step(&model.params, &grads, 1e-4).unwrap();
    inputs.device().synchronize().unwrap();
    let t3 = Instant::now();
    ((t1 - t0).as_secs_f64(), (t2 - t1).as_secs_f64(), (t3 - t2).as_secs_f64())
}

/// What a checkpoint of this model costs: the step loop's stall (a step with the copy of the weights
/// and moments running beside it, against one without; and, for comparison, the copy made in the
/// loop), the background save's speed against the store's own (the same bytes put as one object),
/// and loading, against the disk's sequential write speed.
fn checkpoint_times(model: &Llama, opt: &mut AdamW, inputs: &Tensor, targets: &Tensor, dtype: DType) {
    use pretrain_worker::checkpoint::{self, Snapshot, TrainState, safetensors_chunks};
    let seconds = |(f, b, u): (f64, f64, f64)| f + b + u;
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let tmp = tempfile::tempdir().expect("a temporary directory");
    let runtime = tokio::runtime::Runtime::new().expect("a tokio runtime");
    let store = pretrain_store::Store::open(&format!("file://{}", tmp.path().display())).expect("a file store");
    let dir = store.stage("bench", pretrain_crd::Stage::Train).expect("a stage directory");
    let state = TrainState { step: 1, optimizer_updates: opt.updates, ..TrainState::new(model.config.clone()) };
    // The stall: steps in turn without a copy, with the copy made first in the loop, and with the
    // copy beside the step.
    let (mut plain, mut inline, mut beside) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..ROUNDS {
        plain.push(seconds(train_step(model, opt, inputs, targets, dtype, None)));
        let t = Instant::now();
        let snapshot = Snapshot::take(state.clone(), model.params.named(), opt.state(&model.params)).expect("snapshot");
        train_step(model, opt, inputs, targets, dtype, None);
        inline.push(t.elapsed().as_secs_f64());
        drop(snapshot);
        let t = Instant::now();
        let (mut copy, _copied) = Snapshot::start(state.clone(), model.params.named(), opt.state(&model.params));
        train_step(model, opt, inputs, targets, dtype, Some(&mut copy));
        beside.push(t.elapsed().as_secs_f64());
    }
    let (plain, inline, beside) = (median(plain), median(inline), median(beside));
    // Saves and the store's own speed in turn (the disk's write-back treats both alike), medians.
    let key = pretrain_store::key("bench/store-speed").expect("a key");
    let (mut saves, mut puts, mut bytes) = (Vec::new(), Vec::new(), 0u64);
    for _ in 0..ROUNDS {
        let snapshot = Snapshot::take(state.clone(), model.params.named(), opt.state(&model.params)).expect("snapshot");
        // The store's own speed: as many bytes put as one object, in one request, nothing else done.
        let chunks = safetensors_chunks(&snapshot.model).expect("a layout");
        let payload: object_store::PutPayload = chunks.iter().cycle().take(3 * chunks.len()).cloned().collect();
        let payload_bytes = payload.content_length() as f64;
        let t = Instant::now();
        let files = runtime.block_on(checkpoint::save(&dir, snapshot, 1)).expect("save");
        saves.push(t.elapsed().as_secs_f64());
        bytes = files.iter().map(|f| f.size).sum();
        let t = Instant::now();
        runtime.block_on(object_store::ObjectStoreExt::put(store.object_store(), &key, payload)).expect("put");
        puts.push(payload_bytes / 1e6 / t.elapsed().as_secs_f64());
    }
    let (save_s, store_mb_s) = (median(saves), median(puts));
    let shard_s = shard_saves(&runtime, &dir, &state, model, opt);
    let t = Instant::now();
    runtime.block_on(checkpoint::load_latest(&dir, &Device::Cpu)).expect("load").expect("a checkpoint");
    let load_s = t.elapsed().as_secs_f64();
    let disk_mb_s = disk_write_speed(&tmp.path().join("disk-speed"), bytes);
    let mb = bytes as f64 / 1e6;
    println!(
        "checkpoint {mb:.1} MB: median step {plain:.3} s; with the copy first {inline:.3} s (stall {:.3} s); with the copy beside it {beside:.3} s (stall {:.3} s)",
        inline - plain,
        beside - plain
    );
    println!(
        "checkpoint save {save_s:.2} s: {:.0} MB/s with sha256, store put {store_mb_s:.0} MB/s ({:.0}%); load + verify {load_s:.2} s ({:.0} MB/s); disk sequential write {disk_mb_s:.0} MB/s",
        mb / save_s,
        100.0 * mb / save_s / store_mb_s,
        mb / load_s,
    );
    for (world, seconds) in &shard_s {
        println!(
            "checkpoint shard of rank {} of {world}: {seconds:.2} s, {:.2}x faster than the whole save (a rank's share of the bytes: 1/{world})",
            world - 1,
            save_s / seconds
        );
    }
    println!(
        "RESULT stall_inline_s={:.3} stall_beside_s={:.3} save_vs_store={:.3} shard2_speedup={:.2} shard4_speedup={:.2}",
        inline - plain,
        beside - plain,
        mb / save_s / store_mb_s,
        save_s / shard_s[0].1,
        save_s / shard_s[1].1
    );
}

/// A gang saves in shards, each rank its share of the bytes at once: on a cluster each rank has its
/// own link to the store, so the save takes as long as one rank's share. Median seconds of the last
/// rank's share (a shard and its part record) of 2 and of 4.
fn shard_saves(
    runtime: &tokio::runtime::Runtime,
    dir: &pretrain_store::StageDir,
    state: &pretrain_worker::checkpoint::TrainState,
    model: &Llama,
    opt: &AdamW,
) -> Vec<(usize, f64)> {
    use pretrain_worker::checkpoint::{self, Shard, Snapshot, own_shard};
    [2usize, 4]
        .into_iter()
        .map(|world| {
            let shard = Shard { rank: world - 1, world, gang: 1 };
            let mut times: Vec<f64> = (0..ROUNDS)
                .map(|_| {
                    let own = |all| own_shard(all, shard);
                    let snapshot =
                        Snapshot::take(state.clone(), own(model.params.named()), own(opt.state(&model.params)))
                            .expect("snapshot");
                    let t = Instant::now();
                    let wait = std::time::Duration::ZERO;
                    runtime.block_on(checkpoint::save_shard(dir, snapshot, shard, 1, wait)).expect("save a shard");
                    t.elapsed().as_secs_f64()
                })
                .collect();
            times.sort_by(f64::total_cmp);
            (world, times[times.len() / 2])
        })
        .collect()
}

/// Rounds of the stall measurement.
const ROUNDS: usize = 5;

/// MB/s of `bytes` written sequentially to `path` and synced.
fn disk_write_speed(path: &std::path::Path, bytes: u64) -> f64 {
    use std::io::Write;
    let block = vec![7u8; 8 << 20];
    let t = Instant::now();
    let mut f = std::fs::File::create(path).expect("create");
    let mut written = 0u64;
    while written < bytes {
        f.write_all(&block).expect("write");
        written += block.len() as u64;
    }
    f.sync_all().expect("sync");
    written as f64 / 1e6 / t.elapsed().as_secs_f64()
}
