//! Uploads that survive a failing store: in parts, each retried on its own, where the store has a
//! part-by-part interface (S3, GCS, Azure, memory); from a local file sent again whole elsewhere.
//! An object appears only once every byte of it is stored.

use std::fmt;
use std::io::Write as _;
use std::sync::Arc;

use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use object_store::multipart::{MultipartStore, PartId};
use object_store::path::Path;
use object_store::{MultipartId, ObjectStoreExt, PutPayload};
use sha2::{Digest, Sha256};
use tokio::io::AsyncReadExt;

use crate::{Error, FileEntry, Result, Store, retry};

/// Size of one part of an upload (S3 wants at least 5 MiB for all but the last).
pub const PART_SIZE: usize = 8 << 20;

/// Parts of one upload from memory that are sent at once ([`put_chunks`]).
pub const PARTS_IN_FLIGHT: usize = 8;

/// A streaming upload that hashes what it writes.
pub struct FileWriter {
    store: Store,
    key: Path,
    name: String,
    hasher: Sha256,
    size: u64,
    /// Bytes not yet sent (less than a part).
    buf: Vec<u8>,
    sink: Sink,
}

enum Sink {
    /// Nothing sent yet: a file smaller than a part goes up in one request at the end.
    Pending,
    /// A multipart upload; each part is sent, and retried, on its own.
    Parts { multipart: Arc<dyn MultipartStore>, id: MultipartId, parts: Vec<PartId> },
    /// A store without a part-by-part interface (local files): the bytes wait in a local file and
    /// are sent whole at the end, again from the start after a failure.
    Spool { file: std::fs::File, path: tempfile::TempPath },
}

impl fmt::Debug for FileWriter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FileWriter").field("key", &self.key).field("size", &self.size).finish()
    }
}

impl FileWriter {
    pub(crate) fn new(store: Store, key: Path, name: &str) -> Self {
        Self { store, key, name: name.into(), hasher: Sha256::new(), size: 0, buf: Vec::new(), sink: Sink::Pending }
    }

    /// Appends bytes; a full part is sent at once.
    pub async fn write(&mut self, bytes: &[u8]) -> Result<()> {
        self.hasher.update(bytes);
        self.size += bytes.len() as u64;
        self.buf.extend_from_slice(bytes);
        while self.buf.len() >= PART_SIZE {
            let rest = self.buf.split_off(PART_SIZE);
            let part = Bytes::from(std::mem::replace(&mut self.buf, rest));
            self.send(part).await?;
        }
        Ok(())
    }

    async fn send(&mut self, part: Bytes) -> Result<()> {
        let (store, key) = (&self.store, &self.key);
        if matches!(self.sink, Sink::Pending) {
            self.sink = match &store.multipart {
                Some(multipart) => {
                    let m = &**multipart;
                    let id = store
                        .retry
                        .run("create upload", key, move || m.create_multipart(key))
                        .await
                        .map_err(|e| store.object_error(key, e))?;
                    Sink::Parts { multipart: Arc::clone(multipart), id, parts: Vec::new() }
                }
                None => {
                    let (file, path) =
                        tempfile::NamedTempFile::new().map_err(|e| spool_error(store, key, &e))?.into_parts();
                    Sink::Spool { file, path }
                }
            };
        }
        match &mut self.sink {
            Sink::Pending => unreachable!("a sink was chosen above"),
            Sink::Parts { multipart, id, parts } => {
                let (m, id, index) = (&**multipart, &*id, parts.len());
                let upload = move || m.put_part(key, id, index, PutPayload::from_bytes(part.clone()));
                let part_id = store
                    .retry
                    .run(&format!("put part {index} of"), key, upload)
                    .await
                    .map_err(|e| store.object_error(key, e))?;
                parts.push(part_id);
            }
            Sink::Spool { file, .. } => file.write_all(&part).map_err(|e| spool_error(store, key, &e))?,
        }
        Ok(())
    }

    /// Completes the upload; the object becomes visible only now.
    pub async fn finish(mut self) -> Result<FileEntry> {
        if !matches!(self.sink, Sink::Pending) && !self.buf.is_empty() {
            let last = Bytes::from(std::mem::take(&mut self.buf));
            self.send(last).await?;
        }
        let (store, key) = (&self.store, &self.key);
        match std::mem::replace(&mut self.sink, Sink::Pending) {
            Sink::Pending => store.put(key, Bytes::from(std::mem::take(&mut self.buf))).await?,
            Sink::Parts { multipart, id, parts } => complete(store, key, &*multipart, &id, parts, self.size).await?,
            Sink::Spool { mut file, path } => {
                file.flush().map_err(|e| spool_error(store, key, &e))?;
                drop(file);
                upload_whole(store, key, &path, self.size).await?;
            }
        }
        let sha256 = hex::encode(std::mem::take(&mut self.hasher).finalize());
        Ok(FileEntry { path: std::mem::take(&mut self.name), size: self.size, sha256 })
    }

