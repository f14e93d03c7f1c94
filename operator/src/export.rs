//! `pretrain export`: a training checkpoint as a Hugging Face Llama directory that `transformers`
//! loads with `LlamaForCausalLM.from_pretrained` and `AutoTokenizer.from_pretrained`.
//!
//! The model already names its tensors as `LlamaForCausalLM` does (an untied `lm_head.weight` only
//! when embeddings are untied), so `model.safetensors` is copied as it is, after its sha256 is
//! checked against the checkpoint's `MANIFEST.json`: a torn or corrupted checkpoint is never
//! exported. A checkpoint a gang saved in shards is exported as Hugging Face's sharded layout:
//! `model-00001-of-0000N.safetensors` and so on, with `model.safetensors.index.json` mapping each
//! tensor to its file. `config.json` comes from the checkpoint's `state.json` (the model shape, RoPE base and
//! scaling, the sequence length trained at), `tokenizer.json` from the tokenize stage.

use std::path::{Path, PathBuf};

use pretrain_crd::Stage;
use pretrain_store::artifact::{Manifest, Scaling, TrainState, is_file_of};
use pretrain_store::{StageDir, Store};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

/// Why an export failed.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    /// The store failed.
    #[error(transparent)]
    Store(#[from] pretrain_store::Error),
    /// The checkpoint asked for does not exist or is not valid.
    #[error("{0}")]
    Checkpoint(String),
    /// The output directory could not be written.
    #[error("{path}: {source}")]
    Output {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        source: std::io::Error,
    },
}

/// What was exported.
#[derive(Debug, Clone, PartialEq)]
pub struct Exported {
    /// The checkpoint's URL.
    pub checkpoint: String,
    /// Its step.
    pub step: u64,
    /// Files written, in order.
    pub files: Vec<PathBuf>,
}

/// The checkpoint `which` names in `run`: `latest` (long-context's newest, else train's), a stage
/// (`train`, `long-context`: its newest), or a stage and step (`train/40`, `train/step-000000040`).
async fn locate(store: &Store, run: &str, which: &str) -> Result<(StageDir, String), ExportError> {
    let (stages, step): (Vec<Stage>, Option<&str>) = match which.split_once('/') {
        _ if which == "latest" => (vec![Stage::LongContext, Stage::Train], None),
        Some((stage, step)) => (vec![parse_stage(stage)?], Some(step)),
        None => (vec![parse_stage(which)?], None),
    };
    for stage in stages {
        let dir = store.stage(run, stage)?;
        let name = match step {
            Some(step) => {
                let n: u64 = step.trim_start_matches("step-").parse().map_err(|_| {
                    ExportError::Checkpoint(format!("--checkpoint {which}: {step:?} is not a step number"))
                })?;
                format!("step-{n:09}")
            }
            None => match store.get_opt(&dir.key("ckpt/latest")?).await? {
                Some(latest) => String::from_utf8_lossy(&latest).trim().to_string(),
                None => continue,
            },
        };
        return Ok((dir, name));
    }
    Err(ExportError::Checkpoint(format!(
        "run {run} in {} has no checkpoint to export (--checkpoint {which})",
        store.url()
    )))
}

fn parse_stage(name: &str) -> Result<Stage, ExportError> {
    match name.parse::<Stage>() {
        Ok(stage) if stage.is_training() => Ok(stage),
        _ => Err(ExportError::Checkpoint(format!(
            "--checkpoint {name}: expected latest, train, long-context, or one of them with /STEP"
        ))),
    }
}

