//! The `PretrainRun` API: types with their defaults, the CRD, validation, and the stage list.
//!
//! The one config type the operator writes and the worker reads. No I/O beyond reading a manifest
//! file, no async runtime, no Kubernetes client. The `kube` feature adds the custom resources, their
//! CRDs and the schema reference (the operator's); without it the crate needs no Kubernetes crate.

pub mod contract;
pub mod display;
mod field;
pub mod manifest;
#[cfg(feature = "kube")]
pub mod queue;
#[cfg(feature = "kube")]
mod schema;
pub mod seeded;
pub mod spec;
pub mod stage;
pub mod status;
pub mod validate;

pub use manifest::{ManifestError, load, parse};
#[cfg(feature = "kube")]
pub use queue::{PretrainQueue, PretrainQueueSpec};
#[cfg(feature = "kube")]
pub use schema::{crd, crd_yaml, queue_crd, reference_markdown};
pub use spec::{PretrainRun, PretrainRunSpec};
pub use stage::Stage;
pub use status::PretrainRunStatus;
pub use validate::{FieldError, ValidationErrors, validate, validate_spec};
