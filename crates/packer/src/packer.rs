//! The packer: a pending stream, the best-fit buffer, row filling and transactional batches.

use std::collections::VecDeque;

use crate::buffer::{Doc, DocBuffer, DocRef};
use crate::PackError;

/// Value written into `targets` over the audio prefix: the loss's ignore index.
pub const IGNORE_INDEX: i64 = -1;

/// What to do when no buffered document fits the rest of a row.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum PackMode {
    /// Fill the rest with the head of the shortest buffered document and discard its tail:
    /// no padding, the fewest tokens thrown away (pretraining).
    #[default]
    Crop,
    /// Pad the rest (inputs BOS, targets ignored) so no document is ever cut, except one longer
    /// than a whole row, which is cropped to the row it starts (conversations for SFT).
    Pad,
}

impl PackMode {
    /// The mode's name in the Python API and in exported states.
    pub fn name(self) -> &'static str {
        match self {
            PackMode::Crop => "crop",
            PackMode::Pad => "pad",
        }
    }

    /// Inverse of [`PackMode::name`].
    pub fn from_name(name: &str) -> Result<PackMode, PackError> {
        match name {
            "crop" => Ok(PackMode::Crop),
            "pad" => Ok(PackMode::Pad),
            other => Err(PackError::InvalidConfig(format!("mode must be \"crop\" or \"pad\", got {other:?}"))),
        }
    }
}

/// Shape of the rows and behaviour of the buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PackerConfig {
    /// Positions the model sees per row: `audio_prefix_len + T_text`.
    pub seq_len: usize,
    /// Documents the buffer is topped up to before every placement.
    pub buffer_size: usize,
    /// Audio soft-token positions in front of the text (0 for text-only training).
    pub audio_prefix_len: usize,
    /// When set, every pushed document must start with this token.
    pub bos_token_id: Option<u32>,
    /// What fills the rest of a row that no buffered document fits.
    pub mode: PackMode,
}

impl PackerConfig {
    pub fn new(
        seq_len: usize,
        buffer_size: usize,
        audio_prefix_len: usize,
        bos_token_id: Option<u32>,
    ) -> Result<Self, PackError> {
        let config = PackerConfig { seq_len, buffer_size, audio_prefix_len, bos_token_id, mode: PackMode::Crop };
        config.validate()?;
        Ok(config)
    }

    /// The same configuration in another mode, validated.
    pub fn with_mode(self, mode: PackMode) -> Result<Self, PackError> {
        let config = PackerConfig { mode, ..self };
        config.validate()?;
        Ok(config)
    }

    pub fn validate(&self) -> Result<(), PackError> {
        if self.seq_len <= self.audio_prefix_len {
            return Err(PackError::InvalidConfig(format!(
                "seq_len ({}) must be greater than audio_prefix_len ({}) so rows hold at least one text token",
                self.seq_len, self.audio_prefix_len
            )));
        }
        if self.buffer_size < 1 {
            return Err(PackError::InvalidConfig("buffer_size must be at least 1".into()));
        }
        if self.mode == PackMode::Pad {
            // Padding positions take BOS as their input token, so it must be known.
            if self.bos_token_id.is_none() {
                return Err(PackError::InvalidConfig("pad mode needs bos_token_id (padding inputs are BOS)".into()));
            }
            // Audio rows carry one clip per row, aligned with the text they start with; padding
            // them has no defined meaning yet.
            if self.audio_prefix_len != 0 {
                return Err(PackError::InvalidConfig("pad mode does not support an audio prefix".into()));
            }
        }
        Ok(())
    }

    /// Text positions per row of `inputs`: `seq_len - audio_prefix_len`.
    pub fn text_len(&self) -> usize {
        self.seq_len - self.audio_prefix_len
    }

    /// Tokens per packed row: one more than the inputs, since targets are shifted by one.
    pub fn row_capacity(&self) -> usize {
        self.text_len() + 1
    }
}

/// Cumulative counters. With the buffered and pending tokens they account for every token pushed:
/// `tokens_in == tokens_placed + tokens_cropped + tokens_buffered + tokens_pending`
/// (padding is not a pushed token: `tokens_padded` stands apart).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    pub docs_in: u64,
    pub tokens_in: u64,
    /// Tokens written into rows (whole documents and the kept heads of cropped ones).
    pub tokens_placed: u64,
    /// Tokens discarded from the tails of cropped documents.
    pub tokens_cropped: u64,
    /// Documents placed whole.
    pub docs_placed: u64,
    /// Documents placed partially (their tail discarded).
    pub docs_cropped: u64,
    pub rows_packed: u64,
    /// Row positions filled with padding (pad mode only).
    pub tokens_padded: u64,
}

