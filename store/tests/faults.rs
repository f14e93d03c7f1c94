//! The store against a failing backend: injected 503s, resets after the write took effect, slow
//! answers, cut downloads and listings, lost upload parts, and an in-process S3 server that fails
//! requests. Everything written reads back byte for byte; a full disk fails at once and commits
//! nothing.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use pretrain_crd::Stage;
use pretrain_store::{Faults, PART_SIZE, Retry, SUCCESS_FILE, Store, key};

/// Quick retries, and enough of them that a 20% fault rate never exhausts them.
const PATIENT: Retry = Retry { attempts: 16, base: Duration::from_millis(1), cap: Duration::from_millis(4) };

/// Bytes that differ at every offset, so a resumed download at the wrong byte cannot pass.
fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn sha256(bytes: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(bytes))
}

/// Writes, reads back, lists, commits, verifies and deletes through `store`.
async fn drill(store: &Store) {
    let dir = store.stage("run", Stage::Tokenize).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let mut files = Vec::new();
    for i in 0..20u64 {
        files.push(
            dir.put(&format!("small/{i:02}.json"), Bytes::from(pattern(1000 + i as usize * 37, i))).await.unwrap(),
        );
    }
    // Three parts from a local file, and a streamed file of two parts and a bit.
    let big = pattern(2 * PART_SIZE + 12_345, 99);
    std::fs::write(tmp.path().join("big"), &big).unwrap();
    files.push(dir.put_file("shards/big.tok", &tmp.path().join("big")).await.unwrap());
    let streamed = pattern(2 * PART_SIZE + 777, 7);
    let mut writer = dir.writer("shards/streamed.tok").unwrap();
    for chunk in streamed.chunks(1 << 20) {
        writer.write(chunk).await.unwrap();
    }
    files.push(writer.finish().await.unwrap());
    // From memory in parallel parts: chunks that straddle part boundaries, and a one-part object.
    let chunked = pattern(3 * PART_SIZE + 4_321, 5);
    let cuts = [0, 100, PART_SIZE - 1, PART_SIZE + 7, 2 * PART_SIZE + 9_999, chunked.len()];
    let chunks = cuts.windows(2).map(|w| Bytes::copy_from_slice(&chunked[w[0]..w[1]])).collect();
    let entry = dir.put_chunks("shards/chunked.tok", chunks).await.unwrap();
    assert_eq!((entry.size, entry.sha256.as_str()), (chunked.len() as u64, sha256(&chunked).as_str()));
    files.push(entry);
    let small = pattern(1_000, 3);
    let chunks = vec![Bytes::copy_from_slice(&small[..10]), Bytes::copy_from_slice(&small[10..])];
    files.push(dir.put_chunks("small/chunked.json", chunks).await.unwrap());

    for i in 0..20u64 {
        assert_eq!(dir.get(&format!("small/{i:02}.json")).await.unwrap(), pattern(1000 + i as usize * 37, i));
    }
    assert_eq!(dir.get("small/chunked.json").await.unwrap(), small);
    // Read back in parallel ranges, hashed as they arrive.
    let (read, sha) = store.read_hashed(&dir.key("shards/chunked.tok").unwrap(), chunked.len() as u64).await.unwrap();
    assert!(read == chunked, "chunked.tok differs when read in ranges");
    assert_eq!(sha, sha256(&chunked));
    assert!(store.read_hashed(&dir.key("shards/chunked.tok").unwrap(), chunked.len() as u64 - 1).await.is_err());
    for (name, expected) in [("big.tok", &big), ("streamed.tok", &streamed), ("chunked.tok", &chunked)] {
        let local = tmp.path().join(format!("{name}.down"));
        let n = store.download(&dir.key(&format!("shards/{name}")).unwrap(), &local).await.unwrap();
        assert_eq!(n as usize, expected.len());
        assert!(std::fs::read(&local).unwrap() == *expected, "{name} differs after download");
    }
    assert_eq!(store.list(dir.prefix()).await.unwrap().len(), 24);
    let commit = dir.commit("hash", files, serde_json::json!({})).await.unwrap();
    dir.verify(&commit).await.unwrap();
    assert_eq!(dir.committed("hash").await.unwrap(), Some(commit));
    assert_eq!(store.delete_prefix(dir.prefix()).await.unwrap(), 25);
    assert!(store.list(dir.prefix()).await.unwrap().is_empty());
}

