//! Reading a `PretrainRun` manifest: YAML in, a validated run or every error at once out.
//!
//! Syntax and type errors stop the parse and carry the file, line and column; unknown fields (usually
//! typos) and broken rules are collected and reported together, each with its field path.

use std::path::Path;

use serde::Deserialize;
use serde::de::DeserializeOwned;

use crate::spec::{Filters, PretrainRun, Source};
use crate::validate::{FieldError, ValidationErrors, validate};

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

/// The filters that apply to one source: its `filters` fields merged over the global `filters`.
pub fn source_filters(global: &Filters, source: &Source, path: &str) -> Result<Filters, Vec<FieldError>> {
    let Some(overrides) = &source.filters else {
        return Ok(global.clone());
    };
    let mut merged = serde_json::to_value(global).expect("filters serialise to JSON");
    merge(&mut merged, overrides);
    let mut unknown = Vec::new();
    match deserialize_tracking::<_, Filters>(&merged, &mut unknown) {
        Ok(filters) if unknown.is_empty() => Ok(filters),
        Ok(_) => Err(unknown.into_iter().map(|e| FieldError { path: format!("{path}.{}", e.path), ..e }).collect()),
        Err(e) => Err(vec![FieldError { path: join(path, &e.path().to_string()), message: e.inner().to_string() }]),
    }
}

fn join(prefix: &str, path: &str) -> String {
    if path == "." { prefix.to_string() } else { format!("{prefix}.{path}") }
}

/// Deep merge: objects merge key by key, anything else in `overrides` replaces the base value.
fn merge(base: &mut serde_json::Value, overrides: &serde_json::Value) {
    match (base, overrides) {
        (serde_json::Value::Object(b), serde_json::Value::Object(o)) => {
            for (k, v) in o {
                match b.get_mut(k) {
                    Some(slot) => merge(slot, v),
                    None => {
                        b.insert(k.clone(), v.clone());
                    }
                }
            }
        }
        (slot, v) => *slot = v.clone(),
    }
}

/// Deserialises while recording every field the types do not know as an "unknown field" error.
fn deserialize_tracking<'de, D, T>(
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