    /// Abandons the upload, leaving no object behind.
    pub async fn abort(mut self) -> Result<()> {
        if let Sink::Parts { multipart, id, .. } = std::mem::replace(&mut self.sink, Sink::Pending) {
            let (m, key, id) = (&*multipart, &self.key, &id);
            self.store
                .retry
                .run("abort upload", key, move || m.abort_multipart(key, id))
                .await
                .map_err(|e| self.store.object_error(key, e))?;
        }
        Ok(())
    }
}

/// Completes multipart upload `id` of `size` bytes from `parts`; a failure aborts it.
async fn complete(
    store: &Store,
    key: &Path,
    multipart: &dyn MultipartStore,
    id: &MultipartId,
    parts: Vec<PartId>,
    size: u64,
) -> Result<()> {
    let complete = || {
        let parts = parts.clone();
        async move {
            match multipart.complete_multipart(key, id, parts).await {
                Ok(_) => Ok(()),
                // An earlier try that took effect before its answer was lost leaves nothing to
                // complete: the object is there, whole.
                Err(e) => match store.inner.head(key).await {
                    Ok(meta) if meta.size == size && !retry::is_transient(&e) => Ok(()),
                    _ => Err(e),
                },
            }
        }
    };
    if let Err(e) = store.retry.run("complete upload", key, complete).await {
        let _ = multipart.abort_multipart(key, id).await;
        return Err(store.object_error(key, e));
    }
    Ok(())
}

/// Uploads an object held in memory as `chunks` (its bytes in order) to `key`, returning its commit
/// entry under `name`. The chunks are hashed on a blocking thread while the upload runs, in parts of
/// [`PART_SIZE`] made of slices of the chunks (nothing is copied), [`PARTS_IN_FLIGHT`] at a time.
/// Where the store uploads part by part, a failed part is sent again on its own; elsewhere (local
/// files) a failure sends the object again whole, from memory.
pub(crate) async fn put_chunks(store: &Store, key: &Path, name: &str, chunks: Vec<Bytes>) -> Result<FileEntry> {
    let size: u64 = chunks.iter().map(|c| c.len() as u64).sum();
    let hashing = {
        let chunks = chunks.clone();
        tokio::task::spawn_blocking(move || {
            let mut hasher = Sha256::new();
            chunks.iter().for_each(|c| hasher.update(c));
            hex::encode(hasher.finalize())
        })
    };
    let parts = split_parts(chunks, PART_SIZE);
    let uploaded = match (&store.multipart, parts.len()) {
        (_, 0 | 1) => {
            let payload: PutPayload = parts.into_iter().flatten().collect();
            let write = || store.inner.put(key, payload.clone());
            store.retry.run("put", key, write).await.map(drop).map_err(|e| store.object_error(key, e))
        }
        (Some(multipart), _) => put_parts(store, key, &**multipart, parts, size).await,
        (None, _) => {
            let once = || put_streaming(store, key, &parts);
            store.retry.run("upload", key, once).await.map_err(|e| store.object_error(key, e))
        }
    };
    let sha256 = hashing.await.expect("hashing does not panic");
    uploaded?;
    Ok(FileEntry { path: name.into(), size, sha256 })
}

/// `chunks` regrouped into parts of `part_size` bytes (the last one shorter), by slicing.
fn split_parts(chunks: Vec<Bytes>, part_size: usize) -> Vec<Vec<Bytes>> {
    let (mut parts, mut part, mut filled) = (Vec::new(), Vec::new(), 0);
    for mut chunk in chunks {
        while !chunk.is_empty() {
            let take = chunk.len().min(part_size - filled);
            part.push(chunk.split_to(take));
            filled += take;
            if filled == part_size {
                parts.push(std::mem::take(&mut part));
                filled = 0;
            }
        }
    }
    if !part.is_empty() {
        parts.push(part);
    }
    parts
}

