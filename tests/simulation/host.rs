//! The server host: the real router and the SQLite store, behind turmoil's simulated network.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use axum::serve::Listener;
use oncepay::http::auth::ApiKeys;
use oncepay::http::idempotency::IdempotencyConfig;
use oncepay::http::{AppState, app};
use oncepay::store::sqlite::SqliteStore;
use oncepay_core::engine::{Begin, Lease, Policy, Record, Scope, StoredResponse};
use oncepay_core::fingerprint::Fingerprint;
use oncepay_core::store::{
    ListQuery, NewPayment, NewRefund, Page, RefundResult, RenderRefund, Store, StoreError,
    SweepReport,
};
use oncepay_core::time::{Clock, ManualClock, Timestamp};
use oncepay_core::wire::{CustomerId, Payment, PaymentId, Rewards, TenantId};
use turmoil::net::{TcpListener, TcpStream};

use crate::{API_KEY, IN_FLIGHT_WAIT, LEASE, PORT};

/// Lets `axum::serve` accept connections from turmoil's simulated network.
struct SimListener(TcpListener);

impl Listener for SimListener {
    type Io = TcpStream;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (TcpStream, SocketAddr) {
        loop {
            match self.0.accept().await {
                Ok(accepted) => return accepted,
                // A handshake that failed concerns that one client; keep listening.
                Err(err) => tracing::debug!(error = %err, "accept failed"),
            }
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.0.local_addr()
    }
}

/// The SQLite store with every call run as a blocking task.
///
/// The store commits on a writer thread of its own, which simulated time cannot see: while a
/// host merely awaits that thread, turmoil lets the clock run on, so a commit would last as many
/// simulated milliseconds as the real disk took to sync and a seed would not replay the same
/// run. A blocking task holds the host's simulated clock still until it ends, so the disk takes
/// no simulated time. The calls themselves go unchanged to the real store.
struct InstantDisk(Arc<SqliteStore>);

/// Runs `work` on the blocking pool and waits for it.
async fn on_disk<T, F>(work: F) -> Result<T, StoreError>
where
    T: Send + 'static,
    F: Future<Output = Result<T, StoreError>> + Send + 'static,
{
    let runtime = tokio::runtime::Handle::current();
    match tokio::task::spawn_blocking(move || runtime.block_on(work)).await {
        Ok(result) => result,
        Err(err) => Err(StoreError::Unavailable(format!(
            "the disk task ended: {err}"
        ))),
    }
}

#[async_trait]
impl Store for InstantDisk {
    fn policy(&self) -> Policy {
        self.0.policy()
    }

    async fn begin(&self, scope: &Scope, fingerprint: &Fingerprint) -> Result<Begin, StoreError> {
        let (store, scope, fingerprint) = (self.0.clone(), scope.clone(), *fingerprint);
        on_disk(async move { store.begin(&scope, &fingerprint).await }).await
    }

    async fn complete(&self, lease: &Lease, response: StoredResponse) -> Result<(), StoreError> {
        let (store, lease) = (self.0.clone(), lease.clone());
        on_disk(async move { store.complete(&lease, response).await }).await
    }

    async fn renew(&self, lease: &Lease) -> Result<Timestamp, StoreError> {
        let (store, lease) = (self.0.clone(), lease.clone());
        on_disk(async move { store.renew(&lease).await }).await
    }

    async fn release(&self, lease: &Lease) -> Result<(), StoreError> {
        let (store, lease) = (self.0.clone(), lease.clone());
        on_disk(async move { store.release(&lease).await }).await
    }

    async fn record(&self, scope: &Scope) -> Result<Option<Record>, StoreError> {
        let (store, scope) = (self.0.clone(), scope.clone());
        on_disk(async move { store.record(&scope).await }).await
    }

    async fn sweep(&self) -> Result<SweepReport, StoreError> {
        let store = self.0.clone();
        on_disk(async move { store.sweep().await }).await
    }

    async fn ping(&self) -> Result<(), StoreError> {
        let store = self.0.clone();
        on_disk(async move { store.ping().await }).await
    }

    async fn create_payment(
        &self,
        lease: &Lease,
        new: NewPayment,
        response: StoredResponse,
    ) -> Result<(), StoreError> {
        let (store, lease) = (self.0.clone(), lease.clone());
        on_disk(async move { store.create_payment(&lease, new, response).await }).await
    }

    async fn create_refund(
        &self,
        lease: &Lease,
        new: NewRefund,
        render: RenderRefund,
    ) -> Result<RefundResult, StoreError> {
        let (store, lease) = (self.0.clone(), lease.clone());
        on_disk(async move { store.create_refund(&lease, new, render).await }).await
    }

    async fn payment(
        &self,
        tenant: &TenantId,
        id: &PaymentId,
    ) -> Result<Option<Payment>, StoreError> {
        let (store, tenant, id) = (self.0.clone(), tenant.clone(), id.clone());
        on_disk(async move { store.payment(&tenant, &id).await }).await
    }

    async fn list_payments(
        &self,
        tenant: &TenantId,
        query: &ListQuery,
    ) -> Result<Option<Page>, StoreError> {
        let (store, tenant, query) = (self.0.clone(), tenant.clone(), query.clone());
        on_disk(async move { store.list_payments(&tenant, &query).await }).await
    }

    async fn rewards(
        &self,
        tenant: &TenantId,
        customer: &CustomerId,
    ) -> Result<Rewards, StoreError> {
        let (store, tenant, customer) = (self.0.clone(), tenant.clone(), customer.clone());
        on_disk(async move { store.rewards(&tenant, &customer).await }).await
    }
}

/// One life of the server process: opens the database file, then serves until crashed.
pub(crate) async fn serve(path: PathBuf, clock: Arc<ManualClock>) -> turmoil::Result {
    let policy = Policy {
        lease: LEASE,
        retention: Duration::from_secs(3600),
        tombstone_retention: Duration::from_secs(86_400),
    };
    let clock: Arc<dyn Clock> = clock;
    let path = path.to_str().ok_or("the database path is not UTF-8")?;
    let store = SqliteStore::open(path, policy, clock.clone())?;
    let state = AppState {
        store: Arc::new(InstantDisk(Arc::new(store))),
        clock,
        metrics: Arc::default(),
        api_keys: Arc::new(ApiKeys::parse(&format!("acme:{API_KEY}"))?),
    };
    let config = IdempotencyConfig {
        in_flight_wait: IN_FLIGHT_WAIT,
        poll_interval: Duration::from_millis(50),
        faults_enabled: true,
        ..IdempotencyConfig::default()
    };
    let listener = TcpListener::bind(("0.0.0.0", PORT)).await?;
    axum::serve(SimListener(listener), app(state, config)).await?;
    Ok(())
}
