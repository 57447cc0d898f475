//! Running parallel work on a chosen number of threads (`num_threads=` in Python).
//!
//! Requests are bounded twice: more than [`MAX_NUM_THREADS`] is an error (a typo such as 100000
//! would otherwise try to start that many threads), and the pool actually used never has more
//! than [`pool_size`] threads, since this CPU-bound work gains nothing from more threads than a
//! few per core. Pools are kept in a small least-recently-used cache: starting threads on every
//! call costs time, but keeping a pool for every size ever asked for leaks their threads.

use std::sync::{Arc, Mutex, PoisonError};

use rayon::{ThreadPool, ThreadPoolBuilder};

use crate::TokenizerError;

/// Largest `num_threads` accepted.
pub const MAX_NUM_THREADS: usize = 1024;

/// Most threads in one pool, whatever the number of cores.
const MAX_POOL_THREADS: usize = 256;

/// Pools kept alive between calls.
const CACHED_POOLS: usize = 4;

/// Threads a request for `requested` (already checked) runs on: at most 4 per core and at most
/// 256 in all.
pub fn pool_size(requested: usize) -> usize {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    requested.clamp(1, cores.saturating_mul(4).min(MAX_POOL_THREADS))
}

/// Check a requested thread count: 1 to [`MAX_NUM_THREADS`].
pub fn check_num_threads(requested: usize) -> Result<usize, TokenizerError> {
    if requested == 0 {
        return Err(TokenizerError::InvalidThreads("num_threads must be at least 1".into()));
    }
    if requested > MAX_NUM_THREADS {
        return Err(TokenizerError::InvalidThreads(format!(
            "num_threads must be at most {MAX_NUM_THREADS}, got {requested} (None uses all cores)"
        )));
    }
    Ok(requested)
}

/// Pools by size, least recently used first.
struct PoolCache {
    pools: Vec<(usize, Arc<ThreadPool>)>,
    capacity: usize,
}

impl PoolCache {
    const fn new(capacity: usize) -> Self {
        PoolCache { pools: Vec::new(), capacity }
    }

    fn get(&mut self, size: usize) -> Result<Arc<ThreadPool>, TokenizerError> {
        let pool = match self.pools.iter().position(|(n, _)| *n == size) {
            Some(i) => self.pools.remove(i).1,
            None => Arc::new(
                ThreadPoolBuilder::new()
                    .num_threads(size)
                    .build()
                    .map_err(|e| TokenizerError::ThreadPool(format!("cannot start {size} threads: {e}")))?,
            ),
        };
        self.pools.push((size, pool.clone()));
        if self.pools.len() > self.capacity {
            // Its threads exit once no call still running on it holds the pool.
            self.pools.remove(0);
        }
        Ok(pool)
    }
}

static POOLS: Mutex<PoolCache> = Mutex::new(PoolCache::new(CACHED_POOLS));

/// Run `work` (which uses rayon's parallel iterators) on `num_threads` threads, capped at
/// [`pool_size`]; `None` runs it on rayon's global pool (all cores).
pub fn with_threads<R: Send>(num_threads: Option<usize>, work: impl FnOnce() -> R + Send) -> Result<R, TokenizerError> {
    let Some(requested) = num_threads else { return Ok(work()) };
    let size = pool_size(check_num_threads(requested)?);
    // A panic while the lock was held cannot leave the cache inconsistent: keep using it.
    let pool = POOLS.lock().unwrap_or_else(PoisonError::into_inner).get(size)?;
    Ok(pool.install(work))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_checked_and_capped() {
        assert!(matches!(check_num_threads(0), Err(TokenizerError::InvalidThreads(_))));
        let too_many = check_num_threads(MAX_NUM_THREADS + 1).unwrap_err();
        assert!(too_many.to_string().contains("at most 1024"), "{too_many}");
        assert_eq!(check_num_threads(MAX_NUM_THREADS), Ok(MAX_NUM_THREADS));
        assert_eq!(pool_size(1), 1);
        let cap = pool_size(MAX_NUM_THREADS);
        assert!((4..=MAX_POOL_THREADS).contains(&cap), "{cap}");
        assert_eq!(pool_size(usize::MAX), cap);
    }

    #[test]
    fn work_runs_on_the_capped_pool() {
        assert_eq!(with_threads(Some(2), rayon::current_num_threads), Ok(pool_size(2)));
        assert_eq!(with_threads(Some(MAX_NUM_THREADS), rayon::current_num_threads), Ok(pool_size(MAX_NUM_THREADS)));
        assert!(with_threads(Some(MAX_NUM_THREADS + 1), || ()).is_err());
        assert_eq!(with_threads(None, rayon::current_num_threads), Ok(rayon::current_num_threads()));
    }

    #[test]
    fn the_cache_keeps_the_most_recently_used_pools() {
        let mut cache = PoolCache::new(2);
        let one = cache.get(1).unwrap();
        cache.get(2).unwrap();
        assert!(Arc::ptr_eq(&one, &cache.get(1).unwrap()), "a cached pool is reused");
        cache.get(3).unwrap(); // evicts 2, the least recently used
        let sizes: Vec<usize> = cache.pools.iter().map(|(n, _)| *n).collect();
        assert_eq!(sizes, vec![1, 3]);
        for size in 1..=20 {
            cache.get(size).unwrap();
            assert!(cache.pools.len() <= 2);
        }
        // An evicted pool lives on only as long as somebody still holds it.
        assert_eq!(Arc::strong_count(&one), 1);
    }
}
