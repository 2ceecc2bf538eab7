//! The durable stores and opening a store from a database URL.

pub mod postgres;
pub mod sqlite;

use std::sync::Arc;

use oncepay_core::engine::Policy;
use oncepay_core::memory::{MemoryStore, SHARDS_DEFAULT};
use oncepay_core::store::Store;
use oncepay_core::time::{Clock, SystemClock};

use crate::config::DatabaseArgs;
use crate::server::StartError;

/// Opens the store a URL names, creating and migrating its schema if needed.
///
/// `memory://` keeps everything in the process; `sqlite://PATH` is a file (created if missing);
/// `postgres://...` or `postgresql://...` is a PostgreSQL database that several processes may
/// share.
///
/// # Errors
///
/// When the URL's scheme is unknown or the database cannot be opened or migrated.
pub async fn open(
    url: &str,
    policy: Policy,
    clock: Arc<dyn Clock>,
) -> Result<Arc<dyn Store>, StartError> {
    open_with(url, &postgres::PostgresOptions::default(), policy, clock).await
}

/// Opens the store the database flags name, with their PostgreSQL settings.
///
/// # Errors
///
/// When the URL's scheme is unknown or the database cannot be opened or migrated.
pub async fn open_database(
    database: &DatabaseArgs,
    policy: Policy,
    clock: Arc<dyn Clock>,
) -> Result<Arc<dyn Store>, StartError> {
    let options = postgres::PostgresOptions {
        pool_size: database.db_pool_size,
        migrate: !database.no_migrate,
    };
    open_with(&database.database, &options, policy, clock).await
}

async fn open_with(
    url: &str,
    postgres_options: &postgres::PostgresOptions,
    policy: Policy,
    clock: Arc<dyn Clock>,
) -> Result<Arc<dyn Store>, StartError> {
    if url == "memory://" || url == "memory" {
        return Ok(Arc::new(MemoryStore::new(policy, clock, SHARDS_DEFAULT)));
    }
    if let Some(path) = url.strip_prefix("sqlite://") {
        let store = sqlite::SqliteStore::open(path, policy, clock)?;
        return Ok(Arc::new(store));
    }
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        // The process clock is not passed on: processes sharing a database must judge leases
        // by one clock, so the store reads the database's.
        let store = postgres::PostgresStore::connect(url, postgres_options, policy, None).await?;
        return Ok(Arc::new(store));
    }
    Err(
        format!("unsupported database URL `{url}`: use sqlite://PATH, postgres://... or memory://")
            .into(),
    )
}

/// Creates or upgrades the schema of the database a URL names.
///
/// # Errors
///
/// When the database cannot be opened or a migration fails.
pub async fn migrate(url: &str) -> Result<(), StartError> {
    open(url, Policy::default(), Arc::new(SystemClock)).await?;
    tracing::info!("database schema is up to date");
    Ok(())
}
