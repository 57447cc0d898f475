//! BPE training: parallel chunk counting, then merges with incremental bookkeeping.
//!
//! Counting: documents are split with the pattern and identical chunks are counted, in parallel
//! across cores (rayon); only the per-chunk counts survive, never the documents.
//!
//! Merging: every unique chunk becomes a "word" of symbol ids (its bytes at first), weighted by its
//! count. We keep the count of every adjacent pair, an index from each pair to the words that
//! contain it, and a lazy max-heap of pairs. A merge rewrites only the words in the pair's index and
//! updates the counts of the pairs around each occurrence, so the cost of a merge is driven by the
//! words it touches, not by the corpus. Counts of existing pairs only ever go down (a pair gains
//! occurrences only in the step that creates one of its symbols), so a heap entry whose count is
//! stale is simply re-pushed with its current count when it surfaces.
//!
//! Ties between equally frequent pairs go to the smaller pair (left id, then right id), which makes
//! the merges a pure function of the documents, the pattern and the number of merges.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::ops::ControlFlow;

use rayon::prelude::*;
use rustc_hash::FxHashMap;

use crate::{Splitter, TokenizerError};

/// A pair of adjacent token ids.
pub type Pair = (u32, u32);

/// Pairs are keyed as `left << 32 | right`: one integer hashes faster than a tuple, and integer
/// order equals the (left, right) lexicographic order the tie-break needs.
#[inline]
fn pair_key(left: u32, right: u32) -> u64 {
    ((left as u64) << 32) | right as u64
}

#[inline]
fn key_pair(key: u64) -> Pair {
    ((key >> 32) as u32, key as u32)
}

/// Truncate `text` to at most `max_chars` chars (on a char boundary).
pub fn truncate_chars(text: &str, max_chars: usize) -> &str {
    if text.len() <= max_chars {
        return text; // no more chars than bytes
    }
    match text.char_indices().nth(max_chars) {
        Some((end, _)) => &text[..end],
        None => text,
    }
}

/// Counts the chunks of a stream of documents; call [`ChunkCounter::train`] once everything is in.
pub struct ChunkCounter {
    splitter: Splitter,
    counts: FxHashMap<Box<str>, u64>,
}

impl ChunkCounter {
    pub fn new(splitter: Splitter) -> Self {
        ChunkCounter { splitter, counts: FxHashMap::default() }
    }

    /// Number of distinct chunks seen so far.
    pub fn num_unique_chunks(&self) -> usize {
        self.counts.len()
    }

    /// The chunk counts (chunk text, count), in no particular order.
    pub fn counts(&self) -> impl Iterator<Item = (&str, u64)> {
        self.counts.iter().map(|(k, &v)| (&**k, v))
    }

    /// Split and count a batch of documents in parallel; each is first cut to `doc_cap` chars.
    pub fn add_documents<S: AsRef<str> + Sync>(
        &mut self,
        docs: &[S],
        doc_cap: Option<usize>,
    ) -> Result<(), TokenizerError> {
        let splitter = &self.splitter;
        // A few pieces per thread balances uneven documents without much merge overhead.
        let pieces = (rayon::current_num_threads() * 4).max(1);
        let piece_len = docs.len().div_ceil(pieces).max(1);
        let locals: Vec<FxHashMap<&str, u64>> = docs
            .par_chunks(piece_len)
            .map(|piece| {
                let mut local: FxHashMap<&str, u64> = FxHashMap::default();
                for doc in piece {
                    let mut text = doc.as_ref();
                    if let Some(cap) = doc_cap {
                        text = truncate_chars(text, cap);
                    }
                    splitter.split(text, |chunk| *local.entry(chunk).or_insert(0) += 1)?;
                }
                Ok(local)
            })
            .collect::<Result<_, TokenizerError>>()?;
        for local in locals {
            for (chunk, n) in local {
                match self.counts.get_mut(chunk) {
                    Some(total) => *total += n,
                    None => {
                        self.counts.insert(chunk.into(), n);
                    }
                }
            }
        }
        Ok(())
    }

    /// Learn up to `num_merges` merges. Merge `i` creates token id `256 + i`. Stops early when no
    /// pair occurs any more, or when `progress(done, total)` (called about a hundred times) breaks,
    /// e.g. on Ctrl-C: a long training run must not keep going after the caller gave up on it.
    pub fn train(&self, num_merges: usize, progress: impl FnMut(usize, usize) -> ControlFlow<()>) -> Vec<Pair> {
        let mut words = Words::from_counts(self.counts());
        words.train(num_merges, progress)
    }
}

/// All unique chunks as symbol sequences in one flat arena, each with its weight.
struct Words {
    symbols: Vec<u32>,
    start: Vec<usize>,
    len: Vec<u32>,
    weight: Vec<i64>,
}

