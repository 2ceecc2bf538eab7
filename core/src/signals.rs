//! In-process wake-ups for duplicates waiting on a key that another request is executing.
//!
//! A waiter subscribes *before* it looks at the store, then awaits the subscription; the owner
//! notifies *after* its outcome is stored. Whatever the interleaving, a waiter therefore either
//! sees the stored outcome or is woken after it, and never sleeps through a completion. Waiters
//! on other processes cannot be woken this way; they poll the store instead.

use std::collections::HashMap;
use std::future::Future;
use std::hash::Hash;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};

use crate::sync::{Arc, Mutex, lock};

/// One key's notification point: a generation counter and the tasks waiting for it to move.
#[derive(Default)]
struct Slot {
    state: Mutex<SlotState>,
}

#[derive(Default)]
struct SlotState {
    generation: u64,
    wakers: Vec<Waker>,
}

/// A registry of keys that have waiters.
pub struct Signals<K> {
    slots: Mutex<HashMap<K, Arc<Slot>>>,
}

impl<K: Hash + Eq + Clone> Default for Signals<K> {
    fn default() -> Self {
        Self {
            slots: Mutex::new(HashMap::new()),
        }
    }
}

impl<K: Hash + Eq + Clone> Signals<K> {
    /// Starts listening for the next notification of `key`.
    pub fn subscribe(this: &Arc<Self>, key: &K) -> Subscription<K> {
        let slot = lock(&this.slots).entry(key.clone()).or_default().clone();
        let seen = lock(&slot.state).generation;
        Subscription {
            signals: this.clone(),
            key: key.clone(),
            slot,
            seen,
        }
    }

    /// Wakes every subscriber of `key`.
    ///
    /// The slot leaves the map here: everyone subscribed so far is woken through it, and later
    /// subscribers start a fresh one. Taking it out under the map lock also means no reference
    /// to a slot ever exists outside the map's bookkeeping, which the cleanup in `Drop` counts on.
    pub fn notify(&self, key: &K) {
        let Some(slot) = lock(&self.slots).remove(key) else {
            return;
        };
        let wakers = {
            let mut state = lock(&slot.state);
            state.generation += 1;
            std::mem::take(&mut state.wakers)
        };
        for waker in wakers {
            waker.wake();
        }
    }

    /// How many keys have live subscribers (for tests and metrics).
    pub fn keys_waited_on(&self) -> usize {
        lock(&self.slots).len()
    }
}

/// A future that completes at the first notification of its key after it was created.
pub struct Subscription<K: Hash + Eq + Clone> {
    signals: Arc<Signals<K>>,
    key: K,
    slot: Arc<Slot>,
    seen: u64,
}

impl<K: Hash + Eq + Clone> Future for Subscription<K> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let mut state = lock(&self.slot.state);
        if state.generation != self.seen {
            return Poll::Ready(());
        }
        if !state.wakers.iter().any(|waker| waker.will_wake(cx.waker())) {
            state.wakers.push(cx.waker().clone());
        }
        Poll::Pending
    }
}

impl<K: Hash + Eq + Clone> Drop for Subscription<K> {
    fn drop(&mut self) {
        // The last subscriber removes the slot, so keys nobody waits on cost nothing.
        let mut slots = lock(&self.signals.slots);
        let ours = slots
            .get(&self.key)
            .is_some_and(|slot| Arc::ptr_eq(slot, &self.slot));
        // Two references remain when we are the last subscriber: the map's and ours.
        if ours && Arc::strong_count(&self.slot) == 2 {
            slots.remove(&self.key);
        }
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use std::pin::pin;
    use std::task::{Context, Poll, Waker};

    use super::*;

    fn poll(subscription: &mut Subscription<&'static str>) -> Poll<()> {
        pin!(subscription).poll(&mut Context::from_waker(Waker::noop()))
    }

    #[test]
    fn a_subscription_completes_only_after_a_notification_of_its_key() {
        let signals = Arc::new(Signals::default());
        let mut subscription = Signals::subscribe(&signals, &"a");
        assert_eq!(poll(&mut subscription), Poll::Pending);
        signals.notify(&"b");
        assert_eq!(
            poll(&mut subscription),
            Poll::Pending,
            "another key's notification"
        );
        signals.notify(&"a");
        assert_eq!(poll(&mut subscription), Poll::Ready(()));
    }

    #[test]
    fn a_notification_before_subscribing_is_not_seen() {
        let signals = Arc::new(Signals::default());
        signals.notify(&"a");
        let mut subscription = Signals::subscribe(&signals, &"a");
        assert_eq!(poll(&mut subscription), Poll::Pending);
    }

    #[test]
    fn a_key_is_forgotten_when_its_last_subscriber_goes() {
        let signals = Arc::new(Signals::default());
        let first = Signals::subscribe(&signals, &"a");
        let second = Signals::subscribe(&signals, &"a");
        assert_eq!(signals.keys_waited_on(), 1);
        drop(first);
        assert_eq!(signals.keys_waited_on(), 1, "one subscriber is left");
        drop(second);
        assert_eq!(signals.keys_waited_on(), 0);
    }

    #[test]
    fn a_stale_subscription_does_not_remove_a_newer_slot() {
        let signals = Arc::new(Signals::default());
        let stale = Signals::subscribe(&signals, &"a");
        signals.notify(&"a");
        let fresh = Signals::subscribe(&signals, &"a");
        drop(stale);
        assert_eq!(
            signals.keys_waited_on(),
            1,
            "the fresh subscriber's slot stays"
        );
        drop(fresh);
        assert_eq!(signals.keys_waited_on(), 0);
    }
}
