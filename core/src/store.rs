//! The store interface: idempotency records and the payments they guard, committed together.
//!
//! A store owns both the records and the side effects (payments, refunds, reward entries) so that
//! an outcome and its side effects commit in one atomic step, and a side effect is keyed by
//! `(tenant, idempotency key)` itself. Every implementation runs the transitions of
//! [`crate::engine`], so they all share one semantics, and one conformance suite checks them.

use std::sync::Arc;

use async_trait::async_trait;
use thiserror::Error;

use crate::engine::{Begin, Fenced, Lease, Policy, Record, Scope, StoredResponse};
use crate::fingerprint::Fingerprint;
use crate::time::Timestamp;
use crate::wire::{
    CustomerId, MinorUnits, ObjectKind, Payment, PaymentId, PaymentStatus, Refund, RefundId,
    RewardEntryId, Rewards, TenantId,
};

/// Why a store operation failed.
#[derive(Debug, Error)]
pub enum StoreError {
    /// The store cannot be reached or refused the operation; nothing was committed.
    #[error("the store is unavailable: {0}")]
    Unavailable(String),
    /// The caller's lease was taken over; nothing was committed.
    #[error(transparent)]
    Fenced(#[from] Fenced),
    /// A side effect for this `(tenant, key)` already exists; nothing was committed.
    #[error("a side effect already exists for this idempotency key")]
    DuplicateSideEffect,
    /// The stored data could not be read back.
    #[error("the store holds data it cannot read: {0}")]
    Corrupt(String),
}

/// A payment to create, with the id of the reward entry that credits it.
#[derive(Clone, Debug)]
pub struct NewPayment {
    /// The payment as the processor decided it.
    pub payment: Payment,
    /// The id for the reward credit of a succeeded payment.
    pub reward_entry_id: RewardEntryId,
}

/// A refund to attempt.
#[derive(Clone, Debug)]
pub struct NewRefund {
    /// The payment to refund.
    pub payment_id: PaymentId,
    /// The amount asked for; what is left when `None`.
    pub amount: Option<MinorUnits>,
    /// The id the refund gets if it is created.
    pub refund_id: RefundId,
    /// The id of the reward entry that takes points back.
    pub reward_entry_id: RewardEntryId,
    /// When the refund is created.
    pub created_at: Timestamp,
}

/// The final answer to a refund request, decided inside the store's atomic step.
#[derive(Clone, Debug)]
pub enum RefundOutcome {
    /// The refund was created; `payment` is the payment after it.
    Created {
        /// The new refund.
        refund: Refund,
        /// The payment with its new `amount_refunded`.
        payment: Payment,
    },
    /// The payment failed and has nothing to refund.
    NotRefundable {
        /// The payment as it is.
        payment: Payment,
    },
    /// The amount asked for is more than what is left.
    Exceeds {
        /// The payment as it is.
        payment: Payment,
        /// What is left to refund.
        remaining: MinorUnits,
    },
}

/// Turns a refund outcome into the response stored with it.
pub type RenderRefund = Arc<dyn Fn(&RefundOutcome) -> StoredResponse + Send + Sync>;

/// What a refund request led to.
#[derive(Clone, Debug)]
pub enum RefundResult {
    /// The outcome and its response committed, completing the key.
    Committed(StoredResponse),
    /// No such payment for this tenant; nothing committed.
    PaymentNotFound,
}

/// A filter and window on the payments list.
#[derive(Clone, Debug, Default)]
pub struct ListQuery {
    /// Only this customer's payments.
    pub customer_id: Option<CustomerId>,
    /// Only the payment created with this idempotency key.
    pub idempotency_key: Option<String>,
    /// At most this many, newest first.
    pub limit: usize,
    /// Continue after this payment.
    pub starting_after: Option<PaymentId>,
}

/// One page of payments, newest first.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Page {
    /// The payments of the page.
    pub payments: Vec<Payment>,
    /// Whether more follow.
    pub has_more: bool,
}

/// What one sweep did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SweepReport {
    /// Completed records whose body was dropped for a tombstone.
    pub tombstoned: u64,
    /// Records deleted outright.
    pub deleted: u64,
}

