//! The tokenize stage: train a byte-level BPE tokenizer on a sample of the clean shards, report its
//! compression, and encode every shard into token shards for training.

pub mod bytelevel;
pub mod encoder;
pub mod shard;
pub mod stage;
mod tokenized;
pub mod train;

pub use encoder::{Encoder, EncoderError};
pub use shard::{ShardError, ShardWriter, TokenShard};
pub use tokenized::Tokenized;
