//! Places counted per key, at most a given number each: connections per source address in
//! [`crate::serve`], and in the control plane browser sockets per user and metrics batches in
//! flight per agent. A place is given back when its [`Slot`] is dropped, whichever way its
//! holder ends. (Not a seam to the outside; it lives here because the server loop needs it
//! and the control plane builds on the server loop.)

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

/// Open places per key; keys with none are not kept.
#[derive(Debug)]
pub struct KeyedSlots<K: Ord + Clone> {
    open: Mutex<BTreeMap<K, usize>>,
}

impl<K: Ord + Clone> Default for KeyedSlots<K> {
    fn default() -> KeyedSlots<K> {
        KeyedSlots {
            open: Mutex::new(BTreeMap::new()),
        }
    }
}

/// One place of one key; dropping it frees the place.
#[derive(Debug)]
pub struct Slot<K: Ord + Clone> {
    slots: Arc<KeyedSlots<K>>,
    key: K,
}

impl<K: Ord + Clone> KeyedSlots<K> {
    fn lock(&self) -> MutexGuard<'_, BTreeMap<K, usize>> {
        self.open.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A place for `key`, unless it holds `max` already.
    pub fn acquire(self: &Arc<Self>, key: &K, max: usize) -> Option<Slot<K>> {
        let mut open = self.lock();
        let n = open.entry(key.clone()).or_insert(0);
        if *n >= max {
            if *n == 0 {
                open.remove(key);
            }
            return None;
        }
        *n += 1;
        Some(Slot {
            slots: Arc::clone(self),
            key: key.clone(),
        })
    }
}

impl<K: Ord + Clone> Drop for Slot<K> {
    fn drop(&mut self) {
        let mut open = self.slots.lock();
        if let Some(n) = open.get_mut(&self.key) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                open.remove(&self.key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::KeyedSlots;

    #[test]
    fn each_key_holds_at_most_max_and_a_dropped_slot_frees_its_place() {
        let slots: Arc<KeyedSlots<String>> = Arc::default();
        let a = "a".to_string();
        let first = slots.acquire(&a, 2).expect("first");
        let _second = slots.acquire(&a, 2).expect("second");
        assert!(slots.acquire(&a, 2).is_none(), "a is full");
        assert!(slots.acquire(&"b".to_string(), 2).is_some(), "b is not");
        drop(first);
        assert!(slots.acquire(&a, 2).is_some(), "a place came back");
        assert!(slots.acquire(&a, 0).is_none());
        drop(_second);
        assert!(slots.lock().is_empty(), "keys with no place are not kept");
    }
}