impl Stats {
    /// Every counter with its name, in a fixed order: the names are the keys of the exported
    /// state and of the Python `stats` dict.
    pub fn named(&self) -> [(&'static str, u64); 8] {
        [
            ("docs_in", self.docs_in),
            ("tokens_in", self.tokens_in),
            ("tokens_placed", self.tokens_placed),
            ("tokens_cropped", self.tokens_cropped),
            ("docs_placed", self.docs_placed),
            ("docs_cropped", self.docs_cropped),
            ("rows_packed", self.rows_packed),
            ("tokens_padded", self.tokens_padded),
        ]
    }

    /// Inverse of [`Stats::named`]: `get(name)` gives each counter; its first error is returned.
    pub fn from_named<E>(mut get: impl FnMut(&'static str) -> Result<u64, E>) -> Result<Stats, E> {
        Ok(Stats {
            docs_in: get("docs_in")?,
            tokens_in: get("tokens_in")?,
            tokens_placed: get("tokens_placed")?,
            tokens_cropped: get("tokens_cropped")?,
            docs_placed: get("docs_placed")?,
            docs_cropped: get("docs_cropped")?,
            rows_packed: get("rows_packed")?,
            tokens_padded: get("tokens_padded")?,
        })
    }
}

/// What a batch changed, so a batch that cannot complete is undone exactly.
struct Journal {
    stats: Stats,
    /// `(len, seq)` of documents moved from the pending queue into the buffer, in order.
    moved_in: Vec<(usize, u64)>,
    /// Documents taken out of the buffer (placed or cropped), whole.
    taken: Vec<Doc>,
}

/// Best-fit packer over a stream of documents. See the crate docs for the rules.
#[derive(Debug, Clone)]
pub struct Packer {
    config: PackerConfig,
    pending: VecDeque<Doc>,
    pending_tokens: usize,
    buffer: DocBuffer,
    /// Arrival sequence number of the next pushed document (equals `stats.docs_in`).
    next_seq: u64,
    finished: bool,
    stats: Stats,
}

impl Packer {
    pub fn new(config: PackerConfig) -> Result<Self, PackError> {
        config.validate()?;
        Ok(Packer {
            config,
            pending: VecDeque::new(),
            pending_tokens: 0,
            buffer: DocBuffer::new(),
            next_seq: 0,
            finished: false,
            stats: Stats::default(),
        })
    }

    pub fn config(&self) -> &PackerConfig {
        &self.config
    }

    pub fn stats(&self) -> Stats {
        self.stats
    }

    pub fn is_finished(&self) -> bool {
        self.finished
    }

    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    pub fn docs_buffered(&self) -> usize {
        self.buffer.len()
    }

    pub fn tokens_buffered(&self) -> usize {
        self.buffer.num_tokens()
    }

    pub fn docs_pending(&self) -> usize {
        self.pending.len()
    }

    pub fn tokens_pending(&self) -> usize {
        self.pending_tokens
    }

    /// Buffered documents (arrival number, tokens, mask) in arrival order.
    pub fn buffered_docs(&self) -> Vec<DocRef<'_>> {
        self.buffer.by_arrival()
    }

    /// Pending documents (arrival number, tokens, mask) in arrival order.
    pub fn pending_docs(&self) -> impl Iterator<Item = DocRef<'_>> {
        self.pending.iter().map(|d| (d.seq, &d.tokens[..], d.mask.as_deref()))
    }

    /// Append documents to the stream: document `i` is `tokens[offsets[i]..offsets[i + 1]]`.
    ///
    /// `offsets` starts at 0, ends at `tokens.len()` and is strictly increasing (documents are
    /// never empty). Everything is validated before anything is added, so an error changes nothing.
    pub fn push(&mut self, tokens: &[u32], offsets: &[i64]) -> Result<(), PackError> {
        self.push_masked(tokens, offsets, None)
    }

