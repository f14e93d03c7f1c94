//! Run state of the local runner, in sled: per run and stage, its phase, attempts, times and last
//! words, so that `pretrain status` can say where a run stands (also while it runs, or after the
//! runner was killed). The database sits in the store's local cache: `<root>/.pretrain/state` for a
//! `file://` store, else `$XDG_CACHE_HOME/pretrain/<store hash>/state` (override: `PRETRAIN_STATE_DIR`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use pretrain_crd::Stage;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Where a stage stands in the local runner's record (the operator's is `StagePhase`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RecordPhase {
    /// A process is (or was, if the runner died) running it.
    Running,
    /// Committed by this runner.
    Committed,
    /// Found committed; not run.
    Skipped,
    /// The last attempt failed.
    Failed,
    /// Stopped by Ctrl-C after checkpointing; rerun to resume.
    Interrupted,
}

/// One stage's record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StageRecord {
    /// Where the stage stands.
    pub phase: RecordPhase,
    /// Config hash of the spec it ran for.
    pub config_hash: String,
    /// Attempts in the last `pretrain run` that ran it.
    pub attempts: u32,
    /// Unix seconds the last attempt started.
    pub started: Option<u64>,
    /// Unix seconds it ended.
    pub finished: Option<u64>,
    /// Exit code of the last failed attempt.
    pub exit_code: Option<i32>,
    /// What the last failed attempt said.
    pub reason: Option<String>,
    /// Process id of the `pretrain run` that ran it last.
    #[serde(default)]
    pub runner_pid: Option<u32>,
    /// A training stage's time over its attempts, for goodput.
    #[serde(default)]
    pub time: Option<pretrain_crd::status::StageTime>,
}

/// The state database.
#[derive(Debug, Clone)]
pub struct StateDb {
    db: sled::Db,
    path: PathBuf,
}

/// Seconds since the Unix epoch.
pub fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// Where the state of runs in `store_url` lives.
pub fn state_dir(store_url: &str) -> PathBuf {
    if let Some(dir) = std::env::var_os("PRETRAIN_STATE_DIR") {
        return PathBuf::from(dir);
    }
    if let Some(root) = store_url.strip_prefix("file://") {
        return PathBuf::from(root).join(".pretrain").join("state");
    }
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(std::env::temp_dir);
    let hash = hex::encode(&Sha256::digest(store_url.as_bytes())[..8]);
    cache.join("pretrain").join(hash).join("state")
}

fn key(run: &str, stage: Stage) -> String {
    format!("run/{run}/{stage}")
}

impl StateDb {
    /// Opens (creating) the database for `store_url`.
    pub fn open(store_url: &str) -> Result<Self, String> {
        let path = state_dir(store_url);
        let db = sled::Config::new()
            .path(&path)
            .open()
            .map_err(|e| format!("run state {}: {e} (is another `pretrain run` using it?)", path.display()))?;
        Ok(Self { db, path })
    }

    /// Where it lives.
    pub fn path(&self) -> &std::path::Path {
        &self.path
    }

    /// The record of `stage` of `run`.
    pub fn get(&self, run: &str, stage: Stage) -> Option<StageRecord> {
        let bytes = self.db.get(key(run, stage)).ok()??;
        serde_json::from_slice(&bytes).ok()
    }

    /// Replaces the record of `stage` of `run` and flushes it to disk.
    pub fn put(&self, run: &str, stage: Stage, record: &StageRecord) -> Result<(), String> {
        let bytes = serde_json::to_vec(record).expect("records serialise");
        self.db.insert(key(run, stage), bytes).map_err(|e| format!("run state {}: {e}", self.path.display()))?;
        self.db.flush().map_err(|e| format!("run state {}: {e}", self.path.display()))?;
        Ok(())
    }

    /// Updates the record of `stage` of `run` (starting from `init` when there is none).
    pub fn update(
        &self,
        run: &str,
        stage: Stage,
        init: impl FnOnce() -> StageRecord,
        f: impl FnOnce(&mut StageRecord),
    ) -> Result<(), String> {
        let mut record = self.get(run, stage).unwrap_or_else(init);
        f(&mut record);
        self.put(run, stage, &record)
    }

    /// Every record of `run`, by stage.
    pub fn records(&self, run: &str) -> BTreeMap<Stage, StageRecord> {
        Stage::ALL.into_iter().filter_map(|s| self.get(run, s).map(|r| (s, r))).collect()
    }

    /// Names of the runs with records, sorted.
    pub fn runs(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .db
            .scan_prefix("run/")
            .keys()
            .filter_map(|k| k.ok())
            .filter_map(|k| String::from_utf8(k.to_vec()).ok())
            .filter_map(|k| k.split('/').nth(1).map(str::to_string))
            .collect();
        names.dedup();
        names
    }
}

/// Whether process `pid` is alive (on this machine).
pub fn alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// `YYYY-MM-DD HH:MM:SS UTC` of Unix seconds.
pub fn format_time(secs: u64) -> String {
    i64::try_from(secs)
        .ok()
        .and_then(|s| jiff::Timestamp::from_second(s).ok())
        .map_or_else(|| format!("{secs} s after the epoch"), |t| t.strftime("%Y-%m-%d %H:%M:%S UTC").to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_survive_reopening_and_runs_are_listed() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("file://{}", dir.path().display());
        let record = StageRecord {
            phase: RecordPhase::Failed,
            config_hash: "abc".into(),
            attempts: 2,
            started: Some(1),
            finished: Some(5),
            exit_code: Some(1),
            reason: Some("disk full".into()),
            runner_pid: Some(7),
            time: None,
        };
        {
            let db = StateDb::open(&url).unwrap();
            assert_eq!(db.path(), dir.path().join(".pretrain/state"));
            db.put("a", Stage::Train, &record).unwrap();
            db.put("b", Stage::DataPrep, &record).unwrap();
            db.put("a", Stage::Eval, &record).unwrap();
        }
        let db = StateDb::open(&url).unwrap();
        assert_eq!(db.get("a", Stage::Train), Some(record));
        assert_eq!(db.get("a", Stage::Tokenize), None);
        assert_eq!(db.runs(), ["a", "b"]);
        db.update("a", Stage::Train, || unreachable!(), |r| r.phase = RecordPhase::Committed).unwrap();
        assert_eq!(db.get("a", Stage::Train).unwrap().phase, RecordPhase::Committed);
    }

    #[test]
    fn formats_utc_times() {
        assert_eq!(format_time(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(format_time(1_795_826_010), "2026-11-28 00:33:30 UTC");
        assert_eq!(format_time(951_782_400), "2000-02-29 00:00:00 UTC");
    }
}
