//! Payments, refunds and the reward ledger as rows.

use std::collections::BTreeMap;

use oncepay_core::engine::Lease;
use oncepay_core::store::{
    ListQuery, NewPayment, NewRefund, Page, RefundOutcome, StoreError, accept_refund,
};
use oncepay_core::time::Timestamp;
use oncepay_core::wire::{
    Currency, CustomerId, MinorUnits, ObjectKind, Payment, PaymentId, PaymentStatus, RefundId,
    RewardEntry, RewardEntryId, RewardSource, Rewards, TenantId,
};
use sqlx::Row;
use sqlx::postgres::{PgConnection, PgRow};

use super::records::{ms, timestamp};
use super::{corrupt, store_error};

/// A `select` of every payment column from `payments`, followed by `$tail`.
macro_rules! select_payments {
    ($tail:literal) => {
        concat!(
            "select id, amount, currency, customer_id, description, metadata, status, ",
            "amount_refunded, reward_points, idempotency_key, created_at_ms from payments ",
            $tail
        )
    };
}

/// Maps an insert's failure: a second side effect for one attempt is refused, not retried.
fn insert_error(err: sqlx::Error) -> StoreError {
    match &err {
        sqlx::Error::Database(db) if db.is_unique_violation() => StoreError::DuplicateSideEffect,
        _ => store_error(err),
    }
}

/// Inserts the payment and, when it succeeded, its reward credit.
///
/// # Errors
///
/// [`StoreError::DuplicateSideEffect`] when this attempt already created a payment.
pub(super) async fn insert_payment(
    connection: &mut PgConnection,
    lease: &Lease,
    new: &NewPayment,
) -> Result<(), StoreError> {
    let p = &new.payment;
    let metadata = serde_json::to_string(&p.metadata).map_err(|_| corrupt("metadata"))?;
    sqlx::query(
        "insert into payments (tenant, id, idempotency_key, claimed_at_ms, amount, currency, \
         customer_id, description, metadata, status, amount_refunded, reward_points, \
         created_at_ms) values ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)",
    )
    .bind(lease.scope.tenant.as_str())
    .bind(p.id.as_str())
    .bind(&p.idempotency_key)
    .bind(ms(lease.claimed_at))
    .bind(p.amount.0)
    .bind(p.currency.as_str())
    .bind(p.customer_id.as_str())
    .bind(p.description.as_deref())
    .bind(metadata)
    .bind(p.status.as_str())
    .bind(p.amount_refunded.0)
    .bind(p.reward_points)
    .bind(ms(p.created_at))
    .execute(&mut *connection)
    .await
    .map_err(insert_error)?;

    if p.status == PaymentStatus::Succeeded {
        let credit = Entry {
            id: &new.reward_entry_id,
            refund_id: None,
            points: p.reward_points,
            at: p.created_at,
        };
        insert_entry(connection, &lease.scope.tenant, p, credit).await?;
    }
    Ok(())
}

/// A reward ledger entry to write: a credit for a payment, or a debit for one of its refunds.
struct Entry<'a> {
    id: &'a RewardEntryId,
    refund_id: Option<&'a RefundId>,
    points: i64,
    at: Timestamp,
}

async fn insert_entry(
    connection: &mut PgConnection,
    tenant: &TenantId,
    payment: &Payment,
    entry: Entry<'_>,
) -> Result<(), StoreError> {
    let source = match entry.refund_id {
        Some(_) => RewardSource::Refund.as_str(),
        None => RewardSource::Payment.as_str(),
    };
    sqlx::query(
        "insert into reward_entries (tenant, id, customer_id, source, payment_id, refund_id, \
         points, created_at_ms) values ($1, $2, $3, $4, $5, $6, $7, $8)",
    )
    .bind(tenant.as_str())
    .bind(entry.id.as_str())
    .bind(payment.customer_id.as_str())
    .bind(source)
    .bind(payment.id.as_str())
    .bind(entry.refund_id.map(RefundId::as_str))
    .bind(entry.points)
    .bind(ms(entry.at))
    .execute(connection)
    .await
    .map_err(store_error)?;
    Ok(())
}

