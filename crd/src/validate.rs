//! Validation of a PretrainRun, in one place for the CLI, the operator and the worker.
//!
//! Every rule reports the field path it is about and what it requires; all failures are returned
//! together so a user fixes a manifest in one pass.

use std::collections::BTreeSet;
use std::fmt;

use crate::spec::{
    BUILTIN_SPECIAL_TOKENS, Data, Eval, Filters, LongContext, Model, NgramLimit, Precision, PretrainRun,
    PretrainRunSpec, QualityClassifier, RopeScalingKind, ScheduleKind, Source, Storage, Tokenizer, Train,
};

/// One broken rule.
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

    fn check(&mut self, ok: bool, path: impl Into<String>, message: impl Into<String>) {
        if !ok {
            self.push(path, message);
        }
    }

    fn fraction(&mut self, value: f64, path: impl Into<String>) {
        self.check((0.0..=1.0).contains(&value), path, format!("must be between 0 and 1, got {value}"));
    }

    fn positive(&mut self, value: f64, path: impl Into<String>) {
        self.check(value > 0.0 && value.is_finite(), path, format!("must be greater than 0, got {value}"));
    }

    pub(crate) fn into_result(self) -> Result<(), ValidationErrors> {
        if self.0.is_empty() { Ok(()) } else { Err(ValidationErrors(self.0)) }
    }

    pub(crate) fn extend(&mut self, other: Vec<FieldError>) {
        self.0.extend(other);
    }
}

/// Longest run name: stage Job names append `-long-context` and must stay within 63 characters.
pub const MAX_RUN_NAME_LEN: usize = 50;

/// Largest `data.maxDocumentBytes`: one document is held in memory whole.
pub const MAX_DOCUMENT_BYTES: u64 = 1 << 30;

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
    data(&spec.data, e);
    tokenizer(&spec.tokenizer, e);
    let before = e.0.len();
    model(&spec.model, e);
    // Step counts derive from the model's size; a broken shape would make them meaningless.
    let model_ok = e.0.len() == before;
    train(spec, e, model_ok);
    if let Some(lc) = &spec.long_context {
        long_context(lc, &spec.train, e);
    }
    eval(&spec.eval, e);
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
fn no_credentials(url: &str, path: &str, e: &mut Errors) {
    e.check(
        !carries_credentials(url),
        path,
        "must not carry credentials (user:password@ or a signed query string); put them in the Secret \
         named by spec.storage.secretRef",
    );
}

