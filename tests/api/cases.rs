//! Faults that real idempotency layers shipped with, each reproduced against both in-process
//! stores. Every test is named after the fault it guards against; its first comment says what
//! broke elsewhere.

use std::time::Duration;

use axum::body::Body;
use axum::http::StatusCode;
use futures_util::stream;
use serde_json::{Value, json};

use crate::harness::*;

// A claim that was not atomic let two racing requests with one key both run, the later one
// overwriting the earlier.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn racing_requests_with_one_key_and_different_bodies_execute_once() {
    for kind in KINDS {
        let service = Harness::new(kind);
        for round in 0..50 {
            let key = fresh(&format!("bc02-{round}"));
            let (a, b) = tokio::join!(
                service.pay_with_fault(&key, P1, "after_claim=delay:20"),
                service.pay_with_fault(&key, P2, "after_claim=delay:20"),
            );
            let created: Vec<&Reply> = [&a, &b].into_iter().filter(|r| r.status == 201).collect();
            assert_eq!(
                created.len(),
                1,
                "{kind:?}: exactly one of A/B is 201: {a:?} {b:?}"
            );
            let loser = if a.status == 201 { &b } else { &a };
            assert!(
                [StatusCode::CONFLICT, StatusCode::UNPROCESSABLE_ENTITY].contains(&loser.status),
                "{kind:?}: the loser gets 409 or 422, got {}",
                loser.status
            );
            let winner_amount = created[0].json()["amount"].as_i64().unwrap();
            let winner_body = if winner_amount == 1250 { P1 } else { P2 };
            let loser_body = if winner_amount == 1250 { P2 } else { P1 };
            assert_eq!(service.payments_with_key(ACME, &key).await.len(), 1);
            let again = service.pay(&key, winner_body).await;
            assert_eq!(
                (again.status, again.replayed()),
                (StatusCode::CREATED, true)
            );
            assert_eq!(again.body, created[0].body);
            assert_eq!(service.pay(&key, loser_body).await.status, 422);
        }
        // No request ever executed beside a live owner: no commit was fenced off.
        assert_eq!(service.outcome_count("fenced").await, 0, "{kind:?}");
        assert_eq!(service.outcome_count("takeover").await, 0, "{kind:?}");
    }
}

// Layers that cached every answer made a transient failure permanent; layers that cached
// nothing re-ran work that had already committed.
#[tokio::test]
async fn a_failure_before_the_commit_releases_the_key_and_one_after_it_changes_nothing() {
    for kind in KINDS {
        let service = Harness::new(kind);
        for point in ["after_claim", "before_commit"] {
            let key = fresh(point);
            let failed = service
                .pay_with_fault(&key, P1, &format!("{point}=fail"))
                .await;
            assert_eq!(
                (failed.status.as_u16(), failed.code()),
                (500, "internal_error".into())
            );
            assert_eq!(
                service.payments_with_key(ACME, &key).await.len(),
                0,
                "{kind:?} {point}"
            );
            let retry = service.pay(&key, P1).await;
            assert_eq!(
                (retry.status, retry.replayed()),
                (StatusCode::CREATED, false),
                "{kind:?} {point}"
            );
        }
        let key = fresh("after_commit");
        let failed = service.pay_with_fault(&key, P1, "after_commit=fail").await;
        assert_eq!(failed.status, 500);
        let retry = service.pay(&key, P1).await;
        assert_eq!(
            (retry.status, retry.replayed()),
            (StatusCode::CREATED, true),
            "{kind:?}"
        );
        assert_eq!(service.payments_with_key(ACME, &key).await.len(), 1);
    }
}

