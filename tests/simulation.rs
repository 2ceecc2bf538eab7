//! Deterministic simulation: the real router over turmoil's simulated network, on a SQLite file
//! that outlives the simulated process.
//!
//! Each test runs many seeds. A seed fixes the network's latencies and losses and the moments
//! at which the test crashes the server or cuts a link, so a failure names its seed and
//! `SIM_SEED=<seed>` replays that run alone; `SIM_SEEDS=<n>` runs more. The server host opens
//! its store inside the host's start-up closure, so `Sim::crash` loses everything the process
//! held in memory while the database file stays, and `Sim::bounce` starts a fresh process on it.
//! Every scenario then checks the one promise of the service twice, in the database itself and
//! through the API: one payment per key, and every success for a key byte-identical.
//!
//! Time: leases are judged by the store's clock, which the driver moves forward by exactly one
//! tick per simulation step, so it agrees with the hosts' simulated tokio time. The disk takes
//! no simulated time (see [`InstantDisk`]).
//!
//! What this layer cannot see: races inside the store, because each store call finishes before
//! simulated time moves on and claims made in one tick share a claim time; and an owner that
//! outlives its lease, because one live process on an embedded store always renews it. The
//! linearizability tests and the loom models look for those.

use std::cell::{Cell, RefCell};
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::rc::Rc;
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
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use turmoil::Sim;
use turmoil::net::{TcpListener, TcpStream};

const SERVER: &str = "server";
const PORT: u16 = 8080;
const API_KEY: &str = "sk_test_acme";
const P1: &str = r#"{"amount": 1250, "currency": "EUR", "customer_id": "cus_001"}"#;
const P2: &str = r#"{"amount": 1251, "currency": "EUR", "customer_id": "cus_001"}"#;
/// 2026-12-04T10:00:00Z: a fixed start, so timestamps do not depend on the host's clock.
const EPOCH: Timestamp = Timestamp(1_796_378_400_000);
/// One simulation step; also the resolution of the store's clock.
const TICK: Duration = Duration::from_millis(1);
/// Short, so a crashed owner's key frees up after a couple of simulated seconds.
const LEASE: Duration = Duration::from_secs(2);
const IN_FLIGHT_WAIT: Duration = Duration::from_secs(1);
/// How long a client waits for one answer before it gives up on the connection.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(3);
const RETRY_INTERVAL: Duration = Duration::from_millis(250);
/// Enough attempts to outlast a lease, a restart and a few lost connections.
const ATTEMPTS_MAX: usize = 60;
/// A hard stop for one run in simulated time; every scenario settles far sooner.
const SIM_DURATION_MAX: Duration = Duration::from_secs(900);
const SEEDS_DEFAULT: u64 = 30;

/// The seeds to run: `SIM_SEED` alone when set, else `0..SIM_SEEDS`.
fn seeds() -> Vec<u64> {
    let number = |name| std::env::var(name).ok().and_then(|v| v.parse::<u64>().ok());
    match number("SIM_SEED") {
        Some(seed) => vec![seed],
        None => (0..number("SIM_SEEDS").unwrap_or(SEEDS_DEFAULT)).collect(),
    }
}

fn init_logging() {
    if std::env::var_os("TEST_LOG").is_some() {
        let filter = tracing_subscriber::EnvFilter::new("debug,turmoil=info");
        let _ = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_test_writer()
            .try_init();
    }
}