impl Words {
    fn from_counts<'a>(counts: impl Iterator<Item = (&'a str, u64)>) -> Self {
        let mut words = Words { symbols: Vec::new(), start: Vec::new(), len: Vec::new(), weight: Vec::new() };
        for (chunk, count) in counts {
            words.start.push(words.symbols.len());
            words.len.push(chunk.len() as u32);
            words.symbols.extend(chunk.bytes().map(u32::from));
            words.weight.push(count as i64);
        }
        words
    }

    fn train(&mut self, num_merges: usize, mut progress: impl FnMut(usize, usize) -> ControlFlow<()>) -> Vec<Pair> {
        let mut counts: FxHashMap<u64, i64> = FxHashMap::default();
        let mut index: FxHashMap<u64, Vec<u32>> = FxHashMap::default();
        for w in 0..self.len.len() {
            let s = self.start[w];
            let weight = self.weight[w];
            for i in s..(s + self.len[w] as usize).saturating_sub(1) {
                let key = pair_key(self.symbols[i], self.symbols[i + 1]);
                *counts.entry(key).or_insert(0) += weight;
                add_to_index(&mut index, key, w as u32);
            }
        }
        let mut heap: BinaryHeap<(i64, Reverse<u64>)> =
            counts.iter().filter(|(_, &c)| c > 0).map(|(&k, &c)| (c, Reverse(k))).collect();

        let report_every = (num_merges / 100).max(1);
        // Every merge removes at least one symbol, which bounds the merges whatever was asked for.
        let mut merges = Vec::with_capacity(num_merges.min(self.symbols.len()));
        let mut created: Vec<u64> = Vec::new();
        while merges.len() < num_merges {
            let Some((count, Reverse(key))) = heap.pop() else { break };
            let current = counts.get(&key).copied().unwrap_or(0);
            if current != count {
                if current > 0 {
                    heap.push((current, Reverse(key)));
                }
                continue;
            }
            let (left, right) = key_pair(key);
            let new_id = 256 + merges.len() as u32;
            merges.push((left, right));

            created.clear();
            for w in index.remove(&key).unwrap_or_default() {
                self.merge_in_word(w, left, right, new_id, &mut counts, &mut index, &mut created);
            }
            counts.remove(&key);
            created.sort_unstable();
            created.dedup();
            for &k in &created {
                let c = counts.get(&k).copied().unwrap_or(0);
                if c > 0 {
                    heap.push((c, Reverse(k)));
                }
            }
            let report = merges.len() % report_every == 0 || merges.len() == num_merges;
            if report && progress(merges.len(), num_merges).is_break() {
                break;
            }
        }
        merges
    }

    /// Replace every (left, right) in word `w`, left to right, by `new_id`, and update the counts
    /// of the pairs around each occurrence (weighted by the word's count).
    #[allow(clippy::too_many_arguments)]
    fn merge_in_word(
        &mut self,
        w: u32,
        left: u32,
        right: u32,
        new_id: u32,
        counts: &mut FxHashMap<u64, i64>,
        index: &mut FxHashMap<u64, Vec<u32>>,
        created: &mut Vec<u64>,
    ) {
        let start = self.start[w as usize];
        let len = self.len[w as usize] as usize;
        let weight = self.weight[w as usize];
        let sym = &mut self.symbols[start..start + len];
        let mut change = |key: u64, delta: i64| *counts.entry(key).or_insert(0) += delta;
        let (mut read, mut write) = (0, 0);
        while read < len {
            if read + 1 < len && sym[read] == left && sym[read + 1] == right {
                change(pair_key(left, right), -weight);
                if write > 0 {
                    let before = sym[write - 1];
                    change(pair_key(before, left), -weight);
                    let k = pair_key(before, new_id);
                    change(k, weight);
                    add_to_index(index, k, w);
                    created.push(k);
                }
                if read + 2 < len {
                    let after = sym[read + 2];
                    change(pair_key(right, after), -weight);
                    let k = pair_key(new_id, after);
                    change(k, weight);
                    add_to_index(index, k, w);
                    created.push(k);
                }
                sym[write] = new_id;
                read += 2;
            } else {
                sym[write] = sym[read];
                read += 1;
            }
            write += 1;
        }
        self.len[w as usize] = write as u32;
    }
}

/// Record that word `w` contains pair `key`; words are visited one at a time, so checking the last
/// entry is enough to keep each list free of duplicates.
#[inline]
fn add_to_index(index: &mut FxHashMap<u64, Vec<u32>>, key: u64, w: u32) {
    let list = index.entry(key).or_default();
    if list.last() != Some(&w) {
        list.push(w);
    }
}

