//! The retry loop driven by a fake clock and a scripted random source: no test sleeps.

use std::sync::Mutex;

use oncepay_core::wire::Problem;

use super::*;
use crate::clock::Sleep;
use crate::policy::classify_status;

/// A clock that only moves when a sleep or an attempt moves it.
struct FakeClock {
    start: Instant,
    elapsed: Mutex<Duration>,
    sleeps: Mutex<Vec<Duration>>,
}

impl FakeClock {
    fn new() -> Arc<Self> {
        Arc::new(Self {
            start: Instant::now(),
            elapsed: Mutex::new(Duration::ZERO),
            sleeps: Mutex::new(Vec::new()),
        })
    }

    fn advance(&self, duration: Duration) {
        *self.elapsed.lock().unwrap() += duration;
    }

    fn elapsed(&self) -> Duration {
        *self.elapsed.lock().unwrap()
    }

    fn sleeps(&self) -> Vec<Duration> {
        self.sleeps.lock().unwrap().clone()
    }
}

impl Clock for FakeClock {
    fn now(&self) -> Instant {
        self.start + self.elapsed()
    }

    fn sleep(&self, duration: Duration) -> Sleep {
        self.advance(duration);
        self.sleeps.lock().unwrap().push(duration);
        Box::pin(std::future::ready(()))
    }
}

/// Always draws the same bits: 0 gives the shortest wait, `u64::MAX` the longest.
struct FixedRandom(u64);

impl Random for FixedRandom {
    fn next_u64(&self) -> u64 {
        self.0
    }
}

const KEY: &str = "key-under-test";

fn policy() -> RetryPolicy {
    RetryPolicy {
        base_delay: Duration::from_millis(100),
        max_delay: Duration::from_secs(1),
        max_attempts: 5,
        deadline: Duration::from_secs(30),
        attempt_timeout: Duration::from_secs(10),
    }
}

fn retrier(policy: RetryPolicy, clock: &Arc<FakeClock>, bits: u64) -> Retrier {
    Retrier {
        policy,
        budget: RetryBudget::new(100, 10),
        clock: clock.clone(),
        random: Arc::new(FixedRandom(bits)),
    }
}

/// An error answer classified as the client classifies real ones.
fn answer(status: u16, code: &str, retry_after: Option<Duration>) -> Failure {
    let problem = Problem {
        type_: format!("/problems/{code}"),
        title: code.to_owned(),
        status,
        detail: code.to_owned(),
        code: code.to_owned(),
        errors: Vec::new(),
        payment_id: None,
    };
    Failure {
        error: Error::Api {
            status,
            problem: Box::new(problem),
        },
        verdict: classify_status(status, Some(code)),
        retry_after,
    }
}

fn internal_error() -> Failure {
    answer(500, "internal_error", None)
}

fn store_unavailable() -> Failure {
    answer(503, "store_unavailable", None)
}

/// Runs one call whose attempts answer from `script`, then succeed; returns the result and
/// the attempts made.
async fn call(
    retrier: &Retrier,
    key: Option<&str>,
    script: impl Fn(u32) -> Option<Failure>,
) -> (Result<&'static str, Error>, Vec<Attempt>) {
    let attempts = Mutex::new(Vec::new());
    let result = retrier
        .run(key, |attempt| {
            attempts.lock().unwrap().push(attempt);
            let outcome = script(attempt.number).map_or(Ok("done"), Err);
            std::future::ready(outcome)
        })
        .await;
    (result, attempts.into_inner().unwrap())
}

#[tokio::test]
async fn a_retryable_failure_is_retried_until_an_attempt_succeeds() {
    let clock = FakeClock::new();
    let retrier = retrier(policy(), &clock, 0);

    let (result, attempts) = call(&retrier, Some(KEY), |n| (n < 2).then(store_unavailable)).await;

    assert_eq!(result.unwrap(), "done");
    assert_eq!(attempts.len(), 3);
    assert_eq!(clock.sleeps().len(), 2);
}

#[tokio::test]
async fn a_definitive_error_is_returned_after_a_single_attempt() {
    let clock = FakeClock::new();
    let retrier = retrier(policy(), &clock, 0);

    for (status, code) in [(422, "idempotency_key_reused"), (400, "invalid_request")] {
        let (result, attempts) =
            call(&retrier, Some(KEY), |_| Some(answer(status, code, None))).await;

        assert!(matches!(result, Err(Error::Api { status: s, .. }) if s == status));
        assert_eq!(attempts.len(), 1);
    }
    assert!(clock.sleeps().is_empty());
}

#[tokio::test]
async fn the_attempts_of_a_call_never_exceed_max_attempts() {
    let clock = FakeClock::new();
    let retrier = retrier(
        RetryPolicy {
            max_attempts: 4,
            ..policy()
        },
        &clock,
        0,
    );

    let (result, attempts) = call(&retrier, None, |_| Some(internal_error())).await;

    assert!(matches!(result, Err(Error::Api { status: 500, .. })));
    assert_eq!(attempts.len(), 4);
    let numbers: Vec<u32> = attempts.iter().map(|a| a.number).collect();
    assert_eq!(numbers, [0, 1, 2, 3]);
}

#[tokio::test]
async fn each_wait_is_drawn_below_the_doubling_ceiling_with_full_jitter() {
    let highest_clock = FakeClock::new();
    let lowest_clock = FakeClock::new();
    let highest = retrier(policy(), &highest_clock, u64::MAX);
    let lowest = retrier(policy(), &lowest_clock, 0);

    let _ = call(&highest, None, |_| Some(internal_error())).await;
    let _ = call(&lowest, None, |_| Some(internal_error())).await;

    let ceilings_ms = [100, 200, 400, 800];
    let highest_sleeps = highest_clock.sleeps();
    assert_eq!(highest_sleeps.len(), ceilings_ms.len());
    for (sleep, ceiling_ms) in highest_sleeps.iter().zip(ceilings_ms) {
        let ceiling = Duration::from_millis(ceiling_ms);
        assert!(*sleep <= ceiling && *sleep > ceiling - Duration::from_millis(1));
    }
    assert!(lowest_clock.sleeps().iter().all(|s| s.is_zero()));
}

