//! `pretrain report RUN`: one Markdown page for a run, from what its stages committed: the data
//! funnel, tokenizer compression, loss / learning-rate / throughput curves (SVG), long-context, the
//! eval tables and probe trajectories. Written to `<store>/<run>/report/` (`README.md` and the plots)
//! at the end of `pretrain run` and on demand.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use bytes::Bytes;
use plotters::prelude::*;
use pretrain_crd::Stage;
use pretrain_crd::status::Goodput;
use pretrain_store::artifact::{DataPrepStats, MetricsLine, ProbeRow, TokenizeStats};
use pretrain_store::{StageCommit, Store};

/// One curve of a plot: a name and its points.
pub type Series = (String, Vec<(f64, f64)>);

const COLORS: [RGBColor; 6] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
];

/// An SVG line chart of `series` (the x axis shared), or `None` when there is nothing to draw.
pub fn line_chart(title: &str, x_label: &str, y_label: &str, series: &[Series]) -> Option<String> {
    let points = series.iter().flat_map(|(_, p)| p.iter()).filter(|(x, y)| x.is_finite() && y.is_finite());
    let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
    for &(x, y) in points {
        (x0, x1, y0, y1) = (x0.min(x), x1.max(x), y0.min(y), y1.max(y));
    }
    if x0 > x1 {
        return None;
    }
    if x1 <= x0 {
        x1 = x0 + 1.0;
    }
    let pad = ((y1 - y0) * 0.05).max(1e-9);
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (720, 360)).into_drawing_area();
        root.fill(&WHITE).ok()?;
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 18))
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(60)
            .build_cartesian_2d(x0..x1, (y0 - pad)..(y1 + pad))
            .ok()?;
        chart.configure_mesh().x_desc(x_label).y_desc(y_label).light_line_style(WHITE.mix(0.0)).draw().ok()?;
        for (i, (name, pts)) in series.iter().enumerate() {
            let color = COLORS[i % COLORS.len()];
            chart
                .draw_series(LineSeries::new(pts.iter().copied(), color.stroke_width(2)))
                .ok()?
                .label(name.as_str())
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], color.stroke_width(2)));
        }
        if series.len() > 1 {
            chart.configure_series_labels().background_style(WHITE.mix(0.8)).border_style(BLACK).draw().ok()?;
        }
        root.present().ok()?;
    }
    Some(svg)
}

/// Parsed `metrics.jsonl` lines.
fn metrics(bytes: &[u8]) -> Vec<MetricsLine> {
    String::from_utf8_lossy(bytes).lines().filter_map(|l| serde_json::from_str(l).ok()).collect()
}

/// `(tokens + x_offset, y)` of each line that has a `y`.
fn points(lines: &[MetricsLine], y: impl Fn(&MetricsLine) -> Option<f64>, x_offset: f64) -> Vec<(f64, f64)> {
    lines.iter().filter_map(|l| Some((l.tokens as f64 + x_offset, y(l)?))).collect()
}

/// What the report is made of: each stage's commit and the files it reads beside them.
struct Inputs {
    commits: BTreeMap<Stage, StageCommit>,
    train: Vec<MetricsLine>,
    long_context: Vec<MetricsLine>,
    probe_history: Vec<ProbeRow>,
    eval_page: Option<String>,
}

/// The part of `eval.json` the report reads.
#[derive(serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct EvalJson {
    #[serde(default)]
    probe_history: Vec<ProbeRow>,
}

impl Inputs {
    async fn read(store: &Store, run: &str) -> Result<Self, pretrain_store::Error> {
        let mut commits = BTreeMap::new();
        for stage in Stage::ALL {
            if let Some(c) = store.stage(run, stage)?.commit_record().await? {
                commits.insert(stage, c);
            }
        }
        let read = |stage: Stage, name: &'static str| async move {
            let dir = store.stage(run, stage)?;
            store.get_opt(&dir.key(name)?).await
        };
        let eval: Option<EvalJson> =
            read(Stage::Eval, "eval.json").await?.and_then(|b| serde_json::from_slice(&b).ok());
        Ok(Self {
            commits,
            train: read(Stage::Train, "metrics.jsonl").await?.map(|b| metrics(&b)).unwrap_or_default(),
            long_context: read(Stage::LongContext, "metrics.jsonl").await?.map(|b| metrics(&b)).unwrap_or_default(),
            probe_history: eval.map(|e| e.probe_history).unwrap_or_default(),
            eval_page: read(Stage::Eval, "report.md").await?.map(|b| String::from_utf8_lossy(&b).into_owned()),
        })
    }

    /// A stage's committed statistics, as their type.
    fn stats<T: serde::de::DeserializeOwned>(&self, stage: Stage) -> Option<T> {
        self.commits.get(&stage).and_then(|c| serde_json::from_value(c.stats.clone()).ok())
    }

    /// Tokens train trained on: long-context's curves continue from there.
    fn train_tokens(&self) -> f64 {
        self.train.last().map_or(0.0, |l| l.tokens as f64)
    }
}

