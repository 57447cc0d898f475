//! Python skin over `nanochat_packer`: buffer-protocol views in and out, the GIL released while
//! documents are copied in and rows are written, errors as Python exceptions.
//!
//! `python/nanochat_rs/packer.py` is the public API; it validates arguments with friendly messages
//! before calling here, and this layer re-checks everything that memory safety depends on.

use std::collections::HashMap;

use nanochat_packer::{codec, PackError, Packer, PackerConfig, PackerState, Stats};
use pyo3::buffer::PyBuffer;
use pyo3::exceptions::{PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList, PyString};

use crate::buffers::{readonly_slice, writable_slice};

/// Identifies a state produced by this class (checked on load).
const STATE_FORMAT: &str = "nanochat_rs.BestFitPacker";
const STATE_VERSION: u32 = 1;

fn to_py_err(e: PackError) -> PyErr {
    PyValueError::new_err(e.to_string())
}

fn check_ndim<T: pyo3::buffer::Element>(buf: &PyBuffer<T>, name: &str, ndim: usize) -> PyResult<()> {
    if buf.dimensions() != ndim {
        return Err(PyValueError::new_err(format!("{name} must be {ndim}-D, got {}-D", buf.dimensions())));
    }
    Ok(())
}

/// The two output buffers must not overlap: rows are written through two `&mut` slices at once.
fn check_disjoint(a: &PyBuffer<i64>, b: &PyBuffer<i64>) -> PyResult<()> {
    let (a0, b0) = (a.buf_ptr() as usize, b.buf_ptr() as usize);
    if a0 < b0 + b.len_bytes() && b0 < a0 + a.len_bytes() {
        return Err(PyValueError::new_err("inputs and targets must not share memory"));
    }
    Ok(())
}

#[pyclass(module = "nanochat_rs._native", name = "Packer")]
pub struct PyPacker {
    inner: Packer,
    /// Base64 text of documents already exported by `state_dict`, by arrival number. A document
    /// stays in the packer for many batches, so taking the state after every batch would otherwise
    /// re-encode the same tokens again and again.
    encoded: HashMap<u64, Py<PyString>>,
}

/// Encoded text of every document in `docs`, reusing cached strings and encoding the rest
/// without the GIL. The cache is replaced by exactly these documents (the ones still held).
fn encode_docs(
    py: Python<'_>,
    cache: &mut HashMap<u64, Py<PyString>>,
    docs: &[(u64, &[u32])],
) -> PyResult<Vec<Py<PyString>>> {
    let missing: Vec<(u64, &[u32])> = docs.iter().copied().filter(|(s, _)| !cache.contains_key(s)).collect();
    let fresh: Vec<(u64, String)> = py.detach(|| missing.iter().map(|&(s, t)| (s, codec::encode_tokens(t))).collect());
    let mut old = std::mem::take(cache);
    cache.extend(fresh.into_iter().map(|(s, text)| (s, PyString::new(py, &text).unbind())));
    let mut out = Vec::with_capacity(docs.len());
    for &(seq, _) in docs {
        if let Some(text) = old.remove(&seq) {
            cache.insert(seq, text);
        }
        let text = cache
            .get(&seq)
            .ok_or_else(|| PyRuntimeError::new_err(format!("internal error: document {seq} has no encoding")))?;
        out.push(text.clone_ref(py));
    }
    Ok(out)
}

fn stats_items(stats: &Stats) -> [(&'static str, u64); 7] {
    [
        ("docs_in", stats.docs_in),
        ("tokens_in", stats.tokens_in),
        ("tokens_placed", stats.tokens_placed),
        ("tokens_cropped", stats.tokens_cropped),
        ("docs_placed", stats.docs_placed),
        ("docs_cropped", stats.docs_cropped),
        ("rows_packed", stats.rows_packed),
    ]
}

/// Decode `docs` (base64 strings) without the GIL; errors name the list and index.
fn decode_docs(py: Python<'_>, name: &str, docs: &[Bound<'_, PyString>]) -> PyResult<Vec<Vec<u32>>> {
    let texts: Vec<&str> = docs.iter().map(|d| d.to_str()).collect::<PyResult<_>>()?;
    py.detach(|| {
        texts
            .iter()
            .enumerate()
            .map(|(i, t)| codec::decode_tokens(t).map_err(|e| format!("{name}[{i}] is not an encoded document: {e}")))
            .collect::<Result<Vec<_>, String>>()
    })
    .map_err(PyValueError::new_err)
}

