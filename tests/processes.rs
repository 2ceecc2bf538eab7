//! The real `oncepay` binary on a SQLite file: restarts, crashes at every step of a request,
//! SIGKILL under load, lease expiry and graceful shutdown, observed from outside like a client.

mod common;

use std::time::{Duration, Instant};

use common::{Server, fresh_key, http};
use reqwest::StatusCode;
use serde_json::Value;

const P1: &str = r#"{"amount": 1250, "currency": "EUR", "customer_id": "cus_001"}"#;
const ACME: &str = "Bearer sk_test_acme";
const KEYS: &str = "acme:sk_test_acme,globex:sk_test_globex";

struct Db {
    dir: tempfile::TempDir,
}

impl Db {
    fn new() -> Self {
        Db {
            dir: tempfile::tempdir().unwrap(),
        }
    }

    fn url(&self) -> String {
        format!("sqlite://{}", self.dir.path().join("oncepay.db").display())
    }

    /// Payments created with `key`, counted in the database itself.
    fn payments_with_key(&self, key: &str) -> i64 {
        let path = self.dir.path().join("oncepay.db");
        let connection = rusqlite::Connection::open(path).unwrap();
        connection
            .query_row(
                "select count(*) from payments where idempotency_key = ?1",
                [key],
                |r| r.get(0),
            )
            .unwrap()
    }

    fn start(&self, extra: &[&str]) -> Server {
        let url = self.url();
        let mut args = vec!["--database", &url, "--api-keys", KEYS];
        args.extend_from_slice(extra);
        Server::start(&args)
    }
}

struct Reply {
    status: StatusCode,
    replayed: bool,
    retry_after: Option<u64>,
    body: Vec<u8>,
}

impl Reply {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap()
    }
}

