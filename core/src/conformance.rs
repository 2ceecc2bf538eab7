//! The store conformance suite: the reference model as a proptest state machine, run against
//! any set of stores in lockstep. Every store must give the model's answer at every step, so no
//! store (the in-memory one included) can drift from another or from the contract.
//!
//! A test binary implements [`Fixture`] to open its stores and run their futures, then runs
//! `proptest_state_machine::prop_state_machine!` over [`Stores`]. Enabled by the `conformance`
//! feature, which only tests turn on.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use proptest::prelude::*;
use proptest_state_machine::{ReferenceStateMachine, StateMachineTest};

use crate::engine::{Begin, Lease, Policy, RecordState, Scope, StoredResponse};
use crate::fingerprint::Fingerprint;
use crate::key::IdempotencyKey;
use crate::model::{Expected, Model, Op, Owner};
use crate::store::{ListQuery, NewPayment, Store, StoreError};
use crate::time::{Clock, ManualClock, Timestamp};
use crate::wire::*;

const LEASE_MS: u64 = 3_000;
const RETENTION_MS: u64 = 10_000;
const TOMBSTONE_MS: u64 = 20_000;

/// The limits every store under test is opened with; the model uses the same.
pub fn policy() -> Policy {
    Policy {
        lease: Duration::from_millis(LEASE_MS),
        retention: Duration::from_millis(RETENTION_MS),
        tombstone_retention: Duration::from_millis(TOMBSTONE_MS),
    }
}

fn scope(tenant: u8, key: u8) -> Scope {
    Scope {
        tenant: TenantId(format!("tenant-{tenant}")),
        key: IdempotencyKey::parse(format!("key-{key}").as_bytes()).unwrap(),
    }
}

/// The response a completion numbered `n` stores: its number is its body.
fn response(n: u64) -> StoredResponse {
    StoredResponse {
        status: 201,
        content_type: "application/json".into(),
        location: None,
        body: n.to_string().into_bytes(),
        resource_id: Some(format!("pay_{n}")),
    }
}

fn payment(n: u64, key: &str, now: Timestamp) -> NewPayment {
    NewPayment {
        payment: Payment {
            id: PaymentId(format!("pay_{n}")),
            object: ObjectKind,
            amount: MinorUnits(1000),
            currency: Currency("EUR".into()),
            customer_id: CustomerId("cus_model".into()),
            description: None,
            metadata: BTreeMap::new(),
            status: PaymentStatus::Succeeded,
            amount_refunded: MinorUnits(0),
            reward_points: 10,
            idempotency_key: key.to_owned(),
            created_at: now,
        },
        reward_entry_id: RewardEntryId(format!("rwd_{n}")),
    }
}

/// The model plus what the last step expected and which owner it acted on.
#[derive(Clone, Debug)]
pub struct Reference {
    model: Model,
    expected: Expected,
    owner: Option<Owner>,
}

/// The reference model as a proptest state machine.
pub struct TheModel;

impl ReferenceStateMachine for TheModel {
    type State = Reference;
    type Transition = Op;

    fn init_state() -> BoxedStrategy<Reference> {
        let model = Model::new(LEASE_MS, RETENTION_MS, TOMBSTONE_MS);
        Just(Reference {
            model,
            expected: Expected::Nothing,
            owner: None,
        })
        .boxed()
    }

    fn transitions(_: &Reference) -> BoxedStrategy<Op> {
        let begin = (0u8..2, 0u8..2, 0u8..2).prop_map(|(tenant, key, body)| Op::Begin {
            tenant,
            key,
            body,
        });
        prop_oneof![
            6 => begin,
            3 => any::<usize>().prop_map(Op::Complete),
            1 => any::<usize>().prop_map(Op::Release),
            1 => any::<usize>().prop_map(Op::Crash),
            1 => any::<usize>().prop_map(Op::Renew),
            // Steps of 500 ms add up to the limits exactly, so boundaries are hit often.
            2 => prop_oneof![Just(1u64), (1u64..8).prop_map(|n| n * 500)].prop_map(Op::Tick),
            2 => prop_oneof![Just(LEASE_MS), Just(RETENTION_MS), Just(TOMBSTONE_MS), Just(LEASE_MS - 1)].prop_map(Op::Tick),
            1 => Just(Op::Sweep),
        ]
        .boxed()
    }

