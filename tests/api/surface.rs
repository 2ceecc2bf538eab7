//! The input surface: arbitrary key headers, content types and body bytes through the real
//! router. Nothing may panic or answer 5xx, every error is a problem document, and a rejected
//! request leaves no trace: no key record, no payment.

use axum::body::Body;
use axum::http::{HeaderValue, StatusCode};
use proptest::prelude::*;
use proptest::test_runner::{Config, FileFailurePersistence};
use serde_json::Value;

use crate::harness::*;

/// Bodies near the valid one: the valid body, byte-level damage to it, JSON of the wrong
/// shape, and raw noise.
fn bodies() -> impl Strategy<Value = Vec<u8>> {
    let valid = P1.as_bytes().to_vec();
    prop_oneof![
        Just(valid.clone()),
        (any::<prop::sample::Index>(), any::<u8>()).prop_map(move |(at, byte)| {
            let mut damaged = valid.clone();
            let i = at.index(damaged.len());
            damaged[i] = byte;
            damaged
        }),
        prop::collection::vec(any::<u8>(), 0..200),
        "[a-z0-9{}\\[\\]\":,. -]{0,80}".prop_map(String::into_bytes),
        (any::<i64>(), "[A-Za-z]{0,4}", "[ -~]{0,70}").prop_map(|(amount, currency, customer)| {
            serde_json::json!({"amount": amount, "currency": currency, "customer_id": customer})
                .to_string()
                .into_bytes()
        }),
    ]
}

fn keys() -> impl Strategy<Value = Option<Vec<u8>>> {
    prop_oneof![
        1 => Just(None),
        4 => "[!-~]{1,40}".prop_map(|k| Some(k.into_bytes())),
        2 => prop::collection::vec(any::<u8>(), 0..300).prop_map(Some),
        1 => "\"[ -~]{0,20}\"".prop_map(|k| Some(k.into_bytes())),
    ]
}

fn content_types() -> impl Strategy<Value = Option<&'static str>> {
    prop::sample::select(vec![
        Some("application/json"),
        Some("application/json; charset=utf-8"),
        Some("application/merge-patch+json"),
        Some("text/plain"),
        Some("multipart/form-data"),
        None,
    ])
}

proptest! {
    #![proptest_config(Config {
        cases: std::env::var("PROPTEST_CASES").ok().and_then(|c| c.parse().ok()).unwrap_or(256),
        failure_persistence: Some(Box::new(FileFailurePersistence::Direct(
            concat!(env!("CARGO_MANIFEST_DIR"), "/proptest-regressions/surface.txt"),
        ))),
        ..Config::default()
    })]

    #[test]
    fn arbitrary_requests_never_fail_the_server_and_rejections_leave_no_trace(
        key in keys(),
        content_type in content_types(),
        body in bodies(),
    ) {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        runtime.block_on(async {
            let service = Harness::new(Kind::Memory);
            let mut request = post("/v1/payments", ACME, None, "");
            let header = key.as_deref().and_then(|k| HeaderValue::from_bytes(k).ok());
            if let Some(value) = &header {
                request = request.header("idempotency-key", value.clone());
            }
            let mut request = request.body(Body::from(body.clone())).unwrap();
            request.headers_mut().remove("content-type");
            if let Some(content_type) = content_type {
                request.headers_mut().insert("content-type", HeaderValue::from_static(content_type));
            }
            let reply = service.send(request).await;

            prop_assert!(!reply.status.is_server_error(), "{} for {:?}", reply.status, String::from_utf8_lossy(&body));
            let payments = service.all_payments(ACME).await;
            if [StatusCode::CREATED, StatusCode::PAYMENT_REQUIRED].contains(&reply.status) {
                prop_assert_eq!(payments.len(), 1);
                return Ok(());
            }
            prop_assert_eq!(reply.header("content-type"), Some("application/problem+json"));
            let problem: Value = reply.json();
            prop_assert!(problem["code"].is_string());
            prop_assert!(payments.is_empty(), "a rejected request created a payment");
            if let Some(value) = header.as_ref().and_then(|v| v.to_str().ok()) {
                let status = service.get(&format!("/v1/idempotency-keys/{}", encode(value.trim())), ACME).await;
                prop_assert_eq!(status.status, StatusCode::NOT_FOUND, "a rejected request left a key record");
            }
            Ok(())
        })?;
    }
}
