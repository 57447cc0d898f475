//! The encoder: split, then byte-pair merge each chunk by rank, exactly as `tiktoken` does.
//!
//! Within a chunk the adjacent pair whose concatenated bytes have the lowest rank is merged first,
//! the leftmost one on ties, until no adjacent pair is a token. Looking ranks up by *bytes* (not by
//! the pair of ids a merge was learnt from) is what tiktoken does, and is needed to be bit-identical.

use std::cmp::Reverse;
use std::collections::BinaryHeap;

use rayon::prelude::*;
use rustc_hash::FxHashMap;

use crate::{Splitter, TokenizerError};

/// Chunks up to this many bytes are merged by rescanning (fast when short), longer ones with a heap.
const LINEAR_MERGE_MAX_LEN: usize = 64;

/// Byte-level BPE encoder over mergeable ranks (ids `0..n`), with special tokens after them.
#[derive(Debug, Clone)]
pub struct Encoder {
    splitter: Splitter,
    ranks: FxHashMap<Vec<u8>, u32>,
    /// Bytes of every ordinary token, by id.
    vocab: Vec<Vec<u8>>,
    /// Text of the special tokens; special `i` has id `vocab.len() + i`.
    specials: Vec<String>,
}

impl Encoder {
    /// `vocab[id]` is the bytes of token `id`; the first 256 must be the single bytes in order.
    pub fn new(vocab: Vec<Vec<u8>>, specials: Vec<String>, splitter: Splitter) -> Result<Self, TokenizerError> {
        if vocab.len() < 256 {
            return Err(TokenizerError::InvalidRanks(format!(
                "a byte-level vocabulary needs at least the 256 single bytes, got {} tokens",
                vocab.len()
            )));
        }
        for (b, bytes) in vocab.iter().take(256).enumerate() {
            if bytes.as_slice() != [b as u8] {
                return Err(TokenizerError::InvalidRanks(format!("token {b} must be the single byte {b}")));
            }
        }
        if let Some(id) = vocab.iter().position(|b| b.is_empty()) {
            return Err(TokenizerError::InvalidRanks(format!("token {id} has no bytes")));
        }
        let mut ranks = FxHashMap::with_capacity_and_hasher(vocab.len(), Default::default());
        for (id, bytes) in vocab.iter().enumerate() {
            // A token listed twice would make the ranks (and tiktoken's export) ambiguous.
            if let Some(first) = ranks.insert(bytes.clone(), id as u32) {
                return Err(TokenizerError::InvalidRanks(format!("token {id} repeats the bytes of token {first}")));
            }
        }
        Ok(Encoder { splitter, ranks, vocab, specials })
    }

    /// Number of ordinary (mergeable) tokens.
    pub fn num_ranks(&self) -> usize {
        self.vocab.len()
    }

    /// Ordinary tokens plus special tokens.
    pub fn vocab_size(&self) -> usize {
        self.vocab.len() + self.specials.len()
    }

    pub fn vocab(&self) -> &[Vec<u8>] {
        &self.vocab
    }

    pub fn specials(&self) -> &[String] {
        &self.specials
    }

    /// Byte length of every token id, special tokens (which stand for no text bytes) as 0.
    pub fn token_lengths(&self) -> Vec<usize> {
        let mut lengths: Vec<usize> = self.vocab.iter().map(Vec::len).collect();
        lengths.resize(self.vocab_size(), 0);
        lengths
    }

    /// Id of a special token by its text, e.g. `<|bos|>`.
    pub fn special_id(&self, name: &str) -> Option<u32> {
        self.specials.iter().position(|s| s == name).map(|i| (self.vocab.len() + i) as u32)
    }

    /// Encode `text` (no special-token parsing) and append the ids to `out`.
    pub fn encode_into(&self, text: &str, out: &mut Vec<u32>) -> Result<(), TokenizerError> {
        self.splitter.split(text, |chunk| {
            let piece = chunk.as_bytes();
            match self.ranks.get(piece) {
                Some(&id) => out.push(id),
                None => self.merge_piece(piece, out),
            }
        })
    }

