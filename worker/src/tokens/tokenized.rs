//! tokenize's committed outputs as the model stages read them: the tokenizer, the document
//! separator, and the token shards.

use std::path::{Path, PathBuf};

use pretrain_crd::Stage;
use pretrain_store::artifact::TokenizeStats;
use pretrain_store::{StageCommit, StageDir};

use crate::Context;
use crate::frame::UpstreamError;
use crate::tokenizer::Encoder;

/// A committed tokenize stage as the model stages read it: its directory, commit record, tokenizer
/// and document separator.
#[derive(Debug)]
pub struct Tokenized {
    /// The stage directory.
    pub dir: StageDir,
    /// Its commit record.
    pub commit: StageCommit,
    /// The tokenizer.
    pub encoder: Encoder,
    /// Id of the token that ends every document.
    pub separator: u32,
}

impl Tokenized {
    /// Loads the tokenize stage committed for `ctx`'s spec; a missing commit says what to run first.
    pub async fn load(ctx: &Context) -> std::result::Result<Self, UpstreamError> {
        let dir = ctx.dir.store().stage(ctx.run_name(), Stage::Tokenize)?;
        let commit = dir
            .committed(&ctx.run.spec.stage_config_hash(Stage::Tokenize))
            .await?
            .ok_or_else(|| UpstreamError::NotCommitted { stage: Stage::Tokenize, url: dir.url("_SUCCESS.json") })?;
        let json = dir.get("tokenizer.json").await?;
        let corrupt = |reason: String| UpstreamError::Corrupt { url: dir.url("tokenizer.json"), reason };
        let text = String::from_utf8(json.to_vec()).map_err(|_| corrupt("not UTF-8".into()))?;
        let encoder = Encoder::from_json(&text).map_err(|e| corrupt(e.to_string()))?;
        let stats = serde_json::from_value::<TokenizeStats>(commit.stats.clone()).ok();
        let name = stats.as_ref().map_or("<|eos|>", |s| s.tokenizer.separator.as_str());
        let separator =
            encoder.special(name).ok_or_else(|| corrupt(format!("the separator {name:?} is not a special token")))?;
        Ok(Self { dir, commit, encoder, separator })
    }

    /// Vocabulary size.
    pub fn vocab_size(&self) -> u32 {
        self.encoder.vocab_size()
    }

    /// The committed token shards under `prefix` (`shards/`, `heldout/`), as local files: a local
    /// store's are read in place, others are downloaded to `cache` (once: a file of the right size
    /// is kept).
    pub async fn local_shards(&self, prefix: &str, cache: &Path) -> pretrain_store::Result<Vec<PathBuf>> {
        let names: Vec<&str> = self
            .commit
            .files
            .iter()
            .filter(|f| f.path.starts_with(prefix) && f.path.ends_with(".tok"))
            .map(|f| f.path.as_str())
            .collect();
        self.local_files(&names, cache).await
    }

    /// Each training document's category (its index in the spec's sorted categories), in stream
    /// order, from the `.cat` file beside each shard; `None` when tokenize committed none (an
    /// older version).
    pub async fn categories(&self, cache: &Path) -> Result<Option<Vec<u16>>, UpstreamError> {
        let shards: Vec<String> = self
            .commit
            .files
            .iter()
            .filter(|f| f.path.starts_with("shards/") && f.path.ends_with(".tok"))
            .map(|f| f.path.replace(".tok", ".cat"))
            .collect();
        if !shards.iter().all(|c| self.commit.files.iter().any(|f| f.path == *c)) {
            return Ok(None);
        }
        let names: Vec<&str> = shards.iter().map(String::as_str).collect();
        let mut out = Vec::new();
        for (path, name) in self.local_files(&names, cache).await?.iter().zip(&names) {
            let corrupt = |reason: String| UpstreamError::Corrupt { url: self.dir.url(name), reason };
            let bytes = std::fs::read(path).map_err(|e| corrupt(e.to_string()))?;
            if bytes.len() % 2 != 0 {
                return Err(corrupt(format!("{} bytes is not a whole number of u16 categories", bytes.len())));
            }
            out.extend(bytes.chunks_exact(2).map(|c| u16::from_le_bytes([c[0], c[1]])));
        }
        Ok(Some(out))
    }

    /// Committed files as local files: a local store's are read in place, others are downloaded to
    /// `cache` (once: a file of the right size is kept).
    async fn local_files(&self, names: &[&str], cache: &Path) -> pretrain_store::Result<Vec<PathBuf>> {
        let mut out = Vec::new();
        let root = self.dir.store().url().strip_prefix("file://").map(PathBuf::from);
        for f in self.commit.files.iter().filter(|f| names.contains(&f.path.as_str())) {
            let key = self.dir.key(&f.path)?;
            let path = match &root {
                Some(root) => root.join(key.as_ref()),
                None => {
                    let local = cache.join(f.path.replace('/', "_"));
                    if std::fs::metadata(&local).map(|m| m.len()).ok() != Some(f.size) {
                        self.dir.store().download(&key, &local).await?;
                    }
                    local
                }
            };
            out.push(path);
        }
        Ok(out)
    }
}
