//! Object storage for runs: a store opened from a URL, the key layout `<run>/<stage>/...`, and the
//! stage commit of DESIGN.md (`_SUCCESS.json`, written last, naming every output with its sha256).
//!
//! Shared by the operator (which only reads commits) and the worker (which writes stage outputs).

use std::fmt;
use std::ops::Range;
use std::sync::Arc;

use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use object_store::aws::AmazonS3Builder;
use object_store::azure::MicrosoftAzureBuilder;
use object_store::gcp::GoogleCloudStorageBuilder;
use object_store::local::LocalFileSystem;
use object_store::memory::InMemory;
use object_store::multipart::MultipartStore;
use object_store::path::Path;
use object_store::prefix::PrefixStore;
use object_store::{GetOptions, GetRange, ObjectStore, ObjectStoreExt, PutPayload};
use pretrain_crd::Stage;
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;

pub mod artifact;
pub mod faults;
pub mod retry;
mod stage;
mod upload;

pub use faults::{ENV_FAULTS, Faults, FaultyStore};
pub use retry::Retry;
pub use stage::{FileEntry, StageCommit, StageDir};
pub use upload::{FileWriter, PART_SIZE, PARTS_IN_FLIGHT};

/// The commit marker's file name; written last in a stage directory.
pub const SUCCESS_FILE: &str = "_SUCCESS.json";

/// Version of the `_SUCCESS.json` format.
pub const COMMIT_FORMAT_VERSION: u32 = 1;

/// Store failures; each names the URL or key it is about.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The store URL cannot be used.
    #[error("store URL {url:?}: {reason}")]
    Url {
        /// The URL as given.
        url: String,
        /// Why it was refused.
        reason: String,
    },
    /// A key is not a safe relative object path.
    #[error("object key {key:?}: {reason}")]
    Key {
        /// The key as given.
        key: String,
        /// Why it was refused.
        reason: String,
    },
    /// The object store failed (after the retries transient failures get).
    #[error("{store}/{key}: {source}")]
    Object {
        /// Store URL.
        store: String,
        /// Key of the object.
        key: String,
        /// The underlying error (boxed: it is large and errors travel far).
        source: Box<object_store::Error>,
    },
    /// An object exists but its contents are wrong.
    #[error("{store}/{key}: {reason}")]
    Corrupt {
        /// Store URL.
        store: String,
        /// Key of the object.
        key: String,
        /// What is wrong with it.
        reason: String,
    },
}

/// Store result.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// An object store rooted at a URL. Every operation retries transient failures ([`Retry`]);
/// downloads resume at the byte they stopped at and large uploads resend only the part that failed.
#[derive(Clone)]
pub struct Store {
    inner: Arc<dyn ObjectStore>,
    /// The same store's part-by-part upload interface, where it has one (not local files).
    multipart: Option<Arc<dyn MultipartStore>>,
    url: String,
    retry: Retry,
}

impl fmt::Debug for Store {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Store").field("url", &self.url).finish()
    }
}

type Backend = (Arc<dyn ObjectStore>, Option<Arc<dyn MultipartStore>>);

fn with_multipart<T: ObjectStore + MultipartStore>(store: T) -> Backend {
    let store = Arc::new(store);
    (Arc::clone(&store) as Arc<dyn ObjectStore>, Some(store as Arc<dyn MultipartStore>))
}

impl Store {
    /// Opens `file://PATH` (absolute with `file:///`, else relative to the working directory; created
    /// if missing), `memory://`, `s3://BUCKET[/PREFIX]`, `gs://BUCKET[/PREFIX]` or
    /// `az://CONTAINER[/PREFIX]`. Cloud credentials and endpoints come from the environment
    /// (`AWS_*`, `GOOGLE_*`, `AZURE_*`), which in a cluster the storage Secret provides.
    ///
    /// With [`ENV_FAULTS`] set, the store injects the faults it names (reliability drills).
    pub fn open(url: &str) -> Result<Self> {
        Self::open_with(url, &[])
    }

