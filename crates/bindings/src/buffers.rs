//! Borrowing Python buffers (numpy arrays, Arrow buffers) as Rust slices without copying.
//!
//! The slices are used with the GIL released, which is the point: encoding and packing run while
//! other Python threads (e.g. the training loop) keep going.

use pyo3::buffer::{Element, PyBuffer};
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;

/// Read-only view of a C-contiguous buffer of `T`.
pub fn readonly_slice<'a, T: Element>(_py: Python<'_>, buf: &'a PyBuffer<T>) -> PyResult<&'a [T]> {
    check_layout(buf)?;
    let len = buf.item_count();
    if len == 0 {
        return Ok(&[]);
    }
    // SAFETY: `PyBuffer<T>` verified that the item format and size are those of `T`; `check_layout`
    // verified C-contiguity and alignment, so `len` items of `T` start at `buf_ptr()`. The memory
    // stays valid while `buf` (which holds the exporter's Py_buffer) is alive, which the returned
    // lifetime enforces. Exporters we accept (numpy arrays, immutable Arrow buffers) are not
    // resized while a buffer export is held; a caller mutating the contents from another thread
    // while we read gets unspecified values but no memory unsafety on these plain-data element types.
    Ok(unsafe { std::slice::from_raw_parts(buf.buf_ptr() as *const T, len) })
}

/// Mutable view of a writable C-contiguous buffer of `T`, for writing results in place.
#[allow(clippy::mut_from_ref)]
pub fn writable_slice<'a, T: Element>(_py: Python<'_>, buf: &'a PyBuffer<T>) -> PyResult<&'a mut [T]> {
    check_layout(buf)?;
    if buf.readonly() {
        return Err(PyValueError::new_err("output buffer is read-only"));
    }
    let len = buf.item_count();
    if len == 0 {
        return Ok(&mut []);
    }
    // SAFETY: as in `readonly_slice`, plus the exporter reported the buffer writable. Each call
    // site takes distinct buffers (checked by the caller where two are written), so no two live
    // mutable slices alias.
    Ok(unsafe { std::slice::from_raw_parts_mut(buf.buf_ptr() as *mut T, len) })
}

fn check_layout<T: Element>(buf: &PyBuffer<T>) -> PyResult<()> {
    if !buf.is_c_contiguous() {
        return Err(PyValueError::new_err("buffer must be C-contiguous"));
    }
    if buf.item_count() > 0 && !(buf.buf_ptr() as usize).is_multiple_of(std::mem::align_of::<T>()) {
        return Err(PyTypeError::new_err("buffer is not aligned for its element type"));
    }
    Ok(())
}
