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
use rusqlite::{Connection, OptionalExtension, Row, params};

use super::records::{ms, timestamp};
use super::{corrupt, unavailable};

fn is_unique_violation(err: &rusqlite::Error) -> bool {
    matches!(err, rusqlite::Error::SqliteFailure(e, _)
        if e.code == rusqlite::ErrorCode::ConstraintViolation)
}

pub(super) fn insert_payment(
    connection: &Connection,
    lease: &Lease,
    new: &NewPayment,
) -> Result<(), StoreError> {
    let p = &new.payment;
    let metadata = serde_json::to_string(&p.metadata).map_err(|_| corrupt("metadata"))?;
    let inserted = connection
        .prepare_cached(
            "insert into payments (tenant, id, idempotency_key, claimed_at_ms, amount, currency, \
             customer_id, description, metadata, status, amount_refunded, reward_points, created_at_ms) \
             values (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13)",
        )
        .and_then(|mut s| {
            s.execute(params![
                lease.scope.tenant.as_str(), p.id.as_str(), p.idempotency_key, ms(lease.claimed_at),
                p.amount.0, p.currency.as_str(), p.customer_id.as_str(), p.description, metadata,
                p.status.as_str(), p.amount_refunded.0, p.reward_points, ms(p.created_at),
            ])
        });
    match inserted {
        Err(err) if is_unique_violation(&err) => return Err(StoreError::DuplicateSideEffect),
        other => other.map_err(unavailable)?,
    };
    if p.status == PaymentStatus::Succeeded {
        insert_entry(
            connection,
            &lease.scope.tenant,
            p,
            &new.reward_entry_id,
            None,
            p.reward_points,
            p.created_at,
        )?;
    }
    Ok(())
}

fn insert_entry(
    connection: &Connection,
    tenant: &TenantId,
    payment: &Payment,
    id: &RewardEntryId,
    refund_id: Option<&RefundId>,
    points: i64,
    at: Timestamp,
) -> Result<(), StoreError> {
    let source = match refund_id {
        Some(_) => RewardSource::Refund.as_str(),
        None => RewardSource::Payment.as_str(),
    };
    connection
        .prepare_cached(
            "insert into reward_entries (tenant, id, customer_id, source, payment_id, refund_id, \
             points, created_at_ms) values (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
        )
        .and_then(|mut s| {
            s.execute(params![
                tenant.as_str(),
                id.as_str(),
                payment.customer_id.as_str(),
                source,
                payment.id.as_str(),
                refund_id.map(RefundId::as_str),
                points,
                ms(at),
            ])
        })
        .map_err(unavailable)?;
    Ok(())
}

/// Decides and applies a refund; `None` when the tenant has no such payment.
pub(super) fn refund(
    connection: &Connection,
    lease: &Lease,
    new: &NewRefund,
) -> Result<Option<RefundOutcome>, StoreError> {
    let tenant = &lease.scope.tenant;
    let Some(payment) = self::payment(connection, tenant, &new.payment_id)? else {
        return Ok(None);
    };
    let accepted = match accept_refund(payment, new) {
        Ok(accepted) => accepted,
        Err(refused) => return Ok(Some(*refused)),
    };
    let (refund, payment) = (&accepted.refund, &accepted.payment);
    let inserted = connection
        .prepare_cached(
            "insert into refunds (tenant, id, payment_id, idempotency_key, claimed_at_ms, amount, \
             created_at_ms) values (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
        )
        .and_then(|mut s| {
            s.execute(params![
                tenant.as_str(),
                refund.id.as_str(),
                payment.id.as_str(),
                lease.scope.key.as_str(),
                ms(lease.claimed_at),
                refund.amount.0,
                ms(refund.created_at),
            ])
        });
    match inserted {
        Err(err) if is_unique_violation(&err) => return Err(StoreError::DuplicateSideEffect),
        other => other.map_err(unavailable)?,
    };
    connection
        .prepare_cached(
            "update payments set amount_refunded = ?1, reward_points = ?2 where id = ?3",
        )
        .and_then(|mut s| {
            s.execute(params![
                payment.amount_refunded.0,
                payment.reward_points,
                payment.id.as_str()
            ])
        })
        .map_err(unavailable)?;
    insert_entry(
        connection,
        tenant,
        payment,
        &new.reward_entry_id,
        Some(&refund.id),
        accepted.points_delta,
        refund.created_at,
    )?;
    Ok(Some(accepted.into_outcome()))
}

const PAYMENT_COLUMNS: &str = "id, amount, currency, customer_id, description, metadata, status, \
     amount_refunded, reward_points, idempotency_key, created_at_ms";