    /// [`Packer::push`] with a loss mask: `mask[i]` (0 or 1, one per token) says whether token `i`
    /// is a training target; its target position holds -1 where it is 0.
    pub fn push_masked(&mut self, tokens: &[u32], offsets: &[i64], mask: Option<&[u8]>) -> Result<(), PackError> {
        if self.finished {
            return Err(PackError::StreamFinished);
        }
        let bounds = validate_offsets(tokens.len(), offsets)?;
        if let Some(bos) = self.config.bos_token_id {
            check_bos(tokens, &bounds, bos)?;
        }
        if let Some(mask) = mask {
            check_mask(mask, tokens.len())?;
        }
        // A wrapped arrival number would collide with a buffered document's key and replace it.
        // Every other counter is bounded by these two (placed + cropped never exceed what came in).
        let overflow = |what: &str| PackError::CounterOverflow(format!("{what} would pass 2^64 - 1"));
        let docs_in = self.stats.docs_in.checked_add(bounds.len() as u64).ok_or_else(|| overflow("docs_in"))?;
        let tokens_in =
            self.stats.tokens_in.checked_add(tokens.len() as u64).ok_or_else(|| overflow("tokens_in"))?;
        let pending_tokens =
            self.pending_tokens.checked_add(tokens.len()).ok_or_else(|| overflow("pending tokens"))?;
        for (seq, &(start, end)) in (self.next_seq..).zip(&bounds) {
            let mask = mask.map(|m| m[start..end].into());
            self.pending.push_back(Doc { seq, tokens: tokens[start..end].into(), mask });
        }
        self.next_seq = docs_in;
        self.pending_tokens = pending_tokens;
        self.stats.docs_in = docs_in;
        self.stats.tokens_in = tokens_in;
        Ok(())
    }

    /// Mark the end of the stream: top-ups then take whatever is left instead of waiting for
    /// `buffer_size` documents, and `pack_into` fails only once the buffer runs empty.
    pub fn finish(&mut self) {
        self.finished = true;
    }

    /// Fill `B` rows: `inputs` is `B * T_text` and `targets` is `B * seq_len` values, row-major.
    ///
    /// Returns `Ok(false)` — with the packer exactly as before the call — when the stream runs
    /// dry first: a top-up cannot reach `buffer_size` documents (or, after `finish`, the buffer is
    /// empty). The output buffers then hold partial garbage. Push more documents and call again.
    pub fn pack_into(&mut self, inputs: &mut [i64], targets: &mut [i64]) -> Result<bool, PackError> {
        let rows = self.check_batch(inputs.len(), targets.len())?;
        // The other counters a batch moves are bounded by tokens_in and docs_in, which push checks.
        let rows_packed = self
            .stats
            .rows_packed
            .checked_add(rows as u64)
            .ok_or_else(|| PackError::CounterOverflow("rows_packed would pass 2^64 - 1".into()))?;
        // A batch pads at most every position of its rows; checking that bound up front lets the
        // row filling add padding without overflow checks.
        let padding_bound = (rows as u64)
            .checked_mul(self.config.row_capacity() as u64)
            .and_then(|n| self.stats.tokens_padded.checked_add(n));
        if self.config.mode == PackMode::Pad && padding_bound.is_none() {
            return Err(PackError::CounterOverflow("tokens_padded could pass 2^64 - 1".into()));
        }
        let (text_len, seq_len) = (self.config.text_len(), self.config.seq_len);
        let mut journal = Journal { stats: self.stats, moved_in: Vec::new(), taken: Vec::new() };
        for (in_row, tgt_row) in inputs.chunks_exact_mut(text_len).zip(targets.chunks_exact_mut(seq_len)) {
            if !self.fill_row(in_row, tgt_row, &mut journal) {
                self.rollback(journal);
                return Ok(false);
            }
        }
        self.stats.rows_packed = rows_packed;
        Ok(true)
    }

    fn check_batch(&self, inputs_len: usize, targets_len: usize) -> Result<usize, PackError> {
        let (text_len, seq_len) = (self.config.text_len(), self.config.seq_len);
        let rows = inputs_len / text_len;
        // checked: with a huge audio prefix, `rows * seq_len` could overflow where `rows * text_len` does not
        if rows == 0 || inputs_len != rows * text_len || rows.checked_mul(seq_len) != Some(targets_len) {
            return Err(PackError::BatchShape(format!(
                "need inputs of B * {text_len} and targets of B * {seq_len} values with B >= 1, \
                 got {inputs_len} and {targets_len}"
            )));
        }
        Ok(rows)
    }

    /// Fill one row; false when the stream ran dry (the journal lets the caller undo the batch).
    fn fill_row(&mut self, inputs: &mut [i64], targets: &mut [i64], journal: &mut Journal) -> bool {
        let audio = self.config.audio_prefix_len;
        targets[..audio].fill(IGNORE_INDEX);
        let text_targets = &mut targets[audio..];
        let capacity = self.config.row_capacity();
        let pad = self.config.mode == PackMode::Pad;
        let mut pos = 0;
        while pos < capacity {
            if !self.top_up(journal) {
                // At the end of the stream a started row is padded rather than lost.
                if pad && self.finished && pos > 0 {
                    self.pad_from(inputs, text_targets, pos);
                    break;
                }
                return false;
            }
            let remaining = capacity - pos;
            let doc = match self.buffer.take_longest_fitting(remaining) {
                Some(doc) => {
                    self.stats.docs_placed += 1;
                    doc
                }
                // Cropping is the last resort in pad mode: only a document longer than a whole
                // row, on an empty row, is cut.
                None if pad && pos > 0 => {
                    self.pad_from(inputs, text_targets, pos);
                    break;
                }
                None => match self.buffer.take_shortest() {
                    Some(doc) => {
                        self.stats.docs_cropped += 1;
                        self.stats.tokens_cropped += (doc.len() - remaining) as u64;
                        doc
                    }
                    None => return false, // unreachable: top_up guarantees a non-empty buffer
                },
            };
            let placed = doc.len().min(remaining);
            write_piece(inputs, text_targets, pos, &doc.tokens[..placed], doc.mask.as_ref().map(|m| &m[..placed]));
            self.stats.tokens_placed += placed as u64;
            pos += placed;
            journal.taken.push(doc);
        }
        true
    }

