//! Rule filters with their published thresholds: Gopher quality and repetition (Rae et al. 2021), C4
//! (Raffel et al. 2020), FineWeb (Penedo et al. 2024) and language identification. Each check
//! follows DataTrove 0.10's definitions and drop-reason names, so counts compare across tools.
//!
//! One deliberate difference: words come from a small rule tokenizer (whitespace, then leading and
//! trailing punctuation and English contractions split off) rather than spaCy's, which DataTrove uses.
//! The two agree on ordinary prose; counts can differ by a token on abbreviations and URLs.

use std::collections::{HashMap, HashSet};
use std::hash::{BuildHasherDefault, Hasher};

use xxhash_rust::xxh3::xxh3_64;

use pretrain_crd::spec::{C4, Filters, FineWeb, GopherQuality, GopherRepetition, Language};

/// Why a document was dropped (DataTrove's reason names; `top_N_gram` and `duplicated_N_n_grams`
/// carry their n).
pub type Reason = String;

/// Punctuation that makes up "symbol" words (DataTrove's PUNCTUATION_SET, ASCII and common Unicode).
fn is_punct(c: char) -> bool {
    c.is_ascii_punctuation()
        || matches!(
            c,
            '—' | '–'
                | '”'
                | '“'
                | '„'
                | '’'
                | '‘'
                | '«'
                | '»'
                | '…'
                | '、'
                | '。'
                | '，'
                | '；'
                | '：'
                | '？'
                | '！'
                | '（'
                | '）'
                | '【'
                | '】'
                | '「'
                | '」'
                | '《'
                | '》'
                | '〈'
                | '〉'
                | '━'
                | '►'
                | '´'
                | '∶'
                | '％'
                | '．'
                | '～'
        )
        || (c.is_control() && c != '\t' && c != '\n')
}

/// Sentence-ending punctuation (the ASCII and CJK members of DataTrove's TERMINAL_PUNCTUATION).
fn is_terminal(c: char) -> bool {
    matches!(
        c,
        '.' | '!'
            | '?'
            | '。'
            | '．'
            | '？'
            | '！'
            | '｡'
            | '‼'
            | '‽'
            | '⁇'
            | '⁈'
            | '⁉'
            | '।'
            | '॥'
            | '۔'
            | '؟'
    )
}

const CONTRACTIONS: [&str; 7] = ["n't", "'s", "'re", "'ve", "'ll", "'d", "'m"];

/// Words of a text: whitespace-separated chunks with leading and trailing punctuation split off one
/// character at a time (a run of dots stays one `...` token) and English contractions separated.
pub fn words(text: &str) -> Vec<&str> {
    let mut out = Vec::with_capacity(text.len() / 5);
    for chunk in text.split_whitespace() {
        let mut rest = chunk;
        let mut tail = Vec::new();
        // Leading punctuation.
        while let Some(c) = rest.chars().next() {
            if !is_punct(c) || rest.len() == c.len_utf8() {
                break;
            }
            let n = if c == '.' { rest.len() - rest.trim_start_matches('.').len() } else { c.len_utf8() };
            if n == rest.len() {
                break;
            }
            out.push(&rest[..n]);
            rest = &rest[n..];
        }
        // Trailing punctuation and contractions.
        while let Some(c) = rest.chars().next_back() {
            if rest.bytes().all(|b| b == b'.') {
                break; // a standalone ellipsis is one token
            }
            if is_punct(c) && rest.len() > c.len_utf8() {
                let n = if c == '.' { rest.len() - rest.trim_end_matches('.').len() } else { c.len_utf8() };
                let n = if n == rest.len() { c.len_utf8() } else { n };
                tail.push(&rest[rest.len() - n..]);
                rest = &rest[..rest.len() - n];
                continue;
            }
            if let Some(suffix) = CONTRACTIONS.iter().find(|s| {
                rest.len() > s.len() && rest.get(rest.len() - s.len()..).is_some_and(|t| t.eq_ignore_ascii_case(s))
            }) {
                tail.push(&rest[rest.len() - suffix.len()..]);
                rest = &rest[..rest.len() - suffix.len()];
                continue;
            }
            break;
        }
        if !rest.is_empty() {
            out.push(rest);
        }
        out.extend(tail.into_iter().rev());
    }
    out
}

fn chars(s: &str) -> usize {
    s.chars().count()
}

