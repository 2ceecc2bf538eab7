//! The real binary on a SQLite file, raced by concurrent clients; every key's recorded history
//! is then checked against the specification and the database.

use crate::checker::{check_linearizable, check_payments};
use crate::common::Server;
use crate::history::{Call, KEYS, Outcome, describe, key_name, record_history, rounds};

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
