//! The ledger's checks on hand-made answers, each seen to fail when its check is removed.

use std::time::Duration;

use super::*;

const KEY_REUSED: &[u8] = br#"{"status":422,"code":"idempotency_key_reused"}"#;

/// A 201 body with the fields the ledger reads.
fn payment_body(id: &str, key: &str) -> Bytes {
    let fields = r#""amount":1250,"customer_id":"cus_1","reward_points":12"#;
    Bytes::from(format!(
        r#"{{"id":"{id}",{fields},"idempotency_key":"{key}"}}"#
    ))
}

/// A request for `key` sent `sent_ms` after a common start and answered 1 ms later.
fn answered(key: &str, intent: Intent, sent_ms: u64, answer: Answer) -> Observation {
    let start = Instant::now();
    Observation {
        key: key.into(),
        intent,
        amount_minor: 1250,
        sent_at: start + Duration::from_millis(sent_ms),
        received_at: start + Duration::from_millis(sent_ms + 1),
        answer,
    }
}

fn created(replayed: bool, body: Bytes) -> Answer {
    Answer::Response {
        status: 201,
        replayed,
        body,
    }
}

#[test]
fn an_execution_and_its_identical_replay_pass() {
    let mut ledger = Ledger::default();

    ledger.record(answered(
        "k1",
        Intent::First,
        0,
        created(false, payment_body("p1", "k1")),
    ));
    ledger.record(answered(
        "k1",
        Intent::Retry,
        5,
        created(true, payment_body("p1", "k1")),
    ));
    let verdict = ledger.finish();

    assert_eq!(verdict.findings.rules(), vec![]);
    assert_eq!(verdict.payments.len(), 1);
    assert_eq!(verdict.payments[0].id, "p1");
}

#[test]
fn two_different_201_bodies_for_one_key_are_a_violation() {
    let mut ledger = Ledger::default();

    ledger.record(answered(
        "k1",
        Intent::First,
        0,
        created(false, payment_body("p1", "k1")),
    ));
    ledger.record(answered(
        "k1",
        Intent::Retry,
        5,
        created(true, payment_body("p2", "k1")),
    ));
    let verdict = ledger.finish();

    assert_eq!(verdict.findings.rules(), vec![Rule::BodiesDiffer]);
}

#[test]
fn a_second_execution_of_a_key_is_a_violation() {
    let mut ledger = Ledger::default();

    ledger.record(answered(
        "k1",
        Intent::First,
        0,
        created(false, payment_body("p1", "k1")),
    ));
    ledger.record(answered(
        "k1",
        Intent::Retry,
        5,
        created(false, payment_body("p1", "k1")),
    ));
    let verdict = ledger.finish();

    assert_eq!(verdict.findings.rules(), vec![Rule::ExecutedTwice]);
}

#[test]
fn a_replay_answered_before_the_execution_was_sent_is_a_violation() {
    let mut ledger = Ledger::default();

    ledger.record(answered(
        "k1",
        Intent::Retry,
        0,
        created(true, payment_body("p1", "k1")),
    ));
    ledger.record(answered(
        "k1",
        Intent::First,
        10,
        created(false, payment_body("p1", "k1")),
    ));
    let verdict = ledger.finish();

    assert_eq!(verdict.findings.rules(), vec![Rule::ReplayBeforeExecution]);
}

#[test]
fn a_reused_key_passes_only_with_422_key_reused() {
    let body = Bytes::from_static(KEY_REUSED);
    let refused = Answer::Response {
        status: 422,
        replayed: false,
        body,
    };
    let mut ledger = Ledger::default();

    ledger.record(answered("k1", Intent::Mismatch, 0, refused));
    ledger.record(answered(
        "k2",
        Intent::Mismatch,
        0,
        created(false, payment_body("p", "k2")),
    ));
    let verdict = ledger.finish();

    assert_eq!(verdict.findings.rules(), vec![Rule::UnexpectedStatus]);
    assert_eq!(verdict.findings.kept[0].subject, "k2");
}

#[test]
fn a_lost_answer_makes_a_key_uncertain_not_wrong() {
    let mut ledger = Ledger::default();

    ledger.record(answered("k1", Intent::First, 0, Answer::Failed));
    ledger.record(answered(
        "k1",
        Intent::Retry,
        5,
        created(true, payment_body("p1", "k1")),
    ));
    ledger.record(answered("k2", Intent::First, 0, Answer::Failed));
    let verdict = ledger.finish();

    assert_eq!(verdict.findings.rules(), vec![]);
    assert_eq!((verdict.payments.len(), verdict.uncertain_keys), (1, 1));
}
