//! Export and import of the complete packer state, so a resumed run packs identical rows.
//!
//! Buffered and pending documents are kept whole (a placed or cropped document leaves the packer
//! entirely), so the state is: the configuration, the counters, the end-of-stream flag and the
//! tokens (and loss masks) of every document still held, with their arrival numbers.
//!
//! Keys added after the first release (`mode`, `buffer_masks`, `pending_masks`,
//! `stats['tokens_padded']`) are optional on load, so older states still load: as crop mode,
//! without masks, with nothing padded.
//!
//! This module is the one place that knows the state's schema and checks it: a state arrives as a
//! [`Value`] (the JSON data model, which is what the Python `state_dict` is made of) and is turned
//! into a [`PackerState`] by [`PackerState::from_value`], which checks every key's presence, type
//! and range; [`PackerState::validate`] then checks that the whole is a state a packer could have
//! been in, with room left for the counters to grow.

use std::collections::HashMap;
use std::sync::Arc;

use crate::buffer::{Doc, DocRef};
use crate::codec;
use crate::packer::{PackMode, Packer, PackerConfig, Stats};
use crate::PackError;

/// Identifies a state produced by this crate (checked on load).
pub const STATE_FORMAT: &str = "nanochat_rs.BestFitPacker";
pub const STATE_VERSION: u32 = 1;

/// Counters of a loaded state may not exceed this: a resumed run keeps at least 2^63 to count
/// on before `u64` would wrap (and every counter stays exact in an `int64`).
pub const COUNTER_LIMIT: u64 = i64::MAX as u64;

/// A value of the JSON data model: what the state is made of on the Python side.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value {
    Null,
    Bool(bool),
    Int(i128),
    /// An integer outside the range of `i128`, as decimal text (no field accepts one).
    BigInt(String),
    Str(Arc<str>),
    List(Vec<Value>),
    /// Entries in order; keys are unique when the value comes from a dict.
    Map(Vec<(String, Value)>),
    /// Anything else, by its type name; always a type error.
    Other(String),
}

impl Value {
    /// The Python name of the type, for error messages.
    pub fn type_name(&self) -> &str {
        match self {
            Value::Null => "NoneType",
            Value::Bool(_) => "bool",
            Value::Int(_) | Value::BigInt(_) => "int",
            Value::Str(_) => "str",
            Value::List(_) => "list",
            Value::Map(_) => "dict",
            Value::Other(name) => name,
        }
    }

    /// The value as it reads in a message: scalars as Python would show them, the rest by type.
    pub fn describe(&self) -> String {
        match self {
            Value::Null => "None".into(),
            Value::Bool(b) => if *b { "True" } else { "False" }.into(),
            Value::Int(v) => v.to_string(),
            Value::BigInt(text) => text.clone(),
            Value::Str(s) => format!("{:?}", &**s),
            other => format!("a {}", other.type_name()),
        }
    }

    fn get<'v>(entries: &'v [(String, Value)], key: &str) -> Option<&'v Value> {
        entries.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }
}

/// Everything needed to rebuild a [`Packer`] that behaves exactly like the exported one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PackerState {
    pub config: PackerConfig,
    pub stats: Stats,
    /// Arrival number the next pushed document gets; always `stats.docs_in`.
    pub next_seq: u64,
    pub finished: bool,
    /// Buffered documents as `(arrival number, tokens, mask)`, in arrival order.
    pub buffer: Vec<(u64, Vec<u32>, Option<Vec<u8>>)>,
    /// Pending documents as `(tokens, mask)` in arrival order; their arrival numbers are the last
    /// `pending.len()` before `next_seq`.
    pub pending: Vec<(Vec<u32>, Option<Vec<u8>>)>,
}

/// The encoded text of one held document: its tokens and, when it has one, its mask.
type DocText = (Arc<str>, Option<Arc<str>>);

