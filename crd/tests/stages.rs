//! Stage order, config hashes and model presets.

use pretrain_crd::spec::{ModelPreset, SourceFormat};
use pretrain_crd::{PretrainRunSpec, Stage};

fn spec(extra: &str) -> PretrainRunSpec {
    let text = format!(
        "apiVersion: pretrain.dev/v1alpha1\nkind: PretrainRun\nmetadata: {{name: h}}\nspec:\n  storage: {{url: 'memory://'}}\n  data: {{sources: [{{name: web, url: a.jsonl}}]}}\n  train: {{tokens: 2000000000, globalBatchTokens: 524288, resources: {{gpusPerNode: 0}}}}\n{extra}"
    );
    pretrain_crd::parse(&text, "h.yaml").unwrap_or_else(|e| panic!("{e}")).spec
}

#[test]
fn stages_run_in_pipeline_order_and_long_context_is_optional() {
    assert_eq!(spec("").stages(), [Stage::DataPrep, Stage::Tokenize, Stage::Train, Stage::Eval]);
    let with_lc = spec("  longContext: {seqLen: 8192}\n");
    assert_eq!(with_lc.stages(), Stage::ALL);
    assert_eq!(with_lc.upstream(Stage::Eval), Some(Stage::LongContext));
    assert_eq!(spec("").upstream(Stage::Eval), Some(Stage::Train));
    assert_eq!(spec("").upstream(Stage::DataPrep), None);
    for s in Stage::ALL {
        assert_eq!(s.as_str().parse::<Stage>().unwrap(), s);
    }
    assert!("prep".parse::<Stage>().unwrap_err().to_string().contains("data-prep, tokenize"));
}

#[test]
fn config_hash_changes_downstream_only() {
    let base = spec("");
    let retok = spec("  tokenizer: {vocabSize: 16000}\n");
    assert_eq!(base.stage_config_hash(Stage::DataPrep), retok.stage_config_hash(Stage::DataPrep));
    for s in [Stage::Tokenize, Stage::Train, Stage::Eval] {
        assert_ne!(base.stage_config_hash(s), retok.stage_config_hash(s), "{s}");
    }
}

#[test]
fn config_hash_ignores_settings_that_do_not_change_results() {
    let base = spec("");
    let moved = spec("  image: example.com/worker:dev\n  scheduling: {queue: other, priority: 5}\n");
    for s in base.stages() {
        assert_eq!(base.stage_config_hash(s), moved.stage_config_hash(s), "{s}");
    }
    let mut more_nodes = base.clone();
    more_nodes.train.resources.nodes = 4;
    more_nodes.train.max_restarts = 99;
    more_nodes.train.checkpoint.keep = 9;
    assert_eq!(base.stage_config_hash(Stage::Train), more_nodes.stage_config_hash(Stage::Train));
    let mut other_lr = base.clone();
    other_lr.train.optimizer.lr = 1e-3;
    assert_ne!(base.stage_config_hash(Stage::Train), other_lr.stage_config_hash(Stage::Train));
    let mut other_seed = base.clone();
    other_seed.seed += 1;
    assert_ne!(base.stage_config_hash(Stage::DataPrep), other_seed.stage_config_hash(Stage::DataPrep));
}

#[test]
fn presets_have_the_documented_sizes() {
    let params = |p: ModelPreset| p.config().parameters(32_000);
    // The shapes the GPU benchmarks use: 124.7M and 1.1B parameters at a 32k vocabulary.
    assert_eq!((params(ModelPreset::Llama125m) + 50_000) / 100_000, 1247);
    assert_eq!(params(ModelPreset::Llama1b) / 100_000_000, 11);
    assert!((6_000_000_000..8_000_000_000).contains(&params(ModelPreset::Llama7b)));
    let tiny = ModelPreset::Tiny.config().parameters(4096);
    assert!((1_000_000..10_000_000).contains(&tiny), "{tiny}");
}

#[test]
fn default_token_budget_is_chinchilla() {
    let mut s = spec("");
    s.train.tokens = None;
    let params = s.model.resolved().parameters(s.tokenizer.vocab_size);
    assert_eq!(s.train_tokens(), 20 * params);
    assert_eq!(s.train_steps(), (20 * params).div_ceil(524_288));
}

/// `train.tokens` is the run's budget: long-context takes its fraction (10% by default) out of train's.
#[test]
fn long_context_takes_its_share_out_of_the_budget() {
    let mut s = spec("");
    s.train.tokens = Some(1_000_000);
    assert_eq!((s.train_tokens(), s.long_context_tokens()), (1_000_000, 0));
    s.long_context = serde_yaml::from_str("{seqLen: 32768}").unwrap();
    assert_eq!((s.train_tokens(), s.long_context_tokens()), (900_000, 100_000));
    assert_eq!(s.total_tokens(), 1_000_000);
    assert_eq!(s.train.seq_len, 4096, "the recipe's short length");
}

#[test]
fn source_format_is_inferred_from_the_extension() {
    let cases = [
        ("s3://cc/seg/x.warc.gz", Some(SourceFormat::Warc)),
        ("/d/a.warc", Some(SourceFormat::Warc)),
        ("/d/*.jsonl.zst", Some(SourceFormat::Jsonl)),
        ("/d/a.JSONL.GZ", Some(SourceFormat::Jsonl)),
        ("gs://b/p/*.parquet", Some(SourceFormat::Parquet)),
        ("/d/book.txt", Some(SourceFormat::Text)),
        ("/d/table.csv", None),
        ("/d/noext", None),
    ];
    for (url, expected) in cases {
        assert_eq!(SourceFormat::infer(url), expected, "{url}");
    }
}
