//! The PostgreSQL store, alone and under several real `oncepay serve` processes.
//!
//! Each test creates its own database on the server named by `ONCEPAY_TEST_PG_URL` (by default
//! `postgres://postgres@127.0.0.1:5432/test`, trust authentication) and drops it at the end. A
//! server that cannot be reached fails the tests: they never skip.

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use common::{Server, fresh_key, http};
use oncepay::store::postgres::{PostgresOptions, PostgresStore};
use oncepay_core::conformance::{Fixture, Stores, TheModel, cases};
use oncepay_core::engine::{Begin, Lease, Policy, RecordState, Scope, StoredResponse};
use oncepay_core::fingerprint::Fingerprint;
use oncepay_core::key::IdempotencyKey;
use oncepay_core::memory::MemoryStore;
use oncepay_core::store::{NewPayment, Store, StoreError};
use oncepay_core::time::{Clock, ManualClock, SystemClock, Timestamp};
use oncepay_core::wire::{
    Currency, CustomerId, MinorUnits, ObjectKind, Payment, PaymentId, PaymentStatus, RewardEntryId,
    TenantId,
};
use proptest::test_runner::{Config, FileFailurePersistence, TestRunner};
use proptest_state_machine::{ReferenceStateMachine, StateMachineTest};
use serde_json::{Value, json};
use sqlx::postgres::{PgConnection, PgPool};
use sqlx::{AssertSqlSafe, Connection};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

const ADMIN_URL_DEFAULT: &str = "postgres://postgres@127.0.0.1:5432/test";
const API_KEYS: &str = "acme:sk_test_acme,globex:sk_test_globex";
const ACME: &str = "sk_test_acme";

// ---------------------------------------------------------------------------------------------
// A database per test.

/// A database created for one test, dropped when the test ends however it ends.
struct TestDb {
    admin_url: String,
    name: String,
    /// The URL of this database.
    url: String,
    /// A pool on it, for checking rows directly.
    pool: PgPool,
}

impl TestDb {
    async fn create() -> TestDb {
        let admin_url =
            std::env::var("ONCEPAY_TEST_PG_URL").unwrap_or_else(|_| ADMIN_URL_DEFAULT.into());
        let mut admin = PgConnection::connect(&admin_url)
            .await
            .unwrap_or_else(|err| {
                panic!(
                    "PostgreSQL must be reachable at {admin_url} (set ONCEPAY_TEST_PG_URL): {err}"
                )
            });
        // Random ids mix cases; unquoted identifiers are folded to lower case anyway.
        let name = oncepay::ids::new_id("oncepay_t").to_ascii_lowercase();
        sqlx::raw_sql(AssertSqlSafe(format!("create database {name}")))
            .execute(&mut admin)
            .await
            .expect("the test role may create databases");
        let url = database_url(&admin_url, &name, None);
        let pool = PgPool::connect(&url).await.expect("the new database opens");
        TestDb {
            admin_url,
            name,
            url,
            pool,
        }
    }

    /// This database's URL reached through `proxy` instead of directly.
    fn url_via(&self, proxy: SocketAddr) -> String {
        database_url(&self.admin_url, &self.name, Some(proxy))
    }

    /// Waits (up to ten seconds) until some process holds `key` in flight.
    async fn wait_for_claim(&self, key: &str) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let in_flight: i64 = sqlx::query_scalar(
                "select count(*) from idempotency_records where key = $1 and state = 'in_flight'",
            )
            .bind(key)
            .fetch_one(&self.pool)
            .await
            .expect("records can be counted");
            if in_flight > 0 {
                return;
            }
            assert!(Instant::now() < deadline, "nobody claimed {key}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The number of payments `tenant` has under idempotency key `key`.
    async fn payments_for_key(&self, tenant: &str, key: &str) -> i64 {
        sqlx::query_scalar(
            "select count(*) from payments where tenant = $1 and idempotency_key = $2",
        )
        .bind(tenant)
        .bind(key)
        .fetch_one(&self.pool)
        .await
        .expect("payments can be counted")
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        // Drop cannot await: drop the database from a thread with a runtime of its own.
        let (admin_url, name) = (self.admin_url.clone(), self.name.clone());
        let dropped = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a runtime starts");
            runtime.block_on(async {
                let mut admin = PgConnection::connect(&admin_url).await?;
                let sql = format!("drop database if exists {name} with (force)");
                sqlx::raw_sql(AssertSqlSafe(sql)).execute(&mut admin).await
            })
        });
        if let Ok(Err(err)) = dropped.join() {
            eprintln!("could not drop test database {}: {err}", self.name);
        }
    }
}

