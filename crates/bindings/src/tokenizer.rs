//! Python skin over `nanochat_tokenizer`: type conversion, GIL release, errors as Python exceptions.

use std::ops::ControlFlow;

use nanochat_tokenizer::train::{truncate_chars, vocab_bytes};
use nanochat_tokenizer::{ChunkCounter, Encoder, Splitter, TokenizerError, DEFAULT_PATTERN};
use pyo3::buffer::PyBuffer;
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyList, PyString};

use crate::buffers::readonly_slice;
use crate::threads::in_pool;

fn to_py_err(e: TokenizerError) -> PyErr {
    PyValueError::new_err(e.to_string())
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
enum ArrowOffsets {
    Small(PyBuffer<i32>),
    Large(PyBuffer<i64>),
}

/// An Arrow string array borrowed from Python: its data bytes and its `len + 1` offsets (already
/// sliced to the array). Borrowing needs the GIL; reading it ([`ArrowStrings::strs`]) does not.
struct ArrowStrings<'a> {
    data: &'a [u8],
    offsets: ArrowOffsetSlice<'a>,
}

enum ArrowOffsetSlice<'a> {
    Small(&'a [i32]),
    Large(&'a [i64]),
}

impl<'a> ArrowStrings<'a> {
    fn borrow(py: Python<'_>, data: &'a PyBuffer<u8>, offsets: &'a ArrowOffsets) -> PyResult<Self> {
        let offsets = match offsets {
            ArrowOffsets::Small(b) => ArrowOffsetSlice::Small(readonly_slice(py, b)?),
            ArrowOffsets::Large(b) => ArrowOffsetSlice::Large(readonly_slice(py, b)?),
        };
        Ok(ArrowStrings { data: readonly_slice(py, data)?, offsets })
    }

    /// Every row as `&str` without copying the text; checks the offsets and the UTF-8 (which is
    /// a pass over all the text, hence done without the GIL).
    fn strs(&self) -> PyResult<Vec<&'a str>> {
        match self.offsets {
            ArrowOffsetSlice::Small(o) => rows_as_strs(self.data, o.iter().map(|&x| i64::from(x))),
            ArrowOffsetSlice::Large(o) => rows_as_strs(self.data, o.iter().copied()),
        }
    }
}

fn rows_as_strs(data: &[u8], offsets: impl Iterator<Item = i64>) -> PyResult<Vec<&str>> {
    let mut out = Vec::with_capacity(offsets.size_hint().0.saturating_sub(1));
    let mut offsets = offsets.peekable();
    let mut row = 0;
    while let (Some(start), Some(&end)) = (offsets.next(), offsets.peek()) {
        if start < 0 || end < start || end as u64 > data.len() as u64 {
            return Err(PyValueError::new_err(format!(
                "arrow offsets are corrupt at row {row}: {start}..{end} with {} data bytes",
                data.len()
            )));
        }
        let text = std::str::from_utf8(&data[start as usize..end as usize])
            .map_err(|e| PyValueError::new_err(format!("arrow row {row} is not valid UTF-8: {e}")))?;
        out.push(text);
        row += 1;
    }
    Ok(out)
}

/// What a batch of documents contributed to training: documents taken, and the chars and UTF-8
/// bytes of their text after the `doc_cap` crop (bytes are the fair unit for throughput).
type TextRead = (usize, u64, u64);

/// How many of `texts` fit a budget of `max_chars` (counting each after the `doc_cap` crop); the
/// document that crosses the budget is included.
fn take_within_budget<S: AsRef<str>>(texts: &[S], doc_cap: Option<usize>, max_chars: Option<u64>) -> TextRead {
    let (mut chars, mut bytes) = (0u64, 0u64);
    for (i, t) in texts.iter().enumerate() {
        if max_chars.is_some_and(|m| chars >= m) {
            return (i, chars, bytes);
        }
        let text = match doc_cap {
            Some(cap) => truncate_chars(t.as_ref(), cap),
            None => t.as_ref(),
        };
        chars += text.chars().count() as u64;
        bytes += text.len() as u64;
    }
    (texts.len(), chars, bytes)
}

/// Count the documents that fit the budget; call without the GIL.
fn count_within_budget<S: AsRef<str> + Sync>(
    counter: &mut ChunkCounter,
    texts: &[S],
    doc_cap: Option<usize>,
    max_chars: Option<u64>,
) -> PyResult<TextRead> {
    let read = take_within_budget(texts, doc_cap, max_chars);
    counter.add_documents(&texts[..read.0], doc_cap).map_err(to_py_err)?;
    Ok(read)
}

/// Streaming BPE trainer: feed documents in batches, then `train`.
#[pyclass(module = "nanochat_rs._native")]
pub struct BpeTrainer {
    counter: ChunkCounter,
}

#[pymethods]
impl BpeTrainer {
    #[new]
    #[pyo3(signature = (pattern=None))]
    fn new(pattern: Option<&str>) -> PyResult<Self> {
        let splitter = Splitter::new(pattern.unwrap_or(DEFAULT_PATTERN)).map_err(to_py_err)?;
        Ok(BpeTrainer { counter: ChunkCounter::new(splitter) })
    }

    /// Count a list of str. Stops once `max_chars` chars were taken; returns (documents, chars,
    /// bytes) used.
    #[pyo3(signature = (texts, doc_cap=None, max_chars=None))]
    fn add_texts(
        &mut self,
        py: Python<'_>,
        texts: &Bound<'_, PyList>,
        doc_cap: Option<usize>,
        max_chars: Option<u64>,
    ) -> PyResult<TextRead> {
        let texts = list_of_str(texts)?;
        let counter = &mut self.counter;
        py.detach(|| count_within_budget(counter, &texts, doc_cap, max_chars))
    }

