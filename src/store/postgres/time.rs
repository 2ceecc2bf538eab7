//! Where the store's "now" comes from: the database's clock, or a clock a test injects.

use std::sync::Arc;

use oncepay_core::store::StoreError;
use oncepay_core::time::{Clock, Timestamp};
use sqlx::postgres::PgConnection;

use super::records::timestamp;
use super::{corrupt, store_error};

/// Milliseconds since the epoch by the database's clock. `clock_timestamp()` rather than
/// `now()`, which stands still at the start of the transaction.
const NOW_MS: &str = "select (extract(epoch from clock_timestamp()) * 1000)::bigint";
const NOW_MS_AND_TOKEN: &str = "select (extract(epoch from clock_timestamp()) * 1000)::bigint, \
     nextval('fencing_tokens')";

/// The clock every lease and retention decision of the store reads.
pub(super) struct TimeSource {
    /// Replaces the database's clock; only tests that step time set it.
    injected: Option<Arc<dyn Clock>>,
}

impl TimeSource {
    pub(super) fn new(injected: Option<Arc<dyn Clock>>) -> Self {
        Self { injected }
    }

    /// The current time, read on `connection` so that it follows any lock the caller waited on.
    pub(super) async fn now(&self, connection: &mut PgConnection) -> Result<Timestamp, StoreError> {
        if let Some(clock) = &self.injected {
            return Ok(clock.now());
        }
        let now_ms: i64 = sqlx::query_scalar(NOW_MS)
            .fetch_one(connection)
            .await
            .map_err(store_error)?;
        Ok(timestamp(now_ms))
    }

    /// The current time and a fresh fencing token, in one round trip.
    ///
    /// The token is drawn even when the request turns out not to need one: a sequence value
    /// costs next to nothing, tokens only have to grow, and it saves a round trip on every claim.
    pub(super) async fn now_and_token(
        &self,
        connection: &mut PgConnection,
    ) -> Result<(Timestamp, u64), StoreError> {
        let (now_ms, token): (i64, i64) = sqlx::query_as(NOW_MS_AND_TOKEN)
            .fetch_one(connection)
            .await
            .map_err(store_error)?;
        let now = match &self.injected {
            Some(clock) => clock.now(),
            None => timestamp(now_ms),
        };
        let token = u64::try_from(token).map_err(|_| corrupt("fencing token"))?;
        Ok((now, token))
    }
}
