//! The PostgreSQL store: several oncepay processes share one database safely.
//!
//! Every step that reads and then writes a key's record is one transaction that first locks the
//! record's row (`select ... for update`), so two processes can never both act on what they read.
//! A key nobody has used yet has no row to lock: its claim is an `insert ... on conflict do
//! nothing`, and a claim that loses that race rolls back and looks again. Payments and refunds
//! commit in the same transaction as the completion of their key, behind a check of the fencing
//! token, and a refund also locks its payment's row so refunds of one payment run one at a time.
//!
//! Leases and retention are judged by the database's clock, read inside the transaction, never by
//! the clocks of the processes, which may disagree. Fencing tokens come from one sequence. The
//! sweeper takes rows with `for update skip locked`, so any number of processes may sweep at
//! once without waiting on each other or on requests.
//!
//! A lost connection, a full pool or any other database failure is
//! [`StoreError::Unavailable`]; the pool opens fresh connections by itself once the database
//! answers again. Start-up fails while the database is unreachable.

mod migrate;
mod money;
mod records;
mod time;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use oncepay_core::engine::{self, Begin, Lease, Policy, Record, Scope, StoredResponse};
use oncepay_core::fingerprint::Fingerprint;
use oncepay_core::store::{
    ListQuery, NewPayment, NewRefund, Page, RefundResult, RenderRefund, Store, StoreError,
    SweepReport,
};
use oncepay_core::time::{Clock, Timestamp};
use oncepay_core::wire::{CustomerId, Payment, PaymentId, Rewards, TenantId};
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::{Postgres, Transaction};

/// Connections per process by default: enough to keep two cores busy while some transactions
/// wait on row locks, few enough that three processes stay well below PostgreSQL's default limit
/// of 100 connections.
pub const POOL_SIZE_DEFAULT: u32 = 16;
/// How long a request waits for a free connection before it is answered 503: long enough to
/// ride out a burst, short enough that a client is not left hanging when the database is gone.
pub const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(3);
/// The longest one store operation may take, lock waits included. A connection that stops
/// answering without closing (a network partition) would otherwise hold a request until the
/// operating system gives up on the socket, which takes many minutes.
pub const OPERATION_TIMEOUT: Duration = Duration::from_secs(10);
/// The database ends a session that sits inside a transaction doing nothing for this long, so
/// that a process frozen mid-transaction cannot keep a key's row locked.
const IDLE_IN_TRANSACTION_TIMEOUT: &str = "15s";
/// How often a claim that lost an insert race looks again. Each retry sees the winner's committed
/// row, so a second look nearly always settles it; more only happens while other requests keep
/// releasing and re-claiming the same key.
const CLAIM_ATTEMPTS_MAX: usize = 4;
/// Records one sweep transaction handles: small enough to hold few row locks briefly.
pub const SWEEP_BATCH_ROWS: i64 = 500;
/// Batches one sweep runs at most, so a huge backlog is worked off over several sweeps instead
/// of one sweep running for minutes.
pub const SWEEP_BATCHES_MAX: usize = 100;

/// How the store connects.
#[derive(Clone, Debug)]
pub struct PostgresOptions {
    /// The most connections the pool holds.
    pub pool_size: u32,
    /// Whether to create or upgrade the schema on connecting; otherwise it must be current.
    pub migrate: bool,
}

impl Default for PostgresOptions {
    fn default() -> Self {
        Self {
            pool_size: POOL_SIZE_DEFAULT,
            migrate: true,
        }
    }
}

/// A store in a PostgreSQL database, shared by any number of processes.
pub struct PostgresStore {
    pool: PgPool,
    policy: Policy,
    time: time::TimeSource,
}

impl PostgresStore {
    /// Connects to the database at `url` and migrates its schema unless told not to.
    ///
    /// Time is read from the database unless `clock` is given; a clock is for tests that step
    /// time, since processes sharing a database must all use one clock.
    ///
    /// # Errors
    ///
    /// [`StoreError::Unavailable`] when the URL is malformed, the database cannot be reached, a
    /// migration fails, or (without migrating) the schema is not current.
    pub async fn connect(
        url: &str,
        options: &PostgresOptions,
        policy: Policy,
        clock: Option<Arc<dyn Clock>>,
    ) -> Result<Self, StoreError> {
        let connect_options: PgConnectOptions = url
            .parse()
            .map_err(|err| StoreError::Unavailable(format!("bad database URL: {err}")))?;
        let connect_options = connect_options.application_name("oncepay").options([(
            "idle_in_transaction_session_timeout",
            IDLE_IN_TRANSACTION_TIMEOUT,
        )]);
        let pool = PgPoolOptions::new()
            .max_connections(options.pool_size.max(1))
            .acquire_timeout(ACQUIRE_TIMEOUT)
            .connect_with(connect_options)
            .await
            .map_err(|err| {
                StoreError::Unavailable(format!(
                    "cannot connect to PostgreSQL within {ACQUIRE_TIMEOUT:?} (is it running, and \
                     is the URL right?): {err}"
                ))
            })?;
        if options.migrate {
            migrate::run(&pool).await?;
        } else {
            migrate::check_current(&pool).await?;
        }
        Ok(Self {
            pool,
            policy,
            time: time::TimeSource::new(clock),
        })
    }

