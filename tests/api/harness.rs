//! An in-process oncepay: the real router over a real store, driven with `oneshot`.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::http::{HeaderMap, Method, Request, StatusCode};
use http_body_util::BodyExt;
use oncepay::http::auth::ApiKeys;
use oncepay::http::idempotency::IdempotencyConfig;
use oncepay::http::{AppState, app};
use oncepay::metrics::Metrics;
use oncepay::store::sqlite::SqliteStore;
use oncepay_core::engine::Policy;
use oncepay_core::memory::MemoryStore;
use oncepay_core::store::Store;
use oncepay_core::time::{Clock, ManualClock, Timestamp};
use serde_json::Value;
use tower::ServiceExt;

pub const ACME: &str = "sk_test_acme";
pub const GLOBEX: &str = "sk_test_globex";
pub const P1: &str = r#"{"amount": 1250, "currency": "EUR", "customer_id": "cus_001"}"#;
pub const P2: &str = r#"{"amount": 1251, "currency": "EUR", "customer_id": "cus_001"}"#;

/// Which store an in-process service runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Memory,
    Sqlite,
}

pub const KINDS: [Kind; 2] = [Kind::Memory, Kind::Sqlite];

/// One in-process service and what a test needs to poke at it.
pub struct Harness {
    pub router: Router,
    pub store: Arc<dyn Store>,
    pub clock: Arc<ManualClock>,
    pub kind: Kind,
    pub policy: Policy,
    pub config: IdempotencyConfig,
    /// Keeps the SQLite file alive as long as the harness.
    pub dir: Arc<tempfile::TempDir>,
}

/// A response, fully read.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Vec<u8>,
}

impl Reply {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|_| panic!("not JSON: {}", String::from_utf8_lossy(&self.body)))
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    pub fn code(&self) -> String {
        self.json()["code"].as_str().unwrap_or_default().to_owned()
    }

    pub fn replayed(&self) -> bool {
        self.header("idempotent-replayed") == Some("true")
    }
}

pub fn test_policy() -> Policy {
    Policy {
        lease: Duration::from_secs(5),
        retention: Duration::from_secs(10),
        tombstone_retention: Duration::from_secs(60),
    }
}

pub fn test_config() -> IdempotencyConfig {
    IdempotencyConfig {
        in_flight_wait: Duration::from_millis(300),
        poll_interval: Duration::from_millis(20),
        faults_enabled: true,
        ..IdempotencyConfig::default()
    }
}

impl Harness {
    pub fn new(kind: Kind) -> Self {
        Self::with(kind, test_policy(), test_config())
    }

    pub fn with(kind: Kind, policy: Policy, config: IdempotencyConfig) -> Self {
        let dir = Arc::new(tempfile::tempdir().expect("a temporary directory"));
        let clock = Arc::new(ManualClock::new(Timestamp(1_796_378_400_000)));
        Self::open(kind, policy, config, dir, clock)
    }

    fn open(
        kind: Kind,
        policy: Policy,
        config: IdempotencyConfig,
        dir: Arc<tempfile::TempDir>,
        clock: Arc<ManualClock>,
    ) -> Self {
        let as_clock: Arc<dyn Clock> = clock.clone();
        let store: Arc<dyn Store> = match kind {
            Kind::Memory => Arc::new(MemoryStore::new(policy, as_clock.clone(), 8)),
            Kind::Sqlite => {
                let path = dir.path().join("oncepay.db");
                let path = path.to_str().expect("a UTF-8 path");
                Arc::new(SqliteStore::open(path, policy, as_clock.clone()).expect("sqlite opens"))
            }
        };
        let metrics = Arc::new(Metrics::default());
        let keys = ApiKeys::parse(&format!("acme:{ACME},globex:{GLOBEX}")).expect("keys parse");
        let state = AppState {
            store: store.clone(),
            clock: as_clock,
            metrics,
            api_keys: Arc::new(keys),
        };
        Self {
            router: app(state, config.clone()),
            store,
            clock,
            kind,
            policy,
            config,
            dir,
        }
    }

