//! The quality scorer a map task applies: loaded from `spec.data.quality.modelUrl`, or trained here
//! on labelled documents (`labelledUrl`, or the reference sources against the rest) and kept in the
//! store for every other map task.
//!
//! A trained classifier is measured on the fifth of the labelled documents it did not train on
//! ([`held_out`]): precision, recall, F1, AUC and the score deciles per class
//! (`quality/eval-<hash>.json`, reported in the stage's statistics).

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use bytes::Bytes;
use pretrain_crd::spec::{Data, QualityClassifier};
use pretrain_store::StageDir;
use pretrain_store::artifact::ClassifierEval;

use super::bert::{BertScorer, Encoder, ModelFiles};
use super::quality::{HeadTraining, LinearHead, QualityError, QualityModel, Training, evaluate, held_out};
use super::reader::{self, Item, ReadOptions};
use super::stage::{DataPrepError, Input, Result};
use crate::Context;
use crate::context::{read_url, read_url_opt};
use crate::frame::scratch;

/// A model-based quality scorer.
#[derive(Debug)]
pub(super) enum QualityScorer {
    /// The hashed n-gram model.
    Ngram(QualityModel),
    /// A shipped BERT sequence classifier.
    Bert(Box<BertScorer>),
    /// A linear head trained here over a frozen BERT-family encoder.
    Head { encoder: Box<Encoder>, head: LinearHead },
}

impl QualityScorer {
    /// Each text's probability of being good, the BERT models run `batch` documents at a time.
    pub(super) fn score_batch(&self, texts: &[&str], batch: usize) -> Result<Vec<f32>, String> {
        match self {
            QualityScorer::Ngram(model) => Ok(texts.iter().map(|t| model.score(t)).collect()),
            QualityScorer::Bert(model) => model.score_batch(texts, batch).map_err(|e| e.to_string()),
            QualityScorer::Head { encoder, head } => {
                let embeddings = encoder.embed(texts, batch).map_err(|e| e.to_string())?;
                Ok(embeddings.iter().map(|e| head.score(e)).collect())
            }
        }
    }
}

/// Where the trained model, and its evaluation, are kept for every map shard; keyed by the config
/// hash so a model trained for other settings is never reused.
fn trained_name(hash: &str, what: &str) -> String {
    format!("quality/{what}-{}", &hash[..hash.len().min(16)])
}

/// The evaluation of the classifier trained for this config, if one was.
pub(super) async fn trained_eval(dir: &StageDir, hash: &str) -> Result<Option<ClassifierEval>> {
    let name = format!("{}.json", trained_name(hash, "eval"));
    let Some(bytes) = dir.store().get_opt(&dir.key(&name)?).await? else { return Ok(None) };
    serde_json::from_slice(&bytes).map(Some).map_err(|e| DataPrepError::Invalid(format!("{}: {e}", dir.url(&name))))
}

/// The configured quality scorer, if any.
pub(super) async fn quality_scorer(ctx: &Context, hash: &str, all: &[Input]) -> Result<Option<QualityScorer>> {
    let q = &ctx.run.spec.data.quality;
    match q.classifier {
        QualityClassifier::None => Ok(None),
        QualityClassifier::Ngram => Ok(Some(QualityScorer::Ngram(ngram_model(ctx, hash, all).await?))),
        QualityClassifier::Bert => bert_scorer(ctx, hash, all).await.map(Some),
    }
}

/// Whether the stage trains the classifier (else it uses the model as shipped).
fn trains(data: &Data) -> bool {
    data.quality.labelled_url.is_some() || !data.quality.reference_sources.is_empty()
}

async fn bert_scorer(ctx: &Context, hash: &str, all: &[Input]) -> Result<QualityScorer> {
    let url = ctx.run.spec.data.quality.model_url.as_deref().expect("validated: bert has a modelUrl");
    let dir = url.trim_end_matches('/').to_string();
    let config = read_url(&format!("{dir}/config.json")).await?;
    let weights = read_url(&format!("{dir}/model.safetensors")).await?;
    let tokenizer = read_url(&format!("{dir}/tokenizer.json")).await?;
    let sentence = read_url_opt(&format!("{dir}/sentence_bert_config.json")).await?;
    let trains = trains(&ctx.run.spec.data);
    // Data-prep pods are CPU pods; a GPU build on a GPU node uses the GPU.
    let device = candle_core::Device::cuda_if_available(0).unwrap_or(candle_core::Device::Cpu);
    let invalid = {
        let dir = dir.clone();
        move |e: super::bert::BertError| DataPrepError::Invalid(format!("spec.data.quality.modelUrl: {dir}/{e}"))
    };
    let loaded = tokio::task::spawn_blocking(move || {
        let files = ModelFiles {
            config: &config,
            weights: &weights,
            tokenizer: &tokenizer,
            sentence_config: sentence.as_deref(),
        };
        if trains {
            Encoder::from_bytes(&files, &device).map(|e| Loaded::Encoder(Box::new(e)))
        } else {
            BertScorer::from_bytes(&files, &device).map(|s| Loaded::Classifier(Box::new(s)))
        }
    })
    .await
    .expect("loading the model does not panic")
    .map_err(invalid)?;
    match loaded {
        Loaded::Classifier(scorer) => Ok(QualityScorer::Bert(scorer)),
        Loaded::Encoder(encoder) => bert_head(ctx, hash, all, encoder).await,
    }
}

