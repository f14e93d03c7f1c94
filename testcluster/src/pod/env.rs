//! A container's environment: `envFrom`, `env` values and `valueFrom` references, and `$(VAR)`
//! expansion.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use anyhow::bail;
use k8s_openapi::api::core::v1::{ConfigMap, Container, EnvVar, Pod, Secret};
use kube::api::Api;
use kube::{Client, ResourceExt};

/// Reads the values of a container's env, `envFrom` first, then `env` in order.
pub async fn container_env(
    client: &Client,
    pod: &Pod,
    container: &Container,
    pod_ip: Ipv4Addr,
) -> anyhow::Result<Vec<(String, String)>> {
    let namespace = pod.namespace().unwrap_or_default();
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &namespace);
    let config_maps: Api<ConfigMap> = Api::namespaced(client.clone(), &namespace);
    let mut env: Vec<(String, String)> = Vec::new();
    for source in container.env_from.iter().flatten() {
        let prefix = source.prefix.clone().unwrap_or_default();
        if let Some(s) = &source.secret_ref {
            match secrets.get_opt(&s.name).await? {
                Some(secret) => {
                    for (k, v) in secret.data.unwrap_or_default() {
                        env.push((format!("{prefix}{k}"), String::from_utf8_lossy(&v.0).into_owned()));
                    }
                }
                None if s.optional == Some(true) => {}
                None => bail!("secret {namespace}/{} (envFrom) not found", s.name),
            }
        }
        if let Some(c) = &source.config_map_ref {
            match config_maps.get_opt(&c.name).await? {
                Some(map) => {
                    env.extend(map.data.unwrap_or_default().into_iter().map(|(k, v)| (format!("{prefix}{k}"), v)))
                }
                None if c.optional == Some(true) => {}
                None => bail!("configmap {namespace}/{} (envFrom) not found", c.name),
            }
        }
    }
    for var in container.env.iter().flatten() {
        if let Some(value) = env_value(&secrets, &config_maps, pod, var, pod_ip, &env).await? {
            env.retain(|(k, _)| *k != var.name);
            env.push((var.name.clone(), value));
        }
    }
    Ok(env)
}

async fn env_value(
    secrets: &Api<Secret>,
    config_maps: &Api<ConfigMap>,
    pod: &Pod,
    var: &EnvVar,
    pod_ip: Ipv4Addr,
    earlier: &[(String, String)],
) -> anyhow::Result<Option<String>> {
    if let Some(value) = &var.value {
        return Ok(Some(expand(value, earlier)));
    }
    let Some(from) = &var.value_from else { return Ok(Some(String::new())) };
    if let Some(field) = &from.field_ref {
        let path = field.field_path.as_str();
        let meta = &pod.metadata;
        let keyed = |prefix: &str, map: &Option<BTreeMap<String, String>>| {
            let key = path.strip_prefix(prefix)?.strip_suffix("']")?;
            Some(map.as_ref().and_then(|m| m.get(key)).cloned().unwrap_or_default())
        };
        let value = match path {
            "metadata.name" => meta.name.clone().unwrap_or_default(),
            "metadata.namespace" => meta.namespace.clone().unwrap_or_default(),
            "metadata.uid" => meta.uid.clone().unwrap_or_default(),
            "spec.nodeName" => pod.spec.as_ref().and_then(|s| s.node_name.clone()).unwrap_or_default(),
            "spec.serviceAccountName" => {
                pod.spec.as_ref().and_then(|s| s.service_account_name.clone()).unwrap_or_default()
            }
            "status.podIP" | "status.hostIP" => pod_ip.to_string(),
            _ => match keyed("metadata.annotations['", &meta.annotations)
                .or_else(|| keyed("metadata.labels['", &meta.labels))
            {
                Some(v) => v,
                None => bail!("env {}: fieldRef {path} is not supported by the test kubelet", var.name),
            },
        };
        return Ok(Some(value));
    }
    if let Some(key) = &from.secret_key_ref {
        let value = secrets.get_opt(&key.name).await?.and_then(|s| s.data?.get(&key.key).cloned());
        return match value {
            Some(v) => Ok(Some(String::from_utf8_lossy(&v.0).into_owned())),
            None if key.optional == Some(true) => Ok(None),
            None => bail!("env {}: secret {} has no key {}", var.name, key.name, key.key),
        };
    }
    if let Some(key) = &from.config_map_key_ref {
        let value = config_maps.get_opt(&key.name).await?.and_then(|c| c.data?.get(&key.key).cloned());
        return match value {
            Some(v) => Ok(Some(v)),
            None if key.optional == Some(true) => Ok(None),
            None => bail!("env {}: configmap {} has no key {}", var.name, key.name, key.key),
        };
    }
    bail!("env {}: this valueFrom is not supported by the test kubelet", var.name)
}

/// Kubernetes' `$(VAR)` expansion in env values, command and args: a defined variable is
/// replaced, `$$` is a literal `$`, anything else is left as written.
pub fn expand(text: &str, env: &[(String, String)]) -> String {
    let mut out = String::new();
    let mut rest = text;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        if let Some(stripped) = after.strip_prefix('$') {
            out.push('$');
            rest = stripped;
        } else if let Some(inner) = after.strip_prefix('(')
            && let Some(end) = inner.find(')')
            && let Some((_, v)) = env.iter().rev().find(|(k, _)| *k == inner[..end])
        {
            out.push_str(v);
            rest = &inner[end + 1..];
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn variables_expand_the_way_kubernetes_expands_them() {
        let env = vec![("POD_IP".to_string(), "10.1.0.2".to_string()), ("A".to_string(), "x".to_string())];
        assert_eq!(expand("--listen=$(POD_IP):8080", &env), "--listen=10.1.0.2:8080");
        assert_eq!(expand("$$(A) $(A) $(B) $", &env), "$(A) x $(B) $");
    }
}
