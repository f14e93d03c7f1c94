//! Fault injection for reliability drills: a store wrapper that fails, slows and cuts operations at
//! a set rate, and fills the disk or turns the store read-only under chosen keys.
//!
//! Set [`ENV_FAULTS`] and every store a process opens is wrapped, so one variable reaches the runner
//! and each worker it starts:
//!
//! ```text
//! PRETRAIN_STORE_FAULTS=rate=0.05,seed=7,delay-ms=20,log=/tmp/faults.log
//! PRETRAIN_STORE_FAULTS=full=train/ckpt/step-000000020/
//! PRETRAIN_STORE_FAULTS=outage=8@tokenize/tokenizer.json,log=/tmp/faults.log
//! ```
//!
//! At `rate`, an operation meets one of the faults real stores produce: a 503 before anything
//! happened, a connection reset after the write took effect (the caller cannot tell it did), a slow
//! response (up to `delay-ms`), a download or listing cut off part way, a part of a multipart upload
//! lost. `full=` and `readonly=` make every write to a key containing the text fail the way a full
//! disk or a read-only file system does, which no retry can fix. `outage=OPS@TEXT` refuses every
//! operation on keys containing the text (a 503) until OPS have been refused, counted in `log`
//! across every process of the run: an outage longer than one process's retries that ends, the
//! way a store's does. Each fault is appended to `log`.

use std::fmt;
use std::io::Write as _;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures::stream::BoxStream;
use futures::{FutureExt, StreamExt};
use object_store::multipart::{MultipartStore, PartId};
use object_store::path::Path;
use object_store::{
    CopyOptions, GetOptions, GetResult, GetResultPayload, ListResult, MultipartId, MultipartUpload, ObjectMeta,
    ObjectStore, PutMultipartOptions, PutOptions, PutPayload, PutResult, RenameOptions, UploadPart,
};

use pretrain_crd::seeded::mix;

/// The environment variable holding a fault specification (see the module documentation).
pub const ENV_FAULTS: &str = "PRETRAIN_STORE_FAULTS";

/// What to inject.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Faults {
    /// Probability that an operation meets a transient fault.
    pub rate: f64,
    /// Seed of the fault sequence (from the environment, mixed with the process's command line).
    pub seed: u64,
    /// Longest wait of a slow response.
    pub delay: Duration,
    /// File each injected fault is appended to, one line each.
    pub log: Option<PathBuf>,
    /// Writes to keys containing one of these fail with "no space left on device".
    pub full: Vec<String>,
    /// Writes and deletes of keys containing one of these fail with "read-only file system".
    pub readonly: Vec<String>,
    /// An outage: every operation on a key containing the text is refused (503) until this many
    /// have been, counted across every process that shares `log`.
    pub outage: Option<(String, u64)>,
}