/// Gopher quality rules; `words` are `words(text)`. As in DataTrove, a threshold of 0 turns its rule off.
pub fn gopher_quality(cfg: &GopherQuality, text: &str, words: &[&str]) -> Result<(), Reason> {
    let n_words = words.len();
    let non_symbol: Vec<&&str> = words.iter().filter(|w| w.chars().any(|c| !is_punct(c))).collect();
    let n = non_symbol.len() as u64;
    if cfg.min_words > 0 && n < cfg.min_words {
        return Err("gopher_short_doc".into());
    }
    if cfg.max_words > 0 && n > cfg.max_words {
        return Err("gopher_long_doc".into());
    }
    let avg = non_symbol.iter().map(|w| chars(w)).sum::<usize>() as f64 / n.max(1) as f64;
    if cfg.min_avg_word_length > 0.0 && avg < cfg.min_avg_word_length {
        return Err("gopher_below_avg_threshold".into());
    }
    if cfg.max_avg_word_length > 0.0 && avg > cfg.max_avg_word_length {
        return Err("gopher_above_avg_threshold".into());
    }
    let per_word = |count: usize| count as f64 / n_words.max(1) as f64;
    let symbols = cfg.max_symbol_word_ratio > 0.0;
    if symbols && per_word(text.matches('#').count()) > cfg.max_symbol_word_ratio {
        return Err("gopher_too_many_hashes".into());
    }
    if symbols && per_word(text.matches("...").count() + text.matches('…').count()) > cfg.max_symbol_word_ratio {
        return Err("gopher_too_many_ellipsis".into());
    }
    let lines: Vec<&str> = text.lines().collect();
    let per_line = |count: usize| count as f64 / lines.len().max(1) as f64;
    let bullets = lines.iter().filter(|l| l.trim_start().starts_with(['•', '-'])).count();
    if cfg.max_bullet_lines_ratio > 0.0 && per_line(bullets) > cfg.max_bullet_lines_ratio {
        return Err("gopher_too_many_bullets".into());
    }
    let ellipses = lines.iter().filter(|l| l.trim_end().ends_with("...") || l.trim_end().ends_with('…')).count();
    if cfg.max_ellipsis_lines_ratio > 0.0 && per_line(ellipses) > cfg.max_ellipsis_lines_ratio {
        return Err("gopher_too_many_end_ellipsis".into());
    }
    let alpha = words.iter().filter(|w| w.chars().any(char::is_alphabetic)).count();
    if cfg.min_alpha_words_ratio > 0.0 && per_word(alpha) < cfg.min_alpha_words_ratio {
        return Err("gopher_below_alpha_threshold".into());
    }
    const STOP_WORDS: [&str; 8] = ["the", "be", "to", "of", "and", "that", "have", "with"];
    let present = STOP_WORDS.iter().filter(|s| words.contains(s)).count();
    if (present as u32) < cfg.min_stop_words {
        return Err("gopher_enough_stop_words".into());
    }
    Ok(())
}

/// A hasher for keys that are already 64-bit hashes (xxh3 of the text they stand for). Two texts
/// with equal 64-bit hashes count as equal; at these set sizes a collision is vanishingly unlikely.
#[derive(Default)]
struct PreHashed(u64);

impl Hasher for PreHashed {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, _: &[u8]) {
        unreachable!("only u64 keys are hashed")
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

type HashedSet = HashSet<u64, BuildHasherDefault<PreHashed>>;
type HashedMap<V> = HashMap<u64, V, BuildHasherDefault<PreHashed>>;

/// Hash of n consecutive word hashes.
fn gram_hash(word_hashes: &[u64]) -> u64 {
    word_hashes
        .iter()
        .fold(0x243F_6A88_85A3_08D3u64, |h, w| (h.rotate_left(23) ^ w).wrapping_mul(0x9E37_79B9_7F4A_7C15))
}

/// (elements, duplicate elements, characters in the duplicates): every occurrence after the first
/// counts.
fn duplicates<'a>(items: impl Iterator<Item = &'a str>) -> (usize, usize, usize) {
    let mut seen = HashedSet::default();
    let (mut total, mut dups, mut dup_chars) = (0, 0, 0);
    for item in items {
        total += 1;
        if !seen.insert(xxh3_64(item.as_bytes())) {
            dups += 1;
            dup_chars += chars(item);
        }
    }
    (total, dups, dup_chars)
}

