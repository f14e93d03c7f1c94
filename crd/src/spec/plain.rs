//! `PretrainRun` without the Kubernetes crates: what the worker reads from the manifest the operator
//! or `pretrain run` validated and wrote. The same fields, in the same places, as kube's derived type.

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::PretrainRunSpec;
use crate::status::PretrainRunStatus;

/// One training run: its name and spec (status is the operator's and read only by it).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct PretrainRun {
    /// Name, namespace and the rest of the object's metadata.
    pub metadata: ObjectMeta,
    /// What the user asked for.
    pub spec: PretrainRunSpec,
    /// Where the run stands, as the operator last wrote it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<PretrainRunStatus>,
}

/// The object metadata fields the worker reads; every other field is kept as written.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
pub struct ObjectMeta {
    /// The run's name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// The run's namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// Labels, annotations, uid and the rest of Kubernetes' `ObjectMeta`.
    #[serde(flatten)]
    pub other: BTreeMap<String, serde_json::Value>,
}

/// A Kubernetes resource quantity (`4`, `500m`, `16Gi`), kept as written.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default, JsonSchema)]
#[serde(transparent)]
pub struct Quantity(pub String);