/// Writes the report of `run`, with its `goodput` where known; returns the keys written (page
/// first).
pub async fn write(store: &Store, run: &str, goodput: Option<&Goodput>) -> Result<Vec<String>, pretrain_store::Error> {
    let inputs = Inputs::read(store, run).await?;
    let mut md = String::new();
    let mut plots: Vec<(String, String)> = Vec::new();
    stages_section(&mut md, run, &inputs);
    // A run the operator ran has its goodput in the store.
    let stored = match goodput {
        Some(_) => None,
        None => store
            .get_opt(&pretrain_store::key(&crate::plan::goodput::key(run))?)
            .await?
            .and_then(|b| serde_json::from_slice::<Goodput>(&b).ok()),
    };
    if let Some(g) = goodput.or(stored.as_ref()) {
        goodput_section(&mut md, g);
    }
    if let Some(stats) = inputs.stats::<DataPrepStats>(Stage::DataPrep) {
        data_section(&mut md, &stats);
    }
    if let Some(stats) = inputs.stats::<TokenizeStats>(Stage::Tokenize) {
        tokenizer_section(&mut md, &stats);
    }
    if !inputs.train.is_empty() {
        training_section(&mut md, &mut plots, &inputs);
    }
    eval_section(&mut md, &mut plots, &inputs);

    let dir = format!("{run}/report");
    let mut written = Vec::new();
    let key = pretrain_store::key(&format!("{dir}/README.md"))?;
    store.put(&key, Bytes::from(md)).await?;
    written.push(key.to_string());
    for (file, svg) in plots {
        let key = pretrain_store::key(&format!("{dir}/{file}"))?;
        store.put(&key, Bytes::from(svg)).await?;
        written.push(key.to_string());
    }
    Ok(written)
}

/// The title and which stages committed.
fn stages_section(md: &mut String, run: &str, inputs: &Inputs) {
    let _ = writeln!(md, "# Run `{run}`\n");
    let _ = writeln!(md, "| stage | committed | files |\n|---|---|---:|");
    for stage in Stage::ALL {
        match inputs.commits.get(&stage) {
            Some(c) => {
                let hash = &c.config_hash[..12.min(c.config_hash.len())];
                let _ = writeln!(md, "| {stage} | yes (config {hash}) | {} |", c.files.len());
            }
            None => {
                let _ = writeln!(md, "| {stage} | no | |");
            }
        }
    }
}

/// Goodput of the training stages: the share of held time that trained, and where the rest went.
fn goodput_section(md: &mut String, g: &Goodput) {
    let _ = writeln!(md, "\n## Goodput\n\n{}.\n", crate::plan::goodput::summary(g));
    let _ = writeln!(md, "| time | seconds | share of held |\n|---|---:|---:|");
    let share = |s: f64| if g.held_seconds > 0.0 { format!("{:.1}%", 100.0 * s / g.held_seconds) } else { "-".into() };
    let _ = writeln!(md, "| held by the training gangs | {:.0} | 100% |", g.held_seconds);
    let _ = writeln!(md, "| training steps kept | {:.0} | {} |", g.productive_seconds, share(g.productive_seconds));
    for (cause, seconds) in g.lost.by_cause() {
        let share = if cause == "admission" { "(not held)".to_string() } else { share(seconds) };
        let _ = writeln!(md, "| lost: {cause} | {seconds:.0} | {share} |");
    }
    if g.in_flight_seconds > 0.0 {
        let _ = writeln!(
            md,
            "| in flight (since the newest checkpoint) | {:.0} | {} |",
            g.in_flight_seconds,
            share(g.in_flight_seconds)
        );
    }
}

