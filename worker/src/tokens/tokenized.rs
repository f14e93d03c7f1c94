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
        let mut out = Vec::new();
        let root = self.dir.store().url().strip_prefix("file://").map(PathBuf::from);
        for f in self.commit.files.iter().filter(|f| f.path.starts_with(prefix) && f.path.ends_with(".tok")) {
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
