//! Encoding text with a `tokenizer.json`.
//!
//! Byte-level BPE tokenizers (the kind this stage trains, and GPT-2/RoBERTa style ones) run on a fast
//! path that gives exactly the ids of the `tokenizers` library: the same split, the same merges by
//! rank, leftmost first. Words are cached per thread and documents encoded in parallel. Any other
//! tokenizer runs through the `tokenizers` library itself.
//!
//! Text is encoded as plain text: a literal `<|eos|>` inside a document stays bytes, special tokens
//! only enter the stream where the stage puts them (the document separator).

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::sync::Mutex;

use rayon::prelude::*;
use rustc_hash::FxHashMap;
use serde_json::Value;

use super::bytelevel;

/// Why a tokenizer cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum EncoderError {
    /// The `tokenizers` library rejected the file.
    #[error("tokenizer.json does not load: {0}")]
    Load(String),
    /// Encoding or decoding failed in the library.
    #[error("tokenizer: {0}")]
    Library(String),
    /// Ids out of the vocabulary, or bytes that are not UTF-8, on decode.
    #[error("cannot decode: {0}")]
    Decode(String),
}

/// Words cached per worker thread before the cache is cleared.
const CACHE_WORDS: usize = 1 << 20;
/// Words with more symbols than this merge with a heap instead of rescanning.
const SMALL_WORD: usize = 48;

/// A tokenizer ready to encode: the fast byte-level BPE path or the library.
#[derive(Debug)]
pub struct Encoder {
    kind: Kind,
    vocab_size: u32,
    /// Special (added) tokens by content.
    specials: Vec<(String, u32)>,
    caches: Vec<Mutex<WordCache>>,
}

#[derive(Debug)]
enum Kind {
    Fast(Box<ByteBpe>),
    Library(Box<tokenizers::Tokenizer>),
}

/// Cached encodings of words.
#[derive(Debug, Default)]
pub struct WordCache {
    words: FxHashMap<Box<str>, Box<[u32]>>,
}

impl Encoder {
    /// Loads a `tokenizer.json`.
    pub fn from_json(json: &str) -> Result<Self, EncoderError> {
        let library: tokenizers::Tokenizer = json.parse().map_err(|e| EncoderError::Load(format!("{e}")))?;
        let vocab_size = library.get_vocab_size(true) as u32;
        let value: Value = serde_json::from_str(json).map_err(|e| EncoderError::Load(e.to_string()))?;
        let mut specials: Vec<(String, u32)> = value["added_tokens"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|t| t["special"].as_bool() == Some(true))
            .filter_map(|t| Some((t["content"].as_str()?.to_string(), u32::try_from(t["id"].as_u64()?).ok()?)))
            .collect();
        specials.sort_by_key(|(_, id)| *id);
        let kind = match ByteBpe::from_json(&value) {
            Some(fast) => Kind::Fast(Box::new(fast)),
            None => Kind::Library(Box::new(library)),
        };
        let threads = rayon::current_num_threads().max(1);
        let caches = (0..threads).map(|_| Mutex::new(WordCache::default())).collect();
        Ok(Self { kind, vocab_size, specials, caches })
    }

    /// Whether the fast byte-level path is used (otherwise the `tokenizers` library).
    pub fn is_fast(&self) -> bool {
        matches!(self.kind, Kind::Fast(_))
    }

    /// Vocabulary size including special tokens; ids are below it.
    pub fn vocab_size(&self) -> u32 {
        self.vocab_size
    }

    /// The id of a special token.
    pub fn special(&self, content: &str) -> Option<u32> {
        self.specials.iter().find(|(c, _)| c == content).map(|(_, id)| *id)
    }

    /// Encodes one text, appending its ids to `out`.
    pub fn encode_into(&self, text: &str, cache: &mut WordCache, out: &mut Vec<u32>) -> Result<(), EncoderError> {
        match &self.kind {
            Kind::Fast(bpe) => {
                bpe.encode(text, cache, out);
                Ok(())
            }
            Kind::Library(tokenizer) => {
                let encoding = tokenizer.encode_fast(text, false).map_err(|e| EncoderError::Library(e.to_string()))?;
                out.extend_from_slice(encoding.get_ids());
                Ok(())
            }
        }
    }