    /// Fill row positions `pos..capacity` (with `pos >= 1`) with padding: input BOS, no target.
    fn pad_from(&mut self, inputs: &mut [i64], text_targets: &mut [i64], pos: usize) {
        let bos = self.config.bos_token_id.map_or(0, i64::from); // pad mode requires a BOS
        if pos < inputs.len() {
            inputs[pos..].fill(bos);
        }
        text_targets[pos - 1..].fill(IGNORE_INDEX);
        // No overflow: pack_into checked that padding every position of the batch fits.
        self.stats.tokens_padded += (self.config.row_capacity() - pos) as u64;
    }

    /// Move pending documents into the buffer up to `buffer_size`. False when the buffer cannot
    /// be made ready: short of `buffer_size` while the stream is open, or empty once finished.
    fn top_up(&mut self, journal: &mut Journal) -> bool {
        while self.buffer.len() < self.config.buffer_size {
            let Some(doc) = self.pending.pop_front() else { break };
            self.pending_tokens -= doc.len();
            journal.moved_in.push((doc.len(), doc.seq));
            self.buffer.insert(doc);
        }
        if self.finished {
            !self.buffer.is_empty()
        } else {
            self.buffer.len() >= self.config.buffer_size
        }
    }

    fn rollback(&mut self, journal: Journal) {
        for doc in journal.taken {
            self.buffer.insert(doc);
        }
        // The documents moved in are the newest in the buffer; return them to the queue's front
        // newest first so the queue regains its original order.
        for &(len, seq) in journal.moved_in.iter().rev() {
            let doc = self.buffer.remove(len, seq);
            debug_assert!(doc.is_some(), "journal names a document the buffer does not hold");
            if let Some(doc) = doc {
                self.pending_tokens += doc.len();
                self.pending.push_front(doc);
            }
        }
        self.stats = journal.stats;
    }

    /// Rebuild a packer from its parts; `state::PackerState` validates them first.
    pub(crate) fn from_parts(
        config: PackerConfig,
        stats: Stats,
        finished: bool,
        buffer: Vec<Doc>,
        pending: Vec<Doc>,
    ) -> Self {
        let mut packer = Packer {
            config,
            pending: VecDeque::with_capacity(pending.len()),
            pending_tokens: 0,
            buffer: DocBuffer::new(),
            next_seq: stats.docs_in,
            finished,
            stats,
        };
        for doc in buffer {
            packer.buffer.insert(doc);
        }
        for doc in pending {
            packer.pending_tokens += doc.len();
            packer.pending.push_back(doc);
        }
        packer
    }
}

/// Check offsets and turn them into `(start, end)` pairs of non-empty documents.
fn validate_offsets(num_tokens: usize, offsets: &[i64]) -> Result<Vec<(usize, usize)>, PackError> {
    let (Some(&first), Some(&last)) = (offsets.first(), offsets.last()) else {
        return Err(PackError::InvalidOffsets("offsets must hold at least one value (0)".into()));
    };
    if first != 0 {
        return Err(PackError::InvalidOffsets(format!("offsets[0] must be 0, got {first}")));
    }
    if usize::try_from(last).ok() != Some(num_tokens) {
        return Err(PackError::InvalidOffsets(format!(
            "offsets[-1] must equal the number of tokens ({num_tokens}), got {last}"
        )));
    }
    let mut bounds = Vec::with_capacity(offsets.len() - 1);
    for (index, w) in offsets.windows(2).enumerate() {
        if w[1] <= w[0] {
            return Err(if w[1] == w[0] {
                PackError::EmptyDocument { index }
            } else {
                PackError::InvalidOffsets(format!(
                    "offsets must be strictly increasing, but offsets[{index}] = {} > offsets[{}] = {}",
                    w[0],
                    index + 1,
                    w[1]
                ))
            });
        }
        // Strictly increasing from 0 up to `num_tokens` keeps every value in 0..=num_tokens.
        bounds.push((w[0] as usize, w[1] as usize));
    }
    Ok(bounds)
}