/// Sends `parts` through the store's part-by-part interface, several at once, each retried alone.
async fn put_parts(
    store: &Store,
    key: &Path,
    multipart: &dyn MultipartStore,
    parts: Vec<Vec<Bytes>>,
    size: u64,
) -> Result<()> {
    let create = || multipart.create_multipart(key);
    let id = store.retry.run("create upload", key, create).await.map_err(|e| store.object_error(key, e))?;
    let id_ref = &id;
    let sent: std::result::Result<Vec<PartId>, object_store::Error> =
        futures::stream::iter(parts.into_iter().enumerate())
            .map(|(index, part)| {
                let payload: PutPayload = part.into_iter().collect();
                let upload = move || multipart.put_part(key, id_ref, index, payload.clone());
                async move { store.retry.run(&format!("put part {index} of"), key, upload).await }
            })
            .buffered(PARTS_IN_FLIGHT)
            .try_collect()
            .await;
    match sent {
        Ok(ids) => complete(store, key, multipart, &id, ids, size).await,
        Err(e) => {
            let _ = multipart.abort_multipart(key, &id).await;
            Err(store.object_error(key, e))
        }
    }
}

/// One try at sending `parts` through the store's streaming interface, several at once; a failure
/// aborts the upload.
async fn put_streaming(store: &Store, key: &Path, parts: &[Vec<Bytes>]) -> object_store::Result<()> {
    let mut upload = store.inner.put_multipart(key).await?;
    let sends: Vec<_> = parts.iter().map(|part| upload.put_part(part.iter().cloned().collect())).collect();
    let sent = futures::stream::iter(sends).buffered(PARTS_IN_FLIGHT).try_collect::<Vec<()>>().await;
    let result = match sent {
        Ok(_) => upload.complete().await.map(drop),
        Err(e) => Err(e),
    };
    if result.is_err() {
        let _ = upload.abort().await;
    }
    result
}

fn spool_error(store: &Store, key: &Path, e: &std::io::Error) -> Error {
    Error::Corrupt {
        store: store.url.clone(),
        key: key.to_string(),
        reason: format!("cannot spool the upload locally: {e}"),
    }
}

/// Uploads `local` (of `size` bytes) to `key` through the store's streaming interface; a failure
/// aborts that upload and the next try starts over from the file's first byte.
async fn upload_whole(store: &Store, key: &Path, local: &std::path::Path, size: u64) -> Result<()> {
    let generic = |e: std::io::Error| object_store::Error::Generic { store: "local file", source: Box::new(e) };
    if size <= PART_SIZE as u64 {
        let bytes = tokio::fs::read(local).await.map_err(|e| store.object_error(key, generic(e)))?;
        return store.put(key, Bytes::from(bytes)).await;
    }
    let once = || async {
        let mut upload = store.inner.put_multipart(key).await?;
        let result = async {
            let mut file = tokio::fs::File::open(local).await.map_err(generic)?;
            loop {
                let mut part = Vec::with_capacity(PART_SIZE);
                (&mut file).take(PART_SIZE as u64).read_to_end(&mut part).await.map_err(generic)?;
                if part.is_empty() {
                    break;
                }
                upload.put_part(PutPayload::from(part)).await?;
            }
            upload.complete().await
        }
        .await;
        if result.is_err() {
            let _ = upload.abort().await;
        }
        result.map(drop)
    };
    store.retry.run("upload", key, once).await.map_err(|e| store.object_error(key, e))
}

/// Uploads a local file as `name` (at `key`), returning its commit entry.
pub(crate) async fn put_file(store: &Store, key: Path, name: &str, local: &std::path::Path) -> Result<FileEntry> {
    let read_error = |e: std::io::Error| Error::Corrupt {
        store: store.url.clone(),
        key: key.to_string(),
        reason: format!("cannot read {}: {e}", local.display()),
    };
    let mut file = tokio::fs::File::open(local).await.map_err(read_error)?;
    let mut buf = vec![0u8; 1 << 20];
    if store.multipart.is_some() {
        let mut writer = FileWriter::new(store.clone(), key.clone(), name);
        loop {
            let n = file.read(&mut buf).await.map_err(read_error)?;
            if n == 0 {
                break;
            }
            if let Err(e) = writer.write(&buf[..n]).await {
                let _ = writer.abort().await;
                return Err(e);
            }
        }
        return writer.finish().await;
    }
    // The file itself is the spool: hash it, then send it.
    let (mut hasher, mut size) = (Sha256::new(), 0u64);
    loop {
        let n = file.read(&mut buf).await.map_err(read_error)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        size += n as u64;
    }
    upload_whole(store, &key, local, size).await?;
    Ok(FileEntry { path: name.into(), size, sha256: hex::encode(hasher.finalize()) })
}
