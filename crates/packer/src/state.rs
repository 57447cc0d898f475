//! Export and import of the complete packer state, so a resumed run packs identical rows.
//!
//! Buffered and pending documents are kept whole (a placed or cropped document leaves the packer
//! entirely), so the state is: the configuration, the counters, the end-of-stream flag and the
//! tokens of every document still held, with their arrival numbers.

use crate::buffer::Doc;
use crate::packer::{Packer, PackerConfig, Stats};
use crate::PackError;

/// Everything needed to rebuild a [`Packer`] that behaves exactly like the exported one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PackerState {
    pub config: PackerConfig,
    pub stats: Stats,
    /// Arrival number the next pushed document gets; always `stats.docs_in`.
    pub next_seq: u64,
    pub finished: bool,
    /// Buffered documents as `(arrival number, tokens)`, in arrival order.
    pub buffer: Vec<(u64, Vec<u32>)>,
    /// Pending documents in arrival order; their arrival numbers are the last
    /// `pending.len()` before `next_seq`.
    pub pending: Vec<Vec<u32>>,
}

impl Packer {
    /// A copy of the full state.
    pub fn state(&self) -> PackerState {
        PackerState {
            config: *self.config(),
            stats: self.stats(),
            next_seq: self.next_seq(),
            finished: self.is_finished(),
            buffer: self.buffered_docs().into_iter().map(|(seq, t)| (seq, t.to_vec())).collect(),
            pending: self.pending_docs().map(|(_, t)| t.to_vec()).collect(),
        }
    }

    /// Rebuild a packer from a state, after checking that it is one a packer could have been in.
    pub fn from_state(state: PackerState) -> Result<Packer, PackError> {
        state.validate()?;
        let first_pending = state.next_seq - state.pending.len() as u64;
        let buffer = state.buffer.into_iter().map(|(seq, t)| Doc { seq, tokens: t.into_boxed_slice() }).collect();
        let pending = state
            .pending
            .into_iter()
            .enumerate()
            .map(|(i, t)| Doc { seq: first_pending + i as u64, tokens: t.into_boxed_slice() })
            .collect();
        Ok(Packer::from_parts(state.config, state.stats, state.finished, buffer, pending))
    }
}

fn invalid(msg: impl Into<String>) -> PackError {
    PackError::InvalidState(msg.into())
}

impl PackerState {
    /// Check internal consistency (never trust a state file: it may be edited or truncated).
    pub fn validate(&self) -> Result<(), PackError> {
        self.config.validate().map_err(|e| invalid(e.to_string()))?;
        if self.next_seq != self.stats.docs_in {
            return Err(invalid(format!(
                "next_seq ({}) must equal docs_in ({})",
                self.next_seq, self.stats.docs_in
            )));
        }
        if self.buffer.len() > self.config.buffer_size {
            return Err(invalid(format!(
                "{} buffered documents exceed buffer_size {}",
                self.buffer.len(),
                self.config.buffer_size
            )));
        }
        let first_pending = self
            .next_seq
            .checked_sub(self.pending.len() as u64)
            .ok_or_else(|| invalid("more pending documents than documents pushed"))?;
        self.validate_arrival_order(first_pending)?;
        self.validate_documents()?;
        self.validate_accounting()
    }

    fn validate_arrival_order(&self, first_pending: u64) -> Result<(), PackError> {
        for w in self.buffer.windows(2) {
            if w[1].0 <= w[0].0 {
                return Err(invalid("buffered documents must be listed in increasing arrival order"));
            }
        }
        if let Some(&(last, _)) = self.buffer.last() {
            if last >= first_pending {
                return Err(invalid(format!(
                    "buffered document {last} did not arrive before the pending ones (from {first_pending})"
                )));
            }
        }
        Ok(())
    }

    fn validate_documents(&self) -> Result<(), PackError> {
        let docs = self.buffer.iter().map(|(_, t)| t).chain(&self.pending);
        for (i, tokens) in docs.enumerate() {
            match (tokens.first(), self.config.bos_token_id) {
                (None, _) => return Err(invalid(format!("held document {i} is empty"))),
                (Some(&first), Some(bos)) if first != bos => {
                    return Err(invalid(format!("held document {i} starts with {first}, not BOS {bos}")))
                }
                _ => {}
            }
        }
        Ok(())
    }

    fn validate_accounting(&self) -> Result<(), PackError> {
        let s = &self.stats;
        let held_docs = (self.buffer.len() + self.pending.len()) as u128;
        let docs_out = u128::from(s.docs_placed) + u128::from(s.docs_cropped);
        if u128::from(s.docs_in) != docs_out + held_docs {
            return Err(invalid(format!(
                "docs_in ({}) != docs_placed + docs_cropped + held documents ({docs_out} + {held_docs})",
                s.docs_in
            )));
        }
        let held_tokens: u128 =
            self.buffer.iter().map(|(_, t)| t.len() as u128).chain(self.pending.iter().map(|t| t.len() as u128)).sum();
        let tokens_out = u128::from(s.tokens_placed) + u128::from(s.tokens_cropped);
        if u128::from(s.tokens_in) != tokens_out + held_tokens {
            return Err(invalid(format!(
                "tokens_in ({}) != tokens_placed + tokens_cropped + held tokens ({tokens_out} + {held_tokens})",
                s.tokens_in
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn packer_with_history() -> Packer {
        let config = PackerConfig::new(5, 3, 0, Some(9)).unwrap();
        let mut p = Packer::new(config).unwrap();
        let tokens = [9, 1, 2, 9, 3, 9, 4, 5, 6, 7, 9, 8, 9];
        p.push(&tokens, &[0, 3, 5, 10, 12, 13]).unwrap();
        let (mut inputs, mut targets) = (vec![0; 5], vec![0; 5]);
        assert!(p.pack_into(&mut inputs, &mut targets).unwrap());
        p
    }

    #[test]
    fn roundtrip_preserves_everything() {
        let p = packer_with_history();
        let state = p.state();
        assert_eq!(state.next_seq, 5);
        let q = Packer::from_state(state.clone()).unwrap();
        assert_eq!(q.state(), state);
        assert_eq!(format!("{q:?}"), format!("{p:?}"));
    }

    #[test]
    fn inconsistent_states_are_rejected() {
        let good = packer_with_history().state();
        let mut cases: Vec<PackerState> = Vec::new();
        let mut s = good.clone();
        s.next_seq += 1;
        cases.push(s);
        let mut s = good.clone();
        s.stats.tokens_in += 1;
        cases.push(s);
        let mut s = good.clone();
        s.stats.docs_placed += 1;
        cases.push(s);
        let mut s = good.clone();
        s.buffer.reverse();
        cases.push(s);
        let mut s = good.clone();
        s.pending.push(vec![9]);
        cases.push(s);
        let mut s = good.clone();
        s.buffer[0].1[0] = 1;
        cases.push(s);
        let mut s = good.clone();
        s.config.buffer_size = 1;
        cases.push(s);
        let mut s = good.clone();
        s.config.audio_prefix_len = s.config.seq_len;
        cases.push(s);
        let mut s = good;
        s.buffer[0].1.clear();
        cases.push(s);
        for s in cases {
            assert!(matches!(Packer::from_state(s.clone()), Err(PackError::InvalidState(_))), "{s:?}");
        }
    }
}
