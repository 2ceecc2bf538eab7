//! SQL of the SQLite store: migrations and the mapping between rows and records or payments.

use std::collections::BTreeMap;

use oncepay_core::engine::{
    self, Lease, Policy, Record, RecordState, Scope, StoredResponse, SweepAction,
};
use oncepay_core::fingerprint::Fingerprint;
use oncepay_core::store::{
    ListQuery, NewPayment, NewRefund, Page, RefundOutcome, RefundPlan, StoreError, SweepReport,
    plan_refund,
};
use oncepay_core::time::Timestamp;
use oncepay_core::wire::{
    Currency, CustomerId, MinorUnits, ObjectKind, Payment, PaymentId, PaymentStatus, Refund,
    RefundId, RewardEntry, RewardEntryId, RewardSource, Rewards, TenantId,
};
use rusqlite::{Connection, OptionalExtension, Row, params};

/// The schema, one file per version, applied in order and recorded in `schema_migrations`.
const MIGRATIONS: &[(i64, &str)] = &[(1, include_str!("../../../migrations/sqlite/0001_init.sql"))];

pub(super) fn unavailable(err: rusqlite::Error) -> StoreError {
    StoreError::Unavailable(err.to_string())
}

fn corrupt(what: &str) -> StoreError {
    StoreError::Corrupt(format!("unreadable {what}"))
}

/// Applies the migrations the database has not seen yet, each in its own transaction.
pub(super) fn migrate(connection: &mut Connection) -> Result<(), StoreError> {
    connection
        .execute_batch(
            "create table if not exists schema_migrations \
             (version integer primary key, applied_at_ms integer not null)",
        )
        .map_err(unavailable)?;
    for (version, sql) in MIGRATIONS {
        let transaction = connection.transaction().map_err(unavailable)?;
        let applied: Option<i64> = transaction
            .query_row(
                "select version from schema_migrations where version = ?1",
                [version],
                |r| r.get(0),
            )
            .optional()
            .map_err(unavailable)?;
        if applied.is_none() {
            transaction.execute_batch(sql).map_err(unavailable)?;
            let now = ms(oncepay_core::time::Clock::now(
                &oncepay_core::time::SystemClock,
            ));
            transaction
                .execute(
                    "insert into schema_migrations values (?1, ?2)",
                    params![version, now],
                )
                .map_err(unavailable)?;
            tracing::info!(version, "applied migration");
        }
        transaction.commit().map_err(unavailable)?;
    }
    Ok(())
}

fn ms(timestamp: Timestamp) -> i64 {
    i64::try_from(timestamp.as_millis()).unwrap_or(i64::MAX)
}

fn timestamp(ms: i64) -> Timestamp {
    Timestamp(u64::try_from(ms).unwrap_or(0))
}

/// Hands out the next fencing token.
pub(super) fn next_token(connection: &Connection) -> Result<u64, StoreError> {
    let token: i64 = connection
        .query_row(
            "update fencing set last_token = last_token + 1 where id = 1 returning last_token",
            [],
            |r| r.get(0),
        )
        .map_err(unavailable)?;
    Ok(token as u64)
}

pub(super) fn load_record(
    connection: &Connection,
    scope: &Scope,
) -> Result<Option<Record>, StoreError> {
    let mut statement = connection
        .prepare_cached(
            "select fingerprint, token, created_at_ms, state, lease_expires_at_ms, completed_at_ms, \
             response_status, response_content_type, response_location, response_body, resource_id \
             from idempotency_records where tenant = ?1 and key = ?2",
        )
        .map_err(unavailable)?;
    let row = statement
        .query_row(
            params![scope.tenant.as_str(), scope.key.as_str()],
            record_from_row,
        )
        .optional()
        .map_err(unavailable)?;
    row.map(|r| r.ok_or_else(|| corrupt("idempotency record")))
        .transpose()
}

fn record_from_row(row: &Row<'_>) -> rusqlite::Result<Option<Record>> {
    let fingerprint: Vec<u8> = row.get(0)?;
    let Ok(fingerprint) = <[u8; 32]>::try_from(fingerprint) else {
        return Ok(None);
    };
    let state: String = row.get(3)?;
    let completed_at = row.get::<_, Option<i64>>(5)?.map(timestamp);
    let status = row.get::<_, Option<u16>>(6)?;
    let resource_id: Option<String> = row.get(10)?;
    let state = match (state.as_str(), completed_at, status) {
        ("in_flight", _, _) => RecordState::InFlight {
            lease_expires_at: timestamp(row.get::<_, Option<i64>>(4)?.unwrap_or(0)),
        },
        ("completed", Some(completed_at), Some(status)) => RecordState::Completed {
            completed_at,
            response: StoredResponse {
                status,
                content_type: row.get::<_, Option<String>>(7)?.unwrap_or_default(),
                location: row.get(8)?,
                body: row.get::<_, Option<Vec<u8>>>(9)?.unwrap_or_default(),
                resource_id,
            },
        },
        ("tombstone", Some(completed_at), Some(response_status)) => RecordState::Tombstone {
            completed_at,
            response_status,
            resource_id,
        },
        _ => return Ok(None),
    };
    Ok(Some(Record {
        fingerprint: Fingerprint(fingerprint),
        token: row.get::<_, i64>(1)? as u64,
        created_at: timestamp(row.get(2)?),
        state,
    }))
}