/// What `modelUrl` holds: a classifier used as shipped, or an encoder to train a head under.
enum Loaded {
    Classifier(Box<BertScorer>),
    Encoder(Box<Encoder>),
}

/// The linear head over `encoder`: from an earlier map shard, else trained here.
async fn bert_head(ctx: &Context, hash: &str, all: &[Input], encoder: Box<Encoder>) -> Result<QualityScorer> {
    let name = format!("{}.safetensors", trained_name(hash, "head"));
    let key = ctx.dir.key(&name)?;
    if let Some(bytes) = ctx.dir.store().get_opt(&key).await? {
        let head = LinearHead::from_bytes(&bytes)
            .map_err(|e| DataPrepError::Invalid(format!("{}: {e}", ctx.dir.url(&name))))?;
        return Ok(QualityScorer::Head { encoder, head });
    }
    let examples = labelled(ctx, all).await?;
    let seed = ctx.run.spec.seed;
    let batch = ctx.run.spec.data.quality.batch_size as usize;
    let (encoder, head, eval) = tokio::task::spawn_blocking(move || -> Result<_> {
        let texts: Vec<&str> = examples.iter().map(|(t, _)| t.as_str()).collect();
        let embeddings = encoder.embed(&texts, batch).map_err(|e| DataPrepError::Scorer(e.to_string()))?;
        let (train, test) = split(&examples, seed);
        let train_set: Vec<(&[f32], bool)> = train.iter().map(|&i| (embeddings[i].as_slice(), examples[i].1)).collect();
        let head = LinearHead::train(&train_set, HeadTraining::default())
            .map_err(|e| DataPrepError::Invalid(format!("spec.data.quality: {e}")))?;
        let scored: Vec<(f32, bool)> = test.iter().map(|&i| (head.score(&embeddings[i]), examples[i].1)).collect();
        let eval = evaluate("bert-head", &scored, class_counts(&train, &examples), 0.5);
        Ok((encoder, head, eval))
    })
    .await
    .expect("training the head does not panic")?;
    put_eval(ctx, hash, &eval).await?;
    ctx.dir.put(&name, Bytes::from(head.to_bytes())).await?;
    Ok(QualityScorer::Head { encoder, head })
}

/// The n-gram quality model: loaded from `modelUrl`, else from an earlier map shard, else trained
/// here (deterministic, so every shard that trains it gets the same model).
async fn ngram_model(ctx: &Context, hash: &str, all: &[Input]) -> Result<QualityModel> {
    let q = &ctx.run.spec.data.quality;
    let bad_model = |url: &str, e: QualityError| DataPrepError::Invalid(format!("{url}: {e}"));
    if let Some(url) = &q.model_url {
        let bytes = read_url(url).await?;
        return QualityModel::from_bytes(&bytes).map_err(|e| bad_model(url, e));
    }
    let name = format!("{}.bin", trained_name(hash, "model"));
    let key = ctx.dir.key(&name)?;
    if let Some(bytes) = ctx.dir.store().get_opt(&key).await? {
        return QualityModel::from_bytes(&bytes).map_err(|e| bad_model(&ctx.dir.url(&name), e));
    }
    let examples = labelled(ctx, all).await?;
    let (train, test) = split(&examples, ctx.run.spec.seed);
    let borrowed: Vec<(&str, bool)> = train.iter().map(|&i| (examples[i].0.as_str(), examples[i].1)).collect();
    let training = Training { seed: ctx.run.spec.seed, ..Training::default() };
    let model = QualityModel::train(&borrowed, training)
        .map_err(|e| DataPrepError::Invalid(format!("spec.data.quality: {e}")))?;
    let scored: Vec<(f32, bool)> = test.iter().map(|&i| (model.score(&examples[i].0), examples[i].1)).collect();
    put_eval(ctx, hash, &evaluate("ngram", &scored, class_counts(&train, &examples), 0.5)).await?;
    ctx.dir.put(&name, Bytes::from(model.to_bytes())).await?;
    Ok(model)
}

