//! A pod's volumes as files: ConfigMap, Secret, emptyDir, and projected (service-account token,
//! ConfigMap, Secret, downward API).

use std::collections::BTreeMap;

use anyhow::{Context as _, bail};
use k8s_openapi::api::core::v1::{ConfigMap, KeyToPath, Pod, Secret, Volume};
use kube::api::Api;
use kube::{Client, ResourceExt};
use serde_json::json;

/// File path (in the volume) to contents and mode.
pub(super) type Files = BTreeMap<String, (Vec<u8>, u32)>;

fn keyed(data: BTreeMap<String, Vec<u8>>, items: Option<&Vec<KeyToPath>>, mode: u32) -> anyhow::Result<Files> {
    let mut files = Files::new();
    match items {
        Some(items) => {
            for item in items {
                let bytes = data.get(&item.key).with_context(|| format!("no key {}", item.key))?;
                files.insert(item.path.clone(), (bytes.clone(), item.mode.map_or(mode, |m| m as u32)));
            }
        }
        None => files.extend(data.into_iter().map(|(k, v)| (k, (v, mode)))),
    }
    Ok(files)
}

async fn config_map_data(api: &Api<ConfigMap>, name: &str) -> anyhow::Result<Option<BTreeMap<String, Vec<u8>>>> {
    Ok(api.get_opt(name).await?.map(|c| {
        let mut data: BTreeMap<String, Vec<u8>> =
            c.data.unwrap_or_default().into_iter().map(|(k, v)| (k, v.into_bytes())).collect();
        data.extend(c.binary_data.unwrap_or_default().into_iter().map(|(k, v)| (k, v.0)));
        data
    }))
}

async fn secret_data(api: &Api<Secret>, name: &str) -> anyhow::Result<Option<BTreeMap<String, Vec<u8>>>> {
    Ok(api.get_opt(name).await?.map(|s| s.data.unwrap_or_default().into_iter().map(|(k, v)| (k, v.0)).collect()))
}

/// The files of one volume, with their modes.
pub(super) async fn volume_files(client: &Client, pod: &Pod, volume: &Volume) -> anyhow::Result<Files> {
    let namespace = pod.namespace().unwrap_or_default();
    let config_maps: Api<ConfigMap> = Api::namespaced(client.clone(), &namespace);
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &namespace);
    let name = &volume.name;
    if volume.empty_dir.is_some() {
        return Ok(Files::new());
    }
    if let Some(source) = &volume.config_map {
        let mode = source.default_mode.map_or(0o644, |m| m as u32);
        return match config_map_data(&config_maps, &source.name).await? {
            Some(data) => keyed(data, source.items.as_ref(), mode),
            None if source.optional == Some(true) => Ok(Files::new()),
            None => bail!("volume {name}: configmap {namespace}/{} not found", source.name),
        };
    }
    if let Some(source) = &volume.secret {
        let mode = source.default_mode.map_or(0o644, |m| m as u32);
        let secret = source.secret_name.clone().unwrap_or_default();
        return match secret_data(&secrets, &secret).await? {
            Some(data) => keyed(data, source.items.as_ref(), mode),
            None if source.optional == Some(true) => Ok(Files::new()),
            None => bail!("volume {name}: secret {namespace}/{secret} not found"),
        };
    }
    if let Some(projected) = &volume.projected {
        let mode = projected.default_mode.map_or(0o644, |m| m as u32);
        let mut files = Files::new();
        for source in projected.sources.iter().flatten() {
            if let Some(token) = &source.service_account_token {
                let value = request_token(client, pod, token.audience.clone(), token.expiration_seconds).await?;
                files.insert(token.path.clone(), (value.into_bytes(), mode));
            }
            if let Some(c) = &source.config_map {
                match config_map_data(&config_maps, &c.name).await? {
                    Some(data) => files.extend(keyed(data, c.items.as_ref(), mode)?),
                    None if c.optional == Some(true) => {}
                    None => bail!("volume {name}: configmap {namespace}/{} not found", c.name),
                }
            }
            if let Some(s) = &source.secret {
                match secret_data(&secrets, &s.name).await? {
                    Some(data) => files.extend(keyed(data, s.items.as_ref(), mode)?),
                    None if s.optional == Some(true) => {}
                    None => bail!("volume {name}: secret {namespace}/{} not found", s.name),
                }
            }
            if let Some(downward) = &source.downward_api {
                for item in downward.items.iter().flatten() {
                    let value = match item.field_ref.as_ref().map(|f| f.field_path.as_str()) {
                        Some("metadata.namespace") => namespace.clone(),
                        Some("metadata.name") => pod.name_any(),
                        other => bail!("volume {name}: downwardAPI {other:?} is not supported by the test kubelet"),
                    };
                    files.insert(item.path.clone(), (value.into_bytes(), item.mode.map_or(mode, |m| m as u32)));
                }
            }
        }
        return Ok(files);
    }
    bail!("volume {name}: only configMap, secret, emptyDir and projected volumes are supported by the test kubelet")
}

/// A service-account token bound to the pod, from the TokenRequest API (as the node).
async fn request_token(
    client: &Client,
    pod: &Pod,
    audience: Option<String>,
    expiration: Option<i64>,
) -> anyhow::Result<String> {
    let namespace = pod.namespace().unwrap_or_default();
    let account = pod.spec.as_ref().and_then(|s| s.service_account_name.clone()).unwrap_or_else(|| "default".into());
    let body = json!({
        "apiVersion": "authentication.k8s.io/v1",
        "kind": "TokenRequest",
        "spec": {
            "audiences": audience.into_iter().collect::<Vec<_>>(),
            "expirationSeconds": expiration.unwrap_or(3607),
            "boundObjectRef": {"apiVersion": "v1", "kind": "Pod", "name": pod.name_any(), "uid": pod.uid()},
        },
    });
    let request = http::Request::post(format!("/api/v1/namespaces/{namespace}/serviceaccounts/{account}/token"))
        .header("content-type", "application/json")
        .body(serde_json::to_vec(&body)?)?;
    let response: serde_json::Value =
        client.request(request).await.with_context(|| format!("a token for service account {account}"))?;
    response["status"]["token"].as_str().map(str::to_string).context("TokenRequest returned no token")
}
