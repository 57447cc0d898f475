//! The best-fit document store.
//!
//! Documents are keyed by `(length, reversed arrival sequence number)`, so a `BTreeMap` answers
//! both questions the packer asks in `O(log n)`: "longest document no longer than `r`, earliest
//! among equals" and "shortest document, earliest among equals".

use std::cmp::Reverse;
use std::collections::BTreeMap;

/// One document: its tokens, its loss mask and its position in the arrival order of the stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Doc {
    pub seq: u64,
    pub tokens: Box<[u32]>,
    /// 0/1 per token (1: the token is a training target); `None` supervises every token and costs
    /// no memory, which is the pretraining case.
    pub mask: Option<Box<[u8]>>,
}

impl Doc {
    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }
}

/// A held document as `(arrival number, tokens, mask)`.
pub type DocRef<'a> = (u64, &'a [u32], Option<&'a [u8]>);

/// What the buffer keeps per document under its key: tokens and mask.
type Stored = (Box<[u32]>, Option<Box<[u8]>>);

/// Buffered documents ordered by length, then by arrival, latest first: among equal lengths the
/// earliest arrived comes last, so the best fit for a space is the last key up to it, found
/// by one descent of the tree (the placement every row makes).
#[derive(Debug, Default, Clone)]
pub struct DocBuffer {
    docs: BTreeMap<(usize, Reverse<u64>), Stored>,
    tokens: usize,
}

impl DocBuffer {
    pub fn new() -> Self {
        Self::default()
    }

    /// Number of documents held.
    pub fn len(&self) -> usize {
        self.docs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.docs.is_empty()
    }

    /// Total tokens over all held documents.
    pub fn num_tokens(&self) -> usize {
        self.tokens
    }

    pub fn insert(&mut self, doc: Doc) {
        self.tokens += doc.len();
        self.docs.insert((doc.len(), Reverse(doc.seq)), (doc.tokens, doc.mask));
    }

    /// Remove the document with this length and sequence number, if held.
    pub fn remove(&mut self, len: usize, seq: u64) -> Option<Doc> {
        let (tokens, mask) = self.docs.remove(&(len, Reverse(seq)))?;
        self.tokens -= tokens.len();
        Some(Doc { seq, tokens, mask })
    }

    /// Remove and return the longest document with `len <= max_len` (earliest arrived among equals).
    pub fn take_longest_fitting(&mut self, max_len: usize) -> Option<Doc> {
        // `Reverse(0)` is the greatest key of a length: the last key up to it is the earliest
        // arrived of the longest length that fits.
        let (&(len, Reverse(seq)), _) = self.docs.range(..=(max_len, Reverse(0))).next_back()?;
        self.remove(len, seq)
    }

    /// Remove and return the shortest document (earliest arrived among equals).
    pub fn take_shortest(&mut self) -> Option<Doc> {
        // The first key has the shortest length but the latest arrival of it.
        let (&(len, _), _) = self.docs.first_key_value()?;
        self.take_longest_fitting(len)
    }

    /// All documents in arrival order, with their masks.
    pub fn by_arrival(&self) -> Vec<DocRef<'_>> {
        let mut docs: Vec<DocRef<'_>> =
            self.docs.iter().map(|(&(_, Reverse(seq)), (t, m))| (seq, &t[..], m.as_deref())).collect();
        docs.sort_unstable_by_key(|&(seq, _, _)| seq);
        docs
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn doc(seq: u64, len: usize) -> Doc {
        Doc { seq, tokens: vec![seq as u32; len].into_boxed_slice(), mask: None }
    }

    fn filled(lens: &[usize]) -> DocBuffer {
        let mut b = DocBuffer::new();
        for (seq, &len) in lens.iter().enumerate() {
            b.insert(doc(seq as u64, len));
        }
        b
    }

    #[test]
    fn longest_fitting_prefers_length_then_earliest_arrival() {
        let mut b = filled(&[3, 7, 5, 7, 9]);
        assert_eq!(b.take_longest_fitting(8).map(|d| d.seq), Some(1));
        assert_eq!(b.take_longest_fitting(8).map(|d| d.seq), Some(3));
        assert_eq!(b.take_longest_fitting(8).map(|d| d.seq), Some(2));
        assert_eq!(b.take_longest_fitting(2).map(|d| d.seq), None);
        assert_eq!(b.take_longest_fitting(9).map(|d| d.seq), Some(4));
        assert_eq!(b.len(), 1);
        assert_eq!(b.num_tokens(), 3);
    }

    #[test]
    fn shortest_prefers_earliest_arrival() {
        let mut b = filled(&[4, 2, 2, 9]);
        assert_eq!(b.take_shortest().map(|d| d.seq), Some(1));
        assert_eq!(b.take_shortest().map(|d| d.seq), Some(2));
        assert_eq!(b.take_shortest().map(|d| d.seq), Some(0));
        assert_eq!(b.take_shortest().map(|d| d.seq), Some(3));
        assert!(b.take_shortest().is_none());
        assert_eq!(b.num_tokens(), 0);
    }

    #[test]
    fn remove_and_arrival_order() {
        let mut b = filled(&[4, 2, 6]);
        assert!(b.remove(2, 0).is_none());
        assert_eq!(b.remove(2, 1).map(|d| d.len()), Some(2));
        let order: Vec<u64> = b.by_arrival().iter().map(|&(s, _, _)| s).collect();
        assert_eq!(order, vec![0, 2]);
        assert_eq!(b.num_tokens(), 10);
    }
}