/// Reads `ckpt/<name>/<file>` and checks it against the manifest's size and sha256.
async fn verified(dir: &StageDir, name: &str, manifest: &Manifest, file: &str) -> Result<bytes::Bytes, ExportError> {
    let url = dir.url(&format!("ckpt/{name}/{file}"));
    let entry = manifest
        .files
        .iter()
        .find(|f| f.path == file)
        .ok_or_else(|| ExportError::Checkpoint(format!("{url} is not listed in the checkpoint's MANIFEST.json")))?;
    let bytes = dir.get(&format!("ckpt/{name}/{file}")).await?;
    let sha = hex::encode(Sha256::digest(&bytes));
    if entry.sha256 != sha || entry.size != bytes.len() as u64 {
        return Err(ExportError::Checkpoint(format!(
            "{url} does not match its MANIFEST.json (size {} sha256 {sha}); the checkpoint is corrupted",
            bytes.len()
        )));
    }
    Ok(bytes)
}

/// The weight files of an export from a checkpoint's model files (`(name, bytes)`, as the manifest
/// lists them): one file as `model.safetensors`; shards (`model-<r>-of-<n>.safetensors`, from 0) as
/// Hugging Face numbers them (from 1), with `model.safetensors.index.json` naming each tensor's file
/// and the total size of the tensors.
fn hf_weights(mut shards: Vec<(String, bytes::Bytes)>) -> Result<Vec<(String, Vec<u8>)>, String> {
    if let [(name, bytes)] = shards.as_slice()
        && name == "model.safetensors"
    {
        return Ok(vec![(name.clone(), bytes.to_vec())]);
    }
    shards.sort_by(|a, b| a.0.cmp(&b.0));
    let count = shards.len();
    let mut weight_map = serde_json::Map::new();
    let mut total = 0u64;
    let mut out = Vec::new();
    for (i, (name, bytes)) in shards.into_iter().enumerate() {
        let file = format!("model-{:05}-of-{count:05}.safetensors", i + 1);
        let header = safetensors_header(&bytes).map_err(|e| format!("{name}: {e}"))?;
        for (tensor, info) in header.iter().filter(|(k, _)| *k != "__metadata__") {
            let offsets = &info["data_offsets"];
            let (Some(start), Some(end)) = (offsets[0].as_u64(), offsets[1].as_u64()) else {
                return Err(format!("{name}: {tensor} has no data offsets"));
            };
            total += end.saturating_sub(start);
            if weight_map.insert(tensor.clone(), file.clone().into()).is_some() {
                return Err(format!("{name}: {tensor} is in two shards"));
            }
        }
        out.push((file, bytes.to_vec()));
    }
    let index = json!({"metadata": {"total_size": total}, "weight_map": weight_map});
    let index = format!("{}\n", serde_json::to_string_pretty(&index).expect("JSON values serialise"));
    out.push(("model.safetensors.index.json".into(), index.into_bytes()));
    Ok(out)
}

/// The JSON header of a safetensors file: its tensors (and `__metadata__`).
fn safetensors_header(bytes: &[u8]) -> Result<serde_json::Map<String, Value>, String> {
    let size =
        bytes.get(..8).map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes"))).ok_or("shorter than a header")?;
    let end = usize::try_from(size).ok().and_then(|s| s.checked_add(8)).filter(|e| *e <= bytes.len());
    let header = end.map(|e| &bytes[8..e]).ok_or("its header runs past its end")?;
    serde_json::from_slice(header).map_err(|e| format!("its header is not JSON: {e}"))
}

/// The Hugging Face `config.json` of a checkpoint's `state.json`, with the separator token's id as
/// BOS/EOS when the tokenizer has one.
pub fn hf_config(state: &TrainState, eos: Option<u64>) -> Value {
    let m = &state.model;
    let rope_scaling = match m.rope_scaling {
        Scaling::None => Value::Null,
        Scaling::Linear { factor } => json!({"rope_type": "linear", "factor": factor}),
        Scaling::Yarn { factor, original_len } => json!({
            "rope_type": "yarn",
            "factor": factor,
            "original_max_position_embeddings": original_len,
            "beta_fast": 32.0,
            "beta_slow": 1.0,
        }),
    };
    json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": m.vocab_size,
        "hidden_size": m.dim,
        "num_hidden_layers": m.layers,
        "num_attention_heads": m.heads,
        "num_key_value_heads": m.kv_heads,
        "head_dim": m.dim / m.heads.max(1),
        "intermediate_size": m.ffn_dim,
        "hidden_act": "silu",
        "rms_norm_eps": m.norm_eps,
        "rope_theta": m.rope_base,
        "rope_scaling": rope_scaling,
        "max_position_embeddings": state.seq_len,
        "tie_word_embeddings": m.tie_embeddings,
        "attention_bias": false,
        "mlp_bias": false,
        "initializer_range": 0.02,
        "torch_dtype": "float32",
        "bos_token_id": eos,
        "eos_token_id": eos,
    })
}

