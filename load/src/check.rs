//! The client-side verdict: what the answers of a run must satisfy, judged from the answers alone.
//!
//! Every request becomes an [`Observation`]. The [`Ledger`] keeps per key only what the checks
//! need (the first 201 body, how many executions and replays, when they were sent and received),
//! so its memory grows with keys, not with requests: a later 201 is compared with the first one as
//! it arrives instead of being stored.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use serde::Deserialize;

use crate::violation::{Findings, Rule, Violation};

/// Why a request was sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Intent {
    /// A key's first request.
    First,
    /// An earlier key again with the same body, as a client does after a timeout.
    Retry,
    /// An earlier key with another amount, which the server must refuse.
    Mismatch,
}

/// What came back for one request.
#[derive(Clone, Debug)]
pub enum Answer {
    /// An HTTP response; `replayed` is the `Idempotent-Replayed: true` header.
    Response {
        status: u16,
        replayed: bool,
        body: Bytes,
    },
    /// No response (refused, reset, timed out): whether the request executed is unknown.
    Failed,
}

/// One request and its answer.
#[derive(Clone, Debug)]
pub struct Observation {
    pub key: Arc<str>,
    pub intent: Intent,
    /// The amount in the body that was sent.
    pub amount_minor: i64,
    pub sent_at: Instant,
    pub received_at: Instant,
    pub answer: Answer,
}

/// The fields of a created payment that the server-side checks compare against.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
pub struct PaymentSeen {
    pub id: String,
    pub amount: i64,
    pub customer_id: String,
    pub idempotency_key: String,
    pub reward_points: i64,
}

/// What the ledger remembers of one key.
#[derive(Debug, Default)]
struct KeyHistory {
    first_created_body: Option<Bytes>,
    payment: Option<PaymentSeen>,
    executions: u32,
    replays: u32,
    earliest_execution_sent_at: Option<Instant>,
    earliest_replay_received_at: Option<Instant>,
    /// Requests whose outcome the client cannot know: no answer, or a 5xx.
    unknown_outcomes: u32,
}

/// The end of a run as the client saw it.
#[derive(Debug, Default)]
pub struct Verdict {
    pub findings: Findings,
    /// The payment of every key that got a 201, as its first 201 described it.
    pub payments: Vec<PaymentSeen>,
    pub keys: usize,
    /// Keys that got no 201 but may have executed (lost answers, 5xx).
    pub uncertain_keys: usize,
}

/// Every answer of a run, checked as it is recorded and once more at the end.
#[derive(Debug, Default)]
pub struct Ledger {
    keys: HashMap<Arc<str>, KeyHistory>,
    findings: Findings,
}

impl Ledger {
    /// Records one answer and checks what can be checked at once.
    pub fn record(&mut self, observation: Observation) {
        let history = self.keys.entry(observation.key.clone()).or_default();
        let Answer::Response {
            status,
            replayed,
            ref body,
        } = observation.answer
        else {
            history.unknown_outcomes += 1;
            return;
        };

        // A 5xx may have failed after the commit, so the key may or may not have executed.
        if status >= 500 {
            history.unknown_outcomes += 1;
        }
        let allowed = match observation.intent {
            Intent::First | Intent::Retry => matches!(status, 201 | 409 | 503),
            Intent::Mismatch => status == 503 || (status == 422 && is_key_reused(body)),
        };
        if !allowed {
            let detail = format!("{:?} got {status}: {}", observation.intent, text(body));
            let violation = Violation::new(Rule::UnexpectedStatus, &*observation.key, detail);
            self.findings.add(violation);
            return;
        }

        if status == 201 {
            record_created(history, &observation, replayed, body, &mut self.findings);
        }
    }

    /// Runs the checks that need every answer of a key, and hands over what the server-side
    /// checks need.
    pub fn finish(self) -> Verdict {
        let keys = self.keys.len();
        let mut verdict = Verdict {
            findings: self.findings,
            keys,
            ..Verdict::default()
        };
        for (key, history) in self.keys {
            let execution_sent_at = history.earliest_execution_sent_at;
            let replay_received_at = history.earliest_replay_received_at;
            if let (Some(sent_at), Some(received_at)) = (execution_sent_at, replay_received_at)
                && received_at < sent_at
            {
                let detail = "a replay came back before the execution was sent";
                verdict
                    .findings
                    .add(Violation::new(Rule::ReplayBeforeExecution, &*key, detail));
            }

            let lost_any = history.unknown_outcomes > 0;
            if history.replays > 0 && history.executions == 0 && !lost_any {
                let detail = format!("{} replays and no execution", history.replays);
                verdict
                    .findings
                    .add(Violation::new(Rule::ReplayWithoutExecution, &*key, detail));
            }

            match history.payment {
                Some(payment) => verdict.payments.push(payment),
                None if lost_any => verdict.uncertain_keys += 1,
                None => {}
            }
        }
        verdict
    }
}

/// Checks a 201 against the key's earlier ones and counts it as an execution or a replay.
fn record_created(
    history: &mut KeyHistory,
    observation: &Observation,
    replayed: bool,
    body: &Bytes,
    findings: &mut Findings,
) {
    let key = &*observation.key;
    match &history.first_created_body {
        Some(first) if first != body => {
            let detail = format!("{} then {}", text(first), text(body));
            findings.add(Violation::new(Rule::BodiesDiffer, key, detail));
        }
        Some(_) => {}
        None => {
            history.payment = first_payment(observation, body, findings);
            history.first_created_body = Some(body.clone());
        }
    }

    if replayed {
        history.replays += 1;
        let earliest = history
            .earliest_replay_received_at
            .get_or_insert(observation.received_at);
        *earliest = (*earliest).min(observation.received_at);
    } else {
        history.executions += 1;
        if history.executions == 2 {
            let detail = "a second 201 without Idempotent-Replayed";
            findings.add(Violation::new(Rule::ExecutedTwice, key, detail));
        }
        let earliest = history
            .earliest_execution_sent_at
            .get_or_insert(observation.sent_at);
        *earliest = (*earliest).min(observation.sent_at);
    }
}

/// Reads the payment out of a key's first 201; it must describe the request that was sent.
fn first_payment(
    observation: &Observation,
    body: &Bytes,
    findings: &mut Findings,
) -> Option<PaymentSeen> {
    let key = &*observation.key;
    let payment = serde_json::from_slice::<PaymentSeen>(body)
        .ok()
        .filter(|p| p.idempotency_key == key && p.amount == observation.amount_minor);
    if payment.is_none() {
        let detail = format!("sent {}, got {}", observation.amount_minor, text(body));
        findings.add(Violation::new(Rule::AnswerForAnotherRequest, key, detail));
    }
    payment
}

/// Whether a problem+json body carries the code for a key reused with another request.
fn is_key_reused(body: &[u8]) -> bool {
    #[derive(Deserialize)]
    struct Problem {
        code: String,
    }
    serde_json::from_slice::<Problem>(body).is_ok_and(|p| p.code == "idempotency_key_reused")
}

/// A body as text for a report.
fn text(body: &[u8]) -> String {
    String::from_utf8_lossy(body).into_owned()
}

#[cfg(test)]
mod tests;