/// `admin_url` with its database replaced by `name` and, optionally, its host and port by `addr`.
fn database_url(admin_url: &str, name: &str, addr: Option<SocketAddr>) -> String {
    let authority_start = admin_url.find("://").map_or(0, |i| i + 3);
    let rest = &admin_url[authority_start..];
    let authority_len = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(authority_len);
    let query = tail.find('?').map_or("", |i| &tail[i..]);
    let authority = match (addr, authority.rfind('@')) {
        (None, _) => authority.to_owned(),
        (Some(addr), Some(at)) => format!("{}{addr}", &authority[..=at]),
        (Some(addr), None) => addr.to_string(),
    };
    format!("{}{authority}/{name}{query}", &admin_url[..authority_start])
}

// ---------------------------------------------------------------------------------------------
// Servers and requests.

/// Starts `count` servers on `url` at the same moment, so that their start-up (migrations
/// included) races; returns once all of them listen.
fn start_servers(count: usize, url: &str, extra: &[&str]) -> Vec<Server> {
    let mut args = vec!["--database", url, "--api-keys", API_KEYS];
    args.extend_from_slice(extra);
    // Starting blocks until the process listens, so keep it off the async workers.
    tokio::task::block_in_place(|| {
        std::thread::scope(|threads| {
            let starting: Vec<_> = (0..count)
                .map(|_| threads.spawn(|| Server::start(&args)))
                .collect();
            starting
                .into_iter()
                .map(|thread| thread.join().expect("the server starts"))
                .collect()
        })
    })
}

/// How a run of `oncepay` ended.
struct Exit {
    succeeded: bool,
    stderr: String,
}

