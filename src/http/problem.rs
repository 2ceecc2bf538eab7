//! Errors as RFC 9457 problem documents with stable codes, and the `/problems/{code}` pages.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use oncepay_core::wire::{FieldError, Problem};
use thiserror::Error;

/// The media type of every error body.
pub const PROBLEM_JSON: &str = "application/problem+json";

/// What an error code means, for the problem document and the code's page.
pub struct CodeInfo {
    /// The stable code.
    pub code: &'static str,
    /// The HTTP status it comes with.
    pub status: u16,
    /// A one-line summary.
    pub title: &'static str,
    /// What the client should do about it.
    pub advice: &'static str,
}

/// Every error code the service answers with.
pub const CODES: &[CodeInfo] = &[
    CodeInfo {
        code: "invalid_request",
        status: 400,
        title: "The request is invalid",
        advice: "Fix the fields listed in `errors` and send the request again; nothing was stored, \
                 so the same idempotency key may be reused for the corrected request.",
    },
    CodeInfo {
        code: "idempotency_key_missing",
        status: 400,
        title: "An Idempotency-Key header is required",
        advice: "Generate a unique key (a UUID) for this operation, send it in Idempotency-Key, \
                 and send the same key on every retry of the same operation.",
    },
    CodeInfo {
        code: "idempotency_key_invalid",
        status: 400,
        title: "The Idempotency-Key header is invalid",
        advice: "Send exactly one Idempotency-Key header of 1 to 255 visible ASCII characters.",
    },
    CodeInfo {
        code: "unauthorized",
        status: 401,
        title: "Authentication failed",
        advice: "Send a valid API key as `Authorization: Bearer <key>`.",
    },
    CodeInfo {
        code: "card_declined",
        status: 402,
        title: "The card was declined",
        advice: "The payment was executed and declined; this is its final outcome. Use another \
                 payment method with a new idempotency key.",
    },
    CodeInfo {
        code: "not_found",
        status: 404,
        title: "Not found",
        advice: "Check the id or path. Objects of other tenants are not visible.",
    },
    CodeInfo {
        code: "method_not_allowed",
        status: 405,
        title: "Method not allowed",
        advice: "Use one of the methods the path accepts.",
    },
    CodeInfo {
        code: "idempotency_key_in_use",
        status: 409,
        title: "A request with this idempotency key is still running",
        advice: "Wait the number of seconds in Retry-After and retry with the same key and body; \
                 you will get the original outcome.",
    },
    CodeInfo {
        code: "payload_too_large",
        status: 413,
        title: "The body is too large",
        advice: "Send a smaller body. Nothing was stored for the idempotency key.",
    },
    CodeInfo {
        code: "unsupported_media_type",
        status: 415,
        title: "The body must be JSON",
        advice: "Send the body with `Content-Type: application/json`.",
    },
    CodeInfo {
        code: "idempotency_key_reused",
        status: 422,
        title: "The idempotency key was used for another request",
        advice: "A key is bound to the first request sent with it (method, path and body). Use a \
                 new key for a new operation; nothing was executed.",
    },
    CodeInfo {
        code: "idempotency_key_expired",
        status: 422,
        title: "The idempotency key has expired",
        advice: "The original outcome is past its retention. Look the object up (`payment_id`, or \
                 GET /v1/payments?idempotency_key=...) instead of retrying; nothing was executed.",
    },
    CodeInfo {
        code: "refund_exceeds_payment",
        status: 400,
        title: "The refund exceeds what is left of the payment",
        advice: "Refund at most the payment's amount minus amount_refunded.",
    },
    CodeInfo {
        code: "payment_not_refundable",
        status: 400,
        title: "The payment cannot be refunded",
        advice: "Only succeeded payments can be refunded.",
    },
    CodeInfo {
        code: "internal_error",
        status: 500,
        title: "Internal error",
        advice: "Retry with the same idempotency key: an outcome that committed is replayed, one \
                 that did not is executed once.",
    },
    CodeInfo {
        code: "store_unavailable",
        status: 503,
        title: "The store is unavailable",
        advice: "Nothing was executed. Retry with the same idempotency key after Retry-After.",
    },
];

/// Looks up a code's description.
pub fn code_info(code: &str) -> Option<&'static CodeInfo> {
    CODES.iter().find(|info| info.code == code)
}

/// Renders a problem document for `code` with `detail`, ready to send or store.
pub fn problem_body(
    code: &str,
    detail: &str,
    errors: Vec<FieldError>,
    payment_id: Option<String>,
) -> Vec<u8> {
    let info = code_info(code).expect("every code used is listed in CODES");
    let problem = Problem {
        type_: format!("/problems/{code}"),
        title: info.title.to_owned(),
        status: info.status,
        detail: detail.to_owned(),
        code: code.to_owned(),
        errors,
        payment_id,
    };
    serde_json::to_vec(&problem).expect("a problem always serialises")
}

