//! `pretrain report RUN`: one Markdown page for a run, from what its stages committed: the data
//! funnel, tokenizer compression, loss / learning-rate / throughput curves (SVG), long-context, the
//! eval tables and probe trajectories. Written to `<store>/<run>/report/` (`README.md` and the plots)
//! at the end of `pretrain run` and on demand.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use bytes::Bytes;
use plotters::prelude::*;
use pretrain_crd::Stage;
use pretrain_store::{StageCommit, Store};
use serde_json::Value;

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
fn metrics(bytes: &[u8]) -> Vec<Value> {
    String::from_utf8_lossy(bytes).lines().filter_map(|l| serde_json::from_str(l).ok()).collect()
}

fn points(lines: &[Value], x: &str, y: &str, x_offset: f64) -> Vec<(f64, f64)> {
    lines.iter().filter_map(|l| Some((l[x].as_f64()? + x_offset, l[y].as_f64()?))).collect()
}

fn fmt_count(v: &Value) -> String {
    v.as_u64().map_or_else(|| v.to_string(), |n| n.to_string())
}

/// Writes the report of `run`; returns the keys written (page first).
pub async fn write(store: &Store, run: &str) -> Result<Vec<String>, pretrain_store::Error> {
    let mut commits: BTreeMap<Stage, StageCommit> = BTreeMap::new();
    for stage in Stage::ALL {
        if let Some(c) = store.stage(run, stage)?.commit_record().await? {
            commits.insert(stage, c);
        }
    }
    let read = |stage: Stage, name: &'static str| async move {
        let dir = store.stage(run, stage)?;
        store.get_opt(&dir.key(name)?).await
    };
    let train_metrics = read(Stage::Train, "metrics.jsonl").await?.map(|b| metrics(&b)).unwrap_or_default();
    let lc_metrics = read(Stage::LongContext, "metrics.jsonl").await?.map(|b| metrics(&b)).unwrap_or_default();
    let eval: Option<Value> = read(Stage::Eval, "eval.json").await?.and_then(|b| serde_json::from_slice(&b).ok());

    let mut md = String::new();
    let mut plots: Vec<(String, String)> = Vec::new();
    let _ = writeln!(md, "# Run `{run}`\n");
    let _ = writeln!(md, "| stage | committed | files |\n|---|---|---:|");
    for stage in Stage::ALL {
        match commits.get(&stage) {
            Some(c) => {
                let _ = writeln!(
                    md,
                    "| {stage} | yes (config {}) | {} |",
                    &c.config_hash[..12.min(c.config_hash.len())],
                    c.files.len()
                );
            }
            None => {
                let _ = writeln!(md, "| {stage} | no | |");
            }
        }
    }

    if let Some(c) = commits.get(&Stage::DataPrep) {
        let s = &c.stats;
        let _ = writeln!(
            md,
            "\n## Data\n\n| category | read | kept by the rules | documents in the mix | bytes in the mix |"
        );
        let _ = writeln!(md, "|---|---:|---:|---:|---:|");
        if let Some(read) = s["map"]["read"].as_object() {
            for (cat, n) in read {
                let _ = writeln!(
                    md,
                    "| {cat} | {} | {} | {} | {} |",
                    fmt_count(n),
                    fmt_count(&s["map"]["kept"][cat]),
                    fmt_count(&s["mix"]["documents"][cat]),
                    fmt_count(&s["mix"]["bytes"][cat])
                );
            }
        }
        let _ = writeln!(
            md,
            "\nDedup: {} exact and {} near duplicates removed; {} documents held out.",
            fmt_count(&s["dedup"]["exactRemoved"]),
            fmt_count(&s["dedup"]["nearRemoved"]),
            fmt_count(&s["heldOut"]["documents"])
        );
        if let Some(dropped) = s["map"]["dropped"].as_object() {
            let mut rules: Vec<(&String, u64)> = dropped.iter().filter_map(|(k, v)| Some((k, v.as_u64()?))).collect();
            rules.sort_by_key(|r| std::cmp::Reverse(r.1));
            let _ = writeln!(md, "\n| rule | documents removed |\n|---|---:|");
            for (rule, n) in rules {
                let _ = writeln!(md, "| {rule} | {n} |");
            }
        }
    }

    if let Some(c) = commits.get(&Stage::Tokenize) {
        let s = &c.stats;
        let _ = writeln!(md, "\n## Tokenizer\n\nVocabulary {}.\n", fmt_count(&s["tokenizer"]["vocabSize"]));
        let _ = writeln!(md, "| held-out category | bytes/token | chars/token |\n|---|---:|---:|");
        if let Some(cats) = s["compression"]["heldout"].as_object() {
            for (cat, v) in cats.iter().chain([(&"all".to_string(), &s["compression"]["all"])]) {
                let _ = writeln!(
                    md,
                    "| {cat} | {:.3} | {:.3} |",
                    v["bytesPerToken"].as_f64().unwrap_or(f64::NAN),
                    v["charsPerToken"].as_f64().unwrap_or(f64::NAN)
                );
            }
        }
    }

    if !train_metrics.is_empty() {
        let train_tokens = train_metrics.last().and_then(|l| l["tokens"].as_f64()).unwrap_or(0.0);
        let mut loss = vec![("train".to_string(), points(&train_metrics, "tokens", "loss", 0.0))];
        let held = points(&train_metrics, "tokens", "heldoutLoss", 0.0);
        if !held.is_empty() {
            loss.push(("train, held-out".into(), held));
        }
        if !lc_metrics.is_empty() {
            loss.push(("long-context".into(), points(&lc_metrics, "tokens", "loss", train_tokens)));
            let held = points(&lc_metrics, "tokens", "heldoutLoss", train_tokens);
            if !held.is_empty() {
                loss.push(("long-context, held-out".into(), held));
            }
        }
        let lr = vec![
            ("train".to_string(), points(&train_metrics, "tokens", "lr", 0.0)),
            ("long-context".to_string(), points(&lc_metrics, "tokens", "lr", train_tokens)),
        ];
        let tps = vec![
            ("train".to_string(), points(&train_metrics, "tokens", "tokensPerSecond", 0.0)),
            ("long-context".to_string(), points(&lc_metrics, "tokens", "tokensPerSecond", train_tokens)),
        ];
        let _ = writeln!(md, "\n## Training\n");
        for (stage, lines) in [("train", &train_metrics), ("long-context", &lc_metrics)] {
            let (Some(first), Some(last)) = (lines.first(), lines.last()) else { continue };
            let seconds: f64 = lines.iter().filter_map(|l| l["seconds"].as_f64()).sum();
            let mean_tps = last["tokens"].as_f64().unwrap_or(0.0) / seconds.max(1e-9);
            let mfu = lines.iter().filter_map(|l| l["mfu"].as_f64()).sum::<f64>() / lines.len() as f64;
            let _ = writeln!(
                md,
                "- **{stage}**: {} steps, {} tokens, loss {:.4} → {:.4}{}, {:.0} tokens/s, MFU {:.1}%",
                fmt_count(&last["step"]),
                fmt_count(&last["tokens"]),
                first["loss"].as_f64().unwrap_or(f64::NAN),
                last["loss"].as_f64().unwrap_or(f64::NAN),
                last["heldoutLoss"].as_f64().map(|h| format!(" (held-out {h:.4})")).unwrap_or_default(),
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

    if let Some(eval) = &eval {
        let mut probes: BTreeMap<String, Vec<(f64, f64)>> = BTreeMap::new();
        let train_tokens = train_metrics.last().and_then(|l| l["tokens"].as_f64()).unwrap_or(0.0);
        for row in eval["probeHistory"].as_array().into_iter().flatten() {
            let offset = if row["stage"] == "long-context" { train_tokens } else { 0.0 };
            let tokens = row["tokens"].as_f64().unwrap_or(0.0) + offset;
            for (name, lp) in row["logprobs"].as_object().into_iter().flatten() {
                if let Some(lp) = lp.as_f64() {
                    probes.entry(name.clone()).or_default().push((tokens, lp));
                }
            }
        }
        let series: Vec<Series> = probes.into_iter().collect();
        if let Some(svg) = line_chart("Probes", "tokens", "log-prob of the target (nats)", &series) {
            plots.push(("probes.svg".into(), svg));
        }
    }
    if let Some(page) = read(Stage::Eval, "report.md").await? {
        let text = String::from_utf8_lossy(&page);
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
}