    /// Count an Arrow string array given as its data buffer and offsets (no per-string copies);
    /// returns (documents, chars, bytes) used, like `add_texts`.
    #[pyo3(signature = (data, offsets, doc_cap=None, max_chars=None))]
    fn add_arrow(
        &mut self,
        py: Python<'_>,
        data: PyBuffer<u8>,
        offsets: ArrowOffsets,
        doc_cap: Option<usize>,
        max_chars: Option<u64>,
    ) -> PyResult<TextRead> {
        let array = ArrowStrings::borrow(py, &data, &offsets)?;
        let counter = &mut self.counter;
        py.detach(|| count_within_budget(counter, &array.strs()?, doc_cap, max_chars))
    }
    #[getter]
    fn num_unique_chunks(&self) -> usize {
        self.counter.num_unique_chunks()
    }

    /// Learn `num_merges` merges; returns them as (left, right) pairs, merge i having id 256 + i.
    /// `progress(done, total)` is called now and then; Ctrl-C or an exception raised by it stops
    /// training right there and is re-raised.
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

/// Bytes of every token for the given merges (ids 0..256 + len(merges)).
#[pyfunction]
fn merges_to_vocab<'py>(py: Python<'py>, merges: Vec<(u32, u32)>) -> PyResult<Vec<Bound<'py, PyBytes>>> {
    for (i, &(l, r)) in merges.iter().enumerate() {
        let limit = 256 + i as u32;
        if l >= limit || r >= limit {
            return Err(PyValueError::new_err(format!("merge {i} ({l}, {r}) refers to an id not yet defined")));
        }
    }
    Ok(vocab_bytes(&merges).iter().map(|b| PyBytes::new(py, b)).collect())
}

/// Encoder over token bytes (rank = position) with special tokens after them.
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
    #[new]
    #[pyo3(signature = (vocab, specials, pattern=None))]
    fn new(vocab: Vec<Vec<u8>>, specials: Vec<String>, pattern: Option<&str>) -> PyResult<Self> {
        let splitter = Splitter::new(pattern.unwrap_or(DEFAULT_PATTERN)).map_err(to_py_err)?;
        Ok(PyEncoder { inner: Encoder::new(vocab, specials, splitter).map_err(to_py_err)? })
    }

    #[getter]
    fn num_ranks(&self) -> usize {
        self.inner.num_ranks()
    }

    #[getter]
    fn vocab_size(&self) -> usize {
        self.inner.vocab_size()
    }

    fn special_id(&self, name: &str) -> Option<u32> {
        self.inner.special_id(name)
    }

    /// Byte length of every token id (0 for specials).
    fn token_lengths(&self) -> Vec<usize> {
        let mut lengths: Vec<usize> = self.inner.vocab().iter().map(Vec::len).collect();
        lengths.resize(self.inner.vocab_size(), 0);
        lengths
    }

    fn encode(&self, py: Python<'_>, text: &str) -> PyResult<Vec<u32>> {
        let inner = &self.inner;
        py.detach(|| inner.encode(text)).map_err(to_py_err)
    }

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
        py.detach(|| in_pool(num_threads, || inner.encode_batch(&texts, prepend, append)))?.map_err(to_py_err)
    }

    /// Encode an Arrow string array (data buffer + offsets) into flat little-endian uint32 tokens
    /// and int64 offsets, returned as bytes for `numpy.frombuffer`.
    #[pyo3(signature = (data, offsets, prepend=None, num_threads=None))]
    fn encode_arrow<'py>(
        &self,
        py: Python<'py>,
        data: PyBuffer<u8>,
        offsets: ArrowOffsets,
        prepend: Option<u32>,
        num_threads: Option<usize>,
    ) -> PyResult<(Bound<'py, PyBytes>, Bound<'py, PyBytes>)> {
        let array = ArrowStrings::borrow(py, &data, &offsets)?;
        let inner = &self.inner;
        let (tokens, offsets) = py.detach(|| {
            let texts = array.strs()?;
            in_pool(num_threads, || inner.encode_flat(&texts, prepend))?.map_err(to_py_err)
        })?;
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
        let (tokens, offsets) =
            py.detach(|| in_pool(num_threads, || inner.encode_flat(&texts, prepend)))?.map_err(to_py_err)?;
        Ok((u32_bytes(py, &tokens), i64_bytes(py, &offsets)))
    }

    fn decode_bytes<'py>(&self, py: Python<'py>, ids: Vec<i64>) -> PyResult<Bound<'py, PyBytes>> {
        let checked = ids
            .into_iter()
            .map(|id| {
                u32::try_from(id)
                    .map_err(|_| PyValueError::new_err(format!("token id {id} is not in the vocabulary")))
            })
            .collect::<PyResult<Vec<u32>>>()?;
        let bytes = self.inner.decode_bytes(&checked).map_err(to_py_err)?;
        Ok(PyBytes::new(py, &bytes))
    }
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("DEFAULT_PATTERN", DEFAULT_PATTERN)?;
    m.add_class::<BpeTrainer>()?;
    m.add_class::<PyEncoder>()?;
    m.add_function(wrap_pyfunction!(merges_to_vocab, m)?)?;
    Ok(())
}