/// Decides and applies a refund against the payment as committed; `None` when the tenant has
/// no such payment.
///
/// The payment's row stays locked until the transaction ends, so a concurrent refund of the
/// same payment (under another key) waits and then plans against the new amount refunded.
///
/// # Errors
///
/// [`StoreError::DuplicateSideEffect`] when this attempt already created a refund.
pub(super) async fn refund(
    connection: &mut PgConnection,
    lease: &Lease,
    new: &NewRefund,
) -> Result<Option<RefundOutcome>, StoreError> {
    let tenant = &lease.scope.tenant;
    let row = sqlx::query(select_payments!("where tenant = $1 and id = $2 for update"))
        .bind(tenant.as_str())
        .bind(new.payment_id.as_str())
        .fetch_optional(&mut *connection)
        .await
        .map_err(store_error)?;
    let Some(payment) = row.as_ref().map(payment_from_row).transpose()? else {
        return Ok(None);
    };
    let accepted = match accept_refund(payment, new) {
        Ok(accepted) => accepted,
        Err(refused) => return Ok(Some(*refused)),
    };
    let (refund, payment) = (&accepted.refund, &accepted.payment);

    sqlx::query(
        "insert into refunds (tenant, id, payment_id, idempotency_key, claimed_at_ms, amount, \
         created_at_ms) values ($1, $2, $3, $4, $5, $6, $7)",
    )
    .bind(tenant.as_str())
    .bind(refund.id.as_str())
    .bind(payment.id.as_str())
    .bind(lease.scope.key.as_str())
    .bind(ms(lease.claimed_at))
    .bind(refund.amount.0)
    .bind(ms(refund.created_at))
    .execute(&mut *connection)
    .await
    .map_err(insert_error)?;

    sqlx::query(
        "update payments set amount_refunded = $1, reward_points = $2 \
         where tenant = $3 and id = $4",
    )
    .bind(payment.amount_refunded.0)
    .bind(payment.reward_points)
    .bind(tenant.as_str())
    .bind(payment.id.as_str())
    .execute(&mut *connection)
    .await
    .map_err(store_error)?;

    let debit = Entry {
        id: &new.reward_entry_id,
        refund_id: Some(&refund.id),
        points: accepted.points_delta,
        at: refund.created_at,
    };
    insert_entry(connection, tenant, payment, debit).await?;
    Ok(Some(accepted.into_outcome()))
}

fn payment_from_row(row: &PgRow) -> Result<Payment, StoreError> {
    let metadata: String = row.try_get("metadata").map_err(store_error)?;
    let metadata = serde_json::from_str::<BTreeMap<String, String>>(&metadata)
        .map_err(|_| corrupt("payment metadata"))?;
    let status = row.try_get::<&str, _>("status").map_err(store_error)?;
    let status = PaymentStatus::parse(status).ok_or_else(|| corrupt("payment status"))?;
    let get = |column: &str| row.try_get::<i64, _>(column).map_err(store_error);
    let text = |column: &str| row.try_get::<String, _>(column).map_err(store_error);
    Ok(Payment {
        id: PaymentId(text("id")?),
        object: ObjectKind,
        amount: MinorUnits(get("amount")?),
        currency: Currency(text("currency")?),
        customer_id: CustomerId(text("customer_id")?),
        description: row.try_get("description").map_err(store_error)?,
        metadata,
        status,
        amount_refunded: MinorUnits(get("amount_refunded")?),
        reward_points: get("reward_points")?,
        idempotency_key: text("idempotency_key")?,
        created_at: timestamp(get("created_at_ms")?),
    })
}

/// One payment of a tenant.
pub(super) async fn payment(
    connection: &mut PgConnection,
    tenant: &TenantId,
    id: &PaymentId,
) -> Result<Option<Payment>, StoreError> {
    let row = sqlx::query(select_payments!("where tenant = $1 and id = $2"))
        .bind(tenant.as_str())
        .bind(id.as_str())
        .fetch_optional(connection)
        .await
        .map_err(store_error)?;
    row.as_ref().map(payment_from_row).transpose()
}