impl Faults {
    /// Parses `key=value` pairs separated by commas: `rate`, `seed`, `delay-ms`, `log`, `full`,
    /// `readonly` (these two may repeat) and `outage=OPS@TEXT`.
    pub fn parse(spec: &str) -> Result<Self, String> {
        let mut faults = Self { delay: Duration::from_millis(10), ..Self::default() };
        for item in spec.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            let (key, value) = item.split_once('=').ok_or_else(|| format!("{item:?} is not key=value"))?;
            let number = |what: &str| format!("{key}={value:?}: not {what}");
            match key {
                "rate" => {
                    faults.rate = value.parse().map_err(|_| number("a number"))?;
                    if !(0.0..=1.0).contains(&faults.rate) {
                        return Err(format!("rate={value}: must be between 0 and 1"));
                    }
                }
                "seed" => faults.seed = value.parse().map_err(|_| number("an integer"))?,
                "delay-ms" => faults.delay = Duration::from_millis(value.parse().map_err(|_| number("an integer"))?),
                "log" => faults.log = Some(PathBuf::from(value)),
                "full" => faults.full.push(value.to_string()),
                "readonly" => faults.readonly.push(value.to_string()),
                "outage" => {
                    let (ops, text) = value.split_once('@').ok_or_else(|| format!("outage={value:?}: not OPS@TEXT"))?;
                    let ops = ops.parse().map_err(|_| format!("outage={value:?}: {ops:?} is not an integer"))?;
                    faults.outage = Some((text.to_string(), ops));
                }
                other => {
                    return Err(format!(
                        "unknown key {other:?}; expected rate, seed, delay-ms, log, full, readonly or outage"
                    ));
                }
            }
        }
        if faults.outage.is_some() && faults.log.is_none() {
            return Err("outage= needs log=: the operations it refuses are counted there, across processes".into());
        }
        Ok(faults)
    }

    /// The faults [`ENV_FAULTS`] asks for, if it is set and not empty.
    pub fn from_env() -> Result<Option<Self>, String> {
        match std::env::var(ENV_FAULTS) {
            Ok(spec) if !spec.trim().is_empty() => {
                let mut faults = Self::parse(&spec).map_err(|e| format!("{ENV_FAULTS}: {e}"))?;
                // Every process of a run reads the same variable: the runner and each worker get
                // their own sequence, from their command line and shard or rank, the same on every
                // rerun.
                let mut command: Vec<String> = std::env::args().collect();
                command.extend(["JOB_COMPLETION_INDEX", "RANK"].iter().filter_map(|k| std::env::var(k).ok()));
                faults.seed ^= mix(command.join(" ").bytes().fold(0u64, |h, b| mix(h ^ u64::from(b))));
                Ok(Some(faults))
            }
            _ => Ok(None),
        }
    }
}

/// The kinds of transient fault.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    /// Refused before anything happened (HTTP 503).
    Unavailable,
    /// The operation took effect, then the connection dropped before the answer.
    Reset,
    /// The answer comes late.
    Slow,
    /// A download or listing stops part way.
    Cut,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Self::Unavailable => "503",
            Self::Reset => "reset",
            Self::Slow => "slow",
            Self::Cut => "cut",
        }
    }
}

/// The kinds that make sense for an operation.
const WRITE: &[Kind] = &[Kind::Unavailable, Kind::Reset, Kind::Slow];
const READ: &[Kind] = &[Kind::Unavailable, Kind::Slow];
const STREAM: &[Kind] = &[Kind::Unavailable, Kind::Slow, Kind::Cut];

/// Decides and records faults; shared by a store and the uploads it starts.
#[derive(Debug)]
struct Injector {
    faults: Faults,
    rng: Mutex<u64>,
    injected: AtomicU64,
}

impl Injector {
    fn uniform(&self) -> f64 {
        let mut state = self.rng.lock().expect("the fault rng lock is never poisoned");
        *state = mix(*state);
        (*state >> 11) as f64 / (1u64 << 53) as f64
    }

    fn roll(&self, op: &str, key: &str, kinds: &[Kind]) -> Option<Kind> {
        if self.in_outage(key) {
            self.record("outage", op, key);
            return Some(Kind::Unavailable);
        }
        if self.faults.rate <= 0.0 || self.uniform() >= self.faults.rate {
            return None;
        }
        let kind = kinds[((self.uniform() * kinds.len() as f64) as usize).min(kinds.len() - 1)];
        self.record(kind.name(), op, key);
        Some(kind)
    }

    /// Whether an operation on `key` falls in the outage: the key matches and the log holds fewer
    /// refusals than the outage lasts. (Processes that run at once may together refuse a few more.)
    fn in_outage(&self, key: &str) -> bool {
        let (Some((text, ops)), Some(log)) = (&self.faults.outage, &self.faults.log) else {
            return false;
        };
        if !key.contains(text.as_str()) {
            return false;
        }
        let refused =
            std::fs::read_to_string(log).map_or(0, |l| l.lines().filter(|l| l.starts_with("outage ")).count());
        (refused as u64) < *ops
    }

