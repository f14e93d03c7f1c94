//! The data-prep stage's building blocks: raw crawls and dumps in, clean documents out.
//!
//! - `reader`: WARC/JSONL/text files (local paths and globs) to documents; `warc` frames WARC records
//!   and survives damaged gzip members; `extract` turns HTML into main-content text.
//! - `filters`: Gopher quality and repetition, C4, FineWeb and language rules, with DataTrove's
//!   thresholds and drop reasons.
//! - `quality`: the trainable hashed n-gram logistic-regression scorer and the linear head trained
//!   over BERT embeddings; `bert`: BERT-family encoders and sequence classifiers (Hugging Face
//!   layout) run with candle; `scoring`: the scorer a map task applies, loaded or trained.
//! - `dedup`: exact keys, MinHash signatures, LSH buckets verified by signature Jaccard, clusters of
//!   duplicate pairs; `buckets`: the dedup tasks, each verifying its share of the buckets; `cluster`:
//!   the one task that unions the pairs and decides the mix.
//! - `order`: in-context order's embedding, neighbour graph, walk and partitions; `incontext`: the
//!   tasks that plan it at scale (feature counts and sample in the map, embed and order tasks).
//! - `plan`: every decision about one document (quality, held out, copies, stream position), pure;
//!   `route`: the route and write tasks that move each document to its output shard; `reduce`: the
//!   commit.
//! - `runs`: sorted runs on disk (external sort, k-way merge, slice index) that hold the exact-hash
//!   and LSH indexes; `sections`: files of per-reader sections (route and embed tasks).

pub mod bert;
mod buckets;
pub mod charset;
mod cluster;
pub mod dedup;
pub mod extract;
pub mod filters;
mod incontext;
pub mod keys;
pub mod order;
pub mod plan;
pub mod quality;
pub mod reader;
mod reduce;
mod route;
pub mod runs;
mod scoring;
mod sections;
pub mod stage;
pub mod warc;
