//! Python skin over `nanochat_tokenizer`: type conversion, GIL release, errors as Python exceptions.

use std::ops::ControlFlow;

use nanochat_tokenizer::arrow::{arrow_strs, ArrowOffsets};
use nanochat_tokenizer::threads::{with_threads, MAX_NUM_THREADS};
use nanochat_tokenizer::train::vocab_bytes;
use nanochat_tokenizer::{ChunkCounter, Encoder, Splitter, TextRead, TokenizerError, DEFAULT_PATTERN};
use pyo3::buffer::PyBuffer;
use pyo3::exceptions::{PyRuntimeError, PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyList, PyString};

use crate::buffers::readonly_slice;

fn to_py_err(e: TokenizerError) -> PyErr {
    match e {
        TokenizerError::ThreadPool(_) => PyRuntimeError::new_err(e.to_string()),
        _ => PyValueError::new_err(e.to_string()),
    }
}

/// Copy every item of a Python list into a `String` (so the work can run without the GIL while
/// the list stays mutable by other threads), with a clear TypeError naming the first bad item.
fn list_of_str(texts: &Bound<'_, PyList>) -> PyResult<Vec<String>> {
    texts
        .iter()
        .enumerate()
        .map(|(i, item)| match item.cast::<PyString>() {
            Ok(s) => Ok(s.to_str()?.to_owned()),
            Err(_) => Err(PyTypeError::new_err(format!(
                "texts[{i}] must be str, got {}",
                item.get_type().name().map(|n| n.to_string()).unwrap_or_else(|_| "?".into())
            ))),
        })
        .collect()
}

/// Offsets buffer of an Arrow string array: int32 for `string`, int64 for `large_string`.
#[derive(FromPyObject)]
enum OffsetsBuffer {
    Small(PyBuffer<i32>),
    Large(PyBuffer<i64>),
}

fn borrow_offsets<'a>(py: Python<'_>, offsets: &'a OffsetsBuffer) -> PyResult<ArrowOffsets<'a>> {
    Ok(match offsets {
        OffsetsBuffer::Small(b) => ArrowOffsets::Small(readonly_slice(py, b)?),
        OffsetsBuffer::Large(b) => ArrowOffsets::Large(readonly_slice(py, b)?),
    })
}

fn read_tuple(read: TextRead) -> (usize, u64, u64) {
    (read.documents, read.chars, read.bytes)
}

/// Streaming byte-level BPE trainer: feed documents in batches (`add_texts`, `add_arrow`), then
/// call `train` once. Only the counts of the split pattern's chunks are kept, never the documents.
#[pyclass(module = "nanochat_rs._native")]
pub struct BpeTrainer {
    counter: ChunkCounter,
}

#[pymethods]
impl BpeTrainer {
    /// A trainer splitting documents with `pattern` (the default pattern when None). Raises
    /// ValueError if the pattern does not compile.
    #[new]
    #[pyo3(signature = (pattern=None))]
    fn new(pattern: Option<&str>) -> PyResult<Self> {
        let splitter = Splitter::new(pattern.unwrap_or(DEFAULT_PATTERN)).map_err(to_py_err)?;
        Ok(BpeTrainer { counter: ChunkCounter::new(splitter) })
    }

    /// Count a list of str, each cut to `doc_cap` chars, taking documents until `max_chars` chars
    /// were taken (the document crossing the budget included). Returns (documents, chars, bytes)
    /// taken, chars and UTF-8 bytes counted after the crop.
    #[pyo3(signature = (texts, doc_cap=None, max_chars=None))]
    fn add_texts(
        &mut self,
        py: Python<'_>,
        texts: &Bound<'_, PyList>,
        doc_cap: Option<usize>,
        max_chars: Option<u64>,
    ) -> PyResult<(usize, u64, u64)> {
        let texts = list_of_str(texts)?;
        let counter = &mut self.counter;
        py.detach(|| counter.add_documents_within(&texts, doc_cap, max_chars)).map(read_tuple).map_err(to_py_err)
    }