#[pymethods]
impl PyPacker {
    #[new]
    #[pyo3(signature = (seq_len, buffer_size=1000, audio_prefix_len=0, bos_token_id=None))]
    fn new(seq_len: usize, buffer_size: usize, audio_prefix_len: usize, bos_token_id: Option<u32>) -> PyResult<Self> {
        let config = PackerConfig::new(seq_len, buffer_size, audio_prefix_len, bos_token_id).map_err(to_py_err)?;
        Ok(PyPacker { inner: Packer::new(config).map_err(to_py_err)?, encoded: HashMap::new() })
    }

    #[getter]
    fn seq_len(&self) -> usize {
        self.inner.config().seq_len
    }

    #[getter]
    fn buffer_size(&self) -> usize {
        self.inner.config().buffer_size
    }

    #[getter]
    fn audio_prefix_len(&self) -> usize {
        self.inner.config().audio_prefix_len
    }

    #[getter]
    fn bos_token_id(&self) -> Option<u32> {
        self.inner.config().bos_token_id
    }

    #[getter]
    fn finished(&self) -> bool {
        self.inner.is_finished()
    }

    /// Append documents: `tokens` (uint32, 1-D) and `offsets` (int64, 1-D, `len(docs) + 1` values).
    fn push(&mut self, py: Python<'_>, tokens: PyBuffer<u32>, offsets: PyBuffer<i64>) -> PyResult<()> {
        check_ndim(&tokens, "tokens", 1)?;
        check_ndim(&offsets, "offsets", 1)?;
        let tokens = readonly_slice(py, &tokens)?;
        let offsets = readonly_slice(py, &offsets)?;
        let inner = &mut self.inner;
        py.detach(|| inner.push(tokens, offsets)).map_err(to_py_err)
    }

    fn finish(&mut self) {
        self.inner.finish();
    }

    /// Fill int64 `inputs` (B, seq_len - audio_prefix_len) and `targets` (B, seq_len) in place.
    /// False (state unchanged) when more documents are needed first.
    fn pack_into(&mut self, py: Python<'_>, inputs: PyBuffer<i64>, targets: PyBuffer<i64>) -> PyResult<bool> {
        check_ndim(&inputs, "inputs", 2)?;
        check_ndim(&targets, "targets", 2)?;
        let config = *self.inner.config();
        let (ishape, tshape) = (inputs.shape(), targets.shape());
        if ishape[1] != config.text_len() || tshape[1] != config.seq_len || ishape[0] != tshape[0] {
            return Err(PyValueError::new_err(format!(
                "need inputs (B, {}) and targets (B, {}), got {ishape:?} and {tshape:?}",
                config.text_len(),
                config.seq_len
            )));
        }
        check_disjoint(&inputs, &targets)?;
        let inputs = writable_slice(py, &inputs)?;
        let targets = writable_slice(py, &targets)?;
        let inner = &mut self.inner;
        py.detach(|| inner.pack_into(inputs, targets)).map_err(to_py_err)
    }

