//! Benchmarks in cloze and generative form, read from JSONL task files or built from held-out text.
//!
//! A task file has one JSON object per line:
//! - cloze: `{"context": "The capital of France is", "choices": [" Paris", " Rome"], "answer": 0}`;
//!   every choice is scored as a continuation of the context, and the one with the highest
//!   log-likelihood per character wins (lm-evaluation-harness's `acc_norm`; `accBytes` divides by
//!   bytes, `accRaw` uses the raw sum). No letters, no options listed in the prompt: the model is
//!   asked to continue text, which is what a pretrained model does.
//! - loglikelihood: `{"context": "... he picked up the", "target": " ball"}`; the target is scored
//!   by its log-likelihood (the task's perplexity is `exp(-mean)` over items) and counts as right
//!   when greedy decoding gives every one of its tokens, as lm-evaluation-harness scores LAMBADA.
//! - generative: `{"context": "2 + 2 =", "answer": " 4", "until": ["\n"], "maxTokens": 8}`; the model
//!   continues greedily until a stop string (default a newline) or `maxTokens` (default 32), and the
//!   output must equal an answer (one string or a list) after trimming whitespace.
//!
//! A malformed line fails the whole task with the file and line.

use pretrain_crd::spec::BenchmarkFormat;
use serde::Deserialize;

use super::EvalError;
use pretrain_crd::seeded::splitmix;

/// One benchmark item.
#[derive(Debug, Clone, PartialEq)]
pub enum Item {
    /// Choices scored by log-likelihood.
    Cloze {
        /// Text before the choices.
        context: String,
        /// Candidate continuations.
        choices: Vec<String>,
        /// Index of the right one.
        answer: usize,
    },
    /// A target scored by log-likelihood and by whether greedy decoding gives it.
    Target {
        /// Text before the target.
        context: String,
        /// The continuation scored.
        target: String,
    },
    /// Greedy generation scored by exact match.
    Generative {
        /// The prompt.
        context: String,
        /// Accepted outputs (compared trimmed).
        answers: Vec<String>,
        /// Generation stops at the first of these.
        until: Vec<String>,
        /// Most tokens generated.
        max_tokens: usize,
    },
}