/// A URL for messages: as written, unless it carries credentials.
fn shown(url: &str) -> String {
    if carries_credentials(url) { "(a URL with credentials)".into() } else { format!("{url:?}") }
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

fn data(d: &Data, e: &mut Errors) {
    e.check(!d.sources.is_empty(), "spec.data.sources", "must list at least one source");
    let mut names = BTreeSet::new();
    for (i, s) in d.sources.iter().enumerate() {
        source(s, &format!("spec.data.sources[{i}]"), &d.filters, e);
        if !names.insert(s.name.as_str()) {
            e.push(format!("spec.data.sources[{i}].name"), format!("{:?} is used by an earlier source", s.name));
        }
    }
    filters(&d.filters, "spec.data.filters", e);

    let categories: BTreeSet<&str> = d.sources.iter().map(Source::category).collect();
    let q = &d.quality;
    e.fraction(q.threshold, "spec.data.quality.threshold");
    if let Some(f) = q.keep_top_fraction {
        e.check(f > 0.0 && f <= 1.0, "spec.data.quality.keepTopFraction", format!("must be in (0, 1], got {f}"));
    }
    for (i, name) in q.reference_sources.iter().enumerate() {
        e.check(
            names.contains(name.as_str()),
            format!("spec.data.quality.referenceSources[{i}]"),
            format!("{name:?} is not the name of a source"),
        );
    }
    for (i, c) in q.categories.iter().enumerate() {
        e.check(
            categories.contains(c.as_str()),
            format!("spec.data.quality.categories[{i}]"),
            format!("{c:?} is not a category of any source"),
        );
    }
    match q.classifier {
        QualityClassifier::None => {}
        QualityClassifier::Bert => e.check(
            q.model_url.is_some(),
            "spec.data.quality.modelUrl",
            "is required when classifier is bert (a directory with config.json, model.safetensors, tokenizer.json)",
        ),
        QualityClassifier::Ngram => e.check(
            q.model_url.is_some() || q.labelled_url.is_some() || !q.reference_sources.is_empty(),
            "spec.data.quality",
            "the ngram classifier needs modelUrl, labelledUrl or referenceSources to learn from",
        ),
    }

    let m = &d.dedup.minhash;
    e.check((1..=64).contains(&m.ngram), "spec.data.dedup.minhash.ngram", "must be between 1 and 64");
    e.check((1..=256).contains(&m.buckets), "spec.data.dedup.minhash.buckets", "must be between 1 and 256");
    e.check(
        (1..=256).contains(&m.hashes_per_bucket),
        "spec.data.dedup.minhash.hashesPerBucket",
        "must be between 1 and 256",
    );
    e.fraction(m.jaccard_threshold, "spec.data.dedup.minhash.jaccardThreshold");

    for (category, w) in &d.mix.weights {
        let path = format!("spec.data.mix.weights.{category}");
        e.check(categories.contains(category.as_str()), &path, format!("{category:?} is not a category of any source"));
        e.check(*w >= 0.0 && w.is_finite(), &path, format!("must be 0 or more, got {w}"));
    }
    if !d.mix.weights.is_empty() {
        e.check(
            d.mix.weights.values().any(|w| *w > 0.0),
            "spec.data.mix.weights",
            "at least one weight must be greater than 0",
        );
    }
    e.positive(d.mix.max_epochs, "spec.data.mix.maxEpochs");
    e.check(
        (0.0..0.5).contains(&d.held_out_fraction),
        "spec.data.heldOutFraction",
        format!("must be at least 0 and below 0.5, got {}", d.held_out_fraction),
    );
    e.check((1..=10_000).contains(&d.shards), "spec.data.shards", "must be between 1 and 10000");
    e.check(
        (1..=MAX_DOCUMENT_BYTES).contains(&d.max_document_bytes),
        "spec.data.maxDocumentBytes",
        format!("must be between 1 and {MAX_DOCUMENT_BYTES} (1 GiB), got {}", d.max_document_bytes),
    );
}

fn source(s: &Source, path: &str, global: &Filters, e: &mut Errors) {
    if let Err(why) = dns_label(&s.name, 63) {
        e.push(format!("{path}.name"), why);
    }
    e.check(!s.url.trim().is_empty(), format!("{path}.url"), "must not be empty");
    no_credentials(&s.url, &format!("{path}.url"), e);
    if s.resolved_format().is_none() {
        e.push(
            format!("{path}.format"),
            format!("cannot be inferred from {}; set one of warc, jsonl, parquet, text", shown(&s.url)),
        );
    }
    e.check(!s.text_field.is_empty(), format!("{path}.textField"), "must not be empty");
    if let Some(category) = &s.category
        && let Err(why) = dns_label(category, 63)
    {
        e.push(format!("{path}.category"), why);
    }
    if s.filters.is_some() {
        match crate::manifest::source_filters(global, s, &format!("{path}.filters")) {
            Ok(merged) => filters(&merged, &format!("{path}.filters"), e),
            Err(errs) => e.extend(errs),
        }
    }
}

fn filters(f: &Filters, path: &str, e: &mut Errors) {
    let g = &f.gopher_quality;
    let p = format!("{path}.gopherQuality");
    e.check(
        g.min_words <= g.max_words,
        format!("{p}.minWords"),
        format!("must not exceed maxWords ({} > {})", g.min_words, g.max_words),
    );
    e.check(
        g.min_avg_word_length <= g.max_avg_word_length,
        format!("{p}.minAvgWordLength"),
        "must not exceed maxAvgWordLength",
    );
    for (v, name) in [
        (g.max_bullet_lines_ratio, "maxBulletLinesRatio"),
        (g.max_ellipsis_lines_ratio, "maxEllipsisLinesRatio"),
        (g.min_alpha_words_ratio, "minAlphaWordsRatio"),
    ] {
        e.fraction(v, format!("{p}.{name}"));
    }
    let r = &f.gopher_repetition;
    let p = format!("{path}.gopherRepetition");
    for (v, name) in [
        (r.dup_line_fraction, "dupLineFraction"),
        (r.dup_para_fraction, "dupParaFraction"),
        (r.dup_line_char_fraction, "dupLineCharFraction"),
        (r.dup_para_char_fraction, "dupParaCharFraction"),
    ] {
        e.fraction(v, format!("{p}.{name}"));
    }
    ngram_limits(&r.top_ngrams, &format!("{p}.topNgrams"), e);
    ngram_limits(&r.dup_ngrams, &format!("{p}.dupNgrams"), e);
    let w = &f.fineweb;
    let p = format!("{path}.fineweb");
    for (v, name) in [
        (w.min_line_punctuation_ratio, "minLinePunctuationRatio"),
        (w.max_short_line_ratio, "maxShortLineRatio"),
        (w.max_duplicate_line_char_ratio, "maxDuplicateLineCharRatio"),
    ] {
        e.fraction(v, format!("{p}.{name}"));
    }
    let l = &f.language;
    e.fraction(l.min_score, format!("{path}.language.minScore"));
    if l.enabled {
        e.check(!l.languages.is_empty(), format!("{path}.language.languages"), "must list a language when enabled");
    }
    for (i, code) in l.languages.iter().enumerate() {
        e.check(
            code.len() == 2 && code.bytes().all(|b| b.is_ascii_lowercase()),
            format!("{path}.language.languages[{i}]"),
            format!("must be a two-letter ISO 639-1 code, got {code:?}"),
        );
    }
}

fn ngram_limits(limits: &[NgramLimit], path: &str, e: &mut Errors) {
    let mut seen = BTreeSet::new();
    for (i, l) in limits.iter().enumerate() {
        e.check((1..=64).contains(&l.n), format!("{path}[{i}].n"), "must be between 1 and 64");
        e.check(seen.insert(l.n), format!("{path}[{i}].n"), format!("n = {} is listed twice", l.n));
        e.fraction(l.max_fraction, format!("{path}[{i}].maxFraction"));
    }
}

fn tokenizer(t: &Tokenizer, e: &mut Errors) {
    let specials = BUILTIN_SPECIAL_TOKENS.len() + t.special_tokens.len();
    let smallest = 256 + specials as u64;
    e.check(
        u64::from(t.vocab_size) >= smallest && t.vocab_size <= 1 << 20,
        "spec.tokenizer.vocabSize",
        format!("must be between {smallest} (256 bytes + {specials} special tokens) and 1048576, got {}", t.vocab_size),
    );
    e.check(t.train_sample_bytes > 0, "spec.tokenizer.trainSampleBytes", "must be greater than 0");
    let mut seen: BTreeSet<&str> = BUILTIN_SPECIAL_TOKENS.into_iter().collect();
    for (i, tok) in t.special_tokens.iter().enumerate() {
        let path = format!("spec.tokenizer.specialTokens[{i}]");
        if tok.is_empty() {
            e.push(path, "must not be empty");
        } else if !seen.insert(tok) {
            e.push(path, format!("{tok:?} is a built-in special token or listed twice"));
        }
    }
    if let Some(url) = &t.url {
        e.check(!url.trim().is_empty(), "spec.tokenizer.url", "must not be empty when set");
        no_credentials(url, "spec.tokenizer.url", e);
    }
}

fn model(m: &Model, e: &mut Errors) {
    let c = m.resolved();
    // Report against the first field the user set among those a rule reads, else against the preset.
    let field = |candidates: &[(bool, &str)]| {
        candidates
            .iter()
            .find(|(set, _)| *set)
            .map_or_else(|| "spec.model.preset".to_string(), |(_, name)| format!("spec.model.{name}"))
    };
    let (dim, heads, kv_heads) =
        ((m.dim.is_some(), "dim"), (m.heads.is_some(), "heads"), (m.kv_heads.is_some(), "kvHeads"));
    e.check((8..=65_536).contains(&c.dim), field(&[dim]), format!("dim must be between 8 and 65536, got {}", c.dim));
    e.check(
        (1..=1024).contains(&c.layers),
        field(&[(m.layers.is_some(), "layers")]),
        format!("layers must be between 1 and 1024, got {}", c.layers),
    );
    e.check(
        (1..=1 << 20).contains(&c.ffn_dim),
        field(&[(m.ffn_dim.is_some(), "ffnDim")]),
        format!("ffnDim must be between 1 and 1048576, got {}", c.ffn_dim),
    );
    if c.heads == 0 || c.kv_heads == 0 || c.heads > 1024 {
        e.push(field(&[heads, kv_heads]), "heads and kvHeads must be between 1 and 1024");
        return;
    }
    if !c.dim.is_multiple_of(c.heads) {
        e.push(field(&[heads, dim]), format!("dim ({}) must be a multiple of heads ({})", c.dim, c.heads));
    } else if !(c.dim / c.heads).is_multiple_of(2) {
        e.push(field(&[dim, heads]), format!("head dimension dim / heads = {} must be even for RoPE", c.dim / c.heads));
    }
    if !c.heads.is_multiple_of(c.kv_heads) {
        e.push(
            field(&[kv_heads, heads]),
            format!("heads ({}) must be a multiple of kvHeads ({})", c.heads, c.kv_heads),
        );
    }
    e.check(
        c.rope_base > 1.0 && c.rope_base.is_finite(),
        field(&[(m.rope_base.is_some(), "ropeBase")]),
        format!("ropeBase must be greater than 1, got {}", c.rope_base),
    );
    e.check(
        c.norm_eps > 0.0 && c.norm_eps < 1.0,
        field(&[(m.norm_eps.is_some(), "normEps")]),
        format!("normEps must be in (0, 1), got {}", c.norm_eps),
    );
}

fn train(spec: &PretrainRunSpec, e: &mut Errors, model_ok: bool) {
    let t = &spec.train;
    e.check(
        (16..=1 << 20).contains(&t.seq_len),
        "spec.train.seqLen",
        format!("must be between 16 and 1048576, got {}", t.seq_len),
    );
    e.check(t.micro_batch_size >= 1, "spec.train.microBatchSize", "must be at least 1");
    let ranks = t.resources.ranks();
    let per_step = u64::from(t.seq_len).saturating_mul(u64::from(t.micro_batch_size)).saturating_mul(ranks);
    if t.global_batch_tokens < per_step.max(1) {
        e.push(
            "spec.train.globalBatchTokens",
            format!(
                "must be at least seqLen x microBatchSize x data-parallel ranks ({} x {} x {ranks} = {per_step}), got {}",
                t.seq_len, t.micro_batch_size, t.global_batch_tokens
            ),
        );
    } else if per_step > 0 && !t.global_batch_tokens.is_multiple_of(per_step) {
        e.push(
            "spec.train.globalBatchTokens",
            format!(
                "must be a multiple of seqLen x microBatchSize x data-parallel ranks ({} x {} x {ranks} = {per_step}), got {}",
                t.seq_len, t.micro_batch_size, t.global_batch_tokens
            ),
        );
    }
    if let Some(tokens) = t.tokens {
        e.check(
            tokens >= t.global_batch_tokens,
            "spec.train.tokens",
            format!("must be at least one global batch ({} tokens), got {tokens}", t.global_batch_tokens),
        );
    }
    let o = &t.optimizer;
    e.positive(o.lr, "spec.train.optimizer.lr");
    e.check(
        o.min_lr >= 0.0 && o.min_lr <= o.lr,
        "spec.train.optimizer.minLr",
        format!("must be between 0 and lr ({}), got {}", o.lr, o.min_lr),
    );
    e.check(o.weight_decay >= 0.0, "spec.train.optimizer.weightDecay", "must be 0 or more");
    if o.betas.len() == 2 {
        for (i, b) in o.betas.iter().enumerate() {
            e.check(
                (0.0..1.0).contains(b),
                format!("spec.train.optimizer.betas[{i}]"),
                format!("must be at least 0 and below 1, got {b}"),
            );
        }
    } else {
        e.push("spec.train.optimizer.betas", format!("must have exactly 2 values, got {}", o.betas.len()));
    }
    e.positive(o.eps, "spec.train.optimizer.eps");
    e.check(o.grad_clip >= 0.0, "spec.train.optimizer.gradClip", "must be 0 (off) or more");

    let s = &t.schedule;
    if model_ok && t.global_batch_tokens > 0 {
        let steps = spec.train_steps();
        e.check(
            s.warmup_steps < steps.max(1),
            "spec.train.schedule.warmupSteps",
            format!("must be fewer than the run's {steps} optimizer steps, got {}", s.warmup_steps),
        );
    }
    if s.kind == ScheduleKind::Wsd {
        e.check(
            s.decay_fraction > 0.0 && s.decay_fraction <= 1.0,
            "spec.train.schedule.decayFraction",
            format!("must be in (0, 1] for wsd, got {}", s.decay_fraction),
        );
    }
    e.check(t.checkpoint.every_steps >= 1, "spec.train.checkpoint.everySteps", "must be at least 1");
    e.check(t.checkpoint.keep >= 1, "spec.train.checkpoint.keep", "must keep at least 1 checkpoint");
    e.check(t.resources.nodes >= 1, "spec.train.resources.nodes", "must be at least 1");
    e.check(t.resources.gpus_per_node <= 16, "spec.train.resources.gpusPerNode", "must be at most 16");
    if t.precision == Precision::Bf16 && t.resources.gpus_per_node == 0 {
        e.push("spec.train.precision", "bf16 needs GPUs (gpusPerNode > 0); use auto or fp32 on CPUs");
    }
    e.check(t.loss_spike.window >= 2, "spec.train.lossSpike.window", "must be at least 2");
}

fn long_context(lc: &LongContext, t: &Train, e: &mut Errors) {
    e.check(
        lc.seq_len > t.seq_len,
        "spec.longContext.seqLen",
        format!("must be greater than spec.train.seqLen ({}), got {}", t.seq_len, lc.seq_len),
    );
    e.check(
        lc.tokens_fraction > 0.0 && lc.tokens_fraction <= 1.0,
        "spec.longContext.tokensFraction",
        format!("must be in (0, 1], got {}", lc.tokens_fraction),
    );
    if let Some(f) = lc.rope.factor {
        e.check(f >= 1.0 && f.is_finite(), "spec.longContext.rope.factor", format!("must be at least 1, got {f}"));
        if lc.rope.scaling == RopeScalingKind::None {
            e.push("spec.longContext.rope.factor", "has no effect with scaling none; set base or a scaling");
        }
    }
    if let Some(b) = lc.rope.base {
        e.check(b > 1.0 && b.is_finite(), "spec.longContext.rope.base", format!("must be greater than 1, got {b}"));
    }
    if let Some(mb) = lc.micro_batch_size {
        e.check(mb >= 1, "spec.longContext.microBatchSize", "must be at least 1");
    }
}

fn eval(ev: &Eval, e: &mut Errors) {
    let mut names = BTreeSet::new();
    for (i, p) in ev.probes.iter().enumerate() {
        let path = format!("spec.eval.probes[{i}]");
        e.check(!p.name.is_empty(), format!("{path}.name"), "must not be empty");
        e.check(names.insert(p.name.as_str()), format!("{path}.name"), format!("{:?} is used twice", p.name));
        e.check(!p.prompt.is_empty(), format!("{path}.prompt"), "must not be empty");
        e.check(!p.target.is_empty(), format!("{path}.target"), "must not be empty");
    }
    let mut names = BTreeSet::new();
    for (i, b) in ev.benchmarks.iter().enumerate() {
        let path = format!("spec.eval.benchmarks[{i}]");
        e.check(!b.name.is_empty(), format!("{path}.name"), "must not be empty");
        e.check(names.insert(b.name.as_str()), format!("{path}.name"), format!("{:?} is used twice", b.name));
        e.check(!b.url.trim().is_empty(), format!("{path}.url"), "must not be empty");
        no_credentials(&b.url, &format!("{path}.url"), e);
    }
    for (i, len) in ev.passkey.lengths.iter().enumerate() {
        e.check(
            *len >= 64,
            format!("spec.eval.passkey.lengths[{i}]"),
            format!("must be at least 64 tokens, got {len}"),
        );
    }
    e.check(ev.passkey.trials >= 1, "spec.eval.passkey.trials", "must be at least 1");
    e.check(ev.max_held_out_tokens >= 1, "spec.eval.maxHeldOutTokens", "must be at least 1");
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

fn dns_subdomain(s: &str) -> Result<(), String> {
    if s.len() > 253 || s.is_empty() || s.split('.').any(|l| dns_label(l, 63).is_err()) {
        Err(format!("must be a DNS-1123 subdomain (lowercase labels joined by '.'), got {s:?}"))
    } else {
        Ok(())
    }
}

impl PretrainRunSpec {
    /// The train stage's token budget: as set, or 20 tokens per parameter (Chinchilla).
    pub fn train_tokens(&self) -> u64 {
        self.train
            .tokens
            .unwrap_or_else(|| self.model.resolved().parameters(self.tokenizer.vocab_size).saturating_mul(20))
    }

    /// Optimizer steps of the train stage (the budget rounded up to whole global batches).
    pub fn train_steps(&self) -> u64 {
        self.train_tokens().div_ceil(self.train.global_batch_tokens.max(1))
    }
}
