//! The sequential specification of one key, and the search; and the global invariants a
//! key's history and its rows in the database must keep.

mod tests;

use std::collections::HashSet;
use std::time::Duration;

use crate::history::{Call, Outcome, intern};

/// Histories are checked with a bit set of the requests already placed.
const STEPS_PER_KEY_MAX: usize = 128;

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
pub(crate) fn check_linearizable(history: &[&Call]) -> Result<(), String> {
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

/// The global invariants: one payment for a key that ever got a 201, and every 201 identical.
pub(crate) fn check_payments(history: &[&Call], payments: &[String]) -> Result<(), String> {
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