    /// Count an Arrow string array given as its data buffer (uint8) and its `len + 1` offsets
    /// (int32 or int64), read in place without per-string copies. Same budget and result as
    /// `add_texts`; ValueError if the offsets are corrupt or a row is not UTF-8.
    #[pyo3(signature = (data, offsets, doc_cap=None, max_chars=None))]
    fn add_arrow(
        &mut self,
        py: Python<'_>,
        data: PyBuffer<u8>,
        offsets: OffsetsBuffer,
        doc_cap: Option<usize>,
        max_chars: Option<u64>,
    ) -> PyResult<(usize, u64, u64)> {
        let data = readonly_slice(py, &data)?;
        let offsets = borrow_offsets(py, &offsets)?;
        let counter = &mut self.counter;
        py.detach(|| counter.add_documents_within(&arrow_strs(data, offsets)?, doc_cap, max_chars))
            .map(read_tuple)
            .map_err(to_py_err)
    }

    /// Number of distinct chunks counted so far.
    #[getter]
    fn num_unique_chunks(&self) -> usize {
        self.counter.num_unique_chunks()
    }

    /// Bytes of the counted text that no match of the split pattern covered: training never sees
    /// them (nor does encoding with the same pattern). Always 0 with the default pattern.
    #[getter]
    fn uncovered_bytes(&self) -> u64 {
        self.counter.uncovered_bytes()
    }

    /// Learn `num_merges` merges (fewer if the pairs run out); returns them as (left, right) pairs,
    /// merge i having id 256 + i. `progress(done, total)` is called now and then; Ctrl-C or an
    /// exception raised by it stops training right there and is re-raised.
    #[pyo3(signature = (num_merges, progress=None))]
    fn train(&self, py: Python<'_>, num_merges: usize, progress: Option<Py<PyAny>>) -> PyResult<Vec<(u32, u32)>> {
        let counter = &self.counter;
        let mut callback_error: Option<PyErr> = None;
        let merges = py.detach(|| {
            counter.train(num_merges, |done, total| {
                let result = Python::attach(|py| {
                    py.check_signals()?;
                    match &progress {
                        Some(cb) => cb.call1(py, (done, total)).map(|_| ()),
                        None => Ok(()),
                    }
                });
                match result {
                    Ok(()) => ControlFlow::Continue(()),
                    Err(e) => {
                        callback_error = Some(e);
                        ControlFlow::Break(())
                    }
                }
            })
        });
        match callback_error {
            Some(e) => Err(e),
            None => Ok(merges),
        }
    }
}

/// Bytes of every token id (0..256 + len(merges)) for the given merges: the single bytes, then
/// the concatenation of each merge's two tokens. ValueError if a merge uses an id not yet defined.
#[pyfunction]
fn merges_to_vocab<'py>(py: Python<'py>, merges: Vec<(u32, u32)>) -> PyResult<Vec<Bound<'py, PyBytes>>> {
    let vocab = vocab_bytes(&merges).map_err(to_py_err)?;
    Ok(vocab.iter().map(|b| PyBytes::new(py, b)).collect())
}

/// Byte-level BPE encoder over token bytes (rank = position), with special tokens after them.
/// Encodes bit-identically to tiktoken on the same ranks and pattern.
#[pyclass(module = "nanochat_rs._native", name = "Encoder")]
pub struct PyEncoder {
    inner: Encoder,
}

fn u32_bytes<'py>(py: Python<'py>, values: &[u32]) -> Bound<'py, PyBytes> {
    PyBytes::new(py, bytemuck::cast_slice(values))
}

fn i64_bytes<'py>(py: Python<'py>, values: &[i64]) -> Bound<'py, PyBytes> {
    PyBytes::new(py, bytemuck::cast_slice(values))
}

#[pymethods]
impl PyEncoder {
    /// `vocab[i]` is the bytes of token i (the first 256 must be the single bytes in order),
    /// `specials` the special tokens' text (ids follow the vocabulary), `pattern` the split
    /// pattern (the default when None). ValueError on an invalid vocabulary or pattern.
    #[new]
    #[pyo3(signature = (vocab, specials, pattern=None))]
    fn new(vocab: Vec<Vec<u8>>, specials: Vec<String>, pattern: Option<&str>) -> PyResult<Self> {
        let splitter = Splitter::new(pattern.unwrap_or(DEFAULT_PATTERN)).map_err(to_py_err)?;
        Ok(PyEncoder { inner: Encoder::new(vocab, specials, splitter).map_err(to_py_err)? })
    }

    /// Number of ordinary (mergeable) tokens.
    #[getter]
    fn num_ranks(&self) -> usize {
        self.inner.num_ranks()
    }

    /// Ordinary tokens plus special tokens.
    #[getter]
    fn vocab_size(&self) -> usize {
        self.inner.vocab_size()
    }

