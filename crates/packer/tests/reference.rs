//! Differential property tests: the packer against a slow, obviously-correct list-scan reference.

use nanochat_packer::{PackError, PackMode, Packer, PackerConfig, PackerState};
use proptest::prelude::*;

const BOS: u32 = 7;

/// A document as the reference sees it: `(token, mask)` pairs.
type RefDoc = Vec<(u32, u8)>;

/// The rules, written as directly as possible: a buffer in arrival order, scanned linearly.
struct Reference {
    config: PackerConfig,
    pending: std::collections::VecDeque<RefDoc>,
    buffer: Vec<RefDoc>,
    finished: bool,
    /// Padding positions in the rows produced so far.
    padded: u64,
}

impl Reference {
    fn new(config: PackerConfig) -> Self {
        Reference { config, pending: Default::default(), buffer: Vec::new(), finished: false, padded: 0 }
    }

    fn ready(&mut self) -> bool {
        while self.buffer.len() < self.config.buffer_size {
            match self.pending.pop_front() {
                Some(doc) => self.buffer.push(doc),
                None => break,
            }
        }
        if self.finished {
            !self.buffer.is_empty()
        } else {
            self.buffer.len() == self.config.buffer_size
        }
    }

    /// One full row of `row_capacity` positions (`None`: padding), or None (and no change) when
    /// the stream runs dry.
    fn row(&mut self) -> Option<Vec<Option<(u32, u8)>>> {
        let (saved_pending, saved_buffer) = (self.pending.clone(), self.buffer.clone());
        let capacity = self.config.row_capacity();
        let pad = self.config.mode == PackMode::Pad;
        let mut row = Vec::new();
        while row.len() < capacity {
            if !self.ready() {
                if pad && self.finished && !row.is_empty() {
                    row.resize(capacity, None);
                    break;
                }
                self.pending = saved_pending;
                self.buffer = saved_buffer;
                return None;
            }
            let remaining = capacity - row.len();
            let mut best: Option<usize> = None;
            for (i, doc) in self.buffer.iter().enumerate() {
                if doc.len() <= remaining && best.is_none_or(|b| doc.len() > self.buffer[b].len()) {
                    best = Some(i);
                }
            }
            if best.is_none() && pad && !row.is_empty() {
                row.resize(capacity, None);
                break;
            }
            let index = best.unwrap_or_else(|| {
                let mut shortest = 0;
                for (i, doc) in self.buffer.iter().enumerate() {
                    if doc.len() < self.buffer[shortest].len() {
                        shortest = i;
                    }
                }
                shortest
            });
            let doc = self.buffer.remove(index);
            row.extend(doc[..doc.len().min(remaining)].iter().copied().map(Some));
        }
        self.padded += row.iter().filter(|p| p.is_none()).count() as u64;
        Some(row)
    }
}

/// Documents with distinct tokens: document `i` is BOS then 1000 * (i + 1) + j.
fn docs_from_lengths(lengths: &[usize], first_index: usize) -> Vec<Vec<u32>> {
    lengths
        .iter()
        .enumerate()
        .map(|(i, &len)| {
            let id = (first_index + i + 1) as u32;
            std::iter::once(BOS).chain((1..len as u32).map(|j| 1000 * id + j)).collect()
        })
        .collect()
}

fn flatten(docs: &[Vec<u32>]) -> (Vec<u32>, Vec<i64>) {
    let mut offsets = vec![0i64];
    for d in docs {
        offsets.push(offsets.last().unwrap() + d.len() as i64);
    }
    (docs.concat(), offsets)
}

/// The mask of token `j` of document `id` in a masked push: a fixed, irregular 0/1 pattern.
fn mask_bit(id: usize, j: usize) -> u8 {
    u8::from((id * 7 + j * 3) % 5 < 3)
}

fn expected_views(config: &PackerConfig, row: &[Option<(u32, u8)>]) -> (Vec<i64>, Vec<i64>) {
    let inputs = row[..config.text_len()].iter().map(|p| p.map_or(i64::from(BOS), |(t, _)| i64::from(t))).collect();
    let mut targets = vec![-1i64; config.audio_prefix_len];
    targets.extend(row[1..].iter().map(|p| match *p {
        Some((t, 1)) => i64::from(t),
        _ => -1,
    }));
    (inputs, targets)
}

#[derive(Debug, Clone)]
struct Scenario {
    config: PackerConfig,
    /// Document lengths for each push.
    pushes: Vec<Vec<usize>>,
    /// Whether each push carries a loss mask (cycled over the pushes).
    masked: Vec<bool>,
    batch: usize,
}

fn scenario() -> impl Strategy<Value = Scenario> {
    let modes = prop_oneof![Just(PackMode::Crop), Just(PackMode::Pad)];
    let masked = prop_oneof![Just(vec![false]), Just(vec![true]), Just(vec![true, false])];
    (1usize..24, 0usize..4, 1usize..6, 1usize..4, modes, masked)
        .prop_flat_map(|(text_len, audio, buffer_size, batch, mode, masked)| {
            let lengths = proptest::collection::vec(1usize..3 * text_len + 4, 0..12);
            (Just((text_len, audio, buffer_size, batch, mode, masked)), proptest::collection::vec(lengths, 1..6))
        })
        .prop_map(|((text_len, audio, buffer_size, batch, mode, masked), pushes)| {
            // Pad mode takes no audio prefix.
            let audio = if mode == PackMode::Pad { 0 } else { audio };
            let config = PackerConfig::new(text_len + audio, buffer_size, audio, Some(BOS)).unwrap();
            Scenario { config: config.with_mode(mode).unwrap(), pushes, masked, batch }
        })
}