/// Every error the HTTP layer answers with.
#[derive(Debug, Error)]
pub enum ApiError {
    /// 400: the body or a parameter failed validation.
    #[error("{detail}")]
    InvalidRequest {
        /// What is wrong overall.
        detail: String,
        /// The fields at fault.
        errors: Vec<FieldError>,
    },
    /// 400: no idempotency key.
    #[error("the Idempotency-Key header is required on POST requests")]
    KeyMissing,
    /// 400: a malformed idempotency key.
    #[error("{0}")]
    KeyInvalid(String),
    /// 401.
    #[error("a valid API key is required: send Authorization: Bearer <key>")]
    Unauthorized,
    /// 404.
    #[error("{0}")]
    NotFound(String),
    /// 405.
    #[error("this path does not accept the method")]
    MethodNotAllowed,
    /// 409 with `Retry-After`.
    #[error("a request with this idempotency key is still running")]
    KeyInUse {
        /// Seconds until the lease runs out, at least 1.
        retry_after_secs: u64,
    },
    /// 409 with `Retry-After: 1`: this request lost its lease to another owner before it could
    /// commit; nothing it did was stored, and a retry gets the other owner's outcome.
    #[error("another request with this idempotency key took over; retry to get its outcome")]
    LeaseLost,
    /// 413.
    #[error("the body is larger than {limit_bytes} bytes")]
    PayloadTooLarge {
        /// The limit.
        limit_bytes: usize,
    },
    /// 415.
    #[error("the body must be sent as application/json")]
    UnsupportedMediaType,
    /// 422: the key is bound to another request.
    #[error("the idempotency key was already used for a different request")]
    KeyReused,
    /// 422: the key is past its retention.
    #[error("the idempotency key has expired; the original request will not be executed again")]
    KeyExpired {
        /// The payment the original request created, if any.
        payment_id: Option<String>,
    },
    /// 500; the cause is logged, never sent.
    #[error("an internal error occurred")]
    Internal(String),
    /// 503 with `Retry-After`; nothing executed.
    #[error("the store is unavailable; nothing was executed")]
    StoreUnavailable,
}

/// Seconds a client should wait after a 503 before retrying.
pub const STORE_UNAVAILABLE_RETRY_AFTER_SECS: u64 = 1;

impl ApiError {
    /// The stable code.
    pub fn code(&self) -> &'static str {
        match self {
            Self::InvalidRequest { .. } => "invalid_request",
            Self::KeyMissing => "idempotency_key_missing",
            Self::KeyInvalid(_) => "idempotency_key_invalid",
            Self::Unauthorized => "unauthorized",
            Self::NotFound(_) => "not_found",
            Self::MethodNotAllowed => "method_not_allowed",
            Self::KeyInUse { .. } | Self::LeaseLost => "idempotency_key_in_use",
            Self::PayloadTooLarge { .. } => "payload_too_large",
            Self::UnsupportedMediaType => "unsupported_media_type",
            Self::KeyReused => "idempotency_key_reused",
            Self::KeyExpired { .. } => "idempotency_key_expired",
            Self::Internal(_) => "internal_error",
            Self::StoreUnavailable => "store_unavailable",
        }
    }

    /// The HTTP status.
    pub fn status_code(&self) -> StatusCode {
        let status = code_info(self.code()).map_or(500, |info| info.status);
        StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
    }

    /// A 400 for a single field.
    pub fn invalid_field(field: &str, message: impl Into<String>) -> Self {
        let message = message.into();
        Self::InvalidRequest {
            detail: message.clone(),
            errors: vec![FieldError {
                field: field.to_owned(),
                message,
            }],
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (errors, payment_id) = match &self {
            Self::InvalidRequest { errors, .. } => (errors.clone(), None),
            Self::KeyExpired { payment_id } => (Vec::new(), payment_id.clone()),
            _ => (Vec::new(), None),
        };
        let body = problem_body(self.code(), &self.to_string(), errors, payment_id);
        let mut response = (self.status_code(), body).into_response();
        let headers = response.headers_mut();
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(PROBLEM_JSON));
        let retry_after = match &self {
            Self::KeyInUse { retry_after_secs } => Some(*retry_after_secs),
            Self::LeaseLost => Some(1),
            Self::StoreUnavailable => Some(STORE_UNAVAILABLE_RETRY_AFTER_SECS),
            _ => None,
        };
        if let Some(secs) = retry_after {
            headers.insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        if let Self::LeaseLost = &self {
            response.extensions_mut().insert(LeaseLost);
        }
        if let Self::Internal(cause) = &self {
            // Keep the cause for the request span's log line; the client sees only the code.
            response
                .extensions_mut()
                .insert(InternalCause(cause.clone()));
        }
        response
    }
}

/// Marks a response whose request was fenced off by a newer owner, for the metrics.
#[derive(Clone, Copy, Debug)]
pub struct LeaseLost;

/// The logged cause of a 500, carried from the handler to the request log.
#[derive(Clone, Debug)]
pub struct InternalCause(pub String);