/// A page of a tenant's payments, newest first; `None` when `starting_after` is not theirs.
pub(super) async fn list_payments(
    connection: &mut PgConnection,
    tenant: &TenantId,
    query: &ListQuery,
) -> Result<Option<Page>, StoreError> {
    let before_seq = match &query.starting_after {
        None => i64::MAX,
        Some(id) => {
            let seq: Option<i64> =
                sqlx::query_scalar("select seq from payments where tenant = $1 and id = $2")
                    .bind(tenant.as_str())
                    .bind(id.as_str())
                    .fetch_optional(&mut *connection)
                    .await
                    .map_err(store_error)?;
            match seq {
                Some(seq) => seq,
                None => return Ok(None),
            }
        }
    };
    // One row more than the page tells whether another page follows.
    let fetch = i64::try_from(query.limit).unwrap_or(i64::MAX - 1) + 1;
    // Only the filters given compare columns, so the planner can pick the index that fits them
    // (a `$3 is null or ...` form makes a cached plan scan the tenant's payments). A filter not
    // given still names its parameter, which PostgreSQL needs to type it.
    let sql = match (query.customer_id.is_some(), query.idempotency_key.is_some()) {
        (false, false) => select_payments!(
            "where tenant = $1 and seq < $2 and $3::text is null and $4::text is null \
             order by seq desc limit $5"
        ),
        (true, false) => select_payments!(
            "where tenant = $1 and seq < $2 and customer_id = $3 and $4::text is null \
             order by seq desc limit $5"
        ),
        (false, true) => select_payments!(
            "where tenant = $1 and seq < $2 and $3::text is null and idempotency_key = $4 \
             order by seq desc limit $5"
        ),
        (true, true) => select_payments!(
            "where tenant = $1 and seq < $2 and customer_id = $3 and idempotency_key = $4 \
             order by seq desc limit $5"
        ),
    };
    let rows = sqlx::query(sql)
        .bind(tenant.as_str())
        .bind(before_seq)
        .bind(query.customer_id.as_ref().map(CustomerId::as_str))
        .bind(query.idempotency_key.as_deref())
        .bind(fetch)
        .fetch_all(connection)
        .await
        .map_err(store_error)?;
    let mut payments = rows
        .iter()
        .map(payment_from_row)
        .collect::<Result<Vec<_>, _>>()?;
    let has_more = payments.len() > query.limit;
    payments.truncate(query.limit);
    Ok(Some(Page { payments, has_more }))
}

/// A customer's reward balance and ledger, newest entry first.
pub(super) async fn rewards(
    connection: &mut PgConnection,
    tenant: &TenantId,
    customer: &CustomerId,
) -> Result<Rewards, StoreError> {
    let rows = sqlx::query(
        "select id, source, payment_id, refund_id, points, created_at_ms from reward_entries \
         where tenant = $1 and customer_id = $2 order by seq desc",
    )
    .bind(tenant.as_str())
    .bind(customer.as_str())
    .fetch_all(connection)
    .await
    .map_err(store_error)?;
    let entries = rows
        .iter()
        .map(entry_from_row)
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Rewards {
        customer_id: customer.clone(),
        points_balance: entries.iter().map(|entry| entry.points).sum(),
        entries,
    })
}

fn entry_from_row(row: &PgRow) -> Result<RewardEntry, StoreError> {
    let source = row.try_get::<&str, _>("source").map_err(store_error)?;
    let source = RewardSource::parse(source).ok_or_else(|| corrupt("reward entry source"))?;
    let refund_id: Option<String> = row.try_get("refund_id").map_err(store_error)?;
    let created_at_ms: i64 = row.try_get("created_at_ms").map_err(store_error)?;
    Ok(RewardEntry {
        id: RewardEntryId(row.try_get("id").map_err(store_error)?),
        source,
        payment_id: PaymentId(row.try_get("payment_id").map_err(store_error)?),
        refund_id: refund_id.map(RefundId),
        points: row.try_get("points").map_err(store_error)?,
        created_at: timestamp(created_at_ms),
    })
}
