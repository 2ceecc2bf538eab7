//! The in-memory store: records in sharded maps, payments in one book per tenant.
//!
//! Nothing survives the process. It exists for tests, for embedding, and as the fastest store;
//! it passes the same conformance suite as the durable stores. Locks are held only for the few
//! map operations of one step, never across a handler's work, and are always taken in the same
//! order (record shard, then tenant book), so no two steps can deadlock.

use std::collections::hash_map::DefaultHasher;
use std::collections::{HashMap, HashSet};
use std::hash::{Hash, Hasher};

use async_trait::async_trait;

use crate::engine::{
    self, Begin, Lease, Policy, Record, Scope, StoredResponse, SweepAction, check_owner,
};
use crate::fingerprint::Fingerprint;
use crate::store::{
    ListQuery, NewPayment, NewRefund, Page, RefundOutcome, RefundResult, RenderRefund, Store,
    StoreError, SweepReport, accept_refund,
};
use crate::sync::{Arc, AtomicU64, Mutex, MutexGuard, Ordering, lock};
use crate::time::{Clock, Timestamp};
use crate::wire::{
    CustomerId, Payment, PaymentId, PaymentStatus, RewardEntry, RewardSource, Rewards, TenantId,
};

/// Record shards: enough that two cores rarely meet on one lock.
pub const SHARDS_DEFAULT: usize = 64;

/// One tenant's payments, refunds and reward ledger.
#[derive(Default)]
struct Book {
    /// Payments in creation order; the list endpoint reads it backwards.
    payments: Vec<Payment>,
    /// Payment id to its index in `payments`.
    by_id: HashMap<PaymentId, usize>,
    /// Attempts (idempotency key, claim time) that created a payment.
    payment_attempts: HashSet<(String, Timestamp)>,
    /// Attempts (idempotency key, claim time) that created a refund.
    refund_attempts: HashSet<(String, Timestamp)>,
    /// Each customer's reward entries, oldest first.
    rewards: HashMap<CustomerId, Vec<RewardEntry>>,
}

/// A store that keeps everything in memory.
pub struct MemoryStore {
    policy: Policy,
    clock: std::sync::Arc<dyn Clock>,
    shards: Vec<Mutex<HashMap<Scope, Record>>>,
    /// The last fencing token handed out; tokens only grow.
    last_token: AtomicU64,
    books: Mutex<HashMap<TenantId, Arc<Mutex<Book>>>>,
}

impl MemoryStore {
    /// An empty store with `shards` record shards (at least one).
    pub fn new(policy: Policy, clock: std::sync::Arc<dyn Clock>, shards: usize) -> Self {
        Self {
            policy,
            clock,
            shards: (0..shards.max(1))
                .map(|_| Mutex::new(HashMap::new()))
                .collect(),
            last_token: AtomicU64::new(0),
            books: Mutex::new(HashMap::new()),
        }
    }

    fn shard(&self, scope: &Scope) -> &Mutex<HashMap<Scope, Record>> {
        let mut hasher = DefaultHasher::new();
        scope.hash(&mut hasher);
        &self.shards[(hasher.finish() % self.shards.len() as u64) as usize]
    }

    fn book(&self, tenant: &TenantId) -> Arc<Mutex<Book>> {
        let mut books = lock(&self.books);
        books.entry(tenant.clone()).or_default().clone()
    }

    /// The check-then-act bug of the mutation proof: look, let go of the lock, then write what
    /// the stale look decided.
    fn mutant_begin_check_then_act(
        &self,
        scope: &Scope,
        fingerprint: &Fingerprint,
        now: Timestamp,
        next_token: impl FnOnce() -> u64,
    ) -> Begin {
        let mut slot = lock(self.shard(scope)).get(scope).cloned();
        let begin = engine::begin_on(&mut slot, scope, fingerprint, now, &self.policy, next_token);
        if let Some(record) = slot {
            lock(self.shard(scope)).insert(scope.clone(), record);
        }
        begin
    }

    /// Runs `step` on the key's record slot under its shard lock, writing the slot back after.
    fn with_slot<T>(&self, scope: &Scope, step: impl FnOnce(&mut Option<Record>) -> T) -> T {
        let mut shard = lock(self.shard(scope));
        let mut slot = shard.remove(scope);
        let out = step(&mut slot);
        if let Some(record) = slot {
            shard.insert(scope.clone(), record);
        }
        out
    }
}

#[async_trait]
impl Store for MemoryStore {
    fn policy(&self) -> Policy {
        self.policy
    }