async fn pay(url: &str, key: &str, fault: Option<&str>) -> Result<Reply, reqwest::Error> {
    let mut request = http()
        .post(format!("{url}/v1/payments"))
        .header("authorization", ACME)
        .header("idempotency-key", key)
        .header("content-type", "application/json")
        .body(P1);
    if let Some(fault) = fault {
        request = request.header("oncepay-fault", fault);
    }
    let response = request.send().await?;
    let header = |name| {
        response
            .headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let replayed = header("idempotent-replayed").as_deref() == Some("true");
    let retry_after = header("retry-after").and_then(|v| v.parse().ok());
    let status = response.status();
    let body = response.bytes().await?.to_vec();
    Ok(Reply {
        status,
        replayed,
        retry_after,
        body,
    })
}

/// Retries like a careful client: on 409 it waits Retry-After, up to `budget`.
async fn pay_until_settled(url: &str, key: &str, budget: Duration) -> (Reply, Vec<u64>) {
    let deadline = Instant::now() + budget;
    let mut retry_afters = Vec::new();
    loop {
        let reply = pay(url, key, None)
            .await
            .expect("the restarted server answers");
        if reply.status != StatusCode::CONFLICT || Instant::now() > deadline {
            return (reply, retry_afters);
        }
        let wait = reply.retry_after.expect("a 409 carries Retry-After");
        retry_afters.push(wait);
        tokio::time::sleep(Duration::from_secs(wait).min(Duration::from_millis(500))).await;
    }
}

#[tokio::test]
async fn a_completed_payment_is_replayed_after_the_process_is_killed_and_restarted() {
    let db = Db::new();
    let key = fresh_key("restart");
    let mut server = db.start(&[]);
    let first = pay(&server.url, &key, None).await.unwrap();
    assert_eq!(first.status, StatusCode::CREATED);
    server.kill();

    let server = db.start(&[]);
    let replay = pay(&server.url, &key, None).await.unwrap();
    assert_eq!(
        (replay.status, replay.replayed),
        (StatusCode::CREATED, true)
    );
    assert_eq!(replay.body, first.body);
    assert_eq!(db.payments_with_key(&key), 1);
}

// Recovery that re-ran work of unknown outcome charged twice; a claim stuck after a crash left
// the key refused until its TTL.
#[tokio::test]
async fn a_crash_at_every_step_of_a_request_leaves_exactly_one_payment() {
    let db = Db::new();
    for point in ["after_claim", "before_commit", "after_commit"] {
        let key = fresh_key(point);
        let mut server = db.start(&["--enable-fault-injection", "--lease", "2s"]);
        let crashed = pay(&server.url, &key, Some(&format!("{point}=crash"))).await;
        assert!(
            crashed.is_err(),
            "{point}: the client sees the connection die"
        );
        assert!(
            server.wait_exit(Duration::from_secs(10)).is_some(),
            "{point}: the process died"
        );

        let server = db.start(&["--lease", "2s"]);
        let (settled, retry_afters) =
            pay_until_settled(&server.url, &key, Duration::from_secs(15)).await;
        assert_eq!(settled.status, StatusCode::CREATED, "{point}");
        assert!(
            retry_afters.iter().all(|s| (1..=2).contains(s)),
            "{point}: {retry_afters:?}"
        );
        if point == "after_commit" {
            assert!(
                settled.replayed,
                "the outcome committed before the crash is replayed"
            );
            assert!(retry_afters.is_empty(), "and at once");
        } else {
            assert!(
                !settled.replayed,
                "{point}: nothing committed, so this is the first execution"
            );
        }
        let again = pay(&server.url, &key, None).await.unwrap();
        assert!(again.replayed);
        assert_eq!(again.body, settled.body, "{point}: byte-identical");
        assert_eq!(
            db.payments_with_key(&key),
            1,
            "{point}: exactly one payment in the database"
        );
    }
}

// Leases shorter than the handler let a duplicate run the deposit again.
#[tokio::test]
async fn a_slow_live_owner_keeps_its_key_past_the_lease_and_the_late_retry_replays() {
    let db = Db::new();
    let server = db.start(&[
        "--enable-fault-injection",
        "--lease",
        "2s",
        "--in-flight-wait",
        "200ms",
    ]);
    let key = fresh_key("bc14");
    let url = server.url.clone();
    let slow_key = key.clone();
    let a = tokio::spawn(async move { pay(&url, &slow_key, Some("after_claim=delay:6000")).await });

    tokio::time::sleep(Duration::from_secs(3)).await;
    let b = pay(&server.url, &key, None).await.unwrap();
    assert_eq!(
        b.status,
        StatusCode::CONFLICT,
        "the owner renewed its lease, so no takeover"
    );
    assert!(matches!(b.retry_after, Some(1..=2)));

    let a = a.await.unwrap().unwrap();
    assert_eq!(a.status, StatusCode::CREATED);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let c = pay(&server.url, &key, None).await.unwrap();
    assert_eq!((c.status, c.replayed), (StatusCode::CREATED, true));
    assert_eq!(c.body, a.body);
    assert_eq!(db.payments_with_key(&key), 1);
}

// Mixed time units and skewed clocks made takeovers happen at once or never.
#[tokio::test]
async fn after_a_kill_the_key_is_taken_over_when_the_lease_ends_and_expires_after_retention() {
    let db = Db::new();
    // A short in-flight wait: a waiter that is still waiting when the lease ends takes over,
    // and this test wants to see the 409 that comes before that.
    let lease = [
        "--lease",
        "3s",
        "--retention",
        "10s",
        "--sweep-interval",
        "1s",
        "--in-flight-wait",
        "300ms",
    ];
    let mut server = db.start(&[&["--enable-fault-injection"][..], &lease[..]].concat());
    let key = fresh_key("bc15");
    let url = server.url.clone();
    let stuck_key = key.clone();
    let started = Instant::now();
    let stuck =
        tokio::spawn(async move { pay(&url, &stuck_key, Some("after_claim=delay:20000")).await });
    tokio::time::sleep(Duration::from_millis(500)).await;
    server.kill();
    assert!(stuck.await.unwrap().is_err());

    let server = db.start(&lease);
    tokio::time::sleep(Duration::from_secs(1).saturating_sub(started.elapsed())).await;
    let early = pay(&server.url, &key, None).await.unwrap();
    assert_eq!(
        early.status,
        StatusCode::CONFLICT,
        "no takeover before the lease ends"
    );
    assert!(
        matches!(early.retry_after, Some(1..=3)),
        "{:?}",
        early.retry_after
    );
    tokio::time::sleep(Duration::from_secs(4).saturating_sub(started.elapsed())).await;
    let late = pay(&server.url, &key, None).await.unwrap();
    assert_eq!(
        (late.status, late.replayed),
        (StatusCode::CREATED, false),
        "taken over after 3 s"
    );
    assert_eq!(db.payments_with_key(&key), 1);

    let kept = fresh_key("bc15b");
    let first = pay(&server.url, &kept, None).await.unwrap();
    let t0 = Instant::now();
    for at in [5, 9] {
        tokio::time::sleep(Duration::from_secs(at).saturating_sub(t0.elapsed())).await;
        let replay = pay(&server.url, &kept, None).await.unwrap();
        assert_eq!(
            (replay.replayed, replay.body.clone()),
            (true, first.body.clone()),
            "at {at}s"
        );
    }
    tokio::time::sleep(Duration::from_secs(12).saturating_sub(t0.elapsed())).await;
    let expired = pay(&server.url, &kept, None).await.unwrap();
    assert_eq!(expired.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(expired.json()["code"], "idempotency_key_expired");
    assert_eq!(expired.json()["payment_id"], first.json()["id"]);
    assert_eq!(db.payments_with_key(&kept), 1);
}

#[tokio::test]
async fn sigkill_under_load_loses_no_payment_and_doubles_none() {
    let db = Db::new();
    let mut server = db.start(&["--lease", "1s"]);
    let keys: Vec<String> = (0..40).map(|i| fresh_key(&format!("load{i}"))).collect();
    let url = server.url.clone();
    let senders: Vec<_> = keys
        .iter()
        .cloned()
        .map(|key| {
            let url = url.clone();
            tokio::spawn(async move {
                let mut bodies = Vec::new();
                for _ in 0..5 {
                    if let Ok(reply) = pay(&url, &key, None).await
                        && reply.status == StatusCode::CREATED
                    {
                        bodies.push(reply.body);
                    }
                }
                bodies
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(30)).await;
    server.kill();
    let mut seen: Vec<Vec<Vec<u8>>> = Vec::new();
    for sender in senders {
        seen.push(sender.await.unwrap());
    }

    let server = db.start(&["--lease", "1s"]);
    for (key, before) in keys.iter().zip(seen) {
        let (after, _) = pay_until_settled(&server.url, key, Duration::from_secs(10)).await;
        assert_eq!(after.status, StatusCode::CREATED, "{key}");
        for body in before {
            assert_eq!(
                body, after.body,
                "{key}: what a client saw before the kill is still the answer"
            );
        }
        assert_eq!(db.payments_with_key(key), 1, "{key}");
    }
}

#[tokio::test]
async fn http2_without_tls_replays_like_http1() {
    let db = Db::new();
    let server = db.start(&[]);
    let key = fresh_key("h2c");
    let first = pay(&server.url, &key, None).await.unwrap();
    let h2 = reqwest::Client::builder()
        .http2_prior_knowledge()
        .build()
        .unwrap();
    let response = h2
        .post(format!("{}/v1/payments", server.url))
        .header("authorization", ACME)
        .header("Idempotency-Key", &key)
        .header("content-type", "application/json")
        .body(P1)
        .send()
        .await
        .unwrap();
    assert_eq!(response.version(), reqwest::Version::HTTP_2);
    assert_eq!(response.headers()["idempotent-replayed"], "true");
    assert_eq!(response.bytes().await.unwrap().to_vec(), first.body);
}

#[tokio::test]
async fn sigterm_lets_the_running_request_finish_before_exiting() {
    let db = Db::new();
    let mut server = db.start(&["--enable-fault-injection"]);
    let key = fresh_key("term");
    let url = server.url.clone();
    let slow_key = key.clone();
    let slow =
        tokio::spawn(async move { pay(&url, &slow_key, Some("after_claim=delay:1500")).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let terminated = std::process::Command::new("kill")
        .args(["-TERM", &server.pid().to_string()])
        .status()
        .unwrap();
    assert!(terminated.success());

    let reply = slow
        .await
        .unwrap()
        .expect("the running request is answered");
    assert_eq!(reply.status, StatusCode::CREATED);
    let status = server
        .wait_exit(Duration::from_secs(10))
        .expect("the process exits");
    assert!(status.success(), "a graceful shutdown exits with 0");
    assert_eq!(db.payments_with_key(&key), 1);
}