/// Base64 text of the documents a packer holds, by arrival number, kept between exports: a
/// document stays in the packer for many batches and a state is taken after every batch, so
/// re-encoding every held document each time would dominate the cost of a checkpoint.
#[derive(Debug, Clone, Default)]
pub struct DocTexts {
    by_seq: HashMap<u64, DocText>,
}

impl DocTexts {
    /// Number of documents whose text is kept.
    pub fn len(&self) -> usize {
        self.by_seq.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_seq.is_empty()
    }
}

const KEYS: [&str; 12] = [
    "format",
    "version",
    "seq_len",
    "buffer_size",
    "audio_prefix_len",
    "bos_token_id",
    "finished",
    "next_seq",
    "stats",
    "buffer_seqs",
    "buffer_docs",
    "pending_docs",
];

fn invalid(msg: impl Into<String>) -> PackError {
    PackError::InvalidState(msg.into())
}

fn wrong_type(path: &str, expected: &str, got: &Value) -> PackError {
    PackError::StateType(format!("{path} must be {expected}, got {}", got.type_name()))
}

fn uint(path: &str, value: &Value, max: u64) -> Result<u64, PackError> {
    let out_of_range = |shown: &dyn std::fmt::Display| invalid(format!("{path} must be in 0..={max}, got {shown}"));
    match value {
        Value::Int(v) => u64::try_from(*v).ok().filter(|&v| v <= max).ok_or_else(|| out_of_range(v)),
        Value::BigInt(text) => Err(out_of_range(text)),
        other => Err(wrong_type(path, "an int", other)),
    }
}

fn usize_field(path: &str, value: &Value) -> Result<usize, PackError> {
    let max = u64::try_from(usize::MAX).unwrap_or(u64::MAX);
    // In range by the bound just checked.
    uint(path, value, max).map(|v| usize::try_from(v).unwrap_or(usize::MAX))
}

fn list<'v>(path: &str, value: &'v Value) -> Result<&'v [Value], PackError> {
    match value {
        Value::List(items) => Ok(items),
        other => Err(wrong_type(path, "a list", other)),
    }
}

fn strings(path: &str, value: &Value) -> Result<Vec<Arc<str>>, PackError> {
    list(path, value)?
        .iter()
        .enumerate()
        .map(|(i, item)| match item {
            Value::Str(s) => Ok(s.clone()),
            other => Err(wrong_type(&format!("{path}[{i}]"), "str", other)),
        })
        .collect()
}

/// A decoded mask with the text it came from.
type MaskEntry = (Option<Vec<u8>>, Option<Arc<str>>);

/// The masks of `count` documents under `key`: absent (a state from before masks) means none.
fn masks(path: &str, value: Option<&Value>, count: usize) -> Result<Vec<MaskEntry>, PackError> {
    let Some(value) = value else { return Ok(vec![(None, None); count]) };
    let items = list(path, value)?;
    if items.len() != count {
        return Err(invalid(format!("{path} has {} entries for {count} documents", items.len())));
    }
    items
        .iter()
        .enumerate()
        .map(|(i, item)| match item {
            Value::Null => Ok((None, None)),
            Value::Str(text) => codec::decode_mask(text)
                .map(|m| (Some(m), Some(text.clone())))
                .map_err(|e| invalid(format!("{path}[{i}] is not an encoded mask: {e}"))),
            other => Err(wrong_type(&format!("{path}[{i}]"), "str or None", other)),
        })
        .collect()
}

fn decode_all(name: &str, texts: &[Arc<str>]) -> Result<Vec<Vec<u32>>, PackError> {
    texts
        .iter()
        .enumerate()
        .map(|(i, t)| {
            codec::decode_tokens(t).map_err(|e| invalid(format!("{name}[{i}] is not an encoded document: {e}")))
        })
        .collect()
}