    fn record(&self, kind: &str, op: &str, key: &str) {
        self.injected.fetch_add(1, Ordering::Relaxed);
        if let Some(path) = &self.faults.log {
            // One write per line on an O_APPEND file: lines from many processes do not interleave.
            let line = format!("{kind} {op} {key}\n");
            if let Ok(mut f) = std::fs::OpenOptions::new().create(true).append(true).open(path) {
                let _ = f.write_all(line.as_bytes());
            }
        }
    }

    /// The permanent failure of a write (or, for `readonly`, a delete) of `key`, if one is configured.
    fn permanent(&self, op: &str, key: &str, delete: bool) -> Option<object_store::Error> {
        use std::io::{Error, ErrorKind};
        let hit = |list: &[String]| list.iter().any(|p| key.contains(p.as_str()));
        let error = if !delete && hit(&self.faults.full) {
            Error::new(ErrorKind::StorageFull, "No space left on device (os error 28, injected)")
        } else if hit(&self.faults.readonly) {
            Error::new(ErrorKind::ReadOnlyFilesystem, "Read-only file system (os error 30, injected)")
        } else {
            return None;
        };
        self.record(if error.kind() == ErrorKind::StorageFull { "full" } else { "readonly" }, op, key);
        Some(object_store::Error::Generic { store: "fault-injection", source: Box::new(error) })
    }

    async fn pause(&self) {
        tokio::time::sleep(self.faults.delay.mul_f64(self.uniform())).await;
    }

    /// Runs a write of `key` with a rolled fault around it: refused before, lost after, or slow.
    async fn write<T>(
        &self,
        op: &str,
        key: &str,
        run: impl Future<Output = object_store::Result<T>>,
    ) -> object_store::Result<T> {
        if let Some(e) = self.permanent(op, key, false) {
            return Err(e);
        }
        match self.roll(op, key, WRITE) {
            Some(Kind::Unavailable) => Err(transient(Kind::Unavailable, op, key)),
            Some(Kind::Reset) => {
                run.await?;
                Err(transient(Kind::Reset, op, key))
            }
            Some(_) => {
                self.pause().await;
                run.await
            }
            None => run.await,
        }
    }
}

fn transient(kind: Kind, op: &str, key: &str) -> object_store::Error {
    use std::io::{Error, ErrorKind};
    let error = match kind {
        Kind::Unavailable => Error::other(format!("503 Service Unavailable (injected) on {op} {key}")),
        _ => Error::new(ErrorKind::ConnectionReset, format!("connection reset by peer (injected) on {op} {key}")),
    };
    object_store::Error::Generic { store: "fault-injection", source: Box::new(error) }
}

/// A store that injects [`Faults`] into every operation of the store it wraps.
pub struct FaultyStore {
    inner: Arc<dyn ObjectStore>,
    multipart: Option<Arc<dyn MultipartStore>>,
    injector: Arc<Injector>,
}

impl fmt::Debug for FaultyStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FaultyStore").field("inner", &self.inner).field("faults", &self.injector.faults).finish()
    }
}

impl fmt::Display for FaultyStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "FaultyStore({})", self.inner)
    }
}

impl FaultyStore {
    /// Wraps a store and, if it has one, its multipart interface.
    pub fn new(inner: Arc<dyn ObjectStore>, multipart: Option<Arc<dyn MultipartStore>>, faults: Faults) -> Self {
        let seed = mix(faults.seed);
        Self {
            inner,
            multipart,
            injector: Arc::new(Injector { faults, rng: Mutex::new(seed), injected: AtomicU64::new(0) }),
        }
    }

    /// Faults injected so far, permanent ones included.
    pub fn injected(&self) -> u64 {
        self.injector.injected.load(Ordering::Relaxed)
    }

    fn multipart(&self) -> object_store::Result<&Arc<dyn MultipartStore>> {
        self.multipart.as_ref().ok_or_else(|| object_store::Error::NotSupported {
            source: format!("{} has no multipart interface", self.inner).into(),
        })
    }

