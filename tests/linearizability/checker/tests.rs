//! The checker itself, on hand-written histories.

use std::time::Duration;

use super::{check_linearizable, check_payments};
use crate::history::{Call, Outcome};

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
