//! Byte-level BPE for nanochat_rs: a pre-tokeniser, a trainer and a tiktoken-compatible encoder.
//!
//! Pure Rust with no Python dependency, so it is testable with `cargo test`; the `_native` PyO3
//! crate wraps it.
//!
//! * [`pretokenize`] splits text into chunks with the (configurable) split pattern.
//! * [`train`] counts chunks in parallel and learns merges; ties go to the smaller pair, so the
//!   result is fully determined by the documents, the pattern and the number of merges.
//! * [`encode`] turns text into token ids, bit-identical to `tiktoken` on the same ranks.
//! * [`arrow`] reads Arrow string arrays in place; [`threads`] runs parallel work on a bounded
//!   number of threads.

#![forbid(unsafe_code)]

pub mod arrow;
pub mod encode;
pub mod pretokenize;
pub mod threads;
pub mod train;

use std::fmt;

pub use encode::Encoder;
pub use pretokenize::{Splitter, DEFAULT_PATTERN};
pub use train::{ChunkCounter, Pair, TextRead};

/// Everything that can go wrong. The bindings map these to Python exceptions (`ValueError`, except
/// [`TokenizerError::ThreadPool`]).
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
    /// Merges that refer to token ids not defined before them.
    InvalidMerges(String),
    /// Arrow buffers whose offsets or text are not a valid string array.
    InvalidArrow(String),
    /// A thread count out of range.
    InvalidThreads(String),
    /// The operating system would not start the threads (not the caller's input).
    ThreadPool(String),
}

impl fmt::Display for TokenizerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TokenizerError::InvalidPattern(msg) => write!(f, "invalid split pattern: {msg}"),
            TokenizerError::Regex(msg) => write!(f, "split pattern failed while matching: {msg}"),
            TokenizerError::UnknownTokenId(id) => write!(f, "token id {id} is not in the vocabulary"),
            TokenizerError::InvalidRanks(msg) => write!(f, "invalid mergeable ranks: {msg}"),
            TokenizerError::InvalidMerges(msg)
            | TokenizerError::InvalidArrow(msg)
            | TokenizerError::InvalidThreads(msg)
            | TokenizerError::ThreadPool(msg) => f.write_str(msg),
        }
    }
}

impl std::error::Error for TokenizerError {}
