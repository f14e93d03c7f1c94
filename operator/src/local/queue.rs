//! The local queue: one `pretrain run` at a time uses a store's run state (the sled database is
//! one process's), so a second one waits its turn instead of failing, first come first served. Each
//! waiting runner leaves a ticket file beside the state (`<state>/../queue/`), and the runner that
//! holds the state a `holder.json`; `pretrain run --ui` lists the tickets as queued runs. A ticket
//! of a process that is gone is ignored and removed.

use std::path::{Path, PathBuf};
use std::time::Duration;

use pretrain_crd::Stage;
use serde::{Deserialize, Serialize};

use super::state::{self, StateDb};

/// A runner waiting for the store's run state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Waiting {
    /// The run it will run.
    pub run: String,
    /// Its stages.
    pub stages: Vec<Stage>,
    /// Its process.
    pub pid: u32,
    /// Unix seconds it started waiting.
    pub since: u64,
}

/// The runner that holds the run state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Holder {
    /// The run it runs.
    pub run: String,
    /// Its process.
    pub pid: u32,
}

/// The queue of a store's run state.
#[derive(Debug, Clone)]
pub struct Queue {
    dir: PathBuf,
    holder: PathBuf,
}

/// A place in the queue; leaving it (drop) removes the ticket.
#[derive(Debug)]
pub struct Ticket {
    path: PathBuf,
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Writes `value` as JSON to `path` through a temporary file, so readers see all of it or none.
fn write_json(path: &Path, value: &impl Serialize) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, serde_json::to_vec(value).expect("queue records serialise"))?;
    std::fs::rename(&tmp, path)
}

impl Queue {
    /// The queue of the run state of `store_url`.
    pub fn for_store(store_url: &str) -> Self {
        let state = state::state_dir(store_url);
        let parent = state.parent().map_or_else(|| PathBuf::from("."), Path::to_path_buf);
        Self { dir: parent.join("queue"), holder: parent.join("holder.json") }
    }

    /// Takes a place at the end of the queue.
    pub fn join(&self, waiting: &Waiting) -> std::io::Result<Ticket> {
        std::fs::create_dir_all(&self.dir)?;
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
        let path = self.dir.join(format!("{nanos:024}-{}.json", waiting.pid));
        write_json(&path, waiting)?;
        Ok(Ticket { path })
    }

    /// The live waiting runners, first come first.
    pub fn waiting(&self) -> Vec<Waiting> {
        let Ok(entries) = std::fs::read_dir(&self.dir) else { return Vec::new() };
        let mut files: Vec<PathBuf> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "json"))
            .collect();
        files.sort();
        let mut waiting = Vec::new();
        for path in files {
            let Some(w) = std::fs::read(&path).ok().and_then(|b| serde_json::from_slice::<Waiting>(&b).ok()) else {
                continue;
            };
            if state::alive(w.pid) {
                waiting.push(w);
            } else {
                let _ = std::fs::remove_file(&path);
            }
        }
        waiting
    }

    /// Records `run` of this process as the holder of the run state.
    pub fn hold(&self, run: &str) -> std::io::Result<()> {
        write_json(&self.holder, &Holder { run: run.to_string(), pid: std::process::id() })
    }

    /// The runner holding the run state, if it is alive.
    pub fn holder(&self) -> Option<Holder> {
        let h: Holder = serde_json::from_slice(&std::fs::read(&self.holder).ok()?).ok()?;
        state::alive(h.pid).then_some(h)
    }

    /// Why a waiting runner waits, for people.
    pub fn reason(&self, store_url: &str) -> String {
        let holder =
            self.holder().map_or_else(|| "another run".to_string(), |h| format!("run `{}` (pid {})", h.run, h.pid));
        format!("waiting for {holder} to finish: one `pretrain run` at a time uses the run state of {store_url}")
    }
}

/// Opens the run state of `store_url` for `waiting.run`; while another runner holds it, waits in
/// the queue (saying so once) until this runner is first and the state is free.
pub async fn open_in_turn(store_url: &str, waiting: &Waiting) -> Result<StateDb, String> {
    let queue = Queue::for_store(store_url);
    let db = match StateDb::open(store_url) {
        Ok(db) => db,
        Err(e) if held(&e) => wait_in_turn(&queue, store_url, waiting).await?,
        Err(e) => return Err(e),
    };
    queue.hold(&waiting.run).map_err(|e| format!("local queue {}: {e}", queue.holder.display()))?;
    Ok(db)
}

/// Waits in `queue` until this runner is first and the run state is free, then opens it.
async fn wait_in_turn(queue: &Queue, store_url: &str, waiting: &Waiting) -> Result<StateDb, String> {
    let _ticket = queue.join(waiting).map_err(|e| format!("local queue {}: {e}", queue.dir.display()))?;
    let place = queue.waiting().iter().position(|w| w.pid == waiting.pid).map_or(1, |p| p + 1);
    println!("queued at position {place}: {}", queue.reason(store_url));
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        if queue.waiting().first().is_some_and(|w| w.pid != waiting.pid) {
            continue;
        }
        match StateDb::open(store_url) {
            Ok(db) => return Ok(db),
            Err(e) if held(&e) => {}
            Err(e) => return Err(e),
        }
    }
}

/// Whether opening the run state failed because another process holds it (sled's lock).
fn held(error: &str) -> bool {
    error.contains("could not acquire lock")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tickets_queue_in_order_and_dead_ones_go() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("file://{}", dir.path().display());
        let queue = Queue::for_store(&url);
        assert!(queue.waiting().is_empty());
        let me = std::process::id();
        let w = |run: &str, pid| Waiting { run: run.into(), stages: vec![Stage::Train], pid, since: 1 };
        let a = queue.join(&w("a", me)).unwrap();
        let _b = queue.join(&w("b", me)).unwrap();
        let dead = queue.join(&w("gone", u32::MAX - 1)).unwrap();
        assert_eq!(queue.waiting().iter().map(|w| w.run.as_str()).collect::<Vec<_>>(), ["a", "b"]);
        assert!(!dead.path.exists(), "a dead process's ticket is removed");
        drop(a);
        assert_eq!(queue.waiting().iter().map(|w| w.run.as_str()).collect::<Vec<_>>(), ["b"]);
        assert!(queue.holder().is_none());
        queue.hold("tiny").unwrap();
        assert_eq!(queue.holder(), Some(Holder { run: "tiny".into(), pid: me }));
        assert!(queue.reason(&url).starts_with(&format!("waiting for run `tiny` (pid {me}) to finish")));
    }
}
