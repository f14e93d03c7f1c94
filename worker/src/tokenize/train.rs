//! Training a byte-level BPE tokenizer with the `tokenizers` library.

use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::{BPE, BpeTrainerBuilder};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{AddedToken, Tokenizer, Trainer};

use crate::tokenizer::bytelevel;

/// Why training failed.
#[derive(Debug, thiserror::Error)]
pub enum BpeError {
    /// Too little text for the vocabulary asked for.
    #[error(
        "the tokenizer sample has {bytes} bytes in {documents} documents; a vocabulary of {vocab_size} needs at least \
         {needed} bytes (tokenizer.vocabSize is too large for this corpus, or data-prep kept too little)"
    )]
    TooSmall {
        /// Sample bytes.
        bytes: u64,
        /// Sample documents.
        documents: usize,
        /// Requested vocabulary.
        vocab_size: u32,
        /// The minimum accepted.
        needed: u64,
    },
    /// Training ran out of merges before the vocabulary size.
    #[error(
        "the corpus only supports a vocabulary of {reached} tokens, not tokenizer.vocabSize {vocab_size}: \
         lower vocabSize or raise tokenizer.trainSampleBytes / the corpus size"
    )]
    Unreachable {
        /// Vocabulary reached.
        reached: u32,
        /// Requested vocabulary.
        vocab_size: u32,
    },
    /// The library failed.
    #[error("tokenizer training: {0}")]
    Library(String),
}

/// Bytes of sample text required per vocabulary entry, a floor well below what a useful tokenizer
/// wants but enough to reject an empty or accidental corpus before training.
pub const MIN_SAMPLE_BYTES_PER_TOKEN: u64 = 8;

/// What training produced.
#[derive(Debug)]
pub struct Trained {
    /// The serialised `tokenizer.json`.
    pub json: String,
    /// Vocabulary size reached (special tokens included).
    pub vocab_size: u32,
}

/// Trains a byte-level BPE of `vocab_size` tokens on `texts`, with `specials` as ids 0, 1, ...
pub fn train_bpe(texts: &[String], vocab_size: u32, specials: &[String]) -> Result<Trained, BpeError> {
    let bytes: u64 = texts.iter().map(|t| t.len() as u64).sum();
    let needed = u64::from(vocab_size) * MIN_SAMPLE_BYTES_PER_TOKEN;
    if bytes < needed {
        return Err(BpeError::TooSmall { bytes, documents: texts.len(), vocab_size, needed });
    }
    let library = |e: tokenizers::Error| BpeError::Library(e.to_string());
    let mut trainer = BpeTrainerBuilder::new()
        .show_progress(false)
        .vocab_size(vocab_size as usize)
        .min_frequency(2)
        .special_tokens(specials.iter().map(|s| AddedToken::from(s.clone(), true)).collect())
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
        .build();
    // Count words with this crate's split (identical to the library's `ByteLevel` pre-tokenizer,
    // which the saved tokenizer uses, and several times faster), written in the byte-level alphabet.
    let table = bytelevel::byte_to_char();
    trainer
        .feed(texts.iter(), |text| {
            let mut words = Vec::new();
            bytelevel::split(text, |w| words.push(w.bytes().map(|b| table[b as usize]).collect()));
            Ok(words)
        })
        .map_err(library)?;
    let mut model = BPE::default();
    let added = trainer.train(&mut model).map_err(library)?;
    let mut tokenizer = Tokenizer::new(model);
    tokenizer
        .with_pre_tokenizer(Some(ByteLevel::new(false, true, true)))
        .with_decoder(Some(ByteLevelDecoder::new(false, true, true)));
    tokenizer.add_special_tokens(added).map_err(library)?;
    let reached = tokenizer.get_vocab_size(true) as u32;
    if reached < vocab_size {
        return Err(BpeError::Unreachable { reached, vocab_size });
    }
    let json = tokenizer.to_string(false).map_err(library)?;
    Ok(Trained { json, vocab_size: reached })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tokenizer::Encoder;

    fn sample() -> Vec<String> {
        (0..400).map(|i| format!("document {i}: the quick brown fox jumps over the lazy dog {}\n", i * 7)).collect()
    }

    #[test]
    fn trains_deterministically_with_specials_first() {
        let specials: Vec<String> = ["<|bos|>", "<|eos|>", "<|pad|>", "<|user|>"].map(String::from).to_vec();
        let a = train_bpe(&sample(), 300, &specials).unwrap();
        let b = train_bpe(&sample(), 300, &specials).unwrap();
        assert_eq!(a.json, b.json);
        assert_eq!(a.vocab_size, 300);
        let encoder = Encoder::from_json(&a.json).unwrap();
        assert!(encoder.is_fast());
        for (i, s) in specials.iter().enumerate() {
            assert_eq!(encoder.special(s), Some(i as u32));
        }
        let text = "the lazy dog jumps";
        assert!(encoder.encode(text).unwrap().len() < text.len() / 2);
    }

    #[test]
    fn refuses_tiny_corpora_and_unreachable_vocabularies() {
        let specials = vec!["<|eos|>".to_string()];
        let err = train_bpe(&["tiny".into()], 1000, &specials).unwrap_err();
        assert!(matches!(err, BpeError::TooSmall { bytes: 4, .. }), "{err}");
        let repetitive = vec!["ab ".repeat(5000)];
        let err = train_bpe(&repetitive, 1000, &specials).unwrap_err();
        assert!(matches!(err, BpeError::Unreachable { vocab_size: 1000, .. }), "{err}");
        assert!(err.to_string().contains("tokenizer.vocabSize"));
    }
}
