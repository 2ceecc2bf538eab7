//! What every test here stands on: a database of its own, `oncepay` processes on it, and
//! requests to them.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use sqlx::postgres::{PgConnection, PgPool};
use sqlx::{AssertSqlSafe, Connection};

use crate::common::{Server, http};

const ADMIN_URL_DEFAULT: &str = "postgres://postgres@127.0.0.1:5432/test";
const API_KEYS: &str = "acme:sk_test_acme,globex:sk_test_globex";
const ACME: &str = "sk_test_acme";

// ---------------------------------------------------------------------------------------------
// A database per test.

/// A database created for one test, dropped when the test ends however it ends.
pub(crate) struct TestDb {
    pub(crate) admin_url: String,
    name: String,
    /// The URL of this database.
    pub(crate) url: String,
    /// A pool on it, for checking rows directly.
    pub(crate) pool: PgPool,
}

impl TestDb {
    pub(crate) async fn create() -> TestDb {
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
    pub(crate) fn url_via(&self, proxy: SocketAddr) -> String {
        database_url(&self.admin_url, &self.name, Some(proxy))
    }

    /// Waits (up to ten seconds) until some process holds `key` in flight.
    pub(crate) async fn wait_for_claim(&self, key: &str) {
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
    pub(crate) async fn payments_for_key(&self, tenant: &str, key: &str) -> i64 {
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
pub(crate) fn start_servers(count: usize, url: &str, extra: &[&str]) -> Vec<Server> {
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
pub(crate) struct Exit {
    pub(crate) succeeded: bool,
    pub(crate) stderr: String,
}

/// Runs `oncepay` with `args` until it exits by itself, killing it (and failing) after `limit`.
pub(crate) fn run_oncepay(args: &[&str], limit: Duration) -> Exit {
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
pub(crate) struct Reply {
    pub(crate) status: u16,
    headers: reqwest::header::HeaderMap,
    pub(crate) body: Vec<u8>,
}

impl Reply {
    pub(crate) fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    pub(crate) fn replayed(&self) -> bool {
        self.header("idempotent-replayed") == Some("true")
    }

    pub(crate) fn json(&self) -> Value {
        serde_json::from_slice(&self.body).expect("the body is JSON")
    }

    pub(crate) fn retry_after_secs(&self) -> Option<u64> {
        self.header("retry-after").and_then(|v| v.parse().ok())
    }

    pub(crate) fn describe(&self) -> String {
        format!("{} {}", self.status, String::from_utf8_lossy(&self.body))
    }
}

/// POSTs `body` to `path` with `key`; `fault` goes into `Oncepay-Fault`.
pub(crate) async fn post(
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

pub(crate) async fn get(base: &str, path: &str) -> Reply {
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

pub(crate) fn payment_body(amount: i64, customer: &str) -> Value {
    json!({"amount": amount, "currency": "EUR", "customer_id": customer})
}

/// Retries `key` on `base` until the answer is neither 409 nor 503, within `limit`; every
/// answer on the way must be one of those two, with a `Retry-After`.
pub(crate) async fn retry_until_settled(
    base: &str,
    key: &str,
    body: &Value,
    limit: Duration,
) -> Reply {
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