    /// Counters, plus what is currently held in the buffer and the pending queue.
    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let d = PyDict::new(py);
        for (k, v) in stats_items(&self.inner.stats()) {
            d.set_item(k, v)?;
        }
        d.set_item("docs_buffered", self.inner.docs_buffered())?;
        d.set_item("tokens_buffered", self.inner.tokens_buffered())?;
        d.set_item("docs_pending", self.inner.docs_pending())?;
        d.set_item("tokens_pending", self.inner.tokens_pending())?;
        Ok(d)
    }

    /// The full state as a JSON-serialisable dict (documents as base64 of little-endian uint32).
    fn state_dict<'py>(&mut self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let inner = &self.inner;
        let config = *inner.config();
        let mut docs = inner.buffered_docs();
        let buffer_seqs: Vec<u64> = docs.iter().map(|&(s, _)| s).collect();
        docs.extend(inner.pending_docs());
        let mut texts = encode_docs(py, &mut self.encoded, &docs)?;
        let pending_texts = texts.split_off(buffer_seqs.len());

        let d = PyDict::new(py);
        d.set_item("format", STATE_FORMAT)?;
        d.set_item("version", STATE_VERSION)?;
        d.set_item("seq_len", config.seq_len)?;
        d.set_item("buffer_size", config.buffer_size)?;
        d.set_item("audio_prefix_len", config.audio_prefix_len)?;
        d.set_item("bos_token_id", config.bos_token_id)?;
        d.set_item("finished", inner.is_finished())?;
        d.set_item("next_seq", inner.next_seq())?;
        let stats = PyDict::new(py);
        for (k, v) in stats_items(&inner.stats()) {
            stats.set_item(k, v)?;
        }
        d.set_item("stats", stats)?;
        d.set_item("buffer_seqs", PyList::new(py, buffer_seqs)?)?;
        d.set_item("buffer_docs", PyList::new(py, texts)?)?;
        d.set_item("pending_docs", PyList::new(py, pending_texts)?)?;
        Ok(d)
    }

    /// Replace the whole state by one from `state_dict` (already checked for shape by the Python
    /// wrapper; here for consistency). The configuration must equal this packer's.
    #[allow(clippy::too_many_arguments)]
    #[pyo3(signature = (seq_len, buffer_size, audio_prefix_len, bos_token_id, finished, next_seq, stats,
                        buffer_seqs, buffer_docs, pending_docs))]
    fn load_state(
        &mut self,
        py: Python<'_>,
        seq_len: usize,
        buffer_size: usize,
        audio_prefix_len: usize,
        bos_token_id: Option<u32>,
        finished: bool,
        next_seq: u64,
        stats: (u64, u64, u64, u64, u64, u64, u64),
        buffer_seqs: Vec<u64>,
        buffer_docs: Vec<Bound<'_, PyString>>,
        pending_docs: Vec<Bound<'_, PyString>>,
    ) -> PyResult<()> {
        let config = PackerConfig { seq_len, buffer_size, audio_prefix_len, bos_token_id };
        if config != *self.inner.config() {
            return Err(PyValueError::new_err(format!(
                "state was saved by a packer with {config:?}, this packer has {:?}",
                self.inner.config()
            )));
        }
        if buffer_seqs.len() != buffer_docs.len() {
            return Err(PyValueError::new_err(format!(
                "buffer_seqs has {} entries but buffer_docs has {}",
                buffer_seqs.len(),
                buffer_docs.len()
            )));
        }
        let (docs_in, tokens_in, tokens_placed, tokens_cropped, docs_placed, docs_cropped, rows_packed) = stats;
        let stats = Stats { docs_in, tokens_in, tokens_placed, tokens_cropped, docs_placed, docs_cropped, rows_packed };
        let state = PackerState {
            config,
            stats,
            next_seq,
            finished,
            buffer: buffer_seqs.iter().copied().zip(decode_docs(py, "buffer_docs", &buffer_docs)?).collect(),
            pending: decode_docs(py, "pending_docs", &pending_docs)?,
        };
        let inner = py.detach(|| Packer::from_state(state)).map_err(to_py_err)?;
        // The given strings decode to exactly these documents, so they serve as their cached encodings.
        let first_pending = next_seq - pending_docs.len() as u64;
        let pending_seqs = (0..pending_docs.len() as u64).map(|i| first_pending + i);
        self.encoded = buffer_seqs
            .into_iter()
            .chain(pending_seqs)
            .zip(buffer_docs.into_iter().chain(pending_docs))
            .map(|(seq, text)| (seq, text.unbind()))
            .collect();
        self.inner = inner;
        Ok(())
    }
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyPacker>()?;
    m.add("PACKER_STATE_FORMAT", STATE_FORMAT)?;
    m.add("PACKER_STATE_VERSION", STATE_VERSION)?;
    Ok(())
}