/// Gopher repetition rules. An empty text is dropped (`dup_para_char_frac`: nothing but repetition).
/// As in DataTrove, a fraction of 0 turns the paragraph and line rules off (not the n-gram ones).
pub fn gopher_repetition(cfg: &GopherRepetition, text: &str, words: &[&str]) -> Result<(), Reason> {
    let len = chars(text);
    if len == 0 {
        return Err("dup_para_char_frac".into());
    }
    let paragraphs = split_runs(text.trim(), 2);
    let (total, dups, dup_chars) = duplicates(paragraphs.into_iter());
    if cfg.dup_para_fraction > 0.0 && dups as f64 / total as f64 > cfg.dup_para_fraction {
        return Err("dup_para_frac".into());
    }
    if cfg.dup_para_char_fraction > 0.0 && dup_chars as f64 / len as f64 > cfg.dup_para_char_fraction {
        return Err("dup_para_char_frac".into());
    }
    let (total, dups, dup_chars) = duplicates(split_runs(text, 1).into_iter());
    if cfg.dup_line_fraction > 0.0 && dups as f64 / total as f64 > cfg.dup_line_fraction {
        return Err("dup_line_frac".into());
    }
    if cfg.dup_line_char_fraction > 0.0 && dup_chars as f64 / len as f64 > cfg.dup_line_char_fraction {
        return Err("dup_line_char_frac".into());
    }
    let word_hashes: Vec<u64> = words.iter().map(|w| xxh3_64(w.as_bytes())).collect();
    let word_chars: Vec<usize> = words.iter().map(|w| chars(w)).collect();
    for limit in &cfg.top_ngrams {
        let n = limit.n as usize;
        if words.len() < n {
            continue;
        }
        // The most frequent n-gram, the earliest on ties, weighted by its length with spaces.
        let mut counts: HashedMap<(usize, usize)> = HashedMap::default();
        for (i, gram) in word_hashes.windows(n).enumerate() {
            counts.entry(gram_hash(gram)).or_insert((0, i)).0 += 1;
        }
        let &(count, first) =
            counts.values().max_by(|a, b| a.0.cmp(&b.0).then(b.1.cmp(&a.1))).expect("at least one n-gram");
        let gram_chars = word_chars[first..first + n].iter().sum::<usize>() + n - 1;
        if (gram_chars * count) as f64 / len as f64 > limit.max_fraction {
            return Err(format!("top_{n}_gram"));
        }
    }
    for limit in &cfg.dup_ngrams {
        let n = limit.n as usize;
        if words.len() < n {
            continue;
        }
        let mut seen = HashedSet::default();
        let (mut i, mut repeated) = (0, 0);
        while i + n <= words.len() {
            if seen.insert(gram_hash(&word_hashes[i..i + n])) {
                i += 1;
            } else {
                repeated += word_chars[i..i + n].iter().sum::<usize>();
                i += n;
            }
        }
        if repeated as f64 / len as f64 > limit.max_fraction {
            return Err(format!("duplicated_{n}_n_grams"));
        }
    }
    Ok(())
}

/// Splits on runs of at least `min` newlines (`\n{2,}` or `\n+`), keeping empty edge items.
fn split_runs(text: &str, min: usize) -> Vec<&str> {
    let mut out = Vec::new();
    let bytes = text.as_bytes();
    let (mut start, mut i) = (0, 0);
    while i < bytes.len() {
        if bytes[i] == b'\n' {
            let run_end = i + bytes[i..].iter().take_while(|b| **b == b'\n').count();
            if run_end - i >= min {
                out.push(&text[start..i]);
                start = run_end;
            }
            i = run_end;
        } else {
            i += 1;
        }
    }
    out.push(&text[start..]);
    out
}

const POLICY: [&str; 6] =
    ["terms of use", "privacy policy", "cookie policy", "uses cookies", "use of cookies", "use cookies"];

