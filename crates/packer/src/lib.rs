//! BOS-aligned best-fit sequence packer for nanochat_rs (pure Rust; the `_native` crate wraps it).
//!
//! Documents (token sequences that each start with BOS) are pushed as one flat token array plus
//! offsets. They wait in a FIFO *pending* queue and move into a *buffer* of at most `buffer_size`
//! documents, which is topped up before every placement. Rows of capacity `T_text + 1` are filled
//! left to right:
//!
//! * if some buffered document fits the remaining space, the **longest** one is placed whole
//!   (ties: the earliest arrived);
//! * otherwise, in *crop* mode (the default), the **shortest** buffered document (ties: the
//!   earliest arrived) fills the row and the rest of it is discarded, which minimises the tokens
//!   thrown away; in *pad* mode the rest of the row is padded (inputs BOS, targets -1) instead, and
//!   only a row that is still empty crops its shortest document (one longer than a whole row).
//!
//! Documents may carry a 0/1 loss mask; targets are -1 wherever the target token's mask is 0.
//!
//! A row becomes `inputs = row[..T_text]` and `targets = row[1..]`, written straight into
//! caller-owned `i64` buffers; with an audio prefix of `T_a` positions the targets row is
//! `T_a + T_text` long and starts with `T_a` copies of `-1` (ignore index).
//!
//! Packing a batch is transactional: when the stream runs dry before the batch is complete the
//! packer rolls back to exactly its state before the call, so the caller can push more and retry.
//! The whole state can be exported and re-imported ([`PackerState`]) to resume with identical rows.
//!
//! * [`buffer`]: the best-fit document store (ordered by length, then arrival).
//! * [`packer`]: the stream, the row filling, the journal that makes a batch transactional.
//! * [`state`]: export/import of the full packer state: its schema and its validation, in one place.
//! * [`codec`]: base64 of token arrays, for text-based (JSON) state files.

#![forbid(unsafe_code)]

pub mod buffer;
pub mod codec;
pub mod packer;
pub mod state;

use std::fmt;

pub use packer::{PackMode, Packer, PackerConfig, Stats};
pub use state::{DocTexts, PackerState, Value, STATE_FORMAT, STATE_VERSION};

/// Everything that can go wrong on user input. The bindings map these to Python `ValueError`s,
/// except [`PackError::StateType`] (`TypeError`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PackError {
    /// Constructor arguments that describe no valid packer.
    InvalidConfig(String),
    /// Offsets that do not describe a partition of the token array into documents.
    InvalidOffsets(String),
    /// Document `index` (within its push) has no tokens.
    EmptyDocument { index: usize },
    /// Document `index` (within its push) does not start with the configured BOS token.
    MissingBos { index: usize, found: u32, expected: u32 },
    /// Output buffers whose sizes do not match `(B, T_text)` and `(B, seq_len)`.
    BatchShape(String),
    /// `push` after `finish`.
    StreamFinished,
    /// A state that this packer cannot (or must not) load.
    InvalidState(String),
    /// A state value of the wrong type (the bindings raise `TypeError` for it, not `ValueError`).
    StateType(String),
    /// A loss mask that is not one 0/1 value per token.
    InvalidMask(String),
    /// A push that would make a counter or an arrival number pass `u64::MAX`.
    CounterOverflow(String),
}

impl fmt::Display for PackError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PackError::InvalidConfig(msg) => write!(f, "invalid packer configuration: {msg}"),
            PackError::InvalidOffsets(msg) => write!(f, "invalid document offsets: {msg}"),
            PackError::EmptyDocument { index } => {
                write!(f, "document {index} is empty (offsets must be strictly increasing)")
            }
            PackError::MissingBos { index, found, expected } => {
                write!(f, "document {index} starts with token {found}, expected BOS token {expected}")
            }
            PackError::BatchShape(msg) => write!(f, "output buffers have the wrong shape: {msg}"),
            PackError::StreamFinished => write!(f, "cannot push documents after finish()"),
            PackError::InvalidState(msg) => write!(f, "invalid packer state: {msg}"),
            PackError::StateType(msg) => f.write_str(msg),
            PackError::InvalidMask(msg) => write!(f, "invalid loss mask: {msg}"),
            PackError::CounterOverflow(msg) => write!(f, "cannot push: {msg}"),
        }
    }
}

impl std::error::Error for PackError {}
