//! The retry budget: a token bucket shared by every call of one client, so that a sustained
//! outage makes the client stop retrying instead of multiplying its load on a struggling server.
//!
//! A first attempt is always free. Each retry withdraws one token; each call the server answered
//! definitively deposits a fraction of one. In steady state retries therefore stay below a fixed
//! share of traffic, and after an outage the bucket refills as calls start succeeding again.

use std::sync::Mutex;

/// How many retries a full bucket pays for: enough to ride out a short blip across a few calls,
/// few enough that a dead server sees a handful of extra requests, not a storm.
pub const MAX_RETRIES_DEFAULT: u32 = 20;

/// How many answered calls earn one retry back: retries settle at about a tenth of traffic.
pub const SUCCESSES_PER_RETRY_DEFAULT: u32 = 10;

/// A token bucket of retries, counted in shares so that refunds stay exact integers.
#[derive(Debug)]
pub struct RetryBudget {
    /// Shares in the bucket. A std mutex is enough: it is held for a few instructions and never
    /// across an await.
    shares: Mutex<u64>,
    /// The most shares the bucket holds.
    capacity_shares: u64,
    /// Shares one retry costs; one answered call deposits one share.
    shares_per_retry: u64,
}

impl RetryBudget {
    /// A full bucket holding `max_retries` retries; every `successes_per_retry` answered calls
    /// earn one retry back.
    pub fn new(max_retries: u32, successes_per_retry: u32) -> Self {
        let shares_per_retry = u64::from(successes_per_retry.max(1));
        let capacity_shares = u64::from(max_retries) * shares_per_retry;
        Self {
            shares: Mutex::new(capacity_shares),
            capacity_shares,
            shares_per_retry,
        }
    }

    /// Takes the cost of one retry; false when the bucket cannot pay for it.
    pub fn try_withdraw(&self) -> bool {
        let mut shares = self.lock();
        if *shares < self.shares_per_retry {
            return false;
        }
        *shares -= self.shares_per_retry;
        true
    }

    /// Credits one answered call, up to the capacity.
    pub fn deposit(&self) {
        let mut shares = self.lock();
        *shares = (*shares + 1).min(self.capacity_shares);
    }

    /// How many whole retries the bucket can pay for now.
    pub fn retries_available(&self) -> u64 {
        *self.lock() / self.shares_per_retry
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, u64> {
        // The guarded value is a plain counter that no panic can leave half-updated.
        self.shares
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl Default for RetryBudget {
    fn default() -> Self {
        Self::new(MAX_RETRIES_DEFAULT, SUCCESSES_PER_RETRY_DEFAULT)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_bucket_pays_for_exactly_its_retries() {
        let budget = RetryBudget::new(3, 10);

        let granted = (0..5).filter(|_| budget.try_withdraw()).count();

        assert_eq!(granted, 3);
        assert_eq!(budget.retries_available(), 0);
    }

    #[test]
    fn answered_calls_earn_a_retry_back_only_in_whole_shares() {
        let budget = RetryBudget::new(2, 4);
        while budget.try_withdraw() {}

        (0..3).for_each(|_| budget.deposit());
        let after_three = budget.try_withdraw();
        budget.deposit();
        let after_four = budget.try_withdraw();

        assert!(!after_three);
        assert!(after_four);
    }

    #[test]
    fn deposits_never_raise_the_bucket_above_its_capacity() {
        let budget = RetryBudget::new(2, 4);

        (0..100).for_each(|_| budget.deposit());

        assert_eq!(budget.retries_available(), 2);
    }
}
