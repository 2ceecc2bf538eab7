//! One HTTP attempt: send the request, then turn the answer into a value or a classified
//! [`Failure`] for the retry loop.

use std::time::Duration;

use oncepay_core::wire::Problem;
use reqwest::header::{HeaderMap, RETRY_AFTER};
use reqwest::{Method, Response, StatusCode, Url};
use serde::de::DeserializeOwned;

use crate::error::Error;
use crate::policy::{Verdict, classify_status};
use crate::retry::{Attempt, Failure};

/// The request header that carries the idempotency key.
pub const IDEMPOTENCY_KEY_HEADER: &str = "Idempotency-Key";

/// How much of an unexpected body an error message quotes: enough to recognise it, not a page.
const UNEXPECTED_BODY_CHARS_MAX: usize = 200;

/// Everything that stays the same across the attempts of one call.
pub struct Request {
    /// GET or POST.
    pub method: Method,
    /// The full URL, query included.
    pub url: Url,
    /// The JSON body, serialised once for all attempts.
    pub body: Option<Vec<u8>>,
    /// The key of a mutating call, sent on every attempt.
    pub idempotency_key: Option<String>,
}

/// The HTTP half of a client that attempts share.
pub struct Sender {
    /// The connection pool.
    pub http: reqwest::Client,
    /// Sent as `Authorization: Bearer`.
    pub api_key: String,
    /// Added to the first attempt of every call only; see the builder.
    pub first_attempt_headers: HeaderMap,
}

impl Sender {
    /// Sends one attempt of `request` and reads its answer.
    ///
    /// # Errors
    ///
    /// A [`Failure`] classified for the retry loop.
    pub async fn attempt<T: DeserializeOwned>(
        &self,
        request: &Request,
        attempt: Attempt,
    ) -> Result<T, Failure> {
        let mut builder = self
            .http
            .request(request.method.clone(), request.url.clone())
            .bearer_auth(&self.api_key)
            .timeout(attempt.timeout);
        if let Some(key) = &request.idempotency_key {
            builder = builder.header(IDEMPOTENCY_KEY_HEADER, key);
        }
        if let Some(body) = &request.body {
            builder = builder
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .body(body.clone());
        }
        if attempt.number == 0 {
            builder = builder.headers(self.first_attempt_headers.clone());
        }

        let response = builder.send().await.map_err(transport_failure)?;
        read_answer(response).await
    }
}

/// Decodes a success, or classifies an error answer.
async fn read_answer<T: DeserializeOwned>(response: Response) -> Result<T, Failure> {
    let status = response.status();
    let retry_after = retry_after(response.headers());
    let body = response.bytes().await.map_err(transport_failure)?;
    if status.is_success() {
        return serde_json::from_slice(&body).map_err(|err| Failure {
            error: unexpected(status, &format!("the body is not the expected JSON: {err}")),
            verdict: Verdict {
                retryable: false,
                may_have_executed: true,
            },
            retry_after: None,
        });
    }

    let (error, code) = match serde_json::from_slice::<Problem>(&body) {
        Ok(problem) => {
            let code = Some(problem.code.clone());
            let error = Error::Api {
                status: status.as_u16(),
                problem: Box::new(problem),
            };
            (error, code)
        }
        Err(_) => (unexpected(status, &quote(&body)), None),
    };
    Err(Failure {
        error,
        verdict: classify_status(status.as_u16(), code.as_deref()),
        retry_after,
    })
}

/// A failure without an answer; only a failed connect proves the server never saw it.
fn transport_failure(err: reqwest::Error) -> Failure {
    if err.is_builder() {
        // The request could not even be formed: retrying would fail the same way.
        return Failure {
            error: Error::InvalidArgument(err.to_string()),
            verdict: Verdict {
                retryable: false,
                may_have_executed: false,
            },
            retry_after: None,
        };
    }
    Failure {
        verdict: Verdict {
            retryable: true,
            may_have_executed: !err.is_connect(),
        },
        error: Error::Transport(err),
        retry_after: None,
    }
}

/// `Retry-After` in seconds; the HTTP-date form is ignored, the backoff then decides alone.
fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let text = headers.get(RETRY_AFTER)?.to_str().ok()?;
    text.trim().parse::<u64>().ok().map(Duration::from_secs)
}

fn unexpected(status: StatusCode, message: &str) -> Error {
    Error::UnexpectedResponse {
        status: status.as_u16(),
        message: message.to_owned(),
    }
}

fn quote(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    let quoted: String = text.chars().take(UNEXPECTED_BODY_CHARS_MAX).collect();
    format!("the body is not a problem document: {quoted:?}")
}

#[cfg(test)]
mod tests {
    use reqwest::header::HeaderValue;

    use super::*;

    #[test]
    fn retry_after_is_read_in_whole_seconds() {
        let mut headers = HeaderMap::new();
        headers.insert(RETRY_AFTER, HeaderValue::from_static(" 3 "));

        assert_eq!(retry_after(&headers), Some(Duration::from_secs(3)));
    }

    #[test]
    fn a_retry_after_date_or_garbage_is_ignored() {
        let mut headers = HeaderMap::new();
        headers.insert(
            RETRY_AFTER,
            HeaderValue::from_static("Fri, 31 Dec 1999 23:59:59 GMT"),
        );

        assert_eq!(retry_after(&headers), None);
        assert_eq!(retry_after(&HeaderMap::new()), None);
    }
}
