//! Helpers for the end-to-end tests in `tests/`: the project's binaries, built on demand.

use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;

/// The directory holding this profile's binaries (`target/debug`).
pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    // target/debug/deps/<test> -> target/debug
    exe.parent().and_then(|deps| deps.parent()).expect("target/<profile>").to_path_buf()
}

/// Path of a workspace binary (`pretrain`, `pretrain-worker`), building both once per test process
/// so the tests never run stale binaries.
pub fn bin(name: &str) -> PathBuf {
    static BUILT: OnceLock<()> = OnceLock::new();
    BUILT.get_or_init(|| {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let status = Command::new(cargo)
            .args(["build", "--quiet", "-p", "pretrain-operator", "-p", "pretrain-worker", "--bins"])
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .status()
            .expect("cargo runs");
        assert!(status.success(), "building the binaries failed");
    });
    bin_dir().join(format!("{name}{}", std::env::consts::EXE_SUFFIX))
}

/// The repository root.
pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}