/// The C4 rules: cleans lines, and returns the cleaned text or the reason the whole page goes.
pub fn c4(cfg: &C4, text: &str, lines_dropped: &mut HashMap<&'static str, u64>) -> Result<String, Reason> {
    let mut kept: Vec<String> = Vec::new();
    let mut sentences = 0usize;
    for raw in text.lines() {
        let line = raw.trim();
        let word_count = line.split_whitespace().count();
        if line.split_whitespace().any(|w| chars(w) > cfg.max_word_length as usize) {
            *lines_dropped.entry("c4_too_long_word").or_default() += 1;
            continue;
        }
        let line = if cfg.remove_citations { remove_citations(line) } else { line.to_string() };
        if cfg.terminal_punctuation && (!line.ends_with(['.', '?', '!', '"', '\'']) || line.ends_with("...")) {
            *lines_dropped.entry("c4_no_terminal_punctuation").or_default() += 1;
            continue;
        }
        if word_count < cfg.min_words_per_line as usize {
            *lines_dropped.entry("c4_too_few_words").or_default() += 1;
            continue;
        }
        let lower = line.to_lowercase();
        if cfg.remove_lorem_ipsum && lower.contains("lorem ipsum") {
            return Err("lorem_ipsum".into());
        }
        if cfg.remove_javascript && lower.contains("javascript") {
            *lines_dropped.entry("c4_javascript").or_default() += 1;
            continue;
        }
        if cfg.remove_curly_braces && line.contains('{') {
            return Err("curly_bracket".into());
        }
        if cfg.remove_policy_lines && POLICY.iter().any(|p| lower.contains(p)) {
            *lines_dropped.entry("c4_policy").or_default() += 1;
            continue;
        }
        sentences += count_sentences(&line);
        kept.push(line);
    }
    if sentences < cfg.min_sentences as usize {
        return Err("too_few_sentences".into());
    }
    Ok(kept.join("\n").trim().to_string())
}

/// `[1]`, `[]`, `[edit]` and `[citation needed]` markers removed.
fn remove_citations(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut rest = line;
    while let Some(open) = rest.find('[') {
        out.push_str(&rest[..open]);
        let after = &rest[open + 1..];
        let marker =
            ["edit]", "citation needed]"].iter().find(|m| after.starts_with(*m)).map(|m| m.len()).or_else(|| {
                let digits = after.bytes().take_while(u8::is_ascii_digit).count();
                after[digits..].starts_with(']').then_some(digits + 1)
            });
        match marker {
            Some(len) => rest = &after[len..],
            None => {
                out.push('[');
                rest = after;
            }
        }
    }
    out.push_str(rest);
    out
}

/// Sentences in a line: a sentence ends at a token made of one terminal punctuation mark, once a
/// non-punctuation token follows (the spaCy sentencizer's rule).
fn count_sentences(line: &str) -> usize {
    let mut count = 1;
    let mut seen_end = false;
    for w in words(line) {
        let single_terminal = w.chars().count() == 1 && w.chars().all(is_terminal);
        if seen_end && !single_terminal && !w.chars().all(is_punct) {
            count += 1;
            seen_end = false;
        } else if single_terminal {
            seen_end = true;
        }
    }
    count
}

/// FineWeb quality rules.
pub fn fineweb(cfg: &FineWeb, text: &str, words: &[&str]) -> Result<(), Reason> {
    let lines: Vec<&str> = text.split('\n').filter(|l| !l.trim().is_empty()).collect();
    if lines.is_empty() {
        return Err("empty".into());
    }
    let n = lines.len() as f64;
    let punctuated = lines.iter().filter(|l| l.chars().next_back().is_some_and(is_terminal)).count();
    if (punctuated as f64 / n) < cfg.min_line_punctuation_ratio {
        return Err("line_punct_ratio".into());
    }
    let short = lines.iter().filter(|l| chars(l) <= cfg.short_line_length as usize).count();
    if short as f64 / n > cfg.max_short_line_ratio {
        return Err("short_line_ratio".into());
    }
    let (_, _, dup_chars) = duplicates(lines.iter().copied());
    let non_newline = chars(text) - text.matches('\n').count();
    if dup_chars as f64 / non_newline.max(1) as f64 > cfg.max_duplicate_line_char_ratio {
        return Err("char_dup_ratio".into());
    }
    if text.matches('\n').count() as f64 / words.len().max(1) as f64 > cfg.max_newline_ratio {
        return Err("list_ratio".into());
    }
    Ok(())
}