fn check_mask(mask: &[u8], num_tokens: usize) -> Result<(), PackError> {
    if mask.len() != num_tokens {
        return Err(PackError::InvalidMask(format!(
            "mask has {} values but there are {num_tokens} tokens",
            mask.len()
        )));
    }
    // OR-ing every value vectorises where an early-exit search goes byte by byte; the bad value
    // is only looked for once there is one.
    if mask.iter().fold(0u8, |acc, &m| acc | m) > 1 {
        if let Some(i) = mask.iter().position(|&m| m > 1) {
            return Err(PackError::InvalidMask(format!("mask values must be 0 or 1, got {} at index {i}", mask[i])));
        }
    }
    Ok(())
}

fn check_bos(tokens: &[u32], bounds: &[(usize, usize)], bos: u32) -> Result<(), PackError> {
    for (index, &(start, _)) in bounds.iter().enumerate() {
        if tokens[start] != bos {
            return Err(PackError::MissingBos { index, found: tokens[start], expected: bos });
        }
    }
    Ok(())
}

/// Write `piece`, occupying row positions `pos..pos + piece.len()`, into the two views of a row:
/// `inputs[p] = row[p]` for `p < T_text` and `text_targets[p - 1] = row[p]` for `p >= 1`, or -1
/// where the piece's mask is 0.
fn write_piece(inputs: &mut [i64], text_targets: &mut [i64], pos: usize, piece: &[u32], mask: Option<&[u8]>) {
    let text_len = inputs.len();
    let end = pos + piece.len();
    // Positions in both views are written in one pass over the piece. Only two positions are in
    // one view: row position 0 (nothing predicts the first token) and T_text (the row's last
    // token is no input).
    if pos == 0 {
        inputs[0] = i64::from(piece[0]);
    }
    if end > text_len {
        let last = piece.len() - 1;
        text_targets[text_len - 1] = target(piece[last], mask.map_or(1, |m| m[last]));
    }
    let (lo, hi) = (pos.max(1), end.min(text_len));
    if lo < hi {
        let views = inputs[lo..hi].iter_mut().zip(&mut text_targets[lo - 1..hi - 1]);
        let tokens = &piece[lo - pos..hi - pos];
        match mask {
            None => {
                for ((input, tgt), &token) in views.zip(tokens) {
                    *input = i64::from(token);
                    *tgt = i64::from(token);
                }
            }
            Some(mask) => {
                for ((input, tgt), (&token, &m)) in views.zip(tokens.iter().zip(&mask[lo - pos..hi - pos])) {
                    *input = i64::from(token);
                    *tgt = target(token, m);
                }
            }
        }
    }
}

/// The target for `token` with mask value `m`: the token itself where `m` is 1, IGNORE_INDEX where
/// it is 0.
fn target(token: u32, m: u8) -> i64 {
    // Masks hold only 0 and 1 (checked on push and on load), so `keep` is all ones or all zeros:
    // a select by bit operations, which vectorises on baseline x86-64 (`(t + 1) * m - 1` stayed
    // scalar there: SSE2 has no 64-bit multiply).
    let keep = -i64::from(m);
    (i64::from(token) & keep) | (IGNORE_INDEX & !keep)
}

#[cfg(test)]
mod tests {
    use super::*;

    const BOS: u32 = 1000;

    fn packer(seq_len: usize, buffer_size: usize, audio: usize) -> Packer {
        Packer::new(PackerConfig::new(seq_len, buffer_size, audio, Some(BOS)).unwrap()).unwrap()
    }

    /// Documents of the given lengths; token `j` of document `i` is `BOS` for j = 0, else 10_000 * (i + 1) + j.
    fn flat(lens: &[usize]) -> (Vec<u32>, Vec<i64>) {
        let mut tokens = Vec::new();
        let mut offsets = vec![0i64];
        for (i, &len) in lens.iter().enumerate() {
            tokens.push(BOS);
            tokens.extend((1..len).map(|j| (10_000 * (i + 1) + j) as u32));
            offsets.push(tokens.len() as i64);
        }
        (tokens, offsets)
    }

    fn pack(p: &mut Packer, rows: usize) -> Option<(Vec<i64>, Vec<i64>)> {
        let cfg = *p.config();
        let mut inputs = vec![0i64; rows * cfg.text_len()];
        let mut targets = vec![0i64; rows * cfg.seq_len];
        p.pack_into(&mut inputs, &mut targets).unwrap().then_some((inputs, targets))
    }

