//! Helpers shared by the stage tests: manifests with their store in a temporary folder, and
//! generated text.

use std::path::{Path, PathBuf};

/// Writes `dir/<name>.yaml`: run `name` with its store in `dir/store`, every rule filter off, then
/// `data` (lines under `spec.data`, indented four spaces) and `rest` (further `spec` sections,
/// indented two).
pub fn write_manifest(dir: &Path, name: &str, seed: u64, data: &str, rest: &str) -> PathBuf {
    let off = "{enabled: false}";
    let text = format!(
        r#"apiVersion: pretrain.dev/v1alpha1
kind: PretrainRun
metadata: {{name: {name}}}
spec:
  storage: {{url: "file://{store}"}}
  seed: {seed}
  data:
    filters: {{gopherQuality: {off}, gopherRepetition: {off}, c4: {off}, fineweb: {off}, language: {off}}}
{data}
{rest}
"#,
        store = dir.join("store").display(),
    );
    let path = dir.join(format!("{name}.yaml"));
    std::fs::write(&path, text).unwrap();
    path
}

/// `n` draws from a xorshift stream seeded by `seed`.
pub fn draws(seed: u64, n: usize) -> Vec<u64> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        })
        .collect()
}

/// `n` words from a xorshift stream seeded by `seed`, each rendered from one draw.
pub fn words(seed: u64, n: usize, render: impl Fn(u64) -> String) -> Vec<String> {
    draws(seed, n).into_iter().map(render).collect()
}

/// Runs `scripts/<script>` with `args` in the reference Python (`PRETRAIN_PYTHON`, default
/// `python3`) and parses its JSON output; `None` when `PRETRAIN_SKIP_PYTHON` is set. `needs` names
/// the packages a failure message asks for.
#[allow(dead_code)] // only the tests that compare with Python call it
pub fn python_json<T: serde::de::DeserializeOwned>(script: &str, args: &[&Path], needs: &str) -> Option<T> {
    if std::env::var_os("PRETRAIN_SKIP_PYTHON").is_some() {
        eprintln!("PRETRAIN_SKIP_PYTHON is set: the comparison with Python is skipped");
        return None;
    }
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../scripts").join(script);
    let python = std::env::var("PRETRAIN_PYTHON").unwrap_or_else(|_| "python3".into());
    let out = std::process::Command::new(&python)
        .arg(&script)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{python} does not run ({e}); PRETRAIN_SKIP_PYTHON=1 skips this test"));
    assert!(
        out.status.success(),
        "{} failed (needs {needs}: PRETRAIN_PYTHON=$(scripts/python-env.sh); PRETRAIN_SKIP_PYTHON=1 skips this test): {}",
        script.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    Some(serde_json::from_slice(&out.stdout).unwrap())
}
