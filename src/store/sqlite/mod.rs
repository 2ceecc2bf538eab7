//! The SQLite store: one file, WAL, `synchronous=FULL`, and grouped commits.
//!
//! Every write (claim, completion with its side effects, release, sweep) is a job sent to one
//! writer thread. The thread takes all jobs waiting, runs each inside its own savepoint of one
//! transaction, commits once, and only then answers each job. A commit therefore costs one fsync
//! however many requests it carries, and no request learns of an outcome before it is durable.
//! Because the writer is the only writer, every job is atomic with respect to every other:
//! the claim needs no locking protocol. Reads use a small pool of separate connections, which
//! WAL lets run beside the writer.
//!
//! One process per file: a second process on the same file would have a writer of its own. Use
//! PostgreSQL for several processes.

mod money;
mod records;

use std::path::Path;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use oncepay_core::engine::{self, Begin, Lease, Policy, Record, Scope, StoredResponse};
use oncepay_core::fingerprint::Fingerprint;
use oncepay_core::store::{
    ListQuery, NewPayment, NewRefund, Page, RefundResult, RenderRefund, Store, StoreError,
    SweepReport,
};
use oncepay_core::time::{Clock, Timestamp};
use oncepay_core::wire::{CustomerId, Payment, PaymentId, Rewards, TenantId};
use rusqlite::Connection;
use tokio::sync::{mpsc, oneshot};

/// The most jobs one commit carries: enough to amortise an fsync over a burst, few enough that
/// the first job of a batch does not wait long for the last.
pub const BATCH_JOBS_MAX: usize = 256;
/// Jobs that may queue for the writer before senders wait: back-pressure under overload.
pub const QUEUE_JOBS_MAX: usize = 8192;
/// Read connections kept open for reuse.
pub const READERS_MAX: usize = 8;
/// How long a connection waits on a lock held by another connection before failing.
const BUSY_TIMEOUT_MS: u64 = 5_000;

/// What a job answers once its batch has committed (or failed to).
type Reply = Box<dyn FnOnce(Result<(), String>) + Send>;
/// A unit of work for the writer thread.
type Job = Box<dyn FnOnce(&Connection, &WriterContext) -> Reply + Send>;

/// What jobs need besides the connection.
struct WriterContext {
    policy: Policy,
    clock: Arc<dyn Clock>,
}

/// A store in one SQLite file.
pub struct SqliteStore {
    policy: Policy,
    path: String,
    jobs: mpsc::Sender<Job>,
    readers: Arc<Mutex<Vec<Connection>>>,
}

impl SqliteStore {
    /// Opens (or creates) the database at `path`, migrates it and starts the writer thread.
    ///
    /// # Errors
    ///
    /// When the file cannot be opened or a migration fails.
    pub fn open(path: &str, policy: Policy, clock: Arc<dyn Clock>) -> Result<Self, StoreError> {
        let mut connection = connect(path)?;
        records::migrate(&mut connection)?;
        let (jobs, queue) = mpsc::channel(QUEUE_JOBS_MAX);
        let context = WriterContext { policy, clock };
        std::thread::Builder::new()
            .name("oncepay-sqlite-writer".into())
            .spawn(move || write_loop(connection, queue, context))
            .map_err(|err| StoreError::Unavailable(format!("cannot start the writer: {err}")))?;
        Ok(Self {
            policy,
            path: path.to_owned(),
            jobs,
            readers: Arc::default(),
        })
    }

    /// Runs `work` on the writer thread inside the next batch; answers after the commit.
    async fn write<T, F>(&self, work: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection, &WriterContext) -> Result<T, StoreError> + Send + 'static,
    {
        let (answer, answered) = oneshot::channel();
        let job: Job = Box::new(move |connection, context| {
            let outcome = in_savepoint(connection, |c| work(c, context));
            Box::new(move |commit: Result<(), String>| {
                let result = match commit {
                    Ok(()) => outcome,
                    Err(err) => Err(StoreError::Unavailable(format!("commit failed: {err}"))),
                };
                let _ = answer.send(result);
            })
        });
        let stopped = || StoreError::Unavailable("the writer thread has stopped".into());
        self.jobs.send(job).await.map_err(|_| stopped())?;
        answered.await.map_err(|_| stopped())?
    }