    #[test]
    fn config_validation() {
        assert!(matches!(PackerConfig::new(4, 1, 4, None), Err(PackError::InvalidConfig(_))));
        assert!(matches!(PackerConfig::new(4, 0, 0, None), Err(PackError::InvalidConfig(_))));
        assert_eq!(PackerConfig::new(8, 1, 3, None).unwrap().row_capacity(), 6);
    }

    #[test]
    fn push_validation_changes_nothing_on_error() {
        let mut p = packer(8, 2, 0);
        assert!(matches!(p.push(&[BOS], &[]), Err(PackError::InvalidOffsets(_))));
        assert!(matches!(p.push(&[BOS], &[1, 1]), Err(PackError::InvalidOffsets(_))));
        assert!(matches!(p.push(&[BOS, 2], &[0, 1]), Err(PackError::InvalidOffsets(_))));
        assert!(matches!(p.push(&[BOS, 2], &[0, 3]), Err(PackError::InvalidOffsets(_))));
        assert!(matches!(p.push(&[BOS, 2], &[0, 2, 1, 2]), Err(PackError::InvalidOffsets(_))));
        assert_eq!(p.push(&[BOS, 2], &[0, 0, 2]), Err(PackError::EmptyDocument { index: 0 }));
        assert_eq!(
            p.push(&[BOS, 2, 7], &[0, 2, 3]),
            Err(PackError::MissingBos { index: 1, found: 7, expected: BOS })
        );
        assert_eq!(p.stats(), Stats::default());
        assert_eq!(p.docs_pending(), 0);
        p.push(&[], &[0]).unwrap();
        assert_eq!(p.docs_pending(), 0);
        p.finish();
        assert_eq!(p.push(&[BOS], &[0, 1]), Err(PackError::StreamFinished));
    }

    fn as_row(parts: &[&[u32]]) -> Vec<i64> {
        parts.concat().iter().map(|&x| i64::from(x)).collect()
    }

    #[test]
    fn best_fit_then_crop_shortest() {
        // Capacity 8. Offsets: doc0 0..6, doc1 6..11, doc2 11..20, doc3 20..23, doc4 23..27, doc5 27..36.
        let mut p = packer(7, 4, 0);
        let (t, o) = flat(&[6, 5, 9, 3, 4, 9]);
        p.push(&t, &o).unwrap();
        // Buffer {6, 5, 9, 3}: the longest fitting is doc0 (6); 2 left, the top-up adds doc4 (4),
        // nothing fits and the shortest, doc3 (3), is cropped to 2 tokens.
        let (inputs, targets) = pack(&mut p, 1).unwrap();
        let row = as_row(&[&t[0..6], &t[20..22]]);
        assert_eq!(inputs, row[..7]);
        assert_eq!(targets, row[1..]);
        // Buffer {5, 9, 4, 9(doc5)}: doc1 (5) is placed, then the top-up finds nothing pending.
        assert!(pack(&mut p, 1).is_none());
        p.finish();
        let (inputs, _) = pack(&mut p, 1).unwrap();
        assert_eq!(inputs, as_row(&[&t[6..11], &t[23..26]])[..7]);
        // Two documents of length 9 are left: the tie goes to the earlier one, doc2.
        let (inputs, targets) = pack(&mut p, 1).unwrap();
        assert_eq!(inputs, as_row(&[&t[11..18]]));
        assert_eq!(targets, as_row(&[&t[12..19]]));
        let s = p.stats();
        assert_eq!((s.docs_placed, s.docs_cropped, s.tokens_cropped, s.rows_packed), (2, 3, 3, 3));
        let held = (p.tokens_buffered() + p.tokens_pending()) as u64;
        assert_eq!(s.tokens_in, s.tokens_placed + s.tokens_cropped + held);
        assert_eq!(p.buffered_docs().iter().map(|&(seq, _, _)| seq).collect::<Vec<_>>(), vec![5]);
    }

    fn pad_packer(seq_len: usize, buffer_size: usize) -> Packer {
        let config = PackerConfig::new(seq_len, buffer_size, 0, Some(BOS)).unwrap().with_mode(PackMode::Pad).unwrap();
        Packer::new(config).unwrap()
    }

    #[test]
    fn pad_mode_config_needs_bos_and_no_audio() {
        let base = PackerConfig::new(8, 1, 0, None).unwrap();
        assert!(matches!(base.with_mode(PackMode::Pad), Err(PackError::InvalidConfig(_))));
        let audio = PackerConfig::new(8, 1, 2, Some(BOS)).unwrap();
        assert!(matches!(audio.with_mode(PackMode::Pad), Err(PackError::InvalidConfig(_))));
        assert!(matches!(PackMode::from_name("padded"), Err(PackError::InvalidConfig(_))));
        assert_eq!(PackMode::from_name(PackMode::Pad.name()), Ok(PackMode::Pad));
    }