    /// Runs a read with a rolled fault (refused or slow) in front of it.
    async fn read<T>(
        &self,
        op: &str,
        key: &str,
        run: impl Future<Output = object_store::Result<T>>,
    ) -> object_store::Result<T> {
        match self.injector.roll(op, key, READ) {
            Some(Kind::Unavailable) => Err(transient(Kind::Unavailable, op, key)),
            Some(_) => {
                self.injector.pause().await;
                run.await
            }
            None => run.await,
        }
    }
}

/// A stream that ends with a connection reset after `keep` items.
fn cut<T: Send + 'static>(
    stream: BoxStream<'static, object_store::Result<T>>,
    keep: usize,
    op: &'static str,
    key: String,
) -> BoxStream<'static, object_store::Result<T>> {
    stream.take(keep).chain(futures::stream::once(async move { Err(transient(Kind::Reset, op, &key)) })).boxed()
}

#[async_trait]
impl ObjectStore for FaultyStore {
    async fn put_opts(
        &self,
        location: &Path,
        payload: PutPayload,
        opts: PutOptions,
    ) -> object_store::Result<PutResult> {
        self.injector.write("put", location.as_ref(), self.inner.put_opts(location, payload, opts)).await
    }

    async fn put_multipart_opts(
        &self,
        location: &Path,
        opts: PutMultipartOptions,
    ) -> object_store::Result<Box<dyn MultipartUpload>> {
        if let Some(e) = self.injector.permanent("put-multipart", location.as_ref(), false) {
            return Err(e);
        }
        let inner =
            self.read("put-multipart", location.as_ref(), self.inner.put_multipart_opts(location, opts)).await?;
        Ok(Box::new(FaultyUpload { inner, key: location.to_string(), injector: Arc::clone(&self.injector) }))
    }

    async fn get_opts(&self, location: &Path, options: GetOptions) -> object_store::Result<GetResult> {
        let key = location.to_string();
        let kinds = if options.head { READ } else { STREAM };
        match self.injector.roll("get", &key, kinds) {
            Some(Kind::Unavailable) => Err(transient(Kind::Unavailable, "get", &key)),
            Some(Kind::Cut) => {
                let mut result = self.inner.get_opts(location, options).await?;
                let (meta, range, attributes) = (result.meta.clone(), result.range.clone(), result.attributes.clone());
                let extensions = std::mem::take(&mut result.extensions);
                // Cut after a whole number of chunks, possibly none.
                let chunks = (range.end - range.start).div_ceil(64 * 1024) as usize;
                let keep = (self.injector.uniform() * chunks as f64) as usize;
                let stream = cut(rechunk(result.into_stream()), keep, "get", key);
                Ok(GetResult { payload: GetResultPayload::Stream(stream), meta, range, attributes, extensions })
            }
            Some(_) => {
                self.injector.pause().await;
                self.inner.get_opts(location, options).await
            }
            None => self.inner.get_opts(location, options).await,
        }
    }

    async fn get_ranges(&self, location: &Path, ranges: &[std::ops::Range<u64>]) -> object_store::Result<Vec<Bytes>> {
        self.read("get-ranges", location.as_ref(), self.inner.get_ranges(location, ranges)).await
    }

