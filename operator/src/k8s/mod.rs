//! The only part of the operator that talks to the API server.
//!
//! - [`render`]: the Jobs, Services and ConfigMap of a run, from its spec (pure);
//! - [`observe`]: Jobs, pods and the store read into the planner's terms;
//! - [`controller`]: the reconcile loop (server-side apply, status, Events, finalizer);
//! - [`scheduler`]: the cluster scheduler's loop (admission, preemption, why-pending);
//! - [`leader`]: Lease-based leader election; [`metrics`]: Prometheus metrics and health;
//! - [`dashboard`]: the cluster's runs for the live dashboard; [`quarantine`]: nodes that keep
//!   failing attempts.

pub mod controller;
pub mod dashboard;
pub mod leader;
pub mod metrics;
pub mod observe;
pub mod quarantine;
pub mod render;
pub mod scheduler;
