//! Python skin over `nanochat_packer`: buffer-protocol views in and out, the GIL released while
//! documents are copied in and rows are written, Python objects to and from the crate's state
//! [`Value`]s, errors as Python exceptions.
//!
//! `python/nanochat_rs/packer.py` is the public API; it gives friendly messages for the argument
//! types it can see, and this layer re-checks everything that memory safety depends on. The state's
//! schema and its checks live in the packer crate; nothing here knows what a state contains.

use std::sync::Arc;

use nanochat_packer::{DocTexts, PackError, PackMode, Packer, PackerConfig, Value, STATE_FORMAT, STATE_VERSION};
use pyo3::buffer::PyBuffer;
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBool, PyDict, PyInt, PyList, PyMapping, PyString, PyTuple};

use crate::buffers::{readonly_slice, writable_slice};

/// No state is nested more than a few levels; this bounds the recursion on crafted input.
const MAX_STATE_DEPTH: usize = 8;

fn to_py_err(e: PackError) -> PyErr {
    match e {
        PackError::StateType(_) => PyTypeError::new_err(e.to_string()),
        _ => PyValueError::new_err(e.to_string()),
    }
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

fn type_name(obj: &Bound<'_, PyAny>) -> String {
    obj.get_type().name().map(|n| n.to_string()).unwrap_or_else(|_| "?".into())
}

/// A Python object of the JSON data model as a [`Value`]; other objects become `Value::Other`,
/// which the schema rejects with a TypeError naming the key.
fn to_value(obj: &Bound<'_, PyAny>, depth: usize) -> PyResult<Value> {
    if depth > MAX_STATE_DEPTH {
        return Err(PyValueError::new_err("a packer state is not nested this deeply"));
    }
    let items = |seq: Bound<'_, PyAny>| -> PyResult<Value> {
        seq.try_iter()?.map(|item| to_value(&item?, depth + 1)).collect::<PyResult<_>>().map(Value::List)
    };
    Ok(if obj.is_none() {
        Value::Null
    } else if let Ok(b) = obj.cast::<PyBool>() {
        Value::Bool(b.is_true())
    } else if let Ok(s) = obj.cast::<PyString>() {
        Value::Str(Arc::from(s.to_str()?))
    } else if obj.is_instance_of::<PyList>() || obj.is_instance_of::<PyTuple>() {
        items(obj.clone())?
    } else if let Ok(map) = obj.cast::<PyMapping>() {
        let mut entries = Vec::new();
        for item in map.items()?.iter() {
            let (key, value): (Bound<'_, PyAny>, Bound<'_, PyAny>) = item.extract()?;
            entries.push((key.str()?.to_str()?.to_owned(), to_value(&value, depth + 1)?));
        }
        Value::Map(entries)
    } else if obj.is_instance_of::<PyInt>() || obj.hasattr("__index__")? {
        // `__index__` admits numpy integers, as `operator.index` does.
        match obj.extract::<i128>() {
            Ok(v) => Value::Int(v),
            Err(_) => Value::BigInt(obj.call_method0("__index__")?.str()?.to_str()?.to_owned()),
        }
    } else {
        Value::Other(type_name(obj))
    })
}

fn to_python<'py>(py: Python<'py>, value: &Value) -> PyResult<Bound<'py, PyAny>> {
    Ok(match value {
        Value::Null => py.None().into_bound(py),
        Value::Bool(b) => PyBool::new(py, *b).to_owned().into_any(),
        Value::Int(v) => v.into_pyobject(py)?.into_any(),
        Value::BigInt(text) => py.get_type::<PyInt>().call1((text.as_str(),))?,
        Value::Str(s) => PyString::new(py, s).into_any(),
        Value::List(items) => {
            PyList::new(py, items.iter().map(|v| to_python(py, v)).collect::<PyResult<Vec<_>>>()?)?.into_any()
        }
        Value::Map(entries) => {
            let d = PyDict::new(py);
            for (k, v) in entries {
                d.set_item(k, to_python(py, v)?)?;
            }
            d.into_any()
        }
        Value::Other(name) => return Err(PyTypeError::new_err(format!("cannot export a value of type {name}"))),
    })
}

/// Best-fit packer (crop-shortest or pad) over a stream of BOS-started documents (see
/// `nanochat_rs.packer.BestFitPacker`, the public wrapper, for the rules).
#[pyclass(module = "nanochat_rs._native", name = "Packer")]
pub struct PyPacker {
    inner: Packer,
    texts: DocTexts,
}