    /// The same service restarted on the same database (the clock carries on).
    pub fn restarted(&self) -> Self {
        assert_eq!(
            self.kind,
            Kind::Sqlite,
            "only a durable store survives a restart"
        );
        Self::open(
            self.kind,
            self.policy,
            self.config.clone(),
            self.dir.clone(),
            self.clock.clone(),
        )
    }

    pub fn advance(&self, duration: Duration) {
        self.clock.advance(duration);
    }

    pub async fn send(&self, request: Request<Body>) -> Reply {
        let response = self
            .router
            .clone()
            .oneshot(request)
            .await
            .expect("infallible");
        let (parts, body) = response.into_parts();
        let body = body
            .collect()
            .await
            .expect("body reads")
            .to_bytes()
            .to_vec();
        Reply {
            status: parts.status,
            headers: parts.headers,
            body,
        }
    }

    pub async fn post(&self, path: &str, api_key: &str, key: Option<&str>, body: &str) -> Reply {
        self.send(
            post(path, api_key, key, body)
                .body(Body::from(body.to_owned()))
                .unwrap(),
        )
        .await
    }

    pub async fn pay(&self, key: &str, body: &str) -> Reply {
        self.post("/v1/payments", ACME, Some(key), body).await
    }

    pub async fn pay_with_fault(&self, key: &str, body: &str, fault: &str) -> Reply {
        let request = post("/v1/payments", ACME, Some(key), body)
            .header("oncepay-fault", fault)
            .body(Body::from(body.to_owned()))
            .unwrap();
        self.send(request).await
    }

    pub async fn get(&self, path: &str, api_key: &str) -> Reply {
        let request = Request::builder()
            .method(Method::GET)
            .uri(path)
            .header("authorization", format!("Bearer {api_key}"))
            .body(Body::empty())
            .unwrap();
        self.send(request).await
    }

    /// The tenant's payments created with `key`, counted through the API.
    pub async fn payments_with_key(&self, api_key: &str, key: &str) -> Vec<Value> {
        let path = format!("/v1/payments?limit=100&idempotency_key={}", encode(key));
        let reply = self.get(&path, api_key).await;
        assert_eq!(reply.status, StatusCode::OK);
        reply.json()["data"].as_array().cloned().unwrap_or_default()
    }

    /// A counter of `oncepay_idempotency_outcomes_total`, read from `/metrics`.
    pub async fn outcome_count(&self, outcome: &str) -> u64 {
        let text = String::from_utf8(self.get("/metrics", "").await.body).unwrap();
        let prefix = format!("oncepay_idempotency_outcomes_total{{outcome=\"{outcome}\"}} ");
        text.lines()
            .find_map(|line| line.strip_prefix(&prefix))
            .map_or(0, |count| count.trim().parse().unwrap())
    }

    /// Every payment of the tenant, counted through the API.
    pub async fn all_payments(&self, api_key: &str) -> Vec<Value> {
        let mut all = Vec::new();
        let mut cursor: Option<String> = None;
        loop {
            let mut path = "/v1/payments?limit=100".to_owned();
            if let Some(after) = &cursor {
                path.push_str(&format!("&starting_after={after}"));
            }
            let page = self.get(&path, api_key).await.json();
            let data = page["data"].as_array().cloned().unwrap_or_default();
            cursor = data.last().map(|p| p["id"].as_str().unwrap().to_owned());
            all.extend(data);
            if page["has_more"] != Value::Bool(true) {
                return all;
            }
        }
    }
}

/// A POST request builder with the usual headers.
pub fn post(
    path: &str,
    api_key: &str,
    key: Option<&str>,
    _body: &str,
) -> axum::http::request::Builder {
    let mut builder = Request::builder()
        .method(Method::POST)
        .uri(path)
        .header("authorization", format!("Bearer {api_key}"))
        .header("content-type", "application/json");
    if let Some(key) = key {
        builder = builder.header("idempotency-key", key);
    }
    builder
}

/// Percent-encodes a key for a query string or path.
pub fn encode(key: &str) -> String {
    key.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// A fresh random key.
pub fn fresh(prefix: &str) -> String {
    format!("{prefix}-{}", oncepay::ids::new_id("k"))
}
