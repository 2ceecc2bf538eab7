//! Operational endpoints and small reads: health, readiness, metrics, the OpenAPI document,
//! problem pages, key status and the fallbacks.

use axum::Extension;
use axum::Json;
use axum::extract::{Path, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use oncepay_core::engine::{RecordState, Scope, tombstone_expires_at};
use oncepay_core::key::IdempotencyKey;
use oncepay_core::wire::{KeyState, KeyStatus, TenantId};

use super::AppState;
use super::problem::{ApiError, code_info};

/// The OpenAPI 3.1 description of the service, kept beside the code it describes.
const OPENAPI: &str = include_str!("../../openapi.json");

pub async fn healthz() -> &'static str {
    "ok\n"
}

pub async fn readyz(State(state): State<AppState>) -> Result<&'static str, ApiError> {
    match state.store.ping().await {
        Ok(()) => Ok("ready\n"),
        Err(err) => {
            tracing::warn!(error = %err, "readiness check failed");
            Err(ApiError::StoreUnavailable)
        }
    }
}

pub async fn metrics(State(state): State<AppState>) -> Response {
    let content_type = "text/plain; version=0.0.4; charset=utf-8";
    (
        [(header::CONTENT_TYPE, content_type)],
        state.metrics.render(),
    )
        .into_response()
}

pub async fn openapi() -> Response {
    ([(header::CONTENT_TYPE, "application/json")], OPENAPI).into_response()
}

pub async fn problem_page(Path(code): Path<String>) -> Result<Response, ApiError> {
    let info =
        code_info(&code).ok_or_else(|| ApiError::NotFound(format!("no problem code `{code}`")))?;
    let page = format!(
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{code}</title>\
         </head>\n<body><h1>{code}</h1>\n<p>HTTP {status}: {title}.</p>\n\
         <h2>What to do</h2>\n<p>{advice}</p></body></html>\n",
        code = info.code,
        status = info.status,
        title = info.title,
        advice = info.advice,
    );
    Ok(([(header::CONTENT_TYPE, "text/html; charset=utf-8")], page).into_response())
}

pub async fn key_status(
    State(state): State<AppState>,
    Extension(tenant): Extension<TenantId>,
    Path(key): Path<String>,
) -> Result<Json<KeyStatus>, ApiError> {
    let not_found = || ApiError::NotFound("this key was never used by your account".into());
    let key = IdempotencyKey::parse(key.as_bytes()).map_err(|_| not_found())?;
    let scope = Scope { tenant, key };
    let record = state.store.record(&scope).await.map_err(|err| {
        tracing::warn!(error = %err, "key status lookup failed");
        ApiError::StoreUnavailable
    })?;
    let record = record.ok_or_else(not_found)?;
    let policy = state.store.policy();
    let now = state.clock.now();
    let (key_state, expires_at, status, resource_id) = match &record.state {
        RecordState::InFlight { lease_expires_at } => {
            (KeyState::InProgress, *lease_expires_at, None, None)
        }
        RecordState::Completed {
            completed_at,
            response,
        } => {
            let replay_until = completed_at.plus(policy.retention);
            let (key_state, expires_at) = match now >= replay_until {
                true => (
                    KeyState::Expired,
                    tombstone_expires_at(*completed_at, &policy),
                ),
                false => (KeyState::Completed, replay_until),
            };
            (
                key_state,
                expires_at,
                Some(response.status),
                response.resource_id.clone(),
            )
        }
        RecordState::Tombstone {
            completed_at,
            response_status,
            resource_id,
        } => (
            KeyState::Expired,
            tombstone_expires_at(*completed_at, &policy),
            Some(*response_status),
            resource_id.clone(),
        ),
    };
    Ok(Json(KeyStatus {
        key: scope.key.as_str().to_owned(),
        state: key_state,
        fingerprint: record.fingerprint.to_hex(),
        created_at: record.created_at,
        expires_at,
        response_status: status,
        resource_id,
    }))
}

pub async fn not_found() -> ApiError {
    ApiError::NotFound("no such path".into())
}

pub async fn method_not_allowed() -> ApiError {
    ApiError::MethodNotAllowed
}
