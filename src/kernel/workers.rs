//! The calling thread as one of the CPU kernels' workers.
//!
//! The ndarray kernels split their work with rayon's fork-join. Called from a thread outside
//! rayon's pool (by default the program's main thread), every parallel op is a hop: the caller
//! queues the job, wakes a worker, sleeps until the job is done and is woken again, while the
//! serial code between ops runs on a thread that computed none of the op's data. A training
//! step at 128 × 8 runs about a thousand such ops, and on a small VM each wake-up of a sleeping
//! vCPU is slow and uneven. [`join_compute_pool`] makes the calling thread worker 0 of rayon's
//! global pool instead: an op then forks from the thread that runs the step, which computes
//! its own share, and only the other workers are ever woken. On a 2-core VM the process makes
//! about a fifth of the context switches, and the step is faster where the cores are shared
//! (`docs/src/performance.md`, issue 39).

/// Builds rayon's global pool (the ndarray kernels' threads) with the calling thread as its
/// worker 0 and `RAYON_NUM_THREADS` (default: one per core) threads in all, the caller
/// included, so that parallel ops called from this thread run on it without a hop. Call it
/// once, first thing in `main`, from the thread that will run the model.
///
/// Returns whether the pool was built so: `false` with a single thread (there is no one to
/// share the work with, and a lone worker that blocks outside rayon could starve the pool),
/// when the global pool exists already, or without the `ndarray` feature. Either way the
/// kernels work as before.
pub fn join_compute_pool() -> bool {
    #[cfg(feature = "ndarray")]
    {
        let threads = std::env::var("RAYON_NUM_THREADS")
            .ok()
            .and_then(|n| n.parse::<usize>().ok())
            .filter(|&n| n > 0)
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
        threads > 1
            && rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .use_current_thread()
                .build_global()
                .is_ok()
    }
    #[cfg(not(feature = "ndarray"))]
    {
        false
    }
}