    async fn begin(&self, scope: &Scope, fingerprint: &Fingerprint) -> Result<Begin, StoreError> {
        let now = self.clock.now();
        let next_token = || self.last_token.fetch_add(1, Ordering::SeqCst) + 1;
        if cfg!(feature = "mutant-check-then-act") {
            return Ok(self.mutant_begin_check_then_act(scope, fingerprint, now, next_token));
        }
        Ok(self.with_slot(scope, |slot| {
            engine::begin_on(slot, scope, fingerprint, now, &self.policy, next_token)
        }))
    }

    async fn complete(&self, lease: &Lease, response: StoredResponse) -> Result<(), StoreError> {
        let now = self.clock.now();
        self.with_slot(&lease.scope, |slot| {
            engine::complete_on(slot, lease.token, response, now)
        })?;
        Ok(())
    }

    async fn renew(&self, lease: &Lease) -> Result<Timestamp, StoreError> {
        let now = self.clock.now();
        let expires_at = self.with_slot(&lease.scope, |slot| {
            engine::renew_on(slot, lease.token, now, &self.policy)
        })?;
        Ok(expires_at)
    }

    async fn release(&self, lease: &Lease) -> Result<(), StoreError> {
        self.with_slot(&lease.scope, |slot| engine::release_on(slot, lease.token));
        Ok(())
    }

    async fn record(&self, scope: &Scope) -> Result<Option<Record>, StoreError> {
        Ok(lock(self.shard(scope)).get(scope).cloned())
    }

    async fn sweep(&self) -> Result<SweepReport, StoreError> {
        let now = self.clock.now();
        let mut report = SweepReport::default();
        for shard in &self.shards {
            let mut records = lock(shard);
            records.retain(|_, record| {
                let mut slot = Some(record.clone());
                let action = engine::sweep_on(&mut slot, now, &self.policy);
                match (action, slot) {
                    (SweepAction::Tombstone, Some(swept)) => {
                        report.tombstoned += 1;
                        *record = swept;
                        true
                    }
                    (SweepAction::Delete, _) => {
                        report.deleted += 1;
                        false
                    }
                    _ => true,
                }
            });
        }
        Ok(report)
    }

    async fn ping(&self) -> Result<(), StoreError> {
        Ok(())
    }

    async fn create_payment(
        &self,
        lease: &Lease,
        new: NewPayment,
        response: StoredResponse,
    ) -> Result<(), StoreError> {
        let now = self.clock.now();
        let book = self.book(&lease.scope.tenant);
        self.with_slot(&lease.scope, |slot| {
            check_owner(slot, lease.token)?;
            let mut book = lock(&book);
            if !book.payment_attempts.insert(attempt(lease)) {
                return Err(StoreError::DuplicateSideEffect);
            }
            insert_payment(&mut book, new);
            drop(book);
            engine::complete_on(slot, lease.token, response, now)?;
            Ok(())
        })
    }

    async fn create_refund(
        &self,
        lease: &Lease,
        new: NewRefund,
        render: RenderRefund,
    ) -> Result<RefundResult, StoreError> {
        let now = self.clock.now();
        let book_handle = self.book(&lease.scope.tenant);
        self.with_slot(&lease.scope, |slot| {
            check_owner(slot, lease.token)?;
            let mut book = lock(&book_handle);
            if book.refund_attempts.contains(&attempt(lease)) {
                return Err(StoreError::DuplicateSideEffect);
            }
            if cfg!(feature = "mutant-refund-check-outside-transaction") {
                book = mutant_refund_from_stale_read(book, &book_handle, &new.payment_id);
            }
            let Some(outcome) = refund_in_book(&mut book, lease, new) else {
                return Ok(RefundResult::PaymentNotFound);
            };
            drop(book);
            let response = render(&outcome);
            engine::complete_on(slot, lease.token, response.clone(), now)?;
            Ok(RefundResult::Committed(response))
        })
    }

    async fn payment(
        &self,
        tenant: &TenantId,
        id: &PaymentId,
    ) -> Result<Option<Payment>, StoreError> {
        let book = self.book(tenant);
        let book = lock(&book);
        Ok(book.by_id.get(id).map(|&i| book.payments[i].clone()))
    }