/// Bytes of every token id: 0–255 are the raw bytes, then one entry per merge.
pub fn vocab_bytes(merges: &[Pair]) -> Vec<Vec<u8>> {
    let mut vocab: Vec<Vec<u8>> = (0..=255u8).map(|b| vec![b]).collect();
    for &(left, right) in merges {
        let mut bytes = vocab[left as usize].clone();
        bytes.extend_from_slice(&vocab[right as usize]);
        vocab.push(bytes);
    }
    vocab
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashMap;

    /// Obviously-correct BPE: recount every pair from scratch before each merge.
    fn reference_train(chunks: &HashMap<Vec<u32>, i64>, num_merges: usize) -> Vec<Pair> {
        let mut words: Vec<(Vec<u32>, i64)> = chunks.iter().map(|(k, &v)| (k.clone(), v)).collect();
        let mut merges = Vec::new();
        for step in 0..num_merges {
            let mut counts: HashMap<Pair, i64> = HashMap::new();
            for (w, c) in &words {
                for p in w.windows(2) {
                    *counts.entry((p[0], p[1])).or_default() += c;
                }
            }
            let Some((&best, _)) = counts.iter().max_by(|a, b| a.1.cmp(b.1).then(b.0.cmp(a.0))) else {
                break;
            };
            let new_id = 256 + step as u32;
            merges.push(best);
            for (w, _) in words.iter_mut() {
                let mut out = Vec::with_capacity(w.len());
                let mut i = 0;
                while i < w.len() {
                    if i + 1 < w.len() && (w[i], w[i + 1]) == best {
                        out.push(new_id);
                        i += 2;
                    } else {
                        out.push(w[i]);
                        i += 1;
                    }
                }
                *w = out;
            }
        }
        merges
    }

    fn counter_for(docs: &[String]) -> ChunkCounter {
        let mut counter = ChunkCounter::new(Splitter::Default);
        counter.add_documents(docs, None).unwrap();
        counter
    }

    #[test]
    fn merges_most_frequent_pair_first_with_ties_to_the_smaller_pair() {
        let counter = counter_for(&["ab ab ab cd cd cd".to_string()]);
        let merges = counter.train(3, |_, _| ControlFlow::Continue(()));
        // Chunks "ab" x1, " ab" x2, " cd" x3: (a,b), ( ,c) and (c,d) all occur 3 times; ( ,c) is smallest.
        let mut chunks = HashMap::new();
        for (c, n) in counter.counts() {
            chunks.insert(c.bytes().map(u32::from).collect::<Vec<_>>(), n as i64);
        }
        assert_eq!(merges, reference_train(&chunks, 3));
        assert_eq!(merges[0], (b' ' as u32, b'c' as u32));
    }

    #[test]
    fn stops_when_no_pair_is_left() {
        let counter = counter_for(&["a\nb".to_string()]);
        assert!(counter.train(10, |_, _| ControlFlow::Continue(())).is_empty());
    }

    #[test]
    fn progress_can_stop_training_early() {
        let counter = counter_for(&["abcdefghijklmnopqrstuvwxyz ".repeat(50)]);
        let mut calls = Vec::new();
        let merges = counter.train(200, |done, total| {
            calls.push((done, total));
            ControlFlow::Break(())
        });
        assert_eq!(calls, vec![(2, 200)]);
        assert_eq!(merges.len(), 2);
    }

    #[test]
    fn doc_cap_truncates_on_char_boundaries() {
        assert_eq!(truncate_chars("héllo", 2), "hé");
        assert_eq!(truncate_chars("hi", 5), "hi");
        let mut counter = ChunkCounter::new(Splitter::Default);
        counter.add_documents(&["abcdef"], Some(3)).unwrap();
        assert_eq!(counter.counts().collect::<Vec<_>>(), vec![("abc", 1)]);
    }

    #[test]
    fn vocab_bytes_concatenates() {
        let vocab = vocab_bytes(&[(97, 98), (256, 99)]);
        assert_eq!(vocab[256], b"ab");
        assert_eq!(vocab[257], b"abc");
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(300))]
        #[test]
        fn incremental_training_equals_full_recount(
            docs in prop::collection::vec("[ab c\n'é1]{0,30}", 1..12),
            num_merges in 0usize..40,
        ) {
            let counter = counter_for(&docs);
            let mut chunks = HashMap::new();
            for (c, n) in counter.counts() {
                chunks.insert(c.bytes().map(u32::from).collect::<Vec<_>>(), n as i64);
            }
            prop_assert_eq!(counter.train(num_merges, |_, _| ControlFlow::Continue(())), reference_train(&chunks, num_merges));
        }

        #[test]
        fn counting_is_independent_of_batching(docs in prop::collection::vec(".{0,20}", 0..20), cut in 0usize..20) {
            let cut = cut.min(docs.len());
            let mut a = ChunkCounter::new(Splitter::Default);
            a.add_documents(&docs, None).unwrap();
            let mut b = ChunkCounter::new(Splitter::Default);
            b.add_documents(&docs[..cut], None).unwrap();
            b.add_documents(&docs[cut..], None).unwrap();
            let mut ca: Vec<_> = a.counts().collect();
            let mut cb: Vec<_> = b.counts().collect();
            ca.sort();
            cb.sort();
            prop_assert_eq!(ca, cb);
        }
    }
}
