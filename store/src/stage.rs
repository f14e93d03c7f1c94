//! A stage's directory `<run>/<stage>/` and its commit: `_SUCCESS.json`, written last, naming
//! every output with its size and sha256.

use bytes::Bytes;
use object_store::path::Path;
use pretrain_crd::Stage;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::{COMMIT_FORMAT_VERSION, Error, FileWriter, Result, SUCCESS_FILE, Store, key, upload};

/// One output file of a stage, as recorded in its commit.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileEntry {
    /// Path relative to the stage directory.
    pub path: String,
    /// Size in bytes.
    pub size: u64,
    /// Hex sha256 of the contents.
    pub sha256: String,
}

/// The `_SUCCESS.json` of a stage: the proof that its outputs are complete.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StageCommit {
    /// Format of this record.
    pub format_version: u32,
    /// Run name.
    pub run: String,
    /// Stage name.
    pub stage: Stage,
    /// `PretrainRunSpec::stage_config_hash` of the spec that produced the outputs.
    pub config_hash: String,
    /// Every output file.
    pub files: Vec<FileEntry>,
    /// Stage statistics (counts, timings), free-form.
    pub stats: serde_json::Value,
    /// Seconds since the Unix epoch when the commit was written.
    pub committed_at_unix: u64,
}

/// The directory `<run>/<stage>/` of a store.
#[derive(Clone, Debug)]
pub struct StageDir {
    pub(crate) store: Store,
    pub(crate) prefix: Path,
    pub(crate) run: String,
    pub(crate) stage: Stage,
}

impl StageDir {
    /// The store the directory lives in.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// The stage this directory belongs to.
    pub fn stage(&self) -> Stage {
        self.stage
    }

    /// The directory's key prefix, `<run>/<stage>`.
    pub fn prefix(&self) -> &Path {
        &self.prefix
    }

    /// The full key of a file in this directory; `name` is relative (`shards/00001.jsonl.zst`).
    pub fn key(&self, name: &str) -> Result<Path> {
        let rel = key(name)?;
        Ok(rel.parts().fold(self.prefix.clone(), |p, part| p.join(part)))
    }

    /// The URL of a file in this directory, for messages and status.
    pub fn url(&self, name: &str) -> String {
        format!("{}/{}/{name}", self.store.url, self.prefix)
    }

    /// Writes a whole file and returns its commit entry.
    pub async fn put(&self, name: &str, bytes: Bytes) -> Result<FileEntry> {
        let entry =
            FileEntry { path: name.into(), size: bytes.len() as u64, sha256: hex::encode(Sha256::digest(&bytes)) };
        self.store.put(&self.key(name)?, bytes).await?;
        Ok(entry)
    }

    /// Uploads a local file as `name`, hashing it on the way, without holding it in memory. A failed
    /// part is sent again on its own where the store uploads in parts; elsewhere the file is sent
    /// again from its start.
    pub async fn put_file(&self, name: &str, local: &std::path::Path) -> Result<FileEntry> {
        upload::put_file(&self.store, self.key(name)?, name, local).await
    }

    /// Writes a file held in memory as `chunks` (its bytes in order) and returns its commit entry:
    /// hashed while it uploads in parallel parts, with nothing copied (see [`crate::PARTS_IN_FLIGHT`]).
    pub async fn put_chunks(&self, name: &str, chunks: Vec<Bytes>) -> Result<FileEntry> {
        upload::put_chunks(&self.store, &self.key(name)?, name, chunks).await
    }

    /// Reads a whole file.
    pub async fn get(&self, name: &str) -> Result<Bytes> {
        self.store.get(&self.key(name)?).await
    }

    /// Streams a file in (in parts on cloud stores), hashing as it goes; the file appears only when
    /// [`FileWriter::finish`] returns.
    pub fn writer(&self, name: &str) -> Result<FileWriter> {
        Ok(FileWriter::new(self.store.clone(), self.key(name)?, name))
    }