/// A benchmark: a name and its items.
#[derive(Debug, Clone, PartialEq)]
pub struct Task {
    /// Name in reports.
    pub name: String,
    /// Form of every item.
    pub format: BenchmarkFormat,
    /// Where the items came from (a URL, or a description of the built-in source).
    pub source: String,
    /// The items.
    pub items: Vec<Item>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct ClozeLine {
    #[serde(default)]
    #[allow(dead_code)]
    id: Option<serde_json::Value>,
    context: String,
    choices: Vec<String>,
    answer: usize,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Answers {
    One(String),
    Many(Vec<String>),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct GenerativeLine {
    #[serde(default)]
    #[allow(dead_code)]
    id: Option<serde_json::Value>,
    context: String,
    answer: Answers,
    #[serde(default)]
    until: Option<Vec<String>>,
    #[serde(default)]
    max_tokens: Option<usize>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct TargetLine {
    #[serde(default)]
    #[allow(dead_code)]
    id: Option<serde_json::Value>,
    context: String,
    target: String,
}

/// Most tokens a generative item may ask for.
pub const MAX_GENERATED_TOKENS: usize = 256;

/// Parses a task file; `file` names it in errors.
pub fn parse(name: &str, format: BenchmarkFormat, file: &str, text: &str) -> Result<Task, EvalError> {
    let err = |line: usize, reason: String| EvalError::Task { file: file.to_string(), line, reason };
    let mut items = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line = i + 1;
        if raw.trim().is_empty() {
            continue;
        }
        let item = match format {
            BenchmarkFormat::Cloze => {
                let c: ClozeLine = serde_json::from_str(raw).map_err(|e| err(line, e.to_string()))?;
                if c.choices.len() < 2 {
                    return Err(err(line, format!("needs at least 2 choices, has {}", c.choices.len())));
                }
                if c.answer >= c.choices.len() {
                    return Err(err(
                        line,
                        format!("answer {} is not an index of the {} choices", c.answer, c.choices.len()),
                    ));
                }
                if let Some(k) = c.choices.iter().position(|s| s.is_empty()) {
                    return Err(err(line, format!("choice {k} is empty")));
                }
                Item::Cloze { context: c.context, choices: c.choices, answer: c.answer }
            }
            BenchmarkFormat::Generative => {
                let g: GenerativeLine = serde_json::from_str(raw).map_err(|e| err(line, e.to_string()))?;
                let answers = match g.answer {
                    Answers::One(a) => vec![a],
                    Answers::Many(a) => a,
                };
                if answers.is_empty() {
                    return Err(err(line, "answer is an empty list".into()));
                }
                let max_tokens = g.max_tokens.unwrap_or(32);
                if max_tokens == 0 || max_tokens > MAX_GENERATED_TOKENS {
                    return Err(err(line, format!("maxTokens must be 1 to {MAX_GENERATED_TOKENS}, got {max_tokens}")));
                }
                let until = g.until.unwrap_or_else(|| vec!["\n".into()]);
                if until.iter().any(String::is_empty) {
                    return Err(err(line, "until holds an empty string".into()));
                }
                Item::Generative { context: g.context, answers, until, max_tokens }
            }
            BenchmarkFormat::Loglikelihood => {
                let t: TargetLine = serde_json::from_str(raw).map_err(|e| err(line, e.to_string()))?;
                if t.target.is_empty() {
                    return Err(err(line, "target is empty".into()));
                }
                Item::Target { context: t.context, target: t.target }
            }
        };
        let (Item::Cloze { context, .. } | Item::Generative { context, .. } | Item::Target { context, .. }) = &item;
        if context.is_empty() {
            return Err(err(line, "context is empty".into()));
        }
        items.push(item);
    }
    if items.is_empty() {
        return Err(err(0, "has no items".into()));
    }
    Ok(Task { name: name.to_string(), format, source: file.to_string(), items })
}

/// Sentences of `text` with their byte offsets: split after `.`, `!` or `?` followed by whitespace,
/// and at line breaks.
fn sentences(text: &str) -> Vec<(usize, &str)> {
    let mut out = Vec::new();
    let mut start = 0;
    let bytes = text.as_bytes();
    for i in 0..bytes.len() {
        let end = match bytes[i] {
            b'\n' => Some(i),
            b'.' | b'!' | b'?' if bytes.get(i + 1).is_some_and(|b| b.is_ascii_whitespace()) => Some(i + 1),
            _ => None,
        };
        if let Some(end) = end {
            if end > start {
                out.push((start, &text[start..end]));
            }
            start = end;
            while start < bytes.len() && bytes[start].is_ascii_whitespace() && start <= i + 1 {
                start += 1;
            }
        }
    }
    if start < text.len() {
        out.push((start, &text[start..]));
    }
    out.into_iter()
        .map(|(at, s)| {
            let lead = s.len() - s.trim_start().len();
            (at + lead, s.trim())
        })
        .filter(|(_, s)| !s.is_empty())
        .collect()
}

/// Whether a sentence is a good cloze target: prose of a readable length.
fn is_prose_sentence(s: &str) -> bool {
    let letters = s.chars().filter(|c| c.is_alphabetic()).count();
    (24..=200).contains(&s.len()) && letters * 2 >= s.len() && s.split_whitespace().count() >= 4
}

/// Most items one document gives a built-in task.
const PER_DOCUMENT: usize = 10;

/// Up to `n` next-sentence cloze items from held-out documents: the context is the document up to a
/// sentence (its last 1,000 bytes at most), the right choice is that sentence, the three others are
/// sentences of other documents. Deterministic in `seed`.
pub fn next_sentence(docs: &[&str], n: usize, seed: u64) -> Task {
    let mut pool: Vec<(usize, &str)> = Vec::new();
    let mut candidates: Vec<(usize, usize, &str)> = Vec::new();
    for (d, text) in docs.iter().enumerate() {
        for (k, (at, s)) in sentences(text).into_iter().enumerate() {
            if is_prose_sentence(s) {
                pool.push((d, s));
                if k >= 2 && at >= 100 {
                    candidates.push((d, at, s));
                }
            }
        }
    }
    let mut state = seed ^ 0x6e65_7874;
    let mut items = Vec::new();
    let mut per_doc = vec![0usize; docs.len()];
    // Candidates in a seeded order, at most PER_DOCUMENT items from one document.
    let mut order: Vec<usize> = (0..candidates.len()).collect();
    pretrain_crd::seeded::shuffle(&mut order, &mut state);
    for i in order {
        if items.len() == n || pool.len() < 8 {
            break;
        }
        let (d, at, target) = candidates[i];
        if per_doc[d] == PER_DOCUMENT {
            continue;
        }
        per_doc[d] += 1;
        let text = docs[d];
        let context = text[floor_boundary(text, at.saturating_sub(1000))..at].trim_end().to_string();
        let mut choices = vec![format!(" {target}")];
        let mut tries = 0;
        while choices.len() < 4 && tries < 100 {
            tries += 1;
            let (od, s) = pool[(splitmix(&mut state) % pool.len() as u64) as usize];
            let choice = format!(" {s}");
            if od != d && !choices.contains(&choice) {
                choices.push(choice);
            }
        }
        if choices.len() < 4 {
            continue;
        }
        let answer = (splitmix(&mut state) % 4) as usize;
        choices.swap(0, answer);
        items.push(Item::Cloze { context, choices, answer });
    }
    Task {
        name: "heldout-next-sentence".into(),
        format: BenchmarkFormat::Cloze,
        source: "held-out documents: which sentence comes next (4 choices)".into(),
        items,
    }
}

/// Up to `n` last-word items from held-out documents, LAMBADA-style: the context runs up to a word of
/// at least four letters that already occurred in it (so the context makes it predictable), and the
/// target is that word with its leading space, scored as lm-evaluation-harness scores LAMBADA (its
/// log-likelihood, and whether greedy decoding gives it). Deterministic in `seed`.
pub fn last_word(docs: &[&str], n: usize, seed: u64) -> Task {
    let mut candidates: Vec<(usize, usize, &str)> = Vec::new();
    for (d, text) in docs.iter().enumerate() {
        let mut at = 0;
        for piece in text.split_inclusive(|c: char| !c.is_alphanumeric()) {
            let start = at;
            at += piece.len();
            let w = piece.trim_end_matches(|c: char| !c.is_alphanumeric());
            if start >= 200
                && w.len() >= 4
                && w.chars().all(char::is_alphabetic)
                && text[..start].ends_with(' ')
                && text[floor_boundary(text, start.saturating_sub(1000))..start].contains(w)
            {
                candidates.push((d, start, w));
            }
        }
    }
    let mut state = seed ^ 0x6c61_7374;
    let mut order: Vec<usize> = (0..candidates.len()).collect();
    pretrain_crd::seeded::shuffle(&mut order, &mut state);
    let mut per_doc = vec![0usize; docs.len()];
    let mut items = Vec::new();
    for i in order {
        if items.len() == n {
            break;
        }
        let (d, at, word) = candidates[i];
        if per_doc[d] == PER_DOCUMENT {
            continue;
        }
        per_doc[d] += 1;
        let text = docs[d];
        items.push(Item::Target {
            context: text[floor_boundary(text, at.saturating_sub(1000))..at - 1].to_string(),
            target: format!(" {word}"),
        });
    }
    Task {
        name: "heldout-last-word".into(),
        format: BenchmarkFormat::Loglikelihood,
        source: "held-out documents: generate a word the context already used (LAMBADA-style)".into(),
        items,
    }
}

/// The first char boundary at or after `at`.
fn floor_boundary(text: &str, mut at: usize) -> usize {
    while !text.is_char_boundary(at) {
        at += 1;
    }
    at
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn task_files_parse_and_bad_lines_name_file_and_line() {
        let cloze = "{\"context\": \"The sky is\", \"choices\": [\" blue\", \" green\"], \"answer\": 0}\n\n\
                     {\"id\": 7, \"context\": \"1 + 1 =\", \"choices\": [\" 3\", \" 2\"], \"answer\": 1}\n";
        let t = parse("sky", BenchmarkFormat::Cloze, "sky.jsonl", cloze).unwrap();
        assert_eq!(t.items.len(), 2);
        assert_eq!(
            t.items[1],
            Item::Cloze { context: "1 + 1 =".into(), choices: vec![" 3".into(), " 2".into()], answer: 1 }
        );
        let g = "{\"context\": \"2 + 2 =\", \"answer\": [\" 4\", \" four\"], \"maxTokens\": 4}";
        let t = parse("add", BenchmarkFormat::Generative, "add.jsonl", g).unwrap();
        assert_eq!(
            t.items[0],
            Item::Generative {
                context: "2 + 2 =".into(),
                answers: vec![" 4".into(), " four".into()],
                until: vec!["\n".into()],
                max_tokens: 4
            }
        );
        let l = "{\"context\": \"he picked up the\", \"target\": \" ball\"}";
        let t = parse("lambada", BenchmarkFormat::Loglikelihood, "l.jsonl", l).unwrap();
        assert_eq!(t.items[0], Item::Target { context: "he picked up the".into(), target: " ball".into() });
        let bad = [
            (
                BenchmarkFormat::Cloze,
                "{\"context\": \"a\", \"choices\": [\" b\", \" c\"], \"answer\": 0}\nnot json",
                "f.jsonl:2: expected",
            ),
            (
                BenchmarkFormat::Cloze,
                "{\"context\": \"a\", \"choices\": [\" b\"], \"answer\": 0}",
                "f.jsonl:1: needs at least 2 choices",
            ),
            (
                BenchmarkFormat::Cloze,
                "{\"context\": \"a\", \"choices\": [\" b\", \" c\"], \"answer\": 2}",
                "f.jsonl:1: answer 2 is not an index",
            ),
            (
                BenchmarkFormat::Cloze,
                "{\"context\": \"a\", \"choices\": [\" b\", \" c\"], \"answer\": 0, \"gold\": 1}",
                "f.jsonl:1: unknown field `gold`",
            ),
            (BenchmarkFormat::Generative, "{\"context\": \"\", \"answer\": \"x\"}", "f.jsonl:1: context is empty"),
            (BenchmarkFormat::Generative, "{\"context\": \"a\"}", "f.jsonl:1: missing field `answer`"),
            (
                BenchmarkFormat::Generative,
                "{\"context\": \"a\", \"answer\": \"b\", \"maxTokens\": 0}",
                "f.jsonl:1: maxTokens must be",
            ),
            (BenchmarkFormat::Generative, "\n\n", "f.jsonl:0: has no items"),
            (BenchmarkFormat::Loglikelihood, "{\"context\": \"a\", \"target\": \"\"}", "f.jsonl:1: target is empty"),
            (BenchmarkFormat::Loglikelihood, "{\"context\": \"a\", \"answer\": \"b\"}", "f.jsonl:1: unknown field"),
        ];
        for (format, text, want) in bad {
            let e = parse("t", format, "f.jsonl", text).unwrap_err().to_string();
            assert!(e.starts_with(want), "{e} does not start with {want}");
        }
    }

    #[test]
    fn sentences_split_on_terminal_punctuation_and_lines() {
        let s: Vec<&str> =
            sentences("One two. Three four!\nFive six? 3.14 is pi\n\nEnd").into_iter().map(|x| x.1).collect();
        assert_eq!(s, ["One two.", "Three four!", "Five six?", "3.14 is pi", "End"]);
        let text = "Hello there. General Kenobi.";
        for (at, s) in sentences(text) {
            assert_eq!(&text[at..at + s.len()], s);
        }
    }

    fn docs() -> Vec<String> {
        (0..30)
            .map(|d| {
                (0..12)
                    .map(|k| format!("Document {d} has a sentence numbered {k} about the topic of item {}.", d * 7 + k))
                    .collect::<Vec<_>>()
                    .join(" ")
            })
            .collect()
    }

    #[test]
    fn next_sentence_items_hold_the_true_sentence_and_three_others() {
        let owned = docs();
        let docs: Vec<&str> = owned.iter().map(String::as_str).collect();
        let task = next_sentence(&docs, 10, 1);
        assert_eq!(task.items.len(), 10);
        assert_eq!(task, next_sentence(&docs, 10, 1), "deterministic");
        for item in &task.items {
            let Item::Cloze { context, choices, answer } = item else { panic!("cloze") };
            assert_eq!(choices.len(), 4);
            // The right choice continues the context in its own document.
            let doc = docs.iter().find(|d| d.contains(context.as_str())).unwrap();
            assert!(doc.contains(&format!("{context}{}", choices[*answer])), "{context:?} {:?}", choices[*answer]);
            let d = context.split_whitespace().nth(1).unwrap().to_string();
            for (k, c) in choices.iter().enumerate() {
                if k != *answer {
                    assert!(!c.contains(&format!("Document {d} ")), "a distractor from the same document: {c}");
                }
            }
        }
    }

    #[test]
    fn last_word_items_end_before_a_word_the_context_already_used() {
        let owned = docs();
        let docs: Vec<&str> = owned.iter().map(String::as_str).collect();
        let task = last_word(&docs, 5, 3);
        assert_eq!(task.items.len(), 5);
        for item in &task.items {
            let Item::Target { context, target } = item else { panic!("a target") };
            let word = target.strip_prefix(' ').expect("the target starts with the space before the word");
            assert!(context.contains(word));
            let doc = docs.iter().find(|d| d.contains(context.as_str())).unwrap();
            assert!(doc.contains(&format!("{context}{target}")));
        }
    }
}