#[tokio::test]
async fn uploads_in_parts_survive_a_fifth_of_all_operations_failing() {
    // memory:// uploads part by part: a lost part is sent again on its own.
    let faults = Faults { rate: 0.2, seed: 1, delay: Duration::from_millis(2), ..Faults::default() };
    let (store, faulty) = Store::open("memory://").unwrap().with_retry(PATIENT).with_faults(faults);
    drill(&store).await;
    assert!(faulty.injected() >= 5, "only {} faults injected", faulty.injected());
}

#[tokio::test]
async fn local_uploads_survive_a_fifth_of_all_operations_failing() {
    // file:// has no part interface: a failed upload is sent again whole from the local file.
    let root = tempfile::tempdir().unwrap();
    let log = root.path().join("faults.log");
    let faults =
        Faults { rate: 0.2, seed: 2, delay: Duration::from_millis(2), log: Some(log.clone()), ..Faults::default() };
    let url = format!("file://{}", root.path().join("store").display());
    let (store, faulty) = Store::open(&url).unwrap().with_retry(PATIENT).with_faults(faults);
    drill(&store).await;
    let logged = std::fs::read_to_string(&log).unwrap();
    assert_eq!(logged.lines().count() as u64, faulty.injected());
    assert!(logged.lines().all(|l| l.split(' ').count() == 3), "{logged}");
    // No upload left behind half-written: the store directory holds no staging files.
    let leftovers: Vec<_> = walk(&root.path().join("store"));
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        if entry.path().is_dir() {
            found.extend(walk(&entry.path()));
        } else {
            found.push(entry.path());
        }
    }
    found
}

#[tokio::test]
async fn a_full_disk_fails_without_retrying_and_commits_nothing() {
    let faults = Faults { full: vec!["shards/".into()], ..Faults::default() };
    let (store, faulty) = Store::open("memory://").unwrap().with_faults(faults);
    let dir = store.stage("run", Stage::Tokenize).unwrap();
    let ok = dir.put("meta.json", Bytes::from_static(b"{}")).await.unwrap();
    let err = dir.put("shards/00000.tok", Bytes::from(pattern(100, 1))).await.unwrap_err().to_string();
    assert!(err.contains("run/tokenize/shards/00000.tok") && err.contains("No space left on device"), "{err}");
    assert_eq!(faulty.injected(), 1, "a full disk is not retried");
    let tmp = tempfile::tempdir().unwrap();
    std::fs::write(tmp.path().join("big"), pattern(PART_SIZE + 1, 3)).unwrap();
    assert!(dir.put_file("shards/00001.tok", &tmp.path().join("big")).await.is_err());
    // A commit naming a file that never arrived is refused; the stage stays uncommitted.
    let missing = pretrain_store::FileEntry { path: "shards/00000.tok".into(), size: 100, sha256: "0".repeat(64) };
    let err = dir.commit("hash", vec![ok, missing], serde_json::json!({})).await.unwrap_err().to_string();
    assert!(err.contains("expected 100 bytes before commit"), "{err}");
    assert_eq!(store.get_opt(&dir.key(SUCCESS_FILE).unwrap()).await.unwrap(), None);

    // A read-only store refuses writes and deletes alike.
    let faults = Faults { readonly: vec!["run/".into()], ..Faults::default() };
    let (store, _) = Store::open("memory://").unwrap().with_faults(faults);
    let err = store.put(&key("run/a").unwrap(), Bytes::new()).await.unwrap_err().to_string();
    assert!(err.contains("Read-only file system"), "{err}");
    assert!(store.delete(&key("run/a").unwrap()).await.is_err());
}

#[test]
fn the_environment_turns_faults_on_for_every_store_a_process_opens() {
    // Only this test touches the variable, in its own process (tests run as threads: the variable
    // is read at open, so no other test here opens a store while it is set).
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "env_child", "--nocapture", "--include-ignored"])
        .env(pretrain_store::ENV_FAULTS, "rate=1,seed=1")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "env_child", "--nocapture", "--include-ignored"])
        .env(pretrain_store::ENV_FAULTS, "rate=often")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
}