/// The data funnel: per category, then dedup, then the rules that removed documents.
fn data_section(md: &mut String, s: &DataPrepStats) {
    let _ =
        writeln!(md, "\n## Data\n\n| category | read | kept by the rules | documents in the mix | bytes in the mix |");
    let _ = writeln!(md, "|---|---:|---:|---:|---:|");
    let count = |m: &BTreeMap<String, u64>, cat: &str| m.get(cat).map_or_else(|| "null".into(), u64::to_string);
    for (cat, n) in &s.map.read {
        let _ = writeln!(
            md,
            "| {cat} | {n} | {} | {} | {} |",
            count(&s.map.kept, cat),
            count(&s.mix.documents, cat),
            count(&s.mix.bytes, cat)
        );
    }
    let _ = writeln!(
        md,
        "\nDedup: {} exact and {} near duplicates removed; {} documents held out.",
        s.dedup.exact_removed, s.dedup.near_removed, s.held_out.documents
    );
    if let Some(c) = &s.quality.classifier {
        let _ = writeln!(
            md,
            "\nQuality classifier ({}), trained on {} labelled documents and measured on {} held out ({} good): precision {:.3}, recall {:.3}, F1 {:.3} at score {}, AUC {:.3}.",
            c.classifier,
            c.train_examples.iter().sum::<u64>(),
            c.heldout_examples.iter().sum::<u64>(),
            c.heldout_examples[0],
            c.precision,
            c.recall,
            c.f1,
            c.threshold,
            c.auc
        );
    }
    if let Some([path, random]) = s.train.adjacent_similarity {
        let _ = writeln!(
            md,
            "\nIn-context order: consecutive documents at a mean cosine similarity of {path:.3} on the path ({random:.3} for two random documents); {} dropped as near-identical neighbours.",
            s.dedup.semantic_removed
        );
    }
    if !s.map.decoded.is_empty() {
        let charsets: Vec<String> = s.map.decoded.iter().map(|(c, n)| format!("{n} {c}")).collect();
        let _ = writeln!(md, "\nWeb pages decoded from other charsets than UTF-8: {}.", charsets.join(", "));
    }
    let mut rules: Vec<(&String, u64)> = s.map.dropped.iter().map(|(k, v)| (k, *v)).collect();
    rules.sort_by_key(|r| std::cmp::Reverse(r.1));
    let _ = writeln!(md, "\n| rule | documents removed |\n|---|---:|");
    for (rule, n) in rules {
        let _ = writeln!(md, "| {rule} | {n} |");
    }
}

/// The vocabulary and the compression on the held-out split.
fn tokenizer_section(md: &mut String, s: &TokenizeStats) {
    let _ = writeln!(md, "\n## Tokenizer\n\nVocabulary {}.\n", s.tokenizer.vocab_size);
    let _ = writeln!(md, "| held-out category | bytes/token | chars/token |\n|---|---:|---:|");
    let all = ("all".to_string(), &s.compression.all);
    for (cat, c) in s.compression.heldout.iter().map(|(k, v)| (k.clone(), v)).chain([all]) {
        let _ = writeln!(md, "| {cat} | {:.3} | {:.3} |", c.bytes_per_token, c.chars_per_token);
    }
}

/// Each training stage's summary, and the loss, learning-rate and throughput curves.
fn training_section(md: &mut String, plots: &mut Vec<(String, String)>, inputs: &Inputs) {
    let (train, lc, offset) = (&inputs.train, &inputs.long_context, inputs.train_tokens());
    let mut loss = vec![("train".to_string(), points(train, |l| Some(l.loss), 0.0))];
    let held = points(train, |l| l.heldout_loss, 0.0);
    if !held.is_empty() {
        loss.push(("train, held-out".into(), held));
    }
    if !lc.is_empty() {
        loss.push(("long-context".into(), points(lc, |l| Some(l.loss), offset)));
        let held = points(lc, |l| l.heldout_loss, offset);
        if !held.is_empty() {
            loss.push(("long-context, held-out".into(), held));
        }
    }
    let lr = vec![
        ("train".to_string(), points(train, |l| Some(l.lr), 0.0)),
        ("long-context".to_string(), points(lc, |l| Some(l.lr), offset)),
    ];
    let tps = vec![
        ("train".to_string(), points(train, |l| Some(l.tokens_per_second), 0.0)),
        ("long-context".to_string(), points(lc, |l| Some(l.tokens_per_second), offset)),
    ];
    let _ = writeln!(md, "\n## Training\n");
    for (stage, lines) in [("train", train), ("long-context", lc)] {
        let (Some(first), Some(last)) = (lines.first(), lines.last()) else { continue };
        let seconds: f64 = lines.iter().map(|l| l.seconds).sum();
        let mean_tps = last.tokens as f64 / seconds.max(1e-9);
        let mfu = lines.iter().map(|l| l.mfu).sum::<f64>() / lines.len() as f64;
        let _ = writeln!(
            md,
            "- **{stage}**: {} steps, {} tokens, loss {:.4} → {:.4}{}, {:.0} tokens/s, MFU {:.1}%",
            last.step,
            last.tokens,
            first.loss,
            last.loss,
            last.heldout_loss.map(|h| format!(" (held-out {h:.4})")).unwrap_or_default(),
            mean_tps,
            mfu * 100.0
        );
    }
    for (file, title, y, series) in [
        ("loss.svg", "Loss", "loss (nats/token)", loss),
        ("lr.svg", "Learning rate", "learning rate", lr),
        ("throughput.svg", "Throughput", "tokens/s", tps),
    ] {
        let series: Vec<Series> = series.into_iter().filter(|(_, p)| !p.is_empty()).collect();
        if let Some(svg) = line_chart(title, "tokens", y, &series) {
            let _ = writeln!(md, "\n![{title}]({file})");
            plots.push((file.to_string(), svg));
        }
    }
}

