//! Several `oncepay serve` processes on one database: migrating at start-up, racing on one key
//! or one payment, and finishing through another process what a crashed one began.

use std::time::Duration;

use serde_json::json;

use crate::common::fresh_key;
use crate::harness::{
    Reply, TestDb, get, payment_body, post, retry_until_settled, run_oncepay, start_servers,
};

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
    // is shown on the store itself by `leases_are_judged_by_the_database_clock_...` in `store`.
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
