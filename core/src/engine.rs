//! The idempotency state machine: records, the decision function and its transitions.
//!
//! A key's record is absent, in flight (an owner holds a lease with a fencing token), completed
//! (the stored response) or a tombstone (what is left after retention). [`decide`] is a total
//! function of (record, request fingerprint, now, policy); the `*_on` functions apply its
//! transitions to a record slot, and every store runs them inside its own atomic section, so all
//! stores share one semantics.

use std::time::Duration;

use crate::fingerprint::Fingerprint;
use crate::key::IdempotencyKey;
use crate::time::Timestamp;
use crate::wire::TenantId;

/// The default lease of an in-flight request.
pub const LEASE_DEFAULT: Duration = Duration::from_secs(30);
/// The shortest lease accepted: below a second, `Retry-After` could not express it.
pub const LEASE_MIN: Duration = Duration::from_secs(1);
/// How long a completed response is replayed.
pub const RETENTION_DEFAULT: Duration = Duration::from_secs(24 * 3600);
/// How long a tombstone outlives the response it replaced.
pub const TOMBSTONE_RETENTION_DEFAULT: Duration = Duration::from_secs(30 * 24 * 3600);

/// The time limits that drive the state machine.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Policy {
    /// How long an owner may run before a retry can take its key over.
    pub lease: Duration,
    /// How long a completed response is replayed.
    pub retention: Duration,
    /// How long a tombstone remains after retention ends.
    pub tombstone_retention: Duration,
}

impl Default for Policy {
    fn default() -> Self {
        Self {
            lease: LEASE_DEFAULT,
            retention: RETENTION_DEFAULT,
            tombstone_retention: TOMBSTONE_RETENTION_DEFAULT,
        }
    }
}

/// The scope of a record: the same key under two tenants is two unrelated keys.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Scope {
    /// The tenant that owns the key.
    pub tenant: TenantId,
    /// The client's key.
    pub key: IdempotencyKey,
}

/// A response as stored for replay: exactly what the first execution sent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredResponse {
    /// The HTTP status code.
    pub status: u16,
    /// The `Content-Type` header.
    pub content_type: String,
    /// The `Location` header, when the response had one.
    pub location: Option<String>,
    /// The body bytes.
    pub body: Vec<u8>,
    /// The id of the object the request created or acted on, kept in the tombstone.
    pub resource_id: Option<String>,
}

/// Where a record stands.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RecordState {
    /// An owner is executing the request until the lease runs out.
    InFlight {
        /// When the lease ends and a retry may take over.
        lease_expires_at: Timestamp,
    },
    /// The request reached a final answer, replayed until retention ends.
    Completed {
        /// When the outcome committed.
        completed_at: Timestamp,
        /// The answer to replay.
        response: StoredResponse,
    },
    /// Retention ended; only enough is kept to refuse a late retry.
    Tombstone {
        /// When the original outcome committed.
        completed_at: Timestamp,
        /// The original status code.
        response_status: u16,
        /// The id of the object the original request created, if any.
        resource_id: Option<String>,
    },
}

/// One key's record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    /// What the first request asked for; a key is bound to it for life.
    pub fingerprint: Fingerprint,
    /// The fencing token of the latest owner. Tokens only grow, store-wide.
    pub token: u64,
    /// When the key was first claimed.
    pub created_at: Timestamp,
    /// Where the record stands.
    pub state: RecordState,
}

/// What a request with a key should do, given the key's record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// No live record: claim the key and execute.
    Claim,
    /// The owner's lease ran out: take the key over and execute.
    TakeOver,
    /// The original completed: send its stored response.
    Replay,
    /// The original is still running: wait, or answer 409 after this many seconds.
    Wait {
        /// Whole seconds left on the lease, rounded up, at least 1.
        retry_after_secs: u64,
    },
    /// The key is bound to another request: 422, nothing executed.
    Reused,
    /// The key's retention ended: 422, never a second execution.
    Expired,
}