    #[test]
    fn pad_mode_pads_instead_of_cropping() {
        // Same stream as best_fit_then_crop_shortest: capacity 8, buffer 4.
        let mut p = pad_packer(7, 4);
        let (t, o) = flat(&[6, 5, 9, 3, 4, 9]);
        p.push(&t, &o).unwrap();
        p.finish();
        let b = i64::from(BOS);
        // doc0 (6) is placed; 2 left and nothing fits: pad instead of cropping doc3.
        let (inputs, targets) = pack(&mut p, 1).unwrap();
        let doc0 = as_row(&[&t[0..6]]);
        assert_eq!(inputs, [&doc0[..], &[b]].concat());
        assert_eq!(targets, [&doc0[1..], &[-1, -1]].concat());
        // Buffer {5, 9, 3, 4}: doc1 (5) then doc3 (3) fill the row exactly.
        let (inputs, _) = pack(&mut p, 1).unwrap();
        assert_eq!(inputs, as_row(&[&t[6..11], &t[20..23]])[..7]);
        // Buffer {9, 4, 9}: doc4 (4) fits; then 4 left, both 9s are too long: pad.
        let (inputs, targets) = pack(&mut p, 1).unwrap();
        assert_eq!(inputs, [&as_row(&[&t[23..27]])[..], &[b; 3]].concat());
        assert_eq!(targets, [&as_row(&[&t[24..27]])[..], &[-1; 4]].concat());
        // An empty row with only documents longer than a row crops the earliest of the shortest.
        let (inputs, _) = pack(&mut p, 1).unwrap();
        assert_eq!(inputs, as_row(&[&t[11..18]]));
        let s = p.stats();
        assert_eq!((s.docs_placed, s.docs_cropped, s.tokens_cropped, s.tokens_padded), (4, 1, 1, 6));
        assert_eq!(s.tokens_in, s.tokens_placed + s.tokens_cropped + p.tokens_buffered() as u64);
    }

    #[test]
    fn pad_mode_pads_the_last_row_after_finish() {
        let mut p = pad_packer(7, 2);
        let (t, o) = flat(&[3]);
        p.push(&t, &o).unwrap();
        assert!(pack(&mut p, 1).is_none(), "the stream is open and the buffer short");
        p.finish();
        let (inputs, targets) = pack(&mut p, 1).unwrap();
        assert_eq!(inputs, [&as_row(&[&t[..]])[..], &[i64::from(BOS); 4]].concat());
        assert_eq!(targets, [&as_row(&[&t[1..]])[..], &[-1; 5]].concat());
        assert!(pack(&mut p, 1).is_none(), "nothing is left");
        assert_eq!(p.stats().tokens_padded, 5);
    }

    #[test]
    fn masked_tokens_are_not_targets() {
        for mode in [PackMode::Crop, PackMode::Pad] {
            let config = PackerConfig::new(5, 1, 0, Some(BOS)).unwrap().with_mode(mode).unwrap();
            let mut p = Packer::new(config).unwrap();
            let (t, o) = flat(&[3, 3]);
            p.push_masked(&t, &o, Some(&[0, 0, 1, 0, 1, 0])).unwrap();
            p.finish();
            let (inputs, targets) = pack(&mut p, 1).unwrap();
            let row = as_row(&[&t[..]]);
            assert_eq!(inputs, row[..5]);
            // Targets are row[1..]: masks [0, 1, 0, 1, 0] for tokens 1..6.
            assert_eq!(targets, [-1, row[2], -1, row[4], -1], "{mode:?}");
        }
    }

    #[test]
    fn bad_masks_change_nothing() {
        let mut p = packer(8, 2, 0);
        let (t, o) = flat(&[2, 3]);
        let too_short = p.push_masked(&t, &o, Some(&[1; 4]));
        assert!(matches!(too_short, Err(PackError::InvalidMask(_))), "{too_short:?}");
        let not_binary = p.push_masked(&t, &o, Some(&[1, 1, 0, 2, 1]));
        assert!(matches!(not_binary, Err(PackError::InvalidMask(_))), "{not_binary:?}");
        assert_eq!(p.docs_pending(), 0);
        assert_eq!(p.stats(), Stats::default());
    }

    #[test]
    fn a_bad_mask_value_is_named_wherever_it_is() {
        // Long enough that the mask check runs over whole vector chunks before the bad value.
        let (t, o) = flat(&[300, 400]);
        for (index, value) in [(0, 2u8), (517, 255), (699, 3)] {
            let mut mask = vec![1u8; t.len()];
            mask[index] = value;
            let err = packer(8, 2, 0).push_masked(&t, &o, Some(&mask));
            let expected = format!("mask values must be 0 or 1, got {value} at index {index}");
            assert_eq!(err, Err(PackError::InvalidMask(expected)));
        }
    }