async fn put_eval(ctx: &Context, hash: &str, eval: &ClassifierEval) -> Result<()> {
    let json = serde_json::to_vec_pretty(eval).expect("an evaluation serialises");
    ctx.dir.put(&format!("{}.json", trained_name(hash, "eval")), Bytes::from(json)).await?;
    Ok(())
}

/// The indices of the training and the held-out examples.
fn split(examples: &[(String, bool)], seed: u64) -> (Vec<usize>, Vec<usize>) {
    (0..examples.len()).partition(|&i| !held_out(&examples[i].0, seed))
}

/// Positive and negative examples among `indices`.
fn class_counts(indices: &[usize], examples: &[(String, bool)]) -> [u64; 2] {
    let positive = indices.iter().filter(|&&i| examples[i].1).count() as u64;
    [positive, indices.len() as u64 - positive]
}

/// The labelled examples: `labelledUrl`'s, else the reference sources' documents against the rest.
async fn labelled(ctx: &Context, all: &[Input]) -> Result<Vec<(String, bool)>> {
    let data = ctx.run.spec.data.clone();
    let limit = data.quality.training_documents as usize;
    if let Some(url) = &data.quality.labelled_url {
        return labelled_examples(url, &read_url(url).await?, limit);
    }
    let tmp = tempfile::tempdir().map_err(scratch(Path::new("tempdir")))?;
    let mut local = Vec::new();
    for (i, input) in all.iter().enumerate() {
        local.push((input.source, input.local(tmp.path(), i).await?));
    }
    tokio::task::spawn_blocking(move || reference_examples(&data, &local, limit))
        .await
        .expect("sampling does not panic")
}

/// `{text, label}` lines; a label is true/false, 1/0, or "good"/"bad"/"hq"/"lq"; the first `limit`
/// of each class.
fn labelled_examples(url: &str, bytes: &[u8], limit: usize) -> Result<Vec<(String, bool)>> {
    let mut out = Vec::new();
    let mut per_class = [0usize; 2];
    for (i, line) in bytes.split(|b| *b == b'\n').enumerate() {
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let bad = |why: &str| DataPrepError::Invalid(format!("{url}:{}: {why}", i + 1));
        let value: serde_json::Value = serde_json::from_slice(line).map_err(|e| bad(&format!("invalid JSON: {e}")))?;
        let text = value.get("text").and_then(|t| t.as_str()).ok_or_else(|| bad("no string field \"text\""))?;
        let label = match value.get("label") {
            Some(serde_json::Value::Bool(b)) => *b,
            Some(serde_json::Value::Number(n)) => n.as_f64().is_some_and(|x| x > 0.5),
            Some(serde_json::Value::String(s)) => matches!(s.as_str(), "good" | "hq" | "positive" | "1" | "true"),
            _ => return Err(bad("no label (true/false, 1/0 or \"good\"/\"bad\")")),
        };
        let count = &mut per_class[usize::from(label)];
        if *count < limit {
            *count += 1;
            out.push((text.to_string(), label));
        }
    }
    Ok(out)
}

/// Positive examples: documents of the reference sources; negative: the other sources' documents,
/// both as extracted (before the rule filters), the first `limit` of each in canonical order.
fn reference_examples(data: &Data, inputs: &[(usize, PathBuf)], limit: usize) -> Result<Vec<(String, bool)>> {
    let reference: HashSet<&str> = data.quality.reference_sources.iter().map(String::as_str).collect();
    let (mut positive, mut negative) = (Vec::new(), Vec::new());
    for (source_index, path) in inputs {
        let source = &data.sources[*source_index];
        let is_reference = reference.contains(source.name.as_str());
        let wanted = if is_reference { &mut positive } else { &mut negative };
        if wanted.len() >= limit {
            continue;
        }
        let options = ReadOptions {
            format: source.resolved_format().expect("validated: every source has a format"),
            text_field: &source.text_field,
            max_document_bytes: data.max_document_bytes,
            extract: &data.extract,
        };
        reader::read_file(path, &options, &mut |item| {
            if let Item::Document(d) = item
                && wanted.len() < limit
            {
                wanted.push((d.text, is_reference));
            }
        })?;
    }
    positive.extend(negative);
    Ok(positive)
}
