//! The PostgreSQL store called directly, without a server: its state machine on a clock the
//! test steps, its leases under skewed process clocks, and the shared conformance suite.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use oncepay::store::postgres::{PostgresOptions, PostgresStore};
use oncepay_core::conformance::{Fixture, Stores, TheModel, cases};
use oncepay_core::engine::{Begin, Lease, Policy, RecordState, Scope, StoredResponse};
use oncepay_core::fingerprint::Fingerprint;
use oncepay_core::key::IdempotencyKey;
use oncepay_core::memory::MemoryStore;
use oncepay_core::store::{NewPayment, Store, StoreError};
use oncepay_core::time::{Clock, ManualClock, SystemClock, Timestamp};
use oncepay_core::wire::{
    Currency, CustomerId, MinorUnits, ObjectKind, Payment, PaymentId, PaymentStatus, RewardEntryId,
    TenantId,
};
use proptest::test_runner::{Config, FileFailurePersistence, TestRunner};
use proptest_state_machine::{ReferenceStateMachine, StateMachineTest};
use sqlx::Connection;
use sqlx::postgres::PgConnection;

use crate::harness::TestDb;

// ---------------------------------------------------------------------------------------------
// The store itself, with a clock the test steps.

fn scope(key: &str) -> Scope {
    Scope {
        tenant: TenantId::from("acme"),
        key: IdempotencyKey::parse(key.as_bytes()).unwrap(),
    }
}

fn stored(body: &str) -> StoredResponse {
    StoredResponse {
        status: 201,
        content_type: "application/json".into(),
        location: None,
        body: body.as_bytes().to_vec(),
        resource_id: Some(format!("pay_{body}")),
    }
}

fn new_payment(lease: &Lease, id: &str) -> NewPayment {
    NewPayment {
        payment: Payment {
            id: PaymentId::from(id),
            object: ObjectKind,
            amount: MinorUnits(1_000),
            currency: Currency::from("EUR"),
            customer_id: CustomerId::from("cus_store"),
            description: None,
            metadata: Default::default(),
            status: PaymentStatus::Succeeded,
            amount_refunded: MinorUnits(0),
            reward_points: 10,
            idempotency_key: lease.scope.key.as_str().to_owned(),
            created_at: lease.claimed_at,
        },
        reward_entry_id: RewardEntryId(format!("rwd_{id}")),
    }
}

fn execute(begin: Begin) -> Lease {
    match begin {
        Begin::Execute(lease) => lease,
        other => panic!("expected to execute, got {other:?}"),
    }
}

