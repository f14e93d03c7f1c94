//! The newest checkpoint of a training stage as the store shows it (`ckpt/latest`, then that
//! checkpoint's `state.json`), read by both `pretrain status` and the operator's status.

use pretrain_store::StageDir;

/// The checkpoint `ckpt/latest` names.
#[derive(Debug, Clone, PartialEq)]
pub struct Newest {
    /// Its directory name, `step-NNNNNNNNN`.
    pub name: String,
    /// Its `state.json`, when present and JSON.
    pub state: Option<serde_json::Value>,
}

/// The newest checkpoint of `dir`, if it has one.
pub async fn newest(dir: &StageDir) -> Result<Option<Newest>, pretrain_store::Error> {
    let store = dir.store();
    let Some(latest) = store.get_opt(&dir.key("ckpt/latest")?).await? else { return Ok(None) };
    let name = String::from_utf8_lossy(&latest).trim().to_string();
    let state = store
        .get_opt(&dir.key(&format!("ckpt/{name}/state.json"))?)
        .await?
        .and_then(|s| serde_json::from_slice::<serde_json::Value>(&s).ok());
    Ok(Some(Newest { name, state }))
}

/// What the operator reads of a checkpoint's `state.json` (leniently: only these fields).
#[derive(Debug, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct State {
    /// Optimizer step.
    pub step: u64,
    /// Tokens trained on.
    pub tokens_seen: u64,
    /// Config hash of the spec it was written for.
    pub config_hash: String,
    /// Training loss at that step.
    #[serde(default)]
    pub loss: Option<f64>,
    /// Unix seconds it was saved.
    #[serde(default)]
    pub saved_unix: Option<i64>,
    /// The stage's ledger.
    #[serde(default)]
    pub history: pretrain_store::artifact::RunHistory,
}

impl State {
    /// Its goodput ledger.
    pub fn into_ledger(self) -> crate::plan::goodput::Ledger {
        crate::plan::goodput::Ledger { history: self.history, saved_unix: self.saved_unix }
    }
}

/// The newest checkpoint of `dir` written for `config_hash`: its directory name and `state.json`.
pub async fn newest_for(dir: &StageDir, config_hash: &str) -> Result<Option<(String, State)>, pretrain_store::Error> {
    let Some(Newest { name, state: Some(state) }) = newest(dir).await? else { return Ok(None) };
    Ok(serde_json::from_value::<State>(state).ok().filter(|s| s.config_hash == config_hash).map(|s| (name, s)))
}

/// The goodput ledger of `dir`'s newest checkpoint, if it was written for `config_hash`.
pub async fn ledger(
    dir: &StageDir,
    config_hash: &str,
) -> Result<Option<crate::plan::goodput::Ledger>, pretrain_store::Error> {
    Ok(newest_for(dir, config_hash).await?.map(|(_, state)| state.into_ledger()))
}