    fn apply(mut state: Reference, op: &Op) -> Reference {
        state.owner = match op {
            Op::Complete(n) | Op::Release(n) | Op::Crash(n) | Op::Renew(n) => {
                state.model.owner(*n).cloned()
            }
            _ => None,
        };
        state.expected = state.model.apply(op);
        state
    }
}

/// What a test binary provides: the stores to check and a way to run their futures.
pub trait Fixture: Sized + 'static {
    /// Opens every store under test around the one manual clock they share.
    fn open(clock: Arc<ManualClock>) -> Self;

    /// The stores under test, each with a name for failure messages.
    fn stores(&self) -> &[(&'static str, Arc<dyn Store>)];

    /// Runs a store future to completion.
    fn block_on<T>(&self, future: impl Future<Output = T>) -> T;
}

/// The stores under test, the clock they share, and each model owner's lease in each store.
pub struct Stores<F: Fixture> {
    fixture: F,
    clock: Arc<ManualClock>,
    leases: BTreeMap<u64, Vec<Lease>>,
}

impl<F: Fixture> StateMachineTest for Stores<F> {
    type SystemUnderTest = Self;
    type Reference = TheModel;

    fn init_test(_: &Reference) -> Self {
        let clock = Arc::new(ManualClock::new(Timestamp(1_796_378_400_000)));
        let fixture = F::open(clock.clone());
        Stores {
            fixture,
            clock,
            leases: BTreeMap::new(),
        }
    }

    fn apply(mut sut: Self, reference: &Reference, op: Op) -> Self {
        let expected = &reference.expected;
        match op {
            Op::Begin { tenant, key, body } => {
                sut.begin(reference, scope(tenant, key), body, expected)
            }
            Op::Complete(_) => sut.complete(reference, expected),
            Op::Release(_) => sut.release(reference),
            Op::Crash(_) => {
                if let Some(owner) = &reference.owner {
                    sut.leases.remove(&owner.id);
                }
            }
            Op::Tick(ms) => sut.clock.advance(Duration::from_millis(ms)),
            Op::Renew(_) => sut.renew(reference, expected),
            Op::Sweep => {
                for (name, store) in sut.fixture.stores() {
                    let report = sut.fixture.block_on(store.sweep()).unwrap();
                    let got = Expected::Swept {
                        tombstoned: report.tombstoned,
                        deleted: report.deleted,
                    };
                    assert_eq!(got, *expected, "{name}: what the sweep did");
                }
            }
        }
        sut
    }

    fn check_invariants(sut: &Self, reference: &Reference) {
        // Every store holds each key in the state the model has it in.
        for (tenant, key) in (0..2).flat_map(|t| (0..2).map(move |k| (t, k))) {
            let expected = reference.model.state_of((tenant, key));
            for (name, store) in sut.fixture.stores() {
                let record = sut
                    .fixture
                    .block_on(store.record(&scope(tenant, key)))
                    .unwrap();
                let got = record.map(|r| match r.state {
                    RecordState::InFlight { .. } => "in_flight",
                    RecordState::Completed { .. } => "completed",
                    RecordState::Tombstone { .. } => "tombstone",
                });
                assert_eq!(got, expected, "{name}: the record of ({tenant}, {key})");
            }
        }
        // At most one payment per completion the model saw, per key, in every store.
        for ((tenant, key), completions) in &reference.model.completions {
            let scope = scope(*tenant, *key);
            for (name, store) in sut.fixture.stores() {
                let query = ListQuery {
                    idempotency_key: Some(scope.key.as_str().to_owned()),
                    limit: 100,
                    ..ListQuery::default()
                };
                let page = sut
                    .fixture
                    .block_on(store.list_payments(&scope.tenant, &query))
                    .unwrap()
                    .unwrap();
                assert_eq!(
                    page.payments.len() as u64,
                    *completions,
                    "{name}: payments of {scope:?}"
                );
            }
        }
    }
}

impl<F: Fixture> Stores<F> {
    fn begin(&mut self, reference: &Reference, scope: Scope, body: u8, expected: &Expected) {
        let fingerprint = Fingerprint([body; 32]);
        let mut leases = Vec::new();
        for (name, store) in self.fixture.stores() {
            let got = self
                .fixture
                .block_on(store.begin(&scope, &fingerprint))
                .unwrap();
            match (expected, got) {
                (Expected::Execute { took_over }, Begin::Execute(lease)) => {
                    assert_eq!(lease.took_over, *took_over, "{name}: takeover flag");
                    leases.push(lease);
                }
                (Expected::Replay { response: n }, Begin::Replay(stored)) => {
                    assert_eq!(stored, response(*n), "{name}: the replay is completion {n}");
                }
                (
                    Expected::InFlight { retry_after_secs },
                    Begin::InFlight {
                        retry_after_secs: got,
                    },
                ) => {
                    assert_eq!(got, *retry_after_secs, "{name}: Retry-After");
                }
                (Expected::Reused, Begin::Reused) | (Expected::Expired, Begin::Expired { .. }) => {}
                (expected, got) => panic!("{name}: expected {expected:?}, got {got:?}"),
            }
        }
        if !leases.is_empty() {
            let owner = reference
                .model
                .owners
                .last()
                .expect("the model added an owner");
            self.leases.insert(owner.id, leases);
        }
    }

    fn complete(&mut self, reference: &Reference, expected: &Expected) {
        let Some(owner) = &reference.owner else {
            return;
        };
        let leases = self
            .leases
            .remove(&owner.id)
            .expect("every owner has its leases");
        for ((name, store), lease) in self.fixture.stores().iter().zip(leases) {
            let now = self.clock.now();
            let result = match expected {
                Expected::Completed { response: n } => {
                    let new = payment(*n, lease.scope.key.as_str(), now);
                    self.fixture
                        .block_on(store.create_payment(&lease, new, response(*n)))
                }
                _ => {
                    let new = payment(u64::MAX, lease.scope.key.as_str(), now);
                    self.fixture
                        .block_on(store.create_payment(&lease, new, response(0)))
                }
            };
            match (expected, result) {
                (Expected::Completed { .. }, Ok(()))
                | (Expected::Fenced, Err(StoreError::Fenced(_))) => {}
                (expected, result) => panic!("{name}: expected {expected:?}, got {result:?}"),
            }
        }
    }

    fn renew(&mut self, reference: &Reference, expected: &Expected) {
        let Some(owner) = &reference.owner else {
            return;
        };
        let leases = &self.leases[&owner.id];
        for ((name, store), lease) in self.fixture.stores().iter().zip(leases) {
            let renewed = self.fixture.block_on(store.renew(lease));
            let lease_ends = Timestamp(self.clock.now().as_millis() + LEASE_MS);
            match (expected, renewed) {
                (Expected::Renewed, Ok(ends)) => assert_eq!(ends, lease_ends, "{name}"),
                (Expected::Fenced, Err(StoreError::Fenced(_))) => {}
                (expected, got) => panic!("{name}: expected {expected:?}, got {got:?}"),
            }
        }
    }

    fn release(&mut self, reference: &Reference) {
        let Some(owner) = &reference.owner else {
            return;
        };
        let leases = self
            .leases
            .remove(&owner.id)
            .expect("every owner has its leases");
        for ((_, store), lease) in self.fixture.stores().iter().zip(leases) {
            self.fixture.block_on(store.release(&lease)).unwrap();
        }
    }
}

/// How many sequences a run tries: `PROPTEST_CASES`, else `default`.
pub fn cases(default: u32) -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|c| c.parse().ok())
        .unwrap_or(default)
}
