//! The retry loop: runs attempts of one call until one is final, the attempts run out, the
//! deadline would pass, or the shared budget refuses another retry.
//!
//! The loop knows nothing of HTTP. An attempt reports a [`Failure`] carrying the error to give
//! back and a [`Verdict`]; the loop decides whether to wait and try again, and what to report
//! when it stops: a mutating call that may have executed ends as [`Error::OutcomeUnknown`].

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::budget::RetryBudget;
use crate::clock::Clock;
use crate::error::Error;
use crate::policy::{RetryPolicy, Verdict};
use crate::random::Random;

/// One failed attempt as the loop sees it.
#[derive(Debug)]
pub struct Failure {
    /// What to report if the loop stops here.
    pub error: Error,
    /// Whether to retry and whether the server may have executed the request.
    pub verdict: Verdict,
    /// How long the server asked the client to wait, from `Retry-After`.
    pub retry_after: Option<Duration>,
}

/// What an attempt is told by the loop.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Attempt {
    /// 0 for the first attempt of a call.
    pub number: u32,
    /// How long this attempt may take: the attempt timeout, shortened by the deadline.
    pub timeout: Duration,
}

/// The retry machinery one client shares between its calls.
pub struct Retrier {
    pub(crate) policy: RetryPolicy,
    pub(crate) budget: RetryBudget,
    pub(crate) clock: Arc<dyn Clock>,
    pub(crate) random: Arc<dyn Random>,
}

impl Retrier {
    /// Runs `attempt` until it succeeds or the loop gives up. `idempotency_key` is `Some` for a
    /// mutating call, the key every attempt carries.
    ///
    /// # Errors
    ///
    /// The last attempt's error; [`Error::OutcomeUnknown`] instead when a mutating call stops
    /// after an attempt that may have executed.
    pub async fn run<T, F, Fut>(
        &self,
        idempotency_key: Option<&str>,
        mut attempt: F,
    ) -> Result<T, Error>
    where
        F: FnMut(Attempt) -> Fut,
        Fut: Future<Output = Result<T, Failure>>,
    {
        let started = self.clock.now();
        let mut may_have_executed = false;
        let mut number = 0;
        loop {
            let timeout = self.attempt_timeout(started);
            let failure = match attempt(Attempt { number, timeout }).await {
                Ok(value) => {
                    self.budget.deposit();
                    return Ok(value);
                }
                Err(failure) if !failure.verdict.retryable => {
                    // A definitive answer shows the server is healthy, so it refills the budget.
                    self.budget.deposit();
                    return Err(failure.error);
                }
                Err(failure) => failure,
            };
            may_have_executed |= failure.verdict.may_have_executed;

            let Some(delay) = self.next_delay(number, failure.retry_after, started) else {
                return Err(outcome_of_giving_up(
                    idempotency_key,
                    may_have_executed,
                    failure.error,
                ));
            };
            self.clock.sleep(delay).await;
            number += 1;
        }
    }

    /// The wait before the attempt after `number`, or `None` to stop retrying.
    fn next_delay(
        &self,
        number: u32,
        retry_after: Option<Duration>,
        started: Instant,
    ) -> Option<Duration> {
        if number.saturating_add(1) >= self.policy.max_attempts {
            return None;
        }

        // A wait that reaches the deadline leaves no time to try, and waking up before
        // `Retry-After` would ignore what the server asked for.
        let delay = self.policy.delay(number, retry_after, self.random.as_ref());
        let elapsed = self.clock.now().saturating_duration_since(started);
        if elapsed.saturating_add(delay) >= self.policy.deadline {
            return None;
        }

        // Checked last so that a call stopping for another reason keeps its token.
        self.budget.try_withdraw().then_some(delay)
    }

    fn attempt_timeout(&self, started: Instant) -> Duration {
        let elapsed = self.clock.now().saturating_duration_since(started);
        let remaining = self.policy.deadline.saturating_sub(elapsed);
        self.policy.attempt_timeout.min(remaining)
    }
}

/// The error of a call that stopped retrying on `last_error`, a retryable failure.
fn outcome_of_giving_up(
    idempotency_key: Option<&str>,
    may_have_executed: bool,
    last_error: Error,
) -> Error {
    match idempotency_key {
        Some(key) if may_have_executed => Error::OutcomeUnknown {
            idempotency_key: key.to_owned(),
            last_error: Box::new(last_error),
        },
        _ => last_error,
    }
}

#[cfg(test)]
mod tests;
