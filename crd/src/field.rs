//! Rules' building blocks: the error a broken rule reports, the collector every section's rules push
//! to, the shared name and URL rules, and deserialising with unknown fields recorded.

use std::fmt;

use serde::de::DeserializeOwned;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FieldError {
    /// Path of the offending field, e.g. `spec.train.globalBatchTokens`.
    pub path: String,
    /// What the field must be.
    pub message: String,
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path, self.message)
    }
}

/// Every broken rule of a manifest.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub struct ValidationErrors(pub Vec<FieldError>);

impl fmt::Display for ValidationErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

/// Collects errors under a path prefix.
#[derive(Debug, Default)]
pub(crate) struct Errors(Vec<FieldError>);

impl Errors {
    pub(crate) fn push(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.0.push(FieldError { path: path.into(), message: message.into() });
    }

    pub(crate) fn check(&mut self, ok: bool, path: impl Into<String>, message: impl Into<String>) {
        if !ok {
            self.push(path, message);
        }
    }

    pub(crate) fn fraction(&mut self, value: f64, path: impl Into<String>) {
        self.check((0.0..=1.0).contains(&value), path, format!("must be between 0 and 1, got {value}"));
    }

    pub(crate) fn positive(&mut self, value: f64, path: impl Into<String>) {
        self.check(value > 0.0 && value.is_finite(), path, format!("must be greater than 0, got {value}"));
    }

    /// How many rules have failed so far.
    pub(crate) fn len(&self) -> usize {
        self.0.len()
    }

    pub(crate) fn into_result(self) -> Result<(), ValidationErrors> {
        if self.0.is_empty() { Ok(()) } else { Err(ValidationErrors(self.0)) }
    }

    pub(crate) fn extend(&mut self, other: Vec<FieldError>) {
        self.0.extend(other);
    }
}

/// Deserialises while recording every field the types do not know as an "unknown field" error.
pub(crate) fn deserialize_tracking<'de, D, T>(
    deserializer: D,
    unknown: &mut Vec<FieldError>,
) -> Result<T, serde_path_to_error::Error<D::Error>>
where
    D: serde::Deserializer<'de>,
    T: DeserializeOwned,
{
    let mut record = |path: serde_ignored::Path<'_>| {
        unknown.push(FieldError { path: dotted(&path), message: "unknown field".into() });
    };
    let tracking = serde_ignored::Deserializer::new(deserializer, &mut record);
    serde_path_to_error::deserialize(tracking)
}

fn dotted(path: &serde_ignored::Path<'_>) -> String {
    use serde_ignored::Path as P;
    match path {
        P::Root => String::new(),
        P::Seq { parent, index } => format!("{}[{index}]", dotted(parent)),
        P::Map { parent, key } => {
            let parent = dotted(parent);
            if parent.is_empty() { key.clone() } else { format!("{parent}.{key}") }
        }
        P::Some { parent } | P::NewtypeStruct { parent } | P::NewtypeVariant { parent } => dotted(parent),
    }
}

/// Whether a URL carries credentials: `user:password@` before the host, or a signed or
/// token-bearing query string.
pub fn carries_credentials(url: &str) -> bool {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    if rest.split(['/', '?', '#']).next().unwrap_or("").contains('@') {
        return true;
    }
    let query = url.split_once('?').map(|(_, q)| q.to_ascii_lowercase()).unwrap_or_default();
    [
        "signature=",
        "sig=",
        "x-amz-credential=",
        "x-amz-security-token=",
        "awsaccesskeyid=",
        "token=",
        "password=",
        "secret",
    ]
    .iter()
    .any(|k| query.contains(k))
}

/// Refuses a URL with credentials in it, without repeating the URL: a spec is stored in the
/// cluster, copied into a ConfigMap and shown in status and logs.
pub(crate) fn no_credentials(url: &str, path: &str, e: &mut Errors) {
    e.check(
        !carries_credentials(url),
        path,
        "must not carry credentials (user:password@ or a signed query string); put them in the Secret \
         named by spec.storage.secretRef",
    );
}

/// A URL for messages: as written, unless it carries credentials.
pub(crate) fn shown(url: &str) -> String {
    if carries_credentials(url) { "(a URL with credentials)".into() } else { format!("{url:?}") }
}

/// A DNS-1123 label of at most `max` characters: lowercase letters, digits and `-`, alphanumeric at
/// both ends.
pub fn dns_label(s: &str, max: usize) -> Result<(), String> {
    let ok_chars = s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    let ok_ends = s.bytes().next().is_some_and(|b| b.is_ascii_alphanumeric())
        && s.bytes().last().is_some_and(|b| b.is_ascii_alphanumeric());
    if s.is_empty() || s.len() > max || !ok_chars || !ok_ends {
        Err(format!(
            "must be 1 to {max} lowercase letters, digits or '-', starting and ending with a letter or digit, got {s:?}"
        ))
    } else {
        Ok(())
    }
}

pub(crate) fn dns_subdomain(s: &str) -> Result<(), String> {
    if s.len() > 253 || s.is_empty() || s.split('.').any(|l| dns_label(l, 63).is_err()) {
        Err(format!("must be a DNS-1123 subdomain (lowercase labels joined by '.'), got {s:?}"))
    } else {
        Ok(())
    }
}
