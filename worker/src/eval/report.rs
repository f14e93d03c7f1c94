//! The eval stage's Markdown report: each checkpoint's tables, base against long-context, and the
//! probes across every checkpoint training recorded.

use std::fmt::Write as _;

use pretrain_crd::Stage;
use pretrain_crd::spec::BenchmarkFormat;

use super::stage::{CheckpointReport, ProbeRow, Report};

/// The Markdown report.
pub fn markdown(run: &str, report: &Report) -> String {
    let mut md = String::new();
    let _ = writeln!(md, "# Evaluation of `{run}`\n");
    for c in &report.checkpoints {
        checkpoint_section(&mut md, c);
    }
    if let [base, long] = &report.checkpoints[..]
        && long.stage == Stage::LongContext.as_str()
    {
        comparison_section(&mut md, base, long);
    }
    if !report.probe_history.is_empty() {
        probe_history_section(&mut md, &report.probe_history);
    }
    md
}

/// One checkpoint's tables: held-out perplexity, benchmarks, passkey and probes.
fn checkpoint_section(md: &mut String, c: &CheckpointReport) {
    let _ = writeln!(
        md,
        "## {} ({} step {}, {} tokens, trained at {} tokens, RoPE base {:.1}{})\n",
        c.label,
        c.stage,
        c.step,
        c.tokens_seen,
        c.seq_len,
        c.model.rope_base,
        if c.model.rope_scaling.is_none() {
            String::new()
        } else {
            format!(", {}", serde_json::to_string(&c.model.rope_scaling).unwrap_or_default())
        }
    );
    let _ = writeln!(md, "| held-out | documents | tokens | bytes | loss | unigram loss | perplexity | bits/byte |");
    let _ = writeln!(md, "|---|---:|---:|---:|---:|---:|---:|---:|");
    for (cat, p) in &c.perplexity {
        let unigram = p.unigram_loss.map_or_else(|| "-".into(), |u| format!("{u:.4}"));
        let _ = writeln!(
            md,
            "| {cat} | {} | {} | {} | {:.4} | {unigram} | {:.2} | {:.4} |",
            p.documents, p.tokens, p.bytes, p.loss, p.perplexity, p.bits_per_byte
        );
    }
    if !c.benchmarks.is_empty() {
        let _ = writeln!(md, "\n| benchmark | form | items | score | chance | also |");
        let _ = writeln!(md, "|---|---|---:|---:|---:|---|");
        for (name, b) in &c.benchmarks {
            let form = match b.format {
                BenchmarkFormat::Cloze => "cloze, acc_norm (per character)",
                BenchmarkFormat::Generative => "generative, exact match",
                BenchmarkFormat::Loglikelihood => "target, greedy acc",
            };
            let mut also = Vec::new();
            also.extend(b.acc_bytes.map(|a| format!("acc per byte {a:.3}")));
            also.extend(b.acc_raw.map(|a| format!("acc {a:.3}")));
            also.extend(b.perplexity.map(|p| format!("perplexity {p:.2}")));
            let also = also.join(", ");
            let _ = writeln!(md, "| {name} | {form} | {} | {:.3} | {:.3} | {also} |", b.items, b.score, b.chance);
        }
    }
    if !c.passkey.is_empty() {
        let _ = writeln!(md, "\n| length | passkey correct | accuracy | key log-prob | held-out loss |");
        let _ = writeln!(md, "|---:|---:|---:|---:|---:|");
        for p in &c.passkey {
            let loss = c.loss_by_length.iter().find(|l| l.length == p.length);
            let loss = loss.map_or_else(|| "-".into(), |l| format!("{:.4}", l.loss));
            let _ = writeln!(
                md,
                "| {} | {}/{} | {:.2} | {:.2} | {loss} |",
                p.length, p.correct, p.trials, p.accuracy, p.key_logprob
            );
        }
    }
    if !c.probes.is_empty() {
        let _ = writeln!(md, "\n| probe | log-prob |\n|---|---:|");
        for (name, lp) in &c.probes {
            let _ = writeln!(md, "| {name} | {lp:.3} |");
        }
    }
    let _ = writeln!(md);
}

/// Base against long-context on the measures both have.
fn comparison_section(md: &mut String, base: &CheckpointReport, long: &CheckpointReport) {
    let _ = writeln!(md, "## {} vs {}\n", base.label, long.label);
    let _ = writeln!(md, "| measure | {} | {} |\n|---|---:|---:|", base.label, long.label);
    if let (Some(a), Some(b)) = (base.perplexity.get("all"), long.perplexity.get("all")) {
        let _ = writeln!(
            md,
            "| held-out bits/byte (at {} vs {} tokens) | {:.4} | {:.4} |",
            base.seq_len, long.seq_len, a.bits_per_byte, b.bits_per_byte
        );
    }
    for (name, a) in &base.benchmarks {
        if let Some(b) = long.benchmarks.get(name) {
            let _ = writeln!(md, "| {name} | {:.3} | {:.3} |", a.score, b.score);
        }
    }
    for (a, b) in base.passkey.iter().zip(&long.passkey) {
        let _ = writeln!(md, "| passkey at {} tokens | {:.2} | {:.2} |", a.length, a.accuracy, b.accuracy);
    }
    for (a, b) in base.loss_by_length.iter().zip(&long.loss_by_length) {
        let _ = writeln!(md, "| held-out loss in {}-token windows | {:.4} | {:.4} |", a.length, a.loss, b.loss);
    }
    let _ = writeln!(md);
}

/// The probes at every checkpoint training recorded.
fn probe_history_section(md: &mut String, history: &[ProbeRow]) {
    let names: Vec<&String> =
        history.iter().flat_map(|r| r.logprobs.keys()).collect::<std::collections::BTreeSet<_>>().into_iter().collect();
    let _ = writeln!(md, "## Probes across checkpoints (log-prob of the target, nats)\n");
    let _ = write!(md, "| stage | step | tokens |");
    for n in &names {
        let _ = write!(md, " {n} |");
    }
    let _ = write!(md, "\n|---|---:|---:|");
    for _ in &names {
        let _ = write!(md, "---:|");
    }
    let _ = writeln!(md);
    for r in history {
        let _ = write!(md, "| {} | {} | {} |", r.stage, r.step, r.tokens);
        for n in &names {
            match r.logprobs.get(*n) {
                Some(v) => {
                    let _ = write!(md, " {v:.3} |");
                }
                None => md.push_str(" |"),
            }
        }
        let _ = writeln!(md);
    }
    let _ = writeln!(md);
}
