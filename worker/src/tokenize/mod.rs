//! The tokenize stage: train a byte-level BPE tokenizer on a sample of the clean shards, report its
//! compression, and encode every shard into token shards for training.

pub mod stage;
pub mod train;
