//! Byte-level BPE for nanochat_rs: a pre-tokeniser, a trainer and a tiktoken-compatible encoder.
//!
//! Pure Rust with no Python dependency, so it is testable with `cargo test`; the `_native` PyO3
//! crate wraps it.
//!
//! * [`pretokenize`] splits text into chunks with the (configurable) split pattern.
//! * [`train`] counts chunks in parallel and learns merges; ties go to the smaller pair, so the
//!   result is fully determined by the documents, the pattern and the number of merges.
//! * [`encode`] turns text into token ids, bit-identical to `tiktoken` on the same ranks.

#![forbid(unsafe_code)]

pub mod encode;
pub mod pretokenize;
pub mod train;

use std::fmt;

pub use encode::Encoder;
pub use pretokenize::{Splitter, DEFAULT_PATTERN};
pub use train::{ChunkCounter, Pair};

/// Everything that can go wrong on user input. The bindings map these to Python exceptions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenizerError {
    /// The split pattern does not compile.
    InvalidPattern(String),
    /// The regex engine gave up while matching (e.g. backtrack limit) on a custom pattern.
    Regex(String),
    /// A token id that is not in the vocabulary.
    UnknownTokenId(u32),
    /// Mergeable ranks that do not describe a byte-level vocabulary.
    InvalidRanks(String),
}

impl fmt::Display for TokenizerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TokenizerError::InvalidPattern(msg) => write!(f, "invalid split pattern: {msg}"),
            TokenizerError::Regex(msg) => write!(f, "split pattern failed while matching: {msg}"),
            TokenizerError::UnknownTokenId(id) => write!(f, "token id {id} is not in the vocabulary"),
            TokenizerError::InvalidRanks(msg) => write!(f, "invalid mergeable ranks: {msg}"),
        }
    }
}

impl std::error::Error for TokenizerError {}
