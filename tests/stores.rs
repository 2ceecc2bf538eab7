//! One conformance suite for every store: a reference model drives random sequences of begin,
//! complete, release, crash, clock ticks and sweeps, and every store must give the model's
//! answer at every step, so no store can drift from another.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use oncepay::store::sqlite::SqliteStore;
use oncepay_core::engine::{Begin, Lease, Policy, Scope, StoredResponse};
use oncepay_core::fingerprint::Fingerprint;
use oncepay_core::key::IdempotencyKey;
use oncepay_core::memory::MemoryStore;
use oncepay_core::model::{Expected, Model, Op, Owner};
use oncepay_core::store::{ListQuery, NewPayment, Store, StoreError};
use oncepay_core::time::{Clock, ManualClock, Timestamp};
use oncepay_core::wire::*;
use proptest::prelude::*;
use proptest::test_runner::{Config, FileFailurePersistence};
use proptest_state_machine::{ReferenceStateMachine, StateMachineTest, prop_state_machine};

const LEASE_MS: u64 = 3_000;
const RETENTION_MS: u64 = 10_000;
const TOMBSTONE_MS: u64 = 20_000;

fn policy() -> Policy {
    Policy {
        lease: Duration::from_millis(LEASE_MS),
        retention: Duration::from_millis(RETENTION_MS),
        tombstone_retention: Duration::from_millis(TOMBSTONE_MS),
    }
}

/// Every store under test, sharing one manual clock.
fn stores(clock: Arc<ManualClock>, dir: &tempfile::TempDir) -> Vec<(&'static str, Arc<dyn Store>)> {
    let clock: Arc<dyn Clock> = clock;
    let path = dir.path().join("model.db");
    let sqlite = SqliteStore::open(path.to_str().unwrap(), policy(), clock.clone()).unwrap();
    vec![
        ("memory", Arc::new(MemoryStore::new(policy(), clock, 4))),
        ("sqlite", Arc::new(sqlite)),
    ]
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
struct Reference {
    model: Model,
    expected: Expected,
    owner: Option<Owner>,
}

struct TheModel;

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
            // Steps of 500 ms add up to the limits exactly, so boundaries are hit often.
            2 => prop_oneof![Just(1u64), (1u64..8).prop_map(|n| n * 500)].prop_map(Op::Tick),
            2 => prop_oneof![Just(LEASE_MS), Just(RETENTION_MS), Just(TOMBSTONE_MS), Just(LEASE_MS - 1)].prop_map(Op::Tick),
            1 => Just(Op::Sweep),
        ]
        .boxed()
    }

    fn apply(mut state: Reference, op: &Op) -> Reference {
        state.owner = match op {
            Op::Complete(n) | Op::Release(n) | Op::Crash(n) => state.model.owner(*n).cloned(),
            _ => None,
        };
        state.expected = state.model.apply(op);
        state
    }
}

/// The stores, the clock they share, and each model owner's lease in each store.
struct Stores {
    runtime: tokio::runtime::Runtime,
    clock: Arc<ManualClock>,
    stores: Vec<(&'static str, Arc<dyn Store>)>,
    leases: BTreeMap<u64, Vec<Lease>>,
    _dir: tempfile::TempDir,
}

impl StateMachineTest for Stores {
    type SystemUnderTest = Self;
    type Reference = TheModel;

    fn init_test(_: &Reference) -> Self {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let clock = Arc::new(ManualClock::new(Timestamp(1_796_378_400_000)));
        let dir = tempfile::tempdir().unwrap();
        let stores = runtime.block_on(async { stores(clock.clone(), &dir) });
        Stores {
            runtime,
            clock,
            stores,
            leases: BTreeMap::new(),
            _dir: dir,
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
            Op::Sweep => {
                for (_, store) in &sut.stores {
                    sut.runtime.block_on(store.sweep()).unwrap();
                }
            }
        }
        sut
    }

    fn check_invariants(sut: &Self, reference: &Reference) {
        // At most one payment per completion the model saw, per key, in every store.
        for ((tenant, key), completions) in &reference.model.completions {
            let scope = scope(*tenant, *key);
            for (name, store) in &sut.stores {
                let query = ListQuery {
                    idempotency_key: Some(scope.key.as_str().to_owned()),
                    limit: 100,
                    ..ListQuery::default()
                };
                let page = sut
                    .runtime
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

impl Stores {
    fn begin(&mut self, reference: &Reference, scope: Scope, body: u8, expected: &Expected) {
        let fingerprint = Fingerprint([body; 32]);
        let mut leases = Vec::new();
        for (name, store) in &self.stores {
            let got = self
                .runtime
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
        for ((name, store), lease) in self.stores.iter().zip(leases) {
            let now = self.clock.now();
            let result = match expected {
                Expected::Completed { response: n } => {
                    let new = payment(*n, lease.scope.key.as_str(), now);
                    self.runtime
                        .block_on(store.create_payment(&lease, new, response(*n)))
                }
                _ => {
                    let new = payment(u64::MAX, lease.scope.key.as_str(), now);
                    self.runtime
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

    fn release(&mut self, reference: &Reference) {
        let Some(owner) = &reference.owner else {
            return;
        };
        let leases = self
            .leases
            .remove(&owner.id)
            .expect("every owner has its leases");
        for ((_, store), lease) in self.stores.iter().zip(leases) {
            self.runtime.block_on(store.release(&lease)).unwrap();
        }
    }
}

fn cases() -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|c| c.parse().ok())
        .unwrap_or(256)
}

prop_state_machine! {
    #![proptest_config(Config {
        cases: cases(),
        failure_persistence: Some(Box::new(FileFailurePersistence::Direct(
            concat!(env!("CARGO_MANIFEST_DIR"), "/proptest-regressions/stores.txt"),
        ))),
        ..Config::default()
    })]

    #[test]
    fn every_store_gives_the_reference_models_answer_at_every_step(sequential 1..48 => Stores);
}