    /// Like [`Store::open`], with object_store configuration keys applied over the environment
    /// (`aws_endpoint`, `aws_allow_http`, `google_service_account`, `azure_storage_account_name`, ...).
    pub fn open_with(url: &str, options: &[(&str, &str)]) -> Result<Self> {
        Self::open_inner(url, options, true)
    }

    /// Like [`Store::open_with`], but with only `options` as configuration: nothing is read from this
    /// process's environment. The operator opens a run's store this way, with the credentials of the
    /// run's own Secret, so that a run reaches no bucket its Secret does not grant.
    pub fn open_isolated(url: &str, options: &[(&str, &str)]) -> Result<Self> {
        Self::open_inner(url, options, false)
    }

    fn open_inner(url: &str, options: &[(&str, &str)], from_env: bool) -> Result<Self> {
        let bad = |reason: String| Error::Url { url: url.to_string(), reason };
        let (scheme, rest) = url
            .split_once("://")
            .ok_or_else(|| bad("expected SCHEME://..., with scheme file, s3, gs, az or memory".into()))?;
        let (inner, multipart): Backend = match scheme {
            "file" => {
                if rest.is_empty() {
                    return Err(bad("names no directory".into()));
                }
                std::fs::create_dir_all(rest).map_err(|e| bad(format!("cannot create directory {rest:?}: {e}")))?;
                (Arc::new(LocalFileSystem::new_with_prefix(rest).map_err(|e| bad(e.to_string()))?), None)
            }
            "memory" => with_multipart(InMemory::new()),
            "s3" | "gs" | "az" => {
                let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
                if bucket.is_empty() {
                    return Err(bad("names no bucket".into()));
                }
                let prefix = prefix.trim_matches('/');
                let prefix = if prefix.is_empty() {
                    Path::default()
                } else {
                    Path::parse(prefix).map_err(|e| bad(format!("bad prefix: {e}")))?
                };
                let option_error = |k: &str, e: object_store::Error| bad(format!("option {k:?}: {e}"));
                match scheme {
                    "s3" => {
                        let mut b = (if from_env { AmazonS3Builder::from_env() } else { AmazonS3Builder::new() })
                            .with_bucket_name(bucket);
                        for (k, v) in options {
                            b = b.with_config(k.parse().map_err(|e| option_error(k, e))?, *v);
                        }
                        with_multipart(PrefixStore::new(b.build().map_err(|e| bad(e.to_string()))?, prefix))
                    }
                    "gs" => {
                        let mut b = (if from_env {
                            GoogleCloudStorageBuilder::from_env()
                        } else {
                            GoogleCloudStorageBuilder::new()
                        })
                        .with_bucket_name(bucket);
                        for (k, v) in options {
                            b = b.with_config(k.parse().map_err(|e| option_error(k, e))?, *v);
                        }
                        with_multipart(PrefixStore::new(b.build().map_err(|e| bad(e.to_string()))?, prefix))
                    }
                    _ => {
                        let mut b =
                            (if from_env { MicrosoftAzureBuilder::from_env() } else { MicrosoftAzureBuilder::new() })
                                .with_container_name(bucket);
                        for (k, v) in options {
                            b = b.with_config(k.parse().map_err(|e| option_error(k, e))?, *v);
                        }
                        with_multipart(PrefixStore::new(b.build().map_err(|e| bad(e.to_string()))?, prefix))
                    }
                }
            }
            other => return Err(bad(format!("scheme {other:?} is not supported; use file, s3, gs, az or memory"))),
        };
        let store = Self { inner, multipart, url: url.trim_end_matches('/').to_string(), retry: Retry::default() };
        match Faults::from_env().map_err(bad)? {
            Some(faults) => Ok(store.with_faults(faults).0),
            None => Ok(store),
        }
    }