    /// The stage's commit, whatever spec produced it; `None` if the stage never committed.
    pub async fn commit_record(&self) -> Result<Option<StageCommit>> {
        let key = self.key(SUCCESS_FILE)?;
        let Some(bytes) = self.store.get_opt(&key).await? else {
            return Ok(None);
        };
        let corrupt = |reason: String| Error::Corrupt { store: self.store.url.clone(), key: key.to_string(), reason };
        let commit: StageCommit =
            serde_json::from_slice(&bytes).map_err(|e| corrupt(format!("not a stage commit: {e}")))?;
        if commit.format_version > COMMIT_FORMAT_VERSION {
            return Err(corrupt(format!(
                "format version {} is newer than this build understands ({COMMIT_FORMAT_VERSION})",
                commit.format_version
            )));
        }
        if commit.stage != self.stage || commit.run != self.run {
            return Err(corrupt(format!(
                "records {}/{} instead of {}/{}",
                commit.run, commit.stage, self.run, self.stage
            )));
        }
        Ok(Some(commit))
    }

    /// The stage's commit if it was made by a spec with `config_hash`.
    pub async fn committed(&self, config_hash: &str) -> Result<Option<StageCommit>> {
        Ok(self.commit_record().await?.filter(|c| c.config_hash == config_hash))
    }

    /// Commits the stage: checks that every listed file is present with its recorded size, then
    /// writes `_SUCCESS.json` last. Until this returns, the stage counts as not done.
    pub async fn commit(
        &self,
        config_hash: &str,
        mut files: Vec<FileEntry>,
        stats: serde_json::Value,
    ) -> Result<StageCommit> {
        files.sort_by(|a, b| a.path.cmp(&b.path));
        for w in files.windows(2) {
            if w[0].path == w[1].path {
                return Err(Error::Key { key: w[0].path.clone(), reason: "listed twice in the commit".into() });
            }
        }
        for f in &files {
            if f.path == SUCCESS_FILE {
                return Err(Error::Key { key: f.path.clone(), reason: "is the commit marker itself".into() });
            }
            let key = self.key(&f.path)?;
            match self.store.size(&key).await? {
                Some(size) if size == f.size => {}
                found => {
                    return Err(Error::Corrupt {
                        store: self.store.url.clone(),
                        key: key.to_string(),
                        reason: format!("expected {} bytes before commit, found {found:?}", f.size),
                    });
                }
            }
        }
        let commit = StageCommit {
            format_version: COMMIT_FORMAT_VERSION,
            run: self.run.clone(),
            stage: self.stage,
            config_hash: config_hash.into(),
            files,
            stats,
            committed_at_unix: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
        };
        let json = serde_json::to_vec_pretty(&commit).expect("a commit serialises to JSON");
        self.store.put(&self.key(SUCCESS_FILE)?, Bytes::from(json)).await?;
        Ok(commit)
    }

    /// Re-reads every file of a commit and checks its size and sha256.
    pub async fn verify(&self, commit: &StageCommit) -> Result<()> {
        for f in &commit.files {
            let bytes = self.get(&f.path).await?;
            let sha = hex::encode(Sha256::digest(&bytes));
            if bytes.len() as u64 != f.size || sha != f.sha256 {
                return Err(Error::Corrupt {
                    store: self.store.url.clone(),
                    key: self.key(&f.path)?.to_string(),
                    reason: format!(
                        "expected {} bytes with sha256 {}, found {} bytes with sha256 {sha}",
                        f.size,
                        f.sha256,
                        bytes.len()
                    ),
                });
            }
        }
        Ok(())
    }

    /// Removes the commit marker (the stage counts as not done; outputs stay until overwritten).
    pub async fn uncommit(&self) -> Result<()> {
        self.store.delete(&self.key(SUCCESS_FILE)?).await
    }
}
