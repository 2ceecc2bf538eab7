//! Every status path of every endpoint, snapshotted under `snapshots/` with ids and timestamps
//! redacted, so any change to what a client sees shows up as a reviewed snapshot diff.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use axum::body::Body;
use axum::http::{Method, Request};
use oncepay::http::auth::ApiKeys;
use oncepay::http::{AppState, app};
use oncepay::metrics::Metrics;
use oncepay_core::engine::{Begin, Lease, Policy, Record, Scope, StoredResponse};
use oncepay_core::fingerprint::Fingerprint;
use oncepay_core::store::*;
use oncepay_core::time::{Clock, Timestamp};
use oncepay_core::wire::{CustomerId, Payment, PaymentId, Rewards, TenantId};
use serde_json::{Value, json};

use crate::harness::*;

/// Replaces generated ids and timestamps so snapshots are stable.
fn redact(value: &mut Value) {
    match value {
        Value::String(text) => {
            for prefix in ["pay_", "re_", "rwd_", "req_"] {
                if let Some(rest) = text.strip_prefix(prefix)
                    && rest.len() == 24
                {
                    *text = format!("[{prefix}id]");
                    return;
                }
            }
            if oncepay_core::time::parse_rfc3339(text).is_some() {
                *text = "[timestamp]".into();
            }
            if let Some(rest) = text.strip_prefix("/v1/payments/pay_") {
                *text = format!("/v1/payments/[pay_id]{}", &rest[24.min(rest.len())..]);
            }
        }
        Value::Array(items) => items.iter_mut().for_each(redact),
        Value::Object(members) => members.values_mut().for_each(redact),
        _ => {}
    }
}

fn snapshot(name: &str, reply: &Reply) {
    let mut headers = serde_json::Map::new();
    for header in [
        "content-type",
        "location",
        "idempotent-replayed",
        "retry-after",
    ] {
        if let Some(value) = reply.header(header) {
            headers.insert(header.into(), json!(value));
        }
    }
    let body = serde_json::from_slice(&reply.body)
        .unwrap_or_else(|_| json!(String::from_utf8_lossy(&reply.body)));
    let mut value = json!({"status": reply.status.as_u16(), "headers": headers, "body": body});
    redact(&mut value);
    let mut settings = insta::Settings::clone_current();
    settings.set_snapshot_path(concat!(env!("CARGO_MANIFEST_DIR"), "/snapshots"));
    settings.set_prepend_module_to_snapshot(false);
    settings.bind(|| insta::assert_json_snapshot!(name, value));
}

const P_DECLINE: &str = r#"{"amount": 500, "currency": "EUR", "customer_id": "cus_decline_x"}"#;

#[tokio::test]
async fn payment_creation_paths_match_their_snapshots() {
    let service = Harness::new(Kind::Memory);
    let first = service.pay("snap-1", P1).await;
    snapshot("payment_created_201", &first);
    snapshot("payment_replayed_201", &service.pay("snap-1", P1).await);
    snapshot("payment_key_reused_422", &service.pay("snap-1", P2).await);
    snapshot(
        "payment_declined_402",
        &service.pay("snap-2", P_DECLINE).await,
    );
    snapshot(
        "payment_declined_replayed_402",
        &service.pay("snap-2", P_DECLINE).await,
    );

    let (slow, busy) = tokio::join!(
        service.pay_with_fault("snap-3", P1, "after_claim=delay:2000"),
        async {
            tokio::time::sleep(Duration::from_millis(300)).await;
            service.pay("snap-3", P1).await
        }
    );
    snapshot("payment_key_in_use_409", &busy);
    assert_eq!(slow.status, 201);

    service.advance(Duration::from_secs(11));
    snapshot("payment_key_expired_422", &service.pay("snap-1", P1).await);
}