/// A store of idempotency records and payments.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// The time limits the store applies.
    fn policy(&self) -> Policy;

    /// Looks up the key and claims it if the request should execute, in one atomic step.
    ///
    /// # Errors
    ///
    /// [`StoreError::Unavailable`] when the store cannot be reached.
    async fn begin(&self, scope: &Scope, fingerprint: &Fingerprint) -> Result<Begin, StoreError>;

    /// Stores `response` as the final outcome of the key `lease` holds.
    ///
    /// # Errors
    ///
    /// [`StoreError::Fenced`] when the lease was taken over, or the store is unavailable.
    async fn complete(&self, lease: &Lease, response: StoredResponse) -> Result<(), StoreError>;

    /// Extends the lease `lease` holds by the policy's lease from now (the owner's heartbeat).
    ///
    /// # Errors
    ///
    /// [`StoreError::Fenced`] when the lease was taken over, or the store is unavailable.
    async fn renew(&self, lease: &Lease) -> Result<Timestamp, StoreError>;

    /// Gives the key up so that a retry executes afresh; a lost lease changes nothing.
    ///
    /// # Errors
    ///
    /// [`StoreError::Unavailable`] when the store cannot be reached.
    async fn release(&self, lease: &Lease) -> Result<(), StoreError>;

    /// The record of one key, as it is now.
    ///
    /// # Errors
    ///
    /// [`StoreError::Unavailable`] when the store cannot be reached.
    async fn record(&self, scope: &Scope) -> Result<Option<Record>, StoreError>;

    /// Turns records past retention into tombstones and deletes what has nothing left to guard.
    ///
    /// # Errors
    ///
    /// [`StoreError::Unavailable`] when the store cannot be reached.
    async fn sweep(&self) -> Result<SweepReport, StoreError>;

    /// Checks that the store answers.
    ///
    /// # Errors
    ///
    /// [`StoreError::Unavailable`] when it does not.
    async fn ping(&self) -> Result<(), StoreError>;

    /// Creates a payment (and its reward credit) and completes the key with `response`,
    /// atomically.
    ///
    /// # Errors
    ///
    /// [`StoreError::Fenced`] or [`StoreError::DuplicateSideEffect`], with nothing committed.
    async fn create_payment(
        &self,
        lease: &Lease,
        payment: NewPayment,
        response: StoredResponse,
    ) -> Result<(), StoreError>;

    /// Decides a refund against the payment as it is, commits it with the reward debit and
    /// completes the key with the rendered response, atomically.
    ///
    /// # Errors
    ///
    /// [`StoreError::Fenced`] or [`StoreError::DuplicateSideEffect`], with nothing committed.
    async fn create_refund(
        &self,
        lease: &Lease,
        refund: NewRefund,
        render: RenderRefund,
    ) -> Result<RefundResult, StoreError>;

    /// One payment of a tenant.
    ///
    /// # Errors
    ///
    /// [`StoreError::Unavailable`] when the store cannot be reached.
    async fn payment(
        &self,
        tenant: &TenantId,
        id: &PaymentId,
    ) -> Result<Option<Payment>, StoreError>;

    /// A page of a tenant's payments; `None` when `starting_after` is not one of them.
    ///
    /// # Errors
    ///
    /// [`StoreError::Unavailable`] when the store cannot be reached.
    async fn list_payments(
        &self,
        tenant: &TenantId,
        query: &ListQuery,
    ) -> Result<Option<Page>, StoreError>;

    /// A customer's reward balance and ledger.
    ///
    /// # Errors
    ///
    /// [`StoreError::Unavailable`] when the store cannot be reached.
    async fn rewards(
        &self,
        tenant: &TenantId,
        customer: &CustomerId,
    ) -> Result<Rewards, StoreError>;
}

/// Reward points a succeeded payment of `amount` credits: one per whole 100 minor units.
pub fn reward_points(amount: MinorUnits) -> i64 {
    amount.0 / 100
}

/// The decision about a refund, before anything is written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RefundPlan {
    /// Refund `amount`; the payment then holds `points_after` points (`points_delta` change).
    Refund {
        /// The amount to refund.
        amount: MinorUnits,
        /// The payment's reward points after the refund.
        points_after: i64,
        /// The change in points, zero or negative.
        points_delta: i64,
    },
    /// The payment did not succeed.
    NotRefundable,
    /// The request asks for more than is left (or nothing is left).
    Exceeds {
        /// What is left to refund.
        remaining: MinorUnits,
    },
}