    pub fn encode(&self, text: &str) -> Result<Vec<u32>, TokenizerError> {
        let mut out = Vec::with_capacity(text.len() / 3 + 1);
        self.encode_into(text, &mut out)?;
        Ok(out)
    }

    /// Encode many texts in parallel; `prepend`/`append` ids wrap every text.
    pub fn encode_batch<S: AsRef<str> + Sync>(
        &self,
        texts: &[S],
        prepend: Option<u32>,
        append: Option<u32>,
    ) -> Result<Vec<Vec<u32>>, TokenizerError> {
        texts
            .par_iter()
            .map(|t| {
                let mut ids = Vec::with_capacity(t.as_ref().len() / 3 + 2);
                ids.extend(prepend);
                self.encode_into(t.as_ref(), &mut ids)?;
                ids.extend(append);
                Ok(ids)
            })
            .collect()
    }

    /// Encode many texts in parallel into one flat array: text `i` is
    /// `tokens[offsets[i]..offsets[i + 1]]`. This is the packer's input format.
    pub fn encode_flat<S: AsRef<str> + Sync>(
        &self,
        texts: &[S],
        prepend: Option<u32>,
    ) -> Result<(Vec<u32>, Vec<i64>), TokenizerError> {
        let pieces = (rayon::current_num_threads() * 4).max(1);
        let piece_len = texts.len().div_ceil(pieces).max(1);
        let parts: Vec<(Vec<u32>, Vec<i64>)> = texts
            .par_chunks(piece_len)
            .map(|piece| {
                let bytes: usize = piece.iter().map(|t| t.as_ref().len()).sum();
                let mut tokens = Vec::with_capacity(bytes / 3 + piece.len());
                let mut lengths = Vec::with_capacity(piece.len());
                for t in piece {
                    let before = tokens.len();
                    tokens.extend(prepend);
                    self.encode_into(t.as_ref(), &mut tokens)?;
                    lengths.push((tokens.len() - before) as i64);
                }
                Ok((tokens, lengths))
            })
            .collect::<Result<_, TokenizerError>>()?;
        let total: usize = parts.iter().map(|(t, _)| t.len()).sum();
        let mut tokens = Vec::with_capacity(total);
        let mut offsets = Vec::with_capacity(texts.len() + 1);
        offsets.push(0i64);
        for (part_tokens, lengths) in parts {
            tokens.extend_from_slice(&part_tokens);
            for len in lengths {
                offsets.push(offsets[offsets.len() - 1] + len);
            }
        }
        Ok((tokens, offsets))
    }

    /// Bytes of the given ids concatenated (special tokens as their text).
    pub fn decode_bytes(&self, ids: &[u32]) -> Result<Vec<u8>, TokenizerError> {
        let mut out = Vec::with_capacity(ids.len() * 4);
        for &id in ids {
            out.extend_from_slice(self.token_bytes(id).ok_or(TokenizerError::UnknownTokenId(id))?);
        }
        Ok(out)
    }

    /// Bytes of one token, or `None` if the id is out of range.
    pub fn token_bytes(&self, id: u32) -> Option<&[u8]> {
        let id = id as usize;
        match self.vocab.get(id) {
            Some(bytes) => Some(bytes),
            None => self.specials.get(id - self.vocab.len()).map(|s| s.as_bytes()),
        }
    }

    fn rank(&self, bytes: &[u8]) -> u32 {
        self.ranks.get(bytes).copied().unwrap_or(u32::MAX)
    }

    /// Byte-pair merge one chunk that is not itself a token.
    fn merge_piece(&self, piece: &[u8], out: &mut Vec<u32>) {
        if piece.len() <= LINEAR_MERGE_MAX_LEN {
            self.merge_piece_linear(piece, out);
        } else {
            self.merge_piece_heap(piece, out);
        }
    }

