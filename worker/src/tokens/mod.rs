//! tokenize's outputs as every later stage reads them: token shards (written by tokenize), read as
//! one stream by train, long-context and eval, and the committed stage they belong to.

pub mod shard;
pub mod stream;
mod tokenized;

pub use shard::{ShardError, ShardWriter, TokenShard};
pub use stream::{TokenStream, UpsampleReport};
pub use tokenized::Tokenized;