    async fn list_payments(
        &self,
        tenant: &TenantId,
        query: &ListQuery,
    ) -> Result<Option<Page>, StoreError> {
        let book = self.book(tenant);
        let book = lock(&book);
        let end = match &query.starting_after {
            None => book.payments.len(),
            Some(id) => match book.by_id.get(id) {
                Some(&i) => i,
                None => return Ok(None),
            },
        };
        let mut matching = book.payments[..end].iter().rev().filter(|payment| {
            query
                .customer_id
                .as_ref()
                .is_none_or(|c| *c == payment.customer_id)
                && query
                    .idempotency_key
                    .as_ref()
                    .is_none_or(|k| *k == payment.idempotency_key)
        });
        let payments: Vec<Payment> = matching.by_ref().take(query.limit).cloned().collect();
        let has_more = matching.next().is_some();
        Ok(Some(Page { payments, has_more }))
    }

    async fn rewards(
        &self,
        tenant: &TenantId,
        customer: &CustomerId,
    ) -> Result<Rewards, StoreError> {
        let book = self.book(tenant);
        let book = lock(&book);
        let entries: Vec<RewardEntry> = book
            .rewards
            .get(customer)
            .map(|entries| entries.iter().rev().cloned().collect())
            .unwrap_or_default();
        Ok(Rewards {
            customer_id: customer.clone(),
            points_balance: entries.iter().map(|entry| entry.points).sum(),
            entries,
        })
    }
}

/// The refund-check-outside-the-transaction bug of the mutation proof: the payment is read,
/// the lock let go, and the stale amount refunded written back over any refund made meanwhile.
fn mutant_refund_from_stale_read<'a>(
    book: MutexGuard<'a, Book>,
    handle: &'a Mutex<Book>,
    payment_id: &PaymentId,
) -> MutexGuard<'a, Book> {
    let stale = book
        .by_id
        .get(payment_id)
        .map(|&i| book.payments[i].clone());
    drop(book);
    crate::sync::yield_now();
    let mut book = lock(handle);
    if let (Some(stale), Some(&i)) = (stale, book.by_id.get(payment_id)) {
        book.payments[i].amount_refunded = stale.amount_refunded;
    }
    book
}

/// The attempt a lease belongs to: side effects are unique by it.
fn attempt(lease: &Lease) -> (String, Timestamp) {
    (lease.scope.key.as_str().to_owned(), lease.claimed_at)
}

fn insert_payment(book: &mut Book, new: NewPayment) {
    let payment = new.payment;
    let index = book.payments.len();
    if payment.status == PaymentStatus::Succeeded {
        let credit = RewardEntry {
            id: new.reward_entry_id,
            source: RewardSource::Payment,
            payment_id: payment.id.clone(),
            refund_id: None,
            points: payment.reward_points,
            created_at: payment.created_at,
        };
        let ledger = book.rewards.entry(payment.customer_id.clone()).or_default();
        ledger.push(credit);
    }
    book.by_id.insert(payment.id.clone(), index);
    book.payments.push(payment);
}

/// Decides and applies a refund in the book; `None` when the payment does not exist.
fn refund_in_book(book: &mut Book, lease: &Lease, new: NewRefund) -> Option<RefundOutcome> {
    let index = *book.by_id.get(&new.payment_id)?;
    let accepted = match accept_refund(book.payments[index].clone(), &new) {
        Ok(accepted) => accepted,
        Err(refused) => return Some(*refused),
    };
    book.payments[index] = accepted.payment.clone();
    let debit = RewardEntry {
        id: new.reward_entry_id,
        source: RewardSource::Refund,
        payment_id: accepted.payment.id.clone(),
        refund_id: Some(accepted.refund.id.clone()),
        points: accepted.points_delta,
        created_at: new.created_at,
    };
    let customer = accepted.payment.customer_id.clone();
    book.rewards.entry(customer).or_default().push(debit);
    book.refund_attempts.insert(attempt(lease));
    Some(accepted.into_outcome())
}

#[cfg(all(test, not(loom)))]
mod tests {
    use std::collections::BTreeMap;
    use std::pin::pin;
    use std::task::{Context, Poll, Waker};

    use super::*;
    use crate::key::IdempotencyKey;
    use crate::time::ManualClock;
    use crate::wire::{Currency, MinorUnits, RefundId, RewardEntryId};

    /// Memory store futures never wait, so one poll finishes them.
    fn now<T>(future: impl std::future::Future<Output = T>) -> T {
        match pin!(future).poll(&mut Context::from_waker(Waker::noop())) {
            Poll::Ready(output) => output,
            Poll::Pending => panic!("a memory store future waited"),
        }
    }

    fn policy() -> Policy {
        Policy {
            lease: std::time::Duration::from_secs(7),
            ..Policy::default()
        }
    }

    fn store() -> MemoryStore {
        let clock = std::sync::Arc::new(ManualClock::new(Timestamp(5_000)));
        MemoryStore::new(policy(), clock, 2)
    }

