//! Exhaustive interleavings of the in-memory store and the duplicate wake-ups, under loom.
//!
//! Run with `RUSTFLAGS="--cfg loom" LOOM_MAX_PREEMPTIONS=3 cargo test -p oncepay-core --release
//! --test loom`. Each model is small (two or three threads, one key) so that every interleaving
//! within the preemption bound is explored.
#![cfg(loom)]

use std::collections::BTreeMap;
use std::time::Duration;

use loom::future::block_on;
use loom::sync::Arc;
use loom::thread;
use oncepay_core::engine::{Begin, Policy, Scope, StoredResponse};
use oncepay_core::fingerprint::Fingerprint;
use oncepay_core::key::IdempotencyKey;
use oncepay_core::memory::MemoryStore;
use oncepay_core::signals::Signals;
use oncepay_core::store::{
    ListQuery, NewPayment, NewRefund, RefundOutcome, RefundResult, Store, StoreError,
};
use oncepay_core::time::{Clock, ManualClock, Timestamp};
use oncepay_core::wire::*;

fn policy() -> Policy {
    Policy {
        lease: Duration::from_secs(5),
        retention: Duration::from_secs(10),
        tombstone_retention: Duration::from_secs(20),
    }
}

fn scope(key: &str) -> Scope {
    Scope {
        tenant: TenantId::from("acme"),
        key: IdempotencyKey::parse(key.as_bytes()).unwrap(),
    }
}

/// A store with one record shard, so every key meets every other on the same lock.
fn store(clock: std::sync::Arc<ManualClock>) -> Arc<MemoryStore> {
    sharded_store(clock, 1)
}

fn sharded_store(clock: std::sync::Arc<ManualClock>, shards: usize) -> Arc<MemoryStore> {
    let clock: std::sync::Arc<dyn Clock> = clock;
    Arc::new(MemoryStore::new(policy(), clock, shards))
}

fn response(body: &str) -> StoredResponse {
    StoredResponse {
        status: 201,
        content_type: "application/json".into(),
        location: None,
        body: body.as_bytes().to_vec(),
        resource_id: None,
    }
}

fn payment(id: &str, key: &str, amount: i64) -> NewPayment {
    NewPayment {
        payment: Payment {
            id: PaymentId(id.into()),
            object: ObjectKind,
            amount: MinorUnits(amount),
            currency: Currency("EUR".into()),
            customer_id: CustomerId("cus_1".into()),
            description: None,
            metadata: BTreeMap::new(),
            status: PaymentStatus::Succeeded,
            amount_refunded: MinorUnits(0),
            reward_points: amount / 100,
            idempotency_key: key.into(),
            created_at: Timestamp(0),
        },
        reward_entry_id: RewardEntryId(format!("rwd_{id}")),
    }
}

fn payments_with_key(store: &MemoryStore, key: &str) -> usize {
    let query = ListQuery {
        idempotency_key: Some(key.into()),
        limit: 100,
        ..ListQuery::default()
    };
    let page = block_on(store.list_payments(&TenantId::from("acme"), &query));
    page.unwrap().unwrap().payments.len()
}

/// Begins `key` with `body` and, when it may execute, creates a payment under the lease.
fn attempt(store: &MemoryStore, key: &str, body: u8, id: &str) -> Begin {
    let begin = block_on(store.begin(&scope(key), &Fingerprint([body; 32]))).unwrap();
    if let Begin::Execute(lease) = &begin {
        let created = block_on(store.create_payment(lease, payment(id, key, 1000), response(id)));
        created.unwrap();
    }
    begin
}

#[test]
fn two_racing_claims_on_one_key_execute_once() {
    loom::model(|| {
        let clock = std::sync::Arc::new(ManualClock::new(Timestamp(0)));
        let store = store(clock);
        let other = store.clone();
        let racer = thread::spawn(move || attempt(&other, "k", 1, "pay_b"));
        let mine = attempt(&store, "k", 1, "pay_a");
        let theirs = racer.join().unwrap();

        let executed = [&mine, &theirs]
            .iter()
            .filter(|b| matches!(b, Begin::Execute(_)))
            .count();
        assert_eq!(executed, 1, "{mine:?} / {theirs:?}");
        for begin in [&mine, &theirs] {
            assert!(matches!(
                begin,
                Begin::Execute(_) | Begin::InFlight { .. } | Begin::Replay(_)
            ));
        }
        assert_eq!(payments_with_key(&store, "k"), 1);
    });
}

#[test]
fn three_racing_claims_with_two_payloads_execute_once_and_refuse_the_other_payload() {
    loom::model(|| {
        let clock = std::sync::Arc::new(ManualClock::new(Timestamp(0)));
        let store = store(clock);
        let racers: Vec<_> = [(1u8, "pay_b"), (2u8, "pay_c")]
            .into_iter()
            .map(|(body, id)| {
                let store = store.clone();
                thread::spawn(move || (body, attempt(&store, "k", body, id)))
            })
            .collect();
        let mut outcomes = vec![(1u8, attempt(&store, "k", 1, "pay_a"))];
        outcomes.extend(racers.into_iter().map(|r| r.join().unwrap()));

        let winners: Vec<u8> = outcomes
            .iter()
            .filter(|(_, b)| matches!(b, Begin::Execute(_)))
            .map(|(body, _)| *body)
            .collect();
        assert_eq!(winners.len(), 1, "{outcomes:?}");
        for (body, begin) in &outcomes {
            if *body != winners[0] {
                assert_eq!(
                    *begin,
                    Begin::Reused,
                    "another payload never executes or replays"
                );
            }
        }
        assert_eq!(payments_with_key(&store, "k"), 1);
    });
}

