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
    ListQuery, NewPayment, NewRefund, Page, RefundOutcome, RefundPlan, RefundResult, RenderRefund,
    Store, StoreError, SweepReport, plan_refund,
};
use crate::sync::{Arc, AtomicU64, Mutex, Ordering, lock};
use crate::time::{Clock, Timestamp};
use crate::wire::{
    CustomerId, ObjectKind, Payment, PaymentId, PaymentStatus, Refund, RewardEntry, RewardSource,
    Rewards, TenantId,
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
            // The bug: look, let go of the lock, then write what the stale look decided.
            let mut slot = lock(self.shard(scope)).get(scope).cloned();
            let begin =
                engine::begin_on(&mut slot, scope, fingerprint, now, &self.policy, next_token);
            if let Some(record) = slot {
                lock(self.shard(scope)).insert(scope.clone(), record);
            }
            return Ok(begin);
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
                // The bug: decide on a copy of the payment read before the lock is let go.
                let stale = book
                    .by_id
                    .get(&new.payment_id)
                    .map(|&i| book.payments[i].clone());
                drop(book);
                crate::sync::yield_now();
                book = lock(&book_handle);
                if let (Some(stale), Some(&i)) = (stale, book.by_id.get(&new.payment_id)) {
                    book.payments[i].amount_refunded = stale.amount_refunded;
                }
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
    let payment = &mut book.payments[index];
    let (amount, points_after, points_delta) = match plan_refund(payment, new.amount) {
        RefundPlan::NotRefundable => {
            let payment = payment.clone();
            return Some(RefundOutcome::NotRefundable { payment });
        }
        RefundPlan::Exceeds { remaining } => {
            let payment = payment.clone();
            return Some(RefundOutcome::Exceeds { payment, remaining });
        }
        RefundPlan::Refund {
            amount,
            points_after,
            points_delta,
        } => (amount, points_after, points_delta),
    };
    payment.amount_refunded.0 += amount.0;
    payment.reward_points = points_after;
    let payment = payment.clone();
    let refund = Refund {
        id: new.refund_id,
        object: ObjectKind,
        payment_id: payment.id.clone(),
        amount,
        created_at: new.created_at,
    };
    let debit = RewardEntry {
        id: new.reward_entry_id,
        source: RewardSource::Refund,
        payment_id: payment.id.clone(),
        refund_id: Some(refund.id.clone()),
        points: points_delta,
        created_at: new.created_at,
    };
    let ledger = book.rewards.entry(payment.customer_id.clone()).or_default();
    ledger.push(debit);
    book.refund_attempts.insert(attempt(lease));
    Some(RefundOutcome::Created { refund, payment })
}