impl PackerState {
    /// Parse a state exported by [`Packer::state_value`], checking every key's type and range
    /// (wrong types are [`PackError::StateType`], everything else [`PackError::InvalidState`]).
    /// Also returns the encoded text of the buffered then the pending documents, as given.
    pub fn from_value(value: &Value) -> Result<(PackerState, Vec<DocText>), PackError> {
        let Value::Map(entries) = value else {
            return Err(PackError::StateType(format!(
                "state must be a dict from state_dict(), got {}",
                value.type_name()
            )));
        };
        let missing: Vec<&str> = KEYS.into_iter().filter(|k| Value::get(entries, k).is_none()).collect();
        if !missing.is_empty() {
            return Err(invalid(format!("not a packer state: missing keys {missing:?}")));
        }
        let field = |key: &str| Value::get(entries, key).unwrap_or(&Value::Null);
        let path = |key: &str| format!("state['{key}']");

        let (format, version) = (field("format"), field("version"));
        let expected_version = i128::from(STATE_VERSION);
        if !matches!(format, Value::Str(f) if **f == *STATE_FORMAT) || *version != Value::Int(expected_version) {
            return Err(invalid(format!(
                "not a packer state of format {STATE_FORMAT:?} version {STATE_VERSION}: got {} version {}",
                format.describe(),
                version.describe()
            )));
        }
        let bos_token_id = match field("bos_token_id") {
            Value::Null => None,
            v => Some(uint(&path("bos_token_id"), v, u64::from(u32::MAX))? as u32),
        };
        let config = PackerConfig {
            seq_len: usize_field(&path("seq_len"), field("seq_len"))?,
            buffer_size: usize_field(&path("buffer_size"), field("buffer_size"))?,
            audio_prefix_len: usize_field(&path("audio_prefix_len"), field("audio_prefix_len"))?,
            bos_token_id,
            mode: match Value::get(entries, "mode") {
                None => PackMode::Crop,
                Some(Value::Str(name)) => PackMode::from_name(name).map_err(|e| invalid(format!("state['mode']: {e}")))?,
                Some(other) => return Err(wrong_type(&path("mode"), "a str", other)),
            },
        };
        let finished = match field("finished") {
            Value::Bool(b) => *b,
            other => return Err(wrong_type(&path("finished"), "a bool", other)),
        };
        let next_seq = uint(&path("next_seq"), field("next_seq"), u64::MAX)?;
        let stats = match field("stats") {
            Value::Map(stat_entries) => {
                let names = Stats::default().named().map(|(name, _)| name);
                Stats::from_named(|name| match Value::get(stat_entries.as_slice(), name) {
                    Some(v) => uint(&format!("state['stats']['{name}']"), v, u64::MAX),
                    // States saved before pad mode existed padded nothing.
                    None if name == "tokens_padded" => Ok(0),
                    None => Err(invalid(format!("state['stats'] must be a dict with keys {names:?}"))),
                })?
            }
            other => return Err(wrong_type(&path("stats"), "a dict", other)),
        };
        let buffer_seqs = list(&path("buffer_seqs"), field("buffer_seqs"))?
            .iter()
            .enumerate()
            .map(|(i, v)| uint(&format!("state['buffer_seqs'][{i}]"), v, u64::MAX))
            .collect::<Result<Vec<u64>, PackError>>()?;
        let buffer_texts = strings(&path("buffer_docs"), field("buffer_docs"))?;
        let pending_texts = strings(&path("pending_docs"), field("pending_docs"))?;
        if buffer_seqs.len() != buffer_texts.len() {
            return Err(invalid(format!(
                "buffer_seqs has {} entries but buffer_docs has {}",
                buffer_seqs.len(),
                buffer_texts.len()
            )));
        }
        let buffer_masks = masks(&path("buffer_masks"), Value::get(entries, "buffer_masks"), buffer_texts.len())?;
        let pending_masks = masks(&path("pending_masks"), Value::get(entries, "pending_masks"), pending_texts.len())?;
        let buffer_tokens = decode_all("buffer_docs", &buffer_texts)?;
        let pending_tokens = decode_all("pending_docs", &pending_texts)?;
        let mut texts = Vec::with_capacity(buffer_texts.len() + pending_texts.len());
        let mut buffer = Vec::with_capacity(buffer_texts.len());
        for (((seq, tokens), text), (mask, mask_text)) in
            buffer_seqs.into_iter().zip(buffer_tokens).zip(buffer_texts).zip(buffer_masks)
        {
            buffer.push((seq, tokens, mask));
            texts.push((text, mask_text));
        }
        let mut pending = Vec::with_capacity(pending_texts.len());
        for ((tokens, text), (mask, mask_text)) in pending_tokens.into_iter().zip(pending_texts).zip(pending_masks) {
            pending.push((tokens, mask));
            texts.push((text, mask_text));
        }
        Ok((PackerState { config, stats, next_seq, finished, buffer, pending }, texts))
    }