    /// Opens a transaction on a pooled connection.
    async fn transaction(&self) -> Result<Transaction<'static, Postgres>, StoreError> {
        self.pool.begin().await.map_err(store_error)
    }

    /// One attempt at [`Store::begin`]; `None` when another claim of the same new key won.
    async fn try_begin(
        &self,
        scope: &Scope,
        fingerprint: &Fingerprint,
    ) -> Result<Option<Begin>, StoreError> {
        let mut transaction = self.transaction().await?;
        let before = records::lock(&mut transaction, scope).await?;
        // Read the clock only once the row is locked: a lock wait must not age `now`, or a
        // duplicate could be told to retry later than the owner's lease ends.
        let (now, token) = self.time.now_and_token(&mut transaction).await?;

        let mut slot = before.clone();
        let begin = engine::begin_on(&mut slot, scope, fingerprint, now, &self.policy, || token);
        if slot != before {
            let saved = records::save(&mut transaction, scope, before.is_some(), slot.as_ref());
            if !saved.await? {
                return Ok(None);
            }
        }
        transaction.commit().await.map_err(store_error)?;
        Ok(Some(begin))
    }

    /// One sweep transaction over at most [`SWEEP_BATCH_ROWS`] records; answers what it did
    /// and how many records it looked at.
    async fn sweep_batch(&self) -> Result<(SweepReport, usize), StoreError> {
        let mut transaction = self.transaction().await?;
        let now = self.time.now(&mut transaction).await?;
        let due = records::lock_sweepable(&mut transaction, now, &self.policy).await?;

        let mut report = SweepReport::default();
        for (scope, record) in &due {
            let mut slot = Some(record.clone());
            match engine::sweep_on(&mut slot, now, &self.policy) {
                engine::SweepAction::Keep => continue,
                engine::SweepAction::Tombstone => report.tombstoned += 1,
                engine::SweepAction::Delete => report.deleted += 1,
            }
            records::save(&mut transaction, scope, true, slot.as_ref()).await?;
        }
        transaction.commit().await.map_err(store_error)?;
        Ok((report, due.len()))
    }
}

/// Maps a database failure: what cannot be decoded is corrupt data; anything else (a lost
/// connection, a timeout, a refused statement) is the store being unavailable, and a retry may
/// work. Nothing was committed, except when the connection died during the commit itself: then
/// the outcome is unknown, which stays safe because a retry finds whatever did commit.
fn store_error(err: sqlx::Error) -> StoreError {
    match err {
        sqlx::Error::ColumnDecode { .. }
        | sqlx::Error::Decode(_)
        | sqlx::Error::ColumnNotFound(_)
        | sqlx::Error::ColumnIndexOutOfBounds { .. } => StoreError::Corrupt(err.to_string()),
        other => StoreError::Unavailable(other.to_string()),
    }
}

fn corrupt(what: &str) -> StoreError {
    StoreError::Corrupt(format!("unreadable {what}"))
}

/// Runs one store operation within [`OPERATION_TIMEOUT`].
async fn bounded<T>(
    operation: impl Future<Output = Result<T, StoreError>>,
) -> Result<T, StoreError> {
    match tokio::time::timeout(OPERATION_TIMEOUT, operation).await {
        Ok(result) => result,
        Err(_) => Err(StoreError::Unavailable(format!(
            "the database did not answer within {OPERATION_TIMEOUT:?}"
        ))),
    }
}

#[async_trait]
impl Store for PostgresStore {
    fn policy(&self) -> Policy {
        self.policy
    }

    async fn begin(&self, scope: &Scope, fingerprint: &Fingerprint) -> Result<Begin, StoreError> {
        bounded(async {
            for _ in 0..CLAIM_ATTEMPTS_MAX {
                if let Some(begin) = self.try_begin(scope, fingerprint).await? {
                    return Ok(begin);
                }
            }
            Err(StoreError::Unavailable(
                "the key kept changing under concurrent requests".into(),
            ))
        })
        .await
    }

    async fn complete(&self, lease: &Lease, response: StoredResponse) -> Result<(), StoreError> {
        bounded(async {
            let mut transaction = self.transaction().await?;
            let mut slot = records::lock(&mut transaction, &lease.scope).await?;
            engine::check_owner(&slot, lease.token)?;
            let now = self.time.now(&mut transaction).await?;

            engine::complete_on(&mut slot, lease.token, response, now)?;
            records::save(&mut transaction, &lease.scope, true, slot.as_ref()).await?;
            transaction.commit().await.map_err(store_error)
        })
        .await
    }

