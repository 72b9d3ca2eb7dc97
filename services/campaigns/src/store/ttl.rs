//! A small map whose entries are trusted for a fixed time: the per-workspace lists and
//! settings the hot paths read on every batch, refreshed from Postgres when stale.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

type Entries<V> = HashMap<String, (Instant, V)>;

/// Values by workspace, each trusted for `ttl`.
#[derive(Debug, Clone)]
pub struct TtlMap<V> {
    ttl: Duration,
    entries: Arc<Mutex<Entries<V>>>,
}

impl<V: Clone> TtlMap<V> {
    pub fn new(ttl: Duration) -> TtlMap<V> {
        TtlMap {
            ttl,
            entries: Arc::new(Mutex::new(HashMap::new())),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Entries<V>> {
        // A poisoned map still holds usable entries.
        self.entries
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The value, unless absent or stale.
    pub fn get(&self, key: &str) -> Option<V> {
        match self.lock().get(key) {
            Some((at, value)) if at.elapsed() < self.ttl => Some(value.clone()),
            _ => None,
        }
    }

    pub fn put(&self, key: &str, value: V) {
        self.lock().insert(key.to_owned(), (Instant::now(), value));
    }

    pub fn forget(&self, key: &str) {
        self.lock().remove(key);
    }

    pub fn clear(&self) {
        self.lock().clear();
    }
}