    /// tiktoken's algorithm: rescan all join ranks after every merge. Fastest for the short chunks
    /// that make up almost all text, but quadratic in the chunk length.
    fn merge_piece_linear(&self, piece: &[u8], out: &mut Vec<u32>) {
        // Part i spans piece[bounds[i]..bounds[i + 1]]; join_rank[i] is the rank of parts i and i+1
        // joined (u32::MAX if that is not a token).
        let mut bounds: Vec<usize> = (0..=piece.len()).collect();
        let mut join_rank: Vec<u32> = (0..piece.len().saturating_sub(1)).map(|i| self.rank(&piece[i..i + 2])).collect();
        loop {
            let mut best = (u32::MAX, 0);
            for (i, &r) in join_rank.iter().enumerate() {
                if r < best.0 {
                    best = (r, i);
                }
            }
            if best.0 == u32::MAX {
                break;
            }
            let i = best.1;
            bounds.remove(i + 1);
            join_rank.remove(i);
            if i < join_rank.len() {
                join_rank[i] = self.rank(&piece[bounds[i]..bounds[i + 2]]);
            }
            if i > 0 {
                join_rank[i - 1] = self.rank(&piece[bounds[i - 1]..bounds[i + 1]]);
            }
        }
        // Every part is a single byte or the result of a merge of two tokens, so it has a rank.
        out.extend(bounds.windows(2).map(|w| self.rank(&piece[w[0]..w[1]])));
    }