fn try_batch(p: &mut Packer, batch: usize) -> Option<(Vec<i64>, Vec<i64>)> {
    let config = *p.config();
    let mut inputs = vec![i64::MIN; batch * config.text_len()];
    let mut targets = vec![i64::MIN; batch * config.seq_len];
    p.pack_into(&mut inputs, &mut targets).unwrap().then_some((inputs, targets))
}

fn reference_batch(r: &mut Reference, batch: usize) -> Option<(Vec<i64>, Vec<i64>)> {
    let (saved_pending, saved_buffer, saved_padded) = (r.pending.clone(), r.buffer.clone(), r.padded);
    let (mut inputs, mut targets) = (Vec::new(), Vec::new());
    for _ in 0..batch {
        let Some(row) = r.row() else {
            r.pending = saved_pending;
            r.buffer = saved_buffer;
            r.padded = saved_padded;
            return None;
        };
        let (i, t) = expected_views(&r.config, &row);
        inputs.extend(i);
        targets.extend(t);
    }
    Some((inputs, targets))
}

/// Push each group, pack batches until the packer reports a dry stream, and at the end finish and
/// drain. Returns every batch produced; checks each one against the reference on the way.
fn run_against_reference(s: &Scenario, mut after_batch: impl FnMut(&mut Packer)) -> Vec<(Vec<i64>, Vec<i64>)> {
    let mut p = Packer::new(s.config).unwrap();
    let mut r = Reference::new(s.config);
    let mut produced = Vec::new();
    let mut pushed = 0;
    for (k, lengths) in s.pushes.iter().enumerate() {
        let docs = docs_from_lengths(lengths, pushed);
        let (tokens, offsets) = flatten(&docs);
        if s.masked[k % s.masked.len()] {
            let masks: Vec<Vec<u8>> =
                docs.iter().enumerate().map(|(i, d)| (0..d.len()).map(|j| mask_bit(pushed + i, j)).collect()).collect();
            p.push_masked(&tokens, &offsets, Some(&masks.concat())).unwrap();
            r.pending.extend(docs.iter().zip(&masks).map(|(d, m)| d.iter().copied().zip(m.iter().copied()).collect()));
        } else {
            p.push(&tokens, &offsets).unwrap();
            r.pending.extend(docs.iter().map(|d| d.iter().map(|&t| (t, 1)).collect()));
        }
        pushed += docs.len();
        if k + 1 == s.pushes.len() {
            p.finish();
            r.finished = true;
        }
        loop {
            let before = p.state();
            let got = try_batch(&mut p, s.batch);
            assert_eq!(got, reference_batch(&mut r, s.batch));
            match got {
                Some(batch) => {
                    produced.push(batch);
                    after_batch(&mut p);
                }
                None => {
                    assert_eq!(p.state(), before, "a failed batch must leave the state unchanged");
                    break;
                }
            }
        }
    }
    let st = p.stats();
    let held = (p.tokens_buffered() + p.tokens_pending()) as u64;
    assert_eq!(st.tokens_in, st.tokens_placed + st.tokens_cropped + held);
    assert_eq!(st.tokens_padded, r.padded);
    produced
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(400))]

    #[test]
    fn rows_match_reference(s in scenario()) {
        run_against_reference(&s, |_| {});
    }

    #[test]
    fn state_roundtrip_resumes_identically(s in scenario()) {
        let plain = run_against_reference(&s, |_| {});
        // Replace the packer by one rebuilt from its exported state after every batch.
        let resumed = run_against_reference(&s, |p| *p = Packer::from_state(p.state()).unwrap());
        prop_assert_eq!(plain, resumed);
    }

    #[test]
    fn push_granularity_does_not_matter(s in scenario()) {
        // The same documents pushed one at a time give the same rows.
        let lengths: Vec<usize> = s.pushes.concat();
        // Masks depend on the document, not the push, once every push is masked (or none is).
        let masked = vec![s.masked[0]];
        let single = Scenario { pushes: lengths.iter().map(|&l| vec![l]).collect(), masked: masked.clone(), ..s.clone() };
        let all_at_once = Scenario { pushes: vec![lengths], masked, ..s };
        prop_assert_eq!(run_against_reference(&single, |_| {}), run_against_reference(&all_at_once, |_| {}));
    }
}

#[test]
fn bad_states_do_not_load() {
    let config = PackerConfig::new(4, 2, 0, Some(BOS)).unwrap();
    let state = PackerState {
        config,
        stats: Default::default(),
        next_seq: 0,
        finished: false,
        buffer: vec![(0, vec![BOS], None)],
        pending: vec![],
    };
    assert!(matches!(Packer::from_state(state), Err(PackError::InvalidState(_))));
}
