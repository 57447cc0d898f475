//! `num_threads=` support: run parallel work in a rayon pool of that size (all cores when None).

use std::sync::{Arc, Mutex};

use pyo3::exceptions::{PyRuntimeError, PyValueError};
use pyo3::PyResult;
use rayon::ThreadPool;

/// Pools are built once per size and reused: building one per call would cost thread start-ups.
static POOLS: Mutex<Vec<(usize, Arc<ThreadPool>)>> = Mutex::new(Vec::new());

fn pool(num_threads: usize) -> PyResult<Arc<ThreadPool>> {
    let mut pools = POOLS.lock().map_err(|_| PyRuntimeError::new_err("thread pool registry poisoned"))?;
    if let Some((_, p)) = pools.iter().find(|(n, _)| *n == num_threads) {
        return Ok(p.clone());
    }
    let p = Arc::new(
        rayon::ThreadPoolBuilder::new()
            .num_threads(num_threads)
            .build()
            .map_err(|e| PyRuntimeError::new_err(format!("cannot start {num_threads} threads: {e}")))?,
    );
    pools.push((num_threads, p.clone()));
    Ok(p)
}

/// Run `work` with rayon's parallel iterators using `num_threads` threads. Call without the GIL.
pub fn in_pool<R: Send>(num_threads: Option<usize>, work: impl FnOnce() -> R + Send) -> PyResult<R> {
    match num_threads {
        None => Ok(work()),
        Some(0) => Err(PyValueError::new_err("num_threads must be at least 1")),
        Some(n) => Ok(pool(n)?.install(work)),
    }
}