/// Decides what a request with fingerprint `fingerprint` does with the key's `record` at `now`.
pub fn decide(
    record: Option<&Record>,
    fingerprint: &Fingerprint,
    now: Timestamp,
    policy: &Policy,
) -> Decision {
    let Some(record) = record else {
        return Decision::Claim;
    };
    match &record.state {
        RecordState::Tombstone { completed_at, .. } => {
            if now >= tombstone_expires_at(*completed_at, policy) {
                Decision::Claim
            } else {
                Decision::Expired
            }
        }
        RecordState::Completed { completed_at, .. } => {
            if now >= completed_at.plus(policy.retention) {
                Decision::Expired
            } else if record.fingerprint != *fingerprint {
                Decision::Reused
            } else {
                Decision::Replay
            }
        }
        RecordState::InFlight { lease_expires_at } => {
            if record.fingerprint != *fingerprint {
                Decision::Reused
            } else if lease_over(now, *lease_expires_at) {
                Decision::TakeOver
            } else {
                Decision::Wait {
                    retry_after_secs: retry_after_secs(now.until(*lease_expires_at)),
                }
            }
        }
    }
}

/// Whether a lease ending at `lease_expires_at` is over at `now`: it covers up to, not including,
/// its end.
fn lease_over(now: Timestamp, lease_expires_at: Timestamp) -> bool {
    if cfg!(feature = "mutant-lease-boundary") {
        return mutant_lease_over_one_tick_late(now, lease_expires_at);
    }
    now >= lease_expires_at
}

/// The `<` for `<=` bug of the mutation proof: the lease still holds at its end.
fn mutant_lease_over_one_tick_late(now: Timestamp, lease_expires_at: Timestamp) -> bool {
    now > lease_expires_at
}

/// Whole seconds in `lease_left`, rounded up and at least 1.
pub fn retry_after_secs(lease_left: Duration) -> u64 {
    lease_left.as_millis().div_ceil(1000).max(1) as u64
}

/// When a tombstone of an outcome completed at `completed_at` may be forgotten.
pub fn tombstone_expires_at(completed_at: Timestamp, policy: &Policy) -> Timestamp {
    completed_at
        .plus(policy.retention)
        .plus(policy.tombstone_retention)
}

/// The right to execute a claimed key, proven by its fencing token.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Lease {
    /// The key claimed.
    pub scope: Scope,
    /// The fencing token; only the holder of the record's current token may complete it.
    pub token: u64,
    /// When the key was first claimed; with the key it names one attempt at a request, which
    /// side effects are unique by (a takeover continues the same attempt).
    pub claimed_at: Timestamp,
    /// When the lease runs out.
    pub expires_at: Timestamp,
    /// Whether this claim took the key over from an owner whose lease ran out.
    pub took_over: bool,
}

/// The outcome of beginning a request with a key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Begin {
    /// Execute; the lease proves ownership.
    Execute(Lease),
    /// Send the stored response.
    Replay(StoredResponse),
    /// The original is still running.
    InFlight {
        /// Whole seconds left on its lease, rounded up, at least 1.
        retry_after_secs: u64,
    },
    /// The key is bound to another request.
    Reused,
    /// The key's retention ended.
    Expired {
        /// The id of what the original request created, if anything.
        resource_id: Option<String>,
    },
}

/// Applies [`decide`] to a record slot, claiming or taking over the key when it says so.
///
/// `next_token` is called only when a new owner needs a fencing token.
pub fn begin_on(
    slot: &mut Option<Record>,
    scope: &Scope,
    fingerprint: &Fingerprint,
    now: Timestamp,
    policy: &Policy,
    next_token: impl FnOnce() -> u64,
) -> Begin {
    let decision = decide(slot.as_ref(), fingerprint, now, policy);
    let took_over = decision == Decision::TakeOver;
    match decision {
        Decision::Claim | Decision::TakeOver => {
            // A takeover keeps the original claim time: it is the same attempt at the request.
            let claimed_at = match slot.as_ref() {
                Some(record) if took_over => record.created_at,
                _ => now,
            };
            let token = next_token();
            let expires_at = now.plus(policy.lease);
            *slot = Some(Record {
                fingerprint: *fingerprint,
                token,
                created_at: claimed_at,
                state: RecordState::InFlight {
                    lease_expires_at: expires_at,
                },
            });
            Begin::Execute(Lease {
                scope: scope.clone(),
                token,
                claimed_at,
                expires_at,
                took_over,
            })
        }
        Decision::Replay => match slot.as_ref().map(|record| &record.state) {
            Some(RecordState::Completed { response, .. }) => Begin::Replay(response.clone()),
            _ => unreachable!("decide answers Replay only for a completed record"),
        },
        Decision::Wait { retry_after_secs } => Begin::InFlight { retry_after_secs },
        Decision::Reused => Begin::Reused,
        Decision::Expired => Begin::Expired {
            resource_id: slot.as_ref().and_then(resource_id),
        },
    }
}