#[test]
fn a_stale_owner_racing_a_takeover_cannot_both_commit() {
    loom::model(|| {
        let clock = std::sync::Arc::new(ManualClock::new(Timestamp(0)));
        let store = store(clock.clone());
        let fingerprint = Fingerprint([1; 32]);
        let Begin::Execute(stale) = block_on(store.begin(&scope("k"), &fingerprint)).unwrap()
        else {
            panic!("the first claim executes");
        };
        clock.advance(Duration::from_secs(6));

        let zombie_store = store.clone();
        let zombie = thread::spawn(move || {
            block_on(zombie_store.create_payment(
                &stale,
                payment("pay_old", "k", 1000),
                response("old"),
            ))
        });
        let retry = attempt(&store, "k", 1, "pay_new");
        let zombie = zombie.join().unwrap();

        match (&zombie, &retry) {
            // The zombie committed first: the retry finds its outcome.
            (Ok(()), Begin::Replay(stored)) => assert_eq!(stored.body, b"old"),
            // The retry took over first: the zombie is fenced off.
            (Err(StoreError::Fenced(_)), Begin::Execute(lease)) => assert!(lease.took_over),
            other => panic!("unexpected interleaving outcome: {other:?}"),
        }
        assert_eq!(payments_with_key(&store, "k"), 1);
    });
}

#[test]
fn a_waiting_duplicate_is_always_woken_by_the_completion() {
    loom::model(|| {
        let clock = std::sync::Arc::new(ManualClock::new(Timestamp(0)));
        let store = store(clock);
        let signals: Arc<Signals<Scope>> = Arc::new(Signals::default());
        let fingerprint = Fingerprint([1; 32]);
        let Begin::Execute(lease) = block_on(store.begin(&scope("k"), &fingerprint)).unwrap()
        else {
            panic!("the first claim executes");
        };

        let (owner_store, owner_signals) = (store.clone(), signals.clone());
        let owner = thread::spawn(move || {
            block_on(owner_store.complete(&lease, response("done"))).unwrap();
            owner_signals.notify(&scope("k"));
        });
        // The duplicate: subscribe, look, and wait only while the original still runs.
        let replay = loop {
            let completion = Signals::subscribe(&signals, &scope("k"));
            match block_on(store.begin(&scope("k"), &fingerprint)).unwrap() {
                Begin::InFlight { .. } => block_on(completion),
                Begin::Replay(stored) => break stored,
                other => panic!("unexpected {other:?}"),
            }
        };
        owner.join().unwrap();
        assert_eq!(replay.body, b"done");
        assert_eq!(
            signals.keys_waited_on(),
            0,
            "the last subscriber cleaned up"
        );
    });
}

#[test]
fn the_sweeper_racing_a_completion_never_loses_it() {
    loom::model(|| {
        let clock = std::sync::Arc::new(ManualClock::new(Timestamp(0)));
        let store = store(clock.clone());
        let fingerprint = Fingerprint([1; 32]);
        let Begin::Execute(lease) = block_on(store.begin(&scope("k"), &fingerprint)).unwrap()
        else {
            panic!("the first claim executes");
        };
        // Past the lease, inside every retention: nothing may be swept.
        clock.advance(Duration::from_secs(6));
        let sweeper_store = store.clone();
        let sweeper = thread::spawn(move || block_on(sweeper_store.sweep()).unwrap());
        block_on(store.create_payment(&lease, payment("pay_a", "k", 1000), response("a"))).unwrap();
        let report = sweeper.join().unwrap();

        assert_eq!((report.deleted, report.tombstoned), (0, 0));
        let again = block_on(store.begin(&scope("k"), &fingerprint)).unwrap();
        assert_eq!(again, Begin::Replay(response("a")));
    });
}

#[test]
fn two_refunds_racing_one_payment_never_exceed_it() {
    loom::model(|| {
        let clock = std::sync::Arc::new(ManualClock::new(Timestamp(0)));
        // Many shards, so the two refund keys hold different record locks and only the payment's
        // own protection keeps them apart.
        let store = sharded_store(clock, 16);
        attempt(&store, "pay-key", 1, "pay_1");

        let refund = |store: Arc<MemoryStore>, key: &'static str| {
            let fingerprint = Fingerprint([9; 32]);
            let Begin::Execute(lease) = block_on(store.begin(&scope(key), &fingerprint)).unwrap()
            else {
                panic!("a fresh refund key executes");
            };
            let new = NewRefund {
                payment_id: PaymentId("pay_1".into()),
                amount: Some(MinorUnits(600)),
                refund_id: RefundId(format!("re_{key}")),
                reward_entry_id: RewardEntryId(format!("rwd_{key}")),
                created_at: Timestamp(0),
            };
            let render = std::sync::Arc::new(|outcome: &RefundOutcome| match outcome {
                RefundOutcome::Created { .. } => response("created"),
                _ => response("refused"),
            });
            block_on(store.create_refund(&lease, new, render)).unwrap()
        };
        let other = store.clone();
        let racer = thread::spawn(move || refund(other, "refund-b"));
        let mine = refund(store.clone(), "refund-a");
        let theirs = racer.join().unwrap();

        let created = [mine, theirs]
            .into_iter()
            .filter(|r| matches!(r, RefundResult::Committed(s) if s.body == b"created"))
            .count();
        assert_eq!(created, 1, "two refunds of 600 never both fit in 1000");
        let payment = block_on(store.payment(&TenantId::from("acme"), &PaymentId("pay_1".into())));
        assert_eq!(payment.unwrap().unwrap().amount_refunded, MinorUnits(600));
    });
}