/// Writes checkpoint `which` of `run` as a Hugging Face Llama directory `out`.
pub async fn export(store: &Store, run: &str, which: &str, out: &Path) -> Result<Exported, ExportError> {
    let (dir, name) = locate(store, run, which).await?;
    let url = dir.url(&format!("ckpt/{name}"));
    let manifest = store
        .get_opt(&dir.key(&format!("ckpt/{name}/MANIFEST.json"))?)
        .await?
        .ok_or_else(|| ExportError::Checkpoint(format!("{url} has no MANIFEST.json: it is incomplete")))?;
    let manifest = Manifest::parse(&manifest).map_err(|e| ExportError::Checkpoint(format!("{url}: {e}")))?;
    let state_bytes = verified(&dir, &name, &manifest, "state.json").await?;
    let state: TrainState =
        serde_json::from_slice(&state_bytes).map_err(|e| ExportError::Checkpoint(format!("{url}/state.json: {e}")))?;
    let mut shards = Vec::new();
    for entry in manifest.files.iter().filter(|f| is_file_of(&f.path, "model")) {
        shards.push((entry.path.clone(), verified(&dir, &name, &manifest, &entry.path).await?));
    }
    let weights = hf_weights(shards).map_err(|e| ExportError::Checkpoint(format!("{url}: {e}")))?;

    let tokenize = store.stage(run, Stage::Tokenize)?;
    let tokenizer = tokenize.get("tokenizer.json").await?;
    let tokenizer_json: Value = serde_json::from_slice(&tokenizer)
        .map_err(|e| ExportError::Checkpoint(format!("{}: {e}", tokenize.url("tokenizer.json"))))?;
    // The document separator the tokenize stage put between documents ends a generation.
    let specials: Vec<(String, u64)> = tokenizer_json["added_tokens"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|t| t["special"] == true)
        .filter_map(|t| Some((t["content"].as_str()?.to_string(), t["id"].as_u64()?)))
        .collect();
    let eos = pretrain_crd::contract::SEPARATORS.iter().find_map(|s| specials.iter().find(|(c, _)| c == s)).cloned();

    let config = hf_config(&state, eos.as_ref().map(|e| e.1));
    let mut tokenizer_config = json!({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": state.seq_len,
        "clean_up_tokenization_spaces": false,
    });
    let mut generation = json!({"_from_model_config": true});
    if let Some((token, id)) = &eos {
        tokenizer_config["eos_token"] = token.clone().into();
        tokenizer_config["bos_token"] = token.clone().into();
        generation["bos_token_id"] = (*id).into();
        generation["eos_token_id"] = (*id).into();
    }
    let pretty = |v: &Value| format!("{}\n", serde_json::to_string_pretty(v).expect("JSON values serialise"));
    let mut files: Vec<(String, Vec<u8>)> = vec![
        ("config.json".into(), pretty(&config).into_bytes()),
        ("generation_config.json".into(), pretty(&generation).into_bytes()),
        ("tokenizer.json".into(), tokenizer.to_vec()),
        ("tokenizer_config.json".into(), pretty(&tokenizer_config).into_bytes()),
    ];
    files.extend(weights);
    let write = |path: &Path, bytes: &[u8]| {
        std::fs::write(path, bytes).map_err(|source| ExportError::Output { path: path.to_path_buf(), source })
    };
    std::fs::create_dir_all(out).map_err(|source| ExportError::Output { path: out.to_path_buf(), source })?;
    let mut written = Vec::new();
    for (file, bytes) in &files {
        let path = out.join(file);
        write(&path, bytes)?;
        written.push(path);
    }
    Ok(Exported { checkpoint: url, step: state.step, files: written })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A safetensors file of f32 tensors of `n` values each.
    fn file(tensors: &[(&str, usize)]) -> bytes::Bytes {
        let mut header = serde_json::Map::new();
        let mut offset = 0;
        for (name, n) in tensors {
            header.insert(
                (*name).into(),
                json!({"dtype": "F32", "shape": [n], "data_offsets": [offset, offset + 4 * n]}),
            );
            offset += 4 * n;
        }
        let header = serde_json::to_vec(&header).unwrap();
        let mut out = (header.len() as u64).to_le_bytes().to_vec();
        out.extend(header);
        out.extend(vec![0u8; offset]);
        out.into()
    }

    #[test]
    fn shards_export_as_hugging_face_numbers_them_with_an_index() {
        let whole = hf_weights(vec![("model.safetensors".into(), file(&[("a", 2)]))]).unwrap();
        assert_eq!(whole.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>(), ["model.safetensors"]);
        let shards = vec![
            ("model-00001-of-00002.safetensors".into(), file(&[("b", 3)])),
            ("model-00000-of-00002.safetensors".into(), file(&[("a", 2), ("c", 1)])),
        ];
        let out = hf_weights(shards).unwrap();
        let names: Vec<&str> = out.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(
            names,
            ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors", "model.safetensors.index.json"]
        );
        let index: Value = serde_json::from_slice(&out[2].1).unwrap();
        assert_eq!(index["metadata"]["total_size"], 24);
        assert_eq!(index["weight_map"]["a"], "model-00001-of-00002.safetensors");
        assert_eq!(index["weight_map"]["b"], "model-00002-of-00002.safetensors");
        let twice = vec![
            ("model-00000-of-00002.safetensors".into(), file(&[("a", 1)])),
            ("model-00001-of-00002.safetensors".into(), file(&[("a", 1)])),
        ];
        assert!(hf_weights(twice).unwrap_err().contains("a is in two shards"));
        assert!(
            hf_weights(vec![("model-00000-of-00001.safetensors".into(), bytes::Bytes::from_static(b"\xff\xff"))])
                .is_err()
        );
    }

    #[test]
    fn the_config_maps_our_model_and_rope_scaling_to_hugging_face_names() {
        let state = json!({"formatVersion": 1, "step": 40, "tokensSeen": 0, "cursor": 0, "optimizerUpdates": 40,
            "lr": 0.001, "rngSeed": 1, "worldSize": 1, "configHash": "h", "seqLen": 1024, "loss": null,
            "lossWindow": [], "model": {
            "vocabSize": 4096, "dim": 128, "layers": 2, "heads": 4, "kvHeads": 2, "ffnDim": 344,
            "ropeBase": 10000.0, "normEps": 1e-5, "tieEmbeddings": true,
            "ropeScaling": {"type": "yarn", "factor": 4.0, "originalLen": 256}
        }});
        let mut state: TrainState = serde_json::from_value(state).unwrap();
        let c = hf_config(&state, Some(1));
        assert_eq!(c["num_key_value_heads"], 2);
        assert_eq!(c["head_dim"], 32);
        assert_eq!(c["max_position_embeddings"], 1024);
        assert_eq!(c["rope_scaling"]["rope_type"], "yarn");
        assert_eq!(c["rope_scaling"]["original_max_position_embeddings"], 256);
        assert_eq!(c["rope_scaling"]["factor"], 4.0);
        assert_eq!(c["rms_norm_eps"], 1e-5);
        assert_eq!(c["eos_token_id"], 1);
        state.model.rope_scaling = Scaling::None;
        assert_eq!(hf_config(&state, None)["rope_scaling"], Value::Null);
    }
}