/// Runs `oncepay` with `args` until it exits by itself, killing it (and failing) after `limit`.
fn run_oncepay(args: &[&str], limit: Duration) -> Exit {
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_oncepay"))
        .args(args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("the oncepay binary starts");
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(status) = child.try_wait().expect("the process can be waited on") {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("oncepay {args:?} did not exit within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut stderr = String::new();
    if let Some(mut pipe) = child.stderr.take() {
        let _ = std::io::Read::read_to_string(&mut pipe, &mut stderr);
    }
    Exit {
        succeeded: status.success(),
        stderr,
    }
}

/// A response, fully read.
#[derive(Clone, Debug)]
struct Reply {
    status: u16,
    headers: reqwest::header::HeaderMap,
    body: Vec<u8>,
}

impl Reply {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    fn replayed(&self) -> bool {
        self.header("idempotent-replayed") == Some("true")
    }

    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).expect("the body is JSON")
    }

    fn retry_after_secs(&self) -> Option<u64> {
        self.header("retry-after").and_then(|v| v.parse().ok())
    }

    fn describe(&self) -> String {
        format!("{} {}", self.status, String::from_utf8_lossy(&self.body))
    }
}

/// POSTs `body` to `path` with `key`; `fault` goes into `Oncepay-Fault`.
async fn post(
    base: &str,
    path: &str,
    key: &str,
    body: &Value,
    fault: Option<&str>,
) -> reqwest::Result<Reply> {
    let mut request = http()
        .post(format!("{base}{path}"))
        .bearer_auth(ACME)
        .header("idempotency-key", key)
        .json(body);
    if let Some(fault) = fault {
        request = request.header("oncepay-fault", fault);
    }
    read(request.send().await?).await
}

async fn get(base: &str, path: &str) -> Reply {
    let response = http().get(format!("{base}{path}")).bearer_auth(ACME).send();
    read(response.await.expect("the GET is answered"))
        .await
        .expect("the GET body is read")
}

async fn read(response: reqwest::Response) -> reqwest::Result<Reply> {
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let body = response.bytes().await?.to_vec();
    Ok(Reply {
        status,
        headers,
        body,
    })
}

fn payment_body(amount: i64, customer: &str) -> Value {
    json!({"amount": amount, "currency": "EUR", "customer_id": customer})
}

/// Retries `key` on `base` until the answer is neither 409 nor 503, within `limit`; every
/// answer on the way must be one of those two, with a `Retry-After`.
async fn retry_until_settled(base: &str, key: &str, body: &Value, limit: Duration) -> Reply {
    let deadline = Instant::now() + limit;
    loop {
        let reply = post(base, "/v1/payments", key, body, None)
            .await
            .expect("the surviving server answers");
        if reply.status != 409 && reply.status != 503 {
            return reply;
        }
        let retry_after = reply.retry_after_secs();
        assert!(
            retry_after.is_some(),
            "no Retry-After on {}",
            reply.describe()
        );
        assert!(
            Instant::now() < deadline,
            "still {} after {limit:?}",
            reply.describe()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

// ---------------------------------------------------------------------------------------------
// A TCP proxy in front of PostgreSQL that a test can cut and restore.

/// Forwards connections to PostgreSQL until cut: then it closes every live connection and
/// hangs up on new ones at once, as a database host that went away would.
struct Proxy {
    addr: SocketAddr,
    open: Arc<AtomicBool>,
    cuts: watch::Sender<u64>,
    task: tokio::task::JoinHandle<()>,
}

impl Proxy {
    async fn start(target: SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("a port");
        let addr = listener.local_addr().expect("a bound address");
        let open = Arc::new(AtomicBool::new(true));
        let (cuts, _) = watch::channel(0);
        let task = tokio::spawn(accept_loop(listener, target, open.clone(), cuts.clone()));
        Proxy {
            addr,
            open,
            cuts,
            task,
        }
    }

    fn cut(&self) {
        self.open.store(false, Ordering::SeqCst);
        self.cuts.send_modify(|generation| *generation += 1);
    }

    fn restore(&self) {
        self.open.store(true, Ordering::SeqCst);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.cut();
        self.task.abort();
    }
}

async fn accept_loop(
    listener: TcpListener,
    target: SocketAddr,
    open: Arc<AtomicBool>,
    cuts: watch::Sender<u64>,
) {
    while let Ok((mut inbound, _)) = listener.accept().await {
        if !open.load(Ordering::SeqCst) {
            continue;
        }
        let mut cut = cuts.subscribe();
        tokio::spawn(async move {
            let Ok(mut outbound) = TcpStream::connect(target).await else {
                return;
            };
            tokio::select! {
                _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                _ = cut.changed() => {}
            }
        });
    }
}

/// Where the admin URL's PostgreSQL listens.
fn postgres_addr(admin_url: &str) -> SocketAddr {
    let options: sqlx::postgres::PgConnectOptions = admin_url.parse().expect("a valid URL");
    let host = match options.get_host() {
        "localhost" => "127.0.0.1",
        host => host,
    };
    format!("{host}:{}", options.get_port())
        .parse()
        .expect("the test server's host is an IP address or localhost")
}

// ---------------------------------------------------------------------------------------------
// Several processes on one database.

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn processes_starting_together_migrate_once_and_no_migrate_needs_a_current_schema() {
    let db = TestDb::create().await;
    let database = ["--database", db.url.as_str()];
    let serve_without_migrating = [
        &["serve", "--listen", "127.0.0.1:0", "--no-migrate"],
        &database[..],
    ]
    .concat();

    let refused = tokio::task::block_in_place(|| {
        run_oncepay(&serve_without_migrating, Duration::from_secs(20))
    });
    let servers = start_servers(3, &db.url, &[]);
    let migrate = [&["migrate"], &database[..]].concat();
    let migrated_again =
        tokio::task::block_in_place(|| run_oncepay(&migrate, Duration::from_secs(20)));
    let current = start_servers(1, &db.url, &["--no-migrate"]);

    assert!(
        !refused.succeeded,
        "--no-migrate refuses an unmigrated database"
    );
    assert!(
        refused.stderr.contains("oncepay migrate"),
        "{}",
        refused.stderr
    );
    assert_eq!(servers.len() + current.len(), 4, "every process started");
    assert!(migrated_again.succeeded, "{}", migrated_again.stderr);
    let versions: Vec<(i64, i64)> =
        sqlx::query_as("select version, count(*) from schema_migrations group by version")
            .fetch_all(&db.pool)
            .await
            .unwrap();
    assert_eq!(versions, vec![(1, 1)], "each migration applied once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn identical_requests_spread_over_three_processes_create_one_payment_per_key() {
    let db = TestDb::create().await;
    let servers = start_servers(3, &db.url, &[]);
    let keys: Vec<String> = (0..30).map(|_| fresh_key("storm")).collect();

    // Six identical requests per key, all at once, two to each process.
    let mut requests = Vec::new();
    for (k, key) in keys.iter().enumerate() {
        for copy in 0..6 {
            let base = servers[(k + copy) % 3].url.clone();
            let (key, body) = (
                key.clone(),
                payment_body(1_000 + k as i64, &format!("cus_{k}")),
            );
            requests.push(tokio::spawn(async move {
                let reply = post(&base, "/v1/payments", &key, &body, None).await;
                (key, reply.expect("every request is answered"))
            }));
        }
    }
    let mut replies = Vec::new();
    for request in requests {
        replies.push(request.await.expect("the request task ends"));
    }
    for (k, key) in keys.iter().enumerate() {
        let body = payment_body(1_000 + k as i64, &format!("cus_{k}"));
        let last = post(&servers[k % 3].url, "/v1/payments", key, &body, None).await;
        replies.push((key.clone(), last.expect("the last retry is answered")));
    }

    for key in &keys {
        let mine: Vec<&Reply> = replies
            .iter()
            .filter(|(k, _)| k == key)
            .map(|(_, r)| r)
            .collect();
        for reply in &mine {
            let in_use = reply.status == 409 && reply.retry_after_secs().is_some();
            assert!(reply.status == 201 || in_use, "{key}: {}", reply.describe());
        }
        let created: Vec<&&Reply> = mine.iter().filter(|r| r.status == 201).collect();
        let first_executions = created.iter().filter(|r| !r.replayed()).count();
        assert_eq!(first_executions, 1, "{key}: exactly one request executes");
        assert!(
            created.iter().all(|r| r.body == created[0].body),
            "{key}: replays differ"
        );

        let listed = get(
            &servers[2].url,
            &format!("/v1/payments?idempotency_key={key}"),
        )
        .await;
        let data = listed.json()["data"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        assert_eq!(data.len(), 1, "{key}: one payment listed");
        assert_eq!(data[0]["id"], created[0].json()["id"]);
        assert_eq!(
            db.payments_for_key("acme", key).await,
            1,
            "{key}: one payment row"
        );
    }
    let credits: Vec<i64> = sqlx::query_scalar(
        "select count(r.id) from payments p left join reward_entries r \
         on r.payment_id = p.id and r.source = 'payment' group by p.id",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert_eq!(
        credits,
        vec![1; keys.len()],
        "one reward credit per payment"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_refunds_through_three_processes_never_sum_above_the_amount() {
    let db = TestDb::create().await;
    let servers = start_servers(3, &db.url, &[]);
    let created = post(
        &servers[0].url,
        "/v1/payments",
        &fresh_key("pay"),
        &payment_body(10_000, "cus_r"),
        None,
    )
    .await
    .unwrap();
    assert_eq!(created.status, 201, "{}", created.describe());
    let payment_id = created.json()["id"].as_str().unwrap().to_owned();

    // Twenty-four refunds of 1000 under different keys: only ten fit in 10000.
    let path = format!("/v1/payments/{payment_id}/refunds");
    let mut requests = Vec::new();
    for i in 0..24 {
        let (base, path) = (servers[i % 3].url.clone(), path.clone());
        requests.push(tokio::spawn(async move {
            let key = fresh_key("refund");
            post(&base, &path, &key, &json!({"amount": 1_000}), None).await
        }));
    }
    let mut refunded = 0;
    for request in requests {
        let reply = request.await.unwrap().expect("every refund is answered");
        match reply.status {
            201 => refunded += reply.json()["amount"].as_i64().unwrap(),
            400 => assert_eq!(reply.json()["code"], "refund_exceeds_payment"),
            _ => panic!("unexpected {}", reply.describe()),
        }
    }

    assert_eq!(
        refunded, 10_000,
        "every refund that fits, and no more, succeeds"
    );
    let stored: i64 = sqlx::query_scalar(
        "select coalesce(sum(amount), 0)::bigint from refunds where payment_id = $1",
    )
    .bind(&payment_id)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(stored, 10_000);
    let payment = get(&servers[1].url, &format!("/v1/payments/{payment_id}"))
        .await
        .json();
    assert_eq!(payment["amount_refunded"], 10_000);
    let rewards = get(&servers[2].url, "/v1/customers/cus_r/rewards")
        .await
        .json();
    assert_eq!(
        rewards["points_balance"], 0,
        "every refund took its points back"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_crash_at_any_fault_point_is_resolved_through_another_process_with_one_payment() {
    let db = TestDb::create().await;
    let lease = ["--lease", "2s"];
    let survivor = start_servers(1, &db.url, &lease).remove(0);
    let faulty = start_servers(3, &db.url, &["--lease", "2s", "--enable-fault-injection"]);

    let points = ["after_claim", "before_commit", "after_commit"];
    let runs = points.into_iter().zip(faulty).map(|(point, mut victim)| {
        let survivor = survivor.url.clone();
        async move {
            let (key, body) = (fresh_key(point), payment_body(2_500, "cus_crash"));
            let fault = format!("{point}=crash");
            let crashed = post(&victim.url, "/v1/payments", &key, &body, Some(&fault)).await;
            assert!(
                crashed.is_err(),
                "{point}: the client sees the connection die"
            );
            let exit = tokio::task::block_in_place(|| victim.wait_exit(Duration::from_secs(5)));
            assert!(
                exit.is_some_and(|s| !s.success()),
                "{point}: the process aborted"
            );

            let settled = retry_until_settled(&survivor, &key, &body, Duration::from_secs(8)).await;
            (point, key, body, settled)
        }
    });
    let results = futures_join_all(runs).await;

    for (point, key, body, settled) in results {
        assert_eq!(settled.status, 201, "{point}: {}", settled.describe());
        let committed_before_crash = point == "after_commit";
        assert_eq!(
            settled.replayed(),
            committed_before_crash,
            "{point}: replay or first run"
        );
        let again = post(&survivor.url, "/v1/payments", &key, &body, None)
            .await
            .unwrap();
        assert!(
            again.replayed() && again.body == settled.body,
            "{point}: byte-identical replay"
        );
        assert_eq!(
            db.payments_for_key("acme", &key).await,
            1,
            "{point}: one payment"
        );
    }
}

/// Runs futures side by side and collects their outputs in order.
async fn futures_join_all<F>(futures: impl IntoIterator<Item = F>) -> Vec<F::Output>
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    let handles: Vec<_> = futures.into_iter().map(tokio::spawn).collect();
    let mut outputs = Vec::new();
    for handle in handles {
        outputs.push(handle.await.expect("the task ends"));
    }
    outputs
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_payment_made_on_one_instance_replays_on_another_and_keeps_its_fingerprint() {
    let db = TestDb::create().await;
    let servers = start_servers(2, &db.url, &[]);
    let (key, p1, p2) = (
        fresh_key("bc05"),
        payment_body(1_250, "cus_001"),
        payment_body(1_251, "cus_001"),
    );

    let first = post(&servers[0].url, "/v1/payments", &key, &p1, None)
        .await
        .unwrap();
    let replay = post(&servers[1].url, "/v1/payments", &key, &p1, None)
        .await
        .unwrap();
    let other = post(&servers[1].url, "/v1/payments", &key, &p2, None)
        .await
        .unwrap();

    assert_eq!(first.status, 201, "{}", first.describe());
    assert!(!first.replayed());
    assert_eq!(
        (replay.status, replay.replayed()),
        (201, true),
        "{}",
        replay.describe()
    );
    assert_eq!(replay.body, first.body, "the replay is byte-identical");
    assert_eq!(replay.header("location"), first.header("location"));
    assert_eq!(replay.header("content-type"), first.header("content-type"));
    assert_eq!(other.status, 422, "{}", other.describe());
    assert_eq!(other.json()["code"], "idempotency_key_reused");
    assert_eq!(db.payments_for_key("acme", &key).await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_duplicate_on_another_instance_never_takes_over_from_a_live_slow_owner() {
    let db = TestDb::create().await;
    let waiter =
        start_servers(1, &db.url, &["--lease", "3s", "--in-flight-wait", "300ms"]).remove(0);
    let owner = start_servers(1, &db.url, &["--lease", "3s", "--enable-fault-injection"]).remove(0);
    let (key, body) = (fresh_key("bc15"), payment_body(1_250, "cus_001"));

    // Both processes share this machine's clock; that a skewed process clock changes nothing
    // is shown on the store itself by `leases_are_judged_by_the_database_clock_...` below.
    // The owner runs for seven seconds, more than twice its lease, renewing it as it goes.
    let slow = {
        let (base, key, body) = (owner.url.clone(), key.clone(), body.clone());
        tokio::spawn(async move {
            post(
                &base,
                "/v1/payments",
                &key,
                &body,
                Some("after_claim=delay:7000"),
            )
            .await
        })
    };
    db.wait_for_claim(&key).await;
    let mut duplicates = Vec::new();
    for _ in 0..4 {
        duplicates.push(
            post(&waiter.url, "/v1/payments", &key, &body, None)
                .await
                .unwrap(),
        );
        tokio::time::sleep(Duration::from_millis(1_200)).await;
    }
    let original = slow.await.unwrap().expect("the slow owner answers");

    for duplicate in &duplicates {
        assert_eq!(
            duplicate.status,
            409,
            "no takeover: {}",
            duplicate.describe()
        );
        let retry_after = duplicate.retry_after_secs().expect("a Retry-After");
        assert!(
            (1..=3).contains(&retry_after),
            "Retry-After {retry_after} within the lease"
        );
    }
    assert_eq!((original.status, original.replayed()), (201, false));
    let replay = post(&waiter.url, "/v1/payments", &key, &body, None)
        .await
        .unwrap();
    assert_eq!(replay.body, original.body);
    assert_eq!(db.payments_for_key("acme", &key).await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn leases_are_judged_by_the_database_clock_whatever_each_process_clock_says() {
    let db = TestDb::create().await;
    let policy = Policy {
        lease: Duration::from_secs(30),
        ..Policy::default()
    };
    // Two processes' views of the database, one with its clock five minutes fast. They are
    // opened the way `oncepay serve` opens its store, so this is the server's own wiring.
    let skewed = Arc::new(ManualClock::new(SystemClock.now()));
    skewed.advance(Duration::from_secs(300));
    let fast = oncepay::store::open(&db.url, policy, skewed).await.unwrap();
    let honest = oncepay::store::open(&db.url, policy, Arc::new(SystemClock))
        .await
        .unwrap();
    let fingerprint = Fingerprint([7; 32]);

    let claimed_fast = fast
        .begin(&scope("fast-claims"), &fingerprint)
        .await
        .unwrap();
    let claimed_honest = honest
        .begin(&scope("honest-claims"), &fingerprint)
        .await
        .unwrap();
    let seen_by_honest = honest
        .begin(&scope("fast-claims"), &fingerprint)
        .await
        .unwrap();
    let seen_by_fast = fast
        .begin(&scope("honest-claims"), &fingerprint)
        .await
        .unwrap();

    assert!(matches!(claimed_fast, Begin::Execute(_)));
    assert!(matches!(claimed_honest, Begin::Execute(_)));
    for seen in [seen_by_honest, seen_by_fast] {
        let Begin::InFlight { retry_after_secs } = seen else {
            panic!("a live lease must be respected, got {seen:?}");
        };
        assert!(
            (29..=30).contains(&retry_after_secs),
            "Retry-After {retry_after_secs}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_unreachable_database_answers_503_and_the_same_server_recovers_without_a_restart() {
    let db = TestDb::create().await;
    let proxy = Proxy::start(postgres_addr(&db.admin_url)).await;
    let url = db.url_via(proxy.addr);
    let server = start_servers(1, &url, &["--lease", "2s", "--enable-fault-injection"]).remove(0);
    let body = payment_body(4_200, "cus_outage");
    let before = post(&server.url, "/v1/payments", &fresh_key("up"), &body, None)
        .await
        .unwrap();
    assert_eq!(before.status, 201, "{}", before.describe());

    // Cut: requests fail closed and leave nothing behind.
    proxy.cut();
    let key = fresh_key("down");
    for _ in 0..3 {
        let reply = post(&server.url, "/v1/payments", &key, &body, None)
            .await
            .unwrap();
        assert_eq!(reply.status, 503, "{}", reply.describe());
        assert_eq!(reply.json()["code"], "store_unavailable");
        assert!(reply.retry_after_secs().is_some_and(|s| s >= 1));
    }
    assert_eq!(get(&server.url, "/readyz").await.status, 503);
    let records: i64 =
        sqlx::query_scalar("select count(*) from idempotency_records where key = $1")
            .bind(&key)
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!((records, db.payments_for_key("acme", &key).await), (0, 0));

    // Restore: the same process serves again and the retry executes once.
    proxy.restore();
    let after = retry_until_settled(&server.url, &key, &body, Duration::from_secs(10)).await;
    assert_eq!(
        (after.status, after.replayed()),
        (201, false),
        "{}",
        after.describe()
    );
    assert_eq!(db.payments_for_key("acme", &key).await, 1);

    // A cut between the claim and the commit: the request fails, and once the database is back
    // the key is free again after its lease instead of staying in use.
    let key = fresh_key("mid");
    let doomed = {
        let (base, key, body) = (server.url.clone(), key.clone(), body.clone());
        tokio::spawn(async move {
            post(
                &base,
                "/v1/payments",
                &key,
                &body,
                Some("after_claim=delay:1500"),
            )
            .await
        })
    };
    db.wait_for_claim(&key).await;
    proxy.cut();
    let failed = doomed.await.unwrap().expect("the request is answered");
    assert_eq!(failed.status, 503, "{}", failed.describe());
    proxy.restore();
    let settled = retry_until_settled(&server.url, &key, &body, Duration::from_secs(10)).await;
    assert_eq!(
        (settled.status, settled.replayed()),
        (201, false),
        "{}",
        settled.describe()
    );
    assert_eq!(db.payments_for_key("acme", &key).await, 1);
}

// ---------------------------------------------------------------------------------------------
// The store itself, with a clock the test steps.

fn scope(key: &str) -> Scope {
    Scope {
        tenant: TenantId::from("acme"),
        key: IdempotencyKey::parse(key.as_bytes()).unwrap(),
    }
}

fn stored(body: &str) -> StoredResponse {
    StoredResponse {
        status: 201,
        content_type: "application/json".into(),
        location: None,
        body: body.as_bytes().to_vec(),
        resource_id: Some(format!("pay_{body}")),
    }
}

fn new_payment(lease: &Lease, id: &str) -> NewPayment {
    NewPayment {
        payment: Payment {
            id: PaymentId::from(id),
            object: ObjectKind,
            amount: MinorUnits(1_000),
            currency: Currency::from("EUR"),
            customer_id: CustomerId::from("cus_store"),
            description: None,
            metadata: Default::default(),
            status: PaymentStatus::Succeeded,
            amount_refunded: MinorUnits(0),
            reward_points: 10,
            idempotency_key: lease.scope.key.as_str().to_owned(),
            created_at: lease.claimed_at,
        },
        reward_entry_id: RewardEntryId(format!("rwd_{id}")),
    }
}

fn execute(begin: Begin) -> Lease {
    match begin {
        Begin::Execute(lease) => lease,
        other => panic!("expected to execute, got {other:?}"),
    }
}

async fn stepped_store(db: &TestDb) -> (PostgresStore, Arc<ManualClock>) {
    let clock = Arc::new(ManualClock::new(Timestamp(1_796_378_400_000)));
    let policy = Policy {
        lease: Duration::from_secs(3),
        retention: Duration::from_secs(10),
        tombstone_retention: Duration::from_secs(20),
    };
    let injected: Arc<dyn Clock> = clock.clone();
    let options = PostgresOptions::default();
    let store = PostgresStore::connect(&db.url, &options, policy, Some(injected)).await;
    (store.expect("the store connects"), clock)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_store_claims_waits_fences_and_replays_as_the_state_machine_says() {
    let db = TestDb::create().await;
    let (store, clock) = stepped_store(&db).await;
    let (a, fp, other_fp) = (scope("a"), Fingerprint([1; 32]), Fingerprint([2; 32]));

    let first = execute(store.begin(&a, &fp).await.unwrap());
    let waiting = store.begin(&a, &fp).await.unwrap();
    let reused = store.begin(&a, &other_fp).await.unwrap();
    clock.advance(Duration::from_secs(3));
    let second = execute(store.begin(&a, &fp).await.unwrap());

    assert!(!first.took_over);
    assert_eq!(
        waiting,
        Begin::InFlight {
            retry_after_secs: 3
        }
    );
    assert_eq!(reused, Begin::Reused);
    assert!(second.took_over && second.token > first.token);
    assert_eq!(
        second.claimed_at, first.claimed_at,
        "a takeover continues the same attempt"
    );

    // The displaced owner can neither commit, renew nor release.
    let zombie = store.create_payment(&first, new_payment(&first, "pay_zombie"), stored("zombie"));
    assert!(matches!(zombie.await, Err(StoreError::Fenced(_))));
    assert!(matches!(
        store.complete(&first, stored("z")).await,
        Err(StoreError::Fenced(_))
    ));
    assert!(matches!(
        store.renew(&first).await,
        Err(StoreError::Fenced(_))
    ));
    store.release(&first).await.unwrap();
    let record = store.record(&a).await.unwrap().expect("the record stays");
    assert_eq!(
        record.token, second.token,
        "a stale release changes nothing"
    );

    // The owner renews, commits once, and every later request replays.
    let renewed = store.renew(&second).await.unwrap();
    assert_eq!(renewed, clock.now().plus(Duration::from_secs(3)));
    let payment = new_payment(&second, "pay_a");
    store
        .create_payment(&second, payment, stored("a"))
        .await
        .unwrap();
    assert_eq!(
        store.begin(&a, &fp).await.unwrap(),
        Begin::Replay(stored("a"))
    );
    assert_eq!(store.begin(&a, &other_fp).await.unwrap(), Begin::Reused);
    assert_eq!(db.payments_for_key("acme", "a").await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_store_releases_refuses_second_side_effects_and_sweeps_by_retention() {
    let db = TestDb::create().await;
    let (store, clock) = stepped_store(&db).await;
    let (b, c, d, fp) = (scope("b"), scope("c"), scope("d"), Fingerprint([3; 32]));

    // A released key executes afresh.
    let released = execute(store.begin(&b, &fp).await.unwrap());
    store.release(&released).await.unwrap();
    assert_eq!(store.record(&b).await.unwrap(), None);
    let again = execute(store.begin(&b, &fp).await.unwrap());
    assert!(!again.took_over);
    store.complete(&again, stored("b")).await.unwrap();

    // A payment that already exists for the attempt is refused and nothing is committed.
    let lease_d = execute(store.begin(&d, &fp).await.unwrap());
    sqlx::query(
        "insert into payments (tenant, id, idempotency_key, claimed_at_ms, amount, currency, \
         customer_id, metadata, status, amount_refunded, reward_points, created_at_ms) \
         values ('acme', 'pay_earlier', 'd', $1, 1000, 'EUR', 'cus_store', '{}', 'succeeded', \
         0, 10, $1)",
    )
    .bind(lease_d.claimed_at.as_millis() as i64)
    .execute(&db.pool)
    .await
    .unwrap();
    let duplicate = store.create_payment(&lease_d, new_payment(&lease_d, "pay_d"), stored("d"));
    assert!(matches!(
        duplicate.await,
        Err(StoreError::DuplicateSideEffect)
    ));
    let record_d = store.record(&d).await.unwrap().unwrap();
    assert!(matches!(record_d.state, RecordState::InFlight { .. }));

    // An abandoned claim goes a retention after its lease; a completion becomes a tombstone
    // after its retention and goes after the tombstone's.
    let _abandoned = execute(store.begin(&c, &fp).await.unwrap());
    clock.advance(Duration::from_secs(10));
    let expired = store.begin(&b, &fp).await.unwrap();
    let first_sweep = store.sweep().await.unwrap();
    let tombstone = store.record(&b).await.unwrap().unwrap();
    clock.advance(Duration::from_secs(3));
    let second_sweep = store.sweep().await.unwrap();
    clock.advance(Duration::from_secs(20));
    let last_sweep = store.sweep().await.unwrap();

    assert_eq!(
        expired,
        Begin::Expired {
            resource_id: Some("pay_b".into())
        }
    );
    assert_eq!((first_sweep.tombstoned, first_sweep.deleted), (1, 0));
    assert!(matches!(
        tombstone.state,
        RecordState::Tombstone {
            response_status: 201,
            ..
        }
    ));
    assert_eq!(
        (second_sweep.tombstoned, second_sweep.deleted),
        (0, 2),
        "c and d abandoned"
    );
    assert_eq!((last_sweep.tombstoned, last_sweep.deleted), (0, 1));
    assert_eq!(store.record(&b).await.unwrap(), None);
    assert!(!execute(store.begin(&b, &fp).await.unwrap()).took_over);
}

// ---------------------------------------------------------------------------------------------
// The shared conformance suite: the reference model's random sequences, run on the PostgreSQL
// store and the in-memory store in lockstep.

/// The database the conformance fixture works in; the test that owns it sets it.
static CONFORMANCE_URL: OnceLock<String> = OnceLock::new();

/// The PostgreSQL store on an emptied database, beside the in-memory store, on one clock.
struct Postgres {
    stores: Vec<(&'static str, Arc<dyn Store>)>,
    /// Declared last so it outlives the stores' connections.
    runtime: tokio::runtime::Runtime,
}

impl Fixture for Postgres {
    fn open(clock: Arc<ManualClock>) -> Self {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime starts");
        let url = CONFORMANCE_URL.get().expect("the test set the database");
        let clock: Arc<dyn Clock> = clock;
        let policy = oncepay_core::conformance::policy();
        let options = PostgresOptions {
            pool_size: 2,
            migrate: true,
        };
        let postgres = runtime.block_on(async {
            // Each sequence starts from an empty database, as the model does.
            let mut connection = PgConnection::connect(url)
                .await
                .expect("the database opens");
            sqlx::query("truncate reward_entries, refunds, payments, idempotency_records")
                .execute(&mut connection)
                .await
                .expect("the tables empty");
            PostgresStore::connect(url, &options, policy, Some(clock.clone())).await
        });
        let stores: Vec<(&'static str, Arc<dyn Store>)> = vec![
            ("memory", Arc::new(MemoryStore::new(policy, clock, 4))),
            ("postgres", Arc::new(postgres.expect("the store connects"))),
        ];
        Postgres { stores, runtime }
    }

    fn stores(&self) -> &[(&'static str, Arc<dyn Store>)] {
        &self.stores
    }

    fn block_on<T>(&self, future: impl Future<Output = T>) -> T {
        self.runtime.block_on(future)
    }
}

#[test]
fn the_postgres_store_gives_the_reference_models_answer_at_every_step() {
    let setup = tokio::runtime::Runtime::new().expect("a runtime starts");
    let db = setup.block_on(TestDb::create());
    setup.block_on(async {
        // Migrate once here, so that the first sequence does not pay for it.
        let options = PostgresOptions::default();
        let policy = Policy::default();
        PostgresStore::connect(&db.url, &options, policy, None)
            .await
            .expect("migrated");
    });
    CONFORMANCE_URL.set(db.url.clone()).expect("set once");
    // Fewer sequences than the in-process stores run: each step is a few database round trips.
    let config = Config {
        cases: cases(64),
        failure_persistence: Some(Box::new(FileFailurePersistence::Direct(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/proptest-regressions/postgres.txt"
        )))),
        ..Config::default()
    };

    let mut runner = TestRunner::new(config.clone());
    let outcome = runner.run(
        &TheModel::sequential_strategy(1..48),
        |(initial, steps, seen)| {
            Stores::<Postgres>::test_sequential(config.clone(), initial, steps, seen);
            Ok(())
        },
    );

    if let Err(failure) = outcome {
        panic!("the PostgreSQL store left the model: {failure}");
    }
}