    async fn renew(&self, lease: &Lease) -> Result<Timestamp, StoreError> {
        bounded(async {
            let mut transaction = self.transaction().await?;
            let mut slot = records::lock(&mut transaction, &lease.scope).await?;
            engine::check_owner(&slot, lease.token)?;
            let now = self.time.now(&mut transaction).await?;

            let expires_at = engine::renew_on(&mut slot, lease.token, now, &self.policy)?;
            records::save(&mut transaction, &lease.scope, true, slot.as_ref()).await?;
            transaction.commit().await.map_err(store_error)?;
            Ok(expires_at)
        })
        .await
    }

    async fn release(&self, lease: &Lease) -> Result<(), StoreError> {
        bounded(async {
            let mut transaction = self.transaction().await?;
            let mut slot = records::lock(&mut transaction, &lease.scope).await?;
            if engine::check_owner(&slot, lease.token).is_err() {
                // Someone else owns the key now; a lost lease changes nothing.
                return Ok(());
            }

            engine::release_on(&mut slot, lease.token);
            records::save(&mut transaction, &lease.scope, true, slot.as_ref()).await?;
            transaction.commit().await.map_err(store_error)
        })
        .await
    }

    async fn record(&self, scope: &Scope) -> Result<Option<Record>, StoreError> {
        bounded(async {
            let mut connection = self.pool.acquire().await.map_err(store_error)?;
            records::load(&mut connection, scope).await
        })
        .await
    }

    async fn sweep(&self) -> Result<SweepReport, StoreError> {
        let mut report = SweepReport::default();
        for _ in 0..SWEEP_BATCHES_MAX {
            let (batch, examined) = bounded(self.sweep_batch()).await?;
            report.tombstoned += batch.tombstoned;
            report.deleted += batch.deleted;
            let changed = batch.tombstoned + batch.deleted;
            if examined < SWEEP_BATCH_ROWS as usize || changed == 0 {
                break;
            }
        }
        Ok(report)
    }

    async fn ping(&self) -> Result<(), StoreError> {
        bounded(async {
            sqlx::query("select 1")
                .execute(&self.pool)
                .await
                .map_err(store_error)?;
            Ok(())
        })
        .await
    }

    async fn create_payment(
        &self,
        lease: &Lease,
        new: NewPayment,
        response: StoredResponse,
    ) -> Result<(), StoreError> {
        bounded(async {
            let mut transaction = self.transaction().await?;
            let mut slot = records::lock(&mut transaction, &lease.scope).await?;
            engine::check_owner(&slot, lease.token)?;

            money::insert_payment(&mut transaction, lease, &new).await?;
            let now = self.time.now(&mut transaction).await?;
            engine::complete_on(&mut slot, lease.token, response, now)?;
            records::save(&mut transaction, &lease.scope, true, slot.as_ref()).await?;
            transaction.commit().await.map_err(store_error)
        })
        .await
    }

    async fn create_refund(
        &self,
        lease: &Lease,
        new: NewRefund,
        render: RenderRefund,
    ) -> Result<RefundResult, StoreError> {
        bounded(async {
            let mut transaction = self.transaction().await?;
            let mut slot = records::lock(&mut transaction, &lease.scope).await?;
            engine::check_owner(&slot, lease.token)?;

            let Some(outcome) = money::refund(&mut transaction, lease, &new).await? else {
                return Ok(RefundResult::PaymentNotFound);
            };
            let response = render(&outcome);
            let now = self.time.now(&mut transaction).await?;
            engine::complete_on(&mut slot, lease.token, response.clone(), now)?;
            records::save(&mut transaction, &lease.scope, true, slot.as_ref()).await?;
            transaction.commit().await.map_err(store_error)?;
            Ok(RefundResult::Committed(response))
        })
        .await
    }

    async fn payment(
        &self,
        tenant: &TenantId,
        id: &PaymentId,
    ) -> Result<Option<Payment>, StoreError> {
        bounded(async {
            let mut connection = self.pool.acquire().await.map_err(store_error)?;
            money::payment(&mut connection, tenant, id).await
        })
        .await
    }

    async fn list_payments(
        &self,
        tenant: &TenantId,
        query: &ListQuery,
    ) -> Result<Option<Page>, StoreError> {
        bounded(async {
            let mut connection = self.pool.acquire().await.map_err(store_error)?;
            money::list_payments(&mut connection, tenant, query).await
        })
        .await
    }

    async fn rewards(
        &self,
        tenant: &TenantId,
        customer: &CustomerId,
    ) -> Result<Rewards, StoreError> {
        bounded(async {
            let mut connection = self.pool.acquire().await.map_err(store_error)?;
            money::rewards(&mut connection, tenant, customer).await
        })
        .await
    }
}