async fn stepped_store(db: &TestDb) -> (PostgresStore, Arc<ManualClock>) {
    let clock = Arc::new(ManualClock::new(Timestamp(1_796_378_400_000)));
    let policy = Policy {
        lease: Duration::from_secs(3),
        retention: Duration::from_secs(10),
        tombstone_retention: Duration::from_secs(20),
    };
    let injected: Arc<dyn Clock> = clock.clone();
    let options = PostgresOptions::default();
    let store = PostgresStore::connect(&db.url, &options, policy, Some(injected)).await;
    (store.expect("the store connects"), clock)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_store_claims_waits_fences_and_replays_as_the_state_machine_says() {
    let db = TestDb::create().await;
    let (store, clock) = stepped_store(&db).await;
    let (a, fp, other_fp) = (scope("a"), Fingerprint([1; 32]), Fingerprint([2; 32]));

    let first = execute(store.begin(&a, &fp).await.unwrap());
    let waiting = store.begin(&a, &fp).await.unwrap();
    let reused = store.begin(&a, &other_fp).await.unwrap();
    clock.advance(Duration::from_secs(3));
    let second = execute(store.begin(&a, &fp).await.unwrap());

    assert!(!first.took_over);
    assert_eq!(
        waiting,
        Begin::InFlight {
            retry_after_secs: 3
        }
    );
    assert_eq!(reused, Begin::Reused);
    assert!(second.took_over && second.token > first.token);
    assert_eq!(
        second.claimed_at, first.claimed_at,
        "a takeover continues the same attempt"
    );

    // The displaced owner can neither commit, renew nor release.
    let zombie = store.create_payment(&first, new_payment(&first, "pay_zombie"), stored("zombie"));
    assert!(matches!(zombie.await, Err(StoreError::Fenced(_))));
    assert!(matches!(
        store.complete(&first, stored("z")).await,
        Err(StoreError::Fenced(_))
    ));
    assert!(matches!(
        store.renew(&first).await,
        Err(StoreError::Fenced(_))
    ));
    store.release(&first).await.unwrap();
    let record = store.record(&a).await.unwrap().expect("the record stays");
    assert_eq!(
        record.token, second.token,
        "a stale release changes nothing"
    );

    // The owner renews, commits once, and every later request replays.
    let renewed = store.renew(&second).await.unwrap();
    assert_eq!(renewed, clock.now().plus(Duration::from_secs(3)));
    let payment = new_payment(&second, "pay_a");
    store
        .create_payment(&second, payment, stored("a"))
        .await
        .unwrap();
    assert_eq!(
        store.begin(&a, &fp).await.unwrap(),
        Begin::Replay(stored("a"))
    );
    assert_eq!(store.begin(&a, &other_fp).await.unwrap(), Begin::Reused);
    assert_eq!(db.payments_for_key("acme", "a").await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_store_releases_refuses_second_side_effects_and_sweeps_by_retention() {
    let db = TestDb::create().await;
    let (store, clock) = stepped_store(&db).await;
    let (b, c, d, fp) = (scope("b"), scope("c"), scope("d"), Fingerprint([3; 32]));

    // A released key executes afresh.
    let released = execute(store.begin(&b, &fp).await.unwrap());
    store.release(&released).await.unwrap();
    assert_eq!(store.record(&b).await.unwrap(), None);
    let again = execute(store.begin(&b, &fp).await.unwrap());
    assert!(!again.took_over);
    store.complete(&again, stored("b")).await.unwrap();

    // A payment that already exists for the attempt is refused and nothing is committed.
    let lease_d = execute(store.begin(&d, &fp).await.unwrap());
    sqlx::query(
        "insert into payments (tenant, id, idempotency_key, claimed_at_ms, amount, currency, \
         customer_id, metadata, status, amount_refunded, reward_points, created_at_ms) \
         values ('acme', 'pay_earlier', 'd', $1, 1000, 'EUR', 'cus_store', '{}', 'succeeded', \
         0, 10, $1)",
    )
    .bind(lease_d.claimed_at.as_millis() as i64)
    .execute(&db.pool)
    .await
    .unwrap();
    let duplicate = store.create_payment(&lease_d, new_payment(&lease_d, "pay_d"), stored("d"));
    assert!(matches!(
        duplicate.await,
        Err(StoreError::DuplicateSideEffect)
    ));
    let record_d = store.record(&d).await.unwrap().unwrap();
    assert!(matches!(record_d.state, RecordState::InFlight { .. }));

    // An abandoned claim goes a retention after its lease; a completion becomes a tombstone
    // after its retention and goes after the tombstone's.
    let _abandoned = execute(store.begin(&c, &fp).await.unwrap());
    clock.advance(Duration::from_secs(10));
    let expired = store.begin(&b, &fp).await.unwrap();
    let first_sweep = store.sweep().await.unwrap();
    let tombstone = store.record(&b).await.unwrap().unwrap();
    clock.advance(Duration::from_secs(3));
    let second_sweep = store.sweep().await.unwrap();
    clock.advance(Duration::from_secs(20));
    let last_sweep = store.sweep().await.unwrap();

    assert_eq!(
        expired,
        Begin::Expired {
            resource_id: Some("pay_b".into())
        }
    );
    assert_eq!((first_sweep.tombstoned, first_sweep.deleted), (1, 0));
    assert!(matches!(
        tombstone.state,
        RecordState::Tombstone {
            response_status: 201,
            ..
        }
    ));
    assert_eq!(
        (second_sweep.tombstoned, second_sweep.deleted),
        (0, 2),
        "c and d abandoned"
    );
    assert_eq!((last_sweep.tombstoned, last_sweep.deleted), (0, 1));
    assert_eq!(store.record(&b).await.unwrap(), None);
    assert!(!execute(store.begin(&b, &fp).await.unwrap()).took_over);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn leases_are_judged_by_the_database_clock_whatever_each_process_clock_says() {
    let db = TestDb::create().await;
    let policy = Policy {
        lease: Duration::from_secs(30),
        ..Policy::default()
    };
    // Two processes' views of the database, one with its clock five minutes fast. They are
    // opened the way `oncepay serve` opens its store, so this is the server's own wiring.
    let skewed = Arc::new(ManualClock::new(SystemClock.now()));
    skewed.advance(Duration::from_secs(300));
    let fast = oncepay::store::open(&db.url, policy, skewed).await.unwrap();
    let honest = oncepay::store::open(&db.url, policy, Arc::new(SystemClock))
        .await
        .unwrap();
    let fingerprint = Fingerprint([7; 32]);

    let claimed_fast = fast
        .begin(&scope("fast-claims"), &fingerprint)
        .await
        .unwrap();
    let claimed_honest = honest
        .begin(&scope("honest-claims"), &fingerprint)
        .await
        .unwrap();
    let seen_by_honest = honest
        .begin(&scope("fast-claims"), &fingerprint)
        .await
        .unwrap();
    let seen_by_fast = fast
        .begin(&scope("honest-claims"), &fingerprint)
        .await
        .unwrap();

    assert!(matches!(claimed_fast, Begin::Execute(_)));
    assert!(matches!(claimed_honest, Begin::Execute(_)));
    for seen in [seen_by_honest, seen_by_fast] {
        let Begin::InFlight { retry_after_secs } = seen else {
            panic!("a live lease must be respected, got {seen:?}");
        };
        assert!(
            (29..=30).contains(&retry_after_secs),
            "Retry-After {retry_after_secs}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// The shared conformance suite: the reference model's random sequences, run on the PostgreSQL
// store and the in-memory store in lockstep.

/// The database the conformance fixture works in; the test that owns it sets it.
static CONFORMANCE_URL: OnceLock<String> = OnceLock::new();

/// The PostgreSQL store on an emptied database, beside the in-memory store, on one clock.
struct Postgres {
    stores: Vec<(&'static str, Arc<dyn Store>)>,
    /// Declared last so it outlives the stores' connections.
    runtime: tokio::runtime::Runtime,
}

impl Fixture for Postgres {
    fn open(clock: Arc<ManualClock>) -> Self {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime starts");
        let url = CONFORMANCE_URL.get().expect("the test set the database");
        let clock: Arc<dyn Clock> = clock;
        let policy = oncepay_core::conformance::policy();
        let options = PostgresOptions {
            pool_size: 2,
            migrate: true,
        };
        let postgres = runtime.block_on(async {
            // Each sequence starts from an empty database, as the model does.
            let mut connection = PgConnection::connect(url)
                .await
                .expect("the database opens");
            sqlx::query("truncate reward_entries, refunds, payments, idempotency_records")
                .execute(&mut connection)
                .await
                .expect("the tables empty");
            PostgresStore::connect(url, &options, policy, Some(clock.clone())).await
        });
        let stores: Vec<(&'static str, Arc<dyn Store>)> = vec![
            ("memory", Arc::new(MemoryStore::new(policy, clock, 4))),
            ("postgres", Arc::new(postgres.expect("the store connects"))),
        ];
        Postgres { stores, runtime }
    }

    fn stores(&self) -> &[(&'static str, Arc<dyn Store>)] {
        &self.stores
    }

    fn block_on<T>(&self, future: impl Future<Output = T>) -> T {
        self.runtime.block_on(future)
    }
}

#[test]
fn the_postgres_store_gives_the_reference_models_answer_at_every_step() {
    let setup = tokio::runtime::Runtime::new().expect("a runtime starts");
    let db = setup.block_on(TestDb::create());
    setup.block_on(async {
        // Migrate once here, so that the first sequence does not pay for it.
        let options = PostgresOptions::default();
        let policy = Policy::default();
        PostgresStore::connect(&db.url, &options, policy, None)
            .await
            .expect("migrated");
    });
    CONFORMANCE_URL.set(db.url.clone()).expect("set once");
    // Fewer sequences than the in-process stores run: each step is a few database round trips.
    let config = Config {
        cases: cases(64),
        failure_persistence: Some(Box::new(FileFailurePersistence::Direct(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/proptest-regressions/postgres.txt"
        )))),
        ..Config::default()
    };

    let mut runner = TestRunner::new(config.clone());
    let outcome = runner.run(
        &TheModel::sequential_strategy(1..48),
        |(initial, steps, seen)| {
            Stores::<Postgres>::test_sequential(config.clone(), initial, steps, seen);
            Ok(())
        },
    );

    if let Err(failure) = outcome {
        panic!("the PostgreSQL store left the model: {failure}");
    }
}
