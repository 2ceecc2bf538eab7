//! Linearizability: many real clients race the real binary on a SQLite file, every request is
//! recorded, and each key's history must be explainable by one key's sequential specification.
//!
//! The specification, stated here independently of the service's code, is a key that is `Free`,
//! `Held` by a running request, or `Bound` to one body and one response. A request that executes
//! takes the key when it is free and later binds it to its body and its new payment; a replay
//! needs the key bound to its own body and answers exactly the bound response; a 422 needs the
//! key held or bound with another body; a 409 needs it held by a request with the same body, and
//! changes nothing. A request that failed with a 5xx or lost its connection may never have taken
//! the key, or taken it and then given it back or committed an outcome nobody saw; later replays
//! reveal which.
//!
//! The checker is a Wing & Gong search: it looks for one order of the key's requests that keeps
//! real time (a request that returned before another was sent comes first) and that the
//! specification accepts. A failure prints the key's history, one request a line, with its
//! send and return times in milliseconds, so the impossible order can be read off directly.
//! `LIN_ROUNDS=<n>` sets the rounds of fresh keys (default 20); `LIN_SEED` replays a choice of
//! keys, bodies and faults (the interleaving itself is the machine's).

mod common;

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{Server, http};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const TASKS: usize = 16;
/// Keys per round: every round starts on fresh keys, so free keys are raced again and again.
const KEYS: usize = 8;
const ROUNDS_DEFAULT: usize = 20;
const OPS_PER_ROUND: usize = 3;
const BODIES: [&str; 2] = [
    r#"{"amount": 1250, "currency": "EUR", "customer_id": "cus_001"}"#,
    r#"{"amount": 990, "currency": "EUR", "customer_id": "cus_002"}"#,
];
/// Histories are checked with a bit set of the requests already placed.
const STEPS_PER_KEY_MAX: usize = 128;

/// What a client saw for one request.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Outcome {
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
struct Call {
    task: usize,
    /// The key: its round and its number in the round.
    key: (usize, usize),
    body: usize,
    fault: Option<String>,
    invoked: Duration,
    returned: Duration,
    outcome: Outcome,
}

