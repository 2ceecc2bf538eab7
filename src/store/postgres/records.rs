//! Idempotency records as rows: locking, reading, writing back, and picking sweep candidates.

use oncepay_core::engine::{Policy, Record, RecordState, Scope, StoredResponse};
use oncepay_core::fingerprint::Fingerprint;
use oncepay_core::key::IdempotencyKey;
use oncepay_core::time::Timestamp;
use oncepay_core::wire::TenantId;
use sqlx::Row;
use sqlx::postgres::{PgConnection, PgRow};

use super::{corrupt, store_error};
use oncepay_core::store::StoreError;

/// A `select` of every record column from `idempotency_records`, followed by `$tail`.
///
/// A macro rather than `format!` so the statement stays a `&'static str`: sqlx accepts only
/// those without an explicit promise that no input was spliced into the text.
macro_rules! select_records {
    ($tail:literal) => {
        concat!(
            "select tenant, key, fingerprint, token, created_at_ms, state, lease_expires_at_ms, ",
            "completed_at_ms, response_status, response_content_type, response_location, ",
            "response_body, resource_id from idempotency_records ",
            $tail
        )
    };
}

/// Milliseconds as stored; times past the year 292 million saturate.
pub(super) fn ms(timestamp: Timestamp) -> i64 {
    i64::try_from(timestamp.as_millis()).unwrap_or(i64::MAX)
}

/// A stored time; a negative value (which oncepay never writes) reads as the epoch.
pub(super) fn timestamp(ms: i64) -> Timestamp {
    Timestamp(u64::try_from(ms).unwrap_or(0))
}

/// Reads the key's record and locks its row until the transaction ends.
///
/// A key without a row locks nothing: its first claim relies on the insert in [`save`].
pub(super) async fn lock(
    connection: &mut PgConnection,
    scope: &Scope,
) -> Result<Option<Record>, StoreError> {
    let row = sqlx::query(select_records!("where tenant = $1 and key = $2 for update"))
        .bind(scope.tenant.as_str())
        .bind(scope.key.as_str())
        .fetch_optional(connection)
        .await
        .map_err(store_error)?;
    row.map(|row| record_from_row(&row)).transpose()
}

/// Reads the key's record without locking it.
pub(super) async fn load(
    connection: &mut PgConnection,
    scope: &Scope,
) -> Result<Option<Record>, StoreError> {
    let row = sqlx::query(select_records!("where tenant = $1 and key = $2"))
        .bind(scope.tenant.as_str())
        .bind(scope.key.as_str())
        .fetch_optional(connection)
        .await
        .map_err(store_error)?;
    row.map(|row| record_from_row(&row)).transpose()
}

fn record_from_row(row: &PgRow) -> Result<Record, StoreError> {
    let fingerprint: Vec<u8> = row.try_get("fingerprint").map_err(store_error)?;
    let fingerprint = <[u8; 32]>::try_from(fingerprint).map_err(|_| corrupt("fingerprint"))?;
    let token: i64 = row.try_get("token").map_err(store_error)?;
    let created_at_ms: i64 = row.try_get("created_at_ms").map_err(store_error)?;
    Ok(Record {
        fingerprint: Fingerprint(fingerprint),
        token: u64::try_from(token).map_err(|_| corrupt("fencing token"))?,
        created_at: timestamp(created_at_ms),
        state: state_from_row(row)?,
    })
}

fn state_from_row(row: &PgRow) -> Result<RecordState, StoreError> {
    let get_ms = |column: &str| -> Result<Option<Timestamp>, StoreError> {
        let value: Option<i64> = row.try_get(column).map_err(store_error)?;
        Ok(value.map(timestamp))
    };
    let state: String = row.try_get("state").map_err(store_error)?;
    let lease_expires_at = get_ms("lease_expires_at_ms")?;
    let completed_at = get_ms("completed_at_ms")?;
    let status: Option<i32> = row.try_get("response_status").map_err(store_error)?;
    let status = status.map(u16::try_from).transpose();
    let status = status.map_err(|_| corrupt("response status"))?;
    let resource_id: Option<String> = row.try_get("resource_id").map_err(store_error)?;

    match (state.as_str(), lease_expires_at, completed_at, status) {
        ("in_flight", Some(lease_expires_at), _, _) => {
            Ok(RecordState::InFlight { lease_expires_at })
        }
        ("completed", _, Some(completed_at), Some(status)) => {
            let content_type: Option<String> =
                row.try_get("response_content_type").map_err(store_error)?;
            let body: Option<Vec<u8>> = row.try_get("response_body").map_err(store_error)?;
            let response = StoredResponse {
                status,
                content_type: content_type.unwrap_or_default(),
                location: row.try_get("response_location").map_err(store_error)?,
                body: body.unwrap_or_default(),
                resource_id,
            };
            Ok(RecordState::Completed {
                completed_at,
                response,
            })
        }
        ("tombstone", _, Some(completed_at), Some(response_status)) => Ok(RecordState::Tombstone {
            completed_at,
            response_status,
            resource_id,
        }),
        _ => Err(corrupt("idempotency record")),
    }
}

/// The columns of a record that depend on its state.
struct StateColumns<'a> {
    state: &'static str,
    lease_expires_at_ms: Option<i64>,
    completed_at_ms: Option<i64>,
    status: Option<i32>,
    response: Option<&'a StoredResponse>,
    resource_id: Option<&'a str>,
}

