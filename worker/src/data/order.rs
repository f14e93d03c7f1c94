//! In-context pretraining order (Shi et al. 2024): related documents packed into the same training
//! context, adjacent contexts kept diverse.
//!
//! Each document is a sparse TF-IDF vector over hashed words. Neighbours are found through an
//! inverted index of each document's most distinctive terms (terms in too many documents are not
//! indexed), scored by cosine. A greedy walk starts each context at the next unvisited document of a
//! seeded shuffle and keeps appending the nearest unvisited neighbour of the last document until the
//! context is full; the random starts keep neighbouring contexts unrelated.

use std::collections::HashMap;

use xxhash_rust::xxh3::xxh3_64_with_seed;

use pretrain_crd::seeded::shuffle;

/// Terms kept per document.
pub const TERMS_PER_DOCUMENT: usize = 32;

/// The most frequent content words of a text, hashed: (term, count), by count then term.
pub fn top_terms(text: &str) -> Vec<(u32, u16)> {
    let mut counts: HashMap<u32, u16> = HashMap::new();
    for word in text.split(|c: char| !c.is_alphanumeric()) {
        if word.chars().count() < 3 {
            continue; // short words are mostly function words
        }
        let lower = word.to_lowercase();
        let term = xxh3_64_with_seed(lower.as_bytes(), 11) as u32;
        let c = counts.entry(term).or_default();
        *c = c.saturating_add(1);
    }
    let mut terms: Vec<(u32, u16)> = counts.into_iter().collect();
    terms.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    terms.truncate(TERMS_PER_DOCUMENT);
    terms
}

/// One training copy of a document.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Item {
    /// Index into the per-document term lists.
    pub doc: usize,
    /// Bytes of text (a proxy for tokens).
    pub bytes: u32,
}

/// The order of `items` (a permutation of their indices) that packs related documents into contexts
/// of about `context_bytes`, never two copies of one document into one context.
pub fn in_context(items: &[Item], terms: &[Vec<(u32, u16)>], context_bytes: u64, seed: u64) -> Vec<usize> {
    let n_docs = terms.len();
    // Document frequency and TF-IDF weights.
    let mut df: HashMap<u32, u32> = HashMap::new();
    for doc in terms {
        for (t, _) in doc {
            *df.entry(*t).or_default() += 1;
        }
    }
    let idf = |t: u32| ((1.0 + n_docs as f64) / (1.0 + f64::from(df[&t]))).ln() + 1.0;
    let vectors: Vec<Vec<(u32, f64)>> = terms
        .iter()
        .map(|doc| {
            let mut v: Vec<(u32, f64)> = doc.iter().map(|(t, c)| (*t, (1.0 + f64::from(*c).ln()) * idf(*t))).collect();
            let norm = v.iter().map(|(_, w)| w * w).sum::<f64>().sqrt().max(1e-12);
            v.iter_mut().for_each(|(_, w)| *w /= norm);
            v.sort_by_key(|(t, _)| *t);
            v
        })
        .collect();
    let cosine = |a: &[(u32, f64)], b: &[(u32, f64)]| {
        let (mut i, mut j, mut dot) = (0, 0, 0.0);
        while i < a.len() && j < b.len() {
            match a[i].0.cmp(&b[j].0) {
                std::cmp::Ordering::Less => i += 1,
                std::cmp::Ordering::Greater => j += 1,
                std::cmp::Ordering::Equal => {
                    dot += a[i].1 * b[j].1;
                    i += 1;
                    j += 1;
                }
            }
        }
        dot
    };

    // Inverted index over items, skipping terms shared by too many documents to be distinctive.
    let max_df = (n_docs / 20).max(50) as u32;
    let mut index: HashMap<u32, Vec<usize>> = HashMap::new();
    for (i, item) in items.iter().enumerate() {
        for (t, _) in &terms[item.doc] {
            if df[t] <= max_df {
                index.entry(*t).or_default().push(i);
            }
        }
    }

    let mut starts: Vec<usize> = (0..items.len()).collect();
    shuffle(&mut starts, &mut (seed ^ 0x1c_9e7e));
    let mut visited = vec![false; items.len()];
    let mut order = Vec::with_capacity(items.len());
    for &start in &starts {
        if visited[start] {
            continue;
        }
        visited[start] = true;
        order.push(start);
        // The documents in this context: another copy of one of them may not join it.
        let mut members = vec![items[start].doc];
        let (mut filled, mut current) = (u64::from(items[start].bytes), start);
        while filled < context_bytes {
            let here = &vectors[items[current].doc];
            let mut best: Option<(f64, usize)> = None;
            for (t, _) in &terms[items[current].doc] {
                for &candidate in index.get(t).map(Vec::as_slice).unwrap_or_default() {
                    if visited[candidate] || members.contains(&items[candidate].doc) {
                        continue;
                    }
                    let score = cosine(here, &vectors[items[candidate].doc]);
                    if best.is_none_or(|(s, c)| score > s || (score == s && candidate < c)) {
                        best = Some((score, candidate));
                    }
                }
            }
            let Some((_, next)) = best else { break };
            visited[next] = true;
            members.push(items[next].doc);
            order.push(next);
            filled += u64::from(items[next].bytes);
            current = next;
        }
    }
    order
}

#[cfg(test)]
mod tests {
    use super::*;
    use pretrain_crd::seeded::splitmix;

    /// Ten topics with their own vocabularies, eight documents each, shuffled together.
    #[test]
    fn packs_documents_of_a_topic_into_the_same_context() {
        let mut texts = Vec::new();
        let mut topic_of = Vec::new();
        let mut state = 5u64;
        for doc in 0..80usize {
            let topic = doc % 10;
            let words: Vec<String> = (0..120)
                .map(|_| {
                    let r = splitmix(&mut state);
                    // Mostly topic words, some shared filler.
                    if r.is_multiple_of(4) {
                        format!("common{}", r % 40)
                    } else {
                        format!("topic{topic}word{}", r % 30)
                    }
                })
                .collect();
            texts.push(words.join(" "));
            topic_of.push(topic);
        }
        let terms: Vec<Vec<(u32, u16)>> = texts.iter().map(|t| top_terms(t)).collect();
        let items: Vec<Item> = texts.iter().enumerate().map(|(doc, t)| Item { doc, bytes: t.len() as u32 }).collect();
        let context = u64::from(items[0].bytes) * 4; // about four documents per context
        let order = in_context(&items, &terms, context, 1);
        let mut sorted = order.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, (0..80).collect::<Vec<_>>(), "a permutation");

        // Pack into contexts the way the loader does (contiguous bytes) and measure how often two
        // documents in the same context share a topic; a random order gives about 1 in 10.
        let same_topic = |order: &[usize]| {
            let (mut same, mut pairs, mut filled) = (0, 0, 0u64);
            for w in order.windows(2) {
                filled += u64::from(items[w[0]].bytes);
                if filled >= context {
                    filled = 0;
                    continue;
                }
                pairs += 1;
                same += usize::from(topic_of[w[0]] == topic_of[w[1]]);
            }
            same as f64 / pairs as f64
        };
        let mut shuffled: Vec<usize> = (0..80).collect();
        shuffle(&mut shuffled, &mut 9u64);
        let (packed, random) = (same_topic(&order), same_topic(&shuffled));
        assert!(packed > 0.75 && random < 0.3, "same-topic neighbours: in-context {packed:.2}, shuffled {random:.2}");
        assert_eq!(order, in_context(&items, &terms, context, 1), "deterministic");
    }
}