    /// The same merges in O(n log n), for long chunks (a long run of letters or whitespace is one
    /// chunk, and web text has runs of megabytes that would take the linear rescan hours).
    ///
    /// Parts form a linked list by start offset; a min-heap holds candidate joins as
    /// `(rank, start, end)`, so the lowest rank wins and, among equal ranks, the leftmost, exactly as
    /// in the rescan. A candidate is stale unless a live part still starts at `start` and it and its
    /// right neighbour still end at `end`; if so the joined bytes, hence the rank, are unchanged.
    fn merge_piece_heap(&self, piece: &[u8], out: &mut Vec<u32>) {
        let n = piece.len();
        // next_start[s]: where the part starting at s ends (n for the last part).
        let mut next_start: Vec<usize> = (1..=n).collect();
        let mut prev_start: Vec<usize> = (0..n).map(|s| s.wrapping_sub(1)).collect();
        let mut alive = vec![true; n];
        let mut heap: BinaryHeap<Reverse<(u32, usize, usize)>> = (0..n.saturating_sub(1))
            .filter_map(|s| {
                let rank = self.rank(&piece[s..s + 2]);
                (rank != u32::MAX).then_some(Reverse((rank, s, s + 2)))
            })
            .collect();
        while let Some(Reverse((_, start, end))) = heap.pop() {
            let mid = next_start[start];
            if !alive[start] || mid >= n || next_start[mid] != end {
                continue;
            }
            alive[mid] = false;
            next_start[start] = end;
            if end < n {
                prev_start[end] = start;
                let after = next_start[end];
                let rank = self.rank(&piece[start..after]);
                if rank != u32::MAX {
                    heap.push(Reverse((rank, start, after)));
                }
            }
            if start > 0 {
                let before = prev_start[start];
                let rank = self.rank(&piece[before..end]);
                if rank != u32::MAX {
                    heap.push(Reverse((rank, before, end)));
                }
            }
        }
        let mut start = 0;
        while start < n {
            let end = next_start[start];
            out.push(self.rank(&piece[start..end]));
            start = end;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::{vocab_bytes, ChunkCounter};
    use proptest::prelude::*;

    fn trained(docs: &[&str], merges: usize) -> Encoder {
        let mut counter = ChunkCounter::new(Splitter::Default);
        counter.add_documents(docs, None).unwrap();
        let merges = counter.train(merges, |_, _| std::ops::ControlFlow::Continue(()));
        Encoder::new(vocab_bytes(&merges).unwrap(), vec!["<|bos|>".into()], Splitter::Default).unwrap()
    }

    #[test]
    fn encodes_known_words_to_single_tokens() {
        let enc = trained(&["hello hello hello world world"], 20);
        let ids = enc.encode("hello world").unwrap();
        assert_eq!(ids.len(), 2);
        assert_eq!(enc.decode_bytes(&ids).unwrap(), b"hello world");
    }

    #[test]
    fn special_tokens_follow_the_ranks() {
        let enc = trained(&["ab ab"], 1);
        assert_eq!(enc.special_id("<|bos|>"), Some(257));
        assert_eq!(enc.decode_bytes(&[257]).unwrap(), b"<|bos|>");
        assert_eq!(enc.decode_bytes(&[258]), Err(TokenizerError::UnknownTokenId(258)));
        assert_eq!(enc.special_id("<|nope|>"), None);
        let lengths = enc.token_lengths();
        assert_eq!((lengths.len(), lengths[97], lengths[256], lengths[257]), (258, 1, 2, 0));
    }

    #[test]
    fn rejects_vocabularies_without_the_bytes() {
        assert!(Encoder::new(vec![vec![0]; 10], vec![], Splitter::Default).is_err());
        let mut vocab = vocab_bytes(&[]).unwrap();
        vocab.push(vec![]);
        assert!(Encoder::new(vocab, vec![], Splitter::Default).is_err());
    }

    #[test]
    fn flat_encoding_matches_batch_encoding() {
        let enc = trained(&["the cat sat on the mat"], 30);
        let texts = ["the cat", "", "sat on the mat", "ünïcödé 🎉"];
        let (tokens, offsets) = enc.encode_flat(&texts, Some(999)).unwrap();
        let batch = enc.encode_batch(&texts, Some(999), None).unwrap();
        assert_eq!(offsets.len(), texts.len() + 1);
        for (i, ids) in batch.iter().enumerate() {
            assert_eq!(&tokens[offsets[i] as usize..offsets[i + 1] as usize], ids.as_slice());
        }
    }

    #[test]
    fn rejects_repeated_tokens() {
        let mut vocab = vocab_bytes(&[(97, 98)]).unwrap();
        vocab.push(b"ab".to_vec());
        let err = Encoder::new(vocab, vec![], Splitter::Default).unwrap_err();
        assert_eq!(err, TokenizerError::InvalidRanks("token 257 repeats the bytes of token 256".into()));
    }

    #[test]
    fn long_chunks_take_the_heap_path_and_agree_with_the_linear_scan() {
        // 20 kB in one chunk: far past the heap threshold, still small enough for the O(n^2) scan.
        let enc = trained(&["abababab cdcdcd abcd aaaa bbbb"], 40);
        let text = "abcd".repeat(5_000);
        let (mut linear, mut heap) = (Vec::new(), Vec::new());
        enc.merge_piece_linear(text.as_bytes(), &mut linear);
        enc.merge_piece_heap(text.as_bytes(), &mut heap);
        assert_eq!(heap, linear);
        let ids = enc.encode(&text).unwrap();
        assert_eq!(enc.decode_bytes(&ids).unwrap(), text.as_bytes());
    }

    fn piece_strategy() -> impl Strategy<Value = Vec<u8>> {
        // Few distinct bytes so that merges, ties between equal ranks and overlaps are common.
        prop::collection::vec(prop::sample::select(b"aabbc d".to_vec()), 2..300)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(300))]
        #[test]
        fn heap_merge_equals_linear_merge(piece in piece_strategy(), merges in 0usize..80) {
            let enc = trained(&["aaaa abab bbbb ab ba aab abba cabd aaaaaaa bababab dd cc"], merges);
            let (mut linear, mut heap) = (Vec::new(), Vec::new());
            enc.merge_piece_linear(&piece, &mut linear);
            enc.merge_piece_heap(&piece, &mut heap);
            prop_assert_eq!(heap, linear);
        }

        #[test]
        fn decode_inverts_encode(text in ".{0,80}") {
            let enc = trained(&["the quick brown fox jumps over the lazy dog 12 34 'll"], 60);
            let ids = enc.encode(&text).unwrap();
            prop_assert_eq!(enc.decode_bytes(&ids).unwrap(), text.as_bytes());
        }
    }
}
