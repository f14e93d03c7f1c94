//! Feature `cuda`: the kernels in cuda/ compiled by nvcc into one fat binary (`$OUT_DIR/pretrain.fatbin`):
//! machine code for `CUDA_COMPUTE_CAP` (default 90, Hopper), so that no process compiles PTX at start,
//! and the PTX as well, which the driver compiles for newer GPUs.
//! Feature `emu`: the same sources compiled for the host against cuda/emu.hpp, as a static library.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=cuda");
    println!("cargo:rerun-if-changed=emu");
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    if std::env::var_os("CARGO_FEATURE_CUDA").is_some() {
        fatbin(&out.join("pretrain.fatbin"));
    }
    if std::env::var_os("CARGO_FEATURE_EMU").is_some() {
        cc::Build::new()
            .cpp(true)
            .std("c++20")
            .file("emu/emu.cpp")
            .flag("-Wno-unknown-pragmas")
            .opt_level(2)
            .compile("pretrain_emu");
    }
}

fn fatbin(out: &std::path::Path) {
    for var in ["NVCC", "CUDA_ROOT", "CUDA_COMPUTE_CAP"] {
        println!("cargo:rerun-if-env-changed={var}");
    }
    let nvcc = std::env::var_os("NVCC").map(PathBuf::from).unwrap_or_else(|| match std::env::var_os("CUDA_ROOT") {
        Some(root) => PathBuf::from(root).join("bin/nvcc"),
        None => PathBuf::from("nvcc"),
    });
    let cap = std::env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "90".into());
    if cap.is_empty() || !cap.chars().all(|c| c.is_ascii_digit()) {
        panic!("CUDA_COMPUTE_CAP must be a number such as 90 (Hopper), not {cap:?}");
    }
    let status = Command::new(&nvcc)
        .args(["--fatbin", "-O3", "-std=c++17", "--use_fast_math"])
        .arg(format!("-gencode=arch=compute_{cap},code=[sm_{cap},compute_{cap}]"))
        .arg("cuda/pretrain.cu")
        .arg("-o")
        .arg(out)
        .status()
        .unwrap_or_else(|e| panic!("cannot run nvcc ({}): {e}; set NVCC or CUDA_ROOT", nvcc.display()));
    if !status.success() {
        panic!("nvcc ({}) failed to compile cuda/pretrain.cu: {status}", nvcc.display());
    }
}