#[pymethods]
impl PyPacker {
    /// Rows of `seq_len` positions, the first `audio_prefix_len` of them audio; the buffer is
    /// topped up to `buffer_size` documents; every document must start with `bos_token_id` when
    /// given; `mode` is "crop" or "pad". ValueError for a configuration that holds no text token
    /// per row, an unknown mode, or pad mode without a BOS or with an audio prefix.
    #[new]
    #[pyo3(signature = (seq_len, buffer_size=1000, audio_prefix_len=0, bos_token_id=None, mode="crop"))]
    fn new(
        seq_len: usize,
        buffer_size: usize,
        audio_prefix_len: usize,
        bos_token_id: Option<u32>,
        mode: &str,
    ) -> PyResult<Self> {
        let config = PackerConfig::new(seq_len, buffer_size, audio_prefix_len, bos_token_id)
            .and_then(|c| c.with_mode(PackMode::from_name(mode)?))
            .map_err(to_py_err)?;
        Ok(PyPacker { inner: Packer::new(config).map_err(to_py_err)?, texts: DocTexts::default() })
    }

    /// Positions per row: audio prefix plus text.
    #[getter]
    fn seq_len(&self) -> usize {
        self.inner.config().seq_len
    }

    /// Documents the buffer is topped up to before every placement.
    #[getter]
    fn buffer_size(&self) -> usize {
        self.inner.config().buffer_size
    }

    /// Audio positions in front of the text of every row.
    #[getter]
    fn audio_prefix_len(&self) -> usize {
        self.inner.config().audio_prefix_len
    }

    /// The token every document must start with, or None when unchecked.
    #[getter]
    fn bos_token_id(&self) -> Option<u32> {
        self.inner.config().bos_token_id
    }

    /// "crop" or "pad": what fills the rest of a row that no buffered document fits.
    #[getter]
    fn mode(&self) -> &'static str {
        self.inner.config().mode.name()
    }

    /// Whether `finish()` was called (end of stream).
    #[getter]
    fn finished(&self) -> bool {
        self.inner.is_finished()
    }

    /// Append documents: `tokens` (uint32, 1-D) and `offsets` (int64, 1-D, `len(docs) + 1` values,
    /// from 0 to len(tokens), strictly increasing) and an optional loss `mask` (uint8, 1-D, one
    /// 0/1 value per token). ValueError on invalid input, which adds nothing.
    #[pyo3(signature = (tokens, offsets, mask=None))]
    fn push(
        &mut self,
        py: Python<'_>,
        tokens: PyBuffer<u32>,
        offsets: PyBuffer<i64>,
        mask: Option<PyBuffer<u8>>,
    ) -> PyResult<()> {
        check_ndim(&tokens, "tokens", 1)?;
        check_ndim(&offsets, "offsets", 1)?;
        let tokens = readonly_slice(py, &tokens)?;
        let offsets = readonly_slice(py, &offsets)?;
        let mask = match &mask {
            Some(mask) => {
                check_ndim(mask, "mask", 1)?;
                Some(readonly_slice(py, mask)?)
            }
            None => None,
        };
        let inner = &mut self.inner;
        py.detach(|| inner.push_masked(tokens, offsets, mask)).map_err(to_py_err)
    }

    /// Mark the end of the stream: later top-ups take whatever is left.
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

    /// Counters (docs_in, tokens_in, tokens_placed, tokens_cropped, docs_placed, docs_cropped,
    /// rows_packed, tokens_padded), plus what is currently held in the buffer and the pending queue.
    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let d = PyDict::new(py);
        for (k, v) in self.inner.stats().named() {
            d.set_item(k, v)?;
        }
        d.set_item("docs_buffered", self.inner.docs_buffered())?;
        d.set_item("tokens_buffered", self.inner.tokens_buffered())?;
        d.set_item("docs_pending", self.inner.docs_pending())?;
        d.set_item("tokens_pending", self.inner.tokens_pending())?;
        Ok(d)
    }

    /// The full state as a JSON-serialisable dict (documents as base64 of their tokens).
    fn state_dict<'py>(&mut self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let (inner, texts) = (&self.inner, &mut self.texts);
        let value = py.detach(|| inner.state_value(texts));
        to_python(py, &value)
    }

    /// Replace the whole state by one from `state_dict()` of a packer with the same configuration.
    /// Every key is checked (TypeError for a wrong type, ValueError for a wrong value, including
    /// counters without room to grow); on error nothing changes.
    fn load_state_dict(&mut self, py: Python<'_>, state: &Bound<'_, PyAny>) -> PyResult<()> {
        let value = to_value(state, 0)?;
        let (inner, texts) = (&mut self.inner, &mut self.texts);
        py.detach(|| inner.load_state_value(&value, texts)).map_err(to_py_err)
    }
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyPacker>()?;
    m.add("PACKER_STATE_FORMAT", STATE_FORMAT)?;
    m.add("PACKER_STATE_VERSION", STATE_VERSION)?;
    Ok(())
}