    fn delete_stream(
        &self,
        locations: BoxStream<'static, object_store::Result<Path>>,
    ) -> BoxStream<'static, object_store::Result<Path>> {
        let (inner, injector) = (Arc::clone(&self.inner), Arc::clone(&self.injector));
        locations
            .then(move |location| {
                let (inner, injector) = (Arc::clone(&inner), Arc::clone(&injector));
                async move {
                    let location = location?;
                    let key = location.to_string();
                    if let Some(e) = injector.permanent("delete", &key, true) {
                        return Err(e);
                    }
                    let kind = injector.roll("delete", &key, WRITE);
                    if kind == Some(Kind::Unavailable) {
                        return Err(transient(Kind::Unavailable, "delete", &key));
                    }
                    if kind == Some(Kind::Slow) {
                        injector.pause().await;
                    }
                    let one = futures::stream::once(async move { Ok(location) }).boxed();
                    let deleted = inner.delete_stream(one).next().await.unwrap_or_else(|| {
                        Err(object_store::Error::Generic {
                            store: "fault-injection",
                            source: "no delete result".into(),
                        })
                    })?;
                    if kind == Some(Kind::Reset) {
                        return Err(transient(Kind::Reset, "delete", &key));
                    }
                    Ok(deleted)
                }
            })
            .boxed()
    }

    fn list(&self, prefix: Option<&Path>) -> BoxStream<'static, object_store::Result<ObjectMeta>> {
        let key = prefix.map(ToString::to_string).unwrap_or_default();
        match self.injector.roll("list", &key, &[Kind::Unavailable, Kind::Cut]) {
            Some(Kind::Unavailable) => {
                futures::stream::once(async move { Err(transient(Kind::Unavailable, "list", &key)) }).boxed()
            }
            Some(_) => {
                let keep = (self.injector.uniform() * 8.0) as usize;
                cut(self.inner.list(prefix), keep, "list", key)
            }
            None => self.inner.list(prefix),
        }
    }

    async fn list_with_delimiter(&self, prefix: Option<&Path>) -> object_store::Result<ListResult> {
        let key = prefix.map(ToString::to_string).unwrap_or_default();
        self.read("list", &key, self.inner.list_with_delimiter(prefix)).await
    }

    async fn copy_opts(&self, from: &Path, to: &Path, options: CopyOptions) -> object_store::Result<()> {
        self.injector.write("copy", to.as_ref(), self.inner.copy_opts(from, to, options)).await
    }

    async fn rename_opts(&self, from: &Path, to: &Path, options: RenameOptions) -> object_store::Result<()> {
        if let Some(e) = self.injector.permanent("rename", from.as_ref(), true) {
            return Err(e);
        }
        self.injector.write("rename", to.as_ref(), self.inner.rename_opts(from, to, options)).await
    }
}

