//! Reading a `PretrainRun` manifest: YAML in, a validated run or every error at once out.
//!
//! Syntax and type errors stop the parse and carry the file, line and column; unknown fields (usually
//! typos) and broken rules are collected and reported together, each with its field path.

use std::path::Path;

use serde::Deserialize;

use crate::field::{FieldError, ValidationErrors, deserialize_tracking};
use crate::spec::PretrainRun;
use crate::validate::validate;

/// The API version manifests must declare.
pub const API_VERSION: &str = "pretrain.dev/v1alpha1";
/// The kind manifests must declare.
pub const KIND: &str = "PretrainRun";

/// Why a manifest was refused.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    /// The file could not be read.
    #[error("{origin}: cannot read: {source}")]
    Read {
        /// File name.
        origin: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The YAML is malformed or a value has the wrong type.
    #[error("{origin}:{}: {message}", location(*.line, *.column))]
    Syntax {
        /// File name.
        origin: String,
        /// 1-based line, when known.
        line: Option<usize>,
        /// 1-based column, when known.
        column: Option<usize>,
        /// What is wrong, with the field path.
        message: String,
    },
    /// The manifest parsed but breaks rules.
    #[error("{origin}: {} error(s):\n{}", errors.0.len(), indent(errors))]
    Invalid {
        /// File name.
        origin: String,
        /// Every broken rule.
        errors: ValidationErrors,
    },
}

fn indent(errors: &ValidationErrors) -> String {
    errors.0.iter().map(|e| format!("  {e}")).collect::<Vec<_>>().join("\n")
}

fn location(line: Option<usize>, column: Option<usize>) -> String {
    match (line, column) {
        (Some(l), Some(c)) => format!("{l}:{c}"),
        (Some(l), None) => l.to_string(),
        _ => "-".into(),
    }
}

/// Reads and validates a manifest file.
pub fn load(path: &Path) -> Result<PretrainRun, ManifestError> {
    let origin = path.display().to_string();
    let text =
        std::fs::read_to_string(path).map_err(|source| ManifestError::Read { origin: origin.clone(), source })?;
    parse(&text, &origin)
}

/// Parses and validates a manifest; `origin` names it in errors (a file name).
pub fn parse(text: &str, origin: &str) -> Result<PretrainRun, ManifestError> {
    let mut documents = serde_yaml::Deserializer::from_str(text);
    let Some(document) = documents.next() else {
        return Err(syntax(origin, None, "the file holds no YAML document".into()));
    };
    let mut unknown = Vec::new();
    let run: PretrainRun = deserialize_tracking(document, &mut unknown).map_err(|e| {
        let location = e.inner().location();
        let message = strip_location(&e.inner().to_string());
        let path = e.path().to_string();
        let message = if path == "." { message } else { format!("{path}: {message}") };
        syntax(origin, location.as_ref(), message)
    })?;
    if documents.next().is_some() {
        return Err(syntax(origin, None, "holds more than one YAML document; put one PretrainRun per file".into()));
    }

    // The derived type leaves apiVersion and kind to the API server; check them here.
    let header: Header = serde_yaml::Deserializer::from_str(text)
        .next()
        .map(Header::deserialize)
        .transpose()
        .ok()
        .flatten()
        .unwrap_or_default();
    let mut errors: Vec<FieldError> =
        unknown.into_iter().filter(|e| e.path != "apiVersion" && e.path != "kind").collect();
    if header.api_version.as_deref() != Some(API_VERSION) {
        errors.push(FieldError {
            path: "apiVersion".into(),
            message: format!("must be {API_VERSION:?}, got {:?}", header.api_version.unwrap_or_default()),
        });
    }
    if header.kind.as_deref() != Some(KIND) {
        errors.push(FieldError {
            path: "kind".into(),
            message: format!("must be {KIND:?}, got {:?}", header.kind.unwrap_or_default()),
        });
    }
    if let Err(ValidationErrors(rules)) = validate(&run) {
        errors.extend(rules);
    }
    if errors.is_empty() {
        Ok(run)
    } else {
        Err(ManifestError::Invalid { origin: origin.into(), errors: ValidationErrors(errors) })
    }
}

#[derive(Default, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct Header {
    api_version: Option<String>,
    kind: Option<String>,
}

fn syntax(origin: &str, location: Option<&serde_yaml::Location>, message: String) -> ManifestError {
    ManifestError::Syntax {
        origin: origin.into(),
        line: location.map(serde_yaml::Location::line),
        column: location.map(serde_yaml::Location::column),
        message,
    }
}

/// serde_yaml appends " at line L column C"; the location is reported separately.
fn strip_location(message: &str) -> String {
    match message.rfind(" at line ") {
        Some(i) => message[..i].to_string(),
        None => message.to_string(),
    }
}
