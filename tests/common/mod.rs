//! What several integration tests share.

/// Serialises the tests of one test binary that build autodiff graphs and call `backward()`.
/// Burn 0.21's `backward()` sweeps every graph of the process at its end and can free a step of a
/// graph that another thread is still building, so a parameter's gradient goes missing without
/// an error (tracel-ai/burn#5573); the test harness runs tests on several threads.
pub fn autodiff_lock() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    // A test that failed while holding the lock poisons it; the next one may still run.
    LOCK.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}