/// Run by the test above with the variable set.
#[tokio::test]
#[ignore = "run by the_environment_turns_faults_on_for_every_store_a_process_opens"]
async fn env_child() {
    let Ok(spec) = std::env::var(pretrain_store::ENV_FAULTS) else { return };
    match Store::open("memory://") {
        Err(e) => {
            assert_eq!(spec, "rate=often");
            assert!(e.to_string().contains("PRETRAIN_STORE_FAULTS: rate=\"often\""), "{e}");
        }
        Ok(store) => {
            // Every operation meets a fault (a slow answer still succeeds): without retries, puts fail
            // with the injected reason.
            let store = store.with_retry(Retry::NONE);
            let mut errors = Vec::new();
            for i in 0..20 {
                if let Err(e) = store.put(&key(&format!("k{i}")).unwrap(), Bytes::new()).await {
                    errors.push(e.to_string());
                }
            }
            assert!(errors.iter().any(|e| e.contains("(injected)")), "{errors:?}");
        }
    }
}

/// An S3 server (s3s-fs) behind a front that fails requests: the first upload part, the first
/// download and then a share of all requests get 503 or a dropped connection.
#[tokio::test]
async fn s3_uploads_and_downloads_survive_a_failing_server() {
    #[derive(Clone)]
    struct Flaky {
        inner: s3s::service::S3Service,
        state: Arc<AtomicU64>,
        failed: Arc<AtomicU64>,
        first_part: Arc<std::sync::atomic::AtomicBool>,
        first_get: Arc<std::sync::atomic::AtomicBool>,
    }
    impl hyper::service::Service<http::Request<hyper::body::Incoming>> for Flaky {
        type Response = http::Response<s3s::Body>;
        type Error = s3s::HttpError;
        type Future = futures::future::BoxFuture<'static, Result<Self::Response, Self::Error>>;
        fn call(&self, req: http::Request<hyper::body::Incoming>) -> Self::Future {
            let part = req.uri().query().is_some_and(|q| q.contains("partNumber="));
            let get = req.method() == http::Method::GET && req.uri().query().is_none();
            let forced = (part && !self.first_part.swap(true, Ordering::SeqCst))
                || (get && !self.first_get.swap(true, Ordering::SeqCst));
            let roll = {
                let x = self.state.fetch_add(0x9E37_79B9_7F4A_7C15, Ordering::SeqCst);
                let mut z = x ^ (x >> 31);
                z = z.wrapping_mul(0xBF58_476D_1CE4_E5B9);
                (z >> 40) % 100
            };
            if forced || roll < 8 {
                self.failed.fetch_add(1, Ordering::SeqCst);
                return Box::pin(async {
                    let body = "<Error><Code>ServiceUnavailable</Code><Message>injected</Message></Error>";
                    Ok(http::Response::builder().status(503).body(s3s::Body::from(body.to_string())).unwrap())
                });
            }
            if roll < 12 {
                // A dropped connection: hyper closes it without an answer.
                self.failed.fetch_add(1, Ordering::SeqCst);
                return Box::pin(async { Err(s3s::HttpError::new("injected reset".into())) });
            }
            hyper::service::Service::call(&self.inner, req)
        }
    }

    let root = tempfile::tempdir().unwrap();
    let failed = Arc::new(AtomicU64::new(0));
    let service = Flaky {
        inner: common::s3_service(root.path()),
        state: Arc::new(AtomicU64::new(5)),
        failed: Arc::clone(&failed),
        first_part: Arc::default(),
        first_get: Arc::default(),
    };
    let (endpoint, server) = common::serve(service).await;
    let options = common::options(&endpoint, common::SECRET_KEY);
    let store = Store::open_with("s3://bucket/drill", &options).unwrap().with_retry(PATIENT);
    drill(&store).await;
    assert!(failed.load(Ordering::SeqCst) >= 2, "{} requests failed", failed.load(Ordering::SeqCst));
    server.abort();
}