fn payment_from_row(row: &Row<'_>) -> rusqlite::Result<Option<Payment>> {
    let metadata: String = row.get(5)?;
    let Ok(metadata) = serde_json::from_str::<BTreeMap<String, String>>(&metadata) else {
        return Ok(None);
    };
    let Some(status) = PaymentStatus::parse(&row.get::<_, String>(6)?) else {
        return Ok(None);
    };
    Ok(Some(Payment {
        id: PaymentId(row.get(0)?),
        object: ObjectKind,
        amount: MinorUnits(row.get(1)?),
        currency: Currency(row.get(2)?),
        customer_id: CustomerId(row.get(3)?),
        description: row.get(4)?,
        metadata,
        status,
        amount_refunded: MinorUnits(row.get(7)?),
        reward_points: row.get(8)?,
        idempotency_key: row.get(9)?,
        created_at: timestamp(row.get(10)?),
    }))
}

pub(super) fn payment(
    connection: &Connection,
    tenant: &TenantId,
    id: &PaymentId,
) -> Result<Option<Payment>, StoreError> {
    let sql = format!("select {PAYMENT_COLUMNS} from payments where tenant = ?1 and id = ?2");
    let row = connection
        .prepare_cached(&sql)
        .and_then(|mut s| {
            s.query_row(params![tenant.as_str(), id.as_str()], payment_from_row)
                .optional()
        })
        .map_err(unavailable)?;
    row.map(|p| p.ok_or_else(|| corrupt("payment"))).transpose()
}

pub(super) fn list_payments(
    connection: &Connection,
    tenant: &TenantId,
    query: &ListQuery,
) -> Result<Option<Page>, StoreError> {
    let before_seq: i64 = match &query.starting_after {
        None => i64::MAX,
        Some(id) => {
            let seq = connection
                .query_row(
                    "select seq from payments where tenant = ?1 and id = ?2",
                    params![tenant.as_str(), id.as_str()],
                    |r| r.get(0),
                )
                .optional()
                .map_err(unavailable)?;
            match seq {
                Some(seq) => seq,
                None => return Ok(None),
            }
        }
    };
    // Only the filters given appear in the SQL, so SQLite can pick the index that fits them
    // (a `?3 is null or ...` form would make it scan the tenant's payments).
    let mut filters = String::new();
    if query.customer_id.is_some() {
        filters.push_str(" and customer_id = ?3");
    }
    if query.idempotency_key.is_some() {
        filters.push_str(" and idempotency_key = ?4");
    }
    let sql = format!(
        "select {PAYMENT_COLUMNS} from payments where tenant = ?1 and seq < ?2{filters} \
         order by seq desc limit ?5"
    );
    let fetch = query.limit as i64 + 1;
    let rows: Vec<Option<Payment>> = connection
        .prepare_cached(&sql)
        .and_then(|mut s| {
            s.query_map(
                params![
                    tenant.as_str(),
                    before_seq,
                    query.customer_id.as_ref().map(CustomerId::as_str),
                    query.idempotency_key,
                    fetch
                ],
                payment_from_row,
            )?
            .collect()
        })
        .map_err(unavailable)?;
    let mut payments: Vec<Payment> = rows
        .into_iter()
        .collect::<Option<_>>()
        .ok_or_else(|| corrupt("payment"))?;
    let has_more = payments.len() > query.limit;
    payments.truncate(query.limit);
    Ok(Some(Page { payments, has_more }))
}

pub(super) fn rewards(
    connection: &Connection,
    tenant: &TenantId,
    customer: &CustomerId,
) -> Result<Rewards, StoreError> {
    let rows: Vec<Option<RewardEntry>> = connection
        .prepare_cached(
            "select id, source, payment_id, refund_id, points, created_at_ms from reward_entries \
             where tenant = ?1 and customer_id = ?2 order by seq desc",
        )
        .and_then(|mut s| {
            s.query_map(params![tenant.as_str(), customer.as_str()], |r| {
                let Some(source) = RewardSource::parse(&r.get::<_, String>(1)?) else {
                    return Ok(None);
                };
                Ok(Some(RewardEntry {
                    id: RewardEntryId(r.get(0)?),
                    source,
                    payment_id: PaymentId(r.get(2)?),
                    refund_id: r.get::<_, Option<String>>(3)?.map(RefundId),
                    points: r.get(4)?,
                    created_at: timestamp(r.get(5)?),
                }))
            })?
            .collect()
        })
        .map_err(unavailable)?;
    let entries: Vec<RewardEntry> = rows
        .into_iter()
        .collect::<Option<_>>()
        .ok_or_else(|| corrupt("reward entry"))?;
    Ok(Rewards {
        customer_id: customer.clone(),
        points_balance: entries.iter().map(|e| e.points).sum(),
        entries,
    })
}