// ---------------------------------------------------------------------------------------------
// The server host

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
async fn serve(path: PathBuf, clock: Arc<ManualClock>) -> turmoil::Result {
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

// ---------------------------------------------------------------------------------------------
// The client side: one HTTP/1.1 exchange per connection

/// A response, read whole.
#[derive(Clone, Debug)]
struct Reply {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Reply {
    fn header(&self, name: &str) -> Option<&str> {
        let mut found = self.headers.iter().filter(|(n, _)| n == name);
        found.next().map(|(_, value)| value.as_str())
    }

    fn replayed(&self) -> bool {
        self.header("idempotent-replayed") == Some("true")
    }

    fn payment_id(&self) -> Option<String> {
        let body: Value = serde_json::from_slice(&self.body).ok()?;
        body["id"].as_str().map(str::to_owned)
    }
}

fn payment_request(key: &str, body: &str, fault: Option<&str>) -> Vec<u8> {
    let fault = fault.map_or(String::new(), |f| format!("oncepay-fault: {f}\r\n"));
    let length = body.len();
    format!(
        "POST /v1/payments HTTP/1.1\r\nhost: {SERVER}\r\nauthorization: Bearer {API_KEY}\r\n\
         idempotency-key: {key}\r\ncontent-type: application/json\r\n\
         content-length: {length}\r\nconnection: close\r\n{fault}\r\n{body}"
    )
    .into_bytes()
}

/// Sends `request` on a new connection and reads the answer until the server closes it.
async fn exchange(request: &[u8], timeout: Duration) -> io::Result<Reply> {
    let attempt = async {
        let mut stream = TcpStream::connect((SERVER, PORT)).await?;
        stream.write_all(request).await?;
        let mut raw = Vec::new();
        stream.read_to_end(&mut raw).await?;
        parse_reply(&raw)
    };
    match tokio::time::timeout(timeout, attempt).await {
        Ok(result) => result,
        Err(_) => Err(io::ErrorKind::TimedOut.into()),
    }
}

fn parse_reply(raw: &[u8]) -> io::Result<Reply> {
    let bad = || io::Error::new(io::ErrorKind::InvalidData, "a cut or malformed response");
    let end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(bad)?;
    let head = std::str::from_utf8(&raw[..end]).map_err(|_| bad())?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status = status_line.split(' ').nth(1).and_then(|s| s.parse().ok());
    let headers = lines
        .filter_map(|line| line.split_once(':'))
        .map(|(name, value)| (name.trim().to_ascii_lowercase(), value.trim().to_owned()))
        .collect();
    let reply = Reply {
        status: status.ok_or_else(bad)?,
        headers,
        body: raw[end + 4..].to_vec(),
    };
    // A connection that died mid-answer also ends in EOF: only a complete body counts.
    let length: usize = reply
        .header("content-length")
        .and_then(|v| v.parse().ok())
        .ok_or_else(bad)?;
    if reply.body.len() != length {
        return Err(bad());
    }
    Ok(reply)
}

/// A final answer: anything but a refusal to run now (409) or a server failure (5xx).
fn is_final(reply: &Reply) -> bool {
    reply.status != 409 && reply.status < 500
}

/// A final answer and the simulated time it arrived.
#[derive(Clone, Debug)]
struct Settled {
    reply: Reply,
    at: Duration,
}

/// Retries like a patient client until a final answer, at a fixed interval.
async fn settle(key: &str, body: &str) -> Option<Settled> {
    let request = payment_request(key, body, None);
    for _ in 0..ATTEMPTS_MAX {
        if let Ok(reply) = exchange(&request, REQUEST_TIMEOUT).await
            && is_final(&reply)
        {
            let at = turmoil::sim_elapsed().unwrap_or_default();
            return Some(Settled { reply, at });
        }
        tokio::time::sleep(RETRY_INTERVAL).await;
    }
    None
}

/// The ids of the payments the API lists for `key`.
async fn listed_payment_ids(key: &str) -> Option<Vec<String>> {
    let request = format!(
        "GET /v1/payments?limit=100&idempotency_key={key} HTTP/1.1\r\nhost: {SERVER}\r\n\
         authorization: Bearer {API_KEY}\r\nconnection: close\r\n\r\n"
    );
    for _ in 0..ATTEMPTS_MAX {
        if let Ok(reply) = exchange(request.as_bytes(), REQUEST_TIMEOUT).await
            && reply.status == 200
        {
            let page: Value = serde_json::from_slice(&reply.body).ok()?;
            let data = page["data"].as_array()?;
            return Some(
                data.iter()
                    .filter_map(|p| p["id"].as_str())
                    .map(str::to_owned)
                    .collect(),
            );
        }
        tokio::time::sleep(RETRY_INTERVAL).await;
    }
    None
}

// ---------------------------------------------------------------------------------------------
// The driver

/// The database file, read directly, beside the server.
struct Db(PathBuf);

impl Db {
    fn query(&self, sql: &str, params: impl rusqlite::Params) -> Vec<String> {
        let connection = rusqlite::Connection::open(&self.0).expect("the database opens");
        let mut statement = match connection.prepare(sql) {
            Ok(statement) => statement,
            // The server has not created its schema yet.
            Err(_) => return Vec::new(),
        };
        let rows = statement
            .query_map(params, |row| row.get::<_, String>(0))
            .expect("a query");
        rows.map(|row| row.expect("a row")).collect()
    }

    /// The ids of the payments created with `key`.
    fn payments(&self, key: &str) -> Vec<String> {
        self.query("select id from payments where idempotency_key = ?1", [key])
    }

    /// How many keys are claimed and not yet completed or released.
    fn in_flight(&self) -> usize {
        let sql = "select key from idempotency_records where state = 'in_flight'";
        self.query(sql, []).len()
    }

    /// The state of `key`'s idempotency record, if it has one.
    fn record_state(&self, key: &str) -> Option<String> {
        self.query(
            "select state from idempotency_records where key = ?1",
            [key],
        )
        .pop()
    }
}

/// One simulated world: the server host on a fresh database, and the clock it judges leases by.
struct Run {
    sim: Sim<'static>,
    clock: Arc<ManualClock>,
    db: Db,
    seed: u64,
    _dir: tempfile::TempDir,
}

impl Run {
    fn new(seed: u64, builder: &mut turmoil::Builder) -> Self {
        init_logging();
        let dir = tempfile::tempdir().expect("a temporary directory");
        let path = dir.path().join("oncepay.db");
        let clock = Arc::new(ManualClock::new(EPOCH));
        let mut sim = builder
            .rng_seed(seed)
            .tick_duration(TICK)
            .simulation_duration(SIM_DURATION_MAX)
            .build();
        let (server_path, server_clock) = (path.clone(), clock.clone());
        sim.host(SERVER, move || {
            serve(server_path.clone(), server_clock.clone())
        });
        Self {
            sim,
            clock,
            db: Db(path),
            seed,
            _dir: dir,
        }
    }

    /// Steps until every client has finished; `between` may crash, cut or heal after each step.
    fn run(&mut self, mut between: impl FnMut(&mut Sim<'static>, &Db)) {
        loop {
            let finished = self
                .sim
                .step()
                .unwrap_or_else(|err| panic!("seed {}: the simulation failed: {err}", self.seed));
            self.clock.advance(TICK);
            if finished {
                return;
            }
            between(&mut self.sim, &self.db);
        }
    }
}

/// Asserts the promise for `key`: exactly one payment, the one `reply` announced, also listed.
fn assert_one_payment(run: &Run, key: &str, reply: &Reply, listed: Option<&Vec<String>>) {
    let seed = run.seed;
    let id = reply.payment_id();
    assert!(
        id.is_some(),
        "seed {seed}: the answer for {key} names no payment"
    );
    assert_eq!(
        run.db.payments(key),
        Vec::from_iter(id.clone()),
        "seed {seed}: database rows"
    );
    assert_eq!(
        listed,
        Some(&Vec::from_iter(id)),
        "seed {seed}: the API's list for {key}"
    );
}

// ---------------------------------------------------------------------------------------------
// Scenarios

#[test]
fn a_client_that_times_out_before_a_slow_answer_gets_the_committed_payment_on_retry() {
    for seed in seeds() {
        let mut rng = StdRng::seed_from_u64(seed);
        let delay_ms: u64 = rng.random_range(1_500..5_000);
        let mut run = Run::new(seed, turmoil::Builder::new().max_message_latency(ms(50)));
        let seen = Rc::new(RefCell::new(None));

        // The answer waits after the commit for longer than the client is willing to wait.
        let log = seen.clone();
        run.sim.client("client", async move {
            let fault = format!("after_commit=delay:{delay_ms}");
            let first = exchange(&payment_request("k-slow", P1, Some(&fault)), ms(1_000)).await;
            let retry = settle("k-slow", P1).await;
            tokio::time::sleep(ms(delay_ms)).await;
            let late = settle("k-slow", P1).await;
            let listed = listed_payment_ids("k-slow").await;
            *log.borrow_mut() = Some((first.map(|r| r.status), retry, late, listed));
            Ok(())
        });
        run.run(|_, _| {});

        let (first, retry, late, listed) = seen.take().expect("the client finished");
        let (retry, late) = (retry.expect("the retry settles"), late.expect("settles"));
        assert!(
            first.is_err(),
            "seed {seed}: the first attempt should time out: {first:?}"
        );
        assert_eq!(retry.reply.status, 201, "seed {seed}");
        assert!(
            retry.reply.replayed(),
            "seed {seed}: the retry must be the replay"
        );
        assert_eq!(
            late.reply.body, retry.reply.body,
            "seed {seed}: replays differ"
        );
        assert_one_payment(&run, "k-slow", &retry.reply, listed.as_ref());
    }
}

#[test]
fn an_answer_lost_in_the_network_after_the_commit_is_replayed_to_the_retry() {
    for seed in seeds() {
        // Every message takes at least two ticks, so the answer is still on the wire when the
        // driver sees the payment in the database and holds the link.
        let mut builder = turmoil::Builder::new();
        builder
            .min_message_latency(ms(2))
            .max_message_latency(ms(40));
        let mut run = Run::new(seed, &mut builder);
        let gave_up = Rc::new(Cell::new(false));
        let seen = Rc::new(RefCell::new(None));

        let (flag, log) = (gave_up.clone(), seen.clone());
        run.sim.client("client", async move {
            let first = exchange(&payment_request("k-lost", P1, None), ms(1_000)).await;
            flag.set(true);
            tokio::time::sleep(RETRY_INTERVAL).await;
            let retry = settle("k-lost", P1).await;
            let listed = listed_payment_ids("k-lost").await;
            *log.borrow_mut() = Some((first.map(|r| r.status), retry, listed));
            Ok(())
        });
        let (mut held, mut released) = (false, false);
        run.run(|sim, db| {
            if !held && !db.payments("k-lost").is_empty() {
                sim.hold("client", SERVER);
                held = true;
            }
            if held && !released && gave_up.get() {
                sim.release("client", SERVER);
                released = true;
            }
        });

        let (first, retry, listed) = seen.take().expect("the client finished");
        let retry = retry.expect("the retry settles");
        assert!(held, "seed {seed}: the payment never reached the database");
        assert!(
            first.is_err(),
            "seed {seed}: the answer should have been lost: {first:?}"
        );
        assert_eq!(retry.reply.status, 201, "seed {seed}");
        assert!(
            retry.reply.replayed(),
            "seed {seed}: the retry must be the replay"
        );
        assert_one_payment(&run, "k-lost", &retry.reply, listed.as_ref());
    }
}

/// Where a request is parked when the server dies.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Point {
    AfterClaim,
    BeforeCommit,
    AfterCommit,
}

impl Point {
    fn header(self) -> &'static str {
        match self {
            Point::AfterClaim => "after_claim=delay:60000",
            Point::BeforeCommit => "before_commit=delay:60000",
            Point::AfterCommit => "after_commit=delay:60000",
        }
    }

    /// Whether the database shows the request parked at this point.
    fn reached(self, db: &Db, key: &str) -> bool {
        match self {
            Point::AfterClaim | Point::BeforeCommit => {
                db.record_state(key).as_deref() == Some("in_flight")
            }
            Point::AfterCommit => !db.payments(key).is_empty(),
        }
    }
}

/// When the driver crashed and restarted the server, and what the database held at the crash.
#[derive(Debug, Default)]
struct Crash {
    at: Option<Duration>,
    downtime: Duration,
    payments_at_crash: Vec<String>,
}

/// Crashes the server a seeded moment after the request parks at `point`, then restarts it.
fn crash_while_parked(run: &mut Run, point: Point, rng: &mut StdRng) -> Crash {
    let linger = ms(rng.random_range(0..1_500));
    let downtime = ms(rng.random_range(0..3_000));
    let mut crash = Crash {
        downtime,
        ..Crash::default()
    };
    let mut parked_at = None;
    run.run(|sim, db| {
        let now = sim.elapsed();
        match (parked_at, crash.at) {
            (None, _) if point.reached(db, "k-crash") => parked_at = Some(now),
            (Some(parked), None) if now >= parked + linger => {
                crash.payments_at_crash = db.payments("k-crash");
                sim.crash(SERVER);
                crash.at = Some(now);
            }
            (Some(_), Some(at)) if now >= at + downtime && !sim.is_host_running(SERVER) => {
                sim.bounce(SERVER);
            }
            _ => {}
        }
    });
    crash
}

#[test]
fn a_crash_at_every_point_of_a_request_leaves_one_payment_after_the_restart() {
    for point in [Point::AfterClaim, Point::BeforeCommit, Point::AfterCommit] {
        for seed in seeds() {
            let mut rng = StdRng::seed_from_u64(seed);
            let mut run = Run::new(seed, turmoil::Builder::new().max_message_latency(ms(50)));
            let seen = Rc::new(RefCell::new(None));

            // The first attempt parks at the point; its connection dies with the process.
            let log = seen.clone();
            run.sim.client("client", async move {
                let parked = payment_request("k-crash", P1, Some(point.header()));
                let first = exchange(&parked, Duration::from_secs(120)).await;
                let settled = settle("k-crash", P1).await;
                let again = settle("k-crash", P1).await;
                let listed = listed_payment_ids("k-crash").await;
                *log.borrow_mut() = Some((first.map(|r| r.status), settled, again, listed));
                Ok(())
            });
            let crash = crash_while_parked(&mut run, point, &mut rng);

            let context = format!("seed {seed}, crash {point:?}");
            let (first, settled, again, listed) = seen.take().expect("the client finished");
            let crashed_at = crash
                .at
                .unwrap_or_else(|| panic!("{context}: never parked"));
            let settled = settled.unwrap_or_else(|| panic!("{context}: no final answer"));
            let again = again.unwrap_or_else(|| panic!("{context}: no second answer"));
            assert!(
                first.is_err(),
                "{context}: the parked attempt got {first:?}"
            );
            assert_eq!(settled.reply.status, 201, "{context}");
            assert_eq!(
                again.reply.body, settled.reply.body,
                "{context}: replays differ"
            );
            assert!(again.reply.replayed(), "{context}");
            assert_one_payment(&run, "k-crash", &settled.reply, listed.as_ref());
            if point == Point::AfterCommit {
                // The committed payment survives the crash and is what the retry gets back.
                assert!(settled.reply.replayed(), "{context}: not a replay");
                let id = settled.reply.payment_id();
                assert_eq!(crash.payments_at_crash, Vec::from_iter(id), "{context}");
            } else {
                assert!(
                    crash.payments_at_crash.is_empty(),
                    "{context}: paid before commit"
                );
                assert!(
                    !settled.reply.replayed(),
                    "{context}: nothing was stored to replay"
                );
            }

            // Lease recovery: once the server is back, the key frees up within the lease, and
            // the client notices within one retry interval (plus the wire and the in-flight
            // wait's polling).
            let recovery = crash.downtime.max(LEASE) + RETRY_INTERVAL + ms(500);
            let took = settled.at.saturating_sub(crashed_at);
            assert!(
                took <= recovery,
                "{context}: settled {took:?} after the crash"
            );
        }
    }
}

/// What one attempt of a concurrent client saw.
#[derive(Clone, Debug)]
struct Seen {
    key: usize,
    body: &'static str,
    reply: Option<Reply>,
}

const CLIENTS: usize = 4;
const KEYS: usize = 3;
const OPS_PER_CLIENT: usize = 6;

fn chaos_key(key: usize) -> String {
    format!("k-chaos-{key}")
}

/// A fault for one attempt, or none: every kind of in-flight window and failure the server has.
fn random_fault(rng: &mut StdRng) -> Option<String> {
    let delay_ms: u64 = rng.random_range(100..2_500);
    match rng.random_range(0..8) {
        0 => Some(format!("after_claim=delay:{delay_ms}")),
        1 => Some(format!("after_commit=delay:{delay_ms}")),
        2 => Some("before_commit=fail".to_owned()),
        3 => Some("after_commit=drop".to_owned()),
        _ => None,
    }
}

/// One concurrent client: a few operations on random keys, each retried until final.
///
/// Answers whether every operation got a final answer.
async fn chaos_client(seed: u64, index: usize, log: Rc<RefCell<Vec<Seen>>>) -> bool {
    let mut rng = StdRng::seed_from_u64(seed.wrapping_mul(1_000) + index as u64);
    let mut settled_all = true;
    for _ in 0..OPS_PER_CLIENT {
        let key = rng.random_range(0..KEYS);
        let body = if rng.random_bool(0.8) { P1 } else { P2 };
        let mut settled = false;
        for _ in 0..ATTEMPTS_MAX / 2 {
            let fault = random_fault(&mut rng);
            let request = payment_request(&chaos_key(key), body, fault.as_deref());
            let reply = exchange(&request, ms(2_500)).await.ok();
            settled = reply.as_ref().is_some_and(is_final);
            log.borrow_mut().push(Seen { key, body, reply });
            if settled {
                break;
            }
            tokio::time::sleep(RETRY_INTERVAL + ms(rng.random_range(0..200))).await;
        }
        settled_all &= settled;
    }
    settled_all
}

/// Cuts one client off for a while now and then, and on some seeds crashes the server once,
/// at the first moment after a seeded time when some key is in flight.
fn network_chaos(seed: u64) -> impl FnMut(&mut Sim<'static>, &Db) {
    let mut rng = StdRng::seed_from_u64(seed ^ 0x5eed);
    let crash_after = rng
        .random_bool(0.5)
        .then(|| ms(rng.random_range(200..4_000)));
    let mut bounce_at = None;
    let mut cut: Option<(String, Duration)> = None;
    move |sim, db| {
        let now = sim.elapsed();
        let crash_due = crash_after.is_some_and(|after| now >= after) && bounce_at.is_none();
        if crash_due && db.in_flight() > 0 {
            sim.crash(SERVER);
            bounce_at = Some(now + ms(rng.random_range(0..2_000)));
        }
        if bounce_at.is_some_and(|at| now >= at) && !sim.is_host_running(SERVER) {
            sim.bounce(SERVER);
        }
        match &cut {
            Some((client, until)) if now >= *until => {
                sim.repair(client.as_str(), SERVER);
                cut = None;
            }
            None if rng.random_bool(0.002) => {
                let client = format!("client-{}", rng.random_range(0..CLIENTS));
                sim.partition(client.as_str(), SERVER);
                cut = Some((client, now + ms(rng.random_range(300..3_000))));
            }
            _ => {}
        }
    }
}

#[test]
fn concurrent_retries_through_a_lossy_network_charge_each_key_at_most_once() {
    for seed in seeds() {
        let mut builder = turmoil::Builder::new();
        builder
            .max_message_latency(ms(60))
            .fail_rate(0.01)
            .repair_rate(0.3);
        let mut run = Run::new(seed, &mut builder);
        let log = Rc::new(RefCell::new(Vec::new()));
        let unsettled = Rc::new(Cell::new(0));

        for index in 0..CLIENTS {
            let (log, unsettled) = (log.clone(), unsettled.clone());
            run.sim.client(format!("client-{index}"), async move {
                if !chaos_client(seed, index, log).await {
                    unsettled.set(unsettled.get() + 1);
                }
                Ok(())
            });
        }
        run.run(network_chaos(seed));
        assert_eq!(
            unsettled.get(),
            0,
            "seed {seed}: a client never got a final answer"
        );

        // Audit through the API once the dust settles, on a healthy network.
        run.sim.set_fail_rate(0.0);
        let listed = Rc::new(RefCell::new(Vec::new()));
        let audit = listed.clone();
        run.sim.client("auditor", async move {
            for key in 0..KEYS {
                let ids = listed_payment_ids(&chaos_key(key)).await;
                audit.borrow_mut().push(ids);
            }
            Ok(())
        });
        run.run(|_, _| {});

        let (seen, listed) = (log.take(), listed.take());
        let statuses: Vec<u16> = seen
            .iter()
            .map(|s| s.reply.as_ref().map_or(0, |r| r.status))
            .collect();
        tracing::info!(seed, ?statuses, elapsed = ?run.sim.elapsed(), "chaos run");
        for (key, listed) in listed.iter().enumerate() {
            check_chaos_key(&run, key, &seen, listed.as_ref());
        }
    }
}

/// At most one payment for the key; every 201 for it byte-identical, for one body, naming that
/// payment.
fn check_chaos_key(run: &Run, key: usize, seen: &[Seen], listed: Option<&Vec<String>>) {
    let context = format!("seed {}, {}", run.seed, chaos_key(key));
    let rows = run.db.payments(&chaos_key(key));
    assert!(
        rows.len() <= 1,
        "{context}: {} payments in the database",
        rows.len()
    );
    assert_eq!(
        listed,
        Some(&rows),
        "{context}: the API lists other payments"
    );
    let successes: Vec<(&str, &Reply)> = seen
        .iter()
        .filter(|s| s.key == key)
        .filter_map(|s| s.reply.as_ref().map(|reply| (s.body, reply)))
        .filter(|(_, reply)| reply.status == 201)
        .collect();
    let Some((body, first)) = successes.first() else {
        return;
    };
    assert_eq!(
        rows,
        Vec::from_iter(first.payment_id()),
        "{context}: paid another"
    );
    for (other_body, reply) in &successes {
        assert_eq!(other_body, body, "{context}: both bodies got a 201");
        assert_eq!(
            reply.body, first.body,
            "{context}: two different 201 bodies"
        );
    }
}

fn ms(millis: u64) -> Duration {
    Duration::from_millis(millis)
}