#[tokio::test]
async fn request_validation_paths_match_their_snapshots() {
    let service = Harness::new(Kind::Memory);
    let cases = [
        ("invalid_malformed_json_400", r#"{"amount": 1250,"#),
        (
            "invalid_duplicate_member_400",
            r#"{"amount":1,"amount":2,"currency":"EUR","customer_id":"c"}"#,
        ),
        (
            "invalid_unknown_field_400",
            r#"{"amount":1,"currency":"EUR","customer_id":"c","capture":false}"#,
        ),
        (
            "invalid_float_amount_400",
            r#"{"amount":1250.0,"currency":"EUR","customer_id":"c"}"#,
        ),
        (
            "invalid_string_amount_400",
            r#"{"amount":"1250","currency":"EUR","customer_id":"c"}"#,
        ),
        (
            "invalid_amount_range_400",
            r#"{"amount":0,"currency":"EUR","customer_id":"c"}"#,
        ),
        (
            "invalid_currency_400",
            r#"{"amount":1,"currency":"eur","customer_id":"c"}"#,
        ),
        (
            "invalid_customer_400",
            r#"{"amount":1,"currency":"EUR","customer_id":"no spaces"}"#,
        ),
        ("invalid_missing_fields_400", r#"{}"#),
        ("invalid_not_an_object_400", r#"[1250]"#),
    ];
    for (name, body) in cases {
        snapshot(name, &service.pay(&fresh("v"), body).await);
    }
    let many: serde_json::Map<String, Value> =
        (0..21).map(|i| (format!("k{i}"), json!("v"))).collect();
    let body = json!({"amount": 1, "currency": "EUR", "customer_id": "c", "metadata": many});
    snapshot(
        "invalid_metadata_400",
        &service.pay(&fresh("v"), &body.to_string()).await,
    );

    snapshot(
        "key_missing_400",
        &service.post("/v1/payments", ACME, None, P1).await,
    );
    snapshot("key_invalid_400", &service.pay(&"x".repeat(256), P1).await);
    let twice = post("/v1/payments", ACME, Some("a"), "")
        .header("idempotency-key", "b")
        .body(Body::from(P1))
        .unwrap();
    snapshot("key_repeated_400", &service.send(twice).await);
    let too_large = format!(r#"{{"description":"{}"}}"#, "x".repeat(70_000));
    snapshot(
        "body_too_large_413",
        &service.pay(&fresh("v"), &too_large).await,
    );
    let text = Request::builder()
        .method(Method::POST)
        .uri("/v1/payments")
        .header("authorization", format!("Bearer {ACME}"))
        .header("idempotency-key", "t")
        .header("content-type", "text/plain")
        .body(Body::from(P1))
        .unwrap();
    snapshot("wrong_media_type_415", &service.send(text).await);
    assert!(
        service.all_payments(ACME).await.is_empty(),
        "no rejected request created anything"
    );
}

#[tokio::test]
async fn authentication_and_lookup_paths_match_their_snapshots() {
    let service = Harness::new(Kind::Memory);
    let no_auth = Request::builder()
        .uri("/v1/payments")
        .body(Body::empty())
        .unwrap();
    snapshot("unauthorized_missing_401", &service.send(no_auth).await);
    snapshot(
        "unauthorized_unknown_401",
        &service.post("/v1/payments", "sk_nope", Some("k"), P1).await,
    );
    snapshot(
        "payment_not_found_404",
        &service.get("/v1/payments/pay_missing", ACME).await,
    );
    let id = service.pay("look-1", P1).await.json()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    snapshot(
        "payment_200",
        &service.get(&format!("/v1/payments/{id}"), ACME).await,
    );
    snapshot(
        "payment_other_tenant_404",
        &service.get(&format!("/v1/payments/{id}"), GLOBEX).await,
    );
    snapshot(
        "payments_list_200",
        &service.get("/v1/payments?limit=1", ACME).await,
    );
    snapshot(
        "key_status_completed_200",
        &service.get("/v1/idempotency-keys/look-1", ACME).await,
    );
    snapshot(
        "key_status_unknown_404",
        &service.get("/v1/idempotency-keys/never", ACME).await,
    );
    snapshot(
        "path_not_found_404",
        &service.get("/v2/nothing", ACME).await,
    );
    let delete = Request::builder()
        .method(Method::DELETE)
        .uri("/healthz")
        .body(Body::empty())
        .unwrap();
    snapshot("method_not_allowed_405", &service.send(delete).await);
}

#[tokio::test]
async fn refund_and_rewards_paths_match_their_snapshots() {
    let service = Harness::new(Kind::Memory);
    let id = service.pay("ref-1", P1).await.json()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let path = format!("/v1/payments/{id}/refunds");
    snapshot(
        "refund_created_201",
        &service
            .post(&path, ACME, Some("r-1"), r#"{"amount": 500}"#)
            .await,
    );
    snapshot(
        "refund_replayed_201",
        &service
            .post(&path, ACME, Some("r-1"), r#"{"amount": 500}"#)
            .await,
    );
    snapshot(
        "refund_exceeds_400",
        &service
            .post(&path, ACME, Some("r-2"), r#"{"amount": 5000}"#)
            .await,
    );
    snapshot(
        "refund_invalid_amount_400",
        &service
            .post(&path, ACME, Some("r-3"), r#"{"amount": -1}"#)
            .await,
    );
    let missing = service
        .post("/v1/payments/pay_missing/refunds", ACME, Some("r-4"), "{}")
        .await;
    snapshot("refund_payment_not_found_404", &missing);
    let declined = service.pay("ref-2", P_DECLINE).await.json()["payment_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let not_refundable = service
        .post(
            &format!("/v1/payments/{declined}/refunds"),
            ACME,
            Some("r-5"),
            "{}",
        )
        .await;
    snapshot("refund_not_refundable_400", &not_refundable);
    snapshot(
        "rewards_200",
        &service.get("/v1/customers/cus_001/rewards", ACME).await,
    );
    snapshot(
        "rewards_invalid_customer_400",
        &service.get("/v1/customers/no%20pe/rewards", ACME).await,
    );
}

#[tokio::test]
async fn operational_endpoints_answer() {
    let service = Harness::new(Kind::Memory);
    assert_eq!(service.get("/healthz", "").await.status, 200);
    assert_eq!(service.get("/readyz", "").await.status, 200);
    let page = service.get("/problems/idempotency_key_in_use", "").await;
    assert_eq!(
        page.header("content-type"),
        Some("text/html; charset=utf-8")
    );
    assert!(String::from_utf8_lossy(&page.body).contains("Retry-After"));
    assert_eq!(service.get("/problems/nonsense", "").await.status, 404);

    service.pay("m-1", P1).await;
    service.pay("m-1", P1).await;
    service.pay("m-1", P2).await;
    let metrics = String::from_utf8(service.get("/metrics", "").await.body).unwrap();
    assert!(
        metrics.contains(r#"oncepay_idempotency_outcomes_total{outcome="replayed"} 1"#),
        "{metrics}"
    );
    assert!(metrics.contains(r#"oncepay_idempotency_outcomes_total{outcome="mismatch"} 1"#));
    assert!(metrics.contains(r#"route="/v1/payments""#));

    let openapi = service.get("/openapi.json", "").await.json();
    snapshot_openapi(&openapi);
}

fn snapshot_openapi(document: &Value) {
    assert_eq!(document["openapi"], "3.1.0");
    let mut settings = insta::Settings::clone_current();
    settings.set_snapshot_path(concat!(env!("CARGO_MANIFEST_DIR"), "/snapshots"));
    settings.set_prepend_module_to_snapshot(false);
    settings.bind(|| insta::assert_json_snapshot!("openapi_document", document));
}

/// The real store behind a switch that can cut it off, as a database outage would.
struct Outage {
    inner: Arc<dyn Store>,
    down: AtomicBool,
}

impl Outage {
    fn check(&self) -> Result<(), StoreError> {
        match self.down.load(Ordering::SeqCst) {
            true => Err(StoreError::Unavailable("connection refused".into())),
            false => Ok(()),
        }
    }
}

#[async_trait]
impl Store for Outage {
    fn policy(&self) -> Policy {
        self.inner.policy()
    }
    async fn begin(&self, scope: &Scope, fingerprint: &Fingerprint) -> Result<Begin, StoreError> {
        self.check()?;
        self.inner.begin(scope, fingerprint).await
    }
    async fn complete(&self, lease: &Lease, response: StoredResponse) -> Result<(), StoreError> {
        self.check()?;
        self.inner.complete(lease, response).await
    }
    async fn renew(&self, lease: &Lease) -> Result<Timestamp, StoreError> {
        self.check()?;
        self.inner.renew(lease).await
    }
    async fn release(&self, lease: &Lease) -> Result<(), StoreError> {
        self.check()?;
        self.inner.release(lease).await
    }
    async fn record(&self, scope: &Scope) -> Result<Option<Record>, StoreError> {
        self.check()?;
        self.inner.record(scope).await
    }
    async fn sweep(&self) -> Result<SweepReport, StoreError> {
        self.check()?;
        self.inner.sweep().await
    }
    async fn ping(&self) -> Result<(), StoreError> {
        self.check()?;
        self.inner.ping().await
    }
    async fn create_payment(
        &self,
        lease: &Lease,
        payment: NewPayment,
        response: StoredResponse,
    ) -> Result<(), StoreError> {
        self.check()?;
        self.inner.create_payment(lease, payment, response).await
    }
    async fn create_refund(
        &self,
        lease: &Lease,
        refund: NewRefund,
        render: RenderRefund,
    ) -> Result<RefundResult, StoreError> {
        self.check()?;
        self.inner.create_refund(lease, refund, render).await
    }
    async fn payment(
        &self,
        tenant: &TenantId,
        id: &PaymentId,
    ) -> Result<Option<Payment>, StoreError> {
        self.check()?;
        self.inner.payment(tenant, id).await
    }
    async fn list_payments(
        &self,
        tenant: &TenantId,
        query: &ListQuery,
    ) -> Result<Option<Page>, StoreError> {
        self.check()?;
        self.inner.list_payments(tenant, query).await
    }
    async fn rewards(
        &self,
        tenant: &TenantId,
        customer: &CustomerId,
    ) -> Result<Rewards, StoreError> {
        self.check()?;
        self.inner.rewards(tenant, customer).await
    }
}

#[tokio::test]
async fn an_unreachable_store_fails_closed_with_503_and_executes_nothing() {
    let base = Harness::new(Kind::Sqlite);
    let outage = Arc::new(Outage {
        inner: base.store.clone(),
        down: AtomicBool::new(true),
    });
    let clock: Arc<dyn Clock> = base.clock.clone();
    let state = AppState {
        store: outage.clone(),
        clock,
        metrics: Arc::new(Metrics::default()),
        api_keys: Arc::new(ApiKeys::parse(&format!("acme:{ACME}")).unwrap()),
    };
    let service = Harness {
        router: app(state, test_config()),
        ..base
    };
    let down = service.pay("outage-1", P1).await;
    snapshot("store_unavailable_503", &down);
    assert_eq!(service.get("/readyz", "").await.status, 503);

    outage.down.store(false, Ordering::SeqCst);
    assert!(
        service.all_payments(ACME).await.is_empty(),
        "nothing executed during the outage"
    );
    let up = service.pay("outage-1", P1).await;
    assert_eq!((up.status.as_u16(), up.replayed()), (201, false));
}
