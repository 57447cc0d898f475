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

/// What a batch of documents contributed to training: documents taken, and the chars and UTF-8
/// bytes of their text after the `doc_cap` crop (bytes are the fair unit for throughput).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TextRead {
    pub documents: usize,
    pub chars: u64,
    pub bytes: u64,
}

/// How much of `texts` a budget of `max_chars` takes, counting each text after the `doc_cap` crop:
/// texts are taken from the start until the budget is spent, and the one that crosses it is taken.
pub fn take_within_budget<S: AsRef<str>>(texts: &[S], doc_cap: Option<usize>, max_chars: Option<u64>) -> TextRead {
    let mut read = TextRead::default();
    for t in texts {
        if max_chars.is_some_and(|m| read.chars >= m) {
            break;
        }
        let text = match doc_cap {
            Some(cap) => truncate_chars(t.as_ref(), cap),
            None => t.as_ref(),
        };
        read.documents += 1;
        read.chars += text.chars().count() as u64;
        read.bytes += text.len() as u64;
    }
    read
}

/// Counts the chunks of a stream of documents; call [`ChunkCounter::train`] once everything is in.
pub struct ChunkCounter {
    splitter: Splitter,
    counts: FxHashMap<Box<str>, u64>,
    uncovered_bytes: u64,
}

impl ChunkCounter {
    pub fn new(splitter: Splitter) -> Self {
        ChunkCounter { splitter, counts: FxHashMap::default(), uncovered_bytes: 0 }
    }

    /// Number of distinct chunks seen so far.
    pub fn num_unique_chunks(&self) -> usize {
        self.counts.len()
    }

