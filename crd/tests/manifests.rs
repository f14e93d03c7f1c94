//! Manifests against validation and against the generated CRD schema: the examples pass, and each
//! broken manifest gives its exact error.

use std::path::PathBuf;

use pretrain_crd::{ManifestError, PretrainRun};
use serde_yaml::Value;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn examples() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(repo().join("examples"))
        .expect("examples/ exists")
        .map(|e| e.expect("readable entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    assert!(files.len() >= 2, "expected the tiny and multinode examples, found {files:?}");
    files
}

const MINIMAL: &str = r#"
apiVersion: pretrain.dev/v1alpha1
kind: PretrainRun
metadata:
  name: base
spec:
  storage:
    url: file:///tmp/runs
  data:
    sources:
      - name: web
        url: /data/crawl/*.warc.gz
      - name: code
        url: /data/code.jsonl.zst
  model:
    preset: tiny
  train:
    seqLen: 256
    tokens: 1048576
    globalBatchTokens: 4096
    microBatchSize: 4
    schedule: {warmupSteps: 10}
    resources: {gpusPerNode: 0}
"#;

/// MINIMAL with dotted paths set to YAML values (`spec.train.seqLen` = `512`); `~` removes a key.
fn patched(patches: &[(&str, &str)]) -> String {
    let mut doc: Value = serde_yaml::from_str(MINIMAL).unwrap();
    for (path, value) in patches {
        let value: Value = serde_yaml::from_str(value).unwrap();
        let mut node = &mut doc;
        let parts: Vec<&str> = path.split('.').collect();
        for (i, part) in parts.iter().enumerate() {
            let last = i == parts.len() - 1;
            node = match part.parse::<usize>() {
                Ok(index) => &mut node.as_sequence_mut().expect("a list")[index],
                Err(_) => {
                    let map = node.as_mapping_mut().expect("a map");
                    if last && value.is_null() {
                        map.remove(*part);
                        break;
                    }
                    map.entry(Value::from(*part)).or_insert_with(|| Value::Mapping(Default::default()))
                }
            };
            if last {
                *node = value.clone();
            }
        }
    }
    serde_yaml::to_string(&doc).unwrap()
}

fn errors_of(text: &str) -> Vec<String> {
    match pretrain_crd::parse(text, "test.yaml") {
        Ok(_) => vec![],
        Err(ManifestError::Invalid { errors, .. }) => errors.0.iter().map(ToString::to_string).collect(),
        Err(e) => vec![e.to_string()],
    }
}

#[test]
fn every_example_validates() {
    for file in examples() {
        let run = pretrain_crd::load(&file).unwrap_or_else(|e| panic!("{e}"));
        assert!(run.metadata.name.is_some(), "{}", file.display());
    }
}

#[test]
fn minimal_manifest_validates_and_takes_defaults() {
    let run = pretrain_crd::parse(MINIMAL, "minimal.yaml").unwrap();
    let spec = &run.spec;
    assert_eq!(spec.tokenizer.vocab_size, 32_000);
    assert_eq!(spec.data.dedup.minhash.ngram, 5);
    assert_eq!(spec.data.dedup.minhash.buckets, 14);
    assert_eq!(spec.data.dedup.minhash.hashes_per_bucket, 8);
    assert_eq!(spec.data.filters.gopher_quality.min_words, 50);
    assert_eq!(spec.data.filters.fineweb.min_line_punctuation_ratio, 0.12);
    assert_eq!(spec.data.filters.c4.min_words_per_line, 3);
    assert_eq!(spec.train.optimizer.betas, vec![0.9, 0.95]);
    assert_eq!(spec.scheduling.queue, "default");
    assert_eq!(spec.data.sources[1].category(), "code");
}

#[test]
#[expect(clippy::too_many_lines, reason = "a table of cases")]
fn broken_manifests_give_exact_errors() {
    let cases: &[(&[(&str, &str)], &str)] = &[
        (
            &[("spec.train.globalBatchTokens", "5000")],
            "spec.train.globalBatchTokens: must be a multiple of seqLen x microBatchSize x data-parallel ranks (256 x 4 x 1 = 1024), got 5000",
        ),
        (
            &[("spec.train.resources.nodes", "2"), ("spec.train.resources.gpusPerNode", "8")],
            "spec.train.globalBatchTokens: must be at least seqLen x microBatchSize x data-parallel ranks (256 x 4 x 16 = 16384), got 4096",
        ),
        (&[("spec.model.heads", "12")], "spec.model.heads: dim (256) must be a multiple of heads (12)"),
        (
            &[("spec.model.heads", "0"), ("spec.train.tokens", "~")],
            "spec.model.heads: heads and kvHeads must be between 1 and 1024",
        ),
        (&[("spec.model.dim", "131072")], "spec.model.dim: dim must be between 8 and 65536, got 131072"),
        (
            &[("spec.train.globalBatchTokens", "0")],
            "spec.train.globalBatchTokens: must be at least seqLen x microBatchSize x data-parallel ranks (256 x 4 x 1 = 1024), got 0",
        ),
        (
            &[("spec.data.maxDocumentBytes", "18446744073709551615")],
            "spec.data.maxDocumentBytes: must be between 1 and 1073741824 (1 GiB), got 18446744073709551615",
        ),
        (&[("spec.model.kvHeads", "3")], "spec.model.kvHeads: heads (8) must be a multiple of kvHeads (3)"),
        (&[("spec.model.dim", "264")], "spec.model.dim: head dimension dim / heads = 33 must be even for RoPE"),
        (&[("spec.tokenizer.vocabsize", "8000")], "spec.tokenizer.vocabsize: unknown field"),
        (
            &[("spec.tokenizer.vocabSize", "200")],
            "spec.tokenizer.vocabSize: must be between 259 (256 bytes + 3 special tokens) and 1048576, got 200",
        ),
        (
            &[("spec.tokenizer.specialTokens", "['<|eos|>']")],
            "spec.tokenizer.specialTokens[0]: \"<|eos|>\" is a built-in special token or listed twice",
        ),
        (
            &[("spec.storage.url", "ftp://host/runs")],
            "spec.storage.url: scheme \"ftp\" is not supported; use one of file, s3, gs, az, memory",
        ),
        (&[("spec.storage.url", "s3://")], "spec.storage.url: must name a bucket: s3://BUCKET[/PREFIX]"),
        (&[("spec.data.sources", "[]")], "spec.data.sources: must list at least one source"),
        (&[("spec.data.sources.1.name", "web")], "spec.data.sources[1].name: \"web\" is used by an earlier source"),
        (
            &[("spec.data.sources.1.url", "/data/code.csv")],
            "spec.data.sources[1].format: cannot be inferred from \"/data/code.csv\"; set one of warc, jsonl, parquet, text",
        ),
        (
            &[("spec.data.sources.0.filters", "{gopherQuality: {minWord: 10}}")],
            "spec.data.sources[0].filters.gopherQuality.minWord: unknown field",
        ),
        (
            &[("spec.data.sources.0.filters", "{gopherQuality: {minWords: 500, maxWords: 100}}")],
            "spec.data.sources[0].filters.gopherQuality.minWords: must not exceed maxWords (500 > 100)",
        ),
        (
            &[("spec.data.mix.weights", "{web: 1.0, code: 0.2, books: 0.5}")],
            "spec.data.mix.weights.books: \"books\" is not a category of any source",
        ),
        (
            &[("spec.data.mix.weights", "{web: 1.0}")],
            "spec.data.mix.weights: category \"code\" has no weight; give it one (0 leaves its documents out of training)",
        ),
        (
            &[("spec.data.heldOutFraction", "0.7")],
            "spec.data.heldOutFraction: must be at least 0 and below 0.5, got 0.7",
        ),
        (
            &[("spec.data.quality.classifier", "bert")],
            "spec.data.quality.modelUrl: is required when classifier is bert (a directory with config.json, model.safetensors, tokenizer.json)",
        ),
        (
            &[("spec.longContext", "{seqLen: 128}")],
            "spec.longContext.seqLen: must be greater than spec.train.seqLen (256), got 128",
        ),
        (
            &[("spec.train.optimizer", "{lr: 0.001, minLr: 0.01}")],
            "spec.train.optimizer.minLr: must be between 0 and lr (0.001), got 0.01",
        ),
        (
            &[("spec.train.optimizer", "{betas: [0.9]}")],
            "spec.train.optimizer.betas: must have exactly 2 values, got 1",
        ),
        (
            &[("spec.train.schedule.warmupSteps", "300")],
            "spec.train.schedule.warmupSteps: must be fewer than the run's 256 optimizer steps, got 300",
        ),
        (
            &[("spec.train.precision", "bf16")],
            "spec.train.precision: bf16 needs GPUs (gpusPerNode > 0); use auto or fp32 on CPUs",
        ),
        (
            &[("metadata.name", "My_Run")],
            "metadata.name: must be 1 to 50 lowercase letters, digits or '-', starting and ending with a letter or digit, got \"My_Run\"",
        ),
        (
            &[("apiVersion", "pretrain.dev/v1")],
            "apiVersion: must be \"pretrain.dev/v1alpha1\", got \"pretrain.dev/v1\"",
        ),
        (
            &[("spec.eval.probes", "[{name: a, prompt: x, target: y}, {name: a, prompt: x, target: z}]")],
            "spec.eval.probes[1].name: \"a\" is used twice",
        ),
        (&[("spec.scheduling.priority", "5000")], "spec.scheduling.priority: must be between -1000 and 1000"),
    ];
    for (patches, expected) in cases {
        let errors = errors_of(&patched(patches));
        assert_eq!(errors, vec![expected.to_string()], "patches {patches:?}");
    }
}

#[test]
fn all_errors_are_reported_at_once() {
    let errors = errors_of(&patched(&[
        ("spec.model.heads", "12"),
        ("spec.data.heldOutFraction", "0.9"),
        ("spec.tokenizer.vocabsize", "1"),
    ]));
    assert_eq!(errors.len(), 3, "{errors:#?}");
}

#[test]
fn type_errors_name_the_file_line_and_field() {
    let text = patched(&[("spec.data.sources.0.format", "csv")]);
    let err = pretrain_crd::parse(&text, "run.yaml").unwrap_err();
    let line = text.lines().position(|l| l.contains("format: csv")).unwrap() + 1;
    match &err {
        ManifestError::Syntax { line: Some(l), .. } => assert_eq!(*l, line),
        other => panic!("expected a syntax error, got {other:?}"),
    }
    let message = err.to_string();
    assert!(message.starts_with(&format!("run.yaml:{line}:")), "{message}");
    assert!(message.contains("spec.data.sources[0].format: unknown variant `csv`"), "{message}");

    let missing = pretrain_crd::parse(&patched(&[("spec.storage.url", "~")]), "run.yaml").unwrap_err().to_string();
    assert!(missing.contains("spec.storage: missing field `url`"), "{missing}");

    let two_docs = format!("{MINIMAL}\n---\n{MINIMAL}");
    let err = pretrain_crd::parse(&two_docs, "run.yaml").unwrap_err().to_string();
    assert!(err.contains("more than one YAML document"), "{err}");
}

#[test]
fn source_filters_merge_over_the_global_filters() {
    let text = patched(&[
        ("spec.data.filters.gopherQuality.minWords", "20"),
        ("spec.data.sources.1.filters", "{gopherQuality: {maxWords: 500}, c4: {enabled: false}}"),
    ]);
    let run = pretrain_crd::parse(&text, "t.yaml").unwrap();
    let data = &run.spec.data;
    let code = data.sources[1].filters_over(&data.filters, "x").unwrap();
    assert_eq!(code.gopher_quality.min_words, 20, "inherited from data.filters");
    assert_eq!(code.gopher_quality.max_words, 500, "overridden by the source");
    assert!(!code.c4.enabled);
    assert!(code.fineweb.enabled);
    let web = data.sources[0].filters_over(&data.filters, "x").unwrap();
    assert_eq!(web, data.filters);
}

fn schema_validator() -> jsonschema::Validator {
    let crd = serde_json::to_value(pretrain_crd::crd()).unwrap();
    let schema = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"];
    jsonschema::validator_for(schema).expect("the CRD schema is a valid JSON schema")
}

fn as_json(text: &str) -> serde_json::Value {
    serde_yaml::from_str(text).unwrap()
}

#[test]
fn crd_schema_accepts_the_examples() {
    let validator = schema_validator();
    for file in examples() {
        let instance = as_json(&std::fs::read_to_string(&file).unwrap());
        let errors: Vec<String> = validator.iter_errors(&instance).map(|e| e.to_string()).collect();
        assert!(errors.is_empty(), "{}: {errors:#?}", file.display());
    }
    assert!(validator.is_valid(&as_json(MINIMAL)));
}

#[test]
fn crd_schema_rejects_broken_manifests() {
    let validator = schema_validator();
    let broken: &[&[(&str, &str)]] = &[
        &[("spec.data.sources.0.format", "csv")],
        &[("spec.data.heldOutFraction", "0.7")],
        &[("spec.tokenizer.vocabSize", "100")],
        &[("spec.storage.url", "~")],
        &[("spec.data.sources", "[]")],
        &[("spec.train.seqLen", "'long'")],
        &[("spec.train.optimizer.betas", "[0.9]")],
        &[("spec.model.preset", "llama-3b")],
        &[("spec.scheduling.priority", "5000")],
        &[("spec.data.dedup.minhash.buckets", "0")],
        &[("spec.data.sources.0.filters", "{gopherQuality: {minWords: -1}}")],
    ];
    for patches in broken {
        let instance = as_json(&patched(patches));
        assert!(!validator.is_valid(&instance), "schema accepted {patches:?}");
    }
}

#[test]
fn crd_carries_cel_rules_for_cross_field_checks() {
    let yaml = pretrain_crd::crd_yaml();
    for rule in [
        "self.train.globalBatchTokens % (self.train.seqLen * self.train.microBatchSize) == 0",
        "self.train.optimizer.minLr <= self.train.optimizer.lr",
        "self.longContext.seqLen > self.train.seqLen",
    ] {
        assert!(yaml.contains(rule), "missing CEL rule {rule}");
    }
}

#[test]
fn crd_has_status_subresource_and_printer_columns() {
    let crd = pretrain_crd::crd();
    assert_eq!(crd.spec.group, "pretrain.dev");
    assert_eq!(crd.spec.scope, "Namespaced");
    let version = &crd.spec.versions[0];
    assert_eq!(version.name, "v1alpha1");
    assert!(version.subresources.as_ref().and_then(|s| s.status.as_ref()).is_some());
    let columns: Vec<&str> = version.additional_printer_columns.iter().flatten().map(|c| c.name.as_str()).collect();
    assert_eq!(columns, ["Phase", "Stage", "Step", "Loss", "Goodput", "Age"]);
}

#[test]
fn the_queue_crd_is_cluster_scoped_with_a_status() {
    let crd = pretrain_crd::queue_crd();
    assert_eq!((crd.spec.group.as_str(), crd.spec.scope.as_str()), ("pretrain.dev", "Cluster"));
    assert_eq!(crd.spec.names.kind, "PretrainQueue");
    let version = &crd.spec.versions[0];
    assert!(version.subresources.as_ref().and_then(|s| s.status.as_ref()).is_some());
    let queue: pretrain_crd::PretrainQueue = serde_yaml::from_str(
        "apiVersion: pretrain.dev/v1alpha1\nkind: PretrainQueue\nmetadata: {name: research}\nspec: {gpuQuota: {NVIDIA-H100-80GB-HBM3: 64}, borrowing: true}\n",
    )
    .unwrap();
    assert_eq!(queue.spec.gpu_quota["NVIDIA-H100-80GB-HBM3"], 64);
    assert!(queue.spec.borrowing);
    assert!(pretrain_crd::crd_yaml().contains("\n---\n"), "both CRDs in one stream");
}

#[test]
fn the_committed_field_reference_matches_the_schema() {
    let path = repo().join("docs/crd-reference.md");
    let committed = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        committed == pretrain_crd::reference_markdown(),
        "{} is stale; regenerate it with `cargo run -p pretrain-operator --bin pretrain -- crd --reference > docs/crd-reference.md`",
        path.display()
    );
    for field in ["spec.train.optimizer.lr", "spec.data.sources[].url", "spec.longContext.rope.scaling"] {
        assert!(committed.contains(&format!("| `{field}` |")), "{field} missing from the reference");
    }
}

#[test]
fn committed_chart_crd_matches_the_generated_one() {
    let path = repo().join("charts/pretrain-operator/crds/crds.yaml");
    let committed = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        committed == pretrain_crd::crd_yaml(),
        "{} is stale; regenerate it with `cargo run -p pretrain-operator --bin pretrain -- crd > {}`",
        path.display(),
        "charts/pretrain-operator/crds/crds.yaml"
    );
}

#[test]
fn round_trip_through_yaml_keeps_the_spec() {
    let run: PretrainRun = pretrain_crd::parse(MINIMAL, "m.yaml").unwrap();
    let text = serde_yaml::to_string(&run).unwrap();
    let again = pretrain_crd::parse(&text, "again.yaml").unwrap();
    assert_eq!(run.spec, again.spec);
}

#[test]
fn credentials_in_urls_are_refused_without_being_repeated() {
    let secret = "wJalrXUtnFEMI";
    for (key, field, url) in [
        ("spec.storage.url", "spec.storage.url", format!("s3://AKIA:{secret}@bucket/runs")),
        (
            "spec.data.sources.0.url",
            "spec.data.sources[0].url",
            format!("https://h/c.warc.gz?X-Amz-Signature={secret}"),
        ),
        ("spec.data.sources.0.url", "spec.data.sources[0].url", format!("https://user:{secret}@host/data.jsonl")),
    ] {
        let errors = errors_of(&patched(&[(key, &format!("{url:?}"))]));
        let error = errors.iter().find(|e| e.starts_with(field)).unwrap_or_else(|| panic!("{errors:?}"));
        assert!(error.contains("must not carry credentials"), "{error}");
        assert!(errors.iter().all(|e| !e.contains(secret)), "a secret was repeated: {errors:?}");
    }
    assert!(errors_of(&patched(&[("spec.storage.url", "\"s3://bucket/runs?versioned=true\"")])).is_empty());
}

/// The worker, built without the `kube` feature, reads the run as `spec::plain::PretrainRun`: it reads
/// every field of what the operator writes (kube's type, with the metadata the API server adds).
#[test]
fn the_workers_plain_run_reads_what_the_operator_writes() {
    for path in examples() {
        let mut run = pretrain_crd::load(&path).unwrap();
        run.metadata.namespace = Some("research".into());
        run.metadata.uid = Some("0b8f6c2e-5d7a-4f4e-9a53-2f1d1c7b9e10".into());
        run.metadata.resource_version = Some("42".into());
        run.metadata.labels = Some([("team".to_string(), "lm".to_string())].into());
        let written = serde_yaml::to_string(&run).unwrap();

        let mut unknown = Vec::new();
        let plain: pretrain_crd::spec::plain::PretrainRun =
            serde_ignored::deserialize(serde_yaml::Deserializer::from_str(&written), |p| unknown.push(p.to_string()))
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert_eq!(unknown, ["apiVersion", "kind"], "{}", path.display());
        assert_eq!(plain.spec, run.spec, "{}", path.display());
        assert_eq!(plain.metadata.name, run.metadata.name);
        assert_eq!(plain.metadata.namespace.as_deref(), Some("research"));
        assert_eq!(plain.metadata.other["uid"], "0b8f6c2e-5d7a-4f4e-9a53-2f1d1c7b9e10");
        assert_eq!(pretrain_crd::validate::validate_spec(&plain.spec), Ok(()));
    }
}
