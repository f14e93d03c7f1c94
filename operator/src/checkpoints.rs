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

/// The goodput ledger of `dir`'s newest checkpoint, if it was written for `config_hash`.
pub async fn ledger(
    dir: &StageDir,
    config_hash: &str,
) -> Result<Option<crate::plan::goodput::Ledger>, pretrain_store::Error> {
    #[derive(serde::Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct State {
        config_hash: String,
        #[serde(default)]
        saved_unix: Option<i64>,
        #[serde(default)]
        history: pretrain_store::artifact::RunHistory,
    }
    let state = newest(dir).await?.and_then(|n| n.state).and_then(|s| serde_json::from_value::<State>(s).ok());
    Ok(state
        .filter(|s| s.config_hash == config_hash)
        .map(|s| crate::plan::goodput::Ledger { history: s.history, saved_unix: s.saved_unix }))
}
