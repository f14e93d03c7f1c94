//! The trainable weights by name (Hugging Face's names), their seeded initialisation, and views by
//! name prefix that the model's layers load themselves from.

use std::collections::HashMap;

use candle_core::{DType, Device, Result, Tensor, Var};

use super::{LlamaConfig, ParamKind};

/// The trainable weights, by name.
#[derive(Debug)]
pub struct Params {
    names: Vec<String>,
    kinds: Vec<ParamKind>,
    vars: Vec<Var>,
    index: HashMap<String, usize>,
}

/// A deterministic normal generator (SplitMix64 + Box-Muller), so that a seed fixes the initial weights
/// on every machine.
fn normals(seed: u64, n: usize, std: f64) -> Vec<f32> {
    let mut state = seed;
    let mut next = || pretrain_crd::seeded::unit(&mut state);
    let mut out = Vec::with_capacity(n + 1);
    while out.len() < n {
        let (u1, u2) = (next().max(f64::MIN_POSITIVE), next());
        let r = (-2.0 * u1.ln()).sqrt() * std;
        let theta = 2.0 * std::f64::consts::PI * u2;
        out.push((r * theta.cos()) as f32);
        out.push((r * theta.sin()) as f32);
    }
    out.truncate(n);
    out
}

impl Params {
    /// Initial weights: matrices ~ N(0, 0.02), residual projections scaled by 1/sqrt(2 x layers),
    /// norm gains 1.
    pub fn init(config: &LlamaConfig, seed: u64, device: &Device) -> Result<Self> {
        use rayon::prelude::*;
        // Each tensor has a seed of its own, so they can be drawn in parallel (a 1.1B model's
        // billion draws take seconds on one core).
        let values: Vec<Vec<f32>> = config
            .params()
            .into_par_iter()
            .enumerate()
            .map(|(i, (_, shape, kind))| {
                let n: usize = shape.iter().product();
                match kind {
                    ParamKind::Norm => vec![1f32; n],
                    ParamKind::OutProjection => {
                        normals(seed ^ (i as u64) << 20, n, 0.02 / (2.0 * config.layers as f64).sqrt())
                    }
                    ParamKind::Embedding | ParamKind::Matrix => normals(seed ^ (i as u64) << 20, n, 0.02),
                }
            })
            .collect();
        let mut tensors = Vec::new();
        for ((name, shape, kind), values) in config.params().into_iter().zip(values) {
            tensors.push((name, kind, Tensor::from_vec(values, shape, device)?));
        }
        Self::from_tensors(tensors)
    }

    fn from_tensors(tensors: Vec<(String, ParamKind, Tensor)>) -> Result<Self> {
        let mut params = Self { names: Vec::new(), kinds: Vec::new(), vars: Vec::new(), index: HashMap::new() };
        for (name, kind, tensor) in tensors {
            params.index.insert(name.clone(), params.names.len());
            params.names.push(name);
            params.kinds.push(kind);
            params.vars.push(Var::from_tensor(&tensor)?);
        }
        Ok(params)
    }

    /// Weights read from `tensors` (a loaded checkpoint), checked against the config: every name
    /// present with its shape, nothing extra.
    pub fn from_named(
        config: &LlamaConfig,
        mut tensors: HashMap<String, Tensor>,
        device: &Device,
    ) -> std::result::Result<Self, String> {
        let mut out = Vec::new();
        for (name, shape, kind) in config.params() {
            let t = tensors.remove(&name).ok_or_else(|| format!("missing tensor {name}"))?;
            if t.dims() != shape.as_slice() {
                return Err(format!("tensor {name} has shape {:?}, the config needs {shape:?}", t.dims()));
            }
            let t = t.to_dtype(DType::F32).and_then(|t| t.to_device(device)).map_err(|e| e.to_string())?;
            out.push((name, kind, t));
        }
        if let Some(extra) = tensors.keys().next() {
            return Err(format!("unexpected tensor {extra}"));
        }
        Self::from_tensors(out).map_err(|e| e.to_string())
    }

    /// A weight by name (panics on a name the model does not have).
    pub fn get(&self, name: &str) -> &Tensor {
        self.vars[self.index[name]].as_tensor()
    }

    /// Names, kinds and variables, in name order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, ParamKind, &Var)> {
        self.names.iter().zip(&self.kinds).zip(&self.vars).map(|((n, k), v)| (n.as_str(), *k, v))
    }

    /// The weights as named tensors (sharing storage with the variables).
    pub fn named(&self) -> Vec<(String, Tensor)> {
        self.iter().map(|(n, _, v)| (n.to_string(), v.as_tensor().clone())).collect()
    }

    /// Number of tensors.
    pub fn len(&self) -> usize {
        self.vars.len()
    }

    /// Whether there are no tensors.
    pub fn is_empty(&self) -> bool {
        self.vars.is_empty()
    }
}

/// The weights under one name prefix (`model.layers.3.self_attn`), as candle's `VarBuilder::pp`
/// gives them: a layer loads its own weights by their short names.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Prefix<'a> {
    params: &'a Params,
    prefix: &'a str,
}

impl Params {
    /// The weights under `prefix`.
    pub(crate) fn prefix<'a>(&'a self, prefix: &'a str) -> Prefix<'a> {
        Prefix { params: self, prefix }
    }
}

impl Prefix<'_> {
    /// The weight `{prefix}.{name}.weight` (sharing storage and identity with its variable, so that
    /// gradients and optimizer updates reach it; an empty prefix is the root).
    pub(crate) fn weight(&self, name: &str) -> Result<Tensor> {
        let full =
            [self.prefix, name, "weight"].iter().filter(|p| !p.is_empty()).copied().collect::<Vec<_>>().join(".");
        match self.params.index.get(&full) {
            Some(&i) => Ok(self.params.vars[i].as_tensor().clone()),
            None => candle_core::bail!("the model has no weight {full}"),
        }
    }
}
