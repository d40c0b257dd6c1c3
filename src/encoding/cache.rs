//! A process-wide cache of data-independent tables: distance matrices, causal masks, T5 bucket
//! ids, RoPE cos/sin, Sandwich's inner products.
//!
//! These depend only on the [`Span`](super::Span) (and an encoding's fixed settings), never on
//! the data or on learned parameters, so every layer of a forward and every training step at the
//! same length would otherwise rebuild the same tensor (the T5 buckets and RoPE tables on the
//! host, element by element). They are built once per (backend, device, table, span) and reused.
//!
//! The cache is bounded: a table of more than [`MAX_TABLE_ELEMENTS`] elements is built and not
//! kept, and entries are evicted least-recently-used first once the kept tables exceed
//! [`BUDGET_ELEMENTS`] elements in all (32 MiB of `f32`). Cached tensors are plain constants:
//! on an autodiff backend they are untracked leaves, so sharing them between graphs is safe.
//! [`table_cache_stats`] reports hits and builds (the benches and `dape bench` print them);
//! [`clear_table_cache`] frees everything.

use std::any::{Any, TypeId};
use std::collections::VecDeque;
use std::sync::Mutex;

use burn::prelude::*;

/// Largest single table that is kept (elements).
pub const MAX_TABLE_ELEMENTS: usize = 1 << 20;
/// Total elements kept across all tables before least-recently-used eviction.
pub const BUDGET_ELEMENTS: usize = 1 << 23;

#[derive(Clone, Debug, PartialEq, Eq)]
struct Key {
    backend: TypeId,
    device: String,
    table: String,
}

struct Entry {
    key: Key,
    elements: usize,
    value: Box<dyn Any + Send + Sync>,
}

#[derive(Default)]
struct Cache {
    entries: VecDeque<Entry>,
    elements: usize,
    hits: u64,
    builds: u64,
}

static CACHE: Mutex<Cache> = Mutex::new(Cache {
    entries: VecDeque::new(),
    elements: 0,
    hits: 0,
    builds: 0,
});

fn lock() -> std::sync::MutexGuard<'static, Cache> {
    // A panic while holding the lock cannot leave the cache inconsistent (every update is a
    // single push or removal), so a poisoned lock is still usable.
    CACHE.lock().unwrap_or_else(|e| e.into_inner())
}

/// Counters of the table cache since the start of the process (or the last
/// [`clear_table_cache`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct TableCacheStats {
    /// Lookups answered from the cache.
    pub hits: u64,
    /// Tables built (a miss, or a table too large to keep).
    pub builds: u64,
    /// Tables kept now.
    pub entries: usize,
    /// Elements kept now.
    pub elements: usize,
}

/// The cache's counters.
pub fn table_cache_stats() -> TableCacheStats {
    let c = lock();
    TableCacheStats {
        hits: c.hits,
        builds: c.builds,
        entries: c.entries.len(),
        elements: c.elements,
    }
}

/// Drops every cached table and resets the counters.
pub fn clear_table_cache() {
    let mut c = lock();
    *c = Cache::default();
}

/// The table named `table` for backend `B` on `device`, built by `build` on a miss.
///
/// `table` must name everything the table depends on (the span and any settings); `elements`
/// is its size, used for the budget. The builder runs without the lock held, so it may itself
/// use the cache.
pub fn cached<B, T>(
    device: &B::Device,
    table: impl FnOnce() -> String,
    elements: usize,
    build: impl FnOnce() -> T,
) -> T
where
    B: Backend,
    T: Clone + Send + Sync + 'static,
{
    if elements > MAX_TABLE_ELEMENTS {
        lock().builds += 1;
        return build();
    }
    let key = Key {
        backend: TypeId::of::<B>(),
        device: format!("{device:?}"),
        table: table(),
    };
    {
        let mut c = lock();
        if let Some(pos) = c.entries.iter().position(|e| e.key == key) {
            let entry = c.entries.remove(pos).expect("position is in range");
            let value = entry.value.downcast_ref::<T>().cloned();
            c.entries.push_back(entry);
            if let Some(v) = value {
                c.hits += 1;
                return v;
            }
        }
    }
    let value = build();
    let mut c = lock();
    c.builds += 1;
    if !c.entries.iter().any(|e| e.key == key) {
        while c.elements + elements > BUDGET_ELEMENTS {
            match c.entries.pop_front() {
                Some(old) => c.elements -= old.elements,
                None => break,
            }
        }
        c.elements += elements;
        c.entries.push_back(Entry {
            key,
            elements,
            value: Box::new(value.clone()),
        });
    }
    value
}
