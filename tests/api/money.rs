//! Money invariants under concurrency: one charge per key, refunds never above the payment,
//! rewards equal to the sum of the ledger, and tenants that never see each other.

use std::sync::Arc;

use axum::http::StatusCode;
use serde_json::Value;

use crate::harness::*;

async fn rewards(service: &Harness, api_key: &str, customer: &str) -> Value {
    service
        .get(&format!("/v1/customers/{customer}/rewards"), api_key)
        .await
        .json()
}

fn ledger_sum(rewards: &Value) -> i64 {
    rewards["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["points"].as_i64().unwrap())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn twenty_identical_concurrent_requests_make_one_payment_and_one_reward_credit() {
    for kind in KINDS {
        let service = Arc::new(Harness::new(kind));
        let key = fresh("twenty");
        let body = r#"{"amount": 1250, "currency": "EUR", "customer_id": "cus_twenty"}"#;
        let tasks: Vec<_> = (0..20)
            .map(|_| {
                let (service, key) = (service.clone(), key.clone());
                tokio::spawn(async move { service.pay(&key, body).await })
            })
            .collect();
        let mut created = Vec::new();
        for task in tasks {
            let reply = task.await.unwrap();
            match reply.status {
                StatusCode::CREATED => created.push(reply.body),
                StatusCode::CONFLICT => assert!(reply.header("retry-after").is_some()),
                other => panic!("{kind:?}: unexpected {other}"),
            }
        }
        assert!(!created.is_empty());
        assert!(
            created.iter().all(|b| *b == created[0]),
            "every 201 is byte-identical"
        );
        assert_eq!(
            service.payments_with_key(ACME, &key).await.len(),
            1,
            "{kind:?}"
        );
        let points = rewards(&service, ACME, "cus_twenty").await;
        assert_eq!(
            points["entries"].as_array().unwrap().len(),
            1,
            "{kind:?}: one credit"
        );
        assert_eq!(points["points_balance"], 12);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_refunds_with_different_keys_never_exceed_the_payment() {
    for kind in KINDS {
        let service = Arc::new(Harness::new(kind));
        let body = r#"{"amount": 1000, "currency": "EUR", "customer_id": "cus_refunds"}"#;
        let payment = service.pay(&fresh("pay"), body).await.json();
        let id = payment["id"].as_str().unwrap().to_owned();
        let tasks: Vec<_> = (0..10)
            .map(|_| {
                let (service, id) = (service.clone(), id.clone());
                tokio::spawn(async move {
                    let path = format!("/v1/payments/{id}/refunds");
                    service
                        .post(&path, ACME, Some(&fresh("refund")), r#"{"amount": 300}"#)
                        .await
                })
            })
            .collect();
        let mut refunded = 0;
        for task in tasks {
            let reply = task.await.unwrap();
            match reply.status {
                StatusCode::CREATED => refunded += reply.json()["amount"].as_i64().unwrap(),
                StatusCode::BAD_REQUEST => assert_eq!(reply.code(), "refund_exceeds_payment"),
                other => panic!("{kind:?}: unexpected {other}"),
            }
        }
        assert_eq!(
            refunded, 900,
            "{kind:?}: three refunds of 300 fit, the fourth does not"
        );
        let after = service
            .get(&format!("/v1/payments/{id}"), ACME)
            .await
            .json();
        assert_eq!(after["amount_refunded"], 900);
        assert_eq!(after["reward_points"], 1, "(1000 - 900) / 100");
        let points = rewards(&service, ACME, "cus_refunds").await;
        assert_eq!(points["points_balance"], 1);
        assert_eq!(
            ledger_sum(&points),
            1,
            "the balance is the sum of the entries"
        );
    }
}

#[tokio::test]
async fn refunds_take_back_exactly_the_points_the_remaining_amount_no_longer_earns() {
    for kind in KINDS {
        let service = Harness::new(kind);
        let body = r#"{"amount": 1299, "currency": "EUR", "customer_id": "cus_points"}"#;
        let id = service.pay(&fresh("p"), body).await.json()["id"]
            .as_str()
            .unwrap()
            .to_owned();
        let path = format!("/v1/payments/{id}/refunds");
        for (amount, points_after) in [(99, 12), (1, 11), (1100, 0)] {
            let refund = service
                .post(
                    &path,
                    ACME,
                    Some(&fresh("r")),
                    &format!(r#"{{"amount": {amount}}}"#),
                )
                .await;
            assert_eq!(refund.status, 201, "{kind:?}");
            let payment = service
                .get(&format!("/v1/payments/{id}"), ACME)
                .await
                .json();
            assert_eq!(
                payment["reward_points"], points_after,
                "{kind:?} after {amount}"
            );
            assert_eq!(
                rewards(&service, ACME, "cus_points").await["points_balance"],
                points_after
            );
        }
        let rest = service.post(&path, ACME, Some(&fresh("r")), "").await;
        assert_eq!(
            rest.json()["amount"],
            99,
            "an empty body refunds what is left"
        );
        let nothing_left = service.post(&path, ACME, Some(&fresh("r")), "").await;
        assert_eq!(nothing_left.code(), "refund_exceeds_payment");
        let points = rewards(&service, ACME, "cus_points").await;
        assert_eq!(
            ledger_sum(&points),
            points["points_balance"].as_i64().unwrap()
        );
    }
}

#[tokio::test]
async fn a_refund_without_an_amount_refunds_what_is_left_and_a_declined_payment_none() {
    for kind in KINDS {
        let service = Harness::new(kind);
        let id = service.pay(&fresh("p"), P1).await.json()["id"]
            .as_str()
            .unwrap()
            .to_owned();
        let path = format!("/v1/payments/{id}/refunds");
        service
            .post(&path, ACME, Some(&fresh("r")), r#"{"amount": 250}"#)
            .await;
        let rest = service.post(&path, ACME, Some(&fresh("r")), "{}").await;
        assert_eq!(
            (rest.status, rest.json()["amount"].clone()),
            (StatusCode::CREATED, 1000.into())
        );

        let declined_body = r#"{"amount": 500, "currency": "EUR", "customer_id": "cus_decline_1"}"#;
        let declined = service.pay(&fresh("d"), declined_body).await;
        assert_eq!(
            (declined.status, declined.code()),
            (StatusCode::PAYMENT_REQUIRED, "card_declined".into())
        );
        let declined_id = declined.json()["payment_id"].as_str().unwrap().to_owned();
        let refund = service
            .post(
                &format!("/v1/payments/{declined_id}/refunds"),
                ACME,
                Some(&fresh("r")),
                "{}",
            )
            .await;
        assert_eq!(refund.code(), "payment_not_refundable");
        assert_eq!(
            rewards(&service, ACME, "cus_decline_1").await["points_balance"],
            0
        );
    }
}

#[tokio::test]
async fn a_decline_is_stored_and_replayed_like_a_success() {
    for kind in KINDS {
        let service = Harness::new(kind);
        let key = fresh("decline");
        let body = r#"{"amount": 500, "currency": "EUR", "customer_id": "cus_decline_2"}"#;
        let first = service.pay(&key, body).await;
        let replay = service.pay(&key, body).await;
        assert_eq!(
            (replay.status, replay.replayed()),
            (StatusCode::PAYMENT_REQUIRED, true)
        );
        assert_eq!(replay.body, first.body);
        assert_eq!(service.payments_with_key(ACME, &key).await.len(), 1);
    }
}

#[tokio::test]
async fn the_same_key_under_two_tenants_is_two_unrelated_keys() {
    for kind in KINDS {
        let service = Harness::new(kind);
        let key = fresh("shared");
        let acme = service.pay(&key, P1).await;
        let globex = service.post("/v1/payments", GLOBEX, Some(&key), P2).await;
        assert_eq!(
            (acme.status, globex.status),
            (StatusCode::CREATED, StatusCode::CREATED)
        );
        assert!(!globex.replayed());
        assert_ne!(acme.json()["id"], globex.json()["id"]);

        let acme_id = acme.json()["id"].as_str().unwrap().to_owned();
        assert_eq!(
            service
                .get(&format!("/v1/payments/{acme_id}"), GLOBEX)
                .await
                .status,
            404
        );
        let refund = service
            .post(
                &format!("/v1/payments/{acme_id}/refunds"),
                GLOBEX,
                Some(&fresh("r")),
                "{}",
            )
            .await;
        assert_eq!(refund.status, 404);
        assert_eq!(service.all_payments(GLOBEX).await.len(), 1);
        let key_status = service
            .get(&format!("/v1/idempotency-keys/{}", encode(&key)), GLOBEX)
            .await
            .json();
        assert_eq!(key_status["resource_id"], globex.json()["id"]);
    }
}

#[tokio::test]
async fn the_list_pages_newest_first_and_filters_by_customer_and_key() {
    for kind in KINDS {
        let service = Harness::new(kind);
        let mut ids = Vec::new();
        for i in 0..5 {
            service.advance(std::time::Duration::from_millis(1));
            let body = format!(
                r#"{{"amount": {}, "currency": "EUR", "customer_id": "cus_{}"}}"#,
                100 + i,
                i % 2
            );
            ids.push(service.pay(&format!("list-{i}"), &body).await.json()["id"].clone());
        }
        let page = service.get("/v1/payments?limit=2", ACME).await.json();
        assert_eq!(
            page["data"]
                .as_array()
                .unwrap()
                .iter()
                .map(|p| p["id"].clone())
                .collect::<Vec<_>>(),
            [ids[4].clone(), ids[3].clone()]
        );
        assert_eq!(page["has_more"], true);
        let next = service
            .get(
                &format!(
                    "/v1/payments?limit=10&starting_after={}",
                    ids[3].as_str().unwrap()
                ),
                ACME,
            )
            .await
            .json();
        assert_eq!(next["data"].as_array().unwrap().len(), 3);
        assert_eq!(next["has_more"], false);
        let customer = service
            .get("/v1/payments?customer_id=cus_1", ACME)
            .await
            .json();
        assert_eq!(customer["data"].as_array().unwrap().len(), 2);
        let by_key = service
            .get("/v1/payments?idempotency_key=list-2", ACME)
            .await
            .json();
        assert_eq!(by_key["data"][0]["id"], ids[2]);
        assert_eq!(service.get("/v1/payments?limit=0", ACME).await.status, 400);
        let bad_filter = service.get("/v1/payments?customer_id=bad%20id", ACME).await;
        assert_eq!(bad_filter.json()["errors"][0]["field"], "customer_id");
        assert_eq!(
            service
                .get("/v1/payments?idempotency_key=", ACME)
                .await
                .status,
            400
        );
        assert_eq!(
            service
                .get("/v1/payments?starting_after=pay_nope", ACME)
                .await
                .status,
            400
        );
    }
}