    /// Runs `work` on a read connection from the pool, off the async threads.
    async fn read<T, F>(&self, work: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
    {
        let readers = self.readers.clone();
        let path = self.path.clone();
        let task = tokio::task::spawn_blocking(move || {
            let pooled = readers.lock().unwrap_or_else(|p| p.into_inner()).pop();
            let connection = match pooled {
                Some(connection) => connection,
                None => connect(&path)?,
            };
            let result = work(&connection);
            let mut pool = readers.lock().unwrap_or_else(|p| p.into_inner());
            if pool.len() < READERS_MAX {
                pool.push(connection);
            }
            result
        });
        task.await
            .map_err(|err| StoreError::Unavailable(format!("read task failed: {err}")))?
    }
}

fn unavailable(err: rusqlite::Error) -> StoreError {
    StoreError::Unavailable(err.to_string())
}

fn corrupt(what: &str) -> StoreError {
    StoreError::Corrupt(format!("unreadable {what}"))
}

fn connect(path: &str) -> Result<Connection, StoreError> {
    let connection = Connection::open(Path::new(path)).map_err(unavailable)?;
    connection
        .execute_batch(&format!(
            "pragma journal_mode = wal; pragma synchronous = full; pragma foreign_keys = on; \
             pragma busy_timeout = {BUSY_TIMEOUT_MS}; pragma temp_store = memory;"
        ))
        .map_err(unavailable)?;
    Ok(connection)
}

/// Runs `work` in a savepoint, rolling back just its own writes when it fails.
fn in_savepoint<T>(
    connection: &Connection,
    work: impl FnOnce(&Connection) -> Result<T, StoreError>,
) -> Result<T, StoreError> {
    connection
        .execute_batch("savepoint job")
        .map_err(unavailable)?;
    let outcome = work(connection);
    let end = match outcome {
        Ok(_) => "release job",
        Err(_) => "rollback to job; release job",
    };
    connection.execute_batch(end).map_err(unavailable)?;
    outcome
}

fn write_loop(connection: Connection, mut queue: mpsc::Receiver<Job>, context: WriterContext) {
    while let Some(first) = queue.blocking_recv() {
        let mut batch = vec![first];
        while batch.len() < BATCH_JOBS_MAX {
            match queue.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        if let Err(err) = connection.execute_batch("begin immediate") {
            let err = err.to_string();
            tracing::error!(error = %err, "cannot begin a transaction");
            for job in batch {
                // The job is dropped unrun; its caller sees the writer's failure.
                drop(job);
            }
            continue;
        }
        let replies: Vec<Reply> = batch
            .into_iter()
            .map(|job| job(&connection, &context))
            .collect();
        let commit = connection
            .execute_batch("commit")
            .map_err(|err| err.to_string());
        if let Err(err) = &commit {
            tracing::error!(error = %err, "commit failed; the batch is rolled back");
            let _ = connection.execute_batch("rollback");
        }
        for reply in replies {
            reply(commit.clone());
        }
    }
}

#[async_trait]
impl Store for SqliteStore {
    fn policy(&self) -> Policy {
        self.policy
    }

    async fn begin(&self, scope: &Scope, fingerprint: &Fingerprint) -> Result<Begin, StoreError> {
        let (scope, fingerprint) = (scope.clone(), *fingerprint);
        // The check-then-act bug for the mutation proof: decide on a read taken outside the
        // writer, so two racing claims can both see the key free.
        let stale = match cfg!(feature = "mutant-check-then-act") {
            true => Some(self.record(&scope).await?),
            false => None,
        };
        self.write(move |connection, context| {
            let now = context.clock.now();
            let mut slot = match stale {
                Some(stale) => stale,
                None => records::load_record(connection, &scope)?,
            };
            let before = slot.clone();
            let mut token_error = None;
            let begin = engine::begin_on(
                &mut slot,
                &scope,
                &fingerprint,
                now,
                &context.policy,
                || {
                    records::next_token(connection).unwrap_or_else(|err| {
                        token_error = Some(err);
                        0
                    })
                },
            );
            if let Some(err) = token_error {
                return Err(err);
            }
            if slot != before {
                records::save_record(connection, &scope, slot.as_ref())?;
            }
            Ok(begin)
        })
        .await
    }

    async fn complete(&self, lease: &Lease, response: StoredResponse) -> Result<(), StoreError> {
        let lease = lease.clone();
        self.write(move |connection, context| {
            let now = context.clock.now();
            let mut slot = records::load_record(connection, &lease.scope)?;
            engine::complete_on(&mut slot, lease.token, response, now)?;
            records::save_record(connection, &lease.scope, slot.as_ref())
        })
        .await
    }

    async fn renew(&self, lease: &Lease) -> Result<Timestamp, StoreError> {
        let lease = lease.clone();
        self.write(move |connection, context| {
            let mut slot = records::load_record(connection, &lease.scope)?;
            let now = context.clock.now();
            let expires_at = engine::renew_on(&mut slot, lease.token, now, &context.policy)?;
            records::save_record(connection, &lease.scope, slot.as_ref())?;
            Ok(expires_at)
        })
        .await
    }

    async fn release(&self, lease: &Lease) -> Result<(), StoreError> {
        let lease = lease.clone();
        self.write(move |connection, _| {
            let mut slot = records::load_record(connection, &lease.scope)?;
            if engine::check_owner(&slot, lease.token).is_ok() {
                engine::release_on(&mut slot, lease.token);
                records::save_record(connection, &lease.scope, slot.as_ref())?;
            }
            Ok(())
        })
        .await
    }

    async fn record(&self, scope: &Scope) -> Result<Option<Record>, StoreError> {
        let scope = scope.clone();
        self.read(move |connection| records::load_record(connection, &scope))
            .await
    }

    async fn sweep(&self) -> Result<SweepReport, StoreError> {
        self.write(|connection, context| {
            records::sweep(connection, context.clock.now(), &context.policy)
        })
        .await
    }

    async fn ping(&self) -> Result<(), StoreError> {
        self.read(|connection| {
            connection
                .query_row("select 1", [], |_| Ok(()))
                .map_err(unavailable)
        })
        .await
    }

    async fn create_payment(
        &self,
        lease: &Lease,
        new: NewPayment,
        response: StoredResponse,
    ) -> Result<(), StoreError> {
        let lease = lease.clone();
        self.write(move |connection, context| {
            let mut slot = records::load_record(connection, &lease.scope)?;
            engine::check_owner(&slot, lease.token)?;
            money::insert_payment(connection, &lease, &new)?;
            engine::complete_on(&mut slot, lease.token, response, context.clock.now())?;
            records::save_record(connection, &lease.scope, slot.as_ref())
        })
        .await
    }

    async fn create_refund(
        &self,
        lease: &Lease,
        new: NewRefund,
        render: RenderRefund,
    ) -> Result<RefundResult, StoreError> {
        let lease = lease.clone();
        self.write(move |connection, context| {
            let mut slot = records::load_record(connection, &lease.scope)?;
            engine::check_owner(&slot, lease.token)?;
            let Some(outcome) = money::refund(connection, &lease, &new)? else {
                return Ok(RefundResult::PaymentNotFound);
            };
            let response = render(&outcome);
            engine::complete_on(
                &mut slot,
                lease.token,
                response.clone(),
                context.clock.now(),
            )?;
            records::save_record(connection, &lease.scope, slot.as_ref())?;
            Ok(RefundResult::Committed(response))
        })
        .await
    }

    async fn payment(
        &self,
        tenant: &TenantId,
        id: &PaymentId,
    ) -> Result<Option<Payment>, StoreError> {
        let (tenant, id) = (tenant.clone(), id.clone());
        self.read(move |connection| money::payment(connection, &tenant, &id))
            .await
    }

    async fn list_payments(
        &self,
        tenant: &TenantId,
        query: &ListQuery,
    ) -> Result<Option<Page>, StoreError> {
        let (tenant, query) = (tenant.clone(), query.clone());
        self.read(move |connection| money::list_payments(connection, &tenant, &query))
            .await
    }

    async fn rewards(
        &self,
        tenant: &TenantId,
        customer: &CustomerId,
    ) -> Result<Rewards, StoreError> {
        let (tenant, customer) = (tenant.clone(), customer.clone());
        self.read(move |connection| money::rewards(connection, &tenant, &customer))
            .await
    }
}