    /// Check internal consistency (never trust a state file: it may be edited or truncated).
    pub fn validate(&self) -> Result<(), PackError> {
        self.config.validate().map_err(|e| invalid(e.to_string()))?;
        self.validate_headroom()?;
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

    /// A state whose counters are near `u64::MAX` would wrap them within a few pushes; a wrapped
    /// arrival number collides with a held document's and silently replaces it.
    fn validate_headroom(&self) -> Result<(), PackError> {
        let counters = self.stats.named().into_iter().chain([("next_seq", self.next_seq)]);
        for (name, value) in counters {
            if value > COUNTER_LIMIT {
                return Err(invalid(format!(
                    "{name} = {value} leaves no headroom: a loaded state's counters must be at most {COUNTER_LIMIT}"
                )));
            }
        }
        Ok(())
    }

    fn validate_arrival_order(&self, first_pending: u64) -> Result<(), PackError> {
        for w in self.buffer.windows(2) {
            if w[1].0 <= w[0].0 {
                return Err(invalid("buffered documents must be listed in increasing arrival order"));
            }
        }
        if let Some(&(last, _, _)) = self.buffer.last() {
            if last >= first_pending {
                return Err(invalid(format!(
                    "buffered document {last} did not arrive before the pending ones (from {first_pending})"
                )));
            }
        }
        Ok(())
    }

    fn validate_documents(&self) -> Result<(), PackError> {
        let docs = self.buffer.iter().map(|(_, t, m)| (t, m)).chain(self.pending.iter().map(|(t, m)| (t, m)));
        for (i, (tokens, mask)) in docs.enumerate() {
            if let Some(mask) = mask {
                if mask.len() != tokens.len() {
                    return Err(invalid(format!(
                        "held document {i} has {} tokens but a mask of {}",
                        tokens.len(),
                        mask.len()
                    )));
                }
                if mask.iter().any(|&m| m > 1) {
                    return Err(invalid(format!("held document {i} has a mask value other than 0 or 1")));
                }
            }
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
            self.buffer.iter().map(|(_, t, _)| t.len() as u128).chain(self.pending.iter().map(|(t, _)| t.len() as u128)).sum();
        let tokens_out = u128::from(s.tokens_placed) + u128::from(s.tokens_cropped);
        if u128::from(s.tokens_in) != tokens_out + held_tokens {
            return Err(invalid(format!(
                "tokens_in ({}) != tokens_placed + tokens_cropped + held tokens ({tokens_out} + {held_tokens})",
                s.tokens_in
            )));
        }
        // Padding only ever fills positions of packed rows, and only in pad mode.
        let most_padding = match self.config.mode {
            PackMode::Crop => 0,
            PackMode::Pad => u128::from(s.rows_packed) * self.config.row_capacity() as u128,
        };
        if u128::from(s.tokens_padded) > most_padding {
            return Err(invalid(format!(
                "tokens_padded ({}) exceeds the {most_padding} positions a {} packer could have padded",
                s.tokens_padded,
                self.config.mode.name()
            )));
        }
        Ok(())
    }
}

fn int(v: impl Into<i128>) -> Value {
    Value::Int(v.into())
}

fn size(v: usize) -> Value {
    Value::Int(v as i128)
}

impl Packer {
    /// A copy of the full state.
    pub fn state(&self) -> PackerState {
        PackerState {
            config: *self.config(),
            stats: self.stats(),
            next_seq: self.next_seq(),
            finished: self.is_finished(),
            buffer: self.buffered_docs().into_iter().map(|(seq, t, m)| (seq, t.to_vec(), m.map(<[u8]>::to_vec))).collect(),
            pending: self.pending_docs().map(|(_, t, m)| (t.to_vec(), m.map(<[u8]>::to_vec))).collect(),
        }
    }

    /// Rebuild a packer from a state, after checking that it is one a packer could have been in.
    pub fn from_state(state: PackerState) -> Result<Packer, PackError> {
        state.validate()?;
        let first_pending = state.next_seq - state.pending.len() as u64;
        let buffer = state
            .buffer
            .into_iter()
            .map(|(seq, t, m)| Doc { seq, tokens: t.into_boxed_slice(), mask: m.map(Vec::into_boxed_slice) })
            .collect();
        let pending = state
            .pending
            .into_iter()
            .enumerate()
            .map(|(i, (t, m))| Doc {
                seq: first_pending + i as u64,
                tokens: t.into_boxed_slice(),
                mask: m.map(Vec::into_boxed_slice),
            })
            .collect();
        Ok(Packer::from_parts(state.config, state.stats, state.finished, buffer, pending))
    }

    /// The full state as a [`Value`] (documents as base64, see [`codec`]). `texts` keeps the
    /// encoded documents between calls; it ends up holding exactly the documents still held.
    pub fn state_value(&self, texts: &mut DocTexts) -> Value {
        let config = self.config();
        let mut old = std::mem::take(&mut texts.by_seq);
        let mut text_of = |(seq, tokens, mask): DocRef<'_>| {
            let (text, mask_text) = old.remove(&seq).unwrap_or_else(|| {
                (codec::encode_tokens(tokens).into(), mask.map(|m| codec::encode_mask(m).into()))
            });
            texts.by_seq.insert(seq, (text.clone(), mask_text.clone()));
            (Value::Str(text), mask_text.map_or(Value::Null, Value::Str))
        };
        let buffered = self.buffered_docs();
        let buffer_seqs = buffered.iter().map(|&(seq, _, _)| int(seq)).collect();
        let (buffer_docs, buffer_masks): (Vec<Value>, Vec<Value>) = buffered.into_iter().map(&mut text_of).unzip();
        let (pending_docs, pending_masks): (Vec<Value>, Vec<Value>) = self.pending_docs().map(&mut text_of).unzip();
        let stats = self.stats().named().into_iter().map(|(name, v)| (name.to_string(), int(v))).collect();
        let entries: [(&str, Value); 15] = [
            ("format", Value::Str(STATE_FORMAT.into())),
            ("version", int(STATE_VERSION)),
            ("seq_len", size(config.seq_len)),
            ("buffer_size", size(config.buffer_size)),
            ("audio_prefix_len", size(config.audio_prefix_len)),
            ("bos_token_id", config.bos_token_id.map_or(Value::Null, int)),
            ("mode", Value::Str(config.mode.name().into())),
            ("finished", Value::Bool(self.is_finished())),
            ("next_seq", int(self.next_seq())),
            ("stats", Value::Map(stats)),
            ("buffer_seqs", Value::List(buffer_seqs)),
            ("buffer_docs", Value::List(buffer_docs)),
            ("pending_docs", Value::List(pending_docs)),
            ("buffer_masks", Value::List(buffer_masks)),
            ("pending_masks", Value::List(pending_masks)),
        ];
        Value::Map(entries.into_iter().map(|(k, v)| (k.to_string(), v)).collect())
    }

    /// Replace the whole state by `value` (from [`Packer::state_value`]), which must have been
    /// taken from a packer with this configuration. Everything is checked first: on error nothing
    /// changes. On success `texts` holds the given text of every loaded document.
    pub fn load_state_value(&mut self, value: &Value, texts: &mut DocTexts) -> Result<(), PackError> {
        let (state, given) = PackerState::from_value(value)?;
        if state.config != *self.config() {
            return Err(invalid(format!(
                "state was saved by a packer with {:?}, this packer has {:?}",
                state.config,
                self.config()
            )));
        }
        let packer = Packer::from_state(state)?;
        let seqs =
            packer.buffered_docs().into_iter().map(|(s, _, _)| s).chain(packer.pending_docs().map(|(s, _, _)| s));
        texts.by_seq = seqs.zip(given).collect();
        *self = packer;
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
    fn value_roundtrip_preserves_everything_and_reuses_texts() {
        let p = packer_with_history();
        let mut texts = DocTexts::default();
        let value = p.state_value(&mut texts);
        assert_eq!(texts.len(), p.docs_buffered() + p.docs_pending());
        let mut q = Packer::new(*p.config()).unwrap();
        let mut loaded_texts = DocTexts::default();
        q.load_state_value(&value, &mut loaded_texts).unwrap();
        assert_eq!(q.state(), p.state());
        assert_eq!(q.state_value(&mut loaded_texts), value);
        // The loaded strings themselves are reused, not re-encoded copies.
        let Value::Map(entries) = &value else { panic!("state is a map") };
        let Some(Value::List(docs)) = Value::get(entries, "buffer_docs") else { panic!("buffer_docs") };
        let Value::Str(first) = &docs[0] else { panic!("str") };
        let seq = p.buffered_docs()[0].0;
        assert!(Arc::ptr_eq(first, &loaded_texts.by_seq[&seq].0));
    }

    fn edited(value: &Value, key: &str, new: Option<Value>) -> Value {
        let Value::Map(entries) = value else { panic!("state is a map") };
        let mut entries = entries.clone();
        entries.retain(|(k, _)| k != key);
        if let Some(new) = new {
            entries.push((key.to_string(), new));
        }
        Value::Map(entries)
    }

    #[test]
    fn schema_errors_name_the_key_and_separate_types_from_values() {
        let p = packer_with_history();
        let good = p.state_value(&mut DocTexts::default());
        let type_errors = [
            ("next_seq", Value::Str("5".into()), "state['next_seq'] must be an int, got str"),
            ("finished", Value::Int(1), "state['finished'] must be a bool, got int"),
            ("pending_docs", Value::Str("AgEA".into()), "state['pending_docs'] must be a list, got str"),
            ("pending_docs", Value::List(vec![Value::Int(1)]), "state['pending_docs'][0] must be str, got int"),
            ("stats", Value::Other("float".into()), "state['stats'] must be a dict, got float"),
        ];
        for (key, value, msg) in type_errors {
            let err = PackerState::from_value(&edited(&good, key, Some(value))).unwrap_err();
            assert_eq!(err, PackError::StateType(msg.into()));
        }
        let value_errors = [
            ("next_seq", Some(Value::Int(-1)), "state['next_seq'] must be in 0..=18446744073709551615, got -1"),
            ("next_seq", Some(Value::BigInt("1".repeat(50))), "state['next_seq'] must be in 0..="),
            ("bos_token_id", Some(Value::Int(1 << 32)), "state['bos_token_id'] must be in 0..=4294967295"),
            ("buffer_docs", None, "not a packer state: missing keys [\"buffer_docs\"]"),
            ("format", Some(Value::Str("other".into())), "not a packer state of format \"nanochat_rs.BestFitPacker\" \
                version 1: got \"other\" version 1"),
            ("version", Some(Value::Null), "not a packer state of format \"nanochat_rs.BestFitPacker\" version 1: \
                got \"nanochat_rs.BestFitPacker\" version None"),
            ("stats", Some(Value::Map(vec![])), "state['stats'] must be a dict with keys"),
            ("buffer_docs", Some(Value::List(vec![])), "buffer_seqs has 2 entries but buffer_docs has 0"),
            ("pending_docs", Some(Value::List(vec![Value::Str("!".into())])), "pending_docs[0] is not an encoded"),
        ];
        for (key, value, msg) in value_errors {
            match PackerState::from_value(&edited(&good, key, value)) {
                Err(PackError::InvalidState(text)) => assert!(text.starts_with(msg), "{text} vs {msg}"),
                other => panic!("{key}: expected InvalidState({msg}), got {other:?}"),
            }
        }
        let not_a_map = PackerState::from_value(&Value::List(vec![])).unwrap_err();
        assert_eq!(not_a_map, PackError::StateType("state must be a dict from state_dict(), got list".into()));
    }

    fn masked_pad_packer_with_history() -> Packer {
        let config = PackerConfig::new(5, 3, 0, Some(9)).unwrap().with_mode(PackMode::Pad).unwrap();
        let mut p = Packer::new(config).unwrap();
        let tokens = [9, 1, 2, 9, 3, 9, 4, 5, 6, 7, 9, 8, 9];
        p.push_masked(&tokens[..10], &[0, 3, 5, 10], Some(&[0, 1, 1, 0, 1, 0, 0, 1, 1, 1])).unwrap();
        p.push(&tokens[10..], &[0, 2, 3]).unwrap();
        let (mut inputs, mut targets) = (vec![0; 5], vec![0; 5]);
        assert!(p.pack_into(&mut inputs, &mut targets).unwrap());
        p
    }

    #[test]
    fn masks_mode_and_padding_roundtrip() {
        let p = masked_pad_packer_with_history();
        assert!(p.stats().tokens_padded > 0);
        assert!(p.buffered_docs().iter().any(|&(_, _, m)| m.is_some()));
        let mut texts = DocTexts::default();
        let value = p.state_value(&mut texts);
        let mut q = Packer::new(*p.config()).unwrap();
        q.load_state_value(&value, &mut DocTexts::default()).unwrap();
        assert_eq!(q.state(), p.state());
        assert_eq!(format!("{q:?}"), format!("{p:?}"));
        let mut too_much_padding = p.state();
        too_much_padding.stats.tokens_padded = too_much_padding.stats.rows_packed * 6 + 1;
        assert!(matches!(Packer::from_state(too_much_padding), Err(PackError::InvalidState(_))));
        // A crop-mode packer must not take a pad-mode state.
        let mut crop = Packer::new(PackerConfig { mode: PackMode::Crop, ..*p.config() }).unwrap();
        let err = crop.load_state_value(&value, &mut DocTexts::default()).unwrap_err();
        assert!(err.to_string().contains("state was saved by a packer with"), "{err}");
        let bad = [
            ("mode", Value::Str("padded".into()), "state['mode']: invalid packer configuration: mode must be"),
            ("buffer_masks", Value::List(vec![]), "state['buffer_masks'] has 0 entries for 3 documents"),
            ("buffer_masks", Value::List(vec![Value::Str("Ag==".into()), Value::Null, Value::Null]), "state['buffer_masks'][0] is not an encoded mask"),
        ];
        for (key, new, msg) in bad {
            match PackerState::from_value(&edited(&value, key, Some(new))) {
                Err(PackError::InvalidState(text)) => assert!(text.starts_with(msg), "{text} vs {msg}"),
                other => panic!("{key}: expected InvalidState({msg}), got {other:?}"),
            }
        }
        let wrong = PackerState::from_value(&edited(&value, "pending_masks", Some(Value::List(vec![Value::Int(1)]))));
        assert_eq!(wrong.unwrap_err(), PackError::StateType("state['pending_masks'][0] must be str or None, got int".into()));
    }

    #[test]
    fn states_from_before_masks_load_as_crop_mode() {
        let p = packer_with_history();
        let mut value = p.state_value(&mut DocTexts::default());
        for key in ["mode", "buffer_masks", "pending_masks"] {
            value = edited(&value, key, None);
        }
        let Value::Map(entries) = &mut value else { panic!("state is a map") };
        let Some((_, Value::Map(stats))) = entries.iter_mut().find(|(k, _)| k == "stats") else { panic!("stats") };
        stats.retain(|(k, _)| k != "tokens_padded");
        let (state, _) = PackerState::from_value(&value).unwrap();
        assert_eq!(state, p.state());
        assert_eq!(state.config.mode, PackMode::Crop);
    }

    #[test]
    fn a_failed_load_changes_nothing() {
        let p = packer_with_history();
        let value = edited(&p.state_value(&mut DocTexts::default()), "next_seq", Some(Value::Int(6)));
        let mut q = Packer::new(*p.config()).unwrap();
        let mut texts = DocTexts::default();
        let before = format!("{q:?}");
        assert!(matches!(q.load_state_value(&value, &mut texts), Err(PackError::InvalidState(_))));
        assert_eq!(format!("{q:?}"), before);
        assert!(texts.is_empty());
        let other_config = Packer::new(PackerConfig::new(6, 3, 0, Some(9)).unwrap()).unwrap();
        let good = p.state_value(&mut DocTexts::default());
        let err = other_config.clone().load_state_value(&good, &mut texts).unwrap_err();
        assert!(err.to_string().contains("state was saved by a packer with"), "{err}");
    }

    /// The counters of `good` moved `docs` and `tokens` further, as if that much had been placed.
    fn shifted(good: &PackerState, docs: u64, tokens: u64) -> PackerState {
        let mut s = good.clone();
        s.next_seq += docs;
        s.stats.docs_in += docs;
        s.stats.docs_placed += docs;
        s.stats.tokens_in += tokens;
        s.stats.tokens_placed += tokens;
        s
    }

    #[test]
    fn states_without_headroom_are_rejected() {
        let good = packer_with_history().state();
        let near_max = u64::MAX - 100;
        for s in [shifted(&good, near_max, 0), shifted(&good, 0, near_max), shifted(&good, COUNTER_LIMIT, 0)] {
            match Packer::from_state(s) {
                Err(PackError::InvalidState(msg)) => assert!(msg.contains("headroom"), "{msg}"),
                other => panic!("expected a headroom error, got {other:?}"),
            }
        }
        let mut s = good.clone();
        s.stats.rows_packed = COUNTER_LIMIT + 1;
        assert!(matches!(Packer::from_state(s), Err(PackError::InvalidState(_))));
        let edge = shifted(&good, COUNTER_LIMIT - good.next_seq, COUNTER_LIMIT - good.stats.tokens_in);
        assert!(Packer::from_state(edge).is_ok());
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
        s.pending.push((vec![9], None));
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
        let mut s = good.clone();
        s.buffer[0].1.clear();
        cases.push(s);
        let mut s = good.clone();
        s.buffer[0].2 = Some(vec![1]); // shorter than its document
        cases.push(s);
        let mut s = good.clone();
        s.stats.tokens_padded = 1; // a crop-mode packer never pads
        cases.push(s);
        let mut s = good;
        s.pending[0].1 = Some(vec![2; s.pending[0].0.len()]);
        cases.push(s);
        for s in cases {
            assert!(matches!(Packer::from_state(s.clone()), Err(PackError::InvalidState(_))), "{s:?}");
        }
    }
}
