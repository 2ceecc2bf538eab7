//! Recording a history: concurrent clients send payments with random keys, bodies and faults,
//! and each request is logged with its send and return times and what it saw.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::common::http;

const TASKS: usize = 16;
/// Keys per round: every round starts on fresh keys, so free keys are raced again and again.
pub(crate) const KEYS: usize = 8;
const ROUNDS_DEFAULT: usize = 20;
const OPS_PER_ROUND: usize = 3;
const BODIES: [&str; 2] = [
    r#"{"amount": 1250, "currency": "EUR", "customer_id": "cus_001"}"#,
    r#"{"amount": 990, "currency": "EUR", "customer_id": "cus_002"}"#,
];

/// What a client saw for one request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// 201 without `Idempotent-Replayed`: this request executed.
    Executed(Vec<u8>),
    /// 201 with `Idempotent-Replayed: true`.
    Replayed(Vec<u8>),
    /// 409: the key was busy.
    InUse,
    /// 422 `idempotency_key_reused`.
    Reused,
    /// A 5xx that is not a replay: the request failed, before or after committing.
    Failed(u16),
    /// No answer: the connection broke.
    Lost(String),
    /// Anything the specification has no place for, such as a replayed 500.
    Unexpected(u16, String),
}

/// One request of the history.
#[derive(Clone, Debug)]
pub(crate) struct Call {
    pub(crate) task: usize,
    /// The key: its round and its number in the round.
    pub(crate) key: (usize, usize),
    pub(crate) body: usize,
    pub(crate) fault: Option<String>,
    pub(crate) invoked: Duration,
    pub(crate) returned: Duration,
    pub(crate) outcome: Outcome,
}

pub(crate) fn rounds() -> usize {
    let value = std::env::var("LIN_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok());
    value.unwrap_or(ROUNDS_DEFAULT)
}

pub(crate) fn key_name(seed: u64, (round, key): (usize, usize)) -> String {
    format!("lin-{seed}-{round}-{key}")
}

/// Short windows: a claimed key in flight, a failure that releases it, a failure after commit.
fn random_fault(rng: &mut StdRng) -> Option<String> {
    let delay_ms: u64 = rng.random_range(20..250);
    match rng.random_range(0..10) {
        0 | 1 => Some(format!("after_claim=delay:{delay_ms}")),
        2 => Some(format!("before_commit=delay:{delay_ms}")),
        3 => Some("before_commit=fail".to_owned()),
        4 => Some("after_commit=fail".to_owned()),
        _ => None,
    }
}

/// Sends one payment and classifies the answer; never panics, so every request is recorded.
async fn send(
    client: &reqwest::Client,
    url: &str,
    key: &str,
    body: usize,
    fault: Option<&str>,
) -> Outcome {
    let mut request = client
        .post(format!("{url}/v1/payments"))
        .header("authorization", "Bearer sk_test_acme")
        .header("idempotency-key", key)
        .header("content-type", "application/json")
        .body(BODIES[body]);
    if let Some(fault) = fault {
        request = request.header("oncepay-fault", fault);
    }
    let response = match request.send().await {
        Ok(response) => response,
        Err(err) => return Outcome::Lost(err.to_string()),
    };
    let status = response.status().as_u16();
    let replayed = response
        .headers()
        .get("idempotent-replayed")
        .is_some_and(|v| v == "true");
    let bytes = match response.bytes().await {
        Ok(bytes) => bytes.to_vec(),
        Err(err) => return Outcome::Lost(err.to_string()),
    };
    let text = String::from_utf8_lossy(&bytes).into_owned();
    match (status, replayed) {
        (201, false) => Outcome::Executed(bytes),
        (201, true) => Outcome::Replayed(bytes),
        (409, false) => Outcome::InUse,
        (422, false) if text.contains("idempotency_key_reused") => Outcome::Reused,
        (500..=599, false) => Outcome::Failed(status),
        _ => Outcome::Unexpected(status, text),
    }
}

/// One client: a few requests per round on random keys, bodies and faults, each one recorded.
async fn client_task(url: String, seed: u64, task: usize, start: Instant, shared: Shared) {
    let client = http();
    let mut rng = StdRng::seed_from_u64(seed.wrapping_mul(1_000) + task as u64);
    for round in 0..rounds() {
        // Everyone starts the round together, so first requests on a free key really race.
        shared.barrier.wait().await;
        for _ in 0..OPS_PER_ROUND {
            let key = (round, rng.random_range(0..KEYS));
            let body = usize::from(rng.random_bool(0.25));
            let fault = random_fault(&mut rng);

            let invoked = start.elapsed();
            let outcome = send(&client, &url, &key_name(seed, key), body, fault.as_deref()).await;
            let returned = start.elapsed();

            let call = Call {
                task,
                key,
                body,
                fault,
                invoked,
                returned,
                outcome,
            };
            shared
                .log
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(call);
        }
    }
}

/// Runs sixteen clients on eight keys a round, all at once, and answers what they saw.
pub(crate) async fn record_history(url: &str, seed: u64) -> Vec<Call> {
    let shared = Shared {
        log: Arc::default(),
        barrier: Arc::new(tokio::sync::Barrier::new(TASKS)),
    };
    let start = Instant::now();
    let tasks: Vec<_> = (0..TASKS)
        .map(|task| {
            tokio::spawn(client_task(
                url.to_owned(),
                seed,
                task,
                start,
                shared.clone(),
            ))
        })
        .collect();
    for task in tasks {
        task.await.expect("a client task finished");
    }
    std::mem::take(&mut *shared.log.lock().unwrap_or_else(|p| p.into_inner()))
}

/// What the client tasks share: the history and the start line of each round.
#[derive(Clone)]
struct Shared {
    log: Arc<Mutex<Vec<Call>>>,
    barrier: Arc<tokio::sync::Barrier>,
}

/// The history as a table sorted by send time; responses are numbered in order of appearance.
pub(crate) fn describe(history: &[&Call]) -> String {
    let mut sorted = history.to_vec();
    sorted.sort_by_key(|c| c.invoked);
    let mut responses: Vec<Vec<u8>> = Vec::new();
    let mut lines = Vec::new();
    for call in sorted {
        let outcome = match &call.outcome {
            Outcome::Executed(bytes) => {
                format!("201 executed, response #{}", intern(&mut responses, bytes))
            }
            Outcome::Replayed(bytes) => {
                format!("201 replayed, response #{}", intern(&mut responses, bytes))
            }
            other => format!("{other:?}"),
        };
        lines.push(format!(
            "  {:>9.3} .. {:>9.3} ms  client {:>2}  body {}  fault {:<28} {outcome}",
            call.invoked.as_secs_f64() * 1e3,
            call.returned.as_secs_f64() * 1e3,
            call.task,
            call.body,
            call.fault.as_deref().unwrap_or("-"),
        ));
    }
    lines.join("\n")
}

pub(crate) fn intern(responses: &mut Vec<Vec<u8>>, bytes: &[u8]) -> usize {
    match responses.iter().position(|r| r == bytes) {
        Some(index) => index,
        None => {
            responses.push(bytes.to_vec());
            responses.len() - 1
        }
    }
}