fn state_columns(state: &RecordState) -> StateColumns<'_> {
    match state {
        RecordState::InFlight { lease_expires_at } => StateColumns {
            state: "in_flight",
            lease_expires_at_ms: Some(ms(*lease_expires_at)),
            completed_at_ms: None,
            status: None,
            response: None,
            resource_id: None,
        },
        RecordState::Completed {
            completed_at,
            response,
        } => StateColumns {
            state: "completed",
            lease_expires_at_ms: None,
            completed_at_ms: Some(ms(*completed_at)),
            status: Some(i32::from(response.status)),
            response: Some(response),
            resource_id: response.resource_id.as_deref(),
        },
        RecordState::Tombstone {
            completed_at,
            response_status,
            resource_id,
        } => StateColumns {
            state: "tombstone",
            lease_expires_at_ms: None,
            completed_at_ms: Some(ms(*completed_at)),
            status: Some(i32::from(*response_status)),
            response: None,
            resource_id: resource_id.as_deref(),
        },
    }
}

/// Writes a slot back: the row updated, deleted when the slot is empty, or inserted when the
/// key had no row (`existed` false).
///
/// Answers `false` when the insert found a row that another transaction committed after this
/// one looked: the caller must roll back and look again instead of overwriting it.
pub(super) async fn save(
    connection: &mut PgConnection,
    scope: &Scope,
    existed: bool,
    record: Option<&Record>,
) -> Result<bool, StoreError> {
    let (tenant, key) = (scope.tenant.as_str(), scope.key.as_str());
    let Some(record) = record else {
        sqlx::query("delete from idempotency_records where tenant = $1 and key = $2")
            .bind(tenant)
            .bind(key)
            .execute(connection)
            .await
            .map_err(store_error)?;
        return Ok(true);
    };
    let sql = if existed {
        "update idempotency_records set fingerprint = $3, token = $4, created_at_ms = $5, \
         state = $6, lease_expires_at_ms = $7, completed_at_ms = $8, response_status = $9, \
         response_content_type = $10, response_location = $11, response_body = $12, \
         resource_id = $13 where tenant = $1 and key = $2"
    } else {
        "insert into idempotency_records (tenant, key, fingerprint, token, created_at_ms, \
         state, lease_expires_at_ms, completed_at_ms, response_status, response_content_type, \
         response_location, response_body, resource_id) \
         values ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13) \
         on conflict (tenant, key) do nothing"
    };
    let columns = state_columns(&record.state);
    let response = columns.response;
    let written = sqlx::query(sql)
        .bind(tenant)
        .bind(key)
        .bind(&record.fingerprint.0[..])
        .bind(i64::try_from(record.token).map_err(|_| corrupt("fencing token"))?)
        .bind(ms(record.created_at))
        .bind(columns.state)
        .bind(columns.lease_expires_at_ms)
        .bind(columns.completed_at_ms)
        .bind(columns.status)
        .bind(response.map(|r| r.content_type.as_str()))
        .bind(response.and_then(|r| r.location.as_deref()))
        .bind(response.map(|r| &r.body[..]))
        .bind(columns.resource_id)
        .execute(connection)
        .await
        .map_err(store_error)?;
    Ok(written.rows_affected() == 1)
}

/// Locks up to a batch of records the sweeper has work on at `now`, skipping rows that other
/// transactions hold: a request working on a key, or another process sweeping.
///
/// The filter restates [`oncepay_core::engine::sweep_action`]'s thresholds so that only due
/// records are read; the engine still makes every decision on them.
pub(super) async fn lock_sweepable(
    connection: &mut PgConnection,
    now: Timestamp,
    policy: &Policy,
) -> Result<Vec<(Scope, Record)>, StoreError> {
    let now_ms = ms(now);
    let retention_ms = duration_ms(policy.retention);
    let tombstone_ms = duration_ms(policy.tombstone_retention);
    let rows = sqlx::query(select_records!(
        "where (state = 'in_flight' and lease_expires_at_ms <= $1) \
            or (state = 'completed' and completed_at_ms <= $2) \
            or (state = 'tombstone' and completed_at_ms <= $3) \
         limit $4 for update skip locked"
    ))
    .bind(now_ms.saturating_sub(retention_ms))
    .bind(now_ms.saturating_sub(retention_ms))
    .bind(now_ms.saturating_sub(retention_ms.saturating_add(tombstone_ms)))
    .bind(super::SWEEP_BATCH_ROWS)
    .fetch_all(connection)
    .await
    .map_err(store_error)?;
    rows.iter()
        .map(|row| Ok((scope_from_row(row)?, record_from_row(row)?)))
        .collect()
}

fn scope_from_row(row: &PgRow) -> Result<Scope, StoreError> {
    let tenant: String = row.try_get("tenant").map_err(store_error)?;
    let key: String = row.try_get("key").map_err(store_error)?;
    let key = IdempotencyKey::parse(key.as_bytes()).map_err(|_| corrupt("idempotency key"))?;
    Ok(Scope {
        tenant: TenantId(tenant),
        key,
    })
}

fn duration_ms(duration: std::time::Duration) -> i64 {
    i64::try_from(duration.as_millis()).unwrap_or(i64::MAX)
}