fn resource_id(record: &Record) -> Option<String> {
    match &record.state {
        RecordState::Completed { response, .. } => response.resource_id.clone(),
        RecordState::Tombstone { resource_id, .. } => resource_id.clone(),
        RecordState::InFlight { .. } => None,
    }
}

/// The owner's lease no longer holds the key: it was taken over, released or completed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("the lease was lost: another owner took the key over")]
pub struct Fenced;

/// Checks that `token` still owns the in-flight record in `slot`.
///
/// # Errors
///
/// [`Fenced`] when the record is gone, completed or owned by a newer token.
pub fn check_owner(slot: &Option<Record>, token: u64) -> Result<(), Fenced> {
    if cfg!(feature = "mutant-no-fencing") {
        return mutant_fencing_off();
    }
    match slot {
        Some(Record {
            token: current,
            state: RecordState::InFlight { .. },
            ..
        }) if *current == token => Ok(()),
        _ => Err(Fenced),
    }
}

/// The missing-fencing bug of the mutation proof: any token may complete any record.
fn mutant_fencing_off() -> Result<(), Fenced> {
    Ok(())
}

/// Completes the record owned by `token` with `response`.
///
/// # Errors
///
/// [`Fenced`] when `token` no longer owns the record; the record is then left unchanged.
pub fn complete_on(
    slot: &mut Option<Record>,
    token: u64,
    response: StoredResponse,
    now: Timestamp,
) -> Result<(), Fenced> {
    check_owner(slot, token)?;
    if let Some(record) = slot.as_mut() {
        record.state = RecordState::Completed {
            completed_at: now,
            response,
        };
    }
    Ok(())
}

/// Extends the lease of the record owned by `token` to `now + policy.lease`: the heartbeat of
/// an owner that is alive but slow, so that no retry takes over work that is still running.
///
/// # Errors
///
/// [`Fenced`] when `token` no longer owns the record; nothing changes then.
pub fn renew_on(
    slot: &mut Option<Record>,
    token: u64,
    now: Timestamp,
    policy: &Policy,
) -> Result<Timestamp, Fenced> {
    check_owner(slot, token)?;
    let lease_expires_at = now.plus(policy.lease);
    if let Some(record) = slot.as_mut() {
        record.state = RecordState::InFlight { lease_expires_at };
    }
    Ok(lease_expires_at)
}

/// Forgets the in-flight record owned by `token`, so a retry executes afresh.
///
/// A release by a token that no longer owns the record changes nothing.
pub fn release_on(slot: &mut Option<Record>, token: u64) {
    if check_owner(slot, token).is_ok() {
        *slot = None;
    }
}

/// What the retention sweeper does to one record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SweepAction {
    /// Still within its time.
    Keep,
    /// Retention ended: drop the body, keep the tombstone.
    Tombstone,
    /// Nothing left to protect: delete the record.
    Delete,
}

/// What the sweeper does to `record` at `now`.
///
/// A completed response is never dropped before its retention, an in-flight record never while
/// its lease is live. An abandoned in-flight record (its owner died and nobody retried) goes
/// once its lease has been over for a whole retention period: no side effect was committed under
/// it, since side effects commit together with the completion.
pub fn sweep_action(record: &Record, now: Timestamp, policy: &Policy) -> SweepAction {
    match &record.state {
        RecordState::InFlight { lease_expires_at } => {
            if now >= lease_expires_at.plus(policy.retention) {
                SweepAction::Delete
            } else {
                SweepAction::Keep
            }
        }
        RecordState::Completed { completed_at, .. } => {
            if now >= tombstone_expires_at(*completed_at, policy) {
                SweepAction::Delete
            } else if now >= completed_at.plus(policy.retention) {
                SweepAction::Tombstone
            } else {
                SweepAction::Keep
            }
        }
        RecordState::Tombstone { completed_at, .. } => {
            if now >= tombstone_expires_at(*completed_at, policy) {
                SweepAction::Delete
            } else {
                SweepAction::Keep
            }
        }
    }
}