/// Writes the slot back: the record upserted, or its row deleted when the slot is empty.
pub(super) fn save_record(
    connection: &Connection,
    scope: &Scope,
    record: Option<&Record>,
) -> Result<(), StoreError> {
    let key = params![scope.tenant.as_str(), scope.key.as_str()];
    let Some(record) = record else {
        connection
            .prepare_cached("delete from idempotency_records where tenant = ?1 and key = ?2")
            .and_then(|mut s| s.execute(key))
            .map_err(unavailable)?;
        return Ok(());
    };
    let (state, lease, completed, response, resource_id) = match &record.state {
        RecordState::InFlight { lease_expires_at } => {
            ("in_flight", Some(ms(*lease_expires_at)), None, None, None)
        }
        RecordState::Completed {
            completed_at,
            response,
        } => (
            "completed",
            None,
            Some(ms(*completed_at)),
            Some(response),
            response.resource_id.as_deref(),
        ),
        RecordState::Tombstone {
            completed_at,
            resource_id,
            ..
        } => (
            "tombstone",
            None,
            Some(ms(*completed_at)),
            None,
            resource_id.as_deref(),
        ),
    };
    let status = match &record.state {
        RecordState::Completed { response, .. } => Some(response.status),
        RecordState::Tombstone {
            response_status, ..
        } => Some(*response_status),
        RecordState::InFlight { .. } => None,
    };
    connection
        .prepare_cached(
            "insert or replace into idempotency_records (tenant, key, fingerprint, token, \
             created_at_ms, state, lease_expires_at_ms, completed_at_ms, response_status, \
             response_content_type, response_location, response_body, resource_id) \
             values (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13)",
        )
        .and_then(|mut s| {
            s.execute(params![
                scope.tenant.as_str(),
                scope.key.as_str(),
                &record.fingerprint.0[..],
                record.token as i64,
                ms(record.created_at),
                state,
                lease,
                completed,
                status,
                response.map(|r| r.content_type.as_str()),
                response.and_then(|r| r.location.as_deref()),
                response.map(|r| &r.body[..]),
                resource_id,
            ])
        })
        .map_err(unavailable)?;
    Ok(())
}

/// Applies the sweeper's decision to every record that may have one.
pub(super) fn sweep(
    connection: &Connection,
    now: Timestamp,
    policy: &Policy,
) -> Result<SweepReport, StoreError> {
    let mut statement = connection
        .prepare_cached("select tenant, key from idempotency_records")
        .map_err(unavailable)?;
    let scopes: Vec<(String, String)> = statement
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .and_then(Iterator::collect)
        .map_err(unavailable)?;
    let mut report = SweepReport::default();
    for (tenant, key) in scopes {
        let Ok(key) = oncepay_core::key::IdempotencyKey::parse(key.as_bytes()) else {
            continue;
        };
        let scope = Scope {
            tenant: TenantId(tenant),
            key,
        };
        let mut slot = load_record(connection, &scope)?;
        match engine::sweep_on(&mut slot, now, policy) {
            SweepAction::Keep => continue,
            SweepAction::Tombstone => report.tombstoned += 1,
            SweepAction::Delete => report.deleted += 1,
        }
        save_record(connection, &scope, slot.as_ref())?;
    }
    Ok(report)
}

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
    let Some(mut payment) = self::payment(connection, tenant, &new.payment_id)? else {
        return Ok(None);
    };
    let (amount, points_after, points_delta) = match plan_refund(&payment, new.amount) {
        RefundPlan::NotRefundable => return Ok(Some(RefundOutcome::NotRefundable { payment })),
        RefundPlan::Exceeds { remaining } => {
            return Ok(Some(RefundOutcome::Exceeds { payment, remaining }));
        }
        RefundPlan::Refund {
            amount,
            points_after,
            points_delta,
        } => (amount, points_after, points_delta),
    };
    let inserted = connection
        .prepare_cached(
            "insert into refunds (tenant, id, payment_id, idempotency_key, claimed_at_ms, amount, \
             created_at_ms) values (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
        )
        .and_then(|mut s| {
            s.execute(params![
                tenant.as_str(),
                new.refund_id.as_str(),
                payment.id.as_str(),
                lease.scope.key.as_str(),
                ms(lease.claimed_at),
                amount.0,
                ms(new.created_at),
            ])
        });
    match inserted {
        Err(err) if is_unique_violation(&err) => return Err(StoreError::DuplicateSideEffect),
        other => other.map_err(unavailable)?,
    };
    payment.amount_refunded.0 += amount.0;
    payment.reward_points = points_after;
    connection
        .prepare_cached(
            "update payments set amount_refunded = ?1, reward_points = ?2 where id = ?3",
        )
        .and_then(|mut s| {
            s.execute(params![
                payment.amount_refunded.0,
                points_after,
                payment.id.as_str()
            ])
        })
        .map_err(unavailable)?;
    insert_entry(
        connection,
        tenant,
        &payment,
        &new.reward_entry_id,
        Some(&new.refund_id),
        points_delta,
        new.created_at,
    )?;
    let refund = Refund {
        id: new.refund_id.clone(),
        object: ObjectKind,
        payment_id: payment.id.clone(),
        amount,
        created_at: new.created_at,
    };
    Ok(Some(RefundOutcome::Created { refund, payment }))
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