    /// Encodes one text.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, EncoderError> {
        let mut out = Vec::with_capacity(text.len() / 3);
        let mut cache = self.caches[0].lock().unwrap_or_else(|p| p.into_inner());
        self.encode_into(text, &mut cache, &mut out)?;
        Ok(out)
    }

    /// Encodes texts in parallel on the rayon pool; results are in input order.
    pub fn encode_batch<S: AsRef<str> + Sync>(&self, texts: &[S]) -> Result<Vec<Vec<u32>>, EncoderError> {
        let parts = self.caches.len();
        let chunk = texts.len().div_ceil(parts).max(1);
        let encoded: Vec<Result<Vec<Vec<u32>>, EncoderError>> = texts
            .par_chunks(chunk)
            .enumerate()
            .map(|(i, texts)| {
                let mut cache = self.caches[i % parts].lock().unwrap_or_else(|p| p.into_inner());
                texts
                    .iter()
                    .map(|t| {
                        let mut out = Vec::with_capacity(t.as_ref().len() / 3);
                        self.encode_into(t.as_ref(), &mut cache, &mut out).map(|()| out)
                    })
                    .collect()
            })
            .collect();
        let mut all = Vec::with_capacity(texts.len());
        for part in encoded {
            all.extend(part?);
        }
        Ok(all)
    }

    /// Decodes ids back to text (special tokens as their content).
    pub fn decode(&self, ids: &[u32]) -> Result<String, EncoderError> {
        match &self.kind {
            Kind::Fast(bpe) => String::from_utf8(bpe.bytes(ids)?).map_err(|e| EncoderError::Decode(e.to_string())),
            Kind::Library(tokenizer) => tokenizer.decode(ids, false).map_err(|e| EncoderError::Library(e.to_string())),
        }
    }

    /// Decodes generated ids, which may end inside a character or hold bytes that are not UTF-8:
    /// those become U+FFFD. Ids outside the vocabulary are an error.
    pub fn decode_lossy(&self, ids: &[u32]) -> Result<String, EncoderError> {
        match &self.kind {
            Kind::Fast(bpe) => Ok(String::from_utf8_lossy(&bpe.bytes(ids)?).into_owned()),
            // The library's decoder is lossy already.
            Kind::Library(tokenizer) => tokenizer.decode(ids, false).map_err(|e| EncoderError::Library(e.to_string())),
        }
    }
}

/// Byte-level BPE with the merge table of a `tokenizer.json`.
#[derive(Debug)]
struct ByteBpe {
    /// Id of each single byte.
    byte_ids: [u32; 256],
    /// `(left << 32 | right)` -> (rank, merged id).
    merges: FxHashMap<u64, (u32, u32)>,
    /// Bytes of every id (special tokens: their content).
    id_bytes: Vec<Box<[u8]>>,
    /// `ignore_merges`: a word that is itself in the vocabulary is one token.
    whole_words: Option<FxHashMap<Box<[u8]>, u32>>,
    add_prefix_space: bool,
}

impl ByteBpe {
    /// The bytes of `ids`, back to back.
    fn bytes(&self, ids: &[u32]) -> Result<Vec<u8>, EncoderError> {
        let mut bytes = Vec::with_capacity(ids.len() * 4);
        for &id in ids {
            let token = self.id_bytes.get(id as usize).ok_or_else(|| {
                EncoderError::Decode(format!("id {id} is outside the vocabulary of {}", self.id_bytes.len()))
            })?;
            bytes.extend_from_slice(token);
        }
        Ok(bytes)
    }