    /// Bytes of the documents (after the crop) that no match of the split pattern covered. Training
    /// never sees them, and neither does encoding with the same pattern (as in tiktoken): a custom
    /// pattern that does not match everything silently drops text. Always 0 for the default pattern.
    pub fn uncovered_bytes(&self) -> u64 {
        self.uncovered_bytes
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
        let locals: Vec<(FxHashMap<&str, u64>, u64)> = docs
            .par_chunks(piece_len)
            .map(|piece| {
                let mut local: FxHashMap<&str, u64> = FxHashMap::default();
                let mut uncovered = 0u64;
                for doc in piece {
                    let mut text = doc.as_ref();
                    if let Some(cap) = doc_cap {
                        text = truncate_chars(text, cap);
                    }
                    let mut covered = 0;
                    splitter.split(text, |chunk| {
                        covered += chunk.len();
                        *local.entry(chunk).or_insert(0) += 1;
                    })?;
                    // Matches never overlap, so they cover at most the whole text.
                    uncovered += text.len().saturating_sub(covered) as u64;
                }
                Ok((local, uncovered))
            })
            .collect::<Result<_, TokenizerError>>()?;
        for (local, uncovered) in locals {
            self.uncovered_bytes += uncovered;
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

    /// Count documents from the start of `docs` until `max_chars` chars are taken (see
    /// [`take_within_budget`]); returns what was taken.
    pub fn add_documents_within<S: AsRef<str> + Sync>(
        &mut self,
        docs: &[S],
        doc_cap: Option<usize>,
        max_chars: Option<u64>,
    ) -> Result<TextRead, TokenizerError> {
        let read = take_within_budget(docs, doc_cap, max_chars);
        self.add_documents(&docs[..read.documents], doc_cap)?;
        Ok(read)
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
                let (start, len) = (self.start[w as usize], self.len[w as usize] as usize);
                let weight = self.weight[w as usize];
                let word = &mut self.symbols[start..start + len];
                let new_len = merge_pair_in_word(word, (left, right), new_id, |(a, b), delta| {
                    let k = pair_key(a, b);
                    *counts.entry(k).or_insert(0) += delta * weight;
                    if delta > 0 {
                        add_to_index(&mut index, k, w);
                        created.push(k);
                    }
                });
                self.len[w as usize] = new_len as u32;
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
}

/// Merge `pair` everywhere in `word`: every occurrence, left to right (so `aaa` merging `(a, a)`
/// becomes `[new_id, a]`), is replaced by `new_id`. The merged word is `word[..returned length]`.
///
/// `change(p, delta)` reports how the word's count of the adjacent pair `p` changes at each
/// occurrence: -1 for each pair that disappears (the merged pair and the pairs it formed with its
/// neighbours), +1 for each pair created with `new_id`. Summed, these are exactly the difference
/// between the pair counts of the word after and before, which is what lets the trainer update
/// global counts from the touched words alone.
pub fn merge_pair_in_word(word: &mut [u32], pair: Pair, new_id: u32, mut change: impl FnMut(Pair, i64)) -> usize {
    let (left, right) = pair;
    let len = word.len();
    let (mut read, mut write) = (0, 0);
    while read < len {
        if read + 1 < len && word[read] == left && word[read + 1] == right {
            change(pair, -1);
            if write > 0 {
                // The symbol before is the one already written: possibly `new_id` itself.
                let before = word[write - 1];
                change((before, left), -1);
                change((before, new_id), 1);
            }
            if read + 2 < len {
                let after = word[read + 2];
                change((right, after), -1);
                change((new_id, after), 1);
            }
            word[write] = new_id;
            read += 2;
        } else {
            word[write] = word[read];
            read += 1;
        }
        write += 1;
    }
    write
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

/// Bytes of every token id: 0–255 are the raw bytes, then one entry per merge. Merge `i` (id
/// `256 + i`) may only join ids defined before it.
pub fn vocab_bytes(merges: &[Pair]) -> Result<Vec<Vec<u8>>, TokenizerError> {
    let mut vocab: Vec<Vec<u8>> = (0..=255u8).map(|b| vec![b]).collect();
    for (i, &(left, right)) in merges.iter().enumerate() {
        let (Some(l), Some(r)) = (vocab.get(left as usize), vocab.get(right as usize)) else {
            return Err(TokenizerError::InvalidMerges(format!(
                "merge {i} ({left}, {right}) refers to an id not yet defined"
            )));
        };
        let bytes = [l.as_slice(), r.as_slice()].concat();
        vocab.push(bytes);
    }
    Ok(vocab)
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
        let vocab = vocab_bytes(&[(97, 98), (256, 99)]).unwrap();
        assert_eq!(vocab[256], b"ab");
        assert_eq!(vocab[257], b"abc");
        assert_eq!(
            vocab_bytes(&[(97, 98), (258, 99)]),
            Err(TokenizerError::InvalidMerges("merge 1 (258, 99) refers to an id not yet defined".into()))
        );
        assert!(vocab_bytes(&[(256, 97)]).is_err(), "a merge may not use its own id");
    }

    /// `word` after merging `pair` into 999, and the net pair-count changes reported.
    fn merged(word: &[u32], pair: Pair) -> (Vec<u32>, Vec<(Pair, i64)>) {
        let mut word = word.to_vec();
        let mut changes: HashMap<Pair, i64> = HashMap::new();
        let len = merge_pair_in_word(&mut word, pair, 999, |p, d| *changes.entry(p).or_default() += d);
        word.truncate(len);
        let mut changes: Vec<_> = changes.into_iter().filter(|&(_, d)| d != 0).collect();
        changes.sort();
        (word, changes)
    }

    #[test]
    fn merge_pair_in_word_replaces_occurrences_left_to_right() {
        assert_eq!(merged(&[1, 2, 3], (1, 2)), (vec![999, 3], vec![((1, 2), -1), ((2, 3), -1), ((999, 3), 1)]));
        assert_eq!(merged(&[3, 1, 2], (1, 2)), (vec![3, 999], vec![((1, 2), -1), ((3, 1), -1), ((3, 999), 1)]));
        assert_eq!(merged(&[1, 2], (1, 2)), (vec![999], vec![((1, 2), -1)]));
        assert_eq!(merged(&[1, 3, 2], (1, 2)), (vec![1, 3, 2], vec![]));
        assert_eq!(merged(&[], (1, 2)), (vec![], vec![]));
        // Overlapping occurrences: the leftmost wins, like rustbpe's merge_pair.
        assert_eq!(merged(&[7, 7, 7], (7, 7)), (vec![999, 7], vec![((7, 7), -2), ((999, 7), 1)]));
        assert_eq!(merged(&[7, 7, 7, 7], (7, 7)), (vec![999, 999], vec![((7, 7), -3), ((999, 999), 1)]));
        // Adjacent occurrences of a pair of distinct ids.
        assert_eq!(
            merged(&[1, 2, 1, 2], (1, 2)),
            (vec![999, 999], vec![((1, 2), -2), ((2, 1), -1), ((999, 999), 1)])
        );
    }

    /// Every adjacent pair of `word` with its count.
    fn pair_counts(word: &[u32]) -> HashMap<Pair, i64> {
        let mut counts = HashMap::new();
        for p in word.windows(2) {
            *counts.entry((p[0], p[1])).or_default() += 1;
        }
        counts
    }

    #[test]
    fn budget_takes_documents_until_the_chars_are_spent() {
        let docs = ["héllo", "abc", "z", "never"];
        assert_eq!(take_within_budget(&docs, None, None), TextRead { documents: 4, chars: 14, bytes: 15 });
        // The document that crosses the budget is taken whole (after its crop).
        assert_eq!(take_within_budget(&docs, None, Some(6)), TextRead { documents: 2, chars: 8, bytes: 9 });
        assert_eq!(take_within_budget(&docs, Some(2), Some(5)), TextRead { documents: 3, chars: 5, bytes: 6 });
        assert_eq!(take_within_budget(&docs, None, Some(0)), TextRead::default());
        let mut counter = ChunkCounter::new(Splitter::Default);
        assert_eq!(counter.add_documents_within(&docs, Some(3), Some(4)).unwrap().documents, 2);
        let mut counts: Vec<_> = counter.counts().collect();
        counts.sort();
        assert_eq!(counts, vec![("abc", 1), ("hél", 1)]);
    }

    #[test]
    fn uncovered_bytes_count_what_the_pattern_skips() {
        let mut counter = ChunkCounter::new(Splitter::new(r"\p{L}+").unwrap());
        counter.add_documents(&["abc 123 déf", "", "45"], None).unwrap();
        assert_eq!(counter.uncovered_bytes(), 5 + 2);
        counter.add_documents(&["xyz 9"], Some(3)).unwrap(); // the crop leaves "xyz": all covered
        assert_eq!(counter.uncovered_bytes(), 7);
        let mut default = ChunkCounter::new(Splitter::Default);
        default.add_documents(&["abc 123 déf\n\n  ", "!?"], None).unwrap();
        assert_eq!(default.uncovered_bytes(), 0);
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
        fn merge_pair_in_word_reports_exactly_the_change_in_pair_counts(
            word in prop::collection::vec(0u32..4, 0..24),
            left in 0u32..4,
            right in 0u32..4,
        ) {
            let before = pair_counts(&word);
            let (after_word, changes) = merged(&word, (left, right));
            let mut expected = pair_counts(&after_word);
            for (p, c) in before {
                *expected.entry(p).or_default() -= c;
            }
            let mut expected: Vec<_> = expected.into_iter().filter(|&(_, d)| d != 0).collect();
            expected.sort();
            prop_assert_eq!(changes, expected);
            prop_assert!(!after_word.windows(2).any(|p| (p[0], p[1]) == (left, right)));
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