// Hashes that depended on key order, whitespace or escapes turned honest retries into
// mismatches; nested objects had to be canonicalised too.
#[tokio::test]
async fn the_same_json_written_differently_replays_the_original() {
    for kind in KINDS {
        let service = Harness::new(kind);
        let key = fresh("bc03");
        let first = service
            .pay(&key, r#"{"amount":1250,"currency":"EUR","customer_id":"cus_001","metadata":{"a":"1","b":"2"}}"#)
            .await;
        assert_eq!(first.status, 201);
        for same in [
            r#"{"customer_id":"cus_001","currency":"EUR","amount":1250,"metadata":{"a":"1","b":"2"}}"#,
            "{\n\t\"amount\" :  1250,\r\n  \"currency\":\"EUR\", \"customer_id\" : \"cus_001\",\n\"metadata\":{\"a\":\"1\",\"b\":\"2\"}\n}",
            r#"{"amount":1250,"currency":"\u0045UR","customer_id":"cus_001","metadata":{"a":"1","b":"2"}}"#,
            r#"{"amount":1250,"currency":"EUR","customer_id":"cus_001","metadata":{"b":"2","a":"1"}}"#,
        ] {
            let replay = service.pay(&key, same).await;
            assert_eq!(replay.status, 201, "{kind:?}: {same}");
            assert!(replay.replayed(), "{kind:?}: {same}");
            assert_eq!(
                replay.body, first.body,
                "{kind:?}: byte-identical for {same}"
            );
        }
        let duplicated = r#"{"amount":1,"amount":1250,"currency":"EUR","customer_id":"cus_001"}"#;
        let refused = service.pay(&key, duplicated).await;
        assert_eq!(refused.status, 400);
        assert_eq!(refused.json()["errors"][0]["field"], "amount");
        assert!(!refused.replayed());
        assert_eq!(service.payments_with_key(ACME, &key).await.len(), 1);
    }
}

// A completion that rewrote the record without its fingerprint made the next identical request
// fail validation once the warm cache was gone.
#[tokio::test]
async fn the_fingerprint_survives_a_restart_so_honest_retries_replay() {
    let service = Harness::new(Kind::Sqlite);
    let key = fresh("bc05");
    let first = service.pay(&key, P1).await;
    assert_eq!(first.status, 201);

    let restarted = service.restarted();
    let replay = restarted.pay(&key, P1).await;
    assert_eq!(
        (replay.status, replay.replayed()),
        (StatusCode::CREATED, true)
    );
    assert_eq!(replay.body, first.body);
    assert_eq!(restarted.pay(&key, P2).await.status, 422);
    assert_eq!(restarted.payments_with_key(ACME, &key).await.len(), 1);
}

fn large_body() -> String {
    let metadata: serde_json::Map<String, Value> = (0..20)
        .map(|i| (format!("field_{i:02}"), json!("x".repeat(500))))
        .collect();
    json!({"amount": 1250, "currency": "EUR", "customer_id": "cus_001",
        "description": "d".repeat(500), "metadata": metadata})
    .to_string()
}

// Large bodies were hashed after a partial read, so identical requests got different
// fingerprints and the first response was never found.
#[tokio::test]
async fn a_large_body_sent_in_chunks_replays_and_an_oversized_one_leaves_no_trace() {
    for kind in KINDS {
        let service = Harness::new(kind);
        let key = fresh("bc06");
        let body = large_body();
        let first = service.pay(&key, &body).await;
        assert_eq!(
            first.status,
            201,
            "{kind:?}: {}",
            String::from_utf8_lossy(&first.body)
        );

        let chunks: Vec<Result<Vec<u8>, std::io::Error>> = body
            .as_bytes()
            .chunks(1024)
            .map(|c| Ok(c.to_vec()))
            .collect();
        let chunked = post("/v1/payments", ACME, Some(&key), "")
            .body(Body::from_stream(stream::iter(chunks)))
            .unwrap();
        let replay = service.send(chunked).await;
        assert_eq!(
            (replay.status, replay.replayed()),
            (StatusCode::CREATED, true)
        );
        assert_eq!(replay.body, first.body);

        let oversized = format!(
            r#"{{"amount":1250,"currency":"EUR","customer_id":"cus_001","description":"{}"}}"#,
            "x".repeat(2 << 20)
        );
        let too_large = service.pay(&key, &oversized).await;
        assert_eq!(too_large.status, 413, "{kind:?}");
        assert_eq!(too_large.code(), "payload_too_large");
        assert_eq!(
            service.pay(&key, P1).await.status,
            422,
            "the 413 did not rebind the key"
        );
        assert_eq!(service.payments_with_key(ACME, &key).await.len(), 1);
    }
}

// Every status below 500 was cached, so a 400 for bad input blocked the corrected retry.
#[tokio::test]
async fn validation_errors_are_not_stored_so_the_corrected_request_executes() {
    for kind in KINDS {
        let service = Harness::new(kind);
        let key = fresh("bc08");
        let negative = service
            .pay(
                &key,
                r#"{"amount": -5, "currency": "EUR", "customer_id": "cus_001"}"#,
            )
            .await;
        assert_eq!(negative.status, 400);
        assert_eq!(negative.json()["errors"][0]["field"], "amount");
        let bad_currency = service
            .pay(
                &key,
                r#"{"amount":1250,"currency":"EURO","customer_id":"cus_001"}"#,
            )
            .await;
        assert_eq!(bad_currency.status, 400);
        assert_eq!(bad_currency.json()["errors"][0]["field"], "currency");
        let status = service
            .get(&format!("/v1/idempotency-keys/{}", encode(&key)), ACME)
            .await;
        assert_eq!(status.status, 404, "{kind:?}: nothing stored for the key");

        let first = service.pay(&key, P1).await;
        assert_eq!(
            (first.status, first.replayed()),
            (StatusCode::CREATED, false)
        );
        let replay = service.pay(&key, P1).await;
        assert_eq!(
            (replay.status, replay.replayed()),
            (StatusCode::CREATED, true)
        );
        assert_eq!(service.payments_with_key(ACME, &key).await.len(), 1);
    }
}

// SDKs reused a key across endpoints and layers keyed records without the operation, so
// two operations collided.
#[tokio::test]
async fn a_key_used_on_another_endpoint_or_query_is_rejected_not_replayed() {
    for kind in KINDS {
        let service = Harness::new(kind);
        let key = fresh("bc10");
        let payment = service.pay(&key, P1).await.json();
        let id = payment["id"].as_str().unwrap();

        let refund_path = format!("/v1/payments/{id}/refunds");
        let refund = service
            .post(&refund_path, ACME, Some(&key), r#"{"amount":1250}"#)
            .await;
        assert_eq!(refund.status, 422, "{kind:?}");
        assert_eq!(refund.code(), "idempotency_key_reused");
        assert!(!refund.replayed());
        let with_query = service
            .post("/v1/payments?capture=false", ACME, Some(&key), P1)
            .await;
        assert_eq!(with_query.status, 422);

        let after = service
            .get(&format!("/v1/payments/{id}"), ACME)
            .await
            .json();
        assert_eq!(after["amount_refunded"], 0, "no refund was created");
        assert_eq!(service.payments_with_key(ACME, &key).await.len(), 1);
    }
}

// Replays came back as 200 instead of 201, wrapped in a framework envelope, or not at all.
#[tokio::test]
async fn a_replay_is_the_original_snapshot_after_a_state_change_and_a_restart() {
    let service = Harness::new(Kind::Sqlite);
    let key = fresh("bc11");
    let first = service.pay(&key, P1).await;
    let id = first.json()["id"].as_str().unwrap().to_owned();

    service.advance(Duration::from_secs(2));
    let later = service.pay(&key, P1).await;
    assert_eq!(
        (later.status, later.replayed()),
        (StatusCode::CREATED, true)
    );
    assert_eq!(later.body, first.body);

    let refund = service
        .post(
            &format!("/v1/payments/{id}/refunds"),
            ACME,
            Some(&fresh("r")),
            r#"{"amount":500}"#,
        )
        .await;
    assert_eq!(refund.status, 201);
    let after_refund = service.pay(&key, P1).await;
    assert_eq!(
        after_refund.body, first.body,
        "the replay is the original snapshot"
    );
    let current = service
        .get(&format!("/v1/payments/{id}"), ACME)
        .await
        .json();
    assert_eq!(
        current["amount_refunded"], 500,
        "the current state is read with GET"
    );

    let restarted = service.restarted();
    let after_restart = restarted.pay(&key, P1).await;
    assert_eq!(
        (after_restart.status, after_restart.body.clone()),
        (StatusCode::CREATED, first.body.clone())
    );
    assert!(after_restart.replayed());
    assert_eq!(restarted.payments_with_key(ACME, &key).await.len(), 1);
}

// A replayed 201 lost its Location; other layers replayed per-exchange headers.
#[tokio::test]
async fn a_replay_restores_location_and_content_type_with_a_fresh_request_id() {
    for kind in KINDS {
        let service = Harness::new(kind);
        let key = fresh("bc12");
        let first = service.pay(&key, P1).await;
        let id = first.json()["id"].as_str().unwrap().to_owned();
        assert_eq!(
            first.header("location"),
            Some(&*format!("/v1/payments/{id}"))
        );
        assert_eq!(first.header("content-type"), Some("application/json"));
        assert_eq!(first.header("idempotent-replayed"), None);

        let replay = service.pay(&key, P1).await;
        assert_eq!(replay.header("location"), first.header("location"));
        assert_eq!(replay.header("content-type"), first.header("content-type"));
        assert_eq!(replay.header("idempotent-replayed"), Some("true"));
        assert_ne!(replay.header("x-request-id"), first.header("x-request-id"));
        assert!(replay.header("x-request-id").is_some());
        assert_eq!(replay.header("set-cookie"), None);
        let length: usize = replay.header("content-length").unwrap().parse().unwrap();
        assert_eq!(length, replay.body.len());
    }
}

// Clients and HTTP/2 paths changed the header name's case; key values stayed opaque.
#[tokio::test]
async fn the_header_name_is_case_insensitive_but_the_key_value_is_exact() {
    for kind in KINDS {
        let service = Harness::new(kind);
        let key = fresh("BC19");
        let lower = post("/v1/payments", ACME, None, "")
            .header("idempotency-key", &key)
            .body(Body::from(P1))
            .unwrap();
        let first = service.send(lower).await;
        assert_eq!(first.status, 201);
        let upper = post("/v1/payments", ACME, None, "")
            .header("IDEMPOTENCY-KEY", &key)
            .body(Body::from(P1))
            .unwrap();
        let replay = service.send(upper).await;
        assert!(replay.replayed());
        assert_eq!(replay.body, first.body);

        let other_case = service.pay(&key.to_lowercase(), P1).await;
        assert_eq!(
            (other_case.status, other_case.replayed()),
            (StatusCode::CREATED, false)
        );
        assert_eq!(service.all_payments(ACME).await.len(), 2);
    }
}

// Records were purged while in flight or overwritten after expiry, charging twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn after_retention_a_tombstone_refuses_the_retry_and_running_keys_are_never_purged() {
    for kind in KINDS {
        // A lease longer than the retention: the sweeper must still leave a running key alone.
        let policy = oncepay_core::engine::Policy {
            lease: Duration::from_secs(30),
            ..test_policy()
        };
        let service = Harness::with(kind, policy, test_config());
        let key = fresh("bc20");
        let first = service.pay(&key, P1).await;
        let id = first.json()["id"].as_str().unwrap().to_owned();

        service.advance(Duration::from_secs(9));
        service.store.sweep().await.unwrap();
        let inside = service.pay(&key, P1).await;
        assert_eq!(
            (inside.replayed(), inside.body.clone()),
            (true, first.body.clone())
        );

        service.advance(Duration::from_secs(6));
        service.store.sweep().await.unwrap();
        let late = service.pay(&key, P1).await;
        assert_eq!(late.status, 422, "{kind:?}");
        assert_eq!(late.code(), "idempotency_key_expired");
        assert_eq!(late.json()["payment_id"], id.as_str());
        assert_eq!(service.payments_with_key(ACME, &key).await.len(), 1);

        let running = fresh("bc20b");
        let slow = {
            let service_router = service.router.clone();
            let request = post("/v1/payments", ACME, Some(&running), P1)
                .header("oncepay-fault", "after_claim=delay:1500")
                .body(Body::from(P1))
                .unwrap();
            tokio::spawn(async move { tower::ServiceExt::oneshot(service_router, request).await })
        };
        tokio::time::sleep(Duration::from_millis(200)).await;
        service.advance(Duration::from_secs(12));
        service.store.sweep().await.unwrap();
        let duplicate = service.pay(&running, P1).await;
        assert_eq!(
            duplicate.status, 409,
            "{kind:?}: the running key was not purged"
        );
        assert!(duplicate.header("retry-after").is_some());
        let original = slow.await.unwrap().unwrap();
        assert_eq!(original.status(), 201);
        assert_eq!(service.payments_with_key(ACME, &running).await.len(), 1);
    }
}

// Floats for money changed bytes between serialisations; the amount must be an exact integer.
#[tokio::test]
async fn amounts_that_are_not_exact_integers_are_refused_and_leave_the_key_free() {
    for kind in KINDS {
        let service = Harness::new(kind);
        let key = fresh("bc21");
        for amount in ["1250.0", "1.25e3", "\"1250\"", "12.5"] {
            let body =
                format!(r#"{{"amount": {amount}, "currency": "EUR", "customer_id": "cus_001"}}"#);
            let reply = service.pay(&key, &body).await;
            assert_eq!(reply.status, 400, "{kind:?}: {amount}");
            assert_eq!(reply.json()["errors"][0]["field"], "amount");
        }
        let other = fresh("bc21b");
        for amount in ["9007199254740993", "99999999999999999999"] {
            let body =
                format!(r#"{{"amount": {amount}, "currency": "EUR", "customer_id": "cus_001"}}"#);
            assert_eq!(service.pay(&other, &body).await.status, 400, "{amount}");
        }
        let first = service.pay(&key, P1).await;
        assert_eq!(
            (first.status, first.replayed()),
            (StatusCode::CREATED, false)
        );
        assert!(service.pay(&key, P1).await.replayed());
        let payments = service.all_payments(ACME).await;
        assert_eq!(payments.len(), 1);
        assert_eq!(payments[0]["amount"], 1250);
    }
}