/// Splits a byte stream into chunks of at most 64 KiB, so that a cut can land inside a small file.
fn rechunk(stream: BoxStream<'static, object_store::Result<Bytes>>) -> BoxStream<'static, object_store::Result<Bytes>> {
    stream
        .flat_map(|chunk| {
            let pieces: Vec<object_store::Result<Bytes>> = match chunk {
                Ok(bytes) => (0..bytes.len().div_ceil(64 * 1024))
                    .map(|i| Ok(bytes.slice(i * 64 * 1024..((i + 1) * 64 * 1024).min(bytes.len()))))
                    .collect(),
                Err(e) => vec![Err(e)],
            };
            futures::stream::iter(pieces)
        })
        .boxed()
}

#[async_trait]
impl MultipartStore for FaultyStore {
    async fn create_multipart(&self, path: &Path) -> object_store::Result<MultipartId> {
        let multipart = self.multipart()?;
        self.injector.write("create-multipart", path.as_ref(), multipart.create_multipart(path)).await
    }

    async fn put_part(
        &self,
        path: &Path,
        id: &MultipartId,
        part_idx: usize,
        data: PutPayload,
    ) -> object_store::Result<PartId> {
        let multipart = self.multipart()?;
        self.injector.write("put-part", path.as_ref(), multipart.put_part(path, id, part_idx, data)).await
    }

    async fn complete_multipart(
        &self,
        path: &Path,
        id: &MultipartId,
        parts: Vec<PartId>,
    ) -> object_store::Result<PutResult> {
        let multipart = self.multipart()?;
        self.injector.write("complete-multipart", path.as_ref(), multipart.complete_multipart(path, id, parts)).await
    }

    async fn abort_multipart(&self, path: &Path, id: &MultipartId) -> object_store::Result<()> {
        self.multipart()?.abort_multipart(path, id).await
    }
}

/// A streaming upload whose parts and completion meet faults; a lost part fails the upload, which
/// the caller must start again.
#[derive(Debug)]
struct FaultyUpload {
    inner: Box<dyn MultipartUpload>,
    key: String,
    injector: Arc<Injector>,
}

#[async_trait]
impl MultipartUpload for FaultyUpload {
    fn put_part(&mut self, data: PutPayload) -> UploadPart {
        if let Some(e) = self.injector.permanent("put-part", &self.key, false) {
            return futures::future::ready(Err(e)).boxed();
        }
        let key = self.key.clone();
        match self.injector.roll("put-part", &key, WRITE) {
            Some(Kind::Unavailable) => {
                futures::future::ready(Err(transient(Kind::Unavailable, "put-part", &key))).boxed()
            }
            Some(Kind::Reset) => {
                let part = self.inner.put_part(data);
                async move {
                    part.await?;
                    Err(transient(Kind::Reset, "put-part", &key))
                }
                .boxed()
            }
            Some(_) => {
                let part = self.inner.put_part(data);
                let wait = self.injector.faults.delay.mul_f64(self.injector.uniform());
                async move {
                    tokio::time::sleep(wait).await;
                    part.await
                }
                .boxed()
            }
            None => self.inner.put_part(data),
        }
    }

    async fn complete(&mut self) -> object_store::Result<PutResult> {
        self.injector.write("complete", &self.key, self.inner.complete()).await
    }

    async fn abort(&mut self) -> object_store::Result<()> {
        self.inner.abort().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_parse_and_bad_ones_name_the_key() {
        let f = Faults::parse("rate=0.05, seed=7,delay-ms=3,log=/tmp/x,full=ckpt/,full=shards/,readonly=eval").unwrap();
        assert_eq!(f.rate, 0.05);
        assert_eq!(f.seed, 7);
        assert_eq!(f.delay, Duration::from_millis(3));
        assert_eq!(f.log, Some(PathBuf::from("/tmp/x")));
        assert_eq!(f.full, ["ckpt/", "shards/"]);
        assert_eq!(f.readonly, ["eval"]);
        assert!(Faults::parse("rate=2").unwrap_err().contains("between 0 and 1"));
        assert!(Faults::parse("rate=x").unwrap_err().contains("rate=\"x\""));
        assert!(Faults::parse("often=1").unwrap_err().contains("\"often\""));
        assert!(Faults::parse("rate").unwrap_err().contains("key=value"));
        let f = Faults::parse("outage=9@tokenize/,log=/tmp/x").unwrap();
        assert_eq!(f.outage, Some(("tokenize/".into(), 9)));
        assert!(Faults::parse("outage=9@tokenize/").unwrap_err().contains("needs log="));
        assert!(Faults::parse("outage=tokenize/,log=/tmp/x").unwrap_err().contains("OPS@TEXT"));
    }

    #[tokio::test]
    async fn an_outage_refuses_its_keys_until_the_log_counts_enough_refusals_in_all_processes() {
        use object_store::ObjectStoreExt as _;
        let tmp = tempfile::tempdir().unwrap();
        let log = tmp.path().join("faults.log");
        let faults = Faults::parse(&format!("outage=3@down/,log={}", log.display())).unwrap();
        let memory: Arc<dyn ObjectStore> = Arc::new(object_store::memory::InMemory::new());
        let (down, up) = (Path::from("down/a"), Path::from("up/a"));
        memory.put(&down, PutPayload::from_static(b"x")).await.unwrap();
        memory.put(&up, PutPayload::from_static(b"y")).await.unwrap();
        // Two processes of the run: each opens its own store; the outage is counted in the log.
        let first = FaultyStore::new(Arc::clone(&memory), None, faults.clone());
        let second = FaultyStore::new(memory, None, faults);
        assert!(first.get(&up).await.is_ok(), "other keys are served");
        for store in [&first, &first, &second] {
            let e = store.get(&down).await.unwrap_err();
            assert!(crate::retry::is_transient(&e) && e.to_string().contains("503"), "{e}");
        }
        assert!(second.get(&down).await.is_ok() && first.get(&down).await.is_ok(), "the outage is over");
        assert_eq!(
            std::fs::read_to_string(&log).unwrap().lines().filter(|l| l.starts_with("outage get down/a")).count(),
            3
        );
    }
}
