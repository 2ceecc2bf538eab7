//! The durable stores and opening a store from a database URL.

pub mod sqlite;

use std::sync::Arc;

use oncepay_core::engine::Policy;
use oncepay_core::memory::{MemoryStore, SHARDS_DEFAULT};
use oncepay_core::store::Store;
use oncepay_core::time::{Clock, SystemClock};

use crate::server::StartError;

/// Opens the store a URL names, creating and migrating its schema if needed.
///
/// `memory://` keeps everything in the process; `sqlite://PATH` is a file (created if missing).
///
/// # Errors
///
/// When the URL's scheme is unknown or the database cannot be opened or migrated.
pub async fn open(
    url: &str,
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
    Err(format!("unsupported database URL `{url}`: use sqlite://PATH or memory://").into())
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