    /// Id of the special token with this text, or None.
    fn special_id(&self, name: &str) -> Option<u32> {
        self.inner.special_id(name)
    }

    /// Byte length of every token id (0 for special tokens).
    fn token_lengths(&self) -> Vec<usize> {
        self.inner.token_lengths()
    }

    /// Token ids of `text`. Special-token text is not parsed, and text that the split pattern does
    /// not match is dropped (only possible with a custom pattern).
    fn encode(&self, py: Python<'_>, text: &str) -> PyResult<Vec<u32>> {
        let inner = &self.inner;
        py.detach(|| inner.encode(text)).map_err(to_py_err)
    }

    /// Token ids of every str of `texts`, encoded in parallel on `num_threads` threads (all cores
    /// when None; capped, and at most MAX_NUM_THREADS accepted), each wrapped in the `prepend` and
    /// `append` ids when given.
    #[pyo3(signature = (texts, prepend=None, append=None, num_threads=None))]
    fn encode_batch(
        &self,
        py: Python<'_>,
        texts: &Bound<'_, PyList>,
        prepend: Option<u32>,
        append: Option<u32>,
        num_threads: Option<usize>,
    ) -> PyResult<Vec<Vec<u32>>> {
        let texts = list_of_str(texts)?;
        let inner = &self.inner;
        py.detach(|| with_threads(num_threads, || inner.encode_batch(&texts, prepend, append)))
            .and_then(|r| r)
            .map_err(to_py_err)
    }

    /// Encode an Arrow string array, given as its data buffer and `len + 1` offsets, into flat
    /// little-endian uint32 tokens and int64 offsets (document i is tokens[offsets[i]:offsets[i+1]]),
    /// returned as bytes for `numpy.frombuffer`. Threads as in `encode_batch`.
    #[pyo3(signature = (data, offsets, prepend=None, num_threads=None))]
    fn encode_arrow<'py>(
        &self,
        py: Python<'py>,
        data: PyBuffer<u8>,
        offsets: OffsetsBuffer,
        prepend: Option<u32>,
        num_threads: Option<usize>,
    ) -> PyResult<(Bound<'py, PyBytes>, Bound<'py, PyBytes>)> {
        let data = readonly_slice(py, &data)?;
        let offsets = borrow_offsets(py, &offsets)?;
        let inner = &self.inner;
        let (tokens, offsets) = py
            .detach(|| {
                let texts = arrow_strs(data, offsets)?;
                with_threads(num_threads, || inner.encode_flat(&texts, prepend))?
            })
            .map_err(to_py_err)?;
        Ok((u32_bytes(py, &tokens), i64_bytes(py, &offsets)))
    }

    /// Same as `encode_arrow` for a list of str.
    #[pyo3(signature = (texts, prepend=None, num_threads=None))]
    fn encode_flat<'py>(
        &self,
        py: Python<'py>,
        texts: &Bound<'py, PyList>,
        prepend: Option<u32>,
        num_threads: Option<usize>,
    ) -> PyResult<(Bound<'py, PyBytes>, Bound<'py, PyBytes>)> {
        let texts = list_of_str(texts)?;
        let inner = &self.inner;
        let (tokens, offsets) = py
            .detach(|| with_threads(num_threads, || inner.encode_flat(&texts, prepend)))
            .and_then(|r| r)
            .map_err(to_py_err)?;
        Ok((u32_bytes(py, &tokens), i64_bytes(py, &offsets)))
    }

    /// The bytes of the given ids concatenated (special tokens as their text). ValueError for an
    /// id outside the vocabulary.
    fn decode_bytes<'py>(&self, py: Python<'py>, ids: Vec<i64>) -> PyResult<Bound<'py, PyBytes>> {
        let checked = ids
            .into_iter()
            .map(|id| {
                u32::try_from(id).map_err(|_| PyValueError::new_err(format!("token id {id} is not in the vocabulary")))
            })
            .collect::<PyResult<Vec<u32>>>()?;
        let bytes = self.inner.decode_bytes(&checked).map_err(to_py_err)?;
        Ok(PyBytes::new(py, &bytes))
    }
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("DEFAULT_PATTERN", DEFAULT_PATTERN)?;
    m.add("MAX_NUM_THREADS", MAX_NUM_THREADS)?;
    m.add_class::<BpeTrainer>()?;
    m.add_class::<PyEncoder>()?;
    m.add_function(wrap_pyfunction!(merges_to_vocab, m)?)?;
    Ok(())
}
