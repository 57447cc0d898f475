//! Differential property tests: the packer against a slow, obviously-correct list-scan reference.

use nanochat_packer::{PackError, Packer, PackerConfig, PackerState};
use proptest::prelude::*;

const BOS: u32 = 7;

/// The rules, written as directly as possible: a buffer in arrival order, scanned linearly.
struct Reference {
    config: PackerConfig,
    pending: std::collections::VecDeque<Vec<u32>>,
    buffer: Vec<Vec<u32>>,
    finished: bool,
}

impl Reference {
    fn new(config: PackerConfig) -> Self {
        Reference { config, pending: Default::default(), buffer: Vec::new(), finished: false }
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

    /// One full row of `row_capacity` tokens, or None (and no change) when the stream runs dry.
    fn row(&mut self) -> Option<Vec<u32>> {
        let (saved_pending, saved_buffer) = (self.pending.clone(), self.buffer.clone());
        let capacity = self.config.row_capacity();
        let mut row = Vec::new();
        while row.len() < capacity {
            if !self.ready() {
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
            row.extend_from_slice(&doc[..doc.len().min(remaining)]);
        }
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

fn expected_views(config: &PackerConfig, row: &[u32]) -> (Vec<i64>, Vec<i64>) {
    let row: Vec<i64> = row.iter().map(|&t| i64::from(t)).collect();
    let mut targets = vec![-1i64; config.audio_prefix_len];
    targets.extend_from_slice(&row[1..]);
    (row[..config.text_len()].to_vec(), targets)
}

#[derive(Debug, Clone)]
struct Scenario {
    config: PackerConfig,
    /// Document lengths for each push.
    pushes: Vec<Vec<usize>>,
    batch: usize,
}

fn scenario() -> impl Strategy<Value = Scenario> {
    (1usize..24, 0usize..4, 1usize..6, 1usize..4)
        .prop_flat_map(|(text_len, audio, buffer_size, batch)| {
            let lengths = proptest::collection::vec(1usize..3 * text_len + 4, 0..12);
            (Just((text_len, audio, buffer_size, batch)), proptest::collection::vec(lengths, 1..6))
        })
        .prop_map(|((text_len, audio, buffer_size, batch), pushes)| Scenario {
            config: PackerConfig::new(text_len + audio, buffer_size, audio, Some(BOS)).unwrap(),
            pushes,
            batch,
        })
}

fn try_batch(p: &mut Packer, batch: usize) -> Option<(Vec<i64>, Vec<i64>)> {
    let config = *p.config();
    let mut inputs = vec![i64::MIN; batch * config.text_len()];
    let mut targets = vec![i64::MIN; batch * config.seq_len];
    p.pack_into(&mut inputs, &mut targets).unwrap().then_some((inputs, targets))
}

fn reference_batch(r: &mut Reference, batch: usize) -> Option<(Vec<i64>, Vec<i64>)> {
    let (saved_pending, saved_buffer) = (r.pending.clone(), r.buffer.clone());
    let (mut inputs, mut targets) = (Vec::new(), Vec::new());
    for _ in 0..batch {
        let Some(row) = r.row() else {
            r.pending = saved_pending;
            r.buffer = saved_buffer;
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
        pushed += docs.len();
        let (tokens, offsets) = flatten(&docs);
        p.push(&tokens, &offsets).unwrap();
        r.pending.extend(docs);
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
        let single = Scenario { pushes: lengths.iter().map(|&l| vec![l]).collect(), ..s.clone() };
        let all_at_once = Scenario { pushes: vec![lengths], ..s };
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
        buffer: vec![(0, vec![BOS])],
        pending: vec![],
    };
    assert!(matches!(Packer::from_state(state), Err(PackError::InvalidState(_))));
}
