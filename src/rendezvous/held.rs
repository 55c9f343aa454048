//! Idle bookkeeping of a rendezvous connection: whether it holds an exchange (or a relay
//! slot), and since when it has held none. The serve loop evicts on it; slots hold it.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The book's clock: tokio's, so a test that pauses time moves the book's time too.
pub(super) fn now() -> Instant {
    tokio::time::Instant::now().into_std()
}

/// Whether a connection holds an exchange, and since when it has held none: what idle
/// eviction reads.
#[derive(Debug)]
pub(super) struct Held(Mutex<(usize, Instant)>);

impl Held {
    pub(super) fn new() -> Arc<Held> {
        Arc::new(Held(Mutex::new((0, now()))))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, (usize, Instant)> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(super) fn enter(held: &Arc<Held>) -> Holding {
        held.lock().0 += 1;
        Holding(held.clone())
    }

    /// When to evict if nothing changes: `None` while an exchange is held.
    pub(super) fn evict_at(&self, grace: Duration) -> Option<Instant> {
        let (count, since) = *self.lock();
        (count == 0).then(|| since + grace)
    }
}

/// One held exchange (or a live relay slot); when the last one ends, the grace starts
/// again.
pub(super) struct Holding(Arc<Held>);

impl Drop for Holding {
    fn drop(&mut self) {
        let mut held = self.0.lock();
        held.0 -= 1;
        if held.0 == 0 {
            held.1 = now();
        }
    }
}
