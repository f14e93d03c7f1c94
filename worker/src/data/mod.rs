//! The data-prep stage: raw crawls and dumps in, clean documents out.
//!
//! `reader` turns WARC/JSONL/text files into documents (`warc` frames WARC records, `extract` turns
//! HTML into main-content text).

pub mod dedup;
pub mod extract;
pub mod filters;
pub mod reader;
pub mod warc;