fn rounds() -> usize {
    let value = std::env::var("LIN_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok());
    value.unwrap_or(ROUNDS_DEFAULT)
}

fn key_name(seed: u64, (round, key): (usize, usize)) -> String {
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
async fn record_history(url: &str, seed: u64) -> Vec<Call> {
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_key_history_of_concurrent_clients_is_linearizable() {
    let seed = std::env::var("LIN_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(rand::random);
    let dir = tempfile::tempdir().expect("a temporary directory");
    let path = dir.path().join("oncepay.db");
    let database = format!("sqlite://{}", path.display());
    let server = Server::start(&[
        "--database",
        &database,
        "--api-keys",
        "acme:sk_test_acme",
        "--lease",
        "2s",
        "--in-flight-wait",
        "100ms",
        "--enable-fault-injection",
    ]);

    let calls = record_history(&server.url, seed).await;

    // Every key's history alone must be linearizable, and the database must agree with it.
    let connection = rusqlite::Connection::open(&path).expect("the database opens");
    let keys = (0..rounds()).flat_map(|round| (0..KEYS).map(move |key| (round, key)));
    for key in keys {
        let history: Vec<&Call> = calls.iter().filter(|c| c.key == key).collect();
        let name = key_name(seed, key);
        if let Err(why) = check_linearizable(&history) {
            panic!("seed {seed}, key {name}: {why}\n{}", describe(&history));
        }
        let payments = payments_with_key(&connection, &name);
        check_payments(&history, &payments)
            .unwrap_or_else(|why| panic!("seed {seed}, key {name}: {why}\n{}", describe(&history)));
    }
    check_coverage(&calls).unwrap_or_else(|why| panic!("seed {seed}: {why}"));
}

/// A history only proves something if it holds every kind of answer; a local server never drops
/// a connection, so a lost request means the run itself went wrong.
fn check_coverage(calls: &[Call]) -> Result<(), String> {
    let mut counts = std::collections::BTreeMap::new();
    for call in calls {
        let kind = match &call.outcome {
            Outcome::Executed(_) => "executed",
            Outcome::Replayed(_) => "replayed",
            Outcome::InUse => "409",
            Outcome::Reused => "422",
            Outcome::Failed(_) => "5xx",
            Outcome::Lost(_) => "lost",
            Outcome::Unexpected(..) => "unexpected",
        };
        *counts.entry(kind).or_insert(0) += 1;
    }
    if std::env::var_os("TEST_LOG").is_some() {
        eprintln!("outcomes: {counts:?}");
    }
    let lost = counts.get("lost").copied().unwrap_or(0);
    let missing: Vec<&str> = ["executed", "replayed", "409", "422", "5xx"]
        .into_iter()
        .filter(|kind| !counts.contains_key(kind))
        .collect();
    match (lost, missing.is_empty()) {
        (0, true) => Ok(()),
        (0, false) => Err(format!("the run never saw {missing:?}: {counts:?}")),
        _ => Err(format!("{lost} requests lost their connection: {counts:?}")),
    }
}

fn payments_with_key(connection: &rusqlite::Connection, key: &str) -> Vec<String> {
    let mut statement = connection
        .prepare("select id from payments where idempotency_key = ?1")
        .expect("the payments table exists");
    let rows = statement
        .query_map([key], |row| row.get(0))
        .expect("a query");
    rows.map(|row| row.expect("a row")).collect()
}

/// The global invariants: one payment for a key that ever got a 201, and every 201 identical.
fn check_payments(history: &[&Call], payments: &[String]) -> Result<(), String> {
    let successes: Vec<&Vec<u8>> = history
        .iter()
        .filter_map(|c| match &c.outcome {
            Outcome::Executed(bytes) | Outcome::Replayed(bytes) => Some(bytes),
            _ => None,
        })
        .collect();
    if successes.windows(2).any(|pair| pair[0] != pair[1]) {
        return Err("two 201 answers differ".into());
    }
    if payments.len() > 1 || (!successes.is_empty() && payments.len() != 1) {
        return Err(format!(
            "{} payments in the database: {payments:?}",
            payments.len()
        ));
    }
    let Some(answer) = successes.first() else {
        return Ok(());
    };
    let answer: serde_json::Value = serde_json::from_slice(answer).map_err(|e| e.to_string())?;
    match answer["id"].as_str() {
        Some(id) if payments == [id.to_owned()] => Ok(()),
        _ => Err(format!(
            "the 201 names {} but the database holds {payments:?}",
            answer["id"]
        )),
    }
}

/// The history as a table sorted by send time; responses are numbered in order of appearance.
fn describe(history: &[&Call]) -> String {
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

fn intern(responses: &mut Vec<Vec<u8>>, bytes: &[u8]) -> usize {
    match responses.iter().position(|r| r == bytes) {
        Some(index) => index,
        None => {
            responses.push(bytes.to_vec());
            responses.len() - 1
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The sequential specification of one key, and the search

/// The state of one key. Responses are numbered per key: equal numbers, equal bytes.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum Key {
    Free,
    /// A request with `body` holds the key; `by` is the index of its closing step.
    Held {
        body: usize,
        by: usize,
    },
    /// Bound to `body` and its response; `None` while no client has seen the response.
    Bound {
        body: usize,
        response: Option<usize>,
    },
}

/// How a request that took the key ends.
#[derive(Clone, Copy, Debug)]
enum Ending {
    /// It committed and answered this response.
    Commit(usize),
    /// Unknown (a 5xx or a lost connection): it gave the key back or committed unseen.
    Either,
}

/// What one step of the specification does.
#[derive(Clone, Copy, Debug)]
enum Action {
    /// Takes a free key; `optional` when the request may have failed before taking it.
    Open {
        body: usize,
        close: usize,
        optional: bool,
    },
    /// Ends what the matching `Open` began.
    Close {
        body: usize,
        ending: Ending,
    },
    Replay {
        body: usize,
        response: usize,
    },
    /// 422: allowed while another body holds or owns the key.
    Refuse {
        body: usize,
    },
    /// 409: allowed while a request with the same body holds the key.
    Busy {
        body: usize,
    },
}

/// A step with its real-time interval; `None` as the end means it may take effect at any time.
#[derive(Clone, Debug)]
struct Step {
    invoked: Duration,
    returned: Option<Duration>,
    action: Action,
}

/// Turns a key's calls into steps: two for a call that took the key, one for any other.
fn steps_of(history: &[&Call]) -> Result<Vec<Step>, String> {
    let mut responses: Vec<Vec<u8>> = Vec::new();
    let mut steps = Vec::new();
    for call in history {
        let body = call.body;
        // A lost request may still run on the server after the client gave up.
        let returned = match call.outcome {
            Outcome::Lost(_) => None,
            _ => Some(call.returned),
        };
        let mut push = |action| {
            steps.push(Step {
                invoked: call.invoked,
                returned,
                action,
            })
        };
        let (optional, ending) = match &call.outcome {
            Outcome::Executed(bytes) => (false, Ending::Commit(intern(&mut responses, bytes))),
            Outcome::Failed(_) | Outcome::Lost(_) => (true, Ending::Either),
            Outcome::Replayed(bytes) => {
                let response = intern(&mut responses, bytes);
                push(Action::Replay { body, response });
                continue;
            }
            Outcome::Reused => {
                push(Action::Refuse { body });
                continue;
            }
            Outcome::InUse => {
                push(Action::Busy { body });
                continue;
            }
            Outcome::Unexpected(status, text) => {
                let client = call.task;
                return Err(format!(
                    "client {client} got an answer no order allows: {status} {text}"
                ));
            }
        };
        let close = steps.len() + 1;
        steps.push(Step {
            invoked: call.invoked,
            returned,
            action: Action::Open {
                body,
                close,
                optional,
            },
        });
        steps.push(Step {
            invoked: call.invoked,
            returned,
            action: Action::Close { body, ending },
        });
    }
    if steps.len() > STEPS_PER_KEY_MAX {
        return Err(format!(
            "{} steps: too many to check; use fewer requests per key",
            steps.len()
        ));
    }
    Ok(steps)
}

/// The states `action` (step `index`) may lead to from `key`, with a step it completes as well.
fn apply(index: usize, action: &Action, key: &Key) -> Vec<(Key, Option<usize>)> {
    use Key::{Bound, Free, Held};
    let stay = || vec![(key.clone(), None)];
    match (*action, key) {
        (
            Action::Open {
                body,
                close,
                optional,
            },
            Free,
        ) => {
            let mut next = vec![(Held { body, by: close }, None)];
            if optional {
                next.push((Free, Some(close)));
            }
            next
        }
        (
            Action::Open {
                close,
                optional: true,
                ..
            },
            _,
        ) => vec![(key.clone(), Some(close))],
        (Action::Close { body, ending }, Held { by, .. }) if *by == index => match ending {
            Ending::Commit(response) => vec![(
                Bound {
                    body,
                    response: Some(response),
                },
                None,
            )],
            Ending::Either => vec![
                (Free, None),
                (
                    Bound {
                        body,
                        response: None,
                    },
                    None,
                ),
            ],
        },
        (
            Action::Replay { body, response },
            Bound {
                body: bound,
                response: seen,
            },
        ) if body == *bound && seen.is_none_or(|seen| seen == response) => {
            vec![(
                Bound {
                    body,
                    response: Some(response),
                },
                None,
            )]
        }
        (Action::Refuse { body }, Bound { body: other, .. } | Held { body: other, .. })
            if body != *other =>
        {
            stay()
        }
        (Action::Busy { body }, Held { body: holder, .. }) if body == *holder => stay(),
        _ => Vec::new(),
    }
}

/// Searches for an order of the steps that keeps real time and that the specification accepts.
fn check_linearizable(history: &[&Call]) -> Result<(), String> {
    let steps = steps_of(history)?;
    let all = match steps.len() {
        128 => u128::MAX,
        n => (1u128 << n) - 1,
    };
    let mut visited = HashSet::new();
    match search(&steps, all, 0, Key::Free, &mut visited) {
        true => Ok(()),
        false => Err("no order of these requests is allowed by the specification".into()),
    }
}

/// Depth-first over the steps that may go next; `visited` prunes a (placed, state) seen before.
fn search(
    steps: &[Step],
    all: u128,
    done: u128,
    key: Key,
    visited: &mut HashSet<(u128, Key)>,
) -> bool {
    if done == all {
        return true;
    }
    if !visited.insert((done, key.clone())) {
        return false;
    }
    // A step may go next only if no pending step returned before it was sent.
    let pending = (0..steps.len()).filter(|i| done & (1 << i) == 0);
    let horizon = pending.clone().filter_map(|i| steps[i].returned).min();
    for index in pending {
        let step = &steps[index];
        let waits_for_open =
            matches!(step.action, Action::Close { .. }) && done & (1 << (index - 1)) == 0;
        if waits_for_open || horizon.is_some_and(|h| h < step.invoked) {
            continue;
        }
        for (next, also) in apply(index, &step.action, &key) {
            let placed = done | (1 << index) | also.map_or(0, |i| 1u128 << i);
            if search(steps, all, placed, next, visited) {
                return true;
            }
        }
    }
    false
}

// ---------------------------------------------------------------------------------------------
// The checker itself, on hand-written histories

fn call(body: usize, span_ms: (u64, u64), outcome: Outcome) -> Call {
    let (invoked, returned) = (
        Duration::from_millis(span_ms.0),
        Duration::from_millis(span_ms.1),
    );
    Call {
        task: 0,
        key: (0, 0),
        body,
        fault: None,
        invoked,
        returned,
        outcome,
    }
}

#[test]
fn the_checker_accepts_a_replay_that_overlaps_its_original() {
    let history = [
        call(0, (0, 10), Outcome::Executed(b"R".to_vec())),
        call(0, (5, 8), Outcome::Replayed(b"R".to_vec())),
        call(1, (1, 2), Outcome::Reused),
    ];
    let refs: Vec<&Call> = history.iter().collect();
    assert_eq!(check_linearizable(&refs), Ok(()));
}

#[test]
fn the_checker_rejects_two_executions_of_one_key() {
    let history = [
        call(0, (0, 10), Outcome::Executed(b"R1".to_vec())),
        call(0, (5, 15), Outcome::Executed(b"R2".to_vec())),
    ];
    let refs: Vec<&Call> = history.iter().collect();
    assert!(check_linearizable(&refs).is_err());
}

#[test]
fn the_checker_rejects_a_refusal_before_anything_bound_the_key() {
    let history = [
        call(1, (0, 1), Outcome::Reused),
        call(0, (2, 3), Outcome::Executed(b"R".to_vec())),
    ];
    let refs: Vec<&Call> = history.iter().collect();
    assert!(check_linearizable(&refs).is_err());
}

#[test]
fn the_checker_accepts_a_refusal_while_a_failing_request_held_the_key() {
    let history = [
        call(0, (0, 10), Outcome::Failed(500)),
        call(1, (2, 3), Outcome::Reused),
        call(1, (11, 12), Outcome::Executed(b"R".to_vec())),
    ];
    let refs: Vec<&Call> = history.iter().collect();
    assert_eq!(check_linearizable(&refs), Ok(()));
}

#[test]
fn the_checker_rejects_a_replay_of_another_body() {
    let history = [
        call(0, (0, 1), Outcome::Executed(b"R".to_vec())),
        call(1, (2, 3), Outcome::Replayed(b"R".to_vec())),
    ];
    let refs: Vec<&Call> = history.iter().collect();
    assert!(check_linearizable(&refs).is_err());
}

#[test]
fn the_checker_lets_a_failure_after_commit_explain_a_later_replay() {
    let history = [
        call(0, (0, 5), Outcome::Failed(500)),
        call(0, (6, 7), Outcome::Replayed(b"R".to_vec())),
        call(0, (8, 9), Outcome::Replayed(b"R".to_vec())),
    ];
    let refs: Vec<&Call> = history.iter().collect();
    assert_eq!(check_linearizable(&refs), Ok(()));
    let mismatched = [
        history[0].clone(),
        history[1].clone(),
        call(0, (8, 9), Outcome::Replayed(b"S".to_vec())),
    ];
    let refs: Vec<&Call> = mismatched.iter().collect();
    assert!(check_linearizable(&refs).is_err());
}

#[test]
fn the_global_invariants_reject_a_second_payment() {
    let history = [call(
        0,
        (0, 1),
        Outcome::Executed(br#"{"id": "pay_1"}"#.to_vec()),
    )];
    let refs: Vec<&Call> = history.iter().collect();
    assert!(check_payments(&refs, &["pay_1".into()]).is_ok());
    assert!(check_payments(&refs, &["pay_1".into(), "pay_2".into()]).is_err());
}
