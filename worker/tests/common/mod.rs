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

/// `n` words from a xorshift stream seeded by `seed`, each rendered from one draw.
pub fn words(seed: u64, n: usize, render: impl Fn(u64) -> String) -> Vec<String> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            render(state)
        })
        .collect()
}