/// Applies [`sweep_action`] to a slot; answers the action taken.
pub fn sweep_on(slot: &mut Option<Record>, now: Timestamp, policy: &Policy) -> SweepAction {
    let Some(record) = slot.as_mut() else {
        return SweepAction::Keep;
    };
    let action = sweep_action(record, now, policy);
    match action {
        SweepAction::Keep => {}
        SweepAction::Delete => *slot = None,
        SweepAction::Tombstone => {
            if let RecordState::Completed {
                completed_at,
                response,
            } = &record.state
            {
                record.state = RecordState::Tombstone {
                    completed_at: *completed_at,
                    response_status: response.status,
                    resource_id: response.resource_id.clone(),
                };
            }
        }
    }
    action
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use crate::wire::TenantId;

    fn scope() -> Scope {
        Scope {
            tenant: TenantId::from("acme"),
            key: IdempotencyKey::parse(b"k").unwrap(),
        }
    }

    fn completed(resource_id: &str) -> Option<Record> {
        Some(Record {
            fingerprint: Fingerprint([1; 32]),
            token: 1,
            created_at: Timestamp(0),
            state: RecordState::Completed {
                completed_at: Timestamp(0),
                response: StoredResponse {
                    status: 201,
                    content_type: "application/json".into(),
                    location: None,
                    body: Vec::new(),
                    resource_id: Some(resource_id.into()),
                },
            },
        })
    }

    #[test]
    fn the_default_policy_is_a_30_second_lease_a_day_of_replays_and_30_days_of_tombstones() {
        let policy = Policy::default();
        assert_eq!(policy.lease, Duration::from_secs(30));
        assert_eq!(policy.retention, Duration::from_secs(86_400));
        assert_eq!(policy.tombstone_retention, Duration::from_secs(30 * 86_400));
    }

    #[test]
    fn a_takeover_keeps_the_original_claim_time_so_side_effects_stay_unique() {
        let policy = Policy::default();
        let mut slot = None;
        let fp = Fingerprint([1; 32]);
        let first = begin_on(&mut slot, &scope(), &fp, Timestamp(1_000), &policy, || 1);
        let later = Timestamp(1_000).plus(policy.lease);
        let second = begin_on(&mut slot, &scope(), &fp, later, &policy, || 2);
        match (first, second) {
            (Begin::Execute(first), Begin::Execute(second)) => {
                assert!(second.took_over && !first.took_over);
                assert_eq!(second.claimed_at, first.claimed_at);
                assert_eq!(second.token, 2);
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(slot.unwrap().created_at, Timestamp(1_000));
    }

    #[test]
    fn an_expired_key_names_what_the_original_request_created() {
        let policy = Policy::default();
        let fp = Fingerprint([1; 32]);
        let after = Timestamp(0).plus(policy.retention);
        let mut slot = completed("pay_1");
        let expired = begin_on(&mut slot, &scope(), &fp, after, &policy, || 9);
        let named = Begin::Expired {
            resource_id: Some("pay_1".into()),
        };
        assert_eq!(expired, named);
        sweep_on(&mut slot, after, &policy);
        assert!(matches!(
            slot.as_ref().unwrap().state,
            RecordState::Tombstone { .. }
        ));
        assert_eq!(
            begin_on(&mut slot, &scope(), &fp, after, &policy, || 9),
            named
        );
    }

    #[test]
    fn a_renewal_extends_the_lease_from_now_and_a_lost_lease_cannot_renew() {
        let policy = Policy::default();
        let mut slot = None;
        let fp = Fingerprint([1; 32]);
        begin_on(&mut slot, &scope(), &fp, Timestamp(0), &policy, || 4);
        let renewed = renew_on(&mut slot, 4, Timestamp(10_000), &policy);
        assert_eq!(renewed, Ok(Timestamp(10_000).plus(policy.lease)));
        assert_eq!(
            renew_on(&mut slot, 3, Timestamp(10_000), &policy),
            Err(Fenced)
        );
        assert_eq!(
            decide(slot.as_ref(), &fp, Timestamp(30_000), &policy),
            Decision::Wait {
                retry_after_secs: 10
            }
        );
    }
}
