//! Every byte the crate writes to a file goes through [`write_all`], so that a full disk can be
//! recognised ([`is_full`]) and named, and so that tests can make the disk fill up on demand.
//!
//! A full disk is the fault a long training grid is most likely to meet. To test what each
//! writer does then without a small filesystem (which needs root), a process can give itself a
//! *write budget*: after that many more bytes, every write through [`write_all`] fails with
//! [`std::io::ErrorKind::StorageFull`], as `ENOSPC` does, having written what still fitted. Set it
//! with [`set_write_budget`], or for a whole process (the CLI, a script's run) with the
//! environment variable `DAPE_WRITE_BUDGET_BYTES`, read on the first write. Without either,
//! writes are unlimited and cost one relaxed atomic load.
//!
//! This module imports nothing of the crate.

use std::io::{ErrorKind, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Once;

/// Bytes left before writes fail; `u64::MAX` means no budget.
static BUDGET: AtomicU64 = AtomicU64::new(u64::MAX);
static FROM_ENV: Once = Once::new();

/// The environment variable that sets a process's write budget, in bytes.
pub const BUDGET_VAR: &str = "DAPE_WRITE_BUDGET_BYTES";

/// Fault injection: after `bytes` more bytes, every write through [`write_all`] fails as on a
/// full disk; `None` lifts the limit ("space was freed"). The budget is process-wide.
pub fn set_write_budget(bytes: Option<u64>) {
    FROM_ENV.call_once(|| {});
    BUDGET.store(bytes.unwrap_or(u64::MAX), Ordering::SeqCst);
}

/// Reads `DAPE_WRITE_BUDGET_BYTES` once, unless [`set_write_budget`] came first.
fn budget_from_env() {
    FROM_ENV.call_once(|| {
        if let Some(bytes) = std::env::var(BUDGET_VAR)
            .ok()
            .and_then(|v| v.trim().parse::<u64>().ok())
        {
            BUDGET.store(bytes, Ordering::SeqCst);
        }
    });
}

/// Takes up to `wanted` bytes from `budget`; returns how many may be written.
fn reserve(budget: &AtomicU64, wanted: usize) -> usize {
    let mut left = budget.load(Ordering::Relaxed);
    loop {
        if left == u64::MAX {
            return wanted;
        }
        let granted = left.min(wanted as u64);
        match budget.compare_exchange_weak(
            left,
            left - granted,
            Ordering::SeqCst,
            Ordering::Relaxed,
        ) {
            Ok(_) => return granted as usize,
            Err(now) => left = now,
        }
    }
}

/// The error a write meets on a full disk (also what the write budget's end returns).
pub fn full_disk_error() -> std::io::Error {
    std::io::Error::new(ErrorKind::StorageFull, "No space left on device")
}

/// Writes all of `data` to `writer`, within the write budget: when the budget ends part-way,
/// writes the part that fits and fails with [`full_disk_error`].
pub fn write_all<W: Write + ?Sized>(writer: &mut W, data: &[u8]) -> std::io::Result<()> {
    budget_from_env();
    write_within(&BUDGET, writer, data)
}

/// [`write_all`] against the given budget.
fn write_within<W: Write + ?Sized>(
    budget: &AtomicU64,
    writer: &mut W,
    data: &[u8],
) -> std::io::Result<()> {
    let granted = reserve(budget, data.len());
    writer.write_all(&data[..granted])?;
    if granted < data.len() {
        return Err(full_disk_error());
    }
    Ok(())
}

/// Whether `error` says the disk (or the user's quota on it) is full.
pub fn is_full(error: &std::io::Error) -> bool {
    matches!(
        error.kind(),
        ErrorKind::StorageFull | ErrorKind::QuotaExceeded
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_budget_writes_what_fits_then_fails_as_a_full_disk() {
        // A budget of its own: the process-wide one would fail other tests' writes.
        let budget = AtomicU64::new(5);
        let mut out = Vec::new();
        write_within(&budget, &mut out, b"abc").unwrap();
        let err = write_within(&budget, &mut out, b"defg").unwrap_err();
        assert!(is_full(&err), "{err}");
        assert_eq!(out, b"abcde");
        budget.store(u64::MAX, Ordering::SeqCst);
        write_within(&budget, &mut out, b"fg").unwrap();
        assert_eq!(out, b"abcdefg");
    }
}