    #[test]
    fn padding_counter_never_wraps() {
        let config = PackerConfig::new(4, 1, 0, Some(BOS)).unwrap().with_mode(PackMode::Pad).unwrap();
        let stats = Stats { tokens_padded: u64::MAX - 3, ..Stats::default() };
        let mut p = Packer::from_parts(config, stats, false, Vec::new(), Vec::new());
        let (t, o) = flat(&[2, 2]);
        p.push(&t, &o).unwrap();
        let (mut inputs, mut targets) = (vec![0; 4], vec![0; 4]);
        assert!(matches!(p.pack_into(&mut inputs, &mut targets), Err(PackError::CounterOverflow(_))));
        assert_eq!(p.docs_pending(), 2, "nothing was packed");
    }

    #[test]
    fn audio_prefix_targets() {
        let mut p = packer(6, 1, 2);
        let (t, o) = flat(&[5]);
        p.push(&t, &o).unwrap();
        p.finish();
        let (inputs, targets) = pack(&mut p, 1).unwrap();
        let row: Vec<i64> = t.iter().map(|&x| i64::from(x)).collect();
        assert_eq!(inputs, row[..4]);
        assert_eq!(targets[..2], [-1, -1]);
        assert_eq!(targets[2..], row[1..]);
    }

    #[test]
    fn dry_stream_rolls_back_exactly() {
        // Capacity 8, buffer 3, five documents of 4: a row takes two documents and each placement
        // needs a full buffer, so the second row's second placement finds the stream dry.
        let mut p = packer(7, 3, 0);
        let (t, o) = flat(&[4, 4, 4, 4, 4]);
        p.push(&t, &o).unwrap();
        let before = format!("{p:?}");
        assert!(pack(&mut p, 2).is_none());
        assert_eq!(format!("{p:?}"), before);
        assert!(pack(&mut p, 1).is_some());
        assert!(pack(&mut p, 1).is_none());
        p.finish();
        assert!(pack(&mut p, 1).is_some());
        // One document is left: it cannot fill a row, so the batch fails and it stays buffered.
        let before = format!("{p:?}");
        assert!(pack(&mut p, 1).is_none());
        assert_eq!(format!("{p:?}"), before);
        assert_eq!(p.docs_buffered() + p.docs_pending(), 1);
    }

    #[test]
    fn counters_never_wrap() {
        let (t, o) = flat(&[3, 2]);
        let near_max = |stats: Stats| {
            let config = PackerConfig::new(4, 1, 0, Some(BOS)).unwrap();
            Packer::from_parts(config, stats, false, Vec::new(), Vec::new())
        };
        let full = u64::MAX - 1;
        let cases = [
            Stats { docs_in: full, docs_placed: full, ..Stats::default() },
            Stats { tokens_in: u64::MAX - 4, tokens_placed: u64::MAX - 4, ..Stats::default() },
        ];
        for stats in cases {
            let mut p = near_max(stats);
            let before = format!("{p:?}");
            assert!(matches!(p.push(&t, &o), Err(PackError::CounterOverflow(_))));
            assert_eq!(format!("{p:?}"), before, "a failed push changes nothing");
        }
        let mut p = near_max(Stats { rows_packed: u64::MAX, ..Stats::default() });
        p.push(&t, &o).unwrap();
        let (mut inputs, mut targets) = (vec![0; 4], vec![0; 4]);
        assert!(matches!(p.pack_into(&mut inputs, &mut targets), Err(PackError::CounterOverflow(_))));
        assert_eq!(p.docs_pending(), 2, "nothing was packed");
    }

    #[test]
    fn wrong_batch_shapes_are_errors() {
        let mut p = packer(4, 1, 1);
        let mut a = vec![0i64; 3];
        let mut b = vec![0i64; 3];
        assert!(matches!(p.pack_into(&mut a, &mut b), Err(PackError::BatchShape(_))));
        let mut empty: Vec<i64> = vec![];
        assert!(matches!(p.pack_into(&mut empty, &mut b), Err(PackError::BatchShape(_))));
        // rows * seq_len overflows usize here; it must be a shape error, not an overflow panic.
        let mut huge = packer(usize::MAX / 2, 1, usize::MAX / 2 - 1);
        let mut inputs = vec![0i64; 3];
        assert!(matches!(huge.pack_into(&mut inputs, &mut b), Err(PackError::BatchShape(_))));
    }
}