    /// The store configuration among environment variables (a storage Secret's keys): those of the
    /// URL's backend (`AWS_*` for `s3://`, `GOOGLE_*` for `gs://`, `AZURE_*` for `az://`) that it
    /// understands, as configuration keys (lowercased, as its `from_env` reads them).
    pub fn env_options(url: &str, vars: &[(String, String)]) -> Vec<(String, String)> {
        let scheme = url.split_once("://").map_or("", |(s, _)| s);
        let known = |key: &str| match scheme {
            "s3" => key.starts_with("aws_") && key.parse::<object_store::aws::AmazonS3ConfigKey>().is_ok(),
            "gs" => key.starts_with("google_") && key.parse::<object_store::gcp::GoogleConfigKey>().is_ok(),
            "az" => key.starts_with("azure_") && key.parse::<object_store::azure::AzureConfigKey>().is_ok(),
            _ => false,
        };
        vars.iter().map(|(k, v)| (k.to_ascii_lowercase(), v.clone())).filter(|(k, _)| known(k)).collect()
    }

    /// Wraps an existing object store (tests, fault injection); uploads go through its streaming
    /// interface.
    pub fn from_object_store(inner: Arc<dyn ObjectStore>, url: impl Into<String>) -> Self {
        Self { inner, multipart: None, url: url.into(), retry: Retry::default() }
    }

    /// The same store with another retry policy.
    #[must_use]
    pub fn with_retry(mut self, retry: Retry) -> Self {
        self.retry = retry;
        self
    }

    /// The same store behind a [`FaultyStore`] injecting `faults`, which is returned too so that a
    /// test can count what it injected.
    pub fn with_faults(self, faults: Faults) -> (Self, Arc<FaultyStore>) {
        let faulty = Arc::new(FaultyStore::new(self.inner, self.multipart.clone(), faults));
        let multipart = self.multipart.map(|_| Arc::clone(&faulty) as Arc<dyn MultipartStore>);
        let store =
            Self { inner: Arc::clone(&faulty) as Arc<dyn ObjectStore>, multipart, url: self.url, retry: self.retry };
        (store, faulty)
    }

    /// The URL the store was opened from.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The underlying object store (without this type's retries).
    pub fn object_store(&self) -> &Arc<dyn ObjectStore> {
        &self.inner
    }

    /// The directory of one stage of one run.
    pub fn stage(&self, run: &str, stage: Stage) -> Result<StageDir> {
        let run_key = key(run)?;
        if run_key.parts().count() != 1 {
            return Err(Error::Key { key: run.into(), reason: "a run name is a single path segment".into() });
        }
        Ok(StageDir { store: self.clone(), prefix: run_key.join(stage.as_str()), run: run.into(), stage })
    }

    fn object_error(&self, key: &Path, source: object_store::Error) -> Error {
        Error::Object { store: self.url.clone(), key: key.to_string(), source: Box::new(source) }
    }

    /// Reads a whole object.
    pub async fn get(&self, key: &Path) -> Result<Bytes> {
        self.get_opt(key).await?.ok_or_else(|| {
            let source = object_store::Error::NotFound { path: key.to_string(), source: "no such object".into() };
            self.object_error(key, source)
        })
    }