#[tokio::test]
async fn retry_after_is_waited_out_even_when_jitter_draws_less() {
    let clock = FakeClock::new();
    let retrier = retrier(policy(), &clock, 0);
    let in_use = || answer(409, "idempotency_key_in_use", Some(Duration::from_secs(2)));

    let (result, _) = call(&retrier, Some(KEY), |n| (n < 2).then(in_use)).await;

    assert!(result.is_ok());
    assert_eq!(clock.sleeps(), [Duration::from_secs(2); 2]);
}

#[tokio::test]
async fn a_retry_after_past_the_deadline_ends_the_call_without_waiting() {
    let clock = FakeClock::new();
    let policy = RetryPolicy {
        deadline: Duration::from_secs(5),
        ..policy()
    };
    let retrier = retrier(policy, &clock, 0);
    let in_use = || answer(409, "idempotency_key_in_use", Some(Duration::from_secs(6)));

    let (result, attempts) = call(&retrier, Some(KEY), |_| Some(in_use())).await;

    assert!(matches!(result, Err(Error::OutcomeUnknown { .. })));
    assert_eq!(attempts.len(), 1);
    assert!(clock.sleeps().is_empty());
}

#[tokio::test]
async fn no_attempt_outlives_the_deadline_of_the_call() {
    let clock = FakeClock::new();
    let policy = RetryPolicy {
        deadline: Duration::from_secs(10),
        attempt_timeout: Duration::from_secs(4),
        max_attempts: 100,
        ..policy()
    };
    let retrier = retrier(policy, &clock, u64::MAX);

    // Every attempt times out, using all the time it was given.
    let attempts = Mutex::new(Vec::new());
    let result: Result<(), Error> = retrier
        .run(Some(KEY), |attempt| {
            attempts.lock().unwrap().push(attempt);
            clock.advance(attempt.timeout);
            std::future::ready(Err(internal_error()))
        })
        .await;

    assert!(matches!(result, Err(Error::OutcomeUnknown { .. })));
    assert!(clock.elapsed() <= Duration::from_secs(10));
    let timeouts: Vec<Duration> = attempts.lock().unwrap().iter().map(|a| a.timeout).collect();
    assert_eq!(timeouts[..2], [Duration::from_secs(4); 2]);
    assert!(
        timeouts[2] < Duration::from_secs(2),
        "the last attempt gets what is left"
    );
}

#[tokio::test]
async fn a_mutating_call_that_may_have_executed_gives_up_with_its_key() {
    let clock = FakeClock::new();
    let retrier = retrier(policy(), &clock, 0);

    // The first attempt may have executed; later ones are refused before executing.
    let script = |n| {
        Some(if n == 0 {
            internal_error()
        } else {
            store_unavailable()
        })
    };
    let (result, _) = call(&retrier, Some(KEY), script).await;

    let Err(Error::OutcomeUnknown {
        idempotency_key,
        last_error,
    }) = result
    else {
        panic!("expected an unknown outcome, got {result:?}");
    };
    assert_eq!(idempotency_key, KEY);
    assert_eq!(last_error.code(), Some("store_unavailable"));
}

#[tokio::test]
async fn a_mutating_call_refused_before_executing_reports_the_refusal() {
    let clock = FakeClock::new();
    let retrier = retrier(policy(), &clock, 0);

    let (result, attempts) = call(&retrier, Some(KEY), |_| Some(store_unavailable())).await;

    assert_eq!(attempts.len(), 5);
    assert!(matches!(result, Err(Error::Api { status: 503, .. })));
}

#[tokio::test]
async fn a_read_that_gives_up_reports_its_last_error_not_an_unknown_outcome() {
    let clock = FakeClock::new();
    let retrier = retrier(policy(), &clock, 0);

    let (result, _) = call(&retrier, None, |_| Some(internal_error())).await;

    assert!(matches!(result, Err(Error::Api { status: 500, .. })));
}

#[tokio::test]
async fn a_sustained_outage_exhausts_the_shared_budget_and_stops_retrying() {
    let clock = FakeClock::new();
    let mut retrier = retrier(policy(), &clock, 0);
    retrier.budget = RetryBudget::new(3, 10);

    let (_, first) = call(&retrier, Some(KEY), |_| Some(internal_error())).await;
    let (second_result, second) = call(&retrier, Some(KEY), |_| Some(internal_error())).await;
    let (_, third) = call(&retrier, None, |_| Some(internal_error())).await;

    assert_eq!(first.len(), 4, "the first call spends the three retries");
    assert_eq!(second.len(), 1);
    assert_eq!(third.len(), 1);
    assert!(matches!(second_result, Err(Error::OutcomeUnknown { .. })));
}

#[tokio::test]
async fn answered_calls_refill_the_budget_after_an_outage() {
    let clock = FakeClock::new();
    let mut retrier = retrier(policy(), &clock, 0);
    retrier.budget = RetryBudget::new(3, 10);
    let _ = call(&retrier, None, |_| Some(internal_error())).await;

    for _ in 0..10 {
        let (result, _) = call(&retrier, None, |_| None).await;
        assert!(result.is_ok());
    }
    let (_, after_recovery) = call(&retrier, None, |_| Some(internal_error())).await;

    assert_eq!(
        after_recovery.len(),
        2,
        "ten answered calls earn one retry back"
    );
}
