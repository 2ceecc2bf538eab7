//! Schema migrations: SQL files applied in order, recorded in `schema_migrations`.
//!
//! All pending migrations run in one transaction that first takes a transaction-scoped advisory
//! lock, so several processes starting at once on an empty database queue up behind the first:
//! it creates the schema, and the others find it done. A failed migration leaves nothing behind.

use oncepay_core::store::StoreError;
use sqlx::postgres::{PgConnection, PgPool};

use super::store_error;

/// The schema, one file per version, in order.
const MIGRATIONS: &[(i64, &str)] = &[(
    1,
    include_str!("../../../migrations/postgres/0001_init.sql"),
)];

/// The advisory lock that serialises migrations: "oncepay" in ASCII, so that it is unlikely to
/// collide with a lock another application on the same database uses.
const MIGRATION_LOCK_ID: i64 = 0x006f_6e63_6570_6179;

/// Applies every migration the database has not recorded yet.
///
/// # Errors
///
/// [`StoreError::Unavailable`] when the database fails or a migration is refused; nothing of
/// this run is then committed.
pub(super) async fn run(pool: &PgPool) -> Result<(), StoreError> {
    let mut transaction = pool.begin().await.map_err(store_error)?;
    sqlx::query("select pg_advisory_xact_lock($1)")
        .bind(MIGRATION_LOCK_ID)
        .execute(&mut *transaction)
        .await
        .map_err(store_error)?;
    // Looked up rather than `create table if not exists`, which would log a notice each start.
    if !has_migrations_table(&mut transaction).await? {
        sqlx::query(
            "create table schema_migrations \
             (version bigint primary key, applied_at_ms bigint not null)",
        )
        .execute(&mut *transaction)
        .await
        .map_err(store_error)?;
    }
    let applied: Vec<i64> = sqlx::query_scalar("select version from schema_migrations")
        .fetch_all(&mut *transaction)
        .await
        .map_err(store_error)?;

    for &(version, sql) in MIGRATIONS {
        if applied.contains(&version) {
            continue;
        }
        sqlx::raw_sql(sql)
            .execute(&mut *transaction)
            .await
            .map_err(|err| migration_failed(version, err))?;
        sqlx::query(
            "insert into schema_migrations (version, applied_at_ms) \
             values ($1, (extract(epoch from clock_timestamp()) * 1000)::bigint)",
        )
        .bind(version)
        .execute(&mut *transaction)
        .await
        .map_err(store_error)?;
        tracing::info!(version, "applied migration");
    }
    transaction.commit().await.map_err(store_error)
}

/// Checks that every migration this build knows has been applied.
///
/// # Errors
///
/// [`StoreError::Unavailable`] naming the missing version, or when the database fails.
pub(super) async fn check_current(pool: &PgPool) -> Result<(), StoreError> {
    let mut connection = pool.acquire().await.map_err(store_error)?;
    let latest: Option<i64> = match has_migrations_table(&mut connection).await? {
        false => None,
        true => sqlx::query_scalar("select max(version) from schema_migrations")
            .fetch_one(&mut *connection)
            .await
            .map_err(store_error)?,
    };
    let wanted = MIGRATIONS.last().map_or(0, |&(version, _)| version);
    if latest.unwrap_or(0) < wanted {
        return Err(StoreError::Unavailable(format!(
            "the database schema is older than version {wanted}: run `oncepay migrate` first, \
             or start without --no-migrate"
        )));
    }
    Ok(())
}

async fn has_migrations_table(connection: &mut PgConnection) -> Result<bool, StoreError> {
    sqlx::query_scalar("select to_regclass('schema_migrations') is not null")
        .fetch_one(connection)
        .await
        .map_err(store_error)
}

fn migration_failed(version: i64, err: sqlx::Error) -> StoreError {
    StoreError::Unavailable(format!("migration {version} failed: {err}"))
}
