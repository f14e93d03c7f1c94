//! The byte-level BPE tokenizer at run time: encoding and decoding with a trained `tokenizer.json`
//! (Hugging Face's format), used by tokenize to encode shards and by eval and the probes to score text.

pub mod bytelevel;
pub mod encoder;

pub use encoder::{Encoder, EncoderError};