    /// The fast path, when the tokenizer is plain byte-level BPE; `None` for anything else.
    fn from_json(json: &Value) -> Option<Self> {
        let model = &json["model"];
        let empty = |v: &Value| v.is_null() || v.as_str() == Some("");
        if model["type"] != "BPE"
            || !model["dropout"].is_null()
            || model["byte_fallback"].as_bool() == Some(true)
            || !empty(&model["continuing_subword_prefix"])
            || !empty(&model["end_of_word_suffix"])
            || !json["normalizer"].is_null()
        {
            return None;
        }
        let add_prefix_space = byte_level_pre_tokenizer(&json["pre_tokenizer"])?;

        let vocab = model["vocab"].as_object()?;
        let mut id_bytes: Vec<Option<Box<[u8]>>> = Vec::new();
        let mut by_bytes: FxHashMap<Box<[u8]>, u32> = FxHashMap::default();
        for (token, id) in vocab {
            let id = usize::try_from(id.as_u64()?).ok()?;
            let bytes: Box<[u8]> = bytelevel::token_bytes(token)?.into();
            if id_bytes.len() <= id {
                id_bytes.resize(id + 1, None);
            }
            by_bytes.insert(bytes.clone(), id as u32);
            id_bytes[id] = Some(bytes);
        }
        for added in json["added_tokens"].as_array().into_iter().flatten() {
            let id = usize::try_from(added["id"].as_u64()?).ok()?;
            if id_bytes.len() <= id {
                id_bytes.resize(id + 1, None);
            }
            if id_bytes[id].is_none() {
                id_bytes[id] = Some(added["content"].as_str()?.as_bytes().into());
            }
        }
        let table = bytelevel::byte_to_char();
        let mut byte_ids = [0u32; 256];
        for (b, slot) in byte_ids.iter_mut().enumerate() {
            *slot = u32::try_from(vocab.get(&table[b].to_string())?.as_u64()?).ok()?;
        }
        let mut merges = FxHashMap::default();
        for (rank, merge) in model["merges"].as_array()?.iter().enumerate() {
            let (left, right) = match merge {
                Value::String(s) => s.split_once(' ')?,
                Value::Array(pair) if pair.len() == 2 => (pair[0].as_str()?, pair[1].as_str()?),
                _ => return None,
            };
            let id = |t: &str| vocab.get(t).and_then(Value::as_u64).and_then(|id| u32::try_from(id).ok());
            let merged = id(&format!("{left}{right}"))?;
            merges.entry(pair_key(id(left)?, id(right)?)).or_insert((rank as u32, merged));
        }
        let whole_words = (model["ignore_merges"].as_bool() == Some(true)).then_some(by_bytes);
        let id_bytes = id_bytes.into_iter().map(Option::unwrap_or_default).collect();
        Some(Self { byte_ids, merges, id_bytes, whole_words, add_prefix_space })
    }

    fn encode(&self, text: &str, cache: &mut WordCache, out: &mut Vec<u32>) {
        let prefixed;
        let text = if self.add_prefix_space && !text.starts_with(' ') {
            prefixed = format!(" {text}");
            &prefixed
        } else {
            text
        };
        bytelevel::split(text, |word| {
            if let Some(ids) = cache.words.get(word) {
                out.extend_from_slice(ids);
                return;
            }
            let start = out.len();
            self.encode_word(word.as_bytes(), out);
            if cache.words.len() >= CACHE_WORDS {
                cache.words.clear();
            }
            cache.words.insert(word.into(), out[start..].into());
        });
    }

    fn encode_word(&self, word: &[u8], out: &mut Vec<u32>) {
        if let Some(whole) = &self.whole_words
            && let Some(&id) = whole.get(word)
        {
            out.push(id);
            return;
        }
        let mut ids: Vec<u32> = word.iter().map(|&b| self.byte_ids[b as usize]).collect();
        if ids.len() <= SMALL_WORD {
            self.merge_small(&mut ids);
        } else {
            self.merge_large(&mut ids);
        }
        out.extend_from_slice(&ids);
    }

    fn rank(&self, left: u32, right: u32) -> Option<(u32, u32)> {
        self.merges.get(&pair_key(left, right)).copied()
    }

    /// Applies the lowest-ranked merge, leftmost first, until none applies.
    fn merge_small(&self, ids: &mut Vec<u32>) {
        while ids.len() > 1 {
            let mut best: Option<(u32, usize, u32)> = None;
            for i in 0..ids.len() - 1 {
                if let Some((rank, merged)) = self.rank(ids[i], ids[i + 1])
                    && best.is_none_or(|(r, _, _)| rank < r)
                {
                    best = Some((rank, i, merged));
                }
            }
            let Some((_, i, merged)) = best else { break };
            ids[i] = merged;
            ids.remove(i + 1);
        }
    }

    /// The same merge order with a heap of candidate pairs over a linked list of symbols.
    fn merge_large(&self, ids: &mut Vec<u32>) {
        const NONE: usize = usize::MAX;
        let n = ids.len();
        let mut next: Vec<usize> = (1..=n).map(|i| if i == n { NONE } else { i }).collect();
        let mut prev: Vec<usize> = (0..n).map(|i| if i == 0 { NONE } else { i - 1 }).collect();
        let mut alive = vec![true; n];
        let mut heap = BinaryHeap::new();
        for i in 0..n - 1 {
            if let Some((rank, merged)) = self.rank(ids[i], ids[i + 1]) {
                heap.push(Reverse((rank, i, merged)));
            }
        }
        while let Some(Reverse((rank, i, merged))) = heap.pop() {
            let j = next[i];
            if !alive[i] || j == NONE || self.rank(ids[i], ids[j]) != Some((rank, merged)) {
                continue;
            }
            ids[i] = merged;
            alive[j] = false;
            next[i] = next[j];
            if next[i] != NONE {
                prev[next[i]] = i;
            }
            if prev[i] != NONE
                && let Some((r, m)) = self.rank(ids[prev[i]], ids[i])
            {
                heap.push(Reverse((r, prev[i], m)));
            }
            if next[i] != NONE
                && let Some((r, m)) = self.rank(ids[i], ids[next[i]])
            {
                heap.push(Reverse((r, i, m)));
            }
        }
        let mut k = 0;
        for i in 0..n {
            if alive[i] {
                ids[k] = ids[i];
                k += 1;
            }
        }
        ids.truncate(k);
    }
}