/// The probe trajectories, and eval's own report one level down.
fn eval_section(md: &mut String, plots: &mut Vec<(String, String)>, inputs: &Inputs) {
    let mut probes: BTreeMap<String, Vec<(f64, f64)>> = BTreeMap::new();
    for row in &inputs.probe_history {
        let offset = if row.stage == "long-context" { inputs.train_tokens() } else { 0.0 };
        for (name, lp) in &row.logprobs {
            probes.entry(name.clone()).or_default().push((row.tokens as f64 + offset, *lp));
        }
    }
    let series: Vec<Series> = probes.into_iter().collect();
    if let Some(svg) = line_chart("Probes", "tokens", "log-prob of the target (nats)", &series) {
        plots.push(("probes.svg".into(), svg));
    }
    if let Some(text) = &inputs.eval_page {
        // The eval report's sections, one level down.
        let body: String = text
            .lines()
            .skip(1)
            .map(|l| if l.starts_with('#') { format!("#{l}\n") } else { format!("{l}\n") })
            .collect();
        let _ = writeln!(md, "\n## Evaluation\n{body}");
        if plots.iter().any(|(f, _)| f == "probes.svg") {
            let _ = writeln!(md, "![Probes](probes.svg)");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn charts_draw_every_series_and_skip_empty_input() {
        let svg = line_chart(
            "Loss",
            "tokens",
            "loss",
            &[("a".into(), vec![(0.0, 3.0), (10.0, 2.0)]), ("b".into(), vec![(5.0, 2.5), (10.0, 2.2)])],
        )
        .unwrap();
        assert!(svg.starts_with("<svg"), "{}", &svg[..100]);
        // Each series is a line in its colour, and again in the legend.
        assert_eq!(svg.matches("stroke=\"#1F77B4\" stroke-width=\"2\"").count(), 2, "{svg}");
        assert_eq!(svg.matches("stroke=\"#FF7F0E\" stroke-width=\"2\"").count(), 2, "{svg}");
        assert!(svg.contains("Loss") && svg.contains("tokens"));
        assert!(line_chart("x", "x", "y", &[("a".into(), vec![])]).is_none());
    }

    /// The data section says what the trained classifier measured and what in-context order did,
    /// and says nothing of either when the run had neither.
    #[test]
    fn the_data_section_reports_the_classifier_and_the_in_context_order() {
        let mut s = DataPrepStats::default();
        let mut plain = String::new();
        data_section(&mut plain, &s);
        assert!(!plain.contains("Quality classifier") && !plain.contains("In-context"), "{plain}");
        s.quality.classifier = Some(pretrain_store::artifact::ClassifierEval {
            classifier: "bert-head".into(),
            train_examples: [40, 40],
            heldout_examples: [10, 12],
            threshold: 0.5,
            precision: 0.9,
            recall: 0.8,
            f1: 0.847,
            auc: 0.95,
            ..Default::default()
        });
        s.train.adjacent_similarity = Some([0.47, 0.01]);
        s.dedup.semantic_removed = 3;
        let mut md = String::new();
        data_section(&mut md, &s);
        assert!(
            md.contains("Quality classifier (bert-head), trained on 80 labelled documents and measured on 22 held out (10 good): precision 0.900, recall 0.800, F1 0.847 at score 0.5, AUC 0.950."),
            "{md}"
        );
        assert!(
            md.contains("mean cosine similarity of 0.470 on the path (0.010 for two random documents); 3 dropped"),
            "{md}"
        );
    }
}
