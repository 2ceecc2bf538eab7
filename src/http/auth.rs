//! API keys: `Authorization: Bearer <key>` mapped to a tenant.
//!
//! Only a SHA-256 digest of each key is kept in memory, and a presented key is compared with
//! every digest in constant time, so neither a memory dump nor response timing gives a key away.

use axum::extract::{Request, State};
use axum::http::header;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use oncepay_core::wire::TenantId;
use sha2::{Digest, Sha256};
use thiserror::Error;

use super::AppState;
use super::problem::ApiError;

/// The tenant and key used when none are configured.
pub const DEMO_API_KEYS: &str = "demo:sk_test_demo";

/// A malformed `--api-keys` value.
#[derive(Debug, Error)]
#[error("--api-keys expects comma-separated tenant:key pairs; {0}")]
pub struct ApiKeysError(String);

/// The configured keys, as digests.
#[derive(Debug, Default)]
pub struct ApiKeys {
    entries: Vec<(TenantId, [u8; 32])>,
}

impl ApiKeys {
    /// Parses `tenant:key,tenant:key`.
    ///
    /// # Errors
    ///
    /// [`ApiKeysError`] for an entry without a tenant or a key, or a key listed twice.
    pub fn parse(text: &str) -> Result<Self, ApiKeysError> {
        let mut entries: Vec<(TenantId, [u8; 32])> = Vec::new();
        for pair in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (tenant, key) = pair
                .split_once(':')
                .filter(|(t, k)| !t.trim().is_empty() && !k.trim().is_empty())
                .ok_or_else(|| ApiKeysError(format!("`{}` is not tenant:key", redact(pair))))?;
            let digest = digest(key.trim());
            if entries.iter().any(|(_, d)| *d == digest) {
                return Err(ApiKeysError("a key is listed twice".into()));
            }
            entries.push((TenantId::from(tenant.trim()), digest));
        }
        if entries.is_empty() {
            return Err(ApiKeysError("no keys given".into()));
        }
        Ok(Self { entries })
    }

    /// The tenant a presented key belongs to, compared against every key in constant time.
    pub fn tenant_of(&self, presented: &str) -> Option<TenantId> {
        let presented = digest(presented);
        let mut found = None;
        for (tenant, digest) in &self.entries {
            if constant_time_eq(digest, &presented) {
                found = Some(tenant.clone());
            }
        }
        found
    }

    /// How many keys are configured.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether no key is configured.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

fn digest(key: &str) -> [u8; 32] {
    Sha256::digest(key.as_bytes()).into()
}

fn constant_time_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    let difference = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(difference) == 0
}

/// Shows a configuration entry in an error without printing its key.
fn redact(pair: &str) -> String {
    match pair.split_once(':') {
        Some((tenant, _)) => format!("{tenant}:***"),
        None => "***".to_owned(),
    }
}

/// Middleware: puts the caller's [`TenantId`] into the request or answers 401.
pub async fn authenticate(
    State(state): State<AppState>,
    mut request: Request,
    next: Next,
) -> Response {
    let presented = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.strip_prefix("Bearer "))
        .map(str::trim);
    match presented.and_then(|key| state.api_keys.tenant_of(key)) {
        Some(tenant) => {
            tracing::Span::current().record("tenant", tracing::field::display(&tenant));
            request.extensions_mut().insert(tenant);
            next.run(request).await
        }
        None => ApiError::Unauthorized.into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_map_to_their_tenants_and_unknown_keys_to_none() {
        let keys = ApiKeys::parse("acme:sk_a, globex:sk_g").unwrap();
        assert_eq!(keys.tenant_of("sk_a"), Some(TenantId::from("acme")));
        assert_eq!(keys.tenant_of("sk_g"), Some(TenantId::from("globex")));
        assert_eq!(keys.tenant_of("sk_x"), None);
    }

    #[test]
    fn malformed_configuration_is_refused_without_echoing_keys() {
        let err = ApiKeys::parse("acme").unwrap_err().to_string();
        assert!(err.contains("***"));
        assert!(ApiKeys::parse("acme:").is_err());
        assert!(ApiKeys::parse("a:k,b:k").is_err());
        assert!(ApiKeys::parse("").is_err());
    }
}