/// Language identification: keeps documents whose detected language is listed with enough confidence.
pub fn language(cfg: &Language, text: &str) -> Result<(), Reason> {
    // Detection on a prefix: enough signal, bounded cost on huge documents.
    let sample = match text.char_indices().nth(4096) {
        Some((i, _)) => &text[..i],
        None => text,
    };
    let Some(info) = whatlang::detect(sample) else {
        return Err("language_unknown".into());
    };
    let code = iso639_1(info.lang());
    if !cfg.languages.iter().any(|l| Some(l.as_str()) == code) || info.confidence() < cfg.min_score {
        return Err("language".into());
    }
    Ok(())
}

/// ISO 639-1 code of a whatlang language (those that have one).
fn iso639_1(lang: whatlang::Lang) -> Option<&'static str> {
    use whatlang::Lang::*;
    Some(match lang {
        Eng => "en",
        Rus => "ru",
        Cmn => "zh",
        Spa => "es",
        Por => "pt",
        Ita => "it",
        Ben => "bn",
        Fra => "fr",
        Deu => "de",
        Ukr => "uk",
        Kat => "ka",
        Ara => "ar",
        Hin => "hi",
        Jpn => "ja",
        Heb => "he",
        Yid => "yi",
        Pol => "pl",
        Amh => "am",
        Jav => "jv",
        Kor => "ko",
        Nob => "nb",
        Dan => "da",
        Swe => "sv",
        Fin => "fi",
        Tur => "tr",
        Nld => "nl",
        Hun => "hu",
        Ces => "cs",
        Ell => "el",
        Bul => "bg",
        Bel => "be",
        Mar => "mr",
        Kan => "kn",
        Ron => "ro",
        Slv => "sl",
        Hrv => "hr",
        Srp => "sr",
        Mkd => "mk",
        Lit => "lt",
        Lav => "lv",
        Est => "et",
        Tam => "ta",
        Vie => "vi",
        Urd => "ur",
        Tha => "th",
        Guj => "gu",
        Uzb => "uz",
        Pan => "pa",
        Aze => "az",
        Ind => "id",
        Tel => "te",
        Pes => "fa",
        Mal => "ml",
        Ori => "or",
        Mya => "my",
        Nep => "ne",
        Sin => "si",
        Khm => "km",
        Tuk => "tk",
        Aka => "ak",
        Zul => "zu",
        Sna => "sn",
        Afr => "af",
        Lat => "la",
        Slk => "sk",
        Cat => "ca",
        Tgl => "tl",
        Hye => "hy",
        Epo => "eo",
        #[allow(unreachable_patterns)]
        _ => return None,
    })
}

/// The outcome of the rule filters for one document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Kept, with its (C4-cleaned) text.
    Keep(String),
    /// Dropped by `filter` for `reason`.
    Drop {
        /// `gopher_quality`, `gopher_repetition`, `c4`, `fineweb` or `language`.
        filter: &'static str,
        /// The rule that fired.
        reason: Reason,
    },
}