fn pair_key(left: u32, right: u32) -> u64 {
    (u64::from(left) << 32) | u64::from(right)
}

/// `Some(add_prefix_space)` when the pre-tokenizer is the byte-level split with its regex.
fn byte_level_pre_tokenizer(pre: &Value) -> Option<bool> {
    match pre["type"].as_str()? {
        "ByteLevel" if pre["use_regex"].as_bool() != Some(false) => {
            Some(pre["add_prefix_space"].as_bool() == Some(true))
        }
        "Sequence" => match pre["pretokenizers"].as_array()?.as_slice() {
            [only] => byte_level_pre_tokenizer(only),
            _ => None,
        },
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A hand-made byte-level tokenizer: every byte, then merges `a b`, `ab c`, `Ġ a`.
    fn tiny() -> String {
        let table = bytelevel::byte_to_char();
        let mut vocab = serde_json::Map::new();
        vocab.insert("<|eos|>".into(), 0.into());
        for (b, c) in table.iter().enumerate() {
            vocab.insert(c.to_string(), (b + 1).into());
        }
        for (i, t) in ["ab", "abc", "Ġa", "aa"].iter().enumerate() {
            vocab.insert((*t).into(), (257 + i).into());
        }
        serde_json::json!({
            "version": "1.0",
            "added_tokens": [{"id": 0, "content": "<|eos|>", "single_word": false, "lstrip": false,
                "rstrip": false, "normalized": false, "special": true}],
            "normalizer": null,
            "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
            "post_processor": null,
            "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
            "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                "vocab": vocab, "merges": ["a b", "ab c", "Ġ a", "a a"]}
        })
        .to_string()
    }

    #[test]
    fn fast_path_matches_the_library() {
        let json = tiny();
        let fast = Encoder::from_json(&json).unwrap();
        assert!(fast.is_fast());
        let library: tokenizers::Tokenizer = json.parse().unwrap();
        for text in ["abc abcab aaaa", " a  ab\n\n c", "ünïcödé 日本語 abc", "", "aaaaaaa", &"ab".repeat(40)] {
            let expected = library.encode(text, false).unwrap().get_ids().to_vec();
            assert_eq!(fast.encode(text).unwrap(), expected, "{text:?}");
            assert_eq!(fast.decode(&expected).unwrap(), text);
        }
        assert_eq!(fast.special("<|eos|>"), Some(0));
        assert_eq!(fast.vocab_size(), 261);
    }

    #[test]
    fn long_words_merge_like_short_ones() {
        let json = tiny();
        let Kind::Fast(bpe) = Encoder::from_json(&json).unwrap().kind else { panic!("fast") };
        let mut state = 7u64;
        for _ in 0..200 {
            let len = 1 + (state % 120) as usize;
            let word: Vec<u32> = (0..len)
                .map(|_| {
                    state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                    bpe.byte_ids[[b'a', b'b', b'c', b' '][(state >> 60) as usize % 4] as usize]
                })
                .collect();
            let (mut small, mut large) = (word.clone(), word.clone());
            bpe.merge_small(&mut small);
            bpe.merge_large(&mut large);
            assert_eq!(small, large);
        }
    }

    #[test]
    fn other_tokenizers_run_through_the_library() {
        let json = tiny().replace("\"normalizer\":null", "\"normalizer\":{\"type\":\"Lowercase\"}");
        let encoder = Encoder::from_json(&json).unwrap();
        assert!(!encoder.is_fast());
        assert_eq!(encoder.encode("ABC").unwrap(), encoder.encode("abc").unwrap());
        assert!(matches!(Encoder::from_json("{}"), Err(EncoderError::Load(_))));
    }
}