    /// Reads a whole object, or `None` if it does not exist.
    pub async fn get_opt(&self, key: &Path) -> Result<Option<Bytes>> {
        let read = || async { self.inner.get(key).await?.bytes().await };
        match self.retry.run("get", key, read).await {
            Ok(bytes) => Ok(Some(bytes)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(self.object_error(key, e)),
        }
    }

    /// Writes a whole object (atomically: readers see the old object or the new one).
    pub async fn put(&self, key: &Path, bytes: Bytes) -> Result<()> {
        let write = || self.inner.put(key, PutPayload::from_bytes(bytes.clone()));
        self.retry.run("put", key, write).await.map_err(|e| self.object_error(key, e))?;
        Ok(())
    }

    /// Size of an object, or `None` if it does not exist.
    pub async fn size(&self, key: &Path) -> Result<Option<u64>> {
        match self.retry.run("head", key, || self.inner.head(key)).await {
            Ok(meta) => Ok(Some(meta.size)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(self.object_error(key, e)),
        }
    }

    /// Up to `max` bytes of an object from `offset` on, with its size, read from one version of it;
    /// `None` if it does not exist. An object no longer than `offset` gives no bytes (a reader
    /// following a growing file compares the size with its offset). An object replaced between the
    /// size and the read is read again.
    pub async fn read_from(&self, key: &Path, offset: u64, max: u64) -> Result<Option<(Bytes, u64)>> {
        for _ in 0..self.retry.attempts.max(2) {
            let meta = match self.retry.run("head", key, || self.inner.head(key)).await {
                Ok(meta) => meta,
                Err(object_store::Error::NotFound { .. }) => return Ok(None),
                Err(e) => return Err(self.object_error(key, e)),
            };
            if meta.size <= offset {
                return Ok(Some((Bytes::new(), meta.size)));
            }
            let options = GetOptions {
                range: Some(GetRange::Bounded(offset..meta.size.min(offset.saturating_add(max)))),
                if_match: meta.e_tag.clone(),
                ..GetOptions::default()
            };
            let read = || async { self.inner.get_opts(key, options.clone()).await?.bytes().await };
            match self.retry.run("get", key, read).await {
                Ok(bytes) => return Ok(Some((bytes, meta.size))),
                Err(object_store::Error::Precondition { .. } | object_store::Error::NotFound { .. }) => {}
                Err(e) => return Err(self.object_error(key, e)),
            }
        }
        let source =
            object_store::Error::Generic { store: "read_from", source: "replaced while read, again and again".into() };
        Err(self.object_error(key, source))
    }

    /// Every key under `prefix`, sorted.
    pub async fn list(&self, prefix: &Path) -> Result<Vec<Path>> {
        let listing = || self.inner.list(Some(prefix)).map_ok(|meta| meta.location).try_collect::<Vec<Path>>();
        let mut keys = self.retry.run("list", prefix, listing).await.map_err(|e| self.object_error(prefix, e))?;
        keys.sort();
        Ok(keys)
    }

    /// Streams an object into a local file (created or truncated), never holding it whole in memory.
    /// A transfer cut off part way resumes at the byte it reached, from the same version of the
    /// object.
    pub async fn download(&self, key: &Path, dest: &std::path::Path) -> Result<u64> {
        self.download_part(key, None, dest).await
    }

    /// Streams bytes `range` of an object into a local file, as [`Store::download`] does.
    pub async fn download_range(&self, key: &Path, range: Range<u64>, dest: &std::path::Path) -> Result<u64> {
        self.download_part(key, Some(range), dest).await
    }

    /// Reads byte ranges of an object, nearby ranges in one request.
    pub async fn get_ranges(&self, key: &Path, ranges: &[Range<u64>]) -> Result<Vec<Bytes>> {
        let read = || self.inner.get_ranges(key, ranges);
        self.retry.run("get", key, read).await.map_err(|e| self.object_error(key, e))
    }

    /// Reads a whole object of `size` bytes into memory in ranges of [`PART_SIZE`], [`PARTS_IN_FLIGHT`]
    /// at a time, each retried on its own, and returns it with its sha256 (hashed as the ranges
    /// arrive, in order). An object of another size is an error.
    pub async fn read_hashed(&self, key: &Path, size: u64) -> Result<(Bytes, String)> {
        let part = PART_SIZE as u64;
        let ranges = (0..size.div_ceil(part)).map(|i| i * part..((i + 1) * part).min(size));
        let mut parts = futures::stream::iter(ranges)
            .map(|range| {
                let read = move || {
                    let range = range.clone();
                    async move {
                        let options = GetOptions { range: Some(GetRange::Bounded(range)), ..GetOptions::default() };
                        let result = self.inner.get_opts(key, options).await?;
                        let object = result.meta.size;
                        Ok((object, result.bytes().await?))
                    }
                };
                async move {
                    let (object, bytes) =
                        self.retry.run("get", key, read).await.map_err(|e| self.object_error(key, e))?;
                    if object != size {
                        let reason = format!("holds {object} bytes, {size} expected");
                        return Err(Error::Corrupt { store: self.url.clone(), key: key.to_string(), reason });
                    }
                    Ok(bytes)
                }
            })
            .buffered(PARTS_IN_FLIGHT);
        let mut whole = Vec::with_capacity(usize::try_from(size).unwrap_or(0));
        let mut hasher = Sha256::new();
        while let Some(bytes) = parts.try_next().await? {
            hasher.update(&bytes);
            whole.extend_from_slice(&bytes);
        }
        if whole.len() as u64 != size {
            return Err(Error::Corrupt {
                store: self.url.clone(),
                key: key.to_string(),
                reason: format!("read {} bytes of an object expected to hold {size}", whole.len()),
            });
        }
        Ok((Bytes::from(whole), hex::encode(hasher.finalize())))
    }

    async fn download_part(&self, key: &Path, part: Option<Range<u64>>, dest: &std::path::Path) -> Result<u64> {
        let local = |e: std::io::Error| Error::Corrupt {
            store: self.url.clone(),
            key: key.to_string(),
            reason: format!("cannot write {}: {e}", dest.display()),
        };
        let mut file = tokio::fs::File::create(dest).await.map_err(local)?;
        let (mut written, mut expected, mut e_tag) = (0u64, None::<u64>, None::<String>);
        let mut attempt = 1;
        loop {
            let range = match &part {
                Some(part) if part.is_empty() => break,
                Some(part) => Some(GetRange::Bounded(part.start + written..part.end)),
                None => (written > 0).then_some(GetRange::Offset(written)),
            };
            let options = GetOptions { range, if_match: e_tag.clone(), ..GetOptions::default() };
            let failure = match self.inner.get_opts(key, options).await {
                Ok(result) => {
                    if expected.is_none() {
                        expected = Some(part.as_ref().map_or(result.meta.size, |p| p.end - p.start));
                        e_tag.clone_from(&result.meta.e_tag);
                    }
                    let mut stream = result.into_stream();
                    loop {
                        match stream.next().await {
                            Some(Ok(chunk)) => {
                                file.write_all(&chunk).await.map_err(local)?;
                                written += chunk.len() as u64;
                            }
                            Some(Err(e)) => break Some(e),
                            None => break None,
                        }
                    }
                }
                Err(e) => Some(e),
            };
            match failure {
                None => break,
                Some(e) if expected == Some(written) => {
                    // Every byte arrived before the failure.
                    drop(e);
                    break;
                }
                Some(e) if attempt < self.retry.attempts && retry::is_transient(&e) => {
                    let wait = self.retry.delay(attempt, retry::jitter());
                    eprintln!(
                        "store: get {key}: {e}; resuming at byte {written}, retry {attempt}/{} in {} ms",
                        self.retry.attempts - 1,
                        wait.as_millis()
                    );
                    tokio::time::sleep(wait).await;
                    attempt += 1;
                }
                Some(e) => return Err(self.object_error(key, e)),
            }
        }
        file.flush().await.map_err(local)?;
        if let Some(size) = expected
            && size != written
        {
            return Err(Error::Corrupt {
                store: self.url.clone(),
                key: key.to_string(),
                reason: format!("downloaded {written} bytes of an object of {size}"),
            });
        }
        Ok(written)
    }

    /// Deletes one object; a missing object is not an error.
    pub async fn delete(&self, key: &Path) -> Result<()> {
        match self.retry.run("delete", key, || self.inner.delete(key)).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(self.object_error(key, e)),
        }
    }

    /// Deletes every object under `prefix`, commit markers first, so that an interrupted delete never
    /// leaves a `_SUCCESS.json` pointing at deleted files.
    pub async fn delete_prefix(&self, prefix: &Path) -> Result<usize> {
        let mut keys = self.list(prefix).await?;
        keys.sort_by_key(|k| k.filename() != Some(SUCCESS_FILE));
        for k in &keys {
            self.delete(k).await?;
        }
        Ok(keys.len())
    }
}

/// Parses a relative object key, refusing empty, absolute and `..` paths.
pub fn key(raw: &str) -> Result<Path> {
    let refuse = |reason: &str| Error::Key { key: raw.to_string(), reason: reason.to_string() };
    if raw.is_empty() {
        return Err(refuse("is empty"));
    }
    if raw.starts_with('/') {
        return Err(refuse("must be relative"));
    }
    if raw.split('/').any(|part| part == ".." || part == ".") {
        return Err(refuse("must not contain '.' or '..' segments"));
    }
    Path::parse(raw).map_err(|e| refuse(&e.to_string()))
}