/// Applies the enabled filters in DataTrove's FineWeb order (`examples/fineweb.py`: language, Gopher
/// repetition, Gopher quality, C4, FineWeb), with FineWeb's settings by default: C4 without its
/// terminal-punctuation line rule. `lines_dropped` accumulates C4's per-line removals.
pub fn apply(filters: &Filters, text: &str, lines_dropped: &mut HashMap<&'static str, u64>) -> Verdict {
    let drop = |filter, reason| Verdict::Drop { filter, reason };
    if filters.language.enabled
        && let Err(r) = language(&filters.language, text)
    {
        return drop("language", r);
    }
    let tokens = words(text);
    if filters.gopher_repetition.enabled
        && let Err(r) = gopher_repetition(&filters.gopher_repetition, text, &tokens)
    {
        return drop("gopher_repetition", r);
    }
    if filters.gopher_quality.enabled
        && let Err(r) = gopher_quality(&filters.gopher_quality, text, &tokens)
    {
        return drop("gopher_quality", r);
    }
    let text = if filters.c4.enabled {
        match c4(&filters.c4, text, lines_dropped) {
            Ok(cleaned) => cleaned,
            Err(r) => return drop("c4", r),
        }
    } else {
        text.to_string()
    };
    if filters.fineweb.enabled {
        let tokens = words(&text);
        if let Err(r) = fineweb(&filters.fineweb, &text, &tokens) {
            return drop("fineweb", r);
        }
    }
    Verdict::Keep(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    const FRODO: &str = "I wish it need not have happened in my time,' said Frodo. 'So do I,' said Gandalf, 'and so do all who live to see such times. But that is not for them to decide. All we have to decide is what to do with the time that is given us.'";

    fn small_gopher() -> GopherQuality {
        GopherQuality { min_words: 10, max_words: 1000, ..GopherQuality::default() }
    }

    fn gq(text: &str) -> Result<(), Reason> {
        gopher_quality(&small_gopher(), text, &words(text))
    }

    fn rep(text: &str) -> Result<(), Reason> {
        gopher_repetition(&GopherRepetition::default(), text, &words(text))
    }

    #[test]
    fn words_split_punctuation_and_contractions() {
        assert_eq!(
            words("I don't know, can't you? \"quoted\" Hi... there. (hello), 3.5% C++"),
            [
                "I", "do", "n't", "know", ",", "ca", "n't", "you", "?", "\"", "quoted", "\"", "Hi", "...", "there",
                ".", "(", "hello", ")", ",", "3.5", "%", "C", "+", "+"
            ]
        );
        assert_eq!(words("a\tb\u{a0}c \u{3000}d"), ["a", "b", "c", "d"]);
        assert_eq!(words("Wait ... then"), ["Wait", "...", "then"]);
        assert_eq!(count_sentences("Wait ... then it went on."), 1);
    }

    #[test]
    fn gopher_quality_rules_fire_on_their_documents() {
        assert_eq!(gq(FRODO), Ok(()));
        assert_eq!(gq("I am too small..."), Err("gopher_short_doc".into()));
        assert_eq!(gq(&"I am ".repeat(20)), Err("gopher_below_avg_threshold".into()));
        assert_eq!(gq(&"interconnection ".repeat(20)), Err("gopher_above_avg_threshold".into()));
        assert_eq!(gq(&"# comment ".repeat(20)), Err("gopher_too_many_hashes".into()));
        assert_eq!(gq(&"... comment ".repeat(20)), Err("gopher_too_many_ellipsis".into()));
        let bullets = "- the item one of the list that goes on and on\n".repeat(10);
        assert_eq!(gq(&bullets), Err("gopher_too_many_bullets".into()));
        let numbers = "1234 5678 9012 3456 7890 1234 5678 9012 the and of 3456 7890 1234 5678";
        assert_eq!(gq(numbers), Err("gopher_below_alpha_threshold".into()));
        let no_stop = "Quick brown foxes jump over lazy dogs while cats sleep quietly nearby today";
        assert_eq!(gq(no_stop), Err("gopher_enough_stop_words".into()));
        assert_eq!(gopher_quality(&GopherQuality::default(), FRODO, &words(FRODO)), Ok(()), "51 words >= 50");
        let hashes_allowed = GopherQuality { max_symbol_word_ratio: 0.0, min_alpha_words_ratio: 0.0, ..small_gopher() };
        let csharp = format!("{FRODO} We write C# and F# code ... with it.");
        assert_eq!(gopher_quality(&hashes_allowed, &csharp, &words(&csharp)), Ok(()), "0 turns the rule off");
    }

    #[test]
    fn gopher_repetition_rules_fire_on_their_documents() {
        assert_eq!(rep(FRODO), Ok(()));
        assert_eq!(rep(&"I am your father.\n".repeat(4)), Err("dup_line_frac".into()));
        assert_eq!(rep(&"I am your father.\n\n".repeat(4)), Err("dup_para_frac".into()));
        assert_eq!(rep("I am Frank, I am Frank, I am Frank"), Err("top_2_gram".into()));
        let solo = format!("{}{FRODO}", "I am a solo traveller ".repeat(4));
        assert_eq!(rep(&solo), Err("duplicated_5_n_grams".into()));
        assert_eq!(rep(""), Err("dup_para_char_frac".into()));
        assert_eq!(split_runs("\na\n\n\nb\n", 2), ["\na", "b\n"]);
        assert_eq!(split_runs("\na\n", 1), ["", "a", ""]);
    }

    #[test]
    fn c4_cleans_lines_and_counts_sentences() {
        let text = "Intro line without punct\nThis line cites a source [1] and more [citation needed].\nClick here to enable javascript please.\nWe use cookies on this site, ok.\nTwo words.\nThe quick brown fox jumps. Over the lazy dog! Really?\nAnother full sentence is here.\nAnd a final one ends here...\n";
        let mut dropped = HashMap::new();
        let original = C4 { terminal_punctuation: true, ..C4::default() };
        let cleaned = c4(&original, text, &mut dropped).unwrap();
        assert_eq!(
            cleaned,
            "This line cites a source  and more .\nThe quick brown fox jumps. Over the lazy dog! Really?\nAnother full sentence is here."
        );
        assert_eq!(dropped["c4_no_terminal_punctuation"], 2);
        assert_eq!(dropped["c4_javascript"], 1);
        assert_eq!(dropped["c4_policy"], 1);
        assert_eq!(dropped["c4_too_few_words"], 1);
        assert_eq!(c4(&C4::default(), FRODO, &mut dropped), Err("too_few_sentences".into()));
        let braces =
            "One two three four five. Six seven eight nine ten. Call main() { body } here now.\nA b c. D e f. G h i.";
        assert_eq!(c4(&C4::default(), braces, &mut dropped), Err("curly_bracket".into()));
        let lorem = "Lorem ipsum dolor sit amet, consectetur. Adipiscing elit sed do. Eiusmod tempor incididunt.";
        assert_eq!(c4(&C4::default(), lorem, &mut dropped), Err("lorem_ipsum".into()));
        assert_eq!(remove_citations("a[12] b[] c[edit] d[x]"), "a b c d[x]");
    }

    /// FineWeb keeps C4's rules but not the terminal-punctuation one, and so do the defaults.
    #[test]
    fn the_default_c4_is_fineweb_s_without_the_terminal_punctuation_rule() {
        let text = "A heading without a full stop\nThe quick brown fox jumps. Over the lazy dog! Really?\nAnother full sentence is here.\nAnd a final one ends here...\n";
        let mut dropped = HashMap::new();
        let cleaned = c4(&C4::default(), text, &mut dropped).unwrap();
        assert_eq!(cleaned, text.trim_end());
        assert!(!dropped.contains_key("c4_no_terminal_punctuation"), "{dropped:?}");
    }

    #[test]
    fn fineweb_rules_fire_on_their_documents() {
        let good = "This is the first line of a document, and it is long enough.\nHere is the second line of the same document, also long enough.\nA third line follows with yet more ordinary prose in it today.\nThe fourth line keeps going so that ratios behave as expected.\nFinally the fifth line closes the paragraph with a full stop.";
        let fw = |t: &str| fineweb(&FineWeb::default(), t, &words(t));
        assert_eq!(fw(good), Ok(()));
        assert_eq!(fw(""), Err("empty".into()));
        assert_eq!(fw(" \n "), Err("empty".into()));
        assert_eq!(fw(FRODO), Err("line_punct_ratio".into()));
        assert_eq!(fw(&format!("{good}\n").repeat(3)), Err("char_dup_ratio".into()));
        let short = "Short one.\nAnother.\nYes.\nThis line, by contrast, is quite a bit longer than thirty.";
        assert_eq!(fw(short), Err("short_line_ratio".into()));
    }

    #[test]
    fn language_keeps_listed_languages() {
        let en = Language::default();
        assert_eq!(language(&en, FRODO), Ok(()));
        let de = "Die Würde des Menschen ist unantastbar. Sie zu achten und zu schützen ist Verpflichtung aller staatlichen Gewalt.";
        assert_eq!(language(&en, de), Err("language".into()));
        let both = Language { languages: vec!["en".into(), "de".into()], ..Language::default() };
        assert_eq!(language(&both, de), Ok(()));
    }

    #[test]
    fn apply_runs_the_chain_and_names_the_filter() {
        let filters = Filters { language: Language { enabled: false, ..Default::default() }, ..Default::default() };
        let mut dropped = HashMap::new();
        match apply(&filters, "I am your father.\n".repeat(60).as_str(), &mut dropped) {
            Verdict::Drop { filter, reason } => {
                assert_eq!((filter, reason.as_str()), ("gopher_repetition", "dup_line_frac"))
            }
            other => panic!("{other:?}"),
        }
        let off = Filters {
            gopher_quality: GopherQuality { enabled: false, ..Default::default() },
            gopher_repetition: GopherRepetition { enabled: false, ..Default::default() },
            c4: C4 { enabled: false, ..Default::default() },
            fineweb: FineWeb { enabled: false, ..Default::default() },
            language: Language { enabled: false, ..Default::default() },
        };
        assert_eq!(apply(&off, "def f(): pass", &mut dropped), Verdict::Keep("def f(): pass".into()));
    }
}
