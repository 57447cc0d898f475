//! The one PyO3 crate: thin wrappers exposing the pure-Rust crates as `nanochat_rs._native`.
//! It only converts types and releases the GIL around real work; all logic lives in the crates.

use pyo3::prelude::*;

mod buffers;
mod packer;
mod tokenizer;

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    tokenizer::register(m)?;
    packer::register(m)?;
    Ok(())
}
