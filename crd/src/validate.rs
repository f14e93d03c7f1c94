//! Validation of a PretrainRun, in one place for the CLI, the operator and the worker.
//!
//! Every rule reports the field path it is about and what it requires; all failures are returned
//! together so a user fixes a manifest in one pass. Each section's rules sit beside its types in
//! `spec/`; this module checks the run's name and the fields outside any section.

use crate::field::{Errors, dns_subdomain, no_credentials, shown};
pub use crate::field::{FieldError, ValidationErrors, carries_credentials, dns_label};
pub use crate::spec::data::MAX_DOCUMENT_BYTES;
use crate::spec::{PretrainRun, PretrainRunSpec, Storage};

/// Longest run name: stage Job names append `-long-context` and must stay within 63 characters.
pub const MAX_RUN_NAME_LEN: usize = 50;

/// Store URL schemes the run can use.
pub const STORE_SCHEMES: [&str; 5] = ["file", "s3", "gs", "az", "memory"];

/// Checks a whole run: its name and its spec.
pub fn validate(run: &PretrainRun) -> Result<(), ValidationErrors> {
    let mut errors = Errors::default();
    match run.metadata.name.as_deref() {
        None | Some("") => errors.push("metadata.name", "is required"),
        Some(name) => {
            if let Err(why) = dns_label(name, MAX_RUN_NAME_LEN) {
                errors.push("metadata.name", why);
            }
        }
    }
    spec_rules(&run.spec, &mut errors);
    errors.into_result()
}

/// Checks a spec on its own (no name).
pub fn validate_spec(spec: &PretrainRunSpec) -> Result<(), ValidationErrors> {
    let mut errors = Errors::default();
    spec_rules(spec, &mut errors);
    errors.into_result()
}

fn spec_rules(spec: &PretrainRunSpec, e: &mut Errors) {
    storage(&spec.storage, e);
    e.check(!spec.image.trim().is_empty(), "spec.image", "must not be empty");
    if let Err(why) = dns_label(&spec.scheduling.queue, 63) {
        e.push("spec.scheduling.queue", why);
    }
    e.check(
        (-1000..=1000).contains(&spec.scheduling.priority),
        "spec.scheduling.priority",
        "must be between -1000 and 1000",
    );
    if let Some(kueue) = &spec.scheduling.kueue {
        e.check(!kueue.queue_name.is_empty(), "spec.scheduling.kueue.queueName", "must not be empty");
    }
    spec.data.check(e);
    spec.tokenizer.check(e);
    let before = e.len();
    spec.model.check(e);
    // Step counts derive from the model's size; a broken shape would make them meaningless.
    let steps = (e.len() == before).then(|| spec.train_steps());
    spec.train.check(steps, e);
    if let Some(lc) = &spec.long_context {
        lc.check(&spec.train, e);
    }
    spec.eval.check(e);
}

fn storage(s: &Storage, e: &mut Errors) {
    let path = "spec.storage.url";
    no_credentials(&s.url, path, e);
    match s.url.split_once("://") {
        None => e.push(
            path,
            format!("must be a URL with one of the schemes {}, got {}", STORE_SCHEMES.join(", "), shown(&s.url)),
        ),
        Some((scheme, rest)) => {
            if !STORE_SCHEMES.contains(&scheme) {
                e.push(path, format!("scheme {scheme:?} is not supported; use one of {}", STORE_SCHEMES.join(", ")));
            } else if matches!(scheme, "s3" | "gs" | "az") && rest.split('/').next().unwrap_or("").is_empty() {
                e.push(path, format!("must name a bucket: {scheme}://BUCKET[/PREFIX]"));
            } else if scheme == "file" && rest.is_empty() {
                e.push(path, "must name a directory: file:///ABSOLUTE/PATH or file://RELATIVE/PATH");
            }
        }
    }
    if let Some(secret) = &s.secret_ref
        && let Err(why) = dns_subdomain(&secret.name)
    {
        e.push("spec.storage.secretRef.name", why);
    }
}
