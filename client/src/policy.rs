//! The retry policy: which answers are worth retrying, and how long to wait before the next try.
//!
//! Backoff is exponential with full jitter: the wait after attempt `n` (counting from 0) is drawn
//! uniformly from `0 ..= min(max_delay, base_delay * 2^n)`. Jitter spreads the retries of many
//! clients hit by the same failure, so they do not return to the server in lockstep.

use std::time::Duration;

use crate::random::{Random, uniform_up_to};

/// The first backoff ceiling: long enough that a retry is not the same instant as the failure,
/// short enough that a one-off blip costs a user almost nothing.
pub const BASE_DELAY_DEFAULT: Duration = Duration::from_millis(100);

/// The highest backoff ceiling: past a few seconds a longer wait no longer helps a server recover
/// and only delays the caller.
pub const MAX_DELAY_DEFAULT: Duration = Duration::from_secs(5);

/// Attempts per call, the first included: five covers a restart or a failover without hammering.
pub const MAX_ATTEMPTS_DEFAULT: u32 = 5;

/// How long one call may take in all, retries and waits included: a caller waiting longer than
/// this is better served by an "outcome unknown" it can resolve later.
pub const DEADLINE_DEFAULT: Duration = Duration::from_secs(30);

/// How long one attempt may take: above the server's default two-second wait for a running
/// duplicate, with room for the request itself.
pub const ATTEMPT_TIMEOUT_DEFAULT: Duration = Duration::from_secs(10);

/// The time limits and backoff of one client's calls.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RetryPolicy {
    /// The backoff ceiling after the first failed attempt; it doubles with each attempt.
    pub base_delay: Duration,
    /// The backoff ceiling never grows past this; `Retry-After` may still ask for longer.
    pub max_delay: Duration,
    /// Attempts per call, the first included; at least 1.
    pub max_attempts: u32,
    /// The time one call may take in all, measured from its start.
    pub deadline: Duration,
    /// The time one attempt may take; the deadline shortens the last ones.
    pub attempt_timeout: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            base_delay: BASE_DELAY_DEFAULT,
            max_delay: MAX_DELAY_DEFAULT,
            max_attempts: MAX_ATTEMPTS_DEFAULT,
            deadline: DEADLINE_DEFAULT,
            attempt_timeout: ATTEMPT_TIMEOUT_DEFAULT,
        }
    }
}

impl RetryPolicy {
    /// The upper bound of the wait after the failed attempt `attempt` (counting from 0).
    pub fn backoff_ceiling(&self, attempt: u32) -> Duration {
        let factor = 2u32.saturating_pow(attempt);
        self.base_delay.saturating_mul(factor).min(self.max_delay)
    }

    /// The wait after the failed attempt `attempt`: full jitter below the ceiling, raised to the
    /// server's `Retry-After` when it asked for more.
    pub fn delay(
        &self,
        attempt: u32,
        retry_after: Option<Duration>,
        random: &dyn Random,
    ) -> Duration {
        let jittered = uniform_up_to(self.backoff_ceiling(attempt), random);
        jittered.max(retry_after.unwrap_or(Duration::ZERO))
    }
}

/// What one failed attempt tells the retry loop.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Verdict {
    /// Whether another attempt may get a different answer.
    pub retryable: bool,
    /// Whether the server may have executed the request; false only when it cannot have.
    pub may_have_executed: bool,
}

/// Classifies an error answer by its status and problem code.
///
/// Retried: 409 `idempotency_key_in_use` (the original is still running), 429, and every 5xx.
/// Never retried: any other 4xx, whose answer a retry would only repeat. Of these, 503
/// `store_unavailable` and 429 are documented to execute nothing.
pub fn classify_status(status: u16, code: Option<&str>) -> Verdict {
    match (status, code) {
        (409, Some("idempotency_key_in_use")) => Verdict {
            retryable: true,
            may_have_executed: true,
        },
        (429, _) | (503, Some("store_unavailable")) => Verdict {
            retryable: true,
            may_have_executed: false,
        },
        (500..=599, _) => Verdict {
            retryable: true,
            may_have_executed: true,
        },
        _ => Verdict {
            retryable: false,
            may_have_executed: true,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::random::ThreadRandom;

    fn policy() -> RetryPolicy {
        RetryPolicy {
            base_delay: Duration::from_millis(100),
            max_delay: Duration::from_secs(2),
            ..RetryPolicy::default()
        }
    }

    #[test]
    fn the_backoff_ceiling_doubles_per_attempt_until_the_cap() {
        let ceilings: Vec<u64> = (0..7)
            .map(|n| policy().backoff_ceiling(n).as_millis() as u64)
            .collect();

        assert_eq!(ceilings, [100, 200, 400, 800, 1600, 2000, 2000]);
        assert_eq!(policy().backoff_ceiling(u32::MAX), Duration::from_secs(2));
    }

    #[test]
    fn every_delay_lies_between_zero_and_the_capped_ceiling() {
        let policy = policy();

        for attempt in 0..12 {
            let ceiling = Duration::from_millis(100)
                .saturating_mul(1 << attempt)
                .min(Duration::from_secs(2));
            let delays: Vec<Duration> = (0..500)
                .map(|_| policy.delay(attempt, None, &ThreadRandom))
                .collect();

            assert!(delays.iter().all(|delay| *delay <= ceiling));
            // Full jitter: waits spread over the whole range rather than clustering at the top.
            assert!(delays.iter().any(|delay| *delay < ceiling / 4));
            assert!(delays.iter().any(|delay| *delay > ceiling * 3 / 4));
        }
    }

    #[test]
    fn retry_after_is_a_lower_bound_even_above_the_cap() {
        let retry_after = Some(Duration::from_secs(3));

        let delays: Vec<Duration> = (0..100)
            .map(|_| policy().delay(0, retry_after, &ThreadRandom))
            .collect();

        assert!(delays.iter().all(|delay| *delay == Duration::from_secs(3)));
    }

    #[test]
    fn in_use_rate_limited_and_server_errors_are_retried() {
        let retried = [
            (409, Some("idempotency_key_in_use")),
            (429, None),
            (500, Some("internal_error")),
            (502, None),
            (503, Some("store_unavailable")),
            (504, None),
        ];

        for (status, code) in retried {
            assert!(classify_status(status, code).retryable, "{status} {code:?}");
        }
    }

    #[test]
    fn other_client_errors_are_never_retried() {
        let final_answers = [
            (400, Some("invalid_request")),
            (401, Some("unauthorized")),
            (402, Some("card_declined")),
            (404, Some("not_found")),
            (409, None),
            (413, Some("payload_too_large")),
            (415, Some("unsupported_media_type")),
            (422, Some("idempotency_key_reused")),
            (422, Some("idempotency_key_expired")),
        ];

        for (status, code) in final_answers {
            assert!(
                !classify_status(status, code).retryable,
                "{status} {code:?}"
            );
        }
    }

    #[test]
    fn only_answers_documented_to_execute_nothing_rule_out_an_execution() {
        let store_down = classify_status(503, Some("store_unavailable"));
        let proxy_down = classify_status(503, None);
        let internal = classify_status(500, Some("internal_error"));
        let in_use = classify_status(409, Some("idempotency_key_in_use"));

        assert!(!store_down.may_have_executed);
        assert!(!classify_status(429, None).may_have_executed);
        assert!(proxy_down.may_have_executed);
        assert!(internal.may_have_executed);
        assert!(in_use.may_have_executed);
    }
}
