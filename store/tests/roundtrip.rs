//! The store on every backend the tests can reach: local files, memory, and a real S3 protocol
//! server (s3s-fs) running in-process.

mod common;

use bytes::Bytes;
use pretrain_crd::Stage;
use pretrain_store::{Error, SUCCESS_FILE, Store, key};

/// Everything a stage does with its directory, on any backend.
async fn exercise(store: &Store) {
    let dir = store.stage("run-a", Stage::DataPrep).unwrap();
    assert_eq!(dir.prefix().as_ref(), "run-a/data-prep");
    assert!(dir.commit_record().await.unwrap().is_none(), "a fresh stage has no commit");

    let small = dir.put("shards/00000.jsonl", Bytes::from_static(b"{\"text\":\"hello\"}\n")).await.unwrap();
    assert_eq!(small.size, 17);
    assert_eq!(dir.get("shards/00000.jsonl").await.unwrap(), Bytes::from_static(b"{\"text\":\"hello\"}\n"));

    // Larger than one multipart part (object_store's BufWriter switches to multipart at 10 MiB).
    let mut writer = dir.writer("shards/00001.bin").unwrap();
    let chunk: Vec<u8> = (0..1 << 20).map(|i| (i % 251) as u8).collect();
    for _ in 0..12 {
        writer.write(&chunk).await.unwrap();
    }
    let big = writer.finish().await.unwrap();
    assert_eq!(big.size, 12 << 20);
    assert_eq!(dir.get("shards/00001.bin").await.unwrap().len(), 12 << 20);

    let commit =
        dir.commit("hash-1", vec![big.clone(), small.clone()], serde_json::json!({"documents": 1})).await.unwrap();
    assert_eq!(commit.files[0].path, "shards/00000.jsonl", "files are sorted");
    assert_eq!(dir.commit_record().await.unwrap().as_ref(), Some(&commit));
    assert!(dir.committed("hash-1").await.unwrap().is_some());
    assert!(dir.committed("hash-2").await.unwrap().is_none(), "another config is not done");
    dir.verify(&commit).await.unwrap();

    // Tampering is caught by verify.
    dir.put("shards/00000.jsonl", Bytes::from_static(b"{\"text\":\"HELLO\"}\n")).await.unwrap();
    let err = dir.verify(&commit).await.unwrap_err().to_string();
    assert!(err.contains("run-a/data-prep/shards/00000.jsonl"), "{err}");

    // A commit over a missing or short file is refused and leaves the old commit in place.
    let mut missing = small.clone();
    missing.path = "shards/nope.jsonl".into();
    let err = dir.commit("hash-3", vec![missing], serde_json::Value::Null).await.unwrap_err();
    assert!(matches!(err, Error::Corrupt { .. }), "{err}");
    let mut short = big.clone();
    short.size += 1;
    assert!(dir.commit("hash-3", vec![short], serde_json::Value::Null).await.is_err());
    assert_eq!(dir.commit_record().await.unwrap().unwrap().config_hash, "hash-1");

    let keys = store.list(dir.prefix()).await.unwrap();
    let names: Vec<String> = keys.iter().map(ToString::to_string).collect();
    assert_eq!(
        names,
        ["run-a/data-prep/_SUCCESS.json", "run-a/data-prep/shards/00000.jsonl", "run-a/data-prep/shards/00001.bin"]
    );

    // A commit for another stage or run is never mistaken for this one.
    let other = store.stage("run-a", Stage::Tokenize).unwrap();
    assert!(other.commit_record().await.unwrap().is_none());
    store
        .put(&other.key(SUCCESS_FILE).unwrap(), store.get(&dir.key(SUCCESS_FILE).unwrap()).await.unwrap())
        .await
        .unwrap();
    let err = other.commit_record().await.unwrap_err().to_string();
    assert!(err.contains("records run-a/data-prep instead of run-a/tokenize"), "{err}");

    dir.uncommit().await.unwrap();
    assert!(dir.commit_record().await.unwrap().is_none());
    assert_eq!(store.delete_prefix(&key("run-a").unwrap()).await.unwrap(), 3);
    assert!(store.list(&key("run-a").unwrap()).await.unwrap().is_empty());
}

#[tokio::test]
async fn memory_store_round_trips() {
    exercise(&Store::open("memory://").unwrap()).await;
}

#[tokio::test]
async fn file_store_round_trips() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("nested/runs");
    let store = Store::open(&format!("file://{}", root.display())).unwrap();
    exercise(&store).await;
    assert!(root.is_dir(), "the directory is created on open");
}

#[tokio::test]
async fn s3_store_round_trips_against_an_in_process_s3_server() {
    let root = tempfile::tempdir().unwrap();
    let (endpoint, server) = common::serve(common::s3_service(root.path())).await;
    let options = common::options(&endpoint, common::SECRET_KEY);
    let store = Store::open_with("s3://bucket/team/runs", &options).unwrap();
    exercise(&store).await;

    // The prefix in the URL is honoured: objects land under bucket/team/runs/.
    let dir = store.stage("run-b", Stage::Eval).unwrap();
    dir.put("eval.json", Bytes::from_static(b"{}")).await.unwrap();
    assert!(root.path().join("bucket/team/runs/run-b/eval/eval.json").is_file());

    let wrong = Store::open_with("s3://bucket", &common::options(&endpoint, "s3cr3t-Wr0ng-K3y")).unwrap();
    let err = wrong.get(&key("run-b/eval/eval.json").unwrap()).await.unwrap_err().to_string();
    assert!(err.starts_with("s3://bucket/run-b/eval/eval.json:"), "{err}");
    assert!(!err.contains("s3cr3t-Wr0ng-K3y"), "the secret key is never repeated: {err}");
    server.abort();
}

#[test]
fn bad_urls_and_keys_are_refused_with_the_reason() {
    let cases = [
        ("ftp://x/y", "scheme \"ftp\" is not supported"),
        ("/just/a/path", "expected SCHEME://"),
        ("s3:///prefix", "names no bucket"),
        ("file://", "names no directory"),
    ];
    for (url, reason) in cases {
        let err = Store::open(url).unwrap_err().to_string();
        assert!(err.contains(reason), "{url}: {err}");
    }
    for bad in ["", "/abs", "a/../b", "./a", ".."] {
        assert!(key(bad).is_err(), "{bad:?} accepted");
    }
    let store = Store::open("memory://").unwrap();
    assert!(store.stage("a/b", Stage::Train).is_err(), "a run name is one segment");
    assert!(store.stage("..", Stage::Train).is_err());
    let dir = store.stage("ok", Stage::Train).unwrap();
    assert!(dir.key("../tokenize/_SUCCESS.json").is_err(), "no escaping the stage directory");
}
