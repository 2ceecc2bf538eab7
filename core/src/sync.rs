//! The synchronisation primitives of the crate, swapped for loom's under `--cfg loom`.
//!
//! Every lock and atomic that the in-memory store and the duplicate signals use comes from here,
//! so a loom model explores exactly the code that production runs.

#[cfg(loom)]
pub(crate) use loom::sync::atomic::{AtomicU64, Ordering};
#[cfg(loom)]
pub(crate) use loom::sync::{Arc, Mutex, MutexGuard};

#[cfg(not(loom))]
pub(crate) use std::sync::atomic::{AtomicU64, Ordering};
#[cfg(not(loom))]
pub(crate) use std::sync::{Arc, Mutex, MutexGuard};

/// Lets another thread run (a scheduling point for loom).
#[allow(dead_code)]
pub(crate) fn yield_now() {
    #[cfg(loom)]
    loom::thread::yield_now();
    #[cfg(not(loom))]
    std::thread::yield_now();
}

/// Locks a mutex, carrying on with the data if a panicking thread poisoned it.
///
/// Every critical section in this crate leaves its data consistent before it can panic (the
/// writes come last), so a poisoned lock still guards valid state.
pub(crate) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    match mutex.lock() {
        Ok(guard) => guard,
        Err(poisoned) => poisoned.into_inner(),
    }
}