    fn scope(key: &str) -> Scope {
        Scope {
            tenant: TenantId::from("acme"),
            key: IdempotencyKey::parse(key.as_bytes()).unwrap(),
        }
    }

    fn response(body: &str) -> StoredResponse {
        StoredResponse {
            status: 201,
            content_type: "application/json".into(),
            location: None,
            body: body.into(),
            resource_id: None,
        }
    }

    fn claim(store: &MemoryStore, key: &str) -> Lease {
        match now(store.begin(&scope(key), &Fingerprint([1; 32]))).unwrap() {
            Begin::Execute(lease) => lease,
            other => panic!("{other:?}"),
        }
    }

    fn pay(store: &MemoryStore, key: &str, customer: &str, amount: i64, status: PaymentStatus) {
        let lease = claim(store, key);
        let payment = Payment {
            id: PaymentId(format!("pay_{key}")),
            object: crate::wire::ObjectKind,
            amount: MinorUnits(amount),
            currency: Currency("EUR".into()),
            customer_id: CustomerId(customer.into()),
            description: None,
            metadata: BTreeMap::new(),
            status,
            amount_refunded: MinorUnits(0),
            reward_points: crate::store::reward_points(MinorUnits(amount)),
            idempotency_key: key.into(),
            created_at: Timestamp(5_000),
        };
        let new = NewPayment {
            payment,
            reward_entry_id: RewardEntryId(format!("rwd_{key}")),
        };
        now(store.create_payment(&lease, new, response(key))).unwrap();
    }

    #[test]
    fn a_plain_completion_is_replayed_and_a_stale_one_is_fenced() {
        let store = store();
        assert_eq!(store.policy(), policy());
        let lease = claim(&store, "k");
        now(store.complete(&lease, response("done"))).unwrap();
        let again = now(store.begin(&scope("k"), &Fingerprint([1; 32]))).unwrap();
        assert_eq!(again, Begin::Replay(response("done")));
        let stale = now(store.complete(&lease, response("late")));
        assert!(matches!(stale, Err(StoreError::Fenced(_))));
    }

    #[test]
    fn payments_are_found_by_id_and_listed_by_customer() {
        let store = store();
        pay(&store, "a", "cus_1", 1000, PaymentStatus::Succeeded);
        pay(&store, "b", "cus_2", 2000, PaymentStatus::Succeeded);
        let acme = TenantId::from("acme");
        let found = now(store.payment(&acme, &PaymentId("pay_a".into()))).unwrap();
        assert_eq!(found.unwrap().amount, MinorUnits(1000));
        let query = ListQuery {
            customer_id: Some(CustomerId("cus_2".into())),
            limit: 10,
            ..ListQuery::default()
        };
        let page = now(store.list_payments(&acme, &query)).unwrap().unwrap();
        let ids: Vec<_> = page.payments.iter().map(|p| p.id.as_str()).collect();
        assert_eq!(ids, ["pay_b"]);
    }

    #[test]
    fn only_a_succeeded_payment_credits_points_and_a_refund_takes_them_back() {
        let store = store();
        pay(&store, "ok", "cus_1", 1299, PaymentStatus::Succeeded);
        pay(&store, "no", "cus_1", 5000, PaymentStatus::Failed);
        let acme = TenantId::from("acme");
        let customer = CustomerId("cus_1".into());
        assert_eq!(
            now(store.rewards(&acme, &customer)).unwrap().points_balance,
            12
        );

        let lease = claim(&store, "refund");
        let refund = NewRefund {
            payment_id: PaymentId("pay_ok".into()),
            amount: Some(MinorUnits(300)),
            refund_id: RefundId("re_1".into()),
            reward_entry_id: RewardEntryId("rwd_re_1".into()),
            created_at: Timestamp(6_000),
        };
        let render: RenderRefund = std::sync::Arc::new(|_: &RefundOutcome| response("r"));
        let result = now(store.create_refund(&lease, refund, render)).unwrap();
        assert!(matches!(result, RefundResult::Committed(_)));
        let payment = now(store.payment(&acme, &PaymentId("pay_ok".into())))
            .unwrap()
            .unwrap();
        assert_eq!(
            (payment.amount_refunded, payment.reward_points),
            (MinorUnits(300), 9)
        );
        let rewards = now(store.rewards(&acme, &customer)).unwrap();
        assert_eq!(rewards.points_balance, 9);
        assert_eq!(
            rewards.entries[0].points, -3,
            "newest first: the refund's debit"
        );
    }
}
