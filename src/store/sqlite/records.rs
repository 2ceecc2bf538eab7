//! Idempotency records as rows: the migrations, reading a record and writing it back, fencing
//! tokens, and the sweep.

use oncepay_core::engine::{self, Policy, Record, RecordState, Scope, StoredResponse, SweepAction};
use oncepay_core::fingerprint::Fingerprint;
use oncepay_core::store::{StoreError, SweepReport};
use oncepay_core::time::Timestamp;
use oncepay_core::wire::TenantId;
use rusqlite::{Connection, OptionalExtension, Row, params};

use super::{corrupt, unavailable};

/// The schema, one file per version, applied in order and recorded in `schema_migrations`.
const MIGRATIONS: &[(i64, &str)] = &[(1, include_str!("../../../migrations/sqlite/0001_init.sql"))];

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

pub(super) fn ms(timestamp: Timestamp) -> i64 {
    i64::try_from(timestamp.as_millis()).unwrap_or(i64::MAX)
}

pub(super) fn timestamp(ms: i64) -> Timestamp {
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