/// Plans a refund of `requested` (or all that is left) against `payment` as it stands.
///
/// Every store calls this inside its atomic step, with the payment read there, so two refunds
/// racing on different keys can never both see the same remaining amount.
pub fn plan_refund(payment: &Payment, requested: Option<MinorUnits>) -> RefundPlan {
    if payment.status != PaymentStatus::Succeeded {
        return RefundPlan::NotRefundable;
    }
    let remaining = MinorUnits(payment.amount.0 - payment.amount_refunded.0);
    let amount = requested.unwrap_or(remaining);
    if amount.0 <= 0 || amount > remaining {
        return RefundPlan::Exceeds { remaining };
    }
    let points_after = reward_points(MinorUnits(remaining.0 - amount.0));
    RefundPlan::Refund {
        amount,
        points_after,
        points_delta: points_after - payment.reward_points,
    }
}

/// A refund the payment allows, already applied to the payment: what a store must persist.
#[derive(Clone, Debug)]
pub struct AcceptedRefund {
    /// The refund to insert.
    pub refund: Refund,
    /// The payment with its new `amount_refunded` and `reward_points`.
    pub payment: Payment,
    /// The points the refund's ledger entry takes back (zero or negative).
    pub points_delta: i64,
}

impl AcceptedRefund {
    /// The outcome to render and store once the refund is persisted.
    pub fn into_outcome(self) -> RefundOutcome {
        RefundOutcome::Created {
            refund: self.refund,
            payment: self.payment,
        }
    }
}

/// Decides `new` against `payment` as read inside the store's atomic step and, when it is
/// allowed, applies it to the payment; every store persists the result the same way.
///
/// # Errors
///
/// The refusal to store as the key's outcome: the payment is not refundable, or the refund
/// asks for more than is left.
pub fn accept_refund(
    mut payment: Payment,
    new: &NewRefund,
) -> Result<AcceptedRefund, Box<RefundOutcome>> {
    match plan_refund(&payment, new.amount) {
        RefundPlan::NotRefundable => Err(Box::new(RefundOutcome::NotRefundable { payment })),
        RefundPlan::Exceeds { remaining } => {
            Err(Box::new(RefundOutcome::Exceeds { payment, remaining }))
        }
        RefundPlan::Refund {
            amount,
            points_after,
            points_delta,
        } => {
            payment.amount_refunded.0 += amount.0;
            payment.reward_points = points_after;
            let refund = Refund {
                id: new.refund_id.clone(),
                object: ObjectKind,
                payment_id: payment.id.clone(),
                amount,
                created_at: new.created_at,
            };
            Ok(AcceptedRefund {
                refund,
                payment,
                points_delta,
            })
        }
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    fn payment(amount: i64, refunded: i64, status: PaymentStatus) -> Payment {
        Payment {
            id: PaymentId("pay_1".into()),
            object: crate::wire::ObjectKind,
            amount: MinorUnits(amount),
            currency: crate::wire::Currency("EUR".into()),
            customer_id: CustomerId("cus_1".into()),
            description: None,
            metadata: Default::default(),
            status,
            amount_refunded: MinorUnits(refunded),
            reward_points: reward_points(MinorUnits(amount - refunded)),
            idempotency_key: "k".into(),
            created_at: Timestamp(0),
        }
    }

    #[test]
    fn a_refund_may_take_exactly_what_is_left_and_not_a_unit_more() {
        let paid = payment(1299, 299, PaymentStatus::Succeeded);
        let exact = plan_refund(&paid, Some(MinorUnits(1000)));
        assert_eq!(
            exact,
            RefundPlan::Refund {
                amount: MinorUnits(1000),
                points_after: 0,
                points_delta: -10,
            }
        );
        let over = plan_refund(&paid, Some(MinorUnits(1001)));
        assert_eq!(
            over,
            RefundPlan::Exceeds {
                remaining: MinorUnits(1000)
            }
        );
        assert_eq!(
            plan_refund(&paid, None),
            exact,
            "no amount refunds what is left"
        );
    }

    #[test]
    fn nothing_left_and_a_failed_payment_cannot_be_refunded() {
        let spent = payment(500, 500, PaymentStatus::Succeeded);
        assert_eq!(
            plan_refund(&spent, None),
            RefundPlan::Exceeds {
                remaining: MinorUnits(0)
            }
        );
        let failed = payment(500, 0, PaymentStatus::Failed);
        assert_eq!(plan_refund(&failed, None), RefundPlan::NotRefundable);
    }

    #[test]
    fn a_payment_earns_one_point_per_whole_hundred_minor_units() {
        assert_eq!(reward_points(MinorUnits(1299)), 12);
        assert_eq!(reward_points(MinorUnits(99)), 0);
    }
}
