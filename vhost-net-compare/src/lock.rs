//! Mutex locking that survives poisoning.
//!
//! A panic on one thread (which guest input must never cause, but a bug might) must not take
//! the other VM down with it: the shared state stays usable, so locks ignore poisoning.

use std::sync::{Mutex, MutexGuard};

/// Locks `m`, taking the data even if a previous holder panicked.
pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}
