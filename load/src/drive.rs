//! The load itself: workers that create payments, retry earlier keys and reuse keys with another
//! amount, until the run's time is up, recording every answer.
//!
//! Keys a retry may pick are shared by all workers and become pickable as soon as their first
//! request is sent, so a retry can race its original on another connection, which is the case an
//! idempotency layer has to get right. A mismatch only picks a key whose first request got a
//! 201: sent earlier, its other amount could legitimately win the key.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use reqwest::{Client, Url};
use tokio::task::JoinSet;

use crate::check::{Answer, Intent, Ledger, Observation};
use crate::report::Stats;

/// The smallest and largest amount a payment is created with; each earns `amount / 100` points,
/// so the range spans zero to a thousand points.
const AMOUNT_MINOR_MIN: i64 = 100;
const AMOUNT_MINOR_MAX: i64 = 100_000;

/// What a run sends, and where.
#[derive(Debug)]
pub struct Plan {
    pub payments_url: Url,
    pub api_key: String,
    pub concurrency: usize,
    pub duration: Duration,
    pub retry_ratio: f64,
    pub mismatch_ratio: f64,
    /// The customers payments are spread over; their ids are unique to the run.
    pub customer_ids: Vec<String>,
    /// Prefix of every idempotency key, unique to the run so that runs against one database
    /// never share keys.
    pub key_prefix: String,
}

/// What a run saw.
pub struct Outcome {
    pub ledger: Ledger,
    pub stats: Stats,
    pub elapsed: Duration,
}

/// A key whose first request has been sent, and the body it was sent with.
#[derive(Clone)]
struct Sent {
    key: Arc<str>,
    amount_minor: i64,
    customer: usize,
}

/// Keys earlier requests used, for retries and mismatches to pick from.
#[derive(Default)]
struct Pools {
    sent: Vec<Sent>,
    created: Vec<Sent>,
}

/// What all workers share.
struct Shared {
    plan: Plan,
    client: Client,
    pools: Mutex<Pools>,
    ledger: Mutex<Ledger>,
}

/// Runs the plan and returns every answer recorded.
pub async fn run(client: Client, plan: Plan) -> Outcome {
    let shared = Arc::new(Shared {
        plan,
        client,
        pools: Mutex::default(),
        ledger: Mutex::default(),
    });
    let started_at = Instant::now();
    let deadline = started_at + shared.plan.duration;

    let mut workers = JoinSet::new();
    for worker in 0..shared.plan.concurrency {
        workers.spawn(work(shared.clone(), worker, deadline));
    }
    let mut stats = Stats::default();
    while let Some(joined) = workers.join_next().await {
        stats.merge(joined.expect("a load worker panicked"));
    }
    let elapsed = started_at.elapsed();

    let shared = Arc::into_inner(shared).expect("every worker has finished");
    let ledger = shared
        .ledger
        .into_inner()
        .unwrap_or_else(PoisonError::into_inner);
    Outcome {
        ledger,
        stats,
        elapsed,
    }
}

/// One connection's worth of load: a request at a time until the deadline.
async fn work(shared: Arc<Shared>, worker: usize, deadline: Instant) -> Stats {
    let mut rng = StdRng::from_os_rng();
    let mut stats = Stats::default();
    let mut keys_made: u64 = 0;
    while Instant::now() < deadline {
        let (intent, sent) = choose(&shared, &mut rng, worker, &mut keys_made);
        let amount_minor = match intent {
            Intent::Mismatch => sent.amount_minor + 1,
            Intent::First | Intent::Retry => sent.amount_minor,
        };
        let customer_id = &shared.plan.customer_ids[sent.customer];

        let sent_at = Instant::now();
        let answer = send(&shared, &sent.key, amount_minor, customer_id).await;
        let received_at = Instant::now();

        stats.record(intent, received_at - sent_at, &answer);
        if intent == Intent::First && matches!(answer, Answer::Response { status: 201, .. }) {
            lock(&shared.pools).created.push(sent.clone());
        }
        let key = sent.key;
        let observation = Observation {
            key,
            intent,
            amount_minor,
            sent_at,
            received_at,
            answer,
        };
        lock(&shared.ledger).record(observation);
    }
    stats
}

/// Picks what to send next; a new key whenever there is nothing earlier to pick from.
fn choose(shared: &Shared, rng: &mut StdRng, worker: usize, keys_made: &mut u64) -> (Intent, Sent) {
    let plan = &shared.plan;
    let draw: f64 = rng.random();
    let mut pools = lock(&shared.pools);
    if draw < plan.mismatch_ratio && !pools.created.is_empty() {
        let picked = pools.created[rng.random_range(0..pools.created.len())].clone();
        return (Intent::Mismatch, picked);
    }
    if draw < plan.mismatch_ratio + plan.retry_ratio && !pools.sent.is_empty() {
        let picked = pools.sent[rng.random_range(0..pools.sent.len())].clone();
        return (Intent::Retry, picked);
    }

    *keys_made += 1;
    let fresh = Sent {
        key: format!("{}-{worker}-{keys_made}", plan.key_prefix).into(),
        amount_minor: rng.random_range(AMOUNT_MINOR_MIN..=AMOUNT_MINOR_MAX),
        customer: rng.random_range(0..plan.customer_ids.len()),
    };
    pools.sent.push(fresh.clone());
    (Intent::First, fresh)
}

/// Sends one create-payment request; any transport failure is an answer the client never got.
async fn send(shared: &Shared, key: &str, amount_minor: i64, customer_id: &str) -> Answer {
    let body =
        format!(r#"{{"amount":{amount_minor},"currency":"EUR","customer_id":"{customer_id}"}}"#);
    let request = shared
        .client
        .post(shared.plan.payments_url.clone())
        .bearer_auth(&shared.plan.api_key)
        .header("idempotency-key", key)
        .header("content-type", "application/json")
        .body(body);
    let Ok(response) = request.send().await else {
        return Answer::Failed;
    };
    let status = response.status().as_u16();
    let replayed = response
        .headers()
        .get("idempotent-replayed")
        .is_some_and(|value| value.as_bytes().eq_ignore_ascii_case(b"true"));
    match response.bytes().await {
        Ok(body) => Answer::Response {
            status,
            replayed,
            body,
        },
        Err(_) => Answer::Failed,
    }
}

/// Locks a mutex; a worker that panicked while holding it leaves data that is still worth
/// reporting, so poisoning is ignored.
fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}
